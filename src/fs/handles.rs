//! Open handles: the file each one holds, the name capture knows it by (following renames
//! and unlinks), its role, and the index of handles per inode.
//!
//! Invariant: operations on an open descriptor (fstat, ftruncate, fchmod, futimens, fsync,
//! fallocate…) act on that file even after it was unlinked or renamed: a handle open on an
//! inode is the first way to reach it (see `nodes.rs`).

use super::{passthrough::Route, utf8, Rel, SqlFs};
use crate::capture::classify;
use crate::capture::Role;
use fuser::{BackingId, Errno, FileHandle};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) struct Handle {
    pub(super) file: File,
    /// The file's path, as capture names it; `None` once the file has no name left.
    pub(super) rel: Mutex<Option<Rel>>,
    pub(super) role: Role,
    /// The name was not UTF-8 when the file was opened: capture never sees it.
    pub(super) uncaptured: bool,
    pub(super) ino: u64,
    /// Kept while the kernel reads and writes this handle's backing file directly.
    pub(super) _passthrough: Option<Arc<BackingId>>,
    /// A plain file opened for writing whose writes go straight through (see
    /// `passthrough.rs`): looked at again at fsync and close.
    pub(super) plain_writer: bool,
    /// Capture's count of this handle on a captured database (given back when it drops).
    pub(super) _usage: Option<crate::capture::Use>,
    /// A database file's handle the kernel passes straight through: counted by capture
    /// while it lives (see `capture/straight.rs`).
    pub(super) straight: Option<crate::capture::StraightUse>,
}

impl Handle {
    /// The name capture knows this file by, if it has one capture can know.
    pub(super) fn cap_rel(&self) -> Option<String> {
        self.rel
            .lock()
            .as_deref()
            .and_then(utf8)
            .map(str::to_string)
    }
}

/// Open handles, by handle number and by inode.
#[derive(Default)]
pub(super) struct Handles {
    pub(super) by_fh: HashMap<u64, Arc<Handle>>,
    pub(super) by_ino: HashMap<u64, Vec<u64>>,
}

impl Handles {
    pub(super) fn insert(&mut self, fh: u64, h: Arc<Handle>) {
        self.by_ino.entry(h.ino).or_default().push(fh);
        self.by_fh.insert(fh, h);
    }

    pub(super) fn remove(&mut self, fh: u64) -> Option<Arc<Handle>> {
        let h = self.by_fh.remove(&fh)?;
        if let Some(v) = self.by_ino.get_mut(&h.ino) {
            v.retain(|&f| f != fh);
            if v.is_empty() {
                self.by_ino.remove(&h.ino);
            }
        }
        Some(h)
    }

    /// Any handle open on inode `ino`.
    pub(super) fn on(&self, ino: u64) -> Option<Arc<Handle>> {
        let fh = self.by_ino.get(&ino)?.first()?;
        self.by_fh.get(fh).cloned()
    }

    /// Every handle open on inode `ino`.
    pub(super) fn all_on(&self, ino: u64) -> impl Iterator<Item = &Arc<Handle>> {
        self.by_ino
            .get(&ino)
            .into_iter()
            .flatten()
            .filter_map(|fh| self.by_fh.get(fh))
    }
}

impl SqlFs {
    pub(super) fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles
            .read()
            .by_fh
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    pub(super) fn add_handle(
        &self,
        file: File,
        rel: Option<Rel>,
        ino: u64,
        route: Route,
        usage: Option<crate::capture::Use>,
    ) -> FileHandle {
        let name = rel.as_deref().map(utf8);
        let role = match name {
            Some(Some(r)) => classify(r).0,
            _ => Role::Other,
        };
        let uncaptured = matches!(name, Some(None));
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if route.plain_writer {
            self.plain_writers.fetch_add(1, Ordering::Relaxed);
        }
        self.handles.write().insert(
            fh,
            Arc::new(Handle {
                file,
                rel: Mutex::new(rel),
                role,
                uncaptured,
                ino,
                _passthrough: route.id,
                plain_writer: route.plain_writer,
                _usage: usage,
                straight: route.straight,
            }),
        );
        FileHandle(fh)
    }
}
