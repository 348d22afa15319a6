//! Per-tenant rate limits on events (not requests), with governor's GCRA.
//!
//! A request of `n` events takes `n` cells at once: all of them or none. Limiters are created on
//! a tenant's first request and rebuilt when its settings change, so a PATCH through the admin
//! API takes effect on the next request.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::tenant::{TenantId, TenantRecord};

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

struct TenantLimiter {
    events_per_second: u32,
    burst: u32,
    limiter: Limiter,
}

/// The request may proceed.
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    pub limit: u32,
    pub remaining: u32,
}

/// The request may not proceed.
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    /// Over the rate: retry after this long.
    Later { retry_after: Duration, limit: u32 },
    /// More events in one request than the burst allows: it can never pass.
    LargerThanBurst { events: u32, burst: u32 },
}

#[derive(Default)]
pub struct RateLimits {
    limiters: DashMap<TenantId, Arc<TenantLimiter>>,
    clock: DefaultClock,
}

impl RateLimits {
    /// Takes `events` cells from the tenant's bucket, or says why not.
    pub fn check(&self, tenant: &TenantRecord, events: usize) -> Result<Admitted, Refused> {
        let settings = &tenant.settings;
        let limiter = self.limiter(tenant);
        let events = u32::try_from(events).unwrap_or(u32::MAX);
        let Some(cells) = NonZeroU32::new(events) else {
            return Ok(Admitted {
                limit: settings.rate_limit_events_per_second,
                remaining: settings.rate_limit_burst,
            });
        };
        match limiter.limiter.check_n(cells) {
            Ok(Ok(snapshot)) => Ok(Admitted {
                limit: limiter.events_per_second,
                remaining: snapshot.remaining_burst_capacity(),
            }),
            Ok(Err(not_until)) => Err(Refused::Later {
                retry_after: not_until.wait_time_from(self.clock.now()),
                limit: limiter.events_per_second,
            }),
            Err(_insufficient) => Err(Refused::LargerThanBurst {
                events,
                burst: limiter.burst,
            }),
        }
    }

    fn limiter(&self, tenant: &TenantRecord) -> Arc<TenantLimiter> {
        let settings = &tenant.settings;
        if let Some(existing) = self.limiters.get(&tenant.id) {
            if existing.events_per_second == settings.rate_limit_events_per_second
                && existing.burst == settings.rate_limit_burst
            {
                return Arc::clone(existing.value());
            }
        }
        let fresh = Arc::new(build(
            settings.rate_limit_events_per_second,
            settings.rate_limit_burst,
        ));
        self.limiters.insert(tenant.id, Arc::clone(&fresh));
        fresh
    }

    /// Forgets a tenant's limiter (tenant deleted).
    pub fn forget(&self, tenant: TenantId) {
        self.limiters.remove(&tenant);
    }
}

fn build(events_per_second: u32, burst: u32) -> TenantLimiter {
    let rate = NonZeroU32::new(events_per_second).unwrap_or(NonZeroU32::MIN);
    let burst_cells = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::per_second(rate).allow_burst(burst_cells);
    TenantLimiter {
        events_per_second,
        burst,
        limiter: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
    }
}
