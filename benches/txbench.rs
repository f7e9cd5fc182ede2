//! sqlfs benchmark: a plain directory against an sqlfs mount, on the same disk, in the
//! same run. Run with `make bench` (or `cargo bench --bench txbench`).
//!
//! Workloads (SQLite in WAL mode, one database file per workload):
//!  1. small autocommit INSERTs (~100-byte rows) at synchronous=NORMAL, for a fixed time;
//!  2. the same at synchronous=FULL;
//!  3. bulk load of a large table (10 MB transactions), then a warm full scan of it;
//!  4. mixed point reads / updates by primary key from several connections; beside these,
//!     4 KiB writes to a plain file and extended-attribute lookups (one kernel-to-daemon
//!     round trip each, the fixed price of every request the mount cannot pass through);
//!     and the floor under FULL: a commit-like loop (24-byte header, 4 KiB page, fdatasync)
//!     natively and through a bare passthrough FUSE server that captures nothing
//!     (`floor.rs`, as root only);
//!  5. resident memory of the sqlfs daemon with a small database and after growing it
//!     to a large one (on a fresh mount of its own);
//!  6. replication to a file replica: commit → object lag, objects per minute, compression;
//!  7. restore: a large database plus a window of small transactions after it, shipped to a
//!     file replica and to the S3-compatible test server; `sqlfs restore` of the latest
//!     state and of a TXID in the middle of the window, from each (MB/s, the median of three
//!     restores of each target);
//!  8. replication to the S3-compatible server through a counting proxy: commit → object
//!     readable lag, and requests per minute under constant writes and idle;
//!  9. history views: a large database and small transactions after it on a mount whose
//!     staging keeps every page locally; open + one point query of `.history/txid-N/`, of
//!     `.history/<instant>/` and of `.history/latest/` on a fresh connection (the view's first
//!     access), a warm second query, and a full scan, each against the same on a copy made by
//!     `sqlfs restore --txid N` on local disk; then the same view with staging folded, so
//!     that it comes from the file replica.
//!
//! Before the scans, the daemon is given time to finish staging and shipping the load (until
//! it uses no CPU for half a second). Workloads 1-4 alternate between the two sides for
//! several rounds (`SQLFS_BENCH_ROUNDS`), the side that goes first swapping every round, and
//! report each side's median: this machine's speed drifts over a run, and alternating keeps
//! that drift from favouring either side. Each timed run starts after a sync(2), so that
//! neither side pays for writing back what the other left dirty.
//!
//! The results are printed as a markdown table and written to target/bench-results.md.
//! The S3-compatible server is the one `make bench` installs (as `make test` does).
//!
//! Environment:
//!   SQLFS_BENCH_SECS     seconds per timed workload and round (default 5)
//!   SQLFS_BENCH_ROUNDS   rounds of workloads 1-4, each side once per round (default 3)
//!   SQLFS_BENCH_SCAN_MB  size of the scanned table in MB (default 200)
//!   SQLFS_BENCH_BIG_MB   size the memory workload grows its database to, MB (default 1024)
//!   SQLFS_BENCH_THREADS  connections in the mixed workload (default 4)
//!   SQLFS_BENCH_READS    percent of reads in the mixed workload (default 80)
//!   SQLFS_BENCH_RESTORE_MB    size of the restored database, MiB (default 1024; 0 skips)
//!   SQLFS_BENCH_RESTORE_TXNS  small transactions after it (default 300)
//!   SQLFS_BENCH_HISTORY_MB    size of the database behind the history views, MiB
//!                             (default 1024; 0 skips)
//!   SQLFS_BENCH_S3=0     leave out everything that needs the S3-compatible server
//!   SQLFS_BENCH_ONLY     run only these workloads, comma-separated, of: autocommit, scan,
//!                        plain, roundtrip, floor, mixed, replication, memory, restore, s3,
//!                        history
//!   SQLFS_S3_SERVER      the S3-compatible server binary (default: .venv/bin/moto_server)
//!   SQLFS_BENCH_DIR      where to make the work directory sqlfs-bench-work; on disk, not
//!                        tmpfs (default: target/bench-work)
//!   SQLFS_BENCH_KEEP=1   keep the work directory afterwards
//!   SQLFS_BENCH_MOUNT_ARGS  more flags for every mount, e.g. "--passthrough off"

mod floor;
mod s3;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, ErrorCode};

const SQLFS: &str = env!("CARGO_BIN_EXE_sqlfs");
const MB: f64 = 1_000_000.0;

// ---------------------------------------------------------------------------------------
// Configuration

struct Config {
    secs: f64,
    rounds: usize,
    scan_mb: u64,
    small_mb: u64,
    big_mb: u64,
    threads: usize,
    read_pct: u64,
    restore_mb: u64,
    restore_txns: u64,
    history_mb: u64,
    s3: bool,
    only: Option<Vec<String>>,
    work: PathBuf,
    results: PathBuf,
    keep: bool,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid number")),
        _ => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Config> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        let target = absolute(&target)?;
        let work = match std::env::var_os("SQLFS_BENCH_DIR") {
            Some(d) if !d.is_empty() => absolute(Path::new(&d))?.join("sqlfs-bench-work"),
            _ => target.join("bench-work"),
        };
        let cfg = Config {
            secs: env_num("SQLFS_BENCH_SECS", 5.0)?,
            rounds: env_num("SQLFS_BENCH_ROUNDS", 3)?,
            scan_mb: env_num("SQLFS_BENCH_SCAN_MB", 200)?,
            small_mb: 10,
            big_mb: env_num("SQLFS_BENCH_BIG_MB", 1024)?,
            threads: env_num("SQLFS_BENCH_THREADS", 4)?,
            read_pct: env_num("SQLFS_BENCH_READS", 80)?,
            restore_mb: env_num("SQLFS_BENCH_RESTORE_MB", 1024)?,
            restore_txns: env_num("SQLFS_BENCH_RESTORE_TXNS", 300)?,
            history_mb: env_num("SQLFS_BENCH_HISTORY_MB", 1024)?,
            s3: std::env::var("SQLFS_BENCH_S3").map_or(true, |v| v.trim() != "0"),
            only: std::env::var("SQLFS_BENCH_ONLY")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.split(',').map(|w| w.trim().to_lowercase()).collect()),
            work,
            results: target.join("bench-results.md"),
            keep: std::env::var("SQLFS_BENCH_KEEP").is_ok_and(|v| v == "1"),
        };
        if cfg.secs <= 0.0
            || cfg.rounds == 0
            || cfg.threads == 0
            || cfg.scan_mb == 0
            || cfg.read_pct > 100
        {
            bail!("invalid benchmark settings");
        }
        const KNOWN: [&str; 11] = [
            "autocommit",
            "scan",
            "plain",
            "roundtrip",
            "floor",
            "mixed",
            "replication",
            "memory",
            "restore",
            "s3",
            "history",
        ];
        for w in cfg.only.iter().flatten() {
            if !KNOWN.contains(&w.as_str()) {
                bail!(
                    "SQLFS_BENCH_ONLY: unknown workload {w:?} (known: {})",
                    KNOWN.join(", ")
                );
            }
        }
        Ok(cfg)
    }

    /// True if workload `name` is to run (restore leaves out its S3 half without `s3`).
    fn runs(&self, name: &str) -> bool {
        let wanted = self
            .only
            .as_ref()
            .is_none_or(|o| o.iter().any(|w| w == name));
        match name {
            "restore" => wanted && self.restore_mb > 0,
            "history" => wanted && self.history_mb > 0,
            "s3" => wanted && self.s3,
            _ => wanted,
        }
    }

    fn small_mb(&self) -> u64 {
        self.small_mb.min(self.big_mb.max(1))
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

// ---------------------------------------------------------------------------------------
// Small deterministic PRNG (splitmix64): row contents and key choice.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

// ---------------------------------------------------------------------------------------
// Mount handling

/// Unescapes the octal escapes (`\040` etc.) the kernel uses in /proc/self/mountinfo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (mount point, fstype, source) for every line of /proc/self/mountinfo.
fn mounts() -> Vec<(PathBuf, String, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?.to_string();
            let source = unescape_mountinfo(right.next().unwrap_or(""));
            Some((PathBuf::from(unescape_mountinfo(point)), fstype, source))
        })
        .collect()
}

/// An sqlfs mount shows up as type `fuse.sqlfs`, or as type `fuse` with source `sqlfs`
/// when the kernel mount was made without a subtype.
fn is_sqlfs_mount(dir: &Path) -> bool {
    mounts()
        .iter()
        .any(|(p, t, s)| p == dir && (t == "fuse.sqlfs" || (t == "fuse" && s == "sqlfs")))
}

/// Filesystem type of the mount that holds `path`.
fn fstype_of(path: &Path) -> String {
    mounts()
        .into_iter()
        .filter(|(p, _, _)| path.starts_with(p))
        .max_by_key(|(p, _, _)| p.as_os_str().len())
        .map(|(_, t, _)| t)
        .unwrap_or_else(|| "?".into())
}

fn force_unmount(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: plain syscall on a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

struct Mount {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

impl Mount {
    /// A mount shipping to a file replica beside its data directory (`<backing>.replica`).
    fn start(dir: &Path, backing: &Path, log: &Path) -> Result<Mount> {
        let replica = format!("file://{}", backing.with_extension("replica").display());
        Mount::start_with(dir, backing, log, &[replica])
    }

    /// A mount shipping to `replicas` (URLs).
    fn start_with(dir: &Path, backing: &Path, log: &Path, replicas: &[String]) -> Result<Mount> {
        Mount::start_args(dir, backing, log, replicas, &[])
    }

    /// A mount shipping to `replicas` (URLs), with more `sqlfs mount` arguments.
    fn start_args(
        dir: &Path,
        backing: &Path,
        log: &Path,
        replicas: &[String],
        extra: &[String],
    ) -> Result<Mount> {
        fs::create_dir_all(dir)?;
        fs::create_dir_all(backing)?;
        let out = File::create(log)?;
        let mut cmd = Command::new(SQLFS);
        cmd.arg("mount").arg(dir).arg("--data-dir").arg(backing);
        for r in replicas {
            cmd.arg("--replica").arg(r);
        }
        cmd.args(extra);
        // More mount flags for every mount of the run (e.g. `--passthrough off`).
        if let Ok(more) = std::env::var("SQLFS_BENCH_MOUNT_ARGS") {
            cmd.args(more.split_whitespace());
        }
        let child = cmd
            .envs(s3::ENV)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {SQLFS}"))?;
        let mut m = Mount {
            child: Some(child),
            dir: dir.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if is_sqlfs_mount(dir) {
                return Ok(m);
            }
            if let Some(st) = m.child.as_mut().unwrap().try_wait()? {
                m.child = None;
                bail!(
                    "sqlfs exited before mounting ({st}); log:\n{}",
                    m.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "sqlfs did not mount {} within 20 s; log:\n{}",
                    dir.display(),
                    m.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits (up to a minute) until the daemon has used no CPU for half a second: the
    /// staging, folding and shipping that trail a bulk load are done.
    fn settle(&self) {
        let cpu = || -> u64 {
            fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .ok()
                .and_then(|s| {
                    // Fields after the command name, which is in parentheses.
                    let rest = s.rsplit_once(") ")?.1.to_string();
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
                })
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = cpu();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(500));
            let now = cpu();
            if now == last {
                return;
            }
            last = now;
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// (VmRSS, VmHWM) of the daemon in KiB.
    fn memory(&self) -> Result<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .context("reading the daemon's /proc status")?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("{name} missing from /proc status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGTERM, then wait for a clean exit and the mount to be gone.
    fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                force_unmount(&self.dir);
                bail!("sqlfs did not exit within 60 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        };
        if is_sqlfs_mount(&self.dir) {
            force_unmount(&self.dir);
            bail!(
                "sqlfs exited ({status}) but {} is still mounted",
                self.dir.display()
            );
        }
        if !status.success() {
            bail!(
                "sqlfs exited with {status} after SIGTERM; log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            for _ in 0..250 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if is_sqlfs_mount(&self.dir) {
            force_unmount(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------
// SQLite helpers

fn open(path: &Path, synchronous: &str) -> Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("{}: journal_mode is {mode}, not wal", path.display());
    }
    conn.execute_batch(&format!("PRAGMA synchronous={synchronous};"))?;
    Ok(conn)
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = fs::remove_file(PathBuf::from(p));
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn db_bytes(conn: &Connection) -> Result<u64> {
    let pages: u64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(pages * size)
}

// ---------------------------------------------------------------------------------------
// Workloads

/// Autocommit INSERTs of ~100-byte rows for `secs` seconds; returns tx/s.
fn autocommit(dir: &Path, synchronous: &str, secs: f64) -> Result<f64> {
    let path = dir.join(format!("autocommit-{}.db", synchronous.to_lowercase()));
    remove_db(&path);
    let conn = open(&path, synchronous)?;
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, x BLOB NOT NULL);")?;
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

/// Appends `mb` MB of 1000-byte random rows to table `t` in transactions of `tx_mb` MB.
/// Returns the bytes of row data written and the elapsed time.
fn bulk_load(conn: &Connection, mb: u64, tx_mb: u64, seed: u64) -> Result<(u64, Duration)> {
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
        done += n;
    }
    Ok((done * ROW as u64, start.elapsed()))
}

fn scan_once(conn: &Connection) -> Result<Duration> {
    let start = Instant::now();
    let _sum: i64 = conn.query_row("SELECT sum(length(x)) FROM t", [], |r| r.get(0))?;
    Ok(start.elapsed())
}

/// Bulk load of `scan.db` in `dir`: MB/s.
fn load(dir: &Path, mb: u64) -> Result<f64> {
    let path = dir.join("scan.db");
    remove_db(&path);
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
fn scans(native: &Path, mnt: &Path, rounds: usize) -> Result<(f64, f64)> {
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

/// The median of `v` (not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `f` on the native directory and on the mount, alternating, `rounds` times each, and
/// returns the median result of each side.
fn alternate(
    rounds: usize,
    native: &Path,
    mnt: &Path,
    mut f: impl FnMut(&Path) -> Result<f64>,
) -> Result<(f64, f64)> {
    let mut r = [Vec::new(), Vec::new()];
    let dirs = [native, mnt];
    for round in 0..rounds.max(1) {
        // Each side starts with nothing of the other's left to write back, and neither always
        // goes first.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            r[i].push(f(dirs[i])?);
        }
    }
    let [n, s] = r;
    Ok((median(n), median(s)))
}

/// 4 KiB pwrites cycling over 100 blocks of a plain file for `secs`: the bare cost of one
/// write passing through the mount, for a file capture never looks at. Returns writes/s.
/// Calls/s of a request the kernel hands to the filesystem every time: reading an extended
/// attribute that a plain file does not have. Through the mount this is the bare cost of a
/// round trip between the kernel and sqlfs, the price every fsync pays on top of its own.
fn round_trips(dir: &Path, secs: f64) -> Result<f64> {
    use std::os::unix::ffi::OsStrExt;
    let path = dir.join("roundtrip.bin");
    fs::write(&path, b"x")?;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = c"user.sqlfs-bench-absent";
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            // SAFETY: valid C strings; a null buffer of size 0 asks only for the size.
            let r =
                unsafe { libc::getxattr(c_path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
            if r >= 0 {
                bail!("{}: the attribute exists", path.display());
            }
        }
        n += 100;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    fs::remove_file(&path)?;
    Ok(rate)
}

fn plain_writes(dir: &Path, secs: f64) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("plain.bin");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = vec![7u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for i in 0..100u64 {
            f.write_all_at(&block, i * 4096)?;
        }
        n += 100;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(&path)?;
    Ok(rate)
}

struct Replication {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    per_min_load: f64,
    per_min_idle: f64,
    shipped_ratio: f64,
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
fn replication(cfg: &Config) -> Result<Replication> {
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

/// Point reads / updates by primary key from `threads` connections; returns ops/s.
fn mixed(dir: &Path, threads: usize, read_pct: u64, secs: f64) -> Result<f64> {
    const ROWS: u64 = 100_000;
    let path = dir.join("mixed.db");
    remove_db(&path);
    {
        let conn = open(&path, "NORMAL")?;
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, x BLOB NOT NULL); BEGIN;")?;
        let mut stmt = conn.prepare("INSERT INTO t(id, x) VALUES (?1, ?2)")?;
        let mut rng = Rng::new(3);
        for id in 1..=ROWS {
            stmt.execute(params![id, rng.bytes(100)])?;
        }
        drop(stmt);
        conn.execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE);")?;
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

/// Daemon (VmRSS, VmHWM) in KiB at a database size in bytes (0 = idle after mount).
struct MemoryPoint {
    db_bytes: u64,
    rss: u64,
    hwm: u64,
}

/// Daemon memory on a fresh mount: idle, then as one database grows from small to large
/// in transactions of the same size, so that only the database size changes.
fn memory(cfg: &Config) -> Result<Vec<MemoryPoint>> {
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

// ---------------------------------------------------------------------------------------
// Restore, and replication to the S3-compatible server

/// Bucket on the S3-compatible server.
const BUCKET: &str = "bench";

/// Runs the sqlfs CLI; its stdout, or an error with its output.
fn sqlfs_cli(args: &[&std::ffi::OsStr]) -> Result<String> {
    let o = Command::new(SQLFS)
        .args(args)
        .envs(s3::ENV)
        .stdin(Stdio::null())
        .output()
        .context("running sqlfs")?;
    if !o.status.success() {
        bail!(
            "sqlfs {:?} exited with {}:\n{}{}",
            args,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The newest staged TXID of `db` (`sqlfs log`).
fn last_txid(dir: &Path, db: &str) -> Result<u64> {
    let out = sqlfs_cli(&[
        "log".as_ref(),
        dir.as_os_str(),
        "--db".as_ref(),
        db.as_ref(),
    ])?;
    out.lines()
        .filter_map(|l| l.strip_prefix("txid=")?.split(' ').next()?.parse().ok())
        .max()
        .with_context(|| format!("no staged transactions of {db}"))
}

/// The TXID each replica of a running mount holds `db` up to (`sqlfs status`).
fn replica_positions(mnt: &Path, db: &str) -> Result<Vec<u64>> {
    let o = Command::new(SQLFS)
        .arg("status")
        .arg(mnt)
        .stdin(Stdio::null())
        .output()
        .context("running sqlfs status")?;
    let text = String::from_utf8_lossy(&o.stdout);
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{db}: ")));
    lines.next();
    Ok(lines
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| {
            let t = l.rsplit_once(": TXID ")?.1;
            t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .collect())
}

/// Waits until each of the `n` replicas of a running mount holds `db` up to `txid`.
fn wait_shipped(mnt: &Path, db: &str, txid: u64, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pos = replica_positions(mnt, db)?;
        if pos.len() == n && pos.iter().all(|&p| p >= txid) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("after {timeout:?} the replicas hold {db} up to {pos:?}, not TXID {txid}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `sqlfs restore` of `db` from `url` at `txid` (latest when `None`) into `out`; returns the
/// TXID it restored and how long it took.
fn timed_restore(url: &str, db: &str, out: &Path, txid: Option<u64>) -> Result<(u64, Duration)> {
    let _ = fs::remove_file(out);
    let mut args: Vec<std::ffi::OsString> = vec![
        "restore".into(),
        "--replica".into(),
        url.into(),
        "--db".into(),
        db.into(),
        "-o".into(),
        out.into(),
    ];
    if let Some(t) = txid {
        args.push("--txid".into());
        args.push(t.to_string().into());
    }
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let start = Instant::now();
    let said = sqlfs_cli(&args)?;
    let took = start.elapsed();
    let got = said
        .split("at TXID ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .with_context(|| format!("restore does not say which TXID it restored: {said}"))?;
    Ok((got, took))
}

struct RestoreTiming {
    replica: &'static str,
    what: String,
    bytes: u64,
    secs: f64,
}

struct RestoreRun {
    db_bytes: u64,
    txns: u64,
    /// First and last TXID of the small transactions.
    window: (u64, u64),
    mid: u64,
    load_secs: f64,
    ship_secs: f64,
    timings: Vec<RestoreTiming>,
}

/// Bulk-loads table `t` in 10 MB transactions until the database takes `target` bytes.
fn grow_to(conn: &Connection, target: u64, mut seed: u64) -> Result<()> {
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

/// A database of `restore_mb` MiB and `restore_txns` small transactions after it, built on a
/// mount shipping to a file replica (and the S3-compatible server, when there is one); then,
/// with the mount stopped, `sqlfs restore` of the latest state and of the TXID in the middle
/// of the small transactions, from each replica.
fn restore_bench(cfg: &Config, store: Option<&s3::Server>) -> Result<RestoreRun> {
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

// ---------------------------------------------------------------------------------------
// History views

/// `sqlfs log` of `db` under a running mount: the staging base's TXID (0 without one) and
/// (TXID, commit time in ns) of every staged transaction after it.
fn staged_log(mnt: &Path, db: &str) -> Result<(u64, Vec<(u64, u64)>)> {
    let out = sqlfs_cli(&[
        "log".as_ref(),
        mnt.as_os_str(),
        "--db".as_ref(),
        db.as_ref(),
    ])?;
    let field = |l: &str, name: &str| -> Option<u64> {
        l.split(' ')
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    let mut base = 0;
    let mut txns = Vec::new();
    for l in out.lines() {
        if l.starts_with("base ") {
            base = field(l, "txid=").unwrap_or(0);
        } else if let (Some(t), Some(ts)) = (field(l, "txid="), field(l, "ts=")) {
            txns.push((t, ts));
        }
    }
    Ok((base, txns))
}

/// RFC 3339 name of `ns` in UTC, milliseconds rounded up (as `.history` names its entries,
/// so that the name stands for the state after the transaction committed at `ns`).
fn rfc3339_ms(ns: u64) -> String {
    let ms = ns.div_ceil(1_000_000);
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// A fresh read-only connection.
fn open_ro(path: &Path) -> Result<Connection> {
    use rusqlite::OpenFlags;
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} read-only", path.display()))
}

/// One point query by primary key: the length of the row's payload.
fn point_query(conn: &Connection, id: u64) -> Result<i64> {
    Ok(
        conn.query_row("SELECT length(x) FROM t WHERE id = ?1", params![id], |r| {
            r.get(0)
        })?,
    )
}

/// Opens `path` read-only on a fresh connection and answers one point query: the time of
/// both together, the connection, and the answer.
fn open_and_query(path: &Path, id: u64) -> Result<(Duration, Connection, i64)> {
    let start = Instant::now();
    let conn = open_ro(path)?;
    let v = point_query(&conn, id)?;
    Ok((start.elapsed(), conn, v))
}

/// A point query on an open connection: its time and answer.
fn timed_query(conn: &Connection, id: u64) -> Result<(Duration, i64)> {
    let start = Instant::now();
    let v = point_query(conn, id)?;
    Ok((start.elapsed(), v))
}

/// A full scan of `t` on a fresh read-only connection: its time and the sum it computed.
fn timed_scan(path: &Path) -> Result<(Duration, i64)> {
    let conn = open_ro(path)?;
    let start = Instant::now();
    let sum: i64 = conn.query_row("SELECT sum(length(x)) FROM t", [], |r| r.get(0))?;
    Ok((start.elapsed(), sum))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What the history workload measured, and how its database was built.
struct HistoryRun {
    db_bytes: u64,
    window: (u64, u64),
    mid: u64,
    instant: String,
    load_secs: f64,
    ship_secs: f64,
    restore_secs: f64,
    fold_secs: f64,
    /// Why the view from the replica could not be read, if it could not.
    replica_error: Option<String>,
    rows: Vec<Row>,
}

/// History views of a database of `history_mb` MiB with small transactions after it, built
/// through a mount whose `--stage-limit` keeps every page staged locally, shipped to a file
/// replica. Opens `.history/txid-N/`, `.history/<instant>/` and `.history/latest/` (N in the
/// middle of the small transactions) on fresh read-only connections and answers one point
/// query, then a second one, then scans the table; the same on the copy `sqlfs restore
/// --txid N` writes to local disk. Then remounts with a small `--stage-limit`, waits until
/// staging is folded past N, and opens `.history/txid-N/` again: now from the replica.
fn history_bench(cfg: &Config) -> Result<HistoryRun> {
    const DB: &str = "history.db";
    const TXNS: u64 = 100;
    let mnt = cfg.work.join("history-mnt");
    let backing = cfg.work.join("history-backing");
    let replica = cfg.work.join("history-replica");
    let urls = [format!("file://{}", replica.display())];
    let log = cfg.work.join("history.log");
    let target = cfg.history_mb << 20;
    // Large enough that nothing is folded: every page of every TXID stays staged.
    let stage_limit = (4u64 << 30).max(target * 4);
    let mount = Mount::start_args(
        &mnt,
        &backing,
        &log,
        &urls,
        &["--stage-limit".into(), stage_limit.to_string()],
    )?;
    step(&format!(
        "history: building a {} MiB database, staged locally",
        cfg.history_mb
    ));
    let conn = open(&mnt.join(DB), "NORMAL")?;
    let start = Instant::now();
    grow_to(&conn, target, 40)?;
    let first = last_txid(&mnt, DB)? + 1;
    step(&format!("history: {TXNS} small transactions after it"));
    let rows: u64 = conn.query_row("SELECT max(id) FROM t", [], |r| r.get(0))?;
    let mut rng = Rng::new(11);
    for i in 0..TXNS {
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
    let mid = first + (last - first) / 2;
    let (base, staged) = staged_log(&mnt, DB)?;
    if base >= mid {
        bail!("history: staging was folded past TXID {mid} (base at {base})");
    }
    let mid_ns = staged
        .iter()
        .find(|(t, _)| *t == mid)
        .map(|(_, ns)| *ns)
        .with_context(|| format!("TXID {mid} is not in `sqlfs log`"))?;
    let instant = rfc3339_ms(mid_ns);
    let shipping = Instant::now();
    wait_shipped(&mnt, DB, last, 1, Duration::from_secs(1800))?;
    let ship_secs = shipping.elapsed().as_secs_f64();

    step(&format!(
        "history: sqlfs restore --txid {mid} to local disk"
    ));
    let restored = cfg.work.join("history-restored.db");
    let (got, took) = timed_restore(&urls[0], DB, &restored, Some(mid))?;
    if got != mid {
        bail!("restore restored TXID {got}, not {mid}");
    }
    let restore_secs = took.as_secs_f64();
    let db_bytes = fs::metadata(&restored)?.len();
    let size = format!("{} MB database", fmt_num(db_bytes as f64 / MB, 0));

    // Keys: one for the first query, one far from it for the second.
    let (id1, id2) = (1 + rows / 3, 1 + rows * 2 / 3);
    let view = |name: &str| mnt.join(".history").join(name).join(DB);
    let mut out = Vec::new();

    step("history: open + point query, restored copy and staged views");
    let (n_open, n_conn, n_v1) = open_and_query(&restored, id1)?;
    let (n_q2, n_v2) = timed_query(&n_conn, id2)?;
    drop(n_conn);
    let (s_open, s_conn, s_v1) = open_and_query(&view(&format!("txid-{mid}")), id1)?;
    let (s_q2, s_v2) = timed_query(&s_conn, id2)?;
    drop(s_conn);
    if (s_v1, s_v2) != (n_v1, n_v2) {
        bail!(
            "history view txid-{mid} answers {:?}, the restored copy {:?}",
            (s_v1, s_v2),
            (n_v1, n_v2)
        );
    }
    let (t_open, t_conn, t_v1) = open_and_query(&view(&instant), id1)?;
    drop(t_conn);
    if t_v1 != n_v1 {
        bail!("history view {instant} answers {t_v1}, the restored copy (TXID {mid}) {n_v1}");
    }
    let (l_open, l_conn, _) = open_and_query(&view("latest"), id1)?;
    drop(l_conn);
    out.push(Row::time(
        format!("history view txid-N, staged: open + point query, first access, {size} (ms; goal < 1000)"),
        ms(n_open),
        ms(s_open),
    ));
    out.push(Row::time(
        "history view at an instant (RFC 3339), staged: open + point query, first access (ms)"
            .into(),
        ms(n_open),
        ms(t_open),
    ));
    out.push(Row::time(
        "history view latest, staged: open + point query, first access (ms)".into(),
        ms(n_open),
        ms(l_open),
    ));
    out.push(Row::time(
        "history view txid-N, staged: second point query, same connection (ms)".into(),
        ms(n_q2),
        ms(s_q2),
    ));

    step("history: full scans, restored copy and staged view");
    let mbs = |d: Duration| db_bytes as f64 / MB / d.as_secs_f64();
    let (n_scan1, n_sum) = timed_scan(&restored)?;
    let (n_scan2, _) = timed_scan(&restored)?;
    let (s_scan1, s_sum) = timed_scan(&view(&format!("txid-{mid}")))?;
    let (s_scan2, _) = timed_scan(&view(&format!("txid-{mid}")))?;
    if s_sum != n_sum {
        bail!("a full scan of history view txid-{mid} sums {s_sum}, of the restored copy {n_sum}");
    }
    out.push(Row::pair(
        format!("history view txid-N, staged: full scan, first, {size} (MB/s)"),
        mbs(n_scan1),
        mbs(s_scan1),
        1,
    ));
    out.push(Row::pair(
        "history view txid-N, staged: full scan, second (MB/s)".into(),
        mbs(n_scan2),
        mbs(s_scan2),
        1,
    ));
    mount.stop()?;

    // The same view once staging no longer holds TXID N: from the replica.
    step("history: remounting with a small --stage-limit, waiting for the fold");
    let mount = Mount::start_args(
        &mnt,
        &backing,
        &log.with_extension("2.log"),
        &urls,
        &["--stage-limit".into(), "1k".into()],
    )?;
    // Staging folds only closed segments (8 MiB): commit enough after the window to close
    // the one that holds it.
    {
        let conn = open(&mnt.join(DB), "NORMAL")?;
        bulk_load(&conn, 12, 10, 60)?;
    }
    let folding = Instant::now();
    let deadline = folding + Duration::from_secs(1800);
    loop {
        let (base, _) = staged_log(&mnt, DB)?;
        if base > mid {
            break;
        }
        if Instant::now() > deadline {
            bail!("staging of {DB} was not folded past TXID {mid} (base at {base})");
        }
        thread::sleep(Duration::from_millis(200));
    }
    let fold_secs = folding.elapsed().as_secs_f64();
    step("history: open + point query and full scan, view from the replica");
    let from_replica = (|| -> Result<(Duration, Duration, Duration)> {
        let (r_open, r_conn, r_v1) = open_and_query(&view(&format!("txid-{mid}")), id1)?;
        let (r_q2, r_v2) = timed_query(&r_conn, id2)?;
        drop(r_conn);
        if (r_v1, r_v2) != (n_v1, n_v2) {
            bail!(
                "history view txid-{mid} from the replica answers {:?}, the restored copy {:?}",
                (r_v1, r_v2),
                (n_v1, n_v2)
            );
        }
        let (r_scan, r_sum) = timed_scan(&view(&format!("txid-{mid}")))?;
        if r_sum != n_sum {
            bail!(
                "a full scan of history view txid-{mid} from the replica sums {r_sum}, \
                 of the restored copy {n_sum}"
            );
        }
        Ok((r_open, r_q2, r_scan))
    })();
    let daemon_log = mount.log_tail();
    mount.stop()?;
    let replica_name = format!(
        "history view txid-N, from the file replica (staging folded): open + point query, \
         first access, {size} (ms)"
    );
    let mut replica_error = None;
    match from_replica {
        Ok((r_open, r_q2, r_scan)) => {
            out.push(Row::time(replica_name, ms(n_open), ms(r_open)));
            out.push(Row::time(
                "history view txid-N, from the file replica: second point query, same \
                 connection (ms)"
                    .into(),
                ms(n_q2),
                ms(r_q2),
            ));
            out.push(Row::pair(
                "history view txid-N, from the file replica: full scan, first (MB/s)".into(),
                mbs(n_scan1),
                mbs(r_scan),
                1,
            ));
        }
        Err(e) => {
            // Reported, not fatal: the rows measured so far stand on their own.
            let why = daemon_log
                .lines()
                .rev()
                .find(|l| l.contains("cannot be served"))
                .map(|l| l.split_once("] ").map_or(l, |x| x.1).to_string())
                .unwrap_or_else(|| format!("{e:#}"));
            step(&format!("history: the view from the replica failed: {why}"));
            out.push(Row {
                name: replica_name,
                native: fmt_num(ms(n_open), 2),
                sqlfs: "fails".into(),
                ratio: "–".into(),
            });
            replica_error = Some(why);
        }
    }
    if !cfg.keep {
        for d in [&backing, &replica] {
            let _ = fs::remove_dir_all(d);
        }
        let _ = fs::remove_file(&restored);
    }
    Ok(HistoryRun {
        db_bytes,
        window: (first, last),
        mid,
        instant,
        load_secs,
        ship_secs,
        restore_secs,
        fold_secs,
        replica_error,
        rows: out,
    })
}

struct S3Replication {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    per_min_load: f64,
    per_min_idle: f64,
    by_method: String,
    load_secs: f64,
    idle_secs: f64,
    objects: usize,
}

/// Steady commits to a mount shipping to the S3-compatible server through the counting
/// proxy: how long each transaction takes to be readable there (from its commit time in the
/// object header to the moment the server completed the PUT of its object), and requests per
/// minute under load and idle.
fn s3_replication(cfg: &Config, srv: &s3::Server) -> Result<S3Replication> {
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
        if r.method != "PUT" || r.status != 200 || !key.ends_with(".seg") {
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

// ---------------------------------------------------------------------------------------
// Report

struct Row {
    name: String,
    native: String,
    sqlfs: String,
    ratio: String,
}

impl Row {
    /// A throughput row: both sides measured, ratio = sqlfs / native.
    fn pair(name: String, native: f64, sqlfs: f64, digits: usize) -> Row {
        Row {
            name,
            native: fmt_num(native, digits),
            sqlfs: fmt_num(sqlfs, digits),
            ratio: if native > 0.0 {
                format!("{:.2}", sqlfs / native)
            } else {
                "–".into()
            },
        }
    }
}

impl Row {
    /// A latency row (ms): both sides measured, ratio = native / sqlfs, so that higher is
    /// still better.
    fn time(name: String, native_ms: f64, sqlfs_ms: f64) -> Row {
        Row {
            name,
            native: fmt_num(native_ms, 2),
            sqlfs: fmt_num(sqlfs_ms, 2),
            ratio: if sqlfs_ms > 0.0 {
                format!("{:.2}", native_ms / sqlfs_ms)
            } else {
                "–".into()
            },
        }
    }

    /// A row measured on sqlfs only.
    fn text(name: &str, sqlfs: String) -> Row {
        Row {
            name: name.to_string(),
            native: "–".into(),
            sqlfs,
            ratio: "–".into(),
        }
    }
}

fn fmt_num(v: f64, digits: usize) -> String {
    let s = format!("{v:.digits$}");
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_string(), Some(f.to_string())),
        None => (s.clone(), None),
    };
    let (sign, int) = match int.strip_prefix('-') {
        Some(i) => ("-", i),
        None => ("", int.as_str()),
    };
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| workload | native | sqlfs | ratio |\n| --- | ---: | ---: | ---: |\n");
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {} |\n",
            r.name, r.native, r.sqlfs, r.ratio
        );
    }
    out
}

fn step(what: &str) {
    eprintln!("[bench] {what}");
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let cfg = Config::from_env()?;
    let started = Instant::now();

    // A crashed earlier run may have left a mount behind.
    for (p, _, _) in mounts() {
        if p.starts_with(&cfg.work) {
            force_unmount(&p);
        }
    }
    if cfg.work.exists() {
        fs::remove_dir_all(&cfg.work)
            .with_context(|| format!("removing {}", cfg.work.display()))?;
    }
    let native = cfg.work.join("native");
    let mnt = cfg.work.join("mnt");
    fs::create_dir_all(&native)?;
    let fstype = fstype_of(&native);
    if fstype == "tmpfs" || fstype == "ramfs" {
        eprintln!(
            "[bench] warning: {} is on {fstype}; set SQLFS_BENCH_DIR to a directory on disk",
            cfg.work.display()
        );
    }

    let secs = cfg.secs;
    let mut rows = Vec::new();
    // The S3-compatible server, when a workload needs it: started first, so that a missing
    // one is reported before anything else runs.
    let store = if cfg.runs("s3") || (cfg.runs("restore") && cfg.s3) {
        step("starting the S3-compatible test server");
        Some(s3::Server::start(BUCKET)?)
    } else {
        None
    };
    let side_by_side = ["autocommit", "scan", "plain", "roundtrip", "mixed"];
    let mount = if side_by_side.iter().any(|w| cfg.runs(w)) {
        Some(Mount::start(
            &mnt,
            &cfg.work.join("backing"),
            &cfg.work.join("sqlfs.log"),
        )?)
    } else {
        None
    };

    if cfg.runs("autocommit") {
        for sync in ["NORMAL", "FULL"] {
            step(&format!(
                "autocommit INSERT, synchronous={sync}, {secs} s each"
            ));
            let (n, s) = alternate(cfg.rounds, &native, &mnt, |d| autocommit(d, sync, secs))?;
            rows.push(Row::pair(
                format!("autocommit INSERT, synchronous={sync} (tx/s)"),
                n,
                s,
                0,
            ));
        }
    }

    if cfg.runs("scan") {
        step(&format!(
            "bulk load and full scan of a {} MB table",
            cfg.scan_mb
        ));
        let n_load = load(&native, cfg.scan_mb)?;
        let s_load = load(&mnt, cfg.scan_mb)?;
        // The scans measure reads: the mount's trailing work on the load is let finish.
        if let Some(m) = &mount {
            m.settle();
        }
        let (n_scan, s_scan) = scans(&native, &mnt, cfg.rounds)?;
        rows.push(Row::pair(
            format!("bulk load, {} MB in 10 MB transactions (MB/s)", cfg.scan_mb),
            n_load,
            s_load,
            1,
        ));
        rows.push(Row::pair(
            format!("full scan, warm, {} MB table (MB/s)", cfg.scan_mb),
            n_scan,
            s_scan,
            1,
        ));
    }

    if cfg.runs("plain") {
        step("4 KiB pwrite to a plain (non-database) file");
        let (n, s) = alternate(cfg.rounds, &native, &mnt, |d| plain_writes(d, secs))?;
        rows.push(Row::pair(
            "4 KiB pwrite to a plain file, one at a time (writes/s)".to_string(),
            n,
            s,
            0,
        ));
    }

    if cfg.runs("roundtrip") {
        step("extended-attribute lookups, a round trip to the filesystem each");
        let (n, s) = alternate(cfg.rounds, &native, &mnt, |d| round_trips(d, secs.min(1.0)))?;
        rows.push(Row::pair(
            "getxattr of a missing attribute, one at a time (calls/s)".to_string(),
            n,
            s,
            0,
        ));
    }

    // SAFETY: geteuid has no preconditions.
    if cfg.runs("floor") && unsafe { libc::geteuid() } != 0 {
        println!("[bench] the FUSE floor needs root (kernel passthrough); left out");
    } else if cfg.runs("floor") {
        step("commit-like fsync loop through a bare passthrough FUSE server");
        let floor = floor::Floor::mount(&cfg.work.join("floor"), &cfg.work.join("floor.backing"))?;
        let res = alternate(cfg.rounds, &native.join("floor.bin"), floor.file(), |p| {
            floor::fsync_loop(p, secs)
        });
        floor.stop()?;
        let (n, s) = res?;
        rows.push(Row::pair(
            "the floor under FULL: 24 B + 4 KiB write and fdatasync, native vs. a bare passthrough FUSE server that captures nothing (commits/s)".to_string(),
            n,
            s,
            0,
        ));
    }

    if cfg.runs("mixed") {
        let (threads, pct) = (cfg.threads, cfg.read_pct);
        step(&format!(
            "mixed {pct}% reads / {}% updates, {threads} connections, {secs} s each",
            100 - pct
        ));
        let (n, s) = alternate(cfg.rounds, &native, &mnt, |d| mixed(d, threads, pct, secs))?;
        rows.push(Row::pair(
            format!(
                "mixed {pct}% point reads / {}% updates, {threads} connections (ops/s)",
                100 - pct
            ),
            n,
            s,
            0,
        ));
    }
    if let Some(m) = mount {
        m.stop()?;
    }

    if cfg.runs("replication") {
        step("replication to a file replica, 50 commits/s");
        let rep = replication(&cfg)?;
        rows.push(Row::text(
            "commit → replica object, p50 / p99 / max (ms), 1 s sync interval",
            format!("{:.0} / {:.0} / {:.0}", rep.p50_ms, rep.p99_ms, rep.max_ms),
        ));
        rows.push(Row::text(
            "replica objects written per minute: under load / idle",
            format!("{:.0} / {:.0}", rep.per_min_load, rep.per_min_idle),
        ));
        rows.push(Row::text(
            "bytes shipped / bytes staged (zstd, 100-byte text rows)",
            format!("{:.2}", rep.shipped_ratio),
        ));
    }

    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut mem_note = String::new();
    if cfg.runs("memory") {
        step("daemon memory on a fresh mount");
        let mem = memory(&cfg)?;
        for p in &mem {
            let at = if p.db_bytes == 0 {
                "idle after mount".to_string()
            } else {
                format!("{:.0} MB database", p.db_bytes as f64 / MB)
            };
            rows.push(Row::text(
                &format!("daemon VmRSS / VmHWM, {at} (MiB)"),
                format!("{:.1} / {:.1}", mib(p.rss), mib(p.hwm)),
            ));
        }
        let (first, last) = (&mem[1.min(mem.len() - 1)], &mem[mem.len() - 1]);
        mem_note = format!(
            " Daemon peak memory (VmHWM): {:.1} MiB with a {:.0} MB database, {:.1} MiB at {:.0} MB.",
            mib(first.hwm),
            first.db_bytes as f64 / MB,
            mib(last.hwm),
            last.db_bytes as f64 / MB,
        );
    }

    let mut notes = Vec::new();
    if cfg.runs("restore") {
        let r = restore_bench(&cfg, store.as_ref())?;
        for t in &r.timings {
            rows.push(Row::text(
                &format!(
                    "restore from the {} replica, {}, {} MB database (MB/s, time)",
                    t.replica,
                    t.what,
                    fmt_num(t.bytes as f64 / MB, 0)
                ),
                format!("{:.1} ({:.1} s)", t.bytes as f64 / MB / t.secs, t.secs),
            ));
        }
        notes.push(format!(
            "Restore: a database of {:.0} MB built through a mount in 10 MB transactions, then \
             {} small transactions (TXIDs {}..={}, mid-window {}). Loading it took \
             {:.0} s, shipping it to every replica {:.0} s more. The file replica is on the same \
             disk, read warm from the page cache; the S3-compatible server runs on loopback.",
            r.db_bytes as f64 / MB,
            r.txns,
            r.window.0,
            r.window.1,
            r.mid,
            r.load_secs,
            r.ship_secs,
        ));
    }

    if cfg.runs("history") {
        let h = history_bench(&cfg)?;
        rows.extend(h.rows);
        notes.push(format!(
            "History views: a database of {:.0} MB built through a mount in 10 MB \
             transactions with --stage-limit large enough that nothing is folded, then 100 small \
             transactions (TXIDs {}..={}); N = {} (mid-window), the instant {}. Loading took \
             {:.0} s, shipping it to the file replica {:.0} s more. In these rows the native \
             column is the copy `sqlfs restore --txid N` wrote to local disk ({:.1} s), opened \
             read-only like the view; the `latest` and instant rows compare with the same copy. \
             \"First access\" is the first lookup of that view name on the mount (resolution \
             included) on a fresh connection; the pages are in the kernel's page cache on both \
             sides. For times (ms) the ratio is native / sqlfs, so higher is still better. The \
             replica rows are on a remount with --stage-limit 1k, after 12 MB more \
             in two transactions and the fold of staging past N ({:.0} s); the view then reads the replica's objects.",
            h.db_bytes as f64 / MB,
            h.window.0,
            h.window.1,
            h.mid,
            h.instant,
            h.load_secs,
            h.ship_secs,
            h.restore_secs,
            h.fold_secs,
        ));
        if let Some(e) = &h.replica_error {
            notes.push(format!(
                "History view from the replica: not served; the daemon says: {e}"
            ));
        }
    }

    if cfg.runs("s3") {
        let srv = store.as_ref().expect("the server was started");
        step("replication to the S3-compatible server through a counting proxy, 50 commits/s");
        let rep = s3_replication(&cfg, srv)?;
        rows.push(Row::text(
            "commit → S3 object readable, p50 / p99 / max (ms), 1 s sync interval",
            format!("{:.0} / {:.0} / {:.0}", rep.p50_ms, rep.p99_ms, rep.max_ms),
        ));
        rows.push(Row::text(
            "S3 requests per minute: under load / idle",
            format!("{:.0} / {:.0}", rep.per_min_load, rep.per_min_idle),
        ));
        rows.push(Row::text(
            "S3 requests under load, by method",
            rep.by_method.clone(),
        ));
        notes.push(format!(
            "S3: requests counted by a proxy in front of the S3-compatible server, {:.0} s of \
             writes at 50 commits/s, then {:.0} s idle; {} segment objects.",
            rep.load_secs, rep.idle_secs, rep.objects
        ));
    }

    let header = format!(
        "sqlfs benchmark, {} UTC: {} cores, Linux {}, SQLite {}, work dir on {fstype}; \
         {secs} s per timed workload; side-by-side rows are medians of {} alternating rounds.\n",
        command_output("date", &["-u", "+%Y-%m-%d %H:%M"]),
        thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        rusqlite::version(),
        cfg.rounds,
    );
    let mut footer = format!("\nratio = sqlfs / native (higher is better).{mem_note}\n");
    for n in &notes {
        footer += &format!("\n{n}\n");
    }
    let report = format!("{header}\n{}{footer}", table(&rows));
    println!("\n{report}");
    if let Some(dir) = cfg.results.parent() {
        fs::create_dir_all(dir)?;
    }
    File::create(&cfg.results)?.write_all(report.as_bytes())?;
    eprintln!(
        "[bench] wrote {} ({:.0} s in all)",
        cfg.results.display(),
        started.elapsed().as_secs_f64()
    );

    if !cfg.keep {
        fs::remove_dir_all(&cfg.work)
            .with_context(|| format!("removing {}", cfg.work.display()))?;
    }
    Ok(())
}
