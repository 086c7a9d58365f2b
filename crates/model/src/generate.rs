//! Incremental decoding with a KV cache: greedy or sampled generation for a batch of prompts.
//!
//! **Batch layout: left padding.** Every layer's cache is `[B, H_kv, capacity, D]`; row `b`'s
//! `n_b` tokens sit in slots `[end - n_b, end)`, so every row appends its next token at the
//! same slot `end` and one batched step serves all rows. Slots left of a row's first token are
//! masked. Each prompt is prefilled on its own (positions 0..n-1, the model's own attention
//! path, no padding inside), so rows never see each other's padding.
//!
//! **Windows (docs/numerics.md §3.2, pitfalls §6 #2 and #3).** A row's RoPE table is picked from
//! its *current length* (max position + 1), never from the cache size (which includes the
//! left padding). Keys in the cache were rotated with the table in force when they were
//! computed; when a row's table changes (a longrope row first exceeding `L0`, as transformers'
//! `Phi3ForCausalLM.prepare_inputs_for_generation` does, or dynamic NTK beyond its original
//! length) that row's cache is dropped and its whole sequence is re-prefilled with the new
//! table. So every step's logits equal a full recomputation of the row's sequence. (For
//! dynamic NTK this means a re-prefill at every step beyond the original length, which is what
//! exactness costs; transformers instead keeps the stale keys.)
//!
//! **STRING** ([`crate::string`]) works the same way: cached keys are rotated at their own
//! positions, and each new query is rotated twice (near and far) and merged by mask.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::attention::Plan;
use crate::rope::apply_rotary;
use crate::string::{rotary_tables, split_attention, StringConfig};
use crate::transformer::CausalLm;

/// Options of the incremental decoder.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Attend with STRING instead of plain RoPE.
    pub string: Option<StringConfig>,
    /// Re-prefill a row whose RoPE table changed (the longrope `L0` switch). Always on in real
    /// use; turning it off reproduces pitfall #2 (stale keys), for tests.
    pub refresh_on_table_change: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions { string: None, refresh_on_table_change: true }
    }
}

struct RowState {
    tokens: Vec<i64>,
    /// The inverse frequencies the row's cached keys were rotated with.
    table: Vec<f32>,
    reprefills: usize,
}

/// A batch of sequences being decoded with a KV cache. All methods run without autograd.
pub struct Decoder<'a> {
    model: &'a CausalLm,
    opts: DecodeOptions,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Slots in use: every row ends at `end`.
    end: i64,
    rows: Vec<RowState>,
}

/// The inverse-frequency table a row of length `len` uses, as plain numbers.
fn table_of(model: &CausalLm, len: i64) -> Vec<f32> {
    Vec::<f32>::try_from(model.config.rope.inv_freq(len, Device::Cpu)).expect("inv_freq is float32")
}

impl<'a> Decoder<'a> {
    /// Prefill `prompts` (each non-empty); returns the decoder and the float32 logits `[B, vocab]`
    /// of each prompt's last position.
    pub fn new(model: &'a CausalLm, prompts: &[Vec<i64>], opts: DecodeOptions) -> Result<(Self, Tensor)> {
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            bail!("generation needs at least one prompt, each of at least one token");
        }
        if let Some(s) = &opts.string {
            s.validate()?;
        }
        let c = &model.config;
        let b = prompts.len() as i64;
        let end = prompts.iter().map(|p| p.len()).max().unwrap() as i64;
        let cap = end + 64;
        let (kind, device) = (model.embed_tokens.kind(), model.embed_tokens.device());
        let zeros = || Tensor::zeros([b, c.num_key_value_heads, cap, c.head_dim], (kind, device));
        let n_layers = model.layers.len();
        let mut dec = Decoder {
            model,
            opts,
            k: (0..n_layers).map(|_| zeros()).collect(),
            v: (0..n_layers).map(|_| zeros()).collect(),
            end,
            rows: prompts
                .iter()
                .map(|p| RowState { tokens: p.clone(), table: table_of(model, p.len() as i64), reprefills: 0 })
                .collect(),
        };
        let logits = tch::no_grad(|| {
            let rows: Vec<Tensor> = (0..prompts.len()).map(|r| dec.prefill_row(r)).collect();
            Tensor::cat(&rows, 0)
        });
        Ok((dec, logits))
    }

    /// Number of rows.
    pub fn batch_size(&self) -> usize {
        self.rows.len()
    }

    /// Row `r`'s tokens so far (prompt and appended tokens).
    pub fn tokens(&self, r: usize) -> &[i64] {
        &self.rows[r].tokens
    }

    /// How often each row was re-prefilled because its RoPE table changed.
    pub fn reprefills(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.reprefills).collect()
    }

    /// Run row `r`'s whole sequence (its cache slots end at `self.end`), writing its keys and
    /// values into the cache; returns the logits `[1, vocab]` of its last position.
    fn prefill_row(&mut self, r: usize) -> Tensor {
        let model = self.model;
        let c = &model.config;
        let device = model.embed_tokens.device();
        let tokens = &self.rows[r].tokens;
        let n = tokens.len() as i64;
        let ids = Tensor::from_slice(tokens).unsqueeze(0).to_device(device);
        let pos = Tensor::arange(n, (Kind::Int64, device)).unsqueeze(0);
        let start = self.end - n;
        let (cos, sin) = match &self.opts.string {
            None => c.rope.cos_sin(&pos),
            Some(s) => rotary_tables(&c.rope, &pos, &[n], s.attention_factor),
        };
        let far = self
            .opts
            .string
            .filter(|s| n > s.shifted_offset)
            .map(|s| rotary_tables(&c.rope, &(&pos - s.shift()), &[n], s.attention_factor));
        let plan = Plan::new(&pos, c.sliding_window);
        let string = self.opts.string;
        let mut x = model.embed(&ids);
        for (l, layer) in model.layers.iter().enumerate() {
            let (kc, vc) = (&mut self.k[l], &mut self.v[l]);
            x = layer.forward_with(&x, &mut |q, k, v| {
                let k = apply_rotary(&k, &cos, &sin);
                kc.narrow(0, r as i64, 1).narrow(2, start, n).copy_(&k);
                vc.narrow(0, r as i64, 1).narrow(2, start, n).copy_(&v);
                let q_near = apply_rotary(&q, &cos, &sin);
                match &string {
                    None => plan.attend(&q_near, &k, &v),
                    Some(s) => {
                        let q_far = far.as_ref().map(|(fc, fs)| apply_rotary(&q, fc, fs));
                        split_attention(
                            &q_near,
                            q_far.as_ref(),
                            &k,
                            &v,
                            Some(s.shifted_offset),
                            c.sliding_window,
                            None,
                            None,
                        )
                    }
                }
            });
        }
        let last = model.norm.forward(&x.narrow(1, n - 1, 1));
        model.logits(&last).squeeze_dim(1)
    }

    fn ensure_capacity(&mut self, slots: i64) {
        let cap = self.k[0].size()[2];
        if slots <= cap {
            return;
        }
        let grow = (cap).max(slots - cap);
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let s = t.size();
            let extra = Tensor::zeros([s[0], s[1], grow, s[3]], (t.kind(), t.device()));
            *t = Tensor::cat(&[&*t, &extra], 2);
        }
    }

    /// Append one token to every row; returns the float32 logits `[B, vocab]` of the new
    /// position (finished rows still need a token, e.g. their EOS, and their logits are
    /// simply ignored by the caller).
    pub fn step(&mut self, next: &[i64]) -> Tensor {
        assert_eq!(next.len(), self.rows.len(), "one token per row");
        tch::no_grad(|| self.step_inner(next))
    }

    fn step_inner(&mut self, next: &[i64]) -> Tensor {
        let model = self.model;
        let c = &model.config;
        let device = model.embed_tokens.device();
        let b = self.rows.len() as i64;
        for (row, &t) in self.rows.iter_mut().zip(next) {
            row.tokens.push(t);
        }
        let lens: Vec<i64> = self.rows.iter().map(|r| r.tokens.len() as i64).collect();
        self.ensure_capacity(self.end + 1);
        let slot = self.end;
        let keys = slot + 1;
        let ids = Tensor::from_slice(next).view([b, 1]).to_device(device);
        // The new token's position is len - 1, so each row's table is its length's (per row).
        let pos = Tensor::from_slice(&lens).view([b, 1]).to_device(device) - 1;
        let (cos, sin) = match &self.opts.string {
            None => c.rope.cos_sin(&pos),
            Some(s) => rotary_tables(&c.rope, &pos, &lens, s.attention_factor),
        };
        let far = self.opts.string.map(|s| rotary_tables(&c.rope, &(&pos - s.shift()), &lens, s.attention_factor));
        let first_slot = Tensor::from_slice(&lens).to_device(device).neg() + keys; // [B]
        let key_valid = Tensor::arange(keys, (Kind::Int64, device)).unsqueeze(0).ge_tensor(&first_slot.unsqueeze(1));
        let split = self.opts.string.map(|s| s.shifted_offset);
        let mut x = model.embed(&ids);
        for (l, layer) in model.layers.iter().enumerate() {
            let (kc, vc) = (&mut self.k[l], &mut self.v[l]);
            x = layer.forward_with(&x, &mut |q, k, v| {
                kc.narrow(2, slot, 1).copy_(&apply_rotary(&k, &cos, &sin));
                vc.narrow(2, slot, 1).copy_(&v);
                let q_near = apply_rotary(&q, &cos, &sin);
                let q_far = far.as_ref().map(|(fc, fs)| apply_rotary(&q, fc, fs));
                let (kk, vv) = (kc.narrow(2, 0, keys), vc.narrow(2, 0, keys));
                split_attention(&q_near, q_far.as_ref(), &kk, &vv, split, c.sliding_window, Some(&key_valid), Some(1))
            });
        }
        self.end += 1;
        let logits = model.logits(&model.norm.forward(&x)).squeeze_dim(1);
        if !self.opts.refresh_on_table_change {
            return logits;
        }
        let mut rows: Vec<Tensor> = (0..b).map(|r| logits.narrow(0, r, 1)).collect();
        for r in 0..self.rows.len() {
            let table = table_of(model, lens[r]);
            if table != self.rows[r].table {
                rows[r] = self.prefill_row(r);
                self.rows[r].table = table;
                self.rows[r].reprefills += 1;
            }
        }
        Tensor::cat(&rows, 0)
    }
}

/// Float32 logits `[vocab]` of the last position of `tokens` by a full forward pass (no cache):
/// the reference that cached decoding must reproduce.
pub fn full_logits(model: &CausalLm, tokens: &[i64], string: Option<&StringConfig>) -> Tensor {
    let device = model.embed_tokens.device();
    let n = tokens.len() as i64;
    let ids = Tensor::from_slice(tokens).unsqueeze(0).to_device(device);
    tch::no_grad(|| {
        let hidden = match string {
            None => model.hidden_states(&ids, &Tensor::arange(n, (Kind::Int64, device)).unsqueeze(0)),
            Some(s) => crate::string::hidden_states(model, &ids, s),
        };
        model.logits(&hidden.narrow(1, n - 1, 1)).view([-1])
    })
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on ties, like `argmax`).
    Greedy,
    /// Temperature + nucleus (top-p) sampling from a seeded generator (independent of torch's).
    Sample { temperature: f64, top_p: f64, seed: u64 },
}

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// A row stops after emitting one of these (it is kept in the output).
    pub stop_tokens: Vec<i64>,
    pub decode: DecodeOptions,
    /// false: recompute every step from scratch (slow; the reference the cache must equal).
    pub use_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            sampling: Sampling::Greedy,
            stop_tokens: Vec::new(),
            decode: DecodeOptions::default(),
            use_cache: true,
        }
    }
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens per row (including a final stop token, if one was emitted).
    pub tokens: Vec<Vec<i64>>,
    /// Whether each row ended on a stop token.
    pub stopped: Vec<bool>,
    /// Re-prefills per row caused by a RoPE table change.
    pub reprefills: Vec<usize>,
}

pub use longmix_core::SplitMix64;

/// Choose the next token from one row's float32 logits.
pub fn choose(logits: &[f32], sampling: Sampling, rng: &mut SplitMix64) -> i64 {
    let argmax = || {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as i64
    };
    match sampling {
        Sampling::Greedy => argmax(),
        Sampling::Sample { temperature, top_p, .. } => {
            if temperature <= 0.0 {
                return argmax();
            }
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let mut probs: Vec<(usize, f64)> =
                logits.iter().enumerate().map(|(i, &x)| (i, ((x as f64 - max) / temperature).exp())).collect();
            let total: f64 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= total);
            // Nucleus: the most likely tokens until their mass reaches top_p (at least one).
            probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            let mut kept = 0;
            let mut mass = 0.0;
            while kept < probs.len() && (kept == 0 || mass < top_p) {
                mass += probs[kept].1;
                kept += 1;
            }
            let mut u = rng.next_f64() * mass;
            for &(i, p) in &probs[..kept] {
                if u < p {
                    return i as i64;
                }
                u -= p;
            }
            probs[kept - 1].0 as i64
        }
    }
}

/// Generate up to `max_new_tokens` for each prompt.
pub fn generate(model: &CausalLm, prompts: &[Vec<i64>], opts: &GenerateOptions) -> Result<Generation> {
    let b = prompts.len();
    let seed = match opts.sampling {
        Sampling::Sample { seed, .. } => seed,
        Sampling::Greedy => 0,
    };
    let mut rngs: Vec<SplitMix64> =
        (0..b).map(|r| SplitMix64::new(seed ^ (r as u64).wrapping_mul(0xA24B_AED4_963E_E407))).collect();
    let mut out = Generation { tokens: vec![Vec::new(); b], stopped: vec![false; b], reprefills: vec![0; b] };
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let string = opts.decode.string;
    let mut seqs: Vec<Vec<i64>> = prompts.to_vec();
    let full = |seqs: &[Vec<i64>]| -> Tensor {
        let rows: Vec<Tensor> = seqs.iter().map(|s| full_logits(model, s, string.as_ref()).unsqueeze(0)).collect();
        Tensor::cat(&rows, 0)
    };
    let (mut decoder, mut logits) = if opts.use_cache {
        let (d, l) = Decoder::new(model, prompts, opts.decode.clone())?;
        (Some(d), l)
    } else {
        if prompts.iter().any(|p| p.is_empty()) {
            bail!("generation needs prompts of at least one token");
        }
        (None, full(&seqs))
    };
    for step in 0..opts.max_new_tokens {
        let logits_cpu = logits.to_device(Device::Cpu).to_kind(Kind::Float);
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            let row = Vec::<f32>::try_from(logits_cpu.get(r as i64)).expect("float32 logits");
            let tok = choose(&row, opts.sampling, &mut rngs[r]);
            if out.stopped[r] {
                // Keep the batch aligned: a finished row repeats its last token, unrecorded.
                next.push(*seqs[r].last().unwrap());
                continue;
            }
            out.tokens[r].push(tok);
            out.stopped[r] = opts.stop_tokens.contains(&tok);
            next.push(tok);
        }
        if out.stopped.iter().all(|&s| s) || step + 1 == opts.max_new_tokens {
            break;
        }
        for (s, &t) in seqs.iter_mut().zip(&next) {
            s.push(t);
        }
        logits = match decoder.as_mut() {
            Some(d) => d.step(&next),
            None => full(&seqs),
        };
    }
    if let Some(d) = &decoder {
        out.reprefills = d.reprefills();
    }
    Ok(out)
}
