//! A replica in S3 or an S3-compatible store:
//! `s3://bucket/prefix?endpoint=URL&region=R&force-path-style=true&timeout=30s` (all query
//! parameters optional). Credentials come from the standard chain (environment, profile —
//! `credential_process` and SSO profiles included —, web identity, container and instance
//! role) and never appear in logs or errors.
//!
//! Invariants:
//! - `put_new` is a conditional PUT (`If-None-Match: *`): the store refuses it when the key
//!   exists, which is the fence against a second writer. Request checksums are only sent when
//!   an operation requires them, because many S3-compatible stores reject the rest.
//! - No request waits forever: connecting is bounded by 5 s, each attempt by `timeout`
//!   (default 30 s) plus a second per MiB it transfers, the whole operation (retries
//!   included) by four attempts, and every read of a downloaded body by `timeout`. A store
//!   that stops answering becomes an error the shipper retries and `sqlfs status` shows.

use std::io;
use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use super::{check_key, Listed, ReplicaClient, ReplicaError, Result};

pub struct S3Replica {
    client: Client,
    bucket: String,
    prefix: String,
    shown: String,
    /// How long one small request may take (the URL's `timeout`).
    timeout: Duration,
    /// Keys asked for per listing page (`None`: the store's default, 1000 on S3).
    list_page: Option<i32>,
    rt: tokio::runtime::Runtime,
}

/// Default of the URL's `timeout`: how long one request may wait on the store.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long establishing a connection may take (at most `timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The slowest transfer a request is given time for beyond its timeout: 1 MiB/s.
const MIN_BYTES_PER_SEC: u64 = 1 << 20;
/// Objects up to this size are sent from memory, larger ones streamed from their file.
const SMALL_OBJECT: u64 = 4 << 20;

/// Timeouts for a request that transfers about `bytes`: each attempt gets `base` plus a
/// second per MiB, the operation (up to three attempts and the pauses between them) four
/// times that.
fn timeouts(base: Duration, bytes: u64) -> TimeoutConfig {
    let attempt = base + Duration::from_secs(bytes / MIN_BYTES_PER_SEC);
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT.min(base))
        .operation_attempt_timeout(attempt)
        .operation_timeout(attempt * 4)
        .build()
}

/// Parsed `s3://` URL.
struct Url {
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    region: Option<String>,
    path_style: bool,
    timeout: Duration,
}

fn parse(url: &str) -> std::result::Result<Url, String> {
    let rest = url.strip_prefix("s3://").ok_or("not an s3:// URL")?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    if bucket.is_empty() {
        return Err("no bucket name".into());
    }
    if bucket.contains('@') {
        return Err(
            "credentials do not belong in the URL: they come from the environment, a profile or an instance role".into(),
        );
    }
    let mut u = Url {
        bucket: bucket.into(),
        prefix: prefix.trim_matches('/').into(),
        endpoint: None,
        region: None,
        path_style: false,
        timeout: DEFAULT_TIMEOUT,
    };
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "endpoint" => {
                let host = v.split_once("://").map_or(v, |(_, r)| r);
                if host
                    .split(['/', '?'])
                    .next()
                    .is_some_and(|a| a.contains('@'))
                {
                    return Err("credentials do not belong in the endpoint: they come from the environment, a profile or an instance role".into());
                }
                check_endpoint(v)?;
                u.endpoint = Some(v.to_string())
            }
            "region" => u.region = Some(v.to_string()),
            "force-path-style" => u.path_style = matches!(v, "true" | "1" | "yes" | ""),
            "timeout" => {
                u.timeout = crate::units::parse_interval(v).map_err(|e| format!("timeout: {e}"))?
            }
            _ => {
                return Err(format!(
                    "unknown parameter {k:?} (known: endpoint, region, force-path-style, timeout)"
                ))
            }
        }
    }
    Ok(u)
}

/// An endpoint is `http://` or `https://`, a host, an optional numeric port and an optional
/// path: checked when the URL is read, so a typo stops the mount instead of every request
/// failing later. The message never shows the value (it may carry a signed query).
pub(super) fn check_endpoint(v: &str) -> std::result::Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "endpoint: {why} (expected http://HOST[:PORT] or https://HOST[:PORT])"
        ))
    };
    let Some(rest) = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))
    else {
        return bad("not an http:// or https:// URL");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // `[v6]:port`, `[v6]`, `host:port` or `host`.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return bad("text after the IPv6 address"),
            },
            None => return bad("an unclosed IPv6 address"),
        },
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return bad("no host");
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |n| n == 0) {
            return bad("the port is not a number from 1 to 65535");
        }
    }
    Ok(())
}

impl S3Replica {
    pub fn open(url: &str) -> Result<S3Replica> {
        let bad = |why: String| ReplicaError::BadUrl {
            url: url.to_string(),
            why,
        };
        let u = parse(url).map_err(bad)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sqlfs-s3")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &u.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let shared = rt.block_on(loader.load());
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(u.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(timeouts(u.timeout, 0));
        if shared.region().is_none() {
            conf = conf.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        if let Some(e) = &u.endpoint {
            conf = conf.endpoint_url(e.clone());
        }
        // Without secrets: the endpoint may carry user information or a signed query.
        let shown = match &u.endpoint {
            Some(e) => format!("s3://{}/{} at {}", u.bucket, u.prefix, super::redact_url(e)),
            None => format!("s3://{}/{}", u.bucket, u.prefix),
        };
        Ok(S3Replica {
            client: Client::from_conf(conf.build()),
            bucket: u.bucket,
            prefix: u.prefix,
            shown,
            timeout: u.timeout,
            list_page: None,
            rt,
        })
    }

    /// Lists `n` keys per page instead of the store's default: lets tests cross page
    /// boundaries with a few objects.
    pub fn with_list_page(mut self, n: i32) -> S3Replica {
        self.list_page = Some(n);
        self
    }

    /// The error of a body read that took longer than the timeout.
    fn stalled(&self, op: &'static str, key: &str) -> ReplicaError {
        ReplicaError::Io {
            replica: self.describe(),
            op,
            key: key.to_string(),
            err: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timeout: no data for {:?}", self.timeout),
            ),
        }
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn err<
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    >(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, R>,
    ) -> ReplicaError {
        let detail = match e.as_service_error() {
            Some(se) => format!(
                "{} ({})",
                se.message().unwrap_or("no message"),
                se.code().unwrap_or("no code")
            ),
            None => {
                // Transport errors: name the cause without the request (no signed headers).
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(c) = src {
                    s = format!("{s}: {c}");
                    src = c.source();
                }
                s
            }
        };
        ReplicaError::Io {
            replica: self.describe(),
            op,
            key: key.to_string(),
            err: io::Error::other(detail),
        }
    }
}

/// True if a GET failed because the key does not exist.
fn is_missing(
    e: &SdkError<
        aws_sdk_s3::operation::get_object::GetObjectError,
        aws_sdk_s3::config::http::HttpResponse,
    >,
) -> bool {
    e.as_service_error().is_some_and(|s| s.is_no_such_key())
        || e.raw_response().is_some_and(|r| r.status().as_u16() == 404)
}

impl ReplicaClient for S3Replica {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn put_new(&self, key: &str, src: &Path) -> Result<()> {
        check_key(&self.shown, "put_new", key, false)?;
        let unreadable = |e: String| ReplicaError::Io {
            replica: self.describe(),
            op: "read local object for",
            key: key.to_string(),
            err: io::Error::other(e),
        };
        // A small object (every shipment of a database that commits a little) is read here,
        // on the caller's thread: streaming it from the file would cost the runtime a hop to
        // its blocking pool for each of the open, the stat and every read.
        let size = std::fs::metadata(src)
            .map_err(|e| unreadable(e.to_string()))?
            .len();
        let in_memory = if size <= SMALL_OBJECT {
            Some(std::fs::read(src).map_err(|e| unreadable(e.to_string()))?)
        } else {
            None
        };
        let body = match in_memory {
            Some(b) => ByteStream::from(b),
            None => self
                .rt
                .block_on(ByteStream::from_path(src))
                .map_err(|e| unreadable(e.to_string()))?,
        };
        let size = body.size_hint().0;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .if_none_match("*")
            .body(body)
            .customize();
        // The client's own timeouts are those of an empty body; a larger one gets more.
        if size >= MIN_BYTES_PER_SEC {
            req = req.config_override(
                aws_sdk_s3::config::Builder::default().timeout_config(timeouts(self.timeout, size)),
            );
        }
        // Run on the runtime's own threads, beside the connection's task: polled from this
        // thread instead, each step of the request would be a hand-over between threads.
        let r = self
            .rt
            .block_on(self.rt.spawn(req.send()))
            .map_err(|e| ReplicaError::Io {
                replica: self.describe(),
                op: "put",
                key: key.to_string(),
                err: io::Error::other(format!("the request's task failed: {e}")),
            })?;
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                let code = e.as_service_error().and_then(|s| s.code()).unwrap_or("");
                if status == Some(412)
                    || code == "PreconditionFailed"
                    || status == Some(409)
                    || code == "ConditionalRequestConflict"
                {
                    Err(ReplicaError::Exists(key.to_string()))
                } else {
                    Err(self.err("put", key, e))
                }
            }
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        check_key(&self.shown, "put", key, false)?;
        self.rt.block_on(async {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .body(ByteStream::from(data.to_vec()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.err("put", key, e))
        })
    }

    fn get(&self, key: &str, dst: &Path) -> Result<bool> {
        check_key(&self.shown, "get", key, false)?;
        self.rt.block_on(async {
            let r = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .send()
                .await;
            let out = match r {
                Ok(o) => o,
                Err(e) if is_missing(&e) => return Ok(false),
                Err(e) => return Err(self.err("get", key, e)),
            };
            let io_err = |e: io::Error| ReplicaError::Io {
                replica: self.describe(),
                op: "download",
                key: key.to_string(),
                err: e,
            };
            let mut f = std::fs::File::create(dst).map_err(io_err)?;
            let mut body = out.body;
            while let Some(chunk) = tokio::time::timeout(self.timeout, body.try_next())
                .await
                .map_err(|_| self.stalled("download", key))?
                .map_err(|e| io_err(io::Error::other(e.to_string())))?
            {
                io::Write::write_all(&mut f, &chunk).map_err(io_err)?;
            }
            Ok(true)
        })
    }

    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
        check_key(&self.shown, "get_range", key, false)?;
        // A zero-length read still asks for a byte: a missing key must answer `None`. The
        // last byte is kept within a signed 64-bit number: some stores (SeaweedFS) answer a
        // larger one with nothing.
        let last = off.saturating_add(len.max(1) - 1).min(i64::MAX as u64);
        self.rt.block_on(async {
            let r = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .range(format!("bytes={off}-{last}"))
                .send()
                .await;
            let out = match r {
                Ok(o) => o,
                Err(e) if is_missing(&e) => return Ok(None),
                // Past the end of a shorter object.
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                    return Ok(Some(Vec::new()))
                }
                Err(e) => return Err(self.err("get", key, e)),
            };
            // Time for the bytes the store sends (not for a `len` that reaches far past the end).
            let sent = out
                .content_length()
                .map_or(len, |n| n.max(0) as u64)
                .min(len);
            let within = timeouts(self.timeout, sent)
                .operation_attempt_timeout()
                .unwrap_or(self.timeout);
            let data = tokio::time::timeout(within, out.body.collect())
                .await
                .map_err(|_| self.stalled("download", key))?
                .map_err(|e| ReplicaError::Io {
                    replica: self.describe(),
                    op: "download",
                    key: key.to_string(),
                    err: io::Error::other(e.to_string()),
                })?;
            let mut v = data.into_bytes().to_vec();
            v.truncate(usize::try_from(len).unwrap_or(usize::MAX));
            Ok(Some(v))
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(&self.shown, "delete", key, false)?;
        self.rt.block_on(async {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.err("delete", key, e))
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        Ok(self
            .list_etags(prefix)?
            .into_iter()
            .map(|(l, _)| l)
            .collect())
    }

    fn list_md5(&self, prefix: &str) -> Result<Option<super::ListedMd5>> {
        let v = self.list_etags(prefix)?;
        Ok(Some(
            v.into_iter()
                .map(|(l, e)| (l, e.as_deref().and_then(etag_md5)))
                .collect(),
        ))
    }
}

/// The MD5 an ETag states: 32 hex digits in quotes (a single-part upload's); `None` for any
/// other form (a multipart upload's `"…-N"`).
fn etag_md5(etag: &str) -> Option<[u8; 16]> {
    let hex = etag.trim().trim_matches('"');
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl S3Replica {
    /// Every key under `prefix` with its size, time and ETag, sorted by key.
    fn list_etags(&self, prefix: &str) -> Result<Vec<(Listed, Option<String>)>> {
        check_key(&self.shown, "list", prefix, true)?;
        self.rt.block_on(async {
            let mut out = Vec::new();
            let strip = if self.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", self.prefix)
            };
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full(prefix))
                .set_max_keys(self.list_page)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.err("list", prefix, e))?;
                for o in page.contents() {
                    if let Some(k) = o.key() {
                        let k = k.strip_prefix(&strip).unwrap_or(k);
                        let modified_ns =
                            o.last_modified().map_or(0, |t| t.as_nanos().max(0) as u64);
                        out.push((
                            Listed {
                                key: k.to_string(),
                                size: o.size().unwrap_or(0).max(0) as u64,
                                modified_ns,
                            },
                            o.e_tag().map(str::to_string),
                        ));
                    }
                }
            }
            out.sort_by(|a, b| a.0.key.cmp(&b.0.key));
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn etags() {
        let m = super::etag_md5("\"d41d8cd98f00b204e9800998ecf8427e\"").unwrap();
        assert_eq!(m[0], 0xd4);
        assert_eq!(m[15], 0x7e);
        for other in [
            "\"d41d8cd98f00b204e9800998ecf8427e-2\"",
            "\"\"",
            "\"zz1d8cd98f00b204e9800998ecf8427e\"",
            "W/\"x\"",
        ] {
            assert_eq!(super::etag_md5(other), None, "{other}");
        }
    }

    #[test]
    fn urls() {
        for bad in [
            "not-a-url",
            "http://",
            "ftp://host:21",
            "http://host:port",
            "http://host:99999",
            "http://:9000",
        ] {
            let Err(e) = super::parse(&format!("s3://b/p?endpoint={bad}")) else {
                panic!("endpoint {bad} accepted");
            };
            assert!(e.contains("endpoint"), "{bad}: {e}");
        }
        for good in [
            "http://127.0.0.1:9000",
            "https://s3.example.com",
            "http://[::1]:9000/x",
        ] {
            super::parse(&format!("s3://b/p?endpoint={good}")).unwrap();
        }
        let u = super::parse("s3://b/some/prefix/?endpoint=http://127.0.0.1:9000&region=eu-west-1&force-path-style=true").unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("b", "some/prefix"));
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(u.path_style);
        assert_eq!(u.timeout, super::DEFAULT_TIMEOUT);
        let u = super::parse("s3://b/p?timeout=5s").unwrap();
        assert_eq!(u.timeout, std::time::Duration::from_secs(5));
        assert!(super::parse("s3://b/p?timeout=0").is_err());
        assert!(super::parse("s3://b/p?timeout=soon").is_err());
        let t = super::timeouts(std::time::Duration::from_secs(30), 64 << 20);
        assert_eq!(
            t.operation_attempt_timeout(),
            Some(std::time::Duration::from_secs(94))
        );
        assert!(super::parse("s3:///x").is_err());
        assert!(super::parse("s3://b?color=red").is_err());
    }
}
