//! Suffix decoding + prompt lookup + Token Recycling in one tree.
//!
//! PLD is strong when the output copies the context (long, exact chains) and
//! silent otherwise; Token Recycling always has something, but shallow; the
//! suffix drafter matches long suffixes over this request and earlier
//! outputs and drafts long only where its match is long and its counts
//! confident. One tree holds all three, so one verify pass scores every
//! guess, and where they agree (the chain's first tokens are often TR's
//! rank-0 path, and the suffix draft's) the shared prefix is stored once.
//! Without the suffix drafter this is the earlier `hybrid-pld`.
//!
//! How the sources share the budget: by default ([`Allocation::Learned`])
//! each source's nodes are valued by how often such nodes of that source
//! were accepted, and the best are kept ([`crate::draft::allocate`]); the
//! earlier fixed split ([`Allocation::Fixed`], `--spec hybrid-fixed`) is
//! kept to compare against.

use crate::draft::allocate::{self, Source, SourceRecord, Union};
use crate::draft::draft_model::ModelDrafter;
use crate::draft::pld::PromptLookup;
use crate::draft::recycle::{TokenRecycler, TreeBuilder};
use crate::draft::suffix::SuffixDrafter;
use crate::draft::{DraftTree, Drafter, NodeTopK, Proposal};

/// Default share of the node budget reserved for the PLD chain.
pub const DEFAULT_CHAIN_SHARE: f32 = 0.5;

/// How the hybrid's sources share the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Allocation {
    /// By each source's learned acceptance, best nodes first, none below
    /// [`allocate::MIN_PATH_PROB`]: the tree may be smaller than the budget.
    #[default]
    Learned,
    /// The fixed split described on [`Hybrid`] (every budget filled).
    Fixed,
}

/// The hybrid drafter.
///
/// Fixed budget split for `max_draft = B`: the suffix draft (when there is one)
/// goes in first, whole: it is already capped by its match length and its
/// minimum probability, so it is long only where a long copy is under way
/// (and the budget controller learns, per outlook class, whether the big
/// budgets that lets through pay). Of what remains, the PLD chain first
/// gets up to
/// `max(1, ceil(B * chain_share))` nodes (half by default: the chain is a
/// single path, so past its first miss every node is wasted, while TR spends
/// nodes on breadth). Then the TR tree (proposed with the full budget B)
/// is merged in BFS order; a TR node whose (parent, token) is already in
/// the tree costs nothing, a new one costs one node, and a TR node that does
/// not fit is dropped with its subtree. Whatever TR leaves unused goes back
/// to the chain, so with an empty recycle matrix the chain gets all of B
/// (and with no PLD match, TR gets all of B).
#[derive(Debug, Clone)]
pub struct Hybrid {
    recycler: TokenRecycler,
    lookup: PromptLookup,
    suffix: Option<SuffixDrafter>,
    draft: Option<ModelDrafter>,
    chain_share: f32,
    builder: TreeBuilder,
    node_of: Vec<Option<usize>>,
    allocation: Allocation,
    union: Union,
    record: SourceRecord,
    /// The context (length, last token) and budget `union` was built for
    /// by [`Drafter::estimate`], for the `propose` that follows.
    prepared: Option<(usize, u32, usize)>,
    /// Whether the draft model (if any) drafts at the next proposal
    /// ([`Drafter::use_costly_source`]).
    draft_on: bool,
}

impl Hybrid {
    pub fn new(recycler: TokenRecycler, lookup: PromptLookup) -> Self {
        Hybrid {
            recycler,
            lookup,
            suffix: None,
            draft: None,
            chain_share: DEFAULT_CHAIN_SHARE,
            builder: TreeBuilder::new(0),
            node_of: Vec::new(),
            allocation: Allocation::default(),
            union: Union::default(),
            record: SourceRecord::default(),
            prepared: None,
            draft_on: true,
        }
    }

    pub fn with_allocation(mut self, allocation: Allocation) -> Self {
        self.allocation = allocation;
        self
    }

    pub fn allocation(&self) -> Allocation {
        self.allocation
    }

    /// What the learned allocation knows of each source so far.
    pub fn source_record(&self) -> &SourceRecord {
        &self.record
    }

    /// Adds the suffix drafter's tree as a third source.
    pub fn with_suffix(mut self, suffix: SuffixDrafter) -> Self {
        self.suffix = Some(suffix);
        self
    }

    /// Adds a draft model's tree as a source (`--spec hybrid --draft-model`).
    /// It gets what the suffix draft leaves, up to half of the budget (the
    /// chain share): its guesses are the best informed of the four, but each
    /// of its depths costs a draft forward, and PLD/TR fill the rest free.
    pub fn with_draft(mut self, draft: ModelDrafter) -> Self {
        self.draft = Some(draft);
        self
    }

    pub fn suffix(&self) -> Option<&SuffixDrafter> {
        self.suffix.as_ref()
    }

    pub fn suffix_mut(&mut self) -> Option<&mut SuffixDrafter> {
        self.suffix.as_mut()
    }

    /// Sets the share of the budget the chain gets first (clamped to 0..=1).
    pub fn with_chain_share(mut self, share: f32) -> Self {
        self.chain_share = if share.is_nan() {
            DEFAULT_CHAIN_SHARE
        } else {
            share.clamp(0.0, 1.0)
        };
        self
    }

    pub fn chain_share(&self) -> f32 {
        self.chain_share
    }

    pub fn recycler(&self) -> &TokenRecycler {
        &self.recycler
    }

    /// For saving/loading the matrix and changing its shape.
    pub fn recycler_mut(&mut self) -> &mut TokenRecycler {
        &mut self.recycler
    }

    pub fn lookup(&self) -> &PromptLookup {
        &self.lookup
    }

    pub fn into_parts(self) -> (TokenRecycler, PromptLookup) {
        (self.recycler, self.lookup)
    }

    /// Nodes the chain may take before TR is merged in.
    fn chain_first(&self, budget: usize) -> usize {
        if budget == 0 {
            return 0;
        }
        ((budget as f32 * self.chain_share).ceil() as usize).clamp(1, budget)
    }

    /// Walks `chain` down from `node`, merging with existing children,
    /// adding at most up to `budget` drafted nodes; returns the last node
    /// reached and how many chain tokens were placed.
    fn extend_chain(&mut self, mut node: usize, chain: &[u32], budget: usize) -> (usize, usize) {
        for (placed, &t) in chain.iter().enumerate() {
            node = match self.builder.child(node, t) {
                Some(c) => c,
                None if self.builder.len() <= budget => self.builder.add(node, t),
                None => return (node, placed),
            };
        }
        (node, chain.len())
    }

    /// Merges `tree` in BFS order: a node whose (parent, token) is already
    /// there costs nothing, a new one costs one node, one that does not fit
    /// is dropped with its subtree.
    fn merge(&mut self, tree: &DraftTree, budget: usize) {
        self.node_of.clear();
        self.node_of.push(Some(0));
        for i in 1..tree.len() {
            let parent = tree.parents[i].and_then(|p| self.node_of[p]);
            let node = parent.and_then(|p| match self.builder.child(p, tree.tokens[i]) {
                Some(existing) => Some(existing),
                None if self.builder.len() <= budget => Some(self.builder.add(p, tree.tokens[i])),
                None => None,
            });
            self.node_of.push(node);
        }
        for p in &tree.proposals {
            if let Some(node) = self.node_of[p.node] {
                self.builder.add_proposal(Proposal { node, ..p.clone() });
            }
        }
    }
}

impl Hybrid {
    /// Every source proposes as if it had the budget alone (the draft
    /// model, whose nodes cost forwards, up to the chain share of it); the
    /// union keeps the nodes worth most.
    fn propose_learned(&mut self, context: &[u32], max_draft: usize) -> DraftTree {
        let root = context.last().copied().unwrap_or(0);
        let key = (context.len(), root);
        // After `estimate` the controller has already weighed every node
        // against its rows on c(N) and asked for exactly the ones that pay:
        // only the estimate's own floor applies. Otherwise (a fixed budget)
        // the fixed floor does the weighing.
        let floor = match self.prepared.take() {
            Some((len, last, built)) if (len, last) == key && built >= max_draft => {
                allocate::ESTIMATE_FLOOR
            }
            _ => {
                self.gather(context, max_draft);
                allocate::MIN_PATH_PROB
            }
        };
        self.union.select(max_draft, floor, &mut self.builder)
    }

    /// Every source's tree for `context` into the union, as if each had
    /// `max_draft` nodes alone.
    fn gather(&mut self, context: &[u32], max_draft: usize) {
        let root = context.last().copied().unwrap_or(0);
        self.union.reset(root);
        if let Some(s) = self.suffix.as_mut() {
            let tree = s.propose(context, max_draft);
            let slots: Vec<usize> = (s.confidence().iter())
                .zip(s.match_lens())
                .map(|(&p, &m)| allocate::suffix_slot(p, m))
                .collect();
            self.union
                .add_tree(&self.record, Source::Suffix, &tree, Some(&slots));
        }
        let share = self.chain_first(max_draft);
        let draft_on = self.draft_on;
        if let Some(d) = self.draft.as_mut().filter(|_| draft_on) {
            let tree = d.propose(context, share);
            self.union
                .add_tree(&self.record, Source::Draft, &tree, None);
        }
        if let Some((range, ngram)) = self.lookup.find_match(context) {
            let end = range.end.min(range.start + max_draft);
            let chain = &context[range.start..end];
            self.union
                .add_chain(&self.record, Source::Pld, chain, ngram.saturating_sub(1));
        }
        let tr = self.recycler.propose(context, max_draft);
        self.union
            .add_tree(&self.record, Source::Recycle, &tr, None);
    }
}

impl Drafter for Hybrid {
    fn name(&self) -> &'static str {
        match (&self.suffix, &self.draft) {
            (_, Some(_)) => "hybrid-draft",
            (Some(_), None) if self.allocation == Allocation::Fixed => "hybrid-fixed",
            (Some(_), None) => "hybrid",
            (None, None) => "hybrid-pld",
        }
    }

    fn start(&mut self, prompt: &[u32]) {
        self.prepared = None;
        self.lookup.start(prompt);
        self.recycler.start(prompt);
        if let Some(s) = self.suffix.as_mut() {
            s.start(prompt);
        }
        if let Some(d) = self.draft.as_mut() {
            d.start(prompt);
        }
    }

    fn set_sampling(&mut self, params: &crate::sampling::SamplingParams) {
        if let Some(d) = self.draft.as_mut() {
            d.set_sampling(params);
        }
    }

    fn outlook(&mut self, context: &[u32]) -> usize {
        self.suffix.as_mut().map_or(0, |s| s.outlook(context))
    }

    /// The learned allocation's estimate: the union's best nodes and their
    /// path probabilities. Only while no draft model drafts: its nodes'
    /// cost (draft forwards, paid before the tree exists) grows with the
    /// tree in a way the controller's running means capture and this does
    /// not; the controller's gate turns it off for the steps it estimates.
    fn estimate(&mut self, context: &[u32], max: usize) -> Option<Vec<f32>> {
        let drafting = self.draft.is_some() && self.draft_on;
        if self.allocation != Allocation::Learned || drafting || max == 0 {
            return None;
        }
        self.gather(context, max);
        let root = context.last().copied().unwrap_or(0);
        self.prepared = Some((context.len(), root, max));
        Some(self.union.ranked(max, allocate::ESTIMATE_FLOOR))
    }

    fn attention_chunk(&mut self) -> Option<usize> {
        self.draft.as_mut().and_then(|d| d.attention_chunk())
    }

    fn observe_attention(&mut self, context: &[u32], mass: &[f32]) {
        if let Some(d) = self.draft.as_mut() {
            d.observe_attention(context, mass);
        }
    }

    fn finish(&mut self, generated: &[u32]) {
        if self.allocation == Allocation::Learned {
            tracing::debug!("hybrid sources so far:\n{}", self.record.summary());
        }
        if let Some(s) = self.suffix.as_mut() {
            s.finish(generated);
        }
    }

    fn propose(&mut self, context: &[u32], max_draft: usize) -> DraftTree {
        let root = context.last().copied().unwrap_or(0);
        self.builder.reset(root);
        if max_draft == 0 {
            self.union.reset(root);
            return self.builder.build();
        }
        if self.allocation == Allocation::Learned {
            return self.propose_learned(context, max_draft);
        }
        if let Some(s) = self.suffix.as_mut() {
            let tree = s.propose(context, max_draft);
            self.merge(&tree, max_draft);
        }
        if self.draft.is_some() {
            let left = max_draft + 1 - self.builder.len();
            let share = self.chain_first(left);
            if let Some(d) = self.draft.as_mut() {
                let tree = d.propose(context, share);
                self.merge(&tree, max_draft);
            }
        }
        let left = max_draft + 1 - self.builder.len();
        let chain_range = self.lookup.find(context).unwrap_or(0..0);
        let chain = &context[chain_range];
        let first = chain.len().min(self.chain_first(left));
        let (chain_end, placed) = self.extend_chain(0, &chain[..first], max_draft);

        let tr = self.recycler.propose(context, max_draft);
        self.merge(&tr, max_draft);

        // TR's leftovers go back to the chain.
        self.extend_chain(chain_end, &chain[placed..], max_draft);
        self.builder.build()
    }

    fn observe(&mut self, tree: &DraftTree, topk: &[NodeTopK], accepted: &[usize]) {
        self.prepared = None;
        self.recycler.observe(tree, topk, accepted);
        if self.allocation == Allocation::Learned {
            self.union.learn(&mut self.record, tree, accepted);
        }
    }

    fn wants_topk(&self) -> usize {
        self.recycler.wants_topk()
    }

    fn counters(&self) -> crate::draft::DraftCounters {
        self.draft
            .as_ref()
            .map(|d| d.counters())
            .unwrap_or_default()
    }

    fn catch_up_ms(&self, context: &[u32]) -> f64 {
        self.draft.as_ref().map_or(0.0, |d| d.catch_up_ms(context))
    }

    /// The draft model beside the free sources, gated only where the
    /// union weighs each source's nodes (the learned allocation); the fixed
    /// split keeps its draft share every step.
    fn costly_source(&self) -> bool {
        self.draft.is_some() && self.allocation == Allocation::Learned
    }

    fn use_costly_source(&mut self, on: bool) {
        if self.draft_on != on {
            self.prepared = None;
        }
        self.draft_on = on;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::draft::recycle::{RecycleConfig, TreeShape};
    use crate::draft::template::TreeTemplate;

    fn topk(ids: &[u32]) -> NodeTopK {
        NodeTopK {
            ids: ids.to_vec(),
            probs: (0..ids.len()).map(|i| 0.5f32.powi(i as i32 + 1)).collect(),
        }
    }

    fn hybrid(template: &str) -> Hybrid {
        let recycler = TokenRecycler::new(
            100,
            RecycleConfig {
                k: 3,
                shape: TreeShape::Static(TreeTemplate::from_json(template).unwrap()),
                seed_from_prompt: false,
            },
        )
        .unwrap();
        Hybrid::new(recycler, PromptLookup::default()).with_allocation(Allocation::Fixed)
    }

    /// (token path from the root) for every node, to compare trees as sets.
    fn paths(t: &DraftTree) -> Vec<Vec<u32>> {
        (1..t.len())
            .map(|i| t.path_to(i)[1..].iter().map(|&n| t.tokens[n]).collect())
            .collect()
    }

    #[test]
    fn merges_shared_prefixes() {
        let mut h = hybrid("[[0],[1],[0,0],[0,1]]");
        // TR: 5 -> {6, 7}, 6 -> {8, 9}. PLD chain after "5": 6 8 20 21.
        h.recycler_mut().write_row(5, &topk(&[6, 7]));
        h.recycler_mut().write_row(6, &topk(&[8, 9]));
        let ctx = [5, 6, 8, 20, 21, 1, 5];
        let t = h.propose(&ctx, 8);
        t.validate().unwrap();
        assert_eq!(t.tokens[0], 5);
        // Chain first (ceil(8/2) = 4 nodes: 6 8 20 21), then TR's 7 and 9
        // (6 and 8 are shared), then the chain continues (1 5) into the 2
        // nodes TR left.
        let mut got = paths(&t);
        got.sort();
        let mut want = vec![
            vec![6],
            vec![6, 8],
            vec![6, 8, 20],
            vec![6, 8, 20, 21],
            vec![6, 8, 20, 21, 1],
            vec![6, 8, 20, 21, 1, 5],
            vec![7],
            vec![6, 9],
        ];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(t.num_drafted(), 8);
        // With 6 nodes the shared prefix still saves two.
        let t = h.propose(&ctx, 6);
        t.validate().unwrap();
        let mut got = paths(&t);
        got.sort();
        want.retain(|p| p.len() <= 4);
        assert_eq!(got, want);
    }

    #[test]
    fn splits_the_budget() {
        let mut h = hybrid("[[0],[1],[2],[0,0],[1,0],[2,0]]");
        h.recycler_mut().write_row(5, &topk(&[30, 31, 32]));
        for t in 30..33 {
            h.recycler_mut().write_row(t, &topk(&[t + 10]));
        }
        // Chain after 5: 1 2 3 4 5 6 ... (no overlap with TR).
        let ctx = [5, 1, 2, 3, 4, 9, 9, 9, 9, 5];
        let t = h.propose(&ctx, 6);
        t.validate().unwrap();
        assert_eq!(t.num_drafted(), 6);
        let chain_nodes = paths(&t).iter().filter(|p| p[0] == 1).count();
        assert_eq!(chain_nodes, 3, "{:?}", paths(&t));
        // TR got the other 3 in its BFS order: its three depth-1 nodes.
        assert!(paths(&t).contains(&vec![32]));
        // Share 0.25 of 8: the chain first gets 2, TR takes 6.
        let mut h = h.with_chain_share(0.25);
        let t = h.propose(&ctx, 8);
        t.validate().unwrap();
        assert_eq!(paths(&t).iter().filter(|p| p[0] == 1).count(), 2);
        assert_eq!(t.num_drafted(), 8);
        // Budget 1: one node, the chain's.
        let t = h.propose(&ctx, 1);
        assert_eq!(paths(&t), vec![vec![1]]);
        assert_eq!(h.propose(&ctx, 0), DraftTree::root(5));
    }

    #[test]
    fn each_side_alone_gets_the_whole_budget() {
        // Empty matrix: the chain takes everything it has.
        let mut h = hybrid("[[0],[1]]");
        let ctx = [5, 1, 2, 3, 4, 6, 7, 5];
        let t = h.propose(&ctx, 6);
        t.validate().unwrap();
        assert_eq!(t.tokens, vec![5, 1, 2, 3, 4, 6, 7]);
        // No PLD match: TR alone.
        let mut h = hybrid("[[0],[1],[0,0]]");
        h.recycler_mut().write_row(5, &topk(&[30, 31]));
        h.recycler_mut().write_row(30, &topk(&[40]));
        let t = h.propose(&[1, 2, 5], 8);
        t.validate().unwrap();
        assert_eq!(t.tokens, vec![5, 30, 31, 40]);
    }

    #[test]
    fn forwards_learning_to_the_recycler() {
        let mut h = hybrid("[[0]]");
        assert_eq!(h.wants_topk(), 3);
        let mut tree = DraftTree::root(5);
        tree.push(0, 6);
        h.observe(&tree, &[topk(&[6]), topk(&[7])], &[0, 1]);
        assert_eq!(h.recycler().candidates(5), vec![6]);
        assert_eq!(h.recycler().candidates(6), vec![7]);
        assert_eq!(h.name(), "hybrid-pld");
    }

    #[test]
    fn the_suffix_draft_goes_in_whole_and_shares_with_the_others() {
        use crate::draft::suffix::{SuffixConfig, SuffixDrafter};
        let mut h = hybrid("[[0],[1],[0,0]]").with_suffix(SuffixDrafter::new(
            100,
            SuffixConfig {
                cache_requests: 0,
                ..Default::default()
            },
        ));
        assert_eq!(h.name(), "hybrid-fixed");
        // A 20-token span copied: after its first 8 tokens the suffix (and
        // PLD) predict the remaining 12; TR knows 5 -> {6, 7}... and the
        // span's next token 18 -> {19, 60}.
        let span: Vec<u32> = (10..30).collect();
        let mut ctx = vec![1, 2];
        ctx.extend(&span);
        ctx.push(3);
        ctx.extend(&span[..8]);
        h.recycler_mut().write_row(17, &topk(&[18, 60]));
        h.recycler_mut().write_row(18, &topk(&[19]));
        h.start(&ctx);
        assert_eq!(h.outlook(&ctx), crate::draft::suffix::outlook_class(8));
        let t = h.propose(&ctx, 16);
        t.validate().unwrap();
        let got = paths(&t);
        // The suffix chain: 8 matched tokens draft 8 (18..26), then PLD's
        // chain (10 tokens, the same span) is shared and extends it to
        // 28, and TR's 18 and 18 -> 19 are shared too; TR's 60 is new.
        let chain: Vec<u32> = (18..28).collect();
        for l in 1..=chain.len() {
            assert!(got.contains(&chain[..l].to_vec()), "{got:?}");
        }
        assert!(got.contains(&vec![60]));
        assert_eq!(t.num_drafted(), chain.len() + 1);
        // A small budget: the suffix draft is placed first.
        let t = h.propose(&ctx, 3);
        assert_eq!(t.tokens, vec![17, 18, 19, 20]);
    }

    #[test]
    fn learned_allocation_gives_a_copy_the_budget_and_leaves_junk_out() {
        use crate::draft::suffix::{SuffixConfig, SuffixDrafter};
        let mut h = hybrid("[[0],[1],[2],[0,0],[1,0]]")
            .with_allocation(Allocation::Learned)
            .with_suffix(SuffixDrafter::new(
                100,
                SuffixConfig {
                    cache_requests: 0,
                    ..Default::default()
                },
            ));
        assert_eq!(h.allocation(), Allocation::Learned);
        // The text copies a 40-token span; TR's guesses are never right.
        let span: Vec<u32> = (10..50).collect();
        let mut ctx = vec![1, 2];
        ctx.extend(&span);
        ctx.push(3);
        ctx.extend(&span[..4]);
        h.start(&ctx);
        for t in 10..50 {
            h.recycler_mut().write_row(t, &topk(&[60, 61, 62]));
        }
        let mut last = DraftTree::root(0);
        for _ in 0..12 {
            let t = h.propose(&ctx, 16);
            t.validate().unwrap();
            // The model copies: the deepest node on the span is accepted.
            let mut node = 0;
            let mut accepted = vec![0];
            // The copy goes on with the span after its first 4 tokens.
            let next = &span[4..];
            for &tok in next {
                match t.child_with_token(node, tok) {
                    Some(c) => {
                        node = c;
                        accepted.push(c);
                    }
                    None => break,
                }
            }
            let tops: Vec<NodeTopK> = (0..t.len()).map(|_| topk(&[60, 61, 62])).collect();
            h.observe(&t, &tops, &accepted);
            last = t;
        }
        // The copy's nodes (PLD's 10-token chain, the suffix's 4 shared
        // with it) are in; TR's never-accepted guesses are gone, though the
        // budget had room for them.
        assert_eq!(
            last.num_drafted(),
            crate::draft::pld::DEFAULT_MAX_CHAIN,
            "{last:?}"
        );
        assert!(
            last.tokens[1..].iter().all(|t| !(60..63).contains(t)),
            "{last:?}"
        );
        assert!(h.source_record().observed(Source::Recycle) > 0.0);
        // No match and only unpromising TR guesses: a smaller tree than
        // the budget rather than a full one.
        let t = h.propose(&[70, 71, 72, 10], 16);
        t.validate().unwrap();
        assert!(t.num_drafted() < 16, "{t:?}");
    }
}
