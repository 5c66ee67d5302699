//! `[store]`: where limit state lives. "memory" (the default) keeps it in this process;
//! "redis" shares it with every replica that points at the same Redis and key prefix.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::Problems;

/// Longest `timeout`: a store call on the request path must stay far below a response time.
pub const MAX_STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// Allowed `heartbeat`: short enough that a dead replica's share returns in seconds, long
/// enough that the heartbeat writes stay negligible.
pub const HEARTBEAT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));

/// Where limit state lives.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process only.
    #[default]
    Memory,
    /// In Redis, shared by every replica with the same `url` and `key_prefix`.
    Redis,
}

/// What a replica does while the store cannot be reached.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Enforce this replica's share of every limit locally.
    #[default]
    Local,
    /// Admit every request that passes the other checks (fail open).
    Allow,
    /// Refuse rate-limited requests with 503 `store_unavailable` (fail closed).
    Deny,
}

impl OnError {
    /// The value as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// "memory" or "redis".
    pub backend: Backend,
    /// `redis://[:password@]host:port[/db]` or `rediss://...` (TLS).
    pub url: String,
    /// Prepended to every key sluice writes, so several fleets can share one Redis.
    pub key_prefix: String,
    /// A store call that takes longer counts as an error; no request waits longer on it.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// What to do while the store is unreachable.
    pub on_error: OnError,
    /// This replica's name in the fleet; "" means hostname + pid.
    pub replica_id: String,
    /// How often a replica says it is alive; one missing for 3 heartbeats is gone.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "sluice:".into(),
            timeout: Duration::from_millis(20),
            on_error: OnError::Local,
            replica_id: String::new(),
            heartbeat: Duration::from_secs(1),
        }
    }
}

pub(super) fn validate(p: &mut Problems, store: &StoreConfig) {
    if store.backend == Backend::Memory {
        return;
    }
    match store.url.split_once("://") {
        Some(("redis" | "rediss", rest)) if !rest.is_empty() => {}
        _ => p.add(
            "store.url",
            "must be a redis:// or rediss:// URL, e.g. \"redis://127.0.0.1:6379\"",
        ),
    }
    if store.key_prefix.is_empty() {
        p.add(
            "store.key_prefix",
            "must not be empty (e.g. \"sluice:\"): it keeps sluice's keys apart",
        );
    }
    if store.timeout.is_zero() || store.timeout > MAX_STORE_TIMEOUT {
        p.add(
            "store.timeout",
            format!(
                "{} is out of range; allowed 1ms..=1s",
                humantime::format_duration(store.timeout)
            ),
        );
    }
    let (low, high) = HEARTBEAT_RANGE;
    if store.heartbeat < low || store.heartbeat > high {
        p.add(
            "store.heartbeat",
            format!(
                "{} is out of range; allowed 100ms..=60s",
                humantime::format_duration(store.heartbeat)
            ),
        );
    }
    if store.replica_id.len() > 128 || store.replica_id.chars().any(char::is_control) {
        p.add(
            "store.replica_id",
            "must be at most 128 characters without control characters",
        );
    }
}
