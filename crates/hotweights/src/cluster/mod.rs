//! A hotweights cluster: a coordinator, a source and workers that roll a new
//! version out to every replica together, or to none.
//!
//! # The processes
//!
//! - The **coordinator** ([`coord::serve`], `bstack hotweights coord serve`)
//!   is a gRPC service (see `proto/bstack/hotweights/v1/cluster.proto`) over
//!   the [`Coordinator`](crate::coordinator::Coordinator) core: it accepts
//!   sealed plans, holds worker leases, runs each rollout's state machine
//!   ([`crate::rollout`]) and keeps its state in a
//!   [`StateStore`](crate::coordstate::StateStore) (an embedded redb file,
//!   or Redis with a leader lease and standbys). It never touches weight
//!   bytes.
//! - A **source** ([`source::run`], `bstack hotweights serve-source`) holds
//!   the next version's checkpoint. When a rollout to that version begins it
//!   broadcasts the plan's buckets down a chain of the consumers
//!   ([`crate::dataplane`]); it also serves catch-up transfers to workers
//!   that missed a rollout.
//! - A **worker** ([`worker::run`], `bstack hotweights worker`) sits beside a
//!   serving engine with a versioned [`Store`](crate::Store). On `begin` it
//!   receives the buckets (verifying every piece, forwarding it down the
//!   chain), stages the version (every chunk checked against its hash) and
//!   precommits; on `commit` it pauses the engine through its
//!   [`hook`], flips `current`, resumes, and reports how long the pause took;
//!   on `abort` it discards what it staged.
//! - [`drive::rollout`] (`bstack hotweights rollout`) submits a plan, begins,
//!   waits for every precommit, commits and waits for every worker to flip.
//!
//! # Reconciliation
//!
//! Workers and sources do not act on events one by one: every message of
//! the `watch` stream (the first is the whole state) makes them compare the
//! coordinator's state with their own and do what is missing. A process that
//! reconnects after a coordinator restart, or that joins late, therefore
//! does exactly what one that saw every event would.
//!
//! # Auth
//!
//! With a token ([`Token`]), every call carries `authorization: Bearer
//! TOKEN`; the coordinator compares it in constant time and answers
//! `UNAUTHENTICATED` without changing anything. The token never appears in
//! events, logs, errors or `Debug` output.
//!
//! TLS is optional ([`coord::ServerTls`] on the coordinator,
//! [`client::ClientTls`] on every client; rustls with ring): recommended with
//! a token, so that the token never crosses the network in the clear.

pub mod client;
pub mod coord;
pub mod drive;
pub mod hook;
pub mod metrics;
mod session;
pub mod source;
pub mod worker;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Types and gRPC stubs generated from
/// `proto/bstack/hotweights/v1/cluster.proto`. Plans and manifests are the
/// [`bstack_plan`] crate's own types.
#[allow(
    unused_qualifications,
    missing_docs,
    reason = "tonic's generated stubs spell out every path and document only what the schema does"
)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/bstack.hotweights.v1.rs"));
}

/// A bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token from its text; surrounding whitespace (a file's trailing
    /// newline) is dropped. Empty text is refused.
    pub fn new(text: &str) -> crate::Result<Token> {
        let t = text.trim();
        if t.is_empty() {
            return Err(crate::HotweightsError::Option(
                "the token is empty; put a secret in the token file".into(),
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(crate::HotweightsError::Option(
                "the token must be printable ASCII without spaces".into(),
            ));
        }
        Ok(Token(t.to_owned()))
    }

    /// Reads a token from a file.
    pub fn from_file(path: &std::path::Path) -> crate::Result<Token> {
        let text =
            std::fs::read_to_string(path).map_err(|e| crate::HotweightsError::io(path, e))?;
        Token::new(&text)
            .map_err(|e| crate::HotweightsError::Option(format!("{}: {e}", path.display())))
    }

    /// The `authorization` header value.
    pub(crate) fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `header` (an `authorization` value) carries this token,
    /// compared in constant time.
    pub(crate) fn accepts(&self, header: &[u8]) -> bool {
        let expected = self.header();
        constant_time_eq::constant_time_eq(expected.as_bytes(), header)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Nanoseconds since the Unix epoch: the coordinator's clock for leases and
/// deadlines, which must survive a restart.
pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The transfer id of a plan's broadcast: the first 8 bytes of the BLAKE3
/// of its digest, so every sender of one plan uses the same id and a
/// receiver resumes only the transfer it was in.
pub fn transfer_id(digest: &str) -> u64 {
    let h = blake3::hash(digest.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// The address other processes reach a listener at: `advertise` when given
/// (its port 0 standing for the port bound), else the bound address itself,
/// which must then name one interface: an address bound to all of them
/// (`0.0.0.0`) cannot be dialled, so it needs `--advertise`.
pub fn advertised(bound: SocketAddr, advertise: Option<SocketAddr>) -> crate::Result<SocketAddr> {
    match advertise {
        Some(mut a) => {
            if a.ip().is_unspecified() {
                return Err(crate::HotweightsError::Option(format!(
                    "--advertise {a}: give the address others reach this process at, not an unspecified one"
                )));
            }
            if a.port() == 0 {
                a.set_port(bound.port());
            }
            Ok(a)
        }
        None if bound.ip().is_unspecified() => Err(crate::HotweightsError::Option(format!(
            "listening on {bound}, all interfaces: pass --advertise HOST:PORT, the address the \
             source, the other workers and the coordinator's clients reach this process at"
        ))),
        None => Ok(bound),
    }
}
