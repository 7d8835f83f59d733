//! A seeded xorshift64* generator: which node writes next is chosen from `--seed`, so a run's
//! sequence of writers can be repeated. Not for anything that needs real randomness.

/// xorshift64* (Vigna, "An experimental exploration of Marsaglia's xorshift generators").
#[derive(Debug, Clone)]
pub struct XorShift {
    state: u64,
}

/// Replaces a zero seed: xorshift never leaves the all-zero state.
const ZERO_SEED_REPLACEMENT: u64 = 0x9E37_79B9_7F4A_7C15;

impl XorShift {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> XorShift {
        XorShift { state: if seed == 0 { ZERO_SEED_REPLACEMENT } else { seed } }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..bound` (`bound` > 0); the modulo bias is negligible for small bounds.
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_repeats_its_sequence_and_covers_every_node() {
        let mut first = XorShift::new(7);
        let mut second = XorShift::new(7);
        let picks: Vec<usize> = (0..300).map(|_| first.below(3)).collect();
        assert_eq!(picks, (0..300).map(|_| second.below(3)).collect::<Vec<_>>());
        for node in 0..3 {
            assert!(picks.iter().filter(|pick| **pick == node).count() > 60, "{picks:?}");
        }
        assert_ne!(XorShift::new(0).next_u64(), 0);
    }
}
