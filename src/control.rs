//! The control socket of a running mount: lets `sqlfs verify|log|replay DIR` reach the staged
//! stream of an in-place mount, whose backing files the mount itself hides.
//!
//! Protocol: the client sends one line, tab-separated words (`verify\t<db or ->`,
//! `log\t<db>`, `status[\tall|\tjson]`, `replay\t<db>\t<txid>\t<absolute out path>`); the server answers with text and
//! a last line `exit <code>`. One request per connection.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backing::Backing;
use crate::capture::Capture;
use crate::inspect::{self, Source};
use crate::ship::Shipper;

/// Where the control socket of the mount at `mountpoint` lives.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = if uid == 0 {
        PathBuf::from("/run/sqlfs")
    } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(x).join("sqlfs")
    } else {
        PathBuf::from(format!("/tmp/sqlfs-{uid}"))
    };
    // FNV-1a of the canonical mountpoint: short, stable, no content.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in mountpoint.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    dir.join(format!("{h:016x}.sock"))
}

/// Serves requests until the process exits.
pub fn serve(
    path: &Path,
    backing: Arc<Backing>,
    capture: Arc<Capture>,
    shippers: Vec<Arc<Shipper>>,
    stage_limit: u64,
) -> io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("sqlfs-control".into())
        .spawn(move || {
            for conn in l.incoming().flatten() {
                let (b, c, sh) = (backing.clone(), capture.clone(), shippers.clone());
                let _ = std::thread::Builder::new()
                    .name("sqlfs-control-req".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, &b, &c, &sh, stage_limit) {
                            log::warn!("control request failed: {e}");
                        }
                    });
            }
        })?;
    Ok(())
}

fn handle(
    conn: UnixStream,
    b: &Backing,
    cap: &Capture,
    shippers: &[Arc<Shipper>],
    stage_limit: u64,
) -> io::Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let w: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
    let src = Source::Live(cap);
    let res: io::Result<(String, i32)> = match w.as_slice() {
        ["verify", db] => inspect::verify(b, &src, (*db != "-").then_some(*db))
            .map(|(s, ok)| (s, if ok { 0 } else { 1 })),
        ["log", db] => inspect::log(b, &src, db).map(|s| (s, 0)),
        ["status", how @ ..] => {
            let st = crate::status::Status::gather(cap, shippers, stage_limit);
            let text = match how.first().copied() {
                Some("json") => serde_json::to_string_pretty(&st)
                    .map(|j| j + "\n")
                    .map_err(io::Error::other)?,
                Some("all") => st.text(true),
                _ => st.text(false),
            };
            Ok((text, st.code))
        }
        ["replay", db, txid, out] => match txid.parse() {
            Ok(t) => inspect::replay(b, &src, db, t, Path::new(out)).map(|s| (s, 0)),
            Err(_) => Ok((format!("error: bad TXID {txid}\n"), 2)),
        },
        _ => Ok(("error: unknown request\n".into(), 2)),
    };
    let (text, code) = res.unwrap_or_else(|e| (format!("error: {e}\n"), 1));
    let mut conn = conn;
    conn.write_all(text.as_bytes())?;
    writeln!(conn, "exit {code}")
}

/// Sends a request to the mount at `mountpoint`; `None` if no mount answers there.
pub fn request(mountpoint: &Path, words: &[&str]) -> io::Result<Option<(String, i32)>> {
    let Ok(mut s) = UnixStream::connect(socket_path(mountpoint)) else {
        return Ok(None);
    };
    writeln!(s, "{}", words.join("\t"))?;
    let mut text = String::new();
    let mut code = 1;
    for line in BufReader::new(s).lines() {
        let line = line?;
        match line.strip_prefix("exit ") {
            Some(c) => code = c.parse().unwrap_or(1),
            None => {
                text.push_str(&line);
                text.push('\n');
            }
        }
    }
    Ok(Some((text, code)))
}
