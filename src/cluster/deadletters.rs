//! The shared dead letters: every tenant's letters in Redis, where any ingest node lists and
//! replays them.
//!
//! The single node's layout, moved to Redis: per tenant a sorted set of letter keys, `…:i`, a
//! hash from key to value, `…:v`, and the bytes they take, `…:b`. Keys are
//! [`crate::storage::deadletters::key`]s in hex (tenant, receipt time, batch, position, all
//! big-endian), all with score 0, so the set's lexical order is the single node's key order:
//! time ranges, cursors and trims are lexical ranges, and batch records sit beside their
//! letters.
//!
//! A partition's owner writes the letters its log writer kept (retries of logged events are
//! not letters), per stream message, in one script that checks the partition's fence and a
//! per-partition watermark of stream sequences: a new owner that applies the same messages
//! again writes nothing twice, and a letter that a replay removed does not come back. The same
//! script applies the tenant's limits (age, then size, oldest first). Replays change letters
//! from any ingest node with a script of their own, which touches only letters still there.
//!
//! Letters are as durable as Redis is (its persistence setting), and take Redis memory up to
//! each tenant's `deadletter_max_bytes`.

use redis::aio::ConnectionManager;
use redis::Script;

use crate::cluster::lease::{Lease, FENCE_CHECK};
use crate::deadletter::hex;
use crate::event::{duration_micros, Micros};
use crate::ids::TenantId;
use crate::storage::deadletters::{key, LetterKey};
use crate::storage::StorageError;

/// `trim(index, values, size, oldest, max_bytes)` deletes the tenant's entries below the
/// lexical bound `oldest` (received before a time), then the oldest while they take more than `max_bytes`, at most about 1,000 of each
/// per call (a later call takes the rest); returns how many letters it deleted (batch records,
/// position `u32::MAX`, hex `ffffffff` at characters 65–72, go too but are not counted). An entry
/// takes its key (36 bytes) and its value, as in the single node's count.
const TRIM: &str = r"
local function trim(index, values, size, oldest, max_bytes)
  local removed = 0
  local function drop(member)
    local value = redis.call('HGET', values, member)
    if value then
      redis.call('DECRBY', size, 36 + string.len(value))
      redis.call('HDEL', values, member)
    end
    redis.call('ZREM', index, member)
    if string.sub(member, 65, 72) ~= 'ffffffff' then removed = removed + 1 end
  end
  for _, member in ipairs(redis.call('ZRANGEBYLEX', index, '-', oldest, 'LIMIT', 0, 1000)) do
    drop(member)
  end
  local rounds = 0
  while tonumber(redis.call('GET', size) or '0') > tonumber(max_bytes) and rounds < 10 do
    local oldest_members = redis.call('ZRANGE', index, 0, 99)
    if #oldest_members == 0 then break end
    for _, member in ipairs(oldest_members) do
      if tonumber(redis.call('GET', size) or '0') <= tonumber(max_bytes) then break end
      drop(member)
    end
    rounds = rounds + 1
  end
  return removed
end
";

/// `KEYS`: fence, the partition's watermark, the tenant's index, values and size. `ARGV`:
/// token, the message's stream sequence, the lexical bound below which entries expire, most
/// bytes, then a (member, value) pair per letter. Returns 0 when fenced out, 1 when the watermark
/// was already at or past the message, 2 when written.
const STORE: &str = r"
local seq = tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or '0') >= seq then return 1 end
for at = 5, #ARGV, 2 do
  local member, value = ARGV[at], ARGV[at + 1]
  local old = redis.call('HGET', KEYS[4], member)
  if old then
    redis.call('DECRBY', KEYS[5], 36 + string.len(old))
  end
  redis.call('HSET', KEYS[4], member, value)
  redis.call('ZADD', KEYS[3], 0, member)
  redis.call('INCRBY', KEYS[5], 36 + string.len(value))
end
redis.call('SET', KEYS[2], seq)
trim(KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[4])
return 2
";

/// `KEYS`: the tenant's index, values and size. `ARGV`: the number of replaced letters, then
/// (member, value) per replaced letter, then the members removed. Letters no longer there are
/// left alone.
const UPDATE: &str = r"
local replaced = tonumber(ARGV[1])
for at = 2, 1 + replaced * 2, 2 do
  local member, value = ARGV[at], ARGV[at + 1]
  local old = redis.call('HGET', KEYS[2], member)
  if old then
    redis.call('HSET', KEYS[2], member, value)
    redis.call('INCRBY', KEYS[3], string.len(value) - string.len(old))
  end
end
for at = 2 + replaced * 2, #ARGV do
  local member = ARGV[at]
  local old = redis.call('HGET', KEYS[2], member)
  if old then
    redis.call('DECRBY', KEYS[3], 36 + string.len(old))
    redis.call('HDEL', KEYS[2], member)
  end
  redis.call('ZREM', KEYS[1], member)
end
return 1
";

/// Members a page reads from the index per round trip.
const PAGE_CHUNK: usize = 256;

/// What an owner's write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Written,
    /// The partition's letters were already written through this message (by this node
    /// before, or by an earlier owner).
    Already,
    /// The lease no longer holds the partition's fence: nothing was written.
    Fenced,
}

/// A tenant's limits on its letters.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Letters received before this are deleted.
    pub oldest: Micros,
    pub max_bytes: u64,
}

impl Limits {
    /// A tenant's limits as of now.
    pub fn of(settings: &crate::tenant::TenantSettings) -> Limits {
        let retention = duration_micros(settings.deadletter_retention);
        Limits {
            oldest: crate::event::now_micros().saturating_sub(retention),
            max_bytes: settings.deadletter_max_bytes.as_u64(),
        }
    }
}

/// Letters read back: key and value, newest first, and where the next page starts.
pub struct RawPage {
    pub letters: Vec<(LetterKey, Vec<u8>)>,
    pub next: Option<LetterKey>,
}

/// A node's handle on the shared dead letters.
#[derive(Clone)]
pub struct SharedDeadLetters {
    redis: ConnectionManager,
    prefix: String,
    store: Script,
    update: Script,
    trim: Script,
}

fn unavailable(error: redis::RedisError) -> StorageError {
    StorageError::Unavailable(format!("the shared dead letters (Redis): {error}"))
}

fn parse_member(member: &str) -> Option<LetterKey> {
    crate::deadletter::parse_hex(member)
}

impl SharedDeadLetters {
    pub fn new(redis: ConnectionManager, prefix: &str) -> SharedDeadLetters {
        SharedDeadLetters {
            redis,
            prefix: prefix.to_string(),
            // The fence check ends the script with 0 when the token is stale.
            store: Script::new(&format!("{TRIM}\n{FENCE_CHECK}\n{STORE}")),
            update: Script::new(UPDATE),
            trim: Script::new(&format!(
                "{TRIM}\nreturn trim(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])"
            )),
        }
    }

    /// The tenant's index, values and size keys.
    fn keys(&self, tenant: TenantId) -> [String; 3] {
        let base = format!("{}:dl:{{{tenant}}}", self.prefix);
        [
            format!("{base}:i"),
            format!("{base}:v"),
            format!("{base}:b"),
        ]
    }

    /// The lexical bound of the tenant's entries received at `at`: those received before it
    /// are below `(<bound>`, those at or after it at or above `[<bound>`.
    fn time_bound(tenant: TenantId, at: Micros) -> String {
        let mut bound = hex(key(tenant, at, 0, 0));
        bound.truncate(32);
        bound
    }

    fn watermark_key(&self, partition: u16) -> String {
        format!("{}:dl:w:{partition}", self.prefix)
    }

    /// Writes the letters the stream message `seq` of `partition` left (key and value, batch
    /// record included), if `lease` still holds the partition's fence (`fence_key`) and the
    /// partition's letters were not written through `seq` yet; then applies `limits`.
    #[allow(clippy::too_many_arguments)]
    pub async fn store(
        &self,
        (lease, fence_key): (Lease, &str),
        partition: u16,
        seq: u64,
        tenant: TenantId,
        letters: &[(LetterKey, Vec<u8>)],
        limits: Limits,
    ) -> Result<Stored, StorageError> {
        let [index, values, size] = self.keys(tenant);
        let mut invocation = self.store.key(fence_key);
        invocation
            .key(self.watermark_key(partition))
            .key(index)
            .key(values)
            .key(size)
            .arg(lease.token)
            .arg(seq)
            .arg(format!("({}", Self::time_bound(tenant, limits.oldest)))
            .arg(limits.max_bytes);
        for (key, value) in letters {
            invocation.arg(hex(*key)).arg(&value[..]);
        }
        let reply: i64 = invocation
            .invoke_async(&mut self.redis.clone())
            .await
            .map_err(unavailable)?;
        Ok(match reply {
            2 => Stored::Written,
            1 => Stored::Already,
            _ => Stored::Fenced,
        })
    }

    /// Deletes what is past the tenant's limits (letters expire without new ones coming).
    pub async fn trim(&self, tenant: TenantId, limits: Limits) -> Result<u64, StorageError> {
        let [index, values, size] = self.keys(tenant);
        let removed: u64 = self
            .trim
            .key(index)
            .key(values)
            .key(size)
            .arg(format!("({}", Self::time_bound(tenant, limits.oldest)))
            .arg(limits.max_bytes)
            .invoke_async(&mut self.redis.clone())
            .await
            .map_err(unavailable)?;
        Ok(removed)
    }

    /// The tenant's entries (letters and batch records) received in `[from, to)` and below
    /// `before` (a cursor of another tenant is ignored), newest first, that `keep` accepts
    /// (batch records are never kept), examining at most `budget` and returning at most
    /// `limit`; `next` says where to continue when the page stopped before the range's end.
    /// The single node's paging, over the set's lexical order.
    pub async fn page(
        &self,
        tenant: TenantId,
        (from, to): (Micros, Micros),
        before: Option<&LetterKey>,
        (limit, budget): (usize, usize),
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<RawPage, StorageError> {
        let [index, values, _] = self.keys(tenant);
        let high = Self::time_bound(tenant, to);
        let mut max = match before.map(|key| hex(*key)) {
            Some(cursor) if cursor.starts_with(&tenant.to_string()) && cursor < high => cursor,
            _ => high,
        };
        let min = format!("[{}", Self::time_bound(tenant, from));
        let mut redis = self.redis.clone();
        let mut letters = Vec::new();
        let mut examined = 0usize;
        let mut last: Option<LetterKey> = None;
        loop {
            let members: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(&index)
                .arg(format!("({max}"))
                .arg(&min)
                .arg("LIMIT")
                .arg(0)
                .arg(PAGE_CHUNK)
                .query_async(&mut redis)
                .await
                .map_err(unavailable)?;
            let fetched: Vec<Option<Vec<u8>>> = match members.last() {
                None => Vec::new(),
                Some(lowest) => {
                    max.clone_from(lowest);
                    redis::cmd("HMGET")
                        .arg(&values)
                        .arg(&members)
                        .query_async(&mut redis)
                        .await
                        .map_err(unavailable)?
                }
            };
            for (member, value) in members.iter().zip(fetched) {
                if letters.len() >= limit || examined >= budget {
                    return Ok(RawPage {
                        letters,
                        next: last,
                    });
                }
                let (Some(key), Some(value)) = (parse_member(member), value) else {
                    continue;
                };
                examined += 1;
                last = Some(key);
                if !crate::storage::deadletters::is_batch_record(&key) && keep(&value) {
                    letters.push((key, value));
                }
            }
            if members.len() < PAGE_CHUNK {
                return Ok(RawPage {
                    letters,
                    next: None,
                });
            }
        }
    }

    /// Values of the given entries (batch records), those still there.
    pub async fn get(
        &self,
        tenant: TenantId,
        keys: &[LetterKey],
    ) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let [_, values, _] = self.keys(tenant);
        let members: Vec<String> = keys.iter().map(|key| hex(*key)).collect();
        redis::cmd("HMGET")
            .arg(values)
            .arg(members)
            .query_async(&mut self.redis.clone())
            .await
            .map_err(unavailable)
    }

    /// Replaces the values of letters still there and removes others (a replay's outcome).
    pub async fn update(
        &self,
        tenant: TenantId,
        replaced: &[(LetterKey, Vec<u8>)],
        removed: &[LetterKey],
    ) -> Result<(), StorageError> {
        let [index, values, size] = self.keys(tenant);
        let mut invocation = self.update.key(index);
        invocation.key(values).key(size).arg(replaced.len());
        for (key, value) in replaced {
            invocation.arg(hex(*key)).arg(&value[..]);
        }
        for key in removed {
            invocation.arg(hex(*key));
        }
        let _: i64 = invocation
            .invoke_async(&mut self.redis.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Removes the letters whose event names `user` (see [`crate::deadletter::names_user`]);
    /// returns how many.
    pub async fn erase_user(&self, tenant: TenantId, user: &str) -> Result<u64, StorageError> {
        let [_, values, _] = self.keys(tenant);
        let mut redis = self.redis.clone();
        let mut doomed: Vec<LetterKey> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, found): (u64, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
                .arg(&values)
                .arg(cursor)
                .arg("COUNT")
                .arg(PAGE_CHUNK)
                .query_async(&mut redis)
                .await
                .map_err(unavailable)?;
            for (member, value) in found {
                if let Some(key) = parse_member(&member) {
                    if crate::deadletter::names_user(&value, user) {
                        doomed.push(key);
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // A scan may return an entry more than once.
        doomed.sort_unstable();
        doomed.dedup();
        for chunk in doomed.chunks(PAGE_CHUNK) {
            self.update(tenant, &[], chunk).await?;
        }
        Ok(doomed.len() as u64)
    }

    /// Deletes every letter of a deleted tenant.
    pub async fn delete_all(&self, tenant: TenantId) -> Result<(), StorageError> {
        let _: i64 = redis::cmd("DEL")
            .arg(&self.keys(tenant)[..])
            .query_async(&mut self.redis.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Bytes the tenant's letters take (keys and values, as the single node counts them).
    pub async fn bytes(&self, tenant: TenantId) -> Result<u64, StorageError> {
        let [_, _, size] = self.keys(tenant);
        let stored: Option<i64> = redis::cmd("GET")
            .arg(size)
            .query_async(&mut self.redis.clone())
            .await
            .map_err(unavailable)?;
        Ok(stored.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use crate::cluster::lease::Leases;
    use crate::storage::deadletters::{batch_key, key, BATCH_POSITION};

    const TENANT: TenantId = TenantId(0xd1);

    fn entry(at: Micros, batch: u128, position: u32, value: &str) -> (LetterKey, Vec<u8>) {
        (key(TENANT, at, batch, position), value.as_bytes().to_vec())
    }

    fn keep_all(_: &[u8]) -> bool {
        true
    }

    const NO_LIMITS: Limits = Limits {
        oldest: 0,
        max_bytes: u64::MAX,
    };

    /// Owners write each message's letters once, fenced; replays remove letters for good;
    /// pages go newest first with a cursor, as on the single node; limits delete the oldest.
    #[actix_rt::test]
    async fn letters_are_written_once_fenced_paged_and_bounded() {
        let redis = testkit::services::Service::redis().unwrap();
        let url = redis.url();
        let connect = || crate::cluster::connect_redis(&url, Duration::from_secs(5));
        let letters = SharedDeadLetters::new(connect().await.unwrap(), "dl");
        let timeout = Duration::from_millis(300);
        let mut leases_a = Leases::new(connect().await.unwrap(), "dl", "a", 1, timeout);
        let mut leases_b = Leases::new(connect().await.unwrap(), "dl", "b", 1, timeout);
        let fence = leases_a.fence_key(0);
        let lease_a = leases_a.acquire(0).await.unwrap().unwrap();

        // Message 1: two letters and their batch record; message 2: one letter, later.
        let first = [
            entry(1_000, 1, 0, "{\"n\":1}"),
            entry(1_000, 1, 1, "{\"n\":2}"),
            entry(1_000, 1, BATCH_POSITION, "{}"),
        ];
        let second = [
            entry(2_000, 2, 0, "{\"n\":3}"),
            entry(2_000, 2, BATCH_POSITION, "{}"),
        ];
        let store = |lease, seq, batch: &'static [(LetterKey, Vec<u8>)]| {
            let (letters, fence) = (letters.clone(), fence.clone());
            async move {
                (letters.store((lease, &fence), 0, seq, TENANT, batch, NO_LIMITS))
                    .await
                    .unwrap()
            }
        };
        let first: &'static [_] = Box::leak(Box::new(first));
        let second: &'static [_] = Box::leak(Box::new(second));
        assert_eq!(store(lease_a, 1, first).await, Stored::Written);
        assert_eq!(store(lease_a, 2, second).await, Stored::Written);
        // The same message again (a new owner replaying the stream): nothing written twice.
        assert_eq!(store(lease_a, 1, first).await, Stored::Already);
        let bytes = letters.bytes(TENANT).await.unwrap();
        let expected: u64 = (first.iter().chain(second.iter()))
            .map(|(_, value)| 36 + value.len() as u64)
            .sum();
        assert_eq!(bytes, expected);

        // Newest first, two per page, batch records examined but not returned.
        let page = |before: Option<LetterKey>, limit| {
            let letters = letters.clone();
            async move {
                letters
                    .page(
                        TENANT,
                        (0, Micros::MAX),
                        before.as_ref(),
                        (limit, 100),
                        keep_all,
                    )
                    .await
                    .unwrap()
            }
        };
        let one = page(None, 2).await;
        let keys: Vec<LetterKey> = one.letters.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![second[0].0, first[1].0]);
        let two = page(one.next, 2).await;
        let keys: Vec<LetterKey> = two.letters.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![first[0].0]);
        assert_eq!(two.next, None);
        let range = letters
            .page(TENANT, (0, 2_000), None, (10, 100), keep_all)
            .await
            .unwrap();
        assert_eq!(
            range.letters.len(),
            2,
            "[from, to) leaves the later one out"
        );
        assert_eq!(
            letters
                .get(TENANT, &[batch_key(&first[0].0)])
                .await
                .unwrap(),
            vec![Some(b"{}".to_vec())]
        );

        // A replay removes one letter and rewrites another; the owner's late re-write of the
        // same message does not bring the removed one back.
        letters
            .update(
                TENANT,
                &[(first[1].0, b"{\"n\":22}".to_vec())],
                &[first[0].0],
            )
            .await
            .unwrap();
        assert_eq!(store(lease_a, 1, first).await, Stored::Already);
        let all = page(None, 10).await;
        let values: Vec<&[u8]> = all.letters.iter().map(|(_, v)| &v[..]).collect();
        assert_eq!(values, vec![&b"{\"n\":3}"[..], &b"{\"n\":22}"[..]]);

        // Another node takes the partition: the old owner's writes are fenced out.
        tokio::time::sleep(timeout * 2).await;
        let lease_b = leases_b.acquire(0).await.unwrap().unwrap();
        let third: &'static [_] = Box::leak(Box::new([entry(3_000, 3, 0, "{\"n\":4}")]));
        assert_eq!(store(lease_a, 3, third).await, Stored::Fenced);
        assert_eq!(page(None, 10).await.letters.len(), 2);
        assert_eq!(store(lease_b, 3, third).await, Stored::Written);

        // Limits: older than 1,500 goes, then the oldest beyond the size cap.
        let aged = Limits {
            oldest: 1_500,
            max_bytes: u64::MAX,
        };
        assert_eq!(
            letters.trim(TENANT, aged).await.unwrap(),
            1,
            "the letter counts; its batch record goes with it"
        );
        let capped = Limits {
            oldest: 0,
            max_bytes: 36 + 7,
        };
        letters.trim(TENANT, capped).await.unwrap();
        let left = page(None, 10).await;
        assert_eq!(left.letters.len(), 1);
        assert_eq!(left.letters[0].0, third[0].0);
        assert!(letters.bytes(TENANT).await.unwrap() <= 36 + 7);
        let user_letter = crate::deadletter::DeadLetter {
            received_at: 3_500,
            batch_id: "b".into(),
            position: 0,
            endpoint: "/v1/batch".into(),
            client_ip: None,
            event_name: "x".into(),
            event: crate::event::IncomingEvent {
                user_id: Some("gone".into()),
                ..Default::default()
            },
            shared: Default::default(),
            reason: crate::schema::Violation {
                event: "x".into(),
                schema_version: None,
                errors: Vec::new(),
            },
            checked_at: 3_500,
            replays: 0,
        }
        .encode();
        assert!(crate::deadletter::names_user(&user_letter, "gone"));
        let named: &'static [_] = Box::leak(Box::new([(key(TENANT, 3_500, 4, 0), user_letter)]));
        assert_eq!(store(lease_b, 4, named).await, Stored::Written);
        assert_eq!(letters.erase_user(TENANT, "gone").await.unwrap(), 1);
        assert_eq!(letters.erase_user(TENANT, "gone").await.unwrap(), 0);
        assert_eq!(page(None, 10).await.letters.len(), 1);
        letters.delete_all(TENANT).await.unwrap();
        assert_eq!(page(None, 10).await.letters.len(), 0);
        assert_eq!(letters.bytes(TENANT).await.unwrap(), 0);

        // One request's 600 letters share a receipt time: pages of 100 still take each once,
        // and a cursor of another tenant is ignored, not scanned past.
        let many: Vec<(LetterKey, Vec<u8>)> = (0..600).map(|n| entry(5_000, 5, n, "{}")).collect();
        let many: &'static [_] = Box::leak(many.into_boxed_slice());
        assert_eq!(store(lease_b, 5, many).await, Stored::Written);
        let (mut seen, mut before) = (Vec::new(), None);
        loop {
            let next = page(before, 1000).await;
            seen.extend(next.letters.iter().map(|(key, _)| *key));
            match next.next {
                Some(cursor) => before = Some(cursor),
                None => break,
            }
        }
        let mut expected: Vec<LetterKey> = many.iter().map(|(key, _)| *key).collect();
        expected.reverse();
        assert_eq!(seen, expected);
        let foreign = key(TenantId(0x01), 9_999, 0, 0);
        let all = letters
            .page(
                TENANT,
                (0, Micros::MAX),
                Some(&foreign),
                (1000, 1000),
                keep_all,
            )
            .await
            .unwrap();
        assert_eq!(all.letters.len(), 600);
    }
}
