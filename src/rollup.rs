//! Rollup math: time buckets, per-bucket aggregates, and how a batch of events updates them.
//!
//! For every event, three resolutions (minute, hour, day, UTC) and two series (the event's
//! name, and `*` for all events) get `count += weight` and the user hash added to a HyperLogLog
//! sketch. A [`Deltas`] collects those updates in memory; they are merged into storage by the
//! rollup actor's flush (counts add up, sketches merge). Everything here is pure and tested
//! against brute force.
//!
//! Sketches are `cardinality-estimator`'s HyperLogLog++ at precision 16 for every resolution
//! (standard error ≈ 0.4%; exact-ish sparse representations for small sets), so sketches of
//! different resolutions can be merged to cover an arbitrary range.

use std::collections::HashMap;
use std::time::Duration;

use cardinality_estimator::CardinalityEstimator;

use crate::event::{EventKind, Micros, StoredEvent};

/// Distinct-user sketch.
pub type Sketch = CardinalityEstimator<u64, wyhash::WyHash, 16, 6>;

/// The series of all events. Empty, because no event can have an empty name (the parser treats
/// an empty `event`/`name` as missing), so no event's series can collide with it.
pub const ALL_EVENTS: &str = "";

const MICROS_PER_MINUTE: i64 = 60_000_000;
const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// Bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resolution {
    Minute,
    Hour,
    Day,
}

impl Resolution {
    pub const ALL: [Resolution; 3] = [Resolution::Minute, Resolution::Hour, Resolution::Day];

    pub fn width(self) -> i64 {
        match self {
            Resolution::Minute => MICROS_PER_MINUTE,
            Resolution::Hour => MICROS_PER_HOUR,
            Resolution::Day => MICROS_PER_DAY,
        }
    }

    /// Start of the bucket holding `at` (floor, also for times before 1970).
    pub fn bucket(self, at: Micros) -> Micros {
        at.div_euclid(self.width()) * self.width()
    }

    pub fn code(self) -> u8 {
        match self {
            Resolution::Minute => b'm',
            Resolution::Hour => b'h',
            Resolution::Day => b'd',
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Minute => "minute",
            Resolution::Hour => "hour",
            Resolution::Day => "day",
        }
    }

    pub fn parse(text: &str) -> Option<Resolution> {
        match text {
            "minute" => Some(Resolution::Minute),
            "hour" => Some(Resolution::Hour),
            "day" => Some(Resolution::Day),
            _ => None,
        }
    }
}

/// Name under which an event is rolled up: a track's event name; `$page`, `$screen`,
/// `$identify`, `$group`, `$alias` for the other calls.
pub fn rollup_name(event: &StoredEvent) -> &str {
    match event.kind {
        EventKind::Track => event.name.as_deref().unwrap_or("$track"),
        EventKind::Page => "$page",
        EventKind::Screen => "$screen",
        EventKind::Identify => "$identify",
        EventKind::Group => "$group",
        EventKind::Alias => "$alias",
    }
}

/// What rollups need of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupItem {
    pub name: String,
    pub timestamp: Micros,
    pub user_hash: u64,
    /// Events this one stands for (1 without sampling).
    pub weight: u64,
}

impl RollupItem {
    pub fn from_event(event: &StoredEvent) -> RollupItem {
        RollupItem {
            name: rollup_name(event).to_string(),
            timestamp: event.timestamp,
            user_hash: event.user_hash,
            weight: 1,
        }
    }
}

/// The durable events of one log entry, for the rollup actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupBatch {
    pub tenant: crate::tenant::TenantId,
    pub first_seq: u64,
    pub items: Vec<RollupItem>,
}

impl RollupBatch {
    pub fn last_seq(&self) -> u64 {
        crate::event::last_seq_of(self.first_seq, self.items.len())
    }
}

/// Identifies one bucket of one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub resolution: Resolution,
    pub name: String,
    pub start: Micros,
}

/// Aggregate of one bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BucketAgg {
    pub count: u64,
    pub users: Sketch,
}

impl BucketAgg {
    pub fn merge(&mut self, other: &BucketAgg) {
        self.count += other.count;
        self.users.merge(&other.users);
    }
}

/// How long each resolution is kept; events older than that skip the resolution.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub minute: Duration,
    pub hour: Duration,
    /// `None` = forever.
    pub day: Option<Duration>,
}

impl Retention {
    /// Oldest bucket start kept for `resolution` at `now`, if any limit applies.
    pub fn oldest(&self, resolution: Resolution, now: Micros) -> Option<Micros> {
        let keep = match resolution {
            Resolution::Minute => Some(self.minute),
            Resolution::Hour => Some(self.hour),
            Resolution::Day => self.day,
        }?;
        let keep = i64::try_from(keep.as_micros()).unwrap_or(i64::MAX);
        Some(resolution.bucket(now.saturating_sub(keep)))
    }
}

/// Unflushed updates.
#[derive(Debug, Default)]
pub struct Deltas {
    pub buckets: HashMap<BucketKey, BucketAgg>,
    /// Updates skipped because the bucket is past its resolution's retention, by resolution.
    pub skipped: [u64; 3],
}

impl Deltas {
    /// Adds a batch's items to every resolution and to the all-events series.
    pub fn apply(&mut self, items: &[RollupItem], retention: &Retention, now: Micros) {
        let oldest: Vec<Option<Micros>> = Resolution::ALL
            .iter()
            .map(|r| retention.oldest(*r, now))
            .collect();
        for item in items {
            for (index, resolution) in Resolution::ALL.iter().enumerate() {
                let start = resolution.bucket(item.timestamp);
                if oldest[index].is_some_and(|oldest| start < oldest) {
                    self.skipped[index] += item.weight;
                    continue;
                }
                for name in [item.name.as_str(), ALL_EVENTS] {
                    let key = BucketKey {
                        resolution: *resolution,
                        name: name.to_string(),
                        start,
                    };
                    let agg = self.buckets.entry(key).or_default();
                    agg.count += item.weight;
                    agg.users.insert_hash(item.user_hash);
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Sketch estimate as a count.
pub fn estimate(sketch: &Sketch) -> u64 {
    sketch.estimate() as u64
}

/// Splits `[from, to)` into the fewest whole buckets: days in the middle, hours and minutes at
/// the edges. `from` and `to` must be minute-aligned. Returns `(resolution, bucket start)`.
pub fn cover(from: Micros, to: Micros) -> Vec<(Resolution, Micros)> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let resolution = [Resolution::Day, Resolution::Hour, Resolution::Minute]
            .into_iter()
            .find(|r| r.bucket(at) == at && at + r.width() <= to)
            .unwrap_or(Resolution::Minute);
        out.push((resolution, at));
        at += resolution.width();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn item(name: &str, timestamp: Micros, user: u64) -> RollupItem {
        RollupItem {
            name: name.into(),
            timestamp,
            user_hash: crate::enrich::user_hash(&[1; 32], &user.to_string()),
            weight: 1,
        }
    }

    const FOREVER: Retention = Retention {
        minute: Duration::from_secs(u32::MAX as u64),
        hour: Duration::from_secs(u32::MAX as u64),
        day: None,
    };

    #[test]
    fn buckets_floor_in_utc_also_before_1970() {
        assert_eq!(Resolution::Minute.bucket(61_000_000), 60_000_000);
        assert_eq!(Resolution::Hour.bucket(-1), -MICROS_PER_HOUR);
        assert_eq!(Resolution::Day.bucket(MICROS_PER_DAY + 5), MICROS_PER_DAY);
    }

    #[test]
    fn cover_uses_the_coarsest_whole_buckets() {
        let day = MICROS_PER_DAY;
        let from = day - 2 * MICROS_PER_MINUTE; // 23:58 on day 0
        let to = 2 * day + MICROS_PER_HOUR + MICROS_PER_MINUTE; // 01:01 on day 2
        let parts = cover(from, to);
        let resolutions: Vec<Resolution> = parts.iter().map(|p| p.0).collect();
        assert_eq!(
            resolutions,
            vec![
                Resolution::Minute,
                Resolution::Minute,
                Resolution::Day,
                Resolution::Hour,
                Resolution::Minute
            ]
        );
        let total: i64 = parts.iter().map(|(r, _)| r.width()).sum();
        assert_eq!(total, to - from);
    }

    #[test]
    fn retention_skips_old_resolutions_but_not_days() {
        let now = 100 * MICROS_PER_DAY;
        let retention = Retention {
            minute: Duration::from_secs(7 * 86_400),
            hour: Duration::from_secs(90 * 86_400),
            day: None,
        };
        let mut deltas = Deltas::default();
        deltas.apply(&[item("old", 50 * MICROS_PER_DAY, 1)], &retention, now);
        assert_eq!(deltas.skipped, [1, 0, 0]);
        assert!(deltas
            .buckets
            .keys()
            .all(|k| k.resolution != Resolution::Minute));
        assert_eq!(deltas.buckets.len(), 4);
    }

    proptest! {
        #[test]
        fn counts_match_brute_force(events in proptest::collection::vec((0usize..4, 0i64..(3 * MICROS_PER_DAY), 0u64..50), 0..300)) {
            let names = ["a", "b", "c", "d"];
            let items: Vec<RollupItem> = events.iter().map(|(n, t, u)| item(names[*n], *t, *u)).collect();
            let mut deltas = Deltas::default();
            // Applied in two halves, merged like flushes are.
            let half = items.len() / 2;
            deltas.apply(&items[..half], &FOREVER, 0);
            let mut second = Deltas::default();
            second.apply(&items[half..], &FOREVER, 0);
            for (key, agg) in second.buckets {
                deltas.buckets.entry(key).or_default().merge(&agg);
            }
            for resolution in Resolution::ALL {
                for name in names.iter().copied().chain([ALL_EVENTS]) {
                    let mut expected: HashMap<Micros, (u64, std::collections::HashSet<u64>)> = HashMap::new();
                    for it in items.iter().filter(|it| name == ALL_EVENTS || it.name == name) {
                        let entry = expected.entry(resolution.bucket(it.timestamp)).or_default();
                        entry.0 += 1;
                        entry.1.insert(it.user_hash);
                    }
                    for (start, (count, users)) in expected {
                        let key = BucketKey { resolution, name: name.to_string(), start };
                        let agg = deltas.buckets.get(&key).unwrap();
                        prop_assert_eq!(agg.count, count);
                        // Small sets are counted exactly by the sparse representation.
                        prop_assert_eq!(estimate(&agg.users), users.len() as u64);
                    }
                }
            }
        }

        #[test]
        fn cover_tiles_the_range(from_min in 0i64..100_000, len_min in 0i64..100_000) {
            let from = from_min * MICROS_PER_MINUTE;
            let to = from + len_min * MICROS_PER_MINUTE;
            let parts = cover(from, to);
            let mut at = from;
            for (resolution, start) in parts {
                prop_assert_eq!(start, at);
                prop_assert_eq!(resolution.bucket(start), start);
                at += resolution.width();
            }
            prop_assert_eq!(at, to);
        }
    }

    #[test]
    fn uniques_at_100k_users_are_within_one_percent() {
        let mut sketch = Sketch::new();
        let users = 150_000u64;
        for user in 0..users {
            sketch.insert_hash(crate::enrich::user_hash(&[9; 32], &format!("user-{user}")));
        }
        let error = (estimate(&sketch) as f64 - users as f64).abs() / users as f64;
        assert!(error < 0.01, "relative error {error}");
    }
}
