//! Plain-file rows (files beside the databases: uploads, logs, caches), each run through
//! `alternate` by main: 4 KiB pwrites to a file opened write-only, sequential reads of a
//! warm 64 MiB file, small files created, a walk that stats every entry of a directory, and
//! getxattr of a missing attribute (a request the kernel always hands to the filesystem: the
//! bare cost of one round trip to the daemon). Each function takes the directory it works in,
//! so main runs it natively, through sqlfs and, for the floor rows, through the bare
//! passthrough FUSE server of floor.rs.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};

/// 4 KiB pwrites cycling over 100 blocks of a plain file opened write-only (a log, an
/// upload) for `secs`. Returns writes/s.
pub fn plain_writes(dir: &Path, secs: f64) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("plain.bin");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let block = vec![7u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for i in 0..100u64 {
            f.write_all_at(&block, i * 4096)?;
        }
        n += 100;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(&path)?;
    Ok(rate)
}

/// 4 KiB appends to a new plain file opened write-only (a log, an upload) until 256 MiB
/// are written, repeated for `secs`. Returns MB/s.
pub fn plain_appends(dir: &Path, secs: f64) -> Result<f64> {
    use std::io::Write;
    let path = dir.join("plain-append.bin");
    let block = vec![9u8; 4096];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        for _ in 0..(256 << 20) / 4096 {
            f.write_all(&block)?;
        }
        bytes += 256 << 20;
        drop(f);
        fs::remove_file(&path)?;
    }
    Ok(bytes as f64 / crate::harness::MB / start.elapsed().as_secs_f64())
}

/// Sequential 128 KiB reads of a 64 MiB plain file, warm (read once before), for `secs`.
/// Returns MB/s.
pub fn plain_reads(dir: &Path, secs: f64) -> Result<f64> {
    use std::io::Read;
    let path = dir.join("plain-read.bin");
    let mut rng = crate::harness::Rng::new(5);
    fs::write(&path, rng.bytes(64 << 20))?;
    let mut buf = vec![0u8; 128 << 10];
    let mut pass = || -> Result<u64> {
        let mut f = fs::File::open(&path)?;
        let mut n = 0u64;
        loop {
            match f.read(&mut buf)? {
                0 => return Ok(n),
                k => n += k as u64,
            }
        }
    };
    pass()?;
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        bytes += pass()?;
    }
    let rate = bytes as f64 / crate::harness::MB / start.elapsed().as_secs_f64();
    fs::remove_file(&path)?;
    Ok(rate)
}

/// Small files created (opened write-only, 4 KiB written, closed) in a fresh directory, in
/// batches of 500 until `secs` passed. Returns files/s.
pub fn creates(dir: &Path, secs: f64) -> Result<f64> {
    let d = dir.join("created");
    let _ = fs::remove_dir_all(&d);
    fs::create_dir(&d)?;
    let block = vec![3u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..500 {
            fs::write(d.join(format!("f{n}")), &block)?;
            n += 1;
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    fs::remove_dir_all(&d)?;
    Ok(rate)
}

/// A directory of 2,000 small files, walked for `secs`: each pass lists it and stats every
/// entry (lstat by path). Returns entries/s.
pub fn stat_walk(dir: &Path, secs: f64) -> Result<f64> {
    let d = dir.join("walked");
    let _ = fs::remove_dir_all(&d);
    fs::create_dir(&d)?;
    for i in 0..2000 {
        fs::write(d.join(format!("f{i}")), b"x")?;
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for e in fs::read_dir(&d)? {
            fs::symlink_metadata(e?.path())?;
            n += 1;
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    fs::remove_dir_all(&d)?;
    Ok(rate)
}

/// Calls/s of a request the kernel hands to the filesystem every time: reading an extended
/// attribute that a plain file does not have. Through the mount this is the bare cost of a
/// round trip between the kernel and sqlfs, the price every fsync pays on top of its own.
pub fn round_trips(dir: &Path, secs: f64) -> Result<f64> {
    use std::os::unix::ffi::OsStrExt;
    let path = dir.join("roundtrip.bin");
    fs::write(&path, b"x")?;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = c"user.sqlfs-bench-absent";
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            // SAFETY: valid C strings; a null buffer of size 0 asks only for the size.
            let r =
                unsafe { libc::getxattr(c_path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
            if r >= 0 {
                bail!("{}: the attribute exists", path.display());
            }
        }
        n += 100;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    fs::remove_file(&path)?;
    Ok(rate)
}
