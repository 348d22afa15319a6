//! The event stream on a private `nats-server -js` (`testkit::services`): publishes are stored
//! once per id, read back per partition in order from any sequence, trimmed below a
//! checkpoint, refused while NATS is down, and kept across a NATS restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::runtime;

use std::time::{Duration, Instant};

use bytes::Bytes;
use statsremote::cluster::stream::EventStream;
use testkit::services::Service;

const TIMEOUT: Duration = Duration::from_secs(2);

fn payload(partition: u16, n: usize) -> Bytes {
    Bytes::from(format!("p{partition}-m{n}"))
}

#[test]
fn partitions_read_back_in_order_once_per_id_and_trim_below_a_checkpoint() {
    let nats = Service::nats().unwrap();
    runtime().block_on(async {
        let stream = EventStream::connect(&nats.url(), "test", 1, TIMEOUT)
            .await
            .unwrap();
        let mut seqs = vec![Vec::new(); 3];
        for n in 0..30 {
            let partition = (n % 3) as u16;
            let seq = stream
                .publish(partition, &format!("batch-{n}"), payload(partition, n))
                .await
                .unwrap();
            seqs[usize::from(partition)].push(seq);
        }
        // A publish retried with the same id is stored once, at its first sequence.
        let again = stream.publish(1, "batch-1", payload(1, 1)).await.unwrap();
        assert_eq!(again, seqs[1][0]);
        for partition in 0..3u16 {
            let read = stream.read(partition, 1, 100).await.unwrap();
            let got: Vec<u64> = read.iter().map(|m| m.seq).collect();
            assert_eq!(got, seqs[usize::from(partition)]);
            let texts: Vec<Bytes> = (0..30)
                .filter(|n| n % 3 == usize::from(partition))
                .map(|n| payload(partition, n))
                .collect();
            assert_eq!(
                read.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
                texts
            );
        }
        // From a sequence in the middle, and at most `max`.
        let from = seqs[2][4];
        let tail = stream.read(2, from, 3).await.unwrap();
        assert_eq!(
            tail.iter().map(|m| m.seq).collect::<Vec<_>>(),
            seqs[2][4..7].to_vec()
        );
        // Trimming below a checkpoint removes that partition's older messages only.
        let purged = stream.trim(0, seqs[0][5]).await.unwrap();
        assert_eq!(purged, 5);
        let left = stream.read(0, 1, 100).await.unwrap();
        assert_eq!(left.first().map(|m| m.seq), Some(seqs[0][5]));
        assert_eq!(stream.read(1, 1, 100).await.unwrap().len(), 10);
        assert!(stream.read(7, 1, 100).await.unwrap().is_empty());
    });
}

#[test]
fn publishes_fail_fast_while_nats_is_down_and_stored_messages_survive_a_restart() {
    let mut nats = Service::nats().unwrap();
    let rt = runtime();
    let stream = rt.block_on(async {
        EventStream::connect(&nats.url(), "test", 1, TIMEOUT)
            .await
            .unwrap()
    });
    let first = rt.block_on(stream.publish(0, "before", Bytes::from_static(b"kept")));
    let first = first.unwrap();
    nats.kill();
    let started = Instant::now();
    let down = rt.block_on(stream.publish(0, "during", Bytes::from_static(b"refused")));
    assert!(down.is_err(), "{down:?}");
    assert!(started.elapsed() < TIMEOUT * 2, "{:?}", started.elapsed());
    nats.restart().unwrap();
    // The client reconnects by itself; the message stored before the outage is still there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        match rt.block_on(stream.publish(0, "after", Bytes::from_static(b"new"))) {
            Ok(seq) => break seq,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => panic!("no publish after the restart: {error}"),
        }
    };
    assert!(after > first);
    let read = rt.block_on(stream.read(0, 1, 10)).unwrap();
    let payloads: Vec<&[u8]> = read.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(payloads.first(), Some(&&b"kept"[..]));
    assert_eq!(payloads.last(), Some(&&b"new"[..]));
    // The publish that was refused may still have been stored once the client reconnected
    // (it had it buffered): an ingest node answers such a request 503, and the client's retry
    // is then a duplicate by messageId. Either way nothing is stored twice or out of order.
    let expected: Vec<&[u8]> = if payloads.len() == 3 {
        vec![b"kept", b"refused", b"new"]
    } else {
        vec![b"kept", b"new"]
    };
    assert_eq!(payloads, expected);
}
