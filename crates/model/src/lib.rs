//! LLaMA, Mistral, Phi-3, Qwen2 and Qwen3 causal language models on LibTorch, numerically equal
//! to Hugging Face transformers: config resolution, RoPE with every scaling (windows chosen per
//! row), packed rows, safetensors loading, the LongRoPE extension ([`extension`]) and the LM-head
//! loss ([`head`]).

pub mod attention;
pub mod config;
pub mod context;
pub mod export;
pub mod extension;
pub mod factors;
pub mod generate;
pub mod head;
pub mod load;
pub mod memory;
pub mod presets;
pub mod rope;
pub mod string;
pub mod tensor_file;
pub mod transformer;

pub use config::{Architecture, ModelConfig};
pub use context::{check_context_parallel, context_parallel_sizes, ContextParallel};
pub use export::{export_hf, ExportOptions};
pub use extension::{
    critical_dim, longrope_attention_factor, own_short_factors, AttentionFactor, Extension, ExtensionSpec, FactorSet,
    LongFactors,
};
pub use factors::FactorsFile;
pub use generate::{generate, DecodeOptions, Decoder, GenerateOptions, Generation, Sampling};
pub use head::{batch_targets, HeadLoss, HEAD_CHUNK};
pub use load::{load_model, load_tokenizer, LoadedModel};
pub use longmix_core::{next_token_targets, Window, IGNORE_INDEX};
pub use memory::{MemoryOptions, Phases, StepLoss};
pub use rope::{RopeConfig, RopeScaling};
pub use string::StringConfig;
pub use tensor_file::write_safetensors;
pub use transformer::{CausalLm, Positions, Tokens};
