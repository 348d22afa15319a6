//! The query API's rollup answers on a cluster's ingest node, from the shared rollups in Redis:
//! series, top events and distinct users, the same numbers on every node. Distinct users of
//! sampled events are scaled as the single node's are (counts are stored weighted). Funnels and exports
//! read stored events, which cluster mode keeps on the partitions' owners and in the cold tier.

use crate::cluster::rollups::SharedRollups;
use crate::event::Micros;
use crate::ids::TenantId;
use crate::query::{EventTotal, Metric, Point};
use crate::rollup::{cover, Resolution, ALL_EVENTS};
use crate::sampling::Estimate;

/// Every bucket of `[from, to)` (aligned) at `resolution`, zeros included.
pub async fn series(
    shared: &SharedRollups,
    tenant: TenantId,
    event: Option<&str>,
    metric: Metric,
    resolution: Resolution,
    from: Micros,
    to: Micros,
) -> redis::RedisResult<Vec<Point>> {
    let name = event.unwrap_or(ALL_EVENTS);
    let values: Vec<(Micros, Estimate)> = match metric {
        Metric::Count => (shared.counts(tenant, resolution, name, from, to).await?)
            .into_iter()
            .map(|(ts, count)| (ts, Estimate::exact(count as f64)))
            .collect(),
        Metric::Uniques => {
            let weights = shared.sampled_weights(tenant, name).await?;
            (shared.bucket_estimates(tenant, resolution, name, &weights, from, to)).await?
        }
    };
    Ok(values
        .into_iter()
        .map(|(ts, estimate)| Point {
            ts,
            value: estimate.rounded(),
            relative_error: estimate.relative_error,
        })
        .collect())
}

/// Every event with its count and distinct users over `[from, to)` (aligned), largest first.
pub async fn event_totals(
    shared: &SharedRollups,
    tenant: TenantId,
    from: Micros,
    to: Micros,
    limit: usize,
) -> redis::RedisResult<Vec<EventTotal>> {
    let parts = cover(from, to);
    let mut totals: Vec<(String, u64)> = shared
        .totals(tenant, &parts)
        .await?
        .into_iter()
        // Not the series of sampled events' users (they carry no counts of their own).
        .filter(|(name, count)| {
            name != ALL_EVENTS && !crate::sampling::is_sampled_series(name) && *count > 0
        })
        .collect();
    totals.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    totals.truncate(limit);
    let mut out = Vec::with_capacity(totals.len());
    let mut sampled = shared.all_sampled_weights(tenant).await?;
    for (event, count) in totals {
        let weights = sampled.remove(&event).unwrap_or_default();
        let uniques = (shared.estimated_uniques(tenant, &event, &weights, &parts))
            .await?
            .rounded();
        out.push(EventTotal {
            event,
            count,
            uniques,
            relative_error: None,
        });
    }
    Ok(out)
}

/// Distinct users over `[from, to)` (aligned).
pub async fn uniques(
    shared: &SharedRollups,
    tenant: TenantId,
    event: Option<&str>,
    from: Micros,
    to: Micros,
) -> redis::RedisResult<Estimate> {
    let name = event.unwrap_or(ALL_EVENTS);
    let weights = shared.sampled_weights(tenant, name).await?;
    (shared.estimated_uniques(tenant, name, &weights, &cover(from, to))).await
}
