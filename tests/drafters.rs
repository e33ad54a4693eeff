//! Drafters driven by a toy greedy "model" through the engine's loop
//! (propose -> score every node -> accept the longest matching path ->
//! observe). Checks that every tree is valid, that drafting never changes
//! the output (the accepted tokens are the model's own), and that the
//! learning drafters actually learn a repetitive sequence.

use treespec::draft::hybrid::Hybrid;
use treespec::draft::pld::PromptLookup;
use treespec::draft::recycle::{RecycleConfig, TokenRecycler, TreeShape};
use treespec::draft::template::TreeTemplate;
use treespec::draft::{DraftTree, Drafter, NodeTopK};

const VOCAB: u32 = 60;

type Model = fn(&[u32]) -> u32;

/// A toy model's greedy next token that depends on the last two tokens:
/// sequences fall into cycles in which a token has several successors, and
/// the top-k of rejected nodes (scored in a wrong context) mislead.
fn next2(context: &[u32]) -> u32 {
    let n = context.len();
    let a = if n >= 2 { context[n - 2] } else { 0 };
    let b = context[n - 1];
    (a * 7 + b * 3 + 1) % 41
}

/// One that depends on the last token only: a cycle Token Recycling's
/// bigram matrix can learn exactly.
fn next1(context: &[u32]) -> u32 {
    (context[context.len() - 1] * 7 + 3) % 41
}

fn topk(next: Model, context: &[u32], k: usize) -> NodeTopK {
    let first = next(context);
    NodeTopK {
        ids: (0..k as u32).map(|i| (first + i * 11) % VOCAB).collect(),
        probs: (0..k).map(|i| 0.6 / (i as f32 + 1.0)).collect(),
    }
}

/// Runs `steps` verify steps; returns (generated tokens, tokens per step).
fn run(
    next: Model,
    drafter: &mut dyn Drafter,
    prompt: &[u32],
    steps: usize,
    max_draft: usize,
) -> (Vec<u32>, f64) {
    let mut context = prompt.to_vec();
    drafter.start(prompt);
    let k = drafter.wants_topk().max(1);
    let mut produced = 0usize;
    for _ in 0..steps {
        let tree: DraftTree = drafter.propose(&context, max_draft);
        tree.validate().unwrap();
        assert!(tree.num_drafted() <= max_draft);
        assert_eq!(tree.tokens[0], *context.last().unwrap());
        assert!(tree.tokens.iter().all(|&t| t < VOCAB));
        // Score every node in its own context.
        let node_topk: Vec<NodeTopK> = (0..tree.len())
            .map(|i| {
                let mut c = context.clone();
                c.extend(tree.path_to(i)[1..].iter().map(|&n| tree.tokens[n]));
                topk(next, &c, k)
            })
            .collect();
        // Greedy acceptance.
        let mut accepted = vec![0];
        let mut node = 0;
        while let Some(child) = tree.child_with_token(node, node_topk[node].ids[0]) {
            accepted.push(child);
            node = child;
        }
        drafter.observe(&tree, &node_topk, &accepted);
        for &n in &accepted[1..] {
            context.push(tree.tokens[n]);
        }
        context.push(node_topk[node].ids[0]);
        produced += accepted.len();
    }
    let generated = context[prompt.len()..].to_vec();
    (generated, produced as f64 / steps as f64)
}

fn plain(next: Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut c = prompt.to_vec();
    for _ in 0..n {
        c.push(next(&c));
    }
    c[prompt.len()..].to_vec()
}

fn recycler(shape: TreeShape) -> TokenRecycler {
    TokenRecycler::new(
        VOCAB as usize,
        RecycleConfig {
            shape,
            ..RecycleConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn every_drafter_is_lossless_and_valid() {
    let prompt = [3, 9, 27, 4, 12, 5];
    for max_draft in [0, 1, 4, 8, 16, 32] {
        let mut drafters: Vec<Box<dyn Drafter>> = vec![
            Box::new(recycler(TreeShape::parse("tr-16").unwrap())),
            Box::new(recycler(TreeShape::parse("tr-80").unwrap())),
            Box::new(recycler(TreeShape::Dynamic)),
            Box::new(PromptLookup::default()),
            Box::new(Hybrid::new(
                recycler(TreeShape::parse("tr-8").unwrap()),
                PromptLookup::default(),
            )),
        ];
        for d in drafters.iter_mut() {
            for next in [next1 as Model, next2] {
                let (out, _) = run(next, d.as_mut(), &prompt, 60, max_draft);
                let want = plain(next, &prompt, out.len());
                assert_eq!(out, want, "{} max_draft {max_draft}", d.name());
            }
        }
    }
}

#[test]
fn learning_drafters_speed_up_a_cycle() {
    let prompt = [3, 9, 27, 4, 12, 5];
    for mut d in [
        Box::new(recycler(TreeShape::Static(
            TreeTemplate::builtin("tr-16").unwrap(),
        ))) as Box<dyn Drafter>,
        Box::new(recycler(TreeShape::Dynamic)),
        Box::new(PromptLookup::default()),
        Box::new(Hybrid::new(
            recycler(TreeShape::parse("tr-8").unwrap()),
            PromptLookup::default(),
        )),
    ] {
        // Warm up (hot start carries over), then measure.
        run(next1, d.as_mut(), &prompt, 100, 16);
        let (_, per_step) = run(next1, d.as_mut(), &prompt, 100, 16);
        assert!(per_step > 3.0, "{}: {per_step} tokens per step", d.name());
    }
}
