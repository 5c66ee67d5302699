//! What sluice records as requests pass: latency histograms and answer counts per service and
//! per endpoint, sluice's own answers by reason, reloads. Plain atomics next to what they
//! count, so recording is a few atomic adds; the Prometheus exporter (`metrics`) and the admin
//! views read them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::reason::Reason;

/// Histogram bucket upper bounds, in seconds.
const BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A latency histogram of atomics: one count per bucket (the exposition accumulates them).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// (sum in seconds, count, cumulative bucket counts ending at +Inf): what a `_bucket`
    /// sample holds. `count` is the +Inf bucket itself, so the two always agree.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BOUNDS.len() + 1);
        for (i, bound) in BOUNDS.iter().chain([&f64::INFINITY]).enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            buckets.push((*bound, cumulative));
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, cumulative, buckets)
    }
}

/// Status classes of answers, in the order [`EndpointStats`] counts them.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub fn class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// What a service counts: endpoint answers are counted per endpoint ([`EndpointStats`]);
/// sluice's own answers here, by reason.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// sluice's own answers, by [`Reason::index`].
    pub own: [AtomicU64; Reason::ALL.len()],
    /// Time from request to response headers, whoever answered.
    pub duration: Histogram,
}

impl ServiceStats {
    /// Count an answer sluice gave itself.
    pub fn count_own(&self, reason: Reason) {
        self.own[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Every answer so far: sluice's own plus those of `endpoints` (the service's).
    pub fn answers_total<'a>(&self, endpoints: impl IntoIterator<Item = &'a EndpointStats>) -> u64 {
        let own: u64 = self.own.iter().map(|n| n.load(Ordering::Relaxed)).sum();
        let answered: u64 = endpoints
            .into_iter()
            .flat_map(|e| e.classes.iter())
            .map(|n| n.load(Ordering::Relaxed))
            .sum();
        own + answered
    }

    /// 429 answers so far, for any reason.
    pub fn too_many_requests_total(&self) -> u64 {
        Reason::ALL
            .iter()
            .filter(|r| r.status() == http::StatusCode::TOO_MANY_REQUESTS)
            .map(|r| self.own[r.index()].load(Ordering::Relaxed))
            .sum()
    }
}

/// Reasons sluice answers with before a request has a service, counted in [`UnroutedStats`]
/// and exported without service labels: never per service, where their series could never
/// move.
pub const UNROUTED: [Reason; 4] = [
    Reason::NoRoute,
    Reason::InvalidHost,
    Reason::UnsupportedTransferCoding,
    Reason::ConflictingFraming,
];

/// Whether a reason is given before a request has a service (one of [`UNROUTED`]).
pub fn before_routing(reason: Reason) -> bool {
    UNROUTED.contains(&reason)
}

/// sluice's own answers to requests that reached no service (no route, or refused before
/// routing: an invalid `Host`, a transfer coding sluice does not implement, both
/// `Content-Length` and `Transfer-Encoding`): they have no
/// service to be counted under. Kept across policy changes, like a service's counts.
#[derive(Debug, Default)]
pub struct UnroutedStats {
    /// By [`Reason::index`].
    pub own: [AtomicU64; Reason::ALL.len()],
}

impl UnroutedStats {
    /// Count an answer sluice gave to a request that reached no service.
    pub fn count_own(&self, reason: Reason) {
        self.own[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// What an endpoint counts.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Answers by status class ([`CLASSES`]).
    pub classes: [AtomicU64; 5],
    /// Time from sending the request to the endpoint's response headers.
    pub duration: Histogram,
}

impl EndpointStats {
    /// Count an endpoint's answer by status class.
    pub fn count_answer(&self, status: u16) {
        self.classes[class_index(status)].fetch_add(1, Ordering::Relaxed);
    }
}

/// Reloads that were applied and refused.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Applied.
    pub ok: AtomicU64,
    /// Refused (invalid file).
    pub failed: AtomicU64,
}

/// DNS lookups of endpoint names, by name: how each went, and what the name stands for now.
#[derive(Debug, Default)]
pub struct DnsLookups(std::sync::Mutex<std::collections::BTreeMap<String, NameLookups>>);

/// The lookups of one name.
#[derive(Debug, Default, Clone)]
pub struct NameLookups {
    /// Answered with at least one endpoint.
    pub found: u64,
    /// Answered that the name has none (NXDOMAIN, no records).
    pub empty: u64,
    /// Failed (timeout, SERVFAIL, no server): the last known endpoints stay.
    pub failed: u64,
    /// Endpoints it stands for now.
    pub endpoints: u64,
}

impl DnsLookups {
    /// Record a lookup of `name`: `Some(n)` answered with `n` endpoints, `None` failed.
    pub fn count(&self, name: &str, answer: Option<usize>) {
        let mut names = self.0.lock().expect("dns lookups lock");
        let entry = names.entry(name.to_owned()).or_default();
        match answer {
            Some(0) => (entry.empty, entry.endpoints) = (entry.empty + 1, 0),
            Some(n) => (entry.found, entry.endpoints) = (entry.found + 1, n as u64),
            None => entry.failed += 1,
        }
    }

    /// Every name looked up so far, with its counts.
    pub fn snapshot(&self) -> Vec<(String, NameLookups)> {
        let names = self.0.lock().expect("dns lookups lock");
        names.iter().map(|(n, l)| (n.clone(), l.clone())).collect()
    }
}
