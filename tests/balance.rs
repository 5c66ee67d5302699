//! Endpoint choice: `random` spreads requests evenly; `p2c` favours the less loaded endpoint.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_3000_sequential_requests_evenly() {
    let backends = [
        mock().start().await,
        mock().start().await,
        mock().start().await,
    ];
    let urls: Vec<String> = backends.iter().map(Mock::url).collect();
    let sluice = start_sluice(&config(&service(&urls, "balance = \"random\""))).await;

    let client = pool();
    for i in 0..3000 {
        let answer = send(&client, get(sluice.addr, &format!("/score?i={i}"))).await;
        assert_eq!(answer.status, 200);
    }
    let counts: Vec<usize> = backends.iter().map(Mock::requests).collect();
    assert_eq!(counts.iter().sum::<usize>(), 3000);
    // One third each; 28 %..39 % is more than 5 standard deviations either way.
    for (i, count) in counts.iter().enumerate() {
        assert!(
            (840..=1170).contains(count),
            "endpoint {i} got {count} of 3000 ({counts:?})"
        );
    }
    sluice.assert_idle().await;
}

/// Share of `requests` concurrent-client requests that `balance` sends to a fast endpoint
/// (1 ms) next to two slow ones (40 ms).
async fn share_of_fast_endpoint(balance: &str) -> f64 {
    let fast = mock().hold(Duration::from_millis(1)).start().await;
    let slow1 = mock().hold(Duration::from_millis(40)).start().await;
    let slow2 = mock().hold(Duration::from_millis(40)).start().await;
    let sluice = start_sluice(&config(&service(
        &urls(&[&fast, &slow1, &slow2]),
        &format!("balance = {balance:?}"),
    )))
    .await;

    let mut clients = Vec::new();
    for _ in 0..12 {
        let addr = sluice.addr;
        clients.push(tokio::spawn(async move {
            let client = pool();
            for _ in 0..30 {
                let answer = send(&client, get(addr, "/score")).await;
                assert_eq!(answer.status, 200, "{}", answer.text());
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    sluice.assert_idle().await;
    let total = fast.requests() + slow1.requests() + slow2.requests();
    assert_eq!(total, 360);
    fast.requests() as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_more_to_the_faster_endpoint() {
    // With p2c the fast endpoint, nearly always the less loaded, wins whenever it is one of
    // the two candidates: about 2/3 of requests. Random gives it about 1/3 whatever its speed;
    // measuring both shows the difference comes from the policy.
    let p2c = share_of_fast_endpoint("p2c").await;
    let random = share_of_fast_endpoint("random").await;
    assert!(
        p2c > 0.5,
        "p2c sent {:.0}% to the fast endpoint",
        p2c * 100.0
    );
    assert!(
        random < 0.45,
        "random sent {:.0}% to the fast endpoint",
        random * 100.0
    );
}
