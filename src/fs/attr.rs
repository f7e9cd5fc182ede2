//! Attributes: stat → `FileAttr` (inode numbers, kinds, times), and the attribute calls
//! (getattr, setattr: mode, owner, size, times; readlink; access).
//!
//! Invariant: a truncate is reported to capture before and after, like a write (see
//! `data.rs`); setattr acts through the kernel's handle first, so on the open file itself.

use super::{
    check, errno, handles::Handle, is_type, last_err, nodes::Pin, reply_empty, utf8,
    views::is_virtual, SqlFs, EMPTY, TTL,
};
use crate::backing;
use crate::backing::fstat;
use crate::backing::proc_fd;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, INodeNo, ReplyAttr, ReplyData, ReplyEmpty,
    TimeOrNow,
};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

pub(super) fn to_system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs((-sec) as u64) + Duration::from_nanos(nsec as u64)
    }
}

pub(super) fn kind_of(mode: u32) -> FileType {
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
    pub(super) fn ino_of(&self, st: &libc::stat) -> u64 {
        if st.st_ino == self.root_ino {
            1
        } else if st.st_ino == 1 {
            u64::MAX - 1
        } else {
            st.st_ino
        }
    }

    pub(super) fn attr(&self, st: &libc::stat) -> FileAttr {
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

    /// chmod of the pinned file (a symbolic link: EOPNOTSUPP, like lchmod).
    pub(super) fn set_mode(&self, pin: &Pin, st: &libc::stat, mode: u32) -> Result<(), Errno> {
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
    pub(super) fn set_size(
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
    pub(super) fn set_times(
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
    pub(super) fn do_getattr(&self, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if is_virtual(ino.0) {
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
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

    pub(super) fn do_readlink(&self, ino: INodeNo, reply: ReplyData) {
        if is_virtual(ino.0) {
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

    pub(super) fn do_access(&self, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if is_virtual(ino.0) {
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
}
