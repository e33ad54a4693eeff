//! Draft-model speculation (`--draft-model`): lossless against plain
//! decoding, the draft's cache kept in step with the target's (a model
//! drafting for itself has every draft accepted), and refused when the
//! vocabularies differ.

mod common;

use treespec::draft::draft_model::{check_vocabularies, DraftModel};
use treespec::draft::Drafter;
use treespec::engine::spec::{load_draft_model, SpecConfig, SpecDrafter, SpecMethod};
use treespec::engine::{generate, GenerateOptions, Generation, Session, StopReason};
use treespec::model::{common_prefix_len, Model};
use treespec::sampling::{SamplingParams, NEAR_TIE};
use treespec::tokenizer::Tokenizer;

const PROMPTS: [&str; 3] = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain in three sentences why the sky is blue.",
    "List five prime numbers and say what makes a number prime.",
];

fn run(
    model: &Model,
    drafter: Option<&mut SpecDrafter>,
    prompt: &[u32],
    n: usize,
    max_draft: usize,
    sampling: SamplingParams,
) -> Generation {
    let opts = GenerateOptions {
        max_new_tokens: n,
        max_draft,
        sampling,
        record_margins: true,
        ..Default::default()
    };
    run_with(model, drafter.map(|d| d as &mut dyn Drafter), prompt, &opts)
}

/// One request in a fresh session.
fn run_with(
    model: &Model,
    drafter: Option<&mut dyn Drafter>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Generation {
    let mut session = Session::new(model, 2048);
    generate(model, &mut session, drafter, prompt, opts, &mut |_| true).unwrap()
}

fn drafter(method: SpecMethod, draft: &DraftModel, vocab: usize) -> SpecDrafter {
    let cfg = SpecConfig {
        method,
        tree: "dynamic".into(),
        draft_model: Some(draft.clone()),
        ..Default::default()
    };
    SpecDrafter::build(&cfg, vocab).unwrap().unwrap()
}

/// The same model as its own draft computes the target's logits bit for
/// bit (tree forward = sequential, `tests/tree_forward.rs`), so a draft is
/// rejected only if the draft's cache is out of step with the sequence:
/// every drafted token must be accepted, over several requests through one
/// drafter (its cache rolls back to each new prompt).
#[test]
fn smollm2_drafting_for_itself_accepts_every_draft() {
    let path = common::model_path("smollm2-135m");
    let model = Model::load(&path).unwrap();
    let draft = load_draft_model(&path, &model).unwrap();
    let vocab = model.config().vocab_size;
    for method in [SpecMethod::Draft, SpecMethod::DraftTree] {
        let mut d = drafter(method, &draft, vocab);
        assert_eq!(d.name(), method.name());
        let (mut drafted, mut accepted, mut steps, mut tokens) = (0, 0, 0, 0);
        let (mut s_drafted, mut s_accepted, mut s_steps, mut s_tokens) = (0, 0, 0, 0);
        for text in PROMPTS {
            let prompt = common::chat_prompt(&model, text);
            let plain = run(&model, None, &prompt, 40, 0, SamplingParams::greedy());
            let out = run(
                &model,
                Some(&mut d),
                &prompt,
                40,
                6,
                SamplingParams::greedy(),
            );
            assert_eq!(out.tokens, plain.tokens, "{}: {text}", method.name());
            drafted += out.spec.drafted_tokens;
            accepted += out.spec.accepted_tokens;
            steps += out.spec.steps;
            tokens += out.tokens.len();
            // Sampling: the draft draws its candidates from its processed
            // distribution, here the target's own (q = p), so rejection
            // sampling accepts (nearly) every drawn candidate, where chosen
            // candidates would be kept only with probability p(c).
            for seed in 0..3 {
                let s = SamplingParams {
                    temperature: 0.8,
                    top_p: 0.95,
                    seed,
                    ..Default::default()
                };
                let out = run(&model, Some(&mut d), &prompt, 24, 6, s);
                assert!(out.tokens.len() == 24 || out.stop == StopReason::Eos);
                s_steps += out.spec.steps;
                s_tokens += out.tokens.len();
                s_drafted += out.spec.drafted_tokens;
                s_accepted += out.spec.accepted_tokens;
            }
        }
        let mat = tokens as f64 / steps as f64;
        println!(
            "{}: drafted {drafted}, accepted {accepted}, MAT {mat:.2}",
            method.name()
        );
        assert!(drafted > 0);
        assert!(mat > 2.0, "{}: MAT {mat:.2}", method.name());
        let s_mat = s_tokens as f64 / s_steps as f64;
        println!(
            "{} sampling: drafted {s_drafted}, accepted {s_accepted}, MAT {s_mat:.2}",
            method.name()
        );
        assert!(s_mat > 2.0, "{} sampling: MAT {s_mat:.2}", method.name());
        if method == SpecMethod::Draft {
            assert!(
                s_accepted * 10 >= s_drafted * 9,
                "sampled self-draft chain: only {s_accepted} of {s_drafted} accepted"
            );
        }
    }
    // Greedy: the path-probability floor may stop a draft early, but the
    // target never rejects one (under sampling it may draw another token).
    let mut d = drafter(SpecMethod::Draft, &draft, vocab);
    for text in PROMPTS {
        let prompt = common::chat_prompt(&model, text);
        let out = run(
            &model,
            Some(&mut d),
            &prompt,
            40,
            6,
            SamplingParams::greedy(),
        );
        assert_eq!(
            out.spec.accepted_tokens, out.spec.drafted_tokens,
            "a self-draft was rejected: the draft cache is out of step"
        );
    }
}

/// A real draft: Qwen2.5-Coder-0.5B for the 1.5B (same tokenizer). Greedy
/// output is token-identical to plain decoding (past a detected near-tie,
/// reported), for the chain, the tree and the hybrid with the draft's tree.
#[test]
fn qwen_0_5b_drafting_for_1_5b_is_lossless() {
    let target_path = common::model_path("qwen2.5-coder-1.5b");
    let draft_path = common::model_path("qwen2.5-coder-0.5b");
    let pulled = target_path.exists() && draft_path.exists();
    if !pulled && !common::under_ci() {
        eprintln!("skipped: the Qwen models are not pulled");
        return;
    }
    let model = Model::load(&target_path).unwrap();
    let draft = load_draft_model(&draft_path, &model).unwrap();
    let vocab = model.config().vocab_size;
    let prompt = common::chat_prompt(&model, PROMPTS[0]);
    let plain = run(&model, None, &prompt, 32, 0, SamplingParams::greedy());
    for method in [SpecMethod::Draft, SpecMethod::DraftTree, SpecMethod::Hybrid] {
        let mut d = drafter(method, &draft, vocab);
        let out = run(
            &model,
            Some(&mut d),
            &prompt,
            32,
            8,
            SamplingParams::greedy(),
        );
        println!(
            "{}: MAT {:.2}, accepted {}/{} drafted",
            d.name(),
            out.spec.mean_accepted_tokens,
            out.spec.accepted_tokens,
            out.spec.drafted_tokens
        );
        if out.tokens != plain.tokens {
            let at = common_prefix_len(&out.tokens, &plain.tokens);
            let margin = plain.margins.get(at).copied().unwrap_or(1.0);
            assert!(
                margin < NEAR_TIE,
                "{}: NOT LOSSLESS at token {at} (plain top-2 margin {margin:.4})",
                d.name()
            );
            println!("  near-tie at token {at} (margin {margin:.4})");
        }
        assert!(
            out.spec.accepted_tokens > 0,
            "{}: nothing accepted",
            d.name()
        );
    }
}

#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let smol = Model::load(&common::model_path("smollm2-135m")).unwrap();
    let qwen = common::model_path("qwen2.5-coder-0.5b");
    let e = load_draft_model(&qwen, &smol).unwrap_err().to_string();
    assert!(e.contains("vocabulary") && e.contains("49152"), "{e}");

    // Same size, two tokens swapped: caught by comparing token strings.
    let dir = std::env::temp_dir().join(format!("treespec-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    common::write_smollm2_hf_tokenizer(&dir);
    let same = Tokenizer::from_hf_dir(&dir).unwrap();
    check_vocabularies(&smol.tokenizer, &same).unwrap();
    let path = dir.join("tokenizer.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = j["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (
        smol.tokenizer.token_text(1000).unwrap().to_string(),
        smol.tokenizer.token_text(1001).unwrap().to_string(),
    );
    vocab.insert(a, 1001.into());
    vocab.insert(b, 1000.into());
    std::fs::write(&path, j.to_string()).unwrap();
    let swapped = Tokenizer::from_hf_dir(&dir).unwrap();
    let e = check_vocabularies(&smol.tokenizer, &swapped)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at token 1000"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);

    // Asking for a draft method without a draft model is a clear error.
    let cfg = SpecConfig {
        method: SpecMethod::Draft,
        ..Default::default()
    };
    let e = SpecDrafter::build(&cfg, 49152).err().unwrap().to_string();
    assert!(e.contains("--draft-model"), "{e}");
}

/// `hybrid-draft` under `--tree auto`: the controller's gate runs the
/// draft model on some steps and leaves it off on others (the free sources
/// alone, sized by their estimate), the draft catching up when it is next
/// on, and the output is plain decoding's token for token.
#[test]
fn the_gated_hybrid_draft_is_lossless() {
    use std::sync::{Arc, Mutex};
    use treespec::engine::budget::BudgetController;
    let path = common::model_path("smollm2-135m");
    let model = Model::load(&path).unwrap();
    let draft = load_draft_model(&path, &model).unwrap();
    let vocab = model.config().vocab_size;
    // A synthetic c(N) (flat, then steep): what is under test is that both
    // kinds of step run and stay lossless, not what pays on this host.
    let cost = common::synthetic_cost([10.0, 10.5, 11.0, 12.0, 20.0, 40.0, 80.0]);
    let controller = Arc::new(Mutex::new(BudgetController::new(&cost, 16)));
    let mut d = drafter(SpecMethod::HybridDraft, &draft, vocab);
    assert!(d.costly_source());
    let mut draft_forwards = 0;
    for text in PROMPTS {
        let prompt = common::chat_prompt(&model, text);
        let plain = run(&model, None, &prompt, 48, 0, SamplingParams::greedy());
        let opts = GenerateOptions {
            max_new_tokens: 48,
            max_draft: 16,
            auto_budget: Some(controller.clone()),
            ..Default::default()
        };
        let out = run_with(&model, Some(&mut d), &prompt, &opts);
        assert_eq!(out.tokens, plain.tokens, "hybrid-draft auto: {text}");
        draft_forwards += out.spec.draft_model.model_forwards;
    }
    let c = controller.lock().unwrap();
    let gate = c.gate().expect("the gate decided the steps");
    let classes = 0..treespec::draft::suffix::OUTLOOK_CLASSES;
    let arms = |c: &BudgetController| -> Vec<_> {
        classes.clone().flat_map(|k| c.estimates(0, k)).collect()
    };
    println!("gate arms: {:?}", arms(gate));
    let free: u32 = arms(gate)
        .iter()
        .filter(|a| a.budget == 0)
        .map(|a| a.pulls)
        .sum();
    let drafting: u32 = arms(gate)
        .iter()
        .filter(|a| a.budget > 0)
        .map(|a| a.pulls)
        .sum();
    assert!(free > 0, "no step drafted from the free sources alone");
    assert!(
        drafting > 0 && draft_forwards > 0,
        "the draft model never ran"
    );
    // The free steps were sized by the estimate, under the budget arms.
    let budget_arms: u32 = arms(&c).iter().map(|a| a.pulls).sum();
    assert_eq!(budget_arms, free, "every free step and only those");
}

/// One draft-model drafter stepping several sequences in turn (the server
/// batches them) keeps a cache per sequence: after each sequence's first
/// proposal, a step runs only the new tokens through the draft, not the
/// whole context again, and proposes exactly what a drafter of its own
/// would.
#[test]
fn interleaved_sequences_keep_their_draft_caches() {
    use treespec::draft::draft_model::{DraftModelConfig, ModelDrafter};
    let path = common::model_path("smollm2-135m");
    let model = Model::load(&path).unwrap();
    let draft = load_draft_model(&path, &model).unwrap();
    let vocab = model.config().vocab_size;
    let cfg = DraftModelConfig::default();
    let mut shared = ModelDrafter::new(draft.clone(), cfg.clone(), vocab);
    let mut own: Vec<ModelDrafter> = PROMPTS
        .iter()
        .map(|_| ModelDrafter::new(draft.clone(), cfg.clone(), vocab))
        .collect();
    let mut contexts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|t| common::chat_prompt(&model, t))
        .collect();
    // Nothing runs before a step drafts: the budget controller may never
    // draft, and then the draft's prefill would be wasted.
    shared.start(&contexts[0]);
    assert_eq!(shared.counters.model_tokens, 0);
    for round in 0..4 {
        for (i, ctx) in contexts.iter_mut().enumerate() {
            let before = shared.counters.model_tokens;
            // What the controller is told drafting now would first cost:
            // unknown before any catch-up was measured, the prompt's
            // prefill at a sequence's first step, nothing once in step.
            let lag_ms = shared.catch_up_ms(ctx);
            match (round, i) {
                (0, 0) => assert_eq!(lag_ms, 0.0, "nothing measured yet"),
                (0, _) => assert!(lag_ms > 0.0, "sequence {i}'s prompt is not in any cache"),
                _ => assert_eq!(lag_ms, 0.0, "round {round}, sequence {i} is in step"),
            }
            let t = shared.propose(ctx, 4);
            let run = shared.counters.model_tokens - before;
            assert_eq!(t, own[i].propose(ctx, 4), "round {round}, sequence {i}");
            if round > 0 {
                // The accepted token, the root, and the tree's depths.
                assert!(
                    run <= 2 + 4,
                    "round {round}, sequence {i}: {run} tokens re-run through the draft"
                );
            }
            // The first draft token "accepted", as the target would.
            ctx.push(t.tokens.get(1).copied().unwrap_or(t.tokens[0]));
        }
        // Only the prompts were catch-ups: a step's own sync is not one.
        assert_eq!(shared.counters.catch_ups, PROMPTS.len() as u64);
    }
}

/// SpecExtend's retrieval on a context several times longer than what the
/// draft keeps: the target's attention chooses the chunks, the draft's
/// working cache holds a fraction of the context, and the output is still
/// token-identical to plain decoding (the draft only proposes).
#[test]
fn retrieval_attends_to_part_of_a_long_context_and_stays_lossless() {
    use treespec::draft::draft_model::{DraftModelConfig, ModelDrafter};
    use treespec::draft::retrieval::RetrievalConfig;
    let path = common::model_path("smollm2-135m");
    let model = Model::load(&path).unwrap();
    let draft = load_draft_model(&path, &model).unwrap();
    let vocab = model.config().vocab_size;
    let retrieval = RetrievalConfig {
        chunk: 16,
        top_chunks: 4,
        every: 2,
        recent: 32,
    };
    let cfg = DraftModelConfig {
        retrieval: Some(retrieval),
        ..Default::default()
    };
    let facts: String = (0..40)
        .map(|i| {
            format!(
                "Item {i}: the locker of student number {i} holds {} books. ",
                (i * 7) % 13
            )
        })
        .collect();
    let text = format!(
        "{facts}\nFor each student from number 10 to number 30, write one line saying how many books their locker holds."
    );
    let prompt = common::chat_prompt(&model, &text);
    assert!(
        prompt.len() > 3 * retrieval.min_len() / 2,
        "{} tokens",
        prompt.len()
    );
    let plain = run(&model, None, &prompt, 48, 0, SamplingParams::greedy());
    let mut d = ModelDrafter::new(draft, cfg, vocab);
    let opts = GenerateOptions {
        max_new_tokens: 48,
        max_draft: 6,
        ..Default::default()
    };
    let out = run_with(&model, Some(&mut d), &prompt, &opts);
    assert_eq!(out.tokens, plain.tokens);
    let share = d.counters.retrieval_held_positions as f64
        / d.counters.retrieval_context_positions.max(1) as f64;
    println!(
        "retrievals {}, share attended {share:.2}, drafted {}, accepted {}",
        d.counters.retrievals, out.spec.drafted_tokens, out.spec.accepted_tokens
    );
    assert!(
        d.counters.retrievals >= 5,
        "{} retrievals",
        d.counters.retrievals
    );
    assert!(
        share < 0.5,
        "the draft attended to {share:.2} of the context"
    );
    assert!(out.spec.accepted_tokens > 0);
    // The request's stats (--json, /metrics) carry what the draft ran.
    assert_eq!(out.spec.draft_model, d.counters());
}
