//! Operational endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document.

use actix_web::{web, HttpResponse};

use crate::http::AppState;
use crate::telemetry;

/// The OpenAPI 3.1 description of every endpoint.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The process is up.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Storage answers, the log writer runs, the actor arbiters run.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let storage_ok = {
        let storage = state.storage.clone();
        web::block(move || {
            storage.meta.first_key_value().is_some() || storage.meta.is_empty().is_ok()
        })
        .await
        .unwrap_or(false)
    };
    let writer_ok = state.writer.is_healthy();
    let actors_ok = state.pipelines.healthy();
    let body = serde_json::json!({
        "status": if storage_ok && writer_ok && actors_ok { "ready" } else { "not ready" },
        "checks": { "storage": storage_ok, "log_writer": writer_ok, "actors": actors_ok },
    });
    if storage_ok && writer_ok && actors_ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus text exposition.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    telemetry::log_queue_depth(state.writer.queue_depth());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}
