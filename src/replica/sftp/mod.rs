//! A replica in a directory on an SSH server, over SFTP:
//! `sftp://[user@]host[:port]/path?identity-file=PATH&known-hosts=PATH&host-key-fingerprint=SHA256:…&timeout=30s`
//! (`url.rs` parses it; `session.rs` connects, checks the host key and logs in).
//!
//! Invariants:
//! - An object appears under its key whole or not at all: it is uploaded to a temporary name
//!   of its own in the key's directory (`.tmp-…`, created exclusively, never a key since keys
//!   have no part starting with `.`), fsynced where the server can, then renamed into place.
//! - `put_new`'s rename is SFTP's plain rename, which never replaces its target (SFTP v3:
//!   "an error if there already exists a file with the name specified by newpath"; OpenSSH's
//!   server makes it a `link()` then `unlink()`, so of two racing renames exactly one wins):
//!   that refusal is the fence. The `posix-rename@openssh.com` extension, which replaces, is
//!   used only by `put`. On a server filesystem without hard links OpenSSH falls back to a
//!   check-then-rename, which is not race-free: keep the replica on a POSIX filesystem.
//! - No call hangs: every request waits at most `timeout` for an answer; connecting is bounded
//!   the same way. A call retries a dropped connection or a timeout at most [`ATTEMPTS`]
//!   times with a growing pause, on a new connection each time, then returns the error (the
//!   shipper retries later and loses nothing).
//! - A temporary file outlives its upload only when the connection failed: the client removes
//!   it after its next successful call (watching for [`LITTER_WATCH`] for one a stalled
//!   server creates late), and a listing removes any a day old (a client that stopped).
//! - Idle costs nothing: no request and no keepalive is sent while nothing is asked; a
//!   connection the server closed meanwhile is replaced on the next call.

mod session;
mod url;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ssh2::{ErrorCode, OpenFlags, OpenType, RenameFlags, Sftp};

use super::{check_key, Listed, ReplicaClient, ReplicaError, Result};
use session::{Conn, ConnectError};

/// Tries per call (the first included) when the connection drops or a request times out.
const ATTEMPTS: u32 = 3;
/// The pause before the second try; each later pause is four times longer.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// Age (by the server's clock) past which a listing removes a temporary file.
const STALE_TMP_SECS: u64 = 24 * 3600;
/// How long a temporary file a failed upload may have left is looked for.
const LITTER_WATCH: Duration = Duration::from_secs(120);
/// Connections kept open for the next calls (more are opened while calls overlap).
const POOL: usize = 4;

// SFTP status codes (draft-ietf-secsh-filexfer-02).
const FX_NO_SUCH_FILE: i32 = 2;
const FX_NO_SUCH_PATH: i32 = 10;

/// Makes temporary names unique within the process (the process id and a random part,
/// across processes and machines).
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

pub struct SftpReplica {
    url: url::SftpUrl,
    shown: String,
    /// Idle connections.
    pool: Mutex<Vec<Conn>>,
    /// Temporary files a failed upload could not remove (its connection had dropped):
    /// removed after the next call that succeeds.
    litter: Mutex<Vec<(String, Instant)>>,
}

/// Why one try of a call failed.
enum Fail {
    /// An SFTP status or a transport error.
    Ssh(ssh2::Error),
    /// Reading or writing an open remote file (the bindings keep only the error's text):
    /// counted as the transport's.
    Transfer(io::Error),
    /// The local file (a source or destination).
    Local(&'static str, io::Error),
}

impl From<ssh2::Error> for Fail {
    fn from(e: ssh2::Error) -> Fail {
        Fail::Ssh(e)
    }
}

type Try<T> = std::result::Result<T, Fail>;

/// The SFTP status of `e`, if the server answered with one.
fn status(e: &ssh2::Error) -> Option<i32> {
    match e.code() {
        ErrorCode::SFTP(c) => Some(c),
        ErrorCode::Session(_) => None,
    }
}

fn is_missing(e: &ssh2::Error) -> bool {
    matches!(status(e), Some(FX_NO_SUCH_FILE | FX_NO_SUCH_PATH))
}

/// Where the sftp error texts come from: an SFTP status is named, not numbered.
fn describe_ssh(e: &ssh2::Error) -> String {
    match status(e) {
        Some(c) => {
            let name = match c {
                1 => "end of file",
                2 => "no such file",
                3 => "permission denied",
                4 => "failure",
                5 => "bad message",
                8 => "operation unsupported",
                10 => "no such path",
                11 => "file already exists",
                14 => "no space on the file system",
                15 => "quota exceeded",
                _ => "error",
            };
            format!("SFTP status {c} ({name})")
        }
        None => e.message().to_string(),
    }
}

impl SftpReplica {
    /// Reads the URL; connects on the first call (so checking a configuration never does).
    pub fn open(url: &str) -> Result<SftpReplica> {
        let u = url::parse(url).map_err(|why| ReplicaError::BadUrl {
            url: url.to_string(),
            why,
        })?;
        let root = if u.root.is_empty() {
            "~".to_string()
        } else if u.root.starts_with('/') {
            u.root.clone()
        } else {
            format!("~/{}", u.root)
        };
        let port = if u.port == 22 {
            String::new()
        } else {
            format!(":{}", u.port)
        };
        let host = if u.host.contains(':') {
            format!("[{}]", u.host)
        } else {
            u.host.clone()
        };
        let shown = format!(
            "sftp://{}@{host}{port}/{}",
            u.user,
            root.trim_start_matches('/')
        );
        Ok(SftpReplica {
            url: u,
            shown,
            pool: Mutex::new(Vec::new()),
            litter: Mutex::new(Vec::new()),
        })
    }

    /// The server path of `key` (checked).
    fn path(&self, key: &str) -> String {
        if self.url.root.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.url.root)
        }
    }

    fn io_err(&self, op: &'static str, key: &str, err: io::Error) -> ReplicaError {
        ReplicaError::Io {
            replica: self.describe(),
            op,
            key: key.to_string(),
            err,
        }
    }

    /// Runs `f` on a connection, retrying on a new connection when the transport fails;
    /// an SFTP status or a local error is final.
    fn call<T>(&self, op: &'static str, key: &str, f: impl Fn(&Conn) -> Try<T>) -> Result<T> {
        let mut pause = FIRST_PAUSE;
        let mut attempt = 1;
        loop {
            let pooled = self.pool.lock().pop();
            let conn = match pooled {
                Some(c) => c,
                None => match Conn::open(&self.url) {
                    Ok(c) => c,
                    Err(ConnectError::Refused(e)) => return Err(self.io_err(op, key, e)),
                    Err(ConnectError::Transient(e)) => {
                        if attempt >= ATTEMPTS {
                            return Err(self.io_err(op, key, e));
                        }
                        log::debug!("{}: {e}; trying again", self.shown);
                        std::thread::sleep(pause);
                        pause *= 4;
                        attempt += 1;
                        continue;
                    }
                },
            };
            let e = match f(&conn) {
                Ok(v) => {
                    self.sweep(&conn);
                    self.give_back(conn);
                    return Ok(v);
                }
                Err(Fail::Local(what, e)) => {
                    self.give_back(conn);
                    return Err(self.io_err(what, key, e));
                }
                Err(Fail::Ssh(e)) if status(&e).is_some() => {
                    self.give_back(conn);
                    let kind = if is_missing(&e) {
                        io::ErrorKind::NotFound
                    } else {
                        io::ErrorKind::Other
                    };
                    return Err(self.io_err(op, key, io::Error::new(kind, describe_ssh(&e))));
                }
                Err(Fail::Ssh(e)) => {
                    let kind = if e.code() == ErrorCode::Session(libssh2_sys::LIBSSH2_ERROR_TIMEOUT)
                    {
                        io::ErrorKind::TimedOut
                    } else {
                        io::ErrorKind::ConnectionAborted
                    };
                    (kind, describe_ssh(&e))
                }
                Err(Fail::Transfer(e)) => (e.kind(), e.to_string()),
            };
            // The transport failed: this connection is done with (closed at once, so that
            // nothing waits on it again while it is dropped).
            conn.abort();
            drop(conn);
            let err = io::Error::new(e.0, format!("{}:{}: {}", self.url.host, self.url.port, e.1));
            if attempt >= ATTEMPTS {
                return Err(self.io_err(op, key, err));
            }
            log::debug!("{}: {op} {key}: {err}; trying again", self.shown);
            std::thread::sleep(pause);
            pause *= 4;
            attempt += 1;
        }
    }

    /// Removes the temporary file `tmp` of an upload that failed, or, if the connection is
    /// gone, remembers it for [`sweep`](Self::sweep).
    fn discard(&self, c: &Conn, tmp: &str) {
        if let Err(e) = c.sftp.unlink(Path::new(tmp)) {
            if status(&e).is_none() {
                self.litter.lock().push((tmp.to_string(), Instant::now()));
            }
        }
    }

    /// Removes the temporary files failed uploads left (best effort). One that is not there
    /// is looked for again for [`LITTER_WATCH`]: a request the client gave up on may still
    /// create it when a stalled server resumes.
    fn sweep(&self, c: &Conn) {
        let left = std::mem::take(&mut *self.litter.lock());
        if left.is_empty() {
            return;
        }
        let mut keep = Vec::new();
        for (tmp, since) in left {
            match c.sftp.unlink(Path::new(&tmp)) {
                Ok(()) => {}
                Err(e) if status(&e).is_some() && since.elapsed() > LITTER_WATCH => {}
                Err(_) => keep.push((tmp, since)),
            }
        }
        self.litter.lock().extend(keep);
    }

    fn give_back(&self, c: Conn) {
        let mut p = self.pool.lock();
        if p.len() < POOL {
            p.push(c);
        }
    }

    /// Uploads what `fill` writes to a new temporary file beside `dst` (creating the
    /// directories on the way), fsynced where the server can; returns its path.
    fn upload(&self, c: &Conn, dst: &str, fill: &dyn Fn(&mut dyn Write) -> Try<()>) -> Try<String> {
        let sftp = &c.sftp;
        let (dir, name) = dst.rsplit_once('/').unwrap_or(("", dst));
        let tmp = format!(
            "{dir}{}.tmp-{}-{}-{:08x}-{name}",
            if dir.is_empty() { "" } else { "/" },
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed),
            rand_u32()
        );
        let flags = OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUSIVE;
        let opened = match sftp.open_mode(Path::new(&tmp), flags, 0o644, OpenType::File) {
            Err(e) if is_missing(&e) && !dir.is_empty() => mkdirs(sftp, dir).and_then(|()| {
                Ok(sftp.open_mode(Path::new(&tmp), flags, 0o644, OpenType::File)?)
            }),
            r => r.map_err(Fail::Ssh),
        };
        let mut f = match opened {
            Ok(f) => f,
            Err(e) => {
                if matches!(&e, Fail::Ssh(se) if status(se).is_none()) {
                    // The open may still run on the server after this client gave up on it.
                    self.litter.lock().push((tmp, Instant::now()));
                }
                return Err(e);
            }
        };
        let res = fill(&mut f).map_err(|e| c.failed(e)).and_then(|()| {
            // Durable before it gets its name; a server without fsync@openssh.com still
            // gets the object, only without the flush.
            match f.fsync() {
                Err(e) if status(&e).is_some() => Ok(()),
                r => r.map_err(|e| c.failed(Fail::Ssh(e))),
            }
        });
        let closed = f.close().map_err(|e| c.failed(Fail::Ssh(e)));
        if let Err(e) = res.and(closed) {
            self.discard(c, &tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    /// Opens `key` for reading: `None` if it is missing or is a directory.
    fn open_read(sftp: &Sftp, path: &str) -> Try<Option<(ssh2::File, u64)>> {
        let mut f = match sftp.open(Path::new(path)) {
            Ok(f) => f,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let st = f.stat()?;
        if !st.is_file() {
            return Ok(None);
        }
        Ok(Some((f, st.size.unwrap_or(0))))
    }
}

/// Creates `dir` and any missing parents; one that another client created meanwhile is fine.
fn mkdirs(sftp: &Sftp, dir: &str) -> Try<()> {
    let is_dir = |d: &str| sftp.stat(Path::new(d)).is_ok_and(|s| s.is_dir());
    match sftp.mkdir(Path::new(dir), 0o755) {
        Ok(()) => return Ok(()),
        Err(e) if status(&e).is_none() => return Err(e.into()),
        Err(e) => {
            if is_dir(dir) {
                return Ok(());
            }
            match dir.rsplit_once('/') {
                Some((parent, _)) if !parent.is_empty() && is_missing(&e) => mkdirs(sftp, parent)?,
                _ => return Err(e.into()),
            }
        }
    }
    match sftp.mkdir(Path::new(dir), 0o755) {
        Err(_) if is_dir(dir) => Ok(()),
        r => r.map_err(Fail::Ssh),
    }
}

/// A few random bits for temporary names (from the kernel; the clock if it cannot say).
fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        b = t.to_le_bytes();
    }
    u32::from_le_bytes(b)
}

impl ReplicaClient for SftpReplica {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn put_new(&self, key: &str, src: &Path) -> Result<()> {
        check_key(&self.shown, "put_new", key, false)?;
        let dst = self.path(key);
        let fill = |w: &mut dyn Write| -> Try<()> {
            let mut f = File::open(src).map_err(|e| Fail::Local("read local object for", e))?;
            copy(&mut f, w, Side::Reader)
        };
        let stored = self.call("put_new", key, |c| {
            let tmp = self.upload(c, &dst, &fill)?;
            // Plain rename: refused when `dst` exists (the fence); no flags, so a server of
            // protocol version 5 or later does not overwrite either.
            match c
                .sftp
                .rename(Path::new(&tmp), Path::new(&dst), Some(RenameFlags::empty()))
            {
                Ok(()) => Ok(true),
                Err(e) => {
                    self.discard(c, &tmp);
                    if status(&e).is_some() && c.sftp.lstat(Path::new(&dst)).is_ok() {
                        Ok(false)
                    } else {
                        Err(e.into())
                    }
                }
            }
        })?;
        if stored {
            Ok(())
        } else {
            Err(ReplicaError::Exists(key.to_string()))
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        check_key(&self.shown, "put", key, false)?;
        let dst = self.path(key);
        let fill = |w: &mut dyn Write| -> Try<()> { w.write_all(data).map_err(Fail::Transfer) };
        self.call("put", key, |c| {
            let tmp = self.upload(c, &dst, &fill)?;
            let res = match c.posix_rename(&tmp, &dst) {
                Ok(true) => Ok(()),
                // A server without the extension: remove, then rename (readers may find
                // the key missing for that moment).
                Ok(false) => {
                    log::warn!(
                        "{}: the server lacks posix-rename@openssh.com: replacing {key} is not atomic",
                        self.shown
                    );
                    match c.sftp.unlink(Path::new(&dst)) {
                        Err(e) if !is_missing(&e) => Err(e),
                        _ => c.sftp.rename(Path::new(&tmp), Path::new(&dst), None),
                    }
                }
                Err(e) => Err(e),
            };
            if res.is_err() {
                self.discard(c, &tmp);
            }
            res.map_err(Fail::Ssh)
        })
    }

    fn get(&self, key: &str, dst: &Path) -> Result<bool> {
        check_key(&self.shown, "get", key, false)?;
        let path = self.path(key);
        self.call("get", key, |c| {
            let Some((mut f, _)) = Self::open_read(&c.sftp, &path)? else {
                return Ok(false);
            };
            let mut out = File::create(dst).map_err(|e| Fail::Local("create local copy of", e))?;
            copy(&mut f, &mut out, Side::Writer).map_err(|e| c.failed(e))?;
            Ok(true)
        })
    }

    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
        check_key(&self.shown, "get_range", key, false)?;
        let path = self.path(key);
        self.call("get_range", key, |c| {
            let Some((mut f, size)) = Self::open_read(&c.sftp, &path)? else {
                return Ok(None);
            };
            let n = len.min(size.saturating_sub(off));
            let n = usize::try_from(n)
                .map_err(|_| Fail::Local("read", io::Error::other("range too large for memory")))?;
            let mut buf = vec![0u8; n];
            if n > 0 {
                f.seek(SeekFrom::Start(off))
                    .map_err(|e| c.failed(Fail::Transfer(e)))?;
            }
            let mut got = 0;
            while got < n {
                match f.read(&mut buf[got..]) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(c.failed(Fail::Transfer(e))),
                }
            }
            buf.truncate(got);
            Ok(Some(buf))
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        check_key(&self.shown, "list", prefix, true)?;
        // A plain string prefix: walk from the directory of its last `/`.
        let start = prefix.rfind('/').map_or("", |i| &prefix[..=i]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut out = self.call("list", prefix, |c| {
            let mut out = Vec::new();
            // (directory key with a trailing `/`, or "" for the root)
            let mut stack = vec![start.to_string()];
            while let Some(dk) = stack.pop() {
                let dir = self.path(dk.trim_end_matches('/'));
                let dir = if dk.is_empty() {
                    if self.url.root.is_empty() {
                        ".".to_string()
                    } else {
                        self.url.root.clone()
                    }
                } else {
                    dir
                };
                let entries = match c.sftp.readdir(Path::new(&dir)) {
                    Ok(v) => v,
                    Err(e) if is_missing(&e) => continue,
                    Err(e) => return Err(e.into()),
                };
                for (p, st) in entries {
                    let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                        continue;
                    };
                    // Temporary files and anything else no key can name. A temporary
                    // file a day old is an upload that was cut off (its client stopped
                    // before it could remove it): removed, best effort.
                    if name.starts_with('.') {
                        if name.starts_with(".tmp-")
                            && st.is_file()
                            && st
                                .mtime
                                .is_some_and(|m| m.saturating_add(STALE_TMP_SECS) < now)
                        {
                            let _ = c.sftp.unlink(&p);
                        }
                        continue;
                    }
                    let key = format!("{dk}{name}");
                    if st.is_dir() {
                        let sub = format!("{key}/");
                        if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                            stack.push(sub);
                        }
                    } else if st.is_file() && key.starts_with(prefix) {
                        out.push(Listed {
                            key,
                            size: st.size.unwrap_or(0),
                            modified_ns: st.mtime.unwrap_or(0).saturating_mul(1_000_000_000),
                        });
                    }
                }
            }
            Ok(out)
        })?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(&self.shown, "delete", key, false)?;
        let path = self.path(key);
        self.call("delete", key, |c| match c.sftp.unlink(Path::new(&path)) {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            // A directory is no key.
            Err(e)
                if status(&e).is_some()
                    && c.sftp.lstat(Path::new(&path)).is_ok_and(|s| s.is_dir()) =>
            {
                Ok(())
            }
            Err(e) => Err(e.into()),
        })
    }
}

/// Which side of a copy is the local file.
enum Side {
    Reader,
    Writer,
}

/// Copies `r` into `w`: an error of the local side is `Local`, of the remote one `Transfer`.
fn copy(r: &mut dyn Read, w: &mut dyn Write, local: Side) -> Try<()> {
    let (rop, wop) = match local {
        Side::Reader => ("read local object for", ""),
        Side::Writer => ("", "write local copy of"),
    };
    let fail = |op: &'static str, e: io::Error| {
        if op.is_empty() {
            Fail::Transfer(e)
        } else {
            Fail::Local(op, e)
        }
    };
    // libssh2 keeps a whole buffer's worth of requests in flight: 2 MiB fills the pipe.
    let mut buf = vec![0u8; 2 << 20];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail(rop, e)),
        };
        w.write_all(&buf[..n]).map_err(|e| fail(wop, e))?;
    }
}
