//! Crash tests: kill -9 of writer processes (leaving a hot rollback journal, or
//! uncommitted WAL frames) and of the sqlfs daemon itself, mid-workload. Afterwards
//! (with `umount -l` and a remount for a daemon crash): integrity_check is ok, every
//! commit a writer reported is present, nothing of an unfinished transaction is, the
//! staged txids are gap-free 1..N, the last staged transaction is the live database,
//! and `sqlfs verify` passes.
mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use common::workload::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn worker_entry() {
    worker_main();
}

fn create_db(fx: &Fixture, db: &str, journal: &str) {
    let c = open_db(&fx.path(db));
    set_journal_mode(&c, journal);
    c.execute_batch(SCHEMA).unwrap();
}

struct Spawned {
    child: Child,
    out: PathBuf,
    log: PathBuf,
}

fn spawn(fx: &Fixture, p: Params, name: &str) -> Spawned {
    let out = fx.scratch_path(&format!("{name}.out"));
    let log = fx.scratch_path(&format!("{name}.log"));
    let child = spawn_worker(&p.set("out", out.display()), &log);
    Spawned { child, out, log }
}

fn writer(fx: &Fixture, db: &str, wid: i64, seed: u64, journal: Option<&str>) -> Params {
    let mut p = Params::new("writer")
        .set("db", fx.path(db).display())
        .set("wid", wid)
        .set("seed", seed)
        .set("txns", 0)
        .set("append", 1)
        .set("sync", "FULL")
        .set("max_blob", 5000)
        .set("sleep_ms", 3)
        // A checksum of the state after about one commit in ten: each must be staged.
        .set("sample_prob", 0.1);
    if let Some(j) = journal {
        p = p.set("journal", j);
    }
    p
}

/// Wait until a holding worker has its transaction open (pages spilled).
fn wait_holding(w: &mut Spawned) -> (i64, i64, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(h) = read_report(&w.out).holding {
            return h;
        }
        if let Ok(Some(s)) = w.child.try_wait() {
            panic!(
                "holding worker exited with {s}:\n{}",
                file_tail(&w.log, 3000)
            );
        }
        assert!(
            Instant::now() < deadline,
            "holding worker never opened its transaction:\n{}",
            file_tail(&w.log, 3000)
        );
        sleep_ms(20);
    }
}

/// Wait until a writer has reported at least `n` commits.
fn wait_commits(w: &mut Spawned, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while read_report(&w.out).commits.len() < n {
        if let Ok(Some(s)) = w.child.try_wait() {
            panic!(
                "writer exited early with {s}:\n{}\n{:?}",
                file_tail(&w.log, 3000),
                read_report(&w.out).errors
            );
        }
        assert!(
            Instant::now() < deadline,
            "writer made no progress:\n{}",
            file_tail(&w.log, 3000)
        );
        sleep_ms(10);
    }
}

/// The checks after any crash and recovery.
fn check_recovered(
    fx: &Fixture,
    db: &str,
    commits: &[(i64, i64)],
    absent: &[(i64, i64)],
    samples: &[Vec<Sample>],
) {
    // The first connection rolls back a hot journal / recovers the WAL, through the mount.
    let conn = open_db(&fx.path(db));
    integrity_ok(&conn);
    assert_commits_present(&conn, commits, db);
    for &(a, b) in absent {
        assert_ids_absent(&conn, a, b, db);
    }
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    drop(conn);
    let entries = check_final(&fx.cli_dir(), &fx.path(db), db, &fx.scratch);
    // Every transaction that inserted rows produced a new state, so a staged transaction.
    let writing = commits.iter().filter(|(a, b)| a <= b).count();
    eprintln!(
        "{db}: {rows} rows, {} reported commits present ({writing} inserting), {} staged transactions",
        commits.len(),
        entries.len()
    );
    // States sampled by the writers right after their commits are all staged, in order.
    for s in samples {
        check_samples(&fx.cli_dir(), db, &entries, s, &fx.scratch);
    }
    assert!(
        entries.len() >= writing,
        "{db}: {writing} reported commits inserted rows but only {} transactions are staged",
        entries.len()
    );
    fx.assert_verify();
}

#[test]
fn writer_killed_mid_transaction_leaves_hot_journal() {
    let seed = seed_for("writer_killed_mid_transaction_leaves_hot_journal");
    let mut fx = Fixture::new("hotjournal", true);
    fx.mount();
    for (i, mode) in ["DELETE", "PERSIST", "TRUNCATE"].iter().enumerate() {
        let db = format!("hot_{}.db", mode.to_lowercase());
        create_db(&fx, &db, mode);
        let p = Params::new("hold")
            .set("append", 1)
            .set("db", fx.path(&db).display())
            .set("wid", 1)
            .set("seed", seed + i as u64)
            .set("journal", mode)
            .set("sync", "FULL")
            .set("cache", 10)
            .set("pre", 8)
            .set("bytes", 3 << 20);
        let mut w = spawn(&fx, p, &format!("hold-{mode}"));
        let (a, b, size_before) = wait_holding(&mut w);
        let journal = fx.path(&format!("{db}-journal"));
        let jlen = fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
        let dblen = fs::metadata(fx.path(&db)).unwrap().len();
        assert!(jlen > 0, "{mode}: no journal while a transaction is open");
        assert!(
            dblen > size_before,
            "{mode}: the open transaction did not spill into the database file"
        );
        kill9_child(&mut w.child);
        assert!(
            fs::metadata(&journal).map(|m| m.len()).unwrap_or(0) > 0,
            "{mode}: hot journal vanished"
        );
        let commits = read_report(&w.out).commits;
        assert_eq!(commits.len(), 8);
        // Before recovery the file holds uncommitted pages; the staged stream must not.
        let pre = log_entries(&fx.mnt, &db);
        assert_gap_free(&pre, &db);
        check_recovered(&fx, &db, &commits, &[(a, b)], &[]);
        // Life goes on after the rollback.
        let mut d = Driver::open(&fx.path(&db), 2, seed, DriverCfg::default());
        let mut samples = Vec::new();
        for t in 0..5 {
            d.random_txn().unwrap();
            samples.push(d.sample(0.5, format!("{mode} after recovery txn {t}")));
        }
        drop(d);
        let entries = check_final(&fx.mnt, &fx.path(&db), &db, &fx.scratch);
        check_samples(&fx.mnt, &db, &entries, &samples, &fx.scratch);
    }
    fx.assert_verify();
    fx.unmount();
    assert_verify(&fx.backing);
}

fn kill_writers_rounds(fx: &mut Fixture, db: &str, journal: &str, seed: u64, rounds: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let wal = journal == "WAL";
    create_db(fx, db, journal);
    let mut commits = Vec::new();
    let mut absent = Vec::new();
    let mut samples = Vec::new();
    for round in 0..rounds {
        let mut ws = Vec::new();
        for k in 0..3 {
            let wid = (round * 10 + k + 1) as i64;
            let mut p = writer(fx, db, wid, seed, if wal { None } else { Some(journal) });
            if wal {
                p = p.set("autockpt", [0, 10, 1000][k]);
                if k == 0 {
                    p = p.set("ckpt_prob", 0.05);
                }
            }
            ws.push(spawn(fx, p, &format!("r{round}-w{wid}")));
        }
        // One more process with a large transaction left open (spilled) when killed.
        let hold_wid = (round * 10 + 9) as i64;
        let spill_file = if wal {
            format!("{}-wal", fx.path(db).display())
        } else {
            fx.path(db).display().to_string()
        };
        let hp = Params::new("hold")
            .set("append", 1)
            .set("db", fx.path(db).display())
            .set("wid", hold_wid)
            .set("seed", seed)
            .set("sync", "FULL")
            .set("cache", 10)
            .set("pre", 3)
            .set("bytes", 2 << 20)
            .set("spill_file", &spill_file);
        let hp = if wal { hp } else { hp.set("journal", journal) };
        for w in ws.iter_mut() {
            wait_commits(w, 3);
        }
        let mut h = spawn(fx, hp, &format!("r{round}-hold"));
        let (a, b, _) = wait_holding(&mut h);
        // The holder owns the write lock; kill it first, then the writers at random moments.
        kill9_child(&mut h.child);
        absent.push((a, b));
        commits.extend(read_report(&h.out).commits);
        for w in ws.iter_mut() {
            sleep_ms(rng.random_range(50..600));
            kill9_child(&mut w.child);
        }
        for w in &ws {
            let r = read_report(&w.out);
            assert!(
                r.errors.is_empty(),
                "writer errors before the kill: {:?}",
                r.errors
            );
            assert!(r.commits.len() >= 3);
            commits.extend(r.commits);
            samples.push(r.samples);
        }
        eprintln!(
            "{db} round {round}: {} commits reported so far",
            commits.len()
        );
        check_recovered(fx, db, &commits, &absent, &samples);
    }
}

#[test]
fn writers_killed_at_random_points_rollback() {
    let seed = seed_for("writers_killed_at_random_points_rollback");
    let mut fx = Fixture::new("killrb", false);
    fx.mount();
    kill_writers_rounds(&mut fx, "kill_rb.db", "DELETE", seed, 4);
    fx.unmount();
    assert_verify(&fx.backing);
}

#[test]
fn writers_killed_at_random_points_wal() {
    let seed = seed_for("writers_killed_at_random_points_wal");
    let mut fx = Fixture::new("killwal", true);
    fx.mount();
    kill_writers_rounds(&mut fx, "kill_wal.db", "WAL", seed, 5);
    fx.unmount();
    assert_verify(&fx.backing);
}

/// `big`: one writer in two also commits multi-megabyte batches (staged in large reads and
/// large records, then checkpointed page by page), so kills land in their staging and
/// checkpoints too.
fn daemon_kill_cycles(
    fx: &mut Fixture,
    db: &str,
    journal: &str,
    seed: u64,
    cycles: usize,
    big: bool,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let wal = journal == "WAL";
    create_db(fx, db, journal);
    let mut commits = Vec::new();
    let mut samples = Vec::new();
    for cycle in 0..cycles {
        let mut ws = Vec::new();
        for k in 0..2 {
            let wid = (cycle * 10 + k + 1) as i64;
            let mut p = writer(fx, db, wid, seed, if wal { None } else { Some(journal) });
            if wal && k == 0 {
                p = p.set("ckpt_prob", 0.05).set("autockpt", 20);
            }
            if big && k == 0 {
                p = p.set("big_prob", 0.5).set("big_bytes", 4 << 20);
            }
            ws.push(spawn(fx, p, &format!("c{cycle}-w{wid}")));
        }
        for w in ws.iter_mut() {
            wait_commits(w, 2);
        }
        sleep_ms(rng.random_range(100..1200));
        let pid = fx.daemon_pid().unwrap();
        fx.kill9();
        eprintln!("cycle {cycle}: killed sqlfs daemon {pid}");
        for w in ws.iter_mut() {
            if wait_timeout(&mut w.child, Duration::from_secs(15)).is_none() {
                eprintln!("writer still alive 15 s after the daemon died; killing it");
                kill9_child(&mut w.child);
            }
            let r = read_report(&w.out);
            eprintln!(
                "  writer {}: {} commits, errors {:?}",
                w.out.display(),
                r.commits.len(),
                r.errors
            );
            commits.extend(r.commits);
            samples.push(r.samples);
        }
        fx.mount();
        check_recovered(fx, db, &commits, &[], &samples);
    }
}

#[test]
fn daemon_killed_mid_workload_rollback() {
    let seed = seed_for("daemon_killed_mid_workload_rollback");
    let mut fx = Fixture::new("daemonrb", true);
    fx.mount();
    daemon_kill_cycles(&mut fx, "dk_rb.db", "DELETE", seed, 3, false);
    fx.unmount();
    assert_verify(&fx.backing);
}

#[test]
fn daemon_killed_mid_workload_wal() {
    let seed = seed_for("daemon_killed_mid_workload_wal");
    let mut fx = Fixture::new("daemonwal", false);
    fx.mount();
    daemon_kill_cycles(&mut fx, "dk_wal.db", "WAL", seed, 3, false);
    fx.unmount();
    assert_verify(&fx.backing);
}

/// The daemon killed while large WAL transactions are staged and checkpointed: every commit
/// a writer saw is staged after the restart and replays to what it saw.
#[test]
fn daemon_killed_during_large_wal_transactions() {
    let seed = seed_for("daemon_killed_during_large_wal_transactions");
    let mut fx = Fixture::new("daemonbig", false);
    fx.mount();
    daemon_kill_cycles(&mut fx, "dk_big.db", "WAL", seed, 3, true);
    fx.unmount();
    assert_verify(&fx.backing);
}

/// A WAL writer killed with a spilled, uncommitted transaction leaves frames without a
/// commit marker in the WAL; the next writer overwrites them. Every later commit must
/// still be staged (deterministic: no random kill timing).
#[test]
fn wal_uncommitted_frames_overwritten_after_writer_kill() {
    let seed = seed_for("wal_uncommitted_frames_overwritten_after_writer_kill");
    let mut fx = Fixture::new("walabandon", false);
    fx.mount();
    let db = "abandon.db";
    create_db(&fx, db, "WAL");
    let mut all_commits = Vec::new();
    let mut absent = Vec::new();
    let mut samples = Vec::new();
    for round in 0..3i64 {
        let p = Params::new("hold")
            .set("append", 1)
            .set("db", fx.path(db).display())
            .set("wid", 90 + round)
            .set("seed", seed)
            .set("sync", "FULL")
            .set("autockpt", 0)
            .set("cache", 10)
            .set("pre", 3)
            .set("bytes", 1 << 20)
            .set("spill_file", format!("{}-wal", fx.path(db).display()));
        let mut h = spawn(&fx, p, &format!("hold-{round}"));
        let (a, b, wal_before) = wait_holding(&mut h);
        let wal_now = fs::metadata(fx.path(&format!("{db}-wal"))).unwrap().len();
        assert!(
            wal_now > wal_before,
            "the open transaction did not spill into the WAL"
        );
        kill9_child(&mut h.child);
        absent.push((a, b));
        all_commits.extend(read_report(&h.out).commits);
        // The next writer recovers the WAL and writes over the abandoned frames.
        let mut d = Driver::open(
            &fx.path(db),
            round + 1,
            seed,
            DriverCfg {
                append_only: true,
                ..Default::default()
            },
        );
        d.pragma("PRAGMA wal_autocheckpoint=0");
        let mut s = Vec::new();
        for t in 0..15 {
            d.random_txn().unwrap();
            s.push(d.sample(
                0.2,
                format!("round {round} txn {t} after the abandoned transaction"),
            ));
        }
        if round == 1 {
            // Restart the WAL from its beginning, then write again.
            d.pragma("PRAGMA wal_checkpoint(TRUNCATE)");
            d.random_txn().unwrap();
            s.push(d.sample(1.0, "after a TRUNCATE checkpoint"));
        }
        all_commits.extend(d.commits.clone());
        drop(d);
        samples.push(s);
        check_recovered(&fx, db, &all_commits, &absent, &samples);
    }
    fx.unmount();
    assert_verify(&fx.backing);
}
