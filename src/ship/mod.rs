//! Shipping: each replica's shipper moves each database's staged transactions to it.
//!
//! When records reach a database's staging log, the database falls due (`sched`): at once
//! unless it already shipped at its rate of one object per sync interval (with one interval
//! of slack), else when the rate allows. A bounded pool of workers per replica
//! (`--replica-concurrency`) takes due databases one at a time each; a worker builds one
//! level-0 segment object (docs/FORMAT.md) of every transaction the replica does not have
//! yet and stores it under a key named by its first TXID. A database the replica has never
//! seen, or whose needed transactions were folded away locally, first gets a snapshot object
//! of the staged base.
//!
//! After shipping, the same worker maintains the database on that replica (docs/FORMAT.md):
//! a snapshot every `snapshot_interval`, compaction of each level's runs into the next level
//! at that level's interval (from local copies of the objects it stored, so encrypted
//! replicas compact without a key on this machine), and retention. All of it is decided
//! from an in-memory catalog loaded with one listing when a database first ships in this
//! process, so a database with no new work costs no requests.
//!
//! Invariants:
//! - The replica's chain for a database is gap-free: a segment starts right after the
//!   previous one (or right after a snapshot), and the shipped position only advances after
//!   the object is stored.
//! - Storing with the fence and reading back keys that exist: see `store`; claims of
//!   names: see `claim`.
//! - Nothing to ship costs zero requests, and an idle database no work on any timer: only
//!   staged records, maintenance that falls due, a retry or a waiter schedule it.
//! - Errors (a store that is down, a full disk) are retried with backoff, per database so
//!   one failing database never delays the others; the staged transactions stay until
//!   shipped (folding never passes the slowest replica unless
//!   staging grows past its hard limit, which is logged).

mod chain;
mod claim;
mod ledger;
mod maintain;
mod pack;
mod policy;
mod sched;
mod spare;
mod store;

pub use ledger::seed as seed_position;
pub use policy::{db_policy, Policy};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parking_lot::{Condvar, Mutex};

use crate::capture::{Capture, Db};
use crate::catalog::{l0_key, name_key, snapshot_key};
use crate::config::DbConf;
use crate::crypt::{ReadKey, Sealer};
use crate::replica::ReplicaClient;
use crate::segment::{ObjKind, ObjectWriter};
use crate::stage::now_ns;

use chain::chain_break;
use ledger::Ledger;
use maintain::Maint;
use sched::{Sched, Why};
use store::Want;

/// This mount as the writer of the names it ships (`owner`).
#[derive(Clone, Debug)]
pub struct Writer {
    /// The data directory's writer id (`owner::writer_id`).
    pub id: String,
    pub host: String,
    pub data_dir: String,
    /// The data directory's metadata directory (`.sqlfs/`).
    pub meta_dir: PathBuf,
    /// `--takeover`: replace another writer's claim of a name at this mount's first check of
    /// it, instead of being fenced.
    pub takeover: bool,
}

/// The marker in a database's staging that makes the shipper of replica `rid` take the
/// database's name over at its first check (left by `--restore-if-missing`).
pub fn takeover_marker(stage_dir: &Path, rid: &str) -> PathBuf {
    stage_dir.join(format!("takeover.{rid}"))
}

pub struct Shipper {
    client: Box<dyn ReplicaClient>,
    sealer: Option<Arc<Sealer>>,
    /// The key that decrypts this replica's objects, if one is configured (headers of keys
    /// that already exist are read with it).
    key: ReadKey,
    writer: Writer,
    /// Per database id: the name whose claim was last found this mount's, when, and its MD5.
    claims: Mutex<HashMap<String, claim::Seen>>,
    /// The last listing of this replica's claims (rechecks answered from one listing).
    claim_list: Mutex<claim::ClaimList>,
    policy: Policy,
    /// Per-database overrides by name (configuration file).
    rules: Arc<BTreeMap<String, DbConf>>,
    maint: Mutex<HashMap<String, Maint>>,
    /// Objects and bytes stored by this process.
    totals: Mutex<(u64, u64)>,
    /// Short stable id of the replica, for local position files.
    rid: String,
    capture: Arc<Capture>,
    /// Per database id: its shipping ledger here (`ledger`), loaded on first use.
    /// (Keyed by [`ledger_key`]: one is kept for every database that shipped.)
    ledgers: Mutex<HashMap<u64, Arc<Mutex<Ledger>>>>,
    named: Mutex<HashSet<String>>,
    /// Databases whose shipping stopped because another writer owns them here, by id: why.
    fenced: Mutex<HashMap<String, String>>,
    /// Per database id: the oldest TXID this replica lacks and its commit time.
    missing: Mutex<HashMap<String, (u64, u64)>>,
    /// Databases whose last attempt failed, by id.
    failing: Mutex<BTreeMap<String, Failing>>,
    /// Which database is due when, for the workers.
    sched: Sched,
    /// Worker threads: the bound on requests in flight to this replica.
    workers: usize,
    /// Signalled whenever a position advances or a shipment fails.
    progress: (Mutex<u64>, Condvar),
}

/// A database whose last shipment (or maintenance) on a replica failed.
struct Failing {
    msg: String,
    /// The current backoff: doubles with each failure, up to a minute.
    backoff: Duration,
    /// No new attempt before this (unless forced).
    #[allow(dead_code)]
    retry_at: Instant,
}

/// Largest object whose bytes stay in the outbox file after its shipment (overwritten by the
/// next one).
const OUTBOX_KEEP: u64 = 64 << 10;

/// A fresh local file an object is built in (read back for its checksum).
fn outbox(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// The key of `db`'s ledger in memory: its id (16 hex digits) as a number, else a hash of it.
fn ledger_key(db: &Db) -> u64 {
    u64::from_str_radix(&db.id, 16).unwrap_or_else(|_| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        db.id.hash(&mut h);
        h.finish()
    })
}

/// The short stable id of replica `describe` that names its local position files.
pub fn replica_id(describe: &str) -> String {
    short_hash(describe)
}

fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:08x}", h >> 32)
}

impl Shipper {
    pub fn new(
        client: Box<dyn ReplicaClient>,
        capture: Arc<Capture>,
        (sealer, key): (Option<Arc<Sealer>>, ReadKey),
        writer: Writer,
        policy: Policy,
        rules: Arc<BTreeMap<String, DbConf>>,
        (interval, workers): (Duration, usize),
    ) -> Arc<Shipper> {
        let rid = short_hash(&client.describe());
        Arc::new(Shipper {
            client,
            sealer,
            key,
            writer,
            claims: Mutex::new(HashMap::new()),
            claim_list: Mutex::new(Default::default()),
            policy,
            rules,
            maint: Mutex::new(HashMap::new()),
            totals: Mutex::new((0, 0)),
            rid,
            capture,
            ledgers: Mutex::new(HashMap::new()),
            named: Mutex::new(HashSet::new()),
            fenced: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            failing: Mutex::new(BTreeMap::new()),
            sched: Sched::new(interval),
            workers,
            progress: (Mutex::new(0), Condvar::new()),
        })
    }

    pub fn describe(&self) -> String {
        self.client.describe()
    }

    /// Starts shipping: `workers` threads (at most that many requests in flight to this
    /// replica) take databases as they fall due (`sched`). Every database is looked at once
    /// now (what a previous mount staged, the claims); after that only capture's news of
    /// staged records, maintenance that falls due and retries schedule a database.
    pub fn start(self: &Arc<Self>) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
        let me = Arc::downgrade(self);
        self.capture.on_staged(Box::new(move |db| {
            if let Some(me) = me.upgrade() {
                me.sched.wake(db, Why::Staged);
            }
        }));
        for (_, db) in self.capture.databases() {
            self.sched.wake(&db, Why::Now);
        }
        let mut threads = Vec::new();
        for i in 0..self.workers.max(1) {
            let me = self.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sqlfs-ship-{i}"))
                    .spawn(move || {
                        crate::backing::background_priority();
                        while let Some(db) = me.sched.next() {
                            me.run(&db);
                        }
                    })?,
            );
        }
        Ok(threads)
    }

    /// Unmount: every database gets one last look (what is staged is shipped, backoff or
    /// not), then the workers stop; join the threads [`Shipper::start`] returned.
    pub fn finish(&self) {
        for (_, db) in self.capture.databases() {
            self.sched.wake(&db, Why::Now);
        }
        self.sched.drain();
        for (_, db) in self.capture.databases() {
            if self.ledgers.lock().contains_key(&ledger_key(&db)) {
                if let Err(e) = self.settle(&db) {
                    log::error!("{e:#} in {}", self.describe());
                }
            }
        }
    }

    /// One worker's turn at `db`: ships what is new, maintains, and schedules what follows
    /// (the backoff after a failure, the next maintenance that falls due).
    fn run(&self, db: &Arc<Db>) {
        let name = db.name();
        // Only a database the mount still serves under its name is shipped.
        let live = self.capture.get(&name).is_some_and(|d| Arc::ptr_eq(&d, db));
        if !live || !self.replicates(&name) {
            self.sched.done(db, None, None);
            return;
        }
        if db.stage.last().is_some_and(|h| h.txid > self.position(db)) {
            self.sched.started(db);
        }
        let res = self
            .ship_db(&name, db)
            .and_then(|()| self.maintain(&name, db));
        let failed_until = {
            let mut failing = self.failing.lock();
            match res {
                Ok(()) => {
                    failing.remove(&db.id);
                    None
                }
                Err(e) => {
                    let backoff = failing
                        .get(&db.id)
                        .map_or(Duration::ZERO, |f| f.backoff * 2);
                    let backoff = backoff.clamp(Duration::from_secs(1), Duration::from_secs(60));
                    let jitter = Duration::from_millis((now_ns() % 1000) / 2);
                    let mut msg = format!("{e:#}");
                    if !msg.contains(&self.describe()) {
                        msg = format!("replica {}: {msg}", self.describe());
                    }
                    log::warn!("{msg}; retrying {name} in {:?}", backoff + jitter);
                    let retry_at = Instant::now() + backoff + jitter;
                    failing.insert(
                        db.id.clone(),
                        Failing {
                            msg,
                            backoff,
                            retry_at,
                        },
                    );
                    Some(retry_at)
                }
            }
        };
        let next = match failed_until {
            None => self.next_maintenance(&name, db),
            Some(_) => None,
        };
        self.sched.done(db, failed_until, next);
        // A shipment can end short of what is staged (a key found holding an earlier, shorter
        // attempt): the rest is due like newly staged records, not left for the next commit.
        if failed_until.is_none()
            && !self.is_fenced(db)
            && db.stage.last().is_some_and(|h| h.txid > self.position(db))
        {
            self.sched.wake(db, Why::Staged);
        }
        *self.progress.0.lock() += 1;
        self.progress.1.notify_all();
    }

    /// The TXID up to which database `db` is on this replica.
    pub fn position(&self, db: &Db) -> u64 {
        match self.ledger(db) {
            Ok(l) => l.lock().position(),
            Err(e) => {
                log::error!("{}: {e:#}", db.name());
                0
            }
        }
    }

    /// `db`'s shipping ledger on this replica, read from staging on first use.
    fn ledger(&self, db: &Db) -> Result<Arc<Mutex<Ledger>>> {
        if let Some(l) = self.ledgers.lock().get(&ledger_key(db)) {
            return Ok(l.clone());
        }
        let l = Ledger::load(db.stage.dir(), &self.rid).context("reading the shipping ledger")?;
        Ok(self
            .ledgers
            .lock()
            .entry(ledger_key(db))
            .or_insert_with(|| Arc::new(Mutex::new(l)))
            .clone())
    }

    /// `db`'s ledger file for this replica.
    fn ledger_file(&self, db: &Db) -> PathBuf {
        ledger::ledger_file(db.stage.dir(), &self.rid)
    }

    /// Sets the position to `txid` (which may lower it), durably.
    fn set_position(&self, db: &Db, txid: u64) -> Result<()> {
        let l = self.ledger(db)?;
        let mut l = l.lock();
        l.set(&self.ledger_file(db), txid)
            .context("recording the shipped position")
    }

    /// The replica holds `db` up to `txid` now: durable with the next attempt recorded, or
    /// [`Shipper::settle`] (see `ledger`).
    fn advance(&self, db: &Db, txid: u64) -> Result<()> {
        self.ledger(db)?.lock().advance(txid);
        Ok(())
    }

    /// Makes `db`'s position on this replica durable (before anything below it is removed,
    /// here or in staging); returns the durable position.
    pub fn settle(&self, db: &Db) -> Result<u64> {
        let l = self.ledger(db)?;
        let mut l = l.lock();
        l.settle(&self.ledger_file(db))
            .with_context(|| format!("{}: recording the shipped position", db.name()))?;
        Ok(l.durable())
    }

    fn ship_db(&self, name: &str, db: &Db) -> Result<()> {
        // Objects are built in the staging directory; whatever happens, no large object is
        // left there to take space (on a full disk, that space is the app's). The file itself
        // stays for the next shipment, so no inode is created per shipment (`pack`), and it
        // keeps a small object's bytes, which the next one overwrites: truncating it to zero
        // each time freed its blocks and made the filesystem write it out at close.
        let tmp = db.stage.dir().join(format!("outbox.{}.tmp", self.rid));
        let res = self.ship_db_via(name, db, &tmp);
        let big = fs::metadata(&tmp).is_ok_and(|m| m.len() > OUTBOX_KEEP);
        if big && spare::empty_own(&tmp).is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    fn ship_db_via(&self, name: &str, db: &Db, tmp: &Path) -> Result<()> {
        if self.is_fenced(db) {
            return Ok(());
        }
        let pos = self.position(db);
        let last = db.stage.last().map(|h| h.txid).unwrap_or(0);
        // The name's claim is checked once at start even with nothing to ship (a second
        // writer is refused at once), then only before shipments (idle costs nothing).
        if last <= pos && self.claims.lock().contains_key(&db.id) {
            return Ok(());
        }
        let checked = self.claims.lock().contains_key(&db.id);
        if let Err(e) = self.check_claim(name, db) {
            if !checked {
                return Err(e);
            }
            // The claim was this mount's at the last check: a store that cannot answer now
            // does not stop the shipment (which finds out for itself); read it next time.
            log::debug!("{name}: cannot read its claim again: {e:#}");
        }
        if self.is_fenced(db) || last <= pos {
            return Ok(());
        }
        self.load_catalog(name, db, pos)?;
        if self.is_fenced(db) {
            return Ok(());
        }
        let pos = self.position(db);
        // Only durable records leave the machine. A replica holding a transaction that a
        // machine crash then takes from staging would disagree with the restarted mount, which
        // stages its own records under those TXIDs (a snapshot, if continuity is not proven).
        db.stage
            .sync()
            .with_context(|| format!("{name}: syncing staging before shipping"))?;
        if !self.named.lock().contains(&db.id) {
            let data = match &self.sealer {
                Some(s) => s.seal_bytes(name.as_bytes())?,
                None => name.as_bytes().to_vec(),
            };
            self.client.put(&name_key(&db.id), &data)?;
            self.named.lock().insert(db.id.clone());
        }
        let base = db.stage.base_meta().map_err(anyhow::Error::from)?;
        let mut pos = pos;
        if pos < base.txid {
            // The transactions after `pos` were folded locally: start over from the base.
            let hdr = self
                .build_snapshot(db, tmp, base.txid)
                .with_context(|| format!("{name}: building a snapshot"))?;
            let key = snapshot_key(&db.id, base.txid);
            let want = Want {
                kind: ObjKind::Snapshot,
                first: hdr.first_txid,
                last: hdr.last_txid,
                checksum_before: hdr.checksum_before,
                after: vec![hdr.checksum_after],
            };
            let held = self.store(name, db, &key, tmp, &want, None)?;
            self.advance(db, held)?;
            self.stored(db, &key, None, base.txid..=base.txid, tmp, None);
            pos = base.txid;
            if last <= pos {
                return Ok(());
            }
        }
        let file = self
            .fresh_file(db, tmp)
            .context("creating the outbox file")?;
        let mut w = ObjectWriter::new(file, ObjKind::Segment, 0, &db.id)?;
        let mut first = None;
        // Nothing that a restore's checksum check would refuse leaves the machine: each
        // transaction must start from the checksum the record before it (the one at `pos`,
        // read for its header only, or the base) ended with. A snapshot starts afresh.
        let mut prev = (pos == base.txid).then_some((base.txid, base.checksum));
        let mut after = Vec::new();
        db.stage
            .for_each(pos.saturating_sub(1), last, |h, pages| {
                if h.txid == pos {
                    prev = Some((h.txid, h.checksum_after));
                    return Ok(());
                }
                if let Some(why) = chain_break(prev, h, first.is_some()) {
                    return Err(crate::stage::StageError::Damaged(format!(
                        "{why}: not shipped"
                    )));
                }
                prev = Some((h.txid, h.checksum_after));
                first.get_or_insert(h.txid);
                after.push(h.checksum_after);
                if h.txid == pos + 1 {
                    self.remember_missing(db, h.txid, h.time_ns);
                }
                w.add(h, |emit| pages(emit).map_err(std::io::Error::other))
                    .map_err(|e| crate::stage::StageError::Io {
                        path: tmp.to_path_buf(),
                        err: e,
                    })
            })
            .with_context(|| format!("{name}: reading staged transactions {}..={last}", pos + 1))?;
        if w.is_empty() {
            return Ok(());
        }
        if first != Some(pos + 1) {
            // A fold moved the base past `pos` after it was read above: the records that
            // follow `pos` are gone, and this object would claim TXIDs it does not hold. The
            // next pass finds `pos` below the base and ships a snapshot first.
            log::debug!(
                "{name}: staging was folded while shipping (TXID {} expected, {first:?} found); shipping a snapshot next",
                pos + 1
            );
            return Ok(());
        }
        // A small object comes back in memory too: nothing below reads it from the file.
        let (hdr, _, bytes) = w.finish_with_bytes()?;
        let key = l0_key(&db.id, pos + 1);
        let want = Want {
            kind: ObjKind::Segment,
            first: hdr.first_txid,
            last: hdr.last_txid,
            checksum_before: hdr.checksum_before,
            after,
        };
        let held = self.store(name, db, &key, tmp, &want, bytes.as_deref())?;
        self.advance(db, held)?;
        let mut bytes = bytes;
        if held != hdr.last_txid {
            // The replica's object is an earlier attempt holding less than this one: keep no
            // local copy, compaction must merge what the replica holds.
            let _ = fs::remove_file(tmp);
            bytes = None;
        }
        self.stored(db, &key, Some(0), pos + 1..=held, tmp, bytes.as_deref());
        log::debug!(
            "{name}: shipped TXIDs {}..={} to {}",
            pos + 1,
            hdr.last_txid,
            self.describe()
        );
        Ok(())
    }

    /// True unless the configuration excludes database `name` from replication
    /// (`replicate: false`): such a database is captured and staged, never shipped.
    pub fn replicates(&self, name: &str) -> bool {
        self.rules.get(name).and_then(|r| r.replicate) != Some(false)
    }

    /// Blocks until this replica holds `db` up to `txid` (shipping right away), or fails
    /// with the replica's error, or `timeout` passes. Returns at once for a database that is
    /// not replicated: nothing will ever ship it.
    pub fn wait_shipped(&self, db: &Arc<Db>, txid: u64, timeout: Duration) -> Result<()> {
        if !self.replicates(&db.name()) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.position(db) >= txid {
                return Ok(());
            }
            if self.is_fenced(db) {
                anyhow::bail!("{} is fenced off by another writer", self.describe());
            }
            let mut rounds = self.progress.0.lock();
            let seen = self.sched.runs(db);
            self.sched.wake(db, Why::Now);
            while self.sched.runs(db) == seen {
                if self
                    .progress
                    .1
                    .wait_until(&mut rounds, deadline)
                    .timed_out()
                {
                    anyhow::bail!(
                        "{} did not receive TXID {txid} within {timeout:?}",
                        self.describe()
                    );
                }
            }
            drop(rounds);
            if let (Some(e), true) = (self.db_error(db), self.position(db) < txid) {
                anyhow::bail!("{}: {e}", self.describe());
            }
        }
    }

    /// How long the oldest transaction of `db` this replica lacks has been waiting (zero
    /// when it has everything). Still true once that transaction was folded away locally
    /// (the replica then needs a snapshot): its commit time was remembered when it was
    /// seen missing, or else the base's commit time bounds it (every folded transaction
    /// committed no later than the base), so the lag is never understated as zero.
    pub fn lag(&self, db: &Db) -> Duration {
        let pos = self.position(db);
        match self.oldest_missing_ns(db, pos) {
            Some(t) => Duration::from_nanos(now_ns().saturating_sub(t)),
            None => Duration::ZERO,
        }
    }

    /// Commit time (ns) of TXID `pos + 1` of `db`, the oldest one this replica lacks, if it
    /// lacks any.
    fn oldest_missing_ns(&self, db: &Db, pos: u64) -> Option<u64> {
        if db.stage.last().is_none_or(|h| h.txid <= pos) {
            self.missing.lock().remove(&db.id);
            return None;
        }
        if let Some(&(txid, t)) = self.missing.lock().get(&db.id) {
            if txid == pos + 1 {
                return Some(t);
            }
        }
        let mut t = None;
        let _ = db.stage.for_each(pos, pos + 1, |h, _| {
            t = Some(h.time_ns);
            Ok(())
        });
        match t {
            Some(t) => {
                self.remember_missing(db, pos + 1, t);
                Some(t)
            }
            None => {
                let base = db.stage.base_meta().ok()?;
                Some(if base.time_ns != 0 {
                    base.time_ns
                } else {
                    now_ns()
                })
            }
        }
    }

    /// Remembers the commit time of `txid`, the oldest transaction of `db` this replica
    /// lacks, so the lag stays known after staging folds it away.
    fn remember_missing(&self, db: &Db, txid: u64, time_ns: u64) {
        self.missing.lock().insert(db.id.clone(), (txid, time_ns));
    }

    /// True if staging was folded past this replica's position for `db` (it outgrew its
    /// hard limit while the replica was behind): the replica's chain cannot continue and
    /// the next shipment starts with a snapshot.
    pub fn needs_snapshot(&self, db: &Db) -> bool {
        let pos = self.position(db);
        db.stage.base_meta().is_ok_and(|b| pos < b.txid)
    }

    /// Objects and bytes stored in the replica by this process.
    pub fn stored_totals(&self) -> (u64, u64) {
        *self.totals.lock()
    }

    /// True if shipping `db` to this replica stopped because another writer owns it.
    pub fn is_fenced(&self, db: &Db) -> bool {
        self.fenced.lock().contains_key(&db.id)
    }

    /// Why shipping `db` to this replica stopped, if another writer owns it.
    pub fn fence_reason(&self, db: &Db) -> Option<String> {
        self.fenced.lock().get(&db.id).cloned()
    }

    /// The TXID up to which a restore can follow `db`'s chain on this replica: the position,
    /// unless the chain this shipper knows breaks before it ([`DbCatalog::reach`]).
    pub fn held(&self, db: &Db) -> u64 {
        let pos = self.position(db);
        match self.maint.lock().get(&db.id) {
            Some(m) => pos.min(m.cat.reach()),
            None => pos,
        }
    }

    /// The error of a database whose last attempt failed (the first by id), noting how many
    /// more are failing; `None` when every database's last attempt succeeded.
    pub fn last_error(&self) -> Option<String> {
        let f = self.failing.lock();
        let first = f.values().next()?;
        Some(match f.len() {
            1 => first.msg.clone(),
            n => format!("{} (and {} more databases failing)", first.msg, n - 1),
        })
    }

    /// The error of the last attempt to ship `db`, if it failed.
    pub fn db_error(&self, db: &Db) -> Option<String> {
        self.failing.lock().get(&db.id).map(|f| f.msg.clone())
    }
}
