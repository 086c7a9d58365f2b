//! `c10d-selftest BACKEND`: one rank of a collectives check, run by N processes at once
//! (torchrun's variables: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the GPU
//! for nccl). Every rank checks all-reduce (sum, max, min, async), reduce, broadcast, the
//! context-parallel all-to-all and its backward, barrier and the store against values it
//! computes itself, prints `ok rank R of W`, and exits non-zero on any mismatch. Used by the
//! crate's tests (Gloo) and by `launch/gpu-check.sh` (NCCL).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use longmix_torch_ext::c10d::{Backend, ProcessGroup, ReduceOp, Rendezvous};
use tch::{Device, Kind, Tensor};

fn var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

fn main() -> Result<()> {
    let backend = match std::env::args().nth(1).as_deref() {
        Some("nccl") => Backend::Nccl,
        _ => Backend::Gloo,
    };
    let rank: usize = var("RANK")?.parse()?;
    let world: usize = var("WORLD_SIZE")?.parse()?;
    let agent = std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v == "True");
    let rv = Rendezvous {
        host: var("MASTER_ADDR")?,
        port: var("MASTER_PORT")?.parse()?,
        rank,
        world_size: world,
        is_server: rank == 0 && !agent,
        timeout: Duration::from_secs(std::env::var("TIMEOUT_S").map_or(30, |s| s.parse().unwrap_or(30))),
        prefix: "selftest/".into(),
        device: None,
    };
    let device = match backend {
        Backend::Gloo => Device::Cpu,
        Backend::Nccl => Device::Cuda(std::env::var("LOCAL_RANK").map_or(0, |s| s.parse().unwrap_or(0))),
    };
    let rv = match device {
        Device::Cuda(d) => {
            longmix_torch_ext::cuda::set_device(d)?;
            Rendezvous { device: Some(d), ..rv }
        }
        _ => rv,
    };
    let pg = ProcessGroup::new(backend, &rv)?;
    let mine = Tensor::full([5], (rank + 1) as f64, (Kind::Float, device));
    let expect = |t: &Tensor, v: f64, what: &str| -> Result<()> {
        let got = Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(Device::Cpu))?;
        ensure!(got.iter().all(|&x| x == v), "rank {rank}: {what} gave {got:?}, expected {v}");
        Ok(())
    };
    let w = world as f64;
    let t = mine.copy();
    pg.all_reduce(&t, ReduceOp::Sum)?;
    expect(&t, w * (w + 1.0) / 2.0, "all-reduce sum")?;
    let t = mine.copy();
    pg.all_reduce(&t, ReduceOp::Max)?;
    expect(&t, w, "all-reduce max")?;
    let t = mine.copy();
    pg.all_reduce(&t, ReduceOp::Min)?;
    expect(&t, 1.0, "all-reduce min")?;
    let (a, b) = (mine.copy(), mine.copy() * 2.0);
    let (wa, wb) = (pg.all_reduce_async(&a)?, pg.all_reduce_async(&b)?);
    let t0 = std::time::Instant::now();
    while !wb.is_completed() {
        ensure!(t0.elapsed() < rv.timeout, "rank {rank}: an all-reduce never reported completion");
        std::thread::sleep(Duration::from_millis(1));
    }
    wb.wait()?;
    wa.wait()?;
    expect(&a, w * (w + 1.0) / 2.0, "async all-reduce")?;
    expect(&b, w * (w + 1.0), "second async all-reduce")?;
    let root = world - 1;
    let t = mine.copy();
    pg.broadcast(&t, root)?;
    expect(&t, world as f64, "broadcast")?;
    let t = mine.copy();
    pg.reduce_async(&t, root)?.wait()?;
    if rank == root {
        expect(&t, w * (w + 1.0) / 2.0, "reduce")?;
    }
    // The context-parallel exchange: block i of x goes to rank i; its backward sends each
    // block's gradient back where the block came from.
    let x = (Tensor::arange(2 * world as i64, (Kind::Float, device)).view([world as i64, 2]).floor_divide_scalar(2)
        + 100.0 * rank as f64)
        .set_requires_grad(true);
    let y = pg.all_to_all(&x)?;
    let want = Tensor::arange(world as i64, (Kind::Float, device)).unsqueeze(1) * 100.0 + rank as f64;
    ensure!(
        y.detach().eq_tensor(&want.expand([world as i64, 2], false)).all().int64_value(&[]) == 1,
        "rank {rank}: all-to-all gave {y}"
    );
    let w = Tensor::arange(world as i64, (Kind::Float, device)).unsqueeze(1) + 1.0;
    (&y * &w).sum(Kind::Float).backward();
    expect(&x.grad().reshape([-1]), (rank + 1) as f64, "all-to-all backward")?;
    pg.store_set(&format!("selftest/{rank}"), &format!("hello from {rank}"))?;
    let peer = (rank + 1) % world;
    let got = pg.store_get(&format!("selftest/{peer}"), rv.timeout)?;
    ensure!(got == format!("hello from {peer}"), "rank {rank}: store gave {got:?}");
    let arrived = pg.store_add("selftest/arrived", 1)?;
    ensure!((1..=world as i64).contains(&arrived), "rank {rank}: the store counter gave {arrived}");
    pg.barrier()?;
    ensure!(pg.store_add("selftest/arrived", 0)? == world as i64, "rank {rank}: the store counter missed a rank");
    pg.shutdown()?;
    println!("ok rank {rank} of {world} ({backend:?} on {device:?}), shut down");
    Ok(())
}
