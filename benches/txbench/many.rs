//! Rows of many databases in one mount (one database per tenant, `tenants/tN.db`):
//!
//! * "N databases committing once a second each: commit → S3 object readable, p50 / p99 /
//!   max (ms)" and "… S3 requests per second; CPU": N databases are created through one
//!   mount shipping to the S3-compatible server through the counting proxy; once each has its
//!   first object there, a few writer threads commit one row to every database once a second
//!   (the databases' turns spread evenly over the second) for `SQLFS_BENCH_SECS` (at least
//!   10 s). A transaction's lag runs from its commit time in the object header to when the
//!   server completed the PUT of its level-0 object (up to 4,000 objects are read back, an
//!   even sample). Two such loads run one after the other on the same mount: the first with
//!   the server at the priority of the daemon's shipping threads (nice 10), the second with
//!   the server at the default priority, above them. The server stands in for a store on
//!   another machine; on this one it takes about half of the CPU, and at the default
//!   priority it outranks the shipping threads tenfold whenever the cores are busy.
//!   `SQLFS_BENCH_MANY_DUMP=PATH` writes every request of each load to `PATH.niceK`.
//!   A thread of the bench sleeping 10 ms at a time notes the longest sleep of each load: a
//!   second or more means the machine stood still (a paused virtual machine), and the row says so.
//! * "N idle databases: S3 requests / daemon CPU (% of one core) over S s": the same data
//!   directory mounted again; once the start-up requests (one claim check per database) are
//!   over (no request for 3 s), requests through the proxy and the daemon's CPU time
//!   (utime + stime from /proc) over `SQLFS_BENCH_MANY_IDLE_SECS`.
//! * "M databases in one mount: every database on the file replica (s after the last was
//!   created)", "… daemon VmRSS / VmHWM (MiB)", "… mount serving (s from start, M databases
//!   known)": M databases created through a mount shipping to a file replica, a commit each;
//!   the time until the replica holds a first object of every one, the daemon's memory then;
//!   the same data directory mounted again, the time from starting `sqlfs mount` until the
//!   mount point answers.
//!
//! N is `SQLFS_BENCH_MANY` (default 200), M `SQLFS_BENCH_MANY_BIG` (default 1000); the
//! issue's targets are N = 1,000 and M = 10,000.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rusqlite::{params, Connection};

use crate::harness::{open, step, Config, BUCKET};
use crate::mount::Mount;
use crate::s3;

/// Writer (and creator) threads.
pub const WRITERS: usize = 4;

/// Client threads of the raw PUT rate (the daemon's default `--replica-concurrency`).
pub const RAW_THREADS: usize = 16;

/// One load: every database committing once a second for a while.
pub struct Load {
    /// The S3 server's nice value meanwhile.
    pub server_nice: i32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub commits: u64,
    pub load_secs: f64,
    pub req_per_sec: f64,
    pub by_method: String,
    /// CPU of the daemon and of the S3 server (% of one core).
    pub daemon_cpu_pct: f64,
    pub server_cpu_pct: f64,
    /// The longest a 10 ms sleep of the bench took during the load (ms), by the monotonic or
    /// the wall clock: seconds mean the machine stood still (a paused virtual machine), and
    /// the lag figures of that load with it.
    pub stall_ms: f64,
}

/// Watches for the machine standing still: a thread that sleeps 10 ms at a time and keeps the
/// longest any sleep took, by the monotonic clock and by the wall clock (a paused virtual
/// machine may stop one and jump the other).
struct StallWatch {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<f64>,
}

impl StallWatch {
    fn start() -> StallWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || {
            let mut longest = 0f64;
            let (mut mono, mut wall) = (Instant::now(), std::time::SystemTime::now());
            while !s.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(10));
                let (m, w) = (Instant::now(), std::time::SystemTime::now());
                let wall_ms = w
                    .duration_since(wall)
                    .map_or(0.0, |d| d.as_secs_f64() * 1e3);
                longest = longest.max((m - mono).as_secs_f64() * 1e3).max(wall_ms);
                (mono, wall) = (m, w);
            }
            longest
        });
        StallWatch { stop, thread }
    }

    /// The longest sleep seen (ms).
    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(f64::NAN)
    }
}

pub struct Many {
    pub n: usize,
    /// The load with the S3 server at the priority of the daemon's shipping threads, then
    /// with the server at the default priority (above them).
    pub loads: Vec<Load>,
    pub create_secs: f64,
    pub first_objects_secs: f64,
    pub idle_secs: f64,
    pub idle_requests: usize,
    pub idle_cpu_pct: f64,
    pub startup_requests: usize,
    pub startup_quiet_secs: f64,
    /// The S3 server ("SeaweedFS 4.48", "moto").
    pub server: String,
    /// The server's own limit: conditional PUTs of small objects per second from
    /// [`RAW_THREADS`] client threads of this process, straight to it, and its CPU meanwhile.
    pub raw_puts_per_sec: f64,
    pub raw_server_cpu_pct: f64,
    /// The same through the counting proxy.
    pub raw_proxy_puts_per_sec: f64,
    /// The larger part's figures, or why it failed.
    pub big: Option<std::result::Result<Big, String>>,
}

pub struct Big {
    pub m: usize,
    pub create_secs: f64,
    pub all_on_replica_secs: f64,
    pub on_replica: usize,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub serving_secs: f64,
    pub remount_rss_kib: u64,
}

/// Raises this process's open-file limit to its hard limit (a connection holds three files).
pub fn raise_nofile() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn db_path(mnt: &Path, i: usize) -> PathBuf {
    mnt.join("tenants").join(format!("t{i}.db"))
}

/// Creates databases `0..n` under `mnt/tenants/` from [`WRITERS`] threads, each with a
/// table and one row; returns the open connections if `keep`.
fn create(mnt: &Path, n: usize, keep: bool) -> Result<Vec<Vec<(usize, Connection)>>> {
    fs::create_dir_all(mnt.join("tenants"))?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..WRITERS {
        let (mnt, next) = (mnt.to_path_buf(), next.clone());
        handles.push(thread::spawn(move || -> Result<Vec<(usize, Connection)>> {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok(mine);
                }
                let conn = open(&db_path(&mnt, i), "NORMAL")?;
                conn.execute_batch(
                    "CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT); INSERT INTO t(x) VALUES ('first');",
                )?;
                if keep {
                    mine.push((i, conn));
                }
            }
        }));
    }
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a creator panicked"))?
        })
        .collect()
}

/// Database ids that have a first object (snapshot or segment) among successful PUTs.
fn shipped_ids(reqs: &[s3::Req]) -> HashSet<String> {
    reqs.iter()
        .filter(|r| r.method == "PUT" && r.status == 200)
        .filter_map(|r| r.key(BUCKET))
        .filter_map(|k| {
            let k = k.strip_prefix("many/")?;
            let (id, rest) = k.split_once('/')?;
            (rest.starts_with("snap/") || rest.starts_with("l0/")).then(|| id.to_string())
        })
        .collect()
}

/// CPU time of process `pid` in clock ticks (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

pub fn many(cfg: &Config, srv: &s3::Server) -> Result<Many> {
    raise_nofile();
    let n = cfg.many;
    let secs = cfg.secs.max(10.0);
    let proxy = s3::Proxy::start(srv.port)?;
    let url = s3::Server::url_via(proxy.port, BUCKET, "many");
    let mnt = cfg.work.join("many-mnt");
    let backing = cfg.work.join("many-backing");
    let log = cfg.work.join("many.log");
    let mount = Mount::start_with(&mnt, &backing, &log, std::slice::from_ref(&url))?;
    step(&format!(
        "creating {n} databases through one mount (S3 replica)"
    ));
    let t = Instant::now();
    let groups = create(&mnt, n, true)?;
    let create_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    loop {
        let have = shipped_ids(&proxy.requests()).len();
        if have >= n {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("only {have} of {n} databases reached the S3 replica within 10 minutes");
        }
        thread::sleep(Duration::from_millis(200));
    }
    let first_objects_secs = t.elapsed().as_secs_f64();
    thread::sleep(Duration::from_secs(2));

    let daemon_pid = mount.child.as_ref().map(|c| c.id()).unwrap_or(0);
    // The server stands in for a store on another machine, but here it shares two cores
    // with the daemon and the writers. The first load gives it the priority of the daemon's
    // shipping threads (`nice` 10: they yield to apps, and the server then yields to apps
    // too); the second the default one, which outranks the shipping threads tenfold.
    let mut loads = Vec::new();
    let mut groups = groups;
    for nice in [10, 0] {
        srv.set_nice(nice)?;
        let (l, back) = load(n, secs, groups, &proxy, srv, daemon_pid)?;
        groups = back;
        loads.push(l);
    }
    srv.set_nice(0)?;
    drop(groups);
    mount.stop()?;

    step(&format!(
        "{n} idle databases: a fresh mount of the same data"
    ));
    let proxy2 = s3::Proxy::start(srv.port)?;
    let url2 = s3::Server::url_via(proxy2.port, BUCKET, "many");
    let mount = Mount::start_with(&mnt, &backing, &log, &[url2])?;
    let pid = mount.child.as_ref().map(|c| c.id()).unwrap_or(0);
    let t = Instant::now();
    let mut seen = (0, Instant::now());
    loop {
        let k = proxy2.requests().len();
        if k != seen.0 {
            seen = (k, Instant::now());
        }
        if seen.1.elapsed() > Duration::from_secs(3) || t.elapsed() > Duration::from_secs(300) {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let startup_quiet_secs = t.elapsed().as_secs_f64();
    let startup_requests = proxy2.requests().len();
    let idle = cfg.many_idle_secs;
    let (r0, c0, i0) = (proxy2.requests().len(), cpu_ticks(pid), Instant::now());
    thread::sleep(Duration::from_secs_f64(idle));
    let (r1, c1, idle_secs) = (
        proxy2.requests().len(),
        cpu_ticks(pid),
        i0.elapsed().as_secs_f64(),
    );
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    mount.stop()?;
    step(&format!(
        "the S3 server's own rate: conditional PUTs from {RAW_THREADS} threads for 5 s"
    ));
    let (raw_puts_per_sec, raw_server_cpu_pct) = {
        let (n, secs, ticks) = raw_puts(srv, srv.client()?, Duration::from_secs(5))?;
        (n as f64 / secs, ticks as f64 / hz / secs * 100.0)
    };
    // The same through the counting proxy, as the daemon's requests go.
    let via = sqlfs::replica::open(&s3::Server::url_via(proxy.port, BUCKET, "rawproxy"))?;
    let raw_proxy_puts_per_sec = {
        let (n, secs, _) = raw_puts(srv, via.as_ref(), Duration::from_secs(5))?;
        n as f64 / secs
    };

    let big = if cfg.many_big > 0 {
        Some(big(cfg).map_err(|e| format!("{e:#}")))
    } else {
        None
    };
    Ok(Many {
        n,
        loads,
        create_secs,
        first_objects_secs,
        idle_secs,
        idle_requests: r1 - r0,
        idle_cpu_pct: (c1 - c0) as f64 / hz / idle_secs * 100.0,
        startup_requests,
        startup_quiet_secs,
        server: srv.name.clone(),
        raw_puts_per_sec,
        raw_server_cpu_pct,
        raw_proxy_puts_per_sec,
        big,
    })
}

/// The connections of each writer thread: (database index, connection).
type Groups = Vec<Vec<(usize, Connection)>>;

/// One load: every one of the `n` databases commits a row once a second for `secs` (the
/// databases' turns spread evenly over the second), then 4 s for the last commits to reach
/// the store; the lag of each transaction in a sample of the level-0 objects stored, read
/// back for their commit times. Returns the figures and the connections.
fn load(
    n: usize,
    secs: f64,
    groups: Groups,
    proxy: &s3::Proxy,
    srv: &s3::Server,
    daemon_pid: u32,
) -> Result<(Load, Groups)> {
    let server_nice = srv.nice();
    step(&format!(
        "{n} databases committing once a second each for {secs:.0} s (the S3 server at nice {server_nice})"
    ));
    let (t0, wall0) = (
        Instant::now(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    );
    let start = Instant::now() + Duration::from_millis(100);
    let cpu0 = (cpu_ticks(daemon_pid), cpu_ticks(srv.pid()), Instant::now());
    let stalls = StallWatch::start();
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for group in groups {
        let (stop, commits) = (stop.clone(), commits.clone());
        writers.push(thread::spawn(
            move || -> Result<Vec<(usize, Connection)>> {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for (i, conn) in &group {
                        // Database i's turn in each second.
                        let at = start
                            + Duration::from_secs(round)
                            + Duration::from_micros((*i as u64 * 1_000_000) / n as u64);
                        let now = Instant::now();
                        if at > now {
                            thread::sleep(at - now);
                        }
                        if stop.load(Ordering::Relaxed) {
                            return Ok(group);
                        }
                        conn.execute(
                            "INSERT INTO t(x) VALUES (?1)",
                            params![format!("tenant {i} round {round}")],
                        )?;
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                    round += 1;
                }
                Ok(group)
            },
        ));
    }
    thread::sleep(
        (start + Duration::from_secs_f64(secs)).saturating_duration_since(Instant::now()),
    );
    stop.store(true, Ordering::Relaxed);
    let load_end = Instant::now();
    let cpu1 = (cpu_ticks(daemon_pid), cpu_ticks(srv.pid()), Instant::now());
    let mut groups = Vec::new();
    for w in writers {
        groups.push(
            w.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??,
        );
    }
    // The last commits reach the store.
    thread::sleep(Duration::from_secs(4));
    let drained = Instant::now();
    let stall_ms = stalls.finish();
    let reqs = proxy.requests();
    if let Ok(path) = std::env::var("SQLFS_BENCH_MANY_DUMP") {
        // Every request of the run (ms from this load's start): for looking at the schedule.
        let ms = |t: Instant| {
            t.saturating_duration_since(start).as_secs_f64() * 1e3
                - start.saturating_duration_since(t).as_secs_f64() * 1e3
        };
        let mut out = String::new();
        for r in &reqs {
            out += &format!(
                "{:.3} {:.3} {} {} {}\n",
                ms(r.start),
                ms(r.end),
                r.method,
                r.status,
                r.target
            );
        }
        fs::write(format!("{path}.nice{server_nice}"), out)?;
    }
    let load_secs = (load_end - start).as_secs_f64();
    let in_load: Vec<&s3::Req> = reqs
        .iter()
        .filter(|r| r.start >= start && r.start < load_end)
        .collect();
    let mut by_method: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &in_load {
        let kind = if r.method == "GET" && r.target.contains("list-type") {
            "LIST".to_string()
        } else {
            r.method.clone()
        };
        *by_method.entry(kind).or_default() += 1;
    }
    // Level-0 objects stored during the load (and just after it): their commit times.
    let objs: Vec<&s3::Req> = reqs
        .iter()
        .filter(|r| r.method == "PUT" && r.status == 200 && r.start >= start && r.start < drained)
        .filter(|r| r.key(BUCKET).is_some_and(|k| k.contains("/l0/")))
        .collect();
    let step_by = objs.len().div_ceil(4000).max(1);
    let sample: Vec<&s3::Req> = objs.iter().step_by(step_by).copied().collect();
    step(&format!(
        "reading back {} of {} level-0 objects for their commit times",
        sample.len(),
        objs.len()
    ));
    let lags = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    thread::scope(|sc| {
        for _ in 0..8 {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(r) = sample.get(i) else { return };
                let Some(key) = r.key(BUCKET) else { continue };
                let Ok(b) = srv.object(BUCKET, key) else {
                    continue;
                };
                if b.len() < 128 || &b[..8] != b"SQFSOBJ\0" {
                    continue;
                }
                let u = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
                let (first, last, t_first, t_last) = (u(32), u(40), u(48), u(56));
                let at_ns = wall0 + r.end.duration_since(t0).as_nanos() as u64;
                let k = last - first + 1;
                let mut mine = Vec::new();
                for j in 0..k {
                    let t = if k == 1 {
                        t_last
                    } else {
                        t_first + (t_last - t_first) * j / (k - 1)
                    };
                    mine.push(at_ns.saturating_sub(t) as f64 / 1e6);
                }
                lags.lock().unwrap().extend(mine);
            });
        }
    });
    let mut lags = lags.into_inner().unwrap();
    lags.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let wall = (cpu1.2 - cpu0.2).as_secs_f64();
    let cpu_pct = |t0: u64, t1: u64| t1.saturating_sub(t0) as f64 / hz / wall * 100.0;
    Ok((
        Load {
            server_nice,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: lags.last().copied().unwrap_or(f64::NAN),
            commits: commits.load(Ordering::Relaxed) as u64,
            load_secs,
            req_per_sec: in_load.len() as f64 / load_secs,
            by_method: by_method
                .iter()
                .map(|(m, k)| format!("{m} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            daemon_cpu_pct: cpu_pct(cpu0.0, cpu1.0),
            server_cpu_pct: cpu_pct(cpu0.1, cpu1.1),
            stall_ms,
        },
        groups,
    ))
}

/// Conditional PUTs (`If-None-Match: *`, as the daemon stores objects) of 400-byte objects
/// from [`RAW_THREADS`] threads of this process for `dur` through `client` (the S3 client the
/// daemon uses, straight to the server or through the proxy): (PUTs that succeeded,
/// seconds, server CPU ticks).
fn raw_puts(
    srv: &s3::Server,
    client: &dyn sqlfs::replica::ReplicaClient,
    dur: Duration,
) -> Result<(u64, f64, u64)> {
    let dir = tempfile::tempdir()?;
    let body = dir.path().join("obj");
    fs::write(&body, vec![0x5a; 400])?;
    let done = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let c0 = cpu_ticks(srv.pid());
    let t = Instant::now();
    thread::scope(|sc| {
        for w in 0..RAW_THREADS {
            let (done, failed, body) = (&done, &failed, &body);
            sc.spawn(move || {
                let mut i = 0u64;
                while t.elapsed() < dur {
                    match client.put_new(&format!("rawput/{w}/{i}"), body) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    i += 1;
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let ticks = cpu_ticks(srv.pid()).saturating_sub(c0);
    if done.load(Ordering::Relaxed) == 0 {
        bail!(
            "no raw PUT succeeded ({} failed)",
            failed.load(Ordering::Relaxed)
        );
    }
    Ok((done.load(Ordering::Relaxed) as u64, secs, ticks))
}

/// Database ids with a first object (snapshot or segment) in file replica `dir`.
fn on_file_replica(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .filter(|e| e.file_name() != "names" && e.file_name() != "claims")
        .filter(|e| {
            ["snap", "l0"]
                .iter()
                .any(|k| fs::read_dir(e.path().join(k)).is_ok_and(|mut d| d.next().is_some()))
        })
        .count()
}

/// M databases through one mount shipping to a file replica: time until every one is on the
/// replica, the daemon's memory, and how soon a mount of all of them serves.
fn big(cfg: &Config) -> Result<Big> {
    let m = cfg.many_big;
    let mnt = cfg.work.join("big-mnt");
    let backing = cfg.work.join("big-backing");
    let replica = backing.with_extension("replica");
    let log = cfg.work.join("big.log");
    let mount = Mount::start(&mnt, &backing, &log)?;
    step(&format!(
        "creating {m} databases through one mount (file replica)"
    ));
    let t = Instant::now();
    create(&mnt, m, false)?;
    let create_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let on_replica = loop {
        let have = on_file_replica(&replica);
        if have >= m || t.elapsed() > Duration::from_secs(900) {
            break have;
        }
        thread::sleep(Duration::from_millis(250));
    };
    let all_on_replica_secs = t.elapsed().as_secs_f64();
    mount.settle();
    let (rss_kib, hwm_kib) = mount.memory()?;
    mount.stop()?;
    step(&format!("mounting {m} databases again"));
    let t = Instant::now();
    let mount = Mount::start(&mnt, &backing, &log)?;
    let serving_secs = t.elapsed().as_secs_f64();
    mount.settle();
    let (remount_rss_kib, _) = mount.memory()?;
    let known = fs::read_dir(mnt.join("tenants"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".db"))
                .count()
        })
        .unwrap_or(0);
    if known < m {
        bail!("the remount shows {known} of {m} databases");
    }
    mount.stop()?;
    Ok(Big {
        m,
        create_secs,
        all_on_replica_secs,
        on_replica,
        rss_kib,
        hwm_kib,
        serving_secs,
        remount_rss_kib,
    })
}
