//! Acked means durable: SIGKILL mid-stream and SIGTERM under load lose no acknowledged event,
//! and no event is stored twice; dedup holds across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{batch, message_ids, track, Auth, Tenant, TestServer};

const SENDERS: usize = 4;
const EVENTS_PER_BATCH: usize = 25;

/// Sends unique batches from several threads until `stop` or until the server goes away;
/// returns every messageId whose request was acknowledged with 200.
fn load(
    server: &Arc<TestServer>,
    tenant: &Tenant,
    round: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    (0..SENDERS)
        .map(|sender| {
            let server = Arc::clone(server);
            let key = tenant.write_key.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let ids: Vec<String> = (0..EVENTS_PER_BATCH)
                        .map(|i| format!("r{round}-s{sender}-b{n}-e{i}"))
                        .collect();
                    n += 1;
                    let body = batch(
                        ids.iter()
                            .map(|id| track(id, &format!("user-{}", n % 50), "Crash Test"))
                            .collect(),
                    );
                    match server.try_post(
                        "/v1/batch",
                        Auth::Bearer(&key),
                        body.to_string().as_bytes(),
                    ) {
                        Some(reply) if reply.status == 200 => {
                            assert_eq!(
                                reply.json()["accepted"],
                                EVENTS_PER_BATCH as u64,
                                "{}",
                                reply.body
                            );
                            acked.extend(ids);
                        }
                        Some(reply) if reply.status == 503 => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Some(reply) => panic!("unexpected reply {}: {}", reply.status, reply.body),
                        None => break, // The server is gone.
                    }
                }
                acked
            })
        })
        .collect()
}

fn assert_each_exactly_once(stored: &[String], acked: &[String]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in stored {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let doubled: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(
        doubled.is_empty(),
        "events stored more than once: {doubled:?}"
    );
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged events lost ({} of {}): {missing:?}",
        acked
            .iter()
            .filter(|id| !counts.contains_key(id.as_str()))
            .count(),
        acked.len()
    );
}

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &[]);
    let tenant = server.create_tenant("crash");
    drop(server);
    let mut all_acked: Vec<String> = Vec::new();
    for round in 0..5 {
        let server = Arc::new(TestServer::start_in(dir.path(), &[]));
        let stop = Arc::new(AtomicBool::new(false));
        let senders = load(&server, &tenant, round, Arc::clone(&stop));
        // Let load build up, then kill without warning.
        std::thread::sleep(Duration::from_millis(300 + 150 * round as u64));
        server.kill();
        let mut acked_this_round = Vec::new();
        for handle in senders {
            acked_this_round.extend(handle.join().unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        assert!(
            !acked_this_round.is_empty(),
            "round {round}: nothing was acknowledged before the kill"
        );
        all_acked.extend(acked_this_round);

        let server = TestServer::start_in(dir.path(), &[]);
        let stored = message_ids(&server.export(&tenant.read_key, ""));
        assert_each_exactly_once(&stored, &all_acked);
        // Rollups, replayed from their watermark after the kill, count every stored event once.
        assert_eq!(
            server.wait_rollups_caught_up(&tenant.read_key),
            stored.len() as u64
        );
        let totals = server.get(
            "/v1/query/events?from=2026-01-02T00:00:00Z&to=2026-01-03T00:00:00Z",
            Auth::Bearer(&tenant.read_key),
        );
        assert_eq!(
            totals.json()["events"][0]["count"],
            stored.len() as u64,
            "{}",
            totals.body
        );
        // Retrying acknowledged events after the crash counts none of them again.
        let retry: Vec<_> = all_acked
            .iter()
            .rev()
            .take(100)
            .map(|id| track(id, "u", "Crash Test"))
            .collect();
        let reply = server.post_json("/v1/batch", Auth::Bearer(&tenant.write_key), &batch(retry));
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["accepted"], 0);
        assert_eq!(reply.json()["duplicates"], 100);
        eprintln!(
            "round {round}: {} acked in total, {} stored",
            all_acked.len(),
            stored.len()
        );
    }
}

#[test]
fn sigterm_under_load_exits_zero_and_keeps_every_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(TestServer::start_in(dir.path(), &[]));
    let tenant = server.create_tenant("graceful");
    let stop = Arc::new(AtomicBool::new(false));
    let senders = load(&server, &tenant, 0, Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(500));
    let status = server.terminate().success();
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for handle in senders {
        acked.extend(handle.join().unwrap());
    }
    assert!(
        status,
        "server did not exit 0 after SIGTERM; log:\n{}",
        server.server_log()
    );
    assert!(!acked.is_empty());
    let log = server.server_log();
    assert!(log.contains("statsremote stopped cleanly"), "{log}");
    let restarted = TestServer::start_in(dir.path(), &[]);
    let stored = message_ids(&restarted.export(&tenant.read_key, ""));
    assert_each_exactly_once(&stored, &acked);
}

#[test]
fn dedup_holds_across_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &[]);
    let tenant = server.create_tenant("dedup");
    let events: Vec<_> = (0..20).map(|i| track(&format!("d{i}"), "u", "e")).collect();
    let first = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &batch(events.clone()),
    );
    assert_eq!(first.json()["accepted"], 20);
    // A retry within one request and across requests is counted once.
    let mut twice = events[..2].to_vec();
    twice.extend(events[..2].to_vec());
    twice.push(track("new-1", "u", "e"));
    twice.push(track("new-1", "u", "e"));
    let retry = server.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &batch(twice));
    assert_eq!(
        (
            retry.json()["accepted"].as_u64(),
            retry.json()["duplicates"].as_u64()
        ),
        (Some(1), Some(5))
    );
    assert!(server.terminate().success());

    let server = TestServer::start_in(dir.path(), &[]);
    let again = server.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &batch(events));
    assert_eq!(again.json()["accepted"], 0);
    assert_eq!(again.json()["duplicates"], 20);
    assert_eq!(server.export(&tenant.read_key, "").len(), 21);
    let metrics = server.metrics();
    assert!(
        metrics.contains("statsremote_dedup_hits_total"),
        "{metrics}"
    );
}

#[test]
fn the_dedup_window_is_per_tenant_and_expires() {
    let server = TestServer::start();
    let tenant = server.create_tenant_with(
        // Long enough for the retry to come within it on a loaded machine.
        serde_json::json!({"name": "short", "settings": {"dedup_window": "3s"}}),
    );
    let event = batch(vec![track("same", "u", "e")]);
    assert_eq!(
        server
            .post_json("/v1/batch", Auth::Basic(&tenant.write_key), &event)
            .json()["accepted"],
        1
    );
    assert_eq!(
        server
            .post_json("/v1/batch", Auth::Basic(&tenant.write_key), &event)
            .json()["duplicates"],
        1
    );
    std::thread::sleep(Duration::from_millis(3100));
    assert_eq!(
        server
            .post_json("/v1/batch", Auth::Basic(&tenant.write_key), &event)
            .json()["accepted"],
        1
    );
}

#[test]
fn events_without_message_id_get_one_and_are_never_deduplicated() {
    let server = TestServer::start();
    let tenant = server.create_tenant("ids");
    let event = serde_json::json!({"userId": "u", "event": "No Id"});
    for _ in 0..2 {
        assert_eq!(
            server
                .post_json("/v1/track", Auth::Basic(&tenant.write_key), &event)
                .json()["accepted"],
            1
        );
    }
    let events = server.export(&tenant.read_key, "");
    assert_eq!(events.len(), 2);
    assert_ne!(events[0]["messageId"], events[1]["messageId"]);
    assert_eq!(events[0]["statsremote"]["generatedMessageId"], true);
}

#[test]
fn sigint_shuts_down_cleanly_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &[]);
    let tenant = server.create_tenant("interrupt");
    let events = (0..10).map(|i| track(&format!("i{i}"), "u", "e")).collect();
    assert_eq!(
        server
            .post_json("/v1/batch", Auth::Basic(&tenant.write_key), &batch(events))
            .status,
        200
    );
    common::send_signal(server.pid(), "INT");
    let status = server.wait();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        server.server_log()
    );
    assert!(server.server_log().contains("statsremote stopped cleanly"));
    let restarted = TestServer::start_in(dir.path(), &[]);
    assert_eq!(restarted.export(&tenant.read_key, "").len(), 10);
}
