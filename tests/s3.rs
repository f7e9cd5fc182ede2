//! Object-storage replicas against a real S3-compatible server on loopback (installed by
//! `make deps` into .venv; `SQLFS_S3_SERVER` names another binary). Every test starts its own
//! server on a free port.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::replica::{
    as_restored, assert_restore_fails, assert_says, assert_sealed, keygen, restore_ok_with,
    restore_with,
};
use common::workload::{Driver, DriverCfg, SCHEMA};
use common::*;

struct Server {
    child: Child,
    port: u16,
}

fn server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SQLFS_S3_SERVER") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    assert!(
        p.exists(),
        "the S3-compatible test server is not installed at {}: run `make deps` (or `make test`)",
        p.display()
    );
    p
}

/// One HTTP request without a body; returns the status code.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    let line = String::from_utf8_lossy(&buf[..n]);
    Ok(line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// One GET without a body; returns the status code and the body. The test server serves
/// private objects only to requests that carry credentials, but does not verify signatures:
/// a well-formed header with the test key and a dummy signature is enough.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: AWS4-HMAC-SHA256 \
         Credential=test/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, \
         Signature={}\r\nConnection: close\r\n\r\n",
        "0".repeat(64)
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of the response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let (mut plain, mut rest) = (Vec::new(), &body[..]);
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .unwrap_or(rest.len());
            let size = std::str::from_utf8(&rest[..eol])
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .unwrap_or(0);
            if size == 0 || eol + 2 + size > rest.len() {
                break;
            }
            plain.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[(eol + 4 + size).min(rest.len())..];
        }
        body = plain;
    }
    Ok((status, body))
}

impl Server {
    /// Every key in `bucket` under `prefix` (one listing page: the tests write far fewer
    /// than a page holds).
    fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (status, body) = http_get(
            self.port,
            &format!("/{bucket}?list-type=2&max-keys=1000&prefix={prefix}"),
        )
        .expect("listing the bucket");
        let xml = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "listing {bucket}/{prefix}: {xml}");
        assert!(
            !xml.contains("<IsTruncated>true"),
            "listing {bucket}/{prefix} is truncated"
        );
        xml.split("<Key>")
            .skip(1)
            .filter_map(|p| p.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect()
    }

    /// The bytes of one object.
    fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        let (status, body) =
            http_get(self.port, &format!("/{bucket}/{key}")).expect("reading an object");
        assert_eq!(status, 200, "GET {bucket}/{key}");
        body
    }

    fn start(bucket: &str) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(server_bin());
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("start the S3-compatible test server");
        let s = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if let Ok(200) = s.bucket(bucket) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the S3-compatible test server did not come up on port {port}"
            );
            sleep_ms(200);
        }
        s
    }

    /// Creates `bucket`; returns the HTTP status.
    fn bucket(&self, bucket: &str) -> std::io::Result<u16> {
        http(self.port, "PUT", &format!("/{bucket}"))
    }

    fn url(&self, bucket: &str, prefix: &str) -> String {
        format!("s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&force-path-style=true", self.port)
    }

    fn pause(&self) {
        send_signal(self.child.id(), libc::SIGSTOP);
    }

    fn resume(&self) {
        send_signal(self.child.id(), libc::SIGCONT);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One server shared by the tests that do not stop it (starting one is slow on a small machine).
fn shared(bucket: &str) -> &'static Server {
    static SHARED: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
    static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    extern "C" fn kill_shared() {
        let pid = PID.load(std::sync::atomic::Ordering::SeqCst);
        if pid != 0 {
            send_signal(pid, libc::SIGKILL);
        }
    }
    let s = SHARED.get_or_init(|| {
        let s = Server::start("shared");
        PID.store(s.child.id(), std::sync::atomic::Ordering::SeqCst);
        // Statics are never dropped: stop the shared server when the test process exits.
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(kill_shared) };
        s
    });
    assert_eq!(s.bucket(bucket).unwrap(), 200, "creating bucket {bucket}");
    s
}

fn credentials() {
    // Test credentials for the loopback server; no instance metadata lookups.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
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
    let deadline = Instant::now() + timeout;
    loop {
        let r = restore(url, db, &out, None);
        assert!(!r.stderr.contains("panicked"), "{}", r.describe());
        if r.ok() && r.stdout.contains(&format!("at TXID {txid} ")) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not reach TXID {txid}; last attempt:\n{}\ndaemon:\n{}",
            r.describe(),
            fx.daemon_logs()
        );
        sleep_ms(300);
    }
}

fn last_txid(fx: &Fixture, db: &str) -> u64 {
    log_entries(&fx.cli_dir(), db)
        .last()
        .expect("staged transactions")
        .txid
}

#[test]
fn s3_replica_round_trip_at_every_sampled_txid() {
    credentials();
    let srv = shared("roundtrip");
    let url = srv.url("roundtrip", "backups/host1");
    let mut fx = Fixture::new("s3rt", false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.mount();
    writes(&fx, "app.db", 1, 300);
    let last = last_txid(&fx, "app.db");
    let latest = wait_replicated(&fx, &url, "app.db", last, Duration::from_secs(60));
    let staged = fx.scratch_path("staged.db");
    replay(&fx.cli_dir(), "app.db", last, &staged);
    assert!(
        std::fs::read(&latest).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
        "restore at latest differs from the staged state"
    );
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
    credentials();
    let srv = Server::start("pause");
    let url = srv.url("pause", "p");
    let mut fx = Fixture::new("s3pause", false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.mount();
    writes(&fx, "app.db", 1, 50);
    wait_replicated(
        &fx,
        &url,
        "app.db",
        last_txid(&fx, "app.db"),
        Duration::from_secs(60),
    );
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
    let latest = wait_replicated(&fx, &url, "app.db", last, Duration::from_secs(120));
    let staged = fx.scratch_path("staged.db");
    replay(&fx.cli_dir(), "app.db", last, &staged);
    assert!(
        std::fs::read(&latest).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
        "restore at latest differs from the staged state"
    );
    let logs = fx.daemon_logs();
    assert!(!logs.contains("panicked"), "{logs}");
    fx.unmount();
}

#[test]
fn s3_second_writer_is_fenced_and_the_replica_stays_consistent() {
    credentials();
    let srv = shared("fence");
    let url = srv.url("fence", "f");
    let mut a = Fixture::new("s3fenceA", false);
    a.opts.replicas = Some(vec![url.clone()]);
    a.mount();
    writes(&a, "app.db", 1, 20);
    wait_replicated(
        &a,
        &url,
        "app.db",
        last_txid(&a, "app.db"),
        Duration::from_secs(60),
    );
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let a_fenced = loop {
        let (la, lb) = (a.daemon_logs(), b.daemon_logs());
        if la.contains("another sqlfs") {
            break true;
        }
        if lb.contains("another sqlfs") {
            break false;
        }
        assert!(
            Instant::now() < deadline,
            "no writer was fenced off:\nA:\n{la}\nB:\n{lb}"
        );
        sleep_ms(300);
    };
    let keeper = if a_fenced { &b } else { &a };
    let last = last_txid(keeper, "app.db");
    let latest = wait_replicated(keeper, &url, "app.db", last, Duration::from_secs(60));
    let staged = keeper.scratch_path("staged.db");
    replay(&keeper.cli_dir(), "app.db", last, &staged);
    assert!(
        std::fs::read(&latest).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
        "restore at latest differs from the staged state"
    );
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

/// An encrypted replica on the S3-compatible server: a random workload shipped in several
/// objects, then with the mount stopped every object in the bucket is encrypted, a restore
/// with the identity is the live database and the replay of sampled TXIDs, and a restore
/// with another identity or none fails clearly and writes nothing.
#[test]
fn s3_encrypted_replica_round_trip() {
    credentials();
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
    for batch in 0..4 {
        for _ in 0..8 {
            d.random_txn().unwrap();
        }
        if batch == 1 {
            d.big_txn(2 << 20).unwrap();
            d.random_checkpoint();
        }
        // Let a shipping pass or two go by between batches: several objects.
        sleep_ms(600);
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
