//! The pack: local copies of small level-0 objects, appended to one file per database and
//! replica (`objects.<replica>/l0.pack`) instead of a file each.
//!
//! Compaction merges level-0 objects from local copies, so every shipment leaves one. As a
//! file of its own, each copy cost an inode created at the shipment and deleted at the
//! merge; with a thousand databases shipping every second that was the largest cost a
//! shipper had, and on a filesystem that skips recently freed inodes it grew with every file
//! deleted nearby. A copy of at most [`PACK_OBJECT_MAX`] bytes is appended to the pack
//! instead (one write to a file that already exists), and the object is built in the same
//! outbox file every time (`ship_db`). Larger objects keep a file of their own.
//!
//! Layout: objects back to back, each exactly as stored (header first, trailing CRC-64 last,
//! docs/FORMAT.md), nothing between them. The index (first TXID → offset, length; the key is
//! the database's level-0 key for that TXID) is kept in memory and rebuilt from the file when
//! the database first ships in a process: each object's header gives its length and TXIDs.
//!
//! Invariants:
//! - An object is appended only after the replica stored it as built (never an attempt the
//!   replica answered with other bytes): an entry holds what its key holds on the replica.
//! - The pack is not synced, as no local copy is: compaction verifies an entry (its CRC, and
//!   that its TXIDs are the catalog's) before merging it, and fetches the object from the
//!   replica otherwise. Rebuilding the index stops at the first object that does not verify
//!   and cuts the file there (a crash during an append).
//! - Once every entry is merged (or removed by retention) the file is emptied; it grows to at
//!   most [`PACK_MAX`] bytes between two compactions, and copies past that get files.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::Shipper;
use crate::capture::Db;
use crate::catalog::l0_first;
use crate::segment::{self, ObjHeader, ObjKind, Slice, HEADER};

/// Largest object whose local copy goes to the pack.
pub(super) const PACK_OBJECT_MAX: u64 = 256 << 10;
/// Largest pack: copies that would take it past this get files of their own.
pub(super) const PACK_MAX: u64 = 64 << 20;

/// The index of one database's pack.
#[derive(Default)]
pub(super) struct Pack {
    /// (first TXID, offset, length) of each object, in TXID order (appends come in that
    /// order): the key is the database's level-0 key for that TXID. 24 bytes an entry, no
    /// key text kept: thousands of databases each keep one.
    entries: Vec<(u64, u64, u64)>,
    /// Where the next object goes (the file's length as this process wrote it).
    end: u64,
}

impl Pack {
    /// Indexes the pack at `path` (none yet: an empty one), cutting off a
    /// torn or damaged tail.
    pub(super) fn load(path: &Path) -> Pack {
        let mut p = Pack::default();
        let Ok(f) = File::open(path) else {
            return p;
        };
        let len = f.metadata().map_or(0, |m| m.len());
        while let Some((hdr, n)) = object_at(&f, p.end, len) {
            if hdr.kind == ObjKind::Segment && hdr.level == 0 {
                p.insert(hdr.first_txid, p.end, n);
            }
            p.end += n;
        }
        if p.end < len {
            log::debug!(
                "{}: cutting the pack at byte {} of {len} (an object there does not verify)",
                path.display(),
                p.end
            );
            let _ = OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(p.end));
        }
        p
    }

    fn find(&self, first: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&first, |e| e.0)
    }

    fn insert(&mut self, first: u64, off: u64, len: u64) {
        match self.find(first) {
            Ok(i) => self.entries[i] = (first, off, len),
            Err(i) => self.entries.insert(i, (first, off, len)),
        }
    }

    /// Where the object of level-0 key `key` is: (offset, length).
    fn get(&self, key: &str) -> Option<(u64, u64)> {
        let i = self.find(l0_first(key)?).ok()?;
        let (_, off, len) = self.entries[i];
        Some((off, len))
    }

    fn remove(&mut self, key: &str) -> bool {
        match l0_first(key).map(|f| self.find(f)) {
            Some(Ok(i)) => {
                self.entries.remove(i);
                true
            }
            _ => false,
        }
    }
}

/// The whole, verified object at `off` of `f` (which is `len` bytes long) and its length.
fn object_at(f: &File, off: u64, len: u64) -> Option<(ObjHeader, u64)> {
    if off + HEADER as u64 + 8 > len {
        return None;
    }
    let mut head = [0u8; HEADER];
    f.read_exact_at(&mut head, off).ok()?;
    let hdr = ObjHeader::decode(&head, "pack").ok()?;
    let n = hdr.index_off.checked_add(hdr.index_len)?.checked_add(8)?;
    if n > len - off {
        return None;
    }
    let v = segment::verify(Slice::new(f, off, n), "pack").ok()?;
    Some((v, n))
}

impl Shipper {
    /// `db`'s pack file for this replica.
    pub(super) fn pack_path(&self, db: &Db) -> PathBuf {
        self.objects_dir(db).join("l0.pack")
    }

    /// Appends the object in `local` (`size` bytes, stored as `key`; `bytes`: the same bytes,
    /// if the caller has them in memory) to `db`'s pack; false if it does not belong there
    /// (too large, the pack full) or cannot be written.
    pub(super) fn pack_copy(
        &self,
        db: &Db,
        key: &str,
        local: &Path,
        size: u64,
        bytes: Option<&[u8]>,
    ) -> bool {
        if size > PACK_OBJECT_MAX || size < HEADER as u64 + 8 {
            return false;
        }
        // One worker runs a database at a time: nothing else appends to this pack meanwhile,
        // and the shared lock is not held across the file's I/O.
        let Some(at) = self.maint.lock().get(&db.id).map(|m| m.pack.end) else {
            return false;
        };
        if at + size > PACK_MAX {
            return false;
        }
        let path = self.pack_path(db);
        let bytes: std::borrow::Cow<[u8]> = match bytes {
            Some(b) => b.into(),
            None => match fs::read(local) {
                Ok(b) => b.into(),
                Err(e) => {
                    log::debug!("cannot keep a local copy of {key}: {e}");
                    return false;
                }
            },
        };
        let res = (|| -> std::io::Result<u64> {
            let f = match OpenOptions::new().write(true).open(&path) {
                Ok(f) => f,
                Err(_) => {
                    fs::create_dir_all(self.objects_dir(db))?;
                    OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&path)?
                }
            };
            f.write_all_at(&bytes, at)?;
            Ok(bytes.len() as u64)
        })();
        match res {
            Ok(n) => match self.maint.lock().get_mut(&db.id) {
                Some(m) => {
                    let Some(first) = l0_first(key) else {
                        return false;
                    };
                    m.pack.insert(first, at, n);
                    m.pack.end = at + n;
                    true
                }
                None => false,
            },
            Err(e) => {
                log::debug!("cannot keep a local copy of {key} in the pack: {e}");
                false
            }
        }
    }

    /// Where `db`'s pack holds a copy of `key`: (offset, length).
    pub(super) fn packed(&self, db: &Db, key: &str) -> Option<(u64, u64)> {
        let g = self.maint.lock();
        g.get(&db.id)?.pack.get(key)
    }

    /// Forgets the copies of `keys` (merged, removed from the replica, damaged); the file is
    /// emptied once it holds none.
    pub(super) fn unpack<'a>(&self, db: &Db, keys: impl IntoIterator<Item = &'a str>) {
        let mut g = self.maint.lock();
        let Some(m) = g.get_mut(&db.id) else {
            return;
        };
        let mut any = false;
        for k in keys {
            any |= m.pack.remove(k);
        }
        if any && m.pack.entries.is_empty() {
            m.pack.end = 0;
            if let Ok(f) = OpenOptions::new().write(true).open(self.pack_path(db)) {
                let _ = f.set_len(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::l0_key;
    use crate::compact::{merge, Input};
    use crate::record::{Kind, RecordHeader};
    use crate::segment::ObjectWriter;
    use std::io::{Read, Seek, SeekFrom};

    const ID: &str = "00000000000000ab";

    /// The bytes of a level-0 object holding TXIDs `txids`.
    fn object(txids: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let mut w =
            ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Segment, 0, ID).unwrap();
        for t in txids {
            let h = RecordHeader {
                db_pages: 4,
                ..RecordHeader::test(Kind::Txn, t, 512, 2)
            };
            w.add(&h, |emit| {
                (1..=2).try_for_each(|p| emit(p, &[(t as u8).wrapping_mul(p as u8); 512]))
            })
            .unwrap();
        }
        let (_, mut f) = w.finish().unwrap();
        let mut b = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut b).unwrap();
        b
    }

    /// A pack is indexed from its objects' headers; a torn last object is cut off; objects
    /// merged from the pack give the same compacted object as from files of their own.
    #[test]
    fn a_pack_is_indexed_cut_and_merged_in_place() {
        let d = tempfile::tempdir().unwrap();
        let objs = [object(1..=2), object(3..=3), object(4..=6)];
        let path = d.path().join("l0.pack");
        let mut bytes: Vec<u8> = objs.concat();
        let whole = bytes.len() as u64;
        let torn = object(7..=7);
        bytes.extend_from_slice(&torn[..torn.len() / 2]);
        fs::write(&path, &bytes).unwrap();

        let p = Pack::load(&path);
        assert_eq!(p.end, whole);
        assert_eq!(fs::metadata(&path).unwrap().len(), whole);
        let mut at = 0;
        for (o, first) in objs.iter().zip([1u64, 3, 4]) {
            assert_eq!(p.get(&l0_key(ID, first)), Some((at, o.len() as u64)));
            at += o.len() as u64;
        }
        assert_eq!(p.entries.len(), 3);
        assert_eq!(p.get(&l0_key(ID, 2)), None);
        assert_eq!(
            p.get("00000000000000ab/l1/0000000000000001-0000000000000002.seg"),
            None
        );

        // A damaged byte in the middle object: the index stops before it.
        let mut bad = objs.concat();
        let mid = objs[0].len() + objs[1].len() / 2;
        bad[mid] ^= 0xff;
        let badpath = d.path().join("bad.pack");
        fs::write(&badpath, &bad).unwrap();
        let b = Pack::load(&badpath);
        assert_eq!((b.entries.len(), b.end), (1, objs[0].len() as u64));

        // Merged in place, and from files.
        let mut files = Vec::new();
        for (i, o) in objs.iter().enumerate() {
            let f = d.path().join(format!("o{i}"));
            fs::write(&f, o).unwrap();
            files.push(f);
        }
        let run = |inputs: &[Input<'_>], out: &str| {
            let out = d.path().join(out);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&out)
                .unwrap();
            let h = merge(inputs, 1, ID, f, &d.path().join("pages")).unwrap();
            (h, fs::read(&out).unwrap())
        };
        let from_pack: Vec<Input<'_>> = [1u64, 3, 4]
            .iter()
            .map(|&first| {
                let key = l0_key(ID, first);
                Input {
                    range: p.get(&key),
                    key,
                    path: &path,
                }
            })
            .collect();
        let from_files: Vec<Input<'_>> = files
            .iter()
            .zip([1u64, 3, 4])
            .map(|(f, first)| Input {
                key: l0_key(ID, first),
                path: f,
                range: None,
            })
            .collect();
        let (ha, a) = run(&from_pack, "a");
        let (hb, b) = run(&from_files, "b");
        assert_eq!((ha.first_txid, ha.last_txid), (1, 6));
        assert_eq!(ha, hb);
        assert_eq!(a, b);
    }
}
