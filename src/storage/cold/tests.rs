#![allow(clippy::unwrap_used)]
use super::*;
use crate::storage::event_log::{encode_entry, tests::batch};

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
