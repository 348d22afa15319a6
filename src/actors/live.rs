//! The live hub: per-tenant counts of the current second and minute, pushed to WebSocket
//! subscribers.
//!
//! Fed by the rollup actor with every durable batch. Every `live.tick_interval` (aligned to the
//! second) it publishes a [`LiveTick`]: the second that just ended and the minute it belongs to,
//! with count and distinct users per event and in total, by event time. Ticks go out through a
//! `tokio::sync::watch` channel: each subscriber reads the latest tick when it is ready for one,
//! so a slow subscriber skips ticks (coalescing, counted in a metric) instead of queueing them,
//! and the hub's cost does not depend on the number of subscribers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, StreamHandler};
use cardinality_estimator::CardinalityEstimator;
use serde::Serialize;
use tokio::sync::watch;

use crate::actors::child::ChildActor;
use crate::event::{format_timestamp, now_micros, Micros};
use crate::rollup::{ByName, RollupItem, RollupItems};
use crate::sampling;

const SECOND: Micros = 1_000_000;
const MINUTE: Micros = 60 * SECOND;

/// Live counts need less precision than rollups (standard error ≈ 1.6%).
type LiveSketch = CardinalityEstimator<u64, wyhash::WyHash, 12, 6>;

/// Count and distinct users.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stat {
    pub count: u64,
    pub uniques: u64,
}

/// One window of a tick.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Window {
    pub start: String,
    pub total: Stat,
    pub events: BTreeMap<String, Stat>,
}

impl Window {
    /// The same window restricted to some events (the total is kept).
    pub fn only(&self, events: &std::collections::HashSet<String>) -> Window {
        Window {
            start: self.start.clone(),
            total: self.total,
            events: self
                .events
                .iter()
                .filter(|(name, _)| events.contains(*name))
                .map(|(name, stat)| (name.clone(), *stat))
                .collect(),
        }
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveTick {
    /// Increases by one per tick; a subscriber seeing a jump knows ticks were coalesced.
    pub seq: u64,
    pub ts: String,
    pub second: Window,
    pub minute: Window,
    /// The tick as JSON, rendered once by the hub for every unfiltered subscriber.
    #[serde(skip)]
    pub json: Arc<str>,
}

/// The channel ticks are published on; subscribers call `subscribe()`.
pub type TickSender = Arc<watch::Sender<Arc<LiveTick>>>;

pub fn tick_channel() -> TickSender {
    Arc::new(watch::channel(Arc::new(LiveTick::default())).0)
}

/// Durable events for the live counters.
pub struct LiveItems(pub Arc<RollupItems>);

#[derive(Default)]
struct Agg {
    /// Weighted: each kept event adds its weight.
    count: u64,
    /// Users of the unsampled events.
    users: LiveSketch,
    /// Users of the sampled events, by weight (see `crate::sampling`).
    sampled: Vec<(u32, LiveSketch)>,
}

impl Agg {
    fn add(&mut self, item: &RollupItem) {
        self.count += item.weight;
        if item.weight <= 1 {
            self.users.insert_hash(item.user_hash);
            return;
        }
        let weight = u32::try_from(item.weight).unwrap_or(u32::MAX);
        match self.sampled.iter_mut().find(|(w, _)| *w == weight) {
            Some((_, users)) => users.insert_hash(item.user_hash),
            None => {
                let mut users = LiveSketch::new();
                users.insert_hash(item.user_hash);
                self.sampled.push((weight, users));
            }
        }
    }

    /// Distinct users, scaled where events were sampled.
    fn uniques(&self) -> u64 {
        if self.sampled.is_empty() {
            return self.users.estimate() as u64;
        }
        let levels: Vec<(u32, &LiveSketch)> = self.sampled.iter().map(|(w, s)| (*w, s)).collect();
        sampling::estimate_users(Some(&self.users), &levels).rounded()
    }
}

impl sampling::UserSet for LiveSketch {
    fn union_with(&mut self, other: &Self) {
        self.merge(other);
    }
    fn estimate_size(&self) -> f64 {
        self.estimate() as f64
    }
}

/// Per-event aggregates of one time bucket.
#[derive(Default)]
struct Bucket {
    total: Agg,
    events: ByName<Agg>,
}

impl Bucket {
    fn window(&self, start: Micros) -> Window {
        let stat = |agg: &Agg| Stat {
            count: agg.count,
            uniques: agg.uniques(),
        };
        Window {
            start: format_timestamp(start),
            total: stat(&self.total),
            events: self
                .events
                .iter()
                .map(|(name, agg)| (name.to_string(), stat(agg)))
                .collect(),
        }
    }
}

/// Where each of a batch's event names sits in the bucket it was last looked up in: the items of
/// a batch mostly share a second and a minute, so each name is looked up about once per batch.
struct Resolved {
    /// By the batch's name index: the bucket and the position in its `events`.
    slots: Vec<Option<(Micros, usize)>>,
}

impl Resolved {
    fn new(names: usize) -> Resolved {
        Resolved {
            slots: vec![None; names],
        }
    }

    fn add(
        &mut self,
        buckets: &mut BTreeMap<Micros, Bucket>,
        start: Micros,
        batch: &RollupItems,
        item: &RollupItem,
    ) {
        let bucket = buckets.entry(start).or_default();
        bucket.total.add(item);
        let cached = self.slots.get_mut(item.name as usize);
        let slot = match cached {
            Some(Some((at, slot))) if *at == start => *slot,
            Some(cached) => {
                let slot = bucket.events.slot(batch.name_of(item));
                *cached = Some((start, slot));
                slot
            }
            None => bucket.events.slot(batch.name_of(item)),
        };
        if let Some(agg) = bucket.events.at_mut(slot) {
            agg.add(item);
        }
    }
}

pub struct LiveHub {
    sender: TickSender,
    tick_interval: Duration,
    seconds: BTreeMap<Micros, Bucket>,
    minutes: BTreeMap<Micros, Bucket>,
    seq: u64,
}

impl LiveHub {
    pub fn new(sender: TickSender, tick_interval: Duration) -> LiveHub {
        let seq = sender.borrow().seq;
        LiveHub {
            sender,
            tick_interval,
            seconds: BTreeMap::new(),
            minutes: BTreeMap::new(),
            seq,
        }
    }

    /// Builds the tick for the second ending at `now` (floored to the second).
    fn tick_at(&mut self, now: Micros) -> LiveTick {
        let second_start = now.div_euclid(SECOND) * SECOND - SECOND;
        let minute_start = second_start.div_euclid(MINUTE) * MINUTE;
        // Keep the current and previous minute; older buckets can no longer be reported.
        self.seconds.retain(|start, _| *start >= second_start);
        self.minutes.retain(|start, _| *start >= minute_start);
        self.seq += 1;
        LiveTick {
            seq: self.seq,
            ts: format_timestamp(now),
            second: self
                .seconds
                .get(&second_start)
                .map(|b| b.window(second_start))
                .unwrap_or_else(|| Bucket::default().window(second_start)),
            minute: self
                .minutes
                .get(&minute_start)
                .map(|b| b.window(minute_start))
                .unwrap_or_else(|| Bucket::default().window(minute_start)),
            json: Arc::from(""),
        }
    }

    /// Counts the items of the previous and the current minute. Later ones (a client clock
    /// ahead, within the future tolerance) are counted by the rollups only: a bucket for each
    /// future second would let one batch make the hub hold thousands of buckets.
    fn add(&mut self, batch: &RollupItems, now: Micros) {
        let current_minute = now.div_euclid(MINUTE) * MINUTE;
        let oldest_minute = current_minute - MINUTE;
        let mut seconds = Resolved::new(batch.names().len());
        let mut minutes = Resolved::new(batch.names().len());
        for item in batch.items() {
            let minute = item.timestamp.div_euclid(MINUTE) * MINUTE;
            if minute < oldest_minute || minute > current_minute {
                continue; // Late or ahead: counted by the rollups, not live.
            }
            let second = item.timestamp.div_euclid(SECOND) * SECOND;
            seconds.add(&mut self.seconds, second, batch, item);
            minutes.add(&mut self.minutes, minute, batch, item);
        }
    }
}

impl Actor for LiveHub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Align ticks to the second boundary.
        let now = now_micros();
        let until_next = SECOND - now.rem_euclid(SECOND);
        let first = Duration::from_micros(u64::try_from(until_next).unwrap_or(0));
        ctx.run_later(first, |hub, ctx| {
            hub.publish();
            ctx.run_interval(hub.tick_interval, |hub, _ctx| hub.publish());
        });
    }
}

impl LiveHub {
    fn publish(&mut self) {
        let mut tick = self.tick_at(now_micros());
        tick.json = Arc::from(serde_json::to_string(&tick).unwrap_or_default());
        self.sender.send_replace(Arc::new(tick));
    }
}

impl ChildActor for LiveHub {
    type Message = LiveItems;
}

impl StreamHandler<LiveItems> for LiveHub {
    fn handle(&mut self, LiveItems(items): LiveItems, _ctx: &mut Self::Context) {
        self.add(&items, now_micros());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of `(name, timestamp, user)`.
    fn batch(events: &[(&str, Micros, u64)]) -> RollupItems {
        RollupItems::collect(
            events
                .iter()
                .map(|(name, at, user)| (*name, *at, user.wrapping_mul(0x9e37_79b9_7f4a_7c15))),
        )
    }

    fn hub() -> LiveHub {
        LiveHub {
            sender: tick_channel(),
            tick_interval: Duration::from_secs(1),
            seconds: BTreeMap::new(),
            minutes: BTreeMap::new(),
            seq: 0,
        }
    }

    #[test]
    fn events_ahead_of_the_current_minute_make_no_buckets() {
        let mut hub = hub();
        let now = 1_000 * MINUTE + 10 * SECOND;
        // A client clock an hour ahead: one event per second of that hour.
        let ahead: Vec<(&str, Micros, u64)> = (0..3600)
            .map(|s| ("a", now + MINUTE + s * SECOND, 1))
            .collect();
        hub.add(&batch(&ahead), now);
        assert!(hub.seconds.is_empty() && hub.minutes.is_empty());
        // Later in the current minute is still live.
        hub.add(&batch(&[("a", now + 30 * SECOND, 1)]), now);
        assert_eq!((hub.seconds.len(), hub.minutes.len()), (1, 1));
    }

    #[test]
    fn ticks_report_the_last_second_and_its_minute() {
        let mut hub = hub();
        let t0 = 1_000 * MINUTE + 10 * SECOND;
        hub.add(&batch(&[("a", t0, 1), ("a", t0 + 10, 2), ("b", t0, 1)]), t0);
        hub.add(&batch(&[("a", t0 - SECOND, 3)]), t0);
        hub.add(&batch(&[("old", t0 - 5 * MINUTE, 3)]), t0);
        let tick = hub.tick_at(t0 + SECOND + 5);
        assert_eq!(tick.seq, 1);
        assert_eq!(
            tick.second.total,
            Stat {
                count: 3,
                uniques: 2
            }
        );
        assert_eq!(
            tick.second.events["a"],
            Stat {
                count: 2,
                uniques: 2
            }
        );
        assert_eq!(
            tick.minute.total,
            Stat {
                count: 4,
                uniques: 3
            }
        );
        assert!(!tick.minute.events.contains_key("old"));
        let next = hub.tick_at(t0 + 2 * SECOND);
        assert_eq!(next.second.total.count, 0);
        assert_eq!(next.minute.total.count, 4);
    }

    /// A batch whose items alternate between seconds: each item still reaches its own
    /// second's aggregate of its own name.
    #[test]
    fn a_batch_spread_over_seconds_counts_each_name_in_its_second() {
        let mut hub = hub();
        let t0 = 1_000 * MINUTE + 10 * SECOND;
        let next = t0 + SECOND;
        hub.add(
            &batch(&[
                ("a", t0, 1),
                ("b", next, 2),
                ("a", t0, 3),
                ("b", t0, 4),
                ("a", next, 5),
            ]),
            t0,
        );
        let stat = |count, uniques| Stat { count, uniques };
        let tick = hub.tick_at(next + 5);
        assert_eq!(tick.second.total, stat(3, 3));
        assert_eq!(tick.second.events["a"], stat(2, 2));
        assert_eq!(tick.second.events["b"], stat(1, 1));
        assert_eq!(tick.minute.total, stat(5, 5));
        assert_eq!(tick.minute.events["a"], stat(3, 3));
        assert_eq!(tick.minute.events["b"], stat(2, 2));
        let tick = hub.tick_at(next + SECOND);
        assert_eq!(tick.second.events["a"], stat(1, 1));
        assert_eq!(tick.second.events["b"], stat(1, 1));
    }
}
