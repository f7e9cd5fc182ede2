//! Who is told when a database's staging log grows: the shippers and the staging thread
//! subscribe ([`Capture::on_staged`]), so work follows commits and an idle database costs
//! nothing on any timer.
//!
//! Invariants:
//! - A listener is called after the records reach the log file ([`crate::stage::DbStage::last`]
//!   shows them), with the log's append lock held and possibly the database's capture lock:
//!   a listener only notes the database and wakes its own thread; it never calls back into
//!   capture or staging.
//! - Every append is reported (none is coalesced away here); listeners coalesce themselves.
//! - A database an earlier mount captured is reported once when it is loaded while the mount
//!   serves (`pending.rs`), so what it staged then is looked at as at the shippers' start.

use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use super::{Capture, Db};

/// A subscriber to staged records.
pub type Listener = Box<dyn Fn(&Arc<Db>) + Send + Sync>;

/// The subscribers of one mount.
#[derive(Default)]
pub(super) struct Listeners(RwLock<Vec<Listener>>);

impl Listeners {
    pub(super) fn tell(&self, db: &Arc<Db>) {
        for f in self.0.read().iter() {
            f(db);
        }
    }
}

impl Capture {
    /// Calls `f` with the database each time records of it reach its staging log.
    pub fn on_staged(&self, f: Listener) {
        self.listeners.0.write().push(f);
    }

    /// Connects a newly loaded database's staging log to the listeners.
    pub(super) fn connect(&self, db: &Arc<Db>) {
        let (weak, listeners): (Weak<Db>, _) = (Arc::downgrade(db), self.listeners.clone());
        db.stage.on_append(Box::new(move || {
            if let Some(db) = weak.upgrade() {
                listeners.tell(&db);
            }
        }));
    }
}
