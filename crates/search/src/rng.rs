//! The search's own pseudo-random generator: xoshiro256** seeded through SplitMix64.
//!
//! Every random choice of the search (needles, mutations, crossovers, parent picks) comes from
//! one of these, never from a thread-local or OS source, so a seed fixes the whole run. The
//! state is four `u64`s and is serialised into the search checkpoint, so a resumed search draws
//! exactly the numbers the uninterrupted one would have drawn.

use serde::{Deserialize, Serialize};

/// xoshiro256** (Blackman & Vigna).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = longmix_core::SplitMix64::new(seed);
        Rng { s: [x.next_u64(), x.next_u64(), x.next_u64(), x.next_u64()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `[0, n)` (`n > 0`), by 128-bit multiply (Lemire, without the
    /// rejection step: the bias is below 2^-64·n, far under anything the search could notice).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform integer in the closed range `[lo, hi]` (`lo <= hi`).
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi, "Rng::range({lo}, {hi})");
        lo + self.below((hi - lo) as u64 + 1) as i64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_streams_repeat_and_differ() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::new(8);
            (0..8).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut r = Rng::new(1);
        r.next_u64();
        let mut back: Rng = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(r.next_u64(), back.next_u64());
    }

    #[test]
    fn ranges_cover_their_ends_and_nothing_else() {
        let mut r = Rng::new(3);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            let x = r.range(-2, 2);
            assert!((-2..=2).contains(&x));
            seen[(x + 2) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
        for _ in 0..1000 {
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
