//! RoPE tables against published values (docs/numerics.md) and the per-row window rule.

use longmix_model::longrope_attention_factor;
use longmix_model::rope::{RopeConfig, RopeScaling, Window};
use tch::{Device, Kind, Tensor};

fn rope(theta: f64, d: i64, original: i64, scaling: RopeScaling) -> RopeConfig {
    RopeConfig { theta, head_dim: d, d_rot: d, original_max_position_embeddings: original, scaling }
}

#[test]
fn longrope_magnitude_scaling_matches_published_values() {
    // Phi-3-mini-128k: s = 32, L0 = 4096; LLaMA-3 8k -> 128k: s = 16, L0 = 8192.
    assert!((longrope_attention_factor(32.0, 4096) - 1.1902).abs() < 1e-4);
    assert!((longrope_attention_factor(16.0, 8192) - 1.1435).abs() < 1e-4);
    assert_eq!(longrope_attention_factor(1.0, 4096), 1.0);
}

#[test]
fn llama31_keeps_29_divides_29_blends_6() {
    let r = rope(5e5, 128, 8192, RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0 });
    let plain = Vec::<f32>::try_from(rope(5e5, 128, 8192, RopeScaling::Default).inv_freq(1, Device::Cpu)).unwrap();
    let scaled = Vec::<f32>::try_from(r.inv_freq(1, Device::Cpu)).unwrap();
    let kept = plain.iter().zip(&scaled).filter(|(p, s)| p == s).count();
    let divided = plain.iter().zip(&scaled).filter(|(p, s)| **s == **p / 8.0).count();
    assert_eq!((kept, divided, 64 - kept - divided), (29, 29, 6));
}

#[test]
fn yarn_attention_factor() {
    let yarn = |mscale, mscale_all_dim, attention_factor| {
        rope(
            1e4,
            64,
            4096,
            RopeScaling::Yarn {
                factor: 16.0,
                attention_factor,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale,
                mscale_all_dim,
                truncate: true,
            },
        )
        .attention_factor()
    };
    assert!((yarn(None, None, None) - (0.1 * 16f64.ln() + 1.0)).abs() < 1e-12);
    assert!((yarn(Some(1.0), Some(1.0), None) - 1.0).abs() < 1e-12, "equal mscales cancel");
    assert_eq!(yarn(None, None, Some(0.5)), 0.5);
}

#[test]
fn dynamic_ntk_is_plain_inside_the_original_window() {
    let dynamic = rope(1e4, 16, 32, RopeScaling::Dynamic { factor: 4.0, original: 32 });
    let plain = rope(1e4, 16, 32, RopeScaling::Default);
    assert!(dynamic.inv_freq(32, Device::Cpu).equal(&plain.inv_freq(32, Device::Cpu)));
    let longer = dynamic.inv_freq(80, Device::Cpu);
    // The base grows, so every pair but the first slows down.
    let ratio = Vec::<f32>::try_from(longer / plain.inv_freq(1, Device::Cpu)).unwrap();
    assert_eq!(ratio[0], 1.0);
    assert!(ratio[1..].iter().all(|r| *r < 1.0));
}

fn longrope() -> RopeConfig {
    let short: Vec<f64> = (0..8).map(|i| 1.0 + 0.05 * i as f64).collect();
    let long: Vec<f64> = (0..8).map(|i| 1.0 + 0.7 * i as f64).collect();
    rope(1e4, 16, 32, RopeScaling::LongRope { short_factor: short, long_factor: long, attention_factor: 1.2 })
}

#[test]
fn window_is_long_only_past_the_original_length() {
    let r = longrope();
    assert_eq!(r.window(32), Window::Short);
    assert_eq!(r.window(33), Window::Long);
}

#[test]
fn each_row_picks_its_own_window() {
    let r = longrope();
    // Row 0: three packed documents (max position 29 -> short); row 1: one 80-token document (long).
    let packed: Vec<i64> = [30, 30, 20].iter().flat_map(|&n| 0..n).collect();
    let pos = Tensor::stack(&[Tensor::from_slice(&packed), Tensor::arange(80, (Kind::Int64, Device::Cpu))], 0);
    let (cos, sin) = r.cos_sin(&pos);
    for b in 0..2 {
        let (c1, s1) = r.cos_sin(&pos.narrow(0, b, 1));
        assert!(cos.narrow(0, b, 1).equal(&c1) && sin.narrow(0, b, 1).equal(&s1), "row {b}");
    }
    // The two windows really differ: row 0 at position 20 vs row 1 at position 20.
    let diff = (cos.get(0).get(20) - cos.get(1).get(20)).abs().max().double_value(&[]);
    assert!(diff > 1e-3, "short and long tables should differ, max diff {diff}");
    // The attention factor applies on both paths, as transformers does.
    assert!((cos.get(0).get(0).get(0).double_value(&[]) - 1.2).abs() < 1e-6);
    assert!((cos.get(1).get(0).get(0).double_value(&[]) - 1.2).abs() < 1e-6);
}
