//! A config known to be valid, and what changes between two of them: the one place that
//! knows which settings a running sluice takes live and which wait for a restart.

use std::ops::Deref;

use super::{validate, Config, ConfigError};

/// A config that passed validation: the only kind a policy is built from, so nothing after
/// validation checks it again. Read it like a [`Config`]; to change it, edit a copy
/// ([`ValidConfig::to_config`]) and validate that.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidConfig(Config);

impl Config {
    /// Validate into a value known to be valid; every problem, each named by its key.
    pub fn validated(self) -> Result<ValidConfig, Vec<ConfigError>> {
        validate(&self)?;
        Ok(ValidConfig(self))
    }
}

impl Deref for ValidConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.0
    }
}

impl ValidConfig {
    /// A copy to edit (then validate again).
    pub fn to_config(&self) -> Config {
        self.0.clone()
    }

    /// The config itself, to edit (then validate again).
    pub fn into_config(self) -> Config {
        self.0
    }

    /// What applying `next` over this config (the one in force) changes: the settings taken
    /// live, and those that take effect only after a restart — the listeners, the connect
    /// timeout, the store and the CA file, compared with `started`, what the process started
    /// with (a reload that changed them still needs that restart).
    pub fn changes(&self, next: &ValidConfig, started: &ValidConfig) -> Changes {
        let (old, new, first) = (&self.0, &next.0, &started.0);
        let other_timeouts = super::Timeouts {
            connect: old.timeouts.connect,
            ..new.timeouts.clone()
        };
        let changed = |keys: &[(bool, &'static str)]| -> Vec<&'static str> {
            keys.iter().filter(|(c, _)| *c).map(|(_, k)| *k).collect()
        };
        Changes {
            live: changed(&[
                (old.timeouts != other_timeouts, "timeouts"),
                (old.limits != new.limits, "limits"),
                (old.services != new.services, "service"),
            ]),
            needs_restart: changed(&[
                (first.listen != new.listen, "listen"),
                (
                    first.timeouts.connect != new.timeouts.connect,
                    "timeouts.connect",
                ),
                (first.store != new.store, "store"),
                (first.upstream != new.upstream, "upstream.ca_file"),
            ]),
        }
    }

    /// The endpoints `next` adds to or removes from each service, by URL (a service that
    /// appears or goes brings or takes all of its endpoints). Caps are the endpoints'
    /// effective ones; a cap that changes is not a membership change.
    pub fn membership(&self, next: &ValidConfig) -> Vec<Membership> {
        let caps = |config: &Config, service: &str| -> Vec<(String, u32)> {
            config
                .services
                .iter()
                .find(|s| s.name == service)
                .map(|s| {
                    (0..s.endpoints.len())
                        .map(|i| (s.endpoints[i].url().to_owned(), s.endpoint_cap(i)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut names: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
        for s in &next.services {
            if !names.contains(&s.name.as_str()) {
                names.push(&s.name);
            }
        }
        let mut changes = Vec::new();
        for service in names {
            let (old, new) = (caps(self, service), caps(next, service));
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
}

/// An endpoint that joins or leaves a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The service's name.
    pub service: String,
    /// The endpoint's URL.
    pub url: String,
    /// Its cap (in the config that has it).
    pub cap: u32,
    /// True when it joins, false when it leaves.
    pub joined: bool,
}

/// What a new config changes over the one in force, by top-level key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Changed settings applied at once.
    pub live: Vec<&'static str>,
    /// Changed settings that take effect only after a restart.
    pub needs_restart: Vec<&'static str>,
}
