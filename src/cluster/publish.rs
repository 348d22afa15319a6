//! An ingest node's [`Append`]: each prepared batch goes to its tenant's partition of the
//! event stream instead of a local log, and the request is answered once JetStream has stored
//! it. Deduplication, sequencing and rolling up happen on the partition's process node, so the
//! answer counts every event as accepted (a retry of an event already logged is dropped there,
//! counted once, but not reported as a duplicate to the client). A publish that fails or times
//! out answers the request with `Unavailable`, which clients get as a 503 with Retry-After.

use std::sync::Arc;

use crate::cluster::partition_of;
use crate::cluster::stream::EventStream;
use crate::storage::writer::{Append, AppendOutcome, AppendRequest};
use crate::storage::StorageError;

/// Publishes prepared batches to the event stream.
pub struct StreamAppend {
    stream: Arc<EventStream>,
    partitions: u16,
    /// The runtime the stream's connection lives on; publishes are spawned there.
    runtime: tokio::runtime::Handle,
}

impl StreamAppend {
    pub fn new(
        stream: Arc<EventStream>,
        partitions: u16,
        runtime: tokio::runtime::Handle,
    ) -> StreamAppend {
        StreamAppend {
            stream,
            partitions,
            runtime,
        }
    }
}

impl Append for StreamAppend {
    fn submit(&self, request: AppendRequest) {
        let AppendRequest {
            tenant,
            batch,
            reply,
            dedup_window,
            ..
        } = request;
        let events = batch.events();
        let wire = match batch.to_wire(tenant, dedup_window) {
            Ok(wire) => wire,
            Err(error) => return reply(Err(error)),
        };
        // The entry's bytes are unique to this request: their hash is its publish id, so a
        // publish this node retries is stored once.
        let id = blake3::hash(&wire).to_hex().to_string();
        let partition = partition_of(tenant, self.partitions);
        let stream = Arc::clone(&self.stream);
        self.runtime.spawn(async move {
            let started = std::time::Instant::now();
            let published = stream
                .publish(partition, &id, bytes::Bytes::from(wire))
                .await;
            crate::telemetry::cluster_published(started.elapsed(), published.is_ok());
            reply(
                published
                    .map(|_| AppendOutcome {
                        tenant,
                        timing: None,
                        accepted: events,
                        duplicates: 0,
                        first_seq: None,
                        duplicate_positions: Vec::new(),
                        dead_lettered: 0,
                        dead_letter_duplicates: Vec::new(),
                        probe_duplicates: Vec::new(),
                    })
                    .map_err(|error| StorageError::Unavailable(error.to_string())),
            );
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, Instant};

    use super::*;
    use crate::ids::TenantId;
    use crate::storage::event_log::tests::batch;
    use crate::storage::writer::{AppendAnswer, PreparedBatch};

    fn request(tenant: TenantId, ids: &[&str]) -> (AppendRequest, AppendAnswer) {
        let batch = PreparedBatch::new(tenant, &batch(ids)).unwrap();
        AppendRequest::answered(tenant, Duration::from_secs(3600), batch)
    }

    /// A batch is answered once JetStream has it, on its tenant's partition, whole; with NATS
    /// down the answer is `Unavailable` (a 503 for the client) within the publish timeout.
    #[actix_rt::test]
    async fn batches_are_answered_once_on_their_partition_or_refused_while_nats_is_down() {
        let mut nats = testkit::services::Service::nats().unwrap();
        // A generous timeout while NATS is up (a loaded machine can be slow to answer), a short
        // one for the refusal.
        let stream = Arc::new(
            EventStream::connect(&nats.url(), "publish", 1, Duration::from_secs(10))
                .await
                .unwrap(),
        );
        let append = StreamAppend::new(Arc::clone(&stream), 8, tokio::runtime::Handle::current());
        let tenant = TenantId(0x1234);
        let (sent, answer) = request(tenant, &["m1", "m2", "m3"]);
        let expected = sent.batch.to_wire(tenant, sent.dedup_window).unwrap();
        append.submit(sent);
        let outcome = answer.await.unwrap().unwrap();
        assert_eq!((outcome.accepted, outcome.first_seq), (3, None));
        let read = stream.read(partition_of(tenant, 8), 1, 10).await.unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(&read[0].payload[..], &expected[..]);

        let timeout = Duration::from_secs(1);
        let short = Arc::new(
            EventStream::connect(&nats.url(), "publish", 1, timeout)
                .await
                .unwrap(),
        );
        let append = StreamAppend::new(short, 8, tokio::runtime::Handle::current());
        nats.kill();
        let started = Instant::now();
        let (sent, answer) = request(tenant, &["m4"]);
        append.submit(sent);
        let refused = answer.await.unwrap();
        assert!(
            matches!(refused, Err(StorageError::Unavailable(_))),
            "{refused:?}"
        );
        assert!(started.elapsed() < timeout * 5, "{:?}", started.elapsed());
    }
}
