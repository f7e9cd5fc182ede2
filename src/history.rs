//! History views: `.history/<time>/` inside the mount, read-only databases as they were at an
//! instant, a TXID (`txid-N`) or now (`latest`).
//!
//! One job: resolve a name to a set of database views, and serve a view's pages. Resolution
//! prefers local staging (base image + log records) and falls back to the mount's first replica
//! (the restore plan's objects, read in place: `objread`). A view is a page map, pgno → where
//! the newest version at or before the target lives (a staged record, the staging base, or an
//! object's zstd frame); pages are read one at a time through a byte-bounded LRU cache.
//!
//! Serving from the replica never materialises a database: opening a view reads each plan
//! object's header and directory (kept, per object, in a bounded cache), and a page read
//! fetches the one frame holding it, verified by its CRC. Only objects of the old format
//! version 1 (no per-frame checksums) are downloaded whole into `.sqlfs/history/` (a bounded
//! cache) and verified before use.
//!
//! Invariants:
//! - A view's bytes are exactly what `sqlfs restore` writes for the same target, with page 1's
//!   bytes 18 and 19 set to 1 (rollback journal mode), so any client opens it read-only as is.
//! - A view never changes once resolved: staged segments are held open (a fold deletes them, the
//!   open handle stays valid); base.db pages are read under a check of `base.meta` before and
//!   after, and a fold that moved the base makes the view rebuild its map for the same TXID.
//! - Nothing here writes to the live databases or their staging; no request is made to the
//!   replica unless someone lists `.history` or looks up a view staging cannot serve.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lru::LruCache;
use parking_lot::{Mutex, RwLock};

use crate::capture::Capture;
use crate::catalog::{self, fmt_time, parse_time, DbCatalog, Obj, Reader, Target};
use crate::crypt::{FileKeys, Opener};
use crate::objread::{ObjReader, Opened};
use crate::replica::{Counted, ReplicaClient};
use crate::segment;
use crate::stage::{
    now_ns, read_base_meta, scan_headers, segment_files, BaseMeta, Kind, RecordHeader,
    RECORD_HEADER,
};

/// The reserved name of the history directory at the mount's root.
pub const NAME: &str = ".history";
/// Virtual inodes have this bit set; pass-through inodes never do.
pub const VIRT: u64 = 1 << 63;
/// Inode of `.history` itself.
pub const ROOT_INO: u64 = VIRT | 1;

/// How long the listing of `.history` is reused before the replica is asked again.
const LIST_TTL: Duration = Duration::from_secs(5);
/// How long reading a staging log waits for a fold in progress to finish.
const FOLD_WAIT: Duration = Duration::from_secs(10);
/// How long a resolved `latest` is reused.
const LATEST_TTL: Duration = Duration::from_secs(1);
/// Most restore points listed per database from local staging.
const STAGED_POINTS: usize = 100;
/// Resolved time views kept (their inodes stay valid while the kernel holds them).
const MAX_VIEWS: usize = 64;
/// Pages kept past the one asked for when a frame is decompressed (sequential readers).
const READ_AHEAD: usize = 64;
/// Replica objects whose directory is kept open for views (each holds its page index).
const OPEN_OBJECTS: usize = 256;
/// Decoded replica frames kept (about 1 MiB each with 4 KiB pages): a scan fetches and
/// decodes each frame once, though read-ahead fills the page cache with only part of it.
const RECENT_FRAMES: usize = 8;

/// A virtual node's identity: its time view (by address) and its path in that view.
type InoKey = (usize, String);

/// What the FUSE layer needs to describe a virtual node.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub ino: u64,
    pub dir: bool,
    pub size: u64,
    pub mtime_ns: u64,
}

/// Where one page version lives.
#[derive(Clone, Copy, Debug)]
enum Loc {
    /// Raw page bytes at `off` in staged file `file`.
    Raw { file: u32, off: u64 },
    /// The delta-coded page entry at `at` in staged file `file` (see `crate::delta`).
    Coded { file: u32, at: u64 },
    /// In frame `frame` of replica object `obj`, at `in_frame` within the decompressed frame.
    Frame { obj: u32, frame: u32, in_frame: u32 },
}

/// Bytes of a staged segment read at a time while a view indexes its coded records (one read
/// instead of one per record).
const INDEX_WINDOW: u64 = 4 << 20;

/// A stretch of one staged segment, read ahead for indexing.
#[derive(Default)]
struct Window {
    file: u32,
    start: u64,
    bytes: Vec<u8>,
}

impl Window {
    /// `len` bytes at `off` of staged file `file`, read (with what follows, up to
    /// [`INDEX_WINDOW`]) unless the window holds them.
    fn get(
        &mut self,
        files: &[Arc<File>],
        file: u32,
        off: u64,
        len: u64,
    ) -> std::io::Result<&[u8]> {
        let end = self.start + self.bytes.len() as u64;
        if self.file != file || off < self.start || off + len > end {
            let f = &files[file as usize];
            let size = f.metadata()?.len();
            let want = INDEX_WINDOW.min(size.saturating_sub(off)).max(len);
            self.bytes.resize(want as usize, 0);
            f.read_exact_at(&mut self.bytes, off)?;
            (self.file, self.start) = (file, off);
        }
        let at = (off - self.start) as usize;
        Ok(&self.bytes[at..at + len as usize])
    }
}

/// The staging base a view reads pages from, valid while `base.meta` still says `meta`.
struct BaseRef {
    dir: PathBuf,
    file: File,
    meta: BaseMeta,
}

/// Page map of one view: explicit locations, else the base up to `base_limit`, else zeros.
struct PageMap {
    files: Vec<Arc<File>>,
    objs: Vec<Arc<ObjReader>>,
    pages: HashMap<u32, Loc>,
    base: Option<BaseRef>,
    base_limit: u32,
}

/// Where a database view comes from, to rebuild its map if the staging base moves.
#[derive(Clone)]
struct Origin {
    name: String,
    id: String,
    stage_dir: Option<PathBuf>,
}

/// One database as of one state.
pub struct DbView {
    id: u64,
    origin: Origin,
    pub txid: u64,
    pub time_ns: u64,
    pub page_size: u32,
    pub db_pages: u32,
    map: RwLock<PageMap>,
}

impl DbView {
    pub fn size(&self) -> u64 {
        self.db_pages as u64 * self.page_size as u64
    }
}

/// Every database of one `.history/<name>/` directory.
pub struct TimeView {
    name: String,
    mtime_ns: u64,
    dbs: BTreeMap<String, Arc<DbView>>,
    resolved: Instant,
}

enum VNode {
    Root,
    Dir { view: Arc<TimeView>, rel: String },
    File { db: Arc<DbView> },
}

/// A staged database as found under `.sqlfs/db/`.
struct Staged {
    id: String,
    name: String,
    dir: PathBuf,
    /// When its file was deleted (the `deleted` marker's mtime), if it was.
    deleted_ns: Option<u64>,
}

/// The records of one staging log after its base, with their segments held open.
struct StagedLog {
    base: BaseMeta,
    files: Vec<Arc<File>>,
    /// (segment index, header, record offset), TXIDs base+1, base+2, … without gap.
    records: Vec<(u32, RecordHeader, u64)>,
}

/// What a resolution found for one database.
enum Found {
    View(Box<DbView>),
    /// The database did not exist at the target (or has no such TXID).
    Absent,
    /// Staging does not reach back to the target: ask the replica.
    NotStaged,
}

/// How to decrypt the replica (an opener is built per use: it is not shareable across
/// threads; the openers of one replica share its cache of unwrapped file keys).
#[derive(Clone)]
pub enum Key {
    IdentityFile(PathBuf),
    Passphrase(String),
}

/// (id, name) of the replica's databases.
type DbList = Vec<(String, String)>;
type PageCache = LruCache<(u64, u32), Arc<Vec<u8>>>;
/// Decoded frames by (object key, frame).
type FrameCache = LruCache<(String, u32), Arc<Vec<u8>>>;
/// Record headers of one segment with their offsets.
type Headers = Vec<(RecordHeader, u64)>;

/// The replica side: its client, key, and cached listings.
struct ReplicaSide {
    /// Counts what views read from the replica (metrics).
    client: Arc<Counted>,
    key: Option<Key>,
    /// File keys unwrapped by this replica's openers: an object whose header a plan read
    /// and which a view then opens pays the key derivation once.
    file_keys: FileKeys,
    /// Commit time of the last transaction of each object, by key.
    end_times: Mutex<HashMap<String, u64>>,
    dbs: Mutex<Option<(Instant, DbList)>>,
    cats: Mutex<HashMap<String, (Instant, DbCatalog)>>,
}

/// Restore points of the listing, cached.
struct Listing {
    at: Instant,
    names: Vec<String>,
}

pub struct History {
    meta_root: PathBuf,
    capture: Arc<Capture>,
    replica: Option<ReplicaSide>,
    cache_dir: PathBuf,
    /// Bytes of downloaded (format version 1) objects kept in `cache_dir` (oldest removed
    /// first).
    obj_budget: u64,
    /// Objects opened for reading in place, by key.
    objects: Mutex<LruCache<String, Arc<ObjReader>>>,
    /// Recently decoded frames, by object key and frame (objects never change under a key).
    frames: Mutex<FrameCache>,
    /// Objects downloaded whole (format version 1).
    whole_downloads: AtomicU64,
    page_budget: u64,
    /// Pages by (view, pgno), and the bytes they take.
    pages: Mutex<(PageCache, u64)>,
    views: Mutex<HashMap<String, Arc<TimeView>>>,
    nodes: RwLock<HashMap<u64, VNode>>,
    inos: Mutex<HashMap<InoKey, u64>>,
    /// Kernel lookups not yet forgotten, per virtual inode (with its key in `inos`).
    lookups: Mutex<HashMap<u64, (u64, InoKey)>>,
    next_ino: AtomicU64,
    next_view: AtomicU64,
    listing: Mutex<Option<Listing>>,
    headers: Mutex<HashMap<PathBuf, (u64, Headers)>>,
    fetch_lock: Mutex<()>,
}

fn mtime_ns(p: &Path) -> Option<u64> {
    let m = fs::metadata(p).ok()?.modified().ok()?;
    m.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_nanos() as u64)
}

/// What a `.history` entry name asks for.
pub fn parse_name(name: &str) -> Result<Target> {
    if name == "latest" {
        return Ok(Target::Latest);
    }
    if let Some(n) = name.strip_prefix("txid-") {
        return match n.parse::<u64>() {
            Ok(t) if t > 0 => Ok(Target::Txid(t)),
            _ => bail!("{name:?} is not txid-N with N a TXID of 1 or more"),
        };
    }
    Ok(Target::Time(parse_time(name)?))
}

impl History {
    /// History views over `capture`'s staging (under `meta_root`, the backing `.sqlfs/`) and,
    /// if given, the replica at `replica_url` (decrypted with `opener` when it is encrypted).
    pub fn new(
        meta_root: &Path,
        capture: Arc<Capture>,
        replica_url: Option<&str>,
        key: Option<Key>,
        cache_bytes: u64,
    ) -> Result<History> {
        let cache_dir = meta_root.join("history");
        // Emptied, not recreated: on a full disk a new directory cannot be made.
        if let Ok(rd) = fs::read_dir(&cache_dir) {
            for e in rd.flatten() {
                let p = e.path();
                let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
            }
        }
        fs::create_dir_all(&cache_dir)
            .with_context(|| format!("creating {}", cache_dir.display()))?;
        let replica = match replica_url {
            Some(u) => {
                if let Some(k) = &key {
                    opener_for(k)?;
                }
                Some(ReplicaSide {
                    client: Arc::new(Counted::new(crate::replica::open(u)?)),
                    key,
                    file_keys: FileKeys::default(),
                    end_times: Mutex::new(HashMap::new()),
                    dbs: Mutex::new(None),
                    cats: Mutex::new(HashMap::new()),
                })
            }
            None => None,
        };
        Ok(History {
            meta_root: meta_root.to_path_buf(),
            capture,
            replica,
            cache_dir,
            obj_budget: (cache_bytes * 16).max(1 << 30),
            objects: Mutex::new(LruCache::new(
                NonZeroUsize::new(OPEN_OBJECTS).expect("not zero"),
            )),
            whole_downloads: AtomicU64::new(0),
            frames: Mutex::new(LruCache::new(
                NonZeroUsize::new(RECENT_FRAMES).expect("not zero"),
            )),
            page_budget: cache_bytes.max(1 << 20),
            pages: Mutex::new((LruCache::unbounded(), 0)),
            views: Mutex::new(HashMap::new()),
            nodes: RwLock::new(HashMap::from([(ROOT_INO, VNode::Root)])),
            inos: Mutex::new(HashMap::new()),
            lookups: Mutex::new(HashMap::new()),
            next_ino: AtomicU64::new(2),
            next_view: AtomicU64::new(1),
            listing: Mutex::new(None),
            headers: Mutex::new(HashMap::new()),
            fetch_lock: Mutex::new(()),
        })
    }

    /// What views read from the replica so far: (read requests, bytes received, objects
    /// downloaded whole); zeros without a replica.
    pub fn replica_reads(&self) -> (u64, u64, u64) {
        let (n, b) = self.replica.as_ref().map_or((0, 0), |r| r.client.stats());
        (n, b, self.whole_downloads.load(Ordering::Relaxed))
    }

    pub fn is_virtual(ino: u64) -> bool {
        ino & VIRT != 0
    }

    // ---------------------------------------------------------------- FUSE-facing queries

    /// The `.history` directory itself.
    pub fn root_entry(&self) -> Entry {
        Entry {
            ino: ROOT_INO,
            dir: true,
            size: 0,
            mtime_ns: now_ns(),
        }
    }

    /// The inode of `rel` in `view`, for a lookup the kernel will count: it stays until the
    /// kernel forgets it as often as it was looked up (`forget`), then its node (and with the
    /// last one, the view's page maps) is dropped.
    fn ino_for(&self, view: &Arc<TimeView>, rel: &str, node: VNode) -> u64 {
        let key = (Arc::as_ptr(view) as usize, rel.to_string());
        let mut inos = self.inos.lock();
        let ino = match inos.get(&key) {
            Some(i) => *i,
            None => {
                let ino = VIRT | self.next_ino.fetch_add(1, Ordering::Relaxed);
                inos.insert(key.clone(), ino);
                self.nodes.write().insert(ino, node);
                ino
            }
        };
        self.lookups.lock().entry(ino).or_insert((0, key)).0 += 1;
        ino
    }

    /// The inode a directory listing shows for `rel` in `view`: the looked-up one if there
    /// is one, else a stable number (a listing creates nothing the kernel would not forget).
    fn listed_ino(&self, view: &Arc<TimeView>, rel: &str) -> u64 {
        let key = (Arc::as_ptr(view) as usize, rel.to_string());
        if let Some(i) = self.inos.lock().get(&key) {
            return *i;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ key.0 as u64;
        for b in rel.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        VIRT | (h >> 1)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut inos = self.inos.lock();
        let mut lookups = self.lookups.lock();
        let Some((count, _)) = lookups.get_mut(&ino) else {
            return;
        };
        *count = count.saturating_sub(n);
        if *count == 0 {
            if let Some((_, key)) = lookups.remove(&ino) {
                inos.remove(&key);
            }
            self.nodes.write().remove(&ino);
        }
    }

    fn entry_of(&self, ino: u64) -> Result<Entry, i32> {
        let nodes = self.nodes.read();
        match nodes.get(&ino) {
            Some(VNode::Root) => Ok(self.root_entry()),
            Some(VNode::Dir { view, .. }) => Ok(Entry {
                ino,
                dir: true,
                size: 0,
                mtime_ns: view.mtime_ns,
            }),
            Some(VNode::File { db }) => Ok(Entry {
                ino,
                dir: false,
                size: db.size(),
                mtime_ns: db.time_ns,
            }),
            None => Err(libc::ENOENT),
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Entry, i32> {
        self.entry_of(ino)
    }

    /// True if `ino` is a view file (not a directory).
    pub fn is_file(&self, ino: u64) -> bool {
        matches!(self.nodes.read().get(&ino), Some(VNode::File { .. }))
    }

    /// Looks `name` up in virtual directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Entry, i32> {
        let (view, rel) = {
            let nodes = self.nodes.read();
            match nodes.get(&parent) {
                Some(VNode::Root) => (None, String::new()),
                Some(VNode::Dir { view, rel }) => (Some(view.clone()), rel.clone()),
                Some(VNode::File { .. }) => return Err(libc::ENOTDIR),
                None => return Err(libc::ENOENT),
            }
        };
        let view = match view {
            Some(v) => v,
            None => {
                let v = self.view(name)?;
                let ino = self.ino_for(
                    &v,
                    "",
                    VNode::Dir {
                        view: v.clone(),
                        rel: String::new(),
                    },
                );
                return self.entry_of(ino);
            }
        };
        let child = crate::backing::join(&rel, name);
        if let Some(db) = view.dbs.get(&child) {
            let ino = self.ino_for(&view, &child, VNode::File { db: db.clone() });
            return self.entry_of(ino);
        }
        let prefix = format!("{child}/");
        if view.dbs.keys().any(|k| k.starts_with(&prefix)) {
            let ino = self.ino_for(
                &view,
                &child,
                VNode::Dir {
                    view: view.clone(),
                    rel: child.clone(),
                },
            );
            return self.entry_of(ino);
        }
        Err(libc::ENOENT)
    }

    /// Entries of virtual directory `ino`: (ino, is a directory, name). `.history` lists
    /// restore points; their inodes are given on lookup, so they are listed with inode 0 …
    /// except that FUSE wants a number: a stable per-name placeholder is used.
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, i32> {
        let (view, rel) = {
            let nodes = self.nodes.read();
            match nodes.get(&ino) {
                Some(VNode::Root) => (None, String::new()),
                Some(VNode::Dir { view, rel }) => (Some(view.clone()), rel.clone()),
                Some(VNode::File { .. }) => return Err(libc::ENOTDIR),
                None => return Err(libc::ENOENT),
            }
        };
        let Some(view) = view else {
            let names = self.restore_points();
            return Ok(names
                .into_iter()
                .enumerate()
                .map(|(i, n)| (VIRT | (1 << 62) | i as u64, true, n))
                .collect());
        };
        let prefix = if rel.is_empty() {
            String::new()
        } else {
            format!("{rel}/")
        };
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for k in view.dbs.keys() {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            match rest.split_once('/') {
                None => {
                    let ino = self.listed_ino(&view, k);
                    out.push((ino, false, rest.to_string()));
                }
                Some((d, _)) => {
                    if seen.insert(d.to_string()) {
                        let child = format!("{prefix}{d}");
                        let ino = self.listed_ino(&view, &child);
                        out.push((ino, true, d.to_string()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads `size` bytes at `offset` of view file `ino`.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let db = match self.nodes.read().get(&ino) {
            Some(VNode::File { db }) => db.clone(),
            Some(_) => return Err(libc::EISDIR),
            None => return Err(libc::ENOENT),
        };
        let total = db.size();
        if offset >= total {
            return Ok(Vec::new());
        }
        let end = (offset + size as u64).min(total);
        let ps = db.page_size as u64;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let pgno = (pos / ps) as u32 + 1;
            let page = self.page(&db, pgno).map_err(|e| {
                log::error!(
                    "{}: reading page {pgno} of the history view at TXID {}: {e:#}",
                    db.origin.name,
                    db.txid
                );
                libc::EIO
            })?;
            let in_page = (pos % ps) as usize;
            let n = ((end - pos) as usize).min(ps as usize - in_page);
            out.extend_from_slice(&page[in_page..in_page + n]);
            pos += n as u64;
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- listing

    /// The names `.history` lists: restore points from staging and the replica, and `latest`.
    fn restore_points(&self) -> Vec<String> {
        let mut l = self.listing.lock();
        if let Some(c) = l.as_ref() {
            if c.at.elapsed() < LIST_TTL {
                return c.names.clone();
            }
        }
        let mut times = BTreeSet::new();
        for s in self.staged_dbs() {
            if let Ok(log) = self.staged_log(&s.dir) {
                if log.base.txid > 0 && log.base.time_ns > 0 {
                    times.insert(log.base.time_ns);
                }
                let n = log.records.len();
                let step = n.div_ceil(STAGED_POINTS).max(1);
                for (i, (_, h, _)) in log.records.iter().enumerate() {
                    if i % step == 0 || i + 1 == n {
                        times.insert(h.time_ns);
                    }
                }
            }
        }
        if let Some(r) = &self.replica {
            match self.replica_points(r) {
                Ok(t) => times.extend(t),
                Err(e) => log::warn!(".history: cannot list the replica's restore points: {e:#}"),
            }
        }
        // Names have milliseconds: round up, so each name resolves to the state it stands for.
        let mut names: Vec<String> = times
            .into_iter()
            .map(|t| fmt_time(t.div_ceil(1_000_000) * 1_000_000))
            .collect();
        names.dedup();
        names.push("latest".into());
        *l = Some(Listing {
            at: Instant::now(),
            names: names.clone(),
        });
        names
    }

    /// Commit times of the replica's snapshots and of the ends of its highest level's segments.
    fn replica_points(&self, r: &ReplicaSide) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let opener = r.opener();
        let reader = Reader::new(r.client.as_ref(), opener.as_ref());
        for (id, name) in self.replica_dbs(r)? {
            let cat = self.replica_catalog(r, &id, &name)?;
            // Snapshots and the ends of the highest compaction level: a listing that stays
            // short over a long window (a few dozen entries a day with the defaults).
            let top = cat.levels.iter().skip(1).rev().find(|l| !l.is_empty());
            for o in cat.snaps.iter().chain(top.into_iter().flatten()) {
                let known = r.end_times.lock().get(&o.key).copied();
                let t = match known {
                    Some(t) => Some(t),
                    None => reader.end_time(o).ok(),
                };
                if let Some(t) = t {
                    r.end_times.lock().insert(o.key.clone(), t);
                    out.push(t);
                }
            }
        }
        Ok(out)
    }

    fn replica_dbs(&self, r: &ReplicaSide) -> Result<Vec<(String, String)>> {
        let mut g = r.dbs.lock();
        if let Some((at, v)) = g.as_ref() {
            if at.elapsed() < LIST_TTL {
                return Ok(v.clone());
            }
        }
        let opener = r.opener();
        let v = Reader::new(r.client.as_ref(), opener.as_ref()).databases()?;
        *g = Some((Instant::now(), v.clone()));
        Ok(v)
    }

    fn replica_catalog(&self, r: &ReplicaSide, id: &str, name: &str) -> Result<DbCatalog> {
        if let Some((at, c)) = r.cats.lock().get(id) {
            if at.elapsed() < LIST_TTL {
                return Ok(c.clone());
            }
        }
        let c = Reader::new(r.client.as_ref(), None).catalog(id, name)?;
        r.cats
            .lock()
            .insert(id.to_string(), (Instant::now(), c.clone()));
        Ok(c)
    }

    // ---------------------------------------------------------------- resolution

    /// The view named `name` (resolved once, then reused; `latest` for a second).
    fn view(&self, name: &str) -> Result<Arc<TimeView>, i32> {
        if let Some(v) = self.views.lock().get(name) {
            if name != "latest" || v.resolved.elapsed() < LATEST_TTL {
                return Ok(v.clone());
            }
        }
        let target = match parse_name(name) {
            Ok(t) => t,
            Err(e) => {
                log::info!(".history/{name}: no such view: {e}");
                return Err(libc::ENOENT);
            }
        };
        if let Target::Time(t) = target {
            if t > now_ns() {
                log::info!(".history/{name}: no such view: that instant is in the future");
                return Err(libc::ENOENT);
            }
        }
        let dbs = self.resolve(target);
        if dbs.is_empty() {
            log::info!(
                ".history/{name}: no database has a restore point there (outside the window of local staging{})",
                if self.replica.is_some() { " and the replica" } else { "; no replica is readable" }
            );
            return Err(libc::ENOENT);
        }
        let mtime_ns = match target {
            Target::Time(t) => t,
            _ => dbs.values().map(|d| d.time_ns).max().unwrap_or(0),
        };
        let v = Arc::new(TimeView {
            name: name.to_string(),
            mtime_ns,
            dbs,
            resolved: Instant::now(),
        });
        let mut views = self.views.lock();
        if views.len() >= MAX_VIEWS {
            if let Some(old) = views
                .iter()
                .min_by_key(|(_, v)| v.resolved)
                .map(|(k, _)| k.clone())
            {
                views.remove(&old);
            }
        }
        views.insert(name.to_string(), v.clone());
        log::debug!(".history/{}: resolved {} databases", v.name, v.dbs.len());
        Ok(v)
    }

    /// Every database at `target`, by name.
    fn resolve(&self, target: Target) -> BTreeMap<String, Arc<DbView>> {
        let mut out: BTreeMap<String, Arc<DbView>> = BTreeMap::new();
        let live: BTreeSet<String> = self
            .capture
            .databases()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut staged = self.staged_dbs();
        // Live databases first, then retired ones newest first: the first view of a name wins.
        staged.sort_by_key(|s| (s.deleted_ns.is_some(), std::cmp::Reverse(s.deleted_ns)));
        let mut staged_ids = BTreeSet::new();
        for s in staged {
            staged_ids.insert(s.id.clone());
            if out.contains_key(&s.name) {
                continue;
            }
            if let Some(d) = s.deleted_ns {
                let gone = match target {
                    Target::Latest => true,
                    Target::Time(t) => d <= t,
                    Target::Txid(_) => false,
                };
                if gone {
                    continue;
                }
            }
            let origin = Origin {
                name: s.name.clone(),
                id: s.id.clone(),
                stage_dir: Some(s.dir.clone()),
            };
            match self.resolve_one(&origin, target) {
                Ok(Some(v)) => {
                    out.insert(s.name.clone(), Arc::new(v));
                }
                Ok(None) => {}
                Err(e) => log::warn!(".history: {} at {}: {e:#}", s.name, describe(target)),
            }
        }
        // Databases only the replica knows.
        if let Some(r) = &self.replica {
            match self.replica_dbs(r) {
                Ok(dbs) => {
                    for (id, name) in dbs {
                        if staged_ids.contains(&id) || out.contains_key(&name) {
                            continue;
                        }
                        if target == Target::Latest && !live.contains(&name) {
                            continue;
                        }
                        let origin = Origin {
                            name: name.clone(),
                            id,
                            stage_dir: None,
                        };
                        match self.resolve_one(&origin, target) {
                            Ok(Some(v)) => {
                                out.insert(name, Arc::new(v));
                            }
                            Ok(None) => {}
                            Err(e) => {
                                log::warn!(".history: {name} at {}: {e:#}", describe(target))
                            }
                        }
                    }
                }
                Err(e) => log::warn!(".history: cannot read the replica: {e:#}"),
            }
        }
        out
    }

    /// One database at `target`: from staging if it holds it, else from the replica.
    fn resolve_one(&self, o: &Origin, target: Target) -> Result<Option<DbView>> {
        if let Some(dir) = &o.stage_dir {
            match self.staged_view(o, dir, target) {
                Ok(Found::View(v)) => return Ok(Some(*v)),
                Ok(Found::Absent) => return Ok(None),
                Ok(Found::NotStaged) => {}
                // A past state is the same wherever it is read from; `latest` is only what
                // staging says.
                Err(e) if target != Target::Latest && self.replica.is_some() => log::warn!(
                    ".history: {} at {}: cannot read local staging ({e:#}); trying the replica",
                    o.name,
                    describe(target)
                ),
                Err(e) => return Err(e),
            }
        }
        let Some(r) = &self.replica else {
            log::info!(
                ".history: {} at {} is older than local staging and no replica is configured",
                o.name,
                describe(target)
            );
            return Ok(None);
        };
        match self.replica_view(r, o, target) {
            Ok(v) => Ok(v),
            Err(e) => {
                log::info!(
                    ".history: {} at {} cannot be served: {e:#}",
                    o.name,
                    describe(target)
                );
                Ok(None)
            }
        }
    }

    fn staged_dbs(&self) -> Vec<Staged> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(self.meta_root.join("db")) else {
            return out;
        };
        for e in rd.flatten() {
            let dir = e.path();
            let Ok(name) = fs::read_to_string(dir.join("name")) else {
                continue;
            };
            let deleted = dir.join("deleted");
            let deleted_ns = deleted.exists().then(|| mtime_ns(&deleted).unwrap_or(0));
            out.push(Staged {
                id: e.file_name().to_string_lossy().into_owned(),
                name,
                dir,
                deleted_ns,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Headers of segment `path` (cached; only what was appended since is read).
    fn seg_headers(&self, path: &Path) -> Result<Vec<(RecordHeader, u64)>> {
        let mut g = self.headers.lock();
        let (from, mut have) = match g.remove(path) {
            Some((end, v)) => (end, v),
            None => (0, Vec::new()),
        };
        let more = scan_headers(path, from)?;
        have.extend(more);
        let end = have.last().map_or(0, |(h, off)| off + h.len());
        g.insert(path.to_path_buf(), (end, have.clone()));
        if g.len() > 4096 {
            g.retain(|p, _| p.exists());
        }
        Ok(have)
    }

    /// The staging log of `dir` after its base, segments held open; retried if a fold moved
    /// things underneath.
    fn staged_log(&self, dir: &Path) -> Result<StagedLog> {
        // A fold rewrites base.db and then removes segments; wait for it rather than fail.
        let deadline = Instant::now() + FOLD_WAIT;
        let mut first = true;
        loop {
            if !first {
                if Instant::now() > deadline {
                    bail!(
                        "staging of {} kept changing under the reader for {FOLD_WAIT:?}",
                        dir.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            first = false;
            let base = read_base_meta(dir)?;
            if base.folding.is_some() {
                continue;
            }
            let mut files = Vec::new();
            let mut records = Vec::new();
            let mut ok = true;
            let mut next = base.txid + 1;
            for (_, path) in segment_files(dir)? {
                let f = match File::open(&path) {
                    Ok(f) => f,
                    Err(_) => {
                        ok = false;
                        break;
                    }
                };
                let Ok(hs) = self.seg_headers(&path) else {
                    // Removed by a fold since it was listed.
                    ok = false;
                    break;
                };
                if hs.last().is_none_or(|(h, _)| h.txid < next) {
                    continue;
                }
                let idx = files.len() as u32;
                files.push(Arc::new(f));
                for (h, off) in hs {
                    if h.txid < next {
                        continue;
                    }
                    if h.txid != next {
                        ok = false;
                        break;
                    }
                    records.push((idx, h, off));
                    next += 1;
                }
                if !ok {
                    break;
                }
            }
            if ok && read_base_meta(dir)? == base {
                return Ok(StagedLog {
                    base,
                    files,
                    records,
                });
            }
        }
    }

    fn staged_view(&self, o: &Origin, dir: &Path, target: Target) -> Result<Found> {
        let log = self.staged_log(dir)?;
        let base = log.base;
        let last = log.records.last().map_or(base.txid, |(_, h, _)| h.txid);
        // How many records (from the first after the base) the state includes.
        let n = match target {
            Target::Latest => {
                if last == 0 {
                    return Ok(Found::Absent);
                }
                log.records.len()
            }
            Target::Txid(t) => {
                if t > last {
                    return Ok(Found::Absent);
                }
                if t < base.txid {
                    return Ok(Found::NotStaged);
                }
                (t - base.txid) as usize
            }
            Target::Time(t) => {
                let n = log.records.partition_point(|(_, h, _)| h.time_ns <= t);
                if n == 0 {
                    if base.txid == 0 {
                        return Ok(Found::Absent);
                    }
                    if base.time_ns == 0 || base.time_ns > t {
                        return Ok(Found::NotStaged);
                    }
                }
                n
            }
        };
        let mut map = PageMap {
            files: log.files.clone(),
            objs: Vec::new(),
            pages: HashMap::new(),
            base: None,
            base_limit: base.db_pages,
        };
        let (mut txid, mut time_ns, mut ps, mut db_pages) =
            (base.txid, base.time_ns, base.page_size, base.db_pages);
        if base.db_pages > 0 {
            let p = dir.join("base.db");
            map.base = Some(BaseRef {
                dir: dir.to_path_buf(),
                file: File::open(&p).with_context(|| format!("opening {}", p.display()))?,
                meta: base,
            });
        }
        let mut num = [0u8; 4];
        let mut window = Window::default();
        for (fi, h, off) in &log.records[..n] {
            let f = &log.files[*fi as usize];
            if h.kind == Kind::Snapshot || (ps != 0 && h.page_size != ps) {
                map.pages.clear();
                map.base_limit = 0;
            }
            if let Some(n) = h.coded {
                let at = off + RECORD_HEADER as u64;
                let body = window.get(&log.files, *fi, at, n as u64)?;
                let entries = crate::delta::entries(body, at, h.page_size as usize)
                    .map_err(|e| anyhow!("staged record at {off}: {e}"))?;
                for e in entries {
                    let loc = match e.coding {
                        crate::delta::Coding::Whole => Loc::Raw {
                            file: *fi,
                            off: at + e.data.start as u64,
                        },
                        _ => Loc::Coded {
                            file: *fi,
                            at: e.at,
                        },
                    };
                    map.pages.insert(e.pgno, loc);
                }
            } else {
                let step = 4 + h.page_size as u64;
                for i in 0..h.npages as u64 {
                    let at = off + RECORD_HEADER as u64 + i * step;
                    f.read_exact_at(&mut num, at)?;
                    map.pages.insert(
                        u32::from_be_bytes(num),
                        Loc::Raw {
                            file: *fi,
                            off: at + 4,
                        },
                    );
                }
            }
            if h.db_pages < db_pages {
                map.pages.retain(|p, _| *p <= h.db_pages);
            }
            map.base_limit = map.base_limit.min(h.db_pages);
            (txid, time_ns, ps, db_pages) = (h.txid, h.time_ns, h.page_size, h.db_pages);
        }
        if map.base_limit == 0 {
            map.base = None;
        }
        if txid == 0 {
            return Ok(Found::Absent);
        }
        Ok(Found::View(Box::new(DbView {
            id: self.next_view.fetch_add(1, Ordering::Relaxed),
            origin: o.clone(),
            txid,
            time_ns,
            page_size: ps,
            db_pages,
            map: RwLock::new(map),
        })))
    }

    /// Object `o` of the replica, opened for reading in place (its header and directory read
    /// and verified; cached). An object of format version 1 is downloaded whole instead
    /// (decrypted, verified) and read from its local copy.
    fn object(&self, r: &ReplicaSide, o: &Obj) -> Result<Arc<ObjReader>> {
        if let Some(x) = self.objects.lock().get(&o.key) {
            return Ok(x.clone());
        }
        let opener = r.opener();
        let client: Arc<dyn ReplicaClient> = r.client.clone();
        let x = match ObjReader::open(&client, &o.key, o.size, opener.as_ref())? {
            Opened::Ranged(x) => Arc::new(*x),
            Opened::Whole => {
                let (f, hdr) = self.download(r, &o.key)?;
                Arc::new(ObjReader::local(&o.key, f, hdr)?)
            }
        };
        self.objects.lock().put(o.key.clone(), x.clone());
        Ok(x)
    }

    /// The local plain copy of object `key`, downloaded (and decrypted, verified) if needed:
    /// for objects of format version 1 only.
    fn download(&self, r: &ReplicaSide, key: &str) -> Result<(File, segment::ObjHeader)> {
        let _g = self.fetch_lock.lock();
        let local = self.cache_dir.join(key.replace('/', "_"));
        if let Ok(f) = File::open(&local) {
            let _ = f.set_modified(std::time::SystemTime::now());
            let mut head = vec![0u8; segment::HEADER];
            f.read_exact_at(&mut head, 0)?;
            let h = segment::parse_header(&head, key)?;
            return Ok((f, h));
        }
        self.evict_objects();
        let scratch = self
            .cache_dir
            .join(format!(".{}.part", key.replace('/', "_")));
        let opener = r.opener();
        let plain = Reader::new(r.client.as_ref(), opener.as_ref()).fetch(key, &scratch)?;
        self.whole_downloads.fetch_add(1, Ordering::Relaxed);
        let f = File::open(&plain)?;
        let h = match segment::verify(&f, key) {
            Ok(h) => h,
            Err(e) => {
                let _ = fs::remove_file(&plain);
                return Err(e.into());
            }
        };
        fs::rename(&plain, &local)?;
        Ok((f, h))
    }

    /// Removes the oldest downloaded objects while they take more than the budget (views
    /// using one keep it open, so its space is released once they are gone).
    fn evict_objects(&self) {
        let Ok(rd) = fs::read_dir(&self.cache_dir) else {
            return;
        };
        let mut v: Vec<(u64, u64, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((mtime_ns(&e.path()).unwrap_or(0), m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = v.iter().map(|x| x.1).sum();
        v.sort();
        for (_, len, p) in v {
            if total <= self.obj_budget {
                break;
            }
            let _ = fs::remove_file(&p);
            total -= len;
        }
    }

    fn replica_view(&self, r: &ReplicaSide, o: &Origin, target: Target) -> Result<Option<DbView>> {
        let known = self.replica_dbs(r)?;
        if !known.iter().any(|(id, _)| *id == o.id) {
            bail!("the replica holds no database with id {}", o.id);
        }
        let cat = self.replica_catalog(r, &o.id, &o.name)?;
        let opener = r.opener();
        let reader = Reader::new(r.client.as_ref(), opener.as_ref());
        let plan = catalog::plan(&reader, &cat, target)?;
        let mut map = PageMap {
            files: Vec::new(),
            objs: Vec::new(),
            pages: HashMap::new(),
            base: None,
            base_limit: 0,
        };
        let mut state: u64 = 0;
        let mut last: Option<RecordHeader> = None;
        let mut ps = 0u32;
        for step in &plan.steps {
            let obj = self.object(r, &step.obj)?;
            if obj.hdr.level > 0 && obj.hdr.first_txid != state + 1 {
                bail!(
                    "{} covers TXIDs {}..={} but the view stands at {state}",
                    obj.key,
                    obj.hdr.first_txid,
                    obj.hdr.last_txid
                );
            }
            let oi = map.objs.len() as u32;
            map.objs.push(obj.clone());
            // The index is in TXID order: walk it alongside the records.
            let index = &obj.dir.index;
            let mut at = 0;
            for h in &obj.dir.records {
                let from = at;
                while at < index.len() && index[at].txid <= h.txid {
                    at += 1;
                }
                if h.txid <= state || h.txid > step.upto || h.time_ns > step.until_ns {
                    continue;
                }
                if h.kind == Kind::Snapshot || (ps != 0 && h.page_size != ps) {
                    map.pages.clear();
                }
                ps = h.page_size;
                for e in index[from..at].iter().filter(|e| e.txid == h.txid) {
                    map.pages.insert(
                        e.pgno,
                        Loc::Frame {
                            obj: oi,
                            frame: e.frame,
                            in_frame: e.in_frame,
                        },
                    );
                }
                if last.is_some_and(|l| h.db_pages < l.db_pages) {
                    map.pages.retain(|p, _| *p <= h.db_pages);
                }
                state = h.txid;
                last = Some(*h);
            }
        }
        let Some(last) = last else {
            return Ok(None);
        };
        if let Target::Txid(t) = target {
            if last.txid != t {
                return Ok(None);
            }
        }
        Ok(Some(DbView {
            id: self.next_view.fetch_add(1, Ordering::Relaxed),
            origin: o.clone(),
            txid: last.txid,
            time_ns: last.time_ns,
            page_size: last.page_size,
            db_pages: last.db_pages,
            map: RwLock::new(map),
        }))
    }

    // ---------------------------------------------------------------- pages

    fn cached(&self, key: (u64, u32)) -> Option<Arc<Vec<u8>>> {
        self.pages.lock().0.get(&key).cloned()
    }

    fn remember(&self, key: (u64, u32), page: Arc<Vec<u8>>) {
        let mut g = self.pages.lock();
        let len = page.len() as u64;
        if let Some(old) = g.0.put(key, page) {
            g.1 -= old.len() as u64;
        }
        g.1 += len;
        while g.1 > self.page_budget {
            match g.0.pop_lru() {
                Some((_, p)) => g.1 -= p.len() as u64,
                None => break,
            }
        }
    }

    /// Page `pgno` of `db` (1-based, within its size), page 1 in rollback journal mode.
    fn page(&self, db: &DbView, pgno: u32) -> Result<Arc<Vec<u8>>> {
        if let Some(p) = self.cached((db.id, pgno)) {
            return Ok(p);
        }
        for _ in 0..3 {
            let got = {
                let map = db.map.read();
                self.read_page(db, &map, pgno)?
            };
            match got {
                Some(mut page) => {
                    if pgno == 1 && page.len() >= 20 && page.starts_with(b"SQLite format 3\0") {
                        page[18] = 1;
                        page[19] = 1;
                    }
                    let p = Arc::new(page);
                    self.remember((db.id, pgno), p.clone());
                    return Ok(p);
                }
                None => self.rebuild(db)?,
            }
        }
        bail!("the staging base keeps moving")
    }

    /// Reads one page through the map; `None` if the staging base moved (rebuild the map).
    fn read_page(&self, db: &DbView, map: &PageMap, pgno: u32) -> Result<Option<Vec<u8>>> {
        let ps = db.page_size as usize;
        let mut page = vec![0u8; ps];
        match map.pages.get(&pgno) {
            Some(Loc::Raw { file, off }) => {
                map.files[*file as usize].read_exact_at(&mut page, *off)?;
            }
            Some(Loc::Coded { file, at }) => {
                crate::delta::read_entry(&map.files[*file as usize], *at, &mut page, 0)?;
            }
            Some(&Loc::Frame {
                obj,
                frame,
                in_frame,
            }) => {
                let raw = self.frame(&map.objs[obj as usize], frame)?;
                let at = in_frame as usize;
                page.copy_from_slice(
                    raw.get(at..at + ps)
                        .ok_or_else(|| anyhow!("a page index entry points past its frame"))?,
                );
                // Read ahead: the entries that follow in the same frame, if the map points at
                // them (sequential scans fetch and decode each frame once).
                let mut at = at + ps;
                for _ in 0..READ_AHEAD {
                    let Some(entry) = raw.get(at..at + 4 + ps) else {
                        break;
                    };
                    let p = u32::from_be_bytes(entry[..4].try_into()?);
                    at += 4;
                    if p != 1 && p != pgno && p <= db.db_pages {
                        if let Some(&Loc::Frame {
                            obj: o2,
                            frame: f2,
                            in_frame: i2,
                        }) = map.pages.get(&p)
                        {
                            if o2 == obj && f2 == frame && i2 as usize == at {
                                self.remember((db.id, p), Arc::new(entry[4..].to_vec()));
                            }
                        }
                    }
                    at += ps;
                }
            }
            None => {
                if let Some(b) = map.base.as_ref().filter(|_| pgno <= map.base_limit) {
                    b.file
                        .read_exact_at(&mut page, (pgno as u64 - 1) * ps as u64)?;
                    if read_base_meta(&b.dir).ok() != Some(b.meta) {
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some(page))
    }

    /// Frame `i` of object `o`, decoded and verified (recent ones are kept).
    fn frame(&self, o: &ObjReader, i: u32) -> Result<Arc<Vec<u8>>> {
        let k = (o.key.clone(), i);
        if let Some(f) = self.frames.lock().get(&k) {
            return Ok(f.clone());
        }
        let f = Arc::new(o.frame(i)?);
        self.frames.lock().put(k, f.clone());
        Ok(f)
    }

    /// Rebuilds `db`'s map for the same TXID after the staging base moved.
    fn rebuild(&self, db: &DbView) -> Result<()> {
        let t = Target::Txid(db.txid);
        let mut fresh = None;
        if let Some(dir) = &db.origin.stage_dir {
            if let Found::View(v) = self.staged_view(&db.origin, dir, t)? {
                fresh = Some(*v);
            }
        }
        if fresh.is_none() {
            if let Some(r) = &self.replica {
                fresh = self.replica_view(r, &db.origin, t)?;
            }
        }
        let v = fresh.ok_or_else(|| {
            anyhow!(
                "TXID {} of {} was folded out of staging and the replica does not have it",
                db.txid,
                db.origin.name
            )
        })?;
        if (v.db_pages, v.page_size) != (db.db_pages, db.page_size) {
            bail!("rebuilding the view gave a different database size");
        }
        *db.map.write() = v.map.into_inner();
        Ok(())
    }
}

fn opener_for(k: &Key) -> Result<Opener> {
    match k {
        Key::IdentityFile(f) => Opener::from_identity_file(f),
        Key::Passphrase(p) => Opener::from_passphrase(p),
    }
}

impl ReplicaSide {
    fn opener(&self) -> Option<Opener> {
        self.key
            .as_ref()
            .and_then(|k| opener_for(k).ok())
            .map(|o| o.sharing(&self.file_keys))
    }
}

fn describe(t: Target) -> String {
    match t {
        Target::Latest => "latest".into(),
        Target::Txid(n) => format!("TXID {n}"),
        Target::Time(ns) => fmt_time(ns),
    }
}

// ------------------------------------------------------------------------------------------
// The kernel layer's contract for the virtual tree it serves (`crate::fs::Views`). Kept in
// one block at the end of this file (to be moved with the history folder when merging).

const _: () = {
    assert!(VIRT == crate::fs::VIRTUAL);
    let (a, b) = (NAME.as_bytes(), crate::fs::VIEWS_DIR.as_bytes());
    assert!(a.len() == b.len());
    let mut i = 0;
    while i < a.len() {
        assert!(a[i] == b[i]);
        i += 1;
    }
};

impl From<Entry> for crate::fs::ViewEntry {
    fn from(e: Entry) -> Self {
        crate::fs::ViewEntry {
            ino: e.ino,
            dir: e.dir,
            size: e.size,
            mtime_ns: e.mtime_ns,
        }
    }
}

impl crate::fs::Views for History {
    fn root(&self) -> crate::fs::ViewEntry {
        self.root_entry().into()
    }
    fn lookup(&self, parent: u64, name: &str) -> Result<crate::fs::ViewEntry, i32> {
        History::lookup(self, parent, name).map(Into::into)
    }
    fn getattr(&self, ino: u64) -> Result<crate::fs::ViewEntry, i32> {
        History::getattr(self, ino).map(Into::into)
    }
    fn is_file(&self, ino: u64) -> bool {
        History::is_file(self, ino)
    }
    fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, i32> {
        History::readdir(self, ino)
    }
    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        History::read(self, ino, offset, size)
    }
    fn forget(&self, ino: u64, n: u64) {
        History::forget(self, ino, n)
    }
}
