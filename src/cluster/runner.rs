//! The core of a process node's work on one partition: read the partition's stream messages in
//! order and hand each one's prepared batch to the local log writer, which deduplicates,
//! sequences and makes it durable exactly as on a single node.
//!
//! The result depends only on the messages and the state the runner starts from: replaying
//! the same messages from the same state (a checkpoint) assigns the same sequence numbers and
//! drops the same duplicates. That is what lets a partition's new owner rebuild its state from
//! a checkpoint and the stream's tail.

use std::time::Duration;

use crate::cluster::commands::Command;
use crate::cluster::stream::{EventStream, PartitionReader, StreamError, StreamMessage};
use crate::ids::TenantId;
use crate::rollup::RollupItems;
use crate::storage::deadletters::LetterKey;
use crate::storage::event_log::decode_batch;
use crate::storage::writer::{AppendOutcome, AppendRequest, LogWriter, PreparedBatch, WireBatch};
use crate::storage::StorageError;

/// Why a partition could not be processed further.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the log writer stopped")]
    WriterGone,
}

/// What one stream message became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    /// Its stream sequence.
    pub seq: u64,
    pub tenant: TenantId,
    /// The id the tenant's log has in the local store.
    pub local: TenantId,
    /// The tenant's dedup window the batch was applied with.
    pub dedup_window: Duration,
    pub outcome: AppendOutcome,
    /// What rollups need of the events it added to the log (duplicates left out).
    pub items: RollupItems,
    /// The dead letters it kept (retries of logged events left out), then their batch record:
    /// for the shared store (`crate::cluster::deadletters`).
    pub letters: Vec<(LetterKey, Vec<u8>)>,
}

/// One partition's reader.
pub struct PartitionRunner {
    partition: u16,
    /// The stream sequence to read next.
    next_seq: u64,
    /// Messages after the last one read, as the stream last said.
    pending: u64,
    /// The open reader, from `next_seq` (dropped after an error).
    reader: Option<PartitionReader>,
    /// Commands read, until taken ([`PartitionRunner::take_commands`]).
    commands: Vec<Applied>,
}

/// A command as applied: where it was in the stream, and, for a tenant's, the tenant's log
/// then (everything up to its head came before the command).
#[derive(Debug, Clone)]
pub struct Applied {
    pub seq: u64,
    pub command: Command,
    /// The local id of the tenant's log, and its head (0: none).
    pub local: TenantId,
    pub head: u64,
}

/// What one message was.
enum Step {
    Batch(Box<Processed>),
    Command(Applied),
    /// A deleted tenant's.
    Skipped,
}

impl PartitionRunner {
    /// A runner that starts after `covered`, the last stream sequence already processed (0:
    /// from the start).
    pub fn new(partition: u16, covered: u64) -> PartitionRunner {
        PartitionRunner {
            partition,
            next_seq: covered + 1,
            pending: 0,
            reader: None,
            commands: Vec::new(),
        }
    }

    /// The last stream sequence processed.
    pub fn covered(&self) -> u64 {
        self.next_seq - 1
    }

    /// The commands applied since the last call.
    pub fn take_commands(&mut self) -> Vec<Applied> {
        std::mem::take(&mut self.commands)
    }

    /// Messages the stream held, when last read, that are not processed yet.
    pub fn lag(&self) -> u64 {
        self.pending
    }

    /// Processes up to `max` messages the stream holds now, in order, each durable before the
    /// next is read. Each batch is applied with the dedup window it was sent with, as of its
    /// receive time, so the outcome does not depend on when or where it is applied; messages
    /// of tenants `deleted` says are gone are skipped. A message that cannot be processed
    /// ends the run: what was processed before it is returned, and the error only when
    /// nothing was (the next run starts at that message). Waits up to 10 s for a first
    /// message, which the tests that call it have always published: a loaded machine can take
    /// longer than a fresh reader's round trip.
    #[cfg(test)]
    pub async fn run_once(
        &mut self,
        stream: &EventStream,
        writer: &LogWriter,
        max: usize,
        deleted: impl Fn(TenantId) -> bool,
    ) -> Result<Vec<Processed>, RunError> {
        let wait = Duration::from_secs(10);
        self.run(stream, writer, max, wait, deleted, |tenant| tenant)
            .await
    }

    /// [`PartitionRunner::run_once`], waiting up to `wait` for a first message when the
    /// partition has none, with each tenant's log under the local id `local` gives: what a
    /// partition's owner calls in a loop.
    pub async fn run(
        &mut self,
        stream: &EventStream,
        writer: &LogWriter,
        max: usize,
        wait: Duration,
        deleted: impl Fn(TenantId) -> bool,
        local: impl Fn(TenantId) -> TenantId,
    ) -> Result<Vec<Processed>, RunError> {
        let mut reader = match self.reader.take() {
            Some(reader) => reader,
            None => stream.reader(self.partition, self.next_seq).await?,
        };
        // A fresh reader's first messages take a round trip: give them one.
        let wait = wait.max(Duration::from_millis(50));
        let messages = reader.next_batch(max, wait).await?;
        self.pending = reader.pending();
        let mut done = Vec::with_capacity(messages.len());
        let mut failed = None;
        for message in messages {
            let seq = message.seq;
            match Self::process(message, writer, &deleted, &local).await {
                Ok(step) => {
                    self.next_seq = seq + 1;
                    match step {
                        Step::Batch(processed) => done.push(*processed),
                        Step::Command(applied) => self.commands.push(applied),
                        Step::Skipped => {}
                    }
                }
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        match failed {
            // The reader is past the failed message: the next run opens a new one there.
            Some(error) if done.is_empty() => Err(error),
            Some(_) => Ok(done),
            None => {
                self.reader = Some(reader);
                Ok(done)
            }
        }
    }

    async fn process(
        message: StreamMessage,
        writer: &LogWriter,
        deleted: &impl Fn(TenantId) -> bool,
        local: &impl Fn(TenantId) -> TenantId,
    ) -> Result<Step, RunError> {
        if let Some(command) = Command::decode(&message.payload) {
            let command = command?;
            // A deleted tenant's too: its owner records that an erasure cannot be done.
            let (local, head) = match command.tenant() {
                Some(tenant) => {
                    let local = local(tenant);
                    // Each batch before it is durable, so the writer's head is the log's.
                    (local, writer.heads().get(local).unwrap_or(0))
                }
                None => (TenantId(0), 0),
            };
            return Ok(Step::Command(Applied {
                seq: message.seq,
                command,
                local,
                head,
            }));
        }
        let WireBatch {
            tenant,
            dedup_window,
            batch,
        } = PreparedBatch::from_wire(message.payload)?;
        if deleted(tenant) {
            return Ok(Step::Skipped);
        }
        let entry = decode_batch(batch.entry())?;
        let mut items = RollupItems::from_events(&entry.events, &entry.extras);
        let received_at = entry.received_at;
        drop(entry);
        let local = local(tenant);
        let mut letters = batch.dead_letter_records();
        let (request, answer) = AppendRequest::answered(local, dedup_window, batch);
        writer.submit(request.at(received_at));
        let outcome = answer.await.map_err(|_| RunError::WriterGone)??;
        if outcome.duplicates > 0 {
            items.retain_kept(&outcome.new_events());
        }
        if outcome.dead_lettered == 0 {
            letters.clear();
        } else {
            for position in outcome.dead_letter_duplicates.iter().rev() {
                letters.remove(*position);
            }
        }
        Ok(Step::Batch(Box::new(Processed {
            seq: message.seq,
            tenant,
            local,
            dedup_window,
            outcome,
            items,
            letters,
        })))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::event_log::tests::{batch, read_batches};
    use crate::storage::writer::WriterOptions;
    use crate::storage::Storage;
    use std::time::Duration;

    const TENANT: TenantId = TenantId(0x77);

    /// A log writer without fsync on a new store in `dir`.
    pub(crate) fn writer(dir: &std::path::Path) -> (Storage, LogWriter) {
        let storage = Storage::open(dir, 1 << 20, Default::default()).unwrap();
        let options = WriterOptions {
            fsync: false,
            queue_capacity: 16,
            max_group_requests: 8,
            dedup_filter_bytes: 1 << 20,
            dedup_max_age: Duration::from_secs(1),
            store_dead_letters: false,
            fsync_delay: Duration::ZERO,
        };
        let writer = LogWriter::start(storage.clone(), options).unwrap();
        (storage, writer)
    }

    /// Exactly once across a failover: owner A processes the partition and rolls part of it
    /// up, then stops renewing; B takes the lease over, replays the whole stream from scratch
    /// into its own log and rolls up only what A had not; A's late roll-up is fenced out.
    /// Every messageId is counted once.
    #[actix_rt::test]
    async fn rollups_count_each_message_once_across_a_failover() {
        use crate::cluster::lease::Leases;
        use crate::cluster::rollups::{roll_up_tenant, LocalLog, RolledUp, SharedRollups};
        use crate::rollup::{Resolution, Retention, ALL_EVENTS};

        let nats = testkit::services::Service::nats().unwrap();
        let redis = testkit::services::Service::redis().unwrap();
        let stream = EventStream::connect(&nats.url(), "failover", 1, Duration::from_secs(5))
            .await
            .unwrap();
        let (a, b) = (TenantId(0xa), TenantId(0xb));
        let messages: [(TenantId, &[&str]); 6] = [
            (a, &["a1", "a2"]),
            (b, &["b1"]),
            (a, &["a3"]),
            (a, &["a1", "a4"]),
            (b, &["b2", "b3"]),
            (a, &["a5"]),
        ];
        for (n, (tenant, ids)) in messages.iter().enumerate() {
            let wire = PreparedBatch::new(*tenant, &batch(ids))
                .unwrap()
                .to_wire(*tenant, Duration::from_secs(3600))
                .unwrap();
            stream
                .publish(0, &format!("m{n}"), bytes::Bytes::from(wire))
                .await
                .unwrap();
        }
        let redis_url = redis.url();
        let redis_conn = || crate::cluster::connect_redis(&redis_url, Duration::from_secs(30));
        let shared = SharedRollups::new(redis_conn().await.unwrap(), "failover");
        let timeout = Duration::from_millis(400);
        let mut leases_a = Leases::new(redis_conn().await.unwrap(), "failover", "a", 1, timeout);
        let mut leases_b = Leases::new(redis_conn().await.unwrap(), "failover", "b", 1, timeout);
        let fence = leases_a.fence_key(0);
        let lease_a = leases_a.acquire(0).await.unwrap().unwrap();
        let retention = Retention {
            minute: Duration::from_secs(u32::MAX.into()),
            hour: Duration::from_secs(u32::MAX.into()),
            day: None,
        };
        let window = |_: TenantId| false;

        // Rolls each tenant's local log up to its head, as an owner does.
        let roll_up = |storage: &Storage, lease| {
            let (shared, fence, storage) = (&shared, fence.clone(), storage.clone());
            async move {
                let mut outcomes = Vec::new();
                for tenant in [a, b] {
                    let head = storage.log().head(tenant).unwrap();
                    outcomes.push(
                        roll_up_tenant(
                            shared,
                            LocalLog {
                                storage: &storage,
                                tenant,
                                local: tenant,
                                head,
                                cold: None,
                                flushed: 0,
                                state: None,
                            },
                            lease,
                            &fence,
                            retention,
                        )
                        .await
                        .unwrap(),
                    );
                }
                outcomes
            }
        };

        // A: four messages processed and rolled up, two more processed, not rolled up.
        let dir_a = tempfile::tempdir().unwrap();
        let (storage_a, writer_a) = writer(dir_a.path());
        let mut runner_a = PartitionRunner::new(0, 0);
        let first = runner_a
            .run_once(&stream, &writer_a, 4, window)
            .await
            .unwrap();
        assert_eq!(first.len(), 4);
        let rolled = roll_up(&storage_a, lease_a).await;
        assert!(
            rolled.iter().all(|o| matches!(o, RolledUp::Through(_))),
            "{rolled:?}"
        );
        let rest = runner_a
            .run_once(&stream, &writer_a, 10, window)
            .await
            .unwrap();
        assert_eq!(rest.len(), 2);

        // A stops renewing; B takes the partition over once the lease has expired, replays
        // the stream from the start and rolls up what A had not.
        tokio::time::sleep(timeout * 2).await;
        let lease_b = leases_b
            .acquire(0)
            .await
            .unwrap()
            .expect("the lease expired");
        assert!(lease_b.token > lease_a.token);
        let dir_b = tempfile::tempdir().unwrap();
        let (storage_b, writer_b) = writer(dir_b.path());
        let mut runner_b = PartitionRunner::new(0, 0);
        let replayed = runner_b
            .run_once(&stream, &writer_b, 10, window)
            .await
            .unwrap();
        assert_eq!(replayed.len(), 6);
        let rolled = roll_up(&storage_b, lease_b).await;
        assert!(
            rolled.iter().all(|o| matches!(o, RolledUp::Through(_))),
            "{rolled:?}"
        );

        // A wakes up and reads one more message: its roll-up of it is fenced out; B's counts it.
        let wire = PreparedBatch::new(a, &batch(&["a6"]))
            .unwrap()
            .to_wire(a, Duration::from_secs(3600))
            .unwrap();
        stream
            .publish(0, "m6", bytes::Bytes::from(wire))
            .await
            .unwrap();
        assert_eq!(
            runner_a
                .run_once(&stream, &writer_a, 10, window)
                .await
                .unwrap()
                .len(),
            1
        );
        let late = roll_up(&storage_a, lease_a).await;
        assert_eq!(late[0], RolledUp::Fenced, "{late:?}");
        assert_eq!(
            runner_b
                .run_once(&stream, &writer_b, 10, window)
                .await
                .unwrap()
                .len(),
            1
        );
        let rolled = roll_up(&storage_b, lease_b).await;
        assert!(
            rolled.iter().all(|o| matches!(o, RolledUp::Through(_))),
            "{rolled:?}"
        );

        let count = |tenant| {
            let shared = &shared;
            async move {
                shared
                    .counts(
                        tenant,
                        Resolution::Day,
                        ALL_EVENTS,
                        0,
                        Resolution::Day.width(),
                    )
                    .await
                    .unwrap()[0]
                    .1
            }
        };
        assert_eq!(count(a).await, 6, "a1..a6, a1 once");
        assert_eq!(count(b).await, 3);
        writer_a.shutdown();
        writer_b.shutdown();
    }

    /// Batches published to a partition become log entries once each, in stream order; a
    /// second node replaying the same messages from the same (empty) state assigns the same
    /// sequences and drops the same duplicates; a deleted tenant's messages are skipped.
    #[actix_rt::test]
    async fn stream_messages_become_the_same_log_on_every_replay() {
        let nats = testkit::services::Service::nats().unwrap();
        let stream = EventStream::connect(&nats.url(), "runner", 1, Duration::from_secs(5))
            .await
            .unwrap();
        for (n, ids) in [&["a", "b"][..], &["c"], &["b", "d"], &["e"]]
            .iter()
            .enumerate()
        {
            let wire = PreparedBatch::new(TENANT, &batch(ids))
                .unwrap()
                .to_wire(TENANT, Duration::from_secs(3600))
                .unwrap();
            stream
                .publish(3, &format!("batch-{n}"), bytes::Bytes::from(wire))
                .await
                .unwrap();
        }
        let window = |_: TenantId| false;
        let mut logs = Vec::new();
        for _node in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let (storage, writer) = writer(dir.path());
            let mut runner = PartitionRunner::new(3, 0);
            // Two steps, as a runner that reads a little at a time.
            let mut processed = runner.run_once(&stream, &writer, 2, window).await.unwrap();
            processed.extend(runner.run_once(&stream, &writer, 10, window).await.unwrap());
            assert_eq!(processed.len(), 4);
            assert_eq!(runner.covered(), processed[3].seq);
            let accepted: Vec<usize> = processed.iter().map(|p| p.outcome.accepted).collect();
            assert_eq!(accepted, vec![2, 1, 1, 1], "the second b is a duplicate");
            let log: Vec<(u64, Vec<String>)> = read_batches(storage.log(), TENANT, 1, 100)
                .unwrap()
                .into_iter()
                .map(|(seq, batch)| {
                    (
                        seq,
                        batch.events.iter().map(|e| e.message_id.clone()).collect(),
                    )
                })
                .collect();
            logs.push(log);
            writer.shutdown();
        }
        assert_eq!(logs[0], logs[1]);
        assert_eq!(
            logs[0]
                .iter()
                .flat_map(|(_, ids)| ids.clone())
                .collect::<Vec<_>>(),
            vec!["a", "b", "c", "d", "e"]
        );

        // A message of a deleted tenant is skipped: nothing of it is written, the run goes on.
        let gone = TenantId(0x99);
        for (tenant, id) in [(gone, "x"), (TENANT, "f")] {
            let wire = PreparedBatch::new(tenant, &batch(&[id]))
                .unwrap()
                .to_wire(tenant, Duration::from_secs(3600))
                .unwrap();
            stream
                .publish(3, id, bytes::Bytes::from(wire))
                .await
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let (storage, writer) = writer(dir.path());
        let mut runner = PartitionRunner::new(3, 0);
        let processed = runner
            .run_once(&stream, &writer, 10, |tenant| tenant == gone)
            .await
            .unwrap();
        assert_eq!(processed.len(), 5);
        assert_eq!(runner.covered(), 6, "the skipped message is covered too");
        assert!(read_batches(storage.log(), gone, 1, 10).unwrap().is_empty());
        assert_eq!(
            read_batches(storage.log(), TENANT, 1, 100).unwrap().len(),
            5
        );
        writer.shutdown();
    }
}
