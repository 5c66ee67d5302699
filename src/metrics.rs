//! Prometheus metrics. Counters and histograms live next to what they count (per service,
//! per endpoint, per resource) as plain atomics, so recording is a few atomic adds and no
//! label lookup; a scrape walks the live policy and writes every family in the format the
//! scraper asked for ([`Format`]): the Prometheus text format 0.0.4 or OpenMetrics 1.0.0. The
//! writer is ours (a few dozen lines): the two formats differ only in how a counter family is
//! named, in escaping and in the closing `# EOF`, and owning it keeps what a histogram bucket
//! holds in one place. Labels are service, endpoint URL, resource name, status class and
//! reason: all bounded by the config, never a key.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::control::Control;
use crate::reason::Reason;
use crate::recorders::{before_routing, class_index, Histogram, CLASSES, UNROUTED};

/// An exposition format, chosen per scrape from the `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4: what any scraper understands, and the default.
    Prometheus,
    /// OpenMetrics 1.0.0 text, for a scraper that asks for `application/openmetrics-text`
    /// (Prometheus does, first, by default).
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header prefers: the acceptable media type with the highest
    /// `q` (the first listed on a tie) among OpenMetrics and `text/plain`; the text format
    /// when the header is absent or names neither (`*/*` included), as Prometheus' own client
    /// libraries do. Any OpenMetrics `version` is answered with 1.0.0 (the only other one is
    /// the draft 0.0.1, which it extends).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let mut best = (0.0, Self::Prometheus);
        for item in accept.unwrap_or("").split(',') {
            let mut parts = item.split(';').map(str::trim);
            let format = match parts.next() {
                Some(t) if t.eq_ignore_ascii_case("application/openmetrics-text") => {
                    Self::OpenMetrics
                }
                Some(t) if t.eq_ignore_ascii_case("text/plain") => Self::Prometheus,
                _ => continue,
            };
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f64>().ok())
                .filter(|q| (0.0..=1.0).contains(q))
                .unwrap_or(0.0);
            if q > best.0 {
                best = (q, format);
            }
        }
        best.1
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// What a metric family is, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exposition being written, family by family.
struct Exposition {
    format: Format,
    out: String,
    /// The family being written: the name its samples start with.
    name: &'static str,
}

impl Exposition {
    fn new(format: Format) -> Self {
        Self {
            format,
            out: String::with_capacity(16 * 1024),
            name: "",
        }
    }

    /// Start a family: its `# HELP` and `# TYPE` lines. OpenMetrics names a counter family
    /// without its samples' `_total`; the text format 0.0.4 has no such rule, and Prometheus
    /// (and `promtool check metrics`) file the metadata under the exact name, so there the
    /// family is named as its samples are.
    fn family(&mut self, name: &'static str, help: &str, kind: Kind) {
        self.name = name;
        let total = match (kind, self.format) {
            (Kind::Counter, Format::Prometheus) => "_total",
            _ => "",
        };
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push_str(total);
        self.out.push(' ');
        for c in help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '"' if self.format == Format::OpenMetrics => self.out.push_str("\\\""),
                c => self.out.push(c),
            }
        }
        self.out.push_str("\n# TYPE ");
        self.out.push_str(name);
        self.out.push_str(total);
        self.out.push(' ');
        self.out.push_str(kind);
        self.out.push('\n');
    }

    /// One sample line of the current family: its name with `suffix`, `labels` (then `le`,
    /// for a bucket) and `value`.
    fn sample(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        le: Option<&str>,
        value: impl std::fmt::Display,
    ) {
        self.out.push_str(self.name);
        self.out.push_str(suffix);
        let extra = le.map(|le| ("le", le));
        let mut all = labels.iter().copied().chain(extra).peekable();
        if all.peek().is_some() {
            self.out.push('{');
            for (i, (key, value)) in all.enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(key);
                self.out.push_str("=\"");
                for c in value.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, " {value}");
    }

    fn counter(&mut self, labels: &[(&str, &str)], value: u64) {
        self.sample("_total", labels, None, value);
    }

    fn gauge(&mut self, labels: &[(&str, &str)], value: i64) {
        self.sample("", labels, None, value);
    }

    /// `_bucket` (cumulative, ending at `+Inf`), `_sum` and `_count`. Bounds and the sum are
    /// written with `{:?}` (`1.0`, not `1`): the canonical form OpenMetrics asks of `le`.
    fn histogram(&mut self, labels: &[(&str, &str)], histogram: &Histogram) {
        let (sum, count, buckets) = histogram.snapshot();
        for (bound, cumulative) in buckets {
            let le = if bound.is_finite() {
                format!("{bound:?}")
            } else {
                "+Inf".to_owned()
            };
            self.sample("_bucket", labels, Some(&le), cumulative);
        }
        self.sample("_sum", labels, None, format_args!("{sum:?}"));
        self.sample("_count", labels, None, count);
    }

    fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

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
    for s in services {
        for (endpoint, _) in s.pool.shape().endpoints.iter() {
            let l = [("service", &*s.name), ("endpoint", endpoint.url())];
            e.histogram(&l, &endpoint.stats.duration);
        }
    }

    type EndpointGauge = fn(&crate::balance::Endpoint, u32) -> i64;
    let endpoint_gauges: [(&'static str, &str, EndpointGauge); 3] = [
        (
            "sluice_endpoint_in_flight",
            "Requests in flight at an endpoint",
            |endpoint, _| i64::from(endpoint.in_flight()),
        ),
        (
            "sluice_endpoint_max_concurrent",
            "Concurrency cap of an endpoint",
            |_, cap| i64::from(cap),
        ),
        (
            "sluice_endpoint_healthy",
            "1 unless the endpoint is in its connect-failure back-off",
            |endpoint, _| i64::from(endpoint.is_healthy()),
        ),
    ];
    for (name, help, value) in endpoint_gauges {
        e.family(name, help, Kind::Gauge);
        for s in services {
            for (endpoint, cap) in s.pool.shape().endpoints.iter() {
                let l = [("service", &*s.name), ("endpoint", endpoint.url())];
                e.gauge(&l, value(endpoint, *cap));
            }
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
        "sluice_queue_length",
        "Requests waiting for a slot",
        Kind::Gauge,
    );
    for s in services {
        let waiting = i64::try_from(s.pool.queue_len()).unwrap_or(i64::MAX);
        e.gauge(&[("service", &s.name)], waiting);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_chooses_the_format_by_preference() {
        let cases = [
            (None, Format::Prometheus),
            (Some(""), Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain; version=0.0.4"), Format::Prometheus),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; Version=1.0.0; charset=utf-8"),
                Format::OpenMetrics,
            ),
            // Prometheus 2.42's default.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,\
                     application/openmetrics-text;version=0.0.1;q=0.75,\
                     text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Format::OpenMetrics,
            ),
            // Prometheus with `scrape_protocols` putting the text format first.
            (
                Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"),
                Format::Prometheus,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Prometheus),
            (Some("application/openmetrics-text;q=x"), Format::Prometheus),
            (
                Some("text/plain, application/openmetrics-text"),
                Format::Prometheus,
            ),
        ];
        for (accept, format) in cases {
            assert_eq!(Format::negotiate(accept), format, "{accept:?}");
        }
    }

    #[test]
    fn escaping_follows_each_format() {
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let mut e = Exposition::new(format);
            e.family("x", "a \"b\" \\ c\nd", Kind::Counter);
            e.counter(&[("l", "q\"\\\n")], 1);
            let text = e.finish();
            let (help, eof) = match format {
                Format::Prometheus => (
                    "# HELP x_total a \"b\" \\\\ c\\nd\n# TYPE x_total counter\n",
                    "",
                ),
                Format::OpenMetrics => (
                    "# HELP x a \\\"b\\\" \\\\ c\\nd\n# TYPE x counter\n",
                    "# EOF\n",
                ),
            };
            assert_eq!(
                text,
                format!("{help}x_total{{l=\"q\\\"\\\\\\n\"}} 1\n{eof}")
            );
        }
    }
}
