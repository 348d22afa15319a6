//! The cluster scenario: private `nats-server -js` and `redis-server` instances, process nodes
//! and one, then two, ingest nodes of the release binary on this machine; durable ingestion
//! spread over the ingest nodes, with throughput, ack latency (the JetStream publish
//! acknowledgement included) and CPU per event by role. On one machine the nodes share its
//! cores, so the figures are a cost model, not a speed-up.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use testkit::services::Service;

use crate::generate::Generator;
use crate::server::{default_binary, launch, Target, ADMIN_TOKEN};
use crate::{print_table, run_mode, Args, Mode, Plans};

/// One role's processes.
struct Role {
    name: &'static str,
    pids: Vec<u32>,
}

fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| testkit::process_stats(*pid).ok())
        .map(|stats| stats.cpu.as_secs_f64())
        .sum()
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

fn node(
    binary: &std::path::Path,
    role: &str,
    name: &str,
    (nats, redis): (&str, &str),
    env: &[(String, String)],
) -> Result<testkit::Server> {
    launch(binary)
        .env("STATSREMOTE__CLUSTER__ROLE", role)
        .env("STATSREMOTE__CLUSTER__NODE_ID", name)
        .env("STATSREMOTE__CLUSTER__NATS_URL", nats)
        .env("STATSREMOTE__CLUSTER__REDIS_URL", redis)
        .envs(env.iter().cloned())
        .start()
        .map_err(|error| anyhow!("starting a {role} node: {error}"))
}

/// A counter summed over the nodes' `/metrics` (0 when absent).
fn counter_sum(nodes: &[testkit::Server], name: &str) -> f64 {
    (nodes.iter())
        .filter_map(|node| ureq::get(&format!("{}/metrics", node.base())).call().ok())
        .filter_map(|reply| reply.into_string().ok())
        .flat_map(|text| {
            (text.lines())
                .filter_map(|line| {
                    line.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Runs durable ingestion against 1 and 2 ingest nodes (and `--process-nodes` process nodes).
pub(crate) fn run(args: &Arc<Args>, generator: &Arc<Generator>) -> Result<()> {
    let binary = args.server_bin.clone().unwrap_or_else(default_binary);
    let mut rows = Vec::new();
    for ingest_nodes in 1..=2 {
        let nats = Service::nats().map_err(|e| anyhow!("{e}"))?;
        let redis = Service::redis().map_err(|e| anyhow!("{e}"))?;
        let (nats_url, redis_url) = (nats.url(), redis.url());
        let s3 = match &args.cluster_checkpoint_every {
            Some(every) => {
                let s3 = testkit::s3::S3Server::start().map_err(|e| anyhow!("{e}"))?;
                s3.create_bucket("loadtest").map_err(|e| anyhow!("{e}"))?;
                let mut env = s3.server_env("loadtest", "cluster");
                env.push((
                    "STATSREMOTE__CLUSTER__CHECKPOINT_EVERY".into(),
                    every.clone(),
                ));
                Some((s3, env))
            }
            None => None,
        };
        let env = s3.as_ref().map_or(&[][..], |(_, env)| env.as_slice());
        let process: Vec<testkit::Server> = (0..args.process_nodes.max(1))
            .map(|n| {
                node(
                    &binary,
                    "process",
                    &format!("process-{n}"),
                    (&nats_url, &redis_url),
                    env,
                )
            })
            .collect::<Result<_>>()?;
        let ingest: Vec<testkit::Server> = (0..ingest_nodes)
            .map(|n| {
                node(
                    &binary,
                    "ingest",
                    &format!("ingest-{n}"),
                    (&nats_url, &redis_url),
                    env,
                )
            })
            .collect::<Result<_>>()?;
        let urls: Vec<String> = ingest.iter().map(|s| s.base().to_string()).collect();
        let target = Target::existing(&urls.join(","), ADMIN_TOKEN);
        if !target.cluster {
            return Err(anyhow!("the ingest nodes do not answer as a cluster's"));
        }
        let mut roles = vec![
            Role {
                name: "ingest",
                pids: ingest.iter().filter_map(testkit::Server::pid).collect(),
            },
            Role {
                name: "process",
                pids: process.iter().filter_map(testkit::Server::pid).collect(),
            },
            Role {
                name: "nats",
                pids: nats.pid().into_iter().collect(),
            },
            Role {
                name: "redis",
                pids: redis.pid().into_iter().collect(),
            },
        ];
        if let Some((s3, _)) = &s3 {
            // moto, a Python mock: its cost says nothing about S3's.
            roles.push(Role {
                name: "s3 (moto)",
                pids: vec![s3.pid()],
            });
        }
        let before: Vec<f64> = roles.iter().map(|r| cpu_seconds(&r.pids)).collect();
        let (run, _) = run_mode(Mode::Durable, Plans::None, &target, args, generator)?;
        // After verification: the process nodes' CPU includes catching up with the stream.
        let cpu: Vec<(&str, f64)> = roles
            .iter()
            .zip(before)
            .map(|(role, before)| (role.name, cpu_seconds(&role.pids) - before))
            .collect();
        let stream_bytes = dir_bytes(&nats.dir());
        println!(
            "\n{ingest_nodes} ingest node(s), {} process node(s):",
            process.len()
        );
        print_table(std::slice::from_ref(&run));
        let per_event = |seconds: f64| seconds * 1e6 / run.acked.max(1) as f64;
        println!(
            "CPU per event (µs): {}",
            cpu.iter()
                .map(|(name, seconds)| format!("{name} {:.1}", per_event(*seconds)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "JetStream storage: {:.0} bytes per event ({} MiB)",
            stream_bytes as f64 / run.acked.max(1) as f64,
            stream_bytes / 1_048_576
        );
        if s3.is_some() {
            println!(
                "Cold tier: {:.0} events in {:.0} segments, {:.0} checkpoints (by the end of the run)",
                counter_sum(&process, "statsremote_cluster_cold_events_total"),
                counter_sum(&process, "statsremote_cluster_cold_segments_total"),
                counter_sum(&process, "statsremote_cluster_checkpoints_total"),
            );
        }
        rows.push(serde_json::json!({
            "jetstream_bytes_per_event": stream_bytes as f64 / run.acked.max(1) as f64,
            "ingest_nodes": ingest_nodes,
            "process_nodes": process.len(),
            "run": run,
            "cpu_us_per_event": cpu.iter().map(|(name, s)| (name.to_string(), per_event(*s))).collect::<std::collections::BTreeMap<_, _>>(),
        }));
        for server in ingest.iter().chain(&process) {
            let _ = server.stop(std::time::Duration::from_secs(60));
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
