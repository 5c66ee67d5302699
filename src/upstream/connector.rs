//! The connector for outgoing HTTP/1.1 (http and https), to endpoints and autoscale webhooks:
//! TCP with the connect timeout and no Nagle delay; TLS that trusts the system's roots (the
//! bundle of `ca-certificates`, or what `SSL_CERT_FILE`/`SSL_CERT_DIR` name) plus the CA file
//! of `[upstream] ca_file`, for endpoints behind a private CA.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::{ClientConfig, RootCertStore};

use crate::config::{load_ca_file, CaFileError};

/// How outgoing connections are made: the connect timeout and the roots TLS trusts.
#[derive(Clone)]
pub struct Connect {
    timeout: Duration,
    tls: Arc<ClientConfig>,
}

impl Connect {
    /// The system's roots, plus the certificates of `ca_file` when given.
    pub fn new(timeout: Duration, ca_file: Option<&Path>) -> Result<Self, CaFileError> {
        let mut roots = system_roots().clone();
        if let Some(path) = ca_file {
            let (added, _) = roots.add_parsable_certificates(load_ca_file(path)?);
            tracing::debug!(ca_file = %path.display(), added, "extra CA trusted for https endpoints");
        }
        Ok(Self {
            timeout,
            tls: Arc::new(client_config(roots)),
        })
    }

    /// The same roots with another connect timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout,
            tls: Arc::clone(&self.tls),
        }
    }
}

/// A bare timeout: the system's roots only.
impl From<Duration> for Connect {
    fn from(timeout: Duration) -> Self {
        Self {
            timeout,
            tls: Arc::new(client_config(system_roots().clone())),
        }
    }
}

/// The connector `connect` describes.
pub fn build(connect: impl Into<Connect>) -> HttpsConnector<HttpConnector> {
    let connect = connect.into();
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect.timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*connect.tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

fn client_config(roots: RootCertStore) -> ClientConfig {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The system's roots, read once per process. A system without any (no `ca-certificates`)
/// falls back to the Mozilla roots compiled into the binary, as sluice trusted before, rather
/// than to no https at all.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "cannot read some of the system's CA certificates");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        if ignored > 0 {
            tracing::debug!(
                ignored,
                "system CA certificates that cannot be trust anchors"
            );
        }
        if added == 0 {
            tracing::warn!(
                "no CA certificates found on this system (install ca-certificates): https \
                 endpoints are checked against the roots compiled into sluice"
            );
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots
    })
}
