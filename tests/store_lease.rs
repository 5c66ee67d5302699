//! The shared rate bucket and a replica's lease on it, against a real redis-server: what two
//! replicas together may admit, how a refusal is cached, how a bucket lost with a Redis
//! restart comes back without a burst, how one Redis kept is charged for local admissions,
//! and that every call is bounded by `store.timeout`.

mod support;

use std::time::{Duration, Instant};

use sluice::config::{Backend, StoreConfig};
use sluice::limit::Lease;
use sluice::limit::{Quota, Verdict};
use sluice::store::Fleet;
use support::redis::{lease_clock as clock, quota, store_fleet as fleet, RedisServer};

/// Take from the lease, asking the store when it is empty.
async fn admit(fleet: &Fleet, lease: &Lease, key: &str, q: Quota, now: &impl Fn() -> u64) -> bool {
    let verdict = match lease.take(now()) {
        sluice::limit::Local::Admit(v) | sluice::limit::Local::Refuse(v) => v,
        sluice::limit::Local::Empty => lease.refill(fleet, key, q, now).await.unwrap(),
    };
    matches!(verdict, Verdict::Admit { .. })
}

#[tokio::test]
async fn two_replicas_together_admit_the_burst_and_the_rate_not_more() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (fleet(&redis, "a"), fleet(&redis, "b"));
    let q = quota(50, 50);
    let (la, lb) = (Lease::new(q), Lease::new(q));
    let key = a.rate_key("svc", "team");
    let start = Instant::now();
    let now = clock(start);
    let mut admitted = 0u64;
    // Both replicas hammer the bucket for a second, alternating.
    while start.elapsed() < Duration::from_secs(1) {
        admitted += u64::from(admit(&a, &la, &key, q, &now).await);
        admitted += u64::from(admit(&b, &lb, &key, q, &now).await);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ceiling = 50.0 + 50.0 * elapsed;
    assert!(
        admitted as f64 <= ceiling + 1.0,
        "{admitted} admitted in {elapsed:.2}s, more than burst + rate ({ceiling:.0})"
    );
    // Leased cells left unused are lost, at most one batch per replica.
    assert!(
        admitted as f64 >= ceiling - 2.0 * 16.0,
        "{admitted} admitted in {elapsed:.2}s, far below burst + rate ({ceiling:.0})"
    );
    // A refused replica waits out the retry time without asking the store.
    let calls = a.view().calls_total;
    for _ in 0..100 {
        admit(&a, &la, &key, q, &now).await;
    }
    assert!(
        a.view().calls_total - calls <= 10,
        "throttled requests should not each cost a store call: {} calls for 100",
        a.view().calls_total - calls
    );
}

#[tokio::test]
async fn refusal_says_exactly_when_the_next_cell_is_due() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = fleet(&redis, "a");
    let q = quota(10, 1);
    let lease = Lease::new(q);
    let key = a.rate_key("svc", "slow");
    let now = clock(Instant::now());
    assert!(admit(&a, &lease, &key, q, &now).await);
    let Verdict::Refuse { retry_after_ns } = lease.refill(&*a, &key, q, &now).await.unwrap() else {
        panic!("a second request within 100 ms of a 1-burst bucket must be refused");
    };
    // 10 TPS: one cell per 100 ms, minus the time the first call took.
    assert!(
        (50_000_000..=100_000_000).contains(&retry_after_ns),
        "retry after {retry_after_ns} ns"
    );
    tokio::time::sleep(Duration::from_nanos(retry_after_ns)).await;
    assert!(
        admit(&a, &lease, &key, q, &now).await,
        "due after the retry time"
    );
}

#[tokio::test]
async fn a_bucket_lost_with_a_restart_starts_from_the_usage_counted_meanwhile() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let a = fleet(&redis, "a");
    let q = quota(100, 100);
    let lease = Lease::new(q);
    let key = a.rate_key("svc", "team");
    let now = clock(Instant::now());
    // While Redis is away the replica spends its whole local bucket (on_error = "local").
    redis.stop();
    lease.fallback.set_quota(q);
    while matches!(lease.fallback.check(now()).1, Verdict::Admit { .. }) {}
    redis.start_again();
    // Back: the bucket Redis lost is seeded with that usage, so no fresh burst of 100.
    let mut admitted = 0;
    for _ in 0..100 {
        // The first calls may meet the reconnect; they count as not admitted.
        let verdict = match lease.take(now()) {
            sluice::limit::Local::Admit(v) | sluice::limit::Local::Refuse(v) => Ok(v),
            sluice::limit::Local::Empty => lease.refill(&*a, &key, q, &now).await,
        };
        admitted += u32::from(matches!(verdict, Ok(Verdict::Admit { .. })));
    }
    assert!(
        admitted <= 10,
        "{admitted} admitted right after the restart"
    );
}

#[tokio::test]
async fn a_bucket_redis_kept_is_charged_for_what_was_admitted_locally_meanwhile() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = fleet(&redis, "a");
    let q = quota(100, 100);
    let lease = Lease::new(q);
    let key = a.rate_key("svc", "team");
    let now = clock(Instant::now());
    // The fleet bucket exists (one admission) and Redis keeps it through a short outage, in
    // which the replica admits 90 requests on its own (on_error = "local").
    assert!(admit(&a, &lease, &key, q, &now).await);
    for _ in 0..90 {
        lease.admitted_locally();
    }
    // Back: those 90 are charged, so what is left of the burst is ~9, not ~99.
    let mut admitted = 0;
    for _ in 0..100 {
        admitted += u32::from(admit(&a, &lease, &key, q, &now).await);
    }
    assert!(
        admitted <= 15,
        "{admitted} admitted after 91 of a burst of 100 were spent"
    );
    assert!(admitted >= 5, "only {admitted} admitted: charged twice?");
}

#[tokio::test]
async fn no_call_waits_longer_than_the_store_timeout() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let config = StoreConfig {
        backend: Backend::Redis,
        url: redis.url(),
        timeout: Duration::from_millis(30),
        ..StoreConfig::default()
    };
    let a = Fleet::connect(&config).unwrap();
    let q = quota(1000, 1000);
    let lease = Lease::new(q);
    let key = a.rate_key("svc", "team");
    let now = clock(Instant::now());
    assert!(admit(&a, &lease, &key, q, &now).await);
    assert!(a.is_up());
    // What a call to a healthy server takes on this machine now (the slowest of a few).
    let mut healthy = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        Lease::new(q).refill(&*a, &key, q, &now).await.unwrap();
        healthy = healthy.max(started.elapsed());
    }
    // A server that stops answering (SIGSTOP keeps the socket open, so only a timeout helps).
    let pid = redis.pid().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let lease = Lease::new(q);
    let started = Instant::now();
    let outcome = lease.refill(&*a, &key, q, &now).await;
    let waited = started.elapsed();
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert!(outcome.is_err(), "a stopped server cannot grant cells");
    assert!(!a.is_up(), "a timeout marks the store down");
    // The timeout, plus 100 ms and twice a healthy call for a busy machine (a call the
    // timeout did not bound would wait until the CONT below).
    let bound = config.timeout + Duration::from_millis(100) + healthy * 2;
    assert!(
        waited < bound,
        "waited {waited:?} for a store with a 30 ms timeout (healthy calls {healthy:?}, bound \
         {bound:?})"
    );
    redis.stop();
}
