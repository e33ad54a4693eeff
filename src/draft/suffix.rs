//! Suffix decoding (SuffixDecoding, Oliaro et al., NeurIPS 2025; vLLM's
//! `method: suffix`): draft what followed the longest match of the text's
//! current suffix, in this request's own text and in the outputs of earlier
//! requests, as a tree scored by how often each continuation was seen.
//!
//! Prompt lookup proposes one chain from the latest occurrence of a
//! <= 4-token n-gram. This matches suffixes of up to [`DEFAULT_MAX_MATCH`]
//! tokens, so a long copy is recognised as one (and drafted long: the
//! draft may hold `spec_factor x match length` nodes), and it votes over
//! every occurrence, so a continuation that differed between occurrences
//! becomes two branches weighted by their counts instead of a coin flip.
//!
//! The index is a suffix trie of bounded depth with occurrence counts
//! (every substring of up to `max_match + 1` tokens, counted), updated in
//! O(depth) per token. The draft grows past the trie's depth because every
//! drafted node re-matches the longest suffix of context + path (a
//! variable-order Markov model over the text): a copy of any length keeps
//! being drafted while its recent tokens match.

use std::collections::{BinaryHeap, VecDeque};
use std::path::Path;

use rustc_hash::FxHashMap;

use crate::draft::persist::{seal, unseal, write_atomic, Reader};
use crate::draft::recycle::{Candidate, TreeBuilder};
use crate::draft::{DraftTree, Drafter};
use crate::error::{Error, Result};

/// Longest suffix matched. SuffixDecoding's and vLLM's default tree depth is
/// 24 (`suffix_decoding_max_tree_depth`); 32 lets the `spec_factor x match`
/// cap reach the 32-token drafts the issue asks for with factor 1.
pub const DEFAULT_MAX_MATCH: usize = 32;
/// Draft at most this many nodes per matched token (vLLM's
/// `suffix_decoding_max_spec_factor` default, 1.0): a 3-token match drafts
/// at most 3 tokens, a 30-token match 30.
pub const DEFAULT_SPEC_FACTOR: f32 = 1.0;
/// A node is drafted only if its estimated probability (the product of the
/// count ratios along its path) is at least this (vLLM's
/// `suffix_decoding_min_token_prob` default, 0.1).
pub const DEFAULT_MIN_PROB: f32 = 0.1;
/// Earlier requests whose outputs the global index holds.
pub const DEFAULT_CACHE_REQUESTS: usize = 256;
/// Tokens of one output kept in the global index (its tail), and tokens of
/// a request's own text indexed (a sliding window over its end): bounds
/// memory at `tokens x (max_match + 1)` trie nodes in the worst case, and
/// far fewer on real text, whose substrings repeat.
pub const MAX_DOC_TOKENS: usize = 8192;
/// Requests indexed at once (interleaved server requests each keep theirs).
const LIVE_REQUESTS: usize = 8;

const NONE: u32 = u32::MAX;

/// The classes [`SuffixDrafter::outlook`] sorts steps into for the budget
/// controller, by the length of the suffix match: with `spec_factor` 1 a
/// match of p tokens drafts at most p nodes, so below 4 the suffix adds no
/// more than a small tree would; from 16 on it can fill the largest
/// budgets (32, 64) that only pay on long confident copies.
pub const OUTLOOK_CLASSES: usize = 3;

pub fn outlook_class(match_len: usize) -> usize {
    match match_len {
        0..=3 => 0,
        4..=15 => 1,
        _ => 2,
    }
}

/// A suffix trie of bounded depth with occurrence counts.
///
/// Node 0 is the root (the empty string); every other node is a substring
/// of the indexed texts, its count the number of its occurrences. Removing
/// a text decrements counts; nodes at 0 are dead (invisible) until the
/// owner rebuilds the index ([`SuffixIndex::dead_nodes`]).
#[derive(Debug, Clone)]
pub struct SuffixIndex {
    /// Longest substring stored (the longest match is one shorter: a match
    /// needs a continuation).
    max_len: usize,
    count: Vec<u32>,
    len: Vec<u16>,
    first_child: Vec<u32>,
    next_sibling: Vec<u32>,
    token: Vec<u32>,
    /// (parent, token) -> child. Fx: the keys are small integers and the
    /// map is probed O(depth) times per token, where SipHash's cost shows.
    edges: FxHashMap<u64, u32>,
    dead: usize,
    /// The next active list, kept so appending a token does not allocate.
    scratch: Vec<u32>,
}

fn edge(parent: u32, token: u32) -> u64 {
    ((parent as u64) << 32) | token as u64
}

impl SuffixIndex {
    pub fn new(max_match: usize) -> Self {
        let max_len = max_match.clamp(1, u16::MAX as usize - 1) + 1;
        SuffixIndex {
            max_len,
            count: vec![0],
            len: vec![0],
            first_child: vec![NONE],
            next_sibling: vec![NONE],
            token: vec![NONE],
            edges: FxHashMap::default(),
            dead: 0,
            scratch: Vec::new(),
        }
    }

    pub fn max_match(&self) -> usize {
        self.max_len - 1
    }

    /// Nodes with a non-zero count (the root excluded).
    pub fn live_nodes(&self) -> usize {
        self.count.len() - 1 - self.dead
    }

    pub fn dead_nodes(&self) -> usize {
        self.dead
    }

    /// Approximate heap bytes: 18 per node in the arrays, ~16 per edge in
    /// the map (key, value, control byte, load factor).
    pub fn bytes(&self) -> usize {
        self.count.capacity() * 18 + self.edges.capacity() * 16
    }

    pub fn clear(&mut self) {
        *self = SuffixIndex::new(self.max_match());
    }

    fn child_any(&self, node: u32, token: u32) -> Option<u32> {
        self.edges.get(&edge(node, token)).copied()
    }

    /// The live child of `node` for `token`.
    pub fn child(&self, node: u32, token: u32) -> Option<u32> {
        self.child_any(node, token)
            .filter(|&c| self.count[c as usize] > 0)
    }

    fn child_or_add(&mut self, node: u32, token: u32) -> u32 {
        if let Some(c) = self.child_any(node, token) {
            return c;
        }
        let c = self.count.len() as u32;
        self.count.push(0);
        self.len.push(self.len[node as usize] + 1);
        self.first_child.push(NONE);
        self.token.push(token);
        self.next_sibling.push(self.first_child[node as usize]);
        self.first_child[node as usize] = c;
        self.edges.insert(edge(node, token), c);
        // Counted dead until its first occurrence is added.
        self.dead += 1;
        c
    }

    fn bump(&mut self, node: u32) {
        let c = &mut self.count[node as usize];
        if *c == 0 {
            self.dead -= 1;
        }
        *c = c.saturating_add(1);
    }

    /// Appends `token` to a text whose suffixes are the nodes `active`
    /// (shortest first): every suffix, and the empty one, grows by `token`.
    fn push(&mut self, active: &mut Vec<u32>, token: u32) {
        let mut next = std::mem::take(&mut self.scratch);
        next.clear();
        let c = self.child_or_add(0, token);
        self.bump(c);
        next.push(c);
        for &a in active.iter() {
            if (self.len[a as usize] as usize) < self.max_len {
                let c = self.child_or_add(a, token);
                self.bump(c);
                next.push(c);
            }
        }
        self.scratch = std::mem::replace(active, next);
    }

    /// Counts every substring of `text` (one more occurrence each).
    pub fn add(&mut self, text: &[u32]) {
        let mut active = Vec::new();
        for &t in text {
            self.push(&mut active, t);
        }
    }

    /// Takes away the occurrences that start at `text[0]`: the prefixes of
    /// `text` up to the depth (sliding a window, or removing a text one
    /// start at a time).
    fn remove_starting(&mut self, text: &[u32]) {
        let mut node = 0;
        for &t in text.iter().take(self.max_len) {
            let Some(c) = self.child_any(node, t) else {
                debug_assert!(false, "removing a substring that was never added");
                return;
            };
            let n = &mut self.count[c as usize];
            if *n > 0 {
                *n -= 1;
                if *n == 0 {
                    self.dead += 1;
                }
            }
            node = c;
        }
    }

    /// Undoes [`SuffixIndex::add`] of the same `text`.
    pub fn remove(&mut self, text: &[u32]) {
        for s in 0..text.len() {
            self.remove_starting(&text[s..]);
        }
    }

    /// Occurrences of the substring `node` stands for.
    pub fn count(&self, node: u32) -> u32 {
        self.count[node as usize]
    }

    /// Live children of `node` as (token, count), most recent first.
    pub fn continuations(&self, node: u32, out: &mut Vec<(u32, u32)>) {
        let mut c = self.first_child[node as usize];
        while c != NONE {
            let n = self.count[c as usize];
            if n > 0 {
                out.push((self.token[c as usize], n));
            }
            c = self.next_sibling[c as usize];
        }
    }

    fn has_continuation(&self, node: u32) -> bool {
        let mut c = self.first_child[node as usize];
        while c != NONE {
            if self.count[c as usize] > 0 {
                return true;
            }
            c = self.next_sibling[c as usize];
        }
        false
    }

    fn walk(&self, pattern: &[u32]) -> Option<u32> {
        pattern.iter().try_fold(0, |n, &t| self.child(n, t))
    }

    /// The longest suffix of `text` (at most `max_match` tokens) that occurs
    /// with a continuation: its node and length, `(0, 0)` if none.
    /// Occurring with a continuation is monotone in the suffix length (an
    /// occurrence of a longer suffix contains one of every shorter one), so
    /// a binary search over the length finds it.
    pub fn longest_match(&self, text: &[u32]) -> (u32, usize) {
        let n = text.len();
        let found = |l: usize| {
            self.walk(&text[n - l..])
                .filter(|&node| self.has_continuation(node))
        };
        let (mut lo, mut hi) = (0, self.max_match().min(n));
        let mut best = (0, 0);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            match found(mid) {
                Some(node) => {
                    best = (node, mid);
                    lo = mid;
                }
                None => hi = mid - 1,
            }
        }
        best
    }
}

/// One request's text, indexed as it grows.
#[derive(Debug, Clone)]
struct RequestIndex {
    index: SuffixIndex,
    /// The tokens indexed so far (a prefix of the request's context).
    seen: Vec<u32>,
    /// Where the indexed window starts in `seen`.
    window_start: usize,
    /// The trie nodes of `seen`'s suffixes, shortest first.
    active: Vec<u32>,
    last_used: u64,
}

impl RequestIndex {
    fn new(max_match: usize) -> Self {
        RequestIndex {
            index: SuffixIndex::new(max_match),
            seen: Vec::new(),
            window_start: 0,
            active: Vec::new(),
            last_used: 0,
        }
    }

    fn reset(&mut self) {
        self.index.clear();
        self.seen.clear();
        self.window_start = 0;
        self.active.clear();
    }

    /// Indexes the part of `context` not seen yet (starting over if it does
    /// not extend what was seen), sliding the window past
    /// [`MAX_DOC_TOKENS`].
    fn update(&mut self, context: &[u32]) {
        if !context.starts_with(&self.seen) {
            self.reset();
        }
        for &t in &context[self.seen.len()..] {
            self.index.push(&mut self.active, t);
            self.seen.push(t);
            if self.seen.len() - self.window_start > MAX_DOC_TOKENS {
                let s = self.window_start;
                self.index.remove_starting(&self.seen[s..]);
                self.window_start += 1;
                // Suffixes longer than the window are gone from the trie.
                let keep = self.seen.len() - self.window_start;
                self.active.truncate(keep);
            }
        }
        if self.index.dead_nodes() > self.index.live_nodes() + 4096 {
            let mut fresh = SuffixIndex::new(self.index.max_match());
            let mut active = Vec::new();
            for &t in &self.seen[self.window_start..] {
                fresh.push(&mut active, t);
            }
            self.index = fresh;
            self.active = active;
        }
    }
}

/// The outputs of the last requests, indexed together.
#[derive(Debug, Clone)]
pub struct GlobalCache {
    index: SuffixIndex,
    docs: VecDeque<Vec<u32>>,
    max_docs: usize,
}

impl GlobalCache {
    pub fn new(max_match: usize, max_docs: usize) -> Self {
        GlobalCache {
            index: SuffixIndex::new(max_match),
            docs: VecDeque::new(),
            max_docs,
        }
    }

    pub fn index(&self) -> &SuffixIndex {
        &self.index
    }

    pub fn docs(&self) -> impl Iterator<Item = &[u32]> {
        self.docs.iter().map(|d| d.as_slice())
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Adds an output (its last [`MAX_DOC_TOKENS`] tokens), evicting the
    /// oldest outputs beyond `max_docs`.
    pub fn add(&mut self, output: &[u32]) {
        if self.max_docs == 0 || output.len() < 2 {
            return;
        }
        let doc = output[output.len().saturating_sub(MAX_DOC_TOKENS)..].to_vec();
        self.index.add(&doc);
        self.docs.push_back(doc);
        while self.docs.len() > self.max_docs {
            if let Some(old) = self.docs.pop_front() {
                self.index.remove(&old);
            }
        }
        // Dead nodes are reclaimed by a rebuild once they outnumber the
        // live ones: memory stays within twice what the kept outputs need.
        if self.index.dead_nodes() > self.index.live_nodes() + 4096 {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        let mut fresh = SuffixIndex::new(self.index.max_match());
        for d in &self.docs {
            fresh.add(d);
        }
        self.index = fresh;
    }
}

#[derive(Debug, Clone)]
pub struct SuffixConfig {
    pub max_match: usize,
    pub spec_factor: f32,
    pub min_prob: f32,
    /// Earlier requests' outputs kept (`--suffix-cache-requests`; 0 = only
    /// the request's own text).
    pub cache_requests: usize,
}

impl Default for SuffixConfig {
    fn default() -> Self {
        SuffixConfig {
            max_match: DEFAULT_MAX_MATCH,
            spec_factor: DEFAULT_SPEC_FACTOR,
            min_prob: DEFAULT_MIN_PROB,
            cache_requests: DEFAULT_CACHE_REQUESTS,
        }
    }
}

/// Where a draft node's text matches: (node, length) in the request's index
/// and in the global one.
#[derive(Debug, Clone, Copy, Default)]
struct Match {
    req: (u32, usize),
    global: (u32, usize),
}

impl Match {
    fn len(&self) -> usize {
        self.req.1.max(self.global.1)
    }
}

/// The suffix drafter.
#[derive(Debug, Clone)]
pub struct SuffixDrafter {
    cfg: SuffixConfig,
    vocab: usize,
    requests: Vec<RequestIndex>,
    global: GlobalCache,
    tick: u64,
    /// The last outlook: (context length, last token, request slot, match).
    last: Option<(usize, u32, usize, Match)>,
    builder: TreeBuilder,
    heap: BinaryHeap<Candidate>,
    states: Vec<Match>,
    /// Expected accepted drafts of the last proposal (sum of node scores).
    expected: f32,
    /// Path score of each node of the tree under construction.
    node_scores: Vec<f32>,
    /// Per node of the last proposed tree: its estimated probability given
    /// its parent (count ratio), for the hybrid's allocation.
    confidence: Vec<f32>,
    /// Per node of the last proposed tree: the length of the match its
    /// count ratio was read at (its parent's state).
    matches: Vec<usize>,
}

impl SuffixDrafter {
    pub fn new(vocab: usize, cfg: SuffixConfig) -> Self {
        let max_match = cfg.max_match.max(1);
        let cfg = SuffixConfig {
            max_match,
            spec_factor: if cfg.spec_factor.is_finite() {
                cfg.spec_factor.max(0.0)
            } else {
                DEFAULT_SPEC_FACTOR
            },
            min_prob: if cfg.min_prob.is_finite() {
                cfg.min_prob.clamp(0.0, 1.0)
            } else {
                DEFAULT_MIN_PROB
            },
            ..cfg
        };
        SuffixDrafter {
            global: GlobalCache::new(max_match, cfg.cache_requests),
            cfg,
            vocab,
            requests: Vec::new(),
            tick: 0,
            last: None,
            builder: TreeBuilder::new(0),
            heap: BinaryHeap::new(),
            states: Vec::new(),
            expected: 0.0,
            node_scores: Vec::new(),
            confidence: Vec::new(),
            matches: Vec::new(),
        }
    }

    pub fn config(&self) -> &SuffixConfig {
        &self.cfg
    }

    pub fn global(&self) -> &GlobalCache {
        &self.global
    }

    /// Expected accepted drafts of the last proposal under the frequency
    /// estimates (optimistic: a continuation seen once scores 1).
    pub fn expected(&self) -> f32 {
        self.expected
    }

    /// Heap bytes of every index held.
    pub fn bytes(&self) -> usize {
        self.global.index.bytes()
            + self
                .requests
                .iter()
                .map(|r| r.index.bytes() + r.seen.capacity() * 4)
                .sum::<usize>()
    }

    /// The slot indexing `context`: the one whose text it extends (the
    /// longest such), else a fresh or least recently used one.
    fn request_for(&mut self, context: &[u32]) -> usize {
        self.tick += 1;
        let hit = self
            .requests
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.seen.is_empty() && context.starts_with(&r.seen))
            .max_by_key(|(_, r)| r.seen.len())
            .map(|(i, _)| i);
        let i = match hit {
            Some(i) => i,
            None if self.requests.len() < LIVE_REQUESTS => {
                self.requests.push(RequestIndex::new(self.cfg.max_match));
                self.requests.len() - 1
            }
            None => {
                let i = (0..self.requests.len())
                    .min_by_key(|&i| self.requests[i].last_used)
                    .unwrap_or(0);
                self.requests[i].reset();
                i
            }
        };
        let r = &mut self.requests[i];
        r.last_used = self.tick;
        r.update(context);
        i
    }

    fn match_of(&mut self, context: &[u32]) -> (usize, Match) {
        let key = (context.len(), context.last().copied().unwrap_or(NONE));
        if let Some((len, last, slot, m)) = self.last {
            if (len, last) == key && self.requests.get(slot).is_some_and(|r| r.seen == context) {
                return (slot, m);
            }
        }
        let slot = self.request_for(context);
        let m = Match {
            req: self.requests[slot].index.longest_match(context),
            global: self.global.index.longest_match(context),
        };
        self.last = Some((key.0, key.1, slot, m));
        (slot, m)
    }

    /// Per node of the last proposed tree (root first, 1.0): the
    /// estimated probability of its token given its parent's path.
    pub fn confidence(&self) -> &[f32] {
        &self.confidence
    }

    /// Per node of the last proposed tree (root first, 0): how long the
    /// match was where its estimate was read. A count ratio of 1 after a
    /// 2-token match is weak evidence, after a 20-token one it is a copy.
    pub fn match_lens(&self) -> &[usize] {
        &self.matches
    }

    /// Emits the tree and records each node's confidence in its order.
    fn built(&mut self) -> DraftTree {
        let tree = self.builder.build();
        self.confidence.clear();
        self.confidence.resize(tree.len(), 1.0);
        self.matches.clear();
        self.matches.resize(tree.len(), 0);
        for old in 1..self.node_scores.len() {
            let (new, parent) = (self.builder.built_index(old), self.builder.parent(old));
            // states[i] is builder node i's match (pushed as nodes are added).
            self.matches[new] = self.states[parent].len();
            let parent = self.node_scores[parent];
            self.confidence[new] = if parent > 0.0 {
                (self.node_scores[old] / parent).min(1.0)
            } else {
                0.0
            };
        }
        tree
    }

    /// Length of the longest suffix match of `context` (request or global).
    pub fn match_len(&mut self, context: &[u32]) -> usize {
        self.match_of(context).1.len()
    }

    /// The next-token estimates where `m` matches: count ratios from the
    /// index with the longer match (both, counts summed, on a tie).
    fn distribution(&self, slot: usize, m: Match, out: &mut Vec<(u32, f32)>) {
        let mut counts: Vec<(u32, u32)> = Vec::new();
        let (r, g) = (m.req.1, m.global.1);
        if r > 0 && r >= g {
            self.requests[slot]
                .index
                .continuations(m.req.0, &mut counts);
        }
        if g > 0 && g >= r {
            let mut more = Vec::new();
            self.global.index.continuations(m.global.0, &mut more);
            for (t, c) in more {
                match counts.iter_mut().find(|(u, _)| *u == t) {
                    Some(e) => e.1 += c,
                    None => counts.push((t, c)),
                }
            }
        }
        let total: u64 = counts.iter().map(|&(_, c)| c as u64).sum();
        out.clear();
        if total > 0 {
            out.extend(
                counts
                    .iter()
                    .map(|&(t, c)| (t, (c as f64 / total as f64) as f32)),
            );
        }
    }

    /// The match after appending `token` to a text matched at `at` whose
    /// tail is `text` (token included): the child when it still has a
    /// continuation, else a fresh longest match.
    fn advance(index: &SuffixIndex, at: (u32, usize), token: u32, text: &[u32]) -> (u32, usize) {
        if at.1 > 0 {
            if let Some(c) = index.child(at.0, token) {
                if index.has_continuation(c) {
                    return (c, at.1 + 1);
                }
            }
        }
        index.longest_match(text)
    }

    fn push_children(&mut self, slot: usize, node: usize, score: f32, seq: &mut u32) {
        let mut dist = Vec::new();
        self.distribution(slot, self.states[node], &mut dist);
        for (token, p) in dist {
            let s = score * p;
            if s >= self.cfg.min_prob && s > 0.0 {
                *seq += 1;
                self.heap.push(Candidate {
                    score: s,
                    seq: *seq,
                    parent: node,
                    token,
                });
            }
        }
    }

    /// Saves the global index's outputs next to the recycle state
    /// (`<state>.suffix`), atomically and tagged with `model_id`.
    pub fn save(&self, path: &Path, model_id: &str) -> Result<()> {
        let mut buf = Vec::new();
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&(model_id.len() as u32).to_le_bytes());
        buf.extend_from_slice(model_id.as_bytes());
        buf.extend_from_slice(&(self.vocab as u32).to_le_bytes());
        buf.extend_from_slice(&(self.global.docs.len() as u32).to_le_bytes());
        for d in &self.global.docs {
            buf.extend_from_slice(&(d.len() as u32).to_le_bytes());
            for &t in d {
                buf.extend_from_slice(&t.to_le_bytes());
            }
        }
        seal(&mut buf);
        write_atomic(path, &buf).map_err(|e| suffix_err(path, format!("cannot write: {e}")))
    }

    /// Replaces the global index with the outputs saved in `path` (the
    /// newest `cache_requests` of them). Refuses another model's file, a
    /// different vocabulary, and truncated or corrupt files.
    pub fn load(&mut self, path: &Path, model_id: &str) -> Result<()> {
        let bytes =
            std::fs::read(path).map_err(|e| suffix_err(path, format!("cannot read: {e}")))?;
        let docs = parse_suffix_state(&bytes, path, model_id, self.vocab)?;
        let mut global = GlobalCache::new(self.cfg.max_match, self.cfg.cache_requests);
        let skip = docs.len().saturating_sub(self.cfg.cache_requests);
        for d in &docs[skip..] {
            global.add(d);
        }
        self.global = global;
        self.last = None;
        Ok(())
    }
}

const MAGIC: &[u8; 8] = b"TSSUFFX\0";
const VERSION: u32 = 1;
const MAX_ID_LEN: usize = 4096;

fn suffix_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::DrafterState {
        kind: "suffix",
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn parse_suffix_state(
    bytes: &[u8],
    path: &Path,
    model_id: &str,
    vocab: usize,
) -> Result<Vec<Vec<u32>>> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(suffix_err(path, "not a treespec suffix state (bad magic)"));
    }
    let body = unseal(bytes)
        .ok_or_else(|| suffix_err(path, "corrupt or truncated file (checksum mismatch)"))?;
    let mut r = Reader::new(body);
    let truncated = || suffix_err(path, "truncated file");
    r.take(8).ok_or_else(truncated)?;
    let version = r.u32().ok_or_else(truncated)?;
    if version != VERSION {
        return Err(suffix_err(
            path,
            format!("format version {version}, this build reads version {VERSION}"),
        ));
    }
    let id_len = r.u32().ok_or_else(truncated)? as usize;
    if id_len > MAX_ID_LEN {
        return Err(suffix_err(path, "corrupt header (model identity too long)"));
    }
    let id = r.take(id_len).ok_or_else(truncated)?;
    let file_model = std::str::from_utf8(id)
        .map_err(|_| suffix_err(path, "corrupt header (model identity is not UTF-8)"))?;
    if file_model != model_id {
        return Err(suffix_err(
            path,
            format!("belongs to model '{file_model}', not '{model_id}'"),
        ));
    }
    let file_vocab = r.u32().ok_or_else(truncated)? as usize;
    if file_vocab != vocab {
        return Err(suffix_err(
            path,
            format!("vocabulary of {file_vocab} tokens, the model has {vocab}"),
        ));
    }
    let n = r.u32().ok_or_else(truncated)? as usize;
    let mut docs = Vec::new();
    for _ in 0..n {
        let len = r.u32().ok_or_else(truncated)? as usize;
        if len > MAX_DOC_TOKENS || len * 4 > r.remaining() {
            return Err(suffix_err(path, "corrupt file (output length)"));
        }
        let raw = r.take(len * 4).ok_or_else(truncated)?;
        let doc: Vec<u32> = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if let Some(bad) = doc.iter().find(|&&t| t as usize >= vocab) {
            return Err(suffix_err(
                path,
                format!("corrupt file (token id {bad} outside the vocabulary)"),
            ));
        }
        docs.push(doc);
    }
    if r.remaining() != 0 {
        return Err(suffix_err(path, "trailing bytes before the checksum"));
    }
    Ok(docs)
}

impl Drafter for SuffixDrafter {
    fn name(&self) -> &'static str {
        "suffix"
    }

    fn start(&mut self, prompt: &[u32]) {
        self.last = None;
        self.request_for(prompt);
    }

    fn outlook(&mut self, context: &[u32]) -> usize {
        outlook_class(self.match_len(context))
    }

    fn propose(&mut self, context: &[u32], max_draft: usize) -> DraftTree {
        let root = context.last().copied().unwrap_or(0);
        self.builder.reset(root);
        self.expected = 0.0;
        self.node_scores.clear();
        self.node_scores.push(1.0);
        if max_draft == 0 || context.is_empty() {
            return self.built();
        }
        let (slot, m0) = self.match_of(context);
        let p = m0.len();
        let cap = max_draft.min((self.cfg.spec_factor * p as f32).floor() as usize);
        if cap == 0 {
            return self.built();
        }
        self.heap.clear();
        self.states.clear();
        self.states.push(m0);
        let mut seq = 0;
        self.push_children(slot, 0, 1.0, &mut seq);
        // The tail of context + path each new node re-matches against.
        let tail_from = context.len().saturating_sub(self.cfg.max_match);
        let mut text: Vec<u32> = Vec::with_capacity(self.cfg.max_match + cap + 1);
        let mut path: Vec<u32> = Vec::with_capacity(cap + 1);
        while self.builder.len() <= cap {
            let Some(best) = self.heap.pop() else { break };
            if self.builder.child(best.parent, best.token).is_some() {
                continue;
            }
            let node = self.builder.add(best.parent, best.token);
            self.expected += best.score;
            self.node_scores.push(best.score);
            path.clear();
            let mut n = node;
            while n != 0 {
                path.push(self.builder.token(n));
                n = self.builder.parent(n);
            }
            path.reverse();
            text.clear();
            text.extend_from_slice(&context[tail_from..]);
            text.extend_from_slice(&path);
            let keep = text.len().saturating_sub(self.cfg.max_match);
            let text = &text[keep..];
            let at = self.states[best.parent];
            let m = Match {
                req: Self::advance(&self.requests[slot].index, at.req, best.token, text),
                global: Self::advance(&self.global.index, at.global, best.token, text),
            };
            self.states.push(m);
            self.push_children(slot, node, best.score, &mut seq);
        }
        self.built()
    }

    fn finish(&mut self, generated: &[u32]) {
        self.global.add(generated);
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every substring's count by brute force.
    fn brute_count(texts: &[&[u32]], pattern: &[u32]) -> u32 {
        texts
            .iter()
            .map(|t| t.windows(pattern.len()).filter(|w| *w == pattern).count() as u32)
            .sum()
    }

    fn lcg(seed: &mut u32, m: u32) -> u32 {
        *seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
        (*seed >> 16) % m
    }

    #[test]
    fn counts_every_substring_up_to_the_depth() {
        let mut seed = 7;
        let a: Vec<u32> = (0..300).map(|_| lcg(&mut seed, 4)).collect();
        let b: Vec<u32> = (0..200).map(|_| lcg(&mut seed, 4)).collect();
        let mut idx = SuffixIndex::new(5);
        idx.add(&a);
        idx.add(&b);
        for _ in 0..500 {
            let l = 1 + lcg(&mut seed, 6) as usize;
            let pat: Vec<u32> = (0..l).map(|_| lcg(&mut seed, 4)).collect();
            let want = brute_count(&[&a, &b], &pat);
            let got = idx.walk(&pat).map_or(0, |n| idx.count(n));
            assert_eq!(got, want, "{pat:?}");
        }
        // Removing a text leaves exactly the other's counts.
        idx.remove(&a);
        for _ in 0..300 {
            let l = 1 + lcg(&mut seed, 6) as usize;
            let pat: Vec<u32> = (0..l).map(|_| lcg(&mut seed, 4)).collect();
            let got = idx.walk(&pat).map_or(0, |n| idx.count(n));
            assert_eq!(got, brute_count(&[&b], &pat), "{pat:?}");
        }
        idx.remove(&b);
        assert_eq!(idx.live_nodes(), 0);
    }

    #[test]
    fn longest_match_needs_a_continuation() {
        let mut idx = SuffixIndex::new(8);
        let text = [1, 2, 3, 4, 9, 2, 3, 4];
        idx.add(&text);
        // "2 3 4" occurs twice, once followed by 9; "9 2 3 4" only at the end.
        let (node, len) = idx.longest_match(&text);
        assert_eq!(len, 3);
        let mut c = Vec::new();
        idx.continuations(node, &mut c);
        assert_eq!(c, vec![(9, 1)]);
        // Brute force over random texts: the longest suffix with a
        // continuation somewhere earlier.
        let mut seed = 3;
        for _ in 0..200 {
            let n = 1 + lcg(&mut seed, 60) as usize;
            let t: Vec<u32> = (0..n).map(|_| lcg(&mut seed, 3)).collect();
            let mut idx = SuffixIndex::new(6);
            idx.add(&t);
            let want = (0..=6.min(n))
                .rev()
                .find(|&l| l > 0 && (l..n).any(|end| t[end - l..end] == t[n - l..]))
                .unwrap_or(0);
            assert_eq!(idx.longest_match(&t).1, want, "{t:?}");
        }
    }

    #[test]
    fn drafts_a_long_copy_past_the_trie_depth() {
        // The request copies a 40-token span: a match of 6 (the depth)
        // drafts up to 6 nodes, and the chain keeps re-matching.
        let span: Vec<u32> = (100..140).collect();
        let mut ctx: Vec<u32> = vec![1, 2, 3];
        ctx.extend(&span);
        ctx.extend([7, 8]);
        ctx.extend(&span[..10]);
        let mut d = SuffixDrafter::new(
            200,
            SuffixConfig {
                max_match: 6,
                spec_factor: 4.0,
                cache_requests: 0,
                ..Default::default()
            },
        );
        d.start(&ctx);
        assert_eq!(d.match_len(&ctx), 6);
        assert_eq!(d.outlook(&ctx), outlook_class(6));
        let t = d.propose(&ctx, 64);
        t.validate().unwrap();
        // 6 x 4 = 24 nodes, one chain: span[10..34].
        assert_eq!(t.tokens[1..], span[10..34]);
        assert!((d.expected() - 24.0).abs() < 1e-4);
        // The budget caps it.
        assert_eq!(d.propose(&ctx, 5).tokens[1..], span[10..15]);
        assert_eq!(d.propose(&ctx, 0), DraftTree::root(*ctx.last().unwrap()));
    }

    #[test]
    fn branches_by_frequency_and_prunes_rare_ones() {
        let drafter = |min_prob| {
            SuffixDrafter::new(
                10,
                SuffixConfig {
                    max_match: 4,
                    spec_factor: 32.0,
                    min_prob,
                    cache_requests: 0,
                },
            )
        };
        // After "5 6": 7 three times (then 1, 1, 2), 8 once, 3 once; after
        // "7 1 5 6": 7 once, 8 once.
        let ctx = [
            5, 6, 7, 1, 5, 6, 7, 1, 5, 6, 8, 3, 5, 6, 7, 2, 5, 6, 3, 0, 5, 6,
        ];
        // 0.3: 7 (0.6), 1 (0.6 x 2/3), then 5 and 6 (certain), then 7 or 8
        // at 0.4 x 1/2 = 0.2: pruned, as are 8 and 3 (0.2) and 7 -> 2.
        let mut d = drafter(0.3);
        let t = d.propose(&ctx, 16);
        assert_eq!(t.tokens, vec![6, 7, 1, 5, 6]);
        assert!((d.expected() - 1.8).abs() < 1e-4, "{}", d.expected());
        // The budget takes the most probable nodes first.
        assert_eq!(d.propose(&ctx, 2).tokens, vec![6, 7, 1]);

        // After "1 2": 3 twice, 4 once. With 0.3 both branch; the more
        // frequent comes first.
        let ctx = [1, 2, 3, 1, 2, 3, 1, 2, 4, 0, 1, 2];
        let t = drafter(0.3).propose(&ctx, 64);
        t.validate().unwrap();
        let first: Vec<u32> = t.children(0).map(|i| t.tokens[i]).collect();
        assert_eq!(first, vec![3, 4]);
        // 0.5 drops the rare one.
        let t = drafter(0.5).propose(&ctx, 64);
        assert_eq!(
            t.children(0).map(|i| t.tokens[i]).collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn short_matches_draft_little() {
        let mut d = SuffixDrafter::new(100, SuffixConfig::default());
        // Only "9" matches (length 1): factor 1 drafts one node.
        let ctx = [9, 50, 51, 52, 1, 2, 9];
        assert_eq!(d.match_len(&ctx), 1);
        assert_eq!(d.outlook(&ctx), 0);
        let t = d.propose(&ctx, 16);
        assert_eq!(t.tokens, vec![9, 50]);
        // Nothing matches: the root only.
        assert_eq!(d.propose(&[1, 2, 3], 16), DraftTree::root(3));
    }

    #[test]
    fn earlier_outputs_are_drafted_across_requests() {
        let mut d = SuffixDrafter::new(1000, SuffixConfig::default());
        let answer: Vec<u32> = (500..540).collect();
        d.start(&[1, 2, 3]);
        d.finish(&answer);
        // A new request whose output starts like the earlier one.
        let mut ctx = vec![4, 5, 6];
        d.start(&ctx);
        ctx.extend(&answer[..8]);
        let t = d.propose(&ctx, 32);
        assert_eq!(t.tokens[1..], answer[8..16]);
        // With no global cache the same request has nothing to copy.
        let mut d = SuffixDrafter::new(
            1000,
            SuffixConfig {
                cache_requests: 0,
                ..Default::default()
            },
        );
        d.finish(&answer);
        assert!(d.global().is_empty());
        assert_eq!(d.propose(&ctx, 32).len(), 1);
    }

    #[test]
    fn the_global_cache_is_bounded_and_evicts_the_oldest() {
        let mut g = GlobalCache::new(8, 3);
        let docs: Vec<Vec<u32>> = (0..10u32)
            .map(|i| (0..50).map(|j| i * 100 + j).collect())
            .collect();
        let mut peak = 0;
        for d in &docs {
            g.add(d);
            peak = peak.max(g.index().live_nodes());
        }
        assert_eq!(g.len(), 3);
        // Only the last three remain findable.
        assert_eq!(g.index().longest_match(&[905, 906]).1, 2);
        assert_eq!(g.index().longest_match(&[105, 106]).1, 0);
        // Live nodes: 3 docs x (50 starts x up to 9 lengths) at most.
        assert!(g.index().live_nodes() <= 3 * 50 * 9);
        assert!(peak <= 4 * 50 * 9);
        // Dead nodes are reclaimed: memory does not grow with the stream.
        for i in 0..200u32 {
            g.add(&(0..50).map(|j| 10_000 + i * 100 + j).collect::<Vec<_>>());
        }
        assert!(
            g.index().dead_nodes() <= g.index().live_nodes() + 4096,
            "{} dead, {} live",
            g.index().dead_nodes(),
            g.index().live_nodes()
        );
    }

    #[test]
    fn the_request_window_slides() {
        let mut r = RequestIndex::new(4);
        let mut seed = 11;
        let text: Vec<u32> = (0..MAX_DOC_TOKENS + 500)
            .map(|_| lcg(&mut seed, 50))
            .collect();
        r.update(&text);
        let window = &text[text.len() - MAX_DOC_TOKENS..];
        for _ in 0..200 {
            let l = 1 + lcg(&mut seed, 3) as usize;
            let at = lcg(&mut seed, text.len() as u32 - 3) as usize;
            let pat = &text[at..at + l];
            let got = r.index.walk(pat).map_or(0, |n| r.index.count(n));
            assert_eq!(got, brute_count(&[window], pat), "{pat:?}");
        }
    }

    #[test]
    fn interleaved_requests_keep_their_own_index() {
        let mut d = SuffixDrafter::new(1000, SuffixConfig::default());
        let a: Vec<u32> = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3].to_vec();
        let b: Vec<u32> = [9, 8, 7, 6, 5, 4, 9, 8, 7].to_vec();
        d.start(&a);
        d.start(&b);
        assert_eq!(d.propose(&a, 8).tokens[1..], [4, 5, 6]);
        assert_eq!(d.propose(&b, 8).tokens[1..], [6, 5, 4]);
        assert_eq!(d.requests.len(), 2);
    }

    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn state_round_trips_and_refuses_bad_files() {
        let path = std::env::temp_dir().join(format!("treespec-suffix-{}.bin", std::process::id()));
        let _guard = TempFile(path.clone());
        let mut d = SuffixDrafter::new(1000, SuffixConfig::default());
        let answer: Vec<u32> = (500..540).collect();
        d.finish(&answer);
        d.finish(&[7, 8, 9, 10]);
        d.save(&path, "model-a").unwrap();
        let mut e = SuffixDrafter::new(1000, SuffixConfig::default());
        e.load(&path, "model-a").unwrap();
        assert_eq!(
            e.global().docs().collect::<Vec<_>>(),
            d.global().docs().collect::<Vec<_>>()
        );
        let ctx: Vec<u32> = vec![1, 500, 501, 502, 503];
        assert_eq!(e.propose(&ctx, 8).tokens[1..], [504, 505, 506, 507]);

        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert!(msg(e.load(&path, "model-b")).contains("model-a"));
        let mut small = SuffixDrafter::new(100, SuffixConfig::default());
        assert!(msg(small.load(&path, "model-a")).contains("vocabulary"));
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..good.len() - 5]).unwrap();
        assert!(msg(e.load(&path, "model-a")).contains("corrupt"));
        let mut flipped = good.clone();
        flipped[40] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(msg(e.load(&path, "model-a")).contains("checksum"));
        std::fs::write(&path, b"nonsense").unwrap();
        assert!(msg(e.load(&path, "model-a")).contains("magic"));
        // A refused load leaves the cache as it was.
        assert_eq!(e.global().len(), 2);
    }
}
