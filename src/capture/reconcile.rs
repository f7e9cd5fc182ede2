//! Reconciliation at mount: brings a database's state in line with its staging log and its
//! files after a (re)start. Commits that reached the WAL but not staging are staged; files
//! changed in a way the stream cannot explain give a snapshot.
//!
//! Invariant: continuity is proven (the files as of the last staged commit give the staged
//! checksum) before anything is derived from the files incrementally.

use std::fs;
use std::io;

use super::walmode::Upto;
use super::{fingerprint, read_exact_at, Db, Role, State};
use crate::backing::Backing;
use crate::sqlite;

impl Db {
    /// Brings the state in line with the staging log and the files after a (re)start:
    /// commits that reached the WAL but not staging (sqlfs killed in between) are staged; if
    /// the files changed in a way the stream cannot explain, a snapshot is staged.
    pub(super) fn reconcile(&self, b: &Backing) -> io::Result<()> {
        let name = self.name();
        let mut st = self.state.lock();
        st.rewind_to_staged(self)?;
        let txid = st.txid;
        let walpos = self.stage.last().map(|h| h.wal).unwrap_or_default();
        let clean_path = self.stage.dir().join("clean");
        let unchanged = fs::read_to_string(&clean_path).ok().as_deref()
            == Some(fingerprint(b, &name, txid).as_str());
        let _ = fs::remove_file(&clean_path);
        let jrel = format!("{name}-journal");
        let mut jh = [0u8; 8];
        if matches!(b.open_read(&jrel), Ok(Some(f)) if read_exact_at(&f, &mut jh, 0).unwrap_or(false))
            && jh == sqlite::JOURNAL_MAGIC
        {
            st.rb.journal_live = true;
        }

        st.reopen(self, b, Role::Main)?;
        st.reopen(self, b, Role::Wal)?;
        if txid == 0 {
            st.resnapshot = Some("first sighting of this database".into());
        }
        if let Some((why, max_txid)) = self.stage.damage() {
            // The damaged segment's transactions are lost to the stream; TXIDs go on after them.
            st.txid = st.txid.max(max_txid);
            st.resnapshot = Some(why);
        }
        let State {
            wal,
            wal_fd,
            resnapshot,
            ..
        } = &mut *st;
        if let (Some(w), Some(fd)) = (wal.as_mut(), wal_fd.as_ref()) {
            if walpos.end != 0 && walpos.salt == (w.hdr.salt1, w.hdr.salt2) {
                // Re-enter the WAL where the last staged commit left it.
                if !w.seek_to(fd, walpos.end, walpos.cksum)? {
                    resnapshot.get_or_insert_with(|| {
                        "the WAL no longer matches the staged stream".into()
                    });
                }
            } else {
                // A WAL generation the stream never saw: its commits are compared below.
                for t in w.advance(fd, None, u64::MAX)? {
                    w.publish(&t);
                }
            }
        }
        if st.resnapshot.is_none() && txid > 0 && !unchanged {
            // Continuity is proven before anything is derived from it: the files as of the
            // last staged commit (the WAL re-entered there) must give the staged checksum.
            // Commits after it are then staged from the WAL on a state known to be right; if
            // the database file took frames that were never staged (a checkpoint while
            // staging failed), deriving them incrementally would stage wrong checksums.
            let actual = st.full_checksum(self, b)?;
            if actual != (st.checksum, st.page_size, st.db_pages) {
                st.resnapshot = Some(format!(
                    "the files changed while sqlfs was not running (staged checksum {:016x}, files {:016x})",
                    st.checksum, actual.0
                ));
            } else {
                log::info!(
                    "{name}: continuity with the staged stream verified by checksum (TXID {})",
                    st.txid
                );
            }
        }
        // A full disk at start does not stop the mount: the database is captured as failing,
        // and the snapshot is retried until it is staged.
        let seen = st.commits_seen;
        let stage_rest = |st: &mut State| -> io::Result<()> {
            if st.resnapshot.is_none() && txid > 0 {
                st.capture_wal(self, b, Upto::Now)?;
            }
            if let Some(why) = st.resnapshot.clone() {
                let pos = st.current_walpos();
                st.snapshot_with(self, b, &why, pos)?;
            }
            self.stage.flush().map_err(io::Error::other)
        };
        if let Err(e) = stage_rest(&mut st) {
            let lost = st.commits_seen - seen;
            self.failed(&mut st, e.to_string(), lost);
        }
        Ok(())
    }
}
