//! The scan at mount: every SQLite database already in the tree is taken into capture (its
//! first snapshot staged, then shipped) without any app opening it.
//!
//! It first loads the databases an earlier mount captured that no event loaded yet
//! (`pending.rs`), then walks the tree.
//!
//! It runs in its own thread at background priority while the mount serves, one file at a
//! time: directories are listed through descriptors opened beneath the backing root (no
//! symbolic link is followed, `.sqlfs` and `.history` at the root are skipped, and so is
//! anything `exclude` matches), and each regular file that is not a WAL, journal or `-shm`
//! has its first 16 bytes read; a database header (`SQLite format 3\0`) makes it a database.
//! A database is taken in through [`Capture::get_or_start`], the path an app's first open
//! takes, so an app opening it meanwhile meets the same capture (one per name, see the
//! module invariants of `capture`), a WAL or hot state beside it is handled as at any first
//! sighting, and a database already known (its staging continues from an earlier mount, and
//! was reconciled when it was loaded) is left as it is.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::{classify, read_exact_at, Capture, Role};
use crate::backing::META_DIR;
use crate::sqlite;

/// How deep the scan descends (as the hot-journal pass does).
const MAX_DEPTH: usize = 64;

/// What the scan has done so far (`sqlfs status`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScanProgress {
    /// True once it started; `done` once it finished (or stopped at unmount).
    pub started: bool,
    pub done: bool,
    /// Databases an earlier mount captured, loaded (reconciled) first (see `pending.rs`).
    pub reconciled: u64,
    /// Of those, not loaded yet.
    pub pending: u64,
    /// Directories listed.
    pub dirs: u64,
    /// Regular files listed so far (the total grows while directories remain to be listed).
    pub files_listed: u64,
    /// Files whose header was read (or that were known databases).
    pub files_scanned: u64,
    /// Databases found: taken into capture by the scan, plus those already captured.
    pub found: u64,
    /// Of those, taken into capture by the scan (a first snapshot each).
    pub taken_in: u64,
    /// Databases (or directories) `exclude` matched.
    pub excluded: u64,
    /// Databases whose capture could not start (see the log).
    pub failed: u64,
    pub seconds: f64,
}

impl Capture {
    /// The scan's progress.
    pub fn scan_progress(&self) -> ScanProgress {
        let mut p = self.scan.lock().clone();
        p.pending = self.pending() as u64;
        p
    }

    /// Starts the scan in its own thread (`sqlfs-scan`); it stops early once `stop` is set.
    pub fn spawn_scan(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let cap = self.clone();
        std::thread::Builder::new()
            .name("sqlfs-scan".into())
            .spawn(move || {
                crate::backing::background_priority();
                cap.scan(&stop)
            })
    }

    /// Walks the backing tree once (see the module comment).
    pub fn scan(&self, stop: &AtomicBool) {
        let t0 = Instant::now();
        self.scan.lock().started = true;
        let n = self.load_all_pending(stop);
        self.scan.lock().seconds = t0.elapsed().as_secs_f64();
        if n > 0 {
            log::info!(
                "scan at mount: {n} databases known from earlier mounts loaded in {:.1}s",
                t0.elapsed().as_secs_f64()
            );
        }
        let mut dirs: Vec<(String, usize)> = vec![(String::new(), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let files = self.list_dir(&dir, depth, &mut dirs);
            for rel in files {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                self.scan_file(&rel);
                self.scan.lock().seconds = t0.elapsed().as_secs_f64();
            }
        }
        let mut p = self.scan.lock();
        p.done = true;
        p.seconds = t0.elapsed().as_secs_f64();
        log::info!(
            "scan at mount: {} files in {} directories checked in {:.1}s: {} databases ({} taken into capture now, {} excluded, {} failed)",
            p.files_scanned,
            p.dirs,
            p.seconds,
            p.found,
            p.taken_in,
            p.excluded,
            p.failed
        );
    }

    /// Lists `dir`: its subdirectories go on `dirs`, its candidate files are returned.
    fn list_dir(&self, dir: &str, depth: usize, dirs: &mut Vec<(String, usize)>) -> Vec<String> {
        let mut files = Vec::new();
        // Opened beneath the root with no link followed; listed through its descriptor.
        let fd = match self
            .backing
            .open_beneath(dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("scan: cannot open directory {dir:?}: {e}");
                return files;
            }
        };
        let rd = match std::fs::read_dir(crate::backing::proc_fd_path(fd.as_raw_fd())) {
            Ok(rd) => rd,
            Err(e) => {
                log::warn!("scan: cannot list directory {dir:?}: {e}");
                return files;
            }
        };
        self.scan.lock().dirs += 1;
        let mut excluded = 0;
        for e in rd.flatten() {
            // Names that are not UTF-8 are never captured (the log names them when written).
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if dir.is_empty() && (name == META_DIR || name == ".history") {
                continue;
            }
            let rel = crate::backing::join(dir, &name);
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if self.exclude.matches(&rel) {
                    excluded += 1;
                } else if depth < MAX_DEPTH {
                    dirs.push((rel, depth + 1));
                }
            } else if ft.is_file() && classify(&rel).0 == Role::Main && !rel.ends_with("-shm") {
                files.push(rel);
            }
        }
        files.sort();
        let mut p = self.scan.lock();
        p.files_listed += files.len() as u64;
        p.excluded += excluded;
        files
    }

    /// One file: known, excluded, not a database, or taken into capture now.
    fn scan_file(&self, rel: &str) {
        let known = self.dbs.read().contains_key(rel);
        let outcome = if known {
            Some(true)
        } else {
            let mut head = [0u8; 16];
            let is_db = matches!(self.backing.open_read(rel), Ok(Some(f)) if read_exact_at(&f, &mut head, 0).unwrap_or(false))
                && sqlite::is_db_header(&head);
            if !is_db {
                None
            } else if self.exclude.matches(rel) {
                log::info!("{rel}: excluded by configuration: not captured nor shipped");
                self.scan.lock().excluded += 1;
                None
            } else {
                let before = self.dbs.read().contains_key(rel);
                match self.get_or_start(rel, Role::Main, Some(&head)) {
                    Some(_) if !before => {
                        log::debug!("{rel}: found by the scan at mount");
                        self.scan.lock().taken_in += 1;
                        Some(true)
                    }
                    Some(_) => Some(true),
                    None => Some(false),
                }
            }
        };
        let mut p = self.scan.lock();
        p.files_scanned += 1;
        match outcome {
            Some(true) => p.found += 1,
            Some(false) => p.failed += 1,
            None => {}
        }
    }
}
