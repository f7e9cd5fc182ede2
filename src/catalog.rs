//! Catalog: what a replica holds for each database, and restore plans over it.
//!
//! Object keys (docs/FORMAT.md, "Replica layout") name each object's database, level and
//! TXIDs, so one listing per database gives its whole chain; commit times come from object
//! headers, read on demand with a small range read (or the first encrypted chunk).
//!
//! Invariants:
//! - A plan starts from a snapshot (or from the empty database before TXID 1) and is a
//!   gap-free chain: each object starts right after the previous one ends.
//! - A compacted object is only ever applied whole, so a plan takes one only if it ends at or
//!   before the target; a level-0 object may be applied part way.
//! - Nothing here trusts a listing for content: every object is verified when it is read
//!   (`segment::verify`), and the restore checks the rolling checksum after each step.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;

use crate::crypt::{self, Opener};
use crate::replica::{Listed, ReplicaClient};
use crate::segment::{self, ObjHeader, HEADER};

/// Highest compaction level a key may name.
pub const MAX_LEVEL: u8 = 9;

/// Key of the object naming database `db_id` (its path under the mount).
pub fn name_key(db_id: &str) -> String {
    format!("names/{db_id}")
}

/// Key of a level-0 segment starting at `first` (the fence: a second writer collides on it).
pub fn l0_key(db_id: &str, first: u64) -> String {
    format!("{db_id}/l0/{first:016x}.seg")
}

/// Key of a compacted segment covering `first..=last` at `level` (1 and up).
pub fn compacted_key(db_id: &str, level: u8, first: u64, last: u64) -> String {
    format!("{db_id}/l{level}/{first:016x}-{last:016x}.seg")
}

/// Key of a snapshot: the whole database after `txid`.
pub fn snapshot_key(db_id: &str, txid: u64) -> String {
    format!("{db_id}/snap/{txid:016x}.snap")
}

/// One object of a database, as its key describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Obj {
    pub key: String,
    /// `None` for a snapshot; the compaction level of a segment.
    pub level: Option<u8>,
    pub first: u64,
    /// Last TXID. For a level-0 segment the key does not say: unless `exact`, this is the
    /// TXID before the next level-0 segment (an upper bound: a snapshot may stand between
    /// them, after a gap), or `u64::MAX` for the newest.
    pub last: u64,
    /// `last` is the object's own (its key, or this process stored it), not inferred.
    pub exact: bool,
    pub size: u64,
    /// When it was stored (ns; 0 if unknown).
    pub modified_ns: u64,
}

fn hex16(s: &str) -> Option<u64> {
    (s.len() == 16)
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

/// Parses `<id>/<sub>/<file>` (relative to the database's prefix) into an object.
fn parse_key(key: &str, rel: &str, size: u64, modified_ns: u64) -> Option<Obj> {
    let (sub, file) = rel.split_once('/')?;
    if sub == "snap" {
        let t = hex16(file.strip_suffix(".snap")?)?;
        return Some(Obj {
            key: key.into(),
            level: None,
            first: t,
            last: t,
            exact: true,
            size,
            modified_ns,
        });
    }
    let level: u8 = sub.strip_prefix('l')?.parse().ok()?;
    if level > MAX_LEVEL {
        return None;
    }
    let stem = file.strip_suffix(".seg")?;
    let (first, last) = if level == 0 {
        (hex16(stem)?, u64::MAX)
    } else {
        let (a, b) = stem.split_once('-')?;
        (hex16(a)?, hex16(b)?)
    };
    (first >= 1 && first <= last).then(|| Obj {
        key: key.into(),
        level: Some(level),
        first,
        last,
        exact: level > 0,
        size,
        modified_ns,
    })
}

/// Everything a replica holds for one database.
#[derive(Clone, Debug, Default)]
pub struct DbCatalog {
    pub name: String,
    /// Snapshots in TXID order.
    pub snaps: Vec<Obj>,
    /// Segments per level, each in TXID order.
    pub levels: Vec<Vec<Obj>>,
}

impl DbCatalog {
    /// Builds the catalog of database `id` from the keys (with sizes) under `<id>/`.
    pub fn from_keys(id: &str, name: &str, keys: &[Listed]) -> DbCatalog {
        let mut c = DbCatalog {
            name: name.into(),
            ..Default::default()
        };
        let prefix = format!("{id}/");
        for l in keys {
            let k = &l.key;
            let parsed = k.strip_prefix(&prefix);
            let Some(o) = parsed.and_then(|r| parse_key(k, r, l.size, l.modified_ns)) else {
                continue;
            };
            match o.level {
                None => c.snaps.push(o),
                Some(l) => {
                    if c.levels.len() <= l as usize {
                        c.levels.resize(l as usize + 1, Vec::new());
                    }
                    c.levels[l as usize].push(o);
                }
            }
        }
        c.snaps.sort_by_key(|o| o.first);
        for l in &mut c.levels {
            l.sort_by_key(|o| o.first);
        }
        c.infer_l0_ends();
        c
    }

    /// Sets the `last` of each level-0 segment whose end is not known exactly to the TXID
    /// before the next one (or `u64::MAX` for the newest).
    pub fn infer_l0_ends(&mut self) {
        if let Some(l0) = self.levels.first_mut() {
            for i in 0..l0.len() {
                if !l0[i].exact {
                    l0[i].last = l0.get(i + 1).map_or(u64::MAX, |n| n.first - 1);
                }
            }
        }
    }

    /// True if a snapshot of the state after `txid` is in the catalog.
    pub fn has_snapshot(&self, txid: u64) -> bool {
        self.snaps.binary_search_by_key(&txid, |o| o.first).is_ok()
    }

    /// True if `b` certainly starts right after `a` ends (same level). A level-0 end inferred
    /// from the next key is uncertain where a snapshot stands at it: the chain may have
    /// restarted there after a gap (transactions folded away locally before this replica
    /// got them), with `a` ending earlier.
    pub fn adjacent(&self, a: &Obj, b: &Obj) -> bool {
        a.last != u64::MAX && b.first == a.last + 1 && (a.exact || !self.has_snapshot(a.last))
    }

    /// Adds an object this process just stored.
    pub fn add(&mut self, o: Obj) {
        let list = match o.level {
            None => &mut self.snaps,
            Some(l) => {
                if self.levels.len() <= l as usize {
                    self.levels.resize(l as usize + 1, Vec::new());
                }
                &mut self.levels[l as usize]
            }
        };
        let at = list.partition_point(|x| x.first < o.first);
        list.insert(at, o);
        self.infer_l0_ends();
    }

    /// Removes the object with `key`.
    pub fn remove(&mut self, key: &str) {
        self.snaps.retain(|o| o.key != key);
        for l in &mut self.levels {
            l.retain(|o| o.key != key);
        }
        self.infer_l0_ends();
    }

    /// Every object, snapshots first, then by level.
    pub fn objects(&self) -> impl Iterator<Item = &Obj> {
        self.snaps.iter().chain(self.levels.iter().flatten())
    }

    /// The segment of `level` that starts at `first`.
    fn starting(&self, level: usize, first: u64) -> Option<&Obj> {
        let l = self.levels.get(level)?;
        l.binary_search_by_key(&first, |o| o.first)
            .ok()
            .map(|i| &l[i])
    }

    /// The newest level-0 segment (the end of the chain), if any.
    pub fn newest_l0(&self) -> Option<&Obj> {
        self.levels.first().and_then(|l| l.last())
    }

    /// The highest TXID the chain reaches without a break from its newest snapshot (or from
    /// the empty database before TXID 1), by the keys and the ends known exactly (objects this
    /// process stored, their ends read back from the replica); no request. `u64::MAX` when it
    /// runs into the newest level-0 segment and only that segment's header knows its end.
    /// A shipper's position past this is a chain a restore cannot follow.
    pub fn reach(&self) -> u64 {
        let mut state = self.snaps.last().map_or(0, |s| s.first);
        loop {
            let next = (0..self.levels.len())
                .filter_map(|l| self.starting(l, state + 1))
                .map(|o| o.last)
                .max();
            match next {
                Some(n) if n > state => state = n,
                _ => return state,
            }
            if state == u64::MAX {
                return state;
            }
        }
    }
}

/// Reads what a replica holds: listings, object headers (cached), whole objects.
pub struct Reader<'a> {
    pub client: &'a dyn ReplicaClient,
    opener: Option<&'a Opener>,
    headers: Mutex<HashMap<String, ObjHeader>>,
    /// An object read so far was encrypted: read the first encryption chunk at once.
    sealed: AtomicBool,
}

/// How many bytes of an encrypted object hold its first encryption chunk (64 KiB plus tag)
/// after an age header of any sensible size.
const SEALED_HEAD: u64 = 128 * 1024;

/// Header range reads in flight at once when a plan reads many headers.
const HEADER_READS: usize = 8;
/// Headers read per batch (an encrypted one holds up to `SEALED_HEAD` bytes until opened).
const HEADER_BATCH: usize = 64;

/// The first bytes of object `key`: its header, or for an encrypted object enough to hold its
/// first encryption chunk. Once an object turned out encrypted, `sealed` is set and later
/// reads ask for that much at once (one range read per header rather than two).
fn read_head(
    client: &dyn ReplicaClient,
    key: &str,
    sealed: &AtomicBool,
) -> crate::replica::Result<Option<Vec<u8>>> {
    if sealed.load(Ordering::Relaxed) {
        return client.get_range(key, 0, SEALED_HEAD);
    }
    match client.get_range(key, 0, HEADER as u64)? {
        Some(head) if crypt::is_sealed(&head) => {
            sealed.store(true, Ordering::Relaxed);
            client.get_range(key, 0, SEALED_HEAD)
        }
        head => Ok(head),
    }
}

impl<'a> Reader<'a> {
    pub fn new(client: &'a dyn ReplicaClient, opener: Option<&'a Opener>) -> Reader<'a> {
        Reader {
            client,
            opener,
            headers: Mutex::new(HashMap::new()),
            sealed: AtomicBool::new(false),
        }
    }

    fn need_opener(&self, key: &str) -> Result<&'a Opener> {
        self.opener.ok_or_else(|| {
            anyhow::anyhow!(
                "{key} is encrypted; pass --age-identity FILE or --passphrase-env VAR with the key the replica was written for"
            )
        })
    }

    /// Every database in the replica: (id, name), sorted by name.
    pub fn databases(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for Listed { key, .. } in self.client.list("names/")? {
            let id = key.trim_start_matches("names/");
            if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let Some(data) = self.client.get_range(&key, 0, 1 << 16)? else {
                continue;
            };
            let name = if crypt::is_sealed(&data) {
                self.need_opener(&key)?.open_prefix(&data, 4096, &key)?
            } else {
                data
            };
            let name = String::from_utf8(name)
                .with_context(|| format!("{key} does not hold a database name"))?;
            out.push((id.to_string(), name));
        }
        out.sort_by(|a, b| a.1.cmp(&b.1));
        self.follow_claims(&mut out)?;
        Ok(out)
    }

    /// Where several database ids carry one name (a writer that took the name over, a
    /// database deleted and created again), keeps only the id the name's claim names
    /// (`owner::claim_key`): restore, list and history views follow the owner. A name without
    /// a claim (a replica written before claims) keeps every id, as before.
    fn follow_claims(&self, dbs: &mut Vec<(String, String)>) -> Result<()> {
        let mut shared: Vec<String> = dbs
            .windows(2)
            .filter(|w| w[0].1 == w[1].1)
            .map(|w| w[0].1.clone())
            .collect();
        shared.dedup();
        for name in shared {
            let key = crate::owner::claim_key(&name);
            let claim = match self.client.get_range(&key, 0, 4096)? {
                Some(b) if crypt::is_sealed(&b) => self
                    .opener
                    .and_then(|o| o.open_prefix(&b, 4096, &key).ok())
                    .and_then(|p| crate::owner::Claim::parse(&p)),
                Some(b) => crate::owner::Claim::parse(&b),
                None => None,
            };
            if let Some(c) = claim {
                if dbs.iter().any(|(id, n)| *n == name && *id == c.db_id) {
                    dbs.retain(|(id, n)| *n != name || *id == c.db_id);
                }
            }
        }
        Ok(())
    }

    /// The id of database `name`, or an error listing what the replica holds.
    pub fn find(&self, name: &str) -> Result<String> {
        let dbs = self.databases()?;
        if let Some((id, _)) = dbs.iter().find(|(_, n)| n == name) {
            return Ok(id.clone());
        }
        let known: Vec<&str> = dbs.iter().map(|(_, n)| n.as_str()).collect();
        bail!(
            "no database named {name} in {} (it holds: {})",
            self.client.describe(),
            if known.is_empty() {
                "nothing".into()
            } else {
                known.join(", ")
            }
        )
    }

    /// The catalog of database `id` (one listing).
    pub fn catalog(&self, id: &str, name: &str) -> Result<DbCatalog> {
        let keys = self.client.list(&format!("{id}/"))?;
        Ok(DbCatalog::from_keys(id, name, &keys))
    }

    /// The header of object `key`, from a range read of its first bytes.
    pub fn header(&self, key: &str) -> Result<ObjHeader> {
        if let Some(h) = self.headers.lock().get(key) {
            return Ok(h.clone());
        }
        let head = read_head(self.client, key, &self.sealed)?
            .ok_or_else(|| anyhow::anyhow!("{key} is missing from {}", self.client.describe()))?;
        let plain = if crypt::is_sealed(&head) {
            self.need_opener(key)?.open_prefix(&head, HEADER, key)?
        } else {
            head
        };
        let h = segment::parse_header(&plain, key)?;
        self.headers.lock().insert(key.to_string(), h.clone());
        Ok(h)
    }

    /// Reads the headers of `keys` that are not cached yet, [`HEADER_READS`] range reads at a
    /// time (decryption, if any, on this thread), in batches so memory stays bounded. A header
    /// that cannot be read is left out: [`Reader::header`] reads it again and says why.
    pub fn prefetch_headers(&self, keys: &[&str]) {
        let todo: Vec<&str> = {
            let cached = self.headers.lock();
            keys.iter()
                .copied()
                .filter(|k| !cached.contains_key(*k))
                .collect()
        };
        if todo.len() < 2 {
            return;
        }
        let (client, sealed) = (self.client, &self.sealed);
        for batch in todo.chunks(HEADER_BATCH) {
            let next = AtomicUsize::new(0);
            let got = Mutex::new(Vec::with_capacity(batch.len()));
            std::thread::scope(|sc| {
                for _ in 0..HEADER_READS.min(batch.len()) {
                    sc.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&key) = batch.get(i) else { break };
                        if let Ok(Some(head)) = read_head(client, key, sealed) {
                            got.lock().push((key, head));
                        }
                    });
                }
            });
            for (key, head) in got.into_inner() {
                let plain = if crypt::is_sealed(&head) {
                    match self.opener.map(|o| o.open_prefix(&head, HEADER, key)) {
                        Some(Ok(p)) => p,
                        _ => continue,
                    }
                } else {
                    head
                };
                if let Ok(h) = segment::parse_header(&plain, key) {
                    self.headers.lock().insert(key.to_string(), h);
                }
            }
        }
    }

    /// Downloads object `key` into `scratch`, decrypting it if needed (to `scratch.plain`),
    /// and returns the path of the plain object. Not verified: see `segment::verify`.
    pub fn fetch(&self, key: &str, scratch: &Path) -> Result<PathBuf> {
        if !self.client.get(key, scratch)? {
            bail!("{key} is missing from {}", self.client.describe());
        }
        self.decrypt_local(key, scratch)
    }

    /// The plain form of the downloaded object `key` at `local`: itself, or (if encrypted)
    /// its decryption at `local.plain`, replacing it.
    pub fn decrypt_local(&self, key: &str, local: &Path) -> Result<PathBuf> {
        if !crypt::file_is_sealed(local)? {
            return Ok(local.to_path_buf());
        }
        let plain = local.with_extension("plain");
        self.need_opener(key)?.open_file(local, &plain, key)?;
        let _ = fs::remove_file(local);
        Ok(plain)
    }

    /// The plain form of object `key` whose bytes are in `src` (left as it is): `src` itself,
    /// or its decryption written to `dst`.
    pub fn decrypt_copy(&self, key: &str, src: &Path, dst: &Path) -> Result<PathBuf> {
        if !crypt::file_is_sealed(src)? {
            return Ok(src.to_path_buf());
        }
        self.need_opener(key)?.open_file(src, dst, key)?;
        Ok(dst.to_path_buf())
    }

    /// Commit time (ns) of the last transaction in `o`.
    pub fn end_time(&self, o: &Obj) -> Result<u64> {
        Ok(self.header(&o.key)?.last_time_ns)
    }
}

/// What a restore aims at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Latest,
    Txid(u64),
    /// The state after the last transaction committed at or before this instant (ns).
    Time(u64),
}

/// One object of a plan, applied up to `upto` (inclusive; `u64::MAX` = all of it) and,
/// for a time target, only transactions committed at or before `until_ns`.
#[derive(Clone, Debug)]
pub struct Step {
    pub obj: Obj,
    pub upto: u64,
    pub until_ns: u64,
}

/// A restore plan: a snapshot (or nothing) and the segments after it.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn bytes(&self) -> u64 {
        self.steps.iter().map(|s| s.obj.size).sum()
    }
}

/// Formats ns since the epoch as RFC 3339 UTC with milliseconds.
pub fn fmt_time(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let ms = (ns / 1_000_000) % 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses RFC 3339 (`2026-11-25T10:00:00Z`, fractions and numeric offsets allowed) into ns
/// since the epoch.
pub fn parse_time(s: &str) -> Result<u64> {
    let bad = || {
        anyhow::anyhow!("{s:?} is not an RFC 3339 time (like 2026-11-25T10:00:00Z or 2026-11-25T10:00:00.250+01:00)")
    };
    let b = s.trim().as_bytes();
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64> {
        std::str::from_utf8(&b[r])
            .ok()
            .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut frac_ns: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let digits = &s.trim()[start..i];
        let mut v: i64 = 0;
        for (k, c) in digits.bytes().enumerate() {
            if k < 9 {
                v = v * 10 + (c - b'0') as i64;
            }
        }
        for _ in digits.len()..9 {
            v *= 10;
        }
        frac_ns = v;
    }
    let offset_s: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&c @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let v = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if c == b'+' {
                v
            } else {
                -v
            }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    if secs < 0 {
        return Err(bad());
    }
    Ok(secs as u64 * 1_000_000_000 + frac_ns as u64)
}

// Civil-date conversions for the proleptic Gregorian calendar (days since 1970-01-01).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Plans a restore of `c` to `target`: the newest usable snapshot, then the fewest segments
/// (highest level first) up to the target.
///
/// The plan reaches the target or fails here, before anything is downloaded: a TXID past the
/// end or an instant before the first commit is an error stating the window, and a break in
/// the chain (TXIDs no object holds between the start and the target; for the latest state,
/// the highest TXID the replica holds) is an error naming the missing TXIDs, the objects on
/// either side and what is restorable. Level-0 segments' ends come from their headers (read
/// a few at a time), so a missing segment is found even when a later one follows it; time
/// targets read commit times from headers too.
pub fn plan(r: &Reader<'_>, c: &DbCatalog, target: Target) -> Result<Plan> {
    let window = || window_text(r, c);
    if let Target::Txid(t) = target {
        // Keys alone bound the end from below; the newest level-0 header says the rest.
        if t > end_by_keys(c) && t > end_txid(r, c)? {
            bail!(
                "TXID {t} of {} is past the end of the replica; {}",
                c.name,
                window()?
            );
        }
    }
    // Start: the newest snapshot at or before the target.
    let mut start: Option<&Obj> = None;
    for s in c.snaps.iter().rev() {
        let ok = match target {
            Target::Latest => true,
            Target::Txid(t) => s.first <= t,
            Target::Time(t) => r.end_time(s)? <= t,
        };
        if ok {
            start = Some(s);
            break;
        }
    }
    let mut steps = Vec::new();
    let mut state = 0;
    if let Some(s) = start {
        state = s.first;
        steps.push(Step {
            obj: s.clone(),
            upto: s.first,
            until_ns: u64::MAX,
        });
    } else if c.starting(0, 1).is_none() {
        // Without a snapshot the chain must start at TXID 1.
        bail!(
            "{} has no restore point at or before {}; {}",
            c.name,
            describe_target(target),
            window()?
        );
    }
    let (limit, until_ns) = match target {
        Target::Latest => (u64::MAX, u64::MAX),
        Target::Txid(t) => (t, u64::MAX),
        Target::Time(t) => (u64::MAX, t),
    };
    // A first walk by keys alone finds the level-0 segments the plan is likely to take; their
    // headers are read together, then the real walk uses them.
    let (guess, _, _) = walk(r, c, state, limit, u64::MAX, false)?;
    let keys: Vec<&str> = guess
        .iter()
        .filter(|s| s.obj.level == Some(0) || until_ns != u64::MAX)
        .map(|s| s.obj.key.as_str())
        .collect();
    r.prefetch_headers(&keys);
    let (more, reached, stop) = walk(r, c, state, limit, until_ns, true)?;
    steps.extend(more);
    if steps.is_empty() {
        bail!(
            "{} has no restore point at or before {}; {}",
            c.name,
            describe_target(target),
            window()?
        );
    }
    if stop == Stop::Break {
        let goal = match target {
            Target::Txid(t) => t,
            Target::Latest | Target::Time(_) => end_txid(r, c)?,
        };
        if reached < goal {
            return Err(break_error(r, c, target, reached, &steps, goal)?);
        }
    }
    Ok(Plan { steps })
}

/// Why a walk along the chain stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// It reached the TXID limit.
    Reached,
    /// The next transaction was committed after the time limit.
    Time,
    /// No object starts right after the state reached.
    Break,
}

/// Walks the chain from `state` towards `limit` (TXID) and `until_ns` (commit time), highest
/// level first; a level-0 segment may end the walk part way. With `exact`, level-0 ends come
/// from headers (and the segments taken carry them); without, from the keys of the next
/// ones (an upper bound, no reads). Returns the steps, the TXID reached and why it stopped.
fn walk(
    r: &Reader<'_>,
    c: &DbCatalog,
    mut state: u64,
    limit: u64,
    until_ns: u64,
    exact: bool,
) -> Result<(Vec<Step>, u64, Stop)> {
    let mut steps = Vec::new();
    'chain: while state < limit {
        for level in (1..c.levels.len()).rev() {
            if let Some(o) = c.starting(level, state + 1) {
                let fits = o.last <= limit && (until_ns == u64::MAX || r.end_time(o)? <= until_ns);
                if fits {
                    state = o.last;
                    steps.push(Step {
                        obj: o.clone(),
                        upto: o.last,
                        until_ns,
                    });
                    continue 'chain;
                }
            }
        }
        let Some(o) = c.starting(0, state + 1) else {
            // A compacted object that starts after the target instant ends the walk there.
            if until_ns != u64::MAX {
                for level in 1..c.levels.len() {
                    if let Some(o) = c.starting(level, state + 1) {
                        if r.header(&o.key)?.first_time_ns > until_ns {
                            return Ok((steps, state, Stop::Time));
                        }
                    }
                }
            }
            return Ok((steps, state, Stop::Break));
        };
        if until_ns != u64::MAX && r.header(&o.key)?.first_time_ns > until_ns {
            return Ok((steps, state, Stop::Time));
        }
        let mut obj = o.clone();
        if exact {
            let h = r.header(&o.key)?;
            if h.first_txid != o.first || h.last_txid < h.first_txid {
                bail!(
                    "{} holds TXIDs {}..={}, not what its key names (from TXID {})",
                    o.key,
                    h.first_txid,
                    h.last_txid,
                    o.first
                );
            }
            obj.last = h.last_txid;
        }
        let whole = until_ns == u64::MAX || r.end_time(o)? <= until_ns;
        let last = obj.last;
        steps.push(Step {
            obj,
            upto: limit,
            until_ns,
        });
        if !whole {
            return Ok((steps, state, Stop::Time));
        }
        if last >= limit {
            return Ok((steps, limit, Stop::Reached));
        }
        state = last;
    }
    Ok((steps, state, Stop::Reached))
}

/// The highest TXID the keys alone show: the newest snapshot, compacted objects' ends, the
/// first TXID of the newest level-0 segment.
fn end_by_keys(c: &DbCatalog) -> u64 {
    let snap = c.snaps.last().map_or(0, |s| s.first);
    let compacted = c.levels.iter().skip(1).flatten().map(|o| o.last).max();
    let l0 = c.newest_l0().map(|o| o.first);
    snap.max(compacted.unwrap_or(0)).max(l0.unwrap_or(0))
}

/// The highest TXID the replica holds for `c`: [`end_by_keys`], and the newest level-0
/// segment's last TXID from its header.
pub fn end_txid(r: &Reader<'_>, c: &DbCatalog) -> Result<u64> {
    let mut end = end_by_keys(c);
    if let Some(o) = c.newest_l0() {
        end = end.max(r.header(&o.key)?.last_txid);
    }
    Ok(end)
}

/// The error for a chain that stops at TXID `reached` (after `steps`) short of `goal`: the
/// TXIDs no level-0 segment holds, the objects on either side, and what is restorable.
fn break_error(
    r: &Reader<'_>,
    c: &DbCatalog,
    target: Target,
    reached: u64,
    steps: &[Step],
    goal: u64,
) -> Result<anyhow::Error> {
    let from = reached + 1;
    // The object after the break: the first of any level (a snapshot included) that starts
    // after the state reached, or a compacted one starting right there that ends past the
    // target (it is only ever applied whole).
    let next = c
        .objects()
        .filter(|o| o.first > reached || (o.level.is_some_and(|l| l > 0) && o.first == from))
        .min_by_key(|o| o.first);
    let to = match next {
        Some(n) if n.first > from => n.first - 1,
        _ => goal,
    };
    let prev = steps.last().map(|s| &s.obj);
    let before = prev.map_or("the empty database".to_string(), |o| o.key.clone());
    let after = next.map_or_else(
        || "nothing (no later object)".to_string(),
        |o| o.key.clone(),
    );
    let restorable = match (window(r, c)?, prev) {
        (Some(w), Some(p)) => format!(
            "restorable up to the break: TXIDs {}..={reached} ({} .. {})",
            w.first_txid,
            fmt_time(w.first_ns),
            fmt_time(r.end_time(p)?)
        ),
        _ => "nothing before the break is restorable".to_string(),
    };
    Ok(anyhow::anyhow!(
        "cannot restore {} to {}: the replica's chain breaks after TXID {reached}: no level-0 segment holds TXIDs {from}..={to} (missing between {before} and {after}); {restorable}",
        c.name,
        describe_target(target),
    ))
}

fn describe_target(t: Target) -> String {
    match t {
        Target::Latest => "the latest transaction".into(),
        Target::Txid(n) => format!("TXID {n}"),
        Target::Time(ns) => fmt_time(ns),
    }
}

/// "it holds TXIDs A..=B (T1 .. T2)": the restore window of `c`, for error messages.
pub fn window_text(r: &Reader<'_>, c: &DbCatalog) -> Result<String> {
    match window(r, c)? {
        Some(w) => Ok(format!(
            "the replica holds TXIDs {}..={} ({} .. {})",
            w.first_txid,
            w.last_txid,
            fmt_time(w.first_ns),
            fmt_time(w.last_ns)
        )),
        None => Ok("the replica holds no restore point for it".into()),
    }
}

/// A database's restore window.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub first_txid: u64,
    pub first_ns: u64,
    pub last_txid: u64,
    pub last_ns: u64,
}

/// The earliest and latest restorable states of `c` (header reads of two or three objects).
pub fn window(r: &Reader<'_>, c: &DbCatalog) -> Result<Option<Window>> {
    // The chain from the empty database (TXID 1) reaches further back than any snapshot.
    let (first_txid, first_ns) = if let Some(o) = c.starting(0, 1) {
        let h = r.header(&o.key)?;
        (h.first_txid, h.first_time_ns)
    } else if let Some(s) = c.snaps.first() {
        (s.first, r.end_time(s)?)
    } else {
        return Ok(None);
    };
    let newest_snap = c.snaps.last();
    let l0 = c
        .newest_l0()
        .filter(|o| newest_snap.is_none_or(|s| s.first < o.first));
    let (last_txid, last_ns) = if let Some(o) = l0 {
        let h = r.header(&o.key)?;
        (h.last_txid, h.last_time_ns)
    } else if let Some(s) = newest_snap {
        (s.first, r.end_time(s)?)
    } else {
        return Ok(None);
    };
    Ok(Some(Window {
        first_txid,
        first_ns,
        last_txid,
        last_ns,
    }))
}

/// A stretch of TXIDs every one of which a restore can reach: from its start (the empty
/// database before TXID 1, or a snapshot) along the chain without a break.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub first_txid: u64,
    pub first_ns: u64,
    pub last_txid: u64,
    pub last_ns: u64,
}

/// TXIDs after a [`Range`] that no restore reaches: the chain breaks after `first_txid - 1`
/// because no object holds `missing_first..=missing_last`. It ends where the next range
/// starts (a snapshot), or at the highest TXID the replica holds if none follows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    pub first_txid: u64,
    pub last_txid: u64,
    pub missing_first: u64,
    pub missing_last: u64,
    /// The object the chain reaches last before the gap, and the first one after it.
    pub before: String,
    pub after: Option<String>,
}

/// The restorable ranges of `c` and the gaps between them (and after the last one), as
/// restore plans see them: a TXID is restorable if the chain from the newest start at or
/// before it (a snapshot, else the empty database) reaches it without a break. A gap-free
/// chain gives one range and no gap. Reads the headers of the level-0 segments the chain
/// passes through (several at a time), as a plan does.
pub fn ranges(r: &Reader<'_>, c: &DbCatalog) -> Result<(Vec<Range>, Vec<Gap>)> {
    // Starts: the empty database (if the chain from TXID 1 is there), then every snapshot.
    let mut starts: Vec<(u64, Option<&Obj>)> = Vec::new();
    if c.starting(0, 1).is_some() {
        starts.push((0, None));
    }
    for s in &c.snaps {
        if starts.last().is_none_or(|(t, _)| *t < s.first) {
            starts.push((s.first, Some(s)));
        }
    }
    // Each start's walk stops at the next start; read the level-0 headers they need at once.
    let limits: Vec<u64> = (0..starts.len())
        .map(|i| starts.get(i + 1).map_or(u64::MAX, |s| s.0))
        .collect();
    let mut keys = Vec::new();
    for (&(start, _), &limit) in starts.iter().zip(&limits) {
        let (steps, _, _) = walk(r, c, start, limit, u64::MAX, false)?;
        keys.extend(
            steps
                .into_iter()
                .filter(|s| s.obj.level == Some(0))
                .map(|s| s.obj.key),
        );
    }
    r.prefetch_headers(&keys.iter().map(String::as_str).collect::<Vec<_>>());

    let mut ranges: Vec<Range> = Vec::new();
    let mut gaps = Vec::new();
    for (i, (&(start, snap), &limit)) in starts.iter().zip(&limits).enumerate() {
        let (first_txid, first_ns) = match snap {
            Some(s) => (s.first, r.end_time(s)?),
            None => {
                let o = c.starting(0, 1).expect("the chain from TXID 1");
                let h = r.header(&o.key)?;
                (h.first_txid, h.first_time_ns)
            }
        };
        let (steps, reached, _) = walk(r, c, start, limit, u64::MAX, true)?;
        let last = steps.last().map(|s| &s.obj).or(snap);
        let (last_txid, last_ns) = match last {
            Some(o) => (reached, r.end_time(o)?),
            None => continue,
        };
        // Contiguous with the range before it: one range.
        match ranges.last_mut() {
            Some(prev) if prev.last_txid + 1 >= first_txid => {
                prev.last_txid = last_txid;
                prev.last_ns = last_ns;
            }
            _ => ranges.push(Range {
                first_txid,
                first_ns,
                last_txid,
                last_ns,
            }),
        }
        // A break before the next start (or before the end of what the replica holds).
        let next_start = starts.get(i + 1).map(|s| s.0);
        let goal = match next_start {
            Some(n) => n.saturating_sub(1),
            None => end_txid(r, c)?,
        };
        if reached < goal {
            let from = reached + 1;
            let next = c
                .objects()
                .filter(|o| {
                    o.first > reached || (o.level.is_some_and(|l| l > 0) && o.first == from)
                })
                .min_by_key(|o| o.first);
            let missing_last = match next {
                Some(n) if n.first > from => (n.first - 1).min(goal),
                _ => goal,
            };
            gaps.push(Gap {
                first_txid: from,
                last_txid: goal,
                missing_first: from,
                missing_last,
                before: last.map(|o| o.key.clone()).unwrap_or_default(),
                after: next.map(|o| o.key.clone()),
            });
        }
    }
    Ok((ranges, gaps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let t = parse_time("2026-11-25T10:00:00Z").unwrap();
        assert_eq!(fmt_time(t), "2026-11-25T10:00:00.000Z");
        let u = parse_time("2026-11-25T11:00:00.250+01:00").unwrap();
        assert_eq!(u - t, 250_000_000);
        assert_eq!(parse_time("1970-01-01T00:00:00.000000001Z").unwrap(), 1);
        assert_eq!(
            fmt_time(parse_time("2024-02-29T23:59:59.999Z").unwrap()),
            "2024-02-29T23:59:59.999Z"
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-25T10:00:00",
            "2026-11-25T10:00:00.Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_and_chain() {
        let id = "0123456789abcdef";
        let keys: Vec<Listed> = [
            snapshot_key(id, 10),
            l0_key(id, 1),
            l0_key(id, 5),
            l0_key(id, 11),
            l0_key(id, 20),
            compacted_key(id, 1, 1, 10),
            compacted_key(id, 1, 11, 19),
            format!("{id}/l0/junk.seg"),
            name_key(id),
        ]
        .into_iter()
        .map(|key| Listed {
            key,
            size: 1,
            modified_ns: 0,
        })
        .collect();
        let c = DbCatalog::from_keys(id, "app.db", &keys);
        assert_eq!(c.snaps.len(), 1);
        assert_eq!(
            c.levels[0].iter().map(|o| o.last).collect::<Vec<_>>(),
            vec![4, 10, 19, u64::MAX]
        );
        assert_eq!(c.levels[1].len(), 2);
        assert_eq!(c.starting(1, 11).unwrap().last, 19);
    }

    /// `reach` follows the chain from the newest snapshot by keys and known ends, and stops
    /// where no object starts right after the state reached.
    #[test]
    fn reach_stops_at_a_break() {
        let id = "0123456789abcdef";
        let obj = |key: String, level: Option<u8>, first: u64, last: u64| Obj {
            key,
            level,
            first,
            last,
            exact: true,
            size: 1,
            modified_ns: 0,
        };
        let mut c = DbCatalog::default();
        assert_eq!(c.reach(), 0);
        c.add(obj(l0_key(id, 1), Some(0), 1, 10));
        assert_eq!(c.reach(), 10);
        // What a shipper that assumed a key held its last attempt would have recorded next:
        // a segment after a hole.
        c.add(obj(l0_key(id, 40), Some(0), 40, 50));
        assert_eq!(c.reach(), 10);
        c.add(obj(l0_key(id, 11), Some(0), 11, 39));
        assert_eq!(c.reach(), 50);
        c.add(obj(snapshot_key(id, 60), None, 60, 60));
        assert_eq!(c.reach(), 60);
        let mut d = DbCatalog::default();
        d.add(Obj {
            exact: false,
            ..obj(l0_key(id, 1), Some(0), 1, 1)
        });
        assert_eq!(
            d.reach(),
            u64::MAX,
            "the newest segment's end is unknown by keys"
        );
    }
    /// A file replica of one database built from real object headers (one page per
    /// transaction, committed TXID milliseconds after the epoch), for planning only.
    struct Fake {
        dir: tempfile::TempDir,
        id: &'static str,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                dir: tempfile::tempdir().unwrap(),
                id: "0123456789abcdef",
            }
        }

        fn put(&self, key: &str, kind: segment::ObjKind, level: u8, first: u64, last: u64) {
            use crate::stage::{Kind, RecordHeader};
            let path = self.dir.path().join(key);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            let mut w = segment::ObjectWriter::new(f, kind, level, self.id).unwrap();
            let txids = if level > 0 || kind == segment::ObjKind::Snapshot {
                last..=last
            } else {
                first..=last
            };
            for t in txids {
                let record = if kind == segment::ObjKind::Snapshot {
                    Kind::Snapshot
                } else {
                    Kind::Txn
                };
                let h = RecordHeader {
                    time_ns: t * 1_000_000,
                    ..RecordHeader::test(record, t, 512, 1)
                };
                w.add(&h, |emit| emit(1, &[0u8; 512])).unwrap();
            }
            if level > 0 {
                w.set_span(first, first * 1_000_000, 0);
            }
            w.finish().unwrap();
        }
        fn l0(&self, first: u64, last: u64) -> String {
            let k = l0_key(self.id, first);
            self.put(&k, segment::ObjKind::Segment, 0, first, last);
            k
        }
        fn lk(&self, level: u8, first: u64, last: u64) -> String {
            let k = compacted_key(self.id, level, first, last);
            self.put(&k, segment::ObjKind::Segment, level, first, last);
            k
        }
        fn snap(&self, t: u64) -> String {
            let k = snapshot_key(self.id, t);
            self.put(&k, segment::ObjKind::Snapshot, 0, t, t);
            k
        }
        fn plan(&self, target: Target) -> Result<Vec<String>> {
            let client = crate::replica::FileReplica::new(self.dir.path().to_path_buf());
            let r = Reader::new(&client, None);
            let c = r.catalog(self.id, "app.db")?;
            Ok(plan(&r, &c, target)?
                .steps
                .into_iter()
                .map(|s| s.obj.key)
                .collect())
        }
        fn fails(&self, target: Target, needles: &[&str]) {
            let e = format!("{:#}", self.plan(target).unwrap_err());
            eprintln!("{target:?}: {e}");
            for n in needles {
                assert!(e.contains(n), "{target:?}: {e:?} does not say {n:?}");
            }
        }
    }

    #[test]
    fn a_gap_between_level0_segments_is_an_error() {
        let f = Fake::new();
        let (a, b) = (f.l0(1, 4), f.l0(5, 10));
        let c = f.l0(20, 25);
        // The segment of TXIDs 11..=19 is missing; a later one follows.
        let want = [
            "TXIDs 11..=19",
            &b,
            &c,
            "restorable up to the break: TXIDs 1..=10 (1970-01-01T00:00:00.001Z .. 1970-01-01T00:00:00.010Z)",
        ];
        f.fails(Target::Latest, &want);
        f.fails(Target::Txid(22), &want);
        f.fails(Target::Time(22_000_000), &want);
        assert_eq!(
            f.plan(Target::Txid(10)).unwrap(),
            vec![a.clone(), b.clone()]
        );
        // An instant at or after the break: the missing TXIDs may be before it.
        f.fails(Target::Time(10_500_000), &want);
        assert_eq!(f.plan(Target::Time(9_500_000)).unwrap(), vec![a, b]);
        f.fails(
            Target::Txid(26),
            &["TXID 26", "past the end", "TXIDs 1..=25"],
        );
    }

    #[test]
    fn a_break_after_a_snapshot_or_compacted_object_is_an_error() {
        // A snapshot, then no level-0 segment right after it (the old plan stopped there).
        let f = Fake::new();
        f.l0(1, 4);
        f.l0(5, 10);
        let s = f.snap(10);
        let late = f.l0(20, 25);
        let want = ["TXIDs 11..=19", s.as_str(), late.as_str()];
        f.fails(Target::Latest, &want);
        f.fails(Target::Time(30_000_000), &want);
        f.fails(Target::Time(10_000_000), &want);
        assert_eq!(f.plan(Target::Txid(10)).unwrap(), vec![s]);

        // A compacted object, then only a higher-level object after the missing segment.
        let f = Fake::new();
        f.l0(1, 4);
        f.l0(5, 10);
        let c1 = f.lk(1, 1, 10);
        let c2 = f.lk(2, 20, 30);
        f.fails(Target::Latest, &["TXIDs 11..=19", c1.as_str(), c2.as_str()]);
        assert_eq!(f.plan(Target::Txid(10)).unwrap(), vec![c1]);
    }

    /// On an encrypted replica a plan reads each object's header with one range read (but
    /// the first, which finds the replica encrypted), and a second plan reads nothing again.
    #[test]
    fn a_plan_reads_each_encrypted_header_once() {
        let f = Fake::new();
        let keys = [
            f.l0(1, 4),
            f.l0(5, 10),
            f.lk(1, 1, 10),
            f.snap(10),
            f.l0(11, 12),
            f.l0(13, 20),
        ];
        let sealer = crypt::Sealer::with_passphrase("pw").unwrap();
        for k in &keys {
            let p = f.dir.path().join(k);
            let sealed = p.with_extension("age");
            sealer.seal_file(&p, &sealed).unwrap();
            fs::rename(&sealed, &p).unwrap();
        }
        let client = crate::replica::Counted::new(Box::new(crate::replica::FileReplica::new(
            f.dir.path().to_path_buf(),
        )));
        let opener = Opener::from_passphrase("pw").unwrap();
        let r = Reader::new(&client, Some(&opener));
        let c = r.catalog(f.id, "app.db").unwrap();
        let steps = |t| -> Vec<String> {
            plan(&r, &c, t)
                .unwrap()
                .steps
                .into_iter()
                .map(|s| s.obj.key)
                .collect()
        };
        assert_eq!(
            steps(Target::Time(15_500_000)),
            vec![keys[3].clone(), keys[4].clone(), keys[5].clone()]
        );
        let read = client.stats().0;
        assert_eq!(read, r.headers.lock().len() as u64 + 1);
        assert_eq!(steps(Target::Latest).len(), 3);
        assert_eq!(client.stats().0, read, "a header was read again");
    }

    #[test]
    fn ranges_split_at_a_gap() {
        let ms = 1_000_000;
        let range = |a: u64, b: u64| Range {
            first_txid: a,
            first_ns: a * ms,
            last_txid: b,
            last_ns: b * ms,
        };
        let ranges_of = |f: &Fake| {
            let client = crate::replica::FileReplica::new(f.dir.path().to_path_buf());
            let r = Reader::new(&client, None);
            let c = r.catalog(f.id, "app.db").unwrap();
            ranges(&r, &c).unwrap()
        };
        // Gap-free, with a snapshot and a compacted object: one range.
        let f = Fake::new();
        f.l0(1, 4);
        f.l0(5, 10);
        f.lk(1, 1, 10);
        f.snap(10);
        f.l0(11, 12);
        assert_eq!(ranges_of(&f), (vec![range(1, 12)], vec![]));

        // TXIDs 11..=15 missing; a snapshot at 18 starts a second range.
        let f = Fake::new();
        f.l0(1, 4);
        let b = f.l0(5, 10);
        let c = f.l0(16, 18);
        f.snap(18);
        f.l0(19, 25);
        let (r, g) = ranges_of(&f);
        assert_eq!(r, vec![range(1, 10), range(18, 25)]);
        assert_eq!(
            g,
            vec![Gap {
                first_txid: 11,
                last_txid: 17,
                missing_first: 11,
                missing_last: 15,
                before: b.clone(),
                after: Some(c),
            }]
        );

        // Nothing restarts the chain after the gap: what follows it is held, not restorable.
        let f = Fake::new();
        f.l0(1, 4);
        let b = f.l0(5, 10);
        let c = f.l0(20, 25);
        let (r, g) = ranges_of(&f);
        assert_eq!(r, vec![range(1, 10)]);
        assert_eq!(
            g,
            vec![Gap {
                first_txid: 11,
                last_txid: 25,
                missing_first: 11,
                missing_last: 19,
                before: b,
                after: Some(c),
            }]
        );
    }

    #[test]
    fn targets_outside_the_window_say_the_window() {
        let f = Fake::new();
        let a = f.l0(1, 4);
        let b = f.l0(5, 9);
        let window = ["TXIDs 1..=9 (1970-01-01T00:00:00.001Z .. 1970-01-01T00:00:00.009Z)"];
        f.fails(
            Target::Time(999_999),
            &[&["no restore point"][..], &window].concat(),
        );
        f.fails(Target::Txid(10), &[&["past the end"][..], &window].concat());
        assert_eq!(f.plan(Target::Latest).unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(f.plan(Target::Txid(9)).unwrap(), vec![a, b]);
        // After retention: the window starts at a snapshot.
        let f = Fake::new();
        let s = f.snap(5);
        f.l0(6, 9);
        f.fails(Target::Txid(2), &["TXID 2", "TXIDs 5..=9"]);
        f.fails(
            Target::Time(4_000_000),
            &["no restore point", "TXIDs 5..=9"],
        );
        assert_eq!(f.plan(Target::Txid(5)).unwrap(), vec![s]);
    }
}
