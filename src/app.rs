//! Building and running sluice: everything is built in one place from a validated config,
//! listeners are bound, then `run` serves until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::autoscale;
use crate::autoscale::Event;
use crate::balance::InvalidEndpointUrl;
use crate::config::{Config, LoadError};
use crate::policy::Policy;
use crate::proxy::{self, Proxy};

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An endpoint URL could not be used.
    #[error(transparent)]
    Endpoint(#[from] InvalidEndpointUrl),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A sluice with its listeners bound, ready to run.
pub struct App {
    proxy: Arc<Proxy>,
    proxy_listener: TcpListener,
    reloader: Option<Arc<Reloader>>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read, parsed or validated (every problem is listed).
    #[error(transparent)]
    Config(#[from] LoadError),
    /// An endpoint URL could not be used.
    #[error(transparent)]
    Endpoint(#[from] InvalidEndpointUrl),
}

/// What a successful reload did.
#[derive(Debug)]
pub struct Reloaded {
    /// One-line summary of the new config.
    pub summary: String,
    /// Autoscale values the reload changed.
    pub events: Vec<Event>,
    /// Settings that only take effect after a restart and differ from the running ones.
    pub needs_restart: Vec<&'static str>,
}

/// Re-reads the config file and makes it the live policy, or changes nothing.
pub struct Reloader {
    proxy: Arc<Proxy>,
    path: PathBuf,
    running: Config,
    serial: Mutex<()>,
}

impl Reloader {
    /// A reloader for `proxy`, whose running config came from `path`.
    pub fn new(proxy: Arc<Proxy>, path: PathBuf, running: Config) -> Self {
        Self {
            proxy,
            path,
            running,
            serial: Mutex::new(()),
        }
    }

    /// Reload now (SIGHUP, `POST /admin/reload`). An invalid file is refused with every problem
    /// and the old policy stays in force; a valid one replaces it atomically.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        // One reload at a time: each builds on the policy the previous one left.
        let _serial = self.serial.lock().await;
        let config = Config::load(&self.path)?;
        let previous = self.proxy.policy();
        let (policy, events) = Policy::reload(&config, Some(&previous), chrono::Utc::now())?;
        self.proxy.set_policy(policy);
        for event in &events {
            self.proxy.events().push(event.clone());
        }
        let mut needs_restart = Vec::new();
        if config.listen.proxy != self.running.listen.proxy {
            needs_restart.push("listen.proxy");
        }
        if config.timeouts.connect != self.running.timeouts.connect {
            needs_restart.push("timeouts.connect");
        }
        if config.timeouts.client_header != self.running.timeouts.client_header {
            needs_restart.push("timeouts.client_header");
        }
        Ok(Reloaded {
            summary: config.summary(),
            events,
            needs_restart,
        })
    }

    /// Reload and log the outcome.
    pub async fn reload_and_log(&self) -> Result<Reloaded, ReloadError> {
        let outcome = self.reload().await;
        match &outcome {
            Ok(done) => {
                tracing::info!(config = %self.path.display(), summary = %done.summary, "config reloaded");
                if !done.needs_restart.is_empty() {
                    tracing::warn!(keys = ?done.needs_restart, "changed settings take effect after a restart");
                }
            }
            Err(e) => {
                tracing::error!(config = %self.path.display(), "config reload refused, old policy stays: {e}")
            }
        }
        outcome
    }
}

impl App {
    /// Build the proxy from a validated `config` and bind its listener.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let policy = Policy::from_config(config)?;
        let proxy = Proxy::new(policy, config.timeouts.connect);
        let addr = &config.listen.proxy;
        let proxy_listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: addr.clone(),
                source,
            })?;
        Ok(Self {
            proxy,
            proxy_listener,
            reloader: None,
        })
    }

    /// Reload from `path` on SIGHUP (and, later, from the admin API); `config` is what it holds
    /// now.
    pub fn reload_from(mut self, path: PathBuf, config: Config) -> Self {
        self.reloader = Some(Arc::new(Reloader::new(
            Arc::clone(&self.proxy),
            path,
            config,
        )));
        self
    }

    /// The reloader, when the app was given its config file.
    pub fn reloader(&self) -> Option<Arc<Reloader>> {
        self.reloader.clone()
    }

    /// The address the proxy listens on (useful when the config asked for port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// The proxy, to inspect its live policy and counters.
    pub fn proxy(&self) -> Arc<Proxy> {
        Arc::clone(&self.proxy)
    }

    /// Serve until `shutdown` resolves, then drain in-flight requests within the configured
    /// grace.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tracing::info!(proxy = %self.proxy_addr(), "sluice listening");
        // One autoscale loop per service; a loop idles while its service has no autoscale.
        let mut loops = tokio::task::JoinSet::new();
        let notifier = autoscale::Notifier::default();
        for service in &self.proxy.policy().services {
            loops.spawn(autoscale::run(
                Arc::clone(&self.proxy),
                Arc::clone(&service.name),
                Arc::clone(self.proxy.events()),
                notifier.clone(),
                chrono::Utc::now,
            ));
        }
        if let Some(reloader) = self.reloader.clone() {
            loops.spawn(reload_on_hangup(reloader));
        }
        proxy::serve(self.proxy_listener, self.proxy, shutdown).await;
        loops.abort_all();
        tracing::info!("sluice stopped");
    }
}

/// Reload the config on every SIGHUP.
async fn reload_on_hangup(reloader: Arc<Reloader>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: reload through the admin API only");
            return;
        };
        while hangups.recv().await.is_some() {
            let _ = reloader.reload_and_log().await;
        }
    }
    #[cfg(not(unix))]
    let _ = reloader;
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
