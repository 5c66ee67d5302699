//! The fleet loop: keeps this replica in step with the fleet through the shared store — a
//! heartbeat every `store.heartbeat` (its share of every cap, the autoscale lease) and a
//! policy poll every [`POLICY_POLL`] (adopt the fleet's policy; publish the one in force here
//! again when the store lost it). What the store holds and how is `crate::store`'s; what a
//! replica does with it is decided here.

use std::sync::Arc;
use std::time::Duration;

use super::Control;
use crate::balance::Share;
use crate::store::{Fleet, PolicyId, StoreError};

/// How often a replica looks for a new policy version: changes reach every replica within it
/// plus one store round trip.
pub const POLICY_POLL: Duration = Duration::from_millis(250);

/// One heartbeat: stamp this replica, update its share of every cap, renew or take the lease.
async fn beat(fleet: &Fleet, control: &Control) -> Result<(), StoreError> {
    let share = fleet.stamp().await?;
    apply_share(fleet, control, share);
    fleet.lead().await?;
    Ok(())
}

fn apply_share(fleet: &Fleet, control: &Control, share: Share) {
    if fleet.share() != share {
        fleet.set_share(share);
        for service in &control.live().policy().services {
            service.pool.set_share(share);
        }
    }
}

/// A heartbeat that did not reach the store: take the share the store's standing says
/// (`Fleet::missed_heartbeat`).
fn missed(fleet: &Fleet, control: &Control) {
    if let Some(share) = fleet.missed_heartbeat() {
        apply_share(fleet, control, share);
    }
}

/// Adopt the fleet's policy if it is another than the one in force here. If the store lost
/// the policy this replica follows (Redis restarted empty), publish the one in force here
/// again: the fleet keeps the policy it ran (the first replica to notice wins; the others
/// adopt its document, the same policy).
async fn follow_policy(fleet: &Fleet, control: &Control) -> Result<(), StoreError> {
    let followed = fleet.policy_id();
    let (id, doc) = match fleet.stored_policy().await? {
        Some((_, None)) => return Ok(()),
        // Republished from an older version than this replica followed (it had not seen the
        // last change before the store lost it): the later policy goes back over it.
        Some((id, Some(doc))) if doc.restored_from > 0 && doc.restored_from < followed.version => {
            republish(fleet, control, id).await?;
            return Ok(());
        }
        Some((id, Some(doc))) => (id, doc),
        None if followed.version == 0 => return Ok(()),
        None => {
            republish(fleet, control, PolicyId::default()).await?;
            return Ok(());
        }
    };
    let version = id.version;
    match control
        .adopt(doc.services, id, &doc.origin, &doc.reason)
        .await
    {
        Ok(()) => {
            tracing::info!(target: "sluice::store", version, origin = %doc.origin, "fleet policy adopted");
        }
        Err(e) => {
            // Followed anyway: retrying an invalid document every poll would only repeat this.
            tracing::error!(target: "sluice::store", version, origin = %doc.origin, "fleet policy refused here, the old one stays: {e}");
            fleet.follow_refused(id, e.to_string());
        }
    }
    Ok(())
}

/// Publish the policy in force here again, over `stored` (none: the store lost the policy;
/// else a copy republished from an older version than this replica followed).
async fn republish(fleet: &Fleet, control: &Control, stored: PolicyId) -> Result<(), StoreError> {
    // Not from a replica that refused the policy it follows: it runs an older one than the
    // fleet did, and the replicas that ran the fleet's republish it.
    if fleet.refused_policy().is_some() {
        return Ok(());
    }
    let services = control.live().policy().config.services.clone();
    let from = fleet.policy_version();
    let reason = "republished: the store had lost the fleet policy";
    if let Some(version) = fleet.publish_over(&services, reason, stored, from).await? {
        tracing::warn!(target: "sluice::store", version, from, "the store had lost the fleet policy: republished the one in force here");
    }
    Ok(())
}

/// Join the fleet at start: the first heartbeat, then the policy — the fleet's if it has one,
/// else this replica's, published as version 1. Bounded by the store timeout per call; with
/// the store down, sluice starts on its own config and the loop catches up.
pub async fn join(fleet: &Fleet, control: &Control) {
    let joined = async {
        beat(fleet, control).await?;
        follow_policy(fleet, control).await?;
        if fleet.policy_version() == 0 {
            let services = control.live().policy().config.services.clone();
            if let Some(version) = fleet
                .publish_policy(&services, "first replica's config")
                .await?
            {
                tracing::info!(target: "sluice::store", version, "fleet policy published from this replica's config");
            } else {
                follow_policy(fleet, control).await?;
            }
        }
        Ok::<_, StoreError>(())
    };
    if let Err(e) = joined.await {
        tracing::warn!(target: "sluice::store", error = %e, "store unreachable at start: on_error applies until it answers");
        missed(fleet, control);
    }
}

/// Keep this replica in step with the fleet until aborted: a heartbeat every
/// `store.heartbeat` (which also probes a store that was unreachable) and a policy poll every
/// [`POLICY_POLL`].
pub async fn run(fleet: Arc<Fleet>, control: Arc<Control>) {
    let mut beats = tokio::time::interval(fleet.config().heartbeat);
    let mut polls = tokio::time::interval(POLICY_POLL);
    beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beats.tick() => {
                // Errors are logged once by the connection when health changes.
                if beat(&fleet, &control).await.is_err() {
                    missed(&fleet, &control);
                }
            }
            _ = polls.tick() => {
                if fleet.is_up() {
                    let _ = follow_policy(&fleet, &control).await;
                }
            }
        }
    }
}
