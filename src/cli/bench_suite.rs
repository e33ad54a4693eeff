//! `treespec bench -m MODEL --dataset FILE ... --out DIR`: every method on
//! every prompt of Spec-Bench-schema datasets, plain decoding interleaved as
//! the baseline, greedy outputs checked against it, results written after
//! every item (see `treespec::bench` for the files).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;

use treespec::bench::llama_cpp::{CompletionRequest, LlamaCpp, LlamaServer, ServerConfig, PEER};
use treespec::bench::llama_server::PeerCompletion;
use treespec::bench::record::{CurvePoint, MachineInfo, ModelInfo, PeerRun, RunConfig, BASELINE};
use treespec::bench::{self, BenchResults, Check, Item, MethodSpec, PeerFigures, PromptRecord};
use treespec::draft::Drafter;
use treespec::engine::spec::{SpecConfig, SpecDrafter, SpecMethod, DEFAULT_MAX_DRAFT};
use treespec::engine::{self, GenerateOptions, Generation, Session};
use treespec::model::{common_prefix_len, Model};
use treespec::sampling::{SamplingParams, NEAR_TIE};
use treespec::tokenizer::ChatMessage;

use super::bench_forward::forward_curve;
use super::ModelArgs;

/// Set by Ctrl-C: finish the current run, write, stop.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Args, Debug)]
pub struct SuiteArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Spec-Bench-schema JSONL file (repeatable). `FILE@K` takes only its
    /// first K items (instead of --per-category).
    #[arg(
        long = "dataset",
        value_name = "FILE[@K]",
        required_unless_present = "from"
    )]
    pub datasets: Vec<String>,
    /// Methods, comma-separated: `method[:tree[:budget]]`, e.g.
    /// none,pld,recycle,hybrid,recycle:tr-8,hybrid:dynamic:16. Plain
    /// decoding (none) is always run as the baseline.
    #[arg(long, default_value = "none,pld,recycle,hybrid")]
    pub methods: Vec<String>,
    /// Default tree shape for recycle/hybrid (dynamic, tr-4 … tr-80, or a template file).
    #[arg(long, default_value = "dynamic")]
    pub tree: String,
    /// Default draft nodes per step (a `tr-N` template defaults to N).
    #[arg(long, default_value_t = DEFAULT_MAX_DRAFT)]
    pub spec_max_nodes: usize,
    /// Do not seed the recycling matrix from each prompt's bigrams.
    #[arg(long)]
    pub no_prompt_seed: bool,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Cap on the total number of items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// The first K items of each category.
    #[arg(long)]
    pub per_category: Option<usize>,
    /// Runs of every method on every item.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// 0 = greedy (outputs checked against plain decoding).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Items run first with every method and excluded from the results.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Another engine's per-prompt figures (JSON) to add as a row.
    #[arg(long, value_name = "FILE")]
    pub compare: Option<PathBuf>,
    /// Skip measuring the c(N) forward-cost curve at start.
    #[arg(long)]
    pub no_curve: bool,
    /// Skip the PNG plots.
    #[arg(long)]
    pub no_plots: bool,
    /// Output folder (results.json, results.md, plots).
    #[arg(long, value_name = "DIR", required = true)]
    pub out: Option<PathBuf>,
    /// Run a peer engine on the same prompts in the same run, interleaved
    /// with treespec's methods: `llama.cpp` (the build that
    /// scripts/peers/llama_cpp.sh caches under $TREESPEC_HOME/peers) or
    /// `llama.cpp=PATH` (llama-server, or the folder holding it).
    #[arg(long, value_name = "llama.cpp[=PATH]")]
    pub peer: Option<String>,
    /// The peer's modes: none (plain), ngram-simple, ngram-mod, ngram-cache,
    /// draft (needs --peer-draft-model).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,ngram-simple,ngram-mod,ngram-cache"
    )]
    pub peer_modes: Vec<String>,
    /// Draft model for the peer's `draft` mode (catalogue name or .gguf);
    /// adds that mode when not listed. Defaults to --draft-model.
    #[arg(long, value_name = "MODEL")]
    pub peer_draft_model: Option<String>,
    /// Draft model for the methods draft, draft-tree and hybrid-draft
    /// (catalogue name, .gguf or HF directory; same tokenizer as --model).
    #[arg(long, value_name = "MODEL")]
    pub draft_model: Option<String>,
    /// The draft model's floor on path probability.
    #[arg(long, default_value_t = treespec::draft::draft_model::DEFAULT_P_MIN)]
    pub draft_p_min: f32,
    /// Rewrite the outputs from an earlier results.json instead of running
    /// (with --compare, adds or replaces the peer).
    #[arg(long, value_name = "RESULTS_JSON", conflicts_with = "datasets")]
    pub from: Option<PathBuf>,
}

/// `FILE@K` → (FILE, Some(K)); a path whose `@` suffix is not a number stays whole.
fn split_dataset_arg(s: &str) -> (PathBuf, Option<usize>) {
    if let Some((path, k)) = s.rsplit_once('@') {
        if let Ok(k) = k.parse::<usize>() {
            return (PathBuf::from(path), Some(k));
        }
    }
    (PathBuf::from(s), None)
}

fn load_plan(a: &SuiteArgs) -> Result<(Vec<Item>, Vec<String>)> {
    let mut items = Vec::new();
    let mut names = Vec::new();
    for d in &a.datasets {
        let (path, k) = split_dataset_arg(d);
        let all = bench::load_items(&path)?;
        names.push(d.clone());
        match k {
            Some(k) => items.extend(all.into_iter().take(k)),
            None => items.extend(bench::select(all, a.per_category)),
        }
    }
    if let Some(l) = a.limit {
        items.truncate(l);
    }
    if items.is_empty() {
        bail!("no items selected (check --limit / --per-category / FILE@K)");
    }
    Ok((items, names))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// `git rev-parse HEAD` of the source tree (then of the working folder),
/// with `-dirty` when it has uncommitted changes; "unknown" without git.
fn commit() -> String {
    let git = |dir: &Path, args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    for dir in [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        PathBuf::from("."),
    ] {
        if let Some(head) = git(&dir, &["rev-parse", "HEAD"]).filter(|h| !h.is_empty()) {
            let dirty = git(&dir, &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            return if dirty { format!("{head}-dirty") } else { head };
        }
    }
    "unknown".into()
}

/// The conversation so far → prompt ids, through the model's chat template
/// (plain concatenation for a model without one).
fn encode_chat(model: &Model, msgs: &[ChatMessage]) -> Result<Vec<u32>> {
    let tok = &model.tokenizer;
    let (text, special) = if tok.has_chat_template() {
        (tok.apply_chat_template(msgs, true)?, true)
    } else {
        let joined: Vec<&str> = msgs.iter().map(|m| m.content.as_str()).collect();
        (joined.join("\n\n"), false)
    };
    let mut ids = tok.encode(&text, special)?;
    if let Some(bos) = tok.bos_to_add() {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

/// One turn's generation and its wall time.
struct TurnRun {
    g: Generation,
    wall_s: f64,
}

struct Runner<'a> {
    model: &'a Model,
    session: Session,
    methods: Vec<MethodSpec>,
    /// One per method for the whole run: recycling drafters stay hot across prompts.
    drafters: Vec<Option<SpecDrafter>>,
    /// Per method: the `--tree auto` budget controller (one per method, kept
    /// across prompts like the drafters).
    budgets:
        Vec<Option<std::sync::Arc<std::sync::Mutex<treespec::engine::budget::BudgetController>>>>,
    sampling: SamplingParams,
    max_new_tokens: usize,
}

impl Runner<'_> {
    /// Runs the item's turns (up to `max_turns`) as one conversation with method `mi`.
    fn conversation(
        &mut self,
        mi: usize,
        item: &Item,
        max_turns: usize,
    ) -> treespec::Result<Vec<TurnRun>> {
        self.session.reset();
        let opts = GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling.clone(),
            max_draft: self.methods[mi].max_draft,
            record_margins: self.methods[mi].label == BASELINE,
            auto_budget: self.budgets[mi].clone(),
            ..Default::default()
        };
        let mut msgs: Vec<ChatMessage> = Vec::new();
        let mut out = Vec::new();
        for turn in item.turns.iter().take(max_turns) {
            msgs.push(ChatMessage {
                role: "user".into(),
                content: turn.clone(),
            });
            let ids = encode_chat(self.model, &msgs)
                .map_err(|e| treespec::Error::Invalid(e.to_string()))?;
            let d = self.drafters[mi].as_mut().map(|d| d as &mut dyn Drafter);
            let t = Instant::now();
            let g = engine::generate(self.model, &mut self.session, d, &ids, &opts, &mut |_| true)?;
            // Near-tie bookkeeping is not part of decoding: not timed.
            let wall_s = t.elapsed().as_secs_f64() - g.margins_ms / 1e3;
            msgs.push(ChatMessage {
                role: "assistant".into(),
                content: g.text.clone(),
            });
            out.push(TurnRun { g, wall_s });
        }
        Ok(out)
    }
}

/// One turn of a peer generation.
struct PeerTurn {
    c: PeerCompletion,
    /// Its generated ids without a trailing end-of-generation token, when
    /// the peer returned ids.
    ids: Option<Vec<u32>>,
    eos: bool,
    /// The prompt it was given (this turn's whole conversation, as ids).
    prompt: Vec<u32>,
}

/// The peer's servers, one per mode, started once for the whole run.
struct Peer {
    run: PeerRun,
    servers: Vec<LlamaServer>,
}

impl Runner<'_> {
    /// The item's turns as one conversation through the peer's `pi`-th mode:
    /// the same token ids treespec decodes from (its own chat template and
    /// tokenizer), the peer's own answers fed back as the assistant turns.
    fn peer_conversation(
        &self,
        server: &LlamaServer,
        item: &Item,
        max_turns: usize,
    ) -> anyhow::Result<Vec<PeerTurn>> {
        let tok = &self.model.tokenizer;
        let mut msgs: Vec<ChatMessage> = Vec::new();
        let mut out = Vec::new();
        for (t, turn) in item.turns.iter().take(max_turns).enumerate() {
            msgs.push(ChatMessage {
                role: "user".into(),
                content: turn.clone(),
            });
            let ids = encode_chat(self.model, &msgs)?;
            let c = server.complete(&CompletionRequest {
                prompt: &ids,
                n_predict: self.max_new_tokens,
                temperature: self.sampling.temperature,
                seed: self.sampling.seed,
                cache_prompt: t > 0,
                n_probs: 0,
            })?;
            let eos = c.stop.as_deref() == Some("eos");
            let gen_ids = c.tokens.clone().map(|mut v| {
                if v.last().is_some_and(|&l| tok.is_stop(l)) {
                    v.pop();
                }
                v
            });
            msgs.push(ChatMessage {
                role: "assistant".into(),
                content: c.text.clone(),
            });
            out.push(PeerTurn {
                c,
                ids: gen_ids,
                eos,
                prompt: ids,
            });
        }
        Ok(out)
    }
}

impl Runner<'_> {
    /// The peer's own top-2 margin at token `at` of a turn that departed
    /// from plain decoding there. The same prompt goes again, untimed, to
    /// llama.cpp's plain server asking for probabilities (a timed run must
    /// not pay for them); the margin counts only if that regenerates the
    /// turn's first `at + 1` tokens, so it is the margin at this departure.
    fn peer_margin(&self, plain: &LlamaServer, turn: &PeerTurn, at: usize) -> Option<f32> {
        let ids = turn.ids.as_ref()?;
        let c = plain
            .complete(&CompletionRequest {
                prompt: &turn.prompt,
                n_predict: at + 1,
                temperature: 0.0,
                seed: self.sampling.seed,
                cache_prompt: false,
                n_probs: 2,
            })
            .map_err(|e| tracing::warn!("peer margin probe: {e:#}"))
            .ok()?;
        let again = c.tokens.as_ref()?;
        let n = (at + 1).min(ids.len());
        (again.len() >= n && again[..n] == ids[..n])
            .then(|| c.top2_margins?.get(at).copied())
            .flatten()
    }
}

/// A peer's turns against plain decoding's: same ids (or, without ids, the
/// same text), else where they first differ and plain's top-2 margin there.
fn peer_checks(
    runs: &[PeerTurn],
    plain: Option<&[TurnRun]>,
    sampled: bool,
) -> Vec<(Check, Option<usize>, Option<f32>)> {
    let mut out = Vec::new();
    let mut differed = false;
    for (t, r) in runs.iter().enumerate() {
        let p = plain.and_then(|p| p.get(t));
        let Some(p) = p.filter(|_| !sampled) else {
            out.push((
                if sampled {
                    Check::Sampled
                } else {
                    Check::Unchecked
                },
                None,
                None,
            ));
            continue;
        };
        if differed {
            // Its conversation already left plain decoding's.
            out.push((Check::PeerDiffers, None, None));
            continue;
        }
        let (same, at) = match &r.ids {
            Some(ids) => {
                let at = common_prefix_len(ids, &p.g.tokens);
                (ids == &p.g.tokens, at)
            }
            None => (r.c.text == p.g.text, 0),
        };
        if same {
            out.push((Check::PeerSame, None, None));
        } else {
            differed = true;
            let at = r.ids.as_ref().map(|_| at);
            let margin = at.and_then(|a| p.g.margins.get(a).copied());
            out.push((Check::PeerDiffers, at, margin));
        }
    }
    out
}

/// A record of one generation of `item` with its identity and check set
/// and every figure zero: the two record builders fill in the figures.
fn blank_record(
    item: &Item,
    turn: usize,
    repeat: usize,
    method: &str,
    check: (Check, Option<usize>, Option<f32>),
) -> PromptRecord {
    PromptRecord {
        dataset: item.dataset.clone(),
        question_id: item.question_id.clone(),
        category: item.category.clone(),
        raw_category: item.raw_category.clone(),
        turn,
        repeat,
        method: method.to_string(),
        prompt_tokens: 0,
        prefilled_tokens: 0,
        new_tokens: 0,
        mat_tokens: 0,
        steps: 0,
        wall_s: 0.0,
        prefill_ms: 0.0,
        decode_ms: 0.0,
        mat: 0.0,
        drafted_tokens: 0,
        accepted_tokens: 0,
        accepted_per_depth: Vec::new(),
        draft_ms: 0.0,
        verify_ms: 0.0,
        draft_model: Default::default(),
        stop: String::new(),
        check: check.0,
        first_diff: check.1,
        diff_margin: check.2,
        peer_margin: None,
    }
}

fn peer_record(
    item: &Item,
    turn: usize,
    repeat: usize,
    method: &str,
    r: &PeerTurn,
    check: (Check, Option<usize>, Option<f32>),
) -> PromptRecord {
    let c = &r.c;
    let new_tokens = r.ids.as_ref().map_or_else(
        || (c.predicted_n as usize).saturating_sub(usize::from(r.eos)),
        Vec::len,
    );
    let mat_tokens = new_tokens + usize::from(r.eos);
    let accepted = c.draft.map_or(0, |d| d.accepted as usize);
    // Every llama.cpp step yields one token of its own plus the drafts it
    // accepted; the first comes from the prompt's forward, as in treespec.
    let steps = mat_tokens.saturating_sub(accepted).max(1);
    PromptRecord {
        prompt_tokens: r.prompt.len(),
        prefilled_tokens: c.prompt_n as usize,
        new_tokens,
        mat_tokens,
        steps,
        wall_s: (c.prompt_ms + c.predicted_ms) / 1e3,
        prefill_ms: c.prompt_ms,
        decode_ms: c.predicted_ms,
        mat: mat_tokens as f64 / steps as f64,
        drafted_tokens: c.draft.map_or(0, |d| d.drafted as usize),
        accepted_tokens: accepted,
        stop: c.stop.clone().unwrap_or_default(),
        ..blank_record(item, turn, repeat, method, check)
    }
}

/// Starts the peer's servers (one per mode) on the model treespec runs.
fn start_peer(a: &SuiteArgs, model: &Model, out_dir: &Path) -> Result<Option<Peer>> {
    let Some(spec) = &a.peer else {
        return Ok(None);
    };
    let home = treespec::registry::treespec_home();
    let found = LlamaCpp::locate(spec, &home)?;
    if !model.path.is_file() {
        bail!(
            "--peer needs a .gguf model file for llama.cpp, not {}",
            model.path.display()
        );
    }
    let draft = a
        .peer_draft_model
        .as_deref()
        .or(a.draft_model.as_deref())
        .map(|m| {
            treespec::registry::resolve_model(m, &home, true)
                .with_context(|| format!("--peer-draft-model `{m}`"))
        })
        .transpose()?;
    let mut modes: Vec<String> = a
        .peer_modes
        .iter()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    if draft.is_some() && !modes.iter().any(|m| m == "draft") {
        modes.push("draft".into());
    }
    let cfg = ServerConfig {
        model: model.path.clone(),
        threads: treespec::kernels::threads(),
        ctx_size: a.model.ctx_size.min(model.config().context_length.max(1)),
        log_dir: out_dir.to_path_buf(),
    };
    let mut servers = Vec::new();
    for m in &modes {
        eprintln!("starting llama-server ({m}) …");
        servers.push(LlamaServer::start(&found, &cfg, m, draft.as_deref())?);
    }
    Ok(Some(Peer {
        run: PeerRun {
            name: PEER.into(),
            version: found.version.clone(),
            // The binary the servers really ran (the no-AMX build on AMX hosts).
            binary: found.binary("llama-server")?.display().to_string(),
            modes: modes.iter().map(|m| format!("{PEER}:{m}")).collect(),
            draft_model: draft.map(|d| d.display().to_string()),
        },
        servers,
    }))
}

/// Compares a method's turns with plain decoding's: the first difference
/// is a near-tie when plain decoding's top-2 margin there was below
/// [`NEAR_TIE`]; later turns inherit an earlier turn's verdict (their
/// prompts already differ).
fn checks(
    runs: &[TurnRun],
    plain: Option<&[TurnRun]>,
    sampled: bool,
) -> Vec<(Check, Option<usize>, Option<f32>)> {
    let mut out = Vec::new();
    let mut inherited: Option<Check> = None;
    for (t, r) in runs.iter().enumerate() {
        if sampled {
            out.push((Check::Sampled, None, None));
            continue;
        }
        let Some(p) = plain.and_then(|p| p.get(t)) else {
            out.push((Check::Unchecked, None, None));
            continue;
        };
        if let Some(c) = inherited {
            out.push((c, None, None));
            continue;
        }
        if r.g.tokens == p.g.tokens {
            out.push((Check::Exact, None, None));
            continue;
        }
        let at = common_prefix_len(&r.g.tokens, &p.g.tokens);
        let margin = p.g.margins.get(at).copied();
        let c = if margin.unwrap_or(1.0) < NEAR_TIE {
            Check::NearTie
        } else {
            Check::Mismatch
        };
        inherited = Some(c);
        out.push((c, Some(at), margin));
    }
    out
}

/// Tokens the model accepted: the emitted ones, plus the end-of-generation
/// token, which the last step accepted but the output leaves out (without
/// it plain decoding's MAT would read below 1).
fn mat_tokens(g: &Generation) -> usize {
    g.tokens.len() + usize::from(g.stop == engine::StopReason::Eos)
}

fn record(
    item: &Item,
    turn: usize,
    repeat: usize,
    method: &str,
    r: &TurnRun,
    check: (Check, Option<usize>, Option<f32>),
) -> PromptRecord {
    let g = &r.g;
    PromptRecord {
        prompt_tokens: g.stats.prompt_tokens,
        prefilled_tokens: g.stats.prefilled_tokens,
        new_tokens: g.tokens.len(),
        mat_tokens: mat_tokens(g),
        steps: g.spec.steps,
        wall_s: r.wall_s,
        prefill_ms: g.stats.prefill_ms,
        decode_ms: g.stats.decode_ms,
        mat: mat_tokens(g) as f64 / g.spec.steps.max(1) as f64,
        drafted_tokens: g.spec.drafted_tokens,
        accepted_tokens: g.spec.accepted_tokens,
        accepted_per_depth: g.spec.accepted_per_depth.clone(),
        draft_ms: g.spec.draft_ms,
        verify_ms: g.spec.verify_ms,
        draft_model: g.spec.draft_model,
        stop: serde_json::to_value(g.stop)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        ..blank_record(item, turn, repeat, method, check)
    }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} runs, ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

fn read_peer(path: &Path) -> Result<PeerFigures> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--compare {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "--compare {}: expected {{\"name\", \"prompts\": [{{\"question_id\", \"turn\"?, \"dataset\"?, \"tokens\", \"seconds\"}}]}}",
            path.display()
        )
    })
}

/// `--from`: the earlier run's records, written again (plots, a new peer).
fn rewrite(from: &Path, out_dir: &Path, a: &SuiteArgs) -> Result<()> {
    let mut results = bench::read_results(from)?;
    if let Some(p) = &a.compare {
        results.peer = Some(read_peer(p)?);
    }
    let written = bench::write_results(out_dir, &results, !a.no_plots)?;
    if let Some(e) = &written.plot_error {
        eprintln!("plots skipped: {e}");
    }
    println!("{}", std::fs::read_to_string(&written.markdown)?);
    Ok(())
}

pub fn run(a: SuiteArgs) -> Result<()> {
    let started = Instant::now();
    // Before anything else, so later edits to the tree do not mark it dirty.
    let commit = commit();
    let out_dir = a.out.clone().context("--out DIR is required")?;
    if let Some(from) = &a.from {
        return rewrite(from, &out_dir, &a);
    }
    let (items, dataset_names) = load_plan(&a)?;
    let methods = MethodSpec::parse_list(&a.methods, &a.tree, a.spec_max_nodes)?;
    let peer = a.compare.as_deref().map(read_peer).transpose()?;
    let sampling = SamplingParams {
        temperature: a.temperature,
        seed: a.seed,
        ..Default::default()
    };
    sampling.validate()?;
    let model = a.model.load()?;
    let vocab = model.config().vocab_size;
    let draft_model = match &a.draft_model {
        Some(name) => {
            let home = treespec::registry::treespec_home();
            let path = treespec::registry::resolve_model(name, &home, true)
                .with_context(|| format!("--draft-model `{name}`"))?;
            Some(
                treespec::engine::spec::load_draft_model(&path, &model)
                    .with_context(|| format!("--draft-model `{name}`"))?,
            )
        }
        None => None,
    };
    let spec_config = |m: &MethodSpec| -> treespec::Result<SpecConfig> {
        let method = SpecMethod::parse(&m.method)?;
        Ok(SpecConfig {
            method,
            tree: m.tree.clone(),
            max_draft: m.max_draft,
            seed_from_prompt: !a.no_prompt_seed,
            recycle_state: None,
            // Only the methods named for it: `hybrid` stays the model-free
            // hybrid in a table that also has `hybrid-draft`.
            draft_model: draft_model.clone().filter(|_| method.needs_draft_model()),
            draft_p_min: a.draft_p_min,
            draft_retrieval: m.retrieval,
            ..Default::default()
        })
    };
    let drafters = methods
        .iter()
        .map(|m| SpecDrafter::build(&spec_config(m)?, vocab))
        .collect::<treespec::Result<Vec<_>>>()?;

    let forward_curve = if a.no_curve {
        None
    } else {
        eprintln!("measuring c(N) …");
        let pts = forward_curve(&model, 256, &[1, 2, 4, 8, 16, 32], 5)?;
        let c1 = pts.first().map(|p| p.ms).unwrap_or(f64::NAN);
        Some(
            pts.iter()
                .map(|p| CurvePoint {
                    n: p.n,
                    ms: p.ms,
                    ratio: p.ms / c1,
                })
                .collect(),
        )
    };

    // After the curve, so loading the peer's model does not disturb it.
    let live_peer = start_peer(&a, &model, &out_dir)?;

    let mut results = BenchResults {
        info: bench::RunInfo {
            command: std::env::args().collect(),
            model: ModelInfo {
                name: a.model.model.clone(),
                path: model.path.display().to_string(),
                identity: model.identity.clone(),
                arch: model.config().arch.name().into(),
                n_layers: model.config().n_layers,
                vocab_size: vocab,
            },
            machine: MachineInfo {
                cpu: cpu_model(),
                cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
                threads: treespec::kernels::threads(),
                isa: treespec::kernels::isa().into(),
                os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            },
            commit,
            config: RunConfig {
                datasets: dataset_names,
                methods: methods.clone(),
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                repeats: a.repeats.max(1),
                warmup: a.warmup,
                per_category: a.per_category,
                limit: a.limit,
                ctx_size: a.model.ctx_size,
                items: items.len(),
                peer: live_peer.as_ref().map(|p| p.run.clone()),
            },
            forward_curve,
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ..Default::default()
        },
        records: Vec::new(),
        peer,
    };
    bench::write_results(&out_dir, &results, false)?;

    if let Err(e) = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: stopping after the current run (press again to quit now)");
    }) {
        tracing::warn!("no Ctrl-C handler: {e}");
    }

    let mut runner = Runner {
        model: &model,
        session: Session::new(
            &model,
            a.model.ctx_size.min(model.config().context_length.max(1)),
        ),
        budgets: methods
            .iter()
            .map(|m| super::auto_budget(&model, &spec_config(m)?))
            .collect::<anyhow::Result<Vec<_>>>()?,
        methods: methods.clone(),
        drafters,
        sampling,
        max_new_tokens: a.max_new_tokens,
    };
    let n_methods = methods.len();
    let servers: &[LlamaServer] = live_peer.as_ref().map_or(&[], |p| &p.servers);
    let peer_labels: Vec<String> = live_peer
        .as_ref()
        .map_or(Vec::new(), |p| p.run.modes.clone());
    // Every treespec method and every peer mode, in one rotation.
    let n_slots = n_methods + servers.len();

    // Warm-up: first turns of the first items, every method, not recorded.
    for item in items.iter().take(a.warmup) {
        for mi in 0..n_methods {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            if let Err(e) = runner.conversation(mi, item, 1) {
                tracing::warn!("warm-up on {} {}: {e}", item.dataset, item.id_text());
            }
        }
        for s in servers {
            if let Err(e) = runner.peer_conversation(s, item, 1) {
                tracing::warn!("peer warm-up on {} {}: {e:#}", item.dataset, item.id_text());
            }
        }
    }

    let repeats = a.repeats.max(1);
    let bar = progress_bar((items.len() * repeats * n_slots) as u64);
    let sampled = a.temperature > 0.0;
    let mut interrupted = STOP.load(Ordering::SeqCst);
    let mut round = 0usize;
    // indicatif draws nothing without a terminal: log a line per item instead.
    let log_lines = !std::io::stderr().is_terminal();
    'items: for (item_no, item) in items.iter().enumerate() {
        if interrupted {
            break;
        }
        for repeat in 0..repeats {
            // Rotate the order so slow drift in machine speed hits every method alike.
            let order: Vec<usize> = (0..n_slots).map(|k| (k + round) % n_slots).collect();
            round += 1;
            let mut runs: Vec<Option<Vec<TurnRun>>> = (0..n_methods).map(|_| None).collect();
            let mut peer_runs: Vec<Option<Vec<PeerTurn>>> =
                (0..servers.len()).map(|_| None).collect();
            let mut failed = None;
            for &mi in &order {
                if mi >= n_methods {
                    let pi = mi - n_methods;
                    bar.set_message(format!(
                        "{} {} {}",
                        item.category,
                        item.id_text(),
                        peer_labels[pi]
                    ));
                    // A peer failure costs that peer's row, not the item.
                    match runner.peer_conversation(&servers[pi], item, usize::MAX) {
                        Ok(r) => peer_runs[pi] = Some(r),
                        Err(e) => bar.println(format!(
                            "peer {} on {} {}: {e:#}",
                            peer_labels[pi],
                            item.dataset,
                            item.id_text()
                        )),
                    }
                    bar.inc(1);
                    if STOP.load(Ordering::SeqCst) {
                        interrupted = true;
                        break;
                    }
                    continue;
                }
                bar.set_message(format!(
                    "{} {} {}",
                    item.category,
                    item.id_text(),
                    methods[mi].label
                ));
                match runner.conversation(mi, item, usize::MAX) {
                    Ok(r) => runs[mi] = Some(r),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                bar.inc(1);
                if STOP.load(Ordering::SeqCst) {
                    interrupted = true;
                    break;
                }
            }
            if let Some(e) = failed {
                // The prompt itself is unusable (e.g. longer than the context):
                // skip the item for every method rather than stop the benchmark.
                bar.println(format!("skipping {} {}: {e}", item.dataset, item.id_text()));
                bar.inc(((repeats - repeat) * n_slots) as u64);
                continue 'items;
            }
            let plain_idx = methods.iter().position(|m| m.label == BASELINE);
            let plain = plain_idx.and_then(|i| runs[i].as_deref());
            for (mi, r) in runs.iter().enumerate() {
                let Some(r) = r else { continue };
                let cks = if Some(mi) == plain_idx {
                    vec![(Check::Baseline, None, None); r.len()]
                } else {
                    checks(r, plain, sampled)
                };
                for (t, (tr, ck)) in r.iter().zip(cks).enumerate() {
                    if ck.0 == Check::Mismatch {
                        let msg = format!(
                            "MISMATCH (not lossless!): {} {} turn {t}: {} differs from plain decoding at token {} (margin {:.4})",
                            item.dataset,
                            item.id_text(),
                            methods[mi].label,
                            ck.1.unwrap_or(0),
                            ck.2.unwrap_or(f32::NAN)
                        );
                        bar.println(&msg);
                        tracing::error!("{msg}");
                    }
                    results
                        .records
                        .push(record(item, t, repeat, &methods[mi].label, tr, ck));
                }
            }
            let plain_peer = servers.iter().position(|s| s.mode == "none");
            for (pi, r) in peer_runs.iter().enumerate() {
                let Some(r) = r else { continue };
                for (t, (tr, ck)) in r.iter().zip(peer_checks(r, plain, sampled)).enumerate() {
                    let mut rec = peer_record(item, t, repeat, &peer_labels[pi], tr, ck);
                    if let (Check::PeerDiffers, Some(at), Some(ps)) = (ck.0, ck.1, plain_peer) {
                        rec.peer_margin = runner.peer_margin(&servers[ps], tr, at);
                    }
                    results.records.push(rec);
                }
            }
            results.info.elapsed_s = started.elapsed().as_secs_f64();
            results.info.interrupted = interrupted;
            bench::write_results(&out_dir, &results, false)?;
            if log_lines {
                eprintln!(
                    "[{}/{} items, repeat {}] {} {} {} done, {:.0} s",
                    item_no + 1,
                    items.len(),
                    repeat + 1,
                    item.dataset,
                    item.category,
                    item.id_text(),
                    started.elapsed().as_secs_f64()
                );
            }
            if interrupted {
                break 'items;
            }
        }
    }
    bar.finish_and_clear();
    results.info.complete = !interrupted;
    results.info.interrupted = interrupted;
    results.info.elapsed_s = started.elapsed().as_secs_f64();
    let written = bench::write_results(&out_dir, &results, !a.no_plots)?;
    if let Some(e) = &written.plot_error {
        eprintln!("plots skipped: {e}");
    }
    let md = std::fs::read_to_string(&written.markdown)?;
    println!("{md}");
    eprintln!(
        "wrote {} and {}{}",
        written.json.display(),
        written.markdown.display(),
        if written.plots.is_empty() {
            ""
        } else {
            " and plots"
        }
    );
    if interrupted {
        eprintln!("interrupted: partial results");
    }
    Ok(())
}
