//! Realistic Segment batches, cheap to produce at full speed.
//!
//! A pool of batch templates is rendered once: Zipf-distributed event names, realistic
//! properties and context (about 300–600 bytes per event). Each event's `messageId` and
//! `userId` are fixed-width slots in the template; every request copies a template and writes a
//! unique id and random users into the slots, so no JSON is built on the hot path and every
//! event is distinct.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// Width of the request-id slot in a messageId (hex digits).
const ID_WIDTH: usize = 16;
/// Width of the user slot (hex digits).
const USER_WIDTH: usize = 8;

const PATHS: [&str; 6] = [
    "/",
    "/pricing",
    "/docs/getting-started",
    "/blog/launch-week",
    "/signup",
    "/settings/billing",
];
const REFERRERS: [&str; 4] = [
    "https://www.google.com/",
    "https://news.ycombinator.com/",
    "https://twitter.com/",
    "",
];
const PLANS: [&str; 3] = ["free", "team", "business"];
const AGENTS: [&str; 3] = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
];

/// One batch template and where its slots are.
pub(crate) struct Template {
    body: Vec<u8>,
    id_slots: Vec<usize>,
    user_slots: Vec<usize>,
}

/// Builds request bodies.
/// The body shape the load generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Protocol {
    /// Segment's `/v1/batch`.
    Segment,
    /// PostHog's `/batch/` (posthog-node's shape).
    Posthog,
}

impl Protocol {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Protocol::Segment => "/v1/batch",
            Protocol::Posthog => "/batch/",
        }
    }
}

pub(crate) struct Generator {
    pub(crate) protocol: Protocol,
    templates: Vec<Template>,
    pub(crate) batch_size: usize,
    pub(crate) users: u64,
    /// Average bytes per event (JSON).
    pub(crate) event_bytes: usize,
}

pub(crate) fn event_name(rank: usize) -> String {
    const BASE: [&str; 10] = [
        "Page Viewed",
        "Button Clicked",
        "Signed Up",
        "Logged In",
        "Searched",
        "Added To Cart",
        "Checkout Started",
        "Order Completed",
        "Invite Sent",
        "Settings Changed",
    ];
    match BASE.get(rank) {
        Some(name) => name.to_string(),
        None => format!("Feature {rank} Used"),
    }
}

/// Late events: a share of events carry a timestamp hours in the past.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Late {
    /// 0 to 100.
    pub(crate) percent: u32,
    pub(crate) max_hours: u32,
}

impl Generator {
    pub(crate) fn new(
        batch_size: usize,
        users: u64,
        event_names: usize,
        seed: u64,
        late: Late,
        protocol: Protocol,
    ) -> anyhow::Result<Generator> {
        let mut rng = StdRng::seed_from_u64(seed);
        let zipf = Zipf::new(event_names.max(1) as f64, 1.1)?;
        let templates: Vec<Template> = (0..32)
            .map(|_| template(&mut rng, &zipf, batch_size, late, protocol))
            .collect();
        let total: usize = templates.iter().map(|t| t.body.len()).sum();
        let event_bytes = total / (templates.len() * batch_size.max(1));
        Ok(Generator {
            protocol,
            templates,
            batch_size,
            users: users.max(1),
            event_bytes,
        })
    }

    /// Writes a request body into `out`: template `n`, unique `request_id`, random users.
    /// Records each user used into `users_seen`.
    pub(crate) fn fill(
        &self,
        out: &mut Vec<u8>,
        n: usize,
        request_id: u64,
        rng: &mut StdRng,
        users_seen: &mut UserSet,
    ) {
        let template = &self.templates[n % self.templates.len()];
        out.clear();
        out.extend_from_slice(&template.body);
        let id = format!("{request_id:0width$x}", width = ID_WIDTH);
        for slot in &template.id_slots {
            out[*slot..*slot + ID_WIDTH].copy_from_slice(id.as_bytes());
        }
        for slot in &template.user_slots {
            let user = rng.random_range(0..self.users);
            users_seen.insert(user);
            let text = format!("{user:0width$x}", width = USER_WIDTH);
            out[*slot..*slot + USER_WIDTH].copy_from_slice(text.as_bytes());
        }
    }
}

fn template(
    rng: &mut StdRng,
    zipf: &Zipf<f64>,
    batch_size: usize,
    late: Late,
    protocol: Protocol,
) -> Template {
    // The same events in either shape; the two slot keys differ.
    let (user_key, id_key) = match protocol {
        Protocol::Segment => ("userId", "messageId"),
        Protocol::Posthog => ("distinct_id", "uuid"),
    };
    let mut body = String::from("{\"batch\":[");
    let mut id_slots = Vec::with_capacity(batch_size);
    let mut user_slots = Vec::with_capacity(batch_size);
    for i in 0..batch_size {
        if i > 0 {
            body.push(',');
        }
        let rank = zipf.sample(rng) as usize - 1;
        let path = PATHS[rng.random_range(0..PATHS.len())];
        let event = serde_json::json!({
            "type": "track",
            "event": event_name(rank),
            "properties": {
                "path": path,
                "referrer": REFERRERS[rng.random_range(0..REFERRERS.len())],
                "title": format!("StatsRemote - {}", path.trim_start_matches('/')),
                "plan": PLANS[rng.random_range(0..PLANS.len())],
                "price": rng.random_range(0..50_000) as f64 / 100.0,
                "currency": "EUR",
                "items": rng.random_range(0..8),
                "experiment": format!("exp-{}", rng.random_range(0..20)),
            },
            "context": {
                "library": {"name": "analytics-node", "version": "2.1.0"},
                "userAgent": AGENTS[rng.random_range(0..AGENTS.len())],
                "locale": "en-GB",
                "page": {"path": path, "url": format!("https://app.example.com{path}")},
            },
        });
        let mut event = match protocol {
            Protocol::Segment => event,
            Protocol::Posthog => posthog_event(event),
        };
        if rng.random_range(0..100) < late.percent {
            let ago = rng.random_range(3600..=i64::from(late.max_hours) * 3600);
            event["timestamp"] = serde_json::Value::from(crate::dates::now_rfc3339(-ago));
        }
        let mut text = event.to_string();
        // Slots go in front of the generated fields; JSON key order does not matter.
        text.insert_str(
            1,
            &format!(
                "\"{user_key}\":\"user-{}\",\"{id_key}\":\"{}-{i:04}\",",
                "0".repeat(USER_WIDTH),
                "0".repeat(ID_WIDTH)
            ),
        );
        let start = body.len();
        user_slots.push(start + 1 + format!("\"{user_key}\":\"user-").len());
        id_slots.push(
            start
                + 1
                + format!(
                    "\"{user_key}\":\"user-{}\",\"{id_key}\":\"",
                    "0".repeat(USER_WIDTH)
                )
                .len(),
        );
        body.push_str(&text);
    }
    body.push_str("]}");
    Template {
        body: body.into_bytes(),
        id_slots,
        user_slots,
    }
}

/// A Segment track event as posthog-node sends it: the name in `event`, the context's facts
/// as `$` properties.
fn posthog_event(segment: serde_json::Value) -> serde_json::Value {
    let mut properties = segment["properties"].clone();
    let context = &segment["context"];
    if let Some(fields) = properties.as_object_mut() {
        fields.insert("$lib".into(), "posthog-node".into());
        fields.insert("$lib_version".into(), "5.74.0".into());
        fields.insert("$user_agent".into(), context["userAgent"].clone());
        fields.insert("$current_url".into(), context["page"]["url"].clone());
        fields.insert("$pathname".into(), context["page"]["path"].clone());
        fields.insert("$browser_language".into(), context["locale"].clone());
    }
    serde_json::json!({ "event": segment["event"], "properties": properties })
}

/// Which user numbers were sent in acknowledged requests (a bitset).
#[derive(Clone)]
pub(crate) struct UserSet(Vec<u64>);

impl UserSet {
    pub(crate) fn new(users: u64) -> UserSet {
        UserSet(vec![0; (users as usize).div_ceil(64)])
    }

    pub(crate) fn insert(&mut self, user: u64) {
        if let Some(word) = self.0.get_mut((user / 64) as usize) {
            *word |= 1 << (user % 64);
        }
    }

    pub(crate) fn merge(&mut self, other: &UserSet) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// A JSON Schema that every generated event's `properties` matches, close to a real tracking
/// plan's: each property typed, the enums and bounds the generator keeps to, the usual ones
/// required.
pub(crate) fn properties_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "path": {"type": "string", "pattern": "^/"},
            "referrer": {"type": "string", "maxLength": 2048},
            "title": {"type": "string", "maxLength": 512},
            "plan": {"type": "string", "enum": PLANS},
            "price": {"type": "number", "minimum": 0},
            "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
            "items": {"type": "integer", "minimum": 0, "maximum": 100},
            "experiment": {"type": "string"}
        },
        "required": ["path", "plan", "price", "currency"]
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn filled_bodies_are_valid_unique_batches() {
        let generator =
            Generator::new(50, 1000, 30, 1, Late::default(), Protocol::Segment).unwrap();
        let mut rng = StdRng::seed_from_u64(2);
        let mut users = UserSet::new(1000);
        let mut body = Vec::new();
        generator.fill(&mut body, 3, 0xabc, &mut rng, &mut users);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let batch = json["batch"].as_array().unwrap();
        assert_eq!(batch.len(), 50);
        assert_eq!(batch[7]["messageId"], format!("{:016x}-0007", 0xabc));
        assert!(batch[0]["userId"].as_str().unwrap().starts_with("user-"));
        assert!(users.len() > 0 && users.len() <= 50);
        assert!(
            (300..=700).contains(&generator.event_bytes),
            "{}",
            generator.event_bytes
        );
    }
}
