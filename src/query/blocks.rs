//! Series answers by blocks: an hour of a minute series, a day of an hour series. Whole blocks
//! whose every bucket has ended are rendered once and kept in the [`QueryCache`]; a series
//! answer is its blocks, from the cache where they are there, the rest computed from the stored
//! rollups in runs of neighbouring blocks (one storage scan each) and cached.

use std::sync::Arc;

use crate::event::{format_timestamp, Micros};
use crate::ids::TenantId;
use crate::query::{series_of, Metric, Point, QueryCache, SeriesSpan};
use crate::rollup::Resolution;
use crate::storage::{Storage, StorageError};

/// What a series answer is asked for.
#[derive(Debug, Clone)]
pub struct SeriesAsk {
    pub tenant: TenantId,
    pub event: Option<String>,
    pub metric: Metric,
    pub resolution: Resolution,
    /// Aligned to the resolution.
    pub from: Micros,
    pub to: Micros,
    /// Values only (`"values": [...]`) rather than points (`"points": [{"ts", "value"}]`).
    pub values_only: bool,
}

/// A series answer as the JSON text of its blocks' items, in order (empty blocks included).
pub struct RenderedSeries {
    pub parts: Vec<Arc<str>>,
    /// Every block came from the cache.
    pub all_cached: bool,
    /// The rates at which some of the series' events were sampled (in this range or not).
    pub sampled_rates: Vec<f64>,
}

impl SeriesAsk {
    fn block_key(&self, block: &SeriesBlock) -> String {
        format!(
            "{}\u{1}{:?}\u{1}{}\u{1}{}\u{1}{}\u{1}{}",
            self.event.as_deref().unwrap_or(""),
            self.metric,
            self.resolution.as_str(),
            self.values_only,
            block.from,
            block.to
        )
    }
}

/// Renders a series answer's blocks (see the module docs). Blocking.
pub fn render_series(
    storage: &Storage,
    cache: &QueryCache,
    ask: &SeriesAsk,
    now: Micros,
) -> Result<RenderedSeries, StorageError> {
    let plan = series_blocks(ask.resolution, ask.from, ask.to, now);
    // Cached blocks first; the version read before computing the rest guards the blocks
    // computed against a late event flushed meanwhile.
    let version = cache.version(ask.tenant);
    let keys: Vec<Option<String>> = plan
        .iter()
        .map(|block| block.cacheable.then(|| ask.block_key(block)))
        .collect();
    let mut parts = cache.get_blocks(ask.tenant, &keys);
    // The blocks to compute, as maximal runs of neighbours.
    let mut runs: Vec<(Micros, Micros)> = Vec::new();
    for (block, part) in plan.iter().zip(&parts) {
        if part.is_some() {
            continue;
        }
        match runs.last_mut() {
            Some(run) if run.1 == block.from => run.1 = block.to,
            _ => runs.push((block.from, block.to)),
        }
    }
    let all_cached = runs.is_empty();
    let name = ask.event.as_deref().unwrap_or(crate::rollup::ALL_EVENTS);
    let weights = crate::storage::rollups::sampled_weights(storage, ask.tenant, name)?;
    let mut computed = Vec::new();
    for (from, to) in runs {
        let span = SeriesSpan {
            resolution: ask.resolution,
            from,
            to,
        };
        computed.extend(series_of(
            storage, ask.tenant, name, ask.metric, &span, &weights,
        )?);
    }
    let mut computed = computed.into_iter().peekable();
    for (block, part) in plan.iter().zip(parts.iter_mut()) {
        if part.is_some() {
            continue;
        }
        let mut text = String::with_capacity(64 * 48);
        while let Some(point) = computed.next_if(|p| p.ts < block.to) {
            if !text.is_empty() {
                text.push(',');
            }
            if ask.values_only {
                use std::fmt::Write;
                let _ = write!(text, "{}", point.value);
            } else {
                push_point(&mut text, &point);
            }
        }
        let text: Arc<str> = Arc::from(text);
        if block.cacheable {
            cache.put_block(
                ask.tenant,
                version,
                ask.block_key(block),
                (block.from, block.to),
                Arc::clone(&text),
            );
        }
        *part = Some(text);
    }
    let sampled_rates = weights
        .iter()
        .map(|weight| 1.0 / f64::from(*weight))
        .collect();
    Ok(RenderedSeries {
        parts: parts.into_iter().flatten().collect(),
        all_cached,
        sampled_rates,
    })
}

/// A block of a series answer: an hour of a minute series, a day of an hour series (a day
/// series is one block, cacheable when all of it has ended). Blocks are cut at the block
/// boundaries, so the first and last may be partial; only whole blocks whose every bucket has
/// ended are cacheable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeriesBlock {
    from: Micros,
    to: Micros,
    cacheable: bool,
}

fn series_blocks(
    resolution: Resolution,
    from: Micros,
    to: Micros,
    now: Micros,
) -> Vec<SeriesBlock> {
    let block = match resolution {
        Resolution::Minute => Resolution::Hour,
        Resolution::Hour => Resolution::Day,
        Resolution::Day => {
            let cacheable = to <= resolution.bucket(now);
            return vec![SeriesBlock {
                from,
                to,
                cacheable,
            }];
        }
    };
    let closed_before = resolution.bucket(now);
    let mut blocks = Vec::new();
    let mut at = from;
    while at < to {
        let start = block.bucket(at);
        let end = start + block.width();
        let block_to = end.min(to);
        blocks.push(SeriesBlock {
            from: at,
            to: block_to,
            cacheable: at == start && block_to == end && end <= closed_before,
        });
        at = block_to;
    }
    blocks
}

/// Appends one point of a series answer as JSON.
fn push_point(out: &mut String, point: &Point) {
    use std::fmt::Write;
    let _ = write!(
        out,
        "{{\"ts\":\"{}\",\"value\":{}",
        format_timestamp(point.ts),
        point.value
    );
    if let Some(error) = point.relative_error {
        let _ = write!(out, ",\"relative_error\":{error:.4}");
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Micros = 60_000_000;
    const HOUR: Micros = 60 * MINUTE;

    #[test]
    fn series_blocks_are_whole_closed_hours_in_between_partial_edges() {
        let day = 24 * HOUR;
        // 22:30 on day 10 to 01:30 on day 11, asked at 01:10.
        let from = 10 * day + 22 * HOUR + 30 * MINUTE;
        let to = 11 * day + HOUR + 30 * MINUTE;
        let now = 11 * day + HOUR + 10 * MINUTE;
        let blocks = series_blocks(Resolution::Minute, from, to, now);
        let expected = [
            (from, 10 * day + 23 * HOUR, false), // partial
            (10 * day + 23 * HOUR, 11 * day, true),
            (11 * day, 11 * day + HOUR, true),
            (11 * day + HOUR, to, false), // open and partial
        ];
        let got: Vec<(Micros, Micros, bool)> =
            blocks.iter().map(|b| (b.from, b.to, b.cacheable)).collect();
        assert_eq!(got, expected);
        // The hour that ends exactly now is closed; the one that has not ended is not.
        let blocks = series_blocks(
            Resolution::Minute,
            11 * day,
            11 * day + 2 * HOUR,
            11 * day + HOUR,
        );
        assert_eq!(
            blocks.iter().map(|b| b.cacheable).collect::<Vec<_>>(),
            [true, false]
        );
        let blocks = series_blocks(Resolution::Day, 0, 30 * day, 100 * day);
        assert_eq!(blocks.len(), 1);
        assert!(blocks[0].cacheable);
        assert!(!series_blocks(Resolution::Day, 0, 30 * day, 29 * day + 1)[0].cacheable);
    }
}
