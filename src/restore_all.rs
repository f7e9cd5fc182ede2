//! `sqlfs restore --all`: every database of a replica restored into a directory tree (each at
//! its path under the mount root, below the output directory), a bounded number at once,
//! each exactly as a single `sqlfs restore` does it (`restore::run_from`: every object and
//! checksum verified, integrity_check, renamed into place), to the same target for all.
//!
//! Invariants:
//! - A database that fails (a corrupted or missing object, a gap, no state at the target)
//!   fails alone: it leaves no file, the others are restored, and the summary names it with
//!   why; the command then exits non-zero.
//! - Names come from the replica, so they are checked before use: a name that is absolute,
//!   empty, or has an empty, `.` or `..` component fails that database (nothing is written
//!   outside the output directory).
//! - The replica's names are listed once; the workers share one reader (and its key).

use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;

use crate::catalog::{Reader, Target};
use crate::restore::{self, Report, RestoreOpts};

pub struct AllOpts {
    pub replica: String,
    /// The directory the tree is restored into (created if missing).
    pub out_dir: PathBuf,
    /// Latest or an instant (a TXID means nothing across databases).
    pub target: Target,
    pub force: bool,
    pub if_not_exists: bool,
    pub age_identity: Option<PathBuf>,
    pub passphrase: Option<String>,
    /// Databases restored at once.
    pub workers: usize,
    /// Objects each restore downloads ahead of the one it applies.
    pub parallel: usize,
    /// Show the progress line (on a terminal).
    pub progress: bool,
}

/// What `restore --all` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct AllReport {
    pub replica: String,
    pub output: String,
    pub restored: Vec<Report>,
    pub failed: Vec<Failed>,
    pub seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct Failed {
    pub db: String,
    pub error: String,
}

impl AllReport {
    /// The summary printed when `--json` is not given.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let bytes: u64 = self.restored.iter().map(|r| r.bytes).sum();
        let skipped = self.restored.iter().filter(|r| r.skipped).count();
        s += &format!(
            "restored {} databases ({:.1} MB{}) into {} in {:.1}s; failed {}\n",
            self.restored.len() - skipped,
            bytes as f64 / 1e6,
            if skipped > 0 {
                format!(", {skipped} left as they were: --if-not-exists")
            } else {
                String::new()
            },
            self.output,
            self.seconds,
            self.failed.len()
        );
        for f in &self.failed {
            s += &format!("  FAILED {}: {}\n", f.db, f.error);
        }
        s
    }
}

/// `dir/name`, if `name` is a relative path of plain components.
fn output_path(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    let plain = !name.is_empty()
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        bail!("the replica names it {name:?}, which is not a relative path of plain components; not restored (nothing is written outside the output directory)");
    }
    Ok(dir.join(p))
}

pub fn run(o: &AllOpts) -> Result<AllReport> {
    let started = Instant::now();
    if let Target::Txid(_) = o.target {
        bail!("--txid names one database's transaction; with --all use --timestamp (or nothing, for the latest)");
    }
    std::fs::create_dir_all(&o.out_dir)
        .with_context(|| format!("cannot create {}", o.out_dir.display()))?;
    let client = crate::replica::open(&o.replica)?;
    let one = |db: &str, output: PathBuf| RestoreOpts {
        replica: o.replica.clone(),
        db: db.to_string(),
        output,
        target: o.target,
        force: o.force,
        if_not_exists: o.if_not_exists,
        age_identity: o.age_identity.clone(),
        passphrase: o.passphrase.clone(),
        parallel: o.parallel.max(1),
        dry_run: false,
        progress: false,
        exact: false,
    };
    let opener = restore::opener(&one("", PathBuf::new()))?;
    let dbs = Reader::new(client.as_ref(), opener.as_ref())
        .databases()
        .with_context(|| format!("cannot list the databases of {}", client.describe()))?;
    let n = dbs.len();
    let next = AtomicUsize::new(0);
    let (done, bad) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let results: Mutex<Vec<(usize, Result<Report, String>)>> = Mutex::new(Vec::new());
    let show = o.progress && std::io::stderr().is_terminal();
    let drawn = Mutex::new(None::<Instant>);
    let draw = |last: bool| {
        if !show {
            return;
        }
        let mut d = drawn.lock();
        if !last && d.is_some_and(|t| t.elapsed().as_millis() < 100) {
            return;
        }
        *d = Some(Instant::now());
        eprint!(
            "\rrestoring: {}/{n} databases done, {} failed ",
            done.load(Ordering::Relaxed),
            bad.load(Ordering::Relaxed)
        );
        if last {
            eprintln!();
        }
    };
    std::thread::scope(|sc| {
        for _ in 0..o.workers.clamp(1, 64).min(n.max(1)) {
            sc.spawn(|| {
                // A key opener is not shared between threads: one per worker (it was read
                // once above, so this fails only if the key file went away meanwhile).
                let opener = restore::opener(&one("", PathBuf::new()));
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((id, name)) = dbs.get(i) else { break };
                    let r = match &opener {
                        Ok(k) => {
                            let reader = Reader::new(client.as_ref(), k.as_ref());
                            output_path(&o.out_dir, name).and_then(|out| {
                                if let Some(parent) = out.parent() {
                                    std::fs::create_dir_all(parent).with_context(|| {
                                        format!("cannot create {}", parent.display())
                                    })?;
                                }
                                restore::run_from(&one(name, out), &reader, id)
                            })
                        }
                        Err(e) => Err(anyhow::anyhow!("{e:#}")),
                    }
                    .map_err(|e| format!("{e:#}"));
                    if r.is_err() {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    results.lock().push((i, r));
                    draw(false);
                }
            });
        }
    });
    draw(true);
    let mut results = results.into_inner();
    results.sort_by_key(|(i, _)| *i);
    let mut report = AllReport {
        replica: client.describe(),
        output: o.out_dir.display().to_string(),
        ..Default::default()
    };
    for (i, r) in results {
        match r {
            Ok(rep) => report.restored.push(rep),
            Err(error) => report.failed.push(Failed {
                db: dbs[i].1.clone(),
                error,
            }),
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::output_path;
    use std::path::Path;

    #[test]
    fn names_stay_inside_the_output() {
        let d = Path::new("/out");
        assert_eq!(output_path(d, "a.db").unwrap(), Path::new("/out/a.db"));
        assert_eq!(
            output_path(d, "t/1/a.db").unwrap(),
            Path::new("/out/t/1/a.db")
        );
        for bad in [
            "",
            "/etc/passwd",
            "../x.db",
            "a/../../x",
            "a//b",
            "./a",
            "a/",
            "a/.",
            "a/./b",
        ] {
            assert!(output_path(d, bad).is_err(), "{bad:?} accepted");
        }
    }
}
