//! Staging a straight database's large transaction while its app still writes it. Each of the
//! watcher's catch-ups that leaves frames after the last commit (a transaction being written)
//! copies the frames written since into a record staged ahead ([`crate::stage::Prestaged`]),
//! once there are [`START_AT`] bytes of them. At the
//! commit, the committed transaction is compared with it frame by frame, by page number and
//! page CRC: pages the app rewrote in place since (SQLite does that to pages of the open
//! transaction it had to spill) are patched, later frames added, and the record joins the log
//! ([`crate::stage::DbStage::adopt`]). Anything else (frames that do not match, pages past the
//! new end, pages without a frame) drops it, and the commit is staged the usual way. A copy
//! that ran past its commit, or met a page twice, took frames a rolled-back transaction left
//! behind (the frames SQLite writes without salts carry no mark of their generation): then
//! nothing more is staged ahead until the WAL restarts, since every later transaction of that
//! generation could copy them again.
//!
//! Invariant: what is adopted holds exactly the committed transaction's pages, each the
//! version of its newest frame, as the usual way's record would (in frame order, not page
//! order). Nothing here is trusted before the commit's own validation of its frames.

use std::collections::HashMap;
use std::io;

use super::wal::{FrameReader, WalTxn};
use super::{Db, State};
use crate::sqlite::page_crc;
use crate::stage::{Prestaged, RecordHeader};

/// Bytes of frames an open transaction must have written before it is staged ahead: smaller
/// ones are staged at their commit.
const START_AT: u64 = 4 << 20;
/// Bytes of frames staged ahead per catch-up, so that one large transaction does not hold up
/// the watcher's other databases for long.
const STEP: u64 = 32 << 20;

/// A transaction being staged ahead.
pub(super) struct Early {
    /// Its WAL generation.
    salts: (u32, u32),
    /// WAL offset of its first frame (the committed end when it began).
    start: u64,
    /// WAL offset after the last frame staged.
    next: u64,
    /// `None` once given up on (a page written twice): the commit is staged the usual way.
    log: Option<Prestaged>,
}

impl State {
    /// Stages ahead the frames written since the last catch-up, if a large transaction is
    /// being written. Never fails: on any error the transaction is staged at its commit.
    pub(super) fn stage_ahead(&mut self, db: &Db) {
        if let Err(e) = self.try_stage_ahead(db) {
            log::debug!("{}: not staging ahead: {e}", db.name());
            self.early = None;
        }
    }

    fn try_stage_ahead(&mut self, db: &Db) -> io::Result<()> {
        let State {
            wal: Some(w),
            wal_fd: Some(fd),
            early,
            ..
        } = self
        else {
            return Ok(());
        };
        let salts = (w.hdr.salt1, w.hdr.salt2);
        if early
            .as_ref()
            .is_some_and(|e| e.salts != salts || e.start != w.committed_end)
        {
            *early = None;
        }
        if self.ahead_off == Some(salts) {
            return Ok(());
        }
        if early.is_none() {
            let fsz = w.hdr.frame_size();
            let probe = w.committed_end + START_AT.div_ceil(fsz) * fsz;
            if self.resnapshot.is_some()
                || self.blind.is_some()
                || (self.page_size != w.hdr.page_size && self.db_pages != 0)
                || !w.open_frame_at(fd, probe)?
            {
                return Ok(());
            }
            let log = db
                .stage
                .prestage(w.hdr.page_size)
                .map_err(io::Error::other)?;
            *early = Some(Early {
                salts,
                start: w.committed_end,
                next: w.committed_end,
                log: Some(log),
            });
        }
        let e = early.as_mut().expect("set above");
        let Some(log) = e.log.as_mut() else {
            return Ok(());
        };
        let mut twice = false;
        let r = w.uncommitted(fd, e.next, STEP, &mut |pgno, page| {
            if log.entry_of(pgno).is_some() {
                twice = true;
                return Err(io::Error::other("page written twice"));
            }
            log.push(pgno, page, page_crc(pgno, page))
                .map_err(io::Error::other)
        });
        if twice {
            log::debug!(
                "{}: a page written twice (frames a rolled-back transaction left?): nothing \
                 staged ahead until the WAL restarts",
                db.name()
            );
            e.log = None;
            self.ahead_off = Some(salts);
            return Ok(());
        }
        e.next = r?;
        log::trace!("{}: staged ahead up to WAL offset {}", db.name(), e.next);
        Ok(())
    }

    /// Stages committed transaction `t` as record `h` from what was staged ahead of it, if
    /// anything was and it matches; `pages` are the pages `h` promises. False if it was
    /// not (nothing appended: stage it the usual way).
    pub(super) fn adopt_early(
        &mut self,
        db: &Db,
        t: &WalTxn,
        pages: &[u32],
        h: &RecordHeader,
    ) -> bool {
        let Some(e) = self.early.take() else {
            return false;
        };
        if e.log
            .as_ref()
            .is_some_and(|l| l.entries().len() > t.frames.len())
        {
            // Copied past the commit: frames a rolled-back transaction left (SQLite's frames
            // without salts tell no generation from another). Each transaction of this WAL
            // generation could copy them again, so none is staged ahead until it restarts.
            log::debug!(
                "{}: staged ahead past the commit; nothing staged ahead until the WAL restarts",
                db.name()
            );
            self.ahead_off = Some(e.salts);
            return false;
        }
        match self.try_adopt(db, e, t, pages, h) {
            Ok(adopted) => adopted,
            Err(err) => {
                log::debug!("{}: staged ahead, not adopted: {err}", db.name());
                false
            }
        }
    }

    fn try_adopt(
        &self,
        db: &Db,
        e: Early,
        t: &WalTxn,
        pages: &[u32],
        h: &RecordHeader,
    ) -> io::Result<bool> {
        let (Some(w), Some(fd), Some(mut log)) = (self.wal.as_ref(), self.wal_fd.as_ref(), e.log)
        else {
            return Ok(false);
        };
        let staged = log.entries().to_vec();
        let lines_up = e.salts == (w.hdr.salt1, w.hdr.salt2)
            && t.frames.first().is_some_and(|f| f.off == e.start)
            && t.frames.len() >= staged.len()
            && t.frames.iter().zip(&staged).all(|(f, s)| f.pgno == s.0)
            && t.frames.iter().all(|f| f.pgno <= t.db_pages);
        let newest: HashMap<u32, usize> = t
            .frames
            .iter()
            .enumerate()
            .map(|(i, f)| (f.pgno, i))
            .collect();
        // Every page promised has a frame (none comes from the database file).
        if !lines_up || newest.len() != pages.len() || h.npages as usize != pages.len() {
            return Ok(false);
        }
        let mut rd = FrameReader::new(fd, t.end);
        let mut buf = vec![0u8; h.page_size as usize];
        let mut patched = 0;
        for (k, &(pgno, crc)) in staged.iter().enumerate() {
            let f = &t.frames[newest[&pgno]];
            if f.crc != crc {
                rd.page(f, &mut buf)?;
                log.patch(k, &buf, f.crc).map_err(io::Error::other)?;
                patched += 1;
            }
        }
        for (i, f) in t.frames.iter().enumerate().skip(staged.len()) {
            if newest[&f.pgno] == i && log.entry_of(f.pgno).is_none() {
                rd.page(f, &mut buf)?;
                log.push(f.pgno, &buf, f.crc).map_err(io::Error::other)?;
            }
        }
        log::trace!(
            "{}: TXID {} staged ahead: {} of {} pages, {patched} patched",
            db.name(),
            h.txid,
            staged.len(),
            pages.len()
        );
        db.stage.adopt(log, h).map_err(io::Error::other)?;
        Ok(true)
    }
}
