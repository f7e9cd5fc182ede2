//! Who may write: one sqlfs per data directory, and one data directory per database name in
//! a replica.
//!
//! * **The data directory lock.** A mount takes an exclusive `flock` on `.sqlfs/lock` before
//!   it reads or writes anything else in the data directory, and holds it until it exits
//!   (the kernel drops it when the process dies, however it dies). The file says who holds it
//!   (pid, mountpoint, since when), so a second mount fails at once naming the first. Offline
//!   inspection (`verify`, `log`, `replay` of an unmounted directory) takes the lock shared,
//!   so no mount starts under it; while a mount holds it they are sent to that mount's
//!   control socket instead.
//! * **The writer id.** `.sqlfs/writer` holds a random id made at the first mount of a data
//!   directory: the writer a claim names. A copy of the directory (staging included) is the
//!   same writer, and is fenced by the level-0 keys instead (docs/FORMAT.md).
//! * **The claim of a name.** A replica holds, per database name, a claim object
//!   (`claims/<SHA-256 of the name>`, docs/FORMAT.md) created with the store's conditional
//!   create: the owner's database id and writer id, and for a plain replica where it runs.
//!   A shipper ships a name only while the claim is its own; another writer's claim fences it.
//!   Handing a name over is explicit: `--takeover`, or `--restore-if-missing` (which continues
//!   the owner's chain), replaces the claim, loudly.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::backing::META_DIR;

/// The lock file's name in `.sqlfs/`.
pub const LOCK_FILE: &str = "lock";
/// The writer id's file name in `.sqlfs/`.
const WRITER_FILE: &str = "writer";

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("data directory {dir} is already served by sqlfs {holder}: one data directory is served by one sqlfs at a time (stop that one first)")]
    Held { dir: PathBuf, holder: String },
    #[error("{what} {}: {err}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        err: io::Error,
    },
}

type Result<T> = std::result::Result<T, OwnerError>;

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OwnerError + 'a {
    move |err| OwnerError::Io {
        what,
        path: path.to_path_buf(),
        err,
    }
}

/// `flock(fd, op | LOCK_NB)`: `Ok(false)` if another process holds a conflicting lock.
fn try_flock(f: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on a descriptor this process owns.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Who the lock file says holds it: "pid P, mounted at M (since T)" when that process is
/// alive, else a note that an offline command (which does not write the file) holds it.
fn describe_holder(f: &mut File) -> String {
    let mut s = String::new();
    let _ = f.rewind().and_then(|_| f.read_to_string(&mut s));
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
    };
    match (field("pid "), field("mountpoint "), field("since ")) {
        (Some(pid), Some(mnt), since)
            if pid.parse::<u32>().is_ok() && Path::new(&format!("/proc/{pid}")).exists() =>
        {
            format!(
                "pid {pid}, mounted at {mnt}{}",
                since.map(|t| format!(" (since {t})")).unwrap_or_default()
            )
        }
        _ => "a command reading it offline (sqlfs verify, log or replay); try again when it ends"
            .to_string(),
    }
}

/// The exclusive lock of a data directory, held by a mount for as long as it lives.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of data directory `data` for a mount at `mountpoint`, creating
    /// `.sqlfs/` if needed, and records the holder in the lock file. Fails at once, naming
    /// the holder, if another process holds it.
    pub fn acquire(data: &Path, mountpoint: &Path) -> Result<DirLock> {
        let meta = data.join(META_DIR);
        fs::create_dir_all(&meta).map_err(io_err("cannot create", &meta))?;
        let path = meta.join(LOCK_FILE);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        if !try_flock(&f, libc::LOCK_EX).map_err(io_err("cannot lock", &path))? {
            return Err(OwnerError::Held {
                dir: data.to_path_buf(),
                holder: describe_holder(&mut f),
            });
        }
        let text = format!(
            "pid {}\nmountpoint {}\nsince {}\n",
            std::process::id(),
            mountpoint.display(),
            crate::time::fmt_time(crate::stage::now_ns())
        );
        // The lock is the flock, not the text: a full disk (the text cannot be written) must
        // not keep the mount from serving, it only leaves the holder unnamed.
        if let Err(e) = f
            .set_len(0)
            .and_then(|()| f.rewind())
            .and_then(|()| f.write_all(text.as_bytes()))
        {
            log::warn!(
                "{}: cannot record this mount as the holder of the lock ({e}); the lock is held all the same",
                path.display()
            );
        }
        Ok(DirLock { _file: f })
    }
}

/// What offline inspection of data directory `data` may do.
pub enum Offline {
    /// Nobody serves it: read it (the shared lock, if the directory has a lock file, keeps
    /// a mount from starting meanwhile).
    Free(Option<File>),
    /// A mount holds it: its mountpoint, where its control socket answers, and who it is.
    Mounted { mountpoint: PathBuf, holder: String },
}

/// Takes the shared lock of `data` for offline reading, or says which mount holds it. Never
/// creates anything: a directory without a lock file has never been served by this build.
pub fn for_offline(data: &Path) -> Result<Offline> {
    let path = data.join(META_DIR).join(LOCK_FILE);
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Offline::Free(None)),
        Err(e) => return Err(io_err("cannot open", &path)(e)),
    };
    if try_flock(&f, libc::LOCK_SH).map_err(io_err("cannot lock", &path))? {
        return Ok(Offline::Free(Some(f)));
    }
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let mountpoint = s
        .lines()
        .find_map(|l| l.strip_prefix("mountpoint "))
        .map(|m| PathBuf::from(m.trim()));
    let holder = describe_holder(&mut f);
    match mountpoint {
        Some(mountpoint) if holder.starts_with("pid ") => {
            Ok(Offline::Mounted { mountpoint, holder })
        }
        _ => Err(OwnerError::Held {
            dir: data.to_path_buf(),
            holder,
        }),
    }
}

/// The writer id of the data directory whose metadata directory is `meta` (`.sqlfs/`),
/// made on first use.
pub fn writer_id(meta: &Path) -> io::Result<String> {
    let path = meta.join(WRITER_FILE);
    match fs::read_to_string(&path) {
        Ok(s) if is_id(s.trim()) => return Ok(s.trim().to_string()),
        Ok(_) => log::warn!("{} is not a writer id; making a new one", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut b = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    let id = format!("{:016x}", u64::from_ne_bytes(b) ^ crate::stage::now_ns());
    crate::stage::write_atomic(&path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

/// 16 lowercase hex digits.
fn is_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// This machine's host name (for claims: who holds a name).
pub fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates.
    if unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len() - 1) } != 0 {
        return "unknown".into();
    }
    let n = b.iter().position(|&c| c == 0).unwrap_or(0);
    String::from_utf8_lossy(&b[..n]).into_owned()
}

/// Key of the claim of database name `name` in a replica.
pub fn claim_key(name: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!("claims/{hex}")
}

/// The owner of a database name in a replica (docs/FORMAT.md, "Claims").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The database id whose chain is the name's.
    pub db_id: String,
    /// The writer id of the data directory shipping it.
    pub writer: String,
    /// When the claim was made (ns since the epoch).
    pub since_ns: u64,
    /// Where the writer runs (left out on encrypted replicas).
    pub host: Option<String>,
    pub data_dir: Option<String>,
}

const CLAIM_MAGIC: &str = "sqlfs claim 1";

impl Claim {
    pub fn encode(&self) -> Vec<u8> {
        let mut s = format!(
            "{CLAIM_MAGIC}\ndb {}\nwriter {}\nsince {}\n",
            self.db_id, self.writer, self.since_ns
        );
        if let Some(h) = &self.host {
            s += &format!("host {}\n", h.replace('\n', " "));
        }
        if let Some(d) = &self.data_dir {
            s += &format!("data-dir {}\n", d.replace('\n', " "));
        }
        s.into_bytes()
    }

    /// Parses a claim; `None` if `b` is not one.
    pub fn parse(b: &[u8]) -> Option<Claim> {
        let s = std::str::from_utf8(b).ok()?;
        let mut lines = s.lines();
        if lines.next()? != CLAIM_MAGIC {
            return None;
        }
        let mut c = Claim {
            db_id: String::new(),
            writer: String::new(),
            since_ns: 0,
            host: None,
            data_dir: None,
        };
        for l in lines {
            let (k, v) = l.split_once(' ').unwrap_or((l, ""));
            match k {
                "db" => c.db_id = v.to_string(),
                "writer" => c.writer = v.to_string(),
                "since" => c.since_ns = v.parse().ok()?,
                "host" => c.host = Some(v.to_string()),
                "data-dir" => c.data_dir = Some(v.to_string()),
                _ => {}
            }
        }
        (is_id(&c.db_id) && is_id(&c.writer)).then_some(c)
    }

    /// "database id D of writer W (host H, data directory P), since T".
    pub fn describe(&self) -> String {
        let mut at = Vec::new();
        if let Some(h) = &self.host {
            at.push(format!("host {h}"));
        }
        if let Some(d) = &self.data_dir {
            at.push(format!("data directory {d}"));
        }
        format!(
            "database id {} of writer {}{}, since {}",
            self.db_id,
            self.writer,
            if at.is_empty() {
                String::new()
            } else {
                format!(" ({})", at.join(", "))
            },
            crate::time::fmt_time(self.since_ns)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_round_trip() {
        let c = Claim {
            db_id: "0123456789abcdef".into(),
            writer: "fedcba9876543210".into(),
            since_ns: 1_700_000_000_000_000_000,
            host: Some("h1".into()),
            data_dir: Some("/srv/data".into()),
        };
        assert_eq!(Claim::parse(&c.encode()), Some(c.clone()));
        let plain = Claim {
            host: None,
            data_dir: None,
            ..c
        };
        assert_eq!(Claim::parse(&plain.encode()), Some(plain));
        assert_eq!(Claim::parse(b"sqlfs claim 1\ndb xyz\nwriter 1\n"), None);
        assert_eq!(Claim::parse(b"something else"), None);
        assert_eq!(claim_key("app.db").len(), "claims/".len() + 64);
        assert_ne!(claim_key("app.db"), claim_key("app.db2"));
    }

    #[test]
    fn one_lock_per_data_directory() {
        let d = tempfile::tempdir().unwrap();
        let l = DirLock::acquire(d.path(), Path::new("/mnt/a")).unwrap();
        let e = DirLock::acquire(d.path(), Path::new("/mnt/b"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("/mnt/a"),
            "{e}"
        );
        match for_offline(d.path()).unwrap() {
            Offline::Mounted { mountpoint, .. } => assert_eq!(mountpoint, Path::new("/mnt/a")),
            Offline::Free(_) => panic!("the lock is held"),
        }
        drop(l);
        let shared = for_offline(d.path()).unwrap();
        assert!(matches!(shared, Offline::Free(Some(_))));
        assert!(DirLock::acquire(d.path(), Path::new("/mnt/b")).is_err());
        drop(shared);
        DirLock::acquire(d.path(), Path::new("/mnt/b")).unwrap();
    }
}
