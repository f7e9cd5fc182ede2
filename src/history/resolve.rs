//! Name → views: the restore points `.history` lists, and the resolution of a name (an
//! instant, `txid-N`, `latest`) to one view per database, from local staging first and the
//! replica for what staging no longer holds.

use super::*;

impl History {
    // ---------------------------------------------------------------- listing

    /// The names `.history` lists: restore points from staging and the replica, and `latest`.
    pub(super) fn restore_points(&self) -> Vec<String> {
        let mut l = self.listing.lock();
        if let Some(c) = l.as_ref() {
            if c.at.elapsed() < LIST_TTL {
                return c.names.clone();
            }
        }
        let mut times = BTreeSet::new();
        for s in self.staged_dbs() {
            if let Ok(log) = self.staged_log(&s.dir) {
                if log.base.txid > 0 && log.base.time_ns > 0 {
                    times.insert(log.base.time_ns);
                }
                let n = log.records.len();
                let step = n.div_ceil(STAGED_POINTS).max(1);
                for (i, (_, h, _)) in log.records.iter().enumerate() {
                    if i % step == 0 || i + 1 == n {
                        times.insert(h.time_ns);
                    }
                }
            }
        }
        if let Some(r) = &self.replica {
            match self.replica_points(r) {
                Ok(t) => times.extend(t),
                Err(e) => log::warn!(".history: cannot list the replica's restore points: {e:#}"),
            }
        }
        // Names have milliseconds: round up, so each name resolves to the state it stands for.
        let mut names: Vec<String> = times
            .into_iter()
            .map(|t| fmt_time(t.div_ceil(1_000_000) * 1_000_000))
            .collect();
        names.dedup();
        names.push("latest".into());
        *l = Some(Listing {
            at: Instant::now(),
            names: names.clone(),
        });
        names
    }

    /// Commit times of the replica's snapshots and of the ends of its highest level's segments.
    fn replica_points(&self, r: &ReplicaSide) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let opener = r.opener();
        let reader = Reader::new(r.client.as_ref(), opener.as_ref());
        for (id, name) in self.replica_dbs(r)? {
            let cat = self.replica_catalog(r, &id, &name)?;
            // Snapshots and the ends of the highest compaction level: a listing that stays
            // short over a long window (a few dozen entries a day with the defaults).
            let top = cat.levels.iter().skip(1).rev().find(|l| !l.is_empty());
            for o in cat.snaps.iter().chain(top.into_iter().flatten()) {
                let known = r.end_times.lock().get(&o.key).copied();
                let t = match known {
                    Some(t) => Some(t),
                    None => reader.end_time(o).ok(),
                };
                if let Some(t) = t {
                    r.end_times.lock().insert(o.key.clone(), t);
                    out.push(t);
                }
            }
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- resolution

    /// The view named `name` (resolved once, then reused; `latest` for a second).
    pub(super) fn view(&self, name: &str) -> Result<Arc<TimeView>, i32> {
        if let Some(v) = self.views.lock().get(name) {
            if name != "latest" || v.resolved.elapsed() < LATEST_TTL {
                return Ok(v.clone());
            }
        }
        let target = match parse_name(name) {
            Ok(t) => t,
            Err(e) => {
                log::info!(".history/{name}: no such view: {e}");
                return Err(libc::ENOENT);
            }
        };
        if let Target::Time(t) = target {
            if t > now_ns() {
                log::info!(".history/{name}: no such view: that instant is in the future");
                return Err(libc::ENOENT);
            }
        }
        let dbs = self.resolve(target);
        if dbs.is_empty() {
            log::info!(
                ".history/{name}: no database has a restore point there (outside the window of local staging{})",
                if self.replica.is_some() { " and the replica" } else { "; no replica is readable" }
            );
            return Err(libc::ENOENT);
        }
        let mtime_ns = match target {
            Target::Time(t) => t,
            _ => dbs.values().map(|d| d.time_ns).max().unwrap_or(0),
        };
        let v = Arc::new(TimeView {
            name: name.to_string(),
            mtime_ns,
            dbs,
            resolved: Instant::now(),
        });
        let mut views = self.views.lock();
        if views.len() >= MAX_VIEWS {
            if let Some(old) = views
                .iter()
                .min_by_key(|(_, v)| v.resolved)
                .map(|(k, _)| k.clone())
            {
                views.remove(&old);
            }
        }
        views.insert(name.to_string(), v.clone());
        log::debug!(".history/{}: resolved {} databases", v.name, v.dbs.len());
        Ok(v)
    }

    /// Every database at `target`, by name.
    fn resolve(&self, target: Target) -> BTreeMap<String, Arc<DbView>> {
        let mut out: BTreeMap<String, Arc<DbView>> = BTreeMap::new();
        let live: BTreeSet<String> = self
            .capture
            .databases()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut staged = self.staged_dbs();
        // Live databases first, then retired ones newest first: the first view of a name wins.
        staged.sort_by_key(|s| (s.deleted_ns.is_some(), std::cmp::Reverse(s.deleted_ns)));
        let mut staged_ids = BTreeSet::new();
        for s in staged {
            staged_ids.insert(s.id.clone());
            if out.contains_key(&s.name) {
                continue;
            }
            if let Some(d) = s.deleted_ns {
                let gone = match target {
                    Target::Latest => true,
                    Target::Time(t) => d <= t,
                    Target::Txid(_) => false,
                };
                if gone {
                    continue;
                }
            }
            let origin = Origin {
                name: s.name.clone(),
                id: s.id.clone(),
                stage_dir: Some(s.dir.clone()),
            };
            match self.resolve_one(&origin, target) {
                Ok(Some(v)) => {
                    out.insert(s.name.clone(), Arc::new(v));
                }
                Ok(None) => {}
                Err(e) => log::warn!(".history: {} at {}: {e:#}", s.name, describe(target)),
            }
        }
        // Databases only the replica knows.
        if let Some(r) = &self.replica {
            match self.replica_dbs(r) {
                Ok(dbs) => {
                    for (id, name) in dbs {
                        if staged_ids.contains(&id) || out.contains_key(&name) {
                            continue;
                        }
                        if target == Target::Latest && !live.contains(&name) {
                            continue;
                        }
                        let origin = Origin {
                            name: name.clone(),
                            id,
                            stage_dir: None,
                        };
                        match self.resolve_one(&origin, target) {
                            Ok(Some(v)) => {
                                out.insert(name, Arc::new(v));
                            }
                            Ok(None) => {}
                            Err(e) => {
                                log::warn!(".history: {name} at {}: {e:#}", describe(target))
                            }
                        }
                    }
                }
                Err(e) => log::warn!(".history: cannot read the replica: {e:#}"),
            }
        }
        out
    }

    /// One database at `target`: from staging if it holds it, else from the replica.
    fn resolve_one(&self, o: &Origin, target: Target) -> Result<Option<DbView>> {
        if let Some(dir) = &o.stage_dir {
            match self.staged_view(o, dir, target) {
                Ok(Found::View(v)) => return Ok(Some(*v)),
                Ok(Found::Absent) => return Ok(None),
                Ok(Found::NotStaged) => {}
                // A past state is the same wherever it is read from; `latest` is only what
                // staging says.
                Err(e) if target != Target::Latest && self.replica.is_some() => log::warn!(
                    ".history: {} at {}: cannot read local staging ({e:#}); trying the replica",
                    o.name,
                    describe(target)
                ),
                Err(e) => return Err(e),
            }
        }
        let Some(r) = &self.replica else {
            log::info!(
                ".history: {} at {} is older than local staging and no replica is configured",
                o.name,
                describe(target)
            );
            return Ok(None);
        };
        match self.replica_view(r, o, target) {
            Ok(v) => Ok(v),
            Err(e) => {
                log::info!(
                    ".history: {} at {} cannot be served: {e:#}",
                    o.name,
                    describe(target)
                );
                Ok(None)
            }
        }
    }
}

fn describe(t: Target) -> String {
    match t {
        Target::Latest => "latest".into(),
        Target::Txid(n) => format!("TXID {n}"),
        Target::Time(ns) => fmt_time(ns),
    }
}
