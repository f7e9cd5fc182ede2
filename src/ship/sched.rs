//! The schedule of one replica's shipper: which database is due when, and a bounded pool of
//! workers that take due databases one at a time.
//!
//! A database enters the schedule when records reach its staging log (capture tells the
//! shipper), when its maintenance falls due, when a shipment failed and its backoff ends, or
//! when someone waits for it (`--sync`, the last pass at unmount). Nothing else wakes a
//! worker: an idle database is on no timer and costs nothing.
//!
//! Invariants:
//! - A database is run by at most one worker at a time (its positions, outbox and catalog
//!   are its own); news that arrives while it runs schedules it again after.
//! - At most `workers` databases run at once, so at most that many requests are in flight
//!   to the replica; a database that is slow (a store that stalls on its keys) holds one
//!   worker and delays no other database while a worker is free.
//! - Between two shipments of a database at least the sync interval passes, so it makes at
//!   most one level-0 object per interval; its first commit after a quiet interval is
//!   shipped at once.
//! - A failing database waits for the end of its backoff unless it is forced.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::capture::Db;

/// The schedule.
pub(super) struct Sched {
    st: Mutex<St>,
    cv: Condvar,
    interval: Duration,
}

#[derive(Default)]
struct St {
    /// Due databases: (when, sequence, id).
    timers: BTreeSet<(Instant, u64, String)>,
    entries: HashMap<String, Entry>,
    seq: u64,
    /// Unmount: run what is due now, then let the workers go.
    draining: bool,
}

struct Entry {
    db: Arc<Db>,
    /// Its key in `timers`, while it is scheduled.
    due: Option<(Instant, u64)>,
    running: bool,
    /// Asked for while running: schedule at this time once the run ends.
    again: Option<Instant>,
    /// When its last shipment started (the interval counts from it).
    last_start: Option<Instant>,
    /// A failed run: nothing unforced before this.
    hold_until: Option<Instant>,
    /// Runs finished.
    runs: u64,
}

/// Why a database is scheduled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Why {
    /// Records were staged: due once the interval since its last shipment has passed.
    Staged,
    /// At this time (maintenance, a retry after backoff).
    At(Instant),
    /// Now, backoff or not (a waiter, the last pass).
    Now,
}

impl Sched {
    pub(super) fn new(interval: Duration) -> Sched {
        Sched {
            st: Mutex::new(St::default()),
            cv: Condvar::new(),
            interval,
        }
    }

    /// The sync interval.
    pub(super) fn interval(&self) -> Duration {
        self.interval
    }

    /// Schedules `db` for `why` (never later than it already is).
    pub(super) fn wake(&self, db: &Arc<Db>, why: Why) {
        let now = Instant::now();
        let mut st = self.st.lock();
        let e = st.entries.entry(db.id.clone()).or_insert_with(|| Entry {
            db: db.clone(),
            due: None,
            running: false,
            again: None,
            last_start: None,
            hold_until: None,
            runs: 0,
        });
        if !Arc::ptr_eq(&e.db, db) {
            e.db = db.clone();
        }
        let at = match why {
            Why::Now => now,
            Why::At(t) => t,
            Why::Staged => {
                let t = e.last_start.map_or(now, |s| (s + self.interval).max(now));
                e.hold_until.map_or(t, |h| h.max(t))
            }
        };
        if e.running {
            e.again = Some(e.again.map_or(at, |a| a.min(at)));
            return;
        }
        if e.due.is_some_and(|(t, _)| t <= at) {
            return;
        }
        let old = e.due.take();
        st.seq += 1;
        let seq = st.seq;
        let id = db.id.clone();
        if let Some((t, s)) = old {
            st.timers.remove(&(t, s, id.clone()));
        }
        st.timers.insert((at, seq, id.clone()));
        if let Some(e) = st.entries.get_mut(&id) {
            e.due = Some((at, seq));
        }
        drop(st);
        self.cv.notify_one();
    }

    /// The next due database for a worker, waiting until one is due; `None` once draining
    /// and nothing is due now.
    pub(super) fn next(&self) -> Option<Arc<Db>> {
        let mut st = self.st.lock();
        loop {
            let now = Instant::now();
            let first = st.timers.iter().next().cloned();
            match first {
                Some((t, seq, id)) if t <= now => {
                    st.timers.remove(&(t, seq, id.clone()));
                    let e = st.entries.get_mut(&id).expect("scheduled entries exist");
                    e.due = None;
                    e.running = true;
                    return Some(e.db.clone());
                }
                _ if st.draining => return None,
                Some((t, ..)) => {
                    self.cv.wait_until(&mut st, t);
                }
                None => self.cv.wait(&mut st),
            }
        }
    }

    /// Notes when the shipment `db` is about to make started.
    pub(super) fn started(&self, db: &Db) {
        if let Some(e) = self.st.lock().entries.get_mut(&db.id) {
            e.last_start = Some(Instant::now());
        }
    }

    /// A worker finished `db`: `failed_until` is its backoff if it failed, `next` when its
    /// maintenance is due next (if ever). Schedules what was asked for meanwhile.
    pub(super) fn done(&self, db: &Arc<Db>, failed_until: Option<Instant>, next: Option<Instant>) {
        let again = {
            let mut st = self.st.lock();
            let Some(e) = st.entries.get_mut(&db.id) else {
                return;
            };
            e.running = false;
            e.runs += 1;
            e.hold_until = failed_until;
            e.again.take()
        };
        // Work that arrived while it ran waits for its backoff (a forced run does not, but
        // that was its run).
        let again = match (again, failed_until) {
            (Some(a), Some(h)) => Some(a.max(h)),
            (a, None) => a,
            (None, Some(h)) => Some(h),
        };
        for t in [again, next].into_iter().flatten() {
            self.wake(db, Why::At(t));
        }
        self.cv.notify_all();
    }

    /// How many runs of `db` have finished.
    pub(super) fn runs(&self, db: &Db) -> u64 {
        self.st.lock().entries.get(&db.id).map_or(0, |e| e.runs)
    }

    /// Unmount: the workers run what is due now and then stop.
    pub(super) fn drain(&self) {
        self.st.lock().draining = true;
        self.cv.notify_all();
    }

    /// Databases scheduled or running (for tests and status).
    #[allow(dead_code)]
    pub(super) fn pending(&self) -> usize {
        let st = self.st.lock();
        st.timers.len() + st.entries.values().filter(|e| e.running).count()
    }
}
