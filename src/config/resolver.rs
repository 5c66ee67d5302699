//! `[resolver]`: how endpoint entries with `resolve` are looked up in DNS — which servers,
//! how long a lookup may take, how often names are looked up again, and how many addresses
//! one name may bring. And `resolve` itself, the key of an endpoint entry.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::validate::Problems;

/// Allowed `timeout` of one lookup.
pub const RESOLVER_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(30);
/// Allowed `min_ttl` and `max_ttl`: a name is looked up again at most this often and at least
/// this rarely, whatever its records' TTL says.
pub const RESOLVER_TTL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);
/// Allowed `max_endpoints` (a scale controller's instance limit is 200 by default).
pub const RESOLVER_MAX_ENDPOINTS_RANGE: RangeInclusive<u32> = 1..=10_000;

/// `[resolver]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// DNS servers as `ip` or `ip:port` (port 53 when omitted); empty: the system's
    /// (`/etc/resolv.conf`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// How long one lookup may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A name is looked up again no sooner than this, even when its TTL is shorter (or 0).
    #[serde(with = "humantime_serde")]
    pub min_ttl: Duration,
    /// A name is looked up again no later than this, even when its TTL is longer.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Most endpoints one name stands for; a larger answer is cut (lowest addresses kept).
    pub max_endpoints: u32,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(30),
            max_endpoints: 200,
        }
    }
}

impl ResolverConfig {
    /// The configured servers as socket addresses; `None` for one that is not an address
    /// (validation refuses those first).
    pub fn nameserver_addrs(&self) -> Vec<Option<SocketAddr>> {
        self.nameservers.iter().map(|s| nameserver(s)).collect()
    }

    /// When a name whose records live `ttl` is looked up next: `ttl` within
    /// `min_ttl..=max_ttl`.
    pub fn next_lookup(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl))
    }
}

fn nameserver(text: &str) -> Option<SocketAddr> {
    text.parse::<SocketAddr>().ok().or_else(|| {
        text.parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

pub(super) fn validate(p: &mut Problems, resolver: &ResolverConfig) {
    for (i, (text, addr)) in resolver
        .nameservers
        .iter()
        .zip(resolver.nameserver_addrs())
        .enumerate()
    {
        if addr.is_none() {
            p.add(
                format!("resolver.nameservers[{i}]"),
                format!("{text:?} is not an address; expected \"ip\" or \"ip:port\", e.g. \"10.96.0.10:53\""),
            );
        }
    }
    p.duration_range(
        "resolver.timeout",
        resolver.timeout,
        &RESOLVER_TIMEOUT_RANGE,
    );
    p.duration_range("resolver.min_ttl", resolver.min_ttl, &RESOLVER_TTL_RANGE);
    p.duration_range("resolver.max_ttl", resolver.max_ttl, &RESOLVER_TTL_RANGE);
    if resolver.min_ttl > resolver.max_ttl {
        p.add(
            "resolver.max_ttl",
            format!(
                "{} is below min_ttl ({})",
                humantime::format_duration(resolver.max_ttl),
                humantime::format_duration(resolver.min_ttl)
            ),
        );
    }
    p.range(
        "resolver.max_endpoints",
        resolver.max_endpoints,
        &RESOLVER_MAX_ENDPOINTS_RANGE,
    );
}

/// An endpoint entry's `resolve`: `false` (the default: the URL is one endpoint), `true`
/// (every A/AAAA address of the URL's host is one) or `"srv"` (every SRV target and port of
/// the URL's host is one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resolve {
    /// The URL is the endpoint.
    #[default]
    Off,
    /// One endpoint per address of the host.
    Addresses,
    /// One endpoint per SRV target and port of the host.
    Srv,
}

impl Resolve {
    /// True for `false`, so it is left out when written back.
    pub fn is_off(&self) -> bool {
        *self == Self::Off
    }
}

impl<'de> Deserialize<'de> for Resolve {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(false) => Ok(Self::Off),
            Raw::Bool(true) => Ok(Self::Addresses),
            Raw::Text(t) if t == "srv" => Ok(Self::Srv),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "resolve = {t:?}: expected true, false or \"srv\""
            ))),
        }
    }
}

impl Serialize for Resolve {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Off => s.serialize_bool(false),
            Self::Addresses => s.serialize_bool(true),
            Self::Srv => s.serialize_str("srv"),
        }
    }
}

/// Check endpoint entry `key` whose URL `uri` asks to be resolved as `resolve`.
pub(super) fn validate_entry(p: &mut Problems, key: &str, uri: &http::Uri, resolve: Resolve) {
    if resolve == Resolve::Off {
        return;
    }
    if uri.scheme_str() != Some("http") {
        p.add(
            format!("{key}.resolve"),
            "works with http:// URLs only: an https endpoint found by DNS would need its \
             certificate checked against the name while connecting to an address, which sluice \
             does not do",
        );
    }
    let host = uri.host().unwrap_or_default();
    if host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
    {
        p.add(
            format!("{key}.resolve"),
            format!("{host:?} is an address, not a name to look up; drop resolve"),
        );
    }
    if resolve == Resolve::Srv && uri.port().is_some() {
        p.add(
            format!("{key}.url"),
            "with resolve = \"srv\" the port comes from the SRV records; drop it from the URL",
        );
    }
}
