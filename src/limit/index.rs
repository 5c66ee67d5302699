//! A limiter's configured resources by key tag, learned from each key's first request.
//!
//! Resources are configured by the SHA-256 of their key, so the first request of a key is
//! hashed and matched against those digests; after that, the key's tag (the digest memo's
//! keyed 128-bit SipHash, see [`super::DigestMemo`]) leads here straight to the resource.
//!
//! Small enough to stay in the CPU's caches: with 100,000 resources a check must not wait on
//! memory more than once, and that once is the resource's own line, which it writes anyway
//! (BENCHMARKS.md, scenario 4). So a slot is one word, a 32-bit fingerprint of the tag and
//! the resource's position in the limiter's list (1 MiB for 100k resources), and the rest of
//! the tag is checked on the resource itself ([`Resource::holds`](super::Resource)), where the
//! limiter that learned the key left it.
//!
//! What a resource holds is salted per limiter (each policy builds its own, with its own
//! salt), because resources outlive policies: after a key rotation, an old policy still
//! finishing a request may learn the old key into the resource, and the salt keeps the new
//! policy from ever taking that for its own. Two limiters in turn may overwrite each other's
//! mark; each then finds no match and learns again (the digest memo keeps that cheap).
//!
//! Insert-only: a slot is written once, by a compare-and-swap from empty, so a reader sees
//! either nothing or a whole slot, without a lock. Only keys that matched a configured digest
//! are written, at most one per resource, so the table, sized at 1.25 times the resources or
//! more, is never more than 80 % full and a probe always ends at an empty slot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::Resource;

/// The configured resources whose keys were seen, by tag.
#[derive(Debug)]
pub struct ResourceIndex {
    /// 0: empty; else the tag's fingerprint (high 32 bits) and position + 1 (low 32).
    slots: Box<[AtomicU64]>,
    /// Mixed into the tag a resource holds, so that only this index's marks match.
    salt: u64,
}

/// Bits 64..96 of the tag: the fingerprint a slot keeps.
fn fingerprint(tag: u128) -> u64 {
    (tag >> 64) as u32 as u64
}

impl ResourceIndex {
    /// An empty index for up to `resources` keys.
    pub fn new(resources: usize) -> Self {
        // At most 80 % full: probes stay short (a line holds 8 slots) and end at an empty slot.
        let len = (resources.max(1) + resources / 4 + 1).next_power_of_two();
        Self {
            slots: (0..len).map(|_| AtomicU64::new(0)).collect(),
            salt: rand::random(),
        }
    }

    /// Where a tag's probe starts: its top 32 bits (the memo uses the low ones).
    fn start(&self, tag: u128) -> usize {
        (tag >> 96) as usize & (self.slots.len() - 1)
    }

    /// What a resource found by this index holds for the key with this tag: the tag's low
    /// 64 bits, salted. With the fingerprint, 95 bits of the tag are matched (bit 0 is always 1).
    fn mark(&self, tag: u128) -> u64 {
        tag as u64 ^ self.salt
    }

    /// The resource in `resources` (the list the index was built for) whose key has this
    /// tag, once learned.
    pub fn get<'a>(&self, tag: u128, resources: &'a [Arc<Resource>]) -> Option<&'a Arc<Resource>> {
        let (fingerprint, mark) = (fingerprint(tag), self.mark(tag));
        let mask = self.slots.len() - 1;
        let mut i = self.start(tag);
        loop {
            let slot = self.slots[i].load(Ordering::Acquire);
            if slot == 0 {
                return None;
            }
            if slot >> 32 == fingerprint {
                let resource = resources.get((slot as u32 as usize).wrapping_sub(1))?;
                if resource.holds(mark) {
                    return Some(resource);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Remember that the key with this tag is the key of `resources[position]` (its digest
    /// matched). Each resource has one key, so the index holds at most one slot per
    /// resource; a slot already present is left as it is.
    pub fn learn(&self, tag: u128, position: usize, resources: &[Arc<Resource>]) {
        let Some(resource) = resources.get(position) else {
            return;
        };
        let position = u32::try_from(position + 1).expect("fewer than 2^32 resources");
        let want = (fingerprint(tag) << 32) | u64::from(position);
        let mask = self.slots.len() - 1;
        let mut i = self.start(tag);
        loop {
            match self.slots[i].compare_exchange(0, want, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(have) if have == want => break,
                // Another key's slot (or one a racing request just took): probe on.
                Err(_) => i = (i + 1) & mask,
            }
        }
        resource.hold(self.mark(tag));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::Quota;
    use std::num::NonZeroU32;

    fn resources(n: usize) -> Vec<Arc<Resource>> {
        let quota = Quota::new(NonZeroU32::new(10).unwrap(), None);
        (0..n)
            .map(|i| Arc::new(Resource::new(&format!("r{i}"), quota, false, None)))
            .collect()
    }

    #[test]
    fn finds_what_it_learned_and_nothing_else() {
        let resources = resources(1000);
        let index = ResourceIndex::new(resources.len());
        // Tags that share their probe start and their fingerprint, so only the mark on the
        // resource tells them apart.
        let tag = |i: u128| (7u128 << 96) | (3u128 << 64) | (i + 1);
        for i in 0..resources.len() {
            assert!(index.get(tag(i as u128), &resources).is_none());
            index.learn(tag(i as u128), i, &resources);
            index.learn(tag(i as u128), i, &resources);
        }
        for (i, r) in resources.iter().enumerate() {
            let found = index.get(tag(i as u128), &resources).expect("learned");
            assert!(Arc::ptr_eq(found, r), "tag {i} found {}", found.name);
        }
        assert!(index.get(tag(5000), &resources).is_none());
        let filled = index
            .slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count();
        assert_eq!(filled, resources.len(), "each tag once");
    }

    #[test]
    fn another_index_over_the_same_resources_never_takes_its_marks() {
        // A resource kept by a new policy after its key changed: the old policy learning the
        // old key must not make the new policy find the resource by that key.
        let resources = resources(4);
        let (old, new) = (ResourceIndex::new(4), ResourceIndex::new(4));
        let (old_key, new_key) = (0xaaaa_u128 << 64 | 0x1111, 0xbbbb_u128 << 64 | 0x2222);
        new.learn(new_key, 2, &resources);
        old.learn(old_key, 2, &resources);
        assert!(
            new.get(old_key, &resources).is_none(),
            "old key found by the new index"
        );
        assert!(old.get(new_key, &resources).is_none());
        // The new policy's own key still works: it learns again after the old one's mark.
        assert!(
            new.get(new_key, &resources).is_none(),
            "mark overwritten by the old index"
        );
        new.learn(new_key, 2, &resources);
        assert!(Arc::ptr_eq(
            new.get(new_key, &resources).unwrap(),
            &resources[2]
        ));
    }

    #[test]
    fn racing_learners_agree() {
        let resources = resources(64);
        let index = ResourceIndex::new(resources.len());
        let tag =
            |i: usize| (i as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..resources.len() {
                        index.learn(tag(i), i, &resources);
                    }
                });
            }
        });
        for (i, r) in resources.iter().enumerate() {
            let found = index.get(tag(i), &resources).expect("learned");
            assert!(Arc::ptr_eq(found, r));
        }
        let filled = index
            .slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count();
        assert_eq!(filled, resources.len());
    }
}
