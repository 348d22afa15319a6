#![allow(clippy::unwrap_used)]
use super::*;
use crate::storage::cold::flush::rows_of;
use crate::storage::cold::manifest::Segment;
use crate::storage::cold::segment::ColdRow;
use crate::storage::event_log::{encode_entry, tests::batch};
use crate::storage::{meta, Storage};
use std::ops::ControlFlow;

const T: TenantId = TenantId(77);

/// A data dir with three entries of the tenant, received long ago, events in two hours, and
/// the rollup and dedup watermarks past them; plus a local store.
fn setup() -> (tempfile::TempDir, Storage, ColdStore) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&dir.path().join("db"), 1 << 20, Default::default()).unwrap();
    let store = ColdStore::local(&dir.path().join("cold")).unwrap();
    let mut seq = 1;
    for (n, ids) in [&["a", "b"][..], &["c"], &["d", "e", "f"]]
        .iter()
        .enumerate()
    {
        let mut entry = batch(ids);
        entry.received_at = 1_000 + n as Micros;
        entry.shared.context = Some(r#"{"app":"x"}"#.into());
        for (i, event) in entry.events.iter_mut().enumerate() {
            event.timestamp = 10 * HOUR + (n as Micros) * HOUR / 2 + i as Micros;
        }
        storage
            .log()
            .append(T, seq, encode_entry(&entry).unwrap())
            .unwrap();
        seq += ids.len() as u64;
    }
    storage.log().commit(&[(T, 6)], true).unwrap();
    set_watermarks(&storage, 6);
    (dir, storage, store)
}

fn set_watermarks(storage: &Storage, through: u64) {
    for kind in [meta::kind::ROLLUP_WATERMARK, meta::kind::DEDUP_WATERMARK] {
        storage
            .meta
            .insert(meta::tenant_key(kind, T), through.to_be_bytes())
            .unwrap();
    }
}

/// Every event across both tiers: (sequence, messageId, context).
fn everything(storage: &Storage, store: &ColdStore) -> Vec<(u64, String, Option<String>)> {
    let mut out = Vec::new();
    scan_tiers(storage, Some(store), T, 1, None, |first, batch| {
        for (offset, event) in batch.events.iter().enumerate() {
            let context = event
                .context
                .clone()
                .or_else(|| batch.shared.context.clone());
            out.push((first + offset as u64, event.message_id.clone(), context));
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    out
}

fn objects(store: &ColdStore, prefix: &str) -> Vec<String> {
    let mut paths: Vec<String> = block_on(store.list(prefix))
        .unwrap()
        .into_iter()
        .map(|o| o.location.to_string())
        .collect();
    paths.sort();
    paths
}

fn committed(storage: &Storage) -> Vec<String> {
    let mut paths: Vec<String> = segments(storage, T)
        .unwrap()
        .into_iter()
        .map(|s| s.path)
        .collect();
    paths.sort();
    paths
}

#[test]
fn segments_read_back_into_the_events_they_hold() {
    let mut entry = batch(&["a", "b"]);
    entry.events[0].extra = vec![("custom".into(), "[1,2]".into())];
    entry.events[1].properties = Some(r#"{"plan":"pro"}"#.into());
    entry.events[1].original_timestamp = Some(-5);
    let rows: Vec<ColdRow> = rows_of(&entry)
        .enumerate()
        .map(|(i, row)| ColdRow {
            seq: 10 + i as u64,
            ..row
        })
        .collect();
    let bytes = segment::encode(&rows).unwrap();
    assert_eq!(&bytes[..4], b"PAR1");
    assert_eq!(segment::decode(bytes).unwrap(), rows);
}

#[test]
fn a_flush_moves_old_entries_to_hourly_segments_and_deletes_them_from_the_log() {
    let (_dir, storage, store) = setup();
    let before = everything(&storage, &store);
    assert_eq!(before.len(), 6);
    let report = flush_once(&storage, &store, T, 5_000, 1_000, None)
        .unwrap()
        .unwrap();
    assert_eq!((report.through, report.events), (6, 6));
    // Hours 10 (entries 1 and 2) and 11 (entry 3).
    let paths = committed(&storage);
    assert_eq!(
        paths,
        vec![
            "events/tenant=000000000000004d/date=1970-01-01/hour=10/1-3.parquet".to_string(),
            "events/tenant=000000000000004d/date=1970-01-01/hour=11/4-6.parquet".to_string(),
        ]
    );
    assert_eq!(objects(&store, "events/"), paths);
    assert_eq!(cold_watermark(&storage, T).unwrap(), 6);
    assert!(storage.log().read(T, 0, 10).unwrap().is_empty());
    assert_eq!(
        storage.log().head(T).unwrap(),
        6,
        "sequences go on after the flush"
    );
    assert_eq!(objects(&store, "manifest/").len(), 1);
    // The same events, in order, with the batch context merged in.
    let after = everything(&storage, &store);
    assert_eq!(after, before);
    assert!(after
        .iter()
        .all(|(_, _, context)| context.as_deref() == Some(r#"{"app":"x"}"#)));
    assert!(flush_once(&storage, &store, T, 5_000, 1_000, None)
        .unwrap()
        .is_none());
}

#[test]
fn a_flush_stops_at_the_watermarks_the_age_and_the_size_limit() {
    let (_dir, storage, store) = setup();
    set_watermarks(&storage, 3);
    let report = flush_once(&storage, &store, T, 5_000, 1_000, None)
        .unwrap()
        .unwrap();
    assert_eq!(
        report.through, 3,
        "not past the rollup and dedup watermarks"
    );
    set_watermarks(&storage, 6);
    assert!(
        flush_once(&storage, &store, T, 1_002, 1_000, None)
            .unwrap()
            .is_none(),
        "too recent"
    );
    let report = flush_once(&storage, &store, T, 5_000, 1, None)
        .unwrap()
        .unwrap();
    assert_eq!(report.through, 6, "at least one entry, whatever its size");
    assert_eq!(everything(&storage, &store).len(), 6);
}

#[test]
fn a_crash_at_any_step_of_a_flush_loses_and_duplicates_nothing() {
    for fail in [FailPoint::AfterWrite, FailPoint::AfterCommit] {
        let (_dir, storage, store) = setup();
        let before = everything(&storage, &store);
        let error = flush_once(&storage, &store, T, 5_000, 1_000, Some(fail)).unwrap_err();
        assert!(matches!(error, ColdError::Injected(_)), "{error}");
        // What a reader sees right after the crash: every event once.
        assert_eq!(everything(&storage, &store), before, "{fail:?}");
        // The restart: recovery first, then the flushes resume.
        recover(&storage, &store, T, std::time::Duration::from_secs(3600)).unwrap();
        assert_eq!(objects(&store, "events/"), committed(&storage), "{fail:?}");
        assert_eq!(everything(&storage, &store), before, "{fail:?}");
        flush_once(&storage, &store, T, 5_000, 1_000, None).unwrap();
        assert_eq!(everything(&storage, &store), before, "{fail:?}");
        assert_eq!(objects(&store, "events/"), committed(&storage), "{fail:?}");
        assert_eq!(committed(&storage).len(), 2, "{fail:?}");
        assert!(storage.log().read(T, 0, 10).unwrap().is_empty(), "{fail:?}");
    }
}

#[test]
fn uncommitted_objects_wait_in_the_trash_for_the_grace_period() {
    let (_dir, storage, store) = setup();
    flush_once(
        &storage,
        &store,
        T,
        5_000,
        1_000,
        Some(FailPoint::AfterWrite),
    )
    .unwrap_err();
    recover(&storage, &store, T, std::time::Duration::from_secs(3600)).unwrap();
    assert!(objects(&store, "events/").is_empty());
    assert_eq!(
        objects(&store, "trash/").len(),
        2,
        "kept for the grace period"
    );
    recover(&storage, &store, T, std::time::Duration::ZERO).unwrap();
    assert!(
        objects(&store, "trash/").is_empty(),
        "deleted once it is over"
    );
}

/// [`setup`] plus a fourth entry (sequences 7 to 10) whose events alternate between hours 10
/// and 11, flushed one entry at a time: five small segments whose sequence ranges overlap
/// across hours.
fn setup_small_segments() -> (tempfile::TempDir, Storage, ColdStore) {
    let (dir, storage, store) = setup();
    let mut entry = batch(&["g", "h", "i", "j"]);
    entry.received_at = 1_003;
    for (i, event) in entry.events.iter_mut().enumerate() {
        event.timestamp = 10 * HOUR + (i as Micros % 2) * HOUR + 7;
        event.user_id = Some(if i == 1 { "erase-me" } else { "u2" }.into());
    }
    storage
        .log()
        .append(T, 7, encode_entry(&entry).unwrap())
        .unwrap();
    storage.log().commit(&[(T, 10)], true).unwrap();
    set_watermarks(&storage, 10);
    while flush_once(&storage, &store, T, 5_000, 1, None)
        .unwrap()
        .is_some()
    {}
    assert_eq!(committed(&storage).len(), 5);
    (dir, storage, store)
}

fn ids(events: &[(u64, String, Option<String>)]) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|(seq, id, _)| (*seq, id.clone()))
        .collect()
}

const COMPACT_ALL: CompactionPolicy = CompactionPolicy {
    small_rows: 10,
    max_rows: 100,
    min_segments: 2,
    settled_before: Micros::MAX,
};

#[test]
fn compaction_merges_small_segments_per_hour_and_reads_stay_in_sequence_order() {
    let (_dir, storage, store) = setup_small_segments();
    let before = everything(&storage, &store);
    assert_eq!(
        ids(&before).iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    let report = compact(&mut Ledger::Local(&storage), &store, T, COMPACT_ALL).unwrap();
    assert_eq!((report.removed_segments, report.written_segments), (5, 2));
    let paths = committed(&storage);
    assert_eq!(
        paths,
        vec![
            "events/tenant=000000000000004d/date=1970-01-01/hour=10/1-9.parquet".to_string(),
            "events/tenant=000000000000004d/date=1970-01-01/hour=11/4-10.parquet".to_string(),
        ]
    );
    assert_eq!(
        objects(&store, "events/"),
        paths,
        "superseded objects left events/"
    );
    assert_eq!(objects(&store, "trash/").len(), 5, "and wait in the trash");
    assert_eq!(everything(&storage, &store), before);
    // Nothing left to merge; an hour still receiving flushes is not touched.
    assert_eq!(
        compact(&mut Ledger::Local(&storage), &store, T, COMPACT_ALL).unwrap(),
        MaintenanceReport::default()
    );
    let published = objects(&store, "manifest/");
    let newest = block_on(store.get(&published[0])).unwrap();
    let newest: serde_json::Value = serde_json::from_slice(&newest).unwrap();
    assert_eq!(newest["change"]["kind"], "compaction");
    assert_eq!(newest["segments"].as_array().unwrap().len(), 2, "{newest}");
}

#[test]
fn compaction_leaves_unsettled_hours_and_respects_the_size_limits() {
    let (_dir, storage, store) = setup_small_segments();
    let policy = CompactionPolicy {
        settled_before: 11 * HOUR,
        ..COMPACT_ALL
    };
    compact(&mut Ledger::Local(&storage), &store, T, policy).unwrap();
    assert_eq!(committed(&storage).len(), 3, "hour 11 is not settled");
    let (_dir, storage, store) = setup_small_segments();
    let policy = CompactionPolicy {
        max_rows: 3,
        ..COMPACT_ALL
    };
    compact(&mut Ledger::Local(&storage), &store, T, policy).unwrap();
    // Hour 10: 2 + 1 rows merge, the next 2 would exceed 3; hour 11: 3 + 2 would too.
    assert_eq!(committed(&storage).len(), 4);
}

#[test]
fn a_crash_inside_a_compaction_loses_and_duplicates_nothing() {
    let (_dir, storage, store) = setup_small_segments();
    let before = everything(&storage, &store);
    let old = segments(&storage, T).unwrap();
    let hour10: Vec<Segment> = old
        .iter()
        .filter(|s| s.hour == 10 * HOUR)
        .cloned()
        .collect();
    // Crash after writing the merged object: it is not committed, recovery moves it away.
    let merged_path = "events/tenant=000000000000004d/date=1970-01-01/hour=10/1-9.parquet";
    block_on(store.put(merged_path, segment::encode(&[]).unwrap())).unwrap();
    recover(&storage, &store, T, std::time::Duration::from_secs(3600)).unwrap();
    assert_eq!(objects(&store, "events/"), committed(&storage));
    assert_eq!(everything(&storage, &store), before);
    // Crash after the commit, before the superseded objects moved: recovery moves them.
    let mut writer = segment::SegmentWriter::new().unwrap();
    for segment in &hour10 {
        let bytes = block_on(store.get(&segment.path)).unwrap();
        for batch in segment::batches(bytes).unwrap() {
            writer.write_batch(&batch.unwrap()).unwrap();
        }
    }
    let bytes = writer.finish().unwrap();
    block_on(store.put(merged_path, bytes.clone())).unwrap();
    let change = manifest::Change {
        kind: manifest::ChangeKind::Compaction,
        added: vec![Segment {
            path: merged_path.into(),
            flush_first: 1,
            flush_last: 10,
            hour: 10 * HOUR,
            first_seq: 1,
            last_seq: 9,
            rows: 5,
            bytes: bytes.len() as u64,
        }],
        removed: hour10,
        watermark: None,
    };
    manifest::commit(&storage, &store, T, &change).unwrap();
    assert_eq!(
        everything(&storage, &store),
        before,
        "readers follow the manifest"
    );
    recover(&storage, &store, T, std::time::Duration::from_secs(3600)).unwrap();
    assert_eq!(objects(&store, "events/"), committed(&storage));
    assert_eq!(committed(&storage).len(), 3);
    assert_eq!(everything(&storage, &store), before);
}

#[test]
fn retention_removes_whole_expired_segments() {
    let (_dir, storage, store) = setup_small_segments();
    let report = enforce_retention(&mut Ledger::Local(&storage), &store, T, 11 * HOUR).unwrap();
    assert_eq!((report.removed_segments, report.removed_events), (3, 5));
    let left = ids(&everything(&storage, &store));
    assert_eq!(
        left.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        vec![4, 5, 6, 8, 10]
    );
    assert_eq!(objects(&store, "events/"), committed(&storage));
    assert_eq!(objects(&store, "trash/").len(), 3);
    assert_eq!(
        cold_watermark(&storage, T).unwrap(),
        10,
        "the watermark stays"
    );
}

#[test]
fn erasure_rewrites_only_the_segments_holding_the_user() {
    let (_dir, storage, store) = setup_small_segments();
    compact(&mut Ledger::Local(&storage), &store, T, COMPACT_ALL).unwrap();
    let before = everything(&storage, &store);
    let report = erase_user(&mut Ledger::Local(&storage), &store, T, "erase-me").unwrap();
    // Event 8 ("h") was the user's, in hour 11's segment only.
    assert_eq!(report.removed_events, 1);
    assert_eq!((report.removed_segments, report.written_segments), (1, 1));
    let after = everything(&storage, &store);
    let expected: Vec<_> = before.into_iter().filter(|(seq, _, _)| *seq != 8).collect();
    assert_eq!(after, expected);
    let paths = committed(&storage);
    assert!(paths[0].ends_with("hour=10/1-9.parquet"), "{paths:?}");
    assert!(paths[1].contains("hour=11/4-10-r"), "{paths:?}");
    assert_eq!(objects(&store, "events/"), paths);
    assert_eq!(
        erase_user(&mut Ledger::Local(&storage), &store, T, "erase-me").unwrap(),
        MaintenanceReport::default(),
        "nothing left"
    );
    // Erasing every user of a segment removes it.
    let report = erase_user(&mut Ledger::Local(&storage), &store, T, "u1").unwrap();
    assert_eq!(report.removed_events, 6);
    let left = ids(&everything(&storage, &store));
    assert_eq!(
        left.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(),
        vec!["g", "i", "j"]
    );
    assert_eq!(objects(&store, "events/"), committed(&storage));
}

#[test]
fn a_flush_by_sequence_moves_recent_entries_up_to_it() {
    let (_dir, storage, store) = setup();
    // Entries 1-3 and 4 were received at 1_000 and 1_001: too recent by time, due by sequence.
    let due = Due {
        received_before: 0,
        through_seq: 3,
    };
    let report = flush_due(&storage, &store, T, due, 1_000, None)
        .unwrap()
        .unwrap();
    assert_eq!(report.through, 3);
    assert!(flush_due(&storage, &store, T, due, 1_000, None)
        .unwrap()
        .is_none());
    assert_eq!(everything(&storage, &store).len(), 6);
}

#[test]
fn a_read_that_began_before_a_compaction_finds_the_retired_segments() {
    let (_dir, storage, store) = setup_small_segments();
    let before = everything(&storage, &store);
    let mut seen = Vec::new();
    let mut compacted = false;
    scan_tiers(&storage, Some(&store), T, 1, None, |seq, batch| {
        if !compacted {
            // The reader holds the manifest it started with; the objects move to the trash.
            compact(&mut Ledger::Local(&storage), &store, T, COMPACT_ALL).unwrap();
            compacted = true;
        }
        seen.push((seq, batch.events[0].message_id.clone()));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(compacted);
    assert_eq!(seen, ids(&before));
}
