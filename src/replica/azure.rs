//! A replica in Azure Blob Storage: `az://container/prefix?account=NAME&endpoint=URL&timeout=30s`
//! (`abs://` is the same; all parameters optional where the environment gives them), through
//! the `object_store` crate's Azure client.
//!
//! Where things come from, first found wins: the account from the URL's `account`, else
//! `AZURE_STORAGE_ACCOUNT_NAME`, else the connection string; the endpoint from the URL's
//! `endpoint` (Azurite, sovereign clouds, private endpoints), else `AZURE_STORAGE_ENDPOINT`, else
//! the connection string, else `https://ACCOUNT.blob.core.windows.net`. Credentials: a shared
//! key (`AZURE_STORAGE_ACCOUNT_KEY`), a SAS token (`AZURE_STORAGE_SAS_TOKEN`), a service
//! principal or workload identity (`AZURE_CLIENT_ID`, `AZURE_TENANT_ID`, `AZURE_CLIENT_SECRET`
//! or `AZURE_FEDERATED_TOKEN_FILE`), the parts of `AZURE_STORAGE_CONNECTION_STRING`, else the
//! machine's managed identity.
//!
//! Invariants:
//! - `put_new` is a Put Blob with `If-None-Match: *`: the store refuses it (409 or 412) when
//!   the blob exists, which is the fence against a second writer. Every upload is one Put
//!   Blob: readers see the whole blob or none.
//! - Every request is bounded in time (cloud.rs): each read waits at most `timeout`, every
//!   operation (the client's retries with backoff included) at most its budget.
//! - Errors pass through [`Secrets::scrub`]: no key, SAS or token in any text sqlfs shows.

use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as ObjPath;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use super::cloud::{self, chain, Secrets};
use super::{check_key, Listed, ReplicaClient, ReplicaError, Result};

pub struct AzureReplica {
    store: MicrosoftAzure,
    prefix: String,
    shown: String,
    timeout: Duration,
    /// Keys asked for per listing page (`None`: the store's default, 5000).
    list_page: Option<usize>,
    secrets: Secrets,
    rt: tokio::runtime::Runtime,
}

/// Variables whose values are credentials: hidden from every error.
const SECRET_VARS: [&str; 8] = [
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_CLIENT_SECRET",
];

/// The `Key=Value;…` pairs of an Azure Storage connection string (values may hold `=`).
fn connection_string(cs: &str) -> Vec<(String, String)> {
    cs.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect()
}

/// The settings a connection string gives, as the client's configuration keys.
fn from_connection_string(cs: &str) -> Vec<(AzureConfigKey, String)> {
    let pairs = connection_string(cs);
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let mut out = Vec::new();
    if let Some(a) = get("AccountName") {
        out.push((AzureConfigKey::AccountName, a));
    }
    if let Some(k) = get("AccountKey") {
        out.push((AzureConfigKey::AccessKey, k));
    }
    if let Some(s) = get("SharedAccessSignature") {
        out.push((AzureConfigKey::SasKey, s));
    }
    let endpoint = get("BlobEndpoint").or_else(|| {
        let account = get("AccountName")?;
        let suffix = get("EndpointSuffix")?;
        let proto = get("DefaultEndpointsProtocol").unwrap_or_else(|| "https".into());
        Some(format!("{proto}://{account}.blob.{suffix}"))
    });
    if let Some(e) = endpoint {
        out.push((AzureConfigKey::Endpoint, e));
    }
    if get("UseDevelopmentStorage").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        out.push((AzureConfigKey::UseEmulator, "true".into()));
    }
    out
}

impl AzureReplica {
    pub fn open(url: &str) -> Result<AzureReplica> {
        let bad = |why: String| ReplicaError::BadUrl {
            url: url.to_string(),
            why,
        };
        let u =
            cloud::parse_url(url, &["az://", "abs://"], "container", &["account"]).map_err(bad)?;
        let mut secrets = Secrets::default();
        secrets.add_env(&SECRET_VARS);
        // The connection string first, so that every other source overrides it.
        let mut b = MicrosoftAzureBuilder::new();
        if let Ok(cs) = std::env::var("AZURE_STORAGE_CONNECTION_STRING") {
            for (_, v) in connection_string(&cs).iter().filter(|(k, _)| {
                k.eq_ignore_ascii_case("AccountKey")
                    || k.eq_ignore_ascii_case("SharedAccessSignature")
            }) {
                secrets.add(v);
            }
            for (k, v) in from_connection_string(&cs) {
                b = b.with_config(k, v);
            }
        }
        for (k, v) in std::env::vars() {
            if k.starts_with("AZURE_") && k != "AZURE_STORAGE_CONNECTION_STRING" {
                if let Ok(key) = k.to_ascii_lowercase().parse::<AzureConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
        }
        for (k, v) in &u.params {
            if k == "account" {
                b = b.with_account(v);
            }
        }
        if let Some(e) = &u.endpoint {
            b = b.with_endpoint(e.clone());
        }
        let emulator = b
            .get_config_value(&AzureConfigKey::UseEmulator)
            .is_some_and(|v| cloud::flag(&v.to_ascii_lowercase()));
        if !emulator && b.get_config_value(&AzureConfigKey::AccountName).is_none() {
            return Err(bad("no storage account: add account=NAME to the URL (or set AZURE_STORAGE_ACCOUNT_NAME or AZURE_STORAGE_CONNECTION_STRING)".into()));
        }
        let http = b
            .get_config_value(&AzureConfigKey::Endpoint)
            .is_some_and(|e| e.starts_with("http://"));
        let connect = cloud::CONNECT_TIMEOUT.min(u.timeout);
        // No limit on a whole request (a large blob takes long); every wait for data is
        // limited by `timeout`, every operation by its budget (`run`).
        let opts = object_store::ClientOptions::new()
            .with_timeout_disabled()
            .with_read_timeout(u.timeout)
            .with_connect_timeout(connect)
            .with_allow_http(http);
        let retry = object_store::RetryConfig {
            max_retries: cloud::ATTEMPTS as usize - 1,
            retry_timeout: cloud::op_budget(u.timeout, 0),
            backoff: object_store::BackoffConfig {
                init_backoff: cloud::backoff(1),
                max_backoff: cloud::backoff(u32::MAX),
                base: 2.0,
            },
        };
        let store = b
            .with_container_name(&u.bucket)
            .with_client_options(opts)
            .with_retry(retry)
            .build()
            .map_err(|e| bad(secrets.scrub(&chain(&e))))?;
        let endpoint = u.endpoint.as_deref().map(super::redact_url);
        let shown = match endpoint {
            Some(e) => format!("az://{}/{} at {e}", u.bucket, u.prefix),
            None => format!("az://{}/{}", u.bucket, u.prefix),
        };
        let rt = cloud::runtime("sqlfs-azure")
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        Ok(AzureReplica {
            store,
            prefix: u.prefix,
            shown,
            timeout: u.timeout,
            list_page: None,
            secrets,
            rt,
        })
    }

    /// Lists `n` keys per page instead of the store's default: lets tests cross page
    /// boundaries with a few objects.
    pub fn with_list_page(mut self, n: usize) -> AzureReplica {
        self.list_page = Some(n);
        self
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn path(&self, op: &'static str, key: &str) -> Result<ObjPath> {
        ObjPath::parse(self.full(key))
            .map_err(|e| self.fail(op, key, io::ErrorKind::InvalidInput, &e.to_string()))
    }

    fn fail(&self, op: &'static str, key: &str, kind: io::ErrorKind, detail: &str) -> ReplicaError {
        cloud::error(&self.shown, op, key, kind, self.secrets.scrub(detail))
    }

    fn store_err(&self, op: &'static str, key: &str, e: &object_store::Error) -> ReplicaError {
        let kind = match e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        self.fail(op, key, kind, &chain(e))
    }

    /// Runs `f` on the runtime within `budget`.
    fn run<T>(
        &self,
        op: &'static str,
        key: &str,
        budget: Duration,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.rt.block_on(async {
            tokio::time::timeout(budget, f)
                .await
                .unwrap_or_else(|_| Err(cloud::timed_out(&self.shown, op, key, budget)))
        })
    }

    fn upload(&self, op: &'static str, key: &str, data: Bytes, mode: PutMode) -> Result<()> {
        let path = self.path(op, key)?;
        let fence = matches!(mode, PutMode::Create);
        let budget = cloud::op_budget(self.timeout, data.len() as u64);
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.run(op, key, budget, async {
            match self
                .store
                .put_opts(&path, PutPayload::from(data), opts)
                .await
            {
                Ok(_) => Ok(()),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) if fence => Err(ReplicaError::Exists(key.to_string())),
                Err(e) => Err(self.store_err(op, key, &e)),
            }
        })
    }
}

impl ReplicaClient for AzureReplica {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn put_new(&self, key: &str, src: &Path) -> Result<()> {
        check_key(&self.shown, "put_new", key, false)?;
        let data = cloud::read_source(&self.shown, key, src)?;
        self.upload("put_new", key, data, PutMode::Create)
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        check_key(&self.shown, "put", key, false)?;
        self.upload("put", key, Bytes::copy_from_slice(data), PutMode::Overwrite)
    }

    fn get(&self, key: &str, dst: &Path) -> Result<bool> {
        check_key(&self.shown, "get", key, false)?;
        let path = self.path("get", key)?;
        self.rt.block_on(async {
            let budget = cloud::op_budget(self.timeout, 0);
            let r = tokio::time::timeout(budget, self.store.get_opts(&path, GetOptions::default()))
                .await
                .map_err(|_| cloud::timed_out(&self.shown, "get", key, budget))?;
            let r = match r {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(self.store_err("get", key, &e)),
            };
            let io_err = |e: io::Error| ReplicaError::Io {
                replica: self.describe(),
                op: "download",
                key: key.to_string(),
                err: e,
            };
            let mut f = std::fs::File::create(dst).map_err(io_err)?;
            let mut body = r.into_stream();
            loop {
                let chunk = tokio::time::timeout(self.timeout, body.next())
                    .await
                    .map_err(|_| cloud::timed_out(&self.shown, "download", key, self.timeout))?;
                match chunk {
                    Some(Ok(c)) => f.write_all(&c).map_err(io_err)?,
                    Some(Err(e)) => return Err(self.store_err("download", key, &e)),
                    None => break,
                }
            }
            Ok(true)
        })
    }

    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
        check_key(&self.shown, "get_range", key, false)?;
        let path = self.path("get_range", key)?;
        // A zero-length read still asks for a byte: a missing key must answer `None`.
        let end = off.saturating_add(len.max(1));
        let sized = len.min(1 << 30);
        self.run(
            "get_range",
            key,
            cloud::op_budget(self.timeout, sized),
            async {
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(off..end)),
                    ..Default::default()
                };
                let r = match self.store.get_opts(&path, opts).await {
                    Ok(r) => r,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => {
                        // A range at or past the end is refused (416): the object's size tells.
                        return match self.store.head(&path).await {
                            Err(object_store::Error::NotFound { .. }) => Ok(None),
                            Ok(m) if m.size <= off => Ok(Some(Vec::new())),
                            _ => Err(self.store_err("get_range", key, &e)),
                        };
                    }
                };
                let data = r
                    .bytes()
                    .await
                    .map_err(|e| self.store_err("download", key, &e))?;
                let mut v = data.to_vec();
                v.truncate(usize::try_from(len).unwrap_or(usize::MAX));
                Ok(Some(v))
            },
        )
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(&self.shown, "delete", key, false)?;
        let path = self.path("delete", key)?;
        self.run("delete", key, cloud::op_budget(self.timeout, 0), async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.store_err("delete", key, &e)),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        check_key(&self.shown, "list", prefix, true)?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let wanted = format!("{strip}{prefix}");
        // The client drops a blob named exactly like the prefix it lists: ask for one
        // character less (the filter below keeps only what starts with `prefix`).
        let asked = wanted
            .char_indices()
            .last()
            .map_or("", |(i, _)| &wanted[..i]);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let opts = PaginatedListOptions {
                max_keys: self.list_page,
                page_token: token.clone(),
                ..Default::default()
            };
            let page = self.run(
                "list",
                prefix,
                cloud::op_budget(self.timeout, 1 << 20),
                async {
                    self.store
                        .list_paginated((!asked.is_empty()).then_some(asked), opts)
                        .await
                        .map_err(|e| self.store_err("list", prefix, &e))
                },
            )?;
            for o in page.result.objects {
                let name = o.location.as_ref();
                let Some(k) = name.strip_prefix(&strip) else {
                    continue;
                };
                if !k.starts_with(prefix) {
                    continue;
                }
                out.push(Listed {
                    key: k.to_string(),
                    size: o.size,
                    modified_ns: o
                        .last_modified
                        .timestamp_nanos_opt()
                        .map_or(0, |n| n.max(0) as u64),
                });
            }
            match page.page_token.filter(|t| !t.is_empty()) {
                // A store that hands back the same token would list forever.
                Some(t) if token.as_deref() != Some(t.as_str()) => token = Some(t),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out.dedup_by(|a, b| a.key == b.key);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings() {
        let cs = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5==;EndpointSuffix=core.usgovcloudapi.net";
        let got = from_connection_string(cs);
        assert!(got.contains(&(AzureConfigKey::AccountName, "acct".into())));
        assert!(got.contains(&(AzureConfigKey::AccessKey, "a2V5==".into())));
        assert!(got.contains(&(
            AzureConfigKey::Endpoint,
            "https://acct.blob.core.usgovcloudapi.net".into()
        )));
        let got = from_connection_string(
            "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;SharedAccessSignature=sv=2020&sig=abc%3D",
        );
        assert!(got.contains(&(
            AzureConfigKey::Endpoint,
            "http://127.0.0.1:10000/devstoreaccount1".into()
        )));
        assert!(got.contains(&(AzureConfigKey::SasKey, "sv=2020&sig=abc%3D".into())));
    }

    #[test]
    fn urls() {
        for bad in [
            "az://",
            "az://c/p?region=x",
            "az://c/p?endpoint=http://127.0.0.1:1",
            "az://k:s@c/p",
            "abs://c/p?endpoint=nope",
        ] {
            let Err(e) = AzureReplica::open(bad) else {
                panic!("{bad} accepted");
            };
            assert!(e.to_string().contains("bad replica URL"), "{e}");
        }
    }
}
