//! The coordinator's client, as workers, sources and `rollout` use it.
//!
//! A [`CoordClient`] is given one or more coordinator addresses (the leader
//! and its standbys, in any order). A call that finds its coordinator
//! unreachable, or a standby (`UNAVAILABLE`), is retried on the next address,
//! round and round with a short pause, until `retry_for` has passed; any
//! other answer (a refused rollout call, a wrong token) returns at once. All
//! calls are idempotent, so retrying one whose reply was lost is safe.
//!
//! Nothing waits forever on a coordinator that stopped answering: a call
//! with no reply within [`CALL_TIMEOUT`] counts as unreachable (and is
//! retried), and HTTP/2 pings every [`KEEPALIVE`] close a connection whose
//! peer vanished without a FIN (a partition, a host gone), which ends any
//! watch stream on it so that its owner reconnects. A TLS mismatch (an
//! untrusted certificate, or plaintext against a TLS coordinator) fails at
//! once: retrying cannot fix a configuration.
//!
//! # TLS
//!
//! TLS is optional. With a [`ClientTls`] ([`CoordClient::with_tls`];
//! `--tls-ca FILE` on the command line) the client speaks `https://` to
//! every coordinator and trusts only the certificates of that PEM CA bundle;
//! the certificate must name the host part of the address (or the
//! `--tls-domain` override, for a certificate issued to a hostname while
//! connecting by IP). Without it the control plane is plaintext HTTP/2.
//! TLS is recommended together with a token: the bearer token then never
//! crosses the network in the clear. rustls does the TLS, with ring as the
//! crypto provider; no OpenSSL is involved.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};

use super::Token;
use super::proto::coordinator_client::CoordinatorClient;

/// How long one call may wait for its reply (for a watch: for the stream to
/// open) before it counts as unreachable. Plans up to 1 GiB go through
/// `GetPlan`, hence the generous bound.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The HTTP/2 ping period on coordinator connections; a ping unanswered for
/// as long again closes the connection.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
use crate::error::{HotweightsError, Result};

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// The generated client with the token interceptor.
pub type Stub = CoordinatorClient<InterceptedService<Channel, Auth>>;

/// The client side of TLS on the control plane: the CA bundle to trust and,
/// optionally, the name the coordinators' certificates must carry. See the
/// module documentation.
#[derive(Clone)]
pub struct ClientTls {
    /// Where the CA bundle came from, for messages.
    origin: String,
    ca: Certificate,
    domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.origin)
            .field("domain", &self.domain)
            .finish()
    }
}

impl ClientTls {
    /// Trusts the PEM certificates in `pem` (`origin` names them in
    /// errors). `domain`, when given, is the name the coordinators'
    /// certificates must carry instead of the host part of their address.
    pub fn from_pem(pem: impl AsRef<[u8]>, origin: &str, domain: Option<String>) -> Result<Self> {
        let pem = pem.as_ref();
        if !pem
            .windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            return Err(HotweightsError::Option(format!(
                "TLS CA bundle {origin}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
            )));
        }
        if let Some(d) = &domain
            && d.trim().is_empty()
        {
            return Err(HotweightsError::Option(
                "the TLS domain name is empty".into(),
            ));
        }
        Ok(ClientTls {
            origin: origin.to_owned(),
            ca: Certificate::from_pem(pem),
            domain,
        })
    }

    /// [`ClientTls::from_pem`] with the bundle read from `path`.
    pub fn from_file(path: &Path, domain: Option<String>) -> Result<Self> {
        let pem = std::fs::read(path).map_err(|e| {
            HotweightsError::Option(format!("reading the TLS CA bundle {}: {e}", path.display()))
        })?;
        Self::from_pem(pem, &path.display().to_string(), domain)
    }

    /// The tonic configuration for a coordinator at `url`.
    fn config(&self, url: &str) -> ClientTlsConfig {
        let domain = self.domain.clone().unwrap_or_else(|| host(url).to_owned());
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(domain)
    }

    /// `endpoint` with this TLS configuration.
    fn apply(&self, endpoint: Endpoint, url: &str) -> Result<Endpoint> {
        endpoint.tls_config(self.config(url)).map_err(|e| {
            HotweightsError::Option(format!(
                "TLS for coordinator {url} (CA bundle {}): {}",
                self.origin,
                chain(&e)
            ))
        })
    }
}

/// The host part of a URL (`https://host:port/...`), without the brackets
/// of an IPv6 address.
fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// How a process reaches its coordinators: their addresses, the token and
/// the TLS settings. Every task that needs its own client makes one from
/// it ([`CoordTarget::client`]).
#[derive(Debug, Clone)]
pub struct CoordTarget {
    /// Coordinator addresses, comma-separated.
    pub addrs: String,
    /// Bearer token.
    pub token: Option<Token>,
    /// TLS to the coordinators; `None` for plaintext.
    pub tls: Option<ClientTls>,
}

impl CoordTarget {
    /// A new client of these coordinators.
    pub fn client(&self) -> Result<CoordClient> {
        CoordClient::new(&self.addrs, self.token.as_ref())?.with_tls(self.tls.clone())
    }
}

/// A client of one coordinator group. See the module documentation.
pub struct CoordClient {
    /// The addresses as given (`host:port` or a URL).
    addrs: Vec<String>,
    endpoints: Vec<String>,
    tls: Option<ClientTls>,
    auth: Auth,
    at: usize,
    stub: Option<Stub>,
    /// How long a call keeps trying other coordinators before it fails.
    pub retry_for: Duration,
}

impl std::fmt::Debug for CoordClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordClient")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("token", &self.auth.0.as_ref().map(|_| "***"))
            .finish()
    }
}

/// `host:port` or `http(s)://host:port`, as a URL: `https://` with TLS.
/// A scheme that contradicts the TLS setting is an error.
fn url(addr: &str, tls: bool) -> Result<String> {
    let lower = addr.to_ascii_lowercase();
    if lower.starts_with("http://") && tls {
        return Err(HotweightsError::Option(format!(
            "coordinator address {addr}: http:// with a TLS CA bundle; write HOST:PORT or https://"
        )));
    }
    if lower.starts_with("https://") && !tls {
        return Err(HotweightsError::Option(format!(
            "coordinator address {addr}: https:// needs the CA bundle to trust; pass --tls-ca FILE"
        )));
    }
    Ok(if addr.contains("://") {
        addr.to_owned()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    })
}

impl CoordClient {
    /// A client of the coordinators at `addrs` (comma-separated
    /// `host:port`s), sending `token` with every call.
    /// Plaintext unless [`CoordClient::with_tls`] is called.
    pub fn new(addrs: &str, token: Option<&Token>) -> Result<CoordClient> {
        let addrs: Vec<String> = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect();
        if addrs.is_empty() {
            return Err(HotweightsError::Option(
                "no coordinator address given; pass --coord HOST:PORT[,HOST:PORT...]".into(),
            ));
        }
        let endpoints = Self::endpoints(&addrs, None)?;
        let auth = match token {
            Some(t) => Some(t.header().parse::<MetadataValue<Ascii>>().map_err(|_| {
                HotweightsError::Option("the token cannot be sent as a header".into())
            })?),
            None => None,
        };
        Ok(CoordClient {
            addrs,
            endpoints,
            tls: None,
            auth: Auth(auth),
            at: 0,
            stub: None,
            retry_for: Duration::from_secs(15),
        })
    }

    /// The URLs of `addrs`, checked (with `tls`, that it applies to each).
    fn endpoints(addrs: &[String], tls: Option<&ClientTls>) -> Result<Vec<String>> {
        let mut endpoints = Vec::with_capacity(addrs.len());
        for a in addrs {
            let e = url(a, tls.is_some())?;
            let endpoint = Endpoint::from_shared(e.clone()).map_err(|err| {
                HotweightsError::Option(format!("coordinator address {e}: {err}"))
            })?;
            if let Some(t) = tls {
                t.apply(endpoint, &e)?;
            }
            endpoints.push(e);
        }
        Ok(endpoints)
    }

    /// Speaks TLS to the coordinators with `tls` (plaintext with `None`).
    /// See the module documentation.
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Result<CoordClient> {
        self.endpoints = Self::endpoints(&self.addrs, tls.as_ref())?;
        self.tls = tls;
        self.stub = None;
        Ok(self)
    }

    /// Whether calls go over TLS.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// The coordinator the client talks to now.
    pub fn endpoint(&self) -> &str {
        &self.endpoints[self.at % self.endpoints.len()]
    }

    /// A connected stub, connecting to the current endpoint if needed.
    pub async fn stub(&mut self) -> std::result::Result<Stub, Status> {
        if let Some(s) = &self.stub {
            return Ok(s.clone());
        }
        let mut endpoint = Endpoint::from_shared(self.endpoint().to_owned())
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = tls
                .apply(endpoint, self.endpoint())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("{}: {}", self.endpoint(), chain(&e))))?;
        let stub = CoordinatorClient::with_interceptor(channel, self.auth.clone())
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30);
        self.stub = Some(stub.clone());
        Ok(stub)
    }

    /// Moves on to the next coordinator.
    pub fn rotate(&mut self) {
        self.stub = None;
        self.at = (self.at + 1) % self.endpoints.len();
    }

    /// Runs `call`, retrying on the next coordinator while they are
    /// unreachable or standbys (see the module documentation).
    pub async fn call<T, F, Fut>(&mut self, what: &str, mut call: F) -> Result<T>
    where
        F: FnMut(Stub) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let start = Instant::now();
        loop {
            let status = match self.stub().await {
                Ok(stub) => match tokio::time::timeout(CALL_TIMEOUT, call(stub)).await {
                    Ok(Ok(r)) => return Ok(r.into_inner()),
                    Ok(Err(s)) => s,
                    Err(_) => {
                        Status::unavailable(format!("no reply within {}s", CALL_TIMEOUT.as_secs()))
                    }
                },
                Err(s) => s,
            };
            let transport = matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            );
            let retry = transport && !tls_mismatch(&status);
            if !retry || start.elapsed() >= self.retry_for {
                let mut err = rpc_error(self.endpoint(), what, &status);
                if let HotweightsError::Transfer { message, .. } = &mut err {
                    // A transport failure: perhaps TLS on one side only.
                    if transport {
                        message.push_str(if self.tls.is_some() {
                            "; this client uses TLS (--tls-ca): does the coordinator serve TLS \
                             (--tls-cert/--tls-key) with a certificate the CA signed, for this host \
                             or --tls-domain?"
                        } else {
                            "; if the coordinator serves TLS, pass its CA bundle with --tls-ca"
                        });
                    }
                }
                return Err(err);
            }
            self.rotate();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether `status` says the two ends disagree about TLS: the client
/// distrusts the certificate, or spoke plaintext HTTP/2 to a TLS listener
/// (whose handshake alert reads as an HTTP/2 protocol error).
fn tls_mismatch(status: &Status) -> bool {
    let m = status.message();
    m.contains("certificate") || m.contains("h2 protocol error")
}

/// The crate error for a failed call.
pub fn rpc_error(endpoint: &str, what: &str, status: &Status) -> HotweightsError {
    let hint = match status.code() {
        Code::Unauthenticated => {
            "; pass the coordinator's token with --token-file (the same file it was started with)"
        }
        Code::Unavailable => "; is the coordinator running, and is this address its --listen?",
        _ => "",
    };
    HotweightsError::Transfer {
        peer: format!("coordinator {endpoint}"),
        message: format!("{what}: {:?}: {}{hint}", status.code(), status.message()),
    }
}

/// An error with its sources, on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_host_of_an_address_is_the_tls_name() {
        assert_eq!(host("https://127.0.0.1:7070"), "127.0.0.1");
        assert_eq!(host("https://coord.example:7070/"), "coord.example");
        assert_eq!(host("https://[::1]:7070"), "::1");
        assert_eq!(host("localhost"), "localhost");
    }

    #[test]
    fn tls_switches_the_scheme_and_a_contradicting_one_is_refused() {
        let tls = ClientTls::from_pem(PEM, "ca.pem", None).unwrap_or_else(|e| panic!("{e}"));
        let c = CoordClient::new("127.0.0.1:1, localhost:2", None)
            .and_then(|c| c.with_tls(Some(tls.clone())))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.endpoints, ["https://127.0.0.1:1", "https://localhost:2"]);
        let plain = CoordClient::new("127.0.0.1:1", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain.endpoint(), "http://127.0.0.1:1");
        let e = CoordClient::new("http://127.0.0.1:1", None)
            .and_then(|c| c.with_tls(Some(tls)))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("http://"), "{e}");
        let e = CoordClient::new("https://127.0.0.1:1", None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--tls-ca"), "{e}");
    }

    #[test]
    fn a_ca_bundle_without_a_certificate_is_refused_by_name() {
        let e = ClientTls::from_pem("not pem", "bundle.pem", None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("bundle.pem"), "{e}");
        let e = ClientTls::from_file(Path::new("/nonexistent/ca.pem"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
