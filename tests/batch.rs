//! Continuous batching: N requests stepped through one forward per step give
//! each exactly the tokens it gets alone (greedy), with and without
//! speculation, with prompts of different lengths chunked in beside decode
//! rows, and with one request cancelled mid-way.

mod common;

use treespec::draft::Drafter;
use treespec::engine::batch::{run_to_end, step, MIN_PREFILL_ROWS};
use treespec::engine::spec::{SpecConfig, SpecDrafter, SpecMethod};
use treespec::engine::PREFILL_CHUNK;
use treespec::engine::{generate, GenerateOptions, Sequence, Session, StopReason, TokenEvent};
use treespec::model::{common_prefix_len, Model};
use treespec::sampling::NEAR_TIE;

const PROMPTS: [&str; 4] = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three facts about the Moon.",
    // Long enough (with the template) to take several prefill chunks at a
    // small row budget, so its prefill runs beside the others' decoding.
    "Summarise the following text in one sentence. The quick brown fox jumps over the lazy dog. \
     The dog, annoyed, chases the fox across the field, through the hedge and into the forest, \
     where both of them get lost until the farmer finds them at dusk and brings them home.",
    "Translate to French: Good morning, how are you today?",
];

const NEW_TOKENS: usize = 40;

fn opts(max_draft: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: NEW_TOKENS,
        max_draft,
        ..Default::default()
    }
}

fn hybrid(model: &Model) -> SpecDrafter {
    let cfg = SpecConfig {
        method: SpecMethod::Hybrid,
        tree: "dynamic".into(),
        max_draft: 12,
        ..Default::default()
    };
    SpecDrafter::build(&cfg, model.config().vocab_size)
        .unwrap()
        .unwrap()
}

/// Plain single-request decoding of every prompt, with margins for near-tie
/// reporting.
fn alone(model: &Model, prompts: &[Vec<u32>]) -> Vec<(Vec<u32>, Vec<f32>)> {
    prompts
        .iter()
        .map(|p| {
            let mut s = Session::new(model, 1024);
            let o = GenerateOptions {
                record_margins: true,
                ..opts(0)
            };
            let g = generate(model, &mut s, None, p, &o, &mut |_| true).unwrap();
            (g.tokens, g.margins)
        })
        .collect()
}

/// Asserts `got` equals `want`, tolerating (and printing) a divergence that
/// starts at a floating-point near-tie.
fn assert_same(what: &str, got: &[u32], want: &(Vec<u32>, Vec<f32>)) {
    if got == want.0.as_slice() {
        return;
    }
    let at = common_prefix_len(got, &want.0);
    let margin = want.1.get(at).copied().unwrap_or(1.0);
    assert!(
        margin < NEAR_TIE,
        "{what}: batched output differs from the request alone at token {at} (top-2 margin {margin:.4})"
    );
    println!("near-tie: {what} diverges at token {at} (margin {margin:.4})");
}

/// SmolLM2 and the prompts, chat-templated.
fn load() -> (Model, Vec<Vec<u32>>) {
    let model = Model::load(&common::model_path("smollm2-135m")).unwrap();
    let prompts = PROMPTS
        .iter()
        .map(|t| common::chat_prompt(&model, t))
        .collect();
    (model, prompts)
}

/// One sequence per prompt, with the drafters given (none: plain); with
/// `cancel = Some((i, n))` request i's client leaves after n tokens.
fn start<'a>(
    model: &'a Model,
    prompts: &'a [Vec<u32>],
    drafters: &'a mut [SpecDrafter],
    o: GenerateOptions,
    cancel: Option<(usize, usize)>,
) -> Vec<Sequence<'a>> {
    let mut dref = drafters.iter_mut();
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let d = dref.next().map(|d| Box::new(d) as Box<dyn Drafter + 'a>);
            let mut seen = 0;
            let on_token = Box::new(move |e: &TokenEvent| {
                seen += (e.token != u32::MAX) as usize;
                cancel.is_none_or(|(at, n)| at != i || seen < n)
            });
            Sequence::new(model, Session::new(model, 1024), d, p, o.clone(), on_token)
                .map_err(|refused| refused.0)
                .unwrap()
        })
        .collect()
}

#[test]
fn batched_requests_match_each_alone() {
    let (model, prompts) = load();
    let want = alone(&model, &prompts);

    // Row budgets: 6 makes the long prompt prefill beside three decoding
    // requests in small chunks and leaves drafts almost no rows; 64 lets
    // trees grow.
    for max_rows in [6, 64] {
        for speculate in [false, true] {
            let mut drafters: Vec<SpecDrafter> = if speculate {
                prompts.iter().map(|_| hybrid(&model)).collect()
            } else {
                Vec::new()
            };
            let max_draft = if speculate { 12 } else { 0 };
            let seqs = start(&model, &prompts, &mut drafters, opts(max_draft), None);
            let outs = run_to_end(&model, seqs, max_rows);
            let mut steps = 0;
            for (i, ((g, session), w)) in outs.into_iter().zip(&want).enumerate() {
                let g = g.unwrap();
                let what = format!("prompt {i}, max_rows {max_rows}, speculate {speculate}");
                assert_same(&what, &g.tokens, w);
                // The session holds exactly prompt + output, ready for a
                // next turn (the last output token is not yet in the cache).
                assert_eq!(session.cache.len(), prompts[i].len() - 1 + g.tokens.len());
                steps += g.spec.steps;
                if speculate && max_rows == 64 {
                    assert!(
                        g.spec.steps < g.tokens.len(),
                        "{what}: speculation never accepted a draft token"
                    );
                }
            }
            println!("max_rows {max_rows} speculate {speculate}: {steps} steps in all");
        }
    }
}

/// Rows per forward never exceed the budget once every prompt is in (a
/// first prefill chunk may take MIN_PREFILL_ROWS), every live sequence gets
/// a row each step, and a request cancelled mid-way leaves the others
/// untouched.
#[test]
fn batch_shares_rows_and_survives_a_cancel() {
    let (model, prompts) = load();
    let want = alone(&model, &prompts);
    let mut drafters: Vec<SpecDrafter> = prompts.iter().map(|_| hybrid(&model)).collect();
    // Request 1's client goes away after 5 tokens.
    let mut seqs = start(&model, &prompts, &mut drafters, opts(12), Some((1, 5)));
    let max_rows = 10;
    let mut forwards = 0;
    loop {
        let mut live: Vec<&mut Sequence> = seqs.iter_mut().filter(|s| !s.is_finished()).collect();
        if live.is_empty() {
            break;
        }
        let n = live.len();
        let decoding = live.iter().filter(|s| !s.is_prefilling()).count();
        let prefilling = decoding < n;
        let r = step(&model, &mut live, max_rows);
        forwards += 1;
        assert_eq!(r.sequences, n, "every live sequence runs each step");
        if decoding == 0 {
            // Nobody waits on a token: prompts get a whole chunk.
            assert!(r.rows <= PREFILL_CHUNK.max(max_rows), "{r:?}");
        } else if prefilling {
            assert!(r.rows <= max_rows.max(decoding + MIN_PREFILL_ROWS), "{r:?}");
        } else {
            assert!(r.rows <= max_rows.max(n), "{r:?} over {max_rows} rows");
            assert_eq!(r.prefill_rows, 0);
        }
        assert!(forwards < 10_000, "the batch does not progress");
    }
    let outs: Vec<_> = seqs.into_iter().map(Sequence::finish).collect();
    for (i, ((g, _), w)) in outs.into_iter().zip(&want).enumerate() {
        let g = g.unwrap();
        if i == 1 {
            assert_eq!(g.stop, StopReason::Cancelled);
            assert_eq!(g.tokens.len(), 5);
            assert_same(
                "cancelled request",
                &g.tokens,
                &(w.0[..5].to_vec(), w.1.clone()),
            );
        } else {
            assert_same(&format!("prompt {i} beside a cancel"), &g.tokens, w);
        }
    }
}

/// A long shared system prompt, as a chat prompt with `question`.
fn with_system(model: &Model, question: &str) -> Vec<u32> {
    let system = "You are a careful assistant. Answer briefly and precisely. \
        Use plain words, no lists unless asked, and say so when you do not know. "
        .repeat(8);
    let msgs = [
        treespec::tokenizer::ChatMessage {
            role: "system".into(),
            content: system,
        },
        treespec::tokenizer::ChatMessage {
            role: "user".into(),
            content: question.into(),
        },
    ];
    let t = model.tokenizer.apply_chat_template(&msgs, true).unwrap();
    model.tokenizer.encode(&t, true).unwrap()
}

/// A request whose prompt starts with blocks another request left in the
/// prefix cache prefills only the rest (counted) and emits what it emits
/// with no cache; under a budget of one block, eviction keeps outputs
/// exact.
#[test]
fn prefix_cache_restores_shared_prompts_exactly() {
    use treespec::engine::prefix_cache::{PrefixCache, BLOCK};
    let (model, _) = load();
    let first = with_system(&model, "What is the capital of Italy?");
    let second = with_system(&model, "Name a large mammal.");
    let shared = common_prefix_len(&first, &second);
    assert!(
        shared >= 2 * BLOCK,
        "the system prompt spans {shared} tokens"
    );
    let want = alone(&model, std::slice::from_ref(&second)).remove(0);
    let run = |session: &mut Session| {
        generate(&model, session, None, &second, &opts(0), &mut |_| true).unwrap()
    };
    let block_bytes = {
        let mut s = Session::new(&model, 1024);
        generate(&model, &mut s, None, &first, &opts(0), &mut |_| true).unwrap();
        let mut one = PrefixCache::new(usize::MAX);
        s.save_prefix(&mut one);
        one.stats().bytes / one.stats().blocks
    };
    for budget in [64 << 20, block_bytes] {
        let mut prefix = PrefixCache::new(budget);
        let mut a = Session::new(&model, 1024);
        generate(&model, &mut a, None, &first, &opts(0), &mut |_| true).unwrap();
        a.save_prefix(&mut prefix);
        // Another request's blocks too, so the small budget must evict.
        let mut c = Session::new(&model, 1024);
        let other = common::chat_prompt(&model, &"Count from one to twenty. ".repeat(12));
        generate(&model, &mut c, None, &other, &opts(0), &mut |_| true).unwrap();
        c.save_prefix(&mut prefix);

        let mut b = Session::new(&model, 1024);
        let restored = b.restore_prefix(&mut prefix, &second);
        let g = run(&mut b);
        assert_same(&format!("budget {budget}"), &g.tokens, &want);
        assert_eq!(g.stats.prefilled_tokens, second.len() - restored);
        let s = prefix.stats();
        assert!(s.bytes <= budget);
        if budget == block_bytes {
            assert!(s.evictions > 0, "{s:?}");
            assert!(restored <= BLOCK);
        } else {
            assert_eq!(restored, shared / BLOCK * BLOCK);
            assert_eq!(s.hit_tokens, restored as u64);
        }
    }
}

/// `--tree auto` in a batch: the shared controller chooses each tree seeing
/// the rest of the forward (a synthetic c(N) with a flat stretch then a
/// steep one), trees shrink as the batch fills, and every request still
/// emits what it emits alone.
#[test]
fn auto_budget_in_a_batch_is_lossless() {
    use std::sync::{Arc, Mutex};
    use treespec::engine::budget::BudgetController;
    let (model, prompts) = load();
    let want = alone(&model, &prompts);
    let cost = common::synthetic_cost([10.0, 10.5, 11.0, 12.0, 20.0, 40.0, 80.0]);
    let controller = Arc::new(Mutex::new(BudgetController::new(&cost, 16)));
    let mut drafters: Vec<SpecDrafter> = prompts.iter().map(|_| hybrid(&model)).collect();
    let o = GenerateOptions {
        auto_budget: Some(controller.clone()),
        ..opts(16)
    };
    let mut seqs = start(&model, &prompts, &mut drafters, o, None);
    let mut rows_by_batch: Vec<(usize, usize)> = Vec::new();
    loop {
        let mut live: Vec<&mut Sequence> = seqs.iter_mut().filter(|s| !s.is_finished()).collect();
        if live.is_empty() {
            break;
        }
        let decoding = live.iter().filter(|s| !s.is_prefilling()).count();
        let r = step(&model, &mut live, 64);
        if decoding == r.sequences && r.prefill_rows == 0 {
            rows_by_batch.push((r.sequences, r.rows));
        }
    }
    for (i, ((g, _), w)) in seqs
        .into_iter()
        .map(Sequence::finish)
        .zip(&want)
        .enumerate()
    {
        assert_same(&format!("auto, prompt {i}"), &g.unwrap().tokens, w);
    }
    let mean_rows = |n: usize| {
        let v: Vec<usize> = rows_by_batch
            .iter()
            .filter(|b| b.0 == n)
            .map(|b| b.1)
            .collect();
        (
            v.iter().sum::<usize>() as f64 / v.len().max(1) as f64,
            v.len(),
        )
    };
    println!(
        "rows per sequence by batch size: 4 -> {:?}, 1 -> {:?}",
        mean_rows(4),
        mean_rows(1)
    );
}
