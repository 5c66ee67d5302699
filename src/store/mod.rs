//! Where limit state lives. With `backend = "memory"` (the default) everything stays in this
//! process and nothing here runs. With `backend = "redis"`, a [`Fleet`] shares it with every
//! replica that uses the same Redis and key prefix:
//! - rate limits: GCRA buckets in Redis, leased to replicas in small batches (`rate.rs`);
//! - concurrency caps: each replica enforces its share, recomputed from the live replica set
//!   that heartbeats maintain (`members.rs`, shares in `balance::Share`);
//! - the policy (services, limits, admin changes) with a version every replica follows, and
//!   the autoscaled values, written only by the leader (`sync.rs`);
//! - autoscale metrics summed over the fleet (`tally.rs`).
//!
//! What a replica does with it, every heartbeat and policy poll, is the control plane's
//! (`control::fleet`).
//!
//! Nothing on the request path waits on Redis for longer than `store.timeout`; while Redis is
//! unreachable, `store.on_error` decides (see [`OnError`]).

mod members;
mod rate;
mod redis;
mod sync;
mod tally;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::balance::Share;
use crate::config::{OnError, StoreConfig};
pub use redis::{Redis, StoreError, StoreStats, PASSWORD_ENV};
pub use sync::{PolicyDoc, PolicyId, ScaleDoc};
pub use tally::{Counts, Others, Tally};

/// This replica's connection to the fleet's shared state.
#[derive(Debug)]
pub struct Fleet {
    redis: Redis,
    config: StoreConfig,
    id: String,
    reserve: rate::Reserver,
    scripts: sync::Scripts,
    heartbeat: members::Heartbeat,
    /// This replica's share of every cap (read when a policy is built and by admin views).
    share: std::sync::Mutex<Share>,
    /// Live replicas seen at the last heartbeat (at least 1: this one).
    replicas: AtomicU32,
    /// The fencing token while this replica leads autoscaling; 0 otherwise.
    leader_token: AtomicU64,
    /// When it took the lead (or its current token), ms on Redis's clock.
    leading_since_ms: AtomicU64,
    /// The fleet policy this replica follows.
    followed: std::sync::Mutex<sync::Followed>,
}

impl Fleet {
    /// Connect (lazily) to the store `config` names.
    pub fn connect(config: &StoreConfig) -> Result<Arc<Self>, StoreError> {
        let id = match config.replica_id.as_str() {
            "" => default_replica_id(),
            id => id.to_owned(),
        };
        let redis = Redis::connect(config)?;
        Ok(Arc::new(Self {
            heartbeat: members::Heartbeat::new(&redis),
            reserve: rate::Reserver::new(&redis),
            redis,
            config: config.clone(),
            id,
            scripts: sync::Scripts::new(),
            // Not part of the fleet until the first heartbeat says so.
            share: std::sync::Mutex::new(Share::NONE),
            replicas: AtomicU32::new(1),
            leader_token: AtomicU64::new(0),
            leading_since_ms: AtomicU64::new(0),
            followed: std::sync::Mutex::default(),
        }))
    }

    /// This replica's id in the fleet.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The connection.
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// The store settings.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Whether shared limits are in force (the store answered the last call).
    pub fn is_up(&self) -> bool {
        self.redis.is_up()
    }

    /// What to do while the store is unreachable.
    pub fn on_error(&self) -> OnError {
        self.config.on_error
    }

    /// Live replicas, this one included.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Acquire).max(1)
    }

    /// This replica's part of every concurrency cap.
    pub fn share(&self) -> Share {
        *self.share.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take `share` as this replica's part (the control plane also applies it to the pools).
    pub fn set_share(&self, share: Share) {
        *self.share.lock().unwrap_or_else(|p| p.into_inner()) = share;
    }

    /// Whether this replica takes the autoscale steps now.
    pub fn is_leader(&self) -> bool {
        self.leader_token.load(Ordering::Acquire) != 0
    }

    /// The version of the fleet policy in force here (0 before the first sync).
    pub fn policy_version(&self) -> u64 {
        self.policy_id().version
    }

    /// The Redis key of a resource's rate bucket: `rate:{service}:{resource}`, each name with
    /// `\` and `:` escaped by a `\`, so names that contain `:` cannot make two (service,
    /// resource) pairs share a key (`a:b` + `c` and `a` + `b:c`), and names without either
    /// keep the key they always had.
    pub fn rate_key(&self, service: &str, resource: &str) -> String {
        let escape = |name: &str| name.replace('\\', "\\\\").replace(':', "\\:");
        self.redis
            .key(&format!("rate:{}:{}", escape(service), escape(resource)))
    }

    /// How long a replica may miss heartbeats before the others count it gone.
    pub fn member_ttl(&self) -> Duration {
        self.config.heartbeat * 3
    }
}

/// How this replica stands in the fleet, for `/admin/capacity`, `/readyz` and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetView {
    /// "redis".
    pub backend: &'static str,
    /// This replica's id.
    pub replica_id: String,
    /// Whether the store answered the last call.
    pub up: bool,
    /// What applies while it does not: "local", "allow" or "deny".
    pub on_error: OnError,
    /// Live replicas at the last heartbeat.
    pub replicas: u32,
    /// This replica's position among them (sorted by id).
    pub share_index: u32,
    /// False until this replica has been listed for 2 heartbeats (it takes no slots before).
    pub joined: bool,
    /// Whether this replica takes the autoscale steps.
    pub leader: bool,
    /// Version of the fleet policy in force here.
    pub policy_version: u64,
    /// Why this replica refused that version (it runs the policy it had before); admin
    /// changes made on it are refused until it runs the fleet's policy again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_refused: Option<String>,
    /// Store calls made.
    pub calls_total: u64,
    /// Store calls that failed or timed out.
    pub errors_total: u64,
    /// Requests decided by `on_error` while the store was unreachable.
    pub fallbacks_total: u64,
}

impl Fleet {
    /// A snapshot of this replica's standing.
    pub fn view(&self) -> FleetView {
        let share = self.share();
        let stats = &self.redis.stats;
        FleetView {
            backend: "redis",
            replica_id: self.id.clone(),
            up: self.is_up(),
            on_error: self.on_error(),
            replicas: self.replicas(),
            share_index: share.index,
            joined: share.replicas > 0,
            leader: self.is_leader(),
            policy_version: self.policy_version(),
            policy_refused: self.refused_policy().map(|(_, why)| why),
            calls_total: stats.calls.load(Ordering::Relaxed),
            errors_total: stats.errors.load(Ordering::Relaxed),
            fallbacks_total: stats.fallbacks.load(Ordering::Relaxed),
        }
    }
}

/// hostname + pid: unique per process, readable in the admin views.
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "sluice".into());
    format!("{host}-{}", std::process::id())
}
