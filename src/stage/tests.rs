//! Unit tests of the staging log.

use super::*;

fn hdr(txid: u64, pages: u32) -> RecordHeader {
    RecordHeader {
        time_ns: txid * 1000,
        db_pages: pages,
        checksum_after: txid,
        ..RecordHeader::test(Kind::Txn, txid, 512, 1)
    }
}

/// A small deterministic generator: `rnd(n)` is in `0..n`.
fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

/// Applies one record of `pages` with header `h` (its page count set here).
fn apply_pages(a: &mut Applier<'_>, h: &mut RecordHeader, pages: &[(u32, Vec<u8>)]) {
    h.npages = pages.len() as u32;
    a.apply(h, &mut |sink: PageSink<'_>| {
        for (p, img) in pages {
            sink(*p, img).map_err(|e| io_err(Path::new("test"))(e))?;
        }
        Ok(())
    })
    .unwrap();
}

/// The whole content of `f`.
fn file_bytes(f: &File) -> Vec<u8> {
    let mut got = Vec::new();
    let mut f = f;
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut got).unwrap();
    got
}

/// The buffered applier leaves a file exactly as writing every record in turn would:
/// random pages, sizes that shrink and grow back, snapshots, flushes at any point.
#[test]
fn applier_matches_record_by_record() {
    let mut rnd = xorshift(0x9e37_79b9_7f4a_7c15);
    for limit in [512, 4096, 1 << 20] {
        let f = tempfile::tempfile().unwrap();
        let mut model: Vec<u8> = Vec::new();
        let mut a = Applier::new(&f, &BaseMeta::default());
        a.limit = limit;
        for t in 1..=300u64 {
            let snapshot = rnd(25) == 0;
            let size = 1 + rnd(12) as u32;
            let mut h = hdr(t, size);
            h.kind = if snapshot { Kind::Snapshot } else { Kind::Txn };
            if snapshot {
                model.clear();
            }
            let pages: Vec<(u32, Vec<u8>)> = (0..1 + rnd(3))
                .map(|_| (1 + rnd(size as u64) as u32, vec![rnd(256) as u8; 512]))
                .collect();
            for (p, img) in &pages {
                let at = (*p as usize - 1) * 512;
                if model.len() < at + 512 {
                    model.resize(at + 512, 0);
                }
                model[at..at + 512].copy_from_slice(img);
            }
            model.resize(size as usize * 512, 0);
            apply_pages(&mut a, &mut h, &pages);
            if rnd(7) == 0 {
                a.flush().unwrap();
                assert_eq!(file_bytes(&f), model, "limit {limit}, after TXID {t}");
            }
        }
    }
}

/// Runs of consecutive pages are written together, split at [`apply::RUN_PAGES`] and at
/// every gap, and land where writing them one by one would put them.
#[test]
fn applier_writes_runs_of_pages_at_their_places() {
    let f = tempfile::tempfile().unwrap();
    let mut a = Applier::new(&f, &BaseMeta::default());
    a.limit = 64 << 20;
    let run = apply::RUN_PAGES as u32;
    // (first page, pages) of each run, with gaps between them.
    let runs = [
        (1, run - 1),
        (run + 1, run),
        (2 * run + 2, run + 1),
        (3 * run + 9, 3 * run),
    ];
    let size = 6 * run + 20;
    let mut model = vec![0u8; size as usize * 512];
    let mut pages = Vec::new();
    for &(first, n) in &runs {
        for p in first..first + n {
            let img: Vec<u8> = (0..512u32).map(|i| (p * 7 + i) as u8).collect();
            model[(p as usize - 1) * 512..][..512].copy_from_slice(&img);
            pages.push((p, img));
        }
    }
    apply_pages(&mut a, &mut hdr(1, size), &pages);
    a.flush().unwrap();
    assert!(file_bytes(&f) == model, "the file differs from its pages");
}

/// Small records wait in memory until a flush (or a sync) and then reach the file in one
/// write; a record over [`FLUSH_AT`] goes out at once, after those gathered before it.
#[test]
fn appends_are_gathered_until_a_flush() {
    let d = tempfile::tempdir().unwrap();
    let st = DbStage::open(d.path(), Access::Write).unwrap();
    let page = vec![7u8; 512];
    for t in 1..=3u64 {
        st.append(&hdr(t, 1), |emit| emit(1, &page)).unwrap();
    }
    assert!(st.last().is_none(), "gathered records are not shown yet");
    assert!(st.headers().unwrap().is_empty());
    assert!(st.is_dirty());
    st.flush().unwrap();
    assert_eq!(st.last().unwrap().txid, 3);
    assert_eq!(st.headers().unwrap().len(), 3);
    st.append(&hdr(4, 1), |emit| emit(1, &page)).unwrap();
    let big = FLUSH_AT as u32 / 512 + 1;
    let mut h = hdr(5, big);
    h.npages = big;
    h.db_pages = big;
    st.append(&h, |emit| (1..=big).try_for_each(|p| emit(p, &page)))
        .unwrap();
    let txids: Vec<u64> = st.headers().unwrap().iter().map(|h| h.txid).collect();
    assert_eq!(txids, vec![1, 2, 3, 4, 5]);
    assert_eq!(st.last().unwrap().txid, 5);
}

/// A failed write of gathered records loses them and nothing after them lands: the
/// failure is reported once (by the flush that failed, or by the next flush when a sync
/// failed), appends fail until then, and the file keeps only whole records before the gap.
#[test]
fn a_failed_write_of_gathered_records_is_reported_once() {
    let d = tempfile::tempdir().unwrap();
    let st = DbStage::open(d.path(), Access::Write).unwrap();
    let page = vec![7u8; 512];
    let add = |t: u64| st.append(&hdr(t, 1), |emit| emit(1, &page));
    // Writes to the segment fail from now on (a descriptor opened for reading only).
    let break_writes = || {
        let mut g = st.app.lock();
        let a = g.as_mut().unwrap();
        a.file = File::open(&a.path).unwrap();
    };
    add(1).unwrap();
    st.flush().unwrap();
    add(2).unwrap();
    break_writes();
    assert!(st.flush().is_err());
    assert!(st.flush().is_ok(), "reported once");
    // A sync that fails holds the loss until a flush reports it.
    *st.app.lock() = None;
    add(2).unwrap();
    break_writes();
    assert!(st.sync().is_err());
    assert!(add(3).is_err(), "no record may follow the gap");
    assert!(st.flush().is_err());
    *st.app.lock() = None;
    add(2).unwrap();
    st.sync().unwrap();
    let txids: Vec<u64> = st.headers().unwrap().iter().map(|h| h.txid).collect();
    assert_eq!(txids, vec![1, 2]);
    assert_eq!(st.last().unwrap().txid, 2);
}

#[test]
fn append_materialize_fold_and_torn_tail() {
    let d = tempfile::tempdir().unwrap();
    let st = DbStage::open(d.path(), Access::Write).unwrap();
    for t in 1..=40u64 {
        let page = vec![t as u8; 512];
        st.append(&hdr(t, (t % 5 + 1) as u32), |emit| {
            emit((t % 5 + 1) as u32, &page)
        })
        .unwrap();
    }
    st.sync().unwrap();
    let out = tempfile::tempfile().unwrap();
    let m = st.materialize(7, &out).unwrap();
    assert_eq!(m.txid, 7);
    assert_eq!(out.metadata().unwrap().len(), 3 * 512);
    // Torn tail: append garbage, reopen, it is cut off and the last record survives.
    let seg = st.segments().unwrap().last().unwrap().1.clone();
    drop(st);
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(b"SQTX\x01garbage")
        .unwrap();
    let st = DbStage::open(d.path(), Access::Write).unwrap();
    assert_eq!(st.last().unwrap().txid, 40);
    assert_eq!(st.headers().unwrap().len(), 40);
    // Folding keeps every state at or after the base reachable.
    st.fold_upto(20).unwrap();
    assert_eq!(st.base_meta().unwrap().txid, 20);
    let out2 = tempfile::tempfile().unwrap();
    st.materialize(40, &out2).unwrap();
    assert!(st.materialize(10, &out2).is_err());
}

/// (page number, segment offset) of each entry of the coded record `h` at `off`.
fn coded_entries(f: &File, off: u64, h: &RecordHeader) -> Vec<(u32, u64)> {
    let mut body = vec![0u8; h.coded.unwrap() as usize];
    let at = off + RECORD_HEADER as u64;
    f.read_exact_at(&mut body, at).unwrap();
    let es = crate::delta::entries(&body, at, h.page_size as usize).unwrap();
    es.iter().map(|e| (e.pgno, e.at)).collect()
}

/// Small records code their pages against earlier ones; every way of reading staging
/// gives back the pages as appended: replay (`materialize`), random access to one entry
/// (`delta::entries` + `read_entry`), after reopening, after a fold. Large records stay
/// whole.
#[test]
fn coded_pages_read_back_as_appended() {
    const PS: usize = 4096;
    let mut rnd = xorshift(0x51_7cc1_b727_220a);
    let d = tempfile::tempdir().unwrap();
    let st = DbStage::open(d.path(), Access::Write).unwrap();
    let mut model = vec![vec![0u8; PS]; 8];
    // TXID → (pages it wrote, the whole database after it).
    let mut states: Vec<(Vec<u32>, Vec<Vec<u8>>)> = vec![(vec![], vec![])];
    let mut whole_bytes = 0u64;
    for t in 1..=600u64 {
        let big = rnd(50) == 0;
        let touched: Vec<u32> = if big {
            (1..=8).collect()
        } else {
            let mut v: Vec<u32> = (0..1 + rnd(3)).map(|_| 1 + rnd(8) as u32).collect();
            v.sort();
            v.dedup();
            v
        };
        for &p in &touched {
            let page = &mut model[p as usize - 1];
            if rnd(20) == 0 {
                page.iter_mut().for_each(|b| *b = rnd(256) as u8);
            } else {
                for _ in 0..1 + rnd(3) {
                    let at = rnd(PS as u64) as usize;
                    let len = (1 + rnd(200) as usize).min(PS - at);
                    page[at..at + len]
                        .iter_mut()
                        .for_each(|b| *b = rnd(256) as u8);
                }
            }
        }
        let mut h = RecordHeader {
            time_ns: t,
            db_pages: 8,
            ..RecordHeader::test(Kind::Txn, t, PS as u32, touched.len() as u32)
        };
        if big {
            // Over FLUSH_AT: written whole, at once. The pages past 8 are zeros, and the
            // next record cuts the database back to 8 pages.
            h.npages = (FLUSH_AT / PS + 1) as u32;
            h.db_pages = h.npages;
        } else {
            whole_bytes += h.len();
        }
        let mut state = model.clone();
        state.resize(h.db_pages as usize, vec![0u8; PS]);
        let pages: Vec<u32> = if big {
            (1..=h.npages).collect()
        } else {
            touched
        };
        st.append(&h, |emit| {
            (pages.iter()).try_for_each(|&p| emit(p, &state[p as usize - 1]))
        })
        .unwrap();
        if rnd(10) == 0 {
            st.flush().unwrap();
        }
        states.push((pages, state));
    }
    st.sync().unwrap();
    let staged: u64 = (st.segments().unwrap().iter())
        .flat_map(|(_, seg)| scan_headers(seg, 0).unwrap())
        .filter(|(h, _)| h.coded.is_some())
        .map(|(h, _)| h.len())
        .sum();
    assert!(
        staged * 3 < whole_bytes,
        "small records: {staged} bytes coded against {whole_bytes} whole"
    );
    let check = |st: &DbStage, from: u64| {
        let out = tempfile::tempfile().unwrap();
        for t in (from..=600).step_by(37).chain([600]) {
            st.materialize(t, &out).unwrap();
            let mut got = Vec::new();
            (&out).seek(SeekFrom::Start(0)).unwrap();
            (&out).read_to_end(&mut got).unwrap();
            assert_eq!(got, states[t as usize].1.concat(), "state after TXID {t}");
        }
        for (_, seg) in st.segments().unwrap() {
            let f = File::open(&seg).unwrap();
            for (h, off) in scan_headers(&seg, 0).unwrap() {
                if h.coded.is_none() {
                    continue;
                }
                let (pages, state) = &states[h.txid as usize];
                let entries = coded_entries(&f, off, &h);
                assert_eq!(entries.iter().map(|e| e.0).collect::<Vec<_>>(), *pages);
                for (pgno, at) in entries {
                    let mut page = vec![0u8; PS];
                    crate::delta::read_entry(&f, at, &mut page, 0).unwrap();
                    assert_eq!(page, state[pgno as usize - 1], "TXID {}", h.txid);
                }
            }
        }
    };
    check(&st, 1);
    drop(st);
    let st = DbStage::open(d.path(), Access::Write).unwrap();
    assert_eq!(st.last().unwrap().txid, 600);
    check(&st, 1);
    // Folding half of it: the rest still reads back.
    st.fold_upto(300).unwrap();
    check(&st, 301);
}

/// A staging log in `dir` holding TXIDs 1..=3, one 512-byte page each, written to its file.
fn three_records(dir: &Path) -> DbStage {
    let st = DbStage::open(dir, Access::Write).unwrap();
    let page = vec![7u8; 512];
    for t in 1..=3u64 {
        st.append(&hdr(t, 1), |emit| emit(1, &page)).unwrap();
    }
    st.flush().unwrap();
    st
}

/// A reader of records up to the last written one stops there: a record being appended
/// after it (its first bytes on the file, the rest not yet) is never read as a damaged one.
#[test]
fn a_record_being_written_past_the_range_is_not_read() {
    let d = tempfile::tempdir().unwrap();
    let st = three_records(d.path());
    // Records after them, the last one short of a byte, as a concurrent append would leave
    // the file for a moment.
    let (_, path) = st.segments().unwrap().pop().unwrap();
    let whole = fs::read(&path).unwrap();
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&whole[..whole.len() - 1]).unwrap();
    let mut seen = Vec::new();
    st.for_each(0, 3, |h, pages| {
        seen.push(h.txid);
        pages(&mut |_, _| Ok(()))
    })
    .unwrap();
    assert_eq!(seen, vec![1, 2, 3]);
    assert!(
        st.for_each(0, u64::MAX, |_, _| Ok(())).is_err(),
        "a read past the last record meets the torn one"
    );
}

/// A fold never reads into the segment an append is writing: with the last segment holding
/// only the first bytes of its first record, the sealed segments before it still fold.
#[test]
fn a_fold_does_not_read_a_segment_being_appended() {
    let d = tempfile::tempdir().unwrap();
    drop(three_records(d.path()));
    let st = DbStage::open(d.path(), Access::Write).unwrap();
    let (_, first) = st.segments().unwrap().pop().unwrap();
    let whole = fs::read(&first).unwrap();
    // The next segment, as an append starting it leaves the file for a moment.
    let next = d.path().join("log").join(seg_name(4));
    fs::write(&next, &whole[..whole.len() / 3 - 1]).unwrap();
    st.fold(3).unwrap();
    assert!(!first.exists(), "the sealed segment was folded");
    assert!(next.exists(), "the segment being appended stays");
    assert_eq!(st.base_meta().unwrap().txid, 3);
}

/// Writers of one path at once each succeed, and the file ends as one of them wrote it,
/// whole; no temporary file is left.
#[test]
fn write_atomic_with_writers_of_one_path_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claim");
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let path = &path;
            s.spawn(move || {
                for i in 0..50u8 {
                    let data = vec![t.wrapping_mul(31).wrapping_add(i); 4096];
                    write_atomic(path, &data).unwrap();
                }
            });
        }
    });
    let got = fs::read(&path).unwrap();
    assert_eq!(got.len(), 4096);
    assert!(got.iter().all(|b| *b == got[0]), "mixed bytes");
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("claim")]);
}

/// A record staged ahead and adopted reads back like an appended one, between small records
/// gathered before it and appended after it; its patched pages are the ones applied. One
/// dropped (a transaction rolled back) or left by a crash leaves nothing in the log.
#[test]
fn a_record_staged_ahead_joins_the_log_whole() {
    const PS: usize = 512;
    let d = tempfile::tempdir().unwrap();
    let st = DbStage::open(d.path(), Access::Write).unwrap();
    let page = |p: u32, v: u8| {
        let mut b = vec![v; PS];
        b[..4].copy_from_slice(&p.to_be_bytes());
        b
    };
    let small = |st: &DbStage, txid: u64, v: u8| {
        let mut h = hdr(txid, 3);
        h.npages = 1;
        st.append(&h, |emit| emit(2, &page(2, v))).unwrap();
    };
    small(&st, 1, 1);
    small(&st, 2, 2);
    // Rolled back: dropped, its file goes.
    let mut gone = st.prestage(PS as u32).unwrap();
    gone.push(3, &page(3, 9), 0).unwrap();
    drop(gone);
    // Pages 3..=2000 in write order 2000 down to 3, page 7 rewritten before the commit.
    let mut p = st.prestage(PS as u32).unwrap();
    for n in (3..=2000u32).rev() {
        p.push(n, &page(n, 3), crate::sqlite::page_crc(n, &page(n, 3)))
            .unwrap();
    }
    assert!(p.push(5, &page(5, 3), 0).is_err(), "a page given twice");
    let k = p.entry_of(7).unwrap();
    p.patch(k, &page(7, 4), 0).unwrap();
    let mut h = hdr(3, 2000);
    h.npages = p.entries().len() as u32;
    // The wrong record for it is refused, and nothing is appended.
    let mut wrong = h;
    wrong.npages += 1;
    let p = match st.adopt(p, &wrong) {
        Err(_) => {
            let mut again = st.prestage(PS as u32).unwrap();
            for n in (3..=2000u32).rev() {
                let v = if n == 7 { 4 } else { 3 };
                again.push(n, &page(n, v), 0).unwrap();
            }
            again
        }
        Ok(()) => panic!("a record of the wrong size was adopted"),
    };
    // (TXIDs 1 and 2 are still gathered in memory: adopting writes them first.)
    assert!(st.last().is_none());
    st.adopt(p, &h).unwrap();
    assert_eq!(st.last().unwrap().txid, 3);
    small(&st, 4, 5);
    st.sync().unwrap();
    let want = |txid: u64| -> Vec<u8> {
        let mut img = vec![page(1, 0); 2000];
        img[0] = vec![0; PS];
        img[1] = page(2, if txid >= 4 { 5 } else { 2 });
        for n in 3..=2000u32 {
            img[n as usize - 1] = page(n, if n == 7 { 4 } else { 3 });
        }
        img.truncate(if txid >= 4 { 3 } else { 2000 });
        img.concat()
    };
    let check = |st: &DbStage| {
        let out = tempfile::tempfile().unwrap();
        for t in [3, 4] {
            st.materialize(t, &out).unwrap();
            let got = file_bytes(&out);
            assert_eq!(got[PS..], want(t)[PS..], "state after TXID {t}");
        }
    };
    check(&st);
    let logdir = d.path().join("log");
    let names = || -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&logdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(), [seg_name(1), seg_name(3)], "a segment of its own");
    // A crash while one is staged ahead: the next open removes its file.
    let left = st.prestage(PS as u32).unwrap();
    std::mem::forget(left);
    assert_eq!(names().len(), 3);
    drop(st);
    let st = DbStage::open(d.path(), Access::Write).unwrap();
    assert_eq!(names(), [seg_name(1), seg_name(3)]);
    assert_eq!(st.last().unwrap().txid, 4);
    check(&st);
}
