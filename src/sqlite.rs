//! SQLite's on-disk formats, as far as capture needs them: the database header, the WAL header
//! and frame headers with their cumulative checksum, the rollback-journal magic, and the rolling
//! database checksum sqlfs keeps per transaction.
//!
//! Everything here is pure: byte slices in, values out. No I/O, no state.

/// The 16 bytes every database file starts with.
pub const DB_MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// The 8 bytes a live rollback journal starts with.
pub const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];
/// Size of the WAL file header.
pub const WAL_HEADER: u64 = 32;
/// Size of a WAL frame header.
pub const FRAME_HEADER: u64 = 24;

/// True if `b` starts with the database magic.
pub fn is_db_header(b: &[u8]) -> bool {
    b.len() >= 16 && &b[..16] == DB_MAGIC
}

/// Presents a database in WAL mode as one in rollback journal mode, so that it opens on its
/// own (no `-wal`, no `-shm`, read-only too): if `page1` (at least its first 20 bytes) is a
/// database header whose file format bytes 18 and 19 say WAL (2), sets them to 1. Returns
/// true if it did. Restored files and history views present the same bytes this way.
pub fn as_rollback_journal(page1: &mut [u8]) -> bool {
    if page1.len() >= 20 && is_db_header(page1) && page1[18..20] == [2, 2] {
        page1[18..20].copy_from_slice(&[1, 1]);
        return true;
    }
    false
}

/// Page size from a database header (offset 16, u16 BE; 1 means 65536). `None` if invalid.
pub fn db_page_size(hdr: &[u8]) -> Option<u32> {
    if hdr.len() < 18 {
        return None;
    }
    let v = u16::from_be_bytes([hdr[16], hdr[17]]) as u32;
    let ps = if v == 1 { 65536 } else { v };
    valid_page_size(ps).then_some(ps)
}

/// Size in pages of a database whose file is `file_size` bytes and whose header is `hdr`
/// (at least 100 bytes): the in-header size when it is valid (its version-valid-for number at
/// offset 92 equals the change counter at 24), else the file size. A file can be longer than
/// the database it holds, e.g. between a commit and the truncation that follows it.
pub fn db_pages(hdr: &[u8], ps: u32, file_size: u64) -> u32 {
    let from_file = file_size.div_ceil(ps as u64) as u32;
    if hdr.len() >= 100 && hdr[92..96] == hdr[24..28] {
        let n = u32::from_be_bytes([hdr[28], hdr[29], hdr[30], hdr[31]]);
        if n > 0 {
            return n;
        }
    }
    from_file
}

/// Page sizes SQLite accepts: powers of two from 512 to 65536.
pub fn valid_page_size(ps: u32) -> bool {
    (512..=65536).contains(&ps) && ps.is_power_of_two()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A parsed, checksum-verified WAL header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksums are computed over big-endian words (magic 0x377f0683) or native little-endian.
    pub big_endian: bool,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    /// The header's own checksum: the seed of the frames' cumulative checksum.
    pub cksum: (u32, u32),
}

impl WalHeader {
    /// Parses and verifies a 32-byte WAL header. `None` when it is not a valid header.
    pub fn parse(b: &[u8]) -> Option<WalHeader> {
        if b.len() < 32 {
            return None;
        }
        let magic = be32(b, 0);
        let big_endian = match magic {
            0x377f0682 => false,
            0x377f0683 => true,
            _ => return None,
        };
        if be32(b, 4) != 3007000 {
            return None;
        }
        let page_size = be32(b, 8);
        if !valid_page_size(page_size) {
            return None;
        }
        let cksum = wal_checksum(big_endian, &b[..24], (0, 0));
        if cksum != (be32(b, 24), be32(b, 28)) {
            return None;
        }
        Some(WalHeader {
            big_endian,
            page_size,
            checkpoint_seq: be32(b, 12),
            salt1: be32(b, 16),
            salt2: be32(b, 20),
            cksum,
        })
    }

    /// Byte size of one frame (header + page).
    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER + self.page_size as u64
    }

    /// Validates frame header `fh` followed by `page` against the running checksum `prev`.
    /// Returns the frame (pgno, commit size) and the new running checksum, or `None` when the
    /// frame is stale (other salts), torn, or not yet completely written.
    pub fn check_frame(
        &self,
        fh: &[u8],
        page: &[u8],
        prev: (u32, u32),
    ) -> Option<(Frame, (u32, u32))> {
        if fh.len() < 24 || page.len() != self.page_size as usize {
            return None;
        }
        if be32(fh, 8) != self.salt1 || be32(fh, 12) != self.salt2 {
            return None;
        }
        let pgno = be32(fh, 0);
        if pgno == 0 {
            return None;
        }
        let c = wal_checksum(self.big_endian, &fh[..8], prev);
        let c = wal_checksum(self.big_endian, page, c);
        if c != (be32(fh, 16), be32(fh, 20)) {
            return None;
        }
        Some((
            Frame {
                pgno,
                commit: be32(fh, 4),
            },
            c,
        ))
    }
}

/// One WAL frame's header fields that matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub pgno: u32,
    /// Database size in pages after the transaction, on its last (commit) frame; 0 otherwise.
    pub commit: u32,
}

/// Bytes at the start of a `-shm` file that hold the WAL index header: two copies of 48
/// bytes, written by SQLite in native byte order (second copy first, then the first).
pub const WAL_INDEX_HEADER: usize = 96;

/// What the WAL index header in shared memory says is committed: SQLite's readers see
/// exactly the frames up to `max_frame` of the WAL whose salts are `salt1`/`salt2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalIndexHeader {
    pub max_frame: u32,
    pub salt1: u32,
    pub salt2: u32,
}

impl WalIndexHeader {
    /// Parses the first [`WAL_INDEX_HEADER`] bytes of a `-shm` file. `None` while the two
    /// copies differ (a writer is updating them), before the index is initialised, or when
    /// the bytes are not an index of this format.
    pub fn parse(b: &[u8]) -> Option<WalIndexHeader> {
        if b.len() < WAL_INDEX_HEADER || b[..48] != b[48..96] {
            return None;
        }
        let ne32 = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if ne32(0) != 3007000 || b[12] == 0 {
            return None;
        }
        // The header's own checksum covers its first 40 bytes, in native order.
        if wal_checksum(cfg!(target_endian = "big"), &b[..40], (0, 0)) != (ne32(40), ne32(44)) {
            return None;
        }
        // The salts are kept as the WAL header's bytes, so they read big-endian.
        Some(WalIndexHeader {
            max_frame: ne32(16),
            salt1: be32(b, 32),
            salt2: be32(b, 36),
        })
    }
}

/// Bytes at the start of a `-shm` file up to the end of SQLite's checkpoint information,
/// which follows the two header copies: `nBackfill` (u32 at 96: frames of this generation
/// copied into the database file), the read marks and lock bytes, then `nBackfillAttempted`
/// (u32 at 128: frames a checkpoint set out to copy, stored before it syncs the WAL or
/// copies anything). Native byte order, like the header.
pub const WAL_CKPT_INFO_END: usize = 136;

/// (`nBackfill`, `nBackfillAttempted`) from the first [`WAL_CKPT_INFO_END`] bytes of a `-shm`
/// file.
pub fn ckpt_info(b: &[u8]) -> Option<(u32, u32)> {
    if b.len() < WAL_CKPT_INFO_END {
        return None;
    }
    let ne32 = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    Some((ne32(96), ne32(128)))
}

/// SQLite's WAL checksum: Fibonacci-weighted sums over 32-bit words, seeded with `seed`.
/// `data.len()` must be a multiple of 8.
pub fn wal_checksum(big_endian: bool, data: &[u8], seed: (u32, u32)) -> (u32, u32) {
    let (mut s1, mut s2) = seed;
    let words = data.chunks_exact(8);
    if big_endian {
        for w in words {
            s1 = s1
                .wrapping_add(u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
                .wrapping_add(s2);
            s2 = s2
                .wrapping_add(u32::from_be_bytes([w[4], w[5], w[6], w[7]]))
                .wrapping_add(s1);
        }
    } else {
        for w in words {
            s1 = s1
                .wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .wrapping_add(s2);
            s2 = s2
                .wrapping_add(u32::from_le_bytes([w[4], w[5], w[6], w[7]]))
                .wrapping_add(s1);
        }
    }
    (s1, s2)
}

/// A running CRC-64/XZ (the checksum of every staged record, replica object and page).
pub fn crc64() -> crc_fast::Digest {
    crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Xz)
}

/// One page's contribution to the rolling database checksum: CRC-64/XZ of (pgno BE ‖ page).
/// The database checksum is the XOR of this over pages 1..=size, so a transaction updates it
/// by XOR-ing out old versions and XOR-ing in new ones.
pub fn page_crc(pgno: u32, page: &[u8]) -> u64 {
    let mut d = crc64();
    d.update(&pgno.to_be_bytes());
    d.update(page);
    d.finalize()
}

/// Checksum of a whole database image (pages concatenated, `page_size` each).
#[cfg(test)]
pub fn image_checksum(image: &[u8], page_size: usize) -> u64 {
    image
        .chunks(page_size)
        .enumerate()
        .fold(0, |acc, (i, p)| acc ^ page_crc(i as u32 + 1, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_mode_header_presented_as_rollback_journal() {
        let mut p = vec![0u8; 100];
        p[..16].copy_from_slice(DB_MAGIC);
        p[18..20].copy_from_slice(&[2, 2]);
        assert!(as_rollback_journal(&mut p));
        assert_eq!(p[18..20], [1, 1]);
        // Already in rollback journal mode: nothing to do.
        assert!(!as_rollback_journal(&mut p));
        assert_eq!(p[18..20], [1, 1]);
        // Not a database header, or too short: left alone.
        let mut q = vec![0u8; 100];
        q[18..20].copy_from_slice(&[2, 2]);
        assert!(!as_rollback_journal(&mut q));
        assert_eq!(q[18..20], [2, 2]);
        let mut short = DB_MAGIC.to_vec();
        assert!(!as_rollback_journal(&mut short));
    }

    fn header(big: bool, ps: u32, salt: (u32, u32)) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&(if big { 0x377f0683u32 } else { 0x377f0682 }).to_be_bytes());
        h.extend_from_slice(&3007000u32.to_be_bytes());
        h.extend_from_slice(&ps.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes());
        h.extend_from_slice(&salt.0.to_be_bytes());
        h.extend_from_slice(&salt.1.to_be_bytes());
        let c = wal_checksum(big, &h, (0, 0));
        h.extend_from_slice(&c.0.to_be_bytes());
        h.extend_from_slice(&c.1.to_be_bytes());
        h
    }

    #[test]
    fn wal_header_and_frames_validate() {
        for big in [false, true] {
            let h = header(big, 512, (7, 9));
            let wh = WalHeader::parse(&h).unwrap();
            let page = vec![3u8; 512];
            let mut fh = Vec::new();
            fh.extend_from_slice(&5u32.to_be_bytes());
            fh.extend_from_slice(&10u32.to_be_bytes());
            fh.extend_from_slice(&7u32.to_be_bytes());
            fh.extend_from_slice(&9u32.to_be_bytes());
            let c = wal_checksum(big, &fh[..8], wh.cksum);
            let c = wal_checksum(big, &page, c);
            fh.extend_from_slice(&c.0.to_be_bytes());
            fh.extend_from_slice(&c.1.to_be_bytes());
            let (f, c2) = wh.check_frame(&fh, &page, wh.cksum).unwrap();
            assert_eq!(
                f,
                Frame {
                    pgno: 5,
                    commit: 10
                }
            );
            assert_eq!(c2, c);
            // Other salts: stale.
            let mut stale = fh.clone();
            stale[11] ^= 1;
            assert!(wh.check_frame(&stale, &page, wh.cksum).is_none());
            // Torn page: checksum mismatch.
            let mut torn = page.clone();
            torn[100] = 0;
            assert!(wh.check_frame(&fh, &torn, wh.cksum).is_none());
        }
        let mut bad = header(false, 4096, (1, 2));
        bad[31] ^= 1;
        assert!(WalHeader::parse(&bad).is_none());
    }

    #[test]
    fn checksum_is_xor_of_pages() {
        let img: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
        let c = image_checksum(&img, 512);
        let manual = (0..4).fold(0, |a, i| {
            a ^ page_crc(i + 1, &img[i as usize * 512..][..512])
        });
        assert_eq!(c, manual);
        assert_eq!(
            db_page_size(&[0; 16].iter().chain(&[0, 1]).copied().collect::<Vec<_>>()),
            Some(65536)
        );
    }
}

#[cfg(test)]
mod crc_tests {
    #[test]
    fn crc64_is_xz() {
        let mut d = super::crc64();
        d.update(b"1234");
        d.update(b"56789");
        assert_eq!(d.finalize(), 0x995d_c9bb_df19_39fa);
    }
}
