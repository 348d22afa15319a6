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

/// Every event with its count and distinct users over `[from, to)` (aligned), largest first,
/// with the 95% bounds of their errors when sampled events contributed.
pub async fn event_totals(
    shared: &SharedRollups,
    tenant: TenantId,
    from: Micros,
    to: Micros,
    limit: usize,
) -> redis::RedisResult<Vec<EventTotal>> {
    let parts = cover(from, to);
    let all = shared.totals(tenant, &parts).await?;
    let mut totals: Vec<(String, u64)> = (all.iter())
        // Not the series of sampled events' users (they are not events).
        .filter(|(name, count)| {
            *name != ALL_EVENTS && !crate::sampling::is_sampled_series(name) && **count > 0
        })
        .map(|(name, count)| (name.clone(), *count))
        .collect();
    totals.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    totals.truncate(limit);
    let mut out = Vec::with_capacity(totals.len());
    let mut sampled = shared.all_sampled_weights(tenant).await?;
    for (event, count) in totals {
        let weights = sampled.remove(&event).unwrap_or_default();
        let uniques = (shared.estimated_uniques(tenant, &event, &weights, &parts)).await?;
        // Each weight's kept events (its series counts them once each, while the event's
        // count has them at their weight) and their users, as the single node estimates.
        let mut levels = Vec::with_capacity(weights.len());
        for weight in &weights {
            let series = crate::sampling::sampled_series(&event, *weight);
            let kept = all.get(&series).copied().unwrap_or(0);
            if kept > 0 {
                let users = shared.uniques(tenant, &series, &parts).await?;
                levels.push((*weight, kept, users as f64));
            }
        }
        let weighted: u64 = levels.iter().map(|(w, kept, _)| u64::from(*w) * kept).sum();
        let mut counted = crate::sampling::estimate_count(count.saturating_sub(weighted), &levels);
        counted.value = count as f64;
        out.push(EventTotal {
            event,
            count,
            uniques: uniques.rounded(),
            relative_error: crate::query::RelativeError::of(&counted, &uniques),
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
