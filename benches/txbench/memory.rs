//! Rows "daemon VmRSS / VmHWM, idle after mount (MiB)" and "… N MB database (MiB)": a fresh
//! mount of its own, read idle, then as one database grows in 4 MB transactions to a small
//! size, a quarter of `SQLFS_BENCH_BIG_MB` and the whole, after a checkpoint and a full scan at
//! each size.

use std::thread;
use std::time::Duration;

use anyhow::Result;

use crate::bulk::{bulk_load, scan_once};
use crate::harness::{db_bytes, open, step, Config};
use crate::mount::Mount;

/// Daemon (VmRSS, VmHWM) in KiB at a database size in bytes (0 = idle after mount).
pub struct MemoryPoint {
    pub db_bytes: u64,
    pub rss: u64,
    pub hwm: u64,
}

/// Daemon memory on a fresh mount: idle, then as one database grows from small to large
/// in transactions of the same size, so that only the database size changes.
pub fn memory(cfg: &Config) -> Result<Vec<MemoryPoint>> {
    const TX_MB: u64 = 4;
    let mnt = cfg.work.join("mem-mnt");
    let m = Mount::start(
        &mnt,
        &cfg.work.join("mem-backing"),
        &cfg.work.join("sqlfs-mem.log"),
    )?;
    thread::sleep(Duration::from_millis(200));
    let (rss, hwm) = m.memory()?;
    let mut points = vec![MemoryPoint {
        db_bytes: 0,
        rss,
        hwm,
    }];
    let conn = open(&mnt.join("mem.db"), "NORMAL")?;
    let mut loaded = 0;
    let mut targets = vec![cfg.small_mb(), cfg.big_mb / 4, cfg.big_mb];
    targets.dedup();
    for (i, target) in targets.into_iter().enumerate() {
        if target <= loaded {
            continue;
        }
        if i > 0 {
            step(&format!("growing the database to {target} MB"));
        }
        bulk_load(&conn, target - loaded, TX_MB, 4 + i as u64)?;
        loaded = target;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        scan_once(&conn)?;
        let (rss, hwm) = m.memory()?;
        points.push(MemoryPoint {
            db_bytes: db_bytes(&conn)?,
            rss,
            hwm,
        });
    }
    drop(conn);
    m.stop()?;
    Ok(points)
}
