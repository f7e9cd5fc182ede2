//! Databases an earlier mount captured are loaded while the mount serves: at open only their
//! names and staging ids are read ([`Capture::open`]); each is loaded (its staging opened
//! and reconciled with its files, see `reconcile.rs`) by the first event on its name, or by
//! the scan at mount, which loads every one still pending before it walks the tree. So a
//! mount of any number of databases serves at once, and an app's open waits only for its own
//! database.
//!
//! Invariants:
//! - A pending name is taken out of the pending table and its gate put up under one lock
//!   (`starting`), so it is loaded once, and every other event on that name waits at its gate
//!   until it is in the registry (as for a database taken into capture, see the module
//!   invariants of `capture`).
//! - Every event on a name that changes it (unlink, rename, exchange) looks the database up
//!   ([`Capture::get`]) before the change: a pending database is loaded under its old name
//!   first, so its identity follows or ends as for a loaded one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{Capture, Db, Gate};

impl Capture {
    /// Loads `name` if it is pending; None if it is not (or its load failed).
    pub(super) fn load_pending(&self, name: &str) -> Option<Arc<Db>> {
        let (gate, id) = {
            let mut starting = self.starting.lock();
            let id = self.pending.lock().remove(name)?;
            self.n_pending.fetch_sub(1, Ordering::AcqRel);
            let g = Arc::new(Gate::default());
            starting.insert(name.to_string(), g.clone());
            self.n_starting.fetch_add(1, Ordering::AcqRel);
            (g, id)
        };
        let out = match self.load(name, id) {
            Ok(db) => {
                self.dbs.write().insert(name.to_string(), db.clone());
                self.watch_wal_of(name);
                // What an earlier mount staged and did not ship, or left over the staging
                // limit, is looked at now, as at the start of the shippers.
                self.listeners.tell(&db);
                Some(db)
            }
            Err(e) => {
                log::error!("{name}: cannot load staging state: {e}");
                None
            }
        };
        self.starting.lock().remove(name);
        self.n_starting.fetch_sub(1, Ordering::AcqRel);
        gate.release();
        out
    }

    /// Loads every pending database, in name order, until `stop` is set; returns how many it
    /// loaded.
    pub(super) fn load_all_pending(&self, stop: &AtomicBool) -> u64 {
        let mut names: Vec<String> = self.pending.lock().keys().cloned().collect();
        names.sort();
        let mut n = 0;
        for name in names {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if self.load_pending(&name).is_some() {
                n += 1;
                self.scan.lock().reconciled += 1;
            }
        }
        n
    }

    /// Every database, those still pending or being loaded included (each is loaded first),
    /// in name order: for a request about all of them (`sqlfs verify`, `sqlfs log`) made
    /// while the scan at mount is still loading them.
    pub fn databases_loaded(&self) -> Vec<(String, Arc<Db>)> {
        let mut names: Vec<String> = self.pending.lock().keys().cloned().collect();
        names.extend(self.starting.lock().keys().cloned());
        for name in names {
            let _ = self.get(&name);
        }
        self.databases()
    }

    /// Known databases not loaded yet.
    pub fn pending(&self) -> usize {
        self.n_pending.load(Ordering::Relaxed)
    }
}
