//! Rows "bulk load, N MB in 10 MB transactions (MB/s)" and "full scan, warm, N MB table
//! (MB/s)" (`SQLFS_BENCH_SCAN_MB`): [`load`] appends 1000-byte random rows in 10 MB
//! transactions, once on each side; [`scans`] times warm full scans on fresh connections,
//! alternating sides. [`bulk_load`] and [`grow_to`] also build the large databases of
//! memory.rs, restore.rs and history.rs. [`page_writes`] measures the floor under a
//! checkpoint: what 10 MB written one page per call costs where the daemon serves the file.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use rusqlite::{params, Connection};

use crate::harness::{db_bytes, median, open, remove_db, Rng, MB};

/// Appends `mb` MB of 1000-byte random rows to table `t` in transactions of `tx_mb` MB.
/// Returns the bytes of row data written and the elapsed time.
pub fn bulk_load(conn: &Connection, mb: u64, tx_mb: u64, seed: u64) -> Result<(u64, Duration)> {
    bulk_load_then(conn, mb, tx_mb, seed, |_| Ok(()))
}

/// [`bulk_load`], calling `after` with each transaction's bytes of row data once it is
/// committed (inside the timed span).
pub fn bulk_load_then(
    conn: &Connection,
    mb: u64,
    tx_mb: u64,
    seed: u64,
    mut after: impl FnMut(u64) -> Result<()>,
) -> Result<(u64, Duration)> {
    const ROW: usize = 1000;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, x BLOB NOT NULL);")?;
    let total_rows = mb * 1_000_000 / ROW as u64;
    let rows_per_tx = (tx_mb * 1_000_000 / ROW as u64).max(1);
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut done = 0u64;
    while done < total_rows {
        let n = rows_per_tx.min(total_rows - done);
        conn.execute_batch("BEGIN")?;
        {
            let mut stmt = conn.prepare_cached("INSERT INTO t(x) VALUES (?1)")?;
            for _ in 0..n {
                stmt.execute(params![rng.bytes(ROW)])?;
            }
        }
        conn.execute_batch("COMMIT")?;
        after(n * ROW as u64)?;
        done += n;
    }
    Ok((done * ROW as u64, start.elapsed()))
}

/// Row "staging floor" (MB/s): the bulk load of [`load`] in a native directory, each
/// transaction's bytes then written once more to a file of `dir` and synced before the next
/// one starts: the durable copy staging must make before a checkpoint may overwrite the
/// database file (docs/ARCHITECTURE.md, invariant 3), with none of sqlfs's other work and
/// no replica. Its ratio to the native load bounds the bulk-load row on this disk.
pub fn load_with_copy(dir: &Path, mb: u64) -> Result<f64> {
    let path = dir.join("copy.db");
    remove_db(&path);
    bulk_load(&open(&path, "NORMAL")?, 0, 10, 2)?;
    let conn = open(&path, "NORMAL")?;
    let copy_path = dir.join("copy.bin");
    let copy = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&copy_path)?;
    let mut rng = Rng::new(3);
    let mut at = 0u64;
    let (bytes, took) = bulk_load_then(&conn, mb, 10, 2, |n| {
        copy.write_all_at(&rng.bytes(n as usize), at)?;
        copy.sync_data()?;
        at += n;
        Ok(())
    })?;
    drop(copy);
    let _ = fs::remove_file(&copy_path);
    drop(conn);
    remove_db(&path);
    Ok(bytes as f64 / MB / took.as_secs_f64())
}

/// Row "checkpoint floor" (MB/s): 10 MB written as 4 KiB pages at increasing offsets, one
/// `pwrite` each, then one `fdatasync`, as a checkpoint writes a database file, to a new file
/// in `dir`. Opened read-write while empty, the file is served by the daemon (invariant 14) but
/// holds no SQLite header, so nothing is captured: under the mount this is the FUSE request
/// path alone, the bound a checkpoint through the daemon cannot beat.
pub fn page_writes(dir: &Path) -> Result<f64> {
    const PAGES: u64 = 2560;
    let path = dir.join("pages.bin");
    let _ = fs::remove_file(&path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut rng = Rng::new(5);
    let page = rng.bytes(4096);
    let start = Instant::now();
    for i in 0..PAGES {
        f.write_all_at(&page, i * 4096)?;
    }
    f.sync_data()?;
    let took = start.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(&path)?;
    Ok((PAGES * 4096) as f64 / MB / took)
}

pub fn scan_once(conn: &Connection) -> Result<Duration> {
    let start = Instant::now();
    let _sum: i64 = conn.query_row("SELECT sum(length(x)) FROM t", [], |r| r.get(0))?;
    Ok(start.elapsed())
}

/// Bulk load of `scan.db` in `dir`: MB/s. The database is created first (WAL mode, its
/// table) and the load runs on a new connection, as an import into an existing database does:
/// under the mount its file then goes straight through (docs/ARCHITECTURE.md, invariant 15).
pub fn load(dir: &Path, mb: u64) -> Result<f64> {
    let path = dir.join("scan.db");
    remove_db(&path);
    bulk_load(&open(&path, "NORMAL")?, 0, 10, 2)?;
    let conn = open(&path, "NORMAL")?;
    let (bytes, took) = bulk_load(&conn, mb, 10, 2)?;
    Ok(bytes as f64 / MB / took.as_secs_f64())
}

/// Warm full-scan MB/s of the `scan.db` tables `load` left in `native` and `mnt`: the
/// medians of scans alternating between the two, each on a fresh connection that scans once
/// to warm up and is timed on its second scan, the side that goes first swapping every round.
///
/// Fresh connections and the swapped order matter: with two connections held open in one
/// process, whichever was opened second scanned about 25% slower on this machine, whichever
/// directory it was on.
pub fn scans(native: &Path, mnt: &Path, rounds: usize) -> Result<(f64, f64)> {
    let paths = [native.join("scan.db"), mnt.join("scan.db")];
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..rounds.max(1) * 3 {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let conn = open(&paths[i], "NORMAL")?;
            scan_once(&conn)?;
            rates[i].push(db_bytes(&conn)? as f64 / MB / scan_once(&conn)?.as_secs_f64());
        }
    }
    let [n, s] = rates;
    Ok((median(n), median(s)))
}

/// Bulk-loads table `t` in 10 MB transactions until the database takes `target` bytes.
pub fn grow_to(conn: &Connection, target: u64, mut seed: u64) -> Result<()> {
    loop {
        let have = db_bytes(conn)?;
        if have >= target {
            return Ok(());
        }
        // Rows take a little more room than their data: top up in steps.
        let left_mb = (target - have).div_ceil(1_000_000).clamp(1, 128);
        bulk_load(conn, left_mb, 10, seed)?;
        seed += 1;
    }
}

/// Rows "CREATE INDEX / VACUUM of an N MB database (MB/s)" (`SQLFS_BENCH_VACUUM_MB`): a
/// database of `mb` MB (WAL mode, synchronous=NORMAL; 1000-byte rows with a random integer
/// key) is built on each side, untimed, then `CREATE INDEX` on the key and `VACUUM` are timed
/// on a new connection, alternating sides for `rounds` rounds, each timed step after a
/// sync(2). Returns the medians (native, sqlfs) of each, as MB of database per second.
///
/// With `floor`, a third side runs in `native` too, its `VACUUM` followed inside the timed
/// span by one more copy of the whole database written to a file and synced: the durable
/// staged copy of that one transaction (docs/ARCHITECTURE.md, invariant 3), the floor of the
/// `VACUUM` row where the database file goes straight through.
pub fn index_and_vacuum(
    native: &Path,
    mnt: &Path,
    mb: u64,
    rounds: usize,
    floor: bool,
) -> Result<IndexVacuum> {
    let mut sides = vec![native, mnt];
    if floor {
        sides.push(native);
    }
    let mut rates = vec![[Vec::new(), Vec::new()]; sides.len()];
    for round in 0..rounds.max(1) {
        let mut order: Vec<usize> = (0..sides.len()).collect();
        order.rotate_left(round % sides.len());
        for i in order {
            let path = sides[i].join("vacuum.db");
            remove_db(&path);
            let conn = open(&path, "NORMAL")?;
            conn.execute_batch(
                "CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, x BLOB NOT NULL);",
            )?;
            let mut rng = Rng::new(11);
            let rows = mb * 1_000_000 / 1000;
            let mut done = 0;
            while done < rows {
                conn.execute_batch("BEGIN")?;
                {
                    let mut stmt = conn.prepare_cached("INSERT INTO t(k, x) VALUES (?1, ?2)")?;
                    for _ in 0..10_000.min(rows - done) {
                        stmt.execute(params![rng.below(1 << 40) as i64, rng.bytes(1000)])?;
                        done += 1;
                    }
                }
                conn.execute_batch("COMMIT")?;
            }
            // Leave holes, as a database that lived a while has, for VACUUM to close.
            conn.execute_batch("DELETE FROM t WHERE id % 4 = 0; PRAGMA wal_checkpoint(TRUNCATE);")?;
            // Timed on a new connection, as maintenance of an existing database runs.
            drop(conn);
            let conn = open(&path, "NORMAL")?;
            for (j, sql) in ["CREATE INDEX tk ON t(k)", "VACUUM"].iter().enumerate() {
                // SAFETY: sync(2) has no preconditions.
                unsafe { libc::sync() };
                let start = Instant::now();
                conn.execute_batch(sql)?;
                let bytes = db_bytes(&conn)?;
                if i == 2 && j == 1 {
                    write_synced_copy(&sides[i].join("vacuum.copy"), bytes)?;
                }
                let took = start.elapsed().as_secs_f64();
                rates[i][j].push(bytes as f64 / MB / took);
            }
            drop(conn);
            remove_db(&path);
            let _ = fs::remove_file(sides[i].join("vacuum.copy"));
        }
    }
    let mut medians = rates.into_iter().map(|[i, v]| (median(i), median(v)));
    let (ni, nv) = medians.next().unwrap_or_default();
    let (si, sv) = medians.next().unwrap_or_default();
    Ok(IndexVacuum {
        index: (ni, si),
        vacuum: (nv, sv),
        vacuum_floor: medians.next().map(|(_, v)| v),
    })
}

/// Medians of [`index_and_vacuum`], MB/s: (native, sqlfs) for each statement, and the
/// `VACUUM` floor's when it ran.
pub struct IndexVacuum {
    pub index: (f64, f64),
    pub vacuum: (f64, f64),
    pub vacuum_floor: Option<f64>,
}

/// Writes `bytes` bytes of random data to a new file at `path` in 1 MiB writes, then syncs it.
fn write_synced_copy(path: &Path, bytes: u64) -> Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let chunk = Rng::new(7).bytes(1 << 20);
    let mut at = 0u64;
    while at < bytes {
        let n = (bytes - at).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    f.sync_data()?;
    Ok(())
}
