//! Prompt lookup decoding (PLD): if the last few tokens occurred earlier in
//! the sequence, propose what followed them then, as a single chain.
//!
//! Input-grounded tasks (code editing, summaries, RAG) copy long spans of
//! the prompt, and this catches them with no model at all.

use std::collections::HashMap;
use std::ops::Range;

use crate::draft::{DraftTree, Drafter};

/// Default longest n-gram matched.
pub const DEFAULT_MAX_NGRAM: usize = 4;
/// Default shortest n-gram matched.
pub const DEFAULT_MIN_NGRAM: usize = 1;
/// Default chain length: `num_pred_tokens = 10` of the original PLD
/// implementation (also transformers' `prompt_lookup_num_tokens` example).
pub const DEFAULT_MAX_CHAIN: usize = 10;

/// The prompt-lookup drafter.
///
/// Keeps a hash index from every n-gram (min..=max tokens) of the sequence to
/// the position right after its most recent occurrence, updated
/// incrementally as the sequence grows, so a step costs O(new tokens)
/// instead of a rescan of the whole context.
#[derive(Debug, Clone)]
pub struct PromptLookup {
    min_ngram: usize,
    max_ngram: usize,
    max_chain: usize,
    /// The tokens indexed so far (a prefix of the current context).
    seen: Vec<u32>,
    /// n-gram hash -> end of its latest occurrence (the continuation start).
    index: HashMap<u64, u32>,
}

impl Default for PromptLookup {
    fn default() -> Self {
        Self::new(DEFAULT_MIN_NGRAM, DEFAULT_MAX_NGRAM, DEFAULT_MAX_CHAIN)
    }
}

impl PromptLookup {
    /// Matches n-grams of `min_ngram..=max_ngram` tokens (longest first) and
    /// proposes up to `max_chain` tokens. Out-of-order or zero bounds are
    /// clamped to something sensible (`min >= 1`, `max >= min`).
    pub fn new(min_ngram: usize, max_ngram: usize, max_chain: usize) -> Self {
        let min_ngram = min_ngram.max(1);
        PromptLookup {
            min_ngram,
            max_ngram: max_ngram.max(min_ngram),
            max_chain,
            seen: Vec::new(),
            index: HashMap::new(),
        }
    }

    pub fn min_ngram(&self) -> usize {
        self.min_ngram
    }

    pub fn max_ngram(&self) -> usize {
        self.max_ngram
    }

    pub fn max_chain(&self) -> usize {
        self.max_chain
    }

    /// Forgets the indexed sequence.
    pub fn reset(&mut self) {
        self.seen.clear();
        self.index.clear();
    }

    /// The continuation of the longest matching suffix of `context`, as a
    /// range of `context` (at most `max_chain` tokens), or `None`.
    pub fn find(&mut self, context: &[u32]) -> Option<Range<usize>> {
        self.find_match(context).map(|(r, _)| r)
    }

    /// [`PromptLookup::find`] with the length of the n-gram that matched
    /// (a longer match is likelier to continue).
    pub fn find_match(&mut self, context: &[u32]) -> Option<(Range<usize>, usize)> {
        self.update(context);
        let len = context.len();
        for n in (self.min_ngram..=self.max_ngram).rev() {
            // The suffix and one earlier occurrence with a continuation.
            if len < n + 1 {
                continue;
            }
            let suffix = &context[len - n..];
            let Some(&end) = self.index.get(&ngram_key(suffix)) else {
                continue;
            };
            let end = end as usize;
            // Guard against a hash collision.
            if end < n || end >= len || &context[end - n..end] != suffix {
                continue;
            }
            return Some((end..(end + self.max_chain).min(len), n));
        }
        None
    }

    /// Indexes the part of `context` not seen yet. If `context` does not
    /// extend what was indexed (a new request without [`Drafter::start`]),
    /// starts over.
    fn update(&mut self, context: &[u32]) {
        if !context.starts_with(&self.seen) {
            self.reset();
        }
        // An n-gram ending at `end` is indexed once the token at `end` (its
        // continuation) exists, so the current suffix never matches itself.
        let first = self.seen.len().max(1);
        for end in first..context.len() {
            for n in self.min_ngram..=self.max_ngram.min(end) {
                self.index
                    .insert(ngram_key(&context[end - n..end]), end as u32);
            }
        }
        self.seen.extend_from_slice(&context[self.seen.len()..]);
    }
}

/// 64-bit hash of an n-gram, length mixed in (collisions are checked by the
/// caller, so this only needs to spread well).
fn ngram_key(gram: &[u32]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64 ^ gram.len() as u64;
    for &t in gram {
        h = (h ^ t as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 32;
    }
    h
}

impl Drafter for PromptLookup {
    fn name(&self) -> &'static str {
        "pld"
    }

    fn start(&mut self, _prompt: &[u32]) {
        self.reset();
    }

    fn propose(&mut self, context: &[u32], max_draft: usize) -> DraftTree {
        let mut tree = DraftTree::root(context.last().copied().unwrap_or(0));
        if max_draft == 0 {
            return tree;
        }
        if let Some(range) = self.find(context) {
            let mut parent = 0;
            for &t in context[range].iter().take(max_draft) {
                parent = tree.push(parent, t);
            }
        }
        tree
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(p: &mut PromptLookup, ctx: &[u32], max_draft: usize) -> Vec<u32> {
        let t = p.propose(ctx, max_draft);
        t.validate().unwrap();
        assert_eq!(t.tokens[0], *ctx.last().unwrap());
        // A chain: every node is the child of the one before.
        for i in 1..t.len() {
            assert_eq!(t.parents[i], Some(i - 1));
        }
        t.tokens[1..].to_vec()
    }

    #[test]
    fn longest_ngram_wins() {
        let mut p = PromptLookup::default();
        // Suffix "1 2 3": the 1-gram "3" last occurred before 50, the
        // 3-gram "1 2 3" before 40.
        let ctx = [1, 2, 3, 40, 41, 9, 3, 50, 51, 1, 2, 3];
        assert_eq!(chain(&mut p, &ctx, 10), vec![40, 41, 9, 3, 50, 51, 1, 2, 3]);
    }

    #[test]
    fn most_recent_occurrence_wins() {
        let mut p = PromptLookup::default();
        let ctx = [7, 8, 1, 7, 8, 2, 7, 8];
        assert_eq!(chain(&mut p, &ctx, 10), vec![2, 7, 8]);
    }

    #[test]
    fn no_match_gives_the_root_only() {
        let mut p = PromptLookup::default();
        assert_eq!(p.propose(&[1, 2, 3, 4], 8), DraftTree::root(4));
        assert_eq!(p.propose(&[5], 8), DraftTree::root(5));
        assert_eq!(p.propose(&[], 8), DraftTree::root(0));
        // min_ngram 2: a single repeated token is not enough.
        let mut p = PromptLookup::new(2, 4, 10);
        assert_eq!(p.propose(&[1, 9, 5, 1], 8), DraftTree::root(1));
        assert_eq!(chain(&mut p, &[1, 9, 5, 1, 9], 8), vec![5, 1, 9]);
    }

    #[test]
    fn chain_is_bounded() {
        let mut p = PromptLookup::new(1, 4, 3);
        let ctx = [1, 2, 3, 4, 5, 6, 7, 1];
        assert_eq!(chain(&mut p, &ctx, 10), vec![2, 3, 4]);
        assert_eq!(chain(&mut p, &ctx, 2), vec![2, 3]);
        assert_eq!(chain(&mut p, &ctx, 0), Vec::<u32>::new());
        // The continuation stops at the end of the context.
        let mut p = PromptLookup::default();
        assert_eq!(chain(&mut p, &[5, 5, 5], 10), vec![5]);
    }

    #[test]
    fn incremental_index_matches_a_fresh_one() {
        // Grow a pseudo-random sequence one token (or several) at a time and
        // compare with a fresh lookup and with a brute-force scan.
        let mut seq: Vec<u32> = Vec::new();
        let mut x = 12345u32;
        let mut inc = PromptLookup::default();
        for step in 0..400 {
            for _ in 0..1 + step % 3 {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                seq.push((x >> 16) % 6);
            }
            let got = inc.find(&seq);
            let fresh = PromptLookup::default().find(&seq);
            assert_eq!(got, fresh, "step {step}");
            assert_eq!(got, brute(&seq, 1, 4, 10), "step {step}");
        }
        // A different sequence (new request without start) re-indexes.
        assert_eq!(inc.find(&[3, 4, 3]), Some(1..3));
    }

    fn brute(ctx: &[u32], min: usize, max: usize, chain: usize) -> Option<Range<usize>> {
        let len = ctx.len();
        for n in (min..=max).rev() {
            if len < n + 1 {
                continue;
            }
            let suffix = &ctx[len - n..];
            for end in (n..len).rev() {
                if &ctx[end - n..end] == suffix {
                    return Some(end..(end + chain).min(len));
                }
            }
        }
        None
    }

    #[test]
    fn start_resets() {
        let mut p = PromptLookup::default();
        assert!(p.find(&[1, 2, 1]).is_some());
        p.start(&[9]);
        assert_eq!(p.find(&[9, 8]), None);
    }
}
