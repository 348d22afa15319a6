//! Admin API: tenants, their settings and keys. Guarded by the admin token.
//!
//! Writes go through the [`crate::tenant::TenantDirectory`] on a blocking thread (they fsync).
//! Deleting a tenant revokes its keys at once, stops its pipeline and purges its events.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use crate::event::format_timestamp;
use crate::http::errors::ApiError;
use crate::http::{auth, AppState};
use crate::tenant::{
    DirectoryError, RotateWhich, SettingsPatch, TenantId, TenantRecord, TenantSettings,
};

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
fn existing_tenant(state: &AppState, raw: &str) -> Result<Arc<TenantRecord>, ApiError> {
    let id = tenant_id(raw)?;
    state
        .directory
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("tenant {id} not found")))
}

fn directory_error(error: DirectoryError) -> ApiError {
    match error {
        DirectoryError::NotFound(id) => ApiError::NotFound(format!("tenant {id} not found")),
        DirectoryError::Invalid(detail) => ApiError::bad_request(detail),
        DirectoryError::Storage(error) => {
            tracing::error!(%error, "admin write failed");
            ApiError::Internal(format!("storage failure: {error}"))
        }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DirectoryError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(work)
        .await
        .map_err(|e| ApiError::Internal(format!("admin task failed: {e}")))?
        .map_err(directory_error)
}

pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<CreateTenant>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let CreateTenant { name, settings } = body.into_inner();
    let directory = state.directory.clone();
    let (record, keys) = blocking(move || {
        let (record, keys) = directory.create(&name)?;
        let record = match settings {
            Some(patch) => match directory.update(record.id, None, &patch) {
                Ok(updated) => updated,
                Err(error) => {
                    // Don't leave a half-configured tenant behind.
                    let _ = directory.remove(record.id);
                    return Err(error);
                }
            },
            None => record,
        };
        Ok((record, keys))
    })
    .await?;
    tracing::info!(tenant = %record.id, name = %record.name, "tenant created");
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
    let directory = state.directory.clone();
    let record =
        blocking(move || directory.update(id, name.as_deref(), &settings.unwrap_or_default()))
            .await?;
    tracing::info!(tenant = %id, "tenant updated");
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
    let directory = state.directory.clone();
    let (record, keys) = blocking(move || directory.rotate(id, which)).await?;
    tracing::info!(tenant = %id, ?which, "tenant keys rotated");
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
    let directory = state.directory.clone();
    blocking(move || directory.remove(id)).await?;
    state.pipelines.stop(id);
    state.rate_limits.forget(id);
    state.query_cache.forget(id);
    // Once sealed, nothing more is written for the tenant; the purge then runs off the writer
    // thread, so deleting a large tenant does not delay other tenants' acknowledgements. If
    // this fails or the server crashes, the purge is finished at the next start (tombstone).
    let purge_failed = |error: crate::storage::StorageError| {
        tracing::error!(tenant = %id, %error, "purge failed; it is retried at the next start");
        ApiError::Internal(format!(
            "tenant removed; purging its data failed and is retried at the next start: {error}"
        ))
    };
    state.writer.seal_tenant(id).await.map_err(purge_failed)?;
    let storage = state.storage.clone();
    let purged = web::block(move || crate::storage::purge_tenant(&storage, id))
        .await
        .map_err(|e| ApiError::Internal(format!("purge task failed: {e}")))?
        .map_err(purge_failed)?;
    tracing::info!(tenant = %id, purged_batches = purged, "tenant deleted and purged");
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
    if !state.pipelines.pipeline(id).rebuild_rollups().await {
        return Err(ApiError::unavailable(
            "the tenant's pipeline is busy; retry",
        ));
    }
    state.query_cache.forget(id);
    tracing::info!(tenant = %id, "rollup rebuild requested");
    Ok(HttpResponse::Accepted().json(serde_json::json!({
        "id": id.to_string(),
        "rebuilding": true,
    })))
}
