//! The fuzz harnesses, shared by the libFuzzer targets (`fuzz/fuzz_targets/*.rs`, nightly)
//! and by `tests/fuzz_corpus.rs` (stable: replays the committed corpora and runs seeded
//! random inputs). Each takes raw bytes and panics only when a property is broken.
//!
//! Only `sluice`'s public API and crates `sluice` itself depends on are used here, so that the
//! main crate's integration tests can include this file with `#[path]`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use sluice::autoscale::{
    evaluate, proposed, Aggregation, Bounds, ChangeType, Decision, Direction, EvalInput, Metric,
    Operator, Profile, Rule, Statistic, Target, CONCURRENCY_BOUNDS,
};
use sluice::config::{validate, Config, MissingKey, RateLimitConfig, ResourceConfig, UnknownKeys};
use sluice::limit::{Admission, RateLimiter};

/// Reads typed values off the front of the input; past its end everything is zero.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// Small values more often than large ones (limits live near 1..1000).
    pub fn count(&mut self) -> u32 {
        match self.u8() % 4 {
            0 => u32::from(self.u8()),
            1 => u32::from(self.u8()) * 10,
            2 => self.u32() % 100_000,
            _ => self.u32(),
        }
    }
    pub fn f64(&mut self) -> f64 {
        match self.u8() % 4 {
            0 => f64::from(self.u8()),
            1 => f64::from(self.u32()) / 1000.0,
            2 => f64::from_bits(self.u64()),
            _ => -f64::from(self.u8()),
        }
    }
    pub fn choose<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::from(self.u8()) % items.len()]
    }
    /// Up to `max` bytes, length first.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (usize::from(self.u8()) % (max + 1)).min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

// ---- config parsing and validation ----

/// Any text: `Config::parse` and `validate` never panic, and a config that validates builds a
/// policy (validation promises everything `Policy::from_config` relies on).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    match config.clone().validated() {
        Ok(config) => {
            if let Err(e) = sluice::policy::Policy::from_config(&config, None) {
                panic!("validated config does not build: {e}\n{text}");
            }
            let _ = config.summary();
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "Err without a problem");
            for e in &errors {
                assert!(!e.key.is_empty(), "a problem without a key: {e:?}");
            }
        }
    }
}

// ---- key extraction and RateLimit headers ----

/// Arbitrary rate-limit settings, resources (keys as raw bytes) and request headers: no panic;
/// every header sluice adds is visible ASCII and well-formed; a resource's remaining never
/// exceeds its burst.
pub fn keys(data: &[u8]) {
    let mut input = Input::new(data);
    let key_header = match input.u8() % 4 {
        0 => "authorization".to_owned(),
        1 => "x-api-key".to_owned(),
        _ => String::from_utf8_lossy(input.bytes(24)).into_owned(),
    };
    let settings = RateLimitConfig {
        key_header,
        default_tps: input.count(),
        max_tps: input.count(),
        unknown_keys: if input.bool() {
            UnknownKeys::Reject
        } else {
            UnknownKeys::Default
        },
        missing_key: if input.bool() {
            MissingKey::Reject
        } else {
            MissingKey::Anonymous
        },
        max_tracked_keys: input.count(),
        legacy_headers: input.bool(),
    };
    let mut resources = Vec::new();
    let mut keys: Vec<Vec<u8>> = Vec::new();
    for i in 0..input.u8() % 4 {
        let key = input.bytes(40).to_vec();
        let digest: String = sluice::config::key_digest(&key)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let as_text = String::from_utf8(key.clone()).ok().filter(|_| input.bool());
        resources.push(ResourceConfig {
            name: format!("r{i}"),
            key_sha256: if as_text.is_some() {
                None
            } else {
                Some(digest)
            },
            key: as_text,
            tps: input.bool().then(|| input.count()),
            burst: input.bool().then(|| input.count()),
            autoscale: false,
        });
        keys.push(key);
    }
    let mut text =
        String::from("[[service]]\nname = \"s\"\nendpoints = [\"http://127.0.0.1:1\"]\n");
    let mut config = Config::parse(&text).expect("a minimal config parses");
    config.services[0].rate_limit = Some(settings.clone());
    config.services[0].resources = resources.clone();
    if validate(&config).is_err() {
        return;
    }
    text.clear();
    let limiter = RateLimiter::from_config(&settings, &resources, None, None);
    let challenge = limiter.challenge();
    assert!(challenge.to_str().is_ok(), "challenge {challenge:?}");

    for _ in 0..8 {
        let mut headers = HeaderMap::new();
        let name = HeaderName::from_bytes(settings.key_header.as_bytes())
            .unwrap_or(http::header::AUTHORIZATION);
        let value: Vec<u8> = match input.u8() % 4 {
            0 if !keys.is_empty() => {
                let k = &keys[usize::from(input.u8()) % keys.len()];
                if name == http::header::AUTHORIZATION {
                    [&b"Bearer "[..], k].concat()
                } else {
                    k.clone()
                }
            }
            1 => Vec::new(),
            _ => input.bytes(64).to_vec(),
        };
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            headers.append(name.clone(), value);
        }
        if input.bool() {
            // A second value of the key header: the first one counts.
            if let Ok(value) = HeaderValue::from_bytes(input.bytes(16)) {
                headers.append(name, value);
            }
        }
        let _ = sluice::limit::KeySource::new(
            HeaderName::from_bytes(settings.key_header.as_bytes())
                .unwrap_or(http::header::AUTHORIZATION),
        )
        .extract(&headers);
        let status = match limiter.check(&headers, tokio::time::Instant::now()) {
            Admission::Admitted { status, .. } => status,
            Admission::Limited {
                status,
                retry_after_ms,
                ..
            } => {
                assert!(retry_after_ms > 0, "refused with nothing to wait for");
                status
            }
            Admission::Refused(_) => continue,
            Admission::Ask { .. } | Admission::Unavailable { .. } => {
                panic!("a limiter without a shared store asked for one")
            }
        };
        assert!(
            status.remaining <= status.quota.burst.get(),
            "remaining {} over burst {}",
            status.remaining,
            status.quota.burst
        );
        let mut response = HeaderMap::new();
        limiter.insert_headers(&mut response, &status);
        assert!(response.contains_key("ratelimit"));
        assert!(response.contains_key("ratelimit-policy"));
        for (name, value) in &response {
            let text = value
                .to_str()
                .unwrap_or_else(|_| panic!("{name}: {value:?} is not visible ASCII"));
            assert!(!text.is_empty(), "{name} is empty");
        }
        check_ratelimit(
            response["ratelimit"].to_str().unwrap(),
            response["ratelimit-policy"].to_str().unwrap(),
        );
    }
}

/// `"<name>";r=<u64>;t=<u64>`, where `<name>` is one of the policies in `RateLimit-Policy`.
fn check_ratelimit(value: &str, policy: &str) {
    let mut parts = value.split(';');
    let name = parts.next().unwrap_or_default();
    assert!(
        name.len() > 2 && name.starts_with('"') && name.ends_with('"'),
        "{value}: {name} is not a quoted policy name"
    );
    assert!(
        policy
            .split(',')
            .any(|item| item.trim().starts_with(&format!("{name};"))),
        "{value}: {name} is not in RateLimit-Policy {policy}"
    );
    for prefix in ["r=", "t="] {
        let part = parts
            .next()
            .unwrap_or_else(|| panic!("{value} lacks {prefix}"));
        let number = part
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{value}: {part} is not {prefix}"));
        number
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{value}: {number} is not a number"));
    }
    assert_eq!(parts.next(), None, "{value}");
}

// ---- autoscale rule evaluation ----

fn rule(input: &mut Input<'_>) -> Rule {
    Rule {
        metric: input.choose(&[
            Metric::Requests,
            Metric::AdmittedRequests,
            Metric::ThrottledRequests,
            Metric::UtilizationPercent,
            Metric::LatencyMs,
            Metric::InFlight,
            Metric::QueueLength,
            Metric::QueueOldestAgeMs,
            Metric::CapacityHeadroomTps,
        ]),
        statistic: input.choose(&[
            Statistic::Average,
            Statistic::Min,
            Statistic::Max,
            Statistic::Sum,
        ]),
        time_grain: Duration::from_secs(60),
        time_window: Duration::from_secs(300),
        time_aggregation: input.choose(&[
            Aggregation::Average,
            Aggregation::Minimum,
            Aggregation::Maximum,
            Aggregation::Total,
            Aggregation::Last,
            Aggregation::Count,
        ]),
        operator: input.choose(&[
            Operator::GreaterThan,
            Operator::GreaterThanOrEqual,
            Operator::LessThan,
            Operator::LessThanOrEqual,
            Operator::Equals,
            Operator::NotEquals,
        ]),
        threshold: input.f64(),
        direction: input.choose(&[Direction::Increase, Direction::Decrease]),
        change: input.choose(&[
            ChangeType::ChangeCount,
            ChangeType::PercentChangeCount,
            ChangeType::ExactCount,
        ]),
        value: input.count(),
        cooldown: Duration::from_millis(u64::from(input.count())),
        target: input.choose(&[Target::ResourceTps, Target::EndpointConcurrency]),
    }
}

/// Arbitrary profiles, rules, readings and times: `evaluate` and `proposed` never panic, a
/// change always lands within the bounds and differs from the current value, nothing else
/// leaves an out-of-bounds value alone, and `proposed` never moves against its direction.
pub fn autoscale(data: &[u8]) {
    let mut input = Input::new(data);
    let rules: Vec<Rule> = (0..input.u8() % 6).map(|_| rule(&mut input)).collect();
    let opt = |input: &mut Input<'_>| input.bool().then(|| input.count());
    let profile = Profile {
        name: "fuzz".into(),
        min: opt(&mut input),
        max: opt(&mut input),
        default: opt(&mut input),
        fixed_date: None,
        recurrence: None,
        rules,
    };
    let target = input.choose(&[Target::ResourceTps, Target::EndpointConcurrency]);
    let bounds = match target {
        Target::ResourceTps => {
            let base = input.count().max(1);
            let max_tps = input.count().max(1);
            Bounds::for_resource(&profile, base, max_tps)
        }
        Target::EndpointConcurrency => CONCURRENCY_BOUNDS,
    };
    assert!(bounds.lower <= bounds.upper, "{bounds:?}");
    let current = input.count();
    let start = Instant::now();
    let last_action = input
        .bool()
        .then(|| start + Duration::from_millis(u64::from(input.u32() % 10_000_000)));
    let now = start + Duration::from_millis(u64::from(input.u32() % 10_000_000));
    let eval = EvalInput {
        profile: &profile,
        target,
        current,
        bounds,
        default: if input.bool() {
            profile.default
        } else {
            opt(&mut input)
        },
        last_action,
        now,
    };
    let mut read = |_: &Rule| input.bool().then(|| input.f64());
    let decision = evaluate(&eval, &mut read);
    let value = match decision {
        Decision::Change { to, .. } => {
            assert_ne!(to, current, "a change to the same value: {decision:?}");
            to
        }
        Decision::Hold | Decision::CoolingDown { .. } => current,
    };
    assert!(
        bounds.lower <= value && value <= bounds.upper,
        "{decision:?} leaves {value} outside {bounds:?} (current {current})"
    );
    for r in &profile.rules {
        let p = proposed(r, current);
        match r.direction {
            Direction::Increase => assert!(p >= current, "{r:?}: {current} → {p}"),
            Direction::Decrease => assert!(p <= current, "{r:?}: {current} → {p}"),
        }
    }
}

// ---- admin JSON payloads ----

const ADMIN_TOKEN: &str = "fuzz-admin-token-3b9f";
const FUZZ_CONFIG: &str = r#"
[listen]
proxy = "127.0.0.1:0"
admin = ""

[[service]]
name = "scoring"
endpoints = ["http://127.0.0.1:1", { url = "http://127.0.0.1:2", max_concurrent = 5 }]
queue_size = 4
[service.rate_limit]
max_tps = 5000
[[service.resource]]
name = "team-a"
key = "secret-a"
tps = 10
[[service.resource]]
name = "team-b"
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
tps = 20
autoscale = true

[[service]]
name = "other"
path_prefix = "/other"
endpoints = ["http://127.0.0.1:3"]
"#;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// Up to four admin requests (split on NUL bytes): the first byte of each picks the route,
/// the rest is its body. Against a fresh in-process admin router each time: never a 5xx or
/// a panic, every answer that has a body is JSON without the token or a key, and the live
/// config always still validates.
pub fn admin(data: &[u8]) {
    runtime().block_on(admin_async(data));
}

async fn admin_async(data: &[u8]) {
    use tower::ServiceExt;

    let config = Config::parse(FUZZ_CONFIG).expect("the fuzz config parses");
    let config = config.validated().expect("the fuzz config is valid");
    let policy = sluice::policy::Policy::from_config(&config, None).expect("builds");
    let proxy = sluice::proxy::Proxy::new(policy, Duration::from_secs(1), None);
    let control = Arc::new(sluice::control::Control::new(
        Arc::clone(proxy.live()),
        config,
        None,
    ));
    let admin = sluice::admin::Admin::new(
        control,
        sluice::admin::Access::new(Some(ADMIN_TOKEN.to_owned())),
        Arc::new(AtomicBool::new(false)),
    );
    let router = admin.router();
    for part in data.split(|b| *b == 0).take(4) {
        let Some((&route, body)) = part.split_first() else {
            continue;
        };
        let (method, path) = match route % 8 {
            0 | 1 => ("PATCH", "/admin/services/scoring"),
            2 => ("PATCH", "/admin/services/nope"),
            3 | 4 => ("PUT", "/admin/services/scoring/resources/team-a"),
            5 => ("PUT", "/admin/services/scoring/resources/new-one"),
            6 => ("DELETE", "/admin/services/scoring/resources/team-b"),
            _ => ("PUT", "/admin/services/other/resources/x"),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if route & 0x80 == 0 {
            request = request.header("authorization", format!("Bearer {ADMIN_TOKEN}"));
        }
        let mut request = request
            .body(axum::body::Body::from(body.to_vec()))
            .expect("a valid request");
        let peer: SocketAddr = "127.0.0.1:4000".parse().expect("an address");
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let response = router
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        assert!(
            !status.is_server_error(),
            "{method} {path} {:?}: {status}",
            String::from_utf8_lossy(body)
        );
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("a body")
            .to_bytes();
        if !bytes.is_empty() && status != StatusCode::NO_CONTENT {
            let text = String::from_utf8_lossy(&bytes);
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {text}"));
            assert!(!text.contains(ADMIN_TOKEN), "token in {text}");
            assert!(!text.contains("secret-a"), "key in {text}");
        }
        let live = proxy.policy();
        if let Err(errors) = validate(&live.config) {
            panic!("{method} {path} left an invalid live config: {errors:?}");
        }
        for service in &live.services {
            let shape = service.pool.shape();
            for i in 0..shape.endpoints.len() {
                let cap = shape.cap(i);
                assert!((1..=200).contains(&cap), "cap {cap} outside 1..=200");
            }
            if let Some(rate) = &service.rate {
                for r in rate.all_resources() {
                    assert!(r.limit().tps >= NonZeroU32::MIN);
                }
            }
        }
    }
}
