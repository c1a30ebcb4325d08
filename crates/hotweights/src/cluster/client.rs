//! The coordinator's client, as workers, sources and `rollout` use it.
//!
//! A [`CoordClient`] is given one or more coordinator addresses (the leader
//! and its standbys, in any order). A call that finds its coordinator
//! unreachable, or a standby (`UNAVAILABLE`), is retried on the next address,
//! round and round with a short pause, until `retry_for` has passed; any
//! other answer (a refused rollout call, a wrong token) returns at once. All
//! calls are idempotent, so retrying one whose reply was lost is safe.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use super::Token;
use super::proto::coordinator_client::CoordinatorClient;
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

/// A client of one coordinator group. See the module documentation.
pub struct CoordClient {
    endpoints: Vec<String>,
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
            .field("token", &self.auth.0.as_ref().map(|_| "***"))
            .finish()
    }
}

/// `host:port` or `http://host:port`, as a URL.
fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

impl CoordClient {
    /// A client of the coordinators at `addrs` (comma-separated
    /// `host:port`s), sending `token` with every call.
    pub fn new(addrs: &str, token: Option<&Token>) -> Result<CoordClient> {
        let endpoints: Vec<String> = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(url)
            .collect();
        if endpoints.is_empty() {
            return Err(HotweightsError::Option(
                "no coordinator address given; pass --coord HOST:PORT[,HOST:PORT...]".into(),
            ));
        }
        for e in &endpoints {
            Endpoint::from_shared(e.clone()).map_err(|err| {
                HotweightsError::Option(format!("coordinator address {e}: {err}"))
            })?;
        }
        let auth = match token {
            Some(t) => Some(t.header().parse::<MetadataValue<Ascii>>().map_err(|_| {
                HotweightsError::Option("the token cannot be sent as a header".into())
            })?),
            None => None,
        };
        Ok(CoordClient {
            endpoints,
            auth: Auth(auth),
            at: 0,
            stub: None,
            retry_for: Duration::from_secs(15),
        })
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
        let endpoint = Endpoint::from_shared(self.endpoint().to_owned())
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
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
                Ok(stub) => match call(stub).await {
                    Ok(r) => return Ok(r.into_inner()),
                    Err(s) => s,
                },
                Err(s) => s,
            };
            let retry = matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            );
            if !retry || start.elapsed() >= self.retry_for {
                return Err(rpc_error(self.endpoint(), what, &status));
            }
            self.rotate();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
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
