//! Hot-journal rollback at mount: a rollback journal left by a crashed writer is rolled back
//! (by opening its database with SQLite) before anything reads the databases, so the stream
//! never holds a half-written transaction.

use std::os::fd::AsRawFd;

use crate::backing::{Backing, META_DIR};

/// Rolls back hot journals left by crashed apps, before anything reads the databases: the
/// stream must never contain a half-written transaction.
pub fn rollback_hot_journals(b: &Backing, rel: &str, depth: usize) {
    if depth > 64 {
        return;
    }
    // The directory is opened beneath the backing root (no link followed) and listed, and its
    // databases opened, through its descriptor.
    let Ok(dir) = b.open_beneath(rel, libc::O_RDONLY | libc::O_DIRECTORY, 0) else {
        return;
    };
    let dir_path = crate::backing::proc_fd_path(dir.as_raw_fd());
    let Ok(rd) = std::fs::read_dir(&dir_path) else {
        return;
    };
    for e in rd.flatten() {
        // Names that are not UTF-8 are never captured; SQLite rolls their journals back itself.
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if rel.is_empty() && name == META_DIR {
            continue;
        }
        let child = crate::backing::join(rel, &name);
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            rollback_hot_journals(b, &child, depth + 1);
        } else if let Some(db) = child.strip_suffix("-journal") {
            let mut m = [0u8; 8];
            let hot = matches!(b.open_read(&child), Ok(Some(f)) if crate::capture::read_exact_at(&f, &mut m, 0).unwrap_or(false))
                && m == crate::sqlite::JOURNAL_MAGIC;
            let regular = b
                .stat(db)
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
            if hot && regular {
                log::warn!("{db}: rolling back a hot journal left by a crashed writer");
                // Checked above to be a regular file (not a link) in a directory reached
                // without following any; this runs before the mount exists, so the path
                // SQLite resolves cannot lead into it.
                let file = dir_path.join(name.strip_suffix("-journal").unwrap_or(&name));
                let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let r = rusqlite::Connection::open_with_flags(file, flags)
                    .and_then(|c| c.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0)));
                if let Err(e) = r {
                    log::error!("{db}: hot journal rollback failed: {e}");
                }
            }
        }
    }
}
