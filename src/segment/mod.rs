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

mod reader;
mod slice;
#[cfg(test)]
mod tests;
mod verify;
mod writer;

pub use reader::*;
pub use slice::Slice;
pub use verify::verify;
pub use writer::ObjectWriter;
#[cfg(test)]
use writer::MEM_MAX;

use std::io;

// Byte layout of a plain object, version 2 (docs/FORMAT.md, "Replica objects"; integers
// big-endian; an encrypted object is an age file wrapping exactly these bytes):
//
//   offset  size   field
//   0       8      magic `SQFSOBJ\0`
//   8       2      object format version (2)
//   10      1      kind: 1 = segment, 2 = snapshot
//   11      1      level (0 = as shipped)
//   12      4      flags (bit 0: transactions are zstd frames; always set)
//   16      16     database id (ASCII hex)
//   32      8      first TXID
//   40      8      last TXID
//   48      8      commit time of the first transaction (ns since the epoch)
//   56      8      commit time of the last transaction
//   64      4      page size after the last transaction
//   68      4      database size in pages after the last transaction
//   72      8      rolling checksum before the first transaction
//   80      8      rolling checksum after the last transaction
//   88      4      number of transactions
//   92      4      number of page-index entries
//   96      8      body offset (128)
//   104     8      body length
//   112     8      directory offset (version 1: page-index offset)
//   120     8      directory length (version 1: page-index length)
//   128     …      body: the staging records (version 1, CRC included) in TXID order,
//                  compressed as zstd frames of about 256 pages, cut only between pages
//                  or between records
//   …       28 × n directory part 1, page index: pgno (4), TXID (8), frame offset (8),
//                  frame length (4), offset of the page in the decompressed frame (4)
//   …       24 × f part 2, frame table: offset (8), compressed length (4),
//                  decompressed length (4), CRC-64 of the compressed bytes (8)
//   …       80 × t part 3, record table: each record's 80-byte header, in order
//   …       4      number of frames f
//   …       4      reserved (0)
//   …       8      CRC-64 of the header (bytes 0–127) and the directory bytes before it
//   end     8      CRC-64 of every byte before it
//
// Version 1: same header and body, then just the page index, then the trailing CRC-64.

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

    pub fn decode(b: &[u8], what: &str) -> Result<ObjHeader> {
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

pub(super) fn io(what: &str) -> impl FnOnce(io::Error) -> ObjectError + '_ {
    move |err| ObjectError::Io {
        what: what.to_string(),
        err,
    }
}
