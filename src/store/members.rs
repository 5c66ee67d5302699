//! The live replica set. Every heartbeat a replica stamps its id with Redis's clock in a sorted
//! set and drops ids not stamped for 3 heartbeats; the ids left, sorted, give each replica its
//! position and so its share of every concurrency cap (`balance::Share`).
//!
//! A replica that joins takes no slots until it has been listed for 2 heartbeats (unless it is
//! alone): by then every other replica has seen it (they look every heartbeat). Once it has
//! taken slots it keeps its standing across a store outage or restart.
//!
//! A replica that leaves (or dies) keeps its share until its stamp is 3 heartbeats old; the
//! others grow theirs then. A replica shutting down does not remove itself early: its
//! in-flight requests still hold its share while they drain.
//!
//! Whenever this replica's position changes it holds the earlier one for 2 more heartbeats
//! and takes the smaller part under either (`balance::Share`): it shrinks at once and grows
//! only when every other replica has seen the same change, so the parts the replicas admit
//! by never add up to more than a cap, whatever mix of old and new views they hold. What a
//! smaller part does not do is recall requests already in flight: a replica whose part
//! shrank starts no new request at that endpoint until its in-flight count is below the new
//! part, and the ones above it finish; until they do, the endpoint can have more than its
//! cap in flight by at most that excess.
//!
//! Each replica also keeps its own view: when each member is due to be counted gone. A member
//! missing from Redis is kept until then, and while this replica cannot reach the store the
//! view is frozen (nobody is due while there is no news). So a Redis restart (which empties the
//! set) or a hang (after which the first replica back would prune the others) does not make
//! a replica believe it is alone and take the whole of every cap.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::Script;

use super::redis::{Redis, StoreError};
use crate::balance::Share;

/// Stamp ARGV[1] at Redis's time in the set KEYS[1], drop stamps older than ARGV[2] ms, and
/// return Redis's time, then each id left with its stamp and first-seen time (KEYS[2]).
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
local ids = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {tostring(now)}
for i = 1, #ids, 2 do
  table.insert(out, ids[i])
  table.insert(out, ids[i + 1])
  table.insert(out, redis.call('HGET', KEYS[2], ids[i]) or tostring(now))
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

/// This replica's own view of the set.
#[derive(Debug, Default)]
struct View {
    /// When each member is due to be counted gone, unless stamped again.
    due: HashMap<String, Instant>,
    /// Taken slots once (stays so across store outages).
    settled: bool,
    /// The last heartbeat that reached the store.
    last_ok: Option<Instant>,
    /// This replica's position at the last heartbeat.
    position: Option<Share>,
    /// Earlier positions the other replicas may still see, with the heartbeats left to hold
    /// each (see `balance::Share`).
    held: Vec<(Share, u32)>,
}

/// Heartbeats an earlier view is held after it changed here: every other replica sees a
/// change within one heartbeat of it (a joiner's stamp at its next beat; a dead member's
/// stamp ages out by the same Redis time everywhere, within one heartbeat's jitter), so after
/// two, none can still be on the old view.
const HOLD_BEATS: u32 = 2;

impl View {
    /// This beat's position `plain`, holding the earlier ones still in force.
    fn hold(&mut self, plain: Share) -> Share {
        for (_, left) in &mut self.held {
            *left = left.saturating_sub(1);
        }
        self.held.retain(|&(_, left)| left > 0);
        if let Some(before) = self.position.replace(plain) {
            // No slots before (not joined yet): nothing to hold; the join grace already let
            // every other replica shrink first.
            if before != plain && before.replicas > 0 {
                self.held.push((before, HOLD_BEATS));
            }
        }
        // At most one change per beat, each held for HOLD_BEATS: never more than HELD; if
        // ever, the oldest goes (the newest are the ones others most likely still see).
        while self.held.len() > crate::balance::HELD {
            self.held.remove(0);
        }
        let mut share = plain;
        for (slot, (before, _)) in share.held.iter_mut().zip(&self.held) {
            *slot = Some((before.index, before.replicas));
        }
        share
    }
}

/// Heartbeats of one replica.
#[derive(Debug)]
pub struct Heartbeat {
    script: Script,
    set: String,
    joined: String,
    view: Mutex<View>,
}

impl Heartbeat {
    /// Heartbeats under `redis`'s prefix.
    pub fn new(redis: &Redis) -> Self {
        Self {
            script: super::redis::script(HEARTBEAT),
            set: redis.key("replicas"),
            joined: redis.key("replicas:joined"),
            view: Mutex::new(View::default()),
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        // A few maps updated whole by one task; a panic elsewhere leaves them usable.
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stamp `id`, and work out the live set and `id`'s share; `ttl` is 3 heartbeats, `grace`
    /// how long a new replica waits before it takes slots.
    pub async fn beat(
        &self,
        redis: &Redis,
        id: &str,
        ttl: Duration,
        grace: Duration,
    ) -> Result<Members, StoreError> {
        let mut invocation = self.script.key(&self.set);
        invocation
            .key(&self.joined)
            .arg(id)
            .arg(ttl.as_millis() as u64);
        let reply: Vec<String> = redis.invoke(&invocation).await?;
        let redis_now: u64 = number(reply.first())?;
        let now = Instant::now();
        let mut view = self.view();
        let mut joined_long_ago = false;
        for triple in reply[1..].chunks(3) {
            let [member, stamp, joined] = triple else {
                return Err(StoreError::Data(
                    "heartbeat reply of the wrong shape".into(),
                ));
            };
            let age = Duration::from_millis(redis_now.saturating_sub(number(Some(stamp))?));
            view.due
                .insert(member.clone(), now + ttl.saturating_sub(age));
            if member == id {
                let joined = number(Some(joined))?;
                joined_long_ago = redis_now.saturating_sub(joined) >= grace.as_millis() as u64;
            }
        }
        view.due.retain(|_, due| *due > now);
        view.last_ok = Some(now);
        let mut ids: Vec<String> = view.due.keys().cloned().collect();
        ids.sort();
        // Alone, there is nobody whose share must shrink first.
        view.settled |= joined_long_ago || ids.len() == 1;
        let plain = match ids.iter().position(|m| m == id) {
            Some(index) if view.settled => Share::at(index as u32, ids.len() as u32),
            _ => Share::NONE,
        };
        let share = view.hold(plain);
        Ok(Members { ids, share })
    }

    /// A heartbeat did not reach the store: nobody is due to be counted gone while there is
    /// no news. Returns how long this replica has been cut off (since its last heartbeat that
    /// reached the store; `None` if none ever did).
    pub fn missed(&self, ttl: Duration) -> Option<Duration> {
        let now = Instant::now();
        let mut view = self.view();
        for due in view.due.values_mut() {
            *due = (*due).max(now + ttl);
        }
        view.last_ok.map(|at| now.duration_since(at))
    }

    /// Give up this replica's standing: it joins again (with the grace) when it next reaches
    /// the store.
    pub fn leave(&self) {
        self.view().settled = false;
    }
}

fn number(value: Option<&String>) -> Result<u64, StoreError> {
    value
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| StoreError::Data(format!("heartbeat number {value:?}")))
}
