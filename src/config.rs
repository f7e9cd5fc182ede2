//! The configuration file (`--config FILE`, YAML; example in contrib/sqlfs.yml).
//!
//! Every mount option, the replicas with their own sync interval, snapshot, compaction,
//! retention and encryption settings, and per-database overrides (exclusion, `sync`,
//! maintenance). `${VAR}` anywhere in a value is replaced by the environment variable VAR
//! (`$${` is a literal `${`); a variable that is not set is an error naming it. The more
//! specific setting wins: command-line flags override the file's top level; a replica's own
//! settings override both, and a database's own settings override everything (see
//! `MountOpts::resolve`, `ship::db_policy`, [`resolve_seal`], [`resolve_read`], [`db_sync`]).
//! Encryption is per replica (a database has no encryption setting of its own).
//!
//! Invariant: secrets (passphrases, credentials in URLs) are never echoed: errors name the
//! setting (and a replica by its redacted URL), never its value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

pub use crate::crypt::{ReadKey, Seal};
use crate::units::{parse_concurrency, parse_duration, parse_size, parse_threads};

/// When to let the kernel pass reads and writes of WAL, `-shm` and plain (non-database) files
/// straight to the backing files (`--passthrough`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Passthrough {
    /// Whenever the kernel and the privileges allow it.
    #[default]
    Auto,
    /// Required: the mount fails without it.
    On,
    /// Never: every write goes through sqlfs.
    Off,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The directory to mount (the mount command's DIR).
    pub dir: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub threads: Option<usize>,
    /// Requests in flight to each replica at most (databases shipped at once).
    pub replica_concurrency: Option<usize>,
    #[serde(default, deserialize_with = "text")]
    pub stage_limit: Option<String>,
    /// Byte budget of the page cache of `.history` views (e.g. 64M).
    #[serde(default, deserialize_with = "text")]
    pub history_cache: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub sync_interval: Option<String>,
    pub sync: Option<bool>,
    pub restore_if_missing: Option<bool>,
    pub metrics_addr: Option<String>,
    /// auto, on or off: see `--passthrough`.
    pub passthrough: Option<Passthrough>,
    /// Database files opened in WAL mode pass straight through as well.
    pub passthrough_databases: Option<bool>,
    #[serde(default, deserialize_with = "text")]
    pub snapshot_interval: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub retention: Option<String>,
    /// Compaction intervals of levels 1, 2, …; an empty list turns compaction off.
    pub compaction: Option<Vec<String>>,
    pub age_recipients: Option<Vec<String>>,
    /// For restore and `list`: the identity file of an encrypted replica.
    pub age_identity: Option<PathBuf>,
    /// Name of the environment variable holding the encryption passphrase.
    pub passphrase_env: Option<String>,
    #[serde(default)]
    pub replicas: Vec<ReplicaConf>,
    /// Per-database overrides, by path under the mount.
    #[serde(default)]
    pub databases: BTreeMap<String, DbConf>,
    /// Databases never captured nor shipped: globs relative to the mount root (syntax in
    /// `exclude.rs`).
    pub exclude: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReplicaConf {
    pub url: String,
    /// This replica's own bound on requests in flight.
    pub replica_concurrency: Option<usize>,
    #[serde(default, deserialize_with = "text")]
    pub sync_interval: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub snapshot_interval: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub retention: Option<String>,
    pub compaction: Option<Vec<String>>,
    /// This replica's own recipients (an empty list: this replica is not encrypted).
    pub age_recipients: Option<Vec<String>>,
    /// This replica is encrypted with the passphrase in this environment variable.
    pub passphrase_env: Option<String>,
    /// The identity file that decrypts this replica (restore, list, --restore-if-missing,
    /// history views).
    pub age_identity: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DbConf {
    /// `false`: captured and staged, but shipped to no replica.
    pub replicate: Option<bool>,
    /// Overrides the mount-wide `sync` for this database: `true` makes its fsync wait for
    /// every replica, `false` lets it return without waiting.
    pub sync: Option<bool>,
    /// Overrides the mount-wide `passthrough-databases` for this database: `true` lets its
    /// file, opened in WAL mode, go straight through the kernel; `false` keeps it on sqlfs's
    /// side.
    pub passthrough: Option<bool>,
    #[serde(default, deserialize_with = "text")]
    pub snapshot_interval: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub retention: Option<String>,
    pub compaction: Option<Vec<String>>,
}

/// A scalar setting written as text or as a bare number (`retention: 0`, `stage-limit: 1048576`).
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(u64),
    }
    Ok(Option::<Scalar>::deserialize(d)?.map(|s| match s {
        Scalar::Text(t) => t,
        Scalar::Int(n) => n.to_string(),
    }))
}

/// Replaces `${VAR}` with the environment's value; `what` names the setting in errors.
pub fn expand(s: &str, what: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let Some(end) = rest[i..].find('}') else {
            bail!("{what}: unterminated ${{ in the configuration");
        };
        let var = &rest[i + 2..i + end];
        if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bail!("{what}: ${{{var}}} is not a valid variable name");
        }
        let val = std::env::var(var)
            .with_context(|| format!("{what}: environment variable {var} is not set"))?;
        out.push_str(&val);
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands `${VAR}` in every string of a YAML tree; `expanded` collects the strings that
/// came out different (they hold a variable's value, perhaps a secret).
fn expand_tree(v: &mut serde_norway::Value, path: &str, expanded: &mut Vec<String>) -> Result<()> {
    use serde_norway::Value;
    match v {
        Value::String(s) => {
            let e = expand(s, path)?;
            if e != *s {
                expanded.push(e.clone());
            }
            *s = e;
        }
        Value::Sequence(seq) => {
            for (i, x) in seq.iter_mut().enumerate() {
                expand_tree(x, &format!("{path}[{i}]"), expanded)?;
            }
        }
        Value::Mapping(m) => {
            for (k, x) in m.iter_mut() {
                let key = k.as_str().unwrap_or("?");
                let p = if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                };
                expand_tree(x, &p, expanded)?;
            }
        }
        _ => {}
    }
    Ok(())
}

impl Config {
    /// Reads and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("configuration {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let mut tree: serde_norway::Value = serde_norway::from_str(text).map_err(|e| {
            // The parser's message quotes no values beyond the offending token's position.
            anyhow::anyhow!("not valid YAML: {e}")
        })?;
        if tree.is_null() {
            return Ok(Config::default());
        }
        let mut expanded = Vec::new();
        expand_tree(&mut tree, "", &mut expanded)?;
        let c: Config = serde_norway::from_value(tree).map_err(|e| {
            // A type error quotes the value; one that came from the environment may be a
            // secret.
            let mut msg = e.to_string();
            for v in expanded.iter().filter(|v| !v.is_empty()) {
                msg = msg.replace(v.as_str(), "***");
            }
            anyhow::anyhow!("{msg}")
        })?;
        c.check()?;
        Ok(c)
    }

    /// Checks every duration, size and URL, so a mistake stops the mount before it starts.
    fn check(&self) -> Result<()> {
        let dur = |v: &Option<String>, what: &str| -> Result<()> {
            if let Some(s) = v {
                parse_duration(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            }
            Ok(())
        };
        let levels = |v: &Option<Vec<String>>, what: &str| -> Result<()> {
            for s in v.iter().flatten() {
                parse_duration(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            }
            Ok(())
        };
        dur(&self.sync_interval, "sync-interval")?;
        dur(&self.snapshot_interval, "snapshot-interval")?;
        dur(&self.retention, "retention")?;
        levels(&self.compaction, "compaction")?;
        if let Some(n) = self.threads {
            parse_threads(&n.to_string()).map_err(|e| anyhow::anyhow!("threads: {e}"))?;
        }
        if let Some(n) = self.replica_concurrency {
            parse_concurrency(&n.to_string())
                .map_err(|e| anyhow::anyhow!("replica-concurrency: {e}"))?;
        }
        if let Some(s) = &self.stage_limit {
            parse_size(s).map_err(|e| anyhow::anyhow!("stage-limit: {e}"))?;
        }
        if let Some(s) = &self.history_cache {
            parse_size(s).map_err(|e| anyhow::anyhow!("history-cache: {e}"))?;
        }
        if let Some(a) = &self.metrics_addr {
            a.parse::<std::net::SocketAddr>().map_err(|_| {
                anyhow::anyhow!("metrics-addr: {a:?} is not an address like 127.0.0.1:9090")
            })?;
        }
        for (i, r) in self.replicas.iter().enumerate() {
            let w = format!("replicas[{i}]");
            dur(&r.sync_interval, &format!("{w}.sync-interval"))?;
            if let Some(n) = r.replica_concurrency {
                parse_concurrency(&n.to_string())
                    .map_err(|e| anyhow::anyhow!("{w}.replica-concurrency: {e}"))?;
            }
            dur(&r.snapshot_interval, &format!("{w}.snapshot-interval"))?;
            dur(&r.retention, &format!("{w}.retention"))?;
            levels(&r.compaction, &format!("{w}.compaction"))?;
            crate::replica::open(&r.url).map_err(|e| anyhow::anyhow!("{w}.url: {e}"))?;
            let named = format!("{w} ({})", crate::replica::redact_url(&r.url));
            if r.passphrase_env.is_some() && r.age_recipients.is_some() {
                bail!("{named}: age-recipients and passphrase-env: choose one way to encrypt this replica (an empty age-recipients list means it is not encrypted)");
            }
            if r.passphrase_env.is_some() && r.age_identity.is_some() {
                bail!("{named}: age-identity and passphrase-env: this replica is encrypted with the passphrase, which also decrypts it; age-identity is for replicas encrypted to age-recipients");
            }
            if let Some(v) = &r.passphrase_env {
                check_var_name(v).map_err(|e| anyhow::anyhow!("{named}: passphrase-env: {e}"))?;
            }
        }
        if let Some(x) = &self.exclude {
            crate::exclude::Exclude::new(x).map_err(|e| anyhow::anyhow!("exclude: {e}"))?;
        }
        for (name, d) in &self.databases {
            let w = format!("databases.{name}");
            dur(&d.snapshot_interval, &format!("{w}.snapshot-interval"))?;
            dur(&d.retention, &format!("{w}.retention"))?;
            levels(&d.compaction, &format!("{w}.compaction"))?;
        }
        if self.passphrase_env.is_some()
            && self.age_recipients.as_ref().is_some_and(|r| !r.is_empty())
        {
            bail!("passphrase-env and age-recipients: choose one way to encrypt");
        }
        if let Some(v) = &self.passphrase_env {
            check_var_name(v).map_err(|e| anyhow::anyhow!("passphrase-env: {e}"))?;
        }
        if self.passthrough == Some(Passthrough::On) {
            if self.sync == Some(true) {
                bail!("sync: true and passthrough: on: a synced database's fsync waits for its transaction, which sqlfs must see written (not passed through the kernel); use passthrough: auto");
            }
            if let Some((name, _)) = self.databases.iter().find(|(_, d)| d.sync == Some(true)) {
                bail!("databases.{name}: sync: true and passthrough: on: a synced database's fsync waits for its transaction, which sqlfs must see written (not passed through the kernel); use passthrough: auto");
            }
        }
        Ok(())
    }

    /// The encryption settings of the file's top level.
    pub fn keys(&self) -> KeyLayer {
        KeyLayer {
            age_recipients: self.age_recipients.clone(),
            passphrase_env: self.passphrase_env.clone(),
            age_identity: self.age_identity.clone(),
        }
    }

    /// The replica entry with exactly this URL (after `${VAR}` expansion), with its index.
    pub fn replica(&self, url: &str) -> Option<(usize, &ReplicaConf)> {
        self.replicas.iter().enumerate().find(|(_, r)| r.url == url)
    }
}

impl ReplicaConf {
    /// This replica's own encryption settings.
    pub fn keys(&self) -> KeyLayer {
        KeyLayer {
            age_recipients: self.age_recipients.clone(),
            passphrase_env: self.passphrase_env.clone(),
            age_identity: self.age_identity.clone(),
        }
    }

    /// How errors name this replica: its index and its URL without credentials.
    pub fn describe(&self, i: usize) -> String {
        format!("replicas[{i}] ({})", crate::replica::redact_url(&self.url))
    }
}

/// A passphrase variable must be a plain name (the setting holds the name, not the secret).
fn check_var_name(v: &str) -> std::result::Result<(), String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        // Not echoed: a passphrase pasted here by mistake must not reach the log.
        return Err(
            "not an environment variable name (give the variable's name, not the passphrase)"
                .into(),
        );
    }
    Ok(())
}

/// The encryption settings of one layer: the file's top level (with the command-line flags
/// over it), or one replica's entry.
#[derive(Clone, Debug, Default)]
pub struct KeyLayer {
    /// Encrypt to these recipients; `Some(empty)`: do not encrypt.
    pub age_recipients: Option<Vec<String>>,
    /// Encrypt (and decrypt) with the passphrase in this environment variable.
    pub passphrase_env: Option<String>,
    /// Decrypt with this identity file.
    pub age_identity: Option<PathBuf>,
}

impl KeyLayer {
    fn seals(&self) -> bool {
        self.age_recipients.is_some() || self.passphrase_env.is_some()
    }

    fn reads(&self) -> bool {
        self.age_identity.is_some() || self.passphrase_env.is_some()
    }
}

/// The value of the passphrase variable `var`.
pub fn passphrase(var: &str) -> Result<String> {
    check_var_name(var).map_err(|e| anyhow::anyhow!("the passphrase variable: {e}"))?;
    std::env::var(var).map_err(|_| anyhow::anyhow!("the passphrase variable {var} is not set"))
}

/// How one replica is encrypted: by its own entry (`own`) if it says (`age-recipients`, even
/// empty, or `passphrase-env`), else by `base` (the top level, flags over the file). Reads
/// the passphrase variable; its value appears in no error.
pub fn resolve_seal(base: &KeyLayer, own: Option<&KeyLayer>) -> Result<Seal> {
    let l = own.filter(|o| o.seals()).unwrap_or(base);
    Ok(match (&l.passphrase_env, &l.age_recipients) {
        (Some(_), Some(r)) if !r.is_empty() => {
            bail!("encrypt either to age recipients or with a passphrase, not both")
        }
        (Some(v), _) => Seal::Passphrase(passphrase(v)?),
        (None, Some(r)) if !r.is_empty() => Seal::Recipients(r.clone()),
        _ => Seal::Plain,
    })
}

/// What decrypts one replica: its own entry's `age-identity` or `passphrase-env` if it names
/// one, else `base`'s (the top level, flags over the file).
pub fn resolve_read(base: &KeyLayer, own: Option<&KeyLayer>) -> Result<ReadKey> {
    let l = own.filter(|o| o.reads()).unwrap_or(base);
    Ok(ReadKey {
        identity: l.age_identity.clone(),
        passphrase: l.passphrase_env.as_deref().map(passphrase).transpose()?,
    })
}

/// Whether database `db`'s fsync waits for the replicas: its own `sync` setting if it has
/// one, else the mount-wide one (`--sync`, top-level `sync:`).
pub fn db_sync(mount_wide: bool, db: Option<&DbConf>) -> bool {
    db.and_then(|d| d.sync).unwrap_or(mount_wide)
}

/// Whether database `db`'s file may go straight through the kernel in WAL mode: its own
/// `passthrough` setting if it has one, else the mount-wide one (`--passthrough-databases`,
/// top-level `passthrough-databases:`).
pub fn db_passthrough(mount_wide: bool, db: Option<&DbConf>) -> bool {
    db.and_then(|d| d.passthrough).unwrap_or(mount_wide)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Limits past 64 bits or no request threads stop the configuration, as on the command line.
    #[test]
    fn bad_limits_are_refused() {
        assert!(Config::parse("threads: 0\n").is_err());
        assert!(Config::parse("stage-limit: 17179869184G\n").is_err());
        assert!(Config::parse("history-cache: 17179869185G\n").is_err());
    }

    #[test]
    fn parses_and_expands() {
        std::env::set_var("SQLFS_TEST_BUCKET", "b1");
        let c = Config::parse(
            "dir: /data\nretention: 72h\ncompaction: [10s, 1m]\nreplicas:\n  - url: file:///tmp/${SQLFS_TEST_BUCKET}\n    retention: 1h\ndatabases:\n  cache.db:\n    replicate: false\n",
        )
        .unwrap();
        assert_eq!(c.replicas[0].url, "file:///tmp/b1");
        assert_eq!(c.databases["cache.db"].replicate, Some(false));
        let mut p = crate::ship::Policy::default();
        p.overlay(&c.snapshot_interval, &c.retention, &c.compaction);
        assert_eq!(p.retention, Duration::from_secs(72 * 3600));
        assert_eq!(p.levels.len(), 2);
    }

    /// The example in contrib/ is a valid configuration, every key of it known.
    #[test]
    fn contrib_example_parses() {
        let text = include_str!("../contrib/sqlfs.yml");
        for v in [
            "SQLFS_AGE_RECIPIENT",
            "SQLFS_OFFSITE_RECIPIENT",
            "SQLFS_BUCKET",
            "HOSTNAME",
        ] {
            std::env::set_var(v, "x");
        }
        let c = Config::parse(text).unwrap_or_else(|e| panic!("contrib/sqlfs.yml: {e:#}"));
        assert_eq!(c.passthrough, Some(Passthrough::Auto));
        // The replicas' own keys and the databases' own sync settings are there.
        let (base, r) = (c.keys(), &c.replicas);
        assert!(matches!(
            resolve_seal(&base, Some(&r[0].keys())).unwrap(),
            Seal::Recipients(_)
        ));
        assert_eq!(
            resolve_read(&base, Some(&r[0].keys()))
                .unwrap()
                .identity
                .as_deref(),
            Some(Path::new("/etc/sqlfs/offsite.key"))
        );
        // The file replica (after the SFTP one) turns encryption off.
        assert!(r[2].url.starts_with("file://"));
        assert!(matches!(
            resolve_seal(&base, Some(&r[2].keys())).unwrap(),
            Seal::Plain
        ));
        assert!(!db_sync(true, c.databases.get("cache.db")));
        assert!(db_sync(false, c.databases.get("billing.db")));
    }

    /// The sidecar example is complete: its configuration parses, every `${VAR}` in it is
    /// set by the sqlfs container, and the files it names are mounted there.
    #[test]
    fn sidecar_example_is_complete() {
        use serde::Deserialize as _;
        use serde_norway::Value;
        let text = include_str!("../contrib/sidecar/pod.yaml");
        let docs: Vec<Value> = serde_norway::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).expect("pod.yaml is YAML"))
            .collect();
        let kind = |k: &str| {
            docs.iter()
                .find(|d| d["kind"].as_str() == Some(k))
                .unwrap_or_else(|| panic!("no {k} in pod.yaml"))
        };
        let conf = kind("ConfigMap")["data"]["sqlfs.yml"]
            .as_str()
            .expect("the ConfigMap holds sqlfs.yml");
        let pod = kind("Pod");
        let sidecar = pod["spec"]["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str() == Some("sqlfs"))
            .expect("a container named sqlfs");
        let env: Vec<&str> = sidecar["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        let mut rest = conf;
        while let Some(i) = rest.find("${") {
            let end = rest[i..].find('}').unwrap();
            let var = &rest[i + 2..i + end];
            assert!(
                env.contains(&var),
                "sqlfs.yml uses ${{{var}}}, which the pod does not set"
            );
            std::env::set_var(var, "x");
            rest = &rest[i + end..];
        }
        let c = Config::parse(conf).unwrap_or_else(|e| panic!("pod.yaml's sqlfs.yml: {e:#}"));
        let mounts: Vec<&str> = sidecar["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        let args: Vec<&str> = sidecar["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        let conf_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
        let identity = c
            .age_identity
            .expect("an identity for --restore-if-missing");
        for f in [Path::new(conf_path), identity.as_path()] {
            assert!(
                mounts.iter().any(|m| f.parent() == Some(Path::new(m))),
                "{} is in no volume of the sqlfs container",
                f.display()
            );
        }
        assert!(c.replicas.iter().all(|r| r.url.starts_with("s3://")));
    }

    #[test]
    fn clear_errors() {
        let e =
            Config::parse("replicas:\n  - url: file:///x/${SQLFS_SURELY_UNSET_VAR}\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("SQLFS_SURELY_UNSET_VAR is not set"),
            "{e:#}"
        );
        let e = Config::parse("retention: forever\n").unwrap_err();
        assert!(format!("{e:#}").contains("retention"), "{e:#}");
        let e = Config::parse("colour: red\n").unwrap_err();
        assert!(format!("{e:#}").contains("colour"), "{e:#}");
        let e = Config::parse("replicas:\n  - url: ftp://x\n").unwrap_err();
        assert!(format!("{e:#}").contains("replicas[0].url"), "{e:#}");
        assert_eq!(expand("a$${b}c", "x").unwrap(), "a${b}c");
        // Values from the environment are never echoed: not in a type error, not in a URL.
        std::env::set_var("SQLFS_TEST_SECRET", "hunter2-s3cr3t");
        for text in [
            "threads: ${SQLFS_TEST_SECRET}\n",
            "replicas:\n  - url: s3://b/p?endpoint=http://k:${SQLFS_TEST_SECRET}@h:9\n",
            "replicas:\n  - url: s3://b/p?token=${SQLFS_TEST_SECRET}\n",
            "databases:\n  x.db:\n    replicate: ${SQLFS_TEST_SECRET}\n",
        ] {
            let e = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(!e.contains("hunter2"), "{text}: {e}");
        }
        let c = Config::parse("retention: 0\nstage-limit: 1048576\n").unwrap();
        assert_eq!(c.retention.as_deref(), Some("0"));
    }

    /// Encryption per replica: a replica's own `age-recipients` (an empty list: plain) or
    /// `passphrase-env` replaces the top level's; its own `age-identity` or `passphrase-env`
    /// decrypts it.
    #[test]
    fn encryption_per_replica() {
        std::env::set_var("SQLFS_TEST_REPLICA_PASS", "pass-of-r2");
        let c = Config::parse(
            "age-recipients: [age1top]\nage-identity: /top.key\nreplicas:\n  - url: file:///r1\n  - url: file:///r2\n    passphrase-env: SQLFS_TEST_REPLICA_PASS\n  - url: file:///r3\n    age-recipients: []\n  - url: file:///r4\n    age-recipients: [age1own]\n    age-identity: /own.key\n",
        )
        .unwrap();
        let base = c.keys();
        let seal = |i: usize| resolve_seal(&base, Some(&c.replicas[i].keys())).unwrap();
        let read = |i: usize| resolve_read(&base, Some(&c.replicas[i].keys())).unwrap();
        assert!(matches!(seal(0), Seal::Recipients(r) if r == ["age1top"]));
        assert!(matches!(seal(1), Seal::Passphrase(p) if p == "pass-of-r2"));
        assert!(matches!(seal(2), Seal::Plain));
        assert!(matches!(seal(3), Seal::Recipients(r) if r == ["age1own"]));
        let (r0, r1, r3) = (read(0), read(1), read(3));
        assert_eq!(r0.identity.as_deref(), Some(Path::new("/top.key")));
        assert!(r0.passphrase.is_none());
        assert_eq!(r1.identity, None);
        assert_eq!(r1.passphrase.as_deref(), Some("pass-of-r2"));
        assert_eq!(r3.identity.as_deref(), Some(Path::new("/own.key")));
        // A replica without keys of its own takes the top level's.
        assert_eq!(read(2).identity.as_deref(), Some(Path::new("/top.key")));
        assert_eq!(c.replica("file:///r2").map(|(i, _)| i), Some(1));

        // Both ways on one replica: an error naming it by its redacted URL.
        std::env::set_var("SQLFS_TEST_SECRET2", "hunter3-s3cr3t");
        for (extra, says) in [
            (
                "    age-recipients: [age1x]\n    passphrase-env: P\n",
                "choose one way",
            ),
            (
                "    age-recipients: []\n    passphrase-env: P\n",
                "choose one way",
            ),
            (
                "    age-identity: /k\n    passphrase-env: P\n",
                "age-identity",
            ),
            (
                "    passphrase-env: \"correct horse\"\n",
                "not an environment variable name",
            ),
        ] {
            let text = format!(
                "replicas:\n  - url: file:///ok\n  - url: s3://b/p?endpoint=http://h:9/x?sig=${{SQLFS_TEST_SECRET2}}\n{extra}"
            );
            let e = format!("{:#}", Config::parse(&text).unwrap_err());
            assert!(
                e.contains("replicas[1] (s3://b/p?endpoint=http://h:9/x?sig=***)"),
                "{e}"
            );
            assert!(e.contains(says), "{e}");
            assert!(!e.contains("hunter3") && !e.contains("horse"), "{e}");
        }
        // A passphrase variable that is not set is named; the value of one never is.
        let c = Config::parse(
            "replicas:\n  - url: file:///r\n    passphrase-env: SQLFS_SURELY_UNSET_PASS\n",
        )
        .unwrap();
        let e = resolve_seal(&c.keys(), Some(&c.replicas[0].keys()))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("SQLFS_SURELY_UNSET_PASS is not set"), "{e}");
    }

    /// `sync` per database overrides the mount-wide one; `passthrough: on` with any synced
    /// database is an error naming it.
    #[test]
    fn sync_per_database() {
        let c = Config::parse("databases:\n  a.db:\n    sync: true\n  b.db:\n    sync: false\n")
            .unwrap();
        for wide in [false, true] {
            assert!(db_sync(wide, c.databases.get("a.db")));
            assert!(!db_sync(wide, c.databases.get("b.db")));
            assert_eq!(db_sync(wide, c.databases.get("other.db")), wide);
        }
        let e =
            Config::parse("passthrough: on\ndatabases:\n  x/a.db:\n    sync: true\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("databases.x/a.db: sync: true and passthrough: on"),
            "{e:#}"
        );
        let e = Config::parse("passthrough: on\nsync: true\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("sync: true and passthrough: on"),
            "{e:#}"
        );
        // Without any synced database, passthrough: on is fine.
        Config::parse("passthrough: on\nsync: false\ndatabases:\n  a.db:\n    sync: false\n")
            .unwrap();
        let e = Config::parse("databases:\n  a.db:\n    sync: sometimes\n").unwrap_err();
        assert!(format!("{e:#}").contains("expected a boolean"), "{e:#}");
    }
}
