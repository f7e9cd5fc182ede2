//! Compaction and retention: the two rules that keep a replica's storage and restore time
//! bounded.
//!
//! *Compaction* merges a run of consecutive segments of one level into one object of the
//! next level: a single record holding the newest version of every page the run changed,
//! with the rolling checksum before the run's first and after its last transaction, so the
//! checksum chain stays whole. A restore applies it whole, in one step, instead of every
//! transaction of the run.
//!
//! *Retention* keeps every restore point inside the window: it finds the newest snapshot
//! stored at or before the window's start (stored no later than that means committed no
//! later than that), and only objects wholly before that snapshot may go.
//!
//! Invariants:
//! - A merged object covers exactly TXIDs `first..=last` of its inputs, which must be
//!   contiguous; its record applied to the state before `first` gives the state after
//!   `last` (same pages, same size, same checksum).
//! - Retention never removes the snapshot a window start needs, nor anything after it.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::catalog::{DbCatalog, Obj};
use crate::record::{Kind, RecordHeader, WalPos};
use crate::segment::{self, Event, ObjHeader, ObjKind, ObjectWriter};

/// One object to merge: a local file, or the byte range `(offset, length)` of one.
pub struct Input<'a> {
    pub key: String,
    pub path: &'a Path,
    pub range: Option<(u64, u64)>,
}

/// Merges the verified local objects `inputs` (consecutive, in TXID order) into one
/// compacted object of `level` written to `out`, using `pages_tmp` as scratch for page
/// images (sparse, up to the database's size; left for the caller to empty or remove, so that
/// the file can be used again). Returns its header.
pub fn merge(
    inputs: &[Input<'_>],
    level: u8,
    db_id: &str,
    out: File,
    pages_tmp: &Path,
) -> Result<ObjHeader> {
    let pages = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(pages_tmp)
        .with_context(|| format!("creating {}", pages_tmp.display()))?;
    let mut present = BTreeSet::new();
    let mut first: Option<(u64, u64, u64)> = None; // (txid, time, checksum before)
    let mut last: Option<RecordHeader> = None;
    let mut page_size = 0u32;
    let mut replaced = false;
    for Input { key, path, range } in inputs {
        let f = File::open(path).with_context(|| format!("opening the local copy of {key}"))?;
        let slice = |(off, len): (u64, u64)| segment::Slice::new(&f, off, len);
        let hdr = match range {
            Some(r) => segment::verify(slice(*r), key)?,
            None => segment::verify(&f, key)?,
        };
        if hdr.kind != ObjKind::Segment {
            bail!("{key} is not a segment");
        }
        match &last {
            Some(l) if hdr.first_txid != l.txid + 1 => bail!(
                "{key} starts at TXID {} but the run stands at {}",
                hdr.first_txid,
                l.txid
            ),
            _ => {}
        }
        first.get_or_insert((hdr.first_txid, hdr.first_time_ns, hdr.checksum_before));
        let io = |e: std::io::Error| segment::ObjectError::Io {
            what: pages_tmp.display().to_string(),
            err: e,
        };
        let visit = |ev: Event<'_>| -> std::result::Result<(), segment::ObjectError> {
            match ev {
                Event::Start(h) => {
                    if h.replaces_state(page_size) {
                        // Every page of the database is in this record.
                        present.clear();
                        pages.set_len(0).map_err(io)?;
                        replaced |= h.kind == Kind::Snapshot;
                    }
                    page_size = h.page_size;
                }
                Event::Page(p, d) => {
                    pages
                        .write_all_at(d, (p as u64 - 1) * d.len() as u64)
                        .map_err(io)?;
                    present.insert(p);
                }
                Event::End(h) => {
                    // Pages past the new end are gone. Looked at by the set's last page: a
                    // merge of many small records must not walk the whole set for each.
                    if present.last().is_some_and(|&l| l > h.db_pages) {
                        present.split_off(&(h.db_pages + 1));
                    }
                    last = Some(*h);
                }
            }
            Ok(())
        };
        match range {
            Some(r) => segment::for_each_txn(slice(*r), &hdr, key, visit)?,
            None => segment::for_each_txn(&f, &hdr, key, visit)?,
        }
    }
    let (Some((first_txid, first_time, before)), Some(last)) = (first, last) else {
        bail!("nothing to merge");
    };
    let h = RecordHeader {
        kind: if replaced { Kind::Snapshot } else { Kind::Txn },
        txid: last.txid,
        time_ns: last.time_ns,
        page_size: last.page_size,
        db_pages: last.db_pages,
        checksum_before: before,
        checksum_after: last.checksum_after,
        npages: present.len() as u32,
        wal: WalPos::default(),
        coded: None,
    };
    let mut w = ObjectWriter::new(out, ObjKind::Segment, level, db_id)?;
    let ps = h.page_size as usize;
    w.add(&h, |emit| {
        let mut buf = vec![0u8; ps];
        for &p in &present {
            pages.read_exact_at(&mut buf, (p as u64 - 1) * ps as u64)?;
            emit(p, &buf)?;
        }
        Ok(())
    })?;
    w.set_span(first_txid, first_time, before);
    let (hdr, _) = w.finish()?;
    Ok(hdr)
}

/// The next run of level `level - 1` to merge into `level`: contiguous segments after the
/// last one `level` covers (or after `skip_to`). A run never crosses a gap, nor a level-0
/// boundary where a snapshot stands and the end before it is only inferred (the chain may
/// restart there after a gap: see `DbCatalog::adjacent`). A single object before a gap is
/// left at its level and the search goes on after it; a single object at the end is left
/// for later (merging one object gains nothing).
pub fn next_run(c: &DbCatalog, level: usize, skip_to: u64) -> Vec<Obj> {
    let done = c
        .levels
        .get(level)
        .and_then(|l| l.last())
        .map_or(0, |o| o.last)
        .max(skip_to);
    let Some(lower) = c.levels.get(level - 1) else {
        return Vec::new();
    };
    let mut run: Vec<Obj> = Vec::new();
    for o in lower.iter().filter(|o| o.first > done) {
        if let Some(prev) = run.last() {
            if !c.adjacent(prev, o) {
                if run.len() >= 2 {
                    break;
                }
                run.clear();
            }
        }
        run.push(o.clone());
    }
    if run.len() < 2 {
        run.clear();
    }
    run
}

/// Keys retention may delete at `now_ns` with a window of `window_ns`: snapshots older than
/// the newest one stored at or before the window's start, and segments (every level) that
/// end at or before it.
pub fn expired(c: &DbCatalog, now_ns: u64, window_ns: u64) -> Vec<String> {
    let start = now_ns.saturating_sub(window_ns);
    let Some(keep) = c
        .snaps
        .iter()
        .rev()
        .find(|s| s.modified_ns != 0 && s.modified_ns <= start)
    else {
        return Vec::new();
    };
    let mut out: Vec<String> = c
        .snaps
        .iter()
        .filter(|s| s.first < keep.first)
        .map(|s| s.key.clone())
        .collect();
    for l in &c.levels {
        out.extend(
            l.iter()
                .filter(|o| o.last <= keep.first)
                .map(|o| o.key.clone()),
        );
    }
    out
}

/// When [`expired`] will next find something to delete with a window of `window_ns` (ns
/// since the epoch), if ever with what `c` holds now: the earliest time a snapshot becomes
/// the one kept while something older than it is still there.
pub fn next_expiry(c: &DbCatalog, window_ns: u64) -> Option<u64> {
    c.snaps
        .iter()
        .filter(|s| s.modified_ns != 0)
        .filter(|s| {
            c.snaps.iter().any(|o| o.first < s.first)
                || c.levels.iter().any(|l| l.iter().any(|o| o.last <= s.first))
        })
        .map(|s| s.modified_ns.saturating_add(window_ns))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{compacted_key, l0_key, snapshot_key};
    use crate::replica::Listed;

    fn cat(keys: &[(String, u64)]) -> DbCatalog {
        let l: Vec<Listed> = keys
            .iter()
            .map(|(k, t)| Listed {
                key: k.clone(),
                size: 1,
                modified_ns: *t,
            })
            .collect();
        DbCatalog::from_keys("0123456789abcdef", "x.db", &l)
    }

    #[test]
    fn runs_and_retention() {
        let id = "0123456789abcdef";
        let c = cat(&[
            (snapshot_key(id, 0x10), 100),
            (snapshot_key(id, 0x30), 200),
            (l0_key(id, 1), 50),
            (l0_key(id, 0x11), 110),
            (l0_key(id, 0x20), 150),
            (l0_key(id, 0x31), 210),
            (compacted_key(id, 1, 0x11, 0x2f), 160),
        ]);
        // Level 1 covers up to 0x2f; the only later level-0 run is one object.
        assert!(next_run(&c, 1, 0).is_empty());
        let run: Vec<u64> = next_run(&c, 1, 0x2f).iter().map(|o| o.first).collect();
        assert!(run.is_empty());
        // Window starting at 150: the snapshot stored at 100 is the newest before it.
        let mut e = expired(&c, 1000, 850);
        e.sort();
        assert_eq!(e, vec![l0_key(id, 1)]);
        // Window starting at 250: snapshot 0x30 anchors; everything ending by 0x30 goes.
        let mut e = expired(&c, 1000, 750);
        e.sort();
        let mut want = vec![
            snapshot_key(id, 0x10),
            l0_key(id, 1),
            l0_key(id, 0x11),
            l0_key(id, 0x20),
            compacted_key(id, 1, 0x11, 0x2f),
        ];
        want.sort();
        assert_eq!(e, want);
        // No snapshot old enough: nothing goes.
        assert!(expired(&c, 1000, 950).is_empty());
        // Retention next has work when the snapshot stored at 100 leaves the window (l0/1
        // is older than it), and it agrees with `expired` on either side of that instant.
        assert_eq!(next_expiry(&c, 850), Some(950));
        assert!(expired(&c, 949, 850).is_empty());
        assert!(!expired(&c, 950, 850).is_empty());
        // Nothing older than the only snapshot: retention never has work.
        let lone = cat(&[(snapshot_key(id, 0x10), 100), (l0_key(id, 0x11), 110)]);
        assert_eq!(next_expiry(&lone, 850), None);
    }

    /// One segment of `records` (header, pages as (pgno, fill byte)) in `dir`.
    fn segment_of(
        dir: &Path,
        name: &str,
        records: &[(RecordHeader, Vec<(u32, u8)>)],
    ) -> std::path::PathBuf {
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        let mut w = ObjectWriter::new(f, ObjKind::Segment, 0, "0123456789abcdef").unwrap();
        for (h, pages) in records {
            w.add(h, |emit| {
                for &(p, b) in pages {
                    emit(p, &vec![b; h.page_size as usize])?;
                }
                Ok(())
            })
            .unwrap();
        }
        w.finish().unwrap();
        path
    }

    /// A database that shrinks and grows again inside a run: the merged record holds exactly
    /// the pages inside the last size, each in its newest version; a page cut off and not
    /// written again is gone.
    #[test]
    fn merge_keeps_the_pages_inside_the_last_size() {
        let dir = tempfile::tempdir().unwrap();
        let ps = 512;
        let h = |txid, db_pages, npages| RecordHeader {
            db_pages,
            ..RecordHeader::test(Kind::Txn, txid, ps, npages)
        };
        let a = segment_of(
            dir.path(),
            "a",
            &[
                (h(1, 6, 6), (1..=6).map(|p| (p, 1)).collect()),
                (h(2, 6, 1), vec![(5, 2)]),
            ],
        );
        let b = segment_of(
            dir.path(),
            "b",
            &[
                // Cut to 3 pages, then grown to 5 with page 4 written again.
                (h(3, 3, 1), vec![(2, 3)]),
                (h(4, 5, 1), vec![(4, 4)]),
            ],
        );
        let inputs = [
            Input {
                key: "a".into(),
                path: &a,
                range: None,
            },
            Input {
                key: "b".into(),
                path: &b,
                range: None,
            },
        ];
        let out = File::create(dir.path().join("out")).unwrap();
        let hdr = merge(&inputs, 1, "0123456789abcdef", out, &dir.path().join("tmp")).unwrap();
        assert_eq!((hdr.first_txid, hdr.last_txid), (1, 4));
        let mut got = Vec::new();
        segment::for_each_txn(
            File::open(dir.path().join("out")).unwrap(),
            &hdr,
            "out",
            |ev| {
                match ev {
                    Event::Start(r) => assert_eq!((r.db_pages, r.npages), (5, 4)),
                    Event::Page(p, d) => got.push((p, d[0])),
                    Event::End(_) => {}
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, vec![(1, 1), (2, 3), (3, 1), (4, 4)]);
    }

    fn firsts(run: &[Obj]) -> Vec<u64> {
        run.iter().map(|o| o.first).collect()
    }

    /// A replica that fell behind got a snapshot at 0x40 after its transactions 0x21..=0x40
    /// were folded away locally; its level-0 chain restarts at 0x41. From a listing the end
    /// of `l0/0x18` (really 0x20) can only be inferred as 0x40: no run may cross it.
    #[test]
    fn runs_stop_at_a_snapshot_after_a_gap() {
        let id = "0123456789abcdef";
        let mut c = cat(&[
            (l0_key(id, 1), 1),
            (l0_key(id, 0x10), 2),
            (l0_key(id, 0x18), 3),
            (snapshot_key(id, 0x40), 4),
            (l0_key(id, 0x41), 5),
            (l0_key(id, 0x50), 6),
        ]);
        assert_eq!(firsts(&next_run(&c, 1, 0)), vec![1, 0x10, 0x18]);
        // Once that run is merged, the next one starts after the snapshot.
        c.add(Obj {
            key: compacted_key(id, 1, 1, 0x20),
            level: Some(1),
            first: 1,
            last: 0x20,
            exact: true,
            size: 1,
            modified_ns: 7,
        });
        assert_eq!(firsts(&next_run(&c, 1, 0)), vec![0x41, 0x50]);
        // A lone object before the gap is left at level 0; the runs after it still merge.
        let mut c = cat(&[
            (compacted_key(id, 1, 1, 0x17), 1),
            (l0_key(id, 1), 1),
            (l0_key(id, 0x10), 2),
            (l0_key(id, 0x18), 3),
            (snapshot_key(id, 0x40), 4),
            (l0_key(id, 0x41), 5),
            (l0_key(id, 0x50), 6),
            (l0_key(id, 0x58), 7),
        ]);
        assert_eq!(firsts(&next_run(&c, 1, 0)), vec![0x41, 0x50, 0x58]);
        // Level-0 ends this process knows exactly: a gap breaks the run, and an interval
        // snapshot at a boundary the chain really continues from does not.
        c.add(Obj {
            key: l0_key(id, 0x60),
            level: Some(0),
            first: 0x60,
            last: 0x67,
            exact: true,
            size: 1,
            modified_ns: 8,
        });
        c.add(Obj {
            key: snapshot_key(id, 0x67),
            level: None,
            first: 0x67,
            last: 0x67,
            exact: true,
            size: 1,
            modified_ns: 9,
        });
        c.add(Obj {
            key: l0_key(id, 0x68),
            level: Some(0),
            first: 0x68,
            last: 0x70,
            exact: true,
            size: 1,
            modified_ns: 10,
        });
        assert_eq!(
            firsts(&next_run(&c, 1, 0x5f)),
            vec![0x60, 0x68],
            "an exact end at an interval snapshot continues the run"
        );
        let mut g = cat(&[(l0_key(id, 1), 1)]);
        g.levels[0][0].exact = true;
        g.levels[0][0].last = 5;
        g.add(Obj {
            key: l0_key(id, 9),
            level: Some(0),
            first: 9,
            last: 12,
            exact: true,
            size: 1,
            modified_ns: 2,
        });
        g.add(Obj {
            key: l0_key(id, 13),
            level: Some(0),
            first: 13,
            last: 15,
            exact: true,
            size: 1,
            modified_ns: 3,
        });
        assert_eq!(firsts(&next_run(&g, 1, 0)), vec![9, 13], "a gap after 5");
    }
}
