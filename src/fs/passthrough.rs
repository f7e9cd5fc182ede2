//! Kernel passthrough: negotiating it at `init`, and deciding per open which files the kernel
//! reads and writes straight to the backing file (WAL and WAL-index files, by capture's naming,
//! unless their database is written through).
//!
//! Invariants:
//! - All handles on one inode agree: an inode already open through sqlfs stays so, and one
//!   passed through shares one backing id while any handle holds it.
//! - Once opening a backing id fails, passthrough is off for the rest of the mount; when no
//!   handle bypasses sqlfs any more, capture goes back to seeing every write (`unobserve`).

use super::SqlFs;
use crate::capture;
use crate::capture::classify;
use crate::capture::Role;
use fuser::{BackingId, InitFlags, KernelConfig};
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Weak;

pub use crate::config::Passthrough;

impl SqlFs {
    /// The backing file id to open `rel` (inode `ino`, descriptor `f`) with, if it goes
    /// straight through: WAL and `-shm` files, once passthrough works, unless their database
    /// is to be written through (decided by its name when the file is opened). All handles on
    /// one inode must agree, so an inode already open the other way stays that way.
    pub(super) fn passthrough_for(
        &self,
        ino: u64,
        rel: Option<&str>,
        f: &File,
        open_backing: impl FnOnce(&File) -> io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut ids = self.backing_ids.lock();
        if let Some(id) = ids.get(&ino).and_then(Weak::upgrade) {
            return Some(id);
        }
        let rel = rel?;
        let db = match (classify(rel), capture::wal_index_of(rel)) {
            ((Role::Wal, db), _) | (_, Some(db)) => db,
            _ => return None,
        };
        if !self.pt_live.load(Ordering::Relaxed)
            || self.written_through.as_ref().is_some_and(|w| w(db))
        {
            return None;
        }
        if self.handles.read().by_ino.contains_key(&ino) {
            return None;
        }
        match open_backing(f) {
            Ok(id) => {
                let id = Arc::new(id);
                ids.retain(|_, w| w.strong_count() > 0);
                ids.insert(ino, Arc::downgrade(&id));
                Some(id)
            }
            Err(e) => {
                log::error!(
                    "{rel}: kernel passthrough failed ({e}); from now on WAL writes go through sqlfs"
                );
                self.pt_live.store(false, Ordering::Relaxed);
                if ids.values().all(|w| w.strong_count() == 0) {
                    // No handle bypasses sqlfs: its writes show every commit again.
                    self.capture.unobserve();
                }
                None
            }
        }
    }
}

impl SqlFs {
    pub(super) fn do_init(&mut self, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        // We clear set-user/group-ID bits on write ourselves; without this the kernel asks for
        // the security.capability xattr before every single write.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        let _ = config.set_max_readahead(1 << 20);
        if self.passthrough != Passthrough::Off {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let granted = root
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if granted {
                self.capture.observe()?;
                self.pt_live.store(true, Ordering::Relaxed);
                log::info!("WAL and shared-memory files pass straight through (kernel passthrough); commits are read from the WAL");
            } else if self.passthrough == Passthrough::On {
                return Err(io::Error::other(if root {
                    "--passthrough on: this kernel does not offer FUSE passthrough (Linux 6.9 or later is needed)"
                } else {
                    "--passthrough on: kernel passthrough needs root (CAP_SYS_ADMIN)"
                }));
            } else {
                log::info!(
                    "kernel passthrough unavailable ({}); every write goes through sqlfs",
                    if root { "kernel too old" } else { "not root" }
                );
            }
        }
        Ok(())
    }
}
