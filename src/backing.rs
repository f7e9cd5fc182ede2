//! The backing directory: every file the mount shows lives here. It is opened once, before the
//! mount is made, and every access goes through that handle, so an in-place mount (backing dir
//! == mountpoint) never loops back into itself.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Name of sqlfs's own metadata directory at the backing root; hidden from the mount.
pub const META_DIR: &str = ".sqlfs";

/// (`/proc/self/fd/N`, real path) of every backing directory opened, for messages.
static SHOWN: parking_lot::RwLock<Vec<(PathBuf, PathBuf)>> = parking_lot::RwLock::new(Vec::new());

/// `p` as a user would name it: the backing directory's real path instead of the
/// `/proc/self/fd/N` handle path used to reach it.
pub fn shown(p: &Path) -> PathBuf {
    for (proc, real) in SHOWN.read().iter() {
        if let Ok(rest) = p.strip_prefix(proc) {
            return real.join(rest);
        }
    }
    p.to_path_buf()
}

pub struct Backing {
    root: OwnedFd,
    /// `/proc/self/fd/N`: a path that reaches the backing root even under the mount.
    proc_root: PathBuf,
}

impl Backing {
    pub fn open(dir: &Path) -> io::Result<Backing> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: plain syscall with a valid C string.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        let proc_root = PathBuf::from(format!("/proc/self/fd/{fd}"));
        SHOWN.write().push((proc_root.clone(), dir.to_path_buf()));
        Ok(Backing { root, proc_root })
    }

    pub fn root_fd(&self) -> i32 {
        self.root.as_raw_fd()
    }

    /// A path reaching `rel` in the backing directory (never through the mount).
    pub fn path(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.proc_root.clone()
        } else {
            self.proc_root.join(rel)
        }
    }

    /// C string of `rel` for the `*at` calls; "." for the root.
    pub fn cpath(rel: &str) -> io::Result<CString> {
        CString::new(if rel.is_empty() { "." } else { rel })
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    }

    /// openat(root, rel, flags, mode).
    pub fn open_at(&self, rel: &str, flags: i32, mode: u32) -> io::Result<File> {
        let c = Self::cpath(rel)?;
        // SAFETY: valid dirfd and C string.
        let fd = unsafe {
            libc::openat(
                self.root_fd(),
                c.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd, owned here.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// A read-only handle on `rel`, or `None` if it does not exist.
    pub fn open_read(&self, rel: &str) -> io::Result<Option<File>> {
        match self.open_at(rel, libc::O_RDONLY | libc::O_NOFOLLOW, 0) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// lstat of `rel` relative to the root.
    pub fn stat(&self, rel: &str) -> io::Result<libc::stat> {
        let c = Self::cpath(rel)?;
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid dirfd, C string and out-pointer.
        let r = unsafe {
            libc::fstatat(
                self.root_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.stat(rel).is_ok()
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        SHOWN.write().retain(|(p, _)| *p != self.proc_root);
    }
}

/// Lowers the calling thread's scheduling priority by 10 nice levels below the daemon's own:
/// work that trails the app (capture from the WAL, shipping, folding) yields the CPU to the
/// app's own threads on a busy machine.
pub fn background_priority() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        // getpriority can return -1 legitimately; errno tells an error apart.
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        let now = if *libc::__errno_location() != 0 {
            0
        } else {
            now
        };
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + 10).min(19));
    }
}

/// Bytes written to a file after which their writeback is started (see [`start_writeback`]).
pub const WRITEBACK_STEP: u64 = 256 << 10;

/// Starts writeback of `len` bytes of `f` from `off` without waiting for it: a hint that
/// spreads a file's writes to disk over time, so that a later fsync finds little left to
/// write. Durability still comes from that fsync; errors are ignored (the fsync reports them).
pub fn start_writeback(f: &File, off: u64, len: u64) {
    // SAFETY: plain syscall on an open descriptor; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Joins a parent's relative path and a name.
pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}
