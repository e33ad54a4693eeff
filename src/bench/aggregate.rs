//! Per-prompt records → per method × category figures, as Spec-Bench
//! computes them: a method's speedup is plain decoding's total time over the
//! method's total time on the same generations (a ratio of sums, so long
//! generations weigh more), tok/s is total tokens over total time, and MAT
//! is total accepted tokens over total steps.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::dataset::{category_rank, id_text};
use super::record::{Check, PromptRecord, BASELINE};

/// The category of the all-prompts row.
pub const OVERALL: &str = "overall";

/// Another engine's per-prompt figures (`--compare FILE`):
/// `{"name": "llama.cpp", "prompts": [{"question_id", "turn"?, "dataset"?, "tokens", "seconds"}]}`.
/// Without `turn` an entry covers every turn of the item; without `dataset`
/// it must match a question id in only one dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerFigures {
    pub name: String,
    pub prompts: Vec<PeerPrompt>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerPrompt {
    pub question_id: serde_json::Value,
    #[serde(default)]
    pub turn: Option<usize>,
    #[serde(default)]
    pub dataset: Option<String>,
    pub tokens: usize,
    pub seconds: f64,
}

/// The figures of one method over one category (or [`OVERALL`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Cell {
    pub method: String,
    pub category: String,
    /// Generations (turns × repeats) counted.
    pub generations: usize,
    pub new_tokens: usize,
    /// Tokens the steps accepted (new tokens plus end-of-generation tokens).
    pub mat_tokens: usize,
    pub steps: usize,
    /// Total wall time, seconds.
    pub seconds: f64,
    pub tok_s: f64,
    /// Mean accepted tokens per step (None for a peer, whose steps are unknown).
    pub mat: Option<f64>,
    /// Plain decoding's total time over the generations this method also ran.
    pub baseline_seconds: f64,
    /// This method's total time over those same generations.
    pub matched_seconds: f64,
    /// `baseline_seconds / matched_seconds`; None without a plain run to
    /// compare. For a peer: its tok/s over plain decoding's on the matched prompts.
    pub speedup: Option<f64>,
    pub accepted_per_depth: Vec<usize>,
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
    pub draft_ms: f64,
    pub verify_ms: f64,
    /// A draft model's forwards and retrievals.
    #[serde(default)]
    pub draft_model: crate::draft::DraftCounters,
    pub exact: usize,
    pub near_tie: usize,
    pub mismatch: usize,
    /// A peer's generations token-identical to treespec's plain decoding,
    /// and those that differ (see [`Check::PeerDiffers`]).
    #[serde(default)]
    pub peer_same: usize,
    #[serde(default)]
    pub peer_differs: usize,
    /// Of `peer_differs`: those whose first difference is where plain
    /// decoding's top-2 margin was below [`crate::sampling::NEAR_TIE`].
    #[serde(default)]
    pub peer_differs_near_tie: usize,
    /// Plain decoding's new tokens and time over the matched generations
    /// (the speedup is a ratio of tokens per second, which is the ratio of
    /// times when the outputs are identical, and stays fair when a peer's
    /// output has another length).
    #[serde(default)]
    pub baseline_tokens: usize,
    #[serde(default)]
    pub matched_tokens: usize,
}

/// Greedy-equality counts over every non-plain generation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LosslessSummary {
    pub exact: usize,
    pub near_tie: usize,
    pub mismatch: usize,
    pub sampled: usize,
    pub unchecked: usize,
    /// One line per mismatch: where and by which method.
    pub mismatches: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Aggregate {
    /// Methods in report order (plain first, then as given).
    pub methods: Vec<String>,
    /// Categories in Spec-Bench's order.
    pub categories: Vec<String>,
    /// One per method × category that has records.
    pub per_category: Vec<Cell>,
    /// One per method, over every category.
    pub overall: Vec<Cell>,
    /// The `--compare` peer's cells (per category, then overall), if any.
    pub peer: Vec<Cell>,
    /// Peer entries that matched no plain generation.
    pub peer_unmatched: usize,
    pub lossless: LosslessSummary,
}

impl Aggregate {
    pub fn cell(&self, method: &str, category: &str) -> Option<&Cell> {
        let pool = if category == OVERALL {
            &self.overall
        } else {
            &self.per_category
        };
        pool.iter()
            .chain(self.peer.iter())
            .find(|c| c.method == method && c.category == category)
    }
}

type Key = (String, String, usize, usize);

/// Aggregates `records`. `method_order` fixes the row order (methods found
/// only in the records follow it); plain decoding ("none") is the baseline.
pub fn aggregate(
    records: &[PromptRecord],
    method_order: &[String],
    peer: Option<&PeerFigures>,
) -> Aggregate {
    let mut methods: Vec<String> = Vec::new();
    for m in method_order
        .iter()
        .map(String::as_str)
        .chain(records.iter().map(|r| r.method.as_str()))
    {
        if !methods.iter().any(|x| x == m) {
            methods.push(m.to_string());
        }
    }
    // Plain first, as Spec-Bench lists its baseline row first.
    if let Some(i) = methods.iter().position(|m| m == BASELINE) {
        let b = methods.remove(i);
        methods.insert(0, b);
    }
    let mut categories: Vec<String> = Vec::new();
    for r in records {
        if !categories.contains(&r.category) {
            categories.push(r.category.clone());
        }
    }
    categories.sort_by_key(|c| category_rank(c));

    let baseline: HashMap<Key, (f64, usize)> = records
        .iter()
        .filter(|r| r.method == BASELINE)
        .map(|r| (r.key(), (r.wall_s, r.new_tokens)))
        .collect();

    let mut per_category = Vec::new();
    let mut overall = Vec::new();
    for m in &methods {
        let mine: Vec<&PromptRecord> = records.iter().filter(|r| &r.method == m).collect();
        for c in &categories {
            let in_cat: Vec<&PromptRecord> =
                mine.iter().copied().filter(|r| &r.category == c).collect();
            if !in_cat.is_empty() {
                per_category.push(cell(m, c, &in_cat, &baseline));
            }
        }
        if !mine.is_empty() {
            overall.push(cell(m, OVERALL, &mine, &baseline));
        }
    }

    let (peer_cells, peer_unmatched) = match peer {
        Some(p) => peer_cells(p, records, &categories),
        None => (Vec::new(), 0),
    };
    Aggregate {
        methods,
        categories,
        per_category,
        overall,
        peer: peer_cells,
        peer_unmatched,
        lossless: lossless_summary(records),
    }
}

fn cell(
    method: &str,
    category: &str,
    recs: &[&PromptRecord],
    baseline: &HashMap<Key, (f64, usize)>,
) -> Cell {
    let mut c = Cell {
        method: method.into(),
        category: category.into(),
        ..Default::default()
    };
    for r in recs {
        c.generations += 1;
        c.new_tokens += r.new_tokens;
        c.mat_tokens += r.mat_tokens;
        c.steps += r.steps;
        c.seconds += r.wall_s;
        c.drafted_tokens += r.drafted_tokens;
        c.accepted_tokens += r.accepted_tokens;
        c.draft_ms += r.draft_ms;
        c.verify_ms += r.verify_ms;
        c.draft_model.add(r.draft_model);
        if c.accepted_per_depth.len() < r.accepted_per_depth.len() {
            c.accepted_per_depth.resize(r.accepted_per_depth.len(), 0);
        }
        for (a, b) in c.accepted_per_depth.iter_mut().zip(&r.accepted_per_depth) {
            *a += b;
        }
        match r.check {
            Check::Exact => c.exact += 1,
            Check::NearTie => c.near_tie += 1,
            Check::Mismatch => c.mismatch += 1,
            Check::PeerSame => c.peer_same += 1,
            Check::PeerDiffers => {
                c.peer_differs += 1;
                if r.diff_margin.is_some_and(|m| m < crate::sampling::NEAR_TIE) {
                    c.peer_differs_near_tie += 1;
                }
            }
            _ => {}
        }
        if let Some(&(secs, tokens)) = baseline.get(&r.key()) {
            c.baseline_seconds += secs;
            c.baseline_tokens += tokens;
            c.matched_seconds += r.wall_s;
            c.matched_tokens += r.new_tokens;
        }
    }
    c.tok_s = ratio(c.new_tokens as f64, c.seconds).unwrap_or(0.0);
    c.mat = ratio(c.mat_tokens as f64, c.steps as f64);
    c.speedup = if c.baseline_seconds > 0.0 {
        let plain = ratio(c.baseline_tokens as f64, c.baseline_seconds);
        let mine = ratio(c.matched_tokens as f64, c.matched_seconds);
        match (plain, mine) {
            (Some(p), Some(m)) if p > 0.0 => Some(m / p),
            // Nothing generated on either side: fall back to the time ratio.
            _ => ratio(c.baseline_seconds, c.matched_seconds),
        }
    } else {
        None
    };
    c
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

/// Plain decoding's figures for one turn of one item, averaged over repeats.
#[derive(Default, Clone)]
struct PlainTurn {
    category: String,
    seconds: f64,
    tokens: f64,
    n: usize,
}

fn peer_cells(
    peer: &PeerFigures,
    records: &[PromptRecord],
    categories: &[String],
) -> (Vec<Cell>, usize) {
    // (dataset, question, turn) → plain figures summed over repeats.
    let mut plain: BTreeMap<(String, String, usize), PlainTurn> = BTreeMap::new();
    for r in records.iter().filter(|r| r.method == BASELINE) {
        let p = plain
            .entry((r.dataset.clone(), id_text(&r.question_id), r.turn))
            .or_default();
        p.category = r.category.clone();
        p.seconds += r.wall_s;
        p.tokens += r.new_tokens as f64;
        p.n += 1;
    }
    // category → (peer tokens, peer seconds, plain tokens, plain seconds, entries)
    let mut sums: BTreeMap<String, (f64, f64, f64, f64, usize)> = BTreeMap::new();
    let mut unmatched = 0;
    for e in &peer.prompts {
        let qid = id_text(&e.question_id);
        let hits: Vec<(&(String, String, usize), &PlainTurn)> = plain
            .iter()
            .filter(|((d, q, t), _)| {
                q == &qid
                    && e.dataset.as_ref().is_none_or(|ed| ed == d)
                    && e.turn.is_none_or(|et| et == *t)
            })
            .collect();
        let datasets: std::collections::BTreeSet<&String> =
            hits.iter().map(|(k, _)| &k.0).collect();
        if hits.is_empty() || datasets.len() > 1 || e.seconds <= 0.0 || !e.seconds.is_finite() {
            unmatched += 1;
            continue;
        }
        let (ps, pt) = hits.iter().fold((0.0, 0.0), |(s, t), (_, p)| {
            (s + p.seconds / p.n as f64, t + p.tokens / p.n as f64)
        });
        let s = sums.entry(hits[0].1.category.clone()).or_default();
        s.0 += e.tokens as f64;
        s.1 += e.seconds;
        s.2 += pt;
        s.3 += ps;
        s.4 += 1;
    }
    let mk = |category: &str, s: (f64, f64, f64, f64, usize)| {
        let tok_s = ratio(s.0, s.1).unwrap_or(0.0);
        let plain_tok_s = ratio(s.2, s.3);
        Cell {
            method: peer.name.clone(),
            category: category.into(),
            generations: s.4,
            new_tokens: s.0 as usize,
            seconds: s.1,
            tok_s,
            baseline_seconds: s.3,
            matched_seconds: s.1,
            speedup: plain_tok_s.and_then(|p| ratio(tok_s, p)),
            ..Default::default()
        }
    };
    let mut cells = Vec::new();
    let mut total = (0.0, 0.0, 0.0, 0.0, 0);
    for c in categories {
        if let Some(&s) = sums.get(c) {
            cells.push(mk(c, s));
            total = (
                total.0 + s.0,
                total.1 + s.1,
                total.2 + s.2,
                total.3 + s.3,
                total.4 + s.4,
            );
        }
    }
    if total.4 > 0 {
        cells.push(mk(OVERALL, total));
    }
    (cells, unmatched)
}

fn lossless_summary(records: &[PromptRecord]) -> LosslessSummary {
    let mut s = LosslessSummary::default();
    for r in records {
        match r.check {
            Check::Baseline => {}
            Check::Exact => s.exact += 1,
            Check::NearTie => s.near_tie += 1,
            Check::Sampled => s.sampled += 1,
            Check::Unchecked => s.unchecked += 1,
            // Another engine is compared, not held to losslessness.
            Check::PeerSame | Check::PeerDiffers => {}
            Check::Mismatch => {
                s.mismatch += 1;
                s.mismatches.push(format!(
                    "{} {} turn {} repeat {}: {} differs from plain decoding at token {} (plain top-2 margin {})",
                    r.dataset,
                    id_text(&r.question_id),
                    r.turn,
                    r.repeat,
                    r.method,
                    r.first_diff.map_or("?".into(), |d| d.to_string()),
                    r.diff_margin.map_or("?".into(), |m| format!("{m:.4}")),
                ));
            }
        }
    }
    s
}
