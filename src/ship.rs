//! Shipping: one thread per replica moves each database's staged transactions to it.
//!
//! Every sync interval, for each database with transactions the replica does not have yet,
//! the shipper builds one level-0 segment object (docs/FORMAT.md) of all of them and stores it
//! under a key named by its first TXID. A database the replica has never seen, or whose
//! needed transactions were folded away locally, first gets a snapshot object of the staged
//! base.
//!
//! After shipping, the same thread maintains the database on that replica (docs/FORMAT.md):
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
//! - Objects are created with `put_new`: a second writer of the same database (another
//!   machine, a copy of the data directory) collides on the next key and is stopped, loudly;
//!   the replica is never overwritten.
//! - Nothing is assumed about what a key holds that was not read from it. A key that exists
//!   when this shipper creates it (an earlier attempt that timed out client-side but reached
//!   the store, a request the store replayed late, another writer) is read back: its header
//!   (for an encrypted object: the attempt of this mount whose first bytes it has, else its
//!   header decrypted with the replica's key if one is configured) says which TXIDs it
//!   holds, and the position moves to exactly that. A header that is not this database's
//!   staged state (another id, other checksums) fences the database.
//! - A database name has one owner per replica: its claim (`owner`). A shipper ships a name
//!   only while the claim names this data directory's writer (checked when it first ships
//!   the name in this process, and again at most every `CLAIM_RECHECK` before shipping);
//!   another writer's claim fences it. Replacing a claim is explicit: `--takeover`, or a
//!   database `--restore-if-missing` restored.
//! - Nothing to ship costs zero requests.
//! - Errors (a store that is down, a full disk) are retried with backoff, per database so
//!   one failing database never delays the others; the staged transactions stay until
//!   shipped (folding never passes the slowest replica unless
//!   staging grows past its hard limit, which is logged).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parking_lot::{Condvar, Mutex};

use crate::capture::{Capture, Db};
use crate::catalog::{compacted_key, l0_key, name_key, snapshot_key, DbCatalog, Obj, Reader};
use crate::compact;
use crate::config::DbConf;
use crate::crypt::{Opener, ReadKey, Sealer};
use crate::owner::{claim_key, Claim};
use crate::replica::{ReplicaClient, ReplicaError};
use crate::segment::{ObjHeader, ObjKind, ObjectWriter};
use crate::stage::{now_ns, write_atomic, Kind, RecordHeader, WalPos};
use crate::units::parse_duration;

/// How a replica's objects are snapshotted, compacted and expired.
#[derive(Clone, Debug)]
pub struct Policy {
    /// A full snapshot at most this often while the database changes (zero: only when
    /// continuity needs one).
    pub snapshot_interval: Duration,
    /// Compaction intervals of levels 1, 2, … (empty: no compaction).
    pub levels: Vec<Duration>,
    /// Keep every restore point this far back (zero: keep everything).
    pub retention: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            snapshot_interval: Duration::from_secs(6 * 3600),
            levels: vec![
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(3600),
            ],
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl Policy {
    /// Sets the values a configuration layer gives (those it leaves out stay as they are).
    pub fn overlay(
        &mut self,
        snapshot: &Option<String>,
        retention: &Option<String>,
        compaction: &Option<Vec<String>>,
    ) {
        // Values were checked when the file was loaded.
        if let Some(d) = snapshot.as_deref().and_then(|s| parse_duration(s).ok()) {
            self.snapshot_interval = d;
        }
        if let Some(d) = retention.as_deref().and_then(|s| parse_duration(s).ok()) {
            self.retention = d;
        }
        if let Some(l) = compaction {
            self.levels = l.iter().filter_map(|s| parse_duration(s).ok()).collect();
        }
    }
}

/// The policy of a database on a replica: the replica's (defaults, the configuration's top
/// level, command-line flags, the replica's own settings), then the database's own settings
/// from the configuration, which are the most specific and win.
pub fn db_policy(replica: &Policy, db: Option<&DbConf>) -> Policy {
    let mut p = replica.clone();
    if let Some(r) = db {
        p.overlay(&r.snapshot_interval, &r.retention, &r.compaction);
    }
    p
}

/// How often a shipper that ships a name reads its claim again (a writer that took the name
/// over fences this one within this long of its next shipment).
const CLAIM_RECHECK: Duration = Duration::from_secs(10);

/// How many first bytes of an object sent identify the attempt (for an encrypted replica this
/// mount cannot decrypt: the age header's random file key makes every encryption unique).
const FINGERPRINT_BYTES: u64 = 1024;

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

/// What an object being stored holds, to check a key that already exists against.
struct Want {
    kind: ObjKind,
    first: u64,
    /// The last TXID this attempt holds.
    last: u64,
    checksum_before: u64,
    /// The rolling checksum after each TXID `first..=last` as staged.
    after: Vec<u64>,
}

/// One attempt to store a key, as recorded in the `shipping.<rid>` file before it is sent.
struct Attempt {
    key: String,
    last: u64,
    /// Length and CRC-64 of the first bytes sent.
    fp: (u64, u64),
}

impl Attempt {
    fn line(&self) -> String {
        format!(
            "{} {} {} {:016x}\n",
            self.key, self.last, self.fp.0, self.fp.1
        )
    }

    fn parse(l: &str) -> Option<Attempt> {
        let mut w = l.split_whitespace();
        let key = w.next()?.to_string();
        let last = w.next()?.parse().ok()?;
        let fp = match (w.next(), w.next()) {
            (Some(n), Some(c)) => (n.parse().ok()?, u64::from_str_radix(c, 16).ok()?),
            _ => (0, 0),
        };
        Some(Attempt { key, last, fp })
    }
}

/// Length and CRC-64 of the first [`FINGERPRINT_BYTES`] of `b` (or all of it).
fn fingerprint(b: &[u8]) -> (u64, u64) {
    let b = &b[..b.len().min(FINGERPRINT_BYTES as usize)];
    let mut d = crate::sqlite::crc64();
    d.update(b);
    (b.len() as u64, d.finalize())
}

/// What the shipper knows of one database on its replica.
struct Maint {
    cat: DbCatalog,
    /// When each level last ran (index = level).
    last_compact: Vec<Instant>,
    /// Per level: TXIDs up to which runs were skipped (not cached locally, encrypted).
    skip_to: Vec<u64>,
    /// When the newest snapshot was stored (ns).
    last_snapshot_ns: u64,
}

pub struct Shipper {
    client: Box<dyn ReplicaClient>,
    sealer: Option<Arc<Sealer>>,
    /// The key that decrypts this replica's objects, if one is configured (headers of keys
    /// that already exist are read with it).
    key: ReadKey,
    writer: Writer,
    /// Per database id: the name whose claim was last found this mount's, and when.
    claims: Mutex<HashMap<String, (String, Instant)>>,
    policy: Policy,
    /// Per-database overrides by name (configuration file).
    rules: Arc<BTreeMap<String, DbConf>>,
    maint: Mutex<HashMap<String, Maint>>,
    /// Objects and bytes stored by this process.
    totals: Mutex<(u64, u64)>,
    /// Short stable id of the replica, for local position files.
    rid: String,
    capture: Arc<Capture>,
    positions: Mutex<HashMap<String, u64>>,
    named: Mutex<HashSet<String>>,
    /// Databases whose shipping stopped because another writer owns them here, by id: why.
    fenced: Mutex<HashMap<String, String>>,
    /// Per database id: the oldest TXID this replica lacks and its commit time.
    missing: Mutex<HashMap<String, (u64, u64)>>,
    /// Databases whose last attempt failed, by id.
    failing: Mutex<BTreeMap<String, Failing>>,
    /// Set (and signalled) to ship now instead of at the end of the interval.
    wake: (Mutex<bool>, Condvar),
    /// Signalled whenever a position advances or a shipment fails.
    progress: (Mutex<u64>, Condvar),
}

/// A database whose last shipment (or maintenance) on a replica failed.
struct Failing {
    msg: String,
    /// The current backoff: doubles with each failure, up to a minute.
    backoff: Duration,
    /// No new attempt before this (unless forced).
    retry_at: Instant,
}

/// Why staged record `h` cannot follow `prev` (TXID, checksum after) in a shipment, if it
/// cannot: a transaction must start from the checksum the record before it ended with, and
/// within a run TXIDs go up by one. A snapshot starts afresh (it holds every page), and a first
/// record past the one expected (`started` false) is a fold racing the read, which the caller
/// handles.
fn chain_break(prev: Option<(u64, u64)>, h: &RecordHeader, started: bool) -> Option<String> {
    let (t, after) = prev?;
    if h.kind != Kind::Txn {
        return None;
    }
    if h.txid != t + 1 {
        return started.then(|| format!("staged TXID {} follows TXID {t}", h.txid));
    }
    (h.checksum_before != after).then(|| {
        format!(
            "staged TXID {} does not start from the checksum TXID {t} ended with ({:016x}, not {after:016x})",
            h.txid, h.checksum_before
        )
    })
}

/// A fresh local file an object is built in (read back for its checksum).
fn outbox(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
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
    ) -> Arc<Shipper> {
        let rid = short_hash(&client.describe());
        Arc::new(Shipper {
            client,
            sealer,
            key,
            writer,
            claims: Mutex::new(HashMap::new()),
            policy,
            rules,
            maint: Mutex::new(HashMap::new()),
            totals: Mutex::new((0, 0)),
            rid,
            capture,
            positions: Mutex::new(HashMap::new()),
            named: Mutex::new(HashSet::new()),
            fenced: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            failing: Mutex::new(BTreeMap::new()),
            wake: (Mutex::new(false), Condvar::new()),
            progress: (Mutex::new(0), Condvar::new()),
        })
    }

    pub fn describe(&self) -> String {
        self.client.describe()
    }

    /// Runs the shipping loop until `stop`, then ships once more.
    pub fn spawn(
        self: &Arc<Self>,
        interval: Duration,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("sqlfs-ship".into())
            .spawn(move || {
                crate::backing::background_priority();
                let mut next = Instant::now() + interval;
                loop {
                    let stopping = stop.load(Ordering::Relaxed);
                    let mut asked = false;
                    if !stopping && Instant::now() < next {
                        // Sleep until the interval ends, a --sync waiter asks, or stop.
                        let mut wake = me.wake.0.lock();
                        if !*wake {
                            let wait = Duration::from_millis(50)
                                .min(next.saturating_duration_since(Instant::now()));
                            me.wake.1.wait_for(&mut wake, wait);
                        }
                        asked = std::mem::take(&mut *wake);
                        if !asked {
                            continue;
                        }
                    }
                    // Databases in backoff wait for their turn, unless someone waits for
                    // them or this is the last pass.
                    me.ship_all(stopping || asked);
                    *me.progress.0.lock() += 1;
                    me.progress.1.notify_all();
                    next = Instant::now() + interval;
                    if stopping {
                        break;
                    }
                }
            })
    }

    /// The TXID up to which database `db` is on this replica.
    pub fn position(&self, db: &Db) -> u64 {
        if let Some(p) = self.positions.lock().get(&db.id) {
            return *p;
        }
        let p = fs::read_to_string(self.pos_file(db))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        self.positions.lock().insert(db.id.clone(), p);
        p
    }

    fn pos_file(&self, db: &Db) -> PathBuf {
        db.stage.dir().join(format!("shipped.{}", self.rid))
    }

    fn set_position(&self, db: &Db, txid: u64) -> Result<()> {
        write_atomic(&self.pos_file(db), txid.to_string().as_bytes())
            .context("recording the shipped position")?;
        self.positions.lock().insert(db.id.clone(), txid);
        Ok(())
    }

    /// Ships (and maintains) every replicated database that has something new. A database
    /// whose last attempt failed is retried with its own exponential backoff and jitter
    /// (1 s doubling up to a minute), so one failing database never delays the others;
    /// `force` retries them all now. Returns false if any attempt failed.
    pub fn ship_all(&self, force: bool) -> bool {
        let mut ok = true;
        for (name, db) in self.capture.databases() {
            if !self.replicates(&name) {
                continue;
            }
            let waiting = self
                .failing
                .lock()
                .get(&db.id)
                .is_some_and(|f| Instant::now() < f.retry_at);
            if waiting && !force {
                continue;
            }
            let res = self
                .ship_db(&name, &db)
                .and_then(|()| self.maintain(&name, &db));
            let mut failing = self.failing.lock();
            match res {
                Ok(()) => {
                    failing.remove(&db.id);
                }
                Err(e) => {
                    ok = false;
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
                    failing.insert(
                        db.id.clone(),
                        Failing {
                            msg,
                            backoff,
                            retry_at: Instant::now() + backoff + jitter,
                        },
                    );
                }
            }
        }
        ok
    }

    fn ship_db(&self, name: &str, db: &Db) -> Result<()> {
        // Objects are built in the staging directory; whatever happens, no partial object is
        // left there to take space (on a full disk, that space is the app's).
        let tmp = db.stage.dir().join(format!("outbox.{}.tmp", self.rid));
        let res = self.ship_db_via(name, db, &tmp);
        let _ = fs::remove_file(&tmp);
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
            let held = self.store(name, db, &key, tmp, &want)?;
            self.set_position(db, held)?;
            self.stored(db, &key, None, base.txid, base.txid, tmp);
            pos = base.txid;
            if last <= pos {
                return Ok(());
            }
        }
        let file = outbox(tmp).context("creating the outbox file")?;
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
        let (hdr, _) = w.finish()?;
        let key = l0_key(&db.id, pos + 1);
        let want = Want {
            kind: ObjKind::Segment,
            first: hdr.first_txid,
            last: hdr.last_txid,
            checksum_before: hdr.checksum_before,
            after,
        };
        let held = self.store(name, db, &key, tmp, &want)?;
        self.set_position(db, held)?;
        if held != hdr.last_txid {
            // The replica's object is an earlier attempt holding less than this one: keep no
            // local copy, compaction must merge what the replica holds.
            let _ = fs::remove_file(tmp);
        }
        self.stored(db, &key, Some(0), pos + 1, held, tmp);
        log::debug!(
            "{name}: shipped TXIDs {}..={} to {}",
            pos + 1,
            hdr.last_txid,
            self.describe()
        );
        Ok(())
    }

    /// The record of the attempts to store the key at this database's position.
    fn pending_file(&self, db: &Db) -> PathBuf {
        db.stage.dir().join(format!("shipping.{}", self.rid))
    }

    /// Stores the local object `tmp` (holding `want`) as `key`; returns the TXID the replica
    /// now holds up to. Each attempt is recorded (its last TXID and a fingerprint of its
    /// first bytes, see [`Attempt`]) before it is sent. A key that already exists is read
    /// back and never assumed to hold this attempt: see [`Shipper::read_back`].
    fn store(&self, name: &str, db: &Db, key: &str, tmp: &Path, want: &Want) -> Result<u64> {
        let sealed = tmp.with_extension("sealed");
        let send = match &self.sealer {
            Some(s) => {
                s.seal_file(tmp, &sealed)?;
                sealed.as_path()
            }
            None => tmp,
        };
        let res = self.store_file(name, db, key, send, want);
        if self.sealer.is_some() {
            let _ = fs::remove_file(&sealed);
        }
        res
    }

    fn store_file(&self, name: &str, db: &Db, key: &str, send: &Path, want: &Want) -> Result<u64> {
        let pending = self.pending_file(db);
        let mut head = Vec::new();
        fs::File::open(send)
            .and_then(|f| {
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(f, FINGERPRINT_BYTES),
                    &mut head,
                )
            })
            .context("reading the object to send")?;
        let mut attempts: Vec<Attempt> = fs::read_to_string(&pending)
            .unwrap_or_default()
            .lines()
            .filter_map(Attempt::parse)
            .filter(|a| a.key == key)
            .collect();
        attempts.push(Attempt {
            key: key.to_string(),
            last: want.last,
            fp: fingerprint(&head),
        });
        let text: String = attempts.iter().map(Attempt::line).collect();
        write_atomic(&pending, text.as_bytes()).context("recording the shipment in progress")?;
        match self.client.put_new(key, send) {
            Ok(()) => Ok(want.last),
            Err(ReplicaError::Exists(_)) => self.read_back(name, db, key, want, &attempts),
            // Ambiguous (a timeout, a reset connection): the object may still land. Nothing
            // advances; the next attempt at this key finds out what it holds.
            Err(e) => Err(e.into()),
        }
    }

    /// What the existing object `key` holds, checked against what this mount staged
    /// (`want`: this attempt, which holds at least as much as any earlier one at this key).
    /// A plain object's header says it (a ranged read); an encrypted one is matched against
    /// this mount's own `attempts` by its first bytes, else its header is decrypted with the
    /// replica's key if one is configured. Returns the last TXID it holds; fences
    /// the database if the object is not this database's staged state.
    fn read_back(
        &self,
        name: &str,
        db: &Db,
        key: &str,
        want: &Want,
        attempts: &[Attempt],
    ) -> Result<u64> {
        let head = self
            .client
            .get_range(key, 0, FINGERPRINT_BYTES)?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{key} exists in {} but cannot be read back (removed meanwhile?)",
                    self.describe()
                )
            })?;
        let sealed = crate::crypt::is_sealed(&head);
        let fp = fingerprint(&head);
        let mine = attempts.iter().rev().find(|a| a.fp == fp).map(|a| a.last);
        let held = match (sealed, mine) {
            // One of this mount's own encryptions (each is unique): it holds what that
            // attempt held.
            (true, Some(last)) => Ok(last),
            (true, None) => match Opener::for_key(&self.key)? {
                Some(opener) => {
                    let reader = Reader::new(self.client.as_ref(), Some(&opener));
                    match reader.header(key) {
                        Ok(h) => self.check_header(db, &h, want),
                        Err(e) => Err(format!("cannot be decrypted with this replica's key ({e:#}), and its first bytes match none of this mount's attempts at it")),
                    }
                }
                None => Err("is encrypted, this mount has no key to read it (age-identity or passphrase-env for this replica), and its first bytes match none of this mount's attempts at it".to_string()),
            },
            (false, _) => {
                let h = crate::segment::parse_header(&head, key)?;
                self.check_header(db, &h, want)
            }
        };
        match held {
            Ok(held) => {
                if held < want.last {
                    log::warn!("{name}: {key} was already in {} from an earlier attempt (a request that timed out here reached the store); it holds TXIDs {}..={held}, the rest follows in the next segment", self.describe(), want.first);
                }
                Ok(held)
            }
            Err(why) => {
                let msg = format!("{key} already exists in {} and {why}: another sqlfs (another machine, or a copy of this data directory) is writing {name} to the same replica. Shipping of {name} to it is stopped; the replica is left as it is", self.describe());
                log::error!("{name}: {msg}");
                self.fence(db, msg);
                Err(anyhow::anyhow!(
                    "{name}: fenced off {} by another writer",
                    self.describe()
                ))
            }
        }
    }

    /// The last TXID the object whose header is `h` holds, if it is a prefix of what this
    /// mount staged from `want.first` (same database, same checksums); else why not.
    fn check_header(
        &self,
        db: &Db,
        h: &ObjHeader,
        want: &Want,
    ) -> std::result::Result<u64, String> {
        let id = String::from_utf8_lossy(&h.db_id).into_owned();
        if id != db.id {
            return Err(format!("holds database id {id}, not {}", db.id));
        }
        if h.kind != want.kind || h.level != 0 || h.first_txid != want.first {
            return Err(format!(
                "holds a {:?} of level {} from TXID {}, not this mount's {:?} from TXID {}",
                h.kind, h.level, h.first_txid, want.kind, want.first
            ));
        }
        let staged = h
            .last_txid
            .checked_sub(want.first)
            .and_then(|i| want.after.get(i as usize));
        match staged {
            Some(&c) if c == h.checksum_after && h.checksum_before == want.checksum_before => {
                Ok(h.last_txid)
            }
            Some(_) => Err(format!(
                "holds TXIDs {}..={} with checksums that differ from what this mount staged",
                h.first_txid, h.last_txid
            )),
            None => Err(format!(
                "holds TXIDs {}..={}, beyond what this mount staged (TXID {})",
                h.first_txid, h.last_txid, want.last
            )),
        }
    }

    /// Stops shipping `db` to this replica: another writer owns it here.
    fn fence(&self, db: &Db, why: String) {
        self.fenced.lock().insert(db.id.clone(), why);
    }

    /// Where this data directory keeps the exact bytes of the claim of `key` it last wrote
    /// to this replica (with the database id it named): an encrypted claim this mount cannot
    /// decrypt is recognised as its own by them.
    fn claim_record(&self, key: &str) -> PathBuf {
        self.writer
            .meta_dir
            .join(format!("claims.{}", self.rid))
            .join(key.trim_start_matches("claims/"))
    }

    /// The claim `b` read from `key`: its own parse, or for an encrypted one, its decryption
    /// with this replica's key, or this mount's record of what it wrote; `None` if it cannot
    /// be read.
    fn read_claim(&self, key: &str, b: &[u8], mine: &Claim) -> Option<Claim> {
        if let Ok(rec) = fs::read(self.claim_record(key)) {
            if let Some(i) = rec.iter().position(|&c| c == b'\n') {
                if &rec[i + 1..] == b {
                    return Some(Claim {
                        db_id: String::from_utf8_lossy(&rec[..i]).into_owned(),
                        ..mine.clone()
                    });
                }
            }
        }
        if !crate::crypt::is_sealed(b) {
            return Claim::parse(b);
        }
        let opener = Opener::for_key(&self.key).ok().flatten()?;
        Claim::parse(&opener.open_prefix(b, 4096, key).ok()?)
    }

    /// Writes `mine` as the claim `key`: the local record first (a write whose outcome is
    /// unknown here is still recognised later), then the store, with the conditional create
    /// unless `replace`.
    fn write_claim(
        &self,
        db: &Db,
        key: &str,
        mine: &Claim,
        replace: bool,
    ) -> Result<std::result::Result<(), ReplicaError>> {
        let bytes = match &self.sealer {
            Some(s) => s.seal_bytes(&mine.encode())?,
            None => mine.encode(),
        };
        let rec = self.claim_record(key);
        if let Some(d) = rec.parent() {
            fs::create_dir_all(d).context("recording a claim")?;
        }
        let mut text = format!("{}\n", mine.db_id).into_bytes();
        text.extend_from_slice(&bytes);
        write_atomic(&rec, &text).context("recording a claim")?;
        if replace {
            return Ok(self.client.put(key, &bytes));
        }
        let tmp = db.stage.dir().join(format!("claim.{}.tmp", self.rid));
        write_atomic(&tmp, &bytes).context("writing a claim")?;
        let r = self.client.put_new(key, &tmp);
        let _ = fs::remove_file(&tmp);
        Ok(r)
    }

    /// Checks that the claim of `name` in this replica is this mount's, making it if there is
    /// none (the store's conditional create), moving it to `db` if this data directory
    /// created the database again under the name, or replacing it when a takeover was asked
    /// for. Another writer's claim fences `db`. Checked when `name` first ships in this
    /// process, then at most every [`CLAIM_RECHECK`].
    fn check_claim(&self, name: &str, db: &Db) -> Result<()> {
        let first = match self.claims.lock().get(&db.id) {
            Some((n, t)) if n == name && t.elapsed() < CLAIM_RECHECK => return Ok(()),
            Some((n, _)) => n != name,
            None => true,
        };
        let key = claim_key(name);
        let mine = Claim {
            db_id: db.id.clone(),
            writer: self.writer.id.clone(),
            since_ns: now_ns(),
            host: Some(self.writer.host.clone()),
            data_dir: Some(self.writer.data_dir.clone()),
        };
        let marker = takeover_marker(db.stage.dir(), &self.rid);
        let takeover = first && (self.writer.takeover || marker.exists());
        let mut created = false;
        let theirs = loop {
            let Some(b) = self.client.get_range(&key, 0, 4096)? else {
                if created {
                    anyhow::bail!(
                        "{name}: the claim {key} just created in {} cannot be read back",
                        self.describe()
                    );
                }
                match self.write_claim(db, &key, &mine, false)? {
                    Ok(()) => {
                        log::info!(
                            "{name}: claimed the name in {} for database {} (writer {})",
                            self.describe(),
                            db.id,
                            self.writer.id
                        );
                        break None;
                    }
                    // Made meanwhile (by another writer, or by an attempt of this one that
                    // timed out here but reached the store): read it.
                    Err(ReplicaError::Exists(_)) => {
                        created = true;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            break Some(self.read_claim(&key, &b, &mine));
        };
        if let Some(theirs) = theirs {
            let ours = theirs.as_ref().is_some_and(|c| c.writer == mine.writer);
            let who = theirs.as_ref().map_or_else(
                || "a claim this mount did not write and cannot read (encrypted, and no key for this replica is configured here)".to_string(),
                |c| c.describe(),
            );
            if ours && theirs.as_ref().is_some_and(|c| c.db_id == db.id) {
                // Ours already.
            } else if (ours && first) || takeover {
                if let Err(e) = self.write_claim(db, &key, &mine, true)? {
                    return Err(e.into());
                }
                if ours {
                    log::info!("{name}: the name in {} now belongs to database {} of this data directory (was {who})", self.describe(), db.id);
                } else {
                    log::warn!(
                        "{name}: TAKING OVER the name in {}: it belonged to {who}; it now belongs to database {} of writer {} ({}), and that writer is refused from now on",
                        self.describe(),
                        db.id,
                        self.writer.id,
                        if self.writer.takeover { "--takeover" } else { "--restore-if-missing" }
                    );
                }
            } else {
                let msg = format!(
                    "{name} in {} belongs to another sqlfs: {who}. Shipping of {name} to it is stopped; to hand the name over to this mount, restart it with --takeover",
                    self.describe()
                );
                log::error!("{name}: {msg}");
                self.fence(db, msg);
                return Ok(());
            }
        }
        let _ = fs::remove_file(&marker);
        self.claims
            .lock()
            .insert(db.id.clone(), (name.to_string(), Instant::now()));
        Ok(())
    }

    /// The policy for database `name`: this replica's, with the database's own settings.
    fn policy_for(&self, name: &str) -> Policy {
        db_policy(&self.policy, self.rules.get(name))
    }

    /// Loads what the replica holds for `db` (one listing) the first time it ships in this
    /// process. Objects past this mount's position (other than its own unfinished one) mean
    /// another writer moved the chain on: that fences it, even where retention removed the
    /// key this mount would collide on.
    fn load_catalog(&self, name: &str, db: &Db, pos: u64) -> Result<()> {
        if self.maint.lock().contains_key(&db.id) {
            return Ok(());
        }
        let reader = Reader::new(self.client.as_ref(), None);
        let cat = reader.catalog(&db.id, name)?;
        let pending = fs::read_to_string(self.pending_file(db)).unwrap_or_default();
        let pending_key = pending.split_once(' ').map(|(k, _)| k.to_string());
        if let Some(o) = cat
            .objects()
            .find(|o| o.first > pos + 1 && Some(&o.key) != pending_key.as_ref())
        {
            let msg = format!(
                "{} holds {} beyond this mount's position (TXID {pos}): another sqlfs (another machine, or a copy of this data directory) is writing this database to it. Shipping of {name} to it is stopped; the replica is left as it is",
                self.describe(),
                o.key
            );
            log::error!("{name}: {msg}");
            self.fence(db, msg);
            return Ok(());
        }
        // A position past what the chain holds (objects removed from the replica, or a
        // position recorded by a build that assumed what a key held): ship from where the
        // chain really ends (a snapshot, if staging no longer holds what follows).
        let reach = cat.reach();
        if reach < pos {
            log::error!(
                "{name}: {} holds a chain that ends at TXID {reach}, short of the recorded position {pos}; shipping again from TXID {}",
                self.describe(),
                reach + 1
            );
            self.set_position(db, reach)?;
        }
        // A chain without snapshots starts at TXID 1 (the first record is a full snapshot
        // staged at first sighting): the first interval snapshot is due one interval on.
        let last_snapshot_ns = cat
            .snaps
            .iter()
            .map(|o| o.modified_ns)
            .max()
            .unwrap_or_else(now_ns);
        let n = self.policy_for(name).levels.len() + 1;
        self.maint.lock().insert(
            db.id.clone(),
            Maint {
                cat,
                last_compact: vec![Instant::now(); n],
                skip_to: vec![0; n],
                last_snapshot_ns,
            },
        );
        Ok(())
    }

    /// Local copy of an object this shipper stored, kept until a higher level merges it.
    fn cache_path(&self, db: &Db, key: &str) -> PathBuf {
        db.stage
            .dir()
            .join(format!("objects.{}", self.rid))
            .join(key.replace('/', "_"))
    }

    /// Records an object just stored from the local file `local`: in the catalog, and in the
    /// local cache when a higher level will merge it.
    fn stored(&self, db: &Db, key: &str, level: Option<u8>, first: u64, last: u64, local: &Path) {
        let size = fs::metadata(local).map_or(0, |m| m.len());
        {
            let mut t = self.totals.lock();
            t.0 += 1;
            t.1 += size;
        }
        let mut levels = self.policy.levels.len();
        if let Some(m) = self.maint.lock().get_mut(&db.id) {
            levels = self.policy_for(&m.cat.name).levels.len();
            m.cat.add(Obj {
                key: key.to_string(),
                level,
                first,
                last,
                exact: true,
                size,
                modified_ns: now_ns(),
            });
            if level.is_none() {
                m.last_snapshot_ns = now_ns();
            }
        }
        if level.is_some_and(|l| (l as usize) < levels) {
            let dst = self.cache_path(db, key);
            let _ = dst.parent().map(fs::create_dir_all);
            if let Err(e) = fs::rename(local, &dst) {
                log::debug!("cannot keep a local copy of {key}: {e}");
            }
        }
    }

    /// Stores an object derived from ones already in the replica (a compacted segment, an
    /// interval snapshot). Its key names exactly what it holds, so finding it there already
    /// (this mount stored it before a restart) is success.
    fn put_derived(&self, key: &str, local: &Path) -> Result<()> {
        match self.seal_and_put_new(key, local)? {
            Ok(()) | Err(ReplicaError::Exists(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Encrypts the local object `local` if this replica is encrypted, and creates `key`
    /// from it. The outer error is local (encryption); the inner one is the replica's.
    fn seal_and_put_new(
        &self,
        key: &str,
        local: &Path,
    ) -> Result<std::result::Result<(), ReplicaError>> {
        Ok(match &self.sealer {
            Some(s) => {
                let sealed = local.with_extension("sealed");
                let r = s
                    .seal_file(local, &sealed)
                    .map(|()| self.client.put_new(key, &sealed));
                let _ = fs::remove_file(&sealed);
                r?
            }
            None => self.client.put_new(key, local),
        })
    }

    /// Snapshot, compaction and retention for `db`, each when it is due.
    fn maintain(&self, name: &str, db: &Db) -> Result<()> {
        if self.is_fenced(db) || !self.maint.lock().contains_key(&db.id) {
            return Ok(());
        }
        let pos = self.position(db);
        let tmp = db.stage.dir().join(format!("maint.{}.tmp", self.rid));
        let res = self.maintain_via(name, db, pos, &tmp);
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(tmp.with_extension("pages"));
        res
    }

    fn maintain_via(&self, name: &str, db: &Db, pos: u64, tmp: &Path) -> Result<()> {
        let p = &self.policy_for(name);
        // An interval snapshot of the shipped state, built from staging.
        let due = {
            let m = self.maint.lock();
            let m = m.get(&db.id).expect("loaded");
            let newest = m.cat.snaps.last().map_or(0, |s| s.first);
            !p.snapshot_interval.is_zero()
                && pos > newest
                && now_ns().saturating_sub(m.last_snapshot_ns)
                    >= p.snapshot_interval.as_nanos() as u64
        };
        if due && pos >= db.stage.base_meta()?.txid {
            self.build_snapshot(db, tmp, pos)
                .with_context(|| format!("{name}: building a snapshot"))?;
            let key = snapshot_key(&db.id, pos);
            self.put_derived(&key, tmp)?;
            self.stored(db, &key, None, pos, pos, tmp);
            log::info!(
                "{name}: snapshot at TXID {pos} stored in {}",
                self.describe()
            );
        }
        // Compaction, lowest level first so a higher level sees the newest runs.
        for level in 1..=p.levels.len() {
            let run = {
                let mut m = self.maint.lock();
                let m = m.get_mut(&db.id).expect("loaded");
                if m.last_compact[level].elapsed() < p.levels[level - 1] {
                    continue;
                }
                m.last_compact[level] = Instant::now();
                compact::next_run(&m.cat, level, m.skip_to[level])
            };
            if !run.is_empty() {
                self.compact_run(name, db, level as u8, &run, tmp)?;
            }
        }
        // Retention.
        if !p.retention.is_zero() {
            let keys = {
                let m = self.maint.lock();
                compact::expired(&m[&db.id].cat, now_ns(), p.retention.as_nanos() as u64)
            };
            for key in &keys {
                self.client.delete(key)?;
                let _ = fs::remove_file(self.cache_path(db, key));
                if let Some(m) = self.maint.lock().get_mut(&db.id) {
                    m.cat.remove(key);
                }
            }
            if !keys.is_empty() {
                log::info!(
                    "{name}: retention removed {} objects older than {:?} from {}",
                    keys.len(),
                    p.retention,
                    self.describe()
                );
            }
        }
        Ok(())
    }

    /// Merges `run` (consecutive objects one level below) into one object of `level`.
    fn compact_run(&self, name: &str, db: &Db, level: u8, run: &[Obj], tmp: &Path) -> Result<()> {
        let mut inputs = Vec::new();
        let mut fetched = Vec::new();
        let reader = Reader::new(self.client.as_ref(), None);
        for (i, o) in run.iter().enumerate() {
            let c = self.cache_path(db, &o.key);
            if c.exists() {
                inputs.push((o.key.clone(), c));
            } else if self.sealer.is_none() {
                let local = db.stage.dir().join(format!("fetch.{}.{i}", self.rid));
                fetched.push(local.clone());
                inputs.push((o.key.clone(), reader.fetch(&o.key, &local)?));
            } else {
                // Encrypted, and this machine has no key: leave the run to the lower level.
                let last = run.last().map_or(0, |o| o.last);
                log::info!("{name}: level {level} skips TXIDs {}..: {} has no local copy (stored before this mount started) and is encrypted", run[0].first, o.key);
                if let Some(m) = self.maint.lock().get_mut(&db.id) {
                    m.skip_to[level as usize] = last;
                }
                return Ok(());
            }
        }
        let refs: Vec<(String, &Path)> = inputs
            .iter()
            .map(|(k, p)| (k.clone(), p.as_path()))
            .collect();
        let res = compact::merge(
            &refs,
            level,
            &db.id,
            outbox(tmp)?,
            &tmp.with_extension("pages"),
        );
        for f in &fetched {
            let _ = fs::remove_file(f);
        }
        let hdr = res.with_context(|| format!("{name}: compacting into level {level}"))?;
        let key = compacted_key(&db.id, level, hdr.first_txid, hdr.last_txid);
        self.put_derived(&key, tmp)?;
        self.stored(db, &key, Some(level), hdr.first_txid, hdr.last_txid, tmp);
        for (k, p) in &inputs {
            if p.starts_with(db.stage.dir().join(format!("objects.{}", self.rid))) {
                let _ = fs::remove_file(p);
            }
            let _ = k;
        }
        log::debug!(
            "{name}: compacted {} objects (TXIDs {}..={}) into level {level} of {}",
            run.len(),
            hdr.first_txid,
            hdr.last_txid,
            self.describe()
        );
        Ok(())
    }

    /// Writes a snapshot object of the staged base (the state after `txid`) to `tmp`.
    fn build_snapshot(&self, db: &Db, tmp: &Path, txid: u64) -> Result<ObjHeader> {
        let out = tempfile::tempfile()?;
        let meta = db.stage.materialize(txid, &out)?;
        let h = RecordHeader {
            kind: Kind::Snapshot,
            txid,
            time_ns: if meta.time_ns != 0 {
                meta.time_ns
            } else {
                now_ns()
            },
            page_size: meta.page_size.max(512),
            db_pages: meta.db_pages,
            checksum_before: 0,
            checksum_after: meta.checksum,
            npages: meta.db_pages,
            wal: WalPos::default(),
            coded: None,
        };
        let mut w = ObjectWriter::new(outbox(tmp)?, ObjKind::Snapshot, 0, &db.id)?;
        let ps = h.page_size as usize;
        w.add(&h, |emit| {
            let mut buf = vec![0u8; ps];
            for p in 1..=h.db_pages {
                std::os::unix::fs::FileExt::read_exact_at(
                    &out,
                    &mut buf,
                    (p as u64 - 1) * ps as u64,
                )?;
                emit(p, &buf)?;
            }
            Ok(())
        })?;
        Ok(w.finish()?.0)
    }

    /// True unless the configuration excludes database `name` from replication
    /// (`replicate: false`): such a database is captured and staged, never shipped.
    pub fn replicates(&self, name: &str) -> bool {
        self.rules.get(name).and_then(|r| r.replicate) != Some(false)
    }

    /// Blocks until this replica holds `db` up to `txid` (shipping right away), or fails
    /// with the replica's error, or `timeout` passes. Returns at once for a database that is
    /// not replicated: nothing will ever ship it.
    pub fn wait_shipped(&self, db: &Db, txid: u64, timeout: Duration) -> Result<()> {
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
            let seen = *rounds;
            *self.wake.0.lock() = true;
            self.wake.1.notify_all();
            while *rounds == seen {
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

#[cfg(test)]
mod chain_tests {
    use super::*;

    #[test]
    fn a_run_that_does_not_chain_is_refused() {
        let txn = |txid, before| RecordHeader {
            checksum_before: before,
            checksum_after: txid * 10,
            ..RecordHeader::test(Kind::Txn, txid, 4096, 1)
        };
        // Nothing known before: nothing to check.
        assert!(chain_break(None, &txn(5, 1), false).is_none());
        assert!(chain_break(Some((4, 40)), &txn(5, 40), true).is_none());
        assert!(chain_break(Some((4, 40)), &txn(5, 41), true).is_some());
        assert!(chain_break(Some((4, 40)), &txn(6, 50), true).is_some());
        // A first record past the expected one: a fold raced the read, not a break.
        assert!(chain_break(Some((4, 40)), &txn(6, 50), false).is_none());
        // A snapshot starts afresh.
        let snap = RecordHeader {
            checksum_before: 7,
            ..RecordHeader::test(Kind::Snapshot, 5, 4096, 1)
        };
        assert!(chain_break(Some((4, 40)), &snap, true).is_none());
    }
}
