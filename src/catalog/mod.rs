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

mod keys;
mod plan;

use crate::crypt::{self, Opener};
use crate::replica::{Listed, ReplicaClient};
use crate::segment::{self, ObjHeader, HEADER};
pub use crate::time::{fmt_time, parse_time};
pub use keys::*;
pub use plan::*;

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

#[cfg(test)]
mod tests {
    use super::*;

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
