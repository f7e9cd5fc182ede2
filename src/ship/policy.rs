//! How a replica's objects are snapshotted, compacted and expired: the policy and how
//! configuration layers and a database's own settings overlay it.

use std::time::Duration;

use crate::config::DbConf;
use crate::units::parse_duration;

/// How a replica's objects are snapshotted, compacted and expired.
#[derive(Clone, Debug)]
pub struct Policy {
    /// A full snapshot at most this often while the database changes (zero: only when
    /// continuity needs one).
    pub snapshot_interval: Duration,
    /// Compaction intervals of levels 1, 2, … (empty: no compaction).
    pub levels: Vec<Duration>,
    /// Keep every restore point this far back (zero: keep everything).
    pub retention: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            snapshot_interval: Duration::from_secs(6 * 3600),
            levels: vec![
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(3600),
            ],
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl Policy {
    /// Sets the values a configuration layer gives (those it leaves out stay as they are).
    pub fn overlay(
        &mut self,
        snapshot: &Option<String>,
        retention: &Option<String>,
        compaction: &Option<Vec<String>>,
    ) {
        // Values were checked when the file was loaded.
        if let Some(d) = snapshot.as_deref().and_then(|s| parse_duration(s).ok()) {
            self.snapshot_interval = d;
        }
        if let Some(d) = retention.as_deref().and_then(|s| parse_duration(s).ok()) {
            self.retention = d;
        }
        if let Some(l) = compaction {
            self.levels = l.iter().filter_map(|s| parse_duration(s).ok()).collect();
        }
    }
}

/// The policy of a database on a replica: the replica's (defaults, the configuration's top
/// level, command-line flags, the replica's own settings), then the database's own settings
/// from the configuration, which are the most specific and win.
pub fn db_policy(replica: &Policy, db: Option<&DbConf>) -> Policy {
    let mut p = replica.clone();
    if let Some(r) = db {
        p.overlay(&r.snapshot_interval, &r.retention, &r.compaction);
    }
    p
}
