//! `sqlfs mount`: opens the backing directory, recovers each database (hot journals, staging
//! reconciliation), mounts, serves until SIGINT/SIGTERM, then flushes staging and unmounts.
//!
//! Threads: fuser request loops (`--threads`), one background thread that syncs staging and
//! folds it when it grows past `--stage-limit`, the control socket, and the signal watcher.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fuser::{Config, MountOption, Session, SessionACL};

use crate::backing::{Backing, META_DIR};
use crate::capture::Capture;
use crate::config::{
    db_sync, resolve_read, resolve_seal, Config as FileConfig, DbConf, KeyLayer, ReadKey, Seal,
};
use crate::fs::{Passthrough, SqlFs};
use crate::ship::Policy;
use crate::units::{parse_duration, parse_size};

/// How long the staged history of a deleted database is kept.
const RETIRED_KEEP: Duration = Duration::from_secs(24 * 3600);

/// The mount command's flags, before the configuration file fills the gaps.
#[derive(clap::Args)]
pub struct CliMount {
    /// Directory to mount over (or `dir:` in the configuration file).
    pub dir: Option<PathBuf>,
    /// Keep the files here instead of in DIR itself.
    #[arg(long, value_name = "BACKING")]
    pub data_dir: Option<PathBuf>,
    /// Kernel request threads [default: 4].
    #[arg(long, value_parser = crate::units::parse_threads)]
    pub threads: Option<usize>,
    /// Fold staged transactions into a local base once a database's log exceeds this many
    /// bytes (suffixes k, M, G) [default: 64M].
    #[arg(long, value_parser = crate::units::parse_size)]
    pub stage_limit: Option<u64>,
    /// Byte budget of the page cache serving `.history` views (suffixes k, M, G)
    /// [default: 64M].
    #[arg(long, value_parser = crate::units::parse_size)]
    pub history_cache: Option<u64>,
    /// Ship every database to this replica (repeatable): file:///path or
    /// s3://bucket/prefix?endpoint=URL&region=R&force-path-style=true&timeout=30s. Default: a
    /// directory under the user's data directory (~/.local/share/sqlfs/replica).
    #[arg(long = "replica", value_name = "URL")]
    pub replicas: Vec<String>,
    /// How often new transactions are shipped (e.g. 1s, 500ms) [default: 1s].
    #[arg(long, value_parser = crate::units::parse_interval)]
    pub sync_interval: Option<Duration>,
    /// A full snapshot at most this often while a database changes (0: only when needed)
    /// [default: 6h].
    #[arg(long, value_parser = crate::units::parse_duration)]
    pub snapshot_interval: Option<Duration>,
    /// Compaction intervals of levels 1, 2, … (`none` to turn it off) [default: 30s,5m,1h].
    #[arg(long, value_parser = crate::units::parse_levels)]
    pub compaction: Option<crate::units::Levels>,
    /// Keep every restore point this far back; older objects are removed (0: keep
    /// everything) [default: 24h].
    #[arg(long, value_parser = crate::units::parse_duration)]
    pub retention: Option<Duration>,
    /// Encrypt every replica object to this age recipient (age1…; repeatable).
    #[arg(long = "age-recipient", value_name = "RECIPIENT")]
    pub age_recipients: Vec<String>,
    /// Encrypt every replica object with the passphrase in this environment variable.
    #[arg(long, value_name = "VAR")]
    pub passphrase_env: Option<String>,
    /// The app's fsync of a database returns only when its transactions are on every
    /// replica (zero loss on machine failure; use with PRAGMA synchronous=FULL). A
    /// database's own `sync:` in the configuration overrides it.
    #[arg(long)]
    pub sync: bool,
    /// Before serving, restore each database the first replica holds but the data
    /// directory lacks (an empty machine, a rebuilt container).
    #[arg(long)]
    pub restore_if_missing: bool,
    /// Take over the names of the databases this mount ships in each replica, even where
    /// another writer (another data directory) holds them: that writer is refused from then
    /// on. Logged; without it, a name another writer holds is not shipped (fenced).
    #[arg(long)]
    pub takeover: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Let the kernel pass WAL and shared-memory file I/O straight to the backing files
    /// (Linux 6.9+, root); commits are then read from the WAL as SQLite publishes them.
    /// `auto` uses it when available; `off` sends every write through sqlfs. Databases with
    /// sync never use it (with `--sync` and no database excepted, it is off) [default: auto].
    #[arg(long, value_enum, value_name = "WHEN")]
    pub passthrough: Option<Passthrough>,
}

/// One replica to ship to, with its own interval, policy and keys.
pub struct ReplicaSpec {
    pub url: String,
    pub sync_interval: Duration,
    pub policy: Policy,
    /// How its objects are encrypted.
    pub seal: Seal,
    /// What decrypts them (`--restore-if-missing`, `.history` views).
    pub key: ReadKey,
}

pub struct MountOpts {
    pub dir: PathBuf,
    pub data_dir: Option<PathBuf>,
    pub threads: usize,
    pub stage_limit: u64,
    /// Byte budget of the `.history` page cache.
    pub history_cache: u64,
    /// Empty: the embedded default replica.
    pub replicas: Vec<ReplicaSpec>,
    pub sync_interval: Duration,
    pub policy: Policy,
    /// The top level's encryption (flags over the file), for the embedded default replica.
    pub keys: KeyLayer,
    /// Mount-wide: the app's fsync of a database file returns only once its transactions are
    /// on every replica (a database's own `sync` overrides it: [`db_sync`]).
    pub sync: bool,
    pub restore_if_missing: bool,
    /// `--takeover`: replace other writers' claims of the names this mount ships.
    pub takeover: bool,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub passthrough: Passthrough,
    /// Per-database overrides from the configuration file.
    pub databases: BTreeMap<String, DbConf>,
}

impl MountOpts {
    /// Resolves the settings, the more specific winning: the defaults, then the
    /// configuration file's top level, then the command-line flags (which stand in for the
    /// file's top level), then each replica's own settings in the file (encryption
    /// included); each database's own settings apply over all of these when it is shipped
    /// (`ship::Shipper`) and when its fsync decides whether to wait (`sync`).
    pub fn resolve(cli: CliMount, conf: FileConfig) -> Result<MountOpts> {
        let dir = cli.dir.or(conf.dir.clone()).context(
            "which directory? pass DIR (sqlfs mount /data) or set `dir:` in the configuration",
        )?;
        let dur = |v: &Option<String>| v.as_deref().and_then(|s| parse_duration(s).ok());
        let sync_interval = cli
            .sync_interval
            .or(dur(&conf.sync_interval).filter(|d| !d.is_zero()))
            .unwrap_or(Duration::from_secs(1));
        let mut policy = Policy::default();
        policy.overlay(&conf.snapshot_interval, &conf.retention, &conf.compaction);
        if let Some(d) = cli.snapshot_interval {
            policy.snapshot_interval = d;
        }
        if let Some(d) = cli.retention {
            policy.retention = d;
        }
        if let Some(l) = &cli.compaction {
            policy.levels = l.0.clone();
        }
        // Encryption: the top level (flags over the file), then each replica's own.
        let keys = KeyLayer {
            age_recipients: if cli.age_recipients.is_empty() {
                conf.age_recipients.clone()
            } else {
                Some(cli.age_recipients)
            },
            passphrase_env: cli.passphrase_env.or(conf.passphrase_env.clone()),
            age_identity: conf.age_identity.clone(),
        };
        if keys.passphrase_env.is_some()
            && keys.age_recipients.as_ref().is_some_and(|r| !r.is_empty())
        {
            bail!("encrypt either to --age-recipient keys or with --passphrase-env, not both");
        }
        let replicas = if !cli.replicas.is_empty() {
            cli.replicas
                .iter()
                .map(|u| {
                    let what = || format!("replica {}", crate::replica::redact_url(u));
                    Ok(ReplicaSpec {
                        url: u.clone(),
                        sync_interval,
                        policy: policy.clone(),
                        seal: resolve_seal(&keys, None).with_context(what)?,
                        key: resolve_read(&keys, None).with_context(what)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            conf.replicas
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let mut p = policy.clone();
                    p.overlay(&r.snapshot_interval, &r.retention, &r.compaction);
                    let own = r.keys();
                    Ok(ReplicaSpec {
                        url: r.url.clone(),
                        sync_interval: dur(&r.sync_interval)
                            .filter(|d| !d.is_zero())
                            .unwrap_or(sync_interval),
                        policy: p,
                        seal: resolve_seal(&keys, Some(&own)).with_context(|| r.describe(i))?,
                        key: resolve_read(&keys, Some(&own)).with_context(|| r.describe(i))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        let sync = cli.sync || conf.sync.unwrap_or(false);
        // Synced databases need their WAL written through sqlfs; kernel passthrough stays for
        // the others, and is off when every database syncs.
        let synced = conf.databases.iter().find(|(_, d)| d.sync == Some(true));
        let all_sync = sync && !conf.databases.values().any(|d| d.sync == Some(false));
        let passthrough = match cli.passthrough.or(conf.passthrough) {
            Some(Passthrough::On) if sync || synced.is_some() => {
                let who = match synced {
                    Some((name, _)) if !sync => format!("databases.{name}: sync: true"),
                    _ => "--sync".to_string(),
                };
                bail!(
                    "{who} waits in the app's fsync for its transaction, which sqlfs must see written: it cannot be combined with --passthrough on (use auto: synced databases are then written through, the others passed through)"
                )
            }
            _ if all_sync => Passthrough::Off,
            p => p.unwrap_or_default(),
        };
        Ok(MountOpts {
            dir,
            data_dir: cli.data_dir.or(conf.data_dir.clone()),
            threads: cli.threads.or(conf.threads).unwrap_or(4),
            stage_limit: match cli.stage_limit {
                Some(n) => n,
                None => conf
                    .stage_limit
                    .as_deref()
                    .and_then(|s| parse_size(s).ok())
                    .unwrap_or(64 << 20),
            },
            history_cache: match cli.history_cache {
                Some(n) => n,
                None => conf
                    .history_cache
                    .as_deref()
                    .and_then(|s| parse_size(s).ok())
                    .unwrap_or(64 << 20),
            },
            replicas,
            sync_interval,
            policy,
            keys,
            sync,
            passthrough,
            restore_if_missing: cli.restore_if_missing || conf.restore_if_missing.unwrap_or(false),
            takeover: cli.takeover,
            metrics_addr: match cli.metrics_addr {
                Some(a) => Some(a),
                None => conf.metrics_addr.as_deref().and_then(|a| a.parse().ok()),
            },
            databases: conf.databases,
        })
    }

    /// True if any database may sync (mount-wide `sync`, or a database's own `sync: true`).
    pub fn any_sync(&self) -> bool {
        self.sync || self.databases.values().any(|d| d.sync == Some(true))
    }
}

/// How long a `--sync` fsync waits for the replicas before failing the app's fsync.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The replicas to ship to: those given, or the embedded default directory.
fn replica_specs(o: &MountOpts) -> Result<Vec<ReplicaSpec>> {
    if !o.replicas.is_empty() {
        return Ok(o
            .replicas
            .iter()
            .map(|r| ReplicaSpec {
                url: r.url.clone(),
                sync_interval: r.sync_interval,
                policy: r.policy.clone(),
                seal: r.seal.clone(),
                key: r.key.clone(),
            })
            .collect());
    }
    let dir = crate::replica::default_dir();
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create the default replica directory {}",
            dir.display()
        )
    })?;
    log::warn!(
        "no --replica given: shipping to the default local replica {} — it does not protect against losing this machine; add --replica s3://bucket/prefix or file:///other/disk",
        dir.display()
    );
    Ok(vec![ReplicaSpec {
        url: format!("file://{}", dir.display()),
        sync_interval: o.sync_interval,
        policy: o.policy.clone(),
        seal: resolve_seal(&o.keys, None)?,
        key: resolve_read(&o.keys, None)?,
    }])
}

/// Restores every database the first replica holds that the data directory lacks; each
/// replica is read with its own key.
fn restore_missing(data: &Path, first: &ReplicaSpec, others: &[ReplicaSpec]) -> Result<()> {
    let url = first.url.as_str();
    let client = crate::replica::open(url)?;
    let opener = crate::crypt::Opener::for_key(&first.key)?;
    let reader = crate::catalog::Reader::new(client.as_ref(), opener.as_ref());
    let dbs = reader
        .databases()
        .with_context(|| format!("--restore-if-missing: reading {}", client.describe()))?;
    for (_, name) in dbs {
        let out = data.join(&name);
        if name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
            || name.starts_with(META_DIR)
        {
            log::warn!("--restore-if-missing: skipping {name:?}: not a plain path under the mount");
            continue;
        }
        if out.exists() {
            continue;
        }
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d)?;
        }
        log::info!(
            "--restore-if-missing: {name} is not in {}; restoring it from {}",
            data.display(),
            client.describe()
        );
        let r = crate::restore::run(&crate::restore::RestoreOpts {
            replica: url.to_string(),
            db: name.clone(),
            output: out.clone(),
            target: crate::catalog::Target::Latest,
            force: false,
            if_not_exists: true,
            age_identity: first.key.identity.clone(),
            passphrase: match first.key.identity {
                Some(_) => None,
                None => first.key.passphrase.clone(),
            },
            parallel: 4,
            dry_run: false,
            progress: false,
            exact: true,
        })
        .with_context(|| format!("--restore-if-missing: restoring {name}"))?;
        log::info!("--restore-if-missing: {}", r.text().trim_end());
        // Staging starts where the replica's chain ends, so TXIDs continue on it.
        let stage = data.join(META_DIR).join("db").join(&r.id);
        if !stage.exists() {
            let meta = crate::stage::BaseMeta {
                txid: r.txid,
                checksum: u64::from_str_radix(&r.checksum, 16).unwrap_or(0),
                page_size: r.page_size,
                db_pages: r.pages,
                time_ns: r.commit_time_ns,
                folding: None,
            };
            let rid = crate::ship::replica_id(&client.describe());
            crate::stage::seed(&stage, &name, &out, &meta)
                .and_then(|()| {
                    crate::stage::write_atomic(
                        &stage.join(format!("shipped.{rid}")),
                        r.txid.to_string().as_bytes(),
                    )
                })
                // This data directory continues the chain: it takes the name over in every
                // replica (the claim, see `owner`) when it first ships it.
                .and_then(|()| {
                    others.iter().try_for_each(|o| {
                        let desc = crate::replica::open(&o.url).map(|c| c.describe());
                        match desc {
                            Ok(d) => {
                                let m = crate::ship::takeover_marker(
                                    &stage,
                                    &crate::ship::replica_id(&d),
                                );
                                crate::stage::write_atomic(&m, b"")
                            }
                            Err(_) => Ok(()),
                        }
                    })?;
                    crate::stage::write_atomic(&crate::ship::takeover_marker(&stage, &rid), b"")
                })
                .with_context(|| format!("--restore-if-missing: seeding staging for {name}"))?;
            // The other replicas continue their own chain of this database where it ends
            // (or get a snapshot if they lack it or lag behind).
            for other in others {
                let held = crate::replica::open(&other.url).ok().and_then(|c| {
                    let opener = crate::crypt::Opener::for_key(&other.key).ok()?;
                    let rd = crate::catalog::Reader::new(c.as_ref(), opener.as_ref());
                    let cat = rd.catalog(&r.id, &name).ok()?;
                    let w = crate::catalog::window(&rd, &cat).ok()??;
                    Some((c.describe(), w.last_txid.min(r.txid)))
                });
                if let Some((desc, t)) = held {
                    crate::stage::write_atomic(
                        &stage.join(format!("shipped.{}", crate::ship::replica_id(&desc))),
                        t.to_string().as_bytes(),
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// True if `path` is the mountpoint of a sqlfs mount (per /proc/self/mountinfo: filesystem
/// type `fuse` or `fuse.sqlfs`, source `sqlfs`).
pub fn is_sqlfs_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(p) = path.to_str() else { return false };
    let mut found = false;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && f[4].replace("\\040", " ") == p {
            // Later lines stack on top of earlier ones: the last match wins.
            found = f.iter().position(|x| *x == "-").is_some_and(|d| {
                let (ty, src) = (
                    f.get(d + 1).copied().unwrap_or(""),
                    f.get(d + 2).copied().unwrap_or(""),
                );
                ty == "fuse.sqlfs" || (ty == "fuse" && src == "sqlfs")
            });
        }
    }
    found
}

/// Rolls back hot journals left by crashed apps, before anything reads the databases: the
/// stream must never contain a half-written transaction.
fn rollback_hot_journals(b: &Backing, rel: &str, depth: usize) {
    if depth > 64 {
        return;
    }
    // The directory is opened beneath the backing root (no link followed) and listed, and its
    // databases opened, through its descriptor.
    let Ok(dir) = b.open_beneath(rel, libc::O_RDONLY | libc::O_DIRECTORY, 0) else {
        return;
    };
    let dir_path = crate::backing::proc_fd_path(dir.as_raw_fd());
    let Ok(rd) = std::fs::read_dir(&dir_path) else {
        return;
    };
    for e in rd.flatten() {
        // Names that are not UTF-8 are never captured; SQLite rolls their journals back itself.
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if rel.is_empty() && name == META_DIR {
            continue;
        }
        let child = crate::backing::join(rel, &name);
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            rollback_hot_journals(b, &child, depth + 1);
        } else if let Some(db) = child.strip_suffix("-journal") {
            let mut m = [0u8; 8];
            let hot = matches!(b.open_read(&child), Ok(Some(f)) if crate::capture::read_exact_at(&f, &mut m, 0).unwrap_or(false))
                && m == crate::sqlite::JOURNAL_MAGIC;
            let regular = b
                .stat(db)
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
            if hot && regular {
                log::warn!("{db}: rolling back a hot journal left by a crashed writer");
                // Checked above to be a regular file (not a link) in a directory reached
                // without following any; this runs before the mount exists, so the path
                // SQLite resolves cannot lead into it.
                let file = dir_path.join(name.strip_suffix("-journal").unwrap_or(&name));
                let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let r = rusqlite::Connection::open_with_flags(file, flags)
                    .and_then(|c| c.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0)));
                if let Err(e) = r {
                    log::error!("{db}: hot journal rollback failed: {e}");
                }
            }
        }
    }
}

/// A mount point and a data directory that differ must not contain one another: files of
/// the data directory under the mount point would be reached through the mount itself (every
/// access to them a request back to this daemon), and a mount point inside the data directory
/// would show the mount within itself.
fn nesting_refused(mnt: &Path, data: &Path) -> Result<()> {
    if mnt == data {
        return Ok(());
    }
    if data.starts_with(mnt) {
        bail!(
            "data directory {} is inside the mount point {}: the mount would hide its own files (choose a data directory outside it, or mount {} in place without --data-dir)",
            data.display(),
            mnt.display(),
            mnt.display()
        );
    }
    if mnt.starts_with(data) {
        bail!(
            "mount point {} is inside the data directory {}: the mount would show itself within itself (choose a mount point outside it)",
            mnt.display(),
            data.display()
        );
    }
    Ok(())
}

pub fn run(o: MountOpts) -> Result<()> {
    // Catch SIGINT/SIGTERM from the start: one arriving while the mount comes up must still
    // lead to a clean unmount, not kill the daemon with the mount half made.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let dir = std::fs::canonicalize(&o.dir)
        .with_context(|| format!("mount point {} does not exist", o.dir.display()))?;
    if !dir.is_dir() {
        bail!("mount point {} is not a directory", dir.display());
    }
    if is_sqlfs_mount(&dir) {
        bail!("{} is already mounted by sqlfs (stop that process, or run `umount -l {}` if it was killed)", dir.display(), dir.display());
    }
    let data = match &o.data_dir {
        Some(d) => std::fs::canonicalize(d)
            .with_context(|| format!("data directory {} does not exist", d.display()))?,
        None => dir.clone(),
    };
    nesting_refused(&dir, &data)?;
    // One sqlfs per data directory, before anything in it is read or written (held until
    // this process exits).
    let _lock = crate::owner::DirLock::acquire(&data, &dir)?;
    if !Path::new("/dev/fuse").exists() {
        bail!("FUSE is unavailable: /dev/fuse is missing (load the module with `modprobe fuse`; in a container, pass the device /dev/fuse and CAP_SYS_ADMIN)");
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && which("fusermount3").is_none() {
        bail!("mounting as a regular user needs fusermount3: install the `fuse3` package (or run as root)");
    }

    let specs = replica_specs(&o)?;
    let mut replicas = Vec::new();
    for r in &specs {
        // Each replica is encrypted with its own settings.
        let sealer = crate::crypt::Sealer::for_seal(&r.seal)
            .with_context(|| format!("replica {}", crate::replica::redact_url(&r.url)))?
            .map(Arc::new);
        replicas.push((crate::replica::open(&r.url)?, r, sealer));
    }
    if o.restore_if_missing {
        restore_missing(&data, &specs[0], &specs[1..])?;
    }
    let backing = Arc::new(
        Backing::open(&data)
            .with_context(|| format!("cannot open data directory {}", data.display()))?,
    );
    rollback_hot_journals(&backing, "", 0);
    let capture = Arc::new(
        Capture::open(backing.clone())
            .with_context(|| format!("cannot open staging in {}/{META_DIR}", data.display()))?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let rules = Arc::new(o.databases.clone());
    let mut intervals = Vec::new();
    let writer = crate::ship::Writer {
        id: crate::owner::writer_id(&data.join(META_DIR))
            .with_context(|| format!("cannot read or make {}/{META_DIR}/writer", data.display()))?,
        host: crate::owner::hostname(),
        data_dir: data.display().to_string(),
        meta_dir: data.join(META_DIR),
        takeover: o.takeover,
    };
    let shippers: Vec<Arc<crate::ship::Shipper>> = replicas
        .into_iter()
        .map(|(c, spec, sealer)| {
            intervals.push(spec.sync_interval);
            crate::ship::Shipper::new(
                c,
                capture.clone(),
                (sealer, spec.key.clone()),
                writer.clone(),
                spec.policy.clone(),
                rules.clone(),
            )
        })
        .collect();
    let mut fs = SqlFs::new(backing.clone(), capture.clone())
        .context("cannot read the data directory")?
        .with_passthrough(o.passthrough);
    if o.any_sync() {
        if o.passthrough == Passthrough::Off {
            log::info!("sync: every write goes through sqlfs (no kernel passthrough)");
        } else {
            // Passthrough for the other databases; a synced one's fsync must find its commit
            // staged, so its WAL (and -shm) always go through sqlfs.
            let (sync, rules) = (o.sync, rules.clone());
            fs =
                fs.with_written_through(Box::new(move |name: &str| db_sync(sync, rules.get(name))));
            let named: Vec<&str> = o
                .databases
                .iter()
                .filter(|(_, d)| d.sync == Some(true))
                .map(|(n, _)| n.as_str())
                .collect();
            log::info!(
                "sync: the WAL and -shm files of synced databases ({}) go through sqlfs, never kernel passthrough",
                if o.sync {
                    "every database but those with sync: false".to_string()
                } else {
                    named.join(", ")
                }
            );
        }
    }
    let history = {
        // History views read the first replica, with that replica's key.
        let k = &specs[0].key;
        let key = match (&k.identity, &k.passphrase) {
            (Some(f), _) => Some(crate::history::Key::IdentityFile(f.clone())),
            (None, Some(p)) => Some(crate::history::Key::Passphrase(p.clone())),
            _ => None,
        };
        let h = crate::history::History::new(
            &backing.meta_path(),
            capture.clone(),
            Some(&specs[0].url),
            key,
            o.history_cache,
        )
        .context("cannot set up .history")?;
        let h = Arc::new(h);
        fs = fs.with_history(h.clone());
        h
    };
    if o.any_sync() {
        let (cap, sh) = (capture.clone(), shippers.clone());
        let (sync, rules) = (o.sync, rules.clone());
        fs = fs.with_durability(Box::new(move |rel: &str| {
            let name = crate::capture::classify(rel).1;
            // Only databases whose resolved sync is true wait.
            if !db_sync(sync, rules.get(name)) {
                return Ok(());
            }
            let Some(db) = cap.get(name) else {
                return Ok(());
            };
            if let Some(f) = db.staging_failure() {
                // Its last commits are not staged: no replica can be waited for.
                anyhow::bail!("{name}: commits are not being staged: {}", f.error);
            }
            let txid = db.stage.last().map_or(0, |h| h.txid);
            // A database excluded from replication (`replicate: false`) waits for nothing.
            for s in sh.iter().filter(|s| s.replicates(name)) {
                s.wait_shipped(&db, txid, SYNC_TIMEOUT)?;
            }
            Ok(())
        }));
    }

    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("sqlfs".into()),
        MountOption::Subtype("sqlfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    cfg.acl = if root {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(o.threads.max(1));
    cfg.clone_fd = true;
    let mount_err = |e: std::io::Error| {
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                " (permission denied: run as root, or allow user mounts with fusermount3)"
            }
            Some(libc::ENODEV) => " (the fuse kernel module is not loaded: `modprobe fuse`)",
            _ => "",
        };
        anyhow::anyhow!("cannot mount {}: {e}{hint}", dir.display())
    };
    // As root, mount(2) directly with type `fuse.sqlfs`; otherwise through fusermount3.
    let mut session = if root {
        let fd = mount_direct(&dir).map_err(mount_err)?;
        Session::from_fd(fs, fd, SessionACL::All, cfg.clone()).map_err(mount_err)?
    } else {
        Session::new(fs, &dir, &cfg).map_err(mount_err)?
    };

    let sock = crate::control::socket_path(&dir);
    if let Err(e) = crate::control::serve(
        &sock,
        backing.clone(),
        capture.clone(),
        shippers.clone(),
        o.stage_limit,
    ) {
        log::warn!(
            "control socket {} unavailable ({e}); `sqlfs verify` will need the mount stopped",
            sock.display()
        );
    }

    let mut ship_threads = Vec::new();
    for (s, interval) in shippers.iter().zip(intervals) {
        ship_threads.push(s.spawn(interval, stop.clone())?);
    }
    if let Some(addr) = o.metrics_addr {
        crate::metrics::serve(
            addr,
            capture.clone(),
            shippers.clone(),
            Some(history.clone()),
            o.stage_limit,
        )
        .with_context(|| format!("--metrics-addr {addr}"))?;
        log::info!("metrics at http://{addr}/metrics");
    }
    {
        let (cap, stop) = (capture.clone(), stop.clone());
        let limit = o.stage_limit;
        let shippers = shippers.clone();
        std::thread::Builder::new()
            .name("sqlfs-stage".into())
            .spawn(move || {
                crate::backing::background_priority();
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(500));
                    cap.sync_all();
                    // Staging that failed (a full disk) recovers without waiting for a commit.
                    cap.retry_failed();
                    tick += 1;
                    if tick % 120 == 1 {
                        cap.expire_retired(RETIRED_KEEP);
                    }
                    for (name, db) in cap.databases() {
                        let bytes = db.stage.log_bytes();
                        if bytes > limit {
                            // Fold only what every replica has, unless staging outgrows its
                            // hard limit: then say so, and the lagging replica gets a snapshot.
                            let shipped = shippers.iter().map(|s| s.position(&db)).min().unwrap_or(u64::MAX);
                            let upto = if bytes > limit * crate::stage::HARD_FACTOR {
                                if shipped < db.stage.last().map_or(0, |h| h.txid) {
                                    log::error!("{name}: a replica is behind and staging holds {} MiB (over {}x --stage-limit); folding anyway, that replica will get a snapshot", bytes >> 20, crate::stage::HARD_FACTOR);
                                }
                                u64::MAX
                            } else {
                                shipped
                            };
                            match db.stage.fold(upto) {
                                Ok(n) if n > 0 => log::info!(
                                    "{name}: folded {n} bytes of staged log into the local base"
                                ),
                                Ok(_) => {}
                                Err(e) => log::error!("{name}: cannot fold staging: {e}"),
                            }
                        }
                    }
                }
            })?;
    }
    let mut unmounter = session.unmount_callable();
    let sig_dir = dir.clone();
    std::thread::Builder::new()
        .name("sqlfs-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: flushing staging and unmounting");
                let r = if root {
                    unmount_direct(&sig_dir)
                } else {
                    unmounter.unmount()
                };
                if let Err(e) = r {
                    log::error!("unmount failed: {e}");
                }
            }
        })?;

    eprintln!(
        "sqlfs: serving {} (data in {}, {} databases known)",
        dir.display(),
        data.display(),
        capture.databases().len()
    );
    let res = session.run();
    let staged = capture.shutdown();
    // The shippers make a last pass over what was staged before stopping.
    stop.store(true, Ordering::Relaxed);
    for t in ship_threads {
        let _ = t.join();
    }
    for s in &shippers {
        if let Some(e) = s.last_error() {
            log::error!("replica {}: the last shipment failed ({e}); what is staged is shipped at the next mount", s.describe());
        }
    }
    let _ = std::fs::remove_file(&sock);
    res.context("filesystem session ended with an error")?;
    if !staged {
        // The exit code tells the truth: the last state of a database is not staged.
        bail!(
            "unmounted {}, but the last state of a database could not be staged (see above); the next mount stages it",
            dir.display()
        );
    }
    log::info!("unmounted {}", dir.display());
    Ok(())
}

/// Mounts a FUSE filesystem of type `fuse.sqlfs` at `dir` with mount(2) and returns the
/// `/dev/fuse` handle serving it.
fn mount_direct(dir: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let dev: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?
        .into();
    let mode = std::fs::metadata(dir)?.mode() & libc::S_IFMT;
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let opts = format!(
        "fd={},rootmode={mode:o},user_id={uid},group_id={gid},default_permissions,allow_other",
        dev.as_raw_fd()
    );
    let c = |s: &[u8]| {
        CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (src, target, fstype, data) = (
        c(b"sqlfs")?,
        c(dir.as_os_str().as_bytes())?,
        c(b"fuse.sqlfs")?,
        c(opts.as_bytes())?,
    );
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // SAFETY: valid C strings; data is the option string the fuse module parses.
    if unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(dev)
}

/// Detaches the mount at `dir`; the session ends once the kernel lets go of it.
fn unmount_direct(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|p| p.exists())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        m: CliMount,
    }

    fn try_resolve(args: &[&str], yaml: &str) -> Result<MountOpts> {
        let cli = Cmd::try_parse_from(std::iter::once("mount").chain(args.iter().copied()))
            .unwrap()
            .m;
        MountOpts::resolve(cli, FileConfig::parse(yaml).unwrap())
    }

    fn resolve(args: &[&str], yaml: &str) -> MountOpts {
        try_resolve(args, yaml).unwrap()
    }

    /// Each replica gets its own encryption: its entry's, else the top level's with the
    /// flags over it; `--replica` replicas have only the latter.
    #[test]
    fn encryption_per_replica() {
        std::env::set_var("SQLFS_TEST_MOUNT_PASS", "p2");
        let yaml = "dir: /d\nage-recipients: [age1file]\nreplicas:\n  - url: file:///r1\n  - url: file:///r2\n    passphrase-env: SQLFS_TEST_MOUNT_PASS\n  - url: file:///r3\n    age-recipients: []\n";
        let kinds = |o: &MountOpts| -> Vec<String> {
            o.replicas
                .iter()
                .map(|r| match &r.seal {
                    Seal::Plain => "plain".into(),
                    Seal::Recipients(v) => v.join(","),
                    Seal::Passphrase(p) => format!("pass:{p}"),
                })
                .collect()
        };
        assert_eq!(kinds(&resolve(&[], yaml)), ["age1file", "pass:p2", "plain"]);
        // The flag stands in for the top level; the replicas' own settings still win.
        let o = resolve(&["--age-recipient", "age1flag"], yaml);
        assert_eq!(kinds(&o), ["age1flag", "pass:p2", "plain"]);
        assert_eq!(o.replicas[1].key.passphrase.as_deref(), Some("p2"));
        let o = resolve(
            &["--replica", "file:///x", "--age-recipient", "age1flag"],
            yaml,
        );
        assert_eq!(kinds(&o), ["age1flag"]);
        // A replica's own passphrase variable must be set; the error names the replica.
        let e = try_resolve(
            &[],
            "dir: /d\nreplicas:\n  - url: file:///r1\n  - url: file:///r2\n    passphrase-env: SQLFS_SURELY_UNSET_MOUNT_PASS\n",
        )
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(
            e.contains("replicas[1] (file:///r2)") && e.contains("SQLFS_SURELY_UNSET_MOUNT_PASS"),
            "{e}"
        );
    }

    /// Kernel passthrough is off only when every database syncs; `--passthrough on` with any
    /// synced database is an error naming it.
    #[test]
    fn sync_and_passthrough() {
        let dbs = "dir: /d\ndatabases:\n  a.db:\n    sync: true\n";
        let o = resolve(&[], dbs);
        assert!(!o.sync && o.any_sync());
        assert_eq!(o.passthrough, Passthrough::Auto);
        let o = resolve(&["--sync"], "dir: /d\n");
        assert_eq!(o.passthrough, Passthrough::Off);
        let o = resolve(
            &["--sync"],
            "dir: /d\ndatabases:\n  cache.db:\n    sync: false\n",
        );
        assert_eq!(o.passthrough, Passthrough::Auto);
        let e = try_resolve(&["--passthrough", "on"], dbs).err().unwrap();
        assert!(
            format!("{e:#}").contains("databases.a.db: sync: true"),
            "{e:#}"
        );
        let e = try_resolve(&["--passthrough", "on", "--sync"], "dir: /d\n")
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("--sync"), "{e:#}");
        let o = resolve(
            &["--passthrough", "on"],
            "dir: /d\ndatabases:\n  a.db:\n    sync: false\n",
        );
        assert_eq!(o.passthrough, Passthrough::On);
        assert!(!o.any_sync());
    }

    const H: u64 = 3600;

    /// Defaults < the file's top level < command-line flags < a replica's own settings <
    /// a database's own settings.
    #[test]
    fn more_specific_settings_win() {
        let yaml = "dir: /d\nretention: 1h\nsync-interval: 2s\ncompaction: [10s]\nreplicas:\n  - url: file:///r1\n    retention: 5h\n    sync-interval: 7s\n  - url: file:///r2\ndatabases:\n  a.db:\n    retention: 9h\n";
        let secs = Duration::from_secs;
        let o = resolve(&[], yaml);
        let (r1, r2) = (&o.replicas[0], &o.replicas[1]);
        assert_eq!(
            (r1.policy.retention, r1.sync_interval),
            (secs(5 * H), secs(7))
        );
        assert_eq!((r2.policy.retention, r2.sync_interval), (secs(H), secs(2)));
        assert_eq!(r1.policy.levels, vec![secs(10)]);
        assert_eq!(
            r1.policy.snapshot_interval,
            Policy::default().snapshot_interval
        );

        // Flags stand in for the file's top level; a replica's own settings still win.
        let o = resolve(
            &[
                "--retention",
                "3h",
                "--sync-interval",
                "500ms",
                "--compaction",
                "none",
            ],
            yaml,
        );
        let (r1, r2) = (&o.replicas[0], &o.replicas[1]);
        assert_eq!(
            (r1.policy.retention, r1.sync_interval),
            (secs(5 * H), secs(7))
        );
        assert_eq!(
            (r2.policy.retention, r2.sync_interval),
            (secs(3 * H), Duration::from_millis(500))
        );
        assert!(r1.policy.levels.is_empty() && r2.policy.levels.is_empty());

        // A database's own settings win over all of it; other databases keep the replica's.
        let db = crate::ship::db_policy(&r1.policy, o.databases.get("a.db"));
        assert_eq!(db.retention, secs(9 * H));
        assert_eq!(db.levels, r1.policy.levels);
        let other = crate::ship::db_policy(&r1.policy, o.databases.get("b.db"));
        assert_eq!(other.retention, secs(5 * H));

        // --replica replaces the file's replicas, which take the top level and the flags.
        let o = resolve(&["--replica", "file:///x", "--retention", "2h"], yaml);
        assert_eq!(o.replicas.len(), 1);
        assert_eq!(o.replicas[0].url, "file:///x");
        assert_eq!(
            (o.replicas[0].policy.retention, o.replicas[0].sync_interval),
            (secs(2 * H), secs(2))
        );
    }
}
