//! Verifying a whole object: the trailing CRC-64 before any byte is trusted, then the header
//! and layout.

use std::io::{BufReader, Read, Seek, SeekFrom};

use super::*;

/// Verifies the object `file` holds from its start to its end (trailing CRC, header) and
/// returns its header. `file` is a whole file (`&File`) or a [`Slice`] of one.
pub fn verify<R: Read + Seek>(mut file: R, what: &str) -> Result<ObjHeader> {
    let len = file.seek(SeekFrom::End(0)).map_err(io(what))?;
    if len < (HEADER + 8) as u64 {
        let mut b = vec![0u8; len as usize];
        let _ = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.read_exact(&mut b));
        return Err(if b.len() >= 8 && &b[..8] == MAGIC {
            ObjectError::Corrupt {
                what: what.into(),
                why: format!("truncated ({len} bytes)"),
            }
        } else {
            ObjectError::Foreign { what: what.into() }
        });
    }
    // Buffers no larger than the object: most are a few hundred bytes.
    let cap = (len as usize).clamp(4096, 1 << 20);
    let mut r = BufReader::with_capacity(cap, file);
    r.seek(SeekFrom::Start(0)).map_err(io(what))?;
    let mut head = [0u8; HEADER];
    r.read_exact(&mut head).map_err(io(what))?;
    let hdr = ObjHeader::decode(&head, what)?;
    let mut crc = crate::sqlite::crc64();
    crc.update(&head);
    let mut left = len - 8 - HEADER as u64;
    let mut buf = vec![0u8; cap];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        r.read_exact(&mut buf[..n]).map_err(io(what))?;
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    let mut t = [0u8; 8];
    r.read_exact(&mut t).map_err(io(what))?;
    if u64::from_be_bytes(t) != crc.finalize() {
        return Err(ObjectError::Corrupt {
            what: what.into(),
            why: "checksum mismatch".into(),
        });
    }
    if hdr.body_off + hdr.body_len != hdr.index_off || hdr.index_off + hdr.index_len + 8 != len {
        return Err(ObjectError::Corrupt {
            what: what.into(),
            why: "inconsistent layout".into(),
        });
    }
    if hdr.version == 1 {
        if hdr.index_len != hdr.nindex as u64 * INDEX_ENTRY as u64 {
            return Err(ObjectError::Corrupt {
                what: what.into(),
                why: "inconsistent layout".into(),
            });
        }
    } else {
        // The directory's own checks (its CRC is covered by the one just verified).
        let mut dir = vec![0u8; hdr.index_len as usize];
        r.seek(SeekFrom::Start(hdr.index_off)).map_err(io(what))?;
        r.read_exact(&mut dir).map_err(io(what))?;
        parse_directory(&head, &hdr, &dir, what)?;
    }
    Ok(hdr)
}
