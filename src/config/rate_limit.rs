//! `[service.rate_limit]` and `[[service.resource]]`: per-resource (API key) TPS limits.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::validate::Problems;

/// SHA-256 of a key: how resources are matched (a `key` is compared by its digest, like a
/// `key_sha256`) and unknown keys tracked.
pub fn key_digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// Highest TPS any limit may be set to: the GCRA emission interval stays ≥ 1 µs.
pub const TPS_CEILING: u32 = 1_000_000;

/// `[service.rate_limit]`: how keys are read and what unknown or missing keys get.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Header carrying the key; `authorization` means `Authorization: Bearer <key>`.
    pub key_header: String,
    /// Limit of a resource that sets none, and of each unknown key.
    pub default_tps: u32,
    /// Ceiling for every resource, autoscale included.
    pub max_tps: u32,
    /// What a key that matches no resource gets.
    pub unknown_keys: UnknownKeys,
    /// What a request without a key gets.
    pub missing_key: MissingKey,
    /// Bound on per-key state for unknown keys (least recently used are evicted).
    pub max_tracked_keys: u32,
    /// Also send `X-RateLimit-Limit/-Remaining/-Reset`.
    pub legacy_headers: bool,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            key_header: "x-api-key".into(),
            default_tps: 10,
            max_tps: 1000,
            unknown_keys: UnknownKeys::Default,
            missing_key: MissingKey::Reject,
            max_tracked_keys: 100_000,
            legacy_headers: false,
        }
    }
}

/// Treatment of keys that match no `[[service.resource]]`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownKeys {
    /// Each unknown key gets its own `default_tps` bucket.
    Default,
    /// 401.
    Reject,
}

/// Treatment of requests without a key.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// 401.
    Reject,
    /// All key-less requests share one `default_tps` bucket named "anonymous".
    Anonymous,
}

/// One `[[service.resource]]`: a named caller with its key and limit.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// Name shown in logs, metrics and responses (the key never is).
    pub name: String,
    /// Hex SHA-256 of the key (the recommended form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// The key itself; hashed at load and never kept or shown.
    #[serde(default, skip_serializing)]
    pub key: Option<String>,
    /// Base limit; default: `default_tps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tps: Option<u32>,
    /// Requests allowed at once above the steady rate; default: one second's worth (`tps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Let the autoscaler raise this resource's limit.
    #[serde(default)]
    pub autoscale: bool,
}

impl ResourceConfig {
    /// SHA-256 of the key: from `key_sha256`, or computed from `key`.
    pub fn key_digest(&self) -> Option<[u8; 32]> {
        match (&self.key_sha256, &self.key) {
            (Some(hex), _) => parse_sha256_hex(hex),
            (None, Some(key)) => Some(key_digest(key.as_bytes())),
            (None, None) => None,
        }
    }
}

/// 64 hex digits → 32 bytes. Strict: hex digits only (`u8::from_str_radix` took a `+` sign,
/// so `+f+f…` passed as a digest).
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex, &mut digest).ok()?;
    Some(digest)
}

/// Name under which requests with unknown keys are counted (keys themselves are never shown).
pub const UNKNOWN_RESOURCE: &str = "unknown";
/// Name of the shared bucket of key-less requests when `missing_key = "anonymous"`.
pub const ANONYMOUS_RESOURCE: &str = "anonymous";
/// Names the limiter gives its built-in buckets; a configured resource may not take one (it
/// would share the bucket, its fleet key and its counters).
pub const BUILT_IN_RESOURCES: [&str; 2] = [UNKNOWN_RESOURCE, ANONYMOUS_RESOURCE];

/// Check a service's rate-limit table and resources; `service` is the key prefix.
pub(super) fn validate(
    p: &mut Problems,
    service: &str,
    config: &RateLimitConfig,
    resources: &[ResourceConfig],
) {
    let key = |field: &str| format!("{service}.rate_limit.{field}");
    if http::HeaderName::from_bytes(config.key_header.as_bytes()).is_err() {
        p.add(
            key("key_header"),
            format!("{:?} is not a valid header name", config.key_header),
        );
    }
    p.range(key("max_tps"), config.max_tps, &(1..=TPS_CEILING));
    p.range(
        key("default_tps"),
        config.default_tps,
        &(1..=config.max_tps.max(1)),
    );
    p.range(
        key("max_tracked_keys"),
        config.max_tracked_keys,
        &(1..=10_000_000),
    );

    let mut names = std::collections::HashMap::new();
    let mut digests = std::collections::HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        let key = |field: &str| format!("{service}.resource[{i}].{field}");
        if r.name.trim().is_empty() {
            p.add(key("name"), "must not be empty");
        }
        if BUILT_IN_RESOURCES.contains(&r.name.as_str()) {
            p.add(
                key("name"),
                format!(
                    "{:?} is the name of a built-in bucket (one of {BUILT_IN_RESOURCES:?}): \
                     a resource of that name would share it; choose another",
                    r.name
                ),
            );
        }
        if let Some(first) = names.insert(r.name.as_str(), i) {
            p.add(
                key("name"),
                format!(
                    "duplicate resource name {:?} (also resource[{first}])",
                    r.name
                ),
            );
        }
        match (&r.key_sha256, &r.key) {
            (Some(_), Some(_)) => p.add(key("key"), "give either key or key_sha256, not both"),
            (None, None) => p.add(
                key("key_sha256"),
                "each resource needs key_sha256 (recommended) or key",
            ),
            (Some(hex), None) if parse_sha256_hex(hex).is_none() => {
                p.add(
                    key("key_sha256"),
                    "must be 64 hex digits (the SHA-256 of the key)",
                );
            }
            (None, Some(k)) if k.is_empty() => p.add(key("key"), "must not be empty"),
            _ => {}
        }
        if let Some(digest) = r.key_digest() {
            if let Some(first) = digests.insert(digest, i) {
                p.add(key("key_sha256"), format!("same key as resource[{first}]"));
            }
        }
        if let Some(tps) = r.tps {
            p.range(key("tps"), tps, &(1..=config.max_tps.max(1)));
        }
        if let Some(burst) = r.burst {
            p.range(key("burst"), burst, &(1..=TPS_CEILING));
        }
    }
}
