//! What every cluster process does on (re)connecting to the coordinator:
//! register, heartbeat on its own task, and follow the `watch` stream as a
//! series of whole states to reconcile with.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::Streaming;

use super::client::{CoordClient, CoordTarget, rpc_error};
use super::proto;
use crate::error::{HotweightsError, Result};

/// What a heartbeat reports.
#[derive(Debug, Clone, Default)]
pub(crate) struct Beat {
    pub(crate) current_version: String,
    pub(crate) last_pause_ns: u64,
    pub(crate) last_flip_unix_ns: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Heartbeats every `period` (and whenever `poke` is notified), registering
/// again when the coordinator no longer knows this process.
pub(crate) fn heartbeat_task(
    target: CoordTarget,
    register: proto::RegisterRequest,
    period: Duration,
    beat: Option<(Arc<Mutex<Beat>>, Arc<Notify>)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut client) = target.client() else {
            return;
        };
        client.retry_for = period;
        loop {
            let b = beat
                .as_ref()
                .map(|(b, _)| lock(b).clone())
                .unwrap_or_default();
            let req = proto::HeartbeatRequest {
                id: register.id.clone(),
                current_version: b.current_version.clone(),
                last_pause_ns: b.last_pause_ns,
                last_flip_unix_ns: b.last_flip_unix_ns,
            };
            let known = client
                .call("Heartbeat", |mut s| {
                    let r = req.clone();
                    async move { s.heartbeat(r).await }
                })
                .await;
            if let Ok(proto::HeartbeatReply { known: false }) = known {
                let mut r = register.clone();
                r.current_version = b.current_version.clone();
                let _ = client
                    .call("Register", |mut s| {
                        let r = r.clone();
                        async move { s.register(r).await }
                    })
                    .await;
            }
            match &beat {
                Some((_, poke)) => {
                    tokio::select! {
                        () = tokio::time::sleep(period) => {}
                        () = poke.notified() => {}
                    }
                }
                None => tokio::time::sleep(period).await,
            }
        }
    })
}

/// Registers, starts heartbeating (every third of the lease the
/// coordinator names) and opens the watch stream. Abort the returned task
/// when the session ends.
pub(crate) async fn join(
    client: &mut CoordClient,
    target: &CoordTarget,
    register: proto::RegisterRequest,
    beat: Option<(Arc<Mutex<Beat>>, Arc<Notify>)>,
) -> Result<(Streaming<proto::WatchMessage>, JoinHandle<()>)> {
    let reg = register.clone();
    let reply = client
        .call("Register", |mut s| {
            let r = reg.clone();
            async move { s.register(r).await }
        })
        .await?;
    let heartbeat = heartbeat_task(
        target.clone(),
        register,
        Duration::from_millis(reply.heartbeat_ms.max(1)),
        beat,
    );
    let stream = client
        .call("Watch", |mut s| async move {
            s.watch(proto::StatusRequest {}).await
        })
        .await;
    match stream {
        Ok(s) => Ok((s, heartbeat)),
        Err(e) => {
            heartbeat.abort();
            Err(e)
        }
    }
}

/// The coordinator's state after the stream's next message: the status
/// it carries, or a fresh one for an event. Progress events need no
/// action and are skipped. An error when the stream breaks or ends.
pub(crate) async fn next_status(
    client: &mut CoordClient,
    stream: &mut Streaming<proto::WatchMessage>,
) -> Result<proto::StatusReply> {
    loop {
        let msg = stream
            .message()
            .await
            .map_err(|s| rpc_error(client.endpoint(), "Watch", &s))?;
        let Some(msg) = msg else {
            return Err(HotweightsError::Transfer {
                peer: client.endpoint().to_owned(),
                message: "the watch stream ended".into(),
            });
        };
        match msg.kind {
            Some(proto::watch_message::Kind::Status(s)) => return Ok(s),
            Some(proto::watch_message::Kind::Event(e)) if e.kind == "progress" => continue,
            _ => {
                return client
                    .call("Status", |mut s| async move {
                        s.status(proto::StatusRequest {}).await
                    })
                    .await;
            }
        }
    }
}
