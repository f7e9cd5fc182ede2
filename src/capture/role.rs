//! Which files form a database: a file's role (the database, its WAL, its rollback journal, or
//! anything else) and the database it belongs to, told by its name alone.

use crate::backing::META_DIR;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Main,
    Wal,
    Journal,
    /// `-shm` and anything else: passed through, never looked at.
    Other,
}

/// Splits a relative path into its role and the database path it belongs to.
pub fn classify(rel: &str) -> (Role, &str) {
    if rel == META_DIR || rel.starts_with(".sqlfs/") {
        return (Role::Other, rel);
    }
    if let Some(db) = rel.strip_suffix("-wal") {
        (Role::Wal, db)
    } else if let Some(db) = rel.strip_suffix("-journal") {
        (Role::Journal, db)
    } else if rel.ends_with("-shm") {
        (Role::Other, rel)
    } else {
        (Role::Main, rel)
    }
}

/// The database whose WAL index (`-shm` file) `rel` is, if it is one.
pub fn wal_index_of(rel: &str) -> Option<&str> {
    rel.strip_suffix("-shm")
}

/// The database a WAL or rollback journal belongs to, by its name as bytes (for names that
/// are not UTF-8, which capture never knows).
pub fn journal_db_of(rel: &[u8]) -> Option<&[u8]> {
    [b"-wal".as_slice(), b"-journal"]
        .iter()
        .find_map(|s| rel.strip_suffix(*s))
}

/// True if a write of `data` at `offset` to `rel` (a file capture does not know) shows a
/// database being written: a database header, or a write to a WAL or rollback journal.
pub fn shows_db(rel: &[u8], offset: u64, data: &[u8]) -> bool {
    (offset == 0 && crate::sqlite::is_db_header(data)) || journal_db_of(rel).is_some()
}
