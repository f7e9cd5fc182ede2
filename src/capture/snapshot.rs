//! Full snapshots and staging failures: the whole database staged as one record when the
//! state cannot be derived incrementally (first sighting, page size change, continuity lost,
//! an earlier capture failed), the failing state that refuses checkpoints until that snapshot
//! is on file, its retries, and the live image of a database as its files hold it now.
//!
//! Invariant: a failed capture puts the state back to the last record on file and asks for a
//! snapshot chaining from it, so TXIDs have no gap and the stream stays exact; the failure is
//! cleared only by a staged snapshot (see [`StagingFailure`](super::StagingFailure)).

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use super::journal::Rollback;
use super::wal::WalTrack;
use super::{append_pages, Db, StagingFailure, State, RETRY_GAP};
use crate::backing::Backing;
use crate::sqlite::page_crc;
use crate::stage::{Kind, WalPos};

/// The error of a capture that needs the database file when none stands at its name.
#[derive(Debug)]
pub(super) struct Vanished;

impl std::fmt::Display for Vanished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database file vanished")
    }
}

impl std::error::Error for Vanished {}

/// True if `e` says the database file is gone ([`Vanished`]).
fn is_vanished(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<Vanished>())
}

impl Db {
    /// Runs `f` on the state, then writes out the records it appended (they reach the staging
    /// file together, see [`DbStage::append`]), so no record is left in memory once the
    /// request or catch-up that made it is done. Capture errors never fail the app's I/O: they
    /// are logged, the state goes back to what the staging log holds (records that could not
    /// be written are gone, and their TXIDs are given again: no gap), and the next commit
    /// becomes a full snapshot so the stream stays exact (see [`StagingFailure`]).
    pub(super) fn guard(&self, f: impl FnOnce(&mut State, &Db) -> io::Result<()>) {
        let mut st = self.state.lock();
        let seen = st.commits_seen;
        // Parked and nobody's: what runs here (an inspection, a retry, a catch-up) leaves it
        // parked again.
        let was_parked = st.parked.is_some();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            st.unpark(self)?;
            f(&mut st, self)
        }));
        let flushed = self.stage.flush();
        if was_parked && self.open_handles() == 0 {
            st.park();
        }
        let err = match (res, flushed) {
            (Ok(Ok(())), Ok(())) => {
                self.note_success(&st, st.commits_seen - seen);
                return;
            }
            (Ok(Err(e)), _) if self.retired.load(Ordering::Relaxed) || is_vanished(&e) => {
                self.gone_meanwhile(&mut st, e);
                return;
            }
            (Ok(Err(e)), _) => e.to_string(),
            (Err(_), _) => "internal error (panic) in capture".to_string(),
            (Ok(Ok(())), Err(e)) => e.to_string(),
        };
        let lost = st.commits_seen - seen;
        self.failed(&mut st, err, lost);
    }

    /// A capture attempt found the database's file gone: deleted or renamed away while it
    /// ran (the request that did it retires the database or moves it to its new name, see
    /// `rename.rs`), or removed from the backing directory behind sqlfs. Nothing is failing:
    /// there is no database left at this name to stage. The state goes back to the last
    /// record on file, and the next record, if this database lives on under another name, is
    /// a snapshot, so the stream stays exact.
    fn gone_meanwhile(&self, st: &mut State, err: io::Error) {
        // Said once, until a snapshot is staged again.
        if self.retired.load(Ordering::Relaxed) || st.resnapshot.is_some() {
            log::debug!("{}: capture found its file gone: {err}", self.name());
        } else {
            log::info!(
                "{}: its database file is gone (deleted or moved meanwhile); nothing is \
                 staged until a database stands at that name again",
                self.name()
            );
        }
        if let Err(e) = st.rewind_to_staged(self) {
            log::error!("{}: cannot read the staging log's base: {e}", self.name());
        }
        st.resnapshot
            .get_or_insert_with(|| format!("an earlier capture found the file gone: {err}"));
        st.main_fd = None;
        st.wal_fd = None;
        st.shm_fd = None;
    }

    /// A retired database stages nothing more: a failure it was in ends with it (it no longer
    /// counts among the failing databases).
    pub(super) fn end_failure(&self) {
        if self.failing.lock().take().is_some() {
            self.failing_now.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A capture attempt failed: back to the last record on file, the next record a snapshot
    /// chaining from it. Logged at the first failure of an episode, not at every retry.
    pub(super) fn failed(&self, st: &mut State, err: String, lost: u64) {
        self.stage_errors.fetch_add(1, Ordering::Relaxed);
        let mut failing = self.failing.lock();
        match failing.as_mut() {
            None => {
                log::error!(
                    "{}: capture failed, commits are not being staged: {err}; the next transaction will be staged as a full snapshot (retried until it succeeds)",
                    self.name()
                );
                self.failing_now.fetch_add(1, Ordering::Relaxed);
                *failing = Some(StagingFailure {
                    error: err.clone(),
                    since: SystemTime::now(),
                    waiting: lost,
                });
            }
            Some(f) => {
                log::debug!("{}: staging still fails: {err}", self.name());
                f.error = err.clone();
                f.waiting += lost;
            }
        }
        drop(failing);
        if let Err(e) = st.rewind_to_staged(self) {
            log::error!("{}: cannot read the staging log's base: {e}", self.name());
        }
        // Keep the first reason: it is the one the log explains.
        if st.resnapshot.is_none() {
            st.resnapshot = Some(format!("an earlier capture failed: {err}"));
        }
        st.main_fd = None;
        st.wal_fd = None;
        st.shm_fd = None;
    }

    /// A capture attempt succeeded: if staging was failing and the snapshot that makes the
    /// stream whole is now on file, it has recovered.
    pub(super) fn note_success(&self, st: &State, seen: u64) {
        let mut failing = self.failing.lock();
        let Some(f) = failing.as_mut() else {
            return;
        };
        if st.resnapshot.is_some() {
            f.waiting += seen;
            return;
        }
        log::warn!(
            "{}: staging works again: TXID {} is a full snapshot of the database, after {} commit(s) could not be staged individually since {}",
            self.name(),
            st.txid,
            f.waiting + seen,
            crate::time::fmt_time(
                f.since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            )
        );
        *failing = None;
        self.failing_now.fetch_sub(1, Ordering::Relaxed);
    }
}

impl State {
    /// Stages the whole current database (main file overlaid with committed WAL frames) as
    /// the next TXID, and says why.
    pub(super) fn snapshot_with(
        &mut self,
        db: &Db,
        b: &Backing,
        why: &str,
        wal: WalPos,
    ) -> io::Result<()> {
        if db.is_straight() && !self.at_rest {
            // Only at rest can a straight database's files be read whole (`straight.rs`).
            self.resnapshot.get_or_insert_with(|| why.to_string());
            self.go_blind(db, why);
            return Ok(());
        }
        if db.failing.lock().is_some() {
            // Retried until it is staged: logged when it is (see `Db::note_success`).
            log::debug!(
                "{}: trying to stage a full snapshot as TXID {}: {why}",
                db.name(),
                self.txid + 1
            );
        } else if self.txid == 0 {
            log::info!(
                "{}: staging the initial snapshot as TXID 1 ({why})",
                db.name()
            );
        } else {
            log::warn!(
                "{}: staging a full snapshot as TXID {}: {why}",
                db.name(),
                self.txid + 1
            );
        }
        self.main(db, b)?;
        if self.wal.is_some() {
            // The committed frames are read from the WAL (its descriptor may have been
            // dropped by a failed capture).
            self.open_wal(db, b)?;
        }
        let (checksum, ps, pages) = self.full_checksum(db, b)?;
        let h = self.next_header(Kind::Snapshot, ps, pages, checksum, pages, wal);
        let all: Vec<u32> = (1..=pages).collect();
        // Pages are streamed one at a time: memory does not grow with the database.
        append_pages(db, &h, &all, &mut |p, buf| self.read_page(p, ps, buf))?;
        self.advance_to(&h);
        self.resnapshot = None;
        self.rb = Rollback::default();
        Ok(())
    }

    /// Stages the snapshot the state asks for, unless staging is failing and one was tried less
    /// than [`RETRY_GAP`] ago: then it stays asked for, and the commit waits in the files
    /// (the WAL, whose checkpoints are refused meanwhile, or the database file).
    pub(super) fn resnapshot_now(
        &mut self,
        db: &Db,
        b: &Backing,
        why: &str,
        wal: WalPos,
    ) -> io::Result<()> {
        if db.failing.lock().is_some() {
            if self.last_retry.is_some_and(|t| t.elapsed() < RETRY_GAP) {
                self.resnapshot.get_or_insert_with(|| why.to_string());
                return Ok(());
            }
            self.last_retry = Some(Instant::now());
        }
        self.snapshot_with(db, b, why, wal)
    }

    /// While staging fails: takes what the WAL published (observed mode) and tries the
    /// snapshot again if it is due and the files are between transactions (never in the
    /// middle of a rollback-journal transaction).
    pub(super) fn retry(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        if db.failing.lock().is_none() {
            return Ok(());
        }
        if db.observed() {
            self.catch_up(db, b)?;
        }
        let Some(why) = self.resnapshot.clone() else {
            return Ok(());
        };
        if !self.in_wal_mode() && (self.rb.journal_live || !self.rb.is_clean()) {
            return Ok(());
        }
        let pos = self.current_walpos();
        self.resnapshot_now(db, b, &why, pos)
    }

    /// Checksum, page size and size in pages of the database as its files hold it now.
    pub(super) fn full_checksum(&mut self, db: &Db, b: &Backing) -> io::Result<(u64, u32, u32)> {
        self.main(db, b)?;
        let (ps, pages) = self.logical_size()?;
        let mut buf = vec![0u8; ps as usize];
        let mut c = 0;
        for p in 1..=pages {
            self.read_page(p, ps, &mut buf)?;
            c ^= page_crc(p, &buf);
        }
        Ok((c, ps, pages))
    }
}

/// Writes the database `name` as its files hold it now (main file overlaid with the committed
/// frames of its WAL) into `out`. Returns (page size, pages). Reads only; touches no state.
pub fn live_image(b: &Backing, name: &str, out: &File) -> io::Result<(u32, u32)> {
    let mut st = State {
        page_size: 0,
        db_pages: 0,
        checksum: 0,
        txid: 0,
        wal: None,
        rb: Rollback::default(),
        main_fd: b.open_read(name)?,
        wal_fd: b.open_read(&format!("{name}-wal"))?,
        resnapshot: None,
        awaiting: false,
        shm_fd: None,
        commits_seen: 0,
        last_retry: None,
        parked: None,
        straight: 0,
        base: Default::default(),
        blind: None,
        blind_stamp: None,
        at_rest: false,
        ckpt_copied: None,
        may_defer: false,
        deferred: None,
        left_to_ckpt: false,
        early: None,
        ahead_off: None,
    };
    if let Some(fd) = st.wal_fd.as_ref() {
        st.wal = WalTrack::read_header(fd)?.map(WalTrack::new);
        if let Some(w) = st.wal.as_mut() {
            for t in w.advance(fd, None, u64::MAX)? {
                w.publish(&t);
            }
        }
    }
    let (ps, pages) = st.logical_size()?;
    out.set_len(0)?;
    let mut buf = vec![0u8; ps as usize];
    for p in 1..=pages {
        st.read_page(p, ps, &mut buf)?;
        std::os::unix::fs::FileExt::write_all_at(out, &buf, (p as u64 - 1) * ps as u64)?;
    }
    Ok((ps, pages))
}
