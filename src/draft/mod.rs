//! Drafters: everything that *proposes* tokens. A drafter only proposes a
//! [`DraftTree`] and learns from what the scorer saw; it never decides what is
//! accepted (that is [`crate::verify`]) and never runs the model (that is
//! [`crate::engine::scorer`]). A new drafting method is one file here.

pub mod allocate;
pub mod draft_model;
pub mod hybrid;
pub(crate) mod persist;
pub mod pld;
pub mod recycle;
pub mod suffix;
pub mod template;
pub mod tree;

pub use tree::{DraftTree, Proposal};

/// The model's top-k successors of one scored tree node, most likely first,
/// with their probabilities under the raw (temperature 1) softmax.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeTopK {
    pub ids: Vec<u32>,
    pub probs: Vec<f32>,
}

/// A proposer of draft trees.
pub trait Drafter: Send {
    /// Short name used in stats and tables (`recycle`, `pld`, `hybrid`, ...).
    fn name(&self) -> &'static str;

    /// Called once per request, before any proposal, with the prompt tokens.
    fn start(&mut self, _prompt: &[u32]) {}

    /// Called once per request, before [`Drafter::start`], with the request's
    /// sampling parameters. A drafter that samples its candidates (and says
    /// so with a [`Proposal`]) needs them; the others choose theirs.
    fn set_sampling(&mut self, _params: &crate::sampling::SamplingParams) {}

    /// Proposes a tree rooted at `context.last()` (the token the engine has
    /// produced but not yet run through the model). `context` is the whole
    /// sequence so far: prompt + generated, root last. The tree holds at most
    /// `max_draft` nodes besides the root (0 = plain decoding).
    fn propose(&mut self, context: &[u32], max_draft: usize) -> DraftTree;

    /// Before a step with `--tree auto`: which class of step this is for the
    /// budget controller, which learns the best budget per class (0 = the
    /// usual; a drafter with a long confident match, such as a suffix copy,
    /// reports a higher class, where budgets up to the long-draft cap are
    /// tried). Below [`suffix::OUTLOOK_CLASSES`].
    fn outlook(&mut self, _context: &[u32]) -> usize {
        0
    }

    /// Before a step with `--tree auto`, after [`Drafter::outlook`]: for
    /// each of `budgets`, the (draft nodes, expected accepted drafts) of
    /// the tree it would propose now, if the drafter can estimate them
    /// (calibrated on its own record). The controller then chooses this
    /// step's budget from them instead of from its running means per class,
    /// which average steps with a good guess together with steps without.
    /// The next `propose` on the same context is the tree estimated.
    fn estimate(&mut self, _context: &[u32], _budgets: &[usize]) -> Option<Vec<(f64, f64)>> {
        None
    }

    /// After a request: the tokens it generated (drafters that learn across
    /// requests, like the suffix drafter's global index, keep them).
    fn finish(&mut self, _generated: &[u32]) {}

    /// After a verify step: the top-k successors of *every* node of `tree`
    /// (same order as the tree), and the accepted path (node indices, root
    /// first). Drafters that learn (Token Recycling) update themselves here.
    fn observe(&mut self, _tree: &DraftTree, _topk: &[NodeTopK], _accepted: &[usize]) {}

    /// How many successors per node the drafter wants in [`Drafter::observe`]
    /// (0 = it does not learn, the engine can skip the top-k work).
    fn wants_topk(&self) -> usize {
        0
    }
}

/// A borrowed drafter drafts as itself (the engine boxes whichever it gets).
impl<D: Drafter + ?Sized> Drafter for &mut D {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn start(&mut self, prompt: &[u32]) {
        (**self).start(prompt)
    }
    fn set_sampling(&mut self, params: &crate::sampling::SamplingParams) {
        (**self).set_sampling(params)
    }
    fn propose(&mut self, context: &[u32], max_draft: usize) -> DraftTree {
        (**self).propose(context, max_draft)
    }
    fn outlook(&mut self, context: &[u32]) -> usize {
        (**self).outlook(context)
    }
    fn estimate(&mut self, context: &[u32], budgets: &[usize]) -> Option<Vec<(f64, f64)>> {
        (**self).estimate(context, budgets)
    }
    fn finish(&mut self, generated: &[u32]) {
        (**self).finish(generated)
    }
    fn observe(&mut self, tree: &DraftTree, topk: &[NodeTopK], accepted: &[usize]) {
        (**self).observe(tree, topk, accepted)
    }
    fn wants_topk(&self) -> usize {
        (**self).wants_topk()
    }
}
