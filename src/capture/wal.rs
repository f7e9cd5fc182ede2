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
    crc: u64,
}

/// One frame of a completed transaction.
#[derive(Debug)]
pub struct WalFrame {
    pub off: u64,
    pub pgno: u32,
    /// The page, if it was kept from the write; else read it at `off + FRAME_HEADER`.
    pub page: Option<Vec<u8>>,
    /// [`page_crc`] of the page, taken from the bytes the frame's checksum was validated on:
    /// staging needs no second read of a page to know it.
    pub crc: u64,
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
    /// Offset up to which writeback of the WAL file was started (see [`WalTrack::kick`] and
    /// [`WalTrack::kick_written`]).
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
    /// Read ahead only for a read that starts where the last one ended, or one frame header
    /// past it (the next frame's page).
    sequential_only: bool,
    /// End of the last read.
    next: u64,
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
            sequential_only: false,
            next: 0,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// Like [`read_exact_at`].
    fn read(&mut self, out: &mut [u8], off: u64) -> io::Result<bool> {
        let end = off + out.len() as u64;
        let sequential = off.wrapping_sub(self.next) <= FRAME_HEADER;
        self.next = end;
        if off < self.start || end > self.start + self.buf.len() as u64 {
            let want = if self.limit == u64::MAX || (self.sequential_only && !sequential) {
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

/// Reads the pages of a transaction's frames for staging: in large pieces while they follow
/// each other in the WAL (as a transaction's pages mostly do), one at a time otherwise.
pub struct FrameReader<'a>(Ahead<'a>);

impl<'a> FrameReader<'a> {
    /// Reads ahead no further than `end` (the end of the transaction).
    pub fn new(wal: &'a File, end: u64) -> FrameReader<'a> {
        let mut a = Ahead::new(wal, end);
        a.sequential_only = true;
        FrameReader(a)
    }

    /// The page of frame `f`: kept from the write, else read from the WAL.
    pub fn page(&mut self, f: &WalFrame, buf: &mut [u8]) -> io::Result<()> {
        match &f.page {
            Some(p) => buf.copy_from_slice(p),
            None => {
                if !self.0.read(buf, f.off + FRAME_HEADER)? {
                    return Err(io::Error::other("WAL frame vanished while staging it"));
                }
            }
        }
        Ok(())
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

    /// Starts writeback of the frames this generation has written past those already sent,
    /// committed or not, once there are enough of them: a large transaction's frames then go
    /// to disk while the app is still writing them, and the sync that starts its checkpoint
    /// finds little left. How far the app got is found by reading one frame header every
    /// [`crate::backing::WRITEBACK_STEP`] bytes: SQLite writes a generation's frames in order,
    /// so a header with this generation's salts means every frame before it was written too
    /// (a frame it holds may still change; this is a hint only, and nothing depends on it).
    pub fn kick_written(&mut self, wal: &File) {
        let frame = FRAME_HEADER + self.hdr.page_size as u64;
        let step = (crate::backing::WRITEBACK_STEP / frame).max(1);
        let mut written = self.kicked.max(self.committed_end).max(WAL_HEADER);
        // At most 1 GiB of frames a call: the next catch-up goes on from there.
        for _ in 0..(1u64 << 30) / crate::backing::WRITEBACK_STEP {
            let j = (written - WAL_HEADER) / frame + step - 1;
            let at = WAL_HEADER + j * frame;
            if !self.salts_at(wal, at).unwrap_or(false) {
                break;
            }
            written = at + frame;
        }
        if written >= self.kicked + crate::backing::WRITEBACK_STEP {
            crate::backing::start_writeback(wal, self.kicked, written - self.kicked);
            self.kicked = written;
        }
    }

    /// True if a frame of this generation (its salts match the header) is at byte `at`.
    pub fn salts_at(&self, wal: &File, at: u64) -> io::Result<bool> {
        let mut fh = [0u8; 16];
        if !read_exact_at(wal, &mut fh, at)? {
            return Ok(false);
        }
        let be = |at: usize| u32::from_be_bytes([fh[at], fh[at + 1], fh[at + 2], fh[at + 3]]);
        Ok(be(8) == self.hdr.salt1 && be(12) == self.hdr.salt2)
    }

    /// Whether `fh` is the header of a frame of an open transaction of this generation, and
    /// its page number: its salts are this generation's, or its salts and checksum are zero
    /// (once SQLite has rewritten a frame of the open transaction in place, it writes the
    /// frames that follow so and leaves their checksums to the commit). Not a commit frame.
    fn open_frame(&self, fh: &[u8; FRAME_HEADER as usize]) -> Option<u32> {
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let (pgno, commit) = (be(&fh[0..4]), be(&fh[4..8]));
        let salts = (be(&fh[8..12]), be(&fh[12..16]));
        let deferred = fh[8..].iter().all(|&b| b == 0);
        (pgno != 0 && commit == 0 && (deferred || salts == (self.hdr.salt1, self.hdr.salt2)))
            .then_some(pgno)
    }

    /// True if a frame of an open transaction seems to be at byte `at` (see
    /// [`WalTrack::uncommitted`]).
    pub fn open_frame_at(&self, wal: &File, at: u64) -> io::Result<bool> {
        let mut fh = [0u8; FRAME_HEADER as usize];
        Ok(read_exact_at(wal, &mut fh, at)? && self.open_frame(&fh).is_some())
    }

    /// Gives `f` the frames of an open transaction from byte `from` on, as far as they go
    /// but at most `max` bytes of them: each one's page number and page. Returns the
    /// offset after the last one given. Nothing is validated: a frame may be torn, stale (of
    /// a transaction rolled back) or rewritten before the commit, and its checksum may not
    /// be written yet. Whoever keeps them checks them against the committed transaction.
    pub fn uncommitted(
        &self,
        wal: &File,
        from: u64,
        max: u64,
        f: &mut dyn FnMut(u32, &[u8]) -> io::Result<()>,
    ) -> io::Result<u64> {
        let mut off = from;
        let fsz = self.hdr.frame_size();
        let size = wal.metadata()?.len();
        let limit = size.min(off.saturating_add(max));
        let mut rd = Ahead::new(wal, limit);
        let mut fh = [0u8; FRAME_HEADER as usize];
        let mut page = vec![0u8; self.hdr.page_size as usize];
        while off + fsz <= limit {
            if !rd.read(&mut fh, off)? || !rd.read(&mut page, off + FRAME_HEADER)? {
                break;
            }
            let Some(pgno) = self.open_frame(&fh) else {
                break;
            };
            f(pgno, &page)?;
            off += fsz;
        }
        Ok(off)
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

    /// Goes back to a commit boundary at or after the last published commit (`end`, with the
    /// running checksum there) that [`WalTrack::advance`] had passed: the commits after it
    /// are read again by the next call. Nothing after `end` was published.
    pub fn rewind(&mut self, end: u64, cksum: (u32, u32)) {
        self.committed_end = end;
        self.cksum = cksum;
        self.pending.clear();
        self.pending_bytes = 0;
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
        self.salts_at(wal, self.committed_end)
    }

    /// Records a transaction's frames as the newest committed copies of their pages.
    pub fn publish(&mut self, t: &WalTxn) {
        for f in &t.frames {
            if f.pgno <= t.db_pages {
                self.index.insert(f.pgno, (f.off, f.crc));
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

    /// Positions the tracker right after a commit whose offset and checksum were recorded
    /// earlier, rebuilding the index from the frames before it. `false` if the WAL's chain does
    /// not pass through that point (the WAL changed behind sqlfs's back).
    pub fn seek_to(&mut self, wal: &File, end: u64, cksum: (u32, u32)) -> io::Result<bool> {
        while self.committed_end < end {
            match self.advance_one(wal, None, u64::MAX)? {
                Some(t) => self.publish(&t),
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
                crc: page_crc(pgno, page),
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
                        crc: p.crc,
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

/// WAL-mode commit detection fed with synthetic WAL bytes: restarts, salts, partial frames,
/// frames rewritten in place, padding frames, both checksum byte orders.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::wal_checksum;

    const PS: usize = 512;

    /// A WAL built the way SQLite writes one: a header, then frames whose cumulative
    /// checksums chain from it.
    struct Synth {
        big_endian: bool,
        salts: (u32, u32),
        bytes: Vec<u8>,
        /// Running checksum after the last frame appended.
        ck: (u32, u32),
    }

    impl Synth {
        fn new(big_endian: bool, salts: (u32, u32)) -> Synth {
            let mut s = Synth {
                big_endian,
                salts,
                bytes: Vec::new(),
                ck: (0, 0),
            };
            s.bytes = s.header();
            s
        }

        fn header(&mut self) -> Vec<u8> {
            let mut h = Vec::with_capacity(32);
            let magic: u32 = if self.big_endian {
                0x377f0683
            } else {
                0x377f0682
            };
            for w in [magic, 3007000, PS as u32, 0, self.salts.0, self.salts.1] {
                h.extend_from_slice(&w.to_be_bytes());
            }
            let c = wal_checksum(self.big_endian, &h, (0, 0));
            h.extend_from_slice(&c.0.to_be_bytes());
            h.extend_from_slice(&c.1.to_be_bytes());
            self.ck = c;
            h
        }

        /// Starts a new generation over the same bytes: a new header with other salts; the
        /// old frames stay behind it until overwritten.
        fn restart(&mut self) {
            self.salts = (self.salts.0.wrapping_add(1), self.salts.1 ^ 0x5a5a_1234);
            let h = self.header();
            self.bytes[..32].copy_from_slice(&h);
        }

        fn frame_bytes(
            &self,
            pgno: u32,
            commit: u32,
            page: &[u8],
            prev: (u32, u32),
        ) -> (Vec<u8>, (u32, u32)) {
            let mut fh = Vec::with_capacity(24);
            for w in [pgno, commit, self.salts.0, self.salts.1] {
                fh.extend_from_slice(&w.to_be_bytes());
            }
            let c = wal_checksum(self.big_endian, &fh[..8], prev);
            let c = wal_checksum(self.big_endian, page, c);
            fh.extend_from_slice(&c.0.to_be_bytes());
            fh.extend_from_slice(&c.1.to_be_bytes());
            fh.extend_from_slice(page);
            (fh, c)
        }

        /// Writes frame number `n` (0-based) at its place, chaining from `prev`.
        fn put(
            &mut self,
            n: usize,
            pgno: u32,
            commit: u32,
            page: &[u8],
            prev: (u32, u32),
        ) -> (u32, u32) {
            let (b, c) = self.frame_bytes(pgno, commit, page, prev);
            let off = 32 + n * (24 + PS);
            if self.bytes.len() < off + b.len() {
                self.bytes.resize(off + b.len(), 0);
            }
            self.bytes[off..off + b.len()].copy_from_slice(&b);
            self.ck = c;
            c
        }

        /// Appends a frame after the last one.
        fn push(&mut self, pgno: u32, commit: u32, fill: u8) {
            let n = (self.bytes.len() - 32) / (24 + PS);
            let ck = self.ck;
            self.put(n, pgno, commit, &page(pgno, fill), ck);
        }

        fn file(&self) -> File {
            let f = tempfile::tempfile().unwrap();
            f.write_all_at(&self.bytes, 0).unwrap();
            f
        }
    }

    fn page(pgno: u32, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; PS];
        p[..4].copy_from_slice(&pgno.to_be_bytes());
        p
    }

    fn track(f: &File) -> WalTrack {
        WalTrack::new(WalTrack::read_header(f).unwrap().expect("a valid header"))
    }

    fn frame_off(n: usize) -> u64 {
        32 + (n * (24 + PS)) as u64
    }

    /// Pages of a transaction as (pgno, first fill byte), reading back pages not kept.
    fn pages(f: &File, t: &WalTxn) -> Vec<(u32, u8)> {
        t.frames
            .iter()
            .map(|fr| {
                let b = match &fr.page {
                    Some(p) => p.clone(),
                    None => {
                        let mut b = vec![0; PS];
                        f.read_exact_at(&mut b, fr.off + FRAME_HEADER).unwrap();
                        b
                    }
                };
                (fr.pgno, b[4])
            })
            .collect()
    }

    /// The frames of an open transaction are taken as far as they go: ones with this
    /// generation's salts, then ones whose checksum SQLite left to the commit (zero salts and
    /// checksum), not a commit frame nor one of an older generation.
    #[test]
    fn frames_of_an_open_transaction_are_taken_as_written() {
        let mut w = Synth::new(false, (5, 6));
        w.push(1, 2, 0x01);
        w.push(3, 0, 0x03);
        w.push(4, 0, 0x04);
        // Written after SQLite rewrote a frame in place: header without salts nor checksum.
        let mut raw = Vec::new();
        for pgno in [5u32, 6] {
            raw.extend_from_slice(&pgno.to_be_bytes());
            raw.extend_from_slice(&[0u8; 20]);
            raw.extend_from_slice(&page(pgno, 0x05));
        }
        w.bytes.extend_from_slice(&raw);
        // Then a commit frame of this generation, after which nothing is taken.
        w.push(7, 7, 0x07);
        let f = w.file();
        let mut t = track(&f);
        let txns = t.advance(&f, None, u64::MAX).unwrap();
        assert_eq!(txns.len(), 1);
        t.publish(&txns[0]);
        let mut got = Vec::new();
        let end = t
            .uncommitted(&f, t.committed_end, u64::MAX, &mut |pgno, pg| {
                got.push((pgno, pg[4]));
                Ok(())
            })
            .unwrap();
        assert_eq!(got, [(3, 0x03), (4, 0x04), (5, 0x05), (6, 0x05)]);
        assert_eq!(end, frame_off(5));
        assert!(t.open_frame_at(&f, frame_off(4)).unwrap());
        assert!(
            !t.open_frame_at(&f, frame_off(5)).unwrap(),
            "a commit frame"
        );
        // At most `max` bytes; another generation's frames are not taken.
        let one = t
            .uncommitted(
                &f,
                t.committed_end,
                frame_off(2) - frame_off(1),
                &mut |_, _| Ok(()),
            )
            .unwrap();
        assert_eq!(one, frame_off(2));
        w.restart();
        let f = w.file();
        let t2 = track(&f);
        assert!(!t2.open_frame_at(&f, frame_off(1)).unwrap());
    }

    /// Each frame carries the CRC of the bytes it was validated on, and the staging reader
    /// gives every frame's page back whatever order it is asked in.
    #[test]
    fn frames_carry_their_page_crcs_and_read_back_in_any_order() {
        let mut w = Synth::new(false, (3, 4));
        for (i, pgno) in [5u32, 1, 2, 3, 9].into_iter().enumerate() {
            let commit = if i == 4 { 9 } else { 0 };
            w.push(pgno, commit, 0x10 + i as u8);
        }
        let f = w.file();
        let txns = track(&f).advance(&f, None, u64::MAX).unwrap();
        assert_eq!(txns.len(), 1);
        let t = &txns[0];
        for (i, fr) in t.frames.iter().enumerate() {
            assert_eq!(fr.crc, page_crc(fr.pgno, &page(fr.pgno, 0x10 + i as u8)));
        }
        let mut rd = FrameReader::new(&f, t.end);
        let mut buf = vec![0u8; PS];
        for i in [0usize, 1, 2, 3, 4, 2, 0, 4, 1] {
            let fr = WalFrame {
                page: None,
                ..t.frames[i]
            };
            rd.page(&fr, &mut buf).unwrap();
            assert_eq!(buf, page(fr.pgno, 0x10 + i as u8), "frame {i}");
        }
    }

    #[test]
    fn transactions_complete_at_their_commit_frames_in_both_byte_orders() {
        for be in [false, true] {
            let mut w = Synth::new(be, (7, 9));
            w.push(1, 0, 0xa1);
            w.push(2, 2, 0xa2);
            w.push(2, 0, 0xb2);
            w.push(3, 3, 0xb3);
            w.push(4, 0, 0xc4); // an open transaction: no commit frame yet
            let f = w.file();
            let mut t = track(&f);
            let txns = t.advance(&f, None, u64::MAX).unwrap();
            assert_eq!(txns.len(), 2, "big-endian {be}");
            assert_eq!(pages(&f, &txns[0]), vec![(1, 0xa1), (2, 0xa2)]);
            assert_eq!(txns[0].db_pages, 2);
            assert_eq!(pages(&f, &txns[1]), vec![(2, 0xb2), (3, 0xb3)]);
            assert_eq!(txns[1].db_pages, 3);
            assert_eq!(t.committed_end, frame_off(4));
            for x in &txns {
                t.publish(x);
            }
            // The newest committed copy of page 2 is the second transaction's.
            assert_eq!(t.index[&2].0, frame_off(2));
            assert_eq!(t.db_pages, Some(3));
            assert!(
                t.frame_follows(&f).unwrap(),
                "the open transaction's frame follows"
            );
        }
    }

    #[test]
    fn a_partly_written_commit_frame_completes_nothing_until_whole() {
        let mut w = Synth::new(false, (1, 2));
        w.push(1, 0, 1);
        w.push(2, 2, 2);
        let whole = w.bytes.clone();
        // Header of the commit frame written, its page only half.
        let cut = frame_off(1) as usize + 24 + PS / 2;
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&whole[..cut], 0).unwrap();
        let mut t = track(&f);
        assert!(t.advance(&f, None, u64::MAX).unwrap().is_empty());
        // A limit that stops short of the commit frame's end completes nothing either.
        f.write_all_at(&whole[cut..], cut as u64).unwrap();
        t.forget_pending();
        assert!(t.advance(&f, None, frame_off(2) - 1).unwrap().is_empty());
        let txns = t.advance(&f, None, frame_off(2)).unwrap();
        assert_eq!(txns.len(), 1);
        assert_eq!(pages(&f, &txns[0]), vec![(1, 1), (2, 2)]);
    }

    #[test]
    fn a_damaged_frame_stops_validation_there() {
        let mut w = Synth::new(false, (1, 2));
        w.push(1, 1, 1);
        w.push(1, 0, 2);
        w.push(2, 2, 3);
        let at = frame_off(1) as usize + 24 + 100;
        w.bytes[at] ^= 0xff;
        let f = w.file();
        let mut t = track(&f);
        let txns = t.advance(&f, None, u64::MAX).unwrap();
        assert_eq!(
            txns.len(),
            1,
            "only the transaction before the damaged frame"
        );
        assert_eq!(t.committed_end, frame_off(1));
    }

    #[test]
    fn after_a_restart_frames_of_the_old_generation_are_stale() {
        let mut w = Synth::new(false, (100, 200));
        for i in 0..4u32 {
            w.push(i + 1, i + 1, i as u8); // four one-page transactions
        }
        let old = w.file();
        assert_eq!(track(&old).advance(&old, None, u64::MAX).unwrap().len(), 4);
        // A checkpoint completed; the next writer restarts the WAL and overwrites frame 0 only.
        w.restart();
        w.put(0, 1, 1, &page(1, 0xee), w.ck);
        let f = w.file();
        let mut t = track(&f);
        assert_eq!(t.hdr.salt1, 101);
        let txns = t.advance(&f, None, u64::MAX).unwrap();
        assert_eq!(txns.len(), 1, "frames 1..3 carry the old salts");
        assert_eq!(pages(&f, &txns[0]), vec![(1, 0xee)]);
        assert_eq!(t.committed_end, frame_off(1));
        assert!(
            !t.frame_follows(&f).unwrap(),
            "a stale frame is not a frame of this generation"
        );
    }

    #[test]
    fn frames_rewritten_in_place_are_validated_again() {
        let mut w = Synth::new(false, (5, 6));
        // An open transaction of three frames, validated while written.
        let c0 = w.ck;
        let c1 = w.put(0, 1, 0, &page(1, 1), c0);
        let c2 = w.put(1, 2, 0, &page(2, 1), c1);
        w.put(2, 3, 0, &page(3, 1), c2);
        let f = w.file();
        let mut t = track(&f);
        assert!(t.advance(&f, None, u64::MAX).unwrap().is_empty());
        // The writer rewrites frame 1 in place (a page changed again before commit), then
        // re-checksums the frames after it and commits with frame 2.
        let c2 = w.put(1, 2, 0, &page(2, 9), c1);
        w.put(2, 3, 3, &page(3, 9), c2);
        let (off, len) = (frame_off(1) as usize, 24 + PS);
        f.write_all_at(&w.bytes[off..off + 2 * len], off as u64)
            .unwrap();
        t.note_write(off as u64, &w.bytes[off..off + 24]);
        t.note_write(off as u64 + 24, &w.bytes[off + 24..off + len]);
        t.note_write(off as u64 + len as u64, &w.bytes[off + len..off + 2 * len]);
        let txns = t.advance(&f, None, u64::MAX).unwrap();
        assert_eq!(txns.len(), 1);
        assert_eq!(pages(&f, &txns[0]), vec![(1, 1), (2, 9), (3, 9)]);
    }

    #[test]
    fn padding_copies_of_the_commit_frame_follow_it_as_one_frame_transactions() {
        let mut w = Synth::new(false, (3, 4));
        w.push(1, 0, 1);
        w.push(2, 2, 2);
        // synchronous=FULL without powersafe overwrite pads to a sector with copies of the
        // commit frame: each carries the commit size and chains its checksum.
        w.push(2, 2, 2);
        w.push(2, 2, 2);
        let f = w.file();
        let mut t = track(&f);
        let txns = t.advance(&f, None, u64::MAX).unwrap();
        assert_eq!(txns.len(), 3);
        t.publish(&txns[0]);
        let last = t.last_commit.unwrap();
        for p in &txns[1..] {
            assert_eq!(p.frames.len(), 1);
            assert_eq!(
                p.frames[0].pgno, last.0,
                "a copy of the commit frame's page"
            );
            assert_eq!(pages(&f, p), vec![(2, 2)]);
            assert_eq!(p.db_pages, txns[0].db_pages);
        }
    }

    #[test]
    fn seek_to_finds_a_recorded_commit_or_says_the_chain_changed() {
        let mut w = Synth::new(true, (8, 8));
        for i in 0..3u32 {
            w.push(i + 1, i + 1, i as u8);
        }
        let f = w.file();
        let mut first = track(&f);
        let txns = first.advance(&f, None, u64::MAX).unwrap();
        let (end, ck) = (txns[1].end, txns[1].cksum);
        let mut t = track(&f);
        assert!(t.seek_to(&f, end, ck).unwrap());
        assert_eq!(t.index.len(), 2);
        // The same offset with another checksum: the WAL changed behind the recorder's back.
        let mut t = track(&f);
        assert!(!t.seek_to(&f, end, (ck.0 ^ 1, ck.1)).unwrap());
    }
}
