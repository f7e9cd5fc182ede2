//! Replica helpers: reading a file replica's layout (`names/<db-id>`, `<db-id>/l0/*.seg`,
//! `<db-id>/snap/*.snap`), waiting for shipping to catch up, `sqlfs restore`, and making a
//! replica directory unusable and usable again.
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::*;

/// Magic at the start of every replica object, and the size of an object's header.
pub use sqlfs::segment::{HEADER as OBJ_HEADER, MAGIC as OBJ_MAGIC};

/// `file://` URL of a directory.
pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// The id of database `name` in a file replica (the directory whose `name` object holds it).
pub fn replica_db_id(replica: &Path, name: &str) -> Option<String> {
    let rd = fs::read_dir(replica.join("names")).ok()?;
    for e in rd.flatten() {
        let Ok(n) = fs::read_to_string(e.path()) else {
            continue;
        };
        if n == name {
            return Some(e.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

/// Parses the 16-hex-digit TXID of an object file name `<txid>.<ext>`.
fn key_txid(file: &str, ext: &str) -> Option<u64> {
    let h = file.strip_suffix(ext)?;
    if h.len() != 16 {
        return None;
    }
    u64::from_str_radix(h, 16).ok()
}

/// One object of a database in the replica.
#[derive(Clone, Debug)]
pub struct ObjInfo {
    /// Key relative to the replica root.
    pub key: String,
    pub path: PathBuf,
    /// TXID named by the key: a segment's first, a snapshot's own.
    pub key_txid: u64,
    /// From the header (None when the header cannot be read or has no magic).
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// Header kind byte (1 segment, 2 snapshot) and database id.
    pub kind: Option<u8>,
    pub db_id: Option<String>,
}

/// The fields of an object header the tests look at.
#[derive(Clone, Copy, Debug)]
struct Head {
    first: u64,
    last: u64,
    kind: u8,
    id: [u8; 16],
}

fn read_header(path: &Path) -> Option<Head> {
    let mut f = fs::File::open(path).ok()?;
    let mut b = [0u8; OBJ_HEADER];
    f.read_exact(&mut b).ok()?;
    if &b[0..8] != OBJ_MAGIC {
        return None;
    }
    Some(Head {
        first: u64::from_be_bytes(b[32..40].try_into().unwrap()),
        last: u64::from_be_bytes(b[40..48].try_into().unwrap()),
        kind: b[10],
        id: b[16..32].try_into().unwrap(),
    })
}

fn objects_in(replica: &Path, id: &str, sub: &str, ext: &str) -> Vec<ObjInfo> {
    let dir = replica.join(id).join(sub);
    let mut v: Vec<ObjInfo> = fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let file = e.file_name().to_string_lossy().into_owned();
                    let t = key_txid(&file, ext)?;
                    let path = e.path();
                    let h = read_header(&path);
                    Some(ObjInfo {
                        key: format!("{id}/{sub}/{file}"),
                        path,
                        key_txid: t,
                        first: h.map(|h| h.first),
                        last: h.map(|h| h.last),
                        kind: h.map(|h| h.kind),
                        db_id: h.map(|h| String::from_utf8_lossy(&h.id).into_owned()),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|o| o.key_txid);
    v
}

/// Level-0 segments of database `id`, in TXID order.
pub fn segments(replica: &Path, id: &str) -> Vec<ObjInfo> {
    objects_in(replica, id, "l0", ".seg")
}

/// Snapshots of database `id`, in TXID order.
pub fn snapshots(replica: &Path, id: &str) -> Vec<ObjInfo> {
    objects_in(replica, id, "snap", ".snap")
}

/// The newest TXID the replica holds for database `name` (0 if it holds nothing).
pub fn replica_last_txid(replica: &Path, name: &str) -> u64 {
    let Some(id) = replica_db_id(replica, name) else {
        return 0;
    };
    let segs = segments(replica, &id).into_iter().filter_map(|o| o.last);
    let snaps = snapshots(replica, &id).into_iter().map(|o| o.key_txid);
    segs.chain(snaps).max().unwrap_or(0)
}

/// Waits until the replica holds database `name` up to at least `txid`; returns the newest
/// TXID it holds, or an error message after `timeout`.
pub fn wait_replica_covers(
    replica: &Path,
    name: &str,
    txid: u64,
    timeout: Duration,
) -> Result<u64, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = replica_last_txid(replica, name);
        if got >= txid {
            return Ok(got);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{}: after {timeout:?} the replica holds {name} only up to TXID {got}, not {txid}; its files: {:?}",
                replica.display(),
                tree(replica).keys().collect::<Vec<_>>()
            ));
        }
        sleep_ms(100);
    }
}

/// The newest staged TXID of a database (the base's when everything was folded).
pub fn last_staged(dir: &Path, db: &str) -> u64 {
    let l = staged_log(dir, db);
    l.entries
        .last()
        .map(|e| e.txid)
        .or(l.base.map(|b| b.0))
        .unwrap_or(0)
}

/// Every file under `dir` (hidden ones included) with its size and mtime.
pub fn tree(dir: &Path) -> BTreeMap<String, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            let p = e.path();
            if m.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, (m.len(), m.modified().unwrap()));
            }
        }
    }
    out
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// `sqlfs restore --replica URL --db DB -o OUT [--txid N] [--force]`.
pub fn restore_cmd(url: &str, db: &str, out: &Path, txid: Option<u64>, force: bool) -> CmdOut {
    restore_with(url, db, out, txid, force, None)
}

/// `sqlfs restore` with every option; `identity` is passed as `--age-identity`.
pub fn restore_with(
    url: &str,
    db: &str,
    out: &Path,
    txid: Option<u64>,
    force: bool,
    identity: Option<&Path>,
) -> CmdOut {
    let mut a = vec![
        os("restore"),
        os("--replica"),
        os(url),
        os("--db"),
        os(db),
        os("-o"),
        os(out),
    ];
    if let Some(t) = txid {
        a.push(os("--txid"));
        a.push(os(t.to_string()));
    }
    if force {
        a.push(os("--force"));
    }
    if let Some(k) = identity {
        a.push(os("--age-identity"));
        a.push(os(k));
    }
    sqlfs_cli(&a)
}

/// The TXID a successful restore reports ("... at TXID N ...").
pub fn restored_txid(o: &CmdOut) -> u64 {
    let s = format!("{}\n{}", o.stdout, o.stderr);
    s.split("at TXID ")
        .nth(1)
        .and_then(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| {
            panic!(
                "restore does not say which TXID it restored:\n{}",
                o.describe()
            )
        })
}

/// Restore that must succeed and write OUT; returns the TXID restored.
pub fn restore_ok(url: &str, db: &str, out: &Path, txid: Option<u64>) -> u64 {
    restore_ok_with(url, db, out, txid, None)
}

/// [`restore_ok`] of an encrypted replica, with `--age-identity` when `identity` is set.
pub fn restore_ok_with(
    url: &str,
    db: &str,
    out: &Path,
    txid: Option<u64>,
    identity: Option<&Path>,
) -> u64 {
    let _ = fs::remove_file(out);
    let o = restore_with(url, db, out, txid, false, identity);
    assert_no_panic(&o);
    assert!(o.ok(), "sqlfs restore failed:\n{}", o.describe());
    assert!(
        out.exists(),
        "sqlfs restore exited 0 but wrote no {}:\n{}",
        out.display(),
        o.describe()
    );
    let t = restored_txid(&o);
    if let Some(want) = txid {
        assert_eq!(
            t,
            want,
            "restore --txid {want} restored another TXID:\n{}",
            o.describe()
        );
    }
    t
}

/// A command's output must not show a panic.
pub fn assert_no_panic(o: &CmdOut) {
    assert!(
        !o.stdout.contains("panicked") && !o.stderr.contains("panicked"),
        "the command panicked:\n{}",
        o.describe()
    );
}

/// Daemon output must not show a panic.
pub fn assert_log_no_panic(log: &str, what: &str) {
    if let Some(i) = log.find("panicked") {
        let start = log[..i].rfind('\n').map_or(0, |n| n + 1);
        let end = (i + 2000).min(log.len());
        let mut end = end;
        while !log.is_char_boundary(end) {
            end -= 1;
        }
        panic!("{what}: the daemon panicked:\n{}", &log[start..end]);
    }
}

/// Files two database files must agree on byte for byte.
/// A database image as `sqlfs restore` (and a history view) presents it: the exact captured
/// bytes, except that WAL mode (file format bytes 18-19 = 2) reads as rollback mode (1), so
/// the file opens on its own.
pub fn as_restored(mut img: Vec<u8>) -> Vec<u8> {
    if img.len() >= 100 && img[18..20] == [2, 2] {
        img[18] = 1;
        img[19] = 1;
    }
    img
}

pub fn assert_same_bytes(expected: &Path, actual: &Path, what: &str) {
    let a = as_restored(
        fs::read(expected).unwrap_or_else(|e| panic!("read {}: {e}", expected.display())),
    );
    let b = fs::read(actual).unwrap_or_else(|e| panic!("read {}: {e}", actual.display()));
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        panic!(
            "{what}: {} ({} bytes) and {} ({} bytes) differ; first differing byte: {first:?}",
            expected.display(),
            a.len(),
            actual.display(),
            b.len()
        );
    }
}

/// Swaps two paths atomically (renameat2 RENAME_EXCHANGE): used to put a plain file where a
/// replica directory was, and back, with no moment at which neither exists.
pub fn exchange(a: &Path, b: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes()).unwrap();
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes()).unwrap();
    // SAFETY: two valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(
        r,
        0,
        "renameat2({}, {}, RENAME_EXCHANGE): {}",
        a.display(),
        b.display(),
        std::io::Error::last_os_error()
    );
}

/// Makes the replica directory `dir` unusable: a plain file takes its place (as root,
/// permission bits would not stop the daemon). Returns where the directory went.
pub fn break_replica(dir: &Path) -> PathBuf {
    let away = dir.with_extension("away");
    let _ = fs::remove_file(&away);
    fs::write(&away, b"not a directory\n").unwrap();
    exchange(dir, &away);
    assert!(dir.is_file());
    away
}

/// Undoes [`break_replica`].
pub fn fix_replica(dir: &Path, away: &Path) {
    exchange(dir, away);
    assert!(dir.is_dir());
    fs::remove_file(away).unwrap();
}

/// `cp -a SRC DST`.
pub fn cp_a(src: &Path, dst: &Path) {
    let o = run_cmd(
        {
            let mut c = std::process::Command::new("cp");
            c.arg("-a").arg(src).arg(dst);
            c
        },
        Duration::from_secs(120),
    );
    assert!(o.ok(), "cp -a failed:\n{}", o.describe());
}

/// A failed restore: non-zero exit, no panic, no output file and no temporary left.
pub fn assert_restore_fails(o: &CmdOut, out: &Path, what: &str) {
    assert_no_panic(o);
    assert!(!o.ok(), "{what}: restore succeeded:\n{}", o.describe());
    assert!(
        !o.stderr.trim().is_empty(),
        "{what}: restore failed without a message:\n{}",
        o.describe()
    );
    assert!(
        !out.exists(),
        "{what}: a failed restore left {} behind:\n{}",
        out.display(),
        o.describe()
    );
    let dir = out.parent().unwrap();
    let stray: Vec<String> = dir_names(dir)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        stray.is_empty(),
        "{what}: a failed restore left temporary files in {}: {stray:?}",
        dir.display()
    );
}

/// A command's output (stdout and stderr) must mention `needle`.
pub fn assert_says(o: &CmdOut, needle: &str, what: &str) {
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(
        all.contains(needle),
        "{what}: the message does not mention {needle:?}:\n{}",
        o.describe()
    );
}

/// Names of the entries of a directory, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// Encrypted replicas
// ---------------------------------------------------------------------------------------

/// What every encrypted object starts with.
pub const AGE_HEADER: &[u8] = b"age-encryption.org/v1";

/// `sqlfs keygen -o PATH`: the identity file must be created (owner-only) and the printed
/// recipient is returned.
pub fn keygen(path: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let o = sqlfs_cli(&[os("keygen"), os("-o"), os(path)]);
    assert_no_panic(&o);
    assert!(o.ok(), "sqlfs keygen failed:\n{}", o.describe());
    let recipient = o
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("age1"))
        .unwrap_or_else(|| panic!("sqlfs keygen printed no age1… recipient:\n{}", o.describe()))
        .to_string();
    let mode = fs::metadata(path)
        .unwrap_or_else(|e| panic!("keygen wrote no {}: {e}", path.display()))
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "{}: the identity file is readable by others (mode {mode:o})",
        path.display()
    );
    recipient
}

/// `bytes` (an object named `what`) must be an encrypted object: the encryption header
/// first, and nothing of a plain object (its magic) anywhere in it.
pub fn assert_sealed(bytes: &[u8], what: &str) {
    assert!(
        bytes.starts_with(AGE_HEADER),
        "{what}: not encrypted; it starts with {:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(32)])
    );
    for plain in [&OBJ_MAGIC[..7], b"SQLite format 3"] {
        assert!(
            !bytes.windows(plain.len()).any(|w| w == plain),
            "{what}: encrypted, yet {:?} appears in it in plain text",
            String::from_utf8_lossy(plain)
        );
    }
}

/// True if some object of the file replica `dir` is encrypted with an age stanza of `kind`
/// (`X25519`: to a recipient; `scrypt`: with a passphrase).
pub fn has_stanza(dir: &Path, kind: &str) -> bool {
    let stanza = format!("\n-> {kind} ");
    tree(dir).keys().any(|k| {
        fs::read(dir.join(k)).is_ok_and(|b| b.windows(stanza.len()).any(|w| w == stanza.as_bytes()))
    })
}

/// Restores `db` from `url` at `txid` (latest when `None`) and compares it with the replay
/// of the same TXID from `dir`; returns the TXID restored.
pub fn restore_vs_replay(
    url: &str,
    dir: &Path,
    db: &str,
    txid: Option<u64>,
    scratch: &Path,
) -> u64 {
    let tag = txid.map_or("latest".to_string(), |t| t.to_string());
    let safe: String = db
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let out = scratch.join(format!("restore-{safe}-{tag}.db"));
    let rep = scratch.join(format!("replay-{safe}-{tag}.db"));
    let t = restore_ok(url, db, &out, txid);
    replay(dir, db, t, &rep);
    assert_same_bytes(
        &rep,
        &out,
        &format!("{db}: restore at TXID {t} ({tag}) vs replay of TXID {t}"),
    );
    let _ = fs::remove_file(&rep);
    let _ = fs::remove_file(&out);
    t
}
