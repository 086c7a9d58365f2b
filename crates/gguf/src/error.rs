//! The crate's error type. Each message names the problem and what to do about it.

use std::path::PathBuf;

use crate::dequant::DequantError;
use crate::ggml_type::{dequantizable_list, GgmlType};

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },

    #[error(
        "{} is not a GGUF file: it starts with {found}, not the magic \"GGUF\"; \
         pass a .gguf model file as written by llama.cpp",
        path.display()
    )]
    NotGguf { path: PathBuf, found: String },

    #[error(
        "{} is a big-endian GGUF file, which is not supported; \
         use the little-endian file llama.cpp writes by default",
        path.display()
    )]
    BigEndian { path: PathBuf },

    #[error(
        "{} is GGUF version {version}, which is not supported (supported: 2 and 3); \
         re-convert the model with a current llama.cpp convert_hf_to_gguf.py",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, version: u32 },

    #[error(
        "{} is truncated: reading {what} needs {needed} bytes from offset {offset}, \
         but the file has {len} bytes; the download or copy is incomplete, fetch the file again",
        path.display()
    )]
    Truncated { path: PathBuf, what: String, offset: u64, needed: u64, len: u64 },

    #[error("{} is not a valid GGUF file: {detail}; the file is corrupt or was not written by llama.cpp", path.display())]
    Malformed { path: PathBuf, detail: String },

    #[error("metadata key {key:?} is missing; {hint}")]
    MissingMetadata { key: String, hint: &'static str },

    #[error("metadata key {key:?} is {found}, expected {expected}; the file is corrupt or not a llama.cpp model")]
    MetadataType { key: String, found: String, expected: &'static str },

    #[error(
        "model architecture {architecture:?} is not supported: only \"llama\" (LLaMA, Mistral, SmolLM, TinyLlama \
         and other LlamaForCausalLM models) can be imported; convert from the original Hugging Face \
         checkpoint instead"
    )]
    UnsupportedArchitecture { architecture: String },

    #[error(
        "tensor {tensor:?} is stored as {ty}, which cannot be dequantized (supported: {supported}); \
         re-quantize the model to one of these with llama-quantize, or use an F16/Q8_0 GGUF",
        supported = dequantizable_list()
    )]
    UnsupportedTensorType { tensor: String, ty: GgmlType },

    #[error("tensor {tensor:?}: {source}")]
    Dequantize { tensor: String, source: DequantError },

    /// The file is valid GGUF but describes something this importer cannot represent.
    #[error("{0}")]
    Unsupported(String),

    /// The tensors or metadata contradict each other.
    #[error("inconsistent model: {0}; the file is corrupt or was not converted from a LlamaForCausalLM model")]
    Inconsistent(String),

    #[error(
        "output directory {} already exists and is not a previous import (no {marker} in it); \
         refusing to overwrite it: remove it or choose another --out",
        path.display()
    )]
    OutputExists { path: PathBuf, marker: &'static str },

    #[error("cannot write model.safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),

    #[error("cannot serialize {file}: {source}")]
    Json { file: &'static str, source: serde_json::Error },
}

impl GgufError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        GgufError::Io { action, path: path.into(), source }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn converts_to_anyhow() {
        fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<super::GgufError>();
    }
}
