//! A limiter's configured resources by key tag, learned from each key's first request.
//!
//! Resources are configured by the SHA-256 of their key, so the first request of a key is
//! hashed and matched against those digests; after that, the key's tag (the digest memo's
//! keyed 128-bit SipHash, see [`super::DigestMemo`]) leads here straight to the resource:
//! one SipHash and, mostly, one slot read, where the digest path costs a memo slot, a map
//! probe and a 32-byte compare in three far-apart places (the difference between 100 and
//! 100,000 resources, BENCHMARKS.md scenario 4).
//!
//! Insert-only: a slot is written once (`OnceLock`), so a reader sees either nothing or a
//! whole entry, without a lock. Only keys that matched a configured digest are written, at
//! most one tag per resource, so the table, sized at twice the resources, is never more than
//! half full and a probe always ends at an empty slot. Each policy builds its own index: a
//! resource whose key changed is never found by its old key's tag.

use std::sync::{Arc, OnceLock};

use super::Resource;

type Entry = ([u64; 2], Arc<Resource>);

/// The configured resources whose keys were seen, by tag.
#[derive(Debug)]
pub struct ResourceIndex {
    slots: Box<[OnceLock<Entry>]>,
}

/// The tag as two words (alignment 8 keeps a slot at 32 bytes).
fn words(tag: u128) -> [u64; 2] {
    [tag as u64, (tag >> 64) as u64]
}

impl ResourceIndex {
    /// An empty index for up to `resources` keys.
    pub fn new(resources: usize) -> Self {
        let len = (resources.max(1) * 2).next_power_of_two();
        Self {
            slots: (0..len).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Where a tag's probe starts: the tag's high bits (the memo uses its low ones).
    fn start(&self, tag: u128) -> usize {
        (tag >> 64) as usize & (self.slots.len() - 1)
    }

    /// The resource whose key has this tag, once learned.
    pub fn get(&self, tag: u128) -> Option<&Arc<Resource>> {
        let want = words(tag);
        let mask = self.slots.len() - 1;
        let mut i = self.start(tag);
        loop {
            match self.slots[i].get() {
                None => return None,
                Some((have, resource)) if *have == want => return Some(resource),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    /// Remember that the key with this tag is `resource`'s (its digest matched). Each
    /// resource has one key, so this is called with at most as many tags as resources the
    /// index was made for; a tag already present is left as it is.
    pub fn learn(&self, tag: u128, resource: &Arc<Resource>) {
        let want = words(tag);
        let mask = self.slots.len() - 1;
        let mut i = self.start(tag);
        loop {
            match self.slots[i].get() {
                // Taken by a racing request between the look and the write: look again.
                None => match self.slots[i].set((want, Arc::clone(resource))) {
                    Ok(()) => return,
                    Err(_) => continue,
                },
                Some((have, _)) if *have == want => return,
                Some(_) => i = (i + 1) & mask,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::Quota;
    use std::num::NonZeroU32;

    fn resource(name: &str) -> Arc<Resource> {
        let quota = Quota::new(NonZeroU32::new(10).unwrap(), None);
        Arc::new(Resource::new(name, quota, false, None))
    }

    #[test]
    fn finds_what_it_learned_and_nothing_else() {
        let resources: Vec<_> = (0..1000).map(|i| resource(&format!("r{i}"))).collect();
        let index = ResourceIndex::new(resources.len());
        // Tags that share their probe start (same high bits), so collisions are exercised.
        let tag = |i: u128| (7u128 << 64) | (i + 1) | (i << 80);
        for (i, r) in resources.iter().enumerate() {
            assert!(index.get(tag(i as u128)).is_none());
            index.learn(tag(i as u128), r);
            index.learn(tag(i as u128), r);
        }
        for (i, r) in resources.iter().enumerate() {
            let found = index.get(tag(i as u128)).expect("learned");
            assert!(Arc::ptr_eq(found, r), "tag {i} found {}", found.name);
        }
        assert!(index.get(tag(5000)).is_none());
        let filled = index.slots.iter().filter(|s| s.get().is_some()).count();
        assert_eq!(filled, resources.len(), "each tag once");
    }

    #[test]
    fn racing_learners_agree() {
        let resources: Vec<_> = (0..64).map(|i| resource(&format!("r{i}"))).collect();
        let index = ResourceIndex::new(resources.len());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for (i, r) in resources.iter().enumerate() {
                        index.learn(i as u128 * 0x9e37_79b9_7f4a_7c15, r);
                    }
                });
            }
        });
        for (i, r) in resources.iter().enumerate() {
            let found = index
                .get(i as u128 * 0x9e37_79b9_7f4a_7c15)
                .expect("learned");
            assert!(Arc::ptr_eq(found, r));
        }
        let filled = index.slots.iter().filter(|s| s.get().is_some()).count();
        assert_eq!(filled, resources.len());
    }
}
