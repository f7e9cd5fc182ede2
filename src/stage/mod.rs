//! The local durable staging log: every captured transaction of one database, in TXID order.
//!
//! Layout of one database's staging directory (`BACKING/.sqlfs/db/<id>/`, see docs/FORMAT.md):
//! - `log/<first txid, 20 digits>.seg`: segments of records; the newest one is appended to.
//! - `base.db` + `base.meta`: the database as of `base.meta`'s TXID, into which old segments are
//!   folded so staging stays bounded. TXID 0 is the empty database.
//!
//! Invariants:
//! - Records are appended in TXID order with no gap; a record is complete only if its trailing
//!   CRC matches. On open, a torn tail (a crash mid-append) is cut off.
//! - `base.meta` names the TXID `base.db` holds. While a fold runs, `base.meta` says `folding`;
//!   a fold interrupted by a crash is redone from the segments, which are deleted only after the
//!   new `base.meta` is durable.
//! - The state after TXID N is `base.db` with every record in (base, N] applied in order.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::backing::{shown, WRITEBACK_STEP};
use crate::record::{
    encode_coded, read_body, read_full, read_header, read_record, write_record, Images, RecordError,
};
pub use crate::record::{Kind, PageSink, RecordHeader, WalPos, RECORD_HEADER};
use parking_lot::Mutex;

mod apply;
mod prestage;
mod reader;
use apply::Applier;
pub use prestage::Prestaged;
pub use reader::StagedReader;

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Staging may grow to this many times `--stage-limit` for a lagging replica before it is
/// folded anyway (that replica then gets a snapshot when it comes back).
pub const HARD_FACTOR: u64 = 4;
/// A segment is sealed (a new one started) once it reaches this size.
const SEGMENT_BYTES: u64 = 8 << 20;
/// Bytes of small records [`DbStage::append`] gathers before writing them out; records larger
/// than this are written at once.
const FLUSH_AT: usize = crate::record::CODED_LIMIT;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("staging I/O on {}: {err}", shown(.path).display())]
    Io { path: PathBuf, err: io::Error },
    #[error("staging record in {} at offset {offset} is corrupt: {why}", shown(.path).display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("{0}")]
    Damaged(String),
    #[error("the state after TXID {0} is not staged (the states after TXIDs {1}..={2} are)")]
    Missing(u64, u64, u64),
}

pub type Result<T> = std::result::Result<T, StageError>;

impl From<RecordError> for StageError {
    fn from(e: RecordError) -> StageError {
        match e {
            RecordError::Io { path, err } => StageError::Io { path, err },
            RecordError::Corrupt { path, offset, why } => StageError::Corrupt { path, offset, why },
        }
    }
}

/// Streams a record's pages into a sink.
pub type PageSource<'a> = &'a mut dyn FnMut(PageSink<'_>) -> Result<()>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StageError + '_ {
    move |err| StageError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// The base image's description, kept in `base.meta`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BaseMeta {
    pub txid: u64,
    pub checksum: u64,
    pub page_size: u32,
    pub db_pages: u32,
    /// Commit time of `txid` (ns since the epoch; 0 when unknown).
    pub time_ns: u64,
    /// Set while a fold into `base.db` is in progress: the TXID it folds up to.
    pub folding: Option<u64>,
}

impl BaseMeta {
    fn encode(&self) -> String {
        format!(
            "txid={}\nchecksum={:016x}\npage_size={}\ndb_pages={}\ntime={}\nfolding={}\n",
            self.txid,
            self.checksum,
            self.page_size,
            self.db_pages,
            self.time_ns,
            self.folding.map(|t| t.to_string()).unwrap_or_default()
        )
    }

    fn decode(s: &str) -> Option<BaseMeta> {
        let mut m = BaseMeta::default();
        for line in s.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "txid" => m.txid = v.parse().ok()?,
                "checksum" => m.checksum = u64::from_str_radix(v, 16).ok()?,
                "page_size" => m.page_size = v.parse().ok()?,
                "db_pages" => m.db_pages = v.parse().ok()?,
                "time" => m.time_ns = v.parse().ok()?,
                "folding" => {
                    m.folding = if v.is_empty() {
                        None
                    } else {
                        Some(v.parse().ok()?)
                    }
                }
                _ => {}
            }
        }
        Some(m)
    }
}

/// Creates the staging directory `dir` of a database named `name` whose state after
/// `meta.txid` is the file `db` (copied into `base.db`): a database restored from a replica
/// continues that replica's chain instead of starting a new one.
pub fn seed(dir: &Path, name: &str, db: &Path, meta: &BaseMeta) -> io::Result<()> {
    fs::create_dir_all(dir.join("log"))?;
    write_atomic(&dir.join("name"), name.as_bytes())?;
    let base = dir.join("base.db");
    fs::copy(db, &base)?;
    File::open(&base)?.sync_all()?;
    write_atomic(&dir.join("base.meta"), meta.encode().as_bytes())
}

/// The append side of a database's staging log.
struct Appender {
    file: File,
    path: PathBuf,
    len: u64,
    /// Bytes appended since the last fsync.
    dirty: bool,
    /// Offset up to which writeback was started: every [`WRITEBACK_STEP`] bytes appended, so
    /// that the next fsync (the periodic one, or a barrier a checkpoint waits on) finds little
    /// left to write.
    kicked: u64,
    /// Whole records appended but not written to the file yet (see [`DbStage::flush`]), and
    /// the header of the last of them.
    pending: Vec<u8>,
    pending_last: Option<RecordHeader>,
    /// A write of gathered records failed: they are gone. Set until [`DbStage::flush`] reports
    /// it (a sync from another thread may be the one that failed); appends fail meanwhile, so
    /// no later record lands on file after the gap.
    lost: bool,
    /// A failed write could not be cut back: the file may hold a partial record past `len`.
    /// Nothing is written (appends would land after it) until a cut succeeds.
    uncut: bool,
    /// The newest image of recently changed pages in this segment, which the next small
    /// records code their pages against.
    bases: crate::delta::Bases,
}

impl Appender {
    /// Cuts the file back to its last whole record after a failed write. Until that works
    /// (it may fail on a full disk too), nothing may be appended after the partial bytes.
    fn cut_back(&mut self) -> io::Result<()> {
        let r = self.file.set_len(self.len);
        self.uncut = r.is_err();
        r
    }

    /// Before a write: the file ends with the last whole record.
    fn whole(&mut self) -> Result<()> {
        if self.uncut {
            self.cut_back().map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Starts writeback of what was appended since the last call, once there is enough of it.
    /// Only a hint to the kernel: durability still comes from [`DbStage::sync`].
    fn kick(&mut self) {
        if self.len < self.kicked + WRITEBACK_STEP {
            return;
        }
        crate::backing::start_writeback(&self.file, self.kicked, self.len - self.kicked);
        self.kicked = self.len;
    }
}

/// One database's staging log.
pub struct DbStage {
    dir: PathBuf,
    app: Mutex<Option<Appender>>,
    /// A log file whose appender was parked ([`DbStage::park`]) before its last records were
    /// synced: [`DbStage::sync`] syncs it through a descriptor opened for that.
    unsynced: Mutex<Option<PathBuf>>,
    /// Serialises folds with readers of base.db.
    fold_lock: Mutex<()>,
    last: Mutex<Option<RecordHeader>>,
    damage: Mutex<Option<(String, u64)>>,
    /// Called each time records reach the log ([`DbStage::on_append`]).
    appended: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// How a staging log is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// By a mount: repaired and appended to.
    Write,
    /// By offline inspection: never changed.
    Read,
}

/// What follows the last valid record of a segment.
enum Tail {
    /// An incomplete record reaching the end of the file: a crash mid-append.
    Torn,
    /// A bad record with more data after it; the highest TXID among the readable records.
    Damaged(u64),
}

/// A buffered reader of a segment file: a buffer of the file's size, from 8 KiB to 1 MiB
/// (most segments of a database that commits a little are a few KiB; each shipment and each
/// database loaded at mount reads one).
fn sized_reader(f: File) -> BufReader<File> {
    let len = f.metadata().map(|m| m.len()).unwrap_or(1 << 20);
    BufReader::with_capacity(len.clamp(8 << 10, 1 << 20) as usize, f)
}

/// Scans `path`: (bytes of valid records from the start, header of the last valid one, the
/// error that stopped the scan, if any).
fn scan_valid(path: &Path) -> Result<(u64, Option<RecordHeader>, Option<StageError>)> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut r = sized_reader(f);
    let (mut good, mut last) = (0u64, None);
    loop {
        match read_record(&mut r, path, good).map_err(StageError::from) {
            Ok(Some(h)) => {
                good += h.len();
                last = Some(h);
            }
            Ok(None) => return Ok((good, last, None)),
            Err(e @ StageError::Corrupt { .. }) => return Ok((good, last, Some(e))),
            Err(e) => return Err(e),
        }
    }
}

/// Decides whether the bad data at `good` in a segment of `len` bytes is a torn tail.
fn tail_kind(path: &Path, good: u64, len: u64) -> Result<Tail> {
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(good)).map_err(io_err(path))?;
    let mut hb = [0u8; RECORD_HEADER];
    if read_full(&mut f, &mut hb).map_err(io_err(path))? < RECORD_HEADER {
        return Ok(Tail::Torn);
    }
    let Ok(h) = RecordHeader::decode(&hb) else {
        return Ok(Tail::Torn);
    };
    if good + h.len() >= len {
        return Ok(Tail::Torn);
    }
    // Valid records after the bad one: find the highest TXID to continue from.
    let mut max = h.txid;
    let mut off = good + h.len();
    let mut r = sized_reader(f);
    r.seek(SeekFrom::Start(off)).map_err(io_err(path))?;
    while let Ok(Some(h)) = read_record(&mut r, path, off) {
        max = max.max(h.txid);
        off += h.len();
    }
    Ok(Tail::Damaged(max))
}

fn seg_name(first_txid: u64) -> String {
    format!("{first_txid:020}.seg")
}

/// Makes [`write_atomic`]'s temporary names unique within the process.
static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes `data` to `path` atomically: temp file, fsync, rename, fsync of the directory.
/// Writers of one path may run at once (two databases of one name claim it together, the
/// one deleted and the one that replaced it): each writes a temporary file of its own, and
/// the last rename wins whole. A shared temporary name made the other rename fail (ENOENT),
/// or renamed bytes another writer was still writing.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(d) = path.parent() {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}

impl DbStage {
    /// Opens the staging log in `dir`. With [`Access::Write`] (a mount) it is created if
    /// needed, an interrupted fold is finished, and a torn tail (a crash mid-append) is cut
    /// off; a damaged record with valid records after it is not a torn tail: the segment is
    /// set aside as `*.damaged` and [`DbStage::damage`] says so, for the caller to restart the
    /// stream with a snapshot. With [`Access::Read`] (offline inspection) nothing is changed.
    pub fn open(dir: &Path, access: Access) -> Result<DbStage> {
        let logdir = dir.join("log");
        if access == Access::Write {
            fs::create_dir_all(&logdir).map_err(io_err(&logdir))?;
            prestage::remove_leftovers(&logdir)?;
        }
        let st = DbStage {
            dir: dir.to_path_buf(),
            app: Mutex::new(None),
            unsynced: Mutex::new(None),
            fold_lock: Mutex::new(()),
            last: Mutex::new(None),
            damage: Mutex::new(None),
            appended: std::sync::OnceLock::new(),
        };
        let meta = st.base_meta()?;
        if let (Some(upto), Access::Write) = (meta.folding, access) {
            log::warn!(
                "{}: finishing a fold interrupted at TXID {upto}",
                shown(dir).display()
            );
            st.fold_upto(upto)?;
        }
        let segs = st.segments()?;
        let mut last = None;
        for (i, (_, path)) in segs.iter().enumerate().rev() {
            let newest = i + 1 == segs.len();
            let (good, end, bad) = scan_valid(path)?;
            last = end;
            if let (Some(e), true, Access::Read) = (&bad, newest, access) {
                let len = fs::metadata(path).map_err(io_err(path))?.len();
                if let Tail::Damaged(max_txid) = tail_kind(path, good, len)? {
                    *st.damage.lock() = Some((e.to_string(), max_txid));
                }
            }
            if let (Some(e), true, Access::Write) = (bad, newest, access) {
                let len = fs::metadata(path).map_err(io_err(path))?.len();
                match tail_kind(path, good, len)? {
                    Tail::Torn => {
                        log::warn!("cutting the torn tail of a staging segment: {e}");
                        let f = OpenOptions::new()
                            .write(true)
                            .open(path)
                            .map_err(io_err(path))?;
                        f.set_len(good).map_err(io_err(path))?;
                        f.sync_all().map_err(io_err(path))?;
                    }
                    Tail::Damaged(max_txid) => {
                        let aside = path.with_extension("damaged");
                        log::error!("{e}; valid records follow it, so it is damage, not a torn write: setting the segment aside as {}", shown(&aside).display());
                        fs::rename(path, &aside).map_err(io_err(path))?;
                        *st.damage.lock() = Some((
                            format!("staging segment {} is damaged", shown(path).display()),
                            max_txid,
                        ));
                        last = None;
                        continue;
                    }
                }
            }
            if last.is_some() {
                break;
            }
        }
        *st.last.lock() = last;
        Ok(st)
    }

    /// If a damaged segment was set aside at open: why, and the highest TXID it held.
    pub fn damage(&self) -> Option<(String, u64)> {
        self.damage.lock().clone()
    }

    /// Sets what is called each time records reach the log file ([`DbStage::last`] moved
    /// on); only the first call sets it. It runs with the log's append lock held: it must be
    /// quick and take no lock that is held while appending.
    pub fn on_append(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.appended.set(f);
    }

    fn appended(&self) {
        if let Some(f) = self.appended.get() {
            f();
        }
    }

    /// The directory this stage lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Header of the newest record, if any.
    pub fn last(&self) -> Option<RecordHeader> {
        *self.last.lock()
    }

    /// Current base description (TXID 0, empty, if none was written yet).
    pub fn base_meta(&self) -> Result<BaseMeta> {
        read_base_meta(&self.dir)
    }

    /// Sorted (first txid, path) of all segments.
    fn segments(&self) -> Result<Vec<(u64, PathBuf)>> {
        segment_files(&self.dir)
    }

    /// Appends one record. `fill` must emit exactly `h.npages` (pgno, page) pairs, each
    /// `h.page_size` bytes. Not durable until [`DbStage::sync`]. Small records are gathered in
    /// memory and reach the file together at the next [`DbStage::flush`] (or once [`FLUSH_AT`]
    /// bytes are gathered): one write of many records costs the kernel far less than one write
    /// each. Until then [`DbStage::last`] does not show them, and readers of the log do not
    /// see them.
    pub fn append(
        &self,
        h: &RecordHeader,
        fill: impl FnOnce(PageSink<'_>) -> io::Result<()>,
    ) -> Result<()> {
        let mut guard = self.app.lock();
        if let Some(a) = guard.as_ref().filter(|a| a.lost) {
            return Err(lost_error(&a.path));
        }
        if guard
            .as_ref()
            .is_none_or(|a| a.len + a.pending.len() as u64 >= SEGMENT_BYTES)
        {
            if let Some(old) = guard.as_mut() {
                self.flush_locked(old)?;
                if old.dirty {
                    old.file.sync_data().map_err(io_err(&old.path))?;
                }
            }
            let segs = self.segments()?;
            let reuse = segs.last().filter(|(_, p)| {
                fs::metadata(p)
                    .map(|m| m.len() < SEGMENT_BYTES)
                    .unwrap_or(false)
            });
            let path = match reuse {
                Some((_, p)) => p.clone(),
                None => self.dir.join("log").join(seg_name(h.txid)),
            };
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            let len = file.metadata().map_err(io_err(&path))?.len();
            if len == 0 {
                File::open(self.dir.join("log"))
                    .and_then(|d| d.sync_all())
                    .map_err(io_err(&path))?;
            }
            *guard = Some(Appender {
                file,
                path,
                len,
                dirty: false,
                kicked: len,
                pending: Vec::new(),
                pending_last: None,
                lost: false,
                uncut: false,
                bases: Default::default(),
            });
        }
        let a = guard.as_mut().expect("appender opened above");
        if h.len() > FLUSH_AT as u64 {
            // A large record goes straight to the file, after what was gathered.
            self.flush_locked(a)?;
            a.whole()?;
            let res = write_record(&mut a.file, h, fill);
            match res {
                Ok(n) => a.len += n,
                Err(e) => {
                    // Never leave a partial record for a later one to follow.
                    let _ = a.cut_back();
                    a.bases.clear();
                    return Err(StageError::Io {
                        path: a.path.clone(),
                        err: e,
                    });
                }
            }
            a.dirty = true;
            a.kick();
            *self.last.lock() = Some(*h);
            self.appended();
            return Ok(());
        }
        let start = a.pending.len();
        // Coded straight into the gathered bytes, each page against its base if it has one.
        let at = a.len + start as u64;
        let coded = match encode_coded(&mut a.pending, at, h, fill, &a.bases) {
            Ok(c) => c,
            Err(e) => {
                a.pending.truncate(start);
                return Err(StageError::Io {
                    path: a.path.clone(),
                    err: e,
                });
            }
        };
        a.bases.apply(coded.updates);
        a.pending_last = Some(coded.header);
        if a.pending.len() >= FLUSH_AT {
            self.flush_locked(a)?;
        }
        Ok(())
    }

    /// Writes the records gathered by [`DbStage::append`] to the file. An error means records
    /// are gone, in this write or in an earlier one by [`DbStage::sync`] (the file is cut back
    /// to the last whole record before them): the caller must go back to the state of
    /// [`DbStage::last`]. Each loss is reported once.
    pub fn flush(&self) -> Result<()> {
        match self.app.lock().as_mut() {
            Some(a) => {
                let r = self.flush_locked(a);
                a.lost = false;
                r
            }
            None => Ok(()),
        }
    }

    fn flush_locked(&self, a: &mut Appender) -> Result<()> {
        if a.lost {
            a.pending.clear();
            a.pending_last = None;
            a.bases.clear();
            return Err(lost_error(&a.path));
        }
        let Some(last) = a.pending_last.take() else {
            return Ok(());
        };
        let res = a
            .whole()
            .and_then(|()| a.file.write_all(&a.pending).map_err(io_err(&a.path)));
        let n = a.pending.len() as u64;
        a.pending.clear();
        if let Err(e) = res {
            let _ = a.cut_back();
            a.lost = true;
            // The lost records held bases of the next ones.
            a.bases.clear();
            return Err(e);
        }
        a.len += n;
        a.dirty = true;
        a.kick();
        *self.last.lock() = Some(last);
        self.appended();
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> Result<()> {
        let mut g = self.app.lock();
        if let Some(a) = g.as_mut() {
            self.flush_locked(a)?;
            if a.dirty {
                a.file.sync_data().map_err(io_err(&a.path))?;
                a.dirty = false;
            }
        }
        let mut unsynced = self.unsynced.lock();
        if let Some(p) = unsynced.as_ref() {
            // The parked appender's file: its records are flushed, not yet durable. A file
            // folded away meanwhile holds nothing that needs it.
            match File::open(p) {
                Ok(f) => f.sync_data().map_err(io_err(p))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(p)(e)),
            }
            *unsynced = None;
        }
        Ok(())
    }

    /// True if records were appended since the last sync.
    pub fn is_dirty(&self) -> bool {
        self.app
            .lock()
            .as_ref()
            .is_some_and(|a| a.dirty || a.pending_last.is_some())
            || self.unsynced.lock().is_some()
    }

    /// Closes the log file of a database nobody uses (an idle database holds no descriptor;
    /// the next [`DbStage::append`] opens it again). Gathered records are written first; if
    /// that fails, or an earlier loss is not reported yet, the appender stays. Records not
    /// yet synced stay to be synced by [`DbStage::sync`]. True if it was closed (or was).
    pub fn park(&self) -> bool {
        let mut g = self.app.lock();
        let Some(a) = g.as_mut() else {
            return true;
        };
        if a.lost || a.uncut || self.flush_locked(a).is_err() {
            return false;
        }
        if a.dirty {
            *self.unsynced.lock() = Some(a.path.clone());
        }
        *g = None;
        true
    }

    /// Calls `f` for each record of one segment (header, pages iterator source) up to the one
    /// of TXID `upto`, and returns the last header read. It stops there: the last segment may
    /// be appended to meanwhile, and a record being written past `upto` is not complete yet
    /// (it would read as truncated).
    fn scan_segment(
        &self,
        path: &Path,
        upto: u64,
        mut f: impl FnMut(&RecordHeader, PageSource<'_>) -> Result<()>,
    ) -> Result<Option<RecordHeader>> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut images = Images::new(file.try_clone().map_err(io_err(path))?);
        let mut r = sized_reader(file);
        let mut off = 0u64;
        let mut last = None;
        while let Some((h, hb)) = read_header(&mut r, path, off)? {
            let mut consumed = false;
            {
                let mut pages_fn = |sink: PageSink<'_>| -> Result<()> {
                    consumed = true;
                    read_body(&mut r, &h, &hb, path, off, Some(sink), Some(&mut images))
                        .map_err(StageError::from)
                };
                f(&h, &mut pages_fn)?;
            }
            if !consumed {
                // Coded pages are decoded all the same: later records build on them.
                let mut skip = |_: u32, _: &[u8]| Ok(());
                let sink = h.coded.is_some().then_some(&mut skip as PageSink<'_>);
                read_body(&mut r, &h, &hb, path, off, sink, Some(&mut images))?;
            }
            off += h.len();
            last = Some(h);
            if h.txid >= upto {
                break;
            }
        }
        Ok(last)
    }

    /// Visits every staged record with TXID in `(after, upto]` in order. `f` gets the header and
    /// a function that streams the record's pages into a sink.
    pub fn for_each(
        &self,
        after: u64,
        upto: u64,
        mut f: impl FnMut(&RecordHeader, PageSource<'_>) -> Result<()>,
    ) -> Result<()> {
        let segs = self.segments()?;
        for (i, (first, path)) in segs.iter().enumerate() {
            let next_first = segs.get(i + 1).map(|s| s.0).unwrap_or(u64::MAX);
            if next_first <= after + 1 || *first > upto {
                continue;
            }
            self.scan_segment(path, upto, |h, pages| {
                if h.txid > after && h.txid <= upto {
                    f(h, pages)
                } else {
                    Ok(())
                }
            })?;
        }
        Ok(())
    }

    /// Headers of every staged record after the base.
    pub fn headers(&self) -> Result<Vec<RecordHeader>> {
        Ok(self.base_and_headers()?.1)
    }

    /// The base and the headers of every staged record after it, up to the last written,
    /// read together: a fold waits meanwhile (it would move the base and remove the segments
    /// being read).
    pub fn base_and_headers(&self) -> Result<(BaseMeta, Vec<RecordHeader>)> {
        if let Some((why, _)) = self.damage() {
            return Err(StageError::Damaged(why));
        }
        let _g = self.fold_lock.lock();
        let mut v = Vec::new();
        let base = self.base_meta()?;
        // Up to the last record written: one being appended after it is not read.
        let upto = self.last().map_or(u64::MAX, |h| h.txid);
        self.for_each(base.txid, upto, |h, _| {
            v.push(*h);
            Ok(())
        })?;
        Ok((base, v))
    }

    /// Writes the database as of `txid` into `out` (truncated first). Returns the header of
    /// that transaction's record (or a synthetic one for the base).
    pub fn materialize(&self, txid: u64, out: &File) -> Result<BaseMeta> {
        let _g = self.fold_lock.lock();
        let base = self.base_meta()?;
        let last = self.last().map(|h| h.txid).unwrap_or(base.txid);
        if txid < base.txid || txid > last {
            if let Some((why, _)) = self.damage() {
                return Err(StageError::Damaged(why));
            }
            return Err(StageError::Missing(txid, base.txid, last));
        }
        let outp = PathBuf::from("<output>");
        out.set_len(0).map_err(io_err(&outp))?;
        let basep = self.dir.join("base.db");
        if base.db_pages > 0 {
            let mut src = File::open(&basep).map_err(io_err(&basep))?;
            let mut dst = out;
            dst.seek(SeekFrom::Start(0)).map_err(io_err(&outp))?;
            io::copy(
                &mut (&mut src).take(base.db_pages as u64 * base.page_size as u64),
                &mut dst,
            )
            .map_err(io_err(&basep))?;
        }
        let state = self.apply_range(out, base, txid)?;
        if state.txid != txid {
            return Err(StageError::Missing(txid, base.txid, last));
        }
        Ok(state)
    }

    /// Applies the records after `from` up to `upto` to `file`, which holds the state `from`
    /// describes; returns the state reached.
    fn apply_range(&self, file: &File, from: BaseMeta, upto: u64) -> Result<BaseMeta> {
        let mut state = BaseMeta {
            folding: None,
            ..from
        };
        let mut out = Applier::new(file, &from);
        self.for_each(from.txid, upto, |h, pages| {
            out.apply(h, pages)?;
            state = BaseMeta {
                txid: h.txid,
                checksum: h.checksum_after,
                page_size: h.page_size,
                db_pages: h.db_pages,
                time_ns: h.time_ns,
                folding: None,
            };
            Ok(())
        })?;
        out.flush()?;
        Ok(state)
    }

    /// Folds every sealed segment whose records all have TXID <= `limit` into the base, so
    /// staging stays bounded. Returns the number of bytes of log released.
    pub fn fold(&self, limit: u64) -> Result<u64> {
        let segs = self.segments()?;
        let active = self.app.lock().as_ref().map(|a| a.path.clone());
        let mut upto = None;
        let mut bytes = 0;
        for (i, (_, path)) in segs.iter().enumerate() {
            let Some((next_first, _)) = segs.get(i + 1) else {
                break;
            };
            if Some(path) == active.as_ref() || next_first - 1 > limit {
                break;
            }
            upto = Some(next_first - 1);
            bytes += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        }
        match upto {
            Some(u) => {
                self.fold_upto(u)?;
                Ok(bytes)
            }
            None => Ok(0),
        }
    }

    fn fold_upto(&self, upto: u64) -> Result<()> {
        let _g = self.fold_lock.lock();
        let mut meta = self.base_meta()?;
        let metap = self.dir.join("base.meta");
        meta.folding = Some(upto);
        write_atomic(&metap, meta.encode().as_bytes()).map_err(io_err(&metap))?;
        let basep = self.dir.join("base.db");
        let base = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&basep)
            .map_err(io_err(&basep))?;
        let mut state = self.apply_range(&base, meta, upto)?;
        base.sync_all().map_err(io_err(&basep))?;
        state.folding = None;
        write_atomic(&metap, state.encode().as_bytes()).map_err(io_err(&metap))?;
        let segs = self.segments()?;
        for (i, (first, path)) in segs.iter().enumerate() {
            // A segment is folded when the next one starts at or before upto + 1. The last one
            // may be taking an append right now: it is read only if it starts at or before
            // `upto`, and then no further than its first record past `upto`, never into a
            // record being written after that.
            let folded = match segs.get(i + 1) {
                Some((next_first, _)) => next_first - 1 <= upto,
                None => {
                    *first <= upto
                        && self
                            .scan_segment(path, upto.saturating_add(1), |_, _| Ok(()))?
                            .is_some_and(|h| h.txid <= upto)
                }
            };
            if folded {
                fs::remove_file(path).map_err(io_err(path))?;
            }
        }
        Ok(())
    }

    /// Total bytes of log segments.
    pub fn log_bytes(&self) -> u64 {
        self.segments()
            .map(|s| {
                s.iter()
                    .map(|(_, p)| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    }
}

fn lost_error(path: &Path) -> StageError {
    StageError::Io {
        path: path.to_path_buf(),
        err: io::Error::other("records gathered for the staging log were lost in a failed write"),
    }
}

/// The base description in staging directory `dir` (TXID 0, empty, if none was written yet).
fn read_base_meta(dir: &Path) -> Result<BaseMeta> {
    let p = dir.join("base.meta");
    match fs::read_to_string(&p) {
        Ok(s) => BaseMeta::decode(&s).ok_or(StageError::Corrupt {
            path: p,
            offset: 0,
            why: "unreadable base.meta".into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BaseMeta::default()),
        Err(e) => Err(StageError::Io { path: p, err: e }),
    }
}

/// Sorted (first txid, path) of the log segments in staging directory `dir`.
fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let logdir = dir.join("log");
    let mut v = Vec::new();
    let rd = match fs::read_dir(&logdir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(StageError::Io {
                path: logdir,
                err: e,
            })
        }
    };
    for e in rd {
        let e = e.map_err(io_err(&logdir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u64>().ok())
        {
            v.push((n, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Headers of the complete records of segment `path` from byte `from` on, with the offset of
/// each, read without the pages (records are not verified: a reader of a record's pages trusts
/// staging). Stops at the end of the file, at an incomplete record or at an invalid header.
pub fn scan_headers(path: &Path, from: u64) -> Result<Vec<(RecordHeader, u64)>> {
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    let mut out = Vec::new();
    let mut off = from;
    let mut hb = [0u8; RECORD_HEADER];
    while off + RECORD_HEADER as u64 <= len {
        if f.read_exact_at(&mut hb, off).is_err() {
            break;
        }
        let Ok(h) = RecordHeader::decode(&hb) else {
            break;
        };
        if off + h.len() > len {
            break;
        }
        out.push((h, off));
        off += h.len();
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
