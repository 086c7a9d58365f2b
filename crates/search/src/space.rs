//! The search space, its individuals, and the operators that make new ones
//! (docs/numerics.md §3.3, §3.4).
//!
//! An individual is its **searched** factors as integers on the grid (`value = units · step`),
//! so constraints and the "already seen" test are exact, and the fitness cache can key on it.
//!
//! * **LongRoPE2** (`Mode::LongRope2`): pairs `cd..n` are searched, each in
//!   `[s, length_scale]`, strictly increasing; the last pair also stays within
//!   `λ_{n-2} + 4`. Pairs `i < cd` are not searched: `λ_i = λ_cd^(i/cd)` (NTK from λ_cd), derived
//!   when the full factor list is built, so every individual has that shape by construction.
//! * **LongRoPE v1** (`Mode::LongRope`): every pair is searched, in `[1, length_scale]`
//!   (default `1 + s`, as `dim_mono`'s `evo_list`), monotone non-decreasing.
//!
//! Mutation (`dim_mono`): each searched pair is picked with probability p; its new value is
//! drawn uniformly from the grid points between its neighbours (`[lo, λ_{i+1}]` for the first
//! searched pair, `[λ_{i-1}, min(hi, λ_{i-1}+4)]` for the LongRoPE2 last pair, `[λ_{i-1}, hi]`
//! for the v1 last pair). Passes repeat on the running copy until the result obeys the
//! constraints and was never seen, at most `max_tries` passes.
//!
//! Crossover: a copy of parent 1 where each searched pair takes parent 2's value with
//! probability `p · 0.5`; retried (from parent 1 afresh) until valid, new and different from
//! parent 1, at most `max_tries` times.
//!
//! One deliberate difference from the released LongRoPE2 `dim_mono.py`: there the first
//! searched pair's range starts at its *derived* left neighbour `λ_{cd-1}` clamped to `s`, which
//! stops λ_cd from ever moving down once `λ_cd^((cd-1)/cd) > s`; here it starts at `s`.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Which search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// LongRoPE2: NTK below the critical dimension, searched (strictly increasing) from it on.
    #[serde(rename = "longrope2")]
    LongRope2,
    /// LongRoPE v1: every pair searched, monotone non-decreasing.
    #[serde(rename = "longrope")]
    LongRope,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::LongRope2 => "longrope2",
            Mode::LongRope => "longrope",
        }
    }
}

/// Searched factors in grid units (`value = units / units_per_one`).
pub type Genes = Vec<i64>;

/// The search space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Space {
    pub mode: Mode,
    /// Factor list length, d_rot/2.
    pub n_pairs: usize,
    /// First searched pair (the critical dimension for LongRoPE2, 0 for v1).
    pub first: usize,
    /// Grid points per 1.0 (100 for step 0.01).
    pub units_per_one: i64,
    /// Lowest and highest value of a searched pair, in units.
    pub lo: i64,
    pub hi: i64,
    /// LongRoPE2: the last pair stays within `λ_{n-2} + last_span` (4.0 in units).
    pub last_span: Option<i64>,
}

/// Why an individual breaks the space.
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    Length { got: usize, want: usize },
    Range { pair: usize, value: f64, lo: f64, hi: f64 },
    Order { pair: usize, prev: f64, value: f64, strict: bool },
    LastSpan { prev: f64, value: f64, span: f64 },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Length { got, want } => write!(f, "{got} searched factors, expected {want}"),
            Violation::Range { pair, value, lo, hi } => write!(f, "pair {pair}: {value} outside [{lo}, {hi}]"),
            Violation::Order { pair, prev, value, strict } => {
                write!(
                    f,
                    "pair {pair}: {value} after {prev} is not {}",
                    if *strict { "strictly increasing" } else { "non-decreasing" }
                )
            }
            Violation::LastSpan { prev, value, span } => {
                write!(f, "last pair {value} exceeds the previous {prev} + {span}")
            }
        }
    }
}

impl Space {
    /// A LongRoPE2 space: pairs `cd..n_pairs` in `[s, length_scale]` on a grid of `1/units_per_one`.
    pub fn longrope2(n_pairs: usize, cd: usize, s: f64, length_scale: f64, units_per_one: i64) -> Space {
        Space {
            mode: Mode::LongRope2,
            n_pairs,
            first: cd,
            units_per_one,
            lo: ceil_units(s, units_per_one),
            hi: floor_units(length_scale, units_per_one),
            last_span: Some(4 * units_per_one),
        }
    }

    /// A LongRoPE v1 space: every pair in `[1, length_scale]`.
    pub fn longrope(n_pairs: usize, length_scale: f64, units_per_one: i64) -> Space {
        Space {
            mode: Mode::LongRope,
            n_pairs,
            first: 0,
            units_per_one,
            lo: units_per_one,
            hi: floor_units(length_scale, units_per_one),
            last_span: None,
        }
    }

    /// Number of searched pairs.
    pub fn n_genes(&self) -> usize {
        self.n_pairs - self.first
    }

    pub fn strict(&self) -> bool {
        self.mode == Mode::LongRope2
    }

    pub fn value(&self, units: i64) -> f64 {
        units as f64 / self.units_per_one as f64
    }

    /// Nearest grid units of a value.
    pub fn units(&self, value: f64) -> i64 {
        (value * self.units_per_one as f64).round() as i64
    }

    /// The full long-factor list (`n_pairs` values) of an individual.
    pub fn factors(&self, g: &[i64]) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.n_pairs);
        if self.first > 0 {
            let cd_value = self.value(g[0]);
            let cd = self.first as f64;
            out.extend((0..self.first).map(|i| cd_value.powf(i as f64 / cd)));
        }
        out.extend(g.iter().map(|&u| self.value(u)));
        out
    }

    /// Check every constraint of the space.
    pub fn check(&self, g: &[i64]) -> Result<(), Violation> {
        if g.len() != self.n_genes() {
            return Err(Violation::Length { got: g.len(), want: self.n_genes() });
        }
        for (k, &u) in g.iter().enumerate() {
            if u < self.lo || u > self.hi {
                return Err(Violation::Range {
                    pair: self.first + k,
                    value: self.value(u),
                    lo: self.value(self.lo),
                    hi: self.value(self.hi),
                });
            }
            if k > 0 {
                let bad = if self.strict() { u <= g[k - 1] } else { u < g[k - 1] };
                if bad {
                    return Err(Violation::Order {
                        pair: self.first + k,
                        prev: self.value(g[k - 1]),
                        value: self.value(u),
                        strict: self.strict(),
                    });
                }
            }
        }
        if let (Some(span), true) = (self.last_span, g.len() >= 2) {
            let (prev, last) = (g[g.len() - 2], g[g.len() - 1]);
            if last > prev + span {
                return Err(Violation::LastSpan {
                    prev: self.value(prev),
                    value: self.value(last),
                    span: self.value(span),
                });
            }
        }
        Ok(())
    }

    pub fn is_valid(&self, g: &[i64]) -> bool {
        self.check(g).is_ok()
    }

    /// The grid range pair `k` (searched index) may take given its current neighbours.
    fn neighbour_range(&self, g: &[i64], k: usize) -> (i64, i64) {
        let m = g.len();
        let left = if k == 0 { self.lo } else { g[k - 1].max(self.lo) };
        let right = if k + 1 == m {
            match (self.last_span, k) {
                (Some(span), k) if k > 0 => (g[k - 1] + span).min(self.hi),
                _ => self.hi,
            }
        } else {
            g[k + 1].min(self.hi)
        };
        (left, right)
    }

    /// `dim_mono` mutation of `parent` (see the module docs); `None` when `max_tries` passes
    /// found nothing valid and unseen.
    pub fn mutate(
        &self,
        parent: &[i64],
        p: f64,
        rng: &mut Rng,
        seen: &HashSet<Genes>,
        max_tries: usize,
    ) -> Option<Genes> {
        let mut g = parent.to_vec();
        for _ in 0..max_tries {
            for k in 0..g.len() {
                if rng.uniform() < p {
                    let (a, b) = self.neighbour_range(&g, k);
                    if a <= b {
                        g[k] = rng.range(a, b);
                    }
                }
            }
            if self.is_valid(&g) && !seen.contains(&g) {
                return Some(g);
            }
        }
        None
    }

    /// Crossover of two parents (see the module docs); `None` when the parents are equal or
    /// `max_tries` attempts found nothing valid, new and different from parent 1.
    pub fn crossover(
        &self,
        p1: &[i64],
        p2: &[i64],
        p: f64,
        rng: &mut Rng,
        seen: &HashSet<Genes>,
        max_tries: usize,
    ) -> Option<Genes> {
        if p1 == p2 {
            return None;
        }
        for _ in 0..max_tries {
            let mut g = p1.to_vec();
            for k in 0..g.len() {
                if rng.uniform() < p && rng.uniform() < 0.5 {
                    g[k] = p2[k];
                }
            }
            if g != p1 && self.is_valid(&g) && !seen.contains(&g) {
                return Some(g);
            }
        }
        None
    }

    /// LongRoPE2's NTK-shaped starting individuals: `λ_cd = S_k = s + k·(length_scale − s)/10`
    /// (k = 0..count; with s = 32, length_scale = 64 these are the released `32 + 3.2k`), then
    /// `S_k + 0.1·j` for the following pairs (the spacing shrinks, down to one grid step, where
    /// 0.1 would leave the range). Seeds that do not fit are left out.
    pub fn longrope2_seeds(&self, count: usize) -> Vec<Genes> {
        let m = self.n_genes() as i64;
        let tenth = (self.units_per_one / 10).max(1);
        let mut out: Vec<Genes> = Vec::new();
        for k in 0..count as i64 {
            let start = self.lo + ((self.hi - self.lo) as f64 * k as f64 / 10.0).round() as i64;
            let room = self.hi - start;
            let delta = if m > 1 { tenth.min(room / (m - 1)) } else { tenth };
            if delta < 1 && m > 1 {
                continue;
            }
            let g: Genes = (0..m).map(|j| start + j * delta).collect();
            if self.is_valid(&g) && !out.contains(&g) {
                out.push(g);
            }
        }
        out
    }

    /// A v1 starting individual from a full factor list (PI/NTK/YaRN): rounded to the grid,
    /// clamped into the range, made non-decreasing.
    pub fn from_factors(&self, factors: &[f64]) -> Genes {
        let mut g: Genes = factors[self.first..].iter().map(|&x| self.units(x).clamp(self.lo, self.hi)).collect();
        for k in 1..g.len() {
            g[k] = g[k].max(g[k - 1]);
        }
        g
    }
}

fn ceil_units(x: f64, upo: i64) -> i64 {
    (x * upo as f64 - 1e-9).ceil() as i64
}

fn floor_units(x: f64, upo: i64) -> i64 {
    (x * upo as f64 + 1e-9).floor() as i64
}
