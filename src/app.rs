//! Building and running sluice: everything is built in one place from a validated config,
//! listeners are bound, then `run` serves until shutdown.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::admin;
use crate::balance::InvalidEndpointUrl;
use crate::config::{Backend, CaFileError, ValidConfig};
use crate::control::{self, Control};
use crate::policy::{Live, Policy};
use crate::proxy::{self, Proxy};
use crate::store::Fleet;
use crate::upstream::Connect;

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An endpoint URL could not be used.
    #[error(transparent)]
    Endpoint(#[from] InvalidEndpointUrl),
    /// The shared store's settings cannot be used.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// `[upstream] ca_file` cannot be used (it changed since the config was checked).
    #[error("upstream.ca_file: {0}")]
    CaFile(#[from] CaFileError),
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
    admin_listener: Option<TcpListener>,
    admin_token: Option<String>,
    control: Arc<Control>,
    connect: Connect,
}

/// Bind a listener on `addr`. The unspecified IPv6 address (`[::]`, the proxy's default) is
/// made dual-stack, IPV6_V6ONLY off whatever the host's `net.ipv6.bindv6only` says, so IPv4
/// clients reach it too (as IPv4-mapped addresses); on a host without IPv6 it falls back to
/// 0.0.0.0 on the same port.
fn bind(addr: &str) -> Result<TcpListener, StartError> {
    let failed = |source| StartError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|e| failed(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let SocketAddr::V6(v6) = parsed else {
        return listen(parsed, false).map_err(failed);
    };
    if !v6.ip().is_unspecified() {
        return listen(parsed, false).map_err(failed);
    }
    match listen(parsed, true) {
        Err(e) if no_ipv6(&e) => {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, parsed.port()));
            tracing::warn!(%addr, error = %e, fallback = %v4, "no IPv6 on this host: listening on IPv4 only");
            listen(v4, false).map_err(failed)
        }
        result => result.map_err(failed),
    }
}

/// A host without IPv6: the kernel has no AF_INET6 (socket creation fails with EAFNOSUPPORT,
/// 97 on Linux) or no IPv6 address to bind (`disable_ipv6`: EADDRNOTAVAIL).
fn no_ipv6(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(97)
}

/// What `tokio::net::TcpListener::bind` does (SO_REUSEADDR, backlog 1024), plus IPV6_V6ONLY
/// off when `dual_stack`, which tokio cannot set.
fn listen(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

impl App {
    /// Build the proxy from a validated `config` and bind its listeners. The admin token
    /// comes from env `SLUICE_ADMIN_TOKEN` (see [`App::admin_token`]).
    pub async fn bind(config: &ValidConfig) -> Result<Self, StartError> {
        // Start the uptime clock the admin views report.
        let _ = crate::stats::uptime();
        let fleet = match config.store.backend {
            Backend::Memory => None,
            Backend::Redis => Some(Fleet::connect(&config.store)?),
        };
        let policy = Policy::from_config(config, fleet.as_ref())?;
        let connect = Connect::new(config.timeouts.connect, config.upstream.ca_file.as_deref())?;
        let live = Live::new(policy, fleet.clone());
        let proxy = Proxy::serving(Arc::clone(&live), connect.clone());
        let proxy_listener = bind(&config.listen.proxy)?;
        let admin_listener = match config.listen.admin.as_str() {
            "" => None,
            addr => Some(bind(addr)?),
        };
        let control = Arc::new(Control::new(live, config.clone(), None));
        if let Some(fleet) = &fleet {
            control::fleet::join(fleet, &control).await;
        }
        Ok(Self {
            control,
            proxy,
            proxy_listener,
            admin_listener,
            admin_token: std::env::var("SLUICE_ADMIN_TOKEN").ok(),
            connect,
        })
    }

    /// Use `token` for the admin API instead of env `SLUICE_ADMIN_TOKEN` (`None`: read-only
    /// from loopback).
    pub fn admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = token;
        self
    }

    /// The address the admin API listens on, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Reload from `path` on SIGHUP and `POST /admin/reload`; `config` is what it holds now.
    pub fn reload_from(mut self, path: PathBuf, config: ValidConfig) -> Self {
        self.control = Arc::new(Control::new(
            Arc::clone(self.proxy.live()),
            config,
            Some(path),
        ));
        self
    }

    /// The single writer of the live policy.
    pub fn control(&self) -> Arc<Control> {
        Arc::clone(&self.control)
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
        let admin = self
            .admin_addr()
            .map_or_else(|| "off".to_owned(), |a| a.to_string());
        tracing::info!(proxy = %self.proxy_addr(), admin, "sluice listening");
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(control::autoscale::run(
            Arc::clone(self.proxy.live()),
            // Webhooks trust what endpoints do (system roots and `[upstream] ca_file`).
            control::notify::Notifier::new(self.connect.with_timeout(control::notify::TIMEOUT)),
            chrono::Utc::now,
        ));
        tasks.spawn(control::discovery::run(Arc::clone(&self.control)));
        tasks.spawn(control::health::run(
            Arc::clone(self.proxy.live()),
            self.connect.clone(),
        ));
        tasks.spawn(reload_on_hangup(Arc::clone(&self.control)));
        if let Some(fleet) = self.proxy.live().fleet() {
            tasks.spawn(control::fleet::run(
                Arc::clone(fleet),
                Arc::clone(&self.control),
            ));
        }
        // The admin API keeps answering while the proxy drains (/readyz says 503 then), and
        // stops with it.
        let shutting_down = Arc::new(AtomicBool::new(false));
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        if let Some(listener) = self.admin_listener {
            let access = admin::Access::new(self.admin_token);
            let api = admin::Admin::new(
                Arc::clone(&self.control),
                access,
                Arc::clone(&shutting_down),
            );
            tasks.spawn(admin::serve(listener, api, async move {
                let _ = admin_stopped.await;
            }));
        }
        let flag = Arc::clone(&shutting_down);
        let shutdown = async move {
            shutdown.await;
            flag.store(true, Ordering::Release);
        };
        proxy::serve(self.proxy_listener, self.proxy, shutdown).await;
        let _ = admin_stop.send(());
        tasks.abort_all();
        tracing::info!("sluice stopped");
    }
}

/// Reload the config on every SIGHUP.
async fn reload_on_hangup(control: Arc<Control>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: reload through the admin API only");
            return;
        };
        while hangups.recv().await.is_some() {
            let _ = control.reload_and_log().await;
        }
    }
    #[cfg(not(unix))]
    let _ = control;
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
