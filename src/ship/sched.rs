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
//! - The sync interval is a rate: over any stretch of time T a database makes at most
//!   T / interval + 2 level-0 objects. Each shipment adds one interval to the database's
//!   account (`Entry::tat`, counted from when the shipment fell due, or from where the
//!   account stood if that is later), and staged news falls due once the account is no more
//!   than one interval ahead of now. So the first commit after a quiet interval ships at
//!   once, a database committing faster than the interval ships once an interval, and one
//!   committing about once an interval ships each commit at once: a commit that comes a
//!   little early, or a shipment a busy pool took late, does not make the next commit wait.
//!   (Counting a plain gap from each shipment's start instead, those small delays add up
//!   until every commit of such a database waits about a whole interval.)
//! - A failing database waits for the end of its backoff unless it is forced.
//!
//! Waking (what keeps idle workers from costing CPU): at most one idle worker waits with a
//! deadline, the earliest timer's (`St::watch`); the others wait without one. Whatever makes
//! a timer earliest (a database scheduled, a due one taken while more are scheduled) wakes
//! one worker, which takes it if it is due or else watches it. So a shipment wakes one
//! worker, not every idle one, and a timer's end wakes one worker, not all of them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::capture::Db;

/// What the schedule runs: a database (tests schedule plain values).
pub(super) trait Job: Clone {
    /// Its identity: one entry, one timer and one run at a time per id.
    fn job_id(&self) -> &str;
}

impl Job for Arc<Db> {
    fn job_id(&self) -> &str {
        &self.id
    }
}

/// The schedule.
pub(super) struct Sched<J: Job = Arc<Db>> {
    st: Mutex<St<J>>,
    cv: Condvar,
    interval: Duration,
}

struct St<J> {
    /// Due databases: (when, sequence, id).
    timers: BTreeSet<(Instant, u64, String)>,
    entries: HashMap<String, Entry<J>>,
    seq: u64,
    /// The deadline an idle worker waits for (the earliest timer when it began to wait);
    /// `None` when no worker waits with a deadline.
    watch: Option<Instant>,
    /// Unmount: run what is due now, then let the workers go.
    draining: bool,
}

impl<J> Default for St<J> {
    fn default() -> Self {
        St {
            timers: BTreeSet::new(),
            entries: HashMap::new(),
            seq: 0,
            watch: None,
            draining: false,
        }
    }
}

struct Entry<J> {
    db: J,
    /// Its key in `timers`, while it is scheduled.
    due: Option<(Instant, u64)>,
    running: bool,
    /// Asked for while running: schedule at this time once the run ends.
    again: Option<Instant>,
    /// Its account: when its next shipment would fall due if it shipped exactly once an
    /// interval from now on (the theoretical arrival time of a rate limiter); staged news
    /// is due one interval before it, or now if that has passed.
    tat: Option<Instant>,
    /// When the run under way fell due (its timer's time).
    taken_due: Option<Instant>,
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

impl<J: Job> Sched<J> {
    pub(super) fn new(interval: Duration) -> Sched<J> {
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
    pub(super) fn wake(&self, db: &J, why: Why) {
        let now = Instant::now();
        let mut st = self.st.lock();
        let e = st
            .entries
            .entry(db.job_id().to_string())
            .or_insert_with(|| Entry {
                db: db.clone(),
                due: None,
                running: false,
                again: None,
                tat: None,
                taken_due: None,
                hold_until: None,
                runs: 0,
            });
        // The latest value under this id (a database recreated under its name is new).
        e.db = db.clone();
        let at = match why {
            Why::Now => now,
            Why::At(t) => t,
            Why::Staged => {
                let t = e
                    .tat
                    .and_then(|a| a.checked_sub(self.interval))
                    .map_or(now, |t| t.max(now));
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
        let id = db.job_id().to_string();
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
    pub(super) fn next(&self) -> Option<J> {
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
                    e.taken_due = Some(t);
                    let db = e.db.clone();
                    // The next timer needs a worker to take it or watch it.
                    if !st.timers.is_empty() {
                        self.cv.notify_one();
                    }
                    return Some(db);
                }
                _ if st.draining => return None,
                Some((t, ..)) if st.watch.is_none_or(|w| t < w) => {
                    st.watch = Some(t);
                    self.cv.wait_until(&mut st, t);
                    if st.watch == Some(t) {
                        st.watch = None;
                    }
                }
                // Another worker watches a deadline no later than the first timer.
                Some(_) | None => self.cv.wait(&mut st),
            }
        }
    }

    /// Notes that the run under way of `db` makes a shipment: one interval on its account,
    /// counted from when the run fell due or from the account, whichever is later.
    pub(super) fn started(&self, db: &J) {
        let interval = self.interval;
        if let Some(e) = self.st.lock().entries.get_mut(db.job_id()) {
            let due = e.taken_due.unwrap_or_else(Instant::now);
            e.tat = Some(e.tat.map_or(due, |a| a.max(due)) + interval);
        }
    }

    /// A worker finished `db`: `failed_until` is its backoff if it failed, `next` when its
    /// maintenance is due next (if ever). Schedules what was asked for meanwhile.
    pub(super) fn done(&self, db: &J, failed_until: Option<Instant>, next: Option<Instant>) {
        let again = {
            let mut st = self.st.lock();
            let Some(e) = st.entries.get_mut(db.job_id()) else {
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
    }

    /// How many runs of `db` have finished.
    pub(super) fn runs(&self, db: &J) -> u64 {
        self.st
            .lock()
            .entries
            .get(db.job_id())
            .map_or(0, |e| e.runs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::JoinHandle;

    impl Job for String {
        fn job_id(&self) -> &str {
            self
        }
    }

    /// `n` workers that take jobs until the schedule drains, noting each job's start; each
    /// returns what it took and when.
    fn workers(s: &Arc<Sched<String>>, n: usize) -> Vec<JoinHandle<Vec<(String, Instant)>>> {
        (0..n)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut took = Vec::new();
                    while let Some(j) = s.next() {
                        // Noted before `started`, so that the interval counts from no
                        // earlier than this.
                        took.push((j.clone(), Instant::now()));
                        s.started(&j);
                        s.done(&j, None, None);
                    }
                    took
                })
            })
            .collect()
    }

    /// Waits (up to a minute: a timer nobody watches would hang here) until every job in
    /// `ids` ran `runs` times.
    fn wait_runs(s: &Sched<String>, ids: &[String], runs: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while ids.iter().any(|j| s.runs(j) < runs) {
            assert!(Instant::now() < deadline, "a due job was never taken");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn every_timer_is_taken_once_and_never_before_it_is_due() {
        let s = Arc::new(Sched::<String>::new(Duration::from_millis(50)));
        let hs = workers(&s, 4);
        let t0 = Instant::now();
        // One far timer first, so that the idle workers settle into one watching it and
        // the rest waiting without a deadline; then earlier ones, out of order.
        let mut due: HashMap<String, Instant> = HashMap::new();
        let far = "far".to_string();
        due.insert(far.clone(), t0 + Duration::from_millis(400));
        s.wake(&far, Why::At(due[&far]));
        std::thread::sleep(Duration::from_millis(30));
        for i in 0..40u64 {
            let j = format!("j{i}");
            let at = Instant::now() + Duration::from_millis(i * 37 % 300);
            due.insert(j.clone(), at);
            s.wake(&j, Why::At(at));
        }
        let ids: Vec<String> = due.keys().cloned().collect();
        wait_runs(&s, &ids, 1);
        s.drain();
        let mut took: Vec<(String, Instant)> = Vec::new();
        for h in hs {
            took.extend(h.join().unwrap());
        }
        assert_eq!(took.len(), due.len(), "each job once");
        for (j, at) in took {
            assert!(at >= due[&j], "{j} ran before it was due");
        }
    }

    #[test]
    fn timers_due_together_run_on_as_many_idle_workers_at_once() {
        // Each run holds its worker for a while; four jobs due at one instant must not
        // wait for each other while four workers are idle (a timer taken by the one worker
        // watching wakes the next).
        const HOLD: Duration = Duration::from_millis(500);
        let s = Arc::new(Sched::<String>::new(Duration::from_millis(50)));
        let hs: Vec<JoinHandle<Vec<(Instant, Instant)>>> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut runs = Vec::new();
                    while let Some(j) = s.next() {
                        let start = Instant::now();
                        std::thread::sleep(HOLD);
                        runs.push((start, Instant::now()));
                        s.done(&j, None, None);
                    }
                    runs
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30));
        let at = Instant::now() + Duration::from_millis(100);
        let ids: Vec<String> = (0..4).map(|i| format!("j{i}")).collect();
        for j in &ids {
            s.wake(j, Why::At(at));
        }
        wait_runs(&s, &ids, 1);
        s.drain();
        let runs: Vec<(Instant, Instant)> =
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        assert_eq!(runs.len(), 4);
        let last_start = runs.iter().map(|r| r.0).max().unwrap();
        let first_end = runs.iter().map(|r| r.1).min().unwrap();
        assert!(
            last_start < first_end,
            "a due job waited for another job's run to end"
        );
    }

    #[test]
    fn staged_news_past_the_rate_waits_for_the_interval() {
        let interval = Duration::from_millis(200);
        let s = Arc::new(Sched::<String>::new(interval));
        let hs = workers(&s, 3);
        let j = "db".to_string();
        // The first news of a quiet job runs at once, and so does the next (one interval of
        // slack); the third waits until the account allows it.
        let t0 = Instant::now();
        for runs in 1..=3 {
            s.wake(&j, Why::Staged);
            wait_runs(&s, std::slice::from_ref(&j), runs);
        }
        // A waiter's run does not wait.
        s.wake(&j, Why::Now);
        wait_runs(&s, std::slice::from_ref(&j), 4);
        s.drain();
        let took: Vec<Instant> = hs
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .map(|(_, t)| t)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(took.len(), 4);
        // The first fell due no earlier than `t0`; the third an interval after it.
        assert!(took[2] >= t0 + interval, "staged news ran past the rate");
    }

    /// When `id`'s timer is due, if it is scheduled.
    fn due_of(s: &Sched<String>, id: &str) -> Option<Instant> {
        s.st.lock().entries.get(id).and_then(|e| e.due).map(|d| d.0)
    }

    /// Takes `id` (due now) and runs it, as a shipment if `ships`.
    fn run_now(s: &Sched<String>, id: &str, ships: bool) {
        assert_eq!(s.next().as_deref(), Some(id));
        if ships {
            s.started(&id.to_string());
        }
        s.done(&id.to_string(), None, None);
    }

    #[test]
    fn a_shipment_taken_late_does_not_push_the_next_ones_back() {
        let interval = Duration::from_millis(200);
        let s = Sched::<String>::new(interval);
        let j = "db".to_string();
        s.wake(&j, Why::Staged);
        let due = due_of(&s, &j).expect("scheduled");
        // No worker free for a while: the run starts late.
        std::thread::sleep(Duration::from_millis(50));
        run_now(&s, &j, true);
        // News right after: due at once (one interval of slack), and shipped.
        s.wake(&j, Why::Staged);
        assert!(due_of(&s, &j).is_some_and(|d| d <= Instant::now()));
        run_now(&s, &j, true);
        // Two shipments on the account: the next is due an interval after the first fell
        // due, not after either began.
        s.wake(&j, Why::Staged);
        assert_eq!(due_of(&s, &j), Some(due + interval));
        // A run with nothing to ship (no `started`) leaves the account as it was.
        std::thread::sleep(interval);
        run_now(&s, &j, false);
        s.wake(&j, Why::Staged);
        assert!(due_of(&s, &j).is_some_and(|d| d <= Instant::now()));
    }
}
