//! The fleet's shared rate buckets in Redis: the reservation script (one call, atomic, on
//! Redis's clock) and [`SharedBuckets`] for [`Fleet`], which is how limit's leases reach them
//! (limit/lease.rs says why the fleet stays within its limit).

use std::sync::atomic::{AtomicU64, Ordering};

use redis::Script;
use tokio::time::Instant;

use super::redis::{Redis, StoreError};
use super::Fleet;
use crate::config::OnError;
use crate::limit::{Ask, Grant, Reservation, SharedBuckets};

/// Reserve up to ARGV[3] cells from the bucket at KEYS[1]. Times are microseconds on Redis's
/// clock. ARGV: interval (µs per cell, may be fractional), window (burst × interval), cells
/// wanted, seed (how far ahead of now a bucket that does not exist yet starts at least: usage
/// the replica counted locally while Redis was away), owed (cells the replica admitted locally
/// while Redis was away, charged to a bucket that Redis kept), the store generation the
/// replica last saw (0: none).
///
/// KEYS[2] is the store's generation: the Redis time (µs) at which it was first written, and
/// whether a replica found it replaced, that is, Redis lost its data (a restart without
/// persistence, a flush, an eviction). A bucket that does not exist is then told apart: with
/// no loss known it is one that was never used or expired full, and starts full; after a
/// loss it may be one that was lost while empty, so it starts as a bucket that was empty at
/// the loss and has refilled since — whichever replica calls first, however little it used.
/// Returns {granted, retry_after µs, remaining, reset µs, generation}.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local owed = tonumber(ARGV[5])
local seen = ARGV[6]
local gen = redis.call('HMGET', KEYS[2], 'at', 'lost')
local born, lost = gen[1], gen[2] == '1'
if not born then
  born = string.format('%.0f', now)
  lost = seen ~= '0'
  redis.call('HSET', KEYS[2], 'at', born, 'lost', lost and '1' or '0')
elseif seen ~= '0' and seen ~= born and not lost then
  lost = true
  redis.call('HSET', KEYS[2], 'lost', '1')
end
local tat = tonumber(redis.call('GET', KEYS[1]))
local store = false
if not tat then
  tat = now + tonumber(ARGV[4])
  if lost then tat = math.max(tat, tonumber(born) + window) end
  store = true
elseif owed > 0 then
  tat = math.min(math.max(tat, now) + owed * interval, now + window)
  store = true
end
if tat < now then tat = now end
local fit = math.floor((now + window - tat) / interval + 1e-6)
if fit < want then want = fit end
if want < 1 then
  -- A bucket made or charged here is kept even when nothing fits: otherwise it would be
  -- made again from scratch at every call, and a seeded one would refuse forever.
  if store then
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
  return {0, math.ceil(tat + interval - window - now), 0, math.ceil(tat - now), born}
end
tat = math.ceil(tat + want * interval)
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {want, 0, math.floor((now + window - tat) / interval), tat - now, born}
";

/// The reservation script (loaded once per process) and the store generation this replica
/// last saw (see [`RESERVE`]).
#[derive(Debug)]
pub struct Reserver {
    script: Script,
    /// The key of the store's generation.
    generation_key: String,
    /// The generation the last reservation saw; 0 before the first.
    seen: AtomicU64,
}

impl Reserver {
    /// For the store at `redis`.
    pub fn new(redis: &Redis) -> Self {
        Self {
            script: super::redis::script(RESERVE),
            // Cannot be a bucket's key: those have a second unescaped ':' after the service.
            generation_key: redis.key("rate:generation"),
            seen: AtomicU64::new(0),
        }
    }
}

/// Ask the fleet bucket, first charging it with `owed` cells admitted locally.
async fn reserve(
    redis: &Redis,
    reserver: &Reserver,
    ask: Ask<'_>,
    owed: u64,
    deadline: Instant,
) -> Result<Grant, StoreError> {
    let interval_us = 1e6 / f64::from(ask.quota.tps.get());
    let window_us = interval_us * f64::from(ask.quota.burst.get());
    let mut invocation = reserver.script.key(ask.key);
    invocation
        .key(&reserver.generation_key)
        .arg(format!("{interval_us:.3}"))
        .arg(format!("{window_us:.3}"))
        .arg(ask.want)
        .arg(ask.seed_ns / 1000)
        .arg(owed)
        .arg(reserver.seen.load(Ordering::Acquire));
    let reply: Vec<i64> = redis.invoke_by(&invocation, deadline).await?;
    let [granted, retry_us, remaining, reset_us, generation] = reply[..] else {
        return Err(StoreError::Data(format!("reserve answered {reply:?}")));
    };
    reserver
        .seen
        .store(u64::try_from(generation).unwrap_or(0), Ordering::Release);
    let ns = |us: i64| u64::try_from(us).unwrap_or(0).saturating_mul(1000);
    Ok(match u32::try_from(granted) {
        Ok(cells) if cells > 0 => Grant::Cells {
            cells,
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset_ns: ns(reset_us),
        },
        _ => Grant::Refused {
            retry_after_ns: ns(retry_us).max(1),
        },
    })
}

impl SharedBuckets for Fleet {
    fn is_up(&self) -> bool {
        Fleet::is_up(self)
    }

    fn on_error(&self) -> OnError {
        Fleet::on_error(self)
    }

    fn replicas(&self) -> u32 {
        Fleet::replicas(self)
    }

    fn outage(&self) -> u64 {
        self.redis.stats.outages.load(Ordering::Acquire)
    }

    fn count_fallback(&self) {
        self.redis.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    fn timeout(&self) -> std::time::Duration {
        self.redis.timeout()
    }

    fn bucket_key(&self, service: &str, resource: &str) -> String {
        self.rate_key(service, resource)
    }

    fn reserve<'a>(&'a self, ask: Ask<'a>, owed: u64, deadline: Instant) -> Reservation<'a> {
        Box::pin(async move {
            reserve(&self.redis, &self.reserve, ask, owed, deadline)
                .await
                .map_err(Into::into)
        })
    }
}
