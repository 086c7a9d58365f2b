//! STRING: exactness against the definition (relative position P'(i, j) applied per pair, in
//! float64), chunking, and STRING with S >= T being plain RoPE.

use std::path::PathBuf;

use longmix_model::string::{self, split_attention, string_attention, StringConfig};
use longmix_model::{load_model, ModelConfig, RopeConfig, RopeScaling};
use tch::{Device, Kind, Tensor};

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity").join(case)
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

/// STRING attention straight from the definition, in float64: for every pair (i, j <= i) the
/// query is rotated by the relative position P'(i, j) and met with the unrotated key
/// ((R_i q) . (R_j k) = (R_{i-j} q) . k), the rotated dims scaled by `scale^2` (cos and sin
/// both carry `scale`), then softmax over the visible keys.
#[allow(clippy::too_many_arguments)]
fn direct(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    (b, h, hkv, t, d): (usize, usize, usize, usize, usize),
    inv_freq: &[f64],
    d_rot: usize,
    scale: f64,
    cfg: &StringConfig,
    window: Option<usize>,
) -> Vec<f64> {
    let half = d_rot / 2;
    let g = h / hkv;
    let mut out = vec![0.0; b * h * t * d];
    for bb in 0..b {
        for hh in 0..h {
            let kh = hh / g;
            let qa = |i: usize, x: usize| q[((bb * h + hh) * t + i) * d + x];
            let ka = |j: usize, x: usize| k[((bb * hkv + kh) * t + j) * d + x];
            let va = |j: usize, x: usize| v[((bb * hkv + kh) * t + j) * d + x];
            for i in 0..t {
                let mut scores = Vec::new();
                for j in 0..=i {
                    if window.is_some_and(|w| i - j >= w) {
                        continue;
                    }
                    let p = cfg.relative_position(i as i64, j as i64) as f64;
                    let mut s = 0.0;
                    for (m, f) in inv_freq.iter().enumerate().take(half) {
                        let (c, sn) = ((p * f).cos(), (p * f).sin());
                        let (x1, x2) = (qa(i, m), qa(i, m + half));
                        let r1 = x1 * c - x2 * sn;
                        let r2 = x2 * c + x1 * sn;
                        s += scale * scale * (r1 * ka(j, m) + r2 * ka(j, m + half));
                    }
                    for x in d_rot..d {
                        s += qa(i, x) * ka(j, x);
                    }
                    scores.push((j, s / (d as f64).sqrt()));
                }
                let max = scores.iter().map(|x| x.1).fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|x| (x.1 - max).exp()).sum();
                for x in 0..d {
                    out[((bb * h + hh) * t + i) * d + x] =
                        scores.iter().map(|&(j, s)| (s - max).exp() / z * va(j, x)).sum::<f64>();
                }
            }
        }
    }
    out
}

fn rope(head_dim: i64, d_rot: i64) -> RopeConfig {
    RopeConfig { theta: 10_000.0, head_dim, d_rot, original_max_position_embeddings: 64, scaling: RopeScaling::Default }
}

#[test]
fn string_attention_equals_the_definition() {
    tch::manual_seed(11);
    let (b, h, hkv, t, d) = (2usize, 4usize, 2usize, 23usize, 8usize);
    let q = Tensor::randn([b as i64, h as i64, t as i64, d as i64], (Kind::Float, Device::Cpu));
    let k = Tensor::randn([b as i64, hkv as i64, t as i64, d as i64], (Kind::Float, Device::Cpu));
    let v = Tensor::randn([b as i64, hkv as i64, t as i64, d as i64], (Kind::Float, Device::Cpu));
    let (qv, kv, vv) = (to_vec(&q), to_vec(&k), to_vec(&v));
    let cases = [
        // (d_rot, S, W, extra attention factor, sliding window)
        (8, 6, 2, 1.0, None),
        (8, 6, 2, 1.0693, None),
        (6, 5, 0, 1.2, None), // partial rotary: the last 2 dims pass through unscaled
        (8, 9, 4, 1.0, Some(13)),
        (8, 1, 0, 1.0, None),  // every earlier key is far
        (8, 30, 3, 1.0, None), // S > T: plain RoPE
    ];
    for (d_rot, s, w, af, window) in cases {
        let r = rope(d as i64, d_rot);
        let cfg = StringConfig { shifted_offset: s, local_window: w, attention_factor: af };
        let inv_freq = to_vec(&r.inv_freq(t as i64, Device::Cpu));
        let want = direct(&qv, &kv, &vv, (b, h, hkv, t, d), &inv_freq, d_rot as usize, af, &cfg, window);
        for chunk in [None, Some(1), Some(4), Some(7)] {
            let got = to_vec(&string_attention(&r, &cfg, &q, &k, &v, window.map(|w| w as i64), chunk));
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            eprintln!("d_rot {d_rot} S {s} W {w} af {af} window {window:?} chunk {chunk:?}: max abs err {err:.2e}");
            assert!(err < 1e-5, "d_rot {d_rot} S {s} W {w} chunk {chunk:?}: {err}");
        }
    }
}

#[test]
fn relative_positions_follow_the_formula() {
    let c = StringConfig { shifted_offset: 5, local_window: 2, attention_factor: 1.0 };
    let row: Vec<i64> = (0..=9).map(|j| c.relative_position(9, j)).collect();
    // i - j = 9..0: distances >= 5 become d - 5 + 2.
    assert_eq!(row, vec![6, 5, 4, 3, 2, 4, 3, 2, 1, 0]);
    assert_eq!(c.max_relative_position(10), 6);
    assert_eq!(c.max_relative_position(4), 3);
    // Defaults: S = int(0.33 L), W = 128 (docs/numerics.md §4: 131072 -> 43253).
    let cfg = ModelConfig::from_json_str(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"max_position_embeddings":131072}"#,
    )
    .unwrap();
    let s = StringConfig::for_model(&cfg);
    assert_eq!((s.shifted_offset, s.local_window), (43253, 128));
    assert!((s.attention_factor - (0.1 * 2f64.ln() + 1.0)).abs() < 1e-12);
    assert!(StringConfig { shifted_offset: 4, local_window: 4, attention_factor: 1.0 }.validate().is_err());
}

#[test]
fn string_with_offset_beyond_the_sequence_is_plain_rope() {
    for case in ["llama_gqa_tied", "phi3_sliding_window", "phi3_longrope_partial", "qwen3_default", "qwen2_untied"] {
        let lm = load_model(&fixture(case), Kind::Float, Device::Cpu).unwrap();
        tch::manual_seed(3);
        let t = 24;
        let ids = Tensor::randint(256, [2, t], (Kind::Int64, Device::Cpu));
        let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([2, 1]);
        let plain = tch::no_grad(|| lm.model.forward(&ids, &pos));
        let cfg = StringConfig { shifted_offset: t + 1, local_window: 7, attention_factor: 1.0 };
        let s = tch::no_grad(|| string::forward(&lm.model, &ids, &cfg));
        let err = (&s - &plain).abs().max().double_value(&[]);
        eprintln!("{case}: STRING(S > T) vs plain max abs logit err {err:.2e}");
        assert!(err < 1e-4, "{case}: {err}");
        // With S < T the logits move (the rewrite is really applied).
        let cfg = StringConfig { shifted_offset: 6, local_window: 2, attention_factor: 1.0 };
        let s = tch::no_grad(|| string::forward(&lm.model, &ids, &cfg));
        let moved = (&s - &plain).abs().max().double_value(&[]);
        assert!(moved > 1e-3, "{case}: STRING with S = 6 changed nothing ({moved})");
        // ... but not before position S: the first S positions only see near keys.
        let head = (s.narrow(1, 0, 6) - plain.narrow(1, 0, 6)).abs().max().double_value(&[]);
        assert!(head < 1e-4, "{case}: positions < S must be plain ({head})");
    }
}

#[test]
fn split_attention_masks_left_padding() {
    // Two rows, the second left-padded by 3 slots: its result must equal running it alone.
    tch::manual_seed(5);
    let (h, t, d) = (2, 9, 4);
    let q = Tensor::randn([2, h, 1, d], (Kind::Float, Device::Cpu));
    let k = Tensor::randn([2, h, t, d], (Kind::Float, Device::Cpu));
    let v = Tensor::randn([2, h, t, d], (Kind::Float, Device::Cpu));
    let valid = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]).view([2, t]).gt(0);
    let both = split_attention(&q, None, &k, &v, None, None, Some(&valid), None);
    let alone = split_attention(
        &q.narrow(0, 1, 1),
        None,
        &k.narrow(0, 1, 1).narrow(2, 3, 6),
        &v.narrow(0, 1, 1).narrow(2, 3, 6),
        None,
        None,
        None,
        None,
    );
    let err = (both.narrow(0, 1, 1) - alone).abs().max().double_value(&[]);
    assert!(err < 1e-6, "{err}");
}
