//! sqlfs: a filesystem under SQLite apps that captures every committed transaction and ships
//! it to replicas.
//!
//! Pipeline (see docs/ARCHITECTURE.md): `fs` (kernel requests) → `capture` (WAL/journal →
//! transactions) → `stage` (local durable log) → `ship` (segments, snapshots) → `replica`;
//! `catalog` reads a replica back for `restore`, `list` and `history`. The command line
//! (`src/main.rs`) is a thin layer over these modules; tests and benches use them too.

pub mod backing;
pub mod capture;
pub mod catalog;
pub mod compact;
pub mod config;
pub mod control;
pub mod crypt;
pub mod delta;
pub mod exclude;
pub mod fs;
pub mod history;
pub mod inspect;
pub mod list;
pub mod metrics;
pub mod mount;
pub mod objread;
pub mod owner;
pub mod record;
pub mod replica;
pub mod restore;
pub mod restore_all;
pub mod segment;
pub mod ship;
pub mod sqlite;
pub mod stage;
pub mod status;
pub mod time;
pub mod units;
