//! `treespec bench forward`: plain decode speed and the forward-cost curve
//! c(N) = median wall time of one forward over N new tokens with all logits,
//! after `--ctx` tokens are cached. Configurations are interleaved rep by rep
//! because this machine's memory bandwidth drifts over tens of seconds.

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use treespec::engine::{self, GenerateOptions, Session};
use treespec::model::Model;

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
    /// Also print where each forward's time goes, stage by stage.
    #[arg(long)]
    pub profile: bool,
    /// Peer figures to print beside ours (llama.cpp's section of a file
    /// laid out like the shared peers.md); skipped if the file is missing.
    #[arg(long, default_value = "../shared/peers.md")]
    pub peers: std::path::PathBuf,
    /// Measure llama.cpp in the same run instead of reading --peers:
    /// `llama.cpp` (the build scripts/peers/llama_cpp.sh caches) or
    /// `llama.cpp=PATH`. Its plain decode (llama-bench tg64) and c(N)
    /// (llama-batched-bench: N sequences over a shared --ctx-token prompt,
    /// one decode step = one batch of N rows, all with logits).
    #[arg(long, value_name = "llama.cpp[=PATH]")]
    pub peer: Option<String>,
}

pub use treespec::engine::budget::CostPoint as CurvePoint;

#[derive(Serialize)]
pub struct ForwardReport {
    pub model: String,
    pub threads: usize,
    pub isa: String,
    pub decode_tok_s: f64,
    pub curve: Vec<CurvePoint>,
    /// Measured read bandwidth of this machine (all threads), GB/s.
    pub read_bandwidth_gb_s: f64,
    /// Bytes of weights one forward streams: the layers' projections and
    /// the LM head (not the embedding table, which is only looked up).
    pub weight_bytes: u64,
    /// weight_bytes / bandwidth: no forward can be faster than this.
    pub bandwidth_floor_ms: f64,
    /// Multiply-adds of the weight matmuls per token.
    pub macs_per_token: u64,
    /// Peak int8 multiply-add rate of the kernels' instruction on all
    /// threads (GMAC/s; `None` off the AVX-512 path): N tokens' matmuls
    /// cannot take less than N × macs_per_token / peak.
    pub int8_peak_gmac_s: Option<f64>,
    /// llama.cpp's figures for this model: measured in this run with
    /// `--peer`, else from `--peers` (history from another host), if any.
    pub llama_cpp: Option<treespec::bench::peers::PeerForward>,
    /// Where `llama_cpp` comes from: "same run (<version>)" or the file.
    pub llama_cpp_source: Option<String>,
}

/// llama.cpp measured now, on this host, with the same threads: plain
/// decode between two of ours (A-B-A, since bandwidth drifts), then c(N).
fn measure_peer(
    spec: &str,
    model: &Model,
    ctx: usize,
    ns: &[usize],
) -> Result<(treespec::bench::peers::PeerForward, String)> {
    use treespec::bench::llama_cpp::{self as peer, LlamaCpp};
    let found = LlamaCpp::locate(spec, &treespec::registry::treespec_home())?;
    anyhow::ensure!(
        model.path.is_file(),
        "--peer needs a .gguf model file for llama.cpp, not {}",
        model.path.display()
    );
    let threads = treespec::kernels::threads();
    eprintln!("llama.cpp ({}): llama-bench tg64 …", found.version);
    let tg = peer::decode_tok_s(&found, &model.path, threads)?;
    eprintln!("llama.cpp: llama-batched-bench c(N) …");
    let curve = peer::forward_curve(&found, &model.path, threads, ctx, ns)?;
    Ok((
        treespec::bench::peers::PeerForward {
            decode_tok_s: Some(tg),
            curve,
        },
        format!("same run, llama.cpp {}", found.version),
    ))
}

/// Plain decode tok/s: 64 greedy tokens after a 32-token prompt, EOS ignored.
fn plain_decode_tok_s(model: &Model, ctx_size: usize) -> Result<f64> {
    let prompt: Vec<u32> = (0..32u32)
        .map(|i| (i * 7919 + 13) % model.config().vocab_size as u32)
        .collect();
    let mut session = Session::new(model, ctx_size);
    let opts = GenerateOptions {
        max_new_tokens: 64,
        ignore_eos: true,
        ..Default::default()
    };
    let g = engine::generate(model, &mut session, None, &prompt, &opts, &mut |_| true)?;
    Ok(g.stats.decode_tok_s)
}

/// Measures c(N) for each N in `ns` on `model` after `ctx` cached tokens.
pub fn forward_curve(
    model: &Model,
    ctx: usize,
    ns: &[usize],
    reps: usize,
) -> Result<Vec<CurvePoint>> {
    Ok(treespec::engine::budget::measure_curve(
        model, ctx, ns, reps,
    )?)
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let model = a.model.load()?;
    let threads = treespec::kernels::threads();
    let curve = forward_curve(&model, a.ctx, &a.n, a.reps.max(1))?;
    let mut decode_tok_s = plain_decode_tok_s(&model, a.model.ctx_size)?;
    let bw = treespec::kernels::read_bandwidth_gb_s(1 << 30, 7);
    let peak = treespec::kernels::int8_peak_gmac_s();
    let macs_per_token = model.config().matmul_macs_per_token();
    let weight_bytes = model.decoder.weight_bytes_per_forward() as u64;
    let model_name = model
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| a.model.model.clone());
    let (llama_cpp, llama_cpp_source) = match &a.peer {
        Some(spec) => {
            let (p, src) = measure_peer(spec, &model, a.ctx, &a.n)?;
            // The second half of A-B-A: ours again after the peer's tg.
            let again = plain_decode_tok_s(&model, a.model.ctx_size)?;
            decode_tok_s = (decode_tok_s + again) / 2.0;
            (Some(p), Some(src))
        }
        None => {
            let p = std::fs::read_to_string(&a.peers)
                .ok()
                .map(|t| treespec::bench::peers::llama_cpp_forward(&t, &model_name))
                .filter(|p| !p.is_empty());
            let src = p.as_ref().map(|_| {
                format!(
                    "{} (another host: history, not a yardstick)",
                    a.peers.display()
                )
            });
            (p, src)
        }
    };
    let report = ForwardReport {
        llama_cpp,
        llama_cpp_source,
        read_bandwidth_gb_s: bw,
        weight_bytes,
        bandwidth_floor_ms: weight_bytes as f64 / (bw * 1e9) * 1e3,
        macs_per_token,
        int8_peak_gmac_s: peak,
        model: a.model.model.clone(),
        threads,
        isa: treespec::kernels::isa().to_string(),
        decode_tok_s,
        curve,
    };
    let c1 = report.curve.first().map(|p| p.ms).unwrap_or(f64::NAN);
    println!(
        "model {}  threads {}  isa {}",
        report.model, report.threads, report.isa
    );
    let peer = report.llama_cpp.as_ref();
    match peer.and_then(|p| p.decode_tok_s) {
        Some(t) => println!(
            "plain decode: {:.1} tok/s (llama.cpp {:.1} tok/s, {}: {:.2}x)",
            report.decode_tok_s,
            t,
            report.llama_cpp_source.as_deref().unwrap_or("?"),
            report.decode_tok_s / t
        ),
        None => println!("plain decode: {:.1} tok/s", report.decode_tok_s),
    }
    println!(
        "read bandwidth {:.1} GB/s; streaming {:.0} MB of weights takes >= {:.2} ms",
        report.read_bandwidth_gb_s,
        report.weight_bytes as f64 / 1e6,
        report.bandwidth_floor_ms
    );
    if let Some(peak) = report.int8_peak_gmac_s {
        println!(
            "int8 multiply-add peak {:.0} GMAC/s; one token's matmuls ({:.0} M multiply-adds) take >= {:.2} ms",
            peak,
            report.macs_per_token as f64 / 1e6,
            report.macs_per_token as f64 / (peak * 1e9) * 1e3
        );
    }
    // floor: the larger of the two lower bounds (bandwidth, compute) over
    // the measured time; GMAC/s: the weight matmuls' multiply-adds per second
    // of the whole forward.
    println!(
        "{:>5} {:>10} {:>10} {:>11} {:>8} {:>14} {:>16}",
        "N", "ms", "c(N)/c(1)", "floor/c(N)", "GMAC/s", "llama.cpp ms", "llama.cpp c/c1"
    );
    let peer_c1 = peer.and_then(|p| p.ms(1));
    for p in &report.curve {
        let (pm, pr) = match (peer.and_then(|q| q.ms(p.n)), peer_c1) {
            (Some(m), Some(m1)) => (format!("{m:.1}"), format!("{:.2}", m / m1)),
            (Some(m), None) => (format!("{m:.1}"), "-".into()),
            _ => ("-".into(), "-".into()),
        };
        let macs = (p.n as u64 * report.macs_per_token) as f64;
        let compute_floor_ms = report
            .int8_peak_gmac_s
            .map_or(0.0, |peak| macs / (peak * 1e9) * 1e3);
        println!(
            "{:>5} {:>10.2} {:>10.2} {:>11.2} {:>8.0} {:>14} {:>16}",
            p.n,
            p.ms,
            p.ms / c1,
            report.bandwidth_floor_ms.max(compute_floor_ms) / p.ms,
            macs / (p.ms * 1e6),
            pm,
            pr
        );
    }
    if a.profile {
        print_profile(&model, a.ctx, &a.n, a.reps.max(1))?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// Per N, the mean ms each decoder stage takes in one forward (a separate
/// pass: timing every stage adds a little overhead of its own).
fn print_profile(model: &Model, ctx: usize, ns: &[usize], reps: usize) -> Result<()> {
    use treespec::model::profile::Stage;
    println!("\nms per forward by stage (mean of {reps})");
    print!("{:<16}", "stage");
    for n in ns {
        print!(" {:>8}", format!("N={n}"));
    }
    println!();
    let mut cols = Vec::new();
    for &n in ns {
        cols.push(treespec::engine::budget::profile_forward(
            model, ctx, n, reps,
        )?);
    }
    for (i, s) in Stage::ALL.iter().enumerate() {
        print!("{:<16}", s.name());
        for c in &cols {
            print!(" {:>8.2}", c[i]);
        }
        println!();
    }
    print!("{:<16}", "total");
    for c in &cols {
        print!(" {:>8.2}", c.iter().sum::<f64>());
    }
    println!();
    Ok(())
}
