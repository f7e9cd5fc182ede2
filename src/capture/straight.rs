//! Straight databases: a database file the kernel reads and writes directly (kernel
//! passthrough), so that a checkpoint's page writes cost what they cost natively. None of
//! those writes reaches sqlfs, nor any write made after the database leaves WAL mode through
//! a handle opened while it was in it; this module keeps the stream exact without them.
//!
//! Invariants (docs/ARCHITECTURE.md, invariant 15):
//! - A handle goes straight only if its database is captured, in WAL mode when it is opened
//!   (header bytes 18 and 19 are 2) and the inode has no handle through sqlfs; every later
//!   handle on that inode joins it until all are closed (the kernel does not mix the kinds).
//! - Staged and durable before a checkpoint copies: SQLite records how many frames a
//!   checkpoint sets out to copy (`nBackfillAttempted` in the `-shm` file) before it syncs
//!   the WAL and before it copies anything. That sync reaches sqlfs even for handles that
//!   bypass it: when the `-shm` file says a checkpoint is starting (or cannot be read), sqlfs
//!   stages everything published and syncs staging before it lets the sync go.
//! - Staged and durable before a WAL restart: a restart needs a checkpoint that copied every
//!   frame, and such a checkpoint truncates the database file to its size (a request even for
//!   these handles, whatever `synchronous` says) before it records the WAL as copied; sqlfs
//!   catches up and syncs staging there, and the files are at rest (see below).
//! - The version a commit replaces, for a page its WAL generation had not changed yet, is
//!   read from the database file only while no checkpoint can have copied a frame sqlfs had
//!   not staged: `nBackfillAttempted`, read after those reads, is below the commit's first
//!   frame. Such CRCs are kept in `base` (the file's pages as of the generation's start), so
//!   each page is read once; at a generation's end the index is folded into it, and it is
//!   dropped when the file is written or cut through sqlfs. A file of up to [`PREFILL_MAX`]
//!   is read whole into `base` when it first goes straight (nothing writes it unseen yet), so
//!   the file is never read for this. With `synchronous=OFF` a checkpoint
//!   copies without the sync above and may run ahead: then the check fails and the database
//!   goes *blind*. When the check fails in the WAL watcher, the commit is first left
//!   unstaged for up to [`LEAVE_FOR`] (the tracker goes back to before it): with NORMAL or
//!   FULL the checkpoint is waiting in its sync for the capture lock and has copied nothing,
//!   and that sync stages the commit where the reads are sure.
//! - Blind: commits are followed but not staged, and at the next point where the files are
//!   *at rest* (no checkpoint running and no rollback-mode transaction half-written: the
//!   checkpoint's truncate, a starting checkpoint's WAL sync, the WAL's truncation or unlink,
//!   a rollback transaction's end, a journal-less sync, a new WAL's open, the last straight
//!   handle's close) the database is read whole and `base` filled from it; if it moved, the
//!   pages that differ from the old `base` are staged as one transaction when that accounts
//!   for the staged state, else a snapshot. The stream never holds a state the app did not
//!   see; in WAL mode it may skip commits made while blind. A database also goes blind when
//!   its WAL is deleted while straight handles are open (it may be leaving WAL mode): each of
//!   its rollback-mode commits then ends at one of those points and is staged there.
//! - No snapshot of a straight database is read except at rest (`at_rest`): one asked for
//!   elsewhere makes the database blind instead.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::journal::Rollback;
use super::{append_pages, read_exact_at, Capture, Db, State};
use crate::backing::Backing;
use crate::sqlite::{self, page_crc, WAL_CKPT_INFO_END};
use crate::stage::Kind;

/// Databases up to this size are read whole when their file first goes straight, so that
/// `base` knows every page (larger ones fill it as pages are first changed).
const PREFILL_MAX: u64 = 64 << 20;

/// How long the watcher leaves commits to one checkpoint whose WAL sync does not come
/// (`synchronous=OFF`) before the database goes blind.
const LEAVE_FOR: std::time::Duration = std::time::Duration::from_millis(100);

/// True if the file's first bytes are a SQLite header that says WAL mode.
pub fn shows_wal_mode(f: &File) -> bool {
    let mut b = [0u8; 20];
    read_exact_at(f, &mut b, 0).unwrap_or(false)
        && sqlite::is_db_header(&b)
        && b[18] == 2
        && b[19] == 2
}

/// One straight handle on a database, counted while it lives: dropping it (the kernel's
/// release) lets the database leave straight mode once it was the last.
pub struct StraightUse {
    db: Arc<Db>,
    backing: Arc<Backing>,
}

impl Drop for StraightUse {
    fn drop(&mut self) {
        let b = self.backing.clone();
        self.db.guard(|st, db| st.straight_closed(db, &b));
    }
}

impl Capture {
    /// A handle on the database file `rel` is about to go straight: capture catches up (so
    /// everything written so far through sqlfs is staged) and counts it. `None` if `rel` is
    /// not a captured database.
    pub fn straight_open(&self, rel: &str) -> Option<StraightUse> {
        let (role, _) = super::classify(rel);
        if role != super::Role::Main || !self.is_observed() {
            return None;
        }
        let db = self.get(rel)?;
        let mut ok = false;
        db.guard(|st, db| {
            if st.straight == 0 {
                st.catch_up(db, &self.backing)?;
                // Nothing writes the file unseen yet: every page's version is known now, so
                // no checkpoint running ahead of capture can hide one (`synchronous=OFF`).
                // `base` outlives the straight handles while nothing writes the file through
                // sqlfs, so a database opened again and again is read whole once.
                let size = st.main(db, &self.backing)?.metadata()?.len();
                if st.base.is_empty() && size <= PREFILL_MAX {
                    st.read_whole(db, &self.backing)?;
                }
                log::debug!("{}: its file goes straight through", db.name());
            }
            st.straight += 1;
            db.straight.fetch_add(1, Ordering::Relaxed);
            ok = true;
            Ok(())
        });
        ok.then(|| StraightUse {
            db,
            backing: self.backing.clone(),
        })
    }
}

impl Db {
    /// Straight handles open on this database's file.
    pub(super) fn is_straight(&self) -> bool {
        self.straight.load(Ordering::Relaxed) > 0
    }

    /// How many handles on this database's file go straight through the kernel now.
    pub fn straight_handles(&self) -> u32 {
        self.straight.load(Ordering::Relaxed)
    }
}

impl State {
    /// SQLite's (`nBackfill`, `nBackfillAttempted`) from the `-shm` file; `None` if nobody
    /// has it open or it cannot be read.
    pub(super) fn ckpt_info(&mut self, db: &Db, b: &Backing) -> io::Result<Option<(u32, u32)>> {
        if db.shm_users.load(Ordering::Relaxed) == 0 {
            return Ok(None);
        }
        if self.shm_fd.is_none() {
            self.shm_fd = b.open_read(&format!("{}-shm", db.name()))?;
        }
        let Some(f) = self.shm_fd.as_ref() else {
            return Ok(None);
        };
        let mut buf = [0u8; WAL_CKPT_INFO_END];
        if !read_exact_at(f, &mut buf, 0)? {
            return Ok(None);
        }
        Ok(sqlite::ckpt_info(&buf))
    }

    /// True if a checkpoint may have copied into the database file a frame past the first
    /// `frames` of this generation (see the module's invariants).
    pub(super) fn copies_past(&mut self, db: &Db, b: &Backing, frames: u32) -> io::Result<bool> {
        if let Some(copied) = self.ckpt_copied {
            return Ok(copied > frames);
        }
        Ok(match self.ckpt_info(db, b)? {
            Some((_, attempted)) => attempted > frames,
            None => true,
        })
    }

    /// The WAL watcher read a commit's old page versions from the file while `-shm` says a
    /// checkpoint set out to copy its frames: with `synchronous` NORMAL or FULL that
    /// checkpoint is waiting in its WAL sync for the capture lock the watcher holds, and has
    /// copied nothing, but with OFF it may be copying. True if the commit is left for that
    /// sync to stage ([`State::straight_wal_sync`], where the reads are sure), which then
    /// comes at once; false (the database goes blind, as without this) outside the watcher,
    /// or once the same checkpoint was waited for [`LEAVE_FOR`] without its sync coming.
    pub(super) fn leave_to_checkpoint(&mut self, db: &Db, b: &Backing) -> io::Result<bool> {
        if !self.may_defer || self.ckpt_copied.is_some() {
            return Ok(false);
        }
        let Some((_, attempted)) = self.ckpt_info(db, b)? else {
            return Ok(false);
        };
        let now = std::time::Instant::now();
        let since = match self.deferred {
            Some((a, since)) if a == attempted => since,
            _ => now,
        };
        if now.duration_since(since) > LEAVE_FOR {
            return Ok(false);
        }
        self.deferred = Some((attempted, since));
        self.left_to_ckpt = true;
        Ok(true)
    }

    /// A WAL sync is about to be passed on: if a checkpoint is starting (or the `-shm` file
    /// cannot tell), everything published is staged and durable first. `app` is the file of
    /// the handle being synced: the WAL's own flush then runs on it beside the barrier, and
    /// its outcome goes to `flushed` (the sync asked for is done, or failed with that error,
    /// which the file reports only once).
    pub(super) fn straight_wal_sync(
        &mut self,
        db: &Db,
        b: &Backing,
        app: Option<&File>,
        flushed: &mut Option<io::Result<()>>,
    ) -> io::Result<()> {
        let info = self.ckpt_info(db, b)?;
        if info.is_some_and(|(done, attempted)| attempted <= done) {
            return Ok(());
        }
        // The checkpoint waits in this sync, before copying anything, and holds the lock no
        // other checkpoint runs without: what is in the file was copied by the ones before
        // it, which recorded how far they got.
        self.ckpt_copied = info.map(|(done, _)| done);
        // The WAL's own flush runs beside the barrier, so the two flushes overlap instead of
        // following each other. It is the app's sync itself, on the handle's own file: begun
        // after the request came, it covers every write the app made before it.
        let (r, flush) = std::thread::scope(|s| {
            // No thread to be had: the app's sync flushes the WAL after the barrier, as
            // without this.
            let flush = app.and_then(|f| {
                std::thread::Builder::new()
                    .name("sqlfs-walsync".into())
                    .spawn_scoped(s, move || f.sync_data())
                    .ok()
            });
            let r = self.resync(db, b).and_then(|_| self.barrier(db));
            (r, flush.and_then(|h| h.join().ok()))
        });
        *flushed = flush;
        self.ckpt_copied = None;
        r
    }

    /// Makes the database blind (see the module's invariants) for `why`.
    pub(super) fn go_blind(&mut self, db: &Db, why: &str) {
        if self.blind.is_none() {
            log::debug!("{}: blind until the files are at rest: {why}", db.name());
            self.blind = Some(why.to_string());
        }
    }

    /// The WAL generation ends with every frame copied (the database file now holds what its
    /// index held): the index joins `base`. While blind `base` is dropped instead.
    pub(super) fn fold_generation(&mut self) {
        if self.base.is_empty() {
            return;
        }
        match (&self.wal, &self.blind) {
            (Some(w), None) => {
                for (&p, &(_, c)) in &w.index {
                    self.base.insert(p, c);
                }
                if let Some(n) = w.db_pages {
                    self.base.retain(|&p, _| p <= n);
                }
            }
            _ => self.base.clear(),
        }
    }

    /// The database file is written or cut through sqlfs (no straight handle is open): what
    /// `base` knows of it may no longer hold.
    pub(super) fn main_written_through(&mut self, db: &Db) {
        if !db.is_straight() && !self.base.is_empty() {
            self.base = HashMap::new();
        }
    }

    /// The WAL is deleted while straight handles are open: the database may be leaving WAL
    /// mode, and its rollback-mode writes through those handles would go unseen.
    pub(super) fn wal_deleted_straight(&mut self, db: &Db, b: &Backing) {
        self.blind_stamp = self.main(db, b).ok().and_then(|f| stamp(f).ok());
        self.go_blind(
            db,
            "its WAL was deleted while its file went straight through",
        );
    }

    /// A WAL is opened. One opened while the database is blind out of WAL mode is a new
    /// one, before any commit in it, by a connection holding a shared lock (no rollback-mode
    /// writer): at rest. The database is read whole, and its commits are then followed in
    /// the WAL, each staged.
    pub(super) fn wal_opened(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        self.open_wal(db, b)?;
        if self.blind.is_some() && self.wal.is_none() && db.is_straight() {
            self.resync(db, b)?;
            self.blind = None;
            self.blind_stamp = None;
        }
        Ok(())
    }

    /// At rest (see the module's invariants): takes what the WAL published and, if blind,
    /// reads the database whole and stages it if it moved.
    pub(super) fn resync(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        let was = std::mem::replace(&mut self.at_rest, true);
        let r = self.resync_at_rest(db, b);
        self.at_rest = was;
        r
    }

    fn resync_at_rest(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        if db.observed() {
            self.catch_up(db, b)?;
        }
        let Some(why) = self.blind.clone() else {
            if let Some(why) = self.resnapshot.clone() {
                let pos = self.current_walpos();
                return self.snapshot_with(db, b, &why, pos);
            }
            return Ok(());
        };
        log::debug!("{}: at rest while blind ({why})", db.name());
        // Out of WAL mode, straight handles write unseen until they close: blind stays.
        let leave = self.wal.is_some() || self.straight == 0;
        if self.wal.is_none() && self.resnapshot.is_none() && self.unchanged_since_blind(db, b) {
            // The file is as it was last read, still in WAL mode: after the usual last close
            // of a WAL database, nothing written since.
            if leave {
                self.blind = None;
                self.blind_stamp = None;
            }
            return Ok(());
        }
        let prev = std::mem::take(&mut self.base);
        let now = self.read_whole(db, b)?;
        if now != (self.checksum, self.page_size, self.db_pages) || self.resnapshot.is_some() {
            self.stage_moved(db, b, &prev, now, &why)?;
        }
        if leave {
            self.blind = None;
            self.blind_stamp = None;
        } else {
            self.blind_stamp = self.main(db, b).ok().and_then(|f| stamp(f).ok());
        }
        Ok(())
    }

    /// The database, just read whole (`now`; `base` holds its pages' CRCs), moved past the
    /// staged state: stages the pages that differ from `prev` as one transaction when `prev`
    /// accounts for the whole staged state (out of WAL mode, after an earlier whole read),
    /// else a snapshot.
    fn stage_moved(
        &mut self,
        db: &Db,
        b: &Backing,
        prev: &HashMap<u32, u64>,
        now: (u64, u32, u32),
        why: &str,
    ) -> io::Result<()> {
        let (checksum, ps, pages) = now;
        let known = self.wal.is_none() && self.resnapshot.is_none() && ps == self.page_size;
        let staged = (1..=self.db_pages).try_fold(0u64, |c, p| prev.get(&p).map(|x| c ^ x));
        if !known || staged != Some(self.checksum) {
            let pos = self.current_walpos();
            return self.snapshot_with(db, b, why, pos);
        }
        let changed: Vec<u32> = (1..=pages)
            .filter(|p| prev.get(p) != self.base.get(p))
            .collect();
        log::debug!(
            "{}: {} pages written past sqlfs staged as TXID {}",
            db.name(),
            changed.len(),
            self.txid + 1
        );
        let pos = self.current_walpos();
        let h = self.next_header(Kind::Txn, ps, pages, checksum, changed.len() as u32, pos);
        append_pages(db, &h, &changed, &mut |p, buf| self.read_page(p, ps, buf))?;
        self.advance_to(&h);
        self.rb = Rollback::default();
        Ok(())
    }

    /// True if the database file still says WAL mode and its size and times are those of
    /// the moment it went blind (a write through any handle changes them).
    fn unchanged_since_blind(&mut self, db: &Db, b: &Backing) -> bool {
        let Some(was) = self.blind_stamp else {
            return false;
        };
        let Ok(f) = self.main(db, b) else {
            return false;
        };
        shows_wal_mode(f) && stamp(f).is_ok_and(|now| now == was)
    }

    /// Checksum, page size and pages of the database as its files hold it now, read whole;
    /// `base` is filled from the pages read from the database file.
    pub(super) fn read_whole(&mut self, db: &Db, b: &Backing) -> io::Result<(u64, u32, u32)> {
        self.main(db, b)?;
        let (ps, pages) = self.logical_size()?;
        let mut buf = vec![0u8; ps as usize];
        let mut c = 0;
        let mut base = HashMap::with_capacity(pages as usize);
        for p in 1..=pages {
            let framed = self.wal.as_ref().is_some_and(|w| w.index.contains_key(&p));
            self.read_page(p, ps, &mut buf)?;
            let crc = page_crc(p, &buf);
            if !framed {
                base.insert(p, crc);
            }
            c ^= crc;
        }
        self.base = base;
        Ok((c, ps, pages))
    }

    /// The last straight handle closed: nothing can write the file behind sqlfs any more.
    pub(super) fn straight_closed(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        self.straight = self.straight.saturating_sub(1);
        let _ = db
            .straight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if self.straight > 0 {
            return Ok(());
        }
        if db.retired.load(Ordering::Relaxed) {
            // Its name is another file's now, or none.
            self.blind = None;
            self.base.clear();
            return Ok(());
        }
        let r = self.resync(db, b);
        if r.is_err() {
            self.blind = None;
            self.blind_stamp = None;
            self.base.clear();
        }
        r
    }
}

/// Size, modification and change times of a file: what a write changes.
fn stamp(f: &File) -> io::Result<(u64, i64, i64, i64, i64)> {
    let m = f.metadata()?;
    Ok((
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}
