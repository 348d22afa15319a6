//! PostHog capture compatibility: the legacy endpoints (`/e`, `/i/v0/e`, `/batch`, `/capture`,
//! `/track`, `/engage`, with or without a trailing slash) and the v1 endpoint
//! (`/i/v1/analytics/events`), so that PostHog's SDKs send to StatsRemote unchanged.
//!
//! A tenant's write key is its PostHog project key. Bodies arrive as they do at PostHog: JSON
//! (an array of events, `{api_key|token, batch, sent_at}`, or one event), gzip by
//! `Content-Encoding` or by its magic bytes (`?compression=gzip-js` sends it as `text/plain`),
//! base64 (`?compression=base64`), or in a form field `data=`. Each event becomes an
//! [`IncomingEvent`]: `uuid` is its dedup id, `distinct_id` its user, `$set` its traits, and
//! `timestamp`, `offset` and `sent_at` give its time. From there on it is stored like any other.

use std::borrow::Cow;
use std::time::Instant;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{now_micros, parse_timestamp, EventKind, IncomingEvent, Micros};
use crate::http::errors::ApiError;
use crate::http::ingest::{self, Stored};
use crate::http::segment::{ParseLimits, ParsedRequest, Rejection};
use crate::http::{auth, body, lz64, AppState};
use crate::json::Members;
use crate::tenant::KeyKind;

/// Which PostHog protocol a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `/e`, `/batch`, ...: `{"status": 1}` on success.
    Legacy,
    /// `/i/v1/analytics/events`: the key in `Authorization: Bearer`, and a per-event reply.
    V1,
}

/// The legacy capture paths (each also served with a trailing slash).
pub const LEGACY_PATHS: [&str; 6] = ["/e", "/i/v0/e", "/batch", "/capture", "/track", "/engage"];

/// The v1 capture path.
pub const V1_PATH: &str = "/i/v1/analytics/events";

/// Query parameters PostHog's SDKs send; others (`ver`, `_`, `ip`) are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct CaptureQuery {
    compression: Option<String>,
    beacon: Option<String>,
    data: Option<String>,
}

/// Handles a capture request on a PostHog route.
pub async fn capture(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    query: web::Query<CaptureQuery>,
    protocol: Protocol,
    endpoint: &'static str,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let header_key = auth::header_credential(&req)?;
    if let Some(reason) = state.disk.too_low() {
        return Err(ApiError::unavailable(reason));
    }
    let limits = &state.config.limits;
    let max_body = usize::try_from(limits.max_body_bytes.as_u64()).unwrap_or(usize::MAX);
    let raw = if req.method() == actix_web::http::Method::GET {
        bytes::Bytes::new()
    } else {
        body::receive(&req, payload, max_body, state.config.server.body_timeout)
            .await?
            .decoded(max_body)?
    };
    let received_at = now_micros();
    let body_read = Instant::now();
    let json = unwrap_body(&req, &raw, &query, max_body)?;
    let limits = ParseLimits {
        max_event_bytes: usize::try_from(limits.max_event_bytes.as_u64()).unwrap_or(usize::MAX),
        max_events: limits.max_events_per_request,
        max_event_members: limits.max_event_members,
    };
    let mut request = parse(&json, &limits, received_at)?;
    // v1 SDKs name themselves in a header instead of `$lib` ("posthog-python/7.91.1").
    if let Some(info) = (req.headers().get("posthog-sdk-info")).and_then(|v| v.to_str().ok()) {
        let (name, version) = info.split_once('/').unwrap_or((info, ""));
        let context =
            serde_json::json!({ "library": { "name": name, "version": version } }).to_string();
        for event in request
            .parsed
            .events
            .iter_mut()
            .filter(|e| e.context.is_none())
        {
            event.context = Some(context.clone());
        }
    }
    let key = header_key.or_else(|| request.parsed.write_key.clone());
    let tenant = auth::tenant_for_key(&state.directory, key.as_deref(), KeyKind::Write)?;
    let uuids: Vec<Option<String>> = (request.parsed.events.iter())
        .map(|event| event.message_id.clone())
        .collect();
    let times = ingest::RequestTimes {
        started,
        body_read,
        parsed: Instant::now(),
    };
    let stored = ingest::store(
        &req,
        &state,
        &tenant,
        request.parsed,
        endpoint,
        received_at,
        times,
    )
    .await?;
    Ok(reply(protocol, query.beacon.as_deref(), &stored, &uuids))
}

fn reply(
    protocol: Protocol,
    beacon: Option<&str>,
    stored: &Stored,
    uuids: &[Option<String>],
) -> HttpResponse {
    if beacon == Some("1") {
        return HttpResponse::NoContent().finish();
    }
    match protocol {
        Protocol::Legacy => HttpResponse::Ok().json(serde_json::json!({ "status": 1 })),
        Protocol::V1 => {
            // Stored and duplicate events are `ok` and rejected ones `drop`: the SDK resends
            // none of them (only `retry` is resent, and failures of the whole request).
            let mut results = serde_json::Map::new();
            for (position, uuid) in uuids.iter().enumerate() {
                if let Some(uuid) = uuid {
                    let details = if stored.duplicate_positions.binary_search(&position).is_ok() {
                        "duplicate"
                    } else if stored.sampled_out.binary_search(&position).is_ok() {
                        "sampled_out"
                    } else {
                        "stored"
                    };
                    results.insert(
                        uuid.clone(),
                        serde_json::json!({ "result": "ok", "details": details }),
                    );
                }
            }
            for rejection in &stored.rejected {
                if let Some(uuid) = &rejection.message_id {
                    results.insert(
                        uuid.clone(),
                        serde_json::json!({ "result": "drop", "details": rejection.reason }),
                    );
                }
            }
            HttpResponse::Ok().json(serde_json::json!({ "results": results }))
        }
    }
}

/// The JSON text of a request, from whichever wrapping the SDK used. Each step is bounded by
/// `max_bytes`.
fn unwrap_body(
    req: &HttpRequest,
    raw: &[u8],
    query: &CaptureQuery,
    max_bytes: usize,
) -> Result<Vec<u8>, ApiError> {
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"))
        || raw.starts_with(b"data=");
    let mut compression = query.compression.clone();
    let mut data: Cow<'_, [u8]> = Cow::Borrowed(raw);
    let mut wrapped = false;
    if form {
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(raw)
            .map_err(|e| ApiError::bad_request(format!("form body could not be read: {e}")))?;
        for (name, value) in fields {
            match name.as_str() {
                "data" => data = Cow::Owned(value.into_bytes()),
                "compression" => compression = Some(value),
                _ => {}
            }
        }
        wrapped = true;
    } else if raw.is_empty() {
        if let Some(value) = &query.data {
            data = Cow::Owned(value.clone().into_bytes());
            wrapped = true;
        }
    }
    let data = match compression.as_deref() {
        Some("lz64") => {
            let text: Vec<u8> = (data.iter().copied())
                .filter(|byte| !byte.is_ascii_whitespace())
                .collect();
            let units = match lz64::decompress_from_base64(&text, max_bytes) {
                Ok(units) => units,
                Err(lz64::LzError::TooLarge) => {
                    return Err(ApiError::PayloadTooLarge(format!(
                        "lz64 body decompresses to more than the limit of {max_bytes} bytes"
                    )))
                }
                Err(lz64::LzError::Corrupt(why)) => {
                    return Err(ApiError::bad_request(format!(
                        "lz64 body is corrupt: {why}"
                    )))
                }
            };
            let json = String::from_utf16(&units)
                .map_err(|_| ApiError::bad_request("lz64 body does not decompress to text"))?;
            if json.len() > max_bytes {
                return Err(ApiError::PayloadTooLarge(format!(
                    "lz64 body decompresses to more than the limit of {max_bytes} bytes"
                )));
            }
            json.into_bytes()
        }
        Some("base64") => decode_base64(&data)?,
        // A form field or query value that is not JSON is base64 (posthog-js's default then).
        _ if wrapped && !looks_like_json(&data) => decode_base64(&data)?,
        _ => data.into_owned(),
    };
    if data.starts_with(&[0x1f, 0x8b]) {
        return Ok(body::decode("gzip", &data, max_bytes)?.to_vec());
    }
    Ok(data)
}

fn looks_like_json(data: &[u8]) -> bool {
    data.iter()
        .find(|byte| !byte.is_ascii_whitespace())
        .is_some_and(|byte| matches!(byte, b'[' | b'{'))
}

fn decode_base64(data: &[u8]) -> Result<Vec<u8>, ApiError> {
    // Padding and line breaks are optional; either alphabet is accepted.
    let text: Vec<u8> = (data.iter().copied())
        .filter(|byte| !byte.is_ascii_whitespace() && *byte != b'=')
        .collect();
    for engine in [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        if let Ok(decoded) = engine.decode(&text) {
            return Ok(decoded);
        }
    }
    Err(ApiError::bad_request(
        "the body is neither JSON nor base64-encoded JSON",
    ))
}

/// A parsed PostHog request.
struct CaptureRequest {
    parsed: ParsedRequest,
}

/// The top-level shapes: an array of events, an object with `batch`, or one event.
fn parse(
    json: &[u8],
    limits: &ParseLimits,
    received_at: Micros,
) -> Result<CaptureRequest, ApiError> {
    let text = std::str::from_utf8(json).map_err(|e| {
        ApiError::bad_request(format!("body is not UTF-8 (at byte {})", e.valid_up_to()))
    })?;
    let malformed =
        |e: serde_json::Error| ApiError::bad_request(format!("body is not valid JSON: {e}"));
    let mut parsed = ParsedRequest::default();
    let (items, batch_key, sent_at): (Vec<&RawValue>, Option<String>, Option<Micros>) =
        if text.trim_start().starts_with('[') {
            (serde_json::from_str(text).map_err(malformed)?, None, None)
        } else {
            let members: Members<'_> = serde_json::from_str(text).map_err(malformed)?;
            let field = |name: &str| {
                members
                    .0
                    .iter()
                    .rev()
                    .find(|(key, _)| key == name)
                    .map(|(_, v)| *v)
            };
            match field("batch")
                .or_else(|| field("data"))
                .filter(|v| v.get().starts_with('['))
            {
                Some(batch) => {
                    let key = ["api_key", "token", "$token"]
                        .iter()
                        .find_map(|name| field(name).and_then(string));
                    let sent_at = ["sent_at", "sentAt", "created_at"]
                        .iter()
                        .find_map(|name| field(name).and_then(string))
                        .and_then(|text| parse_timestamp(&text));
                    (
                        serde_json::from_str(batch.get()).map_err(malformed)?,
                        key,
                        sent_at,
                    )
                }
                None => (
                    vec![serde_json::from_str(text).map_err(malformed)?],
                    None,
                    None,
                ),
            }
        };
    if items.len() > limits.max_events {
        return Err(ApiError::PayloadTooLarge(format!(
            "request has {} events; the limit is {}",
            items.len(),
            limits.max_events
        )));
    }
    parsed.write_key = batch_key;
    let mut libraries = LibraryContexts::default();
    for (index, item) in items.into_iter().enumerate() {
        match parse_event(item, limits, sent_at, received_at, &mut libraries) {
            Ok((event, key)) => {
                if parsed.write_key.is_none() {
                    parsed.write_key = key;
                }
                parsed.events.push(event);
            }
            Err((message_id, reason)) => parsed.rejected.push(Rejection {
                index,
                message_id,
                reason,
                ..Rejection::default()
            }),
        }
    }
    Ok(CaptureRequest { parsed })
}

/// The `context` that names an event's library, built once per request for each (`$lib`,
/// `$lib_version`) text: a request's events nearly always share one.
#[derive(Default)]
struct LibraryContexts {
    last: Option<(String, String, String)>,
}

impl LibraryContexts {
    fn context(&mut self, name: &RawValue, version: Option<&RawValue>) -> Option<String> {
        let version_text = version.map_or("null", |raw| raw.get());
        if let Some((known_name, known_version, context)) = &self.last {
            if known_name == name.get() && known_version == version_text {
                return Some(context.clone());
            }
        }
        let library = string(name)?;
        let version = version.and_then(string);
        let context =
            serde_json::json!({ "library": { "name": library, "version": version } }).to_string();
        self.last = Some((
            name.get().to_string(),
            version_text.to_string(),
            context.clone(),
        ));
        Some(context)
    }
}

/// A JSON string's value.
fn string(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<String>(raw.get())
        .ok()
        .filter(|value| !value.is_empty())
}

/// An identifier: a string, or a number kept as its text.
fn identifier(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Some(text.to_string());
    }
    string(raw)
}

/// One PostHog event: the event and the project key it names, or (uuid, reason).
fn parse_event(
    raw: &RawValue,
    limits: &ParseLimits,
    batch_sent_at: Option<Micros>,
    received_at: Micros,
    libraries: &mut LibraryContexts,
) -> Result<(IncomingEvent, Option<String>), (Option<String>, String)> {
    if raw.get().len() > limits.max_event_bytes {
        return Err((
            None,
            format!(
                "event is {} bytes; the limit is {} bytes",
                raw.get().len(),
                limits.max_event_bytes
            ),
        ));
    }
    let members: Members<'_> =
        serde_json::from_str(raw.get()).map_err(|_| (None, "not a JSON object".to_string()))?;
    if members.0.len() > limits.max_event_members {
        return Err((
            None,
            format!(
                "event has {} top-level members; the limit is {}",
                members.0.len(),
                limits.max_event_members
            ),
        ));
    }
    let field = |name: &str| {
        members
            .0
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, v)| *v)
    };
    let uuid = field("uuid").and_then(identifier);
    let fail = |reason: String| (uuid.clone(), reason);
    let properties = field("properties").filter(|v| v.get().starts_with('{'));
    let property_members: Option<Members<'_>> = properties
        .map(|raw| serde_json::from_str(raw.get()))
        .transpose()
        .map_err(|_| fail("`properties` is not a JSON object".into()))?;
    let property = |name: &str| {
        property_members.as_ref().and_then(|members| {
            members
                .0
                .iter()
                .rev()
                .find(|(key, _)| key == name)
                .map(|(_, v)| *v)
        })
    };
    let name = field("event")
        .and_then(string)
        .ok_or_else(|| fail("missing `event` (the event's name)".into()))?;
    if name.len() > 200 {
        return Err(fail("`event` is longer than 200 bytes".into()));
    }
    if name.contains('\0') {
        return Err(fail("`event` must not contain NUL characters".into()));
    }
    let distinct_id = field("distinct_id")
        .or_else(|| field("$distinct_id"))
        .or_else(|| property("distinct_id"))
        .or_else(|| property("$distinct_id"))
        .and_then(identifier)
        .ok_or_else(|| fail("missing `distinct_id` (top level or in `properties`)".into()))?;
    let key = ["api_key", "token", "$token"]
        .iter()
        .find_map(|name| field(name))
        .or_else(|| property("token"))
        .or_else(|| property("$token"))
        .and_then(string);
    let time = |name: &str| -> Result<Option<Micros>, (Option<String>, String)> {
        match field(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => string(raw)
                .and_then(|text| parse_timestamp(&text))
                .map(Some)
                .ok_or_else(|| fail(format!("`{name}` is not an ISO 8601 date-time"))),
        }
    };
    let sent_at = time("sent_at")?.or(batch_sent_at);
    let mut timestamp = time("timestamp")?;
    if let Some(offset) = field("offset").and_then(|raw| raw.get().parse::<i64>().ok()) {
        // Milliseconds before the request was sent (or, without `sent_at`, received).
        if timestamp.is_none() {
            let base = sent_at.unwrap_or(received_at);
            timestamp = Some(base.saturating_sub(offset.saturating_mul(1000)));
        }
    }
    let kind = match name.as_str() {
        "$identify" => EventKind::Identify,
        "$create_alias" => EventKind::Alias,
        "$groupidentify" => EventKind::Group,
        _ => EventKind::Track,
    };
    let mut event = IncomingEvent {
        kind: Some(kind),
        message_id: uuid.clone(),
        name: (kind == EventKind::Track).then_some(name),
        user_id: Some(distinct_id),
        timestamp,
        sent_at,
        properties: properties.map(|raw| raw.get().to_string()),
        ..IncomingEvent::default()
    };
    match kind {
        EventKind::Identify => {
            event.anonymous_id = property("$anon_distinct_id").and_then(identifier);
        }
        EventKind::Alias => {
            // `alias` is the id the person goes by from now on; `distinct_id` the one before.
            if let Some(alias) = property("alias").and_then(identifier) {
                event.previous_id = event.user_id.replace(alias);
            }
        }
        EventKind::Group => {
            event.group_id = property("$group_key").and_then(identifier);
        }
        _ => {}
    }
    // Person properties: `$set` at the top level (posthog-js, posthog-python) or in
    // `properties` (posthog-node); the top-level one, read below, wins.
    event.traits = property("$set")
        .filter(|raw| raw.get().starts_with('{'))
        .map(|raw| raw.get().to_string());
    // What the SDK says it is, where enrichment reads it.
    if let Some(library) = property("$lib") {
        event.context = libraries.context(library, property("$lib_version"));
    }
    for (key, value) in &members.0 {
        match key.as_ref() {
            "event" | "uuid" | "distinct_id" | "$distinct_id" | "properties" | "timestamp"
            | "sent_at" | "offset" | "api_key" | "token" | "$token" => {}
            "$set" if value.get().starts_with('{') => event.traits = Some(value.get().to_string()),
            crate::http::segment::RESERVED_KEY => {
                return Err(fail(format!(
                    "field `{}` is reserved for the server's enrichment",
                    crate::http::segment::RESERVED_KEY
                )))
            }
            other => event
                .extra
                .push((other.to_string(), value.get().to_string())),
        }
    }
    Ok((event, key))
}

/// What posthog-js learns from its remote config: the encodings it may send (so it compresses
/// with gzip-js), and that there are no feature flags, recordings, surveys or site apps.
fn remote_config_json() -> serde_json::Value {
    serde_json::json!({
        "supportedCompression": ["gzip-js", "base64"],
        "hasFeatureFlags": false,
        "sessionRecording": false,
        "heatmaps": false,
        "surveys": false,
        "siteApps": [],
        "capturePerformance": false,
        "autocaptureExceptions": false,
    })
}

/// `GET /array/{token}/config`: the remote config. The same for every project key: it holds
/// nothing of a tenant's.
pub async fn remote_config() -> HttpResponse {
    HttpResponse::Ok().json(remote_config_json())
}

/// `GET /array/{token}/config.js`: the remote config as the script posthog-js loads first.
pub async fn remote_config_script(token: web::Path<String>) -> Result<HttpResponse, ApiError> {
    if token.len() > 200 {
        return Err(ApiError::NotFound("no such project key".into()));
    }
    let key = serde_json::to_string(token.as_str())
        .map_err(|e| ApiError::Internal(format!("encoding a key: {e}")))?;
    let script = format!(
        "(function(){{var c=window._POSTHOG_REMOTE_CONFIG=window._POSTHOG_REMOTE_CONFIG||{{}};c[{key}]={{config:{},siteApps:[]}};}})();",
        remote_config_json()
    );
    Ok(HttpResponse::Ok()
        .content_type("application/javascript")
        .body(script))
}

/// `/flags` and `/decide` (older posthog-js): no feature flags, capture on.
pub async fn flags() -> HttpResponse {
    let mut answer = remote_config_json();
    if let Some(fields) = answer.as_object_mut() {
        for (key, value) in [
            ("flags", serde_json::json!({})),
            ("featureFlags", serde_json::json!({})),
            ("featureFlagPayloads", serde_json::json!({})),
            ("errorsWhileComputingFlags", serde_json::json!(false)),
            (
                "config",
                serde_json::json!({ "enable_collect_everything": true }),
            ),
            ("toolbarParams", serde_json::json!({})),
        ] {
            fields.insert(key.to_string(), value);
        }
    }
    HttpResponse::Ok().json(answer)
}
