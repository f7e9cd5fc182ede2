//! The `sqlfs` command line: parses arguments and calls into the library (`src/lib.rs`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use sqlfs::backing::Backing;
use sqlfs::inspect::Source;
use sqlfs::{catalog, config, control, crypt, inspect, list, mount, owner, restore, restore_all};

#[derive(Parser)]
#[command(
    name = "sqlfs",
    version,
    about = "Capture every committed SQLite transaction at the filesystem layer",
    after_help = "Examples:\n  sqlfs mount /data                      # serve /data in place\n  sqlfs mount /data --data-dir /srv/db   # files live in /srv/db\n  sqlfs verify /data                     # replay the stream, compare with the files\n  sqlfs log /data --db app.db            # list staged transactions\n  sqlfs replay /data --db app.db --txid 42 -o /tmp/app-42.db\n  sqlfs list --replica file:///backup       # databases and restore windows\n  sqlfs restore --replica file:///backup --db app.db --timestamp 2026-11-25T10:00:00Z -o app.db\n  sqlfs restore --all --replica file:///backup -o /srv/restored   # every database\n\nLog verbosity: RUST_LOG=debug|info|warn (default info)."
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
        after_help = "Examples:\n  sqlfs mount /data                                  # embedded local replica\n  sqlfs mount /data --replica s3://bkt/prod?region=eu-west-1\n  sqlfs mount /data --replica file:///mnt/nfs/backup --age-recipient age1...\n  sqlfs mount /data --replica s3://bkt/prod --sync --retention 72h\n  sqlfs mount /data --replica 'sftp://sqlfs@backup.lan/srv/sqlfs?identity-file=/etc/sqlfs/id_ed25519'\n  sqlfs mount /data --replica gs://bkt/prod --replica 'az://backups/prod?account=acme'\n  sqlfs mount --config /etc/sqlfs.yml --restore-if-missing --metrics-addr 127.0.0.1:9090\n  sqlfs mount /data --exclude 'cache/**' --exclude '**/*-scratch.db'"
    )]
    Mount {
        /// YAML configuration file (example: contrib/sqlfs.yml); flags override its top level,
        /// its per-replica and per-database settings override flags.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: mount::CliMount,
    },
    /// Rebuild a database from a replica alone, as of its latest transaction, a TXID or an
    /// instant. Verified (checksums after every step, integrity_check) before it appears.
    /// With --all, every database of the replica, into a directory tree.
    #[command(
        after_help = "Examples:\n  sqlfs restore --replica file:///backup --db app.db -o /tmp/app.db\n  sqlfs restore --replica file:///backup --db app.db --timestamp 2026-11-25T10:00:00Z -o app.db\n  sqlfs restore --replica s3://bkt/prod --db tenants/42.db --txid 1200 -o 42.db --dry-run\n  sqlfs restore --config /etc/sqlfs.yml /data/app.db -o /tmp/app.db --json\n  sqlfs restore --all --replica s3://bkt/prod -o /srv/restored                    # every database, latest\n  sqlfs restore --all --replica file:///backup -o /srv/r --timestamp 2026-11-25T10:00:00Z --jobs 8"
    )]
    Restore {
        /// With --config: the database as a path under the configured mount (/data/app.db).
        path: Option<PathBuf>,
        #[arg(long, value_name = "URL")]
        replica: Option<String>,
        /// The database's path relative to the mount root (app.db, tenants/42.db).
        #[arg(long, conflicts_with = "all")]
        db: Option<String>,
        /// The output file (with --all: the directory the databases are restored into, each
        /// at its path under the mount root).
        #[arg(short, long)]
        output: PathBuf,
        /// Every database of the replica, to the same instant (the latest, or --timestamp),
        /// several at once (--jobs); a summary names each that failed, and why (exit 1).
        #[arg(long, conflicts_with_all = ["txid", "path", "dry_run"])]
        all: bool,
        /// With --all: databases restored at once.
        #[arg(long, default_value_t = 4, value_name = "N")]
        jobs: usize,
        /// Restore the state right after this transaction (default: the latest).
        #[arg(long, conflicts_with = "timestamp")]
        txid: Option<u64>,
        /// Restore the state after the last transaction committed at or before this RFC 3339
        /// instant (2026-11-25T10:00:00Z; fractions and offsets allowed).
        #[arg(long, value_name = "T")]
        timestamp: Option<String>,
        /// Take the replica (the first one, or the one --replica names) and its keys from
        /// this configuration file; a replica's own keys there win over the flags.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
        /// Do nothing (exit 0) if OUTPUT exists.
        #[arg(long, conflicts_with = "force")]
        if_not_exists: bool,
        /// age identity file to decrypt an encrypted replica.
        #[arg(long, value_name = "FILE")]
        age_identity: Option<PathBuf>,
        /// Decrypt with the passphrase in this environment variable.
        #[arg(long, value_name = "VAR")]
        passphrase_env: Option<String>,
        /// Objects downloaded at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Print the plan (objects, sizes, TXIDs) and stop.
        #[arg(long)]
        dry_run: bool,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the databases in a replica with their restore windows, snapshots and objects.
    #[command(
        after_help = "Examples:\n  sqlfs list --replica file:///backup\n  sqlfs list --replica file:///backup --all        # every database in full\n  sqlfs list --replica s3://bkt/prod?endpoint=http://127.0.0.1:9000 --db app.db --json\n  sqlfs list --replica 'gs://bkt/prod?endpoint=http://127.0.0.1:4443&anonymous=true'"
    )]
    List {
        #[arg(long, value_name = "URL")]
        replica: Option<String>,
        /// Only this database.
        #[arg(long)]
        db: Option<String>,
        /// Take the replica (the first one, or the one --replica names) and its keys from
        /// this configuration file; a replica's own keys there win over the flags.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// age identity file, to read an encrypted replica's times.
        #[arg(long, value_name = "FILE")]
        age_identity: Option<PathBuf>,
        /// Passphrase environment variable, to read an encrypted replica's times.
        #[arg(long, value_name = "VAR")]
        passphrase_env: Option<String>,
        #[arg(long)]
        json: bool,
        /// Every database in full, however many (by default, above 20 databases the text is
        /// a summary: counts, and the databases that are unreadable or have gaps).
        #[arg(long, short = 'v')]
        all: bool,
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
    /// Show a running mount's databases and replicas: positions, lag, errors, and the scan
    /// for databases at mount (exit 1 if a replica is failing or fenced). Above 20 databases
    /// the text is a summary (counts, the worst lag, every unwell database).
    #[command(
        after_help = "Examples:\n  sqlfs status /data\n  sqlfs status /data --all     # every database in full\n  sqlfs status /data --json    # everything, for scripts"
    )]
    Status {
        dir: PathBuf,
        /// Every database in full, however many.
        #[arg(long, short = 'v')]
        all: bool,
        /// Everything as JSON.
        #[arg(long, conflicts_with = "all")]
        json: bool,
    },
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
    // A data directory a mount serves from elsewhere (`--data-dir`) is asked through that
    // mount; otherwise the shared lock keeps a mount from starting while it is read.
    let _shared = match owner::for_offline(&dir)? {
        owner::Offline::Free(lock) => lock,
        owner::Offline::Mounted { mountpoint, holder } => {
            return match control::request(&mountpoint, words)? {
                Some((text, code)) => {
                    print!("{text}");
                    Ok(code)
                }
                None => anyhow::bail!(
                    "{} is served by sqlfs {holder}, whose control socket does not answer",
                    dir.display()
                ),
            };
        }
    };
    let b = Backing::open(&dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let (text, code) = offline(&b)?;
    print!("{text}");
    Ok(code)
}

/// Where restore and list read from: flags, or the configuration file's first replica; with
/// the keys of that replica (its own entry's, else the top level's with the flags over it).
struct ReplicaSource {
    replica: String,
    age_identity: Option<PathBuf>,
    passphrase: Option<String>,
    /// The configured mount directory, to turn a path under it into a database name.
    mount_dir: Option<PathBuf>,
}

impl ReplicaSource {
    fn resolve(
        config: Option<&Path>,
        replica: Option<String>,
        age_identity: Option<PathBuf>,
        passphrase_env: Option<String>,
    ) -> Result<ReplicaSource> {
        let conf = match config {
            Some(f) => config::Config::load(f)?,
            None => config::Config::default(),
        };
        let replica = match replica.or_else(|| conf.replicas.first().map(|r| r.url.clone())) {
            Some(r) => r,
            None if config.is_some() => {
                anyhow::bail!("the configuration names no replica; pass --replica URL")
            }
            None => anyhow::bail!("which replica? pass --replica URL (or --config FILE)"),
        };
        let flagged = age_identity.is_some() || passphrase_env.is_some();
        let mut base = conf.keys();
        if age_identity.is_some() {
            base.age_identity = age_identity;
        }
        if passphrase_env.is_some() {
            base.passphrase_env = passphrase_env;
        }
        // A replica the configuration lists (the first, or the one --replica names) is read
        // with its own key if it has one.
        let key = match conf.replica(&replica) {
            Some((i, r)) => {
                let own = r.keys();
                if flagged && (own.age_identity.is_some() || own.passphrase_env.is_some()) {
                    log::warn!(
                        "{}: reading it with its own key from the configuration, not the one given on the command line",
                        r.describe(i)
                    );
                }
                config::resolve_read(&base, Some(&own)).with_context(|| r.describe(i))?
            }
            None => config::resolve_read(&base, None)?,
        };
        Ok(ReplicaSource {
            replica,
            age_identity: key.identity,
            passphrase: key.passphrase,
            mount_dir: conf.dir,
        })
    }

    /// `/data/tenants/42.db` → `tenants/42.db` for a configured mount at `/data`.
    fn db_name(&self, p: &Path) -> Result<String> {
        let Some(dir) = &self.mount_dir else {
            anyhow::bail!("a database path needs --config with `dir:` (the mount directory); or pass --db NAME")
        };
        let rel = p.strip_prefix(dir).with_context(|| {
            format!(
                "{} is not under the configured mount {}",
                p.display(),
                dir.display()
            )
        })?;
        rel.to_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .context("not a database path under the mount")
    }
}

fn run() -> Result<i32> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Mount { config, flags } => {
            let conf = match &config {
                Some(f) => config::Config::load(f)?,
                None => config::Config::default(),
            };
            mount::run(mount::MountOpts::resolve(flags, conf)?)?;
            Ok(0)
        }
        Cmd::Restore {
            path,
            replica,
            db,
            output,
            all,
            jobs,
            txid,
            timestamp,
            config,
            force,
            if_not_exists,
            age_identity,
            passphrase_env,
            parallel,
            dry_run,
            json,
        } => {
            let src =
                ReplicaSource::resolve(config.as_deref(), replica, age_identity, passphrase_env)?;
            if all {
                let target = match timestamp {
                    Some(ts) => catalog::Target::Time(sqlfs::time::parse_time(&ts)?),
                    None => catalog::Target::Latest,
                };
                let report = restore_all::run(&restore_all::AllOpts {
                    replica: src.replica,
                    out_dir: output,
                    target,
                    force,
                    if_not_exists,
                    age_identity: src.age_identity,
                    passphrase: src.passphrase,
                    workers: jobs,
                    parallel,
                    progress: !json,
                })?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", report.text());
                }
                return Ok(if report.failed.is_empty() { 0 } else { 1 });
            }
            let db = match (db, path) {
                (Some(d), None) => d,
                (None, Some(p)) => src.db_name(&p)?,
                (Some(_), Some(_)) => anyhow::bail!("give the database either as --db NAME or as a path, not both"),
                (None, None) => anyhow::bail!("which database? pass --db NAME (its path under the mount), or --config FILE and its path"),
            };
            let target = match (txid, timestamp) {
                (Some(t), _) => catalog::Target::Txid(t),
                (None, Some(ts)) => catalog::Target::Time(sqlfs::time::parse_time(&ts)?),
                (None, None) => catalog::Target::Latest,
            };
            let report = restore::run(&restore::RestoreOpts {
                replica: src.replica,
                db,
                output,
                target,
                force,
                if_not_exists,
                age_identity: src.age_identity,
                passphrase: src.passphrase,
                parallel,
                dry_run,
                progress: !json,
                exact: false,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(0)
        }
        Cmd::List {
            replica,
            db,
            config,
            age_identity,
            passphrase_env,
            json,
            all,
        } => {
            let src =
                ReplicaSource::resolve(config.as_deref(), replica, age_identity, passphrase_env)?;
            let dbs = list::run(
                &src.replica,
                db.as_deref(),
                src.age_identity.as_deref(),
                src.passphrase.as_deref(),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dbs)?);
            } else {
                print!("{}", list::text(&dbs, all));
            }
            // Every readable database is listed; an unreadable one makes the exit code say so.
            let bad: Vec<&str> = dbs
                .iter()
                .filter(|d| d.error.is_some())
                .map(|d| d.name.as_str())
                .collect();
            if !bad.is_empty() {
                eprintln!(
                    "sqlfs: error: {} of {} databases could not be read: {}",
                    bad.len(),
                    dbs.len(),
                    bad.join(", ")
                );
                return Ok(1);
            }
            Ok(0)
        }
        Cmd::Status { dir, all, json } => {
            let how = if json {
                "json"
            } else if all {
                "all"
            } else {
                "summary"
            };
            inspect(&dir, &["status", how], |_| {
                anyhow::bail!("{} is not a running sqlfs mount", dir.display())
            })
        }
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
