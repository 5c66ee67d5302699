//! A replica's part of a fleet-wide cap. Each of `replicas` replicas (sorted by id, this one at
//! `index`) enforces `cap / replicas` slots, and the `cap % replicas` left over go one each to
//! the replicas at the next positions, counted from a different replica for each endpoint.
//! For every endpoint the parts add up to the cap exactly, so the fleet never has more in
//! flight than the cap; with a cap smaller than the number of replicas, some replicas get no
//! slot at a given endpoint and others get one, and the rotation spreads those single slots
//! over the replicas instead of giving them all to the first ones.
//!
//! Replicas change their view of the set at their own heartbeats, so for a moment some hold
//! the old view and some the new one, and the left-over slots move between positions: the
//! parts of a mixed set of views can add up to more than the cap. So a replica whose view
//! changed also *holds* the views it had before (at most [`HELD`]) until every replica can
//! have seen the change, and enforces the smallest of its parts under all of them: it shrinks
//! at once and grows only when no replica can still hold an old view. Any mix of replicas on
//! the old view and replicas holding both then stays within the cap (the unit tests check
//! every mix exhaustively).

/// Most earlier views a share holds at once.
pub const HELD: usize = 2;

/// A position in a view of the fleet: (index, replicas); replicas 0 is no slot at all.
type View = (u32, u32);

/// This replica's position in the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Position among the live replicas sorted by id.
    pub index: u32,
    /// Live replicas; 0 while this replica has not joined yet (it takes no slots then).
    pub replicas: u32,
    /// Earlier views other replicas may still hold: this replica's part is never more than
    /// its part under any of them.
    pub held: [Option<(u32, u32)>; HELD],
}

impl Share {
    /// A replica alone: the whole of every cap.
    pub const WHOLE: Self = Self::at(0, 1);

    /// Not yet part of the fleet: no slots.
    pub const NONE: Self = Self::at(0, 0);

    /// Position `index` of `replicas`, holding no earlier view.
    pub const fn at(index: u32, replicas: u32) -> Self {
        Self {
            index,
            replicas,
            held: [None; HELD],
        }
    }

    /// This replica's part of `cap` for the endpoint at position `slot`.
    pub fn of(self, cap: u32, slot: usize) -> u32 {
        self.held
            .iter()
            .flatten()
            .fold(part((self.index, self.replicas), cap, slot), |p, &view| {
                p.min(part(view, cap, slot))
            })
    }

    /// The same position, without the earlier views.
    pub fn plain(self) -> Self {
        Self::at(self.index, self.replicas)
    }
}

/// The part of `cap` at endpoint `slot` for position `view`.
fn part((index, replicas): View, cap: u32, slot: usize) -> u32 {
    match replicas {
        0 => 0,
        1 => cap,
        n => {
            let rotated = (index + n - (slot as u64 % u64::from(n)) as u32) % n;
            cap / n + u32::from(rotated < cap % n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_add_up_to_the_cap_for_every_endpoint() {
        for replicas in 1..=7u32 {
            for cap in [1u32, 2, 3, 5, 20, 199, 200] {
                for slot in 0..9 {
                    let sum: u32 = (0..replicas)
                        .map(|index| Share::at(index, replicas).of(cap, slot))
                        .sum();
                    assert_eq!(sum, cap, "cap {cap}, {replicas} replicas, endpoint {slot}");
                }
            }
        }
    }

    #[test]
    fn small_caps_rotate_over_replicas() {
        // Three endpoints capped at 1, three replicas: each replica holds one of them.
        for index in 0..3 {
            let share = Share::at(index, 3);
            let held: u32 = (0..3).map(|slot| share.of(1, slot)).sum();
            assert_eq!(held, 1);
        }
        assert_eq!(Share::NONE.of(20, 0), 0);
        assert_eq!(Share::WHOLE.of(20, 3), 20);
    }

    /// Every replica's part of `cap` at `slot` when the fleet of `old` replicas becomes one of
    /// `new` (`joiner` or `leaver` at a position), each replica either still on the old view
    /// or already on the new one, holding the old one when `hold` (the joiner takes nothing
    /// while it holds: before, it had no view). Counts the mixes over the cap.
    fn over_cap(hold: bool) -> (u32, u32) {
        let (mut joins, mut deaths) = (0, 0);
        for n in 2..=5u32 {
            for cap in 1..=12u32 {
                for slot in 0..8usize {
                    // Join: n - 1 replicas, a joiner at position j of n.
                    for j in 0..n {
                        let old = |i: u32| (i - u32::from(i > j), n - 1);
                        let new = |i: u32| (i, n);
                        joins += mixes(n, j, None, cap, slot, hold, old, new);
                    }
                    // Death: n replicas, the one at position d dies (it counts no more).
                    for d in 0..n {
                        let old = |i: u32| (i, n);
                        let new = |i: u32| (i - u32::from(i > d), n - 1);
                        deaths += mixes(n, d, Some(()), cap, slot, hold, old, new);
                    }
                }
            }
        }
        (joins, deaths)
    }

    /// Over every subset of the replicas that have changed view: how many sums exceed `cap`.
    #[allow(clippy::too_many_arguments)]
    fn mixes(
        n: u32,
        moved: u32,
        death: Option<()>,
        cap: u32,
        slot: usize,
        hold: bool,
        old: impl Fn(u32) -> View,
        new: impl Fn(u32) -> View,
    ) -> u32 {
        let others: Vec<u32> = (0..n).filter(|&i| i != moved).collect();
        let mut over = 0;
        for changed in 0..(1u32 << others.len()) {
            let mut sum = 0;
            for (k, &i) in others.iter().enumerate() {
                let share = if changed & (1 << k) == 0 {
                    let (index, replicas) = old(i);
                    Share::at(index, replicas)
                } else {
                    let (index, replicas) = new(i);
                    let mut share = Share::at(index, replicas);
                    if hold {
                        share.held[0] = Some(old(i));
                    }
                    share
                };
                sum += share.of(cap, slot);
            }
            if death.is_none() {
                // The joiner: its old view is no view (no slots) while it holds it.
                let (index, replicas) = new(moved);
                let mut joiner = Share::at(index, replicas);
                if hold {
                    joiner.held[0] = Some((0, 0));
                }
                sum += joiner.of(cap, slot);
            } else {
                // The dead replica's requests may still be in flight for all anyone knows:
                // it held its old part.
                sum += Share::at(old(moved).0, old(moved).1).of(cap, slot);
            }
            over += u32::from(sum > cap);
        }
        over
    }

    #[test]
    fn without_holding_the_old_view_mixed_views_exceed_the_cap() {
        let (joins, deaths) = over_cap(false);
        eprintln!("without holding: {joins} joins and {deaths} deaths over the cap");
        assert!(joins > 0 && deaths > 0, "joins {joins}, deaths {deaths}");
    }

    #[test]
    fn holding_the_old_view_keeps_every_mix_of_views_within_the_cap() {
        assert_eq!(over_cap(true), (0, 0));
    }

    #[test]
    fn a_held_view_only_ever_lowers_a_part() {
        let mut share = Share::at(1, 3);
        share.held = [Some((0, 2)), Some((0, 0))];
        assert_eq!(share.of(12, 0), 0);
        share.held = [Some((0, 2)), None];
        assert_eq!(share.of(12, 0), 4);
        assert_eq!(share.plain(), Share::at(1, 3));
    }
}
