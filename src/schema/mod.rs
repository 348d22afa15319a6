//! Tracking plans: per tenant and event name, numbered versions of a JSON Schema (draft
//! 2020-12) for the event's payload: `properties` for track, page and screen calls, `traits`
//! for identify and group calls. Names are the ones rollups use (`crate::rollup::series_name`):
//! a track's event name, `$page`, `$screen`, `$identify`, `$group`.
//!
//! The newest version not retired is the one in force. A new version must be compatible with
//! it under the event's compatibility mode ([`compat`]). What happens to an event that does not
//! match is the enforcement in force ([`Enforcement`]): the event's own, else the tenant's
//! setting; events whose name has no version in force follow the tenant's `unplanned_events`.
//!
//! [`SchemaRegistry`] holds every tenant's plan in memory, compiled, and writes changes through
//! to `storage::schemas`. The ingest actor reads a tenant's plan as one immutable snapshot per
//! batch ([`TenantPlan`]); a change replaces the snapshot.

pub mod compat;

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{format_timestamp, now_micros, EventKind, IncomingEvent};
use crate::ids::TenantId;
use crate::storage::{schemas, Storage, StorageError};

pub use compat::{Change, Compatibility};

/// What happens to an event that does not match the version in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// Not checked.
    #[default]
    Off,
    /// Stored, flagged (`statsremote.schemaViolation` in the export) and counted.
    Warn,
    /// Dead-lettered, and listed in the reply's `errors`.
    Reject,
}

/// What happens to an event whose name has no schema in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unplanned {
    #[default]
    Accept,
    Warn,
    Reject,
}

/// One version of an event's schema, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaVersion {
    pub event: String,
    pub version: u32,
    pub schema: Value,
    pub compatibility: Compatibility,
    /// Overrides the tenant's `schema_enforcement` for this event while the version is in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<String>,
}

/// A version in force, compiled.
pub struct InForce {
    pub version: u32,
    pub enforcement: Option<Enforcement>,
    validator: jsonschema::Validator,
}

/// Every version of one event's schema, oldest first, and the one in force.
#[derive(Default)]
pub struct EventPlan {
    pub versions: Vec<SchemaVersion>,
    pub in_force: Option<Arc<InForce>>,
}

impl EventPlan {
    fn newest_live(&self) -> Option<&SchemaVersion> {
        self.versions.iter().rev().find(|v| v.retired_at.is_none())
    }
}

/// A tenant's plan: an immutable snapshot.
#[derive(Default)]
pub struct TenantPlan {
    pub events: HashMap<String, Arc<EventPlan>>,
    versions: usize,
}

impl TenantPlan {
    /// The version in force for the series `name`.
    pub fn in_force(&self, name: &str) -> Option<&InForce> {
        self.events.get(name)?.in_force.as_deref()
    }

    /// Whether any name has a version in force.
    pub fn is_empty(&self) -> bool {
        self.events.values().all(|e| e.in_force.is_none())
    }
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the new version is not {mode} compatible with version {current}: {} breaking change(s)", changes.len())]
    Incompatible {
        mode: &'static str,
        current: u32,
        changes: Vec<Change>,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Cluster mode: the shared plans could not be read or written.
    #[error("{0}")]
    Unavailable(String),
}

/// A change to one event's versions: the version added or retired, and all of them after it.
pub struct EventChange {
    pub changed: SchemaVersion,
    pub versions: Vec<SchemaVersion>,
}

/// The change retiring version `number` of `event`, whose versions are `current`.
pub fn prepare_retire(
    event: &str,
    current: &[SchemaVersion],
    number: u32,
) -> Result<EventChange, RegistryError> {
    let mut versions = current.to_vec();
    let target = versions
        .iter_mut()
        .find(|v| v.version == number)
        .ok_or_else(|| {
            RegistryError::NotFound(format!("event {event:?} has no schema version {number}"))
        })?;
    if target.retired_at.is_none() {
        target.retired_at = Some(format_timestamp(now_micros()));
    }
    Ok(EventChange {
        changed: target.clone(),
        versions,
    })
}

/// Bounds on what a tenant may register.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    pub max_schema_bytes: usize,
    pub max_versions_per_tenant: usize,
}

/// A registration request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub schema: Value,
    pub compatibility: Option<Compatibility>,
    pub enforcement: Option<Enforcement>,
}

/// Every tenant's plan, compiled, written through to storage.
pub struct SchemaRegistry {
    storage: Storage,
    limits: RegistryLimits,
    plans: DashMap<TenantId, Arc<TenantPlan>>,
    /// Serialises changes, so that a read-modify-write of a plan is not interleaved.
    write_lock: std::sync::Mutex<()>,
}

fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|error| format!("`schema` is not a valid JSON Schema (draft 2020-12): {error}"))
}

fn event_plan(versions: Vec<SchemaVersion>) -> Result<EventPlan, String> {
    let mut plan = EventPlan {
        versions,
        in_force: None,
    };
    if let Some(live) = plan.newest_live() {
        plan.in_force = Some(Arc::new(InForce {
            version: live.version,
            enforcement: live.enforcement,
            validator: compile(&live.schema)?,
        }));
    }
    Ok(plan)
}

impl SchemaRegistry {
    /// Loads every stored version. Blocking.
    pub fn load(storage: Storage, limits: RegistryLimits) -> Result<SchemaRegistry, StorageError> {
        let mut by_tenant: HashMap<TenantId, HashMap<String, Vec<SchemaVersion>>> = HashMap::new();
        for (tenant, record) in schemas::all(&storage)? {
            match serde_json::from_slice::<SchemaVersion>(&record) {
                Ok(version) => by_tenant
                    .entry(tenant)
                    .or_default()
                    .entry(version.event.clone())
                    .or_default()
                    .push(version),
                Err(error) => {
                    tracing::error!(%tenant, %error, "unreadable schema version skipped");
                }
            }
        }
        let registry = SchemaRegistry::empty(storage, limits);
        for (tenant, events) in by_tenant {
            let mut plan = TenantPlan::default();
            for (name, mut versions) in events {
                versions.sort_by_key(|v| v.version);
                plan.versions += versions.len();
                match event_plan(versions) {
                    Ok(event) => {
                        plan.events.insert(name, Arc::new(event));
                    }
                    Err(error) => {
                        tracing::error!(%tenant, event = %name, %error, "stored schema does not compile")
                    }
                }
            }
            registry.plans.insert(tenant, Arc::new(plan));
        }
        Ok(registry)
    }

    /// A registry with no plans; in cluster mode the shared plans fill it
    /// ([`SchemaRegistry::mirror`]).
    pub fn empty(storage: Storage, limits: RegistryLimits) -> SchemaRegistry {
        SchemaRegistry {
            storage,
            limits,
            plans: DashMap::new(),
            write_lock: std::sync::Mutex::new(()),
        }
    }

    /// An empty registry over `storage` with small limits, for tests of other modules.
    #[cfg(test)]
    pub(crate) fn for_tests(storage: Storage) -> Arc<SchemaRegistry> {
        let limits = RegistryLimits {
            max_schema_bytes: 1 << 16,
            max_versions_per_tenant: 10,
        };
        Arc::new(SchemaRegistry::load(storage, limits).unwrap_or_else(|e| panic!("{e}")))
    }

    /// The tenant's plan (empty when it has none).
    pub fn plan(&self, tenant: TenantId) -> Arc<TenantPlan> {
        self.plans
            .get(&tenant)
            .map(|p| Arc::clone(p.value()))
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a new version of `event`'s schema, if it is compatible with the version in
    /// force under the requested mode (default: the event's current mode, else `backward`).
    /// Blocking.
    pub fn register(
        &self,
        tenant: TenantId,
        event: &str,
        registration: Registration,
    ) -> Result<SchemaVersion, RegistryError> {
        let _guard = self.lock();
        let plan = self.plan(tenant);
        let current = plan.events.get(event).map_or(&[][..], |p| &p.versions[..]);
        let change = self.prepare_register(tenant, event, current, registration)?;
        self.write(tenant, &plan, event, change)
    }

    /// Retires one version: it stays listed, and the newest version not retired is in force
    /// (none: the event is unplanned). Blocking.
    pub fn retire(
        &self,
        tenant: TenantId,
        event: &str,
        number: u32,
    ) -> Result<SchemaVersion, RegistryError> {
        let _guard = self.lock();
        let plan = self.plan(tenant);
        let current = plan.events.get(event).map_or(&[][..], |p| &p.versions[..]);
        let change = prepare_retire(event, current, number)?;
        self.write(tenant, &plan, event, change)
    }

    /// The change registering `registration` makes to `event`, whose versions are `current`,
    /// if it is allowed (see [`SchemaRegistry::register`]). Changes nothing: cluster mode
    /// commits it to the shared plans, then [`SchemaRegistry::mirror`]s it.
    pub fn prepare_register(
        &self,
        tenant: TenantId,
        event: &str,
        current: &[SchemaVersion],
        registration: Registration,
    ) -> Result<EventChange, RegistryError> {
        if event.is_empty() || event.len() > 200 {
            return Err(RegistryError::Invalid(
                "the event name must be 1 to 200 bytes".into(),
            ));
        }
        let bytes = serde_json::to_vec(&registration.schema).map_or(usize::MAX, |b| b.len());
        if bytes > self.limits.max_schema_bytes {
            return Err(RegistryError::Invalid(format!(
                "`schema` is {bytes} bytes; the limit is {} (processing.max_schema_bytes)",
                self.limits.max_schema_bytes
            )));
        }
        if !matches!(registration.schema, Value::Object(_) | Value::Bool(_)) {
            return Err(RegistryError::Invalid(
                "`schema` must be a JSON Schema: an object or a boolean".into(),
            ));
        }
        compile(&registration.schema).map_err(RegistryError::Invalid)?;
        let plan = self.plan(tenant);
        let known_here = plan.events.get(event).map_or(0, |p| p.versions.len());
        let versions = plan.versions - known_here + current.len();
        if versions >= self.limits.max_versions_per_tenant {
            return Err(RegistryError::Invalid(format!(
                "the tenant has {versions} schema versions, the limit (processing.max_schema_versions)"
            )));
        }
        let live = current.iter().rev().find(|v| v.retired_at.is_none());
        let mode = registration
            .compatibility
            .or(live.map(|v| v.compatibility))
            .unwrap_or(Compatibility::Backward);
        if let Some(live) = live {
            let changes = compat::breaking_changes(&live.schema, &registration.schema, mode);
            if !changes.is_empty() {
                return Err(RegistryError::Incompatible {
                    mode: mode.as_str(),
                    current: live.version,
                    changes,
                });
            }
        }
        let version = SchemaVersion {
            event: event.to_string(),
            version: current.last().map_or(1, |v| v.version + 1),
            schema: registration.schema,
            compatibility: mode,
            enforcement: registration.enforcement,
            created_at: format_timestamp(now_micros()),
            retired_at: None,
        };
        let mut versions = current.to_vec();
        versions.push(version.clone());
        Ok(EventChange {
            changed: version,
            versions,
        })
    }

    /// Persists the change and publishes the plan with `event`'s versions replaced.
    fn write(
        &self,
        tenant: TenantId,
        plan: &TenantPlan,
        event: &str,
        change: EventChange,
    ) -> Result<SchemaVersion, RegistryError> {
        let EventChange { changed, versions } = change;
        let record = serde_json::to_vec(&changed)
            .map_err(|e| RegistryError::Invalid(format!("cannot encode the version: {e}")))?;
        let event_plan = event_plan(versions).map_err(RegistryError::Invalid)?;
        schemas::put(&self.storage, tenant, event, changed.version, &record)?;
        self.publish(tenant, plan, event, Some(event_plan));
        Ok(changed)
    }

    /// Replaces `tenant`'s plan with `event`'s versions changed (`None`: the event has none).
    fn publish(&self, tenant: TenantId, plan: &TenantPlan, event: &str, new: Option<EventPlan>) {
        let mut next = TenantPlan {
            events: plan.events.clone(),
            versions: plan.versions,
        };
        let before = match new {
            Some(new) => {
                let count = new.versions.len();
                let before = next.events.insert(event.to_string(), Arc::new(new));
                next.versions += count;
                before
            }
            None => next.events.remove(event),
        };
        next.versions -= before.map_or(0, |p| p.versions.len());
        self.plans.insert(tenant, Arc::new(next));
    }

    /// Cluster mode: takes `event`'s versions as the shared plans hold them (empty: the event
    /// has none), in memory only; the shared plans are the record.
    pub fn mirror(&self, tenant: TenantId, event: &str, versions: Vec<SchemaVersion>) {
        let _guard = self.lock();
        let plan = self.plan(tenant);
        if versions.is_empty() {
            self.publish(tenant, &plan, event, None);
            return;
        }
        match event_plan(versions) {
            Ok(new) => self.publish(tenant, &plan, event, Some(new)),
            Err(error) => {
                tracing::error!(%tenant, %event, %error, "shared schema does not compile; kept the previous one")
            }
        }
    }

    /// Forgets a deleted tenant's plan (its stored versions go with the tenant's data).
    pub fn forget(&self, tenant: TenantId) {
        self.plans.remove(&tenant);
    }
}

/// A mismatch between an event and the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// The series name the plan is keyed by.
    pub event: String,
    /// The version the event was checked against; `None`: the name has no schema in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<u32>,
    /// Each mismatch (at most `processing.max_violations_per_event`).
    pub errors: Vec<ViolationError>,
}

/// One mismatch: where in the payload, which keyword of the schema, and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationError {
    /// JSON path in the payload (`$` is `properties`, or `traits`).
    pub path: String,
    /// JSON pointer to the schema keyword that failed.
    pub schema_path: String,
    pub message: String,
}

impl Violation {
    /// One line for a reply's `errors`.
    pub fn summary(&self) -> String {
        let first = self.errors.first();
        match (self.schema_version, first) {
            (Some(version), Some(error)) => format!(
                "does not match schema version {version} of {:?}: {}: {}{}",
                self.event,
                error.path,
                error.message,
                match self.errors.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            ),
            _ => format!("event {:?} has no schema in the tracking plan", self.event),
        }
    }
}

/// What the plan says of one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    Warn(Violation),
    Reject(Violation),
}

/// The payload the plan describes: `traits` for identify and group calls, else `properties`.
fn payload(event: &IncomingEvent) -> Option<&str> {
    match event.kind {
        Some(EventKind::Identify | EventKind::Group) => event.traits.as_deref(),
        _ => event.properties.as_deref(),
    }
}

/// A JSON pointer (`/a/0/b`) as a JSON path (`$.a[0].b`).
fn json_path(pointer: &str) -> String {
    let mut path = String::from("$");
    for raw in pointer.split('/').skip(1) {
        let step = raw.replace("~1", "/").replace("~0", "~");
        if !step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{step}]"));
        } else if !step.is_empty()
            && step
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        {
            path.push('.');
            path.push_str(&step);
        } else {
            path.push_str(&format!("[{}]", Value::String(step)));
        }
    }
    path
}

/// Longest message kept per mismatch: the validator quotes the offending value, which may be
/// as long as the event, and a reply or a letter must stay a small multiple of the request.
const MAX_MESSAGE_CHARS: usize = 300;

fn clipped(message: String) -> String {
    if message.chars().count() <= MAX_MESSAGE_CHARS {
        return message;
    }
    let mut short: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
    short.push('…');
    short
}

/// Checks one event against the plan. `name` is its series name; `tenant_mode` the tenant's
/// `schema_enforcement`, `unplanned` its `unplanned_events`.
pub fn check(
    plan: &TenantPlan,
    name: &str,
    event: &IncomingEvent,
    tenant_mode: Enforcement,
    unplanned: Unplanned,
    max_errors: usize,
) -> Verdict {
    if matches!(event.kind, Some(EventKind::Alias)) {
        return Verdict::Pass;
    }
    let Some(in_force) = plan.in_force(name) else {
        let violation = || Violation {
            event: name.to_string(),
            schema_version: None,
            errors: Vec::new(),
        };
        return match unplanned {
            Unplanned::Accept => Verdict::Pass,
            Unplanned::Warn => Verdict::Warn(violation()),
            Unplanned::Reject => Verdict::Reject(violation()),
        };
    };
    let mode = in_force.enforcement.unwrap_or(tenant_mode);
    if mode == Enforcement::Off {
        return Verdict::Pass;
    }
    let parsed: Value = match payload(event) {
        None => Value::Object(Default::default()),
        Some(text) => match serde_json::from_str(text) {
            Ok(value) => value,
            // The parser has already checked the text; this is only defence.
            Err(error) => Value::String(error.to_string()),
        },
    };
    if in_force.validator.is_valid(&parsed) {
        return Verdict::Pass;
    }
    let errors = in_force
        .validator
        .iter_errors(&parsed)
        .take(max_errors.max(1))
        .map(|error| ViolationError {
            path: json_path(error.instance_path().as_str()),
            schema_path: error.schema_path().as_str().to_string(),
            message: clipped(error.to_string()),
        })
        .collect();
    let violation = Violation {
        event: name.to_string(),
        schema_version: Some(in_force.version),
        errors,
    };
    match mode {
        Enforcement::Warn => Verdict::Warn(violation),
        _ => Verdict::Reject(violation),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn registry() -> (tempfile::TempDir, SchemaRegistry) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let limits = RegistryLimits {
            max_schema_bytes: 64 << 10,
            max_versions_per_tenant: 5,
        };
        (dir, SchemaRegistry::load(storage, limits).unwrap())
    }

    fn registration(schema: Value) -> Registration {
        Registration {
            schema,
            compatibility: None,
            enforcement: None,
        }
    }

    fn track(properties: &str) -> IncomingEvent {
        IncomingEvent {
            kind: Some(EventKind::Track),
            name: Some("Order Completed".into()),
            properties: Some(properties.into()),
            ..Default::default()
        }
    }

    #[test]
    fn versions_number_up_refuse_breaking_changes_and_survive_a_restart() {
        let (_dir, registry) = registry();
        let tenant = TenantId(7);
        let v1 = json!({"type": "object", "properties": {"total": {"type": "number"}}});
        let first = registry
            .register(tenant, "Order Completed", registration(v1))
            .unwrap();
        assert_eq!(
            (first.version, first.compatibility),
            (1, Compatibility::Backward)
        );
        let narrower = json!({"type": "object", "properties": {"total": {"type": "integer"}}, "required": ["total"]});
        match registry.register(tenant, "Order Completed", registration(narrower.clone())) {
            Err(RegistryError::Incompatible {
                current, changes, ..
            }) => {
                assert_eq!(current, 1);
                let kinds: Vec<_> = changes
                    .iter()
                    .map(|c| (c.path.as_str(), c.change))
                    .collect();
                assert_eq!(
                    kinds,
                    vec![("$.total", "type_narrowed"), ("$.total", "required_added")]
                );
            }
            other => panic!("{other:?}"),
        }
        let mut anything = registration(narrower);
        anything.compatibility = Some(Compatibility::None);
        anything.enforcement = Some(Enforcement::Reject);
        assert_eq!(
            registry
                .register(tenant, "Order Completed", anything)
                .unwrap()
                .version,
            2
        );
        let plan = registry.plan(tenant);
        assert_eq!(plan.in_force("Order Completed").unwrap().version, 2);
        let verdict = check(
            &plan,
            "Order Completed",
            &track(r#"{"total": 1.5}"#),
            Enforcement::Off,
            Unplanned::Accept,
            10,
        );
        let Verdict::Reject(violation) = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(violation.schema_version, Some(2));
        assert_eq!(violation.errors[0].path, "$.total");
        assert_eq!(violation.errors[0].schema_path, "/properties/total/type");
        // Retiring version 2 puts version 1 back in force; a restart sees the same plan.
        registry.retire(tenant, "Order Completed", 2).unwrap();
        assert_eq!(
            registry
                .plan(tenant)
                .in_force("Order Completed")
                .unwrap()
                .version,
            1
        );
        let storage = registry.storage.clone();
        drop(registry);
        let again = SchemaRegistry::load(
            storage,
            RegistryLimits {
                max_schema_bytes: 1 << 16,
                max_versions_per_tenant: 5,
            },
        )
        .unwrap();
        let plan = again.plan(tenant);
        assert_eq!(plan.in_force("Order Completed").unwrap().version, 1);
        assert_eq!(plan.events["Order Completed"].versions.len(), 2);
        assert!(plan.events["Order Completed"].versions[1]
            .retired_at
            .is_some());
    }

    #[test]
    fn enforcement_follows_the_event_then_the_tenant_and_unplanned_names_their_own_setting() {
        let (_dir, registry) = registry();
        let tenant = TenantId(8);
        let schema = json!({"type": "object", "properties": {"plan": {"enum": ["free", "pro"]}}, "required": ["plan"]});
        registry
            .register(tenant, "Signed Up", registration(schema))
            .unwrap();
        let plan = registry.plan(tenant);
        let mut event = track(r#"{"plan": "gold"}"#);
        event.name = Some("Signed Up".into());
        assert_eq!(
            check(
                &plan,
                "Signed Up",
                &event,
                Enforcement::Off,
                Unplanned::Accept,
                10
            ),
            Verdict::Pass
        );
        assert!(matches!(
            check(
                &plan,
                "Signed Up",
                &event,
                Enforcement::Warn,
                Unplanned::Accept,
                10
            ),
            Verdict::Warn(_)
        ));
        assert!(matches!(
            check(
                &plan,
                "Signed Up",
                &event,
                Enforcement::Reject,
                Unplanned::Accept,
                10
            ),
            Verdict::Reject(_)
        ));
        let good = track(r#"{"plan": "pro"}"#);
        assert_eq!(
            check(
                &plan,
                "Signed Up",
                &good,
                Enforcement::Reject,
                Unplanned::Accept,
                10
            ),
            Verdict::Pass
        );
        // No properties at all: checked as an empty object (the required member is missing).
        let mut bare = good.clone();
        bare.properties = None;
        assert!(matches!(
            check(
                &plan,
                "Signed Up",
                &bare,
                Enforcement::Reject,
                Unplanned::Accept,
                10
            ),
            Verdict::Reject(_)
        ));
        for (setting, expected) in [
            (Unplanned::Accept, "pass"),
            (Unplanned::Warn, "warn"),
            (Unplanned::Reject, "reject"),
        ] {
            let verdict = check(&plan, "Other", &good, Enforcement::Reject, setting, 10);
            let got = match verdict {
                Verdict::Pass => "pass",
                Verdict::Warn(_) => "warn",
                Verdict::Reject(_) => "reject",
            };
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn invalid_schemas_and_limits_are_named() {
        let (_dir, registry) = registry();
        let bad = registry.register(TenantId(1), "e", registration(json!({"type": 12})));
        assert!(
            matches!(&bad, Err(RegistryError::Invalid(m)) if m.contains("not a valid JSON Schema")),
            "{bad:?}"
        );
        let remote = registry.register(
            TenantId(1),
            "e",
            registration(json!({"$ref": "https://example.com/s.json"})),
        );
        assert!(matches!(remote, Err(RegistryError::Invalid(_))));
        for n in 0..5 {
            registry
                .register(TenantId(1), &format!("e{n}"), registration(json!(true)))
                .unwrap();
        }
        let full = registry.register(TenantId(1), "e9", registration(json!(true)));
        assert!(
            matches!(&full, Err(RegistryError::Invalid(m)) if m.contains("max_schema_versions")),
            "{full:?}"
        );
    }

    #[test]
    fn pointers_become_json_paths() {
        assert_eq!(json_path(""), "$");
        assert_eq!(json_path("/items/0/sku"), "$.items[0].sku");
        assert_eq!(json_path("/a b/x~1y"), "$[\"a b\"][\"x/y\"]");
    }
}
