//! Storing an object with the fence: every attempt is recorded before it is sent, and a key
//! that already exists is read back and its header checked, never assumed to hold this attempt.
//!
//! Invariants:
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

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::Shipper;
use crate::capture::Db;
use crate::catalog::Reader;
use crate::crypt::Opener;
use crate::replica::ReplicaError;
use crate::segment::{ObjHeader, ObjKind};

/// How many first bytes of an object sent identify the attempt (for an encrypted replica this
/// mount cannot decrypt: the age header's random file key makes every encryption unique).
const FINGERPRINT_BYTES: u64 = 1024;

/// What an object being stored holds, to check a key that already exists against.
pub(super) struct Want {
    pub(super) kind: ObjKind,
    pub(super) first: u64,
    /// The last TXID this attempt holds.
    pub(super) last: u64,
    pub(super) checksum_before: u64,
    /// The rolling checksum after each TXID `first..=last` as staged.
    pub(super) after: Vec<u64>,
}

/// One attempt to store a key, as recorded in the shipping ledger (`ledger`) before it is
/// sent.
#[derive(Clone)]
pub(super) struct Attempt {
    pub(super) key: String,
    pub(super) last: u64,
    /// Length and CRC-64 of the first bytes sent.
    pub(super) fp: (u64, u64),
}

impl Attempt {
    pub(super) fn line(&self) -> String {
        format!(
            "{} {} {} {:016x}\n",
            self.key, self.last, self.fp.0, self.fp.1
        )
    }

    pub(super) fn parse(l: &str) -> Option<Attempt> {
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
pub(super) fn fingerprint(b: &[u8]) -> (u64, u64) {
    let b = &b[..b.len().min(FINGERPRINT_BYTES as usize)];
    let mut d = crate::sqlite::crc64();
    d.update(b);
    (b.len() as u64, d.finalize())
}

impl Shipper {
    /// Stores the local object `tmp` (holding `want`; `bytes`: the same bytes, if the caller
    /// has them in memory) as `key`; returns the TXID the replica now holds up to. Each
    /// attempt is recorded (its last TXID and a fingerprint of its first bytes, see
    /// [`Attempt`]) before it is sent. A key that already exists is read back and never
    /// assumed to hold this attempt: see [`Shipper::read_back`].
    pub(super) fn store(
        &self,
        name: &str,
        db: &Db,
        key: &str,
        tmp: &Path,
        want: &Want,
        bytes: Option<&[u8]>,
    ) -> Result<u64> {
        let sealed = tmp.with_extension("sealed");
        let (send, bytes) = match &self.sealer {
            Some(s) => {
                s.seal_file(tmp, &sealed)?;
                (sealed.as_path(), None)
            }
            None => (tmp, bytes),
        };
        let res = self.store_file(name, db, key, send, want, bytes);
        if self.sealer.is_some() {
            let _ = fs::remove_file(&sealed);
        }
        res
    }

    pub(super) fn store_file(
        &self,
        name: &str,
        db: &Db,
        key: &str,
        send: &Path,
        want: &Want,
        bytes: Option<&[u8]>,
    ) -> Result<u64> {
        let fp = match bytes {
            Some(b) => fingerprint(b),
            None => {
                let mut head = Vec::new();
                fs::File::open(send)
                    .and_then(|f| {
                        std::io::Read::read_to_end(
                            &mut std::io::Read::take(f, FINGERPRINT_BYTES),
                            &mut head,
                        )
                    })
                    .context("reading the object to send")?;
                fingerprint(&head)
            }
        };
        // Recorded durably before it is sent, with the position every earlier shipment
        // reached (`ledger`).
        let attempts = {
            let l = self.ledger(db)?;
            let mut l = l.lock();
            l.attempt(
                &self.ledger_file(db),
                Attempt {
                    key: key.to_string(),
                    last: want.last,
                    fp,
                },
            )
            .context("recording the shipment in progress")?;
            l.attempts().to_vec()
        };
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
    pub(super) fn read_back(
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
    pub(super) fn check_header(
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
    pub(super) fn fence(&self, db: &Db, why: String) {
        self.fenced.lock().insert(db.id.clone(), why);
    }
}
