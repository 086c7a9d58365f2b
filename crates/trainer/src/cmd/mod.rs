pub mod env;
pub mod export;
pub mod import_gguf;
pub mod score;
