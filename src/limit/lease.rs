//! Fleet-wide rate limits without a store call per request. The GCRA bucket of each resource
//! lives in the shared store ([`SharedBuckets`]: Redis, one script, atomic, on Redis's clock);
//! a replica reserves a small *batch* of cells from it at a time and admits from that lease
//! locally. limit owns this interface; `store::Fleet` implements it.
//!
//! Why the fleet stays within its limit: every admitted request spent a cell that the Redis
//! bucket granted, so over any run the fleet admits at most `tps × time + burst`. A lease
//! holds at most a quarter of the replica's share of the burst, so over a short window the
//! fleet can run ahead by at most a quarter of the burst (the cells leased before it), and a
//! lease lives at most [`LEASE_TTL`]. Cells a replica leased but did not use before the lease
//! ended are lost (the fleet admits a little *less*, never more); the batch adapts to each
//! replica's demand (doubling while leases run out fast, halving when they expire unused).
//! A busy lease that runs down to half a batch reserves the next one in the background.
//!
//! A refusal from Redis says exactly when the next cell is due; until then the replica refuses
//! locally, so throttled traffic costs no store calls either.
//!
//! A bucket Redis lost with its data (the store generation, see `store/rate.rs`) comes back as one
//! that was empty at the loss, whichever replica asks first: the fleet's usage before the loss
//! is unknown, and assuming it spent everything is the side that keeps the bound.
//!
//! While Redis is unreachable (`on_error = "local"`) the replica admits from its own bucket,
//! emptied when the outage begins (so each replica admits at most its share of the rate);
//! those admissions spent no cell of the Redis bucket, so the first store call afterwards
//! charges them to it (or, if Redis lost the bucket, seeds the new one with that usage), and
//! an outage adds no admissions on top of the bound above.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{Bucket, Quota, Verdict};
use crate::config::OnError;

/// An error of the store, as it reported it.
pub type StoreFailure = Box<dyn std::error::Error + Send + Sync>;

/// A reservation under way.
pub type Reservation<'a> = Pin<Box<dyn Future<Output = Result<Grant, StoreFailure>> + Send + 'a>>;

/// Where the fleet's shared buckets are kept: what the limiter needs of the store.
pub trait SharedBuckets: Send + Sync + std::fmt::Debug {
    /// Whether the store answered lately (while not, `on_error` decides).
    fn is_up(&self) -> bool;
    /// What to do while the store is unreachable.
    fn on_error(&self) -> OnError;
    /// Replicas sharing the buckets (at least 1).
    fn replicas(&self) -> u32;
    /// The current (or last) outage's number: a new one starts each time the store goes down.
    fn outage(&self) -> u64;
    /// Count a request decided by `on_error`.
    fn count_fallback(&self);
    /// The longest a call to the store may take.
    fn timeout(&self) -> Duration;
    /// The key of `resource`'s bucket in `service`, unique per pair.
    fn bucket_key(&self, service: &str, resource: &str) -> String;
    /// Reserve up to `ask.want` cells of a bucket, first charging it `owed` cells admitted
    /// locally while the store was away; give up at `deadline`. A failure marks the store
    /// down.
    fn reserve<'a>(&'a self, ask: Ask<'a>, owed: u64, deadline: Instant) -> Reservation<'a>;
}

/// Why a shared bucket gave no verdict.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Another request's store call for the same resource took the whole time limit; the
    /// store itself did not fail (yet), so this is not a store error.
    #[error("waited {0:?} for another request's store call")]
    Busy(Duration),
    /// The store failed.
    #[error("{0}")]
    Store(StoreFailure),
}

/// This replica's part of `quota` while it enforces limits alone (`on_error = "local"`).
pub fn share_of(quota: Quota, replicas: u32) -> Quota {
    let part = |v: std::num::NonZeroU32| {
        std::num::NonZeroU32::new(v.get() / replicas.max(1)).unwrap_or(std::num::NonZeroU32::MIN)
    };
    Quota {
        tps: part(quota.tps),
        burst: part(quota.burst),
    }
}

/// How long leased cells may be used. Short, so a lease cannot carry old allowance far.
pub const LEASE_TTL: Duration = Duration::from_millis(250);
/// Most cells leased at once.
const MAX_BATCH: u32 = 128;

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
    /// A prefetch was claimed and has not finished.
    prefetching: AtomicBool,
    /// This replica's share of the limit, used while the store is unreachable.
    pub fallback: Bucket,
    /// Cells `fallback` admitted while the store was unreachable, not yet charged to the
    /// fleet bucket: the next store call charges them, so an outage adds nothing on top of
    /// the fleet's limit when Redis kept the bucket.
    owed: AtomicU64,
    /// The store outage for which `fallback` was emptied (see [`Lease::check_locally`]).
    emptied_for: AtomicU64,
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
            prefetching: AtomicBool::new(false),
            fallback: Bucket::new(share),
            owed: AtomicU64::new(0),
            emptied_for: AtomicU64::new(u64::MAX),
        }
    }

    /// Count a request `fallback` admitted while the store was unreachable.
    pub fn admitted_locally(&self) {
        self.owed.fetch_add(1, Ordering::AcqRel);
    }

    /// Judge a request at `now` with `fallback` at this replica's `share` of the limit, while
    /// the store is unreachable in its outage number `outage` (`on_error = "local"`), and
    /// count it if admitted. The first local decision of an outage empties `fallback`: this
    /// replica's part of the burst may already have been spent through other replicas (the
    /// fleet's bucket was shared; a replica that saw little of the traffic would otherwise
    /// start with a full local bucket), so during an outage each replica admits at most its
    /// share of the rate, and the fleet stays within `tps × time + burst` however long the
    /// outage lasts.
    pub fn check_locally(&self, share: Quota, outage: u64, now: u64) -> (Quota, Verdict) {
        if self.fallback.quota() != share {
            self.fallback.set_quota(share);
        }
        if self.emptied_for.swap(outage, Ordering::AcqRel) != outage {
            self.fallback
                .mirror(&Verdict::Refuse { retry_after_ns: 0 }, now);
        }
        let (share, verdict) = self.fallback.check(now);
        if matches!(verdict, Verdict::Admit { .. }) {
            self.admitted_locally();
        }
        (share, verdict)
    }

    /// Give back a cell taken from the lease, or a local admission counted while the store was
    /// unreachable, for a request that never reached an endpoint (a 429 for capacity).
    pub fn give_back(&self, local: bool) {
        if local {
            let _ = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        } else {
            // A cell of an expired lease is worthless anyway: the next refill replaces it.
            self.cells.fetch_add(1, Ordering::AcqRel);
        }
        self.fallback.give_back();
    }

    /// Reserve from the fleet bucket, charging it with the cells owed since the last call;
    /// if the call fails or is dropped (its request went away) they stay owed. A call that
    /// ran in Redis but whose answer was lost charges them twice: the fleet then admits a
    /// little less, never more.
    async fn reserve(
        &self,
        store: &dyn SharedBuckets,
        ask: Ask<'_>,
        deadline: Instant,
    ) -> Result<Grant, SharedError> {
        let mut owed = StillOwed {
            to: &self.owed,
            cells: self.owed.swap(0, Ordering::AcqRel),
        };
        let grant = store
            .reserve(ask, owed.cells, deadline)
            .await
            .map_err(SharedError::Store)?;
        owed.cells = 0;
        Ok(grant)
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

    /// Whether the lease is running low while busy, so the caller should start a
    /// [`Lease::prefetch`] of the next batch (requests then rarely wait for a store call).
    /// True once until that prefetch has run.
    pub fn claim_prefetch(&self) -> bool {
        let batch = self.batch.load(Ordering::Relaxed);
        let cells = self.cells.load(Ordering::Relaxed);
        batch >= 2
            && cells > 0
            && cells <= batch / 2
            && !self.prefetching.swap(true, Ordering::AcqRel)
    }

    /// Refill from the fleet bucket at `key` in `store` and take one cell, within the store's
    /// timeout all told: waits for a refill already under way rather than making a second
    /// call (past the timeout that is [`SharedError::Busy`]). `now` gives ns on the limiter's
    /// clock.
    pub async fn refill(
        &self,
        store: &dyn SharedBuckets,
        key: &str,
        quota: Quota,
        now: impl Fn() -> u64,
    ) -> Result<Verdict, SharedError> {
        let deadline = Instant::now() + store.timeout();
        let Ok(_one_call) = tokio::time::timeout_at(deadline, self.refill.lock()).await else {
            return Err(SharedError::Busy(store.timeout()));
        };
        // Another request may have refilled while this one waited.
        match self.take(now()) {
            Local::Admit(v) | Local::Refuse(v) => return Ok(v),
            Local::Empty => {}
        }
        let asked_at = now();
        let want = self.next_batch(quota, store.replicas(), asked_at);
        let seed_ns = self.fallback.ahead(asked_at);
        let ask = Ask {
            key,
            quota,
            want,
            seed_ns,
        };
        match self.reserve(store, ask, deadline).await? {
            Grant::Refused { retry_after_ns } => {
                self.refused_until
                    .store(now() + retry_after_ns, Ordering::Release);
                Ok(Verdict::Refuse { retry_after_ns })
            }
            Grant::Cells {
                cells,
                remaining,
                reset_ns,
            } => {
                // One cell is this request's; the rest are the lease.
                self.install(cells - 1, remaining, reset_ns, now());
                Ok(Verdict::Admit {
                    remaining: remaining.saturating_add(cells - 1),
                    reset_ns,
                })
            }
        }
    }

    /// Reserve the next batch while the lease still has cells (see [`Lease::claim_prefetch`]).
    /// Skipped when a refill is already under way. The lease never holds more than one
    /// batch's cap, so the bound on what the fleet can run ahead stays as it is.
    pub async fn prefetch(
        &self,
        store: &dyn SharedBuckets,
        key: &str,
        quota: Quota,
        now: impl Fn() -> u64,
    ) -> Result<(), SharedError> {
        let claimed = Claimed(&self.prefetching);
        let Ok(_one_call) = self.refill.try_lock() else {
            return Ok(());
        };
        let asked_at = now();
        let left = self.cells.load(Ordering::Acquire);
        if left == 0 || asked_at >= self.expires.load(Ordering::Acquire) {
            return Ok(()); // empty or over: the next request refills on demand
        }
        let cap = batch_cap(quota, store.replicas());
        // It ran low while live: demand is high.
        let batch = self
            .batch
            .load(Ordering::Relaxed)
            .saturating_mul(2)
            .min(cap);
        self.batch.store(batch, Ordering::Relaxed);
        let want = batch.min(cap.saturating_sub(left));
        if want == 0 {
            return Ok(());
        }
        if let Grant::Cells {
            cells,
            remaining,
            reset_ns,
        } = self
            .reserve(
                store,
                Ask {
                    key,
                    quota,
                    want,
                    seed_ns: 0,
                },
                Instant::now() + store.timeout(),
            )
            .await?
        {
            self.top_up(cells, remaining, reset_ns, now());
        }
        drop(claimed);
        Ok(())
    }

    /// Make `cells` the lease, from `at` for [`LEASE_TTL`].
    fn install(&self, cells: u32, remaining: u32, reset_ns: u64, at: u64) {
        self.remaining.store(remaining, Ordering::Relaxed);
        self.full_at.store(at + reset_ns, Ordering::Relaxed);
        self.cells.store(cells, Ordering::Release);
        self.expires
            .store(at + LEASE_TTL.as_nanos() as u64, Ordering::Release);
    }

    /// Add `cells` a background refill was granted to the lease, from `at` for [`LEASE_TTL`].
    /// Added atomically: requests take cells meanwhile (and give some back), so reading the
    /// count and storing `count + cells` would hand a cell taken in between out again, one
    /// Redis never granted. A lease that ended meanwhile is replaced, not added to: its cells
    /// are worthless (requests no longer take them), and carrying them into the new lease
    /// would make them live longer than [`LEASE_TTL`]. Only this replica's refill (which holds
    /// the refill lock) changes `expires`, so the check and the update agree.
    fn top_up(&self, cells: u32, remaining: u32, reset_ns: u64, at: u64) {
        self.remaining.store(remaining, Ordering::Relaxed);
        self.full_at.store(at + reset_ns, Ordering::Relaxed);
        if at < self.expires.load(Ordering::Acquire) {
            self.cells.fetch_add(cells, Ordering::AcqRel);
        } else {
            self.cells.store(cells, Ordering::Release);
        }
        self.expires
            .store(at + LEASE_TTL.as_nanos() as u64, Ordering::Release);
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
        let batch = batch.clamp(1, batch_cap(quota, replicas));
        self.batch.store(batch, Ordering::Relaxed);
        batch
    }
}

/// Cells taken out of [`Lease::owed`] for a store call, put back unless the call charged them.
struct StillOwed<'a> {
    to: &'a AtomicU64,
    cells: u64,
}

impl Drop for StillOwed<'_> {
    fn drop(&mut self) {
        if self.cells > 0 {
            self.to.fetch_add(self.cells, Ordering::AcqRel);
        }
    }
}

/// Releases a claimed prefetch however the prefetch ends (done, refused, failed, cancelled).
struct Claimed<'a>(&'a AtomicBool);

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Most cells one replica's lease holds: a quarter of its share of the burst (at most
/// [`MAX_BATCH`]), so all the fleet's leases together hold at most a quarter of the burst.
fn batch_cap(quota: Quota, replicas: u32) -> u32 {
    (quota.burst.get() / (4 * replicas.max(1))).clamp(1, MAX_BATCH)
}

/// What the fleet bucket answered a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// `cells` (at least 1) were reserved.
    Cells {
        /// Cells granted.
        cells: u32,
        /// Cells left in the fleet bucket after the grant.
        remaining: u32,
        /// Time until the fleet bucket is full again, ns.
        reset_ns: u64,
    },
    /// No cell is due before then.
    Refused {
        /// Time until the next cell is due, ns (at least 1).
        retry_after_ns: u64,
    },
}

/// One reservation: up to `want` cells of the fleet bucket at `key` under `quota`.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The bucket's key in the store.
    pub key: &'a str,
    /// The limit it enforces.
    pub quota: Quota,
    /// Cells wanted.
    pub want: u32,
    /// Where the bucket starts (ns ahead of now) if it does not exist: usage this replica
    /// counted locally while the store was away.
    pub seed_ns: u64,
}
