//! Tenant rate limits across ingest nodes: a shared token bucket per tenant in Redis, taken
//! from in chunks by a local limiter on each node, so Redis is asked about once per chunk
//! (a tenth of a second's worth of the tenant's rate), not once per request.
//!
//! Tokens only come out of the shared bucket, so the nodes together never admit more than the
//! tenant's burst plus its rate over time. A node keeps what it took for at most
//! [`HOLD`]; tokens it could not use by then are dropped rather than hoarded, which can leave
//! the cluster admitting a little less than the rate, never more. The bucket refills on
//! Redis's own clock (`TIME` inside the script), so nodes' clocks do not matter. When Redis
//! cannot be reached, each node falls back to its own limiter at the tenant's full rate
//! (counted in [`SharedLimits::fallbacks`]): ingestion goes on, with the limit per node
//! instead of per cluster, until Redis is back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use redis::aio::ConnectionManager;
use redis::Script;

use crate::ids::TenantId;
use crate::ratelimit::{Admitted, RateLimits, Refused};
use crate::tenant::TenantRecord;

/// How long a node keeps tokens it took from the shared bucket.
pub const HOLD: Duration = Duration::from_secs(1);
/// A request to Redis that takes longer counts as Redis being down.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// After Redis failed, how long a node limits on its own before asking Redis again.
const REDIS_RETRY: Duration = Duration::from_secs(1);

/// Takes up to `ARGV[1]` tokens from the bucket `KEYS[1]` of rate `ARGV[2]` per second and
/// capacity `ARGV[3]`; returns how many it took.
const TAKE: &str = r"
local want = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
end
local grant = math.min(want, math.floor(tokens))
tokens = tokens - grant
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', math.max(now, ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return grant
";

/// Tokens a node took from a tenant's shared bucket.
struct Local {
    tokens: u64,
    taken_at: Instant,
    /// The shared bucket had less than a chunk: refuse locally until it can have refilled,
    /// rather than ask Redis on every request of a tenant over its rate.
    empty_until: Option<Instant>,
}

/// The rate limits of one ingest node in a cluster.
pub struct SharedLimits {
    redis: ConnectionManager,
    prefix: String,
    take: Script,
    local: DashMap<TenantId, Mutex<Local>>,
    /// One take from the shared bucket at a time per tenant: requests that miss tokens at once
    /// wait for it rather than each take a chunk, which would hoard the tenant's burst on
    /// one node and refuse on the others.
    fetching: DashMap<TenantId, std::sync::Arc<tokio::sync::Mutex<()>>>,
    fallback: RateLimits,
    redis_calls: AtomicU64,
    fallbacks: AtomicU64,
    /// Redis failed: limit on this node alone until then.
    redis_down_until: Mutex<Option<Instant>>,
}

impl SharedLimits {
    pub fn new(redis: ConnectionManager, prefix: &str) -> SharedLimits {
        SharedLimits {
            redis,
            prefix: prefix.to_string(),
            take: Script::new(TAKE),
            local: DashMap::new(),
            fetching: DashMap::new(),
            fallback: RateLimits::default(),
            redis_calls: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            redis_down_until: Mutex::new(None),
        }
    }

    fn key(&self, tenant: TenantId) -> String {
        format!("{}:ratelimit:{{{tenant}}}", self.prefix)
    }

    /// Requests to Redis so far (for tests and metrics).
    pub fn redis_calls(&self) -> u64 {
        self.redis_calls.load(Ordering::Relaxed)
    }

    /// Checks decided by the local fallback because Redis could not be reached.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Takes `events` tokens for the tenant, all or none, or says why not.
    pub async fn check(&self, tenant: &TenantRecord, events: usize) -> Result<Admitted, Refused> {
        let rate = tenant.settings.rate_limit_events_per_second.max(1);
        let burst = tenant.settings.rate_limit_burst.max(1);
        let wanted = u32::try_from(events).unwrap_or(u32::MAX);
        if wanted > burst {
            return Err(Refused::LargerThanBurst {
                events: wanted,
                burst,
            });
        }
        let wanted = u64::from(wanted);
        let admitted = |left: u64| Admitted {
            limit: rate,
            remaining: u32::try_from(left).unwrap_or(u32::MAX),
        };
        if let Ok(left) = self.take_local(tenant.id, wanted) {
            return Ok(admitted(left));
        }
        let now = Instant::now();
        if self.redis_down(now) {
            return self.fall_back(tenant, events);
        }
        let gate = std::sync::Arc::clone(&self.fetching.entry(tenant.id).or_default());
        let _fetching = gate.lock().await;
        // The take of the request before this one may have brought enough.
        let missing = match self.take_local(tenant.id, wanted) {
            Ok(left) => return Ok(admitted(left)),
            Err(missing) => missing,
        };
        let now = Instant::now();
        if self.redis_down(now) {
            return self.fall_back(tenant, events);
        }
        if let Some(until) = self.empty_until(tenant.id, now) {
            return Err(Refused::Later {
                retry_after: (until - now).max(per_token(missing, rate)),
                limit: rate,
            });
        }
        // A tenth of a second's worth at once, at least what this request lacks.
        let chunk = (u64::from(rate) / 10).max(missing).min(u64::from(burst));
        self.redis_calls.fetch_add(1, Ordering::Relaxed);
        let mut redis = self.redis.clone();
        let mut invocation = self.take.key(self.key(tenant.id));
        invocation.arg(chunk).arg(rate).arg(burst);
        let take = invocation.invoke_async::<u64>(&mut redis);
        let granted = match tokio::time::timeout(REDIS_TIMEOUT, take).await {
            Ok(Ok(granted)) => granted,
            Ok(Err(error)) => return self.redis_failed(&error.to_string(), tenant, events),
            Err(_) => return self.redis_failed("no answer in time", tenant, events),
        };
        let wait = per_token(chunk - granted.min(chunk), rate);
        self.add_local(tenant.id, granted, (!wait.is_zero()).then(|| now + wait));
        match self.take_local(tenant.id, wanted) {
            Ok(left) => Ok(admitted(left)),
            Err(missing) => Err(Refused::Later {
                retry_after: wait.max(per_token(missing, rate)),
                limit: rate,
            }),
        }
    }

    fn redis_down(&self, now: Instant) -> bool {
        let down = self
            .redis_down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        down.is_some_and(|until| now < until)
    }

    fn redis_failed(
        &self,
        why: &str,
        tenant: &TenantRecord,
        events: usize,
    ) -> Result<Admitted, Refused> {
        let mut down = self
            .redis_down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if down.is_none() {
            tracing::warn!(why, "shared rate limits unavailable; limiting per node");
        }
        *down = Some(Instant::now() + REDIS_RETRY);
        drop(down);
        self.fall_back(tenant, events)
    }

    fn fall_back(&self, tenant: &TenantRecord, events: usize) -> Result<Admitted, Refused> {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        self.fallback.check(tenant, events)
    }

    fn empty_until(&self, tenant: TenantId, now: Instant) -> Option<Instant> {
        let entry = self.local.get(&tenant)?;
        let local = entry.lock().unwrap_or_else(|p| p.into_inner());
        local.empty_until.filter(|until| now < *until)
    }

    /// Takes `wanted` tokens from what the node holds: what is left, or how many are missing.
    fn take_local(&self, tenant: TenantId, wanted: u64) -> Result<u64, u64> {
        let entry = self.local.entry(tenant).or_insert_with(|| {
            Mutex::new(Local {
                tokens: 0,
                taken_at: Instant::now(),
                empty_until: None,
            })
        });
        let mut local = entry.lock().unwrap_or_else(|p| p.into_inner());
        if local.taken_at.elapsed() > HOLD {
            local.tokens = 0;
        }
        if local.tokens >= wanted {
            local.tokens -= wanted;
            Ok(local.tokens)
        } else {
            Err(wanted - local.tokens)
        }
    }

    fn add_local(&self, tenant: TenantId, granted: u64, empty_until: Option<Instant>) {
        if let Some(entry) = self.local.get(&tenant) {
            let mut local = entry.lock().unwrap_or_else(|p| p.into_inner());
            if local.taken_at.elapsed() > HOLD {
                local.tokens = 0;
            }
            local.tokens += granted;
            local.taken_at = Instant::now();
            local.empty_until = empty_until;
        }
    }

    /// Forgets a tenant (deleted).
    pub fn forget(&self, tenant: TenantId) {
        self.local.remove(&tenant);
        self.fetching.remove(&tenant);
        self.fallback.forget(tenant);
    }
}

/// How long `tokens` take to refill at `rate` per second.
fn per_token(tokens: u64, rate: u32) -> Duration {
    Duration::from_secs_f64(tokens as f64 / f64::from(rate.max(1)))
}
