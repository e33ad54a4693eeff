//! Request bodies → validated parameters. Parsing is done by hand over
//! `serde_json::Value` so every wrong type or value gets a 400 that names the
//! field, instead of serde's generic message or a silent default.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::sampling::SamplingParams;
use crate::tokenizer::ChatMessage;

/// Largest per-request draft budget accepted (`speculative.max_nodes`).
pub const MAX_DRAFT_NODES: usize = 256;
/// OpenAI allows 4 stop sequences; a few more cost nothing.
const MAX_STOPS: usize = 16;

/// Per-request speculative settings (`"speculative": {...}`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecOverride {
    pub enabled: Option<bool>,
    pub max_nodes: Option<usize>,
}

/// What a completion prompt can be.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct Params {
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    pub speculative: SpecOverride,
}

pub fn parse_json(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid("the request body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(format!("malformed JSON body: {e}"))),
    }
}

/// `POST /v1/chat/completions`.
pub fn chat(body: &Map<String, Value>) -> Result<Params, ApiError> {
    let messages = match body.get("messages") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::param("messages", "`messages` must be an array")),
        None => return Err(ApiError::param("messages", "`messages` is required")),
    };
    if messages.is_empty() {
        return Err(ApiError::param(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        msgs.push(message(i, m)?);
    }
    common(body, Prompt::Chat(msgs), "max_completion_tokens")
}

/// `POST /v1/completions`.
pub fn completion(body: &Map<String, Value>) -> Result<Params, ApiError> {
    let bad = || {
        ApiError::param(
            "prompt",
            "`prompt` must be a string, an array of one string, or an array of token ids",
        )
    };
    let prompt = match body.get("prompt") {
        None | Some(Value::Null) => return Err(ApiError::param("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => Prompt::Ids(
            a.iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .ok_or_else(bad)
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => return Err(bad()),
    };
    if let Some(v) = body.get("echo") {
        if v.as_bool() == Some(true) {
            return Err(ApiError::param("echo", "`echo` is not supported"));
        }
    }
    common(body, prompt, "max_tokens")
}

fn message(i: usize, m: &Value) -> Result<ChatMessage, ApiError> {
    let at = format!("messages[{i}]");
    let Value::Object(m) = m else {
        return Err(ApiError::param(&at, format!("`{at}` must be an object")));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => r.clone(),
        _ => {
            return Err(ApiError::param(
                &at,
                format!("`{at}.role` must be a string"),
            ))
        }
    };
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        // The assistant message of a tool call has no content.
        Some(Value::Null) | None => String::new(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    _ => {
                        return Err(ApiError::param(
                            &at,
                            format!("`{at}.content` parts must be {{\"type\": \"text\", \"text\": ...}} (only text is supported)"),
                        ))
                    }
                }
            }
            text
        }
        Some(_) => {
            return Err(ApiError::param(
                &at,
                format!("`{at}.content` must be a string or an array of text parts"),
            ))
        }
    };
    Ok(ChatMessage { role, content })
}

fn common(body: &Map<String, Value>, prompt: Prompt, max_alias: &str) -> Result<Params, ApiError> {
    if let Some(v) = get(body, "model") {
        if !v.is_string() {
            return Err(ApiError::param("model", "`model` must be a string"));
        }
    }
    let n = uint(body, "n")?.unwrap_or(1);
    if n != 1 {
        return Err(ApiError::param("n", "only `n` = 1 is supported"));
    }
    for key in ["frequency_penalty", "presence_penalty"] {
        if let Some(x) = float(body, key)? {
            if x != 0.0 {
                return Err(ApiError::param(
                    key,
                    format!("`{key}` is not supported (use `repeat_penalty`)"),
                ));
            }
        }
    }
    if boolean(body, "logprobs")? == Some(true) {
        return Err(ApiError::param("logprobs", "`logprobs` is not supported"));
    }
    let max_tokens = match uint(body, max_alias)? {
        Some(m) => Some(m),
        None => uint(body, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::param(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    let d = SamplingParams::default();
    let temperature = float(body, "temperature")?.unwrap_or(1.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(ApiError::param("temperature", "`temperature` must be >= 0"));
    }
    let top_p = float(body, "top_p")?.unwrap_or(d.top_p as f64);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::param("top_p", "`top_p` must be in (0, 1]"));
    }
    let min_p = float(body, "min_p")?.unwrap_or(d.min_p as f64);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::param("min_p", "`min_p` must be in [0, 1]"));
    }
    let top_k = match get(body, "top_k") {
        // llama.cpp's clients send -1 or 0 for "disabled".
        Some(Value::Number(x)) if x.as_i64().is_some_and(|k| k <= 0) => 0,
        _ => uint(body, "top_k")?.unwrap_or(d.top_k),
    };
    let repeat_penalty = float(body, "repeat_penalty")?.unwrap_or(d.repeat_penalty as f64);
    if !(repeat_penalty > 0.0 && repeat_penalty.is_finite()) {
        return Err(ApiError::param(
            "repeat_penalty",
            "`repeat_penalty` must be > 0",
        ));
    }
    let repeat_last_n = uint(body, "repeat_last_n")?.unwrap_or(d.repeat_last_n);
    let seed = match get(body, "seed") {
        None => rand::random::<u64>(),
        Some(Value::Number(x)) if x.is_i64() || x.is_u64() => {
            x.as_u64().unwrap_or_else(|| x.as_i64().unwrap_or(0) as u64)
        }
        Some(_) => return Err(ApiError::param("seed", "`seed` must be an integer")),
    };
    let stop = match get(body, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        Some(_) => {
            return Err(ApiError::param(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::param(
            "stop",
            format!("at most {MAX_STOPS} stop sequences"),
        ));
    }
    let stream = boolean(body, "stream")?.unwrap_or(false);
    let include_usage = match get(body, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")?.unwrap_or(false),
        Some(_) => {
            return Err(ApiError::param(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    let ignore_eos = boolean(body, "ignore_eos")?.unwrap_or(false);
    let speculative = speculative(get(body, "speculative"))?;
    Ok(Params {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            min_p: min_p as f32,
            repeat_penalty: repeat_penalty as f32,
            repeat_last_n,
            seed,
        },
        stop,
        stream,
        include_usage,
        ignore_eos,
        speculative,
    })
}

/// `"speculative": {"enabled": bool, "max_nodes": int}`; anything else is refused.
pub fn speculative(v: Option<&Value>) -> Result<SpecOverride, ApiError> {
    let o =
        match v {
            None => return Ok(SpecOverride::default()),
            Some(Value::Object(o)) => o,
            Some(_) => return Err(ApiError::param(
                "speculative",
                "`speculative` must be an object like {\"enabled\": false} or {\"max_nodes\": 4}",
            )),
        };
    if let Some(k) = o
        .keys()
        .find(|k| !matches!(k.as_str(), "enabled" | "max_nodes"))
    {
        return Err(ApiError::param(
            "speculative",
            format!("unknown key `speculative.{k}` (known: enabled, max_nodes)"),
        ));
    }
    let enabled = match o.get("enabled") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(ApiError::param(
                "speculative",
                "`speculative.enabled` must be a boolean",
            ))
        }
    };
    let max_nodes = match o.get("max_nodes") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if n as usize <= MAX_DRAFT_NODES => Some(n as usize),
            _ => {
                return Err(ApiError::param(
                    "speculative",
                    format!("`speculative.max_nodes` must be an integer in 0..={MAX_DRAFT_NODES}"),
                ))
            }
        },
    };
    Ok(SpecOverride { enabled, max_nodes })
}

/// A present, non-null field.
fn get<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

fn float(o: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match get(o, key) {
        None => Ok(None),
        Some(Value::Number(x)) => Ok(x.as_f64()),
        Some(_) => Err(ApiError::param(key, format!("`{key}` must be a number"))),
    }
}

fn uint(o: &Map<String, Value>, key: &str) -> Result<Option<usize>, ApiError> {
    match get(o, key) {
        None => Ok(None),
        Some(Value::Number(x)) => match x.as_u64() {
            Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            None => Err(ApiError::param(
                key,
                format!("`{key}` must be a non-negative integer"),
            )),
        },
        Some(_) => Err(ApiError::param(
            key,
            format!("`{key}` must be a non-negative integer"),
        )),
    }
}

fn boolean(o: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match get(o, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::param(key, format!("`{key}` must be a boolean"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn chat_defaults_and_fields() {
        let p = chat(&obj(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 5, "temperature": 0, "stop": "x", "seed": 3,
            "stream": true, "stream_options": {"include_usage": true},
            "speculative": {"max_nodes": 4}
        })))
        .unwrap();
        assert_eq!(p.max_tokens, Some(5));
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.seed, 3);
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert!(p.stream && p.include_usage);
        assert_eq!(p.speculative.max_nodes, Some(4));
    }

    #[test]
    fn bad_values_are_refused() {
        let m = json!([{"role": "user", "content": "hi"}]);
        for bad in [
            json!({"messages": []}),
            json!({"messages": "hi"}),
            json!({"messages": m, "n": 2}),
            json!({"messages": m, "temperature": -1}),
            json!({"messages": m, "temperature": "hot"}),
            json!({"messages": m, "top_p": 0}),
            json!({"messages": m, "top_p": 1.5}),
            json!({"messages": m, "max_tokens": -3}),
            json!({"messages": m, "stop": 3}),
            json!({"messages": m, "speculative": {"enabled": false, "depth": 3}}),
            json!({"messages": m, "speculative": {"enabled": "no"}}),
            json!({"messages": m, "speculative": {"max_nodes": 1.5}}),
            json!({"messages": m, "speculative": true}),
            json!({"messages": [{"role": "user", "content": 7}]}),
        ] {
            let e = chat(&obj(bad.clone())).expect_err(&bad.to_string());
            assert_eq!(e.status, 400, "{bad}");
        }
    }

    #[test]
    fn completion_prompts() {
        let p = completion(&obj(json!({"prompt": ["a b"]}))).unwrap();
        assert_eq!(p.prompt, Prompt::Text("a b".into()));
        let p = completion(&obj(json!({"prompt": [1, 2, 3]}))).unwrap();
        assert_eq!(p.prompt, Prompt::Ids(vec![1, 2, 3]));
        assert!(completion(&obj(json!({"prompt": [1, "a"]}))).is_err());
        assert!(completion(&obj(json!({}))).is_err());
    }

    #[test]
    fn malformed_json() {
        assert!(parse_json(b"{\"messages\": [").is_err());
        assert!(parse_json(b"[1]").is_err());
        assert!(parse_json(b"{}").is_ok());
    }
}
