//! `--restore-if-missing`: before serving, each database the first replica holds and the
//! data directory lacks is restored, its staging seeded so TXIDs continue the replica's chain,
//! and its name taken over in every replica (see `owner`).

use std::path::Path;

use anyhow::{Context, Result};

use super::options::ReplicaSpec;
use crate::backing::META_DIR;

/// Restores every database the first replica holds that the data directory lacks and
/// `exclude` does not match; each replica is read with its own key.
pub(super) fn restore_missing(
    data: &Path,
    first: &ReplicaSpec,
    others: &[ReplicaSpec],
    exclude: &crate::exclude::Exclude,
) -> Result<()> {
    let url = first.url.as_str();
    let client = crate::replica::open(url)?;
    let opener = crate::crypt::Opener::for_key(&first.key)?;
    let reader = crate::catalog::Reader::new(client.as_ref(), opener.as_ref());
    let dbs = reader
        .databases()
        .with_context(|| format!("--restore-if-missing: reading {}", client.describe()))?;
    for (_, name) in dbs {
        let out = data.join(&name);
        if name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
            || name.starts_with(META_DIR)
        {
            log::warn!("--restore-if-missing: skipping {name:?}: not a plain path under the mount");
            continue;
        }
        if out.exists() {
            continue;
        }
        if exclude.matches(&name) {
            log::info!("--restore-if-missing: {name} is excluded by configuration; not restored");
            continue;
        }
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d)?;
        }
        log::info!(
            "--restore-if-missing: {name} is not in {}; restoring it from {}",
            data.display(),
            client.describe()
        );
        let r = crate::restore::run(&crate::restore::RestoreOpts {
            replica: url.to_string(),
            db: name.clone(),
            output: out.clone(),
            target: crate::catalog::Target::Latest,
            force: false,
            if_not_exists: true,
            age_identity: first.key.identity.clone(),
            passphrase: match first.key.identity {
                Some(_) => None,
                None => first.key.passphrase.clone(),
            },
            parallel: 4,
            dry_run: false,
            progress: false,
            exact: true,
        })
        .with_context(|| format!("--restore-if-missing: restoring {name}"))?;
        log::info!("--restore-if-missing: {}", r.text().trim_end());
        // Staging starts where the replica's chain ends, so TXIDs continue on it.
        let stage = data.join(META_DIR).join("db").join(&r.id);
        if !stage.exists() {
            let meta = crate::stage::BaseMeta {
                txid: r.txid,
                checksum: u64::from_str_radix(&r.checksum, 16).unwrap_or(0),
                page_size: r.page_size,
                db_pages: r.pages,
                time_ns: r.commit_time_ns,
                folding: None,
            };
            let rid = crate::ship::replica_id(&client.describe());
            crate::stage::seed(&stage, &name, &out, &meta)
                .and_then(|()| crate::ship::seed_position(&stage, &rid, r.txid))
                // This data directory continues the chain: it takes the name over in every
                // replica (the claim, see `owner`) when it first ships it.
                .and_then(|()| {
                    others.iter().try_for_each(|o| {
                        let desc = crate::replica::open(&o.url).map(|c| c.describe());
                        match desc {
                            Ok(d) => {
                                let m = crate::ship::takeover_marker(
                                    &stage,
                                    &crate::ship::replica_id(&d),
                                );
                                crate::stage::write_atomic(&m, b"")
                            }
                            Err(_) => Ok(()),
                        }
                    })?;
                    crate::stage::write_atomic(&crate::ship::takeover_marker(&stage, &rid), b"")
                })
                .with_context(|| format!("--restore-if-missing: seeding staging for {name}"))?;
            // The other replicas continue their own chain of this database where it ends
            // (or get a snapshot if they lack it or lag behind).
            for other in others {
                let held = crate::replica::open(&other.url).ok().and_then(|c| {
                    let opener = crate::crypt::Opener::for_key(&other.key).ok()?;
                    let rd = crate::catalog::Reader::new(c.as_ref(), opener.as_ref());
                    let cat = rd.catalog(&r.id, &name).ok()?;
                    let w = crate::catalog::window(&rd, &cat).ok()??;
                    Some((c.describe(), w.last_txid.min(r.txid)))
                });
                if let Some((desc, t)) = held {
                    crate::ship::seed_position(&stage, &crate::ship::replica_id(&desc), t)?;
                }
            }
        }
    }
    Ok(())
}
