//! Replica objects: a run of staged transactions (a *segment*) or a whole database (a
//! *snapshot*), in one self-describing, checksummed file (docs/FORMAT.md, "Replica objects").
//!
//! The transactions' staging records, back to back, are compressed as zstd frames of about 256
//! pages (small records share a frame), so a frame can be fetched and decoded on its own; the
//! page index says which frame (and where in its decompressed bytes) holds each page version.
//! Since format version 2 a *directory* after the body also lists every frame with its own
//! CRC-64 and every record's header, under a CRC-64 of its own (and of the object header), so
//! a reader can open an object with two range reads and verify each frame it fetches alone.
//!
//! Invariants:
//! - An object is written to a local file first and only then handed to a replica; a reader
//!   verifies the trailing CRC-64 before trusting any byte of a whole object, or (version 2)
//!   the directory's CRC before trusting the header and directory, and a frame's CRC before
//!   decompressing that frame.
//! - The header's TXID range, times, sizes and checksums describe exactly the records inside,
//!   in TXID order, gap-free.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::record::{read_pages, write_record, PageSink, RecordHeader, RECORD_HEADER};

pub const MAGIC: &[u8; 8] = b"SQFSOBJ\0";
/// Object format version this build writes (it reads this one and every one down to
/// `OLDEST_VERSION`).
pub const VERSION: u16 = 2;
/// Oldest object format version this build reads: version 1 has no directory (no per-frame
/// checksums), so such objects are only ever read whole.
pub const OLDEST_VERSION: u16 = 1;
/// Size of an object's header.
pub const HEADER: usize = 128;
const INDEX_ENTRY: usize = 28;
/// Size of a frame-table entry (version 2): offset, compressed length, decompressed length,
/// CRC-64 of the compressed bytes.
const FRAME_ENTRY: usize = 24;
/// The directory's last bytes (version 2): number of frames, reserved, directory CRC-64.
const DIR_TRAILER: usize = 16;
/// zstd level of level-0 segments: they are cut every sync interval while the app writes,
/// on the same cores, so speed comes first.
const ZSTD_LEVEL_L0: i32 = 1;
/// zstd level of snapshots and compacted objects: written rarely, kept long.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("{what}: {err}")]
    Io { what: String, err: io::Error },
    #[error("{what} is not a sqlfs replica object (bad magic)")]
    Foreign { what: String },
    #[error("{what} has object format version {version}; this build reads versions {OLDEST_VERSION} to {VERSION}")]
    Version { what: String, version: u16 },
    #[error("{what} is corrupt: {why}")]
    Corrupt { what: String, why: String },
}

type Result<T> = std::result::Result<T, ObjectError>;

/// What an object holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjKind {
    Segment = 1,
    Snapshot = 2,
}

/// An object's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjHeader {
    /// Object format version (1 or 2); the writer always writes `VERSION`.
    pub version: u16,
    pub kind: ObjKind,
    pub level: u8,
    pub db_id: [u8; 16],
    pub first_txid: u64,
    pub last_txid: u64,
    pub first_time_ns: u64,
    pub last_time_ns: u64,
    pub page_size: u32,
    pub db_pages: u32,
    pub checksum_before: u64,
    pub checksum_after: u64,
    pub ntxns: u32,
    pub nindex: u32,
    pub body_off: u64,
    pub body_len: u64,
    pub index_off: u64,
    pub index_len: u64,
}

impl ObjHeader {
    fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&self.version.to_be_bytes());
        b[10] = self.kind as u8;
        b[11] = self.level;
        b[12..16].copy_from_slice(&1u32.to_be_bytes()); // flags: zstd frames
        b[16..32].copy_from_slice(&self.db_id);
        let mut at = 32;
        for v in [
            self.first_txid,
            self.last_txid,
            self.first_time_ns,
            self.last_time_ns,
        ] {
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
            at += 8;
        }
        b[64..68].copy_from_slice(&self.page_size.to_be_bytes());
        b[68..72].copy_from_slice(&self.db_pages.to_be_bytes());
        b[72..80].copy_from_slice(&self.checksum_before.to_be_bytes());
        b[80..88].copy_from_slice(&self.checksum_after.to_be_bytes());
        b[88..92].copy_from_slice(&self.ntxns.to_be_bytes());
        b[92..96].copy_from_slice(&self.nindex.to_be_bytes());
        let mut at = 96;
        for v in [self.body_off, self.body_len, self.index_off, self.index_len] {
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
            at += 8;
        }
        b
    }

    fn decode(b: &[u8], what: &str) -> Result<ObjHeader> {
        if b.len() < HEADER || &b[0..8] != MAGIC {
            return Err(ObjectError::Foreign { what: what.into() });
        }
        let version = u16::from_be_bytes([b[8], b[9]]);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(ObjectError::Version {
                what: what.into(),
                version,
            });
        }
        let u32at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let kind = match b[10] {
            1 => ObjKind::Segment,
            2 => ObjKind::Snapshot,
            k => {
                return Err(ObjectError::Corrupt {
                    what: what.into(),
                    why: format!("unknown object kind {k}"),
                })
            }
        };
        let mut db_id = [0u8; 16];
        db_id.copy_from_slice(&b[16..32]);
        Ok(ObjHeader {
            version,
            kind,
            level: b[11],
            db_id,
            first_txid: u64at(32),
            last_txid: u64at(40),
            first_time_ns: u64at(48),
            last_time_ns: u64at(56),
            page_size: u32at(64),
            db_pages: u32at(68),
            checksum_before: u64at(72),
            checksum_after: u64at(80),
            ntxns: u32at(88),
            nindex: u32at(92),
            body_off: u64at(96),
            body_len: u64at(104),
            index_off: u64at(112),
            index_len: u64at(120),
        })
    }
}

/// Decodes an object header from its first `HEADER` bytes (`what` names it in errors).
pub fn parse_header(b: &[u8], what: &str) -> Result<ObjHeader> {
    ObjHeader::decode(b, what)
}

/// Builds one object in a local file, one transaction at a time.
///
/// The body is the records one after another, compressed as zstd frames of about
/// `FRAME_PAGES` pages. Frames are cut only between pages or between records, so every page
/// lies whole in one frame; a frame may hold the end of one record and several small ones.
pub struct ObjectWriter {
    file: File,
    /// One compression context for every frame of the object (creating one is costly).
    zstd: zstd::bulk::Compressor<'static>,
    hdr: ObjHeader,
    index: Vec<u8>,
    /// Object offset the next frame starts at.
    pos: u64,
    /// Record bytes not compressed yet (the frame being gathered).
    buf: Vec<u8>,
    /// Record bytes received so far, `buf` included.
    raw: u64,
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

fn io(what: &str) -> impl FnOnce(io::Error) -> ObjectError + '_ {
    move |err| ObjectError::Io {
        what: what.to_string(),
        err,
    }
}

impl ObjectWriter {
    /// Starts an object of `kind` at `level` for database `db_id` (16 hex digits) in `file`.
    pub fn new(mut file: File, kind: ObjKind, level: u8, db_id: &str) -> io::Result<ObjectWriter> {
        let mut id = [b'0'; 16];
        let b = db_id.as_bytes();
        id[..b.len().min(16)].copy_from_slice(&b[..b.len().min(16)]);
        file.set_len(0)?;
        file.write_all(&[0u8; HEADER])?;
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
            zstd: zstd::bulk::Compressor::new(match (kind, level) {
                (ObjKind::Segment, 0) => ZSTD_LEVEL_L0,
                _ => ZSTD_LEVEL,
            })?,
            hdr,
            index: Vec::new(),
            pos: HEADER as u64,
            buf: Vec::new(),
            raw: 0,
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
        let z = self.zstd.compress(&self.buf)?;
        self.file.write_all(&z)?;
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
    /// the trailing CRC; returns the header and the file.
    pub fn finish(mut self) -> io::Result<(ObjHeader, File)> {
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
        for part in [&self.index, &self.frames, &self.records, &trailer] {
            dir_crc.update(part);
            self.file.write_all(part)?;
        }
        self.file.write_all(&dir_crc.finalize().to_be_bytes())?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&head)?;
        self.file.seek(SeekFrom::Start(0))?;
        let mut crc = crate::sqlite::crc64();
        let mut buf = vec![0u8; 1 << 20];
        let mut r = (&self.file).take(self.pos + self.hdr.index_len);
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
        }
        self.file.seek(SeekFrom::End(0))?;
        self.file.write_all(&crc.finalize().to_be_bytes())?;
        self.file.sync_all()?;
        Ok((self.hdr, self.file))
    }
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

/// Verifies an object in `file` (trailing CRC, header) and returns its header.
pub fn verify(file: &File, what: &str) -> Result<ObjHeader> {
    let len = file.metadata().map_err(io(what))?.len();
    if len < (HEADER + 8) as u64 {
        let mut b = vec![0u8; len as usize];
        let _ = (&*file).read_exact(&mut b);
        return Err(if b.len() >= 8 && &b[..8] == MAGIC {
            ObjectError::Corrupt {
                what: what.into(),
                why: format!("truncated ({len} bytes)"),
            }
        } else {
            ObjectError::Foreign { what: what.into() }
        });
    }
    let mut r = BufReader::with_capacity(1 << 20, file);
    r.seek(SeekFrom::Start(0)).map_err(io(what))?;
    let mut head = [0u8; HEADER];
    r.read_exact(&mut head).map_err(io(what))?;
    let hdr = ObjHeader::decode(&head, what)?;
    let mut crc = crate::sqlite::crc64();
    crc.update(&head);
    let mut left = len - 8 - HEADER as u64;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        r.read_exact(&mut buf[..n]).map_err(io(what))?;
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    let mut t = [0u8; 8];
    r.read_exact(&mut t).map_err(io(what))?;
    if u64::from_be_bytes(t) != crc.finalize() {
        return Err(ObjectError::Corrupt {
            what: what.into(),
            why: "checksum mismatch".into(),
        });
    }
    if hdr.body_off + hdr.body_len != hdr.index_off || hdr.index_off + hdr.index_len + 8 != len {
        return Err(ObjectError::Corrupt {
            what: what.into(),
            why: "inconsistent layout".into(),
        });
    }
    if hdr.version == 1 {
        if hdr.index_len != hdr.nindex as u64 * INDEX_ENTRY as u64 {
            return Err(ObjectError::Corrupt {
                what: what.into(),
                why: "inconsistent layout".into(),
            });
        }
    } else {
        // The directory's own checks (its CRC is covered by the one just verified).
        let mut dir = vec![0u8; hdr.index_len as usize];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut dir, hdr.index_off)
            .map_err(io(what))?;
        parse_directory(&head, &hdr, &dir, what)?;
    }
    Ok(hdr)
}

/// One zstd frame of an object's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Offset in the object.
    pub off: u64,
    /// Compressed length.
    pub len: u32,
    /// Decompressed length (0 when unknown: version 1).
    pub raw_len: u32,
    /// CRC-64 of the compressed bytes (`None` for version 1: only the whole object is
    /// checksummed).
    pub crc: Option<u64>,
}

/// One entry of the page index: page `pgno` as of transaction `txid` lies at `in_frame` in
/// the decompressed frame `frame` (an index into [`Directory::frames`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub pgno: u32,
    pub txid: u64,
    pub frame: u32,
    pub in_frame: u32,
}

/// What a reader needs to fetch any page of an object alone: its frames, page index and
/// record headers.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    /// Every frame, in body order.
    pub frames: Vec<Frame>,
    /// The page index, in TXID order.
    pub index: Vec<IndexEntry>,
    /// Every record's header, in order.
    pub records: Vec<RecordHeader>,
}

impl Directory {
    /// The frame that starts at object offset `off`.
    pub fn frame_at(&self, off: u64) -> Option<u32> {
        self.frames
            .binary_search_by_key(&off, |f| f.off)
            .ok()
            .map(|i| i as u32)
    }
}

/// Parses and checks a version-2 object's directory: `head` is the object's first `HEADER`
/// bytes (decoded as `hdr`), `dir` the `hdr.index_len` bytes at `hdr.index_off`.
///
/// Verifies the directory CRC (which also covers `head`), the sizes, that the frames tile the
/// body exactly, that every index entry names a frame and lies inside it, and that the records
/// form the TXID sequence the header states. After this, each frame is trusted once its own
/// CRC matches ([`decode_frame`]).
pub fn parse_directory(head: &[u8], hdr: &ObjHeader, dir: &[u8], what: &str) -> Result<Directory> {
    let corrupt = |why: String| ObjectError::Corrupt {
        what: what.into(),
        why,
    };
    if hdr.version < 2 {
        return Err(corrupt(format!(
            "object format version {} has no directory",
            hdr.version
        )));
    }
    if head.len() < HEADER || dir.len() as u64 != hdr.index_len || dir.len() < DIR_TRAILER {
        return Err(corrupt("truncated directory".into()));
    }
    let u32at = |b: &[u8], i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64at = |b: &[u8], i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let n = dir.len();
    let mut crc = crate::sqlite::crc64();
    crc.update(&head[..HEADER]);
    crc.update(&dir[..n - 8]);
    if crc.finalize() != u64at(dir, n - 8) {
        return Err(corrupt("directory checksum mismatch".into()));
    }
    let nframes = u32at(dir, n - DIR_TRAILER) as u64;
    let nrec = hdr.ntxns as u64;
    let want = hdr.nindex as u64 * INDEX_ENTRY as u64
        + nframes * FRAME_ENTRY as u64
        + nrec * RECORD_HEADER as u64
        + DIR_TRAILER as u64;
    if want != n as u64 {
        return Err(corrupt("inconsistent directory layout".into()));
    }
    if hdr.body_off != HEADER as u64 || hdr.body_off + hdr.body_len != hdr.index_off {
        return Err(corrupt("inconsistent layout".into()));
    }
    let idx_end = hdr.nindex as usize * INDEX_ENTRY;
    let fr_end = idx_end + nframes as usize * FRAME_ENTRY;
    // Frames: back to back from the body's start to its end.
    let mut frames = Vec::with_capacity(nframes as usize);
    let mut at = hdr.body_off;
    for e in dir[idx_end..fr_end].chunks_exact(FRAME_ENTRY) {
        let f = Frame {
            off: u64at(e, 0),
            len: u32at(e, 8),
            raw_len: u32at(e, 12),
            crc: Some(u64at(e, 16)),
        };
        if f.off != at || f.len == 0 {
            return Err(corrupt("frames do not tile the body".into()));
        }
        at += f.len as u64;
        frames.push(f);
    }
    if at != hdr.body_off + hdr.body_len {
        return Err(corrupt("frames do not tile the body".into()));
    }
    // Records: the TXID sequence the header states.
    let mut records = Vec::with_capacity(nrec as usize);
    for (i, b) in dir[fr_end..n - DIR_TRAILER]
        .chunks_exact(RECORD_HEADER)
        .enumerate()
    {
        let h = RecordHeader::parse(b).map_err(|e| corrupt(format!("record table: {e}")))?;
        let expect = if hdr.level > 0 {
            hdr.last_txid
        } else {
            hdr.first_txid + i as u64
        };
        if h.txid != expect {
            return Err(corrupt(format!(
                "record table: TXID {} where {expect} was expected",
                h.txid
            )));
        }
        records.push(h);
    }
    if hdr.level > 0 && (nrec != 1 || hdr.first_txid > hdr.last_txid) {
        return Err(corrupt(format!(
            "compacted object with {nrec} records for TXIDs {}..={}",
            hdr.first_txid, hdr.last_txid
        )));
    }
    match records.last() {
        Some(l)
            if l.txid == hdr.last_txid
                && l.time_ns == hdr.last_time_ns
                && l.page_size == hdr.page_size
                && l.db_pages == hdr.db_pages => {}
        _ => return Err(corrupt("record table does not match the header".into())),
    }
    // Index: TXID order, each entry inside a frame, its TXID one of the records.
    let first_rec = records[0].txid;
    let mut index = Vec::with_capacity(hdr.nindex as usize);
    let mut last_txid = 0;
    for e in dir[..idx_end].chunks_exact(INDEX_ENTRY) {
        let pgno = u32at(e, 0);
        let txid = u64at(e, 4);
        let off = u64at(e, 12);
        let len = u32at(e, 20);
        let in_frame = u32at(e, 24);
        let rec = txid
            .checked_sub(first_rec)
            .and_then(|i| records.get(i as usize))
            .filter(|r| r.txid == txid);
        let (Some(rec), Some(fi)) = (rec, frames.binary_search_by_key(&off, |f| f.off).ok()) else {
            return Err(corrupt(format!(
                "page index entry for page {pgno} names no record or frame"
            )));
        };
        let f = frames[fi];
        if txid < last_txid
            || pgno == 0
            || f.len != len
            || in_frame < 4
            || in_frame as u64 + rec.page_size as u64 > f.raw_len as u64
        {
            return Err(corrupt(format!("bad page index entry for page {pgno}")));
        }
        last_txid = txid;
        index.push(IndexEntry {
            pgno,
            txid,
            frame: fi as u32,
            in_frame,
        });
    }
    Ok(Directory {
        frames,
        index,
        records,
    })
}

/// The page index of a version-1 object (`idx`: its `index_len` bytes), with the frames it
/// names (no checksums: such an object is only trusted once verified whole).
pub fn parse_v1_index(idx: &[u8], what: &str) -> Result<Directory> {
    let mut frames: Vec<Frame> = Vec::new();
    let mut raw = Vec::with_capacity(idx.len() / INDEX_ENTRY);
    for e in idx.chunks_exact(INDEX_ENTRY) {
        let pgno = u32::from_be_bytes(e[0..4].try_into().expect("4 bytes"));
        let txid = u64::from_be_bytes(e[4..12].try_into().expect("8 bytes"));
        let off = u64::from_be_bytes(e[12..20].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(e[20..24].try_into().expect("4 bytes"));
        let in_frame = u32::from_be_bytes(e[24..28].try_into().expect("4 bytes"));
        frames.push(Frame {
            off,
            len,
            raw_len: 0,
            crc: None,
        });
        raw.push((pgno, txid, off, in_frame));
    }
    frames.sort_by_key(|f| f.off);
    frames.dedup_by_key(|f| f.off);
    let mut d = Directory {
        frames,
        index: Vec::with_capacity(raw.len()),
        records: Vec::new(),
    };
    for (pgno, txid, off, in_frame) in raw {
        let frame = d.frame_at(off).ok_or_else(|| ObjectError::Corrupt {
            what: what.into(),
            why: "page index names no frame".into(),
        })?;
        d.index.push(IndexEntry {
            pgno,
            txid,
            frame,
            in_frame,
        });
    }
    Ok(d)
}

/// Checks frame `f`'s compressed bytes `z` against its CRC (version 2) and decompresses them.
pub fn decode_frame(f: &Frame, z: &[u8], what: &str) -> Result<Vec<u8>> {
    let corrupt = |why: String| ObjectError::Corrupt {
        what: what.into(),
        why,
    };
    if z.len() != f.len as usize {
        return Err(corrupt(format!(
            "frame at {} is {} bytes, not {}",
            f.off,
            z.len(),
            f.len
        )));
    }
    if let Some(want) = f.crc {
        let mut crc = crate::sqlite::crc64();
        crc.update(z);
        if crc.finalize() != want {
            return Err(corrupt(format!("frame at {}: checksum mismatch", f.off)));
        }
    }
    let raw = if f.raw_len > 0 {
        zstd::bulk::decompress(z, f.raw_len as usize)
    } else {
        zstd::stream::decode_all(z)
    }
    .map_err(|e| corrupt(format!("frame at {}: {e}", f.off)))?;
    if f.raw_len > 0 && raw.len() != f.raw_len as usize {
        return Err(corrupt(format!(
            "frame at {} decompresses to {} bytes, not {}",
            f.off,
            raw.len(),
            f.raw_len
        )));
    }
    Ok(raw)
}

/// What [`for_each_txn`] reports, in order for each transaction.
pub enum Event<'a> {
    Start(&'a RecordHeader),
    Page(u32, &'a [u8]),
    End(&'a RecordHeader),
}

/// Streams every transaction of a verified object in order, one page at a time (memory does
/// not grow with the object), verifying each record's own CRC and the TXID sequence.
pub fn for_each_txn(
    file: &File,
    hdr: &ObjHeader,
    what: &str,
    mut visit: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, file);
    r.seek(SeekFrom::Start(hdr.body_off)).map_err(io(what))?;
    let body = (&mut r).take(hdr.body_len);
    let mut dec = zstd::stream::read::Decoder::new(body).map_err(io(what))?;
    let corrupt = |why: String| ObjectError::Corrupt {
        what: what.into(),
        why,
    };
    // A compacted object (level > 0) holds one record, named by the last TXID it covers.
    let expected = if hdr.level > 0 {
        if hdr.ntxns != 1 || hdr.first_txid > hdr.last_txid {
            return Err(corrupt(format!(
                "compacted object with {} records for TXIDs {}..={}",
                hdr.ntxns, hdr.first_txid, hdr.last_txid
            )));
        }
        hdr.last_txid..hdr.last_txid + 1
    } else {
        hdr.first_txid..hdr.first_txid + hdr.ntxns as u64
    };
    for expect in expected {
        let mut hb = [0u8; RECORD_HEADER];
        dec.read_exact(&mut hb)
            .map_err(|e| corrupt(format!("transaction {expect}: {e}")))?;
        let h = RecordHeader::parse(&hb).map_err(corrupt)?;
        if h.txid != expect {
            return Err(corrupt(format!(
                "TXID {} where {expect} was expected",
                h.txid
            )));
        }
        visit(Event::Start(&h))?;
        let mut err = None;
        read_pages(
            &mut dec,
            &h,
            &hb,
            Path::new(what),
            0,
            Some(&mut |p, d| match visit(Event::Page(p, d)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let msg = e.to_string();
                    err = Some(e);
                    Err(io::Error::other(msg))
                }
            }),
        )
        .map_err(|e| err.take().unwrap_or_else(|| corrupt(e.to_string())))?;
        visit(Event::End(&h))?;
    }
    Ok(())
}

/// Rewrites a version-2 object as version 1 (no frame table, record table or directory
/// CRC), as an older build wrote it.
#[cfg(test)]
pub(crate) fn downgrade_to_v1(f: &File, hdr: &ObjHeader) -> File {
    use std::os::unix::fs::FileExt;
    let mut body = vec![0u8; hdr.body_len as usize];
    f.read_exact_at(&mut body, hdr.body_off).unwrap();
    let mut idx = vec![0u8; hdr.nindex as usize * INDEX_ENTRY];
    f.read_exact_at(&mut idx, hdr.index_off).unwrap();
    let mut h = hdr.clone();
    h.version = 1;
    h.index_len = idx.len() as u64;
    let mut out = Vec::new();
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&body);
    out.extend_from_slice(&idx);
    let mut crc = crate::sqlite::crc64();
    crc.update(&out);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    let mut t = tempfile::tempfile().unwrap();
    t.write_all(&out).unwrap();
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;

    /// A large record is cut into frames, and every page named by the index can be read by
    /// decompressing just its frame; streaming still sees the whole record.
    #[test]
    fn large_records_are_framed_and_indexed() {
        let ps = 512usize;
        let n = 600u32;
        let page = |p: u32| vec![(p % 251) as u8; ps];
        let h = RecordHeader {
            time_ns: 1,
            ..RecordHeader::test(Kind::Snapshot, 7, ps as u32, n)
        };
        let mut w =
            ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Snapshot, 0, "00").unwrap();
        w.add(&h, |emit| (1..=n).try_for_each(|p| emit(p, &page(p))))
            .unwrap();
        let (hdr, f) = w.finish().unwrap();
        let hdr2 = verify(&f, "obj").unwrap();
        assert_eq!(hdr, hdr2);
        let mut idx = vec![0u8; hdr.nindex as usize * INDEX_ENTRY];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut idx, hdr.index_off).unwrap();
        let mut frames = std::collections::BTreeSet::new();
        for e in idx.chunks(INDEX_ENTRY) {
            let pgno = u32::from_be_bytes(e[0..4].try_into().unwrap());
            let off = u64::from_be_bytes(e[12..20].try_into().unwrap());
            let len = u32::from_be_bytes(e[20..24].try_into().unwrap()) as usize;
            let at = u32::from_be_bytes(e[24..28].try_into().unwrap()) as usize;
            frames.insert(off);
            let mut z = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut z, off).unwrap();
            let raw = zstd::stream::decode_all(&z[..]).unwrap();
            assert_eq!(&raw[at..at + ps], &page(pgno)[..], "page {pgno}");
        }
        assert_eq!(frames.len(), 3, "600 pages in frames of 256");
        let mut seen = 0;
        for_each_txn(&f, &hdr, "obj", |ev| {
            if let Event::Page(p, d) = ev {
                assert_eq!(d, &page(p)[..]);
                seen += 1;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, n);
    }

    /// Small records share frames; big ones are cut between pages; every page the index
    /// names is in its frame, and streaming sees every record in order.
    #[test]
    fn small_records_share_frames() {
        let ps = 512usize;
        let page = |t: u64, p: u32| vec![((t * 7 + p as u64) % 251) as u8; ps];
        let sizes: Vec<u32> = (0..900u64)
            .map(|t| {
                if t % 300 == 299 {
                    400
                } else {
                    1 + (t % 3) as u32
                }
            })
            .collect();
        let mut w =
            ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Segment, 0, "00").unwrap();
        for (i, &np) in sizes.iter().enumerate() {
            let t = i as u64 + 1;
            let h = RecordHeader {
                db_pages: 500,
                ..RecordHeader::test(Kind::Txn, t, ps as u32, np)
            };
            w.add(&h, |emit| (1..=np).try_for_each(|p| emit(p, &page(t, p))))
                .unwrap();
        }
        let (hdr, f) = w.finish().unwrap();
        assert_eq!(verify(&f, "obj").unwrap(), hdr);
        let total: u32 = sizes.iter().sum();
        assert_eq!(hdr.nindex, total);
        let mut idx = vec![0u8; hdr.nindex as usize * INDEX_ENTRY];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut idx, hdr.index_off).unwrap();
        let mut frames = std::collections::BTreeSet::new();
        let mut last_txid = 0;
        for e in idx.chunks(INDEX_ENTRY) {
            let pgno = u32::from_be_bytes(e[0..4].try_into().unwrap());
            let txid = u64::from_be_bytes(e[4..12].try_into().unwrap());
            let off = u64::from_be_bytes(e[12..20].try_into().unwrap());
            let len = u32::from_be_bytes(e[20..24].try_into().unwrap()) as usize;
            let at = u32::from_be_bytes(e[24..28].try_into().unwrap()) as usize;
            assert!(txid >= last_txid, "index in TXID order");
            last_txid = txid;
            frames.insert(off);
            let mut z = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut z, off).unwrap();
            let raw = zstd::stream::decode_all(&z[..]).unwrap();
            assert!(
                raw[at..at + ps] == page(txid, pgno)[..],
                "TXID {txid} page {pgno}"
            );
        }
        assert!(
            frames.len() < 30,
            "{} frames for {} records of {total} pages",
            frames.len(),
            sizes.len()
        );
        let mut seen = Vec::new();
        for_each_txn(&f, &hdr, "obj", |ev| {
            if let Event::Start(h) = ev {
                seen.push(h.txid);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (1..=sizes.len() as u64).collect::<Vec<_>>());
    }
    /// An object of another format version (its trailing CRC fixed) is refused by both
    /// `parse_header` and `verify`, naming it and the version.
    #[test]
    fn another_format_version_is_refused() {
        use std::os::unix::fs::FileExt;
        let h = RecordHeader::test(Kind::Txn, 1, 512, 1);
        let mut w =
            ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Segment, 0, "00").unwrap();
        w.add(&h, |emit| emit(1, &[7u8; 512])).unwrap();
        let (_, f) = w.finish().unwrap();
        let len = f.metadata().unwrap().len();
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, 0).unwrap();
        b[8..10].copy_from_slice(&(VERSION + 1).to_be_bytes());
        let body = b.len() - 8;
        let mut crc = crate::sqlite::crc64();
        crc.update(&b[..body]);
        let sum = crc.finalize().to_be_bytes();
        b[body..].copy_from_slice(&sum);
        f.write_all_at(&b, 0).unwrap();
        let want = format!("obj has object format version {}", VERSION + 1);
        let e = verify(&f, "obj").unwrap_err();
        assert!(matches!(e, ObjectError::Version { .. }), "{e}");
        assert!(e.to_string().starts_with(&want), "{e}");
        let e = parse_header(&b[..HEADER], "obj").unwrap_err();
        assert!(e.to_string().starts_with(&want), "{e}");
    }

    fn sample_object(ps: usize, sizes: &[u32]) -> (ObjHeader, File) {
        let mut w =
            ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Segment, 0, "00").unwrap();
        for (i, &np) in sizes.iter().enumerate() {
            let t = i as u64 + 1;
            let h = RecordHeader {
                time_ns: 1000 + t,
                db_pages: 700,
                ..RecordHeader::test(Kind::Txn, t, ps as u32, np)
            };
            w.add(&h, |emit| {
                (1..=np).try_for_each(|p| emit(p, &vec![((t * 13 + p as u64) % 251) as u8; ps]))
            })
            .unwrap();
        }
        w.finish().unwrap()
    }

    /// The directory of a version-2 object verifies alone (header + directory), names every
    /// record and frame, and each frame verified and decoded alone holds the pages the index
    /// says; a flipped byte anywhere in the directory, header or a frame is caught.
    #[test]
    fn directory_verifies_ranged_pieces() {
        use std::os::unix::fs::FileExt;
        let ps = 512usize;
        let sizes = [3u32, 600, 1, 1, 2, 300, 5];
        let (hdr, f) = sample_object(ps, &sizes);
        assert_eq!(hdr.version, VERSION);
        let mut head = vec![0u8; HEADER];
        f.read_exact_at(&mut head, 0).unwrap();
        let mut dir = vec![0u8; hdr.index_len as usize];
        f.read_exact_at(&mut dir, hdr.index_off).unwrap();
        let d = parse_directory(&head, &hdr, &dir, "obj").unwrap();
        assert_eq!(d.records.len(), sizes.len());
        assert_eq!(
            d.records.iter().map(|r| r.txid).collect::<Vec<_>>(),
            (1..=sizes.len() as u64).collect::<Vec<_>>()
        );
        assert_eq!(d.index.len() as u32, sizes.iter().sum::<u32>());
        let mut decoded = std::collections::HashMap::new();
        for e in &d.index {
            let fr = d.frames[e.frame as usize];
            let raw = decoded.entry(e.frame).or_insert_with(|| {
                let mut z = vec![0u8; fr.len as usize];
                f.read_exact_at(&mut z, fr.off).unwrap();
                decode_frame(&fr, &z, "obj").unwrap()
            });
            let at = e.in_frame as usize;
            assert_eq!(
                u32::from_be_bytes(raw[at - 4..at].try_into().unwrap()),
                e.pgno
            );
            assert!(raw[at..at + ps]
                .iter()
                .all(|&b| b == ((e.txid * 13 + e.pgno as u64) % 251) as u8));
        }
        assert_eq!(decoded.len(), d.frames.len(), "every frame holds a page");
        // Damage is caught: the directory, the header under its CRC, a frame.
        for i in [0, dir.len() / 2, dir.len() - 1] {
            let mut bad = dir.clone();
            bad[i] ^= 1;
            assert!(
                parse_directory(&head, &hdr, &bad, "obj").is_err(),
                "byte {i}"
            );
        }
        let mut bad_head = head.clone();
        bad_head[60] ^= 1;
        assert!(parse_directory(&bad_head, &hdr, &dir, "obj").is_err());
        let fr = d.frames[1];
        let mut z = vec![0u8; fr.len as usize];
        f.read_exact_at(&mut z, fr.off).unwrap();
        let mid = z.len() / 2;
        z[mid] ^= 0x40;
        assert!(decode_frame(&fr, &z, "obj").is_err());
        assert!(decode_frame(&fr, &z[1..], "obj").is_err());
    }

    /// Objects written by a build of format version 1 still verify and stream.
    #[test]
    fn version_1_objects_still_read() {
        let (hdr, f) = sample_object(512, &[2, 300, 1]);
        let old = downgrade_to_v1(&f, &hdr);
        let h1 = verify(&old, "old").unwrap();
        assert_eq!(h1.version, 1);
        let mut seen = Vec::new();
        for_each_txn(&old, &h1, "old", |ev| {
            if let Event::Start(h) = ev {
                seen.push(h.txid);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        let mut idx = vec![0u8; h1.index_len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&old, &mut idx, h1.index_off).unwrap();
        let d = parse_v1_index(&idx, "old").unwrap();
        assert_eq!(d.index.len(), 303);
        assert!(d.frames.iter().all(|f| f.crc.is_none()));
        // A version this build does not know is refused.
        let mut head = [0u8; HEADER];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
        head[9] = 9;
        assert!(matches!(
            parse_header(&head, "x"),
            Err(ObjectError::Version { version: 9, .. })
        ));
    }
}
