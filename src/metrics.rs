//! Prometheus metrics. Counters and histograms live next to what they count (per service,
//! per endpoint, per resource) as plain atomics, so recording is a few atomic adds and no
//! label lookup; a scrape walks the live policy and encodes everything with
//! prometheus-client. Labels are service, endpoint URL, resource name, status class and reason:
//! all bounded by the config, never a key.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control::Control;
use crate::policy::Policy;
use crate::proxy::reject::Reason;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram bucket upper bounds, in seconds.
const BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A latency histogram of atomics: one count per bucket (not cumulative: the exposition
/// accumulates them).
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

    /// (sum in seconds, count, per-bucket counts): the encoder accumulates the buckets itself
    /// (prometheus-client's `encode_histogram` writes running totals), so these must not be
    /// cumulative already, or every `_bucket` but the first would count samples twice.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let mut buckets = Vec::with_capacity(BOUNDS.len() + 1);
        for (i, bound) in BOUNDS.iter().chain([&f64::INFINITY]).enumerate() {
            let n = self.buckets[i].load(Ordering::Relaxed);
            count += n;
            buckets.push((*bound, n));
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

/// Status classes of answers.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// What a service counts: endpoint answers are counted per endpoint ([`EndpointStats`]);
/// sluice's own answers here, by reason.
#[derive(Debug, Default)]
pub struct ServiceStats {
    own: [AtomicU64; Reason::ALL.len()],
    /// Time from request to response headers, whoever answered.
    pub duration: Histogram,
}

impl ServiceStats {
    /// Count an answer sluice gave itself.
    pub fn count_own(&self, reason: Reason) {
        self.own[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Every answer so far: sluice's own plus those of the endpoints in `shape`.
    pub fn answers_total(&self, shape: &crate::balance::Shape) -> u64 {
        let own: u64 = self.own.iter().map(|n| n.load(Ordering::Relaxed)).sum();
        let endpoints: u64 = shape
            .endpoints
            .iter()
            .flat_map(|(e, _)| e.stats.classes.iter())
            .map(|n| n.load(Ordering::Relaxed))
            .sum();
        own + endpoints
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

/// What an endpoint counts.
#[derive(Debug, Default)]
pub struct EndpointStats {
    classes: [AtomicU64; 5],
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

/// Render every metric in the text format.
pub fn render(control: &Control) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Live {
        policy: control.proxy().policy(),
        events: control.proxy().events().totals(),
        reloads: (
            control.reloads().ok.load(Ordering::Relaxed),
            control.reloads().failed.load(Ordering::Relaxed),
        ),
        fleet: control.proxy().fleet().map(|f| f.view()),
    }));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    text
}

/// A snapshot source for one scrape.
#[derive(Debug)]
struct Live {
    policy: std::sync::Arc<Policy>,
    events: Vec<(&'static str, u64)>,
    reloads: (u64, u64),
    fleet: Option<crate::store::FleetView>,
}

type Labels = Vec<(Cow<'static, str>, Cow<'static, str>)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (Cow::Borrowed(*k), Cow::Owned((*v).to_owned())))
        .collect()
}

/// One metric family: a descriptor and its labelled samples.
fn family<'e>(
    encoder: &'e mut DescriptorEncoder,
    name: &'e str,
    help: &str,
    kind: MetricType,
    mut each: impl FnMut(
        &mut prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    each(&mut metric)
}

fn counter(
    m: &mut prometheus_client::encoding::MetricEncoder<'_>,
    l: &Labels,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(m.encode_family(l)?)
}

fn gauge(
    m: &mut prometheus_client::encoding::MetricEncoder<'_>,
    l: &Labels,
    v: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(m.encode_family(l)?)
}

fn histogram(
    m: &mut prometheus_client::encoding::MetricEncoder<'_>,
    l: &Labels,
    h: &Histogram,
) -> Result<(), std::fmt::Error> {
    let (sum, count, buckets) = h.snapshot();
    m.encode_family(l)?
        .encode_histogram::<Labels>(sum, count, &buckets, None)
}

impl Collector for Live {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let services = &self.policy.services;
        family(
            &mut e,
            "sluice_requests",
            "Answers by service, endpoint, status class and, for sluice's own answers, reason",
            MetricType::Counter,
            |m| {
                for s in services {
                    for (endpoint, _) in s.pool.shape().endpoints.iter() {
                        for (i, class) in CLASSES.iter().enumerate() {
                            let n = endpoint.stats.classes[i].load(Ordering::Relaxed);
                            let l = labels(&[
                                ("service", &s.name),
                                ("endpoint", endpoint.url()),
                                ("class", class),
                                ("reason", ""),
                            ]);
                            counter(m, &l, n)?;
                        }
                    }
                    for reason in Reason::ALL {
                        let n = s.stats.own[reason.index()].load(Ordering::Relaxed);
                        let class = CLASSES[class_index(reason.status().as_u16())];
                        let l = labels(&[
                            ("service", &s.name),
                            ("endpoint", ""),
                            ("class", class),
                            ("reason", reason.as_str()),
                        ]);
                        counter(m, &l, n)?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "sluice_request_duration_seconds",
            "Time from request to response headers, per service",
            MetricType::Histogram,
            |m| {
                for s in services {
                    histogram(m, &labels(&[("service", &s.name)]), &s.stats.duration)?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "sluice_upstream_duration_seconds",
            "Time from sending to an endpoint to its response headers",
            MetricType::Histogram,
            |m| {
                for s in services {
                    for (endpoint, _) in s.pool.shape().endpoints.iter() {
                        let l = labels(&[("service", &s.name), ("endpoint", endpoint.url())]);
                        histogram(m, &l, &endpoint.stats.duration)?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "sluice_endpoint_in_flight",
            "Requests in flight at an endpoint",
            MetricType::Gauge,
            |m| {
                for s in services {
                    for (endpoint, _) in s.pool.shape().endpoints.iter() {
                        let l = labels(&[("service", &s.name), ("endpoint", endpoint.url())]);
                        gauge(m, &l, i64::from(endpoint.in_flight()))?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "sluice_endpoint_max_concurrent",
            "Concurrency cap of an endpoint",
            MetricType::Gauge,
            |m| {
                for s in services {
                    for (endpoint, cap) in s.pool.shape().endpoints.iter() {
                        let l = labels(&[("service", &s.name), ("endpoint", endpoint.url())]);
                        gauge(m, &l, i64::from(*cap))?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "sluice_endpoint_healthy",
            "1 unless the endpoint is in its connect-failure back-off",
            MetricType::Gauge,
            |m| {
                for s in services {
                    for (endpoint, _) in s.pool.shape().endpoints.iter() {
                        let l = labels(&[("service", &s.name), ("endpoint", endpoint.url())]);
                        gauge(m, &l, i64::from(endpoint.is_healthy()))?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "sluice_service_in_flight",
            "Requests in flight over all endpoints of a service",
            MetricType::Gauge,
            |m| {
                for s in services {
                    gauge(
                        m,
                        &labels(&[("service", &s.name)]),
                        i64::from(s.pool.in_flight()),
                    )?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "sluice_queue_length",
            "Requests waiting for a slot",
            MetricType::Gauge,
            |m| {
                for s in services {
                    gauge(
                        m,
                        &labels(&[("service", &s.name)]),
                        s.pool.queue_len() as i64,
                    )?;
                }
                Ok(())
            },
        )?;
        family(&mut e, "sluice_resource_requests", "Requests per resource: admitted, throttled (429 for rate), succeeded (2xx from the endpoint: what a caller is billed for)", MetricType::Counter, |m| {
            for s in services {
                for r in s.limits.iter().flat_map(|l| l.all_resources()) {
                    let c = &r.counters;
                    for (outcome, n) in [("admitted", &c.admitted), ("throttled", &c.throttled), ("succeeded", &c.succeeded)] {
                        let l = labels(&[("service", &s.name), ("resource", &r.name), ("outcome", outcome)]);
                        counter(m, &l, n.total())?;
                    }
                }
            }
            Ok(())
        })?;
        family(
            &mut e,
            "sluice_resource_limit_tps",
            "TPS limit in force per resource",
            MetricType::Gauge,
            |m| {
                for s in services {
                    for r in s.limits.iter().flat_map(|l| l.all_resources()) {
                        let l = labels(&[("service", &s.name), ("resource", &r.name)]);
                        gauge(m, &l, i64::from(r.limit().tps.get()))?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "sluice_autoscale_events",
            "Autoscale actions, deferrals and policy changes, by kind",
            MetricType::Counter,
            |m| {
                for (kind, n) in &self.events {
                    counter(m, &labels(&[("kind", kind)]), *n)?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "sluice_config_reloads",
            "Config reloads by result",
            MetricType::Counter,
            |m| {
                counter(m, &labels(&[("result", "ok")]), self.reloads.0)?;
                counter(m, &labels(&[("result", "failed")]), self.reloads.1)
            },
        )?;
        if let Some(f) = &self.fleet {
            let gauges: [(&str, &str, i64); 4] = [
                (
                    "sluice_store_up",
                    "1 while the shared store answers, 0 while on_error applies",
                    i64::from(f.up),
                ),
                (
                    "sluice_fleet_replicas",
                    "Live replicas in the fleet at the last heartbeat",
                    i64::from(f.replicas),
                ),
                (
                    "sluice_fleet_leader",
                    "1 while this replica takes the fleet's autoscale steps",
                    i64::from(f.leader),
                ),
                (
                    "sluice_fleet_policy_version",
                    "Version of the fleet policy in force here",
                    i64::try_from(f.policy_version).unwrap_or(i64::MAX),
                ),
            ];
            for (name, help, value) in gauges {
                // No labels: one series per replica, told apart by the scrape target.
                let metric = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(value).encode(metric)?;
            }
            let counters: [(&str, &str, u64); 3] = [
                (
                    "sluice_store_calls",
                    "Calls to the shared store",
                    f.calls_total,
                ),
                (
                    "sluice_store_errors",
                    "Store calls that failed or timed out",
                    f.errors_total,
                ),
                (
                    "sluice_store_fallbacks",
                    "Requests decided by store.on_error while the store was unreachable",
                    f.fallbacks_total,
                ),
            ];
            for (name, help, value) in counters {
                let metric = e.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(value).encode(metric)?;
            }
        }
        Ok(())
    }
}
