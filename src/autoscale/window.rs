//! Bounded metric windows: rings of fixed-length storage grains, and the arithmetic that
//! turns them into a rule's value (statistic inside a grain, aggregation across grains).
//!
//! Two ring kinds, chosen by how often they are written:
//! - [`CounterRing`] counts events on the request path. Each slot is one `AtomicU64` packing
//!   the grain's tag (high 32 bits) with its count (low 32 bits), so recording is a load and a
//!   `fetch_add` with no lock; the first writer of a new grain resets the slot with one CAS.
//! - [`GaugeRing`] keeps count/sum/min/max of sampled values (latency, queue length ...). It
//!   sits behind a `Mutex` owned by the caller: a few float operations under a lock that is
//!   uncontended at scoring-API rates (thousands of requests per second per service).
//!
//! Time is a parameter everywhere (`now: Instant`, relative to an `origin`), never read here,
//! so tests can drive an hour of traffic in a loop. Buckets before `origin` do not exist: a
//! window that has not seen one complete grain yet has no data.

use std::sync::atomic::{AtomicU64, Ordering};
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
        let since = now.saturating_duration_since(origin).as_nanos();
        u64::try_from(since / self.grain.as_nanos().max(1)).unwrap_or(u64::MAX)
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

const COUNT_BITS: u32 = 32;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// The tag stored with a slot: the grain index + 1 (so 0 means never written), truncated to
/// 32 bits. A stale slot could only be mistaken for a current one after 2^32 grains (136 years
/// at 1s).
fn tag(index: u64) -> u64 {
    (index.wrapping_add(1)) & COUNT_MASK
}

/// Lock-free ring of per-grain event counts (see the module header).
#[derive(Debug)]
pub struct CounterRing {
    slots: Box<[AtomicU64]>,
}

impl CounterRing {
    /// A ring of `len` empty slots.
    pub fn new(len: usize) -> Self {
        Self {
            slots: (0..len.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Add `n` events to grain `index`. Returns true when this call opened the grain (reset
    /// its slot), so the caller can stamp per-grain data once.
    ///
    /// A grain holds at most 2^32 − 1 events: with grains of at most a minute that is over
    /// 70 million events per second, far beyond any TPS limit sluice enforces.
    pub fn add(&self, index: u64, n: u32) -> bool {
        let slot = &self.slots[(index % self.slots.len() as u64) as usize];
        let want = tag(index);
        let mut seen = slot.load(Ordering::Relaxed);
        loop {
            let have = seen >> COUNT_BITS;
            if have == want {
                // Relaxed is enough: the evaluator only needs eventually-visible counts.
                // If another thread rolls the slot over between our load and this add, the
                // events land in the next grain: off by one grain at a boundary, never lost.
                slot.fetch_add(u64::from(n), Ordering::Relaxed);
                return false;
            }
            // A slot already holding a later grain means this sample is older than the ring:
            // drop it rather than resurrect a grain nobody will read correctly.
            if have != 0 && (have.wrapping_sub(want) & COUNT_MASK) < (1 << 31) {
                return false;
            }
            let fresh = (want << COUNT_BITS) | u64::from(n);
            match slot.compare_exchange_weak(seen, fresh, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => seen = actual,
            }
        }
    }

    /// Events counted in grain `index` (0 when the slot holds another grain).
    pub fn get(&self, index: u64) -> u64 {
        let v = self.slots[(index % self.slots.len() as u64) as usize].load(Ordering::Relaxed);
        if v >> COUNT_BITS == tag(index) {
            v & COUNT_MASK
        } else {
            0
        }
    }

    /// Store a value for grain `index` (e.g. the limit in force when the grain opened),
    /// using the same packing as the counts.
    pub fn stamp(&self, index: u64, value: u32) {
        let slot = &self.slots[(index % self.slots.len() as u64) as usize];
        slot.store(
            (tag(index) << COUNT_BITS) | u64::from(value),
            Ordering::Relaxed,
        );
    }

    /// The value stored for grain `index`, if the slot still holds that grain.
    pub fn stamped(&self, index: u64) -> Option<u32> {
        let v = self.slots[(index % self.slots.len() as u64) as usize].load(Ordering::Relaxed);
        (v >> COUNT_BITS == tag(index)).then_some((v & COUNT_MASK) as u32)
    }

    /// Number of slots (constant: the ring never grows).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Never true: a ring has at least one slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Ring of per-grain sample summaries for sampled values; not synchronised (wrap it).
#[derive(Debug, Clone)]
pub struct GaugeRing {
    slots: Vec<(Option<u64>, Summary)>,
}

impl GaugeRing {
    /// A ring of `len` empty slots.
    pub fn new(len: usize) -> Self {
        Self {
            slots: vec![(None, Summary::EMPTY); len.max(1)],
        }
    }

    /// Add one sample to grain `index`; samples older than the slot's grain are dropped.
    pub fn record(&mut self, index: u64, value: f64) {
        if !value.is_finite() {
            return; // one NaN would poison every average it touches
        }
        let len = self.slots.len() as u64;
        let slot = &mut self.slots[(index % len) as usize];
        match slot.0 {
            Some(i) if i == index => slot.1 = slot.1.merge(Summary::one(value, 1)),
            Some(i) if i > index => {}
            _ => *slot = (Some(index), Summary::one(value, 1)),
        }
    }

    /// Samples of grain `index` (empty when the slot holds another grain).
    pub fn get(&self, index: u64) -> Summary {
        let slot = &self.slots[(index % self.slots.len() as u64) as usize];
        if slot.0 == Some(index) {
            slot.1
        } else {
            Summary::EMPTY
        }
    }

    /// Number of slots (constant: the ring never grows).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Never true: a ring has at least one slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn counters_roll_over_grains() {
        let ring = CounterRing::new(4);
        assert!(ring.add(0, 3));
        assert!(!ring.add(0, 2));
        assert_eq!(ring.get(0), 5);
        // Grain 4 reuses slot 0: the old count is gone, not added to.
        assert!(ring.add(4, 1));
        assert_eq!(ring.get(4), 1);
        assert_eq!(ring.get(0), 0);
        // A late sample for a grain the slot has moved past is dropped.
        assert!(!ring.add(0, 7));
        assert_eq!(ring.get(4), 1);
        // Untouched grains read as zero.
        assert_eq!(ring.get(5), 0);
        ring.stamp(6, 42);
        assert_eq!(ring.stamped(6), Some(42));
        assert_eq!(ring.stamped(2), None);
    }

    #[test]
    fn gauges_roll_over_and_drop_late_samples() {
        let mut ring = GaugeRing::new(3);
        ring.record(1, 5.0);
        ring.record(4, 7.0); // same slot, later grain: replaces
        ring.record(1, 9.0); // late: dropped
        ring.record(4, f64::NAN); // never poisons averages
        assert_eq!(ring.get(4).statistic(Statistic::Sum), Some(7.0));
        assert_eq!(ring.get(1).n, 0);
    }

    #[test]
    fn recording_for_a_long_time_keeps_memory_bounded() {
        let spec = WindowSpec::covering(S, S * 300);
        let t0 = Instant::now();
        let counts = CounterRing::new(spec.len);
        let mut gauge = GaugeRing::new(spec.len);
        let (len_c, len_g) = (counts.len(), gauge.len());
        // A day of one-second grains, many times the ring.
        for s in 0..86_400u32 {
            let i = spec.index(t0, t0 + S * s);
            counts.add(i, 2);
            gauge.record(i, f64::from(s % 7));
        }
        assert_eq!((counts.len(), gauge.len()), (len_c, len_g));
        assert_eq!(len_c, 301);
        // And the recent past still reads right: 300 grains of 2 events each.
        let now = t0 + S * 86_400;
        let q = query(Statistic::Sum, 1, 300, Aggregation::Total);
        let total = aggregate(&spec, t0, now, &q, |i| {
            let c = counts.get(i);
            Summary::one(c as f64, c)
        });
        assert_eq!(total, Some(600.0));
        let (s, span) = recent(&spec, t0, now, S * 60, |i| gauge.get(i));
        assert_eq!((s.n, span), (60, S * 60));
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
