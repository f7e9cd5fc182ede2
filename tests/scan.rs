//! The scan at mount: databases already in the tree (nobody opens them) are captured and
//! shipped; `exclude` keeps databases out; databases copied in while unmounted are found at
//! the next mount; databases already staged are not snapshotted again; `restore --all`
//! restores a replica's every database and reports the ones that fail; `status` and `list`
//! summarise many databases.
mod common;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::replica::*;
use common::*;
use rusqlite::Connection;

#[test]
fn worker_entry() {
    common::workload::worker_main();
}

const COVER_TIMEOUT: Duration = Duration::from_secs(60);

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// A database at `path` (directories made) in `journal` mode with `rows` rows, closed.
fn make_db(path: &Path, journal: &str, rows: usize) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = Connection::open(path).unwrap();
    c.execute_batch(&format!("PRAGMA journal_mode={journal}"))
        .unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..rows {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("{}-{i}", path.display()).repeat(5)],
        )
        .unwrap();
    }
}

/// A WAL-mode database whose committed transactions are still in its `-wal` (copied while
/// its writer had it open, as after a crash: no `-shm`); returns the image its writer saw.
fn make_wal_db_with_frames(dir: &Path, scratch: &Path, rel: &str) -> Vec<u8> {
    let src = scratch.join(format!("src-{}", rel.replace('/', "_")));
    let c = Connection::open(&src).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0")
        .unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..40 {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("wal-{i}").repeat(20)],
        )
        .unwrap();
    }
    let image = snapshot(&c, true).image;
    let dst = dir.join(rel);
    fs::create_dir_all(dst.parent().unwrap()).unwrap();
    fs::copy(&src, &dst).unwrap();
    let wal = PathBuf::from(format!("{}-wal", src.display()));
    assert!(
        fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 32,
        "the WAL holds frames"
    );
    fs::copy(&wal, format!("{}-wal", dst.display())).unwrap();
    drop(c);
    image
}

/// A rollback-mode database with a hot journal beside it (copied in the middle of a
/// transaction that had spilled into the database file, as after a crash); returns the
/// committed image (its bytes before that transaction).
fn make_hot_journal_db(dir: &Path, scratch: &Path, rel: &str) -> Vec<u8> {
    let src = scratch.join(format!("src-{}", rel.replace('/', "_")));
    let c = Connection::open(&src).unwrap();
    c.execute_batch("PRAGMA journal_mode=DELETE; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..200 {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("hot-{i}").repeat(30)],
        )
        .unwrap();
    }
    let committed = fs::read(&src).unwrap();
    // A cache of a few pages: the update spills into the database file before it commits.
    c.execute_batch(
        "PRAGMA cache_size=10; PRAGMA cache_spill=ON; BEGIN; UPDATE t SET v = v || hex(randomblob(3000))",
    )
    .unwrap();
    let journal = PathBuf::from(format!("{}-journal", src.display()));
    assert!(journal.exists(), "the transaction has a journal");
    assert!(
        fs::read(&src).unwrap() != committed,
        "the transaction spilled"
    );
    let dst = dir.join(rel);
    fs::create_dir_all(dst.parent().unwrap()).unwrap();
    fs::copy(&src, &dst).unwrap();
    fs::copy(&journal, format!("{}-journal", dst.display())).unwrap();
    c.execute_batch("ROLLBACK").unwrap();
    committed
}

/// Waits until `sqlfs status` says the scan is done; returns its output.
fn wait_scan_done(mnt: &Path) -> String {
    wait_until(
        Duration::from_secs(60),
        100,
        || {
            let o = sqlfs_cli(&[os("status"), os(mnt), os("--all")]);
            if o.stdout.contains("scan: done") {
                Ok(o.stdout)
            } else {
                Err(o.describe())
            }
        },
        |last| format!("the scan did not finish; status:\n{last}"),
    )
}

/// Waits until the replica holds database `db` (at least its first snapshot).
fn wait_in_replica(replica: &Path, db: &str) {
    if let Err(e) = wait_replica_covers(replica, db, 1, COVER_TIMEOUT) {
        panic!("{e}");
    }
}

/// The names the replica holds.
fn replica_names(replica: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(replica.join("names"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `sqlfs restore --all --replica URL -o OUT` and more arguments.
fn restore_all(url: &str, out: &Path, more: &[&str]) -> CmdOut {
    let mut a = vec![
        os("restore"),
        os("--all"),
        os("--replica"),
        os(url),
        os("-o"),
        os(out),
    ];
    a.extend(more.iter().map(os));
    sqlfs_cli(&a)
}

/// The non-deleted staging directories per database name in `backing/.sqlfs/db`.
fn staged_names(backing: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in fs::read_dir(backing.join(".sqlfs/db")).unwrap().flatten() {
        if e.path().join("deleted").exists() {
            continue;
        }
        if let Ok(n) = fs::read_to_string(e.path().join("name")) {
            v.push(n);
        }
    }
    v.sort();
    v
}

#[test]
fn mount_over_existing_databases_ships_every_one() {
    let mut fx = Fixture::new("scan-existing", true);
    fx.opts.sync_interval = Some("200ms".into());
    let b = fx.backing.clone();
    make_db(&b.join("top.db"), "DELETE", 50);
    make_db(&b.join("a/b/deep-wal.db"), "WAL", 30);
    make_db(&b.join("a/b/deep-persist.db"), "PERSIST", 20);
    let wal_image = make_wal_db_with_frames(&b, &fx.scratch, "a/frames.db");
    let hot_image = make_hot_journal_db(&b, &fx.scratch, "a/b/hot.db");
    fs::write(b.join("notes.txt"), b"not a database").unwrap();
    fs::write(b.join("a/short"), b"SQLite").unwrap();
    std::os::unix::fs::symlink("top.db", b.join("link.db")).unwrap();
    std::os::unix::fs::symlink("a", b.join("linkdir")).unwrap();
    // The images every restore must equal, taken before anything is mounted.
    let closed = ["top.db", "a/b/deep-wal.db", "a/b/deep-persist.db"];
    let images: Vec<(String, Vec<u8>)> = closed
        .iter()
        .map(|r| (r.to_string(), as_restored(fs::read(b.join(r)).unwrap())))
        .chain([
            ("a/frames.db".to_string(), as_restored(wal_image)),
            ("a/b/hot.db".to_string(), as_restored(hot_image)),
        ])
        .collect();

    fx.mount();
    let replica = fx.default_replica();
    let url = file_url(&replica);
    let status = wait_scan_done(&fx.mnt);
    for (db, _) in &images {
        assert!(
            status.contains(&format!("{db}: TXID")),
            "status lists {db}:\n{status}"
        );
        wait_in_replica(&replica, db);
    }
    assert!(
        status.contains("5 databases found (5 taken in by the scan)"),
        "status shows the scan's findings:\n{status}"
    );
    // Nothing but the databases themselves: no link, nothing through a linked directory.
    assert_eq!(
        replica_names(&replica),
        vec![
            "a/b/deep-persist.db",
            "a/b/deep-wal.db",
            "a/b/hot.db",
            "a/frames.db",
            "top.db"
        ]
    );
    for (db, image) in &images {
        let out = fx.scratch_path(&format!("restored-{}", db.replace('/', "_")));
        assert_eq!(
            restore_ok(&url, db, &out, None),
            1,
            "{db}: its first snapshot"
        );
        assert_eq!(&fs::read(&out).unwrap(), image, "{db}: restored bytes");
    }
    // The databases are the apps' as before: a write through the mount continues the chain.
    {
        let c = open_db(&fx.path("top.db"));
        c.execute("INSERT INTO t(v) VALUES ('after')", []).unwrap();
    }
    fx.assert_verify();
    let last = last_staged(&fx.mnt, "top.db");
    assert!(last >= 2, "the app's commit is staged after the snapshot");
    if let Err(e) = wait_replica_covers(&replica, "top.db", last, COVER_TIMEOUT) {
        panic!("{e}");
    }
    fx.unmount();
    let live = as_restored(fs::read(b.join("top.db")).unwrap());

    // Every database at once, into a tree.
    let all = fx.scratch_path("all");
    let o = restore_all(&url, &all, &[]);
    assert!(o.ok(), "restore --all:\n{}", o.describe());
    assert!(
        o.stdout.contains("restored 5 databases") && o.stdout.contains("failed 0"),
        "{}",
        o.describe()
    );
    for (db, image) in &images {
        let want = if db == "top.db" { &live } else { image };
        assert_eq!(
            &fs::read(all.join(db)).unwrap(),
            want,
            "restore --all: {db}"
        );
    }
    assert_log_no_panic(&fx.all_daemon_logs(), "daemon");
}

#[test]
fn excluded_databases_never_reach_the_replica() {
    let mut fx = Fixture::new("scan-exclude", false);
    fx.opts.sync_interval = Some("200ms".into());
    let b = fx.backing.clone();
    make_db(&b.join("keep.db"), "WAL", 10);
    make_db(&b.join("cache/tmp.db"), "DELETE", 10);
    make_db(&b.join("deep/x/skip-me.db"), "DELETE", 10);
    let conf = fx.scratch_path("sqlfs.yml");
    fs::write(&conf, "exclude:\n  - cache\n  - '**/skip-*.db'\n").unwrap();
    fx.opts.extra_args = vec!["--config".into(), conf.display().to_string()];
    fx.mount();
    let replica = fx.default_replica();
    wait_scan_done(&fx.mnt);
    wait_in_replica(&replica, "keep.db");
    // An app writing to an excluded database through the mount: still not captured.
    {
        let c = open_db(&fx.path("cache/tmp.db"));
        c.execute("INSERT INTO t(v) VALUES ('x')", []).unwrap();
        let c = open_db(&fx.path("cache/new.db"));
        c.execute_batch("CREATE TABLE n(x)").unwrap();
    }
    let status = sqlfs_cli(&[os("status"), os(&fx.mnt)]);
    assert!(
        !status.stdout.contains("tmp.db") && !status.stdout.contains("skip-me.db"),
        "{}",
        status.describe()
    );
    fx.unmount();
    assert_eq!(replica_names(&replica), vec!["keep.db"]);
    assert_eq!(staged_names(&b), vec!["keep.db"]);

    // A bad pattern stops the mount with a clear error.
    let o = sqlfs_cli(&[
        os("mount"),
        os(&fx.mnt),
        os("--data-dir"),
        os(&b),
        os("--exclude"),
        os("/abs/*.db"),
    ]);
    assert!(
        !o.ok() && o.stderr.contains("relative to the mount root"),
        "{}",
        o.describe()
    );
}

#[test]
fn databases_copied_in_while_unmounted_are_found_and_staged_ones_are_not_snapshotted_again() {
    let mut fx = Fixture::new("scan-remount", false);
    fx.opts.sync_interval = Some("200ms".into());
    let b = fx.backing.clone();
    make_db(&b.join("old.db"), "WAL", 10);
    fx.mount();
    let replica = fx.default_replica();
    wait_scan_done(&fx.mnt);
    {
        let c = open_db(&fx.path("old.db"));
        for i in 0..3 {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("more-{i}")])
                .unwrap();
        }
    }
    let last = last_staged(&fx.mnt, "old.db");
    if let Err(e) = wait_replica_covers(&replica, "old.db", last, COVER_TIMEOUT) {
        panic!("{e}");
    }
    fx.unmount();

    // Copied in by root while nothing is mounted.
    make_db(&fx.scratch.join("elsewhere/copied.db"), "DELETE", 25);
    make_db(&fx.scratch.join("elsewhere/private.db"), "DELETE", 5);
    fs::create_dir_all(b.join("new")).unwrap();
    for f in ["copied.db", "private.db"] {
        fs::copy(fx.scratch.join("elsewhere").join(f), b.join("new").join(f)).unwrap();
    }
    let copied = as_restored(fs::read(b.join("new/copied.db")).unwrap());
    fx.opts.extra_args = vec!["--exclude".into(), "new/private.db".into()];
    fx.mount();
    let status = wait_scan_done(&fx.mnt);
    assert!(
        status.contains("2 databases found (1 taken in by the scan), 1 excluded"),
        "{status}"
    );
    wait_in_replica(&replica, "new/copied.db");
    let out = fx.scratch_path("copied-restored.db");
    restore_ok(&file_url(&replica), "new/copied.db", &out, None);
    assert_eq!(fs::read(&out).unwrap(), copied);
    // old.db continued from its staging: no new TXID, no second snapshot.
    let entries = log_entries(&fx.mnt, "old.db");
    assert_eq!(last_staged(&fx.mnt, "old.db"), last, "{entries:?}");
    let snaps = entries
        .iter()
        .filter(|e| e.line.contains("kind=snapshot"))
        .count();
    assert_eq!(snaps, 1, "one snapshot (the first sighting): {entries:?}");
    fx.unmount();
    assert_eq!(
        replica_last_txid(&replica, "old.db"),
        last,
        "nothing new shipped"
    );
    assert!(replica_db_id(&replica, "new/private.db").is_none());
}

#[test]
fn restore_all_reports_a_corrupted_database_and_restores_the_others() {
    let mut fx = Fixture::new("scan-restore-all", false);
    fx.opts.sync_interval = Some("200ms".into());
    let b = fx.backing.clone();
    let names = ["a.db", "t/1/b.db", "t/2/c.db"];
    for n in names {
        make_db(&b.join(n), "WAL", 30);
    }
    fx.mount();
    let replica = fx.default_replica();
    wait_scan_done(&fx.mnt);
    for n in names {
        wait_in_replica(&replica, n);
    }
    fx.unmount();
    // One byte of b.db's first object (its first snapshot, in a level-0 segment) flipped.
    let id = replica_db_id(&replica, "t/1/b.db").unwrap();
    let snap = &segments(&replica, &id)[0].path;
    let mut bytes = fs::read(snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(snap, bytes).unwrap();

    let out = fx.scratch_path("restored");
    let o = restore_all(&file_url(&replica), &out, &["--jobs", "2"]);
    assert_no_panic(&o);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert!(
        o.stdout.contains("restored 2 databases") && o.stdout.contains("failed 1"),
        "{}",
        o.describe()
    );
    assert!(o.stdout.contains("FAILED t/1/b.db: "), "{}", o.describe());
    for n in ["a.db", "t/2/c.db"] {
        assert_eq!(
            fs::read(out.join(n)).unwrap(),
            as_restored(fs::read(b.join(n)).unwrap()),
            "{n}"
        );
    }
    assert!(
        !out.join("t/1/b.db").exists(),
        "a failed restore writes nothing"
    );
    // JSON: complete, the failure named with its reason.
    let o = restore_all(&file_url(&replica), &fx.scratch_path("json"), &["--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", o.describe()));
    assert_eq!(v["restored"].as_array().unwrap().len(), 2);
    assert_eq!(v["failed"][0]["db"], "t/1/b.db");
    // --txid means nothing across databases.
    let o = restore_all(&file_url(&replica), &fx.scratch_path("x"), &["--txid", "1"]);
    assert!(!o.ok(), "{}", o.describe());
}

#[test]
fn status_and_list_summarise_many_databases_while_apps_race_the_scan() {
    let mut fx = Fixture::new("scan-many", false);
    fx.opts.sync_interval = Some("200ms".into());
    let b = fx.backing.clone();
    let names: Vec<String> = (0..30)
        .map(|i| format!("tenants/{}/{i}.db", i % 3))
        .collect();
    for n in &names {
        make_db(
            &b.join(n),
            if n.len() % 2 == 0 { "WAL" } else { "DELETE" },
            5,
        );
    }
    fx.mount();
    // Apps open every database while the scan takes them in (in the other order).
    {
        let c: Vec<Connection> = names.iter().rev().map(|n| open_db(&fx.path(n))).collect();
        for c in &c {
            c.execute("INSERT INTO t(v) VALUES ('raced')", []).unwrap();
        }
    }
    wait_scan_done(&fx.mnt);
    let replica = fx.default_replica();
    for n in &names {
        wait_in_replica(&replica, n);
    }
    // One capture per database, and every stream equals its files.
    let mut want = names.clone();
    want.sort();
    assert_eq!(staged_names(&b), want);
    fx.assert_verify();

    let s = sqlfs_cli(&[os("status"), os(&fx.mnt)]);
    assert!(s.ok(), "{}", s.describe());
    assert!(s.stdout.contains("30 databases: 30 ok"), "{}", s.describe());
    assert!(s.stdout.contains("worst lag"), "{}", s.describe());
    assert!(s.stdout.contains("scan: done"), "{}", s.describe());
    assert!(!s.stdout.contains(": TXID"), "a summary: {}", s.describe());
    let s = sqlfs_cli(&[os("status"), os(&fx.mnt), os("--all")]);
    for n in &names {
        assert!(
            s.stdout.contains(&format!("{n}: TXID")),
            "{n}: {}",
            s.describe()
        );
    }
    let s = sqlfs_cli(&[os("status"), os(&fx.mnt), os("--json")]);
    let v: serde_json::Value =
        serde_json::from_str(&s.stdout).unwrap_or_else(|e| panic!("{e}: {}", s.describe()));
    assert_eq!(v["databases"].as_array().unwrap().len(), 30);
    assert_eq!(v["scan"]["found"], 30);
    assert_eq!(v["scan"]["done"], true);
    fx.unmount();

    let url = file_url(&replica);
    let l = sqlfs_cli(&[os("list"), os("--replica"), os(&url)]);
    assert!(l.ok(), "{}", l.describe());
    assert!(l.stdout.starts_with("30 databases"), "{}", l.describe());
    assert!(
        !l.stdout.contains("restore window: TXID"),
        "a summary: {}",
        l.describe()
    );
    let l = sqlfs_cli(&[os("list"), os("--replica"), os(&url), os("--all")]);
    assert_eq!(
        l.stdout.matches("restore window: TXID").count(),
        30,
        "{}",
        l.describe()
    );
}
