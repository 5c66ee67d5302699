//! Graceful shutdown: stop accepting, let in-flight exchanges (HTTP/1.1 and HTTP/2) finish (within
//! `shutdown_grace`), then stop; the binary does this on SIGTERM/SIGINT and exits 0.

mod support;

use std::time::Duration;

use support::process::{start_binary, write_config};
use support::*;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_when_shutdown_begins_complete_with_200() {
    // One request waits for its answer, one is in the middle of a slow body.
    let backend = mock()
        .reply(|r| match r.uri.as_str() {
            "/slow-body" => Reply::Slow {
                chunks: 10,
                every: Duration::from_millis(30),
            },
            _ => Reply::ok("finished"),
        })
        .start()
        .await;
    let held = mock().gated().start().await;
    let toml = config(&format!(
        "[timeouts]\nshutdown_grace = \"20s\"\n\n\
         [[service]]\nname = \"held\"\npath_prefix = \"/held\"\nendpoints = [{:?}]\n\n\
         [[service]]\nname = \"scoring\"\npath_prefix = \"/\"\nendpoints = [{:?}]\n",
        held.url(),
        backend.url()
    ));
    let mut sluice = start_sluice(&toml).await;
    let addr = sluice.addr;

    // An idle keep-alive connection must not hold the drain up.
    let idle = pool();
    assert_eq!(send(&idle, get(addr, "/warm-up")).await.status, 200);

    let waiting = tokio::spawn(async move { once(addr, get(addr, "/held")).await });
    let mut h2 = connect_h2(addr).await;
    let waiting_h2 = tokio::spawn(async move {
        let response = h2.send_request(get(addr, "/held/h2")).await?;
        collect(response).await
    });
    held.wait_current(2).await;
    let mut streaming = connect_http1(addr).await;
    let slow = streaming
        .send_request(get(addr, "/slow-body"))
        .await
        .expect("headers of the slow body");
    assert_eq!(slow.status(), 200);

    let started = tokio::time::Instant::now();
    sluice.begin_shutdown();
    support::eventually("the listener closes", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;

    held.open_gate();
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "ok");
    let answer = waiting_h2
        .await
        .unwrap()
        .expect("the HTTP/2 stream completes");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "ok");
    let slow = collect(slow).await.expect("the slow body completes");
    assert_eq!(slow.body.len(), 10 * 1024);

    sluice.join().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain waited {:?} (idle connections must not hold it up)",
        started.elapsed()
    );
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    sigterm_drains(&[]).await;
}

/// `--workers 1` (what the benchmarks run): the same proxying, concurrency and drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_concurrent_requests_and_drains_on_sigterm() {
    sigterm_drains(&["--workers", "1"]).await;
}

/// Three requests held by the endpoint at once, SIGTERM: the listener closes, the three
/// complete with 200, exit 0.
async fn sigterm_drains(extra_args: &[&str]) {
    let backend = mock().gated().start().await;
    let path = write_config("sigterm", &config(&service(&[backend.url()], "")));
    let mut args = vec!["run", "--config", path.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    let mut sluice = start_binary(&args).await;
    let addr = sluice.addr;

    let in_flight: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { once(addr, get(addr, "/score")).await }))
        .collect();
    backend.wait_current(3).await;
    sluice.signal("TERM");
    // New connections are refused while the old one drains.
    support::eventually("the listener closes", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    backend.open_gate();

    for answer in in_flight {
        assert_eq!(answer.await.unwrap().status, 200);
    }
    let status = sluice.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", sluice.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_on_an_idle_proxy_exits_0() {
    let backend = mock().start().await;
    let path = write_config("sigint", &config(&service(&[backend.url()], "")));
    let mut sluice = start_binary(&["run", "--config", path.to_str().unwrap()]).await;
    assert_eq!(
        once(sluice.addr, get(sluice.addr, "/score")).await.status,
        200
    );
    sluice.signal("INT");
    let status = sluice.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", sluice.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_the_drain() {
    // The endpoint never answers; sluice gives up after the 300 ms grace and still exits 0.
    let backend = mock().reply(|_| Reply::Stall).start().await;
    let path = write_config(
        "grace",
        &config(&format!(
            "[timeouts]\nshutdown_grace = \"300ms\"\n\n{}",
            service(&[backend.url()], "")
        )),
    );
    let mut sluice = start_binary(&["run", "--config", path.to_str().unwrap()]).await;
    let addr = sluice.addr;
    let stuck = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Full<bytes::Bytes>,
        >(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
        tokio::spawn(conn);
        sender
            .send_request(get(addr, "/score"))
            .await
            .map(|r| r.status())
    });
    backend.wait_current(1).await;

    let started = tokio::time::Instant::now();
    sluice.signal("TERM");
    let status = sluice.wait_exit(DEADLINE).await;
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "output:\n{}", sluice.output());
    assert!(took >= Duration::from_millis(250), "exited after {took:?}");
    assert!(took < Duration::from_secs(5), "exited after {took:?}");
    assert!(
        stuck.await.unwrap().is_err(),
        "the stuck exchange was cut off, not answered"
    );
}
