//! Applying records, in order, to a database file: what `materialize` and `fold` write with.

use super::*;

/// Page images an [`Applier`] holds before writing them out.
const APPLY_BUFFER: usize = 4 << 20;

/// Applies records, in order, to a database file. The newest image of each page is kept in
/// memory (up to [`APPLY_BUFFER`] bytes) and written once: a run of small transactions that
/// rewrite the same few pages costs one write per page, not one per transaction.
///
/// Invariant: after [`Applier::flush`], the file holds exactly the state after the last
/// record applied: it is cut to the smallest size any record since the previous flush left
/// (so pages cut off and grown back read as zeros), the buffered pages are written, and the
/// file is set to the last record's size.
pub(super) struct Applier<'a> {
    out: &'a File,
    page_size: u64,
    pages: BTreeMap<u32, Vec<u8>>,
    /// Size in pages after the last record applied.
    size: u64,
    /// Smallest size in pages since the last flush, if a record made the file smaller.
    cut: Option<u64>,
    /// Bytes of page images held before a flush.
    pub(super) limit: usize,
}

impl<'a> Applier<'a> {
    /// An applier for `out`, which holds the state `from` describes.
    pub(super) fn new(out: &'a File, from: &BaseMeta) -> Applier<'a> {
        Applier {
            out,
            page_size: from.page_size as u64,
            pages: BTreeMap::new(),
            size: from.db_pages as u64,
            cut: None,
            limit: APPLY_BUFFER,
        }
    }

    pub(super) fn apply(&mut self, h: &RecordHeader, pages: PageSource<'_>) -> Result<()> {
        let ps = h.page_size as u64;
        if ps != self.page_size {
            self.flush()?;
            self.page_size = ps;
        }
        if h.kind == Kind::Snapshot {
            self.pages.clear();
            self.cut = Some(0);
        }
        let buffered = &mut self.pages;
        pages(&mut |pgno, page| {
            match buffered.entry(pgno) {
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    e.get_mut().copy_from_slice(page)
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(page.to_vec());
                }
            }
            Ok(())
        })?;
        let size = h.db_pages as u64;
        if size < self.size {
            self.pages.retain(|&p, _| (p as u64) <= size);
            self.cut = Some(self.cut.map_or(size, |c| c.min(size)));
        }
        self.size = size;
        if self.pages.len() * ps as usize >= self.limit {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is buffered; see the type's invariant.
    pub(super) fn flush(&mut self) -> Result<()> {
        let outp = PathBuf::from("<output>");
        let ps = self.page_size;
        if let Some(c) = self.cut.take() {
            self.out.set_len(c * ps).map_err(io_err(&outp))?;
        }
        for (pgno, page) in std::mem::take(&mut self.pages) {
            self.out
                .write_all_at(&page, (pgno as u64 - 1) * ps)
                .map_err(io_err(&outp))?;
        }
        self.out.set_len(self.size * ps).map_err(io_err(&outp))?;
        Ok(())
    }
}
