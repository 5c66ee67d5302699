//! GCRA (generic cell rate algorithm): a rate limit as one "theoretical arrival time" per
//! bucket. Pure arithmetic here; callers keep the TAT in an atomic or behind a shard lock.
//!
//! A limit change swaps the quota and keeps the TAT, so the caller's recent usage still counts
//! under the new limit: nothing is reset more than the change itself requires.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A rate: `tps` requests per second on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Steady rate.
    pub tps: NonZeroU32,
    /// Requests allowed at once from a full bucket.
    pub burst: NonZeroU32,
}

impl Quota {
    /// A quota; `burst` defaults to one second's worth.
    pub fn new(tps: NonZeroU32, burst: Option<NonZeroU32>) -> Self {
        Self {
            tps,
            burst: burst.unwrap_or(tps),
        }
    }

    /// Time between two requests at the steady rate, in ns.
    pub fn interval_ns(self) -> u64 {
        NANOS_PER_SEC / u64::from(self.tps.get())
    }

    /// How far ahead of now the TAT may run: a full burst's worth of intervals.
    fn window_ns(self) -> u64 {
        self.interval_ns() * u64::from(self.burst.get())
    }

    /// Pack into one word so a quota is read and swapped atomically.
    pub(super) fn pack(self) -> u64 {
        (u64::from(self.tps.get()) << 32) | u64::from(self.burst.get())
    }

    pub(super) fn unpack(word: u64) -> Self {
        let one = NonZeroU32::MIN;
        Self {
            tps: NonZeroU32::new((word >> 32) as u32).unwrap_or(one),
            burst: NonZeroU32::new(word as u32).unwrap_or(one),
        }
    }
}

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted; `remaining` more could be admitted now, the bucket is full again in `reset_ns`.
    Admit {
        /// Requests that would still pass right now.
        remaining: u32,
        /// Time until the bucket is full again.
        reset_ns: u64,
    },
    /// Refused; the next request passes in `retry_after_ns` (exactly).
    Refuse {
        /// Time until the next request would pass.
        retry_after_ns: u64,
    },
}

/// One GCRA step: the new TAT if admitted, and the verdict.
pub fn decide(tat: u64, now: u64, quota: Quota) -> (Option<u64>, Verdict) {
    let interval = quota.interval_ns();
    let window = quota.window_ns();
    let new_tat = tat.max(now) + interval;
    let ahead = new_tat - now;
    if ahead > window {
        let retry_after_ns = ahead - window;
        return (None, Verdict::Refuse { retry_after_ns });
    }
    let remaining = ((window - ahead) / interval).min(u64::from(u32::MAX)) as u32;
    (
        Some(new_tat),
        Verdict::Admit {
            remaining,
            reset_ns: ahead,
        },
    )
}

/// A bucket with its own quota, both changeable without a lock.
#[derive(Debug)]
pub struct Bucket {
    tat: AtomicU64,
    quota: AtomicU64,
}

impl Bucket {
    /// A full bucket.
    pub fn new(quota: Quota) -> Self {
        Self {
            tat: AtomicU64::new(0),
            quota: AtomicU64::new(quota.pack()),
        }
    }

    /// The quota in force.
    pub fn quota(&self) -> Quota {
        Quota::unpack(self.quota.load(Ordering::Acquire))
    }

    /// Change the quota; the bucket's usage so far carries over.
    pub fn set_quota(&self, quota: Quota) {
        self.quota.store(quota.pack(), Ordering::Release);
    }

    /// How far the bucket's usage runs ahead of `now`, in ns: 0 when full, a whole burst's
    /// worth of intervals when empty.
    pub fn ahead(&self, now: u64) -> u64 {
        self.tat.load(Ordering::Acquire).saturating_sub(now)
    }

    /// Follow another judge's verdict on a request at `now` (the fleet's bucket): this bucket
    /// then mirrors the other, so that when it takes over it starts where the other stood
    /// rather than with a full burst.
    pub fn mirror(&self, verdict: &Verdict, now: u64) {
        match verdict {
            Verdict::Admit { .. } => self.charge(now),
            Verdict::Refuse { .. } => self.exhaust(now),
        }
    }

    /// Count a request the other judge admitted, never running this bucket further ahead
    /// than empty.
    fn charge(&self, now: u64) {
        let quota = self.quota();
        let (interval, window) = (quota.interval_ns(), quota.window_ns());
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some((tat.max(now) + interval).min(now + window))
            });
    }

    /// The other judge refused a request at `now`: its bucket is empty, so this one is too.
    fn exhaust(&self, now: u64) {
        self.tat
            .fetch_max(now + self.quota().window_ns(), Ordering::AcqRel);
    }

    /// Give back the cell of a request it admitted that never reached an endpoint (a 429 for
    /// capacity): its caller is not billed for it.
    pub fn give_back(&self) {
        let interval = self.quota().interval_ns();
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(interval))
            });
    }

    /// Judge one request arriving at `now` (ns on the limiter's clock).
    pub fn check(&self, now: u64) -> (Quota, Verdict) {
        let quota = self.quota();
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let (new_tat, verdict) = decide(tat, now, quota);
            let Some(new_tat) = new_tat else {
                return (quota, verdict);
            };
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return (quota, verdict),
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(tps: u32, burst: u32) -> Quota {
        Quota::new(NonZeroU32::new(tps).unwrap(), NonZeroU32::new(burst))
    }

    #[test]
    fn a_cell_given_back_passes_again() {
        let bucket = Bucket::new(quota(10, 3));
        let admitted = |t: u64| matches!(bucket.check(t).1, Verdict::Admit { .. });
        assert!((0..3).all(|_| admitted(0)));
        assert!(!admitted(0));
        bucket.give_back();
        assert!(admitted(0));
        assert!(!admitted(0));
        // A bucket that is full already stays full (no credit beyond the burst).
        let full = Bucket::new(quota(10, 3));
        full.give_back();
        full.give_back();
        assert_eq!(
            (0..10)
                .filter(|_| matches!(full.check(0).1, Verdict::Admit { .. }))
                .count(),
            3
        );
    }

    #[test]
    fn a_charged_bucket_takes_over_without_a_burst() {
        let second = 1_000_000_000;
        let bucket = Bucket::new(quota(10, 10));
        // Ten admissions a second made elsewhere for two seconds, the rest refused there:
        // mirrored here.
        for i in 0..20 {
            bucket.charge(i * second / 10);
            bucket.exhaust(i * second / 10 + 1);
        }
        // Taking over at 2 s: no burst, the rate only (one more every 100 ms).
        let admitted_at = |t: u64| {
            (0..20)
                .filter(|_| matches!(bucket.check(t).1, Verdict::Admit { .. }))
                .count()
        };
        assert_eq!(admitted_at(2 * second), 0);
        assert_eq!(admitted_at(2 * second + second / 10), 1);
        // Admissions alone at the rate leave the burst (as in the other bucket: GCRA's
        // tolerance is capacity not used).
        let fresh = Bucket::new(quota(10, 10));
        for i in 0..20 {
            fresh.charge(i * second / 10);
        }
        assert_eq!(
            (0..20)
                .filter(|_| matches!(fresh.check(2 * second).1, Verdict::Admit { .. }))
                .count(),
            10
        );
        // Charged far more than its quota, it is merely empty, not in debt.
        for _ in 0..1000 {
            bucket.charge(3 * second);
        }
        assert!(matches!(
            bucket.check(3 * second + second / 10).1,
            Verdict::Admit { .. }
        ));
    }

    #[test]
    fn burst_then_steady_rate() {
        let bucket = Bucket::new(quota(10, 10));
        let mut admitted = 0;
        for _ in 0..20 {
            if matches!(bucket.check(0).1, Verdict::Admit { .. }) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10);
        match bucket.check(0).1 {
            Verdict::Refuse { retry_after_ns } => assert_eq!(retry_after_ns, 100_000_000),
            v => panic!("{v:?}"),
        }
        // One interval later exactly one more passes.
        assert!(matches!(
            bucket.check(100_000_000).1,
            Verdict::Admit { remaining: 0, .. }
        ));
        assert!(matches!(
            bucket.check(100_000_000).1,
            Verdict::Refuse { .. }
        ));
    }

    #[test]
    fn remaining_counts_down() {
        let bucket = Bucket::new(quota(10, 3));
        let remaining: Vec<_> = (0..3)
            .map(|_| match bucket.check(0).1 {
                Verdict::Admit { remaining, .. } => remaining,
                v => panic!("{v:?}"),
            })
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
    }

    #[test]
    fn raising_the_limit_keeps_usage() {
        let bucket = Bucket::new(quota(10, 10));
        for _ in 0..10 {
            bucket.check(0);
        }
        bucket.set_quota(quota(20, 20));
        // The bucket was empty and stays empty (no reset to a full burst)...
        assert!(matches!(bucket.check(0).1, Verdict::Refuse { .. }));
        // ...but refills at the new rate: two pass 100 ms later, where the old limit let one.
        let passed = |now| {
            (0..5)
                .filter(|_| matches!(bucket.check(now).1, Verdict::Admit { .. }))
                .count()
        };
        assert_eq!(passed(100_000_000), 2);
    }
}
