//! Fleet-wide autoscale metrics. Every second each replica adds what it counted since its last
//! tick (admitted and throttled per resource, and its in-flight and queue gauges) to a hash
//! per service and wall-clock second, which expires after a minute. The leader reads each
//! completed second once, takes its own part out, and feeds the rest of the fleet's counts
//! into its metric windows: its rules then see the fleet's traffic, not one replica's.

use std::collections::{BTreeMap, HashMap};

use super::redis::StoreError;
use super::Fleet;

/// How long a second's hash lives: the leader reads it a second later.
const KEEP_SECS: i64 = 60;
/// Seconds a leader catches up on at most after a pause (older ones are gone or stale).
const CATCH_UP_SECS: u64 = 5;

/// What the rest of the fleet counted in the seconds a leader just read.
#[derive(Debug, Default, PartialEq)]
pub struct Others {
    /// (admitted, throttled) per resource.
    pub resources: BTreeMap<String, (u64, u64)>,
    /// Mean of the others' summed in-flight samples per second read.
    pub in_flight: f64,
    /// Same for the queue length.
    pub queue: f64,
}

/// What this replica counted for one service: totals since start per resource, and its
/// gauges now.
#[derive(Debug, Default)]
pub struct Counts {
    /// (name, admitted, throttled) per resource.
    pub resources: Vec<(String, u64, u64)>,
    /// Requests in flight at the service's endpoints.
    pub in_flight: u32,
    /// Requests waiting in its queue.
    pub queue: usize,
}

/// One replica's bookkeeping for one service.
#[derive(Debug, Default)]
pub struct Tally {
    /// Counter totals at the last tick, per resource.
    last: HashMap<String, (u64, u64)>,
    /// What this replica added, per second, until the leader part has read it.
    own: BTreeMap<u64, HashMap<String, i64>>,
    /// The last second read (as leader).
    read_up_to: u64,
}

impl Tally {
    /// Add this tick's part of `counts` (of service `service`) to the fleet's hash for
    /// `now_sec`; as `leader`, also read the completed seconds since the last read and return
    /// the others' part.
    pub async fn exchange(
        &mut self,
        fleet: &Fleet,
        service: &str,
        counts: Counts,
        now_sec: u64,
        leader: bool,
    ) -> Result<Option<Others>, StoreError> {
        let mut fields: HashMap<String, i64> = HashMap::new();
        for (name, admitted, throttled) in counts.resources {
            let now = (admitted, throttled);
            let (a, t) = {
                let before = self.last.get(&name).copied().unwrap_or(now);
                (now.0 - before.0.min(now.0), now.1 - before.1.min(now.1))
            };
            if a > 0 {
                fields.insert(format!("a:{name}"), a as i64);
            }
            if t > 0 {
                fields.insert(format!("t:{name}"), t as i64);
            }
            self.last.insert(name, now);
        }
        fields.insert("g:in_flight".into(), i64::from(counts.in_flight));
        fields.insert("g:queue".into(), counts.queue as i64);
        let key = |sec: u64| fleet.redis.key(&format!("tally:{service}:{sec}"));
        let mut pipe = redis::pipe();
        for (field, n) in &fields {
            pipe.hincr(key(now_sec), field, *n).ignore();
        }
        pipe.expire(key(now_sec), KEEP_SECS).ignore();
        fleet.redis.pipeline::<()>(&pipe).await?;
        let own = self.own.entry(now_sec).or_default();
        for (field, n) in fields {
            *own.entry(field).or_default() += n;
        }
        // Seconds the leader part will never read again.
        self.own.retain(|&sec, _| sec + CATCH_UP_SECS >= now_sec);
        if !leader {
            self.read_up_to = now_sec.saturating_sub(1);
            return Ok(None);
        }
        let first = (self.read_up_to + 1).max(now_sec.saturating_sub(CATCH_UP_SECS));
        let mut others = Others::default();
        let mut seconds = 0u32;
        for sec in first..now_sec {
            let fleet_counts: HashMap<String, i64> = fleet
                .redis
                .query(redis::cmd("HGETALL").arg(key(sec)))
                .await?;
            let mine = self.own.remove(&sec).unwrap_or_default();
            let other = |field: &str| {
                let all = fleet_counts.get(field).copied().unwrap_or(0);
                (all - mine.get(field).copied().unwrap_or(0)).max(0) as u64
            };
            for field in fleet_counts.keys() {
                let Some((kind, name)) = field.split_once(':') else {
                    continue;
                };
                let (admitted, throttled) = match kind {
                    "a" => (other(field), 0),
                    "t" => (0, other(field)),
                    _ => continue,
                };
                let entry = others.resources.entry(name.to_owned()).or_default();
                entry.0 += admitted;
                entry.1 += throttled;
            }
            others.in_flight += other("g:in_flight") as f64;
            others.queue += other("g:queue") as f64;
            seconds += 1;
        }
        self.read_up_to = now_sec.saturating_sub(1);
        if seconds > 0 {
            others.in_flight /= f64::from(seconds);
            others.queue /= f64::from(seconds);
        }
        Ok(Some(others))
    }
}
