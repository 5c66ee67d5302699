//! A rate limiter whose resources share their buckets with a fleet through the store: the
//! verdict from the lease without waiting, the store asked when the lease is empty, the next
//! batch reserved in the background, and `store.on_error` while the store is unreachable.

use std::sync::Arc;

use tokio::time::Instant;

use super::{nanos_since, Admission, Cell, Judged, RateLimiter, Resource, Verdict};
use crate::config::OnError;
use crate::store::{self, Fleet, Lease, Local, StoreError};

impl RateLimiter {
    /// The verdict on `resource` without waiting: its own bucket, its lease on the shared
    /// one, or `on_error` while the store is unreachable.
    pub(super) fn judge(&self, resource: &Resource, now: u64) -> Judged {
        let (Some(fleet), Some((_, lease))) = (&self.fleet, resource.shared.as_deref()) else {
            let (quota, verdict) = resource.check(now);
            return Judged::Verdict(quota, verdict, Cell::Own);
        };
        if !fleet.is_up() {
            return self.on_store_error(fleet, resource, lease, now);
        }
        let quota = resource.limit();
        match lease.take(now) {
            Local::Admit(verdict) | Local::Refuse(verdict) => {
                lease.fallback.mirror(&verdict, now);
                Judged::Verdict(quota, verdict, Cell::Leased)
            }
            Local::Empty => Judged::Ask,
        }
    }

    /// With a shared store, reserve the resource's next batch in the background when its
    /// lease runs low.
    pub(super) fn prefetch_if_low(&self, resource: &Arc<Resource>) {
        let (Some(fleet), Some((_, lease))) = (&self.fleet, resource.shared.as_deref()) else {
            return;
        };
        if !fleet.is_up() || !lease.claim_prefetch() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (fleet, resource, epoch) = (Arc::clone(fleet), Arc::clone(resource), self.epoch);
        runtime.spawn(async move {
            if let Some((key, lease)) = resource.shared.as_deref() {
                let clock = || nanos_since(epoch, Instant::now());
                // A failure marks the store down; the next request decides by on_error.
                let _ = fleet.prefetch(lease, key, resource.limit(), clock).await;
            }
        });
    }

    /// `store.on_error`: this replica's share locally, admit, or refuse.
    fn on_store_error(
        &self,
        fleet: &Fleet,
        resource: &Resource,
        lease: &Lease,
        now: u64,
    ) -> Judged {
        fleet.count_fallback();
        let quota = resource.limit();
        match fleet.on_error() {
            OnError::Local => {
                let share = store::share_of(quota, fleet.replicas());
                let (share, verdict) = lease.check_locally(share, fleet.outage(), now);
                Judged::Verdict(share, verdict, Cell::Fallback)
            }
            OnError::Allow => Judged::Verdict(
                quota,
                Verdict::Admit {
                    remaining: quota.burst.get(),
                    reset_ns: 0,
                },
                Cell::Free,
            ),
            OnError::Deny => Judged::Unavailable,
        }
    }

    /// Ask the shared store for `resource` (after [`Admission::Ask`]). Never waits longer
    /// than `store.timeout`; past it, or on an error, `store.on_error` decides.
    pub async fn ask<'a>(&'a self, resource: &'a Arc<Resource>) -> Admission<'a> {
        let (Some(fleet), Some((key, lease))) = (&self.fleet, resource.shared.as_deref()) else {
            return self.check_resource(resource);
        };
        let quota = resource.limit();
        let clock = || self.nanos(Instant::now());
        let judged = match fleet.refill(lease, key, quota, clock).await {
            Ok(verdict) => {
                // The fallback bucket mirrors the fleet's, for when the store goes away.
                lease.fallback.mirror(&verdict, clock());
                Judged::Verdict(quota, verdict, Cell::Leased)
            }
            // The store did not fail; this request's turn did not come in time. Refusing
            // keeps the fleet within its limit (a local admission here would add to it).
            Err(StoreError::Busy(_)) => Judged::Verdict(
                quota,
                Verdict::Refuse {
                    retry_after_ns: quota.interval_ns(),
                },
                Cell::Free,
            ),
            Err(_) => self.on_store_error(fleet, resource, lease, clock()),
        };
        match judged {
            Judged::Verdict(quota, verdict, cell) => {
                self.admission(resource, quota, verdict, Instant::now(), cell)
            }
            Judged::Unavailable => Admission::Unavailable { resource },
            // A refill never asks again.
            Judged::Ask => Admission::Unavailable { resource },
        }
    }
}
