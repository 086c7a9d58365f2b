//! The few ideas every longmix crate shares, each written once:
//!
//! * [`Window`]: whether a row is short or long, and the rule that decides it;
//! * [`IGNORE_INDEX`] and [`next_token_targets`]: the labels of packed rows;
//! * [`SplitMix64`]: the seedable generator every deterministic choice starts from;
//! * [`fsx`]: atomic file writes (temporary file, fsync, rename, fsync of the folder);
//! * [`checksum`]: the checksums of checkpoint and export files, taken as they are written;
//! * [`config`]: TOML parsing whose errors name the key path.
//!
//! No LibTorch here: the data pipeline uses it as well as the model.

pub mod checksum;
pub mod config;
pub mod fsx;

use serde::{Deserialize, Serialize};

/// Label value that contributes no loss (as in transformers and PyTorch's cross-entropy).
pub const IGNORE_INDEX: i64 = -100;

/// Which RoPE window (factor set) a row uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    /// Every document of the row fits the original window: `max(position) + 1 <= L0`.
    Short,
    /// At least one document is longer than the original window.
    Long,
}

impl Window {
    /// The window of a row whose longest document has `len` tokens (`max(position) + 1`):
    /// LONG iff `len > original` (LongRoPE's and transformers' `seq_len > original_max_position_embeddings`).
    pub fn of_len(len: i64, original: i64) -> Window {
        if len > original {
            Window::Long
        } else {
            Window::Short
        }
    }

    /// The window of a row with these position ids (positions restart at 0 at each document);
    /// an empty row is short.
    pub fn of_positions(position_ids: &[i64], original: i64) -> Window {
        position_ids.iter().max().map_or(Window::Short, |&m| Window::of_len(m + 1, original))
    }

    pub fn name(self) -> &'static str {
        match self {
            Window::Short => "short",
            Window::Long => "long",
        }
    }
}

/// Next-token targets of one row of packed documents: `targets[t] = input_ids[t + 1]` when
/// position `t + 1` continues the same document, else [`IGNORE_INDEX`] (the last token of every
/// document, and of the row, predicts nothing; a document is never predicted from the previous one).
pub fn next_token_targets(input_ids: &[i64], position_ids: &[i64]) -> Vec<i64> {
    assert_eq!(input_ids.len(), position_ids.len(), "input_ids and position_ids differ in length");
    let n = input_ids.len();
    (0..n).map(|t| if t + 1 < n && position_ids[t + 1] != 0 { input_ids[t + 1] } else { IGNORE_INDEX }).collect()
}

/// The special tokens a tokenizer puts before any text (BOS for LLaMA / Phi-3 tokenizers, none
/// for SmolLM2), found the way `tokenizer(text)` shows them: what encoding "a" with special
/// tokens has before the encoding without. `encode(text, with_special_tokens)`.
pub fn leading_specials<E>(encode: impl Fn(&str, bool) -> Result<Vec<i64>, E>) -> Result<Vec<i64>, E> {
    let with = encode("a", true)?;
    let without = encode("a", false)?;
    let pos = with.windows(without.len().max(1)).position(|w| w == without.as_slice()).unwrap_or(0);
    Ok(with[..pos].to_vec())
}

/// SplitMix64 (Steele, Lea & Flood 2014): a tiny, seedable, platform-independent generator;
/// also the usual way to expand one seed into a larger generator's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix64(self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [0, n) (n > 0), without modulo bias (Lemire's multiply-shift with
    /// rejection; a draw is rejected with probability below n / 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        loop {
            let m = self.next_u64() as u128 * n as u128;
            if (m as u64) >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }
}

/// SplitMix64's increment (2^64 / φ).
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective 64-bit mixer (also a good hash finaliser).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rule() {
        assert_eq!(Window::of_len(8192, 8192), Window::Short);
        assert_eq!(Window::of_len(8193, 8192), Window::Long);
        assert_eq!(Window::of_positions(&[0, 1, 2, 0, 1], 3), Window::Short);
        assert_eq!(Window::of_positions(&[0, 1, 2, 3], 3), Window::Long);
        assert_eq!(Window::of_positions(&[], 3), Window::Short);
    }

    #[test]
    fn targets_stop_at_document_boundaries() {
        let t = next_token_targets(&[10, 11, 12, 20, 21], &[0, 1, 2, 0, 1]);
        assert_eq!(t, vec![11, 12, IGNORE_INDEX, 21, IGNORE_INDEX]);
    }

    #[test]
    fn leading_specials_are_what_precedes_the_text() {
        let bos = |t: &str, special: bool| -> Result<Vec<i64>, ()> {
            let mut ids: Vec<i64> = if special { vec![1] } else { vec![] };
            ids.extend(t.bytes().map(|b| b as i64 + 10));
            Ok(ids)
        };
        assert_eq!(leading_specials(bos), Ok(vec![1]));
        let plain = |t: &str, _: bool| -> Result<Vec<i64>, ()> { Ok(t.bytes().map(|b| b as i64).collect()) };
        assert_eq!(leading_specials(plain), Ok(vec![]));
    }

    #[test]
    fn splitmix_reference_values() {
        // First outputs for seed 0 of the reference implementation (Vigna's splitmix64.c).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }
}
