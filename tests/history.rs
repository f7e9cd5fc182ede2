//! History views: `.history/<time>/`, `.history/txid-N/` and `.history/latest/` inside the
//! mount. The reference for every view is `sqlfs restore` of the same target from the replica
//! (with page 1's bytes 18-19 set to 1: views present rollback journal mode).
mod common;

use std::ffi::OsString;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::replica::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{Connection, OpenFlags};

const SYNC: &str = "250ms";
const COVER_TIMEOUT: Duration = Duration::from_secs(30);

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn fixture(name: &str) -> (Fixture, PathBuf) {
    let mut fx = Fixture::new(name, false);
    let dir = fx.scratch_path("replica");
    fx.opts.replicas = Some(vec![file_url(&dir)]);
    fx.opts.sync_interval = Some(SYNC.into());
    (fx, dir)
}

fn open_rw(path: &Path, journal: &str) -> Connection {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let _: String = c
        .query_row(&format!("PRAGMA journal_mode={journal}"), [], |r| r.get(0))
        .unwrap();
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
        .unwrap();
    c
}

/// One random transaction: inserts, updates or deletes, blobs of up to `blob` bytes.
fn random_txn(c: &Connection, rng: &mut StdRng, blob: usize) {
    let tx = c.unchecked_transaction().unwrap();
    for _ in 0..rng.random_range(1..6) {
        match rng.random_range(0..10) {
            0..=5 => {
                let n = rng.random_range(1..=blob);
                tx.execute(
                    "INSERT INTO t(v, b) VALUES (?1, randomblob(?2))",
                    rusqlite::params![format!("v{}", rng.random::<u32>()), n as i64],
                )
                .unwrap();
            }
            6..=8 => {
                tx.execute(
                    "UPDATE t SET v = ?1 WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 3)",
                    [format!("u{}", rng.random::<u32>())],
                )
                .unwrap();
            }
            _ => {
                tx.execute(
                    "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 2)",
                    [],
                )
                .unwrap();
            }
        }
    }
    tx.commit().unwrap();
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// `sqlfs restore` of `db` at `ts` (RFC 3339) into `out`.
fn restore_at(url: &str, db: &str, out: &Path, ts: &str) -> CmdOut {
    let _ = fs::remove_file(out);
    sqlfs_cli(&[
        os("restore"),
        os("--replica"),
        os(url),
        os("--db"),
        os(db),
        os("-o"),
        os(out),
        os("--timestamp"),
        os(ts),
    ])
}

/// Bytes of a restore output as a view presents them: page 1 in rollback journal mode.
fn as_view(mut b: Vec<u8>) -> Vec<u8> {
    if b.len() >= 100 && b.starts_with(b"SQLite format 3\0") {
        for i in [18, 19] {
            if b[i] == 2 {
                b[i] = 1;
            }
        }
    }
    b
}

fn assert_view_eq(view: &Path, restored: &Path, what: &str) {
    let v = fs::read(view).unwrap_or_else(|e| panic!("{what}: read {}: {e}", view.display()));
    let r = as_view(fs::read(restored).unwrap());
    if v != r {
        let first = v.iter().zip(&r).position(|(x, y)| x != y);
        panic!(
            "{what}: view {} ({} bytes) differs from restore ({} bytes); first differing byte {first:?}",
            view.display(),
            v.len(),
            r.len()
        );
    }
    let st = fs::metadata(view).unwrap();
    assert_eq!(st.len(), r.len() as u64, "{what}: stat size");
}

/// Rows of `t`, or -1 before the table was created (the first TXIDs of a database).
fn count_rows_rusqlite(path: &Path) -> i64 {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let has_t: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 't'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    if has_t == 0 {
        return -1;
    }
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn count_rows_cli(path: &Path) -> i64 {
    let o = std::process::Command::new("sqlite3")
        .arg(path)
        .arg("SELECT count(*) FROM t; PRAGMA integrity_check;")
        .output()
        .expect("sqlite3 CLI");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "sqlite3 {} failed: {}{}",
        path.display(),
        out,
        String::from_utf8_lossy(&o.stderr)
    );
    let mut lines = out.lines();
    let n = lines.next().unwrap().trim().parse().unwrap();
    assert_eq!(
        lines.next(),
        Some("ok"),
        "integrity_check of {}",
        path.display()
    );
    n
}

fn wait_covered(fx: &Fixture, replica: &Path, db: &str) -> u64 {
    let last = last_staged(&fx.mnt, db);
    wait_replica_covers(replica, db, last, COVER_TIMEOUT)
        .unwrap_or_else(|e| panic!("{db}: replica did not catch up: {e:?}"));
    last
}

/// Views at random TXIDs and instants, of a WAL database and a rollback-journal database in a
/// subdirectory, equal what restore writes; part of the history is only in the replica (the
/// staging log was folded), part only staged. The sqlite3 CLI and rusqlite query views.
#[test]
fn views_equal_restore_at_random_targets() {
    let seed = seed_for("views_equal_restore_at_random_targets");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut fx, replica) = fixture("hist-eq");
    let url = file_url(&replica);
    // Small: sealed 8 MiB segments get folded, so old states come from the replica.
    fx.opts.stage_limit = Some(1 << 20);
    fx.mount();
    fs::create_dir_all(fx.path("sub")).unwrap();
    let a = open_rw(&fx.path("app.db"), "wal");
    let b = open_rw(&fx.path("sub/r.db"), "delete");
    let start = now_ns();
    let mut instants = vec![];
    for i in 0..160 {
        random_txn(&a, &mut rng, if i < 100 { 200_000 } else { 3000 });
        if i % 3 == 0 {
            random_txn(&b, &mut rng, 2000);
        }
        if i % 40 == 0 {
            let _ = a.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
        }
        instants.push(now_ns());
        sleep_ms(5);
    }
    let end = now_ns();
    let last_a = wait_covered(&fx, &replica, "app.db");
    let last_b = wait_covered(&fx, &replica, "sub/r.db");
    sleep_ms(1500);

    // The listing: restore points and `latest`, all readable.
    let names: Vec<String> = fs::read_dir(fx.path(".history"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"latest".to_string()), "{names:?}");
    assert!(names.len() > 2, "{names:?}");
    for n in names.iter().filter(|n| *n != "latest").take(5) {
        assert!(n.ends_with('Z') && n.len() == 24, "{n}");
        let dir = fx.path(&format!(".history/{n}"));
        assert!(dir.is_dir(), "{n} listed but not a directory");
    }
    // `.history` is not a database and is not replicated.
    assert!(fs::metadata(fx.path(".history")).unwrap().is_dir());
    let root: Vec<String> = fs::read_dir(&fx.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(root.contains(&".history".to_string()), "{root:?}");

    // Latest equals the live file (after a checkpoint) and the latest restore.
    a.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    let out = fx.scratch_path("latest.db");
    restore_ok(&url, "app.db", &out, None);
    assert_view_eq(&fx.path(".history/latest/app.db"), &out, "latest app.db");
    assert_eq!(
        count_rows_cli(&fx.path(".history/latest/app.db")),
        a.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
            .unwrap()
    );

    // Random TXIDs of both databases.
    // Staging was folded: states before its base come from the replica only.
    let base_a = staged_log(&fx.mnt, "app.db").base.map_or(0, |b| b.0);
    assert!(
        base_a > 1,
        "app.db staging was not folded; the replica path is untested"
    );
    let mut checked = 0;
    let mut from_replica = 0;
    for (db, last) in [("app.db", last_a), ("sub/r.db", last_b)] {
        let mut picks: Vec<u64> = (0..6).map(|_| rng.random_range(1..=last)).collect();
        if db == "app.db" {
            picks.extend([base_a - 1, base_a, base_a + 1, last_a, 1]);
        }
        for t in picks {
            let out = fx.scratch_path(&format!("txid-{t}.db"));
            let _ = fs::remove_file(&out);
            let o = restore_cmd(&url, db, &out, Some(t), false);
            let view = fx.path(&format!(".history/txid-{t}/{db}"));
            if !o.ok() {
                // Not in the replica (folded locally before it was shipped: the replica got
                // a snapshot after it instead); local staging may still serve the view, which
                // restore cannot check.
                continue;
            }
            assert_view_eq(&view, &out, &format!("{db} txid-{t}"));
            // TXID 1 of app.db is the database as first seen: WAL mode set, no table yet.
            if !(db == "app.db" && t == 1) {
                assert_eq!(count_rows_rusqlite(&view), count_rows_rusqlite(&out));
            }
            checked += 1;
            if db == "app.db" && t < base_a {
                from_replica += 1;
            }
        }
    }
    // Random instants in the window (and its ends).
    let mut ts = vec![instants[0], end];
    for _ in 0..8 {
        ts.push(rng.random_range(start..end));
    }
    for t in ts {
        let name = rfc3339_ns(t);
        for db in ["app.db", "sub/r.db"] {
            let out = fx.scratch_path("at.db");
            let o = restore_at(&url, db, &out, &name);
            let view = fx.path(&format!(".history/{name}/{db}"));
            if !o.ok() {
                // Not restorable from the replica at that instant; staging may still serve it.
                let _ = &view;
                continue;
            }
            assert_view_eq(&view, &out, &format!("{db} at {name}"));
            assert_eq!(
                count_rows_cli(&view),
                count_rows_rusqlite(&out),
                "{db} at {name}"
            );
            // mtime is the commit time of the state: at or before the instant.
            let m = fs::metadata(&view).unwrap();
            let mt = m.mtime() as u64 * 1_000_000_000 + m.mtime_nsec() as u64;
            assert!(
                mt <= t && mt >= start - 10_000_000_000,
                "{db} at {name}: mtime {mt}"
            );
            assert_eq!(m.mode() & 0o777, 0o444);
            checked += 1;
        }
    }
    assert!(checked > 12);
    assert!(from_replica > 0, "no view was served from the replica");
    // cp of a view gives the same bytes.
    let cp = fx.scratch_path("copy.db");
    let st = std::process::Command::new("cp")
        .arg(fx.path(&format!(".history/txid-{last_a}/app.db")))
        .arg(&cp)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        fs::read(&cp).unwrap(),
        fs::read(fx.path(&format!(".history/txid-{last_a}/app.db"))).unwrap()
    );
    drop(a);
    drop(b);
    assert_log_no_panic(&fx.daemon_logs(), "daemon");
    fx.unmount();
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Every mutating call on or under `.history` fails with EROFS; instants outside the window
/// and names that are not times give ENOENT, and the log says why.
#[test]
fn history_is_read_only_and_bounded() {
    let (mut fx, replica) = fixture("hist-ro");
    fx.mount();
    let c = open_rw(&fx.path("app.db"), "wal");
    let mut rng = StdRng::seed_from_u64(seed_for("history_is_read_only_and_bounded"));
    for _ in 0..10 {
        random_txn(&c, &mut rng, 500);
    }
    wait_covered(&fx, &replica, "app.db");
    let view_dir = fx.path(".history/txid-5");
    let view = view_dir.join("app.db");
    assert!(view.exists());
    let erofs = Some(libc::EROFS);
    let w = fs::OpenOptions::new().write(true).open(&view);
    assert_eq!(errno_of(w), erofs, "open for writing");
    let w = fs::OpenOptions::new().read(true).write(true).open(&view);
    assert_eq!(errno_of(w), erofs, "open read-write");
    let w = fs::OpenOptions::new().append(true).open(&view);
    assert_eq!(errno_of(w), erofs, "open for append");
    assert_eq!(
        errno_of(fs::File::create(view_dir.join("new.db"))),
        erofs,
        "create"
    );
    assert_eq!(
        errno_of(fs::File::create(&view)),
        erofs,
        "create over (O_TRUNC)"
    );
    assert_eq!(errno_of(fs::create_dir(view_dir.join("d"))), erofs, "mkdir");
    assert_eq!(
        errno_of(fs::create_dir(fx.path(".history/d"))),
        erofs,
        "mkdir in .history"
    );
    assert_eq!(errno_of(fs::remove_file(&view)), erofs, "unlink");
    assert_eq!(errno_of(fs::remove_dir(&view_dir)), erofs, "rmdir");
    assert_eq!(
        errno_of(fs::remove_dir(fx.path(".history"))),
        erofs,
        "rmdir .history"
    );
    assert_eq!(
        errno_of(fs::rename(&view, view_dir.join("x.db"))),
        erofs,
        "rename within"
    );
    assert_eq!(
        errno_of(fs::rename(&view, fx.path("x.db"))),
        erofs,
        "rename out"
    );
    fs::write(fx.path("plain.txt"), b"x").unwrap();
    assert_eq!(
        errno_of(fs::rename(fx.path("plain.txt"), view_dir.join("p.txt"))),
        erofs,
        "rename in"
    );
    // (A file over a directory is refused by the kernel itself, EISDIR.)
    fs::create_dir(fx.path("somedir")).unwrap();
    assert_eq!(
        errno_of(fs::rename(fx.path("somedir"), fx.path(".history"))),
        erofs,
        "rename over .history"
    );
    assert_eq!(
        errno_of(fs::hard_link(fx.path("plain.txt"), view_dir.join("l"))),
        erofs,
        "link in"
    );
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("x", view_dir.join("s"))),
        erofs,
        "symlink"
    );
    let cpath = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let v = cpath(&view);
    // SAFETY: valid C strings.
    unsafe {
        assert_eq!(libc::truncate(v.as_ptr(), 0), -1);
        assert_eq!(*libc::__errno_location(), libc::EROFS, "truncate");
        assert_eq!(libc::chmod(v.as_ptr(), 0o666), -1);
        assert_eq!(*libc::__errno_location(), libc::EROFS, "chmod");
        assert_eq!(libc::utimes(v.as_ptr(), std::ptr::null()), -1);
        assert_eq!(*libc::__errno_location(), libc::EROFS, "utimes");
        let n = std::ffi::CString::new("user.x").unwrap();
        assert_eq!(
            libc::setxattr(v.as_ptr(), n.as_ptr(), b"1".as_ptr().cast(), 1, 0),
            -1
        );
        assert_eq!(*libc::__errno_location(), libc::EROFS, "setxattr");
        assert_eq!(libc::removexattr(v.as_ptr(), n.as_ptr()), -1);
        assert_eq!(*libc::__errno_location(), libc::EROFS, "removexattr");
        let nod = cpath(&view_dir.join("fifo"));
        assert_eq!(libc::mknod(nod.as_ptr(), libc::S_IFIFO | 0o644, 0), -1);
        assert_eq!(*libc::__errno_location(), libc::EROFS, "mknod");
    }
    // fallocate and copy_file_range into a view: the view can only be opened read-only, so
    // the kernel may refuse with EBADF before sqlfs answers EROFS; either way nothing changes.
    {
        use std::os::fd::AsRawFd;
        let before = fs::read(&view).unwrap();
        let ro = fs::File::open(&view).unwrap();
        let refused = |what: &str| {
            let e = std::io::Error::last_os_error().raw_os_error();
            assert!(
                e == Some(libc::EROFS) || e == Some(libc::EBADF),
                "{what}: {e:?}"
            );
        };
        // SAFETY: open descriptors, valid (null) offset pointers.
        unsafe {
            assert_eq!(libc::fallocate(ro.as_raw_fd(), 0, 0, 1 << 16), -1);
            refused("fallocate");
            assert_eq!(
                libc::fallocate(
                    ro.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    4096
                ),
                -1
            );
            refused("fallocate punch hole");
            let src = fs::File::open(fx.path("plain.txt")).unwrap();
            let n = libc::copy_file_range(
                src.as_raw_fd(),
                std::ptr::null_mut(),
                ro.as_raw_fd(),
                std::ptr::null_mut(),
                1,
                0,
            );
            assert_eq!(n, -1);
            refused("copy_file_range into a view");
        }
        // Out of a view, copy_file_range works (into a live file of the mount).
        let out = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(fx.path("copied.bin"))
            .unwrap();
        let mut done = 0usize;
        while done < before.len() {
            // SAFETY: open descriptors, valid (null) offset pointers.
            let n = unsafe {
                libc::copy_file_range(
                    ro.as_raw_fd(),
                    std::ptr::null_mut(),
                    out.as_raw_fd(),
                    std::ptr::null_mut(),
                    before.len() - done,
                    0,
                )
            };
            assert!(
                n > 0,
                "copy_file_range out of a view: {}",
                std::io::Error::last_os_error()
            );
            done += n as usize;
        }
        drop(out);
        assert_eq!(fs::read(fx.path("copied.bin")).unwrap(), before);
        assert_eq!(fs::read(&view).unwrap(), before);
    }
    // Still there, unchanged.
    assert!(view.exists());
    // Outside the window, or not a time.
    for bad in [
        "2000-01-01T00:00:00Z",
        "2999-01-01T00:00:00Z",
        "yesterday",
        "txid-999999",
        "txid-0",
    ] {
        let e = fs::metadata(fx.path(&format!(".history/{bad}")));
        assert_eq!(
            e.as_ref().err().map(|e| e.kind()),
            Some(ErrorKind::NotFound),
            "{bad}: {e:?}"
        );
    }
    let logs = fx.daemon_logs();
    assert!(logs.contains(".history/2000-01-01T00:00:00Z"), "{logs}");
    assert!(logs.contains("future"), "{logs}");
    assert!(logs.contains("not an RFC 3339 time"), "{logs}");
    // A real backing file named .history is hidden behind the virtual directory.
    drop(c);
    assert_log_no_panic(&fx.daemon_logs(), "daemon");
    fx.unmount();
}

/// Concurrent readers of one view see the same bytes while the live database keeps
/// writing; a view of a database whose file was deleted still reads.
#[test]
fn concurrent_readers_and_deleted_databases() {
    let (mut fx, replica) = fixture("hist-conc");
    let url = file_url(&replica);
    fx.mount();
    let c = open_rw(&fx.path("app.db"), "wal");
    let g = open_rw(&fx.path("gone.db"), "delete");
    let mut rng = StdRng::seed_from_u64(seed_for("concurrent_readers_and_deleted_databases"));
    for _ in 0..30 {
        random_txn(&c, &mut rng, 4000);
        random_txn(&g, &mut rng, 4000);
    }
    let last = wait_covered(&fx, &replica, "app.db");
    wait_covered(&fx, &replica, "gone.db");
    let t = now_ns();
    let name = rfc3339_ns(t);
    let gone_ref = fx.scratch_path("gone-ref.db");
    let o = restore_at(&url, "gone.db", &gone_ref, &name);
    assert!(o.ok(), "{}", o.describe());
    drop(g);
    sleep_ms(20);
    let view = fx.path(&format!(".history/txid-{last}/app.db"));
    let reference = fs::read(&view).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let p = fx.path("app.db");
        thread::spawn(move || {
            let c = open_rw(&p, "wal");
            let mut rng = StdRng::seed_from_u64(7);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                random_txn(&c, &mut rng, 4000);
                n += 1;
            }
            n
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let (view, reference) = (view.clone(), reference.clone());
            thread::spawn(move || {
                for _ in 0..15 {
                    if i % 2 == 0 {
                        assert_eq!(fs::read(&view).unwrap(), reference);
                    } else {
                        let n = count_rows_rusqlite(&view);
                        assert!(n >= 0);
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    // The deleted database, at an instant before its deletion.
    fs::remove_file(fx.path("gone.db")).unwrap();
    assert!(!fx.path("gone.db").exists());
    let gv = fx.path(&format!(".history/{name}/gone.db"));
    assert_view_eq(&gv, &gone_ref, "deleted database");
    assert_eq!(count_rows_cli(&gv), count_rows_rusqlite(&gone_ref));
    // Not in `latest`: it is gone.
    assert!(!fx.path(".history/latest/gone.db").exists());
    drop(c);
    assert_log_no_panic(&fx.daemon_logs(), "daemon");
    fx.unmount();
}

/// RFC 3339 UTC with nanoseconds.
fn rfc3339_ns(ns: u64) -> String {
    rfc3339(ns, 9)
}

// ---------------------------------------------------------------------------------------
// Views served from the replica (read in place, never downloaded whole)
// ---------------------------------------------------------------------------------------

/// How the CLI reads a replica: its URL, and what an encrypted one needs.
struct Rep {
    url: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Rep {
    fn plain(url: &str) -> Rep {
        Rep {
            url: url.to_string(),
            args: vec![],
            env: vec![],
        }
    }

    /// `sqlfs restore` of `db` into `out` at `target` (`--txid N` or `--timestamp T`).
    fn restore(&self, db: &str, out: &Path, target: &[&str]) -> CmdOut {
        let _ = fs::remove_file(out);
        let mut c = std::process::Command::new(BIN);
        c.args(["restore", "--replica", &self.url, "--db", db, "-o"])
            .arg(out)
            .args(target)
            .args(&self.args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let o = run_cmd(c, CLI_TIMEOUT);
        assert_no_panic(&o);
        o
    }

    /// Waits until a restore of `db` reaches `txid`.
    fn wait_covers(&self, fx: &Fixture, db: &str, txid: u64) {
        let out = fx.scratch_path("wait-covers.db");
        wait_until(
            COVER_TIMEOUT * 2,
            300,
            || {
                let o = self.restore(db, &out, &[]);
                if o.ok() && restored_txid(&o) >= txid {
                    Ok(())
                } else {
                    Err(o)
                }
            },
            |o| {
                format!(
                    "the replica did not reach TXID {txid} of {db}; last attempt:\n{}\n{}",
                    o.describe(),
                    fx.daemon_logs()
                )
            },
        )
    }
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

/// The value of the metric line starting with `name` at `addr`.
fn metric(addr: &str, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    common::replica::tree(dir).values().map(|(n, _)| n).sum()
}

/// Compares views of `db` in `fx`'s mount with restores from `rep` at each TXID of `txids` and
/// each instant of `instants` (those the replica can restore); returns the TXIDs compared.
fn compare_views(fx: &Fixture, rep: &Rep, db: &str, txids: &[u64], instants: &[u64]) -> Vec<u64> {
    let mut done = vec![];
    let out = fx.scratch_path("ref.db");
    for &t in txids {
        let o = rep.restore(db, &out, &["--txid", &t.to_string()]);
        if !o.ok() {
            eprintln!("TXID {t} is not restorable: {}", o.stderr.trim());
            continue;
        }
        let view = fx.path(&format!(".history/txid-{t}/{db}"));
        assert_view_eq(&view, &out, &format!("{db} txid-{t}"));
        assert_eq!(count_rows_rusqlite(&view), count_rows_rusqlite(&out));
        done.push(t);
    }
    for &t in instants {
        let name = rfc3339_ns(t);
        let o = rep.restore(db, &out, &["--timestamp", &name]);
        if !o.ok() {
            continue;
        }
        let view = fx.path(&format!(".history/{name}/{db}"));
        assert_view_eq(&view, &out, &format!("{db} at {name}"));
        assert_eq!(count_rows_cli(&view), count_rows_rusqlite(&out));
    }
    done
}

/// Writes `n` random transactions (large blobs for the first 60%, so staging outgrows a small
/// `--stage-limit` and is folded), a checkpoint now and then; returns the instant after each.
/// Batches of ten are paced so shipping keeps up: staging is then folded only up to what the
/// replica holds, and the replica's history has no gap (a fold past a lagging replica would
/// leave one, bridged by a snapshot).
fn write_history(c: &Connection, rng: &mut StdRng, n: usize) -> Vec<u64> {
    let mut instants = vec![];
    for i in 0..n {
        random_txn(c, rng, if i * 10 < n * 6 { 200_000 } else { 3000 });
        if i % 30 == 0 {
            let _ = c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
        }
        instants.push(now_ns());
        sleep_ms(if i % 10 == 9 { 300 } else { 5 });
    }
    instants
}

/// Waits until app.db's staging was folded past TXID 1 (its base moved); returns the base.
fn wait_folded(fx: &Fixture, db: &str) -> u64 {
    wait_until(
        COVER_TIMEOUT,
        200,
        || match staged_log(&fx.mnt, db).base.map_or(0, |b| b.0) {
            base if base > 1 => Ok(base),
            _ => Err(()),
        },
        |()| {
            format!(
                "{db}: staging was never folded; the replica path would go untested\n{}",
                fx.daemon_logs()
            )
        },
    )
}

/// The shared body of the replica cases: a WAL database written through `fx` (configured for
/// replica `rep` with a small stage limit, interval snapshots and metrics at `addr`) until its
/// staging is folded; views at random TXIDs before the staging base (served by the replica
/// only) and at random instants equal the restore of the same target. Objects are read in
/// place: nothing is downloaded into `.sqlfs/history`.
fn replica_views_case(fx: &mut Fixture, rep: &Rep, addr: &str, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    fx.mount();
    let c = open_rw(&fx.path("app.db"), "wal");
    let instants = write_history(&c, &mut rng, 120);
    let last = last_staged(&fx.mnt, "app.db");
    rep.wait_covers(fx, "app.db", last);
    let base = wait_folded(fx, "app.db");
    let mut txids: Vec<u64> = (0..10).map(|_| rng.random_range(1..base)).collect();
    txids.extend([base - 1, base / 2]);
    txids.sort();
    txids.dedup();
    let mut ts: Vec<u64> = (0..4)
        .map(|_| instants[rng.random_range(0..instants.len())])
        .collect();
    ts.push(instants[instants.len() / 3]);
    let done = compare_views(fx, rep, "app.db", &txids, &ts);
    eprintln!("staging base {base}: views at TXIDs {done:?} equal restore");
    assert!(
        done.len() * 2 >= txids.len(),
        "only TXIDs {done:?} of {txids:?} (staging base {base}) were restorable from the replica"
    );
    // Read in place: ranged reads only, nothing downloaded whole.
    assert!(metric(addr, "sqlfs_history_replica_bytes_total") > 0);
    assert_eq!(metric(addr, "sqlfs_history_whole_objects_total"), 0);
    assert_eq!(dir_bytes(&fx.backing_path(".sqlfs/history")), 0);
    drop(c);
    assert_log_no_panic(&fx.daemon_logs(), "daemon");
    fx.unmount();
}

/// Makes `fx` ship to `url` with a small stage limit (below one sealed 8 MiB segment, above
/// a quarter of it), interval snapshots and metrics.
fn configure_replica(fx: &mut Fixture, url: &str, addr: &str, extra: &[&str]) {
    fx.opts.replicas = Some(vec![url.to_string()]);
    fx.opts.sync_interval = Some(SYNC.into());
    fx.opts.stage_limit = Some(4 << 20);
    fx.opts.extra_args = ["--snapshot-interval", "1s", "--metrics-addr", addr]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
}

/// Views older than the (folded) staging log, from a file replica, equal restore.
#[test]
fn file_replica_views_equal_restore() {
    let seed = seed_for("file_replica_views_equal_restore");
    let addr = metrics_addr();
    let mut fx = Fixture::new("hist-file", false);
    let url = file_url(&fx.scratch_path("replica"));
    configure_replica(&mut fx, &url, &addr, &[]);
    replica_views_case(&mut fx, &Rep::plain(&url), &addr, seed);
}

/// The same from an S3 replica (ranged GETs).
#[test]
fn s3_replica_views_equal_restore() {
    let seed = seed_for("s3_replica_views_equal_restore");
    common::s3server::s3_test_credentials();
    let srv = common::s3server::S3Server::start("hist");
    let url = srv.url("hist", "views/host1");
    let addr = metrics_addr();
    let mut fx = Fixture::new("hist-s3", false);
    configure_replica(&mut fx, &url, &addr, &[]);
    replica_views_case(&mut fx, &Rep::plain(&url), &addr, seed);
}

/// The same from an encrypted replica (age's seekable reader over ranged reads).
#[test]
fn encrypted_replica_views_equal_restore() {
    let seed = seed_for("encrypted_replica_views_equal_restore");
    let addr = metrics_addr();
    let mut fx = Fixture::new("hist-enc", false);
    let dir = fx.scratch_path("replica");
    let url = file_url(&dir);
    let pass = "views of an encrypted replica";
    configure_replica(
        &mut fx,
        &url,
        &addr,
        &["--passphrase-env", "SQLFS_TEST_PASS"],
    );
    fx.opts.env = vec![("SQLFS_TEST_PASS".into(), pass.into())];
    let rep = Rep {
        url: url.clone(),
        args: vec!["--passphrase-env".into(), "SQLFS_TEST_PASS".into()],
        env: vec![("SQLFS_TEST_PASS".into(), pass.into())],
    };
    replica_views_case(&mut fx, &rep, &addr, seed);
    for k in common::replica::tree(&dir).keys() {
        let b = fs::read(dir.join(k)).unwrap();
        assert!(
            b.starts_with(b"age-encryption.org/v1"),
            "{k} is not encrypted"
        );
    }
}

/// Views of the first replica read it with that replica's own key from the configuration
/// file. The top level encrypts to a recipient and names its identity; the first replica has
/// a passphrase of its own (so the top-level identity cannot read it), the second takes the
/// top level's. Once staging is folded, views of TXIDs before its base (only the first
/// replica holds them) equal the restore of the same target and answer queries; the
/// passphrase appears in no log.
#[test]
fn views_read_the_first_replica_with_its_own_key() {
    let seed = seed_for("views_read_the_first_replica_with_its_own_key");
    let addr = metrics_addr();
    let mut fx = Fixture::new("hist-own-key", false);
    let key = fx.scratch_path("replica.key");
    let recipient = keygen(&key);
    let (rp, ra) = (fx.scratch_path("r-pass"), fx.scratch_path("r-age"));
    let (up, ua) = (file_url(&rp), file_url(&ra));
    let pass = "views with a key of their own";
    const VAR: &str = "SQLFS_TEST_HISTORY_PASS";
    let conf = fx.scratch_path("sqlfs.yml");
    fs::write(
        &conf,
        format!(
            "age-recipients: [{recipient}]\nage-identity: {}\nreplicas:\n  - url: {up}\n    passphrase-env: {VAR}\n  - url: {ua}\n",
            key.display()
        ),
    )
    .unwrap();
    // As `configure_replica`, with the replicas and their keys from the file.
    fx.opts.replicas = Some(Vec::new());
    fx.opts.sync_interval = Some(SYNC.into());
    fx.opts.stage_limit = Some(4 << 20);
    fx.opts.extra_args = [
        "--config",
        conf.to_str().unwrap(),
        "--snapshot-interval",
        "1s",
        "--metrics-addr",
        &addr,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    fx.opts.env = vec![(VAR.into(), pass.into())];
    let rep = Rep {
        url: up.clone(),
        args: vec!["--passphrase-env".into(), VAR.into()],
        env: vec![(VAR.into(), pass.into())],
    };
    replica_views_case(&mut fx, &rep, &addr, seed);
    let log = fx.all_daemon_logs();
    assert!(!log.contains(pass), "the passphrase appears in the log");
    // Each replica was written with its own key.
    assert!(
        has_stanza(&rp, "scrypt") && !has_stanza(&rp, "X25519"),
        "the first replica is not passphrase-encrypted"
    );
    assert!(
        has_stanza(&ra, "X25519") && !has_stanza(&ra, "scrypt"),
        "the second replica is not encrypted to the recipient"
    );
    // The top level's identity does not read the first replica: the views used its own key.
    let out = fx.scratch_path("wrong-key.db");
    let wrong = Rep {
        url: up,
        args: vec!["--age-identity".into(), key.display().to_string()],
        env: vec![],
    };
    let o = wrong.restore("app.db", &out, &[]);
    assert!(
        !o.ok() && o.stderr.contains("cannot decrypt"),
        "the first replica read with the top level's identity:\n{}",
        o.describe()
    );
}

/// After compaction and retention ran, a mount with its own, empty data directory (so every
/// view comes from the replica) shows views equal to restore at random TXIDs and instants of
/// the window.
#[test]
fn views_after_compaction_and_retention_equal_restore() {
    let seed = seed_for("views_after_compaction_and_retention_equal_restore");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut fx, replica) = fixture("hist-lvl");
    let url = file_url(&replica);
    fx.opts.extra_args = [
        "--compaction",
        "1s,3s",
        "--snapshot-interval",
        "2s",
        "--retention",
        "4s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    fx.mount();
    let c = open_rw(&fx.path("app.db"), "wal");
    let mut instants = vec![];
    for round in 0..12 {
        instants.extend(write_history(&c, &mut rng, 12));
        if round % 3 == 0 {
            let _ = c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
        }
        sleep_ms(700);
    }
    let last = wait_covered(&fx, &replica, "app.db");
    let id = replica_db_id(&replica, "app.db").unwrap();
    let has =
        |sub: &str| fs::read_dir(replica.join(&id).join(sub)).is_ok_and(|mut d| d.next().is_some());
    // Compaction reached level 2, and retention removed the start of the chain.
    let chain_start = replica.join(&id).join("l0/0000000000000001.seg");
    wait_for(
        Duration::from_secs(60),
        200,
        || has("l2") && !chain_start.exists(),
        || {
            format!(
                "no level-2 object or no retention pass; replica: {:?}",
                common::replica::tree(&replica).keys().collect::<Vec<_>>()
            )
        },
    );
    drop(c);
    fx.unmount();
    // A second mount, empty, reading the same replica.
    let addr = metrics_addr();
    let mut other = Fixture::new("hist-lvl-b", false);
    other.opts.replicas = Some(vec![url.clone()]);
    other.opts.extra_args = vec!["--metrics-addr".into(), addr.clone()];
    let before = common::replica::tree(&replica);
    other.mount();
    // The window retention left starts at the oldest snapshot kept.
    let floor = snapshots(&replica, &id).first().map_or(1, |s| s.key_txid);
    let mut txids: Vec<u64> = (0..10).map(|_| rng.random_range(floor..=last)).collect();
    txids.extend([floor, last]);
    let ts: Vec<u64> = (0..6)
        .map(|_| instants[rng.random_range(instants.len() * 3 / 4..instants.len())])
        .collect();
    let done = compare_views(&other, &Rep::plain(&url), "app.db", &txids, &ts);
    eprintln!(
        "views at TXIDs {done:?} equal restore; replica: {:?}",
        before.keys().collect::<Vec<_>>()
    );
    assert!(
        done.len() == txids.len(),
        "only TXIDs {done:?} of {txids:?} (window from {floor}) were restorable after retention"
    );
    assert!(metric(&addr, "sqlfs_history_replica_reads_total") > 0);
    assert_eq!(metric(&addr, "sqlfs_history_whole_objects_total"), 0);
    // The view-only mount changed nothing in the replica.
    let after = common::replica::tree(&replica);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert_log_no_panic(&other.daemon_logs(), "daemon");
    other.unmount();
}

/// A database deleted from the live tree whose staged history is gone too (as after the 24 h
/// staging of deleted databases expired) is still viewable from the replica, at instants
/// before its deletion; it is not in `latest`.
#[test]
fn deleted_database_served_by_the_replica_only() {
    let seed = seed_for("deleted_database_served_by_the_replica_only");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut fx, replica) = fixture("hist-gone");
    let url = file_url(&replica);
    let addr = metrics_addr();
    fx.opts.extra_args = vec!["--metrics-addr".into(), addr.clone()];
    fx.mount();
    let g = open_rw(&fx.path("gone.db"), "delete");
    let a = open_rw(&fx.path("app.db"), "wal");
    for _ in 0..25 {
        random_txn(&g, &mut rng, 5000);
        random_txn(&a, &mut rng, 5000);
    }
    wait_covered(&fx, &replica, "gone.db");
    wait_covered(&fx, &replica, "app.db");
    let t = now_ns();
    let name = rfc3339_ns(t);
    let reference = fx.scratch_path("gone-ref.db");
    let o = restore_at(&url, "gone.db", &reference, &name);
    assert!(o.ok(), "{}", o.describe());
    drop(g);
    sleep_ms(20);
    fs::remove_file(fx.path("gone.db")).unwrap();
    // The mount marks its staging as deleted; the staging is removed as on expiry.
    let db_dir = fx.backing_path(".sqlfs/db");
    let staging = || -> Option<PathBuf> {
        fs::read_dir(&db_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| fs::read_to_string(p.join("name")).is_ok_and(|n| n == "gone.db"))
    };
    wait_for(
        COVER_TIMEOUT,
        100,
        || staging().is_some_and(|d| d.join("deleted").exists()),
        || "gone.db's staging was never marked deleted".to_string(),
    );
    drop(a);
    fx.unmount();
    fs::remove_dir_all(staging().unwrap()).unwrap();
    fx.mount();
    assert!(staging().is_none());
    assert!(!fx.path("gone.db").exists());
    let reads = metric(&addr, "sqlfs_history_replica_reads_total");
    let view = fx.path(&format!(".history/{name}/gone.db"));
    assert_view_eq(&view, &reference, "deleted database from the replica");
    assert_eq!(count_rows_cli(&view), count_rows_rusqlite(&reference));
    assert!(metric(&addr, "sqlfs_history_replica_reads_total") > reads);
    assert!(!fx.path(".history/latest/gone.db").exists());
    assert!(fx.path(".history/latest/app.db").exists());
    assert_log_no_panic(&fx.daemon_logs(), "daemon");
    fx.unmount();
}

/// Opening a view served by the replica and answering a point query reads a small part of
/// the database: the objects' directories and the frames of the pages the query touches,
/// never a whole snapshot; nothing lands in `.sqlfs/history`.
#[test]
fn point_query_on_a_replica_view_reads_a_fraction() {
    let addr = metrics_addr();
    let (mut fx, replica) = fixture("hist-point");
    fx.opts.stage_limit = Some(1 << 20);
    fx.opts.extra_args = ["--snapshot-interval", "1s", "--metrics-addr", &addr]
        .iter()
        .map(|s| s.to_string())
        .collect();
    fx.mount();
    let c = open_rw(&fx.path("app.db"), "wal");
    // About 48 MiB of incompressible rows, then small transactions while snapshots of it
    // are taken.
    for _ in 0..6 {
        let tx = c.unchecked_transaction().unwrap();
        for _ in 0..64 {
            tx.execute("INSERT INTO t(v, b) VALUES ('row', randomblob(131072))", [])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let _ = c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    let mut rng = StdRng::seed_from_u64(seed_for("point_query_on_a_replica_view_reads_a_fraction"));
    for _ in 0..30 {
        random_txn(&c, &mut rng, 500);
        sleep_ms(100);
    }
    // Snapshots are taken on the shipper's schedule: wait for one of the loaded database, so
    // the transactions below come after it.
    wait_for(
        Duration::from_secs(120),
        200,
        || {
            replica_db_id(&replica, "app.db").is_some_and(|id| {
                snapshots(&replica, &id)
                    .iter()
                    .any(|s| fs::metadata(&s.path).map_or(0, |m| m.len()) > 32 << 20)
            })
        },
        || format!("no snapshot of the loaded database:\n{}", fx.daemon_logs()),
    );
    let _ = c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    for _ in 0..10 {
        random_txn(&c, &mut rng, 200_000);
    }
    wait_covered(&fx, &replica, "app.db");
    let id = replica_db_id(&replica, "app.db").unwrap();
    // The biggest snapshot the staging no longer holds. A fold during the load may have
    // moved the base before that snapshot was taken: wait for the fold after it.
    let len = |s: &ObjInfo| fs::metadata(&s.path).map_or(0, |m| m.len());
    let snap = wait_until(
        COVER_TIMEOUT,
        200,
        || {
            let base = staged_log(&fx.mnt, "app.db").base.map_or(0, |b| b.0);
            snapshots(&replica, &id)
                .into_iter()
                .filter(|s| s.key_txid < base)
                .max_by_key(len)
                .filter(|s| len(s) > 32 << 20)
                .ok_or(base)
        },
        |base| {
            format!(
                "no snapshot of the loaded database older than the staging base ({base})\n{}",
                fx.daemon_logs()
            )
        },
    );
    let snap_bytes = len(&snap);
    assert!(snap_bytes > 32 << 20, "snapshot of {snap_bytes} bytes");
    let before = metric(&addr, "sqlfs_history_replica_bytes_total");
    let view = fx.path(&format!(".history/txid-{}/app.db", snap.key_txid));
    let size = fs::metadata(&view).unwrap().len();
    assert!(size > 32 << 20, "view of {size} bytes");
    let v = Connection::open_with_flags(&view, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let got: String = v
        .query_row(
            "SELECT v FROM t WHERE id >= 200 ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(v);
    let read = metric(&addr, "sqlfs_history_replica_bytes_total") - before;
    eprintln!("open + point query: {read} bytes read of a {snap_bytes}-byte snapshot ({size}-byte database)");
    assert!(
        read * 8 < snap_bytes,
        "open + point query read {read} bytes of a {snap_bytes}-byte snapshot"
    );
    assert_eq!(metric(&addr, "sqlfs_history_whole_objects_total"), 0);
    assert!(dir_bytes(&fx.backing_path(".sqlfs/history")) < 1 << 20);
    // And the whole view is still the restore's bytes.
    let out = fx.scratch_path("snap.db");
    restore_ok(&file_url(&replica), "app.db", &out, Some(snap.key_txid));
    assert_view_eq(&view, &out, "snapshot view");
    let r = Connection::open_with_flags(&out, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let want: String = r
        .query_row(
            "SELECT v FROM t WHERE id >= 200 ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(got, want);
    drop(c);
    assert_log_no_panic(&fx.daemon_logs(), "daemon");
    fx.unmount();
}
