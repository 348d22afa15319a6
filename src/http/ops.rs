//! Operational endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document.

use actix_web::{web, HttpRequest, HttpResponse};
use subtle::ConstantTimeEq;

use crate::http::errors::ApiError;
use crate::http::{auth, AppState};
use crate::telemetry;

/// The OpenAPI 3.1 description of every endpoint.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The process is up.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Storage answers, the log writer runs, the actor arbiters run, the data disk has room.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let storage_ok = {
        let storage = state.storage.clone();
        crate::blocking::run(move || crate::storage::meta::readable(&storage))
            .await
            .unwrap_or(false)
    };
    let writer_ok = state.writer.is_healthy();
    let actors_ok = state.pipelines.healthy();
    let failed_threads = state.storage.health.failed();
    let threads_ok = failed_threads.is_empty();
    let disk_low = state.disk.too_low();
    let engines = match &state.cluster {
        Some(node) => {
            let engines = std::sync::Arc::clone(node);
            (node
                .on_engines(async move { engines.readiness().await })
                .await)
                .unwrap_or_else(|e| vec![("cluster", Err(e))])
        }
        None => Vec::new(),
    };
    let engines_ok = engines.iter().all(|(_, ready)| ready.is_ok());
    let ready =
        storage_ok && writer_ok && actors_ok && threads_ok && disk_low.is_none() && engines_ok;
    let mut body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {
            "storage": storage_ok,
            "log_writer": writer_ok,
            "actors": actors_ok,
            "storage_threads": threads_ok,
            "disk_space": disk_low.is_none(),
        },
        "failed_threads": failed_threads,
    });
    if let Some(reason) = disk_low {
        body["disk"] = reason.into();
    }
    if let Some(node) = &state.cluster {
        body["role"] = node.role.to_string().into();
        for (engine, readiness) in engines {
            body["checks"][engine] = readiness.is_ok().into();
            if let Err(reason) = readiness {
                body["errors"][engine] = reason.into();
            }
        }
    }
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus text exposition; with `server.metrics_token` set, only for that bearer token.
pub async fn metrics(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let token = &state.config.server.metrics_token;
    if !token.is_empty() {
        let sent = auth::header_credential(&req)?.ok_or_else(|| {
            ApiError::Unauthorized(
                "missing metrics token: send `Authorization: Bearer <token>`".into(),
            )
        })?;
        if !bool::from(sent.as_bytes().ct_eq(token.as_bytes())) {
            return Err(ApiError::Unauthorized("unknown metrics token".into()));
        }
    }
    telemetry::log_queue_depth(state.writer.queue_depth());
    let storage = state.storage.clone();
    if let Ok(Ok((bytes, events))) = crate::blocking::run(move || hot_log_size(&storage)).await {
        telemetry::hot_log_size(bytes, events);
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render()))
}

/// The hot log's bytes on disk and the events it holds (all tenants). Blocking.
fn hot_log_size(
    storage: &crate::storage::Storage,
) -> Result<(u64, u64), crate::storage::StorageError> {
    let log = storage.log();
    let mut events = 0;
    for tenant in log.tenants()? {
        let cold = crate::storage::cold::cold_watermark(storage, tenant)?;
        events += log.head(tenant)?.saturating_sub(cold);
    }
    Ok((log.disk_bytes(), events))
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}
