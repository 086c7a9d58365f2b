//! Stable, platform-independent hashing and pseudo-randomness.
//!
//! Everything the loader decides (held-out split, shuffles, row kinds) is a pure function of
//! the seed and of these hashes, so runs are reproducible bit for bit on any machine and a
//! resumed run sees exactly the rows an uninterrupted one would.

pub use longmix_core::SplitMix64;

/// One SplitMix64 step from state `z`: a bijective 64-bit mixer with good avalanche.
#[inline]
pub fn mix64(z: u64) -> u64 {
    longmix_core::mix64(z.wrapping_add(longmix_core::GOLDEN_GAMMA))
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

/// Deterministic Fisher–Yates shuffle.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}
