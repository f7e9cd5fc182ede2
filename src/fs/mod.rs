//! The FUSE layer: translates kernel requests into operations on the backing directory and
//! reports the ones capture cares about. It knows nothing of SQLite: what a file is to a
//! database, capture says by its name.
//!
//! This file holds [`SqlFs`], its builder, and the `Filesystem` adapter, whose callbacks
//! route to the files of this folder by job: `nodes.rs` (inode table, pins), `handles.rs`
//! (open handles), `attr.rs` (attributes), `names.rs` (name operations), `data.rs` (reads,
//! writes, fsync), `dir.rs` (directories), `xattr.rs`, `passthrough.rs` (kernel passthrough),
//! `views.rs` (the read-only virtual tree at `.history`). Each states its invariants.
//!
//! Invariant: no callback panics on an I/O path: errors become errnos, and capture errors are
//! logged by capture itself and never fail the app's I/O.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileHandle, Filesystem, INodeNo, IoctlFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};

use crate::backing::{cstring, join_bytes as join, Backing};
use crate::capture::Capture;

mod attr;
mod data;
mod dir;
mod handles;
mod names;
mod nodes;
mod passthrough;
mod views;
mod xattr;

use handles::Handles;
use nodes::Node;
pub use passthrough::Passthrough;
pub use views::{is_virtual, ViewEntry, Views, VIEWS_DIR, VIRTUAL};

const TTL: Duration = Duration::from_secs(1);

/// A path relative to the backing root, as bytes.
type Rel = Vec<u8>;

/// The empty C string, for the `AT_EMPTY_PATH` calls.
const EMPTY: &CStr = c"";

/// Names of uncaptured databases logged at most this many times per mount.
const WARN_MAX: usize = 1024;

fn errno(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn last_err() -> Errno {
    errno(io::Error::last_os_error())
}

/// A libc call's return value as a result: negative means errno.
fn check<T: PartialOrd + Default>(r: T) -> Result<(), Errno> {
    if r < T::default() {
        Err(last_err())
    } else {
        Ok(())
    }
}

/// Replies to a request that returns nothing.
fn reply_empty(reply: ReplyEmpty, res: Result<(), Errno>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn cstr(b: &[u8]) -> Result<CString, Errno> {
    cstring(b).map_err(errno)
}

/// `rel` as capture names files (UTF-8), if it is.
fn utf8(rel: &[u8]) -> Option<&str> {
    std::str::from_utf8(rel).ok()
}

/// `rel` for messages.
fn show(rel: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(rel)
}

fn is_type(st: &libc::stat, t: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == t
}

pub struct SqlFs {
    backing: Arc<Backing>,
    capture: Arc<Capture>,
    nodes: RwLock<HashMap<u64, Node>>,
    handles: RwLock<Handles>,
    next_fh: AtomicU64,
    root_ino: u64,
    /// Called after a successful fsync of a database file (`--sync`).
    durable: Option<DurableHook>,
    /// The read-only virtual tree served at `.history` (history views), if enabled.
    history: Option<Arc<dyn Views>>,
    passthrough: Passthrough,
    /// Databases (by name) whose file goes straight through when opened in WAL mode
    /// (`--passthrough-databases`, a database's own `passthrough`).
    straight_databases: Option<ByName>,
    /// Databases (by name) whose WAL and `-shm` files never pass straight through, because
    /// their fsync must find every commit staged (`sync`).
    written_through: Option<ByName>,
    /// Passthrough was negotiated with the kernel and works.
    pt_live: AtomicBool,
    /// The kernel wants one backing file per inode for all its passthrough handles.
    backing_ids: Mutex<HashMap<u64, Weak<BackingId>>>,
    /// Inodes a writable handle wrote straight through since they were last opened through
    /// sqlfs (their kernel page cache is dropped at that open).
    pt_written: Mutex<HashSet<u64>>,
    /// Open plain-file handles that write straight through (see `passthrough.rs`).
    plain_writers: AtomicUsize,
    /// Databases with names that are not UTF-8 already logged as not captured.
    warned: Mutex<HashSet<Rel>>,
}

/// Makes the transactions of the database a file belongs to durable elsewhere; see `--sync`.
pub type DurableHook = Box<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

/// A yes-or-no setting of a database, asked by its name (relative to the mount root).
pub type ByName = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl SqlFs {
    pub fn new(backing: Arc<Backing>, capture: Arc<Capture>) -> io::Result<SqlFs> {
        let st = backing.stat("")?;
        let mut nodes = HashMap::new();
        nodes.insert(1, Node::new(Rel::new()));
        Ok(SqlFs {
            backing,
            capture,
            nodes: RwLock::new(nodes),
            handles: RwLock::new(Handles::default()),
            next_fh: AtomicU64::new(1),
            durable: None,
            history: None,
            root_ino: st.st_ino,
            passthrough: Passthrough::Auto,
            straight_databases: None,
            written_through: None,
            pt_live: AtomicBool::new(false),
            backing_ids: Mutex::new(HashMap::new()),
            pt_written: Mutex::new(HashSet::new()),
            plain_writers: AtomicUsize::new(0),
            warned: Mutex::new(HashSet::new()),
        })
    }

    /// Sets when WAL and `-shm` files are passed straight through.
    pub fn with_passthrough(mut self, p: Passthrough) -> SqlFs {
        self.passthrough = p;
        self
    }

    /// Passes the files of the databases `f` names straight through as well when they are
    /// opened in WAL mode (see `passthrough.rs`).
    pub fn with_straight_databases(mut self, f: ByName) -> SqlFs {
        self.straight_databases = Some(f);
        self
    }

    /// Keeps the WAL and `-shm` files of the databases `f` names written through sqlfs even
    /// where passthrough works (their commits are then staged as they are written).
    pub fn with_written_through(mut self, f: ByName) -> SqlFs {
        self.written_through = Some(f);
        self
    }

    /// Sets the hook run after each fsync of a database file.
    pub fn with_durability(mut self, hook: DurableHook) -> SqlFs {
        self.durable = Some(hook);
        self
    }

    /// Serves the virtual tree `h` (history views) as `.history` at the root.
    pub fn with_history(mut self, h: Arc<dyn Views>) -> SqlFs {
        self.history = Some(h);
        self
    }
}

impl Filesystem for SqlFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        self.do_init(config)
    }

    fn destroy(&mut self) {
        self.capture.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.do_lookup(parent, name, reply)
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if is_virtual(ino.0) {
            if let Some(h) = &self.history {
                h.forget(ino.0, nlookup);
            }
            return;
        }
        if ino.0 == 1 {
            return;
        }
        let mut nodes = self.nodes.write();
        if let Some(n) = nodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
            if n.lookups == 0 {
                nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.do_getattr(ino, fh, reply)
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.do_setattr(ino, mode, uid, gid, size, atime, mtime, fh, reply)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.do_readlink(ino, reply)
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.do_mknod(req, parent, name, mode, umask, rdev, reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.do_mkdir(req, parent, name, mode, umask, reply)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.do_unlink(parent, name, reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.do_rmdir(parent, name, reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.do_symlink(req, parent, link_name, target, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.do_rename(parent, name, newparent, newname, flags, reply)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.do_link(ino, newparent, newname, reply)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.do_open(ino, flags, reply)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.do_read(ino, fh, offset, size, reply)
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.do_write(ino, fh, offset, data, wf, reply)
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.do_copy_file_range(
            ino_in, fh_in, offset_in, ino_out, fh_out, offset_out, len, reply,
        )
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // The close(2) of a handle opened without `FOPEN_NOFLUSH` (`data::flush_flags`)
        // waits for this (the release comes later, on its own): a file written straight
        // through is looked at here, before close returns.
        if let Ok(h) = self.handle(fh) {
            if h.plain_writer {
                if let Some(r) = h.rel.lock().clone() {
                    self.recheck_plain(&r);
                }
            }
        }
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = self.handles.write().remove(fh.0);
        if let Some(h) = &h {
            if h.plain_writer {
                self.plain_writers
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(r) = h.rel.lock().clone() {
                    self.recheck_plain(&r);
                }
            }
        }
        if let Some(r) = h.and_then(|h| h.cap_rel()) {
            self.capture.on_release(&r);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.do_fsync(ino, fh, datasync, reply)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.do_opendir(ino, reply)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.do_readdir(ino, fh, offset, reply)
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.write().remove(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.do_fsyncdir(ino, fh, reply)
    }

    /// No ioctl is served: bytes may change only through requests capture sees (a clone or
    /// a range copy by ioctl would pass it by). Tools probe for them (`cp` trying a reflink,
    /// SQLite builds checking for batch atomic writes) and fall back on ENOTTY, the usual
    /// answer of a file that has none; each probe used to log a warning.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        log::trace!("ioctl {cmd:#x}: not supported (ENOTTY)");
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // SAFETY: zeroed statvfs is a valid out-parameter; the fd is open.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatvfs(self.backing.root_fd(), &mut s) } < 0 {
            return reply.error(last_err());
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.do_setxattr(ino, name, value, flags, reply)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.do_getxattr(ino, name, size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.do_listxattr(ino, size, reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.do_removexattr(ino, name, reply)
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.do_access(ino, mask, reply)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.do_create(req, parent, name, mode, umask, flags, reply)
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.do_fallocate(ino, fh, offset, length, mode, reply)
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        if is_virtual(ino.0) {
            return reply.error(Errno::ENOSYS);
        }
        match self.handle(fh) {
            // SAFETY: open fd.
            Ok(h) => {
                let r = unsafe { libc::lseek(h.file.as_raw_fd(), offset, whence) };
                if r < 0 {
                    reply.error(last_err())
                } else {
                    reply.offset(r)
                }
            }
            Err(e) => reply.error(e),
        }
    }
}
