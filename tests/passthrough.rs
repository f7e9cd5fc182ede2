//! Pass-through conformance: the same sequence of file-system operations is run in a
//! native directory and in the mount, and every result (return value or errno, contents,
//! mode, sizes, owners, times that were set explicitly) must be the same. Also: files
//! present before a mount are visible, the staging directory is not, fcntl locks work
//! across processes, and a WAL database is shared by two processes (shm mmap).
mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::workload::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

#[test]
fn worker_entry() {
    worker_main();
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errstr(e: i32) -> String {
    let name = match e {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EISDIR => "EISDIR",
        libc::ENOTDIR => "ENOTDIR",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EINVAL => "EINVAL",
        libc::ENODATA => "ENODATA",
        libc::ERANGE => "ERANGE",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOSYS => "ENOSYS",
        libc::EAGAIN => "EAGAIN",
        libc::EXDEV => "EXDEV",
        libc::EBADF => "EBADF",
        libc::EIO => "EIO",
        _ => "",
    };
    format!("err {e} {name}")
}

/// A syscall's int result.
fn ret(r: libc::c_int) -> String {
    if r < 0 {
        errstr(errno())
    } else {
        format!("ok {r}")
    }
}

fn ret_sz(r: isize) -> String {
    if r < 0 {
        errstr(errno())
    } else {
        format!("ok {r}")
    }
}

/// An fd result: "ok" without the number; the fd is closed.
fn ret_fd_close(fd: libc::c_int) -> String {
    if fd < 0 {
        errstr(errno())
    } else {
        // SAFETY: our own fd.
        unsafe { libc::close(fd) };
        "ok".into()
    }
}

fn stat_fmt(st: &libc::stat) -> String {
    format!(
        "mode={:o} nlink={} uid={} gid={} size={}",
        st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size
    )
}

fn stat_of(p: &CString, follow: bool) -> String {
    // SAFETY: stat into a zeroed buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let r = if follow {
            libc::stat(p.as_ptr(), &mut st)
        } else {
            libc::lstat(p.as_ptr(), &mut st)
        };
        if r < 0 {
            errstr(errno())
        } else {
            stat_fmt(&st)
        }
    }
}

fn times_of(p: &CString, follow: bool) -> String {
    // SAFETY: stat into a zeroed buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let r = if follow {
            libc::stat(p.as_ptr(), &mut st)
        } else {
            libc::lstat(p.as_ptr(), &mut st)
        };
        if r < 0 {
            errstr(errno())
        } else {
            format!(
                "atime={}.{:09} mtime={}.{:09}",
                st.st_atime, st.st_atime_nsec, st.st_mtime, st.st_mtime_nsec
            )
        }
    }
}

fn fstat_of(fd: libc::c_int) -> String {
    // SAFETY: fstat into a zeroed buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) < 0 {
            errstr(errno())
        } else {
            stat_fmt(&st)
        }
    }
}

fn fstat_blocks(fd: libc::c_int) -> String {
    // SAFETY: fstat into a zeroed buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) < 0 {
            errstr(errno())
        } else {
            format!("size={} blocks={}", st.st_size, st.st_blocks)
        }
    }
}

fn digest(b: &[u8]) -> String {
    let head: String = b.iter().take(16).map(|c| format!("{c:02x}")).collect();
    format!("len={} crc={:016x} head={head}", b.len(), CRC64.checksum(b))
}

fn pread_of(fd: libc::c_int, off: i64, len: usize) -> String {
    let mut buf = vec![0u8; len];
    // SAFETY: buffer of len bytes.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr() as *mut _, len, off) };
    if n < 0 {
        errstr(errno())
    } else {
        digest(&buf[..n as usize])
    }
}

fn read_file(p: &CString) -> String {
    // SAFETY: plain open/read/close.
    unsafe {
        let fd = libc::open(p.as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return errstr(errno());
        }
        let mut all = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr() as *mut _, buf.len());
            if n < 0 {
                let e = errstr(errno());
                libc::close(fd);
                return e;
            }
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n as usize]);
        }
        libc::close(fd);
        digest(&all)
    }
}

fn pwrite_all(fd: libc::c_int, data: &[u8], off: i64) -> String {
    // SAFETY: data is valid for its length.
    ret_sz(unsafe { libc::pwrite(fd, data.as_ptr() as *const _, data.len(), off) })
}

fn listing(dir: &Path) -> String {
    match fs::read_dir(dir) {
        Ok(rd) => {
            // `.history` (the virtual history views at a mount's root) has no native twin.
            let mut v: Vec<String> = rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".history")
                .collect();
            v.sort();
            v.join(",")
        }
        Err(e) => format!("err {e}"),
    }
}

fn xattr_get(p: &CString, name: &str, size: usize) -> String {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    // SAFETY: buffer of `size` bytes (null when 0).
    let r = unsafe {
        libc::getxattr(
            p.as_ptr(),
            n.as_ptr(),
            if size == 0 {
                std::ptr::null_mut()
            } else {
                buf.as_mut_ptr() as *mut _
            },
            size,
        )
    };
    if r < 0 {
        errstr(errno())
    } else if size == 0 {
        format!("size {r}")
    } else {
        format!("ok {:?}", String::from_utf8_lossy(&buf[..r as usize]))
    }
}

fn xattr_set(p: &CString, name: &str, val: &str, flags: libc::c_int, follow: bool) -> String {
    let n = CString::new(name).unwrap();
    // SAFETY: valid pointers and lengths.
    ret(unsafe {
        if follow {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                val.as_ptr() as *const _,
                val.len(),
                flags,
            )
        } else {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                val.as_ptr() as *const _,
                val.len(),
                flags,
            )
        }
    })
}

fn xattr_list(p: &CString) -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: buffer of 4096 bytes.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) };
    if r < 0 {
        return errstr(errno());
    }
    let mut names: Vec<String> = buf[..r as usize]
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .filter(|s| s.starts_with("user.") || s.starts_with("trusted."))
        .collect();
    names.sort();
    names.join(",")
}

fn xattr_remove(p: &CString, name: &str) -> String {
    let n = CString::new(name).unwrap();
    // SAFETY: valid strings.
    ret(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })
}

fn utimens(p: &CString, at: (i64, i64), mt: (i64, i64), flags: libc::c_int) -> String {
    let ts = [
        libc::timespec {
            tv_sec: at.0 as libc::time_t,
            tv_nsec: at.1 as _,
        },
        libc::timespec {
            tv_sec: mt.0 as libc::time_t,
            tv_nsec: mt.1 as _,
        },
    ];
    // SAFETY: two valid timespecs.
    ret(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), flags) })
}

fn readlink_of(p: &CString) -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: buffer of 4096 bytes.
    let r = unsafe { libc::readlink(p.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) };
    if r < 0 {
        errstr(errno())
    } else {
        format!("ok {:?}", String::from_utf8_lossy(&buf[..r as usize]))
    }
}

/// The operation sequence; every step is recorded as (description, result).
fn run_ops(root: &Path, seed: u64) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let p = |rel: &str| cpath(&root.join(rel));
    let mut rng = StdRng::seed_from_u64(seed);
    macro_rules! rec {
        ($name:expr, $val:expr) => {{
            let v: String = $val;
            out.push(($name.to_string(), v));
        }};
    }
    // SAFETY (whole block): plain system calls on paths and fds owned by this function.
    unsafe {
        // Directories.
        rec!("mkdir d", ret(libc::mkdir(p("d").as_ptr(), 0o755)));
        rec!("mkdir d again", ret(libc::mkdir(p("d").as_ptr(), 0o755)));
        rec!("mkdir d/sub", ret(libc::mkdir(p("d/sub").as_ptr(), 0o700)));
        rec!(
            "mkdir missing/x",
            ret(libc::mkdir(p("missing/x").as_ptr(), 0o755))
        );
        rec!("stat d", stat_of(&p("d"), true));
        rec!("stat d/sub", stat_of(&p("d/sub"), true));

        // Create, write, pwrite, read.
        let fd = libc::open(
            p("f1").as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
            0o644,
        );
        rec!(
            "create f1",
            if fd < 0 { errstr(errno()) } else { "ok".into() }
        );
        rec!(
            "create f1 O_EXCL again",
            ret_fd_close(libc::open(
                p("f1").as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                0o644
            ))
        );
        rec!(
            "write hello",
            ret_sz(libc::write(fd, b"hello world".as_ptr() as *const _, 11))
        );
        rec!("pwrite @100", pwrite_all(fd, b"XYZ", 100));
        rec!("fstat f1", fstat_of(fd));
        rec!("pread 0..200", pread_of(fd, 0, 200));
        rec!(
            "pwrite @1MiB+3",
            pwrite_all(fd, b"tail-bytes", (1 << 20) + 3)
        );
        rec!("fstat f1 sparse", fstat_of(fd));
        rec!("pread around 1MiB", pread_of(fd, (1 << 20) - 5, 40));
        rec!("pread past EOF", pread_of(fd, 5 << 20, 10));
        rec!(
            "lseek SEEK_END",
            format!("{}", libc::lseek(fd, 0, libc::SEEK_END))
        );
        rec!("ftruncate 50", ret(libc::ftruncate(fd, 50)));
        rec!("fstat after ftruncate", fstat_of(fd));
        rec!("pread after ftruncate", pread_of(fd, 0, 200));
        rec!(
            "truncate path 5000",
            ret(libc::truncate(p("f1").as_ptr(), 5000))
        );
        rec!("fstat after truncate", fstat_of(fd));
        rec!("pread 40..120", pread_of(fd, 40, 80));
        // fallocate, keep-size, punch hole.
        rec!("fallocate 0..65536", ret(libc::fallocate(fd, 0, 0, 65536)));
        rec!("fstat after fallocate", fstat_of(fd));
        rec!(
            "fallocate KEEP_SIZE",
            ret(libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 65536, 65536))
        );
        rec!("fstat after KEEP_SIZE", fstat_of(fd));
        rec!("fill 64K", pwrite_all(fd, &vec![0xabu8; 65536], 0));
        rec!(
            "punch hole",
            ret(libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                4096,
                8192
            ))
        );
        rec!("pread after punch", pread_of(fd, 0, 65536));
        rec!("pread hole", pread_of(fd, 4096, 16));
        rec!("fsync", ret(libc::fsync(fd)));
        rec!("fdatasync", ret(libc::fdatasync(fd)));
        rec!("blocks after fsync", fstat_blocks(fd));
        rec!("fchmod 0604", ret(libc::fchmod(fd, 0o604)));
        rec!("fstat after fchmod", fstat_of(fd));
        libc::close(fd);

        // A few MB of random data in odd-sized writes, read back.
        let mut data = vec![0u8; 3 << 20];
        rng.fill_bytes(&mut data);
        let fd = libc::open(p("big").as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
        let mut off = 0usize;
        let mut ok = true;
        while off < data.len() {
            let n = rng.random_range(1..200_000).min(data.len() - off);
            let w = libc::pwrite(fd, data[off..].as_ptr() as *const _, n, 12345 + off as i64);
            ok &= w == n as isize;
            off += n;
        }
        libc::close(fd);
        rec!("big writes", format!("{ok}"));
        rec!("big read back", read_file(&p("big")));
        rec!("stat big", stat_of(&p("big"), true));

        // Shared writable mmap.
        let fd = libc::open(p("mapped").as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o644);
        rec!("ftruncate mapped", ret(libc::ftruncate(fd, 8192)));
        let m = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if m == libc::MAP_FAILED {
            rec!("mmap", errstr(errno()));
        } else {
            std::ptr::copy_nonoverlapping(b"mmapped!".as_ptr(), (m as *mut u8).add(4096), 8);
            rec!("msync", ret(libc::msync(m, 8192, libc::MS_SYNC)));
            libc::munmap(m, 8192);
            rec!("pread mmapped", pread_of(fd, 4090, 20));
        }
        libc::close(fd);

        // Error cases of open.
        rec!(
            "open missing",
            ret_fd_close(libc::open(p("missing").as_ptr(), libc::O_RDONLY))
        );
        rec!(
            "open dir O_WRONLY",
            ret_fd_close(libc::open(p("d").as_ptr(), libc::O_WRONLY))
        );
        rec!(
            "open f1/x",
            ret_fd_close(libc::open(p("f1/x").as_ptr(), libc::O_RDONLY))
        );
        rec!(
            "open d O_DIRECTORY",
            ret_fd_close(libc::open(
                p("d").as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY
            ))
        );
        rec!(
            "open f1 O_DIRECTORY",
            ret_fd_close(libc::open(
                p("f1").as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY
            ))
        );

        // O_APPEND and O_TRUNC.
        let fd = libc::open(
            p("f2").as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_APPEND,
            0o600,
        );
        rec!(
            "append a",
            ret_sz(libc::write(fd, b"a".as_ptr() as *const _, 1))
        );
        rec!(
            "append bc",
            ret_sz(libc::write(fd, b"bc".as_ptr() as *const _, 2))
        );
        rec!("pwrite with O_APPEND", pwrite_all(fd, b"Z", 0));
        libc::close(fd);
        rec!("read f2", read_file(&p("f2")));
        rec!(
            "open O_TRUNC",
            ret_fd_close(libc::open(p("f2").as_ptr(), libc::O_WRONLY | libc::O_TRUNC))
        );
        rec!("stat f2 truncated", stat_of(&p("f2"), true));

        // rename.
        fs_write(&root.join("f2"), b"three");
        rec!(
            "rename f2 f3",
            ret(libc::rename(p("f2").as_ptr(), p("f3").as_ptr()))
        );
        rec!("stat f2 after rename", stat_of(&p("f2"), true));
        rec!("read f3", read_file(&p("f3")));
        fs_write(&root.join("f4"), b"four");
        rec!(
            "rename f3 over f4",
            ret(libc::rename(p("f3").as_ptr(), p("f4").as_ptr()))
        );
        rec!("read f4", read_file(&p("f4")));
        rec!("stat f3", stat_of(&p("f3"), true));
        rec!(
            "rename missing",
            ret(libc::rename(p("missing").as_ptr(), p("x").as_ptr()))
        );
        rec!(
            "rename d into itself",
            ret(libc::rename(p("d").as_ptr(), p("d/sub/x").as_ptr()))
        );
        rec!("mkdir e", ret(libc::mkdir(p("e").as_ptr(), 0o755)));
        fs_write(&root.join("e/file"), b"e");
        rec!(
            "rename d over non-empty e",
            ret(libc::rename(p("d").as_ptr(), p("e").as_ptr()))
        );
        rec!(
            "rename file over dir",
            ret(libc::rename(p("f4").as_ptr(), p("d").as_ptr()))
        );
        rec!(
            "rename dir over file",
            ret(libc::rename(p("d").as_ptr(), p("f4").as_ptr()))
        );
        rec!("mkdir empty", ret(libc::mkdir(p("empty").as_ptr(), 0o755)));
        rec!(
            "rename dir over empty dir",
            ret(libc::rename(p("d/sub").as_ptr(), p("empty").as_ptr()))
        );
        rec!("stat empty (was d/sub)", stat_of(&p("empty"), true));
        rec!(
            "renameat2 NOREPLACE onto existing",
            ret(libc::renameat2(
                libc::AT_FDCWD,
                p("f4").as_ptr(),
                libc::AT_FDCWD,
                p("f1").as_ptr(),
                libc::RENAME_NOREPLACE
            ))
        );
        rec!(
            "renameat2 NOREPLACE",
            ret(libc::renameat2(
                libc::AT_FDCWD,
                p("f4").as_ptr(),
                libc::AT_FDCWD,
                p("f5").as_ptr(),
                libc::RENAME_NOREPLACE
            ))
        );
        rec!(
            "rename onto itself",
            ret(libc::rename(p("f5").as_ptr(), p("f5").as_ptr()))
        );
        rec!(
            "rename into subdir",
            ret(libc::rename(p("f5").as_ptr(), p("e/f5").as_ptr()))
        );
        rec!("read e/f5", read_file(&p("e/f5")));

        // unlink / rmdir.
        rec!("unlink e/f5", ret(libc::unlink(p("e/f5").as_ptr())));
        rec!("unlink e/f5 again", ret(libc::unlink(p("e/f5").as_ptr())));
        rec!("unlink dir", ret(libc::unlink(p("d").as_ptr())));
        rec!("rmdir non-empty", ret(libc::rmdir(p("e").as_ptr())));
        rec!("rmdir file", ret(libc::rmdir(p("f1").as_ptr())));
        rec!("unlink e/file", ret(libc::unlink(p("e/file").as_ptr())));
        rec!("rmdir e", ret(libc::rmdir(p("e").as_ptr())));
        rec!("rmdir e again", ret(libc::rmdir(p("e").as_ptr())));
        // An unlinked file stays readable through an open fd.
        let fd = libc::open(p("big").as_ptr(), libc::O_RDONLY);
        rec!("unlink open file", ret(libc::unlink(p("big").as_ptr())));
        rec!("read unlinked open file", pread_of(fd, 12345, 100));
        libc::close(fd);

        // Symlinks.
        let f1 = CString::new("f1").unwrap();
        rec!(
            "symlink l1 -> f1",
            ret(libc::symlink(f1.as_ptr(), p("l1").as_ptr()))
        );
        rec!(
            "symlink l1 again",
            ret(libc::symlink(f1.as_ptr(), p("l1").as_ptr()))
        );
        rec!("readlink l1", readlink_of(&p("l1")));
        rec!("lstat l1", stat_of(&p("l1"), false));
        rec!("stat l1", stat_of(&p("l1"), true));
        rec!("readlink f1", readlink_of(&p("f1")));
        let nowhere = CString::new("nowhere").unwrap();
        rec!(
            "symlink dangling",
            ret(libc::symlink(nowhere.as_ptr(), p("l2").as_ptr()))
        );
        rec!("stat dangling", stat_of(&p("l2"), true));
        rec!(
            "create through dangling symlink",
            ret_fd_close(libc::open(
                p("l2").as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o640
            ))
        );
        rec!("stat nowhere", stat_of(&p("nowhere"), true));
        rec!(
            "O_CREAT|O_EXCL on symlink",
            ret_fd_close(libc::open(
                p("l1").as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                0o600
            ))
        );
        rec!(
            "open O_NOFOLLOW symlink",
            ret_fd_close(libc::open(
                p("l1").as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW
            ))
        );
        let long = CString::new("x".repeat(300) + "/target").unwrap();
        rec!(
            "symlink long target",
            ret(libc::symlink(long.as_ptr(), p("l3").as_ptr()))
        );
        rec!("readlink long", readlink_of(&p("l3")));

        // Hard links.
        rec!(
            "link f1 h1",
            ret(libc::link(p("f1").as_ptr(), p("h1").as_ptr()))
        );
        rec!("stat f1 nlink", stat_of(&p("f1"), true));
        let fd = libc::open(p("h1").as_ptr(), libc::O_WRONLY);
        rec!("write via h1", pwrite_all(fd, b"via-h1", 0));
        libc::close(fd);
        rec!("read f1", read_file(&p("f1")));
        rec!("unlink f1", ret(libc::unlink(p("f1").as_ptr())));
        rec!("stat h1 nlink", stat_of(&p("h1"), true));
        rec!("read h1 after unlinking f1", read_file(&p("h1")));
        rec!(
            "link h1 back to f1",
            ret(libc::link(p("h1").as_ptr(), p("f1").as_ptr()))
        );
        rec!("stat f1 relinked", stat_of(&p("f1"), true));
        rec!(
            "link dir",
            ret(libc::link(p("d").as_ptr(), p("d2").as_ptr()))
        );
        rec!(
            "link missing",
            ret(libc::link(p("missing").as_ptr(), p("x").as_ptr()))
        );
        rec!(
            "link onto existing",
            ret(libc::link(p("h1").as_ptr(), p("nowhere").as_ptr()))
        );
        rec!("stat l1 (points at f1 again)", stat_of(&p("l1"), true));

        // chmod / chown, on a file of its own so a hard-link problem above stays separate.
        fs_write(&root.join("attrs"), b"attributes");
        let h1 = p("attrs");
        rec!("chmod 0600", ret(libc::chmod(h1.as_ptr(), 0o600)));
        rec!("stat 0600", stat_of(&h1, true));
        rec!("chmod 04755", ret(libc::chmod(h1.as_ptr(), 0o4755)));
        rec!("stat 04755", stat_of(&h1, true));
        rec!("chmod 0640", ret(libc::chmod(h1.as_ptr(), 0o640)));
        rec!(
            "chmod missing",
            ret(libc::chmod(p("missing").as_ptr(), 0o640))
        );
        rec!("chown 1234:5678", ret(libc::chown(h1.as_ptr(), 1234, 5678)));
        rec!("stat chown", stat_of(&h1, true));
        rec!("chown -1:42", ret(libc::chown(h1.as_ptr(), u32::MAX, 42)));
        rec!("stat chown gid", stat_of(&h1, true));
        rec!(
            "lchown symlink",
            ret(libc::lchown(p("l3").as_ptr(), 77, 88))
        );
        rec!("lstat lchown", stat_of(&p("l3"), false));
        rec!("chown dir", ret(libc::chown(p("d").as_ptr(), 4321, 8765)));
        rec!("stat dir chown", stat_of(&p("d"), true));

        // Times.
        rec!(
            "utimensat",
            utimens(
                &h1,
                (1_000_000_000, 123_456_789),
                (1_200_000_000, 987_654_321),
                0
            )
        );
        rec!("times", times_of(&h1, true));
        rec!(
            "utimensat omit atime",
            utimens(&h1, (0, libc::UTIME_OMIT), (1_300_000_000, 5), 0)
        );
        rec!("times omit", times_of(&h1, true));
        rec!(
            "utimensat NOFOLLOW",
            utimens(
                &p("l3"),
                (1_100_000_000, 1),
                (1_100_000_000, 2),
                libc::AT_SYMLINK_NOFOLLOW
            )
        );
        rec!("lstat times", times_of(&p("l3"), false));
        rec!(
            "utimensat dir",
            utimens(&p("d"), (1_000_000_001, 0), (1_000_000_002, 0), 0)
        );
        rec!("times dir", times_of(&p("d"), true));

        // Special files.
        rec!("mkfifo", ret(libc::mkfifo(p("fifo").as_ptr(), 0o644)));
        rec!("stat fifo", stat_of(&p("fifo"), false));

        // Extended attributes.
        rec!("setxattr user.a", xattr_set(&h1, "user.a", "1", 0, true));
        rec!("getxattr user.a", xattr_get(&h1, "user.a", 64));
        rec!("getxattr size query", xattr_get(&h1, "user.a", 0));
        rec!(
            "setxattr user.long",
            xattr_set(&h1, "user.long", "0123456789", 0, true)
        );
        rec!("getxattr small buffer", xattr_get(&h1, "user.long", 4));
        rec!(
            "setxattr CREATE existing",
            xattr_set(&h1, "user.a", "2", libc::XATTR_CREATE, true)
        );
        rec!(
            "setxattr REPLACE missing",
            xattr_set(&h1, "user.b", "2", libc::XATTR_REPLACE, true)
        );
        rec!(
            "setxattr REPLACE existing",
            xattr_set(&h1, "user.a", "replaced", libc::XATTR_REPLACE, true)
        );
        rec!("getxattr replaced", xattr_get(&h1, "user.a", 64));
        rec!("setxattr user.b", xattr_set(&h1, "user.b", "22", 0, true));
        rec!(
            "setxattr trusted.t",
            xattr_set(&h1, "trusted.t", "t", 0, true)
        );
        rec!("listxattr", xattr_list(&h1));
        rec!("removexattr user.a", xattr_remove(&h1, "user.a"));
        rec!("getxattr removed", xattr_get(&h1, "user.a", 64));
        rec!("removexattr again", xattr_remove(&h1, "user.a"));
        rec!("listxattr after remove", xattr_list(&h1));
        rec!(
            "getxattr missing file",
            xattr_get(&p("missing"), "user.a", 64)
        );
        rec!(
            "lsetxattr user on symlink",
            xattr_set(&p("l3"), "user.x", "1", 0, false)
        );
        rec!(
            "setxattr on dir",
            xattr_set(&p("d"), "user.dir", "yes", 0, true)
        );
        rec!("getxattr on dir", xattr_get(&p("d"), "user.dir", 64));
        rec!(
            "setxattr bad namespace",
            xattr_set(&h1, "bogus.x", "1", 0, true)
        );

        // access(2).
        rec!(
            "access rw",
            ret(libc::access(p("h1").as_ptr(), libc::R_OK | libc::W_OK))
        );
        rec!(
            "access missing",
            ret(libc::access(p("missing").as_ptr(), libc::F_OK))
        );

        // Many directory entries.
        rec!("mkdir many", ret(libc::mkdir(p("many").as_ptr(), 0o755)));
        for i in 0..300 {
            fs_write(
                &root.join(format!("many/entry-with-a-longish-name-{i:04}")),
                b"",
            );
        }
        let n = fs::read_dir(root.join("many"))
            .map(|r| r.count())
            .unwrap_or(0);
        rec!("readdir many", format!("{n} entries"));
    }
    // statfs: the mount reports the backing file system.
    // SAFETY: statvfs into a zeroed buffer.
    unsafe {
        let mut sv: libc::statvfs = std::mem::zeroed();
        let r = libc::statvfs(p("").as_ptr(), &mut sv);
        if r < 0 {
            rec!("statvfs", errstr(errno()));
        } else {
            rec!(
                "statvfs",
                format!(
                    "total_bytes={} files={} namemax={}",
                    sv.f_blocks * sv.f_frsize,
                    sv.f_files,
                    sv.f_namemax
                )
            );
        }
    }
    rec!("listing root", listing(root));
    rec!("listing d", listing(&root.join("d")));
    out
}

fn fs_write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()))
}

fn compare(native: &[(String, String)], mounted: &[(String, String)]) {
    assert_eq!(native.len(), mounted.len());
    let mut diffs = Vec::new();
    for (n, m) in native.iter().zip(mounted) {
        assert_eq!(n.0, m.0);
        if n.1 != m.1 {
            diffs.push(format!(
                "  {}:\n    native: {}\n    mount:  {}",
                n.0, n.1, m.1
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {} operations differ from native:\n{}",
        diffs.len(),
        native.len(),
        diffs.join("\n")
    );
}

#[test]
fn file_operations_match_native() {
    let seed = seed_for("file_operations_match_native");
    let mut fx = Fixture::new("ops", false);
    let native = fx.scratch_path("native");
    fs::create_dir(&native).unwrap();
    fx.mount();
    let a = run_ops(&native, seed);
    let b = run_ops(&fx.mnt, seed);
    for (op, r) in &a {
        eprintln!("{op}: {r}");
    }
    compare(&a, &b);
    // Everything went through to the backing directory.
    assert_eq!(
        listing(&fx.mnt),
        listing(&fx.backing)
            .split(',')
            .filter(|n| *n != ".sqlfs")
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(
        fs::read(fx.path("h1")).unwrap(),
        fs::read(fx.backing_path("h1")).unwrap()
    );
    assert_eq!(
        fs::metadata(fx.path("h1")).unwrap().mode(),
        fs::metadata(fx.backing_path("h1")).unwrap().mode()
    );
    fx.unmount();
}

// ---------------------------------------------------------------------------------------
// Permission checks as an unprivileged user
// ---------------------------------------------------------------------------------------

const NOBODY: u32 = 65534;

enum UOp {
    Open(CString, libc::c_int),
    Mkdir(CString),
    Unlink(CString),
    Rename(CString, CString),
    Chmod(CString, libc::mode_t),
    Truncate(CString),
    Utimens(CString),
    Stat(CString),
}

/// Prepare the tree (as root) for the unprivileged checks.
fn user_tree(root: &Path) {
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
    let w = |rel: &str, mode: u32| {
        fs_write(&root.join(rel), b"content");
        fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
    };
    let d = |rel: &str, mode: u32| {
        fs::create_dir(root.join(rel)).unwrap();
        fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
    };
    w("secret", 0o600);
    w("public", 0o644);
    d("rodir", 0o755);
    w("rodir/f", 0o644);
    d("open", 0o777);
    d("sticky", 0o1777);
    w("sticky/rootfile", 0o666);
    w("ownfile", 0o600);
    std::os::unix::fs::chown(root.join("ownfile"), Some(NOBODY), Some(NOBODY)).unwrap();
}

/// Run operations as uid/gid 65534 in a forked child; (label, result) pairs.
fn user_ops(root: &Path) -> Vec<(String, String)> {
    let p = |rel: &str| cpath(&root.join(rel));
    let ops: Vec<(&str, UOp)> = vec![
        (
            "deny: read 0600 root file",
            UOp::Open(p("secret"), libc::O_RDONLY),
        ),
        (
            "deny: write 0644 root file",
            UOp::Open(p("public"), libc::O_WRONLY),
        ),
        (
            "deny: create in 0755 root dir",
            UOp::Open(p("rodir/new"), libc::O_CREAT | libc::O_WRONLY),
        ),
        ("deny: unlink in 0755 root dir", UOp::Unlink(p("rodir/f"))),
        ("deny: mkdir in 0755 root dir", UOp::Mkdir(p("rodir/sub"))),
        (
            "deny: unlink other's file in sticky dir",
            UOp::Unlink(p("sticky/rootfile")),
        ),
        ("deny: chmod root file", UOp::Chmod(p("public"), 0o777)),
        ("deny: truncate 0600 root file", UOp::Truncate(p("secret"))),
        ("deny: utimens now on root file", UOp::Utimens(p("public"))),
        (
            "deny: rename into 0755 root dir",
            UOp::Rename(p("public"), p("rodir/x")),
        ),
        (
            "allow: read 0644 root file",
            UOp::Open(p("public"), libc::O_RDONLY),
        ),
        ("allow: stat 0600 root file", UOp::Stat(p("secret"))),
        (
            "allow: create in 0777 dir",
            UOp::Open(p("open/mine"), libc::O_CREAT | libc::O_WRONLY),
        ),
        ("allow: mkdir in 0777 dir", UOp::Mkdir(p("open/mydir"))),
        (
            "allow: open own 0600 file rw",
            UOp::Open(p("ownfile"), libc::O_RDWR),
        ),
        ("allow: chmod own file", UOp::Chmod(p("ownfile"), 0o640)),
        ("allow: utimens now on own file", UOp::Utimens(p("ownfile"))),
        (
            "allow: rename own file in 0777 dir",
            UOp::Rename(p("open/mine"), p("open/mine2")),
        ),
    ];
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe into a 2-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: after fork the child only makes raw system calls and exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        unsafe {
            libc::close(fds[0]);
            let g = NOBODY as libc::c_long;
            if libc::syscall(
                libc::SYS_setgroups,
                0 as libc::c_long,
                std::ptr::null::<libc::gid_t>(),
            ) != 0
                || libc::syscall(libc::SYS_setresgid, g, g, g) != 0
                || libc::syscall(libc::SYS_setresuid, g, g, g) != 0
            {
                libc::_exit(2);
            }
            for (_, op) in &ops {
                let r = match op {
                    UOp::Open(path, flags) => {
                        let fd = libc::open(path.as_ptr(), *flags, 0o644);
                        if fd >= 0 {
                            libc::close(fd);
                            0
                        } else {
                            -1
                        }
                    }
                    UOp::Mkdir(path) => libc::mkdir(path.as_ptr(), 0o755),
                    UOp::Unlink(path) => libc::unlink(path.as_ptr()),
                    UOp::Rename(a, b) => libc::rename(a.as_ptr(), b.as_ptr()),
                    UOp::Chmod(path, m) => libc::chmod(path.as_ptr(), *m),
                    UOp::Truncate(path) => libc::truncate(path.as_ptr(), 0),
                    UOp::Utimens(path) => {
                        libc::utimensat(libc::AT_FDCWD, path.as_ptr(), std::ptr::null(), 0)
                    }
                    UOp::Stat(path) => {
                        let mut st: libc::stat = std::mem::zeroed();
                        libc::stat(path.as_ptr(), &mut st)
                    }
                };
                let code: i32 = if r < 0 { *libc::__errno_location() } else { 0 };
                libc::write(fds[1], &code as *const i32 as *const _, 4);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: parent side of the pipe.
    unsafe { libc::close(fds[1]) };
    let mut f = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
    let mut status = 0;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child could not switch to uid {NOBODY}"
    );
    let codes: Vec<i32> = buf
        .chunks(4)
        .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(codes.len(), ops.len());
    let mut out: Vec<(String, String)> = ops
        .iter()
        .zip(codes)
        .map(|((l, _), c)| (l.to_string(), if c == 0 { "ok".into() } else { errstr(c) }))
        .collect();
    let owner = |rel: &str| match fs::symlink_metadata(root.join(rel)) {
        Ok(m) => format!("uid={} gid={} mode={:o}", m.uid(), m.gid(), m.mode()),
        Err(e) => format!("err {e}"),
    };
    out.push(("allow: owner of created file".into(), owner("open/mine2")));
    out.push(("allow: owner of created dir".into(), owner("open/mydir")));
    out.push(("deny: root file untouched".into(), read_file(&p("public"))));
    out
}

/// (label, outcome) pairs of one run of the user operations.
type Outcomes = Vec<(String, String)>;

fn user_results(prefix: &str) -> (Outcomes, Outcomes) {
    let mut fx = Fixture::new(&format!("user-{}", prefix.trim_end_matches(':')), false);
    let native = fx.scratch_path("native");
    fs::create_dir(&native).unwrap();
    // The unprivileged user must be able to reach both trees.
    for d in [&fx.root, &fx.scratch, &fx.backing, &fx.mnt] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    user_tree(&native);
    fx.mount();
    user_tree(&fx.mnt);
    let a: Vec<_> = user_ops(&native)
        .into_iter()
        .filter(|(l, _)| l.starts_with(prefix))
        .collect();
    let b: Vec<_> = user_ops(&fx.mnt)
        .into_iter()
        .filter(|(l, _)| l.starts_with(prefix))
        .collect();
    fx.unmount();
    (a, b)
}

#[test]
fn unprivileged_user_is_denied_like_native() {
    let (a, b) = user_results("deny:");
    for (op, r) in &a {
        eprintln!("{op}: {r}");
    }
    compare(&a, &b);
}

#[test]
fn unprivileged_user_is_allowed_like_native() {
    let (a, b) = user_results("allow:");
    for (op, r) in &a {
        eprintln!("{op}: {r}");
    }
    compare(&a, &b);
}

// ---------------------------------------------------------------------------------------
// Visibility
// ---------------------------------------------------------------------------------------

fn assert_staging_hidden(fx: &Fixture) {
    let names: Vec<String> = fs::read_dir(&fx.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n == ".sqlfs"),
        "readdir of the mount shows .sqlfs: {names:?}"
    );
    for rel in [".sqlfs", ".sqlfs/", ".sqlfs/x"] {
        let e = fs::symlink_metadata(fx.path(rel))
            .err()
            .map(|e| e.raw_os_error());
        assert_eq!(
            e,
            Some(Some(libc::ENOENT)),
            "lookup of {rel} through the mount did not fail with ENOENT"
        );
    }
    let e = fs::read_dir(fx.path(".sqlfs"))
        .err()
        .map(|e| e.raw_os_error());
    assert_eq!(
        e,
        Some(Some(libc::ENOENT)),
        "opendir .sqlfs through the mount"
    );
}

fn write_some_db(fx: &Fixture, db: &str, seed: u64) {
    let c = open_db(&fx.path(db));
    set_journal_mode(&c, "WAL");
    c.execute_batch(SCHEMA).unwrap();
    let mut d = Driver::new(c, 1, seed, DriverCfg::default());
    for _ in 0..10 {
        d.random_txn().unwrap();
    }
}

#[test]
fn existing_files_visible_in_place_and_staging_hidden() {
    let seed = seed_for("existing_files_visible_in_place_and_staging_hidden");
    let mut fx = Fixture::new("inplace", true);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut blob = vec![0u8; 100_000];
    rng.fill_bytes(&mut blob);
    fs_write(&fx.mnt.join("a.txt"), b"before the mount");
    fs::create_dir(fx.mnt.join("dir")).unwrap();
    fs_write(&fx.mnt.join("dir/b.bin"), &blob);
    fs::set_permissions(fx.mnt.join("dir/b.bin"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("a.txt", fx.mnt.join("link")).unwrap();
    let before = listing(&fx.mnt);
    let mode_before = fs::metadata(fx.mnt.join("dir/b.bin")).unwrap().mode();
    fx.mount();
    assert_eq!(listing(&fx.mnt), before);
    assert_eq!(fs::read(fx.path("a.txt")).unwrap(), b"before the mount");
    assert_eq!(fs::read(fx.path("dir/b.bin")).unwrap(), blob);
    assert_eq!(
        fs::metadata(fx.path("dir/b.bin")).unwrap().mode(),
        mode_before
    );
    assert_eq!(fs::read_link(fx.path("link")).unwrap(), Path::new("a.txt"));
    assert_eq!(fs::read(fx.path("link")).unwrap(), b"before the mount");
    assert_staging_hidden(&fx);
    write_some_db(&fx, "app.db", seed);
    assert_staging_hidden(&fx);
    fx.unmount();
    assert!(
        fx.backing.join(".sqlfs").is_dir(),
        "no staging directory in the backing directory"
    );
    assert!(fx.backing.join("app.db").exists());
    // Remount in place: the database and its history are still there.
    fx.mount();
    assert_staging_hidden(&fx);
    check_final(&fx.mnt, &fx.path("app.db"), "app.db", &fx.scratch);
    fx.assert_verify();
    fx.unmount();
}

#[test]
fn data_dir_contents_visible_and_staging_hidden() {
    let seed = seed_for("data_dir_contents_visible_and_staging_hidden");
    let mut fx = Fixture::new("datadir", false);
    fs_write(&fx.backing.join("existing.txt"), b"in the backing dir");
    fs::create_dir(fx.backing.join("sub")).unwrap();
    fx.mount();
    assert_eq!(
        fs::read(fx.path("existing.txt")).unwrap(),
        b"in the backing dir"
    );
    assert!(fx.path("sub").is_dir());
    fs_write(&fx.path("sub/new.txt"), b"through the mount");
    assert_eq!(
        fs::read(fx.backing.join("sub/new.txt")).unwrap(),
        b"through the mount"
    );
    write_some_db(&fx, "sub/app.db", seed);
    assert!(
        fx.backing.join(".sqlfs").is_dir(),
        "no staging directory in the backing directory"
    );
    assert_staging_hidden(&fx);
    // A change made directly in the backing directory is visible through the mount.
    fs_write(
        &fx.backing.join("existing.txt"),
        b"changed behind the mount",
    );
    sleep_ms(1100);
    assert_eq!(
        fs::read(fx.path("existing.txt")).unwrap(),
        b"changed behind the mount"
    );
    fx.assert_verify();
    fx.unmount();
}

// ---------------------------------------------------------------------------------------
// fcntl locks across processes
// ---------------------------------------------------------------------------------------

fn lk(fd: libc::c_int, cmd: libc::c_int, t: i32, start: i64, len: i64) -> String {
    // SAFETY: a zeroed flock is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = t as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fcntl with a valid flock.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    if r < 0 {
        format!("err {}", errno())
    } else if cmd == libc::F_GETLK {
        format_getlk(&fl)
    } else {
        "ok".into()
    }
}

fn lock_script(root: &Path, scratch: &Path, tag: &str) -> Vec<String> {
    let path = root.join(format!("locked-{tag}"));
    fs_write(&path, &[0u8; 100]);
    let c = cpath(&path);
    // SAFETY: plain open.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
    assert!(fd >= 0);
    let mut w = Interactive::spawn(
        &Params::new("lockctl"),
        &scratch.join(format!("lockctl-{tag}.log")),
    );
    let me = std::process::id();
    let wp = w.pid();
    let mut t = Vec::new();
    let norm = |s: String| {
        s.replace(&format!("pid={me}"), "pid=P")
            .replace(&format!("pid={wp}"), "pid=W")
    };
    const G: i32 = libc::F_GETLK;
    const S: i32 = libc::F_SETLK;
    const R: i32 = libc::F_RDLCK;
    const W: i32 = libc::F_WRLCK;
    const U: i32 = libc::F_UNLCK;
    t.push(format!("P setlk w 0 10: {}", lk(fd, S, W, 0, 10)));
    t.push(format!(
        "W open: {}",
        w.cmd(&format!("open {}", path.display()))
    ));
    t.push(format!("W getlk w 0 10: {}", norm(w.cmd("getlk w 0 10"))));
    t.push(format!("W getlk r 5 1: {}", norm(w.cmd("getlk r 5 1"))));
    let r = w.cmd("setlk r 5 1");
    // EAGAIN and EACCES are both allowed by POSIX for a conflicting F_SETLK.
    t.push(format!(
        "W setlk r 5 1 conflicts: {}",
        r == format!("err {}", libc::EAGAIN) || r == format!("err {}", libc::EACCES)
    ));
    t.push(format!("W setlk w 20 10: {}", w.cmd("setlk w 20 10")));
    t.push(format!("W getlk w 0 100: {}", norm(w.cmd("getlk w 0 100"))));
    t.push(format!("P getlk w 15 10: {}", norm(lk(fd, G, W, 15, 10))));
    t.push(format!(
        "P getlk r 0 5 (own lock): {}",
        norm(lk(fd, G, R, 0, 5))
    ));
    t.push(format!("P unlock 0 10: {}", lk(fd, S, U, 0, 10)));
    t.push(format!("W setlk r 0 10: {}", w.cmd("setlk r 0 10")));
    t.push(format!("P setlk r 0 10 (shared): {}", lk(fd, S, R, 0, 10)));
    t.push(format!(
        "P setlk w 0 10 (conflict): {}",
        lk(fd, S, W, 0, 10) != "ok"
    ));
    // SQLite's lock bytes sit at 1 GiB.
    t.push(format!(
        "P setlk w 1GiB+1 1: {}",
        lk(fd, S, W, 0x4000_0001, 1)
    ));
    t.push(format!(
        "W setlk r 1GiB+1 1 (conflict): {}",
        w.cmd("setlk r 1073741825 1") != "ok"
    ));
    t.push(format!(
        "W getlk r 1GiB 510: {}",
        norm(w.cmd("getlk r 1073741824 510"))
    ));
    t.push(format!("P unlock 1GiB+1: {}", lk(fd, S, U, 0x4000_0001, 1)));
    t.push(format!(
        "W setlk r 1GiB+1 1: {}",
        w.cmd("setlk r 1073741825 1")
    ));
    // A blocking lock waits for the holder.
    t.push(format!("P setlk r 50 10: {}", lk(fd, S, R, 50, 10)));
    let start = Instant::now();
    w.send("setlkw w 50 10");
    sleep_ms(400);
    t.push(format!("P unlock 50 10: {}", lk(fd, S, U, 50, 10)));
    let r = w.recv();
    let waited = start.elapsed();
    t.push(format!(
        "W setlkw w 50 10: {r}, blocked: {}",
        waited >= Duration::from_millis(300)
    ));
    t.push(format!("P getlk w 50 10: {}", norm(lk(fd, G, W, 50, 10))));
    // Closing any fd of the file releases the process's locks.
    t.push(format!("W close: {}", w.cmd("close")));
    t.push(format!(
        "P setlk w 0 100 after W closed: {}",
        lk(fd, S, W, 0, 100)
    ));
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    t
}

#[test]
fn fcntl_locks_across_processes() {
    let mut fx = Fixture::new("locks", true);
    let native = fx.scratch_path("native");
    fs::create_dir(&native).unwrap();
    fx.mount();
    let a = lock_script(&native, &fx.scratch, "native");
    let b = lock_script(&fx.mnt, &fx.scratch, "mount");
    for l in &a {
        eprintln!("{l}");
    }
    let diffs: Vec<String> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("  native: {x}\n  mount:  {y}"))
        .collect();
    assert!(
        diffs.is_empty(),
        "lock behaviour differs from native:\n{}",
        diffs.join("\n")
    );
    fx.unmount();
}

// ---------------------------------------------------------------------------------------
// One WAL database, two processes
// ---------------------------------------------------------------------------------------

#[test]
fn wal_database_shared_by_two_processes() {
    let seed = seed_for("wal_database_shared_by_two_processes");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fx = Fixture::new("shm", true);
    fx.mount();
    let db = "shared.db";
    let conn = open_db(&fx.path(db));
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("CREATE TABLE p(x INTEGER, y BLOB)")
        .unwrap();
    let mut peer = Interactive::spawn(&Params::new("walpeer"), &fx.scratch_path("walpeer.log"));
    assert_eq!(peer.cmd(&format!("open {}", fx.path(db).display())), "wal");
    assert!(
        fx.path(&format!("{db}-shm")).exists(),
        "no -shm file with two WAL connections open"
    );
    let mut expected = 0i64;
    let mut sum = 0i64;
    let mut samples = Vec::new();
    for i in 0..80 {
        let n = rng.random_range(1..30i64);
        if rng.random_bool(0.5) {
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            conn.execute(
                "INSERT INTO p(x, y) SELECT value, randomblob(300) FROM (WITH RECURSIVE s(value) AS \
                 (SELECT 1 UNION ALL SELECT value + 1 FROM s WHERE value < ?1) SELECT value FROM s)",
                [n],
            )
            .unwrap();
            conn.execute_batch("COMMIT").unwrap();
        } else {
            assert_eq!(peer.cmd(&format!("insert {n}")), "ok");
        }
        expected += n;
        sum += n * (n + 1) / 2;
        // Each process sees the other's commit at once (the wal-index is shared memory).
        let here: i64 = conn
            .query_row("SELECT count(*) FROM p", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            here, expected,
            "step {i}: this process sees a stale database"
        );
        assert_eq!(
            peer.cmd("count"),
            expected.to_string(),
            "step {i}: the peer sees a stale database"
        );
        if i % 10 == 5 {
            assert_eq!(peer.cmd("sum"), sum.to_string());
            let mode = CHECKPOINT_MODES[rng.random_range(0..4)];
            let r = peer.cmd(&format!("ckpt {mode}"));
            assert!(!r.starts_with("err"), "checkpoint in the peer: {r}");
        }
        if i % 10 == 0 {
            samples.push(sample(&conn, i % 20 == 0, format!("step {i}")));
        }
    }
    assert_eq!(peer.cmd("close"), "ok");
    drop(peer);
    drop(conn);
    let entries = check_final(&fx.mnt, &fx.path(db), db, &fx.scratch);
    check_samples(&fx.mnt, db, &entries, &samples, &fx.scratch);
    fx.assert_verify();
    fx.unmount();
}

/// The mount is announced in /proc/self/mountinfo with the file-system type `fuse.sqlfs`
/// (the harness itself also accepts a plain `fuse` type with source `sqlfs`, so that the
/// other tests still run when only this detail is off).
#[test]
fn mountinfo_fstype_is_fuse_sqlfs() {
    let mut fx = Fixture::new("fstype", true);
    fx.mount();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = fx.mnt.to_string_lossy().into_owned();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .expect("mount point not in mountinfo")
        .to_string();
    let fstype = line
        .split_once(" - ")
        .unwrap()
        .1
        .split(' ')
        .next()
        .map(str::to_string);
    fx.unmount();
    assert_eq!(
        fstype.as_deref(),
        Some("fuse.sqlfs"),
        "mountinfo line: {line}"
    );
}

/// sqlfs answers the lookup of a name that is not there with a negative entry, which the
/// kernel keeps for a second (SQLite looks for a journal and a WAL at every transaction outside
/// WAL mode). Every way of making that name through the mount, from this process or another,
/// shows at once, and so does its removal.
#[test]
fn absent_names_appear_at_once_when_made_through_the_mount() {
    let mut fx = Fixture::new("absent", false);
    fx.mount();
    let m = fx.mnt.clone();
    let absent = |n: &str| {
        fs::symlink_metadata(m.join(n))
            .err()
            .and_then(|e| e.raw_os_error())
            == Some(libc::ENOENT)
    };
    let names = [
        "created", "by-other", "dir", "link", "hard", "renamed", "fifo",
    ];
    for _ in 0..2 {
        for n in names {
            assert!(absent(n), "{n} is there before it was made");
        }
    }
    fs::write(m.join("created"), b"x").unwrap();
    assert_eq!(fs::read(m.join("created")).unwrap(), b"x");
    let script = format!("printf y > '{}'", m.join("by-other").display());
    let status = std::process::Command::new("sh")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(fs::read(m.join("by-other")).unwrap(), b"y");
    fs::create_dir(m.join("dir")).unwrap();
    assert!(fs::symlink_metadata(m.join("dir")).unwrap().is_dir());
    std::os::unix::fs::symlink("created", m.join("link")).unwrap();
    assert!(fs::symlink_metadata(m.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    fs::hard_link(m.join("created"), m.join("hard")).unwrap();
    assert_eq!(fs::read(m.join("hard")).unwrap(), b"x");
    fs::rename(m.join("by-other"), m.join("renamed")).unwrap();
    assert_eq!(fs::read(m.join("renamed")).unwrap(), b"y");
    assert!(absent("by-other"));
    let fifo = cpath(&m.join("fifo"));
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert!(!absent("fifo"));
    fs::remove_file(m.join("created")).unwrap();
    assert!(absent("created"));
    fs::write(m.join("created"), b"z").unwrap();
    assert_eq!(fs::read(m.join("created")).unwrap(), b"z");
    // A rollback-journal database: a second process's commits, each with a journal made and
    // deleted through the mount, are all seen by a connection that looked for the journal
    // before each of them.
    let db = m.join("rollback.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("PRAGMA journal_mode=DELETE; CREATE TABLE t(x);")
        .unwrap();
    for i in 1..=5 {
        let sql = format!("INSERT INTO t VALUES({i});");
        let out = std::process::Command::new("sqlite3")
            .arg(&db)
            .arg(&sql)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(absent("rollback.db-journal"));
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, i);
    }
    drop(c);
    fx.unmount();
}
