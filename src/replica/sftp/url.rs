//! The `sftp://` replica URL and its parameters:
//! `sftp://[user@]host[:port]/path?identity-file=PATH&known-hosts=PATH&host-key-fingerprint=SHA256:…&timeout=30s`.
//!
//! Invariants:
//! - A URL never carries a secret: `user:password@` is refused (a password comes from the
//!   environment variable [`PASSWORD_ENV`]), and every parameter is a path, a public
//!   fingerprint or a duration, so the URL may be shown as it is (minus any user information).
//! - The path is absolute (`sftp://host/srv/replica`); `/~/` starts a path relative to the
//!   login directory (`sftp://host/~/replica`).

use std::path::PathBuf;
use std::time::Duration;

/// The environment variable a password is read from (never the URL).
pub const PASSWORD_ENV: &str = "SQLFS_SFTP_PASSWORD";
/// The environment variable the passphrase of an encrypted `identity-file` is read from.
pub const PASSPHRASE_ENV: &str = "SQLFS_SFTP_KEY_PASSPHRASE";

/// Default of the URL's `timeout`: how long one request may wait on the server.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed `sftp://` URL.
#[derive(Clone, Debug, PartialEq)]
pub struct SftpUrl {
    pub user: String,
    pub host: String,
    pub port: u16,
    /// The replica's directory on the server, without a trailing `/`: absolute, or relative
    /// to the login directory (`""` is the login directory itself).
    pub root: String,
    pub identity_file: Option<PathBuf>,
    /// `None`: `~/.ssh/known_hosts`.
    pub known_hosts: Option<PathBuf>,
    /// A pinned host key fingerprint, `SHA256:` and unpadded base64 as OpenSSH prints it.
    pub fingerprint: Option<String>,
    pub timeout: Duration,
}

pub fn parse(url: &str) -> Result<SftpUrl, String> {
    let rest = url.strip_prefix("sftp://").ok_or("not an sftp:// URL")?;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match main.find('/') {
        Some(i) => main.split_at(i),
        None => (main, ""),
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => {
            if u.contains(':') {
                return Err(format!(
                    "a password does not belong in the URL: set {PASSWORD_ENV}, or better, use a key (identity-file=PATH or the SSH agent)"
                ));
            }
            (Some(u), h)
        }
        None => (None, authority),
    };
    let user = match user {
        Some(u) if !u.is_empty() => u.to_string(),
        Some(_) => return Err("an empty user name".into()),
        None => match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
            Ok(u) if !u.is_empty() => u,
            // A service started without a login environment.
            // SAFETY: getuid has no preconditions.
            _ if unsafe { libc::getuid() } == 0 => "root".to_string(),
            _ => return Err("no user name: write sftp://USER@HOST/path".into()),
        },
    };
    // `[v6]:port`, `[v6]`, `host:port` or `host`.
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => (
                h,
                Some(p.strip_prefix(':').ok_or("text after the IPv6 address")?),
            ),
            None => return Err("an unclosed IPv6 address".into()),
        },
        None => match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '\0') {
        return Err("no host name".into());
    }
    let port = match port {
        None => 22,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err("the port is not a number from 1 to 65535".into()),
        },
    };
    let root = match path.strip_prefix("/~") {
        Some(r) if r.is_empty() || r.starts_with('/') => r.trim_matches('/').to_string(),
        _ if path.trim_matches('/').is_empty() => {
            return Err("no directory: write sftp://USER@HOST/path/to/dir (or /~/dir under the login directory)".into())
        }
        _ => format!("/{}", path.trim_matches('/')),
    };
    if root.contains('\0') {
        return Err("a NUL byte in the path".into());
    }
    let mut u = SftpUrl {
        user,
        host: host.to_string(),
        port,
        root,
        identity_file: None,
        known_hosts: None,
        fingerprint: None,
        timeout: DEFAULT_TIMEOUT,
    };
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "identity-file" => u.identity_file = Some(local_path(k, v)?),
            "known-hosts" => u.known_hosts = Some(local_path(k, v)?),
            "host-key-fingerprint" => {
                let b64 = v.strip_prefix("SHA256:").ok_or(
                    "host-key-fingerprint: expected SHA256:BASE64 (as `ssh-keygen -lf KEY` prints it)",
                )?;
                let b64 = b64.trim_end_matches('=');
                if b64.len() != 43
                    || !b64
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
                {
                    return Err("host-key-fingerprint: not a SHA256 fingerprint (43 characters of base64 after SHA256:)".into());
                }
                u.fingerprint = Some(format!("SHA256:{b64}"));
            }
            "timeout" => {
                u.timeout = crate::units::parse_interval(v).map_err(|e| format!("timeout: {e}"))?
            }
            _ => {
                return Err(format!(
                    "unknown parameter {k:?} (known: identity-file, known-hosts, host-key-fingerprint, timeout)"
                ))
            }
        }
    }
    Ok(u)
}

/// A local file named by a parameter: absolute, or `~/…` under `$HOME`.
fn local_path(k: &str, v: &str) -> Result<PathBuf, String> {
    if let Some(r) = v.strip_prefix("~/") {
        return home()
            .map(|h| h.join(r))
            .ok_or(format!("{k}: ~ but $HOME is not set"));
    }
    if !v.starts_with('/') {
        return Err(format!("{k}: an absolute path (or ~/…) expected"));
    }
    Ok(PathBuf::from(v))
}

pub fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse("sftp://bk@backup.lan:2222/srv/replica/?identity-file=/k/id&known-hosts=/k/kh&timeout=5s").unwrap();
        assert_eq!(
            (u.user.as_str(), u.host.as_str(), u.port, u.root.as_str()),
            ("bk", "backup.lan", 2222, "/srv/replica")
        );
        assert_eq!(u.identity_file, Some(PathBuf::from("/k/id")));
        assert_eq!(u.known_hosts, Some(PathBuf::from("/k/kh")));
        assert_eq!(u.timeout, Duration::from_secs(5));
        let u = parse("sftp://bk@[::1]/~/r").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.root.as_str()), ("::1", 22, "r"));
        let fp = "SHA256:W7Fh151xOLMnU/ZcM8JQOOhl7bi1/C5mxA6FO2DW3Zw";
        let u = parse(&format!("sftp://bk@h/r?host-key-fingerprint={fp}")).unwrap();
        assert_eq!(u.fingerprint.as_deref(), Some(fp));
        for bad in [
            "sftp://bk:hunter2@h/r",
            "sftp://bk@h",
            "sftp://bk@h/",
            "sftp://bk@:22/r",
            "sftp://bk@h:0/r",
            "sftp://bk@h:ssh/r",
            "sftp://@h/r",
            "sftp://bk@h/r?password=x",
            "sftp://bk@h/r?identity-file=relative",
            "sftp://bk@h/r?host-key-fingerprint=MD5:aa",
            "sftp://bk@h/r?timeout=soon",
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
