//! Live counts fanned out through a private Redis (`testkit::services`): a batch published by
//! one node reaches every other node's subscription, decoded as it was, and subscriptions come
//! back by themselves after a Redis restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::runtime;

use std::time::{Duration, Instant};

use statsremote::cluster::{connect_redis, live};
use statsremote::ids::TenantId;
use statsremote::rollup::RollupItems;
use testkit::services::Service;
use tokio::sync::mpsc::Receiver;

const TENANT: TenantId = TenantId(0xfeed);

fn items() -> RollupItems {
    RollupItems::collect([
        ("signup", 1_000, 7),
        ("view", 2_000, 8),
        ("signup", 3_000, 9),
    ])
}

/// Publishes until `subscribers` nodes are subscribed, then waits for each to receive.
async fn deliver(redis: &Service, receivers: &mut [Receiver<(TenantId, RollupItems)>]) {
    let publisher = connect_redis(&redis.url(), Duration::from_secs(5))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reached = live::publish(&publisher, "test", TENANT, &items()).await;
        if reached.is_ok_and(|n| n >= receivers.len() as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "subscribers did not subscribe");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for receiver in receivers {
        // Earlier attempts may have reached some: take the latest within the second.
        let got = tokio::time::timeout(Duration::from_secs(1), receiver.recv())
            .await
            .expect("delivered within a second")
            .expect("subscription open");
        assert_eq!(got.0, TENANT);
        assert_eq!(got.1.names(), items().names());
        assert_eq!(got.1.items(), items().items());
        while receiver.try_recv().is_ok() {}
    }
}

#[test]
fn every_node_receives_the_batches_and_resubscribes_after_a_restart() {
    let mut redis = Service::redis().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut receivers = vec![
            live::subscribe(&redis.url(), "test", 64).unwrap(),
            live::subscribe(&redis.url(), "test", 64).unwrap(),
        ];
        deliver(&redis, &mut receivers).await;
        redis.restart().unwrap();
        deliver(&redis, &mut receivers).await;
    });
}
