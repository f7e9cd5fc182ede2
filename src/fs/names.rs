//! Name operations: lookup, creation (mknod, mkdir, symlink, link, create), removal (unlink,
//! rmdir) and rename, each on (descriptor of the parent, name), reported to capture and kept
//! in the inode table.
//!
//! Invariants:
//! - A node sqlfs creates (running as root) is given to the requesting user, and only while
//!   it is still sqlfs's own: a file a racing rename put there keeps its owner.
//! - Capture cannot follow a file to a name that is not UTF-8: to capture, a file renamed to
//!   such a name is gone, and one renamed from one has just arrived.
//! - `--sync`: deleting a rollback journal is a commit; the unlink returns once the replicas
//!   have it.

use super::data::flush_flags;
use super::{
    check, cstr, errno, is_type, last_err, nodes::holdable, nodes::Node, nodes::Pin, reply_empty,
    utf8, views::is_virtual, views::VIEWS_DIR, Rel, SqlFs, EMPTY, TTL,
};
use crate::backing::fstat;
use crate::backing::hold_in;
use crate::backing::proc_fd;
use crate::backing::stat_in;
use crate::capture::classify;
use crate::capture::Role;
use fuser::{
    Errno, FileAttr, FileType, Generation, INodeNo, RenameFlags, ReplyCreate, ReplyEmpty,
    ReplyEntry, Request,
};
use std::ffi::CStr;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::UNIX_EPOCH;

pub(super) fn euid_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Replies with the attributes of `name` in `dir` (path `rel`) after a successful
/// create-like call.
pub(super) fn reply_entry(fs: &SqlFs, dir: &Pin, name: &CStr, rel: Rel, reply: ReplyEntry) {
    match stat_in(dir.fd(), name) {
        Ok(st) => reply.entry(&TTL, &fs.remember(rel, &st), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

/// A lookup's answer for a name that is not there: inode 0, which the kernel takes as "no such
/// name" and remembers as such for the entry's time to live.
fn absent() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

impl SqlFs {
    /// Gives a newly created node `name` in `dir` to the requesting user (sqlfs may run as
    /// root). Only a node still owned by sqlfs itself is given away: if a racing rename put
    /// someone else's file under that name, it is left as it is.
    pub(super) fn chown_new(&self, dir: &Pin, name: &CStr, req: &Request) {
        if !euid_is_root() {
            return;
        }
        // SAFETY: valid dirfd and C string.
        let fd = unsafe {
            libc::openat(
                dir.fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return;
        }
        // SAFETY: fresh fd, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if fstat(fd.as_raw_fd()).is_ok_and(|st| st.st_uid == 0) {
            // SAFETY: valid fd and C string.
            unsafe {
                libc::fchownat(
                    fd.as_raw_fd(),
                    EMPTY.as_ptr(),
                    req.uid(),
                    req.gid(),
                    libc::AT_EMPTY_PATH,
                )
            };
        }
    }
}

impl SqlFs {
    pub(super) fn do_lookup(&self, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Some(h) = &self.history {
            let root_hist = parent.0 == 1 && name.as_bytes() == VIEWS_DIR.as_bytes();
            if root_hist || is_virtual(parent.0) {
                let r = if root_hist {
                    Ok(h.root())
                } else {
                    let n = name.to_str().ok_or(libc::ENOENT);
                    n.and_then(|n| h.lookup(parent.0, n))
                };
                return match r {
                    Ok(e) => reply.entry(&TTL, &self.vattr(e), Generation(0)),
                    Err(e) => reply.error(Errno::from_i32(e)),
                };
            }
        }
        match self.child(parent, name) {
            Ok((dir, rel, name)) => match stat_in(dir.fd(), &name) {
                Ok(st) => reply.entry(&TTL, &self.remember(rel, &st), Generation(0)),
                // The kernel keeps the absence for as long as it keeps names: SQLite asks
                // whether a journal and a WAL are there at each transaction outside WAL mode.
                // A name made through the mount replaces it at once.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    reply.entry(&TTL, &absent(), Generation(0))
                }
                Err(e) => reply.error(errno(e)),
            },
            Err(Errno::EROFS) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let res = self.child(parent, name).and_then(|(dir, rel, c)| {
            // SAFETY: valid dirfd and C string.
            check(unsafe {
                libc::mknodat(dir.fd(), c.as_ptr(), mode & !umask, rdev as libc::dev_t)
            })?;
            self.chown_new(&dir, &c, req);
            Ok((dir, rel, c))
        });
        match res {
            Ok((dir, rel, c)) => reply_entry(self, &dir, &c, rel, reply),
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn do_mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let res = self.child(parent, name).and_then(|(dir, rel, c)| {
            // SAFETY: valid dirfd and C string.
            check(unsafe { libc::mkdirat(dir.fd(), c.as_ptr(), mode & !umask & 0o7777) })?;
            self.chown_new(&dir, &c, req);
            Ok((dir, rel, c))
        });
        match res {
            Ok((dir, rel, c)) => reply_entry(self, &dir, &c, rel, reply),
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn do_unlink(&self, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.child(parent, name).and_then(|(dir, rel, c)| {
            // Held across the unlink: see `unnamed`.
            let held = hold_in(dir.fd(), &c).ok();
            let name = utf8(&rel);
            if let Some(r) = name {
                self.capture.before_unlink(r);
            }
            // SAFETY: valid dirfd and C string.
            check(unsafe { libc::unlinkat(dir.fd(), c.as_ptr(), 0) })?;
            if let Some((fd, st)) = held {
                self.unnamed(self.ino_of(&st), &rel, holdable(fd, &st));
            }
            let Some(rel) = name else { return Ok(()) };
            self.capture.after_unlink(rel);
            // --sync: deleting a rollback journal is a commit (journal_mode=DELETE), and no
            // fsync follows it; the unlink returns once the replicas have the transaction.
            if let Some(hook) = &self.durable {
                if classify(rel).0 == Role::Journal {
                    if let Err(e) = hook(rel) {
                        log::error!("{rel}: failing the app's commit because the replicas do not have it: {e:#}");
                        return Err(Errno::EIO);
                    }
                }
            }
            Ok(())
        });
        reply_empty(reply, res)
    }

    pub(super) fn do_rmdir(&self, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.child(parent, name).and_then(|(dir, rel, c)| {
            let held = hold_in(dir.fd(), &c).ok();
            // SAFETY: valid dirfd and C string.
            check(unsafe { libc::unlinkat(dir.fd(), c.as_ptr(), libc::AT_REMOVEDIR) })?;
            if let Some((fd, st)) = held {
                self.unnamed(self.ino_of(&st), &rel, holdable(fd, &st));
            }
            Ok(())
        });
        reply_empty(reply, res)
    }

    pub(super) fn do_symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let res = self.child(parent, link_name).and_then(|(dir, rel, c)| {
            let t = cstr(target.as_os_str().as_bytes())?;
            // SAFETY: valid C strings and dirfd.
            check(unsafe { libc::symlinkat(t.as_ptr(), dir.fd(), c.as_ptr()) })?;
            self.chown_new(&dir, &c, req);
            Ok((dir, rel, c))
        });
        match res {
            Ok((dir, rel, c)) => reply_entry(self, &dir, &c, rel, reply),
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = self.child(parent, name).and_then(|(d1, from, n1)| {
            let (d2, to, n2) = self.child(newparent, newname)?;
            let exchange = flags.bits() & libc::RENAME_EXCHANGE != 0;
            let moved = stat_in(d1.fd(), &n1).map(|st| self.ino_of(&st)).ok();
            let held = hold_in(d2.fd(), &n2).ok();
            let replaced = held.as_ref().map(|(_, st)| self.ino_of(st));
            // Capture cannot follow a file to a name that is not UTF-8: to capture, a file
            // moved there is gone, and one moved from there has just arrived.
            let (cf, ct) = (utf8(&from), utf8(&to));
            let is_db =
                |r: Option<&str>| r.is_some_and(|r| self.capture.get(classify(r).1).is_some());
            let (db_from, db_to) = (is_db(cf), is_db(ct));
            match (cf, ct) {
                (Some(f), None) => self.capture.before_unlink(f),
                (None, Some(t)) if exchange => self.capture.before_unlink(t),
                _ => {}
            }
            // SAFETY: valid dirfds and C strings.
            check(unsafe {
                libc::renameat2(d1.fd(), n1.as_ptr(), d2.fd(), n2.as_ptr(), flags.bits())
            })?;
            if moved.is_some() && moved == replaced {
                // Two names of one file: rename does nothing.
                return Ok(());
            }
            if let (false, Some((fd, st))) = (exchange, held) {
                self.unnamed(self.ino_of(&st), &to, holdable(fd, &st));
            }
            self.renamed(&from, &to, exchange);
            match (cf, ct) {
                (Some(f), Some(t)) if exchange => self.capture.after_exchange(f, t),
                (Some(f), Some(t)) => self.capture.after_rename(f, t),
                (Some(f), None) => {
                    self.capture.after_unlink(f);
                    if exchange {
                        self.capture.arrived(f);
                    }
                    if db_from {
                        self.warn_uncaptured(&to);
                    }
                }
                (None, Some(t)) => {
                    if exchange {
                        self.capture.after_unlink(t);
                        if db_to {
                            self.warn_uncaptured(&from);
                        }
                    }
                    self.capture.arrived(t);
                }
                (None, None) => {}
            }
            Ok(())
        });
        reply_empty(reply, res)
    }

    pub(super) fn do_link(
        &self,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let res = self.pin(ino).and_then(|src| {
            let (dir, to, c) = self.child(newparent, newname)?;
            // The pinned file itself, never a path: AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH;
            // without it, its /proc entry names the same file.
            // SAFETY: valid fds and C strings.
            let r = unsafe {
                libc::linkat(
                    src.fd(),
                    EMPTY.as_ptr(),
                    dir.fd(),
                    c.as_ptr(),
                    libc::AT_EMPTY_PATH,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) {
                    return Err(errno(e));
                }
                let p = proc_fd(src.fd());
                // SAFETY: valid C strings and dirfd.
                check(unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        p.as_ptr(),
                        dir.fd(),
                        c.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                })?;
            }
            Ok((dir, to, c))
        });
        match res {
            Ok((dir, to, c)) => reply_entry(self, &dir, &c, to, reply),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let res = self.child(parent, name).and_then(|(dir, rel, c)| {
            if self.journal_blocked(&rel) {
                return Err(Errno::EBUSY);
            }
            let existed = stat_in(dir.fd(), &c).is_ok();
            let cap = utf8(&rel);
            let trunc = existed && flags & libc::O_TRUNC != 0;
            if let (true, Some(r)) = (trunc, cap) {
                let _ = self.capture.before_truncate(r, 0);
            }
            // One name in a directory already pinned; never a link. Opened non-blocking, so a
            // FIFO a racing app put there cannot hold this thread.
            let oflags = (flags | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK)
                | libc::O_CLOEXEC
                | libc::O_NOCTTY;
            // SAFETY: valid dirfd and C string.
            let fd = unsafe { libc::openat(dir.fd(), c.as_ptr(), oflags, mode & !umask & 0o7777) };
            if fd < 0 {
                return Err(last_err());
            }
            // SAFETY: fresh fd, owned here.
            let f = unsafe { File::from_raw_fd(fd) };
            let st = fstat(fd).map_err(errno)?;
            if !is_type(&st, libc::S_IFREG) {
                return Err(Errno::EEXIST);
            }
            if flags & libc::O_NONBLOCK == 0 {
                // SAFETY: open fd.
                unsafe {
                    let fl = libc::fcntl(fd, libc::F_GETFL);
                    if fl >= 0 {
                        libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
                    }
                }
            }
            if !existed && euid_is_root() && st.st_uid == 0 {
                // SAFETY: open fd (the file just created).
                unsafe { libc::fchown(fd, req.uid(), req.gid()) };
            }
            let usage = cap.and_then(|r| {
                if trunc {
                    self.capture.after_truncate(r, 0);
                } else if !existed {
                    self.capture.on_create(r);
                }
                self.capture.on_open(r)
            });
            let st = fstat(fd).map_err(errno)?;
            let attr = self.attr(&st);
            let journal = cap.is_some_and(|r| self.captured_journal(r));
            // `cap` borrows `rel`: the handle takes a copy.
            let named = rel.clone();
            self.route(
                attr.ino.0,
                cap,
                f,
                flags,
                |f| reply.open_backing(f),
                |f, route| {
                    {
                        let mut nodes = self.nodes.write();
                        let n = nodes
                            .entry(attr.ino.0)
                            .or_insert_with(|| Node::new(named.clone()));
                        n.named(named.clone());
                        n.lookups += 1;
                    }
                    let id = route.id.clone();
                    let flush = flush_flags(route.plain_writer);
                    (
                        self.add_handle(f, Some(named), attr.ino.0, route, usage),
                        attr,
                        id,
                        flush,
                        journal,
                    )
                },
            )
        });
        match res {
            Ok((fh, attr, Some(id), flush, _)) => {
                reply.created_passthrough(&TTL, &attr, Generation(0), fh, flush, &id)
            }
            Ok((fh, attr, None, flush, journal)) => {
                let keep = self.cache_flags(attr.ino.0, journal) | flush;
                reply.created(&TTL, &attr, Generation(0), fh, keep)
            }
            Err(e) => reply.error(e),
        }
    }
}
