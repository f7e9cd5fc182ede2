//! A TCP relay on loopback that counts what clients send through it: shows that an idle
//! mount sends nothing to its store (bytes and connections).

/// A TCP relay to `port` on loopback that counts the bytes its clients send.
pub struct Relay {
    pub port: u16,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    conns: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    pub fn start(to: u16) -> Relay {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        let conns = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let accepted = conns.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(s) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let (mut c_in, mut s_out) = (c.try_clone().unwrap(), s.try_clone().unwrap());
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = c_in.read(&mut buf) {
                        if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let (mut s_in, mut c_out) = (s, c);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(Shutdown::Write);
                });
            }
        });
        Relay { port, sent, conns }
    }

    /// Bytes the clients sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections the clients opened so far.
    pub fn connections(&self) -> u64 {
        self.conns.load(std::sync::atomic::Ordering::SeqCst)
    }
}
