//! Building and running sluice: everything is built in one place from a validated config,
//! listeners are bound, then `run` serves until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::autoscale;
use crate::balance::InvalidEndpointUrl;
use crate::config::Config;
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
}

impl App {
    /// Build the proxy from a validated `config` and bind its listener.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let policy = Policy::from_config(config, None)?;
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
        })
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
        proxy::serve(self.proxy_listener, self.proxy, shutdown).await;
        loops.abort_all();
        tracing::info!("sluice stopped");
    }
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
