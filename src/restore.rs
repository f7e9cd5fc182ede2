//! `sqlfs restore`: rebuilds a database from a replica alone, as of its latest transaction,
//! a TXID or an instant, following the catalog's plan (the newest snapshot at or before the
//! target, then the fewest segments up to it).
//!
//! Invariants:
//! - Every object is verified (trailing CRC, layout, each record's CRC, TXID sequence) before
//!   any of its bytes are used, and the rolling database checksum is checked after every
//!   applied transaction; then `PRAGMA integrity_check` must pass.
//! - The output is built in a temporary file next to it, fsynced and renamed: a failure
//!   never leaves a file behind, and an existing file is only replaced with `--force`.
//! - Memory does not grow with the database: objects stream page by page from local copies
//!   (in a scratch directory next to the output, removed on every path), and at most
//!   `parallel` objects are downloaded ahead of the one being applied.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use parking_lot::{Condvar, Mutex};

use crate::catalog::{self, Plan, Reader, Step, Target};
use crate::crypt::Opener;
use crate::record::Kind;
use crate::replica;
use crate::segment::{self, Event};
use crate::sqlite::{self, page_crc};
use crate::time::fmt_time;

pub struct RestoreOpts {
    pub replica: String,
    pub db: String,
    pub output: PathBuf,
    pub target: Target,
    pub force: bool,
    /// Do nothing (successfully) if the output exists.
    pub if_not_exists: bool,
    pub age_identity: Option<PathBuf>,
    pub passphrase: Option<String>,
    /// Objects downloaded ahead of the one being applied.
    pub parallel: usize,
    pub dry_run: bool,
    /// Show a progress line (on a terminal, unless the summary is JSON).
    pub progress: bool,
    /// Keep the exact captured bytes (a database that will be served and captured again),
    /// instead of presenting rollback journal mode.
    pub exact: bool,
}

/// What a restore did (or, for a dry run, would do).
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub db: String,
    pub output: String,
    pub dry_run: bool,
    /// Set when the output existed and `--if-not-exists` left it alone.
    pub skipped: bool,
    pub txid: u64,
    pub commit_time: Option<String>,
    /// The same, in ns since the epoch.
    pub commit_time_ns: u64,
    /// The database's id in the replica.
    pub id: String,
    pub page_size: u32,
    pub pages: u32,
    pub bytes: u64,
    pub checksum: String,
    pub objects: Vec<PlanEntry>,
    pub downloaded_bytes: u64,
    pub seconds: f64,
    /// The database was in WAL mode; the output is in rollback mode (see `text`).
    pub was_wal: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct PlanEntry {
    pub key: String,
    pub kind: &'static str,
    pub first_txid: u64,
    /// Unknown (None) for the newest level-0 segment until it is read.
    pub last_txid: Option<u64>,
    pub size: u64,
}

impl Report {
    /// The human summary printed when `--json` is not given.
    pub fn text(&self) -> String {
        if self.skipped {
            return format!("{} exists; left as it is (--if-not-exists)\n", self.output);
        }
        let mut s = String::new();
        if self.dry_run {
            s += &format!(
                "plan for {} ({} objects, {:.1} MB):\n",
                self.db,
                self.objects.len(),
                self.downloaded_bytes as f64 / 1e6
            );
            for o in &self.objects {
                let last = o.last_txid.map_or("…".into(), |t| t.to_string());
                s += &format!(
                    "  {:<8} TXIDs {}..={last}  {:>12} bytes  {}\n",
                    o.kind, o.first_txid, o.size, o.key
                );
            }
            return s;
        }
        let note = if self.was_wal {
            "\nnote: the database was in WAL mode; the file is in rollback mode so it opens on its own (the app's PRAGMA journal_mode=WAL switches it back)\n"
        } else {
            "\n"
        };
        format!(
            "restored {} at TXID {} (committed {}; {} pages of {} bytes, checksum {}) to {} from {} objects ({:.1} MB) in {:.1}s{note}",
            self.db,
            self.txid,
            self.commit_time.as_deref().unwrap_or("?"),
            self.pages,
            self.page_size,
            self.checksum,
            self.output,
            self.objects.len(),
            self.downloaded_bytes as f64 / 1e6,
            self.seconds
        )
    }
}

fn entry(s: &Step) -> PlanEntry {
    PlanEntry {
        key: s.obj.key.clone(),
        kind: match s.obj.level {
            None => "snapshot",
            Some(0) => "segment",
            Some(_) => "compacted",
        },
        first_txid: s.obj.first,
        last_txid: (s.obj.last != u64::MAX).then_some(s.obj.last),
        size: s.obj.size,
    }
}

/// `Some(report)` if the output exists and `--if-not-exists` leaves it; an error if it
/// exists and may not be replaced.
fn existing(o: &RestoreOpts) -> Result<Option<Report>> {
    if o.output.exists() && !o.dry_run {
        if o.if_not_exists {
            return Ok(Some(Report {
                db: o.db.clone(),
                output: o.output.display().to_string(),
                skipped: true,
                ..Default::default()
            }));
        }
        if !o.force {
            bail!(
                "{} exists; pass --force to replace it (or --if-not-exists to keep it)",
                o.output.display()
            );
        }
    }
    Ok(None)
}

/// The key opener `o` asks for (an identity file or a passphrase), if any.
pub fn opener(o: &RestoreOpts) -> Result<Option<Opener>> {
    match (&o.age_identity, &o.passphrase) {
        (Some(_), Some(_)) => bail!("pass either --age-identity or --passphrase-env, not both"),
        (Some(f), None) => Ok(Some(Opener::from_identity_file(f)?)),
        (None, Some(p)) => Ok(Some(Opener::from_passphrase(p)?)),
        (None, None) => Ok(None),
    }
}

pub fn run(o: &RestoreOpts) -> Result<Report> {
    if let Some(r) = existing(o)? {
        return Ok(r);
    }
    let client = replica::open(&o.replica)?;
    let opener = opener(o)?;
    let reader = Reader::new(client.as_ref(), opener.as_ref());
    let id = reader.find(&o.db)?;
    run_from(o, &reader, &id)
}

/// Restores `o.db`, whose id in the replica `reader` reads is `id` (`restore --all` shares
/// one reader among its workers and lists the names once).
pub fn run_from(o: &RestoreOpts, reader: &Reader<'_>, id: &str) -> Result<Report> {
    let started = Instant::now();
    let mut report = Report {
        db: o.db.clone(),
        output: o.output.display().to_string(),
        dry_run: o.dry_run,
        ..Default::default()
    };
    if let Some(r) = existing(o)? {
        return Ok(r);
    }
    let id = id.to_string();
    let cat = reader.catalog(&id, &o.db)?;
    let plan = catalog::plan(reader, &cat, o.target)?;
    report.objects = plan.steps.iter().map(entry).collect();
    report.downloaded_bytes = plan.bytes();
    if o.dry_run {
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    let out_dir = o
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp_out = tempfile::Builder::new()
        .prefix(".sqlfs-restore-")
        .tempfile_in(out_dir)
        .with_context(|| format!("creating a temporary file in {}", out_dir.display()))?;
    // Scratch space for downloaded and decrypted objects sits next to the output (on the
    // disk the output goes to, not in TMPDIR, which may be memory); it goes when `work` is
    // dropped, on every path.
    let work = tempfile::Builder::new()
        .prefix(".sqlfs-restore-")
        .tempdir_in(out_dir)
        .with_context(|| format!("creating a scratch directory in {}", out_dir.display()))?;
    let show = o.progress && std::io::stderr().is_terminal();
    let mut state = Applied::default();
    download_and_apply(
        reader,
        &plan,
        work.path(),
        o.parallel.max(1),
        show,
        |path, step, tick| apply_object(path, step, tmp_out.as_file(), &mut state, tick),
    )?;
    let Some(last) = state.last else {
        bail!("the replica holds no transactions of {}", o.db)
    };
    match o.target {
        Target::Txid(t) if t != last.txid => bail!(
            "TXID {t} of {} is not in the replica; {}",
            o.db,
            catalog::window_text(reader, &cat)?
        ),
        _ => {}
    }
    let out = tmp_out.as_file();
    // The checksum of the exact captured bytes is verified; now present rollback journal
    // mode (file format bytes 18-19), so the file opens anywhere on its own, with no -wal
    // or -shm, read-only too. History views serve the same bytes.
    if last.db_pages > 0 && !o.exact {
        let mut head = [0u8; 20];
        out.read_exact_at(&mut head, 0)?;
        if sqlite::as_rollback_journal(&mut head) {
            out.write_all_at(&head[18..], 18)?;
            report.was_wal = true;
        }
    }
    // SQLite's own check, while the file is written back to disk (both before the rename).
    std::thread::scope(|sc| -> Result<()> {
        let synced = sc.spawn(|| out.sync_all());
        if last.db_pages > 0 {
            // immutable: no -wal or -shm is created next to it, whatever its journal mode.
            let uri = format!("file:{}?immutable=1", tmp_out.path().display());
            let conn = rusqlite::Connection::open_with_flags(
                &uri,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
            )?;
            let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
            if ok != "ok" {
                bail!("restored database fails PRAGMA integrity_check: {ok}");
            }
        }
        synced
            .join()
            .map_err(|_| anyhow::anyhow!("the fsync thread failed"))??;
        Ok(())
    })?;
    tmp_out
        .persist(&o.output)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming into {}", o.output.display()))?;
    File::open(out_dir).and_then(|d| d.sync_all())?;
    report.txid = last.txid;
    report.commit_time = Some(fmt_time(last.time_ns));
    report.commit_time_ns = last.time_ns;
    report.id = id.clone();
    report.page_size = last.page_size;
    report.pages = last.db_pages;
    report.bytes = last.db_pages as u64 * last.page_size as u64;
    report.checksum = format!("{:016x}", last.checksum);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The progress line (only when `show`): bytes of the plan downloaded and applied, redrawn
/// at most every [`PROGRESS_EVERY`].
struct Progress<'a> {
    show: bool,
    total: u64,
    downloaded: &'a AtomicU64,
    drawn: Option<Instant>,
}

const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl Progress<'_> {
    fn draw(&mut self, applied: u64, last: bool) {
        if !self.show || (!last && self.drawn.is_some_and(|d| d.elapsed() < PROGRESS_EVERY)) {
            return;
        }
        self.drawn = Some(Instant::now());
        let mb = |b: u64| b as f64 / 1e6;
        eprint!(
            "\rrestoring: {:.1}/{:.1} MB downloaded, {:.1} MB applied ",
            mb(self.downloaded.load(Ordering::Relaxed)),
            mb(self.total),
            mb(applied.min(self.total))
        );
        if last {
            eprintln!();
        }
    }
}

/// Downloads the plan's objects with `parallel` workers, at most `parallel` ahead of the one
/// being applied, and hands each local copy to `apply` in plan order (with a callback for
/// the bytes of the object applied so far, for the progress line).
fn download_and_apply(
    reader: &Reader<'_>,
    plan: &Plan,
    scratch: &Path,
    parallel: usize,
    show: bool,
    mut apply: impl FnMut(&Path, &Step, &mut dyn FnMut(u64)) -> Result<()>,
) -> Result<()> {
    let n = plan.steps.len();
    let downloaded = AtomicU64::new(0);
    let mut progress = Progress {
        show,
        total: plan.bytes(),
        downloaded: &downloaded,
        drawn: None,
    };
    let next = AtomicUsize::new(0);
    let applied = (Mutex::new(0usize), Condvar::new());
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, Result<(PathBuf, bool)>)>();
    let client = reader.client;
    std::thread::scope(|sc| -> Result<()> {
        for _ in 0..parallel.min(n) {
            let tx = tx.clone();
            let (next, applied, stop, downloaded) = (&next, &applied, &stop, &downloaded);
            sc.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n || stop.load(Ordering::SeqCst) {
                    break;
                }
                {
                    let mut a = applied.0.lock();
                    while i >= *a + parallel && !stop.load(Ordering::SeqCst) {
                        applied.1.wait(&mut a);
                    }
                }
                let key = &plan.steps[i].obj.key;
                let local = scratch.join(format!("{i}.obj"));
                // (path, owned): a replica's own file is read in place, never removed.
                let r = match client.local_path(key) {
                    Some(p) => Ok((p, false)),
                    None => client
                        .get(key, &local)
                        .map_err(anyhow::Error::from)
                        .and_then(|found| {
                            if found {
                                Ok((local, true))
                            } else {
                                bail!("{key} is missing from {}", client.describe())
                            }
                        }),
                };
                if r.is_ok() {
                    downloaded.fetch_add(plan.steps[i].obj.size, Ordering::Relaxed);
                }
                if tx.send((i, r)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let res = (|| -> Result<()> {
            let mut ready: Vec<Option<Result<(PathBuf, bool)>>> = (0..n).map(|_| None).collect();
            let mut done_bytes = 0;
            for i in 0..n {
                while ready[i].is_none() {
                    let (j, r) = rx.recv().context("a download worker stopped")?;
                    ready[j] = Some(r);
                }
                let (path, owned) = ready[i].take().expect("received")?;
                let step = &plan.steps[i];
                let plain = if owned {
                    reader.decrypt_local(&step.obj.key, &path)?
                } else {
                    reader.decrypt_copy(
                        &step.obj.key,
                        &path,
                        &scratch.join(format!("{i}.plain")),
                    )?
                };
                apply(&plain, step, &mut |part| {
                    progress.draw(done_bytes + part.min(step.obj.size), false)
                })?;
                if owned {
                    let _ = fs::remove_file(&path);
                }
                if plain != path {
                    let _ = fs::remove_file(&plain);
                }
                done_bytes += step.obj.size;
                *applied.0.lock() = i + 1;
                applied.1.notify_all();
                progress.draw(done_bytes, i + 1 == n);
            }
            Ok(())
        })();
        if res.is_err() && progress.drawn.is_some() {
            eprintln!();
        }
        stop.store(true, Ordering::SeqCst);
        applied.1.notify_all();
        res
    })
}

/// The last transaction applied.
#[derive(Clone, Copy, Debug)]
struct Last {
    txid: u64,
    time_ns: u64,
    checksum: u64,
    page_size: u32,
    db_pages: u32,
}

/// Where a restore stands: the state built so far and its rolling checksum, kept up to date
/// page by page so it can be checked after every transaction.
#[derive(Default)]
struct Applied {
    /// TXID of the state in the output (0: empty).
    txid: u64,
    last: Option<Last>,
    /// Rolling checksum over pages 1..=pages of the output.
    checksum: u64,
    pages: u32,
    page_size: u32,
    /// Pages past `pages` written by the transaction being applied.
    grown: BTreeSet<u32>,
    /// Consecutive pages not written out yet: (first page's file offset, bytes).
    pending: (u64, Vec<u8>),
}

/// Pending page writes are flushed once they reach this many bytes.
const WRITE_BATCH: usize = 4 << 20;

impl Applied {
    /// Writes the pending pages to `out`.
    fn flush(&mut self, out: &File) -> std::io::Result<()> {
        if !self.pending.1.is_empty() {
            out.write_all_at(&self.pending.1, self.pending.0)?;
            self.pending.1.clear();
        }
        Ok(())
    }

    /// Queues page bytes for offset `at`, writing the queue first unless they continue it.
    fn queue(&mut self, out: &File, at: u64, d: &[u8]) -> std::io::Result<()> {
        let (start, buf) = &self.pending;
        if !buf.is_empty() && (start + buf.len() as u64 != at || buf.len() >= WRITE_BATCH) {
            self.flush(out)?;
        }
        if self.pending.1.is_empty() {
            self.pending.0 = at;
        }
        self.pending.1.extend_from_slice(d);
        Ok(())
    }
}

/// Verifies and applies one local object of the plan: its transactions after the current
/// state, up to the step's limits. `tick` hears how many of the object's bytes are done (an
/// estimate: its size in proportion to the page versions read).
fn apply_object(
    path: &Path,
    step: &Step,
    out: &File,
    a: &mut Applied,
    tick: &mut dyn FnMut(u64),
) -> Result<()> {
    let key = step.obj.key.as_str();
    let f = File::open(path)?;
    let hdr = segment::verify(&f, key)?;
    let per_page = step.obj.size as f64 / hdr.nindex.max(1) as f64;
    let mut read_pages = 0u64;
    if hdr.level > 0 && hdr.first_txid != a.txid + 1 {
        bail!(
            "{key} covers TXIDs {}..={} but the restore stands at {}",
            hdr.first_txid,
            hdr.last_txid,
            a.txid
        );
    }
    let mut skip = false;
    let io = |e: std::io::Error| segment::ObjectError::Io {
        what: key.into(),
        err: e,
    };
    let corrupt = |why: String| segment::ObjectError::Corrupt {
        what: key.into(),
        why,
    };
    segment::for_each_txn(&f, &hdr, key, |ev| {
        if let Event::Page(..) = ev {
            read_pages += 1;
            if read_pages.is_multiple_of(64) {
                tick((read_pages as f64 * per_page) as u64);
            }
        }
        match ev {
            Event::Start(h) => {
                skip = h.txid <= a.txid || h.txid > step.upto || h.time_ns > step.until_ns;
                if skip {
                    return Ok(());
                }
                let first = if hdr.level > 0 {
                    hdr.first_txid
                } else {
                    h.txid
                };
                if h.kind != Kind::Snapshot && first != a.txid + 1 {
                    return Err(corrupt(format!("TXID {first} does not follow {}", a.txid)));
                }
                if h.replaces_state(a.page_size) {
                    // The whole database is in this record.
                    out.set_len(0).map_err(io)?;
                    a.checksum = 0;
                    a.pages = 0;
                }
                a.page_size = h.page_size;
                a.grown.clear();
            }
            Event::Page(p, d) if !skip => {
                let ps = d.len() as u64;
                // The version being replaced leaves the checksum (pages past the old end
                // count only once this transaction wrote them).
                if p <= a.pages || !a.grown.insert(p) {
                    a.flush(out).map_err(io)?;
                    let mut old = vec![0u8; d.len()];
                    out.read_exact_at(&mut old, (p as u64 - 1) * ps)
                        .map_err(io)?;
                    a.checksum ^= page_crc(p, &old);
                }
                a.checksum ^= page_crc(p, d);
                a.queue(out, (p as u64 - 1) * ps, d).map_err(io)?;
            }
            Event::End(h) if !skip => {
                a.flush(out).map_err(io)?;
                let ps = h.page_size as u64;
                let zero = vec![0u8; ps as usize];
                // Pages past the old end that this transaction did not write are zeros.
                for p in a.pages + 1..=h.db_pages {
                    if !a.grown.contains(&p) {
                        a.checksum ^= page_crc(p, &zero);
                    }
                }
                // Pages past the new end (old ones, or written here) drop out.
                let mut buf = vec![0u8; ps as usize];
                let counted_to = a.pages.max(a.grown.last().copied().unwrap_or(0));
                for p in h.db_pages + 1..=counted_to {
                    if p <= a.pages || a.grown.contains(&p) {
                        out.read_exact_at(&mut buf, (p as u64 - 1) * ps)
                            .map_err(io)?;
                        a.checksum ^= page_crc(p, &buf);
                    }
                }
                out.set_len(h.db_pages as u64 * ps).map_err(io)?;
                a.pages = h.db_pages;
                a.grown.clear();
                if a.checksum != h.checksum_after {
                    return Err(corrupt(format!(
                        "after TXID {} the database's checksum is {:016x}, the object records {:016x}",
                        h.txid, a.checksum, h.checksum_after
                    )));
                }
                a.txid = h.txid;
                a.last = Some(Last {
                    txid: h.txid,
                    time_ns: h.time_ns,
                    checksum: h.checksum_after,
                    page_size: h.page_size,
                    db_pages: h.db_pages,
                });
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(())
}
