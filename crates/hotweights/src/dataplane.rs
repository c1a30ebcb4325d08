//! The data plane: bucket bytes from one source to N receivers over TCP, as a
//! pipelined, verified, resumable chain broadcast.
//!
//! # Units
//!
//! The source streams a sequence of *pieces*: a run of bytes of one bucket
//! (bucket id, offset in the bucket, at most a piece size such as
//! [`DEFAULT_PIECE_BYTES`]), numbered by a sequence number from 0 and carried
//! with the BLAKE3 hash of its bytes. The data plane does not know where the
//! bytes come from: [`broadcast`] takes any iterator of [`Payload`]s
//! ([`split_bucket`] cuts a bucket into them) and assigns sequence numbers
//! and hashes itself.
//!
//! # The chain
//!
//! The source connects to the first receiver of the chain it is given,
//! `source -> r1 -> r2 -> ... -> rN`, and tells it, in the handshake, the rest
//! of the chain. Every receiver does the same with its own downstream. A
//! receiver reads a piece, checks its hash, queues it for its forwarding
//! thread and hands it to the local sink; the forwarding thread sends queued
//! pieces downstream while the receiving thread already reads the next one,
//! so N receivers take about the time of one plus N piece latencies. A piece
//! whose hash does not match is never delivered and never forwarded: the
//! receiver drops it and every later piece until the upstream, told by a
//! `NACK`, sends it again (go-back-N).
//!
//! # Backpressure
//!
//! Every receiver acknowledges upstream, cumulatively, the sequence number up
//! to which it *and every live receiver after it* hold every piece (`ACK n`:
//! all pieces below `n`). A sender keeps the pieces it sent but did not see
//! acknowledged and never holds more than its `window` of them: when the
//! window is full it stops reading from its own upstream (or its payload
//! iterator), so a slow receiver slows everything before it and memory stays
//! bounded at every hop (window plus a bounded forwarding queue). Reports
//! carry the peak of both so tests can check the bound.
//!
//! # Resume
//!
//! When a downstream link fails (connection refused, timeout, reset, a
//! protocol error), the sender records that receiver as excluded and connects
//! to the next receiver of the chain. That receiver answers the handshake
//! with its resume point, the sequence number after its last verified piece,
//! and the sender continues from there rather than from zero. Because acks
//! are the minimum over the rest of the chain, the sender still holds every
//! piece the new downstream may need. A receiver that loses its upstream goes
//! back to accepting, keeps its downstream, and resumes with whoever connects
//! next with the same transfer id. When the source has sent everything it
//! sends `DONE`; the last receiver answers `FINAL`, and each receiver passes
//! `FINAL` upstream with the completed and excluded receivers it knows of, so
//! the source's [`BroadcastReport`] names both.
//!
//! # Wire format
//!
//! All integers are little-endian. Addresses are strings (`u16` length, then
//! UTF-8), e.g. `127.0.0.1:4100`.
//!
//! | Message | Direction | Layout |
//! |---|---|---|
//! | `HELLO` | sender to receiver, once per connection | magic `HWDP` (4), version `u16`, transfer id `u64`, count `u16`, that many addresses (the rest of the chain) |
//! | `WELCOME` | receiver to sender, answer to `HELLO` | magic `HWDP` (4), version `u16`, transfer id `u64`, resume point `u64` |
//! | `PIECE` | downstream | type `0x01`, seq `u64`, bucket `u32`, offset `u64`, len `u32`, BLAKE3 of the bytes (32), bytes (len) |
//! | `DONE` | downstream | type `0x02`, piece count `u64` |
//! | `ACK` | upstream | type `0x11`, `u64`: every piece below it is held here and downstream |
//! | `NACK` | upstream | type `0x12`, seq `u64`: that piece failed its hash; send again from it |
//! | `FINAL` | upstream, answer to `DONE` | type `0x13`, count `u16` + completed addresses, count `u16` + (address, reason string) per excluded receiver |
//!
//! A handshake with another magic or version is refused with an error that
//! names the peer; a receiver keeps listening after refusing one (the refusal
//! is listed in its [`ReceiveReport`]).
//!
//! # Limits
//!
//! - The chain order is fixed up front; a receiver is never re-admitted once
//!   excluded, and there is no coordinator to re-plan the chain.
//! - A receiver that is excluded while still alive (its upstream timed out
//!   on it) keeps its downstream link until its own idle timeout, so the
//!   sender's attempt to reach that downstream may time out too; keep
//!   [`ReceiverOptions::idle_timeout`] below the senders' `io_timeout`.
//! - A receiver that loses its upstream after `DONE` but before its `FINAL`
//!   gets through is reported excluded even though it holds every piece.
//! - Only the source's first link's hash failures are in
//!   [`BroadcastReport::hash_failures`]; each receiver counts its own in
//!   [`ReceiveReport::hash_failures`].
//! - No encryption or authentication: run it on a trusted network.
//!
//! # Testing hooks
//!
//! [`BroadcastOptions::corrupt_seq`] flips a byte in the first transmissions
//! of one piece (a link that fails one piece's hash more than
//! [`MAX_HASH_FAILURES`] times in a row counts as broken), and [`AbortHandle::abort`] kills a receiver mid-transfer (it
//! closes its sockets), so tests can show rejection and resume.

use std::collections::VecDeque;
use std::fmt::Display;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{HotweightsError, Result};

/// The handshake magic.
pub const MAGIC: [u8; 4] = *b"HWDP";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// A sensible piece size: large enough to amortise framing and hashing
/// calls, small enough to pipeline well.
pub const DEFAULT_PIECE_BYTES: usize = 4 << 20;
/// The largest piece a peer accepts; a longer frame is a protocol error.
pub const MAX_PIECE_BYTES: u32 = 256 << 20;

const T_PIECE: u8 = 0x01;
const T_DONE: u8 = 0x02;
const T_ACK: u8 = 0x11;
const T_NACK: u8 = 0x12;
const T_FINAL: u8 = 0x13;
const MAX_ADDRS: u16 = 4096;
const MAX_REASON: usize = 1024;
/// NACKs of one piece after which a link counts as broken and its receiver
/// is excluded.
pub const MAX_HASH_FAILURES: u32 = 4;
const TICK: Duration = Duration::from_millis(20);

/// Bytes to send: a run of one bucket, before the data plane numbers and
/// hashes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// Bucket id (as in the swap plan).
    pub bucket: u32,
    /// Offset of these bytes in the bucket.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// One numbered, hashed piece as it travels and as a sink receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Sequence number, from 0, consecutive.
    pub seq: u64,
    /// Bucket id.
    pub bucket: u32,
    /// Offset of the bytes in the bucket.
    pub offset: u64,
    /// The bytes (shared between the sink and the forwarding queue).
    pub bytes: Arc<[u8]>,
    /// BLAKE3 of `bytes`.
    pub hash: [u8; 32],
}

impl Piece {
    fn new(seq: u64, payload: Payload) -> Piece {
        let hash = *blake3::hash(&payload.bytes).as_bytes();
        Piece {
            seq,
            bucket: payload.bucket,
            offset: payload.offset,
            bytes: payload.bytes.into(),
            hash,
        }
    }

    fn describe(&self) -> String {
        format!(
            "piece {} (bucket {}, offset {}, {} bytes)",
            self.seq,
            self.bucket,
            self.offset,
            self.bytes.len()
        )
    }
}

/// Cuts a bucket's bytes into payloads of at most `piece_bytes` (at least
/// 1); an empty bucket gives one empty payload.
pub fn split_bucket(bucket: u32, bytes: &[u8], piece_bytes: usize) -> Vec<Payload> {
    if bytes.is_empty() {
        return vec![Payload {
            bucket,
            offset: 0,
            bytes: Vec::new(),
        }];
    }
    bytes
        .chunks(piece_bytes.max(1))
        .enumerate()
        .map(|(i, c)| Payload {
            bucket,
            offset: (i * piece_bytes.max(1)) as u64,
            bytes: c.to_vec(),
        })
        .collect()
}

/// A receiver that left the chain, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excluded {
    /// Its address as the chain named it.
    pub addr: SocketAddr,
    /// What went wrong (names the peer).
    pub reason: String,
}

/// How the source runs a broadcast.
#[derive(Debug, Clone)]
pub struct BroadcastOptions {
    /// Names the transfer; receivers refuse a reconnect with another id.
    pub transfer_id: u64,
    /// Most pieces held unacknowledged per link (at least 1).
    pub window: usize,
    /// Limit on connecting to one receiver.
    pub connect_timeout: Duration,
    /// Limit on one read or write; a peer silent for longer is dropped.
    pub io_timeout: Duration,
    /// Test hook: flip one byte of this piece's first `corrupt_times`
    /// transmissions.
    pub corrupt_seq: Option<u64>,
    /// How many transmissions of `corrupt_seq` to corrupt (default 1).
    pub corrupt_times: u32,
}

impl Default for BroadcastOptions {
    fn default() -> Self {
        BroadcastOptions {
            transfer_id: 0,
            window: 16,
            connect_timeout: Duration::from_secs(3),
            io_timeout: Duration::from_secs(30),
            corrupt_seq: None,
            corrupt_times: 1,
        }
    }
}

/// What a broadcast did, from the source's side.
#[derive(Debug, Clone, Default)]
pub struct BroadcastReport {
    /// Pieces in the transfer.
    pub pieces: u64,
    /// Payload bytes in the transfer.
    pub bytes: u64,
    /// Piece bytes the source wrote, resends included.
    pub bytes_sent: u64,
    /// Pieces the source wrote, resends included.
    pub pieces_sent: u64,
    /// Pieces sent again (after a `NACK` or a reconnect).
    pub retries: u64,
    /// `NACK`s the first receiver sent (hash failures of its link).
    pub hash_failures: u64,
    /// Downstream connections the source opened after the first.
    pub reconnects: u64,
    /// Most pieces the source held unacknowledged at once.
    pub peak_in_flight: usize,
    /// Wall time.
    pub duration: Duration,
    /// Receivers that delivered every piece, in chain order.
    pub completed: Vec<SocketAddr>,
    /// Receivers that left the chain.
    pub excluded: Vec<Excluded>,
}

/// How a receiver runs.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// Most pieces held unacknowledged towards its downstream (at least 1).
    pub window: usize,
    /// Most verified pieces queued between receiving and forwarding.
    pub queue: usize,
    /// Limit on connecting to a downstream receiver.
    pub connect_timeout: Duration,
    /// Limit on one read or write.
    pub io_timeout: Duration,
    /// How long to wait for the first upstream.
    pub start_timeout: Duration,
    /// How long to wait for a new upstream after losing one.
    pub idle_timeout: Duration,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            window: 16,
            queue: 8,
            connect_timeout: Duration::from_secs(3),
            io_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(20),
        }
    }
}

/// What a receiver did.
#[derive(Debug, Clone, Default)]
pub struct ReceiveReport {
    /// Transfer id of the transfer received.
    pub transfer_id: u64,
    /// Pieces delivered to the sink (each once, in order).
    pub pieces: u64,
    /// Bytes delivered to the sink.
    pub bytes: u64,
    /// Piece bytes read from upstream, dropped and repeated ones included.
    pub bytes_received: u64,
    /// Pieces that failed their hash.
    pub hash_failures: u64,
    /// Pieces dropped because they came after a missing one.
    pub discarded: u64,
    /// Upstream connections accepted after the first.
    pub resumes: u64,
    /// Pieces this receiver sent downstream, resends included.
    pub pieces_forwarded: u64,
    /// Piece bytes this receiver sent downstream, resends included.
    pub bytes_forwarded: u64,
    /// Pieces sent downstream again.
    pub retries: u64,
    /// Most pieces queued between receiving and forwarding.
    pub peak_queued: usize,
    /// Most pieces held unacknowledged towards the downstream.
    pub peak_in_flight: usize,
    /// Refused handshakes (each names the peer).
    pub rejected: Vec<String>,
    /// Receivers after this one that completed.
    pub downstream_completed: Vec<SocketAddr>,
    /// Receivers after this one that were excluded.
    pub downstream_excluded: Vec<Excluded>,
    /// Wall time from bind to the end.
    pub duration: Duration,
}

/// Kills a running [`Receiver`] from another thread: sets a flag and closes
/// its sockets, as a crash would. `run` then returns an error.
#[derive(Debug, Clone, Default)]
pub struct AbortHandle {
    flag: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl AbortHandle {
    /// Aborts the receiver.
    pub fn abort(&self) {
        self.flag.store(true, Ordering::SeqCst);
        for s in lock(&self.streams).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Whether [`abort`](Self::abort) was called.
    pub fn is_aborted(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn register(&self, s: &TcpStream) {
        if let Ok(c) = s.try_clone() {
            lock(&self.streams).push(c);
        }
        if self.is_aborted() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn err(peer: impl Display, message: impl Into<String>) -> HotweightsError {
    HotweightsError::Transfer {
        peer: peer.to_string(),
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

// ---- wire encoding ----

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_REASON)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn get<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn get_u16(r: &mut impl Read) -> io::Result<u16> {
    Ok(u16::from_le_bytes(get(r)?))
}

fn get_u64(r: &mut impl Read) -> io::Result<u64> {
    Ok(u64::from_le_bytes(get(r)?))
}

fn get_str(r: &mut impl Read) -> io::Result<String> {
    let n = get_u16(r)? as usize;
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| invalid("a string that is not UTF-8"))
}

fn get_addr(r: &mut impl Read) -> io::Result<SocketAddr> {
    let s = get_str(r)?;
    s.parse()
        .map_err(|_| invalid(format!("{s:?} is not a socket address")))
}

fn get_count(r: &mut impl Read) -> io::Result<u16> {
    let n = get_u16(r)?;
    if n > MAX_ADDRS {
        return Err(invalid(format!("{n} addresses (at most {MAX_ADDRS})")));
    }
    Ok(n)
}

fn check_magic(magic: [u8; 4], version: u16) -> io::Result<()> {
    if magic != MAGIC {
        return Err(invalid(format!(
            "bad handshake: magic {:?} is not {:?} (not a hotweights data-plane peer)",
            String::from_utf8_lossy(&magic),
            String::from_utf8_lossy(&MAGIC)
        )));
    }
    if version != VERSION {
        return Err(invalid(format!(
            "bad handshake: protocol version {version}, this build speaks {VERSION}"
        )));
    }
    Ok(())
}

struct Hello {
    transfer_id: u64,
    rest: Vec<SocketAddr>,
}

fn write_hello(w: &mut impl Write, transfer_id: u64, rest: &[SocketAddr]) -> io::Result<()> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&transfer_id.to_le_bytes());
    out.extend_from_slice(&(rest.len().min(MAX_ADDRS as usize) as u16).to_le_bytes());
    for a in rest.iter().take(MAX_ADDRS as usize) {
        put_str(&mut out, &a.to_string());
    }
    w.write_all(&out)?;
    w.flush()
}

fn read_hello(r: &mut impl Read) -> io::Result<Hello> {
    let magic = get::<4>(r)?;
    let version = get_u16(r)?;
    check_magic(magic, version)?;
    let transfer_id = get_u64(r)?;
    let n = get_count(r)?;
    let rest = (0..n).map(|_| get_addr(r)).collect::<io::Result<_>>()?;
    Ok(Hello { transfer_id, rest })
}

fn write_welcome(w: &mut impl Write, transfer_id: u64, resume: u64) -> io::Result<()> {
    let mut out = Vec::with_capacity(22);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&transfer_id.to_le_bytes());
    out.extend_from_slice(&resume.to_le_bytes());
    w.write_all(&out)?;
    w.flush()
}

fn read_welcome(r: &mut impl Read) -> io::Result<(u64, u64)> {
    let magic = get::<4>(r)?;
    let version = get_u16(r)?;
    check_magic(magic, version)?;
    Ok((get_u64(r)?, get_u64(r)?))
}

fn write_piece(w: &mut impl Write, p: &Piece, corrupt: bool) -> io::Result<()> {
    let mut head = Vec::with_capacity(57);
    head.push(T_PIECE);
    head.extend_from_slice(&p.seq.to_le_bytes());
    head.extend_from_slice(&p.bucket.to_le_bytes());
    head.extend_from_slice(&p.offset.to_le_bytes());
    head.extend_from_slice(&(p.bytes.len() as u32).to_le_bytes());
    head.extend_from_slice(&p.hash);
    if corrupt && p.bytes.is_empty() {
        // No byte to flip: flip one of the hash instead.
        head[25] ^= 0xff;
    }
    w.write_all(&head)?;
    if corrupt && !p.bytes.is_empty() {
        let mut bad = p.bytes.to_vec();
        bad[0] ^= 0xff;
        w.write_all(&bad)?;
    } else {
        w.write_all(&p.bytes)?;
    }
    w.flush()
}

fn write_u64_frame(w: &mut impl Write, kind: u8, n: u64) -> io::Result<()> {
    let mut out = [0u8; 9];
    out[0] = kind;
    out[1..].copy_from_slice(&n.to_le_bytes());
    w.write_all(&out)?;
    w.flush()
}

enum Down {
    Piece(Piece),
    Done(u64),
}

fn read_down(r: &mut impl Read) -> io::Result<Down> {
    match get::<1>(r)?[0] {
        T_PIECE => {
            let seq = get_u64(r)?;
            let bucket = u32::from_le_bytes(get(r)?);
            let offset = get_u64(r)?;
            let len = u32::from_le_bytes(get(r)?);
            if len > MAX_PIECE_BYTES {
                return Err(invalid(format!(
                    "piece {seq} claims {len} bytes (at most {MAX_PIECE_BYTES})"
                )));
            }
            let hash = get::<32>(r)?;
            let mut bytes = vec![0u8; len as usize];
            r.read_exact(&mut bytes)?;
            Ok(Down::Piece(Piece {
                seq,
                bucket,
                offset,
                bytes: bytes.into(),
                hash,
            }))
        }
        T_DONE => Ok(Down::Done(get_u64(r)?)),
        t => Err(invalid(format!(
            "unknown frame type {t:#04x} from upstream"
        ))),
    }
}

/// What the receivers after a point report at the end.
#[derive(Debug, Clone, Default)]
struct FinalInfo {
    completed: Vec<SocketAddr>,
    excluded: Vec<Excluded>,
}

fn write_final(w: &mut impl Write, info: &FinalInfo) -> io::Result<()> {
    let mut out = vec![T_FINAL];
    let done = &info.completed[..info.completed.len().min(MAX_ADDRS as usize)];
    out.extend_from_slice(&(done.len() as u16).to_le_bytes());
    for a in done {
        put_str(&mut out, &a.to_string());
    }
    let ex = &info.excluded[..info.excluded.len().min(MAX_ADDRS as usize)];
    out.extend_from_slice(&(ex.len() as u16).to_le_bytes());
    for e in ex {
        put_str(&mut out, &e.addr.to_string());
        put_str(&mut out, &e.reason);
    }
    w.write_all(&out)?;
    w.flush()
}

enum Up {
    Ack(u64),
    Nack(u64),
    Final(FinalInfo),
}

fn read_up(r: &mut impl Read) -> io::Result<Up> {
    match get::<1>(r)?[0] {
        T_ACK => Ok(Up::Ack(get_u64(r)?)),
        T_NACK => Ok(Up::Nack(get_u64(r)?)),
        T_FINAL => {
            let n = get_count(r)?;
            let completed = (0..n).map(|_| get_addr(r)).collect::<io::Result<_>>()?;
            let n = get_count(r)?;
            let excluded = (0..n)
                .map(|_| {
                    Ok(Excluded {
                        addr: get_addr(r)?,
                        reason: get_str(r)?,
                    })
                })
                .collect::<io::Result<_>>()?;
            Ok(Up::Final(FinalInfo {
                completed,
                excluded,
            }))
        }
        t => Err(invalid(format!(
            "unknown frame type {t:#04x} from downstream"
        ))),
    }
}

// ---- the forwarding side, shared by the source and every receiver ----

enum Event {
    Piece(Piece),
    Done(u64),
    Up(u64, Up),
    Lost(u64, String),
}

/// The bound on the queue between a receiver's reading and forwarding
/// threads.
struct Credit {
    used: Mutex<(usize, usize)>,
    cv: Condvar,
    cap: usize,
}

impl Credit {
    fn acquire(&self, abort: &AbortHandle) -> bool {
        let mut g = lock(&self.used);
        while g.0 >= self.cap {
            if abort.is_aborted() {
                return false;
            }
            g = match self.cv.wait_timeout(g, TICK) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        g.0 += 1;
        g.1 = g.1.max(g.0);
        true
    }

    fn release(&self) {
        let mut g = lock(&self.used);
        g.0 = g.0.saturating_sub(1);
        self.cv.notify_all();
    }

    fn peak(&self) -> usize {
        lock(&self.used).1
    }
}

struct LinkConfig {
    transfer_id: u64,
    window: usize,
    connect_timeout: Duration,
    io_timeout: Duration,
    corrupt_seq: Option<u64>,
    corrupt_times: u32,
}

#[derive(Default)]
struct ForwardStats {
    bytes_sent: u64,
    pieces_sent: u64,
    retries: u64,
    nacks: u64,
    reconnects: u64,
    peak_in_flight: usize,
    pieces: u64,
    bytes: u64,
}

/// Where the forwarder's pieces come from.
enum Feed<'a> {
    /// The source's payloads, pulled when the window allows.
    Source(&'a mut dyn Iterator<Item = Result<Payload>>),
    /// Verified pieces from the receiving thread (events on the channel).
    Queue(Arc<Credit>),
}

fn open_link(addr: SocketAddr, rest: &[SocketAddr], cfg: &LinkConfig) -> Result<(TcpStream, u64)> {
    let s = TcpStream::connect_timeout(&addr, cfg.connect_timeout)
        .map_err(|e| err(addr, format!("cannot connect: {e}")))?;
    let setup = |s: &TcpStream| -> io::Result<()> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(cfg.io_timeout))?;
        s.set_write_timeout(Some(cfg.io_timeout))
    };
    setup(&s).map_err(|e| err(addr, format!("socket setup: {e}")))?;
    let mut w = &s;
    write_hello(&mut w, cfg.transfer_id, rest).map_err(|e| err(addr, format!("handshake: {e}")))?;
    let mut r = &s;
    let (id, resume) = read_welcome(&mut r).map_err(|e| err(addr, format!("handshake: {e}")))?;
    if id != cfg.transfer_id {
        return Err(err(
            addr,
            format!(
                "handshake: receiver is in transfer {id}, not {}",
                cfg.transfer_id
            ),
        ));
    }
    Ok((s, resume))
}

struct Link {
    stream: TcpStream,
    addr: SocketAddr,
    done_sent: bool,
    /// The piece the downstream last NACKed, and how many times in a row.
    failing: Option<u64>,
    failures: u32,
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Sends the feed down the chain `rest`, re-forming it around failed
/// receivers, until the downstream answers `DONE` with `FINAL` (or no
/// receiver is left). `on_ack` gets the downstream chain's cumulative ack
/// (`u64::MAX` once no downstream is left).
#[allow(clippy::too_many_arguments)]
fn forward(
    rest: &[SocketAddr],
    cfg: &LinkConfig,
    mut feed: Feed<'_>,
    events: &mpsc::Receiver<Event>,
    events_tx: &Sender<Event>,
    abort: &AbortHandle,
    on_ack: &mut dyn FnMut(u64),
    stats: &mut ForwardStats,
) -> Result<FinalInfo> {
    let window = cfg.window.max(1);
    let mut retained: VecDeque<Piece> = VecDeque::new();
    let mut base = 0u64; // seq of retained[0]
    let mut acked = 0u64;
    let mut next_send = 0u64;
    // Pieces below this one the current downstream already holds (it
    // resumed past what this sender had fed, e.g. after the source
    // restarted): they are fed and counted, not sent or kept.
    let mut skip_until = 0u64;
    let mut total: Option<u64> = None;
    let mut pending: VecDeque<Piece> = VecDeque::new(); // receivers: queued, not yet fed
    let mut queued_done: Option<u64> = None;
    let mut exhausted = false;
    let mut idx = 0usize;
    let mut link_gen = 0u64;
    let mut link: Option<Link> = None;
    let mut excluded = Vec::new();
    let mut corrupt = cfg.corrupt_seq;
    let mut corrupt_left = cfg.corrupt_times;
    let mut idle = false;
    let mut opened = 0u64;
    loop {
        if abort.is_aborted() {
            return Err(err("local receiver", "aborted"));
        }
        // One event, waiting only when the last round had nothing to do.
        let ev = if idle {
            match events.recv_timeout(TICK) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(err("local receiver", "event channel closed"));
                }
            }
        } else {
            events.try_recv().ok()
        };
        idle = false;
        if let Some(ev) = ev {
            match ev {
                Event::Piece(p) => pending.push_back(p),
                Event::Done(t) => queued_done = Some(t),
                Event::Up(g, _) | Event::Lost(g, _) if g != link_gen => {}
                Event::Up(_, Up::Ack(n)) => {
                    if n > acked {
                        acked = n;
                        while base < acked && !retained.is_empty() {
                            retained.pop_front();
                            base += 1;
                        }
                        on_ack(acked);
                    }
                }
                Event::Up(_, Up::Nack(s)) => {
                    stats.nacks += 1;
                    if let Some(l) = link.as_mut() {
                        l.done_sent = false;
                        if l.failing == Some(s) {
                            l.failures += 1;
                        } else {
                            l.failing = Some(s);
                            l.failures = 1;
                        }
                    }
                    if let Some(l) = link.take_if(|l| l.failures > MAX_HASH_FAILURES) {
                        let what = retained
                            .get(s.saturating_sub(base) as usize)
                            .map_or_else(|| format!("piece {s}"), Piece::describe);
                        excluded.push(Excluded {
                            addr: l.addr,
                            reason: err(
                                l.addr,
                                format!(
                                    "{what} failed its hash check {} times on this link",
                                    l.failures
                                ),
                            )
                            .to_string(),
                        });
                    } else if s >= base && s < next_send {
                        stats.retries += next_send - s;
                        next_send = s;
                    }
                }
                Event::Up(_, Up::Final(info)) => {
                    if let Some(l) = link.take_if(|l| l.done_sent) {
                        let mut completed = vec![l.addr];
                        completed.extend(info.completed);
                        excluded.extend(info.excluded);
                        return Ok(FinalInfo {
                            completed,
                            excluded,
                        });
                    }
                }
                Event::Lost(_, reason) => {
                    if let Some(l) = link.take() {
                        excluded.push(Excluded {
                            addr: l.addr,
                            reason,
                        });
                    }
                }
            }
            continue;
        }

        // Pull into the retained window, one piece at a time and only when
        // every piece held is already sent (or there is nobody left to send
        // to): a slow feed (a paced source, a disk, an upstream link) then
        // has each piece sent as soon as it is read, instead of a window's
        // worth later, and the first downstream is connected before the
        // first read.
        let fed_end = base + retained.len() as u64;
        let want_more = match &link {
            Some(_) => next_send >= fed_end,
            None => idx >= rest.len(),
        };
        if total.is_none() && retained.len() < window && want_more {
            let item = match &mut feed {
                Feed::Source(it) => match it.next() {
                    Some(Ok(p)) => Some(Event::Piece(Piece::new(fed_end, p))),
                    Some(Err(e)) => return Err(e),
                    None => Some(Event::Done(fed_end)),
                },
                Feed::Queue(credit) => match pending.pop_front() {
                    Some(p) => {
                        credit.release();
                        Some(Event::Piece(p))
                    }
                    None => queued_done.map(Event::Done),
                },
            };
            match item {
                Some(Event::Piece(p)) => {
                    stats.pieces += 1;
                    stats.bytes += p.bytes.len() as u64;
                    retained.push_back(p);
                    stats.peak_in_flight = stats.peak_in_flight.max(retained.len());
                    if fed_end < skip_until && retained.len() == 1 {
                        retained.clear();
                        base = fed_end + 1;
                        acked = base;
                        next_send = next_send.max(base);
                        on_ack(acked);
                        continue;
                    }
                    if link.is_none() && idx >= rest.len() {
                        // Nobody downstream: nothing to keep.
                        retained.clear();
                        base = fed_end + 1;
                        acked = base;
                        next_send = base;
                    }
                    continue;
                }
                Some(Event::Done(t)) => {
                    total = Some(t);
                    continue;
                }
                _ => {}
            }
        }

        // (Re)connect downstream.
        if link.is_none() {
            if idx >= rest.len() {
                if !exhausted {
                    exhausted = true;
                    retained.clear();
                    base = fed_end;
                    acked = base;
                    next_send = base;
                    on_ack(u64::MAX);
                }
                if total.is_some() {
                    return Ok(FinalInfo {
                        completed: Vec::new(),
                        excluded,
                    });
                }
                // Keep taking pieces (and counting them) until DONE.
                idle = matches!(feed, Feed::Queue(_));
                continue;
            }
            let addr = rest[idx];
            idx += 1;
            match open_link(addr, &rest[idx..], cfg) {
                Ok((stream, resume)) => {
                    let fed_end = base + retained.len() as u64;
                    if resume > fed_end && matches!(feed, Feed::Source(_)) {
                        // A fresh source (restarted) meets a receiver that
                        // holds more than it has read: read up to there
                        // and go on, instead of sending it all again.
                        retained.clear();
                        base = fed_end;
                        acked = base;
                        skip_until = resume;
                    }
                    let fed_end = base + retained.len() as u64;
                    if resume < base || resume > fed_end.max(skip_until) {
                        excluded.push(Excluded {
                            addr,
                            reason: err(
                                addr,
                                format!(
                                    "asks to resume at piece {resume}, but pieces {base}..{fed_end} are what is held"
                                ),
                            )
                            .to_string(),
                        });
                        continue;
                    }
                    abort.register(&stream);
                    opened += 1;
                    if opened > 1 {
                        stats.reconnects += 1;
                        stats.retries += next_send.saturating_sub(resume);
                    }
                    link_gen += 1;
                    // Pieces below `resume` stay held until acked: a later
                    // receiver may still need them if this one fails too.
                    next_send = resume;
                    let reader = stream
                        .try_clone()
                        .map_err(|e| err(addr, format!("socket: {e}")))?;
                    let tx = events_tx.clone();
                    let g = link_gen;
                    thread::spawn(move || read_acks(reader, addr, g, tx));
                    link = Some(Link {
                        stream,
                        addr,
                        done_sent: false,
                        failing: None,
                        failures: 0,
                    });
                }
                Err(e) => excluded.push(Excluded {
                    addr,
                    reason: e.to_string(),
                }),
            }
            continue;
        }

        // Send.
        let fed_end = base + retained.len() as u64;
        if let Some(l) = link.as_mut() {
            if next_send < fed_end {
                let p = &retained[(next_send - base) as usize];
                let bad = corrupt == Some(p.seq) && corrupt_left > 0;
                if bad {
                    corrupt_left -= 1;
                    if corrupt_left == 0 {
                        corrupt = None;
                    }
                }
                let mut w = &l.stream;
                match write_piece(&mut w, p, bad) {
                    Ok(()) => {
                        stats.pieces_sent += 1;
                        stats.bytes_sent += p.bytes.len() as u64;
                        next_send += 1;
                    }
                    Err(e) => {
                        let reason = err(l.addr, format!("sending {}: {e}", p.describe()));
                        excluded.push(Excluded {
                            addr: l.addr,
                            reason: reason.to_string(),
                        });
                        link = None;
                    }
                }
                continue;
            }
            if let Some(t) = total
                && next_send == t
                && fed_end == t
                && !l.done_sent
            {
                let mut w = &l.stream;
                if let Err(e) = write_u64_frame(&mut w, T_DONE, t) {
                    excluded.push(Excluded {
                        addr: l.addr,
                        reason: err(l.addr, format!("sending DONE: {e}")).to_string(),
                    });
                    link = None;
                } else {
                    l.done_sent = true;
                }
                continue;
            }
        }
        idle = true;
    }
}

fn read_acks(stream: TcpStream, addr: SocketAddr, link_gen: u64, tx: Sender<Event>) {
    let mut r = BufReader::new(stream);
    loop {
        match read_up(&mut r) {
            Ok(up) => {
                let last = matches!(up, Up::Final(_));
                if tx.send(Event::Up(link_gen, up)).is_err() || last {
                    return;
                }
            }
            Err(e) => {
                let reason = if e.kind() == io::ErrorKind::UnexpectedEof {
                    "connection closed".to_string()
                } else {
                    e.to_string()
                };
                let _ = tx.send(Event::Lost(link_gen, err(addr, reason).to_string()));
                return;
            }
        }
    }
}

/// Broadcasts `payloads` down `chain`, in order, and returns when every
/// receiver still in the chain has every piece. Receivers that cannot be
/// reached or that fail mid-transfer are skipped and listed in the report;
/// an empty or fully excluded chain is not an error. Errors: a payload the
/// iterator fails on, an option out of range.
pub fn broadcast(
    payloads: impl IntoIterator<Item = Result<Payload>>,
    chain: &[SocketAddr],
    options: &BroadcastOptions,
) -> Result<BroadcastReport> {
    if options.window == 0 {
        return Err(HotweightsError::Option(
            "broadcast window must be at least 1 piece".into(),
        ));
    }
    let start = Instant::now();
    let cfg = LinkConfig {
        transfer_id: options.transfer_id,
        window: options.window,
        connect_timeout: options.connect_timeout,
        io_timeout: options.io_timeout,
        corrupt_seq: options.corrupt_seq,
        corrupt_times: options.corrupt_times,
    };
    let (tx, rx) = mpsc::channel();
    let mut iter = payloads.into_iter();
    let mut stats = ForwardStats::default();
    let abort = AbortHandle::default();
    let info = forward(
        chain,
        &cfg,
        Feed::Source(&mut iter),
        &rx,
        &tx,
        &abort,
        &mut |_| {},
        &mut stats,
    )?;
    Ok(BroadcastReport {
        pieces: stats.pieces,
        bytes: stats.bytes,
        bytes_sent: stats.bytes_sent,
        pieces_sent: stats.pieces_sent,
        retries: stats.retries,
        hash_failures: stats.nacks,
        reconnects: stats.reconnects,
        peak_in_flight: stats.peak_in_flight,
        duration: start.elapsed(),
        completed: info.completed,
        excluded: info.excluded,
    })
}

// ---- the receiving side ----

/// The upstream connection's write side and what to acknowledge on it.
struct UpState {
    stream: Option<TcpStream>,
    delivered: u64,
    downstream: u64,
    sent: u64,
}

impl UpState {
    fn push_ack(&mut self) {
        let n = self.delivered.min(self.downstream);
        if n > self.sent
            && let Some(s) = self.stream.as_ref()
        {
            let mut w = s;
            if write_u64_frame(&mut w, T_ACK, n).is_ok() {
                self.sent = n;
            }
        }
    }
}

/// One receiver of a chain broadcast: listens, accepts its upstream,
/// verifies, delivers and forwards.
#[derive(Debug)]
pub struct Receiver {
    listener: TcpListener,
    options: ReceiverOptions,
    abort: AbortHandle,
}

impl Receiver {
    /// Listens on `addr` (port 0 picks a free port) with default options.
    pub fn bind(addr: SocketAddr) -> Result<Receiver> {
        let listener =
            TcpListener::bind(addr).map_err(|e| err(addr, format!("cannot listen: {e}")))?;
        Ok(Receiver {
            listener,
            options: ReceiverOptions::default(),
            abort: AbortHandle::default(),
        })
    }

    /// A receiver on a listener its caller already bound: a worker keeps
    /// one listening socket for all its transfers (a `try_clone` of it per
    /// transfer), so a sender that connects before the worker is ready
    /// waits in the accept queue instead of being refused.
    pub fn from_listener(listener: TcpListener) -> Receiver {
        Receiver {
            listener,
            options: ReceiverOptions::default(),
            abort: AbortHandle::default(),
        }
    }

    /// Makes `abort` this receiver's abort handle: a caller that holds the
    /// handle before the receiver exists (a worker's rollout job) can kill
    /// it, or have it fail at once if already aborted.
    pub fn with_abort(mut self, abort: AbortHandle) -> Receiver {
        self.abort = abort;
        self
    }

    /// Replaces the options.
    pub fn with_options(mut self, options: ReceiverOptions) -> Receiver {
        self.options = options;
        self
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| err("listener", format!("no local address: {e}")))
    }

    /// A handle that kills this receiver from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// Runs the receiver until the transfer is done: accepts an upstream
    /// (again after losing one, within the idle timeout), verifies every
    /// piece, hands each to `sink` once and in order, forwards it down the
    /// rest of the chain, and answers `DONE` when everything after it is
    /// done too. Errors: no upstream within the start or idle timeout, the
    /// sink failing, a forwarding failure, an abort.
    pub fn run<F>(self, mut sink: F) -> Result<ReceiveReport>
    where
        F: FnMut(&Piece) -> Result<()>,
    {
        let start = Instant::now();
        let me = self.local_addr()?;
        let o = &self.options;
        let cfg = LinkConfig {
            transfer_id: 0,
            window: o.window.max(1),
            connect_timeout: o.connect_timeout,
            io_timeout: o.io_timeout,
            corrupt_seq: None,
            corrupt_times: 0,
        };
        let credit = Arc::new(Credit {
            used: Mutex::new((0, 0)),
            cv: Condvar::new(),
            cap: o.queue.max(1),
        });
        let up = Arc::new(Mutex::new(UpState {
            stream: None,
            delivered: 0,
            downstream: u64::MAX,
            sent: 0,
        }));
        let (tx, rx) = mpsc::channel::<Event>();
        let mut rx_slot = Some(rx);
        let failure: Arc<Mutex<Option<HotweightsError>>> = Arc::default();
        let aborted = || lock(&failure).take().unwrap_or_else(|| err(me, "aborted"));
        let mut report = ReceiveReport::default();
        let abort = self.abort.clone();
        let result = thread::scope(|scope| -> Result<()> {
            let mut forwarder: Option<thread::ScopedJoinHandle<'_, _>> = None;
            let mut transfer: Option<u64> = None;
            let mut next = 0u64;
            let mut accepted = 0u64;
            let total = 'accept: loop {
                let wait = if accepted == 0 {
                    o.start_timeout
                } else {
                    o.idle_timeout
                };
                let (stream, peer) = match accept(&self.listener, wait, &abort) {
                    Ok(x) => x,
                    Err(e) => {
                        abort.flag.store(true, Ordering::SeqCst);
                        return Err(e);
                    }
                };
                let _ = stream.set_nodelay(true);
                let _ = stream.set_read_timeout(Some(o.io_timeout));
                let _ = stream.set_write_timeout(Some(o.io_timeout));
                let mut r = &stream;
                let hello = match read_hello(&mut r) {
                    Ok(h) => h,
                    Err(e) => {
                        report.rejected.push(err(peer, e.to_string()).to_string());
                        continue;
                    }
                };
                if transfer.is_some_and(|t| t != hello.transfer_id) {
                    report.rejected.push(
                        err(
                            peer,
                            format!(
                                "handshake for transfer {}, but this receiver is in transfer {}",
                                hello.transfer_id,
                                transfer.unwrap_or_default()
                            ),
                        )
                        .to_string(),
                    );
                    continue;
                }
                let mut w = &stream;
                if write_welcome(&mut w, hello.transfer_id, next).is_err() {
                    continue;
                }
                abort.register(&stream);
                accepted += 1;
                if accepted > 1 {
                    report.resumes += 1;
                }
                if transfer.is_none() {
                    transfer = Some(hello.transfer_id);
                    report.transfer_id = hello.transfer_id;
                    if !hello.rest.is_empty() {
                        lock(&up).downstream = 0;
                        let cfg = LinkConfig {
                            transfer_id: hello.transfer_id,
                            ..cfg
                        };
                        let failure2 = failure.clone();
                        let (rest, up2, credit2, tx2, abort2) = (
                            hello.rest.clone(),
                            up.clone(),
                            credit.clone(),
                            tx.clone(),
                            abort.clone(),
                        );
                        let rx = rx_slot.take();
                        forwarder = Some(scope.spawn(move || {
                            let Some(rx) = rx else {
                                return (
                                    Err(err("local receiver", "no event channel")),
                                    ForwardStats::default(),
                                );
                            };
                            let mut stats = ForwardStats::default();
                            let mut on_ack = |n: u64| {
                                let mut u = lock(&up2);
                                u.downstream = n;
                                u.push_ack();
                            };
                            let r = forward(
                                &rest,
                                &cfg,
                                Feed::Queue(credit2),
                                &rx,
                                &tx2,
                                &abort2,
                                &mut on_ack,
                                &mut stats,
                            );
                            // A forwarding failure of its own (not an abort)
                            // stops the receiver too, and is what it reports.
                            let r = match r {
                                Err(e) if !abort2.is_aborted() => {
                                    *lock(&failure2) = Some(e);
                                    abort2.abort();
                                    Err(err("local receiver", "forwarding failed"))
                                }
                                r => r,
                            };
                            (r, stats)
                        }));
                    }
                }
                {
                    let mut u = lock(&up);
                    u.stream = stream.try_clone().ok();
                    u.sent = 0;
                    u.push_ack();
                }
                let mut reader = BufReader::with_capacity(1 << 18, &stream);
                loop {
                    match read_down(&mut reader) {
                        Err(_) if abort.is_aborted() => return Err(aborted()),
                        Err(_) => continue 'accept, // lost upstream: wait for another
                        Ok(Down::Done(t)) => {
                            if t == next {
                                break 'accept t;
                            }
                            // DONE overtook a resend after a NACK: the
                            // upstream sends the rest, then DONE again.
                        }
                        Ok(Down::Piece(p)) => {
                            report.bytes_received += p.bytes.len() as u64;
                            if p.seq != next {
                                report.discarded += 1;
                                continue;
                            }
                            if *blake3::hash(&p.bytes).as_bytes() != p.hash {
                                report.hash_failures += 1;
                                let mut w = &stream;
                                let _ = write_u64_frame(&mut w, T_NACK, next);
                                continue;
                            }
                            if forwarder.is_some() {
                                if !credit.acquire(&abort) {
                                    return Err(aborted());
                                }
                                let _ = tx.send(Event::Piece(p.clone()));
                            }
                            if let Err(e) = sink(&p) {
                                abort.abort();
                                return Err(err(me, format!("sink refused {}: {e}", p.describe())));
                            }
                            next += 1;
                            report.pieces += 1;
                            report.bytes += p.bytes.len() as u64;
                            let mut u = lock(&up);
                            u.delivered = next;
                            u.push_ack();
                        }
                    }
                }
            };
            let info = match forwarder {
                Some(h) => {
                    let _ = tx.send(Event::Done(total));
                    let (r, stats) = h
                        .join()
                        .map_err(|_| err(me, "forwarding thread panicked"))?;
                    report.pieces_forwarded = stats.pieces_sent;
                    report.bytes_forwarded = stats.bytes_sent;
                    report.retries = stats.retries;
                    report.peak_in_flight = stats.peak_in_flight;
                    match r {
                        Ok(info) => info,
                        Err(e) => return Err(lock(&failure).take().unwrap_or(e)),
                    }
                }
                None => FinalInfo::default(),
            };
            report.peak_queued = credit.peak();
            let u = lock(&up);
            if let Some(s) = u.stream.as_ref() {
                let mut w = s;
                write_final(&mut w, &info).map_err(|e| err(me, format!("sending FINAL: {e}")))?;
            }
            report.downstream_completed = info.completed;
            report.downstream_excluded = info.excluded;
            Ok(())
        });
        result?;
        report.duration = start.elapsed();
        Ok(report)
    }
}

fn accept(
    listener: &TcpListener,
    idle: Duration,
    abort: &AbortHandle,
) -> Result<(TcpStream, SocketAddr)> {
    let me = listener
        .local_addr()
        .map_or_else(|_| "listener".to_string(), |a| a.to_string());
    listener
        .set_nonblocking(true)
        .map_err(|e| err(&me, format!("listener: {e}")))?;
    let deadline = Instant::now() + idle;
    loop {
        if abort.is_aborted() {
            return Err(err(&me, "aborted"));
        }
        match listener.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false)
                    .map_err(|e| err(peer, format!("socket: {e}")))?;
                return Ok((s, peer));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(err(&me, format!("no upstream connected within {idle:?}")));
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(err(&me, format!("accept: {e}"))),
        }
    }
}
