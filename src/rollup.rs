//! Rollup math: time buckets, per-bucket aggregates, and how a batch of events updates them.
//!
//! For every event, three resolutions (minute, hour, day, UTC) and two series (the event's
//! name, and the empty name [`ALL_EVENTS`] for all events) get `count += weight` and the user
//! hash added to a HyperLogLog sketch; the user of a sampled event (weight > 1) goes instead to
//! the series of its weight ([`crate::sampling::sampled_series`]), which counts kept events. A [`Deltas`] collects those updates in memory; they are
//! merged into storage by the rollup actor's flush (counts add up, sketches merge). Everything
//! here is pure and tested against brute force.
//!
//! Sketches are `cardinality-estimator`'s HyperLogLog++ at precision 16 for every resolution
//! (standard error ≈ 0.4%; exact-ish sparse representations for small sets), so sketches of
//! different resolutions can be merged to cover an arbitrary range.

use std::time::Duration;

use rustc_hash::FxHashMap;

use crate::event::{duration_micros, EventExtras, EventKind, LogBatchView, Micros, StoredEvent};
use crate::identity::{Link, LinkKind};

/// Distinct-user sketch.
pub use crate::sketch::Sketch;

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
    series_name(event.kind, event.name.as_deref())
}

/// [`rollup_name`] of an event of this kind and name.
pub fn series_name(kind: EventKind, name: Option<&str>) -> &str {
    match kind {
        EventKind::Track => name.unwrap_or("$track"),
        EventKind::Page => "$page",
        EventKind::Screen => "$screen",
        EventKind::Identify => "$identify",
        EventKind::Group => "$group",
        EventKind::Alias => "$alias",
    }
}

/// What rollups need of one event. Its series name is `name`, an index into the batch's
/// [`RollupItems::names`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RollupItem {
    pub name: u32,
    pub timestamp: Micros,
    pub user_hash: u64,
    /// Events this one stands for (1 without sampling).
    pub weight: u64,
}

/// What rollups need of a batch's events. Each item names its series by an index into the
/// batch's distinct names, so an event costs no allocation, and the consumers (the rollup deltas
/// and the live hub) look each name up once per batch, not once per event, which would hash and
/// compare every event's name several times on the ingestion path (docs/decisions/0018).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupItems {
    names: Vec<String>,
    items: Vec<RollupItem>,
    /// The batch's identity calls, by item index (see `crate::identity`).
    links: Vec<Link>,
}

impl RollupItems {
    /// Items of `(series name, timestamp, user hash)`, each of weight 1.
    pub fn collect<'a>(events: impl IntoIterator<Item = (&'a str, Micros, u64)>) -> RollupItems {
        let mut index: FxHashMap<&'a str, u32> = FxHashMap::default();
        let mut out = RollupItems::default();
        for (name, timestamp, user_hash) in events {
            let name = *index.entry(name).or_insert_with(|| {
                out.names.push(name.to_string());
                // A batch has at most `limits.max_events_per_request` events, far below u32::MAX.
                u32::try_from(out.names.len() - 1).unwrap_or(u32::MAX)
            });
            out.items.push(RollupItem {
                name,
                timestamp,
                user_hash,
                weight: 1,
            });
        }
        out
    }

    /// Items of stored events, with their weights from `extras` (empty: all 1).
    pub fn from_events(events: &[StoredEvent], extras: &[EventExtras]) -> RollupItems {
        let mut out = RollupItems::collect(
            events
                .iter()
                .map(|event| (rollup_name(event), event.timestamp, event.user_hash)),
        );
        out.set_weights(extras.iter().map(|extras| extras.weight));
        out.links = (events.iter().enumerate())
            .filter_map(|(at, e)| {
                link_of(
                    at,
                    e.kind,
                    e.user_id.as_deref(),
                    e.anonymous_id.as_deref(),
                    e.previous_id.as_deref(),
                )
            })
            .collect();
        out
    }

    pub fn from_views(batch: &LogBatchView<'_>) -> RollupItems {
        let events = &batch.events;
        let mut out = RollupItems::collect(events.iter().map(|event| {
            (
                series_name(event.kind, event.name),
                event.timestamp,
                event.user_hash,
            )
        }));
        out.set_weights(batch.weights.iter().copied());
        out.links = (events.iter().enumerate())
            .filter_map(|(at, e)| link_of(at, e.kind, e.user_id, e.anonymous_id, e.previous_id))
            .collect();
        out
    }

    /// Gives the items their weights, in order (missing ones stay 1).
    fn set_weights(&mut self, weights: impl Iterator<Item = u32>) {
        for (item, weight) in self.items.iter_mut().zip(weights) {
            item.weight = u64::from(weight.max(1));
        }
    }

    /// Items with their names and no identity calls: what the live counters need, as it
    /// travels between nodes in cluster mode (`crate::cluster::live`).
    pub fn from_parts(names: Vec<String>, items: Vec<RollupItem>) -> RollupItems {
        // An item naming no name would be counted under the all-events series only.
        RollupItems {
            names,
            items,
            links: Vec::new(),
        }
    }

    /// The batch's identity calls, ordered by item.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// Every item's user hash, in order, and the batch's identity calls: what identity
    /// resolution reads and rewrites.
    pub fn identity_parts(&mut self) -> (impl Iterator<Item = &mut u64>, &[Link]) {
        (
            self.items.iter_mut().map(|item| &mut item.user_hash),
            &self.links,
        )
    }

    /// The batch's distinct series names; [`RollupItem::name`] indexes this.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn items(&self) -> &[RollupItem] {
        &self.items
    }

    /// The series name of `item` (an item of this batch).
    pub fn name_of(&self, item: &RollupItem) -> &str {
        self.names
            .get(item.name as usize)
            .map_or(ALL_EVENTS, String::as_str)
    }

    /// Renames the series `rename` maps to another name (`None`: kept), merging names that end
    /// up equal; returns how many items were renamed. `rename` is asked about each name once,
    /// in the order of the name's first item, and never about a name no item uses (one whose
    /// items were all dropped as duplicates). Linear in the items.
    pub fn rename(&mut self, mut rename: impl FnMut(&str) -> Option<&'static str>) -> u64 {
        let mut decided: Vec<Option<Option<&'static str>>> = vec![None; self.names.len()];
        for item in &self.items {
            let index = item.name as usize;
            if let (Some(slot @ None), Some(name)) = (decided.get_mut(index), self.names.get(index))
            {
                *slot = Some(rename(name));
            }
        }
        let renamed: Vec<Option<&'static str>> = decided.into_iter().map(Option::flatten).collect();
        if renamed.iter().all(Option::is_none) {
            return 0;
        }
        let mut names: Vec<String> = Vec::with_capacity(self.names.len());
        let mut index: FxHashMap<String, u32> = FxHashMap::default();
        let remap: Vec<u32> = self
            .names
            .iter()
            .zip(&renamed)
            .map(|(name, renamed)| {
                let target = renamed.map_or_else(|| name.clone(), str::to_string);
                *index.entry(target.clone()).or_insert_with(|| {
                    names.push(target);
                    u32::try_from(names.len() - 1).unwrap_or(u32::MAX)
                })
            })
            .collect();
        let mut moved = 0;
        for item in &mut self.items {
            let old = item.name as usize;
            if renamed.get(old).is_some_and(Option::is_some) {
                moved += 1;
            }
            item.name = remap.get(old).copied().unwrap_or(item.name);
        }
        self.names = names;
        moved
    }

    /// Keeps the items whose `keep` flag is set (names no item uses any more stay, harmlessly).
    pub fn retain_kept(&mut self, keep: &[bool]) {
        let kept = |at: usize| keep.get(at).copied().unwrap_or(false);
        if !self.links.is_empty() {
            // Each kept link moves to its item's new index.
            let mut new_index = Vec::with_capacity(self.items.len());
            let mut next = 0u32;
            for at in 0..self.items.len() {
                new_index.push(next);
                next += u32::from(kept(at));
            }
            self.links.retain(|link| kept(link.at as usize));
            for link in &mut self.links {
                link.at = new_index.get(link.at as usize).copied().unwrap_or(link.at);
            }
        }
        let mut at = 0;
        self.items.retain(|_| {
            at += 1;
            kept(at - 1)
        });
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The identity call an event makes, if any: an `identify` with a user id links its anonymous
/// id (if any) to it; an `alias` links its previous id to its user id.
fn link_of(
    at: usize,
    kind: EventKind,
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
    previous_id: Option<&str>,
) -> Option<Link> {
    let (kind, source) = match kind {
        EventKind::Identify => (LinkKind::Identify, anonymous_id),
        EventKind::Alias => (LinkKind::Alias, Some(previous_id?)),
        _ => return None,
    };
    Some(Link {
        at: u32::try_from(at).ok()?,
        kind,
        source: source.map(str::to_string),
        target: user_id?.to_string(),
    })
}

/// The series events of a name over a tenant's cap are rolled up (and streamed) under.
pub const OVERFLOW_NAME: &str = "$other";

/// The event names a tenant's rollups may hold: at most `cap` distinct names, admitted in the
/// order they are first rolled up; events of any further name are rolled up under
/// [`OVERFLOW_NAME`]. Built-in series (`$page`, ..., the all-events series, `$other` itself) do
/// not count. Admission follows the order of the log, and the admitted names are those the
/// rollups store (`storage::rollups::event_names`), so a replay of the log after the rollups'
/// watermark decides every name as before.
#[derive(Debug, Default)]
pub struct NameCap {
    admitted: rustc_hash::FxHashSet<String>,
    /// Admitted since the last stored flush: written with the next one, together with the
    /// watermark, so that what a replay starts from always includes them.
    unflushed: Vec<String>,
}

impl NameCap {
    /// The cap with the names the rollups already hold.
    pub fn new(stored: impl IntoIterator<Item = String>) -> NameCap {
        NameCap {
            admitted: stored
                .into_iter()
                .filter(|name| !is_builtin(name))
                .collect(),
            unflushed: Vec::new(),
        }
    }

    /// The names admitted since the last stored flush, for the next flush to store.
    pub fn take_unflushed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unflushed)
    }

    /// Names a failed flush did not store, to be stored by the next one.
    pub fn restore_unflushed(&mut self, mut names: Vec<String>) {
        names.append(&mut self.unflushed);
        self.unflushed = names;
    }

    /// Maps the names of `items` over the cap to [`OVERFLOW_NAME`], admitting new names while
    /// fewer than `cap` are admitted. Returns how many items were renamed.
    pub fn apply(&mut self, items: &mut RollupItems, cap: usize) -> u64 {
        items.rename(|name| {
            if is_builtin(name) || self.admitted.contains(name) {
                return None;
            }
            if self.admitted.len() < cap {
                self.admitted.insert(name.to_string());
                self.unflushed.push(name.to_string());
                return None;
            }
            Some(OVERFLOW_NAME)
        })
    }

    /// Like [`NameCap::apply`] without admitting anything: names not admitted yet are kept
    /// while there is room (for live counts, which do not decide admission).
    pub fn peek(&self, items: &mut RollupItems, cap: usize) -> u64 {
        let room = self.admitted.len() < cap;
        items.rename(|name| {
            (!room && !is_builtin(name) && !self.admitted.contains(name)).then_some(OVERFLOW_NAME)
        })
    }

    pub fn len(&self) -> usize {
        self.admitted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }
}

/// Series that exist whatever the events' names: the all-events series and `$`-names of the
/// built-in calls and the overflow.
fn is_builtin(name: &str) -> bool {
    matches!(
        name,
        ALL_EVENTS
            | "$page"
            | "$screen"
            | "$identify"
            | "$group"
            | "$alias"
            | "$track"
            | OVERFLOW_NAME
    )
}

/// Values by series name, each at a fixed position, so that a batch's names are looked up once
/// ([`ByName::slot`]) and its events then reach their value by position.
#[derive(Debug)]
pub struct ByName<T> {
    index: FxHashMap<String, usize>,
    entries: Vec<(String, T)>,
}

impl<T> Default for ByName<T> {
    fn default() -> ByName<T> {
        ByName {
            index: FxHashMap::default(),
            entries: Vec::new(),
        }
    }
}

impl<T: Default> ByName<T> {
    /// The position of `name`'s value, added as `T::default()` if new.
    pub fn slot(&mut self, name: &str) -> usize {
        if let Some(slot) = self.index.get(name) {
            return *slot;
        }
        self.entries.push((name.to_string(), T::default()));
        self.index.insert(name.to_string(), self.entries.len() - 1);
        self.entries.len() - 1
    }

    /// `name`'s value, added as `T::default()` if new.
    pub fn entry(&mut self, name: &str) -> &mut T {
        let slot = self.slot(name);
        &mut self.entries[slot].1
    }
}

impl<T> ByName<T> {
    pub fn get(&self, name: &str) -> Option<&T> {
        self.entries
            .get(*self.index.get(name)?)
            .map(|(_, value)| value)
    }

    pub fn at_mut(&mut self, slot: usize) -> Option<&mut T> {
        self.entries.get_mut(slot).map(|(_, value)| value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.entries
            .iter()
            .map(|(name, value)| (name.as_str(), value))
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.entries.iter_mut().map(|(_, value)| value)
    }

    pub fn into_entries(self) -> impl Iterator<Item = (String, T)> {
        self.entries.into_iter()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The durable events of one log entry, for the rollup actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupBatch {
    pub tenant: crate::ids::TenantId,
    pub first_seq: u64,
    pub items: RollupItems,
}

impl RollupBatch {
    pub fn last_seq(&self) -> u64 {
        crate::event::last_seq_of(self.first_seq, self.items.len())
    }
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
        let keep = duration_micros(keep);
        Some(resolution.bucket(now.saturating_sub(keep)))
    }
}

/// Distinct users added to one bucket since the last flush: their hashes while they are few
/// (8 bytes each), a sketch once they would take more room than one.
///
/// Most pending buckets of a quiet tenant see a few hundred users between flushes; holding each
/// as a dense sketch (48 KiB at precision 16) would make a many-tenant server's memory grow with
/// its number of series (docs/decisions/0017).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum PendingUsers {
    Hashes(Vec<u64>),
    Sketch(Box<Sketch>),
}

impl Default for PendingUsers {
    fn default() -> PendingUsers {
        PendingUsers::Hashes(Vec::new())
    }
}

impl PendingUsers {
    /// Hashes kept before switching to a sketch (64 KiB, about a dense sketch's size).
    const MAX_HASHES: usize = 8192;

    pub fn insert(&mut self, hash: u64) {
        self.insert_up_to(hash, Self::MAX_HASHES);
    }

    /// [`PendingUsers::insert`], switching to a sketch at `max_hashes` hashes.
    ///
    /// A user's events repeat its hash, so a full list drops its repeats before it grows: it
    /// then takes at most twice its distinct users' room, where it grew with every event (and
    /// turned into a dense sketch after 8192 events of a few hundred users).
    fn insert_up_to(&mut self, hash: u64, max_hashes: usize) {
        match self {
            PendingUsers::Hashes(hashes) => {
                if hashes.len() == hashes.capacity() && hashes.len() >= 64 {
                    hashes.sort_unstable();
                    hashes.dedup();
                }
                hashes.push(hash);
                if hashes.len() >= max_hashes {
                    self.make_sketch();
                }
            }
            PendingUsers::Sketch(sketch) => sketch.insert_hash(hash),
        }
    }

    /// The users as hashes, if they are still held as such (duplicates possible).
    pub fn hashes(&self) -> Option<&[u64]> {
        match self {
            PendingUsers::Hashes(hashes) => Some(hashes),
            PendingUsers::Sketch(_) => None,
        }
    }

    fn make_sketch(&mut self) {
        if let PendingUsers::Hashes(hashes) = self {
            let mut sketch = Box::new(Sketch::new());
            for hash in hashes.iter() {
                sketch.insert_hash(*hash);
            }
            *self = PendingUsers::Sketch(sketch);
        }
    }

    /// Adds every user of `other`.
    pub fn merge(&mut self, other: &PendingUsers) {
        self.merge_up_to(other, Self::MAX_HASHES);
    }

    /// [`PendingUsers::merge`], switching to a sketch at `max_hashes` hashes.
    fn merge_up_to(&mut self, other: &PendingUsers, max_hashes: usize) {
        match (&mut *self, other) {
            (PendingUsers::Sketch(sketch), PendingUsers::Sketch(theirs)) => sketch.merge(theirs),
            (PendingUsers::Hashes(_), PendingUsers::Sketch(theirs)) => {
                self.make_sketch();
                if let PendingUsers::Sketch(sketch) = self {
                    sketch.merge(theirs);
                }
            }
            (_, PendingUsers::Hashes(theirs)) => {
                for hash in theirs {
                    self.insert_up_to(*hash, max_hashes);
                }
            }
        }
    }

    /// Adds every user to a stored sketch.
    pub fn add_to(&self, sketch: &mut Sketch) {
        match self {
            PendingUsers::Hashes(hashes) => {
                for hash in hashes {
                    sketch.insert_hash(*hash);
                }
            }
            PendingUsers::Sketch(theirs) => sketch.merge(theirs),
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, PendingUsers::Hashes(hashes) if hashes.is_empty())
    }
}

/// Unflushed updates of one bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BucketDelta {
    pub count: u64,
    /// Users of the events of this bucket not already in a finer bucket of the same series (see
    /// [`Deltas::roll_up_users`]).
    pub users: PendingUsers,
}

/// The pending buckets of one series, by resolution and start.
type SeriesDeltas = FxHashMap<(Resolution, Micros), BucketDelta>;

/// Unflushed updates, by series name.
///
/// Every event adds its weight to the count of its minute, hour and day bucket, but its user only
/// to the finest of them still within retention (the minute, normally): coarser buckets get the
/// users of their finer ones when the deltas are flushed ([`Deltas::roll_up_users`]), one sketch
/// merge per bucket instead of three sketch updates per event.
#[derive(Debug)]
pub struct Deltas {
    series: ByName<SeriesDeltas>,
    /// Updates skipped because the bucket is past its resolution's retention, by resolution.
    pub skipped: [u64; 3],
    /// A bucket's pending users become a sketch past this many hashes.
    max_hashes: usize,
}

impl Default for Deltas {
    fn default() -> Deltas {
        Deltas {
            series: ByName::default(),
            skipped: [0; 3],
            max_hashes: PendingUsers::MAX_HASHES,
        }
    }
}

impl Deltas {
    /// Deltas that keep every pending user as a hash, never as a sketch: for a store that adds
    /// users itself (cluster mode's Redis HyperLogLogs), at 8 bytes per user and bucket until
    /// the flush.
    pub fn keeping_every_user() -> Deltas {
        Deltas {
            max_hashes: usize::MAX,
            ..Deltas::default()
        }
    }

    /// Adds a batch's items to every resolution and to the all-events series.
    pub fn apply(&mut self, batch: &RollupItems, retention: &Retention, now: Micros) {
        if batch.is_empty() {
            return;
        }
        let oldest = Resolution::ALL.map(|r| retention.oldest(r, now));
        // Each of the batch's names is looked up once, not once per event.
        let all = self.series.slot(ALL_EVENTS);
        let slots: Vec<usize> = batch
            .names()
            .iter()
            .map(|name| self.series.slot(name))
            .collect();
        let mut shadow: FxHashMap<(&str, u32), usize> = FxHashMap::default();
        for item in batch.items() {
            let mut starts = [None; 3];
            for (index, resolution) in Resolution::ALL.iter().enumerate() {
                let start = resolution.bucket(item.timestamp);
                if oldest[index].is_some_and(|oldest| start < oldest) {
                    self.skipped[index] += item.weight;
                } else {
                    starts[index] = Some(start);
                }
            }
            let named = slots.get(item.name as usize).copied().unwrap_or(all);
            let sampled = item.weight > 1;
            for slot in [named, all] {
                self.add(
                    slot,
                    &starts,
                    item.weight,
                    (!sampled).then_some(item.user_hash),
                );
            }
            if sampled {
                // The kept users of sampled events go to their weight's series, apart (see
                // `crate::sampling`), with the count of kept events.
                let weight = u32::try_from(item.weight).unwrap_or(u32::MAX);
                for name in [batch.name_of(item), ALL_EVENTS] {
                    let slot = *shadow.entry((name, weight)).or_insert_with(|| {
                        self.series
                            .slot(&crate::sampling::sampled_series(name, weight))
                    });
                    self.add(slot, &starts, 1, Some(item.user_hash));
                }
            }
        }
    }

    /// Adds `count` to the series at `slot` in each bucket of `starts`, and `user` to the
    /// finest of them.
    fn add(&mut self, slot: usize, starts: &[Option<Micros>; 3], count: u64, user: Option<u64>) {
        let max_hashes = self.max_hashes;
        let Some(series) = self.series.at_mut(slot) else {
            return;
        };
        let mut user = user;
        for (resolution, start) in Resolution::ALL.iter().zip(starts) {
            let Some(start) = start else {
                continue;
            };
            let bucket = series.entry((*resolution, *start)).or_default();
            bucket.count += count;
            if let Some(hash) = user.take() {
                bucket.users.insert_up_to(hash, max_hashes);
            }
        }
    }

    /// Gives every hour and day bucket the users of its pending finer buckets, so each bucket's
    /// `users` holds all the users its events had. Call once, before flushing.
    pub fn roll_up_users(&mut self) {
        let max_hashes = self.max_hashes;
        for series in self.series.values_mut() {
            for (finer, coarser) in [
                (Resolution::Minute, Resolution::Hour),
                (Resolution::Hour, Resolution::Day),
            ] {
                let mut additions: FxHashMap<Micros, PendingUsers> = FxHashMap::default();
                for ((resolution, start), bucket) in series.iter() {
                    if *resolution == finer && !bucket.users.is_empty() {
                        additions
                            .entry(coarser.bucket(*start))
                            .or_default()
                            .merge_up_to(&bucket.users, max_hashes);
                    }
                }
                for (start, users) in additions {
                    // Absent when the coarser bucket is past its retention.
                    if let Some(bucket) = series.get_mut(&(coarser, start)) {
                        bucket.users.merge_up_to(&users, max_hashes);
                    }
                }
            }
        }
    }

    /// Every pending bucket: `(resolution, series name, start, delta)`.
    pub fn buckets(&self) -> impl Iterator<Item = (Resolution, &str, Micros, &BucketDelta)> {
        self.series.iter().flat_map(|(name, series)| {
            series
                .iter()
                .map(move |((resolution, start), delta)| (*resolution, name, *start, delta))
        })
    }

    /// One pending bucket.
    pub fn get(&self, resolution: Resolution, name: &str, start: Micros) -> Option<&BucketDelta> {
        self.series.get(name)?.get(&(resolution, start))
    }

    /// Number of pending buckets.
    pub fn len(&self) -> usize {
        self.series.iter().map(|(_, series)| series.len()).sum()
    }

    /// True if no batch with items was applied. A batch whose items were all past retention
    /// leaves no buckets but still makes this false: its flush moves the rollup watermark.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Adds `other`'s updates (a flush that failed, to be retried with the next one). Users that
    /// end up rolled up twice are harmless: sketches hold a set.
    pub fn merge(&mut self, other: Deltas) {
        for (name, theirs) in other.series.into_entries() {
            let series = self.series.entry(&name);
            for (key, delta) in theirs {
                let bucket = series.entry(key).or_default();
                bucket.count += delta.count;
                bucket.users.merge_up_to(&delta.users, self.max_hashes);
            }
        }
        for (mine, theirs) in self.skipped.iter_mut().zip(other.skipped) {
            *mine += theirs;
        }
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

    fn items(names: &[&str]) -> RollupItems {
        RollupItems::collect(names.iter().enumerate().map(|(i, n)| (*n, i as Micros, 7)))
    }

    fn named(items: &RollupItems) -> Vec<&str> {
        items
            .items()
            .iter()
            .map(|item| items.name_of(item))
            .collect()
    }

    #[test]
    fn names_are_admitted_in_the_order_of_their_events_and_only_with_events() {
        // The batch lists "z" first, but its first kept event comes after "y"'s; "x" lost its
        // only event (a duplicate).
        let mut batch = RollupItems::collect([("x", 0, 1), ("z", 1, 1), ("y", 2, 1), ("z", 3, 1)]);
        batch.retain_kept(&[false, false, true, true]);
        let mut cap = NameCap::default();
        assert_eq!(cap.apply(&mut batch, 1), 1);
        assert_eq!(named(&batch), ["y", "$other"]);
        assert_eq!(cap.take_unflushed(), ["y"]);
        // A replay from the log sees only the stored events, in the same order.
        let mut replayed = RollupItems::collect([("y", 2, 1), ("z", 3, 1)]);
        let mut fresh = NameCap::default();
        fresh.apply(&mut replayed, 1);
        assert_eq!(named(&replayed), ["y", "$other"]);
    }

    #[test]
    fn names_over_the_cap_roll_up_as_other_in_log_order() {
        let mut cap = NameCap::new(["a".to_string(), String::new(), "$page".to_string()]);
        assert_eq!(cap.len(), 1, "built-in series do not count");
        let mut batch = items(&["a", "b", "c", "$page", "b", "d", "c"]);
        assert_eq!(cap.apply(&mut batch, 2), 3);
        assert_eq!(
            named(&batch),
            ["a", "b", "$other", "$page", "b", "$other", "$other"]
        );
        // Renamed names are merged: `$other` is one series of the batch.
        assert_eq!(batch.names().iter().filter(|n| *n == "$other").count(), 1);
        // A replay decides the same way; a raised cap admits the next new name.
        let mut replay = NameCap::new(["a".to_string(), "b".to_string()]);
        let mut again = items(&["c", "b"]);
        replay.peek(&mut again, 2);
        assert_eq!(named(&again), ["$other", "b"]);
        let mut raised = items(&["c", "d"]);
        assert_eq!(replay.apply(&mut raised, 3), 1);
        assert_eq!(named(&raised), ["c", "$other"]);
    }
    use proptest::prelude::*;

    fn user(user: u64) -> u64 {
        crate::enrich::user_hash(&[1; 32], &user.to_string())
    }

    /// A batch of `(name, timestamp, user)`.
    fn batch(events: &[(&str, Micros, u64)]) -> RollupItems {
        RollupItems::collect(events.iter().map(|(name, at, u)| (*name, *at, user(*u))))
    }

    #[test]
    fn a_batch_holds_each_name_once() {
        let mut items = batch(&[("a", 1, 1), ("b", 2, 1), ("a", 3, 2), ("b", 4, 3)]);
        assert_eq!(items.names(), ["a", "b"]);
        let named: Vec<(&str, Micros)> = items
            .items()
            .iter()
            .map(|item| (items.name_of(item), item.timestamp))
            .collect();
        assert_eq!(named, [("a", 1), ("b", 2), ("a", 3), ("b", 4)]);
        items.retain_kept(&[true, false, false, true]);
        let kept: Vec<(&str, u64)> = items
            .items()
            .iter()
            .map(|item| (items.name_of(item), item.user_hash))
            .collect();
        assert_eq!(kept, [("a", user(1)), ("b", user(3))]);
    }

    fn users_of(delta: &BucketDelta) -> u64 {
        let mut sketch = Sketch::new();
        delta.users.add_to(&mut sketch);
        estimate(&sketch)
    }

    const FOREVER: Retention = Retention {
        minute: Duration::from_secs(u32::MAX as u64),
        hour: Duration::from_secs(u32::MAX as u64),
        day: None,
    };

    /// A sampled event adds its weight to the counts, and its user only to its weight's series
    /// (with a count of kept events), for the series and for all events.
    #[test]
    fn sampled_events_keep_their_users_apart_by_weight() {
        let mut items = batch(&[("a", 0, 1), ("a", 0, 2), ("a", 0, 2)]);
        items.set_weights([1, 10, 10].into_iter());
        let mut deltas = Deltas::default();
        deltas.apply(&items, &FOREVER, 0);
        deltas.roll_up_users();
        for resolution in Resolution::ALL {
            for name in ["a", ALL_EVENTS] {
                let plain = deltas.get(resolution, name, 0).unwrap();
                assert_eq!((plain.count, users_of(plain)), (21, 1));
                let sampled = crate::sampling::sampled_series(name, 10);
                let sampled = deltas.get(resolution, &sampled, 0).unwrap();
                assert_eq!((sampled.count, users_of(sampled)), (2, 1));
            }
        }
    }

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
        deltas.apply(&batch(&[("old", 50 * MICROS_PER_DAY, 1)]), &retention, now);
        assert_eq!(deltas.skipped, [1, 0, 0]);
        // Past every resolution's retention: no bucket, but the deltas are not empty (their
        // flush moves the watermark past the batch).
        let mut past = Deltas::default();
        let finite = Retention {
            minute: Duration::from_secs(7 * 86_400),
            hour: Duration::from_secs(30 * 86_400),
            day: Some(Duration::from_secs(30 * 86_400)),
        };
        past.apply(&batch(&[("old", 50 * MICROS_PER_DAY, 1)]), &finite, now);
        assert_eq!(past.skipped, [1, 1, 1]);
        assert_eq!(past.len(), 0);
        assert!(!past.is_empty());
        assert!(Deltas::default().is_empty());
        assert!(deltas
            .buckets()
            .all(|(resolution, ..)| resolution != Resolution::Minute));
        assert_eq!(deltas.len(), 4);
        // The user went to the finest bucket kept (the hour) and reaches the day when rolled up.
        deltas.roll_up_users();
        let day = deltas
            .get(Resolution::Day, "old", 50 * MICROS_PER_DAY)
            .unwrap();
        assert_eq!(users_of(day), 1);
    }

    proptest! {
        #[test]
        fn counts_match_brute_force(events in proptest::collection::vec((0usize..4, 0i64..(3 * MICROS_PER_DAY), 0u64..50), 0..300)) {
            let names = ["a", "b", "c", "d"];
            let events: Vec<(&str, Micros, u64)> = events.iter().map(|(n, t, u)| (names[*n], *t, *u)).collect();
            let mut deltas = Deltas::default();
            // Applied in two halves, merged like a failed flush is (after rolling up).
            let half = events.len() / 2;
            deltas.apply(&batch(&events[..half]), &FOREVER, 0);
            let mut second = Deltas::default();
            second.apply(&batch(&events[half..]), &FOREVER, 0);
            second.roll_up_users();
            deltas.merge(second);
            deltas.roll_up_users();
            for resolution in Resolution::ALL {
                for name in names.iter().copied().chain([ALL_EVENTS]) {
                    let mut expected: std::collections::HashMap<Micros, (u64, std::collections::HashSet<u64>)> = Default::default();
                    for (_, at, u) in events.iter().filter(|(n, ..)| name == ALL_EVENTS || *n == name) {
                        let entry = expected.entry(resolution.bucket(*at)).or_default();
                        entry.0 += 1;
                        entry.1.insert(user(*u));
                    }
                    for (start, (count, users)) in expected {
                        let delta = deltas.get(resolution, name, start).unwrap();
                        prop_assert_eq!(delta.count, count);
                        // Small sets are counted exactly by the sparse representation.
                        prop_assert_eq!(users_of(delta), users.len() as u64);
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
    fn repeated_users_stay_a_short_list() {
        let mut pending = PendingUsers::default();
        // 100,000 events of 500 users: far past the 8192 hashes a list holds.
        for event in 0..100_000u64 {
            let hash = crate::enrich::user_hash(&[3; 32], &(event % 500).to_string());
            pending.insert(hash);
        }
        let PendingUsers::Hashes(hashes) = &pending else {
            panic!("500 users became a sketch");
        };
        assert!(hashes.capacity() <= 2048, "capacity {}", hashes.capacity());
        let mut sketch = Sketch::new();
        pending.add_to(&mut sketch);
        assert!(
            estimate(&sketch).abs_diff(500) <= 5,
            "{}",
            estimate(&sketch)
        );
    }

    #[test]
    fn pending_users_switch_to_a_sketch_and_stay_accurate() {
        let mut pending = PendingUsers::default();
        let mut other = PendingUsers::default();
        for user in 0..20_000u64 {
            let hash = crate::enrich::user_hash(&[3; 32], &user.to_string());
            pending.insert(hash);
            if user % 2 == 0 {
                other.insert(hash); // Already in `pending`: merging adds nobody.
            }
        }
        assert!(matches!(pending, PendingUsers::Sketch(_)));
        pending.merge(&other);
        let mut sketch = Sketch::new();
        pending.add_to(&mut sketch);
        let error = (estimate(&sketch) as f64 - 20_000.0).abs() / 20_000.0;
        assert!(error < 0.01, "relative error {error}");
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
