//! `[service.overload]` and `[service.outlier]`: what sluice does when an endpoint says it is
//! full (an answer whose status is in `status`: cool it down for its `Retry-After`, retry the
//! request elsewhere within a budget) and when it keeps failing (eject it for a while, as
//! Envoy's outlier detection does). Both apply with their defaults when the tables are absent.

use std::ops::RangeInclusive;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::Problems;

/// Allowed `cooldown_min` and `cooldown_max`.
pub const COOLDOWN_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);
/// Allowed `retries`.
pub const RETRIES_RANGE: RangeInclusive<u32> = 0..=10;
/// Allowed `retry_buffer` (bytes): a body replayed on a retry is held whole in memory.
pub const RETRY_BUFFER_RANGE: RangeInclusive<u32> = 0..=16 * 1024 * 1024;
/// Allowed `base_ejection` and `max_ejection`.
pub const EJECTION_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

/// `[service.overload]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadConfig {
    /// Endpoint answers that mean "this endpoint is full, it did not process the request".
    pub status: Vec<u16>,
    /// Shortest cooldown, whatever `Retry-After` says.
    #[serde(with = "humantime_serde")]
    pub cooldown_min: Duration,
    /// Longest cooldown, whatever `Retry-After` says.
    #[serde(with = "humantime_serde")]
    pub cooldown_max: Duration,
    /// Further attempts on other endpoints after an overload answer (or a refused connection).
    pub retries: u32,
    /// Bodies up to this many bytes (known in advance) are held so they can be sent again;
    /// larger or streaming ones are passed through and never retried.
    pub retry_buffer: u32,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        Self {
            status: vec![429, 503],
            cooldown_min: Duration::from_secs(1),
            cooldown_max: Duration::from_secs(60),
            retries: 2,
            retry_buffer: 64 * 1024,
        }
    }
}

/// `[service.outlier]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// 5xx answers (other than overload ones), timeouts or broken exchanges in a row that
    /// eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// An ejection lasts this times the number of times the endpoint was ejected.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// The longest an ejection lasts.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Never more than this share of a service's endpoints ejected at once (at least one may
    /// be, when the service has two or more).
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// Check `overload` and `outlier` of the service at `key` (e.g. `service[0]`).
pub(super) fn validate(
    p: &mut Problems,
    key: &str,
    overload: &OverloadConfig,
    outlier: &OutlierConfig,
) {
    for (i, status) in overload.status.iter().enumerate() {
        if !(400..=599).contains(status) {
            p.add(
                format!("{key}.overload.status[{i}]"),
                format!("{status} is not an error status; allowed 400..=599"),
            );
        }
    }
    p.duration_range(
        format!("{key}.overload.cooldown_min"),
        overload.cooldown_min,
        &COOLDOWN_RANGE,
    );
    p.duration_range(
        format!("{key}.overload.cooldown_max"),
        overload.cooldown_max,
        &COOLDOWN_RANGE,
    );
    if overload.cooldown_min > overload.cooldown_max {
        p.add(
            format!("{key}.overload.cooldown_max"),
            "is below cooldown_min",
        );
    }
    p.range(
        format!("{key}.overload.retries"),
        overload.retries,
        &RETRIES_RANGE,
    );
    p.range(
        format!("{key}.overload.retry_buffer"),
        overload.retry_buffer,
        &RETRY_BUFFER_RANGE,
    );
    p.duration_range(
        format!("{key}.outlier.base_ejection"),
        outlier.base_ejection,
        &EJECTION_RANGE,
    );
    p.duration_range(
        format!("{key}.outlier.max_ejection"),
        outlier.max_ejection,
        &EJECTION_RANGE,
    );
    if outlier.base_ejection > outlier.max_ejection {
        p.add(
            format!("{key}.outlier.max_ejection"),
            "is below base_ejection",
        );
    }
    p.range(
        format!("{key}.outlier.consecutive_failures"),
        outlier.consecutive_failures,
        &(0..=1000),
    );
    p.range(
        format!("{key}.outlier.max_ejected_percent"),
        outlier.max_ejected_percent,
        &(0..=100),
    );
}
