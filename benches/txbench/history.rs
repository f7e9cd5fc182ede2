//! Rows "history view txid-N / at an instant (RFC 3339) / latest, staged: open + point query,
//! first access (ms)", "… second point query, same connection (ms)", "… full scan, first /
//! second (MB/s)", and the same of txid-N "from the file replica (staging folded)": the
//! native column is the copy `sqlfs restore --txid N` wrote to local disk, opened read-only
//! like the view. The database is `SQLFS_BENCH_HISTORY_MB` MiB with 100 small transactions
//! after it; how it is built and read is on [`history_bench`].

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection};

use crate::bulk::{bulk_load, grow_to};
use crate::cli::{last_txid, staged_log, timed_restore, wait_shipped};
use crate::harness::{open, step, Config, Rng, MB};
use crate::mount::Mount;
use crate::report::{fmt_num, Row};

/// RFC 3339 name of `ns` in UTC, milliseconds rounded up (as `.history` names its entries,
/// so that the name stands for the state after the transaction committed at `ns`).
fn rfc3339_ms(ns: u64) -> String {
    let ms = ns.div_ceil(1_000_000);
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// A fresh read-only connection.
fn open_ro(path: &Path) -> Result<Connection> {
    use rusqlite::OpenFlags;
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} read-only", path.display()))
}

/// One point query by primary key: the length of the row's payload.
fn point_query(conn: &Connection, id: u64) -> Result<i64> {
    Ok(
        conn.query_row("SELECT length(x) FROM t WHERE id = ?1", params![id], |r| {
            r.get(0)
        })?,
    )
}

/// Opens `path` read-only on a fresh connection and answers one point query: the time of
/// both together, the connection, and the answer.
fn open_and_query(path: &Path, id: u64) -> Result<(Duration, Connection, i64)> {
    let start = Instant::now();
    let conn = open_ro(path)?;
    let v = point_query(&conn, id)?;
    Ok((start.elapsed(), conn, v))
}

/// A point query on an open connection: its time and answer.
fn timed_query(conn: &Connection, id: u64) -> Result<(Duration, i64)> {
    let start = Instant::now();
    let v = point_query(conn, id)?;
    Ok((start.elapsed(), v))
}

/// A full scan of `t` on a fresh read-only connection: its time and the sum it computed.
fn timed_scan(path: &Path) -> Result<(Duration, i64)> {
    let conn = open_ro(path)?;
    let start = Instant::now();
    let sum: i64 = conn.query_row("SELECT sum(length(x)) FROM t", [], |r| r.get(0))?;
    Ok((start.elapsed(), sum))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What the history workload measured, and how its database was built.
pub struct HistoryRun {
    pub db_bytes: u64,
    pub window: (u64, u64),
    pub mid: u64,
    pub instant: String,
    pub load_secs: f64,
    pub ship_secs: f64,
    pub restore_secs: f64,
    pub fold_secs: f64,
    /// Why the view from the replica could not be read, if it could not.
    pub replica_error: Option<String>,
    pub rows: Vec<Row>,
}

/// History views of a database of `history_mb` MiB with small transactions after it, built
/// through a mount whose `--stage-limit` keeps every page staged locally, shipped to a file
/// replica. Opens `.history/txid-N/`, `.history/<instant>/` and `.history/latest/` (N in the
/// middle of the small transactions) on fresh read-only connections and answers one point
/// query, then a second one, then scans the table; the same on the copy `sqlfs restore
/// --txid N` writes to local disk. Then remounts with a small `--stage-limit`, waits until
/// staging is folded past N, and opens `.history/txid-N/` again: now from the replica.
pub fn history_bench(cfg: &Config) -> Result<HistoryRun> {
    const DB: &str = "history.db";
    const TXNS: u64 = 100;
    let mnt = cfg.work.join("history-mnt");
    let backing = cfg.work.join("history-backing");
    let replica = cfg.work.join("history-replica");
    let urls = [format!("file://{}", replica.display())];
    let log = cfg.work.join("history.log");
    let target = cfg.history_mb << 20;
    // Large enough that nothing is folded: every page of every TXID stays staged.
    let stage_limit = (4u64 << 30).max(target * 4);
    let mount = Mount::start_args(
        &mnt,
        &backing,
        &log,
        &urls,
        &["--stage-limit".into(), stage_limit.to_string()],
    )?;
    step(&format!(
        "history: building a {} MiB database, staged locally",
        cfg.history_mb
    ));
    let conn = open(&mnt.join(DB), "NORMAL")?;
    let start = Instant::now();
    grow_to(&conn, target, 40)?;
    let first = last_txid(&mnt, DB)? + 1;
    step(&format!("history: {TXNS} small transactions after it"));
    let rows: u64 = conn.query_row("SELECT max(id) FROM t", [], |r| r.get(0))?;
    let mut rng = Rng::new(11);
    for i in 0..TXNS {
        if i % 2 == 0 {
            conn.execute("INSERT INTO t(x) VALUES (?1)", params![rng.bytes(100)])?;
        } else {
            conn.execute(
                "UPDATE t SET x = ?1 WHERE id = ?2",
                params![rng.bytes(1000), 1 + rng.below(rows)],
            )?;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let last = last_txid(&mnt, DB)?;
    let load_secs = start.elapsed().as_secs_f64();
    drop(conn);
    let mid = first + (last - first) / 2;
    let (base, staged) = staged_log(&mnt, DB)?;
    if base >= mid {
        bail!("history: staging was folded past TXID {mid} (base at {base})");
    }
    let mid_ns = staged
        .iter()
        .find(|(t, _)| *t == mid)
        .map(|(_, ns)| *ns)
        .with_context(|| format!("TXID {mid} is not in `sqlfs log`"))?;
    let instant = rfc3339_ms(mid_ns);
    let shipping = Instant::now();
    wait_shipped(&mnt, DB, last, 1, Duration::from_secs(1800))?;
    let ship_secs = shipping.elapsed().as_secs_f64();

    step(&format!(
        "history: sqlfs restore --txid {mid} to local disk"
    ));
    let restored = cfg.work.join("history-restored.db");
    let (got, took) = timed_restore(&urls[0], DB, &restored, Some(mid))?;
    if got != mid {
        bail!("restore restored TXID {got}, not {mid}");
    }
    let restore_secs = took.as_secs_f64();
    let db_bytes = fs::metadata(&restored)?.len();
    let size = format!("{} MB database", fmt_num(db_bytes as f64 / MB, 0));

    // Keys: one for the first query, one far from it for the second.
    let (id1, id2) = (1 + rows / 3, 1 + rows * 2 / 3);
    let view = |name: &str| mnt.join(".history").join(name).join(DB);
    let mut out = Vec::new();

    step("history: open + point query, restored copy and staged views");
    let (n_open, n_conn, n_v1) = open_and_query(&restored, id1)?;
    let (n_q2, n_v2) = timed_query(&n_conn, id2)?;
    drop(n_conn);
    let (s_open, s_conn, s_v1) = open_and_query(&view(&format!("txid-{mid}")), id1)?;
    let (s_q2, s_v2) = timed_query(&s_conn, id2)?;
    drop(s_conn);
    if (s_v1, s_v2) != (n_v1, n_v2) {
        bail!(
            "history view txid-{mid} answers {:?}, the restored copy {:?}",
            (s_v1, s_v2),
            (n_v1, n_v2)
        );
    }
    let (t_open, t_conn, t_v1) = open_and_query(&view(&instant), id1)?;
    drop(t_conn);
    if t_v1 != n_v1 {
        bail!("history view {instant} answers {t_v1}, the restored copy (TXID {mid}) {n_v1}");
    }
    let (l_open, l_conn, _) = open_and_query(&view("latest"), id1)?;
    drop(l_conn);
    out.push(Row::time(
        format!("history view txid-N, staged: open + point query, first access, {size} (ms; goal < 1000)"),
        ms(n_open),
        ms(s_open),
    ));
    out.push(Row::time(
        "history view at an instant (RFC 3339), staged: open + point query, first access (ms)"
            .into(),
        ms(n_open),
        ms(t_open),
    ));
    out.push(Row::time(
        "history view latest, staged: open + point query, first access (ms)".into(),
        ms(n_open),
        ms(l_open),
    ));
    out.push(Row::time(
        "history view txid-N, staged: second point query, same connection (ms)".into(),
        ms(n_q2),
        ms(s_q2),
    ));

    step("history: full scans, restored copy and staged view");
    let mbs = |d: Duration| db_bytes as f64 / MB / d.as_secs_f64();
    let (n_scan1, n_sum) = timed_scan(&restored)?;
    let (n_scan2, _) = timed_scan(&restored)?;
    let (s_scan1, s_sum) = timed_scan(&view(&format!("txid-{mid}")))?;
    let (s_scan2, _) = timed_scan(&view(&format!("txid-{mid}")))?;
    if s_sum != n_sum {
        bail!("a full scan of history view txid-{mid} sums {s_sum}, of the restored copy {n_sum}");
    }
    out.push(Row::pair(
        format!("history view txid-N, staged: full scan, first, {size} (MB/s)"),
        mbs(n_scan1),
        mbs(s_scan1),
        1,
    ));
    out.push(Row::pair(
        "history view txid-N, staged: full scan, second (MB/s)".into(),
        mbs(n_scan2),
        mbs(s_scan2),
        1,
    ));
    mount.stop()?;

    // The same view once staging no longer holds TXID N: from the replica.
    step("history: remounting with a small --stage-limit, waiting for the fold");
    let mount = Mount::start_args(
        &mnt,
        &backing,
        &log.with_extension("2.log"),
        &urls,
        &["--stage-limit".into(), "1k".into()],
    )?;
    // Staging folds only closed segments (8 MiB): commit enough after the window to close
    // the one that holds it.
    {
        let conn = open(&mnt.join(DB), "NORMAL")?;
        bulk_load(&conn, 12, 10, 60)?;
    }
    let folding = Instant::now();
    let deadline = folding + Duration::from_secs(1800);
    loop {
        let (base, _) = staged_log(&mnt, DB)?;
        if base > mid {
            break;
        }
        if Instant::now() > deadline {
            bail!("staging of {DB} was not folded past TXID {mid} (base at {base})");
        }
        thread::sleep(Duration::from_millis(200));
    }
    let fold_secs = folding.elapsed().as_secs_f64();
    step("history: open + point query and full scan, view from the replica");
    let from_replica = (|| -> Result<(Duration, Duration, Duration)> {
        let (r_open, r_conn, r_v1) = open_and_query(&view(&format!("txid-{mid}")), id1)?;
        let (r_q2, r_v2) = timed_query(&r_conn, id2)?;
        drop(r_conn);
        if (r_v1, r_v2) != (n_v1, n_v2) {
            bail!(
                "history view txid-{mid} from the replica answers {:?}, the restored copy {:?}",
                (r_v1, r_v2),
                (n_v1, n_v2)
            );
        }
        let (r_scan, r_sum) = timed_scan(&view(&format!("txid-{mid}")))?;
        if r_sum != n_sum {
            bail!(
                "a full scan of history view txid-{mid} from the replica sums {r_sum}, \
                 of the restored copy {n_sum}"
            );
        }
        Ok((r_open, r_q2, r_scan))
    })();
    let daemon_log = mount.log_tail();
    mount.stop()?;
    let replica_name = format!(
        "history view txid-N, from the file replica (staging folded): open + point query, \
         first access, {size} (ms)"
    );
    let mut replica_error = None;
    match from_replica {
        Ok((r_open, r_q2, r_scan)) => {
            out.push(Row::time(replica_name, ms(n_open), ms(r_open)));
            out.push(Row::time(
                "history view txid-N, from the file replica: second point query, same \
                 connection (ms)"
                    .into(),
                ms(n_q2),
                ms(r_q2),
            ));
            out.push(Row::pair(
                "history view txid-N, from the file replica: full scan, first (MB/s)".into(),
                mbs(n_scan1),
                mbs(r_scan),
                1,
            ));
        }
        Err(e) => {
            // Reported, not fatal: the rows measured so far stand on their own.
            let why = daemon_log
                .lines()
                .rev()
                .find(|l| l.contains("cannot be served"))
                .map(|l| l.split_once("] ").map_or(l, |x| x.1).to_string())
                .unwrap_or_else(|| format!("{e:#}"));
            step(&format!("history: the view from the replica failed: {why}"));
            out.push(Row {
                name: replica_name,
                native: fmt_num(ms(n_open), 2),
                sqlfs: "fails".into(),
                ratio: "–".into(),
                other: None,
            });
            replica_error = Some(why);
        }
    }
    if !cfg.keep {
        for d in [&backing, &replica] {
            let _ = fs::remove_dir_all(d);
        }
        let _ = fs::remove_file(&restored);
    }
    Ok(HistoryRun {
        db_bytes,
        window: (first, last),
        mid,
        instant,
        load_secs,
        ship_secs,
        restore_secs,
        fold_secs,
        replica_error,
        rows: out,
    })
}
