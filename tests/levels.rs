//! Replica maintenance and the restore / list CLI: compaction levels, interval snapshots,
//! retention, restore by timestamp, `sqlfs list`, restore options, passphrase encryption,
//! the configuration file, `--restore-if-missing`, metrics, and all of it against S3.
//!
//! The reference for every restored file is `sqlfs replay` of the same TXID from staging
//! (every test keeps its whole log staged), compared as restore presents it (`as_restored`).
mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::replica::*;
use common::s3server::*;
use common::workload::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;
use serde_json::Value;

#[test]
fn worker_entry() {
    worker_main();
}

const SYNC: &str = "200ms";
const COVER_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A fixture shipping to one file replica `scratch/r` every [`SYNC`], with `extra` mount
/// flags and the whole log kept staged.
/// Mount flags under which the replica keeps every level-0 segment (no compaction, no
/// retention) and takes a snapshot every second.
const KEEP_EVERY_SEGMENT: &[&str] = &[
    "--compaction",
    "none",
    "--snapshot-interval",
    "1s",
    "--retention",
    "0",
];

/// Mount flags under which level 1 compacts every second, a snapshot is taken every 2 s and
/// retention removes what a restore 6 s back no longer needs.
const SHORT_RETENTION: &[&str] = &[
    "--compaction",
    "1s",
    "--snapshot-interval",
    "2s",
    "--retention",
    "6s",
];

fn fixture(name: &str, extra: &[&str]) -> (Fixture, PathBuf, String) {
    let mut fx = Fixture::new(name, false);
    let dir = fx.scratch_path("r");
    let url = file_url(&dir);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some(SYNC.into());
    fx.opts.stage_limit = Some(1 << 30);
    fx.opts.extra_args = args(extra);
    (fx, dir, url)
}

fn fresh_db(path: &Path, journal: &str) -> Connection {
    let c = open_db(path);
    set_journal_mode(&c, journal);
    c.execute_batch(SCHEMA).unwrap();
    c
}

/// Runs a sqlfs command with extra environment variables.
fn sqlfs_env(a: &[OsString], env: &[(&str, &str)]) -> CmdOut {
    let mut c = Command::new(BIN);
    c.args(a);
    for (k, v) in env {
        c.env(k, v);
    }
    run_cmd(c, CLI_TIMEOUT)
}

/// `sqlfs restore --replica URL --db DB -o OUT` plus `more`.
fn restore_args(url: &str, db: &str, out: &Path, more: &[&str]) -> Vec<OsString> {
    let mut a = vec![
        os("restore"),
        os("--replica"),
        os(url),
        os("--db"),
        os(db),
        os("-o"),
        os(out),
    ];
    a.extend(more.iter().map(os));
    a
}

fn restore_with(url: &str, db: &str, out: &Path, more: &[&str]) -> CmdOut {
    let o = sqlfs_cli(&restore_args(url, db, out, more));
    assert_no_panic(&o);
    o
}

/// Waits until the replica holds everything staged for `db`; returns that TXID.
fn wait_shipped(fx: &Fixture, replica: &Path, db: &str) -> u64 {
    let last = last_staged(&fx.cli_dir(), db);
    assert!(last > 0, "{db}: nothing staged");
    wait_replica_covers(replica, db, last, COVER_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    last
}

/// Waits (generously) until `cond` holds; panics with `what` otherwise.
fn wait_cond(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    wait_for(timeout, 100, cond, || {
        format!("timed out waiting for {what}")
    });
}

/// A compacted object of a file replica: `<id>/l<k>/<first>-<last>.seg`.
#[derive(Clone, Debug)]
struct Compacted {
    level: u8,
    first: u64,
    last: u64,
    path: PathBuf,
}

fn compacted(replica: &Path, id: &str, level: u8) -> Vec<Compacted> {
    let dir = replica.join(id).join(format!("l{level}"));
    let mut v: Vec<Compacted> = fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let f = e.file_name().to_string_lossy().into_owned();
                    let (a, b) = f.strip_suffix(".seg")?.split_once('-')?;
                    Some(Compacted {
                        level,
                        first: u64::from_str_radix(a, 16).ok()?,
                        last: u64::from_str_radix(b, 16).ok()?,
                        path: e.path(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|o| o.first);
    v
}

/// Keys (relative paths) of every object of database `id` in a file replica.
fn object_keys(replica: &Path, id: &str) -> BTreeSet<String> {
    tree(&replica.join(id))
        .into_keys()
        .filter(|k| k.ends_with(".seg") || k.ends_with(".snap"))
        .collect()
}

/// `sqlfs list --replica URL [--db DB] --json`, which must succeed.
fn list_json(url: &str, db: Option<&str>, env: &[(&str, &str)], more: &[&str]) -> Vec<Value> {
    let mut a = vec![os("list"), os("--replica"), os(url), os("--json")];
    if let Some(d) = db {
        a.push(os("--db"));
        a.push(os(d));
    }
    a.extend(more.iter().map(os));
    let o = sqlfs_env(&a, env);
    assert_no_panic(&o);
    assert!(o.ok(), "sqlfs list failed:\n{}", o.describe());
    let v: Value = serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("sqlfs list --json is not JSON ({e}):\n{}", o.describe()));
    v.as_array()
        .unwrap_or_else(|| panic!("sqlfs list --json is not an array:\n{}", o.describe()))
        .clone()
}

fn entry<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in the listing: {list:?}"))
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

/// Objects of `level` in a listing entry (0 if the level is absent).
fn level_objects(d: &Value, level: u64) -> u64 {
    d["levels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["level"] == level)
        .map_or(0, |l| u(l, "objects"))
}

/// Formats ns since the epoch as RFC 3339 UTC with milliseconds (truncated).
fn rfc3339_ms(ns: u64) -> String {
    rfc3339(ns, 3)
}

/// Now, truncated to milliseconds: (ns, RFC 3339 text).
fn instant_now() -> (u64, String) {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let ms = ns / 1_000_000 * 1_000_000;
    (ms, rfc3339_ms(ms))
}

/// Random transactions on `path` for `secs` seconds (WAL mode unless the caller switches),
/// with occasional checkpoints; `between` runs after every commit with the elapsed fraction.
fn drive(path: &Path, seed: u64, secs: f64, mut between: impl FnMut(&mut Driver, f64)) -> u64 {
    let cfg = DriverCfg {
        max_blob: 8_000,
        ..Default::default()
    };
    let mut d = Driver::open(path, 1, seed, cfg);
    let start = Instant::now();
    let mut n = 0;
    loop {
        let f = start.elapsed().as_secs_f64() / secs;
        if f >= 1.0 {
            break;
        }
        d.random_txn()
            .unwrap_or_else(|e| panic!("transaction {n}: {e}"));
        n += 1;
        if d.rng.random_bool(0.05) {
            d.random_checkpoint();
        }
        between(&mut d, f);
        let ms = d.rng.random_range(10..40);
        sleep_ms(ms);
    }
    n
}

/// The id of `db` in a file replica.
fn db_id(replica: &Path, db: &str) -> String {
    replica_db_id(replica, db).unwrap_or_else(|| panic!("{}: no {db}", replica.display()))
}

// ---------------------------------------------------------------------------------------
// 1. Compaction keeps every TXID restorable
// ---------------------------------------------------------------------------------------

#[test]
fn compaction_keeps_every_txid_restorable() {
    let seed = seed_for("compaction_keeps_every_txid_restorable");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut fx, rdir, url) = fixture(
        "lvl-compact",
        &[
            "--compaction",
            "1s,3s",
            "--snapshot-interval",
            "3s",
            "--retention",
            "0",
        ],
    );
    fx.mount();
    let db = "app.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    let (mut vacuumed, mut switched, mut back) = (false, false, false);
    drive(&fx.path(db), seed, 10.0, |d, f| {
        if f > 0.35 && !vacuumed {
            d.exec("VACUUM");
            vacuumed = true;
        }
        if f > 0.5 && !switched {
            set_journal_mode(&d.conn, "DELETE");
            switched = true;
        }
        if f > 0.7 && !back {
            set_journal_mode(&d.conn, "WAL");
            back = true;
        }
    });
    let last = wait_shipped(&fx, &rdir, db);
    let id = db_id(&rdir, db);
    // Let the idle mount finish its compaction rounds.
    wait_cond("a level-2 object", Duration::from_secs(30), || {
        !compacted(&rdir, &id, 2).is_empty()
    });
    sleep_ms(1500);
    fx.unmount();
    let dir = fx.cli_dir();

    let l0 = segments(&rdir, &id);
    let l1 = compacted(&rdir, &id, 1);
    let l2 = compacted(&rdir, &id, 2);
    let snaps = snapshots(&rdir, &id);
    eprintln!(
        "last TXID {last}; {} level-0, {} level-1, {} level-2 objects, snapshots at {:?}",
        l0.len(),
        l1.len(),
        l2.len(),
        snaps.iter().map(|s| s.key_txid).collect::<Vec<_>>()
    );
    assert!(!l1.is_empty(), "no level-1 objects");
    assert!(!l2.is_empty(), "no level-2 objects");
    assert!(
        snaps.len() >= 2,
        "expected several interval snapshots, found {}",
        snaps.len()
    );
    // Compacted objects: headers agree with keys, and each level is contiguous from its
    // first object on, along level-0 boundaries.
    let l0_starts: BTreeSet<u64> = l0.iter().map(|o| o.key_txid).collect();
    for lv in [&l1, &l2] {
        for w in lv.windows(2) {
            assert_eq!(
                w[1].first,
                w[0].last + 1,
                "level {} is not contiguous: {:?} then {:?}",
                w[0].level,
                w[0].path,
                w[1].path
            );
        }
        for o in lv.iter() {
            let mut h = [0u8; OBJ_HEADER];
            fs::File::open(&o.path).unwrap().read_exact(&mut h).unwrap();
            assert_eq!(&h[..8], OBJ_MAGIC, "{:?}", o.path);
            assert_eq!(h[11], o.level, "{:?}: header level", o.path);
            assert_eq!(
                u64::from_be_bytes(h[32..40].try_into().unwrap()),
                o.first,
                "{:?}: header first TXID",
                o.path
            );
            assert_eq!(
                u64::from_be_bytes(h[40..48].try_into().unwrap()),
                o.last,
                "{:?}: header last TXID",
                o.path
            );
            assert!(
                l0_starts.contains(&o.first),
                "{:?}: not on a level-0 boundary",
                o.path
            );
            assert!(
                o.last == last || l0_starts.contains(&(o.last + 1)),
                "{:?}: does not end on a level-0 boundary",
                o.path
            );
        }
    }

    // TXIDs to restore: every compacted object's boundaries and one inside, snapshots and
    // their neighbours, a few random ones.
    let mut picks = BTreeSet::new();
    for o in l1.iter().chain(&l2) {
        picks.insert(o.first);
        picks.insert(o.last);
        if o.first > 1 {
            picks.insert(o.first - 1);
        }
        if o.last > o.first {
            picks.insert(rng.random_range(o.first..o.last));
        }
    }
    for s in &snaps {
        for t in [s.key_txid.saturating_sub(1), s.key_txid, s.key_txid + 1] {
            picks.insert(t);
        }
    }
    picks.insert(1);
    picks.insert(last);
    for _ in 0..5 {
        picks.insert(rng.random_range(1..=last));
    }
    // Before the first snapshot too: the chain from TXID 1 is still there (retention 0).
    picks.retain(|&t| t >= 1 && t <= last);
    // Bound the run time on a busy machine: keep boundaries of the first objects first.
    let picks: Vec<u64> = picks.into_iter().collect();
    eprintln!("restoring {} TXIDs: {picks:?}", picks.len());
    for &t in &picks {
        restore_vs_replay(&url, &dir, db, Some(t), &fx.scratch);
    }
    assert_eq!(restore_vs_replay(&url, &dir, db, None, &fx.scratch), last);

    // The plan for the latest state is short.
    let out = fx.scratch_path("dry.db");
    let o = restore_with(&url, db, &out, &["--dry-run", "--json"]);
    assert!(o.ok(), "{}", o.describe());
    assert!(!out.exists(), "--dry-run wrote {}", out.display());
    let plan: Value = serde_json::from_str(&o.stdout).expect("dry-run JSON");
    let n = plan["objects"].as_array().unwrap().len();
    assert!(
        n <= 6 && n < l0.len(),
        "the latest plan takes {n} objects ({} level-0 objects exist):\n{}",
        l0.len(),
        o.stdout
    );
    // A target just at the end of a compacted object with no snapshot inside it: the plan
    // uses compacted objects, and says so.
    let snap_set: Vec<u64> = snaps.iter().map(|s| s.key_txid).collect();
    let o_c = l2
        .iter()
        .chain(&l1)
        .find(|o| !snap_set.iter().any(|&s| s >= o.first && s <= o.last))
        .expect("a compacted object with no snapshot inside it");
    let o = restore_with(
        &url,
        db,
        &out,
        &["--dry-run", "--txid", &o_c.last.to_string()],
    );
    assert!(o.ok(), "{}", o.describe());
    assert!(
        o.stdout.contains("compacted"),
        "the plan for TXID {} does not use a compacted object:\n{}",
        o_c.last,
        o.stdout
    );
    assert!(!out.exists());

    // A copy that lacks the level-0 segment right after a snapshot (and anything compacted
    // that starts there): a restore past it must not stop at the snapshot. It fails, naming
    // the missing TXIDs, the objects on either side and what is restorable.
    let bounds: Vec<u64> = snap_set.iter().skip(1).copied().chain([last + 1]).collect();
    let (s, end) = snap_set
        .iter()
        .zip(&bounds)
        .map(|(&s, &e)| (s, e))
        .find(|&(s, e)| {
            l0.iter().any(|o| o.key_txid == s + 1)
                && l0
                    .iter()
                    .filter(|o| o.key_txid > s && o.key_txid < e)
                    .count()
                    >= 2
        })
        .expect("a snapshot followed by two level-0 segments before the next one");
    let gone = l0.iter().find(|o| o.key_txid == s + 1).unwrap();
    let next = l0.iter().find(|o| o.key_txid > s + 1).unwrap();
    let broken = fx.scratch_path("r-broken");
    cp_a(&rdir, &broken);
    fs::remove_file(broken.join(&gone.key)).unwrap();
    for lv in [&l1, &l2] {
        for o in lv.iter().filter(|o| o.first == s + 1) {
            fs::remove_file(broken.join(o.path.strip_prefix(&rdir).unwrap())).unwrap();
        }
    }
    let t = end - 1;
    let log = log_entries(&dir, db);
    let t_ns = log.iter().find(|e| e.txid == t).unwrap().ts as u64;
    let snap_key = format!("{id}/snap/{s:016x}.snap");
    for more in [
        vec!["--txid".to_string(), t.to_string()],
        vec!["--timestamp".to_string(), rfc3339_ms(t_ns)],
        vec!["--txid".to_string(), t.to_string(), "--dry-run".to_string()],
    ] {
        let more: Vec<&str> = more.iter().map(String::as_str).collect();
        let o = restore_with(&file_url(&broken), db, &out, &more);
        let what = format!("{} missing, restore {more:?}", gone.key);
        assert!(!o.ok(), "{what}: succeeded:\n{}", o.describe());
        assert!(!out.exists(), "{what}: wrote {}", out.display());
        for needle in [
            format!("TXIDs {}..={}", s + 1, gone.last.unwrap()),
            snap_key.clone(),
            next.key.clone(),
            format!("TXIDs 1..={s}"),
        ] {
            assert!(
                o.stderr.contains(&needle),
                "{what}: the error does not say {needle:?}:\n{}",
                o.describe()
            );
        }
    }
}

/// Large objects become the file replica's objects by a hard link to the shipper's own file
/// (`ReplicaClient::put_new`), which the shipper then never writes in place: with large and
/// small shipments, compaction and snapshots mixed, every object stays what it was when
/// stored (each TXID restores exactly as staging replays it).
#[test]
fn large_objects_linked_into_a_file_replica_stay_intact() {
    use std::os::unix::fs::MetadataExt;
    let seed = seed_for("large_objects_linked_into_a_file_replica_stay_intact");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut fx, rdir, url) = fixture(
        "lvl-linked",
        &[
            "--compaction",
            "1s,3s",
            "--snapshot-interval",
            "2s",
            "--retention",
            "0",
        ],
    );
    fx.mount();
    let db = "app.db";
    let c = fresh_db(&fx.path(db), "WAL");
    c.execute_batch("CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB)")
        .unwrap();
    // The largest file with more than one link seen in the replica while it is written.
    let linked = |max: &mut u64| {
        let mut stack = vec![rdir.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    stack.push(e.path());
                } else if m.nlink() > 1 {
                    *max = (*max).max(m.len());
                }
            }
        }
    };
    let mut max_linked = 0;
    for round in 0..12 {
        // A large transaction (an object of its own, over 1 MiB), then a few small ones
        // (small objects, whose file the shipper reuses).
        let rows = if round % 3 == 2 { 1 } else { 24 };
        c.execute_batch("BEGIN").unwrap();
        for _ in 0..rows {
            let mut b = vec![0u8; 100_000];
            rng.fill(&mut b[..]);
            c.execute("INSERT INTO big(b) VALUES (?1)", [&b]).unwrap();
        }
        c.execute_batch("COMMIT").unwrap();
        for i in 0..3 {
            c.execute(
                "INSERT INTO big(b) VALUES (?1)",
                [&vec![round as u8 + i; 300]],
            )
            .unwrap();
        }
        if round % 4 == 3 {
            c.execute("DELETE FROM big WHERE id % 3 = ?1", [round % 3])
                .unwrap();
        }
        sleep_ms(400);
        linked(&mut max_linked);
    }
    drop(c);
    let last = wait_shipped(&fx, &rdir, db);
    let id = db_id(&rdir, db);
    wait_cond("a level-2 object", Duration::from_secs(30), || {
        !compacted(&rdir, &id, 2).is_empty()
    });
    linked(&mut max_linked);
    sleep_ms(1500);
    fx.unmount();
    assert!(
        max_linked >= 1 << 20,
        "no large object was linked into the replica (largest linked: {max_linked} bytes)"
    );
    let dir = fx.cli_dir();
    for t in 1..=last {
        restore_vs_replay(&url, &dir, db, Some(t), &fx.scratch);
    }
    assert_eq!(restore_vs_replay(&url, &dir, db, None, &fx.scratch), last);
}

/// The chain from TXID 1 is still in the replica (retention 0), `sqlfs list` says the window
/// starts at TXID 1, and TXIDs before the first interval snapshot restore from that chain.
#[test]
fn restore_before_the_first_snapshot() {
    let seed = seed_for("restore_before_the_first_snapshot");
    let (mut fx, rdir, url) = fixture("lvl-presnap", KEEP_EVERY_SEGMENT);
    fx.mount();
    let db = "app.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    drive(&fx.path(db), seed, 2.5, |_, _| {});
    wait_shipped(&fx, &rdir, db);
    let id = db_id(&rdir, db);
    wait_cond("a snapshot", COVER_TIMEOUT, || {
        !snapshots(&rdir, &id).is_empty()
    });
    fx.unmount();
    let first_snap = snapshots(&rdir, &id)[0].key_txid;
    assert!(first_snap > 1);
    assert_eq!(
        segments(&rdir, &id)[0].key_txid,
        1,
        "the chain from TXID 1 is there"
    );
    let list = list_json(&url, Some(db), &[], &[]);
    assert_eq!(u(entry(&list, db), "earliest_txid"), 1);
    for t in [1, first_snap - 1] {
        restore_vs_replay(&url, &fx.cli_dir(), db, Some(t), &fx.scratch);
    }
}

/// A replica that fell so far behind that staging was folded past its position gets a
/// snapshot and its level-0 chain restarts after it, leaving a gap. Compaction must not merge
/// across that gap (the level-0 segment before it looks, from the keys alone, as if it ended
/// at the snapshot): both sides are compacted, no error is logged, every TXID the replica
/// holds restores as before, and the TXIDs in the gap are refused clearly.
#[test]
fn compaction_continues_after_a_forced_snapshot() {
    let seed = seed_for("compaction_continues_after_a_forced_snapshot");
    // Phase 1: no compaction yet (so the level-0 objects before the gap are still there when
    // the gap appears), a small staging limit so a lagging replica is folded past.
    let (mut fx, rdir, url) = fixture(
        "lvl-gap",
        &[
            "--compaction",
            "1h",
            "--retention",
            "0",
            "--snapshot-interval",
            "0",
        ],
    );
    fx.opts.stage_limit = Some(64 << 10);
    fx.mount();
    let db = "gap.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    let mut d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
    for _ in 0..4 {
        for _ in 0..3 {
            d.random_txn().unwrap();
        }
        sleep_ms(500);
    }
    let pre_end = wait_shipped(&fx, &rdir, db);
    let id = db_id(&rdir, db);
    assert!(
        segments(&rdir, &id).len() >= 2,
        "expected several level-0 objects before the gap"
    );
    assert_eq!(
        restore_vs_replay(&url, &fx.mnt, db, Some(pre_end), &fx.scratch),
        pre_end
    );
    // What each TXID before the gap restores to from the plain level-0 chain.
    let refs: Vec<(u64, PathBuf)> = (1..=pre_end)
        .map(|t| {
            let out = fx.scratch_path(&format!("ref-{t}.db"));
            assert_eq!(restore_ok(&url, db, &out, Some(t)), t);
            (t, out)
        })
        .collect();

    // The replica stops taking objects; large transactions push staging past its hard limit
    // (4 x --stage-limit), so it is folded past the replica's position.
    let away = break_replica(&rdir);
    let base = fold_past(
        &fx,
        &mut d,
        db,
        pre_end,
        true,
        Duration::from_secs(60),
        "the lagging replica's position",
    );
    drop(d);
    fx.unmount();
    eprintln!("shipped up to TXID {pre_end}; staging folded to {base} meanwhile");

    // Phase 2: the replica is back; compaction every second, nothing folded any more.
    fix_replica(&rdir, &away);
    fx.opts.stage_limit = Some(1 << 30);
    fx.opts.extra_args = args(&[
        "--compaction",
        "1s",
        "--retention",
        "0",
        "--snapshot-interval",
        "0",
    ]);
    fx.mount();
    let mut d = Driver::open(&fx.path(db), 1, seed ^ 1, DriverCfg::default());
    for _ in 0..4 {
        for _ in 0..2 {
            d.random_txn().unwrap();
        }
        sleep_ms(500);
    }
    drop(d);
    let last = wait_shipped(&fx, &rdir, db);
    let snaps = snapshots(&rdir, &id);
    let snap = snaps
        .iter()
        .map(|s| s.key_txid)
        .find(|&t| t > pre_end)
        .unwrap_or_else(|| panic!("no snapshot after the gap: {snaps:?}"));
    assert!(snap >= base, "snapshot at {snap}, staging base {base}");
    wait_cond(
        "level-1 objects on both sides of the gap",
        Duration::from_secs(60),
        || {
            let l1 = compacted(&rdir, &id, 1);
            l1.iter().any(|o| o.first == 1) && l1.iter().any(|o| o.first > snap)
        },
    );
    let l1 = compacted(&rdir, &id, 1);
    eprintln!(
        "level 1: {:?}",
        l1.iter().map(|o| (o.first, o.last)).collect::<Vec<_>>()
    );
    for o in &l1 {
        assert!(
            o.last <= pre_end || o.first > snap,
            "{:?} spans the gap {}..={snap}",
            o.path,
            pre_end + 1
        );
    }
    assert_eq!(
        l1.iter().find(|o| o.first == 1).map(|o| o.last),
        Some(pre_end),
        "the run before the gap ends where the replica's chain ended"
    );
    let log = fx.last_daemon_log();
    assert!(
        !log.contains("compacting into level") && !log.contains("retrying in"),
        "compaction or shipping failed:\n{log}"
    );
    fx.unmount();

    // Every TXID the replica holds restores: before the gap as it did from level 0 alone,
    // from the snapshot on as staging replays it.
    let dir = fx.cli_dir();
    for (t, want) in &refs {
        let out = fx.scratch_path("after.db");
        let _ = fs::remove_file(&out);
        assert_eq!(restore_ok(&url, db, &out, Some(*t)), *t);
        assert_same_bytes(want, &out, &format!("TXID {t} before and after compaction"));
    }
    for t in snap..=last {
        restore_vs_replay(&url, &dir, db, Some(t), &fx.scratch);
    }
    assert_eq!(restore_vs_replay(&url, &dir, db, None, &fx.scratch), last);
    // The transactions folded away before the replica got them are not in it, and a
    // restore says so.
    for t in [pre_end + 1, snap - 1] {
        if t > pre_end && t < snap {
            let out = fx.scratch_path("gap.db");
            let o = restore_with(&url, db, &out, &["--txid", &t.to_string()]);
            assert_restore_fails(&o, &out, &format!("TXID {t} in the gap"));
            let what = format!("TXID {t} in the gap");
            assert_says(&o, "chain breaks after TXID", &what);
            assert_says(&o, &format!("TXIDs {}..={}", pre_end + 1, snap - 1), &what);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Restore by timestamp
// ---------------------------------------------------------------------------------------

#[test]
fn restore_by_timestamp() {
    let seed = seed_for("restore_by_timestamp");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut fx, rdir, url) = fixture(
        "lvl-time",
        &["--compaction", "1s,3s", "--snapshot-interval", "2s"],
    );
    fx.mount();
    let db = "app.db";
    let (_, before_first) = instant_now();
    sleep_ms(20);
    drop(fresh_db(&fx.path(db), "WAL"));
    let mut instants = Vec::new();
    drive(&fx.path(db), seed, 6.0, |d, _| {
        if d.rng.random_bool(0.3) {
            instants.push(instant_now());
        }
    });
    instants.push(instant_now());
    wait_shipped(&fx, &rdir, db);
    sleep_ms(2500);
    fx.unmount();
    let dir = fx.cli_dir();
    let log = log_entries(&dir, db);
    assert!(log.len() > 10);

    // Before the first commit: an error, no file.
    let out = fx.scratch_path("t-early.db");
    let o = restore_with(&url, db, &out, &["--timestamp", &before_first]);
    assert!(
        !o.ok(),
        "restore before the first commit succeeded:\n{}",
        o.describe()
    );
    assert!(!out.exists(), "a failed restore left {}", out.display());
    // It states the window: earliest and latest TXID and commit time.
    let (first_e, last_e) = (&log[0], log.last().unwrap());
    assert_eq!(first_e.txid, 1);
    for needle in [
        "no restore point".to_string(),
        format!("TXIDs 1..={}", last_e.txid),
        rfc3339_ms(first_e.ts as u64),
        rfc3339_ms(last_e.ts as u64),
    ] {
        assert!(
            o.stderr.contains(&needle),
            "restore before the first commit: the error does not say {needle:?}:\n{}",
            o.describe()
        );
    }
    // A TXID past the end fails at planning, with --dry-run too, naming the window.
    for dry in [false, true] {
        let past = (last_e.txid + 5).to_string();
        let mut more = vec!["--txid", past.as_str()];
        if dry {
            more.push("--dry-run");
        }
        let o = restore_with(&url, db, &out, &more);
        assert!(!o.ok(), "restore {more:?} succeeded:\n{}", o.describe());
        assert!(!out.exists());
        for needle in [
            format!("TXID {past}"),
            format!("TXIDs 1..={}", last_e.txid),
            rfc3339_ms(last_e.ts as u64),
        ] {
            assert!(
                o.stderr.contains(&needle),
                "restore {more:?}: the error does not say {needle:?}:\n{}",
                o.describe()
            );
        }
    }

    let mut chosen: Vec<(u64, String)> = Vec::new();
    instants.sort();
    instants.dedup();
    // Up to ~25 instants, always including the last.
    let stride = (instants.len() / 25).max(1);
    for (i, x) in instants.iter().enumerate() {
        if i % stride == 0 || i + 1 == instants.len() || rng.random_bool(0.05) {
            chosen.push(x.clone());
        }
    }
    // Instants before the first snapshot included (the chain from TXID 1 is there).
    let first_snap = snapshots(&rdir, &db_id(&rdir, db))
        .first()
        .map_or(u64::MAX, |s| s.key_txid);
    let mut before_snapshot = 0;
    for (ns, text) in &chosen {
        let want = log
            .iter()
            .filter(|e| e.ts <= *ns as u128)
            .map(|e| e.txid)
            .max()
            .expect("a commit before the instant");
        if want < first_snap {
            before_snapshot += 1;
        }
        let out = fx.scratch_path("t.db");
        let _ = fs::remove_file(&out);
        let o = restore_with(&url, db, &out, &["--timestamp", text, "--json"]);
        assert!(o.ok(), "restore --timestamp {text}:\n{}", o.describe());
        let r: Value = serde_json::from_str(&o.stdout).expect("JSON");
        assert_eq!(
            u(&r, "txid"),
            want,
            "restore --timestamp {text} restored another TXID:\n{}",
            o.stdout
        );
        let rep = fx.scratch_path("t-replay.db");
        replay(&dir, db, want, &rep);
        assert_same_bytes(&rep, &out, &format!("timestamp {text} (TXID {want})"));
    }
    assert!(
        before_snapshot > 0,
        "no instant before the first snapshot (TXID {first_snap}) was restored"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Retention
// ---------------------------------------------------------------------------------------

#[test]
fn retention_removes_old_objects_and_keeps_the_window() {
    let seed = seed_for("retention_removes_old_objects_and_keeps_the_window");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut fx, rdir, url) = fixture("lvl-retention", SHORT_RETENTION);
    fx.mount();
    let db = "app.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    let mut seen = BTreeSet::new();
    let mut id = None;
    let mut polled = Instant::now();
    drive(&fx.path(db), seed, 15.0, |_, _| {
        if polled.elapsed() >= Duration::from_millis(100) {
            polled = Instant::now();
            if id.is_none() {
                id = replica_db_id(&rdir, db);
            }
            if let Some(id) = &id {
                seen.extend(object_keys(&rdir, id));
            }
        }
    });
    let last = wait_shipped(&fx, &rdir, db);
    let id = db_id(&rdir, db);
    seen.extend(object_keys(&rdir, &id));
    sleep_ms(500);
    fx.unmount();
    let dir = fx.cli_dir();

    let now = object_keys(&rdir, &id);
    let count = |s: &BTreeSet<String>, sub: &str| s.iter().filter(|k| k.starts_with(sub)).count();
    eprintln!(
        "seen: {} snapshots, {} level-0; left: {} snapshots, {} level-0, {} level-1",
        count(&seen, "snap/"),
        count(&seen, "l0/"),
        count(&now, "snap/"),
        count(&now, "l0/"),
        count(&now, "l1/")
    );
    assert!(
        count(&now, "snap/") < count(&seen, "snap/"),
        "no snapshot was removed"
    );
    assert!(
        count(&now, "l0/") < count(&seen, "l0/"),
        "no level-0 object was removed"
    );
    assert!(now.iter().all(|k| !k.starts_with("l0/0000000000000001")));

    let list = list_json(&url, Some(db), &[], &[]);
    let d = entry(&list, db);
    let (first, latest) = (u(d, "earliest_txid"), u(d, "latest_txid"));
    assert!(first > 1, "the window still starts at TXID 1: {d}");
    assert_eq!(latest, last, "latest_txid: {d}");
    let mut picks = BTreeSet::from([first, first + 1, latest]);
    for _ in 0..8 {
        picks.insert(rng.random_range(first..=latest));
    }
    for t in picks.into_iter().filter(|&t| t <= latest) {
        restore_vs_replay(&url, &dir, db, Some(t), &fx.scratch);
    }
    // Before the window: a clear error naming the window, and no file.
    let out = fx.scratch_path("old.db");
    let o = restore_with(&url, db, &out, &["--txid", &(first - 1).to_string()]);
    assert!(
        !o.ok(),
        "restore before the window succeeded:\n{}",
        o.describe()
    );
    assert!(!out.exists());
    assert!(
        o.stderr.contains(&format!("TXIDs {first}..={latest}")),
        "the error does not name the window {first}..={latest}:\n{}",
        o.describe()
    );
}

// ---------------------------------------------------------------------------------------
// 4. sqlfs list
// ---------------------------------------------------------------------------------------

#[test]
fn list_text_and_json() {
    let seed = seed_for("list_text_and_json");
    let (mut fx, rdir, url) = fixture(
        "lvl-list",
        &["--compaction", "1s", "--snapshot-interval", "1s"],
    );
    fx.mount();
    fs::create_dir_all(fx.path("sub")).unwrap();
    drop(fresh_db(&fx.path("a.db"), "WAL"));
    drop(fresh_db(&fx.path("sub/b.db"), "DELETE"));
    let b = fx.path("sub/b.db");
    let h = std::thread::spawn(move || drive(&b, seed ^ 1, 3.0, |_, _| {}));
    drive(&fx.path("a.db"), seed, 3.0, |_, _| {});
    h.join().unwrap();
    let la = wait_shipped(&fx, &rdir, "a.db");
    let lb = wait_shipped(&fx, &rdir, "sub/b.db");
    sleep_ms(2500);
    fx.unmount();
    let dir = fx.cli_dir();

    let list = list_json(&url, None, &[], &[]);
    assert_eq!(list.len(), 2, "{list:?}");
    for (name, last) in [("a.db", la), ("sub/b.db", lb)] {
        let d = entry(&list, name);
        assert_eq!(d["id"].as_str().unwrap(), db_id(&rdir, name));
        assert_eq!(u(d, "earliest_txid"), 1, "{d}");
        assert_eq!(u(d, "latest_txid"), last, "{d}");
        let log = log_entries(&dir, name);
        let ts = |t: u64| rfc3339_ms(log.iter().find(|e| e.txid == t).unwrap().ts as u64);
        assert_eq!(d["earliest_time"].as_str().unwrap(), ts(1), "{d}");
        assert_eq!(d["latest_time"].as_str().unwrap(), ts(last), "{d}");
        let snaps = d["snapshots"].as_array().unwrap();
        assert!(!snaps.is_empty(), "no snapshots: {d}");
        let files = snapshots(&rdir, &db_id(&rdir, name));
        assert_eq!(
            snaps.iter().map(|s| u(s, "txid")).collect::<Vec<_>>(),
            files.iter().map(|f| f.key_txid).collect::<Vec<_>>()
        );
        for s in snaps {
            assert_eq!(s["time"].as_str().unwrap(), ts(u(s, "txid")), "{s}");
            assert!(u(s, "bytes") > 0);
        }
        assert!(level_objects(d, 0) > 0, "{d}");
        assert!(level_objects(d, 1) > 0, "no level-1 objects: {d}");
        assert!(u(d, "total_bytes") > 0);
    }

    // Text.
    let o = sqlfs_cli(&[os("list"), os("--replica"), os(&url)]);
    assert!(o.ok(), "{}", o.describe());
    for name in ["a.db", "sub/b.db"] {
        assert!(o.stdout.contains(name), "{}", o.stdout);
    }
    assert!(
        o.stdout.contains("restore window: TXID 1 ("),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains(&format!("TXID {la} (")), "{}", o.stdout);
    assert!(o.stdout.contains("snapshot TXID"), "{}", o.stdout);
    assert!(o.stdout.contains("level 1:"), "{}", o.stdout);

    // --db filter.
    let only = list_json(&url, Some("sub/b.db"), &[], &[]);
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["name"], "sub/b.db");
    // Unknown database.
    let o = sqlfs_cli(&[
        os("list"),
        os("--replica"),
        os(&url),
        os("--db"),
        os("nope.db"),
    ]);
    assert_no_panic(&o);
    assert!(!o.ok(), "{}", o.describe());
    assert!(
        o.stderr.contains("no database named nope.db") && o.stderr.contains("a.db"),
        "{}",
        o.describe()
    );
}

/// A replica whose chain has a gap (a level-0 segment removed before the first snapshot):
/// `sqlfs list` shows two restorable ranges, TXID 1 up to the gap and the snapshot after it
/// up to the end, and names the gap (the TXIDs no restore reaches, the missing ones, the
/// objects on either side); restores agree with the ranges.
#[test]
fn list_shows_the_ranges_around_a_gap() {
    let seed = seed_for("list_shows_the_ranges_around_a_gap");
    let (mut fx, rdir, url) = fixture("lvl-list-gap", KEEP_EVERY_SEGMENT);
    fx.mount();
    let db = "app.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    // Until the replica holds a snapshot with at least two level-0 segments after the first
    // one ending before it (one to remove, one to follow the gap).
    let mut round = 0;
    let (segs, snap) = loop {
        drive(&fx.path(db), seed ^ round, 1.0, |_, _| {});
        wait_shipped(&fx, &rdir, db);
        let id = db_id(&rdir, db);
        let segs = segments(&rdir, &id);
        let snap = snapshots(&rdir, &id).first().map(|s| s.key_txid);
        if let Some(s) = snap {
            if segs.iter().filter(|o| o.last.unwrap() < s).count() >= 3 {
                break (segs, s);
            }
        }
        round += 1;
        assert!(round < 20, "no snapshot after three segments: {segs:?}");
    };
    let last = wait_shipped(&fx, &rdir, db);
    fx.unmount();

    let gone = &segs[1];
    let (a, b) = (gone.first.unwrap(), gone.last.unwrap());
    fs::remove_file(&gone.path).unwrap();
    eprintln!(
        "removed {} (TXIDs {a}..={b}); first snapshot at TXID {snap}",
        gone.key
    );
    let next = &segs[2];
    let after = if next.key_txid == snap {
        snapshots(&rdir, &db_id(&rdir, db))[0].key.clone()
    } else {
        next.key.clone()
    };

    let list = list_json(&url, Some(db), &[], &[]);
    let d = entry(&list, db);
    let ranges: Vec<(u64, u64)> = d["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (u(r, "first_txid"), u(r, "last_txid")))
        .collect();
    assert_eq!(ranges, vec![(1, a - 1), (snap, last)], "{d}");
    assert_eq!(
        (u(d, "earliest_txid"), u(d, "latest_txid")),
        (1, last),
        "{d}"
    );
    let gaps = d["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{d}");
    let g = &gaps[0];
    assert_eq!(
        (
            u(g, "first_txid"),
            u(g, "last_txid"),
            u(g, "missing_first"),
            u(g, "missing_last")
        ),
        (a, snap - 1, a, b),
        "{d}"
    );
    assert_eq!(g["before"].as_str(), Some(segs[0].key.as_str()), "{d}");
    assert_eq!(g["after"].as_str(), Some(after.as_str()), "{d}");

    // Text: the two ranges, the gap between them.
    let o = sqlfs_cli(&[os("list"), os("--replica"), os(&url)]);
    assert!(o.ok(), "{}", o.describe());
    let lines: Vec<&str> = o
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("restore window:") || l.starts_with("gap:"))
        .collect();
    assert_eq!(lines.len(), 3, "{}", o.stdout);
    assert!(
        lines[0].starts_with("restore window: TXID 1 (")
            && lines[0].contains(&format!(".. TXID {} (", a - 1)),
        "{}",
        o.stdout
    );
    assert_eq!(
        lines[1],
        format!(
            "gap: TXIDs {a}..={} cannot be restored: no object holds TXIDs {a}..={b} (missing between {} and {after})",
            snap - 1,
            segs[0].key
        ),
        "{}",
        o.stdout
    );
    assert!(
        lines[2].starts_with(&format!("restore window: TXID {snap} ("))
            && lines[2].contains(&format!(".. TXID {last} (")),
        "{}",
        o.stdout
    );

    // Restores agree: both ends of each range restore, the gap does not.
    let out = fx.scratch_path("gap-restore.db");
    for t in [1, a - 1, snap, last] {
        let _ = fs::remove_file(&out);
        let o = restore_with(&url, db, &out, &["--txid", &t.to_string()]);
        assert!(o.ok(), "restore --txid {t}:\n{}", o.describe());
    }
    for t in [a, snap - 1] {
        let _ = fs::remove_file(&out);
        let o = restore_with(&url, db, &out, &["--txid", &t.to_string()]);
        assert!(
            !o.ok(),
            "restore --txid {t} inside the gap succeeded:\n{}",
            o.describe()
        );
    }
}

// ---------------------------------------------------------------------------------------
// 5. restore options
// ---------------------------------------------------------------------------------------

#[test]
fn restore_json_if_not_exists_force_parallel() {
    let seed = seed_for("restore_json_if_not_exists_force_parallel");
    let (mut fx, rdir, url) = fixture("lvl-ropts", &["--compaction", "1s"]);
    fx.mount();
    let db = "app.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    drive(&fx.path(db), seed, 3.0, |_, _| {});
    let last = wait_shipped(&fx, &rdir, db);
    fx.unmount();
    let log = log_entries(&fx.cli_dir(), db);
    let e = log.last().unwrap();
    assert_eq!(e.txid, last);

    let out = fx.scratch_path("out.db");
    let o = restore_with(&url, db, &out, &["--json"]);
    assert!(o.ok(), "{}", o.describe());
    let r: Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert_eq!(r["db"], db);
    assert_eq!(r["output"].as_str().unwrap(), out.display().to_string());
    assert_eq!(r["dry_run"], false);
    assert_eq!(r["skipped"], false);
    assert_eq!(u(&r, "txid"), last);
    assert_eq!(r["commit_time"].as_str().unwrap(), rfc3339_ms(e.ts as u64));
    assert_eq!(u(&r, "pages"), e.size);
    assert_eq!(u(&r, "bytes"), e.size * u(&r, "page_size"));
    assert_eq!(fs::metadata(&out).unwrap().len(), u(&r, "bytes"));
    assert_eq!(
        r["checksum"].as_str().unwrap(),
        format!("{:016x}", e.checksum)
    );
    assert_eq!(r["was_wal"], true);
    let objs = r["objects"].as_array().unwrap();
    assert!(!objs.is_empty());
    for ob in objs {
        assert!(ob["key"].as_str().unwrap().starts_with(&db_id(&rdir, db)));
        assert!(["snapshot", "segment", "compacted"].contains(&ob["kind"].as_str().unwrap()));
        assert!(u(ob, "first_txid") >= 1);
    }
    assert_eq!(
        u(&r, "downloaded_bytes"),
        objs.iter().map(|o| u(o, "size")).sum::<u64>()
    );
    assert!(r["seconds"].as_f64().is_some());

    // --if-not-exists: untouched, exit 0.
    let before = fs::read(&out).unwrap();
    let mtime = fs::metadata(&out).unwrap().modified().unwrap();
    for t in ["1", &last.to_string()] {
        let o = restore_with(&url, db, &out, &["--if-not-exists", "--txid", t]);
        assert!(o.ok(), "{}", o.describe());
        assert_eq!(fs::read(&out).unwrap(), before);
        assert_eq!(fs::metadata(&out).unwrap().modified().unwrap(), mtime);
    }
    let o = restore_with(&url, db, &out, &["--if-not-exists", "--json"]);
    assert!(o.ok());
    let r: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(r["skipped"], true);
    // Without --force: refused, untouched.
    let o = restore_with(&url, db, &out, &["--txid", "1"]);
    assert!(!o.ok(), "{}", o.describe());
    assert!(o.stderr.contains("--force"), "{}", o.describe());
    assert_eq!(fs::read(&out).unwrap(), before);
    // With --force: replaced.
    let o = restore_with(&url, db, &out, &["--txid", "1", "--force"]);
    assert!(o.ok(), "{}", o.describe());
    assert_ne!(fs::read(&out).unwrap(), before);

    // --parallel 1 and 8 give the same bytes.
    let p1 = fx.scratch_path("p1.db");
    let p8 = fx.scratch_path("p8.db");
    for t in [last / 2, last] {
        let ts = t.to_string();
        let _ = fs::remove_file(&p1);
        let _ = fs::remove_file(&p8);
        assert!(restore_with(&url, db, &p1, &["--parallel", "1", "--txid", &ts]).ok());
        assert!(restore_with(&url, db, &p8, &["--parallel", "8", "--txid", &ts]).ok());
        assert_eq!(
            fs::read(&p1).unwrap(),
            fs::read(&p8).unwrap(),
            "--parallel 1 and 8 differ at TXID {t}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. Passphrase encryption
// ---------------------------------------------------------------------------------------

#[test]
fn passphrase_encrypted_replica() {
    let seed = seed_for("passphrase_encrypted_replica");
    let (mut fx, rdir, url) = fixture(
        "lvl-pass",
        &[
            "--passphrase-env",
            "SQLFS_TEST_PASS",
            "--compaction",
            "1s",
            "--snapshot-interval",
            "2s",
        ],
    );
    let pass = "correct horse battery staple";
    fx.opts.env = vec![("SQLFS_TEST_PASS".into(), pass.into())];
    fx.mount();
    let db = "app.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    let mut instants = Vec::new();
    drive(&fx.path(db), seed, 4.0, |d, _| {
        if d.rng.random_bool(0.1) {
            instants.push(instant_now());
        }
    });
    instants.push(instant_now());
    let last = last_staged(&fx.mnt, db);
    // Keys are plain; contents are not: wait with `sqlfs list`.
    wait_cond(
        "the encrypted replica to hold the last TXID",
        COVER_TIMEOUT,
        || {
            let a = [
                os("list"),
                os("--replica"),
                os(&url),
                os("--json"),
                os("--passphrase-env"),
                os("SQLFS_TEST_PASS"),
            ];
            let o = sqlfs_env(&a, &[("SQLFS_TEST_PASS", pass)]);
            o.ok()
                && serde_json::from_str::<Value>(&o.stdout)
                    .ok()
                    .and_then(|v| v[0]["latest_txid"].as_u64())
                    == Some(last)
        },
    );
    sleep_ms(1500);
    fx.unmount();
    let dir = fx.cli_dir();

    let files = tree(&rdir);
    assert!(!files.is_empty());
    for k in files.keys() {
        let b = fs::read(rdir.join(k)).unwrap();
        assert!(
            b.starts_with(b"age-encryption.org/v1"),
            "{k} is not an age file"
        );
        assert!(!b.windows(6).any(|w| w == b"app.db"), "{k} shows the name");
    }

    let env = [("SQLFS_TEST_PASS", pass)];
    // TXIDs before the first snapshot (from the chain from TXID 1), at it, and after it.
    // The name is encrypted: the only database id is the only `names/` entry.
    let ids: Vec<String> = fs::read_dir(rdir.join("names"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let floor = snapshots(&rdir, &ids[0]).first().map_or(1, |s| s.key_txid);
    let picks = BTreeSet::from([
        1,
        floor.saturating_sub(1).max(1),
        floor,
        (floor + last) / 2,
        last,
    ]);
    for t in picks {
        let out = fx.scratch_path(&format!("enc-{t}.db"));
        let mut a = restore_args(&url, db, &out, &["--passphrase-env", "SQLFS_TEST_PASS"]);
        a.extend([os("--txid"), os(t.to_string())]);
        let o = sqlfs_env(&a, &env);
        assert_no_panic(&o);
        assert!(o.ok(), "{}", o.describe());
        let rep = fx.scratch_path("enc-replay.db");
        replay(&dir, db, t, &rep);
        assert_same_bytes(&rep, &out, &format!("encrypted restore at TXID {t}"));
    }
    // Instants: commit times come from encrypted headers.
    let log = log_entries(&dir, db);
    for (ns, text) in instants.iter().step_by((instants.len() / 4).max(1)) {
        let want = log
            .iter()
            .filter(|e| e.ts <= *ns as u128)
            .map(|e| e.txid)
            .max()
            .expect("a commit before the instant");
        let out = fx.scratch_path("enc-t.db");
        let _ = fs::remove_file(&out);
        let mut a = restore_args(&url, db, &out, &["--passphrase-env", "SQLFS_TEST_PASS"]);
        a.extend([os("--timestamp"), os(text), os("--json")]);
        let o = sqlfs_env(&a, &env);
        assert_no_panic(&o);
        assert!(o.ok(), "restore --timestamp {text}:\n{}", o.describe());
        let r: Value = serde_json::from_str(&o.stdout).expect("JSON");
        assert_eq!(u(&r, "txid"), want, "encrypted restore --timestamp {text}");
        let rep = fx.scratch_path("enc-replay.db");
        replay(&dir, db, want, &rep);
        assert_same_bytes(
            &rep,
            &out,
            &format!("encrypted restore at {text} (TXID {want})"),
        );
    }

    // Wrong passphrase.
    let out = fx.scratch_path("wrong.db");
    let a = restore_args(&url, db, &out, &["--passphrase-env", "SQLFS_TEST_PASS"]);
    let o = sqlfs_env(&a, &[("SQLFS_TEST_PASS", "not it")]);
    assert_no_panic(&o);
    assert!(!o.ok(), "{}", o.describe());
    assert!(!out.exists());
    assert!(!o.stderr.trim().is_empty(), "{}", o.describe());
    assert!(!o.stderr.contains(pass));
    // Missing passphrase.
    let o = restore_with(&url, db, &out, &[]);
    assert!(!o.ok(), "{}", o.describe());
    assert!(!out.exists());
    assert!(
        o.stderr.contains("--passphrase-env"),
        "the error does not name the passphrase option:\n{}",
        o.describe()
    );
    // The variable named but not set.
    let a = restore_args(
        &url,
        db,
        &out,
        &["--passphrase-env", "SQLFS_TEST_PASS_UNSET"],
    );
    let o = sqlfs_cli(&a);
    assert!(!o.ok());
    assert!(
        o.stderr.contains("SQLFS_TEST_PASS_UNSET"),
        "{}",
        o.describe()
    );
    assert!(!out.exists());
}

/// An encrypted replica (age identity) with compaction and retention: after retention removed
/// the oldest objects, TXIDs and instants inside the window restore to their replays, targets
/// before it fail naming the window. Every restore runs with TMPDIR pointing nowhere (scratch
/// space is next to the output) and leaves nothing but the output behind.
#[test]
fn encrypted_replica_with_retention_by_timestamp() {
    let seed = seed_for("encrypted_replica_with_retention_by_timestamp");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut fx, rdir, url) = fixture("lvl-enc-ret", SHORT_RETENTION);
    let key = fx.scratch_path("replica.key");
    fx.opts.age_recipients = vec![keygen(&key)];
    fx.mount();
    let db = "app.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    let mut instants = Vec::new();
    drive(&fx.path(db), seed, 12.0, |d, _| {
        if d.rng.random_bool(0.2) {
            instants.push(instant_now());
        }
    });
    instants.push(instant_now());
    let last = last_staged(&fx.mnt, db);
    let key_s = key.display().to_string();
    let id_args = ["--age-identity", key_s.as_str()];
    wait_cond(
        "the encrypted replica to hold the last TXID",
        COVER_TIMEOUT,
        || {
            let mut a = vec![os("list"), os("--replica"), os(&url), os("--json")];
            a.extend(id_args.iter().map(os));
            let o = sqlfs_cli(&a);
            o.ok()
                && serde_json::from_str::<Value>(&o.stdout)
                    .ok()
                    .and_then(|v| v[0]["latest_txid"].as_u64())
                    == Some(last)
        },
    );
    sleep_ms(500);
    fx.unmount();
    let dir = fx.cli_dir();
    for (k, _) in tree(&rdir) {
        assert_sealed(&fs::read(rdir.join(&k)).unwrap(), &k);
    }

    let list = list_json(&url, Some(db), &[], &id_args);
    let d = entry(&list, db);
    let (first, latest) = (u(d, "earliest_txid"), u(d, "latest_txid"));
    assert!(first > 1, "retention removed nothing: {d}");
    assert_eq!(latest, last, "latest_txid: {d}");

    // Restores with TMPDIR unusable, into a directory that must hold only the output after.
    let outdir = fx.scratch_path("enc-ret-out");
    fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let no_tmp = [("TMPDIR", "/nonexistent/sqlfs-tmp")];
    let restore = |more: &[&str]| {
        let _ = fs::remove_file(&out);
        let mut a = restore_args(&url, db, &out, &id_args);
        a.extend(more.iter().map(os));
        let o = sqlfs_env(&a, &no_tmp);
        assert_no_panic(&o);
        let left: Vec<String> = dir_names(&outdir)
            .into_iter()
            .filter(|n| n != "restored.db")
            .collect();
        assert!(
            left.is_empty(),
            "restore {more:?} left {left:?} in {}",
            outdir.display()
        );
        o
    };
    let mut picks = BTreeSet::from([first, latest]);
    for _ in 0..3 {
        picks.insert(rng.random_range(first..=latest));
    }
    for t in picks {
        let o = restore(&["--txid", &t.to_string()]);
        assert!(o.ok(), "restore --txid {t}:\n{}", o.describe());
        let rep = fx.scratch_path("enc-ret-replay.db");
        replay(&dir, db, t, &rep);
        assert_same_bytes(&rep, &out, &format!("encrypted restore at TXID {t}"));
    }
    let log = log_entries(&dir, db);
    let first_ns = log.iter().find(|e| e.txid == first).unwrap().ts;
    let inside: Vec<&(u64, String)> = instants
        .iter()
        .filter(|(ns, _)| *ns as u128 >= first_ns)
        .collect();
    assert!(!inside.is_empty(), "no instant inside the window");
    for (ns, text) in inside.iter().rev().step_by((inside.len() / 4).max(1)) {
        let want = log
            .iter()
            .filter(|e| e.ts <= *ns as u128)
            .map(|e| e.txid)
            .max()
            .unwrap();
        let o = restore(&["--timestamp", text, "--json"]);
        assert!(o.ok(), "restore --timestamp {text}:\n{}", o.describe());
        let r: Value = serde_json::from_str(&o.stdout).expect("JSON");
        assert_eq!(u(&r, "txid"), want, "encrypted restore --timestamp {text}");
        let rep = fx.scratch_path("enc-ret-replay.db");
        replay(&dir, db, want, &rep);
        assert_same_bytes(
            &rep,
            &out,
            &format!("encrypted restore at {text} (TXID {want})"),
        );
    }
    // Before the window, by TXID and by instant: errors naming it, and no file.
    let before_ns = log.iter().find(|e| e.txid == first - 1).unwrap().ts as u64;
    for more in [
        vec!["--txid".to_string(), (first - 1).to_string()],
        vec!["--timestamp".to_string(), rfc3339_ms(before_ns)],
    ] {
        let more: Vec<&str> = more.iter().map(String::as_str).collect();
        let o = restore(&more);
        assert!(
            !o.ok(),
            "restore {more:?} before the window succeeded:\n{}",
            o.describe()
        );
        assert!(!out.exists());
        assert!(
            o.stderr.contains(&format!("TXIDs {first}..={latest}")),
            "restore {more:?}: the error does not name the window {first}..={latest}:\n{}",
            o.describe()
        );
    }
}

// ---------------------------------------------------------------------------------------
// 7. Configuration file
// ---------------------------------------------------------------------------------------

/// Runs `sqlfs mount --config F`, which must fail before mounting; returns its output.
fn mount_must_fail(fx: &Fixture, conf: &Path, env: &[(&str, &str)]) -> CmdOut {
    let mut c = Command::new(BIN);
    c.arg("mount").arg("--config").arg(conf);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    if status.is_none() {
        kill9_child(&mut child);
        lazy_umount(&fx.mnt);
        panic!("sqlfs mount --config {} did not fail", conf.display());
    }
    let mut so = String::new();
    let mut se = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut so)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut se)
        .unwrap();
    let o = CmdOut {
        cmdline: format!("sqlfs mount --config {}", conf.display()),
        status: status.unwrap(),
        stdout: so,
        stderr: se,
    };
    assert!(!o.ok(), "{}", o.describe());
    assert_eq!(sqlfs_mounts_at(&fx.mnt), 0, "it mounted:\n{}", o.describe());
    o
}

#[test]
fn config_file() {
    let seed = seed_for("config_file");
    let mut fx = Fixture::new("lvl-config", false);
    let rdir = fx.scratch_path("r");
    let conf = fx.scratch_path("sqlfs.yml");
    let yaml = format!(
        "dir: {}\ndata-dir: {}\nsync-interval: 200ms\nstage-limit: 1G\ncompaction: [1s, 3s]\nretention: \"0\"\nsnapshot-interval: 2s\nreplicas:\n  - url: file://${{SQLFS_TEST_CONF_DIR}}/r\ndatabases:\n  skip.db:\n    replicate: false\n",
        fx.mnt.display(),
        fx.backing.display()
    );
    fs::write(&conf, &yaml).unwrap();
    let scratch = fx.scratch.display().to_string();
    fx.opts.data_dir = None;
    fx.opts.replicas = Some(Vec::new());
    fx.opts.extra_args = vec!["--config".into(), conf.display().to_string()];
    fx.opts.env = vec![("SQLFS_TEST_CONF_DIR".into(), scratch.clone())];
    fx.mount();
    for db in ["app.db", "skip.db"] {
        drop(fresh_db(&fx.path(db), "WAL"));
    }
    drive(&fx.path("app.db"), seed, 2.0, |_, _| {});
    drive(&fx.path("skip.db"), seed ^ 7, 1.0, |_, _| {});
    let last = wait_shipped(&fx, &rdir, "app.db");
    sleep_ms(1000);
    let url = file_url(&rdir);
    let list = list_json(&url, None, &[], &[]);
    assert!(list.iter().any(|d| d["name"] == "app.db"), "{list:?}");
    assert!(
        !list.iter().any(|d| d["name"] == "skip.db"),
        "skip.db is in the replica: {list:?}"
    );
    assert!(replica_db_id(&rdir, "skip.db").is_none());
    fx.unmount();
    assert!(
        last_staged(&fx.cli_dir(), "skip.db") > 0,
        "skip.db was not captured"
    );

    // restore --config F /mountdir/app.db.
    let out = fx.scratch_path("conf-restore.db");
    let o = sqlfs_env(
        &[
            os("restore"),
            os("--config"),
            os(&conf),
            os(fx.path("app.db")),
            os("-o"),
            os(&out),
        ],
        &[("SQLFS_TEST_CONF_DIR", &scratch)],
    );
    assert_no_panic(&o);
    assert!(o.ok(), "{}", o.describe());
    assert_eq!(restored_txid(&o), last);
    let rep = fx.scratch_path("conf-replay.db");
    replay(&fx.cli_dir(), "app.db", last, &rep);
    assert_same_bytes(&rep, &out, "restore --config");

    // Bad configurations: exit non-zero naming the key or variable, and do not mount.
    let bad = fx.scratch_path("bad.yml");
    let env = [("SQLFS_TEST_CONF_DIR", scratch.as_str())];
    fs::write(&bad, format!("{yaml}colour: red\n")).unwrap();
    let o = mount_must_fail(&fx, &bad, &env);
    assert!(o.stderr.contains("colour"), "{}", o.describe());
    fs::write(&bad, yaml.replace("retention: \"0\"", "retention: forever")).unwrap();
    let o = mount_must_fail(&fx, &bad, &env);
    assert!(o.stderr.contains("retention"), "{}", o.describe());
    fs::write(
        &bad,
        yaml.replace("compaction: [1s, 3s]", "compaction: [1s, soon]"),
    )
    .unwrap();
    let o = mount_must_fail(&fx, &bad, &env);
    assert!(o.stderr.contains("compaction"), "{}", o.describe());
    let o = mount_must_fail(&fx, &conf, &[]);
    assert!(o.stderr.contains("SQLFS_TEST_CONF_DIR"), "{}", o.describe());
}

// ---------------------------------------------------------------------------------------
// 8. --restore-if-missing
// ---------------------------------------------------------------------------------------

fn rows(path: &Path) -> Vec<(i64, i64, i64)> {
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut st = c.prepare("SELECT id, w, seq FROM t ORDER BY id").unwrap();
    let r = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    r
}

#[test]
fn restore_if_missing_then_keeps_shipping() {
    let seed = seed_for("restore_if_missing_then_keeps_shipping");
    let (mut a, rdir, url) = fixture("lvl-rim-a", &["--compaction", "1s"]);
    // A second replica: after the restore it must continue its own chain too.
    let url2 = file_url(&a.scratch_path("r2"));
    a.opts.replicas = Some(vec![url.clone(), url2.clone()]);
    a.mount();
    let db = "app.db";
    drop(fresh_db(&a.path(db), "WAL"));
    drive(&a.path(db), seed, 2.0, |_, _| {});
    let last_a = wait_shipped(&a, &rdir, db);
    a.unmount();
    let rows_a = rows(&a.backing_path(db));
    let ref_a = a.scratch_path("a-restore.db");
    restore_ok(&url, db, &ref_a, None);

    let mut b = Fixture::new("lvl-rim-b", false);
    b.opts.replicas = Some(vec![url.clone(), url2.clone()]);
    b.opts.sync_interval = Some(SYNC.into());
    b.opts.stage_limit = Some(1 << 30);
    b.opts.extra_args = args(&["--restore-if-missing", "--compaction", "1s"]);
    b.mount();
    assert!(b.backing_path(db).exists(), "app.db was not restored");
    // The served file keeps the exact captured bytes (WAL mode stays WAL mode); `sqlfs
    // restore` presents the same state in rollback mode.
    assert!(
        as_restored(fs::read(b.backing_path(db)).unwrap()) == fs::read(&ref_a).unwrap(),
        "the restored file differs from `sqlfs restore` of the latest state"
    );
    assert!(
        !b.all_daemon_logs().contains("staging the initial snapshot"),
        "the restored database started a new chain:\n{}",
        b.all_daemon_logs()
    );
    assert_eq!(rows(&b.path(db)), rows_a);

    // New writes on top are shipped.
    let mut d = Driver::open(&b.path(db), 2, seed ^ 9, DriverCfg::default());
    set_journal_mode(&d.conn, "WAL");
    let mut mine = Vec::new();
    for _ in 0..20 {
        mine.push(d.random_txn().unwrap());
    }
    drop(d);
    sleep_ms(1500);
    b.unmount();
    let rows_b = rows(&b.backing_path(db));
    assert!(rows_b.iter().any(|r| r.1 == 2), "no rows of the new writer");
    let list = list_json(&url, None, &[], &[]);
    let named: Vec<&Value> = list.iter().filter(|d| d["name"] == db).collect();
    let out = b.scratch_path("b-restore.db");
    restore_ok(&url, db, &out, None);
    assert_eq!(
        rows(&out),
        rows_b,
        "restore of the latest state does not show the writes made after --restore-if-missing ({} databases named {db} in the replica: {named:?}; the first mount ended at TXID {last_a})",
        named.len()
    );
    assert_eq!(named.len(), 1, "{named:?}");
    assert!(u(named[0], "latest_txid") > last_a, "{:?}", named[0]);
    let out2 = b.scratch_path("b-restore-2.db");
    restore_ok(&url2, db, &out2, None);
    assert_eq!(
        rows(&out2),
        rows_b,
        "the second replica did not get the new writes"
    );
    let logs = b.all_daemon_logs();
    assert!(
        !logs.contains("FENCED") && !logs.contains("another sqlfs"),
        "{logs}"
    );
}

// ---------------------------------------------------------------------------------------
// 9. Metrics
// ---------------------------------------------------------------------------------------

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the first metric line starting with `prefix`.
fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_endpoint() {
    let seed = seed_for("metrics_endpoint");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let (mut fx, rdir, url) = fixture("lvl-metrics", &["--metrics-addr", &addr]);
    fx.mount();
    let db = "app.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    drive(&fx.path(db), seed, 1.0, |_, _| {});
    let last = wait_shipped(&fx, &rdir, db);
    let mut body = String::new();
    wait_cond(
        "sqlfs_replica_txid to reach the last TXID",
        COVER_TIMEOUT,
        || {
            body = http_get(&addr, "/metrics");
            metric(&body, "sqlfs_replica_txid{db=\"app.db\"") == Some(last as f64)
        },
    );
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert_eq!(
        metric(&body, "sqlfs_txid{db=\"app.db\"}"),
        Some(last as f64),
        "{body}"
    );
    let line = "sqlfs_replica_txid{db=\"app.db\",replica=\"".to_string();
    assert!(body.lines().any(|l| l.starts_with(&line)), "{body}");
    let lag = metric(&body, "sqlfs_replica_lag_seconds{db=\"app.db\"").expect(&body);
    assert!(lag >= 0.0, "{body}");
    assert_eq!(metric(&body, "sqlfs_replica_up{"), Some(1.0), "{body}");
    assert!(
        body.contains(&rdir.display().to_string()) || body.contains(&url),
        "{body}"
    );
    assert!(http_get(&addr, "/nope").starts_with("HTTP/1.1 404"));
    fx.unmount();
}

// ---------------------------------------------------------------------------------------
// 10. S3: compaction, retention and timestamp restore
// ---------------------------------------------------------------------------------------

#[test]
fn s3_compaction_retention_timestamp() {
    let seed = seed_for("s3_compaction_retention_timestamp");
    let mut rng = StdRng::seed_from_u64(seed);
    s3_test_credentials();
    let srv = S3Server::start("levels");
    let url = srv.url("levels", "lv/host");
    let mut fx = Fixture::new("lvl-s3", false);
    fx.opts.replicas = Some(vec![url.clone()]);
    fx.opts.sync_interval = Some("300ms".into());
    fx.opts.stage_limit = Some(1 << 30);
    fx.opts.extra_args = args(&[
        "--compaction",
        "1s,3s",
        "--snapshot-interval",
        "2s",
        "--retention",
        "6s",
    ]);
    fx.mount();
    let db = "app.db";
    drop(fresh_db(&fx.path(db), "WAL"));
    let mut instants = Vec::new();
    let mut max_snaps = 0;
    let mut polled = Instant::now();
    drive(&fx.path(db), seed, 14.0, |d, _| {
        if d.rng.random_bool(0.2) {
            instants.push(instant_now());
        }
        if polled.elapsed() > Duration::from_secs(1) {
            polled = Instant::now();
            let a = [os("list"), os("--replica"), os(&url), os("--json")];
            let o = sqlfs_cli(&a);
            if let Ok(v) = serde_json::from_str::<Value>(&o.stdout) {
                if let Some(s) = v[0]["snapshots"].as_array() {
                    max_snaps = max_snaps.max(s.len());
                }
            }
        }
    });
    let last = last_staged(&fx.mnt, db);
    wait_cond(
        "the S3 replica to hold the last TXID",
        Duration::from_secs(60),
        || {
            let o = sqlfs_cli(&[os("list"), os("--replica"), os(&url), os("--json")]);
            serde_json::from_str::<Value>(&o.stdout)
                .ok()
                .and_then(|v| v[0]["latest_txid"].as_u64())
                == Some(last)
        },
    );
    sleep_ms(1000);
    fx.unmount();
    let dir = fx.cli_dir();

    let list = list_json(&url, Some(db), &[], &[]);
    let d = entry(&list, db);
    eprintln!("S3 listing: {d}");
    let first = u(d, "earliest_txid");
    assert!(first > 1, "retention removed nothing: {d}");
    assert_eq!(u(d, "latest_txid"), last);
    assert!(level_objects(d, 1) > 0, "no level-1 objects: {d}");
    assert!(
        level_objects(d, 2) > 0 || max_snaps > d["snapshots"].as_array().unwrap().len(),
        "{d}"
    );
    for t in [first, rng.random_range(first..=last), last] {
        restore_vs_replay(&url, &dir, db, Some(t), &fx.scratch);
    }
    let o = restore_with(&url, db, &fx.scratch_path("old.db"), &["--txid", "1"]);
    assert!(!o.ok(), "{}", o.describe());
    assert!(!fx.scratch_path("old.db").exists());

    // Timestamp restores inside the window.
    let log = log_entries(&dir, db);
    let first_ns = log.iter().find(|e| e.txid == first).unwrap().ts;
    let inside: Vec<&(u64, String)> = instants
        .iter()
        .filter(|(ns, _)| *ns as u128 >= first_ns)
        .collect();
    assert!(!inside.is_empty());
    for (ns, text) in inside.iter().rev().step_by((inside.len() / 5).max(1)) {
        let want = log
            .iter()
            .filter(|e| e.ts <= *ns as u128)
            .map(|e| e.txid)
            .max()
            .unwrap();
        let out = fx.scratch_path("s3t.db");
        let _ = fs::remove_file(&out);
        let o = restore_with(&url, db, &out, &["--timestamp", text, "--json"]);
        assert!(o.ok(), "{}", o.describe());
        let r: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(u(&r, "txid"), want, "timestamp {text}");
        let rep = fx.scratch_path("s3t-replay.db");
        replay(&dir, db, want, &rep);
        assert_same_bytes(&rep, &out, &format!("S3 timestamp {text}"));
    }
}
