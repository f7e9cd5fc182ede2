//! The backing directory: every file the mount shows lives here. It is opened once, before the
//! mount is made, and every access goes through that handle, so an in-place mount (backing dir
//! == mountpoint) never loops back into itself.
//!
//! Invariant: no access to a file of the backing directory follows a symbolic link or resolves
//! outside the directory. Relative paths are resolved with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` (a walk of `O_NOFOLLOW` opens, one component
//! at a time, where the kernel lacks `openat2`), and every other call works on a descriptor
//! opened that way: the `*at` calls on (parent descriptor, final name) with
//! `AT_SYMLINK_NOFOLLOW`, or on the file's own descriptor (`AT_EMPTY_PATH`, or its
//! `/proc/self/fd/N` entry, which names exactly that file). A symbolic link in the backing
//! directory, absolute or relative, pointing into the mount or anywhere else, is only ever
//! read, never followed: so no request thread can be sent back into the mount (which would
//! wait on itself) and no app can steer the daemon onto a file outside the directory.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Name of sqlfs's own metadata directory at the backing root; hidden from the mount.
pub const META_DIR: &str = ".sqlfs";

/// (`/proc/self/fd/N`, real path) of every backing directory opened, for messages.
static SHOWN: parking_lot::RwLock<Vec<(PathBuf, PathBuf)>> = parking_lot::RwLock::new(Vec::new());

/// `openat2` was refused as unknown (kernel before 5.6): walk paths one component at a time.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

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

/// The argument of `openat2` (`struct open_how`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `bytes` as a C string (a name with a NUL byte cannot exist: EINVAL).
pub fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// fstat of an open descriptor.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall with a valid out-pointer.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// fstatat(dir, name, AT_SYMLINK_NOFOLLOW): `name` is one component.
pub fn stat_in(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// The entry `name` of `dir` (one component) opened `O_PATH`, never following a symbolic link
/// (a link is opened as itself), with its stat. An `O_PATH` open never blocks and has no
/// effect on the file; the descriptor keeps the inode from being freed while it is open.
pub fn hold_in(dir: RawFd, name: &CStr) -> io::Result<(OwnedFd, libc::stat)> {
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid C string; openat returns a new descriptor or -1.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags) })?;
    // SAFETY: a descriptor just opened, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(fd.as_raw_fd())?;
    Ok((fd, st))
}

/// `/proc/self/fd/N` for descriptor `fd`: a path that reaches exactly the file `fd` is open
/// on (even unlinked), whatever names lead to it now.
pub fn proc_fd(fd: RawFd) -> CString {
    // A decimal number never holds a NUL byte.
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// [`proc_fd`] as a path, for code that works with paths (listing a directory opened beneath
/// the root, SQLite opening a database in it).
pub fn proc_fd_path(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// Opens the file descriptor `fd` is open on anew with `flags` (through `/proc/self/fd/N`),
/// e.g. an `O_PATH` descriptor for reading or writing. The caller has checked what kind of
/// file it is: opening is never allowed to block (a FIFO) or to have effects (a device).
pub fn reopen(fd: RawFd, flags: i32) -> io::Result<File> {
    let p = proc_fd(fd);
    let flags = (flags | libc::O_CLOEXEC | libc::O_NOCTTY)
        & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_PATH);
    // SAFETY: valid C string.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), flags, 0) })?;
    // SAFETY: fresh fd, owned here.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The components of a relative path, each checked to be a plain name.
fn components(rel: &[u8]) -> io::Result<Vec<&[u8]>> {
    let mut v = Vec::new();
    for c in rel.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(io::Error::from_raw_os_error(libc::EXDEV)),
            c => v.push(c),
        }
    }
    Ok(v)
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

    /// The path of sqlfs's own metadata directory (`.sqlfs/`, which no app can create or
    /// reach through the mount), for the staging code that works with paths.
    pub fn meta_path(&self) -> PathBuf {
        self.proc_root.join(META_DIR)
    }

    /// Opens `rel` (relative to the root; "" is the root) with `flags`, never following a
    /// symbolic link, in any component, and never leaving the backing directory: a link in an
    /// intermediate component fails with ELOOP (or ENOTDIR on the fallback walk), one as the
    /// final component too, unless `flags` has `O_PATH | O_NOFOLLOW` (then the descriptor is
    /// on the link itself). `O_NOFOLLOW` is always added.
    pub fn open_beneath<R: AsRef<[u8]> + ?Sized>(
        &self,
        rel: &R,
        flags: i32,
        mode: u32,
    ) -> io::Result<OwnedFd> {
        let rel = rel.as_ref();
        let mut flags = flags | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        if flags & libc::O_PATH == 0 {
            // (openat2 refuses any other flag beside O_PATH.)
            flags |= libc::O_NOCTTY;
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let c = cstring(if rel.is_empty() { b"." } else { rel })?;
            let how = OpenHow {
                flags: flags as u32 as u64,
                mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
                    (mode & 0o7777) as u64
                } else {
                    0
                },
                resolve: libc::RESOLVE_BENEATH
                    | libc::RESOLVE_NO_SYMLINKS
                    | libc::RESOLVE_NO_MAGICLINKS,
            };
            // SAFETY: valid dirfd, C string and open_how of the size passed.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.root_fd(),
                    c.as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            };
            if r >= 0 {
                // SAFETY: fresh fd, owned here.
                return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOSYS) {
                return Err(e);
            }
            NO_OPENAT2.store(true, Ordering::Relaxed);
        }
        self.walk(rel, flags, mode)
    }

    /// `open_beneath` without `openat2`: one `O_NOFOLLOW` open per component.
    fn walk(&self, rel: &[u8], flags: i32, mode: u32) -> io::Result<OwnedFd> {
        let comps = components(rel)?;
        let Some((last, dirs)) = comps.split_last() else {
            // The root itself.
            let c = cstring(b".")?;
            // SAFETY: valid dirfd and C string.
            let fd = cvt(unsafe { libc::openat(self.root_fd(), c.as_ptr(), flags, mode) })?;
            // SAFETY: fresh fd, owned here.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        };
        let mut cur: Option<OwnedFd> = None;
        for d in dirs {
            let c = cstring(d)?;
            let at = cur.as_ref().map_or(self.root_fd(), |f| f.as_raw_fd());
            // SAFETY: valid dirfd and C string.
            let fd = cvt(unsafe {
                libc::openat(
                    at,
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            })?;
            // SAFETY: fresh fd, owned here.
            cur = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let c = cstring(last)?;
        let at = cur.as_ref().map_or(self.root_fd(), |f| f.as_raw_fd());
        // SAFETY: valid dirfd and C string.
        let fd = cvt(unsafe { libc::openat(at, c.as_ptr(), flags, mode as libc::c_uint) })?;
        // SAFETY: fresh fd, owned here.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The directory holding `rel` (opened `O_PATH` beneath the root, as [`Self::open_beneath`])
    /// and `rel`'s final name, for the `*at` calls. The root itself has no parent: EINVAL.
    pub fn parent_of<R: AsRef<[u8]> + ?Sized>(&self, rel: &R) -> io::Result<(OwnedFd, CString)> {
        let rel = rel.as_ref();
        let comps = components(rel)?;
        let Some((last, dirs)) = comps.split_last() else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let parent = dirs.join(&b'/');
        let dir = self.open_beneath(&parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        Ok((dir, cstring(last)?))
    }

    /// A read-only handle on the regular file `rel` for sqlfs's own reads (its access time
    /// never moves), or `None` if it does not exist. Never blocks: anything but a regular file
    /// is refused (EINVAL) before it is opened for reading.
    pub fn open_read<R: AsRef<[u8]> + ?Sized>(&self, rel: &R) -> io::Result<Option<File>> {
        let fd = match self.open_beneath(rel, libc::O_PATH, 0) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        if fstat(fd.as_raw_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // sqlfs's own reads never move the file's access time (relatime would, and the app
        // that set it with UTIME_OMIT would see it change): O_NOATIME, which needs the
        // file's owner or CAP_FOWNER; without either, a plain read-only open.
        match reopen(fd.as_raw_fd(), libc::O_RDONLY | libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                reopen(fd.as_raw_fd(), libc::O_RDONLY).map(Some)
            }
            r => r.map(Some),
        }
    }

    /// lstat of `rel` relative to the root (the link itself if `rel` is one).
    pub fn stat<R: AsRef<[u8]> + ?Sized>(&self, rel: &R) -> io::Result<libc::stat> {
        let rel = rel.as_ref();
        if components(rel)?.is_empty() {
            return fstat(self.root_fd());
        }
        let (dir, name) = self.parent_of(rel)?;
        stat_in(dir.as_raw_fd(), &name)
    }

    pub fn exists<R: AsRef<[u8]> + ?Sized>(&self, rel: &R) -> bool {
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

/// Joins a parent's relative path and a name, as bytes (names need not be UTF-8).
pub fn join_bytes(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
        v.extend_from_slice(parent);
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Backing) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::write(root.join("d/e/f"), b"inside").unwrap();
        std::fs::write(t.path().join("outside"), b"outside").unwrap();
        std::os::unix::fs::symlink(t.path().join("outside"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("d", root.join("rel")).unwrap();
        std::os::unix::fs::symlink(root.join("d"), root.join("absdir")).unwrap();
        let b = Backing::open(&root).unwrap();
        (t, b)
    }

    fn err(r: io::Result<impl Sized>) -> i32 {
        r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
    }

    fn check_resolution(b: &Backing) {
        // Plain paths resolve.
        let f = b.open_read("d/e/f").unwrap().unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut &f, &mut s).unwrap();
        assert_eq!(s, "inside");
        assert!(b.exists("d/e"));
        assert!(b.open_read("d/nothing").unwrap().is_none());
        // No link is followed: not as the final component, not in the middle.
        assert_ne!(err(b.open_read("abs")), 0);
        assert_ne!(err(b.open_beneath("abs", libc::O_RDONLY, 0)), 0);
        assert_ne!(err(b.open_beneath("rel/e/f", libc::O_RDONLY, 0)), 0);
        assert_ne!(err(b.open_beneath("absdir/e/f", libc::O_RDONLY, 0)), 0);
        assert_ne!(err(b.stat("rel/e")), 0);
        assert_ne!(err(b.parent_of("absdir/e/f")), 0);
        // A link itself can be looked at.
        let st = b.stat("abs").unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        let fd = b.open_beneath("abs", libc::O_PATH, 0).unwrap();
        assert_eq!(
            fstat(fd.as_raw_fd()).unwrap().st_mode & libc::S_IFMT,
            libc::S_IFLNK
        );
        // Nothing outside the root.
        assert_ne!(err(b.open_beneath("../outside", libc::O_RDONLY, 0)), 0);
        assert_ne!(err(b.open_beneath("/etc/passwd", libc::O_RDONLY, 0)), 0);
        // Parent and name.
        let (dir, name) = b.parent_of("d/e/f").unwrap();
        assert_eq!(name.as_bytes(), b"f");
        assert_eq!(
            stat_in(dir.as_raw_fd(), &name).unwrap().st_size,
            "inside".len() as i64
        );
    }

    #[test]
    fn nothing_is_followed_or_left_with_openat2() {
        let (_t, b) = tree();
        check_resolution(&b);
    }

    #[test]
    fn nothing_is_followed_or_left_on_the_component_walk() {
        let (_t, b) = tree();
        let walk = |rel: &str, flags: i32| b.walk(rel.as_bytes(), flags | libc::O_NOFOLLOW, 0);
        assert!(walk("d/e/f", libc::O_RDONLY).is_ok());
        assert!(walk("", libc::O_PATH).is_ok());
        for bad in [
            "abs",
            "rel/e/f",
            "absdir/e/f",
            "../outside",
            "d/../../outside",
        ] {
            assert_ne!(err(walk(bad, libc::O_RDONLY)), 0, "{bad}");
        }
        let fd = walk("abs", libc::O_PATH).unwrap();
        assert_eq!(
            fstat(fd.as_raw_fd()).unwrap().st_mode & libc::S_IFMT,
            libc::S_IFLNK
        );
    }
}
