//! Command-line front end. Library errors surface here through `anyhow`.

mod bench_forward;
mod bench_suite;
mod generate;
mod serve;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use treespec::model::Model;
use treespec::registry;

#[derive(Parser, Debug)]
#[command(
    name = "treespec",
    version,
    about = "Lossless tree speculative decoding for local LLMs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Fetch a catalogued model into the cache ($TREESPEC_HOME).
    Pull(PullArgs),
    /// Benchmarks.
    Bench(Box<BenchArgs>),
    /// Serve an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Catalogue name (see --list).
    pub name: Option<String>,
    /// List the catalogue.
    #[arg(long)]
    pub list: bool,
    /// Re-hash the cached file against the catalogue's sha256.
    #[arg(long)]
    pub verify: bool,
}

/// `treespec bench -m M --dataset F ... --out D` runs the benchmark suite;
/// `treespec bench forward ...` the forward-cost measurement.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Option<BenchMode>,
    #[command(flatten)]
    pub suite: bench_suite::SuiteArgs,
}

#[derive(Subcommand, Debug)]
pub enum BenchMode {
    /// Plain-decode speed and the cost of one forward over N new tokens.
    Forward(bench_forward::ForwardArgs),
}

/// Options every model-running command shares.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Catalogue name (pulled if missing), a .gguf file, or an HF directory.
    #[arg(short, long, env = "TREESPEC_MODEL", default_value = "smollm2-135m")]
    pub model: String,
    /// Worker threads (default: all cores).
    #[arg(short, long, env = "TREESPEC_THREADS")]
    pub threads: Option<usize>,
    /// KV cache size in tokens (capped at the model's trained context).
    #[arg(short = 'c', long, env = "TREESPEC_CTX_SIZE", default_value_t = 4096)]
    pub ctx_size: usize,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        if let Some(t) = self.threads {
            // The kernels' pool (matmul and attention: all the parallel work)
            // reads this when it starts, which is after this point.
            std::env::set_var("TREESPEC_THREADS", t.max(1).to_string());
        }
        let path: PathBuf = registry::resolve_model(&self.model, &registry::treespec_home(), true)
            .with_context(|| format!("model `{}`", self.model))?;
        let t = std::time::Instant::now();
        let model = Model::load(&path)?;
        tracing::info!(
            "loaded {} ({} layers, vocab {}) in {:.2} s",
            path.display(),
            model.config().n_layers,
            model.config().vocab_size,
            t.elapsed().as_secs_f64()
        );
        Ok(model)
    }
}

/// Speculative decoding options every generating command shares.
#[derive(Args, Debug, Clone)]
pub struct SpecArgs {
    /// Speculative method: none, pld, recycle, suffix, hybrid (suffix +
    /// prompt lookup + recycling, sharing the budget by what each source's
    /// nodes were accepted), hybrid-fixed (the same with a fixed split),
    /// hybrid-pld (prompt lookup + recycling).
    #[arg(long, env = "TREESPEC_SPEC", default_value = "hybrid")]
    pub spec: String,
    /// Tree shape for recycle/hybrid: `auto` (dynamic tree with the budget
    /// chosen each step from this machine's measured verify cost and the
    /// running acceptance; falls back to plain decoding when speculation
    /// does not pay), `dynamic` (best-first by stored probabilities), a
    /// template name (tr-4, tr-8, tr-16, tr-32, tr-80) or a template JSON file.
    #[arg(long, env = "TREESPEC_TREE", default_value = "auto")]
    pub tree: String,
    /// Draft nodes per step besides the root (the cap, with --tree auto).
    #[arg(long, env = "TREESPEC_SPEC_MAX_NODES", default_value_t = treespec::engine::spec::DEFAULT_MAX_DRAFT)]
    pub spec_max_nodes: usize,
    /// With --tree auto: the cap on draft nodes in steps where the drafter
    /// has a long confident match (a suffix copy), where long chains pay.
    #[arg(long, env = "TREESPEC_SPEC_MAX_LONG", default_value_t = treespec::engine::spec::DEFAULT_MAX_LONG_DRAFT)]
    pub spec_max_long: usize,
    /// Earlier requests' outputs the suffix drafter (suffix, hybrid) keeps
    /// in its global index (0 = only the request's own text).
    #[arg(long, env = "TREESPEC_SUFFIX_CACHE_REQUESTS", default_value_t = treespec::draft::suffix::DEFAULT_CACHE_REQUESTS)]
    pub suffix_cache_requests: usize,
    /// Do not seed the recycling matrix from the prompt's bigrams.
    #[arg(long)]
    pub no_prompt_seed: bool,
    /// Load the recycling matrix from FILE at start and save it there at the
    /// end (the suffix drafter's cache goes to FILE.suffix).
    #[arg(long, env = "TREESPEC_RECYCLE_STATE")]
    pub recycle_state: Option<PathBuf>,
    /// A smaller model with the same tokenizer that drafts for `--spec
    /// draft` (a chain) and `draft-tree` (several candidates per position),
    /// and adds its tree to `--spec hybrid`: catalogue name, .gguf file or
    /// HF directory.
    #[arg(long, env = "TREESPEC_DRAFT_MODEL")]
    pub draft_model: Option<String>,
    /// The draft model proposes a token only while the product of its
    /// probabilities from the root stays at or above this (llama.cpp's flag
    /// of the same name tests each token alone).
    #[arg(long, env = "TREESPEC_DRAFT_P_MIN", default_value_t = treespec::draft::draft_model::DEFAULT_P_MIN)]
    pub draft_p_min: f32,
    /// On long inputs the draft model attends only to the chunks of the
    /// context the target attended to most at its last verify, plus the
    /// first and the newest (SpecExtend's cross-model retrieval): draft
    /// steps stop growing with the context. Any choice stays lossless.
    #[arg(long, env = "TREESPEC_DRAFT_RETRIEVAL")]
    pub draft_retrieval: bool,
}

impl SpecArgs {
    pub fn config(&self) -> Result<treespec::engine::spec::SpecConfig> {
        Ok(treespec::engine::spec::SpecConfig {
            method: treespec::engine::spec::SpecMethod::parse(&self.spec)?,
            tree: self.tree.clone(),
            max_draft: self.spec_max_nodes,
            max_long_draft: self.spec_max_long.max(self.spec_max_nodes),
            suffix_cache_requests: self.suffix_cache_requests,
            seed_from_prompt: !self.no_prompt_seed,
            recycle_state: self.recycle_state.clone(),
            draft_model: None,
            draft_p_min: self.draft_p_min,
            draft_retrieval: self.draft_retrieval,
        })
    }

    /// `--draft-model`, loaded and checked against `target`'s vocabulary.
    pub fn load_draft(
        &self,
        target: &Model,
    ) -> Result<Option<treespec::draft::draft_model::DraftModel>> {
        let Some(name) = &self.draft_model else {
            return Ok(None);
        };
        let method = treespec::engine::spec::SpecMethod::parse(&self.spec)?;
        if !method.needs_draft_model() && method != treespec::engine::spec::SpecMethod::Hybrid {
            tracing::warn!(
                "--draft-model is unused by --spec {} (draft, draft-tree and the hybrids use it)",
                method.name()
            );
            return Ok(None);
        }
        let path = registry::resolve_model(name, &registry::treespec_home(), true)
            .with_context(|| format!("draft model `{name}`"))?;
        let d = treespec::engine::spec::load_draft_model(&path, target)
            .with_context(|| format!("draft model `{name}`"))?;
        tracing::info!(
            "draft model {} ({} layers)",
            path.display(),
            d.0.config().n_layers
        );
        Ok(Some(d))
    }
}

/// The `--tree auto` controller for `model`, if the configuration asks for one.
pub fn auto_budget(
    model: &Model,
    spec: &treespec::engine::spec::SpecConfig,
) -> Result<Option<treespec::engine::budget::SharedBudget>> {
    Ok(treespec::engine::budget::controller_for(
        model,
        spec,
        &registry::treespec_home(),
    )?)
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        // The server's per-request lines are its access log: on by default.
        0 => "warn,treespec::server=info",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Pull(a) => pull(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(b) => match b.mode {
            Some(BenchMode::Forward(a)) => bench_forward::run(a),
            None => bench_suite::run(b.suite),
        },
    }
}

fn pull(a: PullArgs) -> Result<()> {
    let home = registry::treespec_home();
    if a.list || a.name.is_none() {
        for e in registry::catalogue() {
            let path = home.join("models").join(format!("{}.gguf", e.name));
            let state = if path.exists() { "cached" } else { "-" };
            println!("{:<22} {:>6} MB  {}", e.name, e.size / 1_000_000, state);
        }
        return Ok(());
    }
    let name = a.name.unwrap_or_default();
    let path = registry::pull(&name, &home, true)?;
    if a.verify {
        registry::verify(&name, &home)?;
        eprintln!("sha256 ok");
    }
    println!("{}", path.display());
    Ok(())
}
