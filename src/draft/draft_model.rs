//! Drafting with a smaller model of the same vocabulary (llama.cpp `-md`,
//! vLLM `draft_model`): a chain (standard speculative decoding) or a tree
//! of several candidates per position (SpecInfer / MCSD), grown one
//! tree-masked draft forward per depth.
//!
//! The draft keeps its own KV cache in step with the target's sequence:
//! before each proposal it rolls back to the longest prefix it shares with
//! the context (the target's accepted path differs from what the draft
//! guessed past the first miss) and runs what is new, the accepted tokens
//! and the root, in ONE forward. The tree's nodes are appended as pending
//! entries level after level ([`crate::model::Decoder::forward_extend`]:
//! each level attends to its ancestors still pending) and dropped at the
//! end, so the draft's cache only ever holds the committed sequence.
//!
//! Tree growth, best first by the draft's path probability (the product of
//! its probabilities from the root): the draft accepts a node with roughly
//! that probability when it is calibrated to the target, so the most
//! probable candidates are the ones worth a verify row. At each depth the
//! `width` most probable new nodes are run through the draft and offer their
//! `width` most likely successors; nodes are added while the budget lasts
//! and their path probability is at least `p_min`. The budget (the node
//! count, from `--tree auto` or `--spec-max-nodes`) bounds the depth, hence
//! the number of draft forwards; the controller pays for them out of the
//! measured draft time of each step.
//!
//! Under sampling the candidates are *drawn* from the draft's processed
//! distribution (the target's sampling parameters), `width` per expanded
//! node without replacement, and handed to the verifier as a
//! [`Proposal`]: rejection sampling against it keeps the target's
//! distribution exactly and accepts a candidate with probability about
//! 1 - TV(target, draft), where a chosen (top-k) candidate is kept only
//! with its own target probability. The tree's shape is still chosen best
//! first by the drawn tokens' path probabilities.

use std::sync::Arc;

use crate::draft::retrieval::{RetrievalConfig, Working};
use crate::draft::{DraftTree, Drafter, Proposal};
use crate::error::{Error, Result};
use crate::model::{common_prefix_len, KvCache, LogitRows, Model};
use crate::sampling::{top_k_probs, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Path probability below which a draft node is not proposed. vLLM's
/// suffix decoding and its tree drafters use the same floor (0.1) on path
/// probability; unlike llama.cpp's `--draft-p-min`, which tests each
/// token's own probability, a path test also stops a chain after several
/// middling tokens (0.6⁵ ≈ 0.08), where acceptance has become unlikely.
pub const DEFAULT_P_MIN: f32 = 0.1;

/// Candidates per expanded node and nodes expanded per depth in tree mode:
/// MCSD and SpecInfer report most of the multi-candidate gain from the
/// first 2-4 candidates per position; 4 keeps a draft forward at most 4
/// rows (c(4)/c(1) ≈ 1.3 here).
pub const TREE_WIDTH: usize = 4;

/// Draft forwards per proposal at most (llama.cpp's `--draft-max` default).
pub const DEFAULT_MAX_DEPTH: usize = 16;

/// Under sampling, a proposal distribution keeps the draft's most probable
/// tokens only: any proposal keeps the output exact, so this only bounds
/// the memory a tree carries (64 entries, not 150k) at the cost of the mass
/// beyond them (a few percent at temperatures <= 1), which rejection then
/// leaves to the target's residual.
pub const PROPOSAL_TOP: usize = 64;

/// Salt of the draft's random stream: seeded from the request's seed, apart
/// from the verifier's (which plain sampling shares).
const DRAFT_SEED_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Debug, Clone)]
pub struct DraftModelConfig {
    /// 1 = a chain; more = a tree with this many candidates per expanded node.
    pub width: usize,
    pub p_min: f32,
    pub max_depth: usize,
    /// Under sampling, the draft's own temperature for its candidates
    /// (`None` or <= 0: the target's). Any value keeps the output exact; it
    /// only moves how often candidates are accepted.
    pub temperature: Option<f32>,
    /// SpecExtend's cross-model retrieval on long contexts
    /// (`--draft-retrieval`); `None`: the draft attends to everything.
    pub retrieval: Option<RetrievalConfig>,
}

impl Default for DraftModelConfig {
    fn default() -> Self {
        DraftModelConfig {
            width: 1,
            p_min: DEFAULT_P_MIN,
            max_depth: DEFAULT_MAX_DEPTH,
            temperature: None,
            retrieval: None,
        }
    }
}

/// A loaded draft model, shared by every drafter built from it.
#[derive(Clone)]
pub struct DraftModel(pub Arc<Model>);

impl std::fmt::Debug for DraftModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DraftModel({})", self.0.identity)
    }
}

/// Checks that the draft speaks the target's vocabulary: the same number of
/// tokens and the same bytes for every id (two vocabularies of one size can
/// still number their tokens differently, and then every draft would be
/// garbage to the target).
pub fn check_vocabularies(target: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    let (a, b) = (target.vocab_size(), draft.vocab_size());
    if a != b {
        return Err(Error::Invalid(format!(
            "the draft model's vocabulary has {b} tokens, the target's {a}: \
             a draft model must share the target's tokenizer"
        )));
    }
    for id in 0..a as u32 {
        let (x, y) = (target.piece(id).ok(), draft.piece(id).ok());
        if x != y {
            let show = |p: Option<&[u8]>| p.map(|p| format!("{:?}", String::from_utf8_lossy(p)));
            return Err(Error::Invalid(format!(
                "the draft model's vocabulary differs from the target's at token {id} \
                 ({} in the target, {} in the draft): a draft model must share the \
                 target's tokenizer",
                show(x).unwrap_or_else(|| "none".into()),
                show(y).unwrap_or_else(|| "none".into()),
            )));
        }
    }
    Ok(())
}

#[derive(Clone)]
pub struct ModelDrafter {
    model: Arc<Model>,
    cfg: DraftModelConfig,
    /// Ids the target accepts (its embedding rows): a draft with a larger
    /// padded vocabulary never proposes beyond them.
    target_vocab: usize,
    /// One draft KV cache per sequence drafted for recently: a server
    /// steps several sequences in turn (continuous batching), and one cache
    /// would be re-prefilled with another sequence's whole context at every
    /// step. [`ModelDrafter::sync`] picks the cache sharing the longest
    /// prefix with the context, else the least recently used one.
    caches: Vec<DraftCache>,
    /// The cache the current step drafts with.
    current: usize,
    tick: u64,
    /// What the draft has run (forwards, retrievals), for stats.
    pub counters: crate::draft::DraftCounters,
    /// Set under sampling: candidates are drawn, not chosen.
    sampler: Option<Sampler>,
    warned: bool,
    /// The largest budget asked for so far: a step's own sync runs at most
    /// the tokens the previous step accepted (budget + 1); a longer one is
    /// a catch-up ([`crate::draft::DraftCounters::catch_ups`]).
    max_budget: usize,
}

/// Draft caches kept at most: twice the server's default slot count, so a
/// default server never evicts a running sequence's cache (caches grow as
/// they fill, so unused ones cost nothing).
pub const MAX_DRAFT_CACHES: usize = 8;

#[derive(Clone)]
struct DraftCache {
    /// Every position of the sequence.
    cache: KvCache,
    /// The tokens `cache` holds, in order.
    cached: Vec<u32>,
    used: u64,
    /// With retrieval, on a long context: what the draft attends to.
    working: Option<Working>,
    /// Proposals since the last retrieval.
    since_retrieval: usize,
}

impl DraftCache {
    fn new(cache: KvCache) -> Self {
        DraftCache {
            cache,
            cached: Vec::new(),
            used: 0,
            working: None,
            since_retrieval: usize::MAX,
        }
    }

    /// Leading tokens of `seq` the cache holds.
    fn shared(&self, seq: &[u32]) -> usize {
        common_prefix_len(&self.cached, seq).min(self.cache.len())
    }

    /// Positions of the sequence held (the next token's position).
    fn len(&self) -> usize {
        self.cache.len()
    }

    /// The cache the draft's forwards run on.
    fn active(&mut self) -> &mut KvCache {
        match &mut self.working {
            Some(w) => &mut w.cache,
            None => &mut self.cache,
        }
    }

    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
        self.cached.truncate(len);
        self.working = self.working.take().and_then(|w| w.truncate(len));
    }

    /// After a forward on the working cache committed its last `n`
    /// entries: the same entries into the full cache.
    fn copy_back(&mut self, n: usize) -> Result<()> {
        if let Some(w) = &self.working {
            let end = w.cache.len();
            self.cache.append_from(&w.cache, end - n..end)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ModelDrafter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelDrafter")
            .field("model", &self.model.identity)
            .field("cfg", &self.cfg)
            .field("caches", &self.caches.len())
            .finish()
    }
}

impl ModelDrafter {
    pub fn new(model: DraftModel, cfg: DraftModelConfig, target_vocab: usize) -> Self {
        ModelDrafter {
            model: model.0,
            cfg: DraftModelConfig {
                width: cfg.width.max(1),
                ..cfg
            },
            target_vocab,
            caches: Vec::new(),
            current: 0,
            tick: 0,
            counters: Default::default(),
            sampler: None,
            warned: false,
            max_budget: 0,
        }
    }

    pub fn config(&self) -> &DraftModelConfig {
        &self.cfg
    }

    /// Brings the cache to hold exactly `seq`, reusing the longest common
    /// prefix; returns the draft's logits after `seq`'s last token when
    /// `want_logits` (that token is then always run, even if cached).
    fn sync(&mut self, seq: &[u32], want_logits: bool) -> Result<Option<Vec<f32>>> {
        self.select(seq);
        let dc = &mut self.caches[self.current];
        let mut keep = dc.shared(seq);
        if want_logits && keep == seq.len() {
            keep = seq.len().saturating_sub(1);
        }
        dc.truncate(keep);
        let dec = &self.model.decoder;
        let mut last = None;
        let rest = &seq[keep..];
        let catch_up = rest.len() > self.max_budget + 1;
        let t0 = std::time::Instant::now();
        let chunks = rest.len().div_ceil(crate::engine::PREFILL_CHUNK);
        for (k, chunk) in rest.chunks(crate::engine::PREFILL_CHUNK).enumerate() {
            let base = dc.len();
            let pos: Vec<usize> = (base..base + chunk.len()).collect();
            let par: Vec<Option<usize>> = (0..chunk.len()).map(|i| i.checked_sub(1)).collect();
            let want = if want_logits && k + 1 == chunks {
                LogitRows::Last
            } else {
                LogitRows::None
            };
            let cache = dc.active();
            let l = dec.forward(cache, chunk, &pos, &par, want)?;
            cache.keep_all();
            dc.copy_back(chunk.len())?;
            dc.cached.extend_from_slice(chunk);
            self.counters.model_forwards += 1;
            self.counters.model_tokens += chunk.len() as u64;
            if want == LogitRows::Last {
                last = Some(l.row(0).to_vec());
            }
        }
        if catch_up {
            self.counters.catch_ups += 1;
            self.counters.catch_up_tokens += rest.len() as u64;
            self.counters.catch_up_us += t0.elapsed().as_micros() as u64;
        }
        Ok(last)
    }

    /// Tokens of `seq` the cache [`ModelDrafter::select`] would pick lacks.
    fn lag(&self, seq: &[u32]) -> usize {
        let held = self.caches.iter().map(|c| c.shared(seq)).max().unwrap_or(0);
        seq.len() - held
    }

    /// Makes `current` the cache to draft `seq` with: the longest one whose
    /// tokens all start `seq` (the sequence it drafted for has moved on);
    /// else, while there is room, a new one starting from the longest
    /// shared prefix (copied: two chats behind one system prompt must not
    /// truncate each other's cache at every step); else the least recently
    /// used one.
    fn select(&mut self, seq: &[u32]) {
        self.tick += 1;
        let shared = |c: &DraftCache| c.shared(seq);
        let extends = (0..self.caches.len())
            .filter(|&i| shared(&self.caches[i]) == self.caches[i].cached.len())
            .max_by_key(|&i| (self.caches[i].cached.len(), self.caches[i].used));
        self.current = match extends {
            Some(i) => i,
            None if self.caches.len() < MAX_DRAFT_CACHES => {
                let longest = (0..self.caches.len()).max_by_key(|&i| shared(&self.caches[i]));
                let fresh = match longest {
                    Some(i) => {
                        let n = shared(&self.caches[i]);
                        let mut c = self.caches[i].clone();
                        c.truncate(n);
                        c
                    }
                    None => DraftCache::new(
                        self.model
                            .decoder
                            .new_cache(self.model.config().context_length),
                    ),
                };
                self.caches.push(fresh);
                self.caches.len() - 1
            }
            None => (0..self.caches.len())
                .min_by_key(|&i| self.caches[i].used)
                .unwrap_or(0),
        };
        self.caches[self.current].used = self.tick;
    }

    fn grow(&mut self, context: &[u32], budget: usize) -> Result<DraftTree> {
        let root = *context.last().unwrap_or(&0);
        let mut tree = DraftTree::root(root);
        let Some(root_logits) = self.sync(context, true)? else {
            return Ok(tree);
        };
        let width = self.cfg.width;
        let base = self.caches[self.current].len(); // the root's position + 1
        let mut score = vec![1.0f32];
        // Per node run through the draft: its index among the pending
        // entries (the root is committed, so it has none).
        let mut slot: Vec<Option<usize>> = vec![None];
        let mut pending_parents: Vec<Option<usize>> = Vec::new();
        // Nodes whose successors are known: (node, draft logits after it).
        let mut frontier = vec![(0usize, root_logits)];
        for depth in 1.. {
            let mut cands: Vec<(usize, u32, f32)> = Vec::new();
            for (node, logits) in &frontier {
                let logits = &logits[..self.target_vocab.min(logits.len())];
                let Some(sampler) = self.sampler.as_mut() else {
                    let (ids, probs) = top_k_probs(logits, width);
                    for (id, p) in ids.into_iter().zip(probs) {
                        cands.push((*node, id, score[*node] * p));
                    }
                    continue;
                };
                // Drawn now, whatever the budget keeps below: the verifier
                // weighs every drawn token against `dist`.
                let dist = proposal_distribution(sampler, logits, context);
                let mut weights: Vec<f32> = dist.iter().map(|d| d.1).collect();
                let mut drawn = Vec::with_capacity(width);
                while drawn.len() < width && weights.iter().any(|&w| w > 0.0) {
                    let i = sampler.draw_weighted(&weights);
                    weights[i] = 0.0;
                    drawn.push(dist[i].0);
                    cands.push((*node, dist[i].0, score[*node] * dist[i].1));
                }
                tree.proposals.push(Proposal {
                    node: *node,
                    dist,
                    drawn,
                });
            }
            cands.sort_by(|a, b| b.2.total_cmp(&a.2));
            let mut added = Vec::new();
            for (parent, id, s) in cands {
                if tree.num_drafted() >= budget || s < self.cfg.p_min {
                    break;
                }
                added.push(tree.push(parent, id));
                score.push(s);
                slot.push(None);
            }
            if added.is_empty() || tree.num_drafted() >= budget || depth >= self.cfg.max_depth {
                break;
            }
            // Run the most probable new nodes to learn their successors.
            let expand: Vec<usize> = added.into_iter().take(width).collect();
            let toks: Vec<u32> = expand.iter().map(|&n| tree.tokens[n]).collect();
            let pos = vec![base - 1 + depth; expand.len()];
            for &n in &expand {
                let parent = tree.parents[n].and_then(|p| slot[p]);
                slot[n] = Some(pending_parents.len());
                pending_parents.push(parent);
            }
            let logits = self.model.decoder.forward_extend(
                self.caches[self.current].active(),
                &toks,
                &pos,
                &pending_parents,
                LogitRows::All,
            )?;
            self.counters.model_forwards += 1;
            self.counters.model_tokens += toks.len() as u64;
            frontier = expand
                .iter()
                .enumerate()
                .map(|(r, &n)| (n, logits.row(r).to_vec()))
                .collect();
        }
        Ok(tree)
    }
}

impl Drafter for ModelDrafter {
    fn name(&self) -> &'static str {
        if self.cfg.width > 1 {
            "draft-tree"
        } else {
            "draft"
        }
    }

    fn set_sampling(&mut self, params: &SamplingParams) {
        self.sampler = (!params.is_greedy()).then(|| {
            let temperature = match self.cfg.temperature {
                Some(t) if t > 0.0 => t,
                _ => params.temperature,
            };
            Sampler::new(SamplingParams {
                temperature,
                seed: params.seed ^ DRAFT_SEED_SALT,
                ..params.clone()
            })
        });
    }

    /// Nothing runs here: the prompt goes through the draft at the first
    /// step that drafts ([`ModelDrafter::sync`] catches up), so a request
    /// whose budget controller keeps to plain decoding never pays the
    /// draft's prefill. Run eagerly, it cost every request a third more
    /// prefill (1.5B target, 0.5B draft: 58 s against 44 s over 18
    /// Spec-Bench generations) and kept `draft:auto` at 0.93x plain while
    /// its decode alone ran at 1.07x. Lazily, the catch-up is in the
    /// drafting step's measured cost, which the controller weighs.
    fn start(&mut self, _prompt: &[u32]) {}

    fn propose(&mut self, context: &[u32], max_draft: usize) -> DraftTree {
        let root = *context.last().unwrap_or(&0);
        if max_draft == 0 || context.is_empty() {
            return DraftTree::root(root);
        }
        self.max_budget = self.max_budget.max(max_draft);
        let out = self.grow(context, max_draft);
        // Drop the tree's pending entries: only the sequence stays cached.
        if let Some(c) = self.caches.get_mut(self.current) {
            let len = c.len();
            c.truncate(len);
            c.since_retrieval = c.since_retrieval.saturating_add(1);
        }
        match out {
            Ok(t) => t,
            Err(e) => {
                // A draft that cannot run (its context is shorter than the
                // target's, say) only stops drafting; the target goes on.
                self.warn(&e);
                DraftTree::root(root)
            }
        }
    }

    fn finish(&mut self, _generated: &[u32]) {
        let n = &self.counters;
        if n.retrievals > 0 {
            tracing::debug!(
                retrievals = n.retrievals,
                attended =
                    n.retrieval_held_positions as f64 / n.retrieval_context_positions.max(1) as f64,
                "draft retrieval: share of the context the draft attended to"
            );
        }
    }

    fn counters(&self) -> crate::draft::DraftCounters {
        self.counters
    }

    /// The tokens the cache lacks at the mean time per token of the
    /// catch-ups so far (prefill-sized forwards: per token a fraction of a
    /// decode step). Before the first catch-up nothing is known: 0, so the
    /// first one runs and is measured.
    fn catch_up_ms(&self, context: &[u32]) -> f64 {
        let lag = self.lag(context);
        let n = &self.counters;
        if lag <= self.max_budget + 1 || n.catch_up_tokens == 0 {
            return 0.0;
        }
        lag as f64 * n.catch_up_us as f64 / 1e3 / n.catch_up_tokens as f64
    }

    /// With retrieval, every `every` proposals once the context is long
    /// enough (and at the first proposal there).
    fn attention_chunk(&mut self) -> Option<usize> {
        let r = self.cfg.retrieval?;
        let c = self.caches.get(self.current)?;
        (c.len() >= r.min_len() && c.since_retrieval >= r.every).then_some(r.chunk)
    }

    /// Regathers the working cache of the sequence `context` (the one just
    /// verified: the cache holding exactly it) from the target's attention.
    fn observe_attention(&mut self, context: &[u32], mass: &[f32]) {
        let Some(r) = self.cfg.retrieval else {
            return;
        };
        let Some(c) = self.caches.iter_mut().find(|c| c.cached == context) else {
            return;
        };
        c.since_retrieval = 0;
        let Some((chunks, tail)) = r.choose(mass, c.len()) else {
            c.working = None;
            return;
        };
        let reuse = match c.working.take() {
            Some(w) => w.cache,
            None => self
                .model
                .decoder
                .new_cache(self.model.config().context_length),
        };
        match Working::gather(reuse, &c.cache, &chunks, r.chunk, tail) {
            Ok(w) => {
                tracing::trace!(
                    held = w.held(),
                    of = c.len(),
                    chunks = chunks.len(),
                    "draft retrieval"
                );
                self.counters.retrievals += 1;
                self.counters.retrieval_held_positions += w.held() as u64;
                self.counters.retrieval_context_positions += c.len() as u64;
                c.working = Some(w);
            }
            Err(e) => {
                if !self.warned {
                    tracing::warn!("draft retrieval off for this sequence: {e}");
                    self.warned = true;
                }
            }
        }
    }
}

/// The draft's processed distribution after `context`, cut to its
/// [`PROPOSAL_TOP`] most probable tokens and renormalized.
fn proposal_distribution(
    sampler: &mut Sampler,
    logits: &[f32],
    context: &[u32],
) -> Vec<(u32, f32)> {
    let mut dist = sampler.processed(logits, context);
    if dist.len() > PROPOSAL_TOP {
        dist.select_nth_unstable_by(PROPOSAL_TOP - 1, |a, b| b.1.total_cmp(&a.1));
        dist.truncate(PROPOSAL_TOP);
    }
    dist.retain(|d| d.1 > 0.0);
    let total: f32 = dist.iter().map(|d| d.1).sum();
    dist.iter_mut().for_each(|d| d.1 /= total);
    dist
}

impl ModelDrafter {
    fn warn(&mut self, e: &Error) {
        if !self.warned {
            tracing::warn!("draft model stops drafting: {e}");
            self.warned = true;
        }
    }
}
