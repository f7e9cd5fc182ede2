//! What the Google Cloud Storage and Azure Blob Storage clients share: reading their URLs
//! (`SCHEME://bucket/prefix?k=v&…`), the time a request may take, the I/O runtime they run
//! on, and error text that never shows a secret.
//!
//! Invariants:
//! - A request that transfers about `bytes` gets `timeout + bytes / (1 MiB/s)` per attempt and
//!   four times that for the whole operation (retries and pauses included): a store that
//!   stops answering becomes an error, never a hang.
//! - Error text from a library passes through [`Secrets::scrub`]: every URL in it is shown
//!   through [`redact_url`] and every credential value this process knows of becomes `***`.

use std::io;
use std::time::Duration;

use super::{redact_url, ReplicaError};

/// Default of the URL's `timeout`: how long one request may wait on the store.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long establishing a connection may take (at most `timeout`).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The slowest transfer a request is given time for beyond its timeout: 1 MiB/s.
const MIN_BYTES_PER_SEC: u64 = 1 << 20;
/// Attempts of one request (the first and its retries).
pub(super) const ATTEMPTS: u32 = 4;

/// How long one attempt of a request that transfers about `bytes` may take.
pub(super) fn attempt_timeout(base: Duration, bytes: u64) -> Duration {
    base + Duration::from_secs(bytes / MIN_BYTES_PER_SEC)
}

/// How long a whole operation (every attempt and the pauses between them) may take.
pub(super) fn op_budget(base: Duration, bytes: u64) -> Duration {
    attempt_timeout(base, bytes) * ATTEMPTS
}

/// The pause before retry `n` (1, 2, …): 200 ms doubling, at most 5 s.
pub(super) fn backoff(n: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << n.min(6).saturating_sub(1)))
        .min(Duration::from_secs(5))
}

/// A parsed `SCHEME://bucket/prefix?k=v` URL: the query parameters in order.
pub(super) struct Url {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub timeout: Duration,
    /// Every other parameter, for the backend to read (each is one of its `known`).
    pub params: Vec<(String, String)>,
}

/// Reads `url` (one of `schemes`, each given with its `://`). `known` lists the parameters
/// the backend takes beyond `endpoint` and `timeout`; any other is refused, and so is user
/// information in the bucket or the endpoint (credentials never belong in a URL).
pub(super) fn parse_url(
    url: &str,
    schemes: &[&str],
    what: &str,
    known: &[&str],
) -> std::result::Result<Url, String> {
    let rest = schemes
        .iter()
        .find_map(|s| url.strip_prefix(s))
        .ok_or_else(|| format!("not a {} URL", schemes.join(" or ")))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    let no_creds =
        "credentials do not belong in the URL: they come from the environment (see the README)";
    if bucket.is_empty() {
        return Err(format!("no {what} name"));
    }
    if bucket.contains('@') {
        return Err(no_creds.into());
    }
    let mut u = Url {
        bucket: bucket.into(),
        prefix: prefix.trim_matches('/').into(),
        endpoint: None,
        timeout: DEFAULT_TIMEOUT,
        params: Vec::new(),
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
                    return Err(no_creds.into());
                }
                super::s3::check_endpoint(v)?;
                u.endpoint = Some(v.trim_end_matches('/').to_string());
            }
            "timeout" => {
                u.timeout = crate::units::parse_interval(v).map_err(|e| format!("timeout: {e}"))?
            }
            k if known.contains(&k) => u.params.push((k.to_string(), v.to_string())),
            _ => {
                let mut all = vec!["endpoint", "timeout"];
                all.extend_from_slice(known);
                return Err(format!(
                    "unknown parameter {k:?} (known: {})",
                    all.join(", ")
                ));
            }
        }
    }
    Ok(u)
}

/// A yes/no URL parameter: `true`, `1`, `yes` or empty mean yes.
pub(super) fn flag(v: &str) -> bool {
    matches!(v, "true" | "1" | "yes" | "")
}

/// The runtime a network client runs its requests on (two threads: requests are few and
/// each call blocks its caller until it is answered).
pub(super) fn runtime(name: &str) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
}

/// The credential values this process was given (from the environment), hidden from any
/// text a library produces.
#[derive(Default, Clone)]
pub(super) struct Secrets(Vec<String>);

impl Secrets {
    /// Adds `v` (ignoring values too short to be a credential, which would hide plain words).
    pub fn add(&mut self, v: &str) {
        let v = v.trim();
        if v.len() >= 6 && !self.0.iter().any(|s| s == v) {
            self.0.push(v.to_string());
        }
    }

    /// Adds the value of each environment variable in `vars` that is set.
    pub fn add_env(&mut self, vars: &[&str]) {
        for v in vars {
            if let Ok(s) = std::env::var(v) {
                self.add(&s);
            }
        }
    }

    /// `text` with every URL shown through [`redact_url`] and every known secret as `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out: String = text
            .split_inclusive(char::is_whitespace)
            .map(|w| {
                let t = w.trim_end();
                if t.contains("://") {
                    format!("{}{}", redact_url(t), &w[t.len()..])
                } else {
                    w.to_string()
                }
            })
            .collect();
        for s in &self.0 {
            out = out.replace(s.as_str(), "***");
        }
        out
    }
}

/// `e` and its causes, one after another (a cause whose text is already there is left out).
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        src = c.source();
    }
    s
}

/// The error of operation `op` on `key`, with `detail` scrubbed of secrets.
pub(super) fn error(
    replica: &str,
    op: &'static str,
    key: &str,
    kind: io::ErrorKind,
    detail: String,
) -> ReplicaError {
    ReplicaError::Io {
        replica: replica.to_string(),
        op,
        key: key.to_string(),
        err: io::Error::new(kind, detail),
    }
}

/// The error of an operation that outlived its budget.
pub(super) fn timed_out(
    replica: &str,
    op: &'static str,
    key: &str,
    budget: Duration,
) -> ReplicaError {
    error(
        replica,
        op,
        key,
        io::ErrorKind::TimedOut,
        format!("timeout: the store did not answer within {budget:?}"),
    )
}

/// Reads the local file `src` for an upload.
pub(super) fn read_source(
    replica: &str,
    key: &str,
    src: &std::path::Path,
) -> super::Result<bytes::Bytes> {
    std::fs::read(src)
        .map(bytes::Bytes::from)
        .map_err(|e| ReplicaError::Io {
            replica: replica.to_string(),
            op: "read local object for",
            key: key.to_string(),
            err: e,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_budgets() {
        let u = parse_url(
            "gs://b/some/prefix/?endpoint=http://127.0.0.1:4443/&anonymous=true&timeout=5s",
            &["gs://"],
            "bucket",
            &["anonymous"],
        )
        .unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("b", "some/prefix"));
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:4443"));
        assert_eq!(u.timeout, Duration::from_secs(5));
        assert_eq!(u.params, [("anonymous".to_string(), "true".to_string())]);
        for bad in [
            "gs:///p",
            "gs://k:s@b/p",
            "gs://b/p?endpoint=http://k:s@h:1",
            "gs://b/p?endpoint=ftp://h",
            "gs://b/p?colour=red",
            "gs://b/p?timeout=soon",
            "s3://b/p",
        ] {
            assert!(
                parse_url(bad, &["gs://"], "bucket", &["anonymous"]).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            attempt_timeout(Duration::from_secs(30), 64 << 20),
            Duration::from_secs(94)
        );
        assert_eq!(op_budget(Duration::from_secs(1), 0), Duration::from_secs(4));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(30), Duration::from_secs(5));
    }

    #[test]
    fn scrub_hides_urls_and_secrets() {
        let mut s = Secrets::default();
        s.add("hunter2hunter2");
        s.add("abc");
        let t = s.scrub("PUT http://h:1/c/k?sig=zzz&sv=1 failed: key hunter2hunter2 abc");
        assert!(!t.contains("zzz") && !t.contains("hunter2"), "{t}");
        assert!(t.contains("http://h:1/c/k?sig=***"), "{t}");
        assert!(t.ends_with("abc"), "{t}");
    }
}
