//! Token Recycling (Luo et al., "Turning Trash into Treasure", ACL 2025).
//!
//! Every verify pass computes the model's top-k successors of every tree
//! node; instead of throwing them away we store them in an adjacency matrix
//! (one row of k candidate successors per vocabulary token). The next draft
//! tree is read off that matrix, starting from the root token, either along
//! a fixed [`TreeTemplate`] (the paper) or best-first by estimated path
//! probability ([`TreeShape::Dynamic`]). The matrix outlives requests (hot
//! start) and can be saved to disk ([`TokenRecycler::save`]).

mod builder;
mod state;

use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub use builder::TreeBuilder;

use crate::draft::template::{TreeTemplate, MAX_K};
use crate::draft::{DraftTree, Drafter, NodeTopK};
use crate::error::{Error, Result};

/// Default candidates per row: the paper's `--output-id-topk 8`.
pub const DEFAULT_K: usize = 8;
/// Default template: 16 nodes. On 2 CPU cores a verify pass over N nodes
/// costs several plain steps (see ../shared/peers.md), so the paper's
/// 80-node tree is far too big; the engine normally chooses explicitly.
pub const DEFAULT_TEMPLATE: &str = "tr-16";
/// Probability given to a candidate seeded from the prompt (it has no model
/// probability). Only the dynamic tree reads it; a bigram seen in the prompt
/// is treated as a coin flip, above a typical rank-1 candidate.
const SEED_PROB: f32 = 0.5;

/// How the recycler shapes its draft trees.
#[derive(Debug, Clone, PartialEq)]
pub enum TreeShape {
    /// Follow a fixed template (the paper's method).
    Static(TreeTemplate),
    /// Grow best-first by estimated path probability up to `max_draft` nodes.
    Dynamic,
}

impl TreeShape {
    /// `dynamic`, a builtin template name (`tr-16`) or a template JSON file.
    pub fn parse(s: &str) -> Result<Self> {
        if s == "dynamic" {
            return Ok(TreeShape::Dynamic);
        }
        TreeTemplate::from_name_or_file(s).map(TreeShape::Static)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecycleConfig {
    /// Candidates stored per vocabulary token.
    pub k: usize,
    pub shape: TreeShape,
    /// Seed the matrix with the prompt's bigrams in [`Drafter::start`].
    pub seed_from_prompt: bool,
}

impl Default for RecycleConfig {
    fn default() -> Self {
        RecycleConfig {
            k: DEFAULT_K,
            shape: TreeShape::Static(
                TreeTemplate::builtin(DEFAULT_TEMPLATE).expect("default template is builtin"),
            ),
            seed_from_prompt: true,
        }
    }
}

/// The Token Recycling drafter.
///
/// Row `t` of the matrix holds up to k successors of token `t`, most likely
/// first, with their probability quantised to u16 (`p * 65535`, at least 1).
/// A slot with probability 0 is empty: rows start all-empty, and empty slots
/// are never drafted (the reference code drafts token 0 from them, which
/// only wastes tree nodes).
#[derive(Debug, Clone)]
pub struct TokenRecycler {
    vocab: usize,
    k: usize,
    ids: Vec<u32>,
    probs: Vec<u16>,
    shape: TreeShape,
    seed_from_prompt: bool,
    // Scratch space reused across steps (no allocation per step once warm).
    node_of: Vec<Option<usize>>,
    heap: BinaryHeap<Candidate>,
    builder: TreeBuilder,
    on_path: Vec<bool>,
    row_buf: Vec<(u32, u16)>,
}

impl TokenRecycler {
    /// An empty (all rows unwritten) recycler for a vocabulary of `vocab`.
    pub fn new(vocab: usize, config: RecycleConfig) -> Result<Self> {
        if vocab == 0 || vocab > u32::MAX as usize {
            return Err(Error::Invalid(format!(
                "token recycling needs a vocabulary size in 1..=2^32-1, got {vocab}"
            )));
        }
        if config.k == 0 || config.k > MAX_K {
            return Err(Error::Invalid(format!(
                "token recycling stores 1..={MAX_K} candidates per token, got k = {}",
                config.k
            )));
        }
        if let TreeShape::Static(t) = &config.shape {
            t.check_k(config.k)?;
        }
        let cells = vocab
            .checked_mul(config.k)
            .ok_or_else(|| Error::Invalid("recycle matrix size overflows".into()))?;
        Ok(TokenRecycler {
            vocab,
            k: config.k,
            ids: vec![0; cells],
            probs: vec![0; cells],
            shape: config.shape,
            seed_from_prompt: config.seed_from_prompt,
            node_of: Vec::new(),
            heap: BinaryHeap::new(),
            builder: TreeBuilder::new(0),
            on_path: Vec::new(),
            row_buf: Vec::new(),
        })
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn shape(&self) -> &TreeShape {
        &self.shape
    }

    /// Changes the tree shape; a template must fit `k`.
    pub fn set_shape(&mut self, shape: TreeShape) -> Result<()> {
        if let TreeShape::Static(t) = &shape {
            t.check_k(self.k)?;
        }
        self.shape = shape;
        Ok(())
    }

    pub fn seed_from_prompt(&self) -> bool {
        self.seed_from_prompt
    }

    pub fn set_seed_from_prompt(&mut self, on: bool) {
        self.seed_from_prompt = on;
    }

    /// Forgets everything (cold start).
    pub fn clear(&mut self) {
        self.ids.fill(0);
        self.probs.fill(0);
    }

    /// Number of rows holding at least one candidate.
    pub fn rows_written(&self) -> usize {
        self.probs.chunks_exact(self.k).filter(|r| r[0] > 0).count()
    }

    /// The stored candidates of `token` (ids and quantised probabilities,
    /// empty slots included), or `None` if `token` is outside the vocabulary.
    pub fn row(&self, token: u32) -> Option<(&[u32], &[u16])> {
        let r = self.row_range(token)?;
        Some((&self.ids[r.clone()], &self.probs[r]))
    }

    /// The non-empty candidate ids of `token`, most likely first.
    pub fn candidates(&self, token: u32) -> Vec<u32> {
        match self.row(token) {
            Some((ids, probs)) => ids
                .iter()
                .zip(probs)
                .filter(|(_, &p)| p > 0)
                .map(|(&id, _)| id)
                .collect(),
            None => Vec::new(),
        }
    }

    fn row_range(&self, token: u32) -> Option<std::ops::Range<usize>> {
        let t = token as usize;
        (t < self.vocab).then(|| t * self.k..(t + 1) * self.k)
    }

    /// Overwrites `token`'s row with `topk` (most likely first). Ids outside
    /// the vocabulary and repeated ids are skipped; slots beyond the given
    /// candidates become empty. An empty (or all-invalid) `topk` leaves the
    /// row untouched: it carries no information.
    pub fn write_row(&mut self, token: u32, topk: &NodeTopK) {
        let Some(range) = self.row_range(token) else {
            return;
        };
        self.row_buf.clear();
        for (i, &id) in topk.ids.iter().enumerate() {
            if self.row_buf.len() == self.k {
                break;
            }
            if id as usize >= self.vocab || self.row_buf.iter().any(|&(x, _)| x == id) {
                continue;
            }
            let p = topk.probs.get(i).copied().unwrap_or(0.0);
            self.row_buf.push((id, quantise(p)));
        }
        if self.row_buf.is_empty() {
            return;
        }
        let (ids, probs) = (&mut self.ids[range.clone()], &mut self.probs[range]);
        for slot in 0..self.k {
            let (id, p) = self.row_buf.get(slot).copied().unwrap_or((0, 0));
            ids[slot] = id;
            probs[slot] = p;
        }
    }

    /// Inserts each successor of `tokens` at rank 0 of its predecessor's row
    /// (`tokens[i+1]` into row `tokens[i]`), shifting the other candidates
    /// down and removing an older copy of it. Later pairs win rank 0.
    pub fn seed(&mut self, tokens: &[u32]) {
        for pair in tokens.windows(2) {
            let (t, u) = (pair[0], pair[1]);
            if u as usize >= self.vocab {
                continue;
            }
            let Some(range) = self.row_range(t) else {
                continue;
            };
            let (ids, probs) = (&mut self.ids[range.clone()], &mut self.probs[range]);
            let old = ids
                .iter()
                .zip(probs.iter())
                .position(|(&id, &p)| id == u && p > 0);
            // Slots 0..=end move down one; with u already present the shift
            // stops at its old slot, else the last candidate falls off.
            let end = old.unwrap_or(self.k - 1);
            // Keep the row sorted by probability for the dynamic tree.
            let p = probs[0].max(quantise(SEED_PROB));
            ids[..=end].rotate_right(1);
            probs[..=end].rotate_right(1);
            ids[0] = u;
            probs[0] = p;
        }
    }

    fn propose_static(&mut self, root: u32, max_draft: usize) -> DraftTree {
        let TreeShape::Static(template) = &self.shape else {
            unreachable!("static proposal with a static shape")
        };
        let mut tree = DraftTree::root(root);
        if max_draft == 0 || root as usize >= self.vocab {
            return tree;
        }
        // node_of[t] = tree index of template node t - 1 (t = 0 is the
        // root), or None when it (or an ancestor) was dropped.
        self.node_of.clear();
        self.node_of.push(Some(0));
        for i in 0..template.len() {
            if tree.num_drafted() == max_draft {
                break;
            }
            let node = self.node_of[template.parent(i)].and_then(|parent| {
                let slot = tree.tokens[parent] as usize * self.k + template.rank(i);
                if self.probs[slot] == 0 {
                    return None;
                }
                let token = self.ids[slot];
                // A sibling with the same token would be scored twice.
                if tree.child_with_token(parent, token).is_some() {
                    return None;
                }
                Some(tree.push(parent, token))
            });
            self.node_of.push(node);
        }
        tree
    }

    fn propose_dynamic(&mut self, root: u32, max_draft: usize) -> DraftTree {
        self.builder.reset(root);
        if max_draft == 0 || root as usize >= self.vocab {
            return self.builder.build();
        }
        self.heap.clear();
        let mut seq = 0u32;
        push_children(
            &mut self.heap,
            &mut seq,
            &self.ids,
            &self.probs,
            self.k,
            0,
            root,
            1.0,
        );
        while self.builder.len() <= max_draft {
            let Some(best) = self.heap.pop() else {
                break;
            };
            if self.builder.child(best.parent, best.token).is_some() {
                continue;
            }
            let node = self.builder.add(best.parent, best.token);
            push_children(
                &mut self.heap,
                &mut seq,
                &self.ids,
                &self.probs,
                self.k,
                node,
                best.token,
                best.score,
            );
        }
        self.builder.build()
    }
}

/// Queues the non-empty candidates of `token` (at builder node `parent`
/// whose path probability is `score`).
#[allow(clippy::too_many_arguments)]
fn push_children(
    heap: &mut BinaryHeap<Candidate>,
    seq: &mut u32,
    ids: &[u32],
    probs: &[u16],
    k: usize,
    parent: usize,
    token: u32,
    score: f32,
) {
    let base = token as usize * k;
    for slot in base..base + k {
        if probs[slot] == 0 {
            continue;
        }
        *seq += 1;
        heap.push(Candidate {
            score: score * (probs[slot] as f32 / u16::MAX as f32),
            seq: *seq,
            parent,
            token: ids[slot],
        });
    }
}

/// Quantises a probability to u16; any written candidate gets at least 1 so
/// that 0 keeps meaning "empty slot" (NaN and negatives count as tiny).
fn quantise(p: f32) -> u16 {
    let q = (p.clamp(0.0, 1.0) * u16::MAX as f32).round();
    if q.is_nan() {
        1
    } else {
        (q as u16).max(1)
    }
}

/// A node the dynamic tree may add next. The max-heap pops the highest
/// score; equal scores go to the earliest queued (lower `seq`), which keeps
/// the result deterministic and favours higher-ranked siblings.
/// Shared with the suffix drafter's best-first tree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    pub score: f32,
    pub seq: u32,
    pub parent: usize,
    pub token: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl Drafter for TokenRecycler {
    fn name(&self) -> &'static str {
        "recycle"
    }

    fn start(&mut self, prompt: &[u32]) {
        if self.seed_from_prompt {
            self.seed(prompt);
        }
    }

    fn propose(&mut self, context: &[u32], max_draft: usize) -> DraftTree {
        let root = context.last().copied().unwrap_or(0);
        match self.shape {
            TreeShape::Static(_) => self.propose_static(root, max_draft),
            TreeShape::Dynamic => self.propose_dynamic(root, max_draft),
        }
    }

    /// Writes the top-k of every node (root and rejected nodes included)
    /// into its token's row. When a token sits at several nodes, one write
    /// wins, by a fixed rule: a node on the accepted path beats any other
    /// (its successors were computed in the context that really happened),
    /// the deepest accepted one if several (the most recent context); among
    /// nodes off the path, the first in BFS order (the shallowest, the
    /// likeliest to be right). Implemented by write order: off-path nodes in
    /// reverse BFS order, then the accepted path root first, so the winner
    /// writes last.
    fn observe(&mut self, tree: &DraftTree, topk: &[NodeTopK], accepted: &[usize]) {
        let n = tree.len().min(topk.len());
        self.on_path.clear();
        self.on_path.resize(n, false);
        for &a in accepted {
            if a < n {
                self.on_path[a] = true;
            }
        }
        for i in (0..n).rev() {
            if !self.on_path[i] {
                self.write_row(tree.tokens[i], &topk[i]);
            }
        }
        for &a in accepted {
            if a < n {
                self.write_row(tree.tokens[a], &topk[a]);
            }
        }
    }

    fn wants_topk(&self) -> usize {
        self.k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topk(ids: &[u32]) -> NodeTopK {
        // Descending probabilities 0.5, 0.25, ...
        NodeTopK {
            ids: ids.to_vec(),
            probs: (0..ids.len()).map(|i| 0.5f32.powi(i as i32 + 1)).collect(),
        }
    }

    fn topk_p(ids: &[u32], probs: &[f32]) -> NodeTopK {
        NodeTopK {
            ids: ids.to_vec(),
            probs: probs.to_vec(),
        }
    }

    fn recycler(vocab: usize, k: usize, template: &str) -> TokenRecycler {
        TokenRecycler::new(
            vocab,
            RecycleConfig {
                k,
                shape: TreeShape::Static(TreeTemplate::from_json(template).unwrap()),
                seed_from_prompt: true,
            },
        )
        .unwrap()
    }

    fn dynamic(vocab: usize, k: usize) -> TokenRecycler {
        TokenRecycler::new(
            vocab,
            RecycleConfig {
                k,
                shape: TreeShape::Dynamic,
                seed_from_prompt: true,
            },
        )
        .unwrap()
    }

    #[test]
    fn rejects_bad_configs() {
        assert!(TokenRecycler::new(0, RecycleConfig::default()).is_err());
        let cfg = |k| RecycleConfig {
            k,
            ..RecycleConfig::default()
        };
        assert!(TokenRecycler::new(10, cfg(0)).is_err());
        assert!(TokenRecycler::new(10, cfg(MAX_K + 1)).is_err());
        // tr-16 needs k = 6.
        assert!(TokenRecycler::new(10, cfg(4)).is_err());
        let mut r = TokenRecycler::new(10, cfg(8)).unwrap();
        assert!(r.set_shape(TreeShape::parse("tr-80").unwrap()).is_ok());
        let mut small = TokenRecycler::new(10, cfg(6)).unwrap();
        assert!(small.set_shape(TreeShape::parse("tr-80").unwrap()).is_err());
        assert_eq!(TreeShape::parse("dynamic").unwrap(), TreeShape::Dynamic);
        assert!(TreeShape::parse("nope").is_err());
    }

    #[test]
    fn empty_matrix_drafts_nothing() {
        let mut r = TokenRecycler::new(100, RecycleConfig::default()).unwrap();
        let t = r.propose(&[3, 4], 16);
        assert_eq!(t, DraftTree::root(4));
        let mut d = dynamic(100, 8);
        assert_eq!(d.propose(&[4], 16), DraftTree::root(4));
        // A root outside the vocabulary is safe.
        assert_eq!(r.propose(&[1000], 16), DraftTree::root(1000));
        assert_eq!(d.propose(&[1000], 16), DraftTree::root(1000));
    }

    #[test]
    fn builds_the_template_tree_breadth_first() {
        let mut r = recycler(100, 3, "[[0],[1],[2],[0,0],[0,1],[1,0],[0,0,0],[2,2]]");
        r.write_row(10, &topk(&[20, 30, 40]));
        r.write_row(20, &topk(&[21, 22, 23]));
        r.write_row(30, &topk(&[31, 32, 33]));
        r.write_row(40, &topk(&[41, 42, 43]));
        r.write_row(21, &topk(&[50, 51, 52]));
        let t = r.propose(&[1, 2, 10], 100);
        t.validate().unwrap();
        assert_eq!(t.tokens, vec![10, 20, 30, 40, 21, 22, 31, 43, 50]);
        assert_eq!(
            t.parents,
            vec![
                None,
                Some(0),
                Some(0),
                Some(0),
                Some(1),
                Some(1),
                Some(2),
                Some(3),
                Some(4)
            ]
        );
        assert_eq!(t.depths, vec![0, 1, 1, 1, 2, 2, 2, 2, 3]);
    }

    #[test]
    fn drops_duplicate_siblings_with_their_subtree() {
        let mut r = recycler(100, 3, "[[0],[1],[2],[0,0],[1,0],[2,0],[1,0,0]]");
        r.write_row(10, &topk(&[20, 30, 40]));
        r.write_row(20, &topk(&[5]));
        r.write_row(30, &topk(&[5]));
        r.write_row(40, &topk(&[6]));
        r.write_row(5, &topk(&[7]));
        let t = r.propose(&[10], 100);
        t.validate().unwrap();
        // Cousins may share a token: 5 under 20 and 5 under 30.
        assert_eq!(t.tokens, vec![10, 20, 30, 40, 5, 5, 6, 7]);

        // A real sibling duplicate: the root's row is written directly with
        // a repeated id (e.g. a state file from elsewhere).
        let mut r = recycler(100, 3, "[[0],[1],[2],[0,0],[1,0],[2,0],[1,0,0]]");
        r.write_row(10, &topk(&[20, 30, 40]));
        r.write_row(20, &topk(&[1]));
        r.write_row(30, &topk(&[2]));
        r.write_row(40, &topk(&[3]));
        r.write_row(2, &topk(&[4]));
        let range = r.row_range(10).unwrap();
        r.ids[range.start + 1] = 20; // rank 1 now duplicates rank 0
        let t = r.propose(&[10], 100);
        t.validate().unwrap();
        // [1] dropped, and with it [1,0] and [1,0,0].
        assert_eq!(t.tokens, vec![10, 20, 40, 1, 3]);
        assert_eq!(t.parents, vec![None, Some(0), Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn respects_max_draft_in_bfs_order() {
        let mut r = recycler(100, 2, "[[0],[1],[0,0],[0,1],[1,0],[0,0,0]]");
        r.write_row(1, &topk(&[2, 3]));
        r.write_row(2, &topk(&[4, 5]));
        r.write_row(3, &topk(&[6, 7]));
        r.write_row(4, &topk(&[8, 9]));
        for (m, want) in [
            (0, vec![1]),
            (1, vec![1, 2]),
            (3, vec![1, 2, 3, 4]),
            (5, vec![1, 2, 3, 4, 5, 6]),
            (6, vec![1, 2, 3, 4, 5, 6, 8]),
            (50, vec![1, 2, 3, 4, 5, 6, 8]),
        ] {
            let t = r.propose(&[1], m);
            t.validate().unwrap();
            assert_eq!(t.tokens, want, "max_draft {m}");
        }
        // Empty slots don't use the budget: row 3 holds one candidate, so
        // [1,1] would be skipped and later nodes fill in.
        let mut r = recycler(100, 2, "[[0],[1],[0,0],[1,1],[0,0,0]]");
        r.write_row(1, &topk(&[2, 3]));
        r.write_row(2, &topk(&[4]));
        r.write_row(3, &topk(&[6]));
        r.write_row(4, &topk(&[8]));
        let t = r.propose(&[1], 4);
        assert_eq!(t.tokens, vec![1, 2, 3, 4, 8]);
    }

    #[test]
    fn observe_writes_every_node() {
        let mut r = recycler(100, 2, "[[0],[1]]");
        let mut tree = DraftTree::root(1);
        tree.push(0, 2);
        tree.push(0, 3);
        let tk = vec![topk(&[2, 9]), topk(&[7, 8]), topk(&[5, 6])];
        r.observe(&tree, &tk, &[0, 1]);
        assert_eq!(r.candidates(1), vec![2, 9]);
        assert_eq!(r.candidates(2), vec![7, 8]);
        // Rejected nodes are recycled too.
        assert_eq!(r.candidates(3), vec![5, 6]);
        assert_eq!(r.rows_written(), 3);
        // Overwrite, not merge; short lists leave the tail empty.
        let tree = DraftTree::root(1);
        r.observe(&tree, &[topk(&[4])], &[0]);
        assert_eq!(r.candidates(1), vec![4]);
        assert_eq!(r.row(1).unwrap().1[1], 0);
        // Out-of-vocabulary ids (in the tree or the top-k) are ignored.
        let mut tree = DraftTree::root(1);
        tree.push(0, 500);
        r.observe(&tree, &[topk(&[200, 3, 3, 300, 6]), topk(&[1])], &[0]);
        assert_eq!(r.candidates(1), vec![3, 6]);
        assert!(r.row(500).is_none());
        // An empty top-k keeps the row.
        r.observe(&DraftTree::root(1), &[NodeTopK::default()], &[0]);
        assert_eq!(r.candidates(1), vec![3, 6]);
    }

    #[test]
    fn observe_rule_for_repeated_tokens() {
        // Token 7 appears at nodes 1 (depth 1), 3 and 4 (depth 2).
        let mut tree = DraftTree::root(1);
        let a = tree.push(0, 7);
        let b = tree.push(0, 8);
        let c = tree.push(a, 7);
        let d = tree.push(b, 7);
        tree.validate().unwrap();
        let tk: Vec<NodeTopK> = (0..5).map(|i| topk(&[10 + i as u32])).collect();

        // Off the accepted path: the first in BFS order (node 1) wins.
        let mut r = recycler(100, 2, "[[0]]");
        r.observe(&tree, &tk, &[0]);
        assert_eq!(r.candidates(7), vec![11]);

        // On the accepted path: it beats earlier off-path nodes.
        let mut r = recycler(100, 2, "[[0]]");
        r.observe(&tree, &tk, &[0, b, d]);
        assert_eq!(r.candidates(7), vec![14]);
        assert_eq!(r.candidates(8), vec![12]);

        // Several on the path: the deepest wins.
        let mut r = recycler(100, 2, "[[0]]");
        r.observe(&tree, &tk, &[0, a, c]);
        assert_eq!(r.candidates(7), vec![13]);
    }

    #[test]
    fn seeds_from_the_prompt() {
        let mut r = recycler(100, 3, "[[0],[1],[2]]");
        r.write_row(1, &topk(&[5, 6, 7]));
        r.start(&[1, 9, 2, 1, 6]);
        // 1 -> 9 first, then 1 -> 6 (later pair wins rank 0, old 6 removed).
        assert_eq!(r.candidates(1), vec![6, 9, 5]);
        assert_eq!(r.candidates(9), vec![2]);
        assert_eq!(r.candidates(2), vec![1]);
        // Probabilities stay non-increasing along the row.
        let p = r.row(1).unwrap().1;
        assert!(p[0] >= p[1] && p[1] >= p[2] && p[2] > 0, "{p:?}");
        let t = r.propose(&[2, 1], 10);
        t.validate().unwrap();
        assert_eq!(t.tokens, vec![1, 6, 9, 5]);

        let mut off = recycler(100, 3, "[[0]]");
        off.set_seed_from_prompt(false);
        off.start(&[1, 9, 2]);
        assert_eq!(off.rows_written(), 0);
        // Out-of-vocabulary prompt tokens are skipped.
        let mut r = recycler(10, 3, "[[0]]");
        r.start(&[1, 50, 2, 3, 70]);
        assert_eq!(r.candidates(2), vec![3]);
        assert_eq!(r.rows_written(), 1);
    }

    #[test]
    fn dynamic_tree_grows_best_first() {
        let mut r = dynamic(100, 3);
        r.write_row(1, &topk_p(&[2, 3, 4], &[0.6, 0.3, 0.1]));
        r.write_row(2, &topk_p(&[5, 6], &[0.9, 0.05]));
        r.write_row(3, &topk_p(&[7], &[0.5]));
        r.write_row(5, &topk_p(&[8], &[0.2]));
        // Path probabilities: 2 .6, 5 .54, 3 .3, 7 .15, 4 .1, 8 .108, 6 .03
        let want_order = [2u32, 5, 3, 7, 8, 4, 6];
        for m in 0..=8 {
            let t = r.propose(&[1], m);
            t.validate().unwrap();
            let mut got: Vec<u32> = t.tokens[1..].to_vec();
            got.sort_unstable();
            let mut want: Vec<u32> = want_order[..m.min(7)].to_vec();
            want.sort_unstable();
            assert_eq!(got, want, "max_draft {m}");
        }
        let t = r.propose(&[1], 4);
        // BFS layout of {2, 5, 3, 7}.
        assert_eq!(t.tokens, vec![1, 2, 3, 5, 7]);
        assert_eq!(t.parents, vec![None, Some(0), Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn dynamic_tree_skips_duplicates_and_loops() {
        let mut r = dynamic(100, 2);
        // 1 -> 1 -> 1 ...: a chain, one node per depth.
        r.write_row(1, &topk_p(&[1, 2], &[0.9, 0.1]));
        let t = r.propose(&[1], 5);
        t.validate().unwrap();
        assert_eq!(t.num_drafted(), 5);
        assert_eq!(t.max_depth(), 5);
        // A repeated id in a row (not produced by write_row) is not drafted
        // twice under one parent.
        let range = r.row_range(1).unwrap();
        r.ids[range.start + 1] = 1;
        let t = r.propose(&[1], 5);
        t.validate().unwrap();
    }

    #[test]
    fn quantisation_marks_written_slots() {
        assert_eq!(quantise(0.0), 1);
        assert_eq!(quantise(-3.0), 1);
        assert_eq!(quantise(f32::NAN), 1);
        assert_eq!(quantise(1.0), u16::MAX);
        assert_eq!(quantise(2.0), u16::MAX);
        assert_eq!(quantise(0.5), 32768);
    }
}
