//! The fleet keeps its word (issue 19), against a real redis-server: what docs/fleet.md
//! promises holds through the races, resets and losses that used to break it.
//! - a background refill racing requests hands out only cells Redis granted, a bucket Redis
//!   lost comes back empty whoever asks first, and an outage of any length with
//!   `on_error = "local"` adds nothing above `tps × time + burst`;
//! - rate keys of different (service, resource) pairs never collide, and the built-in bucket
//!   names cannot be configured;
//! - the autoscale leader keeps leading when Redis loses its fencing counter, and a leader
//!   after Redis lost the last step, or whose wall clock runs an hour ahead, waits a full
//!   interval (on Redis's clock) before stepping;
//! - the fleet's policy survives Redis restarting empty or restored from an older backup:
//!   changes work again everywhere, the latest policy wins (after a restore, the backup's),
//!   and a replica started afterwards follows the fleet;
//! - an admin change whose answer from Redis comes late is read back: made (200) when Redis
//!   applied it, `503 outcome_unknown` (never "nothing changed") when that cannot be told;
//!   a replica that refused the fleet's policy does not publish its older one over it.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::limit::{Lease, Local, SharedBuckets};
use sluice::limit::{Quota, Verdict};
use sluice::store::Fleet;
use support::redis::{lease_clock as clock, quota, store_fleet as fleet, RedisServer};

/// The bucket's theoretical arrival time as Redis stores it (µs on Redis's clock).
fn tat(redis: &RedisServer, key: &str) -> u64 {
    let value = redis.command(&["GET", key]);
    value
        .parse()
        .unwrap_or_else(|_| panic!("bucket {key} holds {value:?}"))
}

/// A task keeps a lease topped up with background refills and spends cells from it (requests
/// admitted), while requests on another thread take cells whenever a refill is under way,
/// every other one giving its cell straight back (like a capacity 429), so every refill's
/// answer lands while cells are being taken (and the refill's clock is slow, to stand in for a
/// preemption at the worst moment). Redis's bucket says how many cells it granted: at 1 TPS
/// with a huge burst, each granted cell moves the bucket's time one second ahead and nothing
/// else moves it. The requests admitted can never be more than that.
#[test]
fn a_background_refill_racing_requests_hands_out_only_cells_redis_granted() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = runtime.block_on(async { fleet(&redis, "a") });
    const BURST: u32 = 1_000_000;
    let q = quota(1, BURST);
    let lease = Arc::new(Lease::new(q));
    let key = a.rate_key("svc", "team");
    let now = clock(Instant::now());
    // The first grant (one cell, taken at once) creates the bucket; count from there.
    let first = runtime
        .block_on(lease.refill(&*a, &key, q, now.clone()))
        .unwrap();
    assert!(matches!(first, Verdict::Admit { .. }));
    let before = tat(&redis, &key);

    // The refill reads the clock between its steps; a read that takes 20 µs stands in for
    // the refill being preempted there (which a busy machine does now and then), so the test
    // meets the race every run instead of a few times a minute.
    let slow_now = {
        let now = now.clone();
        move || {
            let read = Instant::now();
            while read.elapsed() < Duration::from_micros(20) {
                std::hint::spin_loop();
            }
            now()
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Cells requests on the other thread may still keep during the current refill.
    let allowance = Arc::new(AtomicU64::new(0));
    let taker = {
        let (lease, stop, allowance, now) = (
            Arc::clone(&lease),
            Arc::clone(&stop),
            Arc::clone(&allowance),
            now.clone(),
        );
        std::thread::spawn(move || {
            let (mut kept, mut given_back) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                if allowance.load(Ordering::Acquire) == 0 {
                    // Leave the CPU to Redis and the refill between refills.
                    std::thread::yield_now();
                    continue;
                }
                if !matches!(lease.take(now()), Local::Admit(_)) {
                    continue;
                }
                // Every other request meets a full endpoint: its cell goes back.
                let keep = given_back > kept
                    && allowance
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                        .is_ok();
                if keep {
                    kept += 1;
                } else {
                    lease.give_back(false);
                    given_back += 1;
                }
            }
            (kept, given_back)
        })
    };
    let (spent, refills) = runtime.block_on(async {
        let started = Instant::now();
        let (mut spent, mut refills) = (0u64, 0u64);
        // Two seconds, or a quarter of the burst (a fast machine spends it all in one second,
        // and then the bucket rightly refuses): the bucket never runs dry here.
        while started.elapsed() < Duration::from_secs(2) && spent < u64::from(BURST / 4) {
            allowance.store(8, Ordering::Release);
            lease
                .prefetch(&*a, &key, q, slow_now.clone())
                .await
                .unwrap();
            allowance.store(0, Ordering::Release);
            refills += 1;
            // Spend about half a batch, so the next refill finds the lease half full.
            for _ in 0..64 {
                let admit = match lease.take(now()) {
                    Local::Admit(_) => true,
                    Local::Refuse(v) => panic!("a bucket of a million cells refused: {v:?}"),
                    Local::Empty => matches!(
                        lease.refill(&*a, &key, q, now.clone()).await.unwrap(),
                        Verdict::Admit { .. }
                    ),
                };
                spent += u64::from(admit);
            }
        }
        (spent, refills)
    });
    stop.store(true, Ordering::Relaxed);
    let (kept, given_back) = taker.join().unwrap();
    // What the lease still holds was granted too: spend it, so the count is exact.
    let mut left = 0u64;
    while matches!(lease.take(now()), Local::Admit(_)) {
        left += 1;
    }
    let admitted = spent + kept + left;

    let granted = (tat(&redis, &key) - before) / 1_000_000;
    eprintln!(
        "{admitted} admitted ({kept} during background refills), {granted} cells granted, \
         {refills} background refills, {given_back} cells given back during them"
    );
    assert!(
        refills > 50 && kept > 100 && given_back > 100,
        "the race was hardly exercised: {refills} background refills, {kept} cells kept and \
         {given_back} given back during them"
    );
    assert!(
        admitted <= granted,
        "{admitted} requests admitted with {granted} cells granted by Redis: {} cells Redis \
         never granted",
        admitted - granted
    );
}

/// Spend the whole of a 1-cell bucket at `key`; true if its one cell was granted.
async fn spend_one(fleet: &Fleet, key: &str, q: Quota, now: impl Fn() -> u64 + Clone) -> bool {
    let lease = Lease::new(q);
    matches!(
        lease.refill(fleet, key, q, now.clone()).await,
        Ok(Verdict::Admit { .. })
    )
}

/// Service `a:b` with resource `c` and service `a` with resource `b:c` are different callers:
/// spending one's bucket leaves the other's untouched (their keys used to be the same
/// `rate:a:b:c`).
#[tokio::test]
async fn names_with_colons_never_share_a_bucket() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = fleet(&redis, "a");
    let q = quota(1, 1);
    let now = clock(Instant::now());
    let pairs = [
        ("a:b", "c"),
        ("a", "b:c"),
        ("a:b:c", ""),
        ("", "a:b:c"),
        ("a\\", "b"),
        ("a", "\\:b"),
    ];
    let keys: Vec<String> = pairs.iter().map(|(s, r)| a.rate_key(s, r)).collect();
    for (i, key) in keys.iter().enumerate() {
        assert!(
            spend_one(&a, key, q, now.clone()).await,
            "{:?}'s bucket was spent before anything used it (key {key})",
            pairs[i]
        );
        assert!(
            !spend_one(&a, key, q, now.clone()).await,
            "a bucket of 1 cell granted 2 at once (key {key})"
        );
    }
    let mut stored = redis.dump("sluice:rate:*");
    stored.retain(|(key, _)| key != "sluice:rate:generation");
    assert_eq!(stored.len(), pairs.len(), "one bucket per pair: {stored:?}");
    // Names without ':' or '\\' keep the key they always had (no migration).
    assert_eq!(
        a.rate_key("scoring", "team-a"),
        "sluice:rate:scoring:team-a"
    );
}

/// A configured resource named like a built-in bucket would share it (and, in a fleet, its
/// Redis key): `sluice check` refuses it and names the key.
#[test]
fn built_in_bucket_names_cannot_be_configured() {
    use support::process::{check, write_config};
    for name in ["anonymous", "unknown"] {
        let text = format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\n\n[[service]]\nname = \"scoring\"\n\
             endpoints = [\"http://127.0.0.1:9001\"]\n\n[[service.resource]]\nname = \"{name}\"\n\
             key = \"k-{name}\"\n"
        );
        let path = write_config("fleet-word-check", &text);
        let output = check(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("service[0].resource[0].name") && stderr.contains("built-in"),
            "{name}: the message names the key and why: {stderr}"
        );
    }
}

/// One replica alone, with an autoscaled resource (so leading matters).
fn lone_replica_config(redis: &RedisServer, id: &str, endpoint: &str) -> String {
    support::fleet::replica_config(
        &redis.url(),
        id,
        "local",
        &format!(
            "{}\n[service.rate_limit]\ndefault_tps = 10\n\n[[service.resource]]\n\
             name = \"team-a\"\nkey = \"key-a\"\ntps = 10\nautoscale = true\n\n\
             [service.autoscale]\ninterval = \"2s\"\n",
            support::service(&[endpoint.to_owned()], "")
        ),
    )
}

/// Wait until `replica`'s `store.leader` is `leads`; false if that takes [`support::DEADLINE`].
async fn leads_eventually(replica: &support::fleet::Replica, leads: bool) -> bool {
    let deadline = tokio::time::Instant::now() + support::DEADLINE;
    while tokio::time::Instant::now() < deadline {
        if replica.store().await["leader"] == leads {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Redis loses the leader's fencing counter (`leader:epoch`) while the lease itself survives
/// (eviction under an `allkeys-*` policy, or an operator): the holder keeps leading, with a
/// new token, and its fenced writes go through. It used to renew the lease forever while
/// reading token 0 — no leader, autoscaling stopped for the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_keeps_leading_when_redis_loses_its_fencing_counter() {
    let _serial = support::fleet::one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let endpoint = support::mock().start().await;
    let a = support::fleet::Replica::start("a", &lone_replica_config(&redis, "a", &endpoint.url()))
        .await;
    a.wait_ready().await;
    assert!(
        leads_eventually(&a, true).await,
        "a lone replica leads: {}",
        a.store().await
    );
    assert_eq!(redis.command(&["DEL", "sluice:leader:epoch"]), "1");
    // Several heartbeats (each renews the lease) after the loss.
    let heartbeat = support::fleet::HEARTBEAT;
    let watched = Instant::now();
    while watched.elapsed() < heartbeat * 5 {
        let store = a.store().await;
        assert_eq!(
            store["leader"],
            true,
            "{:?} after leader:epoch was lost the holder no longer leads: {store}\nredis: {:?}",
            watched.elapsed(),
            redis.dump("sluice:leader*")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(redis.command(&["GET", "sluice:leader"]), "a");
    assert_ne!(redis.command(&["GET", "sluice:leader:epoch"]), "(nil)");
}

/// Two replicas with team-a at 10 TPS, autoscaled every `interval` by a rule that doubles the
/// limit while it was throttled in the last second.
fn autoscaled_service(endpoint: &str, interval: Duration) -> String {
    format!(
        "{}\n[service.rate_limit]\ndefault_tps = 10\n\n[[service.resource]]\nname = \"team-a\"\n\
         key = \"key-a\"\ntps = 10\nautoscale = true\n\n[service.autoscale]\ninterval = \"{}ms\"\n\
         [[service.autoscale.profile]]\nname = \"fast\"\n{}",
        support::service(&[endpoint.to_owned()], "max_concurrent = 200"),
        interval.as_millis(),
        support::DOUBLE_WHILE_THROTTLED
    )
}

/// The step Redis holds for the service `scoring`: (stepped_at_ms on Redis's clock, limits).
fn published_step(redis: &RedisServer) -> Option<(u64, serde_json::Value)> {
    let doc = redis.command(&["GET", "sluice:scale:scoring"]);
    if doc == "(nil)" {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_str(&doc).expect("a scale document");
    Some((doc["stepped_at_ms"].as_u64().expect("stepped_at_ms"), doc))
}

/// The autoscale leader steps, then dies as Redis restarts empty (the published step is gone
/// with it). The survivor takes the lead and must not step until a full interval after the
/// last step: with nothing published it waits an interval from taking the lead. It used to
/// judge "due" from its own start and step at once — two steps in one interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_after_redis_lost_the_last_step_waits_a_full_interval() {
    let _serial = support::fleet::one_at_a_time().await;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let endpoint = support::mock().start().await;
    let interval = Duration::from_secs(2);
    let services = autoscaled_service(&endpoint.url(), interval);
    let replicas = support::fleet::start_fleet(&redis.url(), &["a", "b"], "local", &services).await;
    // Throttled on both replicas (30 TPS against 10), so whoever leads has a reason to step.
    let targets = support::fleet::Targets::new(replicas.iter().map(|r| r.addr).collect());
    let load = support::fleet::open_loop(targets.clone(), "key-a", 30.0, None);
    let started = Instant::now();
    let (first_at, first) = loop {
        if let Some(step) = published_step(&redis) {
            break step;
        }
        assert!(
            started.elapsed() < support::DEADLINE,
            "nobody stepped: {:?}",
            redis.dump("sluice:*")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Whoever stepped leads; it dies as Redis restarts empty.
    let mut leader = None;
    for (i, replica) in replicas.iter().enumerate() {
        if replica.store().await["leader"] == true {
            leader = Some(i);
        }
    }
    let leader = leader.expect("the replica that stepped leads");
    replicas[leader].kill_in_place();
    targets.drop_target(leader);
    redis.start_again();
    let lost_at = Instant::now();
    let survivor = &replicas[1 - leader];
    let (second_at, second) = loop {
        if let Some(step) = published_step(&redis) {
            break step;
        }
        assert!(
            lost_at.elapsed() < support::DEADLINE,
            "the survivor never stepped: {}",
            survivor.store().await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    load.stop().await;
    eprintln!(
        "first step {first} by {}, second {second} by {} {} ms later on Redis's clock",
        replicas[leader].id,
        survivor.id,
        second_at.saturating_sub(first_at)
    );
    assert!(
        second_at >= first_at + interval.as_millis() as u64,
        "two steps {} ms apart on Redis's clock, with an interval of {interval:?}",
        second_at.saturating_sub(first_at)
    );
}

/// libfaketime's preload library, to run a replica whose wall clock is off; `None` (after a
/// notice) when it is missing outside CI.
fn libfaketime() -> Option<std::path::PathBuf> {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "libfaketime is missing: CI must install it (.ci/install-debian-package faketime faketime)"
        );
        eprintln!("skipped: libfaketime is not installed (Debian package faketime)");
    }
    found
}

/// A replica whose wall clock runs an hour ahead (libfaketime; its monotonic clock is left
/// alone) takes the autoscale lead right after the leader stepped and died. Steps are timed
/// on Redis's clock, so it waits out the interval from that step. On its own clock the step
/// looked an hour old and it stepped at once: two steps in one interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_clock_runs_an_hour_ahead_still_waits_the_interval() {
    let _serial = support::fleet::one_at_a_time().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let Some(faketime) = libfaketime() else {
        return;
    };
    let endpoint = support::mock().start().await;
    let interval = Duration::from_secs(2);
    let services = autoscaled_service(&endpoint.url(), interval);
    let config = |id: &str| support::fleet::replica_config(&redis.url(), id, "local", &services);
    // a starts first and leads; b, its clock an hour ahead, follows.
    let a = support::fleet::Replica::start("a", &config("a")).await;
    a.wait_ready().await;
    assert!(leads_eventually(&a, true).await, "a never led");
    let skewed = [
        ("LD_PRELOAD", faketime.to_str().expect("a UTF-8 path")),
        ("FAKETIME", "+1h"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let b = support::fleet::Replica::start_with_env("b", &config("b"), &skewed).await;
    b.wait_ready().await;
    let logged_at = b.logged("sluice listening")[0]["timestamp"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .expect("a timestamp");
    let ahead = logged_at.signed_duration_since(chrono::Utc::now());
    assert!(
        ahead > chrono::Duration::minutes(50),
        "b's clock is not an hour ahead ({ahead}): libfaketime did not take"
    );

    // Throttled on both (30 TPS against 10): whoever leads has a reason to step.
    let targets = support::fleet::Targets::new(vec![a.addr, b.addr]);
    let load = support::fleet::open_loop(targets.clone(), "key-a", 30.0, None);
    let started = Instant::now();
    let (first_at, first) = loop {
        if let Some(step) = published_step(&redis) {
            break step;
        }
        assert!(started.elapsed() < support::DEADLINE, "a never stepped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    a.kill_in_place();
    targets.drop_target(0);
    let (second_at, second) = loop {
        match published_step(&redis) {
            Some((at, doc)) if at != first_at => break (at, doc),
            _ => {}
        }
        assert!(
            started.elapsed() < support::DEADLINE,
            "b never stepped: {}",
            b.store().await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    load.stop().await;
    eprintln!(
        "a stepped {first}; b, an hour ahead, stepped {second} {} ms later on Redis's clock",
        second_at.saturating_sub(first_at)
    );
    assert!(
        second_at >= first_at + interval.as_millis() as u64,
        "two steps {} ms apart on Redis's clock, with an interval of {interval:?}",
        second_at.saturating_sub(first_at)
    );
}

/// Ask for one request through `lease`: the lease, or the store when it is empty; the local
/// bucket mirrors the verdict, as the limiter does. A call that meets Redis's reconnect counts
/// as not admitted.
async fn ask(
    fleet: &Fleet,
    lease: &Lease,
    key: &str,
    q: Quota,
    now: impl Fn() -> u64 + Clone,
) -> bool {
    let verdict = match lease.take(now()) {
        Local::Admit(v) | Local::Refuse(v) => Ok(v),
        Local::Empty => lease.refill(fleet, key, q, now.clone()).await,
    };
    if let Ok(verdict) = &verdict {
        lease.fallback.mirror(verdict, now());
    }
    matches!(verdict, Ok(Verdict::Admit { .. }))
}

/// A busy replica spends the whole burst; Redis restarts empty; a replica that barely used
/// the resource asks first. The bucket must not come back full (the busy replica would spend
/// a second burst at once): a bucket lost with Redis's data starts as one that was empty at
/// the loss, whoever calls first. It used to start from the first caller's own usage.
#[tokio::test]
async fn a_bucket_lost_with_a_restart_comes_back_empty_whoever_asks_first() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (busy, quiet) = (fleet(&redis, "busy"), fleet(&redis, "quiet"));
    let q = quota(100, 100);
    let key = busy.rate_key("svc", "team");
    let now = clock(Instant::now());
    let (busy_lease, quiet_lease) = (Lease::new(q), Lease::new(q));
    assert!(ask(&quiet, &quiet_lease, &key, q, now.clone()).await);
    let mut spent = 0;
    while ask(&busy, &busy_lease, &key, q, now.clone()).await {
        spent += 1;
    }
    assert!(
        spent >= 90,
        "the busy replica spent only {spent} of the burst"
    );
    redis.start_again();
    // Fresh leases: nothing leased before the loss is counted below.
    let (busy_lease, quiet_lease) = (Lease::new(q), Lease::new(q));
    let back = Instant::now();
    let mut admitted = 0u32;
    // The quiet replica asks first (a call meeting the reconnect is retried).
    while !ask(&quiet, &quiet_lease, &key, q, now.clone()).await {
        assert!(back.elapsed() < support::DEADLINE, "Redis never answered");
    }
    admitted += 1;
    while back.elapsed() < Duration::from_millis(200) {
        admitted += u32::from(ask(&busy, &busy_lease, &key, q, now.clone()).await);
    }
    let elapsed = back.elapsed().as_secs_f64();
    // An empty bucket refills at 100 TPS; a lease may hold a cell or two more than that.
    let bound = 100.0 * elapsed + 3.0;
    eprintln!("{admitted} admitted in {elapsed:.3} s after the restart (bound {bound:.1})");
    assert!(
        f64::from(admitted) <= bound,
        "{admitted} admitted in {elapsed:.3} s after Redis lost the bucket: a fresh burst \
         (at most {bound:.1} from an empty bucket)"
    );
}

/// `on_error = "local"` with uneven replicas: a busy replica spends the fleet's bucket, a
/// quiet one has used none of it; then the store is unreachable for longer than a window
/// (each replica judges alone at its share, as `limit::shared` does while the store is down),
/// then it answers again (Redis kept the bucket). Over the whole run the fleet admits at most
/// `tps × time + burst`. The quiet replica's local bucket used to start full — its share of
/// the burst again, on top, never paid back by the charge after the outage (which stops at
/// an empty bucket).
#[tokio::test]
async fn an_outage_longer_than_a_window_adds_nothing_above_the_limit() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (busy, quiet) = (fleet(&redis, "busy"), fleet(&redis, "quiet"));
    let (tps, burst) = (100u32, 50u32);
    let q = quota(tps, burst);
    let share = sluice::limit::share_of(q, 2);
    let key = busy.rate_key("svc", "team");
    let now = clock(Instant::now());
    let (busy_lease, quiet_lease) = (Lease::new(q), Lease::new(q));
    let started = Instant::now();
    let mut admitted = 0u64;
    while started.elapsed() < Duration::from_millis(300) {
        admitted += u64::from(ask(&busy, &busy_lease, &key, q, now.clone()).await);
    }
    // The store is unreachable for a second (two windows); both replicas take traffic.
    let outage = busy.outage() + 1;
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(1) {
        for lease in [&busy_lease, &quiet_lease] {
            let (_, verdict) = lease.check_locally(share, outage, now());
            admitted += u64::from(matches!(verdict, Verdict::Admit { .. }));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    // Back: both charge what they admitted, and the busy one goes on.
    let back = Instant::now();
    admitted += u64::from(ask(&quiet, &quiet_lease, &key, q, now.clone()).await);
    while back.elapsed() < Duration::from_millis(500) {
        admitted += u64::from(ask(&busy, &busy_lease, &key, q, now.clone()).await);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let bound = f64::from(tps) * elapsed + f64::from(burst) + 3.0;
    eprintln!("{admitted} admitted in {elapsed:.3} s (bound {bound:.1})");
    assert!(
        admitted as f64 <= bound,
        "{admitted} admitted in {elapsed:.3} s: more than tps × time + burst ({bound:.1})"
    );
}

/// Replicas a and b (`on_error = "local"`) sharing a redis-server of their own, in front of
/// one endpoint with a cap of 20, resource team-a at 10 TPS.
struct TwoReplicas {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    redis: RedisServer,
    _endpoint: support::mock::Mock,
    replicas: Vec<support::fleet::Replica>,
    /// Their services, as a config file lists them.
    services: String,
}

impl TwoReplicas {
    /// `None` when redis-server is missing outside CI.
    async fn start() -> Option<Self> {
        let serial = support::fleet::one_at_a_time().await;
        let redis = RedisServer::start()?;
        let endpoint = support::mock().start().await;
        let services =
            support::fleet::rated_service(&endpoint.url(), "max_concurrent = 20", 10, 10);
        let replicas =
            support::fleet::start_fleet(&redis.url(), &["a", "b"], "local", &services).await;
        Some(Self {
            _serial: serial,
            redis,
            _endpoint: endpoint,
            replicas,
            services,
        })
    }
}

/// Wait until `replica`'s resource team-a runs at `tps`; false after [`support::DEADLINE`].
async fn limit_becomes(replica: &support::fleet::Replica, tps: u64) -> bool {
    let deadline = tokio::time::Instant::now() + support::DEADLINE;
    while tokio::time::Instant::now() < deadline {
        if replica.limit_tps("team-a").await == tps {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Set team-a to `tps` on replica `on` — asking again while the store refuses it (a
/// reconnect, a republish racing it) — and wait until `other` runs it too.
async fn change_team_a_everywhere(
    on: &support::fleet::Replica,
    other: &support::fleet::Replica,
    tps: u64,
) {
    let tried = Instant::now();
    loop {
        let answer = on
            .call("PUT", TEAM_A, &format!(r#"{{"tps": {tps}}}"#))
            .await;
        if answer.status == 200 {
            break;
        }
        assert!(
            tried.elapsed() < support::DEADLINE,
            "a change on {} is still refused: {} {}",
            on.id,
            answer.status,
            answer.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        limit_becomes(other, tps).await,
        "{}'s change to {tps} never reached {}",
        on.id,
        other.id
    );
}

/// Redis is restored from a backup taken before the fleet's last change, so the store holds
/// a lower policy version than the replicas follow. The store's document is the fleet's:
/// every replica goes back to the policy it holds, and admin changes work again on every
/// replica. Replicas used to ignore any version at or below the one they followed: the fleet
/// ran a policy the store no longer held, and every later change was refused with 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_an_older_backup_brings_the_fleet_back_to_its_policy() {
    let Some(fleet) = TwoReplicas::start().await else {
        return;
    };
    let TwoReplicas {
        mut redis,
        replicas,
        ..
    } = fleet;
    let (a, b) = (&replicas[0], &replicas[1]);
    change_team_a_everywhere(a, b, 50).await;
    let backup = redis.snapshot();
    change_team_a_everywhere(b, a, 70).await;
    redis.restore(&backup);
    for replica in [a, b] {
        assert!(
            limit_becomes(replica, 50).await,
            "{} does not run the restored policy: {}",
            replica.id,
            replica.store().await
        );
    }
    change_team_a_everywhere(a, b, 80).await;
    change_team_a_everywhere(b, a, 90).await;
}

/// Redis restarts empty under a fleet that changed its policy (team-a 10 → 50 TPS). Admin
/// changes work again on every replica and reach the others, and a replica that starts
/// afterwards follows the fleet, not its file. It used to refuse every later change with 409 for good, and a new
/// replica's file (version 1) was ignored by the others: two policies in one fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_sync_survives_redis_restarting_empty() {
    let Some(fleet) = TwoReplicas::start().await else {
        return;
    };
    let TwoReplicas {
        mut redis,
        replicas,
        services,
        ..
    } = fleet;
    let (a, b) = (&replicas[0], &replicas[1]);
    change_team_a_everywhere(a, b, 50).await;

    redis.start_again();
    // An admin change on either replica works again (once the connection is back and, at
    // most, a republish of the running policy raced it) and reaches the other.
    change_team_a_everywhere(b, a, 70).await;
    change_team_a_everywhere(a, b, 90).await;
    // A replica that starts now follows the fleet (90), not its file (10).
    let c_config = support::fleet::replica_config(&redis.url(), "c", "local", &services);
    let c = support::fleet::Replica::start("c", &c_config).await;
    c.wait_ready().await;
    assert!(limit_becomes(&c, 90).await, "c runs its own file");
    for replica in [a, b] {
        assert_eq!(replica.limit_tps("team-a").await, 90, "{}", replica.id);
    }
}

/// Redis restarts empty right after an admin change (the other replica may not have adopted
/// it yet): the policy is published again, the later one wins, and the fleet keeps the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_policy_is_republished_after_redis_lost_it() {
    let Some(fleet) = TwoReplicas::start().await else {
        return;
    };
    let TwoReplicas {
        mut redis,
        replicas,
        ..
    } = fleet;
    let answer = replicas[0]
        .call(
            "PUT",
            "/admin/services/scoring/resources/team-a",
            r#"{"tps": 50}"#,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    redis.start_again();
    // b may not have adopted the change yet and publish its older policy first; a, which
    // followed the later version, then publishes its own over it.
    let back = Instant::now();
    loop {
        let stored = redis.command(&["GET", "sluice:policy"]);
        if stored.contains("\"tps\":50") {
            break;
        }
        assert!(
            back.elapsed() < support::DEADLINE,
            "the fleet policy was not restored with the change: {stored}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for replica in &replicas {
        assert!(limit_becomes(replica, 50).await, "{}", replica.id);
    }
}

/// The fleet policy document as the store holds it.
fn stored_policy(redis: &RedisServer) -> serde_json::Value {
    serde_json::from_str(&redis.command(&["GET", "sluice:policy"])).expect("a policy document")
}

/// Redis holds every write (scripts included) for `ms` while reads go on: what a slow or
/// briefly hung store does to a publish.
fn hold_writes(redis: &RedisServer, ms: u64) {
    assert_eq!(
        redis.command(&["CLIENT", "PAUSE", &ms.to_string(), "WRITE"]),
        "OK"
    );
}

const TEAM_A: &str = "/admin/services/scoring/resources/team-a";

/// Redis runs an admin change's publish only after `store.timeout` (its writes held 400 ms):
/// the replica reads the outcome back and answers 200, and every replica runs the change. It
/// used to answer `503 store_unavailable`, "nothing changed", while the fleet adopted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_redis_applied_after_the_timeout_is_answered_as_made() {
    let Some(fleet) = TwoReplicas::start().await else {
        return;
    };
    let TwoReplicas {
        redis, replicas, ..
    } = fleet;
    let (a, b) = (&replicas[0], &replicas[1]);
    let version = a.store().await["policy_version"].as_u64().unwrap();
    hold_writes(&redis, 400);
    let asked = Instant::now();
    let answer = a.call("PUT", TEAM_A, r#"{"tps": 50}"#).await;
    let took = asked.elapsed();
    assert_eq!(
        answer.status,
        200,
        "after {took:?} (store.timeout {:?}): {}",
        support::fleet::STORE_TIMEOUT,
        answer.text()
    );
    assert!(
        took >= support::fleet::STORE_TIMEOUT,
        "the publish was answered in {took:?}: Redis did not hold it"
    );
    assert_eq!(
        a.store().await["policy_version"].as_u64(),
        Some(version + 1),
        "a follows the version it published"
    );
    for replica in [a, b] {
        assert!(limit_becomes(replica, 50).await, "{}", replica.id);
    }
    assert_eq!(stored_policy(&redis)["origin"], "a");
}

/// Redis holds an admin change's publish longer than the replica reads back (1 s): the answer
/// is `503 outcome_unknown` saying the change may still be made, and once Redis runs it every
/// replica, the one asked included, runs the change. It used to be `503 store_unavailable`,
/// "nothing changed" — and then the change was made everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_outcome_cannot_be_read_back_is_answered_as_unknown() {
    let Some(fleet) = TwoReplicas::start().await else {
        return;
    };
    let TwoReplicas {
        redis, replicas, ..
    } = fleet;
    let held = Instant::now();
    hold_writes(&redis, 3000);
    let answer = replicas[0].call("PUT", TEAM_A, r#"{"tps": 50}"#).await;
    let answered = held.elapsed();
    let body = answer.json();
    assert_eq!(
        (answer.status.as_u16(), body["error"].as_str()),
        (503, Some("outcome_unknown")),
        "{body}"
    );
    assert!(
        body["detail"].as_str().unwrap().contains("may still"),
        "{body}"
    );
    if answered < Duration::from_millis(3000) {
        // Answered while Redis still held the publish: nothing is in force yet.
        assert_eq!(replicas[0].limit_tps("team-a").await, 10);
    }
    for replica in &replicas {
        assert!(limit_becomes(replica, 50).await, "{}", replica.id);
    }
}

/// A document every replica refuses appears in the store (here written by hand, as a newer
/// sluice or an operator might): a replica that refused it says so in its store view, and
/// an admin change on it is refused with 409 instead of publishing the older services it
/// runs over the fleet's version. It used to succeed, undoing that version fleet-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_refused_the_fleet_policy_does_not_publish_over_it() {
    let Some(fleet) = TwoReplicas::start().await else {
        return;
    };
    let TwoReplicas {
        redis, replicas, ..
    } = fleet;
    let b = &replicas[1];
    let mut doc = stored_policy(&redis);
    doc["origin"] = "x".into();
    doc["services"][0]["max_concurrent"] = 5000.into();
    let version: u64 = redis
        .command(&["GET", "sluice:policy:version"])
        .parse()
        .unwrap();
    redis.command(&["SET", "sluice:policy", &doc.to_string()]);
    let next = (version + 1).to_string();
    redis.command(&[
        "MSET",
        "sluice:policy:generation",
        "4242",
        "sluice:policy:version",
        &next,
    ]);
    let deadline = Instant::now() + support::DEADLINE;
    while !b.output().contains("fleet policy refused here") {
        assert!(Instant::now() < deadline, "b never refused the document");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = b.call("PUT", TEAM_A, r#"{"tps": 50}"#).await;
    let body = answer.json();
    assert_eq!(
        (answer.status.as_u16(), body["error"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("refused the fleet's policy"),
        "{body}"
    );
    assert_eq!(
        stored_policy(&redis)["origin"],
        "x",
        "the fleet's document was replaced"
    );
    assert_eq!(b.limit_tps("team-a").await, 10, "nothing changed on b");
    // And says so where an operator looks.
    let store = b.store().await;
    assert_eq!(store["policy_version"], version + 1, "{store}");
    let refused = store["policy_refused"].as_str().unwrap_or_default();
    assert!(refused.contains("max_concurrent"), "{refused}");
    assert_eq!(b.local_cap().await, 10, "b runs the policy it had");
}
