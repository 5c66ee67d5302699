//! Several replicas, one set of limits (issue 5): three real `sluice` processes share one real
//! `redis-server`, and what clients and the backend observe must be what one sluice would do:
//! fleet-wide TPS limits, fleet-wide concurrency caps that return to the survivors when a
//! replica dies, one autoscale step per interval for the whole fleet, admin changes that reach
//! every replica, and the documented `on_error` behaviour while Redis is down.
//!
//! Every test returns early (and says "skipped") when `redis-server` is not installed, unless
//! `SLUICE_REQUIRE_REDIS` is set. The tests run one at a time ([`one_at_a_time`]): each drives
//! three processes on a small machine.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::fleet::*;
use support::redis::RedisServer;
use support::*;

const IDS: [&str; 3] = ["a", "b", "c"];

fn addrs(replicas: &[Replica]) -> Vec<SocketAddr> {
    replicas.iter().map(|r| r.addr).collect()
}

/// How many of the requests arriving at `instants` (from any origin) one GCRA bucket of `tps`
/// with `burst` admits, starting full: the reference the fleet is held to.
fn ideal_admissions(instants: &[Duration], tps: f64, burst: f64) -> usize {
    let mut instants: Vec<f64> = instants.iter().map(Duration::as_secs_f64).collect();
    instants.sort_by(f64::total_cmp);
    let interval = 1.0 / tps;
    let tolerance = (burst - 1.0) * interval;
    let mut tat = f64::NEG_INFINITY;
    let mut admitted = 0;
    for now in instants {
        let next = tat.max(now);
        if next - now <= tolerance + 1e-9 {
            tat = next + interval;
            admitted += 1;
        }
    }
    admitted
}

/// Open-loop load of `offered` TPS spread evenly over three replicas for `seconds`, against
/// one resource at `tps` (burst `tps`): the fleet passes what one GCRA bucket would admit of
/// the requests as they were actually sent (measured send times; `tps × T + burst` when the
/// generator keeps its schedule), ±5%.
///
/// The load must exceed the limit by more than the tolerance, or an unlimited fleet would pass
/// too. A machine too busy to offer that much through three debug replicas (the generator at
/// 480/s instead of 1500/s beside two CPU hogs and other builds) gets a second run at a limit
/// it can exceed without starving the replicas: a quarter of what it sent, offered at 1.5
/// times that limit (set with the admin
/// API, which every replica applies). The test says which limit it held.
async fn fleet_wide_rate(tps: u32, offered: f64, seconds: u64) {
    let _serial = one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend = mock().start().await;
    // A cap far above what is ever in flight: only the rate limit refuses. A store timeout
    // far above a round trip to Redis, even on a busy machine: this measures the shared
    // bucket, not on_error (a healthy Redis not scheduled within 50 ms made the replicas fall
    // back to their local thirds hundreds of times a run beside two CPU hogs).
    let services = rated_service(&backend.url(), "max_concurrent = 200", tps, tps);
    let replicas = start_fleet_with(
        &redis.url(),
        &IDS,
        "local",
        Duration::from_millis(500),
        &services,
    )
    .await;
    let ratio = offered / f64::from(tps);
    let (mut tps, mut offered) = (tps, offered);
    for attempt in 1..=2 {
        let before = backend.requests();
        // For `seconds`, or as many as were sent by then on a machine that cannot keep up.
        let load = open_loop(
            Targets::new(addrs(&replicas)),
            "key-a",
            offered,
            Some(Duration::from_secs(seconds)),
        );
        tokio::time::sleep_until(load.started + Duration::from_secs(seconds)).await;
        let shots = load.stop().await;
        let sent: Vec<Duration> = shots.iter().map(|s| s.sent).collect();
        let first = *sent.iter().min().expect("requests were sent");
        let span = (*sent.iter().max().unwrap() - first).as_secs_f64();
        let expected = ideal_admissions(&sent, f64::from(tps), f64::from(tps)) as f64;
        let sent_rate = shots.len() as f64 / span;
        let reached = shots.len() as f64 >= expected * 1.1;
        // Replicas too slow to answer within their share of the slots refuse for capacity:
        // then the slots, not the rate limit, bound what is admitted.
        let admitted_rate = count(&shots, Shot::ok) as f64 / span;
        let starved = count(&shots, slots_full) as f64 > expected * 0.05;
        if (!reached || starved) && attempt == 1 {
            // Offered at `ratio` times the new limit, well within what this machine sent and
            // answered, so the generator keeps its schedule and the store its timeout.
            let lower = ((sent_rate.min(admitted_rate) / 4.0).floor() as u32).max(10);
            eprintln!(
                "fleet rate {tps} TPS offered {offered}: this machine sent {sent_rate:.0}/s and \
                 answered {admitted_rate:.0}/s, {} requests where one bucket admits \
                 {expected:.0}{}: again at {lower} TPS",
                shots.len(),
                if starved {
                    ", replicas short of slots"
                } else {
                    ": not over the limit"
                },
            );
            tps = lower;
            offered = f64::from(tps) * ratio;
            let body = format!(r#"{{"tps": {tps}, "burst": {tps}}}"#);
            // A store too slow to take the change in time refuses it (503: nothing changed, or
            // the outcome unknown; after an unknown outcome that was in fact applied, a 409
            // until this replica adopted it): ask again.
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                let answer = replicas[0]
                    .call("PUT", "/admin/services/scoring/resources/team-a", &body)
                    .await;
                if answer.status == 200 {
                    break;
                }
                assert!(
                    matches!(answer.status.as_u16(), 503 | 409)
                        && tokio::time::Instant::now() < deadline,
                    "{}",
                    answer.text()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for replica in &replicas {
                until(replica, Duration::from_secs(5), "the lower limit", |cap| {
                    resource_view(cap, "team-a")["limit_tps"] == tps
                })
                .await;
            }
            // A full bucket again (burst / tps = 1 s), as the reference starts.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            continue;
        }
        check_fleet_rate(
            &replicas,
            &shots,
            backend.requests() - before,
            tps,
            offered,
            expected,
        )
        .await;
        assert!(
            reached,
            "the load never exceeded the limit: sent {} at {sent_rate:.0}/s, one bucket of \
             {tps} TPS admits {expected:.0} of them",
            shots.len()
        );
        return;
    }
}

/// Passed the rate check but found the replica's share of the slots taken.
fn slots_full(shot: &Shot) -> bool {
    shot.status == 429 && shot.reason.as_deref() == Some("endpoints_full")
}

/// The checks of [`fleet_wide_rate`] on one run: `reached` is how many requests the backend
/// got during it, `expected` what one bucket admits of them.
async fn check_fleet_rate(
    replicas: &[Replica],
    shots: &[Shot],
    reached: usize,
    tps: u32,
    offered: f64,
    expected: f64,
) {
    let first = shots
        .iter()
        .map(|s| s.sent)
        .min()
        .expect("requests were sent");
    let last = shots.iter().map(|s| s.sent).max().unwrap();
    let span = (last - first).as_secs_f64();
    let admitted = count(shots, Shot::ok);
    // Passed the rate check but found this replica's share of the slots taken: only when the
    // machine starves the replicas (answers slow, so more in flight than the cap of 200
    // allows). Such a request gives its cell back (a capacity 429 costs its caller nothing),
    // so the next request can take it: the rate check below counts admissions only.
    let slots_full = count(shots, slots_full);
    let mut lags: Vec<Duration> = shots.iter().map(Shot::lag).collect();
    let (lag_p99, lag_max) = (percentile(&mut lags, 99), percentile(&mut lags, 100));
    let mut latencies: Vec<Duration> = shots.iter().map(|s| s.latency).collect();
    let latency_p99 = percentile(&mut latencies, 99);
    let per_replica: Vec<usize> = (0..3)
        .map(|i| count(shots, |s| s.ok() && s.target == i))
        .collect();
    let mut stores = Vec::new();
    for replica in replicas {
        stores.push(replica.store().await);
    }
    let fallbacks: Vec<&serde_json::Value> = stores.iter().map(|s| &s["fallbacks_total"]).collect();
    let errors: Vec<&serde_json::Value> = stores.iter().map(|s| &s["errors_total"]).collect();
    let bound = f64::from(tps) * span + f64::from(tps);
    eprintln!(
        "fleet rate {tps} TPS offered {offered}: sent {} over {span:.3} s ({:.0}/s), admitted \
         {admitted} (one bucket admits {expected:.0} of these, {:+.2}%; tps × T + burst = \
         {bound:.0}), refused for slots {slots_full}, per replica {per_replica:?}, backend \
         {reached}, lag p99 {lag_p99:?} max {lag_max:?}, latency p99 {latency_p99:?}, store \
         errors {errors:?}, fallbacks {fallbacks:?}",
        shots.len(),
        shots.len() as f64 / span,
        (admitted as f64 - expected) / expected * 100.0,
    );

    // Every answer is an admission or a rate refusal (or, on a starved machine, a full
    // share of slots, counted above).
    for shot in shots {
        assert!(
            shot.ok()
                || (shot.status == 429
                    && matches!(
                        shot.reason.as_deref(),
                        Some("rate_limited" | "endpoints_full")
                    )),
            "unexpected answer {shot:?}"
        );
    }
    assert_eq!(
        reached, admitted,
        "every admitted request reached the backend, nothing else did"
    );
    assert!(
        slots_full as f64 <= expected * 0.05,
        "{slots_full} refused for slots: the replicas were starved"
    );
    let error = (admitted as f64 - expected).abs() / expected;
    assert!(
        error <= 0.05,
        "fleet admitted {admitted} ({slots_full} more refused for slots, their cells given \
         back), one bucket of {tps} TPS admits {expected:.0} of these sends (±5%); per replica \
         {per_replica:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_admits_100_tps_plus_burst_over_three_replicas() {
    fleet_wide_rate(100, 300.0, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_admits_1000_tps_plus_burst_over_three_replicas() {
    // Offered at 2000 TPS, not 3000: on this 2-core machine (debug build, three replicas,
    // Redis, the generator and the mock on the same cores) 3000 TPS kept the generator on
    // schedule only while nothing else ran (lag p99 5 ms, admitted exact); with another
    // session's benchmark running beside it the generator fell 0.1-1.2 s behind (lag p99
    // 98 ms to 1.24 s) and the starved replicas answered in up to 0.9 s. 2000 TPS kept lag p99
    // at 6 ms under the same neighbour, and is still twice the limit on every replica.
    // 1500 TPS since the machine became a slower one (Intel Xeon 2.5 GHz): a clean-clone CI
    // run with nothing beside it had the generator 0.43 s behind (lag p99) at 2000 TPS, store
    // calls timing out and replicas' slots full; 1.5 times the limit still keeps every
    // replica over its share throughout.
    fleet_wide_rate(1000, 1500.0, 10).await;
}

/// Sample `backend.current()` every millisecond until `stop`; the highest value seen.
fn sample_current(
    backend: &std::sync::Arc<Mock>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let backend = std::sync::Arc::clone(backend);
    tokio::spawn(async move {
        let mut highest = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            highest = highest.max(backend.current());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        highest
    })
}

/// 90 closed-loop clients spread over `targets` for `for_`: the backend's peak so far and the
/// most it was seen serving at once during this load, with every status the clients got.
async fn saturate(
    backend: &std::sync::Arc<Mock>,
    targets: &[SocketAddr],
    for_: Duration,
) -> (usize, usize, Vec<u16>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let per_target: Vec<usize> = (0..targets.len())
        .map(|i| 90 / targets.len() + usize::from(i < 90 % targets.len()))
        .collect();
    let clients = closed_loop(targets, &per_target, Arc::clone(&stop));
    let sampler = sample_current(backend, Arc::clone(&stop));
    tokio::time::sleep(for_).await;
    stop.store(true, Ordering::SeqCst);
    let statuses = clients.await.unwrap();
    let seen = sampler.await.unwrap();
    (backend.peak(), seen, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_of_20_holds_for_the_fleet_and_returns_to_the_survivors() {
    let _serial = one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend = std::sync::Arc::new(mock().hold(Duration::from_millis(100)).start().await);
    // Queued rather than refused: every replica keeps its share of the cap busy.
    let services = service(
        &[backend.url()],
        "max_concurrent = 20\nqueue_size = 100\nqueue_timeout = \"10s\"",
    );
    let mut replicas = start_fleet(&redis.url(), &IDS, "local", &services).await;
    let mut shares = Vec::new();
    for replica in &replicas {
        let capacity = replica.capacity().await;
        assert_eq!(
            capacity["services"][0]["endpoints"][0]["max_concurrent"],
            20
        );
        shares.push(replica.local_cap().await);
    }
    assert_eq!(shares.iter().sum::<u64>(), 20, "shares {shares:?}");
    assert!(
        shares.iter().all(|&s| s == 6 || s == 7),
        "shares {shares:?}"
    );

    // 90 clients, 30 per replica.
    let (peak, seen, statuses) =
        saturate(&backend, &addrs(&replicas), Duration::from_secs(2)).await;
    eprintln!(
        "cap 20, three replicas (shares {shares:?}): backend peak {peak}, seen {seen}, \
         {} answers",
        statuses.len()
    );
    assert!(peak <= 20, "the backend served {peak} at once (cap 20)");
    assert!(
        seen >= 19,
        "the backend never got near its cap: at most {seen} at once"
    );
    assert!(statuses.iter().all(|&s| s == 200), "statuses: {statuses:?}");

    // Kill replica c like a crash: its share stays reserved until its stamp is 3 heartbeats
    // old, then returns to a and b.
    let stamp_ms: u64 = redis
        .command(&["ZSCORE", "sluice:replicas", "c"])
        .parse()
        .expect("c's heartbeat stamp");
    let mut c = replicas.pop().unwrap();
    let killed = tokio::time::Instant::now();
    c.kill();
    let survivors: Vec<&Replica> = replicas.iter().collect();
    let (a, b) = (survivors[0], survivors[1]);
    loop {
        let (sa, sb) = (a.store().await, b.store().await);
        let (ca, cb) = (a.local_cap().await, b.local_cap().await);
        assert!(ca + cb <= 20, "survivors hold {ca} + {cb} slots of 20");
        if sa["replicas"] == 2 && sb["replicas"] == 2 && ca + cb == 20 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the survivors still count c: {sa} {sb} ({ca} + {cb} slots)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let regained = killed.elapsed();
    let redis_now_ms: u64 = {
        let time = redis.command(&["TIME"]);
        let mut parts = time.lines().map(|p| p.parse::<u64>().unwrap());
        parts.next().unwrap() * 1000 + parts.next().unwrap() / 1000
    };
    eprintln!(
        "c killed: survivors share all 20 after {regained:?} (c's last stamp was {} ms old \
         when the survivors were seen sharing)",
        redis_now_ms - stamp_ms
    );
    let ttl = HEARTBEAT * 3;
    assert!(
        redis_now_ms >= stamp_ms + ttl.as_millis() as u64,
        "c's share came back before its stamp was 3 heartbeats old"
    );
    assert!(
        regained <= ttl + HEARTBEAT * 2 + Duration::from_millis(1000),
        "the survivors took {regained:?} to take c's share (3 heartbeats = {ttl:?})"
    );
    assert_eq!((a.local_cap().await, b.local_cap().await), (10, 10));

    // 90 clients over the two survivors: still at most 20, and all 20 in use.
    let (peak, seen, statuses) =
        saturate(&backend, &addrs(&replicas), Duration::from_secs(2)).await;
    eprintln!("cap 20, two replicas: backend peak {peak}, seen {seen}");
    assert!(peak <= 20, "the backend served {peak} at once (cap 20)");
    assert_eq!(seen, 20, "the two survivors did not use the whole cap");
    assert!(statuses.iter().all(|&s| s == 200), "statuses: {statuses:?}");
}

/// Poll `replica` until `probe` of its capacity view holds; how long that took.
async fn until(
    replica: &Replica,
    limit: Duration,
    what: &str,
    probe: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        let capacity = replica.capacity().await;
        if probe(&capacity) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "replica {}: not within {limit:?}: {what}; capacity {capacity}",
            replica.id
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An endpoint added through one replica's admin API (issue 16) is the whole fleet's: every
/// replica sends it requests, their shares of its cap add up to its cap, and each records it
/// joining as an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_on_one_replica_is_used_by_every_replica_with_its_cap_shared() {
    let _serial = one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (first, added) = (mock().start().await, mock().start().await);
    let services = rated_service(&first.url(), "max_concurrent = 20", 1000, 1000);
    let replicas = start_fleet(&redis.url(), &IDS, "local", &services).await;
    let body = format!(r#"{{"url": "{}", "max_concurrent": 10}}"#, added.url());
    let answer = replicas[1]
        .call("POST", "/admin/services/scoring/endpoints", &body)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    for replica in &replicas {
        until(
            replica,
            Duration::from_secs(1),
            "the added endpoint",
            |cap| cap["services"][0]["endpoints"][1]["url"] == added.url(),
        )
        .await;
    }
    let client = pool();
    for replica in &replicas {
        let before = added.requests();
        // 30 in a row all to the first of two equal endpoints: 2^-30.
        for _ in 0..30 {
            let mut req = get(replica.addr, "/score");
            req.headers_mut()
                .insert("x-api-key", "key-a".parse().unwrap());
            assert_eq!(send(&client, req).await.status, 200);
        }
        assert!(
            added.requests() > before,
            "replica {} never used it",
            replica.id
        );
    }
    let mut shares = Vec::new();
    for replica in &replicas {
        let capacity = replica.capacity().await;
        let endpoint = &capacity["services"][0]["endpoints"][1];
        assert_eq!(endpoint["max_concurrent"], 10, "{}", replica.id);
        shares.push(endpoint["local_max_concurrent"].as_u64().unwrap());
        let events = replica
            .call("GET", "/admin/autoscale/events", "")
            .await
            .json();
        let joined = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "endpoint_added" && e["endpoint"] == added.url())
            .count();
        assert_eq!(joined, 1, "replica {}: {events}", replica.id);
    }
    assert_eq!(shares.iter().sum::<u64>(), 10, "shares {shares:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_find_a_names_endpoints_in_dns_split_each_cap_exactly() {
    let _serial = one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let Some(dns) = support::dns::Dnsmasq::start() else {
        return;
    };
    let hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
    let listener = tokio::net::TcpListener::bind((hosts[0], 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut listeners = vec![listener];
    for host in &hosts[1..] {
        match tokio::net::TcpListener::bind((*host, port)).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("skipped: port {port} is taken on {host}: {e}");
                return;
            }
        }
    }
    let _endpoints: Vec<Mock> = listeners.into_iter().map(|l| mock().start_on(l)).collect();
    let record = |h: &str| (h.parse().unwrap(), "scoring.test");
    dns.set(&[record(hosts[0]), record(hosts[1]), record(hosts[2])]);
    // A cap of 10 over 3 replicas: 4 + 3 + 3, the 4 at a different replica per endpoint.
    let entry =
        format!("{{ url = \"http://scoring.test:{port}\", resolve = true, max_concurrent = 10 }}");
    let services = format!(
        "[resolver]\nnameservers = [\"{}\"]\nmin_ttl = \"1s\"\nmax_ttl = \"1s\"\n\n{}",
        dns.addr(),
        rated_service("DNS-ENTRY", "", 1000, 1000).replace("\"DNS-ENTRY\"", &entry)
    );
    let replicas = start_fleet(&redis.url(), &IDS, "local", &services).await;
    for found in [3, 4] {
        if found == 4 {
            dns.set(&hosts.map(record));
        }
        // Every replica finds them, in the same (address) order, and the parts of each cap add
        // up to it exactly.
        let mut views = Vec::new();
        for replica in &replicas {
            let count =
                |cap: &serde_json::Value| cap["services"][0]["endpoints"].as_array().unwrap().len();
            until(replica, DEADLINE, "the endpoints found", |cap| {
                count(cap) == found
            })
            .await;
            views.push(replica.capacity().await["services"][0]["endpoints"].clone());
        }
        for i in 0..found {
            let url = &views[0][i]["url"];
            assert_eq!(*url, format!("http://{}:{port}", hosts[i]), "{views:?}");
            let parts: Vec<u64> = views
                .iter()
                .map(|v| {
                    assert_eq!(
                        v[i]["url"], *url,
                        "replicas order endpoints alike: {views:?}"
                    );
                    assert_eq!(v[i]["source"], "dns:scoring.test");
                    v[i]["local_max_concurrent"].as_u64().unwrap()
                })
                .collect();
            assert_eq!(parts.iter().sum::<u64>(), 10, "{url}: parts {parts:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_on_one_replica_reaches_the_others_within_a_second() {
    let _serial = one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend = mock().start().await;
    let services = rated_service(&backend.url(), "max_concurrent = 20", 10, 10);
    let replicas = start_fleet(&redis.url(), &IDS, "local", &services).await;
    let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);
    let version = a.store().await["policy_version"].clone();
    for replica in [b, c] {
        assert_eq!(replica.store().await["policy_version"], version);
        assert_eq!(replica.limit_tps("team-a").await, 10);
    }

    // A valid change on a: b and c apply it within 1 s of a's answer.
    let answer = a
        .call(
            "PUT",
            "/admin/services/scoring/resources/team-a",
            r#"{"tps": 50}"#,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let changed = tokio::time::Instant::now();
    assert_eq!(a.limit_tps("team-a").await, 50);
    let mut took = Vec::new();
    for replica in [b, c] {
        until(replica, Duration::from_secs(1), "limit_tps 50", |cap| {
            resource_view(cap, "team-a")["limit_tps"] == 50
        })
        .await;
        took.push(changed.elapsed());
    }
    let version = a.store().await["policy_version"].as_u64().unwrap();
    for replica in [b, c] {
        assert_eq!(replica.store().await["policy_version"], version);
    }
    // Clients of b see the new limit (the adopted policy still knows the key).
    let client = pool();
    let mut req = get(b.addr, "/score");
    req.headers_mut()
        .insert("x-api-key", "key-a".parse().unwrap());
    let answer = send(&client, req).await;
    assert_eq!(answer.status, 200);
    // The change raised the rate; the configured burst of 10 stays, stated as its own item.
    assert_eq!(
        answer.header("ratelimit-policy"),
        Some("\"tps\";q=50;w=1, \"burst\";q=10;w=1")
    );

    // A cap change on b reaches a and c too, and their shares add up to the new cap.
    let answer = b
        .call(
            "PATCH",
            "/admin/services/scoring",
            r#"{"max_concurrent": 30}"#,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let patched = tokio::time::Instant::now();
    let mut shares = Vec::new();
    for replica in [a, c] {
        until(
            replica,
            Duration::from_secs(1),
            "max_concurrent 30",
            |cap| cap["services"][0]["endpoints"][0]["max_concurrent"] == 30,
        )
        .await;
    }
    let cap_took = patched.elapsed();
    for replica in [a, b, c] {
        shares.push(replica.local_cap().await);
    }
    assert_eq!(shares.iter().sum::<u64>(), 30, "shares {shares:?}");
    eprintln!("tps change seen on b, c after {took:?}; cap change on a, c after {cap_took:?}");

    // An invalid change on a is refused there and changes nothing anywhere.
    let version = a.store().await["policy_version"].as_u64().unwrap();
    let stored = redis.command(&["GET", "sluice:policy:version"]);
    let answer = a
        .call(
            "PUT",
            "/admin/services/scoring/resources/team-a",
            r#"{"tps": 0}"#,
        )
        .await;
    assert!(
        answer.status.is_client_error(),
        "tps 0 answered {}: {}",
        answer.status,
        answer.text()
    );
    // Longer than a policy poll and a heartbeat: a change would have arrived by now.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(redis.command(&["GET", "sluice:policy:version"]), stored);
    for replica in [a, b, c] {
        let capacity = replica.capacity().await;
        assert_eq!(
            capacity["store"]["policy_version"], version,
            "{}",
            replica.id
        );
        assert_eq!(
            resource_view(&capacity, "team-a")["limit_tps"],
            50,
            "{}",
            replica.id
        );
        assert_eq!(
            capacity["services"][0]["endpoints"][0]["max_concurrent"],
            30
        );
    }
}

/// team-a's scale events on `replica`, oldest first: (when, from, to, taken here by a rule).
async fn scale_events(replica: &Replica) -> Vec<(chrono::DateTime<chrono::Utc>, u64, u64, bool)> {
    let answer = replica
        .call(
            "GET",
            "/admin/autoscale/events?service=scoring&resource=team-a",
            "",
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let mut events: Vec<_> = answer.json()["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "scale_up")
        .map(|e| {
            let at = chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap())
                .unwrap()
                .with_timezone(&chrono::Utc);
            let own = e["rule"].is_string();
            if !own {
                assert_eq!(
                    e["reason"], "step taken by the fleet's autoscale leader",
                    "{e}"
                );
            }
            (
                at,
                e["from"].as_u64().unwrap(),
                e["to"].as_u64().unwrap(),
                own,
            )
        })
        .collect();
    events.sort_by_key(|e| e.0);
    events
}

/// Which of `replicas` (those `live`) say they lead; panics if more than one does.
async fn leader(replicas: &[Replica], live: &[bool]) -> Option<usize> {
    let mut leaders = Vec::new();
    for (i, replica) in replicas.iter().enumerate() {
        if live[i] && replica.store().await["leader"] == true {
            leaders.push(i);
        }
    }
    assert!(leaders.len() <= 1, "several leaders at once: {leaders:?}");
    leaders.first().copied()
}

/// team-a at 10 TPS with autoscale every 2 s by a rule that doubles the limit while it was
/// throttled in the last second.
fn autoscaled_service(url: &str) -> String {
    format!(
        "{}\n[service.rate_limit]\ndefault_tps = 10\n\n[[service.resource]]\nname = \"team-a\"\n\
         key = \"key-a\"\ntps = 10\nautoscale = true\n\n[service.autoscale]\ninterval = \"2s\"\n\
         [[service.autoscale.profile]]\nname = \"fast\"\n{DOUBLE_WHILE_THROTTLED}",
        service(&[url.to_owned()], "max_concurrent = 200")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscale_steps_once_per_interval_for_the_fleet_and_outlives_its_leader() {
    let _serial = one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend = mock().start().await;
    let interval = Duration::from_secs(2);
    let services = autoscaled_service(&backend.url());
    let replicas = start_fleet(&redis.url(), &IDS, "local", &services).await;
    let mut live = [true; 3];
    let started = tokio::time::Instant::now();
    let first = loop {
        if let Some(i) = leader(&replicas, &live).await {
            break i;
        }
        assert!(started.elapsed() < DEADLINE, "no replica leads autoscaling");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // 150 TPS against 10 TPS, throttled until the limit passes 150 (10 → 20 → 40 → 80 →
    // 160), sent to the two other replicas only: the leader sees no traffic of its own and
    // steps on the fleet's metrics.
    let targets = Targets::new(addrs(&replicas));
    targets.drop_target(first);
    let load = open_loop(targets.clone(), "key-a", 150.0, None);
    let mut seen: Vec<Vec<(Duration, u64)>> = vec![Vec::new(); 3];
    let mut killed = None;
    let mut killed_at = None;
    let mut old_steps = Vec::new();
    let mut second = None;
    loop {
        for (i, replica) in replicas.iter().enumerate() {
            if !live[i] {
                continue;
            }
            let limit = replica.limit_tps("team-a").await;
            if seen[i].last().map(|&(_, l)| l) != Some(limit) {
                seen[i].push((started.elapsed(), limit));
            }
        }
        let limits: Vec<u64> = (0..3)
            .filter(|&i| live[i])
            .map(|i| seen[i].last().unwrap().1)
            .collect();
        match killed {
            // Two steps taken by the first leader: kill it (its events first).
            None if seen[first].last().unwrap().1 >= 40 => {
                old_steps = scale_events(&replicas[first]).await;
                replicas[first].kill_in_place();
                live[first] = false;
                killed = Some(tokio::time::Instant::now());
                killed_at = Some(chrono::Utc::now());
            }
            Some(at) if second.is_none() => {
                if let Some(i) = leader(&replicas, &live).await {
                    second = Some((i, at.elapsed()));
                }
            }
            // Two more steps, by the new leader.
            Some(_) if limits.iter().all(|&l| l >= 160) => break,
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "the limit stopped doubling: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shots = load.stop().await;
    let (new, takeover) = second.expect("a new leader");
    let new_steps = scale_events(&replicas[new]).await;
    eprintln!(
        "autoscale: first leader {} steps {old_steps:?}; killed; {} leads after {takeover:?}, \
         its events {new_steps:?}; limits seen {seen:?}; {} requests",
        IDS[first],
        IDS[new],
        shots.len()
    );

    // Every replica saw the limit double one step at a time: never two steps at once.
    for (i, changes) in seen.iter().enumerate() {
        let values: Vec<u64> = changes.iter().map(|&(_, l)| l).collect();
        assert_eq!(values[0], 10, "replica {}: {changes:?}", IDS[i]);
        for pair in values.windows(2) {
            assert_eq!(pair[1], pair[0] * 2, "replica {}: {changes:?}", IDS[i]);
        }
    }
    // The first leader took the first two steps itself, an interval apart.
    let own: Vec<_> = old_steps.iter().filter(|e| e.3).collect();
    let values: Vec<(u64, u64)> = own.iter().map(|e| (e.1, e.2)).collect();
    assert_eq!(
        values,
        [(10, 20), (20, 40)],
        "first leader's steps {old_steps:?}"
    );
    // The dead leader was replaced within one interval, by a single replica.
    assert!(
        takeover <= interval,
        "a new leader took {takeover:?} (lease: 3 heartbeats = {:?})",
        HEARTBEAT * 3
    );
    // The new leader took the next steps itself, each at least an interval after the one
    // before (whoever took it) and at most about one interval late (the loop looks every
    // second). Across the leader change, add what this run measured: how long after the
    // first leader's last step the test killed it (it looks every 100 ms, slower on a busy
    // machine) and how long the takeover took. That it continues from the value the first
    // leader reached is `a_new_leader_takes_the_step_after_the_last_published_one`'s
    // business (it depends on when the survivors last looked).
    let killed_at = killed_at.expect("the first leader was killed");
    let taken: Vec<_> = new_steps.iter().filter(|e| e.3).copied().collect();
    assert!(
        taken.len() >= 2 && taken.last().map(|e| e.2) == Some(160),
        "new leader's events {new_steps:?}"
    );
    let mut chain: Vec<_> = own.iter().map(|e| **e).chain(taken).collect();
    chain.sort_by_key(|e| e.0);
    for pair in chain.windows(2) {
        let gap = (pair[1].0 - pair[0].0).to_std().unwrap();
        let change = if pair[0].0 <= killed_at && killed_at <= pair[1].0 {
            (killed_at - pair[0].0).to_std().unwrap() + takeover
        } else {
            Duration::ZERO
        };
        // A step is due by Redis's clock (kept in whole ms) and stamped by the replica's when
        // it is applied, after the store call: two stamps may be closer than the interval by
        // the difference of those delays (1.2 ms seen under load). 50 ms, well under any
        // second step in one interval, covers a busy machine.
        assert!(
            gap >= interval - Duration::from_millis(50)
                && gap <= interval * 2 + Duration::from_secs(1) + change,
            "two steps {gap:?} apart (interval {interval:?}, leader change {change:?}): \
             {chain:?}"
        );
    }
    // The other survivor only followed.
    let other = (0..3).find(|&i| live[i] && i != new).unwrap();
    let events = scale_events(&replicas[other]).await;
    assert!(
        events.iter().all(|e| !e.3),
        "{} stepped too: {events:?}",
        IDS[other]
    );
}

/// `fallbacks_total` and `errors_total` of a replica's store standing.
fn store_counts(store: &serde_json::Value) -> (u64, u64) {
    let count = |name: &str| {
        store[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in {store}"))
    };
    (count("fallbacks_total"), count("errors_total"))
}

/// What a fleet did around a Redis outage under load (times from the start of the load).
struct Outage {
    shots: Vec<Shot>,
    /// Redis was killed at this moment.
    stopped: Duration,
    /// Every replica said the store was down by then.
    all_down: Duration,
    /// Redis answered again (empty, like a restart without persistence) from then on.
    back: Duration,
    /// Every replica said the store was up again by then.
    all_up: Duration,
    /// `/readyz` of each replica while Redis was down.
    readiness: Vec<(u16, serde_json::Value)>,
    /// `sluice_store_up` of each replica while Redis was down.
    store_up: Vec<f64>,
    /// (`fallbacks_total`, `errors_total`) of each replica half a second after all were
    /// up, and at the end.
    fallbacks: Vec<((u64, u64), (u64, u64))>,
    /// `/readyz` of each replica at the end.
    recovered: Vec<(u16, serde_json::Value)>,
    /// How long sluice took over its slowest own answer before Redis was killed, and after.
    own: (Duration, Duration),
    /// How late a timer fired on this machine meanwhile (see [`TimerProbe`]).
    timer_late: Duration,
}

/// How long sluice itself took over the answers it gave without an endpoint (access lines
/// with a `reason`: refused for rate, or by `on_error`), every replica together: the slowest
/// logged before `fault` (wall clock) and the slowest logged from then on. sluice's own
/// account, store calls included, without the time the test's generator and mock take to be
/// scheduled (on a busy machine the clients' slowest request varies by hundreds of ms from
/// one second to the next whatever sluice does).
fn own_answers_slowest(
    replicas: &[Replica],
    fault: chrono::DateTime<chrono::Utc>,
) -> (Duration, Duration) {
    let (mut before, mut after) = (Duration::ZERO, Duration::ZERO);
    for replica in replicas {
        for line in replica.logged_access() {
            if !line["reason"].is_string() {
                continue;
            }
            let (Some(at), Some(ms)) = (line["timestamp"].as_str(), line["latency_ms"].as_f64())
            else {
                panic!("an access line without timestamp or latency: {line}");
            };
            let at = chrono::DateTime::parse_from_rfc3339(at).expect("RFC 3339 timestamp");
            let took = Duration::from_secs_f64(ms / 1000.0);
            let slowest = if at < fault { &mut before } else { &mut after };
            *slowest = (*slowest).max(took);
        }
    }
    (before, after)
}

/// The longest sluice may take over an answer of its own once the store fails: the store
/// timeout, plus how late a timer fired on this machine in this run (see [`TimerProbe`]; at
/// least [`TIMER_LATENESS`]), on top of twice the slowest it took before the fault in this
/// run (its own scheduling on this machine; doubled because the slowest of a few hundred
/// answers varies that much between seconds of a busy machine). A call that waited on the
/// store beyond the timeout would take the whole fault (1.5 s or more) or a reconnect (250 ms
/// or more).
fn own_latency_bound(before: Duration, timer_late: Duration) -> Duration {
    STORE_TIMEOUT + timer_late.max(TIMER_LATENESS) + before * 2
}

/// Measures how late a store-timeout-long tokio timer fires on this machine while a test
/// runs: a runtime of its own on its own thread, like a replica's, sleeping `STORE_TIMEOUT`
/// over and over. On a busy machine a replica's timeout fires late by as much (a CI run under
/// load: a 50 ms timeout answered after 54.3 ms, 2.1 ms over the fixed allowance).
struct TimerProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Duration>,
}

impl TimerProbe {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime for the timer probe");
            runtime.block_on(async move {
                let mut latest = Duration::ZERO;
                while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    let asked = std::time::Instant::now();
                    tokio::time::sleep(STORE_TIMEOUT).await;
                    latest = latest.max(asked.elapsed().saturating_sub(STORE_TIMEOUT));
                }
                latest
            })
        });
        TimerProbe { stop, thread }
    }

    /// The latest any of its timers fired.
    fn stop(self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the timer probe ran")
    }
}

/// How late a tokio deadline may fire on an idle runtime: it is rounded up to the timer's next
/// millisecond tick, and the driver's wait for that tick is rounded up to a whole millisecond
/// again (200 50-ms timeouts on this 2-core machine, idle: p50 1.3 ms late, p99 1.6 ms).
const TIMER_LATENESS: Duration = Duration::from_millis(2);

/// The limit of the outage tests: 90 TPS, burst 90 (a third is 30 and 30).
const OUTAGE_TPS: u32 = 90;

/// Three replicas with `on_error`, one resource at 90 TPS (burst 90), an open-loop load of
/// 270 TPS spread over them: 1.5 s with Redis, 2.5 s without (killed), then Redis again
/// (empty) until 2 s after every replica is back on it.
async fn outage(redis: &mut RedisServer, on_error: &str) -> Outage {
    let backend = mock().start().await;
    let services = rated_service(
        &backend.url(),
        "max_concurrent = 200",
        OUTAGE_TPS,
        OUTAGE_TPS,
    );
    let replicas = start_fleet(&redis.url(), &IDS, on_error, &services).await;
    let probe = TimerProbe::start();
    let load = open_loop(Targets::new(addrs(&replicas)), "key-a", 270.0, None);
    let started = load.started;

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stopped = started.elapsed();
    let stopped_at = chrono::Utc::now();
    redis.stop();
    for replica in &replicas {
        until(replica, Duration::from_secs(2), "store down", |c| {
            c["store"]["up"] == false
        })
        .await;
    }
    let all_down = started.elapsed();
    tokio::time::sleep_until(started + stopped + Duration::from_millis(1500)).await;
    let mut readiness = Vec::new();
    let mut store_up = Vec::new();
    for replica in &replicas {
        readiness.push(replica.readyz().await);
        store_up.push(replica.metric("sluice_store_up").await);
    }
    tokio::time::sleep_until(started + stopped + Duration::from_millis(2500)).await;

    redis.start_again();
    let back = started.elapsed();
    for replica in &replicas {
        until(replica, Duration::from_secs(3), "store up again", |c| {
            c["store"]["up"] == true
        })
        .await;
    }
    let all_up = started.elapsed();
    tokio::time::sleep_until(started + all_up + Duration::from_millis(500)).await;
    let mut then = Vec::new();
    for replica in &replicas {
        let store = replica.store().await;
        then.push(store_counts(&store));
    }
    tokio::time::sleep_until(started + all_up + Duration::from_secs(2)).await;
    let shots = load.stop().await;
    let mut recovered = Vec::new();
    let mut fallbacks = Vec::new();
    for (i, replica) in replicas.iter().enumerate() {
        let end = store_counts(&replica.store().await);
        fallbacks.push((then[i], end));
        // Ready again: at once, or after the next heartbeat when a store call just timed out
        // on a busy machine (see `check_common`).
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut ready = replica.readyz().await;
        while ready.0 != 200 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            ready = replica.readyz().await;
        }
        recovered.push(ready);
    }
    let own = own_answers_slowest(&replicas, stopped_at);
    let timer_late = probe.stop();
    assert_eq!(
        backend.requests(),
        count(&shots, Shot::ok),
        "the backend saw exactly the admitted requests"
    );
    Outage {
        shots,
        stopped,
        all_down,
        back,
        all_up,
        readiness,
        store_up,
        fallbacks,
        recovered,
        own,
        timer_late,
    }
}

impl Outage {
    fn during(&self, from: Duration, to: Duration) -> impl Iterator<Item = &Shot> {
        self.shots
            .iter()
            .filter(move |s| s.sent >= from && s.sent < to)
    }

    /// Admitted per second from `from` to `to`, fleet-wide and per replica.
    fn admitted_rate(&self, from: Duration, to: Duration) -> (f64, Vec<f64>) {
        let secs = (to - from).as_secs_f64();
        let ok: Vec<&Shot> = self.during(from, to).filter(|s| s.ok()).collect();
        let per: Vec<f64> = (0..3)
            .map(|i| ok.iter().filter(|s| s.target == i).count() as f64 / secs)
            .collect();
        (ok.len() as f64 / secs, per)
    }

    /// The longest any request sent around the stop waited (from 200 ms before it to 1 s
    /// after), and the longest of the whole run.
    fn slowest(&self) -> (Duration, Duration) {
        let around = self
            .during(
                self.stopped.saturating_sub(Duration::from_millis(200)),
                self.stopped + Duration::from_secs(1),
            )
            .map(|s| s.latency)
            .max()
            .unwrap_or_default();
        let all = self
            .shots
            .iter()
            .map(|s| s.latency)
            .max()
            .unwrap_or_default();
        (around, all)
    }

    /// Checks common to every mode; returns a summary line.
    fn check_common(&self, mode: &str) -> String {
        let (around, all) = self.slowest();
        let mut latencies: Vec<Duration> = self.shots.iter().map(|s| s.latency).collect();
        let p99 = percentile(&mut latencies, 99);
        let statuses: std::collections::BTreeMap<u16, usize> =
            self.shots.iter().fold(Default::default(), |mut m, s| {
                *m.entry(s.status).or_default() += 1;
                m
            });
        let summary = format!(
            "{mode}: {} requests {statuses:?}; stop at {:?}, all down after {:?}, back at {:?}, \
             all up after {:?}; slowest around the stop {around:?}, overall {all:?}, p99 {p99:?}; \
             readiness {:?}; (fallbacks, store errors) {:?}; sluice's slowest own answer \
             before the stop {:?}, after {:?}",
            self.shots.len(),
            self.stopped,
            self.all_down - self.stopped,
            self.back,
            self.all_up - self.back,
            self.readiness,
            self.fallbacks,
            self.own.0,
            self.own.1
        );
        eprintln!("{summary}");
        for (name, from, to) in [
            ("before the stop", Duration::ZERO, self.stopped),
            ("stop to back", self.stopped, self.back),
            (
                "first second after back",
                self.back,
                self.back + Duration::from_secs(1),
            ),
            ("later", self.back + Duration::from_secs(1), Duration::MAX),
        ] {
            let answers: std::collections::BTreeMap<(u16, Option<String>, usize), usize> =
                self.during(from, to).fold(Default::default(), |mut m, s| {
                    *m.entry((s.status, s.reason.clone(), s.target)).or_default() += 1;
                    m
                });
            eprintln!("{mode} {name}: {answers:?}");
        }
        // Every request got an answer from sluice, whatever the store did.
        assert!(self.shots.iter().all(|s| s.status != 0), "{summary}");
        // No answer waited on the dead store longer than the timeout, by sluice's own
        // account beside what it took before (see `own_latency_bound`); and no client waited
        // for Redis to come back.
        let (before, after) = self.own;
        let bound = own_latency_bound(before, self.timer_late);
        assert!(
            after <= bound,
            "sluice took {after:?} over an answer of its own after the stop (at most \
             {before:?} before it, timers up to {:?} late, bound {bound:?}): {summary}",
            self.timer_late
        );
        let outage = self.back - self.stopped;
        assert!(
            around < outage && all < outage,
            "a request waited {all:?} (outage {outage:?}): {summary}"
        );
        // The fleet noticed at once, and came back within a few heartbeats.
        assert!(
            self.all_down - self.stopped <= Duration::from_secs(1),
            "{summary}"
        );
        assert!(self.all_up - self.back <= HEARTBEAT * 5, "{summary}");
        assert!(self.store_up.iter().all(|&v| v == 0.0), "{summary}");
        // Back on shared limits: nothing decided by on_error any more, ready again.
        // A replica whose store call timed out meanwhile (it says so in `errors_total`: a
        // healthy Redis can take longer than the 50 ms timeout to be scheduled on a busy
        // machine) applied on_error for it, as it should.
        let timed_out: Vec<bool> = self
            .fallbacks
            .iter()
            .map(|&((_, errors), (_, later))| later > errors)
            .collect();
        for (i, &((then, _), (end, _))) in self.fallbacks.iter().enumerate() {
            assert!(
                then == end || timed_out[i],
                "fallbacks after recovery without a store error: {summary}"
            );
        }
        for (status, body) in &self.recovered {
            assert_eq!(
                (*status, body["status"].as_str()),
                (200, Some("ready")),
                "{summary}"
            );
        }
        // Until Redis went away, nothing was refused for slots (the cap of 200 is far above
        // what is ever in flight). What happens to slots when it returns is
        // `replicas_stay_members_when_redis_hangs_or_restarts`'s business.
        for shot in self.during(Duration::ZERO, self.back) {
            assert_ne!(
                shot.reason.as_deref(),
                Some("endpoints_full"),
                "{shot:?}: {summary}"
            );
        }
        // Shared limits resume within a few heartbeats of every replica reaching the store
        // again: from then on, admitted or refused for rate, and nothing decided by on_error.
        for shot in self.during(self.all_up + HEARTBEAT * 5, Duration::MAX) {
            assert!(
                shot.ok()
                    || shot.reason.as_deref() == Some("rate_limited")
                    || timed_out[shot.target],
                "{shot:?} after recovery: {summary}"
            );
        }
        summary
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_on_error_local_each_replica_enforces_a_third() {
    let _serial = one_at_a_time().await;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let run = outage(&mut redis, "local").await;
    let tps = f64::from(OUTAGE_TPS);
    // Without the store, each replica enforces its third: 30 TPS each.
    let (fleet, per) = run.admitted_rate(run.stopped + Duration::from_secs(1), run.back);
    // And no burst when the store goes away: each replica's local bucket has mirrored what
    // it admitted through the store, so it takes over where the fleet's bucket stood (under
    // this load, empty). Bound: the rate plus 25 % for timing, plus the cells replicas still
    // held in their leases (at most burst / (4 × replicas) each): 137; measured 118. A full
    // local bucket lets each replica's third of the burst through on top (measured 176).
    let first_second_down = run
        .during(run.stopped, run.stopped + Duration::from_secs(1))
        .filter(|s| s.ok())
        .count();
    let down_bound = tps * 1.25 + 3.0 * (tps / 12.0).ceil();
    eprintln!(
        "local: first second without Redis admitted {first_second_down} (bound {down_bound:.0})"
    );
    eprintln!("local: without Redis the fleet admitted {fleet:.1}/s, per replica {per:.1?}");
    // Back on the store (empty after the restart): no burst above the limit. A fresh bucket
    // would let the whole burst (90) through on top of the rate; the replicas carry their
    // local usage into it, so the first second admits about the rate, plus what replicas not
    // yet back on the store admit locally until their next heartbeat (at most 2 heartbeats
    // of their thirds), plus 10%.
    let first_second = run
        .during(run.back, run.back + Duration::from_secs(1))
        .filter(|s| s.ok())
        .count();
    let bound = (tps + tps * 2.0 * HEARTBEAT.as_secs_f64()) * 1.1;
    let (after, _) = run.admitted_rate(
        run.all_up + Duration::from_millis(500),
        run.all_up + Duration::from_secs(2),
    );
    eprintln!(
        "local: first second after Redis came back admitted {first_second} (bound {bound:.0}), \
         then {after:.1}/s"
    );
    let summary = run.check_common("local");
    for (status, body) in &run.readiness {
        assert_eq!(
            (*status, body["status"].as_str()),
            (200, Some("degraded")),
            "{summary}"
        );
    }
    // Answered throughout the outage: admitted or refused for rate.
    for shot in run.during(Duration::ZERO, run.back) {
        assert!(
            shot.ok() || (shot.status == 429 && shot.reason.as_deref() == Some("rate_limited")),
            "{shot:?}"
        );
    }
    for rate in &per {
        assert!(
            (rate - tps / 3.0).abs() <= tps / 3.0 * 0.2,
            "per replica {per:?}"
        );
    }
    assert!(
        (first_second as f64) <= bound,
        "{first_second} > {bound}: {summary}"
    );
    assert!(
        (first_second_down as f64) <= down_bound,
        "first second without Redis: {first_second_down} > {down_bound}: {summary}"
    );
    assert!(
        (after - tps).abs() <= tps * 0.15,
        "after recovery {after:.1}/s: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_on_error_allow_admits_everything() {
    let _serial = one_at_a_time().await;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let run = outage(&mut redis, "allow").await;
    let summary = run.check_common("allow");
    for (status, body) in &run.readiness {
        assert_eq!(
            (*status, body["status"].as_str()),
            (200, Some("degraded")),
            "{summary}"
        );
    }
    // Every replica fails open once its last lease is gone (at most 250 ms).
    let down: Vec<&Shot> = run
        .during(run.all_down + Duration::from_millis(300), run.back)
        .collect();
    assert!(!down.is_empty());
    assert!(
        down.iter().all(|s| s.ok()),
        "refused while failing open: {summary}"
    );
    // Shared limits again after recovery: refusals for rate, never anything else.
    let after: Vec<&Shot> = run
        .during(
            run.all_up + Duration::from_millis(500),
            run.all_up + Duration::from_secs(2),
        )
        .collect();
    assert!(
        after.iter().any(|s| s.status == 429),
        "no limit after recovery: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_on_error_deny_answers_503_store_unavailable() {
    let _serial = one_at_a_time().await;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let run = outage(&mut redis, "deny").await;
    let summary = run.check_common("deny");
    for (status, body) in &run.readiness {
        assert_eq!(
            (*status, body["status"].as_str()),
            (503, Some("not_ready")),
            "{summary}"
        );
    }
    let down: Vec<&Shot> = run
        .during(run.all_down + Duration::from_millis(300), run.back)
        .collect();
    assert!(!down.is_empty());
    for shot in &down {
        assert_eq!(
            (shot.status, shot.reason.as_deref()),
            (503, Some("store_unavailable")),
            "{shot:?}: {summary}"
        );
    }
    let after: Vec<&Shot> = run
        .during(
            run.all_up + Duration::from_millis(500),
            run.all_up + Duration::from_secs(2),
        )
        .collect();
    assert!(
        after.iter().any(|s| s.ok()),
        "nothing admitted after recovery: {summary}"
    );
    assert!(
        after.iter().any(|s| s.status == 429),
        "no limit after recovery: {summary}"
    );
}

/// Send `signal` ("STOP", "CONT") to the Redis server process.
fn signal_redis(redis: &RedisServer, signal: &str) {
    let pid = redis.pid().expect("redis-server runs");
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_holds_no_request_longer_than_the_timeout() {
    let _serial = one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend = mock().start().await;
    let services = rated_service(
        &backend.url(),
        "max_concurrent = 200",
        OUTAGE_TPS,
        OUTAGE_TPS,
    );
    let replicas = start_fleet(&redis.url(), &IDS, "local", &services).await;
    let probe = TimerProbe::start();
    let load = open_loop(Targets::new(addrs(&replicas)), "key-a", 270.0, None);
    let started = load.started;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Redis stops answering but keeps its connections open: every call runs into the timeout.
    let hung = started.elapsed();
    let hung_at = chrono::Utc::now();
    signal_redis(&redis, "STOP");
    for replica in &replicas {
        until(replica, Duration::from_secs(2), "store down", |c| {
            c["store"]["up"] == false
        })
        .await;
    }
    let all_down = started.elapsed();
    tokio::time::sleep_until(started + hung + Duration::from_millis(1500)).await;
    let mut readiness = Vec::new();
    for replica in &replicas {
        readiness.push(replica.readyz().await);
    }
    signal_redis(&redis, "CONT");
    let back = started.elapsed();
    for replica in &replicas {
        until(replica, Duration::from_secs(3), "store up again", |c| {
            c["store"]["up"] == true
        })
        .await;
    }
    let all_up = started.elapsed();
    tokio::time::sleep_until(started + all_up + Duration::from_millis(1500)).await;
    let shots = load.stop().await;
    let (own_before, own_after) = own_answers_slowest(&replicas, hung_at);
    let timer_late = probe.stop();

    let mut around: Vec<Duration> = shots
        .iter()
        .filter(|s| s.sent >= hung.saturating_sub(Duration::from_millis(200)) && s.sent < back)
        .map(|s| s.latency)
        .collect();
    let slowest = percentile(&mut around, 100);
    let p99 = percentile(&mut around, 99);
    let overall = shots.iter().map(|s| s.latency).max().unwrap();
    let answers: std::collections::BTreeMap<(u16, Option<String>), usize> =
        shots.iter().fold(Default::default(), |mut m, s| {
            *m.entry((s.status, s.reason.clone())).or_default() += 1;
            m
        });
    let summary = format!(
        "hung Redis at {hung:?}: all degraded after {:?}, resumed at {back:?}, all up after \
         {:?}; while hung slowest {slowest:?} p99 {p99:?}, overall slowest {overall:?}; \
         answers {answers:?}; readiness while hung {readiness:?}; sluice's slowest own \
         answer before {own_before:?}, since {own_after:?}",
        all_down - hung,
        all_up - back
    );
    eprintln!("{summary}");
    // The bound the issue sets: the timeout, on top of what sluice took over its own
    // answers before Redis hung in this run, by its own account (see `own_latency_bound`;
    // an answer that waited on Redis without the bound would wait the whole 1.5 s). And no
    // client waited as long as Redis hung.
    let bound = own_latency_bound(own_before, timer_late);
    assert!(
        own_after <= bound,
        "sluice took {own_after:?} over an answer of its own once Redis hung (at most \
         {own_before:?} before, timers up to {timer_late:?} late, bound {bound:?}): {summary}"
    );
    let hang = back - hung;
    assert!(
        slowest < hang && overall < hang,
        "a request waited {overall:?} (Redis hung {hang:?}): {summary}"
    );
    assert!(
        all_down - hung <= STORE_TIMEOUT + HEARTBEAT * 2,
        "{summary}"
    );
    for (status, body) in &readiness {
        assert_eq!(
            (*status, body["status"].as_str()),
            (200, Some("degraded")),
            "{summary}"
        );
    }
    // Answered while Redis hung, and once the replicas are back on it: admitted, or refused
    // for rate. (The moments right after it resumes are
    // `replicas_stay_members_when_redis_hangs_or_restarts`'s business.)
    let settled = all_up + HEARTBEAT * 5;
    for shot in shots.iter().filter(|s| s.sent < back || s.sent >= settled) {
        assert!(
            shot.ok() || (shot.status == 429 && shot.reason.as_deref() == Some("rate_limited")),
            "{shot:?}: {summary}"
        );
    }
    assert!(all_up - back <= HEARTBEAT * 5, "{summary}");
}

/// Sample `backend.current()` every millisecond until `stop`: every sample above `cap`, with
/// when it was taken (from the start of the sampling), and the highest value seen.
fn sample_over(
    backend: &std::sync::Arc<Mock>,
    cap: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<(Duration, usize)>, usize)> {
    let backend = std::sync::Arc::clone(backend);
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let (mut over, mut highest) = (Vec::new(), 0);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let now = backend.current();
            highest = highest.max(now);
            if now > cap {
                over.push((started.elapsed(), now));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (over, highest)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_stay_members_when_redis_hangs_or_restarts() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let _serial = one_at_a_time().await;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let backend = Arc::new(mock().hold(Duration::from_millis(100)).start().await);
    let services = service(
        &[backend.url()],
        "max_concurrent = 20\nqueue_size = 100\nqueue_timeout = \"10s\"",
    );
    let replicas = start_fleet(&redis.url(), &IDS, "local", &services).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = closed_loop(&addrs(&replicas), &[30, 30, 30], Arc::clone(&stop));
    let sampler = sample_over(&backend, 20, Arc::clone(&stop));
    let readiness = watch_readiness(
        replicas.iter().map(|r| r.admin).collect(),
        Arc::clone(&stop),
    );
    let started = tokio::time::Instant::now();
    let wait_up = || async {
        for replica in &replicas {
            until(replica, Duration::from_secs(3), "store up", |c| {
                c["store"]["up"] == true
            })
            .await;
        }
    };
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Redis hangs for longer than 3 heartbeats: every stamp is stale when it resumes.
    let hung = started.elapsed();
    signal_redis(&redis, "STOP");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signal_redis(&redis, "CONT");
    let resumed = started.elapsed();
    wait_up().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Redis restarts empty (no persistence): no stamps, no join times.
    let restarted = started.elapsed();
    redis.start_again();
    wait_up().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    stop.store(true, Ordering::SeqCst);
    let statuses = clients.await.unwrap();
    let (over, highest) = sampler.await.unwrap();
    let readiness = readiness.await.unwrap();
    let answers: std::collections::BTreeMap<u16, usize> =
        statuses.iter().fold(Default::default(), |mut m, &s| {
            *m.entry(s).or_default() += 1;
            m
        });
    let summary = format!(
        "hang at {hung:?}, resumed at {resumed:?}, restart at {restarted:?}; backend peak {} \
         (sampled {highest}), over the cap at {:?}; answers {answers:?}; readiness {readiness:?}",
        backend.peak(),
        over.iter().take(10).collect::<Vec<_>>()
    );
    eprintln!("{summary}");
    // Σ in flight over the replicas ≤ the cap, at every moment.
    assert!(backend.peak() <= 20, "{summary}");
    assert!(statuses.iter().all(|&s| s == 200), "{summary}");
    // A replica that was a member before stays one: it never tells the load balancer it is
    // "joining the fleet" (not ready) because Redis hung or lost its data.
    for (i, seen) in readiness.iter().enumerate() {
        assert!(
            seen.iter().all(|(_, status, _)| *status == 200),
            "replica {} not ready at some point: {summary}",
            IDS[i]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_error_deny_a_replica_cut_off_from_redis_gives_up_its_share_in_time() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let _serial = one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend = Arc::new(mock().hold(Duration::from_millis(100)).start().await);
    let services = service(
        &[backend.url()],
        "max_concurrent = 20\nqueue_size = 100\nqueue_timeout = \"10s\"",
    );
    // c reaches Redis through a gate; a and b directly. With on_error = "deny" the cap holds
    // through a partition (with "local" a cut-off replica keeps serving its share: docs/fleet.md).
    let gate = Gate::start(redis.addr()).await;
    let mut replicas = Vec::new();
    for (id, url) in [("a", redis.url()), ("b", redis.url()), ("c", gate.url())] {
        replicas.push(Replica::start(id, &replica_config(&url, id, "deny", &services)).await);
    }
    for replica in &replicas {
        replica.wait_ready().await;
    }
    wait_for_fleet(&replicas.iter().collect::<Vec<_>>(), 3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = closed_loop(&addrs(&replicas), &[30, 30, 30], Arc::clone(&stop));
    let sampler = sample_over(&backend, 20, Arc::clone(&stop));
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;

    // c loses Redis; a and b keep it. After 3 heartbeats a and b count c gone and take its
    // share; whatever c does meanwhile, the fleet must stay within the cap.
    let cut = started.elapsed();
    gate.cut();
    let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);
    until(a, Duration::from_secs(3), "a counts 2 replicas", |cap| {
        cap["store"]["replicas"] == 2
    })
    .await;
    until(b, Duration::from_secs(3), "b counts 2 replicas", |cap| {
        cap["store"]["replicas"] == 2
    })
    .await;
    let reclaimed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let shares = (
        a.local_cap().await,
        b.local_cap().await,
        c.local_cap().await,
    );
    let c_store = c.store().await;
    gate.restore();
    until(c, Duration::from_secs(3), "c back on the store", |cap| {
        cap["store"]["up"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let statuses = clients.await.unwrap();
    let (over, highest) = sampler.await.unwrap();
    let summary = format!(
        "c cut off at {cut:?}, a and b count 2 from {reclaimed:?}; then local caps a, b, c = \
         {shares:?}, c's store {c_store}; backend peak {} (sampled {highest}), over the cap \
         {} times, first {:?}; {} answers",
        backend.peak(),
        over.len(),
        over.first(),
        statuses.len()
    );
    eprintln!("{summary}");
    assert!(statuses.iter().all(|&s| s == 200), "{summary}");
    assert!(
        shares.0 + shares.1 + shares.2 <= 20,
        "the replicas' shares add up to more than the cap: {summary}"
    );
    assert!(backend.peak() <= 20, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_takes_the_step_after_the_last_published_one() {
    let _serial = one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend = mock().start().await;
    let services = autoscaled_service(&backend.url());
    // The shortest heartbeat: the lease of a dead leader (3 heartbeats) ends within 300 ms.
    let heartbeat = Duration::from_millis(100);
    let config = |id: &str| replica_config_with(&redis.url(), id, "local", heartbeat, &services);
    let a = Replica::start("a", &config("a")).await;
    let a_listening = tokio::time::Instant::now();
    a.wait_ready().await;
    assert_eq!(a.store().await["leader"], true, "the first replica leads");
    // b and c start 0.7 s later: their autoscale loops look at the fleet's steps about 0.8 s
    // after a takes them (every loop ticks once a second from its start).
    tokio::time::sleep_until(a_listening + Duration::from_millis(700)).await;
    let (config_b, config_c) = (config("b"), config("c"));
    let (b, c) = tokio::join!(
        Replica::start("b", &config_b),
        Replica::start("c", &config_c)
    );
    let replicas = [a, b, c];
    for replica in &replicas[1..] {
        replica.wait_ready().await;
    }
    wait_for_fleet(&replicas.iter().collect::<Vec<_>>(), 3).await;
    let targets = Targets::new(addrs(&replicas));
    let load = open_loop(targets.clone(), "key-a", 150.0, None);

    // a takes the first step (10 → 20) and dies at once, before b and c looked at it.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while replicas[0].limit_tps("team-a").await != 20 {
        assert!(tokio::time::Instant::now() < deadline, "a never stepped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = scale_events(&replicas[0]).await;
    replicas[0].kill_in_place();
    targets.drop_target(0);
    let killed = tokio::time::Instant::now();
    let live = [false, true, true];
    // The new leader takes the next step two seconds after a's: 20 → 40.
    let (new, step) = loop {
        if let Some(new) = leader(&replicas, &live).await {
            let own: Vec<_> = scale_events(&replicas[new])
                .await
                .into_iter()
                .filter(|e| e.3)
                .collect();
            if let Some(&step) = own.first() {
                break (new, step);
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(6),
            "no step after the leader died"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let shots = load.stop().await;
    let other = 3 - new;
    let followed = scale_events(&replicas[other]).await;
    let limits = (
        replicas[new].limit_tps("team-a").await,
        replicas[other].limit_tps("team-a").await,
    );
    let summary = format!(
        "a stepped {first:?} and died; {} leads and stepped {} → {} at {}; {} followed {followed:?}; \
         limits now {limits:?}; {} requests",
        IDS[new],
        step.1,
        step.2,
        step.0,
        IDS[other],
        shots.len()
    );
    eprintln!("{summary}");
    assert_eq!(
        (step.1, step.2),
        (20, 40),
        "the new leader repeated a step instead of taking the next: {summary}"
    );
    assert_eq!(limits, (40, 40), "{summary}");
}
