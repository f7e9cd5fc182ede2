//! Rows "4 KiB pwrite to a plain file, one at a time (writes/s)" and "getxattr of a missing
//! attribute, one at a time (calls/s)": requests on a file that capture never looks at, the
//! fixed price of passing through the mount (main runs each through `alternate`). The floor
//! under FULL, a commit-like fsync loop through a bare passthrough FUSE server, is floor.rs.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};

/// 4 KiB pwrites cycling over 100 blocks of a plain file for `secs`: the bare cost of one
/// write passing through the mount, for a file capture never looks at. Returns writes/s.
pub fn plain_writes(dir: &Path, secs: f64) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("plain.bin");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
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
