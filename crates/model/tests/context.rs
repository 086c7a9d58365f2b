//! Context parallelism against one process: the ranks of a group are threads here, each with
//! its own Gloo process group over a loopback store (the same code the trainer's processes run).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use longmix_model::attention::Plan;
use longmix_model::{batch_targets, load_model, ContextParallel, MemoryOptions, Window};
use longmix_torch_ext::c10d::{Backend, ProcessGroup, ReduceOp, Rendezvous};
use tch::{Device, Kind, Tensor};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Run `each(group)` on `cp` ranks at once (threads), rank order.
fn on_ranks<R: Send>(cp: usize, each: impl Fn(ContextParallel) -> R + Sync) -> Vec<R> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..cp)
            .map(|rank| {
                let each = &each;
                s.spawn(move || {
                    let rv = Rendezvous {
                        host: "127.0.0.1".into(),
                        port,
                        rank,
                        world_size: cp,
                        is_server: rank == 0,
                        timeout: Duration::from_secs(60),
                        prefix: "cp-test/".into(),
                        device: None,
                    };
                    each(ContextParallel::new(ProcessGroup::new(Backend::Gloo, &rv).unwrap()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The `[B, T]` position ids of rows with these document lengths.
fn positions(rows: &[&[i64]]) -> Tensor {
    let rows: Vec<Tensor> =
        rows.iter().map(|docs| Tensor::from_slice(&docs.iter().flat_map(|&n| 0..n).collect::<Vec<_>>())).collect();
    Tensor::stack(&rows, 0)
}

/// Deterministic stand-in for random numbers (threads must not share LibTorch's generator).
fn pseudo_random(shape: &[i64], seed: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 12.9898 + seed).sin() * 43758.5453).frac().abs().view(shape) * 2.0
        - 1.0
}

fn slice(x: &Tensor, dim: i64, cp: &ContextParallel) -> Tensor {
    let per = x.size()[dim as usize] / cp.size() as i64;
    x.narrow(dim, cp.rank() as i64 * per, per)
}

/// The attention of whole rows through the two all-to-alls equals one process's, values and
/// gradients: grouped KV heads that cp divides (4 query / 2 KV heads at cp 2), KV heads repeated
/// (cp 4 > 2 KV heads), and 6 / 3 heads at cp 3; documents cross the slices' boundaries.
#[test]
fn attention_across_ranks_equals_one_process() {
    for (h, kv, cp) in [(4, 2, 2), (4, 2, 4), (6, 3, 3)] {
        let (b, t, d) = (2, 48, 8);
        let inputs = || {
            let [q, k, v, w] = [(h, 1.0), (kv, 2.0), (kv, 3.0), (h, 4.0)].map(|(n, s)| pseudo_random(&[b, n, t, d], s));
            (q, k, v, w, positions(&[&[48], &[10, 20, 18]]))
        };
        let (q, k, v, w, pos) = inputs();
        let leaves = [&q, &k, &v].map(|x| x.detach().set_requires_grad(true));
        let want = Plan::new(&pos, None).attend(&leaves[0], &leaves[1], &leaves[2]);
        (&want * &w).sum(Kind::Float).backward();
        let want_grads: Vec<Tensor> = leaves.iter().map(|l| l.grad()).collect();

        let got = on_ranks(cp, |g| {
            let (q, k, v, w, pos) = inputs();
            let mine = [&q, &k, &v].map(|x| slice(x, 2, &g).detach().set_requires_grad(true));
            let plan = Plan::new(&pos, None);
            let (kr, vr) =
                (g.to_row(&g.kv_heads(mine[1].shallow_clone())), g.to_row(&g.kv_heads(mine[2].shallow_clone())));
            let out = g.to_slice(&plan.attend(&g.to_row(&mine[0]), &kr, &vr));
            (&out * slice(&w, 2, &g)).sum(Kind::Float).backward();
            // This rank's slice of the output, then of dq, dk, dv.
            [out.detach(), mine[0].grad(), mine[1].grad(), mine[2].grad()]
        });
        let cat = |i: usize| Tensor::cat(&got.iter().map(|r| r[i].shallow_clone()).collect::<Vec<_>>(), 2);
        let out = cat(0);
        let diff = (&out - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "h {h} kv {kv} cp {cp}: output differs by {diff}");
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            let g = cat(i + 1);
            let diff = (&g - &want_grads[i]).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "h {h} kv {kv} cp {cp}: d{name} differs by {diff}");
            assert!(want_grads[i].abs().max().double_value(&[]) > 1e-3, "d{name} is all zero");
        }
    }
}

/// Each rank's summed loss and gradient (scaled by 0.01), added up over the ranks.
type Sums = (Vec<f64>, Vec<i64>, Vec<Window>, BTreeMap<String, Tensor>);

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity").join(case)
}

/// A whole training forward and backward of a tiny Phi-3 (fused q/k/v, partial rotary, L0 32,
/// LongRoPE to 128) split over cp ranks gives one process's loss and gradients, on a long row
/// of one document, a packed row whose documents cross the slices' boundaries, and a row whose
/// long window is decided by a document that some ranks' slices do not hold. 78 tokens: cp 4
/// pads each row by 2.
#[test]
fn a_training_step_across_ranks_equals_one_process() {
    let opts = MemoryOptions { checkpoint_layers: true, loss_chunk: Some(16), sync_phases: false };
    let run = |cp: Option<&ContextParallel>| -> Sums {
        let pos = positions(&[&[78], &[30, 30, 18], &[40, 20, 18]]);
        let ids = (pseudo_random(&[3, 78], 5.0).abs() * 100.0).to_kind(Kind::Int64);
        let tgt = batch_targets(&ids, &pos);
        let m = load_model(&fixture("phi3_longrope_partial"), Kind::Float, Device::Cpu).unwrap();
        let tokens = match cp {
            Some(g) => m.model.slice_tokens(&ids, &pos, &tgt, g),
            None => m.model.tokens(&ids, &pos, &tgt),
        };
        let out = m.model.forward_backward_with(&tokens, 0.01, opts, &mut |_| {});
        let grads = m.vs.variables().into_iter().map(|(k, v)| (k, v.grad().copy())).collect();
        (out.loss.row_nll, out.loss.row_tokens, out.windows, grads)
    };
    let want = run(None);
    assert_eq!(want.2, vec![Window::Long, Window::Short, Window::Long]);
    for cp in [2, 4] {
        let ranks = on_ranks(cp, |g| {
            let (nll, tokens, windows, grads) = run(Some(&g));
            for t in grads.values() {
                g.group().all_reduce(t, ReduceOp::Sum).unwrap();
            }
            let nll_t = Tensor::from_slice(&nll);
            let tok_t = Tensor::from_slice(&tokens);
            g.group().all_reduce(&nll_t, ReduceOp::Sum).unwrap();
            g.group().all_reduce(&tok_t, ReduceOp::Sum).unwrap();
            (Vec::<f64>::try_from(nll_t).unwrap(), Vec::<i64>::try_from(tok_t).unwrap(), windows, grads)
        });
        for (r, got) in ranks.iter().enumerate() {
            assert_eq!(got.2, want.2, "cp {cp} rank {r}: the windows must be the whole rows'");
            assert_eq!(got.1, want.1, "cp {cp} rank {r}: scored tokens");
            for (a, b) in got.0.iter().zip(&want.0) {
                assert!((a - b).abs() < 1e-4 * b.abs(), "cp {cp}: row loss {a} vs {b}");
            }
            let worst = want.3.iter().map(|(k, w)| (&got.3[k] - w).abs().max().double_value(&[])).fold(0.0, f64::max);
            eprintln!("cp {cp} rank {r}: max |grad diff| {worst:.2e}");
            assert!(worst < 1e-6, "cp {cp}: gradients differ by {worst}");
        }
    }
}
