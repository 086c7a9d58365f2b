//! Data configuration (serde; unknown keys are rejected so typos fail loudly).
//!
//! Example (TOML, as the trainer would embed it):
//!
//! ```toml
//! seq_len = 16384        # T: every row has exactly T tokens
//! l0 = 4096              # the model's original context length
//! short_share = 0.3      # fraction of rows that are short (max position < l0)
//! seed = 1234
//! eval_fraction = 0.01   # documents held out (by content hash) for eval rows
//! add_bos = true
//! bos_id = 1
//! add_eos = true
//! eos_id = 2
//!
//! [[sources]]
//! type = "jsonl"
//! path = "data/kjv.jsonl"
//! group_by = ["book"]
//! weight = 1.0
//!
//! [[sources]]
//! type = "parquet"
//! path = "data/pg19"
//! text_column = "text"
//! weight = 2.0
//! ```

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

fn one() -> f64 {
    1.0
}
fn default_text_field() -> String {
    "text".to_string()
}
fn default_join() -> String {
    "\n".to_string()
}
fn default_short_share() -> f64 {
    0.3
}

/// One corpus source. `weight` is its relative share of rows (see [`crate::mixture`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// One JSON object per line; the document text is `text_field`. With `group_by`,
    /// consecutive records whose values of those fields are equal are joined (with `join`)
    /// into one document. Blank lines are skipped. `path` may be a folder of
    /// `.jsonl`/`.json`/`.ndjson` files (recursively, sorted; groups do not span files).
    Jsonl {
        path: PathBuf,
        #[serde(default = "default_text_field")]
        text_field: String,
        #[serde(default)]
        group_by: Option<Vec<String>>,
        #[serde(default = "default_join")]
        join: String,
        #[serde(default = "one")]
        weight: f64,
    },
    /// A UTF-8 file (one document) or a folder (every non-hidden file, recursively, in sorted
    /// path order, one document each).
    Text {
        path: PathBuf,
        #[serde(default = "one")]
        weight: f64,
    },
    /// A `.parquet` file or a folder of them (recursively, sorted; the Hugging Face datasets
    /// layout); one document per row of the string column `text_column` (nulls are skipped).
    Parquet {
        path: PathBuf,
        #[serde(default = "default_text_field")]
        text_column: String,
        #[serde(default = "one")]
        weight: f64,
    },
    /// Pre-tokenized documents: see the crate docs for the `<path>` / `<path>.idx` format.
    Tokens {
        path: PathBuf,
        #[serde(default = "one")]
        weight: f64,
    },
}

impl SourceConfig {
    /// The source one path names on a command line: a `.jsonl` / `.ndjson` / `.json` file (or a
    /// folder holding them, when `text_field` or `group_by` is given) reads as `jsonl` with the
    /// default `join`, anything else as `text` (one document per file). `eval ppl`, `eval niah`
    /// and `needle-ppl` use this, so they read exactly the documents `train` and `search` read.
    pub fn from_path(path: &std::path::Path, text_field: &str, group_by: &[String]) -> SourceConfig {
        let jsonl_ext =
            path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "jsonl" | "ndjson" | "json"));
        let jsonl_dir = path.is_dir() && (!group_by.is_empty() || text_field != default_text_field());
        if jsonl_ext || jsonl_dir {
            SourceConfig::Jsonl {
                path: path.to_path_buf(),
                text_field: text_field.to_string(),
                group_by: (!group_by.is_empty()).then(|| group_by.to_vec()),
                join: default_join(),
                weight: 1.0,
            }
        } else {
            SourceConfig::Text { path: path.to_path_buf(), weight: 1.0 }
        }
    }

    pub fn path(&self) -> &std::path::Path {
        match self {
            SourceConfig::Jsonl { path, .. }
            | SourceConfig::Text { path, .. }
            | SourceConfig::Parquet { path, .. }
            | SourceConfig::Tokens { path, .. } => path,
        }
    }

    pub fn weight(&self) -> f64 {
        match self {
            SourceConfig::Jsonl { weight, .. }
            | SourceConfig::Text { weight, .. }
            | SourceConfig::Parquet { weight, .. }
            | SourceConfig::Tokens { weight, .. } => *weight,
        }
    }

    /// The `type` tag, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            SourceConfig::Jsonl { .. } => "jsonl",
            SourceConfig::Text { .. } => "text",
            SourceConfig::Parquet { .. } => "parquet",
            SourceConfig::Tokens { .. } => "tokens",
        }
    }
}

/// The whole data configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The corpus; at least one source.
    pub sources: Vec<SourceConfig>,
    /// T: tokens per row (every row is exactly this long).
    pub seq_len: usize,
    /// L0: the model's original context length. A row is LONG iff max(position_ids)+1 > l0.
    pub l0: usize,
    /// Fraction of rows that are short rows, in [0, 1]. Default 0.3.
    #[serde(default = "default_short_share")]
    pub short_share: f64,
    /// Seed of every shuffle and of the row-kind schedule. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Fraction of documents held out (by a stable hash of their tokens), in [0, 1). Default 0.
    #[serde(default)]
    pub eval_fraction: f64,
    /// Prepend `bos_id` to every document. Default false.
    #[serde(default)]
    pub add_bos: bool,
    #[serde(default)]
    pub bos_id: Option<u32>,
    /// Append `eos_id` to every document. Default false.
    #[serde(default)]
    pub add_eos: bool,
    #[serde(default)]
    pub eos_id: Option<u32>,
    /// Token id of padding documents (their targets are always -100). Default: `eos_id`, else 0.
    #[serde(default)]
    pub pad_id: Option<u32>,
}

impl DataConfig {
    /// Whether long rows are produced at all.
    pub fn wants_long(&self) -> bool {
        self.short_share < 1.0
    }

    /// Whether short rows are produced at all.
    pub fn wants_short(&self) -> bool {
        self.short_share > 0.0
    }

    pub fn pad_token(&self) -> u32 {
        self.pad_id.or(self.eos_id).unwrap_or(0)
    }

    /// Check everything that can be checked without reading the corpus.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.sources.is_empty() {
            bail!("data config: `sources` is empty; add at least one [[sources]] entry (type = \"jsonl\" | \"text\" | \"parquet\" | \"tokens\")");
        }
        for (i, s) in self.sources.iter().enumerate() {
            let w = s.weight();
            if !(w.is_finite() && w > 0.0) {
                bail!("data config: sources[{i}].weight = {w} must be a finite number > 0; set a positive weight or remove the source");
            }
        }
        if self.l0 == 0 {
            bail!("data config: `l0` = 0; set it to the model's original context length (e.g. 4096)");
        }
        if self.seq_len == 0 {
            bail!("data config: `seq_len` = 0; set it to the training row length T");
        }
        if !(0.0..=1.0).contains(&self.short_share) {
            bail!(
                "data config: `short_share` = {} must be in [0, 1] (fraction of short rows; e.g. 0.3)",
                self.short_share
            );
        }
        if self.wants_long() && self.seq_len <= self.l0 {
            bail!(
                "data config: seq_len = {} <= l0 = {} but short_share = {} < 1 asks for long rows, which need more than l0 tokens; \
                 raise `seq_len` above l0 (e.g. {}) or set `short_share = 1.0`",
                self.seq_len,
                self.l0,
                self.short_share,
                self.l0 * 2
            );
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            bail!("data config: `eval_fraction` = {} must be in [0, 1) (e.g. 0.01)", self.eval_fraction);
        }
        if self.add_bos && self.bos_id.is_none() {
            bail!("data config: `add_bos = true` needs `bos_id` (the tokenizer's BOS token id)");
        }
        if self.add_eos && self.eos_id.is_none() {
            bail!("data config: `add_eos = true` needs `eos_id` (the tokenizer's EOS token id)");
        }
        Ok(())
    }
}
