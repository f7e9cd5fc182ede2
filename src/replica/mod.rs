//! Replica clients: the one small interface every storage backend implements, and the
//! parsing of replica URLs.
//!
//! Object keys (docs/FORMAT.md, "Replica layout") carry database ids, levels and TXIDs, never
//! content. `put_new` is the fence: it fails when the key exists, so two writers of one
//! database can never both extend its chain.

mod azure;
mod cloud;
mod file;
mod gcs;
pub mod memory;
mod s3;
mod sftp;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use azure::AzureReplica;
pub use file::FileReplica;
pub use gcs::GcsReplica;
pub use memory::MemoryReplica;
pub use s3::S3Replica;
pub use sftp::SftpReplica;

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
    /// `url` is shown through [`redact_url`]: never a credential.
    #[error("bad replica URL {}: {why}", redact_url(url))]
    BadUrl { url: String, why: String },
}

pub type Result<T> = std::result::Result<T, ReplicaError>;

/// A listing whose keys carry the MD5 of their bytes where the store states it
/// ([`ReplicaClient::list_md5`]).
pub type ListedMd5 = Vec<(Listed, Option<[u8; 16]>)>;

/// One key of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// When the object was stored (ns since the epoch; 0 if the store does not say).
    pub modified_ns: u64,
}

/// One place objects are stored. Every backend implements exactly this and keeps the contract
/// below; `tests/conformance.rs` checks it case by case over every backend (all but the
/// points a single loopback server cannot show: other machines, a store that stops).
///
/// **Keys** are `/`-separated paths: not empty, no leading or trailing `/`, no empty segment
/// and none starting with `.` (so no `..`); a backend refuses any other key with an error
/// ([`check_key`]) and touches nothing. A key is never also the directory of other keys
/// (`a/b` beside `a/b/c`: a directory store cannot hold both; sqlfs's layout never does
/// this). A `list` prefix is a plain string prefix (`"a"` matches `a/1` and `ab`), under
/// the same rules except that it may be empty or end with `/`.
///
/// **Consistency** sqlfs relies on: once a call that stores or deletes a key has returned
/// `Ok`, every later `get`, `get_range` and `put_new` of that key, from any client of the
/// same replica, sees it (read-after-write, also across machines). `list` should be as
/// fresh; a listing that lags only makes `restore`, `list` and `.history` see an older chain
/// and weakens the start-up check for another writer, never the fence, which is `put_new`.
///
/// **Errors** name the operation and the key ([`ReplicaError::Io`]) and never carry a
/// credential, nor does [`describe`](Self::describe). A failed call may have taken effect
/// (a `put_new` whose answer was lost stored the object: a retry then gets `Exists`).
///
/// **No call hangs**: network backends bound every request with a timeout and turn its
/// expiry into an error. (`file://` makes plain system calls: it is as bounded as the
/// filesystem under it, e.g. an NFS mount's own timeouts.)
pub trait ReplicaClient: Send + Sync {
    /// The replica's URL, without secrets, for logs and errors.
    fn describe(&self) -> String;
    /// The fence: stores the file `src` as `key` only if `key` does not exist, else
    /// `Err(Exists(key))` with the stored object unchanged. Atomic: of concurrent `put_new`s
    /// of one key (from any clients), exactly one succeeds; readers see the whole object or
    /// no key, never part of it. `src` is not changed, but a store on the same filesystem
    /// may keep that file itself as the object (a hard link, not a copy): a caller must never
    /// write in place a file whose link count is above one.
    fn put_new(&self, key: &str, src: &Path) -> Result<()>;
    /// Stores `data` as `key`, replacing any object there (whole, atomically for readers).
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Copies `key` into the file `dst` (created or truncated) and returns `Ok(true)`;
    /// `Ok(false)`, with `dst` left as it was, if there is no such key.
    fn get(&self, key: &str, dst: &Path) -> Result<bool>;
    /// Bytes `off..min(off + len, size)` of `key` (a ranged read: nothing else of the object
    /// is transferred): short at the end of the object, empty at or past its end or for
    /// `len == 0`; `Ok(None)` if there is no such key, whatever the range.
    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>>;
    /// Every key that starts with `prefix`, each once, sorted by key (byte order), with its
    /// size: the whole listing, however many pages the store returns it in.
    fn list(&self, prefix: &str) -> Result<Vec<Listed>>;
    /// [`list`](Self::list), each key with the MD5 of its bytes where the store's listing
    /// states it (S3: the ETag of a single-part upload), so that a caller that read a key
    /// can tell from one listing whether it still holds those bytes. `Ok(None)` when this
    /// store's listings carry no digest (the caller reads the keys instead). A listed digest
    /// only ever confirms bytes the caller read or wrote itself: an ETag that is not an MD5
    /// (a multipart upload, some server-side encryption) matches nothing.
    fn list_md5(&self, _prefix: &str) -> Result<Option<ListedMd5>> {
        Ok(None)
    }
    /// A local file holding `key` that readers may use in place (never modify), if the
    /// store has one: saves a copy when restoring from a directory.
    fn local_path(&self, _key: &str) -> Option<PathBuf> {
        None
    }
    /// Removes `key`. Idempotent: a key that is already gone is `Ok(())`.
    fn delete(&self, key: &str) -> Result<()>;
}

/// Checks a key (or, with `prefix`, a listing prefix) against the rules of
/// [`ReplicaClient`]; the error names the key. Every backend calls it first, so a key can
/// never address something outside the replica (`/etc/x`, `../x`).
pub fn check_key(replica: &str, op: &'static str, key: &str, prefix: bool) -> Result<()> {
    let mut segs: Vec<&str> = key.split('/').collect();
    if prefix && segs.last() == Some(&"") {
        segs.pop();
    }
    let bad = if segs.is_empty() {
        !prefix
    } else {
        segs.iter().any(|s| s.is_empty() || s.starts_with('.'))
    };
    if bad {
        return Err(ReplicaError::Io {
            replica: replica.to_string(),
            op,
            key: key.to_string(),
            err: io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a replica key (a /-separated path without empty parts or parts starting with .)",
            ),
        });
    }
    Ok(())
}

/// A client that counts what is read through it (requests, and bytes received by `get` and
/// `get_range`), for metrics and tests.
pub struct Counted {
    inner: Box<dyn ReplicaClient>,
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl Counted {
    pub fn new(inner: Box<dyn ReplicaClient>) -> Counted {
        Counted {
            inner,
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// (read requests, bytes received) so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn count(&self, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl ReplicaClient for Counted {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put_new(&self, key: &str, src: &Path) -> Result<()> {
        self.inner.put_new(key, src)
    }
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.inner.put(key, data)
    }
    fn get(&self, key: &str, dst: &Path) -> Result<bool> {
        let r = self.inner.get(key, dst);
        let n = std::fs::metadata(dst).map_or(0, |m| m.len());
        self.count(if matches!(r, Ok(true)) { n } else { 0 });
        r
    }
    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let r = self.inner.get_range(key, off, len);
        let n = match &r {
            Ok(Some(b)) => b.len() as u64,
            _ => 0,
        };
        self.count(n);
        r
    }
    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        self.inner.list(prefix)
    }
    fn list_md5(&self, prefix: &str) -> Result<Option<ListedMd5>> {
        self.inner.list_md5(prefix)
    }
    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.inner.local_path(key)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }
}

/// Opens the replica named by `url`: `file:///path` (or a plain absolute path),
/// `s3://bucket/prefix?endpoint=URL&region=R&force-path-style=true&timeout=30s`,
/// `sftp://user@host[:port]/path?identity-file=PATH&known-hosts=PATH&timeout=30s`,
/// `gs://bucket/prefix?endpoint=URL&anonymous=true&timeout=30s` or
/// `az://container/prefix?account=NAME&endpoint=URL&timeout=30s` (also `abs://`).
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
    if url.starts_with("sftp://") {
        return Ok(Box::new(SftpReplica::open(url)?));
    }
    if url.starts_with("gs://") {
        return Ok(Box::new(GcsReplica::open(url)?));
    }
    if url.starts_with("az://") || url.starts_with("abs://") {
        return Ok(Box::new(AzureReplica::open(url)?));
    }
    if url
        .split_once("://")
        .is_some_and(|(_, r)| r.split(['/', '?']).next().is_some_and(|a| a.contains('@')))
    {
        return Err(bad("credentials do not belong in a replica URL"));
    }
    Err(bad(
        "unknown scheme (supported: file:///path, s3://bucket/prefix, sftp://user@host/path, gs://bucket/prefix, az://container/prefix)",
    ))
}

/// Query parameters whose values are shown as they are; every other value is hidden.
const PLAIN_PARAMS: &[&str] = &[
    "region",
    "force-path-style",
    "timeout",
    // sftp://: local paths and a public fingerprint.
    "identity-file",
    "known-hosts",
    "host-key-fingerprint",
    // gs:// and az://: an account name and a flag.
    "account",
    "anonymous",
];

/// `url` as logs and errors may show it: the scheme, host, bucket and path stay readable;
/// user information (`user:password@`) and the values of query parameters that may carry a
/// secret become `***`. An `endpoint=` value is itself shown redacted.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), url),
    };
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let auth_end = main.find('/').unwrap_or(main.len());
    let (authority, path) = main.split_at(auth_end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_string(),
    };
    let mut out = format!("{scheme}{authority}{path}");
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if k == "endpoint" => format!("{k}={}", redact_url(v)),
                Some((k, v)) if PLAIN_PARAMS.contains(&k) => format!("{k}={v}"),
                Some((k, _)) => format!("{k}=***"),
                None => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// The embedded default replica: a directory under the user's data directory
/// (`$XDG_DATA_HOME`, else `$HOME/.local/share`, else `/var/lib`). Like any XDG base
/// directory, a variable that is empty or not an absolute path is ignored.
pub fn default_dir() -> PathBuf {
    let abs = |v: &str| {
        std::env::var_os(v)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let base = abs("XDG_DATA_HOME")
        .or_else(|| abs("HOME").map(|h| h.join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    base.join("sqlfs/replica")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_secrets() {
        assert_eq!(
            redact_url("s3://bk/some/prefix?endpoint=https://user:pw@minio.lan:9000/x?token=t0p&region=eu-west-1&force-path-style=true&secret=abc"),
            "s3://bk/some/prefix?endpoint=https://***@minio.lan:9000/x?token=***&region=eu-west-1&force-path-style=true&secret=***"
        );
        assert_eq!(redact_url("s3://AKIA:s3cr3t@bk/p"), "s3://***@bk/p");
        assert_eq!(redact_url("file:///srv/replica"), "file:///srv/replica");
        assert_eq!(
            redact_url("az://c/p?account=acct&endpoint=https://acct.blob.core.windows.net&sig=x"),
            "az://c/p?account=acct&endpoint=https://acct.blob.core.windows.net&sig=***"
        );
        assert_eq!(
            redact_url("https://u:p@host/path?sig=zz"),
            "https://***@host/path?sig=***"
        );
        for url in [
            "ftp://user:hunter2@host/dir",
            "s3://AKIAX:hunter2@bucket/prefix",
            "s3://b/p?endpoint=http://k:hunter2@127.0.0.1:9&colour=red",
            "s3://b/p?session-token=hunter2",
            "s3://b/p?endpoint=http://127.0.0.1:9/?X-Amz-Signature=hunter2&timeout=never",
            "sftp://backup:hunter2@host/srv/r",
            "gs://b/p?endpoint=http://k:hunter2@127.0.0.1:9",
            "gs://b/p?token=hunter2",
            "az://c/p?account=a&sig=hunter2",
            "abs://k:hunter2@c/p?account=a",
        ] {
            let e = open(url).err().expect(url).to_string();
            assert!(!e.contains("hunter2"), "{url}: {e}");
            assert!(e.contains("bad replica URL"), "{e}");
        }
    }
}
