//! Admin API: tenants, their settings and keys. Guarded by the admin token.
//!
//! The handlers check the token and translate requests and replies; the operations themselves
//! are [`crate::lifecycle::TenantLifecycle`]'s.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use crate::erasure::{ErasureJob, Requester};
use crate::event::format_timestamp;
use crate::http::errors::ApiError;
use crate::http::{auth, AppState};
use crate::ids::TenantId;
use crate::lifecycle::LifecycleError;
use crate::tenant::{DirectoryError, RotateWhich, SettingsPatch, TenantRecord, TenantSettings};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    name: String,
    #[serde(default)]
    settings: Option<SettingsPatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    name: Option<String>,
    #[serde(default)]
    settings: Option<SettingsPatch>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKeys {
    which: Option<RotateWhich>,
}

/// A tenant as the API shows it (never with key digests or the hashing secret).
#[derive(Debug, Serialize)]
pub struct TenantView {
    id: String,
    name: String,
    created_at: String,
    settings: TenantSettings,
}

impl From<&TenantRecord> for TenantView {
    fn from(record: &TenantRecord) -> TenantView {
        TenantView {
            id: record.id.to_string(),
            name: record.name.clone(),
            created_at: format_timestamp(record.created_at),
            settings: record.settings.clone(),
        }
    }
}

fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    raw.parse()
        .map_err(|()| ApiError::NotFound(format!("tenant {raw:?} not found")))
}

/// The tenant named in the path, or 404.
pub(crate) fn existing_tenant(state: &AppState, raw: &str) -> Result<Arc<TenantRecord>, ApiError> {
    let id = tenant_id(raw)?;
    state
        .directory
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("tenant {id} not found")))
}

fn lifecycle_error(error: LifecycleError) -> ApiError {
    match error {
        LifecycleError::Directory(DirectoryError::NotFound(id)) => {
            ApiError::NotFound(format!("tenant {id} not found"))
        }
        LifecycleError::Directory(DirectoryError::Invalid(detail)) => ApiError::bad_request(detail),
        LifecycleError::Directory(DirectoryError::Storage(error)) => {
            tracing::error!(%error, "admin write failed");
            ApiError::Internal(format!("storage failure: {error}"))
        }
        LifecycleError::Cold(detail) => ApiError::unavailable(detail),
        error @ LifecycleError::Shared(_) => ApiError::unavailable(error.to_string()),
        other => ApiError::Internal(other.to_string()),
    }
}

pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<CreateTenant>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let CreateTenant { name, settings } = body.into_inner();
    let (record, keys) = (state.lifecycle.create(name, settings).await).map_err(lifecycle_error)?;
    let view = TenantView::from(&*record);
    Ok(HttpResponse::Created().json(serde_json::json!({
        "id": view.id,
        "name": view.name,
        "created_at": view.created_at,
        "settings": view.settings,
        "write_key": keys.write_key,
        "read_key": keys.read_key,
    })))
}

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let tenants: Vec<TenantView> = state
        .directory
        .list()
        .iter()
        .map(|r| TenantView::from(&**r))
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "tenants": tenants })))
}

pub async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let record = existing_tenant(&state, &path)?;
    Ok(HttpResponse::Ok().json(TenantView::from(&*record)))
}

pub async fn update(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<UpdateTenant>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let id = tenant_id(&path)?;
    let UpdateTenant { name, settings } = body.into_inner();
    let patch = settings.unwrap_or_default();
    let record = (state.lifecycle.update(id, name, patch).await).map_err(lifecycle_error)?;
    Ok(HttpResponse::Ok().json(TenantView::from(&*record)))
}

pub async fn rotate(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let id = tenant_id(&path)?;
    // The body is optional (empty = rotate both), but a body that is there must be valid.
    let request: RotateKeys = if body.iter().all(u8::is_ascii_whitespace) {
        RotateKeys::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    let which = request.which.unwrap_or(RotateWhich::Both);
    let (record, keys) = (state.lifecycle.rotate(id, which).await).map_err(lifecycle_error)?;
    let mut reply = serde_json::Map::new();
    reply.insert("id".into(), record.id.to_string().into());
    if let Some(key) = keys.write_key {
        reply.insert("write_key".into(), key.into());
    }
    if let Some(key) = keys.read_key {
        reply.insert("read_key".into(), key.into());
    }
    Ok(HttpResponse::Ok().json(reply))
}

pub async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let id = tenant_id(&path)?;
    let purged = (state.lifecycle.delete(id).await).map_err(lifecycle_error)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": id.to_string(),
        "deleted": true,
        "purged_log_entries": purged,
    })))
}

/// `POST /admin/v1/tenants/{id}/rollups/rebuild`: drop the tenant's rollups and recompute them
/// from the log. Answers 202 once the old rollups are deleted; `as_of` in query answers then
/// shows the replay's progress.
pub async fn rebuild_rollups(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let id = existing_tenant(&state, &path)?.id;
    if !state.lifecycle.rebuild_rollups(id).await {
        return Err(ApiError::unavailable(
            "the rebuild did not start (the tenant's pipeline is busy, or in cluster mode its partition's owner did not answer); retry",
        ));
    }
    Ok(HttpResponse::Accepted().json(serde_json::json!({
        "id": id.to_string(),
        "rebuilding": true,
    })))
}

/// `GET /admin/v1/tenants/{id}/segments`: the tenant's committed cold segments, in flush order,
/// and its cold watermark (the last sequence that left the hot log).
pub async fn segments(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let id = existing_tenant(&state, &path)?.id;
    segments_of(&state, id).await
}

/// `GET /v1/segments` (read key): the tenant's own cold segments, as the admin listing gives them.
pub async fn own_segments(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let tenant = auth::read_key_tenant(&req, &state.directory)?;
    segments_of(&state, tenant.id).await
}

/// `GET /v1/tenant` (read key): which tenant the key reads, `{"id", "name"}`.
pub async fn own_tenant(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let tenant = auth::read_key_tenant(&req, &state.directory)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": tenant.id.to_string(),
        "name": tenant.name,
    })))
}

async fn segments_of(state: &AppState, id: TenantId) -> Result<HttpResponse, ApiError> {
    let published_only = crate::http::export::reads_published_only(state)?;
    let (storage, cold) = (state.storage.clone(), state.cold.clone());
    let (segments, watermark) = crate::blocking::run(move || {
        if published_only {
            let published = crate::storage::cold::newest_published(&cold, id)?;
            return Ok((published.segments, published.cold_watermark));
        }
        let segments = crate::storage::cold::segments(&storage, id)?;
        let watermark = crate::storage::cold::cold_watermark(&storage, id)?;
        Ok::<_, crate::storage::cold::ColdError>((segments, watermark))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("reading segments failed: {e}")))?
    .map_err(|error| match error {
        crate::storage::cold::ColdError::Storage(e) => {
            ApiError::Internal(format!("reading segments failed: {e}"))
        }
        // The shared store, unreachable.
        e => ApiError::unavailable(format!("reading segments failed: {e}")),
    })?;
    let listed: Vec<serde_json::Value> = segments
        .iter()
        .map(|segment| {
            serde_json::json!({
                "path": segment.path,
                "hour": format_timestamp(segment.hour),
                "first_seq": segment.first_seq,
                "last_seq": segment.last_seq,
                "rows": segment.rows,
                "bytes": segment.bytes,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": id.to_string(),
        "cold_watermark": watermark,
        "segments": listed,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushQuery {
    tenant: Option<String>,
}

/// `POST /admin/v1/flush[?tenant=<id>]`: brings each tenant's rollup and dedup watermarks up to
/// date, then flushes everything received more than `storage.hot_retention` ago to the cold
/// tier; answers once that is committed, with each tenant's cold watermark.
pub async fn flush(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<FlushQuery>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let tenants: Vec<TenantId> = match &query.tenant {
        Some(raw) => vec![existing_tenant(&state, raw)?.id],
        None => state
            .directory
            .list()
            .iter()
            .map(|record| record.id)
            .collect(),
    };
    if let Some(node) = &state.cluster {
        crate::http::export::reads_published_only(&state)?;
        let watermarks =
            (state.lifecycle.flush_shared(node, &tenants).await).map_err(lifecycle_error)?;
        let flushed: Vec<serde_json::Value> = (watermarks.into_iter())
            .map(|(id, watermark)| serde_json::json!({"id": id.to_string(), "cold_watermark": watermark}))
            .collect();
        return Ok(HttpResponse::Ok().json(serde_json::json!({ "tenants": flushed })));
    }
    let hot_retention = state.config.storage.hot_retention;
    let mut flushed = Vec::with_capacity(tenants.len());
    for id in tenants {
        let watermark =
            (state.lifecycle.flush_cold(id, hot_retention).await).map_err(lifecycle_error)?;
        flushed.push(serde_json::json!({"id": id.to_string(), "cold_watermark": watermark}));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "tenants": flushed })))
}

/// `DELETE /admin/v1/tenants/{id}/users/{user_id}`: starts erasing every raw event whose
/// `userId` or `anonymousId` is `user_id`, from both tiers; 202 with the job.
pub async fn erase_user(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    crate::http::export::reads_published_only(&state)?;
    let (tenant, user_id) = path.into_inner();
    let id = existing_tenant(&state, &tenant)?.id;
    if user_id.is_empty() || user_id.len() > 1024 {
        return Err(ApiError::bad_request(
            "user_id must be 1 to 1024 bytes long",
        ));
    }
    let token = auth::header_credential(&req)?.unwrap_or_default();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(token.as_bytes());
    let requested_by = Requester {
        client_ip: req.peer_addr().map(|addr| addr.ip().to_string()),
        user_agent: (req.headers().get(actix_web::http::header::USER_AGENT))
            .and_then(|value| value.to_str().ok())
            .map(str::to_string),
        token_fingerprint: digest[..8].iter().map(|b| format!("{b:02x}")).collect(),
    };
    let job =
        (state.lifecycle.erase_user(id, user_id, requested_by).await).map_err(lifecycle_error)?;
    Ok(HttpResponse::Accepted()
        .insert_header((
            actix_web::http::header::LOCATION,
            format!("/admin/v1/deletions/{}", job.id),
        ))
        .json(job_view(&job)))
}

/// `GET /admin/v1/deletions/{id}`: an erasure job, which is also its audit record.
pub async fn deletion(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    crate::http::export::reads_published_only(&state)?;
    let not_found = || ApiError::NotFound(format!("deletion {:?} not found", path.as_str()));
    let id = uuid::Uuid::parse_str(&path).map_err(|_| not_found())?;
    let job = (state.lifecycle.erasure(id).await)
        .map_err(lifecycle_error)?
        .ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(job_view(&job)))
}

fn job_view(job: &ErasureJob) -> serde_json::Value {
    let time = |at: Option<crate::event::Micros>| at.map(format_timestamp);
    serde_json::json!({
        "id": job.id.to_string(),
        "tenant": job.tenant.to_string(),
        "user_id": job.user_id,
        "status": job.status,
        "requested_at": format_timestamp(job.requested_at),
        "requested_by": job.requested_by,
        "finished_at": time(job.finished_at),
        "removed_events": job.removed_events,
        "rewritten_segments": job.rewritten_segments,
        "removed_identity_links": job.removed_identity_links,
        "removed_dead_letters": job.removed_dead_letters,
        "removed_segments": job.removed_segments,
        "superseded_purged_by": time(job.superseded_purged_by),
        "error": job.error,
    })
}
