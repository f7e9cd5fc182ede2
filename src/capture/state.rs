//! The committed state as staged, and the files it is read from: the committed version of a
//! page as the stream has it now (newest committed WAL frame, else the database file), the
//! header of the next record, and moving the state to a staged record.
//!
//! Invariant: the state (`txid`, `checksum`, `page_size`, `db_pages`) changes only by
//! [`State::advance_to`] a record just appended, or by going back to what the staging log
//! holds ([`State::rewind_to_staged`]), so it never runs ahead of the staging log.

use std::fs::File;
use std::io;

use super::wal::WalTrack;
use super::{read_exact_at, Db, Role, State};
use crate::backing::Backing;
use crate::sqlite::{self, FRAME_HEADER};
use crate::stage::{now_ns, Kind, RecordHeader, WalPos};

/// Appends the record `h` whose pages are `pages`, read one at a time by `read`.
pub(super) fn append_pages(
    db: &Db,
    h: &RecordHeader,
    pages: &[u32],
    read: &mut dyn FnMut(u32, &mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; h.page_size as usize];
    db.stage
        .append(h, |emit| {
            for &p in pages {
                read(p, &mut buf)?;
                emit(p, &buf)?;
            }
            Ok(())
        })
        .map_err(io::Error::other)
}

impl State {
    pub(super) fn reopen(&mut self, db: &Db, b: &Backing, role: Role) -> io::Result<()> {
        let name = db.name();
        match role {
            Role::Main => self.main_fd = b.open_read(&name)?,
            Role::Wal => {
                self.wal_fd = b.open_read(&format!("{name}-wal"))?;
                self.wal = match &self.wal_fd {
                    Some(f) => WalTrack::read_header(f)?.map(WalTrack::new),
                    None => None,
                };
            }
            _ => {}
        }
        Ok(())
    }

    pub(super) fn main(&mut self, db: &Db, b: &Backing) -> io::Result<&File> {
        if self.main_fd.is_none() {
            self.main_fd = b.open_read(&db.name())?;
        }
        self.main_fd
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, super::snapshot::Vanished))
    }

    /// The committed content of page `pgno` as the staged stream has it now: its newest
    /// committed WAL frame, else the database file (zeros past its end or if it is missing).
    pub(super) fn read_page(&self, pgno: u32, ps: u32, buf: &mut [u8]) -> io::Result<()> {
        if let (Some(w), Some(fd)) = (&self.wal, &self.wal_fd) {
            if let Some(&(off, _)) = w.index.get(&pgno) {
                if read_exact_at(fd, buf, off + FRAME_HEADER)? {
                    return Ok(());
                }
            }
        }
        buf.fill(0);
        let Some(f) = self.main_fd.as_ref() else {
            return Ok(());
        };
        let off = (pgno as u64 - 1) * ps as u64;
        let mut got = 0;
        while got < buf.len() {
            match std::os::unix::fs::FileExt::read_at(f, &mut buf[got..], off + got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        Ok(())
    }

    /// Stages the durable copy before data that only lives in the files is destroyed.
    pub(super) fn barrier(&self, db: &Db) -> io::Result<()> {
        if db.stage.is_dirty() {
            db.stage.sync().map_err(io::Error::other)?;
        }
        Ok(())
    }

    pub(super) fn in_wal_mode(&self) -> bool {
        self.wal.is_some()
    }

    /// The header of the next record.
    pub(super) fn next_header(
        &self,
        kind: Kind,
        ps: u32,
        db_pages: u32,
        checksum: u64,
        npages: u32,
        wal: WalPos,
    ) -> RecordHeader {
        RecordHeader {
            kind,
            txid: self.txid + 1,
            time_ns: now_ns(),
            page_size: ps,
            db_pages,
            checksum_before: self.checksum,
            checksum_after: checksum,
            npages,
            wal,
            coded: None,
        }
    }

    /// The state after the last record the staging log holds (its base if it holds none).
    pub(super) fn rewind_to_staged(&mut self, db: &Db) -> io::Result<()> {
        match db.stage.last() {
            Some(h) => self.advance_to(&h),
            None => {
                let base = db.stage.base_meta().map_err(io::Error::other)?;
                self.txid = base.txid;
                self.checksum = base.checksum;
                self.page_size = base.page_size;
                self.db_pages = base.db_pages;
            }
        }
        Ok(())
    }

    /// The state after a staged record.
    pub(super) fn advance_to(&mut self, h: &RecordHeader) {
        self.txid = h.txid;
        self.checksum = h.checksum_after;
        self.page_size = h.page_size;
        self.db_pages = h.db_pages;
    }

    pub(super) fn current_walpos(&self) -> WalPos {
        self.wal
            .as_ref()
            .map(|w| WalPos {
                salt: (w.hdr.salt1, w.hdr.salt2),
                cksum: w.cksum,
                end: w.committed_end,
            })
            .unwrap_or_default()
    }

    /// Page size and size in pages of the database as its files hold it now: the last
    /// committed WAL transaction's size, else the database file's.
    pub(super) fn logical_size(&self) -> io::Result<(u32, u32)> {
        if let Some(x) = self
            .wal
            .as_ref()
            .and_then(|w| w.db_pages.map(|p| (w.hdr.page_size, p)))
        {
            return Ok(x);
        }
        self.main_size()
    }

    /// Page size and size in pages of the database file alone.
    pub(super) fn main_size(&self) -> io::Result<(u32, u32)> {
        let Some(f) = self.main_fd.as_ref() else {
            return Ok((self.page_size.max(512), 0));
        };
        let size = f.metadata()?.len();
        let mut hdr = [0u8; 100];
        Ok(
            match read_exact_at(f, &mut hdr, 0)?
                .then(|| sqlite::db_page_size(&hdr))
                .flatten()
            {
                Some(ps) => (ps, sqlite::db_pages(&hdr, ps, size)),
                None => (self.page_size.max(512), 0),
            },
        )
    }
}
