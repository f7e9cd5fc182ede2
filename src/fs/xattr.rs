//! Extended attributes, on the pinned file itself: symbolic links and special files are
//! never followed or opened (set refused, get and list show none).

use super::{check, cstr, last_err, reply_empty, views::is_virtual, SqlFs};
use fuser::{Errno, INodeNo, ReplyEmpty, ReplyXattr};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

pub(super) fn xattr_reply(reply: ReplyXattr, size: u32, r: isize, buf: &[u8]) {
    if r < 0 {
        reply.error(last_err());
    } else if size == 0 {
        reply.size(r as u32);
    } else {
        reply.data(&buf[..r as usize]);
    }
}

impl SqlFs {
    pub(super) fn do_setxattr(
        &self,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
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

    pub(super) fn do_getxattr(&self, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if is_virtual(ino.0) {
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

    pub(super) fn do_listxattr(&self, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let empty = |reply: ReplyXattr| {
            if size == 0 {
                reply.size(0)
            } else {
                reply.data(&[])
            }
        };
        if is_virtual(ino.0) {
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

    pub(super) fn do_removexattr(&self, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.pin(ino).and_then(|p| {
            let n = cstr(name.as_bytes())?;
            let f = p.real()?.ok_or(Errno::ENODATA)?;
            // SAFETY: valid fd and C string.
            check(unsafe { libc::fremovexattr(f.fd(), n.as_ptr()) })
        });
        reply_empty(reply, res)
    }
}
