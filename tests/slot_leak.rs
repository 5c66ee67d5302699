//! Invariant 1: a slot is released exactly once on every path. Thousands of requests meet
//! random client aborts (before the answer, after the headers, in the middle of the body,
//! HTTP/2 stream resets) and random upstream failures (refused connections, resets before and
//! during the body, 500s, stalls past the response timeout, slow bodies), with a small queue
//! in play; afterwards every in-flight counter must be back to 0.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::*;
use tokio::net::TcpStream;

const REQUESTS: usize = 3000;
const WORKERS: usize = 32;

/// The upstream behaviour a request asks for, by the path it is sent to.
fn upstream_reply(received: &Received) -> Reply {
    let kind = received
        .uri
        .split("up=")
        .nth(1)
        .and_then(|rest| rest.split('&').next())
        .unwrap_or("ok");
    match kind {
        "500" => Reply::status(500),
        "reset" => Reply::Reset,
        "reset-mid-body" => Reply::ResetMidBody {
            len: 256 << 10,
            sent: 64 << 10,
        },
        "stall" => Reply::Stall,
        "slow" => Reply::Slow {
            chunks: 8,
            every: Duration::from_millis(5),
        },
        "big" => Reply::Generated { len: 256 << 10 },
        _ => Reply::ok("ok"),
    }
}

fn pick_upstream(rng: &mut StdRng) -> &'static str {
    match rng.gen_range(0..100) {
        0..40 => "ok",
        40..50 => "500",
        50..60 => "reset",
        60..70 => "reset-mid-body",
        70..75 => "stall",
        75..90 => "slow",
        _ => "big",
    }
}

/// How the client behaves.
#[derive(Debug, Clone, Copy)]
enum ClientMode {
    /// Read the whole answer.
    Complete,
    /// Close the connection after `ms`, answered or not.
    AbortAfter(u64),
    /// Close the connection as soon as the headers arrive.
    DropAtHeaders,
    /// Read one body chunk, then close the connection.
    DropMidBody,
    /// HTTP/2: reset the stream after `ms` (the connection stays).
    H2ResetAfter(u64),
    /// HTTP/2: read the whole answer.
    H2Complete,
}

fn pick_client(rng: &mut StdRng) -> ClientMode {
    match rng.gen_range(0..100) {
        0..45 => ClientMode::Complete,
        45..60 => ClientMode::AbortAfter(rng.gen_range(0..20)),
        60..70 => ClientMode::DropAtHeaders,
        70..85 => ClientMode::DropMidBody,
        85..92 => ClientMode::H2ResetAfter(rng.gen_range(0..20)),
        _ => ClientMode::H2Complete,
    }
}

/// Closes a client connection when dropped, mid-exchange or not.
struct Connection(tokio::task::JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One request; returns what the client saw, for the summary.
async fn one_request(addr: std::net::SocketAddr, path: String, mode: ClientMode) -> String {
    let req = get(addr, &path);
    match mode {
        ClientMode::H2Complete | ClientMode::H2ResetAfter(_) => {
            let mut h2 = connect_h2(addr).await;
            let exchange = async move {
                let response = h2.send_request(req).await?;
                let status = response.status();
                response.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            };
            match mode {
                ClientMode::H2ResetAfter(ms) => {
                    match tokio::time::timeout(Duration::from_millis(ms), exchange).await {
                        Ok(Ok(status)) => status.as_str().to_owned(),
                        Ok(Err(_)) => "body error".into(),
                        Err(_) => "aborted".into(),
                    }
                }
                _ => match exchange.await {
                    Ok(status) => status.as_str().to_owned(),
                    Err(_) => "body error".into(),
                },
            }
        }
        _ => {
            let stream = TcpStream::connect(addr).await.expect("connect to sluice");
            let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            let _connection = Connection(tokio::spawn(async move {
                let _ = conn.await;
            }));
            let exchange = async move {
                let response = sender.send_request(req).await?;
                let status = response.status().as_str().to_owned();
                let mut body = response.into_body();
                match mode {
                    ClientMode::DropAtHeaders => return Ok("dropped at headers".into()),
                    ClientMode::DropMidBody => {
                        body.frame().await;
                        return Ok("dropped mid-body".into());
                    }
                    _ => {}
                }
                match body.collect().await {
                    Ok(_) => Ok(status),
                    Err(_) => Ok("body error".into()),
                }
            };
            let outcome = match mode {
                ClientMode::AbortAfter(ms) => {
                    match tokio::time::timeout(Duration::from_millis(ms), exchange).await {
                        Ok(outcome) => outcome,
                        Err(_) => Ok("aborted".into()),
                    }
                }
                _ => exchange.await,
            };
            outcome.unwrap_or_else(|e: hyper::Error| format!("error: {e}"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_slot_is_released_after_thousands_of_aborted_and_failed_exchanges() {
    let backends = [
        mock().reply(upstream_reply).start().await,
        mock().reply(upstream_reply).start().await,
        mock().reply(upstream_reply).start().await,
    ];
    let dead = DeadPort::new();
    let mut endpoints: Vec<String> = backends.iter().map(Mock::url).collect();
    endpoints.push(dead.url());
    let sluice = start_sluice(&config(&format!(
        "[timeouts]\nresponse = \"150ms\"\n\n{}",
        service(
            &endpoints,
            "max_concurrent = 6\nqueue_size = 4\nqueue_timeout = \"30ms\""
        )
    )))
    .await;

    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let addr = sluice.addr;
        let outcomes = Arc::clone(&outcomes);
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w as u64);
            for i in 0..REQUESTS / WORKERS {
                let up = pick_upstream(&mut rng);
                let mode = pick_client(&mut rng);
                let path = format!("/score?up={up}&w={w}&i={i}");
                let outcome = one_request(addr, path, mode).await;
                *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }

    let outcomes = outcomes.lock().unwrap().clone();
    eprintln!("outcomes: {outcomes:?}");
    let total: usize = outcomes.values().sum();
    assert_eq!(total, REQUESTS / WORKERS * WORKERS);
    // The chaos happened: every kind of ending was met.
    for expected in [
        "200",
        "429",
        "500",
        "502",
        "504",
        "aborted",
        "dropped mid-body",
    ] {
        assert!(
            outcomes.contains_key(expected),
            "no {expected:?} among {outcomes:?}"
        );
    }

    sluice.assert_idle().await;

    // And sluice still serves.
    let answer = once(sluice.addr, get(sluice.addr, "/score?up=ok")).await;
    assert_eq!(answer.status, 200, "{outcomes:?}");
    sluice.assert_idle().await;
}
