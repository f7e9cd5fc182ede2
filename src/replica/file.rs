//! A replica in a local directory (a second disk, an NFS mount).
//!
//! Invariant: an object appears under its key complete or not at all (written to a temporary
//! name, fsynced, then hard-linked into place — the link fails if the key exists, which is the
//! fence — and the directory fsynced).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::{Listed, ReplicaClient, ReplicaError, Result};

pub struct FileReplica {
    root: PathBuf,
}

impl FileReplica {
    pub fn new(root: PathBuf) -> FileReplica {
        FileReplica { root }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
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
    fn stage(&self, key: &str, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<PathBuf> {
        let dst = self.path(key);
        let dir = dst.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(self.err("create directory for", key))?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
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

    fn sync_dir(&self, key: &str) -> Result<()> {
        let dst = self.path(key);
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
        let tmp = self.stage(key, |f| io::copy(&mut File::open(src)?, f).map(|_| ()))?;
        let res = fs::hard_link(&tmp, self.path(key));
        let _ = fs::remove_file(&tmp);
        match res {
            Ok(()) => self.sync_dir(key),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(ReplicaError::Exists(key.to_string()))
            }
            Err(e) => Err(self.err("link", key)(e)),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let tmp = self.stage(key, |f| io::Write::write_all(f, data))?;
        fs::rename(&tmp, self.path(key)).map_err(self.err("rename into", key))?;
        self.sync_dir(key)
    }

    fn get(&self, key: &str, dst: &Path) -> Result<bool> {
        match File::open(self.path(key)) {
            Ok(mut f) => {
                let mut out = File::create(dst).map_err(self.err("create local copy of", key))?;
                io::copy(&mut f, &mut out).map_err(self.err("read", key))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err("open", key)(e)),
        }
    }

    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let f = match File::open(self.path(key)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err("open", key)(e)),
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
        let p = self.path(key);
        p.is_file().then_some(p)
    }

    fn delete(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.path(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("delete", key)(e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let start = self.path(prefix);
        let mut stack = vec![if start.is_dir() {
            start
        } else {
            start
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| self.root.clone())
        }];
        while let Some(d) = stack.pop() {
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err("list", prefix)(e)),
            };
            for e in rd.flatten() {
                let p = e.path();
                let name = e.file_name();
                if name.to_string_lossy().starts_with(".tmp-") {
                    continue;
                }
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&self.root) {
                    let key = rel.to_string_lossy().into_owned();
                    if key.starts_with(prefix) {
                        let modified_ns = m
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_nanos() as u64);
                        out.push(Listed {
                            key,
                            size: m.len(),
                            modified_ns,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}
