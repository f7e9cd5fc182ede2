//! Randomised SQLite workloads, in process ([`Driver`]) and in worker processes (the test
//! binary re-executed with `SQLFS_TEST_WORKER` set; each test file has a `worker_entry`
//! test that calls [`worker_main`]).
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rusqlite::{params, Connection};

use super::*;

/// Row ids are `wid * ID_BASE + seq`: unique per writer, increasing per writer.
pub const ID_BASE: i64 = 1_000_000_000;

pub const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, w INTEGER NOT NULL, \
     seq INTEGER NOT NULL, v TEXT, b BLOB); CREATE INDEX IF NOT EXISTS t_w ON t(w, seq);";

pub const CHECKPOINT_MODES: [&str; 4] = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"];

#[derive(Clone, Debug)]
pub struct DriverCfg {
    /// Only inserts and updates of non-key columns: every committed id stays present.
    pub append_only: bool,
    /// Largest blob of an ordinary row.
    pub max_blob: usize,
    /// Probability that a transaction also carries a multi-megabyte batch.
    pub big_prob: f64,
    /// Size of such a batch.
    pub big_bytes: usize,
}

impl Default for DriverCfg {
    fn default() -> Self {
        DriverCfg {
            append_only: false,
            max_blob: 30_000,
            big_prob: 0.0,
            big_bytes: 2 << 20,
        }
    }
}

/// One connection running random transactions.
pub struct Driver {
    pub conn: Connection,
    pub rng: StdRng,
    pub wid: i64,
    pub seq: i64,
    pub cfg: DriverCfg,
    pub commits: Vec<(i64, i64)>,
    /// What the last transaction did (for failure messages).
    pub trace: Vec<String>,
}

pub fn rand_blob(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

pub fn rand_text(rng: &mut StdRng) -> String {
    let n = rng.random_range(0..60);
    (0..n)
        .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
        .collect()
}

impl Driver {
    pub fn new(conn: Connection, wid: i64, seed: u64, cfg: DriverCfg) -> Driver {
        let seq = conn
            .query_row(
                "SELECT coalesce(max(seq), -1) + 1 FROM t WHERE w = ?1",
                [wid],
                |r| r.get(0),
            )
            .unwrap_or(0);
        Driver {
            conn,
            rng: StdRng::seed_from_u64(seed ^ (wid as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            wid,
            seq,
            cfg,
            commits: Vec::new(),
            trace: Vec::new(),
        }
    }

    pub fn open(path: &Path, wid: i64, seed: u64, cfg: DriverCfg) -> Driver {
        Driver::new(open_db(path), wid, seed, cfg)
    }

    pub fn exec(&self, sql: &str) {
        retry_busy(|| self.conn.execute_batch(sql)).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub fn pragma(&self, sql: &str) -> String {
        retry_busy(|| {
            self.conn.query_row(sql, [], |r| {
                Ok(match r.get_ref(0)? {
                    rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
            })
        })
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Run `f` in `BEGIN IMMEDIATE … COMMIT`; roll back if it fails.
    pub fn txn<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        retry_busy(|| self.conn.execute_batch("BEGIN IMMEDIATE"))?;
        match f(self) {
            Ok(v) => match retry_busy(|| self.conn.execute_batch("COMMIT")) {
                Ok(()) => Ok(v),
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    Err(e)
                }
            },
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn blob_len(&mut self) -> usize {
        let r = self.rng.random_range(0..100);
        let max = self.cfg.max_blob.max(400);
        if r < 70 {
            self.rng.random_range(0..200)
        } else if r < 95 {
            self.rng.random_range(200..max.clamp(201, 3000))
        } else {
            self.rng.random_range(200..max)
        }
    }

    pub fn op_insert(&mut self, n: usize) -> rusqlite::Result<()> {
        for _ in 0..n {
            let seq = self.seq;
            self.seq += 1;
            let id = self.wid * ID_BASE + seq;
            let v = rand_text(&mut self.rng);
            let len = self.blob_len();
            let b = rand_blob(&mut self.rng, len);
            let mut st = self
                .conn
                .prepare_cached("INSERT INTO t(id, w, seq, v, b) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            st.execute(params![id, self.wid, seq, v, b])?;
        }
        Ok(())
    }

    pub fn op_update(&mut self) -> rusqlite::Result<()> {
        if self.rng.random_bool(0.2) {
            self.conn.execute(
                "UPDATE t SET v = coalesce(v, '') || 'u' WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 3)",
                [],
            )?;
            return Ok(());
        }
        if self.seq == 0 {
            return Ok(());
        }
        let a = self.rng.random_range(0..self.seq);
        let n = self.rng.random_range(0..5);
        let v = rand_text(&mut self.rng);
        let len = self.blob_len();
        let b = rand_blob(&mut self.rng, len);
        let mut st = self
            .conn
            .prepare_cached("UPDATE t SET v = ?1, b = ?2 WHERE w = ?3 AND seq BETWEEN ?4 AND ?5")?;
        st.execute(params![v, b, self.wid, a, a + n])?;
        Ok(())
    }

    pub fn op_delete(&mut self) -> rusqlite::Result<()> {
        if self.seq == 0 {
            return Ok(());
        }
        let a = self.rng.random_range(0..self.seq);
        let n = self.rng.random_range(0..10);
        let mut st = self
            .conn
            .prepare_cached("DELETE FROM t WHERE w = ?1 AND seq BETWEEN ?2 AND ?3")?;
        st.execute(params![self.wid, a, a + n])?;
        Ok(())
    }

    pub fn op_aux(&mut self) -> rusqlite::Result<()> {
        let k = self.rng.random_range(0..3);
        let name = format!("aux_{}_{}", self.wid, k);
        let r = self.rng.random_range(0..10);
        if r < 7 {
            self.conn.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {name}(x INTEGER, y BLOB)"
            ))?;
            let n = self.rng.random_range(1..20);
            for i in 0..n {
                let len = self.blob_len();
                let y = rand_blob(&mut self.rng, len);
                self.conn.execute(
                    &format!("INSERT INTO {name}(x, y) VALUES (?1, ?2)"),
                    params![i, y],
                )?;
            }
        } else {
            self.conn
                .execute_batch(&format!("DROP TABLE IF EXISTS {name}"))?;
        }
        Ok(())
    }

    pub fn op_index(&mut self) -> rusqlite::Result<()> {
        if self.rng.random_bool(0.5) {
            self.conn
                .execute_batch("CREATE INDEX IF NOT EXISTS t_v ON t(v)")
        } else {
            self.conn.execute_batch("DROP INDEX IF EXISTS t_v")
        }
    }

    /// Several megabytes in one transaction: new rows, and sometimes a rewrite of many
    /// existing pages.
    pub fn op_big(&mut self, bytes: usize) -> rusqlite::Result<()> {
        let mut done = 0;
        while done < bytes {
            let seq = self.seq;
            self.seq += 1;
            let len = self.rng.random_range(3000..9000);
            let b = rand_blob(&mut self.rng, len);
            let mut st = self
                .conn
                .prepare_cached("INSERT INTO t(id, w, seq, v, b) VALUES (?1, ?2, ?3, 'big', ?4)")?;
            st.execute(params![self.wid * ID_BASE + seq, self.wid, seq, b])?;
            done += len;
        }
        if self.rng.random_bool(0.5) {
            let m = self.rng.random_range(2..5);
            self.conn.execute(
                "UPDATE t SET b = randomblob(length(b)) WHERE w = ?1 AND seq % ?2 = 0",
                params![self.wid, m],
            )?;
        }
        Ok(())
    }

    fn random_body(&mut self) -> rusqlite::Result<()> {
        let nops = self.rng.random_range(1..=4);
        for _ in 0..nops {
            let r = self.rng.random_range(0..100);
            match r {
                0..=49 => {
                    let n = self.rng.random_range(1..=20);
                    self.trace.push(format!("insert {n}"));
                    self.op_insert(n)?
                }
                50..=69 => {
                    self.trace.push("update".into());
                    self.op_update()?
                }
                70..=79 if !self.cfg.append_only => {
                    self.trace.push("delete".into());
                    self.op_delete()?
                }
                80..=87 => {
                    self.trace.push("aux table".into());
                    self.op_aux()?
                }
                88..=92 if !self.cfg.append_only => {
                    self.trace.push("index".into());
                    self.op_index()?
                }
                _ => {
                    self.trace.push("insert 1".into());
                    self.op_insert(1)?
                }
            }
        }
        if self.cfg.big_prob > 0.0 && self.rng.random_bool(self.cfg.big_prob) {
            let bytes = self.cfg.big_bytes;
            self.trace.push(format!("big {bytes}"));
            self.op_big(bytes)?;
        }
        Ok(())
    }

    /// One random committed transaction; returns the range of ids it inserted
    /// (`first > last` when it inserted none). Occasionally a transaction with a
    /// rolled-back savepoint, or a fully rolled-back one first.
    pub fn random_txn(&mut self) -> rusqlite::Result<(i64, i64)> {
        self.trace.clear();
        if self.rng.random_bool(0.03) {
            // A transaction that is rolled back: it must leave no trace.
            self.trace.push("[rolled back:".into());
            retry_busy(|| self.conn.execute_batch("BEGIN IMMEDIATE"))?;
            let r = self.random_body();
            self.conn.execute_batch("ROLLBACK")?;
            r?;
            self.trace.push("]".into());
        }
        let with_savepoint = self.rng.random_bool(0.05);
        if with_savepoint {
            self.trace.push("savepoint rolled back:".into());
        }
        // Rows inserted under the rolled-back savepoint do not count.
        let first = self.txn(|d| {
            if with_savepoint {
                d.conn.execute_batch("SAVEPOINT sp")?;
                d.random_body()?;
                d.conn.execute_batch("ROLLBACK TO sp; RELEASE sp")?;
                d.trace.push("; then".into());
            }
            let first = d.seq;
            d.random_body()?;
            Ok(first)
        })?;
        let ids = (
            self.wid * ID_BASE + first,
            self.wid * ID_BASE + self.seq - 1,
        );
        self.commits.push(ids);
        Ok(ids)
    }

    /// A transaction of about `bytes` bytes of new rows.
    pub fn big_txn(&mut self, bytes: usize) -> rusqlite::Result<(i64, i64)> {
        let first = self.seq;
        self.txn(|d| d.op_big(bytes))?;
        let ids = (
            self.wid * ID_BASE + first,
            self.wid * ID_BASE + self.seq - 1,
        );
        self.commits.push(ids);
        Ok(ids)
    }

    /// A checkpoint in a random mode.
    pub fn random_checkpoint(&mut self) -> String {
        let mode = CHECKPOINT_MODES[self.rng.random_range(0..4)];
        let r: (i64, i64, i64) = retry_busy(|| {
            self.conn
                .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
        })
        .unwrap_or_else(|e| panic!("wal_checkpoint({mode}): {e}"));
        format!("{mode} {r:?}")
    }

    pub fn random_autocheckpoint(&mut self) {
        let n = [0, 1, 10, 100, 1000][self.rng.random_range(0..5)];
        self.pragma(&format!("PRAGMA wal_autocheckpoint={n}"));
    }

    /// A sample of the current state, with the image kept with probability `p_image`.
    pub fn sample(&mut self, p_image: f64, label: impl Into<String>) -> Sample {
        let keep =
            self.rng.random_bool(p_image) || std::env::var_os("SQLFS_TEST_ALL_IMAGES").is_some();
        let label = format!("{} after [{}]", label.into(), self.trace.join(" "));
        sample(&self.conn, keep, label)
    }
}

/// Pushes `db`'s staging in `fx`'s mount past its limit with transactions of 3 MiB through
/// `d` (each followed by a small one when `small_too`, a truncating checkpoint after every
/// second; at most 12, then only waiting) until it is folded to a base after TXID `past`;
/// returns (and prints) the base's TXID. Fails after `timeout`, naming `what` the fold was
/// for.
pub fn fold_past(
    fx: &Fixture,
    d: &mut Driver,
    db: &str,
    past: u64,
    small_too: bool,
    timeout: Duration,
    what: &str,
) -> u64 {
    let mut big = 0;
    wait_until(
        timeout,
        0,
        || {
            if let Some(b) = staged_log(&fx.mnt, db).base.filter(|b| b.0 > past) {
                eprintln!(
                    "{db}: folded up to TXID {} after {big} large transactions",
                    b.0
                );
                return Ok(b.0);
            }
            if big < 12 {
                d.big_txn(3 << 20).unwrap();
                if small_too {
                    d.random_txn().unwrap();
                }
                big += 1;
                if big % 2 == 0 {
                    d.exec("PRAGMA wal_checkpoint(TRUNCATE)");
                }
            } else {
                sleep_ms(200);
            }
            Err(big)
        },
        |big| {
            format!(
                "{db}: staging was not folded past TXID {past} ({what}) after {big} transactions of 3 MiB:\n{}",
                fx.daemon_logs()
            )
        },
    )
}

/// Every id range in `commits` must be fully present in table t.
pub fn assert_commits_present(conn: &Connection, commits: &[(i64, i64)], what: &str) {
    let mut st = conn
        .prepare("SELECT count(*) FROM t WHERE id BETWEEN ?1 AND ?2")
        .unwrap();
    for &(a, b) in commits {
        if a > b {
            continue;
        }
        let n: i64 = st.query_row([a, b], |r| r.get(0)).unwrap();
        assert_eq!(
            n,
            b - a + 1,
            "{what}: a transaction reported as committed (ids {a}..={b}) is missing rows"
        );
    }
}

pub fn assert_ids_absent(conn: &Connection, a: i64, b: i64, what: &str) {
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM t WHERE id BETWEEN ?1 AND ?2",
            [a, b],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        n, 0,
        "{what}: rows of an uncommitted transaction (ids {a}..={b}) are present"
    );
}

// ---------------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------------

pub const WORKER_ENV: &str = "SQLFS_TEST_WORKER";

/// Parameters of a worker, passed in one environment variable.
#[derive(Clone, Debug, Default)]
pub struct Params(pub Vec<(String, String)>);

impl Params {
    pub fn new(kind: &str) -> Params {
        Params(vec![("kind".into(), kind.into())])
    }
    pub fn set(mut self, k: &str, v: impl ToString) -> Params {
        self.0.push((k.into(), v.to_string()));
        self
    }
    fn encode(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("\u{1e}")
    }
    fn decode(s: &str) -> HashMap<String, String> {
        s.split('\u{1e}')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

fn worker_command(p: &Params) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut c = Command::new(exe);
    c.args([
        "--exact",
        "worker_entry",
        "--nocapture",
        "--test-threads=1",
        "--quiet",
    ]);
    c.env(WORKER_ENV, p.encode());
    c
}

/// Spawn a worker whose output (libtest noise, panics) goes to `log`.
pub fn spawn_worker(p: &Params, log: &Path) -> Child {
    let logf = File::create(log).unwrap();
    worker_command(p)
        .stdin(Stdio::null())
        .stdout(Stdio::from(logf.try_clone().unwrap()))
        .stderr(Stdio::from(logf))
        .spawn()
        .expect("spawn worker")
}

/// A worker driven line by line over stdin/stdout; replies start with "@@ ".
pub struct Interactive {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub log: PathBuf,
}

impl Interactive {
    pub fn spawn(p: &Params, log: &Path) -> Interactive {
        let logf = File::create(log).unwrap();
        let mut child = worker_command(p)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(logf))
            .spawn()
            .expect("spawn worker");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Interactive {
            child,
            stdin,
            stdout,
            log: log.to_path_buf(),
        }
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("worker stdin");
        self.stdin.flush().unwrap();
    }

    pub fn recv(&mut self) -> String {
        loop {
            let mut l = String::new();
            let n = self.stdout.read_line(&mut l).unwrap();
            if n == 0 {
                panic!(
                    "worker exited without replying; its stderr:\n{}",
                    file_tail(&self.log, 3000)
                );
            }
            if let Some(r) = l.trim_end().strip_prefix("@@ ") {
                return r.to_string();
            }
        }
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.recv()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        if wait_timeout(&mut self.child, Duration::from_secs(5)).is_none() {
            kill9_child(&mut self.child);
        }
    }
}

/// What a writer worker reported in its output file.
#[derive(Debug, Default)]
pub struct WorkerReport {
    pub commits: Vec<(i64, i64)>,
    pub samples: Vec<Sample>,
    pub holding: Option<(i64, i64, u64)>,
    pub done: bool,
    pub errors: Vec<String>,
}

pub fn read_report(path: &Path) -> WorkerReport {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut r = WorkerReport::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f[0] {
            "commit" if f.len() == 3 => r
                .commits
                .push((f[1].parse().unwrap(), f[2].parse().unwrap())),
            "sample" if f.len() == 5 => r.samples.push(Sample {
                checksum: u64::from_str_radix(f[1], 16).unwrap(),
                npages: f[2].parse().unwrap(),
                page_size: f[3].parse().unwrap(),
                image: if f[4] == "-" {
                    Image::None
                } else {
                    Image::File(PathBuf::from(f[4]))
                },
                label: format!("{} line {}", path.display(), r.samples.len()),
            }),
            "holding" if f.len() == 4 => {
                r.holding = Some((
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                ))
            }
            "done" => r.done = true,
            "error" => r.errors.push(line.to_string()),
            _ => {}
        }
    }
    r
}

struct Out(File);

impl Out {
    fn open(p: &str) -> Out {
        Out(OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .expect("worker out file"))
    }
    fn line(&mut self, s: &str) {
        // One write(2) per line, so a kill leaves whole lines.
        self.0.write_all(format!("{s}\n").as_bytes()).unwrap();
    }
}

fn get<'a>(p: &'a HashMap<String, String>, k: &str) -> Option<&'a str> {
    p.get(k).map(|s| s.as_str())
}

fn getn<T: std::str::FromStr>(p: &HashMap<String, String>, k: &str, d: T) -> T {
    p.get(k).map(|s| s.parse().ok().expect(k)).unwrap_or(d)
}

/// Entry point for every worker kind; a no-op unless `SQLFS_TEST_WORKER` is set.
pub fn worker_main() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let p = Params::decode(&spec);
    let code = match get(&p, "kind").unwrap_or("") {
        "writer" => run_writer(&p),
        "hold" => run_hold(&p),
        "lockctl" => run_lockctl(),
        "walpeer" => run_walpeer(),
        k => panic!("unknown worker kind {k:?}"),
    };
    std::process::exit(code);
}

fn worker_conn(p: &HashMap<String, String>) -> Connection {
    let db = get(p, "db").expect("db");
    let conn = open_db(Path::new(db));
    if let Some(l) = get(p, "locking") {
        conn.query_row(&format!("PRAGMA locking_mode={l}"), [], |_| Ok(()))
            .unwrap();
    }
    if let Some(j) = get(p, "journal") {
        set_journal_mode(&conn, j);
    }
    let sync = get(p, "sync").unwrap_or("NORMAL");
    conn.execute_batch(&format!("PRAGMA synchronous={sync}"))
        .unwrap();
    if let Some(c) = get(p, "cache") {
        conn.execute_batch(&format!("PRAGMA cache_size={c}"))
            .unwrap();
    }
    if let Some(a) = get(p, "autockpt") {
        conn.query_row(&format!("PRAGMA wal_autocheckpoint={a}"), [], |_| Ok(()))
            .unwrap();
    }
    conn
}

fn worker_driver(p: &HashMap<String, String>) -> Driver {
    let cfg = DriverCfg {
        append_only: getn(p, "append", 0u8) == 1,
        max_blob: getn(p, "max_blob", 30_000usize),
        big_prob: getn(p, "big_prob", 0.0f64),
        big_bytes: getn(p, "big_bytes", 2usize << 20),
    };
    Driver::new(
        worker_conn(p),
        getn(p, "wid", 1i64),
        getn(p, "seed", 1u64),
        cfg,
    )
}

/// Random transactions; after each commit a "commit FIRST LAST" line; samples as
/// "sample CHECKSUM NPAGES PAGESIZE IMAGE|-".
fn run_writer(p: &HashMap<String, String>) -> i32 {
    let mut out = Out::open(get(p, "out").expect("out"));
    let mut d = worker_driver(p);
    let txns: u64 = getn(p, "txns", 0);
    let sample_prob: f64 = getn(p, "sample_prob", 0.0);
    let image_prob: f64 = getn(p, "image_prob", 0.0);
    let ckpt_prob: f64 = getn(p, "ckpt_prob", 0.0);
    let sleep_max: u64 = getn(p, "sleep_ms", 0);
    let img_dir = get(p, "img_dir").map(PathBuf::from);
    let mut i = 0u64;
    while txns == 0 || i < txns {
        i += 1;
        match d.random_txn() {
            Ok((a, b)) => out.line(&format!("commit {a} {b}")),
            Err(e) => {
                out.line(&format!("error txn {i}: {e}"));
                return 3;
            }
        }
        if sample_prob > 0.0 && d.rng.random_bool(sample_prob) {
            let keep = img_dir.is_some() && d.rng.random_bool(image_prob);
            let mut img = Vec::new();
            let r = retry_busy(|| {
                img.clear();
                snapshot_with(&d.conn, |_, data| {
                    if keep {
                        img.extend_from_slice(data)
                    }
                })
            });
            match r {
                Ok((sum, n, ps)) => {
                    let path = if keep {
                        let f = img_dir
                            .as_ref()
                            .unwrap()
                            .join(format!("img-w{}-{i}.bin", d.wid));
                        fs::write(&f, &img).unwrap();
                        f.display().to_string()
                    } else {
                        "-".to_string()
                    };
                    out.line(&format!("sample {sum:016x} {n} {ps} {path}"));
                }
                Err(e) => {
                    out.line(&format!("error sample: {e}"));
                    return 3;
                }
            }
        }
        if ckpt_prob > 0.0 && d.rng.random_bool(ckpt_prob) {
            let r = d.random_checkpoint();
            out.line(&format!("checkpoint {r}"));
            if d.rng.random_bool(0.3) {
                d.random_autocheckpoint();
            }
        }
        if sleep_max > 0 {
            let ms = d.rng.random_range(0..=sleep_max);
            sleep_ms(ms);
        }
    }
    drop(d);
    out.line("done");
    0
}

/// A few committed transactions, then one large transaction left open (pages spilled to
/// the database file or the WAL), "holding FIRST LAST SIZE_BEFORE", and sleep until killed.
fn run_hold(p: &HashMap<String, String>) -> i32 {
    let mut out = Out::open(get(p, "out").expect("out"));
    let mut d = worker_driver(p);
    let pre: u64 = getn(p, "pre", 5);
    for _ in 0..pre {
        let (a, b) = d.random_txn().expect("committed txn");
        out.line(&format!("commit {a} {b}"));
    }
    let db = get(p, "db").unwrap();
    let spill_file = get(p, "spill_file")
        .map(|s| s.to_string())
        .unwrap_or_else(|| db.to_string());
    let size_before = fs::metadata(&spill_file).map(|m| m.len()).unwrap_or(0);
    let bytes: usize = getn(p, "bytes", 3 << 20);
    retry_busy(|| d.conn.execute_batch("BEGIN IMMEDIATE")).unwrap();
    let first = d.seq;
    d.conn
        .execute_batch("UPDATE t SET v = 'held-' || id")
        .unwrap();
    d.op_big(bytes).unwrap();
    let (a, b) = (d.wid * ID_BASE + first, d.wid * ID_BASE + d.seq - 1);
    out.line(&format!("holding {a} {b} {size_before}"));
    loop {
        sleep_ms(1000);
    }
}

fn lock_type(s: &str) -> libc::c_short {
    (match s {
        "r" => libc::F_RDLCK,
        "w" => libc::F_WRLCK,
        "u" => libc::F_UNLCK,
        _ => panic!("lock type {s}"),
    }) as libc::c_short
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// fcntl lock probe: "open PATH", "setlk T START LEN", "setlkw T START LEN",
/// "getlk T START LEN", "close", "pid", "exit". Replies "@@ …".
fn run_lockctl() -> i32 {
    let stdin = std::io::stdin();
    let mut fd: libc::c_int = -1;
    let reply = |s: String| {
        let mut o = std::io::stdout().lock();
        writeln!(o, "@@ {s}").unwrap();
        o.flush().unwrap();
    };
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        match f[0] {
            "open" => {
                let c = std::ffi::CString::new(f[1]).unwrap();
                // SAFETY: plain open(2).
                fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
                reply(if fd < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                });
            }
            "setlk" | "setlkw" | "getlk" => {
                // SAFETY: zeroed flock is a valid value.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = lock_type(f[1]);
                fl.l_whence = libc::SEEK_SET as libc::c_short;
                fl.l_start = f[2].parse().unwrap();
                fl.l_len = f[3].parse().unwrap();
                let cmd = match f[0] {
                    "setlk" => libc::F_SETLK,
                    "setlkw" => libc::F_SETLKW,
                    _ => libc::F_GETLK,
                };
                // SAFETY: fcntl with a valid flock pointer.
                let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
                if r < 0 {
                    reply(format!("err {}", errno()));
                } else if cmd == libc::F_GETLK {
                    reply(format_getlk(&fl));
                } else {
                    reply("ok".into());
                }
            }
            "close" => {
                // SAFETY: closing our own fd.
                unsafe { libc::close(fd) };
                fd = -1;
                reply("ok".into());
            }
            "pid" => reply(format!("{}", std::process::id())),
            "exit" => return 0,
            _ => reply(format!("unknown {line}")),
        }
    }
    0
}

pub fn format_getlk(fl: &libc::flock) -> String {
    let t = match fl.l_type as i32 {
        libc::F_RDLCK => "r",
        libc::F_WRLCK => "w",
        libc::F_UNLCK => "u",
        _ => "?",
    };
    if t == "u" {
        "getlk u".to_string()
    } else {
        format!("getlk {t} {} {} pid={}", fl.l_start, fl.l_len, fl.l_pid)
    }
}

/// A second process on a shared WAL database: "open PATH", "insert N" (one transaction),
/// "count", "sum", "ckpt MODE", "close", "exit".
fn run_walpeer() -> i32 {
    let stdin = std::io::stdin();
    let mut conn: Option<Connection> = None;
    let reply = |s: String| {
        let mut o = std::io::stdout().lock();
        writeln!(o, "@@ {s}").unwrap();
        o.flush().unwrap();
    };
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        let r: Result<String, rusqlite::Error> = (|| {
            Ok(match f[0] {
                "open" => {
                    let c = open_db(Path::new(f[1]));
                    let m: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
                    conn = Some(c);
                    m
                }
                "insert" => {
                    let c = conn.as_ref().unwrap();
                    let n: i64 = f[1].parse().unwrap();
                    retry_busy(|| c.execute_batch("BEGIN IMMEDIATE"))?;
                    c.execute("INSERT INTO p(x, y) SELECT value, randomblob(300) FROM (WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s WHERE value < ?1) SELECT value FROM s)", [n])?;
                    c.execute_batch("COMMIT")?;
                    "ok".into()
                }
                "count" => {
                    let c = conn.as_ref().unwrap();
                    let n: i64 =
                        retry_busy(|| c.query_row("SELECT count(*) FROM p", [], |r| r.get(0)))?;
                    n.to_string()
                }
                "sum" => {
                    let c = conn.as_ref().unwrap();
                    let n: i64 = retry_busy(|| {
                        c.query_row("SELECT coalesce(sum(x), 0) FROM p", [], |r| r.get(0))
                    })?;
                    n.to_string()
                }
                "ckpt" => {
                    let c = conn.as_ref().unwrap();
                    let r: (i64, i64, i64) = retry_busy(|| {
                        c.query_row(&format!("PRAGMA wal_checkpoint({})", f[1]), [], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })
                    })?;
                    format!("{r:?}")
                }
                "close" => {
                    conn = None;
                    "ok".into()
                }
                "exit" => return Err(rusqlite::Error::InvalidQuery),
                _ => format!("unknown {line}"),
            })
        })();
        match r {
            Ok(s) => reply(s),
            Err(rusqlite::Error::InvalidQuery) => return 0,
            Err(e) => reply(format!("err {e}")),
        }
    }
    0
}
