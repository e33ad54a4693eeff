//! `--tree auto`: choosing how many draft nodes to verify per step.
//!
//! Tokens per second with budget B is MAT(B) / c(B + 1): accepted tokens per
//! step over the cost of a forward of the root plus B nodes. c(N) is measured
//! on this machine for this model (once, cached on disk); MAT(B) is learned
//! online from the steps actually taken with each budget. B = 0 is plain
//! decoding (MAT 1, cost c(1)), so when speculation stops paying the
//! controller falls back to it, and its periodic exploration retries the
//! others. Nothing here is tuned to a dataset: the only constants are the
//! candidate budgets and the exploration schedule.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::{LogitRows, Model};

/// Budgets the controller chooses among (powers of two: c(N) is smooth, so
/// finer steps buy little and cost exploration).
pub const CANDIDATE_BUDGETS: [usize; 6] = [0, 2, 4, 8, 16, 32];

/// Steps each budget is tried before exploiting, and how often (in steps) the
/// least-tried budget is retried afterwards.
const WARMUP_STEPS: u32 = 4;
const EXPLORE_EVERY: u64 = 24;
/// Weight of a new observation in the running MAT estimate: about the last
/// 20 steps of a budget count, so it follows a change of text within a reply.
const EMA: f64 = 0.05;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostPoint {
    pub n: usize,
    pub ms: f64,
}

/// Median wall time of one forward over N new tokens (all logits) after
/// `ctx` cached tokens, for each N; configurations interleaved rep by rep so
/// drift of the machine hits all alike.
pub fn measure_curve(
    model: &Model,
    ctx: usize,
    ns: &[usize],
    reps: usize,
) -> Result<Vec<CostPoint>> {
    measure(model, ctx, ns, reps, false)
}

/// [`measure_curve`] for one N with the stage profile
/// ([`crate::model::profile`]) collecting over the timed forwards only;
/// returns the mean ms per stage.
pub fn profile_forward(model: &Model, ctx: usize, n: usize, reps: usize) -> Result<[f64; 8]> {
    measure(model, ctx, &[n], reps, true)?;
    let reps = reps.max(1) as f64;
    Ok(crate::model::profile::totals_ms().map(|t| t / reps))
}

fn measure(
    model: &Model,
    ctx: usize,
    ns: &[usize],
    reps: usize,
    profile: bool,
) -> Result<Vec<CostPoint>> {
    let dec = &model.decoder;
    let vocab = dec.config.vocab_size as u32;
    let maxn = ns.iter().copied().max().unwrap_or(1);
    let mut cache = dec.new_cache(ctx + maxn + 1);
    // Deterministic pseudo-text: token ids spread over the vocabulary.
    let toks: Vec<u32> = (0..ctx + maxn)
        .map(|i| (i as u32 * 7919 + 13) % vocab)
        .collect();
    for chunk in toks[..ctx].chunks(super::PREFILL_CHUNK) {
        let base = cache.len();
        let pos: Vec<usize> = (base..base + chunk.len()).collect();
        let par: Vec<Option<usize>> = (0..chunk.len()).map(|i| i.checked_sub(1)).collect();
        dec.forward(&mut cache, chunk, &pos, &par, LogitRows::None)?;
        cache.keep_all();
    }
    let mut times = vec![Vec::new(); ns.len()];
    for rep in 0..=reps.max(1) {
        for (k, &n) in ns.iter().enumerate() {
            let pos: Vec<usize> = (ctx..ctx + n).collect();
            let par: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
            if profile && rep == 1 {
                crate::model::profile::enable(true);
            }
            let t = Instant::now();
            let out = dec.forward(&mut cache, &toks[ctx..ctx + n], &pos, &par, LogitRows::All);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            cache.truncate(ctx);
            if let Err(e) = out {
                if profile {
                    crate::model::profile::enable(false);
                }
                return Err(e);
            }
            if rep > 0 {
                // rep 0 warms caches and page tables
                times[k].push(ms);
            }
        }
    }
    if profile {
        crate::model::profile::enable(false);
    }
    Ok(ns
        .iter()
        .zip(times)
        .map(|(&n, mut t)| {
            t.sort_by(|a, b| a.total_cmp(b));
            CostPoint {
                n,
                ms: t[t.len() / 2],
            }
        })
        .collect())
}

fn curve_path(home: &Path, identity: &str) -> PathBuf {
    let safe: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    home.join("curves").join(format!("{safe}.json"))
}

/// Bump when the kernels or the forward change speed: cached curves from
/// an older build would mislead the controller (measured: curves cached by
/// an earlier build, one taken while the machine was busy, had c(1) two to
/// three times too high and c(9)/c(1) 2.5 instead of ~1.8).
const FORWARD_REVISION: u32 = 5;

/// What a cached curve is valid for: the model, the thread count, the
/// kernel path, this build (version, forward revision, optimised or not).
fn curve_key(model: &Model) -> String {
    format!(
        "{}_{}t_{}_v{}r{}{}",
        model.identity,
        crate::kernels::threads(),
        crate::kernels::isa(),
        env!("CARGO_PKG_VERSION"),
        FORWARD_REVISION,
        if cfg!(debug_assertions) { "_dev" } else { "" }
    )
}

/// The c(N) curve of this model on this machine: from the cache in `home`,
/// or measured now (a few seconds) and cached.
pub fn cost_curve(model: &Model, home: &Path) -> Result<Vec<CostPoint>> {
    let path = curve_path(home, &curve_key(model));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(c) = serde_json::from_str::<Vec<CostPoint>>(&text) {
            if c.len() == CANDIDATE_BUDGETS.len() {
                return Ok(c);
            }
        }
    }
    let ns: Vec<usize> = CANDIDATE_BUDGETS.iter().map(|b| b + 1).collect();
    tracing::info!("measuring the verify cost curve c(N) for --tree auto");
    let curve = measure_curve(model, 256, &ns, 5)?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, serde_json::to_string(&curve).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(curve)
}

#[derive(Debug, Clone)]
struct Arm {
    budget: usize,
    /// Running means of tokens emitted per step and of the step's forward
    /// cost (a drafter may propose fewer nodes than the budget allows).
    mat: f64,
    cost_ms: f64,
    pulls: u32,
}

/// Picks the budget with the best expected tokens per second.
#[derive(Debug, Clone)]
pub struct BudgetController {
    arms: Vec<Arm>,
    curve: Vec<CostPoint>,
    steps: u64,
    max_budget: usize,
}

impl BudgetController {
    /// `curve`: c(N) for N = budget + 1 of every candidate budget;
    /// budgets above `max_budget` are never chosen.
    pub fn new(curve: &[CostPoint], max_budget: usize) -> Self {
        let arms = CANDIDATE_BUDGETS
            .iter()
            .filter(|&&b| b <= max_budget)
            .map(|&b| Arm {
                budget: b,
                mat: 1.0,
                cost_ms: interpolate(curve, b + 1),
                pulls: 0,
            })
            .collect();
        BudgetController {
            arms,
            curve: curve.to_vec(),
            steps: 0,
            max_budget,
        }
    }

    /// The budget for the next step.
    pub fn choose(&mut self) -> usize {
        self.steps += 1;
        if self.arms.is_empty() {
            return 0;
        }
        if let Some(a) = self.arms.iter().find(|a| a.pulls < WARMUP_STEPS) {
            return a.budget;
        }
        if self.steps.is_multiple_of(EXPLORE_EVERY) {
            return self
                .arms
                .iter()
                .min_by_key(|a| a.pulls)
                .map_or(0, |a| a.budget);
        }
        self.best()
    }

    /// The budget with the highest estimated tokens per second.
    pub fn best(&self) -> usize {
        self.arms
            .iter()
            .max_by(|a, b| (a.mat / a.cost_ms).total_cmp(&(b.mat / b.cost_ms)))
            .map_or(0, |a| a.budget)
    }

    /// What a step with `budget` yielded: tokens emitted (bonus included) by
    /// a tree of `tree_len` nodes (root included).
    pub fn record(&mut self, budget: usize, emitted: usize, tree_len: usize) {
        let cost = interpolate(&self.curve, tree_len);
        if let Some(a) = self.arms.iter_mut().find(|a| a.budget == budget) {
            if a.pulls == 0 {
                a.mat = emitted as f64;
                a.cost_ms = cost;
            } else {
                a.mat = (1.0 - EMA) * a.mat + EMA * emitted as f64;
                a.cost_ms = (1.0 - EMA) * a.cost_ms + EMA * cost;
            }
            a.pulls = a.pulls.saturating_add(1);
        }
    }

    pub fn max_budget(&self) -> usize {
        self.max_budget
    }

    /// (budget, running MAT, tokens/s estimate) for logs and stats.
    pub fn estimates(&self) -> Vec<(usize, f64, f64)> {
        self.arms
            .iter()
            .map(|a| (a.budget, a.mat, a.mat * 1000.0 / a.cost_ms))
            .collect()
    }
}

/// A controller shared by every request of a process (CLI run, server).
pub type SharedBudget = std::sync::Arc<std::sync::Mutex<BudgetController>>;

/// The `--tree auto` controller for `model`, if `spec` asks for one; the
/// c(N) curve comes from (or is measured into) the cache under `home`.
pub fn controller_for(
    model: &Model,
    spec: &super::spec::SpecConfig,
    home: &Path,
) -> Result<Option<SharedBudget>> {
    if !spec.auto_budget() {
        return Ok(None);
    }
    let curve = cost_curve(model, home)?;
    Ok(Some(std::sync::Arc::new(std::sync::Mutex::new(
        BudgetController::new(&curve, spec.max_draft),
    ))))
}

/// c(n) from the measured points, linear between them (and beyond the last).
fn interpolate(curve: &[CostPoint], n: usize) -> f64 {
    let n = n as f64;
    let mut pts: Vec<(f64, f64)> = curve.iter().map(|p| (p.n as f64, p.ms.max(1e-6))).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    match pts.len() {
        0 => 1.0,
        1 => pts[0].1,
        _ => {
            let i = pts.partition_point(|p| p.0 < n).clamp(1, pts.len() - 1);
            let ((x0, y0), (x1, y1)) = (pts[i - 1], pts[i]);
            (y0 + (y1 - y0) * (n - x0) / (x1 - x0)).max(1e-6)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(ms: &[f64]) -> Vec<CostPoint> {
        CANDIDATE_BUDGETS
            .iter()
            .zip(ms)
            .map(|(&b, &ms)| CostPoint { n: b + 1, ms })
            .collect()
    }

    #[test]
    fn falls_back_to_plain_when_speculation_does_not_pay() {
        // Forward cost grows linearly: nothing can beat plain decoding
        // unless nearly every node is accepted.
        let mut c = BudgetController::new(&curve(&[10., 30., 50., 90., 170., 330.]), 32);
        for _ in 0..400 {
            let b = c.choose();
            c.record(b, 1 + (b > 0) as usize, b + 1); // one accepted draft per step at best
        }
        assert_eq!(c.best(), 0);
    }

    #[test]
    fn picks_the_budget_with_best_tokens_per_second() {
        // Cheap small trees; acceptance saturates past 8 nodes.
        let mut c = BudgetController::new(&curve(&[10., 11., 12., 14., 25., 50.]), 32);
        let mat = |b: usize| match b {
            0 => 1,
            2 => 2,
            4 => 2,
            8 => 3,
            _ => 3,
        };
        for _ in 0..400 {
            let b = c.choose();
            c.record(b, mat(b), b + 1);
        }
        assert_eq!(c.best(), 8);
        // Exploration keeps visiting the others.
        assert!(c.arms.iter().all(|a| a.pulls > WARMUP_STEPS));
    }

    #[test]
    fn interpolates_costs() {
        let c = curve(&[10., 12., 14., 18., 26., 42.]);
        assert_eq!(interpolate(&c, 1), 10.0);
        assert_eq!(interpolate(&c, 2), 11.0);
        assert_eq!(interpolate(&c, 9), 18.0);
        assert_eq!(interpolate(&c, 13), 22.0);
    }

    #[test]
    fn respects_the_max_budget() {
        let mut c = BudgetController::new(&curve(&[10., 10., 10., 10., 10., 10.]), 4);
        for _ in 0..100 {
            let b = c.choose();
            assert!(b <= 4);
            c.record(b, b + 1, b + 1);
        }
        assert_eq!(c.best(), 4);
    }
}
