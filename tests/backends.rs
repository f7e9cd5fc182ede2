//! The features tested against S3 and file replicas, each against every other backend: SFTP
//! (a private OpenSSH server, tests/common/sshserver.rs), GCS and Azure (their emulators,
//! tests/common/cloudservers.rs). One test per feature starts the three servers once and
//! runs the feature against each in turn: `--sync`, `--restore-if-missing`, compaction
//! levels with retention and `sqlfs list`, the metrics endpoint; and, for SFTP, that an idle
//! mount sends nothing (the cloud backends' idle test is in tests/cloud.rs).
//!
//! Every wait polls for a state with a generous limit; nothing asserts how long a step took.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cloudservers::*;
use common::relay::Relay;
use common::replica::{
    as_restored, assert_log_no_panic, assert_no_panic, last_staged, restore_cmd, restore_ok,
    restore_vs_replay, restored_txid,
};
use common::sshserver::SshServer;
use common::*;
use serde_json::Value;

/// The three servers of one test.
struct Servers {
    sftp: SshServer,
    gcs: GcsServer,
    azure: Azurite,
}

/// One backend of [`Servers`]: its name and the replica URL of a prefix in it.
struct Backend<'a> {
    tag: &'static str,
    servers: &'a Servers,
}

impl Servers {
    fn start() -> Servers {
        azurite_credentials();
        Servers {
            sftp: SshServer::start(),
            gcs: GcsServer::start("sqlfs-test"),
            azure: Azurite::start("sqlfs-test"),
        }
    }

    fn each(&self) -> Vec<Backend<'_>> {
        ["sftp", "gcs", "azure"]
            .into_iter()
            .map(|tag| Backend { tag, servers: self })
            .collect()
    }
}

impl Backend<'_> {
    /// The replica URL of `prefix` (made unique per test by the caller).
    fn url(&self, prefix: &str) -> String {
        match self.tag {
            "sftp" => self.servers.sftp.url(prefix),
            "gcs" => self.servers.gcs.url("sqlfs-test", prefix),
            _ => self.servers.azure.url("sqlfs-test", prefix),
        }
    }
}

/// `n` transactions on table `t` from id `from` on (WAL mode, synchronous=FULL).
fn writes(fx: &Fixture, db: &str, from: i64, n: i64) {
    let c = rusqlite::Connection::open(fx.path(db)).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)",
    )
    .unwrap();
    for i in from..from + n {
        retry_busy(|| {
            c.execute(
                "INSERT INTO t(id, v) VALUES (?1, randomblob(200 + ?1 % 3000))",
                [i],
            )
        })
        .unwrap();
        if i % 37 == 0 {
            c.execute("DELETE FROM t WHERE id % 5 = 0 AND id < ?1", [i])
                .unwrap();
        }
    }
}

/// Ids of table `t` in a database file, in order.
fn ids(path: &Path) -> Vec<i64> {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    integrity_ok(&c);
    let mut st = c.prepare("SELECT id FROM t ORDER BY id").unwrap();
    let v = st
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<Vec<i64>, _>>()
        .unwrap();
    v
}

/// Waits until a restore of the latest state of `db` from `url` reaches `txid`; returns
/// the restored file.
fn wait_replicated(fx: &Fixture, url: &str, db: &str, txid: u64, what: &str) -> PathBuf {
    let out = fx.scratch_path(&format!("replicated-{txid}.db"));
    wait_until(
        Duration::from_secs(120),
        300,
        || {
            let o = restore_cmd(url, db, &out, None, true);
            assert_no_panic(&o);
            if o.ok() && restored_txid(&o) >= txid {
                Ok(())
            } else {
                Err(o)
            }
        },
        |o| {
            format!(
                "{what}: the replica never reached TXID {txid}; last attempt:\n{}\ndaemon:\n{}",
                o.describe(),
                fx.daemon_logs()
            )
        },
    );
    out
}

/// The live database's page image after a full checkpoint, and the last staged TXID then.
fn live_image(fx: &Fixture, db: &str) -> (Snapshot, u64) {
    let c = open_db(&fx.path(db));
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    let s = snapshot(&c, true);
    drop(c);
    (s, last_staged(&fx.mnt, db))
}

/// `sqlfs list --replica URL [--json]`, which must succeed.
fn list(url: &str, json: bool) -> CmdOut {
    let mut a: Vec<std::ffi::OsString> = vec!["list".into(), "--replica".into(), url.into()];
    if json {
        a.push("--json".into());
    }
    let o = sqlfs_cli(&a);
    assert_no_panic(&o);
    o
}

fn list_json(url: &str) -> Option<Vec<Value>> {
    let o = list(url, true);
    if !o.ok() {
        return None;
    }
    serde_json::from_str::<Value>(&o.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
}

/// Objects of `level` in a listing entry (0 if the level is absent).
fn level_objects(d: &Value, level: u64) -> u64 {
    d["levels"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["level"] == level))
        .and_then(|l| l["objects"].as_u64())
        .unwrap_or(0)
}

/// With `--sync` and a sync interval far longer than the test, each commit (WAL mode,
/// synchronous=FULL) returns once the replica has it: a restore run right after the commit,
/// without waiting, holds that commit's row. The control: without `--sync`, a commit made on
/// a fresh mount is not in the replica right after it returns (only what the previous
/// unmount flushed is), so the test tells the two apart.
#[test]
fn sync_commit_is_on_each_backend_when_it_returns() {
    let servers = Servers::start();
    for b in servers.each() {
        let url = b.url("sync/host");
        let db = "app.db";
        let mut fx = Fixture::new(&format!("bk-sync-{}", b.tag), false);
        fx.opts.replicas = Some(vec![url.clone()]);
        fx.opts.sync_interval = Some("60s".into());
        let out = fx.scratch_path("restored.db");

        // The control, without --sync: row 1 is flushed by the unmount; of rows 2-4, committed
        // on the next mount, some are not there right after their commit (the mount's first
        // shipping pass may still catch one).
        fx.mount();
        writes(&fx, db, 1, 1);
        fx.unmount();
        fx.mount();
        let mounted = Instant::now();
        let mut missed = Vec::new();
        for id in 2..=4 {
            writes(&fx, db, id, 1);
            restore_ok(&url, db, &out, None);
            if ids(&out).last() != Some(&id) {
                missed.push(id);
            }
        }
        eprintln!(
            "{}: without --sync, rows not yet shipped right after their commit: {missed:?}",
            b.tag
        );
        if mounted.elapsed() < Duration::from_secs(45) {
            assert!(
                !missed.is_empty(),
                "{}: without --sync, a restore right after each commit already had it with a \
                 60 s sync interval: this test could not tell --sync from no --sync",
                b.tag
            );
        } else {
            eprintln!(
                "{}: too slow for the control (over 45 s of a 60 s interval)",
                b.tag
            );
        }
        fx.unmount();

        fx.opts.sync = true;
        fx.mount();
        for id in 5..=10 {
            writes(&fx, db, id, 1);
            let t = restore_ok(&url, db, &out, None);
            assert_eq!(
                ids(&out).last().copied(),
                Some(id),
                "{}: with --sync, a restore right after the commit of row {id} (restored TXID \
                 {t}) does not hold it\ndaemon:\n{}",
                b.tag,
                fx.daemon_logs()
            );
        }
        let last = last_staged(&fx.mnt, db);
        assert_eq!(restore_ok(&url, db, &out, None), last, "{}", b.tag);
        assert_log_no_panic(&fx.all_daemon_logs(), b.tag);
        fx.unmount();
    }
}

/// The data directory is lost (database and staging); a mount with `--restore-if-missing`
/// brings the database back from the backend byte for byte, and the chain continues there: a
/// later commit is in the restore of the latest state, under the same name.
#[test]
fn restore_if_missing_from_each_backend() {
    let servers = Servers::start();
    for b in servers.each() {
        let url = b.url("rim/host");
        let db = "app.db";
        let mut fx = Fixture::new(&format!("bk-rim-{}", b.tag), false);
        fx.opts.replicas = Some(vec![url.clone()]);
        fx.opts.sync_interval = Some("200ms".into());
        fx.opts.extra_args = vec!["--compaction".into(), "1s".into()];
        fx.mount();
        writes(&fx, db, 1, 60);
        let (live, last_a) = live_image(&fx, db);
        wait_replicated(&fx, &url, db, last_a, b.tag);
        fx.unmount();

        // The data directory is lost: the database and its staging.
        std::fs::remove_dir_all(&fx.backing).unwrap();
        std::fs::create_dir_all(&fx.backing).unwrap();
        fx.opts.extra_args.push("--restore-if-missing".into());
        fx.mount();
        let back = std::fs::read(fx.backing_path(db)).unwrap_or_else(|e| {
            panic!(
                "{}: {db} was not restored ({e}):\n{}",
                b.tag,
                fx.daemon_logs()
            )
        });
        assert_same_image(
            &as_restored(live.image.clone()),
            &as_restored(back),
            live.page_size,
            &format!("{}: the database --restore-if-missing brought back", b.tag),
        );
        assert!(
            !fx.last_daemon_log()
                .contains("staging the initial snapshot"),
            "{}: the restored database started a new chain:\n{}",
            b.tag,
            fx.daemon_logs()
        );

        // The chain continues: later commits reach the same name in the backend.
        writes(&fx, db, 1000, 20);
        let want = ids(&fx.path(db));
        let last_b = last_staged(&fx.mnt, db);
        assert!(
            last_b > last_a,
            "{}: TXIDs restarted ({last_b} <= {last_a})",
            b.tag
        );
        let out = wait_replicated(&fx, &url, db, last_b, b.tag);
        assert_eq!(
            ids(&out),
            want,
            "{}: the latest restore lacks the later commits",
            b.tag
        );
        let named = list_json(&url)
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d["name"] == db)
            .collect::<Vec<_>>();
        assert_eq!(named.len(), 1, "{}: {named:?}", b.tag);
        assert_eq!(named[0]["latest_txid"].as_u64(), Some(last_b), "{}", b.tag);
        let logs = fx.all_daemon_logs();
        assert_log_no_panic(&logs, b.tag);
        assert!(
            !logs.contains("FENCED") && !logs.contains("another sqlfs"),
            "{}: {logs}",
            b.tag
        );
        fx.unmount();
    }
}

/// Short compaction, snapshot and retention intervals: after some commits the backend holds
/// level-1 objects, retention has moved the restore window past TXID 1, `sqlfs list` (text
/// and JSON) shows both, and the restore of the latest state equals the live database.
#[test]
fn levels_retention_and_list_on_each_backend() {
    let servers = Servers::start();
    for b in servers.each() {
        let url = b.url("levels/host");
        let db = "app.db";
        let mut fx = Fixture::new(&format!("bk-lvl-{}", b.tag), false);
        fx.opts.replicas = Some(vec![url.clone()]);
        fx.opts.sync_interval = Some("200ms".into());
        fx.opts.extra_args = [
            "--compaction",
            "1s",
            "--snapshot-interval",
            "1s",
            "--retention",
            "3s",
        ]
        .map(String::from)
        .to_vec();
        fx.mount();
        for round in 0..6 {
            writes(&fx, db, 1 + round * 100, 10);
            sleep_ms(600);
        }
        // Compaction and retention run on their own clock: write a little more until the
        // listing shows level-1 objects and a window past TXID 1.
        let mut next = 2000;
        let d = wait_until(
            Duration::from_secs(90),
            500,
            || {
                let d = list_json(&url).and_then(|l| l.into_iter().find(|d| d["name"] == db));
                match d {
                    Some(d)
                        if level_objects(&d, 1) > 0
                            && d["earliest_txid"].as_u64().is_some_and(|t| t > 1) =>
                    {
                        Ok(d)
                    }
                    other => {
                        writes(&fx, db, next, 2);
                        next += 2;
                        Err(other)
                    }
                }
            },
            |d| {
                format!(
                    "{}: no level-1 objects or retention never moved the window: {d:?}\n{}",
                    b.tag,
                    fx.daemon_logs()
                )
            },
        );
        eprintln!("{}: {d}", b.tag);
        let (live, last) = live_image(&fx, db);
        let latest = wait_replicated(&fx, &url, db, last, b.tag);
        assert_same_image(
            &as_restored(live.image.clone()),
            &std::fs::read(&latest).unwrap(),
            live.page_size,
            &format!("{}: restore at latest vs the live database", b.tag),
        );
        // Stopped, so retention no longer moves the window while it is checked.
        fx.unmount();
        let first = wait_until(
            Duration::from_secs(60),
            300,
            || {
                let d = list_json(&url).and_then(|l| l.into_iter().find(|d| d["name"] == db));
                match d {
                    Some(d) if d["latest_txid"].as_u64() == Some(last) => Ok(d),
                    other => Err(other),
                }
            },
            |d| format!("{}: the listing never showed TXID {last}: {d:?}", b.tag),
        )["earliest_txid"]
            .as_u64()
            .unwrap();
        let old = fx.scratch_path("old.db");
        let o = restore_cmd(&url, db, &old, Some(first - 1), false);
        assert_no_panic(&o);
        assert!(
            !o.ok() && !old.exists(),
            "{}: restore before the window:\n{}",
            b.tag,
            o.describe()
        );
        assert!(
            o.stderr.contains(&format!("TXIDs {first}..={last}")),
            "{}: the error does not name the window {first}..={last}:\n{}",
            b.tag,
            o.describe()
        );
        // Inside the window, restores equal the replay of the same TXID from staging.
        for t in [first, (first + last) / 2, last] {
            restore_vs_replay(&url, &fx.backing, db, Some(t), &fx.scratch);
        }
        let o = list(&url, false);
        assert!(o.ok(), "{}: {}", b.tag, o.describe());
        for needle in [db, "restore window: TXID ", "snapshot TXID", "level 1:"] {
            assert!(
                o.stdout.contains(needle),
                "{}: `sqlfs list` lacks {needle:?}:\n{}",
                b.tag,
                o.stdout
            );
        }
        assert_log_no_panic(&fx.all_daemon_logs(), b.tag);
        fx.unmount();
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of the first metric line starting with `prefix`.
fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The metrics endpoint reports the backend's replica TXID, and it advances with commits.
#[test]
fn metrics_follow_each_backend() {
    let servers = Servers::start();
    for b in servers.each() {
        let url = b.url("metrics/host");
        let db = "app.db";
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut fx = Fixture::new(&format!("bk-metrics-{}", b.tag), false);
        fx.opts.replicas = Some(vec![url.clone()]);
        fx.opts.sync_interval = Some("200ms".into());
        fx.opts.extra_args = vec!["--metrics-addr".into(), addr.clone()];
        fx.mount();
        let prefix = format!("sqlfs_replica_txid{{db=\"{db}\"");
        for round in 0..2 {
            writes(&fx, db, 1 + round * 100, 10);
            let last = last_staged(&fx.mnt, db);
            let body = wait_until(
                Duration::from_secs(60),
                200,
                || {
                    let body = http_get(&addr, "/metrics");
                    if metric(&body, &prefix) == Some(last as f64) {
                        Ok(body)
                    } else {
                        Err(body)
                    }
                },
                |body| {
                    format!(
                        "{}: sqlfs_replica_txid never reached {last}:\n{body}",
                        b.tag
                    )
                },
            );
            assert!(body.starts_with("HTTP/1.1 200"), "{}: {body}", b.tag);
            assert_eq!(
                metric(&body, "sqlfs_replica_up{"),
                Some(1.0),
                "{}: {body}",
                b.tag
            );
            let lag = metric(&body, &format!("sqlfs_replica_lag_seconds{{db=\"{db}\""));
            assert!(lag.is_some_and(|l| l >= 0.0), "{}: {body}", b.tag);
        }
        assert_log_no_panic(&fx.all_daemon_logs(), b.tag);
        fx.unmount();
    }
}

/// An idle mount shipping over SFTP sends nothing: once what was written is shipped and
/// compacted, no byte and no new connection goes to the server (counted by a relay in front
/// of it) over many sync and compaction intervals; the next write is shipped again.
#[test]
fn sftp_idle_mount_sends_nothing() {
    let srv = SshServer::start();
    let relay = Relay::start(srv.port);
    let direct = srv.url("idle");
    let through = direct.replace(
        &format!("127.0.0.1:{}", srv.port),
        &format!("127.0.0.1:{}", relay.port),
    );
    // The relay's address needs its own known_hosts line (same host key).
    let kh = std::fs::read_to_string(srv.path("known_hosts")).unwrap();
    std::fs::write(
        srv.path("known_hosts"),
        format!(
            "{kh}{}",
            kh.replace(
                &format!("[127.0.0.1]:{}", srv.port),
                &format!("[127.0.0.1]:{}", relay.port)
            )
        ),
    )
    .unwrap();
    let db = "app.db";
    let mut fx = Fixture::new("bk-idle-sftp", false);
    fx.opts.replicas = Some(vec![through]);
    fx.opts.sync_interval = Some("200ms".into());
    fx.opts.extra_args = vec!["--compaction".into(), "1s".into()];
    fx.mount();
    for round in 0..3 {
        writes(&fx, db, 1 + round * 100, 10);
        sleep_ms(400);
    }
    let last = last_staged(&fx.mnt, db);
    wait_replicated(&fx, &direct, db, last, "sftp");
    // Let the shipments and the compaction they make due finish.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut before = (relay.sent(), relay.connections());
    loop {
        sleep_ms(3000);
        let now = (relay.sent(), relay.connections());
        if now == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mount never went quiet: {now:?} (bytes, connections) sent to the server"
        );
        before = now;
    }
    assert!(before.0 > 0, "nothing went through the relay");
    // Idle: many sync (200 ms) and compaction (1 s) intervals without a byte.
    sleep_ms(6000);
    assert_eq!(
        (relay.sent(), relay.connections()),
        before,
        "an idle mount sent to the SFTP server (bytes, connections)"
    );
    writes(&fx, db, 1000, 3);
    let last = last_staged(&fx.mnt, db);
    wait_replicated(&fx, &direct, db, last, "sftp");
    assert!(relay.sent() > before.0);
    assert_log_no_panic(&fx.all_daemon_logs(), "sftp");
    fx.unmount();
}
