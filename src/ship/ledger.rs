//! The shipping ledger of one database on one replica (`ship.<replica>` in the database's
//! staging directory): the position (the TXID up to which the replica holds the database)
//! and the attempts at the key being stored there, rewritten in place with one `fdatasync`
//! per shipment and no file created.
//!
//! Layout (docs/FORMAT.md): two slots of [`SLOT`] bytes, at offsets 0 and [`SLOT`]. A slot
//! holds, big-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SQSH` |
//! | 4 | 1 | version (1) |
//! | 5 | 3 | reserved (0) |
//! | 8 | 8 | sequence number |
//! | 16 | 8 | position |
//! | 24 | 4 | `n`: bytes of attempts |
//! | 28 | n | attempts, one a line: `key last-txid fingerprint-length fingerprint-crc64` |
//! | 28 + n | 8 | CRC-64 of bytes 0..28 + n |
//!
//! The current state is the valid slot with the higher sequence number. A write goes to the
//! other slot and is synced before anything depends on it, so a write a crash tears leaves
//! the slot before it current: the state from before that write, which nothing acted on yet.
//!
//! Invariant (what `load_catalog`'s fence check and a restarted shipper rely on): at most one
//! object of the replica lies past the durable position, and it is the key of the durable
//! attempts. It holds because an attempt is recorded, together with the position reached by
//! every shipment before it, durably before its key is sent ([`Ledger::attempt`]); a
//! position reached by a shipment is only in memory until then ([`Ledger::advance`]).
//! Whatever removes objects from the replica or staging below the position (compaction,
//! retention, folding) first makes it durable ([`Ledger::settle`]), and unmount settles
//! every ledger. After a crash the shipper restarts from the durable position: the key it
//! sends next exists, and is read back (`store`), as for any attempt whose answer was lost.
//!
//! Ledgers of earlier versions (`shipped.<replica>`, `shipping.<replica>`: text files
//! replaced whole) are read when no `ship.<replica>` exists, and removed once it does.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::store::Attempt;

/// Bytes of one slot (the attempts of a key retried through a long outage fit; past that,
/// the oldest are dropped).
pub(super) const SLOT: usize = 64 << 10;

const MAGIC: &[u8; 4] = b"SQSH";
const VERSION: u8 = 1;
/// Bytes of a slot before its attempts.
const HEAD: usize = 28;

/// The ledger's file name for replica `rid`.
pub fn ledger_file(stage_dir: &Path, rid: &str) -> PathBuf {
    stage_dir.join(format!("ship.{rid}"))
}

/// One database's ledger on one replica, as this process knows it.
/// (Kept for every database that shipped in this process, so it holds no path: the caller
/// names the file, [`ledger_file`].)
pub(super) struct Ledger {
    /// The earlier version's files exist (removed once this one is written).
    legacy: bool,
    /// The sequence number of the current slot (0: no slot written yet).
    seq: u64,
    /// The position as last written to the file.
    durable: u64,
    /// The position as this process knows it: at least `durable` unless lowered.
    pos: u64,
    /// The attempts at the key being stored, as last written.
    attempts: Vec<Attempt>,
}

impl Ledger {
    /// Reads the ledger of replica `rid` in staging directory `dir` (an earlier version's
    /// files if it has none; an empty ledger if neither exists). A ledger whose slots are
    /// both damaged is reported, not guessed at.
    pub(super) fn load(dir: &Path, rid: &str) -> io::Result<Ledger> {
        let path = ledger_file(dir, rid);
        let (old_pos, old_try) = legacy_files(&path);
        let mut l = Ledger {
            legacy: false,
            seq: 0,
            durable: 0,
            pos: 0,
            attempts: Vec::new(),
        };
        let mut buf = Vec::new();
        match File::open(&path) {
            Ok(f) => {
                f.take(2 * SLOT as u64).read_to_end(&mut buf)?;
                let best = [0, SLOT]
                    .iter()
                    .filter_map(|&off| buf.get(off..).and_then(parse_slot))
                    .max_by_key(|s| s.0);
                let Some((seq, pos, attempts)) = best else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: neither slot of the shipping ledger is intact",
                            path.display()
                        ),
                    ));
                };
                (l.seq, l.durable, l.pos, l.attempts) = (seq, pos, pos, attempts);
                l.legacy = old_pos.exists() || old_try.exists();
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let pos = fs::read_to_string(&old_pos)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                let attempts = fs::read_to_string(&old_try)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(Attempt::parse)
                    .collect();
                (l.durable, l.pos, l.attempts) = (pos, pos, attempts);
                l.legacy = true;
            }
            Err(e) => return Err(e),
        }
        Ok(l)
    }

    /// The position as this process knows it.
    pub(super) fn position(&self) -> u64 {
        self.pos
    }

    /// The position a crash now would leave.
    pub(super) fn durable(&self) -> u64 {
        self.durable
    }

    /// The key of the recorded attempts, if any.
    pub(super) fn pending_key(&self) -> Option<&str> {
        self.attempts.first().map(|a| a.key.as_str())
    }

    /// The recorded attempts.
    pub(super) fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    /// Records `a` (after the earlier attempts at its key; those at other keys are dropped)
    /// together with the current position, durably: call before sending `a`.
    pub(super) fn attempt(&mut self, file: &Path, a: Attempt) -> io::Result<()> {
        let mut attempts: Vec<Attempt> = std::mem::take(&mut self.attempts)
            .into_iter()
            .filter(|o| o.key == a.key)
            .collect();
        attempts.push(a);
        let dropped = fit(&mut attempts);
        if dropped > 0 {
            log::warn!(
                "{}: {dropped} oldest attempts at {} dropped from the shipping ledger (it is full)",
                file.display(),
                attempts[0].key
            );
        }
        self.attempts = attempts;
        self.write(file, self.pos)
    }

    /// The replica now holds the database up to `txid` (a shipment stored, or read back):
    /// in memory only, made durable by the next [`Ledger::attempt`] or [`Ledger::settle`].
    pub(super) fn advance(&mut self, txid: u64) {
        self.pos = txid;
        self.attempts.clear();
    }

    /// Sets the position to `txid` (which may lower it) durably.
    pub(super) fn set(&mut self, file: &Path, txid: u64) -> io::Result<()> {
        self.pos = txid;
        self.attempts.clear();
        self.write(file, txid)
    }

    /// Makes the position durable, if it is not.
    pub(super) fn settle(&mut self, file: &Path) -> io::Result<()> {
        if self.durable == self.pos {
            return Ok(());
        }
        self.write(file, self.pos)
    }

    fn write(&mut self, file: &Path, pos: u64) -> io::Result<()> {
        let seq = self.seq + 1;
        let slot = encode_slot(seq, pos, &self.attempts);
        // A ledger with a slot written or read exists already.
        let created = self.seq == 0 && !file.exists();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(file)?;
        // Slot 1 for odd sequence numbers, 0 for even: never the current one.
        let off = if seq % 2 == 1 { SLOT as u64 } else { 0 };
        f.write_all_at(&slot, off)?;
        f.sync_data()?;
        if created {
            if let Some(d) = file.parent() {
                File::open(d)?.sync_all()?;
            }
        }
        self.seq = seq;
        self.durable = pos;
        if std::mem::take(&mut self.legacy) {
            let (p, t) = legacy_files(file);
            let _ = fs::remove_file(p);
            let _ = fs::remove_file(t);
        }
        Ok(())
    }
}

/// Writes a fresh ledger holding position `txid` for replica `rid` in staging directory
/// `dir` (a database seeded from a replica's chain).
pub fn seed(dir: &Path, rid: &str, txid: u64) -> io::Result<()> {
    let mut l = Ledger::load(dir, rid).unwrap_or(Ledger {
        legacy: false,
        seq: 0,
        durable: 0,
        pos: 0,
        attempts: Vec::new(),
    });
    l.set(&ledger_file(dir, rid), txid)
}

/// The earlier version's position and attempt files beside ledger `path` (`ship.<rid>`).
fn legacy_files(path: &Path) -> (PathBuf, PathBuf) {
    let rid = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("ship."))
        .unwrap_or("");
    (
        path.with_file_name(format!("shipped.{rid}")),
        path.with_file_name(format!("shipping.{rid}")),
    )
}

/// Drops the oldest attempts until the rest fit a slot; returns how many were dropped.
fn fit(attempts: &mut Vec<Attempt>) -> usize {
    let mut dropped = 0;
    while attempts.len() > 1
        && HEAD + 8 + attempts.iter().map(|a| a.line().len()).sum::<usize>() > SLOT
    {
        attempts.remove(0);
        dropped += 1;
    }
    dropped
}

fn encode_slot(seq: u64, pos: u64, attempts: &[Attempt]) -> Vec<u8> {
    let text: String = attempts.iter().map(Attempt::line).collect();
    let mut b = Vec::with_capacity(HEAD + text.len() + 8);
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.extend_from_slice(&[0; 3]);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&pos.to_be_bytes());
    b.extend_from_slice(&(text.len() as u32).to_be_bytes());
    b.extend_from_slice(text.as_bytes());
    let mut crc = crate::sqlite::crc64();
    crc.update(&b);
    b.extend_from_slice(&crc.finalize().to_be_bytes());
    b
}

/// The slot at the start of `b`, if intact: (sequence number, position, attempts).
fn parse_slot(b: &[u8]) -> Option<(u64, u64, Vec<Attempt>)> {
    let head = b.get(..HEAD)?;
    if &head[..4] != MAGIC || head[4] != VERSION {
        return None;
    }
    let be8 = |s: &[u8]| u64::from_be_bytes(s.try_into().unwrap_or([0; 8]));
    let n = u32::from_be_bytes(head[24..28].try_into().ok()?) as usize;
    if HEAD + n + 8 > SLOT {
        return None;
    }
    let body = b.get(..HEAD + n)?;
    let stored = be8(b.get(HEAD + n..HEAD + n + 8)?);
    let mut crc = crate::sqlite::crc64();
    crc.update(body);
    if crc.finalize() != stored {
        return None;
    }
    let text = std::str::from_utf8(&body[HEAD..]).ok()?;
    Some((
        be8(&head[8..16]),
        be8(&head[16..24]),
        text.lines().filter_map(Attempt::parse).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(key: &str, last: u64) -> Attempt {
        Attempt {
            key: key.into(),
            last,
            fp: (1024, last * 7),
        }
    }

    #[test]
    fn positions_become_durable_with_the_next_attempt_or_a_settle() {
        let d = tempfile::tempdir().unwrap();
        let f = ledger_file(d.path(), "r");
        let mut l = Ledger::load(d.path(), "r").unwrap();
        assert_eq!((l.position(), l.durable()), (0, 0));
        l.attempt(&f, att("k1", 5)).unwrap();
        l.advance(5);
        assert_eq!((l.position(), l.durable()), (5, 0));
        // A crash now: the position before the shipment, and its attempt.
        let r = Ledger::load(d.path(), "r").unwrap();
        assert_eq!((r.position(), r.pending_key()), (0, Some("k1")));
        l.attempt(&f, att("k6", 9)).unwrap();
        let r = Ledger::load(d.path(), "r").unwrap();
        assert_eq!((r.position(), r.pending_key()), (5, Some("k6")));
        l.advance(9);
        l.settle(&f).unwrap();
        let r = Ledger::load(d.path(), "r").unwrap();
        assert_eq!((r.position(), r.pending_key()), (9, None));
        // Lowered, durably.
        l.set(&f, 3).unwrap();
        assert_eq!(Ledger::load(d.path(), "r").unwrap().position(), 3);
    }

    #[test]
    fn attempts_at_one_key_accumulate_and_another_key_starts_afresh() {
        let d = tempfile::tempdir().unwrap();
        let f = ledger_file(d.path(), "r");
        let mut l = Ledger::load(d.path(), "r").unwrap();
        l.attempt(&f, att("k1", 5)).unwrap();
        l.attempt(&f, att("k1", 8)).unwrap();
        let r = Ledger::load(d.path(), "r").unwrap();
        let lasts: Vec<u64> = r.attempts().iter().map(|a| a.last).collect();
        assert_eq!(lasts, [5, 8]);
        assert_eq!(r.attempts()[1].fp, (1024, 56));
        l.attempt(&f, att("s0", 4)).unwrap();
        assert_eq!(Ledger::load(d.path(), "r").unwrap().attempts().len(), 1);
    }

    #[test]
    fn a_torn_write_leaves_the_state_before_it() {
        let d = tempfile::tempdir().unwrap();
        let f = ledger_file(d.path(), "r");
        let mut l = Ledger::load(d.path(), "r").unwrap();
        l.set(&f, 7).unwrap(); // seq 1: slot 1
        l.attempt(&f, att("k8", 9)).unwrap(); // seq 2: slot 0
        let path = ledger_file(d.path(), "r");
        // Tear the newest slot (0) in its attempts.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"XX", HEAD as u64 + 2).unwrap();
        let r = Ledger::load(d.path(), "r").unwrap();
        assert_eq!((r.position(), r.pending_key()), (7, None));
        // Both torn: an error, not a guess.
        f.write_all_at(b"XX", SLOT as u64 + 8).unwrap();
        let e = Ledger::load(d.path(), "r").err().unwrap();
        assert!(e.to_string().contains("neither slot"), "{e}");
    }

    #[test]
    fn an_earlier_versions_files_are_read_then_replaced() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("shipped.r"), "12").unwrap();
        fs::write(d.path().join("shipping.r"), att("k13", 20).line()).unwrap();
        let f = ledger_file(d.path(), "r");
        let mut l = Ledger::load(d.path(), "r").unwrap();
        assert_eq!((l.position(), l.pending_key()), (12, Some("k13")));
        l.attempt(&f, att("k13", 22)).unwrap();
        assert!(!d.path().join("shipped.r").exists());
        assert!(!d.path().join("shipping.r").exists());
        let r = Ledger::load(d.path(), "r").unwrap();
        assert_eq!((r.position(), r.attempts().len()), (12, 2));
    }

    #[test]
    fn a_full_slot_drops_the_oldest_attempts() {
        let long = "k".repeat(1000);
        let mut a: Vec<Attempt> = (0..100).map(|i| att(&long, i)).collect();
        let dropped = fit(&mut a);
        assert!(dropped > 0 && a.len() + dropped == 100);
        assert_eq!(a.last().unwrap().last, 99);
        assert!(encode_slot(1, 1, &a).len() <= SLOT);
    }
}
