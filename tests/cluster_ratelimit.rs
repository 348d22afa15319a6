//! Tenant rate limits shared by ingest nodes through a private Redis (`testkit::services`):
//! two nodes together admit the tenant's burst plus its rate, not twice that, asking Redis
//! once per chunk rather than per request; and they fall back to per-node limits while Redis
//! is down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::runtime;

use std::time::{Duration, Instant};

use statsremote::cluster::connect_redis;
use statsremote::cluster::ratelimit::SharedLimits;
use statsremote::config::{Config, Overrides};
use statsremote::ids::TenantId;
use statsremote::ratelimit::Refused;
use statsremote::tenant::{digest, TenantRecord, TenantSettings};
use testkit::services::Service;

fn tenant(rate: u32, burst: u32) -> TenantRecord {
    let defaults = Config::load_from(&Overrides::default(), &[])
        .unwrap()
        .tenant_defaults;
    let mut settings = TenantSettings::from_defaults(&defaults);
    settings.rate_limit_events_per_second = rate;
    settings.rate_limit_burst = burst;
    TenantRecord {
        id: TenantId(0x5eed),
        name: "limited".into(),
        created_at: 0,
        settings,
        write_key_digest: digest("w"),
        read_key_digest: digest("r"),
        user_hash_key: [1; 32],
    }
}

async fn node(redis: &Service) -> SharedLimits {
    let manager = connect_redis(&redis.url(), Duration::from_secs(60))
        .await
        .unwrap();
    SharedLimits::new(manager, "test")
}

#[test]
fn two_nodes_admit_the_tenants_rate_once_not_twice() {
    let redis = Service::redis().unwrap();
    runtime().block_on(async {
        let a = node(&redis).await;
        let b = node(&redis).await;
        let tenant = tenant(2000, 1000);
        let started = Instant::now();
        let (mut admitted, mut requests) = (0u64, 0u64);
        while started.elapsed() < Duration::from_secs(2) {
            for limits in [&a, &b] {
                requests += 1;
                match limits.check(&tenant, 10).await {
                    Ok(_) => admitted += 10,
                    Err(Refused::Later { retry_after, .. }) => {
                        assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}");
                    }
                    Err(other) => panic!("{other:?}"),
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let ceiling = 1000.0 + 2000.0 * elapsed;
        eprintln!(
            "{admitted} events admitted in {elapsed:.2} s (at most {ceiling:.0}), \
             {requests} requests, {} Redis calls",
            a.redis_calls() + b.redis_calls()
        );
        // Never more than the burst plus the rate, by both nodes together.
        assert!(admitted as f64 <= ceiling + 20.0, "{admitted} > {ceiling}");
        // Little is lost to tokens held by the other node.
        assert!(
            admitted as f64 >= 0.8 * ceiling,
            "{admitted} < 0.8 × {ceiling}"
        );
        // Redis is asked once per chunk (a tenth of a second's worth), not per request.
        assert!(a.redis_calls() + b.redis_calls() < requests / 5);
        // A request larger than the burst can never pass.
        assert!(matches!(
            a.check(&tenant, 1001).await,
            Err(Refused::LargerThanBurst { .. })
        ));
    });
}

#[test]
fn nodes_limit_on_their_own_while_redis_is_down() {
    let mut redis = Service::redis().unwrap();
    runtime().block_on(async {
        let a = node(&redis).await;
        let tenant = tenant(1000, 100);
        assert!(a.check(&tenant, 100).await.is_ok());
        redis.kill();
        // The node's own limiter takes over: its burst passes, more is refused.
        let mut admitted = 0;
        for _ in 0..50 {
            if a.check(&tenant, 10).await.is_ok() {
                admitted += 10;
            }
        }
        assert!((100..=200).contains(&admitted), "{admitted}");
        assert!(a.fallbacks() > 0);
        redis.restart().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // Once it is back, checks are decided by Redis again.
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (calls, fallbacks) = (a.redis_calls(), a.fallbacks());
            let _ = a.check(&tenant, 10).await;
            if a.redis_calls() > calls && a.fallbacks() == fallbacks {
                break;
            }
            assert!(Instant::now() < deadline, "Redis was not used again");
        }
    });
}
