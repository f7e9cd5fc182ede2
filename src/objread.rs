//! Replica objects read in place, a range at a time: how `.history` views serve pages from a
//! replica without downloading whole objects.
//!
//! Opening an object reads its header and its directory (docs/FORMAT.md, "Replica objects",
//! format version 2) with range reads — one request for a small object — and verifies them;
//! each page read then fetches just the zstd frame holding it and checks that frame's CRC-64
//! before decompressing it. Encrypted objects are read through age's seekable reader over
//! ranged reads of the ciphertext: only the 64 KiB encryption chunks overlapping a wanted range
//! are fetched and decrypted, and age authenticates each of them.
//!
//! Objects of format version 1 have no per-frame checksums: [`ObjReader::open`] reports them
//! as [`Opened::Whole`], and the caller downloads and verifies them whole, then reads them
//! through [`ObjReader::local`].
//!
//! Invariants:
//! - No byte of an object is used before it is verified: the header and directory under the
//!   directory CRC, each frame under its own CRC (and, encrypted, under age's chunk tags); a
//!   local (version 1) copy only after its whole-object CRC matched.
//! - Objects are immutable in a replica, so whatever was read and verified stays valid.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use parking_lot::Mutex;

use crate::crypt::{self, Opener};
use crate::record::{RecordHeader, RECORD_HEADER};
use crate::replica::ReplicaClient;
use crate::segment::{self, Directory, ObjHeader, ObjKind, HEADER};

/// The first request for an object asks for this much: the header, and all of a small object
/// (whose directory and frames are then served from memory).
const PREFIX: u64 = 64 * 1024;
/// Plain bytes per age encryption chunk, and the bytes it takes encrypted (tag included).
const AGE_CHUNK: u64 = 64 * 1024;
const AGE_CHUNK_SEALED: u64 = AGE_CHUNK + 16;
/// Least a ranged read of ciphertext fetches when it runs out of buffered bytes.
const SEALED_READ_AHEAD: u64 = 2 * AGE_CHUNK_SEALED;

/// Bytes `off..off + len` of `key`, exactly (a shorter answer is an error).
fn fetch(client: &dyn ReplicaClient, key: &str, off: u64, len: u64) -> Result<Vec<u8>> {
    let b = client
        .get_range(key, off, len)?
        .ok_or_else(|| anyhow!("{key} is missing from {}", client.describe()))?;
    if b.len() as u64 != len {
        bail!(
            "{key}: asked for {len} bytes at {off}, got {} (the object is shorter than listed)",
            b.len()
        );
    }
    Ok(b)
}

/// What opening an object found.
pub enum Opened {
    /// Read in place from now on.
    Ranged(Box<ObjReader>),
    /// A format version-1 object: it has no per-frame checksums, so it can only be trusted
    /// whole; download it, verify it, and use [`ObjReader::local`].
    Whole,
}

/// One object of a replica, opened: its verified header and directory, and where its frames
/// are read from.
pub struct ObjReader {
    pub key: String,
    pub hdr: ObjHeader,
    pub dir: Directory,
    src: Source,
}

enum Source {
    /// A local copy verified whole.
    Local(File),
    /// A plain object in the replica; `all` holds the whole object when it is small.
    Plain {
        client: Arc<dyn ReplicaClient>,
        all: Option<Vec<u8>>,
    },
    /// An encrypted object in the replica, through age's seekable reader (one reader per
    /// object: reads of it take turns).
    Sealed {
        reader: Box<Mutex<age::stream::StreamReader<Ranged>>>,
        read_ahead: Arc<AtomicU64>,
    },
}

impl ObjReader {
    /// Opens object `key` of `client`, listed with `size` bytes, decrypting with `opener` if
    /// it is encrypted: reads and verifies its header and directory, nothing of its body.
    pub fn open(
        client: &Arc<dyn ReplicaClient>,
        key: &str,
        size: u64,
        opener: Option<&Opener>,
    ) -> Result<Opened> {
        if size < (HEADER + 8) as u64 {
            bail!("{key} is too short to be a replica object ({size} bytes)");
        }
        let prefix = fetch(client.as_ref(), key, 0, size.min(PREFIX))?;
        if crypt::is_sealed(&prefix) {
            let opener = opener.ok_or_else(|| {
                anyhow!("{key} is encrypted; the mount needs --age-identity FILE or --passphrase-env VAR to read it")
            })?;
            return Self::open_sealed(client, key, size, opener, prefix);
        }
        let hdr = segment::parse_header(&prefix, key)?;
        if hdr.version < 2 {
            return Ok(Opened::Whole);
        }
        check_layout(&hdr, size, key)?;
        let head = prefix[..HEADER].to_vec();
        let all = (size <= PREFIX).then_some(prefix);
        let dir = match &all {
            Some(b) => b[hdr.index_off as usize..(hdr.index_off + hdr.index_len) as usize].to_vec(),
            None => fetch(client.as_ref(), key, hdr.index_off, hdr.index_len)?,
        };
        let dir = segment::parse_directory(&head, &hdr, &dir, key)?;
        Ok(Opened::Ranged(Box::new(ObjReader {
            key: key.to_string(),
            hdr,
            dir,
            src: Source::Plain {
                client: client.clone(),
                all,
            },
        })))
    }

    fn open_sealed(
        client: &Arc<dyn ReplicaClient>,
        key: &str,
        size: u64,
        opener: &Opener,
        prefix: Vec<u8>,
    ) -> Result<Opened> {
        let read_ahead = Arc::new(AtomicU64::new(0));
        let src = Ranged {
            client: client.clone(),
            key: key.to_string(),
            size,
            pos: 0,
            buf_off: 0,
            buf: prefix,
            read_ahead: read_ahead.clone(),
        };
        let mut r = opener.open_seekable(src, key)?;
        let mut head = vec![0u8; HEADER];
        r.seek(SeekFrom::Start(0))
            .and_then(|_| r.read_exact(&mut head))
            .with_context(|| format!("decrypting the header of {key}"))?;
        let hdr = segment::parse_header(&head, key)?;
        if hdr.version < 2 {
            return Ok(Opened::Whole);
        }
        // The plain length (age authenticates it through the last chunk) fits the layout.
        let plain_len = r
            .seek(SeekFrom::End(0))
            .with_context(|| format!("decrypting the end of {key}"))?;
        check_layout(&hdr, plain_len, key)?;
        let mut dir = vec![0u8; hdr.index_len as usize];
        read_plain(&mut r, &read_ahead, hdr.index_off, &mut dir)
            .with_context(|| format!("decrypting the directory of {key}"))?;
        let dir = segment::parse_directory(&head, &hdr, &dir, key)?;
        Ok(Opened::Ranged(Box::new(ObjReader {
            key: key.to_string(),
            hdr,
            dir,
            src: Source::Sealed {
                reader: Box::new(Mutex::new(r)),
                read_ahead,
            },
        })))
    }

    /// Object `key`, downloaded in plain form to `file` and verified whole (`hdr` is what
    /// `segment::verify` returned): its directory read from the file (for a version-1 object,
    /// rebuilt from its page index and record headers).
    pub fn local(key: &str, file: File, hdr: ObjHeader) -> Result<ObjReader> {
        let mut idx = vec![0u8; hdr.index_len as usize];
        file.read_exact_at(&mut idx, hdr.index_off)?;
        let dir = if hdr.version >= 2 {
            let mut head = vec![0u8; HEADER];
            file.read_exact_at(&mut head, 0)?;
            segment::parse_directory(&head, &hdr, &idx, key)?
        } else {
            let mut d = segment::parse_v1_index(&idx, key)?;
            d.records = v1_records(&file, &hdr, &d, key)?;
            d
        };
        Ok(ObjReader {
            key: key.to_string(),
            hdr,
            dir,
            src: Source::Local(file),
        })
    }

    /// The decompressed bytes of frame `i`, verified.
    pub fn frame(&self, i: u32) -> Result<Vec<u8>> {
        let f = *self
            .dir
            .frames
            .get(i as usize)
            .ok_or_else(|| anyhow!("{}: no frame {i}", self.key))?;
        let z = match &self.src {
            Source::Local(file) => {
                let mut z = vec![0u8; f.len as usize];
                file.read_exact_at(&mut z, f.off)?;
                z
            }
            Source::Plain { all: Some(b), .. } => {
                let end = f.off as usize + f.len as usize;
                b.get(f.off as usize..end)
                    .ok_or_else(|| anyhow!("{}: frame past the end", self.key))?
                    .to_vec()
            }
            Source::Plain { client, all: None } => {
                fetch(client.as_ref(), &self.key, f.off, f.len as u64)?
            }
            Source::Sealed { reader, read_ahead } => {
                let mut z = vec![0u8; f.len as usize];
                read_plain(&mut reader.lock(), read_ahead, f.off, &mut z)
                    .with_context(|| format!("decrypting a frame of {}", self.key))?;
                z
            }
        };
        Ok(segment::decode_frame(&f, &z, &self.key)?)
    }
}

/// The header's layout fits an object of `len` plain bytes.
fn check_layout(hdr: &ObjHeader, len: u64, key: &str) -> Result<()> {
    let ok = hdr.body_off == HEADER as u64
        && hdr.body_off.checked_add(hdr.body_len) == Some(hdr.index_off)
        && hdr
            .index_off
            .checked_add(hdr.index_len)
            .and_then(|e| e.checked_add(8))
            == Some(len);
    if !ok {
        bail!("{key} is corrupt: its header does not fit its {len} bytes");
    }
    Ok(())
}

/// Reads plain bytes `off..off + out.len()` of an encrypted object: the ranged source is told
/// to fetch every encryption chunk they span in one request.
fn read_plain(
    r: &mut age::stream::StreamReader<Ranged>,
    read_ahead: &AtomicU64,
    off: u64,
    out: &mut [u8],
) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let last = off + out.len() as u64 - 1;
    let chunks = last / AGE_CHUNK - off / AGE_CHUNK + 1;
    read_ahead.store(chunks * AGE_CHUNK_SEALED, Ordering::Relaxed);
    let res = r.seek(SeekFrom::Start(off)).and_then(|_| r.read_exact(out));
    read_ahead.store(0, Ordering::Relaxed);
    res
}

/// Record headers of a version-1 object (verified whole), by decoding the start of each
/// record; for an object of one record, just its first frame.
fn v1_records(f: &File, hdr: &ObjHeader, dir: &Directory, key: &str) -> Result<Vec<RecordHeader>> {
    let one = hdr.level > 0 || hdr.kind == ObjKind::Snapshot || hdr.ntxns == 1;
    if one {
        let first = dir.frames.first().copied().unwrap_or(segment::Frame {
            off: hdr.body_off,
            len: hdr.body_len.min(u32::MAX as u64) as u32,
            raw_len: 0,
            crc: None,
        });
        let mut z = vec![0u8; first.len as usize];
        f.read_exact_at(&mut z, first.off)?;
        let mut dec = zstd::stream::read::Decoder::new(&z[..])?.single_frame();
        let mut hb = [0u8; RECORD_HEADER];
        dec.read_exact(&mut hb)
            .with_context(|| format!("{key}: reading a record header"))?;
        return Ok(vec![
            RecordHeader::parse(&hb).map_err(|e| anyhow!("{key}: {e}"))?
        ]);
    }
    let mut out = Vec::new();
    segment::for_each_txn(f, hdr, key, |ev| {
        if let segment::Event::Start(h) = ev {
            out.push(*h);
        }
        Ok(())
    })?;
    Ok(out)
}

/// `Read + Seek` over ranged reads of one replica object, with a buffer: what age's seekable
/// reader decrypts from. Each miss fetches at least `read_ahead` bytes (set by the caller to
/// the span it is about to read) or two encryption chunks; a buffer is dropped once used up.
struct Ranged {
    client: Arc<dyn ReplicaClient>,
    key: String,
    size: u64,
    pos: u64,
    buf_off: u64,
    buf: Vec<u8>,
    read_ahead: Arc<AtomicU64>,
}

impl Read for Ranged {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() || self.pos >= self.size {
            return Ok(0);
        }
        let end = self.buf_off + self.buf.len() as u64;
        if self.pos < self.buf_off || self.pos >= end {
            let want = (out.len() as u64)
                .max(self.read_ahead.load(Ordering::Relaxed))
                .max(SEALED_READ_AHEAD)
                .min(self.size - self.pos);
            let data = self
                .client
                .get_range(&self.key, self.pos, want)
                .map_err(io::Error::other)?
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("{} is gone", self.key))
                })?;
            if data.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} is shorter than listed", self.key),
                ));
            }
            self.buf = data;
            self.buf_off = self.pos;
        }
        let at = (self.pos - self.buf_off) as usize;
        let n = out.len().min(self.buf.len() - at);
        out[..n].copy_from_slice(&self.buf[at..at + n]);
        self.pos += n as u64;
        if at + n == self.buf.len() {
            // All used: do not keep up to a frame's worth of ciphertext per open object.
            self.buf = Vec::new();
            self.buf_off = self.pos;
        }
        Ok(n)
    }
}

impl Seek for Ranged {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let p = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
        };
        self.pos =
            p.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;
    use crate::replica::{Counted, FileReplica};
    use crate::segment::ObjectWriter;
    use std::io::Write;

    fn object(dir: &std::path::Path, ps: usize, npages: u32) -> std::path::PathBuf {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("obj.tmp"))
            .unwrap();
        let mut w = ObjectWriter::new(f, ObjKind::Snapshot, 0, "0123456789abcdef").unwrap();
        let h = RecordHeader {
            time_ns: 5,
            ..RecordHeader::test(Kind::Snapshot, 9, ps as u32, npages)
        };
        // Pages that do not compress away, so the object is much bigger than one frame.
        let page = |p: u32| -> Vec<u8> {
            let mut x = p as u64 * 0x9E37_79B9_7F4A_7C15 + 1;
            (0..ps)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        w.add(&h, |emit| (1..=npages).try_for_each(|p| emit(p, &page(p))))
            .unwrap();
        w.finish().unwrap();
        dir.join("obj.tmp")
    }

    /// A page is read with a small fraction of the object's bytes, plain and encrypted, and a
    /// damaged frame is refused.
    #[test]
    fn reads_frames_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let rdir = tmp.path().join("r");
        std::fs::create_dir_all(rdir.join("db")).unwrap();
        let plain = object(tmp.path(), 1024, 8000);
        std::fs::copy(&plain, rdir.join("db/plain")).unwrap();
        let id = tmp.path().join("id");
        let public = crypt::keygen(&id).unwrap();
        let sealer = crypt::Sealer::new(&[public]).unwrap().unwrap();
        sealer.seal_file(&plain, &rdir.join("db/sealed")).unwrap();
        let opener = Opener::from_identity_file(&id).unwrap();
        let counted = Arc::new(Counted::new(Box::new(FileReplica::new(rdir.clone()))));
        let client: Arc<dyn ReplicaClient> = counted.clone();
        let size_of = |k: &str| std::fs::metadata(rdir.join(k)).unwrap().len();
        for key in ["db/plain", "db/sealed"] {
            let before = counted.stats().1;
            let size = size_of(key);
            let Opened::Ranged(o) = ObjReader::open(&client, key, size, Some(&opener)).unwrap()
            else {
                panic!("{key}: a version-2 object must be read in place");
            };
            assert_eq!(o.dir.records.len(), 1);
            let e = o.dir.index.iter().find(|e| e.pgno == 5000).unwrap();
            let raw = o.frame(e.frame).unwrap();
            let at = e.in_frame as usize;
            assert_eq!(
                u32::from_be_bytes(raw[at - 4..at].try_into().unwrap()),
                5000
            );
            let read = counted.stats().1 - before;
            assert!(
                read * 4 < size,
                "{key}: {read} bytes read of a {size}-byte object"
            );
        }
        // A flipped byte in a frame is caught.
        let mut b = std::fs::read(rdir.join("db/plain")).unwrap();
        let Opened::Ranged(o) = ObjReader::open(&client, "db/plain", b.len() as u64, None).unwrap()
        else {
            panic!()
        };
        let fr = o.dir.frames[2];
        b[fr.off as usize + 10] ^= 1;
        std::fs::File::create(rdir.join("db/plain"))
            .unwrap()
            .write_all(&b)
            .unwrap();
        assert!(o.frame(2).is_err());
        assert!(o.frame(1).is_ok());
    }

    /// A version-1 object is reported for a whole download; read from its verified local
    /// copy it gives the same records and pages as the version-2 original.
    #[test]
    fn version_1_objects_are_read_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let rdir = tmp.path().join("r");
        std::fs::create_dir_all(rdir.join("db")).unwrap();
        let path = object(tmp.path(), 512, 700);
        let f = File::open(&path).unwrap();
        let hdr = segment::verify(&f, "v2").unwrap();
        let mut old = segment::downgrade_to_v1(&f, &hdr);
        let mut bytes = Vec::new();
        old.seek(SeekFrom::Start(0)).unwrap();
        old.read_to_end(&mut bytes).unwrap();
        std::fs::write(rdir.join("db/old"), &bytes).unwrap();
        let client: Arc<dyn ReplicaClient> = Arc::new(FileReplica::new(rdir.clone()));
        assert!(matches!(
            ObjReader::open(&client, "db/old", bytes.len() as u64, None).unwrap(),
            Opened::Whole
        ));
        let h1 = segment::verify(&old, "old").unwrap();
        let v1 = ObjReader::local("old", old, h1).unwrap();
        let v2 = ObjReader::local("v2", f, hdr).unwrap();
        assert_eq!(v1.dir.records, v2.dir.records);
        assert_eq!(v1.dir.index.len(), v2.dir.index.len());
        for (a, b) in v1.dir.index.iter().zip(&v2.dir.index).step_by(37) {
            assert_eq!((a.pgno, a.txid, a.in_frame), (b.pgno, b.txid, b.in_frame));
            let (ra, rb) = (v1.frame(a.frame).unwrap(), v2.frame(b.frame).unwrap());
            let at = a.in_frame as usize;
            assert_eq!(ra[at..at + 512], rb[at..at + 512]);
        }
    }
}
