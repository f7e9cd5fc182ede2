//! Spare files: the files a shipper keeps objects in are reused, not created and deleted.
//!
//! A local copy compaction merges is, for a small level-0 object, an entry in the database's
//! pack (`pack.rs`); a larger object, or one the pack has no room for, becomes a file of its
//! own, which compaction deletes once merged. With thousands of databases shipping every
//! second, creating and deleting inodes that fast cost the filesystem more CPU than anything
//! else a shipper did (an inode allocator that skips recently deleted inodes scans far). So a
//! file that is no longer needed (a merged local copy, an object that was not kept) is emptied
//! and renamed to `objects.<replica>/spare.<n>`, and an object is built in a spare renamed into
//! place when the shipment's outbox file is gone (it became a local copy): a rename and a
//! truncation instead of a create and a delete. At most [`MAX_SPARES`] are kept per database
//! (about one compaction run's worth); spares left by an earlier mount are found again when the
//! database first ships.
//!
//! A spare holds nothing: it is truncated before it is renamed, and truncated again when
//! reused (a crash between the two leaves a file whose bytes nothing reads).
//!
//! A file with more than one link is never written in place, reused or made a spare: a
//! replica on this filesystem keeps a large object as a link to the shipper's own file
//! (`ReplicaClient::put_new`), so writing that file would change the replica's object. Such
//! a file is deleted when it is no longer needed, and the next object is built in another.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{outbox, Shipper};
use crate::capture::Db;

/// Spares kept per database and replica.
pub(super) const MAX_SPARES: usize = 32;

impl Shipper {
    fn spare_path(&self, db: &Db, n: u32) -> PathBuf {
        self.objects_dir(db).join(format!("spare.{n}"))
    }

    /// The numbers of the spares an earlier mount left for `db` (one listing, when the
    /// database first ships in this process).
    pub(super) fn find_spares(&self, db: &Db) -> Vec<u32> {
        let Ok(rd) = fs::read_dir(self.objects_dir(db)) else {
            return Vec::new();
        };
        let mut found: Vec<u32> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("spare.")?.parse().ok())
            .collect();
        found.sort_unstable();
        found.truncate(MAX_SPARES);
        found
    }

    /// Opens `tmp` to build an object in (`ObjectWriter` writes from its start and cuts
    /// what is left past the object): the file already there (a shipment's outbox is kept,
    /// with the bytes of the last object if it was small), else a spare of `db`'s renamed into
    /// place, else a new file.
    pub(super) fn fresh_file(&self, db: &Db, tmp: &Path) -> io::Result<fs::File> {
        match OpenOptions::new().read(true).write(true).open(tmp) {
            Ok(f) if !shared(&f) => return Ok(f),
            // The last object built here is a local replica's now: build in another file.
            Ok(_) => fs::remove_file(tmp)?,
            Err(_) => {}
        }
        let spare = self
            .maint
            .lock()
            .get_mut(&db.id)
            .and_then(|m| m.spares.pop());
        if let Some(n) = spare {
            // A spare that cannot be renamed (gone) just means a new file.
            let _ = fs::rename(self.spare_path(db, n), tmp);
        }
        outbox(tmp)
    }

    /// `path` (a file of `db`'s staging this shipper no longer needs) becomes a spare, or is
    /// deleted if `db` has enough of them.
    pub(super) fn recycle(&self, db: &Db, path: &Path) {
        let n = {
            let mut g = self.maint.lock();
            match g.get_mut(&db.id) {
                Some(m) if m.spares.len() < MAX_SPARES => {
                    // The lowest number not in use.
                    let n = (0..).find(|n| !m.spares.contains(n)).unwrap_or(0);
                    m.spares.push(n);
                    Some(n)
                }
                _ => None,
            }
        };
        let kept = n.is_some_and(|n| {
            let dir = self.objects_dir(db);
            let _ = fs::create_dir_all(&dir);
            empty_own(path)
                .and_then(|()| fs::rename(path, self.spare_path(db, n)))
                .is_ok()
        });
        if !kept {
            if let (Some(n), Some(m)) = (n, self.maint.lock().get_mut(&db.id)) {
                m.spares.retain(|&s| s != n);
            }
            let _ = fs::remove_file(path);
        }
    }
}

/// True if `f` has other names: a local replica keeps it as an object (see the module's
/// doc). Such a file is never written in place.
pub(super) fn shared(f: &fs::File) -> bool {
    f.metadata().is_ok_and(|m| m.nlink() > 1)
}

/// Truncates the file at `path` to nothing, unless it is [`shared`] (an error then: the
/// caller deletes it instead).
pub(super) fn empty_own(path: &Path) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    if shared(&f) {
        return Err(io::Error::other("a replica's object too"));
    }
    f.set_len(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with a second name (a local replica's object) is never emptied in place.
    #[test]
    fn a_shared_file_is_not_emptied() {
        let d = tempfile::tempdir().unwrap();
        let (own, other) = (d.path().join("own"), d.path().join("other"));
        fs::write(&own, b"object").unwrap();
        assert!(!shared(&fs::File::open(&own).unwrap()));
        fs::hard_link(&own, &other).unwrap();
        assert!(shared(&fs::File::open(&own).unwrap()));
        assert!(empty_own(&own).is_err());
        assert_eq!(fs::read(&other).unwrap(), b"object");
        fs::remove_file(&other).unwrap();
        empty_own(&own).unwrap();
        assert_eq!(fs::metadata(&own).unwrap().len(), 0);
    }
}
