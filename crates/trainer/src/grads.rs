//! Float32 gradients for a model that computes in bf16, accumulated the way Megatron
//! (`accumulate_allreduce_grads_in_fp32`) and nanotron (`accumulate_grad_in_fp32`) do.
//!
//! Autograd writes a bf16 parameter's gradient in bf16. Left there, every micro-batch (and every
//! recomputed layer or LM-head chunk) would add into a bf16 sum and round it again. Instead each
//! backward's bf16 gradient is folded into a float32 accumulator as soon as it is complete (a
//! decoder layer when its backward is done, the rest after the micro-batch) and the bf16 one is
//! freed; the data-parallel reduction, the gradient norm and AdamW then read the float32 sums.
//! A float32 parameter's own `.grad` already accumulates in float32 and serves as is.
//!
//! With the gradients sharded (ZeRO-2) a rank keeps float32 sums only for the parameters it
//! updates: each micro-batch's gradient is taken from autograd as soon as it is complete,
//! reduced to its owner, and added to the owner's sum ([`Grads::take_fresh`], [`Grads::add`]),
//! as DeepSpeed's stage 2 does.

use longmix_torch_ext::optim::reset_grad;
use tch::{Kind, Tensor};

use crate::distributed::layer_of;

struct Slot {
    param: Tensor,
    /// The float32 accumulator (None for a float32 parameter: its own `.grad`).
    acc: Option<Tensor>,
    layer: Option<usize>,
}

/// The float32 gradients of a model's parameters, in the order given to [`Grads::new`].
pub struct Grads {
    slots: Vec<Slot>,
    /// ZeRO-2: sums only for this rank's parameters, filled by the reduction.
    sharded: bool,
}

impl Grads {
    /// For `params` (name, tensor) in the order every rank shares; with `owned` (ZeRO-2, one
    /// flag per parameter) float32 sums only for the parameters this rank updates.
    pub fn new(params: &[(String, Tensor)], owned: Option<&[bool]>) -> Grads {
        let slots = params
            .iter()
            .enumerate()
            .map(|(i, (name, p))| {
                let keep = owned.map_or(p.kind() != Kind::Float, |o| o[i]);
                Slot {
                    param: p.shallow_clone(),
                    acc: keep.then(|| Tensor::zeros_like(p).to_kind(Kind::Float)),
                    layer: layer_of(name),
                }
            })
            .collect();
        Grads { slots, sharded: owned.is_some() }
    }

    /// Clear every gradient (the start of a step).
    pub fn zero(&self) {
        tch::no_grad(|| {
            for s in &self.slots {
                match &s.acc {
                    Some(acc) => {
                        let _ = acc.shallow_clone().zero_();
                        reset_grad(&s.param);
                    }
                    None => {
                        let mut g = s.param.grad();
                        if g.defined() {
                            let _ = g.detach_().zero_();
                        }
                    }
                }
            }
        });
    }

    fn fold_slot(&self, s: &Slot) {
        let Some(acc) = s.acc.as_ref().filter(|_| !self.sharded) else { return };
        let g = s.param.grad();
        if g.defined() {
            tch::no_grad(|| {
                let _ = acc.shallow_clone().g_add_(&g);
            });
            reset_grad(&s.param);
        }
    }

    /// Decoder layer `layer`'s gradients are complete: fold them into float32 (ZeRO-2: the
    /// reduction does it).
    pub fn fold_layer(&self, layer: usize) {
        self.slots.iter().filter(|s| s.layer == Some(layer)).for_each(|s| self.fold_slot(s));
    }

    /// A micro-batch is done: fold whatever is still pending (embedding, final norm, LM head).
    pub fn fold_all(&self) {
        self.slots.iter().for_each(|s| self.fold_slot(s));
    }

    /// ZeRO-2: parameter `i`'s gradient from this micro-batch's backward, in float32 and
    /// flattened (zeros when the backward did not reach it); autograd's copy is freed.
    pub fn take_fresh(&self, i: usize) -> Tensor {
        let p = &self.slots[i].param;
        let g = p.grad();
        if !g.defined() {
            return Tensor::zeros([p.numel() as i64], (Kind::Float, p.device()));
        }
        let flat = g.detach().to_kind(Kind::Float).reshape([-1]);
        reset_grad(p);
        flat
    }

    /// ZeRO-2: add a reduced micro-batch gradient (flattened) to parameter `i`'s float32 sum.
    pub fn add(&self, i: usize, g: &Tensor) {
        let acc = self.slots[i].acc.as_ref().expect("ZeRO-2: only the owner adds its parameters' gradients");
        tch::no_grad(|| {
            let _ = acc.shallow_clone().g_add_(&g.view_as(acc));
        });
    }

    /// Parameter `i`'s float32 gradient (undefined for a float32 parameter no backward reached).
    pub fn get(&self, i: usize) -> Tensor {
        let s = &self.slots[i];
        s.acc.as_ref().map_or_else(|| s.param.grad(), Tensor::shallow_clone)
    }

    /// Every parameter's float32 gradient, in order.
    pub fn all(&self) -> Vec<Tensor> {
        (0..self.slots.len()).map(|i| self.get(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longmix_model::{batch_targets, CausalLm, MemoryOptions, ModelConfig};
    use tch::{nn, Device};

    const TINY: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
      "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true}"#;

    /// Weights and rows from fixed formulas (tests share LibTorch's global generator across
    /// threads, so nothing here draws from it).
    struct Case {
        weights: Vec<(String, Tensor)>,
        ids: Tensor,
        pos: Tensor,
    }

    impl Case {
        fn new() -> Case {
            let vs = nn::VarStore::new(Device::Cpu);
            let _ = CausalLm::new(&vs.root(), ModelConfig::from_json_str(TINY).unwrap());
            let weights = vs
                .variables()
                .into_iter()
                .enumerate()
                .map(|(k, (n, t))| {
                    let x =
                        (Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu)) * 0.618 + k as f64).sin() * 0.05;
                    let x = if n.ends_with("norm.weight") { x + 1.0 } else { x };
                    (n, x.view(t.size().as_slice()))
                })
                .collect();
            let ids = (Tensor::arange(8 * 96, (Kind::Int64, Device::Cpu)) * 7919).remainder(512).view([8, 96]);
            let pos = Tensor::arange(96, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([8, 1]);
            Case { weights, ids, pos }
        }

        /// The gradient of the 8 rows' mean NLL in `kind`, in micro-batches of `rows` rows,
        /// accumulated in float32 ([`Grads`]) or, as autograd alone does it, in the parameters'
        /// dtype.
        fn gradient(&self, kind: Kind, rows: i64, fp32_accumulation: bool) -> Vec<Tensor> {
            let opts = MemoryOptions { checkpoint_layers: true, loss_chunk: Some(32), sync_phases: false };
            let mut vs = nn::VarStore::new(Device::Cpu);
            let model = CausalLm::new(&vs.root(), ModelConfig::from_json_str(TINY).unwrap());
            let vars = vs.variables();
            tch::no_grad(|| self.weights.iter().for_each(|(n, w)| vars[n].shallow_clone().copy_(w)));
            vs.set_kind(kind);
            let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            params.sort_by(|a, b| a.0.cmp(&b.0));
            let grads = Grads::new(&params, None);
            grads.zero();
            let targets = batch_targets(&self.ids, &self.pos);
            let scale = 1.0 / (8.0 * 95.0);
            for r in (0..8).step_by(rows as usize) {
                let (i, p, t) = (self.ids.narrow(0, r, rows), self.pos.narrow(0, r, rows), targets.narrow(0, r, rows));
                if fp32_accumulation {
                    let tokens = model.tokens(&i, &p, &t);
                    model.forward_backward_with(&tokens, scale, opts, &mut |l| grads.fold_layer(l));
                    grads.fold_all();
                } else {
                    model.forward_backward(&i, &p, &t, scale, opts);
                }
            }
            if fp32_accumulation {
                grads.all()
            } else {
                params.iter().map(|(_, p)| p.grad().to_kind(Kind::Float)).collect()
            }
        }
    }

    /// Relative L2 distance of two gradients.
    fn error(got: &[Tensor], want: &[Tensor]) -> f64 {
        let sq = |ts: &[Tensor]| ts.iter().map(|t| t.square().sum(Kind::Double).double_value(&[])).sum::<f64>();
        let diff: Vec<Tensor> = got.iter().zip(want).map(|(a, b)| a - b).collect();
        (sq(&diff) / sq(want)).sqrt()
    }

    #[test]
    fn bf16_micro_batches_accumulated_in_f32_come_closer_to_the_one_batch_gradient() {
        let case = Case::new();
        // The same bf16 model and rows in one batch: what 8 micro-batches should add up to.
        let one_batch = case.gradient(Kind::BFloat16, 8, true);
        let bf16_sum = error(&case.gradient(Kind::BFloat16, 1, false), &one_batch);
        let f32_sum = error(&case.gradient(Kind::BFloat16, 1, true), &one_batch);
        eprintln!("8 bf16 micro-batches vs one batch: summed in bf16 {bf16_sum:.3e}, in f32 {f32_sum:.3e}");
        assert!(f32_sum < 0.85 * bf16_sum, "f32 accumulation ({f32_sum:.3e}) should beat bf16 ({bf16_sum:.3e})");
        // In float32 the accumulators are the parameters' own gradients.
        let f32_micro = case.gradient(Kind::Float, 1, true);
        assert!(error(&f32_micro, &case.gradient(Kind::Float, 1, false)) == 0.0);
        assert!(error(&f32_micro, &case.gradient(Kind::Float, 8, true)) < 1e-5);
    }
}
