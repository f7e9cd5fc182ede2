//! The read-only virtual tree the mount serves beside the backing files (`.history`): the
//! contract its provider meets ([`Views`]), the inode space it owns, and its attributes.
//!
//! Invariants:
//! - Inodes with the high bit ([`VIRTUAL`]) set belong to the virtual tree; the kernel layer
//!   routes every request on one of them to the [`Views`] (or fails it: EROFS for a change,
//!   ENOENT when no tree is served) and never to the backing directory.
//! - The tree is read-only: files are mode 0444 and directories 0555, owned like the backing
//!   root.
//! - The provider is independent of this layer: it knows no FUSE type, and this layer knows
//!   nothing of what it serves (history views implement [`Views`] in `history`).

use super::SqlFs;
use crate::backing::fstat;
use fuser::{FileAttr, FileType, INodeNo};
use std::time::Duration;
use std::time::UNIX_EPOCH;

/// Inodes with this bit set belong to the virtual tree; backing inodes never have it.
pub const VIRTUAL: u64 = 1 << 63;

/// The reserved name of the virtual directory at the mount's root (a backing file of that
/// name is hidden).
pub const VIEWS_DIR: &str = ".history";

/// True if `ino` belongs to the virtual tree.
pub fn is_virtual(ino: u64) -> bool {
    ino & VIRTUAL != 0
}

/// What the kernel layer needs to describe a virtual node.
#[derive(Clone, Copy, Debug)]
pub struct ViewEntry {
    pub ino: u64,
    pub dir: bool,
    pub size: u64,
    pub mtime_ns: u64,
}

/// A read-only tree served at [`VIEWS_DIR`]. Its inodes all have [`VIRTUAL`] set; errors are
/// errnos.
pub trait Views: Send + Sync {
    /// The tree's root directory (the one named [`VIEWS_DIR`]).
    fn root(&self) -> ViewEntry;
    /// Looks `name` up in directory `parent`; the kernel counts the lookup (see `forget`).
    fn lookup(&self, parent: u64, name: &str) -> Result<ViewEntry, i32>;
    /// The node `ino`.
    fn getattr(&self, ino: u64) -> Result<ViewEntry, i32>;
    /// True if `ino` is a file (not a directory).
    fn is_file(&self, ino: u64) -> bool;
    /// The entries of directory `ino`: (inode, is a directory, name).
    fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, i32>;
    /// `size` bytes at `offset` of file `ino` (fewer at its end).
    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32>;
    /// The kernel dropped `n` lookups of `ino`.
    fn forget(&self, ino: u64, n: u64);
}

impl SqlFs {
    /// Attributes of a virtual `.history` node.
    pub(super) fn vattr(&self, e: ViewEntry) -> FileAttr {
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
}
