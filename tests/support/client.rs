//! Small HTTP clients: a keep-alive HTTP/1.1 pool, one-shot HTTP/1.1 connections (so a test
//! knows exactly which connection a request uses and when it closes), HTTP/2 with prior
//! knowledge, and raw bytes over TCP for what a typed client would normalise.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A whole response as a client saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body's `reason` field, for sluice's own answers.
    pub fn reason(&self) -> String {
        self.json()["reason"]
            .as_str()
            .unwrap_or_else(|| panic!("no reason in {:?}", self.body))
            .to_owned()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header value is text"))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Read a response's body whole.
pub async fn collect(response: Response<Incoming>) -> Result<Answer, hyper::Error> {
    let (head, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: head.status,
        headers: head.headers,
        body,
    })
}

/// A request with an empty body.
pub fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    request("GET", addr, path, Bytes::new())
}

/// A request with `body`.
pub fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    builder(method, addr, path)
        .body(Full::new(body.into()))
        .expect("a valid request")
}

/// A request to the admin API at `admin`, with `token` as a bearer token and `body` as JSON.
pub fn admin_request(
    method: &str,
    admin: SocketAddr,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut req = request(method, admin, path, body.to_owned());
    if let Some(token) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    if !body.is_empty() {
        req.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
    }
    req
}

/// A request to `addr` under construction: its target, and `Host` as every real client sends
/// it (hyper's own connections send no `Host` by themselves, and sluice answers an HTTP/1.1
/// request without one 400).
pub fn builder(method: &str, addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::HOST, addr.to_string())
}

/// A keep-alive HTTP/1.1 client pool.
pub type Pool = Client<HttpConnector, Full<Bytes>>;

/// A new keep-alive HTTP/1.1 client pool.
pub fn pool() -> Pool {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Send on `pool` and read the whole answer.
pub async fn send(pool: &Pool, req: Request<Full<Bytes>>) -> Answer {
    let response = pool.request(req).await.expect("sluice answers");
    collect(response).await.expect("the body arrives whole")
}

/// An HTTP/1.1 connection of its own to `addr`; it closes when the sender is dropped.
pub async fn connect_http1<B>(addr: SocketAddr) -> http1::SendRequest<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.expect("connect to sluice");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

/// Send `req` on a connection of its own and read the whole answer; the connection closes
/// afterwards.
pub async fn once(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    let mut sender = connect_http1(addr).await;
    let response = sender.send_request(req).await.expect("sluice answers");
    collect(response).await.expect("the body arrives whole")
}

/// An HTTP/2 connection with prior knowledge (h2c, no upgrade).
pub async fn connect_h2(addr: SocketAddr) -> http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect to sluice");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

/// Write `bytes` to `addr` and read until the server closes (send `Connection: close`), at
/// most 5 s.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect to sluice");
    stream.write_all(bytes).await.expect("write request");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("sluice closes the connection after answering")
        .expect("read answer");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A request body of `len` bytes of b'u', made 64 KiB at a time as the connection takes
/// them (so a test can send more than it could hold).
pub struct GeneratedBody {
    remaining: u64,
}

impl GeneratedBody {
    pub fn new(len: u64) -> Self {
        Self { remaining: len }
    }
}

static UPLOAD_CHUNK: [u8; 64 * 1024] = [b'u'; 64 * 1024];

impl Body for GeneratedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(UPLOAD_CHUNK.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &UPLOAD_CHUNK[..n],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
