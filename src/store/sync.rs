//! What the fleet agrees on, and the loop that keeps this replica in step with it:
//! - the replica set (heartbeats) and so this replica's share of every cap;
//! - the policy: the services (endpoints, caps, resources, autoscale settings) as one JSON
//!   document with a version. A change made on any replica is validated there, written with a
//!   compare-and-set on the version, and every other replica adopts it at its next poll
//!   ([`POLICY_POLL`]). A replica that starts while the store holds a policy follows it;
//! - the autoscale leader: a lease (SET NX with expiry, renewed every heartbeat) that carries
//!   a fencing token; only the holder steps the autoscaler, and its writes are refused once
//!   the lease is someone else's;
//! - the autoscaled values of each service, written by the leader after each step, and the
//!   fleet's per-second metric counts the leader's windows add up.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};

use super::redis::StoreError;
use super::Fleet;
use crate::balance::Share;
use crate::config::{OnError, ServiceConfig};
use crate::control::Control;

/// How often a replica looks for a new policy version: changes reach every replica within it
/// plus one store round trip.
pub const POLICY_POLL: Duration = Duration::from_millis(250);

/// Take or renew the lease KEYS[1] for ARGV[1] (ttl ARGV[2] ms). A new holder gets a new
/// fencing token (KEYS[2] incremented); returns the holder's token, or 0 when another holds it.
/// A holder whose token Redis lost (the counter evicted under an `allkeys-*` policy, or
/// deleted) gets a new one: without it the holder would renew the lease forever yet read no
/// token, and nobody would lead. The holder is checked by the fenced write too, so a token
/// counted again from 1 cannot let an old leader write.
const LEAD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local token = tonumber(redis.call('GET', KEYS[2]) or '0')
  if token and token > 0 then return {token, now} end
  return {redis.call('INCR', KEYS[2]), now}
end
if holder then return {0, now} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {redis.call('INCR', KEYS[2]), now}
";

/// Write ARGV[3] to KEYS[3] only while ARGV[1] holds the lease KEYS[1] with token ARGV[2].
const FENCED_SET: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[3], ARGV[3])
return 1
";

/// Publish policy ARGV[2] as the next version if the policy in the store (version KEYS[1],
/// generation KEYS[3]) is still the one this replica follows (ARGV[1], ARGV[3]), or if the
/// store holds none (never published, or Redis lost it: the first publish into an empty store
/// wins). Every publish draws a new generation (ARGV[4]), so a document is known by its
/// (version, generation) even across a reset that counts versions again. Returns the new
/// version, or 0 when the store holds another policy.
const PUBLISH: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local generation = redis.call('GET', KEYS[3]) or '0'
if current ~= 0 and (current ~= tonumber(ARGV[1]) or generation ~= ARGV[3]) then return 0 end
local version = math.max(current, tonumber(ARGV[1])) + 1
redis.call('SET', KEYS[1], version)
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[4])
return version
";

/// Which fleet policy document: its version and the generation drawn when it was published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyId {
    /// Counts publishes (again from the followed version after the store lost the policy).
    pub version: u64,
    /// Drawn at random by the publishing replica; 0 for none.
    pub generation: u64,
}

/// The fleet policy this replica follows, and whether it refused that document.
#[derive(Debug, Clone, Default)]
pub(super) struct Followed {
    id: PolicyId,
    /// Why this replica refused the document `id` (it runs the policy it had before).
    refused: Option<String>,
}

/// How long the outcome of a publish whose answer did not come in time is read back before
/// the change is answered as unconfirmed.
const READ_BACK: Duration = Duration::from_secs(1);

/// What reading back an unanswered publish found.
enum ReadBack {
    /// The store holds the document published (as this version).
    Applied(u64),
    /// The store still holds the policy the publish was to replace: it was not applied.
    NotApplied,
    /// The store could not be read, or holds a third policy (the publish may have been
    /// applied and replaced since).
    Unknown,
}

/// The fleet's policy document.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyDoc {
    /// The replica that published it.
    pub origin: String,
    /// Why (the change's description).
    pub reason: String,
    /// The services, as a config file would list them.
    pub services: Vec<ServiceConfig>,
    /// For a policy published again after the store lost it: the version its publisher
    /// followed (a replica that followed a later one publishes its own over it); else 0.
    #[serde(default)]
    pub restored_from: u64,
}

/// A service's autoscaled values, as the leader last wrote them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ScaleDoc {
    /// When the leader last stepped, ms since the Unix epoch on Redis's clock (`TIME`): the
    /// one clock every replica reads the same, so skew between replicas cannot move steps.
    pub stepped_at_ms: u64,
    /// Each autoscaled resource's limit.
    pub limits: BTreeMap<String, u32>,
    /// The per-endpoint cap.
    pub endpoint_concurrency: u32,
}

/// Scripts and keys of the shared state.
#[derive(Debug)]
pub(super) struct Scripts {
    lead: Script,
    fenced_set: Script,
    publish: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            lead: super::redis::script(LEAD),
            fenced_set: super::redis::script(FENCED_SET),
            publish: super::redis::script(PUBLISH),
        }
    }
}

impl Fleet {
    fn policy_keys(&self) -> (String, String, String) {
        (
            self.redis.key("policy:version"),
            self.redis.key("policy"),
            self.redis.key("policy:generation"),
        )
    }

    fn followed(&self) -> std::sync::MutexGuard<'_, Followed> {
        self.followed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fleet policy this replica follows.
    pub fn policy_id(&self) -> PolicyId {
        self.followed().id
    }

    /// The version of the fleet policy this replica refused, and why (it runs the one it had
    /// before); `None` when it runs the fleet's.
    pub fn refused_policy(&self) -> Option<(u64, String)> {
        let followed = self.followed();
        followed
            .refused
            .clone()
            .map(|why| (followed.id.version, why))
    }

    /// Publish `services` as the fleet's next policy, if the fleet is still at the version
    /// this replica follows. `Ok(None)`: another replica changed the policy first.
    pub async fn publish_policy(
        &self,
        services: &[ServiceConfig],
        reason: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.publish_over(services, reason, self.policy_id(), 0)
            .await
    }

    /// Publish `services` if the store holds the policy `followed` (or none), marked as
    /// restored from version `restored_from` (0: an ordinary change).
    async fn publish_over(
        &self,
        services: &[ServiceConfig],
        reason: &str,
        followed: PolicyId,
        restored_from: u64,
    ) -> Result<Option<u64>, StoreError> {
        let doc = PolicyDoc {
            origin: self.id.clone(),
            reason: reason.to_owned(),
            services: services.iter().map(hashed_keys).collect(),
            restored_from,
        };
        let json = serde_json::to_string(&doc).map_err(|e| StoreError::Data(e.to_string()))?;
        let (version_key, doc_key, generation_key) = self.policy_keys();
        let generation = rand::random::<u64>().max(1);
        let mut invocation = self.scripts.publish.key(&version_key);
        invocation
            .key(&doc_key)
            .key(&generation_key)
            .arg(followed.version)
            .arg(json)
            .arg(followed.generation)
            .arg(generation);
        let version: u64 = match self.redis.invoke(&invocation).await {
            Ok(version) => version,
            // The answer did not come, yet Redis may have applied the publish (and every
            // replica would adopt it): find out before answering.
            Err(e) if e.may_have_been_applied() => {
                match self.read_back(followed, generation).await {
                    ReadBack::Applied(version) => version,
                    ReadBack::NotApplied => return Err(e),
                    ReadBack::Unknown => return Err(StoreError::Unconfirmed(Box::new(e))),
                }
            }
            Err(e) => return Err(e),
        };
        if version == 0 {
            return Ok(None);
        }
        self.follow(PolicyId {
            version,
            generation,
        });
        Ok(Some(version))
    }

    /// Whether a publish of `generation` over `followed` whose answer did not come was
    /// applied. The calls share the publish's connection, so Redis answers them only after
    /// it ran the publish: a store that answers at all says what the publish did.
    async fn read_back(&self, followed: PolicyId, generation: u64) -> ReadBack {
        let (version_key, _, generation_key) = self.policy_keys();
        let until = tokio::time::Instant::now() + READ_BACK;
        while tokio::time::Instant::now() < until {
            let stored: Result<(Option<u64>, Option<u64>), _> = self
                .redis
                .query(redis::cmd("MGET").arg(&version_key).arg(&generation_key))
                .await;
            match stored {
                Ok((Some(version), Some(stored))) if stored == generation => {
                    return ReadBack::Applied(version)
                }
                Ok((version, stored)) => {
                    let id = PolicyId {
                        version: version.unwrap_or(0),
                        generation: stored.unwrap_or(0),
                    };
                    return if id == followed && id.version != 0 {
                        ReadBack::NotApplied
                    } else {
                        ReadBack::Unknown
                    };
                }
                // A connection that failed fast: give it a moment to come back.
                Err(_) => tokio::time::sleep(self.config.timeout.min(READ_BACK / 10)).await,
            }
        }
        ReadBack::Unknown
    }

    /// What the store holds: `Ok(None)` when it holds no policy (never published, or Redis
    /// lost it), else its id and, unless it is the one followed here, the document. Any other
    /// document wins, whatever its version: a newer one, or one published into a store that
    /// was reset (restarted empty, or restored to an older state) — the store's document is
    /// the fleet's.
    async fn stored_policy(&self) -> Result<Option<(PolicyId, Option<PolicyDoc>)>, StoreError> {
        let (version_key, doc_key, generation_key) = self.policy_keys();
        let (version, doc, generation): (Option<u64>, Option<String>, Option<u64>) = self
            .redis
            .query(
                redis::cmd("MGET")
                    .arg(&version_key)
                    .arg(&doc_key)
                    .arg(&generation_key),
            )
            .await?;
        let (Some(version), Some(doc)) = (version, doc) else {
            return Ok(None);
        };
        let id = PolicyId {
            version,
            generation: generation.unwrap_or(0),
        };
        if id == self.policy_id() {
            return Ok(Some((id, None)));
        }
        let doc: PolicyDoc = serde_json::from_str(&doc)
            .map_err(|e| StoreError::Data(format!("policy version {version}: {e}")))?;
        Ok(Some((id, Some(doc))))
    }

    /// Mark `id` as the policy in force here.
    pub fn follow(&self, id: PolicyId) {
        *self.followed() = Followed { id, refused: None };
    }

    /// Mark `id` as followed but refused here (`why`): it is not adopted again every poll,
    /// and no edit made here may publish over it (see `Control::change`).
    pub fn follow_refused(&self, id: PolicyId, why: String) {
        *self.followed() = Followed {
            id,
            refused: Some(why),
        };
    }

    /// Take or renew the autoscale lease; whether this replica leads now.
    async fn lead(&self) -> Result<bool, StoreError> {
        let mut invocation = self.scripts.lead.key(self.redis.key("leader"));
        invocation
            .key(self.redis.key("leader:epoch"))
            .arg(&self.id)
            .arg(self.member_ttl().as_millis() as u64);
        let reply: Vec<u64> = self.redis.invoke(&invocation).await?;
        let [token, redis_now_ms] = reply[..] else {
            return Err(StoreError::Data(format!("lead answered {reply:?}")));
        };
        let before = self.leader_token.swap(token, Ordering::AcqRel);
        if before != token && token != 0 {
            self.leading_since_ms.store(redis_now_ms, Ordering::Release);
        }
        if before != token {
            match token {
                0 => {
                    tracing::info!(target: "sluice::store", "another replica leads autoscaling now")
                }
                t => {
                    tracing::info!(target: "sluice::store", token = t, "this replica leads autoscaling now")
                }
            }
        }
        Ok(token != 0)
    }

    /// When this replica last took the autoscale lead (or a new token), ms on Redis's clock.
    pub fn leading_since_ms(&self) -> u64 {
        self.leading_since_ms.load(Ordering::Acquire)
    }

    /// Redis's clock now, ms since the Unix epoch: the clock autoscale steps are timed on.
    pub async fn redis_time_ms(&self) -> Result<u64, StoreError> {
        let (secs, micros): (u64, u64) = self.redis.query(&redis::cmd("TIME")).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    fn scale_key(&self, service: &str) -> String {
        self.redis.key(&format!("scale:{service}"))
    }

    /// The autoscaled values the leader last wrote for `service`.
    pub async fn scale(&self, service: &str) -> Result<Option<ScaleDoc>, StoreError> {
        let doc: Option<String> = self
            .redis
            .query(redis::cmd("GET").arg(self.scale_key(service)))
            .await?;
        doc.map(|d| serde_json::from_str(&d).map_err(|e| StoreError::Data(e.to_string())))
            .transpose()
    }

    /// Write `service`'s autoscaled values; `false` when this replica no longer leads (the
    /// write was fenced off).
    pub async fn publish_scale(&self, service: &str, doc: &ScaleDoc) -> Result<bool, StoreError> {
        let token = self.leader_token.load(Ordering::Acquire);
        if token == 0 {
            return Ok(false);
        }
        let json = serde_json::to_string(doc).map_err(|e| StoreError::Data(e.to_string()))?;
        let mut invocation = self.scripts.fenced_set.key(self.redis.key("leader"));
        invocation
            .key(self.redis.key("leader:epoch"))
            .key(self.scale_key(service))
            .arg(&self.id)
            .arg(token)
            .arg(json);
        let written: u64 = self.redis.invoke(&invocation).await?;
        if written == 0 {
            self.leader_token.store(0, Ordering::Release);
        }
        Ok(written == 1)
    }
}

/// `service` with every plain `key` replaced by its `key_sha256`: keys never reach the store.
fn hashed_keys(service: &ServiceConfig) -> ServiceConfig {
    let mut service = service.clone();
    for resource in &mut service.resources {
        if let (Some(digest), None) = (resource.key_digest(), &resource.key_sha256) {
            resource.key_sha256 = Some(digest.iter().map(|b| format!("{b:02x}")).collect());
            resource.key = None;
        }
    }
    service
}

/// One heartbeat: stamp this replica, update its share of every cap, renew or take the lease.
async fn beat(fleet: &Fleet, control: &Control) -> Result<(), StoreError> {
    let ttl = fleet.member_ttl();
    let grace = fleet.config.heartbeat * 2;
    let members = fleet
        .heartbeat
        .beat(&fleet.redis, &fleet.id, ttl, grace)
        .await?;
    let replicas = u32::try_from(members.ids.len()).unwrap_or(u32::MAX);
    let before = fleet.replicas.swap(replicas, Ordering::AcqRel);
    if before != replicas {
        tracing::info!(target: "sluice::store", replicas, "fleet size changed");
    }
    apply_share(fleet, control, members.share);
    fleet.lead().await?;
    Ok(())
}

fn apply_share(fleet: &Fleet, control: &Control, share: Share) {
    if fleet.share() != share {
        fleet.set_share(share);
        for service in &control.proxy().policy().services {
            service.pool.set_share(share);
        }
    }
}

/// A heartbeat that did not reach the store. Nobody leads then. A replica that never reached
/// the store does not know its share: rather than take no slots at all it enforces whole caps
/// until the store answers. A replica cut off from the store (the others count it gone 3
/// heartbeats after its last stamp and take its share) keeps its share with `on_error` local
/// or allow (availability; the cap can be exceeded while only some replicas are cut off, see
/// README), and with `deny` gives it up after 2 heartbeats, before the others can take it (the
/// cap holds; this replica takes no slots until it joins again).
fn missed(fleet: &Fleet, control: &Control) {
    fleet.leader_token.store(0, Ordering::Release);
    let ttl = fleet.member_ttl();
    match fleet.heartbeat.missed(ttl) {
        None if fleet.share() == Share::NONE => {
            tracing::warn!(target: "sluice::store", "store unreachable before this replica joined: enforcing whole caps alone until it answers");
            apply_share(fleet, control, Share::WHOLE);
        }
        // Before the others can count it gone (3 heartbeats after its last stamp).
        Some(cut_off)
            if cut_off >= fleet.config.heartbeat * 2
                && fleet.on_error() == OnError::Deny
                && fleet.share() != Share::NONE =>
        {
            tracing::warn!(target: "sluice::store", "cut off from the store for 2 heartbeats: giving up this replica's share of every cap (on_error = \"deny\")");
            fleet.heartbeat.leave();
            apply_share(fleet, control, Share::NONE);
        }
        _ => {}
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
    let services = control.proxy().policy().config.services.clone();
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
            let services = control.proxy().policy().config.services.clone();
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
    let mut beats = tokio::time::interval(fleet.config.heartbeat);
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
