//! Enrichment: what the server adds to every event before it is stored.
//!
//! - `received_at`, the server clock when the request arrived;
//! - `timestamp` corrected for client clock skew as Segment defines it:
//!   `receivedAt − (sentAt − originalTimestamp)` when `sentAt` is known, else the client's
//!   timestamp, else `receivedAt`; a result beyond the future tolerance is clamped to
//!   `receivedAt` and flagged ([`flags::CLAMPED_FUTURE`]);
//! - a per-tenant keyed BLAKE3 hash of the user (`userId`, else `anonymousId`), the identity used
//!   for unique-user counts without exposing ids;
//! - the SDK library name/version from `context.library`;
//! - a server-generated `messageId` (UUIDv4) when the client sent none.
//!
//! Per-request facts (endpoint, anonymised client IP, batch id) live on the
//! [`crate::event::LogBatch`]. Everything here is pure and allocation-light: strings move from
//! the incoming event, nothing is re-serialised.
//!
//! [`Derivers`] add what the event's context and address say, kept in the event's
//! [`crate::event::EventExtras`]: browser, OS and device type from the user agent ([`agent`]),
//! country, region and city from a GeoIP database ([`geo`], before the address is anonymised),
//! and the referrer's host and the campaign ([`web`]).

pub mod agent;
pub mod geo;
pub mod web;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::event::{
    duration_micros, flags, BatchShared, EventKind, IncomingEvent, Micros, StoredEvent,
};
use crate::json::{MemberKey, Members};

/// What enrichment needs to know about the request and the tenant.
pub struct EnrichContext<'a> {
    pub received_at: Micros,
    pub future_tolerance: Duration,
    pub user_hash_key: &'a [u8; 32],
    /// `library` of the batch-level context, for events whose own context names none.
    pub batch_library: &'a LibraryInfo,
}

/// Enriches what a batch sent once for all its events: its `context.ip` is anonymised like an
/// event's own, and its `context.library` returned for the events that name none.
pub fn enrich_shared(shared: BatchShared) -> (BatchShared, LibraryInfo) {
    let BatchShared {
        context,
        integrations,
    } = shared;
    let (context, library) = match context {
        Some(text) => {
            let (text, library) = read_context(text);
            (Some(text), library)
        }
        None => (None, (None, None)),
    };
    (
        BatchShared {
            context,
            integrations,
        },
        library,
    )
}

/// What enrichment derives from contexts and addresses (`[enrich]`).
pub struct Derivers {
    pub user_agent: bool,
    pub campaign: bool,
    pub geo: Option<geo::GeoDatabase>,
}

impl Derivers {
    /// Derives nothing.
    pub fn off() -> Derivers {
        Derivers {
            user_agent: false,
            campaign: false,
            geo: None,
        }
    }

    /// Nothing to derive: contexts are not read.
    pub fn is_off(&self) -> bool {
        !self.user_agent && !self.campaign && self.geo.is_none()
    }

    /// The derived fields of each event as a JSON object's text (`None`: nothing derived), or
    /// no list at all when nothing was derived for any. Each event's own context wins, member
    /// by member, over the batch's `shared` one; `peer` is the request's client address (not
    /// anonymised), the fallback for `context.ip`.
    pub fn derive_all(
        &self,
        events: &[IncomingEvent],
        shared: &BatchShared,
        peer: Option<IpAddr>,
    ) -> Vec<Option<String>> {
        if self.is_off() {
            return Vec::new();
        }
        let batch = shared.context.as_deref().map(web::read).unwrap_or_default();
        // The agents of this batch: most batches come from one or a few.
        let mut agents: Vec<(String, Arc<agent::Agent>)> = Vec::new();
        let derived: Vec<Option<String>> = events
            .iter()
            .map(|event| {
                let own = event.context.as_deref().map(web::read).unwrap_or_default();
                let text = own.user_agent.as_deref().or(batch.user_agent.as_deref());
                let agent = match text.filter(|_| self.user_agent) {
                    None => None,
                    Some(text) => match agents.iter().find(|(seen, _)| seen == text) {
                        Some((_, agent)) => Some(Arc::clone(agent)),
                        None => {
                            let parsed = agent::parse(text);
                            if let (Some(parsed), true) = (&parsed, agents.len() < 8) {
                                agents.push((text.to_string(), Arc::clone(parsed)));
                            }
                            parsed
                        }
                    },
                };
                let place = match (&self.geo, own.ip.or(batch.ip).or(peer)) {
                    (Some(database), Some(ip)) => database.place(ip),
                    _ => geo::Place::default(),
                };
                let campaign = if self.campaign {
                    own.campaign.or(&batch.campaign)
                } else {
                    web::Campaign::default()
                };
                derived_json(agent.as_deref(), &place, &campaign)
            })
            .collect();
        if derived.iter().any(Option::is_some) {
            derived
        } else {
            Vec::new()
        }
    }
}

/// The derived fields as one JSON object's text, or `None` when there are none.
fn derived_json(
    agent: Option<&agent::Agent>,
    place: &geo::Place,
    campaign: &web::Campaign,
) -> Option<String> {
    let mut parts: Vec<Cow<'_, str>> = Vec::with_capacity(3);
    if let Some(agent) = agent.filter(|a| !a.members.is_empty()) {
        parts.push(Cow::Borrowed(agent.members.as_str()));
    }
    if !place.is_empty() {
        parts.push(crate::json::object_members(place).into());
    }
    if !campaign.is_empty() {
        parts.push(crate::json::object_members(campaign).into());
    }
    if parts.is_empty() {
        return None;
    }
    Some(format!("{{{}}}", parts.join(",")))
}

/// Enriches every event of a request.
pub fn enrich_all(events: Vec<IncomingEvent>, context: &EnrichContext<'_>) -> Vec<StoredEvent> {
    events.into_iter().map(|e| enrich(e, context)).collect()
}

/// Enriches one event.
pub fn enrich(event: IncomingEvent, context: &EnrichContext<'_>) -> StoredEvent {
    let mut event_flags = 0u8;
    let message_id = match event.message_id {
        Some(id) => id,
        None => {
            event_flags |= flags::GENERATED_ID;
            uuid::Uuid::new_v4().to_string()
        }
    };
    let mut timestamp = corrected_timestamp(event.timestamp, event.sent_at, context.received_at);
    let tolerance = duration_micros(context.future_tolerance);
    if timestamp > context.received_at.saturating_add(tolerance) {
        timestamp = context.received_at;
        event_flags |= flags::CLAMPED_FUTURE;
    }
    let identity = event
        .user_id
        .as_deref()
        .or(event.anonymous_id.as_deref())
        .unwrap_or("");
    let user_hash = user_hash(context.user_hash_key, identity);
    let (event_context, library) = match event.context {
        Some(text) => {
            let (text, library) = read_context(text);
            (Some(text), library)
        }
        None => (None, (None, None)),
    };
    let (library_name, library_version) = match library {
        (None, None) => context.batch_library.clone(),
        own => own,
    };
    StoredEvent {
        kind: event.kind.unwrap_or(EventKind::Track),
        message_id,
        name: event.name,
        user_id: event.user_id,
        anonymous_id: event.anonymous_id,
        group_id: event.group_id,
        previous_id: event.previous_id,
        timestamp,
        original_timestamp: event.timestamp,
        sent_at: event.sent_at,
        received_at: context.received_at,
        user_hash,
        library_name,
        library_version,
        flags: event_flags,
        properties: event.properties,
        traits: event.traits,
        context: event_context,
        integrations: event.integrations,
        extra: event.extra,
    }
}

/// Segment's clock-skew correction.
pub fn corrected_timestamp(
    timestamp: Option<Micros>,
    sent_at: Option<Micros>,
    received_at: Micros,
) -> Micros {
    match (timestamp, sent_at) {
        (Some(timestamp), Some(sent_at)) => {
            received_at.saturating_sub(sent_at.saturating_sub(timestamp))
        }
        (Some(timestamp), None) => timestamp,
        (None, _) => received_at,
    }
}

/// Keyed hash of a user identity: stable per tenant, meaningless across tenants.
pub fn user_hash(key: &[u8; 32], identity: &str) -> u64 {
    let hash = blake3::keyed_hash(key, identity.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

#[derive(Deserialize)]
struct Library {
    name: Option<String>,
    version: Option<String>,
}

/// The SDK library's name and version.
pub type LibraryInfo = (Option<String>, Option<String>);

/// The context as stored (with `ip` anonymised) and `context.library.{name,version}` if they are
/// strings, reading the context once.
///
/// `context.ip` (server-side SDKs forward the end user's address there) is anonymised the same
/// way as the peer address; a value that is not an IP address is dropped. Only that member
/// changes: the others are written back as the client sent them, in their order (a parsed
/// `Value` would reorder the keys and turn integers past u64 into floats). Contexts without an
/// `ip` key are returned untouched.
fn read_context(context: String) -> (String, LibraryInfo) {
    if !context.contains("\"ip\"") {
        let library = library_of(&context);
        return (context, library);
    }
    let Ok(Members(members)) = serde_json::from_str::<Members>(&context) else {
        return (context, (None, None));
    };
    // Like `library_of`: the first `library` member counts.
    let library = members
        .iter()
        .find(|(key, _)| key == "library")
        .map_or((None, None), |(_, value)| library_in(value.get()));
    if !members.iter().any(|(key, _)| key == "ip") {
        return (context, library); // Only nested objects have an "ip".
    }
    let mut out = String::with_capacity(context.len());
    for (key, value) in &members {
        let anonymized;
        let value = if key == "ip" {
            let ip = serde_json::from_str::<String>(value.get())
                .ok()
                .and_then(|text| text.trim().parse::<IpAddr>().ok());
            let Some(ip) = ip else {
                continue;
            };
            anonymized = serde_json::Value::String(anonymize_ip(ip)).to_string();
            anonymized.as_str()
        } else {
            value.get()
        };
        out.push(if out.is_empty() { '{' } else { ',' });
        out.push_str(&serde_json::Value::String(key.to_string()).to_string());
        out.push(':');
        out.push_str(value);
    }
    if out.is_empty() {
        out.push('{');
    }
    out.push('}');
    (out, library)
}

/// `context.library.{name,version}` of the first `library` member, if they are strings. The
/// members after it are not read: the parser has already checked that the whole context is
/// valid JSON, and reading the rest would be most of the cost of enrichment
/// (docs/decisions/0020).
fn library_of(context_json: &str) -> LibraryInfo {
    struct FirstLibrary<'s>(&'s mut LibraryInfo);
    impl<'de> Visitor<'de> for FirstLibrary<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(MemberKey(key)) = map.next_key()? {
                if key == "library" {
                    if let Some(library) = map.next_value::<Option<Library>>()? {
                        *self.0 = (library.name, library.version);
                    }
                    // Returning before the end of the object makes the deserializer report
                    // an error, which the caller ignores: the library is already stored.
                    return Ok(());
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }
    let mut library = (None, None);
    let mut deserializer = serde_json::Deserializer::from_str(context_json);
    let _ = deserializer.deserialize_map(FirstLibrary(&mut library));
    library
}

/// `{name, version}` of a `context.library` value, if they are strings.
fn library_in(library_json: &str) -> LibraryInfo {
    match serde_json::from_str::<Option<Library>>(library_json) {
        Ok(Some(library)) => (library.name, library.version),
        _ => (None, None),
    }
}

/// The client IP with the host part zeroed: IPv4 keeps /24, IPv6 keeps /48.
pub fn anonymize_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            std::net::Ipv4Addr::new(a, b, c, 0).to_string()
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return anonymize_ip(IpAddr::V4(v4));
            }
            let mut segments = v6.segments();
            for segment in segments.iter_mut().skip(3) {
                *segment = 0;
            }
            std::net::Ipv6Addr::from(segments).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn context(received_at: Micros) -> EnrichContext<'static> {
        EnrichContext {
            received_at,
            future_tolerance: Duration::from_secs(3600),
            user_hash_key: &KEY,
            batch_library: &(None, None),
        }
    }

    #[test]
    fn the_batch_context_is_anonymised_once_and_names_the_library_of_events_without_one() {
        let (shared, library) = enrich_shared(BatchShared {
            context: Some(
                r#"{"ip":"1.2.3.4","library":{"name":"batch-lib","version":"1"}}"#.into(),
            ),
            integrations: Some(r#"{"All":true}"#.into()),
        });
        assert_eq!(
            shared.context.as_deref(),
            Some(r#"{"ip":"1.2.3.0","library":{"name":"batch-lib","version":"1"}}"#)
        );
        assert_eq!(library, (Some("batch-lib".into()), Some("1".into())));
        let mut context = self::context(0);
        context.batch_library = &library;
        let plain = IncomingEvent {
            user_id: Some("u".into()),
            ..IncomingEvent::default()
        };
        let own = IncomingEvent {
            context: Some(r#"{"library":{"name":"own"}}"#.into()),
            ..plain.clone()
        };
        assert_eq!(
            enrich(plain, &context).library_name.as_deref(),
            Some("batch-lib")
        );
        assert_eq!(enrich(own, &context).library_name.as_deref(), Some("own"));
    }

    #[test]
    fn clock_skew_is_corrected_as_segment_defines_it() {
        // Client clock 10 s ahead: event at client 1000 s, sent at client 1005 s, received 995 s.
        let at = corrected_timestamp(Some(1_000_000_000), Some(1_005_000_000), 995_000_000);
        assert_eq!(at, 990_000_000);
        assert_eq!(corrected_timestamp(Some(5), None, 9), 5);
        assert_eq!(corrected_timestamp(None, Some(5), 9), 9);
    }

    #[test]
    fn far_future_timestamps_are_clamped_and_flagged() {
        let now = 1_000_000_000_000;
        let event = IncomingEvent {
            kind: Some(EventKind::Track),
            name: Some("x".into()),
            user_id: Some("u".into()),
            timestamp: Some(now + 2 * 3_600_000_000),
            ..IncomingEvent::default()
        };
        let stored = enrich(event, &context(now));
        assert_eq!(stored.timestamp, now);
        assert_eq!(stored.original_timestamp, Some(now + 2 * 3_600_000_000));
        assert!(stored.flags & flags::CLAMPED_FUTURE != 0);
        assert!(stored.flags & flags::GENERATED_ID != 0);
        assert_eq!(stored.message_id.len(), 36);
    }

    #[test]
    fn user_hash_prefers_user_id_and_is_keyed() {
        let event = IncomingEvent {
            user_id: Some("alice".into()),
            anonymous_id: Some("anon".into()),
            context: Some(
                r#"{"library":{"name":"analytics-node","version":"1.2.3"},"ip":"1.2.3.4"}"#.into(),
            ),
            ..IncomingEvent::default()
        };
        let stored = enrich(event, &context(1));
        assert_eq!(stored.user_hash, user_hash(&KEY, "alice"));
        assert_ne!(user_hash(&KEY, "alice"), user_hash(&[8; 32], "alice"));
        assert_eq!(stored.library_name.as_deref(), Some("analytics-node"));
        let context: serde_json::Value =
            serde_json::from_str(stored.context.as_deref().unwrap_or("")).unwrap_or_default();
        assert_eq!(context["ip"], "1.2.3.0", "context.ip is anonymised");
        assert_eq!(
            read_context_text(r#"{"ip":"not an ip","a":1}"#.into()),
            r#"{"a":1}"#
        );
        assert_eq!(read_context_text(r#"{"a":1}"#.into()), r#"{"a":1}"#);
        // Only the ip changes: key order, big integers and number text stay as sent.
        assert_eq!(
            read_context_text(
                r#"{"z":1,"ip":"1.2.3.4","big":123456789012345678901234567890,"f":1.10,"page":{"b":2,"a":1}}"#.into()
            ),
            r#"{"z":1,"ip":"1.2.3.0","big":123456789012345678901234567890,"f":1.10,"page":{"b":2,"a":1}}"#
        );
        assert_eq!(read_context_text(r#"{"ip":7}"#.into()), "{}");
        assert_eq!(
            read_context_text(r#"{"page":{"ip":"1.2.3.4"}}"#.into()),
            r#"{"page":{"ip":"1.2.3.4"}}"#,
            "only the top-level ip is the end user's"
        );
        assert_eq!(
            read_context_text(r#"{"k\"ey":"v","ip":"2001:db8:1:2::5"}"#.into()),
            r#"{"k\"ey":"v","ip":"2001:db8:1::"}"#
        );
        assert_eq!(stored.library_version.as_deref(), Some("1.2.3"));
    }

    fn read_context_text(context: String) -> String {
        read_context(context).0
    }

    #[test]
    fn library_is_read_alongside_the_ip() {
        let library = |context: &str| read_context(context.to_string()).1;
        let expected = (Some("n".to_string()), Some("1".to_string()));
        for context in [
            r#"{"library":{"name":"n","version":"1"}}"#,
            r#"{"library":{"name":"n","version":"1"},"ip":"1.2.3.4"}"#,
            r#"{"ip":"1.2.3.4","page":{"ip":"x"},"library":{"version":"1","name":"n"}}"#,
        ] {
            assert_eq!(library(context), expected, "{context}");
        }
        // Whatever follows the first `library` is not read (here, the text is cut short).
        let cut = r#"{"library":{"name":"n","version":"1"},"page":{"path":"/"#;
        assert_eq!(library_of(cut), expected);
        // The first `library` counts.
        for context in [
            r#"{"library":{"name":"n","version":"1"},"library":{"name":"m"},"ip":"1.2.3.4"}"#,
            r#"{"library":{"name":"n","version":"1"},"library":{"name":"m"}}"#,
            r#"{"a":[{"library":{"name":"m"}}],"library":{"name":"n","version":"1"},"b":{}}"#,
        ] {
            assert_eq!(library(context), expected, "{context}");
            assert_eq!(library_of(context), expected, "{context}");
        }
        for context in [
            r#"{"library":"n","ip":"1.2.3.4"}"#,
            r#"{"library":{"name":1},"ip":"1.2.3.4"}"#,
            r#"{"library":null,"ip":"1.2.3.4"}"#,
            r#"{"page":{"library":{"name":"n"}}}"#,
            "{}",
        ] {
            assert_eq!(library(context), library_of(context), "{context}");
            assert_eq!(library(context).0, None, "{context}");
        }
    }

    proptest::proptest! {
        /// What a client sent survives parsing, enrichment and the log encoding unchanged.
        #[test]
        fn parsed_events_round_trip_through_enrichment_and_the_log(
            user in "[a-zA-Z0-9_@.-]{1,30}",
            name in "[a-zA-Z0-9 ]{1,40}",
            id in "[a-f0-9-]{8,36}",
            n in 0u32..100_000,
            tag in "[a-z]{0,10}",
            skew_ms in -100_000i64..100_000,
        ) {
            use crate::http::segment::{parse_json, ParseLimits, Route};
            let body = serde_json::json!({
                "sentAt": "2026-03-01T00:00:10.000Z",
                "batch": [{
                    "type": "track", "userId": user, "event": name, "messageId": id,
                    "properties": {"n": n, "tag": tag}, "context": {"locale": "en-GB"},
                    "timestamp": "2026-03-01T00:00:00.000Z", "channel": "server",
                }]
            })
            .to_string();
            let limits = ParseLimits { max_event_bytes: 64 * 1024, max_events: 10, max_event_members: 100 };
            let parsed = parse_json(Route::Batch, body.as_bytes(), &limits).unwrap();
            let received_at = crate::event::parse_timestamp("2026-03-01T00:00:10.000Z").unwrap() + skew_ms * 1000;
            let context = EnrichContext { received_at, future_tolerance: Duration::from_secs(3600), user_hash_key: &KEY, batch_library: &(None, None) };
            let events = enrich_all(parsed.events, &context);
            let batch = crate::event::LogBatch {
                batch_id: 9,
                received_at,
                source: crate::event::BatchSource { endpoint: "/v1/batch".into(), client_ip: None },
                events,
                shared: Default::default(),
                extras: Vec::new(),
            };
            let decoded: crate::event::LogBatch =
                crate::storage::codec::decode(&crate::storage::codec::encode(&batch).unwrap()).unwrap();
            proptest::prop_assert_eq!(&decoded, &batch);
            let event = &decoded.events[0];
            proptest::prop_assert_eq!(event.user_id.as_deref(), Some(user.as_str()));
            proptest::prop_assert_eq!(event.name.as_deref(), Some(name.as_str()));
            proptest::prop_assert_eq!(event.message_id.as_str(), id.as_str());
            proptest::prop_assert_eq!(event.user_hash, user_hash(&KEY, &user));
            // The client's clock was 10 s ahead of sentAt: timestamp = receivedAt - 10 s.
            proptest::prop_assert_eq!(event.timestamp, received_at - 10_000_000);
            let properties: serde_json::Value = serde_json::from_str(event.properties.as_deref().unwrap()).unwrap();
            proptest::prop_assert_eq!(properties, serde_json::json!({"n": n, "tag": tag}));
            proptest::prop_assert_eq!(&event.extra, &vec![("channel".to_string(), "\"server\"".to_string())]);
        }
    }

    #[test]
    fn ips_are_anonymised() {
        assert_eq!(
            anonymize_ip("203.0.113.77".parse().unwrap_or(IpAddr::from([0; 4]))),
            "203.0.113.0"
        );
        assert_eq!(
            anonymize_ip(
                "2001:db8:abcd:12::1"
                    .parse()
                    .unwrap_or(IpAddr::from([0; 4]))
            ),
            "2001:db8:abcd::"
        );
    }
}
