//! StatsRemote: a self-hostable, multi-tenant event ingestion and live product-metrics server.
//!
//! The path of an event, and where each step lives:
//!
//! 1. [`http`]: actix-web workers authenticate ([`http::auth`]), read and decompress the body
//!    within limits ([`http::body`]), parse the Segment format ([`http::segment`]) into
//!    [`event::IncomingEvent`]s, and apply the tenant's rate limit ([`ratelimit`]).
//! 2. [`actors`]: the batch goes to the tenant's supervisor and its ingest actor, which enriches
//!    every event ([`enrich`]) into [`event::StoredEvent`]s.
//! 3. [`storage`]: the log writer thread drops duplicates, assigns sequence numbers, writes the
//!    batch to fjall and fsyncs once per group of requests; then the HTTP reply is sent.
//!
//! [`tenant`] holds tenants, settings and keys; [`config`] the typed settings; [`telemetry`]
//! logs and metrics; [`server`] start-up and ordered shutdown; [`descriptors`] how file
//! descriptors are shared between client connections and the storage engine; [`fuzzing`] the
//! entry points of the fuzz targets.

pub mod actors;
pub mod blocking;
pub mod config;
pub mod descriptors;
pub mod enrich;
pub mod event;
pub mod fuzzing;
pub mod http;
pub mod ids;
pub mod json;
pub mod lifecycle;
pub mod priority;
pub mod query;
pub mod ratelimit;
pub mod rollup;
pub mod server;
pub mod sketch;
pub mod storage;
pub mod telemetry;
pub mod tenant;
