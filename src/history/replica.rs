//! Page maps from the replica's objects: listings and catalogs (cached), object readers for
//! reading in place, whole downloads of old-format objects, and a view's page map built from
//! a restore plan.

use super::*;

impl History {
    pub(super) fn replica_dbs(&self, r: &ReplicaSide) -> Result<Vec<(String, String)>> {
        let mut g = r.dbs.lock();
        if let Some((at, v)) = g.as_ref() {
            if at.elapsed() < LIST_TTL {
                return Ok(v.clone());
            }
        }
        let opener = r.opener();
        let v = Reader::new(r.client.as_ref(), opener.as_ref()).databases()?;
        *g = Some((Instant::now(), v.clone()));
        Ok(v)
    }

    pub(super) fn replica_catalog(
        &self,
        r: &ReplicaSide,
        id: &str,
        name: &str,
    ) -> Result<DbCatalog> {
        if let Some((at, c)) = r.cats.lock().get(id) {
            if at.elapsed() < LIST_TTL {
                return Ok(c.clone());
            }
        }
        let c = Reader::new(r.client.as_ref(), None).catalog(id, name)?;
        r.cats
            .lock()
            .insert(id.to_string(), (Instant::now(), c.clone()));
        Ok(c)
    }

    /// Object `o` of the replica, opened for reading in place (its header and directory read
    /// and verified; cached). An object of format version 1 is downloaded whole instead
    /// (decrypted, verified) and read from its local copy.
    fn object(&self, r: &ReplicaSide, o: &Obj) -> Result<Arc<ObjReader>> {
        if let Some(x) = self.objects.lock().get(&o.key) {
            return Ok(x.clone());
        }
        let opener = r.opener();
        let client: Arc<dyn ReplicaClient> = r.client.clone();
        let x = match ObjReader::open(&client, &o.key, o.size, opener.as_ref())? {
            Opened::Ranged(x) => Arc::new(*x),
            Opened::Whole => {
                let (f, hdr) = self.download(r, &o.key)?;
                Arc::new(ObjReader::local(&o.key, f, hdr)?)
            }
        };
        self.objects.lock().put(o.key.clone(), x.clone());
        Ok(x)
    }

    /// The local plain copy of object `key`, downloaded (and decrypted, verified) if needed:
    /// for objects of format version 1 only.
    fn download(&self, r: &ReplicaSide, key: &str) -> Result<(File, segment::ObjHeader)> {
        let _g = self.fetch_lock.lock();
        let local = self.cache_dir.join(key.replace('/', "_"));
        if let Ok(f) = File::open(&local) {
            let _ = f.set_modified(std::time::SystemTime::now());
            let mut head = vec![0u8; segment::HEADER];
            f.read_exact_at(&mut head, 0)?;
            let h = segment::parse_header(&head, key)?;
            return Ok((f, h));
        }
        self.evict_objects();
        let scratch = self
            .cache_dir
            .join(format!(".{}.part", key.replace('/', "_")));
        let opener = r.opener();
        let plain = Reader::new(r.client.as_ref(), opener.as_ref()).fetch(key, &scratch)?;
        self.whole_downloads.fetch_add(1, Ordering::Relaxed);
        let f = File::open(&plain)?;
        let h = match segment::verify(&f, key) {
            Ok(h) => h,
            Err(e) => {
                let _ = fs::remove_file(&plain);
                return Err(e.into());
            }
        };
        fs::rename(&plain, &local)?;
        Ok((f, h))
    }

    /// Removes the oldest downloaded objects while they take more than the budget (views
    /// using one keep it open, so its space is released once they are gone).
    fn evict_objects(&self) {
        let Ok(rd) = fs::read_dir(&self.cache_dir) else {
            return;
        };
        let mut v: Vec<(u64, u64, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((mtime_ns(&e.path()).unwrap_or(0), m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = v.iter().map(|x| x.1).sum();
        v.sort();
        for (_, len, p) in v {
            if total <= self.obj_budget {
                break;
            }
            let _ = fs::remove_file(&p);
            total -= len;
        }
    }

    pub(super) fn replica_view(
        &self,
        r: &ReplicaSide,
        o: &Origin,
        target: Target,
    ) -> Result<Option<DbView>> {
        let known = self.replica_dbs(r)?;
        if !known.iter().any(|(id, _)| *id == o.id) {
            bail!("the replica holds no database with id {}", o.id);
        }
        let cat = self.replica_catalog(r, &o.id, &o.name)?;
        let opener = r.opener();
        let reader = Reader::new(r.client.as_ref(), opener.as_ref());
        let plan = catalog::plan(&reader, &cat, target)?;
        let mut map = PageMap {
            files: Vec::new(),
            objs: Vec::new(),
            pages: HashMap::new(),
            base: None,
            base_limit: 0,
        };
        let mut state: u64 = 0;
        let mut last: Option<RecordHeader> = None;
        let mut ps = 0u32;
        for step in &plan.steps {
            let obj = self.object(r, &step.obj)?;
            if obj.hdr.level > 0 && obj.hdr.first_txid != state + 1 {
                bail!(
                    "{} covers TXIDs {}..={} but the view stands at {state}",
                    obj.key,
                    obj.hdr.first_txid,
                    obj.hdr.last_txid
                );
            }
            let oi = map.objs.len() as u32;
            map.objs.push(obj.clone());
            // The index is in TXID order: walk it alongside the records.
            let index = &obj.dir.index;
            let mut at = 0;
            for h in &obj.dir.records {
                let from = at;
                while at < index.len() && index[at].txid <= h.txid {
                    at += 1;
                }
                if h.txid <= state || h.txid > step.upto || h.time_ns > step.until_ns {
                    continue;
                }
                if h.replaces_state(ps) {
                    map.pages.clear();
                }
                ps = h.page_size;
                for e in index[from..at].iter().filter(|e| e.txid == h.txid) {
                    map.pages.insert(
                        e.pgno,
                        Loc::Frame {
                            obj: oi,
                            frame: e.frame,
                            in_frame: e.in_frame,
                        },
                    );
                }
                if last.is_some_and(|l| h.db_pages < l.db_pages) {
                    map.pages.retain(|p, _| *p <= h.db_pages);
                }
                state = h.txid;
                last = Some(*h);
            }
        }
        let Some(last) = last else {
            return Ok(None);
        };
        if let Target::Txid(t) = target {
            if last.txid != t {
                return Ok(None);
            }
        }
        Ok(Some(DbView {
            id: self.next_view.fetch_add(1, Ordering::Relaxed),
            origin: o.clone(),
            txid: last.txid,
            time_ns: last.time_ns,
            page_size: last.page_size,
            db_pages: last.db_pages,
            map: RwLock::new(map),
        }))
    }
}

pub(super) fn opener_for(k: &Key) -> Result<Opener> {
    match k {
        Key::IdentityFile(f) => Opener::from_identity_file(f),
        Key::Passphrase(p) => Opener::from_passphrase(p),
    }
}

impl ReplicaSide {
    pub(super) fn opener(&self) -> Option<Opener> {
        self.key
            .as_ref()
            .and_then(|k| opener_for(k).ok())
            .map(|o| o.sharing(&self.file_keys))
    }
}
