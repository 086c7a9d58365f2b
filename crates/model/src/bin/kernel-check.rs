//! `kernel-check [cuda|cpu]`: the GPU numerics of training, each against an independent path,
//! exiting non-zero on any mismatch (run by `launch/gpu-check-speed.sh`; on `cpu` it checks
//! the fallbacks, which is how it is tried on machines without a GPU).
//!
//! 1. Packed rows: [`varlen_attention`] (FlashAttention-2 over `cu_seqlens` on CUDA in bf16)
//!    equals per-document SDPA in float32, output and q/k/v gradients, with grouped KV heads
//!    and with a sliding window.
//! 2. A small LLaMA on a mixed batch (packed short row + long row) in bf16: the checkpointed,
//!    chunked-head path gives the plain path's loss and gradients.
//! 3. The CUDA allocator statistics see a 1 GB tensor and reset.
//! 4. Context parallelism over a group of one rank (NCCL on CUDA): the all-to-alls and their
//!    backward run, and the step equals the plain one (f32, bf16).
//! 5. (CUDA) SDPA picks a fused kernel, not the O(T^2) math one, for a long bf16 row with grouped
//!    KV heads (what `dtype = "auto"` trains in), and each forward + backward over packed rows
//!    copies its `cu_seqlens` to the GPU once, however many layers and recomputations read it.

use std::time::Duration;

use anyhow::{ensure, Result};
use longmix_model::{batch_targets, CausalLm, ContextParallel, MemoryOptions, ModelConfig, Tokens};
use longmix_torch_ext::attention::{flash_varlen_available, per_document, varlen_attention, CuSeqlens};
use longmix_torch_ext::c10d::{Backend, ProcessGroup, Rendezvous};
use tch::{nn, Device, Kind, Tensor};

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-6)
}

fn attention(device: Device, kind: Kind) -> Result<()> {
    let cu = [0i64, 700, 1500, 1501, 4096, 4500];
    let total = *cu.last().unwrap();
    for (heads, kv, window) in [(8, 8, None), (8, 2, None), (8, 2, Some(256))] {
        tch::manual_seed(1);
        let mk = |h: i64| Tensor::randn([total, h, 64], (Kind::Float, device)).set_requires_grad(true);
        let (q, k, v) = (mk(heads), mk(kv), mk(kv));
        let up = Tensor::randn([total, heads, 64], (Kind::Float, device));
        let cast = |x: &Tensor| x.to_kind(kind);
        let fast = varlen_attention(&cast(&q), &cast(&k), &cast(&v), &CuSeqlens::new(cu.to_vec(), device), window);
        (fast.to_kind(Kind::Float) * &up).sum(Kind::Float).backward();
        let fast_grads = [q.grad().copy(), k.grad().copy(), v.grad().copy()];
        for t in [&q, &k, &v] {
            let _ = t.grad().zero_();
        }
        let exact = per_document(&q, &k, &v, &cu, window);
        (&exact * &up).sum(Kind::Float).backward();
        let out = max_rel(&fast, &exact);
        let grads: Vec<f64> =
            fast_grads.iter().zip([q.grad(), k.grad(), v.grad()]).map(|(a, b)| max_rel(a, &b)).collect();
        let worst = grads.iter().cloned().fold(0.0, f64::max);
        println!("varlen attention heads {heads}/{kv} window {window:?}: output rel diff {out:.2e}, worst gradient {worst:.2e}");
        ensure!(out < 2e-2 && worst < 5e-2, "varlen attention disagrees with per-document SDPA");
    }
    Ok(())
}

const TINY: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
  "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
  "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": false}"#;

/// The small LLaMA of these checks in `kind` on a mixed batch (a packed row of 300, 500 and 224
/// tokens, a 1024-token row).
struct Case {
    vs: nn::VarStore,
    model: CausalLm,
    ids: Tensor,
    pos: Tensor,
    targets: Tensor,
}

impl Case {
    fn new(device: Device, kind: Kind, seed: i64) -> Result<Case> {
        tch::manual_seed(seed);
        let mut vs = nn::VarStore::new(device);
        let model = CausalLm::new(&vs.root(), ModelConfig::from_json_str(TINY)?);
        vs.set_kind(kind);
        let ids = Tensor::randint(1000, [2, 1024], (Kind::Int64, device));
        let packed: Vec<i64> = [300, 500, 224].iter().flat_map(|&n| 0..n).collect();
        let pos = Tensor::stack(&[Tensor::from_slice(&packed), Tensor::arange(1024, (Kind::Int64, Device::Cpu))], 0)
            .to_device(device);
        let targets = batch_targets(&ids, &pos);
        Ok(Case { vs, model, ids, pos, targets })
    }

    /// The summed loss of `tokens` and every parameter's gradient (as float32), from zero.
    fn step(&self, tokens: &Tokens, opts: MemoryOptions) -> (f64, Vec<Tensor>) {
        for v in self.vs.trainable_variables() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let loss = self.model.forward_backward_with(tokens, 1e-3, opts, &mut |_| {}).loss.sum();
        let grads = self.vs.trainable_variables().iter().map(|v| v.grad().to_kind(Kind::Float).copy()).collect();
        (loss, grads)
    }

    fn whole_rows(&self) -> Tokens {
        self.model.tokens(&self.ids, &self.pos, &self.targets)
    }
}

fn checkpointing(device: Device, kind: Kind) -> Result<()> {
    let case = Case::new(device, kind, 2)?;
    let run = |opts: MemoryOptions| case.step(&case.whole_rows(), opts);
    let plain = run(MemoryOptions::default());
    let uploads = CuSeqlens::uploads();
    let ckpt = run(MemoryOptions { checkpoint_layers: true, loss_chunk: Some(300), sync_phases: false });
    let uploads = CuSeqlens::uploads() - uploads;
    println!("cu_seqlens host-to-device copies in one checkpointed forward + backward of 4 layers: {uploads}");
    if device.is_cuda() {
        ensure!(uploads == 1, "expected one copy of cu_seqlens per forward, got {uploads}");
    }
    let worst = plain.1.iter().zip(&ckpt.1).map(|(a, b)| max_rel(b, a)).fold(0.0, f64::max);
    let dloss = (plain.0 - ckpt.0).abs() / plain.0.abs();
    println!("checkpointed vs plain ({kind:?}): loss rel diff {dloss:.2e}, worst gradient rel diff {worst:.2e}");
    let tol = if kind == Kind::Float { 1e-4 } else { 3e-2 };
    ensure!(dloss < tol && worst < tol, "the checkpointed path's gradients differ from the plain path's");
    Ok(())
}

/// Context parallelism over a group of one rank (NCCL on CUDA, Gloo on CPU): the exchange and
/// its autograd backward run for real, and the sliced step gives the plain step's loss and
/// gradients.
fn context(device: Device, kind: Kind) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let rv = Rendezvous {
        host: "127.0.0.1".into(),
        port,
        rank: 0,
        world_size: 1,
        is_server: true,
        timeout: Duration::from_secs(60),
        prefix: "kernel-check/".into(),
        device: match device {
            Device::Cuda(d) => Some(d),
            _ => None,
        },
    };
    let backend = if device.is_cuda() { Backend::Nccl } else { Backend::Gloo };
    let cp = ContextParallel::new(ProcessGroup::new(backend, &rv)?);
    let case = Case::new(device, kind, 3)?;
    let opts = MemoryOptions { checkpoint_layers: true, loss_chunk: Some(300), sync_phases: false };
    let plain = case.step(&case.whole_rows(), opts);
    let sliced = case.step(&case.model.slice_tokens(&case.ids, &case.pos, &case.targets, &cp), opts);
    let exchanged = cp.group().all_to_all_seconds();
    let worst = plain.1.iter().zip(&sliced.1).map(|(a, b)| max_rel(b, a)).fold(0.0, f64::max);
    let dloss = (plain.0 - sliced.0).abs() / plain.0.abs();
    println!(
        "context parallel over one {backend:?} rank vs plain ({kind:?}): loss rel diff {dloss:.2e}, worst gradient \
         rel diff {worst:.2e}, {exchanged:.4} s in all-to-alls"
    );
    ensure!(exchanged > 0.0, "no all-to-all ran");
    let tol = if kind == Kind::Float { 1e-5 } else { 1e-2 };
    ensure!(dloss < tol && worst < tol, "the context-parallel step differs from the plain one");
    cp.group().shutdown()
}

fn allocator(device: usize) -> Result<()> {
    use longmix_torch_ext::cuda;
    cuda::reset_peak(device)?;
    let before = cuda::memory(device)?;
    let big = Tensor::zeros([250_000_000], (Kind::Float, Device::Cuda(device)));
    let held = cuda::memory(device)?;
    drop(big);
    cuda::reset_peak(device)?;
    let after = cuda::memory(device)?;
    println!("allocator: {before:?} -> with 1 GB {held:?} -> after reset {after:?}");
    ensure!(held.peak_allocated - before.allocated >= 1_000_000_000, "the allocator's peak missed a 1 GB tensor");
    ensure!(after.peak_allocated < held.peak_allocated, "reset_peak did not reset the peak");
    Ok(())
}

/// The SDPA backend PyTorch picks for one causal row of `t` tokens (32 query / 8 KV heads).
fn sdpa_backend(device: Device, kind: Kind, t: i64) -> &'static str {
    let q = Tensor::zeros([1, 32, t, 128], (kind, device));
    let kv = Tensor::zeros([1, 8, t, 128], (kind, device));
    match Tensor::internal_fused_sdp_choice(&q, &kv, &kv, None::<Tensor>, 0.0, true, None, true) {
        0 => "math",
        1 => "flash",
        2 => "memory-efficient",
        3 => "cudnn",
        _ => "other",
    }
}

fn sdpa_choice(device: Device) -> Result<()> {
    let bf16 = sdpa_backend(device, Kind::BFloat16, 16384);
    let f32 = sdpa_backend(device, Kind::Float, 4096);
    println!("SDPA backend for a causal GQA row: bf16 x 16384 {bf16}, f32 x 4096 {f32}");
    ensure!(matches!(bf16, "flash" | "cudnn"), "long bf16 rows would run SDPA's {bf16} kernel");
    Ok(())
}

fn main() -> Result<()> {
    let device = match std::env::args().nth(1).as_deref() {
        Some("cpu") => Device::Cpu,
        _ => {
            ensure!(
                tch::Cuda::is_available(),
                "CUDA is not available to this binary (no driver, or libtorch_cuda missing)"
            );
            Device::Cuda(0)
        }
    };
    let kind = if device.is_cuda() { Kind::BFloat16 } else { Kind::Float };
    if device.is_cuda() {
        ensure!(flash_varlen_available(), "this LibTorch has no CUDA kernel for aten::_flash_attention_forward");
    }
    attention(device, kind)?;
    checkpointing(device, Kind::Float)?;
    checkpointing(device, kind)?;
    context(device, Kind::Float)?;
    context(device, kind)?;
    if let Device::Cuda(d) = device {
        allocator(d)?;
        sdpa_choice(device)?;
    }
    println!("kernel-check ok on {device:?}");
    Ok(())
}
