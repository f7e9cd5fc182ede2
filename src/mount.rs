//! `sqlfs mount`: opens the backing directory, recovers each database (hot journals, staging
//! reconciliation), mounts, serves until SIGINT/SIGTERM, then flushes staging and unmounts.
//!
//! Threads: fuser request loops (`--threads`), one background thread that syncs staging and
//! folds it when it grows past `--stage-limit`, the control socket, and the signal watcher.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fuser::{Config, MountOption, Session, SessionACL};

use crate::backing::{Backing, META_DIR};
use crate::capture::Capture;
use crate::fs::SqlFs;

/// How long the staged history of a deleted database is kept.
const RETIRED_KEEP: Duration = Duration::from_secs(24 * 3600);

pub struct MountOpts {
    pub dir: PathBuf,
    pub data_dir: Option<PathBuf>,
    pub threads: usize,
    pub stage_limit: u64,
    pub replicas: Vec<String>,
    pub sync_interval: Duration,
    pub age_recipients: Vec<String>,
    /// The app's fsync of a database file returns only once its transactions are on every
    /// replica.
    pub sync: bool,
}

/// How long a `--sync` fsync waits for the replicas before failing the app's fsync.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Staging may grow to this many times `--stage-limit` for a lagging replica before it is
/// folded anyway (that replica then gets a snapshot when it comes back).
const STAGE_HARD_FACTOR: u64 = 4;

/// Opens the replicas to ship to: those given, or the embedded default directory.
fn open_replicas(urls: &[String]) -> Result<Vec<Box<dyn crate::replica::ReplicaClient>>> {
    if urls.is_empty() {
        let dir = crate::replica::default_dir();
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create the default replica directory {}",
                dir.display()
            )
        })?;
        log::warn!(
            "no --replica given: shipping to the default local replica {} — it does not protect against losing this machine; add --replica file:///other/disk (or object storage, when available)",
            dir.display()
        );
        return Ok(vec![Box::new(crate::replica::FileReplica::new(dir))]);
    }
    urls.iter()
        .map(|u| crate::replica::open(u).map_err(anyhow::Error::from))
        .collect()
}

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

/// Rolls back hot journals left by crashed apps, before anything reads the databases: the
/// stream must never contain a half-written transaction.
fn rollback_hot_journals(b: &Backing, rel: &str, depth: usize) {
    if depth > 64 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(b.path(rel)) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if rel.is_empty() && name == META_DIR {
            continue;
        }
        let child = crate::backing::join(rel, &name);
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            rollback_hot_journals(b, &child, depth + 1);
        } else if let Some(db) = child.strip_suffix("-journal") {
            let mut m = [0u8; 8];
            let hot = matches!(b.open_read(&child), Ok(Some(f)) if crate::capture::read_exact_at(&f, &mut m, 0).unwrap_or(false))
                && m == crate::sqlite::JOURNAL_MAGIC;
            if hot && b.exists(db) {
                log::warn!("{db}: rolling back a hot journal left by a crashed writer");
                let r = rusqlite::Connection::open(b.path(db))
                    .and_then(|c| c.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0)));
                if let Err(e) = r {
                    log::error!("{db}: hot journal rollback failed: {e}");
                }
            }
        }
    }
}

pub fn run(o: MountOpts) -> Result<()> {
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
    if !Path::new("/dev/fuse").exists() {
        bail!("FUSE is unavailable: /dev/fuse is missing (load the module with `modprobe fuse`; in a container, pass the device /dev/fuse and CAP_SYS_ADMIN)");
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && which("fusermount3").is_none() {
        bail!("mounting as a regular user needs fusermount3: install the `fuse3` package (or run as root)");
    }

    let replicas = open_replicas(&o.replicas)?;
    let sealer = crate::crypt::Sealer::new(&o.age_recipients)?.map(Arc::new);
    let backing = Arc::new(
        Backing::open(&data)
            .with_context(|| format!("cannot open data directory {}", data.display()))?,
    );
    rollback_hot_journals(&backing, "", 0);
    let capture = Arc::new(
        Capture::open(backing.clone())
            .with_context(|| format!("cannot open staging in {}/{META_DIR}", data.display()))?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let shippers: Vec<Arc<crate::ship::Shipper>> = replicas
        .into_iter()
        .map(|c| crate::ship::Shipper::new(c, capture.clone(), sealer.clone()))
        .collect();
    let mut fs =
        SqlFs::new(backing.clone(), capture.clone()).context("cannot read the data directory")?;
    if o.sync {
        let (cap, sh) = (capture.clone(), shippers.clone());
        fs = fs.with_durability(Box::new(move |rel: &str| {
            let Some(db) = cap.get(crate::capture::classify(rel).1) else {
                return Ok(());
            };
            let txid = db.stage.last().map_or(0, |h| h.txid);
            for s in &sh {
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
    if let Err(e) = crate::control::serve(&sock, backing.clone(), capture.clone(), shippers.clone())
    {
        log::warn!(
            "control socket {} unavailable ({e}); `sqlfs verify` will need the mount stopped",
            sock.display()
        );
    }

    let mut ship_threads = Vec::new();
    for s in &shippers {
        ship_threads.push(s.spawn(o.sync_interval, stop.clone())?);
    }
    {
        let (cap, stop) = (capture.clone(), stop.clone());
        let limit = o.stage_limit;
        let shippers = shippers.clone();
        std::thread::Builder::new()
            .name("sqlfs-stage".into())
            .spawn(move || {
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(500));
                    cap.sync_all();
                    tick += 1;
                    if tick % 120 == 1 {
                        cap.expire_retired(RETIRED_KEEP);
                    }
                    for (name, db) in cap.databases() {
                        let bytes = db.stage.log_bytes();
                        if bytes > limit {
                            // Fold only what every replica has, unless staging outgrows its
                            // hard limit: then say so, and the lagging replica gets a snapshot.
                            let shipped = shippers.iter().map(|s| s.position(&db)).min().unwrap_or(u64::MAX);
                            let upto = if bytes > limit * STAGE_HARD_FACTOR {
                                if shipped < db.stage.last().map_or(0, |h| h.txid) {
                                    log::error!("{name}: a replica is behind and staging holds {} MiB (over {}x --stage-limit); folding anyway, that replica will get a snapshot", bytes >> 20, STAGE_HARD_FACTOR);
                                }
                                u64::MAX
                            } else {
                                shipped
                            };
                            match db.stage.fold(upto) {
                                Ok(n) if n > 0 => log::info!(
                                    "{name}: folded {n} bytes of staged log into the local base"
                                ),
                                Ok(_) => {}
                                Err(e) => log::error!("{name}: cannot fold staging: {e}"),
                            }
                        }
                    }
                }
            })?;
    }
    let mut unmounter = session.unmount_callable();
    let sig_dir = dir.clone();
    std::thread::Builder::new()
        .name("sqlfs-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: flushing staging and unmounting");
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

    eprintln!(
        "sqlfs: serving {} (data in {}, {} databases known)",
        dir.display(),
        data.display(),
        capture.databases().len()
    );
    let res = session.run();
    capture.shutdown();
    // The shippers make a last pass over what was staged before stopping.
    stop.store(true, Ordering::Relaxed);
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
    log::info!("unmounted {}", dir.display());
    Ok(())
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
