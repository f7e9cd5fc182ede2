//! Rows "autocommit INSERT, synchronous=NORMAL (tx/s)", "… synchronous=FULL (tx/s)" and
//! "mixed N% point reads / M% updates, T connections (ops/s)": small transactions, native
//! directory against the mount (main runs each through `alternate`). [`autocommit`] commits
//! one ~100-byte row per transaction for `SQLFS_BENCH_SECS`; [`mixed`] loads 100,000 rows, then
//! `SQLFS_BENCH_THREADS` connections read (`SQLFS_BENCH_READS` percent) or update rows by
//! primary key at random for `SQLFS_BENCH_SECS`, busy errors not counted. [`rollback_reads`]
//! and [`rollback_commits`]: the rows "point reads, rollback-journal database, one connection
//! (reads/s)" and "1-row updates, rollback-journal database, … (tx/s)".

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use rusqlite::params;

use crate::harness::{is_busy, open, remove_db, Rng};

/// Autocommit INSERTs of ~100-byte rows for `secs` seconds; returns tx/s. The database is
/// created first and the commits run on a new connection, as an app's on its existing
/// database do (under the mount its file then goes straight through, invariant 15).
pub fn autocommit(dir: &Path, synchronous: &str, secs: f64) -> Result<f64> {
    let path = dir.join(format!("autocommit-{}.db", synchronous.to_lowercase()));
    remove_db(&path);
    open(&path, synchronous)?
        .execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, x BLOB NOT NULL);")?;
    let conn = open(&path, synchronous)?;
    let mut rng = Rng::new(1);
    let mut stmt = conn.prepare("INSERT INTO t(x) VALUES (?1)")?;
    for _ in 0..100 {
        stmt.execute(params![rng.bytes(100)])?;
    }
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while start.elapsed() < limit {
        stmt.execute(params![rng.bytes(100)])?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Creates table `t` on `conn` with `rows` rows of 100 random bytes (ids 1..=rows, bytes from
/// `seed`), in one transaction.
fn fill(conn: &rusqlite::Connection, rows: u64, seed: u64) -> Result<()> {
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, x BLOB NOT NULL); BEGIN;")?;
    let mut stmt = conn.prepare("INSERT INTO t(id, x) VALUES (?1, ?2)")?;
    let mut rng = Rng::new(seed);
    for id in 1..=rows {
        stmt.execute(params![id, rng.bytes(100)])?;
    }
    drop(stmt);
    conn.execute_batch("COMMIT;")?;
    Ok(())
}

/// Point reads / updates by primary key from `threads` connections; returns ops/s.
pub fn mixed(dir: &Path, threads: usize, read_pct: u64, secs: f64) -> Result<f64> {
    const ROWS: u64 = 100_000;
    let path = dir.join("mixed.db");
    remove_db(&path);
    {
        let conn = open(&path, "NORMAL")?;
        fill(&conn, ROWS, 3)?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    }
    let barrier = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    let (total, took) = thread::scope(|s| -> Result<(u64, Duration)> {
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let (barrier, stop, path) = (&barrier, &stop, &path);
                s.spawn(move || -> Result<u64> {
                    let conn = open(path, "NORMAL");
                    barrier.wait();
                    let conn = conn?;
                    let mut rng = Rng::new(100 + i as u64);
                    let mut read = conn.prepare("SELECT x FROM t WHERE id = ?1")?;
                    let mut write = conn.prepare("UPDATE t SET x = ?1 WHERE id = ?2")?;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let id = 1 + rng.below(ROWS);
                        let r = if rng.below(100) < read_pct {
                            read.query_row(params![id], |r| r.get::<_, Vec<u8>>(0))
                                .map(|_| ())
                        } else {
                            write.execute(params![rng.bytes(100), id]).map(|_| ())
                        };
                        match r {
                            Ok(()) => n += 1,
                            Err(e) if is_busy(&e) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Ok(n)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for w in workers {
            total += w.join().expect("worker panicked")?;
        }
        Ok((total, start.elapsed()))
    })?;
    Ok(total as f64 / took.as_secs_f64())
}

/// Rows of the rollback-journal databases.
const ROLLBACK_ROWS: u64 = 10_000;

/// A new database at `path` in rollback-journal mode (`DELETE`) with [`ROLLBACK_ROWS`] rows
/// (bytes from `seed`), made on a connection of its own; returns a new connection to it.
fn rollback_db(path: &Path, seed: u64) -> Result<rusqlite::Connection> {
    remove_db(path);
    {
        let conn = rusqlite::Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode=DELETE;")?;
        fill(&conn, ROLLBACK_ROWS, seed)?;
    }
    Ok(rusqlite::Connection::open(path)?)
}

/// Point reads by primary key of a 10,000-row database in rollback-journal mode (`DELETE`,
/// SQLite's default), one connection, for `secs`; returns reads/s. Each read is a transaction
/// of its own, and outside WAL mode SQLite looks for a journal and a WAL file at every one.
pub fn rollback_reads(dir: &Path, secs: f64) -> Result<f64> {
    let conn = rollback_db(&dir.join("rollback-reads.db"), 4)?;
    let mut read = conn.prepare("SELECT x FROM t WHERE id = ?1")?;
    let mut rng = Rng::new(5);
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while start.elapsed() < limit {
        for _ in 0..100 {
            let id = 1 + rng.below(ROLLBACK_ROWS);
            read.query_row(params![id], |r| r.get::<_, Vec<u8>>(0))?;
        }
        n += 100;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Updates of one row by primary key, one transaction each, of a 10,000-row database in
/// rollback-journal mode (`DELETE`, with `synchronous=FULL`: SQLite's defaults), one
/// connection, for `secs`; returns tx/s. Each commit makes, writes and syncs a journal, writes
/// and syncs the database file, and deletes the journal.
pub fn rollback_commits(dir: &Path, secs: f64) -> Result<f64> {
    let conn = rollback_db(&dir.join("rollback-commits.db"), 6)?;
    conn.execute_batch("PRAGMA synchronous=FULL;")?;
    let mut write = conn.prepare("UPDATE t SET x = ?1 WHERE id = ?2")?;
    let mut rng = Rng::new(7);
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while start.elapsed() < limit {
        write.execute(params![rng.bytes(100), 1 + rng.below(ROLLBACK_ROWS)])?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}
