//! `StagedReader`: the read-only look at a staging directory for readers that take no lock
//! (history views), and the invariant of folding it relies on.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{io_err, read_base_meta, segment_files, BaseMeta, Result};

/// A read-only look at a staging directory by a reader that takes no lock of this module
/// (history views), while capture may append and fold at any time: the base as `base.meta`
/// described it when the reader was made, the log's segments, and the check that the base
/// is still that one.
///
/// Invariant (what such a reader relies on): a fold marks `base.meta` as folding, rewrites
/// `base.db` in place, writes the new `base.meta`, and only then deletes the segments it
/// folded. So pages read from `base.db`, and segments listed, are those of the base read
/// here if [`StagedReader::still_current`] says so after the read; a segment opened before
/// it is deleted stays readable through its open handle.
pub struct StagedReader {
    dir: PathBuf,
    base: BaseMeta,
}

impl StagedReader {
    /// The staging of `dir` as of now; `None` while a fold is in progress (try again later).
    pub fn open(dir: &Path) -> Result<Option<StagedReader>> {
        let base = read_base_meta(dir)?;
        if base.folding.is_some() {
            return Ok(None);
        }
        Ok(Some(StagedReader {
            dir: dir.to_path_buf(),
            base,
        }))
    }

    /// The base this reader stands on.
    pub fn base(&self) -> BaseMeta {
        self.base
    }

    /// Sorted (first txid, path) of the log segments (read their headers with
    /// [`super::scan_headers`]; one may be gone by then, folded).
    pub fn segments(&self) -> Result<Vec<(u64, PathBuf)>> {
        segment_files(&self.dir)
    }

    /// `base.db`, opened for reading pages of the base (valid while `still_current`).
    pub fn open_base(&self) -> Result<File> {
        let p = self.dir.join("base.db");
        File::open(&p).map_err(io_err(&p))
    }

    /// True if `base.meta` still describes the base this reader stands on: what was read
    /// from `base.db` or listed since [`StagedReader::open`] belongs to it.
    pub fn still_current(&self) -> Result<bool> {
        Ok(read_base_meta(&self.dir)? == self.base)
    }
}
