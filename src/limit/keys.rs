//! Reading a caller's key from a request, and the bounded table of per-key state for keys that
//! match no configured resource. Keys are handled as bytes and hashed at once; only digests are
//! kept, so a key can never reach a log, a metric or a response.

use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};

use http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use lru::LruCache;
use siphasher::sip128::SipHasher13;

use super::gcra::{self, Quota, Verdict};
use crate::config::key_digest;

/// Slots of a [`DigestMemo`] (48 bytes each: 3 MiB of address space, resident only where
/// keys landed).
const MEMO_SLOTS: usize = 1 << 16;
const MEMO_SHARDS: usize = 16;

/// Remembers the SHA-256 digests of the keys seen lately, so a caller's key is hashed once
/// rather than on every request: SHA-256 of a short key costs about 3,400 instructions
/// without the CPU's SHA extensions, 8 % of a whole proxied request (BENCHMARKS.md), while a
/// look-up here costs a SipHash and one slot.
///
/// A slot is found by a 128-bit SipHash-1-3 of the key under a secret drawn at start and
/// holds that hash (the tag) with the digest; the key itself is never kept. Two keys only
/// share a tag by chance (about 2⁻¹²⁸ per pair; nobody can aim for it without the secret),
/// so a hit is the digest of this very key. Direct-mapped: a key that lands on a taken slot
/// replaces it, so a flood of new keys costs what it cost before (one SHA-256 each) and
/// memory stays fixed.
pub struct DigestMemo {
    hasher: SipHasher13,
    /// Slot `i` is in shard `i % MEMO_SHARDS`, at index `i / MEMO_SHARDS`.
    shards: Vec<Mutex<Vec<[u8; 48]>>>,
}

impl std::fmt::Debug for DigestMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestMemo")
    }
}

impl Default for DigestMemo {
    fn default() -> Self {
        Self {
            hasher: SipHasher13::new_with_key(&rand::random()),
            // All zero (an empty slot: tags are never 0), so the allocator hands out pages
            // that stay untouched until a key lands on them.
            shards: (0..MEMO_SHARDS)
                .map(|_| Mutex::new(vec![[0; 48]; MEMO_SLOTS / MEMO_SHARDS]))
                .collect(),
        }
    }
}

impl DigestMemo {
    /// The key's tag: a keyed 128-bit SipHash-1-3, never 0. It stands for the key wherever a
    /// key must be recognised again ([`super::ResourceIndex`], the memo's own slots).
    pub fn tag(&self, key: &[u8]) -> u128 {
        self.hasher.hash(key).as_u128() | 1
    }

    /// `key_digest(key)` for a key whose [`tag`](Self::tag) is `tag`, from the memo when the
    /// key was seen lately.
    pub fn digest(&self, key: &[u8], tag: u128) -> [u8; 32] {
        let slot = tag as usize % MEMO_SLOTS;
        let tag = tag.to_le_bytes();
        let mut shard = self.shards[slot % MEMO_SHARDS]
            .lock()
            // A slot is written whole under the lock; a poisoned shard holds whole slots.
            .unwrap_or_else(|p| p.into_inner());
        let entry = &mut shard[slot / MEMO_SHARDS];
        if entry[..16] == tag {
            return entry[16..].try_into().expect("32 bytes");
        }
        let digest = key_digest(key);
        entry[..16].copy_from_slice(&tag);
        entry[16..].copy_from_slice(&digest);
        digest
    }
}

/// Where a service's callers put their key.
#[derive(Debug, Clone)]
pub struct KeySource {
    header: HeaderName,
}

impl KeySource {
    /// Read keys from `header`; `authorization` means `Authorization: Bearer <key>`.
    pub fn new(header: HeaderName) -> Self {
        Self { header }
    }

    /// The header keys are read from.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The key in `headers`, if any (empty values count as missing).
    pub fn extract<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        let value = headers.get(&self.header)?.as_bytes();
        let key = if self.header == AUTHORIZATION {
            bearer_token(value)?
        } else {
            value
        };
        let key = key.trim_ascii();
        (!key.is_empty()).then_some(key)
    }
}

/// The token of `Bearer <token>` (scheme matched case-insensitively, RFC 9110 §11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

/// Per-key GCRA state for unknown keys, bounded: when full, the least recently used key is
/// forgotten (it starts again with a full bucket, like any new key). Sharded so concurrent
/// requests rarely wait on the same lock.
#[derive(Debug)]
pub struct KeyTable {
    shards: Vec<Mutex<LruCache<[u8; 32], u64>>>,
}

const SHARDS: usize = 16;

impl KeyTable {
    /// A table that tracks at most `capacity` keys in all.
    pub fn new(capacity: usize) -> Self {
        let shards = SHARDS.min(capacity.max(1));
        // Split the capacity exactly, so the shards together never hold more than asked.
        let shards = (0..shards)
            .map(|i| {
                let share = capacity / shards + usize::from(i < capacity % shards);
                let share = NonZeroUsize::new(share).unwrap_or(NonZeroUsize::MIN);
                Mutex::new(LruCache::new(share))
            })
            .collect();
        Self { shards }
    }

    fn shard(&self, digest: &[u8; 32]) -> MutexGuard<'_, LruCache<[u8; 32], u64>> {
        // Digests are uniform, so any byte picks a shard evenly.
        let shard = &self.shards[usize::from(digest[0]) % self.shards.len()];
        // Each critical section is one LRU get/put; a poisoned shard still holds valid TATs.
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Judge one request of the key with `digest` under `quota`.
    pub fn check(&self, digest: &[u8; 32], now: u64, quota: Quota) -> Verdict {
        let mut shard = self.shard(digest);
        let tat = shard.get(digest).copied().unwrap_or(0);
        let (new_tat, verdict) = gcra::decide(tat, now, quota);
        if let Some(new_tat) = new_tat {
            shard.put(*digest, new_tat);
        }
        verdict
    }

    /// Give back the cell `check` charged the key with `digest` under `quota` (see
    /// [`super::Bucket::give_back`]).
    pub fn give_back(&self, digest: &[u8; 32], quota: Quota) {
        let mut shard = self.shard(digest);
        if let Some(tat) = shard.get_mut(digest) {
            *tat = tat.saturating_sub(quota.interval_ns());
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys the table will hold.
    pub fn capacity(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).cap().get())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::num::NonZeroU32;

    #[test]
    fn extracts_plain_and_bearer_keys() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static(" k1 "));
        headers.insert("authorization", HeaderValue::from_static("bEaReR tok"));
        let plain = KeySource::new(HeaderName::from_static("x-api-key"));
        let bearer = KeySource::new(AUTHORIZATION);
        assert_eq!(plain.extract(&headers), Some(&b"k1"[..]));
        assert_eq!(bearer.extract(&headers), Some(&b"tok"[..]));
        headers.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer.extract(&headers), None);
        headers.insert("x-api-key", HeaderValue::from_static("  "));
        assert_eq!(plain.extract(&headers), None);
        let binary = HeaderValue::from_bytes(&[0xff, 0xfe, b'x']).unwrap();
        headers.insert("x-api-key", binary);
        assert_eq!(plain.extract(&headers), Some(&[0xff, 0xfe, b'x'][..]));
    }

    #[test]
    fn memo_answers_the_digest_of_each_key_and_stays_put() {
        let memo = DigestMemo::default();
        // More keys than slots: slots are replaced, every answer is still that key's digest,
        // whether it comes from the memo (second round) or is computed again.
        let keys: Vec<Vec<u8>> = (0..(MEMO_SLOTS as u32 * 2))
            .map(|i| format!("key-{i}").into_bytes())
            .collect();
        for _round in 0..2 {
            for key in &keys {
                assert_eq!(memo.digest(key, memo.tag(key)), key_digest(key));
            }
        }
        let total: usize = memo.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert_eq!(total, MEMO_SLOTS);
        // Binary and empty keys too.
        for key in [&b""[..], b"\x00\xff\xfe", &[0u8; 300][..]] {
            assert_eq!(memo.digest(key, memo.tag(key)), key_digest(key));
            assert_eq!(memo.digest(key, memo.tag(key)), key_digest(key));
        }
    }

    #[test]
    fn table_stays_within_capacity() {
        let table = KeyTable::new(1000);
        assert_eq!(table.capacity(), 1000);
        let quota = Quota::new(NonZeroU32::new(10).unwrap(), None);
        for i in 0u32..20_000 {
            table.check(&key_digest(&i.to_le_bytes()), 0, quota);
        }
        assert!(table.len() <= 1000, "{} keys tracked", table.len());
        assert!(table.len() > 900);
    }
}
