//! `longmix search` as a library call: config → model, needle samples, search space → the
//! evolutionary search with needle-driven PPL as fitness → a factors file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use longmix_data::{Corpus, TokenizerInfo};
use longmix_model::extension::window_lengths;
use longmix_model::{
    critical_dim, load_model, Extension, ExtensionSpec, FactorSet, FactorsFile, LoadedModel, LongFactors, RopeConfig,
};
use serde_json::json;
use tch::{Device, Kind};

use crate::config::{units_per_one, AddBos, CriticalDim, SearchConfig, SearchSection};
use crate::ga::{method_name, GaParams, InitPopulation, RunOptions, Search, SearchResult};
use crate::needle::{build_samples, needle_ppl, pick_documents, tokenizer_bos, NeedleOptions, NeedleSample, T1};
use crate::space::{Mode, Space};

/// Where the needle documents and samples come from.
#[derive(Debug, Clone)]
pub struct NeedleData<'a> {
    pub sources: &'a [longmix_data::SourceConfig],
    pub cache_dir: &'a Path,
    pub samples: usize,
    pub documents: usize,
    pub seed: u64,
    pub add_bos: AddBos,
}

/// Build the needle samples of length `length` for the model in `model_dir`.
pub fn needle_samples(
    model_dir: &Path,
    bos_token_id: Option<i64>,
    length: usize,
    data: &NeedleData,
) -> Result<Vec<NeedleSample>> {
    let tok_path = model_dir.join("tokenizer.json");
    let tok = TokenizerInfo::load(&tok_path)?;
    let bos = match data.add_bos {
        AddBos::Auto => tokenizer_bos(&tok.tokenizer)?,
        AddBos::No => None,
        AddBos::Yes => match bos_token_id.map(|b| b as u32).or(tokenizer_bos(&tok.tokenizer)?) {
            Some(b) => Some(b),
            None => bail!("key `needle.add_bos`: true, but neither config.json nor the tokenizer names a BOS token; set it to false or \"auto\""),
        },
    };
    let corpus = Corpus::open(data.sources, &tok, data.cache_dir)?;
    let prefix =
        bos.is_some() as usize + tok.tokenizer.encode(T1, false).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().len();
    let docs = pick_documents(&corpus, length.saturating_sub(prefix), length, data.documents, data.seed)?;
    let opts = NeedleOptions { length, samples: data.samples, documents: data.documents, seed: data.seed, bos };
    build_samples(&tok.tokenizer, &docs, &opts)
}

/// FNV-1a over the samples' tokens: the fitness data's identity.
pub fn samples_hash(samples: &[NeedleSample]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for s in samples {
        for &t in s.input_ids.iter().chain(s.targets.iter()) {
            for b in t.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
    }
    format!("{h:016x}")
}

/// What a finished (or stopped) search produced.
pub struct SearchOutcome {
    pub result: SearchResult,
    /// Written to `output.factors` when the search finished.
    pub factors: FactorsFile,
    pub output: Option<PathBuf>,
    pub critical_dim: Option<usize>,
    pub space: Space,
    pub attention_factor: f64,
    pub samples: usize,
}

/// Run `cfg` on `device` in `kind`; `restart` discards the state folder first.
pub fn run_search(
    cfg: &SearchConfig,
    device: Device,
    kind: Kind,
    opts: &RunOptions,
    restart: bool,
) -> Result<SearchOutcome> {
    if let Some(t) = cfg.model.threads {
        tch::set_num_threads(t);
    }
    let mut lm: LoadedModel = load_model(&cfg.model.path, kind, device)?;
    let plan = SearchPlan::new(cfg, &lm.model.config.rope)?;
    let bos_token_id = lm.model.config.bos_token_id;
    let samples = needle_samples(&cfg.model.path, bos_token_id, plan.windows.target as usize, &needle_data(cfg))?;
    let model_path = std::fs::canonicalize(&cfg.model.path).unwrap_or_else(|_| cfg.model.path.clone());
    let search = plan.search(cfg, &samples, &model_path);
    if restart {
        search.clear_state()?;
    }
    let batch = cfg.needle.batch_size;
    let mut fitness = |long: &[f64]| -> Result<f64> {
        plan.extension.with_long(long).apply(&mut lm.model.config);
        Ok(needle_ppl(&lm.model, &samples, batch)?.ppl)
    };
    let result = search.run(&mut fitness, opts).context("search failed")?;
    let factors = plan.factors_file(cfg, &result, samples.len(), &model_path);
    let output = if result.finished { Some(write_factors(&factors, &cfg.output.factors)?) } else { None };
    Ok(SearchOutcome {
        result,
        factors,
        output,
        critical_dim: plan.critical_dim,
        space: plan.space,
        attention_factor: plan.extension.attention_factor,
        samples: samples.len(),
    })
}

/// The window lengths of the extension searched.
struct Windows {
    /// L.
    target: i64,
    /// L0.
    original: i64,
    /// s = L / L0.
    scale: f64,
}

/// What a search config asks for on a model: the extension every candidate shares but for its
/// long factors, the space of those factors and where the search starts in it.
struct SearchPlan {
    windows: Windows,
    extension: Extension,
    space: Space,
    init: InitPopulation,
    critical_dim: Option<usize>,
}

impl SearchPlan {
    fn new(cfg: &SearchConfig, base: &RopeConfig) -> Result<Self> {
        let (l, l0) = window_lengths(cfg.rope.target_length, cfg.rope.original_length, base)
            .map_err(|e| anyhow::anyhow!("key `rope.target_length`: {e}"))?;
        // The candidates share everything but their long factors with this extension.
        let spec = ExtensionSpec {
            target_length: Some(l),
            original_length: Some(l0),
            long: LongFactors::Set(FactorSet::Longrope2),
            short: None,
            attention: cfg.rope.attention_factor,
        };
        let extension = Extension::resolve(&spec, base).context("key `rope`")?;
        let windows = Windows { target: l, original: l0, scale: extension.scale() };
        let (space, init, critical_dim) = match cfg.search.mode {
            Mode::LongRope2 => longrope2_space(&cfg.search, base, &windows)?,
            Mode::LongRope => longrope_space(&cfg.search, base, &windows)?,
        };
        Ok(SearchPlan { windows, extension, space, init, critical_dim })
    }

    /// The evolutionary search, its state in `output.state_dir`; the fitness data (model,
    /// windows, samples) is part of its identity.
    fn search(&self, cfg: &SearchConfig, samples: &[NeedleSample], model_path: &Path) -> Search {
        let Windows { target: l, original: l0, .. } = self.windows;
        Search {
            space: self.space.clone(),
            params: ga_params(&cfg.search),
            init: self.init.clone(),
            state_dir: Some(cfg.output.state_dir.clone()),
            fitness_id: json!({
                "model": model_path, "dtype": cfg.model.dtype, "target_length": l, "original_length": l0,
                "attention_factor": self.extension.attention_factor, "samples": samples.len(),
                "samples_hash": samples_hash(samples),
            }),
        }
    }

    /// The extension with the best long factors found, and how they were found in its notes.
    fn factors_file(
        &self,
        cfg: &SearchConfig,
        result: &SearchResult,
        n_samples: usize,
        model_path: &Path,
    ) -> FactorsFile {
        let sc = &cfg.search;
        self.extension.with_long(&result.long_factor).factors_file(json!({
            "method": sc.mode.name(),
            "description": method_name(sc.mode),
            "fitness": result.best.fitness,
            "fitness_metric": "needle-driven perplexity: exp(mean NLL over the answer tokens)",
            "iteration": result.iteration,
            "critical_dim": self.critical_dim,
            "initial_best_fitness": result.initial.best,
            "initial_mean_fitness": result.initial.mean,
            "evaluations": result.evaluations,
            "attention_factor": self.extension.attention_factor,
            "length_scale": self.space.value(self.space.hi),
            "step": sc.step,
            "needle_samples": n_samples,
            "needle_seed": cfg.needle.seed,
            "search_seed": sc.seed,
            "model": model_path,
        }))
    }
}

/// LongRoPE2: factors above the critical dimension, from the NTK-shaped seeds.
fn longrope2_space(
    sc: &SearchSection,
    base: &RopeConfig,
    w: &Windows,
) -> Result<(Space, InitPopulation, Option<usize>)> {
    let (n, s) = (base.n_pairs() as usize, w.scale);
    let upo = units_per_one(sc.step).unwrap();
    let cd = match sc.critical_dim.unwrap_or_default() {
        CriticalDim::Auto => critical_dim(base.theta, base.d_rot, w.original),
        CriticalDim::Given(cd) => cd,
    };
    if cd < 1 || cd as usize >= n {
        bail!("key `search.critical_dim`: {cd} must be between 1 and d_rot/2 - 1 = {} for this model", n - 1);
    }
    let ls = sc.length_scale.unwrap_or(2.0 * s);
    if ls <= s {
        bail!("key `search.length_scale`: {ls} must exceed s = L/L0 = {s} (LongRoPE2 uses 2·s = {})", 2.0 * s);
    }
    Ok((Space::longrope2(n, cd as usize, s, ls, upo), InitPopulation::LongRope2Seeds, Some(cd as usize)))
}

/// LongRoPE v1: every pair's factor, from the factors of `search.init` (YaRN by default).
fn longrope_space(
    sc: &SearchSection,
    base: &RopeConfig,
    w: &Windows,
) -> Result<(Space, InitPopulation, Option<usize>)> {
    let (n, s) = (base.n_pairs() as usize, w.scale);
    let upo = units_per_one(sc.step).unwrap();
    let ls = sc.length_scale.unwrap_or(1.0 + s);
    if ls < s {
        bail!("key `search.length_scale`: {ls} must be at least s = L/L0 = {s} (LongRoPE v1 uses 1 + s = {})", 1.0 + s);
    }
    let space = Space::longrope(n, ls, upo);
    let factors = sc.init.unwrap_or(FactorSet::Yarn).factors(base.theta, base.d_rot, w.original, w.target);
    let start = space.from_factors(&factors);
    Ok((space, InitPopulation::From(start), None))
}

fn ga_params(sc: &SearchSection) -> GaParams {
    GaParams {
        population: sc.population,
        parents: sc.parents,
        mutations: sc.mutations,
        crossovers: sc.crossovers,
        iterations: sc.iterations,
        mutation_probability: sc.mutation_probability,
        max_mutation_tries: sc.max_mutation_tries,
        max_crossover_tries: sc.max_crossover_tries,
        seed: sc.seed,
    }
}

fn needle_data(cfg: &SearchConfig) -> NeedleData<'_> {
    NeedleData {
        sources: &cfg.needle.sources,
        cache_dir: &cfg.needle.cache_dir,
        samples: cfg.needle.samples,
        documents: cfg.needle.documents,
        seed: cfg.needle.seed,
        add_bos: cfg.needle.add_bos,
    }
}

/// Write the factors file, creating its folder; returns its path.
fn write_factors(factors: &FactorsFile, path: &Path) -> Result<PathBuf> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    factors.write(path)?;
    Ok(path.to_path_buf())
}
