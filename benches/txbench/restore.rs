//! Rows "restore from the file / S3 replica, latest state / TXID N (mid-window), N MB
//! database (MB/s, time)": a database of `SQLFS_BENCH_RESTORE_MB` MiB and
//! `SQLFS_BENCH_RESTORE_TXNS` small transactions after it, built through a mount shipping to a
//! file replica and (unless `SQLFS_BENCH_S3=0`) to the S3-compatible test server; then, the
//! mount stopped, `sqlfs restore` of the latest state and of the mid-window TXID from each
//! replica, the median of three restores of each.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rusqlite::params;

use crate::bulk::grow_to;
use crate::cli::{last_txid, timed_restore, wait_shipped};
use crate::harness::{median, open, step, Config, Rng, BUCKET};
use crate::mount::Mount;
use crate::s3;

pub struct RestoreTiming {
    pub replica: &'static str,
    pub what: String,
    pub bytes: u64,
    pub secs: f64,
}

pub struct RestoreRun {
    pub db_bytes: u64,
    pub txns: u64,
    /// First and last TXID of the small transactions.
    pub window: (u64, u64),
    pub mid: u64,
    pub load_secs: f64,
    pub ship_secs: f64,
    pub timings: Vec<RestoreTiming>,
}

/// A database of `restore_mb` MiB and `restore_txns` small transactions after it, built on a
/// mount shipping to a file replica (and the S3-compatible server, when there is one); then,
/// with the mount stopped, `sqlfs restore` of the latest state and of the TXID in the middle
/// of the small transactions, from each replica.
pub fn restore_bench(cfg: &Config, store: Option<&s3::Server>) -> Result<RestoreRun> {
    const DB: &str = "restore.db";
    let mnt = cfg.work.join("restore-mnt");
    let backing = cfg.work.join("restore-backing");
    let file_replica = cfg.work.join("restore-replica");
    let file_url = format!("file://{}", file_replica.display());
    let mut replicas = vec![("file", file_url.clone())];
    if let Some(s) = store {
        replicas.push(("S3", s.url(BUCKET, "restore")));
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.1.clone()).collect();
    let mount = Mount::start_with(&mnt, &backing, &cfg.work.join("restore.log"), &urls)?;
    let target = cfg.restore_mb << 20;
    step(&format!(
        "restore: building a {} MiB database, shipped to {}",
        cfg.restore_mb,
        replicas
            .iter()
            .map(|r| r.0)
            .collect::<Vec<_>>()
            .join(" and ")
    ));
    let conn = open(&mnt.join(DB), "NORMAL")?;
    let start = Instant::now();
    grow_to(&conn, target, 20)?;
    let first = last_txid(&mnt, DB)? + 1;
    step(&format!(
        "restore: {} small transactions after it",
        cfg.restore_txns
    ));
    let rows: u64 = conn.query_row("SELECT max(id) FROM t", [], |r| r.get(0))?;
    let mut rng = Rng::new(7);
    for i in 0..cfg.restore_txns {
        if i % 2 == 0 {
            conn.execute("INSERT INTO t(x) VALUES (?1)", params![rng.bytes(100)])?;
        } else {
            conn.execute(
                "UPDATE t SET x = ?1 WHERE id = ?2",
                params![rng.bytes(1000), 1 + rng.below(rows)],
            )?;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let last = last_txid(&mnt, DB)?;
    let load_secs = start.elapsed().as_secs_f64();
    drop(conn);
    let shipping = Instant::now();
    wait_shipped(&mnt, DB, last, urls.len(), Duration::from_secs(1800))?;
    let ship_secs = shipping.elapsed().as_secs_f64();
    mount.stop()?;
    let mid = first + (last - first) / 2;

    let out = cfg.work.join("restored.db");
    let mut timings = Vec::new();
    let mut db_size = 0;
    for (replica, url) in &replicas {
        for (what, txid, want) in [
            ("latest state".to_string(), None, last),
            (format!("TXID {mid} (mid-window)"), Some(mid), mid),
        ] {
            step(&format!("restore: {what} from the {replica} replica"));
            // The median of three: the first restore of a replica also pulls its objects
            // into the page cache, which would otherwise favour whichever target comes second.
            let mut runs = Vec::new();
            let mut bytes = 0;
            for _ in 0..3 {
                let (got, took) = timed_restore(url, DB, &out, txid)?;
                if got != want {
                    bail!("restore from {url} restored TXID {got}, not {want}");
                }
                bytes = fs::metadata(&out)?.len();
                fs::remove_file(&out)?;
                runs.push(took.as_secs_f64());
            }
            let took = Duration::from_secs_f64(median(runs));
            db_size = db_size.max(bytes);
            timings.push(RestoreTiming {
                replica,
                what,
                bytes,
                secs: took.as_secs_f64(),
            });
        }
    }
    // The database and the replicas take a few GB of disk: not kept past this workload.
    if !cfg.keep {
        for d in [&backing, &file_replica] {
            let _ = fs::remove_dir_all(d);
        }
    }
    Ok(RestoreRun {
        db_bytes: db_size,
        txns: cfg.restore_txns,
        window: (first, last),
        mid,
        load_secs,
        ship_secs,
        timings,
    })
}
