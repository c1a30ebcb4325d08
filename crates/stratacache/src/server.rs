//! The store server: any [`Tier`] served to many processes over TCP or a
//! Unix socket, in the protocol of [`crate::remote`].
//!
//! # Design
//!
//! One accepting thread and one thread per connection (std threads: the
//! work is a store call and a socket copy, and a connection carries one
//! request at a time). The served store is shared (`Arc<dyn Tier>`); it is
//! the store's job to be safe under threads, as every tier is.
//!
//! A connection that breaks the protocol (bad magic or version, a frame
//! over the limit, fields that do not add up, an unknown opcode) is
//! answered with an error frame when possible and closed; the server and
//! every other connection go on. Errors of the store itself (full, corrupt,
//! I/O) are answered with their status and the connection stays.
//!
//! Shutdown ([`ServerHandle::shutdown`], [`Server::shutdown`]) sets a flag
//! and wakes the blocked `accept` by connecting to the listener; then the
//! server shuts down every open connection's socket (which ends its thread
//! at its next read), joins the threads, and removes its Unix socket file.
//! A request being served when shutdown comes is finished or cut; either
//! way the store itself stays consistent, since a failed tier call leaves
//! the tier as it was.
//!
//! [`ServerStats`] counts connections, requests, bytes and errors, for a
//! metrics endpoint.

use std::collections::HashMap;
use std::io::{self, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::record::{decode_meta, encode_meta};
use crate::remote::{
    DEFAULT_MAX_FRAME, Endpoint, FrameIn, FrameOut, MAGIC, PROTOCOL_VERSION, Stream, WireError,
    error_status, op, read_header, status,
};
use crate::tier::{Meta, Object, Tier};
use crate::{ArtifactKey, Error, Result};

/// A bound socket a server accepts connections on.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix domain socket.
    Unix(UnixListener),
}

impl Listener {
    /// Binds `addr`: `tcp://HOST:PORT`, `HOST:PORT` (port 0 picks a free
    /// one) or `unix:///path`. A Unix socket file left by a server that is
    /// gone (nothing accepts on it) is replaced; one in use is an error.
    pub fn bind(addr: &str) -> Result<Listener> {
        let io_err = |source| Error::Io {
            tier: "server".into(),
            op: "binding",
            path: addr.to_string(),
            source,
        };
        match Endpoint::parse(addr)? {
            Endpoint::Tcp(hp) => Ok(Listener::Tcp(TcpListener::bind(hp).map_err(io_err)?)),
            Endpoint::Unix(path) => match UnixListener::bind(&path) {
                Ok(l) => Ok(Listener::Unix(l)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    let stale = matches!(
                        UnixStream::connect(&path),
                        Err(c) if c.kind() == io::ErrorKind::ConnectionRefused
                    );
                    if !stale {
                        return Err(io_err(e));
                    }
                    std::fs::remove_file(&path).map_err(io_err)?;
                    Ok(Listener::Unix(UnixListener::bind(&path).map_err(io_err)?))
                }
                Err(e) => Err(io_err(e)),
            },
        }
    }

    /// The address clients connect to: `tcp://IP:PORT` (with the port the
    /// system picked) or `unix:///path`.
    pub fn local_addr(&self) -> Result<String> {
        Ok(self.endpoint()?.to_string())
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let io_err = |source| Error::Io {
            tier: "server".into(),
            op: "reading the address of",
            path: "the listener".into(),
            source,
        };
        match self {
            Listener::Tcp(l) => Ok(Endpoint::Tcp(l.local_addr().map_err(io_err)?.to_string())),
            Listener::Unix(l) => {
                let a = l.local_addr().map_err(io_err)?;
                let path = a.as_pathname().ok_or_else(|| Error::Config {
                    field: "listener".into(),
                    message: "an unnamed Unix socket cannot be served".into(),
                })?;
                Ok(Endpoint::Unix(path.to_path_buf()))
            }
        }
    }

    /// Where to connect to wake a blocked `accept`: the loopback address
    /// when bound to every interface.
    fn wake_endpoint(&self) -> Result<Endpoint> {
        match (self, self.endpoint()?) {
            (Listener::Tcp(l), _) => {
                let mut a = l.local_addr().map_err(|source| Error::Io {
                    tier: "server".into(),
                    op: "reading the address of",
                    path: "the listener".into(),
                    source,
                })?;
                if a.ip().is_unspecified() {
                    a = match a {
                        SocketAddr::V4(v) => {
                            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, v.port()))
                        }
                        SocketAddr::V6(v) => {
                            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v.port()))
                        }
                    };
                }
                Ok(Endpoint::Tcp(a.to_string()))
            }
            (Listener::Unix(_), e) => Ok(e),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Requests are small and latency-bound; Nagle would hold
                // each reply for the peer's delayed ACK.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }
}

/// How a server serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The largest request body accepted; a larger frame is answered
    /// TOO_LARGE and its connection closed. Default 4 GiB.
    pub max_frame: u64,
    /// Connections served at once; one more is answered with an error and
    /// closed. Default 1024.
    pub max_connections: usize,
    /// How long a new connection may take to send its handshake, and a
    /// reply may wait for the client to read it; a client slower than this
    /// is dropped, so it cannot hold a thread forever. Idle connections
    /// between requests are kept however long. Default 30 s.
    pub timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 1024,
            timeout: Duration::from_secs(30),
        }
    }
}

/// A server's counters since it started, for a metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections_accepted: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Requests received (including those answered with an error status
    /// and malformed ones).
    pub requests: u64,
    /// Bytes received: handshakes and whole frames.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Requests answered with an error status (full, corrupt, ...).
    pub error_replies: u64,
    /// Connections closed for breaking the protocol or failing I/O (a
    /// clean close by the client is not counted), and failed accepts.
    pub errors: u64,
}

/// Controls a running [`serve`] from other threads: asks it to stop and
/// reads its counters. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    wake: Mutex<Option<Endpoint>>,
    live: Mutex<HashMap<u64, Stream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    open: AtomicU64,
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    error_replies: AtomicU64,
    errors: AtomicU64,
}

/// Locks a mutex whose data a panic cannot leave half-changed (plain
/// inserts and removals).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ServerHandle {
    /// A handle for a server not started yet.
    pub fn new() -> ServerHandle {
        ServerHandle::default()
    }

    /// Asks the server to stop: [`serve`] closes every connection and
    /// returns. Returns at once; does nothing the second time.
    pub fn shutdown(&self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        let wake = lock(&self.shared.wake).clone();
        // A connection wakes the blocked accept; the server sees the flag
        // and closes it. If it fails, the server is not accepting anyway.
        match wake {
            Some(Endpoint::Tcp(a)) => drop(TcpStream::connect(a)),
            Some(Endpoint::Unix(p)) => drop(UnixStream::connect(p)),
            None => {}
        }
    }

    /// Whether [`ServerHandle::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    /// The counters now.
    pub fn stats(&self) -> ServerStats {
        let s = &self.shared;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            connections_accepted: get(&s.accepted),
            connections_open: get(&s.open),
            requests: get(&s.requests),
            bytes_in: get(&s.bytes_in),
            bytes_out: get(&s.bytes_out),
            error_replies: get(&s.error_replies),
            errors: get(&s.errors),
        }
    }
}

/// Serves `store` on `listener` in the calling thread until
/// `handle.shutdown()`; then closes every connection, waits for their
/// threads and returns. A Unix socket file is removed on return.
pub fn serve(
    listener: Listener,
    store: Arc<dyn Tier>,
    options: ServeOptions,
    handle: &ServerHandle,
) -> Result<()> {
    let shared = &handle.shared;
    *lock(&shared.wake) = Some(listener.wake_endpoint()?);
    let options = Arc::new(options);
    // Checked after the wake address is set: a shutdown before it found
    // none to poke, so it must be seen here.
    while !handle.is_shut_down() {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(_) if handle.is_shut_down() => break,
            Err(_) => {
                // Out of descriptors or a connection reset before accept:
                // pause rather than spin, and go on.
                shared.errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if handle.is_shut_down() {
            break;
        }
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.live).insert(id, clone);
        }
        shared.open.fetch_add(1, Ordering::Relaxed);
        let over = lock(&shared.live).len() > options.max_connections;
        let (store, options, h) = (store.clone(), options.clone(), handle.clone());
        let spawned = std::thread::Builder::new()
            .name("strata-conn".into())
            .spawn(move || {
                let sh = &h.shared;
                connection(stream, &*store, &options, sh, over);
                lock(&sh.live).remove(&id);
                sh.open.fetch_sub(1, Ordering::Relaxed);
            });
        let mut threads = lock(&shared.threads);
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => {
                if let Some(s) = lock(&shared.live).remove(&id) {
                    s.shutdown();
                }
                shared.open.fetch_sub(1, Ordering::Relaxed);
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    for s in lock(&shared.live).values() {
        s.shutdown();
    }
    let threads = std::mem::take(&mut *lock(&shared.threads));
    for t in threads {
        // A connection thread that panicked has nothing left to clean.
        let _ = t.join();
    }
    if let Listener::Unix(l) = &listener
        && let Some(p) = l
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(PathBuf::from))
    {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// A server running [`serve`] in its own thread.
#[derive(Debug)]
pub struct Server {
    addr: String,
    handle: ServerHandle,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Server {
    /// Starts serving `store` on `listener` in a new thread.
    pub fn start(
        listener: Listener,
        store: Arc<dyn Tier>,
        options: ServeOptions,
    ) -> Result<Server> {
        let addr = listener.local_addr()?;
        let handle = ServerHandle::new();
        let h = handle.clone();
        let thread = std::thread::Builder::new()
            .name("strata-accept".into())
            .spawn(move || serve(listener, store, options, &h))
            .map_err(|source| Error::Io {
                tier: "server".into(),
                op: "starting the thread of",
                path: addr.clone(),
                source,
            })?;
        Ok(Server {
            addr,
            handle,
            thread: Some(thread),
        })
    }

    /// The address clients connect to (`tcp://IP:PORT` or `unix:///path`).
    pub fn local_addr(&self) -> &str {
        &self.addr
    }

    /// The counters now.
    pub fn stats(&self) -> ServerStats {
        self.handle.stats()
    }

    /// A handle to stop the server from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Stops the server and waits until every connection is closed.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        self.handle.shutdown();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Remote {
                tier: format!("server {}", self.addr),
                message: "the accepting thread panicked".into(),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ---------------------------------------------------------------------------
// One connection.

type In<'r> = FrameIn<'r, BufReader<Stream>>;

/// Serves one connection until it closes, counting it in `errors` unless
/// the client closed it cleanly.
fn connection(stream: Stream, store: &dyn Tier, options: &ServeOptions, sh: &Shared, over: bool) {
    let Ok(mut writer) = stream.try_clone() else {
        sh.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    if run(&mut reader, &mut writer, store, options, sh, over).is_err() {
        // Counted before the peer can see the close.
        sh.errors.fetch_add(1, Ordering::Relaxed);
        linger(&mut reader, &writer);
    }
}

/// Before closing on an error, lets the error frame reach the peer: close
/// our side for writing and read what the peer still sends for a moment
/// (closing with unread bytes would reset the connection and could drop
/// the frame in flight).
fn linger(reader: &mut BufReader<Stream>, writer: &Stream) {
    let _ = match writer {
        Stream::Tcp(s) => s
            .shutdown(std::net::Shutdown::Write)
            .and_then(|()| s.set_read_timeout(Some(Duration::from_millis(200)))),
        Stream::Unix(s) => s
            .shutdown(std::net::Shutdown::Write)
            .and_then(|()| s.set_read_timeout(Some(Duration::from_millis(200)))),
    };
    let _ = io::copy(&mut reader.take(1 << 20), &mut io::sink());
}

fn send(
    frame: FrameOut<'_>,
    writer: &mut Stream,
    sh: &Shared,
) -> std::result::Result<(), WireError> {
    let n = frame.send(writer)?;
    sh.bytes_out.fetch_add(n, Ordering::Relaxed);
    Ok(())
}

fn error_frame(code: u8, tier: &str, key: &str, message: &str) -> FrameOut<'static> {
    let mut f = FrameOut::new(code);
    f.error(tier, key, message);
    f
}

fn run(
    reader: &mut BufReader<Stream>,
    writer: &mut Stream,
    store: &dyn Tier,
    options: &ServeOptions,
    sh: &Shared,
    over: bool,
) -> std::result::Result<(), WireError> {
    let timeout = Some(options.timeout).filter(|t| !t.is_zero());
    writer.set_timeouts(timeout, timeout)?;
    let mut hello = [0u8; 8];
    reader.read_exact(&mut hello)?;
    sh.bytes_in.fetch_add(8, Ordering::Relaxed);
    if hello[..4] != MAGIC {
        let m = format!(
            "not a stratacache client: magic {:02x?}, expected {:02x?} (\"SCRP\")",
            &hello[..4],
            MAGIC
        );
        send(error_frame(status::UNSUPPORTED, "", "", &m), writer, sh)?;
        return Err(WireError::Malformed(m));
    }
    let version = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]);
    if version != PROTOCOL_VERSION {
        let m = format!(
            "protocol version {version} is not supported; this server speaks version {PROTOCOL_VERSION}"
        );
        send(error_frame(status::UNSUPPORTED, "", "", &m), writer, sh)?;
        return Err(WireError::Malformed(m));
    }
    let mut limit = [0u8; 8];
    reader.read_exact(&mut limit)?;
    sh.bytes_in.fetch_add(8, Ordering::Relaxed);
    let client_max = u64::from_le_bytes(limit);
    if over {
        let m = format!(
            "the server is at its limit of {} connections",
            options.max_connections
        );
        send(error_frame(status::ERROR, "", "", &m), writer, sh)?;
        return Err(WireError::Malformed(m));
    }
    let mut ok = FrameOut::new(status::OK);
    ok.u32(PROTOCOL_VERSION);
    ok.u64(options.max_frame);
    send(ok, writer, sh)?;
    // Pooled client connections sit idle between requests.
    writer.set_timeouts(None, timeout)?;

    loop {
        let (code, len) = match read_header(reader, options.max_frame) {
            Ok(h) => h,
            Err(WireError::Eof) => return Ok(()),
            Err(e @ WireError::TooLarge { .. }) => {
                let m = e.to_string();
                send(error_frame(status::TOO_LARGE, "", "", &m), writer, sh)?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        sh.bytes_in.fetch_add(
            crate::remote::FRAME_HEADER_LEN as u64 + len,
            Ordering::Relaxed,
        );
        // Counted before the reply goes out, so that a client holding its
        // reply sees its request counted.
        sh.requests.fetch_add(1, Ordering::Relaxed);
        let body = FrameIn::new(reader, len);
        let out = Out {
            writer: &mut *writer,
            sh,
            client_max,
        };
        match request(code, body, store, out) {
            Ok(()) => {}
            Err(e @ WireError::Malformed(_)) => {
                let m = format!("{} request: {e}", op::name(code));
                let _ = send(error_frame(status::BAD_REQUEST, "", "", &m), writer, sh);
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Where a reply goes.
struct Out<'w> {
    writer: &'w mut Stream,
    sh: &'w Shared,
    client_max: u64,
}

impl Out<'_> {
    /// Sends `frame`, or TOO_LARGE when the client would refuse it.
    fn reply(self, frame: FrameOut<'_>) -> std::result::Result<(), WireError> {
        let len = frame.body_len();
        if len > self.client_max {
            let m = format!(
                "a reply of {len} bytes exceeds the client's frame limit of {} bytes",
                self.client_max
            );
            return self.status(status::TOO_LARGE, "", "", &m);
        }
        send(frame, self.writer, self.sh)
    }

    fn status(
        self,
        code: u8,
        tier: &str,
        key: &str,
        message: &str,
    ) -> std::result::Result<(), WireError> {
        self.sh.error_replies.fetch_add(1, Ordering::Relaxed);
        send(error_frame(code, tier, key, message), self.writer, self.sh)
    }

    fn error(self, e: &Error) -> std::result::Result<(), WireError> {
        let (code, tier, key, message) = error_status(e);
        self.status(code, &tier, &key, &message)
    }

    fn empty(self) -> std::result::Result<(), WireError> {
        self.reply(FrameOut::new(status::OK))
    }

    fn bool(self, v: bool) -> std::result::Result<(), WireError> {
        let mut f = FrameOut::new(status::OK);
        f.u8(u8::from(v));
        self.reply(f)
    }
}

fn decode_key(b: &[u8]) -> Result<ArtifactKey> {
    ArtifactKey::decode(b)
}

fn decode_meta_of(b: &[u8]) -> Result<Meta> {
    decode_meta(b).ok_or_else(|| Error::Decode {
        offset: 0,
        message: "metadata does not decode".into(),
    })
}

/// An item of GET_MANY or PUT_MANY as it goes into a reply.
fn item_error(f: &mut FrameOut<'_>, e: &Error) {
    let (code, tier, key, message) = error_status(e);
    f.u8(code);
    f.error(&tier, &key, &message);
}

/// Reads one request, calls the store, writes the reply. A malformed
/// request is an `Err` (the connection closes); a request that decodes
/// but fails is answered with its status.
fn request(
    code: u8,
    mut body: In<'_>,
    store: &dyn Tier,
    out: Out<'_>,
) -> std::result::Result<(), WireError> {
    match code {
        op::GET => {
            let key = body.bytes("the key")?;
            body.finish()?;
            match decode_key(&key).and_then(|k| store.get(&k)) {
                Ok(Some(o)) => {
                    let meta = encode_meta(&o.meta);
                    let mut f = FrameOut::new(status::OK);
                    f.bytes(&meta);
                    f.payload(&o.bytes);
                    out.reply(f)
                }
                Ok(None) => out.reply(FrameOut::new(status::NOT_FOUND)),
                Err(e) => out.error(&e),
            }
        }
        op::PUT => {
            let key = body.bytes("the key")?;
            let meta = body.bytes("the metadata")?;
            let payload = body.payload_vec("the payload")?;
            body.finish()?;
            let done = decode_key(&key)
                .and_then(|k| Ok((k, decode_meta_of(&meta)?)))
                .and_then(|(k, m)| store.put(&k, m, &payload));
            match done {
                Ok(()) => out.empty(),
                Err(e) => out.error(&e),
            }
        }
        op::CONTAINS | op::DELETE | op::PIN | op::UNPIN => {
            let key = body.bytes("the key")?;
            body.finish()?;
            let answer = decode_key(&key).and_then(|k| match code {
                op::CONTAINS => store.contains(&k),
                op::DELETE => store.delete(&k),
                op::PIN => store.pin(&k),
                _ => store.unpin(&k),
            });
            match answer {
                Ok(v) => out.bool(v),
                Err(e) => out.error(&e),
            }
        }
        op::STATS => {
            body.finish()?;
            let s = store.stats();
            let mut f = FrameOut::new(status::OK);
            for v in [
                s.objects,
                s.bytes,
                s.capacity_bytes,
                s.hits,
                s.misses,
                s.evictions,
            ] {
                f.u64(v);
            }
            out.reply(f)
        }
        op::LIST => {
            body.finish()?;
            let listed = store.list().and_then(|entries| {
                entries
                    .into_iter()
                    .map(|(k, m)| Ok((k.encode()?, encode_meta(&m))))
                    .collect::<Result<Vec<_>>>()
            });
            match listed {
                Ok(entries) => {
                    let mut f = FrameOut::new(status::OK);
                    f.u64(entries.len() as u64);
                    for (k, m) in &entries {
                        f.bytes(k);
                        f.bytes(m);
                    }
                    out.reply(f)
                }
                Err(e) => out.error(&e),
            }
        }
        op::FLUSH => {
            body.finish()?;
            match store.flush() {
                Ok(()) => out.empty(),
                Err(e) => out.error(&e),
            }
        }
        op::NAME => {
            body.finish()?;
            let mut f = FrameOut::new(status::OK);
            f.str(store.name());
            f.u8(u8::from(store.can_pin()));
            out.reply(f)
        }
        op::GET_MANY => {
            let n = body.u32("the count")?;
            let mut raw = Vec::new();
            for _ in 0..n {
                raw.push(body.bytes("a key")?);
            }
            body.finish()?;
            let decoded: Vec<Result<ArtifactKey>> = raw.iter().map(|k| decode_key(k)).collect();
            let keys: Vec<ArtifactKey> = decoded
                .iter()
                .filter_map(|k| k.as_ref().ok().cloned())
                .collect();
            let mut got = store.get_many(&keys).into_iter();
            let results: Vec<Result<Option<Object>>> = decoded
                .into_iter()
                .map(|k| match k {
                    Ok(_) => got.next().unwrap_or_else(|| {
                        Err(Error::Remote {
                            tier: store.name().to_string(),
                            message: "get_many returned fewer results than keys".into(),
                        })
                    }),
                    Err(e) => Err(e),
                })
                .collect();
            let metas: Vec<Option<Vec<u8>>> = results
                .iter()
                .map(|r| match r {
                    Ok(Some(o)) => Some(encode_meta(&o.meta)),
                    _ => None,
                })
                .collect();
            let mut f = FrameOut::new(status::OK);
            f.u32(n);
            for (r, meta) in results.iter().zip(&metas) {
                match (r, meta) {
                    (Ok(Some(o)), Some(meta)) => {
                        f.u8(status::OK);
                        f.bytes(meta);
                        f.payload(&o.bytes);
                    }
                    (Ok(_), _) => f.u8(status::NOT_FOUND),
                    (Err(e), _) => item_error(&mut f, e),
                }
            }
            out.reply(f)
        }
        op::PUT_MANY => {
            let n = body.u32("the count")?;
            let mut raw = Vec::new();
            for _ in 0..n {
                let key = body.bytes("a key")?;
                let meta = body.bytes("metadata")?;
                let payload = body.payload_vec("a payload")?;
                raw.push((key, meta, payload));
            }
            body.finish()?;
            let decoded: Vec<Result<(ArtifactKey, Meta)>> = raw
                .iter()
                .map(|(k, m, _)| Ok((decode_key(k)?, decode_meta_of(m)?)))
                .collect();
            let items: Vec<(ArtifactKey, Meta, &[u8])> = decoded
                .iter()
                .zip(&raw)
                .filter_map(|(d, (_, _, p))| {
                    d.as_ref()
                        .ok()
                        .map(|(k, m)| (k.clone(), m.clone(), p.as_slice()))
                })
                .collect();
            let mut put = store.put_many(&items).into_iter();
            let mut f = FrameOut::new(status::OK);
            f.u32(n);
            for d in &decoded {
                match d {
                    Ok(_) => match put.next() {
                        Some(Ok(())) => f.u8(status::OK),
                        Some(Err(e)) => item_error(&mut f, &e),
                        None => item_error(
                            &mut f,
                            &Error::Remote {
                                tier: store.name().to_string(),
                                message: "put_many returned fewer results than objects".into(),
                            },
                        ),
                    },
                    Err(e) => item_error(&mut f, e),
                }
            }
            out.reply(f)
        }
        other => {
            let m = format!("opcode {other} is not one of protocol version {PROTOCOL_VERSION}");
            out.status(status::UNSUPPORTED, "", "", &m)?;
            Err(WireError::Answered(m))
        }
    }
}
