//! The evolutionary search loop, its fitness cache and its checkpoints.
//!
//! One iteration (docs/numerics.md §3.3; `genetic_base.py::run_genetic_algorithm`):
//! keep the `parents` best of the population (lowest fitness first, ties by age), then add
//! `mutations` mutants of random parents and `crossovers` crossovers of two distinct random
//! parents (a failed crossover becomes a mutant of its first parent), evaluate the newcomers.
//! Every individual ever made is remembered, and no individual is made twice.
//!
//! **Fitness cache.** Fitness is looked up by the individual's grid units before the model is
//! asked; each new value is also appended to `cache.jsonl` at once, so work done after the last
//! checkpoint survives a kill.
//!
//! **Checkpoints.** After the initial population and after every iteration, the whole state
//! (population with fitness, every individual seen, the cache, the RNG state, the iteration) is
//! written to `state.json` atomically (temporary file, fsync, rename, fsync of the folder). A
//! search started again on the same state folder continues from there: it draws the same random
//! numbers, so it makes the same individuals and ends with the same result as a run that was
//! never interrupted. The state records a fingerprint of everything that defines the search
//! (space, hyper-parameters, seed, fitness data); resuming under a different one is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::rng::Rng;
use crate::space::{Genes, Mode, Space};

/// Lower is better. Called with the full long-factor list (`n_pairs` values).
pub trait Fitness {
    fn fitness(&mut self, long_factor: &[f64]) -> Result<f64>;
}

impl<F: FnMut(&[f64]) -> Result<f64>> Fitness for F {
    fn fitness(&mut self, long_factor: &[f64]) -> Result<f64> {
        self(long_factor)
    }
}

/// Hyper-parameters of the evolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaParams {
    pub population: usize,
    pub parents: usize,
    pub mutations: usize,
    pub crossovers: usize,
    pub iterations: usize,
    /// Per-pair mutation probability (also the crossover's per-pair pick probability).
    pub mutation_probability: f64,
    /// Mutation passes before giving up on one mutant.
    pub max_mutation_tries: usize,
    /// Crossover attempts before falling back to a mutant (`max_crossover_try` = 20).
    pub max_crossover_tries: usize,
    pub seed: u64,
}

impl Default for GaParams {
    fn default() -> Self {
        GaParams {
            population: 64,
            parents: 32,
            mutations: 16,
            crossovers: 16,
            iterations: 40,
            mutation_probability: 0.3,
            max_mutation_tries: 1000,
            max_crossover_tries: 20,
            seed: 0,
        }
    }
}

/// How the first population is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InitPopulation {
    /// LongRoPE2: up to 8 NTK-shaped seeds (`Space::longrope2_seeds`), the rest mutants of them.
    LongRope2Seeds,
    /// LongRoPE v1: this individual and mutants of it.
    From(Genes),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub genes: Genes,
    #[serde(with = "exact")]
    pub fitness: f64,
}

/// f64 as its shortest round-trip decimal string: JSON numbers would come back through
/// serde_json's float parser, which may be off by one ulp, and a resumed search must see
/// exactly the fitness values it saved.
mod exact {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{x:?}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

mod exact_vec {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &[f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(x.iter().map(|v| format!("{v:?}")))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Vec::<String>::deserialize(d)?.iter().map(|t| t.parse().map_err(D::Error::custom)).collect()
    }
}

/// Fitness of the first population.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    #[serde(with = "exact")]
    pub best: f64,
    #[serde(with = "exact")]
    pub mean: f64,
    pub size: usize,
}

impl Summary {
    fn of(members: &[Member]) -> Summary {
        let best = members.iter().map(|m| m.fitness).fold(f64::INFINITY, f64::min);
        let mean = members.iter().map(|m| m.fitness).sum::<f64>() / members.len().max(1) as f64;
        Summary { best, mean, size: members.len() }
    }
}

/// Everything a resumed search needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchState {
    /// Canonical JSON of [`Search::fingerprint`].
    pub fingerprint: String,
    /// Completed iterations (0: only the first population is evaluated).
    pub iteration: usize,
    pub population: Vec<Member>,
    /// Every individual ever made, in order.
    pub history: Vec<Genes>,
    /// Fitness cache, sorted by genes.
    pub cache: Vec<Member>,
    pub rng: Rng,
    pub initial: Summary,
    /// Best fitness after the first population and after each iteration.
    #[serde(with = "exact_vec")]
    pub best_trace: Vec<f64>,
    /// Model evaluations made (cache misses), over all sessions.
    pub evaluations: usize,
}

/// The outcome of [`Search::run`].
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult {
    pub best: Member,
    pub long_factor: Vec<f64>,
    /// Iterations completed (== `params.iterations` unless stopped early).
    pub iteration: usize,
    pub finished: bool,
    pub initial: Summary,
    /// Mean fitness of the final parents.
    pub final_parents_mean: f64,
    pub best_trace: Vec<f64>,
    pub evaluations: usize,
    /// Whether this run continued a checkpoint.
    pub resumed_from: Option<usize>,
}

/// Options of one [`Search::run`] call.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop (with a checkpoint) after this many iterations in total, as if killed.
    pub stop_after: Option<usize>,
    pub progress: bool,
}

/// A search over `space`.
pub struct Search {
    pub space: Space,
    pub params: GaParams,
    pub init: InitPopulation,
    /// Folder of `state.json`, `cache.jsonl`, `search.jsonl`; `None`: nothing is written.
    pub state_dir: Option<PathBuf>,
    /// Extra identity of the fitness (data, model, L...), part of the fingerprint.
    pub fitness_id: Value,
}

const STATE: &str = "state.json";
const CACHE_LOG: &str = "cache.jsonl";
const ITER_LOG: &str = "search.jsonl";

pub use longmix_core::fsx::write_atomic;

fn sort_members(members: &mut [Member]) {
    // Stable: equal fitness keeps the older individual first.
    members.sort_by(|a, b| a.fitness.total_cmp(&b.fitness));
}

/// Non-finite fitness (a diverged model) ranks last and stays serialisable.
fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        f64::MAX
    }
}

impl Search {
    /// Everything that decides the search's course; iterations are left out so a finished
    /// search can be extended.
    pub fn fingerprint(&self) -> Value {
        let p = &self.params;
        json!({
            "space": self.space,
            "init": self.init,
            "population": p.population, "parents": p.parents, "mutations": p.mutations,
            "crossovers": p.crossovers, "mutation_probability": p.mutation_probability,
            "max_mutation_tries": p.max_mutation_tries, "max_crossover_tries": p.max_crossover_tries,
            "seed": p.seed,
            "fitness": self.fitness_id,
        })
    }

    /// The fingerprint as canonical JSON text (what the state stores and compares).
    pub fn fingerprint_text(&self) -> String {
        self.fingerprint().to_string()
    }

    pub fn validate(&self) -> Result<()> {
        let p = &self.params;
        if p.population < 1 || p.parents < 1 || p.parents > p.population {
            bail!("parents ({}) must be between 1 and population ({})", p.parents, p.population);
        }
        if p.crossovers > 0 && p.parents < 2 {
            bail!("crossovers need at least 2 parents (parents = {})", p.parents);
        }
        if !(p.mutation_probability > 0.0 && p.mutation_probability <= 1.0) {
            bail!("mutation probability {} must be in (0, 1]", p.mutation_probability);
        }
        if self.space.n_genes() == 0 {
            bail!(
                "nothing to search: the first searched pair {} is not below the pair count {}",
                self.space.first,
                self.space.n_pairs
            );
        }
        if let InitPopulation::From(g) = &self.init {
            self.space.check(g).map_err(|v| anyhow::anyhow!("the initial individual breaks the search space: {v}"))?;
        }
        Ok(())
    }

    fn load_state(&self) -> Result<Option<SearchState>> {
        let Some(dir) = &self.state_dir else { return Ok(None) };
        let path = dir.join(STATE);
        if !path.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let state: SearchState = serde_json::from_str(&text).with_context(|| {
            format!("{} is not a search state; delete it (or the folder) to start afresh", path.display())
        })?;
        let want = self.fingerprint_text();
        if state.fingerprint != want {
            let old: Value = serde_json::from_str(&state.fingerprint).unwrap_or(Value::Null);
            let diff = diff_keys(&old, &self.fingerprint());
            bail!(
                "{} belongs to a different search (differs in: {}); use another state_dir, or run with --restart to discard it",
                path.display(),
                diff.join(", ")
            );
        }
        Ok(Some(state))
    }

    fn save_state(&self, state: &SearchState) -> Result<()> {
        if let Some(dir) = &self.state_dir {
            write_atomic(&dir.join(STATE), serde_json::to_string(state)?.as_bytes())?;
        }
        Ok(())
    }

    /// Remove a previous search's files from the state folder.
    pub fn clear_state(&self) -> Result<()> {
        if let Some(dir) = &self.state_dir {
            for name in [STATE, CACHE_LOG, ITER_LOG] {
                let p = dir.join(name);
                if p.exists() {
                    fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
                }
            }
        }
        Ok(())
    }

    /// Cache entries appended after the last checkpoint (a torn last line is ignored).
    fn read_cache_log(&self) -> Vec<Member> {
        let Some(dir) = &self.state_dir else { return Vec::new() };
        let Ok(f) = File::open(dir.join(CACHE_LOG)) else { return Vec::new() };
        BufReader::new(f)
            .lines()
            .map_while(|l| l.ok())
            .filter_map(|l| serde_json::from_str::<Member>(&l).ok())
            .collect()
    }

    /// Keep only the iteration log lines a checkpoint covers.
    fn trim_iter_log(&self, upto: usize) -> Result<()> {
        let Some(dir) = &self.state_dir else { return Ok(()) };
        let path = dir.join(ITER_LOG);
        let Ok(text) = fs::read_to_string(&path) else { return Ok(()) };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["iteration"].as_u64())
                    .is_some_and(|i| i as usize <= upto)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&path, kept.as_bytes())
    }

    fn log_iteration(&self, line: Value) -> Result<()> {
        if let Some(dir) = &self.state_dir {
            let mut f = OpenOptions::new().create(true).append(true).open(dir.join(ITER_LOG))?;
            writeln!(f, "{line}")?;
        }
        Ok(())
    }

    /// Run (or continue) the search.
    pub fn run(&self, fitness: &mut dyn Fitness, opts: &RunOptions) -> Result<SearchResult> {
        self.validate()?;
        if let Some(dir) = &self.state_dir {
            fs::create_dir_all(dir).with_context(|| format!("cannot create state_dir {}", dir.display()))?;
        }
        let mut run = Run::new(&self.space, fitness, self.progress_bar(opts.progress));
        let loaded = self.load_state()?;
        let resumed_from = loaded.as_ref().map(|s| s.iteration);
        let mut state = match loaded {
            Some(state) => self.resume(state, &mut run.eval)?,
            None => self.first_population(&mut run)?,
        };
        run.eval.open_log(self.state_dir.as_deref(), &self.fingerprint_text())?;
        self.evolve(&mut state, &mut run, opts.stop_after)?;
        run.bar.finish_and_clear();
        Ok(self.result(state, resumed_from))
    }

    fn progress_bar(&self, visible: bool) -> ProgressBar {
        if !visible {
            return ProgressBar::hidden();
        }
        ProgressBar::new(self.params.iterations as u64).with_style(
            ProgressStyle::with_template("search {bar:30} {pos}/{len} iterations  {msg}  eta {eta}").unwrap(),
        )
    }

    /// Continue from a checkpoint: its cache, the values logged after it, and the iteration
    /// log trimmed to it.
    fn resume(&self, state: SearchState, eval: &mut Evaluator<'_>) -> Result<SearchState> {
        eval.cache.extend(state.cache.iter().map(|m| (m.genes.clone(), m.fitness)));
        for m in self.read_cache_log() {
            eval.cache.entry(m.genes).or_insert(m.fitness);
        }
        self.trim_iter_log(state.iteration)?;
        tracing::info!(
            "resuming the search after iteration {} ({} cached fitness values)",
            state.iteration,
            eval.cache.len()
        );
        Ok(state)
    }

    /// Start afresh: make and evaluate the first population, log it and checkpoint it.
    fn first_population(&self, run: &mut Run<'_>) -> Result<SearchState> {
        // A state-less folder may still hold evaluations of a run killed before its
        // first checkpoint: they are reused (same fingerprint: cache.jsonl is only
        // written under a state folder whose search matches, see below).
        self.clear_iter_log_if_no_state()?;
        for m in self.read_cache_log_checked()? {
            run.eval.cache.entry(m.genes).or_insert(m.fitness);
        }
        run.bar.set_message("evaluating the first population");
        run.eval.open_log(self.state_dir.as_deref(), &self.fingerprint_text())?;
        let mut rng = Rng::new(self.params.seed);
        let history = self.first_individuals(&mut rng)?;
        let mut population = Vec::with_capacity(history.len());
        for (i, g) in history.iter().enumerate() {
            run.bar.set_message(format!("first population {}/{}", i + 1, self.params.population));
            let fitness = run.eval.get(g)?;
            population.push(Member { genes: g.clone(), fitness });
        }
        let initial = Summary::of(&population);
        let state = SearchState {
            fingerprint: self.fingerprint_text(),
            iteration: 0,
            population,
            history,
            cache: run.eval.sorted_cache(),
            rng,
            initial,
            best_trace: vec![initial.best],
            evaluations: run.eval.misses,
        };
        // Log first: a kill between the two leaves a line the resumed run trims.
        self.log_iteration(json!({
            "iteration": 0, "best_fitness": initial.best, "mean_fitness": initial.mean,
            "population": state.population.len(), "evaluated": run.eval.misses, "cache_hits": run.eval.hits,
            "best_factors": self.space.factors(&best_of(&state.population).genes),
            "seconds": run.started.elapsed().as_secs_f64(),
        }))?;
        self.save_state(&state)?;
        Ok(state)
    }

    /// The individuals of the first population: the seeds, then mutants of each seed in turn
    /// up to `population`.
    fn first_individuals(&self, rng: &mut Rng) -> Result<Vec<Genes>> {
        let p = &self.params;
        let seeds = match &self.init {
            InitPopulation::LongRope2Seeds => self.space.longrope2_seeds(8.min(p.population)),
            InitPopulation::From(g) => vec![g.clone()],
        };
        if seeds.is_empty() {
            bail!(
                "the search space is empty: {} strictly increasing factors on a grid of {} do not fit in [{}, {}]; raise length_scale or the critical dimension",
                self.space.n_genes(),
                1.0 / self.space.units_per_one as f64,
                self.space.value(self.space.lo),
                self.space.value(self.space.hi)
            );
        }
        let mut seen: HashSet<Genes> = seeds.iter().cloned().collect();
        let mut first = seeds.clone();
        for j in 0..p.population.saturating_sub(seeds.len()) {
            let parent = &seeds[j % seeds.len()];
            match self.space.mutate(parent, p.mutation_probability, rng, &seen, p.max_mutation_tries) {
                Some(g) => {
                    seen.insert(g.clone());
                    first.push(g);
                }
                None => {
                    tracing::warn!(
                        "no new mutant after {} tries; the first population is smaller",
                        p.max_mutation_tries
                    )
                }
            }
        }
        Ok(first)
    }

    /// Iterate until `params.iterations` iterations are done in total (or `stop_after`).
    fn evolve(&self, state: &mut SearchState, run: &mut Run<'_>, stop_after: Option<usize>) -> Result<()> {
        let iterations = self.params.iterations;
        run.bar.set_position(state.iteration.min(iterations) as u64);
        run.best_so_far = state.best_trace.iter().copied().fold(f64::INFINITY, f64::min);
        run.bar.set_message(format!("best {:.4}", run.best_so_far));
        let mut seen: HashSet<Genes> = state.history.iter().cloned().collect();
        let end = stop_after.map_or(iterations, |k| k.min(iterations));
        while state.iteration < end {
            self.iterate(state, &mut seen, run)?;
        }
        Ok(())
    }

    /// One iteration: keep the parents, add mutants and crossovers, evaluate the newcomers,
    /// then log and checkpoint.
    fn iterate(&self, state: &mut SearchState, seen: &mut HashSet<Genes>, run: &mut Run<'_>) -> Result<()> {
        let started = Instant::now();
        let (hits0, misses0) = (run.eval.hits, run.eval.misses);
        let parents = self.fittest(&state.population);
        let mut rng = state.rng.clone();
        let mut brood = Brood { seen, history: state.history.clone(), children: Vec::new() };
        self.add_mutants(&parents, &mut rng, &mut brood);
        self.add_crossovers(&parents, &mut rng, &mut brood);
        let population = run.evaluate_children(parents, brood.children)?;
        let best = best_of(&population).clone();
        run.best_so_far = run.best_so_far.min(best.fitness);
        let parents_mean = Summary::of(&self.fittest(&population)).mean;
        let evaluated = run.eval.misses - misses0;
        state.iteration += 1;
        state.population = population;
        state.history = brood.history;
        state.rng = rng;
        state.cache = run.eval.sorted_cache();
        state.best_trace.push(best.fitness);
        state.evaluations += evaluated;
        self.log_iteration(json!({
            "iteration": state.iteration, "best_fitness": best.fitness, "mean_fitness": parents_mean,
            "population": state.population.len(), "evaluated": evaluated,
            "cache_hits": run.eval.hits - hits0, "best_factors": self.space.factors(&best.genes),
            "seconds": started.elapsed().as_secs_f64(),
        }))?;
        self.save_state(state)?;
        run.bar.set_position(state.iteration as u64);
        run.bar.set_message(format!("best {:.4}", run.best_so_far));
        tracing::info!(
            "iteration {}/{}: best {:.4}, parents' mean {:.4}, {} evaluated",
            state.iteration,
            self.params.iterations,
            best.fitness,
            parents_mean,
            evaluated
        );
        Ok(())
    }

    /// `mutations` mutants of random parents.
    fn add_mutants(&self, parents: &[Member], rng: &mut Rng, brood: &mut Brood<'_>) {
        let p = &self.params;
        for _ in 0..p.mutations {
            let idx = rng.below(parents.len() as u64) as usize;
            match self.space.mutate(&parents[idx].genes, p.mutation_probability, rng, brood.seen, p.max_mutation_tries)
            {
                Some(g) => brood.add(g),
                None => tracing::warn!("no new mutant after {} tries", p.max_mutation_tries),
            }
        }
    }

    /// `crossovers` crossovers of two distinct random parents; a failed crossover becomes a
    /// mutant of its first parent.
    fn add_crossovers(&self, parents: &[Member], rng: &mut Rng, brood: &mut Brood<'_>) {
        let p = &self.params;
        for _ in 0..p.crossovers {
            let a = rng.below(parents.len() as u64) as usize;
            let mut b = rng.below(parents.len() as u64 - 1) as usize;
            if b >= a {
                b += 1;
            }
            let (a, b) = (&parents[a.min(b)].genes, &parents[a.max(b)].genes);
            let child = self
                .space
                .crossover(a, b, p.mutation_probability, rng, brood.seen, p.max_crossover_tries)
                .or_else(|| self.space.mutate(a, p.mutation_probability, rng, brood.seen, p.max_mutation_tries));
            match child {
                Some(g) => brood.add(g),
                None => tracing::warn!("no new crossover or mutant"),
            }
        }
    }

    /// The `parents` fittest of `members` (lowest fitness first, ties by age).
    fn fittest(&self, members: &[Member]) -> Vec<Member> {
        let mut sorted = members.to_vec();
        sort_members(&mut sorted);
        sorted.truncate(self.params.parents);
        sorted
    }

    fn result(&self, state: SearchState, resumed_from: Option<usize>) -> SearchResult {
        let final_parents = self.fittest(&state.population);
        let best = final_parents[0].clone();
        SearchResult {
            long_factor: self.space.factors(&best.genes),
            best,
            iteration: state.iteration,
            finished: state.iteration >= self.params.iterations,
            initial: state.initial,
            final_parents_mean: Summary::of(&final_parents).mean,
            best_trace: state.best_trace,
            evaluations: state.evaluations,
            resumed_from,
        }
    }

    fn clear_iter_log_if_no_state(&self) -> Result<()> {
        if let Some(dir) = &self.state_dir {
            let p = dir.join(ITER_LOG);
            if p.exists() {
                fs::remove_file(&p)?;
            }
        }
        Ok(())
    }

    /// Cache lines of a run killed before its first checkpoint, if it was this search.
    fn read_cache_log_checked(&self) -> Result<Vec<Member>> {
        let Some(dir) = &self.state_dir else { return Ok(Vec::new()) };
        let path = dir.join(CACHE_LOG);
        let Ok(f) = File::open(&path) else { return Ok(Vec::new()) };
        let mut lines = BufReader::new(f).lines().map_while(|l| l.ok());
        let header: Option<Value> = lines.next().and_then(|l| serde_json::from_str(&l).ok());
        if header.as_ref().and_then(|h| h["fingerprint"].as_str()) != Some(self.fingerprint_text().as_str()) {
            fs::remove_file(&path)?;
            return Ok(Vec::new());
        }
        Ok(self.read_cache_log())
    }
}

fn best_of(members: &[Member]) -> &Member {
    let mut best = &members[0];
    for m in members {
        if m.fitness.total_cmp(&best.fitness).is_lt() {
            best = m;
        }
    }
    best
}

/// Top-level keys whose values differ.
fn diff_keys(a: &Value, b: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (ma, mb) = (a.as_object().unwrap_or(&empty), b.as_object().unwrap_or(&empty));
    let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        match (ma.get(k), mb.get(k)) {
            (Some(Value::Object(x)), Some(Value::Object(y))) if x != y => out.extend(
                diff_keys(&Value::Object(x.clone()), &Value::Object(y.clone())).into_iter().map(|s| format!("{k}.{s}")),
            ),
            (x, y) if x != y => out.push(k.clone()),
            _ => {}
        }
    }
    out
}

/// What the phases of one [`Search::run`] call share: the fitness cache, the progress bar,
/// when the call started and the best fitness so far.
struct Run<'a> {
    eval: Evaluator<'a>,
    bar: ProgressBar,
    started: Instant,
    best_so_far: f64,
}

impl<'a> Run<'a> {
    fn new(space: &'a Space, fitness: &'a mut dyn Fitness, bar: ProgressBar) -> Self {
        let eval = Evaluator { space, cache: HashMap::new(), fitness, log: None, hits: 0, misses: 0 };
        Run { eval, bar, started: Instant::now(), best_so_far: f64::INFINITY }
    }

    /// The parents followed by the evaluated children.
    fn evaluate_children(&mut self, parents: Vec<Member>, children: Vec<Genes>) -> Result<Vec<Member>> {
        let mut population = parents;
        let n_children = children.len();
        for (i, g) in children.into_iter().enumerate() {
            self.bar.set_message(format!("best {:.4}  eval {}/{n_children}", self.best_so_far, i + 1));
            let fitness = self.eval.get(&g)?;
            population.push(Member { genes: g, fitness });
        }
        Ok(population)
    }
}

/// The individuals of an iteration in the making: every individual ever made (as a set and in
/// order) and the newcomers.
struct Brood<'s> {
    seen: &'s mut HashSet<Genes>,
    history: Vec<Genes>,
    children: Vec<Genes>,
}

impl Brood<'_> {
    fn add(&mut self, g: Genes) {
        self.seen.insert(g.clone());
        self.history.push(g.clone());
        self.children.push(g);
    }
}

/// Fitness through the cache; new values are appended to `cache.jsonl` at once.
struct Evaluator<'a> {
    space: &'a Space,
    cache: HashMap<Genes, f64>,
    fitness: &'a mut dyn Fitness,
    log: Option<File>,
    hits: usize,
    misses: usize,
}

impl Evaluator<'_> {
    fn open_log(&mut self, dir: Option<&Path>, fingerprint: &str) -> Result<()> {
        if self.log.is_some() {
            return Ok(());
        }
        if let Some(dir) = dir {
            let path = dir.join(CACHE_LOG);
            let fresh = !path.exists();
            let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
            if fresh {
                writeln!(f, "{}", json!({ "fingerprint": fingerprint }))?;
            }
            self.log = Some(f);
        }
        Ok(())
    }

    fn get(&mut self, g: &Genes) -> Result<f64> {
        if let Some(&f) = self.cache.get(g) {
            self.hits += 1;
            return Ok(f);
        }
        let f = finite(self.fitness.fitness(&self.space.factors(g))?);
        self.misses += 1;
        self.cache.insert(g.clone(), f);
        if let Some(log) = &mut self.log {
            writeln!(log, "{}", serde_json::to_string(&Member { genes: g.clone(), fitness: f })?)?;
            log.flush()?;
        }
        Ok(f)
    }

    fn sorted_cache(&self) -> Vec<Member> {
        let m: BTreeMap<&Genes, f64> = self.cache.iter().map(|(g, f)| (g, *f)).collect();
        m.into_iter().map(|(g, f)| Member { genes: g.clone(), fitness: f }).collect()
    }
}

/// Mode of a space, for messages.
pub fn method_name(mode: Mode) -> &'static str {
    match mode {
        Mode::LongRope2 => "LongRoPE2 critical-dimension search (needle-driven PPL)",
        Mode::LongRope => "LongRoPE v1 evolutionary search (needle-driven PPL)",
    }
}
