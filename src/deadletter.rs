//! Dead letters: events a tenant's tracking plan refused (`reject` enforcement, or an unplanned
//! name under `unplanned_events = "reject"`), kept with why, where from and when, so they can
//! be inspected and, once the plan or the sender is fixed, replayed.
//!
//! A letter holds the event as the parser read it (an [`IncomingEvent`]: its ids, its client
//! times and its objects as sent) and the request's batch-level objects, so a replay enters the
//! log exactly what a passing request would have: the same `messageId` (dedup holds, so a
//! letter replayed twice is counted once) and, enriched with the original receipt time, the
//! same corrected timestamp. Storage is `storage::deadletters`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::actors::Pipelines;
use crate::blocking;
use crate::cluster::node::ClusterNode;
use crate::event::{
    format_timestamp, now_micros, BatchShared, BatchSource, EventKind, IncomingEvent, Micros,
};
use crate::ids::TenantId;
use crate::json::MergeBase;
use crate::schema::{self, SchemaRegistry, Verdict, Violation};
use crate::storage::deadletters::{self, LetterKey};
use crate::storage::{Storage, StorageError};
use crate::telemetry;
use crate::tenant::TenantRecord;

/// Why a letter is here, as counted in `/metrics` and filtered by `reason=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonKind {
    /// The payload does not match the schema in force.
    SchemaMismatch,
    /// The name has no schema in force and the tenant rejects unplanned events.
    Unplanned,
}

impl ReasonKind {
    pub fn of(violation: &Violation) -> ReasonKind {
        match violation.schema_version {
            Some(_) => ReasonKind::SchemaMismatch,
            None => ReasonKind::Unplanned,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonKind::SchemaMismatch => "schema_mismatch",
            ReasonKind::Unplanned => "unplanned",
        }
    }

    pub fn parse(text: &str) -> Option<ReasonKind> {
        match text {
            "schema_mismatch" => Some(ReasonKind::SchemaMismatch),
            "unplanned" => Some(ReasonKind::Unplanned),
            _ => None,
        }
    }
}

/// One dead letter, as stored (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub received_at: Micros,
    /// The request's batch id (UUID), as the log would have recorded it.
    pub batch_id: String,
    /// Position of the event among the request's events.
    pub position: u32,
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// The series name the plan is keyed by.
    pub event_name: String,
    pub event: IncomingEvent,
    /// The request's batch-level objects: stored once per request in its batch record (see
    /// `storage::deadletters::batch_key`), filled in by [`read_page`].
    #[serde(skip)]
    pub shared: BatchShared,
    pub reason: Violation,
    /// When the reason was last decided (receipt, or the last replay that left it here).
    pub checked_at: Micros,
    /// Replays that found it still refused.
    #[serde(default)]
    pub replays: u32,
}

impl DeadLetter {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<DeadLetter> {
        serde_json::from_slice(bytes).ok()
    }

    pub fn reason_kind(&self) -> ReasonKind {
        ReasonKind::of(&self.reason)
    }

    /// The event as a Segment call: what the client sent, with the batch-level `context` and
    /// `integrations` merged under the event's own.
    pub fn body(&self) -> Value {
        let e = &self.event;
        let mut body = serde_json::Map::new();
        let kind = e.kind.unwrap_or(EventKind::Track);
        body.insert("type".into(), kind.as_str().into());
        let mut text = |key: &str, value: &Option<String>| {
            if let Some(value) = value {
                body.insert(key.into(), Value::String(value.clone()));
            }
        };
        text("messageId", &e.message_id);
        match kind {
            EventKind::Track => text("event", &e.name),
            _ => text("name", &e.name),
        }
        text("userId", &e.user_id);
        text("anonymousId", &e.anonymous_id);
        text("groupId", &e.group_id);
        text("previousId", &e.previous_id);
        for (key, at) in [("timestamp", e.timestamp), ("sentAt", e.sent_at)] {
            if let Some(at) = at {
                body.insert(key.into(), Value::String(format_timestamp(at)));
            }
        }
        let merged = |shared: &Option<String>, own: &Option<String>| match shared
            .as_deref()
            .and_then(|text| MergeBase::parse(text).ok())
        {
            Some(base) => Some(base.merge(own.as_deref())),
            None => own.clone(),
        };
        for (key, value) in [
            ("properties", e.properties.clone()),
            ("traits", e.traits.clone()),
            ("context", merged(&self.shared.context, &e.context)),
            (
                "integrations",
                merged(&self.shared.integrations, &e.integrations),
            ),
        ] {
            if let Some(parsed) = value.and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
                body.insert(key.into(), parsed);
            }
        }
        for (key, value) in &e.extra {
            if let Ok(parsed) = serde_json::from_str::<Value>(value) {
                body.entry(key.clone()).or_insert(parsed);
            }
        }
        Value::Object(body)
    }

    /// The letter as the API shows it; `id` is its key (hex), which replays and pages use.
    pub fn view(&self, id: &str) -> Value {
        let mut reason = BTreeMap::new();
        reason.insert("kind", Value::from(self.reason_kind().as_str()));
        if let Some(version) = self.reason.schema_version {
            reason.insert("schema_version", Value::from(version));
        }
        reason.insert("summary", Value::from(self.reason.summary()));
        reason.insert(
            "errors",
            serde_json::to_value(&self.reason.errors).unwrap_or_default(),
        );
        serde_json::json!({
            "id": id,
            "event": self.event_name,
            "message_id": self.event.message_id,
            "reason": reason,
            "received_at": format_timestamp(self.received_at),
            "checked_at": format_timestamp(self.checked_at),
            "replays": self.replays,
            "source": {"endpoint": self.endpoint, "client_ip": self.client_ip},
            "batch_id": self.batch_id,
            "body": self.body(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::schema::ViolationError;

    #[test]
    fn a_letter_round_trips_and_shows_the_event_as_sent() {
        let letter = DeadLetter {
            received_at: 1_700_000_000_123_456,
            batch_id: "0190c0de-0000-7000-8000-000000000000".into(),
            position: 3,
            endpoint: "/v1/batch".into(),
            client_ip: Some("10.0.0.0".into()),
            event_name: "Order Completed".into(),
            event: IncomingEvent {
                kind: Some(EventKind::Track),
                message_id: Some("m-1".into()),
                name: Some("Order Completed".into()),
                user_id: Some("u1".into()),
                timestamp: Some(1_699_999_999_000_000),
                properties: Some(r#"{"total":"12"}"#.into()),
                context: Some(r#"{"app":{"name":"shop"}}"#.into()),
                extra: vec![("version".into(), "2".into())],
                ..Default::default()
            },
            shared: BatchShared {
                context: Some(r#"{"library":{"name":"x"},"app":{"name":"base"}}"#.into()),
                integrations: None,
            },
            reason: Violation {
                event: "Order Completed".into(),
                schema_version: Some(2),
                errors: vec![ViolationError {
                    path: "$.total".into(),
                    schema_path: "/properties/total/type".into(),
                    message: "\"12\" is not of type \"number\"".into(),
                }],
            },
            checked_at: 1_700_000_000_123_456,
            replays: 0,
        };
        // The batch-level objects are not part of the letter (its batch record holds them).
        let mut again = DeadLetter::decode(&letter.encode()).unwrap();
        assert_eq!(again.shared, BatchShared::default());
        again.shared = letter.shared.clone();
        assert_eq!(again, letter);
        let body = letter.body();
        assert_eq!(body["type"], "track");
        assert_eq!(body["event"], "Order Completed");
        assert_eq!(body["properties"]["total"], "12");
        // The event's own context wins; the batch's other members are merged in.
        assert_eq!(body["context"]["app"]["name"], "shop");
        assert_eq!(body["context"]["library"]["name"], "x");
        assert_eq!(body["version"], 2);
        let view = letter.view("ab");
        assert_eq!(view["reason"]["kind"], "schema_mismatch");
        assert_eq!(view["reason"]["errors"][0]["path"], "$.total");
    }
}

/// Which letters a replay takes.
#[derive(Debug, Clone)]
pub struct ReplayFilter {
    pub from: Micros,
    pub to: Micros,
    pub event: Option<String>,
    pub reason: Option<ReasonKind>,
    /// Continue below this letter (the `next` of a previous replay).
    pub before: Option<LetterKey>,
    /// Most letters taken by one replay.
    pub limit: usize,
}

impl ReplayFilter {
    /// The page of letters the filter's range and cursor select, examining at most `budget`.
    pub fn page(&self, budget: usize) -> deadletters::PageRequest<'_> {
        deadletters::PageRequest {
            from: self.from,
            to: self.to,
            before: self.before.as_ref(),
            limit: self.limit,
            budget,
        }
    }

    /// Whether a stored letter (its value) matches the filter's event and reason.
    pub fn matches(&self, value: &[u8]) -> bool {
        let Some(letter) = DeadLetter::decode(value) else {
            return false;
        };
        self.event.as_deref().is_none_or(|e| e == letter.event_name)
            && self.reason.is_none_or(|r| r == letter.reason_kind())
    }
}

/// Letters read back: each with its key, newest first, and where the next page starts.
pub struct LetterPage {
    pub letters: Vec<(LetterKey, DeadLetter)>,
    pub next: Option<LetterKey>,
}

/// Where a tenant's letters are: the node's store, or in cluster mode the shared one
/// (`crate::cluster::deadletters`).
#[derive(Clone)]
pub enum LetterStore {
    Local(Storage),
    Shared(Arc<ClusterNode>),
}

impl LetterStore {
    /// The store of a node: shared on a cluster's nodes.
    pub fn of(storage: &Storage, cluster: Option<&Arc<ClusterNode>>) -> LetterStore {
        match cluster {
            Some(node) => LetterStore::Shared(Arc::clone(node)),
            None => LetterStore::Local(storage.clone()),
        }
    }

    /// Deletes the tenant's letters past its limits in the shared store (they expire without
    /// new letters coming); on a node's own store its flusher does.
    pub async fn expire(&self, tenant: &TenantRecord) -> Result<(), ReplayError> {
        let LetterStore::Shared(node) = self else {
            return Ok(());
        };
        let (engines, id) = (Arc::clone(node), tenant.id);
        let limits = crate::cluster::deadletters::Limits::of(&tenant.settings);
        let trim = async move { engines.dead_letters.trim(id, limits).await };
        let removed = (node.on_engines(trim).await).map_err(ReplayError::Task)??;
        if removed > 0 {
            telemetry::dead_letters_expired(&id.to_string(), removed);
        }
        Ok(())
    }

    /// A page of the letters `filter` selects, decoded, each with its request's batch-level
    /// objects, examining at most `budget` letters.
    pub async fn page(
        &self,
        tenant: TenantId,
        filter: &ReplayFilter,
        budget: usize,
    ) -> Result<LetterPage, ReplayError> {
        match self {
            LetterStore::Local(storage) => {
                let (storage, filter) = (storage.clone(), filter.clone());
                blocking::run(move || read_page(&storage, tenant, &filter, budget))
                    .await
                    .map_err(|e| ReplayError::Task(e.to_string()))?
                    .map_err(ReplayError::from)
            }
            LetterStore::Shared(node) => {
                let (engines, filter) = (Arc::clone(node), filter.clone());
                let page = async move {
                    let letters = &engines.dead_letters;
                    let range = (filter.from, filter.to);
                    let raw = letters
                        .page(
                            tenant,
                            range,
                            filter.before.as_ref(),
                            (filter.limit, budget),
                            |v| filter.matches(v),
                        )
                        .await?;
                    let mut batches: Vec<LetterKey> = raw
                        .letters
                        .iter()
                        .map(|(key, _)| deadletters::batch_key(key))
                        .collect();
                    batches.sort_unstable();
                    batches.dedup();
                    let records = letters.get(tenant, &batches).await?;
                    let records: HashMap<LetterKey, Vec<u8>> = (batches.into_iter())
                        .zip(records)
                        .filter_map(|(key, value)| Some((key, value?)))
                        .collect();
                    Ok::<_, StorageError>(decode_page(raw.letters, raw.next, |key| {
                        records.get(key).cloned()
                    }))
                };
                (node.on_engines(page).await)
                    .map_err(ReplayError::Task)?
                    .map_err(ReplayError::from)
            }
        }
    }

    /// Replaces the values of letters still there and removes others, durably.
    pub async fn update(
        &self,
        tenant: TenantId,
        replaced: Vec<(LetterKey, Vec<u8>)>,
        removed: Vec<LetterKey>,
    ) -> Result<(), ReplayError> {
        match self {
            LetterStore::Local(storage) => {
                let storage = storage.clone();
                blocking::run(move || deadletters::update(&storage, tenant, &replaced, &removed))
                    .await
                    .map_err(|e| ReplayError::Task(e.to_string()))?
                    .map_err(ReplayError::from)
            }
            LetterStore::Shared(node) => {
                let engines = Arc::clone(node);
                let update = async move {
                    (engines.dead_letters)
                        .update(tenant, &replaced, &removed)
                        .await
                };
                (node.on_engines(update).await)
                    .map_err(ReplayError::Task)?
                    .map_err(ReplayError::from)
            }
        }
    }
}

/// A page of the letters `filter` selects, decoded, each with its request's batch-level
/// objects, examining at most `budget` letters. Blocking.
pub fn read_page(
    storage: &Storage,
    tenant: TenantId,
    filter: &ReplayFilter,
    budget: usize,
) -> Result<LetterPage, StorageError> {
    let page = deadletters::page(storage, tenant, filter.page(budget), |value| {
        filter.matches(value)
    })?;
    let mut failure = None;
    let letters = page
        .letters
        .into_iter()
        .map(|(key, value)| (key, value.to_vec()));
    let decoded = decode_page(
        letters.collect(),
        page.next,
        |batch| match deadletters::get(storage, batch) {
            Ok(value) => value.map(|v| v.to_vec()),
            Err(error) => {
                failure = Some(error);
                None
            }
        },
    );
    match failure {
        Some(error) => Err(error),
        None => Ok(decoded),
    }
}

/// Letters decoded, each with its request's batch-level objects (`batch_record` gives the
/// stored record of a batch key; each is asked for once).
fn decode_page(
    letters: Vec<(LetterKey, Vec<u8>)>,
    next: Option<LetterKey>,
    mut batch_record: impl FnMut(&LetterKey) -> Option<Vec<u8>>,
) -> LetterPage {
    let mut shared: HashMap<LetterKey, BatchShared> = HashMap::new();
    let mut decoded = Vec::with_capacity(letters.len());
    for (key, value) in letters {
        let Some(mut letter) = DeadLetter::decode(&value) else {
            continue;
        };
        let batch = deadletters::batch_key(&key);
        letter.shared = shared
            .entry(batch)
            .or_insert_with(|| {
                batch_record(&batch)
                    .and_then(|value| serde_json::from_slice::<BatchShared>(&value).ok())
                    .unwrap_or_default()
            })
            .clone();
        decoded.push((key, letter));
    }
    LetterPage {
        letters: decoded,
        next,
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// Letters the filter matched and the replay took.
    pub matched: usize,
    /// Letters that passed and are now events in the log.
    pub logged: usize,
    /// Letters that passed but were already in the log (same messageId): removed.
    pub duplicates: usize,
    /// Letters still refused by the plan: kept, with their new reason.
    pub still_refused: usize,
    /// Letters that passed but whose events the tenant's sampling now drops: removed.
    #[serde(skip_serializing_if = "is_zero")]
    pub sampled_out: usize,
    /// Where to continue (pass it as `before`), when more letters may match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The tenant's pipeline refused or lost a batch; what the report says was done is done.
    #[error("{reason} (after {report:?})")]
    Busy {
        reason: String,
        report: ReplayReport,
    },
    #[error("the replay's storage task failed: {0}")]
    Task(String),
}

/// What a replay needs of the server.
pub struct ReplayDeps<'a> {
    pub letters: &'a LetterStore,
    pub schemas: &'a SchemaRegistry,
    pub pipelines: &'a Pipelines,
    pub max_errors: usize,
    pub max_batch_events: usize,
}

/// Re-checks the letters the filter matches against the tenant's current plan. Those that pass
/// go through the tenant's pipeline as their request would have (their original receipt time,
/// batch-level objects and source; dedup holds, so a letter already logged is a duplicate);
/// once durable, their letters are removed. The others stay, with their new reason.
pub async fn replay(
    deps: ReplayDeps<'_>,
    tenant: &TenantRecord,
    filter: ReplayFilter,
) -> Result<ReplayReport, ReplayError> {
    let id = tenant.id;
    let budget = filter.limit.saturating_mul(10);
    deps.letters.expire(tenant).await?;
    let LetterPage { letters, next } = deps.letters.page(id, &filter, budget).await?;
    let mut report = ReplayReport {
        matched: letters.len(),
        next: next.map(hex),
        ..ReplayReport::default()
    };
    let plan = deps.schemas.plan(id);
    let now = now_micros();
    let mut refused: Vec<(LetterKey, Vec<u8>)> = Vec::new();
    // Letters that pass, grouped by the request they came in with, oldest request first.
    let mut passing: Vec<(LetterKey, DeadLetter)> = Vec::new();
    for (key, mut letter) in letters.into_iter().rev() {
        let verdict = schema::check(
            &plan,
            &letter.event_name,
            &letter.event,
            tenant.settings.schema_enforcement,
            tenant.settings.unplanned_events,
            deps.max_errors,
        );
        match verdict {
            Verdict::Reject(violation) => {
                letter.reason = violation;
                letter.checked_at = now;
                letter.replays += 1;
                refused.push((key, letter.encode()));
            }
            Verdict::Pass | Verdict::Warn(_) => passing.push((key, letter)),
        }
    }
    report.still_refused = refused.len();
    let tenant_label = id.to_string();
    let mut done: Vec<LetterKey> = Vec::new();
    let mut failure = None;
    let mut start = 0;
    while start < passing.len() {
        // One batch: letters of one request, at most `max_batch_events`.
        let first = &passing[start].1;
        let mut end = start + 1;
        while end < passing.len()
            && end - start < deps.max_batch_events.max(1)
            && passing[end].1.batch_id == first.batch_id
        {
            end += 1;
        }
        let events: Vec<IncomingEvent> = passing[start..end]
            .iter()
            .map(|(_, l)| l.event.clone())
            .collect();
        let source = BatchSource {
            endpoint: first.endpoint.clone(),
            client_ip: first.client_ip.clone(),
        };
        // Only the anonymised address was kept: GeoIP places it at its network's location.
        let peer = first.client_ip.as_deref().and_then(|ip| ip.parse().ok());
        let Some(admission) = deps.pipelines.pipeline(id).admit() else {
            failure = Some("the tenant's ingestion pipeline is full".to_string());
            break;
        };
        match admission
            .ingest(
                events,
                first.shared.clone(),
                source,
                peer,
                first.received_at,
            )
            .await
        {
            Ok(outcome) => {
                report.logged += outcome.accepted;
                report.duplicates += outcome.duplicates;
                report.sampled_out += outcome.sampled_out.len();
                // Refused again by a plan changed meanwhile: a new letter holds it now.
                report.still_refused += outcome.dead_lettered.len();
                done.extend(passing[start..end].iter().map(|(key, _)| *key));
            }
            Err(error) => {
                failure = Some(format!("{error:?}"));
                break;
            }
        }
        start = end;
    }
    telemetry::dead_letters_replayed(&tenant_label, "logged", report.logged as u64);
    telemetry::dead_letters_replayed(&tenant_label, "duplicate", report.duplicates as u64);
    telemetry::dead_letters_replayed(&tenant_label, "still_refused", report.still_refused as u64);
    deps.letters.update(id, refused, done).await?;
    match failure {
        None => Ok(report),
        Some(reason) => Err(ReplayError::Busy { reason, report }),
    }
}

/// Erases a user's letters: those whose `userId`, `anonymousId` or `previousId` is `user`.
/// Returns how many. Blocking.
pub fn erase_user(storage: &Storage, tenant: TenantId, user: &str) -> Result<u64, StorageError> {
    deadletters::remove_matching(storage, tenant, |value| names_user(value, user))
}

/// Whether a stored letter's event names `user` as its `userId`, `anonymousId` or
/// `previousId` (what an erasure removes).
pub fn names_user(value: &[u8], user: &str) -> bool {
    DeadLetter::decode(value).is_some_and(|letter| {
        let e = &letter.event;
        [&e.user_id, &e.anonymous_id, &e.previous_id]
            .iter()
            .any(|id| id.as_deref() == Some(user))
    })
}

/// A letter's key as the API shows it.
pub fn hex(key: LetterKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key from [`hex`], if it is one.
pub fn parse_hex(text: &str) -> Option<LetterKey> {
    if text.len() != 72 || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; 36];
    for (at, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(at * 2..at * 2 + 2)?, 16).ok()?;
    }
    Some(key)
}
