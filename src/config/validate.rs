//! Semantic checks on a parsed config. Every problem is collected with its key path, so
//! `sluice check` can list them all at once instead of one per run.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::Config;

/// Allowed `slow_start`.
pub const SLOW_START_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// Allowed per-endpoint concurrency cap (managed scoring endpoints allow at most 200).
pub const MAX_CONCURRENT_RANGE: RangeInclusive<u32> = 1..=200;

/// Allowed `timeouts.client_body`: shorter than 100 ms would cut healthy uploads over any
/// real network; longer than an hour is no bound.
pub const CLIENT_BODY_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);

/// One problem in a config: the key it concerns and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `service[0].max_concurrent`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl ConfigError {
    /// A problem at `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Collects problems; keeps the call sites short.
#[derive(Default)]
pub(super) struct Problems(Vec<ConfigError>);

impl Problems {
    pub(super) fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(key, message));
    }

    pub(super) fn range(
        &mut self,
        key: impl Into<String>,
        value: u32,
        range: &RangeInclusive<u32>,
    ) {
        if !range.contains(&value) {
            self.add(
                key,
                format!(
                    "{value} is out of range; allowed {}..={}",
                    range.start(),
                    range.end()
                ),
            );
        }
    }

    /// `value` within `range`, else "out of range; allowed LOW..=HIGH" in the config's own
    /// duration syntax.
    pub(super) fn duration_range(
        &mut self,
        key: impl Into<String>,
        value: Duration,
        range: &RangeInclusive<Duration>,
    ) {
        if !range.contains(&value) {
            let show = |d: Duration| humantime::format_duration(d).to_string();
            self.add(
                key,
                format!(
                    "{} is out of range; allowed {}..={}",
                    show(value),
                    show(*range.start()),
                    show(*range.end())
                ),
            );
        }
    }

    pub(super) fn positive(&mut self, key: impl Into<String>, value: Duration) {
        if value.is_zero() {
            self.add(key, "must be greater than 0 (e.g. \"500ms\", \"2s\")");
        }
    }
}

/// Check everything a parsed config promises; `Err` lists every problem found.
pub fn validate(config: &Config) -> Result<(), Vec<ConfigError>> {
    let mut p = Problems::default();

    if config.listen.proxy.parse::<SocketAddr>().is_err() {
        p.add(
            "listen.proxy",
            format!(
                "{:?} is not a socket address; expected IP:PORT such as \"[::]:8080\" or \"0.0.0.0:8080\"",
                config.listen.proxy
            ),
        );
    }
    let admin = &config.listen.admin;
    if !admin.is_empty() && admin.parse::<SocketAddr>().is_err() {
        p.add(
            "listen.admin",
            format!("{admin:?} is not a socket address; expected IP:PORT such as \"127.0.0.1:9090\", or \"\" to disable"),
        );
    }
    let t = &config.timeouts;
    p.positive("timeouts.connect", t.connect);
    p.positive("timeouts.response", t.response);
    p.positive("timeouts.client_header", t.client_header);
    p.duration_range(
        "timeouts.client_body",
        t.client_body,
        &CLIENT_BODY_TIMEOUT_RANGE,
    );
    p.positive("timeouts.shutdown_grace", t.shutdown_grace);
    super::upstream::validate(&mut p, &config.upstream);
    super::resolver::validate(&mut p, &config.resolver);
    super::limits::validate(&mut p, &config.limits);
    super::store::validate(&mut p, &config.store);

    if config.services.is_empty() {
        p.add("service", "at least one [[service]] is required");
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut prefixes: HashMap<&str, usize> = HashMap::new();
    for (i, s) in config.services.iter().enumerate() {
        let key = |field: &str| format!("service[{i}].{field}");
        if s.name.trim().is_empty() {
            p.add(key("name"), "must not be empty");
        }
        if let Some(first) = names.insert(&s.name, i) {
            p.add(
                key("name"),
                format!(
                    "duplicate service name {:?} (also service[{first}])",
                    s.name
                ),
            );
        }
        if !s.path_prefix.starts_with('/') {
            p.add(
                key("path_prefix"),
                format!("{:?} must start with '/'", s.path_prefix),
            );
        }
        if let Some(first) = prefixes.insert(&s.path_prefix, i) {
            p.add(
                key("path_prefix"),
                format!(
                    "duplicate path_prefix {:?} (also service[{first}])",
                    s.path_prefix
                ),
            );
        }
        super::cap::validate(&mut p, &format!("service[{i}]"), s);
        if let Some(c) = s.cluster_max_concurrent {
            p.range(key("cluster_max_concurrent"), c, &(1..=u32::MAX));
        }
        if s.queue_size > 0 {
            p.positive(key("queue_timeout"), s.queue_timeout);
        }
        let mut urls: HashMap<&str, usize> = HashMap::new();
        for (j, e) in s.endpoints.iter().enumerate() {
            let ekey = format!("service[{i}].endpoints[{j}]");
            match check_endpoint_url(e.url()) {
                Ok(uri) => super::resolver::validate_entry(&mut p, &ekey, &uri, e.resolve()),
                Err(why) => p.add(format!("{ekey}.url"), why),
            }
            if let Some(first) = urls.insert(e.url(), j) {
                p.add(
                    format!("{ekey}.url"),
                    format!("duplicate endpoint {:?} (also endpoints[{first}])", e.url()),
                );
            }
        }
        if let Some(ramp) = s.slow_start {
            p.duration_range(key("slow_start"), ramp, &SLOW_START_RANGE);
        }
        if let Some(health) = &s.health {
            super::health::validate(&mut p, &key("health"), health);
        }
        super::overload::validate(&mut p, &format!("service[{i}]"), &s.overload, &s.outlier);
        let rate_limit = s.rate_limit.clone().unwrap_or_default();
        super::rate_limit::validate(&mut p, &format!("service[{i}]"), &rate_limit, &s.resources);
        if let Some(settings) = &s.autoscale {
            let key = format!("service[{i}].autoscale");
            let found = crate::autoscale::validate(settings, &key, rate_limit.max_tps);
            p.0.extend(
                found
                    .into_iter()
                    .map(|a| ConfigError::new(a.key, a.message)),
            );
        }
    }

    if p.0.is_empty() {
        Ok(())
    } else {
        Err(p.0)
    }
}

/// An endpoint is an absolute http(s) URL with a host and no query or fragment.
fn check_endpoint_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a valid URL ({e}); expected http://host:port"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{url:?} must be an http:// or https:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        // Credentials in a URL would travel nowhere useful and show up in logs and views.
        return Err(
            "credentials in endpoint URLs are not supported; expected http://host:port".into(),
        );
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} must not have a query string"));
    }
    Ok(uri)
}
