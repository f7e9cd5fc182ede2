//! What capture does when names change: unlinks, creations, renames and exchanges of a
//! database's files. A database's identity (its staging) follows its main file from name to
//! name; a name that is replaced, deleted or swapped with a file of another kind ends the
//! identity that stood there (it is retired: its staging kept until it expires), and a main
//! file that arrives at a name is taken into capture if it shows a database.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{classify, retire, Capture, Db, Role};
use crate::stage::write_atomic;

impl Capture {
    /// Before `rel` is unlinked.
    pub fn before_unlink(&self, rel: &str) {
        self.on_db(rel, |st, db, b, role| st.before_unlink(db, b, role));
    }

    /// After `rel` was unlinked.
    pub fn after_unlink(&self, rel: &str) {
        if let Some(db) = rel.strip_suffix("-shm").and_then(|d| self.get(d)) {
            // The last connection removed the index: no descriptor is kept on it (the next
            // connection makes a new one, opened when read).
            db.state.lock().shm_fd = None;
        }
        let (role, db_rel) = classify(rel);
        let Some(db) = self.get(db_rel) else { return };
        db.guard(|st, db| st.after_unlink(db, &self.backing, role));
        if role == Role::Main {
            self.dbs.write().remove(db_rel);
            retire(&db, db_rel, "deleted");
            self.retired_left.store(true, Ordering::Relaxed);
        }
    }

    /// A file was created (or opened with O_TRUNC): forget cached handles on it.
    pub fn on_create(&self, rel: &str) {
        self.on_db(rel, |st, db, b, role| st.reopen(db, b, role));
    }

    /// `from` was renamed to `to` (replacing `to` if it existed).
    pub fn after_rename(&self, from: &str, to: &str) {
        let (rf, dbf) = classify(from);
        let (rt, dbt) = classify(to);
        // The target's old identity is gone.
        self.replaced(to, "replaced by a rename");
        if rf == Role::Main {
            self.settle(dbf);
            let moved = self.dbs.write().remove(dbf);
            if let Some(db) = moved {
                self.moved(db, dbf, dbt);
            }
        } else if let Some(db) = self.get(dbf) {
            db.guard(|st, db| st.reopen(db, &self.backing, rf));
        }
        // A file renamed into place may be a database nobody has opened yet.
        if rt == Role::Main {
            self.get_or_start(dbt, Role::Main, None);
            self.watch_wal_of(dbt);
        }
    }

    /// `a` and `b` were swapped (`renameat2(RENAME_EXCHANGE)`): like a rename each way. Two
    /// database files swap their identities; any other pair is reopened, and a database file
    /// swapped with a file of another kind loses its identity.
    pub fn after_exchange(&self, a: &str, b: &str) {
        let (ra, dba) = classify(a);
        let (rb, dbb) = classify(b);
        if ra == Role::Main && rb == Role::Main {
            self.settle(dba);
            self.settle(dbb);
            let (da, db) = {
                let mut dbs = self.dbs.write();
                (dbs.remove(dba), dbs.remove(dbb))
            };
            for (d, from, to) in [(da, dba, dbb), (db, dbb, dba)] {
                if let Some(d) = d {
                    self.moved(d, from, to);
                }
            }
        } else {
            for rel in [a, b] {
                self.replaced(rel, "swapped with a file of another kind");
            }
        }
        for (r, db) in [(ra, dba), (rb, dbb)] {
            if r == Role::Main {
                self.get_or_start(db, Role::Main, None);
                self.watch_wal_of(db);
            }
        }
    }

    /// A file capture could not follow by name (its name was not UTF-8) now stands at `to`.
    pub fn arrived(&self, to: &str) {
        self.replaced(to, "replaced by a rename");
        let (rt, dbt) = classify(to);
        if rt == Role::Main {
            self.get_or_start(dbt, Role::Main, None);
            self.watch_wal_of(dbt);
        }
    }

    /// What stood at `rel` is gone: a database file's identity ends, another of its files is
    /// reopened.
    fn replaced(&self, rel: &str, why: &str) {
        let (r, db_rel) = classify(rel);
        if r == Role::Main {
            self.settle(db_rel);
            let old = self.dbs.write().remove(db_rel);
            if let Some(old) = old {
                retire(&old, db_rel, why);
                self.retired_left.store(true, Ordering::Relaxed);
            }
        } else if let Some(db) = self.get(db_rel) {
            db.guard(|st, db| st.reopen(db, &self.backing, r));
        }
    }

    /// Database `db` (out of the table) is now named `to` (an excluded name ends its
    /// capture).
    fn moved(&self, db: Arc<Db>, from: &str, to: &str) {
        if self.exclude.matches(to) {
            retire(
                &db,
                from,
                &format!("renamed to {to}, which is excluded by configuration"),
            );
            return;
        }
        *db.name.lock() = to.to_string();
        if let Err(e) = write_atomic(&db.stage.dir().join("name"), to.as_bytes()) {
            log::error!("{to}: cannot record the new name in staging: {e}");
        }
        db.guard(|st, db| st.reopen(db, &self.backing, Role::Main));
        log::info!("{from}: renamed to {to}");
        self.settle(to);
        let old = self.dbs.write().insert(to.to_string(), db.clone());
        if let Some(old) = old.filter(|o| !Arc::ptr_eq(o, &db)) {
            retire(&old, to, "replaced by a rename");
        }
    }
}
