//! The claim check: a shipper ships a name only while the name's claim on the replica names
//! this data directory's writer.
//!
//! A recheck costs one request per database (a read of the claim), unless one listing of the
//! replica's claims answers for many: where the store's listing states each object's MD5
//! (S3's ETag), a claim listed with the MD5 of the bytes this shipper last read or wrote there
//! is still those bytes, as of when the listing started. While a listing is fresh (started
//! less than `CLAIM_RECHECK` ago) every database rechecked is answered from it; a claim it
//! shows otherwise (or not at all) is read as before. So a replica busy with a thousand
//! databases takes one listing of their claims every 10 s instead of a hundred reads a second.
//!
//! Invariants:
//! - A database name has one owner per replica: its claim (`owner`). A shipper ships a name
//!   only while the claim names this data directory's writer (checked when it first ships
//!   the name in this process, and again at most every `CLAIM_RECHECK` before shipping);
//!   another writer's claim fences it. Replacing a claim is explicit: `--takeover`, or a
//!   database `--restore-if-missing` restored.
//! - A listing only confirms: it counts as a check at the time it started, and only for a
//!   claim whose listed MD5 equals that of bytes this shipper read from or wrote to that
//!   key and found to be its own. Anything else is decided by reading the claim.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

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

/// Keys one listing page holds (S3's default): what a listing of `n` claims costs.
const LIST_PAGE: usize = 1000;

/// A claim last found to be this mount's.
pub(super) struct Seen {
    name: String,
    /// When it was last known to be this mount's (the start of the read or listing that
    /// showed it).
    at: Instant,
    /// MD5 of the claim's bytes as read or written then (when all of them were seen).
    md5: Option<[u8; 16]>,
}

/// One listing of the replica's claims, shared by the rechecks made while it is fresh.
#[derive(Default)]
pub(super) struct ClaimList {
    /// When the listing started (`None`: none yet).
    started: Option<Instant>,
    /// Claim key → the MD5 its listing states.
    md5: HashMap<String, [u8; 16]>,
    /// Keys it held (what the next listing will cost).
    len: usize,
    /// The store's listings state no digests: claims are always read.
    unsupported: bool,
}

fn md5_of(b: &[u8]) -> [u8; 16] {
    Md5::digest(b).into()
}

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
    ) -> Result<std::result::Result<[u8; 16], ReplicaError>> {
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
        let md5 = md5_of(&bytes);
        if replace {
            return Ok(self.client.put(key, &bytes).map(|()| md5));
        }
        let tmp = db.stage.dir().join(format!("claim.{}.tmp", self.rid));
        write_atomic(&tmp, &bytes).context("writing a claim")?;
        let r = self.client.put_new(key, &tmp);
        let _ = fs::remove_file(&tmp);
        Ok(r.map(|()| md5))
    }

    /// True if a fresh listing of this replica's claims (made now if the last one is no
    /// longer fresh and a listing is worth its cost) shows `key` holding the bytes whose MD5
    /// is `md5`: the claim of `db_id` was this mount's when the listing started, which then
    /// counts as its last check. False means "read the claim".
    fn listed_unchanged(&self, db_id: &str, key: &str, md5: [u8; 16]) -> bool {
        // One listing at a time: the workers that want one meanwhile wait for it.
        let mut l = self.claim_list.lock();
        if l.unsupported {
            return false;
        }
        let fresh = l.started.is_some_and(|t| t.elapsed() < CLAIM_RECHECK);
        if !fresh {
            // Worth it only while it replaces more reads than it takes pages.
            let pages = l.len / LIST_PAGE + 1;
            if self.claims.lock().len() < 2 * pages {
                return false;
            }
            let started = Instant::now();
            match self.client.list_md5("claims/") {
                Ok(Some(v)) => {
                    *l = ClaimList {
                        started: Some(started),
                        len: v.len(),
                        md5: v
                            .into_iter()
                            .filter_map(|(o, m)| Some((o.key, m?)))
                            .collect(),
                        unsupported: false,
                    };
                }
                Ok(None) => {
                    l.unsupported = true;
                    return false;
                }
                Err(e) => {
                    // Claims are read one by one until the next listing is due.
                    log::debug!("listing the claims in {}: {e:#}", self.describe());
                    *l = ClaimList {
                        started: Some(started),
                        len: l.len,
                        ..ClaimList::default()
                    };
                    return false;
                }
            }
        }
        let (Some(started), Some(&listed)) = (l.started, l.md5.get(key)) else {
            return false;
        };
        if listed != md5 {
            return false;
        }
        if let Some(s) = self.claims.lock().get_mut(db_id) {
            s.at = s.at.max(started);
        }
        true
    }

    /// Checks that the claim of `name` in this replica is this mount's, making it if there is
    /// none (the store's conditional create), moving it to `db` if this data directory
    /// created the database again under the name, or replacing it when a takeover was asked
    /// for. Another writer's claim fences `db`. Checked when `name` first ships in this
    /// process, then at most every [`CLAIM_RECHECK`].
    pub(super) fn check_claim(&self, name: &str, db: &Db) -> Result<()> {
        let key = claim_key(name);
        let (first, seen) = match self.claims.lock().get(&db.id) {
            Some(s) if s.name == name && s.at.elapsed() < CLAIM_RECHECK => return Ok(()),
            Some(s) => (s.name != name, s.md5.filter(|_| s.name == name)),
            None => (true, None),
        };
        if let Some(md5) = seen {
            if self.listed_unchanged(&db.id, &key, md5) {
                return Ok(());
            }
        }
        let started = Instant::now();
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
        // MD5 of the claim's bytes as this mount last saw them, once they are its own.
        let mut md5 = None;
        let theirs = loop {
            let Some(b) = self.client.get_range(&key, 0, 4096)? else {
                if created {
                    anyhow::bail!(
                        "{name}: the claim {key} just created in {} cannot be read back",
                        self.describe()
                    );
                }
                match self.write_claim(db, &key, &mine, false)? {
                    Ok(m) => {
                        md5 = Some(m);
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
            // All of it was read (claims are far smaller than the range asked for).
            if b.len() < 4096 {
                md5 = Some(md5_of(&b));
            }
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
                md5 = Some(self.write_claim(db, &key, &mine, true)??);
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
        self.claims.lock().insert(
            db.id.clone(),
            Seen {
                name: name.to_string(),
                at: started,
                md5,
            },
        );
        Ok(())
    }
}
