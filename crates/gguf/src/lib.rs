//! Converting GGUF files (llama.cpp's model container) into Hugging Face model folders.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::path::Path;
//! let report = longmix_gguf::import_gguf(Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"), Path::new("smollm2"))?;
//! println!("{} tensors, {} parameters", report.n_tensors, report.n_params);
//! # Ok(()) }
//! ```
//!
//! The pieces are usable on their own: [`GgufFile`] reads any GGUF v2/v3 file (metadata, tensor
//! table, memory-mapped data), [`dequantize`] turns ggml blocks into `f32`, [`llama`] maps the
//! LLaMA architecture onto `LlamaForCausalLM` and [`tokenizer`] rebuilds `tokenizer.json`.
//!
//! Pure Rust; no LibTorch.

mod dequant;
mod error;
mod ggml_type;
mod import;
pub mod llama;
mod reader;
pub mod tokenizer;
mod value;

pub use dequant::{dequantize, DequantError, Dequantizer};
pub use error::{GgufError, Result};
pub use ggml_type::{GgmlType, DEQUANTIZABLE};
pub use import::{import_gguf, ImportReport, MARKER_FILE};
pub use reader::{GgufFile, TensorInfo, DEFAULT_ALIGNMENT};
pub use value::Value;
