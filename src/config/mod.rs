//! The configuration file: raw serde structs (unknown keys are errors, durations as "250ms"),
//! loading, and validation that gathers every problem with its key path before answering.

mod cap;
mod changes;
mod health;
mod limits;
mod overload;
mod rate_limit;
mod resolver;
mod store;
mod upstream;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::autoscale::AutoscaleSettings;

pub use cap::{Cap, ADAPTIVE_RANGE, ADAPTIVE_START};
pub use changes::{Changes, ValidConfig};
pub use health::{HealthConfig, HEALTH_COUNT_RANGE, HEALTH_INTERVAL_RANGE};
pub use limits::{Limits, HYPER_DEFAULT_MAX_HEADERS};
pub use overload::{OutlierConfig, OverloadConfig};
pub use rate_limit::{
    key_digest, parse_sha256_hex, MissingKey, RateLimitConfig, ResourceConfig, UnknownKeys,
    ANONYMOUS_RESOURCE, BUILT_IN_RESOURCES, TPS_CEILING, UNKNOWN_RESOURCE,
};
pub use resolver::{
    Resolve, ResolverConfig, RESOLVER_MAX_ENDPOINTS_RANGE, RESOLVER_TIMEOUT_RANGE,
    RESOLVER_TTL_RANGE,
};
pub use store::{Backend, OnError, StoreConfig};
pub use upstream::{load_ca_file, CaFileError, UpstreamConfig};
pub use validate::{validate, ConfigError, MAX_CONCURRENT_RANGE};

/// Where `run` and `check` look when neither `--config` nor `SLUICE_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "config/sluice.toml";

/// `[listen] proxy` by default: every address of both families (the listener turns
/// IPV6_V6ONLY off, and falls back to 0.0.0.0 on a host without IPv6).
pub const DEFAULT_PROXY_LISTEN: &str = "[::]:8080";

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Addresses sluice listens on.
    #[serde(default)]
    pub listen: Listen,
    /// Client- and upstream-side time limits.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// How endpoints are connected to, beyond the timeouts (the CA file for https).
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Bounds on what one client may make the proxy hold (heads, streams, connections).
    #[serde(default)]
    pub limits: Limits,
    /// Where limit state lives: this process, or Redis for a fleet of replicas.
    #[serde(default)]
    pub store: StoreConfig,
    /// How endpoint entries with `resolve` are looked up in DNS.
    #[serde(default)]
    pub resolver: ResolverConfig,
    /// The services requests are routed to, by path prefix.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// `[listen]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Address of the proxy listener, e.g. "[::]:8080" (IPv6 and IPv4).
    pub proxy: String,
    /// Address of the admin listener (API, metrics, dashboard); "" disables it.
    pub admin: String,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            proxy: DEFAULT_PROXY_LISTEN.into(),
            admin: "127.0.0.1:9090".into(),
        }
    }
}

/// `[timeouts]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Upstream TCP connect.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Upstream response headers; past it the client gets a 504.
    #[serde(with = "humantime_serde")]
    pub response: Duration,
    /// The client must finish sending request headers within this time.
    #[serde(with = "humantime_serde")]
    pub client_header: Duration,
    /// A request body from which no byte arrives for this long, while sluice waits for one,
    /// is cut: the endpoint connection is closed and the client gets a 408.
    #[serde(with = "humantime_serde")]
    pub client_body: Duration,
    /// How long in-flight requests may drain on SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            response: Duration::from_secs(60),
            client_header: Duration::from_secs(10),
            client_body: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// How an endpoint is chosen among those with a free slot.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// Uniformly at random.
    #[default]
    Random,
    /// Two random candidates; the one with fewer requests in flight wins.
    P2c,
}

/// One `[[service]]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name, used in logs, metrics and error bodies.
    pub name: String,
    /// Requests go to the service with the longest matching prefix.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// Endpoint choice.
    #[serde(default)]
    pub balance: Balance,
    /// Per-endpoint concurrency cap (each endpoint may override it): a number, or `"auto"`
    /// to learn each endpoint's.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: Cap,
    /// Lowest cap an endpoint with `max_concurrent = "auto"` learns.
    #[serde(
        default = "default_adaptive_min",
        skip_serializing_if = "is_adaptive_min"
    )]
    pub adaptive_min: u32,
    /// Highest cap an endpoint with `max_concurrent = "auto"` learns.
    #[serde(
        default = "default_adaptive_max",
        skip_serializing_if = "is_adaptive_max"
    )]
    pub adaptive_max: u32,
    /// Optional cap on the sum of in-flight requests over all endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_max_concurrent: Option<u32>,
    /// Requests allowed to wait for a free slot; 0 rejects at once.
    #[serde(default)]
    pub queue_size: u32,
    /// How long a queued request waits before its 429.
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// The scoring endpoints behind this service.
    pub endpoints: Vec<EndpointConfig>,
    /// Per-key rate limiting; off when neither this table nor any resource is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// Named callers and their limits.
    #[serde(default, rename = "resource", skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceConfig>,
    /// Autoscale settings; with none, resources with `autoscale = true` use the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSettings>,
    /// An endpoint that joins the running service, or passes its health check again, has its
    /// cap ramped from 1 to full over this time; none: full at once.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_start: Option<Duration>,
    /// Active health checks of the endpoints; with none, an endpoint takes traffic at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    /// What an answer that says "this endpoint is full" does: cooldown, retries elsewhere.
    #[serde(default, skip_serializing_if = "is_default")]
    pub overload: OverloadConfig,
    /// When an endpoint that keeps failing is ejected for a while.
    #[serde(default, skip_serializing_if = "is_default")]
    pub outlier: OutlierConfig,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// An endpoint: either a bare URL or a table with its own cap.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum EndpointConfig {
    /// `"http://host:port"`
    Url(String),
    /// `{ url = "...", max_concurrent = 50 }`
    Table(EndpointTable),
}

/// The table form of an endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointTable {
    /// Base URL, http or https.
    pub url: String,
    /// This endpoint's cap (a number or `"auto"`); default: the service's `max_concurrent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<Cap>,
    /// Whether the URL's host is looked up in DNS and stands for every endpoint it names.
    #[serde(default, skip_serializing_if = "Resolve::is_off")]
    pub resolve: Resolve,
    /// Added through the admin API (not from the file): what `/admin/capacity` calls its
    /// source. A reload from the file drops it unless the file lists it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// A string is a URL, a table an [`EndpointTable`] whose own errors are reported (an unknown
/// key, a `resolve` that is not `true`, `false` or `"srv"`), rather than serde's "data did
/// not match any variant".
impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = EndpointConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a URL \"http://host:port\" or a table { url = \"...\", ... }")
            }
            fn visit_str<E: serde::de::Error>(self, url: &str) -> Result<Self::Value, E> {
                Ok(EndpointConfig::Url(url.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                EndpointTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(EndpointConfig::Table)
            }
        }
        d.deserialize_any(Entry)
    }
}

impl EndpointConfig {
    /// The endpoint's base URL.
    pub fn url(&self) -> &str {
        match self {
            Self::Url(url) => url,
            Self::Table(t) => &t.url,
        }
    }

    /// The endpoint's own cap, if it sets one.
    pub fn max_concurrent(&self) -> Option<Cap> {
        match self {
            Self::Url(_) => None,
            Self::Table(t) => t.max_concurrent,
        }
    }

    /// Whether its host is looked up in DNS.
    pub fn resolve(&self) -> Resolve {
        match self {
            Self::Url(_) => Resolve::Off,
            Self::Table(t) => t.resolve,
        }
    }

    /// Whether it was added through the admin API.
    pub fn from_admin(&self) -> bool {
        matches!(self, Self::Table(t) if t.admin)
    }
}

impl ServiceConfig {
    /// Cap of endpoint `i`: its own, else the service's.
    pub fn endpoint_cap(&self, i: usize) -> Cap {
        self.endpoints[i]
            .max_concurrent()
            .unwrap_or(self.max_concurrent)
    }

    /// What a learned cap stays within.
    pub fn adaptive_bounds(&self) -> std::ops::RangeInclusive<u32> {
        self.adaptive_min..=self.adaptive_max
    }

    /// The rate-limit settings in force, if rate limiting is on for this service.
    pub fn rate_limit(&self) -> Option<RateLimitConfig> {
        match (&self.rate_limit, self.resources.is_empty()) {
            (Some(config), _) => Some(config.clone()),
            (None, false) => Some(RateLimitConfig::default()),
            (None, true) => None,
        }
    }

    /// The autoscale settings in force, if anything in the service autoscales: the
    /// `[service.autoscale]` table, or its defaults when only resources ask for autoscale.
    pub fn autoscale(&self) -> Option<AutoscaleSettings> {
        match (&self.autoscale, self.resources.iter().any(|r| r.autoscale)) {
            (Some(settings), _) => Some(settings.clone()),
            (None, true) => Some(AutoscaleSettings::default()),
            (None, false) => None,
        }
    }

    /// min(cluster_max_concurrent, Σ caps of the endpoints it lists, a learned one where it
    /// starts); names to look up in DNS count for nothing here (what they bring is known only
    /// once resolved).
    pub fn effective_capacity(&self) -> u64 {
        let sum: u64 = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].resolve().is_off())
            .map(|i| u64::from(self.endpoint_cap(i).initial(self.adaptive_bounds())))
            .sum();
        self.cluster_max_concurrent
            .map_or(sum, |c| sum.min(u64::from(c)))
    }
}

fn default_prefix() -> String {
    "/".into()
}
fn default_max_concurrent() -> Cap {
    Cap::Fixed(20)
}
fn default_adaptive_min() -> u32 {
    *ADAPTIVE_RANGE.start()
}
fn default_adaptive_max() -> u32 {
    *ADAPTIVE_RANGE.end()
}
fn is_adaptive_min(n: &u32) -> bool {
    *n == default_adaptive_min()
}
fn is_adaptive_max(n: &u32) -> bool {
    *n == default_adaptive_max()
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// The file parsed but some values are out of range or inconsistent.
    #[error("{}", invalid_lines(path, errors))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        errors: Vec<ConfigError>,
    },
}

fn invalid_lines(path: &Path, errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {e}", path.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Parse TOML text (no validation).
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<ValidConfig, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|e| LoadError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', "\n    "),
        })?;
        config.validated().map_err(|errors| LoadError::Invalid {
            path: path.to_owned(),
            errors,
        })
    }

    /// One-line summary for `sluice check` and the startup log.
    pub fn summary(&self) -> String {
        let entries = || self.services.iter().flat_map(|s| &s.endpoints);
        let names = entries().filter(|e| !e.resolve().is_off()).count();
        let endpoints = entries().count() - names;
        let capacity: u64 = self.services.iter().map(|s| s.effective_capacity()).sum();
        let discovered = match names {
            0 => String::new(),
            n => format!(" and {n} name(s) to look up in DNS (not counted in the slots)"),
        };
        let learned = self
            .services
            .iter()
            .flat_map(|s| (0..s.endpoints.len()).map(|i| s.endpoint_cap(i)))
            .filter(|cap| *cap == Cap::Auto)
            .count();
        let learned = match learned {
            0 => String::new(),
            n => format!(" ({n} learned cap(s) counted where they start)"),
        };
        format!(
            "{} service(s), {endpoints} endpoint(s){discovered}, {capacity} concurrent slot(s) \
             in all{learned}, proxy on {}",
            self.services.len(),
            self.listen.proxy
        )
    }
}
