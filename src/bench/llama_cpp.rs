//! The llama.cpp peer, run in the same process run as treespec so every
//! ratio compares two engines on the same host at the same moment: where its
//! binaries are (`--peer llama.cpp[=PATH]`, by default the build that
//! `scripts/peers/llama_cpp.sh` caches under `$TREESPEC_HOME/peers/`), a
//! `llama-server` started on a loopback port per speculative mode, and the
//! outputs of `llama-bench` / `llama-batched-bench` for `bench forward`.
//!
//! Prompts go to llama-server's native `/completion` endpoint as token ids,
//! rendered and tokenized by treespec, so both engines see exactly the same
//! prompt (no second chat template, no second tokenizer), and the generated
//! ids come back (`return_tokens`) so outputs are compared token by token.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::llama_server::{parse_completion, PeerCompletion, PeerResponseError};

/// The peer's name in `--peer` and in method labels (`llama.cpp:ngram-mod`).
pub const PEER: &str = "llama.cpp";

/// Speculative modes of llama-server that need no second model, in the
/// order a report lists them: plain decoding and its three n-gram drafters.
pub const DEFAULT_MODES: &[&str] = &["none", "ngram-simple", "ngram-mod", "ngram-cache"];

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("unknown peer `{0}` (known: llama.cpp, llama.cpp=PATH)")]
    UnknownPeer(String),
    #[error("no llama.cpp build found{0}: run `bash scripts/peers/llama_cpp.sh` (or give --peer llama.cpp=PATH to a folder holding llama-server)")]
    NotBuilt(String),
    #[error("{} is missing: the llama.cpp build at {} is incomplete", .0.display(), .1.display())]
    MissingBinary(PathBuf, PathBuf),
    #[error(
        "unknown llama.cpp mode `{0}` (known: none, ngram-simple, ngram-mod, ngram-cache, draft)"
    )]
    UnknownMode(String),
    #[error("llama.cpp mode `draft` needs a draft model (--peer-draft-model)")]
    DraftWithoutModel,
    #[error("starting {}: {source}", path.display())]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("llama-server ({mode}) exited before it was ready ({status}); the end of its log {}:\n{tail}", log.display())]
    Exited {
        mode: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("llama-server ({mode}) was not ready after {secs} s; its log: {}", log.display())]
    NotReady {
        mode: String,
        secs: u64,
        log: PathBuf,
    },
    #[error("llama-server ({mode}) request failed: {msg}")]
    Http { mode: String, msg: String },
    #[error("llama-server ({mode}): {source}")]
    Response {
        mode: String,
        #[source]
        source: PeerResponseError,
    },
    #[error("{tool} failed ({status}): {tail}")]
    Tool {
        tool: String,
        status: String,
        tail: String,
    },
    #[error("{tool} printed no usable result line: {what}")]
    ToolOutput { tool: String, what: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, PeerError>;

/// A located llama.cpp build.
#[derive(Debug, Clone)]
pub struct LlamaCpp {
    /// Folder holding `llama-server`, `llama-bench`, `llama-batched-bench`.
    pub bin_dir: PathBuf,
    /// What the build says it is (the script's `COMMIT` file), or "unknown".
    pub version: String,
}

impl LlamaCpp {
    /// `llama.cpp` → the newest build under `home/peers/llama.cpp-*`;
    /// `llama.cpp=PATH` → PATH is the `llama-server` binary, the folder
    /// holding it, or a build folder with `bin/` inside.
    pub fn locate(spec: &str, home: &Path) -> Result<LlamaCpp> {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) => (n.trim(), Some(PathBuf::from(p.trim()))),
            None => (spec.trim(), None),
        };
        if name != PEER {
            return Err(PeerError::UnknownPeer(spec.to_string()));
        }
        let bin_dir = match path {
            Some(p) => {
                let candidates = if p.is_file() {
                    vec![p.parent().map(Path::to_path_buf).unwrap_or_default()]
                } else {
                    vec![p.clone(), p.join("bin")]
                };
                candidates
                    .into_iter()
                    .find(|d| d.join("llama-server").is_file())
                    .ok_or_else(|| PeerError::NotBuilt(format!(" at {}", p.display())))?
            }
            None => {
                let peers = home.join("peers");
                let key = host_key();
                let build = format!("build-{key}");
                let roots: Vec<PathBuf> = std::fs::read_dir(&peers)
                    .map_err(|_| PeerError::NotBuilt(format!(" under {}", peers.display())))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("llama.cpp-"))
                    })
                    .collect();
                let mut builds: Vec<PathBuf> = roots
                    .iter()
                    .map(|r| r.join(&build).join("bin"))
                    .filter(|b| b.join("llama-server").is_file())
                    .collect();
                builds.sort();
                builds.pop().ok_or_else(|| {
                    PeerError::NotBuilt(format!(" for this CPU ({key}) under {}", peers.display()))
                })?
            }
        };
        // The script writes COMMIT at the root, two levels up from bin/.
        let version = bin_dir
            .ancestors()
            .take(3)
            .find_map(|d| std::fs::read_to_string(d.join("COMMIT")).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Ok(LlamaCpp { bin_dir, version })
    }

    pub fn binary(&self, name: &str) -> Result<PathBuf> {
        // On AMX hosts the peer script builds the batched tools a second
        // time without AMX, beside the native build (`build-<key>-noamx`):
        // this release segfaults in ggml's AMX matmul on any batch of more
        // than one row there, while llama-bench's one-row tg runs with it.
        if matches!(name, "llama-server" | "llama-batched-bench") {
            let server_build = self.bin_dir.parent().and_then(|build| {
                let dir = format!("{}-noamx", build.file_name()?.to_string_lossy());
                Some(build.with_file_name(dir).join("bin").join(name))
            });
            if let Some(p) = server_build.filter(|p| p.is_file()) {
                return Ok(p);
            }
        }
        let p = self.bin_dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(PeerError::MissingBinary(p, self.bin_dir.clone()))
        }
    }
}

/// The SIMD features a native (`-march=native`) llama.cpp build depends
/// on, present on this CPU, joined by `-` (`avx2`,
/// `avx2-avx512f-avx512_vnni-avx512_bf16`, …), or the architecture's name
/// without any. scripts/peers/llama_cpp.sh builds into `build-<key>` with
/// the same list, so a cached build is only run on a CPU that has its
/// instructions (the same image runs on AVX2-only and AMX hosts).
pub fn host_key() -> String {
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("flags"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.to_string())
        })
        .unwrap_or_default();
    key_of(&flags)
}

fn key_of(flags: &str) -> String {
    const FEATURES: &[&str] = &[
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "avx_vnni",
    ];
    let have: Vec<&str> = flags.split_whitespace().collect();
    let key: Vec<&str> = FEATURES
        .iter()
        .copied()
        .filter(|f| have.contains(f))
        .collect();
    if key.is_empty() {
        std::env::consts::ARCH.to_string()
    } else {
        key.join("-")
    }
}

/// The llama-server flags of one mode (besides model, threads, context).
pub fn mode_args(mode: &str, draft_model: Option<&Path>) -> Result<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
    Ok(match mode {
        "none" => Vec::new(),
        // llama.cpp's own defaults for each drafter: the peer as its users run it.
        "ngram-simple" | "ngram-mod" | "ngram-cache" => s(&["--spec-type", mode]),
        "draft" => {
            let m = draft_model.ok_or(PeerError::DraftWithoutModel)?;
            vec![
                "--spec-type".into(),
                "draft-simple".into(),
                "-md".into(),
                m.display().to_string(),
            ]
        }
        other => return Err(PeerError::UnknownMode(other.to_string())),
    })
}

/// What every llama-server of a run shares.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model: PathBuf,
    pub threads: usize,
    pub ctx_size: usize,
    /// Where the servers' logs go (`llama-server-<mode>.log`).
    pub log_dir: PathBuf,
}

/// One request: the prompt as token ids, greedy unless `temperature > 0`.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionRequest<'a> {
    pub prompt: &'a [u32],
    pub n_predict: usize,
    pub temperature: f32,
    pub seed: u64,
    /// Reuse the KV of the previous request's common prefix (the earlier
    /// turns of a conversation, as treespec's session does); off for a
    /// conversation's first turn so no prefill is skipped that treespec pays.
    pub cache_prompt: bool,
    /// Ask for the top `n_probs` probabilities of every generated token
    /// (softmax of the raw logits). 0 = not asked: llama-server sorts the
    /// vocabulary for each token it reports, which a timed run must not pay.
    #[serde(skip_serializing_if = "is_zero")]
    pub n_probs: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A running `llama-server`, killed when dropped.
pub struct LlamaServer {
    pub mode: String,
    child: Child,
    base: String,
    agent: ureq::Agent,
    log: PathBuf,
}

/// A free loopback port (bound, read, released: the server binds it next).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl LlamaServer {
    /// Starts llama-server in `mode` and waits until `/health` answers 200
    /// (the model is loaded and warmed up).
    pub fn start(
        peer: &LlamaCpp,
        cfg: &ServerConfig,
        mode: &str,
        draft_model: Option<&Path>,
    ) -> Result<LlamaServer> {
        let bin = peer.binary("llama-server")?;
        let extra = mode_args(mode, draft_model)?;
        let port = free_port()?;
        std::fs::create_dir_all(&cfg.log_dir)?;
        let log = cfg.log_dir.join(format!("llama-server-{mode}.log"));
        let out = std::fs::File::create(&log)?;
        let threads = cfg.threads.max(1).to_string();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("-m")
            .arg(&cfg.model)
            .args(["-t", &threads, "-tb", &threads])
            .args(["-c", &cfg.ctx_size.to_string(), "-np", "1"])
            .arg("--no-webui")
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|source| PeerError::Spawn {
                path: bin.clone(),
                source,
            })?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(3600)))
            .build()
            .into();
        let mut server = LlamaServer {
            mode: mode.to_string(),
            child,
            base: format!("http://127.0.0.1:{port}"),
            agent,
            log,
        };
        server.wait_ready(Duration::from_secs(300))?;
        Ok(server)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(PeerError::Exited {
                    mode: self.mode.clone(),
                    status: status.to_string(),
                    log: self.log.clone(),
                    tail: tail(&self.log, 15),
                });
            }
            // 503 while loading, refused before it listens, 200 when ready.
            if let Ok(r) = self.agent.get(format!("{}/health", self.base)).call() {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            if start.elapsed() > limit {
                return Err(PeerError::NotReady {
                    mode: self.mode.clone(),
                    secs: limit.as_secs(),
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One non-streamed completion, measured by the server itself.
    pub fn complete(&self, req: &CompletionRequest) -> Result<PeerCompletion> {
        let mut body = serde_json::to_value(req).map_err(|e| PeerError::Http {
            mode: self.mode.clone(),
            msg: e.to_string(),
        })?;
        // Greedy as llama.cpp defines it: a single candidate, whatever the
        // other samplers' defaults; the generated ids for a token comparison.
        if let Some(o) = body.as_object_mut() {
            if req.temperature <= 0.0 {
                o.insert("top_k".into(), 1.into());
            }
            o.insert("return_tokens".into(), true.into());
            o.insert("stream".into(), false.into());
        }
        let http = |msg: String| PeerError::Http {
            mode: self.mode.clone(),
            msg,
        };
        let mut resp = self
            .agent
            .post(format!("{}/completion", self.base))
            .send_json(&body)
            .map_err(|e| http(e.to_string()))?;
        let mut text = String::new();
        resp.body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .map_err(|e| http(e.to_string()))?;
        parse_completion(&text).map_err(|source| PeerError::Response {
            mode: self.mode.clone(),
            source,
        })
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_tool(bin: &Path, args: &[String]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PeerError::Spawn {
            path: bin.to_path_buf(),
            source,
        })?;
    let tool = bin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        return Err(PeerError::Tool {
            tool,
            status: out.status.to_string(),
            tail: lines[lines.len().saturating_sub(10)..].join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// llama-bench's `tg` speed (tokens per second) from its `-o jsonl` output:
/// the line with `n_gen > 0` and `n_prompt == 0`.
pub fn parse_llama_bench_tg(out: &str) -> Option<f64> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .find(|v| v["n_prompt"].as_u64() == Some(0) && v["n_gen"].as_u64().is_some_and(|n| n > 0))
        .and_then(|v| v["avg_ts"].as_f64())
        .filter(|t| t.is_finite() && *t > 0.0)
}

/// llama-batched-bench's `--output-format jsonl` lines → (N, ms of one
/// decode step over N sequences, every row with logits): `t_tg / tg`.
pub fn parse_batched_bench(out: &str) -> Vec<(usize, f64)> {
    let mut pts: Vec<(usize, f64)> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter_map(|v| {
            let pl = v["pl"].as_u64()? as usize;
            let tg = v["tg"].as_u64()? as f64;
            let t = v["t_tg"].as_f64()?;
            (tg > 0.0 && t.is_finite() && t > 0.0).then(|| (pl, t / tg * 1e3))
        })
        .collect();
    pts.sort_by_key(|p| p.0);
    pts
}

/// llama.cpp's plain decode speed on `model`: `llama-bench -p 0 -n 64`.
pub fn decode_tok_s(peer: &LlamaCpp, model: &Path, threads: usize) -> Result<f64> {
    let bin = peer.binary("llama-bench")?;
    let args: Vec<String> = [
        "-m",
        &model.display().to_string(),
        "-t",
        &threads.to_string(),
        "-p",
        "0",
        "-n",
        "64",
        "-r",
        "3",
        "-o",
        "jsonl",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_tool(&bin, &args)?;
    parse_llama_bench_tg(&out).ok_or_else(|| PeerError::ToolOutput {
        tool: "llama-bench".into(),
        what: out.chars().take(300).collect(),
    })
}

/// llama.cpp's cost of one forward over N rows with all logits after `ctx`
/// cached tokens: llama-batched-bench with a shared `ctx`-token prompt and
/// N parallel sequences, each decode step one batch of N rows (the closest
/// llama.cpp tool to a tree verify: same rows, same logits, each row over
/// the shared prefix plus its own few tokens).
pub fn forward_curve(
    peer: &LlamaCpp,
    model: &Path,
    threads: usize,
    ctx: usize,
    ns: &[usize],
) -> Result<Vec<(usize, f64)>> {
    let bin = peer.binary("llama-batched-bench")?;
    // Eight decode steps per N: enough to average, few enough that the
    // context grows by little (8 tokens per sequence).
    let tg = 8usize;
    let max_n = ns.iter().copied().max().unwrap_or(1);
    let npl: Vec<String> = ns.iter().map(|n| n.to_string()).collect();
    let args: Vec<String> = vec![
        "-m".into(),
        model.display().to_string(),
        "-t".into(),
        threads.to_string(),
        "-tb".into(),
        threads.to_string(),
        "-c".into(),
        (ctx + max_n * tg + 64).to_string(),
        "-npp".into(),
        ctx.max(1).to_string(),
        "-ntg".into(),
        tg.to_string(),
        "-npl".into(),
        npl.join(","),
        // One KV buffer for all sequences, so the shared prompt is stored once
        // (as a tree verify reads one cache), not split n_ctx / N per sequence.
        "-kvu".into(),
        "-pps".into(),
        "--output-format".into(),
        "jsonl".into(),
    ];
    let out = run_tool(&bin, &args)?;
    let pts = parse_batched_bench(&out);
    if pts.is_empty() {
        return Err(PeerError::ToolOutput {
            tool: "llama-batched-bench".into(),
            what: out.chars().take(300).collect(),
        });
    }
    Ok(pts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_specs() {
        assert!(matches!(
            LlamaCpp::locate("vllm", Path::new("/nonexistent")),
            Err(PeerError::UnknownPeer(_))
        ));
        assert!(matches!(
            LlamaCpp::locate("llama.cpp", Path::new("/nonexistent")),
            Err(PeerError::NotBuilt(_))
        ));
        let dir = std::env::temp_dir().join(format!("treespec-peer-{}", std::process::id()));
        let bin = dir.join("build-avx2").join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("llama-server"), b"").unwrap();
        std::fs::write(dir.join("COMMIT"), b"abc123\n").unwrap();
        let p = LlamaCpp::locate(
            &format!("llama.cpp={}", dir.join("build-avx2").display()),
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(p.bin_dir, bin);
        assert_eq!(p.version, "abc123");
        assert!(matches!(
            p.binary("llama-bench"),
            Err(PeerError::MissingBinary(..))
        ));
        assert_eq!(p.binary("llama-server").unwrap(), bin.join("llama-server"));
        // An AMX host's no-AMX build beside it is preferred for the
        // batched tools, and only for them.
        let server_bin = dir.join("build-avx2-noamx").join("bin");
        std::fs::create_dir_all(&server_bin).unwrap();
        std::fs::write(server_bin.join("llama-server"), b"").unwrap();
        std::fs::write(bin.join("llama-bench"), b"").unwrap();
        assert_eq!(
            p.binary("llama-server").unwrap(),
            server_bin.join("llama-server")
        );
        assert_eq!(p.binary("llama-bench").unwrap(), bin.join("llama-bench"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_keys_name_the_simd_features_in_a_fixed_order() {
        assert_eq!(key_of("fpu sse2 avx2 fma"), "avx2");
        assert_eq!(
            key_of("avx512_bf16 avx512f avx2 avx512_vnni amx_tile"),
            "avx2-avx512f-avx512_vnni-avx512_bf16-amx_tile"
        );
        assert_eq!(key_of("fpu neon"), std::env::consts::ARCH);
        // A substring is not a feature.
        assert_eq!(key_of("avx512fx avx2"), "avx2");
    }

    #[test]
    fn modes() {
        assert!(mode_args("none", None).unwrap().is_empty());
        assert_eq!(
            mode_args("ngram-mod", None).unwrap(),
            vec!["--spec-type", "ngram-mod"]
        );
        assert!(matches!(
            mode_args("draft", None),
            Err(PeerError::DraftWithoutModel)
        ));
        assert!(mode_args("draft", Some(Path::new("d.gguf")))
            .unwrap()
            .contains(&"d.gguf".to_string()));
        assert!(matches!(
            mode_args("lookahead", None),
            Err(PeerError::UnknownMode(_))
        ));
    }

    #[test]
    fn tool_outputs() {
        // Lines as this llama.cpp's llama-batched-bench prints them.
        let bb = r#"{"n_kv_max": 2048, "pp": 256, "tg": 4, "pl": 2, "n_kv": 520, "t_pp": 4.35, "speed_pp": 58.7, "t_tg": 0.2, "speed_tg": 33.9, "t": 4.59, "speed": 57.4}
{"n_kv_max": 2048, "pp": 256, "tg": 4, "pl": 1, "n_kv": 260, "t_pp": 3.96, "speed_pp": 64.5, "t_tg": 0.1, "speed_tg": 22.4, "t": 4.14, "speed": 62.7}
main: done"#;
        let pts = parse_batched_bench(bb);
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0].0, 1);
        assert!((pts[0].1 - 25.0).abs() < 1e-9);
        assert!((pts[1].1 - 50.0).abs() < 1e-9);
        let lb = r#"{"model_type": "qwen2 1.5B", "n_prompt": 0, "n_gen": 64, "avg_ts": 30.8, "stddev_ts": 0.2}"#;
        assert_eq!(parse_llama_bench_tg(lb), Some(30.8));
        assert_eq!(parse_llama_bench_tg("not json"), None);
        assert!(parse_batched_bench("| PP | TG |").is_empty());
    }
}
