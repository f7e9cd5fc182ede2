//! The floor under synchronous=FULL: a FUSE server that holds one file, passes its reads and
//! writes to a backing file with kernel passthrough, and answers fsync with an fdatasync of
//! that file, through the same FUSE library sqlfs uses. It captures nothing. A commit-like
//! loop (a 24-byte frame header, a 4 KiB page, fdatasync) through it pays what any FUSE
//! filesystem pays on this machine for an fsync (the kernel hands every fsync to the daemon,
//! passthrough or not) and nothing more. The bench runs the same loop on the native directory
//! beside it.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use fuser::{
    BackgroundSession, BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyEmpty, ReplyEntry, ReplyOpen, Request, Session, SessionACL,
};
use parking_lot::Mutex;

const NAME: &str = "f";
const ROOT: u64 = 1;
const FILE: u64 = 2;
const TTL: Duration = Duration::from_secs(3600);

/// The one-file filesystem.
struct FloorFs {
    file: File,
    /// Kept for the session's lifetime: the kernel's handle on the backing file.
    backing: Mutex<Option<BackingId>>,
}

impl FloorFs {
    fn attr(&self, ino: u64) -> std::io::Result<FileAttr> {
        let m = self.file.metadata()?;
        let (kind, perm) = if ino == ROOT {
            (FileType::Directory, 0o755)
        } else {
            (FileType::RegularFile, 0o644)
        };
        let t = |s: i64| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: if ino == ROOT { 0 } else { m.size() },
            blocks: m.blocks(),
            atime: t(m.atime()),
            mtime: t(m.mtime()),
            ctime: t(m.ctime()),
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for FloorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
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
        if parent.0 != ROOT || name != NAME {
            return reply.error(Errno::ENOENT);
        }
        match self.attr(FILE) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(a) => reply.attr(&Duration::ZERO, &a),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != FILE {
            return reply.error(Errno::EISDIR);
        }
        let mut held = self.backing.lock();
        if held.is_none() {
            match reply.open_backing(&self.file) {
                Ok(id) => *held = Some(id),
                Err(_) => return reply.error(Errno::EIO),
            }
        }
        let id = held.as_ref().expect("registered above");
        reply.opened_passthrough(FileHandle(1), FopenFlags::empty(), id);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file.sync_data() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(Errno::EIO),
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
}

/// A mounted one-file floor server.
pub struct Floor {
    session: Option<BackgroundSession>,
    file: PathBuf,
}

impl Floor {
    /// Mounts the server on `dir`, its file backed by `backing`.
    pub fn mount(dir: &Path, backing: &Path) -> Result<Floor> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(backing)
            .with_context(|| format!("creating {}", backing.display()))?;
        let fs = FloorFs {
            file,
            backing: Mutex::new(None),
        };
        let mut cfg = Config::default();
        cfg.mount_options = vec![MountOption::FSName("sqlfs-bench-floor".into())];
        cfg.acl = SessionACL::Owner;
        cfg.n_threads = Some(4);
        cfg.clone_fd = true;
        let session = Session::new(fs, dir, &cfg)
            .with_context(|| format!("mounting the floor server on {}", dir.display()))?
            .spawn()?;
        let file = dir.join(NAME);
        let start = Instant::now();
        while std::fs::metadata(&file).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the floor server at {} did not come up", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Floor {
            session: Some(session),
            file,
        })
    }

    /// The server's file.
    pub fn file(&self) -> &Path {
        &self.file
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
