//! Reading the staged stream back: `verify` (replay and compare with the live files), `log`
//! (one line per staged transaction) and `replay` (materialise the state after a TXID).
//! Each works on a running mount (through its control socket, see `control`) or on an
//! unmounted backing directory; both paths run the same functions here.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::path::Path;

use crate::backing::Backing;
use crate::capture::{live_image, Capture};
use crate::stage::{Access, DbStage};

/// One database's staging log and its name, from a live capture or read off disk.
pub enum Source<'a> {
    Live(&'a Capture),
    Offline,
}

/// The staged databases under `b`: (name, stage) pairs, sorted by name.
fn offline_stages(b: &Backing) -> io::Result<Vec<(String, DbStage)>> {
    let mut v = Vec::new();
    let root = b.meta_path().join("db");
    let rd = match fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(e),
    };
    for e in rd {
        let dir = e?.path();
        if dir.join("deleted").exists() {
            continue;
        }
        let Ok(name) = fs::read_to_string(dir.join("name")) else {
            continue;
        };
        v.push((
            name,
            DbStage::open(&dir, Access::Read).map_err(io::Error::other)?,
        ));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Runs `f` for each staged database (all, or only `only`), holding off capture on it while
/// `f` runs when the mount is live.
fn each_db(
    b: &Backing,
    src: &Source,
    only: Option<&str>,
    mut f: impl FnMut(&str, &DbStage) -> io::Result<()>,
) -> io::Result<usize> {
    let mut n = 0;
    match src {
        Source::Live(cap) => {
            // A database still loading (the mount just started) is waited for, not skipped.
            let dbs = match only {
                Some(o) => cap
                    .get(o)
                    .map(|db| (o.to_string(), db))
                    .into_iter()
                    .collect(),
                None => cap.databases_loaded(),
            };
            for (name, db) in dbs {
                n += 1;
                cap.frozen(&db, || f(&name, &db.stage))?;
            }
        }
        Source::Offline => {
            for (name, st) in offline_stages(b)? {
                if only.is_none_or(|o| o == name) {
                    n += 1;
                    f(&name, &st)?;
                }
            }
        }
    }
    if n == 0 {
        if let Some(o) = only {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no staged database named {o}"),
            ));
        }
    }
    Ok(n)
}

/// Replays each database's staged stream and compares it byte for byte with its files.
/// Returns (report, all matched).
pub fn verify(b: &Backing, src: &Source, only: Option<&str>) -> io::Result<(String, bool)> {
    let mut out = String::new();
    let mut ok = true;
    let n = each_db(b, src, only, |name, st| {
        if let Some((why, _)) = st.damage() {
            ok = false;
            let _ = writeln!(out, "{name}: DAMAGED: {why}");
            return Ok(());
        }
        let Some(last) = st.last() else {
            let _ = writeln!(out, "{name}: nothing staged yet");
            return Ok(());
        };
        let staged = tempfile::tempfile()?;
        st.materialize(last.txid, &staged)
            .map_err(io::Error::other)?;
        let live = tempfile::tempfile()?;
        live_image(b, name, &live)?;
        let same = files_equal(&staged, &live)?;
        ok &= same;
        let _ = writeln!(
            out,
            "{name}: {} at TXID {} ({} pages of {} bytes, checksum {:016x})",
            if same { "ok" } else { "MISMATCH" },
            last.txid,
            last.db_pages,
            last.page_size,
            last.checksum_after
        );
        Ok(())
    })?;
    if n == 0 {
        match src {
            // A running mount that has not seen a database yet has nothing to disagree with.
            Source::Live(_) => out.push_str("no database captured yet\n"),
            // Offline, nothing staged means nothing was verified: not a success.
            Source::Offline => {
                ok = false;
                let _ = writeln!(
                    out,
                    "no staged database in {}: nothing to verify (is this a directory sqlfs has served? staging lives in its {}/)",
                    crate::backing::shown(&b.meta_path()).parent().map_or_else(|| "it".into(), |p| p.display().to_string()),
                    crate::backing::META_DIR
                );
            }
        }
    }
    Ok((out, ok))
}

fn files_equal(a: &File, b: &File) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let (la, lb) = (a.metadata()?.len(), b.metadata()?.len());
    if la != lb {
        return Ok(false);
    }
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < la {
        let n = ((la - off) as usize).min(x.len());
        a.read_exact_at(&mut x[..n], off)?;
        b.read_exact_at(&mut y[..n], off)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// One line per staged transaction of `db`.
pub fn log(b: &Backing, src: &Source, db: &str) -> io::Result<String> {
    let mut out = String::new();
    each_db(b, src, Some(db), |_, st| {
        let (base, headers) = st.base_and_headers().map_err(io::Error::other)?;
        if base.txid > 0 {
            let _ = writeln!(
                out,
                "base txid={} size={} checksum={:016x}",
                base.txid, base.db_pages, base.checksum
            );
        }
        for h in headers {
            let _ = writeln!(
                out,
                "txid={} ts={} kind={} pages={} size={} page_size={} checksum={:016x}",
                h.txid,
                h.time_ns,
                match h.kind {
                    crate::stage::Kind::Txn => "txn",
                    crate::stage::Kind::Snapshot => "snapshot",
                },
                h.npages,
                h.db_pages,
                h.page_size,
                h.checksum_after
            );
        }
        Ok(())
    })?;
    Ok(out)
}

/// Writes the state of `db` after `txid` to `out` (via a temp file renamed into place).
pub fn replay(b: &Backing, src: &Source, db: &str, txid: u64, out: &Path) -> io::Result<String> {
    let mut msg = String::new();
    each_db(b, src, Some(db), |name, st| {
        let tmp = out.with_extension("sqlfs-tmp");
        let f = File::create(&tmp)?;
        let m = st.materialize(txid, &f).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io::Error::other(e)
        })?;
        f.sync_all()?;
        fs::rename(&tmp, out)?;
        let _ = writeln!(
            msg,
            "{name}: wrote TXID {} ({} pages, checksum {:016x}) to {}",
            m.txid,
            m.db_pages,
            m.checksum,
            out.display()
        );
        Ok(())
    })?;
    Ok(msg)
}
