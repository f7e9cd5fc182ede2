//! Writing an object: records are framed into zstd frames of about `FRAME_PAGES` pages, then
//! the directory (page index, frame table, record table, directory CRC) and the trailing CRC-64
//! are written after the body, and the header is written last.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::record::{write_record, PageSink, RecordHeader, RECORD_HEADER};

use super::*;

thread_local! {
    /// Compression contexts a thread's finished objects left, by level.
    static CCTX: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A compression context at one level, taken from the thread's cache (or made) and given back
/// to it when dropped: a shipper thread builds many small objects, and making a context each
/// time (allocating and clearing its tables) cost more than compressing them. A context that
/// compressed a large frame has grown its tables for it and is freed instead, so that idle
/// threads hold no large contexts (making one is cheap beside compressing such frames).
struct Cctx {
    level: i32,
    inner: Option<zstd::bulk::Compressor<'static>>,
    /// It compressed a frame of more than [`CCTX_KEEP_MAX`] bytes.
    grown: bool,
}

/// Largest frame a context may have compressed and still be kept by its thread.
const CCTX_KEEP_MAX: usize = 64 << 10;

impl Cctx {
    fn take(level: i32) -> io::Result<Cctx> {
        let cached = CCTX.with(|c| {
            let mut c = c.borrow_mut();
            let i = c.iter().position(|(l, _)| *l == level)?;
            Some(c.swap_remove(i).1)
        });
        let inner = match cached {
            Some(z) => z,
            None => zstd::bulk::Compressor::new(level)?,
        };
        Ok(Cctx {
            level,
            inner: Some(inner),
            grown: false,
        })
    }

    fn get(&mut self, frame_len: usize) -> io::Result<&mut zstd::bulk::Compressor<'static>> {
        self.grown |= frame_len > CCTX_KEEP_MAX;
        // Only a drop takes the context out.
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("no compression context"))
    }
}

impl Drop for Cctx {
    fn drop(&mut self) {
        if let Some(z) = self.inner.take().filter(|_| !self.grown) {
            let level = self.level;
            // A thread that is exiting has no cache any more: the context is just freed.
            let _ = CCTX.try_with(|c| {
                let mut c = c.borrow_mut();
                if c.len() < 2 {
                    c.push((level, z));
                }
            });
        }
    }
}

/// Builds one object in a local file, one transaction at a time.
///
/// The body is the records one after another, compressed as zstd frames of about
/// `FRAME_PAGES` pages. Frames are cut only between pages or between records, so every page
/// lies whole in one frame; a frame may hold the end of one record and several small ones.
pub struct ObjectWriter {
    file: File,
    /// The object's bytes so far while it is small (header space first): written to `file`
    /// in one go at [`finish`](Self::finish), or when it grows past [`MEM_MAX`].
    mem: Option<Vec<u8>>,
    /// One compression context for every frame of the object (creating one is costly, so a
    /// thread keeps it for its next object).
    zstd: Cctx,
    hdr: ObjHeader,
    index: Vec<u8>,
    /// Object offset the next frame starts at.
    pos: u64,
    /// Record bytes not compressed yet (the frame being gathered).
    buf: Vec<u8>,
    /// Record bytes received so far, `buf` included.
    raw: u64,
    /// The last frame compressed did not compress ([`INCOMPRESSIBLE_PCT`]): the next one is
    /// sampled first, and stored raw if its sample does not compress either.
    sample_next: bool,
    /// Frames stored raw so far, without compressing them.
    stored_raw: u32,
    /// Index entries whose frame is not cut yet: page number, TXID, position of the page
    /// among the record bytes.
    unresolved: Vec<(u32, u64, u64)>,
    /// Frames cut while the current record was added: object offset, compressed length,
    /// position of their first byte among the record bytes.
    cuts: Vec<(u64, u64, u64)>,
    /// The frame table (directory), one entry per frame cut.
    frames: Vec<u8>,
    /// The record table (directory): each record's header.
    records: Vec<u8>,
}

impl ObjectWriter {
    /// Starts an object of `kind` at `level` for database `db_id` (16 hex digits) in `file`.
    pub fn new(mut file: File, kind: ObjKind, level: u8, db_id: &str) -> io::Result<ObjectWriter> {
        let mut id = [b'0'; 16];
        let b = db_id.as_bytes();
        id[..b.len().min(16)].copy_from_slice(&b[..b.len().min(16)]);
        // The object starts at byte 0; bytes of an earlier object past its end are cut at
        // `finish` (a file reused as it is costs no truncation to zero, which frees its blocks).
        file.seek(SeekFrom::Start(0))?;
        let mut mem = Vec::with_capacity(MEM_START);
        mem.extend_from_slice(&[0u8; HEADER]);
        let hdr = ObjHeader {
            version: VERSION,
            kind,
            level,
            db_id: id,
            first_txid: 0,
            last_txid: 0,
            first_time_ns: 0,
            last_time_ns: 0,
            page_size: 0,
            db_pages: 0,
            checksum_before: 0,
            checksum_after: 0,
            ntxns: 0,
            nindex: 0,
            body_off: HEADER as u64,
            body_len: 0,
            index_off: 0,
            index_len: 0,
        };
        Ok(ObjectWriter {
            file,
            mem: Some(mem),
            zstd: Cctx::take(match (kind, level) {
                (ObjKind::Segment, 0) => ZSTD_LEVEL_L0,
                _ => ZSTD_LEVEL,
            })?,
            hdr,
            index: Vec::new(),
            pos: HEADER as u64,
            buf: Vec::new(),
            raw: 0,
            sample_next: false,
            stored_raw: 0,
            unresolved: Vec::new(),
            cuts: Vec::new(),
            frames: Vec::new(),
            records: Vec::new(),
        })
    }

    /// Compresses the gathered bytes as one frame and indexes the pages in it.
    fn cut(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let z = if self.sample_next && !self.sample_compresses()? {
            self.stored_raw += 1;
            raw_frame(&self.buf)?
        } else {
            let z = self.zstd.get(self.buf.len())?.compress(&self.buf)?;
            self.sample_next = !compressed(z.len(), self.buf.len());
            z
        };
        self.put(&z)?;
        let too_big = || io::Error::other("a frame of more than 4 GiB");
        let zlen = u32::try_from(z.len()).map_err(|_| too_big())?;
        let rawlen = u32::try_from(self.buf.len()).map_err(|_| too_big())?;
        let mut crc = crate::sqlite::crc64();
        crc.update(&z);
        self.frames.extend_from_slice(&self.pos.to_be_bytes());
        self.frames.extend_from_slice(&zlen.to_be_bytes());
        self.frames.extend_from_slice(&rawlen.to_be_bytes());
        self.frames.extend_from_slice(&crc.finalize().to_be_bytes());
        let start = self.raw - self.buf.len() as u64;
        // Pages of earlier records waiting for this frame: all of them are in it.
        let (pos, len) = (self.pos, z.len() as u64);
        for (pgno, txid, at) in std::mem::take(&mut self.unresolved) {
            self.index_entry(pgno, txid, (pos, len, start), at);
        }
        self.cuts.push((pos, len, start));
        self.pos += len;
        self.buf.clear();
        Ok(())
    }

    /// Frames stored raw so far, without compressing them.
    #[cfg(test)]
    pub(crate) fn frames_stored_raw(&self) -> u32 {
        self.stored_raw
    }

    /// True if [`SAMPLE_SLICES`] slices of [`SAMPLE_SLICE`] bytes spread over the gathered
    /// frame compress; a frame too small to sample counts as compressing.
    fn sample_compresses(&mut self) -> io::Result<bool> {
        let n = self.buf.len();
        if n < 2 * SAMPLE_SLICES * SAMPLE_SLICE {
            return Ok(true);
        }
        let mut sample = Vec::with_capacity(SAMPLE_SLICES * SAMPLE_SLICE);
        for i in 0..SAMPLE_SLICES {
            let at = i * (n / SAMPLE_SLICES);
            sample.extend_from_slice(&self.buf[at..at + SAMPLE_SLICE]);
        }
        let z = self.zstd.get(sample.len())?.compress(&sample)?;
        Ok(compressed(z.len(), sample.len()))
    }

    /// Appends `b` to the object: in memory while it stays within [`MEM_MAX`], else to the
    /// file (the bytes gathered in memory first).
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        match &mut self.mem {
            Some(m) if m.len() + b.len() <= MEM_MAX => {
                m.extend_from_slice(b);
                Ok(())
            }
            Some(_) => {
                if let Some(m) = self.mem.take() {
                    self.file.write_all(&m)?;
                }
                self.file.write_all(b)
            }
            None => self.file.write_all(b),
        }
    }

    fn index_entry(&mut self, pgno: u32, txid: u64, frame: (u64, u64, u64), at: u64) {
        self.index.extend_from_slice(&pgno.to_be_bytes());
        self.index.extend_from_slice(&txid.to_be_bytes());
        self.index.extend_from_slice(&frame.0.to_be_bytes());
        self.index
            .extend_from_slice(&(frame.1 as u32).to_be_bytes());
        self.index
            .extend_from_slice(&((at - frame.2) as u32).to_be_bytes());
        self.hdr.nindex += 1;
    }

    /// Adds one transaction (header `h`, pages from `fill`).
    pub fn add(
        &mut self,
        h: &RecordHeader,
        fill: impl FnOnce(PageSink<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        // Replica objects hold whole pages, however staging coded them.
        let h = &RecordHeader { coded: None, ..*h };
        if self.hdr.ntxns == 0 {
            self.hdr.first_txid = h.txid;
            self.hdr.first_time_ns = h.time_ns;
            self.hdr.checksum_before = h.checksum_before;
        } else if h.txid != self.hdr.last_txid + 1 {
            return Err(io::Error::other(format!(
                "TXID {} does not follow {}",
                h.txid, self.hdr.last_txid
            )));
        }
        let unit = 4 + h.page_size as u64;
        let rec_start = self.raw;
        let mut pages = Vec::with_capacity(h.npages as usize);
        self.cuts.clear();
        write_record(
            &mut Framer {
                w: self,
                at: 0,
                unit,
            },
            h,
            |emit| {
                fill(&mut |pgno, page| {
                    pages.push(pgno);
                    emit(pgno, page)
                })
            },
        )?;
        if self.buf.len() as u64 >= FRAME_PAGES * unit {
            self.cut()?;
        }
        for (i, pgno) in pages.into_iter().enumerate() {
            let at = rec_start + RECORD_HEADER as u64 + i as u64 * unit + 4;
            // The frame holding this page, if it is cut already (cuts fall between pages).
            let k = self.cuts.partition_point(|f| f.2 <= at);
            let cut_end = self.raw - self.buf.len() as u64;
            if at < cut_end {
                self.index_entry(pgno, h.txid, self.cuts[k - 1], at);
            } else {
                self.unresolved.push((pgno, h.txid, at));
            }
        }
        self.records.extend_from_slice(&h.encode());
        self.hdr.last_txid = h.txid;
        self.hdr.last_time_ns = h.time_ns;
        self.hdr.page_size = h.page_size;
        self.hdr.db_pages = h.db_pages;
        self.hdr.checksum_after = h.checksum_after;
        self.hdr.ntxns += 1;
        Ok(())
    }

    /// Makes this a compacted object: its one record (TXID `last`) stands for TXIDs
    /// `first..=last`, which began at `first_time_ns` from a database with checksum
    /// `checksum_before`.
    pub fn set_span(&mut self, first: u64, first_time_ns: u64, checksum_before: u64) {
        self.hdr.first_txid = first;
        self.hdr.first_time_ns = first_time_ns;
        self.hdr.checksum_before = checksum_before;
    }

    /// Number of transactions added so far.
    pub fn len(&self) -> u32 {
        self.hdr.ntxns
    }

    /// True while no transaction has been added.
    pub fn is_empty(&self) -> bool {
        self.hdr.ntxns == 0
    }

    /// Writes the directory (page index, frame table, record table, its CRC), the header and
    /// the trailing CRC; returns the header and the file (written, not synced).
    pub fn finish(self) -> io::Result<(ObjHeader, File)> {
        self.finish_with_bytes().map(|(h, f, _)| (h, f))
    }

    /// [`finish`](Self::finish), and the object's bytes too if it was small enough to be
    /// built in memory (at most [`MEM_MAX`] bytes before its directory): a caller that sends
    /// or copies it reads none of it back from the file.
    pub fn finish_with_bytes(mut self) -> io::Result<(ObjHeader, File, Option<Vec<u8>>)> {
        self.cut()?;
        let nframes = (self.frames.len() / FRAME_ENTRY) as u32;
        self.hdr.body_len = self.pos - HEADER as u64;
        self.hdr.index_off = self.pos;
        self.hdr.index_len =
            (self.index.len() + self.frames.len() + self.records.len() + DIR_TRAILER) as u64;
        let head = self.hdr.encode();
        let mut dir_crc = crate::sqlite::crc64();
        dir_crc.update(&head);
        let mut trailer = Vec::with_capacity(DIR_TRAILER);
        trailer.extend_from_slice(&nframes.to_be_bytes());
        trailer.extend_from_slice(&0u32.to_be_bytes());
        let len = self.pos + self.hdr.index_len;
        if let Some(mut m) = self.mem.take() {
            // Built in memory: the whole object is written once, header and CRC included.
            for part in [&self.index, &self.frames, &self.records, &trailer] {
                dir_crc.update(part);
                m.extend_from_slice(part);
            }
            m.extend_from_slice(&dir_crc.finalize().to_be_bytes());
            m[..HEADER].copy_from_slice(&head);
            let mut crc = crate::sqlite::crc64();
            crc.update(&m);
            m.extend_from_slice(&crc.finalize().to_be_bytes());
            self.file.write_all(&m)?;
            self.cut_file_at(len + 8)?;
            return Ok((self.hdr, self.file, Some(m)));
        }
        for part in [&self.index, &self.frames, &self.records, &trailer] {
            dir_crc.update(part);
            self.file.write_all(part)?;
        }
        self.file.write_all(&dir_crc.finalize().to_be_bytes())?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&head)?;
        self.file.seek(SeekFrom::Start(0))?;
        let mut crc = crate::sqlite::crc64();
        let mut buf = vec![0u8; len.clamp(4096, 1 << 20) as usize];
        let mut r = (&self.file).take(len);
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
        }
        self.file.seek(SeekFrom::Start(len))?;
        self.file.write_all(&crc.finalize().to_be_bytes())?;
        self.cut_file_at(len + 8)?;
        // Not synced: an object leaves the machine from here, and a local copy kept for
        // compaction is verified (its trailing CRC) before it is used.
        Ok((self.hdr, self.file, None))
    }

    /// Cuts off what an earlier, longer object left past `end` in a reused file.
    fn cut_file_at(&self, end: u64) -> io::Result<()> {
        if self.file.metadata()?.len() > end {
            self.file.set_len(end)?;
        }
        Ok(())
    }
}

/// Largest object (before its directory) built in memory; a larger one continues in its
/// file. Objects of a few small transactions, most of a busy mount's shipments, stay below.
pub(crate) const MEM_MAX: usize = 1 << 20;

/// Bytes reserved for an object built in memory at first.
const MEM_START: usize = 16 << 10;

/// A frame (or sample) compressed to this many hundredths of its size or more did not
/// compress: the next frame is sampled before it is compressed.
const INCOMPRESSIBLE_PCT: usize = 97;
/// Sampling a frame: this many slices of [`SAMPLE_SLICE`] bytes, spread evenly over it
/// (1/16 of a frame of 256 4-KiB pages).
const SAMPLE_SLICES: usize = 4;
const SAMPLE_SLICE: usize = 16 << 10;
/// Largest block of a raw frame (zstd's block maximum).
const RAW_BLOCK: usize = 128 << 10;

/// True if `z` bytes compressed from `raw` bytes are worth it (see [`INCOMPRESSIBLE_PCT`]).
fn compressed(z: usize, raw: usize) -> bool {
    z * 100 < raw * INCOMPRESSIBLE_PCT
}

/// `b` as one zstd frame of raw (stored) blocks, made without compressing: any zstd
/// decoder reads `b` back from it. Layout (RFC 8878): magic `28 B5 2F FD`; frame header
/// descriptor `0xA0` (single segment, 4-byte content size, no checksum, no dictionary); the
/// content size, u32 little-endian; then blocks of at most [`RAW_BLOCK`] bytes, each a 3-byte
/// little-endian header (bit 0: last block, bits 1-2: type 0 = raw, bits 3-23: size) and the
/// bytes themselves; an empty `b` is one empty last block.
pub(crate) fn raw_frame(b: &[u8]) -> io::Result<Vec<u8>> {
    let n = u32::try_from(b.len()).map_err(|_| io::Error::other("a frame of more than 4 GiB"))?;
    let mut z = Vec::with_capacity(b.len() + 9 + 3 * (b.len() / RAW_BLOCK + 1));
    z.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    z.push(0xA0);
    z.extend_from_slice(&n.to_le_bytes());
    if b.is_empty() {
        z.extend_from_slice(&[1, 0, 0]);
    }
    let mut blocks = b.chunks(RAW_BLOCK).peekable();
    while let Some(c) = blocks.next() {
        let h = (c.len() as u32) << 3 | u32::from(blocks.peek().is_none());
        z.extend_from_slice(&h.to_le_bytes()[..3]);
        z.extend_from_slice(c);
    }
    Ok(z)
}

/// Pages per zstd frame: a page is read by decompressing at most this many.
const FRAME_PAGES: u64 = 256;

/// Receives one record's bytes into the writer's frame, cutting the frame at the first page
/// boundary where it holds `FRAME_PAGES` pages' worth.
struct Framer<'a> {
    w: &'a mut ObjectWriter,
    /// Bytes of the record received so far.
    at: u64,
    /// Bytes per page in a record (page number and page).
    unit: u64,
}

impl Write for Framer<'_> {
    fn write(&mut self, mut d: &[u8]) -> io::Result<usize> {
        let n = d.len();
        let hdr = RECORD_HEADER as u64;
        while !d.is_empty() {
            // The next page boundary in the record: after its header, then after each page.
            let next = if self.at < hdr {
                hdr
            } else {
                hdr + ((self.at - hdr) / self.unit + 1) * self.unit
            };
            let take = ((next - self.at) as usize).min(d.len());
            self.w.buf.extend_from_slice(&d[..take]);
            self.w.raw += take as u64;
            self.at += take as u64;
            d = &d[take..];
            if self.at == next && self.w.buf.len() as u64 >= FRAME_PAGES * self.unit {
                self.w.cut()?;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
