//! Following one database's WAL file as it is written: which frames are committed, where the
//! newest committed copy of each page lives, and which transactions just completed.
//!
//! Invariants:
//! - `committed_end` is the byte offset just past the last commit frame whose whole chain from
//!   the header validates (salts and cumulative checksums); `cksum` is the running checksum there.
//! - `pending` holds validated frames after `committed_end`; a write landing inside them (SQLite
//!   rewrites frames of the open transaction in place, then re-checksums) cuts `pending` back to
//!   the frame it touched, and validation resumes from there. Each frame is validated once per
//!   rewrite, so a transaction costs time linear in its size.
//! - `index` maps a page to the offset of its newest committed frame in this WAL generation.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::sqlite::{Frame, WalHeader, FRAME_HEADER, WAL_HEADER};

#[derive(Clone, Copy, Debug)]
struct Pending {
    off: u64,
    pgno: u32,
    commit: u32,
    /// Running checksum before this frame.
    cksum_before: (u32, u32),
}

/// A completed transaction found in the WAL: its frames (offset, pgno) in write order.
#[derive(Debug)]
pub struct WalTxn {
    pub frames: Vec<(u64, u32)>,
    /// Database size in pages after it.
    pub db_pages: u32,
    /// Offset just past its commit frame, and the running checksum there.
    pub end: u64,
    pub cksum: (u32, u32),
}

#[derive(Debug)]
pub struct WalTrack {
    pub hdr: WalHeader,
    pub committed_end: u64,
    pub cksum: (u32, u32),
    pending: Vec<Pending>,
    /// Running checksum after the last pending frame.
    pending_after: (u32, u32),
    pub index: HashMap<u32, u64>,
    /// (pgno, offset) of the last commit frame, to recognise padding copies of it.
    pub last_commit: Option<(u32, u64)>,
    /// Database size in pages after the last committed transaction of this generation.
    pub db_pages: Option<u32>,
}

/// Reads exactly `buf.len()` bytes at `off`; `Ok(false)` if the file is shorter.
pub fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<bool> {
    match f.read_exact_at(buf, off) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl WalTrack {
    pub fn new(hdr: WalHeader) -> WalTrack {
        WalTrack {
            hdr,
            committed_end: WAL_HEADER,
            cksum: hdr.cksum,
            pending: Vec::new(),
            pending_after: hdr.cksum,
            index: HashMap::new(),
            last_commit: None,
            db_pages: None,
        }
    }

    /// Reads the header of `wal`; `None` if the file is shorter than a header or invalid.
    pub fn read_header(wal: &File) -> io::Result<Option<WalHeader>> {
        let mut b = [0u8; 32];
        Ok(if read_exact_at(wal, &mut b, 0)? {
            WalHeader::parse(&b)
        } else {
            None
        })
    }

    fn pending_end(&self) -> (u64, (u32, u32)) {
        match self.pending.last() {
            None => (self.committed_end, self.cksum),
            Some(p) => (p.off + self.hdr.frame_size(), self.pending_after),
        }
    }

    /// A write starting at `off` happened: forget validation of any pending frame it
    /// touched, so it is checked again.
    pub fn note_write(&mut self, off: u64) {
        if off < self.committed_end {
            // A write below the committed end without a new header: SQLite never does this
            // while the generation lives; the header rewrite that starts a new generation is
            // handled by the caller.
            return;
        }
        if let Some(i) = self
            .pending
            .iter()
            .position(|p| off < p.off + self.hdr.frame_size())
        {
            self.pending_after = self.pending[i].cksum_before;
            self.pending.truncate(i);
        }
    }

    /// Validates frames after the pending ones as far as they go and returns every transaction
    /// completed by a valid commit frame, oldest first. `index`/`committed_end` are updated.
    pub fn advance(&mut self, wal: &File) -> io::Result<Vec<WalTxn>> {
        let mut out = Vec::new();
        while let Some(t) = self.advance_one(wal)? {
            out.push(t);
        }
        Ok(out)
    }

    /// Records a captured transaction's frames as the newest committed copies of their pages.
    pub fn publish(&mut self, t: &WalTxn) {
        for &(off, pgno) in &t.frames {
            self.index.insert(pgno, off);
        }
        if let Some(&(off, pgno)) = t.frames.last() {
            self.last_commit = Some((pgno, off));
        }
        self.db_pages = Some(t.db_pages);
    }

    /// Positions the tracker right after a commit whose offset and checksum were recorded
    /// earlier, rebuilding the index from the frames before it. `false` if the WAL's chain does
    /// not pass through that point (the WAL changed behind sqlfs's back).
    pub fn seek_to(&mut self, wal: &File, end: u64, cksum: (u32, u32)) -> io::Result<bool> {
        while self.committed_end < end {
            match self.advance_one(wal)? {
                Some(t) => self.publish(&t),
                None => break,
            }
        }
        Ok(self.committed_end == end && self.cksum == cksum)
    }

    fn advance_one(&mut self, wal: &File) -> io::Result<Option<WalTxn>> {
        let fs = self.hdr.frame_size();
        let mut buf = vec![0u8; fs as usize];
        loop {
            let (off, ck) = self.pending_end();
            if !read_exact_at(wal, &mut buf, off)? {
                return Ok(None);
            }
            let Some((Frame { pgno, commit }, after)) = self.hdr.check_frame(
                &buf[..FRAME_HEADER as usize],
                &buf[FRAME_HEADER as usize..],
                ck,
            ) else {
                return Ok(None);
            };
            self.pending.push(Pending {
                off,
                pgno,
                commit,
                cksum_before: ck,
            });
            self.pending_after = after;
            if commit != 0 {
                let frames: Vec<(u64, u32)> =
                    self.pending.iter().map(|p| (p.off, p.pgno)).collect();
                self.pending.clear();
                self.committed_end = off + fs;
                self.cksum = after;
                return Ok(Some(WalTxn {
                    frames,
                    db_pages: commit,
                    end: off + fs,
                    cksum: after,
                }));
            }
        }
    }
}
