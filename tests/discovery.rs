//! DNS discovery (issue 16), against a real DNS server (dnsmasq) whose records change while
//! sluice runs: a name stands for every address it has, each an endpoint with the entry's
//! port and cap, sent the name in `Host`; when the records change, the endpoints follow within
//! a TTL and a lookup, and capacity with them; an endpoint that leaves takes no new request
//! and finishes what it holds; a server that stops answering leaves the last set serving; an
//! authoritative "no such name" empties the service; SRV records name targets and ports.
//! Endpoints listen on 127.0.0.2, 127.0.0.3, … (all of 127.0.0.0/8 is loopback), one port.

mod support;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::dns::Dnsmasq;
use support::*;
use tokio::net::TcpListener;
use tokio::time::Instant;

const NAME: &str = "scoring.test";

/// Listeners on one port of each of `hosts` (the port is free on the first and tried on the
/// others; another one is tried when one of them has it taken).
async fn one_port(hosts: &[&str]) -> (u16, Vec<TcpListener>) {
    'port: for _ in 0..50 {
        let first = TcpListener::bind((hosts[0], 0)).await.expect("bind");
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for host in &hosts[1..] {
            match TcpListener::bind((*host, port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => continue 'port,
            }
        }
        return (port, listeners);
    }
    panic!("no port free on all of {hosts:?}");
}

/// Mock endpoints holding each request `hold`, one per host of `hosts`, all on one port.
async fn endpoints_on(hosts: &[&str], hold: Duration) -> (u16, Vec<Mock>) {
    let (port, listeners) = one_port(hosts).await;
    let mocks = listeners
        .into_iter()
        .map(|l| mock().hold(hold).start_on(l))
        .collect();
    (port, mocks)
}

fn ip(host: &str) -> IpAddr {
    host.parse().unwrap()
}

/// A config whose service "scoring" is `entry` (an inline table) with `extra` keys, its
/// names looked up at `dns` every second.
fn discovering(dns: &Dnsmasq, entry: &str, extra: &str) -> String {
    config(&format!(
        "[resolver]\nnameservers = [\"{}\"]\nmin_ttl = \"1s\"\nmax_ttl = \"1s\"\n\
         timeout = \"500ms\"\n\n[[service]]\nname = \"scoring\"\nmax_concurrent = 5\n{extra}\n\
         endpoints = [{entry}]\n",
        dns.addr()
    ))
}

async fn admin_get(sluice: &Sluice, path: &str) -> serde_json::Value {
    let admin = sluice.admin.expect("admin enabled");
    let answer = once(admin, admin_request("GET", admin, path, "", None)).await;
    assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    answer.json()
}

/// The service's endpoints in `/admin/capacity` (URL, source) and its capacity.
async fn capacity(sluice: &Sluice) -> (Vec<(String, String)>, u64) {
    let view = admin_get(sluice, "/admin/capacity").await;
    let service = &view["services"][0];
    let endpoints = service["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap().to_owned();
            (text("url"), text("source"))
        })
        .collect();
    (endpoints, service["capacity"].as_u64().unwrap())
}

/// Wait (up to `within`) until the service's endpoints are exactly those at `hosts`:`port`;
/// how long that took.
async fn until_endpoints(sluice: &Sluice, hosts: &[&str], port: u16, within: Duration) -> Duration {
    let started = Instant::now();
    let mut want: Vec<(String, String)> = hosts
        .iter()
        .map(|h| (format!("http://{h}:{port}"), format!("dns:{NAME}")))
        .collect();
    want.sort();
    loop {
        let (mut have, _) = capacity(sluice).await;
        have.sort();
        if have == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "endpoints {have:?}, not {want:?}, {within:?} after the change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `clients` closed-loop clients sending GET /score until stopped; every answer's status.
struct Load {
    stop: Arc<AtomicBool>,
    statuses: Arc<Mutex<Vec<(u16, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(sluice: &Sluice, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, statuses, addr) = (stop.clone(), statuses.clone(), sluice.addr);
                tokio::spawn(async move {
                    let client = pool();
                    while !stop.load(Ordering::Relaxed) {
                        let answer = send(&client, get(addr, "/score")).await;
                        let reason = match answer.status.as_u16() {
                            200 => String::new(),
                            _ => answer.text(),
                        };
                        statuses
                            .lock()
                            .unwrap()
                            .push((answer.status.as_u16(), reason));
                    }
                })
            })
            .collect();
        Self {
            stop,
            statuses,
            tasks,
        }
    }

    async fn stop(self) -> Vec<(u16, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(self.statuses)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_the_names_records_under_load_and_capacity_with_them() {
    let Some(dns) = Dnsmasq::start() else { return };
    let hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
    let (port, mocks) = endpoints_on(&hosts, Duration::from_millis(10)).await;
    dns.set(&[(ip(hosts[0]), NAME), (ip(hosts[1]), NAME)]);
    let entry = format!("{{ url = \"http://{NAME}:{port}\", resolve = true }}");
    let sluice = start_sluice(&discovering(&dns, &entry, "")).await;
    until_endpoints(&sluice, &hosts[..2], port, DEADLINE).await;
    assert_eq!(capacity(&sluice).await.1, 10);

    // Fewer clients than the smallest capacity: every request has a slot, none is refused.
    let load = Load::start(&sluice, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<usize> = mocks.iter().map(Mock::requests).collect();
    assert!(before[0] > 0 && before[1] > 0, "{before:?}");
    assert_eq!(&before[2..], [0, 0]);

    // Scale out: within the TTL (1 s) and a second, the new addresses are endpoints, take
    // traffic, and the capacity doubles.
    dns.set(&hosts.map(|h| (ip(h), NAME)));
    let took = until_endpoints(&sluice, &hosts, port, Duration::from_secs(2)).await;
    assert_eq!(capacity(&sluice).await.1, 20);
    let counts = |mocks: &[Mock]| mocks.iter().map(Mock::requests).collect::<Vec<_>>();
    eventually("the new endpoints take traffic", || {
        counts(&mocks)[2..].iter().all(|&n| n > 0)
    })
    .await;
    eprintln!("scaled out after {took:?}: {:?}", counts(&mocks));

    // Scale in and replace every endpoint: two new addresses only.
    let newer = ["127.0.0.6", "127.0.0.7"];
    let (_, newer_mocks) = {
        let mut listeners = Vec::new();
        for h in newer {
            listeners.push(TcpListener::bind((h, port)).await.expect("bind the port"));
        }
        let mocks: Vec<Mock> = listeners
            .into_iter()
            .map(|l| mock().hold(Duration::from_millis(10)).start_on(l))
            .collect();
        (port, mocks)
    };
    dns.set(&newer.map(|h| (ip(h), NAME)));
    until_endpoints(&sluice, &newer, port, Duration::from_secs(2)).await;
    // What a removed endpoint had been sent by then (requests in flight included) is all it
    // ever gets: the next half second of load goes to the new ones only.
    let gone = counts(&mocks);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts(&mocks), gone, "a removed endpoint got a request");
    assert!(newer_mocks.iter().all(|m| m.requests() > 0));
    let statuses = load.stop().await;
    // Every request was answered by an endpoint, those in flight at a removal included.
    let refused: Vec<&(u16, String)> = statuses.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        refused.is_empty(),
        "{} of {} not 200: {refused:?}",
        refused.len(),
        statuses.len()
    );
    let served: usize = mocks.iter().chain(&newer_mocks).map(Mock::requests).sum();
    assert_eq!(served, statuses.len());
    assert_eq!(capacity(&sluice).await.1, 10);

    // Each joining and leaving is an event that says DNS did it.
    let events = admin_get(&sluice, "/admin/autoscale/events").await;
    let kinds = |kind: &str| -> usize {
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind && e["reason"].as_str().unwrap().contains("DNS"))
            .count()
    };
    assert_eq!((kinds("endpoint_added"), kinds("endpoint_removed")), (6, 4));
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_dns_server_keeps_the_last_set_and_no_such_name_empties_the_service() {
    let Some(mut dns) = Dnsmasq::start() else {
        return;
    };
    let hosts = ["127.0.0.2", "127.0.0.3"];
    let (port, mocks) = endpoints_on(&hosts, Duration::ZERO).await;
    dns.set(&hosts.map(|h| (ip(h), NAME)));
    let entry = format!("{{ url = \"http://{NAME}:{port}/v1\", resolve = true }}");
    let sluice = start_sluice(&discovering(&dns, &entry, "")).await;
    let hosts_urls = |port: u16| {
        let mut urls: Vec<String> = hosts
            .iter()
            .map(|h| format!("http://{h}:{port}/v1"))
            .collect();
        urls.sort();
        urls
    };
    let urls = || async {
        let mut urls: Vec<String> = capacity(&sluice).await.0.into_iter().map(|e| e.0).collect();
        urls.sort();
        urls
    };
    let deadline = Instant::now() + DEADLINE;
    while urls().await != hosts_urls(port) {
        assert!(
            Instant::now() < deadline,
            "never resolved: {:?}",
            urls().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The endpoint sees the name in Host and the entry's base path before the request's.
    let client = pool();
    assert_eq!(send(&client, get(sluice.addr, "/score")).await.status, 200);
    let seen = mocks
        .iter()
        .flat_map(Mock::received)
        .next()
        .expect("an endpoint got the request");
    assert_eq!(seen.header("host"), Some(&*format!("{NAME}:{port}")));
    assert_eq!(seen.uri, "/v1/score");

    // The server stops answering: lookups fail (and say so), the endpoints stay and serve.
    dns.stop();
    let admin = sluice.admin.unwrap();
    let failed = || async {
        let text = once(admin, admin_request("GET", admin, "/metrics", "", None))
            .await
            .text();
        let line = format!("sluice_dns_lookups_total{{name=\"{NAME}\",result=\"failed\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    let deadline = Instant::now() + DEADLINE;
    while failed().await < 2.0 {
        assert!(Instant::now() < deadline, "no failed lookup counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(urls().await, hosts_urls(port));
    for _ in 0..10 {
        assert_eq!(send(&client, get(sluice.addr, "/score")).await.status, 200);
    }

    // It answers again, that the name has no address (NXDOMAIN): the service has no
    // endpoint, and says so (503 no_endpoints at once, with no queue).
    dns.set_hosts_file(&[]);
    dns.start_again();
    let deadline = Instant::now() + DEADLINE;
    while !urls().await.is_empty() {
        assert!(Instant::now() < deadline, "still {:?}", urls().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = send(&client, get(sluice.addr, "/score")).await;
    assert_eq!(
        (answer.status.as_u16(), answer.reason()),
        (503, "no_endpoints".into())
    );
    assert_eq!(capacity(&sluice).await.1, 0);
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_name_each_target_and_port() {
    let Some(mut dns) = Dnsmasq::start() else {
        return;
    };
    let a = mock().start_on(TcpListener::bind("127.0.0.2:0").await.unwrap());
    let b = mock().start_on(TcpListener::bind("127.0.0.3:0").await.unwrap());
    let port = |m: &Mock| m.url().rsplit(':').next().unwrap().parse::<u16>().unwrap();
    dns.set(&[
        (ip("127.0.0.2"), "a.scoring.test"),
        (ip("127.0.0.3"), "b.scoring.test"),
    ]);
    let srv = "_http._tcp.scoring.test";
    dns.set_srv(&[
        (srv, "a.scoring.test", port(&a)),
        (srv, "b.scoring.test", port(&b)),
    ]);
    let entry = format!("{{ url = \"http://{srv}\", resolve = \"srv\", max_concurrent = 3 }}");
    let sluice = start_sluice(&discovering(&dns, &entry, "")).await;
    let mut want = vec![
        (a.url(), format!("dns:{srv}")),
        (b.url(), format!("dns:{srv}")),
    ];
    want.sort();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (mut have, cap) = capacity(&sluice).await;
        have.sort();
        if have == want {
            assert_eq!(cap, 6);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "endpoints {have:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = pool();
    for _ in 0..20 {
        assert_eq!(send(&client, get(sluice.addr, "/x")).await.status, 200);
    }
    for (m, target) in [(&a, "a.scoring.test"), (&b, "b.scoring.test")] {
        let hosts: Vec<String> = m
            .received()
            .iter()
            .map(|r| r.header("host").unwrap().to_owned())
            .collect();
        assert!(!hosts.is_empty(), "{target} got nothing");
        let want = format!("{target}:{}", port(m));
        assert!(hosts.iter().all(|h| *h == want), "{hosts:?}");
    }
    sluice.stop().await;
}
