//! An S3-compatible server (moto) on loopback for object-storage tests: `SQLFS_S3_SERVER`
//! names the binary, else `.venv/bin/moto_server` (installed by `make deps`), else
//! `moto_server` on the PATH. `SQLFS_S3_SERVER` naming a `weed` binary (`.venv/bin/weed`,
//! SeaweedFS, see `seaweed`) runs the tests against SeaweedFS instead, started to accept any
//! request as moto does (the conformance suite passes on it; see docs/PERFORMANCE.md).
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

pub struct S3Server {
    pub child: Child,
    pub port: u16,
    /// SeaweedFS only: its filer's port (buckets are made there) and its files.
    weed: Option<(u16, tempfile::TempDir)>,
}

pub fn s3_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SQLFS_S3_SERVER") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    if p.exists() {
        return p;
    }
    if let Some(dirs) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&dirs) {
            let c = d.join("moto_server");
            if c.exists() {
                return c;
            }
        }
    }
    panic!(
        "the S3-compatible test server is not installed at {}: run `make deps` (or `make test`)",
        p.display()
    );
}

/// One HTTP request without a body; returns the status code.
pub fn http_status(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    let line = String::from_utf8_lossy(&buf[..n]);
    Ok(line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// One GET without a body; returns the status code and the body. The test server serves
/// private objects only to requests that carry credentials, but does not verify signatures:
/// a well-formed header with the test key and a dummy signature is enough.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: AWS4-HMAC-SHA256 \
         Credential=test/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, \
         Signature={}\r\nConnection: close\r\n\r\n",
        "0".repeat(64)
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of the response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let (mut plain, mut rest) = (Vec::new(), &body[..]);
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .unwrap_or(rest.len());
            let size = std::str::from_utf8(&rest[..eol])
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .unwrap_or(0);
            if size == 0 || eol + 2 + size > rest.len() {
                break;
            }
            plain.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[(eol + 4 + size).min(rest.len())..];
        }
        body = plain;
    }
    Ok((status, body))
}

impl S3Server {
    /// Every key in `bucket` under `prefix` (one listing page: the tests write far fewer
    /// than a page holds).
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (status, body) = http_get(
            self.port,
            &format!("/{bucket}?list-type=2&max-keys=1000&prefix={prefix}"),
        )
        .expect("listing the bucket");
        let xml = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "listing {bucket}/{prefix}: {xml}");
        assert!(
            !xml.contains("<IsTruncated>true"),
            "listing {bucket}/{prefix} is truncated"
        );
        xml.split("<Key>")
            .skip(1)
            .filter_map(|p| p.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect()
    }

    /// The bytes of one object.
    pub fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        let (status, body) =
            http_get(self.port, &format!("/{bucket}/{key}")).expect("reading an object");
        assert_eq!(status, 200, "GET {bucket}/{key}");
        body
    }

    /// Freezes the server (SIGSTOP): requests hang as with a store that is down.
    pub fn pause(&self) {
        send_signal(self.child.id(), libc::SIGSTOP);
    }

    pub fn resume(&self) {
        send_signal(self.child.id(), libc::SIGCONT);
    }

    /// Starts a server on a free port and creates `bucket`.
    pub fn start(bucket: &str) -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = s3_server_bin();
        let s = if super::seaweed::is_weed(&bin) {
            let w = super::seaweed::Seaweed::start(&bin, None).expect("start SeaweedFS");
            S3Server {
                child: w.child,
                port: w.port,
                weed: Some((w.filer_port, w.dir)),
            }
        } else {
            let mut cmd = Command::new(&bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = cmd.spawn().expect("start the S3-compatible test server");
            S3Server {
                child,
                port,
                weed: None,
            }
        };
        let port = s.port;
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if let Ok(200) = s.bucket(bucket) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the S3-compatible test server did not come up on port {port}"
            );
            sleep_ms(200);
        }
        s
    }

    /// Creates `bucket`; returns the HTTP status (200 when made).
    pub fn bucket(&self, bucket: &str) -> std::io::Result<u16> {
        if let Some((filer, _)) = &self.weed {
            // Made through the filer (a directory under /buckets): 201 there.
            let c = super::seaweed::create_bucket(*filer, bucket)?;
            return Ok(if (200..300).contains(&c) { 200 } else { c });
        }
        http_status(self.port, "PUT", &format!("/{bucket}"))
    }

    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!("s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&force-path-style=true", self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Test credentials for the loopback server, for this process and the daemons it starts.
pub fn s3_test_credentials() {
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
}
