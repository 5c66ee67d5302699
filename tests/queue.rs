//! The wait queue: requests that find every endpoint full wait (up to `queue_size` of them),
//! are served oldest first when a slot frees, get 429 `queue_timeout` after `queue_timeout`,
//! and a full queue refuses at once.

mod support;

use std::time::Duration;

use support::*;
use tokio::task::JoinHandle;

/// One gated endpoint of cap 1 with the given queue settings; returns the backend, sluice
/// and the request holding the only slot.
async fn one_slot_held(queue: &str) -> (Mock, Sluice, JoinHandle<Answer>) {
    let backend = mock().gated().start().await;
    let sluice = start_sluice(&config(&service(
        &[backend.url()],
        &format!("max_concurrent = 1\n{queue}"),
    )))
    .await;
    let addr = sluice.addr;
    let holder = tokio::spawn(async move { once(addr, get(addr, "/held")).await });
    backend.wait_current(1).await;
    (backend, sluice, holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_served_in_arrival_order_and_overflow_is_refused_at_once() {
    // A long queue_timeout here: this test is about order, and a busy machine must not turn
    // a slow enqueue into a timeout. The 200 ms timeout is tested below.
    let (backend, sluice, holder) = one_slot_held("queue_size = 10\nqueue_timeout = \"5s\"").await;
    let pool = sluice.pool(0);

    let mut waiting = Vec::new();
    for i in 1..=10 {
        let addr = sluice.addr;
        waiting.push(tokio::spawn(async move {
            once(addr, get(addr, &format!("/queued/{i}"))).await
        }));
        // Send the next only once this one is in the queue, so arrival order is known.
        support::eventually(&format!("{i} waiting"), || pool.queue_len() == i).await;
    }

    // The queue is full: the 11th is refused at once, not after waiting.
    let overflow = once(sluice.addr, get(sluice.addr, "/overflow")).await;
    assert_eq!(overflow.status, 429);
    assert_eq!(overflow.reason(), "endpoints_full");
    assert_eq!(overflow.header("retry-after"), Some("1"));
    assert_eq!(pool.queue_len(), 10, "the refusal did not wait for a place");
    assert_eq!(
        backend.requests(),
        1,
        "queued requests have not reached the endpoint"
    );

    backend.open_gate();
    assert_eq!(holder.await.unwrap().status, 200);
    for request in waiting {
        assert_eq!(request.await.unwrap().status, 200);
    }
    let mut expected = vec!["/held".to_owned()];
    expected.extend((1..=10).map(|i| format!("/queued/{i}")));
    assert_eq!(backend.arrivals(), expected, "served in arrival order");
    assert_eq!(backend.peak(), 1, "the cap held while the queue drained");
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_past_queue_timeout_get_429_queue_timeout() {
    let (backend, sluice, holder) =
        one_slot_held("queue_size = 10\nqueue_timeout = \"200ms\"").await;

    let mut waiting = Vec::new();
    for i in 0..10 {
        let addr = sluice.addr;
        waiting.push(tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let answer = once(addr, get(addr, &format!("/queued/{i}"))).await;
            (answer, started.elapsed())
        }));
    }
    for request in waiting {
        let (answer, waited) = request.await.unwrap();
        assert_eq!(answer.status, 429, "{}", answer.text());
        assert_eq!(
            answer.text(),
            r#"{"error":"too_many_requests","reason":"queue_timeout","service":"scoring","retry_after_ms":1000}"#
        );
        assert_eq!(answer.header("retry-after"), Some("1"));
        assert!(
            waited >= Duration::from_millis(190),
            "answered after {waited:?}, before the queue timeout"
        );
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    }
    assert_eq!(sluice.pool(0).queue_len(), 0);
    assert_eq!(
        backend.requests(),
        1,
        "timed-out requests never reach the endpoint"
    );

    backend.open_gate();
    assert_eq!(holder.await.unwrap().status, 200);
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_the_queue_frees_its_place() {
    let (backend, sluice, holder) = one_slot_held("queue_size = 2\nqueue_timeout = \"5s\"").await;
    let pool = sluice.pool(0);

    // One HTTP/1.1 client and one HTTP/2 stream wait, then go away.
    let addr = sluice.addr;
    let h1 = tokio::spawn(async move { once(addr, get(addr, "/gone-h1")).await });
    support::eventually("h1 client waiting", || pool.queue_len() == 1).await;
    let mut h2 = connect_h2(addr).await;
    let h2_request = tokio::spawn(async move { h2.send_request(get(addr, "/gone-h2")).await });
    support::eventually("h2 client waiting", || pool.queue_len() == 2).await;

    h1.abort();
    h2_request.abort();
    support::eventually("the queue empties as clients leave", || {
        pool.queue_len() == 0
    })
    .await;

    // Their places are free again, and the slot goes to a client that is still there.
    let addr = sluice.addr;
    let stays = tokio::spawn(async move { once(addr, get(addr, "/stays")).await });
    support::eventually("one waiting", || pool.queue_len() == 1).await;
    backend.open_gate();
    assert_eq!(holder.await.unwrap().status, 200);
    assert_eq!(stays.await.unwrap().status, 200);
    assert_eq!(backend.arrivals(), ["/held", "/stays"]);
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_waiters_never_grows_the_queue_past_queue_size() {
    // Invariant 6: 100 requests at a full endpoint with room for 10 waiters: 10 wait, 90 are
    // refused at once (endpoints_full; none can be queue_timeout within the 5 s timeout).
    let (backend, sluice, holder) = one_slot_held("queue_size = 10\nqueue_timeout = \"5s\"").await;
    let pool = sluice.pool(0);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..100 {
        let (addr, tx) = (sluice.addr, tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(once(addr, get(addr, &format!("/flood/{i}"))).await);
        });
    }
    drop(tx);
    let mut peak_queue = 0;
    for _ in 0..90 {
        let answer = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("90 refusals")
            .unwrap();
        peak_queue = peak_queue.max(pool.queue_len());
        assert_eq!(answer.status, 429);
        assert_eq!(answer.reason(), "endpoints_full");
    }
    assert_eq!(pool.queue_len(), 10);
    assert!(peak_queue <= 10, "queue grew to {peak_queue}");
    assert_eq!(backend.requests(), 1);

    backend.open_gate();
    assert_eq!(holder.await.unwrap().status, 200);
    let mut served = 0;
    while let Some(answer) = rx.recv().await {
        assert_eq!(answer.status, 200);
        served += 1;
    }
    assert_eq!(served, 10);
    assert_eq!(backend.peak(), 1);
    sluice.assert_idle().await;
}
