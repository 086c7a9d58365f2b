//! Gloo collectives across real processes on this machine (the c10d-selftest binary).

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn(rank: usize, world: usize, port: u16, timeout_s: u64) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_c10d-selftest"))
        .arg("gloo")
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("TIMEOUT_S", timeout_s.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn three_processes_reduce_broadcast_and_share_a_store() {
    let port = free_port();
    let kids: Vec<_> = (0..3).map(|r| spawn(r, 3, port, 60)).collect();
    for (r, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rank {r} failed: {text}");
        assert!(text.contains(&format!("ok rank {r} of 3")) && text.contains("shut down"), "{text}");
    }
}

#[test]
fn a_missing_rank_fails_the_others_within_the_timeout() {
    // World size 2, but rank 1 never starts: rank 0 must give up after its 5 s timeout with an
    // error, not hang.
    let port = free_port();
    let t0 = Instant::now();
    let out = spawn(0, 2, port, 5).wait_with_output().unwrap();
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "rank 0 alone must fail: {text}");
    assert!(took < Duration::from_secs(40), "took {took:?}");
    assert!(text.to_lowercase().contains("timed out") || text.to_lowercase().contains("timeout"), "{text}");
}
