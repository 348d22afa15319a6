//! Partition checkpoints in the object store, on the local folder and on an S3-compatible
//! server (moto, `testkit::s3`): the latest is the one that covers most, whoever wrote it;
//! rewriting one is harmless; pruning keeps the newest two; a damaged object is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::runtime;

use statsremote::cluster::checkpoint::Checkpoints;
use statsremote::storage::cold::ColdStore;
use testkit::s3::S3Server;

fn behaves(store: &ColdStore) {
    runtime().block_on(async {
        let checkpoints = Checkpoints::new(store.clone());
        assert_eq!(checkpoints.latest(5).await.unwrap(), None);
        checkpoints.write(5, 100, 1, b"state at 100").await.unwrap();
        // A retry of the same checkpoint is harmless.
        checkpoints.write(5, 100, 1, b"state at 100").await.unwrap();
        checkpoints.write(5, 250, 2, b"state at 250").await.unwrap();
        // A node that lost its lease writes late, at a lower sequence: the latest stays.
        checkpoints.write(5, 200, 1, b"state at 200").await.unwrap();
        // Another partition is apart.
        checkpoints.write(6, 999, 3, b"other").await.unwrap();
        let latest = checkpoints.latest(5).await.unwrap().unwrap();
        assert_eq!((latest.covered, latest.token), (250, 2));
        assert_eq!(&latest.body[..], b"state at 250");
        assert_eq!(checkpoints.prune(5).await.unwrap(), 1);
        assert_eq!(checkpoints.prune(5).await.unwrap(), 0);
        assert_eq!(checkpoints.latest(5).await.unwrap().unwrap().covered, 250);
        assert_eq!(checkpoints.latest(6).await.unwrap().unwrap().covered, 999);

        // A damaged object is an error, not a state.
        store
            .put(
                "checkpoints/partition=7/00000000000000000001-00000000000000000001.ckpt",
                bytes::Bytes::from_static(b"SRCK\x01garbage"),
            )
            .await
            .unwrap();
        assert!(checkpoints.latest(7).await.is_err());
    });
}

#[test]
fn checkpoints_in_the_local_folder() {
    let dir = tempfile::tempdir().unwrap();
    behaves(&ColdStore::local(&dir.path().join("store")).unwrap());
}

#[test]
fn checkpoints_on_an_s3_compatible_server() {
    let server = S3Server::start().unwrap();
    server.create_bucket("checkpoints").unwrap();
    behaves(&common::s3_store(&server, "checkpoints", "cluster"));
}
