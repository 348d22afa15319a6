//! Segment HTTP Tracking API endpoints: `/v1/batch`, `/v1/import`, `/v1/track`, ...
//!
//! Order of work for a request: authenticate (header key before reading the body), read and
//! decompress the body within limits, parse and validate (bad events are listed, good ones
//! kept), take the events from the tenant's rate limit, send them through the tenant's
//! pipeline, and answer only once they are durable.

use std::net::IpAddr;
use std::time::Instant;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use crate::actors::PipelineError;
use crate::enrich::anonymize_ip;
use crate::event::{now_micros, BatchSource};
use crate::http::errors::ApiError;
use crate::http::segment::{self, ParseError, ParseLimits, Rejection, Route};
use crate::http::{auth, body, AppState};
use crate::ratelimit::Refused;
use crate::storage::StorageError;
use crate::telemetry::{self, IngestReplied};
use crate::tenant::KeyKind;

/// The success reply of every Segment endpoint.
#[derive(Debug, Serialize)]
pub struct IngestReply {
    pub success: bool,
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Rejection>,
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
    let received_at = now_micros();
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

    let limits = &state.config.limits;
    let max_body = usize::try_from(limits.max_body_bytes.as_u64()).unwrap_or(usize::MAX);
    let body = body::read_body(&req, payload, max_body).await?;
    let parse_limits = ParseLimits {
        max_event_bytes: usize::try_from(limits.max_event_bytes.as_u64()).unwrap_or(usize::MAX),
        max_events: limits.max_events_per_request,
    };
    let parsed = if is_ndjson(&req) {
        if route != Route::Batch {
            return Err(ApiError::UnsupportedMediaType(format!(
                "NDJSON is accepted on /v1/batch only, not on {endpoint}"
            )));
        }
        segment::parse_ndjson(&body, &parse_limits)
    } else {
        segment::parse_json(route, &body, &parse_limits)
    }
    .map_err(|error| match error {
        ParseError::Malformed(detail) => ApiError::bad_request(detail),
        too_many @ ParseError::TooManyEvents { .. } => {
            ApiError::PayloadTooLarge(too_many.to_string())
        }
    })?;

    let tenant = match header_tenant {
        Some(tenant) => tenant,
        None => auth::tenant_for_key(
            &state.directory,
            parsed.write_key.as_deref(),
            KeyKind::Write,
        )?,
    };
    let tenant_label = tenant.id.to_string();
    let rejected = parsed.rejected;
    if parsed.events.is_empty() {
        if rejected.is_empty() {
            return Ok(reply(0, 0, Vec::new(), None));
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
    let admitted = match state.rate_limits.check(&tenant, event_count) {
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

    if state.config.benchmark.ceiling_discard_events {
        // Benchmark ceiling: everything up to here, nothing after (see config/default.toml).
        drop(admission);
        return Ok(reply(
            event_count,
            0,
            rejected,
            Some((admitted.limit, admitted.remaining)),
        ));
    }

    let source = BatchSource {
        endpoint: endpoint.to_string(),
        client_ip: client_ip(&req, state.config.server.trust_forwarded_for).map(anonymize_ip),
    };
    let outcome = admission
        .ingest(parsed.events, source, received_at)
        .await
        .map_err(|error| {
            telemetry::ingest_refused(&tenant_label, event_count, "unavailable");
            pipeline_error(error)
        })?;

    IngestReplied {
        tenant: &tenant_label,
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        rejected: rejected.len(),
        latency: started.elapsed(),
    }
    .emit();
    Ok(reply(
        outcome.accepted,
        outcome.duplicates,
        rejected,
        Some((admitted.limit, admitted.remaining)),
    ))
}

fn reply(
    accepted: usize,
    duplicates: usize,
    errors: Vec<Rejection>,
    rate: Option<(u32, u32)>,
) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    if let Some((limit, remaining)) = rate {
        response.insert_header(("RateLimit-Limit", limit.to_string()));
        response.insert_header(("RateLimit-Remaining", remaining.to_string()));
    }
    response.json(IngestReply {
        success: true,
        accepted,
        duplicates,
        rejected: errors.len(),
        errors,
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
        PipelineError::Storage(other) => {
            tracing::error!(error = %other, "storage failure; request not acknowledged");
            ApiError::Internal(format!("storage failure, events were not stored: {other}"))
        }
    }
}
