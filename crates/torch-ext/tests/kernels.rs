//! The kernels of `attention`, `optim` and `cuda` on CPU, against independent formulas.

use longmix_torch_ext::attention::{op_has_kernel, varlen_attention, CuSeqlens};
use longmix_torch_ext::optim::{fused_adamw, fused_adamw_available, AdamWStep};
use tch::{Device, Kind, Tensor};

#[test]
fn the_dispatcher_knows_the_varlen_flash_operator() {
    let known = op_has_kernel("aten::_flash_attention_forward", "CPU").unwrap();
    assert!(known.is_some(), "this LibTorch lacks aten::_flash_attention_forward");
    assert_eq!(op_has_kernel("aten::no_such_operator", "CPU").unwrap(), None);
    // The pinned 2.11 wheel (CUDA 13.0 build): a CUDA kernel and an autograd kernel (the
    // registered derivative), so the varlen path is reachable from C++ with autograd; no CPU one.
    let kernel = |key| op_has_kernel("aten::_flash_attention_forward", key).unwrap();
    assert_eq!((kernel("CUDA"), kernel("Autograd"), known), (Some(true), Some(true), Some(false)));
    assert!(op_has_kernel("aten::_flash_attention_forward", "Nonsense").is_err());
}

/// Attention written out: scores, a block-diagonal causal (and sliding-window) mask, softmax.
fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, cu: &[i64], window: Option<i64>) -> Tensor {
    let (total, h, d) = (q.size()[0], q.size()[1], q.size()[2]);
    let rep = h / k.size()[1];
    let (k, v) = (k.repeat_interleave_self_int(rep, 1, None), v.repeat_interleave_self_int(rep, 1, None));
    let doc: Vec<i64> = (0..total).map(|t| cu.iter().rposition(|&s| s <= t).unwrap() as i64).collect();
    let mut allowed = vec![false; (total * total) as usize];
    for i in 0..total {
        for j in 0..=i {
            let ok = doc[i as usize] == doc[j as usize] && window.is_none_or(|w| j > i - w);
            allowed[(i * total + j) as usize] = ok;
        }
    }
    let mask = Tensor::from_slice(&allowed).view([total, total]);
    let scores = q.transpose(0, 1).matmul(&k.permute([1, 2, 0])) / (d as f64).sqrt(); // [H, T, T]
    let probs = scores.masked_fill(&mask.logical_not(), f64::NEG_INFINITY).softmax(-1, Kind::Double);
    probs.matmul(&v.transpose(0, 1)).transpose(0, 1) // [T, H, D]
}

#[test]
fn varlen_attention_equals_per_document_attention_written_out() {
    tch::manual_seed(3);
    let cu = [0i64, 5, 6, 19, 32];
    let opts = (Kind::Double, Device::Cpu);
    for (heads, kv_heads, window) in [(4, 4, None), (4, 2, None), (6, 2, Some(4))] {
        let q = Tensor::randn([32, heads, 8], opts);
        let k = Tensor::randn([32, kv_heads, 8], opts);
        let v = Tensor::randn([32, kv_heads, 8], opts);
        let got = varlen_attention(&q, &k, &v, &CuSeqlens::new(cu.to_vec(), Device::Cpu), window);
        let want = reference_attention(&q, &k, &v, &cu, window);
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-10, "heads {heads}/{kv_heads}, window {window:?}: max |diff| {diff}");
    }
}

#[test]
fn fused_adamw_takes_the_adamw_step_written_out() {
    assert!(fused_adamw_available(Device::Cpu), "this LibTorch has no CPU fused AdamW kernel");
    tch::manual_seed(5);
    let h = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, weight_decay: 0.1, eps: 1e-8 };
    let shapes: [&[i64]; 3] = [&[7, 3], &[5], &[2, 2, 2]];
    let p: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu))).collect();
    let (mut want_p, mut want_m, mut want_v): (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) =
        (p.iter().map(|t| t.to_kind(Kind::Double)).collect(), vec![], vec![]);
    let m: Vec<Tensor> = p.iter().map(Tensor::zeros_like).collect();
    let v: Vec<Tensor> = p.iter().map(Tensor::zeros_like).collect();
    want_m.extend(m.iter().map(|t| t.to_kind(Kind::Double)));
    want_v.extend(v.iter().map(|t| t.to_kind(Kind::Double)));
    let clip = 0.5;
    for t in 1..=3 {
        let g: Vec<Tensor> = p.iter().map(Tensor::randn_like).collect();
        for i in 0..p.len() {
            let g = g[i].to_kind(Kind::Double) * clip;
            want_p[i] = &want_p[i] * (1.0 - h.lr * h.weight_decay);
            want_m[i] = &want_m[i] * h.beta1 + &g * (1.0 - h.beta1);
            want_v[i] = &want_v[i] * h.beta2 + &g * &g * (1.0 - h.beta2);
            let (bc1, bc2) = (1.0 - h.beta1.powi(t), 1.0 - h.beta2.powi(t));
            let denom = want_v[i].sqrt() / bc2.sqrt() + h.eps;
            want_p[i] = &want_p[i] - &want_m[i] / denom * (h.lr / bc1);
        }
        let step = Tensor::from(t as f32);
        let scale = Tensor::from((1.0 / clip) as f32);
        tch::no_grad(|| fused_adamw(&p, &g, &m, &v, &step, h, Some(&scale))).unwrap();
    }
    for i in 0..p.len() {
        let diff = (p[i].to_kind(Kind::Double) - &want_p[i]).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "parameter {i}: max |diff| {diff}");
    }
    let err = fused_adamw(&p, &p[..1], &m, &v, &Tensor::from(1f32), h, None).unwrap_err();
    assert!(err.to_string().contains("3 parameters but 1 gradients"), "{err}");
}
