//! An endpoint's concurrency cap as the config writes it — a number, or `"auto"`: learned per
//! endpoint from its latency, within the service's `adaptive_min`..`adaptive_max`, starting
//! at [`ADAPTIVE_START`] — and the checks of those keys.

use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use super::validate::{Problems, MAX_CONCURRENT_RANGE};
use super::ServiceConfig;

/// Where a learned cap starts: the usual default of a managed scoring endpoint (and of
/// Netflix's Gradient2), inside the service's bounds.
pub const ADAPTIVE_START: u32 = 20;
/// Allowed `adaptive_min` and `adaptive_max`: those of a fixed cap.
pub const ADAPTIVE_RANGE: RangeInclusive<u32> = MAX_CONCURRENT_RANGE;

/// A `max_concurrent`: a fixed number of requests in flight, or learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// This many requests at once.
    Fixed(u32),
    /// Learned per endpoint (`"auto"`).
    Auto,
}

impl Cap {
    /// The number, when it is fixed.
    pub fn fixed(self) -> Option<u32> {
        match self {
            Self::Fixed(n) => Some(n),
            Self::Auto => None,
        }
    }

    /// The number it stands for before anything is learned: a fixed cap, or where a learned
    /// one starts within `bounds`.
    pub fn initial(self, bounds: RangeInclusive<u32>) -> u32 {
        match self {
            Self::Fixed(n) => n,
            Self::Auto => ADAPTIVE_START.clamp(*bounds.start(), *bounds.end()),
        }
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Auto => f.write_str("\"auto\""),
        }
    }
}

impl Serialize for Cap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Fixed(n) => s.serialize_u32(*n),
            Self::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Cap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Cap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of requests or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Cap, E> {
                u32::try_from(n)
                    .map(Cap::Fixed)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(n), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Cap, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Cap, E> {
                match s {
                    "auto" => Ok(Cap::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The caps of service `i` (`key` names it): fixed ones within [`MAX_CONCURRENT_RANGE`], the
/// learning bounds within [`ADAPTIVE_RANGE`] and in order, and no autoscale rule that would
/// change a learned cap.
pub(super) fn validate(p: &mut Problems, key: &str, s: &ServiceConfig) {
    if let Cap::Fixed(n) = s.max_concurrent {
        p.range(format!("{key}.max_concurrent"), n, &MAX_CONCURRENT_RANGE);
    }
    for (j, e) in s.endpoints.iter().enumerate() {
        if let Some(Cap::Fixed(n)) = e.max_concurrent() {
            let ekey = format!("{key}.endpoints[{j}].max_concurrent");
            p.range(ekey, n, &MAX_CONCURRENT_RANGE);
        }
    }
    p.range(
        format!("{key}.adaptive_min"),
        s.adaptive_min,
        &ADAPTIVE_RANGE,
    );
    p.range(
        format!("{key}.adaptive_max"),
        s.adaptive_max,
        &ADAPTIVE_RANGE,
    );
    if s.adaptive_min > s.adaptive_max {
        p.add(
            format!("{key}.adaptive_min"),
            format!(
                "{} is above adaptive_max ({})",
                s.adaptive_min, s.adaptive_max
            ),
        );
    }
    let follows_rules = s.autoscale.as_ref().is_some_and(|a| {
        a.profiles
            .iter()
            .flat_map(|p| &p.rules)
            .any(|r| r.target == crate::autoscale::Target::EndpointConcurrency)
    });
    if s.max_concurrent == Cap::Auto && follows_rules {
        p.add(
            format!("{key}.max_concurrent"),
            "\"auto\" learns each endpoint's cap, which an autoscale rule with target \
             endpoint_concurrency would also change; set a number, or drop the rule"
                .to_owned(),
        );
    }
}
