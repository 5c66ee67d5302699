//! The metrics rules can name, and the recorders the request path and the interval loop
//! write them into: one [`ResourceMetrics`] per resource (lock-free counters, written on
//! every request) and one [`ServiceMetrics`] per service (sampled gauges and per-endpoint
//! latency, behind one short `Mutex`). [`Metrics`] is how the evaluator reads them, so tests
//! can hand it fixed values instead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ring::{CounterRing, GaugeRing};
use super::window::{aggregate, recent, Summary, WindowQuery, WindowSpec};

/// A metric a rule can name.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Per resource: requests seen (admitted + throttled).
    Requests,
    /// Per resource: requests let through by the rate limit.
    AdmittedRequests,
    /// Per resource: requests refused with 429 by the rate limit.
    ThrottledRequests,
    /// Per resource: admitted per second / limit × 100, per storage grain.
    UtilizationPercent,
    /// Per service: observed endpoint latency in milliseconds (one sample per response).
    LatencyMs,
    /// Per service: requests in flight (sampled by the loop).
    InFlight,
    /// Per service: requests waiting for a slot (sampled).
    QueueLength,
    /// Per service: age of the oldest queued request in milliseconds (sampled).
    QueueOldestAgeMs,
    /// Per service: projected capacity minus admitted TPS (sampled).
    CapacityHeadroomTps,
}

impl Metric {
    /// Every metric, in declaration order.
    pub const ALL: [Metric; 9] = [
        Self::Requests,
        Self::AdmittedRequests,
        Self::ThrottledRequests,
        Self::UtilizationPercent,
        Self::LatencyMs,
        Self::InFlight,
        Self::QueueLength,
        Self::QueueOldestAgeMs,
        Self::CapacityHeadroomTps,
    ];

    /// Whether the metric is measured per resource (else per service).
    pub fn is_per_resource(self) -> bool {
        matches!(
            self,
            Self::Requests
                | Self::AdmittedRequests
                | Self::ThrottledRequests
                | Self::UtilizationPercent
        )
    }

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::AdmittedRequests => "admitted_requests",
            Self::ThrottledRequests => "throttled_requests",
            Self::UtilizationPercent => "utilization_percent",
            Self::LatencyMs => "latency_ms",
            Self::InFlight => "in_flight",
            Self::QueueLength => "queue_length",
            Self::QueueOldestAgeMs => "queue_oldest_age_ms",
            Self::CapacityHeadroomTps => "capacity_headroom_tps",
        }
    }

    /// Slot of a per-service gauge in [`ServiceMetrics`].
    fn gauge_slot(self) -> Option<usize> {
        match self {
            Self::LatencyMs => Some(0),
            Self::InFlight => Some(1),
            Self::QueueLength => Some(2),
            Self::QueueOldestAgeMs => Some(3),
            Self::CapacityHeadroomTps => Some(4),
            _ => None,
        }
    }
}

/// Read access to metric windows, as the evaluator needs it.
pub trait Metrics {
    /// `query` over `metric` at `now`; per-resource metrics are read for `resource`, service
    /// metrics ignore it. `None` means the metric cannot be read (see `aggregate`).
    fn read(
        &self,
        metric: Metric,
        resource: Option<&str>,
        query: &WindowQuery,
        now: Instant,
    ) -> Option<f64>;
}

/// One resource's request counters. Share it (`Arc`) with the request path, which calls
/// [`record_admitted`](Self::record_admitted) / [`record_throttled`](Self::record_throttled).
#[derive(Debug)]
pub struct ResourceMetrics {
    spec: WindowSpec,
    origin: Instant,
    admitted: CounterRing,
    throttled: CounterRing,
    /// Limit in force when each grain opened, so utilization is measured against the limit
    /// the traffic actually met, not one set later.
    limits: CounterRing,
    limit: AtomicU32,
}

impl ResourceMetrics {
    /// Empty counters whose grains start at `origin`, for a resource currently at `limit`.
    pub fn new(spec: WindowSpec, origin: Instant, limit: u32) -> Self {
        Self {
            spec,
            origin,
            admitted: CounterRing::new(spec.len),
            throttled: CounterRing::new(spec.len),
            limits: CounterRing::new(spec.len),
            limit: AtomicU32::new(limit),
        }
    }

    /// Count one admitted request (hot path: one atomic add, lock-free).
    pub fn record_admitted(&self, now: Instant) {
        self.record(now, 1, 0);
    }

    /// Count one throttled request (hot path: one atomic add, lock-free).
    pub fn record_throttled(&self, now: Instant) {
        self.record(now, 0, 1);
    }

    /// Count several requests at once (batching callers, tests).
    pub fn record(&self, now: Instant, admitted: u32, throttled: u32) {
        let i = self.spec.index(self.origin, now);
        if admitted > 0 && self.admitted.add(i, admitted) {
            self.limits.stamp(i, self.limit.load(Ordering::Relaxed));
        }
        if throttled > 0 {
            self.throttled.add(i, throttled);
        }
    }

    /// Tell the window the limit now in force (call whenever the limit changes).
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The limit last given to [`set_limit`](Self::set_limit).
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// `query` over one of the per-resource metrics; `None` for service metrics.
    pub fn read(&self, metric: Metric, query: &WindowQuery, now: Instant) -> Option<f64> {
        if !metric.is_per_resource() {
            return None;
        }
        aggregate(&self.spec, self.origin, now, query, |i| {
            self.bucket(metric, i)
        })
    }

    /// Admitted requests per second over the complete grains of the last `window`.
    pub fn admitted_tps(&self, now: Instant, window: Duration) -> f64 {
        let (s, span) = recent(&self.spec, self.origin, now, window, |i| {
            self.bucket(Metric::AdmittedRequests, i)
        });
        if span.is_zero() {
            0.0
        } else {
            s.sum / span.as_secs_f64()
        }
    }

    /// One storage grain of `metric` as a sample. Counter grains inside the tracked period
    /// are always a sample (zero requests is data); utilization counts one sample per grain.
    fn bucket(&self, metric: Metric, i: u64) -> Summary {
        let a = self.admitted.get(i);
        let t = self.throttled.get(i);
        match metric {
            Metric::Requests => Summary::one((a + t) as f64, a + t),
            Metric::AdmittedRequests => Summary::one(a as f64, a),
            Metric::ThrottledRequests => Summary::one(t as f64, t),
            Metric::UtilizationPercent => {
                let limit = self
                    .limits
                    .stamped(i)
                    .unwrap_or_else(|| self.limit())
                    .max(1);
                let per_sec = a as f64 / self.spec.grain.as_secs_f64();
                Summary::one(per_sec / f64::from(limit) * 100.0, 1)
            }
            _ => Summary::EMPTY,
        }
    }
}

/// Rings written under the service's lock.
#[derive(Debug)]
struct ServiceRings {
    gauges: [GaugeRing; 5],
    endpoints: Vec<GaugeRing>,
}

/// One service's metric windows: sampled gauges, per-endpoint latency, and its resources'
/// counters. Implements [`Metrics`] for the engine.
#[derive(Debug)]
pub struct ServiceMetrics {
    spec: WindowSpec,
    origin: Instant,
    rings: Mutex<ServiceRings>,
    resources: BTreeMap<String, Arc<ResourceMetrics>>,
}

impl ServiceMetrics {
    /// Empty windows for a service with `endpoints` endpoints, grains starting at `origin`.
    pub fn new(spec: WindowSpec, origin: Instant, endpoints: usize) -> Self {
        let ring = GaugeRing::new(spec.len);
        Self {
            spec,
            origin,
            rings: Mutex::new(ServiceRings {
                gauges: std::array::from_fn(|_| ring.clone()),
                endpoints: vec![ring; endpoints],
            }),
            resources: BTreeMap::new(),
        }
    }

    /// Add (or replace) a resource's counters, starting at `now`; hand the `Arc` to the
    /// request path.
    pub fn add_resource(&mut self, name: &str, limit: u32, now: Instant) -> Arc<ResourceMetrics> {
        let m = Arc::new(ResourceMetrics::new(self.spec, now, limit));
        self.resources.insert(name.to_owned(), Arc::clone(&m));
        m
    }

    /// Add counters that already exist (kept across a reload with the same window shape).
    pub fn insert_resource(&mut self, name: &str, metrics: Arc<ResourceMetrics>) {
        self.resources.insert(name.to_owned(), metrics);
    }

    /// The counters of `name`, if it was added.
    pub fn resource(&self, name: &str) -> Option<&Arc<ResourceMetrics>> {
        self.resources.get(name)
    }

    /// Record a response's latency from `endpoint` (feeds `latency_ms` and the capacity
    /// projection). Unknown endpoint indexes only feed `latency_ms`.
    pub fn record_latency(&self, endpoint: usize, latency: Duration, now: Instant) {
        let i = self.spec.index(self.origin, now);
        let ms = latency.as_secs_f64() * 1000.0;
        let mut rings = self.lock();
        rings.gauges[0].record(i, ms);
        if let Some(ring) = rings.endpoints.get_mut(endpoint) {
            ring.record(i, ms);
        }
    }

    /// Record a sample of a per-service gauge (`in_flight`, `queue_length`, ...); returns
    /// false, recording nothing, for a per-resource metric.
    pub fn record_gauge(&self, metric: Metric, value: f64, now: Instant) -> bool {
        let Some(slot) = metric.gauge_slot() else {
            return false;
        };
        let i = self.spec.index(self.origin, now);
        self.lock().gauges[slot].record(i, value);
        true
    }

    /// Mean latency of `endpoint` over the complete grains of the last `window`; `None`
    /// when nothing was observed.
    pub fn endpoint_latency(
        &self,
        endpoint: usize,
        now: Instant,
        window: Duration,
    ) -> Option<Duration> {
        let rings = self.lock();
        let ring = rings.endpoints.get(endpoint)?;
        let (s, _) = recent(&self.spec, self.origin, now, window, |i| ring.get(i));
        let ms = s.statistic(super::settings::Statistic::Average)?;
        Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0))
    }

    /// Admitted TPS over the last `window`, summed over every resource of the service.
    pub fn admitted_tps(&self, now: Instant, window: Duration) -> f64 {
        self.resources
            .values()
            .map(|r| r.admitted_tps(now, window))
            .sum()
    }

    /// Number of endpoints tracked.
    pub fn endpoints(&self) -> usize {
        self.lock().endpoints.len()
    }

    fn lock(&self) -> MutexGuard<'_, ServiceRings> {
        // The rings are plain numbers: a panic mid-record leaves at worst one half-merged
        // sample, which is better than losing autoscaling for the service.
        self.rings.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Metrics for ServiceMetrics {
    fn read(
        &self,
        metric: Metric,
        resource: Option<&str>,
        query: &WindowQuery,
        now: Instant,
    ) -> Option<f64> {
        if metric.is_per_resource() {
            return self.resources.get(resource?)?.read(metric, query, now);
        }
        let slot = metric.gauge_slot()?;
        let rings = self.lock();
        let ring = &rings.gauges[slot];
        aggregate(&self.spec, self.origin, now, query, |i| ring.get(i))
    }
}
