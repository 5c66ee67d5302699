//! A replica's part of a fleet-wide cap. Each of `replicas` replicas (sorted by id, this one at
//! `index`) enforces `cap / replicas` slots, and the `cap % replicas` left over go one each to
//! the replicas at the next positions, counted from a different replica for each endpoint.
//! For every endpoint the parts add up to the cap exactly, so the fleet never has more in
//! flight than the cap; with a cap smaller than the number of replicas, some replicas get no
//! slot at a given endpoint and others get one, and the rotation spreads those single slots
//! over the replicas instead of giving them all to the first ones.

/// This replica's position in the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Position among the live replicas sorted by id.
    pub index: u32,
    /// Live replicas; 0 while this replica has not joined yet (it takes no slots then).
    pub replicas: u32,
}

impl Share {
    /// A replica alone: the whole of every cap.
    pub const WHOLE: Self = Self {
        index: 0,
        replicas: 1,
    };

    /// Not yet part of the fleet: no slots.
    pub const NONE: Self = Self {
        index: 0,
        replicas: 0,
    };

    /// This replica's part of `cap` for the endpoint at position `slot`.
    pub fn of(self, cap: u32, slot: usize) -> u32 {
        match self.replicas {
            0 => 0,
            1 => cap,
            n => {
                let rotated = (self.index + n - (slot as u64 % u64::from(n)) as u32) % n;
                cap / n + u32::from(rotated < cap % n)
            }
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
                        .map(|index| Share { index, replicas }.of(cap, slot))
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
            let share = Share { index, replicas: 3 };
            let held: u32 = (0..3).map(|slot| share.of(1, slot)).sum();
            assert_eq!(held, 1);
        }
        assert_eq!(Share::NONE.of(20, 0), 0);
        assert_eq!(Share::WHOLE.of(20, 3), 20);
    }
}
