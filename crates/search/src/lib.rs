//! # longmix-search — finding LongRoPE rescale factors
//!
//! * [`needle`]: needle-driven perplexity (docs/numerics.md §3.5): samples of exactly L tokens
//!   with a 7-digit needle at spread depths, loss only on the answer tokens;
//!   [`needle::needle_ppl`] scores a model as configured.
//! * [`space`]: the LongRoPE2 (critical dimension, §3.4) and LongRoPE v1 (§3.3) search spaces,
//!   their constraints, and the mutation / crossover / initial-population operators.
//! * [`ga`]: the evolutionary loop with a fitness cache and atomic, exactly-resumable checkpoints.
//! * [`config`] and [`driver`]: `search.toml` and the `longmix search` run it describes, ending in a
//!   [`longmix_model::FactorsFile`] that the trainer's `[rope] factors_file` reads.
//! * [`rng`]: the seeded generator behind every random choice (its state is checkpointed).

pub mod config;
pub mod driver;
pub mod ga;
pub mod needle;
pub mod rng;
pub mod space;

pub use config::SearchConfig;
pub use driver::{run_search, SearchOutcome};
pub use ga::{Fitness, GaParams, InitPopulation, RunOptions, Search, SearchResult};
pub use needle::{needle_ppl, NeedleSample, NeedleScore};
pub use rng::Rng;
pub use space::{Genes, Mode, Space};
