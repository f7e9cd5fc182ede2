//! An HTTP proxy for the loopback S3 test server that counts requests and can hold back the
//! requests whose target contains a given string (a database id: its objects' keys hold it)
//! until released, as a store that is slow on some keys would. Every request goes on a
//! connection of its own (`Connection: close` both ways), so requests are counted without
//! parsing bodies. Other requests pass while some are held.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

#[derive(Default)]
struct State {
    /// Targets containing one of these wait.
    hold: Vec<String>,
    /// Requests waiting right now.
    held_now: usize,
    /// Requests that waited, ever.
    held_total: usize,
    /// Request lines of every request that arrived, in order.
    seen: Vec<String>,
}

pub struct HoldProxy {
    pub port: u16,
    st: Arc<(Mutex<State>, Condvar)>,
}

impl HoldProxy {
    /// A proxy on a free loopback port in front of the server at `upstream`.
    pub fn start(upstream: u16) -> HoldProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let st: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let s = st.clone();
        thread::spawn(move || {
            for c in l.incoming().flatten() {
                let s = s.clone();
                thread::spawn(move || {
                    let _ = forward(&s, c, upstream);
                });
            }
        });
        HoldProxy { port, st }
    }

    /// An `s3://` URL of `bucket`/`prefix` through the proxy, with `timeout` per request.
    pub fn url(&self, bucket: &str, prefix: &str, timeout: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&force-path-style=true&timeout={timeout}",
            self.port
        )
    }

    /// From now on requests whose target contains `pattern` wait until [`HoldProxy::release`].
    pub fn hold(&self, pattern: &str) {
        self.st.0.lock().unwrap().hold.push(pattern.to_string());
    }

    /// Lets every held request go on, and holds nothing more.
    pub fn release(&self) {
        self.st.0.lock().unwrap().hold.clear();
        self.st.1.notify_all();
    }

    /// (Requests waiting now, requests that waited ever.)
    pub fn held(&self) -> (usize, usize) {
        let s = self.st.0.lock().unwrap();
        (s.held_now, s.held_total)
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> usize {
        self.st.0.lock().unwrap().seen.len()
    }

    /// The request lines of the requests from the `from`-th on.
    pub fn seen_since(&self, from: usize) -> Vec<String> {
        self.st.0.lock().unwrap().seen[from..].to_vec()
    }
}

/// Forwards the one request on `client` to the server (after waiting while it is held), and
/// the response back.
fn forward(
    st: &Arc<(Mutex<State>, Condvar)>,
    client: TcpStream,
    upstream: u16,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut head = line.clone();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(());
        }
        if h == "\r\n" || h == "\n" {
            break;
        }
        let name = h
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if name != "connection" && name != "keep-alive" {
            head += &h;
        }
    }
    head += "Connection: close\r\n\r\n";
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    {
        let (m, cv) = &**st;
        let mut s = m.lock().unwrap();
        s.seen.push(line.trim_end().to_string());
        if s.hold.iter().any(|p| target.contains(p.as_str())) {
            s.held_now += 1;
            s.held_total += 1;
            while s.hold.iter().any(|p| target.contains(p.as_str())) {
                s = cv.wait(s).unwrap();
            }
            s.held_now -= 1;
        }
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(head.as_bytes())?;
    let to_server = {
        let mut up = up.try_clone()?;
        thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut up);
        })
    };
    let mut c = client;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match up.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if c.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = c.shutdown(Shutdown::Both);
    let _ = up.shutdown(Shutdown::Both);
    let _ = to_server.join();
    Ok(())
}
