//! Compile `csrc/*.cpp` (c10d, attention, fused AdamW, CUDA memory statistics, profiler) against the
//! set-up's LibTorch headers (see launch/setup.sh).
//!
//! * Gloo headers: Debian's libgloo-dev (`/usr/include`) or its .deb unpacked under
//!   `.cache/gloo` by a set-up that is not root; the wheel's libtorch has Gloo compiled in.
//! * NCCL: `ProcessGroupNCCL.hpp` also needs the wheel's `nvidia/cu13/include` and
//!   `nvidia/nccl/include` plus two header packages (nvidia-cuda-crt, nvidia-cuda-cccl). The set-up
//!   installs them, so every build (CI included) compiles the NCCL path; without them the build
//!   fails and names the fix, unless `LONGMIX_NO_NCCL=1` asks for a Gloo-only build. The same
//!   headers give the CUDA allocator statistics (`LONGMIX_CUDA`).

use std::path::{Path, PathBuf};

/// One file per concern; `ffi.h` holds their shared calling convention.
const SOURCES: [&str; 5] = ["c10d.cpp", "attention.cpp", "optim.cpp", "cuda.cpp", "profile.cpp"];

fn main() {
    longmix_build::link_libtorch();
    let torch = longmix_build::libtorch_dir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap();
    let inc = torch.join("include");
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None)
        .include(&inc)
        .include(inc.join("torch/csrc/api/include"))
        .flag("-w")
        .files(SOURCES.iter().map(|f| format!("csrc/{f}")));
    let gloo_local = root.join(".cache/gloo/usr/include");
    if gloo_local.join("gloo/config.h").exists() {
        b.include(&gloo_local);
    } else if !Path::new("/usr/include/gloo/config.h").exists() {
        panic!("the Gloo headers are missing: run launch/setup.sh (it installs Debian's libgloo-dev)");
    }
    println!("cargo:rerun-if-env-changed=LONGMIX_NO_NCCL");
    if std::env::var("LONGMIX_NO_NCCL").as_deref() != Ok("1") {
        let nv = torch.join("../nvidia");
        let dirs: Vec<PathBuf> = vec![nv.join("cu13/include"), nv.join("nccl/include")];
        let needed = [
            nv.join("cu13/include/crt/host_config.h"),
            nv.join("cu13/include/nv/target"),
            nv.join("nccl/include/nccl.h"),
        ];
        if let Some(missing) = needed.iter().find(|p| !p.exists()) {
            panic!(
                "{} is missing, so the NCCL path cannot compile: run launch/setup.sh (it installs nvidia-cuda-crt and \
                 nvidia-cuda-cccl), or build with LONGMIX_NO_NCCL=1 for Gloo only",
                missing.display()
            );
        }
        for d in dirs {
            b.include(d);
        }
        b.define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("LONGMIX_NCCL", None)
            .define("LONGMIX_CUDA", None);
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rerun-if-changed=csrc");
    b.compile("longmix_torch_ext");
    println!("cargo:rustc-link-search=native={}", torch.join("lib").display());
    for lib in ["torch_cpu", "c10", "torch"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
