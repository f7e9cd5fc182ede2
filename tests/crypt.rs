//! Encrypted replicas through a real mount: `sqlfs keygen`, `mount --age-recipient`, and
//! `sqlfs restore --age-identity`.
//!
//! Nothing a mount ships to an encrypted replica may be readable without the identity: every
//! object file (names, segments, snapshots) is an encrypted file, and none of them shows the
//! plain object magic or a database header. With the identity, a restore is byte for byte
//! what `sqlfs replay` gives for the same TXID, and the latest one is the live database's
//! page image; with a wrong identity or none, it fails clearly and writes nothing.
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::replica::*;
use common::workload::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long shipping may take to produce the next object.
const SHIP_TIMEOUT: Duration = Duration::from_secs(20);

/// Number of segment objects (of every database) in a file replica.
fn segment_files(replica: &Path) -> usize {
    tree(replica).keys().filter(|k| k.ends_with(".seg")).count()
}

/// Waits until the replica holds more than `n` segment objects.
fn wait_more_segments(fx: &Fixture, replica: &Path, n: usize) -> usize {
    wait_until(
        SHIP_TIMEOUT,
        50,
        || match segment_files(replica) {
            got if got > n => Ok(got),
            got => Err(got),
        },
        |got| {
            format!(
                "{}: no new segment object after {SHIP_TIMEOUT:?} (still {got}); daemon:\n{}",
                replica.display(),
                fx.daemon_logs()
            )
        },
    )
}

/// Every file of an encrypted file replica: a key of the replica layout (`<id>/name`,
/// `<id>/l0/<txid>.seg`, `<id>/l<N>/<first>-<last>.seg`, `<id>/snap/<txid>.snap`,
/// `claims/<hash>`) holding an encrypted object. Returns
/// (database ids, segments, snapshots).
fn assert_replica_sealed(replica: &Path) -> (usize, usize, usize) {
    let files = tree(replica);
    assert!(
        !files.is_empty(),
        "{}: the replica is empty",
        replica.display()
    );
    let hex16 = |s: &str, ext: &str| {
        s.strip_suffix(ext)
            .is_some_and(|h| h.len() == 16 && h.bytes().all(|c| c.is_ascii_hexdigit()))
    };
    let (mut ids, mut segs, mut snaps) = (std::collections::BTreeSet::new(), 0, 0);
    for key in files.keys() {
        let parts: Vec<&str> = key.split('/').collect();
        let known = match parts.as_slice() {
            ["names", id] => hex16(&format!("{id}.n"), ".n"),
            // The claim of a name: `claims/<SHA-256 of the name>`.
            ["claims", h] => h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()),
            [_, "l0", f] if hex16(f, ".seg") => {
                segs += 1;
                true
            }
            // A compacted segment (a database's first compaction may come early in its
            // level's interval): `<id>/l<N>/<first>-<last>.seg`.
            [_, l, f]
                if l.strip_prefix('l')
                    .is_some_and(|n| n.parse::<u8>().is_ok_and(|n| n > 0))
                    && f.split_once('-').is_some_and(|(a, b)| {
                        hex16(&format!("{a}.seg"), ".seg") && hex16(b, ".seg")
                    }) =>
            {
                segs += 1;
                true
            }
            [_, "snap", f] if hex16(f, ".snap") => {
                snaps += 1;
                true
            }
            _ => false,
        };
        assert!(
            known,
            "{}: {key} is not an object of the replica layout (a temporary left behind?)",
            replica.display()
        );
        if parts[0] != "names" && parts[0] != "claims" {
            ids.insert(parts[0].to_string());
        }
        assert_sealed(&fs::read(replica.join(key)).unwrap(), key);
    }
    (ids.len(), segs, snaps)
}

/// Restores `db` at `txid` (latest when `None`) with `identity` and compares it with the
/// replay of the same TXID from the (unmounted) data directory; returns the TXID restored.
fn restore_vs_replay(
    fx: &Fixture,
    url: &str,
    db: &str,
    txid: Option<u64>,
    identity: &Path,
) -> (u64, PathBuf) {
    let tag = txid.map_or("latest".to_string(), |t| t.to_string());
    let safe: String = db
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let out = fx.scratch_path(&format!("restore-{safe}-{tag}.db"));
    let rep = fx.scratch_path(&format!("replay-{safe}-{tag}.db"));
    let t = restore_ok_with(url, db, &out, txid, Some(identity));
    replay(&fx.cli_dir(), db, t, &rep);
    assert_same_bytes(
        &rep,
        &out,
        &format!("{db}: decrypted restore at TXID {t} ({tag}) vs replay of TXID {t}"),
    );
    let _ = fs::remove_file(&rep);
    (t, out)
}

/// A random workload on a WAL database and a rollback-journal one, shipped in several
/// batches to an encrypted file replica written for two recipients; then, with the mount
/// stopped: every object is encrypted; either identity restores the latest state (the live
/// page image) and sampled TXIDs (their replays); a third identity, no identity, and
/// identity files that are not usable all fail clearly and leave nothing behind.
#[test]
fn encrypted_file_replica_round_trip() {
    let seed = seed_for("encrypted_file_replica_round_trip");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fx = Fixture::new("crypt", false);

    let key = fx.scratch_path("replica.key");
    let recipient = keygen(&key);
    let spare = fx.scratch_path("spare.key");
    let spare_recipient = keygen(&spare);
    assert_ne!(recipient, spare_recipient, "keygen made the same key twice");
    // keygen never overwrites an identity.
    let before = fs::read(&key).unwrap();
    let o = sqlfs_cli(&["keygen".into(), "-o".into(), key.clone().into()]);
    assert_no_panic(&o);
    assert!(
        !o.ok(),
        "keygen over an existing identity file succeeded:\n{}",
        o.describe()
    );
    assert_eq!(
        fs::read(&key).unwrap(),
        before,
        "keygen changed an existing identity file"
    );

    let r = fx.scratch_path("replica");
    let url = file_url(&r);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some("250ms".into());
    fx.opts.age_recipients = vec![recipient, spare_recipient];
    // Keep every transaction staged, so every TXID can be replayed as the reference.
    fx.opts.stage_limit = Some(1 << 30);
    fx.mount();

    let wal = "enc.db";
    let rb = "sub/enc-rb.db";
    fs::create_dir_all(fx.path("sub")).unwrap();
    let rb_mode = ["DELETE", "TRUNCATE", "PERSIST"][rng.random_range(0..3)];
    eprintln!("rollback database in journal_mode={rb_mode}");
    for (db, mode) in [(wal, "WAL"), (rb, rb_mode)] {
        let c = open_db(&fx.path(db));
        set_journal_mode(&c, mode);
        c.execute_batch(SCHEMA).unwrap();
    }
    let mut dw = Driver::open(&fx.path(wal), 1, seed, DriverCfg::default());
    let mut dr = Driver::open(&fx.path(rb), 2, seed ^ 0x5eed, DriverCfg::default());
    set_journal_mode(&dr.conn, rb_mode);
    let mut segs = 0;
    for batch in 0..4 {
        for _ in 0..rng.random_range(4..12) {
            dw.random_txn().unwrap();
            if rng.random_bool(0.1) {
                dw.random_checkpoint();
            }
        }
        for _ in 0..rng.random_range(2..8) {
            dr.random_txn().unwrap();
        }
        if batch == 2 {
            // One transaction of a few MiB: an object of many encrypted chunks.
            dw.big_txn(3 << 20).unwrap();
        }
        segs = wait_more_segments(&fx, &r, segs);
    }
    drop(dw);
    drop(dr);
    let live: Vec<Snapshot> = [wal, rb]
        .iter()
        .map(|db| {
            let c = open_db(&fx.path(db));
            integrity_ok(&c);
            snapshot(&c, true)
        })
        .collect();
    fx.unmount();
    assert_log_no_panic(&fx.last_daemon_log(), "mount");

    // (a) Nothing in the replica is readable as plain text.
    let (ids, nsegs, nsnaps) = assert_replica_sealed(&r);
    assert_eq!(ids, 2, "{}: expected two databases", r.display());
    assert!(
        nsegs >= 4,
        "expected several segments, found {nsegs} (and {nsnaps} snapshots)"
    );
    assert!(
        replica_db_id(&r, wal).is_none() && replica_db_id(&r, rb).is_none(),
        "a database name is stored in plain text"
    );

    // (b) With either identity: the latest state is the live database, sampled TXIDs are
    // their replays.
    for (db, live) in [wal, rb].iter().zip(&live) {
        let last = last_staged(&fx.cli_dir(), db);
        for id in [&key, &spare] {
            let (t, out) = restore_vs_replay(&fx, &url, db, None, id);
            assert_eq!(t, last, "{db}: restore did not restore the last TXID");
            assert_same_image(
                &as_restored(live.image.clone()),
                &fs::read(&out).unwrap(),
                live.page_size,
                &format!("{db}: decrypted restore at latest vs the live page image"),
            );
            integrity_ok(&open_db(&out));
        }
        let mut picks = vec![1, last / 2];
        picks.push(rng.random_range(1..=last));
        for t in picks {
            restore_vs_replay(&fx, &url, db, Some(t), &key);
        }
        eprintln!("{db}: {last} TXIDs shipped encrypted; restores match");
    }

    // (c), (d): a wrong identity, no identity, unusable identity files.
    let outdir = fx.scratch_path("out");
    fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let other = fx.scratch_path("other.key");
    keygen(&other);
    let o = restore_with(&url, wal, &out, None, false, Some(&other));
    assert_restore_fails(&o, &out, "restore with another identity");
    assert_says(&o, "identity", "restore with another identity");

    let o = restore_with(&url, wal, &out, None, false, None);
    assert_restore_fails(&o, &out, "restore without --age-identity");
    assert_says(&o, "encrypted", "restore without --age-identity");
    assert_says(&o, "--age-identity", "restore without --age-identity");

    let missing = fx.scratch_path("no-such.key");
    let o = restore_with(&url, wal, &out, None, false, Some(&missing));
    assert_restore_fails(&o, &out, "restore with a missing identity file");
    assert_says(
        &o,
        &missing.display().to_string(),
        "restore with a missing identity file",
    );

    let junk = fx.scratch_path("junk.key");
    fs::write(&junk, "this is not a key\n").unwrap();
    let o = restore_with(&url, wal, &out, None, false, Some(&junk));
    assert_restore_fails(&o, &out, "restore with a file that holds no identity");
    assert_says(
        &o,
        &junk.display().to_string(),
        "restore with a file that holds no identity",
    );

    // An identity file holding the wrong key and the right one works.
    let both = fx.scratch_path("both.key");
    let mut b = fs::read(&other).unwrap();
    b.extend(fs::read(&key).unwrap());
    fs::write(&both, b).unwrap();
    let t = restore_ok_with(&url, wal, &out, None, Some(&both));
    assert_eq!(t, last_staged(&fx.cli_dir(), wal));
    assert_same_image(
        &as_restored(live[0].image.clone()),
        &fs::read(&out).unwrap(),
        live[0].page_size,
        "restore with an identity file of two keys",
    );
    fs::remove_file(&out).unwrap();

    // Scratch space (decrypted objects) is next to the output, not in TMPDIR: a restore works
    // with TMPDIR pointing nowhere and leaves only the output behind.
    let mut c = std::process::Command::new(BIN);
    c.args(["restore", "--replica", &url, "--db", wal, "-o"])
        .arg(&out)
        .arg("--age-identity")
        .arg(&key)
        .env("TMPDIR", fx.scratch_path("no-such-tmp"));
    let o = run_cmd(c, CLI_TIMEOUT);
    assert_no_panic(&o);
    assert!(o.ok(), "restore with TMPDIR unusable:\n{}", o.describe());
    assert_eq!(restored_txid(&o), last_staged(&fx.cli_dir(), wal));
    assert_eq!(
        dir_names(&outdir),
        vec!["restored.db".to_string()],
        "a restore left scratch files next to its output"
    );
    fs::remove_file(&out).unwrap();
    assert!(
        dir_names(&outdir).is_empty(),
        "restores left files in {}: {:?}",
        outdir.display(),
        dir_names(&outdir)
    );
}

/// `sqlfs ARGS` with extra environment variables.
fn cli_env(a: &[&str], env: &[(&str, &str)]) -> CmdOut {
    let mut c = std::process::Command::new(BIN);
    c.args(a);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = run_cmd(c, CLI_TIMEOUT);
    assert_no_panic(&o);
    o
}

/// Encryption per replica, from the configuration file: the top level encrypts to a
/// recipient and names its identity; the first replica has a passphrase of its own, the
/// third `age-recipients: []` (plain). Each replica is written with its own setting; `restore
/// --config` (the first replica, or the one `--replica` names) and `list --config` read each
/// with its own key; each encrypted replica fails clearly with the other's key. Then
/// `--restore-if-missing` on an empty data directory restores from the first replica with its
/// passphrase, and every replica (read with its own key) continues its chain from there. The
/// passphrase appears in no output.
#[test]
fn each_replica_encrypted_with_its_own_key() {
    let seed = seed_for("each_replica_encrypted_with_its_own_key");
    let mut fx = Fixture::new("crypt-each", false);
    let key = fx.scratch_path("replica.key");
    let recipient = keygen(&key);
    let (rp, ra, rn) = (
        fx.scratch_path("r-pass"),
        fx.scratch_path("r-age"),
        fx.scratch_path("r-plain"),
    );
    let (up, ua, un) = (file_url(&rp), file_url(&ra), file_url(&rn));
    let pass = "tr0ub4dor-per-replica";
    const VAR: &str = "SQLFS_TEST_REPLICA_PASS";
    let conf = fx.scratch_path("sqlfs.yml");
    fs::write(
        &conf,
        format!(
            "sync-interval: 250ms\nage-recipients: [{recipient}]\nage-identity: {}\nreplicas:\n  - url: {up}\n    passphrase-env: {VAR}\n  - url: {ua}\n  - url: {un}\n    age-recipients: []\n",
            key.display()
        ),
    )
    .unwrap();
    let env = [(VAR, pass)];
    fx.opts.replicas = Some(Vec::new());
    fx.opts.stage_limit = Some(1 << 30);
    fx.opts.extra_args = vec!["--config".into(), conf.display().to_string()];
    fx.opts.env = vec![(VAR.into(), pass.into())];
    fx.mount();
    let db = "app.db";
    let c = open_db(&fx.path(db));
    set_journal_mode(&c, "WAL");
    c.execute_batch(SCHEMA).unwrap();
    drop(c);
    let mut d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
    for _ in 0..30 {
        d.random_txn().unwrap();
    }
    drop(d);
    // The last shipping pass at unmount brings every replica up to the last TXID.
    fx.unmount();
    let last = last_staged(&fx.cli_dir(), db);
    let mut outputs = vec![fx.last_daemon_log()];

    // Each replica written with its own setting.
    assert_replica_sealed(&rp);
    assert_replica_sealed(&ra);
    assert!(
        has_stanza(&rp, "scrypt") && !has_stanza(&rp, "X25519"),
        "r-pass is not passphrase-encrypted"
    );
    assert!(
        has_stanza(&ra, "X25519") && !has_stanza(&ra, "scrypt"),
        "r-age is not encrypted to the recipient"
    );
    let id = replica_db_id(&rn, db).expect("the plain replica names app.db in plain text");
    assert!(
        segments(&rn, &id).iter().all(|s| s.first.is_some()),
        "the plain replica holds unreadable objects"
    );

    // restore --config: each replica with its own key, to the last TXID, equal to the replay.
    let outdir = fx.scratch_path("out");
    fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let rep = fx.scratch_path("replay.db");
    replay(&fx.cli_dir(), db, last, &rep);
    let conf_s = conf.to_str().unwrap();
    let out_s = out.to_str().unwrap();
    // `restore --config` into `out`, from the first replica or the one `url` names.
    let restore_with_config = |url: Option<&String>| {
        let _ = fs::remove_file(&out);
        let mut a = vec!["restore", "--config", conf_s];
        if let Some(u) = url {
            a.extend(["--replica", u.as_str()]);
        }
        a.extend(["--db", db, "-o", out_s]);
        cli_env(&a, &env)
    };
    for url in [None, Some(&ua), Some(&un)] {
        let o = restore_with_config(url);
        assert!(o.ok(), "{}", o.describe());
        assert_eq!(restored_txid(&o), last, "{}", o.describe());
        assert_same_bytes(&rep, &out, &format!("restore --config from {url:?}"));
        outputs.push(o.stdout + &o.stderr);
    }
    let latest = fx.scratch_path("latest.db");
    fs::rename(&out, &latest).unwrap();
    // list --config: the first replica (times need its passphrase) and the second.
    for url in [None, Some(&ua)] {
        let mut a = vec!["list", "--json", "--config", conf_s];
        if let Some(u) = url {
            a.extend(["--replica", u.as_str()]);
        }
        let o = cli_env(&a, &env);
        assert!(o.ok(), "{}", o.describe());
        assert!(
            o.stdout.contains(&format!("\"latest_txid\": {last}")),
            "list --config of {url:?}: {}",
            o.describe()
        );
        outputs.push(o.stdout + &o.stderr);
    }

    // The other replica's key fails clearly, and writes nothing.
    let wrong = [
        (&ua, vec!["--passphrase-env", VAR]),
        (&up, vec!["--age-identity", key.to_str().unwrap()]),
    ];
    for (url, keyargs) in wrong {
        let mut a = vec![
            "restore",
            "--replica",
            url.as_str(),
            "--db",
            db,
            "-o",
            out_s,
        ];
        a.extend(keyargs.iter().copied());
        let o = cli_env(&a, &env);
        let what = format!("{url} read with {keyargs:?}");
        assert_restore_fails(&o, &out, &what);
        assert_says(&o, "cannot decrypt", &what);
        assert_says(&o, "identity or passphrase", &what);
        outputs.push(o.stdout + &o.stderr);
    }
    // The first replica's variable unset: an error naming it and the replica.
    let o = cli_env(
        &["restore", "--config", conf_s, "--db", db, "-o", out_s],
        &[],
    );
    assert_restore_fails(&o, &out, "restore --config without the passphrase variable");
    assert_says(&o, VAR, "restore --config without the passphrase variable");
    assert_says(
        &o,
        &format!("replicas[0] ({up})"),
        "restore --config without the passphrase variable",
    );

    // --restore-if-missing from the first replica (its passphrase); every replica continues
    // its own chain (the others are read with their own keys to find where they stand).
    let mut b = Fixture::new("crypt-each-b", false);
    b.opts.replicas = Some(Vec::new());
    b.opts.stage_limit = Some(1 << 30);
    b.opts.extra_args = vec![
        "--config".into(),
        conf.display().to_string(),
        "--restore-if-missing".into(),
    ];
    b.opts.env = vec![(VAR.into(), pass.into())];
    b.mount();
    assert!(
        as_restored(fs::read(b.backing_path(db)).unwrap()) == fs::read(&latest).unwrap(),
        "--restore-if-missing did not restore the latest state of the first replica"
    );
    let mut d = Driver::open(&b.path(db), 2, seed ^ 0xb, DriverCfg::default());
    for _ in 0..5 {
        d.random_txn().unwrap();
    }
    drop(d);
    b.unmount();
    let log = b.last_daemon_log();
    assert_log_no_panic(&log, "mount --restore-if-missing");
    assert!(
        !log.contains("another sqlfs") && !log.contains("fenced"),
        "a replica did not continue its chain after --restore-if-missing:\n{log}"
    );
    let last_b = last_staged(&b.cli_dir(), db);
    assert!(last_b > last, "nothing new staged on the second mount");
    for url in [None, Some(&ua), Some(&un)] {
        let o = restore_with_config(url);
        assert!(o.ok(), "{}", o.describe());
        assert_eq!(
            restored_txid(&o),
            last_b,
            "{url:?} after --restore-if-missing: {}",
            o.describe()
        );
        outputs.push(o.stdout + &o.stderr);
    }
    outputs.push(log);
    for o in &outputs {
        assert!(
            !o.contains(pass),
            "the passphrase appears in an output:\n{o}"
        );
    }
}
