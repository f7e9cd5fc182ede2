//! Rollback-journal commits: following a transaction on the database file (which byte ranges
//! it wrote, and the checksum contribution of each page's committed version before it was
//! overwritten), and staging the pages it changed when it ends (journal deleted, truncated or
//! zeroed, or a journal-less write synced or closed).
//!
//! The journal of a database capture knows goes straight through the kernel (passthrough), so
//! its writes do not reach sqlfs: its deletion and truncation do (requests), and its header is
//! read from the backing file where it matters. A journal is *live* while its first 8 bytes
//! are SQLite's journal magic (written before the transaction's first database write: at its
//! first sync, or at once when the journal is not synced); bytes 12-16 are the random nonce
//! (`cksumInit`) SQLite draws for each transaction's header. The transaction's first database
//! write records that mark ([`Rollback::mark`]); the end of a transaction sqlfs does not see
//! (`PERSIST` mode, or exclusive locking: zeros written over the header) shows as a different
//! mark: not live, or another transaction's nonce.
//!
//! Invariants:
//! - A page's old CRC is recorded before the first write of the transaction touches it, so the
//!   rolling checksum can be advanced without keeping old page images; a page changed without
//!   its old version seen gives a snapshot instead.
//! - Every write or truncation of the database file outside WAL mode first compares the
//!   journal's mark with the one its transaction began with, and stages that transaction if
//!   the mark changed: a transaction's pages are never mixed with the next one's.
//! - A database fsync or close commits a journal-less transaction only if no journal is live
//!   with the transaction's mark (a synced database file under a live journal is not a
//!   commit: a crash now rolls it back).
//! - While a transaction with a live journal is open, the journal is watched (a one-shot
//!   inotify watch set at its first database write and again at each report, `watch.rs`): the
//!   zeroing of its header raises a report, and the watcher stages it within milliseconds.

use std::collections::{BTreeSet, HashMap};
use std::io;

use super::{append_pages, read_exact_at, Db, State};
use crate::backing::Backing;
use crate::sqlite::{self, page_crc};
use crate::stage::{Kind, WalPos};

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
    /// The journal's mark when the transaction's first change was made (`None` until then):
    /// its nonce if a journal was live, `Some(None)` if none was (see the module doc).
    pub mark: Option<Option<u32>>,
    /// The journal is to be watched (set with a live mark; taken by `Capture`).
    pub arm_watch: bool,
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

impl State {
    /// Writes made to the database file with no journal and no WAL (journal_mode=OFF or
    /// MEMORY) are committed when the app syncs or closes the file.
    pub(super) fn flush_journalless(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        if self.in_wal_mode() {
            return Ok(());
        }
        if self.blind.is_some() && !self.rb.journal_live && self.journal_mark(db, b)?.is_none() {
            // Straight handles write it unseen: read it whole (`straight.rs`).
            self.rb = Rollback::default();
            return self.resync(db, b);
        }
        if self.rb.is_clean() {
            return Ok(());
        }
        let now = self.journal_mark(db, b)?;
        if now.is_none() || self.ended_unseen(now) {
            log::debug!(
                "{}: transaction committed at sync/close ({})",
                db.name(),
                if now.is_none() {
                    "no live journal"
                } else {
                    "the journal holds another transaction"
                }
            );
            self.commit_rollback(db, b)?;
        }
        Ok(())
    }

    /// The mark of the database's journal in the backing directory: the nonce of its header
    /// if it is live, `None` if it is absent or not live (see the module doc).
    pub(super) fn journal_mark(&self, db: &Db, b: &Backing) -> io::Result<Option<u32>> {
        let f = match b.open_read(&format!("{}-journal", db.name())) {
            Ok(Some(f)) => f,
            // Absent, or no regular file (a link, a directory): no journal SQLite could use.
            Ok(None) => return Ok(None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ELOOP)) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let mut h = [0u8; 16];
        if !read_exact_at(&f, &mut h, 0)? || h[..8] != sqlite::JOURNAL_MAGIC {
            return Ok(None);
        }
        Ok(Some(u32::from_be_bytes([h[12], h[13], h[14], h[15]])))
    }

    /// True if the journal's mark is now `now` where the open transaction began with another:
    /// that transaction ended unseen.
    fn ended_unseen(&self, now: Option<u32>) -> bool {
        self.rb.mark.is_some_and(|m| m != now)
    }

    /// Before a change to the database file outside WAL mode: stages the open transaction if
    /// its journal's mark changed since its first change (it ended unseen), then records the
    /// mark of the transaction this change belongs to.
    pub(super) fn begin_change(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        let now = self.journal_mark(db, b)?;
        if !self.rb.is_clean() {
            if !self.ended_unseen(now) {
                return Ok(());
            }
            log::debug!("{}: journal header changed unseen: committed", db.name());
            self.commit_rollback(db, b)?;
        }
        self.rb.mark = Some(now);
        self.rb.arm_watch = now.is_some();
        Ok(())
    }

    /// The watcher's look (the journal was written): stages the open transaction if its
    /// journal's mark changed.
    pub(super) fn journal_check(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        if self.in_wal_mode() || self.rb.is_clean() {
            return Ok(());
        }
        let now = self.journal_mark(db, b)?;
        if self.ended_unseen(now) {
            log::debug!("{}: journal header changed: committed", db.name());
            self.commit_rollback(db, b)?;
        }
        Ok(())
    }

    /// A rollback-journal transaction ended (journal deleted, truncated or zeroed, or a
    /// journal-less write was synced): stage the pages it changed.
    pub(super) fn commit_rollback(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        self.rb.journal_live = false;
        self.rb.mark = None;
        if self.blind.is_some() && !self.in_wal_mode() {
            // Straight handles wrote it unseen: read it whole (`straight.rs`).
            self.rb = Rollback::default();
            return self.resync(db, b);
        }
        if self.rb.is_clean() {
            return Ok(());
        }
        let rb = std::mem::take(&mut self.rb);
        self.commits_seen += 1;
        self.main(db, b)?;
        let f = self.main_fd.as_ref().expect("opened above");
        let size = f.metadata()?.len();
        let mut hdr = [0u8; 100];
        let ps = if read_exact_at(f, &mut hdr, 0)? {
            sqlite::db_page_size(&hdr)
        } else {
            None
        };
        let Some(ps) = ps else {
            if size == 0 {
                // Emptied to a zero-page database.
                let h = self.next_header(
                    Kind::Txn,
                    self.page_size.max(512),
                    0,
                    0,
                    0,
                    WalPos::default(),
                );
                append_pages(db, &h, &[], &mut |_, _| Ok(()))?;
                self.advance_to(&h);
                return Ok(());
            }
            self.resnapshot =
                Some("the database file has no valid header after a transaction".into());
            return Ok(());
        };
        let new_pages = sqlite::db_pages(&hdr, ps, size);
        if self.resnapshot.is_some() || (self.page_size != ps && self.db_pages != 0) {
            let why = self
                .resnapshot
                .clone()
                .unwrap_or_else(|| "page size changed".into());
            return self.resnapshot_now(db, b, &why, WalPos::default());
        }
        let old_pages = self.db_pages;
        let mut pages: BTreeSet<u32> = rb
            .dirty_pages(ps)
            .into_iter()
            .filter(|&p| p <= new_pages)
            .collect();
        pages.extend(old_pages + 1..=new_pages);
        let mut checksum = self.checksum;
        let gone = new_pages + 1..=old_pages;
        for p in pages
            .iter()
            .copied()
            .filter(|&p| p <= old_pages)
            .chain(gone)
        {
            match rb.old_crc.get(&p) {
                Some(c) => checksum ^= c,
                None => {
                    return self.snapshot_with(
                        db,
                        b,
                        &format!("page {p} changed without its old version being seen"),
                        WalPos::default(),
                    )
                }
            }
        }
        if pages.is_empty() && new_pages == old_pages {
            // Only bytes past the end of the database changed (the file shrinking to the
            // size a commit already recorded): the database itself did not.
            return Ok(());
        }
        let mut buf = vec![0u8; ps as usize];
        let read = |p: u32, buf: &mut [u8]| -> io::Result<()> {
            buf.fill(0);
            read_exact_at(f, buf, (p as u64 - 1) * ps as u64).map(|_| ())
        };
        for &p in &pages {
            read(p, &mut buf)?;
            checksum ^= page_crc(p, &buf);
        }
        let pages: Vec<u32> = pages.into_iter().collect();
        let h = self.next_header(
            Kind::Txn,
            ps,
            new_pages,
            checksum,
            pages.len() as u32,
            WalPos::default(),
        );
        append_pages(db, &h, &pages, &mut |p, buf| read(p, buf))?;
        self.advance_to(&h);
        Ok(())
    }
}
