//! Entry points for the fuzz targets under `fuzz/` (cargo-fuzz), one per parser of untrusted
//! input. The targets call these and nothing else, and `tests/fuzz_corpora.rs` runs every file
//! of the seed corpora (`fuzz/corpus/<target>/`) through them in CI, so a crash found by
//! fuzzing becomes a regression test by adding its input to the corpus.
//!
//! Besides "never panics", each checks what must hold of its output.

use crate::event::{BatchShared, EventKind, LogBatch, LogBatchView};
use crate::http::body;
use crate::http::segment::{self, ParseLimits, Route};
use crate::json::{Members, MergeBase};
use crate::storage::codec;

const LIMITS: ParseLimits = ParseLimits {
    max_event_bytes: 64 * 1024,
    max_events: 1000,
    max_event_members: 1000,
};

/// A fuzz target's entry point.
pub type Entry = fn(&[u8]);

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs` and of the corpora).
pub const TARGETS: [(&str, Entry); 8] = [
    ("segment_json", segment_json),
    ("segment_ndjson", segment_ndjson),
    ("decode_gzip", decode_gzip),
    ("decode_deflate", decode_deflate),
    ("decode_zstd", decode_zstd),
    ("decode_br", decode_br),
    ("log_codec", log_codec),
    ("config", config),
];

/// A Segment JSON body on every route, the key scan, and the batch-context merge.
pub fn segment_json(data: &[u8]) {
    for route in [Route::Batch, Route::Single(EventKind::Track)] {
        let _ = segment::find_write_key(route, false, data);
        if let Ok(parsed) = segment::parse_json(route, data, &LIMITS) {
            assert!(parsed.events.len() + parsed.rejected.len() <= LIMITS.max_events);
            if let Some(context) = &parsed.shared.context {
                merge_consistently(context, &parsed.events);
            }
        }
    }
}

/// Merging each event's own context over the batch's gives the size the parser checked.
fn merge_consistently(base: &str, events: &[crate::event::IncomingEvent]) {
    let Ok(base) = MergeBase::parse(base) else {
        return;
    };
    for event in events {
        let own = event.context.as_deref();
        let merged = base.merge(own);
        assert!(serde_json::from_str::<serde_json::Value>(&merged).is_ok());
        let own_members = own.and_then(|text| serde_json::from_str::<Members<'_>>(text).ok());
        if own.is_none() || own_members.is_some() {
            assert_eq!(base.merged_len(own.zip(own_members.as_ref())), merged.len());
        }
    }
}

/// NDJSON bodies and their key scan.
pub fn segment_ndjson(data: &[u8]) {
    let _ = segment::find_write_key(Route::Batch, true, data);
    if let Ok(parsed) = segment::parse_ndjson(data, &LIMITS) {
        assert!(parsed.events.len() + parsed.rejected.len() <= LIMITS.max_events);
    }
}

fn decode(encoding: &str, data: &[u8]) {
    let limit = 256 * 1024;
    if let Ok(bytes) = body::decode(encoding, data, limit) {
        assert!(bytes.len() <= limit);
    }
}

pub fn decode_gzip(data: &[u8]) {
    decode("gzip", data);
}

pub fn decode_deflate(data: &[u8]) {
    decode("deflate", data);
}

pub fn decode_zstd(data: &[u8]) {
    decode("zstd", data);
}

pub fn decode_br(data: &[u8]) {
    decode("br", data);
}

/// A stored log entry, as the readers decode it: whole, with its trailer, and as a view.
pub fn log_codec(data: &[u8]) {
    let Ok(plain) = codec::plain(data) else {
        return;
    };
    let _ = plain.decode_with_trailer::<LogBatch, BatchShared>();
    let _ = plain.decode::<LogBatchView<'_>>();
}

/// A configuration file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::from_toml(text);
    }
}
