//! AdamW whose state is ours (so it checkpoints), with float32 master weights.
//!
//! The update is the one of `torch.optim.AdamW` (single-tensor path):
//! decoupled decay `p *= 1 - lr*wd`, `m = lerp(m, g, 1-b1)`, `v = b2*v + (1-b2)*g*g`,
//! `p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
//!
//! When the model computes in bf16/f16, its parameters are copies of the float32 masters held
//! here: the float32 gradients ([`crate::grads::Grads`]) update the masters, which are then cast
//! back into the model.
//!
//! With `fused` (the default) the update is PyTorch's fused kernel (`_fused_adamw_`, one pass
//! per tensor, the global clip factor folded in as its gradient scale) wherever this LibTorch
//! has one for the device (CUDA, and CPU since torch 2.4); the tensor-op update below is the
//! reference it is tested against, and the fallback.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use longmix_torch_ext::optim::{fused_adamw, fused_adamw_available, AdamWStep};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 = off).
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// Leave 1-D parameters (norm weights, biases) undecayed, as most LLM recipes do.
    #[serde(default = "default_true")]
    pub no_decay_1d: bool,
    /// Use PyTorch's fused AdamW kernel where the device has one.
    #[serde(default = "default_true")]
    pub fused: bool,
}

fn default_lr() -> f64 {
    2e-5
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}

impl Default for AdamWConfig {
    fn default() -> Self {
        toml::from_str("").unwrap()
    }
}

/// Global L2 norm of `grads` (float32, in the given order, so ranks holding the same gradients
/// get the same bits), computed before any clipping; undefined gradients count as zero.
pub fn grad_norm<'a>(grads: impl IntoIterator<Item = &'a Tensor>) -> f64 {
    let sq: Vec<Tensor> = grads
        .into_iter()
        .filter(|g| g.defined())
        // A norm is a reduction: no float32 square of the whole tensor is ever made.
        .map(|g| g.to_kind(Kind::Float).norm().square())
        .collect();
    if sq.is_empty() {
        return 0.0;
    }
    Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[])
}

struct Slot {
    param: Tensor,
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// One fused AdamW call over `slots` with their float32 gradients (masters where the model
/// computes in bf16/f16, whose model copies are refreshed after it).
fn fused_group(slots: &[(&Slot, &Tensor)], step: &Tensor, h: AdamWStep, scale: Option<&Tensor>) {
    let params: Vec<Tensor> =
        slots.iter().map(|(s, _)| s.master.as_ref().unwrap_or(&s.param).shallow_clone()).collect();
    let grads: Vec<Tensor> = slots.iter().map(|(_, g)| g.shallow_clone()).collect();
    let slots: Vec<&Slot> = slots.iter().map(|(s, _)| *s).collect();
    let m: Vec<Tensor> = slots.iter().map(|s| s.m.shallow_clone()).collect();
    let v: Vec<Tensor> = slots.iter().map(|s| s.v.shallow_clone()).collect();
    fused_adamw(&params, &grads, &m, &v, step, h, scale).expect("fused AdamW");
    for s in slots.iter().filter(|s| s.master.is_some()) {
        s.param.shallow_clone().copy_(s.master.as_ref().unwrap());
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    /// The fused kernel's step-count tensor, when it is used (config and device allow).
    fused_step: Option<Tensor>,
    /// Completed updates.
    pub step: u64,
}

impl AdamW {
    /// Optimise `params` (name -> tensor, still float32), which the model will compute with in
    /// `compute_kind`: for bf16/f16 the float32 values are kept here as masters.
    pub fn new(config: AdamWConfig, params: BTreeMap<String, Tensor>, compute_kind: Kind) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let master = (compute_kind != Kind::Float).then(|| param.detach().to_kind(Kind::Float).copy());
                let zeros = || Tensor::zeros_like(master.as_ref().unwrap_or(&param)).to_kind(Kind::Float);
                let decay = !(config.no_decay_1d && param.dim() <= 1);
                let slot = Slot { m: zeros(), v: zeros(), master, param, decay };
                (name, slot)
            })
            .collect::<BTreeMap<String, Slot>>();
        let device = slots.values().next().map_or(tch::Device::Cpu, |s| s.param.device());
        let fused_step =
            (config.fused && fused_adamw_available(device)).then(|| Tensor::zeros([], (Kind::Float, device)));
        AdamW { config, slots, fused_step, step: 0 }
    }

    /// One update at learning rate `lr` from the float32 gradients `grads` (by parameter name),
    /// given their norm before clipping ([`grad_norm`] over every parameter of the model, which
    /// the caller checks first). Only this optimizer's parameters change: all of them, or a
    /// ZeRO-1 rank's share.
    pub fn step(&mut self, lr: f64, norm: f64, grads: &BTreeMap<String, Tensor>) {
        let clip = if self.config.grad_clip > 0.0 { (self.config.grad_clip / (norm + 1e-6)).min(1.0) } else { 1.0 };
        self.step += 1;
        let [b1, b2] = self.config.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        let (eps, wd) = (self.config.eps, self.config.weight_decay);
        if let Some(step) = &self.fused_step {
            self.fused_update(step, lr, clip, grads);
            return;
        }
        tch::no_grad(|| {
            for (name, s) in self.slots.iter_mut() {
                let Some(g) = grads.get(name).filter(|g| g.defined()) else { continue };
                let mut g = g.to_kind(Kind::Float);
                if clip < 1.0 {
                    g *= clip;
                }
                let mut p = s.master.as_ref().map_or_else(|| s.param.shallow_clone(), |m| m.shallow_clone());
                if s.decay && wd != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = s.m.lerp_(&g, 1.0 - b1);
                let _ = s.v.g_mul_scalar_(b2).addcmul_(&g, &(&g * (1.0 - b2)));
                let denom = (s.v.sqrt() / bc2_sqrt) + eps;
                let _ = p.addcdiv_(&(&s.m * (-lr / bc1)), &denom);
                if let Some(master) = &s.master {
                    s.param.copy_(master);
                }
            }
        });
    }

    /// [`AdamW::step`] through the fused kernel, over groups of decayed and of undecayed
    /// parameters, the clip factor as gradient scale (the kernel divides by it).
    fn fused_update(&self, step: &Tensor, lr: f64, clip: f64, grads: &BTreeMap<String, Tensor>) {
        let [beta1, beta2] = self.config.betas;
        tch::no_grad(|| {
            let _ = step.shallow_clone().fill_(self.step as f64);
            let scale = (clip < 1.0).then(|| Tensor::from(1.0 / clip as f32).to_device(step.device()));
            for decay in [true, false] {
                let weight_decay = if decay { self.config.weight_decay } else { 0.0 };
                let h = AdamWStep { lr, beta1, beta2, weight_decay, eps: self.config.eps };
                let group: Vec<(&Slot, &Tensor)> = self
                    .slots
                    .iter()
                    .filter(|(_, s)| s.decay == decay)
                    .filter_map(|(name, s)| grads.get(name).filter(|g| g.defined()).map(|g| (s, g)))
                    .collect();
                if !group.is_empty() {
                    fused_group(&group, step, h, scale.as_ref());
                }
            }
        });
    }

    /// Moments and masters as named CPU tensors, and the step count with the config (what a
    /// checkpoint stores; see `checkpoint.rs`).
    pub fn state(&self) -> (Vec<(String, Tensor)>, serde_json::Value) {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (name, s) in &self.slots {
            named.push((format!("m.{name}"), s.m.to_device(tch::Device::Cpu)));
            named.push((format!("v.{name}"), s.v.to_device(tch::Device::Cpu)));
            if let Some(master) = &s.master {
                named.push((format!("master.{name}"), master.to_device(tch::Device::Cpu)));
            }
        }
        (named, serde_json::json!({ "step": self.step, "config": self.config }))
    }

    /// Restore what [`AdamW::state`] gave; every slot must be present with its shape.
    pub fn load_state(&mut self, saved: &BTreeMap<String, Tensor>, meta: &serde_json::Value) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (name, s) in self.slots.iter_mut() {
                for (key, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                    let src = saved.get(&format!("{key}.{name}")).ok_or_else(|| {
                        anyhow::anyhow!("the optimizer state lacks {key}.{name}: it belongs to another model")
                    })?;
                    if src.size() != dst.size() {
                        bail!(
                            "optimizer state {key}.{name} has shape {:?}, the parameter {:?}",
                            src.size(),
                            dst.size()
                        );
                    }
                    dst.copy_(src);
                }
                if let Some(master) = &mut s.master {
                    let src = saved
                        .get(&format!("master.{name}"))
                        .ok_or_else(|| anyhow::anyhow!("the optimizer state lacks master.{name}"))?;
                    master.copy_(src);
                    s.param.copy_(master);
                }
            }
            Ok(())
        })?;
        self.step = meta["step"].as_u64().context("the optimizer state lacks its step count")?;
        Ok(())
    }

    /// What [`crate::estimate::MemoryEstimate`] needs to know of this optimizer, updating
    /// `share` of the model's parameters.
    pub fn memory(&self, share: f64) -> crate::estimate::OptimizerMemory {
        crate::estimate::OptimizerMemory {
            bytes_per_element: self.state_bytes_per_element(),
            share,
            fused: self.is_fused(),
            grad_share: 1.0,
        }
    }

    /// Whether updates run PyTorch's fused kernel.
    pub fn is_fused(&self) -> bool {
        self.fused_step.is_some()
    }

    /// The parameters this optimizer updates, by name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// Bytes of optimizer state per parameter element (two float32 moments, plus a float32
    /// master when the model computes in bf16/f16).
    pub fn state_bytes_per_element(&self) -> u64 {
        8 + if self.slots.values().any(|s| s.master.is_some()) { 4 } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero_grad(params: &[Tensor]) {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Two optimizers over equal copies of a small model's parameters (a matrix, a decayed
    /// vector and an undecayed 1-D one), fed the same gradients for `steps` clipped steps.
    fn run(fused: bool, compute: Kind, steps: usize) -> Vec<Tensor> {
        tch::manual_seed(11);
        let shapes: [&[i64]; 3] = [&[16, 8], &[8, 3], &[8]];
        let params: BTreeMap<String, Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("p{i}"), Tensor::randn(*s, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true)))
            .collect();
        let config = AdamWConfig { lr: 1e-2, weight_decay: 0.1, grad_clip: 0.5, fused, ..Default::default() };
        let mut opt = AdamW::new(config, params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), compute);
        let live: Vec<Tensor> = params
            .values()
            .map(|p| {
                let mut p = p.shallow_clone();
                tch::no_grad(|| p.set_data(&p.to_kind(compute)));
                p
            })
            .collect();
        assert_eq!(opt.fused_step.is_some(), fused, "the CPU fused kernel is expected in this LibTorch");
        for _ in 0..steps {
            zero_grad(&live);
            let loss = live
                .iter()
                .fold(Tensor::from(0f32), |acc, p| acc + (p.to_kind(Kind::Float).sin() * 3.0).sum(Kind::Float));
            loss.backward();
            let grads: BTreeMap<String, Tensor> =
                params.keys().zip(&live).map(|(n, p)| (n.clone(), p.grad().to_kind(Kind::Float))).collect();
            opt.step(1e-2, grad_norm(grads.values()), &grads);
        }
        opt.slots.values().map(|s| s.master.as_ref().unwrap_or(&s.param).detach().copy()).collect()
    }

    #[test]
    fn the_fused_kernel_and_the_reference_update_agree() {
        for compute in [Kind::Float, Kind::BFloat16] {
            let (fused, reference) = (run(true, compute, 5), run(false, compute, 5));
            for (i, (a, b)) in fused.iter().zip(&reference).enumerate() {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{compute:?} parameter {i}: fused and reference differ by {diff}");
            }
            // And the update did something (5 steps of lr 1e-2 move every weight).
            let start = run(false, compute, 0);
            let moved = (&fused[0] - &start[0]).abs().min().double_value(&[]);
            assert!(moved > 1e-3, "{compute:?}: the weights barely moved ({moved})");
        }
    }
}
