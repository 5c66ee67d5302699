//! Access log: one structured line per request (method, path, service, endpoint, status,
//! latency, reason), and never the value of an `Authorization` or API-key header (invariant 5).

mod support;

use serde_json::Value;
use support::process::{start_binary, write_config};
use support::*;

const SECRET: &str = "SECRET-XYZ";
const KEY: &str = "KEY-XYZ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_access_line_per_request_and_no_key_values() {
    let backend = mock().start().await;
    let dead = DeadPort::new();
    let path = write_config(
        "logging",
        &config(&format!(
            "[[service]]\nname = \"scoring\"\npath_prefix = \"/score\"\nendpoints = [{:?}]\n\n\
             [[service]]\nname = \"broken\"\npath_prefix = \"/broken\"\nendpoints = [{:?}]\n",
            backend.url(),
            dead.url()
        )),
    );
    let mut sluice = start_binary(&["run", "--config", path.to_str().unwrap()]).await;

    let requests = [
        ("GET", "/score/v1?model=a", 200),
        ("POST", "/score", 200),
        ("GET", "/nowhere", 404),
        ("GET", "/broken", 502),
    ];
    for (method, target, status) in requests {
        let mut req = request(method, sluice.addr, target, "{\"features\":[1,2,3]}");
        let headers = req.headers_mut();
        headers.insert("authorization", format!("Bearer {SECRET}").parse().unwrap());
        headers.insert("x-api-key", KEY.parse().unwrap());
        headers.insert(
            "proxy-authorization",
            format!("Basic {SECRET}").parse().unwrap(),
        );
        let answer = once(sluice.addr, req).await;
        assert_eq!(
            answer.status,
            status,
            "{method} {target}: {}",
            answer.text()
        );
    }
    // The endpoint did get the end-to-end credentials: only the logs must not.
    assert_eq!(
        backend.received()[0].header("authorization"),
        Some("Bearer SECRET-XYZ")
    );

    sluice.signal("TERM");
    let status = sluice.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0));

    let output = sluice.output();
    assert!(!output.contains(SECRET), "a secret was logged:\n{output}");
    assert!(!output.contains(KEY), "an API key was logged:\n{output}");
    assert!(
        !output.contains("features"),
        "a request body was logged:\n{output}"
    );

    let access: Vec<Value> = sluice
        .json_lines()
        .into_iter()
        .filter(|line| line["target"] == "sluice::access")
        .collect();
    assert_eq!(
        access.len(),
        requests.len(),
        "one access line per request:\n{output}"
    );
    for (line, (method, target, status)) in access.iter().zip(requests) {
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(line["path"], target.split('?').next().unwrap(), "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert!(line["latency_ms"].is_number(), "{line}");
    }
    assert_eq!(access[0]["service"], "scoring");
    assert_eq!(access[0]["endpoint"], backend.url());
    assert_eq!(access[2]["reason"], "no_route");
    assert_eq!(access[3]["service"], "broken");
    assert_eq!(access[3]["reason"], "upstream_unreachable");
}
