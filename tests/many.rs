//! Many databases through one mount, shipping to the S3-compatible test server on loopback
//! (installed by `make deps` into .venv): the replica's bounded pool of requests in flight
//! (`--replica-concurrency`) ships every database, byte for byte; a database whose requests
//! the store holds back delays no other; an idle mount of many databases sends the store
//! nothing. Every assertion is on what arrived or how many requests were made, never on
//! how long something took.

mod common;

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use common::holdproxy::HoldProxy;
use common::replica::{as_restored, last_staged, wait_replica_covers};
use common::s3server::*;
use common::*;

const BUCKET: &str = "many";
/// How long a database may take to reach the file replica.
const COVER_TIMEOUT: Duration = Duration::from_secs(120);

/// Commits `n` rows to `db` (made in WAL or DELETE journal mode as `wal` says).
fn writes(fx: &Fixture, db: &str, wal: bool, from: i64, n: i64) {
    let p = fx.path(db);
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    let c = rusqlite::Connection::open(&p).unwrap();
    c.busy_timeout(BUSY_TIMEOUT).unwrap();
    let mode = if wal { "WAL" } else { "DELETE" };
    c.execute_batch(&format!(
        "PRAGMA journal_mode={mode}; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)"
    ))
    .unwrap();
    for i in from..from + n {
        c.execute(
            "INSERT OR REPLACE INTO t(id, v) VALUES (?1, randomblob(200 + ?1 % 1500))",
            [i],
        )
        .unwrap();
    }
}

fn restore(url: &str, db: &str, out: &std::path::Path) -> CmdOut {
    sqlfs_cli(&[
        "restore".into(),
        "--replica".into(),
        url.into(),
        "--db".into(),
        db.into(),
        "-o".into(),
        out.into(),
        "--force".into(),
    ])
}

/// Waits until a restore of `db` from `url` reaches `txid`; returns the restored file.
fn wait_replicated(fx: &Fixture, url: &str, db: &str, txid: u64) -> PathBuf {
    let out = fx.scratch_path(&format!("restored-{}.db", db.replace('/', "_")));
    wait_until(
        Duration::from_secs(120),
        200,
        || {
            let r = restore(url, db, &out);
            assert!(!r.stderr.contains("panicked"), "{}", r.describe());
            if r.ok() && r.stdout.contains(&format!("at TXID {txid} ")) {
                Ok(())
            } else {
                Err(r)
            }
        },
        |r| {
            format!(
                "{db}: the replica did not reach TXID {txid}; last attempt:\n{}\ndaemon:\n{}",
                r.describe(),
                fx.daemon_logs()
            )
        },
    );
    out
}

/// Waits until `db` is on `url` up to its last staged TXID and checks that the restore is,
/// byte for byte, the replay of that TXID from staging (which `verify` checks against the
/// files the app sees).
fn assert_restores_as_staged(fx: &Fixture, url: &str, db: &str) -> u64 {
    let last = last_staged(&fx.cli_dir(), db);
    assert!(last > 0, "{db}: nothing staged");
    let restored = wait_replicated(fx, url, db, last);
    let staged = fx.scratch_path("staged.db");
    replay(&fx.cli_dir(), db, last, &staged);
    assert!(
        fs::read(&restored).unwrap() == as_restored(fs::read(&staged).unwrap()),
        "{db}: the restore at TXID {last} differs from the staged state"
    );
    last
}

/// The database id sqlfs gave `db` (from its staging directory's `name`).
fn db_id(fx: &Fixture, db: &str) -> String {
    for e in fs::read_dir(fx.backing.join(".sqlfs/db"))
        .unwrap()
        .flatten()
    {
        if fs::read_to_string(e.path().join("name")).is_ok_and(|n| n == db) {
            return e.file_name().to_string_lossy().into_owned();
        }
    }
    panic!("{db}: no staging directory")
}

/// Waits until no request reached the proxy for `quiet` (the shipments and the maintenance
/// they made due are over); returns the count then.
fn wait_quiet(proxy: &HoldProxy, quiet: Duration, fx: &Fixture) -> usize {
    let mut before = proxy.count();
    for _ in 0..40 {
        thread::sleep(quiet);
        let now = proxy.count();
        if now == before {
            return now;
        }
        before = now;
    }
    panic!(
        "the mount never went quiet; the last requests:\n{}\ndaemon:\n{}",
        proxy.seen_since(before.saturating_sub(20)).join("\n"),
        fx.daemon_logs()
    )
}

#[test]
fn many_databases_two_requests_in_flight_every_one_restores_exactly() {
    s3_test_credentials();
    let srv = S3Server::start(BUCKET);
    let url = srv.url(BUCKET, "c2");
    let mut fx = Fixture::new("many-c2", false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some("200ms".into());
    fx.opts.extra_args = vec!["--replica-concurrency".into(), "2".into()];
    fx.mount();
    let dbs: Vec<String> = (0..24)
        .map(|i| format!("tenants/{}/t{i}.db", i % 3))
        .collect();
    // Three writers, each over its own databases, several rounds: shipments of many
    // databases overlap with commits to them.
    thread::scope(|sc| {
        for w in 0..3 {
            let (fx, dbs) = (&fx, &dbs);
            sc.spawn(move || {
                for round in 0..4 {
                    for (i, db) in dbs.iter().enumerate().filter(|(i, _)| i % 3 == w) {
                        writes(fx, db, i % 4 != 0, round * 50, 7);
                    }
                }
            });
        }
    });
    for db in &dbs {
        assert_restores_as_staged(&fx, &url, db);
    }
    fx.assert_verify();
    fx.unmount();
}

#[test]
fn a_database_the_store_holds_back_delays_no_other() {
    s3_test_credentials();
    let srv = S3Server::start(BUCKET);
    let proxy = HoldProxy::start(srv.port);
    let url = proxy.url(BUCKET, "slow", "120s");
    let direct = srv.url(BUCKET, "slow");
    let mut fx = Fixture::new("many-slow", false);
    fx.opts.replicas = Some(vec![url]);
    fx.opts.sync_interval = Some("200ms".into());
    fx.opts.extra_args = vec!["--replica-concurrency".into(), "2".into()];
    fx.mount();
    let fast: Vec<String> = (0..6).map(|i| format!("fast{i}.db")).collect();
    writes(&fx, "slow.db", true, 0, 5);
    for db in &fast {
        writes(&fx, db, true, 0, 5);
    }
    for db in fast.iter().chain(std::iter::once(&"slow.db".to_string())) {
        assert_restores_as_staged(&fx, &direct, db);
    }
    // The store now holds every request for slow.db's objects: its next shipment waits
    // in a worker.
    let id = db_id(&fx, "slow.db");
    proxy.hold(&id);
    writes(&fx, "slow.db", true, 100, 5);
    wait_until(
        Duration::from_secs(60),
        100,
        || if proxy.held().0 > 0 { Ok(()) } else { Err(()) },
        |_| {
            format!(
                "slow.db's shipment never reached the store:\n{}",
                fx.daemon_logs()
            )
        },
    );
    let slow_at = last_staged(&fx.cli_dir(), "slow.db");
    // Every other database is shipped meanwhile, more than once.
    for round in 1..3 {
        for db in &fast {
            writes(&fx, db, true, round * 100, 5);
        }
        for db in &fast {
            assert_restores_as_staged(&fx, &direct, db);
        }
    }
    assert!(
        proxy.held().0 > 0,
        "slow.db's request was let go before the other databases were checked"
    );
    let out = fx.scratch_path("slow-held.db");
    let r = restore(&direct, "slow.db", &out);
    assert!(r.ok(), "{}", r.describe());
    assert!(
        !r.stdout.contains(&format!("at TXID {slow_at} ")),
        "slow.db reached the replica although its requests were held:\n{}",
        r.stdout
    );
    // Let go: slow.db catches up, and everything restores exactly.
    proxy.release();
    for db in fast.iter().chain(std::iter::once(&"slow.db".to_string())) {
        assert_restores_as_staged(&fx, &direct, db);
    }
    fx.assert_verify();
    fx.unmount();
}

#[test]
fn an_idle_mount_of_many_databases_makes_no_requests() {
    s3_test_credentials();
    let srv = S3Server::start(BUCKET);
    let proxy = HoldProxy::start(srv.port);
    let url = proxy.url(BUCKET, "idle", "30s");
    let direct = srv.url(BUCKET, "idle");
    let mut fx = Fixture::new("many-idle", false);
    fx.opts.replicas = Some(vec![url]);
    fx.opts.sync_interval = Some("200ms".into());
    // Short level intervals: the compaction the writes make due happens within the test,
    // and then nothing is left to do.
    fx.opts.extra_args = vec!["--compaction".into(), "1s,2s".into()];
    fx.mount();
    let dbs: Vec<String> = (0..40).map(|i| format!("tenants/t{i}.db")).collect();
    for round in 0..3 {
        for db in &dbs {
            writes(&fx, db, true, round * 10, 3);
        }
    }
    for db in &dbs {
        assert_restores_as_staged(&fx, &direct, db);
    }
    let quiet = wait_quiet(&proxy, Duration::from_secs(3), &fx);
    // Idle: many sync intervals (200 ms) and level intervals without a request.
    thread::sleep(Duration::from_secs(6));
    assert_eq!(
        proxy.count(),
        quiet,
        "an idle mount of {} databases sent requests to the store:\n{}",
        dbs.len(),
        proxy.seen_since(quiet).join("\n")
    );
    // A fresh mount of the same databases checks each name's claim once, then is quiet.
    fx.remount();
    let quiet = wait_quiet(&proxy, Duration::from_secs(3), &fx);
    thread::sleep(Duration::from_secs(6));
    assert_eq!(
        proxy.count(),
        quiet,
        "an idle remount sent requests to the store:\n{}",
        proxy.seen_since(quiet).join("\n")
    );
    // The next commit is shipped again.
    writes(&fx, "tenants/t7.db", true, 500, 2);
    assert_restores_as_staged(&fx, &direct, "tenants/t7.db");
    assert!(proxy.count() > quiet);
    fx.unmount();
}

/// The daemon's descriptors open right now.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn many_databases_under_a_low_open_file_limit_are_all_captured_shipped_and_served() {
    // Far fewer descriptors than databases: an idle database must hold none.
    const DBS: usize = 300;
    let mut fx = Fixture::new("many-nofile", false);
    fx.opts.sync_interval = Some("200ms".into());
    fx.opts.nofile = Some(128);
    fx.mount();
    let dbs: Vec<String> = (0..DBS).map(|i| format!("tenants/t{i}.db")).collect();
    for (i, db) in dbs.iter().enumerate() {
        writes(&fx, db, i % 2 == 0, 0, 2);
    }
    let replica = fx.default_replica();
    for db in &dbs {
        let last = last_staged(&fx.cli_dir(), db);
        assert!(last > 0, "{db}: nothing staged\n{}", fx.daemon_logs());
        if let Err(e) = wait_replica_covers(&replica, db, last, COVER_TIMEOUT) {
            panic!("{e}\ndaemon:\n{}", fx.daemon_logs());
        }
    }
    let pid = fx.daemon_pid().expect("daemon running");
    assert!(
        open_fds(pid) < 100,
        "the daemon holds {} descriptors with {DBS} idle databases",
        open_fds(pid)
    );
    // A fresh mount of them all (each loaded while the mount serves) serves every app open,
    // and the next commit of each is shipped.
    fx.remount();
    for (i, db) in dbs.iter().enumerate() {
        let c = open_db(&fx.path(db));
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{db}: {e}\n{}", fx.daemon_logs()));
        assert_eq!(n, 2, "{db}");
        drop(c);
        if i % 10 == 0 {
            writes(&fx, db, i % 2 == 0, 100, 1);
        }
    }
    for db in dbs.iter().step_by(10) {
        let last = last_staged(&fx.cli_dir(), db);
        if let Err(e) = wait_replica_covers(&replica, db, last, COVER_TIMEOUT) {
            panic!("{e}\ndaemon:\n{}", fx.daemon_logs());
        }
    }
    let logs = fx.daemon_logs();
    assert!(
        !logs.contains("os error 24") && !logs.contains("capture failed"),
        "the daemon ran short of descriptors:\n{logs}"
    );
    fx.assert_verify();
    fx.unmount();
}
