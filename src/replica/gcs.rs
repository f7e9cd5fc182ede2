//! A replica in Google Cloud Storage: `gs://bucket/prefix?endpoint=URL&anonymous=true&timeout=30s`
//! (all parameters optional), spoken through the JSON API.
//!
//! Credentials are Application Default Credentials: the key file `GOOGLE_APPLICATION_CREDENTIALS`
//! names (a service account or a user), else gcloud's user credentials file, else the metadata
//! server of the machine sqlfs runs on; tokens are fetched and renewed by the credential chain
//! of the `object_store` crate. `anonymous=true` sends no credentials (an emulator). When the
//! URL names no endpoint, `STORAGE_EMULATOR_HOST` (Google's convention for emulators) gives one
//! and implies `anonymous`.
//!
//! Invariants:
//! - `put_new` is an upload with `ifGenerationMatch=0`: the store refuses it (412) when the
//!   object exists, which is the fence against a second writer. An upload is one request (a
//!   multipart body: the object's name, then its bytes): readers see all of it or nothing.
//! - Every request is bounded in time (cloud.rs); what may pass (timeouts, lost connections,
//!   429 and 5xx answers) is retried with backoff, four attempts in all.
//! - Errors show the status and the store's message, never a token.

use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use object_store::gcp::{GcpCredentialProvider, GoogleCloudStorageBuilder};
use reqwest::header::{CONTENT_TYPE, RANGE};
use reqwest::StatusCode;

use super::cloud::{self, chain, Secrets};
use super::{check_key, Listed, ReplicaClient, ReplicaError, Result};

const DEFAULT_BASE: &str = "https://storage.googleapis.com";

pub struct GcsReplica {
    http: reqwest::Client,
    /// `None`: no credentials are sent (`anonymous`).
    auth: Option<GcpCredentialProvider>,
    /// `https://storage.googleapis.com` or the URL's endpoint, without a trailing `/`.
    base: String,
    bucket: String,
    prefix: String,
    shown: String,
    timeout: Duration,
    /// Keys asked for per listing page (`None`: the store's default, 1000).
    list_page: Option<usize>,
    secrets: Secrets,
    rt: tokio::runtime::Runtime,
}

/// `s` percent-encoded for a URL path segment or query value: every byte but `A-Z a-z 0-9
/// - . _ ~` (so `/` in an object name becomes `%2F`, as the JSON API wants).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A multipart boundary that does not occur in `data`.
fn boundary(data: &[u8]) -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (0u64..)
        .map(|i| {
            format!(
                "sqlfs-part-{:016x}",
                seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            )
        })
        .find(|b| !data.windows(b.len()).any(|w| w == b.as_bytes()))
        .unwrap_or_default()
}

/// One page of an object listing (only the fields sqlfs reads).
#[derive(serde::Deserialize)]
struct Page {
    #[serde(default)]
    items: Vec<Item>,
    #[serde(rename = "nextPageToken")]
    next: Option<String>,
}

#[derive(serde::Deserialize)]
struct Item {
    name: String,
    /// A decimal string in the JSON API.
    size: String,
    updated: Option<String>,
    /// The base64 of the object's MD5 (absent for composite objects).
    #[serde(rename = "md5Hash")]
    md5: Option<String>,
}

/// The 16 bytes of an MD5 written in base64 (24 characters, padded), as the JSON API states
/// an object's `md5Hash`; `None` for anything else.
fn b64_md5(s: &str) -> Option<[u8; 16]> {
    let s = s.trim().strip_suffix("==")?;
    if s.len() != 22 {
        return None;
    }
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = [0u8; 16];
    let mut i = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            if i < 16 {
                out[i] = (bits >> n) as u8;
            }
            i += 1;
            bits &= (1 << n) - 1;
        }
    }
    // 22 characters carry 132 bits: 16 bytes and 4 bits that must be zero.
    (i == 16 && bits == 0).then_some(out)
}

/// The message of a JSON API error body, else the start of the body.
fn message(body: &str) -> String {
    let parsed: Option<String> = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string));
    let mut m = parsed.unwrap_or_else(|| body.trim().to_string());
    if m.len() > 300 {
        let mut cut = 300;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
    }
    m
}

impl GcsReplica {
    pub fn open(url: &str) -> Result<GcsReplica> {
        let bad = |why: String| ReplicaError::BadUrl {
            url: url.to_string(),
            why,
        };
        let u = cloud::parse_url(url, &["gs://"], "bucket", &["anonymous"]).map_err(bad)?;
        let mut anonymous = u
            .params
            .iter()
            .any(|(k, v)| k == "anonymous" && cloud::flag(v));
        let mut endpoint = u.endpoint.clone();
        if endpoint.is_none() {
            if let Some(h) = std::env::var("STORAGE_EMULATOR_HOST")
                .ok()
                .filter(|h| !h.is_empty())
            {
                let e = if h.contains("://") {
                    h
                } else {
                    format!("http://{h}")
                };
                super::s3::check_endpoint(&e)
                    .map_err(|w| bad(format!("STORAGE_EMULATOR_HOST: {w}")))?;
                endpoint = Some(e.trim_end_matches('/').to_string());
                anonymous = true;
            }
        }
        let rt = cloud::runtime("sqlfs-gcs")
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        let connect = cloud::CONNECT_TIMEOUT.min(u.timeout);
        let http = reqwest::Client::builder()
            .connect_timeout(connect)
            .read_timeout(u.timeout)
            .build()
            .map_err(|e| bad(format!("cannot start the HTTP client: {}", chain(&e))))?;
        let mut secrets = Secrets::default();
        secrets.add_env(&["GOOGLE_SERVICE_ACCOUNT_KEY", "GOOGLE_BEARER_TOKEN"]);
        let auth = if anonymous {
            None
        } else {
            let opts = object_store::ClientOptions::new()
                .with_timeout(u.timeout)
                .with_connect_timeout(connect);
            let retry = object_store::RetryConfig {
                max_retries: cloud::ATTEMPTS as usize - 1,
                retry_timeout: cloud::op_budget(u.timeout, 0),
                ..Default::default()
            };
            // Only its credential chain is used: requests go through `http` below.
            let store = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&u.bucket)
                .with_client_options(opts)
                .with_retry(retry)
                .build()
                .map_err(|e| bad(format!("credentials: {}", secrets.scrub(&chain(&e)))))?;
            Some(std::sync::Arc::clone(store.credentials()))
        };
        // Without secrets: the endpoint may carry user information or a signed query.
        let shown = match &endpoint {
            Some(e) => format!("gs://{}/{} at {}", u.bucket, u.prefix, super::redact_url(e)),
            None => format!("gs://{}/{}", u.bucket, u.prefix),
        };
        Ok(GcsReplica {
            http,
            auth,
            base: endpoint.unwrap_or_else(|| DEFAULT_BASE.to_string()),
            bucket: u.bucket,
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
    pub fn with_list_page(mut self, n: usize) -> GcsReplica {
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

    fn object_url(&self, key: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.base,
            enc(&self.bucket),
            enc(&self.full(key))
        )
    }

    fn fail(&self, op: &'static str, key: &str, kind: io::ErrorKind, detail: &str) -> ReplicaError {
        cloud::error(&self.shown, op, key, kind, self.secrets.scrub(detail))
    }

    /// The error of an answer that is not the one expected, with the store's message.
    async fn status_error(
        &self,
        op: &'static str,
        key: &str,
        r: reqwest::Response,
    ) -> ReplicaError {
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        let kind = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        self.fail(op, key, kind, &format!("HTTP {status}: {}", message(&body)))
    }

    /// Sends the request `build` makes, with credentials, retrying what may pass. `bytes`
    /// sizes each attempt's time limit, which covers the answer's body too; `None` sets none
    /// (a download of unknown size: the client's read timeout bounds every wait instead).
    async fn send(
        &self,
        op: &'static str,
        key: &str,
        bytes: Option<u64>,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let mut n = 0;
        loop {
            n += 1;
            let mut rb = build();
            if let Some(b) = bytes {
                rb = rb.timeout(cloud::attempt_timeout(self.timeout, b));
            }
            if let Some(a) = &self.auth {
                let c = a.get_credential().await.map_err(|e| {
                    self.fail(
                        op,
                        key,
                        io::ErrorKind::PermissionDenied,
                        &format!("credentials: {}", chain(&e)),
                    )
                })?;
                rb = rb.bearer_auth(&c.bearer);
            }
            let last = n >= cloud::ATTEMPTS;
            match rb.send().await {
                Ok(r)
                    if !last
                        && (r.status() == StatusCode::TOO_MANY_REQUESTS
                            || r.status().is_server_error()) =>
                {
                    log::debug!("{}: {op} {key}: HTTP {}, retrying", self.shown, r.status());
                }
                Ok(r) => return Ok(r),
                Err(e) if !last => {
                    log::debug!(
                        "{}: {op} {key}: {}, retrying",
                        self.shown,
                        self.secrets.scrub(&chain(&e))
                    );
                }
                Err(e) => {
                    let kind = if e.is_timeout() {
                        io::ErrorKind::TimedOut
                    } else {
                        io::ErrorKind::Other
                    };
                    return Err(self.fail(op, key, kind, &chain(&e)));
                }
            }
            tokio::time::sleep(cloud::backoff(n)).await;
        }
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

    /// Uploads `data` as `key` in one request; with `fence`, only if `key` does not exist.
    fn upload(&self, op: &'static str, key: &str, data: Bytes, fence: bool) -> Result<()> {
        let b = boundary(&data);
        let meta = serde_json::json!({ "name": self.full(key) });
        let head = format!(
            "--{b}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n--{b}\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        let tail = format!("\r\n--{b}--\r\n");
        let mut body = Vec::with_capacity(head.len() + data.len() + tail.len());
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(&data);
        body.extend_from_slice(tail.as_bytes());
        drop(data);
        let body = Bytes::from(body);
        let len = body.len() as u64;
        let mut url = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=multipart",
            self.base,
            enc(&self.bucket)
        );
        if fence {
            url.push_str("&ifGenerationMatch=0");
        }
        self.run(op, key, cloud::op_budget(self.timeout, len), async {
            let r = self
                .send(op, key, Some(len), || {
                    self.http
                        .post(&url)
                        .header(CONTENT_TYPE, format!("multipart/related; boundary={b}"))
                        .body(body.clone())
                })
                .await?;
            match r.status() {
                s if s.is_success() => Ok(()),
                StatusCode::PRECONDITION_FAILED if fence => {
                    Err(ReplicaError::Exists(key.to_string()))
                }
                _ => Err(self.status_error(op, key, r).await),
            }
        })
    }
}

impl ReplicaClient for GcsReplica {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn put_new(&self, key: &str, src: &Path) -> Result<()> {
        check_key(&self.shown, "put_new", key, false)?;
        let data = cloud::read_source(&self.shown, key, src)?;
        self.upload("put_new", key, data, true)
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        check_key(&self.shown, "put", key, false)?;
        self.upload("put", key, Bytes::copy_from_slice(data), false)
    }

    fn get(&self, key: &str, dst: &Path) -> Result<bool> {
        check_key(&self.shown, "get", key, false)?;
        let url = format!("{}?alt=media", self.object_url(key));
        self.rt.block_on(async {
            let budget = cloud::op_budget(self.timeout, 0);
            let mut r =
                tokio::time::timeout(budget, self.send("get", key, None, || self.http.get(&url)))
                    .await
                    .unwrap_or_else(|_| Err(cloud::timed_out(&self.shown, "get", key, budget)))?;
            match r.status() {
                StatusCode::NOT_FOUND => return Ok(false),
                s if s.is_success() => {}
                _ => return Err(self.status_error("get", key, r).await),
            }
            let io_err = |e: io::Error| ReplicaError::Io {
                replica: self.describe(),
                op: "download",
                key: key.to_string(),
                err: e,
            };
            let mut f = std::fs::File::create(dst).map_err(io_err)?;
            loop {
                let chunk = tokio::time::timeout(self.timeout, r.chunk())
                    .await
                    .map_err(|_| cloud::timed_out(&self.shown, "download", key, self.timeout))?
                    .map_err(|e| self.fail("download", key, io::ErrorKind::Other, &chain(&e)))?;
                match chunk {
                    Some(c) => f.write_all(&c).map_err(io_err)?,
                    None => break,
                }
            }
            Ok(true)
        })
    }

    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
        check_key(&self.shown, "get_range", key, false)?;
        // A zero-length read still asks for a byte: a missing key must answer `None`.
        let last = off.saturating_add(len.max(1) - 1);
        let url = format!("{}?alt=media", self.object_url(key));
        // Time for what may come back (a `len` far past the end brings only the rest).
        let sized = len.min(1 << 30);
        self.run(
            "get_range",
            key,
            cloud::op_budget(self.timeout, sized),
            async {
                let r = self
                    .send("get_range", key, Some(sized), || {
                        self.http
                            .get(&url)
                            .header(RANGE, format!("bytes={off}-{last}"))
                    })
                    .await?;
                let whole = match r.status() {
                    StatusCode::NOT_FOUND => return Ok(None),
                    // At or past the end of the object (an empty one included).
                    StatusCode::RANGE_NOT_SATISFIABLE => return Ok(Some(Vec::new())),
                    StatusCode::PARTIAL_CONTENT => false,
                    StatusCode::OK => true,
                    _ => return Err(self.status_error("get_range", key, r).await),
                };
                let body = r
                    .bytes()
                    .await
                    .map_err(|e| self.fail("download", key, io::ErrorKind::Other, &chain(&e)))?;
                let mut v = if whole {
                    // The store ignored the range and sent the whole object.
                    let from = usize::try_from(off).unwrap_or(usize::MAX).min(body.len());
                    body[from..].to_vec()
                } else {
                    body.to_vec()
                };
                v.truncate(usize::try_from(len).unwrap_or(usize::MAX));
                Ok(Some(v))
            },
        )
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(&self.shown, "delete", key, false)?;
        let url = self.object_url(key);
        self.run("delete", key, cloud::op_budget(self.timeout, 0), async {
            let r = self
                .send("delete", key, Some(0), || self.http.delete(&url))
                .await?;
            match r.status() {
                s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
                _ => Err(self.status_error("delete", key, r).await),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        Ok(self
            .list_digests(prefix)?
            .into_iter()
            .map(|(l, _)| l)
            .collect())
    }

    fn list_md5(&self, prefix: &str) -> Result<Option<super::ListedMd5>> {
        self.list_digests(prefix).map(Some)
    }
}

impl GcsReplica {
    /// Every key under `prefix` with its size, time and MD5 (where the listing states one),
    /// sorted by key.
    fn list_digests(&self, prefix: &str) -> Result<super::ListedMd5> {
        check_key(&self.shown, "list", prefix, true)?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let wanted = format!("{strip}{prefix}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/storage/v1/b/{}/o?prefix={}&fields={}",
                self.base,
                enc(&self.bucket),
                enc(&wanted),
                enc("items(name,size,updated,md5Hash),nextPageToken")
            );
            if let Some(n) = self.list_page {
                url.push_str(&format!("&maxResults={n}"));
            }
            if let Some(t) = &token {
                url.push_str(&format!("&pageToken={}", enc(t)));
            }
            // A page of 1000 keys is about 300 KB of JSON.
            let page: Page = self.run(
                "list",
                prefix,
                cloud::op_budget(self.timeout, 1 << 20),
                async {
                    let r = self
                        .send("list", prefix, Some(1 << 20), || self.http.get(&url))
                        .await?;
                    if !r.status().is_success() {
                        return Err(self.status_error("list", prefix, r).await);
                    }
                    let body = r
                        .bytes()
                        .await
                        .map_err(|e| self.fail("list", prefix, io::ErrorKind::Other, &chain(&e)))?;
                    serde_json::from_slice(&body).map_err(|e| {
                        self.fail(
                            "list",
                            prefix,
                            io::ErrorKind::InvalidData,
                            &format!("unreadable listing: {e}"),
                        )
                    })
                },
            )?;
            for it in page.items {
                let Some(k) = it.name.strip_prefix(&strip) else {
                    continue;
                };
                if !k.starts_with(prefix) {
                    continue;
                }
                out.push((
                    Listed {
                        key: k.to_string(),
                        size: it.size.parse().unwrap_or(0),
                        modified_ns: it
                            .updated
                            .as_deref()
                            .and_then(|t| crate::time::parse_time(t).ok())
                            .unwrap_or(0),
                    },
                    it.md5.as_deref().and_then(b64_md5),
                ));
            }
            match page.next.filter(|t| !t.is_empty()) {
                // A store that hands back the same token would list forever.
                Some(t) if token.as_deref() != Some(t.as_str()) => token = Some(t),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        out.dedup_by(|a, b| a.0.key == b.0.key);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_hash_is_read_from_base64() {
        // MD5("") and MD5("abc") as the JSON API writes them.
        assert_eq!(
            b64_md5("1B2M2Y8AsgTpgAmY7PhCfg=="),
            Some([
                0xd4, 0x1d, 0x8c, 0xd9, 0x8f, 0x00, 0xb2, 0x04, 0xe9, 0x80, 0x09, 0x98, 0xec, 0xf8,
                0x42, 0x7e
            ])
        );
        assert_eq!(
            b64_md5("kAFQmDzST7DWlj99KOF/cg=="),
            Some([
                0x90, 0x01, 0x50, 0x98, 0x3c, 0xd2, 0x4f, 0xb0, 0xd6, 0x96, 0x3f, 0x7d, 0x28, 0xe1,
                0x7f, 0x72
            ])
        );
        for bad in [
            "",
            "1B2M2Y8AsgTpgAmY7PhCfg",
            "1B2M2Y8AsgTpgAmY7PhCf!==",
            "1B2M2Y8AsgTpgAmY7PhCfh==",
        ] {
            assert_eq!(b64_md5(bad), None, "{bad}");
        }
    }

    #[test]
    fn encoding_and_boundaries() {
        assert_eq!(enc("db/l0/0001.seg"), "db%2Fl0%2F0001.seg");
        assert_eq!(enc("a b&c=d"), "a%20b%26c%3Dd");
        let b = boundary(b"hello");
        assert!(b.starts_with("sqlfs-part-"));
        let data = format!("xx{b}yy");
        let b2 = boundary(data.as_bytes());
        assert!(!b2.is_empty() && !data.contains(&b2));
        assert_eq!(
            message(r#"{"error":{"code":403,"message":"no access"}}"#),
            "no access"
        );
        assert_eq!(message("plain text"), "plain text");
    }

    #[test]
    fn urls() {
        for bad in [
            "gs://",
            "gs://b/p?region=x",
            "gs://k:s@b/p",
            "gs://b/p?endpoint=nope",
        ] {
            let Err(e) = GcsReplica::open(bad) else {
                panic!("{bad} accepted");
            };
            assert!(e.to_string().contains("bad replica URL"), "{e}");
        }
        let r = GcsReplica::open("gs://b/p/q?endpoint=http://127.0.0.1:9&anonymous=true").unwrap();
        assert_eq!(r.describe(), "gs://b/p/q at http://127.0.0.1:9");
        assert_eq!(
            r.object_url("x/y"),
            "http://127.0.0.1:9/storage/v1/b/b/o/p%2Fq%2Fx%2Fy"
        );
    }
}
