//! Capture tests: randomised workloads through the mount; at sampled commit points the
//! page image the application saw must be found in the staged log, and replaying up to
//! that transaction must give a byte-identical database. At the end `sqlfs verify` must
//! pass, mounted and unmounted, and PRAGMA integrity_check must be ok.
mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::workload::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

#[test]
fn worker_entry() {
    worker_main();
}

/// A new database with the test schema.
fn fresh_db(path: &std::path::Path, page_size: Option<u32>, journal: &str) -> Connection {
    let c = open_db(path);
    if let Some(ps) = page_size {
        c.execute_batch(&format!("PRAGMA page_size={ps}")).unwrap();
    }
    set_journal_mode(&c, journal);
    c.execute_batch(SCHEMA).unwrap();
    c
}

/// Final state, samples, and verify for one database (no writer may be active).
fn check_db(fx: &Fixture, db: &str, samples: &[Sample]) -> Vec<LogEntry> {
    let dir = fx.cli_dir();
    let entries = check_final(&dir, &fx.path(db), db, &fx.scratch);
    let matched = check_samples(&dir, db, &entries, samples, &fx.scratch);
    let replays = samples
        .iter()
        .filter(|s| !matches!(s.image, Image::None))
        .count();
    eprintln!(
        "{db}: {} staged transactions, {} samples matched (txids {:?}..{:?}), {replays} replays compared",
        entries.len(),
        matched.len(),
        matched.first(),
        matched.last()
    );
    entries
}

/// Stop the mount cleanly and verify the backing directory offline too.
fn finish(mut fx: Fixture) {
    fx.assert_verify();
    fx.unmount();
    assert_verify(&fx.backing);
}

#[test]
fn wal_two_connections_all_checkpoint_modes() {
    let seed = seed_for("wal_two_connections_all_checkpoint_modes");
    let mut fx = Fixture::new("walck", true);
    fx.mount();
    let db = "app.db";
    let mut rng = StdRng::seed_from_u64(seed);
    drop(fresh_db(&fx.path(db), None, "WAL"));
    let mut d = [
        Driver::open(&fx.path(db), 1, seed, DriverCfg::default()),
        Driver::open(&fx.path(db), 2, seed, DriverCfg::default()),
    ];
    d[0].pragma("PRAGMA wal_autocheckpoint=10");
    d[1].pragma("PRAGMA wal_autocheckpoint=0");
    let mut samples = Vec::new();
    let mut ckpts = Vec::new();
    for i in 0..240 {
        let k = rng.random_range(0..2);
        d[k].random_txn().unwrap();
        samples.push(d[k].sample(0.04, format!("txn {i} by connection {k}")));
        if i % 40 == 39 {
            // Every mode, deterministically, plus random ones below.
            let mode = CHECKPOINT_MODES[(i / 40) % 4];
            let r: (i64, i64, i64) = d[1 - k]
                .conn
                .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .unwrap();
            ckpts.push(format!("{mode} {r:?}"));
        } else if rng.random_bool(0.06) {
            ckpts.push(d[k].random_checkpoint());
        }
        if rng.random_bool(0.03) {
            d[k].random_autocheckpoint();
        }
    }
    eprintln!("checkpoints: {ckpts:?}");
    drop(d);
    check_db(&fx, db, &samples);
    finish(fx);
}

#[test]
fn rollback_journal_modes() {
    let seed = seed_for("rollback_journal_modes");
    let mut fx = Fixture::new("rollback", false);
    fx.mount();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut all = Vec::new();
    for (i, mode) in ["DELETE", "TRUNCATE", "PERSIST"].iter().enumerate() {
        let db = format!("rb_{}.db", mode.to_lowercase());
        drop(fresh_db(&fx.path(&db), None, mode));
        let cfg = DriverCfg {
            big_prob: 0.05,
            big_bytes: 1 << 20,
            ..Default::default()
        };
        let mut d = Driver::open(&fx.path(&db), 1, seed + i as u64, cfg);
        set_journal_mode(&d.conn, mode);
        let sync = ["OFF", "NORMAL", "FULL"][rng.random_range(0..3)];
        d.exec(&format!("PRAGMA synchronous={sync}; PRAGMA cache_size=50"));
        let mut samples = Vec::new();
        for t in 0..100 {
            d.random_txn().unwrap();
            samples.push(d.sample(0.05, format!("{mode} txn {t}")));
        }
        drop(d);
        all.push((db, samples));
    }
    for (db, samples) in &all {
        check_db(&fx, db, samples);
    }
    finish(fx);
}

#[test]
fn page_sizes_512_4096_65536() {
    let seed = seed_for("page_sizes_512_4096_65536");
    let mut fx = Fixture::new("pagesize", true);
    fx.mount();
    let mut all = Vec::new();
    for ps in [512u32, 4096, 65536] {
        for mode in ["WAL", "DELETE"] {
            let db = format!("ps{ps}_{}.db", mode.to_lowercase());
            drop(fresh_db(&fx.path(&db), Some(ps), mode));
            let cfg = DriverCfg {
                max_blob: 20_000,
                big_prob: 0.05,
                big_bytes: 512 << 10,
                ..Default::default()
            };
            let mut d = Driver::open(&fx.path(&db), 1, seed ^ ps as u64, cfg);
            assert_eq!(d.pragma("PRAGMA page_size"), ps.to_string());
            let mut samples = Vec::new();
            for t in 0..40 {
                d.random_txn().unwrap();
                samples.push(d.sample(0.1, format!("page size {ps} {mode} txn {t}")));
                if mode == "WAL" && t % 10 == 9 {
                    d.random_checkpoint();
                }
            }
            drop(d);
            all.push((db, samples));
        }
    }
    for (db, samples) in &all {
        check_db(&fx, db, samples);
    }
    finish(fx);
}

#[test]
fn journal_mode_switches_vacuum_and_page_size_change() {
    let seed = seed_for("journal_mode_switches_vacuum_and_page_size_change");
    let mut fx = Fixture::new("switch", false);
    fx.mount();
    let db = "switch.db";
    drop(fresh_db(&fx.path(db), None, "WAL"));
    let mut d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
    let mut samples = Vec::new();
    let mut step = 0;
    let mut run = |d: &mut Driver, n: usize, what: &str, samples: &mut Vec<Sample>| {
        for _ in 0..n {
            d.random_txn().unwrap();
            step += 1;
            samples.push(d.sample(0.1, format!("{what} txn {step}")));
        }
    };
    run(&mut d, 30, "wal", &mut samples);
    d.random_checkpoint();
    run(&mut d, 10, "wal (frames left in the WAL)", &mut samples);
    set_journal_mode(&d.conn, "DELETE");
    samples.push(d.sample(1.0, "after WAL -> DELETE"));
    run(&mut d, 20, "delete", &mut samples);
    d.exec("VACUUM");
    samples.push(d.sample(1.0, "after VACUUM in DELETE mode"));
    set_journal_mode(&d.conn, "WAL");
    samples.push(d.sample(1.0, "after DELETE -> WAL"));
    run(&mut d, 20, "wal again", &mut samples);
    d.exec("VACUUM");
    samples.push(d.sample(1.0, "after VACUUM in WAL mode"));
    run(&mut d, 10, "wal after vacuum", &mut samples);
    set_journal_mode(&d.conn, "DELETE");
    samples.push(d.sample(0.5, "after WAL -> DELETE (2)"));
    // Change the page size of an existing database.
    d.exec("PRAGMA page_size=8192; VACUUM");
    assert_eq!(d.pragma("PRAGMA page_size"), "8192");
    samples.push(d.sample(1.0, "after page size change to 8192"));
    run(&mut d, 15, "delete, 8192-byte pages", &mut samples);
    // Incremental auto-vacuum: the file shrinks at commit.
    d.exec("PRAGMA auto_vacuum=INCREMENTAL; VACUUM");
    samples.push(d.sample(1.0, "after enabling incremental auto_vacuum"));
    d.exec("DELETE FROM t WHERE id % 2 = 0");
    samples.push(d.sample(1.0, "after deleting half the rows"));
    d.exec("PRAGMA incremental_vacuum(20)");
    samples.push(d.sample(1.0, "after incremental_vacuum(20)"));
    set_journal_mode(&d.conn, "WAL");
    run(&mut d, 10, "wal with auto_vacuum", &mut samples);
    d.exec("DELETE FROM t WHERE id % 3 = 0");
    d.exec("PRAGMA incremental_vacuum");
    samples.push(d.sample(1.0, "after incremental_vacuum in WAL mode"));
    d.random_checkpoint();
    let r: (i64, i64, i64) = d
        .conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    eprintln!("final TRUNCATE checkpoint: {r:?}");
    run(&mut d, 5, "wal after truncate", &mut samples);
    drop(d);
    check_db(&fx, db, &samples);
    finish(fx);
}

#[test]
fn large_transactions_spill_the_page_cache() {
    let seed = seed_for("large_transactions_spill_the_page_cache");
    let mut fx = Fixture::new("large", true);
    fx.mount();
    let mut all = Vec::new();
    for mode in ["WAL", "DELETE"] {
        let db = format!("large_{}.db", mode.to_lowercase());
        drop(fresh_db(&fx.path(&db), None, mode));
        let mut d = Driver::open(&fx.path(&db), 1, seed, DriverCfg::default());
        // 16 pages of cache: a multi-megabyte transaction must spill.
        d.exec("PRAGMA cache_size=16; PRAGMA cache_spill=ON");
        let mut samples = Vec::new();
        for i in 0..3 {
            d.random_txn().unwrap();
            samples.push(d.sample(0.0, format!("{mode} small {i}")));
            d.big_txn(6 << 20).unwrap();
            samples.push(d.sample(
                if i == 1 { 1.0 } else { 0.0 },
                format!("{mode} big insert {i}"),
            ));
        }
        // Rewrite nearly every page of the table in one transaction.
        d.exec("BEGIN IMMEDIATE; UPDATE t SET b = randomblob(length(b)), v = 'rewritten'; COMMIT");
        samples.push(d.sample(1.0, format!("{mode} rewrite of every row")));
        d.exec("BEGIN IMMEDIATE; DELETE FROM t WHERE seq % 2 = 1; COMMIT");
        samples.push(d.sample(0.0, format!("{mode} delete half")));
        // A large transaction that is rolled back after spilling.
        d.exec("BEGIN IMMEDIATE; UPDATE t SET b = randomblob(length(b) + 10); ROLLBACK");
        d.random_txn().unwrap();
        samples.push(d.sample(
            1.0,
            format!("{mode} after a rolled-back spilled transaction"),
        ));
        if mode == "WAL" {
            d.random_checkpoint();
        }
        drop(d);
        all.push((db, samples));
    }
    for (db, samples) in &all {
        check_db(&fx, db, samples);
    }
    finish(fx);
}

/// Large WAL transactions of every shape, each followed by a sample with its image: a bulk
/// append (frames in page order, staged through large WAL reads), a rewrite of rows in random
/// order and a spilled update (frames out of page order, read one by one), deletes, an index
/// build and a `VACUUM`; checkpoints of each mode between them. Replaying up to every TXID
/// a sample names gives, byte for byte, the database the app saw.
#[test]
fn large_wal_transactions_replay_at_every_txid() {
    let seed = seed_for("large_wal_transactions_replay_at_every_txid");
    let mut fx = Fixture::new("largeall", true);
    fx.mount();
    let db = "large_all.db";
    drop(fresh_db(&fx.path(db), None, "WAL"));
    let mut d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
    let mut samples = Vec::new();
    for i in 0..4 {
        // A small page cache in odd rounds: the transaction spills its pages as it goes.
        d.exec(if i % 2 == 1 {
            "PRAGMA cache_size=16"
        } else {
            "PRAGMA cache_size=-2000"
        });
        d.big_txn((3 + i) << 20).unwrap();
        samples.push(d.sample(1.0, format!("bulk append {i}")));
        d.random_txn().unwrap();
        samples.push(d.sample(1.0, format!("small {i}")));
        d.exec(&format!(
            "BEGIN IMMEDIATE; UPDATE t SET b = randomblob(length(b)), v = 'r{i}' \
             WHERE seq IN (SELECT seq FROM t ORDER BY random() LIMIT 400); COMMIT"
        ));
        samples.push(d.sample(1.0, format!("random rewrite {i}")));
        if i == 1 {
            d.exec("BEGIN IMMEDIATE; DELETE FROM t WHERE seq % 3 = 0; COMMIT");
            samples.push(d.sample(1.0, "delete a third"));
            d.exec("CREATE INDEX IF NOT EXISTS t_v ON t(v)");
            samples.push(d.sample(1.0, "index built"));
        }
        if i == 2 {
            d.exec("VACUUM");
            samples.push(d.sample(1.0, "vacuum"));
        }
        d.random_checkpoint();
    }
    drop(d);
    check_db(&fx, db, &samples);
    finish(fx);
}

fn multi_process(fx: &mut Fixture, db: &str, journals: &[&str], txns: u64, seed: u64) {
    let mut children = Vec::new();
    let mut logs = Vec::new();
    let mut outs = Vec::new();
    let img_dir = fx.scratch_path("images");
    fs::create_dir_all(&img_dir).unwrap();
    let wal = journals.iter().all(|j| *j == "WAL");
    for (i, j) in journals.iter().enumerate() {
        let wid = i as i64 + 1;
        let out = fx.scratch_path(&format!("w{wid}.out"));
        let log = fx.scratch_path(&format!("w{wid}.log"));
        let mut p = Params::new("writer")
            .set("db", fx.path(db).display())
            .set("wid", wid)
            .set("seed", seed)
            .set("out", out.display())
            .set("txns", txns)
            .set("sample_prob", 1.0)
            .set("image_prob", 0.05)
            .set("img_dir", img_dir.display())
            .set("big_prob", 0.02)
            .set("big_bytes", 1 << 20)
            .set("sleep_ms", 2);
        if wal {
            p = p.set("autockpt", [1000, 100, 10, 0][i % 4]);
            if i == 0 {
                p = p.set("ckpt_prob", 0.1);
            }
        } else {
            p = p.set("journal", j).set("cache", 100);
        }
        children.push(spawn_worker(&p, &log));
        logs.push(log);
        outs.push(out);
    }
    wait_workers(&mut children, &logs, Duration::from_secs(240));
    let dir = fx.cli_dir();
    let entries = check_final(&dir, &fx.path(db), db, &fx.scratch);
    let mut total = 0;
    for out in &outs {
        let r = read_report(out);
        assert!(r.errors.is_empty(), "worker errors: {:?}", r.errors);
        assert!(r.done, "worker {} did not finish", out.display());
        assert_eq!(r.commits.len() as u64, txns);
        check_samples(&dir, db, &entries, &r.samples, &fx.scratch);
        total += r.samples.len();
    }
    eprintln!(
        "{db}: {} staged transactions, {total} samples from {} processes matched",
        entries.len(),
        journals.len()
    );
}

#[test]
fn four_processes_wal() {
    let seed = seed_for("four_processes_wal");
    let mut fx = Fixture::new("mpwal", false).with_threads(4);
    fx.mount();
    let db = "shared.db";
    drop(fresh_db(&fx.path(db), None, "WAL"));
    multi_process(&mut fx, db, &["WAL"; 4], 60, seed);
    finish(fx);
}

/// The same with kernel passthrough off: sqlfs sees every WAL write and stages each commit
/// from the write that completes it (the path used where passthrough is unavailable).
#[test]
fn four_processes_wal_write_through() {
    let seed = seed_for("four_processes_wal_write_through");
    let mut fx = Fixture::new("mpwal-wt", false).with_threads(4);
    fx.opts
        .extra_args
        .extend(["--passthrough".into(), "off".into()]);
    fx.mount();
    let db = "shared.db";
    drop(fresh_db(&fx.path(db), None, "WAL"));
    multi_process(&mut fx, db, &["WAL"; 4], 60, seed);
    assert!(
        !fx.last_daemon_log().contains("pass straight through"),
        "--passthrough off was not honoured"
    );
    finish(fx);
}

#[test]
fn three_processes_mixed_rollback_modes() {
    let seed = seed_for("three_processes_mixed_rollback_modes");
    let mut fx = Fixture::new("mprb", true).with_threads(1);
    fx.mount();
    let db = "shared_rb.db";
    drop(fresh_db(&fx.path(db), None, "DELETE"));
    multi_process(&mut fx, db, &["DELETE", "TRUNCATE", "PERSIST"], 40, seed);
    finish(fx);
}

fn cli_script(rng: &mut StdRng, w: u32, ntx: usize) -> String {
    let mut s = String::from(".timeout 20000\n");
    for i in 0..ntx {
        s += "BEGIN IMMEDIATE;\n";
        for j in 0..rng.random_range(1..10) {
            let len = if rng.random_bool(0.1) {
                rng.random_range(2000..20000)
            } else {
                rng.random_range(0..300)
            };
            s += &format!("INSERT INTO t(w, seq, v, b) VALUES ({w}, {i}, 'cli-{w}-{i}-{j}', randomblob({len}));\n");
        }
        if rng.random_bool(0.3) {
            s += &format!(
                "UPDATE t SET v = v || '+' WHERE w = {w} AND seq = {};\n",
                rng.random_range(0..=i)
            );
        }
        if rng.random_bool(0.1) {
            s += &format!(
                "DELETE FROM t WHERE w = {w} AND seq = {};\n",
                rng.random_range(0..=i)
            );
        }
        s += "COMMIT;\n";
    }
    s
}

#[test]
fn sqlite3_shell_workloads() {
    let seed = seed_for("sqlite3_shell_workloads");
    let mut fx = Fixture::new("shell", true);
    fx.mount();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut all = Vec::new();
    for mode in ["WAL", "DELETE"] {
        let db = format!("shell_{}.db", mode.to_lowercase());
        let path = fx.path(&db);
        let o = sqlite3_cli(
            &path,
            &format!(
                "PRAGMA journal_mode={mode};\nCREATE TABLE t(id INTEGER PRIMARY KEY, w INTEGER, seq INTEGER, v TEXT, b BLOB);\n\
                 CREATE INDEX t_w ON t(w, seq);\n"
            ),
        );
        assert!(o.ok(), "{}", o.describe());
        let observer = open_db(&path);
        let mut samples = vec![sample(&observer, true, format!("{mode} after create"))];
        for round in 0..4u32 {
            let mut kids = Vec::new();
            for k in 0..2u32 {
                let w = round * 2 + k;
                let script = cli_script(&mut rng, w, 20);
                let log = fx.scratch_path(&format!("shell-{mode}-{w}.log"));
                let (child, feeder) = spawn_sqlite3(&path, script, &log);
                kids.push((child, feeder, log));
            }
            for (mut child, feeder, log) in kids {
                let st =
                    wait_timeout(&mut child, Duration::from_secs(120)).expect("sqlite3 shell hung");
                feeder.join().unwrap();
                assert!(
                    st.success(),
                    "sqlite3 shell failed ({st}):\n{}",
                    file_tail(&log, 3000)
                );
            }
            samples.push(sample(
                &observer,
                true,
                format!("{mode} after shell round {round}"),
            ));
            if round == 1 {
                let maint = if mode == "WAL" {
                    "PRAGMA wal_checkpoint(TRUNCATE);\nVACUUM;\n"
                } else {
                    "VACUUM;\n"
                };
                let o = sqlite3_cli(&path, &format!(".timeout 20000\n{maint}"));
                assert!(o.ok(), "{}", o.describe());
                samples.push(sample(
                    &observer,
                    true,
                    format!("{mode} after shell VACUUM"),
                ));
            }
        }
        drop(observer);
        all.push((db, samples));
    }
    for (db, samples) in &all {
        check_db(&fx, db, samples);
    }
    finish(fx);
}

#[test]
fn databases_in_subdirectories() {
    let seed = seed_for("databases_in_subdirectories");
    let mut fx = Fixture::new("subdir", false);
    fx.mount();
    fs::create_dir_all(fx.path("sub/deeper")).unwrap();
    let mut all = Vec::new();
    for (db, mode) in [("sub/deeper/x.db", "WAL"), ("sub/y.db", "DELETE")] {
        drop(fresh_db(&fx.path(db), None, mode));
        let mut d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
        let mut samples = Vec::new();
        for t in 0..40 {
            d.random_txn().unwrap();
            samples.push(d.sample(0.1, format!("{db} txn {t}")));
        }
        drop(d);
        all.push((db, samples));
    }
    assert!(
        fx.backing_path("sub/deeper/x.db").exists(),
        "database not passed through to the backing directory"
    );
    for (db, samples) in &all {
        check_db(&fx, db, samples);
        assert_verify_db(&fx.mnt, db);
    }
    finish(fx);
}

fn workload(fx: &Fixture, db: &str, mode: &str, n: usize, seed: u64, label: &str) -> Vec<Sample> {
    let mut d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
    set_journal_mode(&d.conn, mode);
    d.exec(SCHEMA);
    let mut samples = Vec::new();
    for t in 0..n {
        d.random_txn().unwrap();
        samples.push(d.sample(0.15, format!("{label} txn {t}")));
    }
    samples
}

#[test]
fn database_renamed_replaced_and_deleted_while_mounted() {
    let seed = seed_for("database_renamed_replaced_and_deleted_while_mounted");
    let mut fx = Fixture::new("rename", true);
    fx.mount();
    for mode in ["DELETE", "WAL"] {
        let m = mode.to_lowercase();
        let (a, b, tmp) = (
            format!("ren_{m}_a.db"),
            format!("ren_{m}_b.db"),
            format!("ren_{m}_tmp.db"),
        );
        // 1. a.db
        let s = workload(&fx, &a, mode, 25, seed, "a");
        check_db(&fx, &a, &s);
        // 2. rename a -> b, keep writing b
        fs::rename(fx.path(&a), fx.path(&b)).unwrap();
        assert!(!fx.path(&a).exists() && fx.path(&b).exists());
        assert!(fx.backing_path(&b).exists(), "rename not passed through");
        fx.assert_verify();
        let s = workload(&fx, &b, mode, 25, seed + 1, "b after rename");
        check_db(&fx, &b, &s);
        let old = log_cmd(&fx.mnt, &a);
        eprintln!(
            "log of the renamed-away name {a}: exit {} ({} lines)",
            old.status,
            old.stdout.lines().count()
        );
        fx.assert_verify();
        // 3. build tmp, rename it over b (atomic replace)
        let s_tmp = workload(&fx, &tmp, mode, 15, seed + 2, "tmp");
        check_db(&fx, &tmp, &s_tmp);
        fs::rename(fx.path(&tmp), fx.path(&b)).unwrap();
        check_final(&fx.mnt, &fx.path(&b), &b, &fx.scratch);
        fx.assert_verify();
        // 4. delete b
        fs::remove_file(fx.path(&b)).unwrap();
        for suffix in ["-journal", "-wal", "-shm"] {
            let _ = fs::remove_file(fx.path(&format!("{b}{suffix}")));
        }
        assert!(!fx.backing_path(&b).exists(), "unlink not passed through");
        fx.assert_verify();
        // 5. a new database under the same name
        let s = workload(&fx, &b, mode, 20, seed + 3, "b recreated");
        check_db(&fx, &b, &s);
        fx.assert_verify();
        // 6. overwritten by a plain copy of a database built outside the mount, then
        //    written through SQLite again
        let outside = fx.scratch_path(&format!("outside_{m}.db"));
        {
            let mut d = Driver::new(
                fresh_db(&outside, None, "DELETE"),
                7,
                seed + 4,
                DriverCfg::default(),
            );
            for _ in 0..15 {
                d.random_txn().unwrap();
            }
        }
        fs::copy(&outside, fx.path(&b)).unwrap();
        let s = workload(&fx, &b, mode, 10, seed + 5, "b after a plain copy over it");
        check_db(&fx, &b, &s);
        // 7. VACUUM INTO a new file in the mount
        let into = format!("ren_{m}_vacuumed.db");
        open_db(&fx.path(&b))
            .execute_batch(&format!("VACUUM INTO '{}'", fx.path(&into).display()))
            .unwrap();
        let s = workload(&fx, &into, mode, 5, seed + 6, "vacuumed copy");
        check_db(&fx, &into, &s);
        fx.assert_verify();
    }
    finish(fx);
}

/// A transaction over two attached rollback-mode databases commits both atomically
/// (through a super-journal); each database's stream must capture its side.
#[test]
fn attached_databases_commit_together() {
    let seed = seed_for("attached_databases_commit_together");
    let mut fx = Fixture::new("attach", true);
    fx.mount();
    let mut rng = StdRng::seed_from_u64(seed);
    for db in ["main_a.db", "aux_b.db"] {
        drop(fresh_db(&fx.path(db), None, "DELETE"));
    }
    let c = open_db(&fx.path("main_a.db"));
    c.execute_batch(&format!("ATTACH '{}' AS b", fx.path("aux_b.db").display()))
        .unwrap();
    c.execute_batch(
        "PRAGMA b.journal_mode=DELETE; PRAGMA synchronous=FULL; PRAGMA b.synchronous=FULL",
    )
    .unwrap();
    let observer_a = open_db(&fx.path("main_a.db"));
    let observer_b = open_db(&fx.path("aux_b.db"));
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    for i in 0..40i64 {
        let n = rng.random_range(1..20);
        let len = rng.random_range(10..3000);
        c.execute_batch(&format!(
            "BEGIN IMMEDIATE; \
             INSERT INTO main.t(id, w, seq, v, b) SELECT {i} * 100 + value, 1, {i}, 'a', randomblob({len}) \
               FROM (WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s WHERE value < {n}) SELECT value FROM s); \
             INSERT INTO b.t(id, w, seq, v, b) SELECT {i} * 100 + value, 2, {i}, 'b', randomblob({len}) \
               FROM (WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s WHERE value < {n}) SELECT value FROM s); \
             COMMIT;"
        ))
        .unwrap();
        sa.push(sample(
            &observer_a,
            i % 8 == 0,
            format!("main_a after txn {i}"),
        ));
        sb.push(sample(
            &observer_b,
            i % 8 == 0,
            format!("aux_b after txn {i}"),
        ));
    }
    drop((c, observer_a, observer_b));
    check_db(&fx, "main_a.db", &sa);
    check_db(&fx, "aux_b.db", &sb);
    finish(fx);
}

/// `sqlfs verify` must notice a database changed behind the mount's back, and capture
/// must carry on consistently after a remount.
#[test]
fn verify_detects_changes_made_behind_the_mount() {
    let seed = seed_for("verify_detects_changes_made_behind_the_mount");
    let mut fx = Fixture::new("behind", false);
    fx.mount();
    let db = "app.db";
    let mut d = Driver::new(
        fresh_db(&fx.path(db), None, "DELETE"),
        1,
        seed,
        DriverCfg::default(),
    );
    for _ in 0..10 {
        d.random_txn().unwrap();
    }
    drop(d);
    fx.assert_verify();
    fx.unmount();
    assert_verify(&fx.backing);
    // Change the database directly in the backing directory.
    // (A random transaction might change nothing; inserts always do.)
    let mut d = Driver::new(open_db(&fx.backing_path(db)), 2, seed, DriverCfg::default());
    d.txn(|d| d.op_insert(5)).unwrap();
    drop(d);
    let o = verify(&fx.backing, None);
    assert!(
        !o.ok(),
        "sqlfs verify passed although the database was changed outside the mount:\n{}",
        o.describe()
    );
    let o = verify(&fx.backing, Some(db));
    assert!(
        !o.ok(),
        "sqlfs verify --db passed on a changed database:\n{}",
        o.describe()
    );
    // Replaying a transaction that does not exist fails.
    let bad = sqlfs_cli(&[
        "replay".into(),
        fx.backing.clone().into(),
        "--db".into(),
        db.into(),
        "--txid".into(),
        "999999".into(),
        "-o".into(),
        fx.scratch_path("nope.db").into(),
    ]);
    assert!(
        !bad.ok(),
        "replay of a nonexistent txid succeeded:\n{}",
        bad.describe()
    );
    // After a remount, writes through the mount are captured again from a consistent state.
    fx.mount();
    let mut d = Driver::open(&fx.path(db), 3, seed, DriverCfg::default());
    let mut samples = Vec::new();
    for t in 0..10 {
        d.random_txn().unwrap();
        samples.push(d.sample(0.3, format!("after remount txn {t}")));
    }
    drop(d);
    check_db(&fx, db, &samples);
    finish(fx);
}

/// A transaction that ends with zeros written over its journal's header (`PERSIST` mode, or
/// exclusive locking) while the connection then stays idle: the journal goes straight through
/// the kernel, so sqlfs learns of that end from its watch on the journal, and the commit must
/// be staged without any later write, sync or close (and each such commit staged apart).
#[test]
fn zeroed_journal_commits_staged_while_the_connection_idles() {
    let mut fx = Fixture::new("zeroed", false);
    fx.mount();
    for (db, mode, exclusive, sync) in [
        ("persist_full.db", "PERSIST", false, "FULL"),
        ("persist_off.db", "PERSIST", false, "OFF"),
        ("excl_delete.db", "DELETE", true, "NORMAL"),
    ] {
        let c = fresh_db(&fx.path(db), None, mode);
        if exclusive {
            let lm: String = c
                .query_row("PRAGMA locking_mode=EXCLUSIVE", [], |r| r.get(0))
                .unwrap();
            assert_eq!(lm, "exclusive");
        }
        c.execute_batch(&format!("PRAGMA synchronous={sync}"))
            .unwrap();
        let mut samples = Vec::new();
        for t in 0..6 {
            c.execute(
                "INSERT INTO t(w, seq, b) VALUES (1, ?1, randomblob(300 + ?1 * 997))",
                [t],
            )
            .unwrap();
            let s = sample(&c, t % 2 == 0, format!("{db}: commit {t}"));
            let dir = fx.cli_dir();
            wait_for(
                Duration::from_secs(20),
                50,
                || {
                    log_entries(&dir, db)
                        .iter()
                        .any(|e| e.checksum == s.checksum)
                },
                || {
                    format!(
                        "{db} ({mode}, exclusive {exclusive}, synchronous={sync}): commit {t} (checksum {:016x}) not staged after 20 s of an idle connection; log: {:?}",
                        s.checksum,
                        log_entries(&dir, db).last().map(|e| e.line.clone())
                    )
                },
            );
            samples.push(s);
        }
        drop(c);
        check_db(&fx, db, &samples);
    }
    finish(fx);
}

#[test]
fn exclusive_locking_mode() {
    let seed = seed_for("exclusive_locking_mode");
    let mut fx = Fixture::new("exclusive", false);
    fx.mount();
    let mut all = Vec::new();
    for mode in ["WAL", "DELETE", "TRUNCATE"] {
        let db = format!("excl_{}.db", mode.to_lowercase());
        let c = open_db(&fx.path(&db));
        let lm: String = c
            .query_row("PRAGMA locking_mode=EXCLUSIVE", [], |r| r.get(0))
            .unwrap();
        assert_eq!(lm, "exclusive");
        set_journal_mode(&c, mode);
        c.execute_batch(SCHEMA).unwrap();
        let mut d = Driver::new(
            c,
            1,
            seed,
            DriverCfg {
                big_prob: 0.03,
                big_bytes: 1 << 20,
                ..Default::default()
            },
        );
        let mut samples = Vec::new();
        for t in 0..50 {
            d.random_txn().unwrap();
            samples.push(d.sample(0.1, format!("{mode} exclusive txn {t}")));
            if mode == "WAL" && t % 15 == 14 {
                d.random_checkpoint();
            }
        }
        if mode == "WAL" {
            assert!(
                !fx.path(&format!("{db}-shm")).exists(),
                "exclusive WAL mode should not use a -shm file"
            );
        }
        drop(d);
        all.push((db, samples));
    }
    for (db, samples) in &all {
        check_db(&fx, db, samples);
    }
    finish(fx);
}

#[test]
fn database_created_before_the_mount() {
    let seed = seed_for("database_created_before_the_mount");
    let mut fx = Fixture::new("preexisting", true);
    // Created natively in the directory that is then mounted over in place.
    for mode in ["DELETE", "WAL"] {
        let db = format!("pre_{}.db", mode.to_lowercase());
        let mut d = Driver::new(
            fresh_db(&fx.backing_path(&db), None, mode),
            1,
            seed,
            DriverCfg::default(),
        );
        for _ in 0..20 {
            d.random_txn().unwrap();
        }
    }
    fx.mount();
    let mut all = Vec::new();
    for mode in ["DELETE", "WAL"] {
        let db = format!("pre_{}.db", mode.to_lowercase());
        let mut d = Driver::open(&fx.path(&db), 2, seed, DriverCfg::default());
        let mut samples = vec![d.sample(1.0, "before the first write through the mount")];
        for t in 0..20 {
            d.random_txn().unwrap();
            samples.push(d.sample(0.2, format!("{db} txn {t} through the mount")));
        }
        drop(d);
        all.push((db, samples));
    }
    for (db, samples) in &all {
        // The state before the first write through the mount is not necessarily a staged
        // transaction; every later one is.
        check_db(&fx, db, &samples[1..]);
        eprintln!(
            "{db}: pre-mount state staged: {}",
            log_entries(&fx.mnt, db)
                .iter()
                .any(|e| e.checksum == samples[0].checksum)
        );
    }
    finish(fx);
}

/// Crosses the 1 GiB lock page (the page holding byte offset 0x40000000, which SQLite
/// never writes) with 64 KiB pages, in rollback mode and then in WAL mode, then `VACUUM`s.
#[test]
fn crossing_the_1gib_lock_page() {
    let mut fx = Fixture::new("lockpage", false);
    // Keep every transaction staged (no folding into a base) so each one can be replayed.
    fx.opts.stage_limit = Some(16 << 30);
    fx.mount();
    let db = "big.db";
    let path = fx.path(db);
    let c = open_db(&path);
    c.execute_batch("PRAGMA page_size=65536; PRAGMA journal_mode=DELETE; PRAGMA synchronous=OFF; PRAGMA cache_size=-65536;")
        .unwrap();
    c.execute_batch("CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB)")
        .unwrap();
    let lock_page: i64 = 0x4000_0000 / 65536 + 1;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut last_pc = 0i64;
    loop {
        c.execute_batch(
            "BEGIN; WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < 2000) \
             INSERT INTO big(b) SELECT randomblob(60000) FROM s; COMMIT;",
        )
        .unwrap();
        let pc: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        if pc > lock_page && last_pc < lock_page {
            samples.push(sample_to_file(
                &c,
                fx.scratch_path("crossing.img"),
                format!("first commit past the lock page ({pc} pages)"),
            ));
        }
        last_pc = pc;
        if pc > lock_page + 2000 {
            break;
        }
    }
    eprintln!(
        "rollback phase: {last_pc} pages after {:?}",
        started.elapsed()
    );
    // Rewrite rows on both sides of the lock page, then the same in WAL mode.
    c.execute_batch("UPDATE big SET b = randomblob(60000) WHERE id % 997 = 0")
        .unwrap();
    set_journal_mode(&c, "WAL");
    c.execute_batch("UPDATE big SET b = randomblob(60000) WHERE id % 1009 = 1")
        .unwrap();
    c.execute_batch("DELETE FROM big WHERE id % 101 = 0")
        .unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    c.execute_batch("UPDATE big SET b = randomblob(100) WHERE id % 1013 = 2")
        .unwrap();
    samples.push(sample_to_file(
        &c,
        fx.scratch_path("final.img"),
        "after WAL updates around the lock page",
    ));
    // A `VACUUM` in WAL mode gives every page but the lock page a frame: staging starts that
    // commit's checksum afresh, with only the lock page's old version kept.
    c.execute_batch("VACUUM").unwrap();
    let pc: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    assert!(pc > lock_page, "the database shrank below the lock page");
    let live = sample_to_file(
        &c,
        fx.scratch_path("vacuumed.img"),
        format!("after a VACUUM in WAL mode ({pc} pages)"),
    );
    let live_checksum = live.checksum;
    samples.push(live);
    drop(c);
    let entries = log_entries(&fx.mnt, db);
    assert_gap_free(&entries, db);
    assert_eq!(
        entries.last().unwrap().checksum,
        live_checksum,
        "last staged transaction is not the live state"
    );
    check_samples(&fx.mnt, db, &entries, &samples, &fx.scratch);
    for s in &samples {
        if let Image::File(p) = &s.image {
            let _ = fs::remove_file(p);
        }
    }
    integrity_ok(&open_db(&path));
    fx.assert_verify();
    fx.unmount();
    eprintln!("lock page test took {:?}", started.elapsed());
}

/// With `--passthrough-databases`, a large transaction is staged while the app writes it
/// (`capture/ahead.rs`): one whose spilled pages are rewritten before its commit, one rolled
/// back and followed by another over the same WAL frames, a `VACUUM`, one after a WAL
/// restart. Each commit replays byte for byte, and nothing staged ahead is left behind.
#[test]
fn large_transactions_staged_while_written() {
    let mut fx = Fixture::new("ahead", false);
    fx.opts.extra_args = vec!["--passthrough-databases".into()];
    fx.opts
        .env
        .push(("RUST_LOG".into(), "info,sqlfs::capture::ahead=trace".into()));
    fx.mount();
    let db = "ahead.db";
    let path = fx.path(db);
    let c = open_db(&path);
    c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    drop(c);
    // The file of a database created through the mount goes straight through from the
    // first open after the creating one's grace.
    sleep_ms(1000);
    let c = open_db(&path);
    c.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA cache_size=200;")
        .unwrap();
    let insert = |n: u32| {
        c.execute(
            "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < ?1) \
             INSERT INTO t(v) SELECT randomblob(1000) FROM s",
            [n],
        )
        .unwrap();
    };
    // Time for the watcher to stage what was written so far.
    let pause = || sleep_ms(400);
    let mut samples = Vec::new();
    insert(8000);
    samples.push(sample(&c, true, "8 MB committed at once"));
    // Spilled pages rewritten before the commit: rows of this transaction updated.
    c.execute_batch("BEGIN").unwrap();
    insert(12000);
    pause();
    c.execute_batch("UPDATE t SET v = randomblob(1000) WHERE id > 8000 AND id % 7 = 0")
        .unwrap();
    insert(3000);
    pause();
    c.execute_batch("COMMIT").unwrap();
    samples.push(sample(&c, true, "pages rewritten before the commit"));
    // Rolled back, then a smaller transaction over the same frames: what was staged ahead runs
    // past its commit, and nothing is staged ahead until the WAL restarts.
    c.execute_batch("BEGIN").unwrap();
    insert(12000);
    pause();
    c.execute_batch("ROLLBACK").unwrap();
    c.execute_batch("BEGIN").unwrap();
    insert(1000);
    pause();
    c.execute_batch("COMMIT").unwrap();
    samples.push(sample(
        &c,
        true,
        "a smaller transaction after a rolled-back one",
    ));
    c.execute_batch("BEGIN").unwrap();
    insert(10000);
    c.execute_batch("DELETE FROM t WHERE id % 5 = 0").unwrap();
    pause();
    c.execute_batch("COMMIT").unwrap();
    samples.push(sample(&c, true, "after a rolled-back transaction"));
    c.execute_batch("VACUUM").unwrap();
    samples.push(sample(&c, true, "VACUUM"));
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    c.execute_batch("BEGIN").unwrap();
    insert(6000);
    pause();
    c.execute_batch("COMMIT").unwrap();
    samples.push(sample(&c, true, "after a WAL restart"));
    drop(c);
    let entries = log_entries(&fx.mnt, db);
    assert_gap_free(&entries, db);
    check_samples(&fx.mnt, db, &entries, &samples, &fx.scratch);
    integrity_ok(&open_db(&path));
    fx.assert_verify();
    let log = fx.all_daemon_logs();
    // The two transactions that pause while open are staged ahead for sure; the others only
    // if the watcher looks while they are written.
    let ahead = log.matches("staged ahead:").count();
    assert!(ahead >= 2, "{ahead} transactions staged ahead; log:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("staged ahead:") && !l.contains(" 0 patched")),
        "no page was patched; log:\n{log}"
    );
    assert!(
        log.contains("staged ahead past the commit"),
        "the copy of the rolled-back transaction was not seen to run past the next commit; \
         log:\n{log}"
    );
    fx.unmount();
    for e in fs::read_dir(fx.backing.join(".sqlfs/db")).unwrap() {
        for f in fs::read_dir(e.unwrap().path().join("log")).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            assert!(name.ends_with(".seg"), "left in the log: {name}");
        }
    }
}

/// Files staged ahead of their commit in the staging logs of a fixture's databases.
fn staged_ahead_files(fx: &Fixture) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(fx.backing.join(".sqlfs/db")).unwrap() {
        let Ok(rd) = fs::read_dir(e.unwrap().path().join("log")) else {
            continue;
        };
        for f in rd {
            let f = f.unwrap();
            if !f.file_name().to_string_lossy().ends_with(".seg") {
                out.push(f.path());
            }
        }
    }
    out
}

/// sqlfs killed (`kill -9`) while a large transaction is being staged ahead of its commit:
/// the next mount removes what was staged ahead, and the state committed before it replays.
#[test]
fn sqlfs_killed_while_a_transaction_is_staged_ahead() {
    let mut fx = Fixture::new("aheadkill", false);
    fx.opts.extra_args = vec!["--passthrough-databases".into()];
    fx.mount();
    let db = "kill.db";
    let path = fx.path(db);
    let c = open_db(&path);
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); \
         WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < 4000) \
         INSERT INTO t(v) SELECT randomblob(1000) FROM s;",
    )
    .unwrap();
    let before = sample(&c, true, "committed before the kill");
    drop(c);
    sleep_ms(1000);
    let mut child = std::process::Command::new("sqlite3")
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(
                b"PRAGMA cache_size=200;\nBEGIN;\n\
                  WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < 12000) \
                  INSERT INTO t(v) SELECT randomblob(1000) FROM s;\n",
            )
            .unwrap();
        stdin.flush().unwrap();
    }
    wait_until(
        Duration::from_secs(30),
        50,
        || match staged_ahead_files(&fx).len() {
            0 => Err("none"),
            _ => Ok(()),
        },
        |_| "nothing was staged ahead of the open transaction".to_string(),
    );
    fx.kill9();
    kill9_child(&mut child);
    fx.mount();
    // The database is loaded (its log opened, and repaired) by its first event: an open.
    let c = open_db(&path);
    integrity_ok(&c);
    drop(c);
    assert!(
        staged_ahead_files(&fx).is_empty(),
        "left: {:?}",
        staged_ahead_files(&fx)
    );
    let entries = log_entries(&fx.mnt, db);
    assert_gap_free(&entries, db);
    assert_eq!(entries.last().unwrap().checksum, before.checksum);
    check_samples(&fx.mnt, db, &entries, &[before], &fx.scratch);
    fx.assert_verify();
    fx.unmount();
}

/// With a small `--stage-limit`, old transactions are folded into a local base. The log
/// then starts after the base, stays gap-free, and every later state still replays
/// byte for byte; the base itself replays too.
#[test]
fn stage_limit_folds_old_transactions() {
    let seed = seed_for("stage_limit_folds_old_transactions");
    let mut fx = Fixture::new("fold", false);
    fx.opts.stage_limit = Some(1 << 20);
    fx.mount();
    let db = "fold.db";
    drop(fresh_db(&fx.path(db), None, "WAL"));
    let mut d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
    let mut samples = Vec::new();
    for i in 0..40 {
        if i % 3 == 0 {
            d.big_txn(1 << 20).unwrap();
        } else {
            d.random_txn().unwrap();
        }
        samples.push(d.sample(0.2, format!("txn {i}")));
        if i % 10 == 9 {
            d.random_checkpoint();
        }
    }
    drop(d);
    // Folding runs in the background (the stage thread looks every 500 ms, and may fold
    // more than once, as shipping lets it): wait until there is a base that stays put for 3 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last: Option<(u64, Instant)> = None;
    let log = loop {
        let l = staged_log(&fx.mnt, db);
        let base = l.base.map(|b| b.0);
        match (base, last) {
            (Some(b), Some((lb, since))) if b == lb => {
                if since.elapsed() > Duration::from_secs(3) {
                    break l;
                }
            }
            (Some(b), _) => last = Some((b, Instant::now())),
            (None, _) => {}
        }
        assert!(
            Instant::now() < deadline,
            "nothing was folded with --stage-limit 1MiB, or folding did not settle: {l:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (base, base_size, base_sum) = log.base.unwrap();
    assert!(base > 0);
    assert_gap_free_after(&log.entries, base, db);
    // Samples older than the base are gone; from the first one still staged on, every
    // sample must be found in order.
    let first = samples
        .iter()
        .position(|s| {
            s.checksum == base_sum || log.entries.iter().any(|e| e.checksum == s.checksum)
        })
        .expect("no sample is still staged");
    let later: Vec<Sample> = samples[first..]
        .iter()
        .filter(|s| s.checksum != base_sum)
        .cloned()
        .collect();
    check_samples(&fx.mnt, db, &log.entries, &later, &fx.scratch);
    if let Some(s) = samples
        .iter()
        .find(|s| s.checksum == base_sum && !matches!(s.image, Image::None))
    {
        check_replay_against(&fx.mnt, db, base, s, &fx.scratch);
    }
    eprintln!(
        "{db}: base at txid {base} ({base_size} pages), {} staged after it; samples from #{first} checked",
        log.entries.len()
    );
    let c = open_db(&fx.path(db));
    integrity_ok(&c);
    let live = sample(&c, false, "live");
    drop(c);
    assert_eq!(
        log.entries.last().map(|e| e.checksum).unwrap_or(base_sum),
        live.checksum
    );
    fx.assert_verify();
    // Folded state survives a restart.
    fx.remount();
    check_final(&fx.mnt, &fx.path(db), db, &fx.scratch);
    fx.assert_verify();
    fx.unmount();
    assert_verify(&fx.backing);
}

/// With `--passthrough-databases` a database opened in WAL mode goes straight through the
/// kernel (its checkpoints never reach sqlfs): at every `synchronous` setting, with checkpoints after every few pages, a
/// bulk transaction, `VACUUM`, a switch to a rollback journal and back while the straight
/// handle stays open, every sampled commit replays byte for byte.
#[test]
fn straight_database_at_every_synchronous_setting() {
    let seed = seed_for("straight_database_at_every_synchronous_setting");
    let mut fx = Fixture::new("straight", true);
    fx.opts.extra_args = vec!["--passthrough-databases".into()];
    fx.opts.env = vec![(
        "RUST_LOG".into(),
        "sqlfs=info,sqlfs::capture::straight=debug".into(),
    )];
    fx.mount();
    let mut all = Vec::new();
    for sync in ["OFF", "NORMAL", "FULL"] {
        let db = format!("straight_{}.db", sync.to_lowercase());
        drop(fresh_db(&fx.path(&db), None, "WAL"));
        // Opened again in WAL mode: this handle goes straight through.
        let mut d = open_straight(&fx, &db, seed);
        d.exec(&format!(
            "PRAGMA synchronous={sync}; PRAGMA wal_autocheckpoint=8"
        ));
        let mut samples = Vec::new();
        for i in 0..40 {
            d.random_txn().unwrap();
            samples.push(d.sample(1.0, format!("{sync} txn {i}")));
        }
        d.big_txn(2 << 20).unwrap();
        samples.push(d.sample(1.0, format!("{sync} bulk")));
        d.exec("VACUUM");
        samples.push(d.sample(1.0, format!("{sync} vacuum")));
        set_journal_mode(&d.conn, "DELETE");
        samples.push(d.sample(1.0, format!("{sync} WAL -> DELETE")));
        for i in 0..5 {
            d.random_txn().unwrap();
            samples.push(d.sample(1.0, format!("{sync} delete txn {i}")));
        }
        set_journal_mode(&d.conn, "WAL");
        samples.push(d.sample(1.0, format!("{sync} DELETE -> WAL")));
        for i in 0..10 {
            d.random_txn().unwrap();
            samples.push(d.sample(1.0, format!("{sync} wal again txn {i}")));
        }
        drop(d);
        all.push((db, samples));
    }
    let log = fx.all_daemon_logs();
    for (db, samples) in &all {
        assert!(
            log.contains(&format!("{db}: its file goes straight through")),
            "{db} never went straight through:\n{}",
            fx.daemon_logs()
        );
        check_db(&fx, db, samples);
    }
    finish(fx);
}

/// A database's own `passthrough: true` in the configuration sends its file straight through
/// while the mount-wide setting keeps the others on sqlfs's side (and `passthrough: false`
/// keeps a database there under `--passthrough-databases`); both kinds are captured exactly.
#[test]
fn passthrough_per_database_setting() {
    let seed = seed_for("passthrough_per_database_setting");
    // `make test` runs this file again with the flag on every mount.
    let env_wide = std::env::var("SQLFS_TEST_MOUNT_ARGS")
        .is_ok_and(|a| a.split_whitespace().any(|w| w == "--passthrough-databases"));
    for flag in [false, true] {
        let wide = flag || env_wide;
        let mut fx = Fixture::new(&format!("per_db_straight_{flag}"), true);
        let conf = fx.root.join("sqlfs.yml");
        fs::write(
            &conf,
            "databases:\n  fast.db:\n    passthrough: true\n  slow.db:\n    passthrough: false\n",
        )
        .unwrap();
        fx.opts.extra_args = vec!["--config".into(), conf.display().to_string()];
        if flag {
            fx.opts.extra_args.push("--passthrough-databases".into());
        }
        fx.opts.env = vec![(
            "RUST_LOG".into(),
            "sqlfs=info,sqlfs::capture::straight=debug".into(),
        )];
        fx.mount();
        let mut all = Vec::new();
        for db in ["fast.db", "slow.db", "other.db"] {
            drop(fresh_db(&fx.path(db), None, "WAL"));
            let straight = db == "fast.db" || (db == "other.db" && wide);
            let mut d = if straight {
                open_straight(&fx, db, seed)
            } else {
                Driver::open(&fx.path(db), 1, seed, DriverCfg::default())
            };
            d.exec("PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=8");
            let mut samples = Vec::new();
            for i in 0..20 {
                d.random_txn().unwrap();
                samples.push(d.sample(1.0, format!("{db} txn {i}")));
            }
            d.big_txn(1 << 20).unwrap();
            samples.push(d.sample(1.0, format!("{db} bulk")));
            // `sqlfs status` says whose file goes straight through while it is open.
            let (line, o) = status_line(&fx, db);
            assert_eq!(
                line.contains("file straight through the kernel"),
                straight,
                "{db}: {line}\n{}",
                o.describe()
            );
            drop(d);
            all.push((db, samples));
        }
        let log = fx.all_daemon_logs();
        for (db, samples) in &all {
            let straight = *db == "fast.db" || (*db == "other.db" && wide);
            assert_eq!(
                log.contains(&format!("{db}: its file goes straight through")),
                straight,
                "{db} (--passthrough-databases {wide}):\n{}",
                fx.daemon_logs()
            );
            check_db(&fx, db, samples);
        }
        finish(fx);
    }
}

/// A mount with `--passthrough-databases` (the straight module's debug log on) holding `db`,
/// a WAL database of 70 MiB (above `PREFILL_MAX`: not read whole when it goes straight),
/// filled through the connection that created it (on the daemon's side).
/// `db`'s line in `sqlfs status` of `fx`'s mount, and the command's output.
fn status_line(fx: &Fixture, db: &str) -> (String, CmdOut) {
    let o = sqlfs_cli(&["status".into(), fx.mnt.as_os_str().to_os_string()]);
    let line = o
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("{db}: ")))
        .unwrap_or_default()
        .to_string();
    (line, o)
}

/// A driver on `db`, a database just created through `fx`'s mount with
/// `--passthrough-databases`, opened again until its file goes straight through. The kernel
/// hands the creating connection's close to sqlfs a moment after close returns, and a file
/// opened before that joins that handle on sqlfs's side.
fn open_straight(fx: &Fixture, db: &str, seed: u64) -> Driver {
    let mut d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
    for _ in 0..100 {
        if status_line(fx, db)
            .0
            .contains("file straight through the kernel")
        {
            break;
        }
        drop(d);
        sleep_ms(20);
        d = Driver::open(&fx.path(db), 1, seed, DriverCfg::default());
    }
    d
}

fn straight_db_past_prefill(name: &str, db: &str) -> Fixture {
    let mut fx = Fixture::new(name, true);
    fx.opts.extra_args = vec!["--passthrough-databases".into()];
    fx.opts.env = vec![(
        "RUST_LOG".into(),
        "sqlfs=info,sqlfs::capture::straight=debug".into(),
    )];
    fx.mount();
    let c = fresh_db(&fx.path(db), None, "WAL");
    c.execute_batch(
        "CREATE TABLE filler(b BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 70)
         INSERT INTO filler SELECT randomblob(1048576) FROM n;",
    )
    .unwrap();
    fx
}

/// A straight database too large to be read whole when it goes straight (`base` fills page by
/// page), at `synchronous=OFF` with checkpoints every few pages: checkpoints run ahead of
/// capture, the database goes blind and is read whole at rest; whatever the stream skips,
/// it never holds a state the app did not see, and it ends equal to the file.
#[test]
fn straight_database_larger_than_its_prefill_at_synchronous_off() {
    let seed = seed_for("straight_database_larger_than_its_prefill_at_synchronous_off");
    let db = "straight_big.db";
    let fx = straight_db_past_prefill("straightbig", db);
    let mut d = open_straight(&fx, db, seed);
    d.exec("PRAGMA synchronous=OFF; PRAGMA wal_autocheckpoint=8");
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..60 {
        d.random_txn().unwrap();
        if i % 3 == 0 {
            // Old pages the generation has not changed yet: read from the file.
            let row = rng.random_range(1..=70);
            d.exec(&format!(
                "UPDATE filler SET b = randomblob(1048576) WHERE rowid = {row}"
            ));
        }
    }
    drop(d);
    assert!(
        fx.all_daemon_logs()
            .contains(&format!("{db}: its file goes straight through")),
        "{db} never went straight through:\n{}",
        fx.daemon_logs()
    );
    let dir = fx.cli_dir();
    let entries = check_final(&dir, &fx.path(db), db, &fx.scratch);
    assert_gap_free(&entries, db);
    finish(fx);
}

/// The same database at `synchronous=NORMAL`, with transactions of many megabytes whose old
/// page versions are read from the file: each checkpoint syncs the WAL first, so the watcher
/// leaves a commit it read while a checkpoint was starting to that sync, and the database
/// never goes blind; every sampled commit is exact.
#[test]
fn straight_database_larger_than_its_prefill_at_synchronous_normal() {
    let seed = seed_for("straight_database_larger_than_its_prefill_at_synchronous_normal");
    let db = "straight_bign.db";
    let fx = straight_db_past_prefill("straightbign", db);
    let mut d = open_straight(&fx, db, seed);
    d.exec("PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=64");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut samples = Vec::new();
    for i in 0..30 {
        d.random_txn().unwrap();
        let rows: Vec<u32> = (0..8).map(|_| rng.random_range(1..=70)).collect();
        d.exec(&format!(
            "UPDATE filler SET b = randomblob(1048576) WHERE rowid IN ({})",
            rows.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
        samples.push(d.sample(1.0, format!("txn {i}")));
    }
    drop(d);
    let log = fx.all_daemon_logs();
    assert!(
        log.contains(&format!("{db}: its file goes straight through")),
        "{db} never went straight through:\n{}",
        fx.daemon_logs()
    );
    assert!(
        !log.contains("a checkpoint copied frames before sqlfs read"),
        "{db} went blind at synchronous=NORMAL:\n{}",
        fx.daemon_logs()
    );
    check_db(&fx, db, &samples);
    finish(fx);
}
