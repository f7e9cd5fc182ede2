//! A private OpenSSH server (Debian's `openssh-server`, installed by `make deps`) on a
//! loopback port for SFTP replica tests: its own host key, user key, `authorized_keys`,
//! `known_hosts` and configuration in a temporary directory; no system configuration is read
//! or touched (`sshd -f CONFIG`, `PidFile none`). `SQLFS_SSHD` names another binary.
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

pub struct SshServer {
    pub child: Child,
    pub port: u16,
    /// Keys, configuration, log, and `store/` (the directory replicas go in).
    pub dir: tempfile::TempDir,
    /// The login name (the user the tests run as).
    pub user: String,
}

pub fn sshd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SQLFS_SSHD") {
        return PathBuf::from(p);
    }
    for p in ["/usr/sbin/sshd", "/sbin/sshd"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("the OpenSSH server (sshd) is not installed: run `make deps` (or `make test`)");
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "sqlfs-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen (openssh-client)");
    assert!(st.success(), "ssh-keygen -f {}", path.display());
}

/// Every process below `pid` (sshd forks one or two per connection).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(rd) = std::fs::read_dir("/proc") else {
            break;
        };
        for e in rd.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // pid (comm) state ppid …: the comm may hold spaces, so read after its `)`.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if ppid == Some(p) {
                out.push(child);
                todo.push(child);
            }
        }
    }
    out
}

impl SshServer {
    /// Generates the keys and starts the server on a free loopback port.
    pub fn start() -> SshServer {
        // Under cargo's scratch directory: a server held in a static is never dropped, and
        // would leave its files in /tmp.
        let dir = tempfile::Builder::new()
            .prefix("sqlfs-sshd-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("user_key"));
        std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir_all(d.join("store")).unwrap();
        // The privilege separation directory sshd insists on.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| {
                let o = Command::new("id").arg("-un").output().expect("id -un");
                String::from_utf8_lossy(&o.stdout).trim().to_string()
            });
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        let mut kh = host_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        kh = format!("[127.0.0.1]:{port} {kh}\n");
        std::fs::write(d.join("known_hosts"), kh).unwrap();
        std::fs::write(d.join("empty_known_hosts"), "").unwrap();
        let conf = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
             StrictModes no\nUsePAM no\nPidFile none\nSubsystem sftp internal-sftp\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nMaxStartups 200\nMaxSessions 100\n\
             LogLevel ERROR\n",
            hk = d.join("host_key").display(),
            ak = d.join("authorized_keys").display(),
        );
        std::fs::write(d.join("sshd_config"), conf).unwrap();
        let mut s = SshServer {
            child: Self::spawn(d),
            port,
            dir,
            user,
        };
        s.wait_up();
        s
    }

    fn spawn(d: &Path) -> Child {
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        Command::new(sshd_bin())
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd")
    }

    /// Waits until the server greets on its port.
    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut b = [0u8; 8];
                if s.read_exact(&mut b).is_ok() && b.starts_with(b"SSH-2.0") {
                    return;
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("sshd exited ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not come up on port {}:\n{}",
                self.port,
                self.log()
            );
            sleep_ms(100);
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The server directory replicas go in.
    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// A replica URL for `store/<sub>`, with the test's key and `known_hosts`.
    pub fn url(&self, sub: &str) -> String {
        format!(
            "sftp://{}@127.0.0.1:{}{}/{sub}?identity-file={}&known-hosts={}",
            self.user,
            self.port,
            self.store().display(),
            self.path("user_key").display(),
            self.path("known_hosts").display()
        )
    }

    /// The host key's fingerprint, as `ssh-keygen -l` prints it (`SHA256:…`).
    pub fn fingerprint(&self) -> String {
        let o = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.path("host_key.pub"))
            .output()
            .expect("ssh-keygen -lf");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.split_whitespace()
            .find(|w| w.starts_with("SHA256:"))
            .unwrap_or_else(|| panic!("no fingerprint in {text:?}"))
            .to_string()
    }

    fn signal_all(&self, sig: libc::c_int) {
        // The children first found, then signalled: a dead parent's children move away.
        let pid = self.child.id();
        let kids = descendants(pid);
        send_signal(pid, sig);
        for p in kids {
            send_signal(p, sig);
        }
    }

    /// Freezes the server and every connection it serves (SIGSTOP): connections are still
    /// accepted by the kernel, nothing is answered, as with a host that stopped responding.
    pub fn pause(&self) {
        self.signal_all(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal_all(libc::SIGCONT);
    }

    /// Kills the server and its connections (a server that went down).
    pub fn kill(&mut self) {
        self.signal_all(libc::SIGCONT);
        self.signal_all(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same keys.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path());
        self.wait_up();
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        self.kill();
    }
}
