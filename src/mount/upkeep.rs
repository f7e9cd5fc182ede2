//! The `sqlfs-stage` thread: staging upkeep of the databases that changed. Every 500 ms it
//! syncs the logs that received records, folds a log past `--stage-limit` up to what every
//! replica holds, retries the snapshot of databases whose staging fails, and now and then
//! removes the staging of databases deleted long ago.
//!
//! Invariants:
//! - Only databases that staged records since the last look (capture tells this thread), or
//!   that were over the limit at the last look, are looked at: an idle mount of any number of
//!   databases does no per-database work here.
//! - Staging is folded only up to the slowest replica's position, unless it outgrows its hard
//!   limit (logged; that replica then gets a snapshot).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::capture::{Capture, Db};
use crate::ship::Shipper;

/// How often the thread looks.
const TICK: Duration = Duration::from_millis(500);

/// Starts the thread; it ends when `stop` is set.
pub(super) fn spawn(
    cap: Arc<Capture>,
    shippers: Vec<Arc<Shipper>>,
    limit: u64,
    stop: Arc<AtomicBool>,
    retired_keep: Duration,
) -> std::io::Result<()> {
    let changed: Arc<Mutex<HashMap<String, Arc<Db>>>> = Arc::default();
    {
        let changed = changed.clone();
        cap.on_staged(Box::new(move |db| {
            changed
                .lock()
                .entry(db.id.clone())
                .or_insert_with(|| db.clone());
        }));
    }
    // What a previous mount left over the limit is looked at once.
    let mut over: HashMap<String, Arc<Db>> = cap
        .databases()
        .into_iter()
        .map(|(_, db)| (db.id.clone(), db))
        .collect();
    std::thread::Builder::new()
        .name("sqlfs-stage".into())
        .spawn(move || {
            crate::backing::background_priority();
            let mut tick = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                let mut todo = std::mem::take(&mut *changed.lock());
                for db in todo.values() {
                    sync(db);
                }
                // Staging that failed (a full disk) recovers without waiting for a commit.
                cap.retry_failed();
                tick += 1;
                if tick % 120 == 1 {
                    cap.expire_retired(retired_keep);
                }
                todo.extend(over.drain());
                for (id, db) in todo {
                    if fold(&db, &shippers, limit) {
                        over.insert(id, db);
                    }
                }
            }
        })?;
    Ok(())
}

/// Syncs `db`'s staging if it has unsynced records. A failed sync puts the database in the
/// failing state: what it staged may not be durable, so the next record is a snapshot.
fn sync(db: &Db) {
    if db.stage.is_dirty() {
        if let Err(e) = db.stage.sync() {
            db.sync_failed(e);
        }
    }
}

/// Folds `db`'s staging if it is over `limit`; true if it still is (a replica is behind).
fn fold(db: &Db, shippers: &[Arc<Shipper>], limit: u64) -> bool {
    let bytes = db.stage.log_bytes();
    if bytes <= limit {
        return false;
    }
    let name = db.name();
    // Fold only what every replica has, unless staging outgrows its hard limit: then say so,
    // and the lagging replica gets a snapshot.
    let shipped = shippers
        .iter()
        .map(|s| s.position(db))
        .min()
        .unwrap_or(u64::MAX);
    let upto = if bytes > limit * crate::stage::HARD_FACTOR {
        if shipped < db.stage.last().map_or(0, |h| h.txid) {
            log::error!("{name}: a replica is behind and staging holds {} MiB (over {}x --stage-limit); folding anyway, that replica will get a snapshot", bytes >> 20, crate::stage::HARD_FACTOR);
        }
        u64::MAX
    } else {
        shipped
    };
    match db.stage.fold(upto) {
        Ok(n) if n > 0 => log::info!("{name}: folded {n} bytes of staged log into the local base"),
        Ok(_) => {}
        Err(e) => log::error!("{name}: cannot fold staging: {e}"),
    }
    db.stage.log_bytes() > limit
}
