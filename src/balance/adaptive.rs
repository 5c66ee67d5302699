//! A learned concurrency cap (`max_concurrent = "auto"`): how many requests one endpoint
//! takes at once before further ones only wait inside it, found from its latency.
//!
//! Answers are judged in windows of at least [`MIN_WINDOW`] answers, and at least as many as
//! were in flight at once (about one round trip), counting only requests sent since the cap
//! last changed, so that a change is judged by its own effect. Two latencies are compared, as
//! in Netflix's Gradient2: the window's mean (short term) and the endpoint's **no-load
//! latency** (long term): the mean of earlier windows in which nothing waited, or of a window
//! whose requests all ran alone; the first estimate is the fastest answer. It is never
//! measured by holding concurrency down ("probing dips").
//! - A window whose mean is more than [`TOLERANCE`] × the no-load latency means requests
//!   wait inside the endpoint: the cap comes down in proportion (the gradient), by one at
//!   least and by half at most.
//! - A window within it raises the cap by one — only when the cap was reached (demand asked
//!   for more than the endpoint was given). A step up is taken back as soon as
//!   [`SLOW_TO_FAIL`] of its answers took more than [`SLOW`] × the no-load latency, or when its
//!   window's mean is more than [`STEP_TOLERANCE`] × the no-load latency, and is not tried again for a while (1 s, doubling up
//!   to [`MOST_GROWTH_WAIT`]): the cap stays at the knee rather than going back and forth over
//!   it, and the tail stays near the no-load latency; an endpoint that gained room is found
//!   at the next try.
//! - An overload answer or a timeout brings it down by [`BACKOFF`], once per window.
//!
//! The cap counts for the whole fleet, like a configured one: each replica learns its own
//! estimate from what it sees, and uses its share of it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How far a window's mean latency may be above the no-load latency and still count as
/// "nothing waits". One request waiting behind 8 busy workers raises the mean by 11 %; jitter
/// of the mean of [`MIN_WINDOW`] answers stays within a few percent.
pub const TOLERANCE: f64 = 1.08;
/// A step up's window must stay within this many times the no-load latency to keep it.
pub const STEP_TOLERANCE: f64 = 1.04;
/// An answer this many times the no-load latency waited inside the endpoint.
pub const SLOW: f64 = 1.5;
/// Slow answers that take a step up back at once.
pub const SLOW_TO_FAIL: u32 = 2;
/// What an overload answer or a timeout multiplies the cap by.
pub const BACKOFF: f64 = 0.9;
/// Fewest answers that make a window.
pub const MIN_WINDOW: u32 = 20;
/// The longest wait before a step up that made requests wait is tried again.
pub const MOST_GROWTH_WAIT: Duration = Duration::from_secs(30);
/// The most one window brings the cap down by, as a factor.
const MOST_DROP: f64 = 0.5;
/// Weight of a window in which nothing waited in the no-load latency.
const NO_LOAD_WEIGHT: f64 = 0.1;

/// What a learned cap stays within (`adaptive_min`, `adaptive_max`) and starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Lowest.
    pub min: u32,
    /// Highest.
    pub max: u32,
    /// Where it starts.
    pub start: u32,
}

/// One endpoint's learned cap.
#[derive(Debug, Default)]
pub struct Adaptive {
    /// The cap in force; 0 while the endpoint's cap is not learned.
    cap: AtomicU32,
    /// Times the cap went up and down.
    raised: AtomicU64,
    lowered: AtomicU64,
    learning: Mutex<Learning>,
}

#[derive(Debug, Default)]
struct Learning {
    /// The cap as a real number (the published cap is its whole part).
    limit: f64,
    /// The endpoint's latency when nothing waits inside it, in seconds.
    no_load: Option<f64>,
    /// The window judges a step up.
    stepped_up: bool,
    /// Steps up that made requests wait, less those that did not.
    failed_steps: u32,
    /// No step up before this.
    grow_after: Option<Instant>,
    window: Window,
}

#[derive(Debug, Default)]
struct Window {
    /// Answers to requests sent before this are not counted (sent under an earlier cap).
    since: Option<Instant>,
    answers: u32,
    total: Duration,
    fastest: Option<Duration>,
    most_load: u32,
    reached: bool,
    /// Answers that took more than [`SLOW`] × the no-load latency.
    slow: u32,
}

/// One answer, as the learning counts it.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// When the request was sent.
    pub sent: Instant,
    /// Time to its response headers.
    pub latency: Duration,
    /// Requests in flight at the endpoint through this replica once it was sent, itself
    /// included.
    pub load: u32,
    /// Whether it took the last slot this replica had at the endpoint.
    pub reached: bool,
}

impl Adaptive {
    /// Learn within `bounds` from now on (from where it starts, unless already learning);
    /// `None`: the endpoint's cap is fixed again, and learning stops.
    pub fn follow(&self, bounds: Option<Bounds>) {
        let mut learning = self.lock();
        match bounds {
            None => {
                *learning = Learning::default();
                self.cap.store(0, Ordering::Relaxed);
            }
            Some(b) => {
                if learning.limit == 0.0 {
                    learning.limit = f64::from(b.start);
                }
                learning.limit = learning.limit.clamp(f64::from(b.min), f64::from(b.max));
                self.publish(&learning, b);
            }
        }
    }

    /// The cap learned so far (0 when not learning).
    pub fn cap(&self) -> u32 {
        self.cap.load(Ordering::Relaxed)
    }

    /// Times it went up and down since start.
    pub fn changes(&self) -> (u64, u64) {
        (
            self.raised.load(Ordering::Relaxed),
            self.lowered.load(Ordering::Relaxed),
        )
    }

    /// Count an answer the endpoint worked on; at the end of a window, the cap moves.
    /// Returns the cap before and after when it changed.
    pub fn answered(&self, answer: Answer, bounds: Bounds) -> Option<(u32, u32)> {
        let mut learning = self.lock();
        let l = &mut *learning;
        if l.limit == 0.0 || l.window.since.is_some_and(|s| answer.sent < s) {
            return None;
        }
        let w = &mut l.window;
        w.answers += 1;
        w.total += answer.latency;
        w.fastest = Some(w.fastest.map_or(answer.latency, |f| f.min(answer.latency)));
        w.most_load = w.most_load.max(answer.load);
        w.reached |= answer.reached;
        let no_load = l.no_load.unwrap_or(f64::INFINITY);
        w.slow += u32::from(answer.latency.as_secs_f64() > SLOW * no_load);
        if l.stepped_up && w.slow >= SLOW_TO_FAIL {
            // Requests started to wait: one step was too many.
            self.step_failed(l);
            return self.change(l, l.limit - 1.0, bounds);
        }
        if w.answers < MIN_WINDOW.max(w.most_load) {
            return None;
        }
        let mean = w.total.as_secs_f64() / f64::from(w.answers);
        let alone = w.most_load <= 1;
        let no_load = match (l.no_load, alone) {
            (_, true) => mean,
            (Some(known), false) => known,
            (None, false) => w.fastest.map_or(mean, |f| f.as_secs_f64()),
        };
        let ratio = mean / no_load.max(1e-6);
        let now = Instant::now();
        // A step up must show more clearly that nothing waits than staying put must: near the
        // knee, noise alone would otherwise let the cap over it now and then.
        let tolerance = match l.stepped_up {
            true => STEP_TOLERANCE,
            false => TOLERANCE,
        };
        let limit = if ratio > tolerance {
            l.no_load = Some(no_load);
            self.step_failed(l);
            // Down by one at least: a fraction off could leave the cap where requests wait.
            let lower = (l.limit * (TOLERANCE / ratio).clamp(MOST_DROP, 1.0)).floor();
            lower.min(f64::from(self.cap()) - 1.0)
        } else {
            l.no_load = Some(no_load + (mean - no_load) * NO_LOAD_WEIGHT);
            if l.stepped_up {
                // One good step does not forget every failed one: at the knee, a lucky
                // window must not bring back frequent steps over it.
                l.failed_steps = l.failed_steps.saturating_sub(1);
            }
            let may_grow = l.grow_after.is_none_or(|t| now >= t);
            match w.reached && may_grow {
                true => l.limit + 1.0,
                false => l.limit,
            }
        };
        self.change(l, limit, bounds)
    }

    /// The endpoint answered that it is full, or gave no answer in time: the cap comes down,
    /// once for the requests sent under it.
    pub fn overloaded(&self, sent: Instant, bounds: Bounds) -> Option<(u32, u32)> {
        let mut learning = self.lock();
        let l = &mut *learning;
        if l.limit == 0.0 || l.window.since.is_some_and(|s| sent < s) {
            return None;
        }
        self.step_failed(l);
        let limit = l.limit * BACKOFF;
        // Judged whatever the cap became: the requests sent before were answered for.
        l.window.since = Some(Instant::now());
        self.change(l, limit, bounds)
    }

    /// If the window judged a step up: it made requests wait, so the next waits longer.
    fn step_failed(&self, l: &mut Learning) {
        if l.stepped_up {
            l.failed_steps += 1;
            l.grow_after = Some(Instant::now() + growth_wait(l.failed_steps));
        }
    }

    /// Set the cap to `limit` (within `bounds`) and start a new window, one that judges only
    /// requests sent from now on when the cap changed.
    fn change(&self, l: &mut Learning, limit: f64, bounds: Bounds) -> Option<(u32, u32)> {
        let before = self.cap();
        l.limit = limit.clamp(f64::from(bounds.min), f64::from(bounds.max));
        let after = self.publish(l, bounds);
        l.stepped_up = after > before;
        let since = match after == before {
            true => l.window.since,
            false => Some(Instant::now()),
        };
        l.window = Window {
            since,
            ..Window::default()
        };
        let counter = match after.cmp(&before) {
            std::cmp::Ordering::Equal => return None,
            std::cmp::Ordering::Greater => &self.raised,
            std::cmp::Ordering::Less => &self.lowered,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Some((before, after))
    }

    fn publish(&self, l: &Learning, bounds: Bounds) -> u32 {
        // The whole part, so the cap reaches a number only once the learning got there.
        let cap = (l.limit.floor() as u32).clamp(bounds.min, bounds.max);
        self.cap.store(cap, Ordering::Relaxed);
        cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Learning> {
        // A panic while learning leaves numbers, not broken invariants: keep going.
        self.learning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How long before a step up is tried again after `failed` in a row made requests wait.
fn growth_wait(failed: u32) -> Duration {
    super::doubled(Duration::from_secs(1), failed.saturating_sub(1)).min(MOST_GROWTH_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        min: 1,
        max: 200,
        start: 20,
    };

    /// An endpoint model: `workers` that each take `service` per request (times `jitter`, a
    /// spread of ± that fraction, the same sequence every run); requests beyond the workers
    /// wait inside it.
    struct Model {
        workers: u32,
        service: Duration,
        jitter: f64,
        seed: u64,
    }

    impl Model {
        fn new(workers: u32, service_ms: u64) -> Self {
            Self {
                workers,
                service: Duration::from_millis(service_ms),
                jitter: 0.0,
                seed: 1,
            }
        }

        /// The latency of one answer at `load` in flight.
        fn latency(&mut self, load: u32) -> Duration {
            // xorshift: a fixed pseudo-random sequence.
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            let spread = (self.seed % 2001) as f64 / 1000.0 - 1.0;
            let queued = f64::from(load.max(self.workers)) / f64::from(self.workers);
            self.service.mul_f64(queued * (1.0 + self.jitter * spread))
        }

        /// `n` requests one after another, each seeing `load` in flight, none reaching the
        /// cap.
        async fn one_by_one(&mut self, a: &Adaptive, n: u32, load: u32) {
            for _ in 0..n {
                let sent = Instant::now();
                let latency = self.latency(load);
                tokio::time::advance(latency).await;
                let answer = Answer {
                    sent,
                    latency,
                    load,
                    reached: false,
                };
                a.answered(answer, BOUNDS);
            }
        }

        /// Requests that ran alone, one window of them: what a quiet start shows.
        async fn alone(&mut self, a: &Adaptive) {
            self.one_by_one(a, MIN_WINDOW, 1).await;
        }

        /// `rounds` round trips of a closed loop that always fills the cap: the cap after
        /// each.
        async fn drive(&mut self, a: &Adaptive, rounds: u32) -> Vec<u32> {
            let mut caps = Vec::new();
            for _ in 0..rounds {
                let cap = a.cap();
                let sent = Instant::now();
                let latencies: Vec<Duration> = (0..cap).map(|_| self.latency(cap)).collect();
                tokio::time::advance(*latencies.iter().max().unwrap()).await;
                for latency in latencies {
                    let answer = Answer {
                        sent,
                        latency,
                        load: cap,
                        reached: true,
                    };
                    a.answered(answer, BOUNDS);
                }
                caps.push(a.cap());
            }
            caps
        }
    }

    /// The share of `caps` above `knee`.
    fn above(caps: &[u32], knee: u32) -> f64 {
        caps.iter().filter(|&&c| c > knee).count() as f64 / caps.len() as f64
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_settles_at_the_workers_and_follows_them() {
        let a = Adaptive::default();
        a.follow(Some(BOUNDS));
        assert_eq!(a.cap(), 20);
        let mut endpoint = Model::new(8, 50);
        endpoint.alone(&a).await;
        let caps = endpoint.drive(&a, 400).await;
        let settled = &caps[40..];
        assert!(
            settled.iter().all(|c| (8..=9).contains(c)),
            "8 workers: {caps:?}"
        );
        assert!(
            above(settled, 8) < 0.1,
            "steps over the knee are rare: {caps:?}"
        );
        endpoint.workers = 4;
        let caps = endpoint.drive(&a, 400).await;
        let settled = &caps[40..];
        assert!(
            settled.iter().all(|c| (4..=5).contains(c)),
            "4 workers: {caps:?}"
        );
        assert!(above(settled, 4) < 0.1, "{caps:?}");
        // Workers come back: the next step up finds them, within the longest wait.
        endpoint.workers = 8;
        let caps = endpoint.drive(&a, 1200).await;
        assert!(
            caps[caps.len() - 100..].iter().all(|c| (8..=9).contains(c)),
            "{caps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_alone_does_not_hold_a_cap_down_and_growth_needs_demand() {
        let a = Adaptive::default();
        a.follow(Some(BOUNDS));
        // ± 20 % per answer, at any load: nothing ever waits.
        let mut endpoint = Model {
            jitter: 0.2,
            ..Model::new(1000, 20)
        };
        endpoint.alone(&a).await;
        // Demand below the cap: no growth.
        endpoint.one_by_one(&a, 100, 5).await;
        assert_eq!(a.cap(), 20);
        let caps = endpoint.drive(&a, 600).await;
        assert_eq!(*caps.last().unwrap(), 200, "{caps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn overload_answers_bring_it_down_once_per_round() {
        let a = Adaptive::default();
        a.follow(Some(BOUNDS));
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(a.overloaded(sent, BOUNDS), Some((20, 18)));
        // Others of the same round say the same thing: already answered for.
        assert_eq!(a.overloaded(sent, BOUNDS), None);
        let later = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(a.overloaded(later, BOUNDS), Some((18, 16)));
        assert_eq!(a.changes(), (0, 2));
        // Never below the minimum; a fixed cap again stops it.
        for _ in 0..100 {
            let sent = Instant::now();
            tokio::time::advance(Duration::from_millis(5)).await;
            a.overloaded(sent, Bounds { min: 3, ..BOUNDS });
        }
        assert_eq!(a.cap(), 3);
        a.follow(None);
        assert_eq!(a.cap(), 0);
        a.follow(Some(BOUNDS));
        assert_eq!(a.cap(), 20, "learning again starts over");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_model_is_measured_again_from_requests_that_ran_alone() {
        let a = Adaptive::default();
        a.follow(Some(BOUNDS));
        let mut endpoint = Model::new(8, 20);
        endpoint.alone(&a).await;
        endpoint.drive(&a, 100).await;
        // Now every answer takes four times as long: the cap falls until requests run alone,
        // whose latency is the new no-load latency, and then grows back to the knee.
        endpoint.service *= 4;
        let caps = endpoint.drive(&a, 400).await;
        assert!(caps.contains(&1), "{caps:?}");
        assert!(caps[300..].iter().all(|c| (8..=9).contains(c)), "{caps:?}");
    }
}
