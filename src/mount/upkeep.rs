//! The `sqlfs-stage` thread: staging upkeep of the databases that changed. Every 500 ms it
//! syncs the logs that received records, folds a log past `--stage-limit` up to what every
//! replica holds, retries the snapshot of databases whose staging fails, and now and then
//! removes the staging of databases deleted long ago.
//!
//! Invariants:
//! - Only databases that staged records since the last look (capture tells this thread), or
//!   that were over the limit at the last look, are looked at: an idle mount of any number of
//!   databases does no per-database work here.
//! - Staging is folded only up to the slowest replica's position. Past its hard limit
//!   ([`crate::stage::HARD_FACTOR`] × `--stage-limit`) it is folded anyway, but only when a
//!   lagging replica is not getting anywhere: its last attempt failed, it is fenced, or its
//!   position has not moved for [`STALLED`]. A replica that is merely busy shipping a burst is
//!   waited for, up to [`CEILING_FACTOR`] × `--stage-limit` (a replica slower than the app for
//!   good). Every forced fold is logged; that replica then gets a snapshot, and its window has a
//!   gap that `list` reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::capture::{Capture, Db};
use crate::ship::Shipper;

/// How often the thread looks.
const TICK: Duration = Duration::from_millis(500);
/// A lagging replica whose position has not moved for this long is not waited for past the
/// hard limit.
pub const STALLED: Duration = Duration::from_secs(30);
/// Past this many times `--stage-limit`, staging is folded even for a replica that is still
/// shipping (it is slower than the app).
pub const CEILING_FACTOR: u64 = 4 * crate::stage::HARD_FACTOR;

/// What the thread remembers of a database over its limit: the slowest replica's position and
/// when it last moved.
struct Lag {
    shipped: u64,
    since: Instant,
    told: bool,
}

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
            let mut lags: HashMap<String, Lag> = HashMap::new();
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
                    if fold(&db, &shippers, limit, &mut lags) {
                        over.insert(id, db);
                    } else {
                        lags.remove(&id);
                    }
                }
            }
        })?;
    Ok(())
}

/// Syncs `db`'s staging if it has unsynced records, then parks it if nobody has it open. A failed sync puts the database in the
/// failing state: what it staged may not be durable, so the next record is a snapshot.
fn sync(db: &Db) {
    if db.stage.is_dirty() {
        if let Err(e) = db.stage.sync() {
            db.sync_failed(e);
        }
    }
    // What staged without an app (the scan, a retried snapshot) holds no descriptor after.
    db.park_if_idle();
}

/// Folds `db`'s staging if it is over `limit`; true if it still is (a replica is behind).
fn fold(db: &Db, shippers: &[Arc<Shipper>], limit: u64, lags: &mut HashMap<String, Lag>) -> bool {
    let bytes = db.stage.log_bytes();
    if bytes <= limit {
        return false;
    }
    let name = db.name();
    let last = db.stage.last().map_or(0, |h| h.txid);
    let behind: Vec<&Arc<Shipper>> = shippers.iter().filter(|s| s.position(db) < last).collect();
    // Only what a crash cannot take back from a replica's position is folded (`ship::ledger`).
    let shipped = shippers
        .iter()
        .map(|s| s.settle(db).unwrap_or(0).min(s.position(db)))
        .min()
        .unwrap_or(u64::MAX);
    let now = Instant::now();
    let lag = lags.entry(db.id.clone()).or_insert(Lag {
        shipped,
        since: now,
        told: false,
    });
    if lag.shipped != shipped {
        *lag = Lag {
            shipped,
            since: now,
            told: lag.told,
        };
    }
    // Fold only what every replica has. Past the hard limit, a replica that is not getting
    // anywhere is not waited for (it gets a snapshot); one that is shipping is, up to the
    // ceiling.
    let mut forced = None;
    let upto = if behind.is_empty() || bytes <= limit * crate::stage::HARD_FACTOR {
        shipped
    } else {
        let stuck = behind
            .iter()
            .find_map(|s| {
                if s.is_fenced(db) {
                    Some("is fenced".to_string())
                } else {
                    s.db_error(db).map(|e| format!("is failing ({e})"))
                }
            })
            .or_else(|| {
                (now.duration_since(lag.since) >= STALLED)
                    .then(|| format!("has not moved for {}s", STALLED.as_secs()))
            })
            .or_else(|| {
                (bytes > limit * CEILING_FACTOR).then(|| {
                    format!("is slower than the app (staging over {CEILING_FACTOR}x --stage-limit)")
                })
            });
        match stuck {
            Some(why) => {
                forced = Some(why);
                u64::MAX
            }
            None => {
                if !lag.told {
                    log::warn!("{name}: staging holds {} MiB (over {}x --stage-limit) while a replica ships it; waiting for it", bytes >> 20, crate::stage::HARD_FACTOR);
                    lag.told = true;
                }
                shipped
            }
        }
    };
    match db.stage.fold(upto) {
        Ok(n) if n > 0 => {
            // Said when records are folded away, not at each look that finds nothing it can
            // fold yet (one large record still in the segment being appended to).
            if let Some(why) = forced {
                log::error!(
                    "{name}: a replica {why} and staging holds {} MiB (over {}x \
                     --stage-limit); folded anyway, that replica will get a snapshot",
                    bytes >> 20,
                    crate::stage::HARD_FACTOR
                );
            }
            log::info!("{name}: folded {n} bytes of staged log into the local base")
        }
        Ok(_) => {}
        Err(e) => log::error!("{name}: cannot fold staging: {e}"),
    }
    db.stage.log_bytes() > limit
}
