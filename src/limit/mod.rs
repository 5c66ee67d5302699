//! Per-resource (API key) rate limits: key extraction, GCRA buckets whose limits change live
//! without a lock, the bounded table for unknown keys, and the RateLimit headers.
//!
//! Why not the governor crate: its limiters fix their quota at construction, so every live
//! change (autoscale, admin, reload) would replace the limiter and reset the caller's usage,
//! and its keyed store has no bound on keys. GCRA itself is a few lines (`gcra.rs`).

mod admit;
mod gcra;
mod headers;
mod index;
mod keys;
mod lease;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use http::header::{HeaderMap, HeaderName};
use tokio::time::Instant;

use crate::autoscale::ResourceMetrics;
use crate::config::{RateLimitConfig, ResourceConfig};
use crate::stats::{self, RecentCount};
pub use admit::{Admission, Cell, KeyProblem};
pub use gcra::{Bucket, Quota, Verdict};
pub use headers::Status;
use index::ResourceIndex;
pub use keys::{DigestMemo, KeySource, KeyTable};
pub use lease::{
    share_of, Ask, Grant, Lease, Local, Reservation, SharedBuckets, SharedError, StoreFailure,
    LEASE_TTL,
};

/// Name under which requests with unknown keys are counted (keys themselves are never shown);
/// config validation reserves it.
pub const UNKNOWN: &str = crate::config::UNKNOWN_RESOURCE;
/// Name of the shared bucket of key-less requests when `missing_key = "anonymous"`; config
/// validation reserves it.
pub const ANONYMOUS: &str = crate::config::ANONYMOUS_RESOURCE;

/// Counts per resource, since start and over the last minute; `succeeded` (2xx from the
/// endpoint) is what a caller is billed for.
#[derive(Debug, Default)]
#[repr(C)]
pub struct Counters {
    /// Requests that passed the rate check.
    pub admitted: RecentCount,
    /// Requests refused with 429 for rate.
    pub throttled: RecentCount,
    /// Admitted requests the endpoint answered with 2xx.
    pub succeeded: RecentCount,
}

/// A caller with a name, a base limit and a live (possibly autoscaled) limit.
///
/// Laid out so that an admission reads and writes one cache line of it (the fields up to
/// `counters.admitted`'s count, the key's mark among them): with 100k resources most requests
/// miss the CPU's caches on their resource, and each further line was one more miss
/// (BENCHMARKS.md, scenario 4).
#[derive(Debug)]
#[repr(C, align(64))]
pub struct Resource {
    bucket: Bucket,
    /// Autoscale metric windows, once the service autoscales (swapped when their shape
    /// changes). Checking for them costs a plain load; an `ArcSwapOption` would cost two
    /// atomic writes per request also when there are none.
    metrics: OnceLock<ArcSwap<ResourceMetrics>>,
    /// With a shared store: its bucket's key and this replica's lease on it.
    shared: Option<Box<(String, Lease)>>,
    /// The salted tag of its key, left by the limiter that last learned it (see `index`).
    key_mark: AtomicU64,
    /// Admitted / throttled / succeeded (`admitted` first: see above).
    pub counters: Counters,
    /// Name from the config; what logs, metrics and responses show.
    pub name: Arc<str>,
    base: AtomicU64,
    autoscale: AtomicBool,
}

impl Resource {
    /// A resource whose live limit starts at its base; with `shared`, its bucket is the one
    /// at that store key, shared by the fleet.
    pub fn new(name: &str, base: Quota, autoscale: bool, shared: Option<String>) -> Self {
        Self {
            shared: shared.map(|key| Box::new((key, Lease::new(base)))),
            name: name.into(),
            bucket: Bucket::new(base),
            base: AtomicU64::new(base.pack()),
            autoscale: AtomicBool::new(autoscale),
            counters: Counters::default(),
            metrics: OnceLock::new(),
            key_mark: AtomicU64::new(0),
        }
    }

    /// Whether the key a limiter learned last for it has this mark.
    fn holds(&self, mark: u64) -> bool {
        self.key_mark.load(Ordering::Relaxed) == mark
    }

    /// Remember that a limiter learned its key under this mark.
    fn hold(&self, mark: u64) {
        self.key_mark.store(mark, Ordering::Relaxed);
    }

    /// Feed these autoscale windows from now on.
    pub fn attach_metrics(&self, metrics: Arc<ResourceMetrics>) {
        self.metrics
            .get_or_init(|| ArcSwap::new(Arc::clone(&metrics)))
            .store(metrics);
    }

    /// The limit configured for it.
    pub fn base(&self) -> Quota {
        Quota::unpack(self.base.load(Ordering::Acquire))
    }

    /// The limit in force now.
    pub fn limit(&self) -> Quota {
        self.bucket.quota()
    }

    /// Whether the autoscaler may change its limit.
    pub fn autoscale(&self) -> bool {
        self.autoscale.load(Ordering::Acquire)
    }

    /// Set the live limit to `tps`, scaling the burst in proportion to the base's.
    pub fn set_tps(&self, tps: NonZeroU32) {
        let base = self.base();
        let burst = u64::from(base.burst.get()) * u64::from(tps.get()) / u64::from(base.tps.get());
        let burst =
            NonZeroU32::new(u32::try_from(burst).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        self.bucket.set_quota(Quota { tps, burst });
    }

    /// Change the base limit and the autoscale flag. Without autoscale the live limit is the
    /// base, at once; with it, the autoscaler sets the live limit.
    pub fn reconfigure(&self, base: Quota, autoscale: bool) {
        self.autoscale.store(autoscale, Ordering::Release);
        self.base.store(base.pack(), Ordering::Release);
        if !autoscale {
            self.bucket.set_quota(base);
        }
    }

    fn check(&self, now: u64) -> (Quota, Verdict) {
        self.bucket.check(now)
    }

    fn count(&self, admitted: bool, at: Instant) {
        let count = if admitted {
            &self.counters.admitted
        } else {
            &self.counters.throttled
        };
        count.add_at(stats::uptime_at(at).as_secs());
        if let Some(metrics) = self.metrics.get() {
            let metrics = metrics.load();
            let (a, t) = if admitted { (1, 0) } else { (0, 1) };
            metrics.record(at.into_std(), a, t);
        }
    }
}

/// Hashes SHA-256 digests by taking 8 of their bytes: they are uniform already, so a second
/// hash (SipHash) would only cost time. An attacker cannot aim at a bucket without breaking
/// SHA-256.
#[derive(Debug, Clone, Copy, Default)]
struct DigestHasher;

impl std::hash::BuildHasher for DigestHasher {
    type Hasher = DigestHash;
    fn build_hasher(&self) -> DigestHash {
        DigestHash(0)
    }
}

#[derive(Debug)]
struct DigestHash(u64);

impl std::hash::Hasher for DigestHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Arrays hash as a length prefix (`write_usize`) then their bytes.
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, _length: usize) {}
}

/// A service's rate limits: its resources by key digest, the unknown-key table, the settings.
#[derive(Debug)]
pub struct RateLimiter {
    settings: RateLimitConfig,
    keys: KeySource,
    /// Positions in `resources`, by key digest.
    by_digest: HashMap<[u8; 32], usize, DigestHasher>,
    /// The resources of the keys seen, by tag: most requests find theirs here.
    index: ResourceIndex,
    resources: Vec<Arc<Resource>>,
    unknown: Arc<Resource>,
    anonymous: Arc<Resource>,
    table: Arc<KeyTable>,
    /// Digests of the keys seen lately; kept across reloads (a digest never changes).
    memo: Arc<DigestMemo>,
    epoch: Instant,
    fleet: Option<Arc<dyn SharedBuckets>>,
}

/// Nanoseconds from `epoch` to `at` (a limiter's clock).
fn nanos_since(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// The base quota a resource config asks for.
pub fn base_quota(settings: &RateLimitConfig, resource: Option<&ResourceConfig>) -> Quota {
    let nz = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
    let tps = nz(resource.and_then(|r| r.tps).unwrap_or(settings.default_tps));
    Quota::new(tps, resource.and_then(|r| r.burst).map(nz))
}

impl RateLimiter {
    /// Build from validated settings. Resources that keep their name in `previous`, the
    /// unknown-key table (if its bound is unchanged) and the clock carry over, so usage and
    /// counters survive a policy change. With `fleet`, the resources of `service` use the
    /// fleet's shared buckets.
    pub fn from_config(
        settings: &RateLimitConfig,
        resources: &[ResourceConfig],
        previous: Option<&RateLimiter>,
        fleet: Option<(&Arc<dyn SharedBuckets>, &str)>,
    ) -> Self {
        let reuse = |name: &str, base: Quota, autoscale: bool| {
            let old = previous.and_then(|p| p.find(name));
            match old {
                Some(old) => {
                    old.reconfigure(base, autoscale);
                    Arc::clone(old)
                }
                None => {
                    let key = fleet.map(|(f, service)| f.bucket_key(service, name));
                    Arc::new(Resource::new(name, base, autoscale, key))
                }
            }
        };
        let default = base_quota(settings, None);
        let mut by_digest = HashMap::with_capacity_and_hasher(resources.len(), DigestHasher);
        let mut list = Vec::with_capacity(resources.len());
        for config in resources {
            let resource = reuse(
                &config.name,
                base_quota(settings, Some(config)),
                config.autoscale,
            );
            if let Some(digest) = config.key_digest() {
                by_digest.insert(digest, list.len());
            }
            list.push(resource);
        }
        let capacity = settings.max_tracked_keys as usize;
        let table = match previous {
            Some(p) if p.table.capacity() == capacity => Arc::clone(&p.table),
            _ => Arc::new(KeyTable::new(capacity)),
        };
        let header = HeaderName::from_bytes(settings.key_header.as_bytes())
            .unwrap_or(http::header::AUTHORIZATION);
        Self {
            settings: settings.clone(),
            keys: KeySource::new(header),
            index: ResourceIndex::new(by_digest.len()),
            by_digest,
            resources: list,
            unknown: reuse(UNKNOWN, default, false),
            anonymous: reuse(ANONYMOUS, default, false),
            table,
            memo: previous.map_or_else(Arc::default, |p| Arc::clone(&p.memo)),
            epoch: previous.map_or_else(Instant::now, |p| p.epoch),
            fleet: fleet.map(|(f, _)| Arc::clone(f)),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &RateLimitConfig {
        &self.settings
    }

    /// Configured resources, in config order.
    pub fn resources(&self) -> &[Arc<Resource>] {
        &self.resources
    }

    /// A configured resource, or the built-in "unknown" / "anonymous" ones, by name.
    pub fn find(&self, name: &str) -> Option<&Arc<Resource>> {
        match name {
            UNKNOWN => Some(&self.unknown),
            ANONYMOUS => Some(&self.anonymous),
            _ => self.resources.iter().find(|r| &*r.name == name),
        }
    }

    /// Unknown keys tracked now.
    pub fn tracked_keys(&self) -> usize {
        self.table.len()
    }

    /// Configured resources plus the built-in "unknown" and "anonymous" ones.
    pub fn all_resources(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.resources
            .iter()
            .chain([&self.unknown, &self.anonymous])
    }

    /// Nanoseconds on the limiter's clock at `at`.
    fn nanos(&self, at: Instant) -> u64 {
        nanos_since(self.epoch, at)
    }

    /// The configured resource of `key`, or the key's digest when it is nobody's.
    fn configured(&self, key: &[u8]) -> Result<&Arc<Resource>, [u8; 32]> {
        let tag = self.memo.tag(key);
        if let Some(resource) = self.index.get(tag, &self.resources) {
            return Ok(resource);
        }
        let digest = self.memo.digest(key, tag);
        let position = *self.by_digest.get(&digest).ok_or(digest)?;
        self.index.learn(tag, position, &self.resources);
        Ok(&self.resources[position])
    }

    /// The `WWW-Authenticate` challenge of a 401: `Bearer`, or the header that carries keys.
    pub fn challenge(&self) -> http::HeaderValue {
        let header = self.keys.header();
        if header == http::header::AUTHORIZATION {
            http::HeaderValue::from_static("Bearer")
        } else {
            http::HeaderValue::from_str(&format!("ApiKey header=\"{header}\""))
                .unwrap_or_else(|_| http::HeaderValue::from_static("ApiKey"))
        }
    }

    /// Add the RateLimit headers for `status` to a response.
    pub fn insert_headers(&self, headers: &mut HeaderMap, status: &Status) {
        headers::insert(headers, status, self.settings.legacy_headers);
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn an_admission_touches_one_line_of_its_resource() {
        let hot_end = offset_of!(Resource, counters)
            + offset_of!(Counters, admitted)
            + std::mem::size_of::<[AtomicU64; 2]>();
        assert!(hot_end <= 64, "hot fields end at byte {hot_end}");
        assert_eq!(std::mem::align_of::<Resource>(), 64);
        // Three lines: with 100k resources, every line more is pages the CPU must map.
        assert!(std::mem::size_of::<Resource>() <= 192);
    }
}
