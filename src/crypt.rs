//! Encryption of replica objects with age: to X25519 recipients, or to a passphrase.
//!
//! Passphrase objects use age's own scrypt recipient with a moderate work factor (2^15, tens
//! of milliseconds per object), because every shipped object pays it once.
//!
//! A sealed object is an age file wrapping the whole plain object, so nothing of its content
//! (not even its header) is readable without an identity; keys stay as they are (they carry
//! ids, levels and TXIDs only). Decryption needs nothing but the identity file. age encrypts
//! in authenticated 64 KiB chunks, so a reader can also seek: decrypt just the chunks holding
//! the bytes it wants (`Opener::open_seekable`).
//!
//! Every object's age header carries its own file key, wrapped for each recipient; with a
//! passphrase it is wrapped under a key derived with scrypt from a salt of that object, so
//! the derivation cannot be shared between objects. An `Opener` keeps the file keys it
//! unwrapped ([`FileKeys`]), so an object opened more than once (its header while a plan is
//! made, then the whole of it) pays the derivation once. A cached key is only used for the
//! very recipient stanzas it was unwrapped from, and age still checks the header's MAC and
//! every chunk's tag with it.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::num::NonZeroUsize;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use age::secrecy::ExposeSecret;
use age_core::format::{FileKey, Stanza};
use anyhow::{bail, Context, Result};
use lru::LruCache;
use parking_lot::Mutex;

/// How a replica's objects are encrypted when they are written.
#[derive(Clone, Default)]
pub enum Seal {
    #[default]
    Plain,
    /// To these age recipients.
    Recipients(Vec<String>),
    /// With this passphrase (the value, never shown).
    Passphrase(String),
}

/// What decrypts a replica's objects: an identity file and/or a passphrase (the value,
/// never shown).
#[derive(Clone, Default)]
pub struct ReadKey {
    pub identity: Option<std::path::PathBuf>,
    pub passphrase: Option<String>,
}

const AGE_MAGIC: &[u8] = b"age-encryption.org/v1";

/// True if `head` (the first bytes of an object) is an age file.
pub fn is_sealed(head: &[u8]) -> bool {
    head.starts_with(AGE_MAGIC)
}

/// True if the file at `path` is an age file.
pub fn file_is_sealed(path: &Path) -> io::Result<bool> {
    let mut head = [0u8; 21];
    let n = File::open(path)?.read(&mut head)?;
    Ok(is_sealed(&head[..n]))
}

/// Writes a new X25519 identity to `path` (mode 0600, never overwriting); returns its
/// recipient (public key) string.
pub fn keygen(path: &Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let id = age::x25519::Identity::generate();
    let public = id.to_public().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(
        f,
        "# sqlfs replica key\n# public key: {public}\n{}",
        id.to_string().expose_secret()
    )?;
    f.sync_all()?;
    Ok(public)
}

/// scrypt work factor (log2 N) for passphrase-encrypted objects.
const SCRYPT_LOG_N: u8 = 15;

/// Encrypts objects to a set of X25519 recipients or to a passphrase.
pub struct Sealer {
    recipients: Vec<age::x25519::Recipient>,
    passphrase: Option<age::secrecy::SecretString>,
}

impl Sealer {
    /// Encrypts to `passphrase` instead of recipients.
    pub fn with_passphrase(passphrase: &str) -> Result<Sealer> {
        if passphrase.is_empty() {
            bail!("the encryption passphrase is empty");
        }
        Ok(Sealer {
            recipients: Vec::new(),
            passphrase: Some(passphrase.to_owned().into()),
        })
    }

    /// The sealer a replica's resolved encryption setting asks for (`None`: not encrypted).
    pub fn for_seal(seal: &Seal) -> Result<Option<Sealer>> {
        match seal {
            Seal::Plain => Ok(None),
            Seal::Recipients(r) => Sealer::new(r),
            Seal::Passphrase(p) => Sealer::with_passphrase(p).map(Some),
        }
    }

    /// Parses `age1…` recipient strings; `None` when there are none (no encryption).
    pub fn new(recipients: &[String]) -> Result<Option<Sealer>> {
        if recipients.is_empty() {
            return Ok(None);
        }
        let recipients = recipients
            .iter()
            .map(|r| {
                age::x25519::Recipient::from_str(r.trim())
                    .map_err(|e| anyhow::anyhow!("bad age recipient {:?}: {e}", r.trim()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Sealer {
            recipients,
            passphrase: None,
        }))
    }

    fn encryptor(&self) -> Result<age::Encryptor> {
        if let Some(p) = &self.passphrase {
            let mut r = age::scrypt::Recipient::new(p.clone());
            r.set_work_factor(SCRYPT_LOG_N);
            return age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
                .context("setting up encryption");
        }
        age::Encryptor::with_recipients(self.recipients.iter().map(|r| r as &dyn age::Recipient))
            .context("setting up encryption")
    }

    /// Encrypts the file `src` into a new file `dst` (one already there is replaced).
    pub fn seal_file(&self, src: &Path, dst: &Path) -> Result<()> {
        // Always a new file: one left at `dst` may be a local replica's object too (a link).
        let _ = std::fs::remove_file(dst);
        let out = File::options()
            .write(true)
            .create_new(true)
            .open(dst)
            .with_context(|| format!("creating {}", dst.display()))?;
        let mut w = self.encryptor()?.wrap_output(io::BufWriter::new(out))?;
        io::copy(&mut BufReader::new(File::open(src)?), &mut w)?;
        let mut inner = w.finish()?;
        inner.flush()?;
        inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    }

    /// Encrypts `data`.
    pub fn seal_bytes(&self, data: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut w = self.encryptor()?.wrap_output(&mut out)?;
        w.write_all(data)?;
        w.finish()?;
        Ok(out)
    }
}

/// How many unwrapped file keys [`FileKeys`] keeps (about 150 bytes each): more than the
/// objects of any sensible restore plan, so a plan's objects are all still there when the
/// restore decrypts them.
const FILE_KEYS: usize = 65_536;

/// File keys unwrapped so far, by the recipient stanzas of the object header they came
/// from; cloning shares the cache (openers built per use for one replica share one).
#[derive(Clone)]
pub struct FileKeys(Arc<Mutex<LruCache<Vec<u8>, [u8; 16]>>>);

impl Default for FileKeys {
    fn default() -> FileKeys {
        FileKeys(Arc::new(Mutex::new(LruCache::new(
            NonZeroUsize::new(FILE_KEYS).expect("not zero"),
        ))))
    }
}

/// The cache key of an object's recipient stanzas: all of their bytes (tags, arguments,
/// wrapped keys; for a passphrase, its salt is among the arguments).
fn stanzas_id(stanzas: &[Stanza]) -> Vec<u8> {
    let mut id = Vec::new();
    for s in stanzas {
        for part in std::iter::once(&s.tag).chain(&s.args) {
            id.extend_from_slice(part.as_bytes());
            id.push(0);
        }
        id.extend_from_slice(&(s.body.len() as u32).to_be_bytes());
        id.extend_from_slice(&s.body);
    }
    id
}

/// An opener's identities as the one identity age is given: a file key already unwrapped
/// from the same stanzas comes from the cache, anything else from the identities, in order
/// (as age itself would ask them).
struct Cached<'a>(&'a Opener);

impl age::Identity for Cached<'_> {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
        self.unwrap_stanzas(std::slice::from_ref(stanza))
    }

    fn unwrap_stanzas(&self, stanzas: &[Stanza]) -> Option<Result<FileKey, age::DecryptError>> {
        let id = stanzas_id(stanzas);
        if let Some(k) = self.0.file_keys.0.lock().get(&id) {
            return Some(Ok(FileKey::new(Box::new(*k))));
        }
        let found = self
            .0
            .identities
            .iter()
            .find_map(|i| i.unwrap_stanzas(stanzas))?;
        if let Ok(k) = &found {
            self.0.file_keys.0.lock().put(id, *k.expose_secret());
        }
        Some(found)
    }
}

/// Decrypts objects with the identities of an age identity file, or a passphrase.
pub struct Opener {
    identities: Vec<Box<dyn age::Identity>>,
    file_keys: FileKeys,
}

impl Opener {
    /// The same opener, keeping its file keys in `keys` (shared with other openers).
    pub fn sharing(mut self, keys: &FileKeys) -> Opener {
        self.file_keys = keys.clone();
        self
    }

    /// What age is given to decrypt an object.
    fn identity(&self) -> Cached<'_> {
        Cached(self)
    }

    pub fn from_identity_file(path: &Path) -> Result<Opener> {
        let f = age::IdentityFile::from_file(path.display().to_string())
            .with_context(|| format!("reading age identity file {}", path.display()))?;
        let identities = f
            .into_identities()
            .with_context(|| format!("{} holds no usable age identity", path.display()))?;
        if identities.is_empty() {
            bail!("{} holds no age identity", path.display());
        }
        Ok(Opener {
            identities,
            file_keys: FileKeys::default(),
        })
    }

    /// The opener for a replica's resolved key: its identity file if it has one, else its
    /// passphrase; `None` without either.
    pub fn for_key(key: &ReadKey) -> Result<Option<Opener>> {
        match (&key.identity, &key.passphrase) {
            (Some(f), _) => Opener::from_identity_file(f).map(Some),
            (None, Some(p)) => Opener::from_passphrase(p).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Decrypts with a passphrase (objects written with `--passphrase-env`).
    pub fn from_passphrase(passphrase: &str) -> Result<Opener> {
        if passphrase.is_empty() {
            bail!("the decryption passphrase is empty");
        }
        let mut id = age::scrypt::Identity::new(passphrase.to_owned().into());
        id.set_max_work_factor(22);
        Ok(Opener {
            identities: vec![Box::new(id)],
            file_keys: FileKeys::default(),
        })
    }

    /// The first `n` plain bytes of the encrypted object whose first bytes are `head`
    /// (at least one encryption chunk's worth, or all of it).
    pub fn open_prefix(&self, head: &[u8], n: usize, what: &str) -> Result<Vec<u8>> {
        let d = age::Decryptor::new_buffered(head)
            .map_err(|e| anyhow::anyhow!("{what} is not a readable encrypted object: {e}"))?;
        let r = d
            .decrypt(std::iter::once(&self.identity() as &dyn age::Identity))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot decrypt {what}: {e} (is this the identity or passphrase the replica was written for?)"
                )
            })?;
        let mut out = Vec::with_capacity(n);
        r.take(n as u64)
            .read_to_end(&mut out)
            .map_err(|e| anyhow::anyhow!("cannot decrypt {what}: {e}"))?;
        Ok(out)
    }

    /// A seekable reader of the plain bytes of the encrypted object `what`, whose bytes `src`
    /// reads from its first one. Only the age header is read here; afterwards each seek reads
    /// just the encryption chunks it lands in, and every chunk is authenticated as it is
    /// decrypted (a truncated or altered object fails to read).
    pub fn open_seekable<R: Read + io::Seek>(
        &self,
        src: R,
        what: &str,
    ) -> Result<age::stream::StreamReader<R>> {
        let d = age::Decryptor::new(src)
            .map_err(|e| anyhow::anyhow!("{what} is not a readable encrypted object: {e}"))?;
        d.decrypt(std::iter::once(&self.identity() as &dyn age::Identity))
            .map_err(|e| anyhow::anyhow!("cannot decrypt {what}: {e} (is this the identity or passphrase the replica was written for?)"))
    }

    /// Decrypts `src` (an object named `what`) into `dst`.
    pub fn open_file(&self, src: &Path, dst: &Path, what: &str) -> Result<()> {
        let d = age::Decryptor::new_buffered(BufReader::new(File::open(src)?))
            .map_err(|e| anyhow::anyhow!("{what} is not a readable encrypted object: {e}"))?;
        let mut r = d
            .decrypt(std::iter::once(&self.identity() as &dyn age::Identity))
            .map_err(|e| anyhow::anyhow!("cannot decrypt {what}: {e} (is this the identity or passphrase the replica was written for?)"))?;
        let mut out = File::create(dst)?;
        io::copy(&mut r, &mut out).map_err(|e| anyhow::anyhow!("cannot decrypt {what}: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An opener's identities that count how often age asks them for a file key.
    struct Counting(Vec<Box<dyn age::Identity>>, Arc<AtomicUsize>);

    impl age::Identity for Counting {
        fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.iter().find_map(|i| i.unwrap_stanza(stanza))
        }
    }

    fn counting(passphrase: &str) -> (Opener, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = Opener::from_passphrase(passphrase).unwrap();
        let o = Opener {
            identities: vec![Box::new(Counting(inner.identities, calls.clone()))],
            file_keys: FileKeys::default(),
        };
        (o, calls)
    }

    /// A passphrase object opened again (its header, then all of it) derives its key once;
    /// openers sharing the cache reuse it; each new object needs its own derivation; and a
    /// cached key still goes through age's header check.
    #[test]
    fn an_object_opened_twice_derives_its_key_once() {
        let sealer = Sealer::with_passphrase("correct horse").unwrap();
        let (a_plain, b_plain) = (vec![7u8; 100_000], vec![9u8; 5000]);
        let (a, b) = (
            sealer.seal_bytes(&a_plain).unwrap(),
            sealer.seal_bytes(&b_plain).unwrap(),
        );
        let (opener, calls) = counting("correct horse");
        assert_eq!(opener.open_prefix(&a, 128, "a").unwrap(), a_plain[..128]);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        let tmp = tempfile::tempdir().unwrap();
        let (sealed, plain) = (tmp.path().join("a.age"), tmp.path().join("a"));
        std::fs::write(&sealed, &a).unwrap();
        opener.open_file(&sealed, &plain, "a").unwrap();
        assert_eq!(std::fs::read(&plain).unwrap(), a_plain);
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "a's key was derived again"
        );
        assert_eq!(opener.open_prefix(&b, 10, "b").unwrap(), b_plain[..10]);
        assert_eq!(calls.load(Ordering::Relaxed), 2);

        let (other, other_calls) = counting("correct horse");
        let other = other.sharing(&opener.file_keys);
        assert_eq!(other.open_prefix(&b, 10, "b").unwrap(), b_plain[..10]);
        assert_eq!(other_calls.load(Ordering::Relaxed), 0);

        // The same stanzas with a damaged header MAC: the cached key is refused by age.
        let mac = a.windows(4).position(|w| w == b"--- ").unwrap() + 4;
        let mut bad = a.clone();
        bad[mac] = if bad[mac] == b'A' { b'B' } else { b'A' };
        assert!(opener.open_prefix(&bad, 10, "a").is_err());
        // A wrong passphrase, with a cache of its own, cannot decrypt.
        let e = Opener::from_passphrase("wrong")
            .unwrap()
            .open_prefix(&a, 10, "a")
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot decrypt a"), "{e}");
    }
}
