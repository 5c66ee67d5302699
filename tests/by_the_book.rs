//! What RFC 9110/9112 and the RateLimit draft require of an intermediary, over real sockets:
//! `Host` checked and never forwarded when invalid, sluice's own HTTP version on relayed
//! answers, ambiguous response framing refused, unsupported transfer codings refused, request
//! trailers that keep the connection, dot-segments removed before routing, an abandoned
//! request logged and counted as 499, an origin's RateLimit fields kept, and a capacity 429
//! that costs its caller nothing. Each test failed before its fix.

mod support;

use std::net::SocketAddr;

use serde_json::Value;
use support::process::{start_binary, write_config};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The status line of each HTTP/1 answer in `text`, in order (a body may run straight into
/// the next answer, so they are found wherever they start).
fn status_lines(text: &str) -> Vec<String> {
    text.match_indices("HTTP/1.")
        .map(|(at, _)| text[at..].split("\r\n").next().unwrap_or("").to_owned())
        .collect()
}

/// The status code of the first answer in `text` (0 when there is none).
fn status_of(text: &str) -> u16 {
    text.split_once(' ')
        .and_then(|(_, rest)| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// The JSON body of a single answer sluice gave itself.
fn body_of(text: &str) -> Value {
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// An endpoint that answers every request with `answer` (raw bytes) and closes.
async fn raw_endpoint(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_repeated_or_invalid_host_gets_400_and_never_reaches_the_endpoint() {
    let backend = mock().start().await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;
    let exchange = |head: String| async move {
        raw_exchange(
            sluice.addr,
            format!("{head}connection: close\r\n\r\n").as_bytes(),
        )
        .await
    };

    let refused = [
        "GET /score HTTP/1.1\r\n".to_owned(),
        "GET /score HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\n".to_owned(),
        "GET /score HTTP/1.1\r\nhost: user@evil.example\r\n".to_owned(),
        "GET /score HTTP/1.1\r\nhost: a/b?c\r\n".to_owned(),
        "GET /score HTTP/1.1\r\nhost: a b\r\n".to_owned(),
        "GET /score HTTP/1.1\r\nhost: \r\n".to_owned(),
        "GET /score HTTP/1.1\r\nhost: api.example:8o\r\n".to_owned(),
        "GET /score HTTP/1.0\r\nhost: a.example\r\nhost: a.example\r\n".to_owned(),
    ];
    for head in refused {
        let answer = exchange(head.clone()).await;
        assert_eq!(status_of(&answer), 400, "{head:?}: {answer}");
        assert_eq!(
            body_of(&answer)["reason"],
            "invalid_host",
            "{head:?}: {answer}"
        );
    }
    assert_eq!(
        backend.requests(),
        0,
        "an invalid Host reached the endpoint"
    );

    // Valid: a name with a port, an IP literal, HTTP/1.0 without Host, and an absolute-form
    // target, whose authority replaces Host (RFC 9112 §3.2.2).
    let served = [
        (
            "GET /a HTTP/1.1\r\nhost: api.example:8080\r\n",
            "api.example:8080",
        ),
        ("GET /b HTTP/1.1\r\nhost: [::1]:80\r\n", "[::1]:80"),
        ("GET /c HTTP/1.0\r\n", ""),
        (
            "GET http://target.example:81/d HTTP/1.1\r\nhost: other.example\r\n",
            "target.example:81",
        ),
    ];
    for (head, _) in served {
        let answer = exchange(head.to_owned()).await;
        assert_eq!(status_of(&answer), 200, "{head:?}: {answer}");
    }
    let forwarded: Vec<(String, String)> = backend
        .received()
        .iter()
        .map(|r| {
            let host = r.header("x-forwarded-host").unwrap_or("").to_owned();
            (r.uri.clone(), host)
        })
        .collect();
    assert_eq!(
        forwarded,
        served
            .iter()
            .zip(["/a", "/b", "/c", "/d"])
            .map(|((_, host), uri)| (uri.to_owned(), (*host).to_owned()))
            .collect::<Vec<_>>()
    );
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_endpoints_answer_goes_out_in_http11_and_keeps_the_clients_connection() {
    let endpoint = raw_endpoint(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
    let sluice = start_sluice(&config(&service(&[format!("http://{endpoint}")], ""))).await;

    // Two requests pipelined on one keep-alive connection: both answered, in HTTP/1.1.
    let answer = raw_exchange(
        sluice.addr,
        b"GET /one HTTP/1.1\r\nhost: a.example\r\n\r\n\
          GET /two HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_lines(&answer),
        ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"],
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("via: 1.0 sluice"),
        "{answer}"
    );
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answer_with_ambiguous_framing_is_a_502() {
    let both = raw_endpoint(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let gzip = raw_endpoint(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let chunked = raw_endpoint(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    for (endpoint, status) in [(both, 502), (gzip, 502), (chunked, 200)] {
        let sluice = start_sluice(&config(&service(&[format!("http://{endpoint}")], ""))).await;
        // HTTP/1.1 and HTTP/2 clients alike.
        let answer = once(sluice.addr, get(sluice.addr, "/score")).await;
        assert_eq!(answer.status, status, "{}", answer.text());
        let mut h2 = connect_h2(sluice.addr).await;
        let response = h2.send_request(get(sluice.addr, "/score")).await.unwrap();
        let answer = collect(response)
            .await
            .expect("HTTP/2 answer arrives whole");
        assert_eq!(answer.status, status, "{}", answer.text());
        if status == 502 {
            assert_eq!(answer.reason(), "upstream_error");
        } else {
            assert_eq!(answer.text(), "hello");
        }
        sluice.assert_idle().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_with_a_transfer_coding_other_than_chunked_gets_501_and_never_reaches_the_endpoint(
) {
    let backend = mock().start().await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;
    let body = "5\r\nhello\r\n0\r\n\r\n";
    for codings in [
        "transfer-encoding: gzip, chunked\r\n",
        "transfer-encoding: chunked, chunked\r\n",
        "transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n",
    ] {
        let request = format!(
            "POST /score HTTP/1.1\r\nhost: a.example\r\n{codings}connection: close\r\n\r\n{body}"
        );
        let answer = raw_exchange(sluice.addr, request.as_bytes()).await;
        assert_eq!(status_of(&answer), 501, "{codings:?}: {answer}");
        assert_eq!(body_of(&answer)["reason"], "unsupported_transfer_coding");
    }
    assert_eq!(
        backend.requests(),
        0,
        "a gzip-coded upload reached the endpoint"
    );
    let plain = format!(
        "POST /score HTTP/1.1\r\nhost: a.example\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n{body}"
    );
    assert_eq!(
        status_of(&raw_exchange(sluice.addr, plain.as_bytes()).await),
        200
    );
    assert_eq!(backend.received()[0].body.as_deref(), Some(&b"hello"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_with_trailers_keeps_the_connection_for_the_next_request() {
    let backend = mock().start().await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;
    let answer = raw_exchange(
        sluice.addr,
        b"POST /upload HTTP/1.1\r\nhost: a.example\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\nx-checksum: 5\r\n\r\n\
          GET /next HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_lines(&answer),
        ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"],
        "{answer}"
    );
    let first = answer.split("HTTP/1.1 200 OK").nth(1).unwrap_or("");
    assert!(
        !first.to_ascii_lowercase().contains("connection: close"),
        "the answer to the upload closes the connection: {answer}"
    );
    assert_eq!(backend.arrivals(), ["/upload", "/next"]);
    assert_eq!(backend.received()[0].body.as_deref(), Some(&b"hello"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_removed_before_the_request_is_routed_and_forwarded() {
    let raw = mock().start().await;
    let scoring = mock().start().await;
    let sluice = start_sluice(&config(&format!(
        "[[service]]\nname = \"raw\"\npath_prefix = \"/raw\"\nendpoints = [{:?}]\n\n\
         [[service]]\nname = \"scoring\"\npath_prefix = \"/score\"\nendpoints = [{:?}]\n",
        raw.url(),
        scoring.url()
    )))
    .await;
    for target in [
        "/raw/../score?x=1",
        "/raw/%2e%2E/score?x=1",
        "/raw/./.././score?x=1",
    ] {
        let request =
            format!("GET {target} HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n");
        let answer = raw_exchange(sluice.addr, request.as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{target}: {answer}");
    }
    assert_eq!(raw.requests(), 0, "a dot-segment dodged its route");
    assert_eq!(scoring.arrivals(), ["/score?x=1"; 3]);
    // Out of the root: nothing left to route by but `/`, which no service has.
    let answer = raw_exchange(
        sluice.addr,
        b"GET /score/../../x HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 404, "{answer}");
}

/// Lines of a Prometheus scrape that count sluice's own answers for `reason`, summed.
fn own_answers(metrics: &str, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label) && l.contains("requests"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(admin: SocketAddr) -> String {
    once(admin, get(admin, "/metrics")).await.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_is_logged_and_counted_as_499() {
    let backend = mock().gated().start().await;
    let path = write_config("client_gone", &config(&service(&[backend.url()], "")));
    let mut sluice = start_binary(&["run", "--config", path.to_str().unwrap()]).await;
    let admin = sluice.admin.expect("the admin API listens");
    assert_eq!(own_answers(&scrape(admin).await, "client_gone"), 0.0);

    let mut client = TcpStream::connect(sluice.addr).await.unwrap();
    client
        .write_all(b"GET /abandoned HTTP/1.1\r\nhost: a.example\r\n\r\n")
        .await
        .unwrap();
    backend.wait_current(1).await;
    drop(client);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while own_answers(&scrape(admin).await, "client_gone") < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            scrape(admin).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    backend.open_gate();

    sluice.signal("TERM");
    assert_eq!(sluice.wait_exit(DEADLINE).await.code(), Some(0));
    let lines = sluice.json_lines();
    let access: Vec<&Value> = lines.iter().filter(|l| l["path"] == "/abandoned").collect();
    assert_eq!(access.len(), 1, "{}", sluice.output());
    assert_eq!(access[0]["status"], 499);
    assert_eq!(access[0]["reason"], "client_gone");
    assert_eq!(access[0]["service"], "scoring");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_own_ratelimit_fields_are_kept_and_sluices_appended() {
    let backend = mock()
        .reply(|_| Reply::Full {
            status: 200,
            headers: vec![
                ("ratelimit-policy", "\"origin\";q=100;w=60"),
                ("ratelimit", "\"origin\";r=0;t=120"),
            ],
            body: bytes::Bytes::from_static(b"ok"),
        })
        .start()
        .await;
    let sluice = start_sluice(&config(&format!(
        "{}\n[service.rate_limit]\ndefault_tps = 999\nmissing_key = \"anonymous\"\n",
        service(&[backend.url()], "")
    )))
    .await;
    let answer = once(sluice.addr, get(sluice.addr, "/score")).await;
    assert_eq!(answer.status, 200);
    let all = |name: &str| {
        answer
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    assert_eq!(
        all("ratelimit-policy"),
        "\"origin\";q=100;w=60, \"tps\";q=999;w=1"
    );
    assert_eq!(all("ratelimit"), "\"origin\";r=0;t=120, \"tps\";r=998;t=1");
}

/// `r` of a `RateLimit` value such as `"burst";r=19;t=1`.
fn remaining(answer: &Answer) -> u64 {
    let value = answer.header("ratelimit").expect("a RateLimit field");
    value
        .split(';')
        .find_map(|p| p.strip_prefix("r="))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no r in {value}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_for_capacity_gives_the_rate_cell_back_and_is_not_counted_as_admitted() {
    let backend = mock().gated().start().await;
    // One slot; team-a at 1 TPS with a burst of 20, so its bucket barely refills during the
    // test; unknown keys at 1 TPS with a burst of 1.
    let sluice = start_sluice_with(
        &config(&format!(
            "{}\n[service.rate_limit]\ndefault_tps = 1\n\
             [[service.resource]]\nname = \"team-a\"\nkey = \"key-a\"\ntps = 1\nburst = 20\n",
            service(&[backend.url()], "max_concurrent = 1")
        )),
        Some("token"),
        None,
    )
    .await;
    let pool = pool();
    let keyed = |path: &str, key: &str| {
        let mut req = get(sluice.addr, path);
        req.headers_mut().insert("x-api-key", key.parse().unwrap());
        req
    };
    let held = {
        let (pool, req) = (pool.clone(), keyed("/hold", "key-a"));
        tokio::spawn(async move { send(&pool, req).await })
    };
    backend.wait_current(1).await;

    // Ten more while the only slot is taken: each a capacity 429 that leaves the bucket as
    // it was (r never drops; before the fix it fell by one each time).
    let mut seen = Vec::new();
    for _ in 0..10 {
        let answer = send(&pool, keyed("/full", "key-a")).await;
        assert_eq!(answer.status, 429, "{}", answer.text());
        assert_eq!(answer.reason(), "endpoints_full");
        seen.push(remaining(&answer));
    }
    assert!(
        seen.iter().all(|&r| r >= 19),
        "cells spent on capacity 429s: r = {seen:?}"
    );
    // An unknown key's bucket holds one cell: had the first 429 spent it, the next would be a
    // rate refusal.
    for _ in 0..3 {
        let answer = send(&pool, keyed("/full", "nobody's key")).await;
        assert_eq!(answer.reason(), "endpoints_full", "{}", answer.text());
    }
    backend.open_gate();
    assert_eq!(held.await.unwrap().status, 200);

    // The resource was billed for the one forwarded request only.
    let admin = sluice.admin.unwrap();
    let mut req = get(admin, "/admin/capacity");
    req.headers_mut()
        .insert("authorization", "Bearer token".parse().unwrap());
    let capacity = once(admin, req).await.json();
    let admitted = |name: &str| -> u64 {
        capacity["services"][0]["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["name"] == name)
            .map(|r| r["admitted_last_minute"].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(
        (admitted("team-a"), admitted("unknown")),
        (1, 0),
        "{capacity}"
    );
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_client_header_to_new_connections_without_a_restart() {
    let backend = mock().start().await;
    let text = |client_header: &str| {
        config(&format!(
            "[timeouts]\nclient_header = \"{client_header}\"\n\n{}",
            service(&[backend.url()], "")
        ))
    };
    let path = write_config("client_header_reload", &text("30s"));
    let sluice = start_sluice_with(&text("30s"), Some("token"), Some(path.clone())).await;
    std::fs::write(&path, text("200ms")).unwrap();
    let admin = sluice.admin.unwrap();
    let mut reload = request("POST", admin, "/admin/reload", "");
    reload
        .headers_mut()
        .insert("authorization", "Bearer token".parse().unwrap());
    let answer = once(admin, reload).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        !answer.text().contains("client_header"),
        "the reload says client_header needs a restart: {}",
        answer.text()
    );
    // A head that never ends, on a connection opened after the reload: closed at the new
    // value, long before the old 30 s.
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(sluice.addr).await.unwrap();
    stream
        .write_all(b"GET /score HTTP/1.1\r\nhost: a")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "still open after {:?}", started.elapsed());
    assert_eq!(backend.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_the_queue_gets_its_rate_cell_back() {
    let backend = mock().gated().start().await;
    // One slot and a queue; team-a at 1 TPS with a burst of 20 (it barely refills meanwhile).
    let sluice = start_sluice(&config(&format!(
        "{}\n[service.rate_limit]\n\
         [[service.resource]]\nname = \"team-a\"\nkey = \"key-a\"\ntps = 1\nburst = 20\n",
        service(
            &[backend.url()],
            "max_concurrent = 1\nqueue_size = 4\nqueue_timeout = \"30s\""
        )
    )))
    .await;
    let keyed = |path: &str| {
        let mut req = get(sluice.addr, path);
        req.headers_mut()
            .insert("x-api-key", "key-a".parse().unwrap());
        req
    };
    let pool = pool();
    let held = {
        let (pool, req) = (pool.clone(), keyed("/hold"));
        tokio::spawn(async move { send(&pool, req).await })
    };
    backend.wait_current(1).await;

    // A request that waits in the queue, then its client leaves.
    let mut leaving = TcpStream::connect(sluice.addr).await.unwrap();
    leaving
        .write_all(b"GET /queued HTTP/1.1\r\nhost: a.example\r\nx-api-key: key-a\r\n\r\n")
        .await
        .unwrap();
    let queue = sluice.pool(0);
    eventually("the request waits in the queue", || queue.queue_len() == 1).await;
    drop(leaving);
    eventually("the request left the queue", || queue.queue_len() == 0).await;

    backend.open_gate();
    assert_eq!(held.await.unwrap().status, 200);
    let answer = send(&pool, keyed("/after")).await;
    assert_eq!(answer.status, 200);
    // Two cells spent (the held request and this one); the queued one came back.
    assert!(remaining(&answer) >= 18, "r = {}", remaining(&answer));
    assert_eq!(backend.arrivals(), ["/hold", "/after"]);
    sluice.assert_idle().await;
}
