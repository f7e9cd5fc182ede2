//! Rows "<backend>: commit → object readable, p50 / p99 / max (ms)" and "<backend>: restore of
//! the latest state, N MB database (MB/s, time)" for each replica backend against its loopback
//! server: the S3-compatible server, OpenSSH's sshd (sftp://), the GCS emulator (gs://) and
//! Azurite (az://), with the file replica's restore beside them. The servers are started the
//! way the tests start them (tests/common/sshserver.rs and cloudservers.rs, included here); a
//! server that cannot start leaves its rows out with a note saying why.
//!
//! Lag: one mount per backend, 100-byte text rows at 50 commits/s for `SQLFS_BENCH_SECS`
//! (at least 3 s), 1 s sync interval. A lister on its own client of the replica lists the
//! replica every 10 ms and records when each segment object first appears; a transaction's
//! lag runs from its commit time in the object header to that moment (commit times within an
//! object are spread between its first and last). The same method for every backend, so the
//! rows compare with each other (the `s3` group's row times the PUT itself, through a proxy).
//!
//! Restore: one mount shipping to the file replica and every backend at once builds a
//! database of `SQLFS_BENCH_BACKENDS_MB` MiB (default 256; 0 skips restore) in 10 MB
//! transactions plus 20 small ones; with the mount stopped, `sqlfs restore` of the latest
//! state from each replica, the median of three.

use std::collections::HashMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use rusqlite::params;

use crate::bulk::grow_to;
use crate::cli::{last_txid, timed_restore, wait_shipped};
use crate::harness::{median, open, step, Config, BUCKET, MB};
use crate::mount::Mount;
use crate::report::{fmt_num, Row};
use crate::s3;

// The tests' server harnesses, as they are; they take these two helpers from their parent.
#[allow(dead_code)]
#[path = "../../tests/common/cloudservers.rs"]
mod cloudservers;
#[allow(dead_code)]
#[path = "../../tests/common/sshserver.rs"]
mod sshserver;

fn sleep_ms(ms: u64) {
    thread::sleep(Duration::from_millis(ms));
}

fn send_signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a pid this process started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A running server of one backend and how to name a replica on it.
enum Srv<'a> {
    S3(&'a s3::Server),
    OwnS3(s3::Server),
    Sftp(sshserver::SshServer),
    Gcs(cloudservers::GcsServer),
    Azure(cloudservers::Azurite),
}

impl Srv<'_> {
    fn url(&self, prefix: &str) -> String {
        match self {
            Srv::S3(s) => s.url(BUCKET, prefix),
            Srv::OwnS3(s) => s.url(BUCKET, prefix),
            Srv::Sftp(s) => s.url(prefix),
            Srv::Gcs(s) => s.url(BUCKET, prefix),
            Srv::Azure(s) => s.url(BUCKET, prefix),
        }
    }
}

/// Runs `start`; a panic (the harnesses panic when a server is missing or does not come
/// up) becomes an error with its message.
fn try_start<T>(start: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(start)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "it panicked".into());
        anyhow!("{msg}")
    })
}

/// The backends' rows and notes.
pub fn backends(cfg: &Config, store: Option<&s3::Server>) -> Result<(Vec<Row>, Vec<String>)> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut servers: Vec<(&'static str, Srv)> = Vec::new();
    // The lister's own S3 client reads its credentials from this process's environment.
    for (k, v) in s3::ENV {
        std::env::set_var(k, v);
    }
    if cfg.s3 {
        match store {
            Some(s) => servers.push(("S3", Srv::S3(s))),
            None => {
                step("backends: starting the S3-compatible test server");
                match s3::Server::start(BUCKET) {
                    Ok(s) => servers.push(("S3", Srv::OwnS3(s))),
                    Err(e) => notes.push(format!("Backends: S3 left out: {e:#}")),
                }
            }
        }
    }
    step("backends: starting sshd, the GCS emulator and Azurite");
    match try_start(sshserver::SshServer::start) {
        Ok(s) => servers.push(("SFTP", Srv::Sftp(s))),
        Err(e) => notes.push(format!("Backends: SFTP left out, sshd did not start: {e}")),
    }
    match try_start(|| cloudservers::GcsServer::start(BUCKET)) {
        Ok(s) => servers.push(("GCS", Srv::Gcs(s))),
        Err(e) => notes.push(format!(
            "Backends: GCS left out, the emulator did not start: {e}"
        )),
    }
    cloudservers::azurite_credentials();
    match try_start(|| cloudservers::Azurite::start(BUCKET)) {
        Ok(s) => servers.push(("Azure", Srv::Azure(s))),
        Err(e) => notes.push(format!(
            "Backends: Azure left out, Azurite did not start: {e}"
        )),
    }

    let secs = cfg.secs.max(3.0);
    for (name, srv) in &servers {
        step(&format!(
            "backends: commit → readable on the {name} replica, {secs:.0} s"
        ));
        match lag(cfg, name, &srv.url("be-lag"), secs) {
            Ok(l) => rows.push(Row::text(
                &format!(
                    "{name}: commit → object readable, p50 / p99 / max (ms), 1 s sync interval"
                ),
                format!("{:.0} / {:.0} / {:.0}", l.p50, l.p99, l.max),
            )),
            Err(e) => notes.push(format!("Backends: {name} lag failed: {e:#}")),
        }
    }

    let mb: u64 = std::env::var("SQLFS_BENCH_BACKENDS_MB")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(256);
    if mb > 0 {
        let file_url = format!("file://{}", cfg.work.join("backends-replica").display());
        let mut replicas = vec![("file", file_url)];
        replicas.extend(servers.iter().map(|(n, s)| (*n, s.url("be-restore"))));
        let r = restore(cfg, &replicas, mb)?;
        for (name, bytes, secs) in &r.timings {
            rows.push(Row::text(
                &format!(
                    "{name}: restore of the latest state, {} MB database (MB/s, time)",
                    fmt_num(*bytes as f64 / MB, 0)
                ),
                format!("{:.1} ({:.2} s)", *bytes as f64 / MB / secs, secs),
            ));
        }
        notes.push(format!(
            "Backends: lag measured by a lister polling each replica every 10 ms ({secs:.0} s of \
             commits at 50/s, one mount per backend). Restore: a {mb} MiB database and 20 small \
             transactions built in {:.0} s through one mount shipping to the file replica and \
             every backend at once ({:.0} s more to ship); each restore the median of three. \
             Every server runs on loopback on this machine.",
            r.load_secs, r.ship_secs
        ));
    }
    drop(servers);
    Ok((rows, notes))
}

struct Lag {
    p50: f64,
    p99: f64,
    max: f64,
}

/// Steady commits to a mount shipping to `url`; each transaction's lag until a lister sees
/// its object.
fn lag(cfg: &Config, name: &str, url: &str, secs: f64) -> Result<Lag> {
    let tag = name.to_lowercase();
    let mnt = cfg.work.join(format!("be-{tag}-mnt"));
    let mount = Mount::start_with(
        &mnt,
        &cfg.work.join(format!("be-{tag}-backing")),
        &cfg.work.join(format!("be-{tag}.log")),
        &[url.to_string()],
    )?;
    let client: Arc<dyn sqlfs::replica::ReplicaClient> = Arc::from(sqlfs::replica::open(url)?);
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let lister = {
        let (stop, seen, client) = (stop.clone(), seen.clone(), client.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(keys) = client.list("") {
                    // (A failed listing is retried at the next poll.)
                    let now = Instant::now();
                    let mut s = seen.lock().unwrap();
                    for k in keys {
                        if k.key.ends_with(".seg") && k.key.contains("/l0/") {
                            s.entry(k.key).or_insert(now);
                        }
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let result = (|| -> Result<Lag> {
        let conn = open(&mnt.join("r.db"), "NORMAL")?;
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT)")?;
        let (t0, wall0) = (
            Instant::now(),
            SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64,
        );
        let start = Instant::now();
        let mut i = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            conn.execute(
                "INSERT INTO t(x) VALUES (?1)",
                params![format!(
                    "row {i} of the backends benchmark, {}",
                    i * 7919 % 1000
                )],
            )?;
            i += 1;
            thread::sleep(Duration::from_millis(20));
        }
        drop(conn);
        thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        let seen = seen.lock().unwrap().clone();
        let mut lags = Vec::new();
        for (key, at) in &seen {
            let Some(b) = client.get_range(key, 0, 128)? else {
                continue;
            };
            if b.len() < 128 || &b[..8] != b"SQFSOBJ\0" {
                bail!("{key} is not a plain segment object");
            }
            let u = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
            let (first, last, t_first, t_last) = (u(32), u(40), u(48), u(56));
            let at_ns = wall0 + at.duration_since(t0).as_nanos() as u64;
            let n = last - first + 1;
            for k in 0..n {
                let t = if n == 1 {
                    t_last
                } else {
                    t_first + (t_last - t_first) * k / (n - 1)
                };
                lags.push(at_ns.saturating_sub(t) as f64 / 1e6);
            }
        }
        if lags.is_empty() {
            bail!("no segment object appeared on {name}");
        }
        lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |q: f64| lags[((lags.len() as f64 - 1.0) * q).round() as usize];
        Ok(Lag {
            p50: pct(0.5),
            p99: pct(0.99),
            max: lags[lags.len() - 1],
        })
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = lister.join();
    mount.stop()?;
    result
}

struct Restored {
    load_secs: f64,
    ship_secs: f64,
    /// (replica, bytes, seconds) of each restore.
    timings: Vec<(&'static str, u64, f64)>,
}

fn restore(cfg: &Config, replicas: &[(&'static str, String)], mb: u64) -> Result<Restored> {
    const DB: &str = "be.db";
    let mnt = cfg.work.join("be-restore-mnt");
    let backing = cfg.work.join("be-restore-backing");
    let urls: Vec<String> = replicas.iter().map(|r| r.1.clone()).collect();
    let mount = Mount::start_with(&mnt, &backing, &cfg.work.join("be-restore.log"), &urls)?;
    step(&format!(
        "backends: building a {mb} MiB database, shipped to {}",
        replicas.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
    ));
    let conn = open(&mnt.join(DB), "NORMAL")?;
    let start = Instant::now();
    grow_to(&conn, mb << 20, 31)?;
    for i in 0..20 {
        conn.execute(
            "INSERT INTO t(x) VALUES (?1)",
            params![format!("small transaction {i}").into_bytes()],
        )?;
    }
    let last = last_txid(&mnt, DB)?;
    let load_secs = start.elapsed().as_secs_f64();
    drop(conn);
    let shipping = Instant::now();
    wait_shipped(&mnt, DB, last, urls.len(), Duration::from_secs(600))?;
    let ship_secs = shipping.elapsed().as_secs_f64();
    mount.stop()?;

    let out = cfg.work.join("be-restored.db");
    let mut timings = Vec::new();
    for (name, url) in replicas {
        step(&format!("backends: restore from the {name} replica"));
        let mut runs = Vec::new();
        let mut bytes = 0;
        for _ in 0..3 {
            let (got, took) = timed_restore(url, DB, &out, None)?;
            if got != last {
                bail!("restore from {name} restored TXID {got}, not {last}");
            }
            bytes = fs::metadata(&out)?.len();
            fs::remove_file(&out)?;
            runs.push(took.as_secs_f64());
        }
        timings.push((*name, bytes, median(runs)));
    }
    if !cfg.keep {
        let _ = fs::remove_dir_all(&backing);
    }
    Ok(Restored {
        load_secs,
        ship_secs,
        timings,
    })
}
