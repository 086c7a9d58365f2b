//! Rotary position embeddings with every scaling of `docs/numerics.md` §1-3.
//!
//! The inverse frequencies are computed with the same tensor operations, in the same order and
//! in float32, as transformers' `modeling_rope_utils.py`, so the tables agree to the last bit
//! that float32 allows. Angles and cos/sin stay in float32; callers cast after the rotation.
//!
//! **Windows are chosen per row.** A row's length is `max(position_ids of the row) + 1`. For
//! longrope that picks short or long factors (`len > original`), for dynamic NTK it sets the
//! NTK base. transformers decides once per batch; deciding per row lets one batch hold packed
//! short rows (positions restart at each document) next to long rows.

use std::collections::HashMap;
use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

/// One RoPE scaling method with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows with the row length beyond `original`.
    Dynamic {
        factor: f64,
        original: i64,
    },
    Yarn {
        factor: f64,
        attention_factor: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
    },
    /// LongRoPE: per-pair rescale factors for short rows (`len <= original`) and long rows.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        attention_factor: f64,
    },
}

pub use longmix_core::Window;

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub head_dim: i64,
    /// Rotated dimensions (`head_dim * partial_rotary_factor`); the rest pass through.
    pub d_rot: i64,
    /// The pre-training window L0 (longrope/yarn/llama3) or `max_position_embeddings`.
    pub original_max_position_embeddings: i64,
    pub scaling: RopeScaling,
}

/// `base ** (arange(0, d_rot, 2) / d_rot)` in float32, as transformers writes it.
fn pos_freqs(base: &Tensor, d_rot: i64, device: Device) -> Tensor {
    let exponent = Tensor::arange_start_step(0, d_rot, 2, (Kind::Int64, device)).to_kind(Kind::Float) / d_rot as f64;
    base.pow(&exponent)
}

fn scalar(x: f64, device: Device) -> Tensor {
    Tensor::scalar_tensor(x, (Kind::Double, device))
}

impl RopeConfig {
    /// Pair count, the length of every factor list.
    pub fn n_pairs(&self) -> i64 {
        self.d_rot / 2
    }

    /// The window a row of length `len` (= max position + 1) falls in.
    pub fn window(&self, len: i64) -> Window {
        Window::of_len(len, self.original_max_position_embeddings)
    }

    /// The attention factor that multiplies cos and sin.
    pub fn attention_factor(&self) -> f64 {
        match &self.scaling {
            RopeScaling::LongRope { attention_factor, .. } => *attention_factor,
            RopeScaling::Yarn { factor, attention_factor, mscale, mscale_all_dim, .. } => {
                let get = |m: f64| if *factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
                match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => get(*m) / get(*ma),
                    _ => get(1.0),
                }
            }
            _ => 1.0,
        }
    }

    /// Key of the frequency table a row of length `len` uses: rows with equal keys share it.
    fn table_key(&self, len: i64) -> i64 {
        match &self.scaling {
            RopeScaling::LongRope { .. } => (self.window(len) == Window::Long) as i64,
            RopeScaling::Dynamic { original, .. } if len > *original => len,
            _ => 0,
        }
    }

    /// Inverse frequencies (float32, `[d_rot/2]`) for a row of length `len`.
    pub fn inv_freq(&self, len: i64, device: Device) -> Tensor {
        let base = scalar(self.theta, device);
        let plain = || pos_freqs(&base, self.d_rot, device).reciprocal();
        match &self.scaling {
            RopeScaling::Default => plain(),
            RopeScaling::Linear { factor } => plain() / *factor,
            RopeScaling::Dynamic { factor, original } => {
                if len <= *original {
                    return plain();
                }
                // transformers computes the new base on a 0-dim int64 tensor (promoted to f32).
                let d = self.d_rot as f64;
                let seq = Tensor::scalar_tensor(len, (Kind::Int64, device));
                let grow = (seq * *factor / *original as f64 - (*factor - 1.0)).pow_tensor_scalar(d / (d - 2.0));
                let base = grow * self.theta;
                pos_freqs(&base, self.d_rot, device).reciprocal()
            }
            RopeScaling::Yarn { factor, beta_fast, beta_slow, truncate, .. } => {
                let d = self.d_rot as f64;
                let l0 = self.original_max_position_embeddings as f64;
                let corr = |rot: f64| d * (l0 / (rot * 2.0 * PI)).ln() / (2.0 * self.theta.ln());
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let pf = pos_freqs(&base, self.d_rot, device);
                let extrapolation = pf.reciprocal();
                let interpolation = (&pf * *factor).reciprocal();
                let ramp =
                    ((Tensor::arange(self.n_pairs(), (Kind::Float, device)) - low) / (high - low)).clamp(0.0, 1.0);
                let extrap_weight = 1.0 - ramp;
                interpolation * (1.0 - &extrap_weight) + extrapolation * extrap_weight
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor } => {
                let l0 = self.original_max_position_embeddings as f64;
                let inv = plain();
                let low_wl = l0 / low_freq_factor;
                let high_wl = l0 / high_freq_factor;
                let wavelen = inv.reciprocal() * (2.0 * PI);
                let llama = (&inv / *factor).where_self(&wavelen.gt(low_wl), &inv);
                let smooth = (wavelen.reciprocal() * l0 - *low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed: Tensor = (1.0 - &smooth) * &llama / *factor + &smooth * &llama;
                let medium = wavelen.lt(high_wl).logical_not() * wavelen.gt(low_wl).logical_not();
                smoothed.where_self(&medium, &llama)
            }
            RopeScaling::LongRope { short_factor, long_factor, .. } => {
                let ext = match self.window(len) {
                    Window::Short => short_factor,
                    Window::Long => long_factor,
                };
                let ext = Tensor::from_slice(ext).to_kind(Kind::Float).to_device(device);
                (ext * pos_freqs(&base, self.d_rot, device)).reciprocal()
            }
        }
    }

    /// cos and sin, float32 `[B, T, d_rot]`, for `position_ids` `[B, T]` (int64); each row's
    /// table is picked by its own length (see the module docs). The attention factor is folded in.
    pub fn cos_sin(&self, position_ids: &Tensor) -> (Tensor, Tensor) {
        self.cos_sin_for(position_ids, &row_lengths(position_ids))
    }

    /// [`RopeConfig::cos_sin`] for `position_ids` that are part of rows of lengths `lens` (a
    /// context-parallel slice: the table is the whole row's).
    pub fn cos_sin_for(&self, position_ids: &Tensor, lens: &[i64]) -> (Tensor, Tensor) {
        let device = position_ids.device();
        let mut tables: HashMap<i64, Tensor> = HashMap::new();
        let rows: Vec<Tensor> = lens
            .iter()
            .map(|&len| tables.entry(self.table_key(len)).or_insert_with(|| self.inv_freq(len, device)).shallow_clone())
            .collect();
        let inv_freq = Tensor::stack(&rows, 0); // [B, d_rot/2]
                                                // transformers: (inv_freq[:, :, None] @ pos[:, None, :]).transpose(1, 2), a one-term
                                                // product per entry, so an elementwise product is the same number.
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.unsqueeze(1);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let scale = self.attention_factor();
        (emb.cos() * scale, emb.sin() * scale)
    }
}

/// `max(position_ids) + 1` of every row of `position_ids` `[B, T]` (int64).
pub fn row_lengths(position_ids: &Tensor) -> Vec<i64> {
    Vec::try_from(position_ids.amax([1].as_slice(), false).to_device(Device::Cpu) + 1)
        .expect("position_ids must be an int64 [batch, seq] tensor")
}

/// `cat(-x[..., d/2:], x[..., :d/2])`.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap() / 2;
    Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1)
}

/// Rotate the first `d_rot` dims of `x` (`[B, H, T, head_dim]`) by `cos`/`sin` (`[B, T, d_rot]`,
/// float32), the rest unchanged. The rotation runs in float32 and the result has `x`'s dtype.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let kind = x.kind();
    let head_dim = *x.size().last().unwrap();
    let d_rot = *cos.size().last().unwrap();
    let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
    let xf = x.to_kind(Kind::Float);
    let rot = xf.narrow(-1, 0, d_rot);
    let rotated = &rot * &cos + rotate_half(&rot) * &sin;
    let out =
        if d_rot == head_dim { rotated } else { Tensor::cat(&[rotated, xf.narrow(-1, d_rot, head_dim - d_rot)], -1) };
    out.to_kind(kind)
}
