//! Start-up and ordered shutdown.
//!
//! Start: open storage, resolve the admin token, load tenants, start the log writer and the actor
//! arbiters, bind HTTP, print the address. Shutdown on SIGTERM or SIGINT: stop accepting and let
//! in-flight requests finish (each waits for its fsync), stop the tenant actors, let the log
//! writer write whatever is queued and persist, then return so the process exits 0.

use std::io::Write;
use std::sync::Arc;

use actix_web::{web, HttpServer};

use crate::actors::{PipelineDeps, Pipelines};
use crate::cluster::node::ClusterNode;
use crate::cluster::Role;
use crate::config::{Config, Durability};
use crate::http::{self, AppState};
use crate::lifecycle::TenantLifecycle;
use crate::query::QueryCache;
use crate::ratelimit::RateLimits;
use crate::schema::{RegistryLimits, SchemaRegistry};
use crate::storage::writer::{LogWriter, WriterOptions};
use crate::storage::{meta, Storage, StorageError};
use crate::telemetry;
use crate::tenant::{self, KeyDigest, TenantDirectory};

/// Environment variable holding the admin token.
pub const ADMIN_TOKEN_ENV: &str = "STATSREMOTE_ADMIN_TOKEN";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot open the cold store: {0}")]
    Cold(#[from] crate::storage::cold::ColdError),
    #[error(transparent)]
    Descriptors(#[from] crate::descriptors::TooFewDescriptors),
    #[error("{ADMIN_TOKEN_ENV} must be at least {min} characters", min = crate::config::MIN_TOKEN_LEN)]
    ShortAdminToken,
    #[error("enrich.geoip_database: {0}")]
    GeoDatabase(String),
    #[error("cluster: {0}")]
    Cluster(String),
}

/// What enrichment derives, from `[enrich]`; the user-agent patterns compile in the background.
fn derivers(config: &crate::config::EnrichConfig) -> Result<crate::enrich::Derivers, ServerError> {
    let geo = match config.geoip_database.trim() {
        "" => None,
        path => Some(
            crate::enrich::geo::GeoDatabase::open(std::path::Path::new(path))
                .map_err(ServerError::GeoDatabase)?,
        ),
    };
    if config.user_agent {
        std::thread::Builder::new()
            .name("agent-patterns".into())
            .spawn(crate::enrich::agent::warm_up)?;
    }
    Ok(crate::enrich::Derivers {
        user_agent: config.user_agent,
        campaign: config.campaign,
        geo,
    })
}

/// The admin token digest in force: from the environment or the config, else the stored one,
/// else a new token, printed once.
fn admin_digest(config: &Config, storage: &Storage) -> Result<KeyDigest, StorageError> {
    let configured = std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| Some(config.auth.admin_token.clone()).filter(|t| !t.trim().is_empty()));
    if let Some(token) = configured {
        return Ok(tenant::digest(token.trim()));
    }
    if let Some(stored) = meta::admin_token_digest(storage)? {
        return Ok(stored);
    }
    let token = tenant::generate_admin_token();
    let digest = tenant::digest(&token);
    // Printed, not logged: it must not end up in log storage. Only its digest is kept, and
    // only once the token has reached the operator (if stdout is closed, nothing is stored and
    // the next start tries again).
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "Generated admin token (shown only this once; only its hash is stored): {token}"
    )
    .and_then(|()| stdout.flush())
    .map_err(|e| {
        StorageError::NotDurable(format!("cannot print the generated admin token: {e}"))
    })?;
    meta::set_admin_token_digest(storage, &digest)?;
    Ok(digest)
}

/// Starts the pipeline of every tenant whose rollups are behind its log (after a crash, say),
/// or that has entries in the hot log, so its rollups catch up and its old entries move to the
/// cold tier without waiting for the tenant's next request.
fn start_lagging_pipelines(
    storage: &Storage,
    directory: &TenantDirectory,
    pipelines: &Pipelines,
) -> Result<(), StorageError> {
    for tenant in directory.list() {
        let head = storage.log().head(tenant.id)?;
        let watermark = crate::storage::rollups::watermark(storage, tenant.id)?;
        if head > watermark {
            tracing::info!(tenant = %tenant.id, head, watermark, "rolling up events after restart");
            pipelines.pipeline(tenant.id);
        } else if !storage.log().read(tenant.id, 0, 1)?.is_empty()
            || crate::storage::cold::cold_watermark(storage, tenant.id)? > 0
        {
            // Its flusher moves what ages out of the hot log and keeps the cold tier (retention,
            // compaction, trash).
            pipelines.pipeline(tenant.id);
        }
    }
    Ok(())
}

/// Runs the server until SIGTERM or SIGINT. Must be called inside an actix System.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let env_token = std::env::var(ADMIN_TOKEN_ENV).unwrap_or_default();
    let env_token = env_token.trim();
    if !env_token.is_empty() && env_token.chars().count() < crate::config::MIN_TOKEN_LEN {
        return Err(ServerError::ShortAdminToken);
    }
    let metrics = telemetry::install_metrics();
    if config.benchmark.ceiling_discard_events {
        tracing::warn!(
            "benchmark.ceiling_discard_events is ON: events are parsed and then DISCARDED, not stored"
        );
    }
    if !config.benchmark.fsync_delay.is_zero() {
        tracing::warn!(
            delay = ?config.benchmark.fsync_delay,
            "benchmark.fsync_delay is ON: every fsync of the event log is made slower on purpose"
        );
    }
    let descriptors = crate::descriptors::raise_and_share(
        config.server.max_connections,
        config.http_workers() + config.actor_arbiters(),
    )?;
    if descriptors.connections < config.server.max_connections {
        tracing::warn!(
            open_file_limit = descriptors.limit,
            connections = descriptors.connections,
            "the open-file limit allows fewer connections than server.max_connections"
        );
    }
    tracing::info!(
        open_file_limit = descriptors.limit,
        connections = descriptors.connections,
        storage_files = descriptors.storage_files,
        "file descriptors shared out"
    );
    let role = config.cluster.role;
    let cluster = match role {
        Role::All => None,
        _ => Some(Arc::new(
            ClusterNode::connect(&config.cluster, config.tenant_defaults.clone())
                .await
                .map_err(ServerError::Cluster)?,
        )),
    };
    let db_path = match role {
        // A process node's store is its copy of its partitions' state, rebuilt from the
        // stream: it starts empty (see `crate::cluster::process`).
        Role::Process => {
            let path = config.storage.data_dir.join("partitions");
            if path.exists() {
                std::fs::remove_dir_all(&path)?;
            }
            path
        }
        Role::All | Role::Ingest => config.database_path(),
    };
    let storage = Storage::open_with_files(
        &db_path,
        config.storage.cache_size.as_u64(),
        Default::default(),
        descriptors.storage_files,
    )?;
    // Dedup keys are kept at least the default window, whichever tenants are known yet.
    storage
        .dedup_windows
        .set_floor(config.tenant_defaults.dedup_window);
    let admin = admin_digest(&config, &storage)?;
    let cold = match config.cold.store {
        crate::config::ColdStoreKind::Local => crate::storage::cold::ColdStore::local(
            &crate::config::cold_path(&config.storage.data_dir),
        )?,
        crate::config::ColdStoreKind::S3 => crate::storage::cold::ColdStore::s3(&config.cold.s3)?,
    };
    crate::lifecycle::resume_purges(&storage, &cold)?;
    let directory = Arc::new(TenantDirectory::load(
        storage.clone(),
        config.tenant_defaults.clone(),
        admin,
    )?);
    let derivers = Arc::new(derivers(&config.enrich)?);
    let schema_limits = RegistryLimits {
        max_schema_bytes: usize::try_from(config.processing.max_schema_bytes.as_u64())
            .unwrap_or(usize::MAX),
        max_versions_per_tenant: config.processing.max_schema_versions,
    };
    let schemas = Arc::new(match role {
        Role::All => SchemaRegistry::load(storage.clone(), schema_limits)?,
        // The shared plans are the record (`crate::cluster::plans`).
        Role::Ingest | Role::Process => SchemaRegistry::empty(storage.clone(), schema_limits),
    });
    if let Some(node) = &cluster {
        let limits_node = Arc::clone(node);
        node.mirror_directory(Arc::clone(&directory), move |tenant| {
            limits_node.limits.forget(tenant);
        })
        .await;
        if role == Role::Ingest {
            node.mirror_plans(Arc::clone(&schemas)).await;
        }
    }
    let writer = Arc::new(LogWriter::start(
        storage.clone(),
        WriterOptions {
            // A process node's log is rebuilt from the stream after a crash, so it need not
            // be fsync'd; the stream is what makes events durable in cluster mode.
            fsync: config.storage.durability == Durability::Fsync && role != Role::Process,
            queue_capacity: config.storage.queue_capacity,
            max_group_requests: config.storage.max_group_requests,
            dedup_filter_bytes: config.storage.dedup_filter_memory.as_u64(),
            dedup_max_age: config.storage.dedup_max_age,
            // A process node's letters go to the shared store (`crate::cluster::deadletters`).
            store_dead_letters: role != Role::Process,
            fsync_delay: config.benchmark.fsync_delay,
        },
    )?);
    let query_cache = Arc::new(QueryCache::new(
        config.rollups.query_cache_entries,
        config.rollups.query_cache_series_blocks,
    ));
    let pipelines = Arc::new(Pipelines::new(
        PipelineDeps {
            storage: storage.clone(),
            writer: Arc::clone(&writer),
            append: match (&cluster, role) {
                (Some(node), Role::Ingest) => Arc::new(crate::cluster::publish::StreamAppend::new(
                    Arc::clone(&node.stream),
                    config.cluster.partitions,
                    node.runtime.clone(),
                )),
                _ => Arc::clone(&writer) as Arc<dyn crate::storage::writer::Append>,
            },
            directory: Arc::clone(&directory),
            schemas: Arc::clone(&schemas),
            processing: config.processing.clone(),
            derivers,
            query_cache: Arc::clone(&query_cache),
            actors: config.actors.clone(),
            rollups: config.rollups.clone(),
            live: config.live.clone(),
            future_tolerance: config.limits.future_tolerance,
            rollup_flush_slots: Arc::new(tokio::sync::Semaphore::new(
                config.rollups.max_concurrent_flushes,
            )),
            cold_tasks: Arc::new(crate::blocking::Pool::new(
                "cold-tasks",
                config.cold_task_threads(),
                // Longer than the time between a tenant's passes.
                config.cold.flush_interval * 2,
            )?),
            cold: cold.clone(),
            cold_settings: config.cold.clone(),
            hot_retention: config.storage.hot_retention,
        },
        config.actor_arbiters(),
        config.actor_blocking_threads(),
    )?);
    start_lagging_pipelines(&storage, &directory, &pipelines)?;
    let rate_limits = Arc::new(RateLimits::default());
    let disk = crate::storage::disk::DiskSpace::new(
        db_path.clone(),
        config.storage.min_free_space.as_u64(),
    );
    disk.watch();
    let lifecycle = TenantLifecycle {
        storage: storage.clone(),
        writer: Arc::clone(&writer),
        directory: Arc::clone(&directory),
        schemas: Arc::clone(&schemas),
        pipelines: Arc::clone(&pipelines),
        rate_limits: Arc::clone(&rate_limits),
        query_cache: Arc::clone(&query_cache),
        cold: cold.clone(),
        cold_purge_delay: config.cold.grace_period + config.cold.flush_interval,
        cluster: cluster.clone(),
    };
    lifecycle.resume_erasures()?;
    let state = web::Data::new(AppState {
        config: config.clone(),
        storage: storage.clone(),
        writer: Arc::clone(&writer),
        directory: Arc::clone(&directory),
        schemas,
        pipelines: Arc::clone(&pipelines),
        lifecycle,
        rate_limits,
        disk: Arc::clone(&disk),
        cold,
        query_cache,
        metrics,
        large_bodies: http::body::LargeBodies::new(config.large_body_permits()),
        read_slots: http::slots::ReadSlots::new(config.reads.clone()),
        cluster: cluster.clone(),
    });
    let (stop_processing, processing_stopped) = tokio::sync::watch::channel(false);
    let processing = match (&cluster, role) {
        (Some(node), Role::Ingest) => {
            follow_live(node, &directory, &pipelines)?;
            None
        }
        (Some(node), Role::Process) => {
            let shared_store = match config.cold.store {
                crate::config::ColdStoreKind::S3 => Some(state.cold.clone()),
                crate::config::ColdStoreKind::Local => {
                    tracing::warn!(
                        "cold.store is local: process nodes write no checkpoints and no cold segments, and the event stream keeps every message"
                    );
                    None
                }
            };
            let process = Arc::new(crate::cluster::process::ProcessNode {
                node: Arc::clone(node),
                storage: storage.clone(),
                writer: Arc::clone(&writer),
                directory: Arc::clone(&directory),
                retention: config.rollups.retention(),
                max_identity_ids: config.rollups.max_identity_ids,
                default_dedup_window: config.tenant_defaults.dedup_window,
                // A client of their own: checkpoints are written from the partitions'
                // runtime, segments through the cold tier's, and a pooled connection must not
                // wait on a runtime that is not running.
                checkpoints: match &shared_store {
                    Some(_) => Some(crate::cluster::checkpoint::Checkpoints::new(
                        crate::storage::cold::ColdStore::s3(&config.cold.s3)?,
                    )),
                    None => None,
                },
                cold: shared_store.map(|store| crate::cluster::cold::ColdFlush {
                    store,
                    settings: config.cold.clone(),
                    // An hour's events mostly reach the cold tier by the checkpoints right
                    // after it; later ones are merged again once enough gather.
                    settle: node.config.checkpoint_every * 2,
                }),
            });
            // The partitions' work (decoding, rolling up) on a thread of its own, so that it
            // never delays the HTTP and engine connections' tasks of this runtime.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let thread = std::thread::Builder::new()
                .name("partitions".into())
                .spawn(move || runtime.block_on(process.run(processing_stopped)))?;
            Some(thread)
        }
        _ => None,
    };

    let listen = config.server.listen;
    let app_state = state.clone();
    let workers = config.http_workers();
    let server = HttpServer::new(move || http::app(app_state.clone()))
        .workers(workers)
        // actix counts connections per worker.
        .max_connections((descriptors.connections / workers).max(1))
        .client_request_timeout(config.server.header_timeout)
        .disable_signals()
        // Streamed answers (a series is sent block by block) end with a small write; with
        // Nagle's algorithm it would wait for the client's delayed ACK, 40 ms.
        .on_connect(|connection, _extensions| {
            if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
                let _ = tcp.set_nodelay(true);
            }
        })
        .shutdown_timeout(config.server.shutdown_timeout.as_secs_f64().ceil() as u64)
        .bind(listen)
        .map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
    let addrs = server.addrs();
    let running = server.run();
    let handle = running.handle();
    // The storage engine's workers (some start after the database opens) can wait; requests
    // cannot. See `crate::priority`.
    let lowered = crate::priority::background_threads_named("fjall:worker");
    tracing::debug!(lowered, "storage engine workers run at background priority");
    let mut stdout = std::io::stdout();
    for addr in &addrs {
        // Tests and scripts read this line; a closed stdout is no reason to stop.
        let _ = writeln!(stdout, "statsremote listening on http://{addr}");
    }
    let _ = stdout.flush();
    tracing::info!(
        addrs = ?addrs,
        data_dir = %config.storage.data_dir.display(),
        durability = ?config.storage.durability,
        tenants = directory.list().len(),
        "statsremote started"
    );

    actix_rt::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: draining HTTP requests");
        handle.stop(true).await;
    });
    running.await?;
    if let Some(thread) = processing {
        tracing::info!("HTTP stopped; releasing this process node's partitions");
        let _ = stop_processing.send(true);
        let _ = crate::blocking::run(move || thread.join()).await;
    }

    tracing::info!("HTTP stopped; stopping tenant actors and flushing the log");
    let writer_for_stop = Arc::clone(&writer);
    let pipelines_for_stop = Arc::clone(&pipelines);
    crate::blocking::run(move || {
        pipelines_for_stop.shutdown();
        writer_for_stop.shutdown();
    })
    .await
    .map_err(|e| ServerError::Io(std::io::Error::other(e.to_string())))?;
    drop(state);
    tracing::info!("statsremote stopped cleanly");
    Ok(())
}

/// Cluster ingest node: feeds the live ticks the partitions' owners publish into this node's
/// live hubs, so a WebSocket here sees the events processed on every node.
fn follow_live(
    node: &ClusterNode,
    directory: &Arc<TenantDirectory>,
    pipelines: &Arc<Pipelines>,
) -> Result<(), ServerError> {
    let mut ticks = crate::cluster::live::subscribe(
        &node.config.redis_url,
        &node.config.prefix,
        LIVE_FAN_OUT_QUEUE,
    )
    .map_err(|e| ServerError::Cluster(format!("redis: {e}")))?;
    let (directory, pipelines) = (Arc::clone(directory), Arc::clone(pipelines));
    tokio::spawn(async move {
        while let Some((tenant, items)) = ticks.recv().await {
            if directory.get(tenant).is_some() {
                pipelines.pipeline(tenant).feed_live(items);
            }
        }
    });
    Ok(())
}

/// Batches from the live fan-out waiting for this node's hubs (more are dropped).
const LIVE_FAN_OUT_QUEUE: usize = 1024;

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; falling back to Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
