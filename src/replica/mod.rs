//! Replica clients: the one small interface every storage backend implements, and the
//! parsing of replica URLs.
//!
//! Object keys (docs/FORMAT.md, "Replica layout") carry database ids, levels and TXIDs, never
//! content. `put_new` is the fence: it fails when the key exists, so two writers of one
//! database can never both extend its chain.

mod file;
mod s3;

use std::io;
use std::path::{Path, PathBuf};

pub use file::FileReplica;
pub use s3::S3Replica;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{0} already exists in the replica")]
    Exists(String),
    #[error("replica {replica}: {op} {key}: {err}")]
    Io {
        replica: String,
        op: &'static str,
        key: String,
        err: io::Error,
    },
    #[error("bad replica URL {url}: {why}")]
    BadUrl { url: String, why: String },
}

pub type Result<T> = std::result::Result<T, ReplicaError>;

/// One key of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// When the object was stored (ns since the epoch; 0 if the store does not say).
    pub modified_ns: u64,
}

/// One place objects are stored. Every backend implements exactly this.
pub trait ReplicaClient: Send + Sync {
    /// The replica's URL, without secrets, for logs and errors.
    fn describe(&self) -> String;
    /// Stores the file `src` as `key`, only if `key` does not exist yet.
    fn put_new(&self, key: &str, src: &Path) -> Result<()>;
    /// Stores `data` as `key`, replacing it.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Copies `key` into the file `dst`; `Ok(false)` if there is no such key.
    fn get(&self, key: &str, dst: &Path) -> Result<bool>;
    /// Up to `len` bytes of `key` from offset `off`; `Ok(None)` if there is no such key.
    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>>;
    /// Every key under `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<Listed>>;
    /// A local file holding `key` that readers may use in place (never modify), if the
    /// store has one: saves a copy when restoring from a directory.
    fn local_path(&self, _key: &str) -> Option<PathBuf> {
        None
    }
    /// Removes `key`; a key that is already gone is not an error.
    fn delete(&self, key: &str) -> Result<()>;
}

/// Opens the replica named by `url`: `file:///path` (or a plain absolute path) or
/// `s3://bucket/prefix?endpoint=URL&region=R&force-path-style=true&timeout=30s`.
pub fn open(url: &str) -> Result<Box<dyn ReplicaClient>> {
    let bad = |why: &str| ReplicaError::BadUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(bad(
                "a file replica needs an absolute path: file:///path/to/dir",
            ));
        }
        return Ok(Box::new(FileReplica::new(PathBuf::from(rest))));
    }
    if url.starts_with('/') {
        return Ok(Box::new(FileReplica::new(PathBuf::from(url))));
    }
    if url.starts_with("s3://") {
        return Ok(Box::new(S3Replica::open(url)?));
    }
    Err(bad(
        "unknown scheme (supported: file:///path, s3://bucket/prefix)",
    ))
}

/// The embedded default replica: a directory under the user's data directory.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".local/share"))
                .unwrap_or_else(|| PathBuf::from("/var/lib"))
        });
    base.join("sqlfs/replica")
}
