//! What the fleet agrees on (the loop that keeps a replica in step with it is
//! `control::fleet`):
//! - the replica set (heartbeats) and so this replica's share of every cap;
//! - the policy: the services (endpoints, caps, resources, autoscale settings) as one JSON
//!   document with a version. A change made on any replica is validated there, written with a
//!   compare-and-set on the version, and every other replica adopts it at its next poll
//!   (`control::fleet::POLICY_POLL`). A replica that starts while the store holds a policy
//!   follows it;
//! - the autoscale leader: a lease (SET NX with expiry, renewed every heartbeat) that carries
//!   a fencing token; only the holder steps the autoscaler, and its writes are refused once
//!   the lease is someone else's;
//! - the autoscaled values of each service, written by the leader after each step, and the
//!   fleet's per-second metric counts the leader's windows add up.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};

use super::redis::StoreError;
use super::Fleet;
use crate::balance::Share;
use crate::config::{OnError, ServiceConfig};

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
    pub async fn publish_over(
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
    pub async fn stored_policy(&self) -> Result<Option<(PolicyId, Option<PolicyDoc>)>, StoreError> {
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
    pub async fn lead(&self) -> Result<bool, StoreError> {
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

impl Fleet {
    /// Stamp this replica in the live set; its share of every cap as the set now stands.
    pub async fn stamp(&self) -> Result<Share, StoreError> {
        let ttl = self.member_ttl();
        let grace = self.config.heartbeat * 2;
        let members = self
            .heartbeat
            .beat(&self.redis, &self.id, ttl, grace)
            .await?;
        let replicas = u32::try_from(members.ids.len()).unwrap_or(u32::MAX);
        let before = self.replicas.swap(replicas, Ordering::AcqRel);
        if before != replicas {
            tracing::info!(target: "sluice::store", replicas, "fleet size changed");
        }
        Ok(members.share)
    }

    /// A heartbeat did not reach the store; the share this replica must take now, if it
    /// changes. Nobody leads then. A replica that never reached the store does not know its
    /// share: rather than take no slots at all it enforces whole caps until the store
    /// answers. A replica cut off from the store (the others count it gone 3 heartbeats after
    /// its last stamp and take its share) keeps its share with `on_error` local or allow
    /// (availability; the cap can be exceeded while only some replicas are cut off, see
    /// docs/fleet.md), and with `deny` gives it up after 2 heartbeats, before the others can
    /// take it (the cap holds; this replica takes no slots until it joins again).
    pub fn missed_heartbeat(&self) -> Option<Share> {
        self.leader_token.store(0, Ordering::Release);
        let ttl = self.member_ttl();
        match self.heartbeat.missed(ttl) {
            None if self.share() == Share::NONE => {
                tracing::warn!(target: "sluice::store", "store unreachable before this replica joined: enforcing whole caps alone until it answers");
                Some(Share::WHOLE)
            }
            // Before the others can count it gone (3 heartbeats after its last stamp).
            Some(cut_off)
                if cut_off >= self.config.heartbeat * 2
                    && self.on_error() == OnError::Deny
                    && self.share() != Share::NONE =>
            {
                tracing::warn!(target: "sluice::store", "cut off from the store for 2 heartbeats: giving up this replica's share of every cap (on_error = \"deny\")");
                self.heartbeat.leave();
                Some(Share::NONE)
            }
            _ => None,
        }
    }
}
