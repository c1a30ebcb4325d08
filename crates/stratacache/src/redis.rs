//! The Redis tier: the remote tier, on a Redis server shared by many
//! processes and machines.
//!
//! # Layout
//!
//! Each object is **one** Redis string value, stored under
//!
//! ```text
//! prefix + hex(ArtifactKey::digest())      e.g. strata:9f86d081…(64 hex digits)
//! ```
//!
//! and holding one whole [`record`] format of kind `Object`: the
//! 40-byte header, the key's canonical encoding, the encoded metadata and
//! the payload. Metadata and payload travel in a single `SET`, so a reader
//! never sees the metadata of one write with the payload of another, and a
//! second client (another process, another host) sees either the whole old
//! object or the whole new one. The record's sequence number is the write's
//! wall-clock time in nanoseconds.
//!
//! # Checks on every read
//!
//! A `get` decodes the record and checks the head checksum (header, key,
//! metadata), the payload's length and XXH3-64 checksum, and that the key
//! inside the record is the requested key. The last check catches what
//! checksums cannot: a valid record copied under another name, a digest
//! collision, or a value some other program wrote under the prefix. Any
//! failure is [`Error::Corrupt`]; the value is then deleted, but only if it
//! is still the value that was read (a small Lua script compares and
//! deletes atomically, so a good value written meanwhile by another client
//! survives). A later `get` is a miss.
//!
//! # Connections
//!
//! A small pool keeps up to [`RedisOptions::connections`] connections, made
//! on demand; a caller waits (at most [`RedisOptions::timeout`]) when all
//! are busy, so threads do not serialise on one socket and the server does
//! not see an unbounded number of clients. A connection that failed at the
//! I/O level is closed, never returned to the pool, and because the usual
//! cause (a server restart, an idle-timeout kill) affects every pooled
//! connection alike, the idle ones are closed too. Every command this tier
//! sends is idempotent (`GET`, `EXISTS`, `SET`, `DEL`, and their pipelines),
//! so an operation that failed on a *reused* connection is retried once on
//! a fresh one; a timeout is not retried (it would only double the wait).
//!
//! Batches ([`Tier::get_many`], [`Tier::put_many`]) are pipelined: one
//! round trip per batch of up to 256 objects (and 64 MiB), which is what
//! makes a remote tier usable for many small KV chunks.
//!
//! # Capacity and errors
//!
//! The server's `maxmemory` bounds the tier. With the `noeviction` policy a
//! write past it is refused with an `OOM` reply, which becomes
//! [`Error::Full`] (the object is not stored). With an eviction policy
//! (`allkeys-lru`) the server drops objects silently: this tier cannot pin
//! and cannot count those evictions. [`RedisOptions::capacity_bytes`] is
//! reported in [`TierStats`] and refuses any single object larger than it;
//! it does not track what other clients store. Other server replies become
//! [`Error::Remote`] with the server's message. Redis also caps one value at
//! its `proto-max-bulk-len` (512 MiB by default).
//!
//! No error text contains the password of the URL: the tier names itself by
//! the URL with the password replaced by `***`.
//!
//! # Durability
//!
//! Whatever the server is configured for (RDB snapshots, AOF and its fsync
//! policy); [`Tier::flush`] has nothing to add. A record torn by a crash of
//! the server fails its checks on read and is dropped, like any corrupt one.
//!
//! # Cost of walking
//!
//! [`Tier::list`] and [`Tier::stats`] walk the keyspace under the prefix
//! with `SCAN` (1000 names a step) and read only each record's head with
//! `GETRANGE`, never a payload; they take time proportional to the number
//! of objects. `list` skips values that are not records of this tier (they
//! are reported as corrupt by `get`).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{ConnectionLike, RedisError, Value};

use crate::record::{self, HEADER_LEN, Header, Kind};
use crate::tier::{Meta, Object, Tier, TierStats, checksum};
use crate::{ArtifactKey, Error, Result};

/// Objects per pipelined round trip.
const BATCH: usize = 256;
/// Record bytes per pipelined `put_many` round trip: bounds the packed
/// request held in memory.
const BATCH_BYTES: usize = 64 << 20;
/// Names per `SCAN` step.
const SCAN_COUNT: usize = 1000;
/// Bytes of a record fetched to list it: the header, the key and the
/// metadata of any usual object (a longer head is fetched again, whole).
const LIST_HEAD: usize = 4096;

/// Deletes a corrupt value only if it is still the one that was read, so
/// that a good value another client wrote meanwhile is kept. ARGV[1] is
/// `type` (the value is not a string: delete it unless it is one now) or
/// `value` (delete if the string equals ARGV[2]).
const DROP_SCRIPT: &str = r"
local t = redis.call('TYPE', KEYS[1])['ok']
if ARGV[1] == 'type' then
  if t ~= 'string' and t ~= 'none' then return redis.call('DEL', KEYS[1]) end
elseif t == 'string' and redis.call('GET', KEYS[1]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// How to reach and use a Redis server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Prefix of every Redis key the tier uses. Everything under it belongs
    /// to the tier (a value there that is not one of its records is deleted
    /// as corrupt when read), so give each store its own. Must not be
    /// empty. Default `strata:`.
    pub prefix: String,
    /// Most connections open at once (at least 1). Default 4.
    pub connections: usize,
    /// Limit on connecting, on each socket read and write, and on waiting
    /// for a free connection. Default 5 s.
    pub timeout: Duration,
    /// Payload bytes reported as the capacity in [`TierStats`]; also the
    /// largest single object accepted. 0 (the default): bounded by the
    /// server's `maxmemory` only, and reported as 0.
    pub capacity_bytes: u64,
}

impl Default for RedisOptions {
    fn default() -> RedisOptions {
        RedisOptions {
            prefix: "strata:".into(),
            connections: 4,
            timeout: Duration::from_secs(5),
            capacity_bytes: 0,
        }
    }
}

/// The Redis tier. See the module documentation.
pub struct RedisTier {
    pool: Pool,
    /// `redis(<url without password>)`: the tier's name in errors.
    label: String,
    url: String,
    prefix: Vec<u8>,
    capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for RedisTier {
    // By hand: the client's connection info holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("url", &self.url)
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl RedisTier {
    /// Connects to the server at `url` (`redis://[user:password@]host:port[/db]`
    /// or `redis+unix:///path`) and checks it answers `PING`, so that a
    /// wrong address fails here, with [`Error::Remote`] naming the URL
    /// (without its password). An invalid option is [`Error::Config`].
    pub fn connect(url: &str, options: RedisOptions) -> Result<RedisTier> {
        let shown = redact_url(url);
        let label = format!("redis({shown})");
        if options.prefix.is_empty() {
            return Err(Error::Config {
                field: "redis.prefix".into(),
                message: "empty; every key of the database would belong to the tier".into(),
            });
        }
        if options.timeout.is_zero() {
            return Err(Error::Config {
                field: "redis.timeout".into(),
                message: "zero; must be positive".into(),
            });
        }
        let client = redis::Client::open(url).map_err(|e| Error::Config {
            field: "redis.url".into(),
            message: format!("{shown}: {e}"),
        })?;
        let tier = RedisTier {
            pool: Pool {
                client,
                state: Mutex::new(PoolState::default()),
                freed: Condvar::new(),
                max: options.connections.max(1),
                timeout: options.timeout,
            },
            label,
            url: shown,
            prefix: options.prefix.into_bytes(),
            capacity: options.capacity_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        };
        tier.run(|c| redis::cmd("PING").query::<()>(c))
            .map_err(|e| tier.remote("connecting", &e))?;
        Ok(tier)
    }

    /// The server's URL, with any password replaced by `***`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The Redis key under which `key` is stored: the prefix, then the hex
    /// of [`ArtifactKey::digest`]. For looking at the store with other
    /// Redis tools.
    pub fn redis_key(&self, key: &ArtifactKey) -> Result<Vec<u8>> {
        Ok(self.name_of(&key.encode()?))
    }

    fn name_of(&self, encoded: &[u8]) -> Vec<u8> {
        // The same as `ArtifactKey::digest`, without encoding twice.
        let digest = blake3::hash(encoded);
        let mut name = Vec::with_capacity(self.prefix.len() + 64);
        name.extend_from_slice(&self.prefix);
        for b in digest.as_bytes() {
            name.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
        name
    }

    /// Runs `op` on a pooled connection, retrying once on a fresh one when
    /// a reused connection turned out broken.
    fn run<T>(
        &self,
        mut op: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let mut lease = self.pool.take()?;
        let err = match lease.attempt(&mut op) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let retry = lease.broken && lease.reused && !err.is_timeout();
        drop(lease);
        if !retry {
            return Err(err);
        }
        self.pool.take()?.attempt(&mut op)
    }

    fn remote(&self, what: &str, e: &RedisError) -> Error {
        Error::Remote {
            tier: self.label.clone(),
            message: format!("{what}: {e}"),
        }
    }

    /// The error for a failed command on `key`: `OOM` is the server out of
    /// memory, hence [`Error::Full`].
    fn fail(&self, op: &str, key: &ArtifactKey, e: &RedisError) -> Error {
        if e.code() == Some("OOM") {
            return Error::Full {
                tier: self.label.clone(),
                key: key.to_string(),
                message: format!("the server refused the write: {e}"),
            };
        }
        self.remote(&format!("{op} {key}"), e)
    }

    /// Checks a value read under `key` and makes the object of it; a
    /// value that fails is deleted and reported as corrupt.
    fn open(&self, key: &ArtifactKey, name: &[u8], encoded: &[u8], value: &[u8]) -> Result<Object> {
        let reason = match record::decode(value) {
            Err(reason) => reason,
            Ok(d) if d.header.kind != Kind::Object => format!("a {:?} record", d.header.kind),
            Ok(d) if d.key != encoded => match ArtifactKey::decode(d.key) {
                Ok(other) => format!("the record holds another key ({other})"),
                Err(_) => "the record holds another key".into(),
            },
            Ok(d) => {
                // The one copy a read costs here: out of the reply buffer
                // into the shared buffer the caller keeps.
                return Ok(Object {
                    meta: d.meta,
                    bytes: Arc::from(d.payload),
                });
            }
        };
        Err(self.corrupt(key, name, Some(value), reason))
    }

    /// Deletes the corrupt value under `name` if unchanged (`value`, or
    /// `None` for a value that is not a string) and makes the error.
    fn corrupt(
        &self,
        key: &ArtifactKey,
        name: &[u8],
        value: Option<&[u8]>,
        reason: String,
    ) -> Error {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(DROP_SCRIPT).arg(1).arg(name);
        match value {
            Some(v) => cmd.arg("value").arg(v),
            None => cmd.arg("type"),
        };
        let reason = match self.run(|c| cmd.query::<i64>(c)) {
            Ok(_) => format!("{reason}; dropped"),
            Err(e) => format!("{reason}; could not drop it: {e}"),
        };
        Error::Corrupt {
            tier: self.label.clone(),
            key: key.to_string(),
            reason,
        }
    }

    /// The outcome of one `GET` reply.
    fn read_reply(
        &self,
        key: &ArtifactKey,
        name: &[u8],
        encoded: &[u8],
        reply: Value,
    ) -> Result<Option<Object>> {
        match reply {
            Value::Nil => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Value::BulkString(v) => {
                let object = self.open(key, name, encoded, &v)?;
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(object))
            }
            Value::ServerError(e) => {
                let e = RedisError::from(e);
                if e.code() == Some("WRONGTYPE") {
                    Err(self.corrupt(key, name, None, "not a string value".into()))
                } else {
                    Err(self.fail("GET", key, &e))
                }
            }
            other => Err(Error::Remote {
                tier: self.label.clone(),
                message: format!("GET {key}: unexpected reply {other:?}"),
            }),
        }
    }

    fn check_size(&self, key: &ArtifactKey, len: u64) -> Result<()> {
        if self.capacity > 0 && len > self.capacity {
            return Err(Error::Full {
                tier: self.label.clone(),
                key: key.to_string(),
                message: format!("{len} bytes exceed the capacity ({} bytes)", self.capacity),
            });
        }
        Ok(())
    }

    /// Walks every name under the prefix, a `SCAN` step at a time, handing
    /// each step's new names to `page`.
    fn scan(&self, mut page: impl FnMut(&[Vec<u8>]) -> Result<()>) -> Result<()> {
        let mut pattern = Vec::with_capacity(self.prefix.len() + 1);
        for &b in &self.prefix {
            if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
                pattern.push(b'\\');
            }
            pattern.push(b);
        }
        pattern.push(b'*');
        // SCAN may return a name twice.
        let mut seen = HashSet::new();
        let mut cursor = 0u64;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, names): (u64, Vec<Vec<u8>>) = self
                .run(|c| cmd.query(c))
                .map_err(|e| self.remote("SCAN", &e))?;
            let fresh: Vec<Vec<u8>> = names
                .into_iter()
                .filter(|n| seen.insert(n.clone()))
                .collect();
            if !fresh.is_empty() {
                page(&fresh)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Pipelines one command per name and returns the replies in order.
    fn pipelined(
        &self,
        what: &str,
        names: &[Vec<u8>],
        cmds: impl Fn(&mut redis::Pipeline, &[u8]),
    ) -> Result<Vec<Value>> {
        let mut pipe = redis::pipe();
        for n in names {
            cmds(&mut pipe, n);
        }
        let packed = pipe.get_packed_pipeline();
        let count = pipe.len();
        self.run(|c| c.req_packed_commands(&packed, 0, count))
            .map_err(|e| self.remote(what, &e))
    }

    /// The key and metadata of the record whose head is `head` and whose
    /// whole length is `len`, if it is a sound record of this tier stored
    /// under `name`.
    fn listed(&self, name: &[u8], head: &[u8], len: u64) -> Option<(ArtifactKey, Meta)> {
        let h = Header::parse(head)?;
        if h.kind != Kind::Object || h.total_len() != len {
            return None;
        }
        let k_end = HEADER_LEN + h.key_len as usize;
        let m_end = k_end.checked_add(h.meta_len as usize)?;
        let (key, meta) = (head.get(HEADER_LEN..k_end)?, head.get(k_end..m_end)?);
        if !h.check(key, meta) || self.name_of(key) != name {
            return None;
        }
        let meta = record::decode_meta(meta)?;
        Some((ArtifactKey::decode(key).ok()?, meta))
    }
}

impl Tier for RedisTier {
    fn name(&self) -> &str {
        "redis"
    }

    fn get(&self, key: &ArtifactKey) -> Result<Option<Object>> {
        let encoded = key.encode()?;
        let name = self.name_of(&encoded);
        let mut cmd = redis::cmd("GET");
        cmd.arg(&name);
        // The raw reply, so that a WRONGTYPE reply reaches `read_reply`.
        let reply = self
            .run(|c| c.req_command(&cmd))
            .map_err(|e| self.fail("GET", key, &e))?;
        self.read_reply(key, &name, &encoded, reply)
    }

    fn put(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8]) -> Result<()> {
        let encoded = key.encode()?;
        self.check_size(key, bytes.len() as u64)?;
        let name = self.name_of(&encoded);
        let mut packed = Vec::new();
        pack_set(&mut packed, &name, &encoded, &meta, bytes, now_ns());
        let reply = self
            .run(|c| c.req_packed_command(&packed))
            .map_err(|e| self.fail("SET", key, &e))?;
        match reply {
            Value::Okay => Ok(()),
            Value::ServerError(e) => Err(self.fail("SET", key, &e.into())),
            other => Err(Error::Remote {
                tier: self.label.clone(),
                message: format!("SET {key}: unexpected reply {other:?}"),
            }),
        }
    }

    fn contains(&self, key: &ArtifactKey) -> Result<bool> {
        let name = self.redis_key(key)?;
        let n: i64 = self
            .run(|c| redis::cmd("EXISTS").arg(&name).query(c))
            .map_err(|e| self.fail("EXISTS", key, &e))?;
        Ok(n > 0)
    }

    fn delete(&self, key: &ArtifactKey) -> Result<bool> {
        let name = self.redis_key(key)?;
        let n: i64 = self
            .run(|c| redis::cmd("DEL").arg(&name).query(c))
            .map_err(|e| self.fail("DEL", key, &e))?;
        Ok(n > 0)
    }

    /// Hits and misses are this client's; objects and bytes are counted by
    /// walking the keyspace under the prefix (see the module
    /// documentation), and are 0 when the server cannot be reached.
    /// Evictions by the server are not visible and reported as 0.
    fn stats(&self) -> TierStats {
        let (mut objects, mut bytes) = (0, 0);
        let walked = self.scan(|names| {
            let heads = self.pipelined("GETRANGE", names, |p, n| {
                p.cmd("GETRANGE").arg(n).arg(0).arg(HEADER_LEN - 1);
            })?;
            // (No let chains: the workspace supports Rust 1.85.)
            let headers = heads.iter().filter_map(|head| match head {
                Value::BulkString(h) => Header::parse(h).filter(|h| h.kind == Kind::Object),
                _ => None,
            });
            for h in headers {
                objects += 1;
                bytes += h.payload_len;
            }
            Ok(())
        });
        if walked.is_err() {
            (objects, bytes) = (0, 0);
        }
        TierStats {
            objects,
            bytes,
            capacity_bytes: self.capacity,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: 0,
        }
    }

    fn list(&self) -> Result<Vec<(ArtifactKey, Meta)>> {
        let mut out = Vec::new();
        self.scan(|names| {
            let replies = self.pipelined("GETRANGE", names, |p, n| {
                p.cmd("GETRANGE").arg(n).arg(0).arg(LIST_HEAD - 1);
                p.cmd("STRLEN").arg(n);
            })?;
            let mut replies = replies.into_iter();
            for name in names {
                let (Some(head), Some(len)) = (replies.next(), replies.next()) else {
                    break;
                };
                let (Value::BulkString(mut head), Value::Int(len)) = (head, len) else {
                    continue; // not a string: not ours
                };
                let len = u64::try_from(len).unwrap_or(0);
                // A head longer than the first fetch: fetch it whole.
                let longer = Header::parse(&head)
                    .filter(|h| h.payload_offset() > head.len() as u64 && h.total_len() == len);
                if let Some(h) = longer {
                    let end = h.payload_offset() - 1;
                    let mut cmd = redis::cmd("GETRANGE");
                    cmd.arg(name).arg(0).arg(end);
                    head = self
                        .run(|c| cmd.query(c))
                        .map_err(|e| self.remote("GETRANGE", &e))?;
                }
                if let Some(entry) = self.listed(name, &head, len) {
                    out.push(entry);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// One pipelined round trip per batch of `GET`s.
    fn get_many(&self, keys: &[ArtifactKey]) -> Vec<Result<Option<Object>>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            let mut slots: Vec<Result<(Vec<u8>, Vec<u8>)>> = Vec::with_capacity(chunk.len());
            let mut pipe = redis::pipe();
            for key in chunk {
                slots.push(key.encode().map(|encoded| {
                    let name = self.name_of(&encoded);
                    pipe.cmd("GET").arg(&name);
                    (name, encoded)
                }));
            }
            let packed = pipe.get_packed_pipeline();
            let count = pipe.len();
            let replies = if count == 0 {
                Ok(Vec::new())
            } else {
                self.run(|c| c.req_packed_commands(&packed, 0, count))
            };
            let mut replies = match replies {
                Ok(r) => r.into_iter(),
                Err(e) => {
                    for (key, slot) in chunk.iter().zip(slots) {
                        out.push(slot.and_then(|_| Err(self.fail("GET", key, &e))));
                    }
                    continue;
                }
            };
            for (key, slot) in chunk.iter().zip(slots) {
                out.push(slot.and_then(|(name, encoded)| {
                    let reply = replies.next().unwrap_or(Value::Nil);
                    self.read_reply(key, &name, &encoded, reply)
                }));
            }
        }
        out
    }

    /// One pipelined round trip per batch of `SET`s; each object succeeds
    /// or fails on its own (with `noeviction`, the server may take the
    /// first objects of a batch and refuse the rest).
    fn put_many(&self, items: &[(ArtifactKey, Meta, &[u8])]) -> Vec<Result<()>> {
        let mut out: Vec<Result<()>> = Vec::with_capacity(items.len());
        let seq = now_ns();
        let mut start = 0;
        while start < items.len() {
            let mut packed = Vec::new();
            // Index in `items` of each queued SET.
            let mut queued = Vec::new();
            let mut end = start;
            while end < items.len() && queued.len() < BATCH && packed.len() < BATCH_BYTES {
                let (key, meta, bytes) = &items[end];
                let prepared = key
                    .encode()
                    .and_then(|e| self.check_size(key, bytes.len() as u64).map(|()| e));
                match prepared {
                    Ok(encoded) => {
                        let name = self.name_of(&encoded);
                        pack_set(&mut packed, &name, &encoded, meta, bytes, seq);
                        queued.push(end);
                        out.push(Ok(()));
                    }
                    Err(e) => out.push(Err(e)),
                }
                end += 1;
            }
            if !queued.is_empty() {
                match self.run(|c| c.req_packed_commands(&packed, 0, queued.len())) {
                    Ok(replies) => {
                        for (&i, reply) in queued.iter().zip(replies) {
                            let key = &items[i].0;
                            out[i] = match reply {
                                Value::Okay => Ok(()),
                                Value::ServerError(e) => Err(self.fail("SET", key, &e.into())),
                                other => Err(Error::Remote {
                                    tier: self.label.clone(),
                                    message: format!("SET {key}: unexpected reply {other:?}"),
                                }),
                            };
                        }
                    }
                    Err(e) => {
                        for &i in &queued {
                            out[i] = Err(self.fail("SET", &items[i].0, &e));
                        }
                    }
                }
            }
            start = end;
        }
        out
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends to `out` the RESP request `SET name record`, the record laid
/// out exactly as [`record::encode`] lays it, but written straight into the
/// request: the payload is copied once, not into a record and then into a
/// request. `meta`'s length and checksum are computed here.
fn pack_set(out: &mut Vec<u8>, name: &[u8], key: &[u8], meta: &Meta, payload: &[u8], seq: u64) {
    let meta = Meta {
        length: payload.len() as u64,
        checksum: checksum(payload),
        ..meta.clone()
    };
    let meta = record::encode_meta(&meta);
    let header = Header::new(Kind::Object, key, &meta, payload.len() as u64, seq);
    let len = HEADER_LEN + key.len() + meta.len() + payload.len();
    out.reserve(len + name.len() + 48);
    let mut head = String::with_capacity(48);
    let _ = write!(head, "*3\r\n$3\r\nSET\r\n${}\r\n", name.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(name);
    head.clear();
    let _ = write!(head, "\r\n${len}\r\n");
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&meta);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `url` with the password (of the user part, or a `pass=` query
/// parameter) replaced by `***`.
fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (user_info, host) = authority.split_at(at);
            match user_info.find(':') {
                Some(colon) => format!("{}:***{host}", &user_info[..colon]),
                None => authority.to_string(),
            }
        }
        None => authority.to_string(),
    };
    let tail = match tail.find('?') {
        Some(q) => {
            let (path, query) = tail.split_at(q + 1);
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _))
                        if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
                    {
                        format!("{k}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
}

/// Connections to one server: up to `max` open, idle ones kept for reuse.
struct Pool {
    client: redis::Client,
    state: Mutex<PoolState>,
    freed: Condvar,
    max: usize,
    timeout: Duration,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<redis::Connection>,
    /// Connections open: idle and leased.
    open: usize,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state is a list and a count, consistent at every unlock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection, a new one when fewer than `max` are open, or
    /// one freed by another thread within the timeout.
    fn take(&self) -> redis::RedisResult<Lease<'_>> {
        let deadline = Instant::now() + self.timeout;
        let mut state = self.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(Lease::new(self, conn, true));
            }
            if state.open < self.max {
                state.open += 1;
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "all {} connections stayed busy for {:?}",
                        self.max, self.timeout
                    ),
                )));
            }
            state = self
                .freed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(state);
        match self.connect() {
            Ok(conn) => Ok(Lease::new(self, conn, false)),
            Err(e) => {
                self.close(false);
                Err(e)
            }
        }
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let conn = self.client.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(conn)
    }

    fn give_back(&self, conn: redis::Connection) {
        self.lock().idle.push(conn);
        self.freed.notify_one();
    }

    /// Forgets a leased connection that was closed; with `idle`, closes
    /// the idle ones too (a broken connection usually means they all are).
    fn close(&self, idle: bool) {
        let mut state = self.lock();
        state.open = state.open.saturating_sub(1);
        if idle {
            let n = state.idle.len();
            state.idle.clear();
            state.open = state.open.saturating_sub(n);
        }
        drop(state);
        self.freed.notify_all();
    }
}

/// A connection out of the pool. It goes back when dropped, unless a
/// command on it failed at the I/O level (or panicked): then it is closed.
struct Lease<'a> {
    pool: &'a Pool,
    conn: Option<redis::Connection>,
    reused: bool,
    broken: bool,
}

impl<'a> Lease<'a> {
    fn new(pool: &'a Pool, conn: redis::Connection, reused: bool) -> Lease<'a> {
        Lease {
            pool,
            conn: Some(conn),
            reused,
            broken: false,
        }
    }

    fn attempt<T>(
        &mut self,
        op: &mut impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(RedisError::from(std::io::Error::other("connection closed")));
        };
        // Counted broken until the command is known to have left it sane.
        self.broken = true;
        let result = op(conn);
        self.broken = match &result {
            Ok(_) => !conn.is_open(),
            // A server error reply leaves the connection in step.
            Err(e) => {
                e.is_io_error() || !conn.is_open() || e.kind() == redis::ErrorKind::ParseError
            }
        };
        result
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.broken {
                drop(conn);
                self.pool.close(true);
            } else {
                self.pool.give_back(conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:secret@host:1", "redis://:***@host:1"),
            ("redis://user:secret@host:1/2", "redis://user:***@host:1/2"),
            ("redis://user@host", "redis://user@host"),
            ("redis://:p@ss@host", "redis://:***@host"),
            (
                "redis+unix:///tmp/r.sock?db=1&pass=secret",
                "redis+unix:///tmp/r.sock?db=1&pass=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown);
        }
    }

    #[test]
    fn a_packed_set_carries_the_shared_record_format() {
        let meta = Meta {
            dtype: "bf16".into(),
            shape: vec![2],
            ..Meta::default()
        };
        let mut packed = Vec::new();
        pack_set(&mut packed, b"strata:ab", b"key", &meta, b"payload", 9);
        let full = Meta {
            length: 7,
            checksum: checksum(b"payload"),
            ..meta
        };
        let rec = record::encode(Kind::Object, b"key", &full, b"payload", 9);
        let mut expected =
            format!("*3\r\n$3\r\nSET\r\n$9\r\nstrata:ab\r\n${}\r\n", rec.len()).into_bytes();
        expected.extend_from_slice(&rec);
        expected.extend_from_slice(b"\r\n");
        assert_eq!(packed, expected);
    }
}
