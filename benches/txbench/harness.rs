//! The harness every workload shares; it measures no row itself. The settings read from the
//! environment ([`Config`], `SQLFS_BENCH_*`), a small deterministic PRNG for row contents and
//! keys, SQLite helpers, and [`alternate`], which runs a side-by-side workload on the native
//! directory and on the mount for several rounds, the side that goes first swapping every
//! round, each run after a sync(2), and keeps each side's median.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rusqlite::{Connection, ErrorCode};

pub const SQLFS: &str = env!("CARGO_BIN_EXE_sqlfs");
pub const MB: f64 = 1_000_000.0;

/// Bucket on the S3-compatible server.
pub const BUCKET: &str = "bench";

// ---------------------------------------------------------------------------------------
// Configuration

pub struct Config {
    pub secs: f64,
    pub rounds: usize,
    pub scan_mb: u64,
    pub small_mb: u64,
    pub big_mb: u64,
    pub vacuum_mb: u64,
    pub threads: usize,
    pub read_pct: u64,
    pub restore_mb: u64,
    pub restore_txns: u64,
    pub history_mb: u64,
    /// Databases of the many-databases workload that commit once a second each.
    pub many: usize,
    /// Databases of its memory and mount-time part (0 skips it).
    pub many_big: usize,
    pub many_idle_secs: f64,
    pub s3: bool,
    pub only: Option<Vec<String>>,
    pub work: PathBuf,
    pub results: PathBuf,
    pub keep: bool,
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
    pub fn from_env() -> Result<Config> {
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
            vacuum_mb: env_num("SQLFS_BENCH_VACUUM_MB", 100)?,
            threads: env_num("SQLFS_BENCH_THREADS", 4)?,
            read_pct: env_num("SQLFS_BENCH_READS", 80)?,
            restore_mb: env_num("SQLFS_BENCH_RESTORE_MB", 1024)?,
            restore_txns: env_num("SQLFS_BENCH_RESTORE_TXNS", 300)?,
            history_mb: env_num("SQLFS_BENCH_HISTORY_MB", 1024)?,
            many: env_num("SQLFS_BENCH_MANY", 200)?,
            many_big: env_num("SQLFS_BENCH_MANY_BIG", 1000)?,
            many_idle_secs: env_num("SQLFS_BENCH_MANY_IDLE_SECS", 20.0)?,
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
        const KNOWN: [&str; 17] = [
            "autocommit",
            "scan",
            "vacuum",
            "plain",
            "roundtrip",
            "floor",
            "cached",
            "mixed",
            "straight",
            "replication",
            "memory",
            "restore",
            "s3",
            "history",
            "many",
            "backends",
            "compare",
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
    pub fn runs(&self, name: &str) -> bool {
        let wanted = self
            .only
            .as_ref()
            .is_none_or(|o| o.iter().any(|w| w == name));
        match name {
            "restore" => wanted && self.restore_mb > 0,
            "history" => wanted && self.history_mb > 0,
            "vacuum" => wanted && self.vacuum_mb > 0,
            "s3" => wanted && self.s3,
            "many" => wanted && self.s3 && self.many > 0,
            _ => wanted,
        }
    }

    pub fn small_mb(&self) -> u64 {
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

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

// ---------------------------------------------------------------------------------------
// SQLite helpers

pub fn open(path: &Path, synchronous: &str) -> Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("{}: journal_mode is {mode}, not wal", path.display());
    }
    conn.execute_batch(&format!("PRAGMA synchronous={synchronous};"))?;
    Ok(conn)
}

pub fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = fs::remove_file(PathBuf::from(p));
    }
}

pub fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

pub fn db_bytes(conn: &Connection) -> Result<u64> {
    let pages: u64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(pages * size)
}

// ---------------------------------------------------------------------------------------
// Side by side

/// The median of `v` (not empty).
pub fn median(mut v: Vec<f64>) -> f64 {
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
pub fn alternate(
    rounds: usize,
    native: &Path,
    mnt: &Path,
    f: impl FnMut(&Path) -> Result<f64>,
) -> Result<(f64, f64)> {
    let m = alternate_all(rounds, &[native, mnt], f)?;
    Ok((m[0], m[1]))
}

/// `f` on each of `dirs` once a round for `rounds` rounds, the side that goes first moving on
/// every round; each side's median, in the order of `dirs`.
pub fn alternate_all(
    rounds: usize,
    dirs: &[&Path],
    mut f: impl FnMut(&Path) -> Result<f64>,
) -> Result<Vec<f64>> {
    let n = dirs.len();
    let mut r = vec![Vec::new(); n];
    for round in 0..rounds.max(1) {
        // Each side starts with nothing of the others' left to write back, and none always
        // goes first.
        for k in 0..n {
            let i = (round + k) % n;
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            r[i].push(f(dirs[i])?);
        }
    }
    Ok(r.into_iter().map(median).collect())
}

// ---------------------------------------------------------------------------------------
// Progress

pub fn step(what: &str) {
    eprintln!("[bench] {what}");
}
