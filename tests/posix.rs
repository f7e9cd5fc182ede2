//! The mount against hostile and unusual namespaces: processes racing renames, hard links
//! and absolute symbolic links into the mount must never hang it; a symbolic link swapped
//! under a file an unprivileged app works on must never steer the root daemon outside the
//! mount; and calls whose POSIX semantics are easy to get wrong through a path-based layer
//! (RENAME_EXCHANGE, UTIME_OMIT, calls on an open unlinked file, names that are not UTF-8,
//! O_TMPFILE) behave as on a native directory.
mod common;

use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errname(e: i32) -> String {
    let name = match e {
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EINVAL => "EINVAL",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        libc::EXDEV => "EXDEV",
        libc::EBADF => "EBADF",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

fn ret(r: libc::c_int) -> String {
    if r < 0 {
        errname(errno())
    } else {
        "ok".into()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Switches the calling (forked) process to uid/gid `NOBODY`, with raw system calls only.
/// Returns false if it could not.
unsafe fn become_nobody() -> bool {
    let g = NOBODY as libc::c_long;
    libc::syscall(
        libc::SYS_setgroups,
        0 as libc::c_long,
        std::ptr::null::<libc::gid_t>(),
    ) == 0
        && libc::syscall(libc::SYS_setresgid, g, g, g) == 0
        && libc::syscall(libc::SYS_setresuid, g, g, g) == 0
}

/// Monotonic seconds, with raw system calls only (for forked children).
fn mono_secs() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec
}

/// xorshift64*: allocation-free randomness for forked children.
fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Forks a child that runs `body` (raw system calls only: no allocation, no locks) and exits
/// with the code it returns.
fn fork_child(body: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the child only runs `body`, which makes raw system calls, then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = body();
        // SAFETY: leaves the child without running any destructor of the parent's state.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for child `pid`; its exit code (or 128 + signal).
fn reap(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

// ---------------------------------------------------------------------------------------
// (a) A multi-process namespace stress with absolute symbolic links into the mount
// ---------------------------------------------------------------------------------------

const DIRS: usize = 4;
const FILES: usize = 4;

/// Every path one stress child uses, made before the fork.
struct Names {
    dirs: Vec<CString>,
    files: Vec<Vec<CString>>,
    /// Absolute paths (through the mount point) of the same directories and files: the
    /// targets of the symbolic links.
    abs_dirs: Vec<CString>,
    abs_files: Vec<Vec<CString>>,
}

impl Names {
    fn new(mnt: &Path) -> Names {
        let rel_dir = |d: usize| format!("t/d{d}");
        let rel_file = |d: usize, f: usize| format!("t/d{d}/f{f}");
        Names {
            dirs: (0..DIRS).map(|d| cpath(&mnt.join(rel_dir(d)))).collect(),
            files: (0..DIRS)
                .map(|d| {
                    (0..FILES)
                        .map(|f| cpath(&mnt.join(rel_file(d, f))))
                        .collect()
                })
                .collect(),
            abs_dirs: (0..DIRS).map(|d| cpath(&mnt.join(rel_dir(d)))).collect(),
            abs_files: (0..DIRS)
                .map(|d| {
                    (0..FILES)
                        .map(|f| cpath(&mnt.join(rel_file(d, f))))
                        .collect()
                })
                .collect(),
        }
    }
}

/// One stress child: random namespace operations until `secs` have passed. Errors are the
/// point (the namespace changes under every call) and are ignored; only a hang matters.
fn stress_child(n: &Names, seed: u64, secs: i64) -> i32 {
    let mut x = seed | 1;
    let end = mono_secs() + secs;
    let buf = [b'x'; 512];
    while mono_secs() < end {
        let r = next(&mut x);
        let (d, d2) = ((r >> 8) as usize % DIRS, (r >> 16) as usize % DIRS);
        let (f, f2) = ((r >> 24) as usize % FILES, (r >> 32) as usize % FILES);
        let file = n.files[d][f].as_ptr();
        let dir = n.dirs[d].as_ptr();
        // SAFETY: raw system calls on valid C strings and buffers.
        unsafe {
            match r % 16 {
                0 => {
                    libc::mkdir(dir, 0o755);
                }
                1 | 2 => {
                    let fd = libc::open(file, libc::O_CREAT | libc::O_WRONLY, 0o644);
                    if fd >= 0 {
                        libc::write(fd, buf.as_ptr().cast(), (r >> 40) as usize % buf.len());
                        libc::close(fd);
                    }
                }
                3 => {
                    libc::rename(dir, n.dirs[d2].as_ptr());
                }
                4 => {
                    libc::rename(file, n.files[d2][f2].as_ptr());
                }
                5 => {
                    // An absolute link into the mount where a directory was.
                    libc::symlink(n.abs_dirs[d2].as_ptr(), dir);
                }
                6 => {
                    libc::symlink(n.abs_files[d2][f2].as_ptr(), file);
                }
                7 => {
                    libc::link(file, n.files[d2][f2].as_ptr());
                }
                8 => {
                    libc::chmod(file, if r & 1 == 0 { 0o600 } else { 0o644 });
                }
                9 => {
                    libc::truncate(file, (r >> 40) as i64 % 1024);
                }
                10 => {
                    let fd = libc::open(file, libc::O_RDWR | libc::O_NOFOLLOW);
                    if fd >= 0 {
                        libc::fchmod(fd, 0o640);
                        libc::ftruncate(fd, 7);
                        let mut st: libc::stat = std::mem::zeroed();
                        libc::fstat(fd, &mut st);
                        libc::close(fd);
                    }
                }
                11 => {
                    libc::unlink(file);
                }
                12 => {
                    libc::unlink(dir);
                    libc::rmdir(dir);
                }
                13 => {
                    let mut st: libc::stat = std::mem::zeroed();
                    libc::stat(file, &mut st);
                }
                14 => {
                    let fd = libc::open(file, libc::O_RDONLY);
                    if fd >= 0 {
                        let mut b = [0u8; 64];
                        libc::read(fd, b.as_mut_ptr().cast(), b.len());
                        libc::close(fd);
                    }
                }
                _ => {
                    let mut ts = [
                        libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_OMIT,
                        },
                        libc::timespec {
                            tv_sec: 1_000_000,
                            tv_nsec: 0,
                        },
                    ];
                    ts[1].tv_sec += (r >> 44) as i64 % 1000;
                    libc::utimensat(libc::AT_FDCWD, file, ts.as_ptr(), 0);
                }
            }
        }
    }
    0
}

/// Runs 4 stress children for `secs` against `fx`'s mount with a watchdog: if a stat through
/// the mount does not answer within 20 s the mount has hung; the daemon is killed (which
/// unblocks everyone) and the test fails.
fn namespace_stress(fx: &mut Fixture, secs: i64, seed: u64) {
    fs::create_dir_all(fx.path("t")).unwrap();
    for d in 0..DIRS {
        fs::create_dir_all(fx.path(&format!("t/d{d}"))).unwrap();
    }
    let names = Names::new(&fx.mnt);
    let probe = cpath(&fx.path("t"));
    let last_ok = Arc::new(AtomicU64::new(now_secs()));
    let stop = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (last_ok, stop) = (last_ok.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: valid C string and out-pointer.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                unsafe { libc::stat(probe.as_ptr(), &mut st) };
                last_ok.store(now_secs(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let pids: Vec<libc::pid_t> = (0..4u64)
        .map(|i| {
            let n = &names;
            fork_child(move || stress_child(n, seed.wrapping_add(i * 0x9e37_79b9), secs))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs as u64 + 60);
    let mut hung = false;
    loop {
        let mut running = 0;
        for &pid in &pids {
            // SAFETY: probing our own children without reaping them.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: si_pid of a filled siginfo.
            if r == 0 && unsafe { info.si_pid() } == 0 {
                running += 1;
            }
        }
        if running == 0 {
            break;
        }
        let stale = now_secs().saturating_sub(last_ok.load(Ordering::Relaxed));
        if stale > 20 || Instant::now() > deadline {
            hung = true;
            break;
        }
        sleep_ms(200);
    }
    if hung {
        // The daemon's own threads may be stuck on its mount, where SIGKILL cannot reach them:
        // abort the connection first (a forced unmount does), which unblocks everyone.
        eprintln!("the mount stopped answering; aborting it and killing the daemon");
        let c = cpath(&fx.mnt);
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_FORCE) };
        fx.kill9();
    }
    for pid in pids {
        reap(pid);
    }
    stop.store(true, Ordering::Relaxed);
    watchdog.join().unwrap();
    assert!(
        !hung,
        "the mount hung: a stat through it did not answer within 20 s while 4 processes renamed, linked and made absolute symbolic links into it"
    );
    // Still serving, and stops cleanly.
    assert!(fx.daemon_running(), "the daemon died during the stress");
    fs::write(fx.path("after"), b"still here").unwrap();
    assert_eq!(fs::read(fx.path("after")).unwrap(), b"still here");
}

#[test]
fn namespace_stress_in_place_never_hangs() {
    let seed = seed_for("namespace_stress_in_place_never_hangs");
    let mut fx = Fixture::new("nsstress", true);
    fx.mount();
    namespace_stress(&mut fx, 25, seed);
    fx.unmount();
}

/// An ioctl on a file in the mount (what `cp` tries for a reflink, `lsattr` for flags) is
/// answered ENOTTY, quietly: no file changes past capture, and the log stays clean.
#[test]
fn ioctls_are_refused_quietly() {
    let mut fx = Fixture::new("ioctl", true);
    fx.mount();
    fs::write(fx.path("f"), b"x").unwrap();
    let p = cpath(&fx.path("f"));
    // SAFETY: plain syscalls on a descriptor this test owns; FS_IOC_GETFLAGS writes one int.
    let (r, e) = unsafe {
        let fd = libc::open(p.as_ptr(), libc::O_RDONLY);
        assert!(fd >= 0, "open: {}", errname(errno()));
        let mut flags: libc::c_int = 0;
        let r = libc::ioctl(fd, 0x8008_6601, &mut flags);
        let e = errno();
        libc::close(fd);
        (r, e)
    };
    assert_eq!((r, errname(e)), (-1, errname(libc::ENOTTY)));
    fx.unmount();
    let log = fx.all_daemon_logs();
    assert!(!log.contains("Not Implemented"), "{log}");
}

// ---------------------------------------------------------------------------------------
// (b) A symbolic link swapped under a file an unprivileged app fchmods
// ---------------------------------------------------------------------------------------

#[test]
fn symlink_swap_never_reaches_outside_the_mount() {
    let mut fx = Fixture::new("swap", false);
    for d in [&fx.root, &fx.scratch, &fx.backing, &fx.mnt] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    // A root-owned 0644 file outside the mount.
    let victim = fx.scratch_path("victim");
    fs::write(&victim, b"root's").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
    fx.mount();
    fs::create_dir(fx.path("d")).unwrap();
    fs::set_permissions(fx.path("d"), fs::Permissions::from_mode(0o777)).unwrap();
    let f = cpath(&fx.path("d/f"));
    let tmp_link = cpath(&fx.path("d/l"));
    let tmp_file = cpath(&fx.path("d/r"));
    let target = cpath(&victim);
    let secs = 15;
    // Reports of the app: [opens, fchmods that worked, EIO].
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: pipe into a 2-element array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let app = fork_child(|| unsafe {
        libc::close(pipe[0]);
        if !become_nobody() {
            return 2;
        }
        let end = mono_secs() + secs;
        let mut counts = [0u64; 3];
        while mono_secs() < end {
            let fd = libc::open(f.as_ptr(), libc::O_RDONLY | libc::O_NOFOLLOW);
            if fd < 0 {
                if errno() == libc::EIO {
                    counts[2] += 1;
                }
                continue;
            }
            counts[0] += 1;
            if libc::fchmod(fd, 0o666) == 0 {
                counts[1] += 1;
            } else if errno() == libc::EIO {
                counts[2] += 1;
            }
            libc::close(fd);
        }
        libc::write(
            pipe[1],
            counts.as_ptr().cast(),
            std::mem::size_of_val(&counts),
        );
        0
    });
    let swapper = fork_child(|| unsafe {
        if !become_nobody() {
            return 2;
        }
        let end = mono_secs() + secs;
        let mut i = 0u64;
        while mono_secs() < end {
            i += 1;
            if i.is_multiple_of(2) {
                libc::symlink(target.as_ptr(), tmp_link.as_ptr());
                libc::rename(tmp_link.as_ptr(), f.as_ptr());
            } else {
                let fd = libc::open(tmp_file.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
                if fd >= 0 {
                    libc::close(fd);
                }
                libc::rename(tmp_file.as_ptr(), f.as_ptr());
            }
        }
        0
    });
    // SAFETY: parent side of the pipe.
    unsafe { libc::close(pipe[1]) };
    let mut rd = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut rd, &mut buf).unwrap();
    assert_eq!(
        reap(app),
        0,
        "the app child failed (could it become uid {NOBODY}?)"
    );
    assert_eq!(reap(swapper), 0, "the swapping child failed");
    let counts: Vec<u64> = buf
        .chunks(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    eprintln!(
        "opens {}, fchmods {}, EIO {}",
        counts[0], counts[1], counts[2]
    );
    let mode = fs::metadata(&victim).unwrap().mode() & 0o7777;
    assert_eq!(
        mode, 0o644,
        "the root daemon changed the mode of a file outside the mount to {mode:o}"
    );
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "the race never ran: {counts:?}"
    );
    assert_eq!(counts[2], 0, "the app got EIO {} times", counts[2]);
    fx.unmount();
}

// ---------------------------------------------------------------------------------------
// (c) POSIX cases beside a native directory
// ---------------------------------------------------------------------------------------

fn read_all(p: &Path) -> String {
    match fs::read(p) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("err {}", errname(e.raw_os_error().unwrap_or(0))),
    }
}

fn fstat_fmt(fd: libc::c_int, with_mtime: bool) -> String {
    // SAFETY: valid fd and out-pointer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return errname(errno());
    }
    let mut s = format!(
        "size={} nlink={} mode={:o}",
        st.st_size, st.st_nlink, st.st_mode
    );
    if with_mtime {
        s += &format!(" mtime={}", st.st_mtime);
    }
    s
}

fn times_of(p: &Path) -> String {
    match fs::symlink_metadata(p) {
        Ok(m) => format!(
            "atime={}.{} mtime={}.{}",
            m.atime(),
            m.atime_nsec(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(e) => format!("err {}", errname(e.raw_os_error().unwrap_or(0))),
    }
}

fn utimens(p: &Path, at: libc::timespec, mt: libc::timespec) -> String {
    let c = cpath(p);
    let ts = [at, mt];
    // SAFETY: valid C string and two timespecs.
    ret(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) })
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

fn omit() -> libc::timespec {
    ts(0, libc::UTIME_OMIT)
}

/// Sorted names in `dir`, with bytes that are not UTF-8 shown escaped.
fn names(dir: &Path) -> String {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| format!("{:?}", e.unwrap().file_name()))
        .filter(|n| n != "\".sqlfs\"" && n != "\".history\"")
        .collect();
    v.sort();
    v.join(",")
}

/// The POSIX cases, run under `root`; (label, outcome) pairs.
fn posix_ops(root: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |l: &str, r: String| out.push((l.to_string(), r));
    let p = |rel: &str| root.join(rel);

    // RENAME_EXCHANGE: both names, both contents, swapped; so are a file and a directory.
    fs::write(p("xa"), b"content of a").unwrap();
    fs::write(p("xb"), b"content of b, longer").unwrap();
    put("exchange: before a", read_all(&p("xa")));
    let (ca, cb) = (cpath(&p("xa")), cpath(&p("xb")));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    put("exchange: renameat2", ret(r));
    put("exchange: a", read_all(&p("xa")));
    put("exchange: b", read_all(&p("xb")));
    put(
        "exchange: sizes",
        format!(
            "{} {}",
            fs::metadata(p("xa")).unwrap().len(),
            fs::metadata(p("xb")).unwrap().len()
        ),
    );
    fs::write(p("xb"), b"rewritten b").unwrap();
    put("exchange: a after rewriting b", read_all(&p("xa")));
    put("exchange: b after rewriting b", read_all(&p("xb")));
    fs::create_dir(p("xdir")).unwrap();
    fs::write(p("xdir/inner"), b"inner").unwrap();
    let cd = cpath(&p("xdir"));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cd.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    put("exchange dir: renameat2", ret(r));
    put("exchange dir: xa/inner", read_all(&p("xa/inner")));
    put("exchange dir: xdir", read_all(&p("xdir")));
    put(
        "exchange dir: kinds",
        format!(
            "{} {}",
            fs::metadata(p("xa")).unwrap().is_dir(),
            fs::metadata(p("xdir")).unwrap().is_dir()
        ),
    );

    // UTIME_OMIT leaves that time as it is.
    fs::write(p("tm"), b"t").unwrap();
    put(
        "utime: set both",
        utimens(&p("tm"), ts(1_000_000, 5), ts(2_000_000, 7)),
    );
    put("utime: after both", times_of(&p("tm")));
    put(
        "utime: omit atime",
        utimens(&p("tm"), omit(), ts(3_000_000, 9)),
    );
    put("utime: after omit atime", times_of(&p("tm")));
    put(
        "utime: omit mtime",
        utimens(&p("tm"), ts(4_000_000, 11), omit()),
    );
    put("utime: after omit mtime", times_of(&p("tm")));
    put("utime: omit both", utimens(&p("tm"), omit(), omit()));
    put("utime: after omit both", times_of(&p("tm")));
    // As `touch -m` does: open for writing, then futimens with atime omitted. Opening must not
    // read the file behind the app's back (that would move atime on the backing file).
    put(
        "utime: set both again",
        utimens(&p("tm"), ts(1_000_000, 5), ts(2_000_000, 7)),
    );
    let ct = cpath(&p("tm"));
    // SAFETY: valid C string, our own fd, two timespecs.
    unsafe {
        let fd = libc::open(ct.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK);
        assert!(fd >= 0);
        let t = [omit(), ts(3_000_000, 0)];
        put(
            "utime: futimens omit atime",
            ret(libc::futimens(fd, t.as_ptr())),
        );
        libc::close(fd);
    }
    put("utime: after futimens omit atime", times_of(&p("tm")));

    // Calls on an open file that was unlinked act on that file.
    let cu = cpath(&p("gone"));
    // SAFETY: raw calls on a valid C string, buffers and our own fd.
    unsafe {
        let fd = libc::open(cu.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o644);
        assert!(fd >= 0);
        libc::write(fd, b"hello world".as_ptr().cast(), 11);
        put("unlinked: unlink", ret(libc::unlink(cu.as_ptr())));
        put("unlinked: fstat", fstat_fmt(fd, false));
        put("unlinked: ftruncate", ret(libc::ftruncate(fd, 5)));
        put("unlinked: fchmod", ret(libc::fchmod(fd, 0o600)));
        let t = [ts(5_000_000, 0), ts(6_000_000, 0)];
        put("unlinked: futimens", ret(libc::futimens(fd, t.as_ptr())));
        put("unlinked: fstat after", fstat_fmt(fd, true));
        put("unlinked: fsync", ret(libc::fsync(fd)));
        put("unlinked: fallocate", ret(libc::fallocate(fd, 0, 0, 4096)));
        let mut b = [0u8; 16];
        let n = libc::pread(fd, b.as_mut_ptr().cast(), 5, 0);
        put(
            "unlinked: pread",
            String::from_utf8_lossy(&b[..n.max(0) as usize]).into_owned(),
        );
        put("unlinked: name gone", read_all(&p("gone")));
        libc::close(fd);
    }
    // The same after a rename, with a new file under the old name.
    let (ch, ch2) = (cpath(&p("ren")), cpath(&p("ren2")));
    // SAFETY: as above.
    unsafe {
        let fd = libc::open(ch.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o644);
        assert!(fd >= 0);
        put(
            "renamed: rename",
            ret(libc::rename(ch.as_ptr(), ch2.as_ptr())),
        );
        fs::write(p("ren"), b"newcomer").unwrap();
        put("renamed: fchmod", ret(libc::fchmod(fd, 0o640)));
        put("renamed: ftruncate", ret(libc::ftruncate(fd, 3)));
        libc::close(fd);
    }
    let mode = |rel: &str| format!("{:o}", fs::metadata(p(rel)).unwrap().mode() & 0o7777);
    put("renamed: mode of the open file", mode("ren2"));
    put(
        "renamed: size of the open file",
        fs::metadata(p("ren2")).unwrap().len().to_string(),
    );
    put("renamed: mode of the newcomer", mode("ren"));
    put("renamed: newcomer", read_all(&p("ren")));

    // A file and a directory held by a descriptor (here `O_PATH`, as a process's working
    // directory would be) after their names went: they keep their own inode numbers, which
    // files made meanwhile never take, and are still seen as themselves.
    fs::create_dir(p("held-dir")).unwrap();
    fs::write(p("held-file"), b"held").unwrap();
    let (cd, cf) = (cpath(&p("held-dir")), cpath(&p("held-file")));
    // SAFETY: valid C strings; our own descriptors.
    let (hd, hf) = unsafe {
        (
            libc::open(cd.as_ptr(), libc::O_PATH),
            libc::open(cf.as_ptr(), libc::O_PATH),
        )
    };
    assert!(hd >= 0 && hf >= 0);
    let number = |fd| {
        // SAFETY: valid fd and out-pointer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
    };
    let numbers = (number(hd), number(hf));
    // SAFETY: a valid C string.
    put("held: rmdir", ret(unsafe { libc::rmdir(cd.as_ptr()) }));
    // SAFETY: a valid C string.
    put("held: unlink", ret(unsafe { libc::unlink(cf.as_ptr()) }));
    let mut taken = 0;
    for i in 0..64 {
        let (f, d) = (p(&format!("new-{i}")), p(&format!("newdir-{i}")));
        fs::write(&f, b"a newcomer").unwrap();
        fs::create_dir(&d).unwrap();
        for n in [&f, &d] {
            let ino = fs::symlink_metadata(n).unwrap().ino();
            taken += usize::from(Some(ino) == numbers.0 || Some(ino) == numbers.1);
        }
    }
    put("held: numbers taken by new files", taken.to_string());
    put("held: fstat of the directory", fstat_fmt(hd, false));
    put("held: fstat of the file", fstat_fmt(hf, false));
    // SAFETY: our own descriptors.
    unsafe {
        libc::close(hd);
        libc::close(hf);
    }
    for i in 0..64 {
        fs::remove_file(p(&format!("new-{i}"))).unwrap();
        fs::remove_dir(p(&format!("newdir-{i}"))).unwrap();
    }

    // Names that are not UTF-8.
    let bad = OsStr::from_bytes(b"caf\xe9.txt");
    let bad2 = OsStr::from_bytes(b"\xff\xfe-renamed");
    let bad_dir = OsStr::from_bytes(b"dir-\xc3\x28");
    put(
        "non-utf8: create",
        match fs::write(root.join(bad), b"latin-1 name") {
            Ok(()) => "ok".into(),
            Err(e) => format!("err {}", errname(e.raw_os_error().unwrap_or(0))),
        },
    );
    put("non-utf8: read", read_all(&root.join(bad)));
    put(
        "non-utf8: stat",
        fs::metadata(root.join(bad)).map_or_else(|e| format!("err {e}"), |m| m.len().to_string()),
    );
    put(
        "non-utf8: mkdir",
        fs::create_dir(root.join(bad_dir)).map_or_else(|e| format!("err {e}"), |_| "ok".into()),
    );
    put(
        "non-utf8: file in dir",
        fs::write(root.join(bad_dir).join(bad), b"nested").map_or_else(
            |e| format!("err {e}"),
            |_| read_all(&root.join(bad_dir).join(bad)),
        ),
    );
    put("non-utf8: listing", names(root));
    put(
        "non-utf8: rename",
        fs::rename(root.join(bad), root.join(bad2))
            .map_or_else(|e| format!("err {e}"), |_| "ok".into()),
    );
    put("non-utf8: read renamed", read_all(&root.join(bad2)));
    put(
        "non-utf8: symlink",
        std::os::unix::fs::symlink(bad2, root.join(bad))
            .map_or_else(|e| format!("err {e}"), |_| read_all(&root.join(bad))),
    );
    put(
        "non-utf8: readlink",
        fs::read_link(root.join(bad)).map_or_else(|e| format!("err {e}"), |t| format!("{t:?}")),
    );
    put(
        "non-utf8: unlink",
        fs::remove_file(root.join(bad2))
            .and_then(|_| fs::remove_file(root.join(bad)))
            .and_then(|_| fs::remove_file(root.join(bad_dir).join(bad)))
            .and_then(|_| fs::remove_dir(root.join(bad_dir)))
            .map_or_else(|e| format!("err {e}"), |_| "ok".into()),
    );
    put("non-utf8: listing after", names(root));
    out
}

fn compare(native: &[(String, String)], mounted: &[(String, String)]) {
    let mut diffs = Vec::new();
    for ((l, a), (_, b)) in native.iter().zip(mounted) {
        if a != b {
            diffs.push(format!("{l}: native {a:?}, mount {b:?}"));
        }
    }
    assert_eq!(native.len(), mounted.len());
    assert!(
        diffs.is_empty(),
        "differences from native:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn posix_cases_match_native() {
    let mut fx = Fixture::new("posix", false);
    let native = fx.scratch_path("native");
    fs::create_dir(&native).unwrap();
    fx.mount();
    let a = posix_ops(&native);
    let b = posix_ops(&fx.mnt);
    for (l, r) in &a {
        eprintln!("{l}: {r}");
    }
    compare(&a, &b);
    fx.unmount();
}

/// A SQLite database under a name that is not UTF-8 works through the mount; it is not
/// captured, and the log says so (once).
#[test]
fn database_with_non_utf8_name_is_served_and_named_in_the_log() {
    let mut fx = Fixture::new("nonutf8db", false);
    fx.mount();
    let name = OsStr::from_bytes(b"caf\xe9.db");
    let path = fx.mnt.join(name);
    {
        let c = open_db(&path);
        set_journal_mode(&c, "WAL");
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);")
            .unwrap();
        for i in 0..20 {
            c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
    }
    {
        let c = open_db(&path);
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 23);
        integrity_ok(&c);
    }
    fx.unmount();
    let log = fx.last_daemon_log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("caf\u{fffd}.db") && l.contains("NOT captured"))
        .count();
    assert_eq!(
        warnings, 1,
        "expected one warning naming the database; log:\n{log}"
    );
}

/// O_TMPFILE: not offered by the FUSE library sqlfs is built on (it has no FUSE_TMPFILE
/// request), so the kernel answers EOPNOTSUPP, cleanly, and applications fall back. Checked
/// beside native, where it works.
#[test]
fn o_tmpfile_fails_cleanly() {
    let mut fx = Fixture::new("tmpfile", false);
    let native = fx.scratch_path("native");
    fs::create_dir(&native).unwrap();
    fx.mount();
    let try_tmpfile = |dir: &Path| -> String {
        let c = cpath(dir);
        // SAFETY: valid C string; our own fd.
        unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600);
            if fd < 0 {
                return errname(errno());
            }
            libc::write(fd, b"tmp".as_ptr().cast(), 3);
            let proc = CString::new(format!("/proc/self/fd/{fd}")).unwrap();
            let dst = cpath(&dir.join("linked"));
            let r = libc::linkat(
                libc::AT_FDCWD,
                proc.as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            );
            libc::close(fd);
            format!(
                "linkat {} content {}",
                ret(r),
                read_all(&dir.join("linked"))
            )
        }
    };
    assert_eq!(try_tmpfile(&native), "linkat ok content tmp");
    let m = try_tmpfile(&fx.mnt);
    assert!(
        m == "linkat ok content tmp" || m == "EOPNOTSUPP",
        "O_TMPFILE in the mount: {m}"
    );
    fx.unmount();
}

/// Two databases swapped with RENAME_EXCHANGE keep their histories under their new names:
/// capture learns of the swap like a rename each way, so what is staged under each name
/// still replays to what the app sees there, before and after more commits and a restart.
#[test]
fn exchanged_databases_keep_their_histories() {
    let mut fx = Fixture::new("exchange-db", false);
    fx.mount();
    let mnt = fx.mnt.clone();
    let count = |name: &str| -> i64 {
        let c = open_db(&mnt.join(name));
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    };
    let insert = |name: &str, n: i64| {
        let c = open_db(&mnt.join(name));
        for i in 0..n {
            c.execute("INSERT INTO t VALUES (?1, randomblob(300))", [i])
                .unwrap();
        }
    };
    for (name, n) in [("a.db", 10), ("b.db", 20)] {
        let c = open_db(&fx.path(name));
        set_journal_mode(&c, "DELETE");
        c.execute_batch("CREATE TABLE t(x, b)").unwrap();
        drop(c);
        insert(name, n);
    }
    fx.assert_verify();
    let before_a = log_entries(&fx.mnt, "a.db");
    let before_b = log_entries(&fx.mnt, "b.db");
    let (a, b) = (cpath(&fx.path("a.db")), cpath(&fx.path("b.db")));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "renameat2: {}", errname(errno()));
    assert_eq!((count("a.db"), count("b.db")), (20, 10));
    fx.assert_verify();
    insert("a.db", 5);
    insert("b.db", 7);
    assert_eq!((count("a.db"), count("b.db")), (25, 17));
    fx.assert_verify();
    // Each name's staged history is the other's, continued without a snapshot.
    for (name, was) in [("a.db", &before_b), ("b.db", &before_a)] {
        let now = log_entries(&fx.mnt, name);
        assert!(
            now.len() > was.len(),
            "{name}: nothing staged after the exchange"
        );
        for (x, y) in was.iter().zip(&now) {
            assert_eq!(
                x.line, y.line,
                "{name}: its history is not the one it was swapped with"
            );
        }
        assert!(
            now[was.len()..]
                .iter()
                .all(|e| !e.line.contains("kind=snapshot")),
            "{name}: a snapshot after the exchange: the history was not followed"
        );
        assert_gap_free(&now, name);
    }
    fx.remount();
    assert_eq!((count("a.db"), count("b.db")), (25, 17));
    fx.assert_verify();
    fx.unmount();
}
