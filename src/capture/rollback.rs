//! Following a rollback-journal transaction on the database file: which byte ranges it wrote,
//! and the checksum contribution of each page's committed version before it was overwritten.
//!
//! Invariant: a page's old CRC is recorded before the first write of the transaction touches
//! it, so the rolling checksum can be advanced without keeping old page images.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
pub struct Rollback {
    /// The journal holds a valid header: a transaction (or a hot-journal rollback) is open.
    pub journal_live: bool,
    /// Byte ranges written to the database file since the last commit.
    writes: Vec<(u64, u64)>,
    /// CRC of the committed version of each page touched, keyed by page number.
    pub old_crc: HashMap<u32, u64>,
    /// The file was truncated during the transaction.
    pub truncated: bool,
}

impl Rollback {
    /// Nothing written since the last commit.
    pub fn is_clean(&self) -> bool {
        self.writes.is_empty() && !self.truncated
    }

    /// Records a write; returns the committed pages (of `ps` bytes, `pages` of them) it
    /// touches whose old CRC is not known yet.
    pub fn note_write(&mut self, off: u64, len: u64, ps: u32, pages: u32) -> Vec<u32> {
        self.writes.push((off, off + len));
        if ps == 0 || len == 0 {
            return Vec::new();
        }
        let first = (off / ps as u64) as u32 + 1;
        let last = ((off + len - 1) / ps as u64) as u32 + 1;
        (first..=last.min(pages))
            .filter(|p| !self.old_crc.contains_key(p))
            .collect()
    }

    /// The pages of size `ps` the recorded writes touched.
    pub fn dirty_pages(&self, ps: u32) -> BTreeSet<u32> {
        let ps = ps as u64;
        let mut s = BTreeSet::new();
        for &(a, e) in &self.writes {
            if e > a {
                s.extend((a / ps) as u32 + 1..=((e - 1) / ps) as u32 + 1);
            }
        }
        s
    }
}
