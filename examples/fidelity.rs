//! Where does treespec's greedy text depart from llama.cpp's, and whose
//! rounding is it? A study tool for the golden records of ../shared/golden.
//!
//! ```text
//! cargo run --release --example fidelity -- smollm2-135m
//! TREESPEC_ISA=scalar cargo run --release --example fidelity -- smollm2-135m
//! ```
//!
//! For every `generate` record (llama.cpp's greedy tokens and its top-5
//! log-probabilities per step) three implementations are teacher-forced on
//! llama.cpp's tokens, on the same GGUF file:
//!
//! - treespec, on the kernel path `TREESPEC_ISA` selects (int8 activations);
//! - candle-transformers' quantized model as it ships: activations rounded
//!   to Q8 blocks before every matmul, as ggml does ("candle-q8");
//! - the same model with every weight dequantized to f32
//!   (`CANDLE_DEQUANTIZE_ALL`), so no activation is rounded at all
//!   ("exact"): the reference both int8 paths approximate.
//!
//! For each, the first step where its argmax is not llama.cpp's token. At
//! treespec's departure it prints both engines' top-2 margins, and what the
//! exact model says there: its own margin and p(llama.cpp's token) minus
//! p(treespec's token). A departure where the exact model's margin is small
//! and it sides with either engine at random is activation rounding; one
//! where the exact model clearly agrees with llama.cpp is a treespec bug.

use std::io::Seek;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use treespec::engine::PREFILL_CHUNK;
use treespec::model::Model;
use treespec::sampling::{argmax, top2_margin, NEAR_TIE};

/// One generate record of a golden file.
struct Record {
    id: String,
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    /// llama.cpp's top-2 probability margin per step (NaN when its top-1 is
    /// not the token it emitted: llama-server shifts its probabilities
    /// around tokens that end mid-character).
    margin: Vec<f32>,
    near_tie: Vec<bool>,
}

/// What one implementation says at one step.
#[derive(Clone, Copy)]
struct Step {
    argmax: u32,
    margin: f32,
}

fn softmax_at(row: &[f32], ids: &[u32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    ids.iter()
        .map(|&i| (row[i as usize] as f64 - max).exp() / sum)
        .collect()
}

fn read_golden(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let ids = |v: &serde_json::Value| -> Result<Vec<u32>> {
        v.as_array()
            .context("expected an array of ids")?
            .iter()
            .map(|x| x.as_u64().map(|x| x as u32).context("expected an id"))
            .collect()
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let g: serde_json::Value = serde_json::from_str(line)?;
        if g["kind"] != "generate" {
            continue;
        }
        let mut tokens = ids(&g["tokens"])?;
        // Some records carry fewer top-5 lists than tokens (smollm2 chat2
        // and chat7): compare only the steps whose margins are known.
        let known = g["top_logprobs"].as_array().map_or(0, Vec::len);
        tokens.truncate(known);
        let mut margin = Vec::new();
        for (i, &t) in tokens.iter().enumerate() {
            let tops = g["top_logprobs"][i].as_array().context("top_logprobs")?;
            let lp = |k: usize| tops.get(k).and_then(|x| x["logprob"].as_f64());
            let aligned = tops.first().and_then(|x| x["id"].as_u64()) == Some(t as u64);
            margin.push(match (aligned, lp(0), lp(1)) {
                (true, Some(a), Some(b)) => (a.exp() - b.exp()) as f32,
                _ => f32::NAN,
            });
        }
        let near_tie = g["near_tie"]
            .as_array()
            .context("near_tie")?
            .iter()
            .map(|b| b.as_bool().unwrap_or(false))
            .collect();
        out.push(Record {
            id: g["id"].as_str().unwrap_or("?").to_string(),
            prompt: ids(&g["prompt_ids"])?,
            tokens,
            margin,
            near_tie,
        });
    }
    Ok(out)
}

/// A candle-transformers model of the GGUF's architecture, fed one chain.
enum Reference {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

impl Reference {
    fn load(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path)?;
        let ct = gguf_file::Content::read(&mut f)?;
        f.rewind()?;
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        Ok(match arch.as_str() {
            "llama" => Self::Llama(quantized_llama::ModelWeights::from_gguf(
                ct,
                &mut f,
                &Device::Cpu,
            )?),
            "qwen2" => Self::Qwen2(quantized_qwen2::ModelWeights::from_gguf(
                ct,
                &mut f,
                &Device::Cpu,
            )?),
            other => bail!("no candle reference wired up for architecture `{other}`"),
        })
    }

    /// Logits after the last of `ids`, which start at position `pos`.
    fn forward(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>> {
        let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let out = match self {
            Self::Llama(m) => m.forward(&input, pos)?,
            Self::Qwen2(m) => m.forward(&input, pos)?,
        };
        Ok(out.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Per record and step: the reference's argmax and margin, and its
/// probabilities of `probe[r][i]` (the tokens to weigh at step i).
type Probed = Vec<Vec<(Step, Vec<f64>)>>;

/// Runs the candle reference over every record, one token at a time after
/// the prompt (its forward returns only the last position's logits). Done in
/// a thread of its own: candle reads `CANDLE_DEQUANTIZE_ALL` once per thread,
/// when that thread loads its first quantized matrix.
fn run_reference(
    path: &Path,
    exact: bool,
    records: &[Record],
    probe: &[Vec<Vec<u32>>],
) -> Result<Probed> {
    if exact {
        // Set before the thread below loads anything; read by no other code.
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    } else {
        std::env::remove_var("CANDLE_DEQUANTIZE_ALL");
    }
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Probed> {
            let mut m = Reference::load(path)?;
            let mut out = Vec::new();
            for (rec, probe) in records.iter().zip(probe) {
                // Position 0 starts a fresh cache in both candle models.
                let mut row = m.forward(&rec.prompt, 0)?;
                let mut steps = Vec::new();
                for (i, weigh) in probe.iter().enumerate() {
                    let step = Step {
                        argmax: argmax(&row),
                        margin: top2_margin(&row),
                    };
                    steps.push((step, softmax_at(&row, weigh)));
                    if i + 1 < rec.tokens.len() {
                        row = m.forward(&rec.tokens[i..=i], rec.prompt.len() + i)?;
                    }
                }
                out.push(steps);
            }
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the reference thread panicked"))?
    })
}

fn first_departure(steps: impl Iterator<Item = u32>, want: &[u32]) -> Option<usize> {
    steps.zip(want).position(|(a, &b)| a != b)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model_arg) = args.first() else {
        bail!("usage: fidelity MODEL [GOLDEN.jsonl]   (MODEL: a catalogue name or a .gguf path)");
    };
    let home = treespec::registry::treespec_home();
    let path = treespec::registry::resolve_model(model_arg, &home, true)?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(model_arg)
        .to_string();
    let golden = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("../shared/golden/{stem}.jsonl")));
    let records = read_golden(&golden)?;

    // treespec, teacher-forced on llama.cpp's tokens.
    let model = Model::load(&path)?;
    let mut ours: Vec<Vec<Step>> = Vec::new();
    for rec in &records {
        let mut seq = rec.prompt.clone();
        seq.extend(&rec.tokens[..rec.tokens.len().saturating_sub(1)]);
        let rows = model
            .decoder
            .teacher_forced(&seq, rec.prompt.len() - 1, PREFILL_CHUNK)?;
        ours.push(
            rows.iter()
                .map(|r| Step {
                    argmax: argmax(r),
                    margin: top2_margin(r),
                })
                .collect(),
        );
    }
    drop(model);
    // At every step the references weigh llama.cpp's token and treespec's.
    let probe: Vec<Vec<Vec<u32>>> = records
        .iter()
        .zip(&ours)
        .map(|(rec, o)| {
            rec.tokens
                .iter()
                .zip(o)
                .map(|(&t, s)| vec![t, s.argmax])
                .collect()
        })
        .collect();
    let q8 = run_reference(&path, false, &records, &probe)?;
    let exact = run_reference(&path, true, &records, &probe)?;

    println!(
        "# {stem}: treespec ({} kernels) vs llama.cpp's golden greedy tokens; references: candle-q8, exact (f32 activations)\n",
        treespec::kernels::isa()
    );
    println!("Teacher-forced on llama.cpp's tokens. Margins are top-2 probability margins (p1 - p2); `m` in brackets is the exact model's at that step.\n");
    println!("| prompt | steps | treespec departs | llama.cpp margin | near-tie flag | treespec margin | exact margin | exact p(llama) - p(treespec) | exact departs from llama.cpp | treespec departs from exact | candle-q8 departs |");
    println!("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let (mut departed, mut exact_sides_llama, mut exact_close) = (0, 0, 0);
    let (mut exact_alone, mut llama_vs_exact, mut ours_vs_exact) = (0, 0usize, 0usize);
    let fmt = |m: f32| {
        if m.is_nan() {
            "n/a".to_string()
        } else {
            format!("{m:.4}")
        }
    };
    for (r, rec) in records.iter().enumerate() {
        let n = rec.tokens.len();
        let at = first_departure(ours[r].iter().map(|s| s.argmax), &rec.tokens);
        let ex_at = first_departure(exact[r].iter().map(|s| s.0.argmax), &rec.tokens);
        let exact_tokens: Vec<u32> = exact[r].iter().map(|s| s.0.argmax).collect();
        let ours_ex = first_departure(ours[r].iter().map(|s| s.argmax), &exact_tokens);
        let q8_at = first_departure(q8[r].iter().map(|s| s.0.argmax), &rec.tokens);
        // Steps each engine agrees with the exact model (on this path).
        llama_vs_exact += ex_at.unwrap_or(n);
        ours_vs_exact += ours_ex.unwrap_or(n);
        let with_m = |x: Option<usize>| {
            x.map_or("-".to_string(), |i| {
                format!("{i} (m {:.4})", exact[r][i].0.margin)
            })
        };
        let show = |x: Option<usize>| x.map_or("-".to_string(), |i| i.to_string());
        if ex_at.is_some() {
            exact_alone += 1;
        }
        let Some(i) = at else {
            println!(
                "| {} | {n} | - | | | | | | {} | {} | {} |",
                rec.id,
                with_m(ex_at),
                with_m(ours_ex),
                show(q8_at)
            );
            continue;
        };
        departed += 1;
        let (ex_step, ex_p) = &exact[r][i];
        let diff = ex_p[0] - ex_p[1];
        if diff > 0.0 {
            exact_sides_llama += 1;
        }
        if ex_step.margin < 0.1 {
            exact_close += 1;
        }
        println!(
            "| {} | {n} | {i} | {} | {} | {:.4} | {:.4} | {:+.4} | {} | {} | {} |",
            rec.id,
            fmt(rec.margin[i]),
            if rec.near_tie[i] { "yes" } else { "no" },
            ours[r][i].margin,
            ex_step.margin,
            diff,
            with_m(ex_at),
            with_m(ours_ex),
            show(q8_at)
        );
    }
    println!(
        "\n{} prompts. treespec departs from llama.cpp on {departed}; at those steps the exact model has a top-2 margin below 0.1 on {exact_close} and prefers llama.cpp's token on {exact_sides_llama}. The exact model itself departs from llama.cpp on {exact_alone}. Steps in agreement with the exact model before the first departure, summed over prompts: llama.cpp {llama_vs_exact}, treespec {ours_vs_exact}. (llama.cpp's own near-tie threshold: {NEAR_TIE}.)",
        records.len()
    );
    Ok(())
}
