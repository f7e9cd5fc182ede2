//! Shared harness for the sqlfs integration tests.
//!
//! * [`Fixture`]: a temporary directory with a mount point, a backing directory (or the
//!   mount point itself for an in-place mount) and a scratch directory outside the mount.
//! * [`Mount`]: one running `sqlfs mount` daemon; stopped with SIGTERM on drop, with a
//!   lazy unmount as the fallback.
//! * CLI helpers for `verify`, `log` and `replay`.
//! * The page-image oracle: [`snapshot`] reads the exact pages a connection sees at a
//!   commit through `sqlite_dbpage`; [`check_samples`] finds each sampled state in the
//!   staged log and compares the replayed database with the image byte for byte.
//! * Worker processes: the test binary re-executes itself (see [`workload`]).
#![allow(dead_code)]

pub mod cloudservers;
pub mod faultproxy;
pub mod holdproxy;
pub mod relay;
pub mod replica;
pub mod s3server;
pub mod seaweed;
pub mod sshserver;
pub mod workload;

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sqlfs");
/// How long a mount may take to appear in /proc/self/mountinfo.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for one CLI invocation (replays of the 1 GiB database included).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(600);
/// Busy timeout for every test connection.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Seeds and small utilities
// ---------------------------------------------------------------------------------------

/// A seed for one test: `SQLFS_TEST_SEED` if set, random otherwise. Always printed, so a
/// failing run can be repeated.
pub fn seed_for(test: &str) -> u64 {
    let seed = match std::env::var("SQLFS_TEST_SEED") {
        Ok(s) => s.trim().parse().expect("SQLFS_TEST_SEED must be a u64"),
        Err(_) => rand::random::<u64>(),
    };
    eprintln!("[{test}] seed={seed} (repeat with SQLFS_TEST_SEED={seed})");
    seed
}

pub fn sleep_ms(ms: u64) {
    thread::sleep(Duration::from_millis(ms));
}

/// Tries `probe` every `every_ms` until it returns `Ok`, and returns its value. A try that
/// still returns `Err` once `timeout` has passed fails the test with the message `failure`
/// makes of that `Err` (the state the probe last saw). The probe may act as well (write,
/// fold): it runs once per try.
pub fn wait_until<T, E>(
    timeout: Duration,
    every_ms: u64,
    mut probe: impl FnMut() -> Result<T, E>,
    failure: impl FnOnce(E) -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{}", failure(e)),
            Err(_) => sleep_ms(every_ms),
        }
    }
}

/// [`wait_until`] for a condition that has nothing to return.
pub fn wait_for(
    timeout: Duration,
    every_ms: u64,
    mut cond: impl FnMut() -> bool,
    failure: impl FnOnce() -> String,
) {
    wait_until(
        timeout,
        every_ms,
        || if cond() { Ok(()) } else { Err(()) },
        |()| failure(),
    )
}

/// Waits for worker processes (with their logs) to exit successfully, all within `timeout`;
/// one that is still running then is killed and fails the test with its output.
pub fn wait_workers(children: &mut [Child], logs: &[PathBuf], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for (c, log) in children.iter_mut().zip(logs) {
        let left = deadline.saturating_duration_since(Instant::now());
        match wait_timeout(c, left) {
            Some(s) => assert!(
                s.success(),
                "worker exited with {s}; its output:\n{}",
                file_tail(log, 3000)
            ),
            None => {
                kill9_child(c);
                panic!(
                    "worker did not finish in time; its output:\n{}",
                    file_tail(log, 3000)
                );
            }
        }
    }
}

/// Last `max` bytes of a text file, for failure messages.
pub fn file_tail(path: &Path, max: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            String::from_utf8_lossy(&b[start..]).into_owned()
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Wait for a child with a deadline. `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

pub fn send_signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a pid this process started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGSTOPs `pid` and returns once every one of its threads is stopped (the signal is
/// delivered asynchronously: a thread busy at the time could still serve a request).
pub fn stop_process(pid: u32) {
    send_signal(pid, libc::SIGSTOP);
    let all_stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return true;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat")).map_or(true, |s| {
                // The state follows the command name's closing parenthesis.
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
                    .is_none_or(|c| c == 'T' || c == 't' || c == 'Z' || c == 'X')
            })
        })
    };
    wait_for(Duration::from_secs(30), 5, all_stopped, || {
        format!("process {pid} did not stop")
    });
}

/// SIGKILL a child this test started and reap it.
pub fn kill9_child(child: &mut Child) {
    send_signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Number of sqlfs mounts (type `fuse.sqlfs`, or `fuse` with source `sqlfs`) at `mnt` in this mount namespace.
pub fn sqlfs_mounts_at(mnt: &Path) -> usize {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.to_string_lossy();
    info.lines()
        .filter(|l| {
            let Some((left, right)) = l.split_once(" - ") else {
                return false;
            };
            let mp = left.split(' ').nth(4).map(unescape_mountinfo);
            let mut r = right.split(' ');
            let (fstype, source) = (r.next(), r.next());
            // Mounted with mount(2) as root the type is plain `fuse` with source `sqlfs`.
            mp.as_deref() == Some(&*want)
                && (fstype == Some("fuse.sqlfs")
                    || (fstype == Some("fuse") && source == Some("sqlfs")))
        })
        .count()
}

/// `umount -l DIR`, then wait until the entry is gone.
pub fn lazy_umount(mnt: &Path) {
    for _ in 0..50 {
        if sqlfs_mounts_at(mnt) == 0 {
            return;
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mnt)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if sqlfs_mounts_at(mnt) == 0 {
            return;
        }
        sleep_ms(100);
    }
}

#[derive(Clone, Debug, Default)]
pub struct MountOpts {
    pub data_dir: Option<PathBuf>,
    pub threads: Option<u32>,
    /// `--stage-limit`; `None` passes 16 GiB, so the whole staged log stays for the samples
    /// to be checked against (folding then depends on no replica's timing). Tests of folding
    /// set their own.
    pub stage_limit: Option<u64>,
    /// The replicas to ship to (each passed as `--replica URL`). `None`: one file replica
    /// beside the daemon log (`<log dir>/replica`), never the user's default replica.
    pub replicas: Option<Vec<String>>,
    /// `--sync-interval` (e.g. "250ms"); `None` leaves the daemon's default.
    pub sync_interval: Option<String>,
    /// `--age-recipient` for each (encrypted replicas).
    pub age_recipients: Vec<String>,
    /// `--sync`: the app's fsync returns once its transactions are on every replica.
    pub sync: bool,
    /// More arguments appended to the mount command line (e.g. `--compaction 1s,3s`). Without
    /// `--compaction` or `--config` among them the mount compacts nothing.
    pub extra_args: Vec<String>,
    /// Environment variables set for the daemon only.
    pub env: Vec<(String, String)>,
    /// The daemon's open-file limit (soft and hard: it cannot raise it).
    pub nofile: Option<u64>,
}

/// The replica a mount ships to when its options name none: beside its log.
pub fn default_replica_dir(log: &Path) -> PathBuf {
    log.parent().unwrap_or(Path::new("/tmp")).join("replica")
}

/// One running `sqlfs mount` daemon.
pub struct Mount {
    child: Option<Child>,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

impl Mount {
    pub fn start(mnt: &Path, opts: &MountOpts, log: &Path) -> Mount {
        assert_eq!(
            sqlfs_mounts_at(mnt),
            0,
            "{} is already an sqlfs mount",
            mnt.display()
        );
        let logf = File::create(log).expect("create daemon log");
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg(mnt);
        if let Some(d) = &opts.data_dir {
            cmd.arg("--data-dir").arg(d);
        }
        if let Some(t) = opts.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        cmd.arg("--stage-limit")
            .arg(opts.stage_limit.unwrap_or(16 << 30).to_string());
        match &opts.replicas {
            Some(urls) => {
                for u in urls {
                    cmd.arg("--replica").arg(u);
                }
            }
            None => {
                // Ship to a replica beside the daemon log, never to the user's default replica.
                cmd.arg("--replica")
                    .arg(format!("file://{}", default_replica_dir(log).display()));
            }
        }
        if let Some(i) = &opts.sync_interval {
            cmd.arg("--sync-interval").arg(i);
        }
        for r in &opts.age_recipients {
            cmd.arg("--age-recipient").arg(r);
        }
        if opts.sync {
            cmd.arg("--sync");
        }
        // No compaction unless the test asks for it (on the command line or in its
        // configuration): a database's first compaction comes at its own point of the level's
        // interval, anywhere from its first shipment on, and a test about something else
        // would otherwise meet it at random.
        if !opts
            .extra_args
            .iter()
            .any(|a| a == "--compaction" || a == "--config")
        {
            cmd.arg("--compaction").arg("none");
        }
        cmd.args(&opts.extra_args);
        // The whole suite again with another mount flag (the Makefile runs the capture tests
        // with `--passthrough-databases` this way).
        if let Some(more) = std::env::var_os("SQLFS_TEST_MOUNT_ARGS") {
            let more = more.to_string_lossy().into_owned();
            cmd.args(
                more.split_whitespace()
                    .filter(|a| !opts.extra_args.iter().any(|e| e == a)),
            );
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(n) = opts.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(logf.try_clone().unwrap()))
            .stderr(Stdio::from(logf));
        let cmdline = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmdline}: {e}"));
        let mut m = Mount {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if sqlfs_mounts_at(mnt) > 0 {
                break;
            }
            if let Ok(Some(status)) = m.child.as_mut().unwrap().try_wait() {
                m.child = None;
                panic!(
                    "{cmdline} exited with {status} before the mount appeared; its output:\n{}",
                    file_tail(log, 4000)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{cmdline}: no fuse.sqlfs entry for {} in /proc/self/mountinfo after {:?}; output:\n{}",
                    mnt.display(),
                    MOUNT_TIMEOUT,
                    file_tail(log, 4000)
                );
            }
            sleep_ms(20);
        }
        m
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the daemon process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, wait, and check that the daemon exited 0 and the mount is gone.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(child.id(), libc::SIGTERM);
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        let Some(status) = status else {
            kill9_child(&mut child);
            lazy_umount(&self.mnt);
            panic!(
                "sqlfs did not exit within 30 s of SIGTERM; output:\n{}",
                file_tail(&self.log, 4000)
            );
        };
        let left = sqlfs_mounts_at(&self.mnt);
        if left > 0 {
            lazy_umount(&self.mnt);
        }
        assert!(
            status.success(),
            "sqlfs exited with {status} after SIGTERM; output:\n{}",
            file_tail(&self.log, 4000)
        );
        assert_eq!(
            left, 0,
            "the mount was still present after sqlfs exited on SIGTERM"
        );
    }

    /// SIGTERM and wait (30 s at most); the daemon's exit status, whatever it is. The mount
    /// point is cleared if the daemon left it behind.
    pub fn stop_status(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        send_signal(child.id(), libc::SIGTERM);
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        if sqlfs_mounts_at(&self.mnt) > 0 {
            lazy_umount(&self.mnt);
        }
        status.unwrap_or_else(|| {
            kill9_child(&mut child);
            panic!(
                "sqlfs did not exit within 30 s of SIGTERM; output:\n{}",
                file_tail(&self.log, 4000)
            )
        })
    }

    /// kill -9 the daemon, then `umount -l` the dead mount point.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_child(&mut child);
        }
        lazy_umount(&self.mnt);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), libc::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(15)).is_none() {
                kill9_child(&mut child);
            }
        }
        if sqlfs_mounts_at(&self.mnt) > 0 {
            lazy_umount(&self.mnt);
        }
    }
}

/// A temporary test area: `root/mnt` (mount point), `root/backing` (or the mount point
/// itself when mounting in place) and `root/scratch` (outside the mount).
pub struct Fixture {
    pub mount: Option<Mount>,
    pub name: String,
    pub root: PathBuf,
    pub mnt: PathBuf,
    pub backing: PathBuf,
    pub scratch: PathBuf,
    pub in_place: bool,
    pub opts: MountOpts,
    logs: Vec<PathBuf>,
    tmp: Option<tempfile::TempDir>,
}

impl Fixture {
    pub fn new(name: &str, in_place: bool) -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("sqlfs-{name}-"))
            .tempdir()
            .expect("tempdir");
        let root = tmp.path().canonicalize().unwrap();
        let mnt = root.join("mnt");
        let backing = if in_place {
            mnt.clone()
        } else {
            root.join("backing")
        };
        let scratch = root.join("scratch");
        for d in [&mnt, &backing, &scratch] {
            fs::create_dir_all(d).unwrap();
        }
        let opts = MountOpts {
            data_dir: if in_place {
                None
            } else {
                Some(backing.clone())
            },
            ..Default::default()
        };
        Fixture {
            mount: None,
            name: name.to_string(),
            root,
            mnt,
            backing,
            scratch,
            in_place,
            opts,
            logs: Vec::new(),
            tmp: Some(tmp),
        }
    }

    pub fn with_threads(mut self, n: u32) -> Fixture {
        self.opts.threads = Some(n);
        self
    }

    pub fn mount(&mut self) {
        assert!(self.mount.is_none(), "already mounted");
        let log = self.scratch.join(format!("daemon-{}.log", self.logs.len()));
        self.logs.push(log.clone());
        self.mount = Some(Mount::start(&self.mnt, &self.opts, &log));
    }

    /// Clean unmount (SIGTERM, exit 0 expected).
    pub fn unmount(&mut self) {
        if let Some(mut m) = self.mount.take() {
            m.stop();
        }
    }

    /// SIGTERM; the daemon's exit status, unchecked (see [`Mount::stop_status`]).
    pub fn unmount_status(&mut self) -> ExitStatus {
        self.mount.take().expect("mounted").stop_status()
    }

    /// kill -9 of the daemon and `umount -l`.
    pub fn kill9(&mut self) {
        if let Some(mut m) = self.mount.take() {
            m.kill9();
        }
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.mount.as_ref().and_then(|m| m.pid())
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// A path in the backing directory.
    pub fn backing_path(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }

    pub fn scratch_path(&self, rel: &str) -> PathBuf {
        self.scratch.join(rel)
    }

    /// The replica directory mounts of this fixture ship to when `opts.replicas` is `None`.
    pub fn default_replica(&self) -> PathBuf {
        self.scratch.join("replica")
    }

    /// The directory to hand to the CLI: the mount point while mounted, the backing
    /// directory otherwise.
    pub fn cli_dir(&self) -> PathBuf {
        if self.mount.is_some() {
            self.mnt.clone()
        } else {
            self.backing.clone()
        }
    }

    /// True while the current mount's daemon process has not exited.
    pub fn daemon_running(&mut self) -> bool {
        self.mount.as_mut().is_some_and(|m| m.is_running())
    }

    /// The whole output of the most recent daemon (running or stopped).
    pub fn last_daemon_log(&self) -> String {
        self.logs
            .last()
            .map(|l| String::from_utf8_lossy(&fs::read(l).unwrap_or_default()).into_owned())
            .unwrap_or_default()
    }

    /// The whole output of every daemon this fixture started, oldest first.
    pub fn all_daemon_logs(&self) -> String {
        self.logs
            .iter()
            .map(|l| String::from_utf8_lossy(&fs::read(l).unwrap_or_default()).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn daemon_logs(&self) -> String {
        let mut s = String::new();
        for l in &self.logs {
            s += &format!("--- {} ---\n{}\n", l.display(), file_tail(l, 3000));
        }
        s
    }

    pub fn assert_verify(&self) {
        assert_verify(&self.cli_dir());
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.mount.take());
        if thread::panicking() {
            eprintln!("[{}] daemon output:\n{}", self.name, self.daemon_logs());
        }
        if std::env::var_os("SQLFS_TEST_KEEP").is_some() {
            if let Some(t) = self.tmp.take() {
                eprintln!("[{}] keeping {}", self.name, t.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running commands and the CLI
// ---------------------------------------------------------------------------------------

pub struct CmdOut {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
    pub fn describe(&self) -> String {
        format!(
            "$ {}\nexit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.status,
            tail_str(&self.stdout, 6000),
            tail_str(&self.stderr, 6000)
        )
    }
}

fn tail_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Run a command to completion (stdin closed), with a deadline.
pub fn run_cmd(mut cmd: Command, timeout: Duration) -> CmdOut {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_cmd_with_input(cmd, None, timeout)
}

pub fn run_cmd_with_input(mut cmd: Command, input: Option<String>, timeout: Duration) -> CmdOut {
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let cmdline = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmdline}: {e}"));
    let feeder = input.map(|text| {
        let mut stdin = child.stdin.take().unwrap();
        thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        })
    });
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            kill9_child(&mut child);
            panic!("{cmdline} did not finish within {timeout:?}");
        }
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = String::from_utf8_lossy(&t1.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&t2.join().unwrap()).into_owned();
    CmdOut {
        cmdline,
        status,
        stdout,
        stderr,
    }
}

pub fn sqlfs_cli(args: &[OsString]) -> CmdOut {
    let mut c = Command::new(BIN);
    c.args(args);
    run_cmd(c, CLI_TIMEOUT)
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

pub fn verify(dir: &Path, db: Option<&str>) -> CmdOut {
    let mut args = vec![os("verify"), os(dir)];
    if let Some(db) = db {
        args.push(os("--db"));
        args.push(os(db));
    }
    sqlfs_cli(&args)
}

pub fn assert_verify(dir: &Path) {
    let o = verify(dir, None);
    assert!(
        o.ok(),
        "sqlfs verify reported a mismatch or failed:\n{}",
        o.describe()
    );
}

pub fn assert_verify_db(dir: &Path, db: &str) {
    let o = verify(dir, Some(db));
    assert!(
        o.ok(),
        "sqlfs verify --db {db} reported a mismatch or failed:\n{}",
        o.describe()
    );
}

/// One line of `sqlfs log`.
#[derive(Clone, Debug)]
pub struct LogEntry {
    pub txid: u64,
    pub ts: u128,
    pub pages: u64,
    pub size: u64,
    pub checksum: u64,
    pub line: String,
}

/// The staged log of one database: an optional base (older transactions folded into a
/// local base image) and the transactions after it.
#[derive(Clone, Debug, Default)]
pub struct StagedLog {
    /// (txid, size, checksum) of the base, when transactions were folded.
    pub base: Option<(u64, u64, u64)>,
    pub entries: Vec<LogEntry>,
}

fn kv(line: &str, key: &str) -> Option<String> {
    line.split_whitespace().find_map(|t| {
        t.strip_prefix(key)
            .and_then(|r| r.strip_prefix('='))
            .map(str::to_string)
    })
}

pub fn parse_staged_log(text: &str) -> StagedLog {
    let mut base = None;
    for line in text.lines() {
        if line.split_whitespace().next() == Some("base") {
            let t = kv(line, "txid").and_then(|v| v.parse().ok());
            let s = kv(line, "size").and_then(|v| v.parse().ok());
            let c = kv(line, "checksum").and_then(|v| u64::from_str_radix(&v, 16).ok());
            match (t, s, c) {
                (Some(t), Some(s), Some(c)) => base = Some((t, s, c)),
                _ => panic!("unparsable base line {line:?}"),
            }
        }
    }
    StagedLog {
        base,
        entries: parse_log(text),
    }
}

/// Transaction lines of `sqlfs log` output (lines whose first word is not key=value, such
/// as a folded base, are skipped).
pub fn parse_log(text: &str) -> Vec<LogEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line
            .split_whitespace()
            .next()
            .is_some_and(|w| !w.contains('='))
        {
            continue;
        }
        let mut txid = None;
        let mut ts = None;
        let mut pages = None;
        let mut size = None;
        let mut checksum = None;
        for tok in line.split_whitespace() {
            let Some((k, v)) = tok.split_once('=') else {
                continue;
            };
            match k {
                "txid" => txid = v.parse::<u64>().ok(),
                "ts" => ts = v.parse::<u128>().ok(),
                "pages" => pages = v.parse::<u64>().ok(),
                "size" => size = v.parse::<u64>().ok(),
                "checksum" => {
                    assert_eq!(
                        v.len(),
                        16,
                        "checksum is not 16 hex digits in log line {line:?}"
                    );
                    assert!(
                        v.bytes()
                            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                        "checksum is not lowercase hex in log line {line:?}"
                    );
                    checksum = u64::from_str_radix(v, 16).ok()
                }
                _ => {}
            }
        }
        if txid.is_none() && !line.contains("txid=") {
            continue;
        }
        fn bad<T>(line: &str) -> T {
            panic!("unparsable log line {line:?}")
        }
        out.push(LogEntry {
            txid: txid.unwrap_or_else(|| bad(line)),
            ts: ts.unwrap_or_else(|| bad(line)),
            pages: pages.unwrap_or_else(|| bad(line)),
            size: size.unwrap_or_else(|| bad(line)),
            checksum: checksum.unwrap_or_else(|| bad(line)),
            line: line.to_string(),
        });
    }
    out
}

pub fn log_cmd(dir: &Path, db: &str) -> CmdOut {
    sqlfs_cli(&[os("log"), os(dir), os("--db"), os(db)])
}

/// `sqlfs log` entries of one database; the command must succeed.
pub fn log_entries(dir: &Path, db: &str) -> Vec<LogEntry> {
    staged_log(dir, db).entries
}

pub fn staged_log(dir: &Path, db: &str) -> StagedLog {
    let o = log_cmd(dir, db);
    assert!(o.ok(), "sqlfs log failed:\n{}", o.describe());
    parse_staged_log(&o.stdout)
}

/// TXIDs must be exactly 1..=N.
pub fn assert_gap_free(entries: &[LogEntry], what: &str) {
    assert_gap_free_after(entries, 0, what)
}

/// TXIDs must be exactly base+1..=N.
pub fn assert_gap_free_after(entries: &[LogEntry], base: u64, what: &str) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            e.txid,
            base + i as u64 + 1,
            "{what}: txids are not gap-free from {}: entry #{i} is {:?} (previous: {:?})",
            base + 1,
            e.line,
            if i > 0 {
                Some(&entries[i - 1].line)
            } else {
                None
            }
        );
    }
}

pub fn replay(dir: &Path, db: &str, txid: u64, out: &Path) {
    let _ = fs::remove_file(out);
    let o = sqlfs_cli(&[
        os("replay"),
        os(dir),
        os("--db"),
        os(db),
        os("--txid"),
        os(txid.to_string()),
        os("-o"),
        os(out),
    ]);
    assert!(o.ok(), "sqlfs replay failed:\n{}", o.describe());
    assert!(
        out.exists(),
        "sqlfs replay exited 0 but wrote no {}",
        out.display()
    );
}

// ---------------------------------------------------------------------------------------
// The page-image oracle
// ---------------------------------------------------------------------------------------

pub const CRC64: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_XZ);

pub fn page_crc(pgno: u32, data: &[u8]) -> u64 {
    let mut d = CRC64.digest();
    d.update(&pgno.to_be_bytes());
    d.update(data);
    d.finalize()
}

/// Rolling database checksum of a whole image.
pub fn image_checksum(image: &[u8], page_size: usize) -> u64 {
    assert_eq!(image.len() % page_size, 0);
    image
        .chunks(page_size)
        .enumerate()
        .fold(0u64, |acc, (i, p)| acc ^ page_crc(i as u32 + 1, p))
}

pub fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// Retry a closure while it fails with SQLITE_BUSY / SQLITE_LOCKED.
pub fn retry_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let mut i = 0;
    loop {
        match f() {
            Err(e) if is_busy(&e) && i < 500 => {
                i += 1;
                sleep_ms(10);
            }
            r => return r,
        }
    }
}

pub fn open_db(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    c.busy_timeout(BUSY_TIMEOUT).unwrap();
    c
}

pub fn set_journal_mode(conn: &Connection, mode: &str) {
    let got: String =
        retry_busy(|| conn.query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0)))
            .unwrap();
    assert_eq!(
        got.to_lowercase(),
        mode.to_lowercase(),
        "PRAGMA journal_mode={mode} returned {got}"
    );
}

pub fn integrity_ok(conn: &Connection) {
    let rows: Vec<String> = retry_busy(|| {
        let mut st = conn.prepare("PRAGMA integrity_check")?;
        let r = st
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>();
        r
    })
    .unwrap();
    assert_eq!(
        rows,
        vec!["ok".to_string()],
        "PRAGMA integrity_check failed"
    );
}

/// What a connection saw at one point in time.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub checksum: u64,
    pub npages: u64,
    pub page_size: usize,
    pub image: Vec<u8>,
}

/// Read every page a connection sees in one read transaction, feeding them to `sink`.
/// Returns (checksum, page count, page size).
pub fn snapshot_with(
    conn: &Connection,
    mut sink: impl FnMut(u32, &[u8]),
) -> rusqlite::Result<(u64, u64, usize)> {
    assert!(
        conn.is_autocommit(),
        "a snapshot needs a connection outside any transaction"
    );
    // Drop every cached page first: a writer's cache can hold pages that never reach the
    // file (free-list leaves are not written back), so only freshly read pages show the
    // database as stored, which is what a replay reproduces.
    conn.execute_batch("PRAGMA shrink_memory")?;
    conn.execute_batch("BEGIN")?;
    let r = (|| {
        let _: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        let mut stmt = conn.prepare("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")?;
        let mut rows = stmt.query([])?;
        let mut sum = 0u64;
        let mut n = 0u64;
        let mut ps = 0usize;
        while let Some(row) = rows.next()? {
            let pgno: i64 = row.get(0)?;
            n += 1;
            assert_eq!(pgno as u64, n, "sqlite_dbpage skipped a page");
            let data = match row.get_ref(1)? {
                ValueRef::Blob(b) => b,
                other => panic!("page {pgno}: data is {other:?}"),
            };
            ps = data.len();
            sum ^= page_crc(pgno as u32, data);
            sink(pgno as u32, data);
        }
        Ok((sum, n, ps))
    })();
    match &r {
        Ok(_) => conn.execute_batch("COMMIT")?,
        Err(_) => {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
    r
}

/// The page image a connection sees now (in memory when `keep_image`).
pub fn snapshot(conn: &Connection, keep_image: bool) -> Snapshot {
    let mut image = Vec::new();
    let (checksum, npages, page_size) = retry_busy(|| {
        image.clear();
        snapshot_with(conn, |_, d| {
            if keep_image {
                image.extend_from_slice(d)
            }
        })
    })
    .expect("reading sqlite_dbpage");
    Snapshot {
        checksum,
        npages,
        page_size,
        image,
    }
}

/// The page image streamed to a file (for very large databases).
pub fn snapshot_to_file(conn: &Connection, path: &Path) -> Snapshot {
    let (checksum, npages, page_size) = retry_busy(|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
        let r = snapshot_with(conn, |_, d| w.write_all(d).unwrap());
        w.flush().unwrap();
        r
    })
    .expect("reading sqlite_dbpage");
    Snapshot {
        checksum,
        npages,
        page_size,
        image: Vec::new(),
    }
}

#[derive(Clone, Debug)]
pub enum Image {
    None,
    Mem(Vec<u8>),
    File(PathBuf),
}

/// A sampled state: its checksum, size, and optionally its full image.
#[derive(Clone, Debug)]
pub struct Sample {
    pub checksum: u64,
    pub npages: u64,
    pub page_size: usize,
    pub image: Image,
    pub label: String,
}

impl Sample {
    pub fn from_snapshot(s: Snapshot, keep_image: bool, label: impl Into<String>) -> Sample {
        Sample {
            checksum: s.checksum,
            npages: s.npages,
            page_size: s.page_size,
            image: if keep_image {
                Image::Mem(s.image)
            } else {
                Image::None
            },
            label: label.into(),
        }
    }
}

/// Take a sample now.
pub fn sample(conn: &Connection, keep_image: bool, label: impl Into<String>) -> Sample {
    let s = snapshot(conn, keep_image);
    Sample::from_snapshot(s, keep_image, label)
}

/// Take a sample now, its image streamed to the file `path` (for very large databases).
pub fn sample_to_file(conn: &Connection, path: PathBuf, label: impl Into<String>) -> Sample {
    let s = snapshot_to_file(conn, &path);
    Sample {
        checksum: s.checksum,
        npages: s.npages,
        page_size: s.page_size,
        image: Image::File(path),
        label: label.into(),
    }
}

/// Compare a replayed database with the expected image; on mismatch name the first
/// differing page.
pub fn assert_same_image(expected: &[u8], actual: &[u8], page_size: usize, what: &str) {
    if expected == actual {
        return;
    }
    let ps = page_size.max(1);
    let n = expected.len().min(actual.len());
    let first = (0..n).find(|&i| expected[i] != actual[i]);
    panic!(
        "{what}: replayed database differs from the page image the application saw: \
         expected {} bytes ({} pages), replay has {} bytes ({} pages); first differing byte: {:?} (page {:?})",
        expected.len(),
        expected.len() / ps,
        actual.len(),
        actual.len() / ps,
        first,
        first.map(|i| i / ps + 1)
    );
}

/// Streaming comparison of two files.
pub fn assert_same_files(expected: &Path, actual: &Path, page_size: usize, what: &str) {
    let le = fs::metadata(expected).unwrap().len();
    let la = fs::metadata(actual).unwrap().len();
    let mut fe = std::io::BufReader::with_capacity(1 << 20, File::open(expected).unwrap());
    let mut fa = std::io::BufReader::with_capacity(1 << 20, File::open(actual).unwrap());
    let mut be = vec![0u8; 1 << 20];
    let mut ba = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let ne = read_full(&mut fe, &mut be);
        let na = read_full(&mut fa, &mut ba);
        let n = ne.min(na);
        if let Some(i) = (0..n).find(|&i| be[i] != ba[i]) {
            let at = off + i as u64;
            panic!(
                "{what}: replayed database differs from the page image at byte {at} (page {}); sizes {le} vs {la}",
                at / page_size as u64 + 1
            );
        }
        if ne != na {
            panic!("{what}: replayed database has {la} bytes, the page image has {le}");
        }
        if ne == 0 {
            return;
        }
        off += ne as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    n
}

fn sanitize(db: &str) -> String {
    db.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Replay `txid` and compare it with a sample's image.
pub fn check_replay_against(dir: &Path, db: &str, txid: u64, s: &Sample, scratch: &Path) {
    let out = scratch.join(format!("replay-{}-{txid}.db", sanitize(db)));
    replay(dir, db, txid, &out);
    let what = format!("{db} txid {txid} ({})", s.label);
    match &s.image {
        Image::None => {}
        Image::Mem(img) => {
            let got = fs::read(&out).unwrap();
            assert_same_image(img, &got, s.page_size, &what);
        }
        Image::File(p) => assert_same_files(p, &out, s.page_size, &what),
    }
    let _ = fs::remove_file(&out);
}

/// Diagnostics: which pages of a staged state differ from an image.
pub fn diff_against(
    dir: &Path,
    db: &str,
    e: &LogEntry,
    img: &[u8],
    page_size: usize,
    scratch: &Path,
) -> String {
    let out = scratch.join(format!("diff-{}-{}.db", sanitize(db), e.txid));
    replay(dir, db, e.txid, &out);
    let got = fs::read(&out).unwrap();
    let _ = fs::remove_file(&out);
    let n = img.len().max(got.len()) / page_size.max(1);
    let mut diffs = Vec::new();
    for pg in 0..n {
        let a = img.get(pg * page_size..(pg + 1) * page_size);
        let b = got.get(pg * page_size..(pg + 1) * page_size);
        if a != b {
            let detail = match (a, b) {
                (Some(a), Some(b)) => {
                    let first = (0..page_size).find(|&k| a[k] != b[k]).unwrap();
                    let last = (0..page_size).rev().find(|&k| a[k] != b[k]).unwrap();
                    format!("page {} bytes {first}..={last}", pg + 1)
                }
                _ => format!("page {} missing on one side", pg + 1),
            };
            diffs.push(detail);
        }
    }
    format!(
        "txid {} replays to {} bytes vs image {} bytes; {} differing pages: {:?}",
        e.txid,
        got.len(),
        img.len(),
        diffs.len(),
        &diffs[..diffs.len().min(20)]
    )
}

/// Every sample (in the order one observer took them) must be found in the staged log,
/// at monotonically non-decreasing txids; samples with an image are replayed and compared
/// byte for byte. Returns the matched txids.
pub fn check_samples(
    dir: &Path,
    db: &str,
    entries: &[LogEntry],
    samples: &[Sample],
    scratch: &Path,
) -> Vec<u64> {
    let mut pos = 0usize;
    let mut matched = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        if s.npages == 0 {
            continue;
        }
        let found = (pos..entries.len()).find(|&j| entries[j].checksum == s.checksum);
        let Some(j) = found else {
            if let (Image::Mem(img), Some(next)) = (&s.image, entries.get(pos + 1)) {
                eprintln!(
                    "{db}: sample #{i} not found; {}",
                    diff_against(dir, db, next, img, s.page_size, scratch)
                );
            }
            let anywhere = entries.iter().find(|e| e.checksum == s.checksum);
            let prev = if pos < entries.len() {
                Some(&entries[pos].line)
            } else {
                None
            };
            panic!(
                "{db}: sample #{i} [{}] (checksum {:016x}, {} pages of {} bytes) is not in the staged log at or after \
                 the previously matched entry {:?}; found elsewhere: {:?}; the log has {} entries, last: {:?}",
                s.label,
                s.checksum,
                s.npages,
                s.page_size,
                prev,
                anywhere.map(|e| &e.line),
                entries.len(),
                entries.last().map(|e| &e.line)
            );
        };
        assert_eq!(
            entries[j].size, s.npages,
            "{db}: sample #{i} [{}] matches {:?} by checksum but not by size",
            s.label, entries[j].line
        );
        pos = j;
        matched.push(entries[j].txid);
        if !matches!(s.image, Image::None) {
            check_replay_against(dir, db, entries[j].txid, s, scratch);
        }
    }
    matched
}

/// The live database (opened fresh through the mount) must pass integrity_check and be
/// exactly the state after the last staged transaction. Returns the log.
pub fn check_final(dir: &Path, db_path: &Path, db: &str, scratch: &Path) -> Vec<LogEntry> {
    let conn = open_db(db_path);
    integrity_ok(&conn);
    let s = sample(&conn, true, "final state");
    drop(conn);
    let log = staged_log(dir, db);
    // Without folding (the default stage limit is far above what most tests write) the
    // log starts at 1; after a fold it starts right after the base.
    assert_gap_free_after(&log.entries, log.base.map_or(0, |b| b.0), db);
    let entries = log.entries;
    let last = entries
        .last()
        .unwrap_or_else(|| panic!("{db}: the staged log is empty"));
    if last.checksum != s.checksum {
        let Image::Mem(img) = &s.image else {
            unreachable!()
        };
        let v = verify(dir, Some(db));
        eprintln!(
            "{db}: live state differs from the last staged transaction; {}\nsqlfs verify says:\n{}",
            diff_against(dir, db, last, img, s.page_size, scratch),
            v.describe()
        );
    }
    assert_eq!(
        last.checksum, s.checksum,
        "{db}: the live database (checksum {:016x}, {} pages) is not the state after the last staged transaction {:?}",
        s.checksum, s.npages, last.line
    );
    assert_eq!(
        last.size, s.npages,
        "{db}: size mismatch with the last staged transaction"
    );
    check_replay_against(dir, db, last.txid, &s, scratch);
    entries
}

/// Run the sqlite3 command-line shell on a database with a script on stdin.
pub fn sqlite3_cli(db: &Path, script: &str) -> CmdOut {
    let mut c = Command::new("sqlite3");
    c.arg("-bail").arg(db);
    run_cmd_with_input(c, Some(script.to_string()), Duration::from_secs(300))
}

/// Spawn the sqlite3 shell in the background; its output goes to `log`.
pub fn spawn_sqlite3(db: &Path, script: String, log: &Path) -> (Child, thread::JoinHandle<()>) {
    let logf = File::create(log).unwrap();
    let mut child = Command::new("sqlite3")
        .arg("-bail")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(logf.try_clone().unwrap()))
        .stderr(Stdio::from(logf))
        .spawn()
        .expect("spawn sqlite3");
    let mut stdin = child.stdin.take().unwrap();
    let h = thread::spawn(move || {
        let _ = stdin.write_all(script.as_bytes());
    });
    (child, h)
}

/// Formats ns since the epoch as RFC 3339 UTC with `digits` (0-9) fractional digits,
/// truncated.
pub fn rfc3339(ns: u64, digits: u32) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let frac = if digits == 0 {
        String::new()
    } else {
        let f = (ns % 1_000_000_000) / 10u64.pow(9 - digits.min(9));
        format!(".{f:0w$}", w = digits.min(9) as usize)
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
