//! WAL-mode commit detection: stages each transaction completed in the WAL, in commit order.
//! Written-through mode sees every write to the WAL and stages each commit its writes
//! complete; observed mode catches up with what SQLite has published in its WAL index. One
//! path ([`State::capture_wal`]) stages the commits either finds.
//!
//! Invariants:
//! - A commit is staged before the write that completed it returns, and the tracker's page
//!   index stays true to the WAL even when staging fails (the snapshot staged next reads it).
//! - A WAL generation that ends (new header, truncation, unlink) is settled against the
//!   database file first: a commit whose writer died before publishing it is reverted by a
//!   staged transaction, so the stream always equals what readers see.
//! - Padding frames (a copy of the previous commit frame) spend no TXID.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::Ordering;

use super::wal::{self, WalTrack, WalTxn};
use super::{append_pages, read_exact_at, Db, State};
use crate::backing::Backing;
use crate::sqlite::{self, page_crc, WalIndexHeader, FRAME_HEADER, WAL_INDEX_HEADER};
use crate::stage::{Kind, WalPos};

/// What [`State::wal_txn_pages`] finds of one transaction.
pub(super) struct TxnPages {
    /// The pages it leaves, in order.
    pages: Vec<u32>,
    /// The rolling checksum after it.
    checksum: u64,
    /// Old versions read from the database file: (page, CRC).
    from_file: Vec<(u32, u64)>,
    /// A page came into existence without a frame (read from the database file).
    frameless: bool,
}

/// How far [`State::capture_wal`] stages the WAL's completed commits.
#[derive(Clone, Copy, Debug)]
pub(super) enum Upto<'a> {
    /// Every commit completed now: in observed mode what SQLite has published (a catch-up),
    /// else every commit the writes so far completed.
    Now,
    /// Written through: every commit completed, the write just made (offset, bytes) sparing
    /// a read-back of its bytes.
    Written(u64, &'a [u8]),
    /// The commits that end at or before this byte offset (what SQLite has published).
    Published(u64),
}

impl State {
    /// True if the WAL already holds `data` at `off`. A writer may rewrite committed bytes
    /// unchanged (a frame identical to one a dead writer left there, or the second half of a
    /// page split at a sync point); that is not a rewind.
    pub(super) fn wal_holds(&self, off: u64, data: &[u8]) -> io::Result<bool> {
        let Some(fd) = self.wal_fd.as_ref() else {
            return Ok(false);
        };
        let mut cur = vec![0u8; data.len()];
        Ok(read_exact_at(fd, &mut cur, off)? && cur == data)
    }

    /// The WAL generation ends (a new header, truncation, unlink). By then the database file
    /// holds every commit readers know of: a restart or truncation follows a complete
    /// checkpoint, and a header rewrite with no restart means nothing was published. A page
    /// whose committed version in the index differs from the database file belongs to a
    /// commit whose writer died before publishing it: stage a transaction that brings the
    /// stream back to the file. Costs one read of each page in the index, once per generation.
    pub(super) fn settle_generation(&mut self, db: &Db) -> io::Result<()> {
        let Some(w) = self.wal.as_ref() else {
            return Ok(());
        };
        if db.is_straight() {
            // Only published commits were staged (observed mode), and checkpoints may have
            // copied frames of a newer generation already: the file proves nothing here.
            return Ok(());
        }
        if w.index.is_empty() || self.resnapshot.is_some() {
            // Nothing staged from this generation, or the next commit is a snapshot anyway.
            return Ok(());
        }
        let ps = w.hdr.page_size;
        let (fps, new_pages) = self.main_size()?;
        if fps != ps {
            self.resnapshot =
                Some("the page size in the database file differs from its WAL".into());
            return Ok(());
        }
        let old_pages = self.db_pages;
        let mut buf = vec![0u8; ps as usize];
        let mut checksum = self.checksum;
        let mut pages = BTreeSet::new();
        let main_crc = |p: u32, buf: &mut Vec<u8>| -> io::Result<u64> {
            buf.fill(0);
            read_exact_at(
                self.main_fd.as_ref().expect("main open"),
                buf,
                (p as u64 - 1) * ps as u64,
            )?;
            Ok(page_crc(p, buf))
        };
        for (&p, &(_, c)) in &w.index {
            if p > old_pages {
                continue;
            }
            if p > new_pages {
                checksum ^= c;
                continue;
            }
            let m = main_crc(p, &mut buf)?;
            if m != c {
                checksum ^= c ^ m;
                pages.insert(p);
            }
        }
        if pages.is_empty() && new_pages == old_pages {
            return Ok(());
        }
        // Pages cut off that were not in the index, and pages that appear.
        for p in new_pages + 1..=old_pages {
            if !w.index.contains_key(&p) {
                checksum ^= main_crc(p, &mut buf)?;
            }
        }
        for p in old_pages + 1..=new_pages {
            checksum ^= main_crc(p, &mut buf)?;
            pages.insert(p);
        }
        log::warn!(
            "{}: the WAL ends holding a commit no reader saw (its writer died before publishing it); staging TXID {} to bring the stream back to the database file",
            db.name(),
            self.txid + 1
        );
        self.wal = None;
        let pages: Vec<u32> = pages.into_iter().collect();
        let h = self.next_header(
            Kind::Txn,
            ps,
            new_pages,
            checksum,
            pages.len() as u32,
            WalPos::default(),
        );
        append_pages(db, &h, &pages, &mut |p, buf| self.read_page(p, ps, buf))?;
        self.advance_to(&h);
        Ok(())
    }

    /// A writer is overwriting frames sqlfs took as committed: the process that wrote them
    /// died after writing its commit frame but before publishing it in the WAL index, so
    /// SQLite never counted that transaction and the next writer appends over it. Stage a
    /// transaction that reverts the pages those frames changed, so the stream again equals
    /// what every reader sees, and continue from the real end of the WAL.
    pub(super) fn rewind_wal(&mut self, db: &Db, off: u64) -> io::Result<()> {
        let (Some(w), Some(fd)) = (self.wal.as_ref(), self.wal_fd.as_ref()) else {
            return Ok(());
        };
        let fsz = w.hdr.frame_size();
        let start = off - (off - sqlite::WAL_HEADER) % fsz;
        // Pages the unpublished frames touched.
        let mut touched = BTreeSet::new();
        let mut fh = [0u8; 24];
        let mut o = start;
        while o < w.committed_end && read_exact_at(fd, &mut fh, o)? {
            touched.insert(u32::from_be_bytes([fh[0], fh[1], fh[2], fh[3]]));
            o += fsz;
        }
        // The WAL as readers know it: every commit before `start`.
        let mut nw = WalTrack::new(w.hdr);
        while nw.committed_end < start {
            match nw.advance_one(fd, None, u64::MAX)? {
                Some(t) if t.end <= start => nw.publish(&t),
                _ => break,
            }
        }
        if self.resnapshot.is_some() {
            // The next commit is a snapshot anyway: just follow the WAL as readers know it.
            self.wal = Some(nw);
            return Ok(());
        }
        log::warn!(
            "{}: a writer died after writing a commit it never published (WAL offset {start}); staging TXID {} to revert what TXID {} and before took from it",
            db.name(),
            self.txid + 1,
            self.txid
        );
        if nw.committed_end != start {
            self.wal = Some(nw);
            self.resnapshot =
                Some("the WAL was rewound to a point that is not a commit boundary".into());
            return Ok(());
        }
        let ps = w.hdr.page_size;
        let old_pages = self.db_pages;
        let new_pages = match nw.db_pages {
            Some(n) => n,
            None => self.main_size()?.1,
        };
        // Out: the current versions of the touched pages and of pages cut off (old index).
        let mut checksum = self.checksum;
        let mut buf = vec![0u8; ps as usize];
        let out: BTreeSet<u32> = touched
            .iter()
            .copied()
            .filter(|&p| p <= old_pages)
            .chain(new_pages + 1..=old_pages)
            .collect();
        for p in out {
            checksum ^= self.committed_crc(p, ps, &mut buf)?.0;
        }
        // In: their versions as readers know them (rewound index).
        self.wal = Some(nw);
        let mut pages: BTreeSet<u32> = touched.into_iter().filter(|&p| p <= new_pages).collect();
        pages.extend(old_pages + 1..=new_pages);
        for &p in &pages {
            self.read_page(p, ps, &mut buf)?;
            checksum ^= page_crc(p, &buf);
        }
        let pages: Vec<u32> = pages.into_iter().collect();
        let walpos = self.current_walpos();
        let h = self.next_header(
            Kind::Txn,
            ps,
            new_pages,
            checksum,
            pages.len() as u32,
            walpos,
        );
        append_pages(db, &h, &pages, &mut |p, buf| self.read_page(p, ps, buf))?;
        self.advance_to(&h);
        Ok(())
    }

    /// A handle on the WAL is opened: keep a descriptor on it (in observed mode no write
    /// to it will come by to open one).
    pub(super) fn open_wal(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        if self.wal_fd.is_none() {
            self.wal_fd = b.open_read(&format!("{}-wal", db.name()))?;
        }
        Ok(())
    }

    /// Observed mode: follows the WAL as it is now. A header that differs from the tracked
    /// one means a new generation began unseen; that happens only after a checkpoint copied
    /// every committed frame into the database file, and that checkpoint's writes came
    /// through sqlfs, which staged those frames first. Then every commit up to what SQLite
    /// has published is staged. Published frames are final within a generation, so nothing
    /// staged here is ever rewound.
    pub(super) fn catch_up(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        self.awaiting = false;
        if self.wal.is_some() {
            // Descriptors are dropped after a failed capture; no write will reopen this one.
            self.open_wal(db, b)?;
        }
        if self.wal_fd.is_none() {
            return Ok(());
        }
        let index = self.read_index(db, b)?;
        if let (Some(w), Some(Some(h))) = (self.wal.as_ref(), index) {
            // Nothing published since the last call: the cheap answer for every page a
            // checkpoint writes.
            if (h.salt1, h.salt2) == (w.hdr.salt1, w.hdr.salt2)
                && w.end_of(h.max_frame) == w.committed_end
            {
                return self.note_awaiting();
            }
        }
        let fd = self.wal_fd.as_ref().expect("WAL open");
        let Some(hdr) = WalTrack::read_header(fd)? else {
            return Ok(());
        };
        match &self.wal {
            Some(w) if w.hdr == hdr => {}
            Some(w) => {
                log::debug!(
                    "{}: a new WAL generation began (salts {:08x}/{:08x} after {:08x}/{:08x}, staged up to offset {})",
                    db.name(),
                    hdr.salt1,
                    hdr.salt2,
                    w.hdr.salt1,
                    w.hdr.salt2,
                    w.committed_end
                );
                self.main(db, b)?;
                self.settle_generation(db)?;
                self.barrier(db)?;
                self.fold_generation();
                self.wal = Some(WalTrack::new(hdr));
            }
            None => self.wal = Some(WalTrack::new(hdr)),
        }
        let w = self.wal.as_mut().expect("WAL tracked");
        // Published: up to the index's last frame, if it describes this generation (else
        // nothing yet); without readers of the index, every complete commit.
        let limit = match index {
            None => u64::MAX,
            Some(Some(h)) if (h.salt1, h.salt2) == (w.hdr.salt1, w.hdr.salt2) => {
                w.end_of(h.max_frame)
            }
            Some(_) => w.committed_end,
        };
        w.forget_pending();
        log::trace!(
            "{}: catch-up to WAL offset {limit} from {}",
            db.name(),
            w.committed_end
        );
        self.main(db, b)?;
        self.capture_wal(db, b, Upto::Published(limit))?;
        // A straight database's large transaction goes to disk while the app still writes it:
        // the WAL sync that starts its checkpoint then has little left to write beside the
        // staging barrier (docs/PERFORMANCE.md; on the default mount no gain showed).
        if db.is_straight() {
            if let (Some(w), Some(fd)) = (self.wal.as_mut(), self.wal_fd.as_ref()) {
                w.kick_written(fd);
            }
        }
        self.note_awaiting()
    }

    /// Records whether frames follow the last staged commit (see `awaiting`).
    pub(super) fn note_awaiting(&mut self) -> io::Result<()> {
        if let (Some(w), Some(fd)) = (self.wal.as_ref(), self.wal_fd.as_ref()) {
            self.awaiting = w.frame_follows(fd)?;
        }
        Ok(())
    }

    /// SQLite's WAL index header from the `-shm` file: `None` when nobody has that file
    /// open (exclusive locking mode keeps the index in the process: a single connection,
    /// so nobody can overwrite what it committed and every complete commit counts);
    /// `Some(None)` while it cannot be read consistently (not initialised, being updated).
    pub(super) fn read_index(
        &mut self,
        db: &Db,
        b: &Backing,
    ) -> io::Result<Option<Option<WalIndexHeader>>> {
        if db.shm_users.load(Ordering::Relaxed) == 0 {
            return Ok(None);
        }
        if self.shm_fd.is_none() {
            self.shm_fd = b.open_read(&format!("{}-shm", db.name()))?;
        }
        let Some(f) = self.shm_fd.as_ref() else {
            return Ok(Some(None));
        };
        let mut buf = [0u8; WAL_INDEX_HEADER];
        // The two copies differ only while a writer updates them: try again shortly.
        for _ in 0..8 {
            if !read_exact_at(f, &mut buf, 0)? {
                break;
            }
            if let Some(h) = WalIndexHeader::parse(&buf) {
                return Ok(Some(Some(h)));
            }
            std::thread::yield_now();
        }
        Ok(Some(None))
    }

    /// Stages the transactions completed in the WAL since the last call, up to `upto`; the one
    /// path by which WAL-mode commits reach the staging log.
    pub(super) fn capture_wal(&mut self, db: &Db, b: &Backing, upto: Upto) -> io::Result<()> {
        let (hint, limit) = match upto {
            Upto::Now if db.observed() => return self.catch_up(db, b),
            Upto::Now => (None, u64::MAX),
            Upto::Written(off, data) => (Some((off, data)), u64::MAX),
            Upto::Published(limit) => (None, limit),
        };
        if self.wal.is_some() {
            // Descriptors are dropped after a failed capture; without one, commits written
            // through would go unseen until the WAL is opened again.
            self.open_wal(db, b)?;
        }
        let (Some(w), Some(fd)) = (self.wal.as_mut(), self.wal_fd.as_ref()) else {
            return Ok(());
        };
        let mut start = (w.committed_end, w.cksum);
        let txns = w.advance(fd, hint, limit)?;
        w.kick(fd);
        for (i, t) in txns.iter().enumerate() {
            let r = self.commit_wal(db, b, t);
            if r.is_ok() && std::mem::take(&mut self.left_to_ckpt) {
                // Not published: the checkpoint's sync reads it again from here.
                if let Some(w) = self.wal.as_mut() {
                    w.rewind(start.0, start.1);
                }
                return Ok(());
            }
            start = (t.end, t.cksum);
            if let Err(e) = r {
                // The tracker is past these commits already: keep its page index true to the
                // WAL, so the snapshot staged next (see `guard`) reads their pages.
                if let Some(w) = self.wal.as_mut() {
                    for t in &txns[i..] {
                        w.publish(t);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    pub(super) fn commit_wal(&mut self, db: &Db, b: &Backing, t: &WalTxn) -> io::Result<()> {
        self.main(db, b)?;
        let w = self.wal.as_ref().expect("WAL tracked");
        let ps = w.hdr.page_size;
        let fsz = w.hdr.frame_size();
        let walpos = WalPos {
            salt: (w.hdr.salt1, w.hdr.salt2),
            cksum: t.cksum,
            end: t.end,
        };
        if db.is_straight() && (self.blind.is_some() || self.resnapshot.is_some()) {
            // Followed, not staged: the files are read whole at rest, at the newest commit
            // (`straight.rs`); a snapshot of this one could see later frames a checkpoint
            // already copied.
            if let Some(why) = self.resnapshot.clone() {
                self.go_blind(db, &why);
            }
            self.commits_seen += 1;
            self.wal.as_mut().expect("WAL tracked").publish(t);
            return Ok(());
        }
        if self.is_padding(t, ps)?
            || self.resnapshot.is_some()
            || (self.page_size != ps && self.db_pages != 0)
        {
            let padding = self.resnapshot.is_none() && self.page_size == ps;
            self.wal.as_mut().expect("WAL tracked").publish(t);
            if padding {
                return Ok(());
            }
            self.commits_seen += 1;
            let why = self
                .resnapshot
                .clone()
                .unwrap_or_else(|| "page size changed".into());
            return self.resnapshot_now(db, b, &why, walpos);
        }
        self.commits_seen += 1;
        let TxnPages {
            pages,
            checksum,
            from_file,
            frameless,
        } = self.wal_txn_pages(t, ps)?;
        if db.is_straight() && (frameless || !from_file.is_empty()) {
            // What the database file gave is this commit's old state only if no checkpoint
            // copied a frame of it or after it before those reads (`straight.rs`).
            let first = ((t.frames[0].off - sqlite::WAL_HEADER) / fsz) as u32;
            if frameless || self.copies_past(db, b, first)? {
                if !frameless && self.leave_to_checkpoint(db, b)? {
                    self.commits_seen -= 1;
                    return Ok(());
                }
                self.go_blind(
                    db,
                    "a checkpoint copied frames before sqlfs read what they replace (synchronous=OFF)",
                );
                self.wal.as_mut().expect("WAL tracked").publish(t);
                return Ok(());
            }
            self.base.extend(from_file);
        }
        let h = self.next_header(
            Kind::Txn,
            ps,
            t.db_pages,
            checksum,
            pages.len() as u32,
            walpos,
        );
        if !self.adopt_early(db, t, &pages, &h) {
            let newest: HashMap<u32, &wal::WalFrame> =
                t.frames.iter().map(|f| (f.pgno, f)).collect();
            let fd = self.wal_fd.as_ref().expect("WAL open");
            let mut frames = wal::FrameReader::new(fd, t.end);
            append_pages(db, &h, &pages, &mut |p, buf| match newest.get(&p) {
                Some(f) => frames.page(f, buf),
                None => self.read_page(p, ps, buf),
            })?;
        }
        self.advance_to(&h);
        self.wal.as_mut().expect("WAL tracked").publish(t);
        self.deferred = None;
        Ok(())
    }

    /// Padding: a copy of the previous commit frame, written to fill a sector. Same page,
    /// same bytes, same size: the state does not change, so no TXID is spent on it.
    pub(super) fn is_padding(&self, t: &WalTxn, ps: u32) -> io::Result<bool> {
        let (Some(w), Some(fd)) = (&self.wal, &self.wal_fd) else {
            return Ok(false);
        };
        let Some((lp, loff)) = w.last_commit else {
            return Ok(false);
        };
        if t.frames.len() != 1
            || t.db_pages != self.db_pages
            || self.resnapshot.is_some()
            || t.frames[0].pgno != lp
        {
            return Ok(false);
        }
        let f = &t.frames[0];
        // The common case, a new version of the same page, is told apart by its CRC without
        // reading the previous commit frame back.
        if let Some(&(off, crc)) = w.index.get(&lp) {
            if off == loff && crc != f.crc {
                return Ok(false);
            }
        }
        let mut c = Vec::new();
        let new = match &f.page {
            Some(p) => &p[..],
            None => {
                c.resize(ps as usize, 0);
                read_exact_at(fd, &mut c, f.off + FRAME_HEADER)?;
                &c[..]
            }
        };
        let mut a = vec![0u8; ps as usize];
        Ok(read_exact_at(fd, &mut a, loff + FRAME_HEADER)? && a == new)
    }

    /// CRC of the committed version of page `pgno` (before the transaction being staged),
    /// and whether it was read from the database file (not the index, nor `base`).
    pub(super) fn committed_crc(
        &self,
        pgno: u32,
        ps: u32,
        buf: &mut [u8],
    ) -> io::Result<(u64, bool)> {
        if let Some(&(_, c)) = self.wal.as_ref().and_then(|w| w.index.get(&pgno)) {
            return Ok((c, false));
        }
        if let Some(&c) = self.base.get(&pgno) {
            return Ok((c, false));
        }
        self.read_page(pgno, ps, buf)?;
        Ok((page_crc(pgno, buf), true))
    }

    /// The pages a WAL transaction leaves (newest frame per page, within the new size, plus
    /// pages that come into existence without a frame, like the lock page) and the rolling
    /// checksum after it. Must run before the transaction is published to the index, so old
    /// versions are still found. Reads only old versions (and frameless pages), one at a
    /// time: memory does not grow with the transaction.
    pub(super) fn wal_txn_pages(&self, t: &WalTxn, ps: u32) -> io::Result<TxnPages> {
        let mut newest: HashMap<u32, usize> = HashMap::new();
        for (i, f) in t.frames.iter().enumerate() {
            newest.insert(f.pgno, i);
        }
        let old_pages = self.db_pages;
        let mut pages: BTreeSet<u32> = newest
            .keys()
            .copied()
            .filter(|&p| p <= t.db_pages)
            .collect();
        pages.extend((old_pages + 1..=t.db_pages).filter(|p| !newest.contains_key(p)));
        let mut checksum = self.checksum;
        let mut buf = vec![0u8; ps as usize];
        // Out: the old versions of changed pages and of pages cut off the end. When those
        // are every old page (a `VACUUM` rewrites them all), their CRCs XOR to the old
        // checksum itself, so none is looked up (or read from the database file). SQLite
        // never writes the page holding the lock bytes at 1 GiB: one that stays, frameless,
        // keeps its old version, which is all that is then looked up.
        let gone = t.db_pages + 1..=old_pages;
        let kept = old_pages.min(t.db_pages);
        let lock = u32::try_from((1u64 << 30) / ps as u64 + 1).unwrap_or(u32::MAX);
        let lock_stays = lock <= kept && !newest.contains_key(&lock);
        let mut from_file = Vec::new();
        if (1..=kept).all(|p| newest.contains_key(&p) || (lock_stays && p == lock)) {
            checksum = 0;
            if lock_stays {
                let (c, read) = self.committed_crc(lock, ps, &mut buf)?;
                if read {
                    from_file.push((lock, c));
                }
                checksum ^= c;
            }
        } else {
            for p in pages
                .iter()
                .copied()
                .filter(|&p| p <= old_pages)
                .chain(gone)
            {
                let (c, read) = self.committed_crc(p, ps, &mut buf)?;
                if read {
                    from_file.push((p, c));
                }
                checksum ^= c;
            }
        }
        // In: the new versions, whose CRCs the frames carry from their validation.
        let mut frameless = false;
        for &p in &pages {
            checksum ^= match newest.get(&p) {
                Some(&i) => t.frames[i].crc,
                None => {
                    // SQLite never writes the page that holds the lock bytes at 1 GiB.
                    frameless |= p != lock;
                    self.read_page(p, ps, &mut buf)?;
                    page_crc(p, &buf)
                }
            };
        }
        Ok(TxnPages {
            pages: pages.into_iter().collect(),
            checksum,
            from_file,
            frameless,
        })
    }
}
