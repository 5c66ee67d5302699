//! The admin API as an operator sees it: every route with and without a token, live changes
//! validated like the file and visible to the next request, hot reload (HTTP and SIGHUP),
//! readiness, and /metrics parsed as Prometheus text.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

const TOKEN: &str = "admin-t0ken-for-tests";

async fn call(sluice: &Sluice, method: &str, path: &str, body: &str) -> Answer {
    let admin = sluice.admin.expect("admin enabled");
    once(admin, admin_request(method, admin, path, body, Some(TOKEN))).await
}

fn keyed(addr: SocketAddr, key: &str) -> http::Request<Full<Bytes>> {
    let mut req = get(addr, "/score");
    req.headers_mut().insert("x-api-key", key.parse().unwrap());
    req
}

fn limited(url: &str, extra: &str) -> String {
    config(&format!(
        "{}\n[service.rate_limit]\ndefault_tps = 100\n\
         [[service.resource]]\nname = \"team-a\"\nkey = \"key-a\"\ntps = 5\n",
        service(&[url.to_owned()], extra)
    ))
}

/// `limited`, with keys that match no resource refused (401).
fn rejecting_unknown_keys(url: &str) -> String {
    limited(url, "").replace(
        "default_tps = 100",
        "default_tps = 100\nunknown_keys = \"reject\"",
    )
}

#[tokio::test]
async fn health_readiness_and_metrics_need_no_token() {
    let backend = mock().start().await;
    let sluice = start_sluice_with(&limited(&backend.url(), ""), Some(TOKEN), None).await;
    let admin = sluice.admin.unwrap();
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        let answer = once(admin, get(admin, path)).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    }
    assert_eq!(
        once(admin, get(admin, "/readyz")).await.json()["status"],
        "ready"
    );
    let unknown = once(admin, get(admin, "/nope")).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "not_found");
    sluice.stop().await;
}

#[tokio::test]
async fn every_admin_route_needs_the_token_when_one_is_set() {
    let backend = mock().start().await;
    let sluice = start_sluice_with(&limited(&backend.url(), ""), Some(TOKEN), None).await;
    let admin = sluice.admin.unwrap();
    let routes = [
        ("GET", "/admin/capacity", ""),
        ("GET", "/admin/policy", ""),
        ("GET", "/admin/autoscale/events", ""),
        ("POST", "/admin/reload", ""),
        ("PATCH", "/admin/services/scoring", r#"{"queue_size": 3}"#),
        (
            "PUT",
            "/admin/services/scoring/resources/team-a",
            r#"{"tps": 7}"#,
        ),
        ("DELETE", "/admin/services/scoring/resources/team-a", ""),
    ];
    for (method, path, body) in routes {
        for token in [
            None,
            Some("wrong"),
            Some("admin-t0ken-for-tests-but-longer"),
        ] {
            let answer = once(admin, admin_request(method, admin, path, body, token)).await;
            assert_eq!(answer.status, 401, "{method} {path} with {token:?}");
            assert_eq!(answer.json()["error"], "unauthorized");
        }
    }
    // Nothing was changed by the refused calls.
    let policy = call(&sluice, "GET", "/admin/policy", "").await.json();
    assert_eq!(policy["service"][0]["queue_size"], 0);
    assert_eq!(policy["service"][0]["resource"][0]["tps"], 5);
    assert_eq!(
        call(&sluice, "GET", "/admin/capacity", "").await.status,
        200
    );
    sluice.stop().await;
}

#[tokio::test]
async fn without_a_token_reads_work_from_loopback_and_changes_are_forbidden() {
    let backend = mock().start().await;
    let sluice = start_sluice(&limited(&backend.url(), "")).await;
    let admin = sluice.admin.unwrap();
    let read = once(admin, get(admin, "/admin/capacity")).await;
    assert_eq!(read.status, 200);
    let change = once(
        admin,
        admin_request(
            "PATCH",
            admin,
            "/admin/services/scoring",
            r#"{"queue_size": 3}"#,
            None,
        ),
    )
    .await;
    assert_eq!(change.status, 403);
    assert!(change.json()["detail"]
        .as_str()
        .unwrap()
        .contains("SLUICE_ADMIN_TOKEN"));
    let reload = once(
        admin,
        admin_request("POST", admin, "/admin/reload", "", None),
    )
    .await;
    assert_eq!(reload.status, 403);
    sluice.stop().await;
}

#[tokio::test]
async fn capacity_and_policy_show_the_live_state_without_key_material() {
    let backend = mock().hold(Duration::from_millis(20)).start().await;
    let sluice = start_sluice_with(
        &limited(&backend.url(), "max_concurrent = 7"),
        Some(TOKEN),
        None,
    )
    .await;
    let client = pool();
    for _ in 0..8 {
        send(&client, keyed(sluice.addr, "key-a")).await;
    }
    let capacity = call(&sluice, "GET", "/admin/capacity", "").await;
    let text = capacity.text();
    let service = &capacity.json()["services"][0];
    assert_eq!(service["name"], "scoring");
    assert_eq!(service["capacity"], 7);
    assert_eq!(service["in_flight"], 0);
    let endpoint = &service["endpoints"][0];
    assert_eq!(endpoint["max_concurrent"], 7);
    assert_eq!(endpoint["healthy"], true);
    let mean = endpoint["latency"]["mean_ms"].as_f64().unwrap();
    assert!((20.0..200.0).contains(&mean), "mean latency {mean}");
    let projected = endpoint["projected_tps"].as_f64().unwrap();
    assert!((7.0 * 1000.0 / mean - projected).abs() < 1.0, "{endpoint}");
    let team_a = service["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "team-a")
        .unwrap();
    assert_eq!(team_a["base_tps"], 5);
    assert_eq!(team_a["admitted_last_minute"], 5);
    assert_eq!(team_a["throttled_last_minute"], 3);
    assert_eq!(team_a["succeeded_last_minute"], 5);
    assert_eq!(service["requests_total"], 8);
    assert_eq!(service["throttled_total"], 3);

    let policy = call(&sluice, "GET", "/admin/policy", "").await;
    assert_eq!(policy.json()["service"][0]["max_concurrent"], 7);
    assert_eq!(policy.json()["service"][0]["resource"][0]["name"], "team-a");
    for answer in [text, policy.text()] {
        assert!(
            !answer.contains("key-a"),
            "key in an admin answer: {answer}"
        );
        assert!(
            !answer.contains("key_sha256"),
            "key digest in an admin answer"
        );
    }
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_changes_name_the_key_and_the_range_and_change_nothing() {
    let backend = mock().start().await;
    let sluice = start_sluice_with(&limited(&backend.url(), ""), Some(TOKEN), None).await;
    let cases = [
        (
            "PATCH",
            "/admin/services/scoring",
            r#"{"max_concurrent": 201}"#,
            400,
            "service[0].max_concurrent",
        ),
        (
            "PATCH",
            "/admin/services/scoring",
            r#"{"max_concurrent": 0, "queue_size": 4}"#,
            400,
            "1..=200",
        ),
        (
            "PATCH",
            "/admin/services/scoring",
            r#"{"max_concurent": 5}"#,
            400,
            "max_concurent",
        ),
        (
            "PATCH",
            "/admin/services/scoring",
            r#"{"queue_timeout": "soon"}"#,
            400,
            "queue_timeout",
        ),
        (
            "PATCH",
            "/admin/services/nope",
            r#"{"queue_size": 4}"#,
            404,
            "nope",
        ),
        (
            "PUT",
            "/admin/services/scoring/resources/team-a",
            r#"{"tps": 0}"#,
            400,
            "service[0].resource[0].tps",
        ),
        (
            "PUT",
            "/admin/services/scoring/resources/team-z",
            r#"{"tps": 5}"#,
            404,
            "key_sha256",
        ),
        (
            "PUT",
            "/admin/services/scoring/resources/team-z",
            r#"{"key_sha256": "xyz"}"#,
            400,
            "64 hex digits",
        ),
        (
            "DELETE",
            "/admin/services/scoring/resources/team-z",
            "",
            404,
            "team-z",
        ),
        (
            "PATCH",
            "/admin/services/scoring",
            "not json",
            400,
            "invalid JSON",
        ),
    ];
    for (method, path, body, status, detail) in cases {
        let answer = call(&sluice, method, path, body).await;
        assert_eq!(
            answer.status,
            status,
            "{method} {path} {body}: {}",
            answer.text()
        );
        let text = answer.json()["detail"].as_str().unwrap().to_owned();
        assert!(
            text.contains(detail),
            "{method} {path} {body}: {text:?} lacks {detail:?}"
        );
    }
    let policy = call(&sluice, "GET", "/admin/policy", "").await.json();
    assert_eq!(policy["service"][0]["max_concurrent"], 20);
    assert_eq!(policy["service"][0]["queue_size"], 0);
    assert_eq!(
        policy["service"][0]["resource"].as_array().unwrap().len(),
        1
    );
    assert_eq!(policy["service"][0]["resource"][0]["tps"], 5);
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_cap_applies_to_the_next_request_and_lets_in_flight_ones_finish() {
    let backend = mock().gated().start().await;
    let sluice = start_sluice_with(
        &config(&service(&[backend.url()], "max_concurrent = 5")),
        Some(TOKEN),
        None,
    )
    .await;
    let addr = sluice.addr;
    let held: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { once(addr, get(addr, "/score")).await }))
        .collect();
    backend.wait_current(5).await;
    let change = call(
        &sluice,
        "PATCH",
        "/admin/services/scoring",
        r#"{"max_concurrent": 2}"#,
    )
    .await;
    assert_eq!(change.status, 200, "{}", change.text());
    // Five in flight over the new cap of two: they finish, new ones wait for room under it.
    let refused = once(addr, get(addr, "/score")).await;
    assert_eq!(refused.reason(), "endpoints_full");
    backend.open_gate();
    for answer in held {
        assert_eq!(answer.await.unwrap().status, 200);
    }
    sluice.assert_idle().await;
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_are_created_changed_and_removed_live() {
    let backend = mock().start().await;
    let sluice =
        start_sluice_with(&rejecting_unknown_keys(&backend.url()), Some(TOKEN), None).await;
    let client = pool();
    // key-b is unknown, so refused.
    assert_eq!(send(&client, keyed(sluice.addr, "key-b")).await.status, 401);
    let digest = sluice::config::key_digest(b"key-b");
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let created = call(
        &sluice,
        "PUT",
        "/admin/services/scoring/resources/team-b",
        &format!(r#"{{"key_sha256": "{hex}", "tps": 3}}"#),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.text());
    let answer = send(&client, keyed(sluice.addr, "key-b")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("ratelimit-policy"), Some("\"tps\";q=3;w=1"));
    // team-a's bucket survived the change: 1 used of 5 before, 4 left.
    send(&client, keyed(sluice.addr, "key-a")).await;
    let changed = call(
        &sluice,
        "PUT",
        "/admin/services/scoring/resources/team-a",
        r#"{"tps": 8, "burst": 8}"#,
    )
    .await;
    assert_eq!(changed.status, 200);
    let answer = send(&client, keyed(sluice.addr, "key-a")).await;
    assert_eq!(answer.header("ratelimit-policy"), Some("\"tps\";q=8;w=1"));
    let removed = call(
        &sluice,
        "DELETE",
        "/admin/services/scoring/resources/team-b",
        "",
    )
    .await;
    assert_eq!(removed.status, 200);
    assert_eq!(send(&client, keyed(sluice.addr, "key-b")).await.status, 401);
    // Every change is in the history, as a manual event; filters work.
    let events = call(
        &sluice,
        "GET",
        "/admin/autoscale/events?service=scoring",
        "",
    )
    .await;
    let kinds: Vec<String> = events.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let resource = e["resource"].as_str().unwrap_or("");
            format!(
                "{}:{resource}:{}->{}",
                e["kind"].as_str().unwrap(),
                e["from"],
                e["to"]
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "manual:team-b:0->3",
            "manual:team-a:5->8",
            "manual:team-b:3->0"
        ]
    );
    let none = call(&sluice, "GET", "/admin/autoscale/events?service=other", "").await;
    assert_eq!(none.json()["events"].as_array().unwrap().len(), 0);
    let bad = call(
        &sluice,
        "GET",
        "/admin/autoscale/events?since=yesterday",
        "",
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(!events.text().contains(&hex), "no key digest in events");
    sluice.stop().await;
}

#[tokio::test]
async fn a_rotated_key_stops_working_at_once_and_the_new_one_keeps_the_bucket() {
    let backend = mock().start().await;
    let sluice =
        start_sluice_with(&rejecting_unknown_keys(&backend.url()), Some(TOKEN), None).await;
    let client = pool();
    // key-a is seen (and so known by its tag) before it is rotated: 3 of team-a's 5 used.
    for _ in 0..3 {
        assert_eq!(send(&client, keyed(sluice.addr, "key-a")).await.status, 200);
    }
    let hex: String = sluice::config::key_digest(b"key-a2")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let rotated = call(
        &sluice,
        "PUT",
        "/admin/services/scoring/resources/team-a",
        &format!(r#"{{"key_sha256": "{hex}"}}"#),
    )
    .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    for _ in 0..2 {
        let old = send(&client, keyed(sluice.addr, "key-a")).await;
        assert_eq!(old.status, 401, "the old key is nobody's now");
    }
    let new = send(&client, keyed(sluice.addr, "key-a2")).await;
    assert_eq!(new.status, 200);
    assert_eq!(new.header("ratelimit-policy"), Some("\"tps\";q=5;w=1"));
    // team-a's usage carried over to the new key: 1 left (2 if a refill came meanwhile).
    let left = new.header("ratelimit").expect("RateLimit header");
    assert!(
        left.starts_with("\"tps\";r=1;") || left.starts_with("\"tps\";r=2;"),
        "{left}"
    );
    sluice.stop().await;
}

/// Parse Prometheus text into `name{labels}` → value, checking every line's shape.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line == "# EOF",
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "duplicate {series}"
        );
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_match_the_requests_sent() {
    let backend = mock().reply(|r| {
        if r.uri.contains("fail") {
            Reply::status(500)
        } else {
            Reply::ok("ok")
        }
    });
    let backend = backend.start().await;
    let sluice = start_sluice_with(&limited(&backend.url(), ""), Some(TOKEN), None).await;
    let client = pool();
    for _ in 0..7 {
        send(&client, keyed(sluice.addr, "key-a")).await; // 5 pass, 2 throttled
    }
    let mut failing = get(sluice.addr, "/fail");
    failing
        .headers_mut()
        .insert("x-api-key", "someone-else".parse().unwrap());
    send(&client, failing).await; // 500 from the endpoint, unknown key
    send(&client, get(sluice.addr, "/score")).await; // 401 missing key
    let admin = sluice.admin.unwrap();
    let answer = once(admin, get(admin, "/metrics")).await;
    assert!(answer
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = answer.text();
    let m = parse_prometheus(&text);
    let url = backend.url();
    let get = |series: String| {
        *m.get(&series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    let requests = |endpoint: &str, class: &str, reason: &str| {
        get(format!(
            "sluice_requests_total{{service=\"scoring\",endpoint=\"{endpoint}\",class=\"{class}\",reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(requests(&url, "2xx", ""), 5.0);
    assert_eq!(requests(&url, "5xx", ""), 1.0);
    assert_eq!(requests("", "4xx", "rate_limited"), 2.0);
    assert_eq!(requests("", "4xx", "missing_key"), 1.0);
    assert_eq!(requests("", "4xx", "endpoints_full"), 0.0);
    let resource = |name: &str, outcome: &str| {
        get(format!(
            "sluice_resource_requests_total{{service=\"scoring\",resource=\"{name}\",outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(resource("team-a", "admitted"), 5.0);
    assert_eq!(resource("team-a", "throttled"), 2.0);
    assert_eq!(resource("team-a", "succeeded"), 5.0);
    assert_eq!(resource("unknown", "admitted"), 1.0);
    assert_eq!(resource("unknown", "succeeded"), 0.0);
    assert_eq!(
        get("sluice_resource_limit_tps{service=\"scoring\",resource=\"team-a\"}".into()),
        5.0
    );
    assert_eq!(
        get(format!(
            "sluice_endpoint_max_concurrent{{service=\"scoring\",endpoint=\"{url}\"}}"
        )),
        20.0
    );
    assert_eq!(
        get(format!(
            "sluice_endpoint_in_flight{{service=\"scoring\",endpoint=\"{url}\"}}"
        )),
        0.0
    );
    assert_eq!(
        get("sluice_request_duration_seconds_count{service=\"scoring\"}".into()),
        9.0
    );
    assert_eq!(
        get(format!(
            "sluice_upstream_duration_seconds_count{{service=\"scoring\",endpoint=\"{url}\"}}"
        )),
        6.0
    );
    assert_eq!(
        get("sluice_config_reloads_total{result=\"ok\"}".into()),
        0.0
    );
    assert!(
        !text.contains("someone-else") && !text.contains("key-a"),
        "keys in metrics"
    );
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_valid_file_and_refuses_an_invalid_one_without_failing_requests() {
    let backend = mock().start().await;
    let other = mock().start().await;
    let valid = limited(&backend.url(), "max_concurrent = 9");
    let path = process::write_config("reload", &valid);
    let sluice = start_sluice_with(&valid, Some(TOKEN), Some(path.clone())).await;
    // Load on a keep-alive client throughout; every answer must be the endpoint's. The client
    // waits for each answer and sends at most one request per `PACE`, half the default limit
    // (100 TPS, burst 100), so the limit never refuses it however fast or slow the machine
    // runs the reloads (at full speed, a run whose reloads took longer than the burst lasts
    // got 429s). Each round waits for answers under the new policy, so traffic overlaps
    // every reload whatever their speed.
    const PACE: Duration = Duration::from_millis(20);
    let addr = sluice.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
        tokio::spawn(async move {
            let client = pool();
            let mut statuses = BTreeMap::new();
            let mut pace = tokio::time::interval(PACE);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::SeqCst) {
                pace.tick().await;
                let answer = send(&client, keyed(addr, "someone")).await;
                *statuses.entry(answer.status.as_u16()).or_insert(0) += 1;
                answered.fetch_add(1, Ordering::SeqCst);
            }
            statuses
        })
    };
    for round in 0..5 {
        // Valid: a new cap and a second endpoint.
        let text = limited(&backend.url(), &format!("max_concurrent = {}", 10 + round)).replace(
            &format!("endpoints = [{:?}]", backend.url()),
            &format!("endpoints = [{:?}, {:?}]", backend.url(), other.url()),
        );
        std::fs::write(&path, &text).unwrap();
        let answer = call(&sluice, "POST", "/admin/reload", "").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json()["reloaded"], true);
        let policy = call(&sluice, "GET", "/admin/policy", "").await.json();
        assert_eq!(policy["service"][0]["max_concurrent"], 10 + round);
        assert_eq!(
            policy["service"][0]["endpoints"].as_array().unwrap().len(),
            2
        );
        let seen = answered.load(Ordering::SeqCst);
        eventually("answers under the reloaded policy", || {
            answered.load(Ordering::SeqCst) >= seen + 2
        })
        .await;
        // Invalid: two problems, both reported; nothing changes.
        let broken = text
            .replace(
                &format!("max_concurrent = {}", 10 + round),
                "max_concurrent = 500",
            )
            .replace("tps = 5", "tps = 0");
        std::fs::write(&path, broken).unwrap();
        let refused = call(&sluice, "POST", "/admin/reload", "").await;
        assert_eq!(refused.status, 400, "{}", refused.text());
        let detail = refused.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains("service[0].max_concurrent"), "{detail}");
        assert!(detail.contains("service[0].resource[0].tps"), "{detail}");
        let policy = call(&sluice, "GET", "/admin/policy", "").await.json();
        assert_eq!(policy["service"][0]["max_concurrent"], 10 + round);
    }
    stop.store(true, Ordering::SeqCst);
    let statuses = load.await.unwrap();
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [200],
        "{statuses:?}"
    );
    assert!(other.requests() > 0, "the reloaded endpoint took traffic");
    let admin = sluice.admin.unwrap();
    let metrics = parse_prometheus(&once(admin, get(admin, "/metrics")).await.text());
    assert_eq!(metrics["sluice_config_reloads_total{result=\"ok\"}"], 5.0);
    assert_eq!(
        metrics["sluice_config_reloads_total{result=\"failed\"}"],
        5.0
    );
    sluice.assert_idle().await;
    sluice.stop().await;
}

/// A reload's answer says which top-level settings the new file changed at once, and which
/// wait for a restart: those compared with what sluice started with, so a file that puts
/// them back needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_says_what_it_changed_and_what_waits_for_a_restart() {
    let backend = mock().start().await;
    let first = limited(&backend.url(), "max_concurrent = 9");
    let path = process::write_config("reload-changes", &first);
    let sluice = start_sluice_with(&first, Some(TOKEN), Some(path.clone())).await;
    let keys = |answer: &serde_json::Value, field: &str| -> Vec<String> {
        answer[field]
            .as_array()
            .unwrap_or_else(|| panic!("no {field} in {answer}"))
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    let cases = [
        ("the same file", first.clone(), vec![], vec![]),
        (
            "a cap and a [limits] bound",
            first
                .replace("max_concurrent = 9", "max_concurrent = 10")
                .replace(
                    "[[service]]",
                    "[limits]\nmax_connections = 5000\n\n[[service]]",
                ),
            vec!["limits", "service"],
            vec![],
        ),
        (
            "the response timeout and the connect timeout",
            first.replace(
                "[[service]]",
                "[timeouts]\nconnect = \"3s\"\nresponse = \"20s\"\n\n[[service]]",
            ),
            vec!["timeouts", "limits", "service"],
            vec!["timeouts.connect"],
        ),
        (
            "the connect timeout as sluice started",
            first.replace(
                "[[service]]",
                "[timeouts]\nresponse = \"20s\"\n\n[[service]]",
            ),
            vec![],
            vec![],
        ),
    ];
    for (what, text, changed, needs_restart) in cases {
        std::fs::write(&path, &text).unwrap();
        let answer = call(&sluice, "POST", "/admin/reload", "").await;
        assert_eq!(answer.status, 200, "{what}: {}", answer.text());
        let answer = answer.json();
        assert_eq!(keys(&answer, "changed"), changed, "{what}: {answer}");
        assert_eq!(
            keys(&answer, "needs_restart"),
            needs_restart,
            "{what}: {answer}"
        );
    }
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file() {
    let backend = mock().start().await;
    let path = process::write_config("sighup", &limited(&backend.url(), "max_concurrent = 4"));
    let mut running = process::start_binary(&["run", "--config", path.to_str().unwrap()]).await;
    let admin = running.admin.expect("admin address in the log");
    let cap = |answer: Answer| answer.json()["service"][0]["max_concurrent"].clone();
    assert_eq!(cap(once(admin, get(admin, "/admin/policy")).await), 4);
    std::fs::write(&path, limited(&backend.url(), "max_concurrent = 6")).unwrap();
    running.signal("HUP");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while cap(once(admin, get(admin, "/admin/policy")).await) != 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        once(running.addr, keyed(running.addr, "key-a"))
            .await
            .status,
        200
    );
    running.signal("TERM");
    assert!(running.wait_exit(DEADLINE).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_degraded_without_a_reachable_endpoint_and_503_while_draining() {
    let dead = DeadPort::new();
    let backend = mock().gated().start().await;
    let toml = config(&format!(
        "{}\n[[service]]\nname = \"down\"\npath_prefix = \"/down\"\nendpoints = [{:?}]\n",
        service(&[backend.url()], ""),
        dead.url()
    ));
    let mut sluice = start_sluice_with(&toml, Some(TOKEN), None).await;
    let admin = sluice.admin.unwrap();
    assert_eq!(once(admin, get(admin, "/readyz")).await.status, 200);
    // A refused connection puts the only endpoint of "down" in back-off.
    let answer = once(sluice.addr, get(sluice.addr, "/down")).await;
    assert_eq!(answer.reason(), "upstream_unreachable");
    // sluice still answers for it (503 upstream_unreachable, no_endpoints): degraded, not
    // unready, so a load balancer keeps sending it requests.
    let ready = once(admin, get(admin, "/readyz")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "degraded");
    let reason = ready.json()["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("\"down\" has no endpoint that can take traffic"),
        "{reason}"
    );
    // Shutting down with a request in flight: not ready, still alive.
    let addr = sluice.addr;
    let held = tokio::spawn(async move { once(addr, get(addr, "/score")).await });
    backend.wait_current(1).await;
    sluice.begin_shutdown();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let ready = once(admin, get(admin, "/readyz")).await;
        if ready.status == 503 && ready.json()["reason"] == "shutting down" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never said shutting down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(once(admin, get(admin, "/healthz")).await.status, 200);
    backend.open_gate();
    assert_eq!(held.await.unwrap().status, 200);
    sluice.join().await;
}
