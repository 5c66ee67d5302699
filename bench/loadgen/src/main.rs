//! sluice-bench-load: the load client of bench/run.sh.
//!
//! `run`: N keep-alive HTTP/1.1 connections, each a closed loop (send, wait for the answer,
//! send again), on one thread (pin it with taskset). Latencies are kept per status code, so
//! the p99 of admitted answers and the p99 of 429 refusals are reported separately — wrk's
//! percentiles mix them, and its Lua hooks cannot tie a response to its request's start time.
//! With `--tick-ms N` it also prints the wall-clock start (`START unix_ms=`, at once) and, at
//! the end, answers counted per N ms of their *arrival* time (`TICK`), for throughput over time.
//!
//! `hold`: open N connections, make one request on each, then keep them all open and idle
//! until killed (for RSS with many client connections). `--proto h2`: HTTP/2 with prior
//! knowledge (h2c) through hyper's client instead, one request (stream) per connection.
//! `--head-bytes N`: pad that request's head with `x-pad-*` headers of at most 4000 bytes each
//! to about N bytes (a large head); `--path` picks what is fetched (a large body, say). The
//! `HELD` line counts the connections kept, the ones that failed, the answers that were not
//! 2xx and the body bytes read. Connection i sends `x-api-key: key-(i mod --keys + 1)`;
//! `--keys` is 1 by default here (one key: a proxy's per-key limit may refuse some).
//!
//! `rate`: open loop at a fixed rate: request k is sent at start + k/rps whatever the answers
//! to earlier ones (a new connection is opened when every open one is busy), for the rate
//! accuracy scenario. Answers are counted per second of their request's send time.
//!
//! `sweep`: every key of `key-PREFIX0 .. key-PREFIX(N-1)` exactly once, over `--conns` closed
//! loops (to fill a proxy's table of tracked keys).
//!
//! The HTTP client is deliberately minimal: GET (or, with `--body`, POST of that body with
//! `Content-Length` and `Content-Type: application/json`), Content-Length or chunked answers.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout_at, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};

const USAGE: &str = "usage:
  sluice-bench-load run  --addr HOST:PORT [--path /] [--conns 200] [--duration 10]
                         [--keys 1000] [--backoff-ms 0]  (after a refusal: wait backoff/2..3·backoff/2)
                         [--tick-ms 0]  (N > 0: START unix_ms=, then TICK lines: answers per N ms)
                         [--body JSON]  (POST this body, Content-Type: application/json; else GET)
  sluice-bench-load hold --addr HOST:PORT [--conns 10000] [--batch 200] [--proto h1|h2]
                         [--path /] [--head-bytes 0] [--keys 1]
  sluice-bench-load rate --addr HOST:PORT --rps N [--duration 30] [--header NAME:VALUE]...
  sluice-bench-load sweep --addr HOST:PORT [--keys 100000] [--conns 50] [--prefix s]";

#[derive(Clone)]
struct Opts {
    addr: String,
    path: String,
    conns: usize,
    duration: f64,
    keys: usize,
    backoff: Duration,
    batch: usize,
    rps: f64,
    headers: Vec<String>,
    prefix: String,
    tick: Duration,
    /// `run`: POST this body instead of a GET when not empty.
    body: String,
    /// `hold`: HTTP/2 with prior knowledge instead of HTTP/1.1.
    h2: bool,
    /// `hold`: pad the request head to about this many bytes (0: no padding).
    head_bytes: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        addr: String::new(),
        path: "/".into(),
        conns: 0,
        duration: 10.0,
        keys: 1000,
        backoff: Duration::ZERO,
        batch: 200,
        rps: 0.0,
        headers: Vec::new(),
        prefix: String::new(),
        tick: Duration::ZERO,
        body: String::new(),
        h2: false,
        head_bytes: 0,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |_| format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--addr" => o.addr = value.clone(),
            "--path" => o.path = value.clone(),
            "--conns" => o.conns = value.parse().map_err(bad)?,
            "--duration" => o.duration = value.parse().map_err(|_| format!("bad {flag}"))?,
            "--keys" => o.keys = value.parse().map_err(bad)?,
            "--backoff-ms" => o.backoff = Duration::from_millis(value.parse().map_err(bad)?),
            "--batch" => o.batch = value.parse().map_err(bad)?,
            "--rps" => o.rps = value.parse().map_err(|_| format!("bad {flag}"))?,
            "--prefix" => o.prefix = value.clone(),
            "--tick-ms" => o.tick = Duration::from_millis(value.parse().map_err(bad)?),
            "--body" => o.body = value.clone(),
            "--proto" => {
                o.h2 = match value.as_str() {
                    "h1" => false,
                    "h2" => true,
                    _ => return Err(format!("--proto is h1 or h2, not {value}")),
                }
            }
            "--head-bytes" => o.head_bytes = value.parse().map_err(bad)?,
            "--header" => {
                let (name, val) = value
                    .split_once(':')
                    .ok_or_else(|| format!("--header wants NAME:VALUE, not {value}"))?;
                o.headers.push(format!("{}: {}", name.trim(), val.trim()));
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if o.addr.is_empty() {
        return Err("--addr is required".into());
    }
    Ok(o)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let mut opts = match parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    match cmd {
        "run" => {
            if opts.conns == 0 {
                opts.conns = 200;
            }
            rt.block_on(run(opts))
        }
        "hold" => {
            if opts.conns == 0 {
                opts.conns = 10_000;
            }
            if !rest.iter().any(|a| a == "--keys") {
                opts.keys = 1;
            }
            rt.block_on(hold(opts))
        }
        "rate" => {
            if opts.rps <= 0.0 {
                eprintln!("rate needs --rps > 0\n{USAGE}");
                std::process::exit(2);
            }
            if opts.duration == 10.0 && !rest.iter().any(|a| a == "--duration") {
                opts.duration = 30.0;
            }
            rt.block_on(rate(opts))
        }
        "sweep" => {
            if opts.conns == 0 {
                opts.conns = 50;
            }
            if !rest.iter().any(|a| a == "--keys") {
                opts.keys = 100_000;
            }
            rt.block_on(sweep(opts))
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

/// One parsed response head.
struct Head {
    status: u16,
    close: bool,
}

#[derive(Debug)]
enum Fail {
    Io,
    Closed,
    Parse,
}

impl From<std::io::Error> for Fail {
    fn from(_: std::io::Error) -> Self {
        Fail::Io
    }
}

/// A keep-alive connection with its read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Body bytes of the last response read (chunked: the chunks' data).
    last_body: usize,
}

impl Conn {
    async fn open(addr: &str) -> Result<Self, Fail> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
            last_body: 0,
        })
    }

    async fn fill(&mut self) -> Result<(), Fail> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(Fail::Closed);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Send `req` and read one whole response.
    async fn exchange(&mut self, req: &[u8]) -> Result<Head, Fail> {
        self.stream.write_all(req).await?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let text = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| Fail::Parse)?;
        let mut lines = text.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or(Fail::Parse)?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().map_err(|_| Fail::Parse)?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        self.buf.drain(..head_end);
        self.last_body = 0;
        if chunked {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    self.fill().await?;
                };
                let size_text =
                    std::str::from_utf8(&self.buf[..line_end]).map_err(|_| Fail::Parse)?;
                let size_text = size_text.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16).map_err(|_| Fail::Parse)?;
                // chunk data plus its CRLF; the last chunk (0) is followed by an empty line.
                let need = line_end + 2 + size + 2;
                while self.buf.len() < need {
                    self.fill().await?;
                }
                self.buf.drain(..need);
                self.last_body += size;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            while self.buf.len() < n {
                self.fill().await?;
            }
            self.buf.drain(..n);
            self.last_body = n;
        } else if status >= 200 && status != 204 && status != 304 {
            // Body until close: read it all, then the connection is done.
            while self.fill().await.is_ok() {}
            self.buf.clear();
            close = true;
        }
        Ok(Head { status, close })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn request(o: &Opts, key: usize) -> Vec<u8> {
    if o.body.is_empty() {
        return format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nx-api-key: key-{}\r\n\r\n",
            o.path, o.addr, key
        )
        .into_bytes();
    }
    format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nx-api-key: key-{}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{}",
        o.path,
        o.addr,
        key,
        o.body.len(),
        o.body
    )
    .into_bytes()
}

#[derive(Default)]
struct Tally {
    /// status -> latencies in microseconds
    by_status: HashMap<u16, Vec<u32>>,
    errors: u64,
    reconnects: u64,
    /// With `--tick-ms`: per tick of arrival time, [2xx, non-2xx, 5xx, errors].
    ticks: Vec<[u64; 4]>,
}

impl Tally {
    /// Count one outcome (`col` of [`Tally::ticks`]) in the tick `now` falls in.
    fn tick(&mut self, o: &Opts, start: Instant, now: Instant, col: usize) {
        if o.tick.is_zero() {
            return;
        }
        let i = (now.saturating_duration_since(start).as_nanos() / o.tick.as_nanos()) as usize;
        if self.ticks.len() <= i {
            self.ticks.resize(i + 1, [0; 4]);
        }
        self.ticks[i][col] += 1;
    }
}

async fn client(o: Opts, id: usize, start: Instant, deadline: Instant) -> Tally {
    let keys = o.keys.max(1);
    let reqs: Vec<Vec<u8>> = (1..=keys).map(|k| request(&o, k)).collect();
    let mut next = id % keys;
    let mut rng = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut t = Tally::default();
    let mut conn: Option<Conn> = None;
    while Instant::now() < deadline {
        if conn.is_none() {
            match timeout_at(deadline, Conn::open(&o.addr)).await {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(_)) => {
                    t.errors += 1;
                    t.tick(&o, start, Instant::now(), 3);
                    sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(_) => break,
            }
        }
        let c = conn.as_mut().expect("connected above");
        let req = &reqs[next];
        next = (next + 1) % keys;
        let sent = Instant::now();
        match timeout_at(deadline, c.exchange(req)).await {
            Err(_) => break, // still waiting at the deadline: not counted
            Ok(Ok(head)) => {
                let now = Instant::now();
                let us = now.duration_since(sent).as_micros().min(u32::MAX as u128) as u32;
                t.by_status.entry(head.status).or_default().push(us);
                let ok = (200..300).contains(&head.status);
                t.tick(&o, start, now, if ok { 0 } else { 1 });
                if head.status >= 500 {
                    t.tick(&o, start, now, 2);
                }
                if head.close {
                    conn = None;
                    t.reconnects += 1;
                }
                if !(200..300).contains(&head.status) && !o.backoff.is_zero() {
                    sleep(jittered(o.backoff, &mut rng)).await;
                }
            }
            Ok(Err(_)) => {
                t.errors += 1;
                t.tick(&o, start, Instant::now(), 3);
                conn = None;
            }
        }
    }
    t
}

/// A back-off drawn uniformly from [base/2, 3·base/2] (xorshift64 in `state`): clients that all
/// waited exactly `base` would come back in lock-step, every refused client in the same
/// millisecond, and the refusal latency measured would be that herd's queue.
fn jittered(base: Duration, state: &mut u64) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let unit = (*state >> 11) as f64 / (1u64 << 53) as f64;
    base.mul_f64(0.5 + unit)
}

fn pct(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

async fn run(o: Opts) {
    let start = Instant::now();
    if !o.tick.is_zero() {
        // The wall clock of `start`, so a harness can place its own events on the ticks.
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        println!("START unix_ms={}", unix.as_millis());
        let _ = std::io::stdout().flush();
    }
    let deadline = start + Duration::from_secs_f64(o.duration);
    let tasks: Vec<_> = (0..o.conns)
        .map(|i| tokio::spawn(client(o.clone(), i * 7919, start, deadline)))
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.expect("client task does not panic");
        all.errors += t.errors;
        all.reconnects += t.reconnects;
        if all.ticks.len() < t.ticks.len() {
            all.ticks.resize(t.ticks.len(), [0; 4]);
        }
        for (sum, tick) in all.ticks.iter_mut().zip(&t.ticks) {
            for (a, b) in sum.iter_mut().zip(tick) {
                *a += b;
            }
        }
        for (status, mut lat) in t.by_status {
            all.by_status.entry(status).or_default().append(&mut lat);
        }
    }
    let secs = o.duration;
    let total: usize = all.by_status.values().map(Vec::len).sum();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "RESULT dur_s={secs:.2} conns={} total={total} rps={:.0} errors={} reconnects={}",
        o.conns,
        total as f64 / secs,
        all.errors,
        all.reconnects
    );
    let mut statuses: Vec<_> = all.by_status.into_iter().collect();
    statuses.sort_by_key(|(s, _)| *s);
    // Two classes as well: admitted (2xx) and everything else (refusals: 429, 502, 503...).
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    let mut refused_codes = Vec::new();
    for (status, lat) in &mut statuses {
        lat.sort_unstable();
        print_line(&mut out, &format!("STATUS {status}"), lat, secs);
        if (200..300).contains(status) {
            ok.extend_from_slice(lat);
        } else {
            refused.extend_from_slice(lat);
            refused_codes.push(status.to_string());
        }
    }
    ok.sort_unstable();
    refused.sort_unstable();
    print_line(&mut out, "CLASS ok", &ok, secs);
    let codes = if refused_codes.is_empty() {
        "-".to_string()
    } else {
        refused_codes.join("/")
    };
    print_line(
        &mut out,
        &format!("CLASS refused codes={codes}"),
        &refused,
        secs,
    );
    if !o.tick.is_zero() {
        let n = (o.duration / o.tick.as_secs_f64()).ceil() as usize;
        for (i, [ok, non2xx, s5xx, errors]) in all
            .ticks
            .iter()
            .copied()
            .chain(std::iter::repeat([0; 4]))
            .take(n)
            .enumerate()
        {
            let _ = writeln!(
                out,
                "TICK {i} ok={ok} non2xx={non2xx} s5xx={s5xx} errors={errors}"
            );
        }
    }
}

fn print_line(out: &mut impl Write, label: &str, sorted: &[u32], secs: f64) {
    let _ = writeln!(
        out,
        "{label} count={} rps={:.0} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        sorted.len(),
        sorted.len() as f64 / secs,
        pct(sorted, 0.50),
        pct(sorted, 0.90),
        pct(sorted, 0.99),
        pct(sorted, 1.0),
    );
}

/// `x-pad-N: aaa…` headers, each at most 4000 bytes with its CRLF, that bring a head of
/// `base` bytes to about `target` bytes (none if it is already there).
fn padding(base: usize, target: usize) -> Vec<(String, String)> {
    let mut pads = Vec::new();
    let mut size = base;
    while size + 16 < target {
        let name = format!("x-pad-{}", pads.len());
        let value_len = (target - size)
            .min(4000)
            .saturating_sub(name.len() + 4)
            .max(1);
        size += name.len() + 4 + value_len;
        pads.push((name, "a".repeat(value_len)));
    }
    pads
}

/// `req` (a whole head, no body) with `pads` before its empty last line.
fn padded(mut req: Vec<u8>, pads: &[(String, String)]) -> Vec<u8> {
    if !pads.is_empty() {
        req.truncate(req.len() - 2);
        for (name, value) in pads {
            req.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
    }
    req
}

/// What one held connection keeps alive: an HTTP/1.1 socket, or hyper's HTTP/2 handle (the
/// connection's task runs as long as a handle exists).
enum Held {
    H1(#[allow(dead_code)] Conn),
    H2(#[allow(dead_code)] hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One request on a new connection; the connection, the status and the body bytes read.
async fn hold_one(
    o: &Opts,
    key: usize,
    pads: &[(String, String)],
) -> Result<(Held, u16, usize), Fail> {
    if !o.h2 {
        let mut c = Conn::open(&o.addr).await?;
        let head = c.exchange(&padded(request(o, key), pads)).await?;
        if head.close {
            return Err(Fail::Closed);
        }
        let body = c.last_body;
        // Keep no large read buffer here: 2000 connections that each read 1 MiB would hold GBs.
        c.buf = Vec::new();
        return Ok((Held::H1(c), head.status, body));
    }
    let stream = TcpStream::connect(&o.addr).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|_| Fail::Io)?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(format!("http://{}{}", o.addr, o.path))
        .header("x-api-key", format!("key-{key}"));
    for (name, value) in pads {
        req = req.header(name.as_str(), value.as_str());
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|_| Fail::Parse)?;
    let res = send.send_request(req).await.map_err(|_| Fail::Io)?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|_| Fail::Io)?
        .to_bytes()
        .len();
    Ok((Held::H2(send), status, body))
}

async fn hold(o: Opts) {
    let mut held = Vec::with_capacity(o.conns);
    let (mut failed, mut non2xx, mut body_bytes) = (0usize, 0usize, 0usize);
    let mut statuses: std::collections::BTreeMap<u16, usize> = Default::default();
    let base = request(&o, 1);
    let pads = Arc::new(padding(base.len(), o.head_bytes));
    let head_bytes = padded(base, &pads).len();
    let o = Arc::new(o);
    let mut remaining = o.conns;
    let mut next = 0;
    while remaining > 0 {
        let n = remaining.min(o.batch.max(1));
        remaining -= n;
        let batch: Vec<_> = (0..n)
            .map(|_| {
                let (o, pads) = (o.clone(), pads.clone());
                let key = next % o.keys.max(1) + 1;
                next += 1;
                tokio::spawn(async move {
                    // A proxy at its connection limit leaves us in its backlog: give up then.
                    let limit =
                        Instant::now() + Duration::from_secs(if o.head_bytes > 0 { 30 } else { 5 });
                    timeout_at(limit, hold_one(&o, key, &pads))
                        .await
                        .map_err(|_| Fail::Io)?
                })
            })
            .collect();
        for task in batch {
            match task.await {
                Ok(Ok((c, status, body))) => {
                    if !(200..300).contains(&status) {
                        non2xx += 1;
                    }
                    *statuses.entry(status).or_default() += 1;
                    body_bytes += body;
                    held.push(c);
                }
                _ => failed += 1,
            }
        }
    }
    println!(
        "HELD {} failed={failed} non2xx={non2xx} body_bytes={body_bytes} head_bytes={} proto={} statuses={}",
        held.len(),
        head_bytes,
        if o.h2 { "h2" } else { "h1" },
        statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let _ = std::io::stdout().flush();
    // Hold until killed; a connection the server closes stays counted here but the harness
    // checks the server's own socket count.
    loop {
        sleep(Duration::from_secs(3600)).await;
    }
}

/// Per-second tallies of the `rate` mode, by the second of each request's send time.
#[derive(Default)]
struct RateTally {
    sent: Vec<u64>,
    ok: Vec<u64>,
    refused: Vec<u64>,
    errors: u64,
    max_lag_us: u64,
    lags_us: Vec<u32>,
    opened: u64,
}

impl RateTally {
    fn bump(v: &mut Vec<u64>, sec: usize) {
        if v.len() <= sec {
            v.resize(sec + 1, 0);
        }
        v[sec] += 1;
    }
}

async fn rate(o: Opts) {
    let mut req = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", o.path, o.addr);
    for h in &o.headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let req: Arc<[u8]> = req.into_bytes().into();
    let total = (o.rps * o.duration).round() as u64;
    let idle: Arc<Mutex<Vec<Conn>>> = Arc::default();
    let tally: Arc<Mutex<RateTally>> = Arc::default();
    let secs = o.duration.ceil() as usize;
    {
        let mut t = tally.lock().expect("tally lock");
        t.sent.resize(secs, 0);
        t.ok.resize(secs, 0);
        t.refused.resize(secs, 0);
    }
    // Open a few connections before the clock starts, so the first second is not spent connecting.
    for _ in 0..((o.rps / 200.0).ceil() as usize).clamp(2, 64) {
        if let Ok(c) = Conn::open(&o.addr).await {
            idle.lock().expect("idle lock").push(c);
        }
    }
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / o.rps);
        tokio::time::sleep_until(due).await;
        let (idle, tally, req, addr) = (idle.clone(), tally.clone(), req.clone(), o.addr.clone());
        tasks.push(tokio::spawn(async move {
            let reused = idle.lock().expect("idle lock").pop();
            let mut conn = match reused {
                Some(c) => c,
                None => match Conn::open(&addr).await {
                    Ok(c) => {
                        tally.lock().expect("tally lock").opened += 1;
                        c
                    }
                    Err(_) => {
                        tally.lock().expect("tally lock").errors += 1;
                        return;
                    }
                },
            };
            let sent = Instant::now();
            let sec = sent.saturating_duration_since(start).as_secs() as usize;
            let lag = sent.saturating_duration_since(due).as_micros() as u64;
            let result = conn.exchange(&req).await;
            let mut t = tally.lock().expect("tally lock");
            RateTally::bump(&mut t.sent, sec);
            t.max_lag_us = t.max_lag_us.max(lag);
            t.lags_us.push(lag.min(u32::MAX as u64) as u32);
            match result {
                Ok(head) => {
                    if (200..300).contains(&head.status) {
                        RateTally::bump(&mut t.ok, sec);
                    } else {
                        RateTally::bump(&mut t.refused, sec);
                    }
                    drop(t);
                    if !head.close {
                        idle.lock().expect("idle lock").push(conn);
                    }
                }
                Err(_) => t.errors += 1,
            }
        }));
    }
    // Answers to the last requests still count: wait for them (5 s at most).
    let grace = Instant::now() + Duration::from_secs(5);
    for task in tasks {
        let _ = timeout_at(grace, task).await;
    }
    let mut t = tally.lock().expect("tally lock");
    t.lags_us.sort_unstable();
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "RATE rps={} dur_s={} scheduled={total} sent={} ok={} refused={} errors={} conns_opened={} lag_p99_ms={:.3} lag_max_ms={:.3}",
        o.rps,
        o.duration,
        sum(&t.sent),
        sum(&t.ok),
        sum(&t.refused),
        t.errors,
        t.opened,
        pct(&t.lags_us, 0.99),
        t.max_lag_us as f64 / 1000.0,
    );
    let n = t.sent.len().max(t.ok.len()).max(t.refused.len());
    for sec in 0..n {
        let get = |v: &[u64]| v.get(sec).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "SEC {sec} sent={} ok={} refused={}",
            get(&t.sent),
            get(&t.ok),
            get(&t.refused)
        );
    }
}

async fn sweep(o: Opts) {
    let next = Arc::new(AtomicUsize::new(0));
    let tally: Arc<Mutex<(u64, u64, u64)>> = Arc::default(); // ok, refused, errors
    let start = Instant::now();
    let tasks: Vec<_> = (0..o.conns)
        .map(|_| {
            let (next, tally, o) = (next.clone(), tally.clone(), o.clone());
            tokio::spawn(async move {
                let mut conn: Option<Conn> = None;
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= o.keys {
                        break;
                    }
                    if conn.is_none() {
                        conn = Conn::open(&o.addr).await.ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        tally.lock().expect("tally lock").2 += 1;
                        continue;
                    };
                    let req = format!(
                        "GET {} HTTP/1.1\r\nHost: {}\r\nx-api-key: key-{}{k}\r\n\r\n",
                        o.path, o.addr, o.prefix
                    );
                    let result = c.exchange(req.as_bytes()).await;
                    let mut t = tally.lock().expect("tally lock");
                    match result {
                        Ok(head) => {
                            if (200..300).contains(&head.status) {
                                t.0 += 1;
                            } else {
                                t.1 += 1;
                            }
                            if head.close {
                                conn = None;
                            }
                        }
                        Err(_) => {
                            t.2 += 1;
                            conn = None;
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let (ok, refused, errors) = *tally.lock().expect("tally lock");
    println!(
        "SWEEP keys={} ok={ok} refused={refused} errors={errors} secs={:.2}",
        o.keys,
        start.elapsed().as_secs_f64()
    );
}
