//! sqlfs: a filesystem under SQLite apps that captures every committed transaction.
//!
//! Pipeline (see docs/ARCHITECTURE.md): `fs` (kernel requests) → `capture` (WAL/journal →
//! transactions) → `stage` (local durable log); `inspect` reads the stream back.

mod backing;
mod capture;
mod control;
mod crypt;
mod fs;
mod inspect;
mod mount;
mod replica;
mod restore;
mod segment;
mod ship;
mod sqlite;
mod stage;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::backing::Backing;
use crate::inspect::Source;

#[derive(Parser)]
#[command(
    name = "sqlfs",
    version,
    about = "Capture every committed SQLite transaction at the filesystem layer",
    after_help = "Examples:\n  sqlfs mount /data                      # serve /data in place\n  sqlfs mount /data --data-dir /srv/db   # files live in /srv/db\n  sqlfs verify /data                     # replay the stream, compare with the files\n  sqlfs log /data --db app.db            # list staged transactions\n  sqlfs replay /data --db app.db --txid 42 -o /tmp/app-42.db\n\nLog verbosity: RUST_LOG=debug|info|warn (default info)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount DIR (in place unless --data-dir) and capture every SQLite transaction under it.
    /// Runs in the foreground; SIGINT/SIGTERM flush staging and unmount.
    #[command(
        after_help = "Examples:\n  sqlfs mount /data\n  sqlfs mount /data --data-dir /var/lib/app --threads 4"
    )]
    Mount {
        /// Directory to mount over.
        dir: PathBuf,
        /// Keep the files here instead of in DIR itself.
        #[arg(long, value_name = "BACKING")]
        data_dir: Option<PathBuf>,
        /// Kernel request threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Fold staged transactions into a local base once a database's log exceeds this many
        /// bytes (suffixes k, M, G).
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        stage_limit: u64,
        /// Ship every database to this replica (repeatable): file:///path. Default: a
        /// directory under the user's data directory (~/.local/share/sqlfs/replica).
        #[arg(long = "replica", value_name = "URL")]
        replicas: Vec<String>,
        /// How often new transactions are shipped (e.g. 1s, 500ms).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        sync_interval: std::time::Duration,
        /// Encrypt every replica object to this age recipient (age1…; repeatable).
        #[arg(long = "age-recipient", value_name = "RECIPIENT")]
        age_recipients: Vec<String>,
        /// The app's fsync of a database returns only when its transactions are on every
        /// replica (zero loss on machine failure; use with PRAGMA synchronous=FULL).
        #[arg(long)]
        sync: bool,
    },
    /// Rebuild a database from a replica alone, as of its latest (or a given) transaction.
    #[command(
        after_help = "Examples:\n  sqlfs restore --replica file:///backup --db app.db -o /tmp/app.db\n  sqlfs restore --replica file:///backup --db tenants/42.db --txid 1200 -o 42.db"
    )]
    Restore {
        #[arg(long, value_name = "URL")]
        replica: String,
        /// The database's path relative to the mount root.
        #[arg(long)]
        db: String,
        #[arg(short, long)]
        output: PathBuf,
        /// Restore the state right after this transaction (default: the latest).
        #[arg(long)]
        txid: Option<u64>,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
        /// age identity file to decrypt an encrypted replica.
        #[arg(long, value_name = "FILE")]
        age_identity: Option<PathBuf>,
    },
    /// Create an age key pair for encrypted replicas: the identity goes to FILE (keep it safe,
    /// off this machine), the recipient to pass to `mount --age-recipient` is printed.
    #[command(
        after_help = "Example:\n  sqlfs keygen -o /secure/sqlfs.key\n  sqlfs mount /data --replica file:///backup --age-recipient age1...\n  sqlfs restore --replica file:///backup --db app.db --age-identity /secure/sqlfs.key -o app.db"
    )]
    Keygen {
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Replay each database's staged stream and compare it with its files (exit 1 on mismatch).
    /// DIR is a running mount or an unmounted data directory. Run it while writers are idle.
    Verify {
        dir: PathBuf,
        /// Only this database (path relative to the mount root).
        #[arg(long)]
        db: Option<String>,
    },
    /// Show a running mount's databases and replicas: positions, lag, errors (exit 1 if a
    /// replica is failing or fenced).
    Status { dir: PathBuf },
    /// List the staged transactions of one database.
    Log {
        dir: PathBuf,
        #[arg(long)]
        db: String,
    },
    /// Write a database as of a staged TXID to a file.
    Replay {
        dir: PathBuf,
        #[arg(long)]
        db: String,
        #[arg(long)]
        txid: u64,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("not a duration: {s} (examples: 1s, 500ms, 2m)");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(bad)?;
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n * 60),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(bad());
    }
    Ok(d)
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("not a size: {s} (examples: 512k, 64M, 1G)"))
}

/// Runs an inspect request against a live mount at `dir`, or offline on its data directory.
fn inspect(
    dir: &Path,
    words: &[&str],
    offline: impl FnOnce(&Backing) -> Result<(String, i32)>,
) -> Result<i32> {
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("{} does not exist", dir.display()))?;
    if mount::is_sqlfs_mount(&dir) {
        match control::request(&dir, words)? {
            Some((text, code)) => {
                print!("{text}");
                return Ok(code);
            }
            None => anyhow::bail!(
                "{} is mounted by sqlfs but its control socket does not answer",
                dir.display()
            ),
        }
    }
    let b = Backing::open(&dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let (text, code) = offline(&b)?;
    print!("{text}");
    Ok(code)
}

fn run() -> Result<i32> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Mount {
            dir,
            data_dir,
            threads,
            stage_limit,
            replicas,
            sync_interval,
            age_recipients,
            sync,
        } => {
            mount::run(mount::MountOpts {
                dir,
                data_dir,
                threads,
                stage_limit,
                replicas,
                sync_interval,
                age_recipients,
                sync,
            })?;
            Ok(0)
        }
        Cmd::Restore {
            replica,
            db,
            output,
            txid,
            force,
            age_identity,
        } => {
            print!(
                "{}",
                restore::run(&restore::RestoreOpts {
                    replica,
                    db,
                    output,
                    txid,
                    force,
                    age_identity,
                })?
            );
            Ok(0)
        }
        Cmd::Status { dir } => inspect(&dir, &["status"], |_| {
            anyhow::bail!("{} is not a running sqlfs mount", dir.display())
        }),
        Cmd::Keygen { output } => {
            println!("{}", crypt::keygen(&output)?);
            Ok(0)
        }
        Cmd::Verify { dir, db } => {
            let d = db.clone().unwrap_or_else(|| "-".into());
            inspect(&dir, &["verify", &d], |b| {
                let (t, ok) = inspect::verify(b, &Source::Offline, db.as_deref())?;
                Ok((t, if ok { 0 } else { 1 }))
            })
        }
        Cmd::Log { dir, db } => inspect(&dir, &["log", &db], |b| {
            Ok((inspect::log(b, &Source::Offline, &db)?, 0))
        }),
        Cmd::Replay {
            dir,
            db,
            txid,
            output,
        } => {
            let out = std::path::absolute(&output)?;
            let t = txid.to_string();
            inspect(
                &dir,
                &[
                    "replay",
                    &db,
                    &t,
                    out.to_str().context("output path is not UTF-8")?,
                ],
                |b| Ok((inspect::replay(b, &Source::Offline, &db, txid, &out)?, 0)),
            )
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match run() {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("sqlfs: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
