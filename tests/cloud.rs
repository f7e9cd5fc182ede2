//! `gs://` and `az://` replicas end to end, each against its emulator on loopback (the GCS
//! emulator and Azurite, installed by `make deps`; what each cannot show is written in
//! tests/common/cloudservers.rs). Per backend: mount → write with SQLite → ship (encrypted) →
//! restore at TXIDs → `.history` views read from the replica → a second data directory with
//! the same database fenced; a store stopped for a while loses nothing and catches up; an idle
//! mount sends nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cloudservers::*;
use common::relay::Relay;
use common::replica::{as_restored, assert_sealed, last_staged};
use common::*;

/// One emulator, started for one test.
trait Store {
    /// The replica URL of `prefix` in the test's bucket or container.
    fn url(&self, prefix: &str) -> String;
    fn server(&self) -> &Server;
}

struct Gcs(GcsServer);
impl Store for Gcs {
    fn url(&self, prefix: &str) -> String {
        self.0.url("sqlfs-test", prefix)
    }
    fn server(&self) -> &Server {
        &self.0 .0
    }
}

struct Azure(Azurite);
impl Store for Azure {
    fn url(&self, prefix: &str) -> String {
        self.0.url("sqlfs-test", prefix)
    }
    fn server(&self) -> &Server {
        &self.0 .0
    }
}

fn gcs() -> Box<dyn Store> {
    Box::new(Gcs(GcsServer::start("sqlfs-test")))
}

fn azure() -> Box<dyn Store> {
    azurite_credentials();
    Box::new(Azure(Azurite::start("sqlfs-test")))
}

/// The passphrase the encrypted replicas are sealed with (from the environment, as users do).
const PASS_VAR: &str = "SQLFS_CLOUD_TEST_PASS";
const PASS: &str = "cloud replicas are sealed";

/// `n` transactions from `from` on: rows of `blob` random bytes, some deleted.
fn writes(fx: &Fixture, db: &str, from: i64, n: i64, blob: i64) {
    let c = rusqlite::Connection::open(fx.path(db)).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)",
    )
    .unwrap();
    for i in from..from + n {
        c.execute(
            "INSERT INTO t(id, v) VALUES (?1, randomblob(?2 + ?1 % 3000))",
            [i, blob],
        )
        .unwrap();
        if i % 37 == 0 {
            c.execute("DELETE FROM t WHERE id % 5 = 0 AND id < ?1", [i])
                .unwrap();
        }
    }
}

/// `sqlfs restore` of `db` from `url` (at `txid`, else the latest), reading a sealed replica
/// with the passphrase when `sealed`.
fn restore(url: &str, db: &str, out: &Path, txid: Option<u64>, sealed: bool) -> CmdOut {
    let mut args: Vec<std::ffi::OsString> = vec![
        "restore".into(),
        "--replica".into(),
        url.into(),
        "--db".into(),
        db.into(),
        "-o".into(),
        out.into(),
        "--force".into(),
    ];
    if let Some(t) = txid {
        args.extend(["--txid".into(), t.to_string().into()]);
    }
    if sealed {
        args.extend(["--passphrase-env".into(), PASS_VAR.into()]);
    }
    sqlfs_cli(&args)
}

/// Waits until a restore from `url` reaches `txid`; returns the restored file.
fn wait_replicated(
    fx: &Fixture,
    url: &str,
    db: &str,
    txid: u64,
    sealed: bool,
    timeout: Duration,
) -> PathBuf {
    let out = fx.scratch_path(&format!("restored-{txid}.db"));
    wait_until(
        timeout,
        300,
        || {
            let r = restore(url, db, &out, None, sealed);
            assert!(!r.stderr.contains("panicked"), "{}", r.describe());
            if r.ok() && r.stdout.contains(&format!("at TXID {txid} ")) {
                Ok(())
            } else {
                Err(r)
            }
        },
        |r| {
            format!(
                "the replica did not reach TXID {txid}; last attempt:\n{}\ndaemon:\n{}",
                r.describe(),
                fx.daemon_logs()
            )
        },
    );
    out
}

/// A database file as a `.history` view shows it (rollback mode in the header).
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

fn integrity_and_rows(path: &Path) -> i64 {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    integrity_ok(&c);
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

fn end_to_end(store: Box<dyn Store>, tag: &str) {
    std::env::set_var(PASS_VAR, PASS);
    let url = store.url("backups/host1");
    let db = "app.db";

    // Mount and write: 1 MiB of staging, so sealed segments are folded away and the oldest
    // states live only in the replica.
    let mut fx = Fixture::new(&format!("{tag}e2e"), false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some("250ms".into());
    fx.opts.stage_limit = Some(1 << 20);
    fx.opts.extra_args = vec!["--passphrase-env".into(), PASS_VAR.into()];
    fx.opts.env = vec![(PASS_VAR.into(), PASS.into())];
    fx.mount();
    // Rounds of 3 MB, each shipped before the next: staging folds what the replica holds.
    for round in 0..4 {
        writes(&fx, db, 1 + round * 100, 15, 200_000);
        let last = last_staged(&fx.mnt, db);
        wait_replicated(&fx, &url, db, last, true, Duration::from_secs(120));
    }
    writes(&fx, db, 1000, 40, 300);
    let live = {
        let c = open_db(&fx.path(db));
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        snapshot(&c, true)
    };
    let last = last_staged(&fx.mnt, db);

    // Shipped, sealed: the latest restore is the live database.
    let latest = wait_replicated(&fx, &url, db, last, true, Duration::from_secs(120));
    assert_same_image(
        &as_restored(live.image.clone()),
        &std::fs::read(&latest).unwrap(),
        live.page_size,
        "restore at latest vs the live page image",
    );
    let client = sqlfs::replica::open(&url).unwrap();
    let keys = client.list("").unwrap();
    assert!(
        keys.iter().filter(|k| k.key.ends_with(".seg")).count() >= 2,
        "expected several segments: {keys:?}"
    );
    for k in &keys {
        let dst = fx.scratch_path("object");
        assert!(
            client.get(&k.key, &dst).unwrap(),
            "{} listed but missing",
            k.key
        );
        assert_sealed(&std::fs::read(&dst).unwrap(), &k.key);
    }

    // Restores at TXIDs equal the `.history` view of the same TXID; before the staging's base
    // the view is read from the replica (ranged reads).
    let base = staged_log(&fx.mnt, db).base.map_or(0, |b| b.0);
    assert!(
        base > 2,
        "staging was not folded: the replica's views are untested"
    );
    for t in [1, base / 2, base - 1, base, last - 1, last] {
        let out = fx.scratch_path(&format!("at-{t}.db"));
        let o = restore(&url, db, &out, Some(t), true);
        assert!(o.ok(), "restore at TXID {t}:\n{}", o.describe());
        assert!(
            o.stdout.contains(&format!("at TXID {t} ")),
            "{}",
            o.describe()
        );
        let rows = integrity_and_rows(&out);
        let view = fx.path(&format!(".history/txid-{t}/{db}"));
        let v = std::fs::read(&view).unwrap_or_else(|e| panic!("read {}: {e}", view.display()));
        assert!(
            v == as_view(std::fs::read(&out).unwrap()),
            "the view at TXID {t} differs from its restore"
        );
        assert_eq!(integrity_and_rows(&view), rows, "rows at TXID {t}");
    }

    // A second data directory with a database of the same name, shipping to the same place,
    // is fenced; the first goes on shipping.
    let mut b = Fixture::new(&format!("{tag}e2eB"), false);
    b.opts.replicas = Some(vec![url.clone()]);
    b.opts.sync_interval = Some("250ms".into());
    b.opts.extra_args = vec!["--passphrase-env".into(), PASS_VAR.into()];
    b.opts.env = vec![(PASS_VAR.into(), PASS.into())];
    b.mount();
    writes(&b, db, 500, 20, 300);
    let o = wait_until(
        Duration::from_secs(60),
        300,
        || {
            let o = sqlfs_cli(&["status".into(), b.mnt.as_os_str().to_os_string()]);
            if o.stdout.contains("FENCED") {
                Ok(o)
            } else {
                Err(o)
            }
        },
        |o| {
            format!(
                "the second data directory is not fenced:\n{}\n{}",
                o.describe(),
                b.daemon_logs()
            )
        },
    );
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    writes(&fx, db, 5000, 10, 300);
    let last = last_staged(&fx.mnt, db);
    wait_replicated(&fx, &url, db, last, true, Duration::from_secs(60));
    for f in [&fx, &b] {
        let logs = f.daemon_logs();
        assert!(!logs.contains("panicked"), "{logs}");
        assert!(!logs.contains(PASS), "the passphrase appears in a log");
    }
    b.unmount();
    fx.unmount();
}

/// The store is stopped (SIGSTOP) for 20 s while the app writes on: requests to it time out
/// (3 s), the daemon keeps serving, and once the store answers again the replica catches up
/// with nothing lost.
fn stopped_store_catches_up(store: Box<dyn Store>, tag: &str) {
    // A short request timeout: requests to the stopped store fail (and are retried later).
    let url = format!("{}&timeout=3s", store.url("p"));
    let db = "app.db";
    let mut fx = Fixture::new(&format!("{tag}pause"), false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some("250ms".into());
    fx.mount();
    writes(&fx, db, 1, 50, 300);
    wait_replicated(
        &fx,
        &url,
        db,
        last_staged(&fx.mnt, db),
        false,
        Duration::from_secs(60),
    );
    store.server().pause();
    let port = store.server().port;
    wait_until(
        Duration::from_secs(10),
        200,
        || if answers(port) { Err(()) } else { Ok(()) },
        |_| "the store still answers while stopped".to_string(),
    );
    let t0 = Instant::now();
    let mut next = 1000;
    while t0.elapsed() < Duration::from_secs(20) {
        writes(&fx, db, next, 20, 300);
        next += 20;
        sleep_ms(500);
    }
    assert!(
        fx.daemon_running(),
        "the daemon died while the store was down:\n{}",
        fx.daemon_logs()
    );
    let logs = fx.daemon_logs();
    assert!(
        logs.contains("timeout") || logs.contains("timed out"),
        "no request to the stopped store timed out:\n{logs}"
    );
    store.server().resume();
    let last = last_staged(&fx.mnt, db);
    let latest = wait_replicated(&fx, &url, db, last, false, Duration::from_secs(180));
    let staged = fx.scratch_path("staged.db");
    replay(&fx.cli_dir(), db, last, &staged);
    assert!(
        std::fs::read(&latest).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
        "restore at latest differs from the staged state"
    );
    let logs = fx.daemon_logs();
    assert!(!logs.contains("panicked"), "{logs}");
    fx.unmount();
}

/// An idle mount costs no requests: once what was written is shipped and compacted, nothing
/// goes to the store (counted by a relay in front of it) over many sync and compaction
/// intervals; the next write is shipped again.
fn idle_sends_nothing(store: Box<dyn Store>, tag: &str) {
    let relay = Relay::start(store.server().port);
    let direct = store.url("p");
    let through = direct.replace(
        &format!("127.0.0.1:{}", store.server().port),
        &format!("127.0.0.1:{}", relay.port),
    );
    let db = "app.db";
    let mut fx = Fixture::new(&format!("{tag}idle"), false);
    fx.opts.replicas = Some(vec![through]);
    fx.opts.sync_interval = Some("200ms".into());
    fx.opts.extra_args = vec!["--compaction".into(), "1s".into()];
    fx.mount();
    for round in 0..3 {
        writes(&fx, db, 1 + round * 100, 10, 300);
        sleep_ms(400);
    }
    let last = last_staged(&fx.mnt, db);
    wait_replicated(&fx, &direct, db, last, false, Duration::from_secs(60));
    // Let the shipments and the compaction they make due finish.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut before = relay.sent();
    loop {
        sleep_ms(3000);
        let now = relay.sent();
        if now == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mount never went quiet: {now} bytes sent to the store"
        );
        before = now;
    }
    assert!(before > 0, "nothing went through the relay");
    // Idle: many sync (200 ms) and compaction (1 s) intervals without a byte.
    sleep_ms(6000);
    assert_eq!(
        relay.sent(),
        before,
        "an idle mount sent requests to the store"
    );
    writes(&fx, db, 1000, 3, 300);
    let last = last_staged(&fx.mnt, db);
    wait_replicated(&fx, &direct, db, last, false, Duration::from_secs(60));
    assert!(relay.sent() > before);
    fx.unmount();
}

/// True if the server on `port` answers a request within a second.
fn answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(n) if n > 0)
}

#[test]
fn gcs_end_to_end_sealed_restore_history_and_fence() {
    end_to_end(gcs(), "gcs");
}

#[test]
fn azure_end_to_end_sealed_restore_history_and_fence() {
    end_to_end(azure(), "az");
}

#[test]
fn gcs_idle_mount_sends_no_requests() {
    idle_sends_nothing(gcs(), "gcs");
}

#[test]
fn azure_idle_mount_sends_no_requests() {
    idle_sends_nothing(azure(), "az");
}

#[test]
fn gcs_store_stopped_for_a_while_then_catches_up() {
    stopped_store_catches_up(gcs(), "gcs");
}

#[test]
fn azure_store_stopped_for_a_while_then_catches_up() {
    stopped_store_catches_up(azure(), "az");
}

/// `abs://` is `az://`; bad URLs and missing credentials are refused clearly, without secrets.
#[test]
fn cloud_urls_are_checked_and_show_no_secret() {
    let azure = Azurite::start("sqlfs-test");
    azurite_credentials();
    let az = azure.url("sqlfs-test", "p");
    let abs = az.replacen("az://", "abs://", 1);
    let c = sqlfs::replica::open(&abs).unwrap();
    c.put("names/x", b"1").unwrap();
    assert_eq!(
        sqlfs::replica::open(&az).unwrap().list("").unwrap()[0].key,
        "names/x"
    );
    for (url, needle) in [
        ("gs://b/p?region=x", "unknown parameter"),
        ("az://c/p?account=a&sig=hunter2", "unknown parameter"),
        ("gs://user:hunter2@b/p", "credentials"),
        (
            "az://c/p?account=a&endpoint=http://u:hunter2@127.0.0.1:1",
            "credentials",
        ),
    ] {
        let o = sqlfs_cli(&["list".into(), "--replica".into(), url.into()]);
        assert!(!o.ok(), "{url} accepted:\n{}", o.describe());
        assert!(o.stderr.contains(needle), "{url}:\n{}", o.describe());
        assert!(
            !o.stderr.contains("hunter2") && !o.stdout.contains("hunter2"),
            "{}",
            o.describe()
        );
    }
    // A wrong key: a clear error that shows neither key.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sqlfs"));
    cmd.args(["list", "--replica", &az]).env(
        "AZURE_STORAGE_ACCOUNT_KEY",
        "d3Jvbmcga2V5IGZvciB0aGUgdGVzdA==",
    );
    let o = run_cmd(cmd, Duration::from_secs(120));
    assert!(!o.ok(), "a wrong key was accepted:\n{}", o.describe());
    assert!(
        !o.stderr.contains("d3Jvbmcga2V5") && !o.stderr.contains(AZURITE_KEY),
        "{}",
        o.describe()
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());

    // A connection string alone names the account, its key and the endpoint.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sqlfs"));
    cmd.args(["list", "--replica", "az://sqlfs-test/p"])
        .env_remove("AZURE_STORAGE_ACCOUNT_KEY")
        .env(
            "AZURE_STORAGE_CONNECTION_STRING",
            format!(
                "DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{}/{AZURITE_ACCOUNT};",
                azure.0.port
            ),
        );
    let o = run_cmd(cmd, Duration::from_secs(120));
    assert!(
        o.ok(),
        "the connection string was not used:\n{}",
        o.describe()
    );
    assert!(!o.stderr.contains(AZURITE_KEY) && !o.stdout.contains(AZURITE_KEY));

    // Application Default Credentials that name a missing file: a clear error at once.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sqlfs"));
    cmd.args(["list", "--replica", "gs://b/p"]).env(
        "GOOGLE_APPLICATION_CREDENTIALS",
        "/nonexistent/sqlfs-test-key.json",
    );
    let o = run_cmd(cmd, Duration::from_secs(120));
    assert!(!o.ok(), "{}", o.describe());
    assert!(
        o.stderr.contains("credentials") && o.stderr.contains("sqlfs-test-key.json"),
        "{}",
        o.describe()
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
}
