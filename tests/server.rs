//! `treespec serve` end to end: the real binary on a loopback port, spoken
//! to over raw HTTP/1.1 so the test sees exactly what a client would.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_treespec");
const MODEL: &str = "smollm2-135m";

struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let port = free_port();
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "-m",
                MODEL,
                "--port",
                &port.to_string(),
                "-c",
                "512",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start treespec serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                eprintln!("[server] {line}");
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let s = Server { child, port, log };
        s.wait_healthy();
        s
    }

    fn wait_healthy(&self) {
        let t = Instant::now();
        loop {
            if let Ok(r) = try_http(self.port, "GET", "/health", &[], None) {
                if r.status == 200 {
                    assert_eq!(r.json()["status"], "ok");
                    return;
                }
                assert_eq!(r.status, 503, "health while loading: {}", r.body);
                assert!(r.json()["error"]["message"].is_string());
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "server never became healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn get(&self, path: &str) -> Resp {
        http(self.port, "GET", path, &[], None)
    }

    fn post(&self, path: &str, body: &Value) -> Resp {
        http(self.port, "POST", path, &[], Some(&body.to_string()))
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").body;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
            .trim()
            .parse()
            .expect("metric value")
    }

    /// SIGTERM, then the exit status (the server must exit on its own).
    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "server ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an SSE body.
    fn sse(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(str::to_string)
            .collect()
    }

    /// Asserts an OpenAI-shaped error with this status.
    fn assert_error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("code").is_some(), "{v}");
        e.clone()
    }
}

fn request_bytes(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    req.into_bytes()
}

fn try_http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(&request_bytes(method, path, headers, body))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(Resp {
        status,
        headers,
        body: String::from_utf8(body).expect("UTF-8 body"),
    })
}

fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    try_http(port, method, path, headers, body).expect("HTTP request")
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// Streamed text of an SSE completion (chat deltas or completion text).
fn streamed_text(r: &Resp, chat: bool) -> (String, Vec<Value>) {
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers["content-type"].starts_with("text/event-stream"));
    let data = r.sse();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.body
    );
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    let mut text = String::new();
    for c in &chunks {
        if let Some(choice) = c["choices"].get(0) {
            let piece = if chat {
                &choice["delta"]["content"]
            } else {
                &choice["text"]
            };
            text.push_str(piece.as_str().unwrap_or(""));
        }
    }
    (text, chunks)
}

fn generate_json(prompt: &str, chat: bool, max_tokens: usize) -> Value {
    generate_with(prompt, chat, max_tokens, &[])
}

/// `treespec generate --json` (with `--chat` and `--stop`s as asked): its one JSON line.
fn generate_with(prompt: &str, chat: bool, max_tokens: usize, stops: &[&str]) -> Value {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "generate",
        "-m",
        MODEL,
        "--json",
        "-n",
        &max_tokens.to_string(),
    ]);
    if chat {
        cmd.arg("--chat");
    }
    for s in stops {
        cmd.args(["--stop", s]);
    }
    let out = cmd.arg(prompt).output().expect("run treespec generate");
    assert!(
        out.status.success(),
        "generate (stops {stops:?}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).expect("UTF-8");
    serde_json::from_str(line.trim()).expect("generate --json prints one JSON line")
}

const CHAT_PROMPT: &str = "Write a short poem about the sea.";
const TEXT_PROMPT: &str = "The capital of France is Paris. The capital of Germany is";
const N: usize = 24;

#[test]
fn serves_the_openai_api() {
    let srv = Server::start(&[]);
    let gen0 = srv.metric("treespec_generation_tokens_total");
    let prompt0 = srv.metric("treespec_prompt_tokens_total");

    // Chat, not streamed, greedy.
    let chat_body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "max_tokens": N, "temperature": 0,
    });
    let r = srv.post("/v1/chat/completions", &chat_body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let chat_text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!chat_text.is_empty());
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    assert!(v["timings"]["predicted_n"].as_u64().unwrap() > 0);
    assert!(v["timings"]["predicted_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["timings"]["draft_n"].is_u64() && v["timings"]["draft_n_accepted"].is_u64());
    assert_eq!(v["spec"]["method"], "hybrid");
    assert!(v["spec"]["steps"].as_u64().unwrap() > 0);

    // Same text as the CLI for the same prompt (same template, same ids).
    let cli = generate_json(CHAT_PROMPT, true, N);
    assert_eq!(
        cli["text"].as_str().unwrap(),
        chat_text,
        "server vs `generate --chat --json`"
    );

    // Streamed: same text, role first, usage last.
    let mut streamed = chat_body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = srv.post("/v1/chat/completions", &streamed);
    let (text, chunks) = streamed_text(&r, true);
    assert_eq!(text, chat_text, "streamed vs non-streamed chat");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        last["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );
    let fin = &chunks[chunks.len() - 2];
    assert!(fin["choices"][0]["finish_reason"].is_string(), "{fin}");
    assert!(fin["timings"]["predicted_n"].as_u64().unwrap() > 0);

    // Speculation off per request: lossless, so the same text.
    let mut plain = chat_body.clone();
    plain["speculative"] = json!({"enabled": false});
    let v = srv.post("/v1/chat/completions", &plain).json();
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str(),
        Some(chat_text.as_str())
    );
    assert_eq!(v["spec"]["enabled"], false);
    assert_eq!(v["timings"]["draft_n"], 0);

    // Completions, not streamed and streamed, and against the CLI.
    let comp_body = json!({"prompt": TEXT_PROMPT, "max_tokens": N, "temperature": 0.0});
    let v = srv.post("/v1/completions", &comp_body).json();
    assert_eq!(v["object"], "text_completion");
    let comp_text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let cli = generate_json(TEXT_PROMPT, false, N);
    assert_eq!(
        cli["text"].as_str().unwrap(),
        comp_text,
        "server vs `generate --json`"
    );
    let mut streamed = comp_body.clone();
    streamed["stream"] = json!(true);
    let (text, chunks) = streamed_text(&srv.post("/v1/completions", &streamed), false);
    assert_eq!(text, comp_text, "streamed vs non-streamed completion");
    assert_eq!(chunks[0]["object"], "text_completion");

    // Stop strings cut the text.
    let mut stopped = comp_body.clone();
    let word = comp_text
        .split_whitespace()
        .nth(1)
        .unwrap_or("the")
        .to_string();
    stopped["stop"] = json!([word.clone()]);
    let v = srv.post("/v1/completions", &stopped).json();
    assert!(!v["choices"][0]["text"].as_str().unwrap().contains(&word));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Counters moved.
    assert!(srv.metric("treespec_generation_tokens_total") > gen0);
    assert!(srv.metric("treespec_prompt_tokens_total") > prompt0);
    assert!(srv.metric("treespec_spec_decode_num_drafts_total") > 0.0);
    assert!(srv.metric("treespec_time_to_first_token_seconds_count") >= 6.0);
    let m = srv.get("/metrics").body;
    for name in [
        "treespec_spec_decode_num_draft_tokens_total",
        "treespec_spec_decode_num_accepted_tokens_total",
        "treespec_inter_token_latency_seconds_bucket",
        "treespec_num_requests_running",
        "treespec_num_requests_waiting",
    ] {
        assert!(m.contains(name), "{name} missing");
    }

    // The other endpoints.
    let models = srv.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], MODEL);
    let props = srv.get("/props").json();
    assert_eq!(props["speculative"]["method"], "hybrid");
    assert_eq!(props["n_ctx"], 512);
    let toks = srv
        .post("/tokenize", &json!({"content": "Hello world"}))
        .json();
    let ids = toks["tokens"].as_array().unwrap().clone();
    assert!(!ids.is_empty());
    let back = srv.post("/detokenize", &json!({"tokens": ids})).json();
    assert_eq!(back["content"], "Hello world");

    // Bad inputs: right status, OpenAI shape, server still up.
    let raw = http(
        srv.port,
        "POST",
        "/v1/chat/completions",
        &[],
        Some("{\"messages\": ["),
    )
    .assert_error(400);
    assert_eq!(raw["type"], "invalid_request_error");
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for (body, param) in [
        (
            json!({"messages": msgs, "temperature": "hot"}),
            "temperature",
        ),
        (json!({"messages": msgs, "n": 2}), "n"),
        (json!({"messages": msgs, "temperature": -1}), "temperature"),
        (json!({"messages": msgs, "top_p": 0}), "top_p"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": msgs, "speculative": {"max_nodez": 4}}),
            "speculative",
        ),
        (
            json!({"messages": msgs, "speculative": {"enabled": "no"}}),
            "speculative",
        ),
    ] {
        let e = srv.post("/v1/chat/completions", &body).assert_error(400);
        assert_eq!(e["param"], param, "{body}");
    }
    let long = "lorem ipsum dolor ".repeat(400);
    let e = srv
        .post("/v1/completions", &json!({"prompt": long, "max_tokens": 4}))
        .assert_error(400);
    assert_eq!(e["code"], "context_length_exceeded");
    let e = srv
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": long}]}),
        )
        .assert_error(400);
    assert_eq!(e["code"], "context_length_exceeded");
    srv.post("/detokenize", &json!({"tokens": [1, "x"]}))
        .assert_error(400);
    srv.get("/no/such/thing").assert_error(404);

    // A client that leaves mid-stream frees its slot: the long generation
    // is cancelled and the next request runs.
    let cancelled0 = srv.metric("treespec_requests_total{outcome=\"cancelled\"}");
    {
        let body = json!({
            "prompt": TEXT_PROMPT, "max_tokens": 400, "ignore_eos": true,
            "temperature": 0, "stream": true,
        })
        .to_string();
        let mut s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(&request_bytes("POST", "/v1/completions", &[], Some(&body)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&got).contains("data: ") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended early");
            got.extend_from_slice(&buf[..n]);
        }
        // Dropping the socket closes it.
    }
    let v = srv
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4}))
        .json();
    assert!(v["choices"][0]["text"].is_string());
    assert_eq!(
        srv.metric("treespec_requests_total{outcome=\"cancelled\"}"),
        cancelled0 + 1.0,
        "the abandoned stream was not cancelled"
    );
    assert_eq!(srv.metric("treespec_num_requests_running"), 0.0);

    let status = srv.terminate();
    assert!(status.success(), "exit status {status:?}");
}

/// Concurrent requests share forwards (continuous batching) and each gets
/// exactly what it gets alone; a chat's second turn reuses the first turn's
/// cache and prefills only the new tokens.
#[test]
fn batches_concurrent_requests_and_reuses_prefixes() {
    let srv = Server::start(&["--max-concurrent", "4", "--batch-rows", "24"]);
    let prompts = [
        "The capital of France is Paris. The capital of Germany is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "1, 2, 3, 4, 5,",
    ];
    let body = |p: &str, spec: bool| {
        json!({"prompt": p, "max_tokens": N, "temperature": 0, "ignore_eos": true,
               "speculative": {"enabled": spec}})
    };
    for spec in [false, true] {
        let alone: Vec<String> = prompts
            .iter()
            .map(|p| {
                let v = srv.post("/v1/completions", &body(p, spec)).json();
                v["choices"][0]["text"].as_str().unwrap().to_string()
            })
            .collect();
        let batched0 = srv.metric("treespec_batch_sequences_sum")
            - srv.metric("treespec_batch_sequences_count");
        let port = srv.port;
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let b = body(p, spec).to_string();
                std::thread::spawn(move || http(port, "POST", "/v1/completions", &[], Some(&b)))
            })
            .collect();
        for (h, want) in handles.into_iter().zip(&alone) {
            let v = h.join().unwrap().json();
            assert_eq!(
                v["choices"][0]["text"].as_str().unwrap(),
                want,
                "batched vs alone (speculative {spec})"
            );
            assert_eq!(v["usage"]["completion_tokens"], N);
        }
        // sum - count grows by (sequences - 1) per forward: some forward
        // carried more than one request.
        let batched = srv.metric("treespec_batch_sequences_sum")
            - srv.metric("treespec_batch_sequences_count");
        assert!(batched > batched0, "no forward batched two requests");
    }

    // Multi-turn: the second turn's prompt starts with the first turn's
    // prompt and answer, which a slot's cache holds.
    let first = json!([{"role": "user", "content": "Name a colour."}]);
    let v = srv
        .post(
            "/v1/chat/completions",
            &json!({"messages": first, "max_tokens": 8, "temperature": 0}),
        )
        .json();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    let first_prompt = v["usage"]["prompt_tokens"].as_f64().unwrap();
    let cached0 = srv.metric("treespec_prompt_tokens_cached_total");
    let second = json!([
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And another one?"},
    ]);
    let v = srv
        .post(
            "/v1/chat/completions",
            &json!({"messages": second, "max_tokens": 8, "temperature": 0}),
        )
        .json();
    assert!(v["choices"][0]["message"]["content"].is_string());
    let reused = srv.metric("treespec_prompt_tokens_cached_total") - cached0;
    assert!(
        reused >= first_prompt - 1.0,
        "second turn reused {reused} tokens of a {first_prompt}-token first turn"
    );
    assert_eq!(srv.metric("treespec_num_requests_running"), 0.0);
    let props = srv.get("/props").json();
    assert_eq!(props["total_slots"], 4);
    assert_eq!(props["batch_rows"], 24);
    let status = srv.terminate();
    assert!(status.success(), "exit status {status:?}");
}

/// The prefix cache across requests: with one slot, a chat sharing a long
/// system prompt with an earlier one (another request ran in between)
/// restores its blocks and prefills only the rest, with the same text as
/// without the cache; a cache of about one block evicts and stays exact.
#[test]
fn prefix_cache_serves_shared_system_prompts() {
    let system = "You are a careful assistant. Answer briefly and precisely. ".repeat(16);
    let chat = |q: &str| {
        json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
               "max_tokens": 12, "temperature": 0})
    };
    let mut texts = Vec::new();
    for cache_mb in ["64", "2", "0"] {
        let srv = Server::start(&["--max-concurrent", "1", "--cache-mb", cache_mb]);
        srv.post(
            "/v1/chat/completions",
            &chat("What is the capital of Italy?"),
        )
        .json();
        srv.post(
            "/v1/completions",
            &json!({"prompt": "Something else entirely: ".repeat(30), "max_tokens": 4}),
        )
        .json();
        let hits0 = srv.metric("treespec_prefix_cache_hit_tokens_total");
        let v = srv
            .post("/v1/chat/completions", &chat("Name a large mammal."))
            .json();
        texts.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        let hits = srv.metric("treespec_prefix_cache_hit_tokens_total") - hits0;
        let evictions = srv.metric("treespec_prefix_cache_evictions_total");
        let bytes = srv.metric("treespec_prefix_cache_bytes");
        match cache_mb {
            "64" => {
                assert!(
                    hits >= 128.0,
                    "restored {hits} tokens of a shared system prompt"
                );
                assert!(bytes > 0.0);
                assert_eq!(evictions, 0.0);
            }
            "2" => {
                assert!(evictions > 0.0, "a 2 MB cache did not evict");
                assert!(bytes <= 2.0 * 1024.0 * 1024.0);
            }
            _ => {
                assert_eq!(hits, 0.0);
                assert_eq!(bytes, 0.0);
            }
        }
        assert!(srv.metric("treespec_kv_cache_bytes") > 0.0);
        let status = srv.terminate();
        assert!(status.success());
    }
    assert_eq!(texts[0], texts[2], "prefix cache on vs off");
    assert_eq!(texts[1], texts[2], "tiny prefix cache vs off");
}

/// `generate --json` with stop strings: (text, finish reason).
fn generate_with_stops(prompt: &str, max_tokens: usize, stops: &[&str]) -> (String, String) {
    let v = generate_with(prompt, false, max_tokens, stops);
    (
        v["text"].as_str().unwrap().to_string(),
        v["stop"].as_str().unwrap_or_default().to_string(),
    )
}

/// Stop strings over Japanese and emoji output, in the CLI and the server,
/// streamed and not: a stop that never matches leaves the text whole (it
/// used to panic, slicing inside a character: the scan started at
/// `emitted - stop.len()` bytes), and a multibyte stop taken from the
/// output, whose tokens split characters, cuts right before it.
#[test]
fn stop_strings_cut_non_ascii_output_on_character_boundaries() {
    let srv = Server::start(&[]);
    for prompt in [
        "日本の首都は東京です。中国の首都は北京です。韓国の首都は",
        "My favourite emojis are 😀 😂 🎉 and",
    ] {
        let body = json!({"prompt": prompt, "max_tokens": N, "temperature": 0});
        let full = srv.post("/v1/completions", &body).json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        let wide: Vec<char> = full.chars().filter(|c| c.len_utf8() > 1).collect();
        assert!(
            wide.len() >= 3,
            "expected non-ASCII output for {prompt:?}: {full:?}"
        );
        // The third wide character: its first occurrence is past the start.
        let stop = wide[2].to_string();
        let cut = full[..].find(&stop).unwrap();
        let expected = &full[..cut];
        for (stops, want, reason) in [
            (vec!["zz", "🛑x"], full.as_str(), None),
            (vec![stop.as_str(), "zz"], expected, Some("stop")),
        ] {
            for stream in [false, true] {
                let mut b = body.clone();
                b["stop"] = json!(stops);
                b["stream"] = json!(stream);
                let r = srv.post("/v1/completions", &b);
                let text = if stream {
                    streamed_text(&r, false).0
                } else {
                    assert_eq!(r.status, 200, "{}", r.body);
                    let v = r.json();
                    if let Some(reason) = reason {
                        assert_eq!(v["choices"][0]["finish_reason"], reason);
                    }
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                };
                assert_eq!(text, want, "server, stream {stream}, stops {stops:?}");
            }
            let (text, why) = generate_with_stops(prompt, N, &stops);
            assert_eq!(text, want, "CLI, stops {stops:?}");
            if reason.is_some() {
                assert_eq!(why, "stop_string", "CLI stop reason");
            }
        }
    }
    // The server is still whole after all that.
    assert_eq!(srv.get("/health").status, 200);
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("treespec-server-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn sigterm_saves_the_recycle_state_and_a_restart_loads_it() {
    let state = temp_path("recycle.bin");
    let _ = std::fs::remove_file(&state);
    let state_arg = state.to_str().unwrap();
    let key = "sekrit";
    let args = [
        "--max-concurrent",
        "1",
        "--queue",
        "0",
        "--spec",
        "recycle",
        "--recycle-state",
        state_arg,
        "--api-key",
        key,
    ];
    let srv = Server::start(&args);
    let auth = format!("Bearer {key}");
    let body = json!({"prompt": TEXT_PROMPT, "max_tokens": 16, "temperature": 0}).to_string();

    // API key: missing or wrong → 401; /health stays open.
    http(srv.port, "POST", "/v1/completions", &[], Some(&body)).assert_error(401);
    http(
        srv.port,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer nope")],
        Some(&body),
    )
    .assert_error(401);
    let r = http(
        srv.port,
        "POST",
        "/v1/completions",
        &[("Authorization", &auth)],
        Some(&body),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let props = http(srv.port, "GET", "/props", &[("Authorization", &auth)], None).json();
    assert_eq!(props["speculative"]["recycle_rows_loaded"], 0);
    let rows = props["speculative"]["recycle_rows"].as_u64().unwrap();
    assert!(rows > 0, "a request should have written matrix rows");

    // SIGTERM while a stream is in flight: it finishes (within the grace
    // period), then the server saves the matrix and exits 0.
    let port = srv.port;
    let long = json!({
        "prompt": TEXT_PROMPT, "max_tokens": 96, "ignore_eos": true,
        "temperature": 0, "stream": true,
    })
    .to_string();
    let auth2 = auth.clone();
    let inflight = std::thread::spawn(move || {
        http(
            port,
            "POST",
            "/v1/completions",
            &[("Authorization", &auth2)],
            Some(&long),
        )
    });
    let t = Instant::now();
    while metric_with(port, &auth, "treespec_num_requests_running") < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the stream never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // One slot, `--queue 0`: a second request meanwhile is turned away.
    let r = http(
        srv.port,
        "POST",
        "/v1/completions",
        &[("Authorization", &auth)],
        Some(&body),
    );
    r.assert_error(429);
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    let srv_log = srv.log.clone();
    let status = srv.terminate();
    assert!(status.success(), "exit status {status:?}");
    let (text, chunks) = streamed_text(&inflight.join().unwrap(), false);
    assert!(!text.is_empty());
    let fin = &chunks[chunks.len() - 1];
    assert_eq!(fin["choices"][0]["finish_reason"], "length", "{fin}");
    assert_eq!(fin["timings"]["predicted_n"], 96);
    assert!(state.exists(), "SIGTERM did not save {}", state.display());
    // The save is logged with its row count; the in-flight stream added rows.
    let saved: u64 = {
        let log = srv_log.lock().unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("recycle state saved"))
            .unwrap_or_else(|| panic!("no save line in the log:\n{log}"));
        let n = line
            .rsplit('(')
            .next()
            .and_then(|r| r.split_whitespace().next());
        n.and_then(|n| n.parse().ok())
            .expect("row count in the save line")
    };
    assert!(saved >= rows);
    assert!(state_file_has_rows(&state));

    let srv = Server::start(&args);
    let props = http(srv.port, "GET", "/props", &[("Authorization", &auth)], None).json();
    assert_eq!(
        props["speculative"]["recycle_rows_loaded"].as_u64(),
        Some(saved)
    );
    assert!(srv
        .log
        .lock()
        .unwrap()
        .contains(&format!("recycle rows loaded {saved}")));

    // A corrupt state file is ignored with a warning: the server still serves.
    let status = srv.terminate();
    assert!(status.success());
    std::fs::write(&state, b"not a recycle matrix").unwrap();
    let srv = Server::start(&args);
    let props = http(srv.port, "GET", "/props", &[("Authorization", &auth)], None).json();
    assert_eq!(props["speculative"]["recycle_rows_loaded"], 0);
    let r = http(
        srv.port,
        "POST",
        "/v1/completions",
        &[("Authorization", &auth)],
        Some(&body),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    drop(srv);
    let _ = std::fs::remove_file(&state);
}

fn metric_with(port: u16, auth: &str, name: &str) -> f64 {
    let text = http(port, "GET", "/metrics", &[("Authorization", auth)], None).body;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

/// More than a header: the saved matrix holds the rows.
fn state_file_has_rows(state: &Path) -> bool {
    std::fs::metadata(state)
        .map(|m| m.len() > 64)
        .unwrap_or(false)
}
