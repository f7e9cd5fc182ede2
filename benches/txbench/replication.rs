//! Rows "commit → replica object, p50 / p99 / max (ms)", "replica objects written per minute:
//! under load / idle", "bytes shipped / bytes staged" (a file replica), and "commit → S3 object
//! readable, p50 / p99 / max (ms)", "S3 requests per minute: under load / idle", "S3 requests
//! under load, by method" (the S3-compatible test server, through the counting proxy of s3/).
//! Each commits 100-byte text rows at 50 commits/s for `SQLFS_BENCH_SECS` (at least 5 s), then
//! stays idle; a transaction's lag runs from its commit time in the object header to when its
//! level-0 object was there (file: seen by a watcher polling every 5 ms; S3: the PUT
//! completed). Compacted objects are not counted: they hold commits already readable.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rusqlite::params;

use crate::harness::{open, Config, BUCKET};
use crate::mount::Mount;
use crate::s3;

// ---------------------------------------------------------------------------------------
// File replica

pub struct Replication {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub per_min_load: f64,
    pub per_min_idle: f64,
    pub shipped_ratio: f64,
}

/// Every segment object in `replica` (plain, unencrypted): (path, first TXID, last TXID,
/// first and last commit time in ns, size).
fn segments(replica: &Path) -> Vec<(PathBuf, u64, u64, u64, u64, u64)> {
    let mut out = Vec::new();
    let Ok(dbs) = fs::read_dir(replica) else {
        return out;
    };
    for db in dbs.flatten() {
        let Ok(objs) = fs::read_dir(db.path().join("l0")) else {
            continue;
        };
        for o in objs.flatten() {
            let p = o.path();
            if p.extension().is_none_or(|e| e != "seg") {
                continue;
            }
            let Ok(b) = fs::read(&p) else { continue };
            if b.len() < 128 || &b[..8] != b"SQFSOBJ\0" {
                continue;
            }
            let u = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
            out.push((p, u(32), u(40), u(48), u(56), b.len() as u64));
        }
    }
    out
}

/// Steady commits to a mount shipping to a file replica: how long each transaction takes to
/// appear in an object there (from its commit time in the object header to the moment a
/// watcher sees the object), objects per minute under load and idle, and compression.
pub fn replication(cfg: &Config) -> Result<Replication> {
    let mnt = cfg.work.join("repl-mnt");
    let backing = cfg.work.join("repl-backing");
    let replica = backing.with_extension("replica");
    let mount = Mount::start(&mnt, &backing, &cfg.work.join("repl.log"))?;
    let secs = cfg.secs.max(5.0);
    let conn = open(&mnt.join("r.db"), "NORMAL")?;
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT)")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen: std::sync::Arc<std::sync::Mutex<HashMap<PathBuf, Instant>>> = Default::default();
    let watcher = {
        let (stop, seen, replica) = (stop.clone(), seen.clone(), replica.clone());
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (p, ..) in segments(&replica) {
                    seen.lock().unwrap().entry(p).or_insert_with(Instant::now);
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Instant ↔ wall clock, to compare object header times with when the watcher saw them.
    let (t0, wall0) = (
        Instant::now(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    );
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        conn.execute(
            "INSERT INTO t(x) VALUES (?1)",
            params![format!(
                "row {i} of the replication benchmark, {}",
                i * 7919 % 1000
            )],
        )?;
        i += 1;
        thread::sleep(Duration::from_millis(20));
    }
    let load_secs = start.elapsed().as_secs_f64();
    thread::sleep(Duration::from_secs(3));
    let at_idle = segments(&replica).len();
    thread::sleep(Duration::from_secs_f64(secs.min(10.0)));
    let idle_objects = segments(&replica).len() - at_idle;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    let segs = segments(&replica);
    let seen = seen.lock().unwrap();
    let mut lags = Vec::new();
    for (p, first, last, t_first, t_last, _) in &segs {
        let Some(at) = seen.get(p) else { continue };
        let at_ns = wall0 + at.duration_since(t0).as_nanos() as u64;
        let n = last - first + 1;
        for k in 0..n {
            // Commit times are spread between the first and the last in the object.
            let t = if n == 1 {
                *t_last
            } else {
                t_first + (t_last - t_first) * k / (n - 1)
            };
            lags.push(at_ns.saturating_sub(t) as f64 / 1e6);
        }
    }
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let shipped: u64 = segs.iter().map(|s| s.5).sum();
    let staged: u64 = dir_bytes(&backing.join(".sqlfs"), "seg");
    drop(conn);
    mount.stop()?;
    Ok(Replication {
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: lags.last().copied().unwrap_or(f64::NAN),
        per_min_load: (segs.len() - idle_objects) as f64 * 60.0 / load_secs,
        per_min_idle: idle_objects as f64 * 60.0 / secs.min(10.0),
        shipped_ratio: shipped as f64 / staged.max(1) as f64,
    })
}

/// Total size of files ending in `.ext` under `dir`.
fn dir_bytes(dir: &Path, ext: &str) -> u64 {
    let mut n = 0;
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            n += dir_bytes(&p, ext);
        } else if p.extension().is_some_and(|x| x == ext) {
            n += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    n
}

// ---------------------------------------------------------------------------------------
// The S3-compatible server

pub struct S3Replication {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub per_min_load: f64,
    pub per_min_idle: f64,
    pub by_method: String,
    pub load_secs: f64,
    pub idle_secs: f64,
    pub objects: usize,
}

/// Steady commits to a mount shipping to the S3-compatible server through the counting
/// proxy: how long each transaction takes to be readable there (from its commit time in the
/// object header to the moment the server completed the PUT of its object), and requests per
/// minute under load and idle.
pub fn s3_replication(cfg: &Config, srv: &s3::Server) -> Result<S3Replication> {
    let proxy = s3::Proxy::start(srv.port)?;
    let prefix = "lag";
    let url = s3::Server::url_via(proxy.port, BUCKET, prefix);
    let mnt = cfg.work.join("s3-mnt");
    let mount = Mount::start_with(
        &mnt,
        &cfg.work.join("s3-backing"),
        &cfg.work.join("s3.log"),
        &[url],
    )?;
    let secs = cfg.secs.max(5.0);
    let idle = secs.min(10.0);
    let conn = open(&mnt.join("r.db"), "NORMAL")?;
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT)")?;
    // Instant ↔ wall clock, to compare object header times with when the PUT completed.
    let (t0, wall0) = (
        Instant::now(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    );
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        conn.execute(
            "INSERT INTO t(x) VALUES (?1)",
            params![format!(
                "row {i} of the replication benchmark, {}",
                i * 7919 % 1000
            )],
        )?;
        i += 1;
        thread::sleep(Duration::from_millis(20));
    }
    let load_end = Instant::now();
    thread::sleep(Duration::from_secs(3));
    let idle_start = Instant::now();
    thread::sleep(Duration::from_secs_f64(idle));
    let idle_end = Instant::now();
    let reqs = proxy.requests();
    drop(conn);
    mount.stop()?;
    drop(proxy);

    let in_window =
        |a: Instant, b: Instant| reqs.iter().filter(move |r| r.start >= a && r.start < b);
    let load_secs = (load_end - start).as_secs_f64();
    let idle_secs = (idle_end - idle_start).as_secs_f64();
    let mut by_method: std::collections::BTreeMap<String, usize> = Default::default();
    for r in in_window(start, load_end) {
        let kind = if r.method == "GET" && r.target.contains("list-type") {
            "LIST".to_string()
        } else {
            r.method.clone()
        };
        *by_method.entry(kind).or_default() += 1;
    }
    let mut lags = Vec::new();
    let mut objects = 0;
    for r in &reqs {
        let Some(key) = r.key(BUCKET) else { continue };
        // Level 0 only: a compacted object holds commits some level-0 object already made
        // readable, and counting it again would add its age to theirs.
        if r.method != "PUT" || r.status != 200 || !key.ends_with(".seg") || !key.contains("/l0/") {
            continue;
        }
        objects += 1;
        let b = srv.object(BUCKET, key)?;
        if b.len() < 128 || &b[..8] != b"SQFSOBJ\0" {
            bail!("{key} is not a plain segment object");
        }
        let u = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
        let (first, last, t_first, t_last) = (u(32), u(40), u(48), u(56));
        let at_ns = wall0 + r.end.duration_since(t0).as_nanos() as u64;
        let n = last - first + 1;
        for k in 0..n {
            // Commit times are spread between the first and the last in the object.
            let t = if n == 1 {
                t_last
            } else {
                t_first + (t_last - t_first) * k / (n - 1)
            };
            lags.push(at_ns.saturating_sub(t) as f64 / 1e6);
        }
    }
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(S3Replication {
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: lags.last().copied().unwrap_or(f64::NAN),
        per_min_load: in_window(start, load_end).count() as f64 * 60.0 / load_secs,
        per_min_idle: in_window(idle_start, idle_end).count() as f64 * 60.0 / idle_secs,
        by_method: if by_method.is_empty() {
            "none".into()
        } else {
            by_method
                .iter()
                .map(|(m, n)| format!("{m} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        load_secs,
        idle_secs,
        objects,
    })
}
