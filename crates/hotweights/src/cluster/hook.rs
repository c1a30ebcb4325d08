//! How a worker lets its serving engine take part in a flip.
//!
//! A serving engine must not read weights while `current` changes under
//! it. Before the flip the worker *pauses* the engine, after it *resumes*
//! it, and reports how long the engine was paused (from the pause being
//! acknowledged to the resume being sent: the flip itself, which is one
//! atomic rename in the store).
//!
//! A [`Hook`] is either a command (run by `sh -c`, with `HOTWEIGHTS_VERSION`
//! set to the version being switched to; exit 0 is success) or an HTTP
//! endpoint (`http://host:port/path`, sent a `POST` with the version as the
//! body; a 2xx status is success). Either must answer within the hook's
//! timeout. A pause that fails leaves the store as it was and the worker
//! reports the failure; a resume that fails is reported but the flip stands
//! (the new version is what the cluster committed).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::error::{HotweightsError, Result};

/// One action of a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A shell command.
    Command(String),
    /// An HTTP endpoint, sent a `POST`.
    Http(String),
}

impl Action {
    /// `http://...` is an endpoint; anything else a shell command.
    pub fn parse(text: &str) -> Action {
        if text.starts_with("http://") {
            Action::Http(text.to_owned())
        } else {
            Action::Command(text.to_owned())
        }
    }

    /// Runs the action for a switch to `version`.
    pub async fn run(&self, version: &str, timeout: Duration) -> Result<()> {
        let work = async {
            match self {
                Action::Command(cmd) => run_command(cmd, version).await,
                Action::Http(url) => post(url, version).await,
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(HotweightsError::Option(format!(
                "hook {} did not answer within {timeout:?}",
                self.describe()
            ))),
        }
    }

    fn describe(&self) -> String {
        match self {
            Action::Command(c) => format!("command {c:?}"),
            Action::Http(u) => format!("POST {u}"),
        }
    }
}

/// Pause and resume actions.
#[derive(Debug, Clone)]
pub struct Hook {
    /// Run before the flip.
    pub pause: Action,
    /// Run after the flip.
    pub resume: Action,
    /// Limit on each action.
    pub timeout: Duration,
}

async fn run_command(cmd: &str, version: &str) -> Result<()> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("HOTWEIGHTS_VERSION", version)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| HotweightsError::Option(format!("hook command {cmd:?}: cannot run: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(HotweightsError::Option(format!(
            "hook command {cmd:?} failed ({}): {}",
            out.status,
            err.trim()
        )))
    }
}

async fn post(url: &str, version: &str) -> Result<()> {
    let fail = |m: String| HotweightsError::Option(format!("hook POST {url}: {m}"));
    let uri: hyper::Uri = url.parse().map_err(|e| fail(format!("{e}")))?;
    let host = uri.host().ok_or_else(|| fail("no host".into()))?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(version.to_owned())))
        .map_err(|e| fail(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let code = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    driver.abort();
    if code.is_success() {
        Ok(())
    } else {
        Err(fail(format!(
            "answered {code}: {}",
            String::from_utf8_lossy(&body).trim()
        )))
    }
}
