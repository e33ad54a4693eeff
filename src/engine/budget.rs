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
/// 64 is only tried in the classes of steps with a long confident match
/// (a suffix copy drafts up to 32+ tokens in one chain).
pub const CANDIDATE_BUDGETS: [usize; 7] = [0, 2, 4, 8, 16, 32, 64];

/// Steps each budget is tried before exploiting, and how often (in steps) the
/// least-tried budget is retried afterwards.
const WARMUP_STEPS: u32 = 4;
const EXPLORE_EVERY: u64 = 24;
/// An arm whose estimated rate is below this share of the best one's when
/// it is retried waits twice as long for its next retry (up to
/// [`MAX_BACKOFF`] × [`EXPLORE_EVERY`] steps); one within it is retried at
/// the base rate. A retry of a draft model's budget that never pays costs
/// the draft's forwards and its catch-up over the steps it skipped (on
/// Qwen2.5-Coder 1.5B drafted by 0.5B on 2 cores, a retry every 24 steps
/// kept `draft:auto` at 0.92x plain): backing off lets the controller turn
/// such a drafter off by itself while near rivals keep being compared.
const LOSING_SHARE: f64 = 0.9;
const MAX_BACKOFF: u64 = 32;
/// A drafting arm is tried (warm-up or retry) only while the catch-up it
/// implies ([`CatchUp`]) costs at most this share of the request's
/// remaining tokens at the plain step's cost: a look pays only if what it
/// may find wins back more than it spent, and a tenth of what is left is
/// as much as a look at an arm that has not paid so far is worth. On the
/// 1.5B with its 0.5B draft (2 cores) a 64-token reply to a 300-token
/// prompt would spend ~14% of its time on the draft's prefill alone; a
/// 50-token prompt ~3%.
const CATCH_UP_SHARE: f64 = 0.1;
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
    measure(model, ctx, ns, reps, false, false)
}

/// [`measure_curve`] for one N with the stage profile
/// ([`crate::model::profile`]) collecting over the timed forwards only;
/// returns the mean ms per stage.
pub fn profile_forward(model: &Model, ctx: usize, n: usize, reps: usize) -> Result<[f64; 8]> {
    measure(model, ctx, &[n], reps, true, false)?;
    let reps = reps.max(1) as f64;
    Ok(crate::model::profile::totals_ms().map(|t| t / reps))
}

/// `synthetic`: the cached prefix is filled with pseudo-random keys and
/// values instead of being prefilled (a forward's cost does not depend on
/// what the cache holds, and a long prefill would take most of a minute).
fn measure(
    model: &Model,
    ctx: usize,
    ns: &[usize],
    reps: usize,
    profile: bool,
    synthetic: bool,
) -> Result<Vec<CostPoint>> {
    let dec = &model.decoder;
    let vocab = dec.config.vocab_size as u32;
    let maxn = ns.iter().copied().max().unwrap_or(1);
    let mut cache = dec.new_cache(ctx + maxn + 1);
    // Deterministic pseudo-text: token ids spread over the vocabulary.
    let toks: Vec<u32> = (0..ctx + maxn)
        .map(|i| (i as u32 * 7919 + 13) % vocab)
        .collect();
    if synthetic {
        cache.fill_pseudo_random(ctx, super::PREFILL_CHUNK)?;
    }
    let prefill = if synthetic { 0 } else { ctx };
    for chunk in toks[..prefill].chunks(super::PREFILL_CHUNK) {
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
const FORWARD_REVISION: u32 = 8;

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

/// Cached tokens when the c(N) curve is measured.
const CURVE_CTX: usize = 256;
/// Cached tokens of the second measurement, which gives each N's extra cost
/// per position of context: the attention grows with it (0.5B at 8k: 60% of
/// a 16-token forward), so a budget that pays at 256 tokens may not at 8k.
const LONG_CTX: usize = 4096;

/// What a forward costs on this machine for this model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostModel {
    /// c(N) with [`CURVE_CTX`] tokens cached, for N = budget + 1 of every
    /// candidate budget.
    pub curve: Vec<CostPoint>,
    /// For the same N: ms more per 1000 more cached tokens (0 if the
    /// model's context is too short to measure it).
    pub ms_per_kctx: Vec<f64>,
}

impl CostModel {
    /// The cost of a forward over `n` tokens (fractional: a mean tree size)
    /// with `ctx` tokens cached.
    pub fn cost_ms(&self, n: f64, ctx: usize) -> f64 {
        let at = |f: &dyn Fn(usize) -> f64| {
            let pts: Vec<(f64, f64)> = (0..self.curve.len())
                .map(|i| (self.curve[i].n as f64, f(i)))
                .collect();
            interpolate(&pts, n)
        };
        let base = at(&|i| self.curve[i].ms).max(1e-6);
        let slope = at(&|i| self.ms_per_kctx.get(i).copied().unwrap_or(0.0)).max(0.0);
        base + slope * ctx.saturating_sub(CURVE_CTX) as f64 / 1000.0
    }
}

/// The cost model of this model on this machine: from the cache in `home`,
/// or measured now (seconds) and cached.
pub fn cost_curve(model: &Model, home: &Path) -> Result<CostModel> {
    let path = curve_path(home, &curve_key(model));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(c) = serde_json::from_str::<CostModel>(&text) {
            if c.curve.len() == CANDIDATE_BUDGETS.len()
                && c.ms_per_kctx.len() == CANDIDATE_BUDGETS.len()
            {
                return Ok(c);
            }
        }
    }
    let ns: Vec<usize> = CANDIDATE_BUDGETS.iter().map(|b| b + 1).collect();
    tracing::info!("measuring the verify cost c(N) for --tree auto (once per model)");
    let curve = measure_curve(model, CURVE_CTX, &ns, 5)?;
    let maxn = ns.iter().copied().max().unwrap_or(1);
    let long = LONG_CTX.min(model.config().context_length.saturating_sub(maxn + 1));
    let ms_per_kctx = if long > 2 * CURVE_CTX {
        let far = measure(model, long, &ns, 3, false, true)?;
        let k = (long - CURVE_CTX) as f64 / 1000.0;
        // A bigger forward never attends to less: the running max keeps
        // one noisy measurement from making a bigger tree look cheaper.
        let mut most = 0f64;
        curve
            .iter()
            .zip(&far)
            .map(|(near, far)| {
                most = most.max((far.ms - near.ms) / k);
                most
            })
            .collect()
    } else {
        vec![0.0; ns.len()]
    };
    let model_cost = CostModel { curve, ms_per_kctx };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, serde_json::to_string(&model_cost).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(model_cost)
}

/// The rest of a batched forward, as a sequence choosing its budget sees
/// it: rows already in it and the tokens they are expected to emit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Batch {
    pub rows: f64,
    pub tokens: f64,
}

/// What drafting at the next step would cost once, besides a step's
/// steady cost: a draft model catching up over the tokens it missed while
/// the controller chose plain steps (its prompt, at a request's first
/// drafting step). Zero for drafters that keep up for free.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CatchUp {
    /// Estimated ms ([`crate::draft::Drafter::catch_up_ms`]).
    pub ms: f64,
    /// Tokens the request may still generate: what a catch-up is spread
    /// over when an arm takes over for the rest of it.
    pub remaining: usize,
}

/// One arm of a class, as [`BudgetController::estimates`] reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArmEstimate {
    pub budget: usize,
    /// Steps recorded under it.
    pub pulls: u32,
    /// Running mean of tokens emitted per step.
    pub mat: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone)]
struct Arm {
    budget: usize,
    /// Running means of tokens emitted per step and of the tree's size (a
    /// drafter may propose fewer nodes than the budget allows).
    mat: f64,
    nodes: f64,
    /// Running mean of the drafter's own time per step (ms): a draft model's
    /// forwards, the top-k pass Token Recycling learns from. Measured, so a
    /// budget whose drafting costs more than its accepted tokens save loses.
    draft_ms: f64,
    pulls: u32,
    /// The class step from which the arm may be retried, and the current
    /// retry interval in units of [`EXPLORE_EVERY`].
    due: u64,
    backoff: u64,
}

/// The arms of one class of steps ([`crate::draft::Drafter::outlook`]).
#[derive(Debug, Clone)]
struct Class {
    arms: Vec<Arm>,
    steps: u64,
}

impl Class {
    fn new(max_budget: usize) -> Self {
        Class {
            arms: CANDIDATE_BUDGETS
                .iter()
                .filter(|&&b| b <= max_budget)
                .map(|&b| Arm {
                    budget: b,
                    mat: 1.0,
                    nodes: (b + 1) as f64,
                    draft_ms: 0.0,
                    pulls: 0,
                    due: 0,
                    backoff: 1,
                })
                .collect(),
            steps: 0,
        }
    }
}

/// Picks the budget with the best expected tokens per second, separately
/// for each class of step: what pays when the drafter has a long confident
/// match (a copy: a 32-node chain accepted nearly whole) is not what pays
/// otherwise (small trees accepting ~2 tokens), and one running mean over
/// both would average the long budgets' wins away.
#[derive(Debug, Clone)]
pub struct BudgetController {
    classes: Vec<Class>,
    cost: CostModel,
    max_budget: usize,
    /// The draft-model gate of a drafter with a costly source beside free
    /// ones ([`BudgetController::gate_mut`]), made on first use.
    gate: Option<Box<BudgetController>>,
}

impl BudgetController {
    /// Budgets above `max_budget` are never chosen in class 0, above
    /// `max_long` never in the others.
    pub fn new(cost: &CostModel, max_budget: usize) -> Self {
        Self::with_long(cost, max_budget, max_budget)
    }

    pub fn with_long(cost: &CostModel, max_budget: usize, max_long: usize) -> Self {
        let classes = (0..crate::draft::suffix::OUTLOOK_CLASSES)
            .map(|c| Class::new(if c == 0 { max_budget } else { max_long }))
            .collect();
        BudgetController {
            classes,
            cost: cost.clone(),
            max_budget,
            gate: None,
        }
    }

    /// The gate that decides, per step, whether a drafter's costly source
    /// runs at all ([`crate::draft::Drafter::costly_source`]: the hybrid's
    /// draft model beside its suffix, lookup and recycled branches). Its
    /// arms are this controller's budgets with the costly source on, and
    /// arm 0, which here is not plain decoding but the free sources alone,
    /// sized each step by their estimate: it records what those steps
    /// yielded (tokens, nodes, drafting ms), so the two are compared on
    /// what each realized. The draft model is then tried, kept or backed
    /// off (warm-up, retries, catch-up price) exactly as `draft:auto` is
    /// against plain decoding, and with the free hybrid as the rival it
    /// must beat, `hybrid-draft:auto` no longer pays the draft forwards of
    /// steps where the free branches alone would have done as well: on
    /// Qwen2.5-Coder 1.5B with its 0.5B draft (2 cores, Spec-Bench + MBPP)
    /// it trailed `hybrid:auto` 1.19x to 1.33x when every speculative step
    /// ran the draft, and 1.28x to 1.31x gated (13 draft ms a step, from 22).
    pub fn gate_mut(&mut self) -> &mut BudgetController {
        // The long classes' largest arm is the largest candidate within
        // `max_long`, which gives them the same arms again.
        let max_long = self.classes.last().and_then(|c| c.arms.last());
        let max_long = max_long.map_or(0, |a| a.budget);
        let (cost, max_budget) = (&self.cost, self.max_budget);
        self.gate
            .get_or_insert_with(|| Box::new(Self::with_long(cost, max_budget, max_long)))
    }

    /// [`BudgetController::gate_mut`] if it was made.
    pub fn gate(&self) -> Option<&BudgetController> {
        self.gate.as_deref()
    }

    fn class(&mut self, class: usize) -> &mut Class {
        let last = self.classes.len() - 1;
        &mut self.classes[class.min(last)]
    }

    /// The budget for the next step of `class`, with `ctx` tokens cached.
    pub fn choose(&mut self, ctx: usize, class: usize) -> usize {
        self.choose_in(ctx, class, Batch::default(), usize::MAX, CatchUp::default())
    }

    /// [`BudgetController::choose`] for a sequence sharing its forward
    /// with `others`: the budget maximizes the whole forward's tokens per
    /// second, so draft nodes are weighed by what they add to a forward of
    /// `others.rows` rows (flat stretch of c(N): cheap; a full batch: each
    /// node costs about a row's share) against what they are expected to
    /// add to its tokens. Alone (`others` zero) this is `choose`. Only
    /// budgets up to `cap` (the step's share of rows) are candidates, for
    /// warm-up and exploration too: an arm that does not fit is never run,
    /// so it must not be chosen (it would stay unexplored, and chosen, for
    /// ever).
    ///
    /// A drafting arm also pays `catch_up` once: spread over the steps it
    /// would run for the rest of the request when it is weighed against
    /// the current best, and tried (warm-up, retry) only while it is within
    /// [`CATCH_UP_SHARE`] of the plain time left.
    pub fn choose_in(
        &mut self,
        ctx: usize,
        class: usize,
        others: Batch,
        cap: usize,
        catch_up: CatchUp,
    ) -> usize {
        let c = self.class(class);
        c.steps += 1;
        let steps = c.steps;
        let mut fits = c.arms.iter().filter(|a| a.budget <= cap).peekable();
        if fits.peek().is_none() {
            return 0;
        }
        let plain_left = catch_up.remaining as f64 * self.cost.cost_ms(1.0, ctx);
        let affordable = |a: &Arm| a.budget == 0 || catch_up.ms <= CATCH_UP_SHARE * plain_left;
        let c = &self.classes[class.min(self.classes.len() - 1)];
        if let Some(a) = c
            .arms
            .iter()
            .find(|a| a.budget <= cap && a.pulls < WARMUP_STEPS && affordable(a))
        {
            return a.budget;
        }
        let best = self.best_in(ctx, class, others, cap, catch_up);
        if steps.is_multiple_of(EXPLORE_EVERY) {
            let best_rate = c
                .arms
                .iter()
                .find(|a| a.budget == best)
                .map_or(0.0, |a| self.switching_rate(a, ctx, others, catch_up));
            let retry = c
                .arms
                .iter()
                .enumerate()
                .filter(|(_, a)| {
                    a.budget <= cap && a.budget != best && a.due <= steps && affordable(a)
                })
                .min_by_key(|(_, a)| a.pulls)
                .map(|(i, a)| {
                    let rate = self.switching_rate(a, ctx, others, catch_up);
                    (i, rate < LOSING_SHARE * best_rate)
                });
            if let Some((i, losing)) = retry {
                let a = &mut self.class(class).arms[i];
                a.backoff = if losing {
                    (2 * a.backoff).min(MAX_BACKOFF)
                } else {
                    1
                };
                a.due = steps + a.backoff * EXPLORE_EVERY;
                return a.budget;
            }
        }
        best
    }

    /// The largest budget a step of `class` may take within `cap`: how
    /// many nodes an estimating drafter need look at.
    pub fn max_in(&self, class: usize, cap: usize) -> usize {
        let c = &self.classes[class.min(self.classes.len() - 1)];
        c.arms
            .iter()
            .map(|a| a.budget)
            .filter(|&b| b <= cap)
            .max()
            .unwrap_or(0)
    }

    /// [`BudgetController::choose_in`] for a drafter that estimated this
    /// step's tree ([`crate::draft::Drafter::estimate`]): `accept[i]` is the
    /// chance its `i`-th best node is accepted. The tree size `n` is the one
    /// whose forward gives the most tokens per second now, (1 + sum of the
    /// first `n`) over the cost of `n + 1` rows on the measured c(N), rather
    /// than a running mean per class. So the floor a node must clear is
    /// this machine's price of a row where the forward stands, not a
    /// constant: on the flat start of c(N) a 5% guess pays, past it one
    /// below ~30% may not.
    ///
    /// No warm-up: the estimate already says what each size yields (trying
    /// every budget four times per class cost a 200-token reply a quarter
    /// of its steps, plain steps in the middle of a copy among them). Every
    /// [`EXPLORE_EVERY`] steps the tree is twice the size that pays, so the
    /// drafter's record also learns from the nodes just below the line
    /// (an estimate that is too low would otherwise never be corrected).
    ///
    /// Returns (the arm the step is recorded under, the nodes to draft): the
    /// arm is the least candidate budget that holds `n`.
    pub fn choose_estimated(
        &mut self,
        ctx: usize,
        class: usize,
        others: Batch,
        cap: usize,
        accept: &[f32],
    ) -> (usize, usize) {
        let steps = self.class(class).steps + 1;
        let exploring = steps.is_multiple_of(EXPLORE_EVERY);
        self.class(class).steps = steps;
        let max_arm = self.max_in(class, cap);
        let c = &self.classes[class.min(self.classes.len() - 1)];
        let mut best = (0, 0, f64::MIN);
        let mut drafts = 0.0;
        for n in 0..=accept.len().min(max_arm) {
            if n > 0 {
                let p = accept[n - 1] as f64;
                if !p.is_finite() {
                    break;
                }
                drafts += p.clamp(0.0, 1.0);
            }
            let Some(arm) = c.arms.iter().find(|a| a.budget >= n) else {
                break;
            };
            let draft_ms = if n == 0 { 0.0 } else { arm.draft_ms };
            let rate = (others.tokens + 1.0 + drafts) * 1000.0
                / (self.cost.cost_ms(others.rows + 1.0 + n as f64, ctx) + draft_ms);
            if rate > best.2 {
                best = (arm.budget, n, rate);
            }
        }
        if exploring {
            let n = (2 * best.1).max(1).min(accept.len().min(max_arm));
            if let Some(arm) = c.arms.iter().find(|a| a.budget >= n) {
                return (arm.budget, n);
            }
        }
        (best.0, best.1)
    }

    /// Expected tokens per second of a forward holding an arm's tree (with
    /// `ctx` tokens cached) and `others`.
    fn rate(&self, a: &Arm, ctx: usize, others: Batch) -> f64 {
        self.switching_rate(a, ctx, others, CatchUp::default())
    }

    /// [`BudgetController::rate`] with a drafting arm's `catch_up` spread
    /// over the steps it would run for the rest of the request.
    fn switching_rate(&self, a: &Arm, ctx: usize, others: Batch, catch_up: CatchUp) -> f64 {
        let spread = if a.budget == 0 || catch_up.ms <= 0.0 {
            0.0
        } else {
            let steps_left = (catch_up.remaining as f64 / a.mat.max(1.0)).max(1.0);
            catch_up.ms / steps_left
        };
        (others.tokens + a.mat) * 1000.0
            / (self.cost.cost_ms(others.rows + a.nodes, ctx) + a.draft_ms + spread)
    }

    /// The budget of `class` with the highest estimated tokens per second.
    pub fn best(&self, ctx: usize, class: usize) -> usize {
        self.best_in(ctx, class, Batch::default(), usize::MAX, CatchUp::default())
    }

    fn best_in(
        &self,
        ctx: usize,
        class: usize,
        others: Batch,
        cap: usize,
        catch_up: CatchUp,
    ) -> usize {
        let c = &self.classes[class.min(self.classes.len() - 1)];
        c.arms
            .iter()
            .filter(|a| a.budget <= cap)
            .max_by(|a, b| {
                self.switching_rate(a, ctx, others, catch_up)
                    .total_cmp(&self.switching_rate(b, ctx, others, catch_up))
            })
            .map_or(0, |a| a.budget)
    }

    /// (tree nodes, tokens emitted) a step of `class` with `budget` is
    /// expected to have, from the running means.
    pub fn expected(&self, class: usize, budget: usize) -> Option<(f64, f64)> {
        let c = &self.classes[class.min(self.classes.len() - 1)];
        let a = c.arms.iter().find(|a| a.budget == budget)?;
        Some((a.nodes, a.mat))
    }

    /// What a step of `class` with `budget` yielded: tokens emitted (bonus
    /// included) by a tree of `tree_len` nodes (root included), and what
    /// drafting it took (ms, besides the verify forward).
    pub fn record(
        &mut self,
        class: usize,
        budget: usize,
        emitted: usize,
        tree_len: usize,
        draft_ms: f64,
    ) {
        if let Some(a) = self
            .class(class)
            .arms
            .iter_mut()
            .find(|a| a.budget == budget)
        {
            // The plain mean of the first pulls, then the running one: a
            // first pull weighted wholly and then by EMA left one odd step
            // (a draft model's first step runs its prompt prefill) weighing
            // ~80% of the estimate for the next 4 pulls.
            let w = (1.0 / (a.pulls as f64 + 1.0)).max(EMA);
            a.mat += w * (emitted as f64 - a.mat);
            a.nodes += w * (tree_len as f64 - a.nodes);
            a.draft_ms += w * (draft_ms - a.draft_ms);
            a.pulls = a.pulls.saturating_add(1);
        }
    }

    pub fn max_budget(&self) -> usize {
        self.max_budget
    }

    /// Every arm of `class` as it stands, with its tokens/s estimate at
    /// `ctx` cached tokens, for logs, stats and tests.
    pub fn estimates(&self, ctx: usize, class: usize) -> Vec<ArmEstimate> {
        let c = &self.classes[class.min(self.classes.len() - 1)];
        c.arms
            .iter()
            .map(|a| ArmEstimate {
                budget: a.budget,
                pulls: a.pulls,
                mat: a.mat,
                tokens_per_s: self.rate(a, ctx, Batch::default()),
            })
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
    let cost = cost_curve(model, home)?;
    Ok(Some(std::sync::Arc::new(std::sync::Mutex::new(
        BudgetController::with_long(&cost, spec.max_draft, spec.max_long_draft),
    ))))
}

/// y(x) from measured points (x, y), linear between them and beyond the
/// ends.
fn interpolate(points: &[(f64, f64)], x: f64) -> f64 {
    let mut pts = points.to_vec();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    match pts.len() {
        0 => 1.0,
        1 => pts[0].1,
        _ => {
            let i = pts.partition_point(|p| p.0 < x).clamp(1, pts.len() - 1);
            let ((x0, y0), (x1, y1)) = (pts[i - 1], pts[i]);
            y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// c(N) at the curve's context, and no growth with the context.
    fn curve(ms: &[f64]) -> CostModel {
        with_slopes(ms, &[0.0; 7])
    }

    fn with_slopes(ms: &[f64], per_kctx: &[f64]) -> CostModel {
        CostModel {
            curve: CANDIDATE_BUDGETS
                .iter()
                .zip(ms)
                .map(|(&b, &ms)| CostPoint { n: b + 1, ms })
                .collect(),
            ms_per_kctx: per_kctx.to_vec(),
        }
    }

    #[test]
    fn a_step_estimate_chooses_this_step_tree_size() {
        let cost = curve(&[10., 11., 12., 14., 25., 50., 100.]);
        let mut c = BudgetController::new(&cost, 64);
        // From the first step the estimate decides, step by step (no
        // warm-up): nothing worth a row -> plain; a confident 8-token copy
        // -> 8 nodes (9 rows cost 14 ms for ~8 more tokens).
        let weak = [0.03, 0.02, 0.02, 0.02];
        let copy = [0.97, 0.95, 0.94, 0.94, 0.93, 0.93, 0.92, 0.9];
        let mut picks = Vec::new();
        for step in 0..10 {
            let est: &[f32] = if step % 2 == 0 { &weak } else { &copy };
            picks.push(c.choose_estimated(CURVE_CTX, 0, Batch::default(), 64, est));
        }
        let want: Vec<(usize, usize)> = (0..10).map(|i| [(0, 0), (8, 8)][i % 2]).collect();
        assert_eq!(picks, want);
        // A cap below the best size: the best that fits.
        assert_eq!(
            c.choose_estimated(CURVE_CTX, 0, Batch::default(), 4, &copy),
            (4, 4)
        );
        // Between two budgets: the size is where the next node stops
        // paying, recorded under the least budget that holds it. Here c(N)
        // rises 0.5 ms a row from 5 to 9 rows (12 -> 14 ms) while a step
        // emits ~4.5 tokens in ~13 ms: a node must be accepted ~17% of the
        // time to pay, so the 0.5 one is taken and the 0.1 ones are not.
        let cut = [0.97, 0.95, 0.94, 0.9, 0.5, 0.1, 0.1, 0.1];
        assert_eq!(
            c.choose_estimated(CURVE_CTX, 0, Batch::default(), 64, &cut),
            (8, 5)
        );
        // Every EXPLORE_EVERY steps of the class: twice the paying size (up
        // to what was estimated), so the nodes below the line get verified
        // and the drafter's record learns from them.
        let mut explored = Vec::new();
        for _ in 12..2 * EXPLORE_EVERY {
            explored.push(c.choose_estimated(CURVE_CTX, 0, Batch::default(), 64, &cut));
        }
        assert_eq!(explored.iter().filter(|&&p| p == (8, 8)).count(), 2);
        assert_eq!(
            explored.iter().filter(|&&p| p == (8, 5)).count(),
            explored.len() - 2
        );
        // Cheap rows (a flat c(N)): the same 10% guesses now pay.
        let mut flat = BudgetController::new(&curve(&[10., 10.1, 10.2, 10.4, 12., 20., 40.]), 64);
        assert_eq!(
            flat.choose_estimated(CURVE_CTX, 0, Batch::default(), 64, &cut),
            (8, 8)
        );
    }

    #[test]
    fn falls_back_to_plain_when_speculation_does_not_pay() {
        // Forward cost grows linearly: nothing can beat plain decoding
        // unless nearly every node is accepted.
        let mut c = BudgetController::new(&curve(&[10., 30., 50., 90., 170., 330.]), 32);
        for _ in 0..400 {
            let b = c.choose(CURVE_CTX, 0);
            c.record(0, b, 1 + (b > 0) as usize, b + 1, 0.0); // one accepted draft per step at best
        }
        assert_eq!(c.best(CURVE_CTX, 0), 0);
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
            let b = c.choose(CURVE_CTX, 0);
            c.record(0, b, mat(b), b + 1, 0.0);
        }
        assert_eq!(c.best(CURVE_CTX, 0), 8);
        // Beside 7 other sequences' roots the forward is on the steep part
        // of c(N): a 9-node tree would add ~10 ms for 2 tokens, where 8
        // roots cost ~13 ms for 8; plain decoding pays best.
        let batch = Batch {
            rows: 7.0,
            tokens: 7.0,
        };
        assert_eq!(
            c.best_in(CURVE_CTX, 0, batch, usize::MAX, CatchUp::default()),
            0
        );
        // One other root: still on the flat stretch, a small tree pays.
        let pair = Batch {
            rows: 1.0,
            tokens: 1.0,
        };
        assert!(c.best_in(CURVE_CTX, 0, pair, usize::MAX, CatchUp::default()) >= 2);
        // A cap of 3 rows leaves the arms 0 and 2, even in warm-up.
        let mut fresh = BudgetController::new(&curve(&[10., 11., 12., 14., 25., 50.]), 32);
        for _ in 0..50 {
            let b = fresh.choose_in(CURVE_CTX, 0, Batch::default(), 3, CatchUp::default());
            assert!(b <= 2, "chose {b} over a cap of 3");
            fresh.record(0, b, 1, b + 1, 0.0);
        }
        assert_eq!(c.expected(0, 8).map(|e| e.1.round()), Some(3.0));
        // Exploration keeps visiting the others.
        assert!(c.classes[0].arms.iter().all(|a| a.pulls > WARMUP_STEPS));
    }

    /// A draft model's forwards are paid per step: the budget that wins with
    /// a free drafter loses to a smaller one at 1 ms per drafted node, and
    /// at 6 ms per node (a draft forward costing 0.6 of the target's 10-ms
    /// step) plain decoding wins: drafting costs more than it saves.
    #[test]
    fn the_drafters_own_cost_counts() {
        let cost = curve(&[10., 11., 12., 14., 25., 50.]);
        let mat =
            |b: usize| [1, 2, 3, 4, 4, 4][CANDIDATE_BUDGETS.iter().position(|&x| x == b).unwrap()];
        let run = |ms_per_node: f64| {
            let mut c = BudgetController::new(&cost, 32);
            for _ in 0..400 {
                let b = c.choose(CURVE_CTX, 0);
                c.record(0, b, mat(b), b + 1, ms_per_node * b as f64);
            }
            c.best(CURVE_CTX, 0)
        };
        assert_eq!(run(0.0), 8, "free drafting: 4 tokens per 14 ms");
        assert_eq!(run(1.0), 4, "1 ms per node: 3 per 16 ms beats 4 per 22");
        assert_eq!(run(6.0), 0, "a draft forward per node of 6 ms never pays");
    }

    /// A drafter that never pays (a draft forward per node costing 0.6 of
    /// the target's step) is retried ever more rarely: after the warm-up
    /// its retries back off from every 24 steps to every 768, yet never
    /// stop, and a drafter that starts to pay is taken up again.
    #[test]
    fn a_losing_drafter_is_retried_ever_more_rarely() {
        let cost = curve(&[10., 11., 12., 14., 25., 50.]);
        let mut c = BudgetController::new(&cost, 8);
        let mut drafting = 0;
        let mut late = 0;
        for step in 0..6000 {
            let b = c.choose(CURVE_CTX, 0);
            c.record(0, b, 1 + (b > 0) as usize, b + 1, 6.0 * b as f64);
            if b > 0 {
                drafting += 1;
                late += (step >= 3000) as usize;
            }
        }
        assert_eq!(c.best(CURVE_CTX, 0), 0);
        // 12 warm-up steps, then 3 losing arms retried at 24 × 2^k steps
        // (up to 768): ~45, where a retry every 24 steps made 262.
        assert!(drafting < 60, "{drafting} drafting steps of 6000");
        assert!(late > 0, "the drafter was never retried late");
        // Now drafting pays (free, 4 tokens a step): a retry finds it.
        for _ in 0..4000 {
            let b = c.choose(CURVE_CTX, 0);
            c.record(0, b, if b > 0 { 4 } else { 1 }, b + 1, 0.0);
        }
        assert!(c.best(CURVE_CTX, 0) > 0);
    }

    /// A drafter whose cache fell behind (a draft model skipped by plain
    /// steps, or a request's prompt it never ran) is tried only while the
    /// catch-up costs at most a tenth of the request's remaining plain
    /// time, and taken over plain only where its gain, over the steps
    /// left, pays the catch-up back.
    #[test]
    fn a_costly_catch_up_keeps_a_drafter_off() {
        let cost = curve(&[10., 11., 12., 14., 25., 50.]);
        // 64 tokens left at 10 ms: 640 ms plain, a look may spend 64.
        let big = CatchUp {
            ms: 100.0,
            remaining: 64,
        };
        let mut c = BudgetController::new(&cost, 8);
        for _ in 0..200 {
            let b = c.choose_in(CURVE_CTX, 0, Batch::default(), usize::MAX, big);
            assert_eq!(b, 0, "a 100-ms catch-up for 640 ms of plain decoding");
            c.record(0, b, 1, 1, 0.0);
        }
        let small = CatchUp {
            ms: 30.0,
            remaining: 64,
        };
        assert!(c.choose_in(CURVE_CTX, 0, Batch::default(), usize::MAX, small) > 0);

        // Warmed up: the 4-node arm yields 3 tokens per 12 ms, plain 1 per
        // 10 ms. Caught up it wins; 50 ms behind with 6 tokens left (2 of
        // its steps to spread the catch-up over: 25 ms each) it does not.
        let mut c = BudgetController::new(&cost, 4);
        for _ in 0..WARMUP_STEPS * 3 {
            let b = c.choose(CURVE_CTX, 0);
            c.record(0, b, [1, 2, 3][b / 2], b + 1, 0.0);
        }
        assert_eq!(c.best(CURVE_CTX, 0), 4);
        let behind = |remaining| CatchUp {
            ms: 50.0,
            remaining,
        };
        assert_eq!(
            c.best_in(CURVE_CTX, 0, Batch::default(), usize::MAX, behind(6)),
            0
        );
        assert_eq!(
            c.best_in(CURVE_CTX, 0, Batch::default(), usize::MAX, behind(600)),
            4
        );
    }

    /// The gate of a draft model beside free sources weighs the draft's
    /// arms against what the free sources alone realized (its arm 0), not
    /// against plain decoding: a draft that beats plain but not the free
    /// hybrid is turned off; one that beats both is kept on.
    #[test]
    fn the_gate_weighs_a_draft_model_against_the_free_sources() {
        let cost = curve(&[10., 11., 12., 14., 25., 50.]);
        let run = |draft_tokens: usize| {
            let mut c = BudgetController::new(&cost, 8);
            let mut on = 0;
            for _ in 0..600 {
                let g = c.gate_mut().choose_in(
                    CURVE_CTX,
                    0,
                    Batch::default(),
                    usize::MAX,
                    CatchUp::default(),
                );
                if g > 0 {
                    // The draft's steps: 6 ms of draft forwards each.
                    on += 1;
                    c.gate_mut().record(0, g, draft_tokens, g + 1, 6.0);
                } else {
                    // The free sources: 2 tokens from 5 rows (12 ms), 1 ms
                    // of drafting: 0.15 tokens/ms, plain's 0.10.
                    c.gate_mut().record(0, 0, 2, 5, 1.0);
                }
            }
            (on, c.gate().map(|g| g.best(CURVE_CTX, 0)))
        };
        // 2 tokens per 17+ ms: above plain (0.12/ms), below the free arm.
        let (on, best) = run(2);
        assert_eq!(best, Some(0));
        assert!(
            on < 60,
            "a draft that loses to the free sources ran {on} of 600 steps"
        );
        // 4 tokens per 17 ms: 0.24/ms.
        let (on, best) = run(4);
        assert!(best > Some(0), "{best:?}");
        assert!(on > 500, "a draft that pays ran only {on} of 600 steps");
        // The gate's arms are its own: the budget arms are untouched.
        let mut c = BudgetController::new(&cost, 8);
        c.gate_mut().record(0, 4, 5, 5, 0.0);
        assert_eq!(c.expected(0, 4), Some((5.0, 1.0)));
        assert_eq!(c.gate().and_then(|g| g.expected(0, 4)), Some((5.0, 5.0)));
    }

    #[test]
    fn interpolates_costs() {
        let c = with_slopes(&[10., 12., 14., 18., 26., 42.], &[1., 1., 2., 4., 8., 16.]);
        assert_eq!(c.cost_ms(1.0, CURVE_CTX), 10.0);
        assert_eq!(c.cost_ms(2.0, CURVE_CTX), 11.0);
        assert_eq!(c.cost_ms(9.0, CURVE_CTX), 18.0);
        assert_eq!(c.cost_ms(13.0, CURVE_CTX), 22.0);
        assert_eq!(c.cost_ms(1.0, 0), 10.0);
        assert_eq!(c.cost_ms(1.0, CURVE_CTX + 2000), 12.0);
        assert_eq!(c.cost_ms(13.0, CURVE_CTX + 1000), 28.0);
    }

    #[test]
    fn long_contexts_favour_smaller_trees() {
        // At the curve's context an 8-node budget pays; the attention of
        // big trees grows with the context until it no longer does.
        let cost = with_slopes(
            &[10., 11., 12., 14., 25., 50.],
            &[0.5, 0.7, 1.2, 2.5, 6.0, 12.0],
        );
        let mut c = BudgetController::new(&cost, 32);
        let mat =
            |b: usize| [1, 2, 2, 3, 3, 3][CANDIDATE_BUDGETS.iter().position(|&x| x == b).unwrap()];
        for _ in 0..400 {
            let b = c.choose(CURVE_CTX, 0);
            c.record(0, b, mat(b), b + 1, 0.0);
        }
        assert_eq!(c.best(CURVE_CTX, 0), 8);
        // 8k: budget 8 costs 14 + 2.5 × 7.9 ≈ 33.8 ms for 3 tokens (89/s),
        // budget 2 costs 11 + 0.7 × 7.9 ≈ 16.5 ms for 2 (121/s).
        assert_eq!(c.best(8192, 0), 2);
    }

    #[test]
    fn respects_the_max_budget() {
        let mut c = BudgetController::new(&curve(&[10., 10., 10., 10., 10., 10.]), 4);
        for _ in 0..100 {
            let b = c.choose(CURVE_CTX, 0);
            assert!(b <= 4);
            c.record(0, b, b + 1, b + 1, 0.0);
        }
        assert_eq!(c.best(CURVE_CTX, 0), 4);
    }

    #[test]
    fn classes_learn_their_own_budgets() {
        // Class 0: small trees accept ~2 tokens, big ones no more. Class 2:
        // a long confident copy, where a 64-node chain is accepted nearly
        // whole. One shared mean would pick one budget for both.
        let cost = curve(&[10., 11., 12., 14., 20., 30., 45.]);
        let mut c = BudgetController::with_long(&cost, 16, 64);
        let mat = |class: usize, b: usize| match class {
            0 => 1 + (b > 0) as usize,
            _ => 1 + b * 9 / 10,
        };
        for step in 0..2000 {
            let class = if step % 3 == 0 { 2 } else { 0 };
            let b = c.choose(CURVE_CTX, class);
            assert!(b <= if class == 0 { 16 } else { 64 });
            c.record(class, b, mat(class, b), b + 1, 0.0);
        }
        assert_eq!(c.best(CURVE_CTX, 0), 2);
        assert_eq!(c.best(CURVE_CTX, 2), 64);
        // Class 1 was never seen: it still starts from its warm-up.
        assert_eq!(c.choose(CURVE_CTX, 1), 0);
        // Out-of-range classes fold into the last.
        assert_eq!(c.best(CURVE_CTX, 9), 64);
    }
}
