//! Long-context evaluation of LLaMA / Phi-3 checkpoints (`docs/numerics.md` §5):
//!
//! * [`ppl`]: perplexity by length on a user's corpus (truncated or sliding windows);
//! * [`retrieval::passkey`]: the classic passkey prompt, accuracy by length x depth;
//! * [`retrieval::niah`]: RULER niah_single (numbers / words / UUIDs, noise or real-text
//!   haystack), `string_match_all` by length x depth;
//!
//! each under any [`overrides::RopeChoice`] (the model's own RoPE, PI, NTK, dynamic NTK, YaRN,
//! LongRoPE factors, STRING). Prompts are built at the token level with exact lengths from
//! seeded generators, so every model and setting is asked the same questions. Results are
//! plain structs (serde) with text tables; [`plot`] draws the PNGs.
//!
//! The scoring code talks to [`lm::LanguageModel`] / [`lm::TextTokenizer`] traits, so it can
//! be tested with models whose answers are forced.

pub mod lm;
pub mod overrides;
pub mod plot;
pub mod ppl;
pub mod prompts;
pub mod retrieval;

pub use lm::{LanguageModel, TchLm, TextTokenizer};
pub use overrides::{Applied, RopeChoice, RopeOverride, StringChoice};
pub use ppl::{perplexity, PplMode, PplOptions, PplResult};
pub use prompts::{first_integer, string_match_all, Haystack, NeedleValue};
pub use retrieval::{niah, passkey, GridOptions, GridResult};

/// The Hugging Face tokenizer type (re-exported so callers need no direct dependency).
pub use tokenizers::Tokenizer;
