//! The search's operators and loop, with synthetic fitness functions (no model).

use std::cell::Cell;
use std::collections::HashSet;
use std::path::Path;

use anyhow::Result;
use longmix_model::FactorSet;
use longmix_search::ga::{GaParams, InitPopulation, RunOptions, Search, SearchState};
use longmix_search::{Genes, Mode, Rng, Space};
use serde_json::json;

/// Phi-3-like (48 pairs, cd 31, 32x, [32, 64]), SmolLM2 2x (32 pairs, cd 19), the tiny test
/// model (8 pairs, cd 2), and a tight space where strictness bites.
fn lr2_spaces() -> Vec<Space> {
    vec![
        Space::longrope2(48, 31, 32.0, 64.0, 100),
        Space::longrope2(32, 19, 2.0, 4.0, 100),
        Space::longrope2(8, 2, 2.0, 4.0, 100),
        Space::longrope2(8, 2, 2.0, 2.1, 100),
    ]
}

fn v1_spaces() -> Vec<(Space, i64, f64)> {
    // (space, d_rot, theta) with L0 4096 -> L 16384 (s = 4) and the tiny 64 -> 128.
    vec![(Space::longrope(48, 5.0, 100), 96, 1e4), (Space::longrope(8, 3.0, 100), 16, 1e4)]
}

/// Every constraint, checked on the full factor list independently of `Space::check`.
fn assert_lr2_individual(space: &Space, g: &Genes) {
    space.check(g).unwrap_or_else(|v| panic!("{v}: {g:?}"));
    let f = space.factors(g);
    assert_eq!(f.len(), space.n_pairs);
    assert_eq!(g.len(), space.n_pairs - space.first);
    let cd = space.first;
    let lcd = f[cd];
    let (lo, hi) = (space.value(space.lo), space.value(space.hi));
    for (i, &x) in f.iter().enumerate() {
        if i < cd {
            let ntk = lcd.powf(i as f64 / cd as f64);
            assert!((x - ntk).abs() < 1e-12, "pair {i} below cd must be λ_cd^(i/cd) = {ntk}, got {x}");
        } else {
            assert!(x >= lo - 1e-12 && x <= hi + 1e-12, "pair {i} = {x} outside [{lo}, {hi}]");
            let units = x * space.units_per_one as f64;
            assert!((units - units.round()).abs() < 1e-6, "pair {i} = {x} is off the grid");
        }
        if i > 0 {
            assert!(x > f[i - 1], "not strictly increasing at pair {i}: {} then {x}", f[i - 1]);
        }
    }
    assert!(f[0] == 1.0, "λ_0 = λ_cd^0 = 1");
    let n = f.len();
    assert!(f[n - 1] <= f[n - 2] + 4.0 + 1e-9, "last pair beyond λ_(n-2) + 4");
}

fn assert_v1_individual(space: &Space, g: &Genes) {
    space.check(g).unwrap_or_else(|v| panic!("{v}: {g:?}"));
    let f = space.factors(g);
    assert_eq!(f.len(), space.n_pairs);
    for (i, &x) in f.iter().enumerate() {
        assert!(x >= 1.0 - 1e-12 && x <= space.value(space.hi) + 1e-12, "pair {i} = {x} out of range");
        let units = x * space.units_per_one as f64;
        assert!((units - units.round()).abs() < 1e-6, "pair {i} = {x} is off the grid");
        if i > 0 {
            assert!(x >= f[i - 1], "not non-decreasing at pair {i}");
        }
    }
}

#[test]
fn check_rejects_what_it_must() {
    let s = Space::longrope2(8, 2, 2.0, 4.0, 100);
    assert!(s.check(&[200, 210, 220, 230, 240, 250]).is_ok());
    assert!(s.check(&[200, 210, 220, 230, 240]).is_err(), "length");
    assert!(s.check(&[199, 210, 220, 230, 240, 250]).is_err(), "below s");
    assert!(s.check(&[200, 210, 220, 230, 240, 401]).is_err(), "above length_scale");
    assert!(s.check(&[200, 210, 210, 230, 240, 250]).is_err(), "strictness");
    assert!(s.check(&[200, 205, 210, 215, 220, 221]).is_ok());
    let wide = Space::longrope2(4, 1, 2.0, 10.0, 100);
    assert!(wide.check(&[200, 300, 701]).is_err(), "last pair beyond λ_(n-2) + 4");
    assert!(wide.check(&[200, 300, 700]).is_ok());
    let v1 = Space::longrope(4, 3.0, 100);
    assert!(v1.check(&[100, 150, 150, 300]).is_ok(), "v1 allows ties");
    assert!(v1.check(&[100, 150, 140, 300]).is_err());
    assert!(v1.check(&[99, 150, 150, 300]).is_err());
    assert!(v1.check(&[100, 150, 150, 301]).is_err());
}

#[test]
fn every_longrope2_individual_respects_the_space() {
    for space in lr2_spaces() {
        let seeds = space.longrope2_seeds(8);
        assert!(!seeds.is_empty());
        for g in &seeds {
            assert_lr2_individual(&space, g);
        }
        if space.hi - space.lo >= 700 {
            // Wide enough: all 8 seeds, λ_cd = s + k(ls - s)/10, spaced by 0.1.
            assert_eq!(seeds.len(), 8);
            for (k, g) in seeds.iter().enumerate() {
                let want = space.value(space.lo) + k as f64 * space.value(space.hi - space.lo) / 10.0;
                assert!((space.value(g[0]) - want).abs() < 0.006, "seed {k}: {} vs {want}", space.value(g[0]));
                assert!(g.windows(2).all(|w| w[1] - w[0] == 10), "seed {k} spacing 0.1");
            }
        }
        let mut rng = Rng::new(11);
        let mut seen: HashSet<Genes> = seeds.iter().cloned().collect();
        let mut pool = seeds.clone();
        let (mut mutants, mut children) = (0, 0);
        for round in 0..1500 {
            let a = &pool[rng.below(pool.len() as u64) as usize].clone();
            if round % 2 == 0 {
                if let Some(g) = space.mutate(a, 0.3, &mut rng, &seen, 1000) {
                    assert_lr2_individual(&space, &g);
                    assert!(!seen.contains(&g));
                    assert_ne!(&g, a);
                    seen.insert(g.clone());
                    pool.push(g);
                    mutants += 1;
                }
            } else {
                let b = &pool[rng.below(pool.len() as u64) as usize].clone();
                if let Some(g) = space.crossover(a, b, 0.3, &mut rng, &seen, 20) {
                    assert_lr2_individual(&space, &g);
                    assert!(!seen.contains(&g));
                    // Every gene comes from one of the parents.
                    assert!(g.iter().zip(a.iter().zip(b)).all(|(x, (p, q))| x == p || x == q));
                    seen.insert(g.clone());
                    pool.push(g);
                    children += 1;
                }
            }
        }
        if space.hi - space.lo < 50 {
            // A tight space: strictly increasing picks of n_genes grid points out of hi - lo + 1.
            let (n, k) = ((space.hi - space.lo + 1) as u64, space.n_genes() as u64);
            let capacity = (0..k).fold(1u64, |acc, i| acc * (n - i) / (i + 1));
            assert!(seen.len() as u64 <= capacity);
            assert!(seen.len() as u64 >= capacity * 9 / 10, "{} of {capacity} individuals reached", seen.len());
        } else {
            assert!(mutants > 500, "{mutants} mutants in {:?}", space);
            assert!(children > 50, "{children} crossovers in {:?}", space);
        }
    }
}

#[test]
fn every_longrope_v1_individual_respects_the_space() {
    for (space, d_rot, theta) in v1_spaces() {
        let l0 = 4096;
        let s = space.value(space.hi) - 1.0;
        let l = (l0 as f64 * s) as i64;
        let mut pool: Vec<Genes> = Vec::new();
        for init in [FactorSet::Pi, FactorSet::Ntk, FactorSet::Yarn] {
            let g = space.from_factors(&init.factors(theta, d_rot, l0, l));
            assert_v1_individual(&space, &g);
            pool.push(g);
        }
        let mut rng = Rng::new(5);
        let mut seen: HashSet<Genes> = pool.iter().cloned().collect();
        let mut made = 0;
        for round in 0..1500 {
            let a = pool[rng.below(pool.len() as u64) as usize].clone();
            let g = if round % 2 == 0 {
                space.mutate(&a, 0.3, &mut rng, &seen, 1000)
            } else {
                let b = pool[rng.below(pool.len() as u64) as usize].clone();
                space.crossover(&a, &b, 0.3, &mut rng, &seen, 20)
            };
            if let Some(g) = g {
                assert_v1_individual(&space, &g);
                assert!(seen.insert(g.clone()));
                pool.push(g);
                made += 1;
            }
        }
        assert!(made > 700, "{made}");
    }
}

/// Squared distance to a fixed target inside the space, counting calls.
fn target_fitness<'a>(space: &Space, calls: &'a Cell<usize>) -> impl FnMut(&[f64]) -> Result<f64> + 'a {
    let target: Vec<f64> =
        (0..space.n_pairs).map(|i| if i < space.first { 0.0 } else { 2.3 + 0.2 * (i - space.first) as f64 }).collect();
    let first = space.first;
    move |f: &[f64]| {
        calls.set(calls.get() + 1);
        Ok(f[first..].iter().zip(&target[first..]).map(|(x, t)| (x - t) * (x - t)).sum::<f64>())
    }
}

fn small_search(state_dir: Option<&Path>, seed: u64, iterations: usize) -> Search {
    Search {
        space: Space::longrope2(8, 2, 2.0, 4.0, 100),
        params: GaParams {
            population: 12,
            parents: 6,
            mutations: 4,
            crossovers: 4,
            iterations,
            seed,
            ..GaParams::default()
        },
        init: InitPopulation::LongRope2Seeds,
        state_dir: state_dir.map(Path::to_path_buf),
        fitness_id: json!({ "test": "target" }),
    }
}

#[test]
fn the_search_optimises_and_evaluates_each_individual_once() {
    let search = small_search(None, 1, 30);
    let calls = Cell::new(0);
    let mut f = target_fitness(&search.space, &calls);
    let r = search.run(&mut f, &RunOptions::default()).unwrap();
    assert!(r.finished && r.iteration == 30);
    assert!(r.best.fitness < 0.25 * r.initial.best, "best {} vs initial best {}", r.best.fitness, r.initial.best);
    assert!(r.final_parents_mean < r.initial.mean);
    assert!(r.best_trace.windows(2).all(|w| w[1] <= w[0]), "elitism: the best never gets worse {:?}", r.best_trace);
    assert_eq!(r.evaluations, calls.get(), "each new individual is evaluated exactly once");
    assert_eq!(calls.get(), 12 + 30 * 8, "no individual is made twice, so none is a cache hit");
    assert_lr2_individual(&search.space, &r.best.genes);
}

#[test]
fn a_seed_fixes_the_search() {
    let run = |seed| {
        let search = small_search(None, seed, 8);
        let calls = Cell::new(0);
        let mut f = target_fitness(&search.space, &calls);
        search.run(&mut f, &RunOptions::default()).unwrap()
    };
    let (a, b, c) = (run(3), run(3), run(4));
    assert_eq!(a, b);
    assert_ne!(a.best_trace, c.best_trace);
}

fn read_state(dir: &Path) -> SearchState {
    serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap()
}

#[test]
fn a_stopped_search_resumes_to_the_same_result() {
    let full_dir = tempfile::tempdir().unwrap();
    let full = small_search(Some(full_dir.path()), 9, 10);
    let calls = Cell::new(0);
    let reference = full.run(&mut target_fitness(&full.space, &calls), &RunOptions::default()).unwrap();

    let split_dir = tempfile::tempdir().unwrap();
    let first = small_search(Some(split_dir.path()), 9, 10);
    let calls_a = Cell::new(0);
    let partial = first
        .run(&mut target_fitness(&first.space, &calls_a), &RunOptions { stop_after: Some(4), progress: false })
        .unwrap();
    assert!(!partial.finished && partial.iteration == 4);
    assert_eq!(read_state(split_dir.path()).iteration, 4);

    // A new process: a fresh Search value over the same folder.
    let second = small_search(Some(split_dir.path()), 9, 10);
    let calls_b = Cell::new(0);
    let resumed = second.run(&mut target_fitness(&second.space, &calls_b), &RunOptions::default()).unwrap();
    assert_eq!(resumed.resumed_from, Some(4));
    assert_eq!(resumed.best, reference.best);
    assert_eq!(resumed.long_factor, reference.long_factor);
    assert_eq!(resumed.best_trace, reference.best_trace);
    assert_eq!(calls_a.get() + calls_b.get(), calls.get(), "no work is redone");
    let (s1, s2) = (read_state(full_dir.path()), read_state(split_dir.path()));
    assert_eq!(s1, s2, "the final states are identical");
    let log: Vec<serde_json::Value> = std::fs::read_to_string(split_dir.path().join("search.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.iter().map(|v| v["iteration"].as_u64().unwrap()).collect::<Vec<_>>(), (0..=10).collect::<Vec<_>>());
}

#[test]
fn a_search_killed_mid_iteration_resumes_from_its_cache() {
    let full = small_search(None, 21, 6);
    let calls = Cell::new(0);
    let reference = full.run(&mut target_fitness(&full.space, &calls), &RunOptions::default()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let killed = small_search(Some(dir.path()), 21, 6);
    let count = Cell::new(0);
    let mut inner = target_fitness(&killed.space, &count);
    // Dies in the middle of iteration 3 (12 + 2·8 evaluations done, 3 more into the third).
    let mut dying = |f: &[f64]| {
        if count.get() == 12 + 2 * 8 + 3 {
            anyhow::bail!("killed");
        }
        inner(f)
    };
    assert!(killed.run(&mut dying, &RunOptions::default()).is_err());
    assert_eq!(read_state(dir.path()).iteration, 2);

    let again = small_search(Some(dir.path()), 21, 6);
    let calls_b = Cell::new(0);
    let resumed = again.run(&mut target_fitness(&again.space, &calls_b), &RunOptions::default()).unwrap();
    assert_eq!(resumed.best, reference.best);
    assert_eq!(resumed.best_trace, reference.best_trace);
    assert_eq!(
        calls_b.get(),
        calls.get() - (12 + 2 * 8 + 3),
        "the 3 evaluations after the checkpoint came from cache.jsonl"
    );
}

#[test]
fn a_different_search_refuses_the_state_folder() {
    let dir = tempfile::tempdir().unwrap();
    let a = small_search(Some(dir.path()), 1, 1);
    let calls = Cell::new(0);
    a.run(&mut target_fitness(&a.space, &calls), &RunOptions::default()).unwrap();
    let mut b = small_search(Some(dir.path()), 1, 2);
    b.params.population = 14;
    let e = format!("{:#}", b.run(&mut target_fitness(&b.space, &calls), &RunOptions::default()).unwrap_err());
    assert!(e.contains("different search") && e.contains("population") && e.contains("--restart"), "{e}");
    // More iterations on the same search is fine: it extends it.
    let c = small_search(Some(dir.path()), 1, 3);
    let r = c.run(&mut target_fitness(&c.space, &calls), &RunOptions::default()).unwrap();
    assert_eq!((r.resumed_from, r.iteration), (Some(1), 3));
    // And a v1 search rejects an initial individual outside its space.
    let bad = Search {
        space: Space::longrope(4, 3.0, 100),
        params: GaParams::default(),
        init: InitPopulation::From(vec![100, 90, 150, 200]),
        state_dir: None,
        fitness_id: json!(null),
    };
    assert_eq!(bad.space.mode, Mode::LongRope);
    let e = format!("{:#}", bad.run(&mut target_fitness(&bad.space, &calls), &RunOptions::default()).unwrap_err());
    assert!(e.contains("initial individual"), "{e}");
}
