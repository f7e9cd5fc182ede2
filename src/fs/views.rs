use super::*;

impl SqlFs {
    /// Attributes of a virtual `.history` node.
    pub(super) fn vattr(&self, e: history::Entry) -> FileAttr {
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
