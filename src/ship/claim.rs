//! The claim check: a shipper ships a name only while the name's claim on the replica names
//! this data directory's writer.
//!
//! Invariants:
//! - A database name has one owner per replica: its claim (`owner`). A shipper ships a name
//!   only while the claim names this data directory's writer (checked when it first ships
//!   the name in this process, and again at most every `CLAIM_RECHECK` before shipping);
//!   another writer's claim fences it. Replacing a claim is explicit: `--takeover`, or a
//!   database `--restore-if-missing` restored.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{takeover_marker, Shipper};
use crate::capture::Db;
use crate::crypt::Opener;
use crate::owner::{claim_key, Claim};
use crate::replica::ReplicaError;
use crate::stage::{now_ns, write_atomic};

/// How often a shipper that ships a name reads its claim again (a writer that took the name
/// over fences this one within this long of its next shipment).
pub(super) const CLAIM_RECHECK: Duration = Duration::from_secs(10);

impl Shipper {
    /// Where this data directory keeps the exact bytes of the claim of `key` it last wrote
    /// to this replica (with the database id it named): an encrypted claim this mount cannot
    /// decrypt is recognised as its own by them.
    pub(super) fn claim_record(&self, key: &str) -> PathBuf {
        self.writer
            .meta_dir
            .join(format!("claims.{}", self.rid))
            .join(key.trim_start_matches("claims/"))
    }

    /// The claim `b` read from `key`: its own parse, or for an encrypted one, its decryption
    /// with this replica's key, or this mount's record of what it wrote; `None` if it cannot
    /// be read.
    pub(super) fn read_claim(&self, key: &str, b: &[u8], mine: &Claim) -> Option<Claim> {
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
    pub(super) fn write_claim(
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
    pub(super) fn check_claim(&self, name: &str, db: &Db) -> Result<()> {
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
}
