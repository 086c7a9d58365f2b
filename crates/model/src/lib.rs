//! LLaMA and Phi-3 causal language models on LibTorch, numerically equal to Hugging Face
//! transformers: config resolution, RoPE with every scaling (windows chosen per row), packed
//! rows, safetensors loading.

pub mod attention;
pub mod config;
pub mod export;
pub mod factors;
pub mod generate;
pub mod load;
pub mod memory;
pub mod rope;
pub mod string;
pub mod transformer;

pub use config::{Architecture, ModelConfig};
pub use export::{export_hf, ExportOptions, LongRopeExport};
pub use generate::{generate, Decoder, DecodeOptions, GenerateOptions, Generation, Sampling};
pub use factors::{critical_dim, init_factors, FactorInit, FactorsFile};
pub use memory::{MemoryOptions, StepLoss};
pub use load::{load_model, load_tokenizer, LoadedModel};
pub use rope::{RopeConfig, RopeScaling, Window};
pub use string::StringConfig;
pub use transformer::{next_token_targets, CausalLm, IGNORE_INDEX, NLL_CHUNK};
