//! Shared test helpers: locating the real SmolLM2 GGUF, and writing small synthetic GGUF files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::f16;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures/smollm2")
}

/// The real SmolLM2 GGUF: `$LONGMIX_SMOLLM2_GGUF`, else `<workspace>/.cache/pkgs/...`.
/// Panics (so the test fails, not skips) when it is missing.
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("LONGMIX_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cache/pkgs/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.is_file(),
        "{} is missing: run launch/setup.sh (or point LONGMIX_SMOLLM2_GGUF at SmolLM2-135M-Instruct.Q4_1.gguf)",
        path.display()
    );
    path
}

/// A fresh scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("longmix-gguf").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The real file imported once per test binary.
pub fn imported_smollm2() -> &'static (longmix_gguf::ImportReport, PathBuf) {
    static IMPORT: OnceLock<(longmix_gguf::ImportReport, PathBuf)> = OnceLock::new();
    IMPORT.get_or_init(|| {
        let gguf = smollm2_gguf();
        let out = scratch("smollm2").join("model");
        let report = longmix_gguf::import_gguf(&gguf, &out).unwrap_or_else(|e| panic!("import failed: {e}"));
        (report, out)
    })
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

// ---- GGUF writing -------------------------------------------------------------------------

pub mod ggml {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q8_0: u32 = 8;
    pub const IQ4_NL: u32 = 20;
}

/// A metadata value to write.
#[derive(Clone, Debug)]
pub enum Kv {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

impl Kv {
    pub fn str(s: &str) -> Kv {
        Kv::Str(s.to_string())
    }
}

/// Writes GGUF files: metadata, then tensor infos, then aligned tensor data.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    pub version: u32,
    pub kvs: Vec<(String, Kv)>,
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

const ALIGNMENT: usize = 32;

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter { version: 3, kvs: Vec::new(), tensors: Vec::new() }
    }

    pub fn kv(&mut self, key: &str, value: Kv) -> &mut Self {
        self.kvs.retain(|(k, _)| k != key);
        self.kvs.push((key.to_string(), value));
        self
    }

    pub fn remove_kv(&mut self, key: &str) -> &mut Self {
        self.kvs.retain(|(k, _)| k != key);
        self
    }

    /// `dims` in GGUF order (innermost first).
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.retain(|(n, ..)| n != name);
        self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        };
        for (key, value) in &self.kvs {
            string(&mut out, key);
            match value {
                Kv::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Kv::I32(v) => {
                    out.extend(5u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Kv::F32(v) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Kv::Bool(v) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(*v as u8);
                }
                Kv::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    string(&mut out, s);
                }
                Kv::Strs(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for s in items {
                        string(&mut out, s);
                    }
                }
                Kv::I32s(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(5u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for v in items {
                        out.extend(v.to_le_bytes());
                    }
                }
            }
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + data.len()).next_multiple_of(ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        }
        out
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_bytes()).unwrap();
        path.to_path_buf()
    }
}

// ---- hand quantization --------------------------------------------------------------------

/// Deterministic small integers.
pub struct Codes(u64);

impl Codes {
    pub fn new(seed: u64) -> Self {
        Codes(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self, modulo: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % modulo
    }
}

fn f16_bytes(x: f32) -> [u8; 2] {
    let h = f16::from_f32(x);
    assert_eq!(h.to_f32(), x, "{x} is not exact in f16");
    h.to_bits().to_le_bytes()
}

/// A power of two in [1/16, 1/2], exact in f16.
fn scale(codes: &mut Codes) -> f32 {
    1.0 / (2u32 << codes.next(4)) as f32
}

/// `n` values of type `ty` and the bytes that encode them exactly, built block by block the way
/// ggml lays blocks out.
pub fn quantize(ty: u32, n: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Codes::new(seed);
    let mut bytes = Vec::new();
    let mut values = Vec::with_capacity(n);
    match ty {
        ggml::F32 => {
            for _ in 0..n {
                let v = (codes.next(2001) as f32 - 1000.0) / 37.0;
                bytes.extend(v.to_le_bytes());
                values.push(v);
            }
        }
        ggml::F16 => {
            for _ in 0..n {
                let v = (codes.next(2001) as f32 - 1000.0) / 64.0;
                bytes.extend(f16_bytes(v));
                values.push(v);
            }
        }
        ggml::Q8_0 => {
            // d: f16, then 32 signed bytes; value = q * d.
            for _ in 0..n / 32 {
                let d = scale(&mut codes);
                bytes.extend(f16_bytes(d));
                for _ in 0..32 {
                    let q = codes.next(255) as i32 - 127;
                    bytes.push(q as i8 as u8);
                    values.push(q as f32 * d);
                }
            }
        }
        ggml::Q4_0 | ggml::Q4_1 => {
            // d (and m for Q4_1) as f16, then 16 bytes: byte j = q[j] | q[j + 16] << 4.
            for _ in 0..n / 32 {
                let d = scale(&mut codes);
                let m = -(codes.next(8) as f32) / 4.0;
                bytes.extend(f16_bytes(d));
                if ty == ggml::Q4_1 {
                    bytes.extend(f16_bytes(m));
                }
                let q: Vec<u8> = (0..32).map(|_| codes.next(16) as u8).collect();
                bytes.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
                values.extend(q.iter().map(|&q| match ty {
                    ggml::Q4_0 => (q as f32 - 8.0) * d,
                    _ => q as f32 * d + m,
                }));
            }
        }
        other => panic!("no hand quantizer for type {other}"),
    }
    (bytes, values)
}

/// llama.cpp's `permute(w, n_head)`: `w.reshape(n_head, 2, rows // n_head // 2, cols)
/// .swapaxes(1, 2).reshape(rows, cols)`, applied to HF-layout rows.
pub fn llama_cpp_permute(hf: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0.0; hf.len()];
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let to = (h * half + i) * 2 + s; // index in the (n_head, half, 2) result
                let from = (h * 2 + s) * half + i; // index in the (n_head, 2, half) source
                out[to * cols..(to + 1) * cols].copy_from_slice(&hf[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}
