//! `GET /v1/events/export`: a tenant's stored, enriched events as NDJSON, in sequence order.
//!
//! The log is read in chunks on a blocking thread and streamed through a small bounded channel,
//! so memory stays flat whatever the size of the export, and a client that stops reading stops
//! the scan. Filters: `from`/`to` (RFC 3339, on the corrected event timestamp, `to` exclusive)
//! and `event` (the event name).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::{flags, format_timestamp, parse_timestamp, LogBatch, Micros, StoredEvent};
use crate::http::errors::ApiError;
use crate::http::slots::ReadKind;
use crate::http::{auth, AppState};
use crate::identity::{IdentityMap, Resolver};
use crate::json::MergeBase;
use crate::storage::cold::{scan_published, scan_tiers_from, ColdError};
use crate::storage::event_log::first_seq_received_since;
use crate::storage::Storage;
use crate::tenant::{KeyKind, KeyWatch, TenantDirectory, TenantId};

/// Longest the status waits for the first chunk (see [`export`]).
const FIRST_CHUNK_WAIT: Duration = Duration::from_secs(1);

/// NDJSON bytes gathered before a chunk is sent to the client.
const CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    from: Option<String>,
    to: Option<String>,
    event: Option<String>,
}

/// Parses an optional RFC 3339 query parameter, naming it on error.
pub fn time_param(name: &str, value: Option<&str>) -> Result<Option<Micros>, ApiError> {
    match value {
        None => Ok(None),
        Some(text) => parse_timestamp(text).map(Some).ok_or_else(|| {
            ApiError::bad_request(format!(
                "query parameter `{name}` is not an RFC 3339 date-time: {text:?}"
            ))
        }),
    }
}

/// Whether this node reads stored events only through the cold tier's published manifests: a
/// cluster's ingest node has no log, and reads what the process nodes flushed to the store
/// they share (501 without one).
pub fn reads_published_only(state: &AppState) -> Result<bool, ApiError> {
    if state.cluster.is_none() {
        return Ok(false);
    }
    if state.config.cold.store == crate::config::ColdStoreKind::Local {
        return Err(ApiError::NotImplemented(
            "in cluster mode, stored events are read from the cold tier the nodes share: set cold.store = \"s3\""
                .into(),
        ));
    }
    Ok(true)
}

pub async fn export(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<ExportQuery>,
) -> Result<HttpResponse, ApiError> {
    let key = auth::header_credential(&req)?;
    let tenant = auth::tenant_for_key(&state.directory, key.as_deref(), KeyKind::Read)?;
    let query = query.into_inner();
    let from = time_param("from", query.from.as_deref())?.unwrap_or(i64::MIN);
    let to = time_param("to", query.to.as_deref())?.unwrap_or(i64::MAX);
    if from >= to {
        return Err(ApiError::bad_request(
            "query parameter `from` must be before `to`",
        ));
    }
    let filter = Filter {
        from,
        to,
        event: query.event,
    };
    let published_only = reads_published_only(&state)?;
    let slot = state.read_slots.take(tenant.id, ReadKind::Export)?;
    let shared_identity = match &state.cluster {
        Some(node) => Some(
            (node.identity(tenant.id, tenant.user_hash_key).await)
                .map_err(ApiError::unavailable)?,
        ),
        None => None,
    };
    let reader = ExportReader {
        published_only,
        shared_identity,
        storage: state.storage.clone(),
        cold: state.cold.clone(),
        tenant: tenant.id,
        future_tolerance: state.config.limits.future_tolerance,
        stall_timeout: state.config.reads.export_stall_timeout,
        directory: Arc::clone(&state.directory),
        key_watch: state
            .directory
            .watch_key(key.as_deref().unwrap_or_default()),
        finished: Arc::new(AtomicBool::new(false)),
    };
    let finished = Arc::clone(&reader.finished);
    let reader_finished = Arc::clone(&reader.finished);
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    crate::blocking::detach(move || {
        reader.run(&filter, &sender);
        drop(slot);
    });
    // The status waits for the first chunk, for at most a second: a failure before any event
    // was read (the cold store unreachable, say) is answered as an error, not as an empty or
    // shorter export. A scan that finds nothing for longer streams as before.
    let mut receiver = receiver;
    let first = match tokio::time::timeout(FIRST_CHUNK_WAIT, receiver.recv()).await {
        Ok(Some(Ok(chunk))) => Some(chunk),
        Ok(Some(Err(error))) => {
            return Err(ApiError::unavailable(format!(
                "reading the stored events failed: {error}"
            )))
        }
        Ok(None) if reader_finished.load(Ordering::Acquire) => None,
        Ok(None) => return Err(ApiError::unavailable("the export stopped before it began")),
        Err(_waited) => None,
    };
    let directory = Arc::clone(&state.directory);
    let key_watch = state
        .directory
        .watch_key(key.as_deref().unwrap_or_default());
    let first = futures_util::stream::iter(first.map(Ok::<Bytes, std::io::Error>));
    let rest = futures_util::stream::unfold(Some((receiver, key_watch)), move |state| {
        let directory = Arc::clone(&directory);
        let finished = Arc::clone(&finished);
        async move {
            let (mut receiver, mut key_watch) = state?;
            tokio::select! {
                biased;
                () = key_watch.revoked(&directory) => Some((Err(export_cut_off()), None)),
                item = receiver.recv() => match item {
                    Some(item) => Some((item, Some((receiver, key_watch)))),
                    None if finished.load(Ordering::Acquire) => None,
                    // The reader stopped before the end (a stalled client, a revoked key, a
                    // failure): the connection is aborted, so the export cannot pass for
                    // complete.
                    None => Some((Err(export_cut_off()), None)),
                },
            }
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .streaming(futures_util::StreamExt::chain(first, rest)))
}

fn export_cut_off() -> std::io::Error {
    std::io::Error::other("export cut off: the key was revoked or the client stopped reading")
}

/// Reads the log for one export on a blocking thread and hands the NDJSON to the response in
/// chunks. It stops when the client has taken nothing for `stall_timeout`, or as soon as the
/// key is revoked; it sets `finished` only once it has read to the end and handed over the
/// last chunk.
struct ExportReader {
    /// Read only the cold tier's published manifest and segments (a cluster's ingest node).
    published_only: bool,
    /// The identity links the cluster's owners stored (`None`: the node's own).
    shared_identity: Option<Arc<IdentityMap>>,
    storage: Storage,
    cold: crate::storage::cold::ColdStore,
    tenant: TenantId,
    future_tolerance: Duration,
    stall_timeout: Duration,
    directory: Arc<TenantDirectory>,
    key_watch: KeyWatch,
    finished: Arc<AtomicBool>,
}

/// How often a reader waiting on a full channel looks again.
const STALL_POLL: Duration = Duration::from_millis(20);

impl ExportReader {
    fn run(&self, filter: &Filter, sender: &Sender<Result<Bytes, std::io::Error>>) {
        let identity = match self.identity() {
            Ok(identity) => identity,
            Err(error) => {
                tracing::error!(tenant = %self.tenant, %error, "export failed reading identity links");
                let _ = self.send(sender, Err(std::io::Error::other(error.to_string())));
                return;
            }
        };
        let mut chunk = Vec::with_capacity(CHUNK_BYTES);
        let mut stopped = false;
        let visit = |first_seq: u64, batch: &LogBatch| {
            if !self.key_watch.in_force(&self.directory) {
                stopped = true;
                return ControlFlow::Break(());
            }
            // Locked per entry, not for the export: the rollup actor adds links.
            write_batch(&mut chunk, first_seq, batch, filter, &identity.resolver());
            if chunk.len() < CHUNK_BYTES {
                return ControlFlow::Continue(());
            }
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_BYTES));
            if self.send(sender, Ok(Bytes::from(full))) {
                ControlFlow::Continue(())
            } else {
                stopped = true;
                ControlFlow::Break(())
            }
        };
        let hours = Some((filter.from, filter.to));
        let scanned = if self.published_only {
            scan_published(&self.cold, self.tenant, hours, visit).map(|_| ())
        } else {
            // The hot log from the first entry that can hold an event of the range; the cold
            // tier pruned by the segments' hours.
            first_seq_received_since(
                self.storage.log(),
                self.tenant,
                filter.from,
                self.future_tolerance,
            )
            .map_err(ColdError::from)
            .and_then(|hot_from| {
                let (storage, cold) = (&self.storage, Some(&self.cold));
                scan_tiers_from(storage, cold, self.tenant, 1, hot_from, hours, visit)
            })
        };
        match scanned {
            Err(error) => {
                tracing::error!(tenant = %self.tenant, %error, "export failed while reading the log");
                let _ = self.send(sender, Err(std::io::Error::other(error.to_string())));
            }
            Ok(()) if !stopped => {
                if chunk.is_empty() || self.send(sender, Ok(Bytes::from(chunk))) {
                    self.finished.store(true, Ordering::Release);
                }
            }
            Ok(()) => {}
        }
    }

    /// The tenant's stored identity links (none once the tenant is gone).
    fn identity(&self) -> Result<Arc<IdentityMap>, crate::storage::StorageError> {
        if let Some(shared) = &self.shared_identity {
            return Ok(Arc::clone(shared));
        }
        match self.directory.get(self.tenant) {
            Some(record) => {
                crate::storage::identity::map(&self.storage, self.tenant, &record.user_hash_key)
            }
            None => Ok(Arc::default()),
        }
    }

    /// Sends one item, waiting at most `stall_timeout` for room; false when the export must
    /// stop (client gone, stalled, or key revoked).
    fn send(
        &self,
        sender: &Sender<Result<Bytes, std::io::Error>>,
        item: Result<Bytes, std::io::Error>,
    ) -> bool {
        let deadline = Instant::now() + self.stall_timeout;
        let mut item = item;
        loop {
            match sender.try_send(item) {
                Ok(()) => return true,
                Err(TrySendError::Closed(_)) => return false,
                Err(TrySendError::Full(back)) => item = back,
            }
            if Instant::now() >= deadline || !self.key_watch.in_force(&self.directory) {
                tracing::info!(tenant = %self.tenant, "export cut off: client stalled or key revoked");
                return false;
            }
            std::thread::sleep(STALL_POLL);
        }
    }
}

struct Filter {
    from: Micros,
    to: Micros,
    event: Option<String>,
}

impl Filter {
    fn matches(&self, event: &StoredEvent) -> bool {
        event.timestamp >= self.from
            && event.timestamp < self.to
            && self
                .event
                .as_deref()
                .is_none_or(|wanted| event.name.as_deref() == Some(wanted))
    }
}

fn write_batch(
    out: &mut Vec<u8>,
    first_seq: u64,
    batch: &LogBatch,
    filter: &Filter,
    identity: &Resolver<'_>,
) {
    // The batch-level objects are read once; each event's own are merged over them.
    let context_base = merge_base(&batch.shared.context);
    let integrations_base = merge_base(&batch.shared.integrations);
    for (offset, event) in batch.events.iter().enumerate() {
        if !filter.matches(event) {
            continue;
        }
        let merged = |base: &Option<MergeBase<'_>>, own: &Option<String>| {
            base.as_ref().map(|base| base.merge(own.as_deref()))
        };
        let line = ExportLine {
            seq: first_seq + offset as u64,
            offset,
            batch,
            event,
            person: identity.person(event.user_hash),
            context: merged(&context_base, &event.context),
            integrations: merged(&integrations_base, &event.integrations),
        };
        if serde_json::to_writer(&mut *out, &line).is_ok() {
            out.push(b'\n');
        }
    }
}

fn merge_base(text: &Option<String>) -> Option<MergeBase<'_>> {
    text.as_deref().and_then(|text| MergeBase::parse(text).ok())
}

/// One exported event: Segment's field names, plus what StatsRemote added under `statsremote`.
struct ExportLine<'a> {
    seq: u64,
    /// The event's position in its batch.
    offset: usize,
    batch: &'a LogBatch,
    event: &'a StoredEvent,
    /// The person the event's id belongs to (hash, name), when it is not the id itself.
    person: Option<(u64, &'a str)>,
    /// The event's context and integrations merged over its batch's, where the batch had any.
    context: Option<String>,
    integrations: Option<String>,
}

fn raw(text: &str) -> Option<&RawValue> {
    serde_json::from_str(text).ok()
}

impl Serialize for ExportLine<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.event;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", e.kind.as_str())?;
        map.serialize_entry("messageId", &e.message_id)?;
        if let Some(name) = &e.name {
            let key = if e.kind == crate::event::EventKind::Track {
                "event"
            } else {
                "name"
            };
            map.serialize_entry(key, name)?;
        }
        for (key, value) in [
            ("userId", &e.user_id),
            ("anonymousId", &e.anonymous_id),
            ("groupId", &e.group_id),
            ("previousId", &e.previous_id),
        ] {
            if let Some(value) = value {
                map.serialize_entry(key, value)?;
            }
        }
        map.serialize_entry("timestamp", &format_timestamp(e.timestamp))?;
        if let Some(at) = e.original_timestamp {
            map.serialize_entry("originalTimestamp", &format_timestamp(at))?;
        }
        if let Some(at) = e.sent_at {
            map.serialize_entry("sentAt", &format_timestamp(at))?;
        }
        map.serialize_entry("receivedAt", &format_timestamp(e.received_at))?;
        for (key, value) in [
            ("properties", e.properties.as_ref()),
            ("traits", e.traits.as_ref()),
            ("context", self.context.as_ref().or(e.context.as_ref())),
            (
                "integrations",
                self.integrations.as_ref().or(e.integrations.as_ref()),
            ),
        ] {
            if let Some(json) = value.map(String::as_str).and_then(raw) {
                map.serialize_entry(key, json)?;
            }
        }
        for (key, value) in &e.extra {
            if let Some(json) = raw(value) {
                map.serialize_entry(key, json)?;
            }
        }
        map.serialize_entry(
            "statsremote",
            &Enrichment {
                seq: self.seq,
                batch_id: uuid::Uuid::from_u128(self.batch.batch_id).to_string(),
                user_hash: format!("{:016x}", e.user_hash),
                person: (self.person.map(|(_, name)| name))
                    .or(e.user_id.as_deref())
                    .or(e.anonymous_id.as_deref()),
                person_hash: format!("{:016x}", self.person.map_or(e.user_hash, |(hash, _)| hash)),
                endpoint: &self.batch.source.endpoint,
                client_ip: self.batch.source.client_ip.as_deref(),
                library_name: e.library_name.as_deref(),
                library_version: e.library_version.as_deref(),
                generated_message_id: e.flags & flags::GENERATED_ID != 0,
                clamped_future_timestamp: e.flags & flags::CLAMPED_FUTURE != 0,
                derived: self
                    .batch
                    .extras_of(self.offset)
                    .and_then(|extras| extras.derived.as_deref())
                    .and_then(|text| serde_json::from_str(text).ok())
                    .unwrap_or_default(),
                weight: self.batch.weight_of(self.offset),
                schema_warning: if e.flags & flags::SCHEMA_MISMATCH != 0 {
                    Some("schema_mismatch")
                } else if e.flags & flags::UNPLANNED != 0 {
                    Some("unplanned")
                } else {
                    None
                },
            },
        )?;
        map.end()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Enrichment<'a> {
    seq: u64,
    batch_id: String,
    user_hash: String,
    /// The resolved person: the id that names the person the event's id belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    person: Option<&'a str>,
    person_hash: String,
    endpoint: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    library_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    library_version: Option<&'a str>,
    generated_message_id: bool,
    clamped_future_timestamp: bool,
    /// Events this one stands for (1 unless it was kept by the tenant's sampling).
    #[serde(skip_serializing_if = "is_one")]
    weight: u32,
    /// Stored under `warn` although it did not pass the tenant's plan: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_warning: Option<&'static str>,
    /// What enrichment derived (user agent, place, campaign), member by member.
    #[serde(flatten)]
    derived: std::collections::BTreeMap<&'a str, &'a serde_json::value::RawValue>,
}

fn is_one(weight: &u32) -> bool {
    *weight == 1
}
