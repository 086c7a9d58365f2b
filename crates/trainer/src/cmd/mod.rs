pub mod env;
pub mod import_gguf;
pub mod score;
