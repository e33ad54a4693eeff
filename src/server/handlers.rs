//! The HTTP endpoints. Generation requests are parsed and tokenized here,
//! queued to the workers, and answered either as one JSON body or as an SSE
//! stream of OpenAI chunks.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::params::{self, Params, Prompt};
use super::worker::{Engine, Event, Job, Rejected};
use super::AppState;
use crate::engine::{chat_prompt_ids, text_prompt_ids, GenerateOptions, Generation, StopReason};

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .route("/completions", post(completion))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/props", get(props))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .merge(protected)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(state)
}

async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok()));
        if !given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so timing does not reveal the key prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(st): State<Shared>) -> Response {
    match st.engine() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    let engine = st.engine()?;
    let c = engine.model.config();
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": st.config.model_name,
            "object": "model",
            "created": unix_time(),
            "owned_by": "treespec",
            "meta": {
                "n_ctx": engine.context,
                "n_ctx_train": c.context_length,
                "n_vocab": c.vocab_size,
                "n_layer": c.n_layers,
            },
        }],
    })))
}

async fn props(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    let engine = st.engine()?;
    let s = &engine.spec;
    Ok(Json(json!({
        "model": st.config.model_name,
        "model_path": engine.model.path.display().to_string(),
        "n_ctx": engine.context,
        "total_slots": engine.max_concurrent,
        "max_concurrent": engine.max_concurrent,
        "batch_rows": engine.batch_rows,
        "cache_mb": engine.prefix_cache_bytes as f64 / (1 << 20) as f64,
        "queue": engine.queue_cap,
        "uptime_s": st.started.elapsed().as_secs_f64(),
        "speculative": {
            "method": s.method.name(),
            "tree": s.tree,
            "max_nodes": s.max_draft,
            "seed_from_prompt": s.seed_from_prompt,
            "recycle_state": s.recycle_state.as_ref().map(|p| p.display().to_string()),
            "recycle_rows_loaded": engine.rows_loaded,
            "recycle_rows": engine.recycle_rows(),
        },
    })))
}

async fn metrics(State(st): State<Shared>) -> Response {
    let (running, waiting) = st
        .engine
        .get()
        .map_or((0, 0), |e| (e.running(), e.waiting()));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(running, waiting),
    )
        .into_response()
}

async fn tokenize(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let engine = st.engine()?;
    let body = params::parse_json(&body_bytes(body)?)?;
    let content = match body.get("content") {
        Some(Value::String(s)) => s,
        _ => return Err(ApiError::param("content", "`content` must be a string")),
    };
    let flag = |key: &str| match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::param(key, format!("`{key}` must be a boolean"))),
    };
    let (add_special, parse_special) = (flag("add_special")?, flag("parse_special")?);
    let (engine, content) = (engine.clone(), content.clone());
    let tokens = off_runtime(move || {
        let tok = &engine.model.tokenizer;
        Ok(if add_special {
            text_prompt_ids(tok, &content, parse_special)?
        } else {
            tok.encode(&content, parse_special)?
        })
    })
    .await?;
    Ok(Json(json!({ "tokens": tokens })))
}

async fn detokenize(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let engine = st.engine()?;
    let body = params::parse_json(&body_bytes(body)?)?;
    let vocab = engine.model.config().vocab_size;
    let bad = || {
        ApiError::param(
            "tokens",
            format!("`tokens` must be an array of token ids below {vocab}"),
        )
    };
    let ids: Vec<u32> = match body.get("tokens") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&t| (t as usize) < vocab)
                    .map(|t| t as u32)
                    .ok_or_else(bad)
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    let engine = engine.clone();
    let content = off_runtime(move || Ok(engine.model.tokenizer.decode(&ids)?)).await?;
    Ok(Json(json!({ "content": content })))
}

/// Runs CPU work of a request (tokenizing, rendering the chat template,
/// detokenizing) on tokio's blocking pool: a long prompt takes milliseconds
/// to tokenize, and on the runtime's few worker threads that would stall
/// every other connection's streaming meanwhile.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request task failed: {e}")))?
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError::new(e.status(), "invalid_request_error", e.body_text()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    run_generation(st, body, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completion(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    run_generation(st, body, Kind::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Sets the job's cancel flag when the handler (or its stream) goes away,
/// i.e. when the client disconnects; the worker stops at its next token.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a response needs besides the generation.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    speculate: bool,
    max_nodes: usize,
}

async fn run_generation(
    st: Shared,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = body_bytes(body)?;
    let engine = st.engine()?.clone();
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::shutting_down());
    }
    // Parsing, template rendering and tokenizing: off the runtime.
    let (prompt, p) = {
        let engine = engine.clone();
        off_runtime(move || {
            let map = params::parse_json(&body)?;
            let p = match kind {
                Kind::Chat => params::chat(&map)?,
                Kind::Completion => params::completion(&map)?,
            };
            Ok((prompt_ids(&engine, &p)?, p))
        })
        .await?
    };
    let speculate = engine.has_drafter()
        && p.speculative.enabled != Some(false)
        && p.speculative.max_nodes != Some(0);
    let max_nodes = p.speculative.max_nodes.unwrap_or(engine.spec.max_draft);
    let opts = GenerateOptions {
        max_new_tokens: p.max_tokens.unwrap_or(usize::MAX),
        sampling: p.sampling.clone(),
        stop_strings: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        max_draft: if speculate { max_nodes } else { 0 },
        // An explicit per-request budget overrides `--tree auto`.
        auto_budget: if speculate && p.speculative.max_nodes.is_none() {
            engine.auto_budget.clone()
        } else {
            None
        },
        ..Default::default()
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    engine
        .submit(Job {
            prompt,
            opts,
            speculate,
            cancel,
            events: tx,
            arrived,
        })
        .map_err(|r| match r {
            Rejected::QueueFull(n) => ApiError::queue_full(n),
            Rejected::ShuttingDown => ApiError::shutting_down(),
        })?;
    let reply = Reply {
        kind,
        id: new_id(kind),
        created: unix_time(),
        model: st.config.model_name.clone(),
        speculate,
        max_nodes: if speculate { max_nodes } else { 0 },
    };
    if p.stream {
        Ok(stream(reply, rx, guard, p.include_usage))
    } else {
        whole(reply, rx, guard).await
    }
}

fn prompt_ids(engine: &Engine, p: &Params) -> Result<Vec<u32>, ApiError> {
    let tok = &engine.model.tokenizer;
    let ids = match &p.prompt {
        Prompt::Chat(msgs) => chat_prompt_ids(tok, msgs)?,
        Prompt::Text(t) => text_prompt_ids(tok, t, true)?,
        Prompt::Ids(ids) => {
            let vocab = engine.model.config().vocab_size;
            if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::param(
                    "prompt",
                    format!("token id {t} is outside the vocabulary ({vocab})"),
                ));
            }
            ids.clone()
        }
    };
    if ids.is_empty() {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    if ids.len() >= engine.context {
        return Err(ApiError::invalid(format!(
            "this model's context holds {} tokens, but the prompt has {} (at least one must be left to generate)",
            engine.context,
            ids.len()
        ))
        .with_code("context_length_exceeded"));
    }
    Ok(ids)
}

async fn whole(
    reply: Reply,
    mut rx: mpsc::UnboundedReceiver<Event>,
    _guard: CancelOnDrop,
) -> Result<Response, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::Text(_)) => {}
            Some(Event::Done(done)) => {
                return match *done {
                    Ok(g) => Ok(Json(full_body(&reply, &g)).into_response()),
                    Err(e) => Err(e),
                }
            }
            None => return Err(ApiError::internal("the worker stopped without an answer")),
        }
    }
}

fn stream(
    reply: Reply,
    mut events: mpsc::UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let _guard = guard;
        if reply.kind == Kind::Chat {
            let first = chunk(&reply, json!({"role": "assistant", "content": ""}), None);
            if tx.send(Ok(sse(first))).await.is_err() {
                return;
            }
        }
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                // The client is gone: drop the guard now, not at the next token.
                _ = tx.closed() => return,
            };
            let (out, finished) = match ev {
                Some(Event::Text(text)) if text.is_empty() => continue,
                Some(Event::Text(text)) => {
                    let delta = match reply.kind {
                        Kind::Chat => json!({ "content": text }),
                        Kind::Completion => json!(text),
                    };
                    (vec![sse(chunk(&reply, delta, None))], false)
                }
                Some(Event::Done(done)) => (final_events(&reply, *done, include_usage), true),
                None => (
                    final_events(
                        &reply,
                        Err(ApiError::internal("the worker stopped without an answer")),
                        include_usage,
                    ),
                    true,
                ),
            };
            for e in out {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if finished {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

fn sse(v: Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// The end of a stream: the finishing chunk (with `timings` and `spec`), the
/// usage chunk when asked for, `[DONE]`; or an error event and `[DONE]`.
fn final_events(
    reply: &Reply,
    done: Result<Generation, ApiError>,
    include_usage: bool,
) -> Vec<SseEvent> {
    let mut out = Vec::new();
    match done {
        Ok(g) => {
            let mut last = chunk(reply, empty_delta(reply.kind), Some(&g));
            last["timings"] = timings(&g);
            last["spec"] = spec_json(reply, &g);
            out.push(sse(last));
            if include_usage {
                let mut u = chunk(reply, Value::Null, None);
                u["choices"] = json!([]);
                u["usage"] = usage(&g);
                out.push(sse(u));
            }
        }
        Err(e) => out.push(sse(e.body())),
    }
    out.push(SseEvent::default().data("[DONE]"));
    out
}

fn empty_delta(kind: Kind) -> Value {
    match kind {
        Kind::Chat => json!({}),
        Kind::Completion => json!(""),
    }
}

/// One streamed chunk; `delta` is the chat delta object or the completion text.
fn chunk(r: &Reply, delta: Value, done: Option<&Generation>) -> Value {
    let finish = done.map(|g| finish_reason(g.stop));
    let choice = match r.kind {
        Kind::Chat => {
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": 0, "text": delta, "logprobs": null, "finish_reason": finish})
        }
    };
    json!({
        "id": r.id,
        "object": match r.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        },
        "created": r.created,
        "model": r.model,
        "system_fingerprint": FINGERPRINT,
        "choices": [choice],
    })
}

fn full_body(r: &Reply, g: &Generation) -> Value {
    let finish = finish_reason(g.stop);
    let (object, choice) = match r.kind {
        Kind::Chat => (
            "chat.completion",
            json!({
                "index": 0,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": null,
                "finish_reason": finish,
            }),
        ),
        Kind::Completion => (
            "text_completion",
            json!({"index": 0, "text": g.text, "logprobs": null, "finish_reason": finish}),
        ),
    };
    json!({
        "id": r.id,
        "object": object,
        "created": r.created,
        "model": r.model,
        "system_fingerprint": FINGERPRINT,
        "choices": [choice],
        "usage": usage(g),
        "timings": timings(g),
        "spec": spec_json(r, g),
    })
}

const FINGERPRINT: &str = concat!("treespec-", env!("CARGO_PKG_VERSION"));

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::Cancelled => "cancelled",
    }
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.stats.prompt_tokens,
        "completion_tokens": g.stats.generated_tokens,
        "total_tokens": g.stats.prompt_tokens + g.stats.generated_tokens,
    })
}

/// llama.cpp's `timings` object, with its draft counters.
fn timings(g: &Generation) -> Value {
    let s = &g.stats;
    let per_token = |ms: f64, n: usize| if n > 0 { ms / n as f64 } else { 0.0 };
    json!({
        "cache_n": s.prompt_tokens - s.prefilled_tokens.min(s.prompt_tokens),
        "prompt_n": s.prefilled_tokens,
        "prompt_ms": s.prefill_ms,
        "prompt_per_token_ms": per_token(s.prefill_ms, s.prefilled_tokens),
        "prompt_per_second": s.prefill_tok_s,
        "predicted_n": s.generated_tokens,
        "predicted_ms": s.decode_ms,
        "predicted_per_token_ms": per_token(s.decode_ms, s.generated_tokens),
        "predicted_per_second": s.decode_tok_s,
        "draft_n": g.spec.drafted_tokens,
        "draft_n_accepted": g.spec.accepted_tokens,
    })
}

fn spec_json(r: &Reply, g: &Generation) -> Value {
    let mut v = serde_json::to_value(&g.spec).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("enabled".into(), json!(r.speculate));
        m.insert("max_nodes".into(), json!(r.max_nodes));
    }
    v
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    format!("{prefix}-{:x}{nanos:08x}{n:04x}", unix_time())
}
