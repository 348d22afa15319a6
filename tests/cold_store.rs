//! Storage conformance: the cold tier's object-store operations behave the same on the local
//! folder and on an S3-compatible server (moto, from the project-local Python environment):
//! overwrite, conditional create, multipart upload of a large segment, listing, rename and
//! deletion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::runtime;

use bytes::Bytes;
use statsremote::event::{EventKind, StoredEvent};
use statsremote::storage::cold::segment::{self, ColdRow};
use statsremote::storage::cold::store::PART_BYTES;
use statsremote::storage::cold::ColdStore;
use testkit::s3::S3Server;

/// Rows whose properties do not compress, so that their segment is larger than one part.
fn large_segment() -> (Vec<ColdRow>, Bytes) {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut noise = || {
        (0..8)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                format!("{state:016x}")
            })
            .collect::<String>()
    };
    let mut rows = Vec::new();
    let mut bytes = Bytes::new();
    while bytes.len() <= PART_BYTES {
        for _ in 0..20_000 {
            let seq = rows.len() as u64 + 1;
            rows.push(ColdRow {
                seq,
                batch_id: u128::from(seq),
                endpoint: "/v1/batch".into(),
                client_ip: None,
                extras: None,
                event: StoredEvent {
                    kind: EventKind::Track,
                    message_id: format!("m{seq}"),
                    name: Some("Large".into()),
                    user_id: Some(format!("u{}", seq % 97)),
                    anonymous_id: None,
                    group_id: None,
                    previous_id: None,
                    timestamp: 1_700_000_000_000_000 + seq as i64,
                    original_timestamp: None,
                    sent_at: None,
                    received_at: 1_700_000_000_000_000,
                    user_hash: seq,
                    library_name: None,
                    library_version: None,
                    flags: 0,
                    properties: Some(format!("{{\"noise\":\"{}\"}}", noise())),
                    traits: None,
                    context: None,
                    integrations: None,
                    extra: Vec::new(),
                },
            });
        }
        bytes = segment::encode(&rows).unwrap();
    }
    (rows, bytes)
}

fn conformance(store: &ColdStore) {
    let rt = runtime();
    rt.block_on(async {
        // Put, get, overwrite.
        store
            .put("events/a/one.parquet", Bytes::from_static(b"first"))
            .await
            .unwrap();
        store
            .put("events/a/one.parquet", Bytes::from_static(b"second"))
            .await
            .unwrap();
        assert_eq!(store.get("events/a/one.parquet").await.unwrap(), "second");

        // Conditional create: only the first writer of a name wins.
        assert!(store
            .put_new("manifest/t/0001.json", Bytes::from_static(b"{}"))
            .await
            .unwrap());
        assert!(!store
            .put_new("manifest/t/0001.json", Bytes::from_static(b"[]"))
            .await
            .unwrap());
        assert_eq!(store.get("manifest/t/0001.json").await.unwrap(), "{}");

        // A segment larger than a part goes up in parts and reads back whole.
        let (rows, bytes) = large_segment();
        assert!(bytes.len() > PART_BYTES, "{} bytes", bytes.len());
        store
            .put("events/a/large.parquet", bytes.clone())
            .await
            .unwrap();
        let read = store.get("events/a/large.parquet").await.unwrap();
        assert_eq!(read.len(), bytes.len());
        assert_eq!(segment::decode(read).unwrap(), rows);

        // Listing: everything under a prefix, with sizes, nothing outside it.
        let mut listed: Vec<(String, u64)> = store
            .list("events/a/")
            .await
            .unwrap()
            .into_iter()
            .map(|object| (object.location.to_string(), object.size))
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            vec![
                ("events/a/large.parquet".to_string(), bytes.len() as u64),
                ("events/a/one.parquet".to_string(), 6),
            ]
        );
        assert!(store.list("events/b/").await.unwrap().is_empty());

        // Rename moves; delete removes; deleting what is gone is no error.
        store
            .rename("events/a/one.parquet", "trash/a/one.parquet")
            .await
            .unwrap();
        assert!(store.get("events/a/one.parquet").await.is_err());
        assert_eq!(store.get("trash/a/one.parquet").await.unwrap(), "second");
        store.delete("trash/a/one.parquet").await.unwrap();
        store.delete("trash/a/one.parquet").await.unwrap();
        store.delete("events/a/large.parquet").await.unwrap();
        assert!(store.list("events/").await.unwrap().is_empty());
        assert!(store.list("trash/").await.unwrap().is_empty());
    });
}

#[test]
fn the_local_folder_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(&ColdStore::local(&dir.path().join("cold")).unwrap());
}

#[test]
fn an_s3_compatible_server_conforms() {
    let server = S3Server::start().unwrap();
    server.create_bucket("conformance").unwrap();
    for prefix in ["", "deployments/one"] {
        conformance(&common::s3_store(&server, "conformance", prefix));
    }
}
