//! The replica's key layout (docs/FORMAT.md, "Replica layout"): the key of each kind of
//! object, and the object a key names. Keys carry database ids, levels and TXIDs, never content.

use super::Obj;

/// Highest compaction level a key may name.
pub const MAX_LEVEL: u8 = 9;

/// Key of the object naming database `db_id` (its path under the mount).
pub fn name_key(db_id: &str) -> String {
    format!("names/{db_id}")
}

/// Key of a level-0 segment starting at `first` (the fence: a second writer collides on it).
pub fn l0_key(db_id: &str, first: u64) -> String {
    format!("{db_id}/l0/{first:016x}.seg")
}

/// The first TXID of level-0 segment `key` (as [`l0_key`] makes it), of any database.
pub fn l0_first(key: &str) -> Option<u64> {
    let (_, file) = key.rsplit_once("/l0/")?;
    hex16(file.strip_suffix(".seg")?)
}

/// Key of a compacted segment covering `first..=last` at `level` (1 and up).
pub fn compacted_key(db_id: &str, level: u8, first: u64, last: u64) -> String {
    format!("{db_id}/l{level}/{first:016x}-{last:016x}.seg")
}

/// Key of a snapshot: the whole database after `txid`.
pub fn snapshot_key(db_id: &str, txid: u64) -> String {
    format!("{db_id}/snap/{txid:016x}.snap")
}

pub(super) fn hex16(s: &str) -> Option<u64> {
    (s.len() == 16)
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

/// Parses `<id>/<sub>/<file>` (relative to the database's prefix) into an object.
pub(super) fn parse_key(key: &str, rel: &str, size: u64, modified_ns: u64) -> Option<Obj> {
    let (sub, file) = rel.split_once('/')?;
    if sub == "snap" {
        let t = hex16(file.strip_suffix(".snap")?)?;
        return Some(Obj {
            key: key.into(),
            level: None,
            first: t,
            last: t,
            exact: true,
            size,
            modified_ns,
        });
    }
    let level: u8 = sub.strip_prefix('l')?.parse().ok()?;
    if level > MAX_LEVEL {
        return None;
    }
    let stem = file.strip_suffix(".seg")?;
    let (first, last) = if level == 0 {
        (hex16(stem)?, u64::MAX)
    } else {
        let (a, b) = stem.split_once('-')?;
        (hex16(a)?, hex16(b)?)
    };
    (first >= 1 && first <= last).then(|| Obj {
        key: key.into(),
        level: Some(level),
        first,
        last,
        exact: level > 0,
        size,
        modified_ns,
    })
}
