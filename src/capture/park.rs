//! Parking: a database nobody has open through the mount holds no descriptor. When the last
//! handle on its files closes (and when it is first taken into capture), its database file,
//! WAL and `-shm` descriptors and its staging log file are closed; the first event on it
//! afterwards opens again the ones that were open, by name, beneath the backing root
//! ([`crate::backing::Backing::open_read`]: no symbolic link is followed).
//!
//! Invariants:
//! - Parking changes no staged state: only descriptors are closed, and the parked set of
//!   descriptors is reopened under the state lock before any event reads a page
//!   ([`Db::guard`] unparks first), so every event sees the files it would have seen.
//! - While a database is parked, its files change only through the mount, and every change
//!   through the mount (write, truncate, unlink, rename) is an event that unparks it before
//!   the change is applied; so a name reopened names the file the descriptor named.
//! - Parking is an optimisation, never needed for correctness: a database parked while a
//!   handle is still open (one opened before the file was a database is not counted) just
//!   reopens at its next event.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use super::{Capture, Db, State};

impl Db {
    /// Closes the database's descriptors (see the module comment). The staging log file stays
    /// open if gathered records cannot be written now (the next flush reports why).
    pub(super) fn park(&self) {
        self.state.lock().park();
        self.stage.park();
    }

    /// Parks the database if nobody has it open and its state is not in use right now (the
    /// staging thread calls this after syncing what a database staged without an app: the
    /// scan, a retried snapshot).
    pub fn park_if_idle(&self) {
        if self.open_handles() != 0 {
            return;
        }
        match self.state.try_lock() {
            Some(mut st) => st.park(),
            None => return,
        }
        self.stage.park();
    }

    /// Handles open on the database's files through the mount (as capture counted them).
    pub fn open_handles(&self) -> u32 {
        self.users.count()
    }
}

/// The count of open handles on one database's files, shared by its [`Use`]s. A main file
/// opened before it was a database (SQLite creates it empty) is counted under its name
/// ([`Capture::unborn`]), and the database taken into capture there adopts that count.
#[derive(Default)]
pub(super) struct Users {
    n: AtomicU32,
    db: OnceLock<Weak<Db>>,
}

impl Users {
    pub(super) fn adopt(&self, db: &Arc<Db>) {
        let _ = self.db.set(Arc::downgrade(db));
    }

    pub(super) fn count(&self) -> u32 {
        self.n.load(Ordering::SeqCst)
    }
}

/// One open handle on a file of a database ([`Capture::on_open`]), kept by the handle until
/// it closes: counted on the database object, so it follows the database through renames
/// and is given back even when the file lost its name (SQLite unlinks its `-wal` and `-shm`
/// files before closing them). The last one dropped parks the database.
pub struct Use(Arc<Users>);

impl Use {
    pub(super) fn new(users: Arc<Users>) -> Use {
        users.n.fetch_add(1, Ordering::SeqCst);
        Use(users)
    }
}

impl Drop for Use {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(db) = self.0.db.get().and_then(Weak::upgrade) {
                db.park();
            }
        }
    }
}

impl Capture {
    /// The count for a main file `rel` that is not a database yet.
    pub(super) fn unborn_users(&self, rel: &str) -> Arc<Users> {
        let mut u = self.unborn.lock();
        if let Some(c) = u.get(rel).and_then(Weak::upgrade) {
            return c;
        }
        if u.len() >= 64 && u.len().is_power_of_two() {
            u.retain(|_, w| w.strong_count() > 0);
        }
        let c = Arc::new(Users::default());
        u.insert(rel.to_string(), Arc::downgrade(&c));
        c
    }

    /// The count a database taken into capture at `rel` starts with.
    pub(super) fn adopt_users(&self, rel: &str) -> Arc<Users> {
        let mut u = self.unborn.lock();
        if u.is_empty() {
            return Arc::default();
        }
        u.remove(rel).and_then(|w| w.upgrade()).unwrap_or_default()
    }
}

impl State {
    pub(super) fn park(&mut self) {
        if self.parked.is_none() {
            self.parked = Some((self.main_fd.is_some(), self.wal_fd.is_some()));
            self.main_fd = None;
            self.wal_fd = None;
            self.shm_fd = None;
        }
    }

    /// Opens again what [`Db::park`] closed, if the database is parked. An error (no
    /// descriptor left, say) is a capture failure: the state goes back to what is staged and
    /// the next commit is a snapshot, which opens the files it reads itself.
    pub(super) fn unpark(&mut self, db: &Db) -> io::Result<()> {
        let Some((main, wal)) = self.parked.take() else {
            return Ok(());
        };
        let name = db.name();
        if main {
            self.main_fd = db.backing.open_read(&name)?;
        }
        if wal {
            self.wal_fd = db.backing.open_read(&format!("{name}-wal"))?;
        }
        Ok(())
    }
}
