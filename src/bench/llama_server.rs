//! The llama.cpp peer's answers, as `treespec bench --peer llama.cpp` reads
//! them: one `llama-server` completion response (its native `/completion`
//! endpoint or the OpenAI-compatible `/v1/completions` and
//! `/v1/chat/completions`, which carry the same `timings` object) turned into
//! the figures a same-run comparison needs: the text, how many tokens were
//! decoded in how many ms, and the speculative counters (`draft_n`,
//! `draft_n_accepted`) that llama-server reports when a draft was used.
//!
//! Parsing is strict where a wrong figure would pass silently: a response
//! without `timings`, with a negative or non-finite time, with more accepted
//! than drafted tokens, or with a decode count that disagrees with the
//! response's own token count is an error, never a row with a made-up speed.

use serde::Deserialize;

/// One peer completion, as measured by the peer itself.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerCompletion {
    /// The generated text (`content`, or `choices[0].text` /
    /// `choices[0].message.content`).
    pub text: String,
    /// Prompt tokens the peer evaluated (0 when it reused its prompt cache).
    pub prompt_n: u64,
    pub prompt_ms: f64,
    /// Tokens decoded and the wall time of decoding them.
    pub predicted_n: u64,
    pub predicted_ms: f64,
    /// Draft tokens proposed and accepted; `None` when no draft was used.
    pub draft: Option<DraftCounts>,
    /// Why generation ended (`stop_type` / `finish_reason`), when given.
    pub stop: Option<String>,
    /// The generated token ids, when the request asked for them
    /// (`return_tokens`); `None` when the response carries none.
    pub tokens: Option<Vec<u32>>,
    /// Per generated token, the top-2 probability margin (p1 - p2) of the
    /// distribution it was drawn from, when the request asked `n_probs`.
    pub top2_margins: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftCounts {
    pub drafted: u64,
    pub accepted: u64,
}

impl PeerCompletion {
    /// Decode speed, tokens per second, as the peer timed it.
    pub fn tok_s(&self) -> f64 {
        if self.predicted_ms > 0.0 {
            self.predicted_n as f64 * 1000.0 / self.predicted_ms
        } else {
            0.0
        }
    }

    /// Fraction of drafted tokens accepted, when a draft was used.
    pub fn acceptance(&self) -> Option<f64> {
        self.draft
            .filter(|d| d.drafted > 0)
            .map(|d| d.accepted as f64 / d.drafted as f64)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PeerResponseError {
    #[error("llama-server response is not JSON: {0}")]
    NotJson(String),
    #[error("llama-server returned an error: {0}")]
    ServerError(String),
    #[error(
        "llama-server response has no `timings` object (too old a server, or not a completion)"
    )]
    NoTimings,
    #[error("llama-server response has no generated text")]
    NoText,
    #[error("llama-server timings field `{field}` is invalid: {value}")]
    BadTiming { field: &'static str, value: String },
    #[error("llama-server accepted {accepted} of {drafted} drafted tokens (more than it drafted)")]
    AcceptedOverDrafted { drafted: u64, accepted: u64 },
    #[error(
        "llama-server timings say {timings} tokens were decoded but the response says {reported}"
    )]
    CountMismatch { timings: u64, reported: u64 },
    #[error("llama-server returned {ids} token ids for {decoded} decoded tokens")]
    TokenCountMismatch { ids: usize, decoded: u64 },
    #[error("llama-server token probabilities are malformed at token {index}: {why}")]
    BadProbabilities { index: usize, why: String },
}

#[derive(Deserialize)]
struct Raw {
    content: Option<String>,
    choices: Option<Vec<RawChoice>>,
    timings: Option<RawTimings>,
    tokens_predicted: Option<u64>,
    usage: Option<RawUsage>,
    stop_type: Option<String>,
    error: Option<serde_json::Value>,
    #[serde(default)]
    tokens: Vec<u32>,
    completion_probabilities: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
struct RawChoice {
    text: Option<String>,
    message: Option<RawMessage>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct RawMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct RawUsage {
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct RawTimings {
    prompt_n: Option<serde_json::Value>,
    prompt_ms: Option<serde_json::Value>,
    predicted_n: Option<serde_json::Value>,
    predicted_ms: Option<serde_json::Value>,
    draft_n: Option<serde_json::Value>,
    draft_n_accepted: Option<serde_json::Value>,
}

fn count(
    field: &'static str,
    v: Option<&serde_json::Value>,
) -> Result<Option<u64>, PeerResponseError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or(PeerResponseError::BadTiming {
            field,
            value: x.to_string(),
        }),
    }
}

fn millis(field: &'static str, v: Option<&serde_json::Value>) -> Result<f64, PeerResponseError> {
    let bad = |value: String| PeerResponseError::BadTiming { field, value };
    let x = v.ok_or_else(|| bad("missing".into()))?;
    let ms = x.as_f64().ok_or_else(|| bad(x.to_string()))?;
    if !ms.is_finite() || ms < 0.0 {
        return Err(bad(x.to_string()));
    }
    Ok(ms)
}

/// Parses one non-streamed llama-server completion response.
pub fn parse_completion(body: &str) -> Result<PeerCompletion, PeerResponseError> {
    let raw: Raw =
        serde_json::from_str(body).map_err(|e| PeerResponseError::NotJson(e.to_string()))?;
    if let Some(e) = raw.error {
        let msg = e
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string());
        return Err(PeerResponseError::ServerError(msg));
    }
    let first = raw.choices.as_ref().and_then(|c| c.first());
    let text = raw
        .content
        .clone()
        .or_else(|| first.and_then(|c| c.text.clone()))
        .or_else(|| first.and_then(|c| c.message.as_ref()?.content.clone()))
        .ok_or(PeerResponseError::NoText)?;
    let t = raw.timings.as_ref().ok_or(PeerResponseError::NoTimings)?;
    let predicted_n =
        count("predicted_n", t.predicted_n.as_ref())?.ok_or(PeerResponseError::BadTiming {
            field: "predicted_n",
            value: "missing".into(),
        })?;
    let predicted_ms = millis("predicted_ms", t.predicted_ms.as_ref())?;
    let prompt_n = count("prompt_n", t.prompt_n.as_ref())?.unwrap_or(0);
    let prompt_ms = millis("prompt_ms", t.prompt_ms.as_ref())?;
    let reported = raw
        .tokens_predicted
        .or_else(|| raw.usage.as_ref()?.completion_tokens);
    if let Some(reported) = reported {
        if reported != predicted_n {
            return Err(PeerResponseError::CountMismatch {
                timings: predicted_n,
                reported,
            });
        }
    }
    let drafted = count("draft_n", t.draft_n.as_ref())?;
    let accepted = count("draft_n_accepted", t.draft_n_accepted.as_ref())?;
    let draft = match (drafted, accepted) {
        (None, None) => None,
        (d, a) => {
            let (drafted, accepted) = (d.unwrap_or(0), a.unwrap_or(0));
            if accepted > drafted {
                return Err(PeerResponseError::AcceptedOverDrafted { drafted, accepted });
            }
            Some(DraftCounts { drafted, accepted })
        }
    };
    let stop = raw
        .stop_type
        .clone()
        .or_else(|| first.and_then(|c| c.finish_reason.clone()));
    let tokens = (!raw.tokens.is_empty()).then_some(raw.tokens);
    if let Some(ids) = &tokens {
        // The end-of-generation token is decoded but not returned.
        let n = ids.len() as u64;
        if n != predicted_n && n + 1 != predicted_n {
            return Err(PeerResponseError::TokenCountMismatch {
                ids: ids.len(),
                decoded: predicted_n,
            });
        }
    }
    let top2_margins = raw
        .completion_probabilities
        .as_deref()
        .map(top2_margins)
        .transpose()?;
    Ok(PeerCompletion {
        top2_margins,
        tokens,
        text,
        prompt_n,
        prompt_ms,
        predicted_n,
        predicted_ms,
        draft,
        stop,
    })
}

/// p1 - p2 of each entry of `completion_probabilities`. llama-server writes
/// `top_logprobs: [{id, logprob}]` (log-probabilities of the raw logits),
/// or `top_probs: [{id, prob}]` when asked for post-sampling probabilities;
/// older servers wrote `probs: [{tok_str, prob}]`. Either list is sorted, most
/// probable first. One candidate only (a point mass) is a margin of 1.
fn top2_margins(entries: &[serde_json::Value]) -> Result<Vec<f32>, PeerResponseError> {
    let mut out = Vec::with_capacity(entries.len());
    for (index, e) in entries.iter().enumerate() {
        let bad = |why: &str| PeerResponseError::BadProbabilities {
            index,
            why: why.to_string(),
        };
        let (list, key, log) = if let Some(l) = e.get("top_logprobs") {
            (l, "logprob", true)
        } else if let Some(l) = e.get("top_probs") {
            (l, "prob", false)
        } else if let Some(l) = e.get("probs") {
            (l, "prob", false)
        } else {
            return Err(bad("no top_logprobs / top_probs / probs list"));
        };
        let list = list
            .as_array()
            .ok_or_else(|| bad("the list is not an array"))?;
        let mut p = Vec::with_capacity(2);
        for c in list.iter().take(2) {
            let v = c
                .get(key)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| bad(&format!("a candidate has no numeric `{key}`")))?;
            let v = if log { v.exp() } else { v };
            if !(0.0..=1.0 + 1e-6).contains(&v) {
                return Err(bad(&format!("probability {v} is outside [0, 1]")));
            }
            p.push(v);
        }
        out.push(match p[..] {
            [] => return Err(bad("no candidates")),
            [a] => a as f32,
            [a, b] if a + 1e-6 >= b => (a - b) as f32,
            _ => return Err(bad("candidates are not sorted by probability")),
        });
    }
    Ok(out)
}
