//! The remote tier: one store shared by many processes over a socket.
//!
//! Tensor-parallel ranks, a scheduler and its workers live in different
//! processes but must see one store: what rank 0 wrote, rank 1 reads. The
//! store runs in one process behind a [`crate::server::Server`]; every other
//! process holds a [`RemoteTier`], which is itself a [`Tier`], so code
//! written against a local tier works unchanged against the shared one.
//!
//! # Design
//!
//! - A plain binary protocol over a byte stream (TCP or a Unix socket):
//!   one request, one response, in order, on each connection. No pipelining
//!   and no request ids: a connection is used by one caller at a time, and
//!   the client keeps a small pool of them for concurrency.
//! - Payloads are never copied into an intermediate buffer. A request or
//!   response is written as its small head followed by the payload slices
//!   themselves (vectored writes), and a payload is read straight into the
//!   shared buffer the caller receives ([`crate::shared_bytes`]).
//! - Every length read from the wire is checked against what is left of
//!   the frame, and the frame's length against a limit, before anything is
//!   allocated for it: a hostile or broken peer cannot make the other side
//!   allocate more than the limit.
//! - Errors cross the wire as a status and a message, and the client turns
//!   them back into the same [`Error`] variants a local tier returns
//!   ([`Error::Full`], [`Error::Corrupt`] with key and reason, and
//!   [`Error::Remote`] for everything else), so a caller cannot tell a
//!   remote tier's errors from a local one's. Every error names the
//!   server's address, and the served tier when it failed:
//!   `remote tcp://10.0.0.5:7070 memory tier: cannot store kv/...: ...`.
//! - Like every tier that keeps bytes outside process memory, the client
//!   computes the payload checksum on `put` and verifies it on `get`; a
//!   mismatch is [`Error::Corrupt`], the object is deleted from the server
//!   and a later `get` is a miss. An object stored with checksum 0 (put
//!   into the served store by its own process without one) is checked for
//!   its length only.
//!
//! # The protocol (version 1)
//!
//! All integers are little-endian.
//!
//! ## Handshake
//!
//! | who    | bytes | field                                                   |
//! |--------|-------|---------------------------------------------------------|
//! | client | 4     | magic `SCRP`                                            |
//! | client | 4     | protocol version (u32), 1                               |
//! | client | 8     | the client's frame limit (u64): largest body it accepts |
//! | server | frame | status OK, body: version (u32), the server's frame limit (u64) |
//! | server | frame | or status UNSUPPORTED with an error body, then it closes |
//!
//! The first 8 bytes (magic and version) stay the same in every future
//! version; what follows them may change with the version.
//!
//! ## Frames
//!
//! Every request and response after the handshake is one frame:
//!
//! | offset | size | field                                              |
//! |--------|------|----------------------------------------------------|
//! | 0      | 1    | code: the opcode (request) or the status (response) |
//! | 1      | 8    | body length L (u64), at most the receiver's limit  |
//! | 9      | L    | body: the fields below, in order, nothing left over |
//!
//! The limit is 4 GiB unless configured ([`RemoteOptions::max_frame`],
//! `ServeOptions::max_frame`); each side tells the other its limit in the
//! handshake, so a sender refuses a frame the receiver would reject. A
//! receiver that gets a frame over its limit answers TOO_LARGE (server)
//! and closes the connection.
//!
//! Field types:
//!
//! | type    | encoding                                                    |
//! |---------|-------------------------------------------------------------|
//! | u8, u32, u64 | little-endian                                          |
//! | bool    | u8, 0 or 1                                                  |
//! | str     | u32 length, UTF-8 bytes                                     |
//! | key     | u32 length, the canonical key encoding ([`ArtifactKey::encode`]) |
//! | meta    | u32 length, [`crate::record::encode_meta`]                  |
//! | payload | u64 length, the raw bytes                                   |
//! | error   | str tier (the served tier's name; empty when the message names it), str key (empty when none), str message |
//!
//! ## Requests
//!
//! | opcode | name     | request body              | OK response body                  |
//! |--------|----------|---------------------------|-----------------------------------|
//! | 1      | GET      | key                       | meta, payload (NOT_FOUND: empty)  |
//! | 2      | PUT      | key, meta, payload        | empty                             |
//! | 3      | CONTAINS | key                       | bool                              |
//! | 4      | DELETE   | key                       | bool: whether it was there        |
//! | 5      | STATS    | empty                     | u64 × 6: objects, bytes, capacity_bytes, hits, misses, evictions |
//! | 6      | LIST     | empty                     | u64 n, then n × (key, meta)       |
//! | 7      | FLUSH    | empty                     | empty                             |
//! | 8      | PIN      | key                       | bool: whether it is stored        |
//! | 9      | UNPIN    | key                       | bool: whether it is stored        |
//! | 10     | GET_MANY | u32 n, n × key            | u32 n, n × item: u8 status, then meta, payload (OK), nothing (NOT_FOUND) or error |
//! | 11     | PUT_MANY | u32 n, n × (key, meta, payload) | u32 n, n × item: u8 status, then error unless OK |
//! | 12     | NAME     | empty                     | str: the served tier's name, bool: whether it can pin |
//!
//! ## Statuses
//!
//! | status | name        | body  | meaning                                        | the client returns |
//! |--------|-------------|-------|------------------------------------------------|--------------------|
//! | 0      | OK          | as above | done                                        | the value          |
//! | 1      | NOT_FOUND   | empty | GET of a missing key                           | `Ok(None)`         |
//! | 2      | FULL        | error | the served tier has no room                    | [`Error::Full`]    |
//! | 3      | CORRUPT     | error | the stored object failed its check, was dropped | [`Error::Corrupt`] |
//! | 4      | ERROR       | error | any other failure of the served tier           | [`Error::Remote`]  |
//! | 5      | BAD_REQUEST | error | a key or metadata that does not decode (the connection stays), or a malformed frame (the server closes) | [`Error::Remote`] |
//! | 6      | UNSUPPORTED | error | unknown version, magic or opcode; the server closes | [`Error::Remote`] |
//! | 7      | TOO_LARGE   | error | a frame over the limit; the server closes      | [`Error::Remote`]  |
//!
//! A frame that cannot be parsed (a length past the end of its frame,
//! bytes left over, an unknown opcode) leaves the stream out of step, so the
//! server answers it when it can and closes that connection only.
//!
//! # Connections and retries
//!
//! [`RemoteTier`] keeps up to [`RemoteOptions::connections`] idle
//! connections; a call takes one or opens a new one, and gives it back
//! after a complete exchange. A connection that failed mid-exchange (I/O
//! error, timeout, malformed reply) is dropped, never reused, together with
//! the idle ones (a server restart breaks them all). Calls whose repetition
//! is harmless (GET, PUT, CONTAINS, STATS, LIST, FLUSH, GET_MANY, PUT_MANY,
//! NAME) are retried once on a fresh connection; DELETE, PIN and UNPIN are
//! not, since a lost reply would hide whether they took effect. Instead,
//! before one of those is sent on an idle connection, the connection is
//! checked (a non-blocking peek): one the server has closed is dropped
//! and a new one opened.
//!
//! ```
//! use std::sync::Arc;
//! use stratacache::remote::{RemoteOptions, RemoteTier};
//! use stratacache::server::{Listener, ServeOptions, Server};
//! use stratacache::{CustomKey, ArtifactKey, MemoryTier, Meta, Tier};
//!
//! let server = Server::start(
//!     Listener::bind("127.0.0.1:0")?,
//!     Arc::new(MemoryTier::new(1 << 30, 16)),
//!     ServeOptions::default(),
//! )?;
//! let tier = RemoteTier::connect(server.local_addr(), RemoteOptions::default())?;
//! let key = ArtifactKey::Custom(CustomKey { namespace: "doc".into(), name: "a".into() });
//! tier.put(&key, Meta::default(), b"shared")?;
//! assert_eq!(&*tier.get(&key)?.unwrap().bytes, b"shared");
//! server.shutdown()?;
//! # Ok::<(), stratacache::Error>(())
//! ```

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::record::{decode_meta, encode_meta};
use crate::tier::{Meta, Object, Tier, TierStats, checksum, shared_bytes};
use crate::{ArtifactKey, Error, Result};

/// The first four bytes a client sends.
pub const MAGIC: [u8; 4] = *b"SCRP";

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The default frame limit of both sides: 4 GiB of body.
pub const DEFAULT_MAX_FRAME: u64 = 4 << 30;

/// Bytes of a frame header: the code and the body length.
pub const FRAME_HEADER_LEN: usize = 9;

/// Request opcodes (see the module documentation).
pub mod op {
    /// Read one object.
    pub const GET: u8 = 1;
    /// Store one object.
    pub const PUT: u8 = 2;
    /// Whether a key is stored.
    pub const CONTAINS: u8 = 3;
    /// Remove one object.
    pub const DELETE: u8 = 4;
    /// The served tier's counters.
    pub const STATS: u8 = 5;
    /// Every key with its metadata.
    pub const LIST: u8 = 6;
    /// Make what is stored durable.
    pub const FLUSH: u8 = 7;
    /// Pin a key.
    pub const PIN: u8 = 8;
    /// Undo one pin.
    pub const UNPIN: u8 = 9;
    /// Read many objects in one round trip.
    pub const GET_MANY: u8 = 10;
    /// Store many objects in one round trip.
    pub const PUT_MANY: u8 = 11;
    /// The served tier's name and whether it can pin.
    pub const NAME: u8 = 12;

    /// The opcode's name, for messages.
    pub fn name(code: u8) -> &'static str {
        match code {
            GET => "GET",
            PUT => "PUT",
            CONTAINS => "CONTAINS",
            DELETE => "DELETE",
            STATS => "STATS",
            LIST => "LIST",
            FLUSH => "FLUSH",
            PIN => "PIN",
            UNPIN => "UNPIN",
            GET_MANY => "GET_MANY",
            PUT_MANY => "PUT_MANY",
            NAME => "NAME",
            _ => "an unknown opcode",
        }
    }
}

/// Response statuses (see the module documentation).
pub mod status {
    /// Done.
    pub const OK: u8 = 0;
    /// The key is not stored.
    pub const NOT_FOUND: u8 = 1;
    /// The served tier has no room.
    pub const FULL: u8 = 2;
    /// The stored object failed its check and was dropped.
    pub const CORRUPT: u8 = 3;
    /// Any other failure of the served tier.
    pub const ERROR: u8 = 4;
    /// The request does not decode.
    pub const BAD_REQUEST: u8 = 5;
    /// Unknown version, magic or opcode.
    pub const UNSUPPORTED: u8 = 6;
    /// A frame over the receiver's limit.
    pub const TOO_LARGE: u8 = 7;
}

/// Payloads at least this long are written from the caller's buffer
/// (vectored) rather than copied into the frame head.
const INLINE_MAX: usize = 16 * 1024;

/// Read buffer of a connection: small fields come from it, large payloads
/// bypass it.
const READ_BUFFER: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// Addresses and streams, shared with the server.

/// Where a server listens: `tcp://HOST:PORT`, `HOST:PORT` or
/// `unix:///path` (`unix://rel/path` for a relative one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl Endpoint {
    pub(crate) fn parse(addr: &str) -> Result<Endpoint> {
        let bad = |message: String| Error::Config {
            field: "address".into(),
            message,
        };
        if let Some(path) = addr.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad(format!("{addr:?} names no socket path")));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let hostport = addr.strip_prefix("tcp://").unwrap_or(addr);
        match hostport.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp(hostport.to_string()))
            }
            _ => Err(bad(format!(
                "{addr:?} is not tcp://HOST:PORT, HOST:PORT or unix:///path"
            ))),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(hp) => write!(f, "tcp://{hp}"),
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// A connected socket of either family.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self) {
        // Already closed is as good as closed.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(crate) fn set_timeouts(
        &self,
        read: Option<Duration>,
        write: Option<Duration>,
    ) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Frames.

/// What went wrong reading or writing a frame.
#[derive(Debug)]
pub(crate) enum WireError {
    /// The socket failed.
    Io(io::Error),
    /// The peer closed the connection between frames.
    Eof,
    /// A frame over the limit.
    TooLarge { len: u64, max: u64 },
    /// A frame whose fields do not add up.
    Malformed(String),
    /// A request already answered with an error status after which the
    /// connection closes (an unknown opcode).
    Answered(String),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> WireError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Malformed("the connection closed inside a frame".into())
        } else {
            WireError::Io(e)
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "{e}"),
            WireError::Eof => write!(f, "the connection was closed"),
            WireError::TooLarge { len, max } => {
                write!(f, "a frame of {len} bytes exceeds the limit of {max} bytes")
            }
            WireError::Malformed(m) => write!(f, "malformed frame: {m}"),
            WireError::Answered(m) => write!(f, "{m}"),
        }
    }
}

/// One frame being built: a head of small fields, with large payloads
/// spliced in by reference so they are written from where they lie.
pub(crate) struct FrameOut<'a> {
    head: Vec<u8>,
    /// `(offset in head, slice)`: the slice goes after `head[..offset]`.
    splices: Vec<(usize, &'a [u8])>,
    spliced: u64,
}

impl<'a> FrameOut<'a> {
    pub(crate) fn new(code: u8) -> FrameOut<'a> {
        let mut head = Vec::with_capacity(256);
        head.push(code);
        head.extend_from_slice(&[0; 8]);
        FrameOut {
            head,
            splices: Vec::new(),
            spliced: 0,
        }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.head.push(v);
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.head.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.head.extend_from_slice(&v.to_le_bytes());
    }

    /// A u32-length-prefixed field (key, meta, str). Such fields are small
    /// (keys are bounded by their encoding, strings are names and
    /// messages); longer ones are cut, which a reader then rejects.
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        let n = b.len().min(u32::MAX as usize);
        self.u32(n as u32);
        self.head.extend_from_slice(&b[..n]);
    }

    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub(crate) fn payload(&mut self, p: &'a [u8]) {
        self.u64(p.len() as u64);
        if p.len() < INLINE_MAX {
            self.head.extend_from_slice(p);
        } else {
            self.splices.push((self.head.len(), p));
            self.spliced += p.len() as u64;
        }
    }

    pub(crate) fn error(&mut self, tier: &str, key: &str, message: &str) {
        self.str(tier);
        self.str(key);
        self.str(message);
    }

    /// Body bytes so far.
    pub(crate) fn body_len(&self) -> u64 {
        (self.head.len() - FRAME_HEADER_LEN) as u64 + self.spliced
    }

    /// Writes the frame; returns the bytes written.
    pub(crate) fn send(mut self, w: &mut impl Write) -> io::Result<u64> {
        let body = self.body_len();
        self.head[1..FRAME_HEADER_LEN].copy_from_slice(&body.to_le_bytes());
        let mut slices = Vec::with_capacity(2 * self.splices.len() + 1);
        let mut at = 0;
        for &(offset, p) in &self.splices {
            slices.push(IoSlice::new(&self.head[at..offset]));
            slices.push(IoSlice::new(p));
            at = offset;
        }
        slices.push(IoSlice::new(&self.head[at..]));
        write_all_vectored(w, &mut slices)?;
        w.flush()?;
        Ok(FRAME_HEADER_LEN as u64 + body)
    }
}

fn write_all_vectored(w: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a frame header: the code and the body length, checked against
/// `max`. A clean close before the first byte is [`WireError::Eof`].
pub(crate) fn read_header(
    r: &mut impl Read,
    max: u64,
) -> std::result::Result<(u8, u64), WireError> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < h.len() {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(WireError::Eof),
            Ok(0) => {
                return Err(WireError::Malformed(
                    "the connection closed inside a frame header".into(),
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&h[1..]);
    let len = u64::from_le_bytes(len);
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    Ok((h[0], len))
}

/// The body of one frame being read field by field; every length is
/// checked against what is left of the body before anything is allocated.
pub(crate) struct FrameIn<'r, R> {
    r: &'r mut R,
    left: u64,
}

impl<'r, R: Read> FrameIn<'r, R> {
    pub(crate) fn new(r: &'r mut R, len: u64) -> FrameIn<'r, R> {
        FrameIn { r, left: len }
    }

    fn claim(&mut self, n: u64, what: &str) -> std::result::Result<usize, WireError> {
        if n > self.left {
            return Err(WireError::Malformed(format!(
                "{what} of {n} bytes runs past the end of its frame ({} bytes left)",
                self.left
            )));
        }
        self.left -= n;
        usize::try_from(n).map_err(|_| WireError::Malformed(format!("{what} of {n} bytes")))
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], WireError> {
        self.claim(N as u64, what)?;
        let mut a = [0u8; N];
        self.r.read_exact(&mut a)?;
        Ok(a)
    }

    pub(crate) fn u8(&mut self, what: &str) -> std::result::Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn bool(&mut self, what: &str) -> std::result::Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::Malformed(format!("{what} is {v}, not 0 or 1"))),
        }
    }

    pub(crate) fn u32(&mut self, what: &str) -> std::result::Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &str) -> std::result::Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn vec(&mut self, n: u64, what: &str) -> std::result::Result<Vec<u8>, WireError> {
        let n = self.claim(n, what)?;
        // Sized by a checked length. A large zeroed allocation comes from
        // fresh zero pages (no memset), and `read_exact` then reads past
        // the buffer straight into it.
        let mut v = vec![0u8; n];
        self.r.read_exact(&mut v)?;
        Ok(v)
    }

    /// A u32-length-prefixed field.
    pub(crate) fn bytes(&mut self, what: &str) -> std::result::Result<Vec<u8>, WireError> {
        let n = self.u32(what)?;
        self.vec(u64::from(n), what)
    }

    pub(crate) fn str(&mut self, what: &str) -> std::result::Result<String, WireError> {
        String::from_utf8(self.bytes(what)?)
            .map_err(|_| WireError::Malformed(format!("{what} is not UTF-8")))
    }

    /// A payload into a plain vector (the server's side of a PUT).
    pub(crate) fn payload_vec(&mut self, what: &str) -> std::result::Result<Vec<u8>, WireError> {
        let n = self.u64(what)?;
        self.vec(n, what)
    }

    /// A payload straight into the shared buffer a caller receives.
    pub(crate) fn payload_shared(
        &mut self,
        what: &str,
    ) -> std::result::Result<Arc<[u8]>, WireError> {
        let n = self.u64(what)?;
        let n = self.claim(n, what)?;
        let r = &mut *self.r;
        shared_bytes(n, |buf| r.read_exact(buf)).map_err(WireError::from)
    }

    /// An error body: tier, key, message.
    pub(crate) fn error(&mut self) -> std::result::Result<(String, String, String), WireError> {
        Ok((
            self.str("the error's tier")?,
            self.str("the error's key")?,
            self.str("the error message")?,
        ))
    }

    /// Checks that the whole body was read.
    pub(crate) fn finish(self) -> std::result::Result<(), WireError> {
        if self.left != 0 {
            return Err(WireError::Malformed(format!(
                "{} bytes left over at the end of the frame",
                self.left
            )));
        }
        Ok(())
    }
}

/// The status and error body that stand for `e` on the wire.
pub(crate) fn error_status(e: &Error) -> (u8, String, String, String) {
    match e {
        Error::Full { tier, key, message } => {
            (status::FULL, tier.clone(), key.clone(), message.clone())
        }
        Error::Corrupt { tier, key, reason } => {
            (status::CORRUPT, tier.clone(), key.clone(), reason.clone())
        }
        Error::Key { .. } | Error::Decode { .. } | Error::Plan { .. } => (
            status::BAD_REQUEST,
            String::new(),
            String::new(),
            e.to_string(),
        ),
        Error::NotFound { key, .. } => (status::ERROR, String::new(), key.clone(), e.to_string()),
        // The message names its tier (and file) already.
        Error::Io { .. }
        | Error::Remote { .. }
        | Error::Config { .. }
        | Error::Closed { .. }
        | Error::Flush { .. } => (status::ERROR, String::new(), String::new(), e.to_string()),
    }
}

// ---------------------------------------------------------------------------
// The client.

/// How a [`RemoteTier`] connects.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Idle connections kept for reuse (at least 1). More calls at once
    /// than this open more connections, closed after use.
    pub connections: usize,
    /// Limit of each connect, read and write; a call that exceeds it fails
    /// and its connection is dropped.
    pub timeout: Duration,
    /// The largest response body accepted (a response over it is refused
    /// by the server with TOO_LARGE, never sent).
    pub max_frame: u64,
}

impl Default for RemoteOptions {
    fn default() -> RemoteOptions {
        RemoteOptions {
            connections: 4,
            timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// A tier whose objects live in a store server (see the module
/// documentation): a pool of connections speaking the protocol above.
#[derive(Debug)]
pub struct RemoteTier {
    endpoint: Endpoint,
    /// `remote tcp://HOST:PORT`, the tier named in every error.
    label: String,
    options: RemoteOptions,
    idle: Mutex<Vec<Conn>>,
    served_name: String,
    can_pin: bool,
}

#[derive(Debug)]
struct Conn {
    reader: BufReader<Stream>,
    writer: Stream,
    /// The server's frame limit, from the handshake.
    server_max: u64,
}

/// Why a call failed.
enum Fail {
    /// The connection is unusable: drop it; the call may be retried.
    Broken(String),
    /// The server answered with an error status; `keep` says whether the
    /// connection is still in step (the server closes after some).
    Refused { err: Error, keep: bool },
}

impl From<WireError> for Fail {
    fn from(e: WireError) -> Fail {
        Fail::Broken(e.to_string())
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        Fail::Broken(e.to_string())
    }
}

type Reply<'c> = FrameIn<'c, BufReader<Stream>>;

impl Conn {
    fn open(endpoint: &Endpoint, options: &RemoteOptions) -> std::result::Result<Conn, Fail> {
        let stream = match endpoint {
            Endpoint::Tcp(hp) => {
                let mut last = None;
                let mut found = None;
                for sa in hp.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, options.timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = match (found, last) {
                    (Some(s), _) => s,
                    (None, Some(e)) => return Err(e.into()),
                    (None, None) => {
                        return Err(Fail::Broken(format!("{hp} resolves to no address")));
                    }
                };
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
        };
        stream.set_timeouts(Some(options.timeout), Some(options.timeout))?;
        let mut writer = stream.try_clone()?;
        let mut hello = [0u8; 16];
        hello[..4].copy_from_slice(&MAGIC);
        hello[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello[8..].copy_from_slice(&options.max_frame.to_le_bytes());
        writer.write_all(&hello)?;
        let mut conn = Conn {
            reader: BufReader::with_capacity(READ_BUFFER, stream),
            writer,
            server_max: 0,
        };
        let (code, mut body) = conn.recv(options.max_frame.max(1 << 16))?;
        if code != status::OK {
            let (_, _, message) = body.error()?;
            return Err(Fail::Refused {
                err: Error::Remote {
                    tier: String::new(),
                    message: format!("handshake refused: {message}"),
                },
                keep: false,
            });
        }
        let version = body.u32("the version")?;
        let server_max = body.u64("the frame limit")?;
        body.finish()?;
        if version != PROTOCOL_VERSION {
            return Err(Fail::Broken(format!(
                "the server answered with protocol version {version}, expected {PROTOCOL_VERSION}"
            )));
        }
        conn.server_max = server_max;
        Ok(conn)
    }

    /// Whether an idle connection is unusable: closed by the server, or
    /// holding bytes nobody asked for.
    fn is_stale(&self) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let mut b = [0u8; 1];
        // The flag is the socket's, shared by the reader and writer
        // handles; it is set back before the connection is used.
        let peeked = match &self.writer {
            Stream::Tcp(s) => s.set_nonblocking(true).and_then(|()| s.peek(&mut b)),
            // No stable `peek` for Unix streams; an idle connection that
            // reads anything is closed or out of step either way.
            Stream::Unix(s) => s.set_nonblocking(true).and_then(|()| (&*s).read(&mut b)),
        };
        let alive = matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        let restored = match &self.writer {
            Stream::Tcp(s) => s.set_nonblocking(false),
            Stream::Unix(s) => s.set_nonblocking(false),
        };
        !alive || restored.is_err()
    }

    fn send(&mut self, frame: FrameOut<'_>) -> std::result::Result<(), Fail> {
        let len = frame.body_len();
        if len > self.server_max {
            return Err(Fail::Refused {
                err: Error::Remote {
                    tier: String::new(),
                    message: format!(
                        "a request of {len} bytes exceeds the server's frame limit of {} bytes",
                        self.server_max
                    ),
                },
                keep: true,
            });
        }
        frame.send(&mut self.writer)?;
        Ok(())
    }

    fn recv(&mut self, max: u64) -> std::result::Result<(u8, Reply<'_>), Fail> {
        let (code, len) = read_header(&mut self.reader, max)?;
        Ok((code, FrameIn::new(&mut self.reader, len)))
    }
}

impl RemoteTier {
    /// Connects to the store server at `addr` (`tcp://HOST:PORT`,
    /// `HOST:PORT` or `unix:///path`): opens one connection (which fails
    /// fast when no server answers or it speaks another version) and asks
    /// the served tier's name.
    pub fn connect(addr: &str, options: RemoteOptions) -> Result<RemoteTier> {
        if options.connections == 0 {
            return Err(Error::Config {
                field: "remote.connections".into(),
                message: "must be at least 1".into(),
            });
        }
        if options.timeout.is_zero() {
            return Err(Error::Config {
                field: "remote.timeout".into(),
                message: "must be more than zero".into(),
            });
        }
        let endpoint = Endpoint::parse(addr)?;
        let label = format!("remote {endpoint}");
        let mut tier = RemoteTier {
            endpoint,
            label,
            options,
            idle: Mutex::new(Vec::new()),
            served_name: String::new(),
            can_pin: false,
        };
        let (name, can_pin) = tier.call(op::NAME, &"", true, |conn, max| {
            conn.send(FrameOut::new(op::NAME))?;
            let mut r = ok_reply_or(&tier, conn, max)?;
            let name = r.str("the name")?;
            let can_pin = r.bool("the pin flag")?;
            r.finish()?;
            Ok((name, can_pin))
        })?;
        tier.served_name = name;
        tier.can_pin = can_pin;
        Ok(tier)
    }

    /// The server's address, as `tcp://HOST:PORT` or `unix:///path`.
    pub fn addr(&self) -> String {
        self.endpoint.to_string()
    }

    /// The name of the tier the server serves (e.g. `memory`).
    pub fn served_name(&self) -> &str {
        &self.served_name
    }

    fn pool(&self) -> MutexGuard<'_, Vec<Conn>> {
        // The pool is a plain list; a panic cannot leave it half-changed.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn err(&self, message: String) -> Error {
        Error::Remote {
            tier: self.label.clone(),
            message,
        }
    }

    /// Runs one exchange on a pooled or new connection, retrying once on a
    /// fresh one when the connection breaks and `retry` allows it. `what`
    /// (the key, or "" for none) is formatted only for an error.
    fn call<T>(
        &self,
        code: u8,
        what: &dyn std::fmt::Display,
        retry: bool,
        f: impl Fn(&mut Conn, u64) -> std::result::Result<T, Fail>,
    ) -> Result<T> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut pooled = self.pool().pop();
            // A call that cannot be retried must not be spent on a
            // connection the server already closed (a restart): check.
            if !retry && pooled.as_ref().is_some_and(Conn::is_stale) {
                pooled = None;
                self.pool().clear();
            }
            let mut conn = match pooled {
                Some(c) => c,
                None => match Conn::open(&self.endpoint, &self.options) {
                    Ok(c) => c,
                    Err(fail) => {
                        return Err(self.failure(code, what, fail, "connecting"));
                    }
                },
            };
            match f(&mut conn, self.options.max_frame) {
                Ok(v) => {
                    self.give_back(conn);
                    return Ok(v);
                }
                Err(Fail::Refused { err, keep }) => {
                    if keep {
                        self.give_back(conn);
                    }
                    return Err(self.failure(code, what, Fail::Refused { err, keep }, ""));
                }
                Err(Fail::Broken(m)) => {
                    drop(conn);
                    // A server restart breaks every idle connection too.
                    self.pool().clear();
                    if !(retry && attempt == 1) {
                        return Err(self.failure(code, what, Fail::Broken(m), "connection lost"));
                    }
                }
            }
        }
    }

    fn give_back(&self, conn: Conn) {
        let mut pool = self.pool();
        if pool.len() < self.options.connections {
            pool.push(conn);
        }
    }

    fn failure(&self, code: u8, what: &dyn std::fmt::Display, fail: Fail, context: &str) -> Error {
        let what = what.to_string();
        let call = if what.is_empty() {
            op::name(code).to_string()
        } else {
            format!("{} {what}", op::name(code))
        };
        match fail {
            Fail::Broken(m) => self.err(format!("{call}: {context}: {m}")),
            // Errors built by `Conn` leave the tier empty for us to name.
            Fail::Refused {
                err: Error::Remote { tier, message },
                ..
            } if tier.is_empty() => self.err(format!("{call}: {message}")),
            Fail::Refused { err, .. } => err,
        }
    }

    /// The error a status and error body stand for.
    fn remote_error(&self, code: u8, tier: String, key: String, message: String) -> Error {
        let tier = if tier.is_empty() {
            self.label.clone()
        } else {
            format!("{} {tier}", self.label)
        };
        match code {
            status::FULL => Error::Full { tier, key, message },
            status::CORRUPT => Error::Corrupt {
                tier,
                key,
                reason: message,
            },
            status::BAD_REQUEST => Error::Remote {
                tier,
                message: format!("the server refused the request: {message}"),
            },
            status::UNSUPPORTED => Error::Remote {
                tier,
                message: format!("unsupported by the server: {message}"),
            },
            status::TOO_LARGE => Error::Remote {
                tier,
                message: format!("too large for the server: {message}"),
            },
            _ => Error::Remote { tier, message },
        }
    }

    /// Reads an error body after status `code` and makes it a failure.
    fn refused(&self, code: u8, mut r: Reply<'_>) -> Fail {
        let body = r.error();
        let (tier, key, message) = match body {
            Ok(b) => b,
            Err(e) => return e.into(),
        };
        if let Err(e) = r.finish() {
            return e.into();
        }
        let keep = matches!(
            code,
            status::FULL | status::CORRUPT | status::ERROR | status::BAD_REQUEST
        );
        Fail::Refused {
            err: self.remote_error(code, tier, key, message),
            keep,
        }
    }

    /// Checks a payload read back against its metadata. On a mismatch the
    /// object is deleted from the server (best effort: the caller's error
    /// is the corruption, not the cleanup).
    fn verify(&self, key: &ArtifactKey, object: Object) -> Result<Object> {
        let len_ok = object.bytes.len() as u64 == object.meta.length;
        let reason = if !len_ok {
            Some(format!(
                "payload is {} bytes, metadata says {}",
                object.bytes.len(),
                object.meta.length
            ))
        } else if object.meta.checksum != 0 {
            let sum = checksum(&object.bytes);
            (sum != object.meta.checksum).then(|| {
                format!(
                    "payload checksum {sum:016x} does not match the stored {:016x}",
                    object.meta.checksum
                )
            })
        } else {
            None
        };
        match reason {
            None => Ok(object),
            Some(reason) => {
                let _ = self.delete(key);
                Err(Error::Corrupt {
                    tier: self.label.clone(),
                    key: key.to_string(),
                    reason,
                })
            }
        }
    }

    /// A key-only request answered with a bool.
    fn key_bool(&self, code: u8, key: &ArtifactKey, retry: bool) -> Result<bool> {
        let enc = key.encode()?;
        self.call(code, key, retry, |conn, max| {
            let mut f = FrameOut::new(code);
            f.bytes(&enc);
            conn.send(f)?;
            let mut r = ok_reply_or(self, conn, max)?;
            let v = r.bool("the answer")?;
            r.finish()?;
            Ok(v)
        })
    }
}

/// The reply, when its status is OK; else the error it carries.
fn ok_reply_or<'c>(
    tier: &RemoteTier,
    conn: &'c mut Conn,
    max: u64,
) -> std::result::Result<Reply<'c>, Fail> {
    let (code, r) = conn.recv(max)?;
    match code {
        status::OK => Ok(r),
        status::NOT_FOUND => Err(Fail::Broken("NOT_FOUND where none is possible".into())),
        other => Err(tier.refused(other, r)),
    }
}

fn meta_of(bytes: &[u8]) -> std::result::Result<Meta, WireError> {
    decode_meta(bytes).ok_or_else(|| WireError::Malformed("metadata does not decode".into()))
}

fn key_of(bytes: &[u8]) -> std::result::Result<ArtifactKey, WireError> {
    ArtifactKey::decode(bytes).map_err(|e| WireError::Malformed(format!("a listed key: {e}")))
}

/// One item of a GET_MANY reply.
fn read_got(
    tier: &RemoteTier,
    r: &mut Reply<'_>,
) -> std::result::Result<Result<Option<Object>>, Fail> {
    let code = r.u8("an item's status")?;
    Ok(match code {
        status::OK => {
            let meta = meta_of(&r.bytes("metadata")?)?;
            let bytes = r.payload_shared("a payload")?;
            Ok(Some(Object { meta, bytes }))
        }
        status::NOT_FOUND => Ok(None),
        other => {
            let (t, k, m) = r.error()?;
            Err(tier.remote_error(other, t, k, m))
        }
    })
}

impl Tier for RemoteTier {
    fn name(&self) -> &str {
        "remote"
    }

    fn get(&self, key: &ArtifactKey) -> Result<Option<Object>> {
        let enc = key.encode()?;
        let got = self.call(op::GET, key, true, |conn, max| {
            let mut f = FrameOut::new(op::GET);
            f.bytes(&enc);
            conn.send(f)?;
            let (code, mut r) = conn.recv(max)?;
            match code {
                status::OK => {
                    let meta = meta_of(&r.bytes("metadata")?)?;
                    let bytes = r.payload_shared("the payload")?;
                    r.finish()?;
                    Ok(Some(Object { meta, bytes }))
                }
                status::NOT_FOUND => {
                    r.finish()?;
                    Ok(None)
                }
                other => Err(self.refused(other, r)),
            }
        })?;
        got.map(|o| self.verify(key, o)).transpose()
    }

    fn put(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8]) -> Result<()> {
        let enc = key.encode()?;
        let meta = encode_meta(&Meta {
            length: bytes.len() as u64,
            checksum: checksum(bytes),
            ..meta
        });
        self.call(op::PUT, key, true, |conn, max| {
            let mut f = FrameOut::new(op::PUT);
            f.bytes(&enc);
            f.bytes(&meta);
            f.payload(bytes);
            conn.send(f)?;
            ok_reply_or(self, conn, max)?.finish()?;
            Ok(())
        })
    }

    fn contains(&self, key: &ArtifactKey) -> Result<bool> {
        self.key_bool(op::CONTAINS, key, true)
    }

    fn delete(&self, key: &ArtifactKey) -> Result<bool> {
        self.key_bool(op::DELETE, key, false)
    }

    /// The served tier's counters; all zero when the server cannot be
    /// reached (the trait's `stats` cannot fail).
    fn stats(&self) -> TierStats {
        let got = self.call(op::STATS, &"", true, |conn, max| {
            conn.send(FrameOut::new(op::STATS))?;
            let mut r = ok_reply_or(self, conn, max)?;
            let s = TierStats {
                objects: r.u64("objects")?,
                bytes: r.u64("bytes")?,
                capacity_bytes: r.u64("capacity_bytes")?,
                hits: r.u64("hits")?,
                misses: r.u64("misses")?,
                evictions: r.u64("evictions")?,
            };
            r.finish()?;
            Ok(s)
        });
        got.unwrap_or_default()
    }

    fn list(&self) -> Result<Vec<(ArtifactKey, Meta)>> {
        self.call(op::LIST, &"", true, |conn, max| {
            conn.send(FrameOut::new(op::LIST))?;
            let mut r = ok_reply_or(self, conn, max)?;
            let n = r.u64("the count")?;
            // Each entry takes at least 8 bytes: the count cannot
            // allocate past the frame.
            let mut out = Vec::with_capacity(usize::try_from(n.min(r.left / 8)).unwrap_or(0));
            for _ in 0..n {
                let key = key_of(&r.bytes("a key")?)?;
                let meta = meta_of(&r.bytes("metadata")?)?;
                out.push((key, meta));
            }
            r.finish()?;
            Ok(out)
        })
    }

    fn flush(&self) -> Result<()> {
        self.call(op::FLUSH, &"", true, |conn, max| {
            conn.send(FrameOut::new(op::FLUSH))?;
            ok_reply_or(self, conn, max)?.finish()?;
            Ok(())
        })
    }

    fn can_pin(&self) -> bool {
        self.can_pin
    }

    fn pin(&self, key: &ArtifactKey) -> Result<bool> {
        self.key_bool(op::PIN, key, false)
    }

    fn unpin(&self, key: &ArtifactKey) -> Result<bool> {
        self.key_bool(op::UNPIN, key, false)
    }

    /// One round trip for all keys. A key that does not encode fails alone;
    /// a failed exchange fails every key.
    fn get_many(&self, keys: &[ArtifactKey]) -> Vec<Result<Option<Object>>> {
        let mut out: Vec<Option<Result<Option<Object>>>> = Vec::with_capacity(keys.len());
        let mut sent = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            match k.encode() {
                Ok(enc) => {
                    sent.push((i, enc));
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        if !sent.is_empty() {
            let what = format!("of {} keys", sent.len());
            let got = self.call(op::GET_MANY, &what, true, |conn, max| {
                let mut f = FrameOut::new(op::GET_MANY);
                f.u32(sent.len() as u32);
                for (_, enc) in &sent {
                    f.bytes(enc);
                }
                conn.send(f)?;
                let mut r = ok_reply_or(self, conn, max)?;
                let n = r.u32("the count")?;
                if n as usize != sent.len() {
                    return Err(Fail::Broken(format!("{n} results for {} keys", sent.len())));
                }
                let mut items = Vec::with_capacity(sent.len());
                for _ in 0..n {
                    items.push(read_got(self, &mut r)?);
                }
                r.finish()?;
                Ok(items)
            });
            match got {
                Ok(items) => {
                    for ((i, _), item) in sent.iter().zip(items) {
                        let item =
                            item.and_then(|o| o.map(|o| self.verify(&keys[*i], o)).transpose());
                        out[*i] = Some(item);
                    }
                }
                Err(e) => {
                    for (i, _) in &sent {
                        out[*i] = Some(Err(e.duplicate()));
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(self.err("no result".into()))))
            .collect()
    }

    /// One round trip for all objects; each result says how its object
    /// fared. A failed exchange fails every object.
    fn put_many(&self, items: &[(ArtifactKey, Meta, &[u8])]) -> Vec<Result<()>> {
        let mut out: Vec<Option<Result<()>>> = Vec::with_capacity(items.len());
        let mut sent = Vec::with_capacity(items.len());
        for (i, (k, m, b)) in items.iter().enumerate() {
            match k.encode() {
                Ok(enc) => {
                    let meta = encode_meta(&Meta {
                        length: b.len() as u64,
                        checksum: checksum(b),
                        ..m.clone()
                    });
                    sent.push((i, enc, meta, *b));
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        if !sent.is_empty() {
            let what = format!("of {} objects", sent.len());
            let got = self.call(op::PUT_MANY, &what, true, |conn, max| {
                let mut f = FrameOut::new(op::PUT_MANY);
                f.u32(sent.len() as u32);
                for (_, enc, meta, bytes) in &sent {
                    f.bytes(enc);
                    f.bytes(meta);
                    f.payload(bytes);
                }
                conn.send(f)?;
                let mut r = ok_reply_or(self, conn, max)?;
                let n = r.u32("the count")?;
                if n as usize != sent.len() {
                    return Err(Fail::Broken(format!(
                        "{n} results for {} objects",
                        sent.len()
                    )));
                }
                let mut results = Vec::with_capacity(sent.len());
                for _ in 0..n {
                    let code = r.u8("an item's status")?;
                    results.push(if code == status::OK {
                        Ok(())
                    } else {
                        let (t, k, m) = r.error()?;
                        Err(self.remote_error(code, t, k, m))
                    });
                }
                r.finish()?;
                Ok(results)
            });
            match got {
                Ok(results) => {
                    for ((i, ..), res) in sent.iter().zip(results) {
                        out[*i] = Some(res);
                    }
                }
                Err(e) => {
                    for (i, ..) in &sent {
                        out[*i] = Some(Err(e.duplicate()));
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(self.err("no result".into()))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:80").ok(),
            Some(Endpoint::Tcp("127.0.0.1:80".into()))
        );
        assert_eq!(
            Endpoint::parse("localhost:9").ok(),
            Some(Endpoint::Tcp("localhost:9".into()))
        );
        assert_eq!(
            Endpoint::parse("[::1]:9").ok(),
            Some(Endpoint::Tcp("[::1]:9".into()))
        );
        assert_eq!(
            Endpoint::parse("unix:///tmp/s").ok(),
            Some(Endpoint::Unix("/tmp/s".into()))
        );
        for bad in ["", "unix://", "host", "host:port", ":80", "tcp://h:99999"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Endpoint::Unix("/tmp/s".into()).to_string(), "unix:///tmp/s");
    }

    #[test]
    fn frames_round_trip_and_lengths_are_checked() {
        let big = vec![7u8; INLINE_MAX + 5];
        let mut f = FrameOut::new(op::PUT);
        f.bytes(b"key");
        f.payload(&big);
        f.u32(9);
        f.payload(b"small");
        let mut wire = Vec::new();
        let n = f.send(&mut wire).ok();
        assert_eq!(n, Some(wire.len() as u64));
        let mut r = &wire[..];
        let (code, len) = read_header(&mut r, u64::MAX).ok().unwrap_or_default();
        assert_eq!(code, op::PUT);
        let mut body = FrameIn::new(&mut r, len);
        assert_eq!(body.bytes("k").ok(), Some(b"key".to_vec()));
        assert_eq!(body.payload_shared("p").ok().as_deref(), Some(&big[..]));
        assert_eq!(body.u32("n").ok(), Some(9));
        assert_eq!(body.payload_vec("p").ok(), Some(b"small".to_vec()));
        assert!(body.finish().is_ok());

        // Over the limit: refused before the body.
        let mut r = &wire[..];
        assert!(matches!(
            read_header(&mut r, 10),
            Err(WireError::TooLarge { .. })
        ));
        // A field claiming more than its frame: refused, nothing allocated.
        let mut lie = FrameOut::new(op::GET);
        lie.u32(u32::MAX);
        let mut wire = Vec::new();
        assert!(lie.send(&mut wire).is_ok());
        let mut r = &wire[..];
        let (_, len) = read_header(&mut r, u64::MAX).ok().unwrap_or_default();
        let mut body = FrameIn::new(&mut r, len);
        assert!(matches!(body.bytes("k"), Err(WireError::Malformed(_))));
    }
}
