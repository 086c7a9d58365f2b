pub mod env;
pub mod eval;
pub mod export;
pub mod generate;
pub mod import_gguf;
pub mod needle_ppl;
pub mod score;
pub mod search;
