//! Segment HTTP Tracking API endpoints: `/v1/batch`, `/v1/import`, `/v1/track`, ...
//!
//! Order of work for a request: authenticate (header key before reading the body), read and
//! decompress the body within limits, parse and validate (bad events are listed, good ones
//! kept), take the events from the tenant's rate limit, send them through the tenant's
//! pipeline, and answer only once they are durable.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use crate::actors::PipelineError;
use crate::enrich::anonymize_ip;
use crate::event::{now_micros, BatchSource};
use crate::http::errors::ApiError;
use crate::http::segment::{self, ParseError, ParseLimits, ParsedRequest, Rejection, Route};
use crate::http::{auth, body, AppState};
use crate::ratelimit::Refused;
use crate::storage::StorageError;
use crate::telemetry::{self, IngestReplied};
use crate::tenant::{KeyKind, TenantDirectory, TenantRecord};

/// The success reply of every Segment endpoint.
#[derive(Debug, Serialize)]
pub struct IngestReply {
    pub success: bool,
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    /// Events dropped by the tenant's sampling; only when some were.
    #[serde(skip_serializing_if = "is_zero")]
    pub sampled_out: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Rejection>,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

fn is_ndjson(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|v| v == "application/x-ndjson" || v == "application/jsonl")
}

fn client_ip(req: &HttpRequest, trust_forwarded_for: bool) -> Option<IpAddr> {
    if trust_forwarded_for {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok());
        if forwarded.is_some() {
            return forwarded;
        }
    }
    req.peer_addr().map(|addr| addr.ip())
}

/// Handles one Segment request on `route`, served at `endpoint`.
pub async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    route: Route,
    endpoint: &'static str,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let header_key = auth::header_credential(&req)?;
    // With the key in a header, refuse strangers before reading their body.
    let header_tenant = match header_key.as_deref() {
        Some(key) => Some(auth::tenant_for_key(
            &state.directory,
            Some(key),
            KeyKind::Write,
        )?),
        None => None,
    };
    if let Some(reason) = state.disk.too_low() {
        return Err(ApiError::unavailable(reason));
    }
    let ndjson = is_ndjson(&req);
    if ndjson && route != Route::Batch {
        return Err(ApiError::UnsupportedMediaType(format!(
            "NDJSON is accepted on /v1/batch only, not on {endpoint}"
        )));
    }

    let limits = &state.config.limits;
    let max_body = usize::try_from(limits.max_body_bytes.as_u64()).unwrap_or(usize::MAX);
    let received = body::receive(&req, payload, max_body, state.config.server.body_timeout).await?;
    let body_read = Instant::now();
    // Stamped once the whole body is here: a slow upload is sequenced by when it completed,
    // never before requests that completed earlier.
    let received_at = now_micros();
    let work = BodyWork {
        route,
        ndjson,
        tenant: header_tenant,
        directory: Arc::clone(&state.directory),
        limits: ParseLimits {
            max_event_bytes: usize::try_from(limits.max_event_bytes.as_u64()).unwrap_or(usize::MAX),
            max_events: limits.max_events_per_request,
            max_event_members: limits.max_event_members,
        },
    };
    let small_bytes =
        usize::try_from(state.config.server.large_body_bytes.as_u64()).unwrap_or(usize::MAX);
    let (tenant, parsed) = match received.decoded_if_small(small_bytes)? {
        Some(body) => work.run(&body)?,
        None => {
            // Decompression and parsing of a large body run on a bounded pool, off the HTTP
            // worker, so small requests and health checks on this worker are never stuck
            // behind them.
            let _permit = state
                .large_bodies
                .acquire(state.config.server.body_timeout)
                .await?;
            crate::blocking::run(move || work.run(&received.decoded(max_body)?))
                .await
                .map_err(|e| ApiError::Internal(format!("body task failed: {e}")))??
        }
    };
    let times = RequestTimes {
        started,
        body_read,
        parsed: Instant::now(),
    };
    let stored = store(&req, &state, &tenant, parsed, endpoint, received_at, times).await?;
    Ok(reply(stored))
}

/// When an ingestion request started, had its body, and had it parsed: with the writer's
/// [`Timing`](crate::storage::writer::Timing), where the request's time went.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimes {
    pub started: Instant,
    pub body_read: Instant,
    pub parsed: Instant,
}

impl RequestTimes {
    /// Records the request's stages, up to `done` (its answer is ready).
    fn record(&self, writer: Option<crate::storage::writer::Timing>, done: Instant) {
        let Some(writer) = writer else {
            return;
        };
        telemetry::ingest_stages(&[
            ("read", self.body_read - self.started),
            ("parse", self.parsed - self.body_read),
            (
                "pipeline",
                writer.queued_at.saturating_duration_since(self.parsed),
            ),
            (
                "log_queue",
                writer
                    .group_started
                    .saturating_duration_since(writer.queued_at),
            ),
            ("write", writer.commit_started - writer.group_started),
            ("fsync", writer.committed - writer.commit_started),
            ("reply", done.saturating_duration_since(writer.committed)),
        ]);
    }
}

/// What storing a parsed request did.
pub struct Stored {
    pub accepted: usize,
    pub duplicates: usize,
    /// Positions (in the request) of the accepted events that were duplicates.
    pub duplicate_positions: Vec<usize>,
    pub rejected: Vec<Rejection>,
    /// Positions (in the request) of the events the tenant's sampling dropped.
    pub sampled_out: Vec<usize>,
    /// The tenant's rate limit and what is left of it, when the events were counted against it.
    pub rate: Option<(u32, u32)>,
}

/// The part every ingestion protocol shares once it has a tenant and parsed events: admission
/// into the tenant's pipeline, the rate limit, the durable append. Answers once the events are
/// durable. A request whose events were all rejected is a 400 listing them.
pub async fn store(
    req: &HttpRequest,
    state: &AppState,
    tenant: &TenantRecord,
    parsed: ParsedRequest,
    endpoint: &str,
    received_at: crate::event::Micros,
    times: RequestTimes,
) -> Result<Stored, ApiError> {
    let tenant_label = tenant.id.to_string();
    let rejected = parsed.rejected;
    if parsed.events.is_empty() {
        if rejected.is_empty() {
            return Ok(Stored {
                accepted: 0,
                duplicates: 0,
                duplicate_positions: Vec::new(),
                rejected,
                sampled_out: Vec::new(),
                rate: None,
            });
        }
        telemetry::ingest_refused(&tenant_label, rejected.len(), "rejected");
        return Err(ApiError::BadRequest {
            detail: format!("all {} events were rejected; see `errors`", rejected.len()),
            errors: rejected,
        });
    }

    let event_count = parsed.events.len();
    // Take a place in the tenant's pipeline before spending rate-limit budget, so a request
    // refused for backpressure is not also charged against the limit.
    let Some(admission) = state.pipelines.pipeline(tenant.id).admit() else {
        telemetry::ingest_refused(&tenant_label, event_count, "unavailable");
        return Err(ApiError::unavailable(
            "the tenant's ingestion pipeline is full",
        ));
    };
    let checked = match &state.cluster {
        // On the runtime the Redis connection lives on: a reconnection started from an HTTP
        // worker would run on that worker's thread.
        Some(node) => {
            let limits = Arc::clone(node);
            let record =
                (state.directory.get(tenant.id)).unwrap_or_else(|| Arc::new(tenant.clone()));
            let check = async move { limits.limits.check(&record, event_count).await };
            (node.on_engines(check).await).map_err(ApiError::Internal)?
        }
        None => state.rate_limits.check(tenant, event_count),
    };
    let admitted = match checked {
        Ok(admitted) => admitted,
        Err(Refused::Later { retry_after, limit }) => {
            telemetry::ingest_refused(&tenant_label, event_count, "rate_limited");
            return Err(ApiError::RateLimited {
                detail: format!(
                    "tenant rate limit of {limit} events/s exceeded; retry in {} ms",
                    retry_after.as_millis()
                ),
                retry_after,
                limit,
                remaining: 0,
            });
        }
        Err(Refused::LargerThanBurst { events, burst }) => {
            telemetry::ingest_refused(&tenant_label, event_count, "rate_limited");
            return Err(ApiError::PayloadTooLarge(format!(
                "request has {events} events but the tenant's rate-limit burst is {burst}; send smaller batches"
            )));
        }
    };
    let rate = Some((admitted.limit, admitted.remaining));

    if state.config.benchmark.ceiling_discard_events {
        // Benchmark ceiling: everything up to here, nothing after (see config/default.toml).
        drop(admission);
        return Ok(Stored {
            accepted: event_count,
            duplicates: 0,
            duplicate_positions: Vec::new(),
            rejected,
            sampled_out: Vec::new(),
            rate,
        });
    }

    let peer = client_ip(req, state.config.server.trust_forwarded_for);
    let source = BatchSource {
        endpoint: endpoint.to_string(),
        client_ip: peer.map(anonymize_ip),
    };
    // The ids of the events, for the replies of those the plan refuses.
    let message_ids: Vec<Option<String>> =
        parsed.events.iter().map(|e| e.message_id.clone()).collect();
    let outcome = admission
        .ingest(parsed.events, parsed.shared, source, peer, received_at)
        .await
        .map_err(|error| {
            telemetry::ingest_refused(&tenant_label, event_count, "unavailable");
            pipeline_error(error)
        })?;

    let mut rejected = rejected;
    let refused = refused_by_plan(&outcome.dead_lettered, &rejected, &message_ids);
    rejected.extend(refused);
    rejected.sort_by_key(|r| r.index);
    IngestReplied {
        tenant: &tenant_label,
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        rejected: rejected.len(),
        latency: times.started.elapsed(),
    }
    .emit();
    times.record(outcome.timing, Instant::now());
    Ok(Stored {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        duplicate_positions: outcome.duplicate_positions,
        rejected,
        sampled_out: outcome.sampled_out,
        rate,
    })
}

/// The rejections of the events the tenant's plan refused. `dead_lettered` holds positions
/// among the parsed events; a rejection's index is the position in the request, which counts
/// the events the parser refused (`parse_rejected`, ascending) too.
fn refused_by_plan(
    dead_lettered: &[(usize, crate::schema::Violation)],
    parse_rejected: &[Rejection],
    message_ids: &[Option<String>],
) -> Vec<Rejection> {
    dead_lettered
        .iter()
        .map(|(position, violation)| Rejection {
            index: request_index(*position, parse_rejected),
            message_id: message_ids.get(*position).cloned().flatten(),
            reason: violation.summary(),
            dead_lettered: true,
            schema_version: violation.schema_version,
            violations: violation.errors.clone(),
        })
        .collect()
}

/// The request position of the parsed event at `position`: the `position`-th index not taken
/// by a parse rejection.
fn request_index(position: usize, parse_rejected: &[Rejection]) -> usize {
    let mut index = position;
    for rejection in parse_rejected {
        if rejection.index <= index {
            index += 1;
        } else {
            break;
        }
    }
    index
}

/// What reading a body needs: who sent it (if a header said so), how to parse it, within
/// which limits.
struct BodyWork {
    route: Route,
    ndjson: bool,
    /// The tenant of a valid key sent in a header.
    tenant: Option<Arc<TenantRecord>>,
    directory: Arc<TenantDirectory>,
    limits: ParseLimits,
}

impl BodyWork {
    /// Parses the (decompressed) body, and finds its tenant. Without a header key, the body
    /// is first scanned for its key, which builds nothing: a body whose key is missing or
    /// unknown costs that scan, never the parse of its events.
    fn run(self, body: &[u8]) -> Result<(Arc<TenantRecord>, ParsedRequest), ApiError> {
        let mut tenant = self.tenant.clone();
        if tenant.is_none() {
            if let Some(key) = segment::find_write_key(self.route, self.ndjson, body) {
                tenant = Some(auth::tenant_for_key(
                    &self.directory,
                    key.as_deref(),
                    KeyKind::Write,
                )?);
            }
        }
        let parsed = self.parse(body)?;
        let tenant = match tenant {
            Some(tenant) => tenant,
            // The scan could not read the body, yet the parse could (or it would have failed).
            None => {
                auth::tenant_for_key(&self.directory, parsed.write_key.as_deref(), KeyKind::Write)?
            }
        };
        Ok((tenant, parsed))
    }

    fn parse(&self, body: &[u8]) -> Result<ParsedRequest, ApiError> {
        let parsed = if self.ndjson {
            segment::parse_ndjson(body, &self.limits)
        } else {
            segment::parse_json(self.route, body, &self.limits)
        };
        parsed.map_err(|error| match error {
            ParseError::Malformed(detail) => ApiError::bad_request(detail),
            too_many @ ParseError::TooManyEvents { .. } => {
                ApiError::PayloadTooLarge(too_many.to_string())
            }
        })
    }
}

fn reply(stored: Stored) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    if let Some((limit, remaining)) = stored.rate {
        response.insert_header(("RateLimit-Limit", limit.to_string()));
        response.insert_header(("RateLimit-Remaining", remaining.to_string()));
    }
    response.json(IngestReply {
        success: true,
        accepted: stored.accepted,
        duplicates: stored.duplicates,
        rejected: stored.rejected.len(),
        sampled_out: stored.sampled_out.len(),
        errors: stored.rejected,
    })
}

fn pipeline_error(error: PipelineError) -> ApiError {
    match error {
        PipelineError::Busy(why) => ApiError::unavailable(why),
        PipelineError::Storage(StorageError::TenantDeleted(_)) => {
            ApiError::Unauthorized("unknown key (the tenant was deleted)".into())
        }
        PipelineError::Storage(StorageError::WriterStopped) => {
            ApiError::unavailable("the server is shutting down")
        }
        PipelineError::Storage(StorageError::Unavailable(why)) => {
            ApiError::unavailable(format!("events were not stored: {why}"))
        }
        PipelineError::Storage(other) => {
            tracing::error!(error = %other, "storage failure; request not acknowledged");
            ApiError::Internal(format!("storage failure, events were not stored: {other}"))
        }
    }
}
