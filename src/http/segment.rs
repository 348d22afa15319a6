//! Parser for the Segment HTTP Tracking API formats.
//!
//! Input is untrusted bytes; output is a [`ParsedRequest`]: the valid events, and for each
//! invalid one its index and a reason, so a batch keeps its good events. Errors that make the
//! whole request unusable (not JSON, no `batch` array, too many events) are [`ParseError`]s.
//!
//! Each event object is read once, into `(key, raw JSON)` pairs borrowed from the body (a
//! batch's items straight from the `batch` array), then each known key is checked for its type.
//! Free-form objects (`properties`, `traits`, `context`, `integrations`) are kept as their JSON
//! text; unknown top-level keys are kept in `extra`. Nothing here panics on any input
//! (property-tested below).

use std::borrow::Cow;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::{parse_timestamp, BatchShared, EventKind, IncomingEvent, Micros};
use crate::json::{MaybeObject, MemberKey, Members, MergeBase};

/// Longest accepted event name (`event` of a track, `name` of a page or screen), in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest accepted `messageId`, in bytes.
pub const MAX_MESSAGE_ID_BYTES: usize = 512;
/// Longest accepted `userId`, `anonymousId`, `groupId` or `previousId`, in bytes.
pub const MAX_ID_BYTES: usize = 1024;
/// Most reasons given for one rejected event; further ones are counted.
const MAX_REASONS: usize = 3;
/// Top-level key under which exports show what the server added; clients may not send it.
pub const RESERVED_KEY: &str = "statsremote";

/// Which Segment route a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v1/batch` and `/v1/import`: `{"batch": [...]}`, each item with its `type`.
    Batch,
    /// `/v1/track`, `/v1/identify`, ...: the body is one event of this type.
    Single(EventKind),
}

#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// Largest event as stored: compact JSON, with the batch's `context` and `integrations`
    /// merged in.
    pub max_event_bytes: usize,
    pub max_events: usize,
    /// Most top-level members of one event object.
    pub max_event_members: usize,
}

/// One event that was not accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// Position in the batch (or NDJSON line among the non-empty lines), from 0.
    pub index: usize,
    #[serde(rename = "messageId", skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub reason: String,
    /// The event was refused by the tenant's tracking plan and kept as a dead letter.
    #[serde(rename = "deadLettered", skip_serializing_if = "std::ops::Not::not")]
    pub dead_lettered: bool,
    /// The schema version it was checked against (none for an unplanned name).
    #[serde(rename = "schemaVersion", skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<u32>,
    /// Each mismatch: its JSON path in the payload, the schema keyword's path, the message.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<crate::schema::ViolationError>,
}

#[derive(Debug, Default)]
pub struct ParsedRequest {
    /// `writeKey` from the body, if any.
    pub write_key: Option<String>,
    pub events: Vec<IncomingEvent>,
    /// The batch-level `context` and `integrations`, held once for all the events.
    pub shared: BatchShared,
    pub rejected: Vec<Rejection>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0}")]
    Malformed(String),
    #[error("request has {count} events; the limit is {limit}")]
    TooManyEvents { count: usize, limit: usize },
}

/// Parses a JSON body of `route`.
pub fn parse_json(
    route: Route,
    body: &[u8],
    limits: &ParseLimits,
) -> Result<ParsedRequest, ParseError> {
    let text = utf8(body)?;
    match route {
        Route::Batch => parse_batch(text, limits),
        Route::Single(kind) => parse_single(kind, text, limits),
    }
}

fn utf8(body: &[u8]) -> Result<&str, ParseError> {
    std::str::from_utf8(body).map_err(|e| {
        ParseError::Malformed(format!(
            "request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })
}

/// The body of `/v1/batch`, read in one pass: each item of `batch` goes straight into its
/// members, with no first pass that only finds where it ends. Items past `max_events` are
/// counted, not kept. Each field may appear once; other keys are ignored.
#[derive(Default)]
struct BatchEnvelope<'a> {
    /// `None` when absent or `null`.
    batch: Option<Option<BatchItems<'a>>>,
    sent_at: Option<&'a RawValue>,
    context: Option<&'a RawValue>,
    integrations: Option<&'a RawValue>,
    write_key: Option<Option<String>>,
}

struct BatchItems<'a> {
    /// The first `max_events` items.
    items: Vec<Item<'a>>,
    /// All items, kept or not.
    count: usize,
}

/// One item of `batch`: an object's members, or why it is not an event.
enum Item<'a> {
    Object(Members<'a>),
    Rejected(String),
}

/// Reads a [`BatchEnvelope`]; its `batch` value goes to [`ItemsSeed`].
#[derive(Clone, Copy)]
struct BatchSeed {
    max_events: usize,
}

impl<'de> DeserializeSeed<'de> for BatchSeed {
    type Value = BatchEnvelope<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BatchSeed {
    type Value = BatchEnvelope<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        fn once<T, E: de::Error>(
            slot: &mut Option<T>,
            field: &'static str,
            value: T,
        ) -> Result<(), E> {
            if slot.replace(value).is_some() {
                return Err(E::duplicate_field(field));
            }
            Ok(())
        }
        let mut envelope = BatchEnvelope::default();
        while let Some(MemberKey(key)) = map.next_key()? {
            match &*key {
                "batch" => once(
                    &mut envelope.batch,
                    "batch",
                    map.next_value_seed(ItemsSeed(self))?,
                )?,
                "sentAt" => once(&mut envelope.sent_at, "sentAt", map.next_value()?)?,
                "context" => once(&mut envelope.context, "context", map.next_value()?)?,
                "integrations" => once(
                    &mut envelope.integrations,
                    "integrations",
                    map.next_value()?,
                )?,
                "writeKey" => once(&mut envelope.write_key, "writeKey", map.next_value()?)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(envelope)
    }
}

/// Reads the value of `batch`.
struct ItemsSeed(BatchSeed);

impl<'de> DeserializeSeed<'de> for ItemsSeed {
    type Value = Option<BatchItems<'de>>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed {
    type Value = Option<BatchItems<'de>>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of events")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while items.len() < self.0.max_events {
            let Some(item) = seq.next_element()? else {
                break;
            };
            items.push(match item {
                MaybeObject::Object(members) => Item::Object(members),
                MaybeObject::Other(kind) => Item::Rejected(not_an_object(kind)),
            });
        }
        let mut count = items.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok(Some(BatchItems { items, count }))
    }
}

/// Batch-level fields that apply to every event.
#[derive(Default)]
struct Defaults<'a> {
    sent_at: Option<Micros>,
    /// Batch `context` and `integrations`, read once, to size each event as it will be stored.
    context: Option<MergeBase<'a>>,
    integrations: Option<MergeBase<'a>>,
}

/// The envelope with each item as its raw text, for when the one-pass read fails: an item that
/// pass cannot read (a key with a lone surrogate escape, a number out of range) must cost only
/// that item, and a malformed body gets the same message as ever. Slower: each item is read
/// twice.
#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(rename = "sentAt", borrow)]
    sent_at: Option<&'a RawValue>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    integrations: Option<&'a RawValue>,
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

/// Reads the envelope in one pass, or else through [`RawEnvelope`].
fn read_envelope<'a>(text: &'a str, limits: &ParseLimits) -> Result<BatchEnvelope<'a>, ParseError> {
    let seed = BatchSeed {
        max_events: limits.max_events,
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let one_pass = seed
        .deserialize(&mut deserializer)
        .and_then(|envelope| deserializer.end().map(|()| envelope));
    if let Ok(envelope) = one_pass {
        return Ok(envelope);
    }
    let raw: RawEnvelope<'a> = serde_json::from_str(text).map_err(|e| {
        ParseError::Malformed(format!(
            "request body must be a JSON object with a `batch` array: {e}"
        ))
    })?;
    let batch = raw.batch.map(|raw_items| {
        let count = raw_items.len();
        let items = raw_items
            .into_iter()
            .take(limits.max_events)
            .map(|item| match read_object(item.get()) {
                Ok(members) => Item::Object(members),
                Err(reason) => Item::Rejected(reason),
            })
            .collect();
        BatchItems { items, count }
    });
    Ok(BatchEnvelope {
        batch: Some(batch),
        sent_at: raw.sent_at,
        context: raw.context,
        integrations: raw.integrations,
        write_key: Some(raw.write_key),
    })
}

fn parse_batch(text: &str, limits: &ParseLimits) -> Result<ParsedRequest, ParseError> {
    let envelope = read_envelope(text, limits)?;
    let BatchItems { items, count } = envelope
        .batch
        .flatten()
        .ok_or_else(|| ParseError::Malformed("request body has no `batch` array".to_string()))?;
    if count > limits.max_events {
        return Err(ParseError::TooManyEvents {
            count,
            limit: limits.max_events,
        });
    }
    let context = optional_object("context", envelope.context).map_err(ParseError::Malformed)?;
    let integrations =
        optional_object("integrations", envelope.integrations).map_err(ParseError::Malformed)?;
    let defaults = Defaults {
        sent_at: optional_time("sentAt", envelope.sent_at).map_err(ParseError::Malformed)?,
        context: merge_base("context", context, limits.max_event_members)?,
        integrations: merge_base("integrations", integrations, limits.max_event_members)?,
    };
    let mut parsed = ParsedRequest {
        write_key: envelope.write_key.flatten(),
        events: Vec::with_capacity(items.len()),
        shared: BatchShared {
            context: context.map(str::to_string),
            integrations: integrations.map(str::to_string),
        },
        rejected: Vec::new(),
    };
    for (index, item) in items.into_iter().enumerate() {
        let outcome = match item {
            Item::Object(members) => parse_event(None, members, &defaults, limits),
            Item::Rejected(reason) => Err(EventError::new(reason)),
        };
        parsed.take(index, outcome);
    }
    Ok(parsed)
}

/// A batch-level object, read once; like an event, it has at most `max_members` members.
fn merge_base<'a>(
    field: &str,
    text: Option<&'a str>,
    max_members: usize,
) -> Result<Option<MergeBase<'a>>, ParseError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let base = MergeBase::parse(text)
        .map_err(|e| ParseError::Malformed(format!("batch field `{field}` cannot be read: {e}")))?;
    if base.len() > max_members {
        return Err(ParseError::Malformed(format!(
            "batch field `{field}` has {} members; the limit is {max_members}",
            base.len()
        )));
    }
    Ok(Some(base))
}

fn parse_single(
    kind: EventKind,
    text: &str,
    limits: &ParseLimits,
) -> Result<ParsedRequest, ParseError> {
    // The whole body is the event: a malformed object is a malformed request.
    let members = read_object(text)
        .map_err(|reason| ParseError::Malformed(format!("request body is {reason}")))?;
    let mut parsed = ParsedRequest::default();
    parsed.take(
        0,
        parse_event(Some(kind), members, &Defaults::default(), limits),
    );
    Ok(parsed)
}

/// One event's text read as an object, or why it is not one, in the words a batch item gets.
fn read_object(text: &str) -> Result<Members<'_>, String> {
    match serde_json::from_str(text) {
        Ok(MaybeObject::Object(members)) => Ok(members),
        Ok(MaybeObject::Other(kind)) => Err(not_an_object(kind)),
        Err(e) => Err(format!("not a JSON object: {e}")),
    }
}

fn not_an_object(kind: &str) -> String {
    format!("not a JSON object (got {kind})")
}

/// The write key a body carries, found in one pass that builds nothing: the top-level
/// `writeKey`, else the `writeKey` of the first item of `batch` (or NDJSON line) that has one.
/// Lets a request without a key in a header be refused before its events are parsed. `None`
/// when the body is not JSON of the route's shape (the full parse then says what is wrong).
pub fn find_write_key(route: Route, ndjson: bool, body: &[u8]) -> Option<Option<String>> {
    let text = std::str::from_utf8(body).ok()?;
    let scan = KeyScan {
        batch: route == Route::Batch && !ndjson,
    };
    if !ndjson {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let key = scan.deserialize(&mut deserializer).ok()?;
        deserializer.end().ok()?;
        return Some(key);
    }
    // A line the scan cannot read is no event with a key: the parse will reject it alone.
    for line in ndjson_lines(text) {
        if let Ok(KeyScanned(Some(key))) = serde_json::from_str::<KeyScanned>(line) {
            return Some(Some(key));
        }
    }
    Some(None)
}

/// Reads an object for its `writeKey` (a string), ignoring everything else; with `batch`,
/// also the items of its `batch` array.
#[derive(Clone, Copy)]
struct KeyScan {
    batch: bool,
}

/// A [`KeyScan`] of one object without `batch`.
struct KeyScanned(Option<String>);

impl<'de> Deserialize<'de> for KeyScanned {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        KeyScan { batch: false }
            .deserialize(deserializer)
            .map(KeyScanned)
    }
}

impl<'de> DeserializeSeed<'de> for KeyScan {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyScan {
    type Value = Option<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut own = None;
        let mut from_items = None;
        while let Some(MemberKey(key)) = map.next_key()? {
            match &*key {
                "writeKey" => {
                    let value: &'de RawValue = map.next_value()?;
                    if let Some(key) = string_of(value) {
                        own = Some(key.into_owned());
                    }
                }
                "batch" if self.batch => {
                    let found = map.next_value_seed(ItemKeys)?;
                    if from_items.is_none() {
                        from_items = found;
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(own.or(from_items))
    }
    // Anything but an object is not a request with a key in it.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// The items of `batch`, each scanned for its `writeKey`; the first one found.
struct ItemKeys;

impl<'de> DeserializeSeed<'de> for ItemKeys {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemKeys {
    type Value = Option<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of events")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = seq.next_element_seed(KeyScan { batch: false })? {
            if found.is_none() {
                found = key;
            }
        }
        Ok(found)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        KeyScan { batch: false }.visit_map(map).map(|_| None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// The non-empty lines of an NDJSON body, without their line ends.
fn ndjson_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.trim().is_empty())
}

/// Parses `application/x-ndjson`: one event (with its `type`) per non-empty line.
pub fn parse_ndjson(body: &[u8], limits: &ParseLimits) -> Result<ParsedRequest, ParseError> {
    let text = utf8(body)?;
    // Counted first, without keeping the lines: a body of tiny lines costs no list of them.
    let count = ndjson_lines(text).count();
    if count > limits.max_events {
        return Err(ParseError::TooManyEvents {
            count,
            limit: limits.max_events,
        });
    }
    let mut parsed = ParsedRequest {
        events: Vec::with_capacity(count),
        ..ParsedRequest::default()
    };
    for (index, line) in ndjson_lines(text).enumerate() {
        let outcome = read_object(line)
            .map_err(EventError::new)
            .and_then(|members| parse_event(None, members, &Defaults::default(), limits));
        parsed.take(index, outcome);
    }
    Ok(parsed)
}

impl ParsedRequest {
    fn take(&mut self, index: usize, outcome: Result<ParsedEvent, EventError>) {
        match outcome {
            Ok(ParsedEvent { event, write_key }) => {
                if self.write_key.is_none() {
                    self.write_key = write_key;
                }
                self.events.push(event);
            }
            Err(EventError { message_id, reason }) => self.rejected.push(Rejection {
                index,
                message_id,
                reason,
                ..Rejection::default()
            }),
        }
    }
}

struct ParsedEvent {
    event: IncomingEvent,
    write_key: Option<String>,
}

struct EventError {
    message_id: Option<String>,
    reason: String,
}

impl EventError {
    fn new(reason: impl Into<String>) -> EventError {
        EventError {
            message_id: None,
            reason: reason.into(),
        }
    }
}

/// Validates one event object. `route_kind` is the type implied by a single-event route.
fn parse_event(
    route_kind: Option<EventKind>,
    members: Members<'_>,
    defaults: &Defaults<'_>,
    limits: &ParseLimits,
) -> Result<ParsedEvent, EventError> {
    if members.0.len() > limits.max_event_members {
        return Err(EventError::new(format!(
            "event has {} top-level members; the limit is {}",
            members.0.len(),
            limits.max_event_members
        )));
    }
    let own_size = members.compact_len();
    if own_size > limits.max_event_bytes {
        return Err(EventError::new(format!(
            "event is {own_size} bytes as compact JSON; the limit is {} bytes",
            limits.max_event_bytes
        )));
    }
    let size = own_size + inherited_len(&members, defaults);
    if size > limits.max_event_bytes {
        return Err(EventError::new(format!(
            "event is {size} bytes as compact JSON with the batch's `context` and `integrations` \
             merged in; the limit is {} bytes",
            limits.max_event_bytes
        )));
    }
    let members = members.0;

    // The type decides how `event` and `name` are read, and it may come after them.
    let kind = match route_kind {
        Some(kind) => kind,
        None => {
            let raw = members
                .iter()
                .rev()
                .find(|(key, _)| key == "type")
                .map(|(_, value)| *value);
            let message_id = members
                .iter()
                .rev()
                .find(|(key, _)| key == "messageId")
                .and_then(|(_, value)| id_value("messageId", value).ok().flatten());
            let name =
                match raw.map(|r| string_value("type", r)) {
                    Some(Ok(Some(name))) => name,
                    Some(Err(reason)) => return Err(EventError { message_id, reason }),
                    None | Some(Ok(None)) => return Err(EventError {
                        message_id,
                        reason:
                            "missing `type` (one of track, identify, page, screen, group, alias)"
                                .into(),
                    }),
                };
            match EventKind::parse(&name) {
                Some(kind) => kind,
                None => {
                    return Err(EventError {
                        message_id,
                        reason: format!(
                            "unknown type {name:?} (expected track, identify, page, screen, group or alias)"
                        ),
                    })
                }
            }
        }
    };

    let mut event = IncomingEvent {
        kind: Some(kind),
        ..IncomingEvent::default()
    };
    let mut write_key = None;
    // The first few reasons are kept, the rest counted: an event of a thousand bad members
    // must not answer with a thousand reasons.
    let mut errors: Vec<String> = Vec::new();
    let mut more_errors = 0usize;
    let mut record = |result: Result<(), String>| {
        if let Err(reason) = result {
            if errors.len() < MAX_REASONS {
                errors.push(reason);
            } else {
                more_errors += 1;
            }
        }
    };
    for (key, value) in members {
        let key_str: &str = &key;
        match key_str {
            "type" | "receivedAt" => {}
            "messageId" => record(id_value("messageId", value).map(|v| event.message_id = v)),
            "event" if kind == EventKind::Track => {
                record(string_value("event", value).map(|v| event.name = v))
            }
            "name" if matches!(kind, EventKind::Page | EventKind::Screen) => {
                record(string_value("name", value).map(|v| event.name = v))
            }
            "userId" => record(id_value("userId", value).map(|v| event.user_id = v)),
            "anonymousId" => record(id_value("anonymousId", value).map(|v| event.anonymous_id = v)),
            "groupId" => record(id_value("groupId", value).map(|v| event.group_id = v)),
            "previousId" => record(id_value("previousId", value).map(|v| event.previous_id = v)),
            "timestamp" => record(time_value("timestamp", value).map(|v| {
                if v.is_some() {
                    event.timestamp = v;
                }
            })),
            "originalTimestamp" => record(time_value("originalTimestamp", value).map(|v| {
                if event.timestamp.is_none() {
                    event.timestamp = v;
                }
            })),
            "sentAt" => record(time_value("sentAt", value).map(|v| event.sent_at = v)),
            "properties" => record(object_value("properties", value).map(|v| event.properties = v)),
            "traits" => record(object_value("traits", value).map(|v| event.traits = v)),
            "context" => record(object_value("context", value).map(|v| event.context = v)),
            "integrations" => {
                record(object_value("integrations", value).map(|v| event.integrations = v))
            }
            "writeKey" => record(string_value("writeKey", value).map(|v| write_key = v)),
            RESERVED_KEY => record(Err(format!(
                "field `{RESERVED_KEY}` is reserved for the server's enrichment"
            ))),
            _ => event
                .extra
                .push((key.into_owned(), value.get().to_string())),
        }
    }
    last_of_each_key(&mut event.extra);
    let fail = |reason: String, event: &IncomingEvent| EventError {
        message_id: event.message_id.clone(),
        reason,
    };
    if !errors.is_empty() {
        let mut reason = errors.join("; ");
        if more_errors > 0 {
            reason.push_str(&format!(" (and {more_errors} more)"));
        }
        return Err(fail(reason, &event));
    }
    if let Some(reason) = check_required(kind, &event) {
        return Err(fail(reason, &event));
    }
    if event.sent_at.is_none() {
        event.sent_at = defaults.sent_at;
    }
    Ok(ParsedEvent { event, write_key })
}

/// How many bytes merging the batch's `context` and `integrations` adds to an event.
fn inherited_len(members: &Members<'_>, defaults: &Defaults<'_>) -> usize {
    let mut added = 0;
    for (field, base) in [
        ("context", &defaults.context),
        ("integrations", &defaults.integrations),
    ] {
        let Some(base) = base else {
            continue;
        };
        // The last member of that name is the one kept.
        let own = members
            .0
            .iter()
            .rev()
            .find(|(key, _)| key == field)
            .map(|(_, value)| value.get())
            .filter(|text| text.starts_with('{'));
        let own_members = own.and_then(|text| serde_json::from_str::<Members<'_>>(text).ok());
        added += match (own, own_members.as_ref()) {
            (Some(text), Some(own_members)) => {
                base.merged_len(Some((text, own_members))) - text.len()
            }
            // An object the merge cannot read is exported as it is (see `MergeBase::merge`).
            (Some(_), None) => 0,
            // A new member: `,"context":{...}`.
            (None, _) => field.len() + 4 + base.merged_len(None),
        };
    }
    added
}

/// Keeps the last member of each key, in order: a repeated key's last value wins, as with the
/// known fields. Linear in the members.
fn last_of_each_key(extra: &mut Vec<(String, String)>) {
    if extra.len() < 2 {
        return;
    }
    let mut keep: Vec<bool> = {
        let mut seen = std::collections::HashSet::with_capacity(extra.len());
        extra
            .iter()
            .rev()
            .map(|(key, _)| seen.insert(key.as_str()))
            .collect()
    };
    keep.reverse();
    let mut flags = keep.into_iter();
    extra.retain(|_| flags.next().unwrap_or(true));
}

fn check_required(kind: EventKind, event: &IncomingEvent) -> Option<String> {
    if event.user_id.is_none() && event.anonymous_id.is_none() {
        return Some(format!(
            "{} event needs `userId` or `anonymousId`",
            kind.as_str()
        ));
    }
    match kind {
        EventKind::Track if event.name.is_none() => {
            Some("track event needs a non-empty `event` name".into())
        }
        EventKind::Group if event.group_id.is_none() => Some("group event needs `groupId`".into()),
        EventKind::Alias if event.previous_id.is_none() => {
            Some("alias event needs `previousId`".into())
        }
        EventKind::Alias if event.user_id.is_none() => Some("alias event needs `userId`".into()),
        _ => None,
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// A JSON string's value. Most strings have no escapes: their text between the quotes is the
/// value (the parser has already checked the raw text is valid JSON), with no deserializer.
fn string_of(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    match text
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    {
        Some(inner) if !inner.contains('\\') => Some(Cow::Borrowed(inner)),
        Some(_) => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
        None => None,
    }
}

/// A non-empty string; `null` or `""` is absent.
fn string_value(field: &str, raw: &RawValue) -> Result<Option<String>, String> {
    if is_null(raw) {
        return Ok(None);
    }
    let value = string_of(raw)
        .ok_or_else(|| format!("field `{field}` must be a string, got {}", describe(raw)))?;
    if value.is_empty() {
        return Ok(None);
    }
    if matches!(field, "event" | "name") && value.len() > MAX_NAME_BYTES {
        return Err(format!(
            "field `{field}` is longer than {MAX_NAME_BYTES} bytes"
        ));
    }
    // Series names starting with NUL are the server's own (crate::sampling::sampled_series).
    if matches!(field, "event" | "name") && value.contains('\0') {
        return Err(format!("field `{field}` must not contain NUL characters"));
    }
    Ok(Some(value.into_owned()))
}

/// An identifier: a string or a number (some SDKs send numeric user ids), kept as text.
fn id_value(field: &str, raw: &RawValue) -> Result<Option<String>, String> {
    let text = raw.get();
    let value = if text.starts_with('"') {
        string_value(field, raw)?
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Some(text.to_string())
    } else if is_null(raw) {
        None
    } else {
        return Err(format!(
            "field `{field}` must be a string or a number, got {}",
            describe(raw)
        ));
    };
    let limit = if field == "messageId" {
        MAX_MESSAGE_ID_BYTES
    } else {
        MAX_ID_BYTES
    };
    match value {
        Some(v) if v.len() > limit => Err(format!("field `{field}` is longer than {limit} bytes")),
        other => Ok(other),
    }
}

fn time_value(field: &str, raw: &RawValue) -> Result<Option<Micros>, String> {
    if is_null(raw) {
        return Ok(None);
    }
    let Some(text) = string_of(raw) else {
        return Err(format!(
            "field `{field}` must be an ISO 8601 date-time string, got {}",
            describe(raw)
        ));
    };
    parse_timestamp(&text)
        .map(Some)
        .ok_or_else(|| format!("field `{field}` is not an ISO 8601 date-time: {text:?}"))
}

fn object_value(field: &str, raw: &RawValue) -> Result<Option<String>, String> {
    if is_null(raw) {
        return Ok(None);
    }
    if raw.get().starts_with('{') {
        return Ok(Some(raw.get().to_string()));
    }
    Err(format!(
        "field `{field}` must be a JSON object, got {}",
        describe(raw)
    ))
}

fn optional_time(field: &str, raw: Option<&RawValue>) -> Result<Option<Micros>, String> {
    raw.map_or(Ok(None), |raw| time_value(field, raw))
}

fn optional_object<'a>(field: &str, raw: Option<&'a RawValue>) -> Result<Option<&'a str>, String> {
    match raw {
        None => Ok(None),
        Some(raw) if is_null(raw) => Ok(None),
        Some(raw) if raw.get().starts_with('{') => Ok(Some(raw.get())),
        Some(raw) => Err(format!(
            "batch field `{field}` must be a JSON object, got {}",
            describe(raw)
        )),
    }
}

/// Names the JSON type of a value, for error messages.
fn describe(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const LIMITS: ParseLimits = ParseLimits {
        max_event_bytes: 32 * 1024,
        max_events: 100,
        max_event_members: 50,
    };

    #[test]
    fn batch_keeps_valid_events_and_reports_invalid_ones() {
        let body = br#"{
            "writeKey": "wk",
            "sentAt": "2024-01-01T00:00:10Z",
            "context": {"library": {"name": "analytics-python"}, "ip": "1.2.3.4"},
            "batch": [
                {"event": "Signed Up", "type": "track", "userId": 42, "messageId": "m1",
                 "properties": {"plan": "pro"}, "timestamp": "2024-01-01T00:00:00Z",
                 "context": {"ip": "5.6.7.8"}, "channel": "server"},
                {"type": "track", "userId": "u"},
                {"type": "identify", "anonymousId": "a", "traits": 3},
                "nope",
                {"type": "bogus", "userId": "u", "messageId": "m5"},
                {"type": "page", "anonymousId": "a", "name": "Home", "properties": {"path": "/"}}
            ]
        }"#;
        let parsed = parse_json(Route::Batch, body, &LIMITS).unwrap();
        assert_eq!(parsed.write_key.as_deref(), Some("wk"));
        assert_eq!(parsed.events.len(), 2);
        let first = &parsed.events[0];
        assert_eq!(first.user_id.as_deref(), Some("42"));
        assert_eq!(first.name.as_deref(), Some("Signed Up"));
        assert_eq!(first.sent_at, parse_timestamp("2024-01-01T00:00:10Z"));
        assert_eq!(
            first.extra,
            vec![("channel".to_string(), "\"server\"".to_string())]
        );
        // The event keeps its own context; the batch's is held once, beside the events.
        assert_eq!(first.context.as_deref(), Some(r#"{"ip": "5.6.7.8"}"#));
        let shared: serde_json::Value =
            serde_json::from_str(parsed.shared.context.as_deref().unwrap()).unwrap();
        assert_eq!(shared["ip"], "1.2.3.4");
        assert_eq!(shared["library"]["name"], "analytics-python");
        assert_eq!(parsed.events[1].name.as_deref(), Some("Home"));
        let indexes: Vec<usize> = parsed.rejected.iter().map(|r| r.index).collect();
        assert_eq!(indexes, vec![1, 2, 3, 4]);
        assert!(parsed.rejected[0].reason.contains("`event`"));
        assert!(parsed.rejected[1]
            .reason
            .contains("`traits` must be a JSON object"));
        assert!(parsed.rejected[2].reason.contains("not a JSON object"));
        assert_eq!(parsed.rejected[3].message_id.as_deref(), Some("m5"));
    }

    #[test]
    fn single_route_takes_type_from_the_route() {
        let body = br#"{"userId": "u", "event": "Clicked", "writeKey": "k", "sentAt": null}"#;
        let parsed = parse_json(Route::Single(EventKind::Track), body, &LIMITS).unwrap();
        assert_eq!(parsed.write_key.as_deref(), Some("k"));
        assert_eq!(parsed.events[0].kind, Some(EventKind::Track));
        let err = parse_json(Route::Single(EventKind::Track), b"[1]", &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "request body is not a JSON object (got an array)"
        );
    }

    #[test]
    fn malformed_bodies_say_where() {
        let err = parse_json(Route::Batch, b"{\"batch\": [1,", &LIMITS).unwrap_err();
        assert!(err.to_string().contains("line 1 column"), "{err}");
        let err = parse_json(Route::Batch, b"{}", &LIMITS).unwrap_err();
        assert!(err.to_string().contains("no `batch`"), "{err}");
        let err = parse_json(Route::Batch, &[0xff, 0xfe], &LIMITS).unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn limits_are_enforced() {
        let big = format!(
            r#"{{"batch":[{{"type":"track","userId":"u","event":"e","properties":{{"p":"{}"}}}}]}}"#,
            "x".repeat(40_000)
        );
        let parsed = parse_json(Route::Batch, big.as_bytes(), &LIMITS).unwrap();
        assert!(parsed.rejected[0].reason.contains("limit is 32768 bytes"));
        // The event's own size counts, measured as compact JSON.
        let event = format!(
            r#"{{"type":"track","userId":"u","event":"e","properties":{{"p":"{}"}}}}"#,
            "x".repeat(32_700)
        );
        assert!(event.len() <= 32_768);
        let body = format!(r#"{{"batch":[{event}, {}]}}"#, event.replace(':', " : "));
        let parsed = parse_json(Route::Batch, body.as_bytes(), &LIMITS).unwrap();
        assert_eq!(parsed.events.len(), 2, "{:?}", parsed.rejected);
        let over = event.replace("xxx", "xxxx");
        let body = format!(r#"{{"batch":[{over}]}}"#);
        let parsed = parse_json(Route::Batch, body.as_bytes(), &LIMITS).unwrap();
        let expected = format!("event is {} bytes as compact JSON", over.len());
        assert!(
            parsed.rejected[0].reason.starts_with(&expected),
            "{:?}",
            parsed.rejected
        );
        let many = format!(
            r#"{{"batch":[{}]}}"#,
            vec![r#"{"type":"track","userId":"u","event":"e"}"#; 101].join(",")
        );
        assert_too_many_events(&many, 101);
    }

    #[test]
    fn batch_envelope_fields_are_read_once() {
        let err = parse_json(Route::Batch, br#"{"batch": null}"#, &LIMITS).unwrap_err();
        assert!(err.to_string().contains("no `batch`"), "{err}");
        let body = br#"{"batch": [{"type":"track","userId":"u","event":"e"}], "batch": []}"#;
        let err = parse_json(Route::Batch, body, &LIMITS).unwrap_err();
        assert!(err.to_string().contains("duplicate field `batch`"), "{err}");
        let err = parse_json(Route::Batch, br#"{"batch": {}}"#, &LIMITS).unwrap_err();
        assert!(err.to_string().contains("expected a sequence"), "{err}");
        let err = parse_json(Route::Batch, br#"{"batch": []} x"#, &LIMITS).unwrap_err();
        assert!(err.to_string().contains("trailing characters"), "{err}");
        // Batch-level fields after the array still apply to its events; others are ignored.
        let body = br#"{"batch": [{"type":"track","userId":"u","event":"e"}],
                        "other": {"deep": [1, 2]}, "writeKey": "wk",
                        "sentAt": "2024-01-01T00:00:10Z"}"#;
        let parsed = parse_json(Route::Batch, body, &LIMITS).unwrap();
        assert_eq!(parsed.write_key.as_deref(), Some("wk"));
        assert_eq!(
            parsed.events[0].sent_at,
            parse_timestamp("2024-01-01T00:00:10Z")
        );
    }

    #[test]
    fn an_item_the_one_pass_read_cannot_take_costs_only_itself() {
        let valid = r#"{"type":"track","userId":"u","event":"e"}"#;
        for bad in [r#"{"\ud800":1}"#, "1e999"] {
            let body = format!(r#"{{"batch": [{valid}, {bad}, {valid}], "writeKey": "wk"}}"#);
            let parsed = parse_json(Route::Batch, body.as_bytes(), &LIMITS).unwrap();
            assert_eq!(parsed.events.len(), 2, "{bad}");
            assert_eq!(parsed.write_key.as_deref(), Some("wk"));
            let indexes: Vec<usize> = parsed.rejected.iter().map(|r| r.index).collect();
            assert_eq!(indexes, [1], "{bad}");
            assert!(
                parsed.rejected[0].reason.starts_with("not a JSON object"),
                "{bad}"
            );
        }
        // The slower read also counts the items against the limit.
        let many = format!(r#"{{"batch":[{}, 1e999]}}"#, vec![valid; 100].join(","));
        assert_too_many_events(&many, 101);
    }

    fn assert_too_many_events(body: &str, count: usize) {
        assert_eq!(
            parse_json(Route::Batch, body.as_bytes(), &LIMITS).unwrap_err(),
            ParseError::TooManyEvents { count, limit: 100 }
        );
    }

    #[test]
    fn items_that_are_not_objects_say_what_they_are() {
        let body = br#"{"batch": [[{"type": "track"}], 7, null, {"type":"track","userId":"u","event":"e"}]}"#;
        let parsed = parse_json(Route::Batch, body, &LIMITS).unwrap();
        let reasons: Vec<&str> = parsed.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "not a JSON object (got an array)",
                "not a JSON object (got a number)",
                "not a JSON object (got null)"
            ]
        );
        assert_eq!(parsed.events.len(), 1);
    }

    #[test]
    fn strings_with_and_without_escapes() {
        let raw = |text: &str| serde_json::value::RawValue::from_string(text.to_string()).unwrap();
        let read = |text: &str| string_value("event", &raw(text));
        assert_eq!(read(r#""Signed Up""#), Ok(Some("Signed Up".to_string())));
        assert_eq!(
            read(r#""a\"b\u00e9\\""#),
            Ok(Some("a\"b\u{e9}\\".to_string()))
        );
        assert_eq!(read(r#""""#), Ok(None));
        assert_eq!(read("null"), Ok(None));
        let err = read("12").unwrap_err();
        assert!(err.contains("must be a string, got a number"), "{err}");
        let err = read(r#"{"a":"b"}"#).unwrap_err();
        assert!(err.contains("got an object"), "{err}");
        let time = time_value("timestamp", &raw(r#""2024-01-01T00:00:00\u005A""#));
        assert_eq!(time, Ok(parse_timestamp("2024-01-01T00:00:00Z")));
    }

    #[test]
    fn reserved_and_repeated_keys() {
        let body = br#"{"batch":[
            {"type":"track","userId":"u","event":"e","statsremote":{"seq":1}},
            {"type":"track","userId":"u","event":"e","channel":"a","channel":"b"}
        ]}"#;
        let parsed = parse_json(Route::Batch, body, &LIMITS).unwrap();
        assert!(
            parsed.rejected[0].reason.contains("reserved"),
            "{:?}",
            parsed.rejected
        );
        assert_eq!(parsed.events.len(), 1, "{:?}", parsed.rejected);
        assert_eq!(
            parsed.events[0].extra,
            vec![("channel".to_string(), "\"b\"".to_string())]
        );
    }

    #[test]
    fn batch_context_counts_towards_each_events_size_as_stored() {
        // Each event is small; the batch context alone is over half the limit.
        let context = format!(
            r#"{{"big": "{}", "library": {{"name": "x"}}}}"#,
            "c".repeat(20_000)
        );
        let event = |own: &str| format!(r#"{{"type":"track","userId":"u","event":"e"{own}}}"#);
        let body = format!(
            r#"{{"context": {context}, "batch": [{}, {}, {}]}}"#,
            event(""),
            event(&format!(
                r#","properties":{{"p":"{}"}}"#,
                "p".repeat(13_000)
            )),
            // Overriding `big` replaces the batch's 20 KB member.
            event(&format!(
                r#","context":{{"big":1}},"properties":{{"p":"{}"}}"#,
                "p".repeat(13_000)
            )),
        );
        let parsed = parse_json(Route::Batch, body.as_bytes(), &LIMITS).unwrap();
        let reasons: Vec<(usize, &str)> = parsed
            .rejected
            .iter()
            .map(|r| (r.index, r.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert_eq!(reasons[0].0, 1);
        assert!(
            reasons[0].1.contains("merged in; the limit is 32768 bytes"),
            "{reasons:?}"
        );
        assert_eq!(parsed.events.len(), 2);
        // The batch context is held once, not copied into the events.
        assert_eq!(parsed.events[0].context, None);
        assert_eq!(parsed.events[1].context.as_deref(), Some(r#"{"big":1}"#));
        assert!(parsed.shared.context.as_deref().unwrap().len() > 20_000);
    }

    #[test]
    fn members_are_capped_and_repeated_ones_cost_linear_time() {
        let members: String = (0..51).map(|i| format!(r#","k{i}":1"#)).collect();
        let body = format!(r#"{{"batch":[{{"type":"track","userId":"u","event":"e"{members}}}]}}"#);
        let parsed = parse_json(Route::Batch, body.as_bytes(), &LIMITS).unwrap();
        assert_eq!(
            parsed.rejected[0].reason,
            "event has 54 top-level members; the limit is 50"
        );
        // Many members within a large cap: the last of each repeated key wins.
        let limits = ParseLimits {
            max_event_members: 100_000,
            max_event_bytes: 4 << 20,
            ..LIMITS
        };
        let members: String = (0..60_000)
            .map(|i| format!(r#","k{}":{i}"#, i % 30_000))
            .collect();
        let body = format!(r#"{{"type":"track","userId":"u","event":"e"{members}}}"#);
        let parsed = parse_json(Route::Single(EventKind::Track), body.as_bytes(), &limits).unwrap();
        let extra = &parsed.events[0].extra;
        assert_eq!(extra.len(), 30_000);
        assert_eq!(extra[0], ("k0".to_string(), "30000".to_string()));
        assert_eq!(extra[29_999], ("k29999".to_string(), "59999".to_string()));
    }

    #[test]
    fn a_rejected_event_gives_a_few_reasons_however_many_members_are_bad() {
        let bad: String = (0..500).map(|_| r#","userId":{}"#).collect();
        let body = format!(r#"{{"batch":[{{"type":"track","event":"e"{bad}}}]}}"#);
        let parsed = parse_json(Route::Batch, body.as_bytes(), &LIMITS_WIDE).unwrap();
        let reason = &parsed.rejected[0].reason;
        assert_eq!(
            reason.matches("must be a string or a number").count(),
            MAX_REASONS
        );
        assert!(reason.ends_with("(and 497 more)"), "{reason}");
    }

    const LIMITS_WIDE: ParseLimits = ParseLimits {
        max_event_members: 1000,
        ..LIMITS
    };

    #[test]
    fn the_write_key_is_found_without_parsing_events() {
        let find = |route, ndjson, body: &str| find_write_key(route, ndjson, body.as_bytes());
        assert_eq!(
            find(
                Route::Batch,
                false,
                r#"{"batch":[{"writeKey":"e"}],"writeKey":"top"}"#
            ),
            Some(Some("top".into()))
        );
        assert_eq!(
            find(
                Route::Batch,
                false,
                r#"{"batch":[1,{"writeKey":5},{"writeKey":"e"}]}"#
            ),
            Some(Some("e".into()))
        );
        assert_eq!(
            find(Route::Batch, false, r#"{"batch":[{"type":"track"}]}"#),
            Some(None)
        );
        assert_eq!(
            find(
                Route::Single(EventKind::Track),
                false,
                r#"{"event":"x","writeKey":"k"}"#
            ),
            Some(Some("k".into()))
        );
        assert_eq!(
            find(Route::Batch, true, "{\"a\":1}\n{\"writeKey\":\"n\"}\n"),
            Some(Some("n".into()))
        );
        // Not readable: the full parse says why.
        assert_eq!(find(Route::Batch, false, r#"{"batch":[1,"#), None);
        assert_eq!(find(Route::Batch, false, r#"{"batch": "x"}"#), None);
    }

    #[test]
    fn ndjson_lines_are_events() {
        let body = b"{\"type\":\"track\",\"userId\":\"u\",\"event\":\"a\"}\r\n\n{oops\n{\"type\":\"identify\",\"userId\":\"u\"}\n[1]\n";
        let parsed = parse_ndjson(body, &LIMITS).unwrap();
        assert_eq!(parsed.events.len(), 2);
        let reasons: Vec<(usize, &str)> = parsed
            .rejected
            .iter()
            .map(|r| (r.index, r.reason.as_str()))
            .collect();
        assert_eq!(reasons[0].0, 1);
        assert!(
            reasons[0].1.starts_with("not a JSON object: "),
            "{reasons:?}"
        );
        assert_eq!(reasons[1], (3, "not a JSON object (got an array)"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_json(Route::Batch, &bytes, &LIMITS);
            let _ = parse_json(Route::Single(EventKind::Page), &bytes, &LIMITS);
            let _ = parse_ndjson(&bytes, &LIMITS);
        }

        #[test]
        fn arbitrary_json_shapes_never_panic(text in r#"\{"batch":\[(\{("[a-zA-Z]{1,10}":("[^"\\]{0,8}"|[0-9]{1,3}|null|true|\{\}|\[\]),?){0,6}\},?){0,4}\]\}"#) {
            let _ = parse_json(Route::Batch, text.as_bytes(), &LIMITS);
        }

        #[test]
        fn valid_events_round_trip(user in "[a-zA-Z0-9_-]{1,20}", name in "[a-zA-Z ]{1,30}",
                                   id in "[a-f0-9]{8,32}", n in 0u32..1000) {
            let body = serde_json::json!({"batch": [{
                "type": "track", "userId": user, "event": name, "messageId": id,
                "properties": {"n": n}, "timestamp": "2024-05-06T07:08:09.123Z"
            }]}).to_string();
            let parsed = parse_json(Route::Batch, body.as_bytes(), &LIMITS).unwrap();
            prop_assert!(parsed.rejected.is_empty());
            let event = &parsed.events[0];
            prop_assert_eq!(event.user_id.as_deref(), Some(user.as_str()));
            prop_assert_eq!(event.name.as_deref(), Some(name.as_str()));
            prop_assert_eq!(event.message_id.as_deref(), Some(id.as_str()));
            let expected_properties = format!("{{\"n\":{n}}}");
            prop_assert_eq!(event.properties.as_deref(), Some(expected_properties.as_str()));
            prop_assert_eq!(event.timestamp, parse_timestamp("2024-05-06T07:08:09.123Z"));
        }
    }
}
