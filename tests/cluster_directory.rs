//! The shared tenant directory on a private `nats-server -js` (`testkit::services`): a record
//! written by one node reaches another node's follower within a second, with every change and
//! deletion, a node that starts later reads the whole directory first, and a follower keeps
//! following across a NATS restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::runtime;

use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use statsremote::cluster::directory::{self, DirectoryChange, SharedDirectory};
use statsremote::cluster::stream::connect_jetstream;
use statsremote::config::{Config, Overrides, TenantDefaults};
use statsremote::ids::TenantId;
use statsremote::storage::Storage;
use statsremote::tenant::{
    digest, KeyCheck, KeyKind, TenantDirectory, TenantRecord, TenantSettings,
};
use testkit::services::Service;

const TIMEOUT: Duration = Duration::from_secs(2);

fn defaults() -> TenantDefaults {
    Config::load_from(&Overrides::default(), &[])
        .unwrap()
        .tenant_defaults
}

fn record(id: u64, name: &str) -> TenantRecord {
    TenantRecord {
        id: TenantId(id),
        name: name.to_string(),
        created_at: 1_700_000_000_000_000,
        settings: TenantSettings::from_defaults(&defaults()),
        write_key_digest: digest(&format!("sr_write_{name}")),
        read_key_digest: digest(&format!("sr_read_{name}")),
        user_hash_key: [7; 32],
    }
}

async fn node(nats: &Service) -> SharedDirectory {
    let js = connect_jetstream(&nats.url(), TIMEOUT).await.unwrap();
    SharedDirectory::open(&js, "test", 1, defaults())
        .await
        .unwrap()
}

/// The next change, within `within`.
async fn next(
    changes: &mut (impl Stream<Item = DirectoryChange> + Unpin),
    within: Duration,
) -> DirectoryChange {
    tokio::time::timeout(within, changes.next())
        .await
        .unwrap_or_else(|_| panic!("no change within {within:?}"))
        .expect("the follow goes on")
}

#[test]
fn changes_reach_every_node_within_a_second() {
    let nats = Service::nats().unwrap();
    runtime().block_on(async {
        let a = node(&nats).await;
        let b = node(&nats).await;
        let mut followed = Box::pin(b.follow());
        assert_eq!(
            next(&mut followed, TIMEOUT).await,
            DirectoryChange::CaughtUp
        );

        let mut x = record(0x11, "x");
        let written = Instant::now();
        a.put(&x).await.unwrap();
        let seen = next(&mut followed, Duration::from_secs(1)).await;
        assert_eq!(seen, DirectoryChange::Upsert(Box::new(x.clone())));
        eprintln!(
            "a new tenant reached the other node in {:?}",
            written.elapsed()
        );

        // A settings change and a key rotation arrive as new records.
        x.settings.rate_limit_events_per_second = 7;
        x.settings.sampling.default = 4;
        x.read_key_digest = digest("sr_read_rotated");
        a.put(&x).await.unwrap();
        let seen = next(&mut followed, Duration::from_secs(1)).await;
        assert_eq!(seen, DirectoryChange::Upsert(Box::new(x.clone())));

        a.remove(x.id).await.unwrap();
        let seen = next(&mut followed, Duration::from_secs(1)).await;
        assert_eq!(seen, DirectoryChange::Removed(x.id));
        assert!(a.ever_used(x.id).await.unwrap(), "a deleted id stays used");
        assert!(!a.ever_used(TenantId(0x99)).await.unwrap());

        let y = record(0x22, "y");
        a.put(&y).await.unwrap();
        assert_eq!(
            next(&mut followed, Duration::from_secs(1)).await,
            DirectoryChange::Upsert(Box::new(y.clone()))
        );

        // A node that starts now reads the directory as it is, then follows.
        let c = node(&nats).await;
        let mut late = Box::pin(c.follow());
        let mut first = Vec::new();
        loop {
            match next(&mut late, TIMEOUT).await {
                DirectoryChange::CaughtUp => break,
                change => first.push(change),
            }
        }
        assert_eq!(
            first,
            vec![
                DirectoryChange::Removed(x.id),
                DirectoryChange::Upsert(Box::new(y.clone()))
            ]
        );
    });
}

#[test]
fn a_follower_keeps_following_across_a_nats_restart() {
    let mut nats = Service::nats().unwrap();
    runtime().block_on(async {
        let a = node(&nats).await;
        let b = node(&nats).await;
        let mut followed = Box::pin(b.follow());
        assert_eq!(
            next(&mut followed, TIMEOUT).await,
            DirectoryChange::CaughtUp
        );
        let x = record(0x33, "x");
        a.put(&x).await.unwrap();
        assert!(matches!(
            next(&mut followed, TIMEOUT).await,
            DirectoryChange::Upsert(_)
        ));

        nats.restart().unwrap();
        // Writes are refused until the client has reconnected; then the follower sees them.
        let y = record(0x44, "y");
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(error) = a.put(&y).await {
            assert!(Instant::now() < deadline, "{error}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let seen = loop {
            match next(&mut followed, Duration::from_secs(15)).await {
                // The watch may deliver the current records again after it resumes.
                DirectoryChange::Upsert(record) if record.id == y.id => break record,
                _ => continue,
            }
        };
        assert_eq!(*seen, y);
    });
}

/// A node's in-memory directory follows the shared one: keys of a new tenant work, a rotated
/// key stops working at once (and its long-lived uses are told), a deleted tenant's keys too.
#[test]
fn a_nodes_directory_mirrors_the_shared_one() {
    let nats = Service::nats().unwrap();
    let data = tempfile::tempdir().unwrap();
    let storage = Storage::open(data.path(), 1 << 20, Default::default()).unwrap();
    let local = TenantDirectory::load(storage, defaults(), digest("admin-token")).unwrap();
    runtime().block_on(async {
        let a = node(&nats).await;
        let b = node(&nats).await;
        let mut followed = Box::pin(b.follow());
        let apply_next = |changes: DirectoryChange| directory::apply(&local, changes);
        assert!(apply_next(next(&mut followed, TIMEOUT).await), "caught up at once");

        let mut x = record(0x55, "x");
        a.put(&x).await.unwrap();
        apply_next(next(&mut followed, TIMEOUT).await);
        assert!(matches!(local.check_key("sr_write_x"), KeyCheck::Valid(r, KeyKind::Write) if r.id == x.id));
        let mut watch = local.watch_key("sr_read_x");

        x.read_key_digest = digest("sr_read_rotated");
        a.put(&x).await.unwrap();
        apply_next(next(&mut followed, TIMEOUT).await);
        assert!(matches!(local.check_key("sr_read_x"), KeyCheck::Unknown));
        assert!(matches!(local.check_key("sr_read_rotated"), KeyCheck::Valid(..)));
        tokio::time::timeout(TIMEOUT, watch.revoked(&local))
            .await
            .expect("the old key's watch is told");

        a.remove(x.id).await.unwrap();
        apply_next(next(&mut followed, TIMEOUT).await);
        assert!(matches!(local.check_key("sr_write_x"), KeyCheck::Unknown));
        assert!(local.get(x.id).is_none());
    });
}
