//! Endpoints that come and go (issue 16), through the admin API: an endpoint added takes
//! traffic at once and counts in the service's capacity; an endpoint removed takes no new
//! request, finishes those it holds and closes its connections; each is an event; a refused
//! change changes nothing; a service with no endpoint queues requests for the first one to
//! join, and answers 503 `no_endpoints` past its queue; with `slow_start`, an endpoint that
//! joins takes slots from 1 up to its cap over that time. Over real sockets, as an operator
//! and the endpoints see it.

mod support;

use support::*;

const TOKEN: &str = "membership-t0ken";

async fn call(sluice: &Sluice, method: &str, path: &str, body: &str) -> Answer {
    let admin = sluice.admin.expect("admin enabled");
    once(admin, admin_request(method, admin, path, body, Some(TOKEN))).await
}

/// The service's endpoints as `/admin/policy` shows them.
async fn endpoints(sluice: &Sluice) -> serde_json::Value {
    call(sluice, "GET", "/admin/policy", "").await.json()["service"][0]["endpoints"].clone()
}

/// The kinds of the events in the history, oldest first.
async fn event_kinds(sluice: &Sluice) -> Vec<String> {
    let events = call(sluice, "GET", "/admin/autoscale/events", "")
        .await
        .json();
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_through_the_admin_api_takes_traffic_and_counts_in_capacity() {
    let (a, b) = (mock().start().await, mock().start().await);
    let toml = config(&service(&[a.url()], "max_concurrent = 4"));
    let sluice = start_sluice_with(&toml, Some(TOKEN), None).await;

    let body = format!(r#"{{"url": "{}", "max_concurrent": 7}}"#, b.url());
    let added = call(&sluice, "POST", "/admin/services/scoring/endpoints", &body).await;
    assert_eq!(added.status, 200, "{}", added.text());
    let events = added.json()["events"].clone();
    assert_eq!(events[0]["kind"], "manual", "{events}");
    assert_eq!(events[0]["key"], "endpoints", "{events}");
    assert_eq!(events[1]["kind"], "endpoint_added", "{events}");
    assert_eq!(events[1]["target"], "endpoint", "{events}");
    assert_eq!(events[1]["endpoint"], b.url(), "{events}");
    assert_eq!(
        (events[1]["from"].as_u64(), events[1]["to"].as_u64()),
        (Some(0), Some(7))
    );

    let capacity = call(&sluice, "GET", "/admin/capacity", "").await.json();
    assert_eq!(capacity["services"][0]["capacity"], 11, "{capacity}");
    let sources: Vec<_> = capacity["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["url"].clone(), e["source"].clone()))
        .collect();
    assert_eq!(
        sources,
        [
            (a.url().into(), "config".into()),
            (b.url().into(), "admin".into())
        ],
        "{capacity}"
    );
    assert_eq!(
        endpoints(&sluice).await,
        serde_json::json!([a.url(), {"url": b.url(), "max_concurrent": 7, "admin": true}])
    );

    // The next requests go to both (40 in a row all to one of two equal endpoints: 2^-39).
    let client = pool();
    for _ in 0..40 {
        assert_eq!(send(&client, get(sluice.addr, "/score")).await.status, 200);
    }
    assert!(
        b.requests() > 0 && a.requests() > 0,
        "a {} b {}",
        a.requests(),
        b.requests()
    );
    assert_eq!(a.requests() + b.requests(), 40);

    let admin = sluice.admin.unwrap();
    let metrics = once(admin, get(admin, "/metrics")).await.text();
    assert!(
        metrics.contains("sluice_autoscale_events_total{kind=\"endpoint_added\"} 1"),
        "{metrics}"
    );
    sluice.assert_idle().await;
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_removed_finishes_its_requests_takes_no_new_one_and_closes_its_connections() {
    let kept = mock().start().await;
    let leaving = mock().gated().start().await;
    let toml = config(&service(&[kept.url(), leaving.url()], "max_concurrent = 4"));
    let sluice = start_sluice_with(&toml, Some(TOKEN), None).await;

    // Requests until the leaving endpoint holds two of them (the gate keeps them there).
    let mut held = Vec::new();
    while leaving.current() < 2 {
        let addr = sluice.addr;
        held.push(tokio::spawn(async move {
            once(addr, get(addr, "/score")).await
        }));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert!(
            held.len() < 200,
            "the leaving endpoint never got two requests"
        );
    }
    let before = leaving.requests();

    let path = format!("/admin/services/scoring/endpoints?url={}", leaving.url());
    let removed = call(&sluice, "DELETE", &path, "").await;
    assert_eq!(removed.status, 200, "{}", removed.text());
    let events = removed.json()["events"].clone();
    assert_eq!(events[1]["kind"], "endpoint_removed", "{events}");
    assert_eq!(events[1]["endpoint"], leaving.url(), "{events}");
    assert_eq!(
        (events[1]["from"].as_u64(), events[1]["to"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(endpoints(&sluice).await, serde_json::json!([kept.url()]));

    // New requests all go to the endpoint that stays.
    let client = pool();
    for _ in 0..20 {
        assert_eq!(send(&client, get(sluice.addr, "/score")).await.status, 200);
    }
    assert_eq!(
        leaving.requests(),
        before,
        "a removed endpoint got a new request"
    );

    // What it held finishes as the endpoint answers it.
    leaving.open_gate();
    for request in held {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    // Then nothing of sluice's stays open at the endpoint that left (the one that stays
    // keeps its idle connections).
    eventually("the removed endpoint's connections closed", || {
        leaving.open_connections() == 0
    })
    .await;
    assert!(
        kept.open_connections() > 0,
        "the kept endpoint's idle connection closed"
    );
    sluice.assert_idle().await;
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_endpoint_change_says_why_and_changes_nothing() {
    let a = mock().start().await;
    let toml = config(&service(&[a.url()], "max_concurrent = 4"));
    let sluice = start_sluice_with(&toml, Some(TOKEN), None).await;
    let add = "/admin/services/scoring/endpoints";
    let cases = [
        (
            "POST",
            add.to_owned(),
            format!(r#"{{"url": "{}"}}"#, a.url()),
            409,
            "already in service",
        ),
        (
            "POST",
            add.to_owned(),
            r#"{"url": "ftp://127.0.0.1:1"}"#.to_owned(),
            400,
            "service[0].endpoints[1].url",
        ),
        (
            "POST",
            add.to_owned(),
            r#"{"url": "http://127.0.0.2:1", "max_concurrent": 0}"#.to_owned(),
            400,
            "service[0].endpoints[1].max_concurrent",
        ),
        (
            "POST",
            add.to_owned(),
            r#"{"url": "http://127.0.0.2:1", "cap": 3}"#.to_owned(),
            400,
            "unknown field",
        ),
        (
            "POST",
            "/admin/services/nope/endpoints".to_owned(),
            r#"{"url": "http://127.0.0.2:1"}"#.to_owned(),
            404,
            "no service named",
        ),
        (
            "DELETE",
            format!("{add}?url=http://127.0.0.9:1"),
            String::new(),
            404,
            "no endpoint",
        ),
        ("DELETE", add.to_owned(), String::new(), 400, "url"),
    ];
    for (method, path, body, status, says) in cases {
        let answer = call(&sluice, method, &path, &body).await;
        assert_eq!(
            answer.status,
            status,
            "{method} {path} {body}: {}",
            answer.text()
        );
        let detail = answer.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(detail.contains(says), "{method} {path} {body}: {detail}");
        assert_eq!(
            endpoints(&sluice).await,
            serde_json::json!([a.url()]),
            "{method} {path} {body}"
        );
    }
    assert!(
        !event_kinds(&sluice)
            .await
            .iter()
            .any(|k| k.starts_with("endpoint")),
        "a refused change left an event"
    );
    assert_eq!(send(&pool(), get(sluice.addr, "/score")).await.status, 200);
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_endpoints_queues_requests_until_the_first_one_joins() {
    let a = mock().start().await;
    let toml = config(&service(&[], "queue_size = 8\nqueue_timeout = \"30s\""));
    let sluice = start_sluice_with(&toml, Some(TOKEN), None).await;
    let admin = sluice.admin.unwrap();
    // Degraded, not unready: sluice answers for the backend (a load balancer in front must
    // keep sending it requests to queue, and a scale controller sees them waiting).
    let ready = once(admin, get(admin, "/readyz")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["status"], "degraded", "{}", ready.text());
    assert!(ready.text().contains("no endpoints"), "{}", ready.text());

    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let addr = sluice.addr;
            tokio::spawn(async move { once(addr, get(addr, "/score")).await })
        })
        .collect();
    eventually("three requests queued", || {
        sluice.proxy.policy().services[0].pool.queue_len() == 3
    })
    .await;
    // What a backend's autoscaler would scale on: requests waiting, and for how long.
    let metrics = once(admin, get(admin, "/metrics")).await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "sluice_queue_length{service=\"scoring\"} 3"),
        "{metrics}"
    );
    let age: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_queue_oldest_age_seconds{service=\"scoring\"} "))
        .unwrap_or_else(|| panic!("no queue age in {metrics}"))
        .parse()
        .unwrap();
    assert!(age > 0.0, "{age}");
    let body = format!(r#"{{"url": "{}"}}"#, a.url());
    let added = call(&sluice, "POST", "/admin/services/scoring/endpoints", &body).await;
    assert_eq!(added.status, 200, "{}", added.text());
    for request in waiting {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(a.requests(), 3);
    let ready = once(admin, get(admin, "/readyz")).await;
    assert_eq!(ready.json()["status"], "ready", "{}", ready.text());
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_endpoints_a_request_gets_503_no_endpoints_past_the_queue() {
    let a = mock().start().await;
    let queue_timeout = std::time::Duration::from_millis(300);
    let toml = config(&service(
        &[a.url()],
        "queue_size = 4\nqueue_timeout = \"300ms\"",
    ));
    let sluice = start_sluice_with(&toml, Some(TOKEN), None).await;

    // The last endpoint can be removed: the service then has none.
    let path = format!("/admin/services/scoring/endpoints?url={}", a.url());
    let removed = call(&sluice, "DELETE", &path, "").await;
    assert_eq!(removed.status, 200, "{}", removed.text());
    assert_eq!(endpoints(&sluice).await, serde_json::json!([]));

    let started = std::time::Instant::now();
    let answer = once(sluice.addr, get(sluice.addr, "/score")).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.json()["reason"], "no_endpoints", "{}", answer.text());
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(
        waited >= queue_timeout,
        "answered after {waited:?}, before the queue timeout"
    );
    assert_eq!(a.requests(), 0);

    // Without a queue, at once.
    let patched = call(
        &sluice,
        "PATCH",
        "/admin/services/scoring",
        r#"{"queue_size": 0}"#,
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    let answer = once(sluice.addr, get(sluice.addr, "/score")).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.json()["reason"], "no_endpoints");

    let admin = sluice.admin.unwrap();
    let metrics = once(admin, get(admin, "/metrics")).await.text();
    let counted = metrics
        .lines()
        .any(|l| l.contains("reason=\"no_endpoints\"") && l.ends_with(" 2"));
    assert!(counted, "{metrics}");
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_joins_ramps_from_one_slot_to_its_cap_over_slow_start() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let hold = Duration::from_millis(100);
    let (a, b) = (
        mock().hold(hold).start().await,
        mock().hold(hold).start().await,
    );
    let ramp = Duration::from_secs(2);
    let extra =
        "max_concurrent = 10\nqueue_size = 100\nqueue_timeout = \"30s\"\nslow_start = \"2s\"";
    let sluice = start_sluice_with(&config(&service(&[a.url()], extra)), Some(TOKEN), None).await;
    // 30 clients keep requests in flight throughout: more than both endpoints' caps.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..30)
        .map(|_| {
            let (addr, stop) = (sluice.addr, std::sync::Arc::clone(&stop));
            tokio::spawn(async move {
                let client = pool();
                let mut statuses = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    statuses.push(send(&client, get(addr, "/score")).await.status.as_u16());
                }
                statuses
            })
        })
        .collect();
    eventually("the first endpoint full", || a.current() == 10).await;

    // Taken before the change: the endpoint's ramp starts later, so at any moment it has been
    // ramping for at most as long as this clock says (+1 ms: sluice counts whole ms).
    let joined = Instant::now();
    let body = format!(r#"{{"url": "{}"}}"#, b.url());
    let added = call(&sluice, "POST", "/admin/services/scoring/endpoints", &body).await;
    assert_eq!(added.status, 200, "{}", added.text());
    let mut samples = Vec::new();
    let mut peak_after_ramp = 0;
    loop {
        let at = joined.elapsed();
        let in_flight = b.current();
        let ms = u64::try_from(at.as_millis()).unwrap() + 1;
        let bound = (10 * ms).div_ceil(2000).clamp(1, 10);
        samples.push((at, in_flight));
        assert!(
            in_flight as u64 <= bound,
            "{in_flight} in flight at the new endpoint {at:?} after it joined (ramp allows \
             {bound}); samples {samples:?}"
        );
        if at >= ramp {
            peak_after_ramp = peak_after_ramp.max(in_flight);
        }
        if at >= ramp + Duration::from_millis(500) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        peak_after_ramp >= 5,
        "the new endpoint never neared its cap after the ramp: {samples:?}"
    );
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        let statuses = client.await.unwrap();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }
    sluice.stop().await;
}
