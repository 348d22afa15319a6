//! The HTTP API (actix-web).
//!
//! - [`ingest`]: Segment-compatible ingestion endpoints, parsed by [`segment`], bodies read by
//!   [`body`];
//! - [`export`]: reading stored events back;
//! - [`query`]: series, events, uniques, funnels; [`live`]: the live WebSocket;
//! - [`admin`]: tenants and keys; [`schemas`]: tracking plans; [`deadletter`]: dead letters;
//! - [`ops`]: health, readiness, metrics, the OpenAPI document;
//! - [`dashboard`]: the browser dashboard at `/` (embedded files, no API of its own);
//! - [`auth`] and [`errors`]: who may call, and how every error is answered (problem+json);
//! - [`deadline`]: every request body arrives within `server.body_timeout` or is cut off;
//! - [`slots`]: per-tenant caps on exports, funnels and live connections.
//!
//! [`AppState`] is built once, before `HttpServer::new`, and shared by every worker.

pub mod admin;
pub mod auth;
pub mod body;
pub mod dashboard;
pub mod deadletter;
pub mod deadline;
pub mod errors;
pub mod export;
pub mod ingest;
pub mod live;
pub mod lz64;
pub mod ops;
pub mod posthog;
pub mod query;
pub mod schemas;
pub mod segment;
pub mod slots;

use std::sync::Arc;

use actix_cors::Cors;
use actix_web::dev::Service;
use actix_web::{web, HttpRequest, HttpResponse};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::actors::Pipelines;
use crate::config::Config;
use crate::event::EventKind;
use crate::query::QueryCache;
use crate::ratelimit::RateLimits;
use crate::storage::writer::LogWriter;
use crate::storage::Storage;
use crate::telemetry;
use crate::tenant::TenantDirectory;

use self::errors::{extractor_error, ApiError};
use self::segment::Route;

/// Everything the handlers share.
pub struct AppState {
    pub config: Config,
    pub storage: Storage,
    pub writer: Arc<LogWriter>,
    pub directory: Arc<TenantDirectory>,
    /// The tenants' tracking plans.
    pub schemas: Arc<crate::schema::SchemaRegistry>,
    pub pipelines: Arc<Pipelines>,
    /// Create, change and delete tenants.
    pub lifecycle: crate::lifecycle::TenantLifecycle,
    pub rate_limits: Arc<RateLimits>,
    /// The data disk's free space.
    pub disk: Arc<crate::storage::disk::DiskSpace>,
    /// Where the cold segments are.
    pub cold: crate::storage::cold::ColdStore,
    pub query_cache: Arc<QueryCache>,
    pub metrics: PrometheusHandle,
    /// Places for decompressing and parsing large bodies.
    pub large_bodies: body::LargeBodies,
    /// Per-tenant caps on exports, funnels and live connections.
    pub read_slots: slots::ReadSlots,
    /// Cluster mode: this node's handles on the engines (`None` on a single node).
    pub cluster: Option<Arc<crate::cluster::node::ClusterNode>>,
}

/// Routes a process node serves: it has no API of its own besides operations.
const PROCESS_ROUTES: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/openapi.json"];

/// Why a node of `role` does not serve `route`, if it does not.
fn unserved(role: Option<crate::cluster::Role>, route: Option<&str>) -> Option<ApiError> {
    use crate::cluster::Role;
    let route = route?;
    match role? {
        Role::All => None,
        Role::Process if !PROCESS_ROUTES.contains(&route) => Some(ApiError::NotImplemented(
            format!("{route} is served by the cluster's ingest nodes; a process node serves only operations"),
        )),
        Role::Process | Role::Ingest => None,
    }
}

/// Segment routes: path and how its body is read. The one-letter paths are those Segment's
/// browser library (analytics.js, @segment/analytics-next) posts to: `/v1/b` with its batching
/// delivery, `/v1/<first letter of the type>` without.
const SEGMENT_ROUTES: [(&str, Route); 15] = [
    ("/v1/batch", Route::Batch),
    ("/v1/import", Route::Batch),
    ("/v1/b", Route::Batch),
    ("/v1/track", Route::Single(EventKind::Track)),
    ("/v1/identify", Route::Single(EventKind::Identify)),
    ("/v1/page", Route::Single(EventKind::Page)),
    ("/v1/screen", Route::Single(EventKind::Screen)),
    ("/v1/group", Route::Single(EventKind::Group)),
    ("/v1/alias", Route::Single(EventKind::Alias)),
    ("/v1/t", Route::Single(EventKind::Track)),
    ("/v1/i", Route::Single(EventKind::Identify)),
    ("/v1/p", Route::Single(EventKind::Page)),
    ("/v1/s", Route::Single(EventKind::Screen)),
    ("/v1/g", Route::Single(EventKind::Group)),
    ("/v1/a", Route::Single(EventKind::Alias)),
];

/// Largest admin JSON body.
const ADMIN_JSON_LIMIT: usize = 64 * 1024;

/// Registers one PostHog capture route (and its form with a trailing slash).
fn posthog_route(config: &mut web::ServiceConfig, path: &'static str, protocol: posthog::Protocol) {
    for served in [path.to_string(), format!("{path}/")] {
        let handler = move |req: HttpRequest,
                            payload: web::Payload,
                            state: web::Data<AppState>,
                            query: web::Query<posthog::CaptureQuery>| {
            posthog::capture(req, payload, state, query, protocol, path)
        };
        let mut resource = web::resource(served).route(web::post().to(handler));
        if protocol == posthog::Protocol::Legacy {
            resource = resource.route(web::get().to(handler));
        }
        config.service(resource.default_service(web::to(method_not_allowed)));
    }
}

/// Registers every route.
pub fn configure(config: &mut web::ServiceConfig) {
    for path in posthog::LEGACY_PATHS {
        posthog_route(config, path, posthog::Protocol::Legacy);
    }
    posthog_route(config, posthog::V1_PATH, posthog::Protocol::V1);
    for path in ["/flags", "/flags/", "/decide", "/decide/"] {
        config.service(
            web::resource(path)
                .route(web::get().to(posthog::flags))
                .route(web::post().to(posthog::flags))
                .default_service(web::to(method_not_allowed)),
        );
    }
    config.service(
        web::resource("/array/{token}/config")
            .route(web::get().to(posthog::remote_config))
            .default_service(web::to(method_not_allowed)),
    );
    config.service(
        web::resource("/array/{token}/config.js")
            .route(web::get().to(posthog::remote_config_script))
            .default_service(web::to(method_not_allowed)),
    );
    for (path, route) in SEGMENT_ROUTES {
        config.service(
            web::resource(path)
                .route(web::post().to(
                    move |req: HttpRequest, payload: web::Payload, state: web::Data<AppState>| {
                        ingest::handle(req, payload, state, route, path)
                    },
                ))
                .default_service(web::to(method_not_allowed)),
        );
    }
    config
        .app_data(
            web::JsonConfig::default()
                .limit(ADMIN_JSON_LIMIT)
                .error_handler(|err, _| extractor_error("JSON body", err)),
        )
        .app_data(
            web::QueryConfig::default()
                .error_handler(|err, _| extractor_error("query string", err)),
        )
        .app_data(web::PathConfig::default().error_handler(|err, _| extractor_error("path", err)))
        .service(
            web::resource("/v1/events/export")
                .route(web::get().to(export::export))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/query/series")
                .route(web::get().to(query::series))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/query/events")
                .route(web::get().to(query::events))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/query/uniques")
                .route(web::get().to(query::uniques))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/query/funnel")
                .route(web::post().to(query::funnel))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/live")
                .route(web::get().to(live::live))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/tenants/{id}/rollups/rebuild")
                .route(web::post().to(admin::rebuild_rollups))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/tenants")
                .route(web::get().to(admin::list))
                .route(web::post().to(admin::create))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/tenants/{id}")
                .route(web::get().to(admin::get))
                .route(web::patch().to(admin::update))
                .route(web::delete().to(admin::delete))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/flush")
                .route(web::post().to(admin::flush))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/tenants/{id}/users/{user_id}")
                .route(web::delete().to(admin::erase_user))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/deletions/{id}")
                .route(web::get().to(admin::deletion))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/tenants/{id}/schemas")
                .route(web::get().to(schemas::tenant_plan))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/tenants/{id}/schemas/{event}")
                .route(web::put().to(schemas::register))
                .route(web::get().to(schemas::versions))
                .route(web::delete().to(schemas::retire))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/deadletter")
                .route(web::get().to(deadletter::list))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/tenants/{id}/deadletter/replay")
                .route(web::post().to(deadletter::replay))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/schemas")
                .route(web::get().to(schemas::own_plan))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/tenants/{id}/segments")
                .route(web::get().to(admin::segments))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/admin/v1/tenants/{id}/rotate-keys")
                .route(web::post().to(admin::rotate))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/segments")
                .route(web::get().to(admin::own_segments))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/tenant")
                .route(web::get().to(admin::own_tenant))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/")
                .route(web::get().to(dashboard::index))
                .route(web::head().to(dashboard::index))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/ui/{file:.+}")
                .route(web::get().to(dashboard::file))
                .route(web::head().to(dashboard::file))
                .default_service(web::to(method_not_allowed)),
        )
        .route("/healthz", web::get().to(ops::healthz))
        .route("/readyz", web::get().to(ops::readyz))
        .route("/metrics", web::get().to(ops::metrics))
        .route("/openapi.json", web::get().to(ops::openapi));
}

/// Builds the actix-web app for one worker.
pub fn app(
    state: web::Data<AppState>,
) -> actix_web::App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    // Browsers may call the tenant API from any page (the origin is mirrored); the admin API
    // and the metrics get no CORS headers, so no web page can read them.
    let cors = Cors::default()
        .allowed_origin_fn(|_origin, request| cross_origin_allowed(request.uri.path()))
        .allowed_methods(["GET", "POST", "PATCH", "DELETE", "OPTIONS"])
        .allow_any_header()
        .expose_headers([
            "Retry-After",
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
        ])
        .max_age(86_400);
    let body_timeout = state.config.server.body_timeout;
    let role = state.cluster.as_ref().map(|node| node.role);
    actix_web::App::new()
        .app_data(state)
        .wrap_fn(move |mut req, srv| {
            deadline::limit_body(&mut req, body_timeout);
            let route = req.match_pattern();
            let call = match unserved(role, route.as_deref()) {
                None => Ok(srv.call(req)),
                Some(error) => {
                    Err(req.into_response(actix_web::ResponseError::error_response(&error)))
                }
            };
            async move {
                let response = match call {
                    Ok(call) => call.await?.map_into_left_body(),
                    Err(refused) => refused.map_into_right_body(),
                };
                let route = route.unwrap_or_else(|| "unmatched".to_string());
                telemetry::http_request(route, response.status().as_u16());
                Ok(response)
            }
        })
        .wrap(cors)
        .configure(configure)
        .default_service(web::to(not_found))
}

/// Whether browsers may call `path` from another origin.
fn cross_origin_allowed(path: &str) -> bool {
    !(path.starts_with("/admin")
        || path.starts_with("/metrics")
        || path == "/"
        || path.starts_with("/ui/"))
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.path()
    )))
}
