//! Capture: turns the file operations the mount passes through into committed SQLite
//! transactions, in commit order, appended to each database's staging log.
//!
//! The filesystem layer reports events (`before_write`, `after_write`, truncate, unlink, rename,
//! fsync) for files whose names make them part of a database: `X` (the database), `X-wal`,
//! `X-journal`. All SQLite knowledge lives here.
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

mod hot;
mod rollback;
mod wal;
mod watch;

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};

use crate::backing::{Backing, META_DIR};
use crate::sqlite::{self, page_crc, WalIndexHeader, FRAME_HEADER, WAL_INDEX_HEADER};
use crate::stage::{write_atomic, Access, DbStage, Kind, RecordHeader, WalPos};
pub use hot::rollback_hot_journals;
use rollback::Rollback;
pub use wal::read_exact_at;
use wal::{WalTrack, WalTxn};

/// What a file is to capture, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Main,
    Wal,
    Journal,
    /// `-shm` and anything else: passed through, never looked at.
    Other,
}

/// Splits a relative path into its role and the database path it belongs to.
pub fn classify(rel: &str) -> (Role, &str) {
    if rel == META_DIR || rel.starts_with(".sqlfs/") {
        return (Role::Other, rel);
    }
    if let Some(db) = rel.strip_suffix("-wal") {
        (Role::Wal, db)
    } else if let Some(db) = rel.strip_suffix("-journal") {
        (Role::Journal, db)
    } else if rel.ends_with("-shm") {
        (Role::Other, rel)
    } else {
        (Role::Main, rel)
    }
}

/// The database whose WAL index (`-shm` file) `rel` is, if it is one.
pub fn wal_index_of(rel: &str) -> Option<&str> {
    rel.strip_suffix("-shm")
}

/// The database a WAL or rollback journal belongs to, by its name as bytes (for names that
/// are not UTF-8, which capture never knows).
pub fn journal_db_of(rel: &[u8]) -> Option<&[u8]> {
    [b"-wal".as_slice(), b"-journal"]
        .iter()
        .find_map(|s| rel.strip_suffix(*s))
}

/// True if a write of `data` at `offset` to `rel` (a file capture does not know) shows a
/// database being written: a database header, or a write to a WAL or rollback journal.
pub fn shows_db(rel: &[u8], offset: u64, data: &[u8]) -> bool {
    (offset == 0 && sqlite::is_db_header(data)) || journal_db_of(rel).is_some()
}

use crate::stage::now_ns;

/// All databases of one mount.
pub struct Capture {
    backing: Arc<Backing>,
    meta_root: PathBuf,
    dbs: RwLock<HashMap<String, Arc<Db>>>,
    /// Observed mode (see [`Capture::observe`]): WAL writes bypass sqlfs.
    observed: Arc<AtomicBool>,
    watch: OnceLock<Arc<watch::Watch>>,
    /// What [`Capture::shutdown`] found, once it ran (the unmount and the main thread both
    /// call it).
    shut: Mutex<Option<bool>>,
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
    /// Set while commits cannot be staged (see [`StagingFailure`]); read by status and
    /// metrics without taking the state lock.
    failing: Mutex<Option<StagingFailure>>,
    /// Capture attempts that failed since the mount started (each failed write of records
    /// or snapshot counts once).
    stage_errors: AtomicU64,
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
}

impl Capture {
    /// Opens the capture state of a backing directory: loads every known database and
    /// reconciles it with the files (see [`Db::load`]).
    pub fn open(backing: Arc<Backing>) -> io::Result<Capture> {
        let meta_root = backing.meta_path();
        fs::create_dir_all(meta_root.join("db"))?;
        let cap = Capture {
            backing,
            meta_root,
            dbs: RwLock::new(HashMap::new()),
            observed: Arc::new(AtomicBool::new(false)),
            watch: OnceLock::new(),
            shut: Mutex::new(None),
        };
        for e in fs::read_dir(cap.meta_root.join("db"))? {
            let e = e?;
            let id = e.file_name().to_string_lossy().into_owned();
            let dir = e.path();
            let Ok(name) = fs::read_to_string(dir.join("name")) else {
                continue;
            };
            if dir.join("deleted").exists() {
                continue;
            }
            if !cap.backing.exists(&name) {
                log::info!("{name}: database file is gone; its staged history is kept");
                let _ = write_atomic(&dir.join("deleted"), b"");
                continue;
            }
            match cap.load(&name, id) {
                Ok(db) => {
                    cap.dbs.write().insert(name, db);
                }
                Err(e) => log::error!("{name}: cannot load staging state: {e}"),
            }
        }
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
            }),
            observed: self.observed.clone(),
            shm_users: AtomicU32::new(0),
            failing: Mutex::new(None),
            stage_errors: AtomicU64::new(0),
        });
        db.reconcile(&self.backing)?;
        Ok(db)
    }

    /// The database `db_rel` if it is known.
    pub fn get(&self, db_rel: &str) -> Option<Arc<Db>> {
        self.dbs.read().get(db_rel).cloned()
    }

    /// The database `db_rel`, starting to capture it if its files show it is one: a database
    /// header in the main file, or a WAL/journal being written next to an existing main file.
    pub fn get_or_start(
        &self,
        db_rel: &str,
        role: Role,
        first_bytes: Option<&[u8]>,
    ) -> Option<Arc<Db>> {
        if let Some(db) = self.get(db_rel) {
            return Some(db);
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
        let mut dbs = self.dbs.write();
        if let Some(db) = dbs.get(db_rel) {
            return Some(db.clone());
        }
        let id = new_id();
        let dir = self.meta_root.join("db").join(&id);
        let res = fs::create_dir_all(&dir)
            .and_then(|_| write_atomic(&dir.join("name"), db_rel.as_bytes()))
            .and_then(|_| self.load(db_rel, id));
        match res {
            Ok(db) => {
                log::info!("{db_rel}: capturing new database (id {})", db.id);
                dbs.insert(db_rel.to_string(), db.clone());
                self.watch_dir_of(db_rel);
                Some(db)
            }
            Err(e) => {
                log::error!("{db_rel}: cannot start capturing: {e}");
                None
            }
        }
    }

    fn main_has_header(&self, rel: &str) -> bool {
        let mut b = [0u8; 16];
        matches!(self.backing.open_read(rel), Ok(Some(f)) if read_exact_at(&f, &mut b, 0).unwrap_or(false) && sqlite::is_db_header(&b))
    }

    /// A file was opened: a database file nobody wrote to since the mount started is taken
    /// into capture now (its first sighting), so its first write is already tracked.
    pub fn on_open(&self, rel: &str) {
        match classify(rel) {
            (Role::Main, db_rel) => {
                self.get_or_start(db_rel, Role::Main, None);
            }
            (Role::Wal, _) => self.on_db(rel, |st, db, b, _| st.open_wal(db, b)),
            (Role::Other, _) => {
                if let Some(db) = rel.strip_suffix("-shm").and_then(|d| self.get(d)) {
                    db.shm_users.fetch_add(1, Ordering::Relaxed);
                    db.state.lock().shm_fd = None;
                }
            }
            _ => {}
        }
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
            db.guard(|st, db| st.before_write(db, &self.backing, role, off, data));
            if role == Role::Main && db.refuses_checkpoint() {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        Ok(())
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
        self.on_db(rel, |st, db, b, role| st.before_truncate(db, b, role, size));
        let (role, db_rel) = classify(rel);
        if role == Role::Main && self.get(db_rel).is_some_and(|db| db.refuses_checkpoint()) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    /// After `rel` was truncated to `size`.
    pub fn after_truncate(&self, rel: &str, size: u64) {
        self.on_db(rel, |st, db, b, role| st.after_truncate(db, b, role, size));
    }

    /// Before an fsync of `rel` is passed through.
    pub fn before_fsync(&self, rel: &str) {
        self.on_db(rel, |st, db, b, role| st.on_fsync(db, b, role));
    }

    /// A handle on `rel` was closed (`shm`: it was counted by [`Capture::on_open`]).
    pub fn on_release(&self, rel: &str) {
        match classify(rel).0 {
            Role::Main => self.on_db(rel, |st, db, b, role| st.on_fsync(db, b, role)),
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
        w.add_dir(&self.backing, "");
        for (name, _) in self.databases() {
            self.watch_dir_of(&name);
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

    /// Leaves observed mode (passthrough could not be set up after all).
    pub fn unobserve(&self) {
        self.observed.store(false, Ordering::SeqCst);
    }

    pub fn is_observed(&self) -> bool {
        self.observed.load(Ordering::Relaxed)
    }

    fn watch_dir_of(&self, db_rel: &str) {
        if let Some(w) = self.watch.get() {
            let dir = db_rel.rsplit_once('/').map_or("", |(d, _)| d);
            w.add_dir(&self.backing, dir);
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
            st.catch_up(db, &self.backing)?;
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

    /// Before `rel` is unlinked.
    pub fn before_unlink(&self, rel: &str) {
        self.on_db(rel, |st, db, b, role| st.before_unlink(db, b, role));
    }

    /// After `rel` was unlinked.
    pub fn after_unlink(&self, rel: &str) {
        let (role, db_rel) = classify(rel);
        let Some(db) = self.get(db_rel) else { return };
        db.guard(|st, db| st.after_unlink(db, &self.backing, role));
        if role == Role::Main {
            self.dbs.write().remove(db_rel);
            retire(&db, db_rel, "deleted");
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
            self.watch_dir_of(dbt);
        }
    }

    /// While staging fails: retries each failing database's snapshot (the staging thread
    /// calls this, so recovery needs no commit to arrive).
    pub fn retry_failed(&self) {
        for (_, db) in self.databases() {
            if db.failing.lock().is_some() {
                db.guard(|st, db| st.retry(db, &self.backing));
            }
        }
    }

    /// `a` and `b` were swapped (`renameat2(RENAME_EXCHANGE)`): like a rename each way. Two
    /// database files swap their identities; any other pair is reopened, and a database file
    /// swapped with a file of another kind loses its identity.
    pub fn after_exchange(&self, a: &str, b: &str) {
        let (ra, dba) = classify(a);
        let (rb, dbb) = classify(b);
        if ra == Role::Main && rb == Role::Main {
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
                self.watch_dir_of(db);
            }
        }
    }

    /// A file capture could not follow by name (its name was not UTF-8) now stands at `to`.
    pub fn arrived(&self, to: &str) {
        self.replaced(to, "replaced by a rename");
        let (rt, dbt) = classify(to);
        if rt == Role::Main {
            self.get_or_start(dbt, Role::Main, None);
            self.watch_dir_of(dbt);
        }
    }

    /// What stood at `rel` is gone: a database file's identity ends, another of its files is
    /// reopened.
    fn replaced(&self, rel: &str, why: &str) {
        let (r, db_rel) = classify(rel);
        if r == Role::Main {
            let old = self.dbs.write().remove(db_rel);
            if let Some(old) = old {
                retire(&old, db_rel, why);
            }
        } else if let Some(db) = self.get(db_rel) {
            db.guard(|st, db| st.reopen(db, &self.backing, r));
        }
    }

    /// Database `db` (out of the table) is now named `to`.
    fn moved(&self, db: Arc<Db>, from: &str, to: &str) {
        *db.name.lock() = to.to_string();
        if let Err(e) = write_atomic(&db.stage.dir().join("name"), to.as_bytes()) {
            log::error!("{to}: cannot record the new name in staging: {e}");
        }
        db.guard(|st, db| st.reopen(db, &self.backing, Role::Main));
        log::info!("{from}: renamed to {to}");
        self.dbs.write().insert(to.to_string(), db);
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
            if st.resnapshot.is_some() {
                // The stream lacks what the files hold: no fingerprint may vouch for it.
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
    pub fn expire_retired(&self, keep: std::time::Duration) {
        let Ok(rd) = fs::read_dir(self.meta_root.join("db")) else {
            return;
        };
        for e in rd.flatten() {
            let dir = e.path();
            let age = fs::metadata(dir.join("deleted"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
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

    /// Syncs every database's staging log that has unsynced records.
    /// A failed sync puts the database in the failing state (logged once, shown by status):
    /// what it staged may not be durable, so the next record is a snapshot.
    pub fn sync_all(&self) {
        for (_, db) in self.databases() {
            if db.stage.is_dirty() {
                if let Err(e) = db.stage.sync() {
                    let e = io::Error::other(format!("cannot sync staging: {e}"));
                    db.guard(|_, _| Err(e));
                }
            }
        }
    }
}

/// A database's file is gone (deleted or replaced): its staging is synced and marked, and kept
/// as history.
fn retire(db: &Db, name: &str, why: &str) {
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

    /// Runs `f` on the state, then writes out the records it appended (they reach the staging
    /// file together, see [`DbStage::append`]), so no record is left in memory once the
    /// request or catch-up that made it is done. Capture errors never fail the app's I/O: they
    /// are logged, the state goes back to what the staging log holds (records that could not
    /// be written are gone, and their TXIDs are given again: no gap), and the next commit
    /// becomes a full snapshot so the stream stays exact (see [`StagingFailure`]).
    fn guard(&self, f: impl FnOnce(&mut State, &Db) -> io::Result<()>) {
        let mut st = self.state.lock();
        let seen = st.commits_seen;
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut st, self)));
        let flushed = self.stage.flush();
        let err = match (res, flushed) {
            (Ok(Ok(())), Ok(())) => {
                self.note_success(&st, st.commits_seen - seen);
                return;
            }
            (Ok(Err(e)), _) => e.to_string(),
            (Err(_), _) => "internal error (panic) in capture".to_string(),
            (Ok(Ok(())), Err(e)) => e.to_string(),
        };
        let lost = st.commits_seen - seen;
        self.failed(&mut st, err, lost);
    }

    /// A capture attempt failed: back to the last record on file, the next record a snapshot
    /// chaining from it. Logged at the first failure of an episode, not at every retry.
    fn failed(&self, st: &mut State, err: String, lost: u64) {
        self.stage_errors.fetch_add(1, Ordering::Relaxed);
        let mut failing = self.failing.lock();
        match failing.as_mut() {
            None => {
                log::error!(
                    "{}: capture failed, commits are not being staged: {err}; the next transaction will be staged as a full snapshot (retried until it succeeds)",
                    self.name()
                );
                *failing = Some(StagingFailure {
                    error: err.clone(),
                    since: SystemTime::now(),
                    waiting: lost,
                });
            }
            Some(f) => {
                log::debug!("{}: staging still fails: {err}", self.name());
                f.error = err.clone();
                f.waiting += lost;
            }
        }
        drop(failing);
        if let Err(e) = st.rewind_to_staged(self) {
            log::error!("{}: cannot read the staging log's base: {e}", self.name());
        }
        // Keep the first reason: it is the one the log explains.
        if st.resnapshot.is_none() {
            st.resnapshot = Some(format!("an earlier capture failed: {err}"));
        }
        st.main_fd = None;
        st.wal_fd = None;
        st.shm_fd = None;
    }

    /// A capture attempt succeeded: if staging was failing and the snapshot that makes the
    /// stream whole is now on file, it has recovered.
    fn note_success(&self, st: &State, seen: u64) {
        let mut failing = self.failing.lock();
        let Some(f) = failing.as_mut() else {
            return;
        };
        if st.resnapshot.is_some() {
            f.waiting += seen;
            return;
        }
        log::warn!(
            "{}: staging works again: TXID {} is a full snapshot of the database, after {} commit(s) could not be staged individually since {}",
            self.name(),
            st.txid,
            f.waiting + seen,
            crate::time::fmt_time(
                f.since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            )
        );
        *failing = None;
    }

    /// Why this database's commits are not being staged, if they are not.
    pub fn staging_failure(&self) -> Option<StagingFailure> {
        self.failing.lock().clone()
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

    /// Brings the state in line with the staging log and the files after a (re)start:
    /// commits that reached the WAL but not staging (sqlfs killed in between) are staged; if
    /// the files changed in a way the stream cannot explain, a snapshot is staged.
    fn reconcile(&self, b: &Backing) -> io::Result<()> {
        let name = self.name();
        let mut st = self.state.lock();
        st.rewind_to_staged(self)?;
        let txid = st.txid;
        let walpos = self.stage.last().map(|h| h.wal).unwrap_or_default();
        let clean_path = self.stage.dir().join("clean");
        let unchanged = fs::read_to_string(&clean_path).ok().as_deref()
            == Some(fingerprint(b, &name, txid).as_str());
        let _ = fs::remove_file(&clean_path);
        let jrel = format!("{name}-journal");
        let mut jh = [0u8; 8];
        if matches!(b.open_read(&jrel), Ok(Some(f)) if read_exact_at(&f, &mut jh, 0).unwrap_or(false))
            && jh == sqlite::JOURNAL_MAGIC
        {
            st.rb.journal_live = true;
        }

        st.reopen(self, b, Role::Main)?;
        st.reopen(self, b, Role::Wal)?;
        if txid == 0 {
            st.resnapshot = Some("first sighting of this database".into());
        }
        if let Some((why, max_txid)) = self.stage.damage() {
            // The damaged segment's transactions are lost to the stream; TXIDs go on after them.
            st.txid = st.txid.max(max_txid);
            st.resnapshot = Some(why);
        }
        let State {
            wal,
            wal_fd,
            resnapshot,
            ..
        } = &mut *st;
        if let (Some(w), Some(fd)) = (wal.as_mut(), wal_fd.as_ref()) {
            if walpos.end != 0 && walpos.salt == (w.hdr.salt1, w.hdr.salt2) {
                // Re-enter the WAL where the last staged commit left it.
                if !w.seek_to(fd, walpos.end, walpos.cksum)? {
                    resnapshot.get_or_insert_with(|| {
                        "the WAL no longer matches the staged stream".into()
                    });
                }
            } else {
                // A WAL generation the stream never saw: its commits are compared below.
                for t in w.advance(fd, None, u64::MAX)? {
                    w.publish_reading(fd, &t)?;
                }
            }
        }
        if st.resnapshot.is_none() && txid > 0 && !unchanged {
            // Continuity is proven before anything is derived from it: the files as of the
            // last staged commit (the WAL re-entered there) must give the staged checksum.
            // Commits after it are then staged from the WAL on a state known to be right; if
            // the database file took frames that were never staged (a checkpoint while
            // staging failed), deriving them incrementally would stage wrong checksums.
            let actual = st.full_checksum(self, b)?;
            if actual != (st.checksum, st.page_size, st.db_pages) {
                st.resnapshot = Some(format!(
                    "the files changed while sqlfs was not running (staged checksum {:016x}, files {:016x})",
                    st.checksum, actual.0
                ));
            } else {
                log::info!(
                    "{name}: continuity with the staged stream verified by checksum (TXID {})",
                    st.txid
                );
            }
        }
        // A full disk at start does not stop the mount: the database is captured as failing,
        // and the snapshot is retried until it is staged.
        let seen = st.commits_seen;
        let stage_rest = |st: &mut State| -> io::Result<()> {
            if st.resnapshot.is_none() && txid > 0 {
                st.capture_wal(self, b)?;
            }
            if let Some(why) = st.resnapshot.clone() {
                let pos = st.current_walpos();
                st.snapshot_with(self, b, &why, pos)?;
            }
            self.stage.flush().map_err(io::Error::other)
        };
        if let Err(e) = stage_rest(&mut st) {
            let lost = st.commits_seen - seen;
            self.failed(&mut st, e.to_string(), lost);
        }
        Ok(())
    }
}

/// Appends the record `h` whose pages are `pages`, read one at a time by `read`.
fn append_pages(
    db: &Db,
    h: &RecordHeader,
    pages: &[u32],
    read: &mut dyn FnMut(u32, &mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; h.page_size as usize];
    db.stage
        .append(h, |emit| {
            for &p in pages {
                read(p, &mut buf)?;
                emit(p, &buf)?;
            }
            Ok(())
        })
        .map_err(io::Error::other)
}

/// The page of WAL frame `f`: kept from the write, else read back from the WAL.
fn frame_page(wal: &File, f: &wal::WalFrame, buf: &mut [u8]) -> io::Result<()> {
    match &f.page {
        Some(p) => buf.copy_from_slice(p),
        None => {
            if !read_exact_at(wal, buf, f.off + FRAME_HEADER)? {
                return Err(io::Error::other("WAL frame vanished while staging it"));
            }
        }
    }
    Ok(())
}

impl State {
    fn reopen(&mut self, db: &Db, b: &Backing, role: Role) -> io::Result<()> {
        let name = db.name();
        match role {
            Role::Main => self.main_fd = b.open_read(&name)?,
            Role::Wal => {
                self.wal_fd = b.open_read(&format!("{name}-wal"))?;
                self.wal = match &self.wal_fd {
                    Some(f) => WalTrack::read_header(f)?.map(WalTrack::new),
                    None => None,
                };
            }
            _ => {}
        }
        Ok(())
    }

    fn main(&mut self, db: &Db, b: &Backing) -> io::Result<&File> {
        if self.main_fd.is_none() {
            self.main_fd = b.open_read(&db.name())?;
        }
        self.main_fd
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "database file vanished"))
    }

    /// The committed content of page `pgno` as the staged stream has it now: its newest
    /// committed WAL frame, else the database file (zeros past its end or if it is missing).
    fn read_page(&self, pgno: u32, ps: u32, buf: &mut [u8]) -> io::Result<()> {
        if let (Some(w), Some(fd)) = (&self.wal, &self.wal_fd) {
            if let Some(&(off, _)) = w.index.get(&pgno) {
                if read_exact_at(fd, buf, off + FRAME_HEADER)? {
                    return Ok(());
                }
            }
        }
        buf.fill(0);
        let Some(f) = self.main_fd.as_ref() else {
            return Ok(());
        };
        let off = (pgno as u64 - 1) * ps as u64;
        let mut got = 0;
        while got < buf.len() {
            match std::os::unix::fs::FileExt::read_at(f, &mut buf[got..], off + got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        Ok(())
    }

    /// Stages the durable copy before data that only lives in the files is destroyed.
    fn barrier(&self, db: &Db) -> io::Result<()> {
        if db.stage.is_dirty() {
            db.stage.sync().map_err(io::Error::other)?;
        }
        Ok(())
    }

    fn in_wal_mode(&self) -> bool {
        self.wal.is_some()
    }

    fn before_write(
        &mut self,
        db: &Db,
        b: &Backing,
        role: Role,
        off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        self.main(db, b)?;
        match role {
            Role::Wal => {
                if off < sqlite::WAL_HEADER {
                    // A new WAL generation starts: the old frames will be overwritten.
                    self.capture_wal(db, b)?;
                    self.settle_generation(db)?;
                    self.barrier(db)?;
                } else if self.wal.as_ref().is_some_and(|w| off < w.committed_end)
                    && !self.wal_holds(off, data)?
                {
                    self.rewind_wal(db, off)?;
                }
            }
            Role::Main => {
                if db.observed() {
                    // In WAL mode this is a checkpoint: it may only copy back what is staged.
                    self.catch_up(db, b)?;
                }
                if self.in_wal_mode() {
                    // A checkpoint copying committed frames back: it may only go ahead once
                    // everything is staged (see `Db::refuses_checkpoint`).
                    self.retry(db, b)?;
                    self.barrier(db)?;
                } else {
                    if self.rb.is_clean() {
                        self.barrier(db)?;
                    }
                    let (ps, pages) = (self.page_size, self.db_pages);
                    let mut buf = vec![0u8; ps as usize];
                    let need: Vec<u32> = self.rb.note_write(off, data.len() as u64, ps, pages);
                    for pgno in need {
                        self.read_page(pgno, ps, &mut buf)?;
                        self.rb.old_crc.insert(pgno, page_crc(pgno, &buf));
                    }
                }
            }
            Role::Journal | Role::Other => {}
        }
        Ok(())
    }

    fn after_write(
        &mut self,
        db: &Db,
        b: &Backing,
        role: Role,
        off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        match role {
            Role::Wal => {
                if off == 0 {
                    // A new WAL generation (first header or restart after a checkpoint that
                    // backfilled every frame): the database file now holds all committed pages.
                    self.reopen(db, b, Role::Wal)?;
                }
                if let Some(w) = self.wal.as_mut() {
                    w.note_write(off, data);
                }
                self.capture_wal_hint(db, b, Some((off, data)))?;
            }
            Role::Journal => {
                if off == 0 && data.len() >= 8 {
                    if data[..8] == sqlite::JOURNAL_MAGIC {
                        self.rb.journal_live = true;
                    } else if data[..8].iter().all(|&x| x == 0) {
                        log::debug!(
                            "{}: journal header zeroed ({} bytes written at 0)",
                            db.name(),
                            data.len()
                        );
                        self.commit_rollback(db, b)?;
                    }
                }
            }
            Role::Main | Role::Other => {}
        }
        Ok(())
    }

    fn before_truncate(&mut self, db: &Db, b: &Backing, role: Role, size: u64) -> io::Result<()> {
        self.main(db, b)?;
        if role == Role::Main && db.observed() {
            self.catch_up(db, b)?;
        }
        match role {
            Role::Wal => {
                self.capture_wal(db, b)?;
                if size < sqlite::WAL_HEADER
                    || self.wal.as_ref().is_some_and(|w| size < w.committed_end)
                {
                    self.settle_generation(db)?;
                }
                self.barrier(db)
            }
            Role::Main if !self.in_wal_mode() => {
                if self.rb.is_clean() {
                    self.barrier(db)?;
                }
                let (ps, pages) = (self.page_size, self.db_pages);
                if ps > 0 {
                    let first_gone = size.div_ceil(ps as u64) as u32 + 1;
                    let mut buf = vec![0u8; ps as usize];
                    for pgno in first_gone..=pages {
                        if !self.rb.old_crc.contains_key(&pgno) {
                            self.read_page(pgno, ps, &mut buf)?;
                            self.rb.old_crc.insert(pgno, page_crc(pgno, &buf));
                        }
                    }
                }
                self.rb.truncated = true;
                Ok(())
            }
            Role::Main => {
                self.retry(db, b)?;
                self.barrier(db)
            }
            _ => Ok(()),
        }
    }

    fn after_truncate(&mut self, db: &Db, b: &Backing, role: Role, size: u64) -> io::Result<()> {
        match role {
            Role::Wal => {
                if size < sqlite::WAL_HEADER
                    || self.wal.as_ref().is_some_and(|w| size < w.committed_end)
                {
                    self.wal = None;
                    self.reopen(db, b, Role::Wal)?;
                }
                Ok(())
            }
            Role::Journal if size == 0 => {
                log::debug!("{}: journal truncated", db.name());
                self.commit_rollback(db, b)
            }
            _ => Ok(()),
        }
    }

    fn before_unlink(&mut self, db: &Db, b: &Backing, role: Role) -> io::Result<()> {
        match role {
            Role::Wal => {
                self.capture_wal(db, b)?;
                self.settle_generation(db)?;
                self.barrier(db)
            }
            Role::Main => self.flush_journalless(db, b),
            _ => Ok(()),
        }
    }

    fn after_unlink(&mut self, db: &Db, b: &Backing, role: Role) -> io::Result<()> {
        match role {
            Role::Wal => {
                self.wal = None;
                self.wal_fd = None;
                Ok(())
            }
            Role::Journal => self.commit_rollback(db, b),
            Role::Main => {
                self.main_fd = None;
                Ok(())
            }
            Role::Other => Ok(()),
        }
    }

    fn on_fsync(&mut self, db: &Db, b: &Backing, role: Role) -> io::Result<()> {
        if role == Role::Main {
            self.flush_journalless(db, b)?;
        }
        Ok(())
    }

    /// Writes made to the database file with no journal and no WAL (journal_mode=OFF or
    /// MEMORY) are committed when the app syncs or closes the file.
    fn flush_journalless(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        if !self.in_wal_mode() && !self.rb.journal_live && !self.rb.is_clean() {
            log::debug!("{}: journal-less writes committed at sync/close", db.name());
            self.commit_rollback(db, b)?;
        }
        Ok(())
    }

    /// True if the WAL already holds `data` at `off`. A writer may rewrite committed bytes
    /// unchanged (a frame identical to one a dead writer left there, or the second half of a
    /// page split at a sync point); that is not a rewind.
    fn wal_holds(&self, off: u64, data: &[u8]) -> io::Result<bool> {
        let Some(fd) = self.wal_fd.as_ref() else {
            return Ok(false);
        };
        let mut cur = vec![0u8; data.len()];
        Ok(read_exact_at(fd, &mut cur, off)? && cur == data)
    }

    /// The WAL generation ends (a new header, truncation, unlink). By then the database file
    /// holds every commit readers know of: a restart or truncation follows a complete
    /// checkpoint, and a header rewrite with no restart means nothing was published. A page
    /// whose committed version in the index differs from the database file belongs to a
    /// commit whose writer died before publishing it: stage a transaction that brings the
    /// stream back to the file. Costs one read of each page in the index, once per generation.
    fn settle_generation(&mut self, db: &Db) -> io::Result<()> {
        let Some(w) = self.wal.as_ref() else {
            return Ok(());
        };
        if w.index.is_empty() || self.resnapshot.is_some() {
            // Nothing staged from this generation, or the next commit is a snapshot anyway.
            return Ok(());
        }
        let ps = w.hdr.page_size;
        let (fps, new_pages) = self.main_size()?;
        if fps != ps {
            self.resnapshot =
                Some("the page size in the database file differs from its WAL".into());
            return Ok(());
        }
        let old_pages = self.db_pages;
        let mut buf = vec![0u8; ps as usize];
        let mut checksum = self.checksum;
        let mut pages = BTreeSet::new();
        let main_crc = |p: u32, buf: &mut Vec<u8>| -> io::Result<u64> {
            buf.fill(0);
            read_exact_at(
                self.main_fd.as_ref().expect("main open"),
                buf,
                (p as u64 - 1) * ps as u64,
            )?;
            Ok(page_crc(p, buf))
        };
        for (&p, &(_, c)) in &w.index {
            if p > old_pages {
                continue;
            }
            if p > new_pages {
                checksum ^= c;
                continue;
            }
            let m = main_crc(p, &mut buf)?;
            if m != c {
                checksum ^= c ^ m;
                pages.insert(p);
            }
        }
        if pages.is_empty() && new_pages == old_pages {
            return Ok(());
        }
        // Pages cut off that were not in the index, and pages that appear.
        for p in new_pages + 1..=old_pages {
            if !w.index.contains_key(&p) {
                checksum ^= main_crc(p, &mut buf)?;
            }
        }
        for p in old_pages + 1..=new_pages {
            checksum ^= main_crc(p, &mut buf)?;
            pages.insert(p);
        }
        log::warn!(
            "{}: the WAL ends holding a commit no reader saw (its writer died before publishing it); staging TXID {} to bring the stream back to the database file",
            db.name(),
            self.txid + 1
        );
        self.wal = None;
        let pages: Vec<u32> = pages.into_iter().collect();
        let h = self.next_header(
            Kind::Txn,
            ps,
            new_pages,
            checksum,
            pages.len() as u32,
            WalPos::default(),
        );
        append_pages(db, &h, &pages, &mut |p, buf| self.read_page(p, ps, buf))?;
        self.advance_to(&h);
        Ok(())
    }

    /// A writer is overwriting frames sqlfs took as committed: the process that wrote them
    /// died after writing its commit frame but before publishing it in the WAL index, so
    /// SQLite never counted that transaction and the next writer appends over it. Stage a
    /// transaction that reverts the pages those frames changed, so the stream again equals
    /// what every reader sees, and continue from the real end of the WAL.
    fn rewind_wal(&mut self, db: &Db, off: u64) -> io::Result<()> {
        let (Some(w), Some(fd)) = (self.wal.as_ref(), self.wal_fd.as_ref()) else {
            return Ok(());
        };
        let fsz = w.hdr.frame_size();
        let start = off - (off - sqlite::WAL_HEADER) % fsz;
        // Pages the unpublished frames touched.
        let mut touched = BTreeSet::new();
        let mut fh = [0u8; 24];
        let mut o = start;
        while o < w.committed_end && read_exact_at(fd, &mut fh, o)? {
            touched.insert(u32::from_be_bytes([fh[0], fh[1], fh[2], fh[3]]));
            o += fsz;
        }
        // The WAL as readers know it: every commit before `start`.
        let mut nw = WalTrack::new(w.hdr);
        while nw.committed_end < start {
            match nw.advance_one(fd, None, u64::MAX)? {
                Some(t) if t.end <= start => nw.publish_reading(fd, &t)?,
                _ => break,
            }
        }
        if self.resnapshot.is_some() {
            // The next commit is a snapshot anyway: just follow the WAL as readers know it.
            self.wal = Some(nw);
            return Ok(());
        }
        log::warn!(
            "{}: a writer died after writing a commit it never published (WAL offset {start}); staging TXID {} to revert what TXID {} and before took from it",
            db.name(),
            self.txid + 1,
            self.txid
        );
        if nw.committed_end != start {
            self.wal = Some(nw);
            self.resnapshot =
                Some("the WAL was rewound to a point that is not a commit boundary".into());
            return Ok(());
        }
        let ps = w.hdr.page_size;
        let old_pages = self.db_pages;
        let new_pages = match nw.db_pages {
            Some(n) => n,
            None => self.main_size()?.1,
        };
        // Out: the current versions of the touched pages and of pages cut off (old index).
        let mut checksum = self.checksum;
        let mut buf = vec![0u8; ps as usize];
        let out: BTreeSet<u32> = touched
            .iter()
            .copied()
            .filter(|&p| p <= old_pages)
            .chain(new_pages + 1..=old_pages)
            .collect();
        for p in out {
            checksum ^= self.committed_crc(p, ps, &mut buf)?;
        }
        // In: their versions as readers know them (rewound index).
        self.wal = Some(nw);
        let mut pages: BTreeSet<u32> = touched.into_iter().filter(|&p| p <= new_pages).collect();
        pages.extend(old_pages + 1..=new_pages);
        for &p in &pages {
            self.read_page(p, ps, &mut buf)?;
            checksum ^= page_crc(p, &buf);
        }
        let pages: Vec<u32> = pages.into_iter().collect();
        let walpos = self.current_walpos();
        let h = self.next_header(
            Kind::Txn,
            ps,
            new_pages,
            checksum,
            pages.len() as u32,
            walpos,
        );
        append_pages(db, &h, &pages, &mut |p, buf| self.read_page(p, ps, buf))?;
        self.advance_to(&h);
        Ok(())
    }

    /// Stages every transaction completed in the WAL since the last call: in observed mode
    /// what SQLite has published, else every commit its writes completed.
    fn capture_wal(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        if db.observed() {
            self.catch_up(db, b)
        } else {
            self.capture_wal_hint(db, b, None)
        }
    }

    /// A handle on the WAL is opened: keep a descriptor on it (in observed mode no write
    /// to it will come by to open one).
    fn open_wal(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        if self.wal_fd.is_none() {
            self.wal_fd = b.open_read(&format!("{}-wal", db.name()))?;
        }
        Ok(())
    }

    /// Observed mode: follows the WAL as it is now. A header that differs from the tracked
    /// one means a new generation began unseen; that happens only after a checkpoint copied
    /// every committed frame into the database file, and that checkpoint's writes came
    /// through sqlfs, which staged those frames first. Then every commit up to what SQLite
    /// has published is staged. Published frames are final within a generation, so nothing
    /// staged here is ever rewound.
    fn catch_up(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        self.awaiting = false;
        if self.wal.is_some() {
            // Descriptors are dropped after a failed capture; no write will reopen this one.
            self.open_wal(db, b)?;
        }
        if self.wal_fd.is_none() {
            return Ok(());
        }
        let index = self.read_index(db, b)?;
        if let (Some(w), Some(Some(h))) = (self.wal.as_ref(), index) {
            // Nothing published since the last call: the cheap answer for every page a
            // checkpoint writes.
            if (h.salt1, h.salt2) == (w.hdr.salt1, w.hdr.salt2)
                && w.end_of(h.max_frame) == w.committed_end
            {
                return self.note_awaiting();
            }
        }
        let fd = self.wal_fd.as_ref().expect("WAL open");
        let Some(hdr) = WalTrack::read_header(fd)? else {
            return Ok(());
        };
        match &self.wal {
            Some(w) if w.hdr == hdr => {}
            Some(w) => {
                log::debug!(
                    "{}: a new WAL generation began (salts {:08x}/{:08x} after {:08x}/{:08x}, staged up to offset {})",
                    db.name(),
                    hdr.salt1,
                    hdr.salt2,
                    w.hdr.salt1,
                    w.hdr.salt2,
                    w.committed_end
                );
                self.main(db, b)?;
                self.settle_generation(db)?;
                self.barrier(db)?;
                self.wal = Some(WalTrack::new(hdr));
            }
            None => self.wal = Some(WalTrack::new(hdr)),
        }
        let w = self.wal.as_mut().expect("WAL tracked");
        // Published: up to the index's last frame, if it describes this generation (else
        // nothing yet); without readers of the index, every complete commit.
        let limit = match index {
            None => u64::MAX,
            Some(Some(h)) if (h.salt1, h.salt2) == (w.hdr.salt1, w.hdr.salt2) => {
                w.end_of(h.max_frame)
            }
            Some(_) => w.committed_end,
        };
        w.forget_pending();
        log::trace!(
            "{}: catch-up to WAL offset {limit} from {}",
            db.name(),
            w.committed_end
        );
        self.main(db, b)?;
        self.capture_wal_limit(db, b, None, limit)?;
        self.note_awaiting()
    }

    /// Records whether frames follow the last staged commit (see `awaiting`).
    fn note_awaiting(&mut self) -> io::Result<()> {
        if let (Some(w), Some(fd)) = (self.wal.as_ref(), self.wal_fd.as_ref()) {
            self.awaiting = w.frame_follows(fd)?;
        }
        Ok(())
    }

    /// SQLite's WAL index header from the `-shm` file: `None` when nobody has that file
    /// open (exclusive locking mode keeps the index in the process: a single connection,
    /// so nobody can overwrite what it committed and every complete commit counts);
    /// `Some(None)` while it cannot be read consistently (not initialised, being updated).
    fn read_index(&mut self, db: &Db, b: &Backing) -> io::Result<Option<Option<WalIndexHeader>>> {
        if db.shm_users.load(Ordering::Relaxed) == 0 {
            return Ok(None);
        }
        if self.shm_fd.is_none() {
            self.shm_fd = b.open_read(&format!("{}-shm", db.name()))?;
        }
        let Some(f) = self.shm_fd.as_ref() else {
            return Ok(Some(None));
        };
        let mut buf = [0u8; WAL_INDEX_HEADER];
        // The two copies differ only while a writer updates them: try again shortly.
        for _ in 0..8 {
            if !read_exact_at(f, &mut buf, 0)? {
                break;
            }
            if let Some(h) = WalIndexHeader::parse(&buf) {
                return Ok(Some(Some(h)));
            }
            std::thread::yield_now();
        }
        Ok(Some(None))
    }

    /// Like `capture_wal`; `hint` is the write just made, whose bytes spare a read-back.
    fn capture_wal_hint(
        &mut self,
        db: &Db,
        b: &Backing,
        hint: Option<(u64, &[u8])>,
    ) -> io::Result<()> {
        self.capture_wal_limit(db, b, hint, u64::MAX)
    }

    /// Stages the commits completed in the WAL that end at or before byte `limit`.
    fn capture_wal_limit(
        &mut self,
        db: &Db,
        b: &Backing,
        hint: Option<(u64, &[u8])>,
        limit: u64,
    ) -> io::Result<()> {
        if self.wal.is_some() {
            // Descriptors are dropped after a failed capture; without one, commits written
            // through would go unseen until the WAL is opened again.
            self.open_wal(db, b)?;
        }
        let (Some(w), Some(fd)) = (self.wal.as_mut(), self.wal_fd.as_ref()) else {
            return Ok(());
        };
        let txns = w.advance(fd, hint, limit)?;
        w.kick(fd);
        for (i, t) in txns.iter().enumerate() {
            if let Err(e) = self.commit_wal(db, b, t) {
                // The tracker is past these commits already: keep its page index true to the
                // WAL, so the snapshot staged next (see `guard`) reads their pages.
                if let (Some(w), Some(fd)) = (self.wal.as_mut(), self.wal_fd.as_ref()) {
                    for t in &txns[i..] {
                        w.publish_reading(fd, t)?;
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn commit_wal(&mut self, db: &Db, b: &Backing, t: &WalTxn) -> io::Result<()> {
        self.main(db, b)?;
        let w = self.wal.as_ref().expect("WAL tracked");
        let ps = w.hdr.page_size;
        let walpos = WalPos {
            salt: (w.hdr.salt1, w.hdr.salt2),
            cksum: t.cksum,
            end: t.end,
        };
        if self.is_padding(t, ps)?
            || self.resnapshot.is_some()
            || (self.page_size != ps && self.db_pages != 0)
        {
            let padding = self.resnapshot.is_none() && self.page_size == ps;
            let (w, fd) = (
                self.wal.as_mut().expect("WAL tracked"),
                self.wal_fd.as_ref().expect("WAL open"),
            );
            w.publish_reading(fd, t)?;
            if padding {
                return Ok(());
            }
            self.commits_seen += 1;
            let why = self
                .resnapshot
                .clone()
                .unwrap_or_else(|| "page size changed".into());
            return self.resnapshot_now(db, b, &why, walpos);
        }
        self.commits_seen += 1;
        let (pages, checksum, crcs) = self.wal_txn_pages(t, ps)?;
        let h = self.next_header(
            Kind::Txn,
            ps,
            t.db_pages,
            checksum,
            pages.len() as u32,
            walpos,
        );
        let newest: HashMap<u32, &wal::WalFrame> = t.frames.iter().map(|f| (f.pgno, f)).collect();
        let fd = self.wal_fd.as_ref().expect("WAL open");
        append_pages(db, &h, &pages, &mut |p, buf| match newest.get(&p) {
            Some(f) => frame_page(fd, f, buf),
            None => self.read_page(p, ps, buf),
        })?;
        self.advance_to(&h);
        self.wal.as_mut().expect("WAL tracked").publish(t, &crcs);
        Ok(())
    }

    /// Padding: a copy of the previous commit frame, written to fill a sector. Same page,
    /// same bytes, same size: the state does not change, so no TXID is spent on it.
    fn is_padding(&self, t: &WalTxn, ps: u32) -> io::Result<bool> {
        let (Some(w), Some(fd)) = (&self.wal, &self.wal_fd) else {
            return Ok(false);
        };
        let Some((lp, loff)) = w.last_commit else {
            return Ok(false);
        };
        if t.frames.len() != 1
            || t.db_pages != self.db_pages
            || self.resnapshot.is_some()
            || t.frames[0].pgno != lp
        {
            return Ok(false);
        }
        let mut c = Vec::new();
        let f = &t.frames[0];
        let new = match &f.page {
            Some(p) => &p[..],
            None => {
                c.resize(ps as usize, 0);
                read_exact_at(fd, &mut c, f.off + FRAME_HEADER)?;
                &c[..]
            }
        };
        // The common case, a new version of the same page, is told apart by its CRC without
        // reading the previous commit frame back.
        if let Some(&(off, crc)) = w.index.get(&lp) {
            if off == loff && crc != page_crc(lp, new) {
                return Ok(false);
            }
        }
        let mut a = vec![0u8; ps as usize];
        Ok(read_exact_at(fd, &mut a, loff + FRAME_HEADER)? && a == new)
    }

    /// CRC of the committed version of page `pgno` (before the transaction being staged).
    fn committed_crc(&self, pgno: u32, ps: u32, buf: &mut [u8]) -> io::Result<u64> {
        if let Some(&(_, c)) = self.wal.as_ref().and_then(|w| w.index.get(&pgno)) {
            return Ok(c);
        }
        self.read_page(pgno, ps, buf)?;
        Ok(page_crc(pgno, buf))
    }

    /// The pages a WAL transaction leaves (newest frame per page, within the new size, plus
    /// pages that come into existence without a frame, like the lock page), the rolling
    /// checksum after it, and the CRC of each frame's page (0 for superseded frames). Must run
    /// before the transaction is published to the index, so old versions are still found.
    /// Pages are read one at a time: memory does not grow with the transaction.
    fn wal_txn_pages(&self, t: &WalTxn, ps: u32) -> io::Result<(Vec<u32>, u64, Vec<u64>)> {
        let fd = self.wal_fd.as_ref().expect("WAL open");
        let mut newest: HashMap<u32, usize> = HashMap::new();
        for (i, f) in t.frames.iter().enumerate() {
            newest.insert(f.pgno, i);
        }
        let old_pages = self.db_pages;
        let mut pages: BTreeSet<u32> = newest
            .keys()
            .copied()
            .filter(|&p| p <= t.db_pages)
            .collect();
        pages.extend((old_pages + 1..=t.db_pages).filter(|p| !newest.contains_key(p)));
        let mut checksum = self.checksum;
        let mut buf = vec![0u8; ps as usize];
        // Out: the old versions of changed pages and of pages cut off the end.
        let gone = t.db_pages + 1..=old_pages;
        for p in pages
            .iter()
            .copied()
            .filter(|&p| p <= old_pages)
            .chain(gone)
        {
            checksum ^= self.committed_crc(p, ps, &mut buf)?;
        }
        // In: the new versions.
        let mut crcs = vec![0u64; t.frames.len()];
        for &p in &pages {
            match newest.get(&p) {
                Some(&i) => frame_page(fd, &t.frames[i], &mut buf)?,
                None => self.read_page(p, ps, &mut buf)?,
            }
            let c = page_crc(p, &buf);
            if let Some(&i) = newest.get(&p) {
                crcs[i] = c;
            }
            checksum ^= c;
        }
        Ok((pages.into_iter().collect(), checksum, crcs))
    }

    /// A rollback-journal transaction ended (journal deleted, truncated or zeroed, or a
    /// journal-less write was synced): stage the pages it changed.
    fn commit_rollback(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        self.rb.journal_live = false;
        if self.rb.is_clean() {
            return Ok(());
        }
        let rb = std::mem::take(&mut self.rb);
        self.commits_seen += 1;
        self.main(db, b)?;
        let f = self.main_fd.as_ref().expect("opened above");
        let size = f.metadata()?.len();
        let mut hdr = [0u8; 100];
        let ps = if read_exact_at(f, &mut hdr, 0)? {
            sqlite::db_page_size(&hdr)
        } else {
            None
        };
        let Some(ps) = ps else {
            if size == 0 {
                // Emptied to a zero-page database.
                let h = self.next_header(
                    Kind::Txn,
                    self.page_size.max(512),
                    0,
                    0,
                    0,
                    WalPos::default(),
                );
                append_pages(db, &h, &[], &mut |_, _| Ok(()))?;
                self.advance_to(&h);
                return Ok(());
            }
            self.resnapshot =
                Some("the database file has no valid header after a transaction".into());
            return Ok(());
        };
        let new_pages = sqlite::db_pages(&hdr, ps, size);
        if self.resnapshot.is_some() || (self.page_size != ps && self.db_pages != 0) {
            let why = self
                .resnapshot
                .clone()
                .unwrap_or_else(|| "page size changed".into());
            return self.resnapshot_now(db, b, &why, WalPos::default());
        }
        let old_pages = self.db_pages;
        let mut pages: BTreeSet<u32> = rb
            .dirty_pages(ps)
            .into_iter()
            .filter(|&p| p <= new_pages)
            .collect();
        pages.extend(old_pages + 1..=new_pages);
        let mut checksum = self.checksum;
        let gone = new_pages + 1..=old_pages;
        for p in pages
            .iter()
            .copied()
            .filter(|&p| p <= old_pages)
            .chain(gone)
        {
            match rb.old_crc.get(&p) {
                Some(c) => checksum ^= c,
                None => {
                    return self.snapshot_with(
                        db,
                        b,
                        &format!("page {p} changed without its old version being seen"),
                        WalPos::default(),
                    )
                }
            }
        }
        if pages.is_empty() && new_pages == old_pages {
            // Only bytes past the end of the database changed (the file shrinking to the
            // size a commit already recorded): the database itself did not.
            return Ok(());
        }
        let mut buf = vec![0u8; ps as usize];
        let read = |p: u32, buf: &mut [u8]| -> io::Result<()> {
            buf.fill(0);
            read_exact_at(f, buf, (p as u64 - 1) * ps as u64).map(|_| ())
        };
        for &p in &pages {
            read(p, &mut buf)?;
            checksum ^= page_crc(p, &buf);
        }
        let pages: Vec<u32> = pages.into_iter().collect();
        let h = self.next_header(
            Kind::Txn,
            ps,
            new_pages,
            checksum,
            pages.len() as u32,
            WalPos::default(),
        );
        append_pages(db, &h, &pages, &mut |p, buf| read(p, buf))?;
        self.advance_to(&h);
        Ok(())
    }

    /// The header of the next record.
    fn next_header(
        &self,
        kind: Kind,
        ps: u32,
        db_pages: u32,
        checksum: u64,
        npages: u32,
        wal: WalPos,
    ) -> RecordHeader {
        RecordHeader {
            kind,
            txid: self.txid + 1,
            time_ns: now_ns(),
            page_size: ps,
            db_pages,
            checksum_before: self.checksum,
            checksum_after: checksum,
            npages,
            wal,
            coded: None,
        }
    }

    /// The state after the last record the staging log holds (its base if it holds none).
    fn rewind_to_staged(&mut self, db: &Db) -> io::Result<()> {
        match db.stage.last() {
            Some(h) => self.advance_to(&h),
            None => {
                let base = db.stage.base_meta().map_err(io::Error::other)?;
                self.txid = base.txid;
                self.checksum = base.checksum;
                self.page_size = base.page_size;
                self.db_pages = base.db_pages;
            }
        }
        Ok(())
    }

    /// The state after a staged record.
    fn advance_to(&mut self, h: &RecordHeader) {
        self.txid = h.txid;
        self.checksum = h.checksum_after;
        self.page_size = h.page_size;
        self.db_pages = h.db_pages;
    }

    fn current_walpos(&self) -> WalPos {
        self.wal
            .as_ref()
            .map(|w| WalPos {
                salt: (w.hdr.salt1, w.hdr.salt2),
                cksum: w.cksum,
                end: w.committed_end,
            })
            .unwrap_or_default()
    }

    /// Stages the whole current database (main file overlaid with committed WAL frames) as
    /// the next TXID, and says why.
    fn snapshot_with(&mut self, db: &Db, b: &Backing, why: &str, wal: WalPos) -> io::Result<()> {
        if db.failing.lock().is_some() {
            // Retried until it is staged: logged when it is (see `Db::note_success`).
            log::debug!(
                "{}: trying to stage a full snapshot as TXID {}: {why}",
                db.name(),
                self.txid + 1
            );
        } else if self.txid == 0 {
            log::info!(
                "{}: staging the initial snapshot as TXID 1 ({why})",
                db.name()
            );
        } else {
            log::warn!(
                "{}: staging a full snapshot as TXID {}: {why}",
                db.name(),
                self.txid + 1
            );
        }
        self.main(db, b)?;
        if self.wal.is_some() {
            // The committed frames are read from the WAL (its descriptor may have been
            // dropped by a failed capture).
            self.open_wal(db, b)?;
        }
        let (checksum, ps, pages) = self.full_checksum(db, b)?;
        let h = self.next_header(Kind::Snapshot, ps, pages, checksum, pages, wal);
        let all: Vec<u32> = (1..=pages).collect();
        // Pages are streamed one at a time: memory does not grow with the database.
        append_pages(db, &h, &all, &mut |p, buf| self.read_page(p, ps, buf))?;
        self.advance_to(&h);
        self.resnapshot = None;
        self.rb = Rollback::default();
        Ok(())
    }

    /// Stages the snapshot the state asks for, unless staging is failing and one was tried less
    /// than [`RETRY_GAP`] ago: then it stays asked for, and the commit waits in the files
    /// (the WAL, whose checkpoints are refused meanwhile, or the database file).
    fn resnapshot_now(&mut self, db: &Db, b: &Backing, why: &str, wal: WalPos) -> io::Result<()> {
        if db.failing.lock().is_some() {
            if self.last_retry.is_some_and(|t| t.elapsed() < RETRY_GAP) {
                self.resnapshot.get_or_insert_with(|| why.to_string());
                return Ok(());
            }
            self.last_retry = Some(Instant::now());
        }
        self.snapshot_with(db, b, why, wal)
    }

    /// While staging fails: takes what the WAL published (observed mode) and tries the
    /// snapshot again if it is due and the files are between transactions (never in the
    /// middle of a rollback-journal transaction).
    fn retry(&mut self, db: &Db, b: &Backing) -> io::Result<()> {
        if db.failing.lock().is_none() {
            return Ok(());
        }
        if db.observed() {
            self.catch_up(db, b)?;
        }
        let Some(why) = self.resnapshot.clone() else {
            return Ok(());
        };
        if !self.in_wal_mode() && (self.rb.journal_live || !self.rb.is_clean()) {
            return Ok(());
        }
        let pos = self.current_walpos();
        self.resnapshot_now(db, b, &why, pos)
    }

    /// Page size and size in pages of the database as its files hold it now: the last
    /// committed WAL transaction's size, else the database file's.
    fn logical_size(&self) -> io::Result<(u32, u32)> {
        if let Some(x) = self
            .wal
            .as_ref()
            .and_then(|w| w.db_pages.map(|p| (w.hdr.page_size, p)))
        {
            return Ok(x);
        }
        self.main_size()
    }

    /// Page size and size in pages of the database file alone.
    fn main_size(&self) -> io::Result<(u32, u32)> {
        let Some(f) = self.main_fd.as_ref() else {
            return Ok((self.page_size.max(512), 0));
        };
        let size = f.metadata()?.len();
        let mut hdr = [0u8; 100];
        Ok(
            match read_exact_at(f, &mut hdr, 0)?
                .then(|| sqlite::db_page_size(&hdr))
                .flatten()
            {
                Some(ps) => (ps, sqlite::db_pages(&hdr, ps, size)),
                None => (self.page_size.max(512), 0),
            },
        )
    }

    /// Checksum, page size and size in pages of the database as its files hold it now.
    fn full_checksum(&mut self, db: &Db, b: &Backing) -> io::Result<(u64, u32, u32)> {
        self.main(db, b)?;
        let (ps, pages) = self.logical_size()?;
        let mut buf = vec![0u8; ps as usize];
        let mut c = 0;
        for p in 1..=pages {
            self.read_page(p, ps, &mut buf)?;
            c ^= page_crc(p, &buf);
        }
        Ok((c, ps, pages))
    }
}

/// Writes the database `name` as its files hold it now (main file overlaid with the committed
/// frames of its WAL) into `out`. Returns (page size, pages). Reads only; touches no state.
pub fn live_image(b: &Backing, name: &str, out: &File) -> io::Result<(u32, u32)> {
    let mut st = State {
        page_size: 0,
        db_pages: 0,
        checksum: 0,
        txid: 0,
        wal: None,
        rb: Rollback::default(),
        main_fd: b.open_read(name)?,
        wal_fd: b.open_read(&format!("{name}-wal"))?,
        resnapshot: None,
        awaiting: false,
        shm_fd: None,
        commits_seen: 0,
        last_retry: None,
    };
    if let Some(fd) = st.wal_fd.as_ref() {
        st.wal = WalTrack::read_header(fd)?.map(WalTrack::new);
        if let Some(w) = st.wal.as_mut() {
            for t in w.advance(fd, None, u64::MAX)? {
                w.publish_reading(fd, &t)?;
            }
        }
    }
    let (ps, pages) = st.logical_size()?;
    out.set_len(0)?;
    let mut buf = vec![0u8; ps as usize];
    for p in 1..=pages {
        st.read_page(p, ps, &mut buf)?;
        std::os::unix::fs::FileExt::write_all_at(out, &buf, (p as u64 - 1) * ps as u64)?;
    }
    Ok((ps, pages))
}

/// What a catch-up of one database found.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaughtUp {
    /// Valid frames follow the published end: a commit is probably about to be published.
    pub awaiting: bool,
    /// Transactions staged.
    pub staged: u64,
}
