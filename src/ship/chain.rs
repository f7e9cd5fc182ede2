//! The chain check: which staged record cannot follow the one before it in a shipment.

use crate::stage::{Kind, RecordHeader};

/// Why staged record `h` cannot follow `prev` (TXID, checksum after) in a shipment, if it
/// cannot: a transaction must start from the checksum the record before it ended with, and
/// within a run TXIDs go up by one. A snapshot starts afresh (it holds every page), and a first
/// record past the one expected (`started` false) is a fold racing the read, which the caller
/// handles.
pub(super) fn chain_break(
    prev: Option<(u64, u64)>,
    h: &RecordHeader,
    started: bool,
) -> Option<String> {
    let (t, after) = prev?;
    if h.kind != Kind::Txn {
        return None;
    }
    if h.txid != t + 1 {
        return started.then(|| format!("staged TXID {} follows TXID {t}", h.txid));
    }
    (h.checksum_before != after).then(|| {
        format!(
            "staged TXID {} does not start from the checksum TXID {t} ended with ({:016x}, not {after:016x})",
            h.txid, h.checksum_before
        )
    })
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    #[test]
    fn a_run_that_does_not_chain_is_refused() {
        let txn = |txid, before| RecordHeader {
            checksum_before: before,
            checksum_after: txid * 10,
            ..RecordHeader::test(Kind::Txn, txid, 4096, 1)
        };
        // Nothing known before: nothing to check.
        assert!(chain_break(None, &txn(5, 1), false).is_none());
        assert!(chain_break(Some((4, 40)), &txn(5, 40), true).is_none());
        assert!(chain_break(Some((4, 40)), &txn(5, 41), true).is_some());
        assert!(chain_break(Some((4, 40)), &txn(6, 50), true).is_some());
        // A first record past the expected one: a fold raced the read, not a break.
        assert!(chain_break(Some((4, 40)), &txn(6, 50), false).is_none());
        // A snapshot starts afresh.
        let snap = RecordHeader {
            checksum_before: 7,
            ..RecordHeader::test(Kind::Snapshot, 5, 4096, 1)
        };
        assert!(chain_break(Some((4, 40)), &snap, true).is_none());
    }
}
