//! The `.history` tree as the kernel layer serves it: `History` implements `fs::Views`, so
//! `fs` reads past states through that contract and never imports this module.

use super::{Entry, History, NAME, VIRT};

const _: () = {
    assert!(VIRT == crate::fs::VIRTUAL);
    let (a, b) = (NAME.as_bytes(), crate::fs::VIEWS_DIR.as_bytes());
    assert!(a.len() == b.len());
    let mut i = 0;
    while i < a.len() {
        assert!(a[i] == b[i]);
        i += 1;
    }
};

impl From<Entry> for crate::fs::ViewEntry {
    fn from(e: Entry) -> Self {
        crate::fs::ViewEntry {
            ino: e.ino,
            dir: e.dir,
            size: e.size,
            mtime_ns: e.mtime_ns,
        }
    }
}

impl crate::fs::Views for History {
    fn root(&self) -> crate::fs::ViewEntry {
        self.root_entry().into()
    }
    fn lookup(&self, parent: u64, name: &str) -> Result<crate::fs::ViewEntry, i32> {
        History::lookup(self, parent, name).map(Into::into)
    }
    fn getattr(&self, ino: u64) -> Result<crate::fs::ViewEntry, i32> {
        History::getattr(self, ino).map(Into::into)
    }
    fn is_file(&self, ino: u64) -> bool {
        History::is_file(self, ino)
    }
    fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, i32> {
        History::readdir(self, ino)
    }
    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        History::read(self, ino, offset, size)
    }
    fn forget(&self, ino: u64, n: u64) {
        History::forget(self, ino, n)
    }
}
