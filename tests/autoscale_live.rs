//! The autoscaler wired into the proxy: the real rate limiter, metric windows, interval loop
//! and event history, in virtual time (35 minutes in a moment) and over real sockets (the
//! notify webhook).

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use sluice::autoscale::{self, EventKind, EventQuery};
use sluice::balance::{Discovered, Found};
use sluice::config::{Config, Resolve, ValidConfig};
use sluice::control::notify::Notifier;
use sluice::limit::Admission;
use sluice::policy::Policy;
use sluice::proxy::Proxy;
use support::*;

const OVERLOADED: &str = r#"
[[service]]
name = "scoring"
max_concurrent = 20
endpoints = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
[service.rate_limit]
default_tps = 10
[[service.resource]]
name = "team-a"
key = "key-a"
tps = 10
autoscale = true
[[service.resource]]
name = "team-b"
key = "key-b"
tps = 10
"#;

/// Drive both resources above their limits, one virtual second at a time, for `minutes`
/// (team-b only until `b_stops_at` seconds); return the seconds at which team-a's limit
/// changed, with the new limit, and team-b's final limit.
async fn overload(proxy: &Proxy, minutes: u64, b_stops_at: u64) -> (Vec<(u64, u32)>, u32) {
    let mut headers = HeaderMap::new();
    let mut changes = Vec::new();
    let mut last = 10;
    for second in 0..minutes * 60 {
        let policy = proxy.policy();
        let limits = policy.services[0].rate.as_ref().unwrap();
        for key in ["key-a", "key-b"] {
            if key == "key-b" && second >= b_stops_at {
                continue;
            }
            let limit = limits.find(if key == "key-a" { "team-a" } else { "team-b" });
            let offered = limit.unwrap().limit().tps.get() + 10;
            headers.insert("x-api-key", key.parse().unwrap());
            for _ in 0..offered {
                // As the proxy does: an admission counts once its request has a slot.
                let at = tokio::time::Instant::now();
                if let Admission::Admitted { resource, .. } = limits.check(&headers, at) {
                    limits.confirm(resource, at);
                }
            }
        }
        let now = limits.find("team-a").unwrap().limit().tps.get();
        if now != last {
            changes.push((second, now));
            last = now;
        }
        // The autoscale loop ticks in this (auto-advanced) second too.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let team_b = proxy.policy().services[0]
        .rate
        .as_ref()
        .unwrap()
        .find("team-b")
        .unwrap()
        .limit()
        .tps
        .get();
    (changes, team_b)
}

/// A proxy for `config` (no listener: the tests call its limiter directly) with the autoscale
/// loop running.
fn start_autoscaling(
    config: &ValidConfig,
) -> (
    Arc<Proxy>,
    Arc<autoscale::EventHistory>,
    tokio::task::JoinHandle<()>,
) {
    let proxy = Proxy::new(
        Policy::from_config(config, None).unwrap(),
        Duration::from_secs(1),
        None,
    );
    let history = Arc::clone(proxy.live().events());
    let looping = tokio::spawn(sluice::control::autoscale::run(
        Arc::clone(proxy.live()),
        Notifier::default(),
        chrono::Utc::now,
    ));
    (proxy, history, looping)
}

#[tokio::test(start_paused = true)]
async fn sustained_overload_doubles_the_limit_every_five_minutes_up_to_1000() {
    let config = Config::parse(OVERLOADED).unwrap();
    let config = config.validated().unwrap();
    let (proxy, history, looping) = start_autoscaling(&config);

    let (changes, team_b) = overload(&proxy, 40, u64::MAX).await;
    looping.abort();

    let limits: Vec<u32> = changes.iter().map(|&(_, limit)| limit).collect();
    assert_eq!(
        limits,
        [20, 40, 80, 160, 320, 640, 1000],
        "changes: {changes:?}"
    );
    for (step, &(second, _)) in changes.iter().enumerate() {
        let due = 300 * (step as u64 + 1);
        assert!(
            (due..=due + 2).contains(&second),
            "step {} at {second} s, due at {due} s: {changes:?}",
            step + 1
        );
    }
    assert_eq!(team_b, 10, "team-b has autoscale off and stays at its base");
    let events = history.query(&EventQuery::default());
    assert_eq!(events.len(), 7, "{events:#?}");
    assert!(events
        .iter()
        .all(|e| e.kind == EventKind::ScaleUp && e.resource() == Some("team-a")));
    assert_eq!((events[6].from, events[6].to), (640, 1000));
}

#[tokio::test(start_paused = true)]
async fn a_busy_backend_defers_the_raise_and_looks_again_next_interval() {
    // One endpoint of 20 slots at 50 ms projects 400 TPS; team-b alone is admitted at 385.
    let toml = OVERLOADED
        .replace(
            "endpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]",
            "endpoints = [\"http://127.0.0.1:1\"]",
        )
        .replace("key = \"key-b\"\ntps = 10", "key = \"key-b\"\ntps = 385");
    let config = Config::parse(&toml).unwrap();
    let config = config.validated().unwrap();
    let (proxy, history, looping) = start_autoscaling(&config);
    // team-b goes quiet after 17 minutes.
    let (changes, _) = overload(&proxy, 26, 17 * 60).await;
    looping.abort();
    let events = history.query(&EventQuery::default());
    let kinds: Vec<(EventKind, u32, u32)> = events.iter().map(|e| (e.kind, e.from, e.to)).collect();
    use EventKind::{DeferredInsufficientCapacity as Deferred, ScaleUp};
    assert_eq!(
        kinds,
        [
            // 400 projected − 395 admitted: a partial raise of 5 instead of +100%...
            (ScaleUp, 10, 15),
            // ...then nothing left: deferred, and looked at again every interval...
            (Deferred, 15, 15),
            (Deferred, 15, 15),
            // ...until team-b went quiet at 17 min: raised again at 20 and 25 min.
            (ScaleUp, 15, 30),
            (ScaleUp, 30, 60),
        ],
        "{events:#?}"
    );
    assert!(
        events[1].reason.contains("capacity"),
        "{}",
        events[1].reason
    );
    let seconds: Vec<u64> = changes.iter().map(|&(s, _)| s).collect();
    assert!(
        (300..=302).contains(&seconds[0]) && (1200..=1202).contains(&seconds[1]),
        "{changes:?}"
    );
}

/// Capacity follows membership (issue 16): a raise deferred for lack of capacity proceeds at
/// the next interval once the backend has scaled out from one endpoint to three — listed in
/// the config, or found in DNS under one name.
#[tokio::test(start_paused = true)]
async fn a_deferred_raise_proceeds_once_the_backend_scales_out() {
    let one = "endpoints = [\"http://127.0.0.1:1\"]";
    let three =
        "endpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]";
    let toml = OVERLOADED.replace(three, one);
    let scaled = toml.replace(one, three);
    deferred_then_scaled_out(&toml, |_| (scaled_config(&scaled), Discovered::default())).await;
}

#[tokio::test(start_paused = true)]
async fn a_deferred_raise_proceeds_once_dns_finds_more_endpoints() {
    let three =
        "endpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]";
    let url = "http://scoring.test:8080";
    let entry = format!("endpoints = [{{ url = \"{url}\", resolve = true }}]");
    let toml = OVERLOADED.replace(three, &entry);
    let found = |n: u8| {
        let mut discovered = Discovered::default();
        let found = (1..=n)
            .map(|i| Found {
                addr: format!("127.0.0.{i}:8080").parse().unwrap(),
                host: "scoring.test:8080".into(),
            })
            .collect();
        discovered.set(url, Resolve::Addresses, found);
        discovered
    };
    let config = scaled_config(&toml);
    deferred_then_scaled_out(&toml, move |proxy| {
        // Before the scale-out the name stood for one address (set below, at the start).
        assert_eq!(proxy.policy().services[0].pool.shape().endpoints.len(), 1);
        (config, found(3))
    })
    .await;
}

fn scaled_config(toml: &str) -> ValidConfig {
    Config::parse(toml).unwrap().validated().unwrap()
}

/// Team-a overloaded for 11 minutes on one endpoint (raised at 5 partly, deferred at 10 for
/// lack of capacity), then the backend scales out as `scale_out` says (the config and what
/// DNS found after it); the next step, at 15 minutes, raises the limit.
async fn deferred_then_scaled_out(
    toml: &str,
    scale_out: impl FnOnce(&Proxy) -> (ValidConfig, Discovered),
) {
    let toml = toml.replace("key = \"key-b\"\ntps = 10", "key = \"key-b\"\ntps = 385");
    let config = scaled_config(&toml);
    let (proxy, history, looping) = start_autoscaling(&config);
    // A name in the config stands for one address at the start.
    let one_found = {
        let mut discovered = Discovered::default();
        for service in &config.services {
            for e in service.endpoints.iter().filter(|e| !e.resolve().is_off()) {
                let addr = "127.0.0.1:8080".parse().unwrap();
                let host = "scoring.test:8080".into();
                discovered.set(e.url(), e.resolve(), vec![Found { addr, host }]);
            }
        }
        discovered
    };
    let reload = |config: &ValidConfig, discovered: &Discovered| {
        let previous = proxy.policy();
        let (policy, _) = Policy::reload(
            config,
            discovered,
            Some(&previous),
            chrono::Utc::now(),
            None,
        )
        .unwrap();
        proxy.live().set_policy(policy);
    };
    reload(&config, &one_found);
    overload(&proxy, 11, u64::MAX).await;
    let (scaled, discovered) = scale_out(&proxy);
    reload(&scaled, &discovered);
    assert_eq!(proxy.policy().services[0].pool.shape().endpoints.len(), 3);
    overload(&proxy, 5, u64::MAX).await;
    looping.abort();
    let events = history.query(&EventQuery::default());
    let kinds: Vec<(EventKind, u32, u32)> = events.iter().map(|e| (e.kind, e.from, e.to)).collect();
    use EventKind::{DeferredInsufficientCapacity as Deferred, ScaleUp};
    assert_eq!(
        kinds,
        [(ScaleUp, 10, 15), (Deferred, 15, 15), (ScaleUp, 15, 30)],
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_events_reach_the_webhook_and_a_dead_one_slows_nothing() {
    let backend = mock().start().await;
    let webhook = mock().start().await;
    let stalled = mock().reply(|_| Reply::Stall).start().await;
    let toml = config(&format!(
        r#"{}
[service.rate_limit]
default_tps = 5
[[service.resource]]
name = "team-a"
key = "key-a"
tps = 5
autoscale = true
[service.autoscale]
interval = "1s"
notify = ["{}/dead", "{}/hook"]
[[service.autoscale.profile]]
name = "fast"
{DOUBLE_WHILE_THROTTLED}"#,
        service(&[backend.url()], ""),
        stalled.url(),
        webhook.url()
    ));
    let sluice = start_sluice(&toml).await;
    let client = pool();
    let mut slowest = Duration::ZERO;
    let started = tokio::time::Instant::now();
    // 40 TPS against a limit of 5 until the webhook has seen two raises.
    while webhook.requests() < 2 {
        assert!(
            started.elapsed() < DEADLINE,
            "no scale event reached the webhook"
        );
        let mut req = get(sluice.addr, "/score");
        req.headers_mut()
            .insert("x-api-key", "key-a".parse().unwrap());
        let sent = tokio::time::Instant::now();
        let answer = send(&client, req).await;
        slowest = slowest.max(sent.elapsed());
        assert!(matches!(answer.status.as_u16(), 200 | 429));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let first = &webhook.received()[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.uri, "/hook");
    assert_eq!(first.header("content-type"), Some("application/json"));
    let event: serde_json::Value = serde_json::from_slice(first.body.as_ref().unwrap()).unwrap();
    assert_eq!(event["kind"], "scale_up");
    assert_eq!(event["resource"], "team-a");
    assert_eq!(
        (event["from"].as_u64(), event["to"].as_u64()),
        (Some(5), Some(10))
    );
    assert!(
        !event.to_string().contains("key-a"),
        "no key material in events"
    );
    assert!(stalled.requests() >= 1, "the dead webhook was tried too");
    // Deliveries to the stalled receiver hang for their timeout, off the request path.
    assert!(
        slowest < Duration::from_secs(1),
        "a request took {slowest:?}"
    );
    sluice.stop().await;
}

const FAST_RULE: &str = r#"
[service.autoscale]
interval = "1s"
[[service.autoscale.profile]]
name = "fast"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_rule_raises_endpoint_concurrency_live() {
    let backend = mock().hold(Duration::from_millis(200)).start().await;
    let toml = config(&format!(
        "{}{FAST_RULE}{}",
        service(
            &[backend.url()],
            "max_concurrent = 2\nqueue_size = 50\nqueue_timeout = \"10s\""
        ),
        r#"[[service.autoscale.profile.rule]]
metric = "queue_length"
statistic = "max"
time_grain = "1s"
time_window = "1s"
time_aggregation = "maximum"
operator = "greater_than"
threshold = 0
direction = "increase"
type = "change_count"
value = 3
cooldown = "1s"
target = "endpoint_concurrency"
"#
    ));
    let sluice = start_sluice(&toml).await;
    let addr = sluice.addr;
    // Ten clients in a loop keep the queue busy until the cap has grown.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let client = pool();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(send(&client, get(addr, "/score")).await.status, 200);
                }
            })
        })
        .collect();
    let pool_ = sluice.pool(0);
    eventually("the cap to grow past 5", || pool_.shape().cap(0) >= 5).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    assert!(
        backend.peak() > 2,
        "the endpoint saw the raised cap: peak {}",
        backend.peak()
    );
    let events = sluice.proxy.live().events().query(&EventQuery::default());
    assert!(events
        .iter()
        .all(|e| e.target == autoscale::ScaleTarget::EndpointConcurrency
            && e.kind == EventKind::ScaleUp));
    assert_eq!((events[0].from, events[0].to), (2, 5));
    sluice.assert_idle().await;
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_autoscale_off_returns_the_limit_to_base_at_once() {
    let backend = mock().start().await;
    let toml = config(&format!(
        "{}\n[service.rate_limit]\ndefault_tps = 5\n\
         [[service.resource]]\nname = \"team-a\"\nkey = \"key-a\"\ntps = 5\nautoscale = true\n\
         {FAST_RULE}{DOUBLE_WHILE_THROTTLED}",
        service(&[backend.url()], ""),
    ));
    let sluice = start_sluice_with(&toml, Some("tok"), None).await;
    let limit = || {
        sluice.proxy.policy().services[0]
            .rate
            .as_ref()
            .unwrap()
            .find("team-a")
            .unwrap()
            .limit()
            .tps
            .get()
    };
    let client = pool();
    let started = tokio::time::Instant::now();
    while limit() < 10 {
        assert!(started.elapsed() < DEADLINE, "no raise");
        let mut req = get(sluice.addr, "/score");
        req.headers_mut()
            .insert("x-api-key", "key-a".parse().unwrap());
        send(&client, req).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin = sluice.admin.unwrap();
    let mut off = request(
        "PUT",
        admin,
        "/admin/services/scoring/resources/team-a",
        r#"{"autoscale": false}"#,
    );
    off.headers_mut()
        .insert("authorization", "Bearer tok".parse().unwrap());
    assert_eq!(once(admin, off).await.status, 200);
    assert_eq!(limit(), 5, "back to base at once");
    let kinds: Vec<EventKind> = sluice
        .proxy
        .live()
        .events()
        .query(&EventQuery::default())
        .iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&EventKind::AutoscaleOff), "{kinds:?}");
    // And it stays there, however throttled.
    for _ in 0..30 {
        let mut req = get(sluice.addr, "/score");
        req.headers_mut()
            .insert("x-api-key", "key-a".parse().unwrap());
        send(&client, req).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(limit(), 5);
    sluice.stop().await;
}
