//! A cluster node's handles on the engines, made once at start and shared by the HTTP handlers
//! and the background tasks of either role.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::cluster::commands::{Command, Markers};
use crate::cluster::deadletters::SharedDeadLetters;
use crate::cluster::directory::{self, SharedDirectory};
use crate::cluster::plans::SharedPlans;
use crate::cluster::ratelimit::SharedLimits;
use crate::cluster::rollups::SharedRollups;
use crate::cluster::stream::{connect_jetstream, EventStream};
use crate::cluster::{connect_redis, nats_ready, redis_ready, ClusterConfig, Readiness, Role};
use crate::config::TenantDefaults;
use crate::identity::IdentityMap;
use crate::tenant::TenantDirectory;

/// Bounds each request of the query, limit and live connection to Redis: a query on a node
/// whose Redis is gone fails fast instead of holding its request.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a starting node waits for the shared directory before serving anyway (it keeps
/// following it; tenants appear as they arrive).
const DIRECTORY_WAIT: Duration = Duration::from_secs(10);

/// One node's connections and shared-state handles.
pub struct ClusterNode {
    pub config: ClusterConfig,
    pub role: Role,
    /// This node's name among the process nodes.
    pub name: String,
    /// For queries, limits and live publishes (short timeouts).
    pub redis: ConnectionManager,
    pub stream: Arc<EventStream>,
    pub directory: SharedDirectory,
    pub plans: SharedPlans,
    /// Dead letters, for listing and replays (owners write them on their own connection).
    pub dead_letters: SharedDeadLetters,
    /// Which commands sent to owners are done.
    pub markers: Markers,
    /// Tenants' identity links as last read, with their version.
    identities: dashmap::DashMap<crate::ids::TenantId, (u64, Arc<IdentityMap>)>,
    pub rollups: SharedRollups,
    pub limits: SharedLimits,
    /// The runtime the connections live on; work that uses them is spawned there.
    pub runtime: tokio::runtime::Handle,
}

impl ClusterNode {
    /// Connects to NATS and Redis and makes sure the stream and the directory bucket exist.
    /// Must run on the runtime that lives as long as the node.
    pub async fn connect(
        config: &ClusterConfig,
        defaults: TenantDefaults,
    ) -> Result<ClusterNode, String> {
        let js = connect_jetstream(&config.nats_url, config.publish_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let stream = EventStream::open(
            js.clone(),
            &config.prefix,
            config.replicas,
            config.publish_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        let directory = SharedDirectory::open(&js, &config.prefix, config.replicas, defaults)
            .await
            .map_err(|e| e.to_string())?;
        let plans = SharedPlans::open(&js, &config.prefix, config.replicas)
            .await
            .map_err(|e| e.to_string())?;
        let redis = connect_redis(&config.redis_url, REDIS_TIMEOUT)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        Ok(ClusterNode {
            config: config.clone(),
            role: config.role,
            name: config.node_name(),
            rollups: SharedRollups::new(redis.clone(), &config.prefix),
            limits: SharedLimits::new(redis.clone(), &config.prefix),
            dead_letters: SharedDeadLetters::new(redis.clone(), &config.prefix),
            markers: Markers::new(redis.clone(), &config.prefix),
            identities: Default::default(),
            redis,
            stream: Arc::new(stream),
            directory,
            plans,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Runs `work` on the runtime the engines' connections live on, and waits for it: a Redis
    /// or NATS reconnection it starts then runs there, not on the caller's thread (an HTTP
    /// worker's, which stops with the server).
    pub async fn on_engines<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, String> {
        (self.runtime.spawn(work).await).map_err(|e| format!("engine task failed: {e}"))
    }

    /// Publishes `command` to `partition`'s stream, for its owner (see
    /// `crate::cluster::commands`).
    pub async fn send(self: &Arc<Self>, partition: u16, command: Command) -> Result<(), String> {
        let engines = Arc::clone(self);
        let published = self.on_engines(async move {
            let id = command.id().to_string();
            (engines
                .stream
                .publish(partition, &id, command.encode().into()))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        });
        published.await.and_then(|sent| sent)
    }

    /// Waits until the owners have done every command of `ids`; false after `timeout`.
    pub async fn wait_done(self: &Arc<Self>, ids: Vec<uuid::Uuid>, timeout: Duration) -> bool {
        let engines = Arc::clone(self);
        let waited = self.on_engines(async move { engines.markers.wait(&ids, timeout).await });
        waited.await.unwrap_or(false)
    }

    /// A tenant's identity links as its owner stored them with the shared rollups (`key`: the
    /// tenant's user-hash key), for exports and funnels: read again only when their version
    /// changed since this node last read them.
    pub async fn identity(
        self: &Arc<Self>,
        tenant: crate::ids::TenantId,
        key: [u8; 32],
    ) -> Result<Arc<IdentityMap>, String> {
        let engines = Arc::clone(self);
        let read = self.on_engines(async move {
            let version = engines.rollups.links_version(tenant).await?;
            let cached = engines.identities.get(&tenant).map(|entry| entry.clone());
            if let (Some(version), Some((held, map))) = (version, cached) {
                if held == version {
                    return Ok(map);
                }
            }
            // The version first: links written meanwhile make the next read load them again.
            let links = engines.rollups.links(tenant).await?;
            let map = Arc::new(IdentityMap::from_stored(&key, links));
            match version {
                Some(version) => {
                    engines
                        .identities
                        .insert(tenant, (version, Arc::clone(&map)));
                }
                None => {
                    engines.identities.remove(&tenant);
                }
            }
            Ok::<_, redis::RedisError>(map)
        });
        (read.await?).map_err(|e| format!("reading identity links: {e}"))
    }

    /// Whether each engine answers, for `/readyz`.
    pub async fn readiness(&self) -> Vec<(&'static str, Readiness)> {
        let nats = nats_ready(self.stream.context(), self.stream.name()).await;
        let redis = redis_ready(&self.redis).await;
        vec![("nats", nats), ("redis", redis)]
    }

    /// Applies the shared directory to `local`, and keeps applying its changes for as long as
    /// the node runs; resolves once every record that existed at start is applied (or after
    /// [`DIRECTORY_WAIT`], with a warning). `changed` is called with each tenant changed.
    pub async fn mirror_directory(
        self: &Arc<Self>,
        local: Arc<TenantDirectory>,
        changed: impl Fn(crate::ids::TenantId) + Send + 'static,
    ) {
        let (caught_up, done) = tokio::sync::oneshot::channel();
        let node = Arc::clone(self);
        self.runtime.spawn(async move {
            use futures_util::StreamExt;
            let mut caught_up = Some(caught_up);
            let changes = node.directory.follow();
            futures_util::pin_mut!(changes);
            while let Some(change) = changes.next().await {
                let tenant = match &change {
                    directory::DirectoryChange::Upsert(record) => Some(record.id),
                    directory::DirectoryChange::Removed(id) => Some(*id),
                    directory::DirectoryChange::CaughtUp => None,
                };
                if directory::apply(&local, change) {
                    if let Some(caught_up) = caught_up.take() {
                        let _ = caught_up.send(());
                    }
                }
                if let Some(tenant) = tenant {
                    changed(tenant);
                }
            }
        });
        if tokio::time::timeout(DIRECTORY_WAIT, done).await.is_err() {
            tracing::warn!(
                "the shared tenant directory did not arrive within {DIRECTORY_WAIT:?}; serving while it does"
            );
        }
    }

    /// Applies the shared tracking plans to `registry`, and keeps applying their changes for
    /// as long as the node runs; resolves once every plan that existed at start is applied (or
    /// after [`DIRECTORY_WAIT`], with a warning).
    pub async fn mirror_plans(self: &Arc<Self>, registry: Arc<crate::schema::SchemaRegistry>) {
        let (caught_up, done) = tokio::sync::oneshot::channel();
        let node = Arc::clone(self);
        self.runtime
            .spawn(async move { node.plans.mirror(&registry, caught_up).await });
        if tokio::time::timeout(DIRECTORY_WAIT, done).await.is_err() {
            tracing::warn!(
                "the shared tracking plans did not arrive within {DIRECTORY_WAIT:?}; serving while they do"
            );
        }
    }
}
