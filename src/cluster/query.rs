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
        Metric::Count => {
            let weights = shared.sampled_weights(tenant, name).await?;
            let counts = shared.counts(tenant, resolution, name, from, to).await?;
            if weights.is_empty() {
                (counts.into_iter())
                    .map(|(ts, count)| (ts, Estimate::exact(count as f64)))
                    .collect()
            } else {
                sampled_counts(shared, tenant, resolution, name, &weights, counts).await?
            }
        }
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

/// Each bucket's weighted count with the 95% bound of its error, as the single node estimates
/// it: from each weight's kept events in the bucket and their distinct users.
async fn sampled_counts(
    shared: &SharedRollups,
    tenant: TenantId,
    resolution: Resolution,
    name: &str,
    weights: &[u32],
    counts: Vec<(Micros, u64)>,
) -> redis::RedisResult<Vec<(Micros, Estimate)>> {
    let (Some(from), Some(last)) = (counts.first(), counts.last()) else {
        return Ok(Vec::new());
    };
    let (from, to) = (from.0, last.0 + resolution.width());
    let mut levels = Vec::with_capacity(weights.len());
    for weight in weights {
        let series = crate::sampling::sampled_series(name, *weight);
        let kept = shared.counts(tenant, resolution, &series, from, to).await?;
        let users = (shared.bucket_uniques(tenant, resolution, &series, from, to)).await?;
        levels.push((*weight, kept, users));
    }
    Ok(counts
        .into_iter()
        .enumerate()
        .map(|(i, (ts, count))| {
            let bucket: Vec<(u32, u64, f64)> = (levels.iter())
                .map(|(weight, kept, users)| (*weight, kept[i].1, users[i].1 as f64))
                .filter(|(_, kept, _)| *kept > 0)
                .collect();
            (ts, crate::sampling::stored_count_estimate(count, &bucket))
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
        let counted = crate::sampling::stored_count_estimate(count, &levels);
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
