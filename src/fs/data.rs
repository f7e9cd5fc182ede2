//! The data path: open, read, write, copy_file_range, fsync, fallocate on handles, with
//! capture told of every write and truncate.
//!
//! Invariants:
//! - Capture sees each write before it returns to the app (`before_write` → pwrite →
//!   `after_write`), in the order the app issued them; no write-back caching reorders them.
//! - Names are bytes: a name that is not UTF-8 is served like any other. Capture knows files by
//!   UTF-8 names only, so such a file is never captured; a database among them is logged once.
//! - `--sync`: an fsync of a database's file returns once the replicas have its transactions.

use super::{
    check, errno, handles::Handle, is_type, reply_empty, show, utf8, views::is_virtual, SqlFs,
    WARN_MAX,
};
use crate::backing;
use crate::capture;
use crate::capture::Role;
use fuser::{
    Errno, FileHandle, FopenFlags, INodeNo, OpenFlags, ReplyData, ReplyEmpty, ReplyOpen,
    ReplyWrite, WriteFlags,
};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Clears set-user-ID and set-group-ID bits after a write by someone other than the owner.
pub(super) fn kill_suidgid(f: &File) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = f.metadata() {
        let mode = m.permissions().mode();
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
            let _ = f.set_permissions(std::fs::Permissions::from_mode(
                mode & !(libc::S_ISUID | libc::S_ISGID) & 0o7777,
            ));
        }
    }
}

impl SqlFs {
    pub(super) fn open_flags(flags: i32) -> i32 {
        // The kernel handles O_APPEND positioning for us only with writeback cache off, which
        // is our mode: pass the flag through; drop flags that make no sense on the backing fd.
        flags & !(libc::O_NOCTTY | libc::O_CREAT | libc::O_EXCL)
    }

    /// Writes `data` at `offset` through handle `h`, reporting it to capture before and after.
    pub(super) fn write_through(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let rel = if h.role != Role::Other {
            h.cap_rel()
        } else {
            if h.uncaptured {
                self.check_uncaptured(h, offset, data);
            }
            None
        };
        if let Some(rel) = &rel {
            // Refused while a WAL-mode checkpoint must wait for staging (capture says why).
            self.capture
                .before_write(rel, offset, data)
                .map_err(errno)?;
        }
        h.file.write_all_at(data, offset).map_err(errno)?;
        if let Some(rel) = &rel {
            self.capture.after_write(rel, offset, data);
        }
        Ok(())
    }

    /// A write to a file whose name is not UTF-8: is it a database being written?
    pub(super) fn check_uncaptured(&self, h: &Handle, offset: u64, data: &[u8]) {
        let Some(rel) = h.rel.lock().clone() else {
            return;
        };
        if capture::shows_db(&rel, offset, data) {
            self.warn_uncaptured(&rel);
        }
    }

    /// Logs (once per name) that the database being written at `rel`, a name that is not
    /// UTF-8, is not captured.
    pub(super) fn warn_uncaptured(&self, rel: &[u8]) {
        let db = capture::journal_db_of(rel).unwrap_or(rel);
        let mut w = self.warned.lock();
        if w.len() < WARN_MAX && w.insert(db.to_vec()) {
            log::warn!(
                "{}: a database whose path is not UTF-8 is served but NOT captured or replicated (rename it to a UTF-8 name to capture it)",
                show(db)
            );
        }
    }
}

/// Open flags for a new handle's close: FLUSH, the one request close(2) waits for, is asked
/// for only where sqlfs acts on it, a plain file opened for writing that goes straight
/// through (looked at again at each close, invariant 14). Any other handle's close costs the
/// app no round trip; its release still comes, after close returns.
pub(super) fn flush_flags(plain_writer: bool) -> FopenFlags {
    if plain_writer {
        FopenFlags::empty()
    } else {
        FopenFlags::FOPEN_NOFLUSH
    }
}

impl SqlFs {
    /// Open flags of a handle through sqlfs on inode `ino`, a rollback journal of a database
    /// capture knows if `journal`. The kernel keeps its page cache, unless a handle wrote the
    /// file straight through since (then that cache may be stale); a journal's handles are
    /// uncached (`FOPEN_DIRECT_IO`): SQLite writes a journal once, rereads it only to roll
    /// back, and writes each page between a 4-byte page number and a 4-byte checksum, so its
    /// writes cross page boundaries, and the kernel splits such a write in two when it passes
    /// it through its page cache; an uncached write is one request, and costs no extended
    /// attribute lookup first (docs/PERFORMANCE.md, "Rollback-journal commits").
    pub(super) fn cache_flags(&self, ino: u64, journal: bool) -> FopenFlags {
        if journal {
            FopenFlags::FOPEN_DIRECT_IO
        } else if self.take_written_past(ino) {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        }
    }

    /// True if `rel` is the rollback journal of a database capture knows.
    pub(super) fn captured_journal(&self, rel: &str) -> bool {
        let (role, db) = capture::classify(rel);
        role == Role::Journal && self.capture.get(db).is_some()
    }

    pub(super) fn do_open(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if is_virtual(ino.0) {
            let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY
                || flags.0 & (libc::O_TRUNC | libc::O_APPEND) != 0;
            let file = self.history.as_ref().is_some_and(|h| h.is_file(ino.0));
            return if writes {
                reply.error(Errno::EROFS)
            } else if !file {
                reply.error(Errno::EISDIR)
            } else {
                reply.opened(
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE | flush_flags(false),
                )
            };
        }
        let res = self.pin(ino).and_then(|pin| {
            let st = pin.stat()?;
            if is_type(&st, libc::S_IFLNK) {
                return Err(Errno::ELOOP);
            }
            if !is_type(&st, libc::S_IFREG) {
                // The kernel opens only regular files through FUSE.
                return Err(Errno::EINVAL);
            }
            let rel = pin.rel();
            if rel.as_deref().is_some_and(|r| self.journal_blocked(r)) {
                return Err(Errno::EBUSY);
            }
            let name = rel.as_deref().and_then(utf8);
            let journal = name.is_some_and(|r| self.captured_journal(r));
            let trunc = flags.0 & libc::O_TRUNC != 0;
            if let (true, Some(r)) = (trunc, name) {
                let _ = self.capture.before_truncate(r, 0);
            }
            // The pinned file itself, opened anew with the app's flags.
            let f = backing::reopen(pin.fd(), Self::open_flags(flags.0)).map_err(errno)?;
            // The pin may be another handle on this inode, which `route` may wait to see
            // released: holding it here would keep that handle (and its passthrough) alive
            // through the whole wait.
            drop(pin);
            let usage = name.and_then(|r| {
                if trunc {
                    self.capture.after_truncate(r, 0);
                }
                self.capture.on_open(r)
            });
            // `name` borrows `rel`: the handle takes a copy.
            let named = rel.clone();
            self.route(
                ino.0,
                name,
                f,
                flags.0,
                |f| reply.open_backing(f),
                |f, route| {
                    let id = route.id.clone();
                    let flush = flush_flags(route.plain_writer);
                    (
                        self.add_handle(f, named, ino.0, route, usage),
                        id,
                        flush,
                        journal,
                    )
                },
            )
        });
        match res {
            // The kernel refuses page-cache flags on passthrough handles.
            Ok((fh, Some(id), flush, _)) => reply.opened_passthrough(fh, flush, &id),
            Ok((fh, None, flush, journal)) => {
                reply.opened(fh, self.cache_flags(ino.0, journal) | flush)
            }
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn do_read(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        if is_virtual(ino.0) {
            return match self.history.as_ref().map(|h| h.read(ino.0, offset, size)) {
                Some(Ok(d)) => reply.data(&d),
                Some(Err(e)) => reply.error(Errno::from_i32(e)),
                None => reply.error(Errno::ENOENT),
            };
        }
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0usize;
        while got < buf.len() {
            match h.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(e)),
            }
        }
        reply.data(&buf[..got]);
    }

    pub(super) fn do_write(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        reply: ReplyWrite,
    ) {
        if is_virtual(ino.0) {
            return reply.error(Errno::EROFS);
        }
        let res = self.handle(fh).and_then(|h| {
            self.write_through(&h, offset, data)?;
            if wf.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                kill_suidgid(&h.file);
            }
            Ok(())
        });
        match res {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_copy_file_range(
        &self,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        reply: ReplyWrite,
    ) {
        if is_virtual(ino_out.0) {
            return reply.error(Errno::EROFS);
        }
        if is_virtual(ino_in.0) {
            let res = self.handle(fh_out).and_then(|hout| {
                let h = self.history.as_ref().ok_or(Errno::ENOENT)?;
                let data = h
                    .read(ino_in.0, offset_in, len.min(1 << 20) as u32)
                    .map_err(Errno::from_i32)?;
                self.write_through(&hout, offset_out, &data)?;
                Ok(data.len())
            });
            return match res {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(e),
            };
        }
        // A read and a write through the capture path; a short copy is allowed.
        let res = self.handle(fh_in).and_then(|hin| {
            let hout = self.handle(fh_out)?;
            let mut buf = vec![0u8; len.min(1 << 20) as usize];
            let n = hin.file.read_at(&mut buf, offset_in).map_err(errno)?;
            self.write_through(&hout, offset_out, &buf[..n])?;
            Ok(n)
        });
        match res {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn do_fsync(&self, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        if is_virtual(ino.0) {
            return reply.ok();
        }
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let rel = (h.role != Role::Other).then(|| h.cap_rel()).flatten();
        let flushed = match (h.role, &rel) {
            (Role::Main | Role::Wal, Some(r)) => self.capture.before_fsync(r, &h.file),
            _ => None,
        };
        let r = match flushed {
            // Flushed beside the staging barrier, after this request came: that was the
            // sync asked for, and its error is the one to report.
            Some(done) if datasync => done,
            Some(Err(e)) => Err(e),
            _ if datasync => h.file.sync_data(),
            _ => h.file.sync_all(),
        };
        if let Err(e) = r {
            return reply.error(errno(e));
        }
        if h.plain_writer {
            if let Some(r) = h.rel.lock().clone() {
                self.recheck_plain(&r);
            }
        }
        // --sync: the app's fsync returns once its transactions are off the machine.
        if let (Some(hook), Some(rel)) = (&self.durable, rel) {
            if let Err(e) = hook(&rel) {
                log::error!("{rel}: fsync is failing the app because the replicas do not have its transactions: {e:#}");
                return reply.error(Errno::EIO);
            }
        }
        reply.ok();
    }

    pub(super) fn do_fallocate(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if is_virtual(ino.0) {
            return reply.error(Errno::EROFS);
        }
        let res = self.handle(fh).and_then(|h| {
            // SAFETY: open fd.
            check(unsafe {
                libc::fallocate(h.file.as_raw_fd(), mode, offset as i64, length as i64)
            })?;
            Ok(())
        });
        reply_empty(reply, res)
    }
}
