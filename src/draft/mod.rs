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
pub mod retrieval;
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

/// What a drafter ran on its own to propose: a draft model's forwards and
/// its retrievals (zero for the model-free drafters). Cumulative per
/// drafter; the engine reports the difference over one request's steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DraftCounters {
    /// Draft-model forwards, and the tokens they ran (prefill included).
    pub model_forwards: u64,
    pub model_tokens: u64,
    /// Retrievals (SpecExtend), and the positions the working caches held
    /// against the contexts' lengths then: their ratio is the share of the
    /// context the draft attended to.
    pub retrievals: u64,
    pub retrieval_held_positions: u64,
    pub retrieval_context_positions: u64,
    /// Catch-ups: syncs of the draft's cache over more tokens than one step
    /// adds (its prompt at the first drafting step, the tokens of the plain
    /// steps the controller chose since it last drafted), their tokens and
    /// their time (µs). Apart from the steady per-step cost, because they
    /// are paid once per switch to drafting, not per step.
    pub catch_ups: u64,
    pub catch_up_tokens: u64,
    pub catch_up_us: u64,
}

impl DraftCounters {
    /// What happened between `before` and `self`.
    pub fn since(self, before: DraftCounters) -> DraftCounters {
        DraftCounters {
            model_forwards: self.model_forwards.saturating_sub(before.model_forwards),
            model_tokens: self.model_tokens.saturating_sub(before.model_tokens),
            retrievals: self.retrievals.saturating_sub(before.retrievals),
            retrieval_held_positions: self
                .retrieval_held_positions
                .saturating_sub(before.retrieval_held_positions),
            retrieval_context_positions: self
                .retrieval_context_positions
                .saturating_sub(before.retrieval_context_positions),
            catch_ups: self.catch_ups.saturating_sub(before.catch_ups),
            catch_up_tokens: self.catch_up_tokens.saturating_sub(before.catch_up_tokens),
            catch_up_us: self.catch_up_us.saturating_sub(before.catch_up_us),
        }
    }

    pub fn add(&mut self, o: DraftCounters) {
        self.model_forwards += o.model_forwards;
        self.model_tokens += o.model_tokens;
        self.retrievals += o.retrievals;
        self.retrieval_held_positions += o.retrieval_held_positions;
        self.retrieval_context_positions += o.retrieval_context_positions;
        self.catch_ups += o.catch_ups;
        self.catch_up_tokens += o.catch_up_tokens;
        self.catch_up_us += o.catch_up_us;
    }

    pub fn is_zero(&self) -> bool {
        *self == DraftCounters::default()
    }
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

    /// Before a step with `--tree auto`, after [`Drafter::outlook`]: the
    /// chance that each node of the tree it would propose now (at most `max`
    /// nodes) is accepted, best first, if the drafter can estimate them
    /// (calibrated on its own record). Best first means the `n`-node tree
    /// `propose(context, n)` returns is the first `n` of them. The controller
    /// then chooses this step's tree size from them (where the next node adds
    /// less than the rows it costs on c(N)) instead of from its running means
    /// per class, which average steps with a good guess together with steps
    /// without. The next `propose` on the same context is the tree estimated.
    fn estimate(&mut self, _context: &[u32], _max: usize) -> Option<Vec<f32>> {
        None
    }

    /// Before a step's verify: whether the drafter wants to know, after it,
    /// where the target looked: `Some(chunk)` asks for the target's
    /// attention mass per run of `chunk` positions
    /// ([`Drafter::observe_attention`]). A draft model's retrieval
    /// (SpecExtend) asks every few steps; the others never.
    fn attention_chunk(&mut self) -> Option<usize> {
        None
    }

    /// After a verify that [`Drafter::attention_chunk`] asked about: the
    /// target's last-layer attention mass per chunk of the committed
    /// sequence, from the last accepted token's query; `context` is what
    /// the verified tree was drafted for (root last).
    fn observe_attention(&mut self, _context: &[u32], _mass: &[f32]) {}

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

    /// What the drafter has run so far (a draft model's forwards and
    /// retrievals), for stats.
    fn counters(&self) -> DraftCounters {
        DraftCounters::default()
    }

    /// Before a step with `--tree auto`: what drafting for `context` now
    /// would first spend catching up (ms, estimated from the catch-ups
    /// measured so far): a draft model whose cache the controller's plain
    /// steps left behind must run the tokens it missed, the whole prompt at
    /// a request's first drafting step. 0 for drafters that keep up for
    /// free (the model-free ones) or when nothing was measured yet.
    fn catch_up_ms(&self, _context: &[u32]) -> f64 {
        0.0
    }

    /// Whether the drafter holds a source whose nodes cost forwards (a
    /// draft model) beside sources that draft for free, which `--tree auto`
    /// may turn on and off step by step ([`Drafter::use_costly_source`]):
    /// the hybrid with a draft model. A drafter that is wholly one kind
    /// says false (its budget alone decides what it costs).
    fn costly_source(&self) -> bool {
        false
    }

    /// Before a step, when [`Drafter::costly_source`]: whether the costly
    /// source takes part in the next proposal. Off, the drafter drafts from
    /// its free sources alone and estimates their tree
    /// ([`Drafter::estimate`]); on, it drafts as a whole. On until told
    /// otherwise.
    fn use_costly_source(&mut self, _on: bool) {}
}

/// The body of an `impl Drafter` that hands every method to another
/// drafter: `$shared` reaches it from `&self`, `$mutable` from `&mut self`
/// (`self` is passed in as `$s`). Every wrapper (a borrowed drafter, the
/// engine's `SpecDrafter`, the server's locked one) uses this one list, so
/// a method added to the trait is forwarded everywhere or nowhere: a
/// wrapper that kept the trait's default (`estimate` once returned `None`
/// through `SpecDrafter`, so `--tree auto` never saw the hybrid's
/// estimates) silently turns the feature off.
macro_rules! forward_drafter {
    ($s:ident, $shared:expr, $mutable:expr) => {
        fn name(&$s) -> &'static str {
            $shared.name()
        }
        fn wants_topk(&$s) -> usize {
            $shared.wants_topk()
        }
        fn counters(&$s) -> $crate::draft::DraftCounters {
            $shared.counters()
        }
        fn catch_up_ms(&$s, context: &[u32]) -> f64 {
            $shared.catch_up_ms(context)
        }
        fn costly_source(&$s) -> bool {
            $shared.costly_source()
        }
        fn use_costly_source(&mut $s, on: bool) {
            $mutable.use_costly_source(on)
        }
        fn start(&mut $s, prompt: &[u32]) {
            $mutable.start(prompt)
        }
        fn set_sampling(&mut $s, params: &$crate::sampling::SamplingParams) {
            $mutable.set_sampling(params)
        }
        fn propose(&mut $s, context: &[u32], max_draft: usize) -> $crate::draft::DraftTree {
            $mutable.propose(context, max_draft)
        }
        fn outlook(&mut $s, context: &[u32]) -> usize {
            $mutable.outlook(context)
        }
        fn estimate(&mut $s, context: &[u32], max: usize) -> Option<Vec<f32>> {
            $mutable.estimate(context, max)
        }
        fn attention_chunk(&mut $s) -> Option<usize> {
            $mutable.attention_chunk()
        }
        fn observe_attention(&mut $s, context: &[u32], mass: &[f32]) {
            $mutable.observe_attention(context, mass)
        }
        fn observe(
            &mut $s,
            tree: &$crate::draft::DraftTree,
            topk: &[$crate::draft::NodeTopK],
            accepted: &[usize],
        ) {
            $mutable.observe(tree, topk, accepted)
        }
        fn finish(&mut $s, generated: &[u32]) {
            $mutable.finish(generated)
        }
    };
}
pub(crate) use forward_drafter;

/// A borrowed drafter drafts as itself (the engine boxes whichever it gets).
impl<D: Drafter + ?Sized> Drafter for &mut D {
    forward_drafter!(self, (**self), (**self));
}
