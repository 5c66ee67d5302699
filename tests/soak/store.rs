//! The fault soak with the Redis store (issue 7): the same mixed load (HTTP/1.1 and HTTP/2,
//! uploads, aborts, endpoint kills and per-request endpoint faults) through a sluice whose
//! limits live in a `redis-server` this test starts, while Redis is killed and restarted empty,
//! or hung (SIGSTOP) past `store.timeout` and resumed (SIGCONT). `store.on_error = "deny"`, so
//! what sluice does while Redis is away can be seen in every answer.
//!
//! What must hold, besides the per-request invariants of the memory soak (one answer within
//! its timeout, JSON bodies for sluice's own answers, no double delivery, caps, gauges back to
//! 0, file descriptors back to baseline, no panic, no key in the log or an answer):
//! - a request of a shared resource (team-a, team-b, anonymous) that arrives while Redis has
//!   been away for half a second gets `503 store_unavailable` (on_error = deny), at once;
//! - `503 store_unavailable` only ever while Redis is away or just back (within 1.5 s), and
//!   never for an unknown key (judged locally, never through the store);
//! - after Redis returns (even empty), requests are admitted again, and once the load is over a
//!   burst of one resource is held to its shared limit, whose bucket is back in Redis;
//! - no plain key in Redis: every key under the prefix and every value is free of them;
//! - SIGTERM: exit 0.
//!
//! Skipped (with a note) when `redis-server` is not installed, unless `SLUICE_REQUIRE_REDIS`
//! is set. `SOAK_STORE_SECS` (default 9) sets how long the faults last.

use super::*;
use support::fleet::{HEARTBEAT, STORE_TIMEOUT};
use support::redis::RedisServer;

/// sluice has noticed that Redis is away this long after it went (a heartbeat or a lease
/// refill fails within `heartbeat` + `timeout`; the rest is margin for a busy machine).
const DETECT: Duration = Duration::from_millis(500);
/// sluice is back on the store this long after Redis returned (a few heartbeats).
const RECOVER: Duration = Duration::from_millis(1500);
const PREFIX: &str = "soak-fleet:";
/// The shortest stretch between Redis's return (+ [`RECOVER`]) and the next fault that is
/// judged for "admitted again": every shared bucket refills a cell in it.
const WINDOW: Duration = Duration::from_millis(300);

/// When Redis was away, and how.
struct RedisFault {
    kind: &'static str,
    from: Instant,
    to: Instant,
}

/// When sluice itself said its store was unreachable (log lines "store unreachable…" and
/// "store reachable…" of target sluice::store), and why. Besides the faults injected here, a
/// store call that takes longer than `store.timeout` on a busy machine counts as an error too
/// (by design), and `on_error` then rightly applies until the next call succeeds.
struct Outage {
    from: Instant,
    to: Instant,
    error: String,
}

/// sluice's own store outages from its JSON log; `clock` pairs an instant with the wall-clock
/// time of the same moment, to place the log's timestamps.
fn logged_outages(
    lines: &[serde_json::Value],
    clock: (Instant, chrono::DateTime<chrono::Utc>),
) -> Vec<Outage> {
    let at = |line: &serde_json::Value| {
        let stamp = line["timestamp"].as_str()?;
        let stamp = chrono::DateTime::parse_from_rfc3339(stamp).ok()?;
        let offset = stamp.with_timezone(&chrono::Utc) - clock.1;
        let offset = offset.to_std().ok()?;
        Some(clock.0 + offset)
    };
    let mut outages = Vec::new();
    let mut open: Option<(Instant, String)> = None;
    for line in lines.iter().filter(|l| l["target"] == "sluice::store") {
        let message = line["message"].as_str().unwrap_or_default();
        let Some(when) = at(line) else { continue };
        if message.starts_with("store unreachable") && open.is_none() {
            open = Some((when, line["error"].as_str().unwrap_or_default().to_owned()));
        } else if message.starts_with("store reachable") {
            if let Some((from, error)) = open.take() {
                outages.push(Outage {
                    from,
                    to: when,
                    error,
                });
            }
        }
    }
    if let Some((from, error)) = open {
        outages.push(Outage {
            from,
            to: Instant::now(),
            error,
        });
    }
    outages
}

/// Send `signal` ("STOP", "CONT") to the Redis server.
fn signal_redis(redis: &RedisServer, signal: &str) {
    let pid = redis.pid().expect("redis-server runs");
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Kill Redis (it comes back empty) or hang it, for 0.8–2 s at a time, with 1.8–3 s of
/// Redis in between (long enough to see shared limits resume), until the load stops; Redis is
/// up when this returns.
async fn inject_redis_faults(
    soak: Arc<Soak>,
    redis: Arc<Mutex<RedisServer>>,
    faults: Arc<Mutex<Vec<RedisFault>>>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xed15);
    let mut recovered: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1800..3000))).await;
        if let Some(from) = recovered {
            shared_traffic_since(&soak, from).await;
        }
        if soak.stop.load(Ordering::Relaxed) {
            return;
        }
        let kill = rng.gen_bool(0.5);
        let down_for = Duration::from_millis(rng.gen_range(800..2000));
        let from = Instant::now();
        let kind = if kill {
            // Blocking (kill and wait): off the runtime's worker.
            tokio::task::block_in_place(|| redis.lock().unwrap().stop());
            "Redis killed, restarted empty"
        } else {
            signal_redis(&redis.lock().unwrap(), "STOP");
            "Redis hung (SIGSTOP past store.timeout), then resumed"
        };
        tokio::time::sleep(down_for).await;
        if kill {
            tokio::task::block_in_place(|| redis.lock().unwrap().start_again());
        } else {
            signal_redis(&redis.lock().unwrap(), "CONT");
        }
        let to = Instant::now();
        recovered = Some(to + RECOVER);
        faults.lock().unwrap().push(RedisFault { kind, from, to });
        soak.faults.add(kind);
    }
}

/// Wait until requests of shared resources that started after `from` were answered over at
/// least `WINDOW` (first to last start), so that "admitted again after Redis returned" has
/// traffic to judge: the mixed load alone left a 350 ms window without a single one on a
/// busy machine. Returns at once when the load stops; gives up after [`DEADLINE`] (the check
/// then reports the window with what it holds).
async fn shared_traffic_since(soak: &Soak, from: Instant) {
    let deadline = Instant::now() + DEADLINE;
    while !soak.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let span = {
            let exchanges = soak.exchanges.as_ref().expect("kept").lock().unwrap();
            let starts = exchanges
                .iter()
                .filter(|e| e.started >= from && e.answer.is_some() && shared(&e.plan))
                .map(|e| e.started);
            let (first, last) = starts.fold((None, None), |(lo, hi), at| {
                (
                    Some(lo.map_or(at, |lo: Instant| lo.min(at))),
                    Some(hi.map_or(at, |hi: Instant| hi.max(at))),
                )
            });
            first.zip(last).map(|(first, last)| last - first)
        };
        if span.is_some_and(|span| span >= WINDOW) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until sluice says its store is up; false after [`DEADLINE`].
async fn store_up(soak: &Soak) -> bool {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        let capacity = admin(soak, "GET", "/admin/capacity", "").await.json();
        if capacity["store"]["up"] == true {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Whether the store judges `plan`'s request: a configured resource or the anonymous bucket
/// of the rate-limited service (unknown keys are judged by each replica alone).
fn shared(plan: &Plan) -> bool {
    plan.up != Up::Garbage
        && !plan
            .key
            .as_deref()
            .is_some_and(|k| k.starts_with(UNKNOWN_KEY_PREFIX))
}

/// Check every exchange against the Redis faults and sluice's own store outages; returns
/// (503s, requests that arrived while Redis was known to be away).
fn check_answers_against_faults(
    soak: &Soak,
    faults: &[RedisFault],
    outages: &[Outage],
    load_end: Instant,
) -> (u64, u64) {
    let exchanges = soak.exchanges.as_ref().expect("kept").lock().unwrap();
    let (mut unavailable, mut while_down) = (0, 0);
    for exchange in exchanges.iter() {
        let Some((status, reason)) = &exchange.answer else {
            continue;
        };
        let plan = &exchange.plan;
        let is_503 = *status == 503 && reason.as_deref() == Some("store_unavailable");
        // Around an injected fault, or while sluice said its store was unreachable (the log
        // line is written as the state changes; 100 ms for the line's own lag).
        let slack = Duration::from_millis(100);
        let around_a_fault = faults
            .iter()
            .any(|f| exchange.started <= f.to + RECOVER && exchange.ended >= f.from)
            || outages
                .iter()
                .any(|o| exchange.started <= o.to + slack && exchange.ended + slack >= o.from);
        let when = exchange.started.saturating_duration_since(soak.began);
        if is_503 {
            unavailable += 1;
            if !shared(plan) {
                soak.violations.add(
                    "store_unavailable for a request the store does not judge",
                    format!("{plan:?} {when:?} into the run"),
                );
            } else if !around_a_fault {
                soak.violations.add(
                    "503 store_unavailable while Redis was up",
                    format!("{plan:?} {when:?} into the run"),
                );
            }
        }
        // Arrived once sluice surely knew Redis was away (`DETECT` after it went, and after
        // sluice logged it: on a busy machine the failing call can take longer), and well
        // before it came back.
        let down = faults.iter().any(|f| {
            let logged = outages
                .iter()
                .filter(|o| o.from <= f.to && o.to >= f.from)
                .map(|o| o.from)
                .min();
            let known = logged.map_or(f.from + DETECT, |at| at.max(f.from + DETECT));
            exchange.started >= known && exchange.started + Duration::from_millis(100) <= f.to
        });
        if down && shared(plan) {
            while_down += 1;
            if !is_503 {
                soak.violations.add(
                    "not on_error = \"deny\" while Redis was away",
                    format!("{plan:?}: {status} {reason:?}, {when:?} into the run"),
                );
            }
        }
    }
    // Admitted again after each return: some request of a shared resource got its 200
    // between the recovery and the next fault.
    for (i, fault) in faults.iter().enumerate() {
        let from = fault.to + RECOVER;
        let to = faults.get(i + 1).map_or(load_end, |next| next.from);
        let outage_meanwhile = outages.iter().any(|o| o.from <= to && o.to >= from);
        if to < from + WINDOW || outage_meanwhile {
            continue;
        }
        let admitted = exchanges.iter().any(|e| {
            e.started >= from
                && e.started < to
                && shared(&e.plan)
                && matches!(e.answer, Some((200, _)))
        });
        // A machine busy enough that the clients started no request of a shared resource
        // then says nothing about sluice either way.
        let asked = exchanges
            .iter()
            .any(|e| e.started >= from && e.started < to && shared(&e.plan));
        if !admitted && asked {
            // What the shared resources' requests got instead, for the diagnosis.
            let mut answers = std::collections::BTreeMap::<String, u32>::new();
            let started_then = exchanges
                .iter()
                .filter(|e| e.started >= from && e.started < to)
                .inspect(|e| {
                    if shared(&e.plan) {
                        *answers.entry(format!("{:?}", e.answer)).or_default() += 1;
                    }
                })
                .count();
            soak.violations.add(
                "nothing admitted after Redis returned",
                format!(
                    "{} from {:?} to {:?} into the run; {started_then} requests started then, \
                     the shared ones answered {answers:?}",
                    fault.kind,
                    from.saturating_duration_since(soak.began),
                    to.saturating_duration_since(soak.began)
                ),
            );
        }
    }
    (unavailable, while_down)
}

/// Once the load is over: a quick burst of team-a (40 TPS, burst 40) is held to its limit
/// through the store, and its bucket is in Redis again. Returns (admitted, refused, took) and
/// when each `503` of the burst started and ended: one is a violation unless sluice logged a
/// store outage then (a store call over `store.timeout` on a busy machine, when on_error =
/// deny rightly applies; see [`unexplained_503s`]).
async fn shared_limit_holds(
    soak: &Soak,
    redis: &Mutex<RedisServer>,
) -> (u64, u64, Duration, Vec<(Instant, Instant)>) {
    const BURST: u64 = 120;
    let client = soak.pooled.lock().unwrap().clone();
    let started = Instant::now();
    let (mut admitted, mut refused, mut unavailable) = (0, 0, Vec::new());
    for i in 0..BURST {
        let sent = Instant::now();
        let request = Request::get(format!(
            "http://{}/score?id={}&up=ok",
            soak.addr,
            950_000_000 + i
        ))
        .header("x-api-key", KEY_A)
        .body(UploadBody::Full(None))
        .expect("a valid request");
        let Ok(response) = client.request(request).await else {
            continue;
        };
        let seen = read_response(response, false).await;
        match (seen.status, seen.reason.as_deref()) {
            (200, _) => admitted += 1,
            (429, Some("rate_limited")) => refused += 1,
            (503, _) => unavailable.push((sent, Instant::now())),
            _ => {}
        }
    }
    let took = started.elapsed();
    // The burst, what refilled meanwhile, and 10 % for lease batches in flight.
    let bound = ((40.0 + 40.0 * took.as_secs_f64()) * 1.1).ceil() as u64 + 2;
    if admitted > bound || refused == 0 {
        soak.violations.add(
            "shared limit not held after Redis returned",
            format!(
                "{admitted} admitted, {refused} refused of {BURST} in {took:?} (at most {bound})"
            ),
        );
    }
    let bucket = redis
        .lock()
        .unwrap()
        .command(&["EXISTS", &format!("{PREFIX}rate:scoring:team-a")]);
    if bucket != "1" {
        soak.violations.add(
            "team-a's shared bucket not in Redis after it returned",
            format!("EXISTS: {bucket}"),
        );
    }
    (admitted, refused, took, unavailable)
}

/// Of `unavailable` (start and end of each `503`), those during no store outage that sluice
/// logged (100 ms for the log line's own lag).
fn unexplained_503s(unavailable: &[(Instant, Instant)], outages: &[Outage]) -> usize {
    let slack = Duration::from_millis(100);
    unavailable
        .iter()
        .filter(|&&(from, to)| {
            !outages
                .iter()
                .any(|o| from <= o.to + slack && to + slack >= o.from)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_the_redis_store_while_redis_dies_and_hangs() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Settings {
        store_soak: soak_for,
        seed,
        ..
    } = settings();
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let redis_url = redis.url();
    let redis = Arc::new(Mutex::new(redis));
    let began = Instant::now();
    let clock = (Instant::now(), chrono::Utc::now());
    let endpoints = Endpoints::start().await;
    let (garbage, garbage_tally) = garbage_endpoint().await;
    let store = format!(
        "\n[store]\nbackend = \"redis\"\nurl = \"{redis_url}\"\nkey_prefix = \"{PREFIX}\"\n\
         on_error = \"deny\"\nheartbeat = \"{}ms\"\ntimeout = \"{}ms\"\n",
        HEARTBEAT.as_millis(),
        STORE_TIMEOUT.as_millis()
    );
    let file = write_config(
        "soak-store",
        &(config_text(&endpoints, garbage, 4, 8) + &store),
    );
    let (sluice, soak) = start_soak(&file, &endpoints, began, true).await;
    assert!(store_up(&soak).await, "sluice never reached its Redis");

    // Warm up without faults, then take the baseline with nothing in flight.
    load(&soak, seed, 0, WARM_UP).await;
    *soak.pooled.lock().unwrap() = new_pool();
    let (rss_base, fds_base, _) = settle(&soak, &sluice).await;
    let warm_requests = soak.answers.total();

    let soak_started = Instant::now();
    soak.stop.store(false, Ordering::Relaxed);
    let faults = Arc::new(Mutex::new(Vec::new()));
    let endpoint_faults = tokio::spawn(inject_faults(
        Arc::clone(&soak),
        Arc::clone(&sluice),
        file.clone(),
        garbage,
        seed,
        false,
    ));
    let redis_faults = tokio::spawn(inject_redis_faults(
        Arc::clone(&soak),
        Arc::clone(&redis),
        Arc::clone(&faults),
        seed,
    ));
    let gauges = tokio::spawn(watch_gauges(Arc::clone(&soak)));
    load(&soak, seed.wrapping_add(1), 1_000_000_000, soak_for).await;
    let load_end = Instant::now();
    endpoint_faults.await.expect("endpoint fault injector");
    redis_faults.await.expect("Redis fault injector");
    let samples = gauges.await.expect("gauge watch");
    let soak_took = soak_started.elapsed();
    let requests = soak.answers.total() - warm_requests;

    if !store_up(&soak).await {
        soak.violations
            .add("store not up again after Redis returned", String::new());
    }
    let faults = std::mem::take(&mut *faults.lock().unwrap());
    let outages = logged_outages(&sluice.lock().await.json_lines(), clock);
    // sluice's outages that no injected fault explains: store calls over `store.timeout` on
    // this busy machine (reported, not violations: that is what the timeout is for).
    let unexplained: Vec<&Outage> = outages
        .iter()
        .filter(|o| {
            !faults
                .iter()
                .any(|f| o.from <= f.to + RECOVER && o.to + RECOVER >= f.from)
        })
        .collect();
    let (unavailable, while_down) =
        check_answers_against_faults(&soak, &faults, &outages, load_end);
    let (admitted, refused, burst_took, burst_503s) = shared_limit_holds(&soak, &redis).await;
    let outages_then = logged_outages(&sluice.lock().await.json_lines(), clock);
    let unexplained_503 = unexplained_503s(&burst_503s, &outages_then);
    if unexplained_503 > 0 {
        soak.violations.add(
            "503 after Redis returned and the store was up",
            format!(
                "{unexplained_503} of the final burst's {} 503s with no store outage logged",
                burst_503s.len()
            ),
        );
    }

    *soak.pooled.lock().unwrap() = new_pool();
    let (rss_end, fds_end, drained) = settle(&soak, &sluice).await;
    if fds_end > fds_base + 4 {
        soak.violations.add(
            "file descriptors not back to baseline",
            format!("{fds_base} → {fds_end}"),
        );
    }

    // No plain key in Redis, in a key's name or in a value; and sluice's data is there, so
    // the check looked at something.
    let stored = redis.lock().unwrap().dump(&format!("{PREFIX}*"));
    if stored.is_empty() {
        soak.violations
            .add("no sluice data in Redis to check for keys", String::new());
    }
    for (key, value) in &stored {
        if let Some(plain) = leaked_key(format!("{key} {value}").as_bytes()) {
            soak.violations
                .add("key in Redis", format!("{plain} in {key}"));
        }
    }

    let mut running = sluice.lock().await;
    running.signal("TERM");
    let exit = running.wait_exit(SHUTDOWN_GRACE + DEADLINE).await;
    if exit.code() != Some(0) {
        soak.violations
            .add("exit after SIGTERM", format!("{exit:?}"));
    }
    let output = running.output();
    if let Some(key) = leaked_key(output.as_bytes()) {
        let line = output.lines().find(|l| l.contains(key)).unwrap_or_default();
        soak.violations.add("key in the log", line.to_owned());
    }
    let panics: Vec<&str> = output
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("panic"))
        .collect();
    if !panics.is_empty() {
        soak.violations.add("panic in the log", panics.join("\n"));
    }
    endpoints.cycle_all(&soak.violations).await;

    soak.judge_garbage_timeouts(&garbage_tally);
    let violations = soak.violations.total();
    let (kinds, examples) = soak.violations.0.lock().unwrap().clone();
    let peaks = *endpoints.max_peak.lock().unwrap();
    let down: Duration = faults.iter().map(|f| f.to - f.from).sum();
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "soak-store: seed {seed}, {:.1} s of faults ({WORKERS} clients, {H2_CONNECTIONS} HTTP/2 \
         connections of {H2_STREAMS} streams among them; store.on_error deny, timeout \
         {STORE_TIMEOUT:?}, heartbeat {HEARTBEAT:?}); whole run {:.1} s",
        soak_took.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        summary,
        "soak-store: requests {requests} during the faults ({:.0}/s), {warm_requests} in the warm-up",
        requests as f64 / soak_took.as_secs_f64(),
    );
    let _ = writeln!(
        summary,
        "soak-store: Redis away {} times, {:.1} s in all; {while_down} requests of shared \
         resources arrived while it was known away (all must be 503); 503 store_unavailable \
         {unavailable} in all",
        faults.len(),
        down.as_secs_f64()
    );
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for outage in &unexplained {
        *errors.entry(outage.error.as_str()).or_default() += 1;
    }
    let _ = writeln!(
        summary,
        "soak-store: sluice logged {} store outages; {} of them with Redis up (calls over \
         store.timeout on this busy machine; on_error applied, as designed), {:.2} s in all: {errors:?}",
        outages.len(),
        unexplained.len(),
        unexplained
            .iter()
            .map(|o| (o.to - o.from).as_secs_f64())
            .fold(0.0, |all, secs| all + secs)
    );
    let _ = writeln!(
        summary,
        "soak-store: after the load, team-a (40 TPS, burst 40): {admitted} admitted, {refused} \
         refused of a burst of 120 in {burst_took:?}"
    );
    soak.write_tallies(&mut summary, "soak-store", &garbage_tally);
    let _ = writeln!(
        summary,
        "soak-store: most served at once by one endpoint: {} as it counted, {} with abandoned \
         exchanges ended when sluice gave them up (cap {CAP_HIGH}); gauge samples {samples}",
        peaks.0, peaks.1
    );
    let _ = writeln!(
        summary,
        "soak-store: gauges back to 0 after {drained:?}; RSS baseline {rss_base} KiB, end \
         {rss_end} KiB; open fds baseline {fds_base}, end {fds_end}; {} keys under {PREFIX} in \
         Redis, none with a plain key; exit {:?}",
        stored.len(),
        exit.code()
    );
    let _ = writeln!(summary, "soak-store: violations {violations} {kinds:?}");
    for example in &examples {
        let _ = writeln!(summary, "soak-store:   {example}");
    }
    eprint!("{summary}");
    assert_eq!(violations, 0, "invariants broken:\n{summary}");
}
