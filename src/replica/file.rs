//! A replica in a local directory (a second disk, an NFS mount).
//!
//! Invariants:
//! - An object appears under its key complete or not at all (written to a temporary name of
//!   its own — unique per call, so concurrent writers never share one —, fsynced, then
//!   hard-linked into place — the link fails if the key exists, which is the fence — and the
//!   directory fsynced).
//! - A source of [`LINK_MIN`] bytes or more on the replica's own filesystem is not copied: it
//!   is fsynced and hard-linked into place itself (the same fence), so the object and the
//!   caller's file are one inode from then on. The contract of
//!   [`put_new`](ReplicaClient::put_new) forbids callers to write such a file in place.
//! - Every key passes [`check_key`] before it becomes a path: no key reaches outside the
//!   directory, and the temporary names (`.tmp-…`) are never keys.
//! - A path that is a directory is no key (missing to `get`, `get_range` and `delete`).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{check_key, Listed, ReplicaClient, ReplicaError, Result};

/// Smallest source `put_new` links instead of copying. Below it a copy costs little, and the
/// caller's file stays its own to write again (the shipper reuses small objects' files).
pub const LINK_MIN: u64 = 1 << 20;

/// Makes temporary names unique within the process (the process id, across processes).
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

pub struct FileReplica {
    root: PathBuf,
}

impl FileReplica {
    pub fn new(root: PathBuf) -> FileReplica {
        FileReplica { root }
    }

    /// The file of `key`, once the key is checked.
    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf> {
        check_key(&self.describe(), op, key, false)?;
        Ok(self.root.join(key))
    }

    /// Opens the file of `key` for reading; `None` if there is no such key.
    fn open(&self, op: &'static str, key: &str) -> Result<Option<File>> {
        let f = match File::open(self.path(op, key)?) {
            Ok(f) => f,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(self.err("open", key)(e)),
        };
        let m = f.metadata().map_err(self.err("stat", key))?;
        Ok(m.is_file().then_some(f))
    }

    fn err(&self, op: &'static str, key: &str) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
        let key = key.to_string();
        move |source| ReplicaError::Io {
            replica: self.describe(),
            op,
            key,
            err: source,
        }
    }

    /// Writes `fill` to a temporary file next to `key`, fsynced; returns its path.
    fn stage(
        &self,
        dst: &Path,
        key: &str,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<PathBuf> {
        let dir = dst.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(self.err("create directory for", key))?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed),
            dst.file_name().and_then(|n| n.to_str()).unwrap_or("obj")
        ));
        let res = File::create(&tmp).and_then(|mut f| {
            fill(&mut f)?;
            f.sync_all()
        });
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(self.err("write", key)(e));
        }
        Ok(tmp)
    }

    /// `put_new` of a large `src` on this replica's filesystem: `src` made durable and linked
    /// as `dst` itself. `None` if it cannot be (small, another filesystem, no hard links
    /// there): the caller copies it instead.
    fn link_new(&self, dst: &Path, key: &str, src: &Path) -> Option<Result<()>> {
        let f = File::open(src).ok()?;
        let m = f.metadata().ok()?;
        let dir = dst.parent().unwrap_or(&self.root);
        if !m.is_file() || m.len() < LINK_MIN {
            return None;
        }
        if let Err(e) = fs::create_dir_all(dir) {
            return Some(Err(self.err("create directory for", key)(e)));
        }
        if fs::metadata(dir).ok()?.dev() != m.dev() {
            return None;
        }
        if let Err(e) = f.sync_all() {
            return Some(Err(self.err("sync", key)(e)));
        }
        match fs::hard_link(src, dst) {
            Ok(()) => Some(self.sync_dir(dst, key)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Some(Err(ReplicaError::Exists(key.to_string())))
            }
            Err(e) => {
                log::debug!(
                    "{}: linking {key} failed ({e}); copying it",
                    self.describe()
                );
                None
            }
        }
    }

    fn sync_dir(&self, dst: &Path, key: &str) -> Result<()> {
        let dir = dst.parent().unwrap_or(&self.root);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(self.err("sync directory of", key))
    }
}

impl ReplicaClient for FileReplica {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn put_new(&self, key: &str, src: &Path) -> Result<()> {
        let dst = self.path("put_new", key)?;
        if let Some(res) = self.link_new(&dst, key, src) {
            return res;
        }
        let tmp = self.stage(&dst, key, |f| {
            io::copy(&mut File::open(src)?, f).map(|_| ())
        })?;
        let res = fs::hard_link(&tmp, &dst);
        let _ = fs::remove_file(&tmp);
        match res {
            Ok(()) => self.sync_dir(&dst, key),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(ReplicaError::Exists(key.to_string()))
            }
            Err(e) => Err(self.err("link", key)(e)),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let dst = self.path("put", key)?;
        let tmp = self.stage(&dst, key, |f| io::Write::write_all(f, data))?;
        if let Err(e) = fs::rename(&tmp, &dst) {
            let _ = fs::remove_file(&tmp);
            return Err(self.err("rename into", key)(e));
        }
        self.sync_dir(&dst, key)
    }

    fn get(&self, key: &str, dst: &Path) -> Result<bool> {
        let Some(mut f) = self.open("get", key)? else {
            return Ok(false);
        };
        let mut out = File::create(dst).map_err(self.err("create local copy of", key))?;
        io::copy(&mut f, &mut out).map_err(self.err("read", key))?;
        Ok(true)
    }

    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let Some(f) = self.open("get_range", key)? else {
            return Ok(None);
        };
        // Positional reads of just the range (short only at the end of the file).
        let size = f.metadata().map_err(self.err("stat", key))?.len();
        let n = len.min(size.saturating_sub(off));
        let mut buf = vec![
            0u8;
            usize::try_from(n).map_err(|_| self.err("read", key)(
                io::Error::other("range too large")
            ))?
        ];
        let mut got = 0;
        while got < buf.len() {
            match std::os::unix::fs::FileExt::read_at(&f, &mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("read", key)(e)),
            }
        }
        buf.truncate(got);
        Ok(Some(buf))
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        let p = self.path("local_path", key).ok()?;
        p.is_file().then_some(p)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let p = self.path("delete", key)?;
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            // A directory is no key.
            Err(_) if p.is_dir() => Ok(()),
            Err(e) => Err(self.err("delete", key)(e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        check_key(&self.describe(), "list", prefix, true)?;
        // The prefix is a string prefix: walk from the directory of its last `/`, so that
        // `a` finds `ab` beside `a/`.
        let mut out = Vec::new();
        let mut stack = vec![match prefix.rfind('/') {
            Some(i) => self.root.join(&prefix[..i]),
            None => self.root.clone(),
        }];
        while let Some(d) = stack.pop() {
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(self.err("list", prefix)(e)),
            };
            for e in rd {
                let e = e.map_err(self.err("list", prefix))?;
                let p = e.path();
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    continue;
                }
                let m = match e.metadata() {
                    Ok(m) => m,
                    // Deleted while listing.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(self.err("list", prefix)(e)),
                };
                let Ok(rel) = p.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy();
                if m.is_dir() {
                    // Only directories that can hold keys under the prefix.
                    let dir = format!("{key}/");
                    if dir.starts_with(prefix) || prefix.starts_with(&dir) {
                        stack.push(p);
                    }
                } else if key.starts_with(prefix) {
                    let modified_ns = m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos() as u64);
                    out.push(Listed {
                        key: key.into_owned(),
                        size: m.len(),
                        modified_ns,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// True if `e` says the path (or a directory on it) does not exist.
fn is_missing(e: &io::Error) -> bool {
    // ENOTDIR: a key below a key (`a/b/c` where `a/b` is an object).
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large source on the replica's filesystem becomes the object itself (one inode, two
    /// names), under the same fence; a small one, or one on another filesystem, is copied.
    #[test]
    fn put_new_links_a_large_source_and_copies_others() {
        let d = tempfile::tempdir().unwrap();
        let r = FileReplica::new(d.path().join("r"));
        let big = d.path().join("big");
        fs::write(&big, vec![7u8; LINK_MIN as usize]).unwrap();
        r.put_new("a/big", &big).unwrap();
        let obj = d.path().join("r/a/big");
        assert_eq!(
            fs::metadata(&obj).unwrap().ino(),
            fs::metadata(&big).unwrap().ino()
        );
        assert_eq!(fs::metadata(&big).unwrap().nlink(), 2);

        let other = d.path().join("other");
        fs::write(&other, vec![8u8; LINK_MIN as usize]).unwrap();
        assert!(matches!(
            r.put_new("a/big", &other),
            Err(ReplicaError::Exists(_))
        ));
        assert_eq!(fs::read(&obj).unwrap(), vec![7u8; LINK_MIN as usize]);
        assert_eq!(fs::metadata(&other).unwrap().nlink(), 1);

        let small = d.path().join("small");
        fs::write(&small, b"small").unwrap();
        r.put_new("a/small", &small).unwrap();
        assert_eq!(fs::metadata(&small).unwrap().nlink(), 1);
        assert_eq!(fs::read(d.path().join("r/a/small")).unwrap(), b"small");

        // Another filesystem (a tmpfs, where there is one): copied.
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let far = shm.path().join("far");
        fs::write(&far, vec![9u8; LINK_MIN as usize]).unwrap();
        if fs::metadata(&far).unwrap().dev() != fs::metadata(d.path()).unwrap().dev() {
            r.put_new("a/far", &far).unwrap();
            assert_eq!(fs::metadata(&far).unwrap().nlink(), 1);
            assert_eq!(
                fs::read(d.path().join("r/a/far")).unwrap(),
                fs::read(&far).unwrap()
            );
        }
    }
}
