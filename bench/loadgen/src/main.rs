//! sluice-bench-load: the load client of bench/run.sh.
//!
//! `run`: N keep-alive HTTP/1.1 connections, each a closed loop (send, wait for the answer,
//! send again), on one thread (pin it with taskset). Latencies are kept per status code, so
//! the p99 of admitted answers and the p99 of 429 refusals are reported separately — wrk's
//! percentiles mix them, and its Lua hooks cannot tie a response to its request's start time.
//!
//! `hold`: open N connections, make one request on each, then keep them all open and idle
//! until killed (for RSS with many client connections).
//!
//! The HTTP client is deliberately minimal: GET only, Content-Length or chunked bodies.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout_at, Instant};

const USAGE: &str = "usage:
  sluice-bench-load run  --addr HOST:PORT [--path /] [--conns 200] [--duration 10]
                         [--keys 1000] [--backoff-ms 0]
  sluice-bench-load hold --addr HOST:PORT [--conns 10000] [--batch 200]";

#[derive(Clone)]
struct Opts {
    addr: String,
    path: String,
    conns: usize,
    duration: f64,
    keys: usize,
    backoff: Duration,
    batch: usize,
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
            rt.block_on(hold(opts))
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
}

impl Conn {
    async fn open(addr: &str) -> Result<Self, Fail> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
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
        if chunked {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    self.fill().await?;
                };
                let size_text = std::str::from_utf8(&self.buf[..line_end]).map_err(|_| Fail::Parse)?;
                let size_text = size_text.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16).map_err(|_| Fail::Parse)?;
                // chunk data plus its CRLF; the last chunk (0) is followed by an empty line.
                let need = line_end + 2 + size + 2;
                while self.buf.len() < need {
                    self.fill().await?;
                }
                self.buf.drain(..need);
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            while self.buf.len() < n {
                self.fill().await?;
            }
            self.buf.drain(..n);
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
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nx-api-key: key-{}\r\n\r\n",
        o.path, o.addr, key
    )
    .into_bytes()
}

#[derive(Default)]
struct Tally {
    /// status -> latencies in microseconds
    by_status: HashMap<u16, Vec<u32>>,
    errors: u64,
    reconnects: u64,
}

async fn client(o: Opts, id: usize, deadline: Instant) -> Tally {
    let keys = o.keys.max(1);
    let reqs: Vec<Vec<u8>> = (1..=keys).map(|k| request(&o, k)).collect();
    let mut next = id % keys;
    let mut t = Tally::default();
    let mut conn: Option<Conn> = None;
    while Instant::now() < deadline {
        if conn.is_none() {
            match timeout_at(deadline, Conn::open(&o.addr)).await {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(_)) => {
                    t.errors += 1;
                    sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(_) => break,
            }
        }
        let c = conn.as_mut().expect("connected above");
        let req = &reqs[next];
        next = (next + 1) % keys;
        let start = Instant::now();
        match timeout_at(deadline, c.exchange(req)).await {
            Err(_) => break, // still waiting at the deadline: not counted
            Ok(Ok(head)) => {
                let us = start.elapsed().as_micros().min(u32::MAX as u128) as u32;
                t.by_status.entry(head.status).or_default().push(us);
                if head.close {
                    conn = None;
                    t.reconnects += 1;
                }
                if !(200..300).contains(&head.status) && !o.backoff.is_zero() {
                    sleep(o.backoff).await;
                }
            }
            Ok(Err(_)) => {
                t.errors += 1;
                conn = None;
            }
        }
    }
    t
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
    let deadline = start + Duration::from_secs_f64(o.duration);
    let tasks: Vec<_> = (0..o.conns)
        .map(|i| tokio::spawn(client(o.clone(), i * 7919, deadline)))
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.expect("client task does not panic");
        all.errors += t.errors;
        all.reconnects += t.reconnects;
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
    print_line(&mut out, &format!("CLASS refused codes={codes}"), &refused, secs);
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

async fn hold(o: Opts) {
    let mut held = Vec::with_capacity(o.conns);
    let mut failed = 0usize;
    let req = request(&o, 1);
    let mut remaining = o.conns;
    while remaining > 0 {
        let n = remaining.min(o.batch.max(1));
        remaining -= n;
        let batch: Vec<_> = (0..n)
            .map(|_| {
                let addr = o.addr.clone();
                let req = req.clone();
                tokio::spawn(async move {
                    // A proxy at its connection limit leaves us in its backlog: give up then.
                    let limit = Instant::now() + Duration::from_secs(5);
                    let mut c = timeout_at(limit, Conn::open(&addr)).await.map_err(|_| Fail::Io)??;
                    let head = timeout_at(limit, c.exchange(&req)).await.map_err(|_| Fail::Io)??;
                    if head.close {
                        return Err(Fail::Closed);
                    }
                    Ok::<_, Fail>(c)
                })
            })
            .collect();
        for task in batch {
            match task.await {
                Ok(Ok(c)) => held.push(c),
                _ => failed += 1,
            }
        }
    }
    println!("HELD {} failed={failed}", held.len());
    let _ = std::io::stdout().flush();
    // Hold until killed; a connection the server closes stays counted here but the harness
    // checks the server's own socket count.
    loop {
        sleep(Duration::from_secs(3600)).await;
    }
}
