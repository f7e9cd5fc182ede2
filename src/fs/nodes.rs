//! The inode table: each inode the kernel knows, with its path and its other names (hard
//! links), kept up to date through renames, exchanges and unlinks; and pins, the descriptors
//! through which every request reaches an inode's backing file.
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
//! - While the kernel knows an inode (it has looked it up and not forgotten it), its number
//!   names that one file. The kernel finds its inode by number: a new file given the number
//!   of one it still knows takes that inode over, and if its type differs the old inode is
//!   marked bad (EIO to a process opening it, or working in a directory that was removed).
//!   So an inode whose last name sqlfs removed (unlink, rmdir, a rename over it) is held
//!   open `O_PATH` until the kernel forgets it ([`Node::kept`]), and the backing filesystem
//!   cannot give its number out meanwhile; regular files above 1 MiB excepted, whose space
//!   must come back when the unlink returns ([`holdable`]).
//! - `.sqlfs` at the root (sqlfs's own metadata) does not exist as far as the mount shows, and
//!   no name operation reaches the virtual tree's name ([`VIEWS_DIR`]) in the backing root.

use super::{
    cstr, errno, handles::Handle, is_type, join, views::is_virtual, views::VIEWS_DIR, Rel, SqlFs,
};
use crate::backing;
use crate::backing::fstat;
use crate::backing::META_DIR;
use fuser::{Errno, FileAttr, INodeNo};
use std::ffi::CString;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

/// What is left of `r` below `p` (`Some("")` for `p` itself, `Some("/x")` below it).
pub(super) fn below<'a>(r: &'a [u8], p: &[u8]) -> Option<&'a [u8]> {
    let rest = r.strip_prefix(p)?;
    (rest.is_empty() || rest[0] == b'/').then_some(rest)
}

/// Rewrites `r` after `from` was renamed to `to` (or swapped with it: `exchange`).
pub(super) fn rebase(r: &mut Rel, from: &[u8], to: &[u8], exchange: bool) {
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
pub(super) struct Node {
    pub(super) rel: Rel,
    pub(super) links: Vec<Rel>,
    pub(super) lookups: u64,
    /// The inode itself, held after sqlfs removed its last name, until the kernel forgets it
    /// (see the module's invariants); None while it has a name.
    kept: Option<OwnedFd>,
}

impl Node {
    pub(super) fn new(rel: Rel) -> Node {
        Node {
            rel,
            links: Vec::new(),
            lookups: 0,
            kept: None,
        }
    }

    /// `rel` names this inode (a lookup or a new hard link): it becomes the primary path.
    pub(super) fn named(&mut self, rel: Rel) {
        self.kept = None;
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
    pub(super) fn unnamed(&mut self, rel: &[u8]) -> Option<Rel> {
        self.links.retain(|l| l != rel);
        if self.rel == rel {
            self.rel = self.links.pop()?;
        }
        Some(self.rel.clone())
    }

    /// Rewrites every name under `from` to be under `to` (and back, for an exchange).
    pub(super) fn moved(&mut self, from: &[u8], to: &[u8], exchange: bool) {
        for r in std::iter::once(&mut self.rel).chain(self.links.iter_mut()) {
            rebase(r, from, to, exchange);
        }
    }
}

/// Regular files holding more than this many bytes are not held after their last name went:
/// their space is the app's again when its unlink or rename returns, as on a native directory.
const HOLD_MAX: u64 = 1 << 20;

/// `fd` (an inode opened before its last name may go, with stat `st`), unless it is a
/// regular file above [`HOLD_MAX`]: holding that one would keep its blocks allocated until
/// the kernel forgets it, a moment after the app's unlink returned. Such a file's number may
/// go to a new file while the kernel still knows it (an open racing the unlink may then fail
/// with EIO); every smaller file, and every directory, symbolic link or other node, is held.
pub(super) fn holdable(fd: OwnedFd, st: &libc::stat) -> Option<OwnedFd> {
    let bytes = st.st_blocks as u64 * 512;
    (!is_type(st, libc::S_IFREG) || bytes <= HOLD_MAX).then_some(fd)
}

/// A descriptor on the backing file of an inode, known to be that inode's.
pub(super) enum Pin {
    /// The backing root (inode 1).
    Root(RawFd),
    /// A handle open on the inode (its descriptor is a real open file).
    Handle(Arc<Handle>),
    /// An `O_PATH` descriptor opened by the inode's path and checked against its inode
    /// number, with its stat and the path it was opened by; or the inode held after its last
    /// name went (no path).
    Path(OwnedFd, libc::stat, Option<Rel>),
}

impl Pin {
    pub(super) fn fd(&self) -> RawFd {
        match self {
            Pin::Root(fd) => *fd,
            Pin::Handle(h) => h.file.as_raw_fd(),
            Pin::Path(fd, _, _) => fd.as_raw_fd(),
        }
    }

    pub(super) fn stat(&self) -> Result<libc::stat, Errno> {
        match self {
            Pin::Path(_, st, _) => Ok(*st),
            _ => fstat(self.fd()).map_err(errno),
        }
    }

    /// The inode's path now, if it still has one.
    pub(super) fn rel(&self) -> Option<Rel> {
        match self {
            Pin::Root(_) => Some(Rel::new()),
            Pin::Handle(h) => h.rel.lock().clone(),
            Pin::Path(_, _, r) => r.clone(),
        }
    }

    /// A descriptor of the file that is not `O_PATH`, for calls that need one (fchmod,
    /// xattrs): this one, or the file opened anew read-only (only regular files and
    /// directories, whose opening has no effect and never blocks; others: None).
    pub(super) fn real(&self) -> Result<Option<Real>, Errno> {
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
pub(super) enum Real {
    Borrowed(RawFd),
    Owned(File),
}

impl Real {
    pub(super) fn fd(&self) -> RawFd {
        match self {
            Real::Borrowed(fd) => *fd,
            Real::Owned(f) => f.as_raw_fd(),
        }
    }
}

impl SqlFs {
    /// A descriptor on inode `ino`'s backing file: the root's, a handle open on it, or its
    /// path opened `O_PATH` beneath the root and checked to be this inode (else ESTALE: the
    /// kernel then looks the name up afresh). A handle comes first: it is the file itself even
    /// when unlinked or renamed, and costs no path resolution.
    pub(super) fn pin(&self, ino: INodeNo) -> Result<Pin, Errno> {
        if is_virtual(ino.0) {
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
            if let Some(fd) = &n.kept {
                let fd = fd.try_clone().map_err(errno)?;
                let st = fstat(fd.as_raw_fd()).map_err(errno)?;
                return Ok(Pin::Path(fd, st, None));
            }
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
                        return Ok(Pin::Path(fd, st, Some(rel)));
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
    pub(super) fn dir(&self, ino: INodeNo) -> Result<(Pin, Rel), Errno> {
        let p = self.pin(ino)?;
        if !matches!(p, Pin::Root(_)) && !is_type(&p.stat()?, libc::S_IFDIR) {
            return Err(Errno::ENOTDIR);
        }
        let rel = p.rel().ok_or(Errno::ENOENT)?;
        Ok((p, rel))
    }

    /// The entry `name` in directory `parent`: the directory's descriptor, the entry's path
    /// and its name as a C string.
    pub(super) fn child(
        &self,
        parent: INodeNo,
        name: &OsStr,
    ) -> Result<(Pin, Rel, CString), Errno> {
        let (dir, p) = self.dir(parent)?;
        let nb = name.as_bytes();
        if nb.is_empty() || nb == b"." || nb == b".." || nb.contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        if p.is_empty() && nb == META_DIR.as_bytes() {
            return Err(Errno::ENOENT);
        }
        if p.is_empty() && nb == VIEWS_DIR.as_bytes() {
            return Err(Errno::EROFS);
        }
        Ok((dir, join(&p, nb), cstr(nb)?))
    }

    /// Registers `rel` (with stat `st`) as a looked-up inode.
    pub(super) fn remember(&self, rel: Rel, st: &libc::stat) -> FileAttr {
        let attr = self.attr(st);
        let mut nodes = self.nodes.write();
        let n = nodes
            .entry(attr.ino.0)
            .or_insert_with(|| Node::new(rel.clone()));
        n.named(rel);
        n.lookups += 1;
        attr
    }

    /// Updates the paths of `from` and everything below it after a rename (and of `to` and
    /// everything below it, for an exchange).
    pub(super) fn renamed(&self, from: &[u8], to: &[u8], exchange: bool) {
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
    /// and its open handles keep another name if it has one, else none. `held`, the inode
    /// opened before its name went ([`backing::hold_in`], through [`holdable`]), is kept while
    /// the kernel knows an inode left without a name.
    pub(super) fn unnamed(&self, ino: u64, rel: &[u8], held: Option<OwnedFd>) {
        let left = self.nodes.write().get_mut(&ino).and_then(|n| {
            let left = n.unnamed(rel);
            if left.is_none() && n.lookups > 0 {
                n.kept = held;
            }
            left
        });
        for h in self.handles.read().all_on(ino) {
            let mut r = h.rel.lock();
            if r.as_deref() == Some(rel) {
                *r = left.clone();
            }
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
