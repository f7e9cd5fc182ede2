//! `sqlfs status`: a running mount's replicas, the scan at mount, and each database's staged
//! position and place on every replica, gathered once ([`Status::gather`]) and shown as a
//! summary (many databases), in full (`--all`), or as JSON (always complete).
//!
//! Exit code 1 if any replica is failing, fenced, broken or needs a snapshot, or if a
//! database's commits cannot be staged.

use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;

use crate::capture::{Capture, ScanProgress};
use crate::ship::Shipper;

/// Above this many databases, the text is a summary unless details are asked for.
pub const SUMMARY_ABOVE: usize = 20;

#[derive(Debug, Serialize)]
pub struct Status {
    pub replicas: Vec<ReplicaStatus>,
    pub scan: ScanProgress,
    pub databases: Vec<DbStatus>,
    /// The exit code: 1 if anything is unwell.
    pub code: i32,
    /// The per-database folding limit (`--stage-limit`) and its hard limit, in bytes.
    pub stage_limit: u64,
    pub stage_hard_limit: u64,
}

#[derive(Debug, Serialize)]
pub struct ReplicaStatus {
    pub replica: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DbStatus {
    pub name: String,
    pub txid: u64,
    pub staged_bytes: u64,
    /// Why commits are not being staged, since when (RFC 3339), and how many wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staging_failing: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    pub commits_waiting: u64,
    /// `replicate: false`: staged, shipped nowhere.
    pub replicated: bool,
    /// Handles on its file that go straight through the kernel now
    /// (`--passthrough-databases`, `passthrough: true`).
    pub straight_handles: u32,
    /// Staging is over `--stage-limit`, kept for a replica that is behind.
    pub over_stage_limit: bool,
    pub replicas: Vec<DbReplica>,
}

#[derive(Debug, Serialize)]
pub struct DbReplica {
    pub replica: String,
    /// What a restore can follow: the chain held contiguously.
    pub txid: u64,
    /// The position the shipper recorded (beyond `txid` only if the chain is broken).
    pub position: u64,
    pub behind: u64,
    pub lag_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The chain ends short of the recorded position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain_broken_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
    pub needs_snapshot: bool,
}

impl DbReplica {
    fn unwell(&self) -> bool {
        self.error.is_some()
            || self.chain_broken_at.is_some()
            || self.fenced.is_some()
            || self.needs_snapshot
    }
}

impl DbStatus {
    fn unwell(&self) -> bool {
        self.staging_failing.is_some() || self.replicas.iter().any(DbReplica::unwell)
    }
}

impl Status {
    /// Reads the state of every database and replica (no request to any store).
    pub fn gather(cap: &Capture, shippers: &[Arc<Shipper>], stage_limit: u64) -> Status {
        let mut code = 0;
        let replicas = shippers
            .iter()
            .map(|s| {
                let error = s.last_error();
                if error.is_some() {
                    code = 1;
                }
                ReplicaStatus {
                    replica: s.describe(),
                    error,
                }
            })
            .collect();
        let hard = stage_limit.saturating_mul(crate::stage::HARD_FACTOR);
        // Read before the databases: a scan shown as done has every database it found
        // among them (each is captured before the scan counts it).
        let scan = cap.scan_progress();
        let mut databases = Vec::new();
        for (name, db) in cap.databases() {
            let txid = db.stage.last().map_or(0, |h| h.txid);
            let staged_bytes = db.stage.log_bytes();
            let f = db.staging_failure();
            let ships: Vec<&Arc<Shipper>> =
                shippers.iter().filter(|s| s.replicates(&name)).collect();
            let slowest = ships.iter().map(|s| s.position(&db)).min().unwrap_or(txid);
            let reps: Vec<DbReplica> = ships
                .iter()
                .map(|s| {
                    let pos = s.held(&db);
                    let recorded = s.position(&db);
                    let fenced = s.fence_reason(&db);
                    DbReplica {
                        replica: s.describe(),
                        txid: pos,
                        position: recorded,
                        behind: txid.saturating_sub(pos),
                        lag_seconds: s.lag(&db).as_secs_f64(),
                        error: s.db_error(&db),
                        chain_broken_at: (pos < recorded).then_some(pos),
                        needs_snapshot: fenced.is_none() && s.needs_snapshot(&db),
                        fenced,
                    }
                })
                .collect();
            let d = DbStatus {
                txid,
                staged_bytes,
                staging_failing: f.as_ref().map(|f| f.error.clone()),
                failing_since: f.as_ref().map(|f| {
                    crate::time::fmt_time(
                        f.since
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos() as u64),
                    )
                }),
                commits_waiting: f.as_ref().map_or(0, |f| f.waiting),
                replicated: !ships.is_empty(),
                straight_handles: db.straight_handles(),
                over_stage_limit: !ships.is_empty() && staged_bytes > stage_limit && slowest < txid,
                replicas: reps,
                name,
            };
            if d.unwell() {
                code = 1;
            }
            databases.push(d);
        }
        Status {
            replicas,
            scan,
            databases,
            code,
            stage_limit,
            stage_hard_limit: hard,
        }
    }

    /// The text `sqlfs status` prints: every database in full when `all` or when there are
    /// few, else a summary (counts, the worst lag, every unwell database in full).
    pub fn text(&self, all: bool) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            match &r.error {
                Some(e) => {
                    let _ = writeln!(out, "replica {}: FAILING: {e}", r.replica);
                }
                None => {
                    let _ = writeln!(out, "replica {}: ok", r.replica);
                }
            }
        }
        out += &scan_line(&self.scan);
        if all || self.databases.len() <= SUMMARY_ABOVE {
            for d in &self.databases {
                self.db_text(&mut out, d);
            }
            return out;
        }
        let unwell: Vec<&DbStatus> = self.databases.iter().filter(|d| d.unwell()).collect();
        let failing = self
            .databases
            .iter()
            .filter(|d| d.staging_failing.is_some())
            .count();
        let fenced = self
            .databases
            .iter()
            .filter(|d| d.replicas.iter().any(|r| r.fenced.is_some()))
            .count();
        let unreplicated = self.databases.iter().filter(|d| !d.replicated).count();
        let staged: u64 = self.databases.iter().map(|d| d.staged_bytes).sum();
        let _ = writeln!(
            out,
            "{} databases: {} ok, {} unwell ({} staging failing, {} fenced), {} not replicated; staged logs {} KiB in all",
            self.databases.len(),
            self.databases.len() - unwell.len(),
            unwell.len(),
            failing,
            fenced,
            unreplicated,
            staged >> 10
        );
        for r in &self.replicas {
            let worst = self
                .databases
                .iter()
                .filter_map(|d| {
                    d.replicas
                        .iter()
                        .find(|x| x.replica == r.replica)
                        .map(|x| (d, x))
                })
                .max_by(|a, b| a.1.lag_seconds.total_cmp(&b.1.lag_seconds));
            let behind: usize = self
                .databases
                .iter()
                .filter(|d| {
                    d.replicas
                        .iter()
                        .any(|x| x.replica == r.replica && x.behind > 0)
                })
                .count();
            if let Some((d, x)) = worst {
                let _ = writeln!(
                    out,
                    "  {}: worst lag {:.1}s ({}, TXID {}, {} behind); {behind} databases behind",
                    r.replica, x.lag_seconds, d.name, x.txid, x.behind
                );
            }
        }
        if !unwell.is_empty() {
            let _ = writeln!(out, "unwell:");
            for d in unwell {
                self.db_text(&mut out, d);
            }
        }
        let _ = writeln!(
            out,
            "(every database: sqlfs status DIR --all; everything as JSON: --json)"
        );
        out
    }

    /// One database in full: its line, then one line per replica.
    fn db_text(&self, out: &mut String, d: &DbStatus) {
        let _ = write!(
            out,
            "{}: TXID {}, staged log {} KiB",
            d.name,
            d.txid,
            d.staged_bytes >> 10
        );
        if d.straight_handles > 0 {
            let _ = write!(
                out,
                ", file straight through the kernel ({} handle(s))",
                d.straight_handles
            );
        }
        if let Some(e) = &d.staging_failing {
            let _ = write!(
                out,
                ", STAGING FAILING since {} ({} commit(s) not staged, retried): {e}",
                d.failing_since.as_deref().unwrap_or("?"),
                d.commits_waiting
            );
        }
        if !d.replicated {
            let _ = writeln!(out, ", not replicated (replicate: false)");
            return;
        }
        if d.over_stage_limit {
            let _ = write!(
                out,
                ", over --stage-limit ({} KiB): kept for a replica that is behind, folded anyway past {} KiB",
                self.stage_limit >> 10,
                self.stage_hard_limit >> 10
            );
        }
        let _ = writeln!(out);
        for r in &d.replicas {
            let _ = write!(
                out,
                "  {}: TXID {}, {} behind, lag {:.1}s",
                r.replica, r.txid, r.behind, r.lag_seconds
            );
            if let Some(e) = &r.error {
                let _ = write!(out, ", FAILING: {e}");
            }
            if let Some(pos) = r.chain_broken_at {
                let _ = write!(
                    out,
                    ", CHAIN BROKEN: the replica's chain ends at TXID {pos}, short of the recorded position {}",
                    r.position
                );
            }
            if let Some(why) = &r.fenced {
                let _ = write!(out, ", FENCED (another writer): {why}");
            } else if r.needs_snapshot {
                let _ = write!(
                    out,
                    ", NEEDS A SNAPSHOT: it fell behind while staging outgrew its hard limit ({} KiB) and was folded past its position; it gets the whole database when it is reachable again",
                    self.stage_hard_limit >> 10
                );
            }
            let _ = writeln!(out);
        }
    }
}

/// "scan: …" (what the scan at mount has done).
fn scan_line(p: &ScanProgress) -> String {
    if !p.started {
        return "scan: not started\n".into();
    }
    let known = if p.reconciled + p.pending > 0 {
        format!(
            "{} known databases loaded{}; ",
            p.reconciled,
            if p.pending > 0 {
                format!(", {} still to load", p.pending)
            } else {
                String::new()
            }
        )
    } else {
        String::new()
    };
    format!(
        "scan: {} ({:.1}s): {known}{}/{} files checked{}, {} databases found ({} taken in by the scan), {} excluded, {} failed\n",
        if p.done { "done" } else { "running" },
        p.seconds,
        p.files_scanned,
        p.files_listed,
        if p.done { "" } else { " (directories still being listed)" },
        p.found,
        p.taken_in,
        p.excluded,
        p.failed
    )
}
