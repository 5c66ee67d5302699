//! sluice's GCRA (`src/limit/gcra.rs`, the per-caller bucket) checked against a reference
//! implementation: the `governor` crate's GCRA, under the same fake clock.
//!
//! Why sluice has its own GCRA at all (issue 15): a caller's quota changes live (admin edits,
//! the autoscaler) and must keep the usage recorded so far; governor's `RateLimiter` has its
//! quota fixed at construction, so changing it means a new limiter with a full bucket. sluice
//! therefore keeps its hand-written GCRA for the runtime, and governor is used here only, as
//! a dev-dependency, to show that for a fixed quota the two decide every request alike:
//!
//! * admitted or refused;
//! * on a refusal, sluice's `retry_after_ns` equals governor's `NotUntil::wait_time_from(now)`
//!   to the nanosecond;
//! * on an admission, sluice's `remaining` equals governor's
//!   `StateSnapshot::remaining_burst_capacity()`;
//! * the emission interval: sluice's `Quota::interval_ns()` (1 s / tps, rounded down) equals
//!   governor's own conversion, `Quota::per_second(tps).replenish_interval()` (also
//!   `Duration::from_secs(1)` divided by tps, rounded down), and the quota governor reports with
//!   each decision has that interval and sluice's burst.
//!
//! They must agree, not merely be close. With interval I and burst B, sluice refuses when
//! `max(tat, now) + I - now > I * B` and says retry in `tat + I - now - I * B`; governor
//! (tolerance `tau = I * (B - 1)`) refuses when `now < tat - tau` and says wait
//! `tat - tau - now`: the same condition and the same number. On an admission both count
//! `(I * B - (new_tat - now)) / I` left. Any difference, even of 1 ns, is a bug in one of them.
//!
//! The interval is computed by each side independently and compared first; only then is the
//! governor limiter built from it (`Quota::with_period(interval).allow_burst(burst)`), so a
//! change to sluice's rounding of the interval fails here rather than being copied into the
//! reference. Not compared: sluice's `reset_ns` (governor does not expose its TAT on an
//! admission) and live quota changes (governor has none).
//!
//! The cases (2000 random quotas with about 1.5 million requests, and 2000 quotas emptied and
//! waited out; about a second in a debug build) come from a small deterministic PRNG
//! (splitmix64) with a fixed seed; set `GCRA_REFERENCE_SEED` (decimal or 0x-hex) to run other
//! cases. A failure names the seed, the case and the requests that led to it.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use sluice::limit::{Bucket, Quota, Verdict};

/// The seed used unless `GCRA_REFERENCE_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0x5EED_0015_6C4A;
/// Random quotas with random arrivals (test 1).
const CASES: usize = 2000;
/// Random quotas exhausted and waited out (test 2).
const WAIT_CASES: usize = 2000;
/// sluice's config bounds for tps and burst (`TPS_CEILING`: `rate_limit.max_tps` and a
/// resource's `burst` are both at most this).
const CEILING: u32 = sluice::config::TPS_CEILING;

// ---------------------------------------------------------------------------------------------
// Deterministic randomness

/// splitmix64: tiny, deterministic on every platform, good enough to pick test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (the modulo bias is irrelevant here).
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// Roughly log-uniform in `1..=max`: a random number of decimal digits, then a value with
    /// that many (integers only, so a seed gives the same cases everywhere).
    fn log_uniform(&mut self, max: u64) -> u64 {
        let digits = self.between(0, u64::from(max.ilog10()));
        let lo = 10u64.pow(digits as u32);
        self.between(lo, (lo * 10 - 1).min(max))
    }
}

fn seed() -> u64 {
    let Ok(text) = std::env::var("GCRA_REFERENCE_SEED") else {
        return DEFAULT_SEED;
    };
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("GCRA_REFERENCE_SEED={text:?} is not a u64"))
}

/// tps within sluice's bounds: log-uniform, plus rates whose interval 1 s / tps is not a whole
/// number of ns (rounding) and the bounds themselves.
fn random_tps(rng: &mut Rng) -> u32 {
    const SPECIAL: &[u32] = &[
        1, 2, 3, 7, 10, 999, 1000, 1024, 3333, 333_333, 999_999, CEILING,
    ];
    if rng.chance(25) {
        SPECIAL[rng.between(0, SPECIAL.len() as u64 - 1) as usize]
    } else {
        rng.log_uniform(u64::from(CEILING)) as u32
    }
}

/// Burst within sluice's bounds: mostly up to 1000 (so that random arrivals do empty the
/// bucket), now and then up to the ceiling.
fn random_burst(rng: &mut Rng) -> u32 {
    match rng.between(0, 99) {
        0..=9 => 1,
        10..=94 => rng.log_uniform(1000) as u32,
        _ => rng.log_uniform(u64::from(CEILING)) as u32,
    }
}

fn quota(tps: u32, burst: u32) -> Quota {
    Quota {
        tps: NonZeroU32::new(tps).unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// The two limiters side by side

type Governor =
    governor::RateLimiter<NotKeyed, InMemoryState, FakeRelativeClock, StateInformationMiddleware>;

/// One request's decision, in terms both limiters can state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Admit { remaining: u32 },
    Refuse { retry_after_ns: u64 },
}

/// A sluice bucket and a governor limiter with the same quota, at the same time.
struct Pair {
    quota: Quota,
    sluice: Bucket,
    governor: Governor,
    clock: FakeRelativeClock,
    now: u64,
}

impl Pair {
    /// Both limiters, full, at time 0. Fails if the two compute different intervals.
    fn new(quota: Quota) -> Result<Self, String> {
        let interval = governor::Quota::per_second(quota.tps).replenish_interval();
        if u128::from(quota.interval_ns()) != interval.as_nanos() {
            return Err(format!(
                "emission interval for tps {}: sluice {} ns, governor {} ns",
                quota.tps,
                quota.interval_ns(),
                interval.as_nanos()
            ));
        }
        let reference = governor::Quota::with_period(interval)
            .expect("a nonzero interval")
            .allow_burst(quota.burst);
        let clock = FakeRelativeClock::default();
        let governor = governor::RateLimiter::direct_with_clock(reference, clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        Ok(Self {
            quota,
            sluice: Bucket::new(quota),
            governor,
            clock,
            now: 0,
        })
    }

    fn advance(&mut self, by: u64) {
        self.now += by;
        self.clock.advance(Duration::from_nanos(by));
        assert_eq!(self.clock.now().as_u64(), self.now);
    }

    /// One request at the current time, judged by both; an error says how they differ.
    fn request(&self) -> Result<Decision, String> {
        let (used, verdict) = self.sluice.check(self.now);
        let ours = match verdict {
            Verdict::Admit { remaining, .. } => Decision::Admit { remaining },
            Verdict::Refuse { retry_after_ns } => Decision::Refuse { retry_after_ns },
        };
        let (theirs, their_quota) = match self.governor.check() {
            Ok(snapshot) => (
                Decision::Admit {
                    remaining: snapshot.remaining_burst_capacity(),
                },
                snapshot.quota(),
            ),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now()).as_nanos();
                let retry_after_ns = u64::try_from(wait).expect("a wait under 584 years");
                (Decision::Refuse { retry_after_ns }, not_until.quota())
            }
        };
        if used != self.quota
            || u128::from(used.interval_ns()) != their_quota.replenish_interval().as_nanos()
            || used.burst != their_quota.burst_size()
        {
            return Err(format!(
                "quota: sluice used {used:?} (interval {} ns), governor {their_quota:?}",
                used.interval_ns()
            ));
        }
        if ours != theirs {
            return Err(format!("sluice {ours:?}, governor {theirs:?}"));
        }
        Ok(ours)
    }
}

/// One case's requests, on which both limiters agreed, to describe a failure.
struct Log {
    seed: u64,
    case: usize,
    quota: Quota,
    requests: Vec<(u64, Decision)>,
}

impl Log {
    fn new(seed: u64, case: usize, quota: Quota) -> Self {
        Self {
            seed,
            case,
            quota,
            requests: Vec::new(),
        }
    }

    fn last(&self) -> Option<(u64, Decision)> {
        self.requests.last().copied()
    }

    /// A request to both limiters at the pair's time; the test fails where they differ.
    fn request(&mut self, pair: &Pair) -> Decision {
        match pair.request() {
            Ok(decision) => {
                self.requests.push((pair.now, decision));
                decision
            }
            Err(e) => self.fail(self.requests.len(), pair.now, &e),
        }
    }

    /// Fails the test unless `ok`, a statement about the last request.
    fn expect(&self, ok: bool, what: &str) {
        if !ok {
            self.fail_last(what)
        }
    }

    /// Fails the test on the last request.
    fn fail_last(&self, what: &str) -> ! {
        let (now, _) = self.last().expect("a request");
        self.fail(self.requests.len() - 1, now, what)
    }

    /// Panics with the seed, the quota, and the requests before request `index` (at `now`).
    fn fail(&self, index: usize, now: u64, what: &str) -> ! {
        let mut recent = String::new();
        for (i, (t, decision)) in self.requests.iter().enumerate().take(index) {
            if i + 12 >= index {
                recent += &format!("\n  #{i} at {t} ns: {decision:?}");
            }
        }
        let quota = self.quota;
        panic!(
            "GCRA_REFERENCE_SEED={} case {}: tps {} burst {} (interval {} ns)\n\
             request #{index} at {now} ns: {what}\nthe requests before it:{recent}",
            self.seed,
            self.case,
            quota.tps,
            quota.burst,
            quota.interval_ns(),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Arrival times for one case: runs of one pattern at a time, each run long enough (up to about
/// two bursts) to empty the bucket or let it fill.
struct Arrivals {
    interval: u64,
    window: u64,
    /// Caps a run, so that cases with a huge burst stay cheap.
    longest_run: u64,
    pattern: Pattern,
    left: u64,
}

#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// Requests at one instant.
    Burst,
    /// Requests a fixed gap apart: faster or slower than the rate, or exactly at it.
    Steady(u64),
    /// Gaps uniform in 0..=2 intervals.
    Jitter,
    /// After a refusal, wait exactly the retry-after given, plus this (-1, 0 or +1 ns); after an
    /// admission, none.
    AsTold(i64),
    /// One gap of at least the whole window (the bucket fills), sometimes exactly the window.
    Idle,
}

impl Arrivals {
    fn new(quota: Quota) -> Self {
        let interval = quota.interval_ns();
        Self {
            interval,
            window: interval * u64::from(quota.burst.get()),
            longest_run: 2 * u64::from(quota.burst.get().min(1000)) + 2,
            pattern: Pattern::Burst,
            left: 0,
        }
    }

    fn pick_pattern(&mut self, rng: &mut Rng) {
        let i = self.interval;
        self.pattern = match rng.between(0, 9) {
            0..=2 => Pattern::Burst,
            3 => {
                Pattern::Steady([i / 4, i / 2, i - 1, i, i + 1, 2 * i][rng.between(0, 5) as usize])
            }
            4 => Pattern::Steady(i * 9 / 10 + rng.between(0, i / 5)),
            5 => Pattern::Jitter,
            6..=8 => Pattern::AsTold(rng.between(0, 2) as i64 - 1),
            _ => Pattern::Idle,
        };
        self.left = match self.pattern {
            Pattern::Idle => 1,
            _ => rng.between(1, self.longest_run),
        };
    }

    /// The gap before the next request, given the last decision.
    fn next_gap(&mut self, rng: &mut Rng, last: Option<Decision>) -> u64 {
        if self.left == 0 {
            self.pick_pattern(rng);
        }
        self.left -= 1;
        match self.pattern {
            Pattern::Burst => 0,
            Pattern::Steady(gap) => gap,
            Pattern::Jitter => rng.between(0, 2 * self.interval),
            Pattern::AsTold(delta) => match last {
                Some(Decision::Refuse { retry_after_ns }) => {
                    retry_after_ns.checked_add_signed(delta).unwrap()
                }
                _ => 0,
            },
            Pattern::Idle if rng.chance(30) => self.window,
            Pattern::Idle => self.window * rng.between(1, 3) + rng.between(0, self.interval),
        }
    }
}

#[test]
fn sluice_decides_every_request_as_governor_does_for_random_quotas_and_arrivals() {
    let seed = seed();
    let mut rng = Rng(seed);
    let (mut requests, mut refusals, mut on_the_dot) = (0u64, 0u64, 0u64);
    for case in 0..CASES {
        let quota = quota(random_tps(&mut rng), random_burst(&mut rng));
        let mut log = Log::new(seed, case, quota);
        let mut pair = Pair::new(quota).unwrap_or_else(|e| log.fail(0, 0, &e));
        // Most cases start at the limiter's start; some later (the bucket is full either way).
        if rng.chance(20) {
            pair.advance(rng.between(1, 1 << 40));
        }
        let mut arrivals = Arrivals::new(quota);
        let count = rng.between(arrivals.longest_run / 2, arrivals.longest_run * 3 / 2);
        for _ in 0..count {
            let last = log.last();
            pair.advance(arrivals.next_gap(&mut rng, last.map(|(_, d)| d)));
            // A request exactly when the last refusal said the next would pass.
            if let Some((t, Decision::Refuse { retry_after_ns })) = last {
                on_the_dot += u64::from(pair.now == t + retry_after_ns);
            }
            if let Decision::Refuse { .. } = log.request(&pair) {
                refusals += 1;
            }
            requests += 1;
        }
    }
    // The arrivals must exercise both outcomes in earnest, and the boundary, or the comparison
    // proves little.
    eprintln!(
        "seed {seed}: {CASES} quotas, {requests} requests, {refusals} refused, \
         {on_the_dot} exactly when told"
    );
    assert!(
        refusals * 10 > requests && refusals * 10 < requests * 9 && on_the_dot * 100 > requests,
        "seed {seed}: too few refusals, admissions or requests on the dot"
    );
}

#[test]
fn a_refused_client_that_waits_as_told_is_admitted_and_one_ns_sooner_is_not() {
    let seed = seed();
    let mut rng = Rng(seed);
    for case in 0..WAIT_CASES {
        let quota = quota(random_tps(&mut rng), rng.log_uniform(1000) as u32);
        let mut log = Log::new(seed, case, quota);
        let mut pair = Pair::new(quota).unwrap_or_else(|e| log.fail(0, 0, &e));
        pair.advance(rng.between(0, 1 << 40));
        // Empty the bucket at one instant: exactly `burst` pass, the next is told one interval.
        for _ in 0..quota.burst.get() {
            let admitted = matches!(log.request(&pair), Decision::Admit { .. });
            log.expect(admitted, "refused within the burst");
        }
        let told = log.request(&pair);
        log.expect(
            told == Decision::Refuse {
                retry_after_ns: quota.interval_ns(),
            },
            "past the burst: refused, told one interval",
        );
        // Somewhere inside that wait, a few rounds of: refused, told some wait; back 1 ns before
        // it is over: refused, told 1 ns (a refusal uses nothing); back when it is over:
        // admitted, none left.
        pair.advance(rng.between(0, quota.interval_ns() - 1));
        for _ in 0..3 {
            let Decision::Refuse { retry_after_ns } = log.request(&pair) else {
                log.fail_last("admitted inside the wait")
            };
            pair.advance(retry_after_ns - 1);
            let early = log.request(&pair);
            log.expect(
                early == Decision::Refuse { retry_after_ns: 1 },
                "1 ns before the wait is over: refused, told 1 ns",
            );
            pair.advance(1);
            let on_time = log.request(&pair);
            log.expect(
                on_time == Decision::Admit { remaining: 0 },
                "the wait is over: admitted, none left",
            );
            pair.advance(rng.between(0, quota.interval_ns() - 1));
        }
    }
}
