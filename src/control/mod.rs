//! Every change to the live policy goes through here, one at a time: reloads of the config file
//! (SIGHUP, `POST /admin/reload`), live changes from the admin API, and the fleet's policy. A
//! live change edits a copy of the live config, which is validated once, exactly like the
//! file, and built into a new policy: it is applied whole, atomically, or not at all.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::Mutex;

use crate::autoscale::{Event, EventKind, ScaleTarget};
use crate::balance::InvalidEndpointUrl;
use crate::config::{Config, ConfigError, LoadError, ValidConfig};
use crate::policy::{Live, Policy};
use crate::recorders::{DnsLookups, ReloadStats};

pub mod autoscale;
pub mod discovery;
pub mod fleet;
pub mod health;
pub mod notify;

/// Why a change changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The changed config is invalid; every problem, keyed like the file.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<ConfigError>),
    /// The service or resource named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change contradicts the live state (e.g. a resource created without a key).
    #[error("{0}")]
    Conflict(String),
    /// The config file could not be read, parsed or validated.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// sluice was started without a config file to reload.
    #[error("no config file to reload (sluice was started without one, e.g. by `sluice demo`)")]
    NoFile,
    /// An endpoint URL could not be used.
    #[error(transparent)]
    Endpoint(#[from] InvalidEndpointUrl),
    /// The fleet's store could not take the change, so no replica made it.
    #[error("the shared store did not take the change, nothing changed: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The store's answer to the change did not come and its outcome could not be read back:
    /// it may yet reach every replica (this one included) within a policy poll.
    #[error(
        "the shared store did not confirm the change ({0}); it may still have been made and \
         reach every replica within a second: GET /admin/policy shows what is in force"
    )]
    Unconfirmed(crate::store::StoreError),
}

/// What a successful reload did.
#[derive(Debug)]
pub struct Reloaded {
    /// One-line summary of the new config.
    pub summary: String,
    /// Autoscale values the reload changed.
    pub events: Vec<Event>,
    /// Changed settings applied at once, by top-level key (`timeouts`, `limits`, `service`).
    pub changed: Vec<&'static str>,
    /// Changed settings that only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// The single writer of the live policy.
pub struct Control {
    live: Arc<Live>,
    path: Option<PathBuf>,
    /// The config sluice started with: listeners and client settings come from it.
    started: ValidConfig,
    serial: Mutex<()>,
    reloads: ReloadStats,
    dns: DnsLookups,
}

impl Control {
    /// Control of the `live` state, started from `config`, reloadable from `path` when given.
    pub fn new(live: Arc<Live>, config: ValidConfig, path: Option<PathBuf>) -> Self {
        Self {
            live,
            path,
            started: config,
            serial: Mutex::new(()),
            reloads: ReloadStats::default(),
            dns: DnsLookups::default(),
        }
    }

    /// DNS lookups of endpoint names so far.
    pub fn dns(&self) -> &DnsLookups {
        &self.dns
    }

    /// Reloads applied and refused.
    pub fn reloads(&self) -> &ReloadStats {
        &self.reloads
    }

    /// The live state it changes.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// Re-read the config file. An invalid file is refused with every problem and the old
    /// policy stays in force; a valid one replaces it (live admin changes included).
    pub async fn reload(&self) -> Result<Reloaded, ChangeError> {
        let path = self.path.as_ref().ok_or(ChangeError::NoFile)?;
        let _one_at_a_time = self.serial.lock().await;
        let config = Config::load(path)?;
        let summary = config.summary();
        let reason = format!("config reloaded from {}: {summary}", path.display());
        let target = ScaleTarget::Setting {
            key: "config".into(),
        };
        let changes = self.live.policy().config.changes(&config, &self.started);
        self.publish(&config, &reason).await?;
        let mut events = self.install(config, "*", target, reason)?;
        events.retain(|e| e.kind != EventKind::Reload || e.service != "*");
        Ok(Reloaded {
            summary,
            events,
            changed: changes.live,
            needs_restart: changes.needs_restart,
        })
    }

    /// Reload and log the outcome.
    pub async fn reload_and_log(&self) -> Result<Reloaded, ChangeError> {
        let outcome = self.reload().await;
        let counter = match &outcome {
            Ok(_) => &self.reloads.ok,
            Err(_) => &self.reloads.failed,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &outcome {
            Ok(done) => {
                tracing::info!(summary = %done.summary, changed = ?done.changed, "config reloaded");
                if !done.needs_restart.is_empty() {
                    tracing::warn!(keys = ?done.needs_restart, "changed settings take effect after a restart");
                }
            }
            Err(e) => tracing::error!("config reload refused, the old policy stays: {e}"),
        }
        outcome
    }

    /// Apply `edit` to a copy of the live config of `service`, validate it like the file and
    /// make it live; `key` and `reason` describe the change in the event history.
    pub async fn change(
        &self,
        service: &str,
        target: ScaleTarget,
        reason: String,
        edit: impl FnOnce(&mut Config) -> Result<(), ChangeError>,
    ) -> Result<Vec<Event>, ChangeError> {
        let _one_at_a_time = self.serial.lock().await;
        self.check_runs_fleet_policy()?;
        let mut config = self.live.policy().config.to_config();
        edit(&mut config)?;
        let config = config.validated().map_err(ChangeError::Invalid)?;
        self.publish(&config, &reason).await?;
        self.install(config, service, target, reason)
    }

    /// With a shared store, make `config`'s services the fleet's next policy version before
    /// this replica applies it, so a change is made everywhere or nowhere.
    async fn publish(&self, config: &ValidConfig, reason: &str) -> Result<(), ChangeError> {
        let Some(fleet) = self.live.fleet() else {
            return Ok(());
        };
        match fleet.publish_policy(&config.services, reason).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ChangeError::Conflict(
                "another replica changed the fleet policy a moment ago; nothing changed here, retry"
                    .into(),
            )),
            Err(crate::store::StoreError::Unconfirmed(e)) => Err(ChangeError::Unconfirmed(*e)),
            Err(e) => Err(e.into()),
        }
    }

    /// An edit is made to the services this replica runs. On a replica that refused the
    /// fleet's policy those are older than the fleet's, and publishing them would undo that
    /// policy on every replica. (A reload publishes the file instead: an operator's way out.)
    fn check_runs_fleet_policy(&self) -> Result<(), ChangeError> {
        let Some((version, why)) = self.live.fleet().and_then(|f| f.refused_policy()) else {
            return Ok(());
        };
        Err(ChangeError::Conflict(format!(
            "this replica refused the fleet's policy version {version} ({why}) and runs an older \
             one, so a change made here would undo that version everywhere; nothing changed. \
             Make the change on a replica that runs the fleet's policy, or reload a valid file here"
        )))
    }

    /// Apply the fleet's policy `id` (published by replica `origin`): this replica's
    /// config with the fleet's services, validated like the file.
    pub async fn adopt(
        &self,
        services: Vec<crate::config::ServiceConfig>,
        id: crate::store::PolicyId,
        origin: &str,
        reason: &str,
    ) -> Result<(), ChangeError> {
        let _one_at_a_time = self.serial.lock().await;
        let mut config = self.live.policy().config.to_config();
        if config.services == services {
            if let Some(fleet) = self.live.fleet() {
                fleet.follow(id);
            }
            return Ok(());
        }
        let version = id.version;
        config.services = services;
        let target = ScaleTarget::Setting {
            key: "fleet_policy".into(),
        };
        let reason = format!("fleet policy version {version} from replica {origin}: {reason}");
        let config = config.validated().map_err(ChangeError::Invalid)?;
        self.install(config, "*", target, reason)?;
        if let Some(fleet) = self.live.fleet() {
            fleet.follow(id);
        }
        Ok(())
    }

    /// Build and swap in `config`; record the change and what it caused.
    fn install(
        &self,
        config: ValidConfig,
        service: &str,
        target: ScaleTarget,
        reason: String,
    ) -> Result<Vec<Event>, ChangeError> {
        let previous = self.live.policy();
        let now = Utc::now();
        let kind = match (service, &target) {
            ("*", _) => EventKind::Reload,
            _ => EventKind::Manual,
        };
        let from = setting_value(&previous.config, service, &target);
        let to = setting_value(&config, service, &target);
        let change = Event::change(now, service, target, kind, (from, to), reason.clone());
        let (membership, caused) = self.rebuild(config, &reason)?;
        // The change itself first, then what it caused: endpoints that joined or left, then
        // autoscale values.
        let events = std::iter::once(change)
            .chain(membership)
            .chain(caused)
            .collect();
        Ok(self.record(events))
    }

    /// What DNS found changed: rebuild the policy in force with `discovered` and record the
    /// endpoints that joined or left (`reason` says which lookup).
    pub async fn rediscovered(
        &self,
        discovered: crate::balance::Discovered,
        reason: &str,
    ) -> Result<Vec<Event>, ChangeError> {
        let _one_at_a_time = self.serial.lock().await;
        self.live.set_discovered(discovered);
        let config = self.live.policy().config.clone();
        let (membership, caused) = self.rebuild(config, reason)?;
        Ok(self.record(membership.into_iter().chain(caused).collect()))
    }

    /// Build `config` into the policy in force (with what DNS found last) and swap it in.
    /// Returns the endpoints that joined or left, as events, and the autoscale events the
    /// change caused.
    fn rebuild(
        &self,
        config: ValidConfig,
        reason: &str,
    ) -> Result<(Vec<Event>, Vec<Event>), ChangeError> {
        let previous = self.live.policy();
        let now = Utc::now();
        // Pools are shared with the new policy and change in place: what they held, first.
        let before = previous.endpoints();
        let (policy, caused) = Policy::reload(
            &config,
            &self.live.discovered(),
            Some(&previous),
            now,
            self.live.fleet(),
        )?;
        let after = policy.endpoints();
        self.live.set_policy(policy);
        let membership = crate::policy::membership(&before, &after)
            .into_iter()
            .map(|m| {
                let (kind, from_to, verb) = match m.joined {
                    true => (EventKind::EndpointAdded, (0, m.cap), "joined"),
                    false => (EventKind::EndpointRemoved, (m.cap, 0), "left"),
                };
                let why = format!(
                    "endpoint {} {verb} service {:?} ({reason})",
                    m.url, m.service
                );
                let target = ScaleTarget::Endpoint { endpoint: m.url };
                Event::change(now, m.service, target, kind, from_to, why)
            })
            .collect();
        Ok((membership, caused))
    }

    /// Number `events` into the history and log them.
    fn record(&self, events: Vec<Event>) -> Vec<Event> {
        events.into_iter().map(|e| self.live.record(e)).collect()
    }
}

/// The number an event about `target` reports: a resource's base TPS (0 when absent), the
/// service's per-endpoint cap, or 0 for other settings.
fn setting_value(config: &Config, service: &str, target: &ScaleTarget) -> u32 {
    let Some(s) = config.services.iter().find(|s| s.name == service) else {
        return 0;
    };
    match target {
        ScaleTarget::Resource { resource } => {
            let default_tps = s.rate_limit().map_or(0, |r| r.default_tps);
            s.resources
                .iter()
                .find(|r| &r.name == resource)
                .map_or(0, |r| r.tps.unwrap_or(default_tps))
        }
        ScaleTarget::EndpointConcurrency => s.max_concurrent.initial(s.adaptive_bounds()),
        ScaleTarget::Setting { .. } => 0,
        ScaleTarget::Endpoint { endpoint } => s
            .endpoints
            .iter()
            .position(|e| e.url() == endpoint)
            .map_or(0, |i| s.endpoint_cap(i).initial(s.adaptive_bounds())),
    }
}
