//! Unit tests of replica objects: round trips, corruption, version 1, reading in place.

use super::*;
use std::fs::File;

use crate::record::{Kind, RecordHeader};

/// A large record is cut into frames, and every page named by the index can be read by
/// decompressing just its frame; streaming still sees the whole record.
#[test]
fn large_records_are_framed_and_indexed() {
    let ps = 512usize;
    let n = 600u32;
    let page = |p: u32| vec![(p % 251) as u8; ps];
    let h = RecordHeader {
        time_ns: 1,
        ..RecordHeader::test(Kind::Snapshot, 7, ps as u32, n)
    };
    let mut w =
        ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Snapshot, 0, "00").unwrap();
    w.add(&h, |emit| (1..=n).try_for_each(|p| emit(p, &page(p))))
        .unwrap();
    let (hdr, f) = w.finish().unwrap();
    let hdr2 = verify(&f, "obj").unwrap();
    assert_eq!(hdr, hdr2);
    let mut idx = vec![0u8; hdr.nindex as usize * INDEX_ENTRY];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut idx, hdr.index_off).unwrap();
    let mut frames = std::collections::BTreeSet::new();
    for e in idx.chunks(INDEX_ENTRY) {
        let pgno = u32::from_be_bytes(e[0..4].try_into().unwrap());
        let off = u64::from_be_bytes(e[12..20].try_into().unwrap());
        let len = u32::from_be_bytes(e[20..24].try_into().unwrap()) as usize;
        let at = u32::from_be_bytes(e[24..28].try_into().unwrap()) as usize;
        frames.insert(off);
        let mut z = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut z, off).unwrap();
        let raw = zstd::stream::decode_all(&z[..]).unwrap();
        assert_eq!(&raw[at..at + ps], &page(pgno)[..], "page {pgno}");
    }
    assert_eq!(frames.len(), 3, "600 pages in frames of 256");
    let mut seen = 0;
    for_each_txn(&f, &hdr, "obj", |ev| {
        if let Event::Page(p, d) = ev {
            assert_eq!(d, &page(p)[..]);
            seen += 1;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, n);
}

/// Small records share frames; big ones are cut between pages; every page the index
/// names is in its frame, and streaming sees every record in order.
#[test]
fn small_records_share_frames() {
    let ps = 512usize;
    let page = |t: u64, p: u32| vec![((t * 7 + p as u64) % 251) as u8; ps];
    let sizes: Vec<u32> = (0..900u64)
        .map(|t| {
            if t % 300 == 299 {
                400
            } else {
                1 + (t % 3) as u32
            }
        })
        .collect();
    let mut w =
        ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Segment, 0, "00").unwrap();
    for (i, &np) in sizes.iter().enumerate() {
        let t = i as u64 + 1;
        let h = RecordHeader {
            db_pages: 500,
            ..RecordHeader::test(Kind::Txn, t, ps as u32, np)
        };
        w.add(&h, |emit| (1..=np).try_for_each(|p| emit(p, &page(t, p))))
            .unwrap();
    }
    let (hdr, f) = w.finish().unwrap();
    assert_eq!(verify(&f, "obj").unwrap(), hdr);
    let total: u32 = sizes.iter().sum();
    assert_eq!(hdr.nindex, total);
    let mut idx = vec![0u8; hdr.nindex as usize * INDEX_ENTRY];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut idx, hdr.index_off).unwrap();
    let mut frames = std::collections::BTreeSet::new();
    let mut last_txid = 0;
    for e in idx.chunks(INDEX_ENTRY) {
        let pgno = u32::from_be_bytes(e[0..4].try_into().unwrap());
        let txid = u64::from_be_bytes(e[4..12].try_into().unwrap());
        let off = u64::from_be_bytes(e[12..20].try_into().unwrap());
        let len = u32::from_be_bytes(e[20..24].try_into().unwrap()) as usize;
        let at = u32::from_be_bytes(e[24..28].try_into().unwrap()) as usize;
        assert!(txid >= last_txid, "index in TXID order");
        last_txid = txid;
        frames.insert(off);
        let mut z = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut z, off).unwrap();
        let raw = zstd::stream::decode_all(&z[..]).unwrap();
        assert!(
            raw[at..at + ps] == page(txid, pgno)[..],
            "TXID {txid} page {pgno}"
        );
    }
    assert!(
        frames.len() < 30,
        "{} frames for {} records of {total} pages",
        frames.len(),
        sizes.len()
    );
    let mut seen = Vec::new();
    for_each_txn(&f, &hdr, "obj", |ev| {
        if let Event::Start(h) = ev {
            seen.push(h.txid);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, (1..=sizes.len() as u64).collect::<Vec<_>>());
}
/// An object of another format version (its trailing CRC fixed) is refused by both
/// `parse_header` and `verify`, naming it and the version.
#[test]
fn another_format_version_is_refused() {
    use std::os::unix::fs::FileExt;
    let h = RecordHeader::test(Kind::Txn, 1, 512, 1);
    let mut w =
        ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Segment, 0, "00").unwrap();
    w.add(&h, |emit| emit(1, &[7u8; 512])).unwrap();
    let (_, f) = w.finish().unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, 0).unwrap();
    b[8..10].copy_from_slice(&(VERSION + 1).to_be_bytes());
    let body = b.len() - 8;
    let mut crc = crate::sqlite::crc64();
    crc.update(&b[..body]);
    let sum = crc.finalize().to_be_bytes();
    b[body..].copy_from_slice(&sum);
    f.write_all_at(&b, 0).unwrap();
    let want = format!("obj has object format version {}", VERSION + 1);
    let e = verify(&f, "obj").unwrap_err();
    assert!(matches!(e, ObjectError::Version { .. }), "{e}");
    assert!(e.to_string().starts_with(&want), "{e}");
    let e = parse_header(&b[..HEADER], "obj").unwrap_err();
    assert!(e.to_string().starts_with(&want), "{e}");
}

fn sample_object(ps: usize, sizes: &[u32]) -> (ObjHeader, File) {
    sample_object_in(tempfile::tempfile().unwrap(), ps, sizes)
}

fn sample_object_in(f: File, ps: usize, sizes: &[u32]) -> (ObjHeader, File) {
    let mut w = ObjectWriter::new(f, ObjKind::Segment, 0, "00").unwrap();
    for (i, &np) in sizes.iter().enumerate() {
        let t = i as u64 + 1;
        let h = RecordHeader {
            time_ns: 1000 + t,
            db_pages: 700,
            ..RecordHeader::test(Kind::Txn, t, ps as u32, np)
        };
        w.add(&h, |emit| {
            (1..=np).try_for_each(|p| emit(p, &vec![((t * 13 + p as u64) % 251) as u8; ps]))
        })
        .unwrap();
    }
    w.finish().unwrap()
}

/// The directory of a version-2 object verifies alone (header + directory), names every
/// record and frame, and each frame verified and decoded alone holds the pages the index
/// says; a flipped byte anywhere in the directory, header or a frame is caught.
#[test]
fn directory_verifies_ranged_pieces() {
    use std::os::unix::fs::FileExt;
    let ps = 512usize;
    let sizes = [3u32, 600, 1, 1, 2, 300, 5];
    let (hdr, f) = sample_object(ps, &sizes);
    assert_eq!(hdr.version, VERSION);
    let mut head = vec![0u8; HEADER];
    f.read_exact_at(&mut head, 0).unwrap();
    let mut dir = vec![0u8; hdr.index_len as usize];
    f.read_exact_at(&mut dir, hdr.index_off).unwrap();
    let d = parse_directory(&head, &hdr, &dir, "obj").unwrap();
    assert_eq!(d.records.len(), sizes.len());
    assert_eq!(
        d.records.iter().map(|r| r.txid).collect::<Vec<_>>(),
        (1..=sizes.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(d.index.len() as u32, sizes.iter().sum::<u32>());
    let mut decoded = std::collections::HashMap::new();
    for e in &d.index {
        let fr = d.frames[e.frame as usize];
        let raw = decoded.entry(e.frame).or_insert_with(|| {
            let mut z = vec![0u8; fr.len as usize];
            f.read_exact_at(&mut z, fr.off).unwrap();
            decode_frame(&fr, &z, "obj").unwrap()
        });
        let at = e.in_frame as usize;
        assert_eq!(
            u32::from_be_bytes(raw[at - 4..at].try_into().unwrap()),
            e.pgno
        );
        assert!(raw[at..at + ps]
            .iter()
            .all(|&b| b == ((e.txid * 13 + e.pgno as u64) % 251) as u8));
    }
    assert_eq!(decoded.len(), d.frames.len(), "every frame holds a page");
    // Damage is caught: the directory, the header under its CRC, a frame.
    for i in [0, dir.len() / 2, dir.len() - 1] {
        let mut bad = dir.clone();
        bad[i] ^= 1;
        assert!(
            parse_directory(&head, &hdr, &bad, "obj").is_err(),
            "byte {i}"
        );
    }
    let mut bad_head = head.clone();
    bad_head[60] ^= 1;
    assert!(parse_directory(&bad_head, &hdr, &dir, "obj").is_err());
    let fr = d.frames[1];
    let mut z = vec![0u8; fr.len as usize];
    f.read_exact_at(&mut z, fr.off).unwrap();
    let mid = z.len() / 2;
    z[mid] ^= 0x40;
    assert!(decode_frame(&fr, &z, "obj").is_err());
    assert!(decode_frame(&fr, &z[1..], "obj").is_err());
}

/// Objects written by a build of format version 1 still verify and stream.
#[test]
fn version_1_objects_still_read() {
    let (hdr, f) = sample_object(512, &[2, 300, 1]);
    let old = downgrade_to_v1(&f, &hdr);
    let h1 = verify(&old, "old").unwrap();
    assert_eq!(h1.version, 1);
    let mut seen = Vec::new();
    for_each_txn(&old, &h1, "old", |ev| {
        if let Event::Start(h) = ev {
            seen.push(h.txid);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, vec![1, 2, 3]);
    let mut idx = vec![0u8; h1.index_len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&old, &mut idx, h1.index_off).unwrap();
    let d = parse_v1_index(&idx, "old").unwrap();
    assert_eq!(d.index.len(), 303);
    assert!(d.frames.iter().all(|f| f.crc.is_none()));
    // A version this build does not know is refused.
    let mut head = [0u8; HEADER];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
    head[9] = 9;
    assert!(matches!(
        parse_header(&head, "x"),
        Err(ObjectError::Version { version: 9, .. })
    ));
}

/// A file that held a larger object (or any bytes) is reused as it is: the object built in it
/// is byte for byte the one built in a new file, and nothing of the old bytes is left past it.
#[test]
fn an_object_built_over_an_earlier_one_is_exact() {
    use std::io::{Read, Seek};
    let read_all = |f: &File| {
        let mut b = Vec::new();
        (&*f).seek(std::io::SeekFrom::Start(0)).unwrap();
        (&*f).read_to_end(&mut b).unwrap();
        b
    };
    let (_, fresh) = sample_object(512, &[1, 2, 3]);
    let want = read_all(&fresh);
    let (big, reused) = sample_object(512, &[40, 400, 7, 9]);
    assert!(big.index_off > want.len() as u64);
    // Twice over the same file: a context a thread kept compresses as a new one.
    let (hdr, reused) = sample_object_in(reused, 512, &[1, 2, 3]);
    let (hdr2, reused) = sample_object_in(reused, 512, &[1, 2, 3]);
    assert_eq!(hdr, hdr2);
    assert_eq!(read_all(&reused), want);
    assert_eq!(verify(&reused, "obj").unwrap(), hdr);
}

/// A small object is built in memory and written once: the bytes `finish_with_bytes` returns
/// are the file's, byte for byte. One that outgrows memory continues in its file, returns no
/// bytes, and verifies the same way.
#[test]
fn small_objects_are_built_in_memory_large_ones_in_their_file() {
    use std::io::{Read, Seek};
    let build = |pages: u32| {
        let ps = 4096usize;
        let h = RecordHeader {
            time_ns: 1,
            ..RecordHeader::test(Kind::Txn, 1, ps as u32, pages)
        };
        let mut w =
            ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Segment, 0, "00").unwrap();
        // Pages that do not compress: the object is about as large as its pages.
        let mut noise = noise(0x9e37_79b9_7f4a_7c15);
        w.add(&h, |emit| {
            (1..=pages).try_for_each(|p| emit(p, &(0..ps).map(|_| noise()).collect::<Vec<u8>>()))
        })
        .unwrap();
        let (hdr, f, bytes) = w.finish_with_bytes().unwrap();
        assert_eq!(verify(&f, "obj").unwrap(), hdr);
        let mut on_disk = Vec::new();
        (&f).seek(std::io::SeekFrom::Start(0)).unwrap();
        (&f).read_to_end(&mut on_disk).unwrap();
        (bytes, on_disk)
    };
    let (bytes, on_disk) = build(3);
    assert_eq!(bytes.as_deref(), Some(&on_disk[..]));
    let (bytes, on_disk) = build(600);
    assert!(on_disk.len() > MEM_MAX, "{} bytes", on_disk.len());
    assert!(bytes.is_none());
}

/// Bytes that do not compress (xorshift64 from `seed`).
fn noise(mut x: u64) -> impl FnMut() -> u8 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }
}

/// `writer::raw_frame` is a zstd frame every decoder reads back, at every block boundary.
#[test]
fn raw_frames_decode_as_zstd() {
    let mut noise = noise(0x9E37_79B9_7F4A_7C15);
    for n in [0usize, 1, 4096, 128 << 10, (128 << 10) + 1, (1 << 20) + 7] {
        let b: Vec<u8> = (0..n).map(|_| noise()).collect();
        let z = writer::raw_frame(&b).unwrap();
        assert_eq!(
            zstd::stream::decode_all(&z[..]).unwrap(),
            b,
            "{n} bytes, stream"
        );
        assert_eq!(zstd::bulk::decompress(&z, n).unwrap(), b, "{n} bytes, bulk");
    }
}

/// Frames that do not compress are stored raw once one did not compress (the next is only
/// sampled); a compressible frame after them is compressed again; every page reads back.
#[test]
fn incompressible_frames_are_stored_raw() {
    let ps = 4096usize;
    let mut noise = noise(0x2545_F491_4F6C_DD1D);
    // 256 pages a frame, each cut as its last page is added: frames 0-2 random, 3-4
    // compressible, 5-7 random. Frames 1, 2, 6 and 7 are stored raw; 0 and 5 are tried.
    let pages: Vec<Vec<u8>> = (0..8 * 256u32)
        .map(|p| match p / 256 {
            3 | 4 => vec![(p % 7) as u8; ps],
            _ => (0..ps).map(|_| noise()).collect(),
        })
        .collect();
    let n = pages.len() as u32;
    let h = RecordHeader::test(Kind::Snapshot, 7, ps as u32, n);
    let mut w =
        ObjectWriter::new(tempfile::tempfile().unwrap(), ObjKind::Snapshot, 0, "00").unwrap();
    w.add(&h, |emit| {
        (1..=n).try_for_each(|p| emit(p, &pages[p as usize - 1]))
    })
    .unwrap();
    assert_eq!(w.frames_stored_raw(), 4);
    let (hdr, f) = w.finish().unwrap();
    verify(&f, "obj").unwrap();
    let mut idx = vec![0u8; hdr.nindex as usize * INDEX_ENTRY];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut idx, hdr.index_off).unwrap();
    let mut frames = std::collections::BTreeMap::new();
    for e in idx.chunks(INDEX_ENTRY) {
        let off = u64::from_be_bytes(e[12..20].try_into().unwrap());
        let len = u32::from_be_bytes(e[20..24].try_into().unwrap()) as usize;
        frames.insert(off, len);
    }
    let small: Vec<bool> = frames.values().map(|&len| len < 256 * ps / 2).collect();
    assert_eq!(
        small,
        [false, false, false, true, true, false, false, false]
    );
    let mut seen = 0;
    for_each_txn(&f, &hdr, "obj", |ev| {
        if let Event::Page(p, d) = ev {
            assert_eq!(d, &pages[p as usize - 1][..], "page {p}");
            seen += 1;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, n);
}
