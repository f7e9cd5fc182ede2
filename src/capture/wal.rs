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

use crate::sqlite::{page_crc, Frame, WalHeader, FRAME_HEADER, WAL_HEADER};

/// Page bytes kept in memory for frames of the open transaction, beyond which they are read
/// back from the WAL at commit.
const PENDING_BYTES: usize = 4 << 20;

#[derive(Clone, Debug)]
struct Pending {
    off: u64,
    pgno: u32,
    /// Running checksum before this frame.
    cksum_before: (u32, u32),
    page: Option<Vec<u8>>,
}

/// One frame of a completed transaction.
#[derive(Debug)]
pub struct WalFrame {
    pub off: u64,
    pub pgno: u32,
    /// The page, if it was kept from the write; else read it at `off + FRAME_HEADER`.
    pub page: Option<Vec<u8>>,
}

/// A completed transaction found in the WAL: its frames in write order.
#[derive(Debug)]
pub struct WalTxn {
    pub frames: Vec<WalFrame>,
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
    pending_bytes: usize,
    /// Running checksum after the last pending frame.
    pending_after: (u32, u32),
    /// The last 24-byte write: SQLite writes a frame header, then its page.
    hint_hdr: Option<(u64, [u8; 24])>,
    /// Newest committed frame of each page: (offset, CRC of the page for the rolling checksum).
    pub index: HashMap<u32, (u64, u64)>,
    /// (pgno, offset) of the last commit frame, to recognise padding copies of it.
    pub last_commit: Option<(u32, u64)>,
    /// Database size in pages after the last committed transaction of this generation.
    pub db_pages: Option<u32>,
    /// Offset up to which writeback of the WAL file was started (see [`WalTrack::kick`]).
    kicked: u64,
}

/// Reads a WAL ahead in large pieces, for one pass over frames that follow each other.
/// Bytes at or below a published end never change; later bytes are validated by checksum
/// like any read, so serving them from a copy taken a moment earlier is no different.
struct Ahead<'a> {
    f: &'a File,
    /// Nothing past this offset is read ahead (`u64::MAX`: no read-ahead at all, for the
    /// write path, which reads one frame per call).
    limit: u64,
    start: u64,
    buf: Vec<u8>,
}

/// Bytes read at once by [`Ahead`].
const AHEAD: usize = 1 << 20;

impl<'a> Ahead<'a> {
    fn new(f: &'a File, limit: u64) -> Ahead<'a> {
        Ahead {
            f,
            limit,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// Like [`read_exact_at`].
    fn read(&mut self, out: &mut [u8], off: u64) -> io::Result<bool> {
        let end = off + out.len() as u64;
        if off < self.start || end > self.start + self.buf.len() as u64 {
            let want = if self.limit == u64::MAX {
                out.len()
            } else {
                (self.limit.saturating_sub(off) as usize).clamp(out.len(), AHEAD.max(out.len()))
            };
            self.buf.resize(want, 0);
            let mut got = 0;
            while got < self.buf.len() {
                match self.f.read_at(&mut self.buf[got..], off + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.buf.truncate(got);
            self.start = off;
            if got < out.len() {
                return Ok(false);
            }
        }
        let at = (off - self.start) as usize;
        out.copy_from_slice(&self.buf[at..at + out.len()]);
        Ok(true)
    }
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
    /// Starts writeback of the committed frames not yet started, once there are enough of
    /// them. The app syncs its WAL before every checkpoint; with the frames already on their
    /// way, that sync (which the checkpoint, and the commit that runs it, waits for) finds
    /// little left to write. A hint only: nothing depends on it.
    pub fn kick(&mut self, wal: &File) {
        if self.committed_end >= self.kicked + crate::backing::WRITEBACK_STEP {
            crate::backing::start_writeback(wal, self.kicked, self.committed_end - self.kicked);
            self.kicked = self.committed_end;
        }
    }

    pub fn new(hdr: WalHeader) -> WalTrack {
        WalTrack {
            hdr,
            committed_end: WAL_HEADER,
            cksum: hdr.cksum,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_after: hdr.cksum,
            hint_hdr: None,
            index: HashMap::new(),
            last_commit: None,
            db_pages: None,
            kicked: 0,
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

    /// A write of `data` at `off` happened: forget validation of any pending frame it
    /// touched, so it is checked again, and remember a frame header for the page that follows.
    pub fn note_write(&mut self, off: u64, data: &[u8]) {
        if data.len() == FRAME_HEADER as usize {
            let mut h = [0u8; 24];
            h.copy_from_slice(data);
            self.hint_hdr = Some((off, h));
        } else if self
            .hint_hdr
            .is_some_and(|(o, _)| off < o + FRAME_HEADER && o < off + data.len() as u64)
        {
            self.hint_hdr = None;
        }
        if off < self.committed_end {
            // Below the committed end without a new header: SQLite never does this while a
            // generation lives; the header rewrite that starts a new one is handled by the caller.
            return;
        }
        if let Some(i) = self
            .pending
            .iter()
            .position(|p| off < p.off + self.hdr.frame_size())
        {
            self.pending_after = self.pending[i].cksum_before;
            for p in self.pending.drain(i..) {
                self.pending_bytes -= p.page.map_or(0, |v| v.len());
            }
        }
    }

    /// Validates frames after the pending ones as far as they go, but not past byte `limit`,
    /// and returns every transaction completed by a valid commit frame, oldest first. `hint`
    /// is the write just made (its bytes spare a read-back). Call [`WalTrack::publish`] for
    /// each, in order.
    pub fn advance(
        &mut self,
        wal: &File,
        hint: Option<(u64, &[u8])>,
        limit: u64,
    ) -> io::Result<Vec<WalTxn>> {
        let mut out = Vec::new();
        let mut rd = Ahead::new(wal, limit);
        while let Some(t) = self.advance_one_with(&mut rd, hint, limit)? {
            out.push(t);
        }
        Ok(out)
    }

    /// Byte offset just past frame number `frame` (1-based) of this WAL.
    pub fn end_of(&self, frame: u32) -> u64 {
        WAL_HEADER + frame as u64 * self.hdr.frame_size()
    }

    /// Forgets the frames validated after the last commit: without seeing the writes, a
    /// rewrite of them (the writer's own, or another writer's after it died) goes unnoticed,
    /// so they are validated afresh each time.
    pub fn forget_pending(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
        self.pending_after = self.cksum;
        self.hint_hdr = None;
    }

    /// True if a frame of this generation (its salts match the header) starts right after the
    /// last commit: a transaction is being written, or was written and not yet published.
    pub fn frame_follows(&self, wal: &File) -> io::Result<bool> {
        let mut fh = [0u8; 24];
        if !read_exact_at(wal, &mut fh, self.committed_end)? {
            return Ok(false);
        }
        let be = |at: usize| u32::from_be_bytes([fh[at], fh[at + 1], fh[at + 2], fh[at + 3]]);
        Ok(be(8) == self.hdr.salt1 && be(12) == self.hdr.salt2)
    }

    /// Records a captured transaction's frames as the newest committed copies of their pages.
    /// `crcs` holds the page CRC of each frame, in frame order.
    pub fn publish(&mut self, t: &WalTxn, crcs: &[u64]) {
        for (f, c) in t.frames.iter().zip(crcs) {
            if f.pgno <= t.db_pages {
                self.index.insert(f.pgno, (f.off, *c));
            } else {
                self.index.remove(&f.pgno);
            }
        }
        if self.db_pages.is_some_and(|old| t.db_pages < old) {
            // Pages cut off the end are gone; a later growth must not find their old frames.
            self.index.retain(|&p, _| p <= t.db_pages);
        }
        if let Some(f) = t.frames.last() {
            self.last_commit = Some((f.pgno, f.off));
        }
        self.db_pages = Some(t.db_pages);
    }

    /// Publishes a transaction whose pages are not needed (recovery, padding): CRCs are
    /// computed from the WAL.
    pub fn publish_reading(&mut self, wal: &File, t: &WalTxn) -> io::Result<()> {
        let mut buf = vec![0u8; self.hdr.page_size as usize];
        let mut crcs = Vec::with_capacity(t.frames.len());
        for f in &t.frames {
            let page = match &f.page {
                Some(p) => &p[..],
                None => {
                    read_exact_at(wal, &mut buf, f.off + FRAME_HEADER)?;
                    &buf[..]
                }
            };
            crcs.push(page_crc(f.pgno, page));
        }
        self.publish(t, &crcs);
        Ok(())
    }

    /// Positions the tracker right after a commit whose offset and checksum were recorded
    /// earlier, rebuilding the index from the frames before it. `false` if the WAL's chain does
    /// not pass through that point (the WAL changed behind sqlfs's back).
    pub fn seek_to(&mut self, wal: &File, end: u64, cksum: (u32, u32)) -> io::Result<bool> {
        while self.committed_end < end {
            match self.advance_one(wal, None, u64::MAX)? {
                Some(t) => self.publish_reading(wal, &t)?,
                None => break,
            }
        }
        Ok(self.committed_end == end && self.cksum == cksum)
    }

    /// Validates frames up to the next commit, none ending past byte `limit`; the transaction
    /// it completes, if any.
    pub fn advance_one(
        &mut self,
        wal: &File,
        hint: Option<(u64, &[u8])>,
        limit: u64,
    ) -> io::Result<Option<WalTxn>> {
        self.advance_one_with(&mut Ahead::new(wal, limit), hint, limit)
    }

    fn advance_one_with(
        &mut self,
        wal: &mut Ahead<'_>,
        hint: Option<(u64, &[u8])>,
        limit: u64,
    ) -> io::Result<Option<WalTxn>> {
        let fsz = self.hdr.frame_size();
        let ps = self.hdr.page_size as usize;
        let mut fh = [0u8; 24];
        let mut buf = Vec::new();
        loop {
            let (off, ck) = self.pending_end();
            if off.saturating_add(fsz) > limit {
                return Ok(None);
            }
            match self.hint_hdr {
                Some((o, h)) if o == off => fh = h,
                _ => {
                    if !wal.read(&mut fh, off)? {
                        return Ok(None);
                    }
                }
            }
            let page: &[u8] = match hint {
                Some((o, d)) if o == off + FRAME_HEADER && d.len() == ps => d,
                _ => {
                    buf.resize(ps, 0);
                    if !wal.read(&mut buf, off + FRAME_HEADER)? {
                        return Ok(None);
                    }
                    &buf
                }
            };
            let Some((Frame { pgno, commit }, after)) = self.hdr.check_frame(&fh, page, ck) else {
                return Ok(None);
            };
            let keep = (self.pending_bytes + ps <= PENDING_BYTES).then(|| page.to_vec());
            self.pending_bytes += keep.as_ref().map_or(0, |v| v.len());
            self.pending.push(Pending {
                off,
                pgno,
                cksum_before: ck,
                page: keep,
            });
            self.pending_after = after;
            if commit != 0 {
                let frames = self
                    .pending
                    .drain(..)
                    .map(|p| WalFrame {
                        off: p.off,
                        pgno: p.pgno,
                        page: p.page,
                    })
                    .collect();
                self.pending_bytes = 0;
                self.committed_end = off + fsz;
                self.cksum = after;
                return Ok(Some(WalTxn {
                    frames,
                    db_pages: commit,
                    end: off + fsz,
                    cksum: after,
                }));
            }
        }
    }
}
