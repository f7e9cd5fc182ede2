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
use std::time::{Duration, Instant};

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
    let deadline = Instant::now() + SHIP_TIMEOUT;
    loop {
        let got = segment_files(replica);
        if got > n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no new segment object after {SHIP_TIMEOUT:?} (still {got}); daemon:\n{}",
            replica.display(),
            fx.daemon_logs()
        );
        sleep_ms(50);
    }
}

/// Every file of an encrypted file replica: a key of the replica layout (`<id>/name`,
/// `<id>/l0/<txid>.seg`, `<id>/snap/<txid>.snap`) holding an encrypted object. Returns
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
            [_, "l0", f] if hex16(f, ".seg") => {
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
        if parts[0] != "names" {
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
