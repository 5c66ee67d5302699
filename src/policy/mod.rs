//! The live policy: the services, their routes and their capacity, as one immutable snapshot
//! behind an `ArcSwap`. A request loads it once, so a change never shows it half of each.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::autoscale::Event;
use crate::balance::{Discovered, InvalidEndpointUrl, Pool, Shape, Share};
use crate::config::{Timeouts, ValidConfig};
use crate::limit::{RateLimiter, SharedBuckets};
use crate::recorders::{ServiceStats, UnroutedStats};
use crate::store::Fleet;
pub use autoscaler::ServiceAutoscaler;
pub use live::Live;

pub mod autoscaler;
mod live;

/// One service as the request path sees it.
#[derive(Debug)]
pub struct Service {
    /// Name from the config.
    pub name: Arc<str>,
    /// Path prefix that routes to it.
    pub path_prefix: String,
    /// Its endpoints and slots; kept across policy changes for a service that keeps its name.
    pub pool: Arc<Pool>,
    /// Per-resource (API key) rate limits, when the service has them.
    pub rate: Option<RateLimiter>,
    /// The autoscaler, when anything in the service autoscales.
    pub autoscale: Option<Arc<ServiceAutoscaler>>,
    /// Counts for /metrics; kept across policy changes for a service that keeps its name.
    pub stats: Arc<ServiceStats>,
}

/// A snapshot of everything a request needs to be routed and admitted.
#[derive(Debug)]
pub struct Policy {
    /// Services in config order.
    pub services: Vec<Arc<Service>>,
    /// Indexes into `services`, longest prefix first.
    routes: Vec<usize>,
    /// Time limits.
    pub timeouts: Timeouts,
    /// The config this policy was built from (with live changes): what admin changes edit.
    pub config: ValidConfig,
    /// Counts of requests that matched no service; kept across policy changes.
    pub unrouted: Arc<UnroutedStats>,
}

impl Policy {
    /// Build from a validated config, before anything was looked up in DNS; with `fleet`,
    /// limits are shared with its replicas.
    pub fn from_config(
        config: &ValidConfig,
        fleet: Option<&Arc<Fleet>>,
    ) -> Result<Self, InvalidEndpointUrl> {
        Self::reload(config, &Discovered::default(), None, Utc::now(), fleet)
            .map(|(policy, _)| policy)
    }

    /// Build from a validated config, carrying over from `previous`: services that keep their
    /// name (and endpoints that keep their URL) keep their counters and queue, so in-flight
    /// requests carry over; resources keep their usage; autoscaled limits and cooldowns carry
    /// over. Entries to resolve stand for what `discovered` says. Returns the autoscale
    /// events the change caused.
    pub fn reload(
        config: &ValidConfig,
        discovered: &Discovered,
        previous: Option<&Policy>,
        wall: DateTime<Utc>,
        fleet: Option<&Arc<Fleet>>,
    ) -> Result<(Self, Vec<Event>), InvalidEndpointUrl> {
        let share = fleet.map_or(Share::WHOLE, |f| f.share());
        let find_previous =
            |name: &str| previous.and_then(|p| p.services.iter().find(|s| &*s.name == name));
        // Build every shape first, so a failure leaves the live pools untouched.
        let shapes = config
            .services
            .iter()
            .map(|s| {
                let old = find_previous(&s.name);
                let old_shape = old.map(|o| o.pool.shape_snapshot());
                Shape::from_config(s, discovered, old_shape.as_deref(), share)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut events = Vec::new();
        // The limiters reach the fleet's buckets through limit's interface.
        let buckets = fleet.map(|f| Arc::clone(f) as Arc<dyn SharedBuckets>);
        let services: Vec<Arc<Service>> = config
            .services
            .iter()
            .zip(shapes)
            .map(|(s, shape)| {
                let pool = match find_previous(&s.name) {
                    Some(old) => {
                        old.pool.set_shape(shape);
                        Arc::clone(&old.pool)
                    }
                    None => Pool::new(shape),
                };
                let old_rate = find_previous(&s.name).and_then(|o| o.rate.as_ref());
                let rate = s.rate_limit().map(|settings| {
                    let fleet = buckets.as_ref().map(|f| (f, s.name.as_str()));
                    RateLimiter::from_config(&settings, &s.resources, old_rate, fleet)
                });
                let old_autoscale = find_previous(&s.name).and_then(|o| o.autoscale.as_deref());
                let autoscale = s.autoscale().map(|settings| {
                    let now = tokio::time::Instant::now().into_std();
                    let (autoscaler, changed) = ServiceAutoscaler::build(
                        s,
                        settings,
                        rate.as_ref(),
                        old_autoscale,
                        now,
                        wall,
                    );
                    events.extend(changed);
                    // A learned cap has no autoscale rule (validation refuses one).
                    let fixed = s.max_concurrent.fixed();
                    if fixed.is_some_and(|n| autoscaler.endpoint_concurrency() != n) {
                        pool.set_default_cap(autoscaler.endpoint_concurrency());
                    }
                    Arc::new(autoscaler)
                });
                let stats =
                    find_previous(&s.name).map_or_else(Arc::default, |o| Arc::clone(&o.stats));
                Arc::new(Service {
                    stats,
                    name: s.name.as_str().into(),
                    path_prefix: s.path_prefix.clone(),
                    pool,
                    rate,
                    autoscale,
                })
            })
            .collect();
        let mut routes: Vec<usize> = (0..services.len()).collect();
        routes.sort_by_key(|&i| std::cmp::Reverse(services[i].path_prefix.len()));
        let policy = Self {
            services,
            routes,
            timeouts: config.timeouts.clone(),
            config: config.clone(),
            unrouted: previous.map_or_else(Arc::default, |p| Arc::clone(&p.unrouted)),
        };
        Ok((policy, events))
    }

    /// The service with the longest prefix that matches `path` on a segment boundary
    /// (`/score` matches `/score` and `/score/v1`, not `/scores`).
    pub fn route(&self, path: &str) -> Option<&Arc<Service>> {
        self.routes
            .iter()
            .map(|&i| &self.services[i])
            .find(|s| prefix_matches(&s.path_prefix, path))
    }

    /// The service named `name`.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.iter().find(|s| &*s.name == name)
    }

    /// Every service's endpoints now, by URL with their caps: what [`membership`] compares.
    pub fn endpoints(&self) -> Endpoints {
        self.services
            .iter()
            .map(|s| {
                let shape = s.pool.shape();
                let endpoints = (0..shape.endpoints.len())
                    .map(|i| (shape.endpoints[i].0.url().to_owned(), shape.cap(i)))
                    .collect();
                (s.name.to_string(), endpoints)
            })
            .collect()
    }
}

/// Each service's endpoints (URL, cap) at one moment, services in config order.
pub type Endpoints = Vec<(String, Vec<(String, u32)>)>;

/// An endpoint that joins or leaves a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The service.
    pub service: String,
    /// The endpoint's URL (for one DNS found, its address).
    pub url: String,
    /// Its cap (what it brings or takes away).
    pub cap: u32,
    /// True when it joins, false when it leaves.
    pub joined: bool,
}

/// The endpoints that joined or left each service from `before` to `after` (a service that
/// appears or goes brings or takes all of its endpoints); whatever changed them — the file,
/// the admin API, the fleet or DNS. A cap that changes is not a membership change.
pub fn membership(before: &Endpoints, after: &Endpoints) -> Vec<Membership> {
    let of = |side: &Endpoints, service: &str| -> Vec<(String, u32)> {
        side.iter()
            .find(|(name, _)| name == service)
            .map(|(_, endpoints)| endpoints.clone())
            .unwrap_or_default()
    };
    let mut names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    for (name, _) in after {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    let mut changes = Vec::new();
    for service in names {
        let (old, new) = (of(before, service), of(after, service));
        // Those of `from` not in `to`: joined (new over old), then left (old over new).
        for (from, to, joined) in [(&new, &old, true), (&old, &new, false)] {
            for (url, cap) in from {
                if !to.iter().any(|(u, _)| u == url) {
                    changes.push(Membership {
                        service: service.to_owned(),
                        url: url.clone(),
                        cap: *cap,
                        joined,
                    });
                }
            }
        }
    }
    changes
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let config = Config::parse(
            r#"
            [[service]]
            name = "all"
            endpoints = ["http://127.0.0.1:1"]
            [[service]]
            name = "score"
            path_prefix = "/score"
            endpoints = ["http://127.0.0.1:2"]
            [[service]]
            name = "v2"
            path_prefix = "/score/v2/"
            endpoints = ["http://127.0.0.1:3"]
            "#,
        )
        .unwrap()
        .validated()
        .unwrap();
        let policy = Policy::from_config(&config, None).unwrap();
        let route = |p: &str| policy.route(p).map(|s| s.name.to_string());
        assert_eq!(route("/score").as_deref(), Some("score"));
        assert_eq!(route("/score/v1").as_deref(), Some("score"));
        assert_eq!(route("/scores").as_deref(), Some("all"));
        assert_eq!(route("/score/v2/x").as_deref(), Some("v2"));
        assert_eq!(route("/").as_deref(), Some("all"));
    }
}
