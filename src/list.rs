//! `sqlfs list`: the databases a replica holds, each with its restore window, snapshots and
//! objects per level. One listing per database plus a few header reads; changes nothing.

use anyhow::Result;

use crate::catalog::{self, fmt_time, Reader};
use crate::crypt::Opener;

#[derive(Debug, serde::Serialize)]
pub struct DbListing {
    pub name: String,
    pub id: String,
    /// Earliest and latest restorable states (absent if the chain holds none).
    pub earliest_txid: Option<u64>,
    pub earliest_time: Option<String>,
    pub latest_txid: Option<u64>,
    pub latest_time: Option<String>,
    pub snapshots: Vec<SnapshotInfo>,
    pub levels: Vec<LevelInfo>,
    pub total_bytes: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct SnapshotInfo {
    pub txid: u64,
    pub time: Option<String>,
    pub bytes: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct LevelInfo {
    pub level: u8,
    pub objects: usize,
    pub bytes: u64,
}

pub fn run(
    url: &str,
    only: Option<&str>,
    identity: Option<&std::path::Path>,
    passphrase: Option<&str>,
) -> Result<Vec<DbListing>> {
    let client = crate::replica::open(url)?;
    let opener = match (identity, passphrase) {
        (Some(f), _) => Some(Opener::from_identity_file(f)?),
        (None, Some(p)) => Some(Opener::from_passphrase(p)?),
        _ => None,
    };
    let reader = Reader::new(client.as_ref(), opener.as_ref());
    let mut dbs = reader.databases()?;
    if let Some(n) = only {
        if !dbs.iter().any(|(_, x)| x == n) {
            reader.find(n)?;
        }
        dbs.retain(|(_, x)| x == n);
    }
    let mut out = Vec::new();
    for (id, name) in dbs {
        let c = reader.catalog(&id, &name)?;
        let w = catalog::window(&reader, &c)?;
        let snapshots = c
            .snaps
            .iter()
            .map(|s| SnapshotInfo {
                txid: s.first,
                time: reader.end_time(s).ok().map(fmt_time),
                bytes: s.size,
            })
            .collect();
        let levels = c
            .levels
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(i, l)| LevelInfo {
                level: i as u8,
                objects: l.len(),
                bytes: l.iter().map(|o| o.size).sum(),
            })
            .collect();
        out.push(DbListing {
            name,
            id,
            earliest_txid: w.map(|w| w.first_txid),
            earliest_time: w.map(|w| fmt_time(w.first_ns)),
            latest_txid: w.map(|w| w.last_txid),
            latest_time: w.map(|w| fmt_time(w.last_ns)),
            snapshots,
            levels,
            total_bytes: c.objects().map(|o| o.size).sum(),
        });
    }
    Ok(out)
}

/// The listing as text.
pub fn text(dbs: &[DbListing]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if dbs.is_empty() {
        o.push_str("no databases\n");
    }
    for d in dbs {
        let _ = writeln!(
            o,
            "{} (id {}), {:.1} MB",
            d.name,
            d.id,
            d.total_bytes as f64 / 1e6
        );
        match (d.earliest_txid, d.latest_txid) {
            (Some(a), Some(b)) => {
                let _ = writeln!(
                    o,
                    "  restore window: TXID {a} ({}) .. TXID {b} ({})",
                    d.earliest_time.as_deref().unwrap_or("?"),
                    d.latest_time.as_deref().unwrap_or("?")
                );
            }
            _ => o.push_str("  restore window: none\n"),
        }
        for s in &d.snapshots {
            let _ = writeln!(
                o,
                "  snapshot TXID {} ({}), {} bytes",
                s.txid,
                s.time
                    .as_deref()
                    .unwrap_or("time unreadable without the key"),
                s.bytes
            );
        }
        for l in &d.levels {
            let _ = writeln!(
                o,
                "  level {}: {} objects, {} bytes",
                l.level, l.objects, l.bytes
            );
        }
    }
    o
}
