//! Prometheus metrics. Counters and histograms live next to what they count (per service,
//! per endpoint, per resource) as plain atomics, so recording is a few atomic adds and no
//! label lookup; a scrape walks the live policy and writes every family in the format the
//! scraper asked for ([`Format`]): the Prometheus text format 0.0.4 or OpenMetrics 1.0.0. The
//! writer is ours (`exposition.rs`, a few dozen lines): the two formats differ only in how a counter family is
//! named, in escaping and in the closing `# EOF`, and owning it keeps what a histogram bucket
//! holds in one place. Labels are service, endpoint URL, resource name, status class and
//! reason: all bounded by the config, never a key.

use std::sync::atomic::Ordering;

use crate::control::Control;
use crate::reason::Reason;
use crate::recorders::{before_routing, class_index, CLASSES, UNROUTED};

mod exposition;

pub use exposition::Format;
use exposition::{Exposition, Kind};

/// Render every metric in `format`.
pub fn render(control: &Control, format: Format) -> String {
    let proxy = control.live();
    let policy = proxy.policy();
    let services = &policy.services;
    let mut e = Exposition::new(format);

    e.family(
        "sluice_requests",
        "Answers by service, endpoint, status class and, for sluice's own answers, reason",
        Kind::Counter,
    );
    for s in services {
        for (endpoint, _) in s.pool.shape().endpoints.iter() {
            for (i, class) in CLASSES.iter().enumerate() {
                let n = endpoint.stats.classes[i].load(Ordering::Relaxed);
                let l = [
                    ("service", &*s.name),
                    ("endpoint", endpoint.url()),
                    ("class", class),
                    ("reason", ""),
                ];
                e.counter(&l, n);
            }
        }
        for reason in Reason::ALL.into_iter().filter(|r| !before_routing(*r)) {
            let n = s.stats.own[reason.index()].load(Ordering::Relaxed);
            let class = CLASSES[class_index(reason.status().as_u16())];
            let l = [
                ("service", &*s.name),
                ("endpoint", ""),
                ("class", class),
                ("reason", reason.as_str()),
            ];
            e.counter(&l, n);
        }
    }
    // No service, so no service or endpoint label (Prometheus reads a missing label as "").
    for reason in UNROUTED {
        let l = [
            ("class", CLASSES[class_index(reason.status().as_u16())]),
            ("reason", reason.as_str()),
        ];
        e.counter(
            &l,
            policy.unrouted.own[reason.index()].load(Ordering::Relaxed),
        );
    }

    e.family(
        "sluice_request_duration_seconds",
        "Time from request to response headers, per service",
        Kind::Histogram,
    );
    for s in services {
        e.histogram(&[("service", &s.name)], &s.stats.duration);
    }

    e.family(
        "sluice_upstream_duration_seconds",
        "Time from sending to an endpoint to its response headers",
        Kind::Histogram,
    );
    for_each_endpoint(services, |l, endpoint, _| {
        e.histogram(l, &endpoint.stats.duration)
    });

    type EndpointGauge = fn(&crate::balance::Endpoint, u32) -> i64;
    let endpoint_gauges: [(&'static str, &str, EndpointGauge); 4] = [
        (
            "sluice_endpoint_in_flight",
            "Requests in flight at an endpoint",
            |endpoint, _| i64::from(endpoint.in_flight()),
        ),
        (
            "sluice_endpoint_max_concurrent",
            "Concurrency cap of an endpoint: configured, or as learned so far (max_concurrent = \"auto\")",
            |_, cap| i64::from(cap),
        ),
        (
            "sluice_endpoint_healthy",
            "1 unless the endpoint is in its connect-failure back-off",
            |endpoint, _| i64::from(endpoint.is_healthy()),
        ),
        (
            "sluice_endpoint_ready",
            "1 while the endpoint passes its service's health check (always without one)",
            |endpoint, _| i64::from(endpoint.is_ready()),
        ),
    ];
    for (name, help, value) in endpoint_gauges {
        e.family(name, help, Kind::Gauge);
        for_each_endpoint(services, |l, endpoint, cap| {
            e.gauge(l, value(endpoint, cap))
        });
    }

    type EndpointCount = fn(&crate::balance::Endpoint) -> u64;
    let endpoint_counts: [(&'static str, &str, EndpointCount); 2] = [
        (
            "sluice_endpoint_cooldowns",
            "Times an endpoint answered that it is full ([service.overload] status) and was \
             cooled down",
            |endpoint| endpoint.hold.cooldowns.load(Ordering::Relaxed),
        ),
        (
            "sluice_endpoint_ejections",
            "Times an endpoint was ejected after failing in a row ([service.outlier])",
            |endpoint| endpoint.hold.ejections.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, value) in endpoint_counts {
        e.family(name, help, Kind::Counter);
        for_each_endpoint(services, |l, endpoint, _| e.counter(l, value(endpoint)));
    }
    e.family(
        "sluice_endpoint_held_seconds",
        "Time until a cooled-down or ejected endpoint takes traffic again (0 when it is not held)",
        Kind::Gauge,
    );
    for_each_endpoint(services, |l, endpoint, _| {
        let left = endpoint.held().map_or(0.0, |(_, left)| left.as_secs_f64());
        e.gauge_f64(l, left);
    });
    e.family(
        "sluice_endpoint_cap_changes",
        "Times an endpoint's learned cap (max_concurrent = \"auto\") went up or down",
        Kind::Counter,
    );
    for_each_endpoint(services, |l, endpoint, _| {
        let (up, down) = endpoint.adaptive.changes();
        for (direction, n) in [("up", up), ("down", down)] {
            e.counter(&[l[0], l[1], ("direction", direction)], n);
        }
    });
    e.family(
        "sluice_retries",
        "Further attempts on another endpoint after an overload answer or a refused connection: \
         made, or refused by the service's retry budget",
        Kind::Counter,
    );
    for s in services {
        let budget = &s.pool.retry_budget;
        for (result, n) in [("made", &budget.made), ("refused", &budget.refused)] {
            e.counter(
                &[("service", &s.name), ("result", result)],
                n.load(Ordering::Relaxed),
            );
        }
    }

    e.family(
        "sluice_service_in_flight",
        "Requests in flight over all endpoints of a service",
        Kind::Gauge,
    );
    for s in services {
        e.gauge(&[("service", &s.name)], i64::from(s.pool.in_flight()));
    }

    e.family(
        "sluice_service_capacity",
        "Slots of a service's endpoints as far as they can take traffic now (health, slow \
         start), capped by cluster_max_concurrent",
        Kind::Gauge,
    );
    for s in services {
        let capacity = s.pool.shape().capacity();
        e.gauge(
            &[("service", &s.name)],
            i64::try_from(capacity).unwrap_or(i64::MAX),
        );
    }

    e.family(
        "sluice_queue_length",
        "Requests waiting for a slot",
        Kind::Gauge,
    );
    for s in services {
        let waiting = i64::try_from(s.pool.queue_len()).unwrap_or(i64::MAX);
        e.gauge(&[("service", &s.name)], waiting);
    }

    e.family(
        "sluice_queue_oldest_age_seconds",
        "How long the oldest request waiting for a slot has waited (0 with none waiting)",
        Kind::Gauge,
    );
    for s in services {
        let age = s.pool.queue_oldest_age().unwrap_or_default();
        e.gauge_f64(&[("service", &s.name)], age.as_secs_f64());
    }

    e.family(
        "sluice_resource_requests",
        "Requests per resource: admitted, throttled (429 for rate), succeeded (2xx from the endpoint: what a caller is billed for)",
        Kind::Counter,
    );
    for s in services {
        for r in s.rate.iter().flat_map(|l| l.all_resources()) {
            let c = &r.counters;
            for (outcome, n) in [
                ("admitted", &c.admitted),
                ("throttled", &c.throttled),
                ("succeeded", &c.succeeded),
            ] {
                let l = [
                    ("service", &*s.name),
                    ("resource", &r.name),
                    ("outcome", outcome),
                ];
                e.counter(&l, n.total());
            }
        }
    }

    e.family(
        "sluice_resource_limit_tps",
        "TPS limit in force per resource",
        Kind::Gauge,
    );
    for s in services {
        for r in s.rate.iter().flat_map(|l| l.all_resources()) {
            let l = [("service", &*s.name), ("resource", &r.name)];
            e.gauge(&l, i64::from(r.limit().tps.get()));
        }
    }

    e.family(
        "sluice_autoscale_events",
        "Autoscale actions, deferrals and policy changes, by kind",
        Kind::Counter,
    );
    for (kind, n) in proxy.events().totals() {
        e.counter(&[("kind", kind)], n);
    }

    // Only once a name was looked up: a family without series is metadata for nothing.
    let dns = control.dns().snapshot();
    if !dns.is_empty() {
        e.family(
            "sluice_dns_lookups",
            "DNS lookups of endpoint names by result: found (endpoints), empty (NXDOMAIN or no \
             records), failed (the last known endpoints stay)",
            Kind::Counter,
        );
        for (name, lookups) in &dns {
            for (result, n) in [
                ("found", lookups.found),
                ("empty", lookups.empty),
                ("failed", lookups.failed),
            ] {
                e.counter(&[("name", name), ("result", result)], n);
            }
        }
        e.family(
            "sluice_dns_endpoints",
            "Endpoints an endpoint name stands for, as its last answered lookup said",
            Kind::Gauge,
        );
        for (name, lookups) in &dns {
            e.gauge(
                &[("name", name)],
                i64::try_from(lookups.endpoints).unwrap_or(i64::MAX),
            );
        }
    }
    let reloads = control.reloads();
    e.family(
        "sluice_config_reloads",
        "Config reloads by result",
        Kind::Counter,
    );
    e.counter(&[("result", "ok")], reloads.ok.load(Ordering::Relaxed));
    e.counter(
        &[("result", "failed")],
        reloads.failed.load(Ordering::Relaxed),
    );

    if let Some(f) = proxy.fleet().map(|f| f.view()) {
        // No labels: one series per replica, told apart by the scrape target.
        let gauges: [(&'static str, &str, i64); 4] = [
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
            e.family(name, help, Kind::Gauge);
            e.gauge(&[], value);
        }
        let counters: [(&'static str, &str, u64); 3] = [
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
            e.family(name, help, Kind::Counter);
            e.counter(&[], value);
        }
    }
    e.finish()
}

/// `write` with the (service, endpoint) labels, the endpoint and its cap, for every endpoint
/// of every service: the families kept per endpoint.
fn for_each_endpoint(
    services: &[std::sync::Arc<crate::policy::Service>],
    mut write: impl FnMut(&[(&str, &str)], &crate::balance::Endpoint, u32),
) {
    for s in services {
        let shape = s.pool.shape();
        for (i, (endpoint, _)) in shape.endpoints.iter().enumerate() {
            write(
                &[("service", &s.name), ("endpoint", endpoint.url())],
                endpoint,
                shape.cap(i),
            );
        }
    }
}
