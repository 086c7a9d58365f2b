//! `search.toml`: what `longmix search` reads. Every section denies unknown keys; every error
//! names the key path and what to change.
//!
//! ```toml
//! [model]
//! path = ".cache/models/smollm2-135m"
//! dtype = "f32"              # f32 | bf16 | f16
//! device = "auto"            # auto | cpu | cuda | cuda:N
//! # threads = 2
//!
//! [rope]
//! target_length = 16384      # L
//! # original_length = 8192   # L0, default: the model's
//! attention_factor = "longrope"   # "longrope" | "none" | a number
//!
//! [needle]
//! sources = [{ type = "jsonl", path = ".cache/pkgs/kjv.jsonl", group_by = ["book"] }]
//! samples = 20               # N
//! documents = 10             # distinct documents (D)
//! seed = 0
//! batch_size = 1
//! add_bos = "auto"           # "auto" (the tokenizer decides) | true | false
//! cache_dir = ".cache/tokens"
//!
//! [search]
//! mode = "longrope2"         # "longrope2" | "longrope"
//! critical_dim = "auto"      # longrope2: "auto" or a pair index
//! population = 64
//! parents = 32
//! mutations = 16
//! crossovers = 16
//! iterations = 40
//! mutation_probability = 0.3
//! step = 0.01
//! # length_scale = 4.0       # upper bound; default 2·s (longrope2), 1 + s (longrope)
//! # init = "yarn"            # longrope only: "pi" | "ntk" | "yarn"
//! seed = 0
//!
//! [output]
//! factors = "runs/search/factors.json"
//! state_dir = "runs/search/state"
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use longmix_data::SourceConfig;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::space::Mode;
use longmix_model::FactorSet;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    pub model: ModelSection,
    pub rope: RopeSection,
    pub needle: NeedleSection,
    #[serde(default)]
    pub search: SearchSection,
    pub output: OutputSection,
}

pub use longmix_core::config::ModelSection;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeSection {
    /// L.
    pub target_length: i64,
    /// L0 (default: the model's original window).
    #[serde(default)]
    pub original_length: Option<i64>,
    #[serde(default)]
    pub attention_factor: AttentionFactor,
}

pub use longmix_model::AttentionFactor;

/// `"auto"` or an integer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum CriticalDim {
    #[default]
    Auto,
    Given(i64),
}

impl Serialize for CriticalDim {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            CriticalDim::Auto => s.serialize_str("auto"),
            CriticalDim::Given(v) => s.serialize_i64(*v),
        }
    }
}

impl<'de> Deserialize<'de> for CriticalDim {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = CriticalDim;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\" or a pair index (an integer)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<CriticalDim, E> {
                if v == "auto" {
                    Ok(CriticalDim::Auto)
                } else {
                    Err(E::custom(format!("{v:?} is not allowed; use \"auto\" or a pair index (an integer)")))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<CriticalDim, E> {
                Ok(CriticalDim::Given(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<CriticalDim, E> {
                Ok(CriticalDim::Given(v as i64))
            }
        }
        d.deserialize_any(V)
    }
}

/// `"auto"`, `true` or `false`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum AddBos {
    #[default]
    Auto,
    Yes,
    No,
}

impl Serialize for AddBos {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            AddBos::Auto => s.serialize_str("auto"),
            AddBos::Yes => s.serialize_bool(true),
            AddBos::No => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for AddBos {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AddBos;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\", true or false")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<AddBos, E> {
                if v == "auto" {
                    Ok(AddBos::Auto)
                } else {
                    Err(E::custom(format!("{v:?} is not allowed; use \"auto\", true or false")))
                }
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<AddBos, E> {
                Ok(if v { AddBos::Yes } else { AddBos::No })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeedleSection {
    /// Long documents (the samples need about target_length tokens each).
    pub sources: Vec<SourceConfig>,
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// N.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// D: distinct documents at most.
    #[serde(default = "default_documents")]
    pub documents: usize,
    #[serde(default)]
    pub seed: u64,
    /// Rows per forward pass.
    #[serde(default = "default_one")]
    pub batch_size: usize,
    #[serde(default)]
    pub add_bos: AddBos,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSection {
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub critical_dim: Option<CriticalDim>,
    #[serde(default = "default_population")]
    pub population: usize,
    #[serde(default = "default_parents")]
    pub parents: usize,
    #[serde(default = "default_16")]
    pub mutations: usize,
    #[serde(default = "default_16")]
    pub crossovers: usize,
    #[serde(default = "default_iterations")]
    pub iterations: usize,
    #[serde(default = "default_p")]
    pub mutation_probability: f64,
    #[serde(default = "default_step")]
    pub step: f64,
    #[serde(default)]
    pub length_scale: Option<f64>,
    #[serde(default)]
    pub init: Option<FactorSet>,
    /// n̂ of LongRoPE v1: rejected with an explanation (see [`SearchConfig::parse`]).
    #[serde(default)]
    pub start_tokens: Option<toml::Value>,
    #[serde(default = "default_mutation_tries")]
    pub max_mutation_tries: usize,
    #[serde(default = "default_crossover_tries")]
    pub max_crossover_tries: usize,
    #[serde(default)]
    pub seed: u64,
}

impl Default for SearchSection {
    fn default() -> Self {
        toml::from_str("").unwrap()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// The factors file (`[rope] factors_file` of a training config reads it).
    pub factors: PathBuf,
    /// Checkpoints and logs of the search; a search started on the same folder resumes.
    pub state_dir: PathBuf,
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from(".cache/tokens")
}
fn default_samples() -> usize {
    20
}
fn default_documents() -> usize {
    10
}
fn default_one() -> usize {
    1
}
fn default_mode() -> Mode {
    Mode::LongRope2
}
fn default_population() -> usize {
    64
}
fn default_parents() -> usize {
    32
}
fn default_16() -> usize {
    16
}
fn default_iterations() -> usize {
    40
}
fn default_p() -> f64 {
    0.3
}
fn default_step() -> f64 {
    0.01
}
fn default_mutation_tries() -> usize {
    1000
}
fn default_crossover_tries() -> usize {
    20
}

/// Grid points per 1.0 for a step that divides 1 (0.01 → 100).
pub fn units_per_one(step: f64) -> Option<i64> {
    if !(step.is_finite() && step > 0.0 && step <= 1.0) {
        return None;
    }
    let n = (1.0 / step).round();
    ((n * step - 1.0).abs() < 1e-9).then_some(n as i64)
}

impl SearchConfig {
    pub fn read(path: &Path) -> Result<SearchConfig> {
        let cfg: SearchConfig = longmix_core::config::read_toml(path, "config")?;
        cfg.validate().with_context(|| format!("invalid config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<SearchConfig> {
        let cfg: SearchConfig = longmix_core::config::from_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that need neither the model nor the data.
    fn validate(&self) -> Result<()> {
        let s = &self.search;
        if s.start_tokens.is_some() {
            bail!(
                "key `search.start_tokens`: n̂ (LongRoPE v1's retained start positions) is not supported: longmix's RoPE, \
                 like the Hugging Face longrope config it exports, has no way to keep the first positions at the original \
                 frequencies, so a searched n̂ could be neither trained nor exported; remove the key (n̂ = 0, as in the \
                 deployed Phi-3/Phi-4 models)"
            );
        }
        if s.population < 2 {
            bail!("key `search.population`: {} must be at least 2", s.population);
        }
        if s.parents < 2 || s.parents > s.population {
            bail!("key `search.parents`: {} must be between 2 and search.population = {}", s.parents, s.population);
        }
        if s.mutations + s.crossovers == 0 {
            bail!("keys `search.mutations` and `search.crossovers` are both 0: nothing new would ever be tried; set either above 0");
        }
        if !(s.mutation_probability > 0.0 && s.mutation_probability <= 1.0) {
            bail!(
                "key `search.mutation_probability`: {} must be in (0, 1] (LongRoPE uses 0.3)",
                s.mutation_probability
            );
        }
        if units_per_one(s.step).is_none() {
            bail!("key `search.step`: {} must divide 1 (e.g. 0.01, 0.05, 0.1)", s.step);
        }
        if s.max_mutation_tries == 0 || s.max_crossover_tries == 0 {
            bail!("keys `search.max_mutation_tries` and `search.max_crossover_tries` must be at least 1");
        }
        if let Some(ls) = s.length_scale {
            if !(ls.is_finite() && ls > 0.0) {
                bail!("key `search.length_scale`: {ls} must be a positive number");
            }
        }
        match s.mode {
            Mode::LongRope2 => {
                if s.init.is_some() {
                    bail!("key `search.init`: only for mode = \"longrope\"; mode \"longrope2\" starts from NTK-shaped individuals — remove the key or set mode = \"longrope\"");
                }
            }
            Mode::LongRope => {
                if let Some(init) = s.init.filter(|i| !matches!(i, FactorSet::Pi | FactorSet::Ntk | FactorSet::Yarn)) {
                    bail!("key `search.init`: {init} is not a LongRoPE v1 start; use \"pi\", \"ntk\" or \"yarn\"");
                }
                if s.critical_dim.is_some() {
                    bail!("key `search.critical_dim`: only for mode = \"longrope2\" (LongRoPE v1 searches every pair) — remove the key or set mode = \"longrope2\"");
                }
            }
        }
        if let Some(CriticalDim::Given(cd)) = s.critical_dim {
            if cd < 1 {
                bail!("key `search.critical_dim`: {cd} must be at least 1 (or \"auto\")");
            }
        }
        let n = &self.needle;
        if n.sources.is_empty() {
            bail!("key `needle.sources`: give at least one source of long documents, e.g. [{{ type = \"jsonl\", path = \"kjv.jsonl\", group_by = [\"book\"] }}]");
        }
        if n.samples == 0 {
            bail!("key `needle.samples`: must be at least 1");
        }
        if n.documents == 0 {
            bail!("key `needle.documents`: must be at least 1");
        }
        if n.batch_size == 0 {
            bail!("key `needle.batch_size`: must be at least 1");
        }
        if let Some(t) = self.model.threads {
            if t < 1 {
                bail!("key `model.threads`: {t} must be at least 1");
            }
        }
        if self.rope.target_length < 2 {
            bail!("key `rope.target_length`: {} is not a context length", self.rope.target_length);
        }
        if let Some(l0) = self.rope.original_length {
            if l0 < 1 || l0 >= self.rope.target_length {
                bail!(
                    "key `rope.original_length`: {l0} must be between 1 and rope.target_length - 1 = {}",
                    self.rope.target_length - 1
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
path = "m"
[rope]
target_length = 16384
[needle]
sources = [{ type = "jsonl", path = "kjv.jsonl", group_by = ["book"] }]
[output]
factors = "f.json"
state_dir = "st"
"#;

    fn err(text: &str) -> String {
        format!("{:#}", SearchConfig::parse(text).unwrap_err())
    }

    #[test]
    fn defaults_are_the_papers() {
        let c = SearchConfig::parse(MINIMAL).unwrap();
        let s = &c.search;
        assert_eq!((s.population, s.parents, s.mutations, s.crossovers, s.iterations), (64, 32, 16, 16, 40));
        assert_eq!((s.mutation_probability, s.step, s.mode), (0.3, 0.01, Mode::LongRope2));
        assert_eq!(c.rope.attention_factor, AttentionFactor::Longrope);
        assert_eq!(c.needle.add_bos, AddBos::Auto);
        assert_eq!(units_per_one(0.01), Some(100));
        assert_eq!(units_per_one(0.3), None);
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let with =
            |section: &str, line: &str| MINIMAL.replace(&format!("[{section}]\n"), &format!("[{section}]\n{line}\n"));
        let search = |line: &str| format!("{MINIMAL}[search]\n{line}\n");
        let cases: Vec<(String, &[&str])> = vec![
            (search("mode = \"longrope3\""), &["search.mode", "longrope3", "longrope2"]),
            (search("popluation = 3"), &["search", "popluation"]),
            (search("parents = 100"), &["search.parents", "between 2 and"]),
            (search("step = 0.3"), &["search.step", "divide 1"]),
            (search("mutation_probability = 1.5"), &["search.mutation_probability", "(0, 1]"]),
            (search("critical_dim = \"max\""), &["search.critical_dim", "\"auto\""]),
            (search("critical_dim = 0"), &["search.critical_dim", "at least 1"]),
            (search("mode = \"longrope\"\ncritical_dim = 5"), &["search.critical_dim", "only for mode"]),
            (search("init = \"ntk\""), &["search.init", "only for mode = \"longrope\""]),
            (search("mode = \"longrope\"\ninit = \"longrope2\""), &["search.init", "longrope2", "yarn"]),
            (search("mode = \"longrope\"\ninit = \"ntk-by-parts\""), &["search.init", "ntk-by-parts", "yarn"]),
            (search("start_tokens = 4"), &["search.start_tokens", "not supported", "remove the key"]),
            (search("mutations = 0\ncrossovers = 0"), &["search.mutations", "set either above 0"]),
            (
                with("rope", "attention_factor = \"su\""),
                &["rope.attention_factor", "\"longrope\", \"native\", \"none\""],
            ),
            (with("rope", "original_length = 20000"), &["rope.original_length", "target_length"]),
            (with("needle", "samples = 0"), &["needle.samples", "at least 1"]),
            (with("needle", "add_bos = \"yes\""), &["needle.add_bos", "\"auto\", true or false"]),
            (MINIMAL.replace("target_length = 16384", "target_length = \"long\""), &["rope.target_length", "long"]),
            (MINIMAL.replace("[output]\nfactors = \"f.json\"\n", "[output]\n"), &["output", "factors"]),
        ];
        for (text, needles) in cases {
            let e = err(&text);
            for n in needles {
                assert!(e.contains(n), "error for\n{text}\nlacks {n:?}: {e}");
            }
        }
    }
}
