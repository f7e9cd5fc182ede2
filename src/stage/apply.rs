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

    /// Writes what is buffered; see the type's invariant. Pages with consecutive numbers go
    /// out together, up to [`RUN_PAGES`] a call: a fold of a bulk load writes long runs, and
    /// a call per page cost such a fold about twice the CPU (docs/PERFORMANCE.md).
    pub(super) fn flush(&mut self) -> Result<()> {
        let outp = PathBuf::from("<output>");
        let ps = self.page_size;
        if let Some(c) = self.cut.take() {
            self.out.set_len(c * ps).map_err(io_err(&outp))?;
        }
        let pages = std::mem::take(&mut self.pages);
        let mut run: Vec<&[u8]> = Vec::with_capacity(RUN_PAGES);
        let mut first = 0u32;
        for (&pgno, page) in &pages {
            if run.len() == RUN_PAGES
                || (!run.is_empty() && pgno as u64 != first as u64 + run.len() as u64)
            {
                write_run(self.out, &run, (first as u64 - 1) * ps).map_err(io_err(&outp))?;
                run.clear();
            }
            if run.is_empty() {
                first = pgno;
            }
            run.push(page);
        }
        if !run.is_empty() {
            write_run(self.out, &run, (first as u64 - 1) * ps).map_err(io_err(&outp))?;
        }
        self.out.set_len(self.size * ps).map_err(io_err(&outp))?;
        Ok(())
    }
}

/// Most pages [`Applier::flush`] writes in one call (within the kernel's `IOV_MAX`).
pub(super) const RUN_PAGES: usize = 256;

/// Writes `bufs` one after another at `off` (a vectored positioned write, resumed where a
/// short write stopped).
fn write_run(out: &File, bufs: &[&[u8]], mut off: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (mut i, mut skip) = (0usize, 0usize);
    while i < bufs.len() {
        let iov: Vec<libc::iovec> = bufs[i..]
            .iter()
            .enumerate()
            .map(|(k, b)| {
                let b = if k == 0 { &b[skip..] } else { b };
                libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                }
            })
            .collect();
        // SAFETY: every iovec points into a slice of `bufs`, alive and unaliased for the call.
        let n = unsafe {
            libc::pwritev(
                out.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        off += n as u64;
        let mut n = n as usize;
        while i < bufs.len() && n >= bufs[i].len() - skip {
            n -= bufs[i].len() - skip;
            i += 1;
            skip = 0;
        }
        skip += n;
    }
    Ok(())
}
