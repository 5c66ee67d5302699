//! Fleet-wide rate limits without a store call per request. The GCRA bucket of each resource
//! lives in Redis (one script, atomic, on Redis's clock); a replica reserves a small *batch*
//! of cells from it at a time and admits from that lease locally.
//!
//! Why the fleet stays within its limit: every admitted request spent a cell that the Redis
//! bucket granted, so over any run the fleet admits at most `tps × time + burst`. A lease
//! lives at most [`LEASE_TTL`], so over a short window the fleet can run ahead by at most the
//! cells leased in the `LEASE_TTL` before it. Cells a replica leased but did not use before
//! the lease ended are lost (the fleet admits a little *less*, never more); the batch adapts
//! to each replica's demand (doubling while leases run out fast, halving when they expire
//! unused) and is capped so one replica never holds more than its share of the burst.
//!
//! A refusal from Redis says exactly when the next cell is due; until then the replica refuses
//! locally, so throttled traffic costs no store calls either.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use redis::Script;

use super::redis::{Redis, StoreError};
use crate::limit::{Bucket, Quota, Verdict};

/// How long leased cells may be used. Short, so a lease cannot carry old allowance far.
pub const LEASE_TTL: Duration = Duration::from_millis(250);
/// Most cells leased at once.
const MAX_BATCH: u32 = 128;

/// Reserve up to ARGV[3] cells from the bucket at KEYS[1]. Times are microseconds on Redis's
/// clock. ARGV: interval (µs per cell, may be fractional), window (burst × interval), cells
/// wanted, seed (how far ahead of now a bucket that does not exist yet starts: usage the
/// replica counted locally while Redis was away). Returns {granted, retry_after µs,
/// remaining, reset µs}.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then tat = now + tonumber(ARGV[4]) end
if tat < now then tat = now end
local fit = math.floor((now + window - tat) / interval + 1e-6)
if fit < want then want = fit end
if want < 1 then
  return {0, math.ceil(tat + interval - window - now), 0, math.ceil(tat - now)}
end
tat = math.ceil(tat + want * interval)
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {want, 0, math.floor((now + window - tat) / interval), tat - now}
";

/// The reservation script, loaded once per process.
pub fn reserve_script() -> Script {
    super::redis::script(RESERVE)
}

/// What a lease says about one request, without a store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// A leased cell was spent.
    Admit(Verdict),
    /// Redis said no cell is due before then.
    Refuse(Verdict),
    /// Nothing leased: ask the store.
    Empty,
}

/// One replica's lease on a resource's fleet bucket, plus the bucket that enforces this
/// replica's share of the limit while the store is unreachable (`on_error = "local"`).
#[derive(Debug)]
pub struct Lease {
    cells: AtomicU32,
    /// End of the lease, ns on the limiter's clock.
    expires: AtomicU64,
    /// No cell is due in the fleet bucket before this (ns on the limiter's clock).
    refused_until: AtomicU64,
    /// Fleet-wide remaining at the grant, for the RateLimit header.
    remaining: AtomicU32,
    /// When the fleet bucket is full again, ns on the limiter's clock.
    full_at: AtomicU64,
    /// Cells to ask for next time.
    batch: AtomicU32,
    /// Serialises refills: one store call per resource at a time, the others wait for it.
    refill: tokio::sync::Mutex<()>,
    /// This replica's share of the limit, used while the store is unreachable.
    pub fallback: Bucket,
}

impl Lease {
    /// An empty lease; `share` is this replica's part of the limit.
    pub fn new(share: Quota) -> Self {
        Self {
            cells: AtomicU32::new(0),
            expires: AtomicU64::new(0),
            refused_until: AtomicU64::new(0),
            remaining: AtomicU32::new(0),
            full_at: AtomicU64::new(0),
            batch: AtomicU32::new(1),
            refill: tokio::sync::Mutex::new(()),
            fallback: Bucket::new(share),
        }
    }

    /// Spend a leased cell, or refuse while Redis said none is due, at `now` (ns).
    pub fn take(&self, now: u64) -> Local {
        let refused_until = self.refused_until.load(Ordering::Acquire);
        if now < refused_until {
            return Local::Refuse(Verdict::Refuse {
                retry_after_ns: refused_until - now,
            });
        }
        if now >= self.expires.load(Ordering::Acquire) {
            return Local::Empty;
        }
        match self
            .cells
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        {
            Ok(left) => Local::Admit(Verdict::Admit {
                remaining: self
                    .remaining
                    .load(Ordering::Relaxed)
                    .saturating_add(left - 1),
                reset_ns: self.full_at.load(Ordering::Relaxed).saturating_sub(now),
            }),
            Err(_) => Local::Empty,
        }
    }

    /// Refill from the fleet bucket at `key` and take one cell: waits for a refill already
    /// under way rather than making a second call. `now` gives ns on the limiter's clock.
    pub async fn refill_and_take(
        &self,
        redis: &Redis,
        script: &Script,
        key: &str,
        quota: Quota,
        replicas: u32,
        now: impl Fn() -> u64,
    ) -> Result<Verdict, StoreError> {
        let _one_call = self.refill.lock().await;
        // Another request may have refilled while this one waited.
        match self.take(now()) {
            Local::Admit(v) | Local::Refuse(v) => return Ok(v),
            Local::Empty => {}
        }
        let asked_at = now();
        let want = self.next_batch(quota, replicas, asked_at);
        let interval_us = 1e6 / f64::from(quota.tps.get());
        let window_us = interval_us * f64::from(quota.burst.get());
        let seed_us = self.fallback.ahead(asked_at) / 1000;
        let mut invocation = script.key(key);
        invocation
            .arg(format!("{interval_us:.3}"))
            .arg(format!("{window_us:.3}"))
            .arg(want)
            .arg(seed_us);
        let reply: Vec<i64> = redis.invoke(&invocation).await?;
        let [granted, retry_us, remaining, reset_us] = reply[..] else {
            return Err(StoreError::Data(format!("reserve answered {reply:?}")));
        };
        let at = now();
        let us = |v: i64| u64::try_from(v).unwrap_or(0).saturating_mul(1000);
        if granted < 1 {
            let retry_after_ns = us(retry_us).max(1);
            self.refused_until
                .store(at + retry_after_ns, Ordering::Release);
            return Ok(Verdict::Refuse { retry_after_ns });
        }
        let granted = u32::try_from(granted).unwrap_or(1);
        self.remaining
            .store(u32::try_from(remaining).unwrap_or(0), Ordering::Relaxed);
        self.full_at.store(at + us(reset_us), Ordering::Relaxed);
        // One cell is this request's; the rest are the lease.
        self.cells.store(granted - 1, Ordering::Release);
        self.expires
            .store(at + LEASE_TTL.as_nanos() as u64, Ordering::Release);
        Ok(Verdict::Admit {
            remaining: u32::try_from(remaining)
                .unwrap_or(0)
                .saturating_add(granted - 1),
            reset_ns: us(reset_us),
        })
    }

    /// Size the next request from how the last lease went: it ran out while still valid →
    /// double; it expired with cells left → halve. Never more than a quarter of this
    /// replica's share of the burst, so the replicas' leases together stay a small part of it.
    fn next_batch(&self, quota: Quota, replicas: u32, now: u64) -> u32 {
        let left = self.cells.swap(0, Ordering::AcqRel);
        let live = now < self.expires.load(Ordering::Acquire);
        let batch = self.batch.load(Ordering::Relaxed);
        let batch = match (left, live) {
            (0, true) => batch.saturating_mul(2),
            (0, false) => batch,
            _ => batch / 2,
        };
        let cap = (quota.burst.get() / (4 * replicas.max(1))).clamp(1, MAX_BATCH);
        let batch = batch.clamp(1, cap);
        self.batch.store(batch, Ordering::Relaxed);
        batch
    }
}
