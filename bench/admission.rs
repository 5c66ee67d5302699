//! Admission micro-benchmarks (issue 6, scenario 4): what sluice does for every request before
//! it forwards or refuses it, measured through the public API.
//!
//! `cargo bench --bench admission` (add `-- FILTER` to run some). Groups:
//! - `admit/N`: `RateLimiter::check(&HeaderMap, Instant)` + `Pool::acquire` +
//!   `RateLimiter::confirm` (the admission counted once a slot was taken) + dropping the slot
//!   (release), with N configured resources (1, 10k, 100k), keys rotating over all of them.
//! - `check_only/N`: the rate check and its count (`check` + `confirm`), same setup.
//! - `refuse`: the rate check of a caller over its limit (the 429 path's decision).
//! - `unknown_key/100k`: the check of 100k rotating unknown keys (the bounded LRU table).
//! - `key_lookup`: key extraction + SHA-256 (`KeySource::extract`, `key_digest`), and both plus a
//!   `HashMap<[u8; 32], _>` lookup of 100k entries like the limiter's (which is private), over
//!   one key's headers (hot) and over 100k keys' headers in turn (as `admit/100000` reads them).
//! - `reject_429`: `Rejection::new(..).resource(..).retry_after(..).into_response()`.
//! - `ratelimit_headers`: `RateLimiter::insert_headers` into a response's `HeaderMap`.
//! - `acquire_release`: `Pool::acquire` polled once (as `admit/N` drives it) and driven by
//!   `Runtime::block_on` once per request, to show what a runtime entry costs next to that.
//! - `baseline`: what the groups above spend outside sluice (feeding the next request's
//!   headers, over 1 or 100k keys), and `clock`, one `Instant::now()`: the proxy reads the clock
//!   once per request and hands that reading to the check, so the groups above pass a virtual
//!   clock instead; `dependent_load_lines/N`, one memory load that waits on the one before over
//!   N random cache lines: the machine's own floor under `admit/100000`, measured in the same
//!   run.
//!
//! The configured resources have `tps = 1_000_000_000` (above the validated ceiling of 1M, which
//! only `Config::parse` without validation allows): a tight loop checks one resource up to ~10M
//! times a second, and any validated limit would refuse most of them, so the `admit` group would
//! measure refusals. The GCRA arithmetic and atomics are the same at any rate.

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sluice::balance::{Pool, Slot};
use sluice::config::key_digest;
use sluice::config::Config;
use sluice::limit::{Admission, KeySource, RateLimiter};
use sluice::policy::Policy;
use sluice::proxy::reject::Rejection;
use sluice::reason::Reason;
use tokio::time::Instant;

const SIZES: [usize; 3] = [1, 10_000, 100_000];

fn key(i: usize) -> String {
    format!("bench-key-{i:08}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A one-service config with `n` resources keyed `key(0..n)` at `tps` each.
fn config_text(n: usize, tps: u64, max_tps: u64) -> String {
    let mut text = format!(
        r#"
[[service]]
name = "scoring"
path_prefix = "/"
max_concurrent = 200
queue_size = 0
endpoints = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]

[service.rate_limit]
key_header = "x-api-key"
default_tps = 10
max_tps = {max_tps}
unknown_keys = "default"
missing_key = "reject"
max_tracked_keys = 100000
"#
    );
    text.reserve(n * 150);
    for i in 0..n {
        let digest = hex(&key_digest(key(i).as_bytes()));
        text.push_str(&format!(
            "\n[[service.resource]]\nname = \"r{i}\"\nkey_sha256 = \"{digest}\"\ntps = {tps}\n"
        ));
    }
    text
}

struct Setup {
    /// Keeps the limiter and the pool alive.
    policy: Policy,
}

impl Setup {
    fn new(n: usize, tps: u64) -> Self {
        let config =
            Config::parse(&config_text(n, tps, tps.max(1000))).expect("bench config parses");
        let config = config.validated().expect("bench config is valid");
        let policy = Policy::from_config(&config, None).expect("bench config builds");
        Self { policy }
    }

    fn rate(&self) -> &RateLimiter {
        self.policy.services[0]
            .rate
            .as_ref()
            .expect("the bench service has rate limits")
    }

    fn pool(&self) -> &Arc<Pool> {
        &self.policy.services[0].pool
    }
}

/// The headers of requests from many keys in turn, as the proxy has them when it checks one:
/// a header map just parsed (hot in cache) holding the key. One map is reused and only its key
/// value changes (a static value: no allocation, no reference count); the key texts lie one
/// after the other in one allocation, as they would in read buffers. Holding a map per key
/// instead (100k maps, ~60 MB) made the benchmark measure its own cache misses.
///
/// Each request also brings its arrival time, as the proxy hands it to the check (it reads the
/// clock once per request, for its latency figures too): a virtual clock 1 µs further on per
/// request, so no benchmark here measures `clock_gettime` (the `clock` benchmark does), and a
/// resource at the highest rate a config allows (1 000 000 TPS) is never refused however
/// many requests a benchmark makes.
struct Requests {
    keys: Vec<HeaderValue>,
    headers: HeaderMap,
    next: usize,
    at: Instant,
}

/// Virtual time between two requests of a [`Requests`].
const STEP: Duration = Duration::from_micros(1);

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

impl Requests {
    /// Requests from `keys` in turn.
    fn new(keys: impl Iterator<Item = String>) -> Self {
        let keys: Vec<String> = keys.collect();
        let text: &'static str = Box::leak(keys.concat().into_boxed_str());
        let mut start = 0;
        let keys = keys
            .iter()
            .map(|k| {
                let value = HeaderValue::from_static(&text[start..start + k.len()]);
                start += k.len();
                value
            })
            .collect();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
        headers.insert("user-agent", HeaderValue::from_static("bench/1"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        Self {
            keys,
            headers,
            next: 0,
            at: Instant::now(),
        }
    }

    /// Requests from the keys of the first `n` resources (at least one) in turn.
    fn of_resources(n: usize) -> Self {
        Self::new((0..n.max(1)).map(key))
    }

    /// The next request's headers and arrival time.
    fn next(&mut self) -> (&HeaderMap, Instant) {
        let value = self.keys[self.next].clone();
        self.next = if self.next + 1 == self.keys.len() {
            0
        } else {
            self.next + 1
        };
        self.headers.insert(&X_API_KEY, value);
        self.at += STEP;
        (&self.headers, self.at)
    }

    /// The next request, checked by `limits`.
    fn check<'a>(&mut self, limits: &'a RateLimiter) -> Admission<'a> {
        let (headers, at) = self.next();
        limits.check(headers, at)
    }
}

/// `Pool::acquire` polled once: with free slots and an empty queue it is ready at the first
/// poll and needs no runtime (no timer, no waker).
fn acquire_now(pool: &Arc<Pool>) -> Slot {
    let mut cx = Context::from_waker(Waker::noop());
    let mut fut = std::pin::pin!(pool.acquire());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(slot)) => slot,
        Poll::Ready(Err(e)) => panic!("no slot in the bench pool: {e:?}"),
        Poll::Pending => panic!("acquire waited with free slots"),
    }
}

fn admission(c: &mut Criterion) {
    let mut admit = c.benchmark_group("admit");
    for n in SIZES {
        let s = Setup::new(n, 1_000_000);
        let (limits, pool) = (s.rate(), s.pool());
        let mut requests = Requests::of_resources(n);
        admit.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| match requests.check(limits) {
                Admission::Admitted {
                    resource, status, ..
                } => {
                    let slot = acquire_now(pool);
                    limits.confirm(resource, requests.at);
                    black_box(&status);
                    drop(black_box(slot));
                }
                other => panic!("refused in the admit bench: {other:?}"),
            })
        });
        assert_eq!(pool.in_flight(), 0, "every slot released");
    }
    admit.finish();

    let mut check = c.benchmark_group("check_only");
    for n in SIZES {
        let s = Setup::new(n, 1_000_000);
        let limits = s.rate();
        let mut requests = Requests::of_resources(n);
        check.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| match requests.check(limits) {
                Admission::Admitted { resource, .. } => {
                    limits.confirm(resource, requests.at);
                    black_box(true)
                }
                _ => black_box(false),
            })
        });
    }
    check.finish();

    // One resource at 1 TPS: after the first request every check is a refusal (but one a
    // second, as the bucket refills).
    let s = Setup::new(1, 1);
    let limits = s.rate();
    let mut requests = Requests::of_resources(1);
    let _ = requests.check(limits);
    c.bench_function("refuse", |b| {
        b.iter(|| match requests.check(limits) {
            Admission::Limited { retry_after_ms, .. } => black_box(retry_after_ms),
            _ => 0,
        })
    });

    // 100k distinct unknown keys against a table of 100k: every key stays tracked.
    let s = Setup::new(0, 1000);
    let limits = s.rate();
    let mut unknown = Requests::new((0..100_000).map(|i| format!("unknown-{i}")));
    c.bench_function("unknown_key/100000", |b| {
        b.iter(|| black_box(matches!(unknown.check(limits), Admission::Admitted { .. })))
    });
}

fn key_lookup(c: &mut Criterion) {
    let source = KeySource::new(HeaderName::from_static("x-api-key"));
    let mut g = c.benchmark_group("key_lookup");
    // 1: the same key every time; 100000: 100k keys in turn, as the admit/check_only groups.
    let map: HashMap<[u8; 32], usize> = (0..100_000)
        .map(|i| (key_digest(key(i).as_bytes()), i))
        .collect();
    for n in [1, 100_000] {
        let mut requests = Requests::of_resources(n);
        g.bench_function(BenchmarkId::new("extract+sha256", n), |b| {
            b.iter(|| {
                black_box(key_digest(
                    source.extract(requests.next().0).expect("key present"),
                ))
            })
        });
        g.bench_function(BenchmarkId::new("extract+sha256+map100k", n), |b| {
            b.iter(|| {
                let digest = key_digest(source.extract(requests.next().0).expect("key present"));
                black_box(map.get(&digest).copied())
            })
        });
    }
    g.finish();
}

fn responses(c: &mut Criterion) {
    c.bench_function("reject_429", |b| {
        b.iter(|| {
            Rejection::new(Reason::RateLimited, Some(black_box("scoring")))
                .resource(black_box("team-a"), black_box(100))
                .retry_after(black_box(370))
                .into_response()
        })
    });

    // The status of a real admission (built by the limiter, whatever fields `Status` has).
    let s = Setup::new(1, 1000);
    let limits = s.rate();
    let Admission::Admitted { status, .. } = Requests::of_resources(1).check(limits) else {
        panic!("the first request of a full bucket is admitted")
    };
    c.bench_function("ratelimit_headers", |b| {
        b.iter_batched_ref(
            || {
                let mut h = HeaderMap::with_capacity(8);
                h.insert("content-type", HeaderValue::from_static("application/json"));
                h.insert("content-length", HeaderValue::from_static("123"));
                h
            },
            |h| limits.insert_headers(h, black_box(&status)),
            criterion::BatchSize::SmallInput,
        )
    });
}

/// What the benchmarks above spend outside sluice's code: feeding the next request (the
/// header value swapped into the map), and the clock read the proxy does once per request.
fn baselines(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline");
    for n in [1, 100_000] {
        let mut requests = Requests::of_resources(n);
        g.bench_function(BenchmarkId::new("feed", n), |b| {
            b.iter(|| black_box(requests.next().1))
        });
    }
    g.bench_function("clock", |b| b.iter(Instant::now));
    // The memory floor under `admit/100000`: one load that waits for the one before it, over
    // 64-byte lines in random order, 16k lines (the size of the resource index at 100k
    // resources) and 100k lines (one line per resource, the least state 100k resources hold).
    for lines in [16_384, 100_000] {
        let mut chase = chase_cycle(lines);
        g.bench_function(BenchmarkId::new("dependent_load_lines", lines), |b| {
            b.iter(|| chase.step())
        });
    }
    g.finish();
}

/// One cycle through `lines` cache lines in a random order: each load's address comes from the
/// load before it, so none can start early and each costs the full latency of where it hits.
struct Chase {
    next: Vec<[usize; 8]>,
    at: usize,
}

impl Chase {
    fn step(&mut self) -> usize {
        self.at = self.next[self.at][0];
        self.at
    }
}

fn chase_cycle(lines: usize) -> Chase {
    let mut order: Vec<usize> = (0..lines).collect();
    // A fixed seed: the same cycle on every run.
    order.shuffle(&mut SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15));
    let mut next = vec![[0usize; 8]; lines];
    for (k, &line) in order.iter().enumerate() {
        next[line][0] = order[(k + 1) % lines];
    }
    Chase { next, at: order[0] }
}

fn runtime_overhead(c: &mut Criterion) {
    let s = Setup::new(1, 1000);
    let pool = s.pool();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime builds");
    let mut g = c.benchmark_group("acquire_release");
    g.bench_function("poll_once", |b| {
        b.iter(|| drop(black_box(acquire_now(pool))))
    });
    g.bench_function("block_on", |b| {
        b.iter(|| drop(black_box(rt.block_on(pool.acquire()).expect("free slot"))))
    });
    g.finish();
}

fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = quick();
    targets = admission, key_lookup, responses, baselines, runtime_overhead
}
criterion_main!(benches);
