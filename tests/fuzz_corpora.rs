//! Every seed of the fuzz corpora (`fuzz/corpus/<target>/`) through the fuzz targets' entry
//! points (`statsremote::fuzzing`), as an ordinary test: inputs that once crashed a parser
//! stay fixed. `cargo test --test fuzz_corpora -- --ignored write_seeds` writes the seeds that
//! are made by the project's own encoders (compressed bodies, log entries).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};

use statsremote::event::{BatchShared, BatchSource, EventKind, LogBatch, StoredEvent};
use statsremote::fuzzing::TARGETS;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

#[test]
fn every_seed_passes_its_target() {
    for (target, entry) in TARGETS {
        let dir = corpus(target);
        let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "no seeds for {target}");
        for seed in seeds {
            let data = std::fs::read(&seed).unwrap();
            let outcome = std::panic::catch_unwind(|| entry(&data));
            assert!(outcome.is_ok(), "{target} panicked on {}", seed.display());
        }
    }
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = corpus(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn sample_body() -> Vec<u8> {
    serde_json::json!({
        "writeKey": "sr_write_seed",
        "sentAt": "2026-01-02T03:04:06.000Z",
        "context": {"library": {"name": "analytics-node", "version": "1.0"}, "ip": "1.2.3.4"},
        "batch": [
            {"type": "track", "event": "Signed Up", "userId": "u1", "messageId": "m1",
             "properties": {"plan": "pro"}, "context": {"locale": "en"}},
            {"type": "identify", "anonymousId": "a1", "traits": {"email": "x@example.com"}},
            {"type": "page", "userId": 7, "name": "Home", "timestamp": "2026-01-02T03:04:05Z"}
        ]
    })
    .to_string()
    .into_bytes()
}

#[test]
#[ignore = "writes the generated seeds into fuzz/corpus"]
fn write_seeds() {
    let body = sample_body();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&body).unwrap();
    write("decode_gzip", "batch.gz", &gzip.finish().unwrap());
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    zlib.write_all(&body).unwrap();
    write("decode_deflate", "batch.zlib", &zlib.finish().unwrap());
    let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    raw.write_all(&body).unwrap();
    write("decode_deflate", "batch.deflate", &raw.finish().unwrap());
    write(
        "decode_zstd",
        "batch.zst",
        &zstd::stream::encode_all(&body[..], 3).unwrap(),
    );
    let mut br = Vec::new();
    brotli::BrotliCompress(&mut &body[..], &mut br, &Default::default()).unwrap();
    write("decode_br", "batch.br", &br);

    let event = |id: &str, context: Option<&str>| StoredEvent {
        kind: EventKind::Track,
        message_id: id.into(),
        name: Some("Signed Up".into()),
        user_id: Some("u1".into()),
        anonymous_id: None,
        group_id: None,
        previous_id: None,
        timestamp: 1_767_323_045_000_000,
        original_timestamp: None,
        sent_at: None,
        received_at: 1_767_323_046_000_000,
        user_hash: 42,
        library_name: Some("analytics-node".into()),
        library_version: None,
        flags: 0,
        properties: Some(r#"{"plan":"pro"}"#.into()),
        traits: None,
        context: context.map(str::to_string),
        integrations: None,
        extra: vec![("channel".into(), r#""server""#.into())],
    };
    let mut batch = LogBatch {
        batch_id: 7,
        received_at: 1_767_323_046_000_000,
        source: BatchSource {
            endpoint: "/v1/batch".into(),
            client_ip: Some("1.2.3.0".into()),
        },
        events: vec![event("m1", None), event("m2", Some(r#"{"locale":"en"}"#))],
        shared: BatchShared::default(),
        extras: Vec::new(),
    };
    use statsremote::storage::codec;
    write("log_codec", "entry-v1", &codec::encode(&batch).unwrap());
    write(
        "log_codec",
        "entry-v3-lz4",
        &codec::encode_compressed(&batch).unwrap(),
    );
    batch.shared.context = Some(r#"{"library":{"name":"x"}}"#.into());
    let shared = BatchShared {
        context: batch.shared.context.clone(),
        integrations: Some(r#"{"All":true}"#.into()),
    };
    write(
        "log_codec",
        "entry-v3-lz4-shared",
        &codec::encode_compressed(&(&batch, &shared)).unwrap(),
    );
}
