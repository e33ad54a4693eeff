//! Fidelity to llama.cpp on the golden records of ../shared/golden.
//!
//! Teacher forcing: one forward over prompt + llama.cpp's greedy tokens gives
//! our logits at every step. Our argmax must equal llama.cpp's token at every
//! step before the first near-tie, which is exactly "our greedy continuation
//! equals llama.cpp's up to the first near-tie". The largest log-probability
//! difference on llama.cpp's top-5 tokens is reported. A separate test runs
//! the real generation loop.
//!
//! What counts as a near-tie *between two implementations*: activations are
//! quantized to int8 blocks before every matmul (llama.cpp does the same), so
//! a 1-ulp difference anywhere flips some roundings and moves later logits by
//! far more than float noise. Measured on SmolLM2 (Q4_1): our own scalar and
//! AVX-512 paths, which agree to 1e-4 per matmul, end up 0.4–0.6 nats apart on
//! p ≈ 0.02 tokens, and a step with a top-2 margin of 0.086 (llama.cpp's
//! chat0 step 27) flips between them. So against llama.cpp a divergence is
//! tolerated, and reported, where either side's top-2 margin is below
//! CROSS_IMPL_TIE; our own speculative-vs-plain equality (tests/lossless.rs)
//! stays at the strict 0.02.

mod common;

use treespec::engine::{generate, GenerateOptions, Session, PREFILL_CHUNK};
use treespec::model::Model;
use treespec::sampling::{argmax, top2_margin};

/// See the module comment.
const CROSS_IMPL_TIE: f32 = 0.1;
/// A cross-implementation near-tie (one llama.cpp's own record does not flag)
/// may end a prompt's comparison only after this many matched steps: a
/// real defect that flips an early low-margin step must not pass as a tie.
/// (Every golden prompt matched at least this far when it was set.)
const MIN_STEPS_BEFORE_CROSS_TIE: usize = 8;

fn log_softmax_at(row: &[f32], ids: &[u32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    ids.iter().map(|&i| row[i as usize] as f64 - lse).collect()
}

fn check_model(name: &str) {
    let model = Model::load(&common::model_path(name)).expect("model loads");
    let mut failures = Vec::new();
    let mut worst_lp = 0f64;
    let mut worst_at = String::new();
    println!("{name}:");
    for g in common::golden(name)
        .iter()
        .filter(|g| g["kind"] == "generate")
    {
        let id = g["id"].as_str().unwrap();
        let prompt = common::ids(&g["prompt_ids"]);
        let want = common::ids(&g["tokens"]);
        let ties: Vec<bool> = g["near_tie"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_bool().unwrap())
            .collect();
        let mut seq = prompt.clone();
        seq.extend(&want);
        // Row i predicts want[i].
        let rows = model
            .decoder
            .teacher_forced(&seq[..seq.len() - 1], prompt.len() - 1, PREFILL_CHUNK)
            .unwrap();
        let mut matched = 0;
        let mut note = String::new();
        for (i, row) in rows.iter().enumerate() {
            let tops = g["top_logprobs"][i].as_array().unwrap();
            let top_ids: Vec<u32> = tops
                .iter()
                .map(|t| t["id"].as_u64().unwrap() as u32)
                .collect();
            let top_lp: Vec<f64> = tops
                .iter()
                .map(|t| t["logprob"].as_f64().unwrap())
                .collect();
            let ours = argmax(row);
            if ours != want[i] {
                let our_margin = top2_margin(row);
                // llama.cpp's own top-2 margin at this step (when aligned).
                let theirs = if top_ids.first() == Some(&want[i]) && top_lp.len() > 1 {
                    (top_lp[0].exp() - top_lp[1].exp()) as f32
                } else {
                    0.0
                };
                let cross_tie = our_margin < CROSS_IMPL_TIE || theirs < CROSS_IMPL_TIE;
                if ties[i] || (cross_tie && matched >= MIN_STEPS_BEFORE_CROSS_TIE) {
                    note = format!(
                        " (then a near-tie: llama.cpp margin {theirs:.3}, ours {our_margin:.3})"
                    );
                } else if cross_tie {
                    note = " (EARLY TIE)".into();
                    failures.push(format!(
                        "{id}: step {i}: ours {ours} vs llama.cpp {}: a near-tie (llama.cpp margin {theirs:.3}, ours {our_margin:.3}) after only {matched} matched steps (at least {MIN_STEPS_BEFORE_CROSS_TIE} needed)",
                        want[i]
                    ));
                } else {
                    note = " (MISMATCH)".into();
                    failures.push(format!(
                        "{id}: step {i}: ours {ours} vs llama.cpp {} (our margin {our_margin:.3})",
                        want[i]
                    ));
                }
                break;
            }
            // llama.cpp's server shifts its probabilities around tokens that
            // end mid-character (CJK, emoji); compare only aligned steps.
            let aligned = top_ids.first() == Some(&want[i]);
            for (a, b) in log_softmax_at(row, &top_ids).iter().zip(&top_lp) {
                if !aligned {
                    break;
                }
                // Only tokens with real mass: far tails are dominated by rounding.
                if *b > -5.0 && (a - b).abs() > worst_lp {
                    worst_lp = (a - b).abs();
                    worst_at = format!("{id} step {i}: ours {a:.3}, llama.cpp {b:.3}");
                }
            }
            matched += 1;
            if ties[i] {
                note = " (stopped comparing at llama.cpp's near-tie)".into();
                break;
            }
        }
        println!("  {id}: {matched}/{} steps match{note}", want.len());
    }
    println!("  largest |logprob difference| on llama.cpp's top-5 (p > e^-5): {worst_lp:.4} at {worst_at}");
    assert!(failures.is_empty(), "{name}: {failures:#?}");
    // A real bug (rope, masking, a wrong tensor) moves these by several nats;
    // int8 activation rounding moves single steps of this 4-bit 135M model
    // by up to about a nat (1.12 seen; reported above), Qwen 0.5B by 0.34.
    assert!(
        worst_lp < 1.5,
        "{name}: log-probabilities drift by {worst_lp}"
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_model("smollm2-135m");
}

#[test]
fn qwen_0_5b_matches_llama_cpp() {
    check_model("qwen2.5-coder-0.5b");
}

/// The real generation loop (prefill, root, verify, keep) gives the golden
/// greedy continuation too.
#[test]
fn generation_loop_reproduces_golden_greedy() {
    let name = "smollm2-135m";
    let model = Model::load(&common::model_path(name)).unwrap();
    let mut session = Session::new(&model, 2048);
    for g in common::golden(name)
        .iter()
        .filter(|g| g["kind"] == "generate")
        .take(3)
    {
        let prompt = common::ids(&g["prompt_ids"]);
        let want = common::ids(&g["tokens"]);
        let limit = g["near_tie"]
            .as_array()
            .unwrap()
            .iter()
            .position(|t| t.as_bool().unwrap())
            .unwrap_or(want.len());
        let opts = GenerateOptions {
            max_new_tokens: limit.min(24),
            ..Default::default()
        };
        let out = generate(&model, &mut session, None, &prompt, &opts, &mut |_| true).unwrap();
        assert_eq!(out.tokens[..], want[..out.tokens.len()], "{}", g["id"]);
        assert!(!out.tokens.is_empty());
    }
}
