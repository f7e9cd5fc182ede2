//! sqlfs benchmark: a plain directory against an sqlfs mount, on the same disk, in the
//! same run. Run with `make bench` (or `cargo bench --bench txbench`).
//!
//! Workloads (SQLite in WAL mode, one database file per workload):
//!  1. small autocommit INSERTs (~100-byte rows) at synchronous=NORMAL, for a fixed time;
//!  2. the same at synchronous=FULL;
//!  3. bulk load of a large table (10 MB transactions), then a warm full scan of it;
//!  4. mixed point reads / updates by primary key from several connections; beside these,
//!     4 KiB writes to a plain file and extended-attribute lookups (one kernel-to-daemon
//!     round trip each, the fixed price of every request the mount cannot pass through);
//!     and the floors, through a bare passthrough FUSE server that captures nothing
//!     (`floor.rs`, as root only): under FULL, a commit-like loop (24-byte header, 4 KiB
//!     page, fdatasync), and under each small-commit row (1, 2) and plain-file row
//!     (pwrites, appends, reads, file creation, the walk, getxattr), the same workload in
//!     the same rounds (native, sqlfs and the floor server take turns); then the bulk load,
//!     CREATE INDEX, VACUUM and mixed rows again on a mount with `--passthrough-databases`
//!     (`straight`): the bulk load and VACUUM with a floor natively that also writes and syncs
//!     each transaction's copy once more, the mixed one with its floor under it (the floor
//!     server passes every file straight);
//!  5. resident memory of the sqlfs daemon with a small database and after growing it
//!     to a large one (on a fresh mount of its own);
//!  6. replication to a file replica: commit → object lag, objects per minute, compression;
//!  7. restore: a large database plus a window of small transactions after it, shipped to a
//!     file replica and to the S3-compatible test server; `sqlfs restore` of the latest
//!     state and of a TXID in the middle of the window, from each (MB/s, the median of three
//!     restores of each target);
//!  8. replication to the S3-compatible server through a counting proxy: commit → object
//!     readable lag, and requests per minute under constant writes and idle;
//!  9. history views: a large database and small transactions after it on a mount whose
//!     staging keeps every page locally; open + one point query of `.history/txid-N/`, of
//!     `.history/<instant>/` and of `.history/latest/` on a fresh connection (the view's first
//!     access), a warm second query, and a full scan, each against the same on a copy made by
//!     `sqlfs restore --txid N` on local disk; then the same view with staging folded, so
//!     that it comes from the file replica;
//! 10. many databases in one mount (`many.rs`): commit → S3 lag with every database committing
//!     once a second, requests and CPU of an idle mount of them all, and the memory, shipping
//!     and mount time of a larger number;
//! 11. every replica backend against its loopback server (`backends.rs`: S3, SFTP via sshd, the
//!     GCS emulator, Azurite): commit → object readable lag, and restore speed beside the file
//!     replica's;
//! 12. the Litestream column (`compare.rs`): Litestream, where `make bench` could install it,
//!     replicating the native directory through workloads 1-3, 6 and 7, and a restore to an
//!     instant between two commits by it and by sqlfs.
//!
//! Before the scans, the daemon is given time to finish staging and shipping the load (until
//! it uses no CPU for half a second). Workloads 1-4 alternate between the two sides for
//! several rounds (`SQLFS_BENCH_ROUNDS`), the side that goes first swapping every round, and
//! report each side's median: this machine's speed drifts over a run, and alternating keeps
//! that drift from favouring either side. Each timed run starts after a sync(2), so that
//! neither side pays for writing back what the other left dirty.
//!
//! The results are printed as a markdown table and written to target/bench-results.md.
//! The S3-compatible server is the one `make bench` installs (as `make test` does).
//!
//! The code: this file reads the settings, starts what the chosen workloads need, runs them in
//! the order of the table and writes the report. `txbench/` holds the harness (harness.rs:
//! settings, PRNG, SQLite helpers, alternating rounds; mount.rs: the daemon; cli.rs: the sqlfs
//! CLI; report.rs: rows and the table) and one file per group of rows: commits.rs (1, 2 and the
//! mixed workload), bulk.rs (3), plainfile.rs (plain writes, getxattr), memory.rs (5),
//! replication.rs (6 and 8), restore.rs (7), history.rs (9), compare.rs (11). floor.rs is the bare passthrough
//! FUSE server of the floor rows, s3/ the S3-compatible server and its counting proxy.
//! benches/README.md lists every row with the file that measures it.
//!
//! Environment:
//!   SQLFS_BENCH_SECS     seconds per timed workload and round (default 5)
//!   SQLFS_BENCH_ROUNDS   rounds of workloads 1-4, each side once per round (default 3)
//!   SQLFS_BENCH_SCAN_MB  size of the scanned table in MB (default 200)
//!   SQLFS_BENCH_BIG_MB   size the memory workload grows its database to, MB (default 1024)
//!   SQLFS_BENCH_VACUUM_MB  size of the database CREATE INDEX and VACUUM run on, MB
//!                        (default 100, so that `make bench` stays short; 0 skips)
//!   SQLFS_BENCH_THREADS  connections in the mixed workload (default 4)
//!   SQLFS_BENCH_READS    percent of reads in the mixed workload (default 80)
//!   SQLFS_BENCH_RESTORE_MB    size of the restored database, MiB (default 1024; 0 skips)
//!   SQLFS_BENCH_RESTORE_TXNS  small transactions after it (default 300)
//!   SQLFS_BENCH_HISTORY_MB    size of the database behind the history views, MiB
//!                             (default 1024; 0 skips)
//!   SQLFS_BENCH_MANY     databases committing once a second each in the many-databases
//!                        workload (default 200; the target is 1000)
//!   SQLFS_BENCH_MANY_BIG databases of its memory and mount-time part (default 1000; the
//!                        target is 10000; 0 skips it)
//!   SQLFS_BENCH_MANY_IDLE_SECS  seconds its idle mount is watched (default 20)
//!   SQLFS_BENCH_BACKENDS_MB  size of the database restored from each backend (sftp://, gs://,
//!                        az://, S3, file) in the backends group, MiB (default 256; 0 skips)
//!   SQLFS_BENCH_S3=0     leave out everything that needs the S3-compatible server
//!   SQLFS_BENCH_ONLY     run only these workloads, comma-separated, of: autocommit, scan,
//!                        vacuum, plain, roundtrip, floor, mixed, straight, replication,
//!                        memory, restore, s3, history, many, backends, compare
//!   SQLFS_BENCH_LITESTREAM  the comparison binary (default: .venv/bin/litestream)
//!   SQLFS_S3_SERVER      the S3-compatible server binary (default: .venv/bin/moto_server)
//!   SQLFS_BENCH_DIR      where to make the work directory sqlfs-bench-work; on disk, not
//!                        tmpfs (default: target/bench-work)
//!   SQLFS_BENCH_KEEP=1   keep the work directory afterwards
//!   SQLFS_BENCH_MOUNT_ARGS  more flags for every mount, e.g. "--passthrough off"

mod floor;
mod s3;

#[path = "txbench/backends.rs"]
mod backends;
#[path = "txbench/bulk.rs"]
mod bulk;
#[path = "txbench/cli.rs"]
mod cli;
#[path = "txbench/commits.rs"]
mod commits;
#[path = "txbench/compare.rs"]
mod compare;
#[path = "txbench/harness.rs"]
mod harness;
#[path = "txbench/history.rs"]
mod history;
#[path = "txbench/many.rs"]
mod many;
#[path = "txbench/memory.rs"]
mod memory;
#[path = "txbench/mount.rs"]
mod mount;
#[path = "txbench/plainfile.rs"]
mod plainfile;
#[path = "txbench/replication.rs"]
mod replication;
#[path = "txbench/report.rs"]
mod report;
#[path = "txbench/restore.rs"]
mod restore;

use std::fs::{self, File};
use std::io::Write as _;
use std::path::Path;
use std::thread;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::bulk::{index_and_vacuum, load, load_with_copy, page_writes, scans};
use crate::commits::{autocommit, mixed, rollback_commits, rollback_reads};
use crate::harness::{alternate, alternate_all, step, Config, BUCKET, MB};
use crate::history::history_bench;
use crate::memory::memory;
use crate::mount::{force_unmount, fstype_of, mounts, Mount};
use crate::plainfile::{creates, plain_appends, plain_reads, plain_writes, round_trips, stat_walk};
use crate::replication::{replication, s3_replication};
use crate::report::{command_output, fmt_num, table, Row};
use crate::restore::restore_bench;

/// The rows "CREATE INDEX / VACUUM of an `mb` MB database`note` (MB/s)" of `mnt` beside
/// `native`.
fn index_vacuum_rows(
    native: &Path,
    mnt: &Path,
    mb: u64,
    rounds: usize,
    note: &str,
    floor: bool,
) -> Result<Vec<Row>> {
    let r = index_and_vacuum(native, mnt, mb, rounds, floor)?;
    let ((ni, si), (nv, sv), fv) = (r.index, r.vacuum, r.vacuum_floor);
    let mut rows = vec![
        Row::pair(
            format!("CREATE INDEX of a {mb} MB database{note} (MB/s)"),
            ni,
            si,
            1,
        ),
        Row::pair(
            format!("VACUUM of a {mb} MB database{note} (MB/s)"),
            nv,
            sv,
            1,
        ),
    ];
    if let Some(f) = fv {
        rows.push(Row::floor(
            "*floor:* … natively, the whole database also written once more and synced (the durable staged copy of the one transaction), no replica (MB/s)".to_string(),
            nv,
            f,
            sv,
            1,
        ));
    }
    Ok(rows)
}

fn main() -> Result<()> {
    let cfg = Config::from_env()?;
    let started = Instant::now();

    // A crashed earlier run may have left a mount behind.
    for (p, _, _) in mounts() {
        if p.starts_with(&cfg.work) {
            force_unmount(&p);
        }
    }
    if cfg.work.exists() {
        fs::remove_dir_all(&cfg.work)
            .with_context(|| format!("removing {}", cfg.work.display()))?;
    }
    let native = cfg.work.join("native");
    let mnt = cfg.work.join("mnt");
    fs::create_dir_all(&native)?;
    let fstype = fstype_of(&native);
    if fstype == "tmpfs" || fstype == "ramfs" {
        eprintln!(
            "[bench] warning: {} is on {fstype}; set SQLFS_BENCH_DIR to a directory on disk",
            cfg.work.display()
        );
    }

    let secs = cfg.secs;
    let mut rows = Vec::new();
    // The S3-compatible server, when a workload needs it: started first, so that a missing
    // one is reported before anything else runs.
    let store = if cfg.runs("s3") || cfg.runs("many") || (cfg.runs("restore") && cfg.s3) {
        step("starting the S3-compatible test server");
        Some(s3::Server::start(BUCKET)?)
    } else {
        None
    };
    let side_by_side = [
        "autocommit",
        "scan",
        "vacuum",
        "plain",
        "roundtrip",
        "mixed",
    ];
    let mount = if side_by_side.iter().any(|w| cfg.runs(w)) {
        Some(Mount::start(
            &mnt,
            &cfg.work.join("backing"),
            &cfg.work.join("sqlfs.log"),
        )?)
    } else {
        None
    };

    // The bare pass-through FUSE server of the floor rows; it needs kernel passthrough, so root.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    const FLOORED: [&str; 5] = ["autocommit", "plain", "roundtrip", "floor", "straight"];
    let floor = if root && FLOORED.iter().any(|w| cfg.runs(w)) {
        Some(floor::Floor::mount(
            &cfg.work.join("floor"),
            &cfg.work.join("floor-backing"),
        )?)
    } else {
        if FLOORED.iter().any(|w| cfg.runs(w)) {
            println!("[bench] the floor rows need root (kernel passthrough); left out");
        }
        None
    };
    let floor_dir = floor.as_ref().map(|f| f.dir().to_path_buf());
    // A row, and under it, where the floor server runs, the same workload through it in the
    // same rounds (the small commits and the plain-file rows).
    let floored = |rows: &mut Vec<Row>,
                   name: &str,
                   unit: &str,
                   f: &mut dyn FnMut(&std::path::Path) -> Result<f64>|
     -> Result<()> {
        match &floor_dir {
            Some(fd) => {
                let m = alternate_all(cfg.rounds, &[&native, &mnt, fd], f)?;
                rows.push(Row::pair(format!("{name} ({unit})"), m[0], m[1], 0));
                rows.push(Row::floor(
                    format!("*floor:* {name}, through a bare passthrough FUSE server instead of sqlfs ({unit})"),
                    m[0],
                    m[2],
                    m[1],
                    0,
                ));
            }
            None => {
                let (n, s) = alternate(cfg.rounds, &native, &mnt, f)?;
                rows.push(Row::pair(format!("{name} ({unit})"), n, s, 0));
            }
        }
        Ok(())
    };

    if cfg.runs("autocommit") {
        for sync in ["NORMAL", "FULL"] {
            step(&format!(
                "autocommit INSERT, synchronous={sync}, {secs} s each"
            ));
            floored(
                &mut rows,
                &format!("autocommit INSERT, synchronous={sync}"),
                "tx/s",
                &mut |d| autocommit(d, sync, secs),
            )?;
        }
    }

    if cfg.runs("scan") {
        step(&format!(
            "bulk load and full scan of a {} MB table",
            cfg.scan_mb
        ));
        // A load a side each round (the last one's table is scanned).
        let mb = cfg.scan_mb;
        let l = alternate_all(cfg.rounds, &[&native, &mnt], |d| load(d, mb))?;
        let (n_load, s_load) = (l[0], l[1]);
        // The scans measure reads: the mount's trailing work on the load is let finish.
        if let Some(m) = &mount {
            m.settle();
        }
        let (n_scan, s_scan) = scans(&native, &mnt, cfg.rounds)?;
        // Ten 10 MB rounds a side: the floor of the load's checkpoints, in the same run.
        let (n_pages, s_pages) = alternate(cfg.rounds * 10, &native, &mnt, page_writes)?;
        rows.push(Row::pair(
            format!("bulk load, {} MB in 10 MB transactions (MB/s)", cfg.scan_mb),
            n_load,
            s_load,
            1,
        ));
        rows.push(Row::pair(
            "checkpoint floor: 10 MB as 4 KiB pwrites + fdatasync to a file the daemon serves, not captured (MB/s)".to_string(),
            n_pages,
            s_pages,
            1,
        ));
        rows.push(Row::pair(
            format!("full scan, warm, {} MB table (MB/s)", cfg.scan_mb),
            n_scan,
            s_scan,
            1,
        ));
    }

    if cfg.runs("vacuum") {
        let mb = cfg.vacuum_mb;
        step(&format!("CREATE INDEX and VACUUM of a {mb} MB database"));
        rows.extend(index_vacuum_rows(&native, &mnt, mb, cfg.rounds, "", false)?);
    }

    if cfg.runs("plain") {
        step("plain (non-database) files: writes, reads, creation, stat walk");
        floored(
            &mut rows,
            "4 KiB pwrite to a plain file opened write-only, one at a time",
            "writes/s",
            &mut |d| plain_writes(d, secs),
        )?;
        floored(
            &mut rows,
            "4 KiB appends to a new plain file opened write-only, 256 MiB each",
            "MB/s",
            &mut |d| plain_appends(d, secs),
        )?;
        floored(
            &mut rows,
            "sequential read of a warm 64 MiB plain file, 128 KiB reads",
            "MB/s",
            &mut |d| plain_reads(d, secs),
        )?;
        floored(
            &mut rows,
            "small files created: open write-only, 4 KiB, close",
            "files/s",
            &mut |d| creates(d, secs),
        )?;
        floored(
            &mut rows,
            "directory walk, 2,000 files: readdir and lstat of each entry",
            "entries/s",
            &mut |d| stat_walk(d, secs),
        )?;
    }

    if cfg.runs("roundtrip") {
        step("extended-attribute lookups, a round trip to the filesystem each");
        floored(
            &mut rows,
            "getxattr of a missing attribute, one at a time",
            "calls/s",
            &mut |d| round_trips(d, secs.min(1.0)),
        )?;
    }

    if let (true, Some(fl)) = (cfg.runs("floor"), &floor) {
        step("commit-like fsync loop through a bare passthrough FUSE server");
        let (n, s) = alternate(
            cfg.rounds,
            &native.join("floor.bin"),
            &fl.dir().join("floor.bin"),
            |p| floor::fsync_loop(p, secs),
        )?;
        rows.push(Row::pair(
            "the floor under FULL: 24 B + 4 KiB write and fdatasync, native vs. a bare passthrough FUSE server that captures nothing (commits/s)".to_string(),
            n,
            s,
            0,
        ));
    }
    // What writeback caching would give the writes sqlfs serves itself (a checkpoint's pages on
    // the default mount): the bare server again, caching writes instead of passing them
    // through, against native. Measured, not used by sqlfs (docs/PERFORMANCE.md).
    if cfg.runs("cached") && root {
        step("writes cached by the kernel (writeback) through a bare FUSE server");
        let cached =
            floor::Floor::mount_cached(&cfg.work.join("cached"), &cfg.work.join("cached-backing"))?;
        let c = cached.dir().to_path_buf();
        let pages = alternate_all(cfg.rounds * 10, &[&native, &c], page_writes)?;
        let mb = cfg.scan_mb;
        let loads = alternate_all(cfg.rounds, &[&native, &c], |d| load(d, mb))?;
        let vacuum = if cfg.vacuum_mb > 0 {
            let note = ", through a bare FUSE server with writeback caching instead of sqlfs";
            index_vacuum_rows(&native, &c, cfg.vacuum_mb, cfg.rounds, note, false)?
        } else {
            Vec::new()
        };
        // Reads: the cached server keeps reads in the page cache as sqlfs's default mount does,
        // with none of the attribute requests a passthrough read leaves behind.
        let (threads, pct) = (cfg.threads, cfg.read_pct);
        let mut reads = Vec::new();
        let pcts = if pct == 100 {
            vec![100]
        } else {
            vec![pct, 100]
        };
        for p in pcts {
            let m = alternate_all(cfg.rounds, &[&native, &c], |d| mixed(d, threads, p, secs))?;
            reads.push(Row::pair(
                format!("*cached:* {p}% point reads / {}% updates, {threads} connections, through a bare FUSE server with writeback caching instead of sqlfs (ops/s)", 100 - p),
                m[0],
                m[1],
                0,
            ));
        }
        cached.stop()?;
        rows.push(Row::pair(
            "*cached:* checkpoint pattern (10 MB as 4 KiB pwrites + fdatasync) through a bare FUSE server with writeback caching instead of sqlfs (MB/s)".to_string(),
            pages[0],
            pages[1],
            1,
        ));
        rows.push(Row::pair(
            format!("*cached:* bulk load, {mb} MB in 10 MB transactions, through a bare FUSE server with writeback caching instead of sqlfs (MB/s)"),
            loads[0],
            loads[1],
            1,
        ));
        rows.extend(vacuum);
        rows.extend(reads);
    }
    if cfg.runs("cached") && !root {
        println!("[bench] the cached rows need root (mounting the bare server); left out");
    }
    if cfg.runs("mixed") {
        let (threads, pct) = (cfg.threads, cfg.read_pct);
        step(&format!(
            "mixed {pct}% reads / {}% updates, {threads} connections, {secs} s each",
            100 - pct
        ));
        let (n, s) = alternate(cfg.rounds, &native, &mnt, |d| mixed(d, threads, pct, secs))?;
        rows.push(Row::pair(
            format!(
                "mixed {pct}% point reads / {}% updates, {threads} connections (ops/s)",
                100 - pct
            ),
            n,
            s,
            0,
        ));
        let (n, s) = alternate(cfg.rounds, &native, &mnt, |d| rollback_reads(d, secs))?;
        rows.push(Row::pair(
            "point reads by primary key, rollback-journal (DELETE) database, one connection (reads/s)".to_string(),
            n,
            s,
            0,
        ));
        let (n, s) = alternate(cfg.rounds, &native, &mnt, |d| rollback_commits(d, secs))?;
        rows.push(Row::pair(
            "1-row updates by primary key, rollback-journal (DELETE) database, synchronous=FULL, one connection (tx/s)".to_string(),
            n,
            s,
            0,
        ));
    }
    if let Some(m) = mount {
        m.stop()?;
    }

    if cfg.runs("straight") {
        // The same workloads on a mount whose WAL-mode database files go straight through
        // the kernel (`--passthrough-databases`, off by default).
        step("bulk load, VACUUM and mixed with --passthrough-databases");
        let mpd = cfg.work.join("mnt-pd");
        let backing = cfg.work.join("backing-pd");
        let replica = format!("file://{}", backing.with_extension("replica").display());
        let pd = Mount::start_args(
            &mpd,
            &backing,
            &cfg.work.join("sqlfs-pd.log"),
            &[replica],
            &["--passthrough-databases".to_string()],
        )?;
        // Beside them the same load natively with one more synced copy of each transaction:
        // the floor of any capture that keeps staging durable before a checkpoint, on this
        // disk. The three take turns, each going first once in three rounds.
        let copy = cfg.work.join("native-copy");
        fs::create_dir_all(&copy)?;
        let mb = cfg.scan_mb;
        let l = alternate_all(cfg.rounds, &[&native, &mpd, &copy], |d| {
            if d == copy {
                load_with_copy(d, mb)
            } else {
                load(d, mb)
            }
        })?;
        let (n, s, c) = (l[0], l[1], l[2]);
        let with = "with --passthrough-databases";
        rows.push(Row::pair(
            format!(
                "bulk load, {} MB in 10 MB transactions, {with} (MB/s)",
                cfg.scan_mb
            ),
            n,
            s,
            1,
        ));
        rows.push(Row::floor(
            "*floor:* … natively, each transaction also written once more and synced before the next (the durable staged copy), no replica (MB/s)".to_string(),
            n,
            c,
            s,
            1,
        ));
        if cfg.vacuum_mb > 0 {
            let note = format!(", {with}");
            rows.extend(index_vacuum_rows(
                &native,
                &mpd,
                cfg.vacuum_mb,
                cfg.rounds,
                &note,
                true,
            )?);
        }
        let (threads, pct) = (cfg.threads, cfg.read_pct);
        let name = format!(
            "mixed {pct}% point reads / {}% updates, {threads} connections",
            100 - pct
        );
        // Under it the same rounds through the floor server, which passes every file straight
        // as the flag passes databases.
        let mut dirs = vec![native.as_path(), mpd.as_path()];
        dirs.extend(floor_dir.as_deref());
        let m = alternate_all(cfg.rounds, &dirs, |d| mixed(d, threads, pct, secs))?;
        rows.push(Row::pair(format!("{name}, {with} (ops/s)"), m[0], m[1], 0));
        if let Some(f) = m.get(2) {
            rows.push(Row::floor(
                format!("*floor:* {name}, through a bare passthrough FUSE server instead of sqlfs (ops/s)"),
                m[0],
                *f,
                m[1],
                0,
            ));
        }
        pd.stop()?;
    }
    if let Some(fl) = floor {
        fl.stop()?;
    }

    if cfg.runs("replication") {
        step("replication to a file replica, 50 commits/s");
        let rep = replication(&cfg)?;
        rows.push(Row::text(
            "commit → replica object, p50 / p99 / max (ms), 1 s sync interval",
            format!("{:.0} / {:.0} / {:.0}", rep.p50_ms, rep.p99_ms, rep.max_ms),
        ));
        rows.push(Row::text(
            "replica objects written per minute: under load / idle",
            format!("{:.0} / {:.0}", rep.per_min_load, rep.per_min_idle),
        ));
        rows.push(Row::text(
            "bytes shipped / bytes staged (zstd, 100-byte text rows)",
            format!("{:.2}", rep.shipped_ratio),
        ));
    }

    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut mem_note = String::new();
    if cfg.runs("memory") {
        step("daemon memory on a fresh mount");
        let mem = memory(&cfg)?;
        for p in &mem {
            let at = if p.db_bytes == 0 {
                "idle after mount".to_string()
            } else {
                format!("{:.0} MB database", p.db_bytes as f64 / MB)
            };
            rows.push(Row::text(
                &format!("daemon VmRSS / VmHWM, {at} (MiB)"),
                format!("{:.1} / {:.1}", mib(p.rss), mib(p.hwm)),
            ));
        }
        let (first, last) = (&mem[1.min(mem.len() - 1)], &mem[mem.len() - 1]);
        mem_note = format!(
            " Daemon peak memory (VmHWM): {:.1} MiB with a {:.0} MB database, {:.1} MiB at {:.0} MB.",
            mib(first.hwm),
            first.db_bytes as f64 / MB,
            mib(last.hwm),
            last.db_bytes as f64 / MB,
        );
    }

    let mut notes = Vec::new();
    if cfg.runs("restore") {
        let r = restore_bench(&cfg, store.as_ref())?;
        for t in &r.timings {
            rows.push(Row::text(
                &format!(
                    "restore from the {} replica, {}, {} MB database (MB/s, time)",
                    t.replica,
                    t.what,
                    fmt_num(t.bytes as f64 / MB, 0)
                ),
                format!("{:.1} ({:.1} s)", t.bytes as f64 / MB / t.secs, t.secs),
            ));
        }
        notes.push(format!(
            "Restore: a database of {:.0} MB built through a mount in 10 MB transactions, then \
             {} small transactions (TXIDs {}..={}, mid-window {}). Loading it took \
             {:.0} s, shipping it to every replica {:.0} s more. The file replica is on the same \
             disk, read warm from the page cache; the S3-compatible server runs on loopback.",
            r.db_bytes as f64 / MB,
            r.txns,
            r.window.0,
            r.window.1,
            r.mid,
            r.load_secs,
            r.ship_secs,
        ));
    }

    if cfg.runs("history") {
        let h = history_bench(&cfg)?;
        rows.extend(h.rows);
        notes.push(format!(
            "History views: a database of {:.0} MB built through a mount in 10 MB \
             transactions with --stage-limit large enough that nothing is folded, then 100 small \
             transactions (TXIDs {}..={}); N = {} (mid-window), the instant {}. Loading took \
             {:.0} s, shipping it to the file replica {:.0} s more. In these rows the native \
             column is the copy `sqlfs restore --txid N` wrote to local disk ({:.1} s), opened \
             read-only like the view; the `latest` and instant rows compare with the same copy. \
             \"First access\" is the first lookup of that view name on the mount (resolution \
             included) on a fresh connection; the pages are in the kernel's page cache on both \
             sides. For times (ms) the ratio is native / sqlfs, so higher is still better. The \
             replica rows are on a remount with --stage-limit 1k, after 12 MB more \
             in two transactions and the fold of staging past N ({:.0} s); the view then reads the replica's objects.",
            h.db_bytes as f64 / MB,
            h.window.0,
            h.window.1,
            h.mid,
            h.instant,
            h.load_secs,
            h.ship_secs,
            h.restore_secs,
            h.fold_secs,
        ));
        if let Some(e) = &h.replica_error {
            notes.push(format!(
                "History view from the replica: not served; the daemon says: {e}"
            ));
        }
    }

    if cfg.runs("s3") {
        let srv = store.as_ref().expect("the server was started");
        step("replication to the S3-compatible server through a counting proxy, 50 commits/s");
        let rep = s3_replication(&cfg, srv)?;
        rows.push(Row::text(
            "commit → S3 object readable, p50 / p99 / max (ms), 1 s sync interval",
            format!("{:.0} / {:.0} / {:.0}", rep.p50_ms, rep.p99_ms, rep.max_ms),
        ));
        rows.push(Row::text(
            "S3 requests per minute: under load / idle",
            format!("{:.0} / {:.0}", rep.per_min_load, rep.per_min_idle),
        ));
        rows.push(Row::text(
            "S3 requests under load, by method",
            rep.by_method.clone(),
        ));
        notes.push(format!(
            "S3: requests counted by a proxy in front of the S3-compatible server, {:.0} s of \
             writes at 50 commits/s, then {:.0} s idle; {} level-0 segment objects.",
            rep.load_secs, rep.idle_secs, rep.objects
        ));
    }

    if cfg.runs("many") {
        let srv = store.as_ref().expect("the server was started");
        let m = many::many(&cfg, srv)?;
        let n = m.n;
        for l in &m.loads {
            // The first load is the headline; the second says what the server's priority
            // does to it.
            let at = if l.server_nice == 0 {
                ", the S3 server at the default priority".to_string()
            } else {
                format!(", the S3 server at nice {}", l.server_nice)
            };
            rows.push(Row::text(
                &format!("{n} databases committing once a second each{at}: commit → S3 object readable, p50 / p99 / max (ms)"),
                format!(
                    "{:.0} / {:.0} / {:.0}{}",
                    l.p50_ms,
                    l.p99_ms,
                    l.max_ms,
                    if l.stall_ms >= 1000.0 {
                        format!(" (the machine stood still {:.1} s)", l.stall_ms / 1e3)
                    } else {
                        String::new()
                    }
                ),
            ));
            rows.push(Row::text(
                &format!(
                    "… S3 requests per second answered ({}); CPU of the daemon / of the S3 server (% of one core)",
                    m.server
                ),
                format!(
                    "{:.0}; {:.0} / {:.0}",
                    l.req_per_sec, l.daemon_cpu_pct, l.server_cpu_pct
                ),
            ));
        }
        rows.push(Row::text(
            &format!(
                "the S3 server alone: conditional PUTs/s of 400 B objects, {} client threads (its CPU, %)",
                many::RAW_THREADS
            ),
            format!("{:.0} ({:.0})", m.raw_puts_per_sec, m.raw_server_cpu_pct),
        ));
        rows.push(Row::text(
            "… the same through the counting proxy",
            format!("{:.0}", m.raw_proxy_puts_per_sec),
        ));
        rows.push(Row::text(
            &format!(
                "{n} idle databases: S3 requests / daemon CPU (% of one core), over {:.0} s",
                m.idle_secs
            ),
            format!("{} / {:.2}", m.idle_requests, m.idle_cpu_pct),
        ));
        notes.push(format!(
            "Many databases: {n} databases under tenants/ created through one mount in {:.1} s \
             ({} writer threads); every one had its first object on the S3 replica {:.1} s \
             after the last was created. Then two loads, each database committing once a \
             second: {}. The daemon's shipping threads run at nice 10. Idle: the same data directory \
             mounted again made {} requests at start (a claim check per database) and was \
             quiet after {:.1} s; then {} requests and {:.2}% of a core over {:.0} s.",
            m.create_secs,
            many::WRITERS,
            m.first_objects_secs,
            m.loads
                .iter()
                .map(|l| format!(
                    "with the S3 server at nice {}, {} commits in {:.1} s, requests by method {}, \
                     the bench's longest 10 ms sleep {:.0} ms{}",
                    l.server_nice,
                    l.commits,
                    l.load_secs,
                    l.by_method,
                    l.stall_ms,
                    if l.stall_ms >= 1000.0 {
                        " (the machine stood still: this load's lag is not the daemon's)"
                    } else {
                        ""
                    }
                ))
                .collect::<Vec<_>>()
                .join("; "),
            m.startup_requests,
            m.startup_quiet_secs,
            m.idle_requests,
            m.idle_cpu_pct,
            m.idle_secs,
        ));
        if let Some(Err(e)) = &m.big {
            notes.push(format!(
                "{} databases in one mount: failed: {e}",
                cfg.many_big
            ));
        }
        if let Some(Ok(b)) = &m.big {
            let k = b.m;
            rows.push(Row::text(
                &format!("{k} databases in one mount: every database on the file replica (s after the last was created)"),
                format!("{:.1} ({} of {k})", b.all_on_replica_secs, b.on_replica),
            ));
            rows.push(Row::text(
                &format!("{k} databases in one mount: daemon VmRSS / VmHWM (MiB)"),
                format!("{:.1} / {:.1}", mib(b.rss_kib), mib(b.hwm_kib)),
            ));
            rows.push(Row::text(
                &format!(
                    "{k} databases in one mount: mount serving (s from start), VmRSS after (MiB)"
                ),
                format!("{:.2}, {:.1}", b.serving_secs, mib(b.remount_rss_kib)),
            ));
            notes.push(format!(
                "{k} databases created through one mount (file replica) in {:.0} s, a table and a row each.",
                b.create_secs
            ));
        }
    }

    if cfg.runs("backends") {
        let (r, n) = backends::backends(&cfg, store.as_ref())?;
        rows.extend(r);
        notes.extend(n);
    }
    if cfg.runs("compare") {
        notes.extend(compare::compare(&cfg, &mut rows));
    }

    let header = format!(
        "sqlfs benchmark, {} UTC: {} cores, Linux {}, SQLite {}, work dir on {fstype}; \
         {secs} s per timed workload; side-by-side rows are medians of {} alternating rounds.\n",
        command_output("date", &["-u", "+%Y-%m-%d %H:%M"]),
        thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        rusqlite::version(),
        cfg.rounds,
    );
    let mut footer = format!("\nratio = sqlfs / native (higher is better).{mem_note}\n");
    for n in &notes {
        footer += &format!("\n{n}\n");
    }
    let report = format!("{header}\n{}{footer}", table(&rows));
    println!("\n{report}");
    if let Some(dir) = cfg.results.parent() {
        fs::create_dir_all(dir)?;
    }
    File::create(&cfg.results)?.write_all(report.as_bytes())?;
    eprintln!(
        "[bench] wrote {} ({:.0} s in all)",
        cfg.results.display(),
        started.elapsed().as_secs_f64()
    );

    if !cfg.keep {
        fs::remove_dir_all(&cfg.work)
            .with_context(|| format!("removing {}", cfg.work.display()))?;
    }
    Ok(())
}
