//! A service's autoscaling state as the live policy holds it: the settings, the metric windows
//! the request path feeds, and the pure engine; and how a decision (a step of its own, or one
//! the fleet's leader published) is applied to the live limiter and pool. The loop that drives
//! it every interval is the control plane's (`control::autoscale`).

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::autoscale::{
    AutoscaleSettings, CapacityInput, Event, Metric, ResourceMetrics, ResourceSpec, ScaleTarget,
    ServiceEngine, ServiceMetrics,
};
use crate::balance::{Endpoint, Pool};
use crate::config::ServiceConfig;
use crate::limit::RateLimiter;
use crate::store::{Others, ScaleDoc};

/// A service's autoscaling state: its settings, metric windows and engine.
#[derive(Debug)]
pub struct ServiceAutoscaler {
    settings: AutoscaleSettings,
    metrics: ServiceMetrics,
    engine: Mutex<ServiceEngine>,
}

impl ServiceAutoscaler {
    /// Build for a service whose rate limiter is `limits`: resources get their metric windows
    /// attached (so the request path feeds them) and their live limits set from the engine.
    /// With `previous` (a reload), the engine's limits and cooldowns carry over, and so do the
    /// metric windows when their shape is unchanged; the events say what the reload changed.
    pub fn build(
        config: &ServiceConfig,
        settings: AutoscaleSettings,
        limits: Option<&RateLimiter>,
        previous: Option<&ServiceAutoscaler>,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> (Self, Vec<Event>) {
        let spec = settings.window_spec();
        let kept = previous.filter(|p| p.settings.window_spec() == spec);
        let mut metrics = ServiceMetrics::new(spec, now, config.endpoints.len());
        let mut specs = BTreeMap::new();
        if let Some(limits) = limits {
            for resource in limits.all_resources() {
                let window = kept
                    .and_then(|p| p.metrics.resource(&resource.name).cloned())
                    .unwrap_or_else(|| {
                        let limit = resource.limit().tps.get();
                        Arc::new(ResourceMetrics::new(spec, now, limit))
                    });
                metrics.insert_resource(&resource.name, Arc::clone(&window));
                resource.attach_metrics(window);
            }
            for resource in limits.resources() {
                let spec = ResourceSpec {
                    base: resource.base().tps.get(),
                    max_tps: limits.settings().max_tps,
                    enabled: resource.autoscale(),
                };
                specs.insert(resource.name.to_string(), spec);
            }
        }
        let (engine, events) = match previous {
            Some(previous) => {
                let mut engine = previous.engine().clone();
                let events = engine.reload(
                    settings.clone(),
                    &specs,
                    config.max_concurrent.initial(config.adaptive_bounds()),
                    wall,
                );
                (engine, events)
            }
            None => {
                let mut engine = ServiceEngine::new(
                    &config.name,
                    settings.clone(),
                    config.max_concurrent.initial(config.adaptive_bounds()),
                );
                for (name, spec) in &specs {
                    engine.add_resource(name, *spec);
                }
                (engine, Vec::new())
            }
        };
        // The engine is the one place autoscaled values live; make the limiter agree with it.
        if let Some(limits) = limits {
            for (name, state) in engine.resources() {
                if let (Some(r), Some(tps)) = (limits.find(name), NonZeroU32::new(state.limit)) {
                    if r.autoscale() {
                        r.set_tps(tps);
                        if let Some(window) = metrics.resource(name) {
                            window.set_limit(tps.get());
                        }
                    }
                }
            }
        }
        let autoscaler = Self {
            settings,
            metrics,
            engine: Mutex::new(engine),
        };
        (autoscaler, events)
    }

    /// The per-endpoint cap the engine holds for the service (autoscaled or configured).
    pub fn endpoint_concurrency(&self) -> u32 {
        self.engine().endpoint_concurrency()
    }

    /// The settings in force.
    pub fn settings(&self) -> &AutoscaleSettings {
        &self.settings
    }

    fn engine(&self) -> MutexGuard<'_, ServiceEngine> {
        // The engine's state is a few numbers per resource, updated whole; a panic elsewhere
        // while it was held leaves it usable.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The autoscaled limit of each resource, by name.
    pub fn limits(&self) -> BTreeMap<String, u32> {
        self.engine()
            .resources()
            .map(|(name, state)| (name.to_owned(), state.limit))
            .collect()
    }

    /// Record the latency of a response from `endpoint` (feeds `latency_ms` and the capacity
    /// projection).
    pub fn record_latency(&self, pool: &Pool, endpoint: &Arc<Endpoint>, latency: Duration) {
        let shape = pool.shape();
        let index = shape
            .endpoints
            .iter()
            .position(|(e, _)| Arc::ptr_eq(e, endpoint))
            .unwrap_or(usize::MAX);
        self.metrics.record_latency(index, latency, now());
    }

    fn capacity(&self, pool: &Pool, now: Instant) -> CapacityInput {
        let shape = pool.shape();
        // Endpoints count as far as they can take traffic now (health, slow start).
        let caps: Vec<u32> = (0..shape.endpoints.len())
            .map(|i| shape.serving_cap(i))
            .collect();
        let cluster = (shape.cluster_cap != u32::MAX).then_some(shape.cluster_cap);
        CapacityInput::from_metrics(
            &self.metrics,
            &caps,
            cluster,
            self.settings.expected_latency,
            now,
            self.settings.interval,
        )
    }

    /// Record one sample of each per-service gauge; in a fleet's leader, `others` adds what
    /// the other replicas counted (requests per resource, in flight, queued).
    pub fn sample(&self, pool: &Pool, now: Instant, others: Option<&Others>) {
        let age_ms = pool
            .queue_oldest_age()
            .map_or(0.0, |a| a.as_secs_f64() * 1000.0);
        let (mut in_flight, mut queued) = (f64::from(pool.in_flight()), pool.queue_len() as f64);
        if let Some(others) = others {
            in_flight += others.in_flight;
            queued += others.queue;
            for (name, &(admitted, throttled)) in &others.resources {
                if let Some(window) = self.metrics.resource(name) {
                    let n = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
                    window.record(now, n(admitted), n(throttled));
                }
            }
        }
        let headroom = self.capacity(pool, now).available_tps();
        self.metrics.record_gauge(Metric::InFlight, in_flight, now);
        self.metrics.record_gauge(Metric::QueueLength, queued, now);
        self.metrics
            .record_gauge(Metric::QueueOldestAgeMs, age_ms, now);
        self.metrics
            .record_gauge(Metric::CapacityHeadroomTps, headroom, now);
    }

    /// Take the values the fleet's leader decided, and apply them like a step of its own.
    pub fn follow(
        &self,
        doc: &ScaleDoc,
        pool: &Arc<Pool>,
        limits: Option<&RateLimiter>,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Vec<Event> {
        let events = self
            .engine()
            .follow(&doc.limits, doc.endpoint_concurrency, now, wall);
        for event in &events {
            self.apply(event, pool, limits);
        }
        events
    }

    /// The values a leader publishes after a step taken at `stepped_at_ms` (Redis's clock).
    pub fn scale_doc(&self, stepped_at_ms: u64) -> ScaleDoc {
        let engine = self.engine();
        ScaleDoc {
            stepped_at_ms,
            limits: engine
                .resources()
                .filter(|(_, state)| state.spec.enabled)
                .map(|(name, state)| (name.to_owned(), state.limit))
                .collect(),
            endpoint_concurrency: engine.endpoint_concurrency(),
        }
    }

    /// One interval: decide, then apply each decision to the live `limits` and `pool`.
    pub fn step(
        &self,
        pool: &Arc<Pool>,
        limits: Option<&RateLimiter>,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Vec<Event> {
        let capacity = self.capacity(pool, now);
        let events = self.engine().step(now, wall, &self.metrics, &capacity);
        for event in &events {
            self.apply(event, pool, limits);
        }
        events
    }

    /// Make an event's new value the live one.
    fn apply(&self, event: &Event, pool: &Arc<Pool>, limits: Option<&RateLimiter>) {
        if event.from == event.to {
            return; // a deferral
        }
        let Some(to) = NonZeroU32::new(event.to) else {
            return;
        };
        match &event.target {
            ScaleTarget::Resource { resource } => {
                if let Some(r) = limits.and_then(|l| l.find(resource)) {
                    r.set_tps(to);
                }
                if let Some(m) = self.metrics.resource(resource) {
                    m.set_limit(to.get());
                }
            }
            ScaleTarget::EndpointConcurrency => pool.set_default_cap(to.get()),
            // The engine never decides other settings.
            ScaleTarget::Setting { .. } | ScaleTarget::Endpoint { .. } => {}
        }
    }
}

/// The monotonic clock autoscaling reads.
pub fn now() -> Instant {
    // tokio's clock, so tests that pause time drive the windows too.
    tokio::time::Instant::now().into_std()
}
