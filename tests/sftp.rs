//! SFTP replicas end to end against a private OpenSSH server on loopback (Debian's
//! `openssh-server`, installed by `make deps`; see tests/common/sshserver.rs): mount → write
//! with SQLite → ship (encrypted) → restore at TXIDs; a `.history` view read in place from
//! the server; a second writer fenced; unknown host keys refused; a server that stops
//! answering, or goes down and comes back, loses nothing.
//!
//! The server's replica directory is a local directory of this machine, so the tests read the
//! replica's files directly (the layout of a file replica) to check what reached it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::replica::{
    as_restored, assert_sealed, keygen, replica_last_txid, restore_ok, restore_ok_with,
    restore_with, restored_txid, tree, wait_replica_covers,
};
use common::sshserver::SshServer;
use common::*;

/// Rows of `blob` bytes each, with a delete now and then: one transaction per statement.
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

fn last_txid(fx: &Fixture, db: &str) -> u64 {
    log_entries(&fx.cli_dir(), db)
        .last()
        .expect("staged transactions")
        .txid
}

fn sqlfs(args: &[&str]) -> CmdOut {
    sqlfs_cli(&args.iter().map(|a| a.into()).collect::<Vec<_>>())
}

/// Waits until the replica directory `dir` on the server holds `db` up to `txid`.
fn wait_covers(fx: &Fixture, dir: &Path, db: &str, txid: u64, timeout: Duration) {
    if let Err(e) = wait_replica_covers(dir, db, txid, timeout) {
        panic!("{e}\ndaemon:\n{}", fx.daemon_logs());
    }
}

/// Restores the latest state over SFTP and checks it is the replay of `last` from staging.
fn assert_latest_is_staged(fx: &Fixture, url: &str, last: u64) {
    let out = fx.scratch_path(&format!("latest-{last}.db"));
    let got = restore_ok(url, "app.db", &out, None);
    assert_eq!(got, last, "restore over sftp stopped short");
    let staged = fx.scratch_path(&format!("staged-{last}.db"));
    replay(&fx.cli_dir(), "app.db", last, &staged);
    assert!(
        std::fs::read(&out).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
        "restore at latest differs from the staged state"
    );
}

/// No temporary upload is left behind in the replica directory.
fn assert_no_temporaries(dir: &Path) {
    let out = Command::new("find")
        .arg(dir)
        .args(["-name", ".tmp-*"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.trim().is_empty(), "temporary files left: {s}");
}

/// Mount → write → ship encrypted over SFTP → restore at sampled TXIDs (each the replay of
/// that TXID from staging); every object on the server is encrypted; `sqlfs list` reads it.
#[test]
fn sftp_encrypted_replica_round_trip() {
    let srv = SshServer::start();
    let url = srv.url("enc/host1");
    let dir = srv.store().join("enc/host1");
    let mut fx = Fixture::new("sftpenc", false);
    let key = fx.scratch_path("replica.key");
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.age_recipients = vec![keygen(&key)];
    fx.opts.sync_interval = Some("250ms".into());
    fx.mount();
    writes(&fx, "app.db", 1, 150, 300);
    sleep_ms(600);
    writes(&fx, "app.db", 1000, 150, 300);
    let last = last_txid(&fx, "app.db");
    // The test reads no encrypted name: restore with the key until it reaches `last`.
    let probe = fx.scratch_path("probe.db");
    wait_until(
        Duration::from_secs(60),
        300,
        || {
            let o = restore_with(&url, "app.db", &probe, None, true, Some(&key));
            assert!(!o.stderr.contains("panicked"), "{}", o.describe());
            if o.ok() && restored_txid(&o) >= last {
                Ok(())
            } else {
                Err(o)
            }
        },
        |o| {
            format!(
                "the replica never reached TXID {last}:\n{}\n{}",
                o.describe(),
                fx.daemon_logs()
            )
        },
    );
    fx.unmount();

    let files = tree(&dir);
    assert!(
        files.keys().any(|k| k.starts_with("names/")) && files.keys().any(|k| k.ends_with(".seg")),
        "expected a name and segments on the server: {:?}",
        files.keys().collect::<Vec<_>>()
    );
    for k in files.keys() {
        assert_sealed(&std::fs::read(dir.join(k)).unwrap(), k);
    }
    assert_no_temporaries(&dir);

    for t in [1, 2, last / 3, last / 2, last - 1, last] {
        let out = fx.scratch_path(&format!("at-{t}.db"));
        assert_eq!(
            restore_ok_with(&url, "app.db", &out, Some(t), Some(&key)),
            t
        );
        let staged = fx.scratch_path(&format!("staged-{t}.db"));
        replay(&fx.cli_dir(), "app.db", t, &staged);
        assert!(
            std::fs::read(&out).unwrap() == as_restored(std::fs::read(&staged).unwrap()),
            "restore at TXID {t} over sftp differs from its replay"
        );
    }
    let key_s = key.to_string_lossy().into_owned();
    let o = sqlfs(&["list", "--replica", &url, "--age-identity", &key_s]);
    assert!(o.ok() && o.stdout.contains("app.db"), "{}", o.describe());
}

/// `.history` views of states the mount no longer stages are read in place from the SFTP
/// replica (ranged reads) and equal what restore writes.
#[test]
fn sftp_history_view_reads_the_replica() {
    let srv = SshServer::start();
    let url = srv.url("hist");
    let dir = srv.store().join("hist");
    let mut fx = Fixture::new("sftphist", false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some("250ms".into());
    // Small: sealed segments get folded, so old states come from the replica.
    fx.opts.stage_limit = Some(1 << 20);
    fx.mount();
    for round in 0..6 {
        writes(&fx, "app.db", round * 100 + 1, 40, 60_000);
        let c = rusqlite::Connection::open(fx.path("app.db")).unwrap();
        let _ = c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    }
    let last = last_txid(&fx, "app.db");
    wait_covers(&fx, &dir, "app.db", last, Duration::from_secs(60));
    let base = wait_until(
        Duration::from_secs(30),
        200,
        || {
            let b = staged_log(&fx.cli_dir(), "app.db").base.map_or(0, |b| b.0);
            if b > 2 {
                Ok(b)
            } else {
                Err(b)
            }
        },
        |b| format!("staging was never folded (base {b}): the replica path is untested"),
    );
    let mut checked = 0;
    for t in [1, base / 2, base - 1] {
        if t == 0 {
            continue;
        }
        let out = fx.scratch_path(&format!("txid-{t}.db"));
        if !restore_cmd_ok(&url, &out, t) {
            // Folded locally before it was shipped: the replica has a later snapshot instead.
            continue;
        }
        let view = fx.path(&format!(".history/txid-{t}/app.db"));
        let got = std::fs::read(&view)
            .unwrap_or_else(|e| panic!("reading {}: {e}\n{}", view.display(), fx.daemon_logs()));
        let want = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), want.len(), "view txid-{t}: size");
        // Views present rollback-journal mode (bytes 18-19 of page 1); restores may not.
        let strip = |mut b: Vec<u8>| {
            if b.len() > 19 {
                b[18] = 1;
                b[19] = 1;
            }
            b
        };
        assert!(
            strip(got) == strip(want),
            "the view at txid-{t} differs from the restore"
        );
        checked += 1;
    }
    assert!(
        checked > 0,
        "no state before the staged base was restorable"
    );
    fx.unmount();
}

fn restore_cmd_ok(url: &str, out: &Path, t: u64) -> bool {
    let o = common::replica::restore_cmd(url, "app.db", out, Some(t), true);
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
    o.ok()
}

/// Two data directories ship the same database name to one SFTP replica: one is fenced, the
/// other's chain stays whole.
#[test]
fn sftp_second_writer_is_fenced() {
    let srv = SshServer::start();
    let url = srv.url("fence");
    let mut a = Fixture::new("sftpfenceA", false);
    a.opts.replicas = Some(vec![url.clone()]);
    a.mount();
    writes(&a, "app.db", 1, 20, 300);
    let last = last_txid(&a, "app.db");
    wait_covers(
        &a,
        &srv.store().join("fence"),
        "app.db",
        last,
        Duration::from_secs(60),
    );
    a.unmount();
    // A copy of the data directory, staging included: a second writer of the same database.
    let mut b = Fixture::new("sftpfenceB", false);
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
    writes(&a, "app.db", 100, 30, 300);
    writes(&b, "app.db", 500, 30, 300);
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
    wait_covers(
        keeper,
        &srv.store().join("fence"),
        "app.db",
        last,
        Duration::from_secs(60),
    );
    assert_latest_is_staged(keeper, &url, last);
    let logs = format!("{}{}", a.daemon_logs(), b.daemon_logs());
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        !logs.contains("posix-rename"),
        "put was not atomic:\n{logs}"
    );
    a.unmount();
    b.unmount();
}

/// A host whose key `known_hosts` lacks is refused with an error that says so and shows the
/// key's fingerprint; pinning that fingerprint lets the client in, a wrong pin does not. A
/// password in the URL is refused without being echoed.
#[test]
fn sftp_unknown_host_key_is_refused() {
    let srv = SshServer::start();
    let kh = srv.path("known_hosts").display().to_string();
    let empty = srv.path("empty_known_hosts").display().to_string();
    let fp = srv.fingerprint();
    let unknown = srv.url("hk").replace(&kh, &empty);
    let o = sqlfs(&["list", "--replica", &unknown]);
    assert!(
        !o.ok(),
        "an unknown host key was accepted:\n{}",
        o.describe()
    );
    assert!(
        o.stderr.contains("host key") && o.stderr.contains("unknown") && o.stderr.contains(&fp),
        "unclear refusal:\n{}",
        o.describe()
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
    // Refused before anything was stored.
    assert!(!srv.store().join("hk").exists());

    let pinned = format!("{unknown}&host-key-fingerprint={fp}");
    let o = sqlfs(&["list", "--replica", &pinned]);
    assert!(
        o.ok(),
        "a pinned fingerprint was not accepted:\n{}",
        o.describe()
    );
    let wrong = format!(
        "{}&host-key-fingerprint=SHA256:{}",
        srv.url("hk"),
        "A".repeat(43)
    );
    let o = sqlfs(&["list", "--replica", &wrong]);
    assert!(
        !o.ok() && o.stderr.contains("pinned"),
        "a wrong pin was accepted:\n{}",
        o.describe()
    );
    // The known key itself works, also from a hashed known_hosts (`ssh-keygen -H`, as
    // Debian's ssh writes it).
    let o = sqlfs(&["list", "--replica", &srv.url("hk")]);
    assert!(o.ok(), "{}", o.describe());
    let st = Command::new("ssh-keygen")
        .arg("-q")
        .arg("-H")
        .arg("-f")
        .arg(srv.path("known_hosts"))
        .status()
        .unwrap();
    assert!(st.success());
    let hashed = std::fs::read_to_string(srv.path("known_hosts")).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    let o = sqlfs(&["list", "--replica", &srv.url("hk")]);
    assert!(o.ok(), "hashed known_hosts:\n{}", o.describe());

    let with_pw = srv
        .url("hk")
        .replace(&format!("{}@", srv.user), &format!("{}:hunter2@", srv.user));
    let o = sqlfs(&["list", "--replica", &with_pw]);
    assert!(!o.ok(), "{}", o.describe());
    assert!(!o.stderr.contains("hunter2"), "{}", o.describe());
    assert!(o.stderr.contains("SQLFS_SFTP_PASSWORD"), "{}", o.describe());
}

/// `sqlfs status DIR` output (it must answer).
fn status_text(fx: &Fixture) -> String {
    let o = sqlfs_cli(&["status".into(), fx.mnt.as_os_str().to_os_string()]);
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
    o.stdout
}

/// A server that stops answering (every sshd process frozen with SIGSTOP: connections are
/// accepted by the kernel, nothing answers) becomes a timeout the shipper reports and
/// retries, never a hang; a server killed and started again later is reconnected to. The app
/// writes all along, and afterwards everything it wrote is on the replica.
#[test]
fn sftp_server_stopped_then_down_loses_nothing() {
    let mut srv = SshServer::start();
    let url = format!("{}&timeout=2s", srv.url("stall"));
    let dir = srv.store().join("stall");
    let mut fx = Fixture::new("sftpstall", false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some("200ms".into());
    fx.mount();
    writes(&fx, "app.db", 1, 30, 300);
    wait_covers(
        &fx,
        &dir,
        "app.db",
        last_txid(&fx, "app.db"),
        Duration::from_secs(60),
    );

    // Frozen.
    srv.pause();
    let t0 = Instant::now();
    let mut next = 1000;
    let text = wait_until(
        Duration::from_secs(120),
        500,
        || {
            writes(&fx, "app.db", next, 5, 300);
            next += 5;
            let text = status_text(&fx);
            let failing = text
                .lines()
                .find(|l| l.starts_with("replica sftp://"))
                .is_some_and(|l| l.contains("FAILING") && l.to_lowercase().contains("time"));
            if failing && t0.elapsed() > Duration::from_secs(20) {
                Ok(text)
            } else {
                Err(text)
            }
        },
        |text| {
            format!(
                "the replica of a frozen server never failed with a timeout:\n{text}\ndaemon:\n{}",
                fx.daemon_logs()
            )
        },
    );
    eprintln!("{text}");
    assert!(fx.daemon_running(), "{}", fx.daemon_logs());
    srv.resume();
    writes(&fx, "app.db", 5000, 5, 300);
    let last = last_txid(&fx, "app.db");
    wait_covers(&fx, &dir, "app.db", last, Duration::from_secs(120));

    // Down (killed), then back on the same port.
    srv.kill();
    for i in 0..10 {
        writes(&fx, "app.db", 6000 + i * 5, 5, 300);
        sleep_ms(1000);
    }
    assert!(fx.daemon_running(), "{}", fx.daemon_logs());
    assert!(
        replica_last_txid(&dir, "app.db") < last_txid(&fx, "app.db"),
        "the replica advanced while its server was down"
    );
    srv.restart();
    writes(&fx, "app.db", 9000, 5, 300);
    let last = last_txid(&fx, "app.db");
    wait_covers(&fx, &dir, "app.db", last, Duration::from_secs(120));
    assert_latest_is_staged(&fx, &url, last);
    wait_for(
        Duration::from_secs(60),
        300,
        || !status_text(&fx).contains("FAILING"),
        || {
            format!(
                "status still failing after the server came back:\n{}",
                status_text(&fx)
            )
        },
    );
    assert_no_temporaries(&dir);
    let logs = fx.daemon_logs();
    assert!(!logs.contains("panicked"), "{logs}");
    fx.unmount();
}

/// Without `identity-file`, the SSH agent logs in: a private `ssh-agent` holding the test
/// key, and a `$HOME` without keys of its own.
#[test]
fn sftp_agent_login() {
    let srv = SshServer::start();
    let sock = srv.path("agent.sock");
    let home = srv.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start ssh-agent (openssh-client)");
    wait_for(
        Duration::from_secs(20),
        50,
        || sock.exists(),
        || "ssh-agent made no socket".into(),
    );
    let st = Command::new("ssh-add")
        .arg("-q")
        .arg(srv.path("user_key"))
        .env("SSH_AUTH_SOCK", &sock)
        .status()
        .unwrap();
    assert!(st.success(), "ssh-add");
    let url = srv.url("agent");
    let keyless = url
        .split_once("identity-file=")
        .map(|(a, b)| format!("{a}{}", b.split_once('&').map_or("", |(_, r)| r)))
        .unwrap();
    assert!(!keyless.contains("user_key"), "{keyless}");
    let list = |with_agent: bool| {
        let mut c = Command::new(BIN);
        c.args(["list", "--replica", &keyless]).env("HOME", &home);
        if with_agent {
            c.env("SSH_AUTH_SOCK", &sock);
        } else {
            c.env_remove("SSH_AUTH_SOCK");
        }
        c.env_remove("SQLFS_SFTP_PASSWORD");
        run_cmd(c, Duration::from_secs(60))
    };
    let o = list(true);
    assert!(o.ok(), "login through the agent failed:\n{}", o.describe());
    let o = list(false);
    assert!(
        !o.ok() && o.stderr.contains("refused to log in"),
        "no key and no agent, yet:\n{}",
        o.describe()
    );
    let _ = agent.kill();
    let _ = agent.wait();
}
