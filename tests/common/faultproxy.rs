//! A fault-injecting TCP proxy for the loopback S3 test server: it forwards connections
//! as they are until told to [`FaultProxy::stall`]; from then on it accepts connections and
//! reads every request without forwarding a byte or answering, as a store that froze while
//! its network stack kept queueing would. [`FaultProxy::release`] then sends every held
//! request to the server, in the order they arrived, late (their clients timed out long
//! ago; the answers are dropped), before anything new goes through: the first attempt of a
//! write lands after later attempts were tried, as with a store that resumes.
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

struct State {
    upstream: u16,
    /// True while requests are held.
    stalled: bool,
    /// Requests held whose client gave up, in arrival order.
    queue: Vec<Vec<u8>>,
    /// Connections forwarded as they are (shut when a stall begins).
    live: Vec<TcpStream>,
    /// Every request held so far: its first line and its Content-Length.
    held: Vec<(String, u64)>,
    /// Each held request replayed late: its first line and the server's status.
    replayed: Vec<(String, u16)>,
}

pub struct FaultProxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
}

/// The first line of an HTTP request.
fn first_line(b: &[u8]) -> String {
    let end = b
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(b.len().min(200));
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The Content-Length of the request whose head is in `b` (0 if it has none).
fn content_length(b: &[u8]) -> u64 {
    let end = b
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end])
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// Copies `from` to `to` until either side ends.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// Forwards connection `c` (with `early` bytes already read from it) to the server.
fn forward(st: &Arc<Mutex<State>>, c: TcpStream, early: &[u8]) {
    let upstream = st.lock().unwrap().upstream;
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let _ = c.set_read_timeout(None);
    if s.write_all(early).is_err() {
        return;
    }
    if let (Ok(c2), Ok(s2), Ok(c3)) = (c.try_clone(), s.try_clone(), c.try_clone()) {
        st.lock().unwrap().live.push(c3);
        thread::spawn(move || pipe(c2, s2));
        pipe(s, c);
    }
}

/// Holds connection `c` while the proxy is stalled: every byte is read and kept. A client
/// that gives up leaves its request in the queue; one still waiting when the stall ends is
/// forwarded (after the queue).
fn hold(st: &Arc<Mutex<State>>, mut c: TcpStream) {
    let _ = c.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut noted = false;
    loop {
        match c.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if !noted && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    noted = true;
                    let len = content_length(&buf);
                    st.lock().unwrap().held.push((first_line(&buf), len));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let stalled = st.lock().unwrap().stalled;
                if !stalled {
                    forward(st, c, &buf);
                    return;
                }
            }
            Err(_) => break,
        }
    }
    // The client gave up: its request stays queued at the "store".
    let mut s = st.lock().unwrap();
    if !buf.is_empty() {
        if s.stalled {
            s.queue.push(buf);
        } else {
            drop(s);
            replay(st, buf);
        }
    }
}

/// Sends one held request to the server and records the status it answers.
fn replay(st: &Arc<Mutex<State>>, req: Vec<u8>) {
    let upstream = st.lock().unwrap().upstream;
    let line = first_line(&req);
    let status = (|| -> std::io::Result<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", upstream))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&req)?;
        let _ = s.shutdown(Shutdown::Write);
        // The status line is enough; then drain what comes until the server closes or pauses.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !got.windows(2).any(|w| w == b"\r\n") && Instant::now() < deadline {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        let code = first_line(&got)
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        while let Ok(n) = s.read(&mut chunk) {
            if n == 0 {
                break;
            }
        }
        Ok(code)
    })()
    .unwrap_or(0);
    st.lock().unwrap().replayed.push((line, status));
}

impl FaultProxy {
    /// A proxy on a free loopback port in front of the server at `upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            upstream,
            stalled: false,
            queue: Vec::new(),
            live: Vec::new(),
            held: Vec::new(),
            replayed: Vec::new(),
        }));
        let st = state.clone();
        thread::spawn(move || {
            for c in l.incoming().flatten() {
                let st = st.clone();
                thread::spawn(move || {
                    if st.lock().unwrap().stalled {
                        hold(&st, c)
                    } else {
                        forward(&st, c, &[])
                    }
                });
            }
        });
        FaultProxy { port, state }
    }

    /// An `s3://` URL of `bucket`/`prefix` through the proxy, with `timeout` per request.
    pub fn url(&self, bucket: &str, prefix: &str, timeout: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&force-path-style=true&timeout={timeout}",
            self.port
        )
    }

    /// From now on no request reaches the server: new connections are held, and the ones
    /// being forwarded are cut (a request in flight may have reached the server: its client
    /// sees a reset).
    pub fn stall(&self) {
        let mut s = self.state.lock().unwrap();
        s.stalled = true;
        for c in s.live.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// The first line and Content-Length of every request held so far.
    pub fn held(&self) -> Vec<(String, u64)> {
        self.state.lock().unwrap().held.clone()
    }

    /// Sends every held request whose client gave up to the server, oldest first, then
    /// forwards again (requests still waiting, then new ones). Returns each replayed
    /// request's first line and the server's status.
    pub fn release(&self) -> Vec<(String, u16)> {
        loop {
            let q = {
                let mut s = self.state.lock().unwrap();
                if s.queue.is_empty() {
                    s.stalled = false;
                    break;
                }
                std::mem::take(&mut s.queue)
            };
            for req in q {
                replay(&self.state, req);
            }
        }
        self.state.lock().unwrap().replayed.clone()
    }
}
