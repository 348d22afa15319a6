//! The dedup keys' tables, one keyspace per period of time: keys expire by whole keyspaces.
//!
//! The ingest thread writes each run of keys into the newest period's keyspace and starts a new
//! period once the newest is [`period_length`] old. A period's keys were all first seen before
//! the next period started (a key is written after it is first seen), so once that start is
//! older than the longest dedup window of any tenant, no lookup can match one of its keys, and
//! the whole keyspace is deleted: its files go, with nothing read or rewritten. (Expiring keys
//! one by one in compactions made every compaction read and rewrite the keys of the whole
//! window, and a filter that cannot forget had to be rebuilt by scanning them:
//! docs/decisions/0038.)
//!
//! A lookup reads each period whose keys may be within the tenant's window, newest first: a
//! point read in each, through its tables' own filters. Lookups reach the tables only for the
//! keys the in-memory filter may hold (`dedup_filter`), so the few extra reads cost little.
//!
//! The keyspace of the layout before periods, `dedup`, is read as the oldest period (it ends
//! where the first period starts) and deleted like one; nothing writes it any more.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions};

use crate::event::{duration_micros, Micros};

/// Name of the keyspace of the layout before periods (one keyspace for every key).
pub const UNDIVIDED: &str = "dedup";
/// A period's keyspace is named this followed by its start (microseconds since the epoch).
const PERIOD_PREFIX: &str = "dedup-since-";

/// Shortest period: at most one new keyspace a minute however short the windows.
const SHORTEST_PERIOD: Duration = Duration::from_secs(60);

/// A period lasts an eighth of the longest window (at least a minute): a lookup reads at most
/// nine of them, and the keys kept past their window are at most an eighth more than the
/// window's.
pub fn period_length(longest_window: Duration) -> Duration {
    (longest_window / 8).max(SHORTEST_PERIOD)
}

/// One period's keys.
#[derive(Clone)]
pub struct Period {
    /// When the period started; `Micros::MIN` for the keyspace of the undivided layout.
    pub start: Micros,
    pub keyspace: Keyspace,
}

/// The periods, oldest first. Cheap to clone; only the ingest thread adds and removes periods.
#[derive(Clone)]
pub struct DedupPeriods {
    db: Database,
    periods: Arc<RwLock<Arc<Vec<Period>>>>,
}

/// The options of every keyspace of dedup keys.
pub(in crate::storage) fn options() -> KeyspaceCreateOptions {
    // Written by bulk ingestion only, so the memtable stays empty. Up to 16 runs wait in level
    // 0 before they are merged into level 1 (fjall's default is 4): each merge rewrites the
    // period's level 1, so fewer, larger merges write less, and lookups, which read level 0's
    // runs one by one, are rare (only keys the in-memory filter may hold).
    KeyspaceCreateOptions::default()
        .max_memtable_size(4 << 20)
        .compaction_strategy(Arc::new(
            fjall::compaction::Leveled::default().with_l0_threshold(16),
        ))
}

impl DedupPeriods {
    /// Opens the periods of the dedup database; starts the first at `now` if there is none.
    pub fn open(db: Database, now: Micros) -> fjall::Result<DedupPeriods> {
        let mut periods = Vec::new();
        for name in db.list_keyspace_names() {
            let name: &str = &name;
            let start = if name == UNDIVIDED {
                Micros::MIN
            } else if let Some(start) = name
                .strip_prefix(PERIOD_PREFIX)
                .and_then(|start| start.parse::<Micros>().ok())
            {
                start
            } else {
                continue;
            };
            let keyspace = db.keyspace(name, options)?;
            periods.push(Period { start, keyspace });
        }
        periods.sort_by_key(|period| period.start);
        let periods = DedupPeriods {
            db,
            periods: Arc::new(RwLock::new(Arc::new(periods))),
        };
        if periods
            .all()
            .iter()
            .all(|period| period.start == Micros::MIN)
        {
            periods.start_period(now)?;
        }
        Ok(periods)
    }

    /// The periods, oldest first.
    pub fn all(&self) -> Arc<Vec<Period>> {
        let periods = self.periods.read();
        Arc::clone(&periods.unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The keyspace new keys are written into.
    pub fn newest(&self) -> Keyspace {
        let all = self.all();
        // `open` starts a period when there is none, and `expire` keeps the newest.
        all.last()
            .map(|period| period.keyspace.clone())
            .unwrap_or_else(|| unreachable!("the dedup periods always hold one period at least"))
    }

    fn update(&self, change: impl FnOnce(&mut Vec<Period>)) {
        let mut periods = self
            .periods
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = Vec::clone(&periods);
        change(&mut next);
        *periods = Arc::new(next);
    }

    fn start_period(&self, now: Micros) -> fjall::Result<()> {
        // A start is never reused: two periods started within a microsecond get two starts.
        let start =
            (self.all().last()).map_or(now, |newest| now.max(newest.start.saturating_add(1)));
        let keyspace = self
            .db
            .keyspace(&format!("{PERIOD_PREFIX}{start}"), options)?;
        self.update(|periods| periods.push(Period { start, keyspace }));
        Ok(())
    }

    /// Starts a new period if the newest began `length` or more before `now`.
    pub fn roll(&self, now: Micros, length: Duration) -> fjall::Result<bool> {
        let length = duration_micros(length);
        let due =
            (self.all().last()).is_none_or(|newest| now.saturating_sub(newest.start) >= length);
        if due {
            self.start_period(now)?;
        }
        Ok(due)
    }

    /// Deletes every period (the newest excepted) that ended at or before `horizon`: all its
    /// keys were first seen before then. Returns how many were deleted; after a failure, the
    /// periods not deleted stay and are tried again next time. Lookups that still hold a
    /// deleted period read it until they end; its files go after that.
    pub fn expire(&self, horizon: Micros) -> fjall::Result<usize> {
        let all = self.all();
        let ended = ended_by(&all, horizon);
        let mut deleted = 0;
        let mut failed = None;
        for period in &all[..ended] {
            match self.db.delete_keyspace(period.keyspace.clone()) {
                Ok(()) => deleted += 1,
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
            tracing::info!(
                period_start = period.start,
                "dropped the dedup keys of a period past every window"
            );
        }
        if deleted > 0 {
            self.update(|periods| {
                periods.drain(..deleted);
            });
        }
        failed.map_or(Ok(deleted), Err)
    }

    /// Keys in all periods, roughly.
    pub fn approximate_len(&self) -> usize {
        self.all()
            .iter()
            .map(|period| period.keyspace.approximate_len())
            .sum()
    }
}

/// How many of `periods` (oldest first) ended at or before `at`: all their keys were first seen
/// before then, since a period's keys were first seen before the next period started.
fn ended_by(periods: &[Period], at: Micros) -> usize {
    periods
        .windows(2)
        .take_while(|pair| pair[1].start <= at)
        .count()
}

/// Those of `periods` (oldest first) that may hold a key first seen at or after `since`.
pub fn holding_since(periods: &[Period], since: Micros) -> &[Period] {
    &periods[ended_by(periods, since)..]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn open(dir: &std::path::Path, now: Micros) -> (Database, DedupPeriods) {
        let db = Database::builder(dir).open().unwrap();
        let periods = DedupPeriods::open(db.clone(), now).unwrap();
        (db, periods)
    }

    fn starts(periods: &DedupPeriods) -> Vec<Micros> {
        periods.all().iter().map(|period| period.start).collect()
    }

    #[test]
    fn periods_roll_and_expire_whole_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (db, periods) = open(dir.path(), 1_000);
        assert_eq!(starts(&periods), [1_000]);
        let minute = Duration::from_secs(60);
        assert!(!periods.roll(1_000 + 59_999_999, minute).unwrap());
        assert!(periods.roll(61_000_000, minute).unwrap());
        assert!(periods.roll(200_000_000, minute).unwrap());
        assert_eq!(starts(&periods), [1_000, 61_000_000, 200_000_000]);
        periods.newest().insert([1u8; 16], [0u8; 16]).unwrap();

        // Newest first, from the period that may hold keys first seen at 61 s onwards.
        let since: Vec<Micros> = holding_since(&periods.all(), 61_000_000)
            .iter()
            .rev()
            .map(|p| p.start)
            .collect();
        assert_eq!(since, [200_000_000, 61_000_000]);
        let since: Vec<Micros> = holding_since(&periods.all(), 60_999_999)
            .iter()
            .rev()
            .map(|p| p.start)
            .collect();
        assert_eq!(since, [200_000_000, 61_000_000, 1_000]);

        // The first period ended at 61 s: past every window once the horizon reaches it.
        assert_eq!(periods.expire(60_999_999).unwrap(), 0);
        assert_eq!(periods.expire(61_000_000).unwrap(), 1);
        assert_eq!(starts(&periods), [61_000_000, 200_000_000]);
        // The newest stays, however old.
        assert_eq!(periods.expire(Micros::MAX).unwrap(), 1);
        assert_eq!(starts(&periods), [200_000_000]);
        drop(periods);
        db.persist(fjall::PersistMode::SyncAll).unwrap();
        drop(db);

        let (_db, periods) = open(dir.path(), 500_000_000);
        assert_eq!(starts(&periods), [200_000_000], "no new period at reopen");
        assert!(periods.newest().contains_key([1u8; 16]).unwrap());
    }

    #[test]
    fn the_undivided_keyspace_is_the_oldest_period() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::builder(dir.path()).open().unwrap();
        let undivided = db.keyspace(UNDIVIDED, options).unwrap();
        undivided.insert([2u8; 16], [0u8; 16]).unwrap();
        let periods = DedupPeriods::open(db.clone(), 5_000).unwrap();
        assert_eq!(starts(&periods), [Micros::MIN, 5_000]);
        let since: Vec<Micros> = holding_since(&periods.all(), 4_999)
            .iter()
            .rev()
            .map(|p| p.start)
            .collect();
        assert_eq!(since, [5_000, Micros::MIN]);
        assert_eq!(holding_since(&periods.all(), 5_000).len(), 1);
        assert_eq!(periods.expire(5_000).unwrap(), 1);
        assert!(!db.keyspace_exists(UNDIVIDED));
    }

    #[test]
    fn a_period_lasts_an_eighth_of_the_longest_window_within_bounds() {
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(period_length(day), Duration::from_secs(3 * 3600));
        assert_eq!(period_length(Duration::from_secs(10)), SHORTEST_PERIOD);
        assert_eq!(period_length(day * 32), day * 4);
    }
}
