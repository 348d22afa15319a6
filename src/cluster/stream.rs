//! The event stream between ingest and process nodes: one JetStream stream,
//! `<PREFIX>_EVENTS`, in file storage, with one subject per partition
//! (`<prefix>.events.<partition>`).
//!
//! An ingest node publishes each request's batch to its tenant's partition and answers the
//! client only once JetStream has acknowledged the publish (the message is then stored on the
//! stream's replicas); the publish carries an id unique to the batch as `Nats-Msg-Id`, so a
//! publish retried after a lost acknowledgement is stored once. A partition's owner reads its subject from the
//! sequence after its last checkpoint ([`EventStream::read`]), so a new owner rebuilds its
//! state from the checkpoint and the stream's tail; messages stay until a checkpoint covers
//! them, and the owner then removes them ([`EventStream::trim`]).

use std::time::Duration;

use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::StreamExt;

/// Why the stream could not be used. The text says what was being done.
#[derive(Debug, thiserror::Error)]
#[error("NATS JetStream, {what}: {detail}")]
pub struct StreamError {
    what: &'static str,
    detail: String,
}

pub(crate) fn failed(what: &'static str) -> impl Fn(String) -> StreamError {
    move |detail| StreamError { what, detail }
}

/// A JetStream context on a new connection to `url`; `timeout` bounds connecting and every
/// JetStream request.
pub async fn connect_jetstream(
    url: &str,
    timeout: Duration,
) -> Result<jetstream::Context, StreamError> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(timeout)
        .connect(url)
        .await
        .map_err(|e| failed("connecting")(e.to_string()))?;
    let mut js = jetstream::new(client);
    js.set_timeout(timeout);
    Ok(js)
}

/// One message of a partition: its stream sequence and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMessage {
    pub seq: u64,
    pub payload: Bytes,
}

/// A node's handle on the event stream.
pub struct EventStream {
    js: jetstream::Context,
    name: String,
    prefix: String,
    publish_timeout: Duration,
}

impl EventStream {
    /// Connects and makes sure the stream exists (`replicas`: 1 on a single NATS server, 3 in
    /// production). `publish_timeout` bounds each publish and each read step.
    pub async fn connect(
        url: &str,
        prefix: &str,
        replicas: usize,
        publish_timeout: Duration,
    ) -> Result<EventStream, StreamError> {
        let js = connect_jetstream(url, publish_timeout).await?;
        EventStream::open(js, prefix, replicas, publish_timeout).await
    }

    /// [`EventStream::connect`] over an existing connection.
    pub async fn open(
        js: jetstream::Context,
        prefix: &str,
        replicas: usize,
        publish_timeout: Duration,
    ) -> Result<EventStream, StreamError> {
        let name = format!("{}_EVENTS", prefix.to_ascii_uppercase());
        js.get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.events.*")],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| failed("creating the event stream")(e.to_string()))?;
        Ok(EventStream {
            js,
            name,
            prefix: prefix.to_string(),
            publish_timeout,
        })
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JetStream context the stream is used through.
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    async fn stream(&self) -> Result<stream::Stream, StreamError> {
        self.js
            .get_stream(&self.name)
            .await
            .map_err(|e| failed("opening the event stream")(e.to_string()))
    }

    fn subject(&self, partition: u16) -> String {
        format!("{}.events.{partition}", self.prefix)
    }

    /// Publishes one batch to `partition`; returns its stream sequence once JetStream has
    /// stored it. A second publish with the same `id` within the stream's duplicate window
    /// (two minutes) is stored once and answered with the first one's sequence.
    pub async fn publish(
        &self,
        partition: u16,
        id: &str,
        payload: Bytes,
    ) -> Result<u64, StreamError> {
        let publish = PublishMessage::build().payload(payload).message_id(id);
        let acked = tokio::time::timeout(self.publish_timeout, async {
            let pending = self
                .js
                .send_publish(self.subject(partition), publish)
                .await
                .map_err(|e| failed("publishing")(e.to_string()))?;
            pending
                .await
                .map_err(|e| failed("waiting for the publish acknowledgement")(e.to_string()))
        })
        .await
        .map_err(|_| {
            failed("publishing")(format!(
                "no acknowledgement within {:?}",
                self.publish_timeout
            ))
        })??;
        Ok(acked.sequence)
    }

    /// The messages of `partition` from stream sequence `from_seq` on, as the stream holds
    /// them now, at most `max`, in order.
    pub async fn read(
        &self,
        partition: u16,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<StreamMessage>, StreamError> {
        let stream = self.stream().await?;
        let last = stream
            .get_last_raw_message_by_subject(&self.subject(partition))
            .await;
        match last {
            Ok(last) if from_seq <= last.sequence && max > 0 => {}
            // No message on the subject, or none from `from_seq` on.
            _ => return Ok(Vec::new()),
        }
        let mut reader = self.reader(partition, from_seq).await?;
        reader.next_batch(max, self.publish_timeout).await
    }

    /// A reader of `partition` from stream sequence `from_seq` on, which keeps its consumer
    /// open and receives new messages as they are stored (see [`PartitionReader`]).
    pub async fn reader(
        &self,
        partition: u16,
        from_seq: u64,
    ) -> Result<PartitionReader, StreamError> {
        let stream = self.stream().await?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: self.subject(partition),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from_seq.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| failed("creating a reader")(e.to_string()))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| failed("reading")(e.to_string()))?;
        Ok(PartitionReader {
            messages,
            pending: 0,
        })
    }

    /// Removes `partition`'s messages below stream sequence `below` (those a checkpoint covers).
    pub async fn trim(&self, partition: u16, below: u64) -> Result<u64, StreamError> {
        let stream = self.stream().await?;
        let purged = stream
            .purge()
            .filter(self.subject(partition))
            .sequence(below)
            .await
            .map_err(|e| failed("trimming")(e.to_string()))?;
        Ok(purged.purged)
    }
}

/// How long a reader waits for a message the server said is pending.
const PENDING_WAIT: Duration = Duration::from_secs(1);

/// An open, ordered reader of one partition: messages arrive as JetStream stores them, so an
/// idle partition costs nothing but the consumer's heartbeats (no polling). After an error
/// the reader is dropped and a new one opened where processing stopped.
pub struct PartitionReader {
    messages: async_nats::jetstream::consumer::pull::Ordered,
    /// Messages of the partition after the last one read, as the server last said.
    pending: u64,
}

impl PartitionReader {
    /// Up to `max` messages: waits at most `wait` for the first, then takes those already
    /// there. Empty when nothing came within `wait`.
    pub async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<StreamMessage>, StreamError> {
        let mut out = Vec::new();
        let Ok(first) = tokio::time::timeout(wait, self.messages.next()).await else {
            return Ok(out);
        };
        let mut next = first;
        loop {
            let Some(message) = next else {
                return Err(failed("reading")("the reader ended".into()));
            };
            let message = message.map_err(|e| failed("reading")(e.to_string()))?;
            let info = message
                .info()
                .map_err(|e| failed("reading a message's sequence")(e.to_string()))?;
            self.pending = info.pending;
            out.push(StreamMessage {
                seq: info.stream_sequence,
                payload: message.payload.clone(),
            });
            if out.len() >= max || self.pending == 0 {
                return Ok(out);
            }
            // More are stored: they are on their way.
            match tokio::time::timeout(wait.max(PENDING_WAIT), self.messages.next()).await {
                Ok(item) => next = item,
                Err(_) => return Ok(out),
            }
        }
    }

    /// Messages of the partition not read yet, as of the last one read.
    pub fn pending(&self) -> u64 {
        self.pending
    }
}
