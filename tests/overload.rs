//! Endpoints that say they are full (issue 17), over real sockets: an endpoint that answers
//! 503 with `Retry-After` is cooled down for it and gets only a probe when the cooldown ends,
//! while its requests are retried on the others; when every endpoint says so, clients get
//! sluice's own 503 with a `Retry-After` for when the first takes traffic again, and the
//! retry budget keeps endpoint requests near client requests; a streaming upload is passed
//! through, never retried; an endpoint that keeps failing is ejected, never more than the
//! service's share at once.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::*;

/// Answers 503 with `Retry-After: {secs}` while `full` is set, else 200.
fn full_while(full: Arc<AtomicBool>, secs: &'static str) -> MockBuilder {
    mock().reply(move |_| match full.load(Ordering::SeqCst) {
        true => Reply::Full {
            status: 503,
            headers: vec![("retry-after", secs)],
            body: Bytes::from_static(b"queue full"),
        },
        false => Reply::ok("ok"),
    })
}

/// POST /score with a small JSON body.
fn score(addr: std::net::SocketAddr) -> http::Request<http_body_util::Full<Bytes>> {
    request(
        "POST",
        addr,
        "/score",
        Bytes::from_static(br#"{"features": [1, 2, 3]}"#),
    )
}

/// The requests `mock` received, by arrival time.
fn arrivals(mock: &Mock) -> Vec<Instant> {
    let mut starts: Vec<Instant> = mock.spans().iter().map(|s| s.start).collect();
    starts.sort();
    starts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_endpoint_is_cooled_down_for_its_retry_after_and_its_requests_served_elsewhere() {
    let full = Arc::new(AtomicBool::new(true));
    let sick = full_while(Arc::clone(&full), "2").start().await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(mock().start().await);
    }
    let mut urls = vec![sick.url()];
    urls.extend(others.iter().map(Mock::url));
    let sluice = start_sluice(&config(&service(&urls, ""))).await;

    // Four clients for 5 s: the sick endpoint's cooldowns of 2 s end twice or so.
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let addr = sluice.addr;
        clients.push(tokio::spawn(async move {
            let client = pool();
            let mut statuses = Vec::new();
            while started.elapsed() < Duration::from_secs(5) {
                statuses.push(send(&client, score(addr)).await.status.as_u16());
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.unwrap());
    }
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let sent = statuses.len();
    // Every request answered by a healthy endpoint: retried there when the sick one refused.
    assert!(
        ok as f64 >= 0.999 * sent as f64,
        "{ok} of {sent} succeeded: {:?}",
        statuses.iter().filter(|&&s| s != 200).collect::<Vec<_>>()
    );
    let served: usize = others.iter().map(Mock::requests).sum();
    let endpoint_requests = served + sick.requests();
    assert!(
        endpoint_requests as f64 <= 1.2 * sent as f64,
        "{endpoint_requests} endpoint requests for {sent} client requests"
    );
    // After its first answer it got only probes, one per cooldown: each at least its
    // Retry-After after the one before (less the timer's millisecond rounding). The requests
    // that reached it before sluice had its first answer came within moments of it; those
    // more than a second later are probes.
    let first_answer = sick.spans().iter().filter_map(|s| s.end).min().unwrap();
    let probes: Vec<Instant> = arrivals(&sick)
        .into_iter()
        .filter(|t| *t > first_answer + Duration::from_secs(1))
        .collect();
    for pair in probes.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(1990),
            "probes {gap:?} apart: {probes:?}"
        );
    }
    assert!(
        (1..=3).contains(&probes.len()),
        "{} probes in 5 s of 2 s cooldowns",
        probes.len()
    );
    assert!(sick.requests() <= 4 + probes.len(), "{}", sick.requests());
    let events = admin_events(&sluice).await;
    assert!(
        events.iter().any(|e| e["kind"] == "endpoint_cooled_down"
            && e["endpoint"] == sick.url()
            && e["reason"].as_str().unwrap().contains("answered 503")),
        "{events:?}"
    );

    // It recovers: the probe after its next cooldown is answered 200, and it serves again.
    full.store(false, Ordering::SeqCst);
    let before = sick.requests();
    let client = pool();
    let deadline = Instant::now() + DEADLINE;
    while sick.requests() < before + 5 {
        assert!(Instant::now() < deadline, "the endpoint never came back");
        assert_eq!(send(&client, score(sluice.addr)).await.status, 200);
    }
    sluice.stop().await;
}

async fn admin_events(sluice: &Sluice) -> Vec<serde_json::Value> {
    let admin = sluice.admin.unwrap();
    let answer = once(
        admin,
        admin_request("GET", admin, "/admin/autoscale/events", "", None),
    )
    .await;
    answer.json()["events"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_endpoint_is_full_clients_learn_when_to_come_back_and_retries_stay_in_budget() {
    let full = Arc::new(AtomicBool::new(true));
    let mut endpoints = Vec::new();
    for _ in 0..3 {
        endpoints.push(full_while(Arc::clone(&full), "3").start().await);
    }
    let urls: Vec<String> = endpoints.iter().map(Mock::url).collect();
    let sluice = start_sluice(&config(&service(&urls, ""))).await;
    let client = pool();
    let mut sent = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let answer = send(&client, score(sluice.addr)).await;
        sent += 1;
        assert_eq!(answer.status, 503, "{}", answer.text());
        let retry_after: u64 = answer
            .header("retry-after")
            .expect("a Retry-After")
            .parse()
            .unwrap();
        // The endpoints said 3 s: nobody is told to come back before they take traffic again
        // (whole seconds, rounded up).
        let cooled_at = endpoints
            .iter()
            .filter_map(|m| m.spans().iter().filter_map(|s| s.end).min())
            .min()
            .unwrap();
        let back = cooled_at + Duration::from_secs(3);
        let told = Instant::now() + Duration::from_secs(retry_after);
        assert!(
            told + Duration::from_millis(50) >= back,
            "Retry-After {retry_after} s, {:?} before the first endpoint takes traffic again",
            back - told
        );
    }
    // Each endpoint got the requests it answered before its cooldown began, and the retries
    // the budget allowed (at least 3 a second): never a retry storm.
    let endpoint_requests: usize = endpoints.iter().map(Mock::requests).sum();
    assert!(
        endpoint_requests <= 3 + 2 * 3,
        "{endpoint_requests} endpoint requests for {sent} client requests"
    );
    assert!(sent > 10, "{sent}");

    // What an operator sees: each endpoint cooled down and when it is back, the cooldowns and
    // the retries counted (the first request was tried on all three: two retries).
    let admin = sluice.admin.unwrap();
    let view = once(
        admin,
        admin_request("GET", admin, "/admin/capacity", "", None),
    )
    .await
    .json();
    for e in view["services"][0]["endpoints"].as_array().unwrap() {
        assert_eq!(e["state"], "cooled_down", "{e}");
        let back = e["back_in_ms"].as_u64().unwrap();
        assert!(back > 0 && back <= 3000, "{e}");
    }
    assert_eq!(view["services"][0]["capacity"], 0, "{view}");
    let metrics = once(admin, admin_request("GET", admin, "/metrics", "", None))
        .await
        .text();
    let value = |line: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .unwrap_or_else(|| panic!("no {line} in {metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    for m in &endpoints {
        let url = m.url();
        let line =
            format!("sluice_endpoint_cooldowns_total{{service=\"scoring\",endpoint=\"{url}\"}}");
        assert_eq!(value(&line), m.requests() as f64);
    }
    assert_eq!(
        value("sluice_retries_total{service=\"scoring\",result=\"made\"}"),
        2.0
    );
    let own = "sluice_requests_total{service=\"scoring\",endpoint=\"\",class=\"5xx\",\
               reason=\"endpoints_overloaded\"}";
    assert_eq!(value(own), (sent - 1) as f64);
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_upload_refused_as_full_is_passed_through_not_retried() {
    let full = Arc::new(AtomicBool::new(true));
    let sick = full_while(Arc::clone(&full), "2").start().await;
    let other = mock().start().await;
    let sluice = start_sluice(&config(&service(&[sick.url(), other.url()], ""))).await;
    // 5 MB: far over retry_buffer, so it is streamed and cannot be sent again. Until the
    // sick endpoint got one (each pick is one of two).
    let mut answers = Vec::new();
    while sick.requests() == 0 {
        assert!(answers.len() < 30, "the sick endpoint was never picked");
        let mut sender = connect_http1(sluice.addr).await;
        let req = builder("POST", sluice.addr, "/upload")
            .body(GeneratedBody::new(5 * 1024 * 1024))
            .unwrap();
        let response = sender.send_request(req).await.expect("sluice answers");
        answers.push(collect(response).await.expect("the answer arrives whole"));
    }
    // Its 503 reached the client as it was; what it refused never went to the other.
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert_eq!(refused.len(), 1, "{answers:?}");
    assert_eq!(refused[0].text(), "queue full");
    assert_eq!(refused[0].header("retry-after"), Some("2"));
    assert_eq!(other.requests(), answers.len() - 1);
    assert!(sick
        .received()
        .iter()
        .all(|r| r.body_len == 5 * 1024 * 1024));
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_keeps_failing_is_ejected_but_never_more_than_half_of_them() {
    let outlier = "[service.outlier]\nconsecutive_failures = 3\n";
    let broken = mock().reply(|_| Reply::status(500)).start().await;
    let fine = mock().start().await;
    let toml = config(&service(&[broken.url(), fine.url()], "")) + outlier;
    let sluice = start_sluice(&toml).await;
    let client = pool();
    let mut statuses = Vec::new();
    for _ in 0..60 {
        statuses.push(send(&client, get(sluice.addr, "/x")).await.status.as_u16());
    }
    // Three 500s in a row and it is out for 30 s (base_ejection): the rest go to the other.
    assert_eq!(broken.requests(), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), 3);
    let events = admin_events(&sluice).await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "endpoint_ejected" && e["endpoint"] == broken.url()),
        "{events:?}"
    );
    sluice.stop().await;

    // Both failing: one is ejected (half of two), the other keeps its traffic.
    let (a, b) = (
        mock().reply(|_| Reply::status(500)).start().await,
        mock().reply(|_| Reply::status(500)).start().await,
    );
    let toml = config(&service(&[a.url(), b.url()], "")) + outlier;
    let sluice = start_sluice(&toml).await;
    for _ in 0..60 {
        assert_eq!(send(&client, get(sluice.addr, "/x")).await.status, 500);
    }
    let ejected = admin_events(&sluice)
        .await
        .iter()
        .filter(|e| e["kind"] == "endpoint_ejected")
        .count();
    assert_eq!(ejected, 1);
    assert_eq!(a.requests() + b.requests(), 60);
    assert_eq!(
        a.requests().min(b.requests()),
        3,
        "{} {}",
        a.requests(),
        b.requests()
    );
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_behind_a_cooldown_gets_the_probe_when_it_ends() {
    // One endpoint, full once (Retry-After: 1), then fine; a queue of 30 s. The first
    // request is answered 503 endpoints_overloaded (no other endpoint); the next waits in the
    // queue, with nothing in flight to release a slot: the cooldown's end must serve it.
    let full = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&full);
    let endpoint = mock()
        .reply(move |_| match flag.swap(false, Ordering::SeqCst) {
            true => Reply::Full {
                status: 503,
                headers: vec![("retry-after", "1")],
                body: Bytes::from_static(b"queue full"),
            },
            false => Reply::ok("ok"),
        })
        .start()
        .await;
    let toml = config(&service(
        &[endpoint.url()],
        "queue_size = 4\nqueue_timeout = \"30s\"",
    ));
    let sluice = start_sluice(&toml).await;
    let first = once(sluice.addr, score(sluice.addr)).await;
    assert_eq!(first.status, 503, "{}", first.text());
    assert_eq!(first.reason(), "endpoints_overloaded");
    assert_eq!(first.header("retry-after"), Some("1"));
    let second = once(sluice.addr, score(sluice.addr)).await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(endpoint.requests(), 2);
    sluice.stop().await;
}
