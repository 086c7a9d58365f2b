//! STRING (HKUNLP/STRING, arXiv 2410.18745): shifted relative positions at inference time,
//! training-free (`docs/numerics.md` §4).
//!
//! With `S` = [`StringConfig::shifted_offset`] and `W` = [`StringConfig::local_window`], query
//! `i` sees key `j <= i` at the relative position
//!
//! ```text
//! P'(i, j) = i - j            if i - j < S     (the neighbourhood keeps its distances)
//!          = i - j - S + W    otherwise        (far keys are pulled in to W, W+1, ...)
//! ```
//!
//! Keys are rotated at their own positions `j`; each (query, key) pair uses the query rotated
//! at `i` (near pairs) or at `i - S + W` (far pairs), so `q_i . k_j` sees exactly `P'(i, j)`.
//!
//! **Exactness.** The reference implementation runs two FlashAttention passes and merges them
//! by their log-sum-exp; its first pass has window `(S, 0)`, so the pair `i - j = S` is counted
//! twice there (once at distance S, once at W). Here the formula above is applied exactly: the
//! two score sets are merged by mask before one softmax (in float32), which is the same result
//! the log-sum-exp merge gives when the passes partition the keys. The reference's decoding
//! path splits the cache the same exact way (last S keys near, the rest far).
//!
//! **Memory.** Queries are processed in chunks, and each chunk scores only the keys it can see
//! (near keys `(i - S, i]`, far keys `[0, i - S]`), so memory is `O(chunk x T)` per head and
//! the score work is that of plain causal attention, on any device.
//!
//! **Temperature.** Like the reference, cos and sin are multiplied by an extra
//! [`StringConfig::attention_factor`] (default `0.1 ln 2 + 1 = 1.0693`, "STRING makes the
//! attention map smooth"); set it to 1.0 for the bare position rewrite (then STRING with
//! `S >= T` is plain RoPE).

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::rope::{apply_rotary, RopeConfig};
use crate::transformer::CausalLm;

/// STRING's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StringConfig {
    /// S: relative distances `>= S` are shifted down by `S - W`.
    pub shifted_offset: i64,
    /// W: the relative position a key exactly S back is given.
    pub local_window: i64,
    /// Extra factor on cos and sin (on top of the model's own attention factor).
    pub attention_factor: f64,
}

/// The reference's extra temperature, `0.1 ln 2 + 1`.
pub fn default_attention_factor() -> f64 {
    0.1 * 2f64.ln() + 1.0
}

impl StringConfig {
    /// STRING's defaults for a model: `S = int(0.33 L)` with `L = max_position_embeddings`,
    /// `W = 128` (capped below S), the reference temperature.
    pub fn for_model(config: &ModelConfig) -> Self {
        let s = ((0.33 * config.max_position_embeddings as f64) as i64).max(1);
        StringConfig {
            shifted_offset: s,
            local_window: 128.min(s - 1).max(0),
            attention_factor: default_attention_factor(),
        }
    }

    /// `S`, `W` with the reference temperature.
    pub fn new(shifted_offset: i64, local_window: i64) -> Self {
        StringConfig { shifted_offset, local_window, attention_factor: default_attention_factor() }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.shifted_offset < 1 {
            anyhow::bail!("STRING shifted offset S = {} must be at least 1", self.shifted_offset);
        }
        if self.local_window < 0 || self.local_window >= self.shifted_offset {
            anyhow::bail!(
                "STRING local window W = {} must be in [0, S) with S = {} (far keys are moved to W, W+1, ...)",
                self.local_window,
                self.shifted_offset
            );
        }
        if !(self.attention_factor.is_finite() && self.attention_factor > 0.0) {
            anyhow::bail!("STRING attention factor {} must be a positive number", self.attention_factor);
        }
        Ok(())
    }

    /// `P'(i, j)` for `j <= i`.
    pub fn relative_position(&self, i: i64, j: i64) -> i64 {
        let d = i - j;
        if d < self.shifted_offset {
            d
        } else {
            d - self.shifted_offset + self.local_window
        }
    }

    /// The largest relative position a sequence of `len` tokens uses.
    pub fn max_relative_position(&self, len: i64) -> i64 {
        if len == 0 {
            0
        } else {
            (len - 1).min(self.shifted_offset - 1).max(self.relative_position(len - 1, 0))
        }
    }

    /// How far back a query's far rotation sits: the far query is rotated at `i - shift()`.
    pub fn shift(&self) -> i64 {
        self.shifted_offset - self.local_window
    }
}

/// cos and sin (float32 `[B, T, d_rot]`) at arbitrary `positions` (`[B, T]`, int64, may be
/// negative) with the frequency table a row of length `row_lens[b]` uses (its window), times
/// the model's attention factor and `extra`. With `positions` = 0..T-1, `row_lens` = T and
/// `extra` = 1 this is bit for bit [`RopeConfig::cos_sin`].
pub fn rotary_tables(rope: &RopeConfig, positions: &Tensor, row_lens: &[i64], extra: f64) -> (Tensor, Tensor) {
    let device = positions.device();
    let rows: Vec<Tensor> = row_lens.iter().map(|&len| rope.inv_freq(len, device)).collect();
    let inv_freq = Tensor::stack(&rows, 0);
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.unsqueeze(1);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    let scale = rope.attention_factor() * extra;
    (emb.cos() * scale, emb.sin() * scale)
}

/// Elements of one score block that a chunk of queries may allocate (float32).
const CHUNK_BUDGET: i64 = 1 << 24;

/// Causal attention where each (query, key) pair picks one of two query rotations.
///
/// * `q_near` `[B, H, Tq, D]` is used for pairs with `i - j < split` (all pairs when `split` is
///   None), `q_far` for `i - j >= split` (needed only if such pairs exist).
/// * `k`, `v` `[B, H_kv, Tk, D]` (GQA: query head h uses KV head `h / (H / H_kv)`), keys
///   already rotated at their own positions.
/// * Queries are the last `Tq` of the `Tk` slots: query t sits at slot `Tk - Tq + t`.
/// * `sliding_window` w: a key is seen only if `i - j < w` (HF semantics).
/// * `key_valid` `[B, Tk]` bool masks out slots that hold no token (left padding).
/// * `chunk`: queries per block (None = sized so a block stays around 16M scores).
///
/// The scores are formed in float32 and merged by mask before a single softmax; the result has
/// `v`'s dtype. Every query must see at least one key.
#[allow(clippy::too_many_arguments)]
pub fn split_attention(
    q_near: &Tensor,
    q_far: Option<&Tensor>,
    k: &Tensor,
    v: &Tensor,
    split: Option<i64>,
    sliding_window: Option<i64>,
    key_valid: Option<&Tensor>,
    chunk: Option<i64>,
) -> Tensor {
    let (b, h, tq, d) = size4(q_near);
    let (hkv, tk) = (k.size()[1], k.size()[2]);
    assert!(h % hkv == 0, "query heads {h} not a multiple of KV heads {hkv}");
    assert!(tq <= tk, "more queries ({tq}) than keys ({tk})");
    let g = h / hkv;
    let device = q_near.device();
    let off = tk - tq;
    let scale = 1.0 / (d as f64).sqrt();
    let split = split.filter(|&s| s < tk); // no pair reaches S: every pair is near
    let chunk = chunk.unwrap_or_else(|| CHUNK_BUDGET / (b * h * tk).max(1)).clamp(1, tq.max(1));
    let kf = k.to_kind(Kind::Float).unsqueeze(2); // [B, Hkv, 1, Tk, D]
    let vf = v.to_kind(Kind::Float).unsqueeze(2);
    let group = |q: &Tensor, a: i64, c: i64| q.narrow(2, a, c).to_kind(Kind::Float).reshape([b, hkv, g, c, d]);
    let neg_inf = f64::NEG_INFINITY;
    let mut outs = Vec::new();
    let mut a = 0;
    while a < tq {
        let c = chunk.min(tq - a);
        let (first, last) = (off + a, off + a + c - 1); // slots of the chunk's first / last query
        let k_hi = last + 1;
        let k_lo = sliding_window.map_or(0, |w| (first - w + 1).max(0));
        let width = k_hi - k_lo;
        // diff[t, u] = i - j for query slot i = first + t, key slot j = k_lo + u.
        let qi = Tensor::arange_start(first, last + 1, (Kind::Int64, device)).unsqueeze(1);
        let kj = Tensor::arange_start(k_lo, k_hi, (Kind::Int64, device)).unsqueeze(0);
        let diff = qi - kj;
        let mut seen = diff.ge(0);
        if let Some(w) = sliding_window {
            seen = seen.logical_and(&diff.lt(w));
        }
        // Scores of `q` against key slots [lo, hi), placed in a full-width block.
        let scores = |q: &Tensor, lo: i64, hi: i64| -> Tensor {
            let s = group(q, a, c).matmul(&kf.narrow(3, lo, hi - lo).transpose(-1, -2)) * scale;
            let pad = |n: i64| Tensor::full([b, hkv, g, c, n], neg_inf, (Kind::Float, device));
            let mut parts = Vec::new();
            if lo > k_lo {
                parts.push(pad(lo - k_lo));
            }
            parts.push(s);
            if hi < k_hi {
                parts.push(pad(k_hi - hi));
            }
            Tensor::cat(&parts, -1)
        };
        let s = match split {
            None => scores(q_near, k_lo, k_hi).masked_fill(&seen.logical_not(), neg_inf),
            Some(split) => {
                let near_lo = (first - split + 1).max(k_lo);
                let far_hi = (last - split + 1).min(k_hi); // far keys: j <= i - split
                let near = seen.logical_and(&diff.lt(split));
                let mut s = scores(q_near, near_lo, k_hi).masked_fill(&near.logical_not(), neg_inf);
                if far_hi > k_lo {
                    let q_far = q_far.expect("STRING: pairs at i - j >= S exist, so q_far is needed");
                    let far = seen.logical_and(&diff.ge(split));
                    s = s.where_self(&near, &scores(q_far, k_lo, far_hi));
                    s = s.masked_fill(&near.logical_or(&far).logical_not(), neg_inf);
                }
                s
            }
        };
        let s = match key_valid {
            Some(valid) => {
                let valid = valid.narrow(1, k_lo, width).view([b, 1, 1, 1, width]);
                s.masked_fill(&valid.logical_not(), neg_inf)
            }
            None => s,
        };
        let p = s.softmax(-1, Kind::Float);
        let y = p.matmul(&vf.narrow(3, k_lo, width)); // [B, Hkv, G, c, D]
        outs.push(y.reshape([b, h, c, d]));
        a += c;
    }
    let y = if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(&outs, 2) };
    y.to_kind(v.kind())
}

fn size4(t: &Tensor) -> (i64, i64, i64, i64) {
    let s = t.size();
    (s[0], s[1], s[2], s[3])
}

/// STRING attention for whole sequences: `q`, `k` unrotated `[B, H(_kv), T, D]`, every row one
/// document at positions 0..T-1 with the frequency table of length `row_len`.
pub fn string_attention(
    rope: &RopeConfig,
    cfg: &StringConfig,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sliding_window: Option<i64>,
    chunk: Option<i64>,
) -> Tensor {
    let (b, _, t, _) = size4(q);
    let tables = Tables::new(rope, cfg, b, t, q.device());
    tables.attend(cfg, q, k, v, sliding_window, chunk)
}

/// The near/far rotary tables of a batch of whole sequences.
struct Tables {
    near: (Tensor, Tensor),
    far: Option<(Tensor, Tensor)>,
}

impl Tables {
    fn new(rope: &RopeConfig, cfg: &StringConfig, b: i64, t: i64, device: Device) -> Self {
        let pos = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false);
        let lens = vec![t; b as usize];
        let near = rotary_tables(rope, &pos, &lens, cfg.attention_factor);
        let far =
            (t > cfg.shifted_offset).then(|| rotary_tables(rope, &(&pos - cfg.shift()), &lens, cfg.attention_factor));
        Tables { near, far }
    }

    fn attend(
        &self,
        cfg: &StringConfig,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sw: Option<i64>,
        chunk: Option<i64>,
    ) -> Tensor {
        let k = apply_rotary(k, &self.near.0, &self.near.1);
        let q_near = apply_rotary(q, &self.near.0, &self.near.1);
        let q_far = self.far.as_ref().map(|(c, s)| apply_rotary(q, c, s));
        split_attention(&q_near, q_far.as_ref(), &k, v, Some(cfg.shifted_offset), sw, None, chunk)
    }
}

/// Final hidden states `[B, T, hidden]` under STRING; every row is one sequence at positions
/// 0..T-1 (no packing).
pub fn hidden_states(model: &CausalLm, input_ids: &Tensor, cfg: &StringConfig) -> Tensor {
    let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
    let tables = Tables::new(&model.config.rope, cfg, b, t, input_ids.device());
    let sw = model.config.sliding_window;
    let mut x = model.embed(input_ids);
    for layer in &model.layers {
        x = layer.forward_with(&x, &mut |q, k, v| tables.attend(cfg, &q, &k, &v, sw, None));
    }
    model.norm.forward(&x)
}

/// Float32 logits `[B, T, vocab]` under STRING (see [`hidden_states`]).
pub fn forward(model: &CausalLm, input_ids: &Tensor, cfg: &StringConfig) -> Tensor {
    model.logits(&hidden_states(model, input_ids, cfg))
}
