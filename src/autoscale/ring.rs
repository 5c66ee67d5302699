//! The two ring kinds behind metric windows, chosen by how often they are written:
//! - [`CounterRing`] counts events on the request path. Each slot is one `AtomicU64` packing
//!   the grain's tag (high 32 bits) with its count (low 32 bits), so recording is a load and a
//!   `fetch_add` with no lock; the first writer of a new grain resets the slot with one CAS.
//! - [`GaugeRing`] keeps count/sum/min/max of sampled values (latency, queue length ...). It
//!   is not synchronised itself: its owner puts it behind a `Mutex`, which is uncontended at
//!   scoring-API rates (thousands of requests per second per service).
//!
//! Both have a fixed number of slots, indexed by grain number modulo the length, so memory
//! never grows with time; a slot holding an older grain reads as empty.

use std::sync::atomic::{AtomicU64, Ordering};

use super::window::Summary;

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
    use crate::autoscale::settings::{Aggregation, Statistic};
    use crate::autoscale::window::{aggregate, recent, WindowQuery, WindowSpec};
    use std::time::{Duration, Instant};

    const S: Duration = Duration::from_secs(1);

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
        let q = WindowQuery {
            statistic: Statistic::Sum,
            time_grain: S,
            time_window: S * 300,
            aggregation: Aggregation::Total,
        };
        let total = aggregate(&spec, t0, now, &q, |i| {
            let c = counts.get(i);
            Summary::one(c as f64, c)
        });
        assert_eq!(total, Some(600.0));
        let (s, span) = recent(&spec, t0, now, S * 60, |i| gauge.get(i));
        assert_eq!((s.n, span), (60, S * 60));
    }

    #[test]
    fn concurrent_recording_loses_nothing() {
        let ring = CounterRing::new(8);
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let ring = &ring;
                scope.spawn(move || {
                    // Each thread also opens grains of its own, racing with the others.
                    for i in 0..50_000u64 {
                        ring.add(1, 1);
                        ring.add(2 + (i + t) % 2, 1);
                    }
                });
            }
        });
        assert_eq!(ring.get(1), 200_000);
        assert_eq!(ring.get(2) + ring.get(3), 200_000);
    }
}
