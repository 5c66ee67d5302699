//! Mock scoring endpoints that count what they receive: requests, connections, how many they
//! serve at once (and the peak), arrival order, and each request's method, URI, headers and
//! body size. What they answer is chosen per request by a [`Reply`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bodies up to this size are kept whole in [`Received::body`]; larger ones are only counted.
const KEEP_BODY: usize = 64 * 1024;

/// What a mock endpoint saw of one request.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    /// The request-target exactly as received (path and query, in origin form).
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
    /// Bytes of body received (counted while streaming, never buffered).
    pub body_len: u64,
    /// The body itself when it is at most 64 KiB.
    pub body: Option<Bytes>,
    /// False when the body ended in an error (the sender broke off) rather than cleanly.
    pub complete: bool,
}

impl Received {
    /// The header's value as text, if present exactly once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        assert!(values.next().is_none(), "header {name} received twice");
        Some(first.to_str().expect("header value is text"))
    }
}

/// How a mock endpoint answers one request (after its hold time).
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete answer.
    Full {
        status: u16,
        headers: Vec<(&'static str, &'static str)>,
        body: Bytes,
    },
    /// `len` bytes of b'x', generated in 64 KiB chunks as the client reads them.
    Generated { len: u64 },
    /// Never answer (the exchange stays open until the other side gives up).
    Stall,
    /// Close the connection without answering.
    Reset,
    /// Announce `len` bytes, send `sent` of them, then break the connection.
    ResetMidBody { len: u64, sent: u64 },
    /// `chunks` chunks of 1 KiB, one every `every`.
    Slow { chunks: usize, every: Duration },
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Self::Full {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// `status` with a short text body.
    pub fn status(status: u16) -> Self {
        Self::Full {
            status,
            headers: Vec::new(),
            body: Bytes::from(format!("status {status} from mock")),
        }
    }
}

type ReplyFn = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// Configures a mock endpoint; see [`mock`].
pub struct MockBuilder {
    hold: Duration,
    gated: bool,
    read_body: bool,
    reply: ReplyFn,
}

/// A mock endpoint answering `200 ok` at once; adjust with the builder methods.
pub fn mock() -> MockBuilder {
    MockBuilder {
        hold: Duration::ZERO,
        gated: false,
        read_body: true,
        reply: Arc::new(|_| Reply::ok("ok")),
    }
}

impl MockBuilder {
    /// Hold each request this long (after reading its body) before answering.
    pub fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// Hold each request until [`Mock::open_gate`] is called (and at least `hold`).
    pub fn gated(mut self) -> Self {
        self.gated = true;
        self
    }

    /// Never read request bodies (a stuck endpoint: the sender sees TCP back-pressure).
    pub fn ignore_body(mut self) -> Self {
        self.read_body = false;
        self
    }

    /// Choose the answer per request.
    pub fn reply(mut self, reply: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        self.reply = Arc::new(reply);
        self
    }

    /// Listen on an ephemeral port of 127.0.0.1.
    pub async fn start(self) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a mock endpoint");
        self.start_on(listener)
    }

    /// Serve on `listener`.
    pub fn start_on(self, listener: TcpListener) -> Mock {
        let addr = listener.local_addr().expect("listener address");
        let (gate, _) = watch::channel(!self.gated);
        let state = Arc::new(State {
            hold: self.hold,
            read_body: self.read_body,
            gate,
            reply: self.reply,
            requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            arrivals: Mutex::new(Vec::new()),
            received: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            spans: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Mock {
            addr,
            state,
            accept,
        }
    }
}

struct State {
    hold: Duration,
    read_body: bool,
    gate: watch::Sender<bool>,
    reply: ReplyFn,
    requests: AtomicUsize,
    connections: AtomicUsize,
    /// Connections accepted and not yet closed.
    open: AtomicUsize,
    current: AtomicUsize,
    peak: AtomicUsize,
    arrivals: Mutex<Vec<String>>,
    received: Mutex<Vec<Received>>,
    /// The connection tasks, for [`Mock::kill`].
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    spans: Mutex<Vec<Span>>,
}

/// A running mock endpoint; stops accepting when dropped.
pub struct Mock {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Mock {
    /// `http://127.0.0.1:PORT`, for a config's endpoint list.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests that arrived (counted when their head arrives).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// TCP connections open now (accepted, not yet closed by either side).
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Requests being served now (arrived, not yet answered).
    pub fn current(&self) -> usize {
        self.state.current.load(Ordering::SeqCst)
    }

    /// The most requests served at once so far.
    pub fn peak(&self) -> usize {
        self.state.peak.load(Ordering::SeqCst)
    }

    /// When each request was being served, in arrival order.
    pub fn spans(&self) -> Vec<Span> {
        self.state.spans.lock().unwrap().clone()
    }

    /// Path and query of every request, in arrival order.
    pub fn arrivals(&self) -> Vec<String> {
        self.state.arrivals.lock().unwrap().clone()
    }

    /// Every request whose body has been read, in that order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Die like a crashed process: stop listening and drop every open connection, in the
    /// middle of whatever exchange it carries.
    pub fn kill(&self) {
        self.accept.abort();
        for task in self.state.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Release every held request, now and from now on.
    pub fn open_gate(&self) {
        self.state.gate.send_replace(true);
    }

    /// Wait until exactly `n` requests are being served (panics after a deadline).
    pub async fn wait_current(&self, n: usize) {
        let what = format!("mock {} serving {n} at once", self.addr);
        super::eventually(&what, || self.current() == n).await;
    }
}

/// A port of 127.0.0.1 that refuses connections: bound (so nobody else gets it) but not
/// listening. [`DeadPort::revive`] starts a mock on it.
pub struct DeadPort {
    socket: TcpSocket,
    pub addr: SocketAddr,
}

impl DeadPort {
    pub fn new() -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("bind a dead port");
        let addr = socket.local_addr().expect("bound address");
        Self { socket, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Start listening on the port with the given mock.
    pub fn revive(self, builder: MockBuilder) -> Mock {
        let listener = self.socket.listen(1024).expect("listen on the dead port");
        builder.start_on(listener)
    }

    /// The port a killed mock listened on, bound again (`None` if someone else took it).
    pub fn again(addr: SocketAddr) -> Option<Self> {
        let socket = TcpSocket::new_v4().ok()?;
        socket.set_reuseaddr(true).ok()?;
        socket.bind(addr).ok()?;
        Some(Self { socket, addr })
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        let connection_state = Arc::clone(&state);
        let open = OpenConnection::new(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _open = open;
            let service = service_fn(move |req| serve(req, Arc::clone(&connection_state)));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let mut tasks = state.tasks.lock().unwrap();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }
}

/// Counts a connection as open until it ends, however it ends (closed, or the mock killed).
struct OpenConnection(Arc<State>);

impl OpenConnection {
    fn new(state: Arc<State>) -> Self {
        state.open.fetch_add(1, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// When a mock served one request: from its head's arrival until its answer's head was sent
/// or the exchange was dropped (the peer closed, or the mock was killed).
#[derive(Debug, Clone)]
pub struct Span {
    pub uri: String,
    pub start: std::time::Instant,
    /// `None` while still being served.
    pub end: Option<std::time::Instant>,
    /// False when the exchange was dropped without an answer, or its request body broke
    /// (the sender gave it up; the mock still answers into the void).
    pub answered: bool,
}

/// Counts a request as being served for as long as it lives.
struct Serving {
    state: Arc<State>,
    span: usize,
    answered: bool,
}

impl Serving {
    fn new(state: &Arc<State>, uri: &str) -> Self {
        let now = state.current.fetch_add(1, Ordering::SeqCst) + 1;
        state.peak.fetch_max(now, Ordering::SeqCst);
        let mut spans = state.spans.lock().unwrap();
        spans.push(Span {
            uri: uri.to_owned(),
            start: std::time::Instant::now(),
            end: None,
            answered: false,
        });
        Self {
            state: Arc::clone(state),
            span: spans.len() - 1,
            answered: false,
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let span = &mut self.state.spans.lock().unwrap()[self.span];
        span.end = Some(std::time::Instant::now());
        span.answered = self.answered;
        self.state.current.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(req: Request<Incoming>, state: Arc<State>) -> Result<Response<MockBody>, MockError> {
    let (head, mut body) = req.into_parts();
    // The request-target as sent (origin form from a proxy; absolute form would show here).
    let uri = head.uri.to_string();
    state.arrivals.lock().unwrap().push(uri.clone());
    state.requests.fetch_add(1, Ordering::SeqCst);
    let mut serving = Serving::new(&state, &uri);

    // Consume the body as it streams in: count it, keep it only when small. The body stays
    // alive until the answer, so an ignored body is back-pressure, not a closed connection.
    let mut body_len = 0u64;
    let mut kept = Vec::new();
    let mut complete = !state.read_body;
    if state.read_body {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        body_len += data.len() as u64;
                        if kept.len() + data.len() <= KEEP_BODY {
                            kept.extend_from_slice(&data);
                        }
                    }
                }
                Some(Err(_)) => break,
                None => {
                    complete = true;
                    break;
                }
            }
        }
    }
    let received = Received {
        method: head.method,
        uri,
        version: head.version,
        headers: head.headers,
        body_len,
        body: (body_len as usize <= KEEP_BODY).then(|| Bytes::from(kept)),
        complete,
    };
    let reply = (state.reply)(&received);
    state.received.lock().unwrap().push(received);

    // Even a zero sleep waits for the timer's next 1 ms tick.
    if !state.hold.is_zero() {
        tokio::time::sleep(state.hold).await;
    }
    let mut gate = state.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;

    let response = match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let mut response = Response::builder().status(status);
            for (name, value) in headers {
                response = response.header(name, value);
            }
            response.body(MockBody::Full(Some(body))).unwrap()
        }
        Reply::Generated { len } => Response::builder()
            .header("content-length", len)
            .body(MockBody::Generated { remaining: len })
            .unwrap(),
        Reply::Stall => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Reset => return Err(MockError("reset before the response")),
        Reply::ResetMidBody { len, sent } => Response::builder()
            .header("content-length", len)
            .body(MockBody::FailAfter {
                remaining: sent,
                pause: None,
            })
            .unwrap(),
        Reply::Slow { chunks, every } => Response::builder()
            .body(MockBody::Slow {
                remaining: chunks,
                every,
                timer: None,
            })
            .unwrap(),
    };
    serving.answered = complete;
    drop(serving);
    Ok(response)
}

/// Why a mock broke an exchange on purpose.
#[derive(Debug)]
pub struct MockError(&'static str);

impl std::fmt::Display for MockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for MockError {}

static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// The mock's response bodies; none holds more than one chunk in memory.
pub enum MockBody {
    Full(Option<Bytes>),
    Generated {
        remaining: u64,
    },
    /// `remaining` bytes, then (after a pause, so they are flushed) an error.
    FailAfter {
        remaining: u64,
        pause: Option<Pin<Box<tokio::time::Sleep>>>,
    },
    Slow {
        remaining: usize,
        every: Duration,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    },
}

fn chunk(remaining: &mut u64) -> Bytes {
    let n = (*remaining).min(CHUNK.len() as u64) as usize;
    *remaining -= n as u64;
    Bytes::from_static(&CHUNK[..n])
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = MockError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MockError>>> {
        let frame = match self.get_mut() {
            MockBody::Full(bytes) => bytes.take().map(|b| Ok(Frame::data(b))),
            MockBody::Generated { remaining } => {
                (*remaining > 0).then(|| Ok(Frame::data(chunk(remaining))))
            }
            MockBody::FailAfter { remaining, pause } => {
                if *remaining > 0 {
                    return Poll::Ready(Some(Ok(Frame::data(chunk(remaining)))));
                }
                let sleep = pause
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(50))));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                Some(Err(MockError("reset in the middle of the body")))
            }
            MockBody::Slow {
                remaining,
                every,
                timer,
            } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(*every)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                *timer = None;
                *remaining -= 1;
                Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..1024]))))
            }
        };
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(bytes) => bytes.is_none(),
            MockBody::Generated { remaining } => *remaining == 0,
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Generated { remaining } => SizeHint::with_exact(*remaining),
            _ => SizeHint::default(),
        }
    }
}
