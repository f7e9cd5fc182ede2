//! Who may write: a database name in a replica has one owner at a time (a second data
//! directory shipping the same name is fenced until it takes the name over explicitly), and a
//! data directory is served by one sqlfs at a time.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::replica::*;
use common::*;
use rusqlite::Connection;

/// Inserts rows `from..to` written by `who` into `t` of the database at `path`.
fn write_rows(path: &Path, who: &str, from: i64, to: i64) {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(BUSY_TIMEOUT).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, who TEXT, v BLOB)",
    )
    .unwrap();
    for i in from..to {
        c.execute(
            "INSERT INTO t(id, who, v) VALUES (?1, ?2, randomblob(200))",
            rusqlite::params![i, who],
        )
        .unwrap();
    }
}

/// (id, who) of every row; none before the table exists (a restore may reach a state from
/// before it: the first commit after a quiet interval is shipped at once).
fn rows(path: &Path) -> Vec<(i64, String)> {
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let Ok(mut st) = c.prepare("SELECT id, who FROM t ORDER BY id") else {
        return Vec::new();
    };
    let v = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    v
}

fn status(mnt: &Path) -> CmdOut {
    sqlfs_cli(&["status".into(), mnt.as_os_str().to_os_string()])
}

/// The status line of `app.db` on the replica (the indented one).
fn replica_line(o: &CmdOut) -> String {
    o.stdout
        .lines()
        .find(|l| l.starts_with("  "))
        .unwrap_or("")
        .to_string()
}

/// Waits until a restore of the latest `app.db` from `url` has exactly `want` rows.
fn wait_restored(
    url: &str,
    out: &Path,
    want: &[(i64, String)],
    what: &str,
    logs: &dyn Fn() -> String,
) {
    wait_until(
        Duration::from_secs(60),
        300,
        || {
            let o = restore_cmd(url, "app.db", out, None, true);
            if o.ok() && rows(out) == want {
                Ok(())
            } else {
                Err(o)
            }
        },
        |o| {
            format!(
                "{what}: the latest restore never showed the expected rows ({} wanted); last restore:\n{}\n{}",
                want.len(),
                o.describe(),
                logs()
            )
        },
    );
}

fn both(a: &Fixture, b: &Fixture) -> String {
    format!("A:\n{}\nB:\n{}", a.daemon_logs(), b.daemon_logs())
}

/// Two data directories (two machines, a blue-green deploy) ship `app.db` to one replica:
/// the second is refused (fenced, `status` exits 1 and says so) and the replica keeps the
/// first one's database, whatever the second writes; restores return the first writer's
/// data every time. `--takeover` hands the name over: then restores return the second
/// writer's data and the first one is fenced.
#[test]
fn a_database_name_has_one_owner_per_replica() {
    let mut a = Fixture::new("ownA", false);
    let rdir = a.scratch_path("replica");
    let url = file_url(&rdir);
    a.opts.replicas = Some(vec![url.clone()]);
    a.opts.sync_interval = Some("200ms".into());
    let mut b = Fixture::new("ownB", false);
    b.opts.replicas = Some(vec![url.clone()]);
    b.opts.sync_interval = Some("200ms".into());

    a.mount();
    write_rows(&a.path("app.db"), "A", 0, 20);
    let out = a.scratch_path("latest.db");
    wait_restored(&url, &out, &rows(&a.path("app.db")), "A alone", &|| {
        both(&a, &b)
    });

    b.mount();
    write_rows(&b.path("app.db"), "B", 0, 20);
    let fenced = wait_until(
        Duration::from_secs(60),
        300,
        || {
            let o = status(&b.mnt);
            if replica_line(&o).contains("FENCED") {
                Ok(o)
            } else {
                Err(o)
            }
        },
        |o| {
            format!(
                "the second writer of app.db is not fenced:\n{}\n{}",
                o.describe(),
                both(&a, &b)
            )
        },
    );
    assert_eq!(fenced.status.code(), Some(1), "{}", fenced.describe());
    assert!(
        fenced.stdout.contains("--takeover"),
        "the status does not say how to hand the name over:\n{}",
        fenced.stdout
    );
    let sa = status(&a.mnt);
    assert!(sa.ok(), "the owner's status:\n{}", sa.describe());

    // Both go on writing; the replica is A's, every time.
    write_rows(&a.path("app.db"), "A", 20, 30);
    write_rows(&b.path("app.db"), "B", 20, 30);
    let rows_a = rows(&a.path("app.db"));
    wait_restored(&url, &out, &rows_a, "A and a fenced B", &|| both(&a, &b));
    for i in 0..3 {
        let o = restore_cmd(&url, "app.db", &out, None, true);
        assert!(o.ok(), "{}", o.describe());
        assert_eq!(
            rows(&out),
            rows_a,
            "restore {i} is not the owner's database"
        );
    }
    let names: Vec<String> = fs::read_dir(rdir.join("names"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "database ids in the replica: {names:?}");
    assert!(
        b.last_daemon_log().contains("belongs to another sqlfs"),
        "{}",
        both(&a, &b)
    );

    // The explicit handover.
    b.unmount();
    b.opts.extra_args = vec!["--takeover".into()];
    b.mount();
    write_rows(&b.path("app.db"), "B", 30, 40);
    let rows_b = rows(&b.path("app.db"));
    wait_restored(&url, &out, &rows_b, "after --takeover", &|| both(&a, &b));
    assert!(
        b.last_daemon_log().contains("TAKING OVER"),
        "the takeover is not logged loudly:\n{}",
        both(&a, &b)
    );
    // A finds out the next time it ships.
    let mut n = 100;
    wait_until(
        Duration::from_secs(60),
        500,
        || {
            write_rows(&a.path("app.db"), "A", n, n + 1);
            n += 1;
            let o = status(&a.mnt);
            if replica_line(&o).contains("FENCED") && o.status.code() == Some(1) {
                Ok(())
            } else {
                Err(o)
            }
        },
        |o| {
            format!(
                "the former owner is not fenced after the takeover:\n{}\n{}",
                o.describe(),
                both(&a, &b)
            )
        },
    );
    for i in 0..3 {
        let o = restore_cmd(&url, "app.db", &out, None, true);
        assert!(o.ok(), "{}", o.describe());
        assert_eq!(rows(&out), rows_b, "restore {i} after the takeover");
    }
    let sb = status(&b.mnt);
    assert!(sb.ok(), "the new owner's status:\n{}", sb.describe());
    assert_log_no_panic(&both(&a, &b), "mounts");
    a.unmount();
    b.unmount();
}

/// One data directory mounted at a second mountpoint: the second mount fails at once,
/// naming the first (its pid and mountpoint), and nothing is mounted. `verify` and `log`
/// of the data directory itself go to the running mount; once it is stopped they read the
/// directory offline, and it can be mounted again.
#[test]
fn a_data_directory_is_served_by_one_mount() {
    let mut fx = Fixture::new("onelock", false);
    fx.mount();
    write_rows(&fx.path("app.db"), "A", 0, 10);
    let pid = fx.daemon_pid().unwrap();
    let mnt2: PathBuf = fx.root.join("mnt2");
    fs::create_dir_all(&mnt2).unwrap();
    let err = fx.scratch_path("mount2.err");
    let mut child = Command::new(BIN)
        .arg("mount")
        .arg(&mnt2)
        .arg("--data-dir")
        .arg(&fx.backing)
        .arg("--replica")
        .arg(file_url(&fx.scratch_path("replica2")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    let exited = wait_timeout(&mut child, Duration::from_secs(30));
    if exited.is_none() {
        kill9_child(&mut child);
    }
    let mounted = sqlfs_mounts_at(&mnt2);
    if mounted > 0 {
        lazy_umount(&mnt2);
    }
    let stderr = fs::read_to_string(&err).unwrap_or_default();
    assert!(
        exited.is_some_and(|s| !s.success()) && mounted == 0,
        "a second mount of one data directory was accepted ({exited:?}):\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {pid}")) && stderr.contains(&fx.mnt.display().to_string()),
        "the refusal does not name the holder (pid {pid}, {}):\n{stderr}",
        fx.mnt.display()
    );
    // Inspection of the data directory goes through the mount that serves it.
    let v = verify(&fx.backing, None);
    assert!(v.ok() && v.stdout.contains("app.db"), "{}", v.describe());
    let l = log_cmd(&fx.backing, "app.db");
    assert!(l.ok(), "{}", l.describe());
    assert_eq!(
        parse_log(&l.stdout).last().map(|e| e.txid),
        log_entries(&fx.mnt, "app.db").last().map(|e| e.txid)
    );
    fx.unmount();
    // Offline, and mounted again.
    let v = verify(&fx.backing, None);
    assert!(v.ok() && v.stdout.contains("app.db"), "{}", v.describe());
    fx.mount();
    write_rows(&fx.path("app.db"), "A", 10, 12);
    fx.unmount();
    assert_verify(&fx.backing);
}
