//! The record format: one captured transaction (or snapshot) as bytes, shared by the staging
//! log (`stage`, both versions) and replica objects (`segment`, version 1 only).
//!
//! Byte layout of a record (all integers big-endian; docs/FORMAT.md "Segment records"):
//!
//! ```text
//! offset size field
//!      0    4 magic "SQTX"
//!      4    1 version: 1 = whole pages, 2 = coded pages (staging only)
//!      5    1 kind: 1 = transaction, 2 = snapshot (every page; replaces the state)
//!      6    2 reserved (0)
//!      8    8 TXID
//!     16    8 commit time, ns since the Unix epoch
//!     24    4 page size
//!     28    4 database size in pages after the transaction
//!     32    8 rolling checksum before
//!     40    8 rolling checksum after
//!     48    4 number of page entries n
//!     52    8 WAL salts after the commit (0 for rollback-journal commits)
//!     60    8 WAL running checksum after the commit frame
//!     68    4 version 2: bytes of page entries b; version 1: 0
//!     72    8 WAL offset just past the commit frame (0 if none)
//!     80    … version 1: n × (page number (4) + page); version 2: b bytes of coded
//!             entries (module `delta`)
//!    end    8 CRC-64/XZ of every byte of the record before it
//! ```
//!
//! Invariants: a record is whole only if its trailing CRC matches; a record of version 2
//! never leaves staging (replica readers refuse it: [`RecordHeader::parse`]); a coded page's
//! base lies earlier in the same segment file, so a reader resolves it through [`Images`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::backing::shown;
use crate::delta::{apply_runs, Coding};

/// Errors reading a record: I/O, or bytes that are not a whole record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("staging I/O on {}: {err}", shown(.path).display())]
    Io { path: PathBuf, err: io::Error },
    #[error("staging record in {} at offset {offset} is corrupt: {why}", shown(.path).display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: String,
    },
}

pub type Result<T> = std::result::Result<T, RecordError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RecordError + '_ {
    move |err| RecordError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Size of a record header in bytes.
pub const RECORD_HEADER: usize = 80;
pub const RECORD_MAGIC: &[u8; 4] = b"SQTX";
/// Record format of fixed-size page entries (also the records inside replica objects).
pub const RECORD_VERSION: u8 = 1;
/// Record format of coded page entries (see [`crate::delta`]): small staged records.
pub const CODED_VERSION: u8 = 2;
/// Records of up to this many bytes of whole pages are coded (version 2) when staged; larger
/// ones keep whole pages. A coded body longer than twice this is damage, not a size to read.
pub const CODED_LIMIT: usize = 256 << 10;

/// Receives one page of a record: (page number, page bytes).
pub type PageSink<'a> = &'a mut dyn FnMut(u32, &[u8]) -> io::Result<()>;

/// What kind of change a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Pages changed by one committed transaction.
    Txn = 1,
    /// Every page of the database: replaces the state (first sighting, lost continuity).
    Snapshot = 2,
}

/// Where the WAL stood right after a captured commit; zeros for rollback-journal commits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalPos {
    pub salt: (u32, u32),
    pub cksum: (u32, u32),
    /// Byte offset just past the commit frame.
    pub end: u64,
}

/// A record's header: everything but the pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: Kind,
    pub txid: u64,
    /// Commit time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub page_size: u32,
    /// Database size in pages after the transaction.
    pub db_pages: u32,
    pub checksum_before: u64,
    pub checksum_after: u64,
    pub npages: u32,
    pub wal: WalPos,
    /// Staging only: `Some(n)` if the page entries are coded (format 2) and take `n` bytes;
    /// `None` for whole pages of fixed size (format 1). Set when a record is read or appended,
    /// ignored when one is written whole.
    pub coded: Option<u32>,
}

/// Headers for unit tests.
#[cfg(test)]
impl RecordHeader {
    /// `npages` pages of `page_size` bytes that make up the whole database (`db_pages` =
    /// `npages`), committed `txid` ns after the epoch; zero checksums, no WAL position.
    /// Tests set any other field with struct update syntax.
    pub(crate) fn test(kind: Kind, txid: u64, page_size: u32, npages: u32) -> RecordHeader {
        RecordHeader {
            kind,
            txid,
            time_ns: txid,
            page_size,
            db_pages: npages,
            checksum_before: 0,
            checksum_after: 0,
            npages,
            wal: WalPos::default(),
            coded: None,
        }
    }
}

impl RecordHeader {
    /// True if this record holds every page of the database, so that the state before it
    /// is dropped rather than updated: a snapshot, or a record whose page size differs from
    /// the state's (`prev_page_size`; 0 before any record). Every reader that replays
    /// records (compaction, restore, history views) applies this one rule.
    pub fn replaces_state(&self, prev_page_size: u32) -> bool {
        self.kind == Kind::Snapshot || (prev_page_size != 0 && self.page_size != prev_page_size)
    }

    /// The header's bytes, as they start its record.
    pub fn encode(&self) -> [u8; RECORD_HEADER] {
        let mut b = [0u8; RECORD_HEADER];
        b[0..4].copy_from_slice(RECORD_MAGIC);
        b[4] = match self.coded {
            Some(_) => CODED_VERSION,
            None => RECORD_VERSION,
        };
        b[5] = self.kind as u8;
        b[8..16].copy_from_slice(&self.txid.to_be_bytes());
        b[16..24].copy_from_slice(&self.time_ns.to_be_bytes());
        b[24..28].copy_from_slice(&self.page_size.to_be_bytes());
        b[28..32].copy_from_slice(&self.db_pages.to_be_bytes());
        b[32..40].copy_from_slice(&self.checksum_before.to_be_bytes());
        b[40..48].copy_from_slice(&self.checksum_after.to_be_bytes());
        b[48..52].copy_from_slice(&self.npages.to_be_bytes());
        b[52..56].copy_from_slice(&self.wal.salt.0.to_be_bytes());
        b[56..60].copy_from_slice(&self.wal.salt.1.to_be_bytes());
        b[60..64].copy_from_slice(&self.wal.cksum.0.to_be_bytes());
        b[64..68].copy_from_slice(&self.wal.cksum.1.to_be_bytes());
        b[68..72].copy_from_slice(&self.coded.unwrap_or(0).to_be_bytes());
        b[72..80].copy_from_slice(&self.wal.end.to_be_bytes());
        b
    }

    /// Parses the header of a record of whole pages (`RECORD_HEADER` bytes), as replica
    /// objects hold them.
    pub fn parse(b: &[u8]) -> std::result::Result<RecordHeader, String> {
        let h = Self::decode(b)?;
        if h.coded.is_some() {
            return Err("a staging-only record (coded pages) outside staging".into());
        }
        Ok(h)
    }

    /// Parses a staged record's header: either format.
    pub(crate) fn decode(b: &[u8]) -> std::result::Result<RecordHeader, String> {
        if &b[0..4] != RECORD_MAGIC {
            return Err("bad magic".into());
        }
        if b[4] != RECORD_VERSION && b[4] != CODED_VERSION {
            return Err(format!(
                "record format version {} (this build reads {RECORD_VERSION} and {CODED_VERSION})",
                b[4]
            ));
        }
        let kind = match b[5] {
            1 => Kind::Txn,
            2 => Kind::Snapshot,
            k => return Err(format!("unknown record kind {k}")),
        };
        let u32at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        let u64at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
        let h = RecordHeader {
            kind,
            txid: u64at(8),
            time_ns: u64at(16),
            page_size: u32at(24),
            db_pages: u32at(28),
            checksum_before: u64at(32),
            checksum_after: u64at(40),
            npages: u32at(48),
            wal: WalPos {
                salt: (u32at(52), u32at(56)),
                cksum: (u32at(60), u32at(64)),
                end: u64at(72),
            },
            coded: (b[4] == CODED_VERSION).then(|| u32at(68)),
        };
        if !crate::sqlite::valid_page_size(h.page_size) {
            return Err(format!("invalid page size {}", h.page_size));
        }
        Ok(h)
    }

    /// Total bytes of the record on disk (a size, not a count: there is no empty record).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        let body = match self.coded {
            Some(n) => n as u64,
            None => self.npages as u64 * (4 + self.page_size as u64),
        };
        RECORD_HEADER as u64 + body + 8
    }
}

/// Writes one record of whole pages (header, the pages `fill` emits, CRC trailer) to `w`,
/// buffering up to 4 MiB at a time. Returns the bytes written. `fill` must emit exactly
/// `h.npages` pages of `h.page_size` bytes.
pub fn write_record(
    w: &mut impl Write,
    h: &RecordHeader,
    fill: impl FnOnce(PageSink<'_>) -> io::Result<()>,
) -> io::Result<u64> {
    let h = &RecordHeader { coded: None, ..*h };
    let mut buf = Vec::with_capacity((h.len() as usize).min(4 << 20));
    let n = encode_record(&mut buf, h, fill, &mut |chunk| w.write_all(chunk))?;
    w.write_all(&buf)?;
    Ok(n)
}

/// Encodes one record at the end of `buf`; whenever more than 4 MiB of it is there, those
/// bytes go to `spill` and leave `buf`. Returns the record's length. On error `buf` may hold
/// part of the record (the caller cuts it).
pub(crate) fn encode_record(
    buf: &mut Vec<u8>,
    h: &RecordHeader,
    fill: impl FnOnce(PageSink<'_>) -> io::Result<()>,
    spill: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let start = buf.len();
    let mut crc = crate::sqlite::crc64();
    buf.extend_from_slice(&h.encode());
    let (mut n, mut spilled) = (0u32, 0u64);
    fill(&mut |pgno, page| {
        if page.len() != h.page_size as usize {
            return Err(io::Error::other("page of the wrong size"));
        }
        buf.extend_from_slice(&pgno.to_be_bytes());
        buf.extend_from_slice(page);
        n += 1;
        if buf.len() - start >= 4 << 20 {
            crc.update(&buf[start..]);
            spill(&buf[start..])?;
            spilled += (buf.len() - start) as u64;
            buf.truncate(start);
        }
        Ok(())
    })?;
    promised(h, n)?;
    crc.update(&buf[start..]);
    buf.extend_from_slice(&crc.finalize().to_be_bytes());
    Ok(spilled + (buf.len() - start) as u64)
}

/// Errors unless a record's `fill` emitted the `n` pages its header promised.
fn promised(h: &RecordHeader, n: u32) -> io::Result<()> {
    if n != h.npages {
        return Err(io::Error::other(format!(
            "record promised {} pages, got {n}",
            h.npages
        )));
    }
    Ok(())
}

/// A record coded by [`encode_coded`]: its header as written, and what it changes in the
/// appender's bases.
pub(crate) struct Coded {
    pub(crate) header: RecordHeader,
    pub(crate) updates: Vec<crate::delta::Update>,
}

/// Codes one record (format 2) at the end of `buf`; the record starts at segment offset `at`.
/// Each page is coded against its base in `bases` when that pays (see [`crate::delta`]). On
/// error `buf` may hold part of the record (the caller cuts it) and `bases` is unchanged.
pub(crate) fn encode_coded(
    buf: &mut Vec<u8>,
    at: u64,
    h: &RecordHeader,
    fill: impl FnOnce(PageSink<'_>) -> io::Result<()>,
    bases: &crate::delta::Bases,
) -> io::Result<Coded> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER]);
    let mut n = 0u32;
    let mut updates = Vec::with_capacity(h.npages as usize);
    fill(&mut |pgno, page| {
        if page.len() != h.page_size as usize {
            return Err(io::Error::other("page of the wrong size"));
        }
        let entry_at = at + (buf.len() - start) as u64;
        updates.push(bases.code(buf, entry_at, pgno, page));
        n += 1;
        Ok(())
    })?;
    promised(h, n)?;
    let body = u32::try_from(buf.len() - start - RECORD_HEADER)
        .map_err(|_| io::Error::other("coded record too large"))?;
    let header = RecordHeader {
        coded: Some(body),
        ..*h
    };
    buf[start..start + RECORD_HEADER].copy_from_slice(&header.encode());
    let mut crc = crate::sqlite::crc64();
    crc.update(&buf[start..]);
    buf.extend_from_slice(&crc.finalize().to_be_bytes());
    Ok(Coded { header, updates })
}

/// Reads until `buf` is full or the input ends; the bytes read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The pages a reader of one segment decoded last, as bases of the deltas that follow.
pub(crate) struct Images {
    /// The segment, for bases not remembered.
    file: File,
    /// Page number → (offset of its newest entry, image).
    pages: std::collections::HashMap<u32, (u64, Vec<u8>)>,
    bytes: usize,
}

/// Bytes of page images a reader of a segment keeps.
const IMAGES_MEMORY: usize = 16 << 20;

impl Images {
    pub(crate) fn new(file: File) -> Images {
        Images {
            file,
            pages: Default::default(),
            bytes: 0,
        }
    }

    /// The image of the entry of `pgno` at `base`, into `page`.
    fn base(&self, pgno: u32, base: u64, page: &mut [u8]) -> io::Result<()> {
        match self.pages.get(&pgno) {
            Some((at, img)) if *at == base && img.len() == page.len() => {
                page.copy_from_slice(img);
                Ok(())
            }
            _ => {
                if crate::delta::read_entry(&self.file, base, page, 1)? != pgno {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the base at {base} of page {pgno} is another page"),
                    ));
                }
                Ok(())
            }
        }
    }

    fn remember(&mut self, pgno: u32, at: u64, page: &[u8]) {
        match self.pages.get_mut(&pgno) {
            Some(e) if e.1.len() == page.len() => {
                e.0 = at;
                e.1.copy_from_slice(page);
                return;
            }
            _ => {}
        }
        let old = self.pages.insert(pgno, (at, page.to_vec()));
        self.bytes += page.len();
        self.bytes -= old.map_or(0, |o| o.1.len());
        if self.bytes > IMAGES_MEMORY {
            self.pages.clear();
            self.bytes = 0;
        }
    }
}

/// Reads a staged record's body (either format) and trailer, verifying the CRC; feeds the
/// pages to `sink` if given. Coded pages are resolved through `seg`, the reader of the
/// segment the record is in (needed with a sink).
pub(crate) fn read_body(
    r: &mut impl Read,
    h: &RecordHeader,
    hb: &[u8],
    path: &Path,
    off: u64,
    sink: Option<PageSink<'_>>,
    seg: Option<&mut Images>,
) -> Result<()> {
    let Some(n) = h.coded else {
        return read_pages(r, h, hb, path, off, sink);
    };
    let corrupt = |why: String| RecordError::Corrupt {
        path: path.into(),
        offset: off,
        why,
    };
    let ps = h.page_size as usize;
    let n = n as usize;
    // Each entry takes at most a whole page and its head, and only records of up to CODED_LIMIT
    // bytes of whole pages are coded: a larger length is a damaged header, not an allocation
    // to make.
    if n > h.npages as usize * (crate::delta::ENTRY_HEAD + ps) || n > 2 * CODED_LIMIT {
        return Err(corrupt(format!(
            "{n} bytes of entries for {} pages",
            h.npages
        )));
    }
    let mut body = vec![0u8; n + 8];
    if read_full(r, &mut body).map_err(io_err(path))? != body.len() {
        return Err(corrupt("truncated record".into()));
    }
    let mut crc = crate::sqlite::crc64();
    crc.update(hb);
    crc.update(&body[..n]);
    if body[n..] != crc.finalize().to_be_bytes() {
        return Err(corrupt("record checksum mismatch".into()));
    }
    let Some(sink) = sink else {
        return Ok(());
    };
    let Some(seg) = seg else {
        return Err(corrupt("coded pages read outside their segment".into()));
    };
    let body = &body[..n];
    let entries = crate::delta::entries(body, off + RECORD_HEADER as u64, ps).map_err(corrupt)?;
    if entries.len() != h.npages as usize {
        return Err(corrupt(format!(
            "{} page entries where the header says {}",
            entries.len(),
            h.npages
        )));
    }
    let mut page = vec![0u8; ps];
    for e in entries {
        let data = &body[e.data];
        let pgno = e.pgno;
        match e.coding {
            Coding::Whole => page.copy_from_slice(data),
            Coding::Zeros => page.fill(0),
            Coding::Delta { base } => seg
                .base(pgno, base, &mut page)
                .map_err(|err| corrupt(format!("page {pgno}: {err}")))?,
        }
        if e.coding != Coding::Whole {
            apply_runs(&mut page, data).map_err(|err| corrupt(format!("page {pgno}: {err}")))?;
        }
        sink(pgno, &page).map_err(io_err(path))?;
        seg.remember(pgno, e.at, &page);
    }
    Ok(())
}

/// Reads a record's pages and trailer (format 1: whole pages, as in replica objects),
/// verifying the CRC; feeds pages to `sink` if given.
pub fn read_pages(
    r: &mut impl Read,
    h: &RecordHeader,
    hb: &[u8],
    path: &Path,
    off: u64,
    mut sink: Option<PageSink<'_>>,
) -> Result<()> {
    let corrupt = |why: &str| RecordError::Corrupt {
        path: path.into(),
        offset: off,
        why: why.into(),
    };
    if h.coded.is_some() {
        return Err(corrupt("coded pages outside staging"));
    }
    let mut crc = crate::sqlite::crc64();
    crc.update(hb);
    let mut entry = vec![0u8; 4 + h.page_size as usize];
    for _ in 0..h.npages {
        if read_full(r, &mut entry).map_err(io_err(path))? != entry.len() {
            return Err(corrupt("truncated record"));
        }
        crc.update(&entry);
        let pgno = u32::from_be_bytes(entry[..4].try_into().unwrap());
        if pgno == 0 {
            return Err(corrupt("page number 0"));
        }
        if let Some(s) = sink.as_mut() {
            s(pgno, &entry[4..]).map_err(io_err(path))?;
        }
    }
    let mut t = [0u8; 8];
    if read_full(r, &mut t).map_err(io_err(path))? != 8 {
        return Err(corrupt("truncated record"));
    }
    if u64::from_be_bytes(t) != crc.finalize() {
        return Err(corrupt("record checksum mismatch"));
    }
    Ok(())
}

/// Reads the next record header from `r`; `Ok(None)` at a clean end of file.
pub(crate) fn read_header(
    r: &mut impl Read,
    path: &Path,
    off: u64,
) -> Result<Option<(RecordHeader, [u8; RECORD_HEADER])>> {
    let corrupt = |why: String| RecordError::Corrupt {
        path: path.into(),
        offset: off,
        why,
    };
    let mut hb = [0u8; RECORD_HEADER];
    match read_full(r, &mut hb).map_err(io_err(path))? {
        0 => Ok(None),
        RECORD_HEADER => Ok(Some((RecordHeader::decode(&hb).map_err(corrupt)?, hb))),
        _ => Err(corrupt("truncated header".into())),
    }
}

/// Reads one complete record header + body from `r` (verifying its CRC). `Ok(None)` at EOF.
pub(crate) fn read_record(
    r: &mut impl Read,
    path: &Path,
    off: u64,
) -> Result<Option<RecordHeader>> {
    let Some((h, hb)) = read_header(r, path, off)? else {
        return Ok(None);
    };
    read_body(r, &h, &hb, path, off, None, None)?;
    Ok(Some(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_or_page_size_change_replaces_state() {
        let txn = RecordHeader::test(Kind::Txn, 2, 4096, 1);
        let snap = RecordHeader::test(Kind::Snapshot, 2, 4096, 1);
        assert!(!txn.replaces_state(4096));
        assert!(!txn.replaces_state(0));
        assert!(txn.replaces_state(1024));
        assert!(snap.replaces_state(4096));
        assert!(snap.replaces_state(0));
    }
}
