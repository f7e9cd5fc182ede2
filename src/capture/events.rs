//! The file events of one database, applied to its state: each write, truncation, unlink and
//! sync of the database file, its WAL or its journal is routed to WAL-mode commit detection
//! (`walmode.rs`) or rollback-journal commits (`journal.rs`), with the staging barrier placed
//! before any operation that destroys the last other durable copy of a staged transaction.

use std::io;

use super::walmode::Upto;
use super::{Db, Role, State};
use crate::backing::Backing;
use crate::sqlite::{self, page_crc};

impl State {
    pub(super) fn before_write(
        &mut self,
        db: &Db,
        b: &Backing,
        role: Role,
        off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        self.main(db, b)?;
        match role {
            Role::Wal => {
                if off < sqlite::WAL_HEADER {
                    // A new WAL generation starts: the old frames will be overwritten.
                    self.capture_wal(db, b, Upto::Now)?;
                    self.settle_generation(db)?;
                    self.barrier(db)?;
                } else if self.wal.as_ref().is_some_and(|w| off < w.committed_end)
                    && !self.wal_holds(off, data)?
                {
                    self.rewind_wal(db, off)?;
                }
            }
            Role::Main => {
                self.main_written_through(db);
                if db.observed() {
                    // In WAL mode this is a checkpoint: it may only copy back what is staged.
                    self.catch_up(db, b)?;
                }
                if self.in_wal_mode() {
                    // A checkpoint copying committed frames back: it may only go ahead once
                    // everything is staged (see `Db::refuses_checkpoint`).
                    self.retry(db, b)?;
                    self.barrier(db)?;
                } else {
                    self.begin_change(db, b)?;
                    if self.rb.is_clean() {
                        self.barrier(db)?;
                    }
                    let (ps, pages) = (self.page_size, self.db_pages);
                    let mut buf = vec![0u8; ps as usize];
                    let need: Vec<u32> = self.rb.note_write(off, data.len() as u64, ps, pages);
                    for pgno in need {
                        self.read_page(pgno, ps, &mut buf)?;
                        self.rb.old_crc.insert(pgno, page_crc(pgno, &buf));
                    }
                }
            }
            Role::Journal | Role::Other => {}
        }
        Ok(())
    }

    pub(super) fn after_write(
        &mut self,
        db: &Db,
        b: &Backing,
        role: Role,
        off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        match role {
            Role::Wal => {
                if off == 0 {
                    // A new WAL generation (first header or restart after a checkpoint that
                    // backfilled every frame): the database file now holds all committed pages.
                    self.reopen(db, b, Role::Wal)?;
                }
                if let Some(w) = self.wal.as_mut() {
                    w.note_write(off, data);
                }
                self.capture_wal(db, b, Upto::Written(off, data))?;
            }
            Role::Journal => {
                if off == 0 && data.len() >= 8 {
                    if data[..8] == sqlite::JOURNAL_MAGIC {
                        self.rb.journal_live = true;
                    } else if data[..8].iter().all(|&x| x == 0) {
                        log::debug!(
                            "{}: journal header zeroed ({} bytes written at 0)",
                            db.name(),
                            data.len()
                        );
                        self.commit_rollback(db, b)?;
                    }
                }
            }
            Role::Main | Role::Other => {}
        }
        Ok(())
    }

    pub(super) fn before_truncate(
        &mut self,
        db: &Db,
        b: &Backing,
        role: Role,
        size: u64,
    ) -> io::Result<()> {
        self.main(db, b)?;
        if role == Role::Main {
            if db.is_straight() {
                // A checkpoint's closing truncate: pages past the end are gone.
                if self.page_size > 0 {
                    let keep = size.div_ceil(self.page_size as u64);
                    self.base.retain(|&p, _| (p as u64) <= keep);
                }
            } else {
                self.main_written_through(db);
            }
            if db.observed() {
                self.catch_up(db, b)?;
            }
        }
        match role {
            Role::Wal if db.is_straight() => {
                // The WAL is cut after a checkpoint that copied it all: the files are at rest.
                self.resync(db, b)?;
                self.barrier(db)
            }
            Role::Wal => {
                self.capture_wal(db, b, Upto::Now)?;
                if size < sqlite::WAL_HEADER
                    || self.wal.as_ref().is_some_and(|w| size < w.committed_end)
                {
                    self.settle_generation(db)?;
                }
                self.barrier(db)
            }
            Role::Main if !self.in_wal_mode() => {
                self.begin_change(db, b)?;
                if self.rb.is_clean() {
                    self.barrier(db)?;
                }
                let (ps, pages) = (self.page_size, self.db_pages);
                if ps > 0 {
                    let first_gone = size.div_ceil(ps as u64) as u32 + 1;
                    let mut buf = vec![0u8; ps as usize];
                    for pgno in first_gone..=pages {
                        if !self.rb.old_crc.contains_key(&pgno) {
                            self.read_page(pgno, ps, &mut buf)?;
                            self.rb.old_crc.insert(pgno, page_crc(pgno, &buf));
                        }
                    }
                }
                self.rb.truncated = true;
                Ok(())
            }
            Role::Main => {
                if db.is_straight() {
                    // A checkpoint that copied every frame, about to record it (a WAL restart
                    // may follow): the files are at rest (`straight.rs`).
                    self.resync(db, b)?;
                }
                self.retry(db, b)?;
                self.barrier(db)
            }
            _ => Ok(()),
        }
    }

    pub(super) fn after_truncate(
        &mut self,
        db: &Db,
        b: &Backing,
        role: Role,
        size: u64,
    ) -> io::Result<()> {
        match role {
            Role::Wal => {
                if size < sqlite::WAL_HEADER
                    || self.wal.as_ref().is_some_and(|w| size < w.committed_end)
                {
                    self.fold_generation();
                    self.wal = None;
                    self.reopen(db, b, Role::Wal)?;
                }
                Ok(())
            }
            Role::Journal if size == 0 => {
                log::debug!("{}: journal truncated", db.name());
                self.commit_rollback(db, b)
            }
            _ => Ok(()),
        }
    }

    pub(super) fn before_unlink(&mut self, db: &Db, b: &Backing, role: Role) -> io::Result<()> {
        match role {
            Role::Wal if db.is_straight() => {
                // Deleted after a checkpoint that copied it all, under an exclusive lock.
                self.resync(db, b)?;
                self.barrier(db)
            }
            Role::Wal => {
                self.capture_wal(db, b, Upto::Now)?;
                self.settle_generation(db)?;
                self.barrier(db)
            }
            Role::Main => self.flush_journalless(db, b),
            _ => Ok(()),
        }
    }

    pub(super) fn after_unlink(&mut self, db: &Db, b: &Backing, role: Role) -> io::Result<()> {
        match role {
            Role::Wal => {
                self.fold_generation();
                self.wal = None;
                self.wal_fd = None;
                if db.is_straight() {
                    self.wal_deleted_straight(db, b);
                }
                Ok(())
            }
            Role::Journal => self.commit_rollback(db, b),
            Role::Main => {
                self.main_fd = None;
                Ok(())
            }
            Role::Other => Ok(()),
        }
    }

    pub(super) fn on_fsync(
        &mut self,
        db: &Db,
        b: &Backing,
        role: Role,
        app: Option<&std::fs::File>,
        flushed: &mut Option<io::Result<()>>,
    ) -> io::Result<()> {
        match role {
            Role::Main => self.flush_journalless(db, b),
            Role::Wal if db.is_straight() => self.straight_wal_sync(db, b, app, flushed),
            // `PERSIST` mode syncs the journal after zeroing its header: the commit, seen
            // here if the journal went straight through (`journal.rs`).
            Role::Journal => self.journal_check(db, b),
            _ => Ok(()),
        }
    }
}
