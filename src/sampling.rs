//! Weighted sampling: which events a tenant keeps, the weight each kept event carries, and how
//! rollups turn weighted events back into estimates with a stated error.
//!
//! A tenant's `sampling` setting gives each event name a rate in (0, 1]. A rate is held as its
//! weight `w = round(1 / rate)`, so a kept event stands for a whole number of events and the
//! effective rate is `1 / w` (0.3 becomes 1/3). An event is kept iff [`keeps`] says so for its
//! user hash: the decision depends on the user and the weight only, so a kept user's whole
//! journey at that rate is kept (funnels stay coherent), and the users kept at a lower rate are
//! a subset of those kept at a higher one (nested sampling), which is what lets the estimators
//! below union users across rates without counting anyone twice.
//!
//! Counts are corrected by adding each kept event's weight. Distinct users cannot be: a user's
//! events may come at several rates. Rollups keep the users of sampled events apart, one sketch
//! per weight ([`sampled_series`]), and [`estimate_users`] walks the weights from the highest
//! rate down: the users a lower rate adds beyond the higher rates' are the kept ones among
//! those whose highest rate is that one, so they stand for `w` users each.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Lowest rate a tenant may set (a weight of a million).
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Most event names with their own rate, and most exempt names.
pub const MAX_NAMED: usize = 1000;
/// Two-sided 95% normal quantile: stated errors are 95% bounds.
pub const Z95: f64 = 1.96;

/// A tenant's sampling setting. Serialised with rates (`1 / weight`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SamplingJson", into = "SamplingJson")]
pub struct Sampling {
    /// Weight of events whose name has no rate of its own.
    pub default: u32,
    pub events: BTreeMap<String, u32>,
    /// Names always kept with weight 1, whatever the rates say.
    pub exempt: BTreeSet<String>,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            default: 1,
            events: BTreeMap::new(),
            exempt: BTreeSet::new(),
        }
    }
}

impl Sampling {
    /// Whether any event is ever sampled out.
    pub fn is_off(&self) -> bool {
        self.default == 1 && self.events.values().all(|w| *w == 1)
    }

    /// The weight of an event of series name `name` (1: always kept).
    pub fn weight_of(&self, name: &str) -> u32 {
        if self.exempt.contains(name) {
            return 1;
        }
        self.events.get(name).copied().unwrap_or(self.default)
    }
}

/// Whether an event of weight `weight` whose user hash is `user_hash` is kept. The user hash
/// is keyed per tenant and uniform; it is mixed again (splitmix64's finaliser, a bijection) so
/// that the kept users are not those whose hashes fall in one part of the range that the
/// distinct-user sketches index by.
pub fn keeps(user_hash: u64, weight: u32) -> bool {
    weight <= 1 || mix(user_hash) < u64::MAX / u64::from(weight)
}

fn mix(hash: u64) -> u64 {
    let mut z = hash ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The series that holds the users of `name`'s events kept at weight `weight` (> 1), apart
/// from the users of its unsampled events. It starts with a NUL, which no event name can
/// (see [`is_sampled_series`]), so it is never listed among the tenant's events.
pub fn sampled_series(name: &str, weight: u32) -> String {
    format!("\0{weight}\0{name}")
}

/// Whether `series` is a [`sampled_series`].
pub fn is_sampled_series(series: &str) -> bool {
    series.starts_with('\0')
}

/// The name and weight of a [`sampled_series`].
pub fn parse_sampled_series(series: &str) -> Option<(&str, u32)> {
    let rest = series.strip_prefix('\0')?;
    let (weight, name) = rest.split_once('\0')?;
    Some((name, weight.parse().ok()?))
}

/// A set of users that can be unioned and estimated (the rollups' sketch, the live one).
pub trait UserSet: Clone {
    fn union_with(&mut self, other: &Self);
    fn estimate_size(&self) -> f64;
}

impl UserSet for crate::sketch::Sketch {
    fn union_with(&mut self, other: &Self) {
        self.merge(other);
    }
    fn estimate_size(&self) -> f64 {
        self.estimate() as f64
    }
}

/// An estimate and its 95% bound, relative to it (`None`: exact up to the sketch's own error,
/// no sampled event contributed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub relative_error: Option<f64>,
}

impl Estimate {
    pub fn exact(value: f64) -> Estimate {
        Estimate {
            value,
            relative_error: None,
        }
    }

    pub fn rounded(&self) -> u64 {
        self.value.round().max(0.0) as u64
    }
}

/// Distinct users from the users of unsampled events and those of the sampled ones by weight.
/// Horvitz–Thompson over nested samples: with `C_k` the union of the users up to the k-th
/// weight (ascending), the users `C_k` adds to `C_{k-1}` each stand for `w_k` users, with
/// variance `w_k (w_k - 1)` each.
pub fn estimate_users<S: UserSet>(unsampled: Option<&S>, sampled: &[(u32, &S)]) -> Estimate {
    let mut levels: Vec<(u32, &S)> = sampled.to_vec();
    levels.sort_by_key(|(weight, _)| *weight);
    let mut union: Option<S> = unsampled.cloned();
    let base = union.as_ref().map_or(0.0, S::estimate_size);
    let mut unions = Vec::with_capacity(levels.len());
    for (weight, users) in levels {
        match &mut union {
            Some(union) => union.union_with(users),
            None => union = Some(users.clone()),
        }
        unions.push((weight, union.as_ref().map_or(0.0, S::estimate_size)));
    }
    estimate_users_of_unions(base, &unions)
}

/// [`estimate_users`] from the sizes of the unions: `base` users of the unsampled events,
/// then, by ascending weight, each weight with the size of the union of `base` and the users
/// kept at that weight or a lower one (a store that counts unions itself, as Redis's
/// `PFCOUNT` of several keys does).
pub fn estimate_users_of_unions(base: f64, unions: &[(u32, f64)]) -> Estimate {
    let (mut seen, mut value, mut variance) = (base, base, 0.0);
    for (weight, now) in unions {
        let added = (now - seen).max(0.0);
        let weight = f64::from(*weight);
        value += added * weight;
        variance += added * weight * (weight - 1.0);
        seen = *now;
    }
    with_error(value, variance, !unions.is_empty())
}

/// A weighted count: `unsampled` events of weight 1 plus, per weight, the kept events and
/// their distinct users. A count is a sample of users (each kept user brings all their events
/// at that weight); the variance is estimated as if each kept user sent the same number of
/// events, which understates it when a few users send most of the events.
pub fn estimate_count(unsampled: u64, sampled: &[(u32, u64, f64)]) -> Estimate {
    let mut value = unsampled as f64;
    let mut variance = 0.0;
    for (weight, kept_events, kept_users) in sampled {
        let weight = f64::from(*weight);
        let events = *kept_events as f64;
        value += events * weight;
        if *kept_users >= 1.0 {
            variance += weight * (weight - 1.0) * events * events / kept_users;
        }
    }
    with_error(value, variance, !sampled.is_empty())
}

/// A stored count's error: `stored` is the count as rolled up (each kept event added its
/// weight), `sampled` each weight's kept events and their distinct users. The value stays the
/// stored count; only the error comes from the estimate.
pub fn stored_count_estimate(stored: u64, sampled: &[(u32, u64, f64)]) -> Estimate {
    let weighted: u64 = sampled
        .iter()
        .map(|(w, kept, _)| u64::from(*w) * kept)
        .sum();
    let mut estimate = estimate_count(stored.saturating_sub(weighted), sampled);
    estimate.value = stored as f64;
    estimate
}

fn with_error(value: f64, variance: f64, sampled: bool) -> Estimate {
    let relative_error = sampled.then(|| {
        if value > 0.0 {
            Z95 * variance.sqrt() / value
        } else {
            0.0
        }
    });
    Estimate {
        value,
        relative_error,
    }
}

/// The setting as written and read through the admin API.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplingJson {
    #[serde(default = "one")]
    default: f64,
    #[serde(default)]
    events: BTreeMap<String, f64>,
    #[serde(default)]
    exempt: BTreeSet<String>,
}

fn one() -> f64 {
    1.0
}

fn weight_of_rate(what: &str, rate: f64) -> Result<u32, String> {
    if !(rate > 0.0 && rate <= 1.0) {
        return Err(format!(
            "sampling {what} must be a rate in (0, 1], not {rate}"
        ));
    }
    let weight = (1.0 / rate).round();
    if weight > f64::from(MAX_WEIGHT) {
        return Err(format!(
            "sampling {what} of {rate} is below the lowest rate, 1/{MAX_WEIGHT}"
        ));
    }
    Ok(weight as u32)
}

impl TryFrom<SamplingJson> for Sampling {
    type Error = String;

    fn try_from(json: SamplingJson) -> Result<Sampling, String> {
        if json.events.len() > MAX_NAMED || json.exempt.len() > MAX_NAMED {
            return Err(format!(
                "sampling names at most {MAX_NAMED} events with their own rate and {MAX_NAMED} exempt events"
            ));
        }
        let default = weight_of_rate("default", json.default)?;
        let events = (json.events.into_iter())
            .map(|(name, rate)| {
                let weight = weight_of_rate(&format!("rate of {name:?}"), rate)?;
                Ok((name, weight))
            })
            .collect::<Result<_, String>>()?;
        Ok(Sampling {
            default,
            events,
            exempt: json.exempt,
        })
    }
}

impl From<Sampling> for SamplingJson {
    fn from(sampling: Sampling) -> SamplingJson {
        let rate = |weight: u32| 1.0 / f64::from(weight.max(1));
        SamplingJson {
            default: rate(sampling.default),
            events: (sampling.events.into_iter())
                .map(|(name, weight)| (name, rate(weight)))
                .collect(),
            exempt: sampling.exempt,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sketch::Sketch;

    #[test]
    fn rates_become_whole_weights_and_bad_rates_are_named() {
        let sampling: Sampling = serde_json::from_value(serde_json::json!({
            "default": 0.5, "events": {"view": 0.3}, "exempt": ["signup"]
        }))
        .unwrap();
        assert_eq!(sampling.weight_of("other"), 2);
        assert_eq!(sampling.weight_of("view"), 3);
        assert_eq!(sampling.weight_of("signup"), 1);
        let back = serde_json::to_value(&sampling).unwrap();
        assert_eq!(back["events"]["view"], serde_json::json!(1.0 / 3.0));
        for (bad, says) in [
            (serde_json::json!({"default": 0}), "(0, 1]"),
            (serde_json::json!({"default": 1.5}), "(0, 1]"),
            (serde_json::json!({"events": {"x": 1e-9}}), "lowest rate"),
            (serde_json::json!({"rates": {}}), "unknown field"),
        ] {
            let error = serde_json::from_value::<Sampling>(bad)
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{error}");
        }
        assert!(Sampling::default().is_off());
        assert!(!sampling.is_off());
    }

    #[test]
    fn kept_users_are_nested_and_near_the_rate() {
        let mut kept = [0usize; 3];
        for user in 0..200_000u64 {
            let hash = crate::enrich::user_hash(&[3; 32], &user.to_string());
            let at = [keeps(hash, 2), keeps(hash, 10), keeps(hash, 100)];
            // Nested: kept at a lower rate means kept at every higher one.
            assert!(!at[2] || at[1]);
            assert!(!at[1] || at[0]);
            for (slot, k) in kept.iter_mut().zip(at) {
                *slot += usize::from(k);
            }
        }
        for (count, rate) in kept.iter().zip([0.5, 0.1, 0.01]) {
            let expected = 200_000.0 * rate;
            assert!((*count as f64 - expected).abs() < 5.0 * (expected * (1.0 - rate)).sqrt());
        }
        assert!(keeps(0, 1) && keeps(u64::MAX, 0));
    }

    #[test]
    fn sampled_series_names_round_trip() {
        let series = sampled_series("Order Completed", 10);
        assert!(is_sampled_series(&series));
        assert_eq!(parse_sampled_series(&series), Some(("Order Completed", 10)));
        assert_eq!(parse_sampled_series("plain"), None);
    }

    /// Users with events at several rates: the estimate unions the levels, so a user seen at
    /// a high rate is not counted again at a low one.
    #[test]
    fn users_across_rates_are_counted_once() {
        let mut full = Sketch::new();
        let mut tenth = Sketch::new();
        let mut truth = 0u64;
        for user in 0..50_000u64 {
            let hash = crate::enrich::user_hash(&[5; 32], &user.to_string());
            truth += 1;
            // Every user views (rate 0.1); one in five also signs up (exempt).
            if user % 5 == 0 {
                full.insert_hash(hash);
            }
            if keeps(hash, 10) {
                tenth.insert_hash(hash);
            }
        }
        let estimate = estimate_users(Some(&full), &[(10, &tenth)]);
        let error = estimate.relative_error.unwrap();
        let off = (estimate.value - truth as f64).abs() / truth as f64;
        assert!(off < error, "off by {off}, stated {error}");
        assert!(error < 0.05, "{error}");
        assert_eq!(estimate_users(Some(&full), &[]).relative_error, None);
    }
}
