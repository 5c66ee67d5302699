//! Built-in demo scoring endpoints: each answers every request with a JSON score after a fixed
//! latency, like a small model behind a scoring API. Used by `sluice demo` and benchmarks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running demo endpoint.
pub struct DemoEndpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The accept loop; abort it to stop the endpoint.
    pub task: JoinHandle<()>,
}

impl DemoEndpoint {
    /// Its URL, as an endpoint entry in a config.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Start an endpoint named `name` on `addr` (port 0 for any free port) answering after `latency`.
pub async fn start(
    name: String,
    addr: SocketAddr,
    latency: Duration,
) -> std::io::Result<DemoEndpoint> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let name: &'static str = Box::leak(name.into_boxed_str());
    let task = tokio::spawn(async move {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = service_fn(move |req| score(req, name, latency));
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            tokio::spawn(connection);
        }
    });
    Ok(DemoEndpoint { addr, task })
}

async fn score(
    req: Request<Incoming>,
    name: &'static str,
    latency: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the whole input, as a model would, then "think" for the configured latency.
    let input_bytes = match req.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => 0,
    };
    tokio::time::sleep(latency).await;
    let score: f64 = rand::thread_rng().gen();
    let body = serde_json::json!({
        "score": (score * 1e4).round() / 1e4,
        "endpoint": name,
        "input_bytes": input_bytes,
        "latency_ms": latency.as_millis() as u64,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
