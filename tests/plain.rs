//! Plain files (not part of a database) pass straight through the kernel, and a plain file
//! that becomes a database is captured from that moment (docs/ARCHITECTURE.md, invariant 14):
//! its header written through a handle that bypasses sqlfs, a rename over a database's name, a
//! database renamed onto it. SQLite cannot start a transaction beside a writer that bypasses
//! sqlfs. "Goes straight through" is shown without timing: with the daemon stopped (SIGSTOP),
//! such a write still completes, and a write that needs the daemon cannot.
mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use rusqlite::Connection;

/// How long a write that goes straight through may take on a busy machine.
const SOON: Duration = Duration::from_secs(60);
/// How long a write that needs the stopped daemon is watched (it can never finish).
const NEVER: Duration = Duration::from_secs(2);

/// A database built outside the mount (rollback journal, so the file is the whole state).
fn native_db(path: &Path, rows: usize) -> Vec<u8> {
    let _ = fs::remove_file(path);
    let c = Connection::open(path).unwrap();
    c.execute_batch("PRAGMA journal_mode=DELETE; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
        .unwrap();
    for i in 0..rows {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("row {i:05} {}", "x".repeat(200))],
        )
        .unwrap();
    }
    drop(c);
    fs::read(path).unwrap()
}

/// Runs `op` on another thread while the daemon is stopped (the file `op` writes must have
/// been written once before: the first write to an inode asks the daemon); true if it finished before the
/// daemon was continued (it never can if it needs the daemon). The daemon is continued in
/// any case, and `op` is waited for. What `op` returns (the file it used) is dropped only
/// after that: closing a file asks the daemon.
fn done_while_stopped<T: Send + 'static>(
    fx: &Fixture,
    wait: Duration,
    op: impl FnOnce() -> T + Send + 'static,
) -> bool {
    let pid = fx.daemon_pid().expect("daemon pid");
    stop_process(pid);
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let keep = op();
        let _ = tx.send(());
        drop(keep);
    });
    // A write straight to the backing file finishes as soon as the disk lets it (a busy
    // machine may hold it a while: the wait for it is long, and ends when it finishes); one
    // that needs the stopped daemon never finishes, however long this waits.
    let done = rx.recv_timeout(wait).is_ok();
    send_signal(pid, libc::SIGCONT);
    t.join().unwrap();
    done
}

/// The staged log's lines (TXID order) for `db`.
fn staged(fx: &Fixture, db: &str) -> Vec<LogEntry> {
    log_entries(&fx.cli_dir(), db)
}

/// The last staged state of `db` replayed equals `image`.
fn assert_last_staged_is(fx: &Fixture, db: &str, image: &[u8], what: &str) {
    let e = staged(fx, db);
    let last = e
        .last()
        .unwrap_or_else(|| panic!("{what}: nothing staged for {db}"));
    let out = fx.scratch_path(&format!("replay-{}", last.txid));
    replay(&fx.cli_dir(), db, last.txid, &out);
    let got = fs::read(&out).unwrap();
    assert!(
        got == image,
        "{what}: replay of TXID {} ({} bytes) differs from the file ({} bytes)",
        last.txid,
        got.len(),
        image.len()
    );
}

#[test]
fn plain_files_bypass_the_daemon_and_new_databases_do_not() {
    let mut fx = Fixture::new("plainpt", false);
    fx.mount();
    // Write-only (an upload, a log): straight through.
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(fx.path("app.log"))
        .unwrap();
    log.write_at(b"started\n", 0).unwrap();
    let f = log.try_clone().unwrap();
    assert!(
        done_while_stopped(&fx, SOON, move || {
            f.write_all_at(b"line two\n", 8).unwrap();
            f
        }),
        "a write-only plain file's write needed the daemon"
    );
    drop(log);
    // Read-only and read-write opens of a file that is not empty and no database: straight
    // through as well.
    let r = fs::File::open(fx.path("app.log")).unwrap();
    assert!(
        done_while_stopped(&fx, SOON, move || {
            let mut b = [0u8; 8];
            r.read_exact_at(&mut b, 0).unwrap();
            assert_eq!(&b, b"started\n");
            r
        }),
        "a read of a plain file needed the daemon"
    );
    let rw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.path("app.log"))
        .unwrap();
    assert!(
        done_while_stopped(&fx, SOON, move || {
            rw.write_all_at(b"S", 0).unwrap();
            rw
        }),
        "a read-write open of a non-empty plain file needed the daemon"
    );
    assert_eq!(
        fs::read(fx.backing_path("app.log")).unwrap(),
        b"Started\nline two\n"
    );
    // An empty file opened read-write may become a database (SQLite creating one): its
    // writes go through sqlfs.
    let new = fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(fx.path("new.db"))
        .unwrap();
    assert!(
        !done_while_stopped(&fx, NEVER, move || {
            new.write_all_at(b"x", 0).unwrap();
            new
        }),
        "a read-write open of an empty file went straight through"
    );
    // So does every database's main file, whatever the open.
    let c = open_db(&fx.path("app.db"));
    set_journal_mode(&c, "DELETE");
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    let db = fs::OpenOptions::new()
        .write(true)
        .open(fx.path("app.db"))
        .unwrap();
    assert!(
        !done_while_stopped(&fx, NEVER, move || {
            db.write_all_at(&[0u8; 4], 96).unwrap();
            db
        }),
        "a write-only open of a database went straight through"
    );
    fx.assert_verify();
    fx.unmount();
}

#[test]
fn a_database_copied_in_through_a_straight_handle_is_captured() {
    let mut fx = Fixture::new("plaincopy", false);
    fx.mount();
    let image = native_db(&fx.scratch_path("src.db"), 300);
    // A copy into a new file (write-only: straight through), fsynced while still open:
    // captured at the fsync.
    let f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(fx.path("copy.db"))
        .unwrap();
    // The first write to a new inode asks the daemon once (the kernel looks for privileges
    // to drop); the ones after it do not.
    f.write_all_at(&image[..100], 0).unwrap();
    let g = f.try_clone().unwrap();
    let img = image.clone();
    assert!(
        done_while_stopped(&fx, SOON, move || {
            g.write_all_at(&img, 0).unwrap();
            g
        }),
        "the copy did not go straight through"
    );
    f.sync_all().unwrap();
    let e = staged(&fx, "copy.db");
    assert_eq!(e.len(), 1, "the fsync of the copy captured it: {e:?}");
    assert!(e[0].line.contains("snapshot"), "{}", e[0].line);
    assert_last_staged_is(&fx, "copy.db", &image, "after the copy's fsync");
    drop(f);
    // From here SQLite's writes are captured one by one.
    let c = open_db(&fx.path("copy.db"));
    c.execute("DELETE FROM t WHERE id % 3 = 0", []).unwrap();
    c.execute("INSERT INTO t(v) VALUES ('after')", []).unwrap();
    drop(c);
    let e = staged(&fx, "copy.db");
    assert_gap_free(&e, "copy.db");
    assert_eq!(e.len(), 3, "two transactions after the snapshot: {e:?}");
    assert_last_staged_is(
        &fx,
        "copy.db",
        &fs::read(fx.path("copy.db")).unwrap(),
        "after SQLite",
    );

    // A copy closed without fsync (cp): captured at the close.
    fs::write(fx.path("cp.db"), &image).unwrap();
    assert_eq!(staged(&fx, "cp.db").len(), 1);
    assert_last_staged_is(&fx, "cp.db", &image, "after the close");
    fx.assert_verify();
    fx.unmount();
    assert_verify(&fx.backing);
}

#[test]
fn renames_make_plain_files_databases_and_back() {
    let mut fx = Fixture::new("plainmv", false);
    fx.mount();
    let image = native_db(&fx.scratch_path("src.db"), 200);
    // A database that exists and is captured.
    let c = open_db(&fx.path("app.db"));
    set_journal_mode(&c, "DELETE");
    c.execute_batch("CREATE TABLE old(x); INSERT INTO old VALUES (1);")
        .unwrap();
    drop(c);
    assert!(!staged(&fx, "app.db").is_empty());
    // A temporary file written straight through (a download), still open, renamed over the
    // database's name: captured from the rename.
    let tmp = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(fx.path("app.db.tmp"))
        .unwrap();
    tmp.write_all_at(&image, 0).unwrap();
    fs::rename(fx.path("app.db.tmp"), fx.path("app.db")).unwrap();
    let e = staged(&fx, "app.db");
    assert_eq!(e.len(), 1, "the renamed file is a new database: {e:?}");
    assert_last_staged_is(&fx, "app.db", &image, "after the rename");
    // The open handle keeps writing past sqlfs (a page changed, as an app patching the file
    // would): its close stages the file as it is then.
    let mut patched = image.clone();
    let ps = u16::from_be_bytes([image[16], image[17]]) as usize;
    let p2 = ps; // start of page 2
    let mut page2 = image[p2..p2 + ps].to_vec();
    page2[ps - 1] ^= 0x5a;
    patched[p2..p2 + ps].copy_from_slice(&page2);
    tmp.write_all_at(&page2, p2 as u64).unwrap();
    drop(tmp);
    let e = staged(&fx, "app.db");
    assert_eq!(e.len(), 2, "the close staged what the handle wrote: {e:?}");
    assert_last_staged_is(&fx, "app.db", &patched, "after the handle closed");

    // A database renamed onto a plain file that a writer holds open: the database keeps its
    // identity and stream; the writer's handle writes the old, unnamed file.
    let c = open_db(&fx.path("two.db"));
    set_journal_mode(&c, "WAL");
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    let before = staged(&fx, "two.db").len();
    fs::write(fx.path("notes.txt"), b"some notes\n").unwrap();
    let w = fs::OpenOptions::new()
        .append(true)
        .open(fx.path("notes.txt"))
        .unwrap();
    fs::rename(fx.path("two.db"), fx.path("notes.txt")).unwrap();
    w.write_all_at(b"more notes\n", 11).unwrap();
    drop(w);
    let c = open_db(&fx.path("notes.txt"));
    c.execute("INSERT INTO t VALUES (2)", []).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    drop(c);
    let e = staged(&fx, "notes.txt");
    assert_gap_free(&e, "notes.txt");
    assert_eq!(
        e.len(),
        before + 1,
        "one more transaction on the renamed database: {e:?}"
    );
    fx.assert_verify();
    fx.unmount();
    assert_verify(&fx.backing);
}

#[test]
fn sqlite_cannot_write_beside_a_straight_writer() {
    let mut fx = Fixture::new("plainbusy", false);
    fx.mount();
    // An empty file held open write-only (straight through): SQLite opening it joins that
    // way, so it may not start a transaction (its journal or WAL cannot be opened).
    let holder = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(fx.path("held.db"))
        .unwrap();
    for mode in ["DELETE", "WAL"] {
        let c = Connection::open(fx.path("held.db")).unwrap();
        let r = c
            .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| {
                r.get::<_, String>(0)
            })
            .and_then(|_| c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);"));
        assert!(r.is_err(), "{mode}: SQLite wrote a database past sqlfs");
    }
    assert_eq!(fs::metadata(fx.backing_path("held.db")).unwrap().len(), 0);
    drop(holder);
    // Once the writer is gone, the file is an empty file like any other: SQLite makes it a
    // database through sqlfs, captured from its first transaction. (The kernel tells the
    // daemon of a close after close returns: until the daemon has heard of it, the file
    // counts as held.)
    let path = fx.path("held.db");
    wait_until(
        Duration::from_secs(20),
        20,
        || {
            let c = Connection::open(&path)?;
            c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))?;
            c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        },
        |e| format!("SQLite cannot write the file once the writer is gone: {e}"),
    );
    assert!(!staged(&fx, "held.db").is_empty());

    // A database that became one while a straight writer holds it (its header written past
    // sqlfs, then fsynced): SQLite cannot open it for writing until the writer is done.
    let image = native_db(&fx.scratch_path("src.db"), 50);
    let w = copied_in(&fx, "late.db", &image);
    assert_eq!(staged(&fx, "late.db").len(), 1, "captured at the fsync");
    let r = Connection::open(fx.path("late.db"))
        .and_then(|c| c.execute("INSERT INTO t(v) VALUES ('x')", []));
    assert!(
        r.is_err(),
        "SQLite wrote a database another process writes past sqlfs"
    );
    drop(w);
    let path = fx.path("late.db");
    wait_until(
        Duration::from_secs(20),
        20,
        || Connection::open(&path)?.execute("INSERT INTO t(v) VALUES ('x')", []),
        |e| format!("SQLite cannot write the database once the writer is gone: {e}"),
    );
    assert_staged_is_file(&fx, "late.db");
    fx.assert_verify();
    fx.unmount();
    assert_verify(&fx.backing);
}

/// `image` written into a new file `name` of the mount through a write-only handle (straight
/// through) and fsynced; the handle is returned open.
fn copied_in(fx: &Fixture, name: &str, image: &[u8]) -> fs::File {
    let w = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(fx.path(name))
        .unwrap();
    w.write_all_at(image, 0).unwrap();
    w.sync_all().unwrap();
    w
}

/// Runs `op` on another thread while `writer` is still open, closes `writer` 100 ms later
/// (by then `op`'s request waits in the daemon for that close to arrive), and returns what
/// `op` returned.
fn while_writer_closes<T: Send + 'static>(
    writer: fs::File,
    op: impl FnOnce() -> T + Send + 'static,
) -> T {
    let t = std::thread::spawn(op);
    std::thread::sleep(Duration::from_millis(100));
    drop(writer);
    t.join().unwrap()
}

/// `db`'s staged stream has no gap and replays to what its file holds now.
fn assert_staged_is_file(fx: &Fixture, db: &str) {
    assert_gap_free(&staged(fx, db), db);
    assert_last_staged_is(fx, db, &fs::read(fx.path(db)).unwrap(), "after SQLite");
}

/// A database opened for writing while the straight writer that copied it in is still open
/// waits for that writer's close to reach the daemon, then opens through sqlfs. The open
/// used to hold that very writer's handle while it waited (as the file it reopens), so the
/// wait always ran out and SQLite, refused (EBUSY), fell back to read-only ("attempt to write
/// a readonly database"), as a copy-then-open of SQLite's own test suite showed. Likewise an
/// empty file SQLite opens read-write as the process that created it closes it: joining that
/// writer's straight handle would have made SQLite's own handle a writer past sqlfs, whose
/// journal could then never be opened ("unable to open database file").
#[test]
fn sqlite_opening_a_file_as_its_straight_writer_closes_writes_through_sqlfs() {
    let mut fx = Fixture::new("plainclose", false);
    fx.mount();
    let image = native_db(&fx.scratch_path("src.db"), 50);
    for round in 0..3 {
        let name = format!("closing{round}.db");
        let path = fx.path(&name);
        let r = while_writer_closes(copied_in(&fx, &name, &image), move || {
            Connection::open(&path).and_then(|c| c.execute("INSERT INTO t(v) VALUES ('x')", []))
        });
        assert!(
            r.is_ok(),
            "round {round}: SQLite could not write {name}: {r:?}"
        );
        assert_staged_is_file(&fx, &name);

        let name = format!("empty{round}.db");
        let path = fx.path(&name);
        let r = while_writer_closes(fs::File::create(&path).unwrap(), move || {
            Connection::open(&path)
                .and_then(|c| c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);"))
        });
        assert!(
            r.is_ok(),
            "round {round}: SQLite could not write {name}: {r:?}"
        );
        assert_staged_is_file(&fx, &name);
    }
    fx.assert_verify();
    fx.unmount();
    assert_verify(&fx.backing);
}

/// A journal copied in right after its database (`cp` of both) waits for the database
/// writer's close to reach the daemon (the kernel tells of a close after close returns)
/// instead of being refused at once (EBUSY).
#[test]
fn a_journal_created_as_its_database_writer_closes_is_not_refused() {
    let mut fx = Fixture::new("plainjournal", false);
    fx.mount();
    let image = native_db(&fx.scratch_path("src.db"), 50);
    let journal = fx.path("pair.db-journal");
    let r = while_writer_closes(copied_in(&fx, "pair.db", &image), move || {
        fs::write(&journal, [0u8; 512])
    });
    assert!(r.is_ok(), "the journal could not be created: {r:?}");
    fs::remove_file(fx.path("pair.db-journal")).unwrap();
    fx.unmount();
}
