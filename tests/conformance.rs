//! The replica-client contract (the doc comments of `ReplicaClient` in src/replica/mod.rs),
//! checked case by case over every backend: a directory (`file://`), the S3 test server on
//! loopback (`s3://`), a private OpenSSH server on loopback (`sftp://`), the GCS emulator
//! (`gs://`) and Azurite (`az://`) on loopback (what each emulator cannot show:
//! tests/common/cloudservers.rs) and the in-memory client (which also gets cases of its own showing that
//! its injected faults work).
//!
//! **Adding a backend** is one function in `mod backends` that returns a fresh, empty
//! [`Backend`] (the boxed client, plus a guard that keeps its server or directory alive), and
//! its name in the `conformance!` list at the bottom: every case then runs over it as
//! `<backend>::<case>` (`cargo test --release --test conformance gcs::`).

mod common;

use std::any::Any;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Barrier, OnceLock};

use sqlfs::replica::{Listed, ReplicaClient, ReplicaError};

/// One backend under test, empty, for one case.
pub struct Backend {
    pub client: Box<dyn ReplicaClient>,
    /// Keeps what the client needs alive (a server, a directory) until the case ends.
    pub _guard: Box<dyn Any>,
    /// Keys per listing page, if the backend lists in pages: the listing case stores more
    /// than two pages' worth.
    pub list_page: Option<usize>,
    /// Strings that must never appear in `describe()` or in an error (credentials).
    pub secrets: Vec<String>,
}

/// A name unique in this test process, for directories, prefixes and buckets.
fn unique(case: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{case}-{}", N.fetch_add(1, Ordering::SeqCst))
}

mod backends {
    use super::*;
    use common::s3server::{s3_test_credentials, S3Server};
    use sqlfs::replica::{FileReplica, MemoryReplica, S3Replica};

    pub fn file(case: &str) -> Backend {
        let dir = tempfile::Builder::new()
            .prefix(&format!("sqlfs-conf-{case}-"))
            .tempdir()
            .unwrap();
        // The replica directory does not exist yet: the backend creates what it needs.
        let client = FileReplica::new(dir.path().join("replica"));
        Backend {
            client: Box::new(client),
            _guard: Box::new(dir),
            list_page: None,
            secrets: vec![],
        }
    }

    /// One S3 test server for the whole process (starting one is slow), one prefix per case.
    pub fn s3(case: &str) -> Backend {
        static SERVER: OnceLock<S3Server> = OnceLock::new();
        static PID: AtomicU32 = AtomicU32::new(0);
        extern "C" fn kill_server() {
            let pid = PID.load(Ordering::SeqCst);
            if pid != 0 {
                common::send_signal(pid, libc::SIGKILL);
            }
        }
        let server = SERVER.get_or_init(|| {
            s3_test_credentials();
            let s = S3Server::start("conformance");
            PID.store(s.child.id(), Ordering::SeqCst);
            // Statics are never dropped: stop the server when the test process exits.
            // SAFETY: registers a plain function with no captured state.
            unsafe { libc::atexit(kill_server) };
            s
        });
        let page = 7;
        let client = S3Replica::open(&server.url("conformance", &format!("p/{}", unique(case))))
            .unwrap()
            .with_list_page(page as i32);
        Backend {
            client: Box::new(client),
            _guard: Box::new(()),
            list_page: Some(page),
            secrets: vec!["test-secret".into()],
        }
    }

    /// One private sshd for the whole process, one directory per case.
    pub fn sftp(case: &str) -> Backend {
        use common::sshserver::SshServer;
        static SERVER: OnceLock<SshServer> = OnceLock::new();
        static PID: AtomicU32 = AtomicU32::new(0);
        extern "C" fn kill_server() {
            let pid = PID.load(Ordering::SeqCst);
            if pid != 0 {
                common::send_signal(pid, libc::SIGKILL);
            }
        }
        let server = SERVER.get_or_init(|| {
            let s = SshServer::start();
            PID.store(s.child.id(), Ordering::SeqCst);
            // SAFETY: registers a plain function with no captured state.
            unsafe { libc::atexit(kill_server) };
            s
        });
        let client = sqlfs::replica::SftpReplica::open(&server.url(&unique(case))).unwrap();
        Backend {
            client: Box::new(client),
            _guard: Box::new(()),
            list_page: None,
            secrets: vec![],
        }
    }

    /// One GCS emulator for the whole process, one prefix per case.
    pub fn gcs(case: &str) -> Backend {
        use common::cloudservers::GcsServer;
        static SERVER: OnceLock<GcsServer> = OnceLock::new();
        static PID: AtomicU32 = AtomicU32::new(0);
        extern "C" fn kill_server() {
            let pid = PID.load(Ordering::SeqCst);
            if pid != 0 {
                common::send_signal(pid, libc::SIGKILL);
            }
        }
        let server = SERVER.get_or_init(|| {
            let s = GcsServer::start("conformance");
            PID.store(s.0.child.id(), Ordering::SeqCst);
            // SAFETY: registers a plain function with no captured state.
            unsafe { libc::atexit(kill_server) };
            s
        });
        let page = 7;
        let url = server.url("conformance", &format!("p/{}", unique(case)));
        let client = sqlfs::replica::GcsReplica::open(&url)
            .unwrap()
            .with_list_page(page);
        Backend {
            client: Box::new(client),
            _guard: Box::new(()),
            list_page: Some(page),
            secrets: vec![],
        }
    }

    /// One Azurite for the whole process, one prefix per case.
    pub fn azure(case: &str) -> Backend {
        use common::cloudservers::{azurite_credentials, Azurite, AZURITE_KEY};
        static SERVER: OnceLock<Azurite> = OnceLock::new();
        static PID: AtomicU32 = AtomicU32::new(0);
        extern "C" fn kill_server() {
            let pid = PID.load(Ordering::SeqCst);
            if pid != 0 {
                common::send_signal(pid, libc::SIGKILL);
            }
        }
        let server = SERVER.get_or_init(|| {
            azurite_credentials();
            let s = Azurite::start("conformance");
            PID.store(s.0.child.id(), Ordering::SeqCst);
            // SAFETY: registers a plain function with no captured state.
            unsafe { libc::atexit(kill_server) };
            s
        });
        let page = 7;
        let url = server.url("conformance", &format!("p/{}", unique(case)));
        let client = sqlfs::replica::AzureReplica::open(&url)
            .unwrap()
            .with_list_page(page);
        Backend {
            client: Box::new(client),
            _guard: Box::new(()),
            list_page: Some(page),
            secrets: vec![AZURITE_KEY.into()],
        }
    }

    pub fn memory(case: &str) -> Backend {
        Backend {
            client: Box::new(MemoryReplica::new(&unique(case))),
            _guard: Box::new(()),
            list_page: None,
            secrets: vec![],
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A scratch directory for local files (sources of `put_new`, destinations of `get`).
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Scratch {
        Scratch(tempfile::tempdir().unwrap())
    }
    /// A local file holding `data`.
    fn file(&self, name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.path().join(name)
    }
}

fn put_new(
    c: &dyn ReplicaClient,
    s: &Scratch,
    key: &str,
    data: &[u8],
) -> sqlfs::replica::Result<()> {
    let src = s.file(&format!("src-{}", unique("put")), data);
    c.put_new(key, &src)
}

/// The whole object through `get`, or `None` if it is missing.
fn get(c: &dyn ReplicaClient, s: &Scratch, key: &str) -> Option<Vec<u8>> {
    let dst = s.path(&unique("get"));
    match c.get(key, &dst) {
        Ok(true) => Some(std::fs::read(&dst).unwrap()),
        Ok(false) => {
            assert!(
                !dst.exists(),
                "get of missing {key} created its destination"
            );
            None
        }
        Err(e) => panic!("get {key}: {e}"),
    }
}

fn range(c: &dyn ReplicaClient, key: &str, off: u64, len: u64) -> Option<Vec<u8>> {
    c.get_range(key, off, len)
        .unwrap_or_else(|e| panic!("get_range {key} {off}+{len}: {e}"))
}

fn keys(l: &[Listed]) -> Vec<&str> {
    l.iter().map(|l| l.key.as_str()).collect()
}

/// Deterministic bytes that differ from position to position.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_right(13) as u8 ^ seed)
        .collect()
}

fn check_exists(r: sqlfs::replica::Result<()>, key: &str) {
    match r {
        Err(ReplicaError::Exists(k)) => assert_eq!(k, key),
        other => panic!("put_new of existing {key}: expected Exists, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// The cases: each gets a fresh, empty backend
// ---------------------------------------------------------------------------------------

mod cases {
    use super::*;

    /// An object created with `put_new` reads back whole, by range, in a listing, and in
    /// place where the backend has a local file.
    pub fn put_new_then_read(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        let data = pattern(1000, 1);
        put_new(c, &s, "db/l0/0000000000000001.seg", &data).unwrap();
        assert_eq!(get(c, &s, "db/l0/0000000000000001.seg").unwrap(), data);
        assert_eq!(
            range(c, "db/l0/0000000000000001.seg", 0, 1000).unwrap(),
            data
        );
        assert_eq!(
            range(c, "db/l0/0000000000000001.seg", 10, 20).unwrap(),
            data[10..30]
        );
        for prefix in ["", "db/", "db/l0/", "db/l0/0000"] {
            let l = c.list(prefix).unwrap();
            assert_eq!(keys(&l), ["db/l0/0000000000000001.seg"], "list({prefix:?})");
            assert_eq!(l[0].size, 1000);
        }
        if let Some(p) = c.local_path("db/l0/0000000000000001.seg") {
            assert_eq!(std::fs::read(p).unwrap(), data);
        }
        assert_eq!(c.local_path("db/l0/missing.seg"), None);
    }

    /// `put_new` of a key that exists (made by `put_new` or `put`) is `Exists`, and the
    /// stored object is unchanged.
    pub fn put_new_existing_is_refused(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        put_new(c, &s, "db/l0/a.seg", b"first").unwrap();
        check_exists(
            put_new(c, &s, "db/l0/a.seg", b"second, longer"),
            "db/l0/a.seg",
        );
        assert_eq!(get(c, &s, "db/l0/a.seg").unwrap(), b"first");
        c.put("names/db", b"by put").unwrap();
        check_exists(put_new(c, &s, "names/db", b"other"), "names/db");
        assert_eq!(get(c, &s, "names/db").unwrap(), b"by put");
        assert_eq!(keys(&c.list("").unwrap()), ["db/l0/a.seg", "names/db"]);
    }

    /// Concurrent `put_new`s of one key: exactly one wins, the others get `Exists`, and
    /// the object is the winner's, whole.
    pub fn put_new_race_has_one_winner(b: &Backend) {
        const THREADS: usize = 8;
        let (c, s) = (b.client.as_ref(), Scratch::new());
        for round in 0..4 {
            let key = format!("db/l0/{round:016x}.seg");
            let srcs: Vec<_> = (0..THREADS)
                .map(|t| s.file(&format!("race-{round}-{t}"), &pattern(20_000 + t, t as u8)))
                .collect();
            let barrier = Barrier::new(THREADS);
            let results: Vec<_> = std::thread::scope(|sc| {
                let hs: Vec<_> = srcs
                    .iter()
                    .map(|src| {
                        let (key, barrier) = (&key, &barrier);
                        sc.spawn(move || {
                            barrier.wait();
                            c.put_new(key, src)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let winners: Vec<usize> = (0..THREADS).filter(|&t| results[t].is_ok()).collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            for (t, r) in results.iter().enumerate() {
                if t != winners[0] {
                    assert!(
                        matches!(r, Err(ReplicaError::Exists(k)) if *k == key),
                        "round {round}, thread {t}: {r:?}"
                    );
                }
            }
            let w = winners[0];
            assert!(
                get(c, &s, &key).unwrap() == pattern(20_000 + w, w as u8),
                "round {round}: the object is not the winner's"
            );
        }
        let l = c.list("db/").unwrap();
        assert_eq!(l.len(), 4, "{:?}", keys(&l));
    }

    /// `put` replaces an object, including by a shorter or an empty one.
    pub fn put_replaces(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        c.put("names/db", b"one").unwrap();
        c.put("names/db", b"two, longer").unwrap();
        assert_eq!(get(c, &s, "names/db").unwrap(), b"two, longer");
        assert_eq!(c.list("names/").unwrap()[0].size, 11);
        c.put("names/db", b"3").unwrap();
        assert_eq!(range(c, "names/db", 0, 100).unwrap(), b"3");
        c.put("names/db", b"").unwrap();
        assert_eq!(get(c, &s, "names/db").unwrap(), b"");
        assert_eq!(c.list("").unwrap().len(), 1);
    }

    /// A missing key: `get` is `Ok(false)`, `get_range` `Ok(None)` for any range, `delete`
    /// `Ok(())`, a listing empty.
    pub fn missing_keys(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        for key in ["nothing", "db/l0/0000000000000001.seg"] {
            assert_eq!(get(c, &s, key), None);
            for (off, len) in [(0, 10), (0, 0), (5, 1), (1 << 40, 10)] {
                assert_eq!(range(c, key, off, len), None, "{key} {off}+{len}");
            }
            c.delete(key).unwrap();
        }
        assert!(c.list("").unwrap().is_empty());
        assert!(c.list("db/").unwrap().is_empty());
        // Still missing next to an object.
        c.put("db/l0/a.seg", b"a").unwrap();
        assert_eq!(get(c, &s, "db/l0/b.seg"), None);
        assert_eq!(range(c, "db/l0/b.seg", 0, 1), None);
        assert_eq!(range(c, "db/l0", 0, 1), None, "a key's parent is no key");
    }

    /// Ranged reads inside an object, across its end (short), at and past its end (empty),
    /// of length 0, and with a length that would overflow.
    pub fn ranges(b: &Backend) {
        let c = b.client.as_ref();
        let data = pattern(100, 7);
        c.put("db/snap/1.snap", &data).unwrap();
        let k = "db/snap/1.snap";
        assert_eq!(range(c, k, 0, 100).unwrap(), data);
        assert_eq!(range(c, k, 10, 20).unwrap(), data[10..30]);
        assert_eq!(range(c, k, 99, 1).unwrap(), data[99..]);
        assert_eq!(range(c, k, 90, 20).unwrap(), data[90..], "short at the end");
        assert_eq!(range(c, k, 0, 1000).unwrap(), data, "short at the end");
        assert_eq!(range(c, k, 100, 10).unwrap(), b"", "at the end");
        assert_eq!(range(c, k, 150, 10).unwrap(), b"", "past the end");
        assert_eq!(
            range(c, k, u64::MAX - 1, 1).unwrap(),
            b"",
            "far past the end"
        );
        assert_eq!(range(c, k, 50, 0).unwrap(), b"", "len 0");
        assert_eq!(
            range(c, k, 10, u64::MAX).unwrap(),
            data[10..],
            "len to the end"
        );
    }

    /// A listing is sorted by key, filtered by a plain string prefix, and holds objects only.
    pub fn list_sorted_and_filtered(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        let all = [
            "a/1", "a/10", "a/2", "a/sub/x", "ab", "abc/d", "b/2", "c", "names/db",
        ];
        for (i, k) in [6, 0, 8, 3, 1, 5, 7, 2, 4].iter().map(|&i| (i, all[i])) {
            if i % 2 == 0 {
                c.put(k, k.as_bytes()).unwrap();
            } else {
                put_new(c, &s, k, k.as_bytes()).unwrap();
            }
        }
        let l = c.list("").unwrap();
        assert_eq!(keys(&l), all);
        for x in &l {
            assert_eq!(x.size, x.key.len() as u64, "{}", x.key);
        }
        let cases: [(&str, &[&str]); 9] = [
            ("a/", &["a/1", "a/10", "a/2", "a/sub/x"]),
            ("a", &["a/1", "a/10", "a/2", "a/sub/x", "ab", "abc/d"]),
            ("a/1", &["a/1", "a/10"]),
            ("a/s", &["a/sub/x"]),
            ("a/sub/", &["a/sub/x"]),
            ("ab", &["ab", "abc/d"]),
            ("ab/", &[]),
            ("c", &["c"]),
            ("zz", &[]),
        ];
        for (prefix, want) in cases {
            assert_eq!(keys(&c.list(prefix).unwrap()), want, "list({prefix:?})");
        }
    }

    /// `list_md5` lists what `list` lists, and a digest it states is the MD5 of the bytes
    /// the key holds now (a replaced key's too): a caller trusts it to tell that a key it
    /// read still holds those bytes.
    pub fn list_md5_states_the_bytes(b: &Backend) {
        use md5::{Digest, Md5};
        let (c, s) = (b.client.as_ref(), Scratch::new());
        let put: [(&str, &[u8]); 4] = [
            ("claims/a", b"first writer"),
            ("claims/b", b""),
            ("claims/c", &[7u8; 70_000]),
            ("other/d", b"not listed"),
        ];
        for (i, (k, v)) in put.iter().enumerate() {
            if i % 2 == 0 {
                c.put(k, v).unwrap();
            } else {
                put_new(c, &s, k, v).unwrap();
            }
        }
        c.put("claims/a", b"second writer").unwrap();
        let Some(l) = c.list_md5("claims/").unwrap() else {
            return;
        };
        let stated = l.iter().filter(|(_, d)| d.is_some()).count();
        eprintln!("digests stated for {stated} of {} keys", l.len());
        let listed: Vec<Listed> = l.iter().map(|(x, _)| x.clone()).collect();
        assert_eq!(keys(&listed), keys(&c.list("claims/").unwrap()));
        for (x, d) in &l {
            let Some(d) = d else { continue };
            let now: &[u8] = match x.key.as_str() {
                "claims/a" => b"second writer",
                k => put.iter().find(|(p, _)| *p == k).unwrap().1,
            };
            assert_eq!(d[..], Md5::digest(now)[..], "{}", x.key);
        }
    }

    /// A listing longer than two of the backend's pages is whole and sorted.
    pub fn list_many_pages(b: &Backend) {
        let c = b.client.as_ref();
        let n = b.list_page.map_or(60, |p| 2 * p + 3);
        // Stored out of order, from a few threads.
        std::thread::scope(|sc| {
            for t in 0..4 {
                sc.spawn(move || {
                    for i in (0..n).rev().filter(|i| i % 4 == t) {
                        c.put(&format!("db/l0/{i:016x}.seg"), &vec![1; i % 5])
                            .unwrap();
                    }
                });
            }
        });
        c.put("dc", b"outside the prefix").unwrap();
        let l = c.list("db/").unwrap();
        let want: Vec<String> = (0..n).map(|i| format!("db/l0/{i:016x}.seg")).collect();
        assert_eq!(keys(&l), want);
        for (i, x) in l.iter().enumerate() {
            assert_eq!(x.size, (i % 5) as u64);
        }
        assert_eq!(c.list("").unwrap().len(), n + 1);
    }

    /// `delete` removes a key (which `put_new` may then create again) and is idempotent.
    pub fn delete_is_idempotent(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        put_new(c, &s, "db/l0/a.seg", b"a").unwrap();
        c.put("db/l0/b.seg", b"b").unwrap();
        c.delete("db/l0/a.seg").unwrap();
        assert_eq!(get(c, &s, "db/l0/a.seg"), None);
        assert_eq!(range(c, "db/l0/a.seg", 0, 1), None);
        assert_eq!(keys(&c.list("").unwrap()), ["db/l0/b.seg"]);
        c.delete("db/l0/a.seg").unwrap();
        put_new(c, &s, "db/l0/a.seg", b"again").unwrap();
        assert_eq!(get(c, &s, "db/l0/a.seg").unwrap(), b"again");
        c.delete("db/l0/a.seg").unwrap();
        c.delete("db/l0/b.seg").unwrap();
        c.delete("db/l0/b.seg").unwrap();
        assert!(c.list("").unwrap().is_empty(), "a deleted tree lists empty");
    }

    /// Deeply nested keys beside shallow ones.
    pub fn nested_keys(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        let deep = "a/b/c/d/e/f.seg";
        put_new(c, &s, deep, b"deep").unwrap();
        c.put("a/b/x.seg", b"x").unwrap();
        assert_eq!(get(c, &s, deep).unwrap(), b"deep");
        assert_eq!(range(c, deep, 1, 2).unwrap(), b"ee");
        let l = c.list("a/b/").unwrap();
        assert!(
            keys(&l).contains(&deep) && keys(&l).contains(&"a/b/x.seg"),
            "{l:?}"
        );
        assert_eq!(keys(&c.list("a/b/c/d/").unwrap()), [deep]);
        c.delete(deep).unwrap();
        assert!(!keys(&c.list("").unwrap()).contains(&deep));
        assert_eq!(get(c, &s, "a/b/x.seg").unwrap(), b"x");
    }

    /// Empty objects exist: they read back empty, list with size 0, and fence `put_new`.
    pub fn empty_objects(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        put_new(c, &s, "db/l0/e.seg", b"").unwrap();
        c.put("names/e", b"").unwrap();
        for k in ["db/l0/e.seg", "names/e"] {
            assert_eq!(get(c, &s, k).unwrap(), b"");
            assert_eq!(range(c, k, 0, 10).unwrap(), b"");
            assert_eq!(range(c, k, 5, 10).unwrap(), b"");
        }
        let l = c.list("").unwrap();
        assert_eq!(keys(&l), ["db/l0/e.seg", "names/e"]);
        assert!(l.iter().all(|x| x.size == 0));
        check_exists(put_new(c, &s, "db/l0/e.seg", b"x"), "db/l0/e.seg");
    }

    /// A 5 MiB object round-trips whole and by ranges.
    pub fn large_object(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        let data = pattern(5 << 20, 3);
        put_new(c, &s, "db/snap/big.snap", &data).unwrap();
        assert!(get(c, &s, "db/snap/big.snap").unwrap() == data);
        let n = data.len() as u64;
        assert!(
            range(c, "db/snap/big.snap", n - 100_000, 200_000).unwrap()
                == data[data.len() - 100_000..]
        );
        assert!(
            range(c, "db/snap/big.snap", 1 << 20, 70_000).unwrap()
                == data[1 << 20..(1 << 20) + 70_000]
        );
        assert_eq!(c.list("db/").unwrap()[0].size, n);
    }

    /// Keys outside the rules are refused by every operation with an error naming the key,
    /// and nothing is stored, read or removed; `describe()` and errors carry no secret.
    pub fn bad_keys_refused_and_no_secrets(b: &Backend) {
        let (c, s) = (b.client.as_ref(), Scratch::new());
        let d = c.describe();
        assert!(!d.is_empty());
        for secret in &b.secrets {
            assert!(
                !d.contains(secret.as_str()),
                "describe() shows a secret: {d}"
            );
        }
        c.put("a/b", b"kept").unwrap();
        let src = s.file("src", b"x");
        for bad in [
            "",
            "/a",
            "/etc/sqlfs-conf",
            "a/",
            "a//b",
            "..",
            "../x",
            "a/../b",
            "./a",
            "a/.b",
        ] {
            let errs = [
                c.put_new(bad, &src).map(|_| ()),
                c.put(bad, b"x"),
                c.get(bad, &s.path("out")).map(|_| ()),
                c.get_range(bad, 0, 1).map(|_| ()),
                c.delete(bad),
            ];
            for e in errs {
                let e = match e {
                    Err(e @ ReplicaError::Io { .. }) => e.to_string(),
                    other => panic!("key {bad:?}: expected an error, got {other:?}"),
                };
                assert!(
                    e.contains(&format!(" {bad}: ")),
                    "the error does not name {bad:?}: {e}"
                );
                for secret in &b.secrets {
                    assert!(!e.contains(secret.as_str()), "an error shows a secret: {e}");
                }
            }
        }
        for bad in ["/", "/a", "../", "a//", "a/.."] {
            assert!(c.list(bad).is_err(), "list({bad:?}) accepted");
        }
        assert!(!s.path("out").exists());
        assert!(!Path::new("/etc/sqlfs-conf").exists());
        assert_eq!(keys(&c.list("").unwrap()), ["a/b"]);
        assert_eq!(get(c, &s, "a/b").unwrap(), b"kept");
    }
}

/// Runs one case over a fresh backend.
fn run(case: &str, make: fn(&str) -> Backend, f: fn(&Backend)) {
    let b = make(case);
    eprintln!("{case} over {}", b.client.describe());
    f(&b);
}

/// One test per (backend, case): `<backend>::<case>`.
macro_rules! conformance {
    (backends: [$($b:ident),*], cases: $cases:tt) => {
        $( conformance!(@one $b $cases); )*
    };
    (@one $b:ident [$($c:ident),*]) => {
        mod $b {
            $(
                #[test]
                fn $c() {
                    super::run(stringify!($c), super::backends::$b, super::cases::$c);
                }
            )*
        }
    };
}

conformance! {
    backends: [file, s3, sftp, gcs, azure, memory],
    cases: [
        put_new_then_read,
        put_new_existing_is_refused,
        put_new_race_has_one_winner,
        put_replaces,
        missing_keys,
        ranges,
        list_sorted_and_filtered,
        list_many_pages,
        list_md5_states_the_bytes,
        delete_is_idempotent,
        nested_keys,
        empty_objects,
        large_object,
        bad_keys_refused_and_no_secrets
    ]
}

// ---------------------------------------------------------------------------------------
// The in-memory backend's faults
// ---------------------------------------------------------------------------------------

mod memory_faults {
    use super::*;
    use sqlfs::replica::memory::Op;
    use sqlfs::replica::MemoryReplica;
    use std::time::Duration;

    /// `fail_next` fails exactly the next N calls of one operation, with an error naming the
    /// key, and a failed call changes nothing.
    #[test]
    fn injected_failures() {
        let m = MemoryReplica::new("faults");
        let c: Box<dyn ReplicaClient> = Box::new(m.clone());
        let s = Scratch::new();
        m.fail_next(Op::PutNew, 2);
        for _ in 0..2 {
            let e = put_new(c.as_ref(), &s, "db/l0/a.seg", b"a").unwrap_err();
            assert!(matches!(e, ReplicaError::Io { .. }), "{e}");
            assert!(e.to_string().contains("db/l0/a.seg"), "{e}");
            assert_eq!(
                range(c.as_ref(), "db/l0/a.seg", 0, 1),
                None,
                "a failed put_new stored"
            );
        }
        put_new(c.as_ref(), &s, "db/l0/a.seg", b"a").unwrap();
        assert_eq!(m.calls(Op::PutNew), 3);
        for op in [Op::Get, Op::GetRange, Op::List, Op::Delete, Op::Put] {
            m.fail_next(op, 1);
            let r = match op {
                Op::Get => c.get("db/l0/a.seg", &s.path("g")).map(|_| ()),
                Op::GetRange => c.get_range("db/l0/a.seg", 0, 1).map(|_| ()),
                Op::List => c.list("db/").map(|_| ()),
                Op::Delete => c.delete("db/l0/a.seg"),
                Op::Put => c.put("db/l0/a.seg", b"changed"),
                Op::PutNew => unreachable!(),
            };
            assert!(r.is_err(), "{op:?} did not fail");
            assert_eq!(
                get(c.as_ref(), &s, "db/l0/a.seg").unwrap(),
                b"a",
                "after {op:?}"
            );
        }
        // Each fault was used up by one call.
        c.delete("db/l0/a.seg").unwrap();
        assert!(c.list("").unwrap().is_empty());
    }

    /// The ambiguous `put_new`: the object is stored but the caller sees a timeout; its
    /// retry finds the key (`Exists`), which is why the shipper records what it was storing.
    #[test]
    fn ambiguous_put_new() {
        let m = MemoryReplica::new("ambiguous");
        let c: Box<dyn ReplicaClient> = Box::new(m.clone());
        let s = Scratch::new();
        m.ambiguous_put_new(1);
        let e = put_new(c.as_ref(), &s, "db/l0/a.seg", b"first").unwrap_err();
        match &e {
            ReplicaError::Io { err, key, .. } => {
                assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{e}");
                assert_eq!(key, "db/l0/a.seg");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(get(c.as_ref(), &s, "db/l0/a.seg").unwrap(), b"first");
        check_exists(
            put_new(c.as_ref(), &s, "db/l0/a.seg", b"retry"),
            "db/l0/a.seg",
        );
        assert_eq!(get(c.as_ref(), &s, "db/l0/a.seg").unwrap(), b"first");
    }

    /// A slow store: calls within the timeout succeed; a call slower than the timeout fails
    /// with a timeout and changes nothing (it never hangs).
    #[test]
    fn delays_and_timeouts() {
        let m = MemoryReplica::with_timeout("slow", Duration::from_millis(200));
        let c: Box<dyn ReplicaClient> = Box::new(m.clone());
        let s = Scratch::new();
        m.set_delay(Duration::from_millis(20));
        put_new(c.as_ref(), &s, "db/l0/a.seg", b"a").unwrap();
        assert_eq!(get(c.as_ref(), &s, "db/l0/a.seg").unwrap(), b"a");
        m.set_delay(Duration::from_secs(3600));
        for r in [
            c.put("db/l0/a.seg", b"changed"),
            c.delete("db/l0/a.seg"),
            c.list("").map(|_| ()),
        ] {
            match r {
                Err(ReplicaError::Io { err, .. }) => {
                    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut)
                }
                other => panic!("expected a timeout, got {other:?}"),
            }
        }
        m.set_delay(Duration::ZERO);
        assert_eq!(get(c.as_ref(), &s, "db/l0/a.seg").unwrap(), b"a");
    }
}
