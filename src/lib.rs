//! StatsRemote: a self-hostable, multi-tenant event ingestion and live product-metrics server.
//!
//! The path of an event, and where each step lives:
//!
//! 1. **Ingest** — [`http`]: actix-web workers authenticate ([`http::auth`]), read and
//!    decompress the body within limits ([`http::body`]), parse the Segment format
//!    ([`http::segment`]) into [`event::IncomingEvent`]s and apply the tenant's rate limit
//!    ([`ratelimit`]). The batch goes to the tenant's pipeline ([`actors`]): its ingest actor
//!    ([`actors::ingest`]) enriches every event ([`enrich`]) into [`event::StoredEvent`]s and
//!    encodes the log entry.
//! 2. **Log** — [`storage::writer`]: one thread drops duplicates ([`storage::dedup`]), assigns
//!    sequence numbers, appends through the [`storage::event_log::EventLog`] seam (embedded:
//!    [`storage::fjall_log`]) and commits once per group of requests (fsync). Only then is the
//!    HTTP reply sent, with what became of each event.
//! 3. **Rollups** — [`actors::rollup`]: from those facts the ingest actor sends the new events'
//!    rollup items ([`rollup`]) to the tenant's rollup actor, which merges them in memory and
//!    flushes them with a watermark ([`storage::rollups`]); it reads from the log whatever it
//!    missed. It also applies identity calls in log order and counts each event for its person
//!    ([`identity`]).
//! 4. **Live** — [`actors::live`]: the rollup actor feeds the live hub, which ticks every second
//!    to WebSocket subscribers ([`http::live`]).
//! 5. **Queries** — [`query`]: series, top events, uniques from the stored rollups (cached by
//!    block, [`query::blocks`]); funnels and exports ([`http::export`]) from the log.
//!
//! Around that path: [`actors::child`] how a tenant's actors are supervised; [`lifecycle`]
//! creating, rotating and deleting tenants; [`tenant`] tenants, settings and keys; [`ids`] the
//! tenant id; [`config`] the typed settings; [`telemetry`] logs and metrics; [`server`] start-up
//! and ordered shutdown; [`blocking`] the one way to run blocking work; [`descriptors`] how file
//! descriptors are shared between client connections and the storage engine; [`fuzzing`] the
//! entry points of the fuzz targets.

pub mod actors;
pub mod blocking;
pub mod cluster;
pub mod config;
pub mod deadletter;
pub mod descriptors;
pub mod enrich;
pub mod erasure;
pub mod event;
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod ids;
pub mod json;
pub mod lifecycle;
pub mod priority;
pub mod query;
pub mod ratelimit;
pub mod rollup;
pub mod sampling;
pub mod schema;
pub mod server;
pub mod sketch;
pub mod storage;
pub mod telemetry;
pub mod tenant;
