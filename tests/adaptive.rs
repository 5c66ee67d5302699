//! A learned cap (`max_concurrent = "auto"`, issue 17), over real sockets: an endpoint with a
//! fixed number of workers, where requests beyond them wait inside it, driven by more
//! closed-loop clients than it has workers. sluice must find the knee — enough in flight to
//! keep every worker busy, not so many that they queue inside the endpoint — and follow it
//! when the endpoint loses workers. Every bound is derived from what this run measured: the
//! endpoint's unloaded latency and how long its workers actually took per request.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::sync::Semaphore;

/// The admin token of the tests that change the policy.
const TOKEN: &str = "adaptive-admin-token";
/// Time a worker takes per request.
const SERVICE_TIME: Duration = Duration::from_millis(50);
/// Closed-loop clients: far more than the endpoint has workers.
const CLIENTS: usize = 60;
/// How long a cap stays within its band to count as settled.
const SETTLED: Duration = Duration::from_secs(1);

/// One request as the endpoint saw it.
#[derive(Debug, Clone, Copy)]
struct Served {
    /// When it was answered.
    at: Instant,
    /// From arrival to answer, waiting for a worker included.
    latency: Duration,
    /// From taking a worker to answering: what a worker spent on it.
    worked: Duration,
}

/// A scoring endpoint with `workers` workers (a semaphore) that each take [`SERVICE_TIME`] per
/// request; requests beyond the workers wait inside it, as in a model server's queue.
struct Workers {
    addr: SocketAddr,
    workers: Arc<Semaphore>,
    served: Arc<Mutex<Vec<Served>>>,
}

impl Workers {
    async fn start(workers: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let semaphore = Arc::new(Semaphore::new(workers));
        let served = Arc::new(Mutex::new(Vec::new()));
        let (sem, log) = (Arc::clone(&semaphore), Arc::clone(&served));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (sem, log) = (Arc::clone(&sem), Arc::clone(&log));
                tokio::spawn(async move {
                    let service = service_fn(move |_request| {
                        let (sem, log) = (Arc::clone(&sem), Arc::clone(&log));
                        async move {
                            let arrived = Instant::now();
                            let worker = sem.acquire_owned().await.unwrap();
                            let started = Instant::now();
                            tokio::time::sleep(SERVICE_TIME).await;
                            drop(worker);
                            let at = Instant::now();
                            log.lock().unwrap().push(Served {
                                at,
                                latency: at - arrived,
                                worked: at - started,
                            });
                            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"{\"score\": 0.5}"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            workers: semaphore,
            served,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lose `n` workers for good (once they finish what they are doing).
    fn lose(&self, n: u32) {
        let workers = Arc::clone(&self.workers);
        tokio::spawn(async move {
            let gone = workers.acquire_many_owned(n).await.unwrap();
            gone.forget();
        });
    }

    /// What it served of the requests that arrived after `since`.
    fn served_since(&self, since: Instant) -> Vec<Served> {
        let served = self.served.lock().unwrap();
        served
            .iter()
            .filter(|s| s.at - s.latency > since)
            .copied()
            .collect()
    }
}

/// The learned cap of the first endpoint of the first service.
fn cap(sluice: &Sluice) -> u32 {
    sluice.pool(0).shape().cap(0)
}

/// Wait until the learned cap has stayed within `band` for [`SETTLED`], at most `limit`
/// in all; how long it took to enter the band for good.
async fn settle(sluice: &Sluice, band: std::ops::RangeInclusive<u32>, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut inside_since = None;
    loop {
        let now = cap(sluice);
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        match band.contains(&now) {
            false => inside_since = None,
            true => {
                let since = *inside_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= SETTLED {
                    return since - start;
                }
            }
        }
        assert!(
            start.elapsed() < limit,
            "the cap did not reach {band:?} within {limit:?}; it went {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sample the cap every 20 ms for `length`: each value seen.
async fn caps_over(sluice: &Sluice, length: Duration) -> Vec<u32> {
    let start = Instant::now();
    let mut caps = Vec::new();
    while start.elapsed() < length {
        caps.push(cap(sluice));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    caps
}

/// Each value of `caps` and how often it was seen.
fn distinct(caps: &[u32]) -> std::collections::BTreeMap<u32, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for &c in caps {
        *seen.entry(c).or_default() += 1;
    }
    seen
}

fn percentile(mut values: Vec<Duration>, p: f64) -> Duration {
    assert!(!values.is_empty());
    values.sort();
    let i = ((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1;
    values[i]
}

/// Goodput of `served` over `length` against what `workers` busy all the time serve at the
/// time they actually took per request (in this run, on this machine).
fn goodput_ratio(served: &[Served], workers: u32, length: Duration) -> f64 {
    let worked: Duration = served.iter().map(|s| s.worked).sum();
    let per_request = worked / u32::try_from(served.len()).unwrap();
    let possible = f64::from(workers) * length.as_secs_f64() / per_request.as_secs_f64();
    served.len() as f64 / possible
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_cap_finds_the_workers_of_an_endpoint_and_follows_them() {
    let endpoint = Workers::start(8).await;
    let extra = "max_concurrent = \"auto\"\nqueue_size = 100\nqueue_timeout = \"30s\"";
    let sluice = start_sluice(&config(&service(&[endpoint.url()], extra))).await;
    let client = pool();
    assert_eq!(cap(&sluice), 20, "a learned cap starts at 20");

    // Unloaded: one request at a time.
    let before = Instant::now();
    for _ in 0..20 {
        let answer = send(&client, get(sluice.addr, "/score")).await;
        assert_eq!(answer.status, 200);
    }
    let unloaded = percentile(
        endpoint
            .served_since(before)
            .iter()
            .map(|s| s.latency)
            .collect(),
        0.5,
    );

    // 60 closed-loop clients.
    let answers = Arc::new(Mutex::new((0u64, 0u64)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (client, answers, stop) = (client.clone(), Arc::clone(&answers), Arc::clone(&stop));
        let addr = sluice.addr;
        clients.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = send(&client, get(addr, "/score")).await;
                let mut counts = answers.lock().unwrap();
                counts.0 += 1;
                counts.1 += u64::from(answer.status != 200);
            }
        });
    }

    // 8 workers: the cap settles around them, and stays there.
    settle(&sluice, 6..=14, Duration::from_secs(30)).await;
    let window = Duration::from_secs(5);
    let from = Instant::now();
    let caps = caps_over(&sluice, window).await;
    assert!(
        caps.iter().all(|c| (6..=14).contains(c)),
        "8 workers: {caps:?}"
    );
    let served = endpoint.served_since(from);
    let p99 = percentile(served.iter().map(|s| s.latency).collect(), 0.99);
    // On a busy machine the work itself takes longer under load (timers fire late): what
    // the workers' own p99 took beyond the unloaded latency is the machine's, not the cap's.
    let worked_p99 = percentile(served.iter().map(|s| s.worked).collect(), 0.99);
    let bound = unloaded.mul_f64(1.5) + worked_p99.saturating_sub(unloaded);
    assert!(
        p99 <= bound,
        "the endpoint's p99 {p99:?} under load (its workers' {worked_p99:?}) against \
         {unloaded:?} unloaded (caps {caps:?})"
    );
    let goodput = goodput_ratio(&served, 8, window);
    eprintln!(
        "8 workers: p99 {p99:?} (workers' {worked_p99:?}) against {unloaded:?} unloaded, goodput {goodput:.3}, caps {:?}",
        distinct(&caps)
    );
    assert!(
        goodput >= 0.95,
        "goodput {goodput:.3} of what 8 workers serve (caps {caps:?})"
    );

    // 4 workers: the cap follows within 15 s, and stays near them.
    endpoint.lose(4);
    let took = settle(&sluice, 3..=7, Duration::from_secs(15)).await;
    let from = Instant::now();
    let caps = caps_over(&sluice, window).await;
    assert!(
        caps.iter().all(|c| (3..=7).contains(c)),
        "4 workers, followed after {took:?}: {caps:?}"
    );
    let goodput = goodput_ratio(&endpoint.served_since(from), 4, window);
    eprintln!(
        "4 workers: followed after {took:?}, goodput {goodput:.3}, caps {:?}",
        distinct(&caps)
    );
    assert!(
        goodput >= 0.95,
        "goodput {goodput:.3} of what 4 workers serve (caps {caps:?})"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let (total, errors) = *answers.lock().unwrap();
    assert!(
        (errors as f64) < 0.01 * total as f64,
        "{errors} errors in {total} answers"
    );

    // What operators see: the learned cap in /admin/capacity and /metrics, and its moves.
    let learned = cap(&sluice);
    let admin = sluice.admin.unwrap();
    let capacity = send(
        &client,
        admin_request("GET", admin, "/admin/capacity", "", None),
    )
    .await
    .json();
    let view = &capacity["services"][0]["endpoints"][0];
    assert_eq!(view["adaptive"], true, "{view}");
    assert_eq!(view["max_concurrent"], learned, "{view}");
    assert_eq!(capacity["services"][0]["capacity"], learned, "{capacity}");
    let metrics = send(&client, get(admin, "/metrics")).await.text();
    let gauge = format!(
        "sluice_endpoint_max_concurrent{{service=\"scoring\",endpoint=\"{}\"}} {learned}",
        endpoint.url()
    );
    assert!(metrics.contains(&gauge), "{gauge} not in\n{metrics}");
    let down = format!(
        "sluice_endpoint_cap_changes_total{{service=\"scoring\",endpoint=\"{}\",direction=\"down\"}} ",
        endpoint.url()
    );
    let downs: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&down))
        .unwrap_or_else(|| panic!("{down} not in\n{metrics}"))
        .parse()
        .unwrap();
    assert!(
        downs >= 2,
        "it came down from 20 and again at 4 workers: {downs}"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn an_operator_turns_learning_on_and_off_through_the_admin_api() {
    let endpoint = mock().start().await;
    let toml = config(&service(&[endpoint.url()], "max_concurrent = 8"));
    let sluice = start_sluice_with(&toml, Some(TOKEN), None).await;
    let admin = sluice.admin.unwrap();
    let call = |method: &'static str, path: &'static str, body: &'static str| async move {
        once(admin, admin_request(method, admin, path, body, Some(TOKEN))).await
    };
    let view = |capacity: serde_json::Value| capacity["services"][0]["endpoints"][0].clone();
    // PATCH the service's max_concurrent to `value`: the answer's status.
    let patch = |value: &'static str| async move {
        let body = format!(r#"{{"max_concurrent": {value}}}"#);
        let request = admin_request(
            "PATCH",
            admin,
            "/admin/services/scoring",
            &body,
            Some(TOKEN),
        );
        let answer = once(admin, request).await;
        (answer.status, answer.text())
    };

    assert_eq!(patch(r#""auto""#).await.0, 200);
    let endpoint_view = view(call("GET", "/admin/capacity", "").await.json());
    assert_eq!(endpoint_view["adaptive"], true, "{endpoint_view}");
    assert_eq!(
        endpoint_view["max_concurrent"], 20,
        "starts at 20: {endpoint_view}"
    );
    let policy = call("GET", "/admin/policy", "").await.json();
    assert_eq!(policy["service"][0]["max_concurrent"], "auto", "{policy}");

    // Not a number nor "auto": refused, and nothing changes.
    let (status, text) = patch(r#""lots""#).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("auto"), "{text}");
    assert_eq!(
        view(call("GET", "/admin/capacity", "").await.json())["adaptive"],
        true
    );

    assert_eq!(patch("8").await.0, 200);
    let endpoint_view = view(call("GET", "/admin/capacity", "").await.json());
    assert_eq!(endpoint_view["adaptive"], false, "{endpoint_view}");
    assert_eq!(endpoint_view["max_concurrent"], 8, "{endpoint_view}");

    // An endpoint added with a learned cap of its own.
    let added = r#"{"url": "http://127.0.0.1:9", "max_concurrent": "auto"}"#;
    let answer = call("POST", "/admin/services/scoring/endpoints", added).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let capacity = call("GET", "/admin/capacity", "").await.json();
    let second = &capacity["services"][0]["endpoints"][1];
    assert_eq!(second["adaptive"], true, "{capacity}");
    assert_eq!(
        capacity["services"][0]["capacity"], 28,
        "8 + 20: {capacity}"
    );
    sluice.stop().await;
}
