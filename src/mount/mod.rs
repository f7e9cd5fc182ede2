//! `sqlfs mount`: opens the backing directory, recovers each database (hot journals, staging
//! reconciliation), mounts, serves until SIGINT/SIGTERM, then flushes staging and unmounts.
//!
//! Threads: fuser request loops (`--threads`), one background thread that syncs staging and
//! folds it when it grows past `--stage-limit` (`upkeep`), the scan for databases nobody opened
//! (`capture::Capture::spawn_scan`, started once the mount serves, joined before shutdown),
//! each replica's shipping workers,
//! the control socket, and the signal watcher.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fuser::{Config, MountOption, Session, SessionACL};

use crate::backing::{Backing, META_DIR};
use crate::capture::Capture;
use crate::config::{db_passthrough, db_sync};
use crate::fs::{Passthrough, SqlFs};

mod options;
mod restore_missing;
mod upkeep;

use options::replica_specs;
pub use options::{CliMount, MountOpts, ReplicaSpec};
use restore_missing::restore_missing;

/// How long the staged history of a deleted database is kept.
const RETIRED_KEEP: Duration = Duration::from_secs(24 * 3600);

/// How long a `--sync` fsync waits for the replicas before failing the app's fsync.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// True if `path` is the mountpoint of a sqlfs mount (per /proc/self/mountinfo: filesystem
/// type `fuse` or `fuse.sqlfs`, source `sqlfs`).
pub fn is_sqlfs_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(p) = path.to_str() else { return false };
    let mut found = false;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && f[4].replace("\\040", " ") == p {
            // Later lines stack on top of earlier ones: the last match wins.
            found = f.iter().position(|x| *x == "-").is_some_and(|d| {
                let (ty, src) = (
                    f.get(d + 1).copied().unwrap_or(""),
                    f.get(d + 2).copied().unwrap_or(""),
                );
                ty == "fuse.sqlfs" || (ty == "fuse" && src == "sqlfs")
            });
        }
    }
    found
}

/// A mount point and a data directory that differ must not contain one another: files of
/// the data directory under the mount point would be reached through the mount itself (every
/// access to them a request back to this daemon), and a mount point inside the data directory
/// would show the mount within itself.
fn nesting_refused(mnt: &Path, data: &Path) -> Result<()> {
    if mnt == data {
        return Ok(());
    }
    if data.starts_with(mnt) {
        bail!(
            "data directory {} is inside the mount point {}: the mount would hide its own files (choose a data directory outside it, or mount {} in place without --data-dir)",
            data.display(),
            mnt.display(),
            mnt.display()
        );
    }
    if mnt.starts_with(data) {
        bail!(
            "mount point {} is inside the data directory {}: the mount would show itself within itself (choose a mount point outside it)",
            mnt.display(),
            data.display()
        );
    }
    Ok(())
}

pub fn run(o: MountOpts) -> Result<()> {
    tune_allocator();
    raise_open_files();
    // Catch SIGINT/SIGTERM from the start: one arriving while the mount comes up must still
    // lead to a clean unmount, not kill the daemon with the mount half made.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let dir = std::fs::canonicalize(&o.dir)
        .with_context(|| format!("mount point {} does not exist", o.dir.display()))?;
    if !dir.is_dir() {
        bail!("mount point {} is not a directory", dir.display());
    }
    if is_sqlfs_mount(&dir) {
        bail!("{} is already mounted by sqlfs (stop that process, or run `umount -l {}` if it was killed)", dir.display(), dir.display());
    }
    let data = match &o.data_dir {
        Some(d) => std::fs::canonicalize(d)
            .with_context(|| format!("data directory {} does not exist", d.display()))?,
        None => dir.clone(),
    };
    nesting_refused(&dir, &data)?;
    // One sqlfs per data directory, before anything in it is read or written (held until
    // this process exits).
    let _lock = crate::owner::DirLock::acquire(&data, &dir)?;
    if !Path::new("/dev/fuse").exists() {
        bail!("FUSE is unavailable: /dev/fuse is missing (load the module with `modprobe fuse`; in a container, pass the device /dev/fuse and CAP_SYS_ADMIN)");
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && which("fusermount3").is_none() {
        bail!("mounting as a regular user needs fusermount3: install the `fuse3` package (or run as root)");
    }

    let specs = replica_specs(&o)?;
    let mut replicas = Vec::new();
    for r in &specs {
        // Each replica is encrypted with its own settings.
        let sealer = crate::crypt::Sealer::for_seal(&r.seal)
            .with_context(|| format!("replica {}", crate::replica::redact_url(&r.url)))?
            .map(Arc::new);
        replicas.push((crate::replica::open(&r.url)?, r, sealer));
    }
    if o.restore_if_missing {
        restore_missing(&data, &specs[0], &specs[1..], &o.exclude)?;
    }
    let backing = Arc::new(
        Backing::open(&data)
            .with_context(|| format!("cannot open data directory {}", data.display()))?,
    );
    crate::capture::rollback_hot_journals(&backing, "", 0);
    let capture = Arc::new(
        Capture::open(backing.clone(), o.exclude.clone())
            .with_context(|| format!("cannot open staging in {}/{META_DIR}", data.display()))?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let rules = Arc::new(o.databases.clone());
    let writer = crate::ship::Writer {
        id: crate::owner::writer_id(&data.join(META_DIR))
            .with_context(|| format!("cannot read or make {}/{META_DIR}/writer", data.display()))?,
        host: crate::owner::hostname(),
        data_dir: data.display().to_string(),
        // Through the backing descriptor: in place, `data` is the mount point once mounted,
        // whose `.sqlfs` no access through the mount reaches.
        meta_dir: backing.meta_path(),
        takeover: o.takeover,
    };
    let shippers: Vec<Arc<crate::ship::Shipper>> = replicas
        .into_iter()
        .map(|(c, spec, sealer)| {
            crate::ship::Shipper::new(
                c,
                capture.clone(),
                (sealer, spec.key.clone()),
                writer.clone(),
                spec.policy.clone(),
                rules.clone(),
                (spec.sync_interval, spec.concurrency),
            )
        })
        .collect();
    let mut fs = SqlFs::new(backing.clone(), capture.clone())
        .context("cannot read the data directory")?
        .with_passthrough(o.passthrough);
    if o.passthrough_databases || o.databases.values().any(|d| d.passthrough == Some(true)) {
        let (wide, rules) = (o.passthrough_databases, rules.clone());
        fs = fs.with_straight_databases(Box::new(move |name: &str| {
            db_passthrough(wide, rules.get(name))
        }));
    }
    if o.any_sync() {
        if o.passthrough == Passthrough::Off {
            log::info!("sync: every write goes through sqlfs (no kernel passthrough)");
        } else {
            // Passthrough for the other databases; a synced one's fsync must find its commit
            // staged, so its WAL (and -shm) always go through sqlfs.
            let (sync, rules) = (o.sync, rules.clone());
            fs =
                fs.with_written_through(Box::new(move |name: &str| db_sync(sync, rules.get(name))));
            let named: Vec<&str> = o
                .databases
                .iter()
                .filter(|(_, d)| d.sync == Some(true))
                .map(|(n, _)| n.as_str())
                .collect();
            log::info!(
                "sync: the WAL and -shm files of synced databases ({}) go through sqlfs, never kernel passthrough",
                if o.sync {
                    "every database but those with sync: false".to_string()
                } else {
                    named.join(", ")
                }
            );
        }
    }
    let history = {
        // History views read the first replica, with that replica's key.
        let k = &specs[0].key;
        let key = match (&k.identity, &k.passphrase) {
            (Some(f), _) => Some(crate::history::Key::IdentityFile(f.clone())),
            (None, Some(p)) => Some(crate::history::Key::Passphrase(p.clone())),
            _ => None,
        };
        let h = crate::history::History::new(
            &backing.meta_path(),
            capture.clone(),
            Some(&specs[0].url),
            key,
            o.history_cache,
        )
        .context("cannot set up .history")?;
        let h = Arc::new(h);
        fs = fs.with_history(h.clone());
        h
    };
    if o.any_sync() {
        let (cap, sh) = (capture.clone(), shippers.clone());
        let (sync, rules) = (o.sync, rules.clone());
        fs = fs.with_durability(Box::new(move |rel: &str| {
            let name = crate::capture::classify(rel).1;
            // Only databases whose resolved sync is true wait.
            if !db_sync(sync, rules.get(name)) {
                return Ok(());
            }
            let Some(db) = cap.get(name) else {
                return Ok(());
            };
            if let Some(f) = db.staging_failure() {
                // Its last commits are not staged: no replica can be waited for.
                anyhow::bail!("{name}: commits are not being staged: {}", f.error);
            }
            let txid = db.stage.last().map_or(0, |h| h.txid);
            // A database excluded from replication (`replicate: false`) waits for nothing.
            for s in sh.iter().filter(|s| s.replicates(name)) {
                s.wait_shipped(&db, txid, SYNC_TIMEOUT)?;
            }
            Ok(())
        }));
    }

    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("sqlfs".into()),
        MountOption::Subtype("sqlfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    cfg.acl = if root {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(o.threads.max(1));
    cfg.clone_fd = true;
    let mount_err = |e: std::io::Error| {
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                " (permission denied: run as root, or allow user mounts with fusermount3)"
            }
            Some(libc::ENODEV) => " (the fuse kernel module is not loaded: `modprobe fuse`)",
            _ => "",
        };
        anyhow::anyhow!("cannot mount {}: {e}{hint}", dir.display())
    };
    // As root, mount(2) directly with type `fuse.sqlfs`; otherwise through fusermount3.
    let mut session = if root {
        let fd = mount_direct(&dir).map_err(mount_err)?;
        Session::from_fd(fs, fd, SessionACL::All, cfg.clone()).map_err(mount_err)?
    } else {
        Session::new(fs, &dir, &cfg).map_err(mount_err)?
    };

    let sock = crate::control::socket_path(&dir);
    if let Err(e) = crate::control::serve(
        &sock,
        backing.clone(),
        capture.clone(),
        shippers.clone(),
        o.stage_limit,
    ) {
        log::warn!(
            "control socket {} unavailable ({e}); `sqlfs verify` will need the mount stopped",
            sock.display()
        );
    }

    let mut ship_threads = Vec::new();
    for s in &shippers {
        ship_threads.extend(s.start()?);
    }
    if let Some(addr) = o.metrics_addr {
        crate::metrics::serve(
            addr,
            capture.clone(),
            shippers.clone(),
            Some(history.clone()),
            o.stage_limit,
        )
        .with_context(|| format!("--metrics-addr {addr}"))?;
        log::info!("metrics at http://{addr}/metrics");
    }
    upkeep::spawn(
        capture.clone(),
        shippers.clone(),
        o.stage_limit,
        stop.clone(),
        RETIRED_KEEP,
    )?;
    let mut unmounter = session.unmount_callable();
    let sig_dir = dir.clone();
    let unmounting = Arc::new(AtomicBool::new(false));
    let sig_unmounting = unmounting.clone();
    std::thread::Builder::new()
        .name("sqlfs-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: flushing staging and unmounting");
                sig_unmounting.store(true, Ordering::SeqCst);
                let r = if root {
                    unmount_direct(&sig_dir)
                } else {
                    unmounter.unmount()
                };
                if let Err(e) = r {
                    log::error!("unmount failed: {e}");
                }
            }
        })?;

    if !o.exclude.is_empty() {
        log::info!(
            "excluded from capture and shipping: {}",
            o.exclude.patterns().join(", ")
        );
    }
    // Databases nobody opens are found by the scan while the mount serves.
    let scan_stop = Arc::new(AtomicBool::new(false));
    let scan = capture.spawn_scan(scan_stop.clone())?;
    eprintln!(
        "sqlfs: serving {} (data in {}, {} databases known; scanning for the others)",
        dir.display(),
        data.display(),
        capture.databases().len() + capture.pending()
    );
    let res = ended_by_unmount(session.run(), &unmounting);
    // The scan finishes the file it is at (it stages nothing half-way) before shutdown.
    scan_stop.store(true, Ordering::Relaxed);
    let _ = scan.join();
    let staged = capture.shutdown();
    // The shippers make a last pass over what was staged before stopping.
    stop.store(true, Ordering::Relaxed);
    for s in &shippers {
        s.finish();
    }
    for t in ship_threads {
        let _ = t.join();
    }
    for s in &shippers {
        if let Some(e) = s.last_error() {
            log::error!("replica {}: the last shipment failed ({e}); what is staged is shipped at the next mount", s.describe());
        }
    }
    let _ = std::fs::remove_file(&sock);
    res.context("filesystem session ended with an error")?;
    if !staged {
        // The exit code tells the truth: the last state of a database is not staged.
        bail!(
            "unmounted {}, but the last state of a database could not be staged (see above); the next mount stages it",
            dir.display()
        );
    }
    log::info!("unmounted {}", dir.display());
    Ok(())
}

/// The session's result, where a connection the kernel aborted after our own unmount is a
/// normal end: once the mount is detached, the kernel may tear the connection down while a
/// serving thread still reads the device, and that read fails with `ECONNABORTED` instead of
/// `ENODEV`. An abort nobody asked for (a forced unmount, the connection's `abort` control
/// file) stays an error.
fn ended_by_unmount(res: std::io::Result<()>, unmounting: &AtomicBool) -> std::io::Result<()> {
    match res {
        Err(e)
            if e.raw_os_error() == Some(libc::ECONNABORTED)
                && unmounting.load(Ordering::SeqCst) =>
        {
            log::debug!("the kernel ended the connection after the unmount: {e}");
            Ok(())
        }
        r => r,
    }
}

/// Tunes the C allocator for a daemon that lives long and runs many threads.
///
/// * Two arenas. By default it gives each thread that allocates its own (up to eight per
///   core), and memory freed in one stays there: with a replica's shipping workers each
///   building objects, that alone doubled the daemon's resident memory.
/// * A fixed threshold above which a block is mapped on its own. By default the threshold
///   rises to the size of the largest mapped block freed so far, and the filesystem session
///   frees a 16 MiB request buffer right at its handshake: from then on every block below
///   16 MiB (the serving threads' own request buffers, segment readers, compression
///   buffers) came from the arenas, where what is freed stays resident between blocks still
///   in use. How much stayed depended on timing: with 10,000 databases the daemon's resident
///   memory was 62 MiB in some runs and 78 MiB in others, and 61 MiB in every run once the
///   threshold was fixed (docs/PERFORMANCE.md).
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before the daemon starts its threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Blocks at least this large are mapped on their own and unmapped when freed (see
/// [`tune_allocator`]). Below it: every buffer of a shipment of a small commit.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 4 << 20;

/// Raises the soft limit on open files to the hard one: each captured database keeps a
/// descriptor on its file, and each app's open file is one more here, so a mount of
/// thousands of databases needs more than the usual 1024.
fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                log::debug!("cannot raise the open-file limit");
            }
        }
    }
}

/// Mounts a FUSE filesystem of type `fuse.sqlfs` at `dir` with mount(2) and returns the
/// `/dev/fuse` handle serving it.
fn mount_direct(dir: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let dev: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?
        .into();
    let mode = std::fs::metadata(dir)?.mode() & libc::S_IFMT;
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let opts = format!(
        "fd={},rootmode={mode:o},user_id={uid},group_id={gid},default_permissions,allow_other",
        dev.as_raw_fd()
    );
    let c = |s: &[u8]| {
        CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (src, target, fstype, data) = (
        c(b"sqlfs")?,
        c(dir.as_os_str().as_bytes())?,
        c(b"fuse.sqlfs")?,
        c(opts.as_bytes())?,
    );
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // SAFETY: valid C strings; data is the option string the fuse module parses.
    if unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(dev)
}

/// Detaches the mount at `dir`; the session ends once the kernel lets go of it.
fn unmount_direct(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|p| p.exists())
    })
}
