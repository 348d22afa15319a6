//! Readiness of cluster mode's engines, for `/readyz`: Redis and NATS (private instances,
//! `testkit::services`) are reported ready, not ready within the check's timeout once killed,
//! and ready again after a restart; a node's default name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::runtime;
use statsremote::cluster::stream::{connect_jetstream, EventStream};
use statsremote::cluster::{connect_redis, nats_ready, redis_ready, ClusterConfig};
use statsremote::config::{Config, Overrides};
use testkit::services::Service;

/// Waits until `check` gives `want` (true: ready), at most 20 s.
async fn until<F, Fut>(want: bool, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = check().await;
        if got.is_ok() == want {
            return;
        }
        assert!(Instant::now() < deadline, "still {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn engines_are_reported_as_they_are() {
    let mut redis = Service::redis().unwrap();
    let mut nats = Service::nats().unwrap();
    runtime().block_on(async {
        let manager = connect_redis(&redis.url(), Duration::from_secs(1))
            .await
            .unwrap();
        let js = connect_jetstream(&nats.url(), Duration::from_secs(1))
            .await
            .unwrap();
        EventStream::open(js.clone(), "ready", 1, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(redis_ready(&manager).await, Ok(()));
        assert_eq!(nats_ready(&js, "READY_EVENTS").await, Ok(()));
        assert!(nats_ready(&js, "NO_SUCH_STREAM").await.is_err());

        redis.kill();
        nats.kill();
        let started = Instant::now();
        let redis_down = redis_ready(&manager).await.unwrap_err();
        assert!(redis_down.starts_with("redis:"), "{redis_down}");
        until(false, || nats_ready(&js, "READY_EVENTS")).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );

        redis.restart().unwrap();
        nats.restart().unwrap();
        until(true, || redis_ready(&manager)).await;
        until(true, || nats_ready(&js, "READY_EVENTS")).await;
    });
}

#[test]
fn a_node_is_named_by_its_setting_or_its_host_and_process() {
    let config: ClusterConfig = Config::load_from(&Overrides::default(), &[])
        .unwrap()
        .cluster;
    let name = config.node_name();
    assert!(
        name.ends_with(&format!("-{}", std::process::id())),
        "{name}"
    );
    let named = ClusterConfig {
        node_id: "process-1".into(),
        ..config
    };
    assert_eq!(named.node_name(), "process-1");
}
