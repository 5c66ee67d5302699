//! Recent-history recorders for the admin views: counts per second and latency distributions
//! over the last minute. Cheap enough for every request; bounded by construction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Seconds kept: the last minute plus the second being filled.
const SLOTS: usize = 61;
/// The window the views report on.
pub const WINDOW_SECS: u64 = 60;

/// Time on tokio's clock since the first call (tests that pause time drive it too).
pub fn uptime() -> Duration {
    uptime_at(tokio::time::Instant::now())
}

/// [`uptime`] at `at` (saves a clock read where the caller has one).
pub fn uptime_at(at: tokio::time::Instant) -> Duration {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let at = at.into_std();
    at.saturating_duration_since(*EPOCH.get_or_init(|| at))
}

/// Whole seconds of [`uptime`].
pub fn now_secs() -> u64 {
    uptime().as_secs()
}

/// A count since start and over the last minute, cheap enough for every request.
///
/// An event is one add to the total; the minute is kept as the total at the first event of
/// each second, written once per second into a ring made on first use (about ½ KiB, so the
/// many resources of a large config that see no traffic cost nothing). A request therefore
/// touches only this struct, not the ring: with 100k resources, rings touched on every request
/// would not stay in the CPU's cache (BENCHMARKS.md, scenario 4).
#[derive(Debug, Default)]
#[repr(C)] // The two words every event touches first.
pub struct RecentCount {
    total: AtomicU64,
    /// The second of the latest event, plus one (0: none yet).
    second: AtomicU64,
    /// Slot `s % SLOTS`: second `s` + 1 in the high 32 bits, the total before that second's
    /// first event in the low 32 (modulo 2³²: a minute's count is far below it at any limit
    /// sluice enforces), one word so that a mark is read whole.
    /// (An array, not a slice: a thin pointer keeps the struct, and so a resource, smaller.)
    marks: OnceLock<Box<[AtomicU64; SLOTS]>>,
}

impl RecentCount {
    /// Count one event now.
    pub fn add(&self) {
        self.add_at(now_secs());
    }

    /// Count one event in second `secs` (of [`uptime`]).
    pub fn add_at(&self, secs: u64) {
        let stamp = secs + 1;
        let seen = self.second.load(Ordering::Relaxed);
        // Only the first event of a second (the one that moves `second` on) writes a mark;
        // an event counted concurrently with it may land in the mark: off by one at a
        // second's edge, never lost from the total.
        if seen < stamp
            && self
                .second
                .compare_exchange(seen, stamp, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let marks = self
                .marks
                .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
            let before = self.total.load(Ordering::Relaxed) as u32;
            marks[(secs % SLOTS as u64) as usize]
                .store((stamp << 32) | u64::from(before), Ordering::Relaxed);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// Events since start.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Events in the last `WINDOW_SECS` complete seconds plus the current one.
    pub fn last_minute(&self) -> u64 {
        let Some(marks) = self.marks.get() else {
            return 0;
        };
        let total = self.total();
        let now = now_secs() + 1;
        let window = now.saturating_sub(WINDOW_SECS - 1)..=now;
        // Every second with events has a mark, so the earliest mark in the window holds the
        // total before the window's first event.
        let earliest = marks
            .iter()
            .map(|m| m.load(Ordering::Relaxed))
            .filter(|m| window.contains(&(m >> 32)))
            .min();
        earliest.map_or(0, |m| u64::from((total as u32).wrapping_sub(m as u32)))
    }
}

/// Latency histogram bucket bounds in microseconds: powers of √2 from 100 µs to ~100 s.
fn bucket_of(micros: u64) -> usize {
    if micros <= 100 {
        return 0;
    }
    // log base √2 of (micros / 100), i.e. 2·log2.
    let ratio = micros as f64 / 100.0;
    ((ratio.log2() * 2.0).ceil() as usize).min(BUCKETS - 1)
}

fn bucket_upper_micros(bucket: usize) -> f64 {
    100.0 * 2f64.powf(bucket as f64 / 2.0)
}

const BUCKETS: usize = 42;

#[derive(Debug, Clone, Copy)]
struct Second {
    at: u64,
    count: u64,
    sum_micros: u64,
    /// The largest latency of the second: a bucket's upper bound may be above every sample in
    /// it (up to √2 times), and a percentile must not be.
    max_micros: u64,
    buckets: [u32; BUCKETS],
}

impl Second {
    const EMPTY: Self = Self {
        at: u64::MAX,
        count: 0,
        sum_micros: 0,
        max_micros: 0,
        buckets: [0; BUCKETS],
    };
}

/// Latencies over the last minute: mean and percentiles (within √2 of the truth).
#[derive(Debug)]
pub struct LatencyWindow {
    seconds: Mutex<[Second; SLOTS]>,
    /// Total observations ever, for cheap "anything yet?" checks.
    total: AtomicU64,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            seconds: Mutex::new([Second::EMPTY; SLOTS]),
            total: AtomicU64::new(0),
        }
    }
}

/// Mean and p99 of a window, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    /// Responses observed.
    pub count: u64,
    /// Mean latency.
    pub mean_ms: f64,
    /// 99th percentile: the upper bound of the bucket that holds it, capped at the largest
    /// latency observed (never above the slowest response, never below the true value).
    pub p99_ms: f64,
}

impl LatencyWindow {
    /// Record one latency now.
    pub fn record(&self, latency: Duration) {
        let now = now_secs();
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let mut seconds = self.seconds.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut seconds[(now % SLOTS as u64) as usize];
        if slot.at != now {
            *slot = Second {
                at: now,
                ..Second::EMPTY
            };
        }
        slot.count += 1;
        slot.sum_micros = slot.sum_micros.saturating_add(micros);
        slot.max_micros = slot.max_micros.max(micros);
        slot.buckets[bucket_of(micros)] += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// Mean and p99 over the last minute; `None` when nothing was observed.
    pub fn last_minute(&self) -> Option<LatencySummary> {
        if self.total.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let now = now_secs();
        let oldest = now.saturating_sub(WINDOW_SECS - 1);
        let seconds = self.seconds.lock().unwrap_or_else(|p| p.into_inner());
        let mut merged = Second::EMPTY;
        for s in seconds
            .iter()
            .filter(|s| s.at != u64::MAX && s.at >= oldest && s.at <= now)
        {
            merged.count += s.count;
            merged.sum_micros = merged.sum_micros.saturating_add(s.sum_micros);
            merged.max_micros = merged.max_micros.max(s.max_micros);
            for (m, b) in merged.buckets.iter_mut().zip(s.buckets) {
                *m += b;
            }
        }
        drop(seconds);
        if merged.count == 0 {
            return None;
        }
        let rank = (merged.count as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        let mut p99 = bucket_upper_micros(BUCKETS - 1);
        for (i, n) in merged.buckets.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                p99 = bucket_upper_micros(i);
                break;
            }
        }
        Some(LatencySummary {
            count: merged.count,
            mean_ms: merged.sum_micros as f64 / merged.count as f64 / 1000.0,
            p99_ms: p99.min(merged.max_micros as f64) / 1000.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_age_out_after_a_minute() {
        let count = RecentCount::default();
        for _ in 0..5 {
            count.add();
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        count.add();
        assert_eq!(count.last_minute(), 6);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(count.last_minute(), 1);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(count.last_minute(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_minute_is_the_events_of_its_sixty_seconds_whatever_the_gaps() {
        let count = RecentCount::default();
        // Second s gets s % 7 events (none in every seventh): 200 s, checked every second
        // against the plain sum of the last 60 seconds.
        let events = |s: u64| s % 7;
        let start = now_secs();
        for s in 0..200u64 {
            for _ in 0..events(s) {
                count.add();
            }
            let expected: u64 = (s.saturating_sub(59)..=s).map(events).sum();
            assert_eq!(count.last_minute(), expected, "second {s}");
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(now_secs() - start, 200);
        assert_eq!(count.total(), (0..200).map(events).sum::<u64>());
    }

    #[tokio::test(start_paused = true)]
    async fn latency_mean_and_p99() {
        let window = LatencyWindow::default();
        assert_eq!(window.last_minute(), None);
        for _ in 0..99 {
            window.record(Duration::from_millis(50));
        }
        window.record(Duration::from_millis(900));
        let s = window.last_minute().unwrap();
        assert_eq!(s.count, 100);
        assert!((s.mean_ms - 58.5).abs() < 0.01, "{s:?}");
        // p99 is the 99th value, 50 ms, reported as its bucket's bound (within √2 above).
        assert!((50.0..=50.0 * 1.42).contains(&s.p99_ms), "{s:?}");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(window.last_minute(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn p99_is_never_above_the_slowest_response() {
        // One 51.6 ms response: its bucket's bound is 72.4 ms.
        let window = LatencyWindow::default();
        window.record(Duration::from_micros(51_600));
        let s = window.last_minute().unwrap();
        assert_eq!((s.count, s.mean_ms, s.p99_ms), (1, 51.6, 51.6), "{s:?}");
        // The cap is the largest sample of the whole minute, not of one second.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..200 {
            window.record(Duration::from_micros(40_000));
        }
        let s = window.last_minute().unwrap();
        assert_eq!(s.p99_ms, 51.2, "{s:?}"); // 40 ms's bucket bound, below 51.6
        tokio::time::advance(Duration::from_secs(60)).await;
        window.record(Duration::from_micros(10_100));
        let s = window.last_minute().unwrap();
        assert_eq!((s.count, s.p99_ms), (1, 10.1), "{s:?}");
    }
}
