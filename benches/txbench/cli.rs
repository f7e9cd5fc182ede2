//! The sqlfs CLI as the workloads use it; it measures no row itself. `sqlfs log` (the newest
//! staged TXID, the staging base and staged transactions), `sqlfs status` (how far each
//! replica holds a database, to wait for shipping), and a timed `sqlfs restore`, which
//! restore.rs and history.rs time.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::SQLFS;
use crate::s3;

/// Runs the sqlfs CLI; its stdout, or an error with its output.
pub fn sqlfs_cli(args: &[&std::ffi::OsStr]) -> Result<String> {
    let o = Command::new(SQLFS)
        .args(args)
        .envs(s3::ENV)
        .stdin(Stdio::null())
        .output()
        .context("running sqlfs")?;
    if !o.status.success() {
        bail!(
            "sqlfs {:?} exited with {}:\n{}{}",
            args,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The newest staged TXID of `db` (`sqlfs log`).
pub fn last_txid(dir: &Path, db: &str) -> Result<u64> {
    let out = sqlfs_cli(&[
        "log".as_ref(),
        dir.as_os_str(),
        "--db".as_ref(),
        db.as_ref(),
    ])?;
    out.lines()
        .filter_map(|l| l.strip_prefix("txid=")?.split(' ').next()?.parse().ok())
        .max()
        .with_context(|| format!("no staged transactions of {db}"))
}

/// `sqlfs log` of `db` under a running mount: the staging base's TXID (0 without one) and
/// (TXID, commit time in ns) of every staged transaction after it.
pub fn staged_log(mnt: &Path, db: &str) -> Result<(u64, Vec<(u64, u64)>)> {
    let out = sqlfs_cli(&[
        "log".as_ref(),
        mnt.as_os_str(),
        "--db".as_ref(),
        db.as_ref(),
    ])?;
    let field = |l: &str, name: &str| -> Option<u64> {
        l.split(' ')
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    let mut base = 0;
    let mut txns = Vec::new();
    for l in out.lines() {
        if l.starts_with("base ") {
            base = field(l, "txid=").unwrap_or(0);
        } else if let (Some(t), Some(ts)) = (field(l, "txid="), field(l, "ts=")) {
            txns.push((t, ts));
        }
    }
    Ok((base, txns))
}

/// The TXID each replica of a running mount holds `db` up to (`sqlfs status`).
fn replica_positions(mnt: &Path, db: &str) -> Result<Vec<u64>> {
    let o = Command::new(SQLFS)
        .arg("status")
        .arg(mnt)
        .stdin(Stdio::null())
        .output()
        .context("running sqlfs status")?;
    let text = String::from_utf8_lossy(&o.stdout);
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{db}: ")));
    lines.next();
    Ok(lines
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| {
            let t = l.rsplit_once(": TXID ")?.1;
            t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .collect())
}

/// Waits until each of the `n` replicas of a running mount holds `db` up to `txid`.
pub fn wait_shipped(mnt: &Path, db: &str, txid: u64, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pos = replica_positions(mnt, db)?;
        if pos.len() == n && pos.iter().all(|&p| p >= txid) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("after {timeout:?} the replicas hold {db} up to {pos:?}, not TXID {txid}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `sqlfs restore` of `db` from `url` at `txid` (latest when `None`) into `out`; returns the
/// TXID it restored and how long it took.
pub fn timed_restore(
    url: &str,
    db: &str,
    out: &Path,
    txid: Option<u64>,
) -> Result<(u64, Duration)> {
    let _ = fs::remove_file(out);
    let mut args: Vec<std::ffi::OsString> = vec![
        "restore".into(),
        "--replica".into(),
        url.into(),
        "--db".into(),
        db.into(),
        "-o".into(),
        out.into(),
    ];
    if let Some(t) = txid {
        args.push("--txid".into());
        args.push(t.to_string().into());
    }
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let start = Instant::now();
    let said = sqlfs_cli(&args)?;
    let took = start.elapsed();
    let got = said
        .split("at TXID ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .with_context(|| format!("restore does not say which TXID it restored: {said}"))?;
    Ok((got, took))
}
