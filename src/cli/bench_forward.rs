//! `treespec bench forward`: plain decode speed and the forward-cost curve
//! c(N) = median wall time of one forward over N new tokens with all logits,
//! after `--ctx` tokens are cached. Configurations are interleaved rep by rep
//! because this machine's memory bandwidth drifts over tens of seconds.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use treespec::engine::{self, GenerateOptions, Session};
use treespec::model::{LogitRows, Model};

use super::ModelArgs;

#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens already cached when each forward runs.
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// N values to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub n: Vec<usize>,
    /// Repetitions per N (median reported).
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
pub struct CurvePoint {
    pub n: usize,
    pub ms: f64,
}

#[derive(Serialize)]
pub struct ForwardReport {
    pub model: String,
    pub threads: usize,
    pub isa: String,
    pub decode_tok_s: f64,
    pub curve: Vec<CurvePoint>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Measures c(N) for each N in `ns` on `model` after `ctx` cached tokens.
pub fn forward_curve(model: &Model, ctx: usize, ns: &[usize], reps: usize) -> Result<Vec<CurvePoint>> {
    let dec = &model.decoder;
    let vocab = dec.config.vocab_size as u32;
    let maxn = ns.iter().copied().max().unwrap_or(1);
    let mut cache = dec.new_cache(ctx + maxn + 1);
    // Deterministic pseudo-text: token ids spread over the vocabulary.
    let toks: Vec<u32> = (0..ctx + maxn).map(|i| (i as u32 * 7919 + 13) % vocab).collect();
    for chunk in toks[..ctx].chunks(engine::PREFILL_CHUNK) {
        let base = cache.len();
        let pos: Vec<usize> = (base..base + chunk.len()).collect();
        let par: Vec<Option<usize>> = (0..chunk.len()).map(|i| i.checked_sub(1)).collect();
        dec.forward(&mut cache, chunk, &pos, &par, LogitRows::None)?;
        cache.keep_all();
    }
    let mut times = vec![Vec::new(); ns.len()];
    for rep in 0..=reps {
        for (k, &n) in ns.iter().enumerate() {
            let pos: Vec<usize> = (ctx..ctx + n).collect();
            let par: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
            let t = Instant::now();
            dec.forward(&mut cache, &toks[ctx..ctx + n], &pos, &par, LogitRows::All)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            cache.truncate(ctx);
            if rep > 0 {
                // rep 0 warms caches and page tables
                times[k].push(ms);
            }
        }
    }
    Ok(ns
        .iter()
        .zip(times)
        .map(|(&n, t)| CurvePoint { n, ms: median(t) })
        .collect())
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let model = a.model.load()?;
    let threads = rayon::current_num_threads();
    let curve = forward_curve(&model, a.ctx, &a.n, a.reps.max(1))?;

    // Plain decode: 64 greedy tokens after a short prompt, EOS ignored.
    let prompt: Vec<u32> = (0..32u32).map(|i| (i * 7919 + 13) % model.config().vocab_size as u32).collect();
    let mut session = Session::new(&model, a.model.ctx_size);
    let opts = GenerateOptions {
        max_new_tokens: 64,
        ignore_eos: true,
        ..Default::default()
    };
    let g = engine::generate(&model, &mut session, None, &prompt, &opts, &mut |_| true)?;
    let report = ForwardReport {
        model: a.model.model.clone(),
        threads,
        isa: treespec::kernels::isa().to_string(),
        decode_tok_s: g.stats.decode_tok_s,
        curve,
    };
    let c1 = report.curve.first().map(|p| p.ms).unwrap_or(f64::NAN);
    println!("model {}  threads {}  isa {}", report.model, report.threads, report.isa);
    println!("plain decode: {:.1} tok/s", report.decode_tok_s);
    println!("{:>5} {:>10} {:>8}", "N", "ms", "c(N)/c(1)");
    for p in &report.curve {
        println!("{:>5} {:>10.2} {:>8.2}", p.n, p.ms, p.ms / c1);
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
