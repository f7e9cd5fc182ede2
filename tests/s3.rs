//! Object-storage replicas against a real S3-compatible server on loopback (installed by
//! `make deps` into .venv; `SQLFS_S3_SERVER` names another binary). Every test starts its own
//! server on a free port.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::relay::Relay;
use common::replica::{
    as_restored, assert_restore_fails, assert_says, assert_sealed, keygen, restore_ok_with,
    restore_with,
};
use common::s3server::*;
use common::workload::{Driver, DriverCfg, SCHEMA};
use common::*;

/// One server shared by the tests that do not stop it (starting one is slow on a small machine).
fn shared(bucket: &str) -> &'static S3Server {
    static SHARED: std::sync::OnceLock<S3Server> = std::sync::OnceLock::new();
    static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    extern "C" fn kill_shared() {
        let pid = PID.load(std::sync::atomic::Ordering::SeqCst);
        if pid != 0 {
            send_signal(pid, libc::SIGKILL);
        }
    }
    let s = SHARED.get_or_init(|| {
        let s = S3Server::start("shared");
        PID.store(s.child.id(), std::sync::atomic::Ordering::SeqCst);
        // Statics are never dropped: stop the shared server when the test process exits.
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(kill_shared) };
        s
    });
    assert_eq!(s.bucket(bucket).unwrap(), 200, "creating bucket {bucket}");
    s
}

fn writes(fx: &Fixture, db: &str, from: i64, n: i64) {
    let c = rusqlite::Connection::open(fx.path(db)).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)",
    )
    .unwrap();
    for i in from..from + n {
        c.execute(
            "INSERT INTO t(id, v) VALUES (?1, randomblob(300 + ?1 % 3000))",
            [i],
        )
        .unwrap();
        if i % 37 == 0 {
            c.execute("DELETE FROM t WHERE id % 5 = 0 AND id < ?1", [i])
                .unwrap();
        }
    }
}

fn restore(url: &str, db: &str, out: &std::path::Path, txid: Option<u64>) -> CmdOut {
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
        args.push("--txid".into());
        args.push(t.to_string().into());
    }
    sqlfs_cli(&args)
}

/// Waits until a restore from `url` reaches `txid`; returns the restored file.
fn wait_replicated(fx: &Fixture, url: &str, db: &str, txid: u64, timeout: Duration) -> PathBuf {
    let out = fx.scratch_path(&format!("restored-{txid}.db"));
    wait_until(
        timeout,
        300,
        || {
            let r = restore(url, db, &out, None);
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

/// Waits (up to a minute) until app.db is on `url` up to its last staged TXID; returns it.
fn wait_app_replicated(fx: &Fixture, url: &str) -> u64 {
    let last = last_txid(fx, "app.db");
    wait_replicated(fx, url, "app.db", last, Duration::from_secs(60));
    last
}

/// Waits until app.db is on `url` up to TXID `last`, and checks that the latest restore is
/// the replay of that TXID from `fx`'s staging.
fn assert_latest_is_staged(fx: &Fixture, url: &str, last: u64, timeout: Duration) {
    let latest = wait_replicated(fx, url, "app.db", last, timeout);
    let staged = fx.scratch_path("staged.db");
    replay(&fx.cli_dir(), "app.db", last, &staged);
    assert!(
        std::fs::read(&latest).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
        "restore at latest differs from the staged state"
    );
}

fn last_txid(fx: &Fixture, db: &str) -> u64 {
    log_entries(&fx.cli_dir(), db)
        .last()
        .expect("staged transactions")
        .txid
}

#[test]
fn s3_replica_round_trip_at_every_sampled_txid() {
    s3_test_credentials();
    let srv = shared("roundtrip");
    let url = srv.url("roundtrip", "backups/host1");
    let mut fx = Fixture::new("s3rt", false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.mount();
    writes(&fx, "app.db", 1, 300);
    let last = last_txid(&fx, "app.db");
    assert_latest_is_staged(&fx, &url, last, Duration::from_secs(60));
    for t in [1, 2, last / 3, last / 2, last - 1] {
        let out = fx.scratch_path(&format!("at-{t}.db"));
        let r = restore(&url, "app.db", &out, Some(t));
        assert!(r.ok(), "{}", r.describe());
        let staged = fx.scratch_path(&format!("staged-{t}.db"));
        replay(&fx.cli_dir(), "app.db", t, &staged);
        assert!(
            std::fs::read(&out).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
            "restore at TXID {t} differs"
        );
    }
    fx.unmount();
}

#[test]
fn s3_server_stopped_for_30s_then_catches_up() {
    s3_test_credentials();
    let srv = S3Server::start("pause");
    let url = srv.url("pause", "p");
    let mut fx = Fixture::new("s3pause", false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.mount();
    writes(&fx, "app.db", 1, 50);
    wait_app_replicated(&fx, &url);
    srv.pause();
    let t0 = Instant::now();
    let mut next = 1000;
    while t0.elapsed() < Duration::from_secs(30) {
        writes(&fx, "app.db", next, 20);
        next += 20;
        sleep_ms(500);
    }
    assert!(
        fx.daemon_running(),
        "the daemon died while the store was down:\n{}",
        fx.daemon_logs()
    );
    srv.resume();
    let last = last_txid(&fx, "app.db");
    assert_latest_is_staged(&fx, &url, last, Duration::from_secs(120));
    let logs = fx.daemon_logs();
    assert!(!logs.contains("panicked"), "{logs}");
    fx.unmount();
}

#[test]
fn s3_second_writer_is_fenced_and_the_replica_stays_consistent() {
    s3_test_credentials();
    let srv = shared("fence");
    let url = srv.url("fence", "f");
    let mut a = Fixture::new("s3fenceA", false);
    a.opts.replicas = Some(vec![url.clone()]);
    a.mount();
    writes(&a, "app.db", 1, 20);
    wait_app_replicated(&a, &url);
    a.unmount();
    // A copy of the data directory, staging included: a second writer of the same database.
    let mut b = Fixture::new("s3fenceB", false);
    b.opts.replicas = Some(vec![url.clone()]);
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", a.backing.display()))
        .arg(&b.backing)
        .status()
        .unwrap();
    assert!(st.success());
    a.mount();
    b.mount();
    writes(&a, "app.db", 100, 30);
    writes(&b, "app.db", 500, 30);
    let a_fenced = wait_until(
        Duration::from_secs(60),
        300,
        || {
            let (la, lb) = (a.daemon_logs(), b.daemon_logs());
            if la.contains("another sqlfs") {
                Ok(true)
            } else if lb.contains("another sqlfs") {
                Ok(false)
            } else {
                Err((la, lb))
            }
        },
        |(la, lb)| format!("no writer was fenced off:\nA:\n{la}\nB:\n{lb}"),
    );
    let keeper = if a_fenced { &b } else { &a };
    let last = last_txid(keeper, "app.db");
    assert_latest_is_staged(keeper, &url, last, Duration::from_secs(60));
    a.unmount();
    b.unmount();
}

#[test]
fn s3_bad_urls_are_refused_clearly() {
    for (url, want) in [
        ("s3://", "no bucket"),
        ("s3://b?colour=red", "unknown parameter"),
    ] {
        let fx = Fixture::new("s3bad", false);
        let r = sqlfs_cli(&[
            "mount".into(),
            fx.mnt.clone().into(),
            "--replica".into(),
            url.into(),
        ]);
        assert!(
            !r.ok() && r.stderr.contains(want) && !r.stderr.contains("panicked"),
            "{url}: {}",
            r.describe()
        );
    }
}

/// Secrets put where they do not belong in a replica URL (user information, a signed
/// endpoint, an unknown parameter), straight or through `${VAR}` in the configuration, are
/// refused without being echoed; the bucket, prefix and endpoint host stay readable.
#[test]
fn s3_url_errors_never_show_secrets() {
    for url in [
        "s3://AKIAEXAMPLE:hunter2@bk/pre",
        "s3://bk/pre?endpoint=http://k:hunter2@127.0.0.1:9000&region=eu-west-1",
        "s3://bk/pre?endpoint=http://127.0.0.1:9000&secret-key=hunter2",
        "s3://bk/pre?endpoint=http://127.0.0.1:9000/?X-Amz-Signature=hunter2&timeout=never",
    ] {
        let fx = Fixture::new("s3secret", false);
        let r = sqlfs_cli(&[
            "mount".into(),
            fx.mnt.clone().into(),
            "--replica".into(),
            url.into(),
        ]);
        assert!(
            !r.ok() && !r.stderr.contains("panicked"),
            "{url}: {}",
            r.describe()
        );
        let all = format!("{}{}", r.stdout, r.stderr);
        assert!(
            !all.contains("hunter2"),
            "{url}: a secret in the error:\n{all}"
        );
        assert!(all.contains("bad replica URL"), "{url}: {all}");
        if !url.contains('@') {
            assert!(
                all.contains("s3://bk/pre") && all.contains("127.0.0.1:9000"),
                "{url}: bucket, prefix and endpoint host should stay readable:\n{all}"
            );
        }
        // The same through the configuration file and an environment variable.
        let conf = fx.scratch_path("sqlfs.yml");
        std::fs::write(
            &conf,
            format!(
                "dir: {}\nreplicas:\n  - url: ${{SQLFS_TEST_URL}}\n",
                fx.mnt.display()
            ),
        )
        .unwrap();
        let mut c = Command::new(BIN);
        c.arg("mount")
            .arg("--config")
            .arg(&conf)
            .env("SQLFS_TEST_URL", url);
        let r = run_cmd(c, CLI_TIMEOUT);
        assert!(
            !r.ok() && !r.stderr.contains("panicked"),
            "{url}: {}",
            r.describe()
        );
        assert!(
            !format!("{}{}", r.stdout, r.stderr).contains("hunter2"),
            "{url} via the configuration: a secret in the error:\n{}",
            r.describe()
        );
        assert!(r.stderr.contains("replicas[0].url"), "{}", r.describe());
    }
}

/// An encrypted replica on the S3-compatible server: a random workload shipped in several
/// objects, then with the mount stopped every object in the bucket is encrypted, a restore
/// with the identity is the live database and the replay of sampled TXIDs, and a restore
/// with another identity or none fails clearly and writes nothing.
#[test]
fn s3_encrypted_replica_round_trip() {
    s3_test_credentials();
    let seed = seed_for("s3_encrypted_replica_round_trip");
    let srv = shared("crypt");
    let prefix = "enc/host1";
    let url = srv.url("crypt", prefix);
    let mut fx = Fixture::new("s3crypt", false);
    let key = fx.scratch_path("replica.key");
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.age_recipients = vec![keygen(&key)];
    fx.opts.sync_interval = Some("250ms".into());
    fx.opts.stage_limit = Some(1 << 30);
    fx.mount();
    let db = "app.db";
    {
        let c = open_db(&fx.path(db));
        c.execute_batch(&format!("PRAGMA journal_mode=WAL; {SCHEMA}"))
            .unwrap();
    }
    let mut d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
    // Instants between batches (ms precision), for restores by timestamp.
    let mut instants = Vec::new();
    for batch in 0..4 {
        for _ in 0..8 {
            d.random_txn().unwrap();
        }
        if batch == 1 {
            d.big_txn(2 << 20).unwrap();
            d.random_checkpoint();
        }
        // Let a shipping pass or two go by between batches: several objects.
        sleep_ms(300);
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        instants.push(ns / 1_000_000 * 1_000_000);
        sleep_ms(300);
    }
    drop(d);
    let live = {
        let c = open_db(&fx.path(db));
        integrity_ok(&c);
        snapshot(&c, true)
    };
    fx.unmount();

    // Nothing in the bucket is readable as plain text.
    let keys = srv.list("crypt", &format!("{prefix}/"));
    let segs = keys.iter().filter(|k| k.ends_with(".seg")).count();
    assert!(
        keys.iter().any(|k| k.contains("/names/")) && segs >= 2,
        "expected a name and several segments in the bucket: {keys:?}"
    );
    for k in &keys {
        assert_sealed(&srv.object("crypt", k), k);
    }

    // With the identity: the live state, and the replay of earlier TXIDs.
    let last = last_txid(&fx, db);
    let out = fx.scratch_path("restored.db");
    assert_eq!(restore_ok_with(&url, db, &out, None, Some(&key)), last);
    assert_same_image(
        &as_restored(live.image.clone()),
        &std::fs::read(&out).unwrap(),
        live.page_size,
        "decrypted restore at latest vs the live page image",
    );
    for t in [1, last / 2, last - 1, last] {
        let out = fx.scratch_path(&format!("at-{t}.db"));
        restore_ok_with(&url, db, &out, Some(t), Some(&key));
        let staged = fx.scratch_path(&format!("staged-{t}.db"));
        replay(&fx.cli_dir(), db, t, &staged);
        assert!(
            std::fs::read(&out).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
            "decrypted restore at TXID {t} differs from its replay"
        );
    }

    // By timestamp: commit times come from the encrypted objects' headers.
    let log = log_entries(&fx.cli_dir(), db);
    for (i, ns) in instants.into_iter().enumerate() {
        let text = rfc3339(ns, 3);
        let want = log
            .iter()
            .filter(|e| e.ts <= ns as u128)
            .map(|e| e.txid)
            .max()
            .unwrap();
        let out = fx.scratch_path(&format!("at-instant-{i}.db"));
        let mut a: Vec<std::ffi::OsString> = vec![
            "restore".into(),
            "--replica".into(),
            url.clone().into(),
            "--db".into(),
            db.into(),
            "-o".into(),
            out.clone().into(),
            "--age-identity".into(),
            key.clone().into(),
        ];
        a.extend(["--timestamp".into(), text.clone().into()]);
        let o = sqlfs_cli(&a);
        assert!(
            !o.stderr.contains("panicked") && o.ok(),
            "restore --timestamp {text}:\n{}",
            o.describe()
        );
        assert!(
            o.stdout.contains(&format!("at TXID {want} ")),
            "restore --timestamp {text} did not restore TXID {want}:\n{}",
            o.describe()
        );
        let staged = fx.scratch_path(&format!("staged-instant-{i}.db"));
        replay(&fx.cli_dir(), db, want, &staged);
        assert!(
            std::fs::read(&out).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
            "decrypted restore at {text} (TXID {want}) differs from its replay"
        );
    }

    // Another identity, and none.
    let outdir = fx.scratch_path("out");
    std::fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let other = fx.scratch_path("other.key");
    keygen(&other);
    let o = restore_with(&url, db, &out, None, false, Some(&other));
    assert_restore_fails(&o, &out, "restore with another identity");
    assert_says(&o, "identity", "restore with another identity");
    let o = restore_with(&url, db, &out, None, false, None);
    assert_restore_fails(&o, &out, "restore without --age-identity");
    assert_says(&o, "--age-identity", "restore without --age-identity");
}

/// `sqlfs status DIR` output (it must answer).
fn status_text(fx: &Fixture) -> String {
    let o = sqlfs_cli(&["status".into(), fx.mnt.as_os_str().to_os_string()]);
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
    assert!(
        o.status.code().is_some_and(|c| c == 0 || c == 1),
        "{}",
        o.describe()
    );
    o.stdout
}

/// A store that stops answering (frozen with SIGSTOP: connections are accepted, nothing is
/// ever answered) must become an error the shipper reports and retries, not a request that
/// hangs forever: `sqlfs status` shows the replica failing with a timeout (the URL's
/// `timeout=` shortens the wait for the test). Once the store answers again, everything
/// reaches it.
#[test]
fn s3_store_that_stops_answering_is_a_timeout_not_a_hang() {
    s3_test_credentials();
    let srv = S3Server::start("hang");
    let url = format!("{}&timeout=2s", srv.url("hang", "p"));
    let mut fx = Fixture::new("s3hang", false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some("200ms".into());
    fx.mount();
    writes(&fx, "app.db", 1, 30);
    wait_app_replicated(&fx, &url);
    srv.pause();
    writes(&fx, "app.db", 1000, 10);
    let text = wait_until(
        Duration::from_secs(120),
        500,
        || {
            let text = status_text(&fx);
            let failing = text
                .lines()
                .find(|l| l.starts_with("replica s3://"))
                .is_some_and(|l| l.contains("FAILING") && l.to_lowercase().contains("timeout"));
            if failing {
                Ok(text)
            } else {
                Err(text)
            }
        },
        |text| {
            format!(
                "the replica of a frozen store never failed with a timeout:\n{text}\ndaemon:\n{}",
                fx.daemon_logs()
            )
        },
    );
    eprintln!("{text}");
    assert!(
        !text.contains("test-secret"),
        "a secret in the status:\n{text}"
    );
    assert!(fx.daemon_running());
    srv.resume();
    writes(&fx, "app.db", 2000, 5);
    let last = last_txid(&fx, "app.db");
    wait_replicated(&fx, &url, "app.db", last, Duration::from_secs(120));
    wait_for(
        Duration::from_secs(60),
        300,
        || !status_text(&fx).contains("FAILING"),
        || {
            format!(
                "status still failing after the store came back:\n{}",
                status_text(&fx)
            )
        },
    );
    fx.unmount();
}

/// A file replica and an S3 replica on one mount progress each on its own: while the store is
/// frozen (SIGSTOP), the file replica keeps receiving every transaction and `sqlfs status`
/// shows the S3 replica behind; once the store answers again it catches up, and both
/// replicas restore the staged state.
#[test]
fn s3_and_file_replicas_progress_independently() {
    s3_test_credentials();
    let srv = S3Server::start("mixed");
    let s3url = srv.url("mixed", "m");
    let mut fx = Fixture::new("s3mixed", false);
    let fdir = fx.scratch_path("file-replica");
    let furl = common::replica::file_url(&fdir);
    fx.opts.replicas = Some(vec![s3url.clone(), furl.clone()]);
    fx.opts.sync_interval = Some("200ms".into());
    fx.mount();
    writes(&fx, "app.db", 1, 30);
    let first = last_txid(&fx, "app.db");
    wait_replicated(&fx, &s3url, "app.db", first, Duration::from_secs(60));
    common::replica::wait_replica_covers(&fdir, "app.db", first, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));

    srv.pause();
    let mut last = first;
    for round in 0..3 {
        writes(&fx, "app.db", 1000 + round * 100, 10);
        last = last_txid(&fx, "app.db");
        common::replica::wait_replica_covers(&fdir, "app.db", last, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("round {round}, the store frozen: {e}"));
    }
    let text = wait_until(
        Duration::from_secs(30),
        200,
        || {
            let text = status_text(&fx);
            let file_ok = text.lines().any(|l| {
                l.trim_start()
                    .starts_with(&format!("{furl}: TXID {last}, 0 behind"))
            });
            if file_ok {
                Ok(text)
            } else {
                Err(text)
            }
        },
        |text| format!("status does not show the file replica up to date:\n{text}"),
    );
    let s3_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("s3://mixed/m"))
        .unwrap_or_else(|| panic!("no S3 replica line:\n{text}"));
    let held: u64 = s3_line
        .split("TXID ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{s3_line}"));
    assert!(
        held < last,
        "the frozen store holds TXID {held} of {last}:\n{text}"
    );

    srv.resume();
    let from_s3 = wait_replicated(&fx, &s3url, "app.db", last, Duration::from_secs(120));
    let from_file = fx.scratch_path("from-file.db");
    let r = restore(&furl, "app.db", &from_file, None);
    assert!(r.ok(), "{}", r.describe());
    let staged = fx.scratch_path("staged.db");
    replay(&fx.cli_dir(), "app.db", last, &staged);
    let want = as_restored(std::fs::read(&staged).unwrap());
    assert!(
        std::fs::read(&from_s3).unwrap() == want,
        "S3 restore differs"
    );
    assert!(
        std::fs::read(&from_file).unwrap() == want,
        "file restore differs"
    );
    fx.unmount();
}

/// An idle mount costs no requests: once what was written is shipped and compacted, the
/// mount sends nothing at all to the store (counted by a relay in front of it) over many
/// sync and compaction intervals; the next write is shipped again.
#[test]
fn s3_idle_mount_sends_no_requests() {
    s3_test_credentials();
    let srv = shared("idle");
    let relay = Relay::start(srv.port);
    let through = format!(
        "s3://idle/p?endpoint=http://127.0.0.1:{}&region=us-east-1&force-path-style=true",
        relay.port
    );
    let direct = srv.url("idle", "p");
    let mut fx = Fixture::new("s3idle", false);
    fx.opts.replicas = Some(vec![through]);
    fx.opts.sync_interval = Some("200ms".into());
    fx.opts.extra_args = vec!["--compaction".into(), "1s".into()];
    fx.mount();
    for round in 0..3 {
        writes(&fx, "app.db", 1 + round * 100, 10);
        sleep_ms(400);
    }
    let last = last_txid(&fx, "app.db");
    wait_replicated(&fx, &direct, "app.db", last, Duration::from_secs(60));
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
    // The next write is shipped through the relay again.
    writes(&fx, "app.db", 1000, 3);
    let last = last_txid(&fx, "app.db");
    wait_replicated(&fx, &direct, "app.db", last, Duration::from_secs(60));
    assert!(relay.sent() > before);
    fx.unmount();
}

/// The status line of `app.db` on the S3 replica (`  s3://…: TXID n, k behind, …`).
fn s3_status_line(text: &str) -> Option<String> {
    text.lines()
        .find(|l| l.trim_start().starts_with("s3://"))
        .map(str::to_string)
}

/// A store that stalls while the app commits, then runs the requests it queued late: each
/// attempt to store the next segment timed out at the client, the store kept them, and when
/// it resumes the first (smallest) attempt creates the key and the later, larger ones are
/// refused. The shipper must read what the key holds (never assume it holds its own last
/// attempt), so the chain has no hole: once `sqlfs status` says the replica is 0 behind, a
/// restore of the latest state succeeds and equals the app's database, and status is clean.
#[test]
fn s3_store_that_stalls_and_replays_late_requests_leaves_no_hole() {
    stall_and_replay_late(false);
}

/// The same on an encrypted replica whose mount has no key to decrypt it (recipients only):
/// the object at the key is recognised by its first bytes as one of the mount's own attempts.
#[test]
fn s3_encrypted_store_that_stalls_and_replays_late_requests_leaves_no_hole() {
    stall_and_replay_late(true);
}

fn stall_and_replay_late(sealed: bool) {
    s3_test_credentials();
    let srv = S3Server::start("stall");
    let proxy = common::faultproxy::FaultProxy::start(srv.port);
    let url = proxy.url("stall", "p", "1s");
    let direct = srv.url("stall", "p");
    let mut fx = Fixture::new("s3stall", false);
    let key = fx.scratch_path("replica.key");
    if sealed {
        fx.opts.age_recipients = vec![keygen(&key)];
    }
    let identity = sealed.then_some(key.as_path());
    let restore =
        |out: &std::path::Path| restore_with(&direct, "app.db", out, None, true, identity);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some("200ms".into());
    fx.opts.extra_args = vec!["--compaction".into(), "none".into()];
    fx.mount();
    writes(&fx, "app.db", 1, 30);
    let first = last_txid(&fx, "app.db");
    let probe = fx.scratch_path("stall-probe.db");
    wait_until(
        Duration::from_secs(60),
        300,
        || {
            let r = restore(&probe);
            if r.ok() && r.stdout.contains(&format!("at TXID {first} ")) {
                Ok(())
            } else {
                Err(r)
            }
        },
        |r| {
            format!(
                "the replica never reached TXID {first}:\n{}\n{}",
                r.describe(),
                fx.daemon_logs()
            )
        },
    );

    // The store stalls while the app goes on committing: several attempts at the next
    // segment's key, each holding more transactions than the one before, are held.
    proxy.stall();
    // Distinct attempts (bodies of different sizes) at level-0 keys.
    let puts = || {
        let mut sizes: Vec<u64> = proxy
            .held()
            .iter()
            .filter(|(l, _)| l.starts_with("PUT ") && l.contains("/l0/"))
            .map(|(_, n)| *n)
            .collect();
        sizes.sort();
        sizes.dedup();
        sizes.len()
    };
    let mut round = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while puts() < 3 {
        writes(&fx, "app.db", 1000 + round * 20, 5);
        round += 1;
        sleep_ms(700);
        assert!(
            Instant::now() < deadline,
            "the shipper made {} attempts at a segment while the store stalled:\n{}",
            puts(),
            fx.daemon_logs()
        );
    }
    let last = last_txid(&fx, "app.db");
    let replayed = proxy.release();
    eprintln!("replayed late: {replayed:#?}");
    assert!(
        replayed
            .iter()
            .any(|(l, s)| l.starts_with("PUT ") && l.contains("/l0/") && *s == 200),
        "no late attempt created a segment: {replayed:?}"
    );

    // Status says 0 behind only for a chain a restore follows to the end.
    let out = fx.scratch_path("stall-latest.db");
    let text = wait_until(
        Duration::from_secs(120),
        300,
        || {
            let text = status_text(&fx);
            let zero = s3_status_line(&text)
                .is_some_and(|l| l.contains(&format!("TXID {last}, 0 behind")));
            if zero {
                Ok(text)
            } else {
                Err(text)
            }
        },
        |text| {
            format!(
                "the replica never caught up after the store resumed:\n{text}\n{}",
                fx.daemon_logs()
            )
        },
    );
    let r = restore(&out);
    assert!(
        r.ok() && r.stdout.contains(&format!("at TXID {last} ")),
        "status said {:?} but the latest restore fails:\n{}\n{}",
        s3_status_line(&text),
        r.describe(),
        fx.daemon_logs()
    );
    let staged = fx.scratch_path("stall-staged.db");
    replay(&fx.cli_dir(), "app.db", last, &staged);
    assert!(
        std::fs::read(&out).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
        "restore at latest differs from the staged state"
    );
    let rows = |p: &std::path::Path| -> (i64, i64) {
        let c = rusqlite::Connection::open(p).unwrap();
        c.query_row("SELECT count(*), total(length(v)) FROM t", [], |r| {
            Ok((r.get(0)?, r.get::<_, f64>(1)? as i64))
        })
        .unwrap()
    };
    assert_eq!(
        rows(&out),
        rows(&fx.path("app.db")),
        "restore vs the app's database"
    );
    // After recovery the status is clean.
    let o = sqlfs_cli(&["status".into(), fx.mnt.as_os_str().to_os_string()]);
    assert!(
        o.ok() && !o.stdout.contains("FAILING") && !o.stdout.contains("BROKEN"),
        "{}",
        o.describe()
    );
    assert!(!fx.daemon_logs().contains("panicked"));
    fx.unmount();
}

/// Two data directories shipping `app.db` to one bucket prefix: the name's claim (a
/// conditional create in the store) belongs to the first; the second is fenced (`status`
/// exits 1 and says so) and every restore returns the first one's database.
#[test]
fn s3_second_data_dir_with_the_same_name_is_fenced() {
    s3_test_credentials();
    let srv = shared("claim");
    let url = srv.url("claim", "c");
    let mut a = Fixture::new("s3claimA", false);
    a.opts.replicas = Some(vec![url.clone()]);
    a.opts.sync_interval = Some("200ms".into());
    let mut b = Fixture::new("s3claimB", false);
    b.opts.replicas = Some(vec![url.clone()]);
    b.opts.sync_interval = Some("200ms".into());
    a.mount();
    writes(&a, "app.db", 1, 20);
    wait_app_replicated(&a, &url);
    b.mount();
    writes(&b, "app.db", 500, 40);
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
    writes(&a, "app.db", 100, 10);
    let last = last_txid(&a, "app.db");
    assert_latest_is_staged(&a, &url, last, Duration::from_secs(60));
    let keys = srv.list("claim", "c/names/");
    assert_eq!(keys.len(), 1, "database ids named in the replica: {keys:?}");
    a.unmount();
    b.unmount();
}

/// Several databases of one mount on S3 are rechecked from one listing of the claims (the
/// listing states each claim's MD5): when another data directory takes one name over with
/// `--takeover`, the listing shows that claim changed, the first mount reads it and fences
/// that database alone; the others go on shipping.
#[test]
fn s3_takeover_of_one_of_several_names_is_noticed() {
    s3_test_credentials();
    let srv = shared("several");
    let url = srv.url("several", "s");
    let mut a = Fixture::new("s3sevA", false);
    a.opts.replicas = Some(vec![url.clone()]);
    a.opts.sync_interval = Some("200ms".into());
    let mut b = Fixture::new("s3sevB", false);
    b.opts.replicas = Some(vec![url.clone()]);
    b.opts.sync_interval = Some("200ms".into());
    b.opts.extra_args = vec!["--takeover".into()];
    a.mount();
    let dbs = ["t0.db", "t1.db", "t2.db"];
    for db in dbs {
        writes(&a, db, 1, 5);
    }
    for db in dbs {
        let last = last_txid(&a, db);
        wait_replicated(&a, &url, db, last, Duration::from_secs(60));
    }
    b.mount();
    writes(&b, "t0.db", 500, 5);
    let mut n = 100;
    wait_until(
        Duration::from_secs(90),
        300,
        || {
            for db in dbs {
                writes(&a, db, n, 1);
            }
            n += 1;
            let log = a.daemon_logs();
            if log.contains("t0.db in ") && log.contains("belongs to another sqlfs") {
                Ok(())
            } else {
                Err(log)
            }
        },
        |log| format!("the first mount did not notice the takeover of t0.db:\n{log}"),
    );
    let log = a.daemon_logs();
    for db in ["t1.db", "t2.db"] {
        assert!(
            !log.contains(&format!("{db} in ")),
            "{db} was fenced too:\n{log}"
        );
        writes(&a, db, 1000, 3);
        let last = last_txid(&a, db);
        wait_replicated(&a, &url, db, last, Duration::from_secs(60));
    }
    a.unmount();
    b.unmount();
}
