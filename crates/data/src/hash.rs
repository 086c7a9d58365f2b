//! Stable, platform-independent hashing and pseudo-randomness.
//!
//! Everything the loader decides (held-out split, shuffles, row kinds) is a pure function of
//! the seed and of these hashes, so runs are reproducible bit for bit on any machine and a
//! resumed run sees exactly the rows an uninterrupted one would.

/// SplitMix64 finaliser: a bijective 64-bit mixer with good avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Combine a list of words into one well-mixed 64-bit value (order-sensitive).
pub fn mix_all(words: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &w in words {
        h = mix64(h ^ mix64(w));
    }
    h
}

/// Stable 64-bit hash of a token sequence (the document identity used by the held-out split).
pub fn hash_tokens(tokens: impl IntoIterator<Item = u32>) -> u64 {
    let mut h = 0x1357_9BDF_2468_ACE0u64;
    let mut n = 0u64;
    for t in tokens {
        h = mix64(h ^ (t as u64) ^ (n << 32));
        n += 1;
    }
    mix64(h ^ n)
}

/// Map a 64-bit hash to a uniform number in [0, 1).
#[inline]
pub fn unit_f64(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// SplitMix64 generator (tiny, fast, statistically fine for shuffling).
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in [0, n) (n > 0), without modulo bias (Lemire's method).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        loop {
            let x = self.next_u64();
            let m = (x as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    pub fn unit(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }
}

/// Deterministic Fisher–Yates shuffle.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}
