//! `sqlfs restore`: rebuilds a database from a replica alone, as of its latest or a given
//! TXID: the newest snapshot at or before the target, then the segments after it, in order.
//!
//! Invariants: every object's CRC is verified before use and the chain must be gap-free; the
//! result's rolling checksum must equal the one recorded for the target transaction, and
//! `PRAGMA integrity_check` must pass; the output is written to a temporary file, fsynced and
//! renamed, so a failure never leaves a file behind and an existing file is only replaced
//! with `--force`.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::crypt::{self, Opener};
use crate::replica::{self, ReplicaClient};
use crate::segment::{self, Event};
use crate::ship::{segment_key, snapshot_key};
use crate::sqlite::page_crc;
use crate::stage::Kind;

pub struct RestoreOpts {
    pub replica: String,
    pub db: String,
    pub output: PathBuf,
    pub txid: Option<u64>,
    pub force: bool,
    pub age_identity: Option<PathBuf>,
}

/// Downloads `key` into `scratch` and, if it is encrypted, decrypts it (into `scratch`
/// plus `.plain`); returns the path of the plain object, or `None` if the key is missing.
fn fetch(
    client: &dyn ReplicaClient,
    key: &str,
    scratch: &Path,
    opener: Option<&Opener>,
) -> Result<Option<PathBuf>> {
    if !client.get(key, scratch)? {
        return Ok(None);
    }
    if !crypt::file_is_sealed(scratch)? {
        return Ok(Some(scratch.to_path_buf()));
    }
    let Some(o) = opener else {
        bail!(
            "{key} is encrypted; pass --age-identity FILE with the key the replica was written for"
        )
    };
    let plain = scratch.with_extension("plain");
    o.open_file(scratch, &plain, key)?;
    Ok(Some(plain))
}

/// Finds the id of database `name` in the replica.
fn find_db(
    client: &dyn ReplicaClient,
    name: &str,
    scratch: &Path,
    opener: Option<&Opener>,
) -> Result<String> {
    let mut known = Vec::new();
    for (key, _) in client.list("")? {
        let Some(id) = key.strip_suffix("/name") else {
            continue;
        };
        if let Some(plain) = fetch(client, &key, scratch, opener)? {
            let n = fs::read_to_string(plain).unwrap_or_default();
            if n == name {
                return Ok(id.to_string());
            }
            known.push(n);
        }
    }
    known.sort();
    bail!(
        "no database named {name} in {} (it holds: {})",
        client.describe(),
        if known.is_empty() {
            "nothing".into()
        } else {
            known.join(", ")
        }
    )
}

/// TXIDs encoded in keys `<prefix><16 hex digits><suffix>`, sorted.
fn txids(client: &dyn ReplicaClient, prefix: &str, suffix: &str) -> Result<Vec<u64>> {
    let mut v: Vec<u64> = client
        .list(prefix)?
        .into_iter()
        .filter_map(|(k, _)| {
            k.strip_prefix(prefix)?
                .strip_suffix(suffix)
                .and_then(|h| u64::from_str_radix(h, 16).ok())
        })
        .collect();
    v.sort();
    Ok(v)
}

pub fn run(o: &RestoreOpts) -> Result<String> {
    if o.output.exists() && !o.force {
        bail!("{} exists; pass --force to replace it", o.output.display());
    }
    let client = replica::open(&o.replica)?;
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let scratch = work.path().join("obj");
    let opener = o
        .age_identity
        .as_deref()
        .map(Opener::from_identity_file)
        .transpose()?;
    let opener = opener.as_ref();
    let id = find_db(client.as_ref(), &o.db, &scratch, opener)?;
    let snaps = txids(client.as_ref(), &format!("{id}/snap/"), ".snap")?;
    let segs = txids(client.as_ref(), &format!("{id}/l0/"), ".seg")?;
    let target = o.txid.unwrap_or(u64::MAX);

    let out_dir = o
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp_out = tempfile::Builder::new()
        .prefix(".sqlfs-restore-")
        .tempfile_in(out_dir)
        .context("creating the output's temporary file")?;
    let out = tmp_out.as_file();

    // Start: the newest snapshot at or before the target, or the empty database.
    let mut p = Progress::default();
    if let Some(&s) = snaps.iter().rev().find(|&&s| s <= target) {
        let key = snapshot_key(&id, s);
        apply_object(client.as_ref(), &key, &scratch, opener, out, s, &mut p)?;
    }
    // Then every segment that continues the chain.
    for &first in &segs {
        if p.state >= target {
            break;
        }
        if first > p.state + 1 {
            bail!(
                "the replica's chain for {} has a gap: transactions {}..{} are missing",
                o.db,
                p.state + 1,
                first - 1
            );
        }
        let key = segment_key(&id, 0, first);
        apply_object(client.as_ref(), &key, &scratch, opener, out, target, &mut p)?;
    }
    let Some((txid, checksum, ps, pages)) = p.last else {
        bail!("the replica holds no transactions of {}", o.db)
    };
    if o.txid.is_some_and(|t| t != txid) {
        bail!(
            "TXID {target} of {} is not in the replica (it holds up to TXID {txid})",
            o.db
        );
    }
    // Verify: the rolling checksum of what was written, then SQLite's own check.
    let mut buf = vec![0u8; ps as usize];
    let mut c = 0;
    for p in 1..=pages {
        out.read_exact_at(&mut buf, (p as u64 - 1) * ps as u64)?;
        c ^= page_crc(p, &buf);
    }
    if c != checksum {
        bail!("restored database fails verification: checksum {c:016x}, expected {checksum:016x} for TXID {txid}");
    }
    out.sync_all()?;
    if pages > 0 {
        // immutable: no -wal or -shm is created next to it, whatever its journal mode.
        let uri = format!("file:{}?immutable=1", tmp_out.path().display());
        let conn = rusqlite::Connection::open_with_flags(
            &uri,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )?;
        let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if ok != "ok" {
            bail!("restored database fails PRAGMA integrity_check: {ok}");
        }
    }
    tmp_out
        .persist(&o.output)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming into {}", o.output.display()))?;
    File::open(out_dir).and_then(|d| d.sync_all())?;
    Ok(format!("restored {} at TXID {txid} ({pages} pages of {ps} bytes, checksum {checksum:016x}) to {}\n", o.db, o.output.display()))
}

/// How far a restore has come: the TXID applied last, and (txid, checksum, page size, pages)
/// of the last transaction applied.
#[derive(Default)]
struct Progress {
    state: u64,
    last: Option<(u64, u64, u32, u32)>,
}

/// Downloads, verifies and applies the transactions of one object up to `target`.
fn apply_object(
    client: &dyn ReplicaClient,
    key: &str,
    scratch: &Path,
    opener: Option<&Opener>,
    out: &File,
    target: u64,
    p: &mut Progress,
) -> Result<()> {
    let Progress { state, last } = p;
    let Some(plain) = fetch(client, key, scratch, opener)? else {
        bail!("{key} is missing from {}", client.describe());
    };
    let f = File::open(plain)?;
    let hdr = segment::verify(&f, key)?;
    let mut skip = false;
    segment::for_each_txn(&f, &hdr, key, |ev| {
        match ev {
            Event::Start(h) => {
                skip = h.txid <= *state || h.txid > target;
                if !skip && h.kind == Kind::Snapshot {
                    out.set_len(0).map_err(|e| io_err(key, e))?;
                }
                if !skip && h.txid != *state + 1 && h.kind != Kind::Snapshot {
                    return Err(segment::ObjectError::Corrupt {
                        what: key.into(),
                        why: format!("TXID {} does not follow {}", h.txid, state),
                    });
                }
            }
            Event::Page(p, d) if !skip => {
                let ps = d.len() as u64;
                out.write_all_at(d, (p as u64 - 1) * ps)
                    .map_err(|e| io_err(key, e))?;
            }
            Event::End(h) if !skip => {
                out.set_len(h.db_pages as u64 * h.page_size as u64)
                    .map_err(|e| io_err(key, e))?;
                *state = h.txid;
                *last = Some((h.txid, h.checksum_after, h.page_size, h.db_pages));
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(())
}

fn io_err(key: &str, e: std::io::Error) -> segment::ObjectError {
    segment::ObjectError::Io {
        what: key.into(),
        err: e,
    }
}
