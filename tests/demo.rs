//! `sluice demo` and the library's demo endpoints answer scores through the proxy.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::process::{start_binary, write_config};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_demo_answers_scores_through_the_proxy() {
    // The shipped config, on an ephemeral port so the test cannot collide with anything.
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sluice.toml"))
            .unwrap();
    let text = shipped.replacen("0.0.0.0:8080", "127.0.0.1:0", 1).replacen(
        "127.0.0.1:9090",
        "127.0.0.1:0",
        1,
    );
    assert_ne!(text, shipped, "the shipped config listens on 0.0.0.0:8080");
    let path = write_config("demo", &text);
    let mut sluice = start_binary(&[
        "demo",
        "--config",
        path.to_str().unwrap(),
        "--endpoints",
        "2",
        "--latency",
        "5ms",
    ])
    .await;

    let client = pool();
    for _ in 0..10 {
        let answer = send(&client, get(sluice.addr, "/score")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let json = answer.json();
        assert!(json["score"].is_number(), "{json}");
        let endpoint = json["endpoint"].as_str().unwrap();
        assert!(endpoint == "demo-1" || endpoint == "demo-2", "{json}");
    }
    assert!(sluice.output().contains("curl -i localhost:"));
    sluice.signal("TERM");
    assert_eq!(sluice.wait_exit(DEADLINE).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_demo_endpoints_serve_behind_an_in_process_sluice() {
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let demo = sluice::demo::start("lib-demo".into(), any_port, Duration::from_millis(1))
        .await
        .unwrap();
    let sluice = start_sluice(&config(&service(&[demo.url()], ""))).await;
    let answer = once(
        sluice.addr,
        request("POST", sluice.addr, "/score", "0123456789"),
    )
    .await;
    assert_eq!(answer.status, 200);
    let json = answer.json();
    assert_eq!(json["endpoint"], "lib-demo");
    assert_eq!(json["input_bytes"], 10);
    sluice.stop().await;
    demo.task.abort();
}
