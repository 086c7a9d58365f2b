//! Forward + backward for training, with two switchable memory savers.
//!
//! * **Activation checkpointing** (per layer): the forward runs without autograd and keeps only
//!   each layer's input; the backward re-runs layer i with autograd on its detached input and
//!   back-propagates the surrogate `sum(y * dL/dy)`, whose gradient with respect to the layer's
//!   parameters and input is exactly the chain rule's. Activation memory drops from all layers'
//!   intermediates to one hidden state per layer.
//! * **Chunked LM head + cross-entropy**: logits are formed for `chunk` target positions at a
//!   time and back-propagated at once, so `[tokens, vocab]` logits never exist in full
//!   (128k tokens x 128k vocab would be 64 GB in float32). Positions without a target are
//!   dropped before the head.
//!
//! Both give the same gradients as the plain path (tested); the loss is summed, and `scale`
//! (e.g. 1 / target tokens of the whole optimizer step) multiplies every gradient.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::head::HeadLoss;
use crate::rope::Window;
use crate::transformer::{CausalLm, Tokens};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryOptions {
    /// Recompute each decoder layer in the backward pass.
    pub checkpoint_layers: bool,
    /// Compute the LM head and loss this many target positions at a time (None = all at once).
    pub loss_chunk: Option<i64>,
    /// Wait for the device at each phase boundary so [`Phases`] are exact on CUDA (benchmarks;
    /// it costs a few synchronisations per micro-batch). CPU times are always exact.
    pub sync_phases: bool,
}

/// Where one forward + backward spent its time, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// Embedding, decoder layers and final norm (without autograd under layer checkpointing).
    pub forward_s: f64,
    /// LM head and loss, forward and backward (chunked), down to the final hidden states.
    pub head_s: f64,
    /// Back-propagation through the layers (each layer recomputed first under checkpointing).
    pub backward_s: f64,
}

impl Phases {
    pub fn add(&mut self, o: &Phases) {
        self.forward_s += o.forward_s;
        self.head_s += o.head_s;
        self.backward_s += o.backward_s;
    }
}

/// A stopwatch over the phases of one forward + backward.
struct Clock {
    last: Instant,
    sync: Option<i64>,
}

impl Clock {
    fn new(opts: MemoryOptions, device: Device) -> Clock {
        let sync = match device {
            Device::Cuda(i) if opts.sync_phases => Some(i as i64),
            _ => None,
        };
        let mut c = Clock { last: Instant::now(), sync };
        c.lap();
        c
    }

    /// Seconds since the previous lap.
    fn lap(&mut self) -> f64 {
        if let Some(i) = self.sync {
            tch::Cuda::synchronize(i);
        }
        let now = Instant::now();
        (now - std::mem::replace(&mut self.last, now)).as_secs_f64()
    }
}

/// What one micro-batch contributed: each row's summed NLL and scored tokens, and the RoPE
/// window the model used for each row (the model alone decides short or long).
#[derive(Debug, Clone, Default)]
pub struct StepLoss {
    pub loss: HeadLoss,
    pub windows: Vec<Window>,
    pub phases: Phases,
}

impl CausalLm {
    /// Accumulate into every parameter's `.grad` the gradient of `scale * summed NLL`.
    pub fn forward_backward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        targets: &Tensor,
        scale: f64,
        opts: MemoryOptions,
    ) -> StepLoss {
        self.forward_backward_with(&self.tokens(input_ids, position_ids, targets), scale, opts, &mut |_| {})
    }

    /// [`CausalLm::forward_backward`], calling `layer_done(i)` as soon as decoder layer `i`'s
    /// parameter gradients are complete (last layer first). With layer checkpointing that is
    /// right after its recomputed backward, which lets data parallelism start reducing those
    /// gradients while the earlier layers are still being back-propagated; without it every
    /// layer completes at the end of the one backward call. The embedding, final norm and LM
    /// head are complete only when this returns.
    pub fn forward_backward_with(
        &self,
        tokens: &Tokens,
        scale: f64,
        opts: MemoryOptions,
        layer_done: &mut dyn FnMut(usize),
    ) -> StepLoss {
        let Tokens { input_ids, targets, positions: pos } = tokens;
        let mut clock = Clock::new(opts, input_ids.device());
        let mut phases = Phases::default();
        let windows = pos.windows.clone();
        // None: the whole micro-batch's scored positions in one piece.
        let chunk = Some(opts.loss_chunk.unwrap_or(i64::MAX));
        // The head runs on a detached leaf of the final hidden states, so its backward stops
        // there and returns dL/d(hidden) for the layers' backward.
        let head = |hidden: &Tensor| {
            let leaf = hidden.detach().set_requires_grad(true);
            let loss = self.head_nll(&leaf, targets, chunk, Some(scale));
            (loss, leaf.grad())
        };
        let embedded = self.embed(input_ids);
        if !opts.checkpoint_layers {
            let x = self.layers.iter().fold(embedded, |x, layer| layer.forward(&x, pos));
            let hidden = self.norm.forward(&x);
            phases.forward_s = clock.lap();
            let (loss, grad) = head(&hidden);
            phases.head_s = clock.lap();
            (hidden * grad).sum(Kind::Float).backward();
            (0..self.layers.len()).rev().for_each(&mut *layer_done);
            phases.backward_s = clock.lap();
            return StepLoss { loss, windows, phases };
        }
        // Forward without autograd, keeping each layer's input.
        let mut inputs = vec![embedded.detach()];
        tch::no_grad(|| {
            for layer in &self.layers {
                let x = layer.forward(inputs.last().unwrap(), pos);
                inputs.push(x);
            }
        });
        phases.forward_s = clock.lap();
        // Head (with the final norm) on a detached leaf, giving dL/d(last hidden state).
        let last = inputs.pop().unwrap().set_requires_grad(true);
        let hidden = self.norm.forward(&last);
        let (loss, grad) = head(&hidden);
        phases.head_s = clock.lap();
        (hidden * grad).sum(Kind::Float).backward();
        let mut grad = last.grad();
        // Backward through the layers, last first, recomputing each.
        for (i, (layer, x)) in self.layers.iter().zip(inputs).enumerate().rev() {
            let x = x.set_requires_grad(true);
            let y = layer.forward(&x, pos);
            (y * &grad).sum(Kind::Float).backward();
            grad = x.grad();
            layer_done(i);
        }
        (embedded * grad).sum(Kind::Float).backward();
        phases.backward_s = clock.lap();
        StepLoss { loss, windows, phases }
    }
}
