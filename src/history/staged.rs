//! Page maps from local staging: the staged databases under `.sqlfs/db/`, their logs after
//! the base (segments held open) and a view's page map built from the base and the records.
//! Staging is read through `stage::StagedReader` (base, segments, the check that the base
//! did not move) and `stage::scan_headers`: the fold protocol is stage's to know.

use super::*;

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

/// Segments whose record headers are kept in memory between reads of the staged log.
const HEADER_CACHE: usize = 4096;

impl History {
    pub(super) fn staged_dbs(&self) -> Vec<Staged> {
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
        if g.len() > HEADER_CACHE {
            // Segments folded or deleted since go first. A cache still more than half full
            // (thousands of databases, every segment there) starts over, so that the files
            // looked at in one pass are paid for by as many insertions before the next; else
            // every call would look at every file (a listing of `.history` over tens of
            // thousands of databases never ended).
            g.retain(|p, _| p.exists());
            if g.len() > HEADER_CACHE / 2 {
                g.retain(|p, _| p == path);
            }
        }
        Ok(have)
    }

    /// The staging log of `dir` after its base, segments held open; retried if a fold moved
    /// things underneath.
    pub(super) fn staged_log(&self, dir: &Path) -> Result<StagedLog> {
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
            let Some(staging) = StagedReader::open(dir)? else {
                continue;
            };
            let base = staging.base();
            let mut files = Vec::new();
            let mut records = Vec::new();
            let mut ok = true;
            let mut next = base.txid + 1;
            for (_, path) in staging.segments()? {
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
            if ok && staging.still_current()? {
                return Ok(StagedLog {
                    base,
                    staging,
                    files,
                    records,
                });
            }
        }
    }

    pub(super) fn staged_view(&self, o: &Origin, dir: &Path, target: Target) -> Result<Found> {
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
            map.base = Some(BaseRef {
                file: log.staging.open_base()?,
                staging: log.staging,
            });
        }
        let mut num = [0u8; 4];
        let mut window = Window::default();
        for (fi, h, off) in &log.records[..n] {
            let f = &log.files[*fi as usize];
            if h.replaces_state(ps) {
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
}
