//! RateLimit response headers (draft-ietf-httpapi-ratelimit-headers-11, Structured Fields).
//!
//! `RateLimit-Policy: "tps";q=10;w=1` states the steady rate. A burst other than one second's
//! quota is a second item, and the live `RateLimit` then reports on that burst bucket, which is
//! what `r` really counts: `"burst";q=30;w=3` (30 at once, refilled over 3 seconds), or, for a
//! burst smaller than the rate, `"burst";q=2;w=1` (only 2 pass at once; the draft's windows
//! are whole seconds, so this understates a refill that takes 0.2 s: the safe side).
//!
//! An endpoint's own `RateLimit` and `RateLimit-Policy` are kept and sluice's items appended
//! (the draft's rule for intermediaries: a client sees every limit in its path, and sluice
//! never looks more permissive than the origin).

use std::cell::RefCell;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::gcra::Quota;

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static LEGACY_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static LEGACY_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static LEGACY_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The live state of a caller's bucket, as told to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The quota in force.
    pub quota: Quota,
    /// Requests that would pass right now.
    pub remaining: u32,
    /// Whole seconds until the bucket is full again (after a refusal: until the next request
    /// passes, the same value as `Retry-After`).
    pub reset_secs: u64,
}

impl Status {
    /// The status once the request's cell was given back (it never reached an endpoint).
    pub fn with_cell_back(mut self) -> Self {
        self.remaining = self.remaining.saturating_add(1).min(self.quota.burst.get());
        self
    }
}

/// Quotas whose `RateLimit-Policy` each thread keeps built (direct-mapped by quota).
const POLICY_CACHE: usize = 64;

thread_local! {
    static POLICIES: RefCell<[Option<(Quota, HeaderValue)>; POLICY_CACHE]> =
        const { RefCell::new([const { None }; POLICY_CACHE]) };
}

/// `RateLimit-Policy` for `quota`, built once per quota and thread: most resources share a
/// few quotas, and a value cloned from this thread's copy is a reference-count increment on
/// a cache line no other core writes (a copy per resource was a cache miss per request with
/// 100k resources, BENCHMARKS.md scenario 4).
pub fn cached_policy_value(quota: Quota) -> HeaderValue {
    let slot = (quota.pack().wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % POLICY_CACHE;
    POLICIES.with_borrow_mut(|cache| match &cache[slot] {
        Some((cached, value)) if *cached == quota => value.clone(),
        _ => {
            let value = policy_value(quota);
            cache[slot] = Some((quota, value.clone()));
            value
        }
    })
}

/// `RateLimit-Policy` for `quota`.
pub fn policy_value(quota: Quota) -> HeaderValue {
    let (tps, burst) = (quota.tps.get(), quota.burst.get());
    let text = if burst != tps {
        let refill_secs = burst.div_ceil(tps);
        format!("\"tps\";q={tps};w=1, \"burst\";q={burst};w={refill_secs}")
    } else {
        format!("\"tps\";q={tps};w=1")
    };
    HeaderValue::from_str(&text).expect("digits, quotes and ASCII punctuation")
}

/// `RateLimit` for `status`, written without the formatting machinery (every response).
fn status_value(status: &Status) -> HeaderValue {
    let name: &[u8] = if status.quota.burst != status.quota.tps {
        b"\"burst\";r="
    } else {
        b"\"tps\";r="
    };
    let mut digits = itoa::Buffer::new();
    let mut text = Vec::with_capacity(40);
    text.extend_from_slice(name);
    text.extend_from_slice(digits.format(status.remaining).as_bytes());
    text.extend_from_slice(b";t=");
    text.extend_from_slice(digits.format(status.reset_secs).as_bytes());
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
        .expect("digits, quotes and ASCII punctuation")
}

/// Add sluice's `RateLimit-Policy` and `RateLimit` items after any the endpoint sent (field
/// lines of one name are one list), and the `X-RateLimit-*` trio when `legacy`, unless the
/// endpoint sent its own (those are single numbers, not lists: the origin's stay).
pub fn insert(headers: &mut HeaderMap, status: &Status, legacy: bool) {
    headers.append(RATELIMIT_POLICY.clone(), cached_policy_value(status.quota));
    headers.append(RATELIMIT.clone(), status_value(status));
    if legacy && !headers.contains_key(&LEGACY_LIMIT) && !headers.contains_key(&LEGACY_REMAINING) {
        headers.insert(
            LEGACY_LIMIT.clone(),
            HeaderValue::from(status.quota.tps.get()),
        );
        headers.insert(
            LEGACY_REMAINING.clone(),
            HeaderValue::from(status.remaining),
        );
        headers.insert(LEGACY_RESET.clone(), HeaderValue::from(status.reset_secs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn quota(tps: u32, burst: u32) -> Quota {
        Quota::new(NonZeroU32::new(tps).unwrap(), NonZeroU32::new(burst))
    }

    #[test]
    fn one_item_when_burst_is_one_second() {
        let mut h = HeaderMap::new();
        let status = Status {
            quota: quota(10, 10),
            remaining: 3,
            reset_secs: 1,
        };
        insert(&mut h, &status, false);
        assert_eq!(h["ratelimit-policy"], "\"tps\";q=10;w=1");
        assert_eq!(h["ratelimit"], "\"tps\";r=3;t=1");
        assert!(h.get("x-ratelimit-limit").is_none());
    }

    #[test]
    fn a_burst_below_the_rate_is_stated_as_it_is_enforced() {
        let mut h = HeaderMap::new();
        let status = Status {
            quota: quota(10, 2),
            remaining: 1,
            reset_secs: 1,
        };
        insert(&mut h, &status, false);
        assert_eq!(h["ratelimit-policy"], "\"tps\";q=10;w=1, \"burst\";q=2;w=1");
        assert_eq!(h["ratelimit"], "\"burst\";r=1;t=1");
    }

    #[test]
    fn an_origins_fields_are_kept_and_ours_appended() {
        let mut h = HeaderMap::new();
        h.insert(
            "ratelimit-policy",
            HeaderValue::from_static("\"origin\";q=100;w=60"),
        );
        h.insert(
            "ratelimit",
            HeaderValue::from_static("\"origin\";r=0;t=120"),
        );
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        let status = Status {
            quota: quota(999, 999),
            remaining: 998,
            reset_secs: 1,
        };
        insert(&mut h, &status, true);
        let all = |name| {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            all("ratelimit-policy"),
            ["\"origin\";q=100;w=60", "\"tps\";q=999;w=1"]
        );
        assert_eq!(
            all("ratelimit"),
            ["\"origin\";r=0;t=120", "\"tps\";r=998;t=1"]
        );
        assert_eq!(all("x-ratelimit-remaining"), ["0"]);
    }

    #[test]
    fn burst_is_a_second_item() {
        let mut h = HeaderMap::new();
        let status = Status {
            quota: quota(10, 25),
            remaining: 20,
            reset_secs: 1,
        };
        insert(&mut h, &status, true);
        assert_eq!(
            h["ratelimit-policy"],
            "\"tps\";q=10;w=1, \"burst\";q=25;w=3"
        );
        assert_eq!(h["ratelimit"], "\"burst\";r=20;t=1");
        assert_eq!(h["x-ratelimit-limit"], "10");
        assert_eq!(h["x-ratelimit-remaining"], "20");
    }

    #[test]
    fn cached_policies_match_their_quota() {
        // More quotas than slots, twice over: every answer is its own quota's value.
        for _round in 0..2 {
            for tps in 1..=300 {
                for burst in [tps, tps * 3] {
                    let q = quota(tps, burst);
                    assert_eq!(cached_policy_value(q), policy_value(q));
                }
            }
        }
    }
}
