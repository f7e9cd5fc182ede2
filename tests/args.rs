//! Arguments and inputs that must be refused, or reported, instead of being taken at a wrong
//! value: sizes past 64 bits, no request threads, a data directory nested in the mount point,
//! a malformed S3 endpoint, `verify` with nothing to verify, and `list` over a replica where
//! one database's object is damaged.
mod common;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::*;

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

fn quick(args: &[OsString]) -> CmdOut {
    let mut c = Command::new(BIN);
    c.args(args);
    run_cmd(c, Duration::from_secs(60))
}

/// The command failed, without a panic, and said why in words containing `needle`.
fn refused(o: &CmdOut, label: &str, needle: &str, failures: &mut Vec<String>) {
    let text = format!("{}{}", o.stdout, o.stderr).to_lowercase();
    if o.ok() {
        failures.push(format!("{label}: exited 0\n{}", o.describe()));
    }
    if text.contains("panicked") {
        failures.push(format!("{label}: panicked\n{}", o.describe()));
    }
    if !text.contains(&needle.to_lowercase()) {
        failures.push(format!("{label}: no {needle:?} in\n{}", o.describe()));
    }
}

#[test]
fn bad_mount_arguments_are_refused_before_mounting() {
    let fx = Fixture::new("args-mount", false);
    let mut failures = Vec::new();
    let mnt = os(&fx.mnt);
    let data = os(&fx.backing);
    let base = |extra: &[&str]| {
        let mut a = vec![os("mount"), mnt.clone(), os("--data-dir"), data.clone()];
        a.extend(extra.iter().map(os));
        a
    };
    for (flag, value, needle) in [
        ("--stage-limit", "17179869184G", "too large"),
        ("--stage-limit", "17179869185G", "too large"),
        ("--history-cache", "17179869184G", "too large"),
        ("--stage-limit", "99999999999999999999", "not a size"),
        ("--threads", "0", "at least 1"),
        ("--replica", "s3://bucket/p?endpoint=not-a-url", "endpoint"),
        (
            "--replica",
            "s3://bucket/p?endpoint=http://host:port",
            "endpoint",
        ),
    ] {
        let o = quick(&base(&[flag, value]));
        refused(&o, &format!("{flag} {value}"), needle, &mut failures);
        assert_eq!(sqlfs_mounts_at(&fx.mnt), 0, "{flag} {value} mounted");
    }

    // A data directory inside the mount point, and a mount point inside the data directory.
    let inner = fx.mnt.join("inner");
    fs::create_dir_all(&inner).unwrap();
    let o = quick(&[os("mount"), mnt.clone(), os("--data-dir"), os(&inner)]);
    refused(
        &o,
        "--data-dir inside DIR",
        "inside the mount point",
        &mut failures,
    );
    assert_eq!(
        sqlfs_mounts_at(&fx.mnt),
        0,
        "a data directory inside DIR mounted"
    );
    let nested = fx.backing.join("view");
    fs::create_dir_all(&nested).unwrap();
    let o = quick(&[os("mount"), os(&nested), os("--data-dir"), data.clone()]);
    refused(
        &o,
        "DIR inside --data-dir",
        "inside the data directory",
        &mut failures,
    );
    assert_eq!(
        sqlfs_mounts_at(&nested),
        0,
        "DIR inside the data directory mounted"
    );

    // The same checks in the configuration file.
    let conf = fx.scratch_path("bad.yml");
    for (text, needle) in [
        ("threads: 0\n", "threads"),
        ("stage-limit: 17179869184G\n", "too large"),
        ("history-cache: 17179869185G\n", "too large"),
    ] {
        fs::write(&conf, text).unwrap();
        let o = quick(&base(&["--config", conf.to_str().unwrap()]));
        refused(&o, &format!("config {text:?}"), needle, &mut failures);
        assert_eq!(sqlfs_mounts_at(&fx.mnt), 0, "config {text:?} mounted");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `verify` of a directory sqlfs never served verified nothing: that is not a success.
#[test]
fn verify_with_nothing_staged_fails() {
    let fx = Fixture::new("args-verify", false);
    let o = quick(&[os("verify"), os(&fx.backing)]);
    let mut failures = Vec::new();
    refused(
        &o,
        "verify of an empty directory",
        "no staged database",
        &mut failures,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// One database's damaged object does not hide the others: `list` shows every readable
/// database's window, names the unreadable one and why, and exits non-zero.
#[test]
fn list_shows_the_other_databases_when_one_object_is_bad() {
    let mut fx = Fixture::new("args-list", false);
    fx.mount();
    for name in ["a.db", "b.db"] {
        let c = open_db(&fx.path(name));
        set_journal_mode(&c, "WAL");
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
            .unwrap();
    }
    let rdir = fx.default_replica();
    let url = format!("file://{}", rdir.display());
    // Both databases on the replica.
    let listed = |json: bool| {
        let mut a = vec![os("list"), os("--replica"), os(&url)];
        if json {
            a.push(os("--json"));
        }
        quick(&a)
    };
    wait_until(
        Duration::from_secs(60),
        200,
        || {
            let o = listed(false);
            let n = o.stdout.matches("restore window: TXID").count();
            if o.ok() && n == 2 {
                Ok(())
            } else {
                Err(o.describe())
            }
        },
        |e| format!("both databases never reached the replica: {e}"),
    );
    fx.unmount();

    // Damage the header of every object of b.db.
    let o = listed(true);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("list --json");
    let id = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "b.db")
        .map(|d| d["id"].as_str().unwrap().to_string())
        .expect("b.db listed");
    let mut damaged = 0;
    for sub in ["l0", "snap"] {
        let Ok(rd) = fs::read_dir(rdir.join(&id).join(sub)) else {
            continue;
        };
        for e in rd {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(e.unwrap().path())
                .unwrap();
            f.write_all_at(&[0x5a; 64], 0).unwrap();
            damaged += 1;
        }
    }
    assert!(
        damaged > 0,
        "no object of b.db found under {}",
        rdir.display()
    );

    let o = listed(false);
    assert!(
        !o.ok(),
        "list exited 0 over a damaged object\n{}",
        o.describe()
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
    let a_part = o.stdout.split("b.db").next().unwrap_or("");
    assert!(
        a_part.contains("a.db") && a_part.contains("restore window: TXID"),
        "a.db's window is missing\n{}",
        o.describe()
    );
    assert!(o.stdout.contains("UNREADABLE"), "{}", o.describe());
    assert!(o.stderr.contains("b.db"), "{}", o.describe());
    let o = listed(true);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("list --json");
    let dbs = v.as_array().unwrap();
    assert_eq!(dbs.len(), 2, "{v}");
    assert!(
        dbs.iter()
            .any(|d| d["name"] == "a.db" && d["error"].is_null()),
        "{v}"
    );
    assert!(
        dbs.iter()
            .any(|d| d["name"] == "b.db" && d["error"].is_string()),
        "{v}"
    );
}
