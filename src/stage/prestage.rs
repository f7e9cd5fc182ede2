//! A large transaction staged while the app is still writing it: its page entries go to a
//! file beside the log as its frames appear, and at the commit the record is finished in place
//! (pages the app rewrote since are patched, the header written) and the file joins the log
//! as a segment of its own ([`DbStage::adopt`]). The commit then costs no copy of its pages.
//!
//! Layout while it is open (`log/.prestage-<n>.tmp`, a name no reader of the log lists): 80 zero
//! bytes where the record header goes, then version-1 page entries (page number, page), in
//! the order the frames were written. Adopted, it is one whole record (docs/FORMAT.md) named
//! `<TXID>.seg`.
//!
//! Invariants:
//! - No reader sees the file before it is a whole record: it is renamed into the log only
//!   after its header and CRC are written, and a crash before that leaves a file the next
//!   open removes.
//! - Each page appears once: [`Prestaged::push`] refuses a page already there (the caller
//!   patches that entry instead).
//! - Durability is the log's: the adopted segment is synced with the rest by
//!   [`DbStage::sync`]. A crash before that leaves a torn tail, cut at open like any other.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::{io_err, lost_error, seg_name, Appender, DbStage, Result, StageError};
use crate::backing::WRITEBACK_STEP;
use crate::record::{RecordHeader, RECORD_HEADER};
use crate::sqlite::crc64;

/// Files of transactions staged ahead are named `<PREFIX><n>.tmp`.
pub(super) const PREFIX: &str = ".prestage-";

/// Makes the names unique within the process.
static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Removes what transactions staged ahead left in `logdir` (a crash, or an unmount, before
/// their commit).
pub(super) fn remove_leftovers(logdir: &std::path::Path) -> Result<()> {
    for e in fs::read_dir(logdir).map_err(io_err(logdir))? {
        let e = e.map_err(io_err(logdir))?;
        if e.file_name().to_string_lossy().starts_with(PREFIX) {
            fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
        }
    }
    Ok(())
}

/// Entries gathered in memory before one write to the file.
const GATHER: usize = 1 << 20;

/// A transaction's page entries staged ahead of its commit (see the module doc). Dropped
/// without [`DbStage::adopt`], its file is removed.
pub struct Prestaged {
    path: PathBuf,
    file: File,
    page_size: u32,
    /// Bytes on file (the header's place included).
    len: u64,
    /// Entries not written yet.
    gathered: Vec<u8>,
    /// (page number, CRC of the page) of each entry, in order.
    entries: Vec<(u32, u64)>,
    at: HashMap<u32, usize>,
    /// CRC-64 of the entries, while no entry was patched.
    body_crc: Option<crc_fast::Digest>,
    kicked: u64,
    adopted: bool,
}

impl Drop for Prestaged {
    fn drop(&mut self) {
        if !self.adopted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Prestaged {
    /// The entries so far: (page number, CRC of the page), in order.
    pub fn entries(&self) -> &[(u32, u64)] {
        &self.entries
    }

    /// Index of page `pgno`'s entry, if it has one.
    pub fn entry_of(&self, pgno: u32) -> Option<usize> {
        self.at.get(&pgno).copied()
    }

    /// Appends an entry for `pgno` (none may exist yet) whose page has CRC `crc`
    /// ([`crate::sqlite::page_crc`]).
    pub fn push(&mut self, pgno: u32, page: &[u8], crc: u64) -> Result<()> {
        if page.len() != self.page_size as usize || self.at.contains_key(&pgno) {
            return Err(StageError::Damaged(format!(
                "page {pgno} given twice, or at the wrong size, to a transaction staged ahead"
            )));
        }
        self.at.insert(pgno, self.entries.len());
        self.entries.push((pgno, crc));
        let start = self.gathered.len();
        self.gathered.extend_from_slice(&pgno.to_be_bytes());
        self.gathered.extend_from_slice(page);
        if let Some(d) = self.body_crc.as_mut() {
            d.update(&self.gathered[start..]);
        }
        if self.gathered.len() >= GATHER {
            self.write_out()?;
        }
        Ok(())
    }

    /// Replaces the page of entry `i` (its page number stays).
    pub fn patch(&mut self, i: usize, page: &[u8], crc: u64) -> Result<()> {
        if page.len() != self.page_size as usize || i >= self.entries.len() {
            return Err(StageError::Damaged(
                "a patch outside the staged entries".into(),
            ));
        }
        self.write_out()?;
        let entry = 4 + self.page_size as u64;
        let off = RECORD_HEADER as u64 + i as u64 * entry + 4;
        self.file
            .write_all_at(page, off)
            .map_err(io_err(&self.path))?;
        self.entries[i].1 = crc;
        self.body_crc = None;
        Ok(())
    }

    fn write_out(&mut self) -> Result<()> {
        if self.gathered.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.gathered, self.len)
            .map_err(io_err(&self.path))?;
        self.len += self.gathered.len() as u64;
        self.gathered.clear();
        if self.len >= self.kicked + WRITEBACK_STEP {
            crate::backing::start_writeback(&self.file, self.kicked, self.len - self.kicked);
            self.kicked = self.len;
        }
        Ok(())
    }

    /// CRC-64 of the entries as they are on file.
    fn body_crc(&mut self) -> Result<u64> {
        self.write_out()?;
        if let Some(d) = self.body_crc.take() {
            return Ok(d.finalize());
        }
        let mut d = crc64();
        let mut buf = vec![0u8; GATHER];
        let mut off = RECORD_HEADER as u64;
        while off < self.len {
            let n = ((self.len - off) as usize).min(buf.len());
            self.file
                .read_exact_at(&mut buf[..n], off)
                .map_err(io_err(&self.path))?;
            d.update(&buf[..n]);
            off += n as u64;
        }
        Ok(d.finalize())
    }
}

impl DbStage {
    /// Starts staging a transaction of `page_size`-byte pages ahead of its commit.
    pub fn prestage(&self, page_size: u32) -> Result<Prestaged> {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join("log").join(format!("{PREFIX}{n}.tmp"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all_at(&[0u8; RECORD_HEADER], 0)
            .map_err(io_err(&path))?;
        Ok(Prestaged {
            path,
            file,
            page_size,
            len: RECORD_HEADER as u64,
            gathered: Vec::with_capacity(GATHER + 4 + page_size as usize),
            entries: Vec::new(),
            at: HashMap::new(),
            body_crc: Some(crc64()),
            kicked: 0,
            adopted: false,
        })
    }

    /// Finishes `p` as the record `h` (the next TXID of this log; its entries are exactly
    /// the pages `h` promises) and appends it to the log as a segment of its own. Records
    /// gathered before it are written and synced first. Not durable until
    /// [`DbStage::sync`]. On error nothing was appended.
    pub fn adopt(&self, mut p: Prestaged, h: &RecordHeader) -> Result<()> {
        if h.coded.is_some() || h.page_size != p.page_size || h.npages as usize != p.entries.len() {
            return Err(StageError::Damaged(format!(
                "TXID {}: the record does not match the transaction staged ahead",
                h.txid
            )));
        }
        let body = p.body_crc()?;
        let head = h.encode();
        let mut d = crc64();
        d.update(&head);
        let crc = crc_fast::checksum_combine(
            crc_fast::CrcAlgorithm::Crc64Xz,
            d.finalize(),
            body,
            p.len - RECORD_HEADER as u64,
        );
        p.file.write_all_at(&head, 0).map_err(io_err(&p.path))?;
        p.file
            .write_all_at(&crc.to_be_bytes(), p.len)
            .map_err(io_err(&p.path))?;
        let len = p.len + 8;
        debug_assert_eq!(len, h.len());
        let mut guard = self.app.lock();
        if let Some(a) = guard.as_mut() {
            if a.lost {
                return Err(lost_error(&a.path));
            }
            self.flush_locked(a)?;
            if a.dirty {
                a.file.sync_data().map_err(io_err(&a.path))?;
                a.dirty = false;
            }
        }
        let logdir = self.dir.join("log");
        let path = logdir.join(seg_name(h.txid));
        if path.exists() {
            return Err(StageError::Damaged(format!(
                "a segment for TXID {} exists already",
                h.txid
            )));
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&p.path)
            .map_err(io_err(&p.path))?;
        fs::rename(&p.path, &path).map_err(io_err(&path))?;
        if let Err(e) = File::open(&logdir).and_then(|d| d.sync_all()) {
            // Not named for sure: taken back, as if never appended.
            let _ = fs::rename(&path, &p.path);
            return Err(io_err(&logdir)(e));
        }
        p.adopted = true;
        *guard = Some(Appender {
            file,
            path,
            len,
            dirty: true,
            kicked: p.kicked,
            pending: Vec::new(),
            pending_last: None,
            lost: false,
            uncut: false,
            bases: Default::default(),
        });
        *self.last.lock() = Some(*h);
        self.appended();
        Ok(())
    }
}
