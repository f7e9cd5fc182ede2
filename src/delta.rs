//! Coded page entries of staging records (record format 2, docs/FORMAT.md): a page is staged
//! either whole or as the byte runs in which it differs from an earlier entry of the same page
//! in the same segment file. A one-row transaction then stages a few hundred bytes instead of
//! whole pages.
//!
//! Entry layout: `pgno u32 | tag u8 | …`
//! - tag [`WHOLE`]: the page (page size bytes).
//! - tag [`DELTA`]: `base u64` (segment offset of the entry this one changes), `len u32`, then
//!   `len` bytes of runs, each `offset u32 | length u32 | bytes`.
//! - tag [`ZEROS`]: `len u32` and runs, written over a page of zeros (a new page holding
//!   little yet).
//!
//! Invariants (kept by [`Bases`] on the writing side, checked on the reading side):
//! - A delta's base lies earlier in the same segment file, is an entry of the same page and
//!   the same page size, and is never more than [`MAX_DEPTH`] deltas away from an entry read on
//!   its own (whole or zeros).
//!   Segments are removed whole, so a base lives as long as the entries built on it.
//! - Runs lie inside the page. The page is the base's image with every run written over it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Entry tag: the whole page follows.
pub const WHOLE: u8 = 0;
/// Entry tag: runs that change an earlier entry follow.
pub const DELTA: u8 = 1;
/// Entry tag: runs that change a page of zeros follow.
pub const ZEROS: u8 = 2;
/// Bytes of an entry before its page or runs: page number and tag.
pub const ENTRY_HEAD: usize = 5;
/// Bytes of a delta entry after its head, before its runs: base offset and runs length.
pub const DELTA_HEAD: usize = 12;
/// Bytes of a zeros entry after its head, before its runs: runs length.
pub const ZEROS_HEAD: usize = 4;
/// Longest chain of deltas from a page read on its own (whole or zeros). Bounds what a random
/// read of one page costs.
pub const MAX_DEPTH: u8 = 32;
/// Bytes of page images the writer keeps as bases for the next deltas; past it they are
/// dropped and pages are staged whole again.
const BASES_MEMORY: usize = 4 << 20;
/// Equal bytes between two changed stretches below which they are coded as one run (a run's
/// own header costs 8 bytes).
const RUN_GAP: usize = 8;

/// A page of zeros of the largest page size, to code new pages against without allocating.
static NO_BYTES: [u8; 65536] = [0; 65536];

/// The changed stretches of `new` against `old` (same length): (offset, length) pairs in order.
pub fn runs(old: &[u8], new: &[u8]) -> Vec<(usize, usize)> {
    debug_assert_eq!(old.len(), new.len());
    let n = new.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        if i % 64 == 0 && i + 64 <= n && old[i..i + 64] == new[i..i + 64] {
            i += 64;
            continue;
        }
        if old[i] == new[i] {
            i += 1;
            continue;
        }
        // A changed stretch: extend it while the next change is within RUN_GAP bytes.
        let start = i;
        let mut end = i + 1;
        let mut j = end;
        while j < n && j - end < RUN_GAP {
            if old[j] != new[j] {
                end = j + 1;
            }
            j += 1;
        }
        out.push((start, end - start));
        i = end;
    }
    out
}

/// Bytes the runs take coded.
fn runs_len(runs: &[(usize, usize)]) -> usize {
    runs.iter().map(|r| 8 + r.1).sum()
}

/// Writes `new`'s runs against `old` to `out`.
fn put_runs(out: &mut Vec<u8>, runs: &[(usize, usize)], new: &[u8]) {
    for &(off, len) in runs {
        out.extend_from_slice(&(off as u32).to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&new[off..off + len]);
    }
}

/// Writes coded runs over `page`. Errors if a run is malformed or leaves the page.
pub fn apply_runs(page: &mut [u8], mut runs: &[u8]) -> Result<(), String> {
    while !runs.is_empty() {
        if runs.len() < 8 {
            return Err("truncated run".into());
        }
        let off = u32::from_be_bytes(runs[0..4].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(runs[4..8].try_into().unwrap()) as usize;
        let bytes = runs
            .get(8..8 + len)
            .ok_or_else(|| "truncated run".to_string())?;
        let size = page.len();
        let dst = off
            .checked_add(len)
            .and_then(|end| page.get_mut(off..end))
            .ok_or_else(|| format!("run {off}+{len} outside a page of {size}"))?;
        dst.copy_from_slice(bytes);
        runs = &runs[8 + len..];
    }
    Ok(())
}

/// How an entry gives its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    /// Its data is the page.
    Whole,
    /// Its data is runs over the page of the entry at segment offset `base`.
    Delta { base: u64 },
    /// Its data is runs over a page of zeros.
    Zeros,
}

/// The head of the entry at the start of `b`: page number, coding, and where its data lies
/// (offset in `b`, length). Only the head has to be in `b`. `at` is the entry's segment
/// offset (a base must lie before it) and `page_size` its page size.
pub fn head(b: &[u8], at: u64, page_size: usize) -> Result<(u32, Coding, usize, usize), String> {
    let truncated = || "truncated page entry".to_string();
    let u32at = |i: usize| -> Result<usize, String> {
        let x = b.get(i..i + 4).ok_or_else(truncated)?;
        Ok(u32::from_be_bytes(x.try_into().unwrap()) as usize)
    };
    let pgno = u32at(0)? as u32;
    if pgno == 0 {
        return Err("page number 0".into());
    }
    let (coding, data, len) = match b.get(4).ok_or_else(truncated)? {
        &WHOLE => (Coding::Whole, ENTRY_HEAD, page_size),
        &ZEROS => (Coding::Zeros, ENTRY_HEAD + ZEROS_HEAD, u32at(ENTRY_HEAD)?),
        &DELTA => {
            let x = b.get(ENTRY_HEAD..ENTRY_HEAD + 8).ok_or_else(truncated)?;
            let base = u64::from_be_bytes(x.try_into().unwrap());
            if base >= at {
                return Err(format!(
                    "page {pgno} at {at} has its base after it ({base})"
                ));
            }
            (
                Coding::Delta { base },
                ENTRY_HEAD + DELTA_HEAD,
                u32at(ENTRY_HEAD + 8)?,
            )
        }
        t => return Err(format!("page entry tag {t}")),
    };
    if len > page_size {
        return Err(format!("page {pgno} at {at} has {len} bytes of runs"));
    }
    Ok((pgno, coding, data, len))
}

/// One entry of a coded record's entry bytes.
pub struct Entry {
    pub pgno: u32,
    /// Segment offset of the entry.
    pub at: u64,
    pub coding: Coding,
    /// Where its page or runs lie in the entry bytes.
    pub data: std::ops::Range<usize>,
}

/// The entries of a coded record whose entry bytes, at segment offset `at`, are `body`.
/// Errors if they do not fill `body` exactly.
pub fn entries(body: &[u8], at: u64, page_size: usize) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let e_at = at + pos as u64;
        let (pgno, coding, data, len) = head(&body[pos..], e_at, page_size)?;
        let data = pos + data..pos + data + len;
        if data.end > body.len() {
            return Err("truncated page entry".into());
        }
        pos = data.end;
        out.push(Entry {
            pgno,
            at: e_at,
            coding,
            data,
        });
    }
    Ok(out)
}

/// The newest staged image of a page, as a base for its next delta.
struct Base {
    /// Segment offset of its entry.
    at: u64,
    /// Deltas between it and an entry read on its own (whole or zeros).
    depth: u8,
    page: Vec<u8>,
}

/// The writer's bases: the newest staged image of recently changed pages of the segment being
/// appended to. Cleared whenever the file may no longer hold them (a new segment, a failed
/// write cut the file back).
#[derive(Default)]
pub struct Bases {
    pages: HashMap<u32, Base>,
    bytes: usize,
}

/// What coding one entry changes in [`Bases`], applied once its whole record is written.
pub struct Update {
    pgno: u32,
    base: Base,
}

impl Bases {
    pub fn clear(&mut self) {
        self.pages.clear();
        self.bytes = 0;
    }

    /// Codes page `pgno` as the entry at segment offset `at`, appended to `out`, whole or as a
    /// delta against its base. Returns the change to make to the bases once the record is on
    /// its way to the file.
    pub fn code(&self, out: &mut Vec<u8>, at: u64, pgno: u32, page: &[u8]) -> Update {
        out.extend_from_slice(&pgno.to_be_bytes());
        let delta = self
            .pages
            .get(&pgno)
            .filter(|b| b.page.len() == page.len() && b.depth < MAX_DEPTH)
            .and_then(|b| {
                let r = runs(&b.page, page);
                // A delta must be well worth it: otherwise the page is staged whole, which
                // also ends the chain.
                (DELTA_HEAD + runs_len(&r) < page.len() / 2).then_some((b, r))
            });
        let depth = match delta {
            Some((b, r)) => {
                out.push(DELTA);
                out.extend_from_slice(&b.at.to_be_bytes());
                out.extend_from_slice(&(runs_len(&r) as u32).to_be_bytes());
                put_runs(out, &r, page);
                b.depth + 1
            }
            None => {
                let r = runs(&NO_BYTES[..page.len()], page);
                if ZEROS_HEAD + runs_len(&r) < page.len() / 2 {
                    out.push(ZEROS);
                    out.extend_from_slice(&(runs_len(&r) as u32).to_be_bytes());
                    put_runs(out, &r, page);
                } else {
                    out.push(WHOLE);
                    out.extend_from_slice(page);
                }
                0
            }
        };
        Update {
            pgno,
            base: Base {
                at,
                depth,
                page: page.to_vec(),
            },
        }
    }

    /// Makes the entries of a record that reached the append buffer the bases of later ones.
    pub fn apply(&mut self, updates: Vec<Update>) {
        for u in updates {
            let size = u.base.page.len();
            if let Some(old) = self.pages.insert(u.pgno, u.base) {
                self.bytes -= old.page.len();
            }
            self.bytes += size;
        }
        if self.bytes > BASES_MEMORY {
            self.clear();
        }
    }
}

/// Bytes read at once at the start of an entry: its head and, for most deltas, their runs.
const ENTRY_READ: usize = 512;

/// Reads into `page` the image of the coded entry at offset `at` of segment file `f`,
/// following delta bases. `depth` is how many deltas were followed to get here. Returns the
/// entry's page number.
pub fn read_entry(f: &File, at: u64, page: &mut [u8], depth: u8) -> io::Result<u32> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    // One read usually holds the whole entry (a delta's runs are under half a page, and most
    // are far smaller); the end of the file may come sooner.
    let mut buf = vec![0u8; ENTRY_READ];
    let mut got = 0;
    while got < ENTRY_HEAD + DELTA_HEAD {
        match f.read_at(&mut buf[got..], at + got as u64)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    buf.truncate(got);
    let (pgno, coding, data, len) = head(&buf, at, page.len()).map_err(bad)?;
    match coding {
        Coding::Whole => {
            f.read_exact_at(page, at + data as u64)?;
            return Ok(pgno);
        }
        Coding::Zeros => page.fill(0),
        Coding::Delta { base } => {
            if depth >= MAX_DEPTH {
                return Err(bad(format!(
                    "page {pgno} at {at}: a chain of over {MAX_DEPTH} deltas"
                )));
            }
            if read_entry(f, base, page, depth + 1)? != pgno {
                return Err(bad(format!(
                    "page {pgno} at {at} has a base of another page"
                )));
            }
        }
    }
    if buf.len() < data + len {
        let have = buf.len();
        buf.resize(data + len, 0);
        f.read_exact_at(&mut buf[have..], at + have as u64)?;
    }
    apply_runs(page, &buf[data..data + len])
        .map_err(|e| bad(format!("page {pgno} at {at}: {e}")))?;
    Ok(pgno)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any change, coded as runs and written over the old page, gives the new page.
    #[test]
    fn runs_rebuild_the_page() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for ps in [512usize, 4096, 65536] {
            for _ in 0..200 {
                let old: Vec<u8> = (0..ps).map(|_| rnd() as u8).collect();
                let mut new = old.clone();
                for _ in 0..rnd() % 12 {
                    let at = rnd() as usize % ps;
                    let len = (rnd() as usize % 300).min(ps - at);
                    for b in &mut new[at..at + len] {
                        *b = rnd() as u8;
                    }
                }
                let r = runs(&old, &new);
                let mut coded = Vec::new();
                put_runs(&mut coded, &r, &new);
                assert_eq!(coded.len(), runs_len(&r));
                let mut got = old.clone();
                apply_runs(&mut got, &coded).unwrap();
                assert_eq!(got, new);
            }
        }
        // Equal pages have no runs; runs never start or end on an unchanged byte.
        assert!(runs(&[7; 4096], &[7; 4096]).is_empty());
        let (a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        b[100] = 1;
        b[103] = 1;
        b[4095] = 1;
        assert_eq!(runs(&a, &b), vec![(100, 4), (4095, 1)]);
    }

    #[test]
    fn runs_outside_the_page_are_refused() {
        let mut page = vec![0u8; 512];
        let mut r = Vec::new();
        r.extend_from_slice(&510u32.to_be_bytes());
        r.extend_from_slice(&4u32.to_be_bytes());
        r.extend_from_slice(&[1, 2, 3, 4]);
        assert!(apply_runs(&mut page, &r).is_err());
        assert!(apply_runs(&mut page, &r[..6]).is_err());
    }

    /// Entries as coded parse back to their pages and codings; bytes that do not make whole
    /// entries, or a base that is not before its entry, are refused.
    #[test]
    fn entries_parse_what_was_coded() {
        let mut bases = Bases::default();
        let mut body = Vec::new();
        let at = 1000u64;
        let old: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut new = old.clone();
        new[10] ^= 1;
        let mut sparse = vec![0u8; 4096];
        sparse[4000..4010].fill(9);
        let u = bases.code(&mut body, at, 3, &old);
        bases.apply(vec![u]);
        let next = at + body.len() as u64;
        let u = bases.code(&mut body, next, 3, &new);
        bases.apply(vec![u]);
        let next = at + body.len() as u64;
        bases.code(&mut body, next, 9, &sparse);
        let es = entries(&body, at, 4096).unwrap();
        let got: Vec<(u32, Coding)> = es.iter().map(|e| (e.pgno, e.coding)).collect();
        assert_eq!(
            got,
            vec![
                (3, Coding::Whole),
                (3, Coding::Delta { base: at }),
                (9, Coding::Zeros)
            ]
        );
        let mut page = old.clone();
        apply_runs(&mut page, &body[es[1].data.clone()]).unwrap();
        assert_eq!(page, new);
        assert!(entries(&body[..body.len() - 1], at, 4096).is_err());
        // The same bytes placed before their base.
        let delta = &body[es[1].at as usize - at as usize..es[2].at as usize - at as usize];
        assert!(entries(delta, 10, 4096).is_err());
    }
}
