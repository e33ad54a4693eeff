//! `treespec serve`: the OpenAI-compatible HTTP server.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use treespec::server::{self, ServerConfig};

use super::{ModelArgs, SpecArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
    #[arg(long, env = "TREESPEC_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "TREESPEC_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "TREESPEC_API_KEY")]
    pub api_key: Option<String>,
    /// Requests generated at once (slots), each with its own KV cache; they
    /// share every forward (continuous batching), so more slots add
    /// throughput where one stream leaves rows idle. 4, as llama-server's
    /// default slot count: caches grow as they fill, idle slots cost nothing.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: usize,
    /// Rows per batched forward, shared by the slots' pending tokens, their
    /// draft trees and chunked prompts (llama.cpp's ubatch plays this role).
    #[arg(long, default_value_t = treespec::engine::batch::DEFAULT_MAX_ROWS)]
    pub batch_rows: usize,
    /// Megabytes of KV blocks the prefix cache keeps across requests (0:
    /// off). 512 MB holds ~280 blocks of 64 positions on the 1.5B (~18k
    /// prompt tokens: a few long histories or many system prompts) and
    /// ~650 on the 0.5B.
    #[arg(long, default_value_t = 512.0)]
    pub cache_mb: f64,
    /// Requests that may wait for a slot; past that, 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Seconds in-flight requests may run on after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10.0)]
    pub grace: f64,
    /// Model name reported by /v1/models (default: from --model).
    #[arg(long)]
    pub alias: Option<String>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_concurrent == 0 {
        bail!("--max-concurrent must be at least 1");
    }
    if a.batch_rows == 0 {
        bail!("--batch-rows must be at least 1");
    }
    if !(a.cache_mb.is_finite() && a.cache_mb >= 0.0) {
        bail!("--cache-mb must be a number of megabytes >= 0");
    }
    if !(a.grace.is_finite() && a.grace >= 0.0) {
        bail!("--grace must be a number of seconds >= 0");
    }
    let model_name = a.alias.clone().unwrap_or_else(|| {
        Path::new(&a.model.model)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| a.model.model.clone())
    });
    let config = ServerConfig {
        host: a.host,
        port: a.port,
        model_name,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_concurrent: a.max_concurrent,
        batch_rows: a.batch_rows,
        prefix_cache_bytes: (a.cache_mb * (1u64 << 20) as f64) as usize,
        queue: a.queue,
        ctx_size: a.model.ctx_size,
        spec: a.spec.config()?,
        grace: Duration::from_secs_f64(a.grace),
    };
    let model_args = a.model.clone();
    let spec_args = a.spec.clone();
    server::run(
        config,
        Box::new(move || {
            let load = || -> Result<_> {
                let model = model_args.load()?;
                let draft = spec_args.load_draft(&model)?;
                Ok((model, draft))
            };
            load().map_err(|e| format!("{e:#}"))
        }),
    )?;
    Ok(())
}
