//! Best-effort webhooks: every scale event is POSTed as JSON to the service's `notify` URLs,
//! off the request path, each with a timeout, with a bound on deliveries in flight so a dead
//! receiver can never pile up work.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::autoscale::Event;
use crate::upstream::connector::{self, Connect};

/// Deliveries allowed in flight at once; more are dropped with a warning.
const MAX_IN_FLIGHT: usize = 64;
/// Time a receiver gets to answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Sends events to webhook URLs.
#[derive(Clone)]
pub struct Notifier {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    in_flight: Arc<Semaphore>,
}

/// Trusting the system's roots.
impl Default for Notifier {
    fn default() -> Self {
        Self::new(TIMEOUT)
    }
}

impl Notifier {
    /// Deliveries over connections made as `connect` says (its timeout should be [`TIMEOUT`]).
    pub fn new(connect: impl Into<Connect>) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector::build(connect)),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// POST `event` to each of `urls` in the background; never waits.
    pub fn send(&self, urls: &[String], event: &Event) {
        if urls.is_empty() {
            return;
        }
        let body = match serde_json::to_vec(event) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode autoscale event");
                return;
            }
        };
        for url in urls {
            let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
                tracing::warn!(
                    url,
                    "autoscale notify dropped: too many deliveries in flight"
                );
                continue;
            };
            let request = Request::builder()
                .method(Method::POST)
                .uri(url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()));
            let Ok(request) = request else {
                tracing::warn!(url, "autoscale notify: invalid URL");
                continue;
            };
            let client = self.client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(TIMEOUT, client.request(request)).await {
                    Ok(Ok(response)) if response.status().is_success() => {}
                    Ok(Ok(response)) => {
                        tracing::warn!(
                            url,
                            status = response.status().as_u16(),
                            "autoscale notify refused"
                        );
                    }
                    Ok(Err(e)) => tracing::warn!(url, error = %e, "autoscale notify failed"),
                    Err(_) => tracing::warn!(url, "autoscale notify timed out"),
                }
            });
        }
    }
}
