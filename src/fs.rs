//! The FUSE layer: translates kernel requests into operations on the backing directory and
//! reports the ones capture cares about. It knows nothing of SQLite.
//!
//! Invariants:
//! - Every path is resolved relative to the backing directory handle, never through the mount.
//! - `.sqlfs` at the root (sqlfs's own metadata) does not exist as far as the mount shows.
//! - `.history` at the root is the virtual, read-only directory of history views
//!   (`history.rs`); a backing file of that name is hidden. Its inodes have the high bit set,
//!   and every mutating call on or under it fails with EROFS.
//! - Capture sees each write before it returns to the app (`before_write` → pwrite →
//!   `after_write`), in the order the app issued them; no write-back caching reorders them.
//! - No callback panics on an I/O path: errors become errnos, and capture errors are logged by
//!   capture itself and never fail the app's I/O.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};

use crate::backing::{join, Backing, META_DIR};
use crate::capture::{classify, Capture, Role};
use crate::history::{self, History};

const TTL: Duration = Duration::from_secs(1);

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
    CString::new(b).map_err(|_| Errno::EINVAL)
}

/// An inode the kernel knows: its path, and its other names when it has hard links.
struct Node {
    rel: String,
    links: Vec<String>,
    lookups: u64,
}

impl Node {
    fn new(rel: String) -> Node {
        Node {
            rel,
            links: Vec::new(),
            lookups: 0,
        }
    }

    /// `rel` names this inode (a lookup or a new hard link): it becomes the primary path.
    fn named(&mut self, rel: String) {
        if self.rel != rel {
            let old = std::mem::replace(&mut self.rel, rel);
            self.links.retain(|l| *l != self.rel);
            if !self.links.contains(&old) {
                self.links.push(old);
            }
        }
    }

    /// The name `rel` was removed; another name takes over if there is one.
    fn unnamed(&mut self, rel: &str) {
        self.links.retain(|l| l != rel);
        if self.rel == rel {
            if let Some(other) = self.links.pop() {
                self.rel = other;
            }
        }
    }

    /// Rewrites every name under `from` to be under `to`.
    fn moved(&mut self, from: &str, to: &str, prefix: &str) {
        for r in std::iter::once(&mut self.rel).chain(self.links.iter_mut()) {
            if r == from {
                *r = to.to_string();
            } else if let Some(rest) = r.strip_prefix(prefix) {
                *r = join(to, rest);
            }
        }
    }
}

struct Handle {
    file: File,
    rel: Mutex<String>,
    role: Role,
    ino: u64,
    /// Kept while the kernel reads and writes this handle's backing file directly.
    _passthrough: Option<Arc<BackingId>>,
}

/// When to let the kernel pass reads and writes of WAL and `-shm` files straight to the
/// backing files (`--passthrough`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Passthrough {
    /// Whenever the kernel and the privileges allow it.
    #[default]
    Auto,
    /// Required: the mount fails without it.
    On,
    /// Never: every write goes through sqlfs.
    Off,
}

pub struct SqlFs {
    backing: Arc<Backing>,
    capture: Arc<Capture>,
    nodes: RwLock<HashMap<u64, Node>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    root_ino: u64,
    /// Called after a successful fsync of a database file (`--sync`).
    durable: Option<DurableHook>,
    /// The `.history` views, if enabled.
    history: Option<Arc<History>>,
    passthrough: Passthrough,
    /// Databases (by name) whose WAL and `-shm` files never pass straight through, because
    /// their fsync must find every commit staged (`sync`).
    written_through: Option<WrittenThrough>,
    /// Passthrough was negotiated with the kernel and works.
    pt_live: AtomicBool,
    /// The kernel wants one backing file per inode for all its passthrough handles.
    backing_ids: Mutex<HashMap<u64, Weak<BackingId>>>,
}

/// Makes the transactions of the database a file belongs to durable elsewhere; see `--sync`.
pub type DurableHook = Box<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

/// True for a database (by name) whose files must all be written through sqlfs.
pub type WrittenThrough = Box<dyn Fn(&str) -> bool + Send + Sync>;

fn to_system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs((-sec) as u64) + Duration::from_nanos(nsec as u64)
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

impl SqlFs {
    pub fn new(backing: Arc<Backing>, capture: Arc<Capture>) -> io::Result<SqlFs> {
        let st = backing.stat("")?;
        let mut nodes = HashMap::new();
        nodes.insert(1, Node::new(String::new()));
        Ok(SqlFs {
            backing,
            capture,
            nodes: RwLock::new(nodes),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            durable: None,
            history: None,
            root_ino: st.st_ino,
            passthrough: Passthrough::Auto,
            written_through: None,
            pt_live: AtomicBool::new(false),
            backing_ids: Mutex::new(HashMap::new()),
        })
    }

    /// Sets when WAL and `-shm` files are passed straight through.
    pub fn with_passthrough(mut self, p: Passthrough) -> SqlFs {
        self.passthrough = p;
        self
    }

    /// Keeps the WAL and `-shm` files of the databases `f` names written through sqlfs even
    /// where passthrough works (their commits are then staged as they are written).
    pub fn with_written_through(mut self, f: WrittenThrough) -> SqlFs {
        self.written_through = Some(f);
        self
    }

    /// The backing file id to open `rel` (inode `ino`, descriptor `f`) with, if it goes
    /// straight through: WAL and `-shm` files, once passthrough works, unless their database
    /// is to be written through (decided by its name when the file is opened). All handles on
    /// one inode must agree, so an inode already open the other way stays that way.
    fn passthrough_for(
        &self,
        ino: u64,
        rel: &str,
        f: &File,
        open_backing: impl FnOnce(&File) -> io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut ids = self.backing_ids.lock();
        if let Some(id) = ids.get(&ino).and_then(Weak::upgrade) {
            return Some(id);
        }
        let db = match (classify(rel), rel.strip_suffix("-shm")) {
            ((Role::Wal, db), _) | (_, Some(db)) => db,
            _ => return None,
        };
        if !self.pt_live.load(Ordering::Relaxed)
            || self.written_through.as_ref().is_some_and(|w| w(db))
        {
            return None;
        }
        if self.handles.read().values().any(|h| h.ino == ino) {
            return None;
        }
        match open_backing(f) {
            Ok(id) => {
                let id = Arc::new(id);
                ids.retain(|_, w| w.strong_count() > 0);
                ids.insert(ino, Arc::downgrade(&id));
                Some(id)
            }
            Err(e) => {
                log::error!(
                    "{rel}: kernel passthrough failed ({e}); from now on WAL writes go through sqlfs"
                );
                self.pt_live.store(false, Ordering::Relaxed);
                if ids.values().all(|w| w.strong_count() == 0) {
                    // No handle bypasses sqlfs: its writes show every commit again.
                    self.capture.unobserve();
                }
                None
            }
        }
    }

    /// Sets the hook run after each fsync of a database file.
    pub fn with_durability(mut self, hook: DurableHook) -> SqlFs {
        self.durable = Some(hook);
        self
    }

    /// Serves `.history` at the root.
    pub fn with_history(mut self, h: Arc<History>) -> SqlFs {
        self.history = Some(h);
        self
    }

    /// Attributes of a virtual `.history` node.
    fn vattr(&self, e: history::Entry) -> FileAttr {
        let st = self.backing.stat("").ok();
        let mtime = UNIX_EPOCH + Duration::from_nanos(e.mtime_ns);
        FileAttr {
            ino: INodeNo(e.ino),
            size: e.size,
            blocks: e.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: UNIX_EPOCH,
            kind: if e.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if e.dir { 0o555 } else { 0o444 },
            nlink: if e.dir { 2 } else { 1 },
            uid: st.map_or(0, |s| s.st_uid),
            gid: st.map_or(0, |s| s.st_gid),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn ino_of(&self, st: &libc::stat) -> u64 {
        if st.st_ino == self.root_ino {
            1
        } else if st.st_ino == 1 {
            u64::MAX - 1
        } else {
            st.st_ino
        }
    }

    fn attr(&self, st: &libc::stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.ino_of(st)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: to_system_time(st.st_atime, st.st_atime_nsec),
            mtime: to_system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: to_system_time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind_of(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn rel(&self, ino: INodeNo) -> Result<String, Errno> {
        if History::is_virtual(ino.0) {
            return Err(Errno::EROFS);
        }
        self.nodes
            .read()
            .get(&ino.0)
            .map(|n| n.rel.clone())
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        let p = self.rel(parent)?;
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        if p.is_empty() && name == META_DIR {
            return Err(Errno::ENOENT);
        }
        if p.is_empty() && name == history::NAME {
            return Err(Errno::EROFS);
        }
        Ok(join(&p, name))
    }

    /// Stats `rel` and registers it as a looked-up inode.
    fn remember(&self, rel: String) -> Result<FileAttr, Errno> {
        let st = self.backing.stat(&rel).map_err(errno)?;
        let attr = self.attr(&st);
        let mut nodes = self.nodes.write();
        let n = nodes
            .entry(attr.ino.0)
            .or_insert_with(|| Node::new(rel.clone()));
        n.named(rel);
        n.lookups += 1;
        Ok(attr)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.read().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_handle(
        &self,
        file: File,
        rel: String,
        ino: u64,
        passthrough: Option<Arc<BackingId>>,
    ) -> FileHandle {
        let role = classify(&rel).0;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().insert(
            fh,
            Arc::new(Handle {
                file,
                rel: Mutex::new(rel),
                role,
                ino,
                _passthrough: passthrough,
            }),
        );
        FileHandle(fh)
    }

    /// Gives a newly created node to the requesting user (sqlfs may run as root).
    fn chown_new(&self, rel: &str, req: &Request) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        if let Ok(c) = Backing::cpath(rel) {
            // SAFETY: valid dirfd and C string.
            unsafe {
                libc::fchownat(
                    self.backing.root_fd(),
                    c.as_ptr(),
                    req.uid(),
                    req.gid(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
        }
    }

    /// Updates the paths of `from` and everything below it after a rename.
    fn renamed(&self, from: &str, to: &str) {
        let prefix = format!("{from}/");
        for n in self.nodes.write().values_mut() {
            n.moved(from, to, &prefix);
        }
        for h in self.handles.read().values() {
            let mut r = h.rel.lock();
            if *r == from {
                *r = to.to_string();
            } else if let Some(rest) = r.strip_prefix(&prefix) {
                *r = join(to, rest);
            }
        }
    }

    fn open_flags(flags: i32) -> i32 {
        // The kernel handles O_APPEND positioning for us only with writeback cache off, which
        // is our mode: pass the flag through; drop flags that make no sense on the backing fd.
        flags & !(libc::O_NOCTTY | libc::O_CREAT | libc::O_EXCL)
    }

    /// chmod and chown of `rel`; `None` leaves a field as it is.
    fn set_mode_owner(
        &self,
        rel: &str,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), Errno> {
        let c = Backing::cpath(rel).map_err(errno)?;
        let dfd = self.backing.root_fd();
        if let Some(m) = mode {
            // SAFETY: valid dirfd and C string.
            check(unsafe { libc::fchmodat(dfd, c.as_ptr(), m & 0o7777, 0) })?;
        }
        if uid.is_some() || gid.is_some() {
            let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
            // SAFETY: valid dirfd and C string; -1 leaves an id unchanged.
            check(unsafe { libc::fchownat(dfd, c.as_ptr(), u, g, libc::AT_SYMLINK_NOFOLLOW) })?;
        }
        Ok(())
    }

    /// truncate of `rel` (through the open handle if there is one), reported to capture.
    fn set_size(&self, rel: &str, fh: Option<FileHandle>, size: u64) -> Result<(), Errno> {
        // Refused while a WAL-mode checkpoint must wait for staging (capture says why).
        self.capture.before_truncate(rel, size).map_err(errno)?;
        let r = match fh.and_then(|f| self.handle(f).ok()) {
            Some(h) => h.file.set_len(size),
            None => self
                .backing
                .open_at(rel, libc::O_WRONLY | libc::O_NOFOLLOW, 0)
                .and_then(|f| f.set_len(size)),
        };
        r.map_err(errno)?;
        self.capture.after_truncate(rel, size);
        Ok(())
    }

    /// utimensat of `rel`; `None` leaves a time as it is.
    fn set_times(
        &self,
        rel: &str,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<(), Errno> {
        let ts = |t: Option<TimeOrNow>| match t {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Some(TimeOrNow::Now) => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Some(TimeOrNow::SpecificTime(t)) => {
                let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                libc::timespec {
                    tv_sec: d.as_secs() as i64,
                    tv_nsec: d.subsec_nanos() as i64,
                }
            }
        };
        let c = Backing::cpath(rel).map_err(errno)?;
        let times = [ts(atime), ts(mtime)];
        // SAFETY: valid dirfd, C string and a two-element timespec array.
        check(unsafe {
            libc::utimensat(
                self.backing.root_fd(),
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    fn xattr_path(&self, ino: INodeNo) -> Result<CString, Errno> {
        let rel = self.rel(ino)?;
        cstr(self.backing.path(&rel).as_os_str().as_bytes())
    }
}

impl SqlFs {
    /// Writes `data` at `offset` through handle `h`, reporting it to capture before and after.
    fn write_through(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let rel = (h.role != Role::Other).then(|| h.rel.lock().clone());
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
}

/// Clears set-user-ID and set-group-ID bits after a write by someone other than the owner.
fn kill_suidgid(f: &File) {
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

/// Replies with the attributes of `rel` after a successful create-like call.
fn reply_entry(fs: &SqlFs, rel: String, reply: ReplyEntry) {
    match fs.remember(rel) {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: isize, buf: &[u8]) {
    if r < 0 {
        reply.error(last_err());
    } else if size == 0 {
        reply.size(r as u32);
    } else {
        reply.data(&buf[..r as usize]);
    }
}

impl Filesystem for SqlFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        // We clear set-user/group-ID bits on write ourselves; without this the kernel asks for
        // the security.capability xattr before every single write.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        let _ = config.set_max_readahead(1 << 20);
        if self.passthrough != Passthrough::Off {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let granted = root
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if granted {
                self.capture.observe()?;
                self.pt_live.store(true, Ordering::Relaxed);
                log::info!("WAL and shared-memory files pass straight through (kernel passthrough); commits are read from the WAL");
            } else if self.passthrough == Passthrough::On {
                return Err(io::Error::other(if root {
                    "--passthrough on: this kernel does not offer FUSE passthrough (Linux 6.9 or later is needed)"
                } else {
                    "--passthrough on: kernel passthrough needs root (CAP_SYS_ADMIN)"
                }));
            } else {
                log::info!(
                    "kernel passthrough unavailable ({}); every write goes through sqlfs",
                    if root { "kernel too old" } else { "not root" }
                );
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.capture.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Some(h) = &self.history {
            let root_hist = parent.0 == 1 && name.as_bytes() == history::NAME.as_bytes();
            if root_hist || History::is_virtual(parent.0) {
                let r = if root_hist {
                    Ok(h.root_entry())
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
            Ok(rel) => reply_entry(self, rel, reply),
            Err(Errno::EROFS) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if History::is_virtual(ino.0) {
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
        if History::is_virtual(ino.0) {
            return match self.history.as_ref().map(|h| h.getattr(ino.0)) {
                Some(Ok(e)) => reply.attr(&TTL, &self.vattr(e)),
                Some(Err(e)) => reply.error(Errno::from_i32(e)),
                None => reply.error(Errno::ENOENT),
            };
        }
        let st = match fh.and_then(|f| self.handle(f).ok()) {
            Some(h) => {
                // SAFETY: zeroed stat is a valid out-parameter; fd is open.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                if unsafe { libc::fstat(h.file.as_raw_fd(), &mut st) } < 0 {
                    return reply.error(last_err());
                }
                Ok(st)
            }
            None => self
                .rel(ino)
                .and_then(|r| self.backing.stat(&r).map_err(errno)),
        };
        match st {
            Ok(st) => reply.attr(&TTL, &self.attr(&st)),
            Err(e) => reply.error(e),
        }
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
        let res = self.rel(ino).and_then(|rel| {
            self.set_mode_owner(&rel, mode, uid, gid)?;
            if let Some(sz) = size {
                self.set_size(&rel, fh, sz)?;
            }
            if atime.is_some() || mtime.is_some() {
                self.set_times(&rel, atime, mtime)?;
            }
            self.backing.stat(&rel).map_err(errno)
        });
        match res {
            Ok(st) => reply.attr(&TTL, &self.attr(&st)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        if History::is_virtual(ino.0) {
            return reply.error(Errno::EINVAL);
        }
        let res = self
            .rel(ino)
            .and_then(|rel| std::fs::read_link(self.backing.path(&rel)).map_err(errno));
        match res {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
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
        let res = self.child(parent, name).and_then(|rel| {
            let c = Backing::cpath(&rel).map_err(errno)?;
            // SAFETY: valid dirfd and C string.
            check(unsafe {
                libc::mknodat(
                    self.backing.root_fd(),
                    c.as_ptr(),
                    mode & !umask,
                    rdev as libc::dev_t,
                )
            })?;
            self.chown_new(&rel, req);
            Ok(rel)
        });
        match res {
            Ok(rel) => reply_entry(self, rel, reply),
            Err(e) => reply.error(e),
        }
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
        let res = self.child(parent, name).and_then(|rel| {
            let c = Backing::cpath(&rel).map_err(errno)?;
            // SAFETY: valid dirfd and C string.
            check(unsafe {
                libc::mkdirat(self.backing.root_fd(), c.as_ptr(), mode & !umask & 0o7777)
            })?;
            self.chown_new(&rel, req);
            Ok(rel)
        });
        match res {
            Ok(rel) => reply_entry(self, rel, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.child(parent, name).and_then(|rel| {
            let ino = self.backing.stat(&rel).map(|st| self.ino_of(&st)).ok();
            self.capture.before_unlink(&rel);
            let c = Backing::cpath(&rel).map_err(errno)?;
            // SAFETY: valid dirfd and C string.
            check(unsafe { libc::unlinkat(self.backing.root_fd(), c.as_ptr(), 0) })?;
            if let Some(i) = ino {
                if let Some(n) = self.nodes.write().get_mut(&i) {
                    n.unnamed(&rel);
                }
            }
            self.capture.after_unlink(&rel);
            // --sync: deleting a rollback journal is a commit (journal_mode=DELETE), and no
            // fsync follows it; the unlink returns once the replicas have the transaction.
            if let Some(hook) = &self.durable {
                if classify(&rel).0 == Role::Journal {
                    if let Err(e) = hook(&rel) {
                        log::error!("{rel}: failing the app's commit because the replicas do not have it: {e:#}");
                        return Err(Errno::EIO);
                    }
                }
            }
            Ok(())
        });
        reply_empty(reply, res)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.child(parent, name).and_then(|rel| {
            let c = Backing::cpath(&rel).map_err(errno)?;
            // SAFETY: valid dirfd and C string.
            check(unsafe {
                libc::unlinkat(self.backing.root_fd(), c.as_ptr(), libc::AT_REMOVEDIR)
            })?;
            Ok(())
        });
        reply_empty(reply, res)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let res = self.child(parent, link_name).and_then(|rel| {
            let c = Backing::cpath(&rel).map_err(errno)?;
            let t = cstr(target.as_os_str().as_bytes())?;
            // SAFETY: valid C strings and dirfd.
            check(unsafe { libc::symlinkat(t.as_ptr(), self.backing.root_fd(), c.as_ptr()) })?;
            self.chown_new(&rel, req);
            Ok(rel)
        });
        match res {
            Ok(rel) => reply_entry(self, rel, reply),
            Err(e) => reply.error(e),
        }
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
        let res = self.child(parent, name).and_then(|from| {
            let to = self.child(newparent, newname)?;
            let cf = Backing::cpath(&from).map_err(errno)?;
            let ct = Backing::cpath(&to).map_err(errno)?;
            let fd = self.backing.root_fd();
            // SAFETY: valid dirfds and C strings.
            check(unsafe { libc::renameat2(fd, cf.as_ptr(), fd, ct.as_ptr(), flags.bits()) })?;
            self.renamed(&from, &to);
            self.capture.after_rename(&from, &to);
            Ok(())
        });
        reply_empty(reply, res)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let res = self.rel(ino).and_then(|from| {
            let to = self.child(newparent, newname)?;
            let cf = Backing::cpath(&from).map_err(errno)?;
            let ct = Backing::cpath(&to).map_err(errno)?;
            let fd = self.backing.root_fd();
            // SAFETY: valid dirfds and C strings.
            check(unsafe { libc::linkat(fd, cf.as_ptr(), fd, ct.as_ptr(), 0) })?;
            Ok(to)
        });
        match res {
            Ok(to) => reply_entry(self, to, reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if History::is_virtual(ino.0) {
            let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY
                || flags.0 & (libc::O_TRUNC | libc::O_APPEND) != 0;
            let file = self.history.as_ref().is_some_and(|h| h.is_file(ino.0));
            return if writes {
                reply.error(Errno::EROFS)
            } else if !file {
                reply.error(Errno::EISDIR)
            } else {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            };
        }
        let res = self.rel(ino).and_then(|rel| {
            let trunc = flags.0 & libc::O_TRUNC != 0;
            if trunc {
                let _ = self.capture.before_truncate(&rel, 0);
            }
            let f = self
                .backing
                .open_at(&rel, Self::open_flags(flags.0), 0)
                .map_err(errno)?;
            if trunc {
                self.capture.after_truncate(&rel, 0);
            }
            self.capture.on_open(&rel);
            let pt = self.passthrough_for(ino.0, &rel, &f, |f| reply.open_backing(f));
            Ok((self.add_handle(f, rel, ino.0, pt.clone()), pt))
        });
        match res {
            // The kernel refuses page-cache flags on passthrough handles.
            Ok((fh, Some(id))) => reply.opened_passthrough(fh, FopenFlags::empty(), &id),
            Ok((fh, None)) => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
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
        if History::is_virtual(ino.0) {
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
        if History::is_virtual(ino.0) {
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
        if History::is_virtual(ino_out.0) {
            return reply.error(Errno::EROFS);
        }
        if History::is_virtual(ino_in.0) {
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

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
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
        let h = self.handles.write().remove(&fh.0);
        if let Some(h) = h {
            self.capture.on_release(&h.rel.lock());
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
        if History::is_virtual(ino.0) {
            return reply.ok();
        }
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        if h.role == Role::Main {
            self.capture.before_fsync(&h.rel.lock());
        }
        let r = if datasync {
            h.file.sync_data()
        } else {
            h.file.sync_all()
        };
        if let Err(e) = r {
            return reply.error(errno(e));
        }
        // --sync: the app's fsync returns once its transactions are off the machine.
        if let (Some(hook), true) = (&self.durable, h.role != Role::Other) {
            let rel = h.rel.lock().clone();
            if let Err(e) = hook(&rel) {
                log::error!("{rel}: fsync is failing the app because the replicas do not have its transactions: {e:#}");
                return reply.error(Errno::EIO);
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if History::is_virtual(ino.0) {
            return match self.history.as_ref().map(|h| h.getattr(ino.0)) {
                Some(Ok(e)) if e.dir => reply.opened(FileHandle(0), FopenFlags::empty()),
                Some(Ok(_)) => reply.error(Errno::ENOTDIR),
                Some(Err(e)) => reply.error(Errno::from_i32(e)),
                None => reply.error(Errno::ENOENT),
            };
        }
        match self.rel(ino).and_then(|rel| {
            self.backing
                .open_at(&rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map_err(errno)
                .map(|f| (f, rel))
        }) {
            Ok((f, rel)) => reply.opened(self.add_handle(f, rel, ino.0, None), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if History::is_virtual(ino.0) {
            let list = match self.history.as_ref().map(|h| h.readdir(ino.0)) {
                Some(Ok(l)) => l,
                Some(Err(e)) => return reply.error(Errno::from_i32(e)),
                None => return reply.error(Errno::ENOENT),
            };
            let dots = [(ino.0, true, ".".to_string()), (1, true, "..".to_string())];
            for (i, (n, dir, name)) in dots.into_iter().chain(list).enumerate() {
                if (i as u64) < offset {
                    continue;
                }
                let kind = if dir {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                if reply.add(INodeNo(n), i as u64 + 1, kind, OsStr::new(&name)) {
                    break;
                }
            }
            return reply.ok();
        }
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let at_root = h.rel.lock().is_empty();
        // Read the whole directory through a dup of the handle's fd; offsets are indexes.
        // SAFETY: dup of an open fd.
        let dfd = unsafe { libc::dup(h.file.as_raw_fd()) };
        if dfd < 0 {
            return reply.error(last_err());
        }
        // SAFETY: dfd is a fresh directory fd owned by the DIR stream.
        let dir = unsafe { libc::fdopendir(dfd) };
        if dir.is_null() {
            // SAFETY: dfd still ours when fdopendir fails.
            unsafe { libc::close(dfd) };
            return reply.error(last_err());
        }
        // SAFETY: dir is a valid stream.
        unsafe { libc::rewinddir(dir) };
        let mut i = 0u64;
        let mut full = false;
        loop {
            // SAFETY: dir is valid; readdir returns null at end.
            let ent = unsafe { libc::readdir(dir) };
            if ent.is_null() {
                break;
            }
            // SAFETY: d_name is a NUL-terminated array inside a valid dirent.
            let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
            let nb = name.to_bytes();
            if at_root && (nb == META_DIR.as_bytes() || nb == history::NAME.as_bytes()) {
                continue;
            }
            i += 1;
            if i <= offset {
                continue;
            }
            // SAFETY: valid dirent.
            let (ino, dtype) = unsafe { ((*ent).d_ino, (*ent).d_type) };
            let kind = match dtype {
                libc::DT_DIR => FileType::Directory,
                libc::DT_LNK => FileType::Symlink,
                libc::DT_FIFO => FileType::NamedPipe,
                libc::DT_SOCK => FileType::Socket,
                libc::DT_CHR => FileType::CharDevice,
                libc::DT_BLK => FileType::BlockDevice,
                _ => FileType::RegularFile,
            };
            let ino = if ino == self.root_ino { 1 } else { ino };
            if reply.add(INodeNo(ino), i, kind, OsStr::from_bytes(nb)) {
                full = true;
                break;
            }
        }
        if at_root && !full && self.history.is_some() {
            i += 1;
            if i > offset {
                let _ = reply.add(
                    INodeNo(history::ROOT_INO),
                    i,
                    FileType::Directory,
                    OsStr::new(history::NAME),
                );
            }
        }
        // SAFETY: closes the stream and its dup'd fd.
        unsafe { libc::closedir(dir) };
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.write().remove(&fh.0);
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
        if History::is_virtual(ino.0) {
            return reply.ok();
        }
        match self
            .handle(fh)
            .and_then(|h| h.file.sync_all().map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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
        let res = self.xattr_path(ino).and_then(|p| {
            let n = cstr(name.as_bytes())?;
            // SAFETY: valid C strings and buffer.
            check(unsafe {
                libc::lsetxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            })?;
            Ok(())
        });
        reply_empty(reply, res)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if History::is_virtual(ino.0) {
            return reply.error(Errno::ENODATA);
        }
        let (p, n) = match self
            .xattr_path(ino)
            .and_then(|p| Ok((p, cstr(name.as_bytes())?)))
        {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid C strings; buffer of `size` bytes (null/0 asks for the size).
        let r = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr().cast(),
                size as usize,
            )
        };
        xattr_reply(reply, size, r, &buf);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if History::is_virtual(ino.0) {
            return if size == 0 {
                reply.size(0)
            } else {
                reply.data(&[])
            };
        }
        let p = match self.xattr_path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid C string; buffer of `size` bytes.
        let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), size as usize) };
        xattr_reply(reply, size, r, &buf);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.xattr_path(ino).and_then(|p| {
            let n = cstr(name.as_bytes())?;
            // SAFETY: valid C strings.
            check(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) })?;
            Ok(())
        });
        reply_empty(reply, res)
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if History::is_virtual(ino.0) {
            return if mask.bits() & libc::W_OK != 0 {
                reply.error(Errno::EROFS)
            } else {
                reply.ok()
            };
        }
        let res = self.rel(ino).and_then(|rel| {
            let c = Backing::cpath(&rel).map_err(errno)?;
            // SAFETY: valid dirfd and C string.
            check(unsafe {
                libc::faccessat(
                    self.backing.root_fd(),
                    c.as_ptr(),
                    mask.bits(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
            Ok(())
        });
        reply_empty(reply, res)
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
        let res = self.child(parent, name).and_then(|rel| {
            let existed = self.backing.exists(&rel);
            let trunc = existed && flags & libc::O_TRUNC != 0;
            if trunc {
                let _ = self.capture.before_truncate(&rel, 0);
            }
            let f = self
                .backing
                .open_at(
                    &rel,
                    (flags | libc::O_CREAT) & !libc::O_NOCTTY,
                    mode & !umask & 0o7777,
                )
                .map_err(errno)?;
            if !existed {
                self.chown_new(&rel, req);
            }
            if trunc {
                self.capture.after_truncate(&rel, 0);
            } else if !existed {
                self.capture.on_create(&rel);
            }
            self.capture.on_open(&rel);
            let st = self.backing.stat(&rel).map_err(errno)?;
            let attr = self.attr(&st);
            {
                let mut nodes = self.nodes.write();
                let n = nodes
                    .entry(attr.ino.0)
                    .or_insert_with(|| Node::new(rel.clone()));
                n.named(rel.clone());
                n.lookups += 1;
            }
            let pt = self.passthrough_for(attr.ino.0, &rel, &f, |f| reply.open_backing(f));
            Ok((self.add_handle(f, rel, attr.ino.0, pt.clone()), attr, pt))
        });
        match res {
            Ok((fh, attr, Some(id))) => {
                reply.created_passthrough(&TTL, &attr, Generation(0), fh, FopenFlags::empty(), &id)
            }
            Ok((fh, attr, None)) => {
                reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(e),
        }
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
        if History::is_virtual(ino.0) {
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

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        if History::is_virtual(ino.0) {
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
