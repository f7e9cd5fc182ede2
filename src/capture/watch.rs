//! Wakes capture when a WAL or a rollback journal changes behind it (observed mode, see
//! `Capture::observe`).
//!
//! With kernel passthrough, writes to `-wal` files go straight to the backing files and never
//! reach sqlfs, but the kernel still reports them to inotify watches on those files. Each WAL
//! is watched by itself (from the open of it through the mount, which every writer makes
//! first; a watch follows the file and ends with it), not through its directory: a
//! directory's watch would make the kernel report every write to every plain file beside the
//! databases too, which costs each straight write about as much as the write itself.
//!
//! Each watch is one-shot (`IN_ONESHOT`): the kernel reports the first write after it was set
//! and drops it, so the writes that follow cost the app nothing until sqlfs watches again.
//! A watch that stayed would have the kernel queue (or merge) a report at every write, in the
//! writer's own call: 10-20% of a small commit at synchronous=NORMAL
//! (docs/PERFORMANCE.md). The watcher sets the watch again *before* its catch-up of that
//! database, so no write goes unseen: one made before the new watch is in the WAL by the
//! time the catch-up reads it, one made after raises the next report. One
//! thread turns each report into a catch-up of that database. Reports are
//! gathered for a short moment first, so a busy database is caught up in batches of
//! transactions rather than once per write. The moment adapts to the pace of commits: it
//! doubles (up to 2 ms) while catch-ups find fewer than [`BATCH`] transactions each, and
//! halves (down to 0.25 ms) while they find more than four times that. Slow commits (each one
//! synced, as with synchronous=FULL) are then gathered a few at a time instead of waking the
//! thread once each, and fast ones do not pile up for the checkpoint to stage.
//!
//! A writer publishes a commit in the WAL index just after writing it, so a catch-up often
//! comes a moment too early: while frames follow the published end, the database is looked at
//! again after a short delay that grows (to at most a second) and stops after a minute (a
//! writer that died before publishing leaves such frames behind; the next writer's own
//! reports, or its checkpoint, carry on from there). Nothing is polled otherwise: an idle
//! mount costs nothing.
//!
//! The watcher only brings staging up to date sooner. Correctness does not depend on it:
//! every write to a database file (a checkpoint), and every truncation, unlink or close of a
//! WAL, catches up first on the request thread.
//!
//! Rollback journals are watched the same way while a transaction is open on their database
//! (from its first database write, and again at each report while it stays open): a journal
//! that goes straight through ends a transaction unseen when zeros are written over its header
//! (`PERSIST` mode, exclusive locking), and the report has the watcher look at the header
//! (`journal.rs`). There the watch is what stages such a commit while the connection idles;
//! the next write, sync or close of the database stages it too.

use std::collections::{BTreeSet, HashMap};

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Capture;
use crate::backing::Backing;

/// How long reports are gathered before a catch-up: at first, at least and at most.
const GATHER: Duration = Duration::from_micros(500);
const GATHER_MIN: Duration = Duration::from_micros(250);
const GATHER_MAX: Duration = Duration::from_millis(2);
/// Transactions one catch-up should find, for the gathering time to stay as it is (up to
/// four times as many).
const BATCH: u64 = 4;
/// Last delay before looking again at a database with unpublished frames (the first one is
/// the gathering time).
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long unpublished frames are looked at before the watcher leaves them to other triggers.
const RETRY_FOR: Duration = Duration::from_secs(60);

pub struct Watch {
    fd: OwnedFd,
    /// Watch descriptor → the database (relative path) whose WAL or journal it watches.
    wals: Mutex<HashMap<i32, String>>,
}

struct Retry {
    due: Instant,
    step: Duration,
    since: Instant,
}

impl Watch {
    pub fn new() -> io::Result<Watch> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watch {
            // SAFETY: fd was just returned by inotify_init1 and is owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            wals: Mutex::new(HashMap::new()),
        })
    }

    /// Watches the WAL of database `db_rel` for writes, if it exists (idempotent: a file
    /// already watched keeps its watch, now for this name).
    pub fn add_wal(&self, b: &Backing, db_rel: &str) {
        self.add(b, db_rel, "-wal", "at checkpoints and closes");
    }

    /// Watches the rollback journal of database `db_rel` for writes, if it exists: the end of
    /// a transaction that zeroes its header instead of deleting it (`journal.rs`).
    pub fn add_journal(&self, b: &Backing, db_rel: &str) {
        self.add(b, db_rel, "-journal", "at its next write, sync or close");
    }

    /// Watches the file `db_rel` + `suffix` (one-shot); `fallback` says when its changes are
    /// staged if it cannot be watched.
    fn add(&self, b: &Backing, db_rel: &str, suffix: &str, fallback: &str) {
        let file = format!("{db_rel}{suffix}");
        // The file opened beneath the backing root (no link followed); its /proc entry
        // names exactly that file.
        let fd = match b.open_beneath(&file, libc::O_PATH | libc::O_NOFOLLOW, 0) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return,
            Err(e) => {
                log::warn!("cannot watch {file:?} for writes: {e}; its transactions are staged {fallback} only");
                return;
            }
        };
        let c = crate::backing::proc_fd(fd.as_raw_fd());
        // SAFETY: valid fd and C string.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::IN_MODIFY | libc::IN_ONESHOT,
            )
        };
        if wd < 0 {
            log::warn!(
                "cannot watch {:?} for writes: {}; its transactions are staged {fallback} only",
                file,
                io::Error::last_os_error()
            );
            return;
        }
        self.wals.lock().insert(wd, db_rel.to_string());
    }

    /// The watcher thread's loop; never returns.
    pub fn run(&self, cap: &Capture) {
        let mut retry: HashMap<String, Retry> = HashMap::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut gather = GATHER;
        loop {
            let timeout = retry
                .values()
                .map(|r| r.due.saturating_duration_since(Instant::now()))
                .min();
            if self.wait(timeout) {
                std::thread::sleep(gather);
            }
            let mut todo: BTreeSet<String> = BTreeSet::new();
            let mut fresh: BTreeSet<String> = BTreeSet::new();
            let overflow = self.drain(&mut buf, &mut fresh);
            if overflow {
                log::warn!("WAL write reports overflowed; catching up every database");
                fresh.extend(cap.databases().into_iter().map(|(n, _)| n));
            }
            let now = Instant::now();
            todo.extend(
                retry
                    .iter()
                    .filter(|(_, r)| r.due <= now)
                    .map(|(n, _)| n.clone()),
            );
            // Each report ended its watch (one-shot): watched again before the catch-up, so
            // that a write after this catch-up's look is reported and one before it is seen.
            for db in &fresh {
                self.add_wal(&cap.backing, db);
            }
            todo.extend(fresh.iter().cloned());
            let mut staged = 0;
            for db in todo {
                let found = cap.catch_up(&db);
                staged += found.staged;
                if !found.awaiting {
                    retry.remove(&db);
                    continue;
                }
                let now = Instant::now();
                let r = retry.entry(db.clone()).or_insert(Retry {
                    due: now,
                    step: gather,
                    since: now,
                });
                if fresh.contains(&db) {
                    r.step = gather;
                    r.since = now;
                }
                if now.duration_since(r.since) > RETRY_FOR {
                    log::debug!("{db}: unpublished WAL frames left to later writes");
                    retry.remove(&db);
                    continue;
                }
                r.due = now + r.step;
                r.step = (r.step * 4).min(RETRY_MAX);
            }
            if staged > 0 {
                gather = next_gather(gather, staged);
            }
        }
    }

    /// Waits for reports, at most `timeout` (forever if `None`). True if there are some.
    fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs() as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: one valid pollfd; tsp is null or points to a live timespec.
        let n = unsafe { libc::ppoll(&mut p, 1, tsp, std::ptr::null()) };
        n > 0 && p.revents & libc::POLLIN != 0
    }

    /// Reads every pending report; the databases whose WAL was written go into `out`.
    /// True if the kernel dropped reports (queue overflow).
    fn drain(&self, buf: &mut [u8], out: &mut BTreeSet<String>) -> bool {
        let mut overflow = false;
        loop {
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
                return overflow;
            }
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return overflow;
            }
            let mut wals = self.wals.lock();
            let mut i = 0usize;
            let hdr = std::mem::size_of::<libc::inotify_event>();
            while i + hdr <= n as usize {
                // SAFETY: the kernel wrote a whole inotify_event at i (reads may be unaligned).
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[i..].as_ptr().cast()) };
                // A file's own watch reports no name.
                i += hdr + ev.len as usize;
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    overflow = true;
                    continue;
                }
                if ev.mask & libc::IN_IGNORED != 0 {
                    // The watch ended: after its report (already taken out below), or with the
                    // file (a new WAL is watched when opened).
                    wals.remove(&ev.wd);
                    continue;
                }
                // The kernel ended the watch with this report (one-shot).
                if let Some(db) = wals.remove(&ev.wd) {
                    out.insert(db);
                }
            }
        }
    }
}

/// The gathering time after a catch-up that staged `staged` transactions (more than zero).
fn next_gather(gather: Duration, staged: u64) -> Duration {
    if staged < BATCH {
        (gather * 2).min(GATHER_MAX)
    } else if staged > 4 * BATCH {
        (gather / 2).max(GATHER_MIN)
    } else {
        gather
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathering_follows_the_pace_of_commits() {
        // One synced commit per catch-up: gather longer, up to the limit.
        let mut g = GATHER;
        for _ in 0..10 {
            g = next_gather(g, 1);
        }
        assert_eq!(g, GATHER_MAX);
        // A batch of the size aimed at: unchanged.
        assert_eq!(next_gather(g, BATCH), g);
        assert_eq!(next_gather(g, 4 * BATCH), g);
        // Many commits per catch-up: shorter, down to the limit.
        for _ in 0..10 {
            g = next_gather(g, 40);
        }
        assert_eq!(g, GATHER_MIN);
    }
}
