//! The event model.
//!
//! [`IncomingEvent`] is what a compat parser (Segment today) produces from one event of a request:
//! typed identity and time fields, and the free-form objects (`properties`, `traits`, `context`,
//! `integrations`) kept as their original JSON text, so they are never re-serialised on the hot
//! path. Enrichment turns it into a [`StoredEvent`]; a request's stored events travel together as
//! one [`LogBatch`], which is the value of one event-log entry.

use serde::{Deserialize, Serialize};
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::OffsetDateTime;

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// Segment's event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Track => "track",
            EventKind::Identify => "identify",
            EventKind::Page => "page",
            EventKind::Screen => "screen",
            EventKind::Group => "group",
            EventKind::Alias => "alias",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        Some(match name {
            "track" => EventKind::Track,
            "identify" => EventKind::Identify,
            "page" => EventKind::Page,
            "screen" => EventKind::Screen,
            "group" => EventKind::Group,
            "alias" => EventKind::Alias,
            _ => return None,
        })
    }
}

/// One event as sent by a client, after parsing and validation. A dead letter keeps it as
/// JSON (`crate::deadletter`), so a field added here needs `#[serde(default)]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IncomingEvent {
    pub kind: Option<EventKind>,
    /// Client's dedup id; `None` means the server generates one (and skips dedup).
    pub message_id: Option<String>,
    /// `event` of a track call, `name` of a page or screen call.
    pub name: Option<String>,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub group_id: Option<String>,
    pub previous_id: Option<String>,
    /// Client clock: `timestamp` (or `originalTimestamp`).
    pub timestamp: Option<Micros>,
    /// Client clock when the event (or its batch) was sent.
    pub sent_at: Option<Micros>,
    pub properties: Option<String>,
    pub traits: Option<String>,
    pub context: Option<String>,
    pub integrations: Option<String>,
    /// Other top-level fields, as (key, JSON text), kept so that nothing a client sent is lost.
    pub extra: Vec<(String, String)>,
}

/// Flags set by enrichment.
pub mod flags {
    /// The server generated the messageId (the client sent none).
    pub const GENERATED_ID: u8 = 1;
    /// The corrected timestamp was beyond the future tolerance and was clamped to `received_at`.
    pub const CLAMPED_FUTURE: u8 = 2;
    /// Stored under `warn` enforcement although it does not match its schema.
    pub const SCHEMA_MISMATCH: u8 = 4;
    /// Stored under `unplanned_events = "warn"`: its name has no schema in force.
    pub const UNPLANNED: u8 = 8;
}

/// An enriched event as stored in the log. Field order is the bincode layout: append new fields
/// only together with a new codec format version (see `storage::codec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub kind: EventKind,
    pub message_id: String,
    pub name: Option<String>,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub group_id: Option<String>,
    pub previous_id: Option<String>,
    /// Corrected for client clock skew, clamped if too far in the future.
    pub timestamp: Micros,
    /// What the client said, uncorrected.
    pub original_timestamp: Option<Micros>,
    pub sent_at: Option<Micros>,
    pub received_at: Micros,
    /// Per-tenant keyed hash of `user_id`, else `anonymous_id`: privacy-safe identity for uniques.
    pub user_hash: u64,
    pub library_name: Option<String>,
    pub library_version: Option<String>,
    pub flags: u8,
    pub properties: Option<String>,
    pub traits: Option<String>,
    pub context: Option<String>,
    pub integrations: Option<String>,
    pub extra: Vec<(String, String)>,
}

/// Where a batch came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSource {
    /// The route, e.g. `/v1/batch`.
    pub endpoint: String,
    /// Client IP with the host part zeroed (IPv4 /24, IPv6 /48).
    pub client_ip: Option<String>,
}

/// What a batch sent once for all its events: Segment's batch-level `context` and
/// `integrations`, as JSON object text. Each event's own object is merged over it (the event's
/// members win) only when the event leaves the server (export, cold segments), so a large
/// batch-level object costs its bytes once, not once per event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchShared {
    pub context: Option<String>,
    pub integrations: Option<String>,
}

impl BatchShared {
    pub fn is_empty(&self) -> bool {
        self.context.is_none() && self.integrations.is_none()
    }
}

/// The events of one request, as one event-log value.
///
/// `shared` and `extras` are stored after the other fields as optional trailers (see
/// `storage::event_log::encode_entry`), so entries written before them still decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogBatch {
    /// Lineage: which request these events came in with (UUIDv7, time-ordered).
    pub batch_id: u128,
    pub received_at: Micros,
    pub source: BatchSource,
    pub events: Vec<StoredEvent>,
    #[serde(skip)]
    pub shared: BatchShared,
    /// One per event, or none at all (every event of weight 1 with nothing derived).
    #[serde(skip)]
    pub extras: Vec<EventExtras>,
}

/// What the server derived for one event beyond [`StoredEvent`]'s fields. Field order is the
/// bincode layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventExtras {
    /// Events this one stands for (1 unless sampled).
    pub weight: u32,
    /// Derived fields (user agent, place, campaign) as a JSON object's text, shown under
    /// `statsremote` in the export; `None`: nothing derived.
    pub derived: Option<String>,
}

impl Default for EventExtras {
    fn default() -> EventExtras {
        EventExtras {
            weight: 1,
            derived: None,
        }
    }
}

impl LogBatch {
    /// The extras of the event at `index`.
    pub fn extras_of(&self, index: usize) -> Option<&EventExtras> {
        self.extras.get(index)
    }

    /// The weight of the event at `index`.
    pub fn weight_of(&self, index: usize) -> u32 {
        self.extras_of(index).map_or(1, |extras| extras.weight)
    }
}

/// A [`StoredEvent`] decoded with its text borrowed from the decoded log entry, for scans that
/// read many events and keep little of each (funnels, rollup catch-up): no allocation per
/// event. Field for field the layout of [`StoredEvent`] (`views_decode_what_was_stored` checks
/// it); change both together.
#[derive(Debug, Deserialize)]
pub struct StoredEventView<'a> {
    pub kind: EventKind,
    pub message_id: &'a str,
    #[serde(borrow)]
    pub name: Option<&'a str>,
    #[serde(borrow)]
    pub user_id: Option<&'a str>,
    #[serde(borrow)]
    pub anonymous_id: Option<&'a str>,
    #[serde(borrow)]
    pub group_id: Option<&'a str>,
    #[serde(borrow)]
    pub previous_id: Option<&'a str>,
    pub timestamp: Micros,
    pub original_timestamp: Option<Micros>,
    pub sent_at: Option<Micros>,
    pub received_at: Micros,
    pub user_hash: u64,
    #[serde(borrow)]
    pub library_name: Option<&'a str>,
    #[serde(borrow)]
    pub library_version: Option<&'a str>,
    pub flags: u8,
    #[serde(borrow)]
    pub properties: Option<&'a str>,
    #[serde(borrow)]
    pub traits: Option<&'a str>,
    #[serde(borrow)]
    pub context: Option<&'a str>,
    #[serde(borrow)]
    pub integrations: Option<&'a str>,
    #[serde(borrow)]
    pub extra: Vec<(&'a str, &'a str)>,
}

/// A [`BatchSource`] with borrowed text.
#[derive(Debug, Deserialize)]
pub struct BatchSourceView<'a> {
    pub endpoint: &'a str,
    #[serde(borrow)]
    pub client_ip: Option<&'a str>,
}

/// A [`LogBatch`] with borrowed text (see [`StoredEventView`]).
#[derive(Debug, Deserialize)]
pub struct LogBatchView<'a> {
    pub batch_id: u128,
    pub received_at: Micros,
    #[serde(borrow)]
    pub source: BatchSourceView<'a>,
    #[serde(borrow)]
    pub events: Vec<StoredEventView<'a>>,
    /// Each event's weight (empty: all 1), from the entry's extras trailer when the scan read it.
    #[serde(skip)]
    pub weights: Vec<u32>,
}

impl LogBatchView<'_> {
    /// The weight of the event at `index`.
    pub fn weight_of(&self, index: usize) -> u32 {
        self.weights.get(index).copied().unwrap_or(1)
    }
}

/// A [`BatchShared`] with borrowed text: the first trailer, skipped on the way to the second.
#[derive(Debug, Default, Deserialize)]
pub struct BatchSharedView<'a> {
    #[serde(borrow)]
    pub context: Option<&'a str>,
    #[serde(borrow)]
    pub integrations: Option<&'a str>,
}

/// An [`EventExtras`] with borrowed text.
#[derive(Debug, Deserialize)]
pub struct EventExtrasView<'a> {
    pub weight: u32,
    #[serde(borrow)]
    pub derived: Option<&'a str>,
}

/// Last sequence number of a log entry holding `events` events from `first_seq`. Entries always
/// hold at least one event; an empty one counts as one, so scans over the log always advance.
pub fn last_seq_of(first_seq: u64, events: usize) -> u64 {
    first_seq + (events as u64).max(1) - 1
}

/// Parses an ISO 8601 / RFC 3339 date-time into microseconds.
pub fn parse_timestamp(text: &str) -> Option<Micros> {
    let parsed = OffsetDateTime::parse(text, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(text, &Iso8601::DEFAULT))
        .ok()?;
    i64::try_from(parsed.unix_timestamp_nanos() / 1000).ok()
}

/// Formats microseconds as RFC 3339 UTC with millisecond precision (Segment's own format).
pub fn format_timestamp(micros: Micros) -> String {
    let nanos = i128::from(micros) * 1000;
    match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(at) => {
            let format = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            at.format(&format).unwrap_or_else(|_| micros.to_string())
        }
        Err(_) => micros.to_string(),
    }
}

/// Now, in microseconds.
/// A duration in microseconds, saturated at `Micros::MAX` (windows, retentions, tolerances).
pub fn duration_micros(duration: std::time::Duration) -> Micros {
    Micros::try_from(duration.as_micros()).unwrap_or(Micros::MAX)
}

pub fn now_micros() -> Micros {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_with_offsets_and_fractions() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:01Z"), Some(1_000_000));
        assert_eq!(
            parse_timestamp("1970-01-01T01:00:01.5+01:00"),
            Some(1_500_000)
        );
        assert_eq!(parse_timestamp("2024-02-30T00:00:00Z"), None);
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(format_timestamp(1_500_000), "1970-01-01T00:00:01.500Z");
    }
}
