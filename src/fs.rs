//! The FUSE layer: translates kernel requests into operations on the backing directory and
//! reports the ones capture cares about. It knows nothing of SQLite.
//!
//! Invariants:
//! - Every path is resolved relative to the backing directory handle, never through the mount,
//!   and no access follows a symbolic link or leaves the backing directory (`backing.rs`): an
//!   inode is reached through a descriptor already open on it (a handle of the app's, the
//!   kernel's `fh` first), else by its recorded path opened `O_PATH` beneath the root and
//!   checked to still be that inode (a stale path is ESTALE, and the kernel looks the name up
//!   again). Name operations work on (descriptor of the parent, name). So no request thread
//!   ever waits on the mount, and a racing rename never makes the daemon act on another file
//!   than the one the app named or holds open.
//! - Operations on an open descriptor (fstat, ftruncate, fchmod, futimens, fsync, fallocate…)
//!   act on that file even after it was unlinked or renamed.
//! - Names are bytes: a name that is not UTF-8 is served like any other. Capture knows files by
//!   UTF-8 names only, so such a file is never captured; a database among them is logged once.
//! - `.sqlfs` at the root (sqlfs's own metadata) does not exist as far as the mount shows.
//! - `.history` at the root is the virtual, read-only directory of history views
//!   (`history.rs`); a backing file of that name is hidden. Its inodes have the high bit set,
//!   and every mutating call on or under it fails with EROFS.
//! - Capture sees each write before it returns to the app (`before_write` → pwrite →
//!   `after_write`), in the order the app issued them; no write-back caching reorders them.
//! - No callback panics on an I/O path: errors become errnos, and capture errors are logged by
//!   capture itself and never fail the app's I/O.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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

use crate::backing::{
    self, cstring, fstat, join_bytes as join, proc_fd, stat_in, Backing, META_DIR,
};
use crate::capture::{classify, Capture, Role};
use crate::history::{self, History};

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

/// What is left of `r` below `p` (`Some("")` for `p` itself, `Some("/x")` below it).
fn below<'a>(r: &'a [u8], p: &[u8]) -> Option<&'a [u8]> {
    let rest = r.strip_prefix(p)?;
    (rest.is_empty() || rest[0] == b'/').then_some(rest)
}

/// Rewrites `r` after `from` was renamed to `to` (or swapped with it: `exchange`).
fn rebase(r: &mut Rel, from: &[u8], to: &[u8], exchange: bool) {
    let (p, q) = if below(r, from).is_some() {
        (from, to)
    } else if exchange && below(r, to).is_some() {
        (to, from)
    } else {
        return;
    };
    let mut n = q.to_vec();
    n.extend_from_slice(&r[p.len()..]);
    *r = n;
}

/// An inode the kernel knows: its path, and its other names when it has hard links.
struct Node {
    rel: Rel,
    links: Vec<Rel>,
    lookups: u64,
}

impl Node {
    fn new(rel: Rel) -> Node {
        Node {
            rel,
            links: Vec::new(),
            lookups: 0,
        }
    }

    /// `rel` names this inode (a lookup or a new hard link): it becomes the primary path.
    fn named(&mut self, rel: Rel) {
        if self.rel != rel {
            let old = std::mem::replace(&mut self.rel, rel);
            self.links.retain(|l| *l != self.rel);
            if !self.links.contains(&old) {
                self.links.push(old);
            }
        }
    }

    /// The name `rel` was removed; another name takes over if there is one. Returns the
    /// name the inode still has, if any.
    fn unnamed(&mut self, rel: &[u8]) -> Option<Rel> {
        self.links.retain(|l| l != rel);
        if self.rel == rel {
            self.rel = self.links.pop()?;
        }
        Some(self.rel.clone())
    }

    /// Rewrites every name under `from` to be under `to` (and back, for an exchange).
    fn moved(&mut self, from: &[u8], to: &[u8], exchange: bool) {
        for r in std::iter::once(&mut self.rel).chain(self.links.iter_mut()) {
            rebase(r, from, to, exchange);
        }
    }
}

struct Handle {
    file: File,
    /// The file's path, as capture names it; `None` once the file has no name left.
    rel: Mutex<Option<Rel>>,
    role: Role,
    /// The name was not UTF-8 when the file was opened: capture never sees it.
    uncaptured: bool,
    ino: u64,
    /// Kept while the kernel reads and writes this handle's backing file directly.
    _passthrough: Option<Arc<BackingId>>,
}

impl Handle {
    /// The name capture knows this file by, if it has one capture can know.
    fn cap_rel(&self) -> Option<String> {
        self.rel
            .lock()
            .as_deref()
            .and_then(utf8)
            .map(str::to_string)
    }
}

/// Open handles, by handle number and by inode.
#[derive(Default)]
struct Handles {
    by_fh: HashMap<u64, Arc<Handle>>,
    by_ino: HashMap<u64, Vec<u64>>,
}

impl Handles {
    fn insert(&mut self, fh: u64, h: Arc<Handle>) {
        self.by_ino.entry(h.ino).or_default().push(fh);
        self.by_fh.insert(fh, h);
    }

    fn remove(&mut self, fh: u64) -> Option<Arc<Handle>> {
        let h = self.by_fh.remove(&fh)?;
        if let Some(v) = self.by_ino.get_mut(&h.ino) {
            v.retain(|&f| f != fh);
            if v.is_empty() {
                self.by_ino.remove(&h.ino);
            }
        }
        Some(h)
    }

    /// Any handle open on inode `ino`.
    fn on(&self, ino: u64) -> Option<Arc<Handle>> {
        let fh = self.by_ino.get(&ino)?.first()?;
        self.by_fh.get(fh).cloned()
    }

    /// Every handle open on inode `ino`.
    fn all_on(&self, ino: u64) -> impl Iterator<Item = &Arc<Handle>> {
        self.by_ino
            .get(&ino)
            .into_iter()
            .flatten()
            .filter_map(|fh| self.by_fh.get(fh))
    }
}

/// A descriptor on the backing file of an inode, known to be that inode's.
enum Pin {
    /// The backing root (inode 1).
    Root(RawFd),
    /// A handle open on the inode (its descriptor is a real open file).
    Handle(Arc<Handle>),
    /// An `O_PATH` descriptor opened by the inode's path and checked against its inode
    /// number; with its stat and the path it was opened by.
    Path(OwnedFd, libc::stat, Rel),
}

impl Pin {
    fn fd(&self) -> RawFd {
        match self {
            Pin::Root(fd) => *fd,
            Pin::Handle(h) => h.file.as_raw_fd(),
            Pin::Path(fd, _, _) => fd.as_raw_fd(),
        }
    }

    fn stat(&self) -> Result<libc::stat, Errno> {
        match self {
            Pin::Path(_, st, _) => Ok(*st),
            _ => fstat(self.fd()).map_err(errno),
        }
    }

    /// The inode's path now, if it still has one.
    fn rel(&self) -> Option<Rel> {
        match self {
            Pin::Root(_) => Some(Rel::new()),
            Pin::Handle(h) => h.rel.lock().clone(),
            Pin::Path(_, _, r) => Some(r.clone()),
        }
    }

    /// A descriptor of the file that is not `O_PATH`, for calls that need one (fchmod,
    /// xattrs): this one, or the file opened anew read-only (only regular files and
    /// directories, whose opening has no effect and never blocks; others: None).
    fn real(&self) -> Result<Option<Real>, Errno> {
        match self {
            Pin::Path(fd, st, _) => {
                let flags = if is_type(st, libc::S_IFDIR) {
                    libc::O_RDONLY | libc::O_DIRECTORY
                } else if is_type(st, libc::S_IFREG) {
                    libc::O_RDONLY | libc::O_NONBLOCK
                } else {
                    return Ok(None);
                };
                let f = backing::reopen(fd.as_raw_fd(), flags).map_err(errno)?;
                Ok(Some(Real::Owned(f)))
            }
            _ => Ok(Some(Real::Borrowed(self.fd()))),
        }
    }
}

/// A descriptor that is not `O_PATH` (see [`Pin::real`]).
enum Real {
    Borrowed(RawFd),
    Owned(File),
}

impl Real {
    fn fd(&self) -> RawFd {
        match self {
            Real::Borrowed(fd) => *fd,
            Real::Owned(f) => f.as_raw_fd(),
        }
    }
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
    handles: RwLock<Handles>,
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
    /// Databases with names that are not UTF-8 already logged as not captured.
    warned: Mutex<HashSet<Rel>>,
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

fn euid_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

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
            written_through: None,
            pt_live: AtomicBool::new(false),
            backing_ids: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashSet::new()),
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
        rel: Option<&str>,
        f: &File,
        open_backing: impl FnOnce(&File) -> io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut ids = self.backing_ids.lock();
        if let Some(id) = ids.get(&ino).and_then(Weak::upgrade) {
            return Some(id);
        }
        let rel = rel?;
        let db = match (classify(rel), rel.strip_suffix("-shm")) {
            ((Role::Wal, db), _) | (_, Some(db)) => db,
            _ => return None,
        };
        if !self.pt_live.load(Ordering::Relaxed)
            || self.written_through.as_ref().is_some_and(|w| w(db))
        {
            return None;
        }
        if self.handles.read().by_ino.contains_key(&ino) {
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
        let st = fstat(self.backing.root_fd()).ok();
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

    /// A descriptor on inode `ino`'s backing file: the root's, a handle open on it, or its
    /// path opened `O_PATH` beneath the root and checked to be this inode (else ESTALE: the
    /// kernel then looks the name up afresh). A handle comes first: it is the file itself even
    /// when unlinked or renamed, and costs no path resolution.
    fn pin(&self, ino: INodeNo) -> Result<Pin, Errno> {
        if History::is_virtual(ino.0) {
            return Err(Errno::EROFS);
        }
        if ino.0 == 1 {
            return Ok(Pin::Root(self.backing.root_fd()));
        }
        if let Some(h) = self.handles.read().on(ino.0) {
            return Ok(Pin::Handle(h));
        }
        let names: Vec<Rel> = {
            let nodes = self.nodes.read();
            let n = nodes.get(&ino.0).ok_or(Errno::ENOENT)?;
            std::iter::once(&n.rel)
                .chain(n.links.iter())
                .cloned()
                .collect()
        };
        let mut err = Errno::ENOENT;
        for rel in names {
            match self.backing.open_beneath(&rel, libc::O_PATH, 0) {
                Ok(fd) => {
                    let st = fstat(fd.as_raw_fd()).map_err(errno)?;
                    if self.ino_of(&st) == ino.0 {
                        return Ok(Pin::Path(fd, st, rel));
                    }
                    err = Errno::ESTALE;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::ENOENT) => {}
                    // A symbolic link where a directory was, a directory gone: the path no
                    // longer leads to this inode.
                    Some(libc::ELOOP | libc::ENOTDIR | libc::EXDEV) => err = Errno::ESTALE,
                    _ => return Err(errno(e)),
                },
            }
        }
        Err(err)
    }

    /// The directory `ino` (a descriptor on it) and its path.
    fn dir(&self, ino: INodeNo) -> Result<(Pin, Rel), Errno> {
        let p = self.pin(ino)?;
        if !matches!(p, Pin::Root(_)) && !is_type(&p.stat()?, libc::S_IFDIR) {
            return Err(Errno::ENOTDIR);
        }
        let rel = p.rel().ok_or(Errno::ENOENT)?;
        Ok((p, rel))
    }

    /// The entry `name` in directory `parent`: the directory's descriptor, the entry's path
    /// and its name as a C string.
    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<(Pin, Rel, CString), Errno> {
        let (dir, p) = self.dir(parent)?;
        let nb = name.as_bytes();
        if nb.is_empty() || nb == b"." || nb == b".." || nb.contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        if p.is_empty() && nb == META_DIR.as_bytes() {
            return Err(Errno::ENOENT);
        }
        if p.is_empty() && nb == history::NAME.as_bytes() {
            return Err(Errno::EROFS);
        }
        Ok((dir, join(&p, nb), cstr(nb)?))
    }

    /// Registers `rel` (with stat `st`) as a looked-up inode.
    fn remember(&self, rel: Rel, st: &libc::stat) -> FileAttr {
        let attr = self.attr(st);
        let mut nodes = self.nodes.write();
        let n = nodes
            .entry(attr.ino.0)
            .or_insert_with(|| Node::new(rel.clone()));
        n.named(rel);
        n.lookups += 1;
        attr
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles
            .read()
            .by_fh
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add_handle(
        &self,
        file: File,
        rel: Option<Rel>,
        ino: u64,
        passthrough: Option<Arc<BackingId>>,
    ) -> FileHandle {
        let name = rel.as_deref().map(utf8);
        let role = match name {
            Some(Some(r)) => classify(r).0,
            _ => Role::Other,
        };
        let uncaptured = matches!(name, Some(None));
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().insert(
            fh,
            Arc::new(Handle {
                file,
                rel: Mutex::new(rel),
                role,
                uncaptured,
                ino,
                _passthrough: passthrough,
            }),
        );
        FileHandle(fh)
    }

    /// Logs (once per name) that the database being written at `rel`, a name that is not
    /// UTF-8, is not captured.
    fn warn_uncaptured(&self, rel: &[u8]) {
        let db = [b"-wal".as_slice(), b"-journal"]
            .iter()
            .find_map(|s| rel.strip_suffix(*s))
            .unwrap_or(rel);
        let mut w = self.warned.lock();
        if w.len() < WARN_MAX && w.insert(db.to_vec()) {
            log::warn!(
                "{}: a database whose path is not UTF-8 is served but NOT captured or replicated (rename it to a UTF-8 name to capture it)",
                show(db)
            );
        }
    }

    /// Gives a newly created node `name` in `dir` to the requesting user (sqlfs may run as
    /// root). Only a node still owned by sqlfs itself is given away: if a racing rename put
    /// someone else's file under that name, it is left as it is.
    fn chown_new(&self, dir: &Pin, name: &CStr, req: &Request) {
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

    /// Updates the paths of `from` and everything below it after a rename (and of `to` and
    /// everything below it, for an exchange).
    fn renamed(&self, from: &[u8], to: &[u8], exchange: bool) {
        for n in self.nodes.write().values_mut() {
            n.moved(from, to, exchange);
        }
        for h in self.handles.read().by_fh.values() {
            if let Some(r) = h.rel.lock().as_mut() {
                rebase(r, from, to, exchange);
            }
        }
    }

    /// The name `rel` of inode `ino` is gone (unlinked, or replaced by a rename): the inode
    /// and its open handles keep another name if it has one, else none.
    fn unnamed(&self, ino: u64, rel: &[u8]) {
        let left = self
            .nodes
            .write()
            .get_mut(&ino)
            .and_then(|n| n.unnamed(rel));
        for h in self.handles.read().all_on(ino) {
            let mut r = h.rel.lock();
            if r.as_deref() == Some(rel) {
                *r = left.clone();
            }
        }
    }

    fn open_flags(flags: i32) -> i32 {
        // The kernel handles O_APPEND positioning for us only with writeback cache off, which
        // is our mode: pass the flag through; drop flags that make no sense on the backing fd.
        flags & !(libc::O_NOCTTY | libc::O_CREAT | libc::O_EXCL)
    }

    /// chmod of the pinned file (a symbolic link: EOPNOTSUPP, like lchmod).
    fn set_mode(&self, pin: &Pin, st: &libc::stat, mode: u32) -> Result<(), Errno> {
        if is_type(st, libc::S_IFLNK) {
            return Err(Errno::EOPNOTSUPP);
        }
        let mode = mode & 0o7777;
        match pin {
            // The O_PATH descriptor's /proc entry names exactly that file.
            Pin::Path(fd, _, _) => {
                let p = proc_fd(fd.as_raw_fd());
                // SAFETY: valid C string.
                check(unsafe { libc::chmod(p.as_ptr(), mode) })
            }
            // SAFETY: open fd.
            _ => check(unsafe { libc::fchmod(pin.fd(), mode) }),
        }
    }

    /// truncate of the pinned file (through the kernel's handle `fh` if it gave one),
    /// reported to capture.
    fn set_size(
        &self,
        pin: &Pin,
        st: &libc::stat,
        fh: Option<&Arc<Handle>>,
        size: u64,
    ) -> Result<(), Errno> {
        if is_type(st, libc::S_IFDIR) {
            return Err(Errno::EISDIR);
        }
        if !is_type(st, libc::S_IFREG) {
            return Err(Errno::EINVAL);
        }
        let rel = match fh {
            Some(h) => h.cap_rel(),
            None => pin.rel().as_deref().and_then(utf8).map(str::to_string),
        };
        if let Some(r) = &rel {
            // Refused while a WAL-mode checkpoint must wait for staging (capture says why).
            self.capture.before_truncate(r, size).map_err(errno)?;
        }
        let r = match fh {
            Some(h) => h.file.set_len(size),
            None => backing::reopen(pin.fd(), libc::O_WRONLY).and_then(|f| f.set_len(size)),
        };
        r.map_err(errno)?;
        if let Some(r) = &rel {
            self.capture.after_truncate(r, size);
        }
        Ok(())
    }

    /// utimensat of the pinned file; `None` leaves a time as it is.
    fn set_times(
        &self,
        pin: &Pin,
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
            Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
                Ok(d) => libc::timespec {
                    tv_sec: d.as_secs() as i64,
                    tv_nsec: d.subsec_nanos() as i64,
                },
                Err(e) => {
                    // Before 1970: whole seconds down, nanoseconds up.
                    let d = e.duration();
                    let (s, n) = (d.as_secs() as i64, d.subsec_nanos() as i64);
                    if n == 0 {
                        libc::timespec {
                            tv_sec: -s,
                            tv_nsec: 0,
                        }
                    } else {
                        libc::timespec {
                            tv_sec: -s - 1,
                            tv_nsec: 1_000_000_000 - n,
                        }
                    }
                }
            },
        };
        let times = [ts(atime), ts(mtime)];
        // SAFETY: valid fd, C string and a two-element timespec array.
        check(unsafe {
            libc::utimensat(
                pin.fd(),
                EMPTY.as_ptr(),
                times.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        })
    }
}

impl SqlFs {
    /// Writes `data` at `offset` through handle `h`, reporting it to capture before and after.
    fn write_through(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<(), Errno> {
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
    fn check_uncaptured(&self, h: &Handle, offset: u64, data: &[u8]) {
        let Some(rel) = h.rel.lock().clone() else {
            return;
        };
        let header = offset == 0 && crate::sqlite::is_db_header(data);
        if header || rel.ends_with(b"-wal") || rel.ends_with(b"-journal") {
            self.warn_uncaptured(&rel);
        }
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

/// Replies with the attributes of `name` in `dir` (path `rel`) after a successful
/// create-like call.
fn reply_entry(fs: &SqlFs, dir: &Pin, name: &CStr, rel: Rel, reply: ReplyEntry) {
    match stat_in(dir.fd(), name) {
        Ok(st) => reply.entry(&TTL, &fs.remember(rel, &st), Generation(0)),
        Err(e) => reply.error(errno(e)),
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
            Ok((dir, rel, name)) => reply_entry(self, &dir, &name, rel, reply),
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
        // The kernel's handle if it names one, else any handle open on the inode (fstat of an
        // unlinked file), else its path.
        let st = match fh.and_then(|f| self.handle(f).ok()) {
            Some(h) => fstat(h.file.as_raw_fd()).map_err(errno),
            None => self.pin(ino).and_then(|p| p.stat()),
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
        let res = (|| {
            // The kernel's handle (ftruncate, and whatever else it passes one for), else any
            // handle open on the inode (fchmod, futimens… of a file that may be unlinked or
            // renamed), else the inode's path, checked to lead to it.
            let fh = fh.and_then(|f| self.handle(f).ok());
            let pin = match &fh {
                Some(h) => Pin::Handle(h.clone()),
                None => self.pin(ino)?,
            };
            let st = pin.stat()?;
            if let Some(m) = mode {
                self.set_mode(&pin, &st, m)?;
            }
            if uid.is_some() || gid.is_some() {
                let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
                // SAFETY: valid fd and C string; -1 leaves an id unchanged.
                check(unsafe {
                    libc::fchownat(pin.fd(), EMPTY.as_ptr(), u, g, libc::AT_EMPTY_PATH)
                })?;
            }
            if let Some(sz) = size {
                self.set_size(&pin, &st, fh.as_ref(), sz)?;
            }
            if atime.is_some() || mtime.is_some() {
                self.set_times(&pin, atime, mtime)?;
            }
            fstat(pin.fd()).map_err(errno)
        })();
        match res {
            Ok(st) => reply.attr(&TTL, &self.attr(&st)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        if History::is_virtual(ino.0) {
            return reply.error(Errno::EINVAL);
        }
        let res = self.pin(ino).and_then(|p| {
            if !is_type(&p.stat()?, libc::S_IFLNK) {
                return Err(Errno::EINVAL);
            }
            let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
            // SAFETY: valid fd (O_PATH on the link itself), C string and buffer.
            let n = unsafe {
                libc::readlinkat(p.fd(), EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if n < 0 {
                return Err(last_err());
            }
            buf.truncate(n as usize);
            Ok(buf)
        });
        match res {
            Ok(t) => reply.data(&t),
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

    fn mkdir(
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

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.child(parent, name).and_then(|(dir, rel, c)| {
            let ino = stat_in(dir.fd(), &c).map(|st| self.ino_of(&st)).ok();
            let name = utf8(&rel);
            if let Some(r) = name {
                self.capture.before_unlink(r);
            }
            // SAFETY: valid dirfd and C string.
            check(unsafe { libc::unlinkat(dir.fd(), c.as_ptr(), 0) })?;
            if let Some(i) = ino {
                self.unnamed(i, &rel);
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

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.child(parent, name).and_then(|(dir, rel, c)| {
            let ino = stat_in(dir.fd(), &c).map(|st| self.ino_of(&st)).ok();
            // SAFETY: valid dirfd and C string.
            check(unsafe { libc::unlinkat(dir.fd(), c.as_ptr(), libc::AT_REMOVEDIR) })?;
            if let Some(i) = ino {
                self.unnamed(i, &rel);
            }
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
        let res = self.child(parent, name).and_then(|(d1, from, n1)| {
            let (d2, to, n2) = self.child(newparent, newname)?;
            let exchange = flags.bits() & libc::RENAME_EXCHANGE != 0;
            let moved = stat_in(d1.fd(), &n1).map(|st| self.ino_of(&st)).ok();
            let replaced = stat_in(d2.fd(), &n2).map(|st| self.ino_of(&st)).ok();
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
            if let (false, Some(i)) = (exchange, replaced) {
                self.unnamed(i, &to);
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

    fn link(
        &self,
        _req: &Request,
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
            let name = rel.as_deref().and_then(utf8);
            let trunc = flags.0 & libc::O_TRUNC != 0;
            if let (true, Some(r)) = (trunc, name) {
                let _ = self.capture.before_truncate(r, 0);
            }
            // The pinned file itself, opened anew with the app's flags.
            let f = backing::reopen(pin.fd(), Self::open_flags(flags.0)).map_err(errno)?;
            if let Some(r) = name {
                if trunc {
                    self.capture.after_truncate(r, 0);
                }
                self.capture.on_open(r);
            }
            let pt = self.passthrough_for(ino.0, name, &f, |f| reply.open_backing(f));
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
        let h = self.handles.write().remove(fh.0);
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
        if History::is_virtual(ino.0) {
            return reply.ok();
        }
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let rel = (h.role != Role::Other).then(|| h.cap_rel()).flatten();
        if let (Role::Main, Some(r)) = (h.role, &rel) {
            self.capture.before_fsync(r);
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
        if let (Some(hook), Some(rel)) = (&self.durable, rel) {
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
        match self.dir(ino).and_then(|(pin, rel)| {
            backing::reopen(pin.fd(), libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(errno)
                .map(|f| (f, Some(rel)))
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
        let at_root = h.ino == 1;
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
        let res = self.pin(ino).and_then(|p| {
            let n = cstr(name.as_bytes())?;
            // Symbolic links and special files: refused, never followed or opened.
            let f = p.real()?.ok_or(Errno::EPERM)?;
            // SAFETY: valid fd, C string and buffer.
            check(unsafe {
                libc::fsetxattr(
                    f.fd(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            })
        });
        reply_empty(reply, res)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if History::is_virtual(ino.0) {
            return reply.error(Errno::ENODATA);
        }
        let (f, n) = match self
            .pin(ino)
            .and_then(|p| Ok((p.real()?, cstr(name.as_bytes())?)))
        {
            Ok((Some(f), n)) => (f, n),
            // Symbolic links and special files: no attributes shown (never followed or opened).
            Ok((None, _)) => return reply.error(Errno::ENODATA),
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid fd and C string; buffer of `size` bytes (null/0 asks for the size).
        let r =
            unsafe { libc::fgetxattr(f.fd(), n.as_ptr(), buf.as_mut_ptr().cast(), size as usize) };
        xattr_reply(reply, size, r, &buf);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let empty = |reply: ReplyXattr| {
            if size == 0 {
                reply.size(0)
            } else {
                reply.data(&[])
            }
        };
        if History::is_virtual(ino.0) {
            return empty(reply);
        }
        let f = match self.pin(ino).and_then(|p| p.real()) {
            Ok(Some(f)) => f,
            Ok(None) => return empty(reply),
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid fd; buffer of `size` bytes.
        let r = unsafe { libc::flistxattr(f.fd(), buf.as_mut_ptr().cast(), size as usize) };
        xattr_reply(reply, size, r, &buf);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.pin(ino).and_then(|p| {
            let n = cstr(name.as_bytes())?;
            let f = p.real()?.ok_or(Errno::ENODATA)?;
            // SAFETY: valid fd and C string.
            check(unsafe { libc::fremovexattr(f.fd(), n.as_ptr()) })
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
        let res = self.pin(ino).and_then(|p| {
            if mask.bits() == libc::F_OK {
                return Ok(());
            }
            // SAFETY: valid fd and C string.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_faccessat2,
                    p.fd(),
                    EMPTY.as_ptr(),
                    mask.bits(),
                    libc::AT_EMPTY_PATH,
                )
            };
            match r {
                0.. => Ok(()),
                // Without faccessat2 the file exists, which is all that can be said safely.
                _ if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) => Ok(()),
                _ => Err(last_err()),
            }
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
        let res = self.child(parent, name).and_then(|(dir, rel, c)| {
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
            if let Some(r) = cap {
                if trunc {
                    self.capture.after_truncate(r, 0);
                } else if !existed {
                    self.capture.on_create(r);
                }
                self.capture.on_open(r);
            }
            let st = fstat(fd).map_err(errno)?;
            let attr = self.attr(&st);
            {
                let mut nodes = self.nodes.write();
                let n = nodes
                    .entry(attr.ino.0)
                    .or_insert_with(|| Node::new(rel.clone()));
                n.named(rel.clone());
                n.lookups += 1;
            }
            let pt = self.passthrough_for(attr.ino.0, cap, &f, |f| reply.open_backing(f));
            Ok((
                self.add_handle(f, Some(rel), attr.ino.0, pt.clone()),
                attr,
                pt,
            ))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &[u8]) -> Rel {
        s.to_vec()
    }

    #[test]
    fn paths_follow_renames_and_exchanges() {
        let mut p = r(b"a/b/c");
        rebase(&mut p, b"a/b", b"x", false);
        assert_eq!(p, b"x/c");
        let mut p = r(b"a/bc");
        rebase(&mut p, b"a/b", b"x", false);
        assert_eq!(p, b"a/bc", "a sibling with a longer name is not below");
        let mut p = r(b"y/z");
        rebase(&mut p, b"x", b"y", true);
        assert_eq!(p, b"x/z", "an exchange moves the other side back");
        let mut p = r(b"y/z");
        rebase(&mut p, b"x", b"y", false);
        assert_eq!(p, b"y/z", "a plain rename leaves the target's old children");
        let mut p = r(b"caf\xe9/f");
        rebase(&mut p, b"caf\xe9", b"\xff", false);
        assert_eq!(p, b"\xff/f");
    }

    #[test]
    fn a_removed_name_hands_over_to_another_link() {
        let mut n = Node::new(r(b"a"));
        n.named(r(b"b"));
        assert_eq!(n.rel, b"b");
        assert_eq!(n.unnamed(b"b"), Some(r(b"a")));
        assert_eq!(n.unnamed(b"a"), None);
    }
}
