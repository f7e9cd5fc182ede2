//! Prometheus metrics (`--metrics-addr`): a plain HTTP endpoint, text exposition format.
//!
//! One thread accepts connections and answers every request with the current values; it
//! reads the same state `sqlfs status` shows and changes nothing.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::capture::Capture;
use crate::history::History;
use crate::ship::Shipper;

/// Starts serving metrics at `addr`.
pub fn serve(
    addr: SocketAddr,
    cap: Arc<Capture>,
    shippers: Vec<Arc<Shipper>>,
    history: Option<Arc<History>>,
    stage_limit: u64,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new()
        .name("sqlfs-metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = answer(conn, &cap, &shippers, history.as_deref(), stage_limit) {
                    log::debug!("metrics request: {e}");
                }
            }
        })?;
    Ok(())
}

fn answer(
    conn: TcpStream,
    cap: &Capture,
    shippers: &[Arc<Shipper>],
    history: Option<&History>,
    stage_limit: u64,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(&conn);
    let mut line = String::new();
    r.read_line(&mut line)?;
    // Skip the request headers.
    let mut h = String::new();
    while r.read_line(&mut h)? > 2 {
        h.clear();
    }
    let (status, body) = if line.starts_with("GET /metrics") || line.starts_with("GET / ") {
        ("200 OK", render(cap, shippers, history, stage_limit))
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    let mut w = &conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

/// Escapes a label value.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics text. Per-replica series leave out databases that are not replicated.
pub fn render(
    cap: &Capture,
    shippers: &[Arc<Shipper>],
    history: Option<&History>,
    stage_limit: u64,
) -> String {
    let mut o = String::new();
    let dbs = cap.databases();
    let _ = writeln!(
        o,
        "# HELP sqlfs_txid Newest captured transaction of a database.\n# TYPE sqlfs_txid gauge"
    );
    for (name, db) in &dbs {
        let txid = db.stage.last().map_or(0, |h| h.txid);
        let _ = writeln!(o, "sqlfs_txid{{db=\"{}\"}} {txid}", label(name));
    }
    let _ = writeln!(o, "# HELP sqlfs_staged_log_bytes Bytes of staged log not yet folded.\n# TYPE sqlfs_staged_log_bytes gauge");
    for (name, db) in &dbs {
        let _ = writeln!(
            o,
            "sqlfs_staged_log_bytes{{db=\"{}\"}} {}",
            label(name),
            db.stage.log_bytes()
        );
    }
    let _ = writeln!(o, "# HELP sqlfs_staging_failing 1 while a database's commits cannot be staged (a full disk); its next record is a snapshot, retried until staged.\n# TYPE sqlfs_staging_failing gauge");
    for (name, db) in &dbs {
        let failing = db.staging_failure().is_some() as u8;
        let _ = writeln!(
            o,
            "sqlfs_staging_failing{{db=\"{}\"}} {failing}",
            label(name)
        );
    }
    let _ = writeln!(o, "# HELP sqlfs_staging_errors_total Failed attempts to stage a database's records since the mount started.\n# TYPE sqlfs_staging_errors_total counter");
    for (name, db) in &dbs {
        let _ = writeln!(
            o,
            "sqlfs_staging_errors_total{{db=\"{}\"}} {}",
            label(name),
            db.stage_errors()
        );
    }
    let _ = writeln!(o, "# HELP sqlfs_stage_limit_bytes --stage-limit: staging is folded past this size once every replica has it; past {}x even before a failing or stalled replica has it.\n# TYPE sqlfs_stage_limit_bytes gauge\nsqlfs_stage_limit_bytes {stage_limit}", crate::stage::HARD_FACTOR);
    // Each family's samples in one group, as the exposition format wants.
    type Sample = fn(&Shipper, &crate::capture::Db) -> String;
    let families: [(&str, &str, Sample); 4] = [
        (
            "sqlfs_replica_txid",
            "Newest transaction of a database a restore from a replica reaches.",
            |s, db| s.held(db).to_string(),
        ),
        (
            "sqlfs_replica_lag_seconds",
            "Age of the oldest transaction a replica does not have yet (true also once staging folded it away).",
            |s, db| format!("{:.3}", s.lag(db).as_secs_f64()),
        ),
        (
            "sqlfs_replica_fenced",
            "1 if shipping stopped because another writer owns the database there.",
            |s, db| (s.is_fenced(db) as u8).to_string(),
        ),
        (
            "sqlfs_replica_needs_snapshot",
            "1 if staging was folded past what a replica holds (it fell behind past the staging hard limit); its next shipment is a snapshot.",
            |s, db| (s.needs_snapshot(db) as u8).to_string(),
        ),
    ];
    for (metric, help, value) in families {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        for s in shippers {
            let r = label(&s.describe());
            for (name, db) in dbs.iter().filter(|(n, _)| s.replicates(n)) {
                let _ = writeln!(
                    o,
                    "{metric}{{db=\"{}\",replica=\"{r}\"}} {}",
                    label(name),
                    value(s, db)
                );
            }
        }
    }
    let _ = writeln!(o, "# HELP sqlfs_replica_up 0 while the last shipment to a replica failed.\n# TYPE sqlfs_replica_up gauge");
    for s in shippers {
        let _ = writeln!(
            o,
            "sqlfs_replica_up{{replica=\"{}\"}} {}",
            label(&s.describe()),
            s.last_error().is_none() as u8
        );
    }
    for (metric, help, bytes) in [
        (
            "sqlfs_replica_objects_stored_total",
            "Objects stored in a replica by this process.",
            false,
        ),
        (
            "sqlfs_replica_bytes_stored_total",
            "Bytes stored in a replica by this process.",
            true,
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for s in shippers {
            let (n, b) = s.stored_totals();
            let _ = writeln!(
                o,
                "{metric}{{replica=\"{}\"}} {}",
                label(&s.describe()),
                if bytes { b } else { n }
            );
        }
    }
    if let Some(h) = history {
        let (n, b, whole) = h.replica_reads();
        let _ = writeln!(o, "# HELP sqlfs_history_replica_reads_total Read requests .history views made to the replica.\n# TYPE sqlfs_history_replica_reads_total counter");
        let _ = writeln!(o, "sqlfs_history_replica_reads_total {n}");
        let _ = writeln!(o, "# HELP sqlfs_history_replica_bytes_total Bytes .history views read from the replica.\n# TYPE sqlfs_history_replica_bytes_total counter");
        let _ = writeln!(o, "sqlfs_history_replica_bytes_total {b}");
        let _ = writeln!(o, "# HELP sqlfs_history_whole_objects_total Objects .history views downloaded whole (format version 1 objects only).\n# TYPE sqlfs_history_whole_objects_total counter");
        let _ = writeln!(o, "sqlfs_history_whole_objects_total {whole}");
    }
    o
}
