//! Concurrency caps: never more than `max_concurrent` at an endpoint, never more than
//! `cluster_max_concurrent` over a service, and an immediate, well-formed 429 past them.

mod support;

use std::time::Duration;

use support::*;
use tokio::sync::mpsc;

const ENDPOINTS_FULL_BODY: &str = r#"{"error":"too_many_requests","reason":"endpoints_full","service":"scoring","retry_after_ms":1000}"#;

/// Assert that `answer` is sluice's 429 for full endpoints, headers and body.
fn assert_endpoints_full(answer: &Answer) {
    assert_eq!(answer.status, 429, "body: {}", answer.text());
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.text(), ENDPOINTS_FULL_BODY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_endpoint_cap_20_serves_20_of_60_concurrent_clients_and_refuses_40() {
    // Each request is held 100 ms, and until the test has seen the 40 refusals: on a busy
    // machine the 60 clients may take longer than 100 ms to connect, and a slot freed early
    // would let a 21st request through legitimately.
    let backend = mock()
        .hold(Duration::from_millis(100))
        .gated()
        .start()
        .await;
    let sluice = start_sluice(&config(&service(&[backend.url()], "max_concurrent = 20"))).await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..60 {
        let tx = tx.clone();
        let addr = sluice.addr;
        tokio::spawn(async move {
            let answer = once(addr, get(addr, &format!("/score?client={i}"))).await;
            let _ = tx.send(answer);
        });
    }
    drop(tx);

    let mut refused = 0;
    while refused < 40 {
        let answer = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("40 refusals arrive while 20 requests are held")
            .expect("clients still running");
        assert_endpoints_full(&answer);
        refused += 1;
    }
    backend.wait_current(20).await;
    assert_eq!(sluice.endpoint_in_flight(0), vec![20]);
    assert_eq!(sluice.pool(0).in_flight(), 20);
    backend.open_gate();

    let mut served = 0;
    while let Some(answer) = rx.recv().await {
        assert_eq!(answer.status, 200, "body: {}", answer.text());
        served += 1;
    }
    assert_eq!(served, 20, "every one of the 60 clients gets an answer");
    assert_eq!(backend.peak(), 20, "the backend served exactly 20 at once");
    assert_eq!(
        backend.requests(),
        20,
        "refused requests never reach the backend"
    );
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_endpoints_cap_5_hold_15_in_flight_and_refuse_the_16th() {
    let backends = [
        mock().gated().start().await,
        mock().gated().start().await,
        mock().gated().start().await,
    ];
    let urls: Vec<String> = backends.iter().map(Mock::url).collect();
    let sluice = start_sluice(&config(&service(&urls, "max_concurrent = 5"))).await;

    let mut held = Vec::new();
    for _ in 0..15 {
        let addr = sluice.addr;
        held.push(tokio::spawn(async move {
            once(addr, get(addr, "/score")).await
        }));
    }
    // All 15 are admitted: a full endpoint is never chosen while another has room, so no
    // request is refused before every endpoint holds 5.
    for backend in &backends {
        backend.wait_current(5).await;
    }
    assert_eq!(sluice.endpoint_in_flight(0), vec![5, 5, 5]);
    assert_eq!(sluice.pool(0).in_flight(), 15);

    let sixteenth = once(sluice.addr, get(sluice.addr, "/score")).await;
    assert_endpoints_full(&sixteenth);

    for backend in &backends {
        backend.open_gate();
    }
    for request in held {
        assert_eq!(request.await.unwrap().status, 200);
    }
    for backend in &backends {
        assert_eq!(backend.peak(), 5);
        assert_eq!(backend.requests(), 5);
    }
    sluice.assert_idle().await;
}

/// With `balance`: every request is served by the endpoint with room, none refused.
async fn full_endpoint_never_chosen(balance: &str) {
    // `small` (cap 1) is kept full; `large` (cap 50) answers at once. Every one of 300
    // requests must be served by `large`: picking `small` would make sluice look elsewhere
    // or refuse, and neither is allowed while `large` has room.
    let small = mock().gated().reply(|_| Reply::ok("small")).start().await;
    let large = mock().start().await;
    let toml = config(&format!(
        "[[service]]\nname = \"scoring\"\nbalance = {balance:?}\n\
         endpoints = [{{ url = {:?}, max_concurrent = 1 }}, {{ url = {:?}, max_concurrent = 50 }}]\n",
        small.url(),
        large.url()
    ));
    let sluice = start_sluice(&toml).await;

    // Fill `small`: send until one request is held there.
    let addr = sluice.addr;
    let filler = tokio::spawn(async move {
        let client = pool();
        let mut answers = Vec::new();
        loop {
            let answer = send(&client, get(addr, "/fill")).await;
            if answer.text() == "small" || answers.len() > 1000 {
                return (answers, answer);
            }
            answers.push(answer.status);
        }
    });
    small.wait_current(1).await;
    assert_eq!(sluice.endpoint_in_flight(0)[0], 1);
    let large_before = large.requests();

    let client = pool();
    for i in 0..300 {
        let answer = send(&client, get(addr, &format!("/score?i={i}"))).await;
        assert_eq!(answer.status, 200, "request {i}: {}", answer.text());
    }
    assert_eq!(large.requests() - large_before, 300);
    assert_eq!(small.requests(), 1);
    assert_eq!(small.peak(), 1);

    small.open_gate();
    let (earlier, last) = filler.await.unwrap();
    assert!(earlier.iter().all(|s| *s == 200));
    assert_eq!(last.status, 200);
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_endpoint_is_never_chosen_while_another_has_room() {
    full_endpoint_never_chosen("random").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_never_chooses_a_full_endpoint_while_another_has_room() {
    full_endpoint_never_chosen("p2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_max_concurrent_bounds_the_sum_over_endpoints() {
    let a = mock().gated().start().await;
    let b = mock().gated().start().await;
    let sluice = start_sluice(&config(&service(
        &urls(&[&a, &b]),
        "max_concurrent = 5\ncluster_max_concurrent = 7",
    )))
    .await;

    let mut held = Vec::new();
    for _ in 0..7 {
        let addr = sluice.addr;
        held.push(tokio::spawn(async move {
            once(addr, get(addr, "/score")).await
        }));
    }
    support::eventually("7 requests at the backends", || {
        a.current() + b.current() == 7
    })
    .await;
    assert!(a.current() <= 5 && b.current() <= 5);
    assert_eq!(sluice.pool(0).in_flight(), 7);

    let eighth = once(sluice.addr, get(sluice.addr, "/score")).await;
    assert_endpoints_full(&eighth);

    a.open_gate();
    b.open_gate();
    for request in held {
        assert_eq!(request.await.unwrap().status, 200);
    }
    assert_eq!(a.requests() + b.requests(), 7);
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_hold_under_churn() {
    // 40 clients hammer 3 endpoints of cap 3 whose answers take 2 ms: each backend must never
    // see more than 3 at once, and every client gets a 200 or a 429.
    let backends = [
        mock().hold(Duration::from_millis(2)).start().await,
        mock().hold(Duration::from_millis(2)).start().await,
        mock().hold(Duration::from_millis(2)).start().await,
    ];
    let urls: Vec<String> = backends.iter().map(Mock::url).collect();
    let sluice = start_sluice(&config(&service(&urls, "max_concurrent = 3"))).await;

    let mut clients = Vec::new();
    for _ in 0..40 {
        let addr = sluice.addr;
        clients.push(tokio::spawn(async move {
            let client = pool();
            let (mut ok, mut refused) = (0, 0);
            for _ in 0..15 {
                let answer = send(&client, get(addr, "/score")).await;
                match answer.status.as_u16() {
                    200 => ok += 1,
                    429 => refused += 1,
                    other => panic!("unexpected {other}: {}", answer.text()),
                }
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for client in clients {
        let (o, r) = client.await.unwrap();
        ok += o;
        refused += r;
    }
    assert_eq!(ok + refused, 600);
    let arrived: usize = backends.iter().map(Mock::requests).sum();
    assert_eq!(arrived, ok, "only admitted requests reach a backend");
    for backend in &backends {
        assert!(backend.peak() <= 3, "peak {} > cap 3", backend.peak());
    }
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_held_until_the_response_body_has_been_sent() {
    // The endpoint answers at once but its body takes 4 x 250 ms: the endpoint is busy for
    // that long, so its slot stays taken until the client has the last byte.
    let backend = mock()
        .reply(|_| Reply::Slow {
            chunks: 4,
            every: Duration::from_millis(250),
        })
        .start()
        .await;
    let sluice = start_sluice(&config(&service(&[backend.url()], "max_concurrent = 1"))).await;
    let mut sender = connect_http1(sluice.addr).await;
    let response = sender
        .send_request(get(sluice.addr, "/score"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(sluice.endpoint_in_flight(0), vec![1]);
    let meanwhile = once(sluice.addr, get(sluice.addr, "/score")).await;
    assert_endpoints_full(&meanwhile);
    let answer = collect(response).await.unwrap();
    assert_eq!(answer.body.len(), 4 * 1024);
    sluice.assert_idle().await;
}

/// A request body that sends `first` and then never ends.
struct NeverEnding {
    first: Option<bytes::Bytes>,
}

impl http_body::Body for NeverEnding {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        match self.first.take() {
            Some(bytes) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes)))),
            None => std::task::Poll::Pending,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_costs_nothing_downstream_and_does_not_wait_for_its_body() {
    // Invariant 3: with the only slot taken, a request whose body never ends is refused at
    // once; nothing reaches the endpoint, not even a connection.
    let backend = mock().gated().start().await;
    let sluice = start_sluice(&config(&service(&[backend.url()], "max_concurrent = 1"))).await;
    let addr = sluice.addr;
    let holder = tokio::spawn(async move { once(addr, get(addr, "/held")).await });
    backend.wait_current(1).await;
    let connections = backend.connections();

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = builder("POST", addr, "/score")
        .body(NeverEnding {
            first: Some(bytes::Bytes::from(vec![b'x'; 64 * 1024])),
        })
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .expect("the 429 does not wait for the request body")
        .expect("an answer");
    assert_eq!(response.status(), 429);

    assert_eq!(backend.requests(), 1);
    assert_eq!(backend.connections(), connections);
    backend.open_gate();
    assert_eq!(holder.await.unwrap().status, 200);
    sluice.assert_idle().await;
}
