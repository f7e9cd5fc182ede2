//! The mount command's settings: its flags, the configuration file under them, and the
//! replicas they name (each with its own interval, policy and keys), merged into one
//! [`MountOpts`] before anything is mounted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::{
    resolve_read, resolve_seal, Config as FileConfig, DbConf, KeyLayer, ReadKey, Seal,
};
use crate::fs::Passthrough;
use crate::ship::Policy;
use crate::units::{parse_duration, parse_size};

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
    /// Ship every database to this replica (repeatable): file:///path,
    /// s3://bucket/prefix?endpoint=URL&region=R&force-path-style=true&timeout=30s,
    /// sftp://user@host[:port]/path?identity-file=PATH&known-hosts=PATH&host-key-fingerprint=SHA256:…&timeout=30s,
    /// gs://bucket/prefix or az://container/prefix?account=NAME.
    /// Default: a directory under the user's data directory (~/.local/share/sqlfs/replica).
    #[arg(long = "replica", value_name = "URL")]
    pub replicas: Vec<String>,
    /// Requests in flight to each replica at most: how many databases are shipped at once
    /// (1-1024) [default: 16].
    #[arg(long, value_parser = crate::units::parse_concurrency, value_name = "N")]
    pub replica_concurrency: Option<usize>,
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
    /// Pass database files opened in WAL mode straight through too (with kernel
    /// passthrough): a checkpoint's page writes no longer reach sqlfs one request each, so
    /// bulk loads and VACUUM ran 1.2-1.9 times faster in the bench, and capture stays exact.
    /// Read-heavy apps pay for it: after a read through such a file the kernel asks sqlfs for
    /// the file's attributes at every fstat (SQLite makes one per read transaction while the
    /// WAL is empty). For some databases only: `passthrough: true` under `databases:` in the
    /// configuration file.
    #[arg(long)]
    pub passthrough_databases: bool,
    /// Never capture nor ship the databases this glob matches, relative to the mount root
    /// (repeatable; replaces the configuration's `exclude:`): `*` and `?` within a path
    /// component, `[a-z]`, `**` for any number of components; a directory excludes what
    /// is under it. Examples: `cache.db`, `**/*-tmp.db`, `scratch`.
    #[arg(long = "exclude", value_name = "GLOB")]
    pub exclude: Vec<String>,
}

/// Requests in flight to a replica at most, unless configured: enough to keep up with a
/// thousand databases committing every second on a store that answers in tens of
/// milliseconds, few enough for a small store (docs/PERFORMANCE.md).
pub const DEFAULT_CONCURRENCY: usize = 16;

/// One replica to ship to, with its own interval, policy and keys.
pub struct ReplicaSpec {
    pub url: String,
    pub sync_interval: Duration,
    /// Requests in flight to it at most.
    pub concurrency: usize,
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
    /// Requests in flight to each replica at most (a replica's own setting wins).
    pub replica_concurrency: usize,
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
    /// Database files opened in WAL mode go straight through as well.
    pub passthrough_databases: bool,
    /// Per-database overrides from the configuration file.
    pub databases: BTreeMap<String, DbConf>,
    /// Databases never captured nor shipped (`--exclude`, else the file's `exclude:`).
    pub exclude: crate::exclude::Exclude,
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
        let concurrency = cli
            .replica_concurrency
            .or(conf.replica_concurrency)
            .unwrap_or(DEFAULT_CONCURRENCY);
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
                        concurrency,
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
                        concurrency: r.replica_concurrency.unwrap_or(concurrency),
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
        // A database's own `passthrough: true` asks for what its other settings rule out.
        for (name, d) in &conf.databases {
            if d.passthrough != Some(true) {
                continue;
            }
            if crate::config::db_sync(sync, Some(d)) {
                bail!("databases.{name}: passthrough: true cannot be combined with sync (the app's fsync waits for a transaction sqlfs must see written); set sync: false for it or drop passthrough")
            }
            if passthrough == Passthrough::Off {
                bail!("databases.{name}: passthrough: true cannot apply with passthrough off (every file then goes through sqlfs)")
            }
        }
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
            replica_concurrency: concurrency,
            policy,
            keys,
            sync,
            passthrough,
            passthrough_databases: cli.passthrough_databases
                || conf.passthrough_databases.unwrap_or(false),
            restore_if_missing: cli.restore_if_missing || conf.restore_if_missing.unwrap_or(false),
            takeover: cli.takeover,
            metrics_addr: match cli.metrics_addr {
                Some(a) => Some(a),
                None => conf.metrics_addr.as_deref().and_then(|a| a.parse().ok()),
            },
            databases: conf.databases,
            exclude: {
                let pats = if cli.exclude.is_empty() {
                    conf.exclude.clone().unwrap_or_default()
                } else {
                    cli.exclude.clone()
                };
                crate::exclude::Exclude::new(&pats).map_err(|e| anyhow::anyhow!("{e}"))?
            },
        })
    }

    /// True if any database may sync (mount-wide `sync`, or a database's own `sync: true`).
    pub fn any_sync(&self) -> bool {
        self.sync || self.databases.values().any(|d| d.sync == Some(true))
    }
}

/// The replicas to ship to: those given, or the embedded default directory.
pub(super) fn replica_specs(o: &MountOpts) -> Result<Vec<ReplicaSpec>> {
    if !o.replicas.is_empty() {
        return Ok(o
            .replicas
            .iter()
            .map(|r| ReplicaSpec {
                url: r.url.clone(),
                sync_interval: r.sync_interval,
                concurrency: r.concurrency,
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
        concurrency: o.replica_concurrency,
        policy: o.policy.clone(),
        seal: resolve_seal(&o.keys, None)?,
        key: resolve_read(&o.keys, None)?,
    }])
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

    /// A database's own `passthrough` overrides `--passthrough-databases` either way; asking
    /// for it where sync or `passthrough: off` rules it out is an error naming the database.
    #[test]
    fn passthrough_per_database() {
        use crate::config::db_passthrough;
        let yaml = "dir: /d\ndatabases:\n  a.db:\n    passthrough: true\n  b.db:\n    passthrough: false\n";
        for (args, wide) in [(&[][..], false), (&["--passthrough-databases"][..], true)] {
            let o = resolve(args, yaml);
            assert_eq!(o.passthrough_databases, wide);
            assert!(db_passthrough(wide, o.databases.get("a.db")));
            assert!(!db_passthrough(wide, o.databases.get("b.db")));
            assert_eq!(db_passthrough(wide, o.databases.get("c.db")), wide);
        }
        let e = |args: &[&str], yaml: &str| format!("{:#}", try_resolve(args, yaml).err().unwrap());
        let on = "dir: /d\ndatabases:\n  a.db:\n    passthrough: true\n";
        assert!(e(&["--sync"], on).contains("databases.a.db: passthrough: true"));
        let both = "dir: /d\ndatabases:\n  a.db:\n    passthrough: true\n    sync: true\n";
        assert!(e(&[], both).contains("cannot be combined with sync"));
        assert!(e(&["--passthrough", "off"], on).contains("passthrough off"));
        // sync: false of its own leaves it free to go straight under --sync.
        let free = "dir: /d\ndatabases:\n  a.db:\n    passthrough: true\n    sync: false\n";
        assert!(try_resolve(&["--sync"], free).is_ok());
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
