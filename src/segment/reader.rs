//! Reading an object in place: its directory (version 2, checked by its own CRC-64; version 1:
//! the page index), each frame checked by its CRC-64 before it is decompressed, and the
//! records of a whole object in TXID order.

use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::record::{read_pages, RecordHeader, RECORD_HEADER};

use super::*;

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
pub fn for_each_txn<R: Read + Seek>(
    file: R,
    hdr: &ObjHeader,
    what: &str,
    mut visit: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<()> {
    let cap = (hdr.body_len as usize).clamp(4096, 1 << 20);
    let mut r = BufReader::with_capacity(cap, file);
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
pub(crate) fn downgrade_to_v1(f: &std::fs::File, hdr: &ObjHeader) -> std::fs::File {
    use std::io::Write;
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
