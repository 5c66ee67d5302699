//! Per-resource TPS limits as a client and an endpoint see them: admitted rate, 429 bodies,
//! RateLimit headers, 401s for missing and unknown keys, and the bound on per-key state.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use support::*;

/// The key of resource "team-a" in the configs below.
const KEY_A: &str = "secret-a";

fn keyed(addr: std::net::SocketAddr, key: &str) -> http::Request<http_body_util::Full<Bytes>> {
    let mut req = get(addr, "/score");
    req.headers_mut().insert("x-api-key", key.parse().unwrap());
    req
}

fn limited_service(url: &str, rate_limit: &str, resources: &str) -> String {
    config(&format!(
        "{}\n[service.rate_limit]\n{rate_limit}\n{resources}",
        service(&[url.to_owned()], "")
    ))
}

const TEAM_A: &str =
    "[[service.resource]]\nname = \"team-a\"\nkey = \"secret-a\"\ntps = 10\nburst = 10\n";

/// Parse `"name";r=R;t=T` into (name, r, t).
fn ratelimit(headers: &HeaderMap) -> (String, u64, u64) {
    let value = headers["ratelimit"].to_str().unwrap();
    let mut parts = value.split(';');
    let name = parts.next().unwrap().trim_matches('"').to_owned();
    let mut field = |prefix: &str| {
        parts
            .next()
            .and_then(|p| p.strip_prefix(prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("RateLimit {value:?} lacks {prefix}"))
    };
    let r = field("r=");
    let t = field("t=");
    (name, r, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_tps_driven_at_fifty_for_five_seconds() {
    let backend = mock().start().await;
    let sluice = start_sluice(&limited_service(&backend.url(), "", TEAM_A)).await;
    let addr = sluice.addr;
    let client = pool();

    // 50 TPS at a fixed rate for 5 s, each request sent without waiting for the previous one.
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut sent = Vec::new();
    for _ in 0..250 {
        ticker.tick().await;
        let client = client.clone();
        sent.push(tokio::spawn(async move {
            send(&client, keyed(addr, KEY_A)).await
        }));
    }
    let mut admitted = 0;
    for answer in sent {
        let answer = answer.await.unwrap();
        assert_eq!(answer.header("ratelimit-policy"), Some("\"tps\";q=10;w=1"));
        let (name, remaining, reset) = ratelimit(&answer.headers);
        assert_eq!(name, "tps");
        match answer.status.as_u16() {
            200 => {
                admitted += 1;
                assert!(remaining < 10, "r={remaining} after an admission");
                assert!(reset <= 1, "t={reset}: the bucket refills within a second");
            }
            429 => {
                let body = answer.json();
                assert_eq!(body["reason"], "rate_limited");
                assert_eq!(body["resource"], "team-a");
                assert_eq!(body["limit_tps"], 10);
                let retry_ms = body["retry_after_ms"].as_u64().unwrap();
                assert!(
                    (1..=100).contains(&retry_ms),
                    "retry_after_ms {retry_ms} > one interval"
                );
                let retry_after: u64 = answer.header("retry-after").unwrap().parse().unwrap();
                assert!(retry_after >= 1);
                assert_eq!(remaining, 0);
                assert!(
                    retry_after >= reset,
                    "Retry-After {retry_after} earlier than t={reset}"
                );
            }
            other => panic!("unexpected status {other}: {}", answer.text()),
        }
    }
    // 10 per second for 5 s plus the initial burst of 10, within ±10%.
    assert!(
        (54..=66).contains(&admitted),
        "{admitted} admitted, expected 60 ± 10%"
    );
    assert_eq!(
        backend.requests(),
        admitted,
        "only admitted requests reach the endpoint"
    );
    sluice.assert_idle().await;
    sluice.stop().await;
}

#[tokio::test]
async fn missing_and_unknown_keys_get_401_when_rejected() {
    let backend = mock().start().await;
    let toml = limited_service(
        &backend.url(),
        "unknown_keys = \"reject\"\nmissing_key = \"reject\"",
        TEAM_A,
    );
    let sluice = start_sluice(&toml).await;
    let unknown = once(sluice.addr, keyed(sluice.addr, "not-a-key")).await;
    assert_eq!(unknown.status, 401);
    assert_eq!(unknown.reason(), "unknown_key");
    assert_eq!(
        unknown.header("www-authenticate"),
        Some("ApiKey header=\"x-api-key\"")
    );
    assert!(!unknown.text().contains("not-a-key"));
    let missing = once(sluice.addr, get(sluice.addr, "/score")).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.reason(), "missing_key");
    let known = once(sluice.addr, keyed(sluice.addr, KEY_A)).await;
    assert_eq!(known.status, 200);
    assert_eq!(
        backend.requests(),
        1,
        "refused requests never reach the endpoint"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn unknown_keys_get_their_own_default_bucket_and_anonymous_shares_one() {
    let backend = mock().start().await;
    let toml = limited_service(
        &backend.url(),
        "default_tps = 3\nmissing_key = \"anonymous\"",
        "",
    );
    let sluice = start_sluice(&toml).await;
    let client = pool();
    let mut passed = std::collections::BTreeMap::new();
    for key in ["k1", "k2", ""] {
        for _ in 0..5 {
            let req = if key.is_empty() {
                get(sluice.addr, "/score")
            } else {
                keyed(sluice.addr, key)
            };
            if send(&client, req).await.status == 200 {
                *passed.entry(key).or_insert(0) += 1;
            }
        }
    }
    // Each bucket lets its burst of 3 through; the two keys do not share one.
    assert_eq!(
        passed,
        [("", 3), ("k1", 3), ("k2", 3)].into_iter().collect()
    );
    sluice.stop().await;
}

#[tokio::test]
async fn bearer_keys_and_a_burst_larger_than_a_second() {
    let backend = mock().start().await;
    let toml = limited_service(
        &backend.url(),
        "key_header = \"authorization\"\nunknown_keys = \"reject\"\nlegacy_headers = true",
        "[[service.resource]]\nname = \"team-b\"\nkey_sha256 = \"8d5c0b4f0e4b8e8a6bf1b8fbc6cb5f3b0d2d3b0a6a4a3c1d8e5f6a7b8c9d0e1f\"\n\
         [[service.resource]]\nname = \"team-a\"\nkey = \"secret-a\"\ntps = 2\nburst = 5\n",
    );
    let sluice = start_sluice(&toml).await;
    let mut req = get(sluice.addr, "/score");
    req.headers_mut()
        .insert("authorization", "Bearer secret-a".parse().unwrap());
    let answer = once(sluice.addr, req).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("ratelimit-policy"),
        Some("\"tps\";q=2;w=1, \"burst\";q=5;w=3")
    );
    assert_eq!(ratelimit(&answer.headers).0, "burst");
    assert_eq!(ratelimit(&answer.headers).1, 4);
    assert_eq!(answer.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(answer.header("x-ratelimit-remaining"), Some("4"));
    // The key reaches the endpoint untouched: sluice limits, the endpoint authenticates.
    assert_eq!(
        backend.received()[0].header("authorization"),
        Some("Bearer secret-a")
    );
    let mut wrong = get(sluice.addr, "/score");
    wrong
        .headers_mut()
        .insert("authorization", "Basic c2VjcmV0LWE=".parse().unwrap());
    assert_eq!(once(sluice.addr, wrong).await.reason(), "missing_key");
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_for_rate_takes_no_slot() {
    let backend = mock().gated().start().await;
    let toml = limited_service(
        &backend.url(),
        "",
        "[[service.resource]]\nname = \"team-a\"\nkey = \"secret-a\"\ntps = 1\nburst = 1\n",
    );
    let toml = toml.replace(
        "path_prefix = \"/\"\n",
        "path_prefix = \"/\"\nmax_concurrent = 1\n",
    );
    let sluice = start_sluice(&toml).await;
    let addr = sluice.addr;
    let first = tokio::spawn(async move { once(addr, keyed(addr, KEY_A)).await });
    backend.wait_current(1).await;
    // The only slot is taken; the next request of the same caller is over its rate, and must
    // be told so (not "endpoints_full"), without touching the pool.
    let second = once(addr, keyed(addr, KEY_A)).await;
    assert_eq!(second.status, 429);
    assert_eq!(second.reason(), "rate_limited");
    assert_eq!(sluice.pool(0).in_flight(), 1);
    backend.open_gate();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(backend.requests(), 1);
    sluice.assert_idle().await;
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_full_answers_carry_the_callers_ratelimit_headers() {
    let backend = mock().gated().start().await;
    let toml = limited_service(&backend.url(), "", TEAM_A).replace(
        "path_prefix = \"/\"\n",
        "path_prefix = \"/\"\nmax_concurrent = 1\n",
    );
    let sluice = start_sluice(&toml).await;
    let addr = sluice.addr;
    let started = tokio::time::Instant::now();
    let first = tokio::spawn(async move { once(addr, keyed(addr, KEY_A)).await });
    backend.wait_current(1).await;
    let full = once(addr, keyed(addr, KEY_A)).await;
    // A cell per 100 ms is refilled between the two requests (on a busy machine they can be
    // more than 100 ms apart).
    let refilled = (started.elapsed().as_secs_f64() * 10.0).floor() as u64;
    assert_eq!(full.status, 429);
    assert_eq!(full.reason(), "endpoints_full");
    assert_eq!(full.header("ratelimit-policy"), Some("\"tps\";q=10;w=1"));
    // The 429 for capacity gave its cell back: one of the burst of 10 used, plus what was
    // refilled since (never above the burst).
    let remaining = ratelimit(&full.headers).1;
    assert!(
        (9..=(9 + refilled).min(10)).contains(&remaining),
        "one of the burst of 10 used: r={remaining}, {refilled} refilled since"
    );
    backend.open_gate();
    first.await.unwrap();
    sluice.stop().await;
}

/// Measured in a process of its own: the RSS check would otherwise count what the other tests
/// of this binary allocate meanwhile (24 MB over a 4 MB bound once, on a busy machine).
#[test]
fn a_flood_of_unknown_keys_stays_within_max_tracked_keys() {
    run_alone("unknown_key_flood_child");
}

/// The flood itself; run by the test above in a child process.
#[tokio::test]
#[ignore = "run in a child process by a_flood_of_unknown_keys_stays_within_max_tracked_keys"]
async fn unknown_key_flood_child() {
    let toml = limited_service("http://127.0.0.1:1", "max_tracked_keys = 5000", TEAM_A);
    let config = sluice::config::Config::parse(&toml).unwrap();
    let config = config.validated().unwrap();
    let policy = sluice::policy::Policy::from_config(&config, None).unwrap();
    let limits = policy.services[0].rate.as_ref().unwrap();
    let mut headers = HeaderMap::new();
    let mut flood = |range: std::ops::Range<u32>| {
        for i in range {
            headers.insert("x-api-key", format!("flood-{i}").parse().unwrap());
            let _ = limits.check(&headers, tokio::time::Instant::now());
        }
    };
    flood(0..20_000);
    let before = proc_status_kb("self", "VmRSS");
    flood(20_000..200_000);
    let after = proc_status_kb("self", "VmRSS");
    assert!(
        limits.tracked_keys() <= 5000,
        "{} keys tracked",
        limits.tracked_keys()
    );
    // 180k more keys than the table holds: memory must not follow them.
    assert!(
        after.saturating_sub(before) < 4 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // The known resource kept its own bucket through the flood.
    headers.insert("x-api-key", KEY_A.parse().unwrap());
    match limits.check(&headers, tokio::time::Instant::now()) {
        sluice::limit::Admission::Admitted {
            resource, status, ..
        } => {
            assert_eq!(&*resource.name, "team-a");
            assert_eq!(status.remaining, 9);
        }
        other => panic!("team-a refused after the flood: {other:?}"),
    }
}

#[tokio::test]
async fn keys_never_reach_the_logs() {
    let backend = mock().start().await;
    let toml = limited_service(&backend.url(), "unknown_keys = \"default\"", TEAM_A);
    let path = process::write_config("keys-in-logs", &toml);
    let running = process::start_binary(&["run", "--config", path.to_str().unwrap()]).await;
    let client = pool();
    for key in [KEY_A, "UNKNOWN-KEY-7f3a"] {
        for _ in 0..12 {
            send(&client, keyed(running.addr, key)).await;
        }
    }
    let mut bearer = get(running.addr, "/score");
    bearer
        .headers_mut()
        .insert("authorization", "Bearer BEARER-SECRET-99".parse().unwrap());
    send(&client, bearer).await;
    eventually("25 access lines", || {
        running.output().matches("sluice::access").count() >= 25
    })
    .await;
    let mut running = running;
    running.signal("TERM");
    assert!(running.wait_exit(Duration::from_secs(10)).await.success());
    let output = running.output();
    assert!(
        output.contains("team-a"),
        "access lines name the resource:\n{output}"
    );
    for secret in [KEY_A, "UNKNOWN-KEY-7f3a", "BEARER-SECRET-99"] {
        assert!(
            !output.contains(secret),
            "{secret} found in the logs:\n{output}"
        );
    }
}
