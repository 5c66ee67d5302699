//! The live replica set. Every heartbeat a replica stamps its id with Redis's clock in a sorted
//! set and drops ids not stamped for 3 heartbeats; the ids left, sorted, give each replica its
//! position and so its share of every concurrency cap (`balance::Share`).
//!
//! A replica that joins takes no slots until it has been listed for 2 heartbeats (unless it is
//! alone): by then every other replica has seen it (they look every heartbeat) and shrunk its
//! own share, so the sum over the fleet never exceeds a cap while the set grows. A replica that leaves
//! (or dies) keeps its share until its stamp is 3 heartbeats old; the others grow theirs then.
//! A replica shutting down does not remove itself early: its in-flight requests still hold its
//! share while they drain.

use redis::Script;

use super::redis::{Redis, StoreError};
use crate::balance::Share;

/// Stamp ARGV[1] at Redis's time in the set KEYS[1], drop stamps older than ARGV[2] ms, and
/// return every id left with its first-seen time (KEYS[2]) so joiners can be told apart.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSETNX', KEYS[2], ARGV[1], now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
for _, id in ipairs(gone) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 10)
redis.call('PEXPIRE', KEYS[2], ttl * 10)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {tostring(now)}
for _, id in ipairs(ids) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[2], id) or tostring(now))
end
return out
";

/// The replica set as one heartbeat saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// Live ids, sorted.
    pub ids: Vec<String>,
    /// This replica's share of every cap.
    pub share: Share,
}

/// Heartbeats of one replica.
pub struct Heartbeat {
    script: Script,
    set: String,
    joined: String,
}

impl Heartbeat {
    /// Heartbeats under `redis`'s prefix.
    pub fn new(redis: &Redis) -> Self {
        Self {
            script: super::redis::script(HEARTBEAT),
            set: redis.key("replicas"),
            joined: redis.key("replicas:joined"),
        }
    }

    /// Stamp `id`, and work out the live set and `id`'s share; `ttl` is 3 heartbeats, `grace`
    /// how long a new replica waits before it takes slots.
    pub async fn beat(
        &self,
        redis: &Redis,
        id: &str,
        ttl: std::time::Duration,
        grace: std::time::Duration,
    ) -> Result<Members, StoreError> {
        let mut invocation = self.script.key(&self.set);
        invocation
            .key(&self.joined)
            .arg(id)
            .arg(ttl.as_millis() as u64);
        let reply: Vec<String> = redis.invoke(&invocation).await?;
        let now: u64 = parse(reply.first())?;
        let mut ids = Vec::new();
        let mut settled = true;
        for pair in reply[1..].chunks(2) {
            let [member, joined] = pair else {
                return Err(StoreError::Data("odd heartbeat reply".into()));
            };
            if member == id {
                let joined: u64 = joined
                    .parse()
                    .map_err(|_| StoreError::Data(format!("join time {joined:?}")))?;
                settled = now.saturating_sub(joined) >= grace.as_millis() as u64;
            }
            ids.push(member.clone());
        }
        ids.sort();
        // Alone, there is nobody whose share must shrink first.
        settled |= ids.len() == 1;
        let share = match ids.iter().position(|m| m == id) {
            Some(index) if settled => Share {
                index: index as u32,
                replicas: ids.len() as u32,
            },
            _ => Share::NONE,
        };
        Ok(Members { ids, share })
    }
}

fn parse(value: Option<&String>) -> Result<u64, StoreError> {
    value
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| StoreError::Data(format!("heartbeat time {value:?}")))
}
