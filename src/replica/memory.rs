//! An in-memory replica, for tests only (no URL scheme opens it): it keeps the
//! [`ReplicaClient`](super::ReplicaClient) contract like any backend, and can inject the
//! faults a real store shows — a call that fails, a `put_new` that stored the object but
//! answers with a timeout (the ambiguous outcome), a slow store.
//!
//! Clones share one store and one set of faults: a test keeps a clone to inject faults into
//! the client it handed over. An injected failure has no effect on the store; the ambiguous
//! `put_new` has the effect of a successful one.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::{check_key, Listed, ReplicaClient, ReplicaError, Result};

/// One operation of the client, to aim a fault at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    PutNew,
    Put,
    Get,
    GetRange,
    List,
    Delete,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::PutNew => "put_new",
            Op::Put => "put",
            Op::Get => "get",
            Op::GetRange => "get_range",
            Op::List => "list",
            Op::Delete => "delete",
        }
    }
}

/// How long a call may take before it fails with a timeout, unless set otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Faults {
    /// Calls of an operation still to fail.
    fail: HashMap<Op, u32>,
    /// `put_new` calls still to store the object and then report a timeout.
    ambiguous_put_new: u32,
    /// How long every call waits before it acts.
    delay: Duration,
    /// Calls made so far, per operation (failed ones included).
    calls: HashMap<Op, u64>,
}

/// A stored object: its bytes and when it was stored (ns since the epoch).
type Object = (Arc<Vec<u8>>, u64);

struct Inner {
    name: String,
    timeout: Duration,
    objects: Mutex<BTreeMap<String, Object>>,
    faults: Mutex<Faults>,
}

/// An in-memory replica with fault injection (tests only).
#[derive(Clone)]
pub struct MemoryReplica {
    inner: Arc<Inner>,
}

impl MemoryReplica {
    /// An empty store; `name` shows in `describe()` as `mem://name`.
    pub fn new(name: &str) -> MemoryReplica {
        MemoryReplica::with_timeout(name, DEFAULT_TIMEOUT)
    }

    /// The same, with calls that wait longer than `timeout` (see [`set_delay`](Self::set_delay))
    /// failing with a timeout after waiting `timeout`.
    pub fn with_timeout(name: &str, timeout: Duration) -> MemoryReplica {
        MemoryReplica {
            inner: Arc::new(Inner {
                name: name.to_string(),
                timeout,
                objects: Mutex::new(BTreeMap::new()),
                faults: Mutex::new(Faults::default()),
            }),
        }
    }

    /// The next `n` calls of `op` fail with an I/O error and change nothing.
    pub fn fail_next(&self, op: Op, n: u32) {
        *self.inner.faults.lock().fail.entry(op).or_default() = n;
    }

    /// The next `n` calls of `put_new` act as usual (store the object, or find it exists)
    /// but answer with a timeout error: the outcome a client sees when the store's answer is
    /// lost.
    pub fn ambiguous_put_new(&self, n: u32) {
        self.inner.faults.lock().ambiguous_put_new = n;
    }

    /// Every call waits `d` before it acts; past the timeout it waits the timeout and fails
    /// instead, changing nothing (as a network backend's request timeout does).
    pub fn set_delay(&self, d: Duration) {
        self.inner.faults.lock().delay = d;
    }

    /// Calls of `op` so far (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.inner
            .faults
            .lock()
            .calls
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    fn io(&self, op: Op, key: &str, err: io::Error) -> ReplicaError {
        ReplicaError::Io {
            replica: self.describe(),
            op: op.name(),
            key: key.to_string(),
            err,
        }
    }

    /// Counts the call, waits the delay and applies an injected failure.
    fn enter(&self, op: Op, key: &str) -> Result<()> {
        let delay = {
            let mut f = self.inner.faults.lock();
            *f.calls.entry(op).or_default() += 1;
            f.delay
        };
        if !delay.is_zero() {
            std::thread::sleep(delay.min(self.inner.timeout));
            if delay > self.inner.timeout {
                return Err(self.io(
                    op,
                    key,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {:?}", self.inner.timeout),
                    ),
                ));
            }
        }
        let mut f = self.inner.faults.lock();
        if let Some(n) = f.fail.get_mut(&op).filter(|n| **n > 0) {
            *n -= 1;
            return Err(self.io(op, key, io::Error::other("injected fault")));
        }
        Ok(())
    }

    fn now_ns() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

impl ReplicaClient for MemoryReplica {
    fn describe(&self) -> String {
        format!("mem://{}", self.inner.name)
    }

    fn put_new(&self, key: &str, src: &Path) -> Result<()> {
        check_key(&self.describe(), "put_new", key, false)?;
        self.enter(Op::PutNew, key)?;
        let data = std::fs::read(src).map_err(|e| self.io(Op::PutNew, key, e))?;
        let r = {
            let mut objects = self.inner.objects.lock();
            if objects.contains_key(key) {
                Err(ReplicaError::Exists(key.to_string()))
            } else {
                objects.insert(key.to_string(), (Arc::new(data), Self::now_ns()));
                Ok(())
            }
        };
        let mut f = self.inner.faults.lock();
        if f.ambiguous_put_new > 0 {
            f.ambiguous_put_new -= 1;
            return Err(self.io(
                Op::PutNew,
                key,
                io::Error::new(io::ErrorKind::TimedOut, "injected: the answer was lost"),
            ));
        }
        r
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        check_key(&self.describe(), "put", key, false)?;
        self.enter(Op::Put, key)?;
        self.inner
            .objects
            .lock()
            .insert(key.to_string(), (Arc::new(data.to_vec()), Self::now_ns()));
        Ok(())
    }

    fn get(&self, key: &str, dst: &Path) -> Result<bool> {
        check_key(&self.describe(), "get", key, false)?;
        self.enter(Op::Get, key)?;
        let Some((data, _)) = self.inner.objects.lock().get(key).cloned() else {
            return Ok(false);
        };
        std::fs::write(dst, &*data).map_err(|e| self.io(Op::Get, key, e))?;
        Ok(true)
    }

    fn get_range(&self, key: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
        check_key(&self.describe(), "get_range", key, false)?;
        self.enter(Op::GetRange, key)?;
        let objects = self.inner.objects.lock();
        let Some((data, _)) = objects.get(key) else {
            return Ok(None);
        };
        let size = data.len() as u64;
        let start = off.min(size);
        let end = off.saturating_add(len).min(size);
        Ok(Some(data[start as usize..end.max(start) as usize].to_vec()))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        check_key(&self.describe(), "list", prefix, true)?;
        self.enter(Op::List, prefix)?;
        Ok(self
            .inner
            .objects
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (d, t))| Listed {
                key: k.clone(),
                size: d.len() as u64,
                modified_ns: *t,
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(&self.describe(), "delete", key, false)?;
        self.enter(Op::Delete, key)?;
        self.inner.objects.lock().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_replica_faults() {
        let m = MemoryReplica::new("unit");
        let c: Box<dyn ReplicaClient> = Box::new(m.clone());
        m.fail_next(Op::Put, 1);
        let e = c.put("a/b", b"x").unwrap_err().to_string();
        assert!(e.contains("a/b") && e.contains("injected"), "{e}");
        assert_eq!(
            c.get_range("a/b", 0, 9).unwrap(),
            None,
            "a failed put stored"
        );
        c.put("a/b", b"xyz").unwrap();
        assert_eq!(c.get_range("a/b", 1, 9).unwrap().unwrap(), b"yz");
        assert_eq!(c.get_range("a/b", 5, 9).unwrap().unwrap(), b"");
        assert_eq!(m.calls(Op::Put), 2);
        assert!(c.put("../x", b"x").is_err());
        assert!(c.list("a/..").is_err());
        assert_eq!(c.list("").unwrap().len(), 1);
    }

    #[test]
    fn keys_are_checked() {
        for good in ["a", "a/b", "db/l0/0000000000000001.seg", "a.b/c-d"] {
            check_key("r", "put", good, false).unwrap();
            check_key("r", "list", good, true).unwrap();
        }
        for prefix in ["", "a/", "a/b/"] {
            check_key("r", "list", prefix, true).unwrap();
        }
        for bad in ["", "/a", "a/", "a//b", "..", "a/../b", "./a", "a/.tmp-1"] {
            let e = check_key("r", "put", bad, false).unwrap_err().to_string();
            assert!(e.contains(&format!(" {bad}: ")), "{bad}: {e}");
        }
        for bad in ["/", "/a", "a//", "../", "a/.."] {
            assert!(check_key("r", "list", bad, true).is_err(), "{bad}");
        }
    }
}
