//! The sqlfs daemon as the workloads run it; it measures no row itself. [`Mount`] starts
//! `sqlfs mount` (shipping to a file replica or to given URLs, with `SQLFS_BENCH_MOUNT_ARGS`
//! added), waits for it to settle, reads its memory from /proc and stops it with SIGTERM;
//! [`mounts`] reads /proc/self/mountinfo (a crashed run's leftovers, the work directory's
//! filesystem type).

use sqlfs::mount::is_sqlfs_mount;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::SQLFS;
use crate::s3;

/// Unescapes the octal escapes (`\040` etc.) the kernel uses in /proc/self/mountinfo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (mount point, fstype, source) for every line of /proc/self/mountinfo.
pub fn mounts() -> Vec<(PathBuf, String, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?.to_string();
            let source = unescape_mountinfo(right.next().unwrap_or(""));
            Some((PathBuf::from(unescape_mountinfo(point)), fstype, source))
        })
        .collect()
}

/// Filesystem type of the mount that holds `path`.
pub fn fstype_of(path: &Path) -> String {
    mounts()
        .into_iter()
        .filter(|(p, _, _)| path.starts_with(p))
        .max_by_key(|(p, _, _)| p.as_os_str().len())
        .map(|(_, t, _)| t)
        .unwrap_or_else(|| "?".into())
}

pub fn force_unmount(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: plain syscall on a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

pub struct Mount {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Mount {
    /// A mount shipping to a file replica beside its data directory (`<backing>.replica`).
    pub fn start(dir: &Path, backing: &Path, log: &Path) -> Result<Mount> {
        let replica = format!("file://{}", backing.with_extension("replica").display());
        Mount::start_with(dir, backing, log, &[replica])
    }

    /// A mount shipping to `replicas` (URLs).
    pub fn start_with(
        dir: &Path,
        backing: &Path,
        log: &Path,
        replicas: &[String],
    ) -> Result<Mount> {
        Mount::start_args(dir, backing, log, replicas, &[])
    }

    /// A mount shipping to `replicas` (URLs), with more `sqlfs mount` arguments.
    pub fn start_args(
        dir: &Path,
        backing: &Path,
        log: &Path,
        replicas: &[String],
        extra: &[String],
    ) -> Result<Mount> {
        fs::create_dir_all(dir)?;
        fs::create_dir_all(backing)?;
        let out = File::create(log)?;
        // A command to run the daemon under (a profiler, an environment), for investigation.
        let mut cmd = match std::env::var("SQLFS_BENCH_DAEMON_WRAP") {
            Ok(w) if !w.trim().is_empty() => {
                let mut w = w.split_whitespace();
                let mut c = Command::new(w.next().unwrap_or_default());
                c.args(w).arg(SQLFS);
                c
            }
            _ => Command::new(SQLFS),
        };
        cmd.arg("mount").arg(dir).arg("--data-dir").arg(backing);
        for r in replicas {
            cmd.arg("--replica").arg(r);
        }
        cmd.args(extra);
        // More mount flags for every mount of the run (e.g. `--passthrough off`).
        if let Ok(more) = std::env::var("SQLFS_BENCH_MOUNT_ARGS") {
            cmd.args(more.split_whitespace());
        }
        let child = cmd
            .envs(s3::ENV)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {SQLFS}"))?;
        let mut m = Mount {
            child: Some(child),
            dir: dir.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if is_sqlfs_mount(dir) {
                return Ok(m);
            }
            if let Some(st) = m.child.as_mut().unwrap().try_wait()? {
                m.child = None;
                bail!(
                    "sqlfs exited before mounting ({st}); log:\n{}",
                    m.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "sqlfs did not mount {} within 20 s; log:\n{}",
                    dir.display(),
                    m.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits (up to a minute) until the daemon has used no CPU for half a second: the
    /// staging, folding and shipping that trail a bulk load are done.
    pub fn settle(&self) {
        let cpu = || -> u64 {
            fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .ok()
                .and_then(|s| {
                    // Fields after the command name, which is in parentheses.
                    let rest = s.rsplit_once(") ")?.1.to_string();
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
                })
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = cpu();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(500));
            let now = cpu();
            if now == last {
                return;
            }
            last = now;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// (VmRSS, VmHWM) of the daemon in KiB.
    pub fn memory(&self) -> Result<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .context("reading the daemon's /proc status")?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("{name} missing from /proc status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGTERM, then wait for a clean exit and the mount to be gone.
    pub fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                force_unmount(&self.dir);
                bail!("sqlfs did not exit within 60 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        };
        if is_sqlfs_mount(&self.dir) {
            force_unmount(&self.dir);
            bail!(
                "sqlfs exited ({status}) but {} is still mounted",
                self.dir.display()
            );
        }
        if !status.success() {
            bail!(
                "sqlfs exited with {status} after SIGTERM; log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            for _ in 0..250 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if is_sqlfs_mount(&self.dir) {
            force_unmount(&self.dir);
        }
    }
}
