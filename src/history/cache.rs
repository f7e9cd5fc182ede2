//! Pages of a view: the byte-bounded LRU page cache, one page read through a view's map
//! (staged file, base, or replica frame, with read-ahead), and the map's rebuild when the
//! staging base moved.

use super::*;

impl History {
    fn cached(&self, key: (u64, u32)) -> Option<Arc<Vec<u8>>> {
        self.pages.lock().0.get(&key).cloned()
    }

    fn remember(&self, key: (u64, u32), page: Arc<Vec<u8>>) {
        let mut g = self.pages.lock();
        let len = page.len() as u64;
        if let Some(old) = g.0.put(key, page) {
            g.1 -= old.len() as u64;
        }
        g.1 += len;
        while g.1 > self.page_budget {
            match g.0.pop_lru() {
                Some((_, p)) => g.1 -= p.len() as u64,
                None => break,
            }
        }
    }

    /// Page `pgno` of `db` (1-based, within its size), page 1 in rollback journal mode.
    pub(super) fn page(&self, db: &DbView, pgno: u32) -> Result<Arc<Vec<u8>>> {
        if let Some(p) = self.cached((db.id, pgno)) {
            return Ok(p);
        }
        for _ in 0..3 {
            let got = {
                let map = db.map.read();
                self.read_page(db, &map, pgno)?
            };
            match got {
                Some(mut page) => {
                    if pgno == 1 {
                        crate::sqlite::as_rollback_journal(&mut page);
                    }
                    let p = Arc::new(page);
                    self.remember((db.id, pgno), p.clone());
                    return Ok(p);
                }
                None => self.rebuild(db)?,
            }
        }
        bail!("the staging base keeps moving")
    }

    /// Reads one page through the map; `None` if the staging base moved (rebuild the map).
    fn read_page(&self, db: &DbView, map: &PageMap, pgno: u32) -> Result<Option<Vec<u8>>> {
        let ps = db.page_size as usize;
        let mut page = vec![0u8; ps];
        match map.pages.get(&pgno) {
            Some(Loc::Raw { file, off }) => {
                map.files[*file as usize].read_exact_at(&mut page, *off)?;
            }
            Some(Loc::Coded { file, at }) => {
                crate::delta::read_entry(&map.files[*file as usize], *at, &mut page, 0)?;
            }
            Some(&Loc::Frame {
                obj,
                frame,
                in_frame,
            }) => {
                let raw = self.frame(&map.objs[obj as usize], frame)?;
                let at = in_frame as usize;
                page.copy_from_slice(
                    raw.get(at..at + ps)
                        .ok_or_else(|| anyhow!("a page index entry points past its frame"))?,
                );
                // Read ahead: the entries that follow in the same frame, if the map points at
                // them (sequential scans fetch and decode each frame once).
                let mut at = at + ps;
                for _ in 0..READ_AHEAD {
                    let Some(entry) = raw.get(at..at + 4 + ps) else {
                        break;
                    };
                    let p = u32::from_be_bytes(entry[..4].try_into()?);
                    at += 4;
                    if p != 1 && p != pgno && p <= db.db_pages {
                        if let Some(&Loc::Frame {
                            obj: o2,
                            frame: f2,
                            in_frame: i2,
                        }) = map.pages.get(&p)
                        {
                            if o2 == obj && f2 == frame && i2 as usize == at {
                                self.remember((db.id, p), Arc::new(entry[4..].to_vec()));
                            }
                        }
                    }
                    at += ps;
                }
            }
            None => {
                if let Some(b) = map.base.as_ref().filter(|_| pgno <= map.base_limit) {
                    b.file
                        .read_exact_at(&mut page, (pgno as u64 - 1) * ps as u64)?;
                    if !b.staging.still_current().unwrap_or(false) {
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some(page))
    }

    /// Frame `i` of object `o`, decoded and verified (recent ones are kept).
    fn frame(&self, o: &ObjReader, i: u32) -> Result<Arc<Vec<u8>>> {
        let k = (o.key.clone(), i);
        if let Some(f) = self.frames.lock().get(&k) {
            return Ok(f.clone());
        }
        let f = Arc::new(o.frame(i)?);
        self.frames.lock().put(k, f.clone());
        Ok(f)
    }

    /// Rebuilds `db`'s map for the same TXID after the staging base moved.
    fn rebuild(&self, db: &DbView) -> Result<()> {
        let t = Target::Txid(db.txid);
        let mut fresh = None;
        if let Some(dir) = &db.origin.stage_dir {
            if let Found::View(v) = self.staged_view(&db.origin, dir, t)? {
                fresh = Some(*v);
            }
        }
        if fresh.is_none() {
            if let Some(r) = &self.replica {
                fresh = self.replica_view(r, &db.origin, t)?;
            }
        }
        let v = fresh.ok_or_else(|| {
            anyhow!(
                "TXID {} of {} was folded out of staging and the replica does not have it",
                db.txid,
                db.origin.name
            )
        })?;
        if (v.db_pages, v.page_size) != (db.db_pages, db.page_size) {
            bail!("rebuilding the view gave a different database size");
        }
        *db.map.write() = v.map.into_inner();
        Ok(())
    }
}
