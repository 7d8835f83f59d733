//! The simulator's own pseudo-random numbers: SplitMix64, small, fast and fully determined by
//! its seed. Every random choice of a run (latencies, losses, faults, workload) draws from a
//! stream derived from the run seed, never from the operating system.

/// Golden-ratio increment of SplitMix64.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// One step of SplitMix64's output function: a good 64-bit mixer on its own.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded SplitMix64 stream.
#[derive(Debug, Clone)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    /// A stream for `seed`; `stream` separates independent uses of one seed (network, faults,
    /// workload), so adding draws to one never shifts the others.
    pub fn new(seed: u64, stream: u64) -> SimRng {
        SimRng { state: mix64(seed ^ mix64(stream.wrapping_add(GAMMA))) }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        // The top 53 bits make an exactly representable double in [0, 1).
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Uniform in `[low, high]` (inclusive); `low` when the range is empty.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        let span = high - low + 1;
        low + self.next_u64() % span
    }

    /// Uniform index below `len` (`len` must be positive).
    pub fn index(&mut self, len: usize) -> usize {
        (self.next_u64() % len.max(1) as u64) as usize
    }

    /// Exponentially distributed waiting time (seconds) for events at `rate_per_s`: the gaps of
    /// a Poisson process. `None` when the rate is zero.
    pub fn exponential_s(&mut self, rate_per_s: f64) -> Option<f64> {
        if rate_per_s <= 0.0 {
            return None;
        }
        // 1 - unit() is in (0, 1], so the logarithm is finite.
        Some(-(1.0 - self.unit()).ln() / rate_per_s)
    }

    /// 32 random bytes (a node's seed).
    pub fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_stream_and_streams_differ() {
        let mut a = SimRng::new(7, 1);
        let mut b = SimRng::new(7, 1);
        let mut c = SimRng::new(7, 2);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn draws_stay_in_their_ranges() {
        let mut rng = SimRng::new(1, 0);
        for _ in 0..1000 {
            let unit = rng.unit();
            assert!((0.0..1.0).contains(&unit));
            let value = rng.between(3, 5);
            assert!((3..=5).contains(&value));
            assert!(rng.index(4) < 4);
            assert!(rng.exponential_s(2.0).unwrap() >= 0.0);
        }
        assert_eq!(rng.exponential_s(0.0), None);
        assert!(!rng.chance(0.0));
    }
}
