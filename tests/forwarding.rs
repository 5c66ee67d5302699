//! What a client and an endpoint see of each other through sluice: hop-by-hop headers removed
//! both ways, forwarding headers added, method, path, query, end-to-end headers and bodies
//! unchanged; routing by longest prefix; HTTP/2 clients; pooled upstream connections.

mod support;

use bytes::Bytes;
use http::Version;
use rand::{Rng, SeedableRng};
use support::*;

const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "x-hop-token",
    "x-other-hop",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_both_ways_and_forwarding_headers_added() {
    let backend = mock()
        .reply(|_| Reply::Full {
            status: 200,
            headers: vec![
                ("connection", "x-other-hop"),
                ("x-other-hop", "1"),
                ("keep-alive", "timeout=5, max=100"),
                ("proxy-authenticate", "Basic realm=\"upstream\""),
                ("upgrade", "foo/2"),
                ("x-model-version", "7  b"),
            ],
            body: Bytes::from_static(b"scored"),
        })
        .start()
        .await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;

    let mut req = get(sluice.addr, "/score");
    for (name, value) in [
        ("connection", "keep-alive, X-Hop-Token"),
        ("x-hop-token", "secret-hop"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("trailer", "x-checksum"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("proxy-connection", "keep-alive"),
        ("x-request-id", "abc  123"),
        ("x-empty", ""),
        ("X-Mixed-Case", "MiXeD Value"),
        ("x-multi", "first"),
        ("x-multi", "second"),
        ("authorization", "Bearer end-to-end"),
    ] {
        req.headers_mut().append(name, value.parse().unwrap());
    }
    let answer = once(sluice.addr, req).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "scored");

    // What the endpoint saw.
    let seen = &backend.received()[0];
    for name in HOP_BY_HOP {
        assert!(
            seen.headers.get(name).is_none(),
            "hop-by-hop {name} forwarded upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("host"), Some(backend.addr.to_string().as_str()));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(sluice.addr.to_string().as_str())
    );
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("via"), Some("1.1 sluice"));
    assert_eq!(seen.header("x-request-id"), Some("abc  123"));
    assert_eq!(seen.header("x-empty"), Some(""));
    assert_eq!(seen.header("x-mixed-case"), Some("MiXeD Value"));
    assert_eq!(seen.header("authorization"), Some("Bearer end-to-end"));
    let multi: Vec<_> = seen.headers.get_all("x-multi").iter().collect();
    assert_eq!(
        multi,
        ["first", "second"],
        "repeated headers keep their order"
    );

    // What the client saw.
    for name in HOP_BY_HOP {
        assert!(
            answer.headers.get(name).is_none(),
            "hop-by-hop {name} forwarded to the client: {:?}",
            answer.headers
        );
    }
    assert_eq!(answer.header("x-model-version"), Some("7  b"));
    assert_eq!(answer.header("via"), Some("1.1 sluice"));
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_appended_to_the_clients_list() {
    let backend = mock().start().await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;

    let mut req = get(sluice.addr, "/score");
    req.headers_mut().insert(
        "x-forwarded-for",
        "203.0.113.7, 198.51.100.2".parse().unwrap(),
    );
    assert_eq!(once(sluice.addr, req).await.status, 200);
    // Two lines are one list (RFC 9110 §5.3): joined, then appended to.
    let mut req = get(sluice.addr, "/score");
    req.headers_mut()
        .append("x-forwarded-for", "203.0.113.7".parse().unwrap());
    req.headers_mut()
        .append("x-forwarded-for", "198.51.100.2".parse().unwrap());
    assert_eq!(once(sluice.addr, req).await.status, 200);

    for seen in backend.received() {
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("203.0.113.7, 198.51.100.2, 127.0.0.1")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_paths_and_queries_are_preserved_byte_for_byte() {
    let backend = mock().start().await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;

    // Byte for byte but for dot-segments, which are removed before routing (docs/http.md,
    // "HTTP behaviour"; tests/by_the_book.rs): empty segments, encodings and the query stay.
    let targets = [
        ("/score", "/score"),
        ("/score/", "/score/"),
        (
            "/v1/models/churn:predict?b=2&a=1&a=1&empty=&flag",
            "/v1/models/churn:predict?b=2&a=1&a=1&empty=&flag",
        ),
        (
            "/a//b/./c/../d?enc=%2F%20%E2%9C%93+plus&raw=%zz&q=!$'()*,;:@~/../x",
            "/a//b/d?enc=%2F%20%E2%9C%93+plus&raw=%zz&q=!$'()*,;:@~/../x",
        ),
        ("/score?", "/score?"),
        ("/score?x=%41&x=%61", "/score?x=%41&x=%61"),
    ];
    let methods = [
        "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "SCORE",
    ];
    let mut expected = Vec::new();
    for method in methods {
        for (target, forwarded) in targets {
            // Raw bytes, so no client library normalises anything on the way in.
            let request = format!(
                "{method} {target} HTTP/1.1\r\nHost: scoring.example\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            );
            let answer = raw_exchange(sluice.addr, request.as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 200 OK\r\n"),
                "{method} {target}: {answer}"
            );
            expected.push((method.to_owned(), forwarded.to_owned()));
        }
    }
    let seen: Vec<(String, String)> = backend
        .received()
        .iter()
        .map(|r| (r.method.to_string(), r.uri.clone()))
        .collect();
    assert_eq!(seen, expected);
    assert!(backend
        .received()
        .iter()
        .all(|r| r.header("x-forwarded-host") == Some("scoring.example")));
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_pass_unchanged() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let upload: Bytes = (0..40_000)
        .map(|_| rng.gen::<u8>())
        .collect::<Vec<u8>>()
        .into();
    let download: Bytes = (0..50_000)
        .map(|_| rng.gen::<u8>())
        .collect::<Vec<u8>>()
        .into();
    let reply_body = download.clone();
    let backend = mock()
        .reply(move |_| Reply::Full {
            status: 201,
            headers: vec![("content-type", "application/octet-stream")],
            body: reply_body.clone(),
        })
        .start()
        .await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;

    let client = pool();
    let answer = send(
        &client,
        request("POST", sluice.addr, "/score", upload.clone()),
    )
    .await;
    assert_eq!(answer.status, 201);
    assert_eq!(
        answer.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(answer.body, download);
    let seen = &backend.received()[0];
    assert_eq!(seen.body_len, upload.len() as u64);
    assert_eq!(seen.body.as_ref(), Some(&upload));
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_clients_are_served() {
    let backend = mock()
        .reply(|r| Reply::ok(format!("{} {} {}", r.method, r.uri, r.body_len)))
        .start()
        .await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;

    // 20 concurrent streams on one HTTP/2 connection.
    let h2 = connect_h2(sluice.addr).await;
    let mut streams = Vec::new();
    for i in 0..20 {
        let mut h2 = h2.clone();
        let addr = sluice.addr;
        streams.push(tokio::spawn(async move {
            let body = vec![b'a'; 1000 + i];
            let req = request("POST", addr, &format!("/score?stream={i}"), body);
            let response = h2.send_request(req).await.expect("h2 response");
            assert_eq!(response.version(), Version::HTTP_2);
            let answer = collect(response).await.expect("h2 body");
            assert_eq!(answer.status, 200);
            assert_eq!(
                answer.text(),
                format!("POST /score?stream={i} {}", 1000 + i)
            );
        }));
    }
    for stream in streams {
        stream.await.unwrap();
    }
    let received = backend.received();
    assert_eq!(received.len(), 20);
    for seen in &received {
        // Upstream is HTTP/1.1; the client's authority becomes X-Forwarded-Host.
        assert_eq!(seen.version, Version::HTTP_11);
        assert_eq!(seen.header("via"), Some("2 sluice"));
        assert_eq!(
            seen.header("x-forwarded-host"),
            Some(sluice.addr.to_string().as_str())
        );
        assert_eq!(seen.header("host"), Some(backend.addr.to_string().as_str()));
    }
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_route_by_longest_prefix_on_a_segment_boundary() {
    let all = mock().reply(|_| Reply::ok("all")).start().await;
    let score = mock().reply(|_| Reply::ok("score")).start().await;
    let v2 = mock().reply(|_| Reply::ok("v2")).start().await;
    let toml = config(&format!(
        "[[service]]\nname = \"all\"\npath_prefix = \"/\"\nendpoints = [{:?}]\n\
         [[service]]\nname = \"score\"\npath_prefix = \"/score\"\nendpoints = [{:?}]\n\
         [[service]]\nname = \"v2\"\npath_prefix = \"/score/v2/\"\nendpoints = [{:?}]\n",
        all.url(),
        score.url(),
        v2.url()
    ));
    let sluice = start_sluice(&toml).await;
    let client = pool();
    for (path, service) in [
        ("/score", "score"),
        ("/score/v1", "score"),
        ("/score?x=1", "score"),
        ("/scores", "all"),
        ("/score/v2/x", "v2"),
        ("/score/v2", "score"),
        ("/", "all"),
        ("/other/thing", "all"),
    ] {
        let answer = send(&client, get(sluice.addr, path)).await;
        assert_eq!(answer.text(), service, "{path}");
    }
    sluice.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_prefix_gets_404_json() {
    let backend = mock().start().await;
    let toml = config(&format!(
        "[[service]]\nname = \"scoring\"\npath_prefix = \"/score\"\nendpoints = [{:?}]\n",
        backend.url()
    ));
    let sluice = start_sluice(&toml).await;
    let answer = once(sluice.addr, get(sluice.addr, "/other")).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(
        answer.text(),
        r#"{"error":"not_found","reason":"no_route"}"#
    );
    assert_eq!(backend.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let backend = mock().start().await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;
    let client = pool();
    for _ in 0..200 {
        assert_eq!(send(&client, get(sluice.addr, "/score")).await.status, 200);
    }
    assert_eq!(backend.requests(), 200);
    // Sequential requests need one connection; a few more if a request goes out before the
    // previous connection is back in the pool.
    assert!(
        backend.connections() <= 10,
        "{} upstream connections for 200 sequential requests",
        backend.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_base_path_is_prepended_to_the_request_path() {
    let backend = mock().start().await;
    let sluice = start_sluice(&config(&service(
        &[format!("{}/models/churn/", backend.url())],
        "",
    )))
    .await;
    let client = pool();
    for path in ["/score?x=1", "/", "/a/b"] {
        assert_eq!(send(&client, get(sluice.addr, path)).await.status, 200);
    }
    assert_eq!(
        backend.arrivals(),
        [
            "/models/churn/score?x=1",
            "/models/churn/",
            "/models/churn/a/b"
        ]
    );
    sluice.assert_idle().await;
}
