//! The generation loop: prefill, then steps of propose → score → verify →
//! keep, until a stop condition. Plain decoding is the same loop with a tree
//! of one node.

pub mod budget;
pub mod prompt;
pub mod scorer;
pub mod spec;
pub mod stats;

use std::time::Instant;

use crate::draft::{DraftTree, Drafter, NodeTopK};
use crate::error::{Error, Result};
use crate::model::{common_prefix_len, KvCache, LogitRows, Logits, Model};
use crate::sampling::{top2_margin, top_k_probs, Sampler, SamplingParams};
use crate::tokenizer::StreamDecoder;
use crate::verify::{verify, Verdict};

pub use prompt::{chat_prompt_ids, text_prompt_ids};
pub use stats::{GenStats, SpecStats};

/// Prompt tokens per prefill forward. Bounded so the attention scratch
/// (`rows × context` floats per task) and the activations stay small.
pub const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these (it is cut before it).
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
    /// Draft nodes per step (besides the root) the drafter may propose.
    pub max_draft: usize,
    /// Record the top-2 probability margin of every emitted token (near-tie
    /// detection in equality tests and benchmarks).
    pub record_margins: bool,
    /// Choose the budget each step (`--tree auto`); `max_draft` is then unused.
    pub auto_budget: Option<std::sync::Arc<std::sync::Mutex<budget::BudgetController>>>,
    /// The acceptance rule. Always [`verify`] in real use; tests swap in a
    /// deliberately wrong rule to show the losslessness tests can fail.
    pub verifier: VerifyFn,
}

pub type VerifyFn = fn(&DraftTree, &Logits, &mut Sampler, &mut Vec<u32>) -> Verdict;

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop_strings: Vec::new(),
            ignore_eos: false,
            max_draft: 0,
            record_margins: false,
            auto_budget: None,
            verifier: verify,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-generation token.
    Eos,
    MaxTokens,
    StopString,
    /// The callback asked to stop (client gone).
    Cancelled,
    /// The KV cache is full.
    ContextFull,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub stats: GenStats,
    pub spec: SpecStats,
    /// Per emitted token, when asked for: top-2 probability margin.
    pub margins: Vec<f32>,
    /// Time spent computing `margins` (a pass over the vocabulary per token
    /// that plain decoding does not need): benchmarks take it out of the
    /// baseline's wall time, and `stats.decode_ms` excludes it.
    pub margins_ms: f64,
}

/// A streamed piece: one emitted token and the text that became final with it.
pub struct TokenEvent<'a> {
    pub token: u32,
    pub text: &'a str,
}

/// One sequence's state: its KV cache and the tokens the cache holds, so a
/// follow-up prompt that extends the previous one (a second chat turn) only
/// prefills what is new.
pub struct Session {
    pub cache: KvCache,
    cached: Vec<u32>,
}

impl Session {
    pub fn new(model: &Model, context: usize) -> Self {
        Session {
            cache: model.decoder.new_cache(context),
            cached: Vec::new(),
        }
    }

    pub fn context(&self) -> usize {
        self.cache.capacity()
    }

    pub fn reset(&mut self) {
        self.cache.clear();
        self.cached.clear();
    }
}

/// Holds back text that could still become a stop string.
struct StopScanner<'a> {
    stops: &'a [String],
    text: String,
    emitted: usize,
}

impl StopScanner<'_> {
    /// Appends `piece`; returns (text now safe to stream, stop hit).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        for s in self.stops.iter().filter(|s| !s.is_empty()) {
            // A match can start at most `s.len()` bytes before the text not
            // yet searched; that byte offset may fall inside a multibyte
            // character ("ab" held back, then "日"), so start the search at
            // the character boundary at or before it.
            let from = floor_char_boundary(&self.text, self.emitted.saturating_sub(s.len()));
            if let Some(at) = self.text[from..].find(s.as_str()) {
                let cut = from + at;
                self.text.truncate(cut);
                let out = self.text[self.emitted.min(cut)..].to_string();
                self.emitted = self.text.len();
                return (out, true);
            }
        }
        // Keep back the longest tail that is a prefix of a stop string.
        let mut hold = 0;
        for s in self.stops {
            for l in (1..s.len().min(self.text.len() + 1)).rev() {
                if self.text.is_char_boundary(self.text.len() - l)
                    && s.is_char_boundary(l)
                    && self.text.ends_with(&s[..l])
                {
                    hold = hold.max(l);
                    break;
                }
            }
        }
        let safe = (self.text.len() - hold).max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

/// The largest character boundary of `text` at or before byte `i`.
fn floor_char_boundary(text: &str, i: usize) -> usize {
    let mut i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Generates a continuation of `prompt` (token ids, BOS/chat template already
/// applied). With a `drafter`, each step verifies a draft tree of up to
/// `opts.max_draft` nodes; without, it decodes plainly. `on_token` sees every
/// emitted token as it is produced; returning `false` cancels.
pub fn generate(
    model: &Model,
    session: &mut Session,
    mut drafter: Option<&mut dyn Drafter>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent) -> bool,
) -> Result<Generation> {
    opts.sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let capacity = session.cache.capacity();
    if prompt.len() >= capacity {
        return Err(Error::ContextLength {
            prompt: prompt.len(),
            context: capacity,
            reserve: 1,
        });
    }
    let decoder = &model.decoder;
    let vocab = decoder.config.vocab_size;
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Invalid(format!(
            "prompt token {t} is outside the vocabulary ({vocab})"
        )));
    }
    let stop_tokens = model.tokenizer.stop_tokens().to_vec();
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut spec = SpecStats {
        method: drafter
            .as_ref()
            .map(|d| d.name().to_string())
            .unwrap_or_else(|| "none".into()),
        ..Default::default()
    };

    // Prefill everything but the last prompt token, which becomes the first
    // tree root; reuse the longest cached prefix.
    let t0 = Instant::now();
    let body = &prompt[..prompt.len() - 1];
    let reuse = common_prefix_len(&session.cached, body).min(session.cache.len());
    session.cache.truncate(reuse);
    session.cached.truncate(reuse);
    for chunk in body[reuse..].chunks(PREFILL_CHUNK) {
        let base = session.cache.len();
        let positions: Vec<usize> = (base..base + chunk.len()).collect();
        let parents: Vec<Option<usize>> = (0..chunk.len()).map(|i| i.checked_sub(1)).collect();
        decoder.forward(
            &mut session.cache,
            chunk,
            &positions,
            &parents,
            LogitRows::None,
        )?;
        session.cache.keep_all();
        session.cached.extend_from_slice(chunk);
    }
    stats.prefilled_tokens = body.len() - reuse + 1;
    if let Some(d) = drafter.as_deref_mut() {
        d.set_sampling(&opts.sampling);
        d.start(prompt);
    }
    stats.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Decode.
    let t1 = Instant::now();
    let mut context = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut margins = Vec::new();
    let mut margins_ms = 0.0;
    let mut detok = StreamDecoder::new(&model.tokenizer);
    let mut scanner = StopScanner {
        stops: &opts.stop_strings,
        text: String::new(),
        emitted: 0,
    };
    let mut first_token_ms = None;
    let stop = 'outer: loop {
        if tokens.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        let room = capacity - session.cache.len();
        if room == 0 {
            break StopReason::ContextFull;
        }
        let root = *context.last().expect("context is never empty");
        let (class, chosen) = match (&opts.auto_budget, drafter.as_deref_mut()) {
            (Some(c), Some(d)) => {
                let class = d.outlook(&context);
                let b = c
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .choose(session.cache.len(), class);
                (class, b)
            }
            _ => (0, opts.max_draft),
        };
        let budget = chosen
            .min(room - 1)
            .min(opts.max_new_tokens - tokens.len() - 1);
        let td = Instant::now();
        let tree = match drafter.as_deref_mut() {
            Some(d) if budget > 0 => d.propose(&context, budget),
            _ => DraftTree::root(root),
        };
        let mut step_draft_ms = td.elapsed().as_secs_f64() * 1e3;
        debug_assert!(tree.validate().is_ok() && tree.tokens[0] == root);

        let tv = Instant::now();
        let logits = scorer::score(decoder, &mut session.cache, &tree)?;
        let verdict = (opts.verifier)(&tree, &logits, &mut sampler, &mut context);
        session.cache.keep(&verdict.path)?;
        session
            .cached
            .extend(verdict.path.iter().map(|&i| tree.tokens[i]));
        spec.verify_ms += tv.elapsed().as_secs_f64() * 1e3;
        spec.record_step(tree.num_drafted(), verdict.accepted_drafts());

        if let Some(d) = drafter.as_deref_mut() {
            let k = d.wants_topk();
            // Root-only steps too: the update rule covers the root, and a
            // recycler whose matrix is still empty (no prompt seeding)
            // proposes only the root until it has learnt something.
            if k > 0 {
                let td = Instant::now();
                // Two passes over the vocabulary per node: spread over the pool.
                let topk: Vec<std::sync::Mutex<NodeTopK>> =
                    (0..tree.len()).map(|_| Default::default()).collect();
                crate::kernels::parallel_for(tree.len(), 1, &|nodes| {
                    for i in nodes {
                        let (ids, probs) = top_k_probs(logits.row(i), k);
                        *topk[i].lock().unwrap_or_else(|e| e.into_inner()) =
                            NodeTopK { ids, probs };
                    }
                });
                let topk: Vec<NodeTopK> = topk
                    .into_iter()
                    .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
                    .collect();
                d.observe(&tree, &topk, &verdict.path);
                step_draft_ms += td.elapsed().as_secs_f64() * 1e3;
            }
        }
        spec.draft_ms += step_draft_ms;
        if let (Some(c), Some(_)) = (&opts.auto_budget, &drafter) {
            c.lock().unwrap_or_else(|e| e.into_inner()).record(
                class,
                chosen,
                verdict.emitted.len(),
                tree.len(),
                step_draft_ms,
            );
        }

        for (i, &tok) in verdict.emitted.iter().enumerate() {
            if !opts.ignore_eos && stop_tokens.contains(&tok) {
                break 'outer StopReason::Eos;
            }
            tokens.push(tok);
            context.push(tok);
            if opts.record_margins {
                let tm = Instant::now();
                margins.push(top2_margin(logits.row(verdict.path[i])));
                margins_ms += tm.elapsed().as_secs_f64() * 1e3;
            }
            first_token_ms.get_or_insert_with(|| t1.elapsed().as_secs_f64() * 1e3);
            let piece = detok.push(tok)?;
            let (safe, hit) = scanner.push(&piece);
            if !on_token(&TokenEvent {
                token: tok,
                text: &safe,
            }) {
                break 'outer StopReason::Cancelled;
            }
            if hit {
                break 'outer StopReason::StopString;
            }
            if tokens.len() >= opts.max_new_tokens {
                break 'outer StopReason::MaxTokens;
            }
        }
    };
    if !matches!(stop, StopReason::StopString | StopReason::Cancelled) {
        let tail = detok.finish()?;
        let (mut safe, _) = scanner.push(&tail);
        safe.push_str(&scanner.flush());
        if !safe.is_empty() {
            on_token(&TokenEvent {
                token: u32::MAX,
                text: &safe,
            });
        }
    }
    if let Some(d) = drafter {
        d.finish(&tokens);
    }
    // The cache may hold accepted tokens past a stop: drop them so the
    // session's cached tokens describe the cache exactly.
    let keep = prompt.len() - 1 + tokens.len();
    if session.cached.len() > keep {
        session.cache.truncate(keep);
        session.cached.truncate(keep);
    }

    stats.decode_ms = t1.elapsed().as_secs_f64() * 1e3 - margins_ms;
    stats.generated_tokens = tokens.len();
    stats.steps = spec.steps;
    stats.finish();
    spec.finish();
    Ok(Generation {
        tokens,
        text: scanner.text,
        stop,
        stats,
        spec,
        margins,
        margins_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_scanner_holds_back_prefixes_and_cuts() {
        let stops = vec!["STOP".to_string()];
        let mut s = StopScanner {
            stops: &stops,
            text: String::new(),
            emitted: 0,
        };
        assert_eq!(s.push("hello S"), ("hello ".to_string(), false));
        assert_eq!(s.push("T"), (String::new(), false));
        assert_eq!(s.push("x"), ("STx".to_string(), false));
        assert_eq!(s.push(" a STO"), (" a ".to_string(), false));
        assert_eq!(s.push("P and more"), (String::new(), true));
        assert_eq!(s.text, "hello STx a ");
    }

    /// Multibyte and emoji output around stop strings: the search window
    /// must not start inside a character (stop "ab", then "日", then "x"
    /// panicked: byte `emitted - 2` fell inside "日").
    #[test]
    fn stop_scanner_on_multibyte_text() {
        let stops = vec!["ab".to_string()];
        let mut s = StopScanner {
            stops: &stops,
            text: String::new(),
            emitted: 0,
        };
        assert_eq!(s.push("日"), ("日".to_string(), false));
        assert_eq!(s.push("x"), ("x".to_string(), false));
        assert_eq!(s.push("日本"), ("日本".to_string(), false));
        assert_eq!(s.push("🙂a"), ("🙂".to_string(), false));
        assert_eq!(s.push("b🙂"), (String::new(), true));
        assert_eq!(s.text, "日x日本🙂");

        // A multibyte stop string straddling pieces, after emoji.
        let stops = vec!["終わり".to_string(), "🛑".to_string()];
        let mut s = StopScanner {
            stops: &stops,
            text: String::new(),
            emitted: 0,
        };
        assert_eq!(s.push("🙂🙂終"), ("🙂🙂".to_string(), false));
        assert_eq!(s.push("わ"), (String::new(), false));
        assert_eq!(s.push("る"), ("終わる".to_string(), false));
        assert_eq!(s.push("é終わ"), ("é".to_string(), false));
        assert_eq!(s.push("り。"), (String::new(), true));
        assert_eq!(s.text, "🙂🙂終わるé");
        let mut s = StopScanner {
            stops: &stops,
            text: String::new(),
            emitted: 0,
        };
        assert_eq!(s.push("ab"), ("ab".to_string(), false));
        assert_eq!(s.push("c🛑d"), ("c".to_string(), true));
    }

    #[test]
    fn floor_char_boundary_steps_back_into_characters() {
        let t = "a日b";
        assert_eq!(floor_char_boundary(t, 0), 0);
        assert_eq!(floor_char_boundary(t, 2), 1);
        assert_eq!(floor_char_boundary(t, 3), 1);
        assert_eq!(floor_char_boundary(t, 4), 4);
        assert_eq!(floor_char_boundary(t, 99), 5);
    }
}
