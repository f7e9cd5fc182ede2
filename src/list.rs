//! `sqlfs list`: the databases a replica holds, each with its restore window, snapshots and
//! objects per level. One listing per database plus header reads (the level-0 segments the
//! chain passes through, several at a time); changes nothing.
//!
//! The window is shown as the ranges a restore can actually reach: where the chain breaks
//! (TXIDs no object holds), the ranges before and after the break are shown apart and the
//! gap is named, with the missing TXIDs and the objects on either side.

use anyhow::Result;

use crate::catalog::{self, Reader};
use crate::crypt::Opener;
use crate::time::fmt_time;

#[derive(Debug, serde::Serialize)]
pub struct DbListing {
    pub name: String,
    pub id: String,
    /// Earliest and latest restorable states (absent if the chain holds none).
    pub earliest_txid: Option<u64>,
    pub earliest_time: Option<String>,
    pub latest_txid: Option<u64>,
    pub latest_time: Option<String>,
    /// The restorable ranges, oldest first: one unless the chain has a gap.
    pub ranges: Vec<RangeInfo>,
    /// TXIDs no restore reaches, after the range they follow.
    pub gaps: Vec<crate::catalog::Gap>,
    pub snapshots: Vec<SnapshotInfo>,
    pub levels: Vec<LevelInfo>,
    pub total_bytes: u64,
    /// Why this database's objects could not be read (a damaged or foreign object, a wrong
    /// key); the other fields are then empty. Other databases are listed all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct RangeInfo {
    pub first_txid: u64,
    pub first_time: String,
    pub last_txid: u64,
    pub last_time: String,
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
        match listing(&reader, &id, &name) {
            Ok(l) => out.push(l),
            Err(e) => out.push(DbListing {
                name,
                id,
                earliest_txid: None,
                earliest_time: None,
                latest_txid: None,
                latest_time: None,
                ranges: Vec::new(),
                gaps: Vec::new(),
                snapshots: Vec::new(),
                levels: Vec::new(),
                total_bytes: 0,
                error: Some(format!("{e:#}")),
            }),
        }
    }
    Ok(out)
}

/// One database's listing; an error names the object that could not be read.
fn listing(reader: &Reader, id: &str, name: &str) -> Result<DbListing> {
    let (id, name) = (id.to_string(), name.to_string());
    {
        let c = reader.catalog(&id, &name)?;
        let (ranges, gaps) = catalog::ranges(reader, &c)?;
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
        let (first, last) = (ranges.first(), ranges.last());
        Ok(DbListing {
            name,
            id,
            earliest_txid: first.map(|w| w.first_txid),
            earliest_time: first.map(|w| fmt_time(w.first_ns)),
            latest_txid: last.map(|w| w.last_txid),
            latest_time: last.map(|w| fmt_time(w.last_ns)),
            ranges: ranges
                .iter()
                .map(|w| RangeInfo {
                    first_txid: w.first_txid,
                    first_time: fmt_time(w.first_ns),
                    last_txid: w.last_txid,
                    last_time: fmt_time(w.last_ns),
                })
                .collect(),
            gaps,
            snapshots,
            levels,
            total_bytes: c.objects().map(|o| o.size).sum(),
            error: None,
        })
    }
}

/// Above this many databases, the text is a summary unless details are asked for.
pub const SUMMARY_ABOVE: usize = 20;

/// The listing as text: every database in full when `all` or when there are few, else a
/// summary.
pub fn text(dbs: &[DbListing], all: bool) -> String {
    if all || dbs.len() <= SUMMARY_ABOVE {
        details(dbs)
    } else {
        summary(dbs)
    }
}

/// Many databases: the counts and sizes, the database whose latest restorable state is the
/// oldest, and every database that is unreadable or has gaps, in full.
fn summary(dbs: &[DbListing]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let total: u64 = dbs.iter().map(|d| d.total_bytes).sum();
    let unreadable: Vec<&DbListing> = dbs.iter().filter(|d| d.error.is_some()).collect();
    let gapped: Vec<&DbListing> = dbs.iter().filter(|d| !d.gaps.is_empty()).collect();
    let empty = dbs
        .iter()
        .filter(|d| d.error.is_none() && d.ranges.is_empty())
        .count();
    let oldest_latest = dbs
        .iter()
        .filter_map(|d| d.latest_time.as_ref().map(|t| (t, &d.name)))
        .min();
    let _ = writeln!(
        o,
        "{} databases, {:.1} MB: {} unreadable, {} with gaps, {} with no restore window",
        dbs.len(),
        total as f64 / 1e6,
        unreadable.len(),
        gapped.len(),
        empty
    );
    if let Some((t, n)) = oldest_latest {
        let _ = writeln!(o, "the oldest latest restorable state: {t} ({n})");
    }
    let newest = dbs.iter().filter_map(|d| d.latest_time.as_ref()).max();
    if let Some(t) = newest {
        let _ = writeln!(o, "the newest latest restorable state: {t}");
    }
    let bad: Vec<&DbListing> = dbs
        .iter()
        .filter(|d| d.error.is_some() || !d.gaps.is_empty())
        .collect();
    if !bad.is_empty() {
        o.push_str("needing attention:\n");
        o.push_str(&details_of(bad.into_iter()));
    }
    o.push_str("(every database in full: --all; everything as JSON: --json)\n");
    o
}

/// Every database in full.
fn details(dbs: &[DbListing]) -> String {
    if dbs.is_empty() {
        return "no databases\n".into();
    }
    details_of(dbs.iter())
}

fn details_of<'a>(dbs: impl Iterator<Item = &'a DbListing>) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    for d in dbs {
        let _ = writeln!(
            o,
            "{} (id {}), {:.1} MB",
            d.name,
            d.id,
            d.total_bytes as f64 / 1e6
        );
        if let Some(e) = &d.error {
            let _ = writeln!(o, "  UNREADABLE: {e}");
            continue;
        }
        if d.ranges.is_empty() {
            o.push_str("  restore window: none\n");
        }
        // Each range, then the gap after it (if any), in TXID order.
        let mut gaps = d.gaps.iter().peekable();
        for r in &d.ranges {
            while let Some(g) = gaps.next_if(|g| g.first_txid < r.first_txid) {
                gap_line(&mut o, g);
            }
            let _ = writeln!(
                o,
                "  restore window: TXID {} ({}) .. TXID {} ({})",
                r.first_txid, r.first_time, r.last_txid, r.last_time
            );
        }
        for g in gaps {
            gap_line(&mut o, g);
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

/// "gap: TXIDs A..=B cannot be restored: no object holds TXIDs C..=D (missing between X and Y)".
fn gap_line(o: &mut String, g: &crate::catalog::Gap) {
    use std::fmt::Write as _;
    let after = match &g.after {
        Some(k) => format!("between {} and {k}", g.before),
        None => format!("after {}; nothing follows", g.before),
    };
    let _ = writeln!(
        o,
        "  gap: TXIDs {}..={} cannot be restored: no object holds TXIDs {}..={} (missing {after})",
        g.first_txid, g.last_txid, g.missing_first, g.missing_last
    );
}
