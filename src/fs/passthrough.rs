//! Kernel passthrough: negotiating it at `init`, and deciding per open which handles the
//! kernel reads and writes straight to the backing file: WAL and WAL-index files (by capture's
//! naming, unless their database is written through), the rollback journals of databases
//! capture knows (capture reads their headers from the backing file instead of seeing their
//! writes: `capture/journal.rs`; same exception), database files in WAL mode when opened
//! if `--passthrough-databases` asks for it (capture keeps them staged without their writes:
//! `capture/straight.rs`), and plain files, which no database write can reach through such a
//! handle without capture learning of it.
//!
//! The plain-file rule (docs/ARCHITECTURE.md, invariant 14). A file that is not a WAL, a
//! journal or a `-shm` file goes straight through when capture does not know it as a
//! database (its first bytes, read at open, are no SQLite header) and SQLite could not make
//! it one through this handle: opened read-only or write-only (SQLite needs both), or
//! read-write on a file that is not empty (SQLite refuses such a file as not a database).
//! An empty file opened read-write (a new database, maybe) and every database but a straight
//! one go through sqlfs. A plain file still becomes a database in three ways, and each is
//! caught:
//! - its header written through a handle that goes straight through (a copy into a new
//!   file): when such a writable handle is fsynced or closed the file is looked at again,
//!   and a file that now shows a database is captured from there (a snapshot; one capture
//!   already knows, because it became a database meanwhile, stages a snapshot if its
//!   contents moved past the staged stream);
//! - renamed or linked over a database's name: capture reads the header then (`capture`'s
//!   rename), and the handles' later writes are caught at their fsync or close as above;
//! - a database renamed onto its name: the database is another inode, whose handles go
//!   through sqlfs; the plain file's handles keep writing the old, unnamed inode.
//!
//! While a writable handle goes straight to a file, its WAL or rollback journal cannot be
//! opened (EBUSY), so SQLite cannot start a transaction whose writes to it capture would
//! miss; and a database capture knows cannot be opened for writing (EBUSY) while its inode
//! is held that way (the kernel does not mix the two kinds of handle on one inode). Handles
//! on a database that went straight in WAL mode are no plain writers: any open joins them.
//!
//! Invariants:
//! - All handles on one inode agree: an inode already open through sqlfs stays so, and one
//!   passed through shares one backing id while any handle holds it.
//! - Once opening a backing id fails, passthrough is off for the rest of the mount; when no
//!   handle bypasses sqlfs any more, capture goes back to seeing every write (`unobserve`).
//! - An inode written straight through is opened without the kernel's kept page cache the
//!   next time it is opened through sqlfs, so no page cached before is read stale.

use super::{errno, utf8, SqlFs};
use crate::backing::fstat;
use crate::capture;
use crate::capture::classify;
use crate::capture::Role;
use fuser::{BackingId, Errno, InitFlags, KernelConfig};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Weak;
use std::time::{Duration, Instant};

/// How long a database opened for writing waits for the kernel's release of a straight
/// handle on it before it is refused (EBUSY).
const RELEASE_GRACE: Duration = Duration::from_millis(500);

pub use crate::config::Passthrough;

/// What a file is to passthrough, by its name and what capture knows of it.
enum Kind {
    /// A WAL or `-shm` file: observed mode.
    WalIndex,
    /// Neither a WAL, a journal nor a `-shm` file; `db`: capture knows it as a database.
    Plain { db: bool },
    /// The rollback journal of a database capture knows: capture reads its header from the
    /// backing file (`capture/journal.rs`).
    Journal,
    /// The journal of a database capture does not know, or sqlfs's own: always through sqlfs.
    Never,
}

/// How a new handle reaches its file.
pub(super) struct Route {
    /// The backing id the kernel reads and writes through, if it does.
    pub(super) id: Option<Arc<BackingId>>,
    /// A plain file opened for writing that goes straight through: looked at again when it
    /// is fsynced or closed.
    pub(super) plain_writer: bool,
    /// A database file that goes straight through, counted by capture.
    pub(super) straight: Option<capture::StraightUse>,
}

impl Route {
    pub(super) fn through() -> Route {
        Route {
            id: None,
            plain_writer: false,
            straight: None,
        }
    }
}

impl SqlFs {
    fn kind(&self, rel: &str) -> Kind {
        if capture::wal_index_of(rel).is_some() {
            return Kind::WalIndex;
        }
        match classify(rel) {
            (Role::Wal, _) => Kind::WalIndex,
            (Role::Main, db) => Kind::Plain {
                db: self.capture.get(db).is_some(),
            },
            (Role::Journal, db) if self.capture.get(db).is_some() => Kind::Journal,
            _ => Kind::Never,
        }
    }

    /// How to open `rel` (inode `ino`, descriptor `f`, opened with `flags`): straight through
    /// the kernel or through sqlfs (see the module's rules); EBUSY for a database capture
    /// knows that would have to join writable handles the kernel passes straight through.
    ///
    /// The decision and `register` (which records the new handle) happen under one lock, so
    /// two opens of one inode racing each other can never be routed two ways: the daemon
    /// records a handle before the kernel learns of it and forgets it only after the kernel
    /// closed it, so what it sees open is always at least what the kernel has open, and the
    /// kernel never gets a handle of the other kind for an inode (it would fail that open
    /// with EIO).
    pub(super) fn route<R>(
        &self,
        ino: u64,
        rel: Option<&str>,
        f: File,
        flags: i32,
        open_backing: impl FnOnce(&File) -> io::Result<BackingId>,
        register: impl FnOnce(File, Route) -> R,
    ) -> Result<R, Errno> {
        let acc = flags & libc::O_ACCMODE;
        let writable = acc != libc::O_RDONLY;
        let kind = rel.map(|r| self.kind(r));
        let plain = matches!(kind, Some(Kind::Plain { .. }));
        let db_write = matches!(kind, Some(Kind::Plain { db: true })) && writable;
        // An empty file opened read-write: SQLite making it a database. Joining a straight
        // writer would make this handle one too, and SQLite could then open no journal.
        let empty = match kind {
            Some(Kind::Plain { db: false }) => fstat(f.as_raw_fd()).map_err(errno)?.st_size == 0,
            _ => false,
        };
        let may_become_db = empty && acc == libc::O_RDWR;
        // A straight handle that was just closed is forgotten when the kernel's release of it
        // arrives, which it sends after close(2) returned: a database opened for writing right
        // after a copy into it (`cp`, then SQLite), or an empty file SQLite opens right after
        // another process created it, waits for that release a moment, on another request
        // thread, before it is refused (a database) or joins the straight handles (a file).
        let deadline = Instant::now() + RELEASE_GRACE;
        let (mut ids, joined, straight_db) = loop {
            let ids = self.backing_ids.lock();
            let joined = ids.get(&ino).and_then(Weak::upgrade);
            // Straight handles of a database: joining them is the rule, not a wait.
            let straight_db = joined.is_some()
                && self
                    .handles
                    .read()
                    .all_on(ino)
                    .any(|h| h.straight.is_some());
            let waits = db_write || may_become_db;
            if joined.is_some() && waits && !straight_db && Instant::now() < deadline {
                drop(joined);
                drop(ids);
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            break (ids, joined, straight_db);
        };
        if let Some(id) = joined {
            // The kernel wants every handle of this inode passed through.
            if db_write && !straight_db {
                log::warn!(
                    "{}: refusing to open a database for writing while another process writes it past sqlfs (EBUSY)",
                    rel.unwrap_or_default()
                );
                return Err(Errno::EBUSY);
            }
            let straight = match (straight_db, rel) {
                (true, Some(r)) => self.capture.straight_open(r),
                _ => None,
            };
            let route = Route {
                id: Some(id),
                plain_writer: plain && writable && straight.is_none(),
                straight,
            };
            return Ok(register(f, route));
        }
        let (Some(rel), Some(kind)) = (rel, kind) else {
            return Ok(register(f, Route::through()));
        };
        if !self.pt_live.load(Ordering::Relaxed) {
            return Ok(register(f, Route::through()));
        }
        let eligible = match kind {
            Kind::WalIndex | Kind::Journal => {
                let db = capture::wal_index_of(rel).unwrap_or_else(|| classify(rel).1);
                !self.written_through.as_ref().is_some_and(|w| w(db))
            }
            // A database in WAL mode: its checkpoints go straight to the file, with the
            // barriers of `capture/straight.rs`.
            Kind::Plain { db: true } => {
                self.straight_databases.as_ref().is_some_and(|s| s(rel))
                    && !self.written_through.as_ref().is_some_and(|w| w(rel))
                    && capture::shows_wal_mode(&f)
            }
            Kind::Plain { db: false } => {
                // An empty file read through sqlfs costs nothing, and keeps the inode free
                // for a read-write open that may make it a database.
                let pointless = acc == libc::O_RDONLY && empty;
                !may_become_db
                    && !pointless
                    && !self.written_through.as_ref().is_some_and(|w| w(rel))
            }
            _ => false,
        };
        if !eligible || self.handles.read().by_ino.contains_key(&ino) {
            return Ok(register(f, Route::through()));
        }
        let straight = match kind {
            Kind::Plain { db: true } => match self.capture.straight_open(rel) {
                Some(s) => Some(s),
                None => return Ok(register(f, Route::through())),
            },
            _ => None,
        };
        match open_backing(&f) {
            Ok(id) => {
                let id = Arc::new(id);
                ids.retain(|_, w| w.strong_count() > 0);
                ids.insert(ino, Arc::downgrade(&id));
                if plain && writable {
                    self.pt_written.lock().insert(ino);
                }
                let route = Route {
                    id: Some(id),
                    plain_writer: plain && writable && straight.is_none(),
                    straight,
                };
                Ok(register(f, route))
            }
            Err(e) => {
                log::error!(
                    "{rel}: kernel passthrough failed ({e}); from now on every write goes through sqlfs"
                );
                self.pt_live.store(false, Ordering::Relaxed);
                if ids.values().all(|w| w.strong_count() == 0) {
                    // No handle bypasses sqlfs: its writes show every commit again.
                    self.capture.unobserve();
                }
                Ok(register(f, Route::through()))
            }
        }
    }

    /// True if `rel`, about to be opened, is the WAL or rollback journal of a file a writable
    /// handle writes straight to: refused (EBUSY), so that SQLite starts no transaction on a
    /// database whose writes capture would miss.
    pub(super) fn journal_blocked(&self, rel: &[u8]) -> bool {
        if self.plain_writers.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let Some(db) = capture::journal_db_of(rel) else {
            return false;
        };
        // A database capture never takes (excluded, or a name that is not UTF-8) loses
        // nothing to a writer past sqlfs: SQLite works on it as on any directory.
        match utf8(db) {
            Some(name) if !self.capture.excluded(name) => {}
            _ => return false,
        }
        let Ok(st) = self.backing.stat(db) else {
            return false;
        };
        let ino = self.ino_of(&st);
        // A writer that was just closed is forgotten when the kernel's release of it arrives,
        // after close(2) returned: a journal copied in right after its database (`cp` of
        // both) waits for that release a moment, as `route` does, before it is refused.
        let deadline = Instant::now() + RELEASE_GRACE;
        let blocked = loop {
            let blocked = self.handles.read().all_on(ino).any(|h| h.plain_writer);
            if !blocked || Instant::now() >= deadline {
                break blocked;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if blocked {
            log::warn!(
                "{}: refusing to open it while another process writes its database past sqlfs (EBUSY)",
                String::from_utf8_lossy(rel)
            );
        }
        blocked
    }

    /// True (once) if inode `ino` was written straight through since it was last opened
    /// through sqlfs: the kernel's page cache of it may be stale.
    pub(super) fn take_written_past(&self, ino: u64) -> bool {
        let mut w = self.pt_written.lock();
        !w.is_empty() && w.remove(&ino)
    }

    /// A writable handle that went straight through was fsynced or closed: the file it
    /// names now may have become a database (see the module's rules).
    pub(super) fn recheck_plain(&self, rel: &[u8]) {
        if let Some(r) = utf8(rel) {
            self.capture.written_past(r);
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
                log::info!("WAL, shared-memory and plain files pass straight through (kernel passthrough); commits are read from the WAL");
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
