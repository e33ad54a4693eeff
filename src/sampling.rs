//! Turning logits into the next token, exactly the same way in plain decoding
//! and in speculative verification (which is what makes sampling lossless:
//! the verifier draws each token from this very distribution).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Decoding parameters, with llama.cpp's meanings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// 0 = disabled.
    pub top_k: usize,
    /// 1.0 = disabled.
    pub top_p: f32,
    /// 0.0 = disabled.
    pub min_p: f32,
    /// 1.0 = disabled. Divides positive logits (multiplies negative ones) of
    /// tokens seen in the last `repeat_last_n` tokens of the context.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Invalid(what.to_string()));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty must be a finite number > 0");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Index of the largest logit (the first one on ties, as llama.cpp does).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// Top-`k` (index, logit) pairs, largest first.
pub fn top_k_logits(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    // One pass with a small sorted buffer: k is tiny (<= 64) next to the vocabulary.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in logits.iter().enumerate() {
        if best.len() == k && v <= best[k - 1].1 {
            continue;
        }
        let pos = best.partition_point(|&(_, b)| b >= v);
        best.insert(pos, (i as u32, v));
        best.truncate(k);
    }
    best
}

/// Top-`k` successors with their softmax probabilities (temperature 1).
pub fn top_k_probs(logits: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let top = top_k_logits(logits, k);
    let max = top.first().map(|t| t.1).unwrap_or(0.0);
    let sum = crate::model::lanes::sum_exp(logits, max);
    let ids = top.iter().map(|t| t.0).collect();
    let probs = top.iter().map(|t| (t.1 - max).exp() / sum).collect();
    (ids, probs)
}

/// Difference between the two largest softmax probabilities. Below
/// [`NEAR_TIE`] two correct implementations may legitimately pick different
/// argmaxes (float summation order), so equality tests stop there.
pub fn top2_margin(logits: &[f32]) -> f32 {
    let top = top_k_logits(logits, 2);
    if top.len() < 2 {
        return 1.0;
    }
    let max = top[0].1;
    let sum = crate::model::lanes::sum_exp(logits, max);
    (1.0 - (top[1].1 - max).exp()) / sum
}

/// The threshold llama.cpp's golden files use for a near-tie.
pub const NEAR_TIE: f32 = 0.02;

/// Draws tokens. Owns the random state so a seed reproduces a whole run.
#[derive(Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies the repetition penalty in place (as llama.cpp: each distinct
    /// token in the window once).
    fn penalize(&self, logits: &mut [f32], context: &[u32]) {
        let p = self.params.repeat_penalty;
        if p == 1.0 || self.params.repeat_last_n == 0 {
            return;
        }
        let start = context.len().saturating_sub(self.params.repeat_last_n);
        let mut seen = std::collections::HashSet::new();
        for &t in &context[start..] {
            if (t as usize) < logits.len() && seen.insert(t) {
                let v = &mut logits[t as usize];
                *v = if *v > 0.0 { *v / p } else { *v * p };
            }
        }
    }

    /// The next token after `context` given its `logits`.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let penalized;
        let logits = if self.params.repeat_penalty != 1.0 {
            let mut l = logits.to_vec();
            self.penalize(&mut l, context);
            penalized = l;
            &penalized[..]
        } else {
            logits
        };
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let r: f32 = self.rng.random();
        let candidates = self.distribution(logits);
        let mut acc = 0.0;
        for &(id, p) in candidates.iter() {
            acc += p;
            if r < acc {
                return id;
            }
        }
        candidates.last().map(|c| c.0).unwrap_or(0)
    }

    /// The processed distribution after `context` (repetition penalty,
    /// temperature, top-k, top-p, min-p): what [`Sampler::sample`] draws
    /// from, as (token, probability) pairs summing to 1.
    pub fn processed(&mut self, logits: &[f32], context: &[u32]) -> Vec<(u32, f32)> {
        if self.params.repeat_penalty != 1.0 {
            let mut l = logits.to_vec();
            self.penalize(&mut l, context);
            return self.distribution(&l).to_vec();
        }
        self.distribution(logits).to_vec()
    }

    /// A uniform draw in [0, 1) from this sampler's stream.
    pub fn uniform(&mut self) -> f32 {
        self.rng.random()
    }

    /// An index drawn in proportion to `weights` (not necessarily summing to
    /// 1; non-negative, not all zero, or the last index comes back).
    pub fn draw_weighted(&mut self, weights: &[f32]) -> usize {
        let total: f32 = weights.iter().sum();
        let r = self.uniform() * total;
        let mut acc = 0.0;
        let mut last = weights.len().saturating_sub(1);
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                acc += w;
                last = i;
                if r < acc {
                    return i;
                }
            }
        }
        last
    }

    /// The processed distribution (temperature, top-k, top-p, min-p), as
    /// (token, probability) pairs summing to 1: sorted by probability
    /// (ties by id) whenever top-k, top-p or min-p truncate it; in vocabulary
    /// order when nothing truncates (the whole vocabulary is kept, and its
    /// order does not change the distribution a draw follows).
    ///
    /// Without top-k the vocabulary (150k entries) is not sorted per token:
    /// min-p is a filter, and top-p sorts only as many of the most probable
    /// entries as it needs (partial selection, growing by 4x until their mass
    /// reaches top-p).
    fn distribution(&mut self, logits: &[f32]) -> &[(u32, f32)] {
        let t = self.params.temperature;
        let cand = &mut self.scratch;
        cand.clear();
        let truncated_by_k = self.params.top_k > 0 && self.params.top_k < logits.len();
        if truncated_by_k {
            cand.extend(top_k_logits(logits, self.params.top_k));
        } else {
            cand.extend(logits.iter().enumerate().map(|(i, &v)| (i as u32, v)));
        }
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for c in cand.iter_mut() {
            c.1 = ((c.1 - max) / t).exp();
            sum += c.1;
        }
        for c in cand.iter_mut() {
            c.1 /= sum;
        }
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.params.min_p > 0.0 {
            let top = cand.iter().map(|c| c.1).fold(0.0, f32::max);
            let floor = top * self.params.min_p;
            // Keeps at most 1 / floor entries, so the sort below is small.
            cand.retain(|c| c.1 >= floor);
            if !truncated_by_k {
                cand.sort_by(by_prob);
            }
        }
        if self.params.top_p < 1.0 {
            let sorted = truncated_by_k || self.params.min_p > 0.0;
            let len = cand.len();
            let mut k = if sorted { len } else { 64.min(len) };
            loop {
                if !sorted {
                    if k < len {
                        cand.select_nth_unstable_by(k - 1, by_prob);
                    }
                    cand[..k].sort_by(by_prob);
                }
                let mut acc = 0.0;
                let keep = cand[..k].iter().position(|c| {
                    acc += c.1;
                    acc >= self.params.top_p
                });
                if let Some(i) = keep {
                    cand.truncate(i + 1);
                    break;
                }
                if k == len {
                    break;
                }
                k = (k * 4).min(len);
            }
        }
        let sum: f32 = cand.iter().map(|c| c.1).sum();
        for c in cand.iter_mut() {
            c.1 /= sum;
        }
        cand
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_complete() {
        let l = [0.1, 3.0, -1.0, 2.0, 3.0, 0.5];
        assert_eq!(
            top_k_logits(&l, 3),
            vec![(1, 3.0), (4, 3.0), (3, 2.0)],
            "ties keep the lower index first"
        );
        let (ids, probs) = top_k_probs(&l, 2);
        assert_eq!(ids, vec![1, 4]);
        assert!((probs[0] - probs[1]).abs() < 1e-6);
        assert_eq!(argmax(&l), 1);
    }

    #[test]
    fn greedy_with_penalty_changes_argmax() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..Default::default()
        });
        let l = [1.0, 3.0, 2.0];
        assert_eq!(s.sample(&l, &[]), 1);
        assert_eq!(s.sample(&l, &[1]), 2);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        });
        let l = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let n = 20000;
        let ones = (0..n).filter(|_| s.sample(&l, &[]) == 1).count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.02, "p = {p}");
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            seed: 1,
            ..Default::default()
        });
        let l = [0.0, 0.1, 5.0];
        for _ in 0..50 {
            assert_eq!(s.sample(&l, &[]), 2);
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&l, &[]), 2);
        }
    }

    /// The distribution without a full sort equals the one the full sort
    /// gave (the same pairs, in the same order wherever it truncates).
    #[test]
    fn partial_selection_matches_the_full_sort() {
        fn reference(p: &SamplingParams, logits: &[f32]) -> Vec<(u32, f32)> {
            let mut cand: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as u32, v))
                .collect();
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if p.top_k > 0 {
                cand.truncate(p.top_k);
            }
            let max = cand[0].1;
            let sum: f32 = cand
                .iter()
                .map(|c| ((c.1 - max) / p.temperature).exp())
                .sum();
            for c in cand.iter_mut() {
                c.1 = ((c.1 - max) / p.temperature).exp() / sum;
            }
            if p.min_p > 0.0 {
                let floor = cand[0].1 * p.min_p;
                cand.retain(|c| c.1 >= floor);
            }
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                if let Some(i) = cand.iter().position(|c| {
                    acc += c.1;
                    acc >= p.top_p
                }) {
                    cand.truncate(i + 1);
                }
            }
            let sum: f32 = cand.iter().map(|c| c.1).sum();
            cand.iter().map(|c| (c.0, c.1 / sum)).collect()
        }
        let mut rng = StdRng::seed_from_u64(7);
        for trial in 0..60 {
            let n = [5, 300, 5000][trial % 3];
            // Flat and peaked logits, with ties (rounded values).
            let scale = [0.5f32, 4.0, 12.0][(trial / 3) % 3];
            let logits: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() * scale * 8.0).round() / 8.0)
                .collect();
            for (top_k, top_p, min_p) in [
                (0, 0.9, 0.0),
                (0, 0.999, 0.0),
                (0, 1.0, 0.05),
                (0, 0.5, 0.01),
                (0, 1.0, 0.0),
                (40, 0.95, 0.0),
            ] {
                let p = SamplingParams {
                    temperature: 0.8,
                    top_k,
                    top_p,
                    min_p,
                    ..Default::default()
                };
                let mut s = Sampler::new(p.clone());
                let mut got = s.distribution(&logits).to_vec();
                let mut want = reference(&p, &logits);
                if top_k == 0 && top_p == 1.0 && min_p == 0.0 {
                    got.sort_by_key(|c| c.0);
                    want.sort_by_key(|c| c.0);
                }
                // The probabilities are normalised by sums taken in another
                // order, so where top-p's cumulative mass crosses its
                // threshold within float rounding (flat distributions over
                // thousands of entries) the cut may move by a few entries:
                // allowed only when the mass between the two cuts is tiny.
                if got.len() != want.len() {
                    let (short, long) = (got.len().min(want.len()), got.len().max(want.len()));
                    let full = reference(
                        &SamplingParams {
                            top_p: 1.0,
                            ..p.clone()
                        },
                        &logits,
                    );
                    let between: f32 = full[short..long].iter().map(|c| c.1).sum();
                    assert!(
                        top_p < 1.0 && between < 2e-3,
                        "n {n} k {top_k} p {top_p} min_p {min_p}: {} vs {} entries",
                        got.len(),
                        want.len()
                    );
                }
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.0, w.0, "n {n} k {top_k} p {top_p} min_p {min_p}");
                    assert!((g.1 - w.1).abs() < 1e-4, "{g:?} vs {w:?}");
                }
            }
        }
    }

    #[test]
    fn validation() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
