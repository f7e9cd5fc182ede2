//! The floors: a bare FUSE server, through the same FUSE library sqlfs uses, that serves a
//! backing directory and does nothing but pass through. Files are opened with kernel
//! passthrough (the kernel reads and writes the backing file itself), fsync is an fdatasync
//! of the backing file, names and attributes are cached for the same second as sqlfs's and
//! directory listings kept by the kernel as sqlfs's are; getxattr answers ENODATA (a request
//! the kernel hands to the filesystem every time). It captures nothing and keeps no state but
//! inode numbers and open handles. It is mounted with sqlfs's mount options (the kernel checks
//! permissions, `default_permissions`, as it must for a server that serves every user). What a
//! workload costs through it is what any FUSE server mounted so costs on this machine; the bench runs the same workloads natively and through sqlfs beside
//! it (the floor under FULL, and one floor per small-commit row and per plain-file row that
//! must reach a ratio).
//!
//! Minimal on purpose: lookup, getattr, setattr (size only), open, create, release, flush,
//! fsync, mkdir, unlink, rmdir, opendir, readdir, releasedir, getxattr; inode numbers are the
//! backing files', the root's 1.
//!
//! Its cached mode ([`Floor::mount_cached`]) passes nothing through: it asks the kernel for
//! writeback caching and serves read and write itself, so an app's writes land in the page
//! cache and reach the server later in requests of up to 1 MiB. It measures what caching would
//! give the writes sqlfs serves itself (a checkpoint's, on the default mount), which sqlfs
//! does not do (docs/PERFORMANCE.md).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use fuser::{
    BackgroundSession, BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, ReplyXattr, Request, Session, SessionACL, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};

const ROOT: u64 = 1;
/// sqlfs's: names and attributes are cached for a second.
const TTL: Duration = Duration::from_secs(1);
/// The kernel sends no FLUSH at close: nothing here needs to see a close before it returns.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// An open file: the backing file and the kernel's id for it (shared by every handle on the
/// inode while one is open, as the kernel requires; none in the cached mode).
struct Open {
    file: File,
    _id: Option<Arc<BackingId>>,
}

/// A directory's entries: inode, type, name.
type Listing = Vec<(u64, FileType, OsString)>;

/// The pass-through filesystem.
struct FloorFs {
    root: PathBuf,
    /// Backing path of every inode the kernel was told of (never forgotten: a bench's worth).
    paths: RwLock<HashMap<u64, PathBuf>>,
    ids: Mutex<HashMap<u64, Weak<BackingId>>>,
    files: Mutex<HashMap<u64, Arc<Open>>>,
    /// Open directories: their path, and their listing once the kernel asked for it.
    dirs: Mutex<HashMap<u64, (PathBuf, Option<Listing>)>>,
    next_fh: AtomicU64,
    /// The cached mode ([`Floor::mount_cached`]): no passthrough; the kernel's page cache
    /// takes writes (writeback caching) and hands them over later, in large requests.
    cached: bool,
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn kind_of(m: &fs::Metadata) -> FileType {
    let t = m.file_type();
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    }
}

impl FloorFs {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths.read().get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn ino(&self, m: &fs::Metadata, path: &Path) -> u64 {
        if path == self.root {
            ROOT
        } else {
            m.ino()
        }
    }

    fn attr(&self, path: &Path) -> Result<FileAttr, Errno> {
        let m = fs::symlink_metadata(path).map_err(|e| io_errno(&e))?;
        let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns as u32);
        Ok(FileAttr {
            ino: INodeNo(self.ino(&m, path)),
            size: m.size(),
            blocks: m.blocks(),
            atime: t(m.atime(), m.atime_nsec()),
            mtime: t(m.mtime(), m.mtime_nsec()),
            ctime: t(m.ctime(), m.ctime_nsec()),
            crtime: SystemTime::UNIX_EPOCH,
            kind: kind_of(&m),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The attributes of `parent`/`name`, its inode remembered.
    fn entry(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let path = self.path(parent)?.join(name);
        let attr = self.attr(&path)?;
        self.paths.write().insert(attr.ino.0, path);
        Ok(attr)
    }

    /// Registers an open backing file of inode `ino`: its handle and the backing id.
    fn register(
        &self,
        ino: u64,
        file: File,
        open_backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Result<(FileHandle, Option<Arc<BackingId>>), Errno> {
        if self.cached {
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            let open = Arc::new(Open { file, _id: None });
            self.files.lock().insert(fh, open);
            return Ok((FileHandle(fh), None));
        }
        let mut ids = self.ids.lock();
        let id = match ids.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => {
                let id = Arc::new(open_backing(&file).map_err(|e| io_errno(&e))?);
                ids.retain(|_, w| w.strong_count() > 0);
                ids.insert(ino, Arc::downgrade(&id));
                id
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().insert(
            fh,
            Arc::new(Open {
                file,
                _id: Some(id.clone()),
            }),
        );
        Ok((FileHandle(fh), Some(id)))
    }
}

/// The entries of directory `dir` (types from the listing itself: no stat).
fn list(dir: &Path) -> Result<Listing, Errno> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| io_errno(&e))? {
        let e = e.map_err(|e| io_errno(&e))?;
        let t = e.file_type().map_err(|e| io_errno(&e))?;
        let kind = if t.is_dir() {
            FileType::Directory
        } else if t.is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        out.push((e.ino(), kind, e.file_name()));
    }
    Ok(out)
}

/// The flags an app's open passes on to the backing file (no creation, no truncation: the
/// kernel asked for those separately).
fn open_options(flags: i32) -> OpenOptions {
    let acc = flags & libc::O_ACCMODE;
    let mut o = OpenOptions::new();
    o.read(acc != libc::O_WRONLY)
        .write(acc != libc::O_RDONLY)
        .append(flags & libc::O_APPEND != 0)
        .custom_flags(
            flags
                & !(libc::O_ACCMODE
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_TRUNC
                    | libc::O_APPEND),
        );
    o
}

impl Filesystem for FloorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // As sqlfs: without it the kernel asks for security.capability before every write.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        if self.cached {
            let _ = config.set_max_write(1 << 20);
            return config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .map_err(|_| std::io::Error::other("the kernel offers no writeback caching"));
        }
        if config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .is_err()
            || config.set_max_stack_depth(1).is_err()
        {
            return Err(std::io::Error::other(
                "the kernel offers no FUSE passthrough",
            ));
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.entry(parent, name) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(ino).and_then(|p| self.attr(&p)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let res = self.path(ino).and_then(|p| {
            if let Some(size) = size {
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.set_len(size))
                    .map_err(|e| io_errno(&e))?;
            }
            self.attr(&p)
        });
        match res {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let res = self.path(ino).and_then(|p| {
            let f = open_options(flags.0).open(&p).map_err(|e| io_errno(&e))?;
            self.register(ino.0, f, |f| reply.open_backing(f))
        });
        match res {
            Ok((fh, Some(id))) => reply.opened_passthrough(fh, OPEN_FLAGS, &id),
            Ok((fh, None)) => reply.opened(fh, OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let res = self.path(parent).and_then(|dir| {
            let path = dir.join(name);
            let mut o = open_options(flags);
            o.create(true)
                .truncate(flags & libc::O_TRUNC != 0)
                .mode(mode & !umask & 0o7777);
            if flags & libc::O_EXCL != 0 {
                o.create_new(true);
            }
            let f = o.open(&path).map_err(|e| io_errno(&e))?;
            let attr = self.attr(&path)?;
            self.paths.write().insert(attr.ino.0, path);
            let (fh, id) = self.register(attr.ino.0, f, |f| reply.open_backing(f))?;
            Ok((attr, fh, id))
        });
        match res {
            Ok((attr, fh, Some(id))) => {
                reply.created_passthrough(&TTL, &attr, Generation(0), fh, OPEN_FLAGS, &id)
            }
            Ok((attr, fh, None)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                fh,
                OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(open) = self.files.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match open.file.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return reply.error(io_errno(&e)),
            }
        }
        reply.data(&buf[..n]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(open) = self.files.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        match open.file.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
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
        self.files.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let open = self.files.lock().get(&fh.0).cloned();
        match open.map(|o| o.file.sync_data()) {
            Some(Ok(())) => reply.ok(),
            _ => reply.error(Errno::EIO),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let res = self.path(parent).and_then(|dir| {
            fs::DirBuilder::new()
                .mode(mode & !umask & 0o7777)
                .create(dir.join(name))
                .map_err(|e| io_errno(&e))?;
            self.entry(parent, name)
        });
        match res {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .path(parent)
            .and_then(|d| fs::remove_file(d.join(name)).map_err(|e| io_errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .path(parent)
            .and_then(|d| fs::remove_dir(d.join(name)).map_err(|e| io_errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.path(ino) {
            Ok(dir) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dirs.lock().insert(fh, (dir, None));
                // As sqlfs's: the kernel may keep the listing between opens, and then reads
                // none of it.
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut dirs = self.dirs.lock();
        let Some((dir, listing)) = dirs.get_mut(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        if listing.is_none() {
            // Read once, at the first readdir of this open.
            match list(dir) {
                Ok(l) => *listing = Some(l),
                Err(e) => return reply.error(e),
            }
        }
        let entries = listing.iter().flatten().enumerate().skip(offset as usize);
        for (i, (ino, kind, name)) in entries {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
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
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // No file here has extended attributes; ENOSYS would stop the kernel from asking.
        reply.error(Errno::ENODATA);
    }
}

/// A mounted floor server.
pub struct Floor {
    session: Option<BackgroundSession>,
    dir: PathBuf,
}

impl Floor {
    /// Mounts the server on `dir`, serving the directory `backing` (both made if missing).
    pub fn mount(dir: &Path, backing: &Path) -> Result<Floor> {
        Floor::mount_with(dir, backing, false)
    }

    /// The same server without passthrough, with the kernel's writeback caching instead: a
    /// write returns once it is in the page cache, and the kernel hands the dirty pages to
    /// the server later (at the latest at fsync), up to 1 MiB a request. What caching would
    /// give the writes that go through the daemon.
    pub fn mount_cached(dir: &Path, backing: &Path) -> Result<Floor> {
        Floor::mount_with(dir, backing, true)
    }

    fn mount_with(dir: &Path, backing: &Path, cached: bool) -> Result<Floor> {
        fs::create_dir_all(dir)?;
        fs::create_dir_all(backing)?;
        let root = backing
            .canonicalize()
            .with_context(|| format!("resolving {}", backing.display()))?;
        let fs = FloorFs {
            paths: RwLock::new(HashMap::from([(ROOT, root.clone())])),
            root,
            ids: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            cached,
        };
        let dev = fs::metadata(dir)?.dev();
        let mut cfg = Config::default();
        // sqlfs's own mount options (`mount/mod.rs`): with `default_permissions` the kernel
        // checks permissions itself, and after each change to a directory (a file made or
        // removed in it) it asks the server for that directory's attributes again before the
        // next check, one request more than a server without it pays.
        cfg.mount_options = vec![
            MountOption::FSName("sqlfs-bench-floor".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        cfg.acl = SessionACL::Owner;
        cfg.n_threads = Some(4);
        cfg.clone_fd = true;
        let session = Session::new(fs, dir, &cfg)
            .with_context(|| format!("mounting the floor server on {}", dir.display()))?
            .spawn()?;
        let start = Instant::now();
        while fs::metadata(dir).map(|m| m.dev()).unwrap_or(dev) == dev {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the floor server at {} did not come up", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Floor {
            session: Some(session),
            dir: dir.to_path_buf(),
        })
    }

    /// The mounted directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts.
    pub fn stop(mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            s.umount_and_join()?;
        }
        Ok(())
    }
}

/// Commit-like writes to `path` for `secs`: a 24-byte header and a 4 KiB page at the next of
/// 1,000 slots (as a WAL is rewritten after each checkpoint), then fdatasync. Returns
/// commits/s.
pub fn fsync_loop(path: &Path, secs: f64) -> Result<f64> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let (head, mut page) = ([1u8; 24], vec![7u8; 4096]);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let off = (n % 1000) * 4120;
        page[(n % 4096) as usize] = page[(n % 4096) as usize].wrapping_add(1);
        f.write_all_at(&head, off)?;
        f.write_all_at(&page, off + 24)?;
        f.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}
