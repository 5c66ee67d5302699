//! Where a request is admitted or refused for rate: the decision on one request ([`check`],
//! then [`ask`] when the resource's lease on a fleet bucket is empty) and what it leaves to
//! settle (a cell to [`confirm`] or [`give_back`]). A resource decides by its own bucket, by
//! its lease on the fleet's shared bucket ([`super::lease`]), or while the store is
//! unreachable by `store.on_error`.
//!
//! [`check`]: RateLimiter::check
//! [`ask`]: RateLimiter::ask
//! [`confirm`]: RateLimiter::confirm
//! [`give_back`]: RateLimiter::give_back

use std::sync::Arc;

use http::header::HeaderMap;
use tokio::time::Instant;

use super::lease::{share_of, Local, SharedBuckets, SharedError};
use super::{nanos_since, Quota, RateLimiter, Resource, Status, Verdict};
use crate::config::{MissingKey, OnError, UnknownKeys};

/// Why a request was refused before any rate was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    /// No key and `missing_key = "reject"`.
    Missing,
    /// A key that matches no resource and `unknown_keys = "reject"`.
    Unknown,
}

/// Where an admitted request's cell was taken from, so that it can be given back when the
/// request never reaches an endpoint: a request refused for capacity costs its caller nothing
/// (no cell, not counted as admitted, so not as autoscale utilisation either).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// The resource's own bucket.
    Own,
    /// The replica's lease on the fleet's bucket.
    Leased,
    /// The replica's share while the store is unreachable (`on_error = "local"`).
    Fallback,
    /// The unknown-key table's bucket of the key with this digest.
    Unknown([u8; 32]),
    /// Nothing was spent (`on_error = "allow"`).
    Free,
}

/// The outcome of a rate check.
#[derive(Debug)]
pub enum Admission<'a> {
    /// The resource's lease from the shared store is empty: the caller must
    /// [`RateLimiter::ask`] the store (bounded by `store.timeout`).
    Ask {
        /// Whose bucket to ask.
        resource: &'a Arc<Resource>,
    },
    /// The store is unreachable and `on_error = "deny"`: 503 `store_unavailable`.
    Unavailable {
        /// Whose limit could not be checked.
        resource: &'a Arc<Resource>,
    },
    /// Passed; one cell of `resource`'s limit is spent. The caller then either
    /// [`RateLimiter::confirm`]s it (the request goes on to an endpoint) or
    /// [`RateLimiter::give_back`]s it (refused for capacity before it reached one).
    Admitted {
        /// Whose limit it counted against.
        resource: &'a Arc<Resource>,
        /// What to tell the client.
        status: Status,
        /// Where the spent cell came from.
        cell: Cell,
    },
    /// Over the limit.
    Limited {
        /// Whose limit.
        resource: &'a Arc<Resource>,
        /// What to tell the client (`remaining` 0).
        status: Status,
        /// Exact time until the next request would pass, in ms (rounded up).
        retry_after_ms: u64,
    },
    /// No usable key.
    Refused(KeyProblem),
}

/// How one resource's request was judged before any response is built.
enum Judged {
    Verdict(Quota, Verdict, Cell),
    Ask,
    Unavailable,
}

impl RateLimiter {
    /// Judge a request by its headers, as arrived at `at` (the proxy reads the clock once per
    /// request, for its latency figures too).
    pub fn check(&self, headers: &HeaderMap, at: Instant) -> Admission<'_> {
        let now = self.nanos(at);
        let resource = match self.keys.extract(headers) {
            None => match self.settings.missing_key {
                MissingKey::Reject => return Admission::Refused(KeyProblem::Missing),
                MissingKey::Anonymous => &self.anonymous,
            },
            Some(key) => match self.configured(key) {
                Ok(resource) => resource,
                Err(digest) => match self.settings.unknown_keys {
                    UnknownKeys::Reject => return Admission::Refused(KeyProblem::Unknown),
                    UnknownKeys::Default => {
                        // Unknown keys are too many to share through the store: each
                        // replica enforces its share of the default limit per key.
                        let quota = self.unknown_quota();
                        let verdict = self.table.check(&digest, now, quota);
                        return self.admission(
                            &self.unknown,
                            quota,
                            verdict,
                            at,
                            Cell::Unknown(digest),
                        );
                    }
                },
            },
        };
        match self.judge(resource, now) {
            Judged::Verdict(quota, verdict, cell) => {
                if matches!(verdict, Verdict::Admit { .. }) {
                    self.prefetch_if_low(resource);
                }
                self.admission(resource, quota, verdict, at, cell)
            }
            Judged::Ask => Admission::Ask { resource },
            Judged::Unavailable => Admission::Unavailable { resource },
        }
    }

    /// The limit of each unknown key: the default, or this replica's share of it in a fleet
    /// (unknown keys are too many to share through the store).
    fn unknown_quota(&self) -> Quota {
        let quota = self.unknown.limit();
        match &self.fleet {
            Some(fleet) => share_of(quota, fleet.replicas()),
            None => quota,
        }
    }

    /// Count an admitted request that goes on to an endpoint (it took a slot).
    pub fn confirm(&self, resource: &Resource, at: Instant) {
        resource.count(true, at);
    }

    /// Give back the cell of an admitted request that never reached an endpoint (no slot was
    /// free, or its client left while it waited for one): its caller is not billed for it, and
    /// it is not counted as admitted. False when nothing was spent to give back.
    pub fn give_back(&self, resource: &Resource, cell: Cell) -> bool {
        match cell {
            Cell::Own => resource.bucket.give_back(),
            Cell::Leased | Cell::Fallback => {
                if let Some((_, lease)) = resource.shared.as_deref() {
                    lease.give_back(cell == Cell::Fallback);
                }
            }
            Cell::Unknown(digest) => self.table.give_back(&digest, self.unknown_quota()),
            Cell::Free => return false,
        }
        true
    }

    /// Judge a request against `resource`'s own bucket.
    fn check_resource<'a>(&'a self, resource: &'a Arc<Resource>) -> Admission<'a> {
        let at = Instant::now();
        let (quota, verdict) = resource.check(self.nanos(at));
        self.admission(resource, quota, verdict, at, Cell::Own)
    }

    /// Say what to answer; a refusal is counted now, an admission once it is confirmed.
    fn admission<'a>(
        &self,
        resource: &'a Arc<Resource>,
        quota: Quota,
        verdict: Verdict,
        at: Instant,
        cell: Cell,
    ) -> Admission<'a> {
        match verdict {
            Verdict::Admit {
                remaining,
                reset_ns,
            } => {
                let status = Status {
                    quota,
                    remaining,
                    reset_secs: reset_ns.div_ceil(1_000_000_000),
                };
                Admission::Admitted {
                    resource,
                    status,
                    cell,
                }
            }
            Verdict::Refuse { retry_after_ns } => {
                resource.count(false, at);
                let retry_after_ms = retry_after_ns.div_ceil(1_000_000);
                let status = Status {
                    quota,
                    remaining: 0,
                    reset_secs: crate::reason::retry_after_secs(retry_after_ms),
                };
                Admission::Limited {
                    resource,
                    status,
                    retry_after_ms,
                }
            }
        }
    }

    /// The verdict on `resource` without waiting: its own bucket, its lease on the shared
    /// one, or `on_error` while the store is unreachable.
    fn judge(&self, resource: &Resource, now: u64) -> Judged {
        let (Some(fleet), Some((_, lease))) = (&self.fleet, resource.shared.as_deref()) else {
            let (quota, verdict) = resource.check(now);
            return Judged::Verdict(quota, verdict, Cell::Own);
        };
        if !fleet.is_up() {
            return self.on_store_error(&**fleet, resource, lease, now);
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
    fn prefetch_if_low(&self, resource: &Arc<Resource>) {
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
                let _ = lease.prefetch(&*fleet, key, resource.limit(), clock).await;
            }
        });
    }

    /// `store.on_error`: this replica's share locally, admit, or refuse.
    fn on_store_error(
        &self,
        fleet: &dyn SharedBuckets,
        resource: &Resource,
        lease: &super::Lease,
        now: u64,
    ) -> Judged {
        fleet.count_fallback();
        let quota = resource.limit();
        match fleet.on_error() {
            OnError::Local => {
                let share = share_of(quota, fleet.replicas());
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
        let judged = match lease.refill(&**fleet, key, quota, clock).await {
            Ok(verdict) => {
                // The fallback bucket mirrors the fleet's, for when the store goes away.
                lease.fallback.mirror(&verdict, clock());
                Judged::Verdict(quota, verdict, Cell::Leased)
            }
            // The store did not fail; this request's turn did not come in time. Refusing
            // keeps the fleet within its limit (a local admission here would add to it).
            Err(SharedError::Busy(_)) => Judged::Verdict(
                quota,
                Verdict::Refuse {
                    retry_after_ns: quota.interval_ns(),
                },
                Cell::Free,
            ),
            Err(_) => self.on_store_error(&**fleet, resource, lease, clock()),
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
