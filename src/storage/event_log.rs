//! The event log seam: everything that reaches the durable log goes through [`EventLog`].
//!
//! A log holds, per tenant, entries keyed by the sequence number of their first event: one
//! request's accepted events each, encoded as described under [Entries](#entries). Sequence
//! numbers start at 1 and never repeat, not even after old entries are deleted: every
//! [`EventLog::commit`] records each tenant's sequence head with the entries it makes durable.
//!
//! One thread appends (the log writer, [`super::writer`]): it stages a group of entries with
//! [`EventLog::append`], then makes them durable at once with [`EventLog::commit`] and only then
//! acknowledges them and publishes the tenants' new heads ([`super::writer::LogHeads`]). A
//! staged entry may be visible to readers before its commit; a reader that must see only
//! durable entries (the rollups, which persist what they read) stops at the published head.
//!
//! The embedded implementation is [`super::fjall_log::FjallLog`]: a keyspace of the main
//! database, with `commit` as one journal fsync. In cluster mode the process node that owns a
//! tenant's partition is this one writer (it consumes the ingest stream, deduplicates and
//! sequences), and a JetStream-backed log fits the same calls without changing its callers:
//! `append` publishes the entry to the tenant's subject of a log stream (first sequence in a
//! header) and keeps the publish-ack future; `commit` awaits every ack of the group (JetStream's
//! acknowledgement is its durability point) and writes the heads to a key-value bucket, `head`
//! falling back to the subject's last message as the embedded log falls back to its last entry;
//! `read` and `entry_holding` start an ordered consumer on the subject at the stream sequence of
//! the nearest earlier first sequence, from an index of first sequences kept in the same bucket
//! every so many entries; `tenants` lists the stream's subjects; the deletes purge the subject
//! up to a stream sequence.
//!
//! # Entries
//!
//! An entry is a [`LogBatch`] (bincode, compressed, see [`codec`]), followed by its
//! [`BatchShared`] as a trailer when it has one, then its [`EventExtras`] (one per event) when
//! it has any (entries without them, older ones included, decode with empty ones). [`encode_entry`] and [`decode_batch`] are the only writers and
//! readers of that layout.

use std::ops::ControlFlow;
use std::time::Duration;

use crate::event::{
    duration_micros, last_seq_of, BatchShared, BatchSharedView, EventExtras, EventExtrasView,
    LogBatch, LogBatchView, Micros,
};
use crate::ids::TenantId;
use crate::storage::{codec, StorageError};

/// An encoded entry: an immutable, reference-counted byte buffer. An implementation keeps the
/// buffer its engine hands out (the embedded log's, without a copy); any other bytes convert in.
#[derive(Clone, Debug)]
pub struct EntryBytes(Buffer);

/// Entries are equal when their bytes are, whichever buffer holds them.
impl PartialEq for EntryBytes {
    fn eq(&self, other: &EntryBytes) -> bool {
        **self == **other
    }
}

impl Eq for EntryBytes {}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Buffer {
    Embedded(fjall::Slice),
    Shared(bytes::Bytes),
}

impl EntryBytes {
    /// The embedded engine's buffer (copied once if the entry came from elsewhere).
    pub(super) fn into_slice(self) -> fjall::Slice {
        match self.0 {
            Buffer::Embedded(slice) => slice,
            Buffer::Shared(bytes) => fjall::Slice::from(&bytes[..]),
        }
    }
}

impl From<fjall::Slice> for EntryBytes {
    fn from(slice: fjall::Slice) -> EntryBytes {
        EntryBytes(Buffer::Embedded(slice))
    }
}

impl From<bytes::Bytes> for EntryBytes {
    fn from(bytes: bytes::Bytes) -> EntryBytes {
        EntryBytes(Buffer::Shared(bytes))
    }
}

impl From<Vec<u8>> for EntryBytes {
    fn from(bytes: Vec<u8>) -> EntryBytes {
        EntryBytes(Buffer::Shared(bytes.into()))
    }
}

impl std::ops::Deref for EntryBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Buffer::Embedded(slice) => slice,
            Buffer::Shared(bytes) => bytes,
        }
    }
}

/// The durable event log. See the module docs for the contract.
pub trait EventLog: Send + Sync {
    /// Stages an entry whose first sequence is `first_seq`. Not durable, and
    /// not to be acknowledged, until the next [`EventLog::commit`] returns.
    fn append(
        &self,
        tenant: TenantId,
        first_seq: u64,
        entry: EntryBytes,
    ) -> Result<(), StorageError>;

    /// Makes every staged entry durable (`sync`: on disk; otherwise handed to the OS), together
    /// with each tenant's sequence head in `heads` (the last sequence assigned).
    fn commit(&self, heads: &[(TenantId, u64)], sync: bool) -> Result<(), StorageError>;

    /// Makes durable everything committed so far without `sync`. Runs on another thread than
    /// the appends and does not hold them up: appends made while it runs may or may not be
    /// covered, so the writer answers a group only after a sync that started after its commit.
    fn sync(&self) -> Result<(), StorageError>;

    /// Tests: the writer handed a committed group of `requests` requests to the sync thread.
    #[cfg(test)]
    fn handed_to_sync(&self, _requests: usize) {}

    /// The last sequence ever assigned to the tenant (0: none). Never decreases.
    fn head(&self, tenant: TenantId) -> Result<u64, StorageError>;

    /// Up to `max_entries` entries of the tenant whose first sequence is ≥ `from_seq`, in order:
    /// (first sequence, entry).
    fn read(
        &self,
        tenant: TenantId,
        from_seq: u64,
        max_entries: usize,
    ) -> Result<Vec<(u64, EntryBytes)>, StorageError>;

    /// The tenant's entry holding `seq` (the last one starting at or before it), if any.
    fn entry_holding(
        &self,
        tenant: TenantId,
        seq: u64,
    ) -> Result<Option<(u64, EntryBytes)>, StorageError>;

    /// Every tenant with at least one entry.
    fn tenants(&self) -> Result<Vec<TenantId>, StorageError>;

    /// Bytes the log takes on disk, all tenants together (an estimate the engine keeps).
    fn disk_bytes(&self) -> u64;

    /// Deletes the tenant's entries whose first sequence is below `seq` (an entry boundary), and
    /// returns how many. The head is kept.
    fn delete_below(&self, tenant: TenantId, seq: u64) -> Result<u64, StorageError>;

    /// Deletes all of the tenant's entries and its head (a deleted tenant's id is never reused),
    /// durably; returns how many entries. Only once nothing more is appended for the tenant.
    fn delete_tenant(&self, tenant: TenantId) -> Result<u64, StorageError>;
}

/// Encodes a batch as a log entry (see [Entries](self#entries)).
pub fn encode_entry(batch: &LogBatch) -> Result<EntryBytes, StorageError> {
    // bincode writes a tuple as its fields one after the other: each trailer follows the
    // batch, and a later one needs the earlier ones (empty if need be).
    let encoded = if !batch.extras.is_empty() {
        codec::encode_compressed_value(&(batch, &batch.shared, &batch.extras))
    } else if !batch.shared.is_empty() {
        codec::encode_compressed_value(&(batch, &batch.shared))
    } else {
        codec::encode_compressed_value(batch)
    };
    encoded.map(EntryBytes::from).map_err(log_codec_error)
}

/// Decodes a log entry, its trailers included.
pub fn decode_batch(value: &[u8]) -> Result<LogBatch, StorageError> {
    let plain = codec::plain(value).map_err(log_codec_error)?;
    let (mut batch, shared, extras): (LogBatch, BatchShared, Vec<EventExtras>) =
        plain.decode_with_trailers().map_err(log_codec_error)?;
    batch.shared = shared;
    // An entry's extras are one per event or none; anything else is not trusted.
    if extras.len() == batch.events.len() {
        batch.extras = extras;
    }
    Ok(batch)
}

/// The number of events in a log entry.
pub fn entry_events(value: &[u8]) -> Result<usize, StorageError> {
    let plain = codec::plain(value).map_err(log_codec_error)?;
    let batch: LogBatchView = plain.decode().map_err(log_codec_error)?;
    Ok(batch.events.len())
}

pub(crate) fn log_codec_error(source: codec::CodecError) -> StorageError {
    StorageError::Codec {
        keyspace: "log",
        source,
    }
}

/// Log entries read per step of a scan.
const SCAN_CHUNK: usize = 256;

/// Visits every log entry of a tenant from `from_seq` on, in sequence order, reading in chunks;
/// `visit` may stop the scan early. Blocking.
pub fn scan(
    log: &dyn EventLog,
    tenant: TenantId,
    from_seq: u64,
    mut visit: impl FnMut(u64, &LogBatch) -> ControlFlow<()>,
) -> Result<(), StorageError> {
    scan_entries(log, tenant, from_seq, |first_seq, value| {
        let batch = decode_batch(value)?;
        Ok((visit(first_seq, &batch), batch.events.len()))
    })
}

/// Like [`scan`], with each entry decoded as a [`LogBatchView`], whose text borrows from the
/// entry: for scans that keep little of each event. Blocking.
pub fn scan_views(
    log: &dyn EventLog,
    tenant: TenantId,
    from_seq: u64,
    mut visit: impl FnMut(u64, &LogBatchView<'_>) -> ControlFlow<()>,
) -> Result<(), StorageError> {
    scan_entries(log, tenant, from_seq, |first_seq, value| {
        let plain = codec::plain(value).map_err(log_codec_error)?;
        let batch = decode_view(&plain)?;
        Ok((visit(first_seq, &batch), batch.events.len()))
    })
}

/// A log entry as a [`LogBatchView`], with its events' weights from the extras trailer.
fn decode_view<'a>(plain: &'a codec::Plain<'_>) -> Result<LogBatchView<'a>, StorageError> {
    let (mut batch, _shared, extras): (LogBatchView, BatchSharedView, Vec<EventExtrasView>) =
        plain.decode_with_trailers().map_err(log_codec_error)?;
    if extras.len() == batch.events.len() && extras.iter().any(|e| e.weight != 1) {
        batch.weights = extras.iter().map(|e| e.weight).collect();
    }
    Ok(batch)
}

/// The loop of [`scan`] and [`scan_views`]: `each` decodes and visits one raw entry, and says
/// whether to go on and how many events the entry held.
fn scan_entries(
    log: &dyn EventLog,
    tenant: TenantId,
    from_seq: u64,
    mut each: impl FnMut(u64, &[u8]) -> Result<(ControlFlow<()>, usize), StorageError>,
) -> Result<(), StorageError> {
    let mut next_seq = from_seq;
    loop {
        let entries = log.read(tenant, next_seq, SCAN_CHUNK)?;
        if entries.is_empty() {
            return Ok(());
        }
        for (first_seq, value) in &entries {
            let (flow, events) = each(*first_seq, value)?;
            if flow.is_break() {
                return Ok(());
            }
            next_seq = last_seq_of(*first_seq, events) + 1;
        }
    }
}

/// How far out of receive order entries may be committed (requests are timestamped when they
/// arrive and sequenced when the writer takes them), with room for small clock adjustments.
pub const RECEIVE_ORDER_SLACK: Micros = 10 * 60 * 1_000_000;

/// The first sequence a scan for events timestamped at or after `from` must start at, so that a
/// funnel or an export over recent events does not read the tenant's whole history. An event's
/// timestamp is at most its receive time plus `future_tolerance` (later ones are clamped at
/// ingestion), so no entry received before `from - future_tolerance - RECEIVE_ORDER_SLACK` holds
/// one. Entries are appended in arrival order, so this is a binary search over the tenant's
/// sequence numbers: O(log n) entries read, each only as far as its receive time. Blocking.
pub fn first_seq_received_since(
    log: &dyn EventLog,
    tenant: TenantId,
    from: Micros,
    future_tolerance: Duration,
) -> Result<u64, StorageError> {
    /// The leading fields of a [`LogBatch`]; decoding stops after them.
    #[derive(serde::Deserialize)]
    struct EntryHead {
        _batch_id: u128,
        received_at: Micros,
    }
    let tolerance = duration_micros(future_tolerance);
    let since = from
        .saturating_sub(tolerance)
        .saturating_sub(RECEIVE_ORDER_SLACK);
    // The answer is in [low, high]: entries starting at or after it were received since `since`.
    let (mut low, mut high) = (0u64, log.head(tenant)?.saturating_add(1));
    while low < high {
        let middle = low + (high - low) / 2;
        let holding = match log.entry_holding(tenant, middle)? {
            Some((first_seq, value)) => {
                let head: EntryHead = codec::decode(&value).map_err(log_codec_error)?;
                Some((first_seq, head.received_at))
            }
            None => None,
        };
        match holding {
            Some((first_seq, received_at)) if received_at >= since => high = first_seq,
            _ => low = middle + 1,
        }
    }
    Ok(low)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::event::{BatchSource, EventKind, StoredEvent};
    use crate::storage::Storage;

    fn event(id: &str) -> StoredEvent {
        StoredEvent {
            kind: EventKind::Track,
            message_id: id.into(),
            name: Some("Signed Up".into()),
            user_id: Some("u1".into()),
            anonymous_id: None,
            group_id: None,
            previous_id: None,
            timestamp: 1,
            original_timestamp: None,
            sent_at: None,
            received_at: 1,
            user_hash: 7,
            library_name: None,
            library_version: None,
            flags: 0,
            properties: None,
            traits: None,
            context: None,
            integrations: None,
            extra: vec![],
        }
    }

    /// A log batch of track events with these messageIds.
    pub(crate) fn batch(ids: &[&str]) -> LogBatch {
        LogBatch {
            batch_id: 1,
            received_at: 1,
            source: BatchSource {
                endpoint: "/v1/batch".into(),
                client_ip: None,
            },
            events: ids.iter().map(|id| event(id)).collect(),
            shared: Default::default(),
            extras: Vec::new(),
        }
    }

    /// Up to `max_batches` log entries of a tenant from `from_seq` on, decoded.
    pub(crate) fn read_batches(
        log: &dyn EventLog,
        tenant: TenantId,
        from_seq: u64,
        max_batches: usize,
    ) -> Result<Vec<(u64, LogBatch)>, StorageError> {
        let mut out = Vec::new();
        scan(log, tenant, from_seq, |first_seq, batch| {
            out.push((first_seq, batch.clone()));
            if out.len() < max_batches {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })?;
        Ok(out)
    }

    #[test]
    fn batch_level_objects_are_a_trailer_that_old_entries_lack() {
        let mut with_shared = batch(&["a", "b"]);
        with_shared.shared = BatchShared {
            context: Some(r#"{"library":{"name":"x"}}"#.into()),
            integrations: None,
        };
        let encoded = encode_entry(&with_shared).unwrap();
        assert_eq!(decode_batch(&encoded).unwrap(), with_shared);
        // Views skip the trailer.
        let plain = codec::plain(&encoded).unwrap();
        let view: LogBatchView = plain.decode().unwrap();
        assert_eq!(view.events.len(), 2);
        // An entry written before the trailer existed (the plain batch) decodes with none.
        let old = codec::encode_compressed(&batch(&["c"])).unwrap();
        assert_eq!(decode_batch(&old).unwrap(), batch(&["c"]));
    }

    #[test]
    fn per_event_extras_are_a_second_trailer_with_or_without_the_first() {
        let old_entry = codec::encode_compressed(&batch(&["c"])).unwrap();
        let mut with_extras = batch(&["a", "b"]);
        with_extras.extras = vec![
            EventExtras::default(),
            EventExtras {
                weight: 10,
                derived: Some(r#"{"browser":"Chrome"}"#.into()),
            },
        ];
        let encoded = encode_entry(&with_extras).unwrap();
        assert_eq!(decode_batch(&encoded).unwrap(), with_extras);
        with_extras.shared.context = Some("{}".into());
        let encoded = encode_entry(&with_extras).unwrap();
        assert_eq!(decode_batch(&encoded).unwrap(), with_extras);
        // Views skip both trailers, or read the weights from the second.
        let plain = codec::plain(&encoded).unwrap();
        let view: LogBatchView = plain.decode().unwrap();
        assert_eq!(view.events.len(), 2);
        let view = decode_view(&plain).unwrap();
        assert_eq!((view.weight_of(0), view.weight_of(1)), (1, 10));
        let plain = codec::plain(&old_entry).unwrap();
        assert_eq!(decode_view(&plain).unwrap().weights, Vec::<u32>::new());
        // Extras that are not one per event are not trusted.
        let mut odd = batch(&["c", "d"]);
        odd.extras = vec![EventExtras::default()];
        let encoded = codec::encode_compressed(&(&odd, &odd.shared, &odd.extras)).unwrap();
        assert!(decode_batch(&encoded).unwrap().extras.is_empty());
    }

    #[test]
    fn scans_for_recent_events_start_at_the_first_entry_received_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let tenant = TenantId(7);
        let tolerance = Duration::from_secs(3600);
        let start = |from: Micros| first_seq_received_since(storage.log(), tenant, from, tolerance);
        assert_eq!(
            start(0).unwrap(),
            1,
            "empty log: from the first sequence a tenant gets"
        );
        // Entries of 1 to 4 events, received one hour apart, with another tenant's in between.
        let hour: Micros = 3_600_000_000;
        let mut seq = 1;
        let mut firsts = Vec::new();
        for n in 0..200u64 {
            let mut entry = batch(&vec!["e"; (n % 4 + 1) as usize]);
            entry.received_at = n as Micros * hour;
            let log = storage.log();
            log.append(tenant, seq, encode_entry(&entry).unwrap())
                .unwrap();
            log.append(TenantId(8), n, encode_entry(&entry).unwrap())
                .unwrap();
            firsts.push((seq, entry.received_at));
            seq += entry.events.len() as u64;
        }
        let margin = hour + RECEIVE_ORDER_SLACK;
        for from in [
            -5 * hour,
            0,
            1,
            hour,
            2 * hour + 1,
            117 * hour,
            199 * hour,
            500 * hour,
        ] {
            let expected = firsts
                .iter()
                .find(|(_, received)| *received >= from - margin)
                .map_or(seq, |(first, _)| *first);
            let found = start(from).unwrap();
            // Every entry before `found` was received too early; `found` itself starts an entry.
            assert!(found <= expected, "from {from}: {found} > {expected}");
            assert_eq!(
                read_batches(storage.log(), tenant, found, 1)
                    .unwrap()
                    .first()
                    .map(|(s, _)| *s),
                read_batches(storage.log(), tenant, expected, 1)
                    .unwrap()
                    .first()
                    .map(|(s, _)| *s),
                "from {from}"
            );
        }
    }
}
