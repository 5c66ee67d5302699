//! The fault soak (issue 7, "Faults"): mixed load through the real `sluice` binary (keyed and
//! unkeyed callers, large request bodies, streamed responses; HTTP/1.1 clients pooled or on a
//! connection per request, and HTTP/2 clients multiplexing several streams on a connection)
//! while, at random, endpoints are
//! killed and restarted on the same port, reset connections before and in the middle of a
//! body, stall past `timeouts.response` or answer garbage; clients abort in the middle of a
//! request and of a response (over HTTP/2: a stream reset, RST_STREAM, while the connection
//! and its other streams go on); the config is reloaded (valid and invalid, by `POST
//! /admin/reload` and SIGHUP); and caps and queues are lowered and raised through the admin
//! API. Then SIGTERM under load.
//!
//! What must hold (each break is counted as a violation and the test fails on any):
//! - every request a client did not abort gets exactly one answer within its timeout: the
//!   endpoint's (checked byte for byte where it is known) or sluice's own 429/502/503/504
//!   with a JSON body; a body the endpoint broke never arrives looking whole;
//! - no request reaches an endpoint twice, and an upload the client abandoned never reaches
//!   it whole;
//! - no endpoint serves more requests at once than the highest cap ever in force (checked on
//!   the endpoints' own counts and on sluice's gauges while the load runs);
//! - every in-flight and queue gauge returns to 0; open file descriptors return to their
//!   baseline and RSS stays near it; no panic in the log;
//! - on SIGTERM, streams in flight complete, new connections are refused, and the process
//!   exits 0 within `shutdown_grace`;
//! - no key a caller sent ever appears in sluice's log, in one of its own answers, or in any
//!   admin response (API, metrics, dashboard), across the whole run.
//!
//! A second variant, [`store`], runs the same load and endpoint faults through a sluice whose
//! limits live in Redis while Redis dies and hangs (see its module documentation).
//!
//! `cargo test --test soak` runs both, one after the other, in about 35 s (14 s and 9 s of
//! faults) with a fixed seed; `SOAK_SECS`, `SOAK_STORE_SECS` (seconds of faults) and
//! `SOAK_SEED` change them, and `bench/soak.sh` runs either or both for as long as asked. The
//! summaries are printed to stderr (`-- --nocapture` shows them).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::process::{start_binary_with_env, write_config, Running};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex as AsyncMutex;

const TOKEN: &str = "soak-admin-token";
const ENDPOINTS: usize = 3;
const WORKERS: usize = 24;
/// Of the workers, this many share HTTP/2 connections (h2c, prior knowledge), each
/// connection carrying [`H2_STREAMS`] of them as concurrent streams; the rest speak HTTP/1.1.
const H2_CONNECTIONS: usize = 2;
const H2_STREAMS: usize = 4;
/// Caps move between these (admin PATCH and reloads); the cap check uses the highest.
const CAP_LOW: u32 = 2;
const CAP_HIGH: u32 = 6;
const RESPONSE_TIMEOUT: &str = "500ms";
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// A request not aborted by its client must be answered within this.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(8);
const BIG_RESPONSE: u64 = 512 << 10;
const SLOW_CHUNKS: usize = 10;
const SLOW_EVERY: Duration = Duration::from_millis(20);
const WARM_UP: Duration = Duration::from_secs(2);
const KEY_A: &str = "soak-key-a";
const KEY_B: &str = "soak-key-b";
/// Keys of callers no resource knows start with this.
const UNKNOWN_KEY_PREFIX: &str = "unknown-";

/// The plain key in `text`, if one leaked into it.
fn leaked_key(text: &[u8]) -> Option<&'static str> {
    let text = String::from_utf8_lossy(text);
    [KEY_A, KEY_B, UNKNOWN_KEY_PREFIX]
        .into_iter()
        .find(|key| text.contains(key))
}

struct Settings {
    /// How long faults are injected.
    soak: Duration,
    /// How long faults are injected in the Redis store variant.
    store_soak: Duration,
    seed: u64,
}

fn settings() -> Settings {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?}: a number"))
            })
            .unwrap_or(default)
    };
    Settings {
        soak: Duration::from_secs(env("SOAK_SECS", 14)),
        store_soak: Duration::from_secs(env("SOAK_STORE_SECS", 9)),
        seed: env("SOAK_SEED", 7),
    }
}

// ---- the plan of one request ----

/// What the endpoint is asked to do (`up=` in the query).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    Ok,
    Big,
    Slow,
    Error500,
    Reset,
    ResetMidBody,
    Stall,
    /// Sent to the service whose only endpoint answers garbage.
    Garbage,
}

impl Up {
    fn name(self) -> &'static str {
        match self {
            Up::Ok => "ok",
            Up::Big => "big",
            Up::Slow => "slow",
            Up::Error500 => "500",
            Up::Reset => "reset",
            Up::ResetMidBody => "reset-mid-body",
            Up::Stall => "stall",
            Up::Garbage => "garbage",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Upload {
    None,
    /// `Content-Length` framing.
    Sized(u64),
    /// Chunked framing.
    Chunked(u64),
    /// This much, then the body stops moving (the client gives up).
    Stalling(u64),
}

impl Upload {
    fn len(self) -> u64 {
        match self {
            Upload::None => 0,
            Upload::Sized(n) | Upload::Chunked(n) | Upload::Stalling(n) => n,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Read the whole answer; `pooled` on a shared keep-alive client, else on a connection of
    /// its own.
    Complete { pooled: bool },
    /// Close the connection after this long, answered or not.
    AbortAfter(Duration),
    /// Close the connection after the first frame of the response body.
    AbortMidResponse,
    /// Send part of the body, then close the connection after this long.
    AbortMidUpload(Duration),
}

#[derive(Debug, Clone)]
struct Plan {
    id: u64,
    up: Up,
    upload: Upload,
    key: Option<String>,
    mode: Mode,
}

impl Plan {
    fn random(id: u64, rng: &mut StdRng) -> Self {
        let up = match rng.gen_range(0..100) {
            0..50 => Up::Ok,
            50..60 => Up::Big,
            60..70 => Up::Slow,
            70..75 => Up::Error500,
            75..80 => Up::Reset,
            80..86 => Up::ResetMidBody,
            86..90 => Up::Stall,
            _ => Up::Garbage,
        };
        let size = |rng: &mut StdRng| rng.gen_range(64 << 10..=2 << 20);
        let upload = match rng.gen_range(0..100) {
            0..75 => Upload::None,
            75..90 => Upload::Sized(size(rng)),
            _ => Upload::Chunked(size(rng)),
        };
        let key = match rng.gen_range(0..100) {
            0..30 => None,
            30..50 => Some(KEY_A.to_owned()),
            50..80 => Some(KEY_B.to_owned()),
            _ => Some(format!("{UNKNOWN_KEY_PREFIX}{}", rng.gen_range(0..5000))),
        };
        let mode = match rng.gen_range(0..100) {
            0..40 => Mode::Complete { pooled: true },
            40..78 => Mode::Complete { pooled: false },
            78..86 => Mode::AbortAfter(Duration::from_millis(rng.gen_range(0..300))),
            86..94 => Mode::AbortMidResponse,
            _ => Mode::AbortMidUpload(Duration::from_millis(rng.gen_range(50..250))),
        };
        let (up, upload) = match mode {
            // The upload is what is cut short: keep the endpoint's side plain.
            Mode::AbortMidUpload(_) => (Up::Ok, Upload::Stalling(size(rng).min(256 << 10))),
            // A response to abort in the middle of.
            Mode::AbortMidResponse if !matches!(up, Up::Big | Up::Slow) => (Up::Big, upload),
            _ => (up, upload),
        };
        Self {
            id,
            up,
            upload,
            key,
            mode,
        }
    }

    fn path(&self) -> String {
        let prefix = if self.up == Up::Garbage {
            "/garbage"
        } else {
            "/score"
        };
        let abort = if matches!(self.mode, Mode::AbortMidUpload(_)) {
            "&abort=upload"
        } else {
            ""
        };
        format!("{prefix}?id={}&up={}{abort}", self.id, self.up.name())
    }

    fn request(&self, addr: SocketAddr) -> Request<UploadBody> {
        let (method, body) = match self.upload {
            Upload::None => ("GET", UploadBody::Full(None)),
            Upload::Sized(n) => ("POST", UploadBody::Full(Some(upload_bytes(n)))),
            Upload::Chunked(n) => ("POST", UploadBody::Chunks { remaining: n }),
            Upload::Stalling(n) => ("POST", UploadBody::Stalling { remaining: n }),
        };
        let mut request = builder(method, addr, &self.path());
        if let Some(key) = &self.key {
            request = request.header("x-api-key", key);
        }
        request.body(body).expect("a valid request")
    }
}

static UPLOAD: [u8; 2 << 20] = [b'u'; 2 << 20];

fn upload_bytes(n: u64) -> Bytes {
    Bytes::from_static(&UPLOAD[..n as usize])
}

/// Request bodies of the soak.
enum UploadBody {
    Full(Option<Bytes>),
    /// 64 KiB frames of unknown total size (sent chunked).
    Chunks {
        remaining: u64,
    },
    /// 64 KiB frames, then nothing ever again.
    Stalling {
        remaining: u64,
    },
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let piece = |remaining: &mut u64| {
            let n = (*remaining).min(64 << 10);
            *remaining -= n;
            Some(Ok(Frame::data(upload_bytes(n))))
        };
        Poll::Ready(match self.get_mut() {
            UploadBody::Full(bytes) => bytes.take().map(|b| Ok(Frame::data(b))),
            UploadBody::Chunks { remaining } if *remaining > 0 => piece(remaining),
            UploadBody::Chunks { .. } => None,
            UploadBody::Stalling { remaining } if *remaining > 0 => piece(remaining),
            // The client's connection is dropped while the body waits here.
            UploadBody::Stalling { .. } => return Poll::Pending,
        })
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UploadBody::Full(bytes) => bytes.is_none(),
            UploadBody::Chunks { remaining } => *remaining == 0,
            UploadBody::Stalling { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UploadBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            _ => SizeHint::default(),
        }
    }
}

// ---- endpoints ----

fn param<'a>(uri: &'a str, name: &str) -> Option<&'a str> {
    uri.split(['?', '&'])
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn endpoint_reply(received: &Received) -> Reply {
    let chunks = param(&received.uri, "chunks")
        .and_then(|c| c.parse().ok())
        .unwrap_or(SLOW_CHUNKS);
    match param(&received.uri, "up").unwrap_or("ok") {
        "big" => Reply::Generated { len: BIG_RESPONSE },
        "slow" => Reply::Slow {
            chunks,
            every: SLOW_EVERY,
        },
        "500" => Reply::status(500),
        "reset" => Reply::Reset,
        "reset-mid-body" => Reply::ResetMidBody {
            len: BIG_RESPONSE,
            sent: 64 << 10,
        },
        "stall" => Reply::Stall,
        _ => Reply::ok(format!("ok {}", received.body_len)),
    }
}

fn endpoint() -> MockBuilder {
    mock().reply(endpoint_reply)
}

/// The mock endpoints, killed and restarted on their ports; what each instance saw is
/// gathered when it dies.
struct Endpoints {
    addrs: Vec<SocketAddr>,
    live: Mutex<Vec<Option<Mock>>>,
    /// When each kill happened.
    kills: Mutex<Vec<Instant>>,
    /// Arrivals per request id, over every instance.
    arrivals: Mutex<HashMap<u64, u32>>,
    instances: Mutex<usize>,
    /// The highest number served at once by one instance, as counted by the endpoint itself
    /// (`raw`) and with abandoned exchanges ended when sluice gave them up (`effective`).
    max_peak: Mutex<(usize, usize)>,
    /// When each request's client was done with it (answer read, or given up).
    client_done: Mutex<HashMap<u64, Instant>>,
    /// Faults the endpoints carried out (counted from what they received).
    faults: Tally,
}

impl Endpoints {
    async fn start() -> Arc<Self> {
        let mut mocks = Vec::new();
        for _ in 0..ENDPOINTS {
            mocks.push(endpoint().start().await);
        }
        Arc::new(Self {
            addrs: mocks.iter().map(|m| m.addr).collect(),
            live: Mutex::new(mocks.into_iter().map(Some).collect()),
            kills: Mutex::new(Vec::new()),
            arrivals: Mutex::new(HashMap::new()),
            instances: Mutex::new(ENDPOINTS),
            max_peak: Mutex::new((0, 0)),
            client_done: Mutex::new(HashMap::new()),
            faults: Tally::default(),
        })
    }

    fn urls(&self) -> Vec<String> {
        self.addrs.iter().map(|a| format!("http://{a}")).collect()
    }

    fn down(&self) -> usize {
        self.live
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.is_none())
            .count()
    }

    /// Kill endpoint `i` (if it is up), gathering what it saw.
    fn kill(&self, i: usize, violations: &Violations) {
        let Some(mock) = self.live.lock().unwrap()[i].take() else {
            return;
        };
        self.kills.lock().unwrap().push(Instant::now());
        mock.kill();
        self.gather(&mock, violations);
    }

    /// Start endpoint `i` again on its port.
    async fn restart(&self, i: usize) {
        let addr = self.addrs[i];
        for _ in 0..250 {
            // The killed listener closes once its task is dropped; wait for the port.
            if let Some(port) = DeadPort::again(addr) {
                let mock = port.revive(endpoint());
                *self.instances.lock().unwrap() += 1;
                self.live.lock().unwrap()[i] = Some(mock);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot listen on {addr} again");
    }

    /// Kill and restart every endpoint: gathers what they saw and closes sluice's pooled
    /// connections to them.
    async fn cycle_all(&self, violations: &Violations) {
        for i in 0..ENDPOINTS {
            self.kill(i, violations);
            self.restart(i).await;
        }
    }

    fn gather(&self, mock: &Mock, violations: &Violations) {
        let (effective, detail) = effective_peak(&mock.spans(), &self.client_done.lock().unwrap());
        {
            let mut peak = self.max_peak.lock().unwrap();
            peak.0 = peak.0.max(mock.peak());
            peak.1 = peak.1.max(effective);
        }
        if effective > CAP_HIGH as usize {
            violations.add(
                "endpoint over its cap",
                format!("{} served {effective} at once: {detail}", mock.addr),
            );
        }
        let mut arrivals = self.arrivals.lock().unwrap();
        for uri in mock.arrivals() {
            let fault = match param(&uri, "up") {
                Some("reset") => Some("endpoint reset the connection before answering"),
                Some("reset-mid-body") => Some("endpoint reset the connection mid-body"),
                Some("stall") => Some("endpoint stalled past timeouts.response"),
                Some("500") => Some("endpoint answered 500"),
                _ => None,
            };
            if let Some(fault) = fault {
                self.faults.add(fault);
            }
            if let Some(id) = param(&uri, "id").and_then(|id| id.parse().ok()) {
                let n = arrivals.entry(id).or_insert(0);
                *n += 1;
                if *n == 2 {
                    violations.add("delivered twice", uri.clone());
                }
            }
        }
        for received in mock.received() {
            if param(&received.uri, "abort") == Some("upload") && received.complete {
                violations.add(
                    "abandoned upload arrived whole",
                    format!("{} ({} bytes)", received.uri, received.body_len),
                );
            }
        }
    }

    fn killed_between(&self, from: Instant, to: Instant) -> bool {
        self.kills
            .lock()
            .unwrap()
            .iter()
            .any(|&k| k >= from && k <= to)
    }
}

/// How long after its client was done sluice may still hold an exchange it abandoned (a
/// 504 is written right after the slot is released; a client that left is noticed a moment
/// later).
const ABANDON_SLACK: Duration = Duration::from_millis(25);

/// The most requests one endpoint instance served at once. An exchange the endpoint never
/// answered (sluice gave it up at `timeouts.response`, or its client left) counts until
/// its client was done, less [`ABANDON_SLACK`], or until the endpoint noticed, whichever
/// came first: the endpoint only notices a dropped connection some time after sluice freed
/// the slot, and may take the next request before it does.
fn effective_peak(spans: &[Span], client_done: &HashMap<u64, Instant>) -> (usize, String) {
    let now = Instant::now();
    let ends: Vec<Instant> = spans
        .iter()
        .map(|span| {
            let mut end = span.end.unwrap_or(now);
            if !span.answered {
                let done = param(&span.uri, "id")
                    .and_then(|id| id.parse::<u64>().ok())
                    .and_then(|id| client_done.get(&id));
                if let Some(&done) = done {
                    end = end.min(done.checked_sub(ABANDON_SLACK).unwrap_or(done));
                }
            }
            end.max(span.start)
        })
        .collect();
    let mut events: Vec<(Instant, i32)> = Vec::with_capacity(spans.len() * 2);
    for (span, &end) in spans.iter().zip(&ends) {
        events.push((span.start, 1));
        events.push((end, -1));
    }
    // At the same instant an end comes before a start.
    events.sort();
    let mut current = 0i32;
    let mut peak = (0i32, now);
    for (at, step) in events {
        current += step;
        if current > peak.0 {
            peak = (current, at);
        }
    }
    // The exchanges being served at the peak, for the report when it is too high.
    let at = peak.1;
    let mut detail = String::new();
    for (span, &end) in spans.iter().zip(&ends) {
        if span.start <= at && at < end {
            let ms = |t: Instant| {
                t.saturating_duration_since(at).as_secs_f64() * 1e3
                    - at.saturating_duration_since(t).as_secs_f64() * 1e3
            };
            let _ = write!(
                detail,
                "[{} from {:.1} ms to {:.1} ms{}] ",
                span.uri,
                ms(span.start),
                ms(end),
                if span.answered { "" } else { ", unanswered" }
            );
        }
    }
    (usize::try_from(peak.0).unwrap_or(0), detail)
}

/// What the garbage endpoint did: connections it answered, and how many of those answers it
/// wrote late (see [`GarbageEndpoint::LATE`]).
#[derive(Default)]
struct GarbageEndpoint {
    served: AtomicU64,
    late: AtomicU64,
}

impl GarbageEndpoint {
    /// An answer written this long after the connection was accepted may have reached sluice
    /// after `timeouts.response` (500 ms): sluice's clock starts when it sends the request,
    /// which can be before the endpoint's accept returns, so half the timeout is the safe
    /// side. Such an answer may rightly end in a 504.
    const LATE: Duration = Duration::from_millis(250);
}

/// An endpoint that answers every request with garbage and closes.
async fn garbage_endpoint() -> (SocketAddr, Arc<GarbageEndpoint>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let tally = Arc::new(GarbageEndpoint::default());
    let count = Arc::clone(&tally);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let accepted = Instant::now();
            let n = count.served.fetch_add(1, Ordering::Relaxed) + 1;
            let answer: &[u8] = match n % 4 {
                0 => b"\x00\x01\x02 definitely not HTTP\r\n\r\n",
                1 => b"HTTP/1.1 2OO OK\r\n\r\n",
                2 => b"HTTP/1.1 200 OK\r\ncontent-length: twelve\r\n\r\nhello",
                _ => b"SMTP ready\r\n",
            };
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await;
                let _ = stream.write_all(answer).await;
                if accepted.elapsed() >= GarbageEndpoint::LATE {
                    count.late.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, tally)
}

// ---- bookkeeping ----

/// Invariant breaks, by kind, with the first examples.
#[derive(Default)]
struct Violations(Mutex<(BTreeMap<&'static str, u64>, Vec<String>)>);

impl Violations {
    fn add(&self, kind: &'static str, detail: String) {
        let mut inner = self.0.lock().unwrap();
        let seen = inner.0.entry(kind).or_default();
        *seen += 1;
        // The first few of each kind, so that one frequent kind does not hide the others.
        let first = *seen <= 8;
        if first && inner.1.len() < 40 {
            inner.1.push(format!("{kind}: {detail}"));
        }
    }

    fn total(&self) -> u64 {
        self.0.lock().unwrap().0.values().sum()
    }
}

/// Counts by label.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    fn add(&self, label: impl Into<String>) {
        *self.0.lock().unwrap().entry(label.into()).or_default() += 1;
    }

    fn total(&self) -> u64 {
        self.0.lock().unwrap().values().sum()
    }

    fn lines(&self) -> String {
        let map = self.0.lock().unwrap();
        let mut text = String::new();
        for (label, n) in map.iter() {
            let _ = writeln!(text, "    {n:>8}  {label}");
        }
        text
    }
}

struct Soak {
    addr: SocketAddr,
    admin: SocketAddr,
    endpoints: Arc<Endpoints>,
    /// The shared keep-alive client (replaced to close its connections).
    pooled: Mutex<Client<HttpConnector, UploadBody>>,
    violations: Violations,
    answers: Tally,
    /// The answers given over HTTP/2 (also counted in `answers`).
    h2_answers: Tally,
    /// HTTP/2 connections opened by the workers (a connection that closed under its streams
    /// is opened again).
    h2_connections: AtomicU64,
    faults: Tally,
    stop: AtomicBool,
    began: Instant,
    /// Every judged exchange, kept when a variant checks them against its faults afterwards.
    exchanges: Option<Mutex<Vec<Exchange>>>,
    /// Requests to the garbage endpoint answered 504 (a timeout).
    garbage_timeouts: AtomicU64,
}

impl Soak {
    /// Garbage must be answered 502 as soon as it arrives, not waited on until
    /// `timeouts.response`: a 504 is only right for an answer the endpoint wrote late.
    fn judge_garbage_timeouts(&self, garbage: &GarbageEndpoint) {
        let timeouts = self.garbage_timeouts.load(Ordering::Relaxed);
        let late = garbage.late.load(Ordering::Relaxed);
        if timeouts > late {
            self.violations.add(
                "garbage answered as a timeout",
                format!("{timeouts} answered 504, only {late} written late"),
            );
        }
    }

    /// The summary lines of every variant: answers by kind (and over HTTP/2), faults injected.
    fn write_tallies(&self, summary: &mut String, label: &str, garbage: &GarbageEndpoint) {
        let mut faults = self.endpoints.faults.0.lock().unwrap();
        faults.insert(
            "endpoint answered garbage (connections)".into(),
            garbage.served.load(Ordering::Relaxed),
        );
        faults.insert(
            "endpoint answered garbage late (connections)".into(),
            garbage.late.load(Ordering::Relaxed),
        );
        drop(faults);
        let _ = write!(
            summary,
            "{label}: answers by kind (warm-up included)\n{}",
            self.answers.lines()
        );
        let _ = write!(
            summary,
            "{label}: of which over HTTP/2 ({} connections opened, {H2_STREAMS} streams each)\n{}",
            self.h2_connections.load(Ordering::Relaxed),
            self.h2_answers.lines()
        );
        let _ = write!(
            summary,
            "{label}: faults injected (warm-up included)\n{}{}",
            self.faults.lines(),
            self.endpoints.faults.lines()
        );
    }
}

/// A keep-alive client for the soak's workers (replaced to close its connections).
fn new_pool() -> Client<HttpConnector, UploadBody> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(2))
        .build(connector)
}

/// Start the binary on the config in `file` (admin token set, no access log) and the soak's
/// state around it; with `keep_exchanges`, every judged exchange is kept for later checks.
async fn start_soak(
    file: &std::path::Path,
    endpoints: &Arc<Endpoints>,
    began: Instant,
    keep_exchanges: bool,
) -> (Arc<AsyncMutex<Running>>, Arc<Soak>) {
    let running = start_binary_with_env(
        &["run", "--config", file.to_str().unwrap()],
        &[
            ("SLUICE_ADMIN_TOKEN", TOKEN),
            ("SLUICE_LOG", "info,sluice::access=off"),
        ],
    )
    .await;
    let (addr, admin) = (running.addr, running.admin.expect("admin address"));
    let soak = Arc::new(Soak {
        addr,
        admin,
        endpoints: Arc::clone(endpoints),
        pooled: Mutex::new(new_pool()),
        violations: Violations::default(),
        answers: Tally::default(),
        h2_answers: Tally::default(),
        h2_connections: AtomicU64::new(0),
        faults: Tally::default(),
        stop: AtomicBool::new(false),
        began,
        exchanges: keep_exchanges.then(|| Mutex::new(Vec::new())),
        garbage_timeouts: AtomicU64::new(0),
    });
    (Arc::new(AsyncMutex::new(running)), soak)
}

/// One judged exchange, for checks made after the run.
struct Exchange {
    plan: Plan,
    started: Instant,
    ended: Instant,
    /// Status and reason when a response came (`None`: aborted or failed).
    answer: Option<(u16, Option<String>)>,
}

// ---- one exchange ----

/// What a client saw of a response.
struct Seen {
    status: u16,
    /// sluice's own answers: the `reason` of the JSON body.
    reason: Option<String>,
    body_len: u64,
    /// The first bytes of the body.
    head: Vec<u8>,
    /// The body ended in an error rather than cleanly.
    broken: bool,
}

async fn read_response(response: http::Response<Incoming>, stop_after_first: bool) -> Seen {
    let status = response.status().as_u16();
    let json = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/json");
    let mut body = response.into_body();
    let mut seen = Seen {
        status,
        reason: None,
        body_len: 0,
        head: Vec::new(),
        broken: false,
    };
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    seen.body_len += data.len() as u64;
                    let room = 512usize.saturating_sub(seen.head.len());
                    seen.head.extend_from_slice(&data[..data.len().min(room)]);
                }
                if stop_after_first {
                    break;
                }
            }
            Some(Err(_)) => {
                seen.broken = true;
                break;
            }
            None => break,
        }
    }
    // sluice's own answers come whole in one frame.
    if json {
        seen.reason = serde_json::from_slice::<serde_json::Value>(&seen.head)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned));
    }
    seen
}

/// An error with its causes.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// The end of one exchange, as far as the client knows.
enum Outcome {
    Seen(Seen),
    /// The exchange failed before any response (`what`).
    Failed(String),
    TimedOut,
    /// The client gave up on purpose (`what`).
    Aborted(&'static str),
}

/// A connection of the request's own; closed when dropped.
struct OwnConnection(tokio::task::JoinHandle<()>);

impl Drop for OwnConnection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn own_connection(
    addr: SocketAddr,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<UploadBody>,
        OwnConnection,
    ),
    String,
> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, OwnConnection(task)))
}

/// Send `plan`'s request: over HTTP/2 on `h2`'s connection when given, else over HTTP/1.1
/// (pooled or on a connection of its own).
async fn run(soak: &Soak, plan: &Plan, h2: Option<&H2Client>) -> Outcome {
    let request = plan.request(soak.addr);
    let stop_after_first = matches!(plan.mode, Mode::AbortMidResponse);
    if let Some(h2) = h2 {
        let mut sender = match h2.sender(soak).await {
            Ok(sender) => sender,
            Err(e) => return Outcome::Failed(e),
        };
        // Dropping the exchange (an abort) drops the stream: hyper resets it (RST_STREAM
        // CANCEL) while the connection and its other streams go on.
        let exchange = async move {
            match sender.send_request(request).await {
                Ok(response) => Outcome::Seen(read_response(response, stop_after_first).await),
                Err(e) => Outcome::Failed(format!("HTTP/2 request: {}", chain(&e))),
            }
        };
        return finish(plan, exchange).await;
    }
    match plan.mode {
        Mode::Complete { pooled: true } => {
            let exchange = async {
                let client = soak.pooled.lock().unwrap().clone();
                match client.request(request).await {
                    Ok(response) => Outcome::Seen(read_response(response, false).await),
                    Err(e) => Outcome::Failed(format!("pooled request: {}", chain(&e))),
                }
            };
            tokio::time::timeout(CLIENT_TIMEOUT, exchange)
                .await
                .unwrap_or(Outcome::TimedOut)
        }
        _ => {
            let (mut sender, _connection) = match own_connection(soak.addr).await {
                Ok(c) => c,
                Err(e) => return Outcome::Failed(e),
            };
            let exchange = async {
                match sender.send_request(request).await {
                    Ok(response) => Outcome::Seen(read_response(response, stop_after_first).await),
                    Err(e) => Outcome::Failed(format!("request: {}", chain(&e))),
                }
            };
            finish(plan, exchange).await
        }
    }
}

/// Run `exchange` the way `plan`'s client means to: to its end (within the client timeout),
/// or given up after a time, mid-upload or after the first frame of the answer.
async fn finish(plan: &Plan, exchange: impl std::future::Future<Output = Outcome>) -> Outcome {
    match plan.mode {
        Mode::AbortAfter(after) | Mode::AbortMidUpload(after) => {
            let what = if matches!(plan.mode, Mode::AbortAfter(_)) {
                "client aborted after a random time"
            } else {
                "client aborted mid-upload"
            };
            tokio::time::timeout(after, exchange)
                .await
                .unwrap_or(Outcome::Aborted(what))
        }
        Mode::AbortMidResponse => match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
            Ok(Outcome::Seen(seen)) if seen.status == 200 && !seen.broken => {
                Outcome::Aborted("client aborted mid-response")
            }
            Ok(outcome) => outcome,
            Err(_) => Outcome::TimedOut,
        },
        Mode::Complete { .. } => tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .unwrap_or(Outcome::TimedOut),
    }
}

/// An HTTP/2 connection (h2c, prior knowledge) that several workers use at once, one stream
/// each; opened again if it closed.
struct H2Client {
    connection: AsyncMutex<
        Option<(
            hyper::client::conn::http2::SendRequest<UploadBody>,
            OwnConnection,
        )>,
    >,
}

impl H2Client {
    fn new() -> Self {
        Self {
            connection: AsyncMutex::new(None),
        }
    }

    /// A handle for one more stream on the connection.
    async fn sender(
        &self,
        soak: &Soak,
    ) -> Result<hyper::client::conn::http2::SendRequest<UploadBody>, String> {
        let mut connection = self.connection.lock().await;
        if let Some((sender, _)) = connection.as_ref() {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        let stream = TcpStream::connect(soak.addr)
            .await
            .map_err(|e| format!("HTTP/2 connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, driver) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP/2 handshake: {}", chain(&e)))?;
        let task = tokio::spawn(async move {
            let _ = driver.await;
        });
        soak.h2_connections.fetch_add(1, Ordering::Relaxed);
        *connection = Some((sender.clone(), OwnConnection(task)));
        Ok(sender)
    }
}

/// Judge one finished exchange; returns the label it is counted under.
fn judge(soak: &Soak, plan: &Plan, outcome: &Outcome, started: Instant) -> String {
    let aborting = !matches!(plan.mode, Mode::Complete { .. });
    let killed = || soak.endpoints.killed_between(started, Instant::now());
    let violation = |kind: &'static str, what: String| {
        soak.violations.add(kind, format!("{plan:?}: {what}"));
        format!("VIOLATION {kind}")
    };
    let seen = match outcome {
        Outcome::Aborted(what) => return (*what).to_owned(),
        Outcome::TimedOut => {
            return violation("no answer within the client timeout", String::new())
        }
        Outcome::Failed(e) if aborting => return format!("aborting client: {e}"),
        // An endpoint killed right after its response head: its body breaks before sluice
        // wrote the head out, and resetting the stream drops the unsent head (see
        // docs/limits-and-threat-model.md, "an answer that breaks"). The client still learns
        // the answer failed.
        Outcome::Failed(e)
            if e.starts_with("HTTP/2 request") && e.contains("stream error") && killed() =>
        {
            return "HTTP/2 stream reset before the head (endpoint killed)".into();
        }
        Outcome::Failed(e) => {
            // When, and what else happened around it, for the diagnosis.
            let took = started.elapsed();
            let killed = if killed() {
                "; an endpoint was killed meanwhile"
            } else {
                ""
            };
            return violation(
                "no answer",
                format!(
                    "{e} after {took:?}, {:?} into the run{killed}",
                    soak.began.elapsed()
                ),
            );
        }
        Outcome::Seen(seen) => seen,
    };
    let body = String::from_utf8_lossy(&seen.head);
    match (seen.status, &seen.reason) {
        (429 | 502 | 503 | 504, Some(reason)) => {
            if plan.up == Up::Garbage && seen.status == 504 {
                // Judged at the end against the answers the endpoint wrote late
                // (`Soak::judge_garbage_timeouts`): a busy test process can be that slow.
                soak.garbage_timeouts.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(key) = leaked_key(&seen.head) {
                return violation("key in an answer", format!("{key} in {body}"));
            }
            format!("{} {reason}", seen.status)
        }
        (429 | 502 | 503 | 504, None) if !(aborting && seen.broken) => violation(
            "sluice answer without a JSON reason",
            format!("{} {body:?}", seen.status),
        ),
        (200, _) if plan.up == Up::ResetMidBody => {
            if seen.broken {
                "200, body broken by the endpoint (passed on)".into()
            } else if aborting {
                "200, client left mid-body".into()
            } else {
                violation(
                    "a broken body arrived looking whole",
                    format!("{} bytes", seen.body_len),
                )
            }
        }
        (200, _) if seen.broken && killed() => "200, body broken by an endpoint kill".into(),
        (200, _) if seen.broken && aborting => "200, client left mid-body".into(),
        (200, _) if seen.broken => violation("body broken without a fault", format!("{plan:?}")),
        (200, _) => {
            let right = match plan.up {
                Up::Ok => body == format!("ok {}", plan.upload.len()),
                Up::Big => seen.body_len == BIG_RESPONSE,
                Up::Slow => seen.body_len == (SLOW_CHUNKS as u64) << 10,
                _ => false,
            };
            if right || (aborting && plan.up != Up::Ok) {
                "200".into()
            } else {
                violation(
                    "not the endpoint's answer",
                    format!("200 with {} bytes {body:.60?}", seen.body_len),
                )
            }
        }
        (500, _) if plan.up == Up::Error500 && body == "status 500 from mock" => {
            "500 (the endpoint's)".into()
        }
        (400, Some(reason)) if aborting && reason == "client_body_error" => {
            "400 client_body_error (client left mid-upload)".into()
        }
        (status, _) => violation("unexpected answer", format!("{status} {body:.80?}")),
    }
}

async fn worker(soak: Arc<Soak>, seed: u64, first_id: u64, h2: Option<Arc<H2Client>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut id = first_id;
    while !soak.stop.load(Ordering::Relaxed) {
        let plan = Plan::random(id, &mut rng);
        id += 1;
        let started = Instant::now();
        let outcome = run(&soak, &plan, h2.as_deref()).await;
        let ended = Instant::now();
        soak.endpoints
            .client_done
            .lock()
            .unwrap()
            .insert(plan.id, ended);
        let label = judge(&soak, &plan, &outcome, started);
        if let Outcome::Aborted(what) = outcome {
            soak.faults.add(if h2.is_some() {
                format!("{what} (HTTP/2: stream reset)")
            } else {
                what.to_owned()
            });
        }
        if label.starts_with("429") {
            // A client that heeds a refusal a little (and leaves room for the others).
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
        }
        if h2.is_some() {
            soak.h2_answers.add(label.clone());
        }
        soak.answers.add(label);
        if let Some(exchanges) = &soak.exchanges {
            let answer = match &outcome {
                Outcome::Seen(seen) => Some((seen.status, seen.reason.clone())),
                _ => None,
            };
            exchanges.lock().unwrap().push(Exchange {
                plan,
                started,
                ended,
                answer,
            });
        }
    }
}

// ---- config, admin and faults ----

fn config_text(endpoints: &Endpoints, garbage: SocketAddr, cap: u32, queue: u32) -> String {
    config(&format!(
        "[timeouts]\nresponse = \"{RESPONSE_TIMEOUT}\"\nshutdown_grace = \"{}s\"\n\n\
         [[service]]\nname = \"garbage\"\npath_prefix = \"/garbage\"\nmax_concurrent = 4\n\
         endpoints = [\"http://{garbage}\"]\n\n{}\
         [service.rate_limit]\nmissing_key = \"anonymous\"\ndefault_tps = 300\n\
         [[service.resource]]\nname = \"team-a\"\nkey = \"{KEY_A}\"\ntps = 40\n\
         [[service.resource]]\nname = \"team-b\"\nkey = \"{KEY_B}\"\ntps = 1000\n",
        SHUTDOWN_GRACE.as_secs(),
        service(
            &endpoints.urls(),
            &format!("max_concurrent = {cap}\nqueue_size = {queue}\nqueue_timeout = \"200ms\"")
        ),
    ))
}

fn admin_call(
    soak: &Soak,
    method: &str,
    path: &str,
    body: &str,
) -> Request<http_body_util::Full<Bytes>> {
    let mut req = request(method, soak.admin, path, body.to_owned());
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    req
}

/// An admin call; a key in its answer is a violation.
async fn admin(soak: &Soak, method: &str, path: &str, body: &str) -> support::Answer {
    let answer = once(soak.admin, admin_call(soak, method, path, body)).await;
    if let Some(key) = leaked_key(answer.text().as_bytes()) {
        soak.violations.add(
            "key in an admin response",
            format!("{key} in {method} {path}"),
        );
    }
    answer
}

async fn live_cap(soak: &Soak) -> u64 {
    admin(soak, "GET", "/admin/policy", "").await.json()["service"][1]["max_concurrent"]
        .as_u64()
        .unwrap_or(0)
}

/// A live change to the service through the admin API; it must be accepted.
async fn patch(soak: &Soak, change: &str) {
    let answer = admin(soak, "PATCH", "/admin/services/scoring", change).await;
    if answer.status != 200 {
        soak.violations.add(
            "admin change refused",
            format!("{change}: {} {}", answer.status, answer.text()),
        );
    }
}

/// Faults that are not per request: endpoint kills, and with `admin`, admin changes and
/// reloads.
async fn inject_faults(
    soak: Arc<Soak>,
    sluice: Arc<AsyncMutex<Running>>,
    file: std::path::PathBuf,
    garbage: SocketAddr,
    seed: u64,
    with_admin_changes: bool,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17);
    let mut restarts = Vec::new();
    while !soak.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..500))).await;
        let cap = rng.gen_range(CAP_LOW..=CAP_HIGH);
        let queue = rng.gen_range(0..=16);
        let sighup = rng.gen_bool(0.5);
        let kind = rng.gen_range(0..100);
        if !with_admin_changes && kind >= 35 {
            continue;
        }
        match kind {
            0..35 => {
                if soak.endpoints.down() > 0 {
                    continue;
                }
                let i = rng.gen_range(0..ENDPOINTS);
                soak.endpoints.kill(i, &soak.violations);
                soak.faults.add("endpoint killed, restarted on its port");
                let endpoints = Arc::clone(&soak.endpoints);
                let down_for = Duration::from_millis(rng.gen_range(200..1000));
                restarts.push(tokio::spawn(async move {
                    tokio::time::sleep(down_for).await;
                    endpoints.restart(i).await;
                }));
            }
            35..55 => {
                let direction = if cap <= 3 { "lowered" } else { "raised" };
                patch(&soak, &format!(r#"{{"max_concurrent": {cap}}}"#)).await;
                soak.faults
                    .add(format!("admin PATCH max_concurrent ({direction})"));
            }
            55..65 => {
                patch(&soak, &format!(r#"{{"queue_size": {queue}}}"#)).await;
                soak.faults.add("admin PATCH queue_size");
            }
            65..82 => {
                std::fs::write(&file, config_text(&soak.endpoints, garbage, cap, queue))
                    .expect("write the config");
                if sighup {
                    sluice.lock().await.signal("HUP");
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while live_cap(&soak).await != u64::from(cap) {
                        if Instant::now() > deadline {
                            soak.violations
                                .add("valid reload not applied", format!("SIGHUP, cap {cap}"));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    soak.faults.add("reload, valid file (SIGHUP)");
                } else {
                    let answer = admin(&soak, "POST", "/admin/reload", "").await;
                    if answer.status != 200 || live_cap(&soak).await != u64::from(cap) {
                        soak.violations
                            .add("valid reload not applied", answer.text());
                    }
                    soak.faults.add("reload, valid file (POST /admin/reload)");
                }
            }
            _ => {
                let before = live_cap(&soak).await;
                let text = config_text(&soak.endpoints, garbage, cap, queue).replace(
                    &format!("max_concurrent = {cap}\n"),
                    "max_concurrent = 500\n",
                );
                std::fs::write(&file, text).expect("write the config");
                if sighup {
                    sluice.lock().await.signal("HUP");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    soak.faults.add("reload, invalid file (SIGHUP)");
                } else {
                    let answer = admin(&soak, "POST", "/admin/reload", "").await;
                    if answer.status != 400 {
                        soak.violations
                            .add("invalid reload not refused", answer.text());
                    }
                    soak.faults.add("reload, invalid file (POST /admin/reload)");
                }
                if live_cap(&soak).await != before {
                    soak.violations
                        .add("invalid reload changed the policy", format!("cap {before}"));
                }
            }
        }
    }
    for restart in restarts {
        restart.await.expect("restart task");
    }
}

/// sluice's own gauges while the load runs: never more in flight at an endpoint than the
/// highest cap ever in force.
async fn watch_gauges(soak: Arc<Soak>) -> u64 {
    let mut samples = 0;
    while !soak.stop.load(Ordering::Relaxed) {
        let capacity = admin(&soak, "GET", "/admin/capacity", "").await.json();
        for service in capacity["services"].as_array().into_iter().flatten() {
            for endpoint in service["endpoints"].as_array().into_iter().flatten() {
                let in_flight = endpoint["in_flight"].as_u64().unwrap_or(0);
                if in_flight > u64::from(CAP_HIGH) {
                    soak.violations
                        .add("gauge over the cap", format!("{endpoint}"));
                }
            }
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    samples
}

/// Wait until every in-flight and queue gauge is 0; how long that took.
async fn gauges_at_zero(soak: &Soak) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let capacity = admin(soak, "GET", "/admin/capacity", "").await.json();
        let busy = capacity["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                s["in_flight"] != 0
                    || s["queue_length"] != 0
                    || s["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e["in_flight"] != 0)
            });
        if !busy {
            return Some(started.elapsed());
        }
        if started.elapsed() > DEADLINE {
            soak.violations
                .add("gauges did not return to 0", capacity.to_string());
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// RSS (KiB) and open fds once the load has stopped, gauges are at 0, and the pooled
/// connections on both sides are closed.
async fn settle(soak: &Soak, sluice: &AsyncMutex<Running>) -> (u64, usize, Option<Duration>) {
    let drained = gauges_at_zero(soak).await;
    soak.endpoints.cycle_all(&soak.violations).await;
    // sluice notices the closed upstream connections; client connections are closed too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = sluice.lock().await;
    (running.status_kb("VmRSS"), open_fds(running.pid()), drained)
}

async fn load(soak: &Arc<Soak>, seed: u64, id_base: u64, for_how_long: Duration) {
    soak.stop.store(false, Ordering::Relaxed);
    let h2: Vec<Arc<H2Client>> = (0..H2_CONNECTIONS)
        .map(|_| Arc::new(H2Client::new()))
        .collect();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            // The first workers share the HTTP/2 connections, H2_STREAMS to a connection.
            let h2 = h2.get(w / H2_STREAMS).map(Arc::clone);
            let w = w as u64;
            tokio::spawn(worker(
                Arc::clone(soak),
                seed.wrapping_mul(1000).wrapping_add(w),
                id_base + w * 10_000_000,
                h2,
            ))
        })
        .collect();
    tokio::time::sleep(for_how_long).await;
    soak.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
}

// ---- shutdown under load ----

struct ShutdownReport {
    streams: usize,
    completed: usize,
    stalled_answered: usize,
    stalled_otherwise: Vec<String>,
    refused_after: Option<Duration>,
    exit_after: Duration,
    exit_code: Option<i32>,
}

async fn sigterm_under_load(soak: &Arc<Soak>, sluice: &AsyncMutex<Running>) -> ShutdownReport {
    const STREAMS: usize = 12;
    const STALLED: usize = 4;
    const CHUNKS: usize = 40;
    let addr = soak.addr;
    // Streams that are mid-body at SIGTERM (40 chunks, one every 20 ms).
    let mut streams = Vec::new();
    // A GET on a connection of its own, keyed as team-b (whose limit is not the point here).
    let get_on_own = |path: String| async move {
        let (sender, connection) = own_connection(addr).await.expect("connect");
        let req = builder("GET", addr, &path)
            .header("x-api-key", KEY_B)
            .body(UploadBody::Full(None))
            .unwrap();
        (sender, connection, req)
    };
    for i in 0..STREAMS {
        let path = format!("/score?id={}&up=slow&chunks={CHUNKS}", 900_000_000 + i);
        let (mut sender, connection, req) = get_on_own(path).await;
        let response = sender.send_request(req).await.expect("response headers");
        streams.push(tokio::spawn(async move {
            let _connection = connection;
            let seen = read_response(response, false).await;
            seen.status == 200 && !seen.broken && seen.body_len == (CHUNKS as u64) << 10
        }));
    }
    // And requests waiting for headers that will never come (504 at timeouts.response).
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let path = format!("/score?id={}&up=stall", 910_000_000 + i);
        let (mut sender, connection, req) = get_on_own(path).await;
        stalled.push(tokio::spawn(async move {
            let _connection = connection;
            match sender.send_request(req).await {
                Ok(response) => {
                    let seen = read_response(response, false).await;
                    let reason = seen.reason.unwrap_or_default();
                    (seen.status == 504 && reason == "upstream_timeout")
                        .then_some(())
                        .ok_or(format!("{} {reason}", seen.status))
                }
                Err(e) => Err(chain(&e)),
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let signalled = Instant::now();
    let mut running = sluice.lock().await;
    running.signal("TERM");
    let mut refused_after = None;
    while signalled.elapsed() < SHUTDOWN_GRACE {
        if TcpStream::connect(addr).await.is_err() {
            refused_after = Some(signalled.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut completed = 0;
    for s in streams {
        completed += usize::from(s.await.unwrap_or(false));
    }
    let mut stalled_answered = 0;
    let mut stalled_otherwise = Vec::new();
    for s in stalled {
        match s.await.expect("stalled request task") {
            Ok(()) => stalled_answered += 1,
            Err(e) => stalled_otherwise.push(e),
        }
    }
    let status = running.wait_exit(SHUTDOWN_GRACE + DEADLINE).await;
    let exit_after = signalled.elapsed();
    ShutdownReport {
        streams: STREAMS,
        completed,
        stalled_answered,
        stalled_otherwise,
        refused_after,
        exit_after,
        exit_code: status.code(),
    }
}

// ---- the tests ----

/// The variants drive the same two cores: they run one after the other.
static ONE_AT_A_TIME: AsyncMutex<()> = AsyncMutex::const_new(());

#[path = "soak/store.rs"]
mod store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_then_sigterm() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Settings {
        soak: soak_for,
        seed,
        ..
    } = settings();
    let began = Instant::now();
    let endpoints = Endpoints::start().await;
    let (garbage, garbage_tally) = garbage_endpoint().await;
    let file = write_config("soak", &config_text(&endpoints, garbage, 4, 8));
    let (sluice, soak) = start_soak(&file, &endpoints, began, false).await;

    // Warm up without faults, then take the baseline with nothing in flight.
    load(&soak, seed, 0, WARM_UP).await;
    *soak.pooled.lock().unwrap() = new_pool();
    let (rss_base, fds_base, _) = settle(&soak, &sluice).await;
    let warm_requests = soak.answers.total();

    // The soak itself.
    let soak_started = Instant::now();
    soak.stop.store(false, Ordering::Relaxed);
    let injector = tokio::spawn(inject_faults(
        Arc::clone(&soak),
        Arc::clone(&sluice),
        file.clone(),
        garbage,
        seed,
        true,
    ));
    let gauges = tokio::spawn(watch_gauges(Arc::clone(&soak)));
    load(&soak, seed.wrapping_add(1), 1_000_000_000, soak_for).await;
    injector.await.expect("fault injector");
    let samples = gauges.await.expect("gauge watch");
    let soak_took = soak_started.elapsed();
    let requests = soak.answers.total() - warm_requests;
    *soak.pooled.lock().unwrap() = new_pool();
    let rss_peak = sluice.lock().await.status_kb("VmHWM");
    let (rss_end, fds_end, drained) = settle(&soak, &sluice).await;
    // Open fds come back exactly (a few for connections still closing); RSS may keep
    // allocator arenas, so it is bounded, not equal.
    if fds_end > fds_base + 4 {
        soak.violations.add(
            "file descriptors not back to baseline",
            format!("{fds_base} → {fds_end}"),
        );
    }
    let rss_allowed = rss_base + (rss_base / 2).max(32 << 10);
    if rss_end > rss_allowed {
        soak.violations.add(
            "RSS not back near baseline",
            format!("{rss_base} KiB → {rss_end} KiB (allowed {rss_allowed})"),
        );
    }

    // Every view an operator reads, after all that traffic: none may show a key.
    for path in [
        "/",
        "/metrics",
        "/admin/capacity",
        "/admin/policy",
        "/admin/autoscale/events",
    ] {
        admin(&soak, "GET", path, "").await;
    }

    // SIGTERM under load, with room for every request of it: the highest cap, and a queue
    // wait long enough for endpoints still in their back-off after a kill.
    patch(
        &soak,
        &format!(r#"{{"max_concurrent": {CAP_HIGH}, "queue_size": 16, "queue_timeout": "2s"}}"#),
    )
    .await;
    let shutdown = sigterm_under_load(&soak, &sluice).await;
    if shutdown.completed != shutdown.streams {
        soak.violations.add(
            "stream in flight at SIGTERM did not complete",
            format!("{}/{}", shutdown.completed, shutdown.streams),
        );
    }
    if shutdown.stalled_answered != 4 {
        soak.violations.add(
            "request waiting at SIGTERM got no 504",
            format!(
                "{}/4: {:?}",
                shutdown.stalled_answered, shutdown.stalled_otherwise
            ),
        );
    }
    if shutdown.refused_after.is_none() {
        soak.violations.add(
            "new connections still accepted after SIGTERM",
            String::new(),
        );
    }
    if shutdown.exit_code != Some(0)
        || shutdown.exit_after > SHUTDOWN_GRACE + Duration::from_secs(1)
    {
        soak.violations.add(
            "exit after SIGTERM",
            format!(
                "code {:?} after {:?}",
                shutdown.exit_code, shutdown.exit_after
            ),
        );
    }
    let output = sluice.lock().await.output();
    if let Some(key) = leaked_key(output.as_bytes()) {
        let line = output.lines().find(|l| l.contains(key)).unwrap_or_default();
        soak.violations.add("key in the log", line.to_owned());
    }
    let panics: Vec<&str> = output
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("panic"))
        .collect();
    if !panics.is_empty() {
        soak.violations.add("panic in the log", panics.join("\n"));
    }
    endpoints.cycle_all(&soak.violations).await;

    soak.judge_garbage_timeouts(&garbage_tally);

    // The summary.
    let violations = soak.violations.total();
    let (kinds, examples) = soak.violations.0.lock().unwrap().clone();
    let peaks = *endpoints.max_peak.lock().unwrap();
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "soak: seed {seed}, {:.1} s of faults ({} clients, caps {CAP_LOW}..={CAP_HIGH} × {ENDPOINTS} endpoints, \
         timeouts.response {RESPONSE_TIMEOUT}); whole run {:.1} s",
        soak_took.as_secs_f64(),
        WORKERS,
        began.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        summary,
        "soak: requests {} during the faults ({:.0}/s), {} in the warm-up",
        requests,
        requests as f64 / soak_took.as_secs_f64(),
        warm_requests
    );
    soak.write_tallies(&mut summary, "soak", &garbage_tally);
    let _ = writeln!(
        summary,
        "soak: endpoint instances {} (most served at once by one: {} as it counted, {} with \
         abandoned exchanges ended when sluice gave them up; highest cap {CAP_HIGH}); \
         request ids seen by endpoints {}; gauge samples {samples}",
        endpoints.instances.lock().unwrap(),
        peaks.0,
        peaks.1,
        endpoints.arrivals.lock().unwrap().len(),
    );
    let _ = writeln!(
        summary,
        "soak: gauges back to 0 after {drained:?}; RSS baseline {rss_base} KiB, end {rss_end} KiB, \
         peak {rss_peak} KiB; open fds baseline {fds_base}, end {fds_end}"
    );
    let _ = writeln!(
        summary,
        "soak: SIGTERM with {} streams and 4 stalled requests in flight: {} streams complete, \
         {} stalled got 504, new connections refused after {:?}, exit {:?} after {:?} (grace {:?})",
        shutdown.streams,
        shutdown.completed,
        shutdown.stalled_answered,
        shutdown.refused_after,
        shutdown.exit_code,
        shutdown.exit_after,
        SHUTDOWN_GRACE
    );
    let _ = writeln!(summary, "soak: violations {violations} {kinds:?}");
    for example in &examples {
        let _ = writeln!(summary, "soak:   {example}");
    }
    eprint!("{summary}");
    assert_eq!(violations, 0, "invariants broken:\n{summary}");
}
