//! Dead letters over HTTP: a tenant lists its own with its read key; the admin replays them.
//! What a letter is and how a replay works is [`crate::deadletter`]'s.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::deadletter::{self, LetterStore, ReasonKind, ReplayDeps, ReplayError, ReplayFilter};
use crate::event::Micros;
use crate::http::errors::ApiError;
use crate::http::export::time_param;
use crate::http::{admin, auth, AppState};

/// Most letters one page or one replay takes.
const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;
/// Letters a page examines per letter it may return (the filter may skip most of them).
const EXAMINED_PER_LETTER: usize = 10;

/// Which letters: the query of a listing, the body of a replay.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LetterQuery {
    from: Option<String>,
    to: Option<String>,
    event: Option<String>,
    reason: Option<String>,
    limit: Option<usize>,
    /// The `next` of the previous page.
    before: Option<String>,
}

impl LetterQuery {
    fn filter(self, default_limit: usize) -> Result<ReplayFilter, ApiError> {
        let (from, to) = range(self.from.as_deref(), self.to.as_deref())?;
        Ok(ReplayFilter {
            from,
            to,
            reason: reason_param(self.reason.as_deref())?,
            before: cursor_param(self.before.as_deref())?,
            limit: limit_param(self.limit.unwrap_or(default_limit))?,
            event: self.event,
        })
    }
}

fn reason_param(reason: Option<&str>) -> Result<Option<ReasonKind>, ApiError> {
    reason
        .map(|text| {
            ReasonKind::parse(text).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`reason` must be `schema_mismatch` or `unplanned`, not {text:?}"
                ))
            })
        })
        .transpose()
}

fn cursor_param(
    before: Option<&str>,
) -> Result<Option<crate::storage::deadletters::LetterKey>, ApiError> {
    before
        .map(|text| {
            deadletter::parse_hex(text).ok_or_else(|| {
                ApiError::bad_request(
                    "`before` is not a dead-letter cursor (the `next` of a previous answer)",
                )
            })
        })
        .transpose()
}

fn limit_param(limit: usize) -> Result<usize, ApiError> {
    match limit {
        0 => Err(ApiError::bad_request("`limit` must be at least 1")),
        n if n > MAX_LIMIT => Err(ApiError::bad_request(format!(
            "`limit` must be at most {MAX_LIMIT}"
        ))),
        n => Ok(n),
    }
}

/// `from` (default: the beginning) and `to` (default: now and beyond).
fn range(from: Option<&str>, to: Option<&str>) -> Result<(Micros, Micros), ApiError> {
    let from = time_param("from", from)?.unwrap_or(0);
    let to = time_param("to", to)?.unwrap_or(i64::MAX);
    if from >= to {
        return Err(ApiError::bad_request("`from` must be before `to`"));
    }
    Ok((from, to))
}

/// A failure to read or change letters: 503 when the shared store is unreachable.
fn replay_error(error: ReplayError) -> ApiError {
    match error {
        ReplayError::Storage(crate::storage::StorageError::Unavailable(detail)) => {
            ApiError::unavailable(detail)
        }
        other => ApiError::Internal(format!("dead letters: {other}")),
    }
}

/// `GET /v1/deadletter` (read key): the tenant's dead letters, newest first, a page at a time.
pub async fn list(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<LetterQuery>,
) -> Result<HttpResponse, ApiError> {
    let tenant = auth::read_key_tenant(&req, &state.directory)?;
    let filter = query.into_inner().filter(DEFAULT_LIMIT)?;
    let store = LetterStore::of(&state.storage, state.cluster.as_ref());
    store.expire(&tenant).await.map_err(replay_error)?;
    let page = store
        .page(tenant.id, &filter, filter.limit * EXAMINED_PER_LETTER)
        .await
        .map_err(replay_error)?;
    let items: Vec<serde_json::Value> = page
        .letters
        .iter()
        .map(|(key, letter)| letter.view(&deadletter::hex(*key)))
        .collect();
    let mut body = serde_json::json!({ "items": items });
    if let Some(next) = page.next {
        body["next"] = serde_json::Value::String(deadletter::hex(next));
    }
    Ok(HttpResponse::Ok().json(body))
}

/// `POST /admin/v1/tenants/{id}/deadletter/replay`: re-checks the matching letters against the
/// current plan; those that pass enter the log, the rest stay with their new reason.
pub async fn replay(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let tenant = admin::existing_tenant(&state, &path)?;
    // No body: every letter (up to the limit).
    let query: LetterQuery = if body.iter().all(u8::is_ascii_whitespace) {
        LetterQuery::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid replay filter: {e}")))?
    };
    let filter = query.filter(MAX_LIMIT)?;
    let letters = LetterStore::of(&state.storage, state.cluster.as_ref());
    let deps = ReplayDeps {
        letters: &letters,
        schemas: &state.schemas,
        pipelines: &state.pipelines,
        max_errors: state.config.processing.max_violations_per_event,
        max_batch_events: state.config.limits.max_events_per_request,
    };
    match deadletter::replay(deps, &tenant, filter).await {
        Ok(report) => Ok(HttpResponse::Ok().json(report)),
        Err(ReplayError::Busy { reason, report }) => Err(ApiError::unavailable(format!(
            "the replay stopped early: {reason}; done so far: {} logged, {} duplicates, {} still refused; retry to continue",
            report.logged, report.duplicates, report.still_refused
        ))),
        Err(other) => Err(replay_error(other)),
    }
}
