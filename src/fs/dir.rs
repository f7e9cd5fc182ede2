//! Directories: opendir, readdir (hiding `.sqlfs` and a backing `.history` at the root, and
//! adding the virtual tree's directory there), fsyncdir.

use super::{errno, last_err, passthrough::Route, views::is_virtual, views::VIEWS_DIR, SqlFs};
use crate::backing;
use crate::backing::META_DIR;
use fuser::{
    Errno, FileHandle, FileType, FopenFlags, INodeNo, ReplyDirectory, ReplyEmpty, ReplyOpen,
};
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

/// The offset after the virtual tree's entry, which ends the root's listing (no backing
/// directory position is this large: they are non-negative `off_t`s).
const AFTER_VIEWS: u64 = u64::MAX;

impl SqlFs {
    pub(super) fn do_opendir(&self, ino: INodeNo, reply: ReplyOpen) {
        if is_virtual(ino.0) {
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
            // The kernel may keep a directory's listing between opens: every change made
            // through the mount drops it, and so does a changed mtime the kernel sees once
            // the directory's attributes expire (TTL), as for names and attributes.
            Ok((f, rel)) => reply.opened(
                self.add_handle(f, rel, ino.0, Route::through(), None),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn do_readdir(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if is_virtual(ino.0) {
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
        if offset == AFTER_VIEWS {
            return reply.ok();
        }
        // The backing directory's own positions (telldir cookies) are the offsets: they stay
        // valid while entries are removed, so a listing interleaved with unlinks (rm -r)
        // skips nothing, and each call reads on from where the last one stopped.
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
        // SAFETY: dir is a valid stream; the offset is a cookie an earlier call handed out.
        unsafe {
            if offset == 0 {
                libc::rewinddir(dir)
            } else {
                libc::seekdir(dir, offset as libc::c_long)
            }
        };
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
            if at_root && (nb == META_DIR.as_bytes() || nb == VIEWS_DIR.as_bytes()) {
                continue;
            }
            // SAFETY: valid dirent.
            let (ino, dtype, next) = unsafe { ((*ent).d_ino, (*ent).d_type, (*ent).d_off) };
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
            if reply.add(INodeNo(ino), next as u64, kind, OsStr::from_bytes(nb)) {
                full = true;
                break;
            }
        }
        if let (true, false, Some(h)) = (at_root, full, &self.history) {
            let _ = reply.add(
                INodeNo(h.root().ino),
                AFTER_VIEWS,
                FileType::Directory,
                OsStr::new(VIEWS_DIR),
            );
        }
        // SAFETY: closes the stream and its dup'd fd.
        unsafe { libc::closedir(dir) };
        reply.ok();
    }

    pub(super) fn do_fsyncdir(&self, ino: INodeNo, fh: FileHandle, reply: ReplyEmpty) {
        if is_virtual(ino.0) {
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
}
