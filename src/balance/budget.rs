//! A service's retry budget: retries at most 20 % of its requests over the last 10 s, and at
//! least 3 a second whatever the traffic (Envoy's retry budget in spirit: a percentage with a
//! floor), so retries never multiply an overload. Two counts per second in a ring of ten.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::stats::uptime;

/// Seconds the budget looks back over.
const WINDOW: u64 = 10;
/// Retries allowed per request in the window, as a fraction: 1 in 5.
const PER_REQUESTS: u64 = 5;
/// Retries allowed per second of the window whatever the traffic.
const FLOOR_PER_SECOND: u64 = 3;

/// Counts per second over the last [`WINDOW`] seconds.
#[derive(Debug, Default)]
struct Tally([AtomicU64; WINDOW as usize]);

impl Tally {
    /// One more in second `now`: a slot holds (second + 1) in its high 32 bits, the count in
    /// the low 32, so an old second's count is replaced, not added to.
    fn add(&self, now: u64) {
        let slot = &self.0[(now % WINDOW) as usize];
        let stamp = (now + 1) << 32;
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(match v >> 32 == now + 1 {
                true => v + 1,
                false => stamp | 1,
            })
        });
    }

    /// The count over the window ending with second `now`.
    fn sum(&self, now: u64) -> u64 {
        self.0
            .iter()
            .map(|slot| slot.load(Ordering::Acquire))
            .filter(|v| (v >> 32) + WINDOW > now + 1 && (v >> 32) <= now + 1)
            .map(|v| v & u64::from(u32::MAX))
            .sum()
    }
}

/// The retry budget of one service, kept across policy changes with its pool.
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: Tally,
    retries: Tally,
    /// Retries made and refused by the budget since start, for /metrics.
    pub made: AtomicU64,
    /// Refused.
    pub refused: AtomicU64,
}

impl RetryBudget {
    /// A request came (its first attempt).
    pub fn request(&self) {
        self.requests.add(uptime().as_secs());
    }

    /// May one more attempt be made? Counted as made when it may, as refused when not.
    pub fn allow_retry(&self) -> bool {
        self.allow_retry_at(uptime().as_secs())
    }

    fn allow_retry_at(&self, now: u64) -> bool {
        let allowed = (self.requests.sum(now) / PER_REQUESTS).max(FLOOR_PER_SECOND * WINDOW);
        if self.retries.sum(now) >= allowed {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.retries.add(now);
        self.made.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_a_fifth_of_the_requests_or_three_a_second() {
        let budget = RetryBudget::default();
        // Quiet: 30 retries in the window (3 a second), however they bunch.
        let made = (0..100).filter(|_| budget.allow_retry_at(100)).count();
        assert_eq!(made, 30);
        // Ten seconds later the window has moved on.
        assert!(budget.allow_retry_at(110));
        // Busy: 1000 requests a second for 10 s allow 2000 retries in the window.
        let busy = RetryBudget::default();
        for second in 200..210 {
            for _ in 0..1000 {
                busy.requests.add(second);
            }
        }
        let made = (0..5000).filter(|_| busy.allow_retry_at(209)).count();
        assert_eq!(made, 2000);
        assert_eq!(busy.refused.load(Ordering::Relaxed), 3000);
    }
}
