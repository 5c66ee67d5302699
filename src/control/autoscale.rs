//! The autoscale loop: per service, sample the gauges every second, and every `interval` step
//! the engine (in a fleet: the leader steps and publishes, the others follow) and apply what it
//! decided to the live limiter and pool; each event is logged, kept in the history and sent to
//! `notify` URLs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::notify::Notifier;
use crate::autoscale::Event;
use crate::policy::autoscaler::now;
use crate::policy::{Live, Service, ServiceAutoscaler};
use crate::store::{Counts, Fleet, Tally};

/// How often gauges (in flight, queue, headroom) are sampled into the metric windows.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Where the loop reads the wall clock (profiles are scheduled in wall time).
pub type WallClock = fn() -> DateTime<Utc>;

/// Run the autoscale loop of every service in the live policy (services added by a reload
/// included) until aborted. In a fleet, only the leader steps (when the fleet's last step is an
/// interval old) and publishes the values; the other replicas follow them.
pub async fn run(state: Arc<Live>, notifier: Notifier, wall: WallClock) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = now();
    // When each service last stepped; a service starts counting when the loop does.
    let mut last_step: BTreeMap<Arc<str>, Instant> = BTreeMap::new();
    // In a fleet: what each service's counts were at the last exchange.
    let mut tallies: BTreeMap<Arc<str>, Tally> = BTreeMap::new();
    loop {
        ticker.tick().await;
        let policy = state.policy();
        for live in &policy.services {
            let Some(autoscaler) = &live.autoscale else {
                continue;
            };
            let at = now();
            let others = match state.fleet() {
                Some(fleet) if fleet.is_up() => {
                    let tally = tallies.entry(Arc::clone(&live.name)).or_default();
                    let sec = u64::try_from(wall().timestamp()).unwrap_or(0);
                    let leader = fleet.is_leader();
                    tally
                        .exchange(fleet, &live.name, counts(live), sec, leader)
                        .await
                        .ok()
                        .flatten()
                }
                _ => None,
            };
            autoscaler.sample(&live.pool, at, others.as_ref());
            let last = last_step.entry(Arc::clone(&live.name)).or_insert(started);
            let due = at.duration_since(*last) >= autoscaler.settings().interval;
            let events = match state.fleet() {
                None if due => {
                    *last = at;
                    autoscaler.step(&live.pool, live.rate.as_ref(), at, wall())
                }
                None => continue,
                Some(fleet) => fleet_turn(fleet, live, autoscaler, last, due, at, wall()).await,
            };
            for event in events {
                let event = state.record(event);
                notifier.send(&autoscaler.settings().notify, &event);
            }
        }
        // Forget services a reload removed.
        last_step.retain(|name, _| policy.service(name).is_some());
        tallies.retain(|name, _| policy.service(name).is_some());
    }
}

/// One tick of a service in a fleet: the leader steps when the fleet's last step (by whichever
/// replica led then) is an interval old, and publishes the outcome; the others follow the
/// published values. Without the store nobody steps.
async fn fleet_turn(
    fleet: &Fleet,
    live: &Service,
    autoscaler: &ServiceAutoscaler,
    last: &mut Instant,
    due: bool,
    at: Instant,
    wall: DateTime<Utc>,
) -> Vec<Event> {
    if !fleet.is_up() {
        return Vec::new();
    }
    let Ok(published) = fleet.scale(&live.name).await else {
        return Vec::new();
    };
    // Every replica takes the published values first, the leader too: a replica that has just
    // become leader continues from the last step, whoever took it.
    let mut events = match &published {
        Some(doc) => autoscaler.follow(doc, &live.pool, live.rate.as_ref(), at, wall),
        None => Vec::new(),
    };
    if !fleet.is_leader() {
        return events;
    }
    // Step times are compared on Redis's clock, which every replica reads the same: skew
    // between the replicas' own clocks cannot move a step.
    let Ok(redis_now) = fleet.redis_time_ms().await else {
        return events;
    };
    let interval_ms = u64::try_from(autoscaler.settings().interval.as_millis()).unwrap_or(u64::MAX);
    let due = match &published {
        // A step taken by an earlier leader counts: one step per interval for the fleet.
        Some(doc) => redis_now.saturating_sub(doc.stepped_at_ms) >= interval_ms,
        // No step published: none yet, or Redis lost it (a restart, an eviction) — then the
        // last leader may have stepped a moment ago. Wait a full interval from taking the
        // lead (as well as from this replica's own last step), which a step taken before
        // the lead changed hands cannot be within.
        None => due && redis_now.saturating_sub(fleet.leading_since_ms()) >= interval_ms,
    };
    if !due {
        return events;
    }
    *last = at;
    let stepped = autoscaler.step(&live.pool, live.rate.as_ref(), at, wall);
    let doc = autoscaler.scale_doc(redis_now);
    // Fenced off (another replica leads now): its values arrive at the next tick.
    if let Ok(true) = fleet.publish_scale(&live.name, &doc).await {
        events.extend(stepped);
    }
    events
}

/// What this replica counted for `service`, for the fleet's tally.
fn counts(service: &Service) -> Counts {
    let resources = service.rate.as_ref().map_or_else(Vec::new, |rate| {
        rate.all_resources()
            .map(|r| {
                let c = &r.counters;
                (r.name.to_string(), c.admitted.total(), c.throttled.total())
            })
            .collect()
    });
    Counts {
        resources,
        in_flight: service.pool.in_flight(),
        queue: service.pool.queue_len(),
    }
}
