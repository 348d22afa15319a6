//! The tracking plan over HTTP: the admin registers and retires schema versions; a tenant reads
//! its own plan with its read key. The rules are [`crate::schema`]'s.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::http::errors::ApiError;
use crate::http::{admin, auth, AppState};
use std::sync::Arc;

use crate::ids::TenantId;
use crate::schema::{prepare_retire, Registration, RegistryError, SchemaVersion, TenantPlan};
use crate::tenant::TenantRecord;

fn registry_error(error: RegistryError) -> ApiError {
    match error {
        RegistryError::Invalid(detail) => ApiError::bad_request(detail),
        RegistryError::NotFound(detail) => ApiError::NotFound(detail),
        incompatible @ RegistryError::Incompatible { .. } => {
            let detail = incompatible.to_string();
            let RegistryError::Incompatible { changes, .. } = incompatible else {
                unreachable!("matched above")
            };
            ApiError::Conflict {
                detail,
                breaking_changes: changes,
            }
        }
        RegistryError::Storage(error) => ApiError::Internal(format!("storage failure: {error}")),
        RegistryError::Unavailable(detail) => ApiError::unavailable(detail),
    }
}

/// One event's versions and the one in force.
fn event_json(name: &str, plan: &TenantPlan) -> Option<serde_json::Value> {
    let event = plan.events.get(name)?;
    Some(serde_json::json!({
        "event": name,
        "in_force": event.in_force.as_ref().map(|v| v.version),
        "versions": event.versions,
    }))
}

/// The whole plan, events by name, with the tenant's settings that apply to it.
fn plan_json(tenant: &TenantRecord, plan: &TenantPlan) -> serde_json::Value {
    let mut names: Vec<&String> = plan.events.keys().collect();
    names.sort();
    serde_json::json!({
        "schema_enforcement": tenant.settings.schema_enforcement,
        "unplanned_events": tenant.settings.unplanned_events,
        "events": names.iter().filter_map(|n| event_json(n, plan)).collect::<Vec<_>>(),
    })
}

/// A change to one event's versions.
enum PlanChange {
    Register(Registration),
    Retire(u32),
}

/// Makes `change` to `event`'s versions: in the node's registry, or in cluster mode in the
/// shared plans (`crate::cluster::plans`), made from the versions they hold.
async fn change_plan(
    state: &AppState,
    id: TenantId,
    event: String,
    change: PlanChange,
) -> Result<SchemaVersion, ApiError> {
    let registry = Arc::clone(&state.schemas);
    match state.cluster.clone() {
        None => crate::blocking::run(move || match change {
            PlanChange::Register(registration) => registry.register(id, &event, registration),
            PlanChange::Retire(number) => registry.retire(id, &event, number),
        })
        .await
        .map_err(|e| e.to_string()),
        Some(node) => {
            let engines = Arc::clone(&node);
            let shared = async move {
                let prepare = |current: &[SchemaVersion]| match &change {
                    PlanChange::Register(registration) => {
                        registry.prepare_register(id, &event, current, registration.clone())
                    }
                    PlanChange::Retire(number) => prepare_retire(&event, current, *number),
                };
                engines.plans.change(&registry, id, &event, prepare).await
            };
            node.on_engines(shared).await
        }
    }
    .map_err(|e| ApiError::Internal(format!("schema task failed: {e}")))?
    .map_err(registry_error)
}

/// `PUT /admin/v1/tenants/{id}/schemas/{event}`: registers a new version.
pub async fn register(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Json<Registration>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let (tenant, event) = path.into_inner();
    let id = admin::existing_tenant(&state, &tenant)?.id;
    let version = change_plan(&state, id, event, PlanChange::Register(body.into_inner())).await?;
    Ok(HttpResponse::Created().json(version))
}

/// `GET /admin/v1/tenants/{id}/schemas/{event}`: the event's versions.
pub async fn versions(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let (tenant, event) = path.into_inner();
    let id = admin::existing_tenant(&state, &tenant)?.id;
    let plan = state.schemas.plan(id);
    let found = event_json(&event, &plan)
        .ok_or_else(|| ApiError::NotFound(format!("event {event:?} has no schema")))?;
    Ok(HttpResponse::Ok().json(found))
}

/// `GET /admin/v1/tenants/{id}/schemas`: the tenant's whole plan.
pub async fn tenant_plan(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let tenant = admin::existing_tenant(&state, &path)?;
    Ok(HttpResponse::Ok().json(plan_json(&tenant, &state.schemas.plan(tenant.id))))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireQuery {
    version: Option<u32>,
}

/// `DELETE /admin/v1/tenants/{id}/schemas/{event}[?version=N]`: retires a version (default:
/// the one in force).
pub async fn retire(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    query: web::Query<RetireQuery>,
) -> Result<HttpResponse, ApiError> {
    auth::require_admin(&req, &state.directory)?;
    let (tenant, event) = path.into_inner();
    let id = admin::existing_tenant(&state, &tenant)?.id;
    let number = match query.version {
        Some(number) => number,
        None => state
            .schemas
            .plan(id)
            .in_force(&event)
            .map(|v| v.version)
            .ok_or_else(|| {
                ApiError::NotFound(format!("event {event:?} has no schema version in force"))
            })?,
    };
    let retired = change_plan(&state, id, event, PlanChange::Retire(number)).await?;
    Ok(HttpResponse::Ok().json(retired))
}

/// `GET /v1/schemas` (read key): the tenant's own plan.
pub async fn own_plan(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let tenant = auth::read_key_tenant(&req, &state.directory)?;
    Ok(HttpResponse::Ok().json(plan_json(&tenant, &state.schemas.plan(tenant.id))))
}
