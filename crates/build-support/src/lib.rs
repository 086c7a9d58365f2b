//! Called from the build script of every package whose binaries or tests link LibTorch.
//!
//! * An rpath to `<libtorch>/lib`, so the binaries run with no `LD_LIBRARY_PATH`.
//! * `libtorch_cuda.so` linked with `--no-as-needed`: no Rust code names a CUDA symbol, so the
//!   linker's default `--as-needed` would drop it and `tch::Cuda::is_available()` would be
//!   false on a GPU machine. The library loads fine on a machine without a GPU.
//!
//! `cargo:rustc-link-arg` applies only to the package that prints it, which is why this is a
//! helper each package calls rather than something torch-sys could do for everyone.

use std::path::PathBuf;

/// The LibTorch folder: `$LIBTORCH` (set by `.cargo/config.toml` to the project's `.libtorch`).
pub fn libtorch_dir() -> PathBuf {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let dir = std::env::var("LIBTORCH").unwrap_or_else(|_| {
        panic!("LIBTORCH is not set: run launch/setup.sh (it installs torch into .venv and links .libtorch)")
    });
    let dir = PathBuf::from(dir);
    if !dir.join("lib").is_dir() {
        panic!("{} has no lib/ folder: run launch/setup.sh to install torch==2.11.0 into .venv", dir.display());
    }
    dir.canonicalize().expect("canonicalize LIBTORCH")
}

/// Print the link arguments (see the module docs).
pub fn link_libtorch() {
    let lib = libtorch_dir().join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// Expose the linked LibTorch's version (from `torch/version.py`) as the compile-time
/// environment variable `LONGMIX_LIBTORCH_VERSION`, for `longmix env`.
pub fn record_libtorch_version() {
    let file = libtorch_dir().join("version.py");
    println!("cargo:rerun-if-changed={}", file.display());
    let version = std::fs::read_to_string(&file)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("__version__ = ").map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
            })
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=LONGMIX_LIBTORCH_VERSION={version}");
}
