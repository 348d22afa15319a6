//! Query API (read key): series, events, uniques, funnel.
//!
//! Every answer carries `as_of`: the last log sequence included in the stored rollups and the
//! tenant's last durable sequence, so a client can tell how fresh it is (rollups are flushed
//! every `rollups.flush_interval`). Answers over closed buckets, computed when the rollups had
//! caught up, are cached per tenant until a late event touches their range.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::SizedStream;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::event::{duration_micros, format_timestamp, now_micros, parse_timestamp, Micros};
use crate::http::errors::ApiError;
use crate::http::export::time_param;
use crate::http::slots::ReadKind;
use crate::http::{auth, AppState};
use crate::query::blocks::{RenderedSeries, SeriesAsk};
use crate::query::{self, align_range, Metric};
use crate::rollup::Resolution;
use crate::storage::rollups;
use crate::telemetry;
use crate::tenant::TenantRecord;

/// Most events a `/v1/query/events` answer lists.
const MAX_EVENTS_LIMIT: usize = 10_000;
/// Most steps of a funnel.
const MAX_FUNNEL_STEPS: usize = 20;

#[derive(Debug, Serialize)]
struct AsOf {
    /// Last log sequence whose events are in the rollups this answer was computed from.
    rolled_up_through_seq: u64,
    /// The tenant's last durable log sequence.
    log_seq: u64,
}

fn read_tenant(req: &HttpRequest, state: &AppState) -> Result<Arc<TenantRecord>, ApiError> {
    let tenant = auth::read_key_tenant(req, &state.directory)?;
    // The rollup actor lives in the tenant's pipeline: make sure it runs (and catches up).
    state.pipelines.pipeline(tenant.id);
    Ok(tenant)
}

fn required_time(name: &str, value: Option<&str>) -> Result<Micros, ApiError> {
    time_param(name, value)?
        .ok_or_else(|| ApiError::bad_request(format!("query parameter `{name}` is required")))
}

/// `from`/`to`, required, ordered.
fn time_range(from: Option<&str>, to: Option<&str>) -> Result<(Micros, Micros), ApiError> {
    let from = required_time("from", from)?;
    let to = required_time("to", to)?;
    if from >= to {
        return Err(ApiError::bad_request(
            "query parameter `from` must be before `to`",
        ));
    }
    Ok((from, to))
}

fn check_span(from: Micros, to: Micros, limit: Duration, what: &str) -> Result<(), ApiError> {
    let limit_micros = duration_micros(limit);
    if to - from > limit_micros {
        return Err(ApiError::bad_request(format!(
            "the range from `from` to `to` is {} long; the limit for {what} is {}",
            describe_span(to - from),
            describe_span(limit_micros)
        )));
    }
    Ok(())
}

/// A span in days (or hours, below a day), for error messages.
fn describe_span(micros: Micros) -> String {
    let hours = micros as f64 / 3_600_000_000.0;
    if hours >= 24.0 {
        format!("{:.1} days", hours / 24.0)
    } else {
        format!("{hours:.1} hours")
    }
}

fn blocking_error(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("query failed: {error}"))
}

/// Where the tenant's rollups stand, read before the answer so that the answer is at least as
/// fresh as it says. Blocking.
fn as_of(
    storage: &crate::storage::Storage,
    heads: &crate::storage::writer::LogHeads,
    tenant: crate::tenant::TenantId,
) -> Result<AsOf, crate::storage::StorageError> {
    Ok(AsOf {
        log_seq: query::log_head(storage, heads, tenant)?,
        rolled_up_through_seq: rollups::watermark(storage, tenant)?,
    })
}

/// Runs a query on a blocking thread and adds `as_of`.
async fn run<T: Send + 'static>(
    state: &web::Data<AppState>,
    tenant: &TenantRecord,
    work: impl FnOnce(&crate::storage::Storage) -> Result<T, crate::storage::StorageError>
        + Send
        + 'static,
) -> Result<(T, AsOf), ApiError> {
    let storage = state.storage.clone();
    let heads = state.writer.heads().clone();
    let tenant_id = tenant.id;
    crate::blocking::run(move || {
        let as_of = as_of(&storage, &heads, tenant_id)?;
        Ok::<_, crate::storage::StorageError>((work(&storage)?, as_of))
    })
    .await
    .map_err(blocking_error)?
    .map_err(blocking_error)
}

/// Cluster mode: runs a query on the shared rollups in Redis (on the runtime its connection
/// lives on) and returns its result with the watermark read before it.
async fn shared<T, F, Fut>(
    node: &Arc<crate::cluster::node::ClusterNode>,
    tenant: crate::tenant::TenantId,
    work: F,
) -> Result<(T, u64), ApiError>
where
    T: Send + 'static,
    F: FnOnce(Arc<crate::cluster::node::ClusterNode>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = redis::RedisResult<T>> + Send + 'static,
{
    let engines = Arc::clone(node);
    let answer = node
        .on_engines(async move {
            let watermark = engines.rollups.watermark(tenant).await?;
            Ok::<_, redis::RedisError>((work(engines).await?, watermark))
        })
        .await
        .map_err(blocking_error)?;
    answer.map_err(|error| {
        ApiError::unavailable(format!(
            "the shared rollups (Redis) cannot be read: {error}"
        ))
    })
}

/// A cluster answer: `object` with `as_of` (the shared rollups' watermark).
fn shared_reply(mut object: serde_json::Value, watermark: u64) -> HttpResponse {
    object["as_of"] = serde_json::json!({ "rolled_up_through_seq": watermark });
    json_reply(&object.to_string())
}

fn json_reply(body: &str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body.to_string())
}

/// Adds `"as_of"` to a JSON object's text (answers are rendered as text, not as a `Value`: a
/// 43,200-point series would otherwise allocate a map per point).
fn with_as_of(object: &str, as_of: &AsOf) -> String {
    let as_of = serde_json::to_string(as_of).unwrap_or_else(|_| "null".into());
    match object.strip_prefix('{') {
        Some("}") => format!("{{\"as_of\":{as_of}}}"),
        Some(rest) => format!("{{\"as_of\":{as_of},{rest}"),
        None => object.to_string(),
    }
}

/// Serves a cached answer, or computes, caches (if closed and caught up) and serves one.
async fn cached<F, Fut>(
    state: &web::Data<AppState>,
    tenant: &TenantRecord,
    endpoint: &'static str,
    key: String,
    range: (Micros, Micros),
    closed: bool,
    compute: F,
) -> Result<HttpResponse, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(String, AsOf), ApiError>>,
{
    let started = Instant::now();
    if closed {
        if let Some(body) = state.query_cache.get(tenant.id, &key) {
            telemetry::query_answered(endpoint, started.elapsed(), true);
            return Ok(json_reply(&body));
        }
    }
    let version = state.query_cache.version(tenant.id);
    let (body, as_of) = compute().await?;
    let caught_up = as_of.rolled_up_through_seq >= as_of.log_seq;
    let text: Arc<str> = Arc::from(with_as_of(&body, &as_of));
    if closed && caught_up {
        state
            .query_cache
            .put(tenant.id, version, key, range, Arc::clone(&text));
    }
    telemetry::query_answered(endpoint, started.elapsed(), false);
    Ok(json_reply(&text))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesParams {
    event: Option<String>,
    metric: Option<String>,
    interval: Option<String>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

/// `GET /v1/query/series`
pub async fn series(
    req: HttpRequest,
    state: web::Data<AppState>,
    params: web::Query<SeriesParams>,
) -> Result<HttpResponse, ApiError> {
    let tenant = read_tenant(&req, &state)?;
    let params = params.into_inner();
    let metric = match params.metric.as_deref().unwrap_or("count") {
        "count" => Metric::Count,
        "uniques" => Metric::Uniques,
        other => {
            return Err(ApiError::bad_request(format!(
                "query parameter `metric` must be `count` or `uniques`, not {other:?}"
            )))
        }
    };
    let interval = params.interval.as_deref().unwrap_or("hour");
    let resolution = Resolution::parse(interval).ok_or_else(|| {
        ApiError::bad_request(format!(
            "query parameter `interval` must be `minute`, `hour` or `day`, not {interval:?}"
        ))
    })?;
    let (from, to) = time_range(params.from.as_deref(), params.to.as_deref())?;
    let width = resolution.width();
    let from = resolution.bucket(from);
    let to = if to.rem_euclid(width) == 0 {
        to
    } else {
        resolution.bucket(to) + width
    };
    let limits = &state.config.rollups;
    let max = match resolution {
        Resolution::Minute => limits.max_minute_range,
        Resolution::Hour => limits.max_hour_range,
        Resolution::Day => limits.max_day_range,
    };
    check_span(from, to, max, &format!("interval={}", resolution.as_str()))?;
    // `points`: `[{"ts", "value"}, ...]`; `values`: the values only, bucket i starting at
    // `from + i * interval` (a 30-day minute series: ~100 KB instead of ~1.8 MB).
    let values_only = match params.format.as_deref().unwrap_or("points") {
        "points" => false,
        "values" => true,
        other => {
            return Err(ApiError::bad_request(format!(
                "query parameter `format` must be `points` or `values`, not {other:?}"
            )))
        }
    };
    let event = params.event.filter(|e| !e.is_empty());
    let started = Instant::now();
    if let Some(node) = &state.cluster {
        let name = event.clone();
        let (points, watermark) = shared(node, tenant.id, move |node| async move {
            let name = name.as_deref();
            crate::cluster::query::series(
                &node.rollups,
                tenant.id,
                name,
                metric,
                resolution,
                from,
                to,
            )
            .await
        })
        .await?;
        let mut body = serde_json::json!({
            "event": event,
            "metric": if metric == Metric::Count { "count" } else { "uniques" },
            "interval": resolution.as_str(),
            "from": format_timestamp(from),
            "to": format_timestamp(to),
        });
        if values_only {
            body["values"] = points.iter().map(|p| p.value).collect::<Vec<_>>().into();
        } else {
            body["points"] = points
                .iter()
                .map(|p| {
                    let mut point =
                        serde_json::json!({ "ts": format_timestamp(p.ts), "value": p.value });
                    if let Some(error) = p.relative_error {
                        point["relative_error"] = error.into();
                    }
                    point
                })
                .collect::<Vec<_>>()
                .into();
        }
        telemetry::query_answered("series", started.elapsed(), false);
        return Ok(shared_reply(body, watermark));
    }
    let ask = SeriesAsk {
        tenant: tenant.id,
        event: event.clone(),
        metric,
        resolution,
        from,
        to,
        values_only,
    };
    let cache = Arc::clone(&state.query_cache);
    let (rendered, as_of) = run(&state, &tenant, move |storage| {
        query::blocks::render_series(storage, &cache, &ask, now_micros())
    })
    .await?;
    let RenderedSeries {
        parts,
        all_cached,
        sampled_rates,
    } = rendered;
    let mut head = serde_json::json!({
        "as_of": as_of,
        "event": event,
        "metric": if metric == Metric::Count { "count" } else { "uniques" },
        "interval": resolution.as_str(),
        "from": format_timestamp(from),
        "to": format_timestamp(to),
    });
    if !sampled_rates.is_empty() {
        head["sampled_rates"] = sampled_rates.into();
    }
    let head = head.to_string();
    // The body is streamed from the blocks as they are (most of them shared with the cache),
    // not copied into one ~2 MB string first.
    let mut chunks: Vec<Bytes> = Vec::with_capacity(2 * parts.len() + 2);
    let mut opening = head.strip_suffix('}').unwrap_or(&head).to_string();
    opening.push_str(if values_only {
        ",\"values\":["
    } else {
        ",\"points\":["
    });
    chunks.push(Bytes::from(opening));
    for part in parts.into_iter().filter(|p| !p.is_empty()) {
        if chunks.len() > 1 {
            chunks.push(Bytes::from_static(b","));
        }
        chunks.push(Bytes::from_owner(SharedText(part)));
    }
    chunks.push(Bytes::from_static(b"]}"));
    let size = chunks.iter().map(|chunk| chunk.len() as u64).sum();
    telemetry::query_answered("series", started.elapsed(), all_cached);
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, Infallible>));
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(SizedStream::new(size, stream)))
}

/// A cached block as the bytes of a response chunk, without copying it.
struct SharedText(Arc<str>);

impl AsRef<[u8]> for SharedText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeParams {
    from: Option<String>,
    to: Option<String>,
    event: Option<String>,
    limit: Option<usize>,
}

/// Aligns a query range to stored buckets and checks its length.
fn aligned_range(state: &AppState, params: &RangeParams) -> Result<(Micros, Micros), ApiError> {
    let (from, to) = time_range(params.from.as_deref(), params.to.as_deref())?;
    let (from, to) = align_range(from, to, &state.config.rollups.retention(), now_micros());
    check_span(from, to, state.config.rollups.max_day_range, "this query")?;
    Ok((from, to))
}

/// `GET /v1/query/events`
pub async fn events(
    req: HttpRequest,
    state: web::Data<AppState>,
    params: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let tenant = read_tenant(&req, &state)?;
    let params = params.into_inner();
    if params.event.is_some() {
        return Err(ApiError::bad_request(
            "query parameter `event` is not used by /v1/query/events",
        ));
    }
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_EVENTS_LIMIT {
        return Err(ApiError::bad_request(format!(
            "query parameter `limit` must be between 1 and {MAX_EVENTS_LIMIT}"
        )));
    }
    let (from, to) = aligned_range(&state, &params)?;
    if let Some(node) = &state.cluster {
        let (events, watermark) = shared(node, tenant.id, move |node| async move {
            crate::cluster::query::event_totals(&node.rollups, tenant.id, from, to, limit).await
        })
        .await?;
        let body = serde_json::json!({
            "from": format_timestamp(from),
            "to": format_timestamp(to),
            "events": events,
        });
        return Ok(shared_reply(body, watermark));
    }
    let closed = to <= Resolution::Minute.bucket(now_micros());
    let key = format!("events\u{1}{from}\u{1}{to}\u{1}{limit}");
    let tenant_id = tenant.id;
    cached(
        &state,
        &tenant,
        "events",
        key,
        (from, to),
        closed,
        || async {
            let (events, as_of) = run(&state, &tenant, move |storage| {
                query::event_totals(storage, tenant_id, from, to, limit)
            })
            .await?;
            Ok((
                serde_json::json!({
                    "from": format_timestamp(from),
                    "to": format_timestamp(to),
                    "events": events,
                })
                .to_string(),
                as_of,
            ))
        },
    )
    .await
}

/// `GET /v1/query/uniques`
pub async fn uniques(
    req: HttpRequest,
    state: web::Data<AppState>,
    params: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let tenant = read_tenant(&req, &state)?;
    let params = params.into_inner();
    if params.limit.is_some() {
        return Err(ApiError::bad_request(
            "query parameter `limit` is not used by /v1/query/uniques",
        ));
    }
    let (from, to) = aligned_range(&state, &params)?;
    let event = params.event.filter(|e| !e.is_empty());
    if let Some(node) = &state.cluster {
        let name = event.clone();
        let (count, watermark) = shared(node, tenant.id, move |node| async move {
            crate::cluster::query::uniques(&node.rollups, tenant.id, name.as_deref(), from, to)
                .await
        })
        .await?;
        let mut body = serde_json::json!({
            "event": event,
            "from": format_timestamp(from),
            "to": format_timestamp(to),
            "uniques": count.rounded(),
        });
        if let Some(error) = count.relative_error {
            body["relative_error"] = error.into();
        }
        return Ok(shared_reply(body, watermark));
    }
    let closed = to <= Resolution::Minute.bucket(now_micros());
    let key = format!(
        "uniques\u{1}{}\u{1}{from}\u{1}{to}",
        event.as_deref().unwrap_or("")
    );
    let tenant_id = tenant.id;
    cached(
        &state,
        &tenant,
        "uniques",
        key,
        (from, to),
        closed,
        || async {
            let name = event.clone();
            let (count, as_of) = run(&state, &tenant, move |storage| {
                query::uniques(storage, tenant_id, name.as_deref(), from, to)
            })
            .await?;
            let mut body = serde_json::json!({
                "event": event,
                "from": format_timestamp(from),
                "to": format_timestamp(to),
                "uniques": count.rounded(),
            });
            if let Some(error) = count.relative_error {
                body["relative_error"] = error.into();
            }
            Ok((body.to_string(), as_of))
        },
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelRequest {
    steps: Vec<String>,
    window: String,
    from: String,
    to: String,
}

/// `POST /v1/query/funnel`: exact, from the stored events.
pub async fn funnel(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<FunnelRequest>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let tenant = read_tenant(&req, &state)?;
    let request = body.into_inner();
    if request.steps.is_empty() || request.steps.len() > MAX_FUNNEL_STEPS {
        return Err(ApiError::bad_request(format!(
            "field `steps` must list 1 to {MAX_FUNNEL_STEPS} event names"
        )));
    }
    if request.steps.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad_request(
            "field `steps` must not contain empty names",
        ));
    }
    let window = humantime::parse_duration(&request.window)
        .ok()
        .filter(|w| !w.is_zero())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "field `window` must be a positive duration like \"30m\" or \"1h\", not {:?}",
                request.window
            ))
        })?;
    let from = parse_timestamp(&request.from).ok_or_else(|| {
        ApiError::bad_request(format!(
            "field `from` is not an RFC 3339 date-time: {:?}",
            request.from
        ))
    })?;
    let to = parse_timestamp(&request.to).ok_or_else(|| {
        ApiError::bad_request(format!(
            "field `to` is not an RFC 3339 date-time: {:?}",
            request.to
        ))
    })?;
    if from >= to {
        return Err(ApiError::bad_request("field `from` must be before `to`"));
    }
    check_span(from, to, state.config.rollups.max_funnel_range, "a funnel")?;
    let window_micros = duration_micros(window);
    let steps = request.steps.clone();
    let tenant_id = tenant.id;
    let hash_key = tenant.user_hash_key;
    let storage = state.storage.clone();
    let cold = state.cold.clone();
    let heads = state.writer.heads().clone();
    let future_tolerance = state.config.limits.future_tolerance;
    let late_arrival = state.config.reads.funnel_late_arrival;
    let published_only = crate::http::export::reads_published_only(&state)?;
    let slot = state.read_slots.take(tenant_id, ReadKind::Funnel)?;
    let shared_identity = match &state.cluster {
        Some(node) => {
            Some((node.identity(tenant_id, hash_key).await).map_err(ApiError::unavailable)?)
        }
        None => None,
    };
    let (reached, as_of) = crate::blocking::run(move || {
        let _slot = slot;
        let as_of = if published_only {
            // At least this far: a flush may commit while the funnel reads.
            let cold = crate::storage::cold::newest_published(&cold, tenant_id)?;
            serde_json::json!({ "cold_through_seq": cold.cold_watermark })
        } else {
            serde_json::to_value(as_of(&storage, &heads, tenant_id)?).unwrap_or_default()
        };
        let identity = match shared_identity {
            Some(shared) => shared,
            None => crate::storage::identity::map(&storage, tenant_id, &hash_key)?,
        };
        let span = query::FunnelSpan {
            from,
            to,
            future_tolerance,
            late_arrival,
        };
        let stored = if published_only {
            query::Stored::Published(&cold)
        } else {
            query::Stored::Tiers {
                storage: &storage,
                cold: Some(&cold),
            }
        };
        let reached = query::funnel(stored, tenant_id, &steps, window_micros, &span, &identity)?;
        Ok::<_, query::FunnelError>((reached, as_of))
    })
    .await
    .map_err(blocking_error)?
    .map_err(|error| match error {
        too_many @ query::FunnelError::TooManyEvents => ApiError::bad_request(too_many.to_string()),
        query::FunnelError::Storage(error) => blocking_error(error),
        query::FunnelError::Cold(error) => blocking_error(error),
    })?;
    let errors = reached.relative_errors();
    let steps: Vec<_> = (request.steps.iter().zip(&reached.users).enumerate())
        .map(|(at, (event, users))| {
            let mut step = serde_json::json!({"event": event, "users": users});
            if let Some(error) = errors.as_ref().and_then(|errors| errors.get(at)) {
                step["relative_error"] = (*error).into();
            }
            step
        })
        .collect();
    telemetry::query_answered("funnel", started.elapsed(), false);
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "steps": steps,
        "window": humantime::format_duration(window).to_string(),
        "from": format_timestamp(from),
        "to": format_timestamp(to),
        "as_of": as_of,
    })))
}
