//! Holding an endpoint out of traffic for a while after it said it is full (a cooldown, for
//! its `Retry-After`) or kept failing (an ejection, Envoy's outlier detection), and letting
//! one request through — a probe — once the hold ends, until an answer says it is back. The
//! settings, copied into a service's shape: which statuses mean "full", the cooldown bounds,
//! the retries, the outlier thresholds.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use crate::config::{OutlierConfig, OverloadConfig};

/// Statuses 400..=599 as a set (one bit each), so a shape stays `Copy`-cheap to rebuild.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusSet([u64; 4]);

impl StatusSet {
    /// The set of `statuses` (those outside 400..=599 are left out).
    pub fn of(statuses: &[u16]) -> Self {
        let mut set = Self::default();
        for &s in statuses.iter().filter(|s| (400..=599).contains(*s)) {
            let bit = usize::from(s - 400);
            set.0[bit / 64] |= 1 << (bit % 64);
        }
        set
    }

    /// Whether `status` is in it.
    pub fn contains(&self, status: u16) -> bool {
        (400..=599).contains(&status) && {
            let bit = usize::from(status - 400);
            self.0[bit / 64] & (1 << (bit % 64)) != 0
        }
    }
}

/// A service's `[service.overload]` and `[service.outlier]`, as the request path uses them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overload {
    /// Answers that mean "this endpoint is full".
    pub statuses: StatusSet,
    /// Bounds of a cooldown.
    pub cooldown_min: Duration,
    /// Bounds of a cooldown.
    pub cooldown_max: Duration,
    /// Further attempts elsewhere.
    pub retries: u32,
    /// Largest body held for a retry, in bytes.
    pub retry_buffer: u64,
    /// Failures in a row that eject; 0: never.
    pub consecutive_failures: u32,
    /// One ejection's length, times the times ejected.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// Most of a service's endpoints ejected at once, in percent.
    pub max_ejected_percent: u32,
}

impl Overload {
    /// From the service's tables.
    pub fn from_config(overload: &OverloadConfig, outlier: &OutlierConfig) -> Self {
        Self {
            statuses: StatusSet::of(&overload.status),
            cooldown_min: overload.cooldown_min,
            cooldown_max: overload.cooldown_max,
            retries: overload.retries,
            retry_buffer: u64::from(overload.retry_buffer),
            consecutive_failures: outlier.consecutive_failures,
            base_ejection: outlier.base_ejection,
            max_ejection: outlier.max_ejection,
            max_ejected_percent: outlier.max_ejected_percent,
        }
    }

    /// The cooldown for an overload answer that said `retry_after` (none, or garbage: an
    /// exponential back-off from 1 s over the overloads in a row), within the bounds.
    pub fn cooldown(&self, retry_after: Option<Duration>, overloads_in_row: u32) -> Duration {
        let asked =
            retry_after.unwrap_or_else(|| super::doubled(Duration::from_secs(1), overloads_in_row));
        asked.clamp(self.cooldown_min, self.cooldown_max.max(self.cooldown_min))
    }

    /// An ejection after `times` ejections (this one included), within `max_ejection`.
    pub fn ejection(&self, times: u32) -> Duration {
        self.base_ejection
            .saturating_mul(times.max(1))
            .min(self.max_ejection)
    }

    /// Endpoints of `total` that may be ejected at once (at least one of two or more).
    pub fn max_ejected(&self, total: usize) -> usize {
        let share = total * self.max_ejected_percent as usize / 100;
        match total {
            0 | 1 => share,
            _ => share.max(usize::from(self.max_ejected_percent > 0)),
        }
    }
}

impl Default for Overload {
    fn default() -> Self {
        Self::from_config(&OverloadConfig::default(), &OutlierConfig::default())
    }
}

/// Why an endpoint is held out of traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldKind {
    /// It answered that it is full.
    Cooldown,
    /// It failed too often in a row.
    Ejected,
}

/// One endpoint's hold, on the endpoint's millisecond clock (0 = none).
#[derive(Debug, Default)]
pub struct Hold {
    until_ms: AtomicU64,
    /// 0 none, 1 cooldown, 2 ejected.
    kind: AtomicU8,
    /// After a hold ended: one request at a time until an answer says it is back.
    probing: AtomicBool,
    overloads_in_row: AtomicU32,
    failures_in_row: AtomicU32,
    times_ejected: AtomicU32,
    /// When it last came back from an ejection (ms), to forget old ejections.
    back_ms: AtomicU64,
    /// Cooldowns and ejections since start, for /metrics.
    pub cooldowns: AtomicU64,
    /// Ejections since start.
    pub ejections: AtomicU64,
}

/// What an answer did to the hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed.
    Same,
    /// The endpoint is held for this long now.
    Held(HoldKind, Duration),
}

impl Hold {
    /// Held now (`now_ms` reads the clock: not at all for an endpoint in full service, the
    /// case of nearly every request), and why, and for how much longer.
    pub fn held(&self, now_ms: impl FnOnce() -> u64) -> Option<(HoldKind, Duration)> {
        let until = self.until_ms.load(Ordering::Acquire);
        if until == 0 {
            return None;
        }
        let now_ms = now_ms();
        (until > now_ms).then(|| {
            let kind = match self.kind.load(Ordering::Relaxed) {
                2 => HoldKind::Ejected,
                _ => HoldKind::Cooldown,
            };
            (kind, Duration::from_millis(until - now_ms))
        })
    }

    /// Probing: its hold ended and no answer said it is back yet (one request at a time).
    pub fn probing(&self) -> bool {
        self.probing.load(Ordering::Acquire)
    }

    /// It answered that it is full (`retry_after` if it said): held for a cooldown. While it
    /// is held already, the answer is to a request sent before the hold began: it only makes
    /// the hold longer if its `Retry-After` says so, and is not another overload in a row (a
    /// burst of such answers would otherwise take the back-off to its longest at once).
    pub fn overloaded(&self, o: &Overload, retry_after: Option<Duration>, now_ms: u64) -> Verdict {
        if self.until_ms.load(Ordering::Acquire) > now_ms {
            if let Some(asked) = retry_after {
                let until = now_ms + millis(o.cooldown(Some(asked), 0));
                self.until_ms.fetch_max(until, Ordering::AcqRel);
            }
            return Verdict::Same;
        }
        let in_row = self.overloads_in_row.fetch_add(1, Ordering::AcqRel);
        let cooldown = o.cooldown(retry_after, in_row);
        self.hold(HoldKind::Cooldown, cooldown, now_ms);
        self.cooldowns.fetch_add(1, Ordering::Relaxed);
        Verdict::Held(HoldKind::Cooldown, cooldown)
    }

    /// It failed (a 5xx that is not an overload answer, a timeout, a broken exchange): ejected
    /// once that makes `consecutive_failures` in a row, if `may_eject` (the service's share of
    /// ejected endpoints allows it). A probe that fails is ejected again at once.
    pub fn failed(&self, o: &Overload, may_eject: bool, now_ms: u64) -> Verdict {
        if o.consecutive_failures == 0 {
            return Verdict::Same;
        }
        let in_row = self.failures_in_row.fetch_add(1, Ordering::AcqRel) + 1;
        // A probe is a request sent once the ejection ended; one sent before that fails
        // during the ejection says nothing new.
        let probe_failed = self.probing()
            && self.kind.load(Ordering::Relaxed) == 2
            && self.until_ms.load(Ordering::Acquire) <= now_ms;
        if !(in_row >= o.consecutive_failures || probe_failed) || !may_eject {
            return Verdict::Same;
        }
        // An ejection long ago is forgotten: one less for each base_ejection spent back in
        // service since (none while it has not come back yet).
        let base_ms = u64::try_from(o.base_ejection.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let back = self.back_ms.load(Ordering::Relaxed);
        let forgotten = match probe_failed {
            true => 0,
            false => u32::try_from(now_ms.saturating_sub(back) / base_ms).unwrap_or(u32::MAX),
        };
        let before = self.times_ejected.load(Ordering::Relaxed);
        let times = before.saturating_sub(forgotten) + 1;
        self.times_ejected.store(times, Ordering::Relaxed);
        let ejection = o.ejection(times);
        self.hold(HoldKind::Ejected, ejection, now_ms);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        Verdict::Held(HoldKind::Ejected, ejection)
    }

    /// It answered (neither full nor failed): back in full service if it was probing and its
    /// hold has ended — an answer to a request sent before the hold began says nothing about
    /// the endpoint now. Writes only what changes (`now_ms` reads the clock only while
    /// probing): on nearly every request nothing, so the answers of many cores do not contend
    /// for these counters.
    pub fn answered(&self, now_ms: impl FnOnce() -> u64) {
        for in_row in [&self.overloads_in_row, &self.failures_in_row] {
            if in_row.load(Ordering::Relaxed) != 0 {
                in_row.store(0, Ordering::Relaxed);
            }
        }
        if !self.probing.load(Ordering::Acquire) {
            return;
        }
        let now_ms = now_ms();
        let until = self.until_ms.load(Ordering::Acquire);
        // Cleared only if no new hold began meanwhile (it would have moved `until_ms`).
        if until <= now_ms
            && self
                .until_ms
                .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            if self.kind.load(Ordering::Relaxed) == 2 {
                self.back_ms.store(now_ms, Ordering::Relaxed);
            }
            self.kind.store(0, Ordering::Relaxed);
            self.probing.store(false, Ordering::Release);
        }
    }

    fn hold(&self, kind: HoldKind, length: Duration, now_ms: u64) {
        let ms = millis(length);
        self.kind.store(
            match kind {
                HoldKind::Cooldown => 1,
                HoldKind::Ejected => 2,
            },
            Ordering::Relaxed,
        );
        self.until_ms.store(now_ms + ms, Ordering::Release);
        // When it ends, one probe at a time.
        self.probing.store(true, Ordering::Release);
    }
}

/// `length` in whole milliseconds (a very long one: far in the future, without overflow).
fn millis(length: Duration) -> u64 {
    u64::try_from(length.as_millis()).unwrap_or(u64::MAX / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_a_set() {
        let set = StatusSet::of(&[429, 503, 599, 200]);
        assert!(set.contains(429) && set.contains(503) && set.contains(599));
        assert!(!set.contains(500) && !set.contains(200) && !set.contains(404));
    }

    #[test]
    fn a_cooldown_is_retry_after_within_bounds_or_doubles_from_a_second() {
        let o = Overload::default();
        assert_eq!(
            o.cooldown(Some(Duration::from_secs(10)), 0),
            Duration::from_secs(10)
        );
        assert_eq!(o.cooldown(Some(Duration::ZERO), 3), Duration::from_secs(1));
        assert_eq!(
            o.cooldown(Some(Duration::from_secs(3600)), 0),
            Duration::from_secs(60)
        );
        let backoff: Vec<u64> = (0..8).map(|n| o.cooldown(None, n).as_secs()).collect();
        assert_eq!(backoff, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn an_endpoint_is_ejected_after_failures_in_a_row_longer_each_time_and_forgiven_later() {
        let o = Overload::default();
        let hold = Hold::default();
        for _ in 0..4 {
            assert_eq!(hold.failed(&o, true, 1_000), Verdict::Same);
        }
        assert_eq!(
            hold.failed(&o, true, 1_000),
            Verdict::Held(HoldKind::Ejected, Duration::from_secs(30))
        );
        assert_eq!(
            hold.held(|| 1_000),
            Some((HoldKind::Ejected, Duration::from_secs(30)))
        );
        // Its probe fails: ejected again at once, for twice as long.
        assert_eq!(
            hold.failed(&o, true, 31_000),
            Verdict::Held(HoldKind::Ejected, Duration::from_secs(60))
        );
        // An answer to a request sent before the hold began does not end it.
        hold.answered(|| 40_000);
        assert!(hold.probing() && hold.held(|| 40_000).is_some());
        hold.answered(|| 91_000);
        assert!(!hold.probing() && hold.held(|| 91_000).is_none());
        // Two base ejections later, both earlier ejections are forgotten: 30 s again.
        for _ in 0..4 {
            hold.failed(&o, true, 151_000);
        }
        assert_eq!(
            hold.failed(&o, true, 151_000),
            Verdict::Held(HoldKind::Ejected, Duration::from_secs(30))
        );
        // Not when the service has its share ejected already.
        let other = Hold::default();
        for _ in 0..10 {
            assert_eq!(other.failed(&o, false, 0), Verdict::Same);
        }
    }

    #[test]
    fn answers_to_requests_sent_before_a_cooldown_do_not_stack_it() {
        let o = Overload::default();
        let hold = Hold::default();
        assert_eq!(
            hold.overloaded(&o, None, 1_000),
            Verdict::Held(HoldKind::Cooldown, Duration::from_secs(1))
        );
        // Nineteen more 503s from the same burst: the same cooldown, not 2^19 s.
        for _ in 0..19 {
            assert_eq!(hold.overloaded(&o, None, 1_010), Verdict::Same);
        }
        assert_eq!(hold.cooldowns.load(Ordering::Relaxed), 1);
        // A later Retry-After makes it longer.
        assert_eq!(
            hold.overloaded(&o, Some(Duration::from_secs(5)), 1_020),
            Verdict::Same
        );
        assert_eq!(
            hold.held(|| 1_020),
            Some((HoldKind::Cooldown, Duration::from_secs(5)))
        );
        // Back (an answer in between), and full again later: a fresh cooldown from 1 s.
        hold.answered(|| 7_000);
        assert_eq!(
            hold.overloaded(&o, None, 7_000),
            Verdict::Held(HoldKind::Cooldown, Duration::from_secs(1))
        );
    }

    #[test]
    fn at_most_the_share_is_ejected_and_one_of_two() {
        let o = Overload::default();
        assert_eq!([1, 2, 3, 4, 10].map(|n| o.max_ejected(n)), [0, 1, 1, 2, 5]);
    }
}
