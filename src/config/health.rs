//! `[service.health]`: active health checks of a service's endpoints. Without the table an
//! endpoint takes traffic from the moment it joins (passive back-off after refused connects
//! still applies); with it, only once its health path answered 2xx `healthy_after` times in a
//! row, and none after `unhealthy_after` failures in a row, until it recovers.

use std::ops::RangeInclusive;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::Problems;

/// Allowed `interval`: often enough to follow a scale controller, rarely enough to stay cheap.
pub const HEALTH_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);
/// Allowed `healthy_after` and `unhealthy_after`.
pub const HEALTH_COUNT_RANGE: RangeInclusive<u32> = 1..=100;

/// `[service.health]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path probed with GET on every endpoint (under the endpoint's base path), e.g.
    /// `/v2/health/ready`; 2xx is healthy.
    pub path: String,
    /// Time between two probes of one endpoint.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// A probe without an answer's head by then failed; unset: 1s, or `interval` if shorter
    /// (see [`HealthConfig::timeout`]).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Successes in a row that make a new or unhealthy endpoint take traffic.
    #[serde(default = "default_healthy_after")]
    pub healthy_after: u32,
    /// Failures in a row that take an endpoint out of traffic.
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: u32,
}

fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_healthy_after() -> u32 {
    2
}
fn default_unhealthy_after() -> u32 {
    3
}

impl HealthConfig {
    /// How long a probe may take: as set, else 1s or `interval` if shorter (a probe never
    /// outlives the next one's turn).
    pub fn timeout(&self) -> Duration {
        self.timeout
            .unwrap_or(Duration::from_secs(1).min(self.interval))
    }
}

/// Check `health` found at `key` (e.g. `service[0].health`).
pub(super) fn validate(p: &mut Problems, key: &str, health: &HealthConfig) {
    if !health.path.starts_with('/') || health.path.contains(char::is_whitespace) {
        p.add(
            format!("{key}.path"),
            format!(
                "{:?} is not a path; expected one starting with '/', e.g. \"/v2/health/ready\"",
                health.path
            ),
        );
    }
    p.duration_range(
        format!("{key}.interval"),
        health.interval,
        &HEALTH_INTERVAL_RANGE,
    );
    p.duration_range(
        format!("{key}.timeout"),
        health.timeout(),
        &(Duration::from_millis(10)..=health.interval),
    );
    p.range(
        format!("{key}.healthy_after"),
        health.healthy_after,
        &HEALTH_COUNT_RANGE,
    );
    p.range(
        format!("{key}.unhealthy_after"),
        health.unhealthy_after,
        &HEALTH_COUNT_RANGE,
    );
}
