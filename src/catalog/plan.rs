//! Restore plans over a catalog: the objects a restore of a target applies, the window a
//! replica holds, and the ranges a restore can reach with the gaps between them. A plan
//! reaches its target or fails before anything is downloaded.

use anyhow::{bail, Result};

use super::{DbCatalog, Obj, Reader};
use crate::time::fmt_time;

/// What a restore aims at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Latest,
    Txid(u64),
    /// The state after the last transaction committed at or before this instant (ns).
    Time(u64),
}

/// One object of a plan, applied up to `upto` (inclusive; `u64::MAX` = all of it) and,
/// for a time target, only transactions committed at or before `until_ns`.
#[derive(Clone, Debug)]
pub struct Step {
    pub obj: Obj,
    pub upto: u64,
    pub until_ns: u64,
}

/// A restore plan: a snapshot (or nothing) and the segments after it.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn bytes(&self) -> u64 {
        self.steps.iter().map(|s| s.obj.size).sum()
    }
}

/// Plans a restore of `c` to `target`: the newest usable snapshot, then the fewest segments
/// (highest level first) up to the target.
///
/// The plan reaches the target or fails here, before anything is downloaded: a TXID past the
/// end or an instant before the first commit is an error stating the window, and a break in
/// the chain (TXIDs no object holds between the start and the target; for the latest state,
/// the highest TXID the replica holds) is an error naming the missing TXIDs, the objects on
/// either side and what is restorable. Level-0 segments' ends come from their headers (read
/// a few at a time), so a missing segment is found even when a later one follows it; time
/// targets read commit times from headers too.
pub fn plan(r: &Reader<'_>, c: &DbCatalog, target: Target) -> Result<Plan> {
    let window = || window_text(r, c);
    if let Target::Txid(t) = target {
        // Keys alone bound the end from below; the newest level-0 header says the rest.
        if t > end_by_keys(c) && t > end_txid(r, c)? {
            bail!(
                "TXID {t} of {} is past the end of the replica; {}",
                c.name,
                window()?
            );
        }
    }
    // Start: the newest snapshot at or before the target.
    let mut start: Option<&Obj> = None;
    for s in c.snaps.iter().rev() {
        let ok = match target {
            Target::Latest => true,
            Target::Txid(t) => s.first <= t,
            Target::Time(t) => r.end_time(s)? <= t,
        };
        if ok {
            start = Some(s);
            break;
        }
    }
    let mut steps = Vec::new();
    let mut state = 0;
    if let Some(s) = start {
        state = s.first;
        steps.push(Step {
            obj: s.clone(),
            upto: s.first,
            until_ns: u64::MAX,
        });
    } else if c.starting(0, 1).is_none() {
        // Without a snapshot the chain must start at TXID 1.
        bail!(
            "{} has no restore point at or before {}; {}",
            c.name,
            describe_target(target),
            window()?
        );
    }
    let (limit, until_ns) = match target {
        Target::Latest => (u64::MAX, u64::MAX),
        Target::Txid(t) => (t, u64::MAX),
        Target::Time(t) => (u64::MAX, t),
    };
    // A first walk by keys alone finds the level-0 segments the plan is likely to take; their
    // headers are read together, then the real walk uses them.
    let (guess, _, _) = walk(r, c, state, limit, u64::MAX, false)?;
    let keys: Vec<&str> = guess
        .iter()
        .filter(|s| s.obj.level == Some(0) || until_ns != u64::MAX)
        .map(|s| s.obj.key.as_str())
        .collect();
    r.prefetch_headers(&keys);
    let (more, reached, stop) = walk(r, c, state, limit, until_ns, true)?;
    steps.extend(more);
    if steps.is_empty() {
        bail!(
            "{} has no restore point at or before {}; {}",
            c.name,
            describe_target(target),
            window()?
        );
    }
    if stop == Stop::Break {
        let goal = match target {
            Target::Txid(t) => t,
            Target::Latest | Target::Time(_) => end_txid(r, c)?,
        };
        if reached < goal {
            return Err(break_error(r, c, target, reached, &steps, goal)?);
        }
    }
    Ok(Plan { steps })
}

/// Why a walk along the chain stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// It reached the TXID limit.
    Reached,
    /// The next transaction was committed after the time limit.
    Time,
    /// No object starts right after the state reached.
    Break,
}

/// Walks the chain from `state` towards `limit` (TXID) and `until_ns` (commit time), highest
/// level first; a level-0 segment may end the walk part way. With `exact`, level-0 ends come
/// from headers (and the segments taken carry them); without, from the keys of the next
/// ones (an upper bound, no reads). Returns the steps, the TXID reached and why it stopped.
pub(crate) fn walk(
    r: &Reader<'_>,
    c: &DbCatalog,
    mut state: u64,
    limit: u64,
    until_ns: u64,
    exact: bool,
) -> Result<(Vec<Step>, u64, Stop)> {
    let mut steps = Vec::new();
    'chain: while state < limit {
        for level in (1..c.levels.len()).rev() {
            if let Some(o) = c.starting(level, state + 1) {
                let fits = o.last <= limit && (until_ns == u64::MAX || r.end_time(o)? <= until_ns);
                if fits {
                    state = o.last;
                    steps.push(Step {
                        obj: o.clone(),
                        upto: o.last,
                        until_ns,
                    });
                    continue 'chain;
                }
            }
        }
        let Some(o) = c.starting(0, state + 1) else {
            // A compacted object that starts after the target instant ends the walk there.
            if until_ns != u64::MAX {
                for level in 1..c.levels.len() {
                    if let Some(o) = c.starting(level, state + 1) {
                        if r.header(&o.key)?.first_time_ns > until_ns {
                            return Ok((steps, state, Stop::Time));
                        }
                    }
                }
            }
            return Ok((steps, state, Stop::Break));
        };
        if until_ns != u64::MAX && r.header(&o.key)?.first_time_ns > until_ns {
            return Ok((steps, state, Stop::Time));
        }
        let mut obj = o.clone();
        if exact {
            let h = r.header(&o.key)?;
            if h.first_txid != o.first || h.last_txid < h.first_txid {
                bail!(
                    "{} holds TXIDs {}..={}, not what its key names (from TXID {})",
                    o.key,
                    h.first_txid,
                    h.last_txid,
                    o.first
                );
            }
            obj.last = h.last_txid;
        }
        let whole = until_ns == u64::MAX || r.end_time(o)? <= until_ns;
        let last = obj.last;
        steps.push(Step {
            obj,
            upto: limit,
            until_ns,
        });
        if !whole {
            return Ok((steps, state, Stop::Time));
        }
        if last >= limit {
            return Ok((steps, limit, Stop::Reached));
        }
        state = last;
    }
    Ok((steps, state, Stop::Reached))
}

/// The highest TXID the keys alone show: the newest snapshot, compacted objects' ends, the
/// first TXID of the newest level-0 segment.
pub(crate) fn end_by_keys(c: &DbCatalog) -> u64 {
    let snap = c.snaps.last().map_or(0, |s| s.first);
    let compacted = c.levels.iter().skip(1).flatten().map(|o| o.last).max();
    let l0 = c.newest_l0().map(|o| o.first);
    snap.max(compacted.unwrap_or(0)).max(l0.unwrap_or(0))
}

/// The highest TXID the replica holds for `c`: [`end_by_keys`], and the newest level-0
/// segment's last TXID from its header.
pub fn end_txid(r: &Reader<'_>, c: &DbCatalog) -> Result<u64> {
    let mut end = end_by_keys(c);
    if let Some(o) = c.newest_l0() {
        end = end.max(r.header(&o.key)?.last_txid);
    }
    Ok(end)
}

/// The error for a chain that stops at TXID `reached` (after `steps`) short of `goal`: the
/// TXIDs no level-0 segment holds, the objects on either side, and what is restorable.
pub(crate) fn break_error(
    r: &Reader<'_>,
    c: &DbCatalog,
    target: Target,
    reached: u64,
    steps: &[Step],
    goal: u64,
) -> Result<anyhow::Error> {
    let from = reached + 1;
    // The object after the break: the first of any level (a snapshot included) that starts
    // after the state reached, or a compacted one starting right there that ends past the
    // target (it is only ever applied whole).
    let next = c
        .objects()
        .filter(|o| o.first > reached || (o.level.is_some_and(|l| l > 0) && o.first == from))
        .min_by_key(|o| o.first);
    let to = match next {
        Some(n) if n.first > from => n.first - 1,
        _ => goal,
    };
    let prev = steps.last().map(|s| &s.obj);
    let before = prev.map_or("the empty database".to_string(), |o| o.key.clone());
    let after = next.map_or_else(
        || "nothing (no later object)".to_string(),
        |o| o.key.clone(),
    );
    let restorable = match (window(r, c)?, prev) {
        (Some(w), Some(p)) => format!(
            "restorable up to the break: TXIDs {}..={reached} ({} .. {})",
            w.first_txid,
            fmt_time(w.first_ns),
            fmt_time(r.end_time(p)?)
        ),
        _ => "nothing before the break is restorable".to_string(),
    };
    Ok(anyhow::anyhow!(
        "cannot restore {} to {}: the replica's chain breaks after TXID {reached}: no level-0 segment holds TXIDs {from}..={to} (missing between {before} and {after}); {restorable}",
        c.name,
        describe_target(target),
    ))
}

pub(crate) fn describe_target(t: Target) -> String {
    match t {
        Target::Latest => "the latest transaction".into(),
        Target::Txid(n) => format!("TXID {n}"),
        Target::Time(ns) => fmt_time(ns),
    }
}

/// "it holds TXIDs A..=B (T1 .. T2)": the restore window of `c`, for error messages.
pub fn window_text(r: &Reader<'_>, c: &DbCatalog) -> Result<String> {
    match window(r, c)? {
        Some(w) => Ok(format!(
            "the replica holds TXIDs {}..={} ({} .. {})",
            w.first_txid,
            w.last_txid,
            fmt_time(w.first_ns),
            fmt_time(w.last_ns)
        )),
        None => Ok("the replica holds no restore point for it".into()),
    }
}

/// A database's restore window.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub first_txid: u64,
    pub first_ns: u64,
    pub last_txid: u64,
    pub last_ns: u64,
}

/// The earliest and latest restorable states of `c` (header reads of two or three objects).
pub fn window(r: &Reader<'_>, c: &DbCatalog) -> Result<Option<Window>> {
    // The chain from the empty database (TXID 1) reaches further back than any snapshot.
    let (first_txid, first_ns) = if let Some(o) = c.starting(0, 1) {
        let h = r.header(&o.key)?;
        (h.first_txid, h.first_time_ns)
    } else if let Some(s) = c.snaps.first() {
        (s.first, r.end_time(s)?)
    } else {
        return Ok(None);
    };
    let newest_snap = c.snaps.last();
    let l0 = c
        .newest_l0()
        .filter(|o| newest_snap.is_none_or(|s| s.first < o.first));
    let (last_txid, last_ns) = if let Some(o) = l0 {
        let h = r.header(&o.key)?;
        (h.last_txid, h.last_time_ns)
    } else if let Some(s) = newest_snap {
        (s.first, r.end_time(s)?)
    } else {
        return Ok(None);
    };
    Ok(Some(Window {
        first_txid,
        first_ns,
        last_txid,
        last_ns,
    }))
}

/// A stretch of TXIDs every one of which a restore can reach: from its start (the empty
/// database before TXID 1, or a snapshot) along the chain without a break.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub first_txid: u64,
    pub first_ns: u64,
    pub last_txid: u64,
    pub last_ns: u64,
}

/// TXIDs after a [`Range`] that no restore reaches: the chain breaks after `first_txid - 1`
/// because no object holds `missing_first..=missing_last`. It ends where the next range
/// starts (a snapshot), or at the highest TXID the replica holds if none follows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    pub first_txid: u64,
    pub last_txid: u64,
    pub missing_first: u64,
    pub missing_last: u64,
    /// The object the chain reaches last before the gap, and the first one after it.
    pub before: String,
    pub after: Option<String>,
}

/// The restorable ranges of `c` and the gaps between them (and after the last one), as
/// restore plans see them: a TXID is restorable if the chain from the newest start at or
/// before it (a snapshot, else the empty database) reaches it without a break. A gap-free
/// chain gives one range and no gap. Reads the headers of the level-0 segments the chain
/// passes through (several at a time), as a plan does.
pub fn ranges(r: &Reader<'_>, c: &DbCatalog) -> Result<(Vec<Range>, Vec<Gap>)> {
    // Starts: the empty database (if the chain from TXID 1 is there), then every snapshot.
    let mut starts: Vec<(u64, Option<&Obj>)> = Vec::new();
    if c.starting(0, 1).is_some() {
        starts.push((0, None));
    }
    for s in &c.snaps {
        if starts.last().is_none_or(|(t, _)| *t < s.first) {
            starts.push((s.first, Some(s)));
        }
    }
    // Each start's walk stops at the next start; read the level-0 headers they need at once.
    let limits: Vec<u64> = (0..starts.len())
        .map(|i| starts.get(i + 1).map_or(u64::MAX, |s| s.0))
        .collect();
    let mut keys = Vec::new();
    for (&(start, _), &limit) in starts.iter().zip(&limits) {
        let (steps, _, _) = walk(r, c, start, limit, u64::MAX, false)?;
        keys.extend(
            steps
                .into_iter()
                .filter(|s| s.obj.level == Some(0))
                .map(|s| s.obj.key),
        );
    }
    r.prefetch_headers(&keys.iter().map(String::as_str).collect::<Vec<_>>());

    let mut ranges: Vec<Range> = Vec::new();
    let mut gaps = Vec::new();
    for (i, (&(start, snap), &limit)) in starts.iter().zip(&limits).enumerate() {
        let (first_txid, first_ns) = match snap {
            Some(s) => (s.first, r.end_time(s)?),
            None => {
                let o = c.starting(0, 1).expect("the chain from TXID 1");
                let h = r.header(&o.key)?;
                (h.first_txid, h.first_time_ns)
            }
        };
        let (steps, reached, _) = walk(r, c, start, limit, u64::MAX, true)?;
        let last = steps.last().map(|s| &s.obj).or(snap);
        let (last_txid, last_ns) = match last {
            Some(o) => (reached, r.end_time(o)?),
            None => continue,
        };
        // Contiguous with the range before it: one range.
        match ranges.last_mut() {
            Some(prev) if prev.last_txid + 1 >= first_txid => {
                prev.last_txid = last_txid;
                prev.last_ns = last_ns;
            }
            _ => ranges.push(Range {
                first_txid,
                first_ns,
                last_txid,
                last_ns,
            }),
        }
        // A break before the next start (or before the end of what the replica holds).
        let next_start = starts.get(i + 1).map(|s| s.0);
        let goal = match next_start {
            Some(n) => n.saturating_sub(1),
            None => end_txid(r, c)?,
        };
        if reached < goal {
            let from = reached + 1;
            let next = c
                .objects()
                .filter(|o| {
                    o.first > reached || (o.level.is_some_and(|l| l > 0) && o.first == from)
                })
                .min_by_key(|o| o.first);
            let missing_last = match next {
                Some(n) if n.first > from => (n.first - 1).min(goal),
                _ => goal,
            };
            gaps.push(Gap {
                first_txid: from,
                last_txid: goal,
                missing_first: from,
                missing_last,
                before: last.map(|o| o.key.clone()).unwrap_or_default(),
                after: next.map(|o| o.key.clone()),
            });
        }
    }
    Ok((ranges, gaps))
}
