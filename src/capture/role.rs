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
