//! Live counts fanned out between nodes through Redis pub/sub: a partition's owner publishes
//! the rollup items of each batch it has made durable on `<prefix>:live:<tenant>`, and every
//! node subscribes to all tenants' channels and feeds its own live hub, so a WebSocket on any
//! node sees the events processed on every node.
//!
//! Pub/sub delivers to the subscribers connected at the time: a node that is disconnected
//! misses the ticks of that time, which the live view (a moving second and minute) tolerates;
//! the rollups, which must not miss anything, are written by the owners, not through this. A
//! subscriber reconnects by itself.

use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::ids::TenantId;
use crate::rollup::{RollupItem, RollupItems};
use crate::storage::codec;

/// The live part of one batch, as published.
#[derive(Serialize, Deserialize)]
struct LiveMessage {
    names: Vec<String>,
    items: Vec<RollupItem>,
}

fn channel(prefix: &str, tenant: TenantId) -> String {
    format!("{prefix}:live:{tenant}")
}

/// Publishes a batch's items for the other nodes' live hubs. Fire and forget: returns how many
/// nodes were subscribed.
pub async fn publish(
    redis: &ConnectionManager,
    prefix: &str,
    tenant: TenantId,
    items: &RollupItems,
) -> redis::RedisResult<u64> {
    let message = LiveMessage {
        names: items.names().to_vec(),
        items: items.items().to_vec(),
    };
    let payload = codec::encode(&message).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::Client,
            "encoding live items",
            e.to_string(),
        ))
    })?;
    let mut redis = redis.clone();
    redis::cmd("PUBLISH")
        .arg(channel(prefix, tenant))
        .arg(payload)
        .query_async(&mut redis)
        .await
}

/// Subscribes to every tenant's live channel; the batches arrive on the returned receiver, as
/// many as `capacity` waiting (more are dropped, like a full live hub's). The subscription
/// reconnects after a failure and ends when the receiver is dropped. Spawns a task on the
/// current Tokio runtime.
pub fn subscribe(
    url: &str,
    prefix: &str,
    capacity: usize,
) -> redis::RedisResult<mpsc::Receiver<(TenantId, RollupItems)>> {
    let client = redis::Client::open(url)?;
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    let pattern = format!("{prefix}:live:*");
    let skip = format!("{prefix}:live:");
    tokio::spawn(async move {
        while !sender.is_closed() {
            if let Err(error) = forward(&client, &pattern, &skip, &sender).await {
                tracing::warn!(%error, "live fan-out subscription lost; subscribing again");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok(receiver)
}

/// Forwards the messages of one subscription until it fails or the receiver is gone.
async fn forward(
    client: &redis::Client,
    pattern: &str,
    skip: &str,
    sender: &mpsc::Sender<(TenantId, RollupItems)>,
) -> redis::RedisResult<()> {
    use futures_util::StreamExt;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe(pattern).await?;
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let Some(tenant) = (message.get_channel_name().strip_prefix(skip))
            .and_then(|id| id.parse::<TenantId>().ok())
        else {
            continue;
        };
        let decoded: Result<LiveMessage, _> = codec::decode(message.get_payload_bytes());
        let Ok(live) = decoded else {
            tracing::warn!(%tenant, "skipping a live message that cannot be decoded");
            continue;
        };
        let items = RollupItems::from_parts(live.names, live.items);
        match sender.try_send((tenant, items)) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Io,
        "the subscription ended",
    )))
}
