//! Shipping: one thread per replica moves each database's staged transactions to it.
//!
//! Every sync interval, for each database with transactions the replica does not have yet,
//! the shipper builds one level-0 segment object (docs/FORMAT.md) of all of them and stores it
//! under a key named by its first TXID. A database the replica has never seen, or whose
//! needed transactions were folded away locally, first gets a snapshot object of the staged
//! base.
//!
//! Invariants:
//! - The replica's chain for a database is gap-free: a segment starts right after the
//!   previous one (or right after a snapshot), and the shipped position only advances after
//!   the object is stored.
//! - Objects are created with `put_new`: a second writer of the same database (another
//!   machine, a copy of the data directory) collides on the next key and is stopped, loudly;
//!   the replica is never overwritten.
//! - Nothing to ship costs zero requests.
//! - Errors (a store that is down, a full disk) are retried with backoff; the staged
//!   transactions stay until shipped (folding never passes the slowest replica unless
//!   staging grows past its hard limit, which is logged).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parking_lot::{Condvar, Mutex};

use crate::capture::{Capture, Db};
use crate::crypt::Sealer;
use crate::replica::{ReplicaClient, ReplicaError};
use crate::segment::{ObjKind, ObjectWriter};
use crate::stage::{write_atomic, Kind, RecordHeader, WalPos};

/// Object key of a database's segment starting at `first` (level `level`).
pub fn segment_key(db_id: &str, level: u8, first: u64) -> String {
    format!("{db_id}/l{level}/{first:016x}.seg")
}

/// Object key of a database's snapshot at `txid`.
pub fn snapshot_key(db_id: &str, txid: u64) -> String {
    format!("{db_id}/snap/{txid:016x}.snap")
}

/// Object key holding a database's name (its path under the mount).
pub fn name_key(db_id: &str) -> String {
    format!("{db_id}/name")
}

pub struct Shipper {
    client: Box<dyn ReplicaClient>,
    sealer: Option<Arc<Sealer>>,
    /// Short stable id of the replica, for local position files.
    rid: String,
    capture: Arc<Capture>,
    positions: Mutex<HashMap<String, u64>>,
    named: Mutex<HashSet<String>>,
    fenced: Mutex<HashSet<String>>,
    last_error: Mutex<Option<String>>,
    /// Set (and signalled) to ship now instead of at the end of the interval.
    wake: (Mutex<bool>, Condvar),
    /// Signalled whenever a position advances or a shipment fails.
    progress: (Mutex<u64>, Condvar),
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
        sealer: Option<Arc<Sealer>>,
    ) -> Arc<Shipper> {
        let rid = short_hash(&client.describe());
        Arc::new(Shipper {
            client,
            sealer,
            rid,
            capture,
            positions: Mutex::new(HashMap::new()),
            named: Mutex::new(HashSet::new()),
            fenced: Mutex::new(HashSet::new()),
            last_error: Mutex::new(None),
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
                let mut backoff = Duration::ZERO;
                let mut next = Instant::now() + interval;
                loop {
                    let stopping = stop.load(Ordering::Relaxed);
                    if !stopping && Instant::now() < next {
                        // Sleep until the interval ends, a --sync waiter asks, or stop.
                        let mut asked = me.wake.0.lock();
                        if !*asked {
                            let wait = Duration::from_millis(50)
                                .min(next.saturating_duration_since(Instant::now()));
                            me.wake.1.wait_for(&mut asked, wait);
                        }
                        if !std::mem::take(&mut *asked) {
                            continue;
                        }
                    }
                    let res = me.ship_all();
                    *me.progress.0.lock() += 1;
                    me.progress.1.notify_all();
                    match res {
                        Ok(()) => {
                            backoff = Duration::ZERO;
                            *me.last_error.lock() = None;
                            next = Instant::now() + interval;
                        }
                        Err(e) => {
                            // Exponential backoff with jitter, capped at a minute.
                            backoff = (backoff * 2)
                                .clamp(Duration::from_secs(1), Duration::from_secs(60));
                            let jitter = Duration::from_millis((crate::stage::now_ns() % 1000) / 2);
                            let mut msg = format!("{e:#}");
                            if !msg.contains(&me.describe()) {
                                msg = format!("replica {}: {msg}", me.describe());
                            }
                            log::warn!("{msg}; retrying in {:?}", backoff + jitter);
                            *me.last_error.lock() = Some(msg);
                            next = Instant::now() + backoff + jitter;
                        }
                    }
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

    /// Ships every database that has something new; the first error is returned after all
    /// databases were tried.
    pub fn ship_all(&self) -> Result<()> {
        let mut first_err = None;
        for (name, db) in self.capture.databases() {
            if let Err(e) = self.ship_db(&name, &db) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
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
        if self.fenced.lock().contains(&db.id) {
            return Ok(());
        }
        let pos = self.position(db);
        let last = db.stage.last().map(|h| h.txid).unwrap_or(0);
        if last <= pos {
            return Ok(());
        }
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
            self.build_snapshot(db, &tmp, base.txid)
                .with_context(|| format!("{name}: building a snapshot"))?;
            let held = self.store(name, db, &snapshot_key(&db.id, base.txid), &tmp, base.txid)?;
            self.set_position(db, held)?;
            pos = base.txid;
            if last <= pos {
                return Ok(());
            }
        }
        let file = outbox(&tmp).context("creating the outbox file")?;
        let mut w = ObjectWriter::new(file, ObjKind::Segment, 0, &db.id)?;
        db.stage
            .for_each(pos, last, |h, pages| {
                w.add(h, |emit| pages(emit).map_err(std::io::Error::other))
                    .map_err(|e| crate::stage::StageError::Io {
                        path: tmp.to_path_buf(),
                        err: e,
                    })
            })
            .with_context(|| format!("{name}: reading staged transactions {}..={last}", pos + 1))?;
        if w.len() == 0 {
            return Ok(());
        }
        let (hdr, _) = w.finish()?;
        let held = self.store(
            name,
            db,
            &segment_key(&db.id, 0, pos + 1),
            &tmp,
            hdr.last_txid,
        )?;
        self.set_position(db, held)?;
        log::debug!(
            "{name}: shipped TXIDs {}..={} to {}",
            pos + 1,
            hdr.last_txid,
            self.describe()
        );
        Ok(())
    }

    /// Stores the local object `tmp` as `key`; a key that exists means another writer.
    fn pending_file(&self, db: &Db) -> PathBuf {
        db.stage.dir().join(format!("shipping.{}", self.rid))
    }

    /// Stores the local object `tmp` (holding TXIDs up to `last`) as `key`; returns the TXID
    /// the replica now holds up to. A key that exists means another writer, unless this mount
    /// was storing that very key when it last stopped short of recording its position (a
    /// crash, a full disk): then the object is its own, holding what that attempt held.
    fn store(&self, name: &str, db: &Db, key: &str, tmp: &Path, last: u64) -> Result<u64> {
        let pending = self.pending_file(db);
        let earlier: Option<u64> = fs::read_to_string(&pending).ok().and_then(|p| {
            p.split_once(' ')
                .and_then(|(k, t)| (k == key).then(|| t.trim().parse().ok()).flatten())
        });
        write_atomic(&pending, format!("{key} {last}").as_bytes())
            .context("recording the shipment in progress")?;
        let res = match &self.sealer {
            Some(s) => {
                let sealed = tmp.with_extension("sealed");
                let r = s
                    .seal_file(tmp, &sealed)
                    .map(|()| self.client.put_new(key, &sealed));
                let _ = fs::remove_file(&sealed);
                r?
            }
            None => self.client.put_new(key, tmp),
        };
        let _ = fs::remove_file(tmp);
        match res {
            Ok(()) => Ok(last),
            Err(ReplicaError::Exists(k)) if earlier.is_some() => {
                let held = earlier.unwrap_or(0);
                log::warn!("{name}: {k} is already in {} from an earlier attempt of this mount; it holds TXIDs up to {held}", self.describe());
                Ok(held)
            }
            Err(ReplicaError::Exists(k)) => {
                self.fenced.lock().insert(db.id.clone());
                log::error!(
                    "{name}: {k} already exists in {}: another sqlfs (another machine, or a copy of this data directory) is writing this database to the same replica. Shipping of {name} to it is stopped; the replica is left as it is.",
                    self.describe()
                );
                Err(anyhow::anyhow!(
                    "{name}: fenced off {} by another writer",
                    self.describe()
                ))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a snapshot object of the staged base (the state after `txid`) to `tmp`.
    fn build_snapshot(&self, db: &Db, tmp: &Path, txid: u64) -> Result<()> {
        let out = tempfile::tempfile()?;
        let meta = db.stage.materialize(txid, &out)?;
        let h = RecordHeader {
            kind: Kind::Snapshot,
            txid,
            time_ns: crate::stage::now_ns(),
            page_size: meta.page_size.max(512),
            db_pages: meta.db_pages,
            checksum_before: 0,
            checksum_after: meta.checksum,
            npages: meta.db_pages,
            wal: WalPos::default(),
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
        w.finish()?;
        Ok(())
    }

    /// Blocks until this replica holds `db` up to `txid` (shipping right away), or fails
    /// with the replica's error, or `timeout` passes.
    pub fn wait_shipped(&self, db: &Db, txid: u64, timeout: Duration) -> Result<()> {
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
            if let (Some(e), true) = (self.last_error(), self.position(db) < txid) {
                anyhow::bail!("{}: {e}", self.describe());
            }
        }
    }

    /// True if shipping `db` to this replica stopped because another writer owns it.
    pub fn is_fenced(&self, db: &Db) -> bool {
        self.fenced.lock().contains(&db.id)
    }

    /// The last shipping error, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }
}
