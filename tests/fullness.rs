//! A full disk under the data directory (a small loop-mounted ext4 filesystem): staging that
//! cannot write says so (status, metrics, log), recovers by itself once space returns, with a
//! snapshot that makes the chain whole, and no commit the application saw acknowledged is
//! missing from a restore. A stop while staging fails exits non-zero, and the next mount
//! stages what is missing.
mod common;

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rusqlite::Connection;

/// A small ext4 filesystem in a file, loop-mounted for the length of a test.
struct LoopFs {
    dir: PathBuf,
    image: PathBuf,
}

impl LoopFs {
    fn new(root: &Path, mib: u64) -> LoopFs {
        let image = root.join("small.img");
        let dir = root.join("small");
        fs::create_dir_all(&dir).unwrap();
        File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .unwrap();
        let mut c = Command::new("mkfs.ext4");
        // No blocks reserved for root: the daemon (root) and the app see the same free space.
        c.args(["-q", "-F", "-m", "0", "-b", "4096"]).arg(&image);
        let o = run_cmd(c, Duration::from_secs(60));
        assert!(
            o.ok(),
            "mkfs.ext4 failed (install e2fsprogs: `make deps`):\n{}",
            o.describe()
        );
        let mut c = Command::new("mount");
        c.args(["-o", "loop"]).arg(&image).arg(&dir);
        let o = run_cmd(c, Duration::from_secs(60));
        assert!(
            o.ok(),
            "cannot loop-mount {}:\n{}",
            image.display(),
            o.describe()
        );
        LoopFs { dir, image }
    }

    /// Flushes the filesystem, so blocks freed by a truncation can be allocated again.
    fn sync(&self) {
        let f = File::open(&self.dir).unwrap();
        // SAFETY: syncfs on a descriptor this function owns.
        unsafe {
            libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f));
        }
    }

    fn free_bytes(&self) -> u64 {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs fills the struct; the path is a valid C string.
        unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            libc::statvfs(c.as_ptr(), &mut s);
            s.f_bavail as u64 * s.f_frsize as u64
        }
    }

    /// Writes `path` until the filesystem has no space left.
    fn fill(&self, path: &Path) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for chunk in [1usize << 20, 64 << 10, 4 << 10, 512] {
            let buf = vec![0x5au8; chunk];
            while f.write_all(&buf).is_ok() {}
        }
        let _ = f.sync_all();
        self.sync();
        // Writes may find a little more once the journal let go of freed blocks.
        let buf = vec![0x5au8; 4 << 10];
        while f.write_all(&buf).is_ok() {}
        let _ = f.sync_all();
        eprintln!("filled: {} bytes free", self.free_bytes());
    }

    /// Frees `bytes` of the filler `path` (all of it: removes it).
    fn free(&self, path: &Path, bytes: Option<u64>) {
        match bytes {
            Some(n) => {
                let f = OpenOptions::new().write(true).open(path).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len.saturating_sub(n)).unwrap();
            }
            None => fs::remove_file(path).unwrap(),
        }
        self.sync();
        eprintln!("freed: {} bytes free", self.free_bytes());
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        // `mount -o loop` detaches its device at unmount; make sure of it.
        if let Ok(o) = Command::new("losetup").arg("-j").arg(&self.image).output() {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if let Some((dev, _)) = line.split_once(':') {
                    let _ = Command::new("losetup").arg("-d").arg(dev).status();
                }
            }
        }
    }
}

/// A fixture whose data directory is on a fresh small filesystem; the replica (beside the
/// daemon log, in scratch) is not.
fn small_fixture(name: &str, extra: &[&str]) -> (Fixture, LoopFs) {
    let mut fx = Fixture::new(name, false);
    let lfs = LoopFs::new(&fx.root, 64);
    let data = lfs.dir.join("data");
    fs::create_dir_all(&data).unwrap();
    fx.backing = data.clone();
    fx.opts.data_dir = Some(data);
    fx.opts.sync_interval = Some("250ms".into());
    fx.opts.extra_args = extra.iter().map(|s| s.to_string()).collect();
    (fx, lfs)
}

fn status(mnt: &Path) -> CmdOut {
    sqlfs_cli(&["status".into(), mnt.as_os_str().to_os_string()])
}

/// A free loopback address for `--metrics-addr`.
fn metrics_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// The metrics text at `addr`.
fn metrics(addr: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

const DB: &str = "app.db";

/// The application: a WAL database of ~2 MiB (so a snapshot needs more than a little freed
/// space), checkpointed, so its WAL file has room for many small commits on a full disk.
fn app(fx: &Fixture) -> Connection {
    let c = open_db(&fx.path(DB));
    set_journal_mode(&c, "WAL");
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    for _ in 0..25 {
        c.execute_batch(
            "BEGIN; INSERT INTO t(v) SELECT randomblob(3000) FROM generate_series(1, 20); COMMIT;",
        )
        .or_else(|_| {
            // No generate_series in this SQLite: one row at a time.
            c.execute_batch("ROLLBACK").ok();
            c.execute_batch("BEGIN")?;
            for _ in 0..20 {
                c.execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])?;
            }
            c.execute_batch("COMMIT")
        })
        .unwrap();
    }
    c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .unwrap();
    c
}

/// One small commit; its row id if the application saw it acknowledged.
fn commit(c: &Connection, i: u64) -> Option<i64> {
    match c.execute(
        "INSERT INTO t(v) VALUES (?1)",
        [format!("row {i} committed on a full disk").into_bytes()],
    ) {
        Ok(_) => Some(c.last_insert_rowid()),
        Err(e) => {
            eprintln!("commit {i}: {e}");
            None
        }
    }
}

/// Commits until the daemon logs that capture failed (the disk is full); adds the
/// acknowledged row ids to `acked` and returns what `status` says then.
fn commit_until_staging_fails(fx: &Fixture, c: &Connection, acked: &mut Vec<i64>) -> CmdOut {
    for i in 0..2000u64 {
        acked.extend(commit(c, i));
        if i % 5 == 4 {
            sleep_ms(20);
            if fx.last_daemon_log().contains("capture failed") {
                // Observed capture reports a little later: give it the time to.
                sleep_ms(100);
                return status(&fx.mnt);
            }
        }
    }
    panic!(
        "staging never failed on the full disk; status:\n{}\nlog:\n{}",
        status(&fx.mnt).describe(),
        fx.last_daemon_log()
    );
}

/// Every row of `t` by id.
fn rows(path: &Path) -> Vec<(i64, Vec<u8>)> {
    let c = Connection::open(path).unwrap();
    let mut st = c.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    let v = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    v
}

/// Restores the latest state of `DB` from the fixture's replica and checks it against the
/// database the application left (the backing file, unmounted): same rows, every
/// acknowledged commit in it.
fn check_restore(fx: &Fixture, acked: &[i64]) {
    let out = fx.scratch_path("restored.db");
    let _ = fs::remove_file(&out);
    let url = format!("file://{}", fx.default_replica().display());
    let o = sqlfs_cli(&[
        "restore".into(),
        "--replica".into(),
        url.into(),
        "--db".into(),
        DB.into(),
        "-o".into(),
        OsString::from(out.as_os_str()),
    ]);
    assert!(o.ok(), "restore failed:\n{}", o.describe());
    let restored = rows(&out);
    let live = rows(&fx.backing_path(DB));
    let have: std::collections::HashSet<i64> = restored.iter().map(|r| r.0).collect();
    let missing: Vec<&i64> = acked.iter().filter(|id| !have.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged commit(s) are missing from the restore: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(
        restored == live,
        "the restore differs from the application's database ({} rows restored, {} live)",
        restored.len(),
        live.len()
    );
}

/// The disk fills while the application commits into its WAL: status and metrics say that
/// staging fails, the log says it once; freeing less than a snapshot needs keeps it failing
/// while commits go on; freeing enough makes staging recover by itself (no commit needed),
/// with a snapshot; after a clean stop, the restore holds every acknowledged commit.
#[test]
fn full_disk_staging_fails_loudly_and_recovers_by_itself() {
    let addr = metrics_addr();
    let (mut fx, lfs) = small_fixture("fullness", &["--metrics-addr", &addr]);
    fx.mount();
    let c = app(&fx);
    let mut acked = Vec::new();
    wait_for(
        Duration::from_secs(60),
        100,
        || {
            let s = status(&fx.mnt);
            s.ok() && s.stdout.contains(", 0 behind")
        },
        || format!("the setup never shipped:\n{}", status(&fx.mnt).describe()),
    );
    let before = log_entries(&fx.mnt, DB).last().map_or(0, |e| e.txid);
    let filler = lfs.dir.join("filler");
    lfs.fill(&filler);

    let s = commit_until_staging_fails(&fx, &c, &mut acked);
    assert!(
        !s.ok(),
        "status exits 0 while staging fails:\n{}",
        s.describe()
    );
    assert!(s.stdout.contains("STAGING FAILING"), "{}", s.describe());
    let m = metrics(&addr);
    assert!(
        m.contains(&format!("sqlfs_staging_failing{{db=\"{DB}\"}} 1")),
        "metrics do not say staging fails:\n{m}"
    );
    // A checkpoint now would destroy WAL frames that are not staged: it is refused, and the
    // WAL keeps them.
    let wal = fx.backing_path(&format!("{DB}-wal"));
    let wal_len = fs::metadata(&wal).unwrap().len();
    let r = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    });
    eprintln!("checkpoint while staging fails: {r:?}");
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.0 != 0),
        "a checkpoint went through while staging fails: {r:?}"
    );
    assert_eq!(
        fs::metadata(&wal).unwrap().len(),
        wal_len,
        "the WAL changed size under a refused checkpoint"
    );
    // Less space than a snapshot of the database needs: still failing, commits go on.
    lfs.free(&filler, Some(64 << 10));
    for i in 0..40 {
        acked.extend(commit(&c, 10_000 + i));
        sleep_ms(25);
    }
    let s = status(&fx.mnt);
    assert!(
        !s.ok() && s.stdout.contains("STAGING FAILING"),
        "staging does not fail with less space than a snapshot needs?\n{}",
        s.describe()
    );
    // Space returns: staging recovers without waiting for a commit.
    lfs.free(&filler, None);
    wait_for(
        Duration::from_secs(60),
        100,
        || status(&fx.mnt).ok(),
        || {
            format!(
                "staging did not recover by itself:\n{}\nlog:\n{}",
                status(&fx.mnt).describe(),
                fx.last_daemon_log()
            )
        },
    );
    let log = fx.last_daemon_log();
    assert_eq!(
        log.matches("commits are not being staged").count(),
        1,
        "the first failure is logged once, not per commit:\n{log}"
    );
    assert!(
        log.contains("staging works again"),
        "no recovery line:\n{log}"
    );
    let m = metrics(&addr);
    assert!(
        m.contains(&format!("sqlfs_staging_failing{{db=\"{DB}\"}} 0")),
        "metrics still say staging fails:\n{m}"
    );
    let entries = log_entries(&fx.mnt, DB);
    assert!(
        entries
            .iter()
            .any(|e| e.txid > before && e.line.contains("kind=snapshot")),
        "no snapshot staged after the failure:\n{entries:#?}"
    );
    for i in 0..20 {
        acked.extend(commit(&c, 20_000 + i));
    }
    drop(c);
    assert_verify(&fx.mnt);
    fx.unmount();
    assert_verify(&fx.backing);
    check_restore(&fx, &acked);
}

/// A stop while staging fails exits non-zero and leaves no clean-shutdown mark; `verify`
/// says the staged stream lacks the files' state; a mount on the still full disk says
/// staging fails, and once space returns it stages what is missing: verify passes and the
/// restore holds every acknowledged commit.
fn stop_while_staging_fails(name: &str, extra: &[&str]) {
    let (mut fx, lfs) = small_fixture(name, extra);
    fx.mount();
    let c = app(&fx);
    let mut acked = Vec::new();
    let filler = lfs.dir.join("filler");
    lfs.fill(&filler);
    let s = commit_until_staging_fails(&fx, &c, &mut acked);
    assert!(
        !s.ok(),
        "status exits 0 while staging fails:\n{}",
        s.describe()
    );
    assert!(s.stdout.contains("STAGING FAILING"), "{}", s.describe());
    for i in 0..10 {
        acked.extend(commit(&c, 10_000 + i));
    }
    drop(c);
    let st = fx.unmount_status();
    let log = fx.last_daemon_log();
    assert!(
        !st.success(),
        "sqlfs exited 0 after SIGTERM although commits were not staged:\n{log}"
    );
    assert!(
        log.contains("stopping while commits are not staged"),
        "the stop does not say what is missing:\n{log}"
    );
    assert!(
        !fs::read_dir(fx.backing.join(".sqlfs/db"))
            .unwrap()
            .flatten()
            .any(|d| d.path().join("clean").exists()),
        "a clean-shutdown mark vouches for a stream that lacks commits"
    );
    let v = verify(&fx.backing, None);
    assert!(
        !v.ok(),
        "verify passes although the last commits are not staged:\n{}",
        v.describe()
    );
    // Still full: the mount comes up and says staging fails.
    fx.mount();
    let s = status(&fx.mnt);
    eprintln!("status after a mount on a full disk:\n{}", s.describe());
    lfs.free(&filler, None);
    wait_for(
        Duration::from_secs(60),
        100,
        || status(&fx.mnt).ok(),
        || {
            format!(
                "staging did not recover:\n{}\nlog:\n{}",
                status(&fx.mnt).describe(),
                fx.all_daemon_logs()
            )
        },
    );
    assert_verify(&fx.mnt);
    let c = open_db(&fx.path(DB));
    for i in 0..10 {
        acked.extend(commit(&c, 20_000 + i));
    }
    drop(c);
    fx.unmount();
    assert_verify(&fx.backing);
    check_restore(&fx, &acked);
}

/// Written through: every WAL write reaches sqlfs.
#[test]
fn stop_while_staging_fails_exits_nonzero_and_the_next_mount_stages_the_rest() {
    stop_while_staging_fails("fullness-stop", &["--passthrough", "off"]);
}

/// Observed: commits are read from the WAL.
#[test]
fn stop_while_staging_fails_observed() {
    stop_while_staging_fails("fullness-stop-obs", &[]);
}

/// Rollback journal (PERSIST, so the journal's blocks are reused; rows go into free pages, so
/// the database file does not grow): the database file is the only copy of what could not be
/// staged. Staging says it fails, recovers by itself with a snapshot once space returns, and
/// the restore holds every acknowledged commit.
#[test]
fn full_disk_rollback_journal() {
    let (mut fx, lfs) = small_fixture("fullness-rollback", &[]);
    fx.mount();
    let c = open_db(&fx.path(DB));
    set_journal_mode(&c, "PERSIST");
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    c.execute_batch("BEGIN").unwrap();
    for _ in 0..500 {
        c.execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])
            .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
    // Free pages for the rows to come, and a journal as large as a big transaction.
    c.execute_batch("DELETE FROM t WHERE id > 100").unwrap();
    let filler = lfs.dir.join("filler");
    lfs.fill(&filler);
    let mut acked = Vec::new();
    let s = commit_until_staging_fails(&fx, &c, &mut acked);
    assert!(
        !s.ok() && s.stdout.contains("STAGING FAILING"),
        "status does not say staging fails:\n{}",
        s.describe()
    );
    for i in 0..10 {
        acked.extend(commit(&c, 10_000 + i));
    }
    lfs.free(&filler, None);
    wait_for(
        Duration::from_secs(60),
        100,
        || status(&fx.mnt).ok(),
        || {
            format!(
                "staging did not recover by itself:\n{}\nlog:\n{}",
                status(&fx.mnt).describe(),
                fx.last_daemon_log()
            )
        },
    );
    for i in 0..10 {
        acked.extend(commit(&c, 20_000 + i));
    }
    drop(c);
    assert_verify(&fx.mnt);
    fx.unmount();
    assert_verify(&fx.backing);
    assert!(
        acked.len() > 20,
        "only {} commits acknowledged",
        acked.len()
    );
    check_restore(&fx, &acked);
}
