//! Capture: turns the file operations the mount passes through into committed SQLite
//! transactions, in commit order, appended to each database's staging log.
//!
//! The filesystem layer reports events (`before_write`, `after_write`, truncate, unlink, rename,
//! fsync) for files whose names make them part of a database: `X` (the database), `X-wal`,
//! `X-journal`. All SQLite knowledge lives here.
//!
//! This file holds the registry of captured databases ([`Capture`], [`Db`]), the event API the
//! filesystem calls, and the per-database `State`. The rest: file roles (`role.rs`), events
//! applied to a state (`events.rs`), the staged state (`state.rs`), WAL frames (`wal.rs`) and
//! WAL-mode commits (`walmode.rs`), rollback-journal commits (`journal.rs`), snapshots and
//! staging failures (`snapshot.rs`), descriptors of idle databases (`park.rs`), reconciliation at mount (`reconcile.rs`, `hot.rs`) of databases loaded while the mount serves (`pending.rs`), the
//! scan for databases nobody opened (`scan.rs`), the passthrough watcher (`watch.rs`).
//!
//! Invariants:
//! - A transaction is staged before the write call that completed it returns to the app, so no
//!   later operation (a checkpoint, a WAL restart, the next rollback transaction) can overwrite
//!   data that is not yet staged.
//! - Staging is made durable (fsync) before any write that destroys the last other durable copy
//!   of a staged transaction: WAL header rewrites, WAL truncation or unlink, checkpoint writes
//!   into the database file, and the first database write of a rollback-mode transaction.
//! - Each database's TXIDs increase by one with no gap; `checksum` is the rolling checksum of
//!   the state after `txid` (see `sqlite::page_crc`). When the state cannot be derived
//!   incrementally (first sighting, a page size change, files changed while unmounted), a full
//!   snapshot record is written instead, and the log says why.
//! - One capture per database name: a database is taken into capture by one thread
//!   ([`Capture::get_or_start`], whoever calls it: an app's open, a write, the scan at
//!   mount), behind a gate of its name; every other event on that name waits at the gate
//!   until it is in the registry (or failed), so no event is missed and no second staging
//!   starts. Other names never wait for it.
//! - Names matched by `exclude` are never taken into capture.

mod ahead;
mod events;
mod hot;
mod journal;
mod notify;
mod park;
mod pending;
mod reconcile;
mod rename;
mod role;
mod scan;
mod snapshot;
mod state;
mod straight;
mod wal;
mod walmode;
mod watch;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::backing::Backing;
use crate::exclude::Exclude;
use crate::sqlite;
use crate::stage::{write_atomic, Access, DbStage};
pub use hot::rollback_hot_journals;
use journal::Rollback;
pub use notify::Listener;
pub use park::Use;
pub use role::{classify, journal_db_of, shows_db, wal_index_of, Role};
pub use scan::ScanProgress;
pub use snapshot::live_image;
use state::append_pages;
pub use straight::{shows_wal_mode, StraightUse};
pub use wal::read_exact_at;
use wal::WalTrack;

/// What a file is to capture, by its name.
use crate::stage::now_ns;

/// All databases of one mount.
pub struct Capture {
    backing: Arc<Backing>,
    meta_root: PathBuf,
    dbs: RwLock<HashMap<String, Arc<Db>>>,
    /// Names being taken into capture right now, each with the gate its other events wait
    /// at (see the module invariants); `n_starting` spares every other event the lookup.
    starting: Mutex<HashMap<String, Arc<Gate>>>,
    n_starting: AtomicUsize,
    /// Databases an earlier mount captured, not loaded yet: name → staging id. Each is loaded
    /// (reconciled with its files) by the first event on its name, or by the scan at mount,
    /// which loads them all while the mount serves (`pending.rs`); `n_pending` spares every
    /// other event the lookup.
    pending: Mutex<HashMap<String, String>>,
    n_pending: AtomicUsize,
    /// Open handles on main files that were not databases when opened, by name (see
    /// `park.rs`).
    unborn: Mutex<HashMap<String, std::sync::Weak<park::Users>>>,
    /// Databases never captured (`exclude:`).
    exclude: Exclude,
    /// What the scan at mount has done so far.
    scan: Mutex<ScanProgress>,
    /// Observed mode (see [`Capture::observe`]): WAL writes bypass sqlfs.
    observed: Arc<AtomicBool>,
    watch: OnceLock<Arc<watch::Watch>>,
    /// What [`Capture::shutdown`] found, once it ran (the unmount and the main thread both
    /// call it).
    shut: Mutex<Option<bool>>,
    /// Told whenever records reach a database's staging log (`notify.rs`).
    listeners: Arc<notify::Listeners>,
    /// Databases whose staging is failing right now: the staging thread retries only while
    /// this is not zero.
    failing_now: Arc<AtomicU64>,
    /// True while `.sqlfs/db/` may hold retired staging to expire.
    retired_left: AtomicBool,
}

/// One database being captured.
pub struct Db {
    pub id: String,
    name: Mutex<String>,
    pub stage: DbStage,
    state: Mutex<State>,
    observed: Arc<AtomicBool>,
    /// Open handles on the `-shm` file: while there are any, SQLite's WAL index in it says
    /// which commits are published. (In `locking_mode=EXCLUSIVE` SQLite keeps the index in
    /// its own memory and never opens the file.)
    shm_users: AtomicU32,
    /// Open handles on the database's files through the mount that capture counted (see
    /// [`Use`]): when the last one closes, the database is parked (see [`Db::park`]).
    users: Arc<park::Users>,
    backing: Arc<Backing>,
    /// Set while commits cannot be staged (see [`StagingFailure`]); read by status and
    /// metrics without taking the state lock.
    failing: Mutex<Option<StagingFailure>>,
    /// The mount's count of failing databases ([`Capture::retry_failed`] skips the scan at 0).
    failing_now: Arc<AtomicU64>,
    /// Capture attempts that failed since the mount started (each failed write of records
    /// or snapshot counts once).
    stage_errors: AtomicU64,
    /// Straight handles open on the database file (`straight.rs`), readable without the
    /// state lock.
    straight: AtomicU32,
    /// Its file is gone (deleted or replaced): what remains open writes no database.
    retired: AtomicBool,
}

/// Why and since when a database's commits are not being staged. Set at the first failed
/// capture, cleared by the first record staged after it (a snapshot: see [`Db::guard`]).
/// While set, the state stays at the last record on file, the next record is a snapshot that
/// chains from it, a WAL-mode checkpoint is refused (it would destroy frames that are not
/// staged), and the snapshot is retried every [`RETRY_GAP`] (commits, checkpoints and the
/// staging thread all try), so staging recovers on its own as soon as space returns.
#[derive(Clone, Debug)]
pub struct StagingFailure {
    /// The last error.
    pub error: String,
    /// When the first failure of this episode happened.
    pub since: SystemTime,
    /// Commits seen since then that are not staged (an upper bound).
    pub waiting: u64,
}

/// How often a failing database's snapshot is retried at most: each attempt reads the
/// whole database.
const RETRY_GAP: Duration = Duration::from_millis(200);

/// The committed state as staged, plus what is known of the files right now.
struct State {
    page_size: u32,
    db_pages: u32,
    checksum: u64,
    txid: u64,
    wal: Option<WalTrack>,
    rb: Rollback,
    main_fd: Option<File>,
    wal_fd: Option<File>,
    /// Why the next commit must be a full snapshot (continuity lost), if it must.
    resnapshot: Option<String>,
    /// Observed mode: after the last catch-up, frames follow the published end (a transaction
    /// is being written, or is written and about to be published).
    awaiting: bool,
    /// The `-shm` file, read for SQLite's WAL index; dropped whenever a handle on it opens
    /// (it may be a new file).
    shm_fd: Option<File>,
    /// Commits recognised so far (counts the ones that could not be staged).
    commits_seen: u64,
    /// When the last snapshot was tried while staging was failing.
    last_retry: Option<Instant>,
    /// Set while the database is parked: which of `main_fd` and `wal_fd` were open and are
    /// to be opened again (by name, beneath the backing root) before the state is next used.
    parked: Option<(bool, bool)>,
    /// Straight handles open on the database file (`straight.rs`; mirrored in `Db`).
    straight: u32,
    /// CRCs of database-file pages as of the WAL generation's start, for pages its index does
    /// not hold: filled while straight, kept while nothing writes the file through sqlfs.
    base: HashMap<u32, u64>,
    /// While straight: why the stream waits for the files to be at rest.
    blind: Option<String>,
    /// Blind since the WAL was deleted: the database file's size and times then.
    blind_stamp: Option<(u64, i64, i64, i64, i64)>,
    /// The files are at rest: a straight database may be read whole.
    at_rest: bool,
    /// Inside a starting checkpoint's WAL sync: the frames checkpoints copied so far.
    ckpt_copied: Option<u32>,
    /// The WAL watcher is catching up: a straight commit whose old page versions a starting
    /// checkpoint may have overwritten is left to that checkpoint's sync (`straight.rs`).
    may_defer: bool,
    /// The checkpoint (its `nBackfillAttempted`) a commit was last left to, and since when.
    deferred: Option<(u32, std::time::Instant)>,
    /// Set by `commit_wal` when it left its commit to the checkpoint's sync.
    left_to_ckpt: bool,
    /// A large transaction being staged while it is written (`ahead.rs`).
    early: Option<ahead::Early>,
    /// Salts of a WAL generation in which nothing is staged ahead (`ahead.rs`).
    ahead_off: Option<(u32, u32)>,
}

/// Opened once the database behind it is in the registry, or failed to start.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut o = self.open.lock();
        while !*o {
            self.cv.wait(&mut o);
        }
    }

    fn release(&self) {
        *self.open.lock() = true;
        self.cv.notify_all();
    }
}

impl Capture {
    /// Opens the capture state of a backing directory: lists every known database that
    /// `exclude` does not match; each is loaded and reconciled with its files (see
    /// [`Db::reconcile`]) at its first event or by the scan at mount, whichever comes first.
    pub fn open(backing: Arc<Backing>, exclude: Exclude) -> io::Result<Capture> {
        let meta_root = backing.meta_path();
        fs::create_dir_all(meta_root.join("db"))?;
        let cap = Capture {
            backing,
            meta_root,
            dbs: RwLock::new(HashMap::new()),
            starting: Mutex::new(HashMap::new()),
            n_starting: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            n_pending: AtomicUsize::new(0),
            unborn: Mutex::new(HashMap::new()),
            exclude,
            scan: Mutex::new(ScanProgress::default()),
            observed: Arc::new(AtomicBool::new(false)),
            watch: OnceLock::new(),
            shut: Mutex::new(None),
            listeners: Arc::default(),
            failing_now: Arc::default(),
            retired_left: AtomicBool::new(false),
        };
        for e in fs::read_dir(cap.meta_root.join("db"))? {
            let e = e?;
            let id = e.file_name().to_string_lossy().into_owned();
            let dir = e.path();
            let Ok(name) = fs::read_to_string(dir.join("name")) else {
                continue;
            };
            if dir.join("deleted").exists() {
                cap.retired_left.store(true, Ordering::Relaxed);
                continue;
            }
            if cap.exclude.matches(&name) {
                log::info!("{name}: excluded by configuration: not captured nor shipped (its staged history is kept)");
                continue;
            }
            if !cap.backing.exists(&name) {
                log::info!("{name}: database file is gone; its staged history is kept");
                let _ = write_atomic(&dir.join("deleted"), b"");
                cap.retired_left.store(true, Ordering::Relaxed);
                continue;
            }
            cap.pending.lock().insert(name, id);
        }
        cap.n_pending
            .store(cap.pending.lock().len(), Ordering::SeqCst);
        Ok(cap)
    }

    /// Every database known, by name.
    pub fn databases(&self) -> Vec<(String, Arc<Db>)> {
        let mut v: Vec<_> = self
            .dbs
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn load(&self, name: &str, id: String) -> io::Result<Arc<Db>> {
        let dir = self.meta_root.join("db").join(&id);
        let stage = DbStage::open(&dir, Access::Write).map_err(io::Error::other)?;
        let db = Arc::new(Db {
            id,
            name: Mutex::new(name.to_string()),
            stage,
            state: Mutex::new(State {
                page_size: 0,
                db_pages: 0,
                checksum: 0,
                txid: 0,
                wal: None,
                rb: Rollback::default(),
                main_fd: None,
                wal_fd: None,
                resnapshot: None,
                awaiting: false,
                shm_fd: None,
                commits_seen: 0,
                last_retry: None,
                parked: None,
                straight: 0,
                base: HashMap::new(),
                blind: None,
                blind_stamp: None,
                at_rest: false,
                ckpt_copied: None,
                may_defer: false,
                deferred: None,
                left_to_ckpt: false,
                early: None,
                ahead_off: None,
            }),
            observed: self.observed.clone(),
            shm_users: AtomicU32::new(0),
            users: self.adopt_users(name),
            backing: self.backing.clone(),
            failing: Mutex::new(None),
            failing_now: self.failing_now.clone(),
            stage_errors: AtomicU64::new(0),
            straight: AtomicU32::new(0),
            retired: AtomicBool::new(false),
        });
        db.users.adopt(&db);
        self.connect(&db);
        db.reconcile(&self.backing)?;
        if db.open_handles() == 0 {
            // Whoever took it in counts its handle afterwards: until then it holds no
            // descriptor.
            db.park();
        }
        Ok(db)
    }

    /// The database `db_rel` if it is known (waiting, if it is being taken into capture
    /// right now, until it is).
    pub fn get(&self, db_rel: &str) -> Option<Arc<Db>> {
        if let Some(db) = self.dbs.read().get(db_rel) {
            return Some(db.clone());
        }
        if self.n_pending.load(Ordering::Acquire) != 0 {
            if let Some(db) = self.load_pending(db_rel) {
                return Some(db);
            }
        }
        if self.n_starting.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.settle(db_rel);
        self.dbs.read().get(db_rel).cloned()
    }

    /// Waits until `db_rel` is not being taken into capture.
    fn settle(&self, db_rel: &str) {
        if self.n_starting.load(Ordering::Acquire) == 0 {
            return;
        }
        let gate = self.starting.lock().get(db_rel).cloned();
        if let Some(g) = gate {
            g.wait();
        }
    }

    /// True if `exclude` keeps `db_rel` out of capture.
    pub fn excluded(&self, db_rel: &str) -> bool {
        self.exclude.matches(db_rel)
    }

    /// The database `db_rel`, starting to capture it if its files show it is one: a database
    /// header in the main file, or a WAL/journal being written next to an existing main file.
    /// The first sighting stages a snapshot (see [`Db::reconcile`]); only the events of this
    /// name wait for it (see the module invariants).
    pub fn get_or_start(
        &self,
        db_rel: &str,
        role: Role,
        first_bytes: Option<&[u8]>,
    ) -> Option<Arc<Db>> {
        if let Some(db) = self.get(db_rel) {
            return Some(db);
        }
        if self.exclude.matches(db_rel) {
            return None;
        }
        let is_db = match role {
            Role::Main => match first_bytes {
                Some(b) => sqlite::is_db_header(b),
                None => self.main_has_header(db_rel),
            },
            Role::Wal | Role::Journal => self
                .backing
                .stat(db_rel)
                .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
                .unwrap_or(false),
            Role::Other => false,
        };
        if !is_db {
            return None;
        }
        let gate = {
            let mut starting = self.starting.lock();
            if let Some(g) = starting.get(db_rel).cloned() {
                // Another thread is taking it in: its result is ours.
                drop(starting);
                g.wait();
                return self.dbs.read().get(db_rel).cloned();
            }
            if let Some(db) = self.dbs.read().get(db_rel) {
                return Some(db.clone());
            }
            let g = Arc::new(Gate::default());
            starting.insert(db_rel.to_string(), g.clone());
            self.n_starting.fetch_add(1, Ordering::AcqRel);
            g
        };
        let id = new_id();
        let dir = self.meta_root.join("db").join(&id);
        let res = fs::create_dir_all(&dir)
            .and_then(|_| write_atomic(&dir.join("name"), db_rel.as_bytes()))
            .and_then(|_| self.load(db_rel, id));
        let out = match res {
            Ok(db) => {
                let mut dbs = self.dbs.write();
                match dbs.get(db_rel) {
                    // A rename put another identity here meanwhile: it stays.
                    Some(other) => {
                        let other = other.clone();
                        drop(dbs);
                        retire(&db, db_rel, "taken in twice");
                        Some(other)
                    }
                    None => {
                        log::info!("{db_rel}: capturing new database (id {})", db.id);
                        dbs.insert(db_rel.to_string(), db.clone());
                        drop(dbs);
                        self.watch_wal_of(db_rel);
                        Some(db)
                    }
                }
            }
            Err(e) => {
                log::error!("{db_rel}: cannot start capturing: {e}");
                None
            }
        };
        self.starting.lock().remove(db_rel);
        self.n_starting.fetch_sub(1, Ordering::AcqRel);
        gate.release();
        out
    }

    fn main_has_header(&self, rel: &str) -> bool {
        let mut b = [0u8; 16];
        matches!(self.backing.open_read(rel), Ok(Some(f)) if read_exact_at(&f, &mut b, 0).unwrap_or(false) && sqlite::is_db_header(&b))
    }

    /// A file was opened: a database file nobody wrote to since the mount started is taken
    /// into capture now (its first sighting), so its first write is already tracked. The
    /// handle keeps what this returns for a file of a captured database until it closes.
    #[must_use]
    pub fn on_open(&self, rel: &str) -> Option<Use> {
        let db = match classify(rel) {
            (Role::Main, db_rel) => match self.get_or_start(db_rel, Role::Main, None) {
                Some(db) => Some(db),
                // Not a database (yet): counted under its name, for the database it may become.
                None if !self.exclude.matches(db_rel) => {
                    return Some(Use::new(self.unborn_users(db_rel)))
                }
                None => None,
            },
            (Role::Wal, db_rel) => {
                self.on_db(rel, |st, db, b, _| st.wal_opened(db, b));
                let db = self.get(db_rel);
                if db.is_some() {
                    self.watch_wal_of(db_rel);
                }
                db
            }
            (Role::Journal, db_rel) => self.get(db_rel),
            (Role::Other, _) => {
                let db = rel.strip_suffix("-shm").and_then(|d| self.get(d));
                if let Some(db) = &db {
                    db.shm_users.fetch_add(1, Ordering::Relaxed);
                    db.state.lock().shm_fd = None;
                }
                db
            }
        };
        db.map(|db| Use::new(db.users.clone()))
    }

    /// Before a write of `data` at `off` to file `rel` is passed through. An error (ENOSPC)
    /// refuses the write: a WAL-mode checkpoint while staging fails (see
    /// [`StagingFailure`]); SQLite leaves the WAL as it is and checkpoints later.
    pub fn before_write(&self, rel: &str, off: u64, data: &[u8]) -> io::Result<()> {
        let (role, db_rel) = classify(rel);
        let db = match role {
            Role::Other => return Ok(()),
            Role::Main if off == 0 => self.get_or_start(db_rel, role, Some(data)),
            Role::Main => self.get(db_rel),
            _ => self.get_or_start(db_rel, role, None),
        };
        if let Some(db) = db {
            let mut watch = false;
            db.guard(|st, db| {
                let r = st.before_write(db, &self.backing, role, off, data);
                watch = std::mem::take(&mut st.rb.arm_watch);
                r
            });
            if watch {
                self.watch_journal_of(db_rel);
            }
            if role == Role::Main && db.refuses_checkpoint() {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        Ok(())
    }

    /// Watches the rollback journal of `db_rel` for writes: a transaction is open on it
    /// (`journal.rs`).
    fn watch_journal_of(&self, db_rel: &str) {
        if let Some(w) = self.watch.get() {
            w.add_journal(&self.backing, db_rel);
        }
    }

    /// After a write to `rel` succeeded.
    pub fn after_write(&self, rel: &str, off: u64, data: &[u8]) {
        self.on_db(rel, |st, db, b, role| {
            st.after_write(db, b, role, off, data)
        });
    }

    /// Runs `f` on the state of the database `rel` belongs to, if it is being captured.
    fn on_db(&self, rel: &str, f: impl FnOnce(&mut State, &Db, &Backing, Role) -> io::Result<()>) {
        let (role, db_rel) = classify(rel);
        if role == Role::Other {
            return;
        }
        if let Some(db) = self.get(db_rel) {
            db.guard(|st, db| f(st, db, &self.backing, role));
        }
    }

    /// Before `rel` is truncated (or extended) to `size`; an error refuses it, as for
    /// [`Capture::before_write`].
    pub fn before_truncate(&self, rel: &str, size: u64) -> io::Result<()> {
        let mut watch = false;
        self.on_db(rel, |st, db, b, role| {
            let r = st.before_truncate(db, b, role, size);
            watch = std::mem::take(&mut st.rb.arm_watch);
            r
        });
        let (role, db_rel) = classify(rel);
        if watch {
            self.watch_journal_of(db_rel);
        }
        if role == Role::Main && self.get(db_rel).is_some_and(|db| db.refuses_checkpoint()) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    /// After `rel` was truncated to `size`.
    pub fn after_truncate(&self, rel: &str, size: u64) {
        self.on_db(rel, |st, db, b, role| st.after_truncate(db, b, role, size));
    }

    /// Before an fsync of `rel` is passed through: a journal-less commit of the database
    /// file, or a WAL sync that may start a checkpoint of a straight database. `app` is the
    /// file being synced. `Some` if it was flushed (`sync_data`) meanwhile, with the outcome:
    /// the sync asked for needs no second flush, and an error must reach the app from here
    /// (the file reports it only once).
    pub fn before_fsync(&self, rel: &str, app: &std::fs::File) -> Option<io::Result<()>> {
        let (role, db_rel) = classify(rel);
        if role == Role::Wal && !self.get(db_rel).is_some_and(|db| db.is_straight()) {
            return None;
        }
        let mut flushed = None;
        self.on_db(rel, |st, db, b, role| {
            st.on_fsync(db, b, role, Some(app), &mut flushed)
        });
        flushed
    }

    /// A handle on `rel` was closed (`shm`: it was counted by [`Capture::on_open`]).
    pub fn on_release(&self, rel: &str) {
        match classify(rel).0 {
            Role::Main => self.on_db(rel, |st, db, b, role| {
                st.on_fsync(db, b, role, None, &mut None)
            }),
            Role::Wal if self.is_observed() => {
                self.on_db(rel, |st, db, b, _| st.catch_up(db, b));
            }
            Role::Other => {
                if let Some(db) = rel.strip_suffix("-shm").and_then(|d| self.get(d)) {
                    let _ = db
                        .shm_users
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                    if self.is_observed() {
                        db.guard(|st, db| st.catch_up(db, &self.backing));
                    }
                    if db.shm_users.load(Ordering::Relaxed) == 0 {
                        // Nobody has the index open: a database left alone holds no
                        // descriptor on it (it is opened again when read).
                        db.state.lock().shm_fd = None;
                    }
                }
            }
            _ => {}
        }
    }

    /// Switches to observed mode: the mount passes WAL and `-shm` files straight through to
    /// the backing files (kernel passthrough), so their writes never reach sqlfs. Commits are
    /// then taken from the WAL up to what SQLite has published in its shared-memory index,
    /// whenever the kernel reports a WAL write (a watcher thread), before any write to a
    /// database file (a checkpoint), and when WAL files are truncated, unlinked or closed.
    pub fn observe(self: &Arc<Self>) -> io::Result<()> {
        if self.watch.get().is_some() {
            return Ok(());
        }
        let w = Arc::new(watch::Watch::new()?);
        self.watch
            .set(w.clone())
            .map_err(|_| io::Error::other("watcher already running"))?;
        self.observed.store(true, Ordering::SeqCst);
        for (name, _) in self.databases() {
            self.watch_wal_of(&name);
        }
        let cap = self.clone();
        std::thread::Builder::new()
            .name("sqlfs-watch".into())
            .spawn(move || {
                crate::backing::background_priority();
                w.run(&cap)
            })?;
        Ok(())
    }

    /// A handle wrote `rel` without sqlfs seeing the writes (kernel passthrough of a plain
    /// file) and was fsynced or closed: a file that now shows a database header is captured
    /// from here (first sighting: a snapshot); a database capture already knows (it became
    /// one while the handle was open) is staged as a snapshot if its files moved past the
    /// staged stream.
    pub fn written_past(&self, rel: &str) {
        let (role, db_rel) = classify(rel);
        if role != Role::Main {
            return;
        }
        let Some(db) = self.get(db_rel) else {
            if self.get_or_start(db_rel, Role::Main, None).is_some() {
                self.watch_wal_of(db_rel);
            }
            return;
        };
        db.guard(|st, db| {
            if self.is_observed() {
                st.catch_up(db, &self.backing)?;
            }
            let now = st.full_checksum(db, &self.backing)?;
            if now == (st.checksum, st.page_size, st.db_pages) {
                return Ok(());
            }
            let pos = st.current_walpos();
            st.resnapshot_now(
                db,
                &self.backing,
                "written by a handle that bypassed sqlfs",
                pos,
            )
        });
    }

    /// Leaves observed mode (passthrough could not be set up after all).
    pub fn unobserve(&self) {
        self.observed.store(false, Ordering::SeqCst);
    }

    pub fn is_observed(&self) -> bool {
        self.observed.load(Ordering::Relaxed)
    }

    /// Observed mode: watches the WAL of `db_rel` for writes, if it has one (see `watch`).
    fn watch_wal_of(&self, db_rel: &str) {
        if let Some(w) = self.watch.get() {
            w.add_wal(&self.backing, db_rel);
        }
    }

    /// Observed mode: stages what SQLite has published in the WAL of `db_rel` since the last
    /// call, and says how many transactions that was and whether frames follow the published
    /// end (look again soon).
    pub fn catch_up(&self, db_rel: &str) -> CaughtUp {
        let mut out = CaughtUp::default();
        let Some(db) = self.get_or_start(db_rel, Role::Wal, None) else {
            return out;
        };
        db.guard(|st, db| {
            let before = st.txid;
            st.open_wal(db, &self.backing)?;
            st.may_defer = true;
            let r = st.catch_up(db, &self.backing);
            st.may_defer = false;
            r?;
            if !st.in_wal_mode() && !st.rb.is_clean() {
                // A journal's report (it ended that watch: one-shot): watched again before the
                // look, as WALs are, then the transaction may have ended unseen (`journal.rs`).
                self.watch_journal_of(db_rel);
                st.journal_check(db, &self.backing)?;
            }
            if st.awaiting && db.is_straight() {
                // A large transaction being written is staged as it goes (`ahead.rs`): by
                // the watcher only, never on a request's thread.
                st.stage_ahead(db);
            }
            out = CaughtUp {
                awaiting: st.awaiting,
                staged: st.txid.saturating_sub(before),
            };
            Ok(())
        });
        out
    }

    /// Runs `f` with the staged stream of `db` current (caught up in observed mode) and no
    /// capture happening on it meanwhile.
    pub fn frozen<T>(&self, db: &Db, f: impl FnOnce() -> T) -> T {
        if self.is_observed() {
            db.guard(|st, db| st.catch_up(db, &self.backing));
        }
        if db.failing.lock().is_some() {
            // What is read should be as staged as it can be: try the snapshot now.
            db.guard(|st, db| {
                st.last_retry = None;
                st.retry(db, &self.backing)
            });
        }
        let _g = db.state.lock();
        f()
    }

    /// While staging fails: retries each failing database's snapshot (the staging thread
    /// calls this, so recovery needs no commit to arrive).
    pub fn retry_failed(&self) {
        if self.failing_now.load(Ordering::Relaxed) == 0 {
            return;
        }
        for (_, db) in self.databases() {
            if db.failing.lock().is_some() {
                db.guard(|st, db| st.retry(db, &self.backing));
            }
        }
    }

    /// Makes every database's staging durable and records a clean-shutdown fingerprint for
    /// each whose files hold nothing more than its staged stream. Returns false if any
    /// database's last state could not be staged (or its staging not synced): it gets no
    /// fingerprint, so the next mount compares its files with the stream and stages what is
    /// missing (invariant 5).
    pub fn shutdown(&self) -> bool {
        let mut shut = self.shut.lock();
        if let Some(all) = *shut {
            return all;
        }
        let mut all = true;
        for (name, db) in self.databases() {
            if self.is_observed() {
                db.guard(|st, db| st.catch_up(db, &self.backing));
            }
            db.guard(|st, db| st.flush_journalless(db, &self.backing));
            if db.failing.lock().is_some() {
                // One last try, due or not.
                db.guard(|st, db| {
                    st.last_retry = None;
                    st.retry(db, &self.backing)
                });
            }
            if let Some(f) = db.staging_failure() {
                log::error!(
                    "{name}: stopping while commits are not staged ({} commit(s) since {}: {}); no clean-shutdown mark: the next mount compares the files with the staged stream and stages what is missing",
                    f.waiting,
                    crate::time::fmt_time(
                        f.since
                            .duration_since(std::time::SystemTime::UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos() as u64)
                    ),
                    f.error
                );
                all = false;
                if let Err(e) = db.stage.sync() {
                    log::error!("{name}: cannot sync staging: {e}");
                }
                continue;
            }
            if let Err(e) = db.stage.sync() {
                log::error!("{name}: cannot sync staging: {e}");
                all = false;
                continue;
            }
            let st = db.state.lock();
            if st.resnapshot.is_some() || st.blind.is_some() || st.straight > 0 {
                // The stream lacks what the files hold, or straight handles may still write
                // them: no fingerprint may vouch for it.
                continue;
            }
            let fp = fingerprint(&self.backing, &name, st.txid);
            if let Err(e) = write_atomic(&db.stage.dir().join("clean"), fp.as_bytes()) {
                log::error!("{name}: cannot record clean shutdown: {e}");
            }
        }
        *shut = Some(all);
        all
    }

    /// Removes the staging of databases deleted (or replaced) longer than `keep` ago.
    /// Costs nothing while no database was retired (no scan of `.sqlfs/db/`).
    pub fn expire_retired(&self, keep: std::time::Duration) {
        if !self.retired_left.swap(false, Ordering::Relaxed) {
            return;
        }
        let Ok(rd) = fs::read_dir(self.meta_root.join("db")) else {
            self.retired_left.store(true, Ordering::Relaxed);
            return;
        };
        for e in rd.flatten() {
            let dir = e.path();
            let age = fs::metadata(dir.join("deleted"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a <= keep) {
                // Not due yet: look again at a later call.
                self.retired_left.store(true, Ordering::Relaxed);
            }
            if age.is_some_and(|a| a > keep) {
                let name = fs::read_to_string(dir.join("name")).unwrap_or_default();
                match fs::remove_dir_all(&dir) {
                    Ok(()) => log::info!(
                        "{name}: removed the staged history of a database deleted over {}h ago",
                        keep.as_secs() / 3600
                    ),
                    Err(e) => {
                        log::warn!("{name}: cannot remove old staging {}: {e}", dir.display())
                    }
                }
            }
        }
    }
}

/// A database's file is gone (deleted or replaced): its staging is synced and marked, and kept
/// as history.
fn retire(db: &Db, name: &str, why: &str) {
    db.retired.store(true, Ordering::Relaxed);
    db.end_failure();
    if let Err(e) = db
        .stage
        .sync()
        .map_err(io::Error::other)
        .and_then(|_| write_atomic(&db.stage.dir().join("deleted"), b""))
    {
        log::error!("{name}: cannot mark staging as retired: {e}");
    }
    log::info!("{name}: database {why}; its staged history is kept");
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let x = u64::from_ne_bytes(b) ^ now_ns();
    format!("{x:016x}")
}

/// Size and mtime of a database's files: equal fingerprints mean nothing changed them.
fn fingerprint(b: &Backing, name: &str, txid: u64) -> String {
    let f = |rel: &str| match b.stat(rel) {
        Ok(st) => format!("{}:{}.{}", st.st_size, st.st_mtime, st.st_mtime_nsec),
        Err(_) => "-".into(),
    };
    format!(
        "txid={txid} main={} wal={} journal={}\n",
        f(name),
        f(&format!("{name}-wal")),
        f(&format!("{name}-journal"))
    )
}

impl Db {
    pub fn name(&self) -> String {
        self.name.lock().clone()
    }

    /// Observed mode: WAL writes bypass sqlfs (see [`Capture::observe`]).
    fn observed(&self) -> bool {
        self.observed.load(Ordering::Relaxed)
    }

    /// Why this database's commits are not being staged, if they are not.
    pub fn staging_failure(&self) -> Option<StagingFailure> {
        self.failing.lock().clone()
    }

    /// A sync of the staging log failed: the database is failing (what it staged may not be
    /// durable, so the next record is a snapshot).
    pub fn sync_failed(&self, e: crate::stage::StageError) {
        let e = io::Error::other(format!("cannot sync staging: {e}"));
        self.guard(|_, _| Err(e));
    }

    /// Failed capture attempts since the mount started.
    pub fn stage_errors(&self) -> u64 {
        self.stage_errors.load(Ordering::Relaxed)
    }

    /// True while a write of the database file must be refused: in WAL mode such a write is a
    /// checkpoint, and while staging fails it would destroy WAL frames that are not staged.
    fn refuses_checkpoint(&self) -> bool {
        if self.failing.lock().is_none() {
            return false;
        }
        let st = self.state.lock();
        st.in_wal_mode() && st.resnapshot.is_some()
    }
}

/// What a catch-up of one database found.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaughtUp {
    /// Valid frames follow the published end: a commit is probably about to be published.
    pub awaiting: bool,
    /// Transactions staged.
    pub staged: u64,
}
