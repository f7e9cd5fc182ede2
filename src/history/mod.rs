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
//! This file: the `History` type and the `.history` namespace (inodes, lookup, readdir,
//! getattr, read) and name parsing. The rest of the job sits in `resolve` (name → views),
//! `staged` (page maps from local staging), `replica` (page maps from the replica's objects)
//! and `cache` (the page cache and page reads).
//!
//! Invariants:
//! - A view's bytes are exactly what `sqlfs restore` writes for the same target, with page 1's
//!   bytes 18 and 19 set to 1 (rollback journal mode), so any client opens it read-only as is.
//! - A view never changes once resolved: staged segments are held open (a fold deletes them, the
//!   open handle stays valid); base.db pages are read under a check of `base.meta` before and
//!   after (`stage::StagedReader`), and a fold that moved the base makes the view rebuild its
//!   map for the same TXID.
//! - Nothing here writes to the live databases or their staging; no request is made to the
//!   replica unless someone lists `.history` or looks up a view staging cannot serve.

mod cache;
mod replica;
mod resolve;
mod staged;
mod views;

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
use crate::stage::{now_ns, scan_headers, BaseMeta, RecordHeader, StagedReader, RECORD_HEADER};

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

/// The staging base a view reads pages from (`base.db`), valid while `staging` is still
/// current.
struct BaseRef {
    file: File,
    staging: StagedReader,
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
    /// The reader the log was read through, standing on `base`.
    staging: StagedReader,
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
                    replica::opener_for(k)?;
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
}
