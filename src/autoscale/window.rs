//! Bounded metric windows: the grain arithmetic that turns rings of fixed-length storage
//! grains (see `ring.rs`) into a rule's value: statistic inside a grain, aggregation across
//! grains, complete grains only.
//!
//! Time is a parameter everywhere (`now: Instant`, relative to an `origin`), never read here,
//! so tests can drive an hour of traffic in a loop. Buckets before `origin` do not exist: a
//! window that has not seen one complete grain yet has no data.

use std::time::{Duration, Instant};

use super::settings::{Aggregation, Statistic};

/// Shape of a window: storage grain and number of slots in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    /// Length of one storage grain (every rule's `time_grain` is a multiple of it).
    pub grain: Duration,
    /// Slots in the ring: enough for the longest look-back plus the grain being filled.
    pub len: usize,
}

impl WindowSpec {
    /// A ring of `grain`s long enough to read back `span` of complete grains.
    pub fn covering(grain: Duration, span: Duration) -> Self {
        let grain = grain.max(Duration::from_millis(1));
        let grains = span.as_nanos().div_ceil(grain.as_nanos());
        let len = usize::try_from(grains).unwrap_or(usize::MAX - 1).max(1) + 1;
        Self { grain, len }
    }

    /// Index of the storage grain that holds `now`, counted from `origin`.
    pub fn index(&self, origin: Instant, now: Instant) -> u64 {
        // On the request path: u64 division is several times cheaper than u128, and u64
        // nanoseconds cover 584 years of uptime.
        let since = u64::try_from(now.saturating_duration_since(origin).as_nanos());
        let grain = u64::try_from(self.grain.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        since.unwrap_or(u64::MAX) / grain
    }
}

/// What a rule asks of a window: one grain statistic, aggregated over a time window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowQuery {
    /// How storage-grain samples are combined inside one rule grain.
    pub statistic: Statistic,
    /// Length of one rule grain (a multiple of the storage grain).
    pub time_grain: Duration,
    /// Look-back: the last `time_window / time_grain` complete rule grains (at least one).
    pub time_window: Duration,
    /// How rule-grain values are combined.
    pub aggregation: Aggregation,
}

/// Count, sum, min and max of the samples in some stretch of time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples the statistic is taken over.
    pub n: u64,
    /// Sum of those samples.
    pub sum: f64,
    /// Smallest sample (meaningless when `n == 0`).
    pub min: f64,
    /// Largest sample (meaningless when `n == 0`).
    pub max: f64,
    /// Raw events behind the samples, for the `count` aggregation: the event count for a
    /// counter, the sample count for a gauge.
    pub events: u64,
}

impl Summary {
    /// No samples.
    pub const EMPTY: Self = Self {
        n: 0,
        sum: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        events: 0,
    };

    /// One sample of `value`, standing for `events` raw events.
    pub fn one(value: f64, events: u64) -> Self {
        Self {
            n: 1,
            sum: value,
            min: value,
            max: value,
            events,
        }
    }

    /// Both summaries together.
    pub fn merge(self, other: Self) -> Self {
        Self {
            n: self.n + other.n,
            sum: self.sum + other.sum,
            min: self.min.min(other.min),
            max: self.max.max(other.max),
            events: self.events + other.events,
        }
    }

    /// The statistic of these samples, `None` without samples.
    pub fn statistic(&self, statistic: Statistic) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        Some(match statistic {
            Statistic::Average => self.sum / self.n as f64,
            Statistic::Min => self.min,
            Statistic::Max => self.max,
            Statistic::Sum => self.sum,
        })
    }
}

/// Evaluate `query` at `now` over storage grains read through `bucket(index)`.
///
/// Only complete rule grains count (a grain still filling would drag averages down). Rule
/// grains are aligned on `origin`. Returns `None` when the metric cannot be read: no complete
/// grain yet, or no sample in any grain of the window (a gauge nobody sampled). The `count`
/// aggregation is readable as soon as one grain is complete, since zero events is a fact.
pub fn aggregate(
    spec: &WindowSpec,
    origin: Instant,
    now: Instant,
    query: &WindowQuery,
    bucket: impl Fn(u64) -> Summary,
) -> Option<f64> {
    let current = spec.index(origin, now);
    let per_grain = grains_in(query.time_grain, spec.grain);
    let n_grains = (query.time_window.as_nanos() / query.time_grain.as_nanos().max(1)).max(1);
    let n_grains = u64::try_from(n_grains).unwrap_or(u64::MAX);
    let end = current / per_grain; // rule grains [.., end) are complete
                                   // Slots older than the ring holds are gone; never read them as if they were recent.
    let oldest_kept = (current + 1).saturating_sub(spec.len as u64);
    let start = end
        .saturating_sub(n_grains)
        .max(oldest_kept.div_ceil(per_grain));
    if start >= end {
        return None;
    }
    let mut values = Vec::with_capacity((end - start) as usize);
    let mut events = 0u64;
    for g in start..end {
        let first = g * per_grain;
        let s = (first..first + per_grain)
            .map(&bucket)
            .fold(Summary::EMPTY, Summary::merge);
        events += s.events;
        if let Some(v) = s.statistic(query.statistic) {
            values.push(v);
        }
    }
    if query.aggregation == Aggregation::Count {
        return Some(events as f64);
    }
    let last = *values.last()?;
    Some(match query.aggregation {
        Aggregation::Average => values.iter().sum::<f64>() / values.len() as f64,
        Aggregation::Minimum => values.iter().copied().fold(f64::INFINITY, f64::min),
        Aggregation::Maximum => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Aggregation::Total => values.iter().sum(),
        Aggregation::Last => last,
        Aggregation::Count => events as f64,
    })
}

/// Summary of the complete storage grains in the last `window` before `now`, with the time
/// they span (shorter than `window` right after `origin`). Used for rates and means.
pub fn recent(
    spec: &WindowSpec,
    origin: Instant,
    now: Instant,
    window: Duration,
    bucket: impl Fn(u64) -> Summary,
) -> (Summary, Duration) {
    let current = spec.index(origin, now);
    let want = grains_in(window, spec.grain);
    let oldest_kept = (current + 1).saturating_sub(spec.len as u64);
    let start = current.saturating_sub(want).max(oldest_kept);
    let s = (start..current)
        .map(bucket)
        .fold(Summary::EMPTY, Summary::merge);
    let grains = u32::try_from(current - start).unwrap_or(u32::MAX);
    (s, spec.grain.saturating_mul(grains))
}

/// How many storage grains make one `grain` (at least one).
fn grains_in(grain: Duration, storage: Duration) -> u64 {
    let k = grain.as_nanos() / storage.as_nanos().max(1);
    u64::try_from(k).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::ring::GaugeRing;

    const S: Duration = Duration::from_secs(1);

    fn query(
        statistic: Statistic,
        grain: u64,
        window: u64,
        aggregation: Aggregation,
    ) -> WindowQuery {
        WindowQuery {
            statistic,
            time_grain: S * grain as u32,
            time_window: S * window as u32,
            aggregation,
        }
    }

    /// Storage grain 10s; samples (second, value).
    fn gauges(samples: &[(u64, f64)]) -> (WindowSpec, Instant, GaugeRing) {
        let spec = WindowSpec::covering(S * 10, S * 120);
        let t0 = Instant::now();
        let mut ring = GaugeRing::new(spec.len);
        for &(at, v) in samples {
            ring.record(spec.index(t0, t0 + S * at as u32), v);
        }
        (spec, t0, ring)
    }

    #[test]
    fn statistic_inside_grains_and_aggregation_across_them() {
        // Rule grains of 20s: [0,20) holds 1,3,5 ; [20,40) holds 10 ; [40,60) holds 2,4.
        let (spec, t0, ring) = gauges(&[
            (0, 1.0),
            (5, 3.0),
            (15, 5.0),
            (25, 10.0),
            (41, 2.0),
            (59, 4.0),
        ]);
        let now = t0 + S * 60;
        let q = |st, agg| aggregate(&spec, t0, now, &query(st, 20, 60, agg), |i| ring.get(i));
        use Aggregation as A;
        use Statistic as St;
        // Per-grain averages 3, 10, 3.
        assert_eq!(q(St::Average, A::Average), Some(16.0 / 3.0));
        assert_eq!(q(St::Average, A::Maximum), Some(10.0));
        assert_eq!(q(St::Average, A::Minimum), Some(3.0));
        assert_eq!(q(St::Average, A::Last), Some(3.0));
        // Per-grain sums 9, 10, 6; mins 1, 10, 2; maxes 5, 10, 4.
        assert_eq!(q(St::Sum, A::Total), Some(25.0));
        assert_eq!(q(St::Min, A::Minimum), Some(1.0));
        assert_eq!(q(St::Min, A::Total), Some(13.0));
        assert_eq!(q(St::Max, A::Average), Some(19.0 / 3.0));
        assert_eq!(q(St::Max, A::Count), Some(6.0));
    }

    #[test]
    fn only_complete_grains_within_the_window_count() {
        let (spec, t0, ring) = gauges(&[(0, 1.0), (25, 10.0), (41, 2.0), (59, 4.0), (61, 100.0)]);
        let at = |s: u32, window: u64| {
            let q = query(Statistic::Max, 20, window, Aggregation::Maximum);
            aggregate(&spec, t0, t0 + S * s, &q, |i| ring.get(i))
        };
        // Before the first 20s grain completes nothing can be read.
        assert_eq!(at(19, 60), None);
        assert_eq!(at(20, 60), Some(1.0));
        // At 79s the grain [60,80) is still filling: 100 is not seen yet.
        assert_eq!(at(79, 60), Some(10.0));
        assert_eq!(at(80, 60), Some(100.0));
        // A 20s window sees only the last complete grain.
        assert_eq!(at(79, 20), Some(4.0));
        // A window with no sample at all cannot be read (gauges), but can be counted.
        let (spec, t0, ring) = gauges(&[]);
        let now = t0 + S * 60;
        let q = query(Statistic::Average, 20, 60, Aggregation::Average);
        assert_eq!(aggregate(&spec, t0, now, &q, |i| ring.get(i)), None);
        let q = query(Statistic::Average, 20, 60, Aggregation::Count);
        assert_eq!(aggregate(&spec, t0, now, &q, |i| ring.get(i)), Some(0.0));
    }

    #[test]
    fn spec_covers_a_span_plus_the_grain_being_filled() {
        let spec = WindowSpec::covering(S * 60, S * 1860);
        assert_eq!(spec.len, 32);
        let t0 = Instant::now();
        assert_eq!(spec.index(t0, t0 + S * 59), 0);
        assert_eq!(spec.index(t0, t0 + S * 60), 1);
        // Before the origin clamps to grain 0 rather than panicking.
        assert_eq!(spec.index(t0 + S, t0), 0);
    }
}
