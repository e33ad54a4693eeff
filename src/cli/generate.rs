//! `treespec generate`.

use std::io::Write;

use anyhow::{bail, Result};
use clap::Args;

use treespec::engine::{self, GenerateOptions, Session};
use treespec::model::Model;
use treespec::sampling::SamplingParams;
use treespec::tokenizer::ChatMessage;

use treespec::draft::Drafter;
use treespec::engine::spec::SpecDrafter;

use super::{ModelArgs, SpecArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// The prompt ("-" reads standard input).
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Do not turn text like `<|im_start|>` in a raw prompt into special tokens.
    #[arg(long)]
    pub no_special: bool,
    /// Maximum new tokens.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Prompt text → token ids: the chat template when asked (with an optional
/// system message), else the raw text (see [`engine::text_prompt_ids`]).
pub fn prompt_tokens(
    model: &Model,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
    parse_special: bool,
) -> Result<Vec<u32>> {
    let tok = &model.tokenizer;
    if !chat {
        return Ok(engine::text_prompt_ids(tok, prompt, parse_special)?);
    }
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(ChatMessage {
            role: "system".into(),
            content: s.into(),
        });
    }
    msgs.push(ChatMessage {
        role: "user".into(),
        content: prompt.into(),
    });
    Ok(engine::chat_prompt_ids(tok, &msgs)?)
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let prompt = if a.prompt == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        a.prompt.clone()
    };
    if prompt.is_empty() {
        bail!("empty prompt: give some text to continue");
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        seed: a.seed,
    };
    sampling.validate()?;
    let mut spec = a.spec.config()?;
    let model = a.model.load()?;
    spec.draft_model = a.spec.load_draft(&model)?;
    let mut drafter = SpecDrafter::build(&spec, model.config().vocab_size)?;
    if let (Some(d), Some(p)) = (drafter.as_mut(), &spec.recycle_state) {
        d.load_state(p, &model.identity);
    }
    let ids = prompt_tokens(&model, &prompt, a.chat, a.system.as_deref(), !a.no_special)?;
    let mut session = Session::new(&model, a.model.ctx_size);
    let opts = GenerateOptions {
        max_new_tokens: a.max_tokens,
        sampling,
        stop_strings: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        max_draft: spec.max_draft,
        auto_budget: super::auto_budget(&model, &spec)?,
        ..Default::default()
    };
    let stream = !a.json;
    let mut out = std::io::stdout().lock();
    let dref = drafter.as_mut().map(|d| d as &mut dyn Drafter);
    let g = engine::generate(&model, &mut session, dref, &ids, &opts, &mut |ev| {
        if stream && !ev.text.is_empty() {
            // A closed stdout (e.g. `| head`) ends generation quietly.
            return out
                .write_all(ev.text.as_bytes())
                .and_then(|_| out.flush())
                .is_ok();
        }
        true
    })?;
    if let (Some(d), Some(p)) = (drafter.as_mut(), &spec.recycle_state) {
        d.save_state(p, &model.identity)?;
    }
    if a.json {
        let v = serde_json::json!({
            "text": g.text,
            "token_ids": g.tokens,
            "stop": g.stop,
            "stats": {
                "prompt_tokens": g.stats.prompt_tokens,
                "generated_tokens": g.stats.generated_tokens,
                "steps": g.stats.steps,
                "prefill_tok_s": g.stats.prefill_tok_s,
                "decode_tok_s": g.stats.decode_tok_s,
            },
            "spec": g.spec,
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "[prompt {} tok, prefill {:.1} tok/s | generated {} tok in {} steps, decode {:.1} tok/s | MAT {:.2} ({})]",
            g.stats.prompt_tokens,
            g.stats.prefill_tok_s,
            g.stats.generated_tokens,
            g.stats.steps,
            g.stats.decode_tok_s,
            g.spec.mean_accepted_tokens,
            g.spec.method,
        );
    }
    Ok(())
}
