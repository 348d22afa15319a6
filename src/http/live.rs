//! `GET /v1/live`: live metrics over WebSocket (actix-ws).
//!
//! Auth: the read key as `Authorization` header; from a browser (which cannot set headers on a
//! WebSocket) as the subprotocols `statsremote` and `key.<read key>`, which keeps the key out
//! of URLs and access logs (the server selects `statsremote`), or as `?key=`. Each connection is one task that waits for the tenant's next tick
//! (a `watch` channel: only the latest tick is kept, so a slow client skips ticks rather than
//! queueing them), and sends it, filtered to the events the client subscribed to with
//! `{"subscribe": ["event", ...]}` (`{"subscribe": []}` or `null` = everything). The server pings
//! every `live.ping_interval` and closes a connection it has not heard from (pong included) for
//! `live.idle_timeout`, or whose sends stay blocked that long. A session ends as soon as its key
//! is rotated or its tenant deleted, and each tenant has at most `reads.max_live_connections`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;

use crate::actors::live::LiveTick;
use crate::http::errors::ApiError;
use crate::http::slots::{ReadKind, ReadSlot};
use crate::http::{auth, AppState};
use crate::telemetry;
use crate::tenant::{KeyKind, KeyWatch, TenantDirectory};

/// Largest message a client may send.
const MAX_CLIENT_FRAME: usize = 64 * 1024;

/// The subprotocol a browser offers beside `key.<read key>`.
const SUBPROTOCOL: &str = "statsremote";

/// The subprotocols the client offers.
fn offered(req: &HttpRequest) -> impl Iterator<Item = &str> {
    (req.headers())
        .get_all(actix_web::http::header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
}

fn offers_subprotocol(req: &HttpRequest) -> bool {
    offered(req).any(|protocol| protocol == SUBPROTOCOL)
}

/// The read key offered as a subprotocol beside `statsremote` (`key.<read key>`), if any.
fn offered_key(req: &HttpRequest) -> Option<String> {
    if !offers_subprotocol(req) {
        return None;
    }
    offered(req)
        .find_map(|protocol| protocol.strip_prefix("key."))
        .map(str::to_string)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveParams {
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientMessage {
    subscribe: Option<Vec<String>>,
}

pub async fn live(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    params: web::Query<LiveParams>,
) -> Result<HttpResponse, ApiError> {
    let offered = offered_key(&req);
    let key = match auth::header_credential(&req)? {
        Some(key) => Some(key),
        None => offered.clone().or(params.into_inner().key),
    };
    let tenant = auth::tenant_for_key(&state.directory, key.as_deref(), KeyKind::Read)?;
    let slot = state.read_slots.take(tenant.id, ReadKind::Live)?;
    let key_watch = state
        .directory
        .watch_key(key.as_deref().unwrap_or_default());
    let ticks = state.pipelines.pipeline(tenant.id).subscribe_live();
    let (mut response, session, stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::bad_request(format!("not a WebSocket upgrade request: {e}")))?;
    if offers_subprotocol(&req) {
        // A browser fails the connection unless one of the offered subprotocols is selected.
        response.headers_mut().insert(
            actix_web::http::header::SEC_WEBSOCKET_PROTOCOL,
            actix_web::http::header::HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    let settings = SessionSettings {
        tenant: tenant.id.to_string(),
        ping_interval: state.config.live.ping_interval,
        idle_timeout: state.config.live.idle_timeout,
        directory: Arc::clone(&state.directory),
        key_watch,
        _slot: slot,
    };
    actix_web::rt::spawn(run_session(
        session,
        stream.max_frame_size(MAX_CLIENT_FRAME),
        ticks,
        settings,
    ));
    Ok(response)
}

struct SessionSettings {
    tenant: String,
    ping_interval: Duration,
    idle_timeout: Duration,
    directory: Arc<TenantDirectory>,
    /// The session ends when its key is rotated or deleted.
    key_watch: KeyWatch,
    /// The tenant's place for one more live connection, held as long as the session.
    _slot: ReadSlot,
}

/// Counts the subscriber for as long as the session lives.
struct Subscribed(String);

impl Subscribed {
    fn new(tenant: &str) -> Subscribed {
        telemetry::live_subscribers(tenant, 1.0);
        Subscribed(tenant.to_string())
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        telemetry::live_subscribers(&self.0, -1.0);
    }
}

/// The tick as this subscriber wants it: the hub's shared rendering, or a filtered one.
fn render(tick: &LiveTick, filter: Option<&HashSet<String>>) -> String {
    match filter {
        None if !tick.json.is_empty() => tick.json.to_string(),
        None => serde_json::to_string(tick).unwrap_or_default(),
        Some(events) => serde_json::to_string(&LiveTick {
            seq: tick.seq,
            ts: tick.ts.clone(),
            second: tick.second.only(events),
            minute: tick.minute.only(events),
            json: Arc::from(""),
        })
        .unwrap_or_default(),
    }
}

async fn run_session(
    mut session: actix_ws::Session,
    mut stream: actix_ws::MessageStream,
    mut ticks: watch::Receiver<Arc<LiveTick>>,
    mut settings: SessionSettings,
) {
    let _subscribed = Subscribed::new(&settings.tenant);
    let mut filter: Option<HashSet<String>> = None;
    let mut last_seq = ticks.borrow_and_update().seq;
    if last_seq > 0 {
        // The latest tick goes out at once, so a new session shows numbers without waiting
        // for the next second.
        ticks.mark_changed();
    }
    let mut last_heard = Instant::now();
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.tick().await;
    let close_reason = loop {
        tokio::select! {
            changed = ticks.changed() => {
                if changed.is_err() {
                    break Some(CloseReason { code: CloseCode::Restart, description: Some("tenant pipeline stopped".into()) });
                }
                let tick = Arc::clone(&ticks.borrow_and_update());
                if last_seq > 0 && tick.seq > last_seq + 1 {
                    telemetry::live_coalesced(&settings.tenant, tick.seq - last_seq - 1);
                }
                last_seq = tick.seq;
                let text = render(&tick, filter.as_ref());
                match tokio::time::timeout(settings.idle_timeout, session.text(text)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_closed)) => break None,
                    Err(_timeout) => break Some(CloseReason { code: CloseCode::Policy, description: Some("client too slow".into()) }),
                }
            }
            message = stream.next() => {
                last_heard = Instant::now();
                match message {
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<ClientMessage>(&text) {
                            Ok(ClientMessage { subscribe }) => {
                                filter = subscribe.filter(|events| !events.is_empty()).map(|events| events.into_iter().collect());
                            }
                            Err(error) => {
                                let reply = serde_json::json!({"error": format!("expected {{\"subscribe\": [\"event\", ...]}}: {error}")});
                                if session.text(reply.to_string()).await.is_err() {
                                    break None;
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Ping(bytes))) => {
                        if session.pong(&bytes).await.is_err() {
                            break None;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        break Some(CloseReason { code: CloseCode::Protocol, description: Some(error.to_string()) });
                    }
                }
            }
            () = settings.key_watch.revoked(&settings.directory) => {
                break Some(CloseReason { code: CloseCode::Policy, description: Some("key revoked".into()) });
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > settings.idle_timeout {
                    break Some(CloseReason { code: CloseCode::Away, description: Some("idle timeout".into()) });
                }
                if session.ping(b"").await.is_err() {
                    break None;
                }
            }
        }
    };
    let _ = session.close(close_reason).await;
}
