pub mod env;
pub mod eval;
pub mod export;
pub mod generate;
pub mod import_gguf;
pub mod score;
pub mod search;
pub mod needle_ppl;
