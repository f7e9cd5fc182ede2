//! One SSH connection with its SFTP channel: connecting within the timeout, checking the
//! server's host key, authenticating, and the one request the safe bindings lack
//! (`posix-rename@openssh.com`, a rename that replaces its target atomically).
//!
//! Invariants:
//! - The host key is checked before anything is sent under the user's name: it must equal
//!   the pinned `host-key-fingerprint` if the URL has one, else match the host's entry in
//!   `known_hosts`. An unknown or changed key refuses the connection; no key is ever added.
//! - Every blocking call of the session (handshake included) waits at most `timeout` for the
//!   server to answer; an expiry is an error, never a hang.
//! - Errors name the host, the user and the methods tried, never a password or passphrase.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};

use ssh2::{CheckResult, HashType, KnownHostFileKind, MethodType, Session, Sftp};

use super::url::{home, SftpUrl, PASSPHRASE_ENV, PASSWORD_ENV};

/// Host key algorithms in the order OpenSSH's client prefers them: the key type negotiated is
/// then the one `ssh` stored in `known_hosts` for the host.
const HOSTKEY_PREFS: &str = "ssh-ed25519,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,rsa-sha2-512,rsa-sha2-256,ssh-rsa";

/// Why a connection could not be made.
pub enum ConnectError {
    /// The server could not be reached or stopped answering: worth another try.
    Transient(io::Error),
    /// The host key or the credentials were refused: no retry can help.
    Refused(io::Error),
}

pub struct Conn {
    pub sess: Session,
    pub sftp: Sftp,
    /// The session's socket, to close it at once when the transport has failed.
    tcp: TcpStream,
}

impl Conn {
    pub fn open(u: &SftpUrl) -> Result<Conn, ConnectError> {
        let ms = u32::try_from(u.timeout.as_millis()).unwrap_or(u32::MAX);
        let transient = |what: &str, e: &dyn std::fmt::Display| {
            ConnectError::Transient(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} {}:{}: {e}", u.host, u.port),
            ))
        };
        let addrs: Vec<_> = (u.host.as_str(), u.port)
            .to_socket_addrs()
            .map_err(|e| transient("resolving", &e))?
            .collect();
        let mut tcp = Err(io::Error::other("no address"));
        for a in &addrs {
            tcp = TcpStream::connect_timeout(a, u.timeout);
            if tcp.is_ok() {
                break;
            }
        }
        let tcp = tcp.map_err(|e| transient("connecting to", &e))?;
        let _ = tcp.set_nodelay(true);
        let tcp2 = tcp
            .try_clone()
            .map_err(|e| transient("connecting to", &e))?;
        let mut sess = Session::new().map_err(|e| transient("starting a session with", &e))?;
        sess.set_timeout(ms);
        sess.set_tcp_stream(tcp);
        let _ = sess.method_pref(MethodType::HostKey, HOSTKEY_PREFS);
        sess.handshake()
            .map_err(|e| transient("SSH handshake with", &e))?;
        check_host_key(&sess, u)?;
        authenticate(&sess, u)?;
        let sftp = sess.sftp().map_err(|e| transient("starting SFTP on", &e))?;
        Ok(Conn {
            sess,
            sftp,
            tcp: tcp2,
        })
    }

    /// Closes the socket: every later request on this connection (the ones its handles and
    /// channel make when they are dropped included) fails at once instead of waiting.
    pub fn abort(&self) {
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }

    /// `f`, after closing the socket if it is a failure of the transport (while a file
    /// handle is open, whose drop would otherwise wait on a server that stopped answering).
    pub fn failed(&self, f: super::Fail) -> super::Fail {
        let transport = match &f {
            super::Fail::Ssh(e) => super::status(e).is_none(),
            super::Fail::Transfer(_) => true,
            super::Fail::Local(..) => false,
        };
        if transport {
            self.abort();
        }
        f
    }

    /// Renames `src` to `dst`, replacing `dst` atomically if it exists (the
    /// `posix-rename@openssh.com` extension). `Ok(false)` if the server lacks it.
    pub fn posix_rename(&self, src: &str, dst: &str) -> Result<bool, ssh2::Error> {
        use libssh2_sys as raw;
        extern "C" {
            // In the bundled libssh2 (1.11), not declared by its -sys crate.
            fn libssh2_sftp_posix_rename_ex(
                sftp: *mut raw::LIBSSH2_SFTP,
                src: *const libc::c_char,
                src_len: libc::size_t,
                dst: *const libc::c_char,
                dst_len: libc::size_t,
            ) -> libc::c_int;
        }
        const FX_OP_UNSUPPORTED: libc::c_ulong = 8;
        let guard = self.sess.raw();
        let sess: *mut raw::LIBSSH2_SESSION = &*guard as *const _ as *mut _;
        // SAFETY: the session lock (`guard`) is held for the whole exchange, so no other
        // user of this session runs; the SFTP channel opened here is shut down before the
        // lock is released, and the strings outlive the calls that read them.
        unsafe {
            let sftp = raw::libssh2_sftp_init(sess);
            if sftp.is_null() {
                let rc = raw::libssh2_session_last_errno(sess);
                return Err(ssh2::Error::from_errno(ssh2::ErrorCode::Session(rc)));
            }
            let rc = libssh2_sftp_posix_rename_ex(
                sftp,
                src.as_ptr().cast(),
                src.len(),
                dst.as_ptr().cast(),
                dst.len(),
            );
            let res = if rc == 0 {
                Ok(true)
            } else if rc == raw::LIBSSH2_ERROR_SFTP_PROTOCOL {
                let fx = raw::libssh2_sftp_last_error(sftp);
                if fx == FX_OP_UNSUPPORTED {
                    Ok(false)
                } else {
                    Err(ssh2::Error::from_errno(ssh2::ErrorCode::SFTP(
                        fx as libc::c_int,
                    )))
                }
            } else {
                Err(ssh2::Error::from_errno(ssh2::ErrorCode::Session(rc)))
            };
            raw::libssh2_sftp_shutdown(sftp);
            res
        }
    }
}

/// `SHA256:` and the unpadded base64 of the key's SHA-256, as OpenSSH shows fingerprints.
fn fingerprint(sha256: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::from("SHA256:");
    for chunk in sha256.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            s.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    s
}

fn check_host_key(sess: &Session, u: &SftpUrl) -> Result<(), ConnectError> {
    let refused =
        |why: String| ConnectError::Refused(io::Error::new(io::ErrorKind::PermissionDenied, why));
    let (key, kind) = sess
        .host_key()
        .ok_or_else(|| refused(format!("{}:{} sent no host key", u.host, u.port)))?;
    let fp = sess
        .host_key_hash(HashType::Sha256)
        .map(fingerprint)
        .unwrap_or_default();
    let who = format!("the host key of {}:{} ({kind:?} {fp})", u.host, u.port);
    if let Some(pinned) = &u.fingerprint {
        return if *pinned == fp {
            Ok(())
        } else {
            Err(refused(format!(
                "{who} is not the pinned host-key-fingerprint {pinned}: refusing to connect"
            )))
        };
    }
    let path = match &u.known_hosts {
        Some(p) => p.clone(),
        None => home().unwrap_or_default().join(".ssh/known_hosts"),
    };
    let mut kh = sess
        .known_hosts()
        .map_err(|e| refused(format!("reading known hosts: {e}")))?;
    if path.exists() {
        kh.read_file(&path, KnownHostFileKind::OpenSSH)
            .map_err(|e| {
                refused(format!(
                    "cannot read the known hosts file {}: {e}",
                    path.display()
                ))
            })?;
    }
    let hint = format!(
        "check the fingerprint with the server's administrator, then add the key to {} (`ssh-keyscan -p {} {} >> {0}`) or pin it with host-key-fingerprint={fp}",
        path.display(),
        u.port,
        u.host
    );
    match kh.check_port(&u.host, u.port, key) {
        CheckResult::Match => Ok(()),
        CheckResult::NotFound => Err(refused(format!(
            "{who} is unknown: {} has no entry for this host; refusing to connect ({hint})",
            path.display()
        ))),
        CheckResult::Mismatch => Err(refused(format!(
            "{who} does NOT match the key {} holds for this host (a changed server, or someone in between): refusing to connect",
            path.display()
        ))),
        CheckResult::Failure => Err(refused(format!(
            "{who} could not be checked against {}: refusing to connect",
            path.display()
        ))),
    }
}

/// Tries, in order: the URL's `identity-file`, the SSH agent (`SSH_AUTH_SOCK`), the default
/// keys in `~/.ssh` (only without `identity-file`), and a password from [`PASSWORD_ENV`].
fn authenticate(sess: &Session, u: &SftpUrl) -> Result<(), ConnectError> {
    let mut tried: Vec<String> = Vec::new();
    let mut last = String::new();
    // The connection failed while logging in (not a refusal): worth another try.
    let mut dropped = false;
    let mut note = |what: String, r: Result<(), ssh2::Error>| match r {
        Ok(()) => true,
        Err(e) => {
            last = e.message().to_string();
            dropped |= matches!(
                e.code(),
                ssh2::ErrorCode::Session(
                    libssh2_sys::LIBSSH2_ERROR_SOCKET_SEND
                        | libssh2_sys::LIBSSH2_ERROR_SOCKET_RECV
                        | libssh2_sys::LIBSSH2_ERROR_SOCKET_DISCONNECT
                        | libssh2_sys::LIBSSH2_ERROR_TIMEOUT
                )
            );
            tried.push(what);
            false
        }
    };
    let passphrase = std::env::var(PASSPHRASE_ENV).ok();
    let key_file = |p: &Path| {
        let pubkey = PathBuf::from(format!("{}.pub", p.display()));
        let pubkey = pubkey.exists().then_some(pubkey);
        sess.userauth_pubkey_file(&u.user, pubkey.as_deref(), p, passphrase.as_deref())
    };
    if let Some(p) = &u.identity_file {
        if !p.is_file() {
            return Err(ConnectError::Refused(io::Error::new(
                io::ErrorKind::NotFound,
                format!("identity-file {} does not exist", p.display()),
            )));
        }
        if note(format!("the key {}", p.display()), key_file(p)) {
            return Ok(());
        }
    }
    if std::env::var_os("SSH_AUTH_SOCK").is_some()
        && note("the SSH agent".into(), sess.userauth_agent(&u.user))
    {
        return Ok(());
    }
    if u.identity_file.is_none() {
        if let Some(h) = home() {
            for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
                let p = h.join(".ssh").join(name);
                if p.is_file() && note(format!("the key {}", p.display()), key_file(&p)) {
                    return Ok(());
                }
            }
        }
    }
    if let Ok(pw) = std::env::var(PASSWORD_ENV) {
        if note(
            format!("the password in {PASSWORD_ENV}"),
            sess.userauth_password(&u.user, &pw),
        ) {
            return Ok(());
        }
    }
    let tried = if tried.is_empty() {
        format!("no key or password to try: set identity-file=PATH, run an SSH agent, or set {PASSWORD_ENV}")
    } else {
        format!("tried {} ({last})", tried.join(", "))
    };
    if dropped {
        return Err(ConnectError::Transient(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!(
                "{}:{}: the connection failed while logging in {}: {tried}",
                u.host, u.port, u.user
            ),
        )));
    }
    Err(ConnectError::Refused(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{}:{} refused to log in {}: {tried}",
            u.host, u.port, u.user
        ),
    )))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprints_are_openssh_style() {
        // SHA-256 of the empty string.
        let h: Vec<u8> = (0..32)
            .map(|i| {
                u8::from_str_radix(
                    &"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                        [2 * i..2 * i + 2],
                    16,
                )
                .unwrap()
            })
            .collect();
        assert_eq!(
            super::fingerprint(&h),
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
        );
    }
}
