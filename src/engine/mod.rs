//! The generation loop: prefill, then steps of propose → score → verify →
//! keep, until a stop condition. Plain decoding is the same loop with a tree
//! of one node.

pub mod batch;
pub mod budget;
pub mod prefix_cache;
pub mod prompt;
pub mod scorer;
pub mod sequence;
pub mod spec;
pub mod stats;

use crate::draft::{DraftTree, Drafter};
use crate::error::Result;
use crate::model::{common_prefix_len, KvCache, Logits, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::verify::{verify, Verdict};
use prefix_cache::PrefixCache;

pub use prompt::{chat_prompt_ids, text_prompt_ids};
pub use sequence::{OnToken, Sequence, StepShare};
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

    /// Leading tokens of `prompt` this session's cache already holds (what
    /// a request on it would not prefill).
    pub fn cached_prefix_len(&self, prompt: &[u32]) -> usize {
        common_prefix_len(&self.cached, prompt).min(self.cache.len())
    }

    /// Fills the cache from `prefix`'s blocks with as much of `prompt`
    /// (but its last token, which a request always runs) as they hold
    /// beyond what the cache holds already. Returns the prompt tokens the
    /// cache now holds.
    pub fn restore_prefix(&mut self, prefix: &mut PrefixCache, prompt: &[u32]) -> usize {
        let body = &prompt[..prompt.len().saturating_sub(1)];
        let held = self.cached_prefix_len(body);
        let n = prefix.restore(body, &mut self.cache, held);
        if n != held {
            self.cached.clear();
            self.cached.extend_from_slice(&body[..n]);
        }
        n
    }

    /// Offers this session's committed tokens to `prefix` (a finished
    /// request: its prompt and output become a prefix others can reuse).
    pub fn save_prefix(&self, prefix: &mut PrefixCache) {
        prefix.insert(&self.cached, &self.cache);
    }

    pub fn reset(&mut self) {
        self.cache.clear();
        self.cached.clear();
    }

    /// A session with no cache, standing in while a [`Sequence`] owns the
    /// real one.
    fn detached() -> Self {
        Session {
            cache: KvCache::new(0, 0, 0, 0),
            cached: Vec::new(),
        }
    }
}

/// Holds back text that could still become a stop string.
struct StopScanner {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopScanner {
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
        for s in &self.stops {
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
    drafter: Option<&mut dyn Drafter>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent) -> bool,
) -> Result<Generation> {
    let owned = std::mem::replace(session, Session::detached());
    let drafter = drafter.map(|d| Box::new(d) as Box<dyn Drafter + '_>);
    let on_token: OnToken<'_> = Box::new(|e: &TokenEvent| on_token(e));
    let mut seq = match Sequence::new(model, owned, drafter, prompt, opts.clone(), on_token) {
        Ok(seq) => seq,
        Err(refused) => {
            let (e, owned) = *refused;
            *session = owned;
            return Err(e);
        }
    };
    while seq.plan(&StepShare::alone()) {
        let step = match seq.segment() {
            Some(seg) => model.decoder.forward_segment(seg),
            None => continue,
        };
        if let Err(e) = step.and_then(|logits| seq.absorb(logits)) {
            *session = seq.into_session();
            return Err(e);
        }
    }
    let (out, owned) = seq.finish();
    *session = owned;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_scanner_holds_back_prefixes_and_cuts() {
        let stops = vec!["STOP".to_string()];
        let mut s = StopScanner {
            stops: stops.clone(),
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
            stops: stops.clone(),
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
            stops: stops.clone(),
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
            stops: stops.clone(),
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
