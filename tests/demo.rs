//! `sluice demo` and the library's demo endpoints answer scores through the proxy;
//! `sluice demo-endpoints` serves the endpoints alone, on consecutive ports.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::process::{sluice_bin, start_binary, start_demo_endpoints, write_config};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_demo_answers_scores_through_the_proxy() {
    // The shipped config, on an ephemeral port so the test cannot collide with anything.
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sluice.toml"))
            .unwrap();
    let text = shipped.replacen("[::]:8080", "127.0.0.1:0", 1).replacen(
        "127.0.0.1:9090",
        "127.0.0.1:0",
        1,
    );
    assert_ne!(text, shipped, "the shipped config listens on [::]:8080");
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

/// The score an endpoint at `addr` answers to a 10-byte POST, checked field by field.
async fn score_from(addr: SocketAddr) -> serde_json::Value {
    let answer = once(addr, request("POST", addr, "/score", "0123456789")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let json = answer.json();
    let score = json["score"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&score), "{json}");
    assert_eq!(json["input_bytes"], 10, "{json}");
    json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_endpoints_answer_scores_until_sigterm() {
    let (mut endpoints, addrs) = start_demo_endpoints(&[
        "--listen",
        "127.0.0.1:0",
        "--count",
        "2",
        "--latency",
        "5ms",
    ])
    .await;
    assert_eq!(addrs.len(), 2, "{}", endpoints.output());
    assert_ne!(
        addrs[0], addrs[1],
        "port 0: each endpoint on its own free port"
    );
    for (i, addr) in addrs.iter().enumerate() {
        let json = score_from(*addr).await;
        assert_eq!(json["endpoint"], format!("demo-{}", i + 1), "{json}");
        assert_eq!(json["latency_ms"], 5, "{json}");
    }
    // A human-readable line lists the URLs too.
    let urls = format!("http://{}, http://{}", addrs[0], addrs[1]);
    assert!(
        endpoints
            .output()
            .lines()
            .any(|l| !l.starts_with('{') && l.contains(&urls)),
        "{}",
        endpoints.output()
    );
    endpoints.signal("TERM");
    assert_eq!(endpoints.wait_exit(DEADLINE).await.code(), Some(0));
    assert!(endpoints
        .json_lines()
        .iter()
        .any(|l| l["message"] == "demo endpoints stopped"));
    assert!(
        tokio::net::TcpStream::connect(addrs[0]).await.is_err(),
        "nothing listens after the exit"
    );
}

/// A port `p` of 127.0.0.1 with `p..p + n` all free a moment ago, below the kernel's
/// ephemeral range so that no `:0` listener or outgoing connection takes one meanwhile.
fn free_port_run(n: u16) -> u16 {
    use rand::Rng;
    for _ in 0..100 {
        let first = rand::thread_rng().gen_range(20_000..32_000);
        let listeners: Vec<_> = (first..first + n)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if listeners.len() == usize::from(n) {
            return first;
        }
    }
    panic!("no run of {n} free ports found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_endpoints_take_consecutive_ports_behind_a_sluice() {
    let first = free_port_run(3);
    let listen = format!("127.0.0.1:{first}");
    let (mut endpoints, addrs) =
        start_demo_endpoints(&["--listen", &listen, "--count", "3", "--latency", "1ms"]).await;
    let ports: Vec<u16> = addrs.iter().map(SocketAddr::port).collect();
    assert_eq!(ports, [first, first + 1, first + 2]);
    // As in deploy/docker-compose.yml: a sluice in front of them, configured with their URLs.
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let sluice = start_sluice(&config(&service(&urls, ""))).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let json = score_from(sluice.addr).await;
        seen.insert(json["endpoint"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 3, "random balance reaches all three: {seen:?}");
    sluice.stop().await;
    endpoints.signal("INT");
    assert_eq!(endpoints.wait_exit(DEADLINE).await.code(), Some(0));
}

#[test]
fn demo_endpoints_fail_clearly_on_a_taken_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = sluice_bin()
        .args(["demo-endpoints", "--listen", &addr, "--count", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot start a demo endpoint on {addr}")),
        "{stderr}"
    );
}
