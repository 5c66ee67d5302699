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
                (old.resolver != new.resolver, "resolver"),
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
}

/// What a new config changes over the one in force, by top-level key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Changed settings applied at once.
    pub live: Vec<&'static str>,
    /// Changed settings that take effect only after a restart.
    pub needs_restart: Vec<&'static str>,
}
