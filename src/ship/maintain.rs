//! Maintenance of a database on a replica: interval snapshots, compaction runs, retention.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use super::pack::Pack;
use super::{db_policy, Policy, Shipper};
use crate::capture::Db;
use crate::catalog::{compacted_key, snapshot_key, DbCatalog, Obj, Reader};
use crate::compact;
use crate::replica::ReplicaError;
use crate::segment::{ObjHeader, ObjKind, ObjectWriter};
use crate::stage::{now_ns, Kind, RecordHeader, WalPos};

/// What the shipper knows of one database on its replica.
pub(super) struct Maint {
    pub(super) cat: DbCatalog,
    /// When each level last ran (index = level).
    pub(super) last_compact: Vec<Instant>,
    /// Per level: TXIDs up to which runs were skipped (not cached locally, encrypted).
    pub(super) skip_to: Vec<u64>,
    /// When the newest snapshot was stored (ns).
    pub(super) last_snapshot_ns: u64,
    /// The numbers of its spare files (`spare`).
    pub(super) spares: Vec<u32>,
    /// The index of its pack of level-0 copies (`pack`).
    pub(super) pack: Pack,
}

impl Shipper {
    /// The policy for database `name`: this replica's, with the database's own settings.
    pub(super) fn policy_for(&self, name: &str) -> Policy {
        db_policy(&self.policy, self.rules.get(name))
    }

    /// Loads what the replica holds for `db` (one listing) the first time it ships in this
    /// process. Objects past this mount's position (other than its own unfinished one) mean
    /// another writer moved the chain on: that fences it, even where retention removed the
    /// key this mount would collide on.
    pub(super) fn load_catalog(&self, name: &str, db: &Db, pos: u64) -> Result<()> {
        if self.maint.lock().contains_key(&db.id) {
            return Ok(());
        }
        let reader = Reader::new(self.client.as_ref(), None);
        let cat = reader.catalog(&db.id, name)?;
        let pending_key = self.ledger(db)?.lock().pending_key().map(str::to_string);
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
        let levels = self.policy_for(name).levels;
        let n = levels.len() + 1;
        // Each database's first compaction of a level falls due at its own point of the
        // level's interval (a hash of its id), so databases that began shipping together (a
        // mount over thousands) do not all compact at once and hold every worker, and each
        // later one an interval after that.
        let now = Instant::now();
        let last_compact = (0..n)
            .map(|level| {
                let every = level
                    .checked_sub(1)
                    .and_then(|i| levels.get(i))
                    .map_or(0, |d| d.as_millis() as u64);
                let phase =
                    u64::from_str_radix(&super::short_hash(&format!("{}/{level}", db.id)), 16)
                        .unwrap_or(0)
                        % every.max(1);
                now.checked_sub(std::time::Duration::from_millis(phase))
                    .unwrap_or(now)
            })
            .collect();
        self.maint.lock().insert(
            db.id.clone(),
            Maint {
                cat,
                last_compact,
                skip_to: vec![0; n],
                last_snapshot_ns,
                spares: self.find_spares(db),
                pack: Pack::load(&self.pack_path(db)),
            },
        );
        Ok(())
    }

    /// Local copy of an object this shipper stored, kept until a higher level merges it.
    pub(super) fn cache_path(&self, db: &Db, key: &str) -> PathBuf {
        self.objects_dir(db).join(key.replace('/', "_"))
    }

    /// Where `db`'s local copies (and spare files) for this replica are kept.
    pub(super) fn objects_dir(&self, db: &Db) -> PathBuf {
        db.stage.dir().join(format!("objects.{}", self.rid))
    }

    /// Records an object just stored (holding TXIDs `txids`) from the local file `local`
    /// (`bytes`: its bytes, if the caller has them in memory): in the catalog, and in the
    /// local cache when a higher level will merge it.
    pub(super) fn stored(
        &self,
        db: &Db,
        key: &str,
        level: Option<u8>,
        txids: std::ops::RangeInclusive<u64>,
        local: &Path,
        bytes: Option<&[u8]>,
    ) {
        let (first, last) = txids.into_inner();
        let size = match bytes {
            Some(b) => b.len() as u64,
            None => fs::metadata(local).map_or(0, |m| m.len()),
        };
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
        if level.is_some_and(|l| (l as usize) < levels) && room_for_copy(local, size) {
            if level == Some(0) && self.pack_copy(db, key, local, size, bytes) {
                return;
            }
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
    pub(super) fn put_derived(&self, key: &str, local: &Path) -> Result<()> {
        match self.seal_and_put_new(key, local)? {
            Ok(()) | Err(ReplicaError::Exists(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Encrypts the local object `local` if this replica is encrypted, and creates `key`
    /// from it. The outer error is local (encryption); the inner one is the replica's.
    pub(super) fn seal_and_put_new(
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
    pub(super) fn maintain(&self, name: &str, db: &Db) -> Result<()> {
        if self.is_fenced(db) || !self.maint.lock().contains_key(&db.id) {
            return Ok(());
        }
        let pos = self.position(db);
        let tmp = db.stage.dir().join(format!("maint.{}.tmp", self.rid));
        let res = self.maintain_via(name, db, pos, &tmp);
        if tmp.exists() {
            self.recycle(db, &tmp);
        }
        res
    }

    pub(super) fn maintain_via(&self, name: &str, db: &Db, pos: u64, tmp: &Path) -> Result<()> {
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
            self.stored(db, &key, None, pos..=pos, tmp, None);
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
            if !keys.is_empty() {
                // What the position passed must not come back after a crash (`ledger`).
                self.settle(db)?;
            }
            for key in &keys {
                self.client.delete(key)?;
                let _ = fs::remove_file(self.cache_path(db, key));
                self.unpack(db, [key.as_str()]);
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

    /// When `db`'s maintenance on this replica falls due next, if anything is pending: an
    /// interval snapshot of a shipped state newer than the newest snapshot, a level with a run
    /// to merge, objects retention will delete. `None` when nothing is pending (an idle
    /// database whose objects are merged as far as they go sits on no timer). Never sooner
    /// than a sync interval from now, so a decision that keeps coming out due cannot spin.
    pub(super) fn next_maintenance(&self, name: &str, db: &Db) -> Option<Instant> {
        if self.is_fenced(db) {
            return None;
        }
        let p = self.policy_for(name);
        let pos = self.position(db);
        let m = self.maint.lock();
        let m = m.get(&db.id)?;
        let now = Instant::now();
        let at_ns =
            |due_ns: u64| now + std::time::Duration::from_nanos(due_ns.saturating_sub(now_ns()));
        let mut due: Vec<Instant> = Vec::new();
        let newest = m.cat.snaps.last().map_or(0, |s| s.first);
        if !p.snapshot_interval.is_zero() && pos > newest {
            due.push(at_ns(
                m.last_snapshot_ns
                    .saturating_add(p.snapshot_interval.as_nanos() as u64),
            ));
        }
        for level in 1..=p.levels.len() {
            if !compact::next_run(&m.cat, level, m.skip_to[level]).is_empty() {
                due.push(m.last_compact[level] + p.levels[level - 1]);
            }
        }
        if !p.retention.is_zero() {
            if let Some(t) = compact::next_expiry(&m.cat, p.retention.as_nanos() as u64) {
                due.push(at_ns(t));
            }
        }
        let soonest = now + self.sched.interval().max(std::time::Duration::from_secs(1));
        due.into_iter().min().map(|t| t.max(soonest))
    }

    /// Merges `run` (consecutive objects one level below) into one object of `level`.
    pub(super) fn compact_run(
        &self,
        name: &str,
        db: &Db,
        level: u8,
        run: &[Obj],
        tmp: &Path,
    ) -> Result<()> {
        // (key, file, range of the file): a pack entry, a local copy, or a fetched object.
        type Source = (String, PathBuf, Option<(u64, u64)>);
        let mut inputs: Vec<Source> = Vec::new();
        let mut fetched = Vec::new();
        let reader = Reader::new(self.client.as_ref(), None);
        let pack = self.pack_path(db);
        for (i, o) in run.iter().enumerate() {
            // Local copies are not synced when kept: one a crash damaged counts as missing.
            if let Some((off, len)) = self.packed(db, &o.key) {
                let intact = fs::File::open(&pack)
                    .map_err(|e| e.to_string())
                    .and_then(|f| {
                        let h = crate::segment::verify(
                            crate::segment::Slice::new(&f, off, len),
                            &o.key,
                        )
                        .map_err(|e| e.to_string())?;
                        if (h.first_txid, h.last_txid) == (o.first, o.last) {
                            Ok(())
                        } else {
                            Err(format!("it holds TXIDs {}..={}", h.first_txid, h.last_txid))
                        }
                    });
                match intact {
                    Ok(()) => {
                        inputs.push((o.key.clone(), pack.clone(), Some((off, len))));
                        continue;
                    }
                    Err(e) => {
                        log::warn!(
                            "{name}: the local copy of {} is damaged ({e}); not used",
                            o.key
                        );
                        self.unpack(db, [o.key.as_str()]);
                    }
                }
            }
            let c = self.cache_path(db, &o.key);
            let intact = match fs::File::open(&c) {
                Ok(f) => match crate::segment::verify(&f, &o.key) {
                    Ok(_) => true,
                    Err(e) => {
                        log::warn!(
                            "{name}: the local copy of {} is damaged ({e}); not used",
                            o.key
                        );
                        let _ = fs::remove_file(&c);
                        false
                    }
                },
                Err(_) => false,
            };
            if intact {
                inputs.push((o.key.clone(), c, None));
            } else if self.sealer.is_none() {
                let local = db.stage.dir().join(format!("fetch.{}.{i}", self.rid));
                fetched.push(local.clone());
                inputs.push((o.key.clone(), reader.fetch(&o.key, &local)?, None));
            } else {
                // Encrypted, and this machine has no key: leave the run to the lower level.
                let last = run.last().map_or(0, |o| o.last);
                log::info!("{name}: level {level} skips TXIDs {}..: {} has no intact local copy (stored before this mount started, or damaged by a crash) and is encrypted", run[0].first, o.key);
                if let Some(m) = self.maint.lock().get_mut(&db.id) {
                    m.skip_to[level as usize] = last;
                }
                return Ok(());
            }
        }
        let refs: Vec<compact::Input<'_>> = inputs
            .iter()
            .map(|(k, p, range)| compact::Input {
                key: k.clone(),
                path: p,
                range: *range,
            })
            .collect();
        let res = compact::merge(
            &refs,
            level,
            &db.id,
            self.fresh_file(db, tmp)?,
            &tmp.with_extension("pages"),
        );
        for f in &fetched {
            let _ = fs::remove_file(f);
        }
        // The page file is kept, emptied, for the next compaction (no file created each time).
        let _ = fs::OpenOptions::new()
            .write(true)
            .open(tmp.with_extension("pages"))
            .and_then(|f| f.set_len(0));
        let hdr = res.with_context(|| format!("{name}: compacting into level {level}"))?;
        let key = compacted_key(&db.id, level, hdr.first_txid, hdr.last_txid);
        self.put_derived(&key, tmp)?;
        self.stored(
            db,
            &key,
            Some(level),
            hdr.first_txid..=hdr.last_txid,
            tmp,
            None,
        );
        for (_, p, range) in &inputs {
            if range.is_none() && p.starts_with(self.objects_dir(db)) {
                self.recycle(db, p);
            }
        }
        self.unpack(
            db,
            inputs
                .iter()
                .filter(|(_, _, r)| r.is_some())
                .map(|(k, _, _)| k.as_str()),
        );
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
    pub(super) fn build_snapshot(&self, db: &Db, tmp: &Path, txid: u64) -> Result<ObjHeader> {
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
        let mut w = ObjectWriter::new(self.fresh_file(db, tmp)?, ObjKind::Snapshot, 0, &db.id)?;
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
}

/// True if the filesystem holding `local` keeps room to spare with a local copy of `size`
/// bytes in it: a tenth of it, at least 16 MiB and at most 1 GiB. A local copy only saves
/// compaction a download; on a filling disk the room is staging's (and the app's), and
/// compaction fetches the object from the replica instead (or, encrypted, leaves the run to
/// the lower level).
fn room_for_copy(local: &Path, size: u64) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(local.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statvfs is a valid out-parameter; c is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } < 0 {
        return false;
    }
    let unit = s.f_frsize as u64;
    let (total, free) = (s.f_blocks as u64 * unit, s.f_bavail as u64 * unit);
    let spare = (total / 10).clamp(16 << 20, 1 << 30);
    free.saturating_sub(size) >= spare
}
