//! `treespec serve`: an OpenAI-compatible HTTP server (axum + tokio).
//!
//! - [`worker`]: model threads, the job queue, the shared drafter;
//! - [`handlers`]: the endpoints, streaming (SSE) and not;
//! - [`params`]: strict request parsing; [`error`]: OpenAI-shaped errors;
//! - [`metrics`]: Prometheus text for `/metrics`.
//!
//! The port is bound before the model loads, so `/health` answers 503 while
//! loading and 200 after. SIGTERM/SIGINT stop accepting connections, let
//! in-flight requests finish for a grace period, cancel the rest, save the
//! recycling matrix and return.

pub mod error;
pub mod handlers;
pub mod metrics;
pub mod params;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::engine::spec::SpecConfig;
use crate::error::{Error, Result};
use crate::model::Model;
use metrics::Metrics;
use worker::Engine;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// The name `/v1/models` reports and responses carry.
    pub model_name: String,
    pub api_key: Option<String>,
    /// Requests generated at once (batched), each with its own KV cache.
    pub max_concurrent: usize,
    /// Rows per batched forward (see `engine::batch`).
    pub batch_rows: usize,
    /// Byte budget of the prefix cache (0: off).
    pub prefix_cache_bytes: usize,
    /// Requests that may wait for a slot before new ones get 429.
    pub queue: usize,
    pub ctx_size: usize,
    pub spec: SpecConfig,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub grace: Duration,
}

/// Loads the model (on a background thread, after the port is bound).
/// Loads the target model and, with `--draft-model`, the draft model
/// (in the background, while the server already answers health checks).
pub type ModelLoader = Box<
    dyn FnOnce() -> std::result::Result<
            (Model, Option<crate::draft::draft_model::DraftModel>),
            String,
        > + Send,
>;

pub struct AppState {
    pub config: ServerConfig,
    pub engine: OnceLock<Arc<Engine>>,
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM/SIGINT: new generation requests get 503.
    pub draining: AtomicBool,
    pub started: Instant,
}

impl AppState {
    pub fn engine(&self) -> std::result::Result<&Arc<Engine>, error::ApiError> {
        self.engine.get().ok_or_else(error::ApiError::loading)
    }
}

/// Runs the server until SIGTERM/SIGINT (Ok) or a failure to bind or to
/// load the model (Err).
pub fn run(config: ServerConfig, load: ModelLoader) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        // The runtime only shuffles bytes; the model has its own threads.
        .worker_threads(2)
        .thread_name("treespec-http")
        .enable_all()
        .build()?;
    rt.block_on(serve(config, load))
}

async fn serve(config: ServerConfig, load: ModelLoader) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| {
            Error::Invalid(format!(
                "cannot listen on {}:{}: {e}",
                config.host, config.port
            ))
        })?;
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(target: "treespec::server", "listening on http://{addr}");
    // Printed as well as logged: scripts wait for this line.
    eprintln!("treespec serve: listening on http://{addr}");

    let state = Arc::new(AppState {
        config: config.clone(),
        engine: OnceLock::new(),
        metrics: Arc::new(Metrics::default()),
        draining: AtomicBool::new(false),
        started: Instant::now(),
    });

    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<String>();
    {
        let state = state.clone();
        std::thread::Builder::new()
            .name("treespec-load".into())
            .spawn(move || {
                let c = &state.config;
                // A panic while loading must still end the server with an error.
                let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load))
                    .unwrap_or_else(|_| Err("the model loader panicked".into()));
                let started = loaded.and_then(|(m, draft)| {
                    let mut spec = c.spec.clone();
                    spec.draft_model = draft;
                    let limits = worker::Limits {
                        ctx_size: c.ctx_size,
                        max_concurrent: c.max_concurrent,
                        batch_rows: c.batch_rows,
                        queue_cap: c.queue,
                        prefix_cache_bytes: c.prefix_cache_bytes,
                    };
                    Engine::start(m, spec, limits, state.metrics.clone())
                    .map_err(|e| e.to_string())
                });
                match started {
                    Ok(engine) => {
                        tracing::info!(
                            target: "treespec::server",
                            "model ready: {} (context {}, {} slot(s) batched at up to {} rows, queue {}, spec {} max_nodes {}, recycle rows loaded {})",
                            c.model_name,
                            engine.context,
                            engine.max_concurrent,
                            engine.batch_rows,
                            engine.queue_cap,
                            engine.spec.method.name(),
                            engine.spec.max_draft,
                            engine.rows_loaded,
                        );
                        let _ = state.engine.set(Arc::new(engine));
                    }
                    Err(e) => {
                        let _ = load_failed_tx.send(e);
                    }
                }
            })?;
    }

    let throughput = tokio::spawn(log_throughput(state.clone()));
    let app = handlers::router(state.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });

    // A successful load drops the sender: that branch is then disabled.
    let load_error = tokio::select! {
        _ = shutdown_signal() => None,
        Ok(e) = load_failed_rx => Some(e),
    };
    if let Some(e) = load_error {
        throughput.abort();
        return Err(Error::Invalid(format!("model load failed: {e}")));
    }

    tracing::info!(
        target: "treespec::server",
        "shutting down: finishing in-flight requests (grace {:.0} s)",
        config.grace.as_secs_f64()
    );
    state.draining.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(());
    // After the grace period every generation is cancelled, which ends the
    // remaining streams and lets the connections close.
    let engine = state.engine.get().cloned();
    let mut server = server;
    // A second signal cuts the grace period short.
    let cut_short = tokio::select! {
        done = tokio::time::timeout(config.grace, &mut server) => done.is_err(),
        _ = shutdown_signal() => true,
    };
    if cut_short {
        tracing::warn!(target: "treespec::server", "cancelling in-flight requests");
        if let Some(e) = &engine {
            e.cancel_all.store(true, Ordering::SeqCst);
        }
        // Cancelled streams end at their next token; a connection stuck on a
        // dead peer must not hold the exit (and the state save) forever.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
    }
    throughput.abort();
    // The scheduler is a plain thread: join it off the runtime.
    if let Some(engine) = engine {
        let path = config.spec.recycle_state.clone();
        tokio::task::spawn_blocking(move || engine.shutdown(path.as_ref()))
            .await
            .map_err(|e| Error::Invalid(format!("shutdown: {e}")))??;
    }
    tracing::info!(target: "treespec::server", "bye");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Every 10 s while there is work: generated tokens per second, queue depth.
async fn log_throughput(state: Arc<AppState>) {
    const PERIOD: Duration = Duration::from_secs(10);
    let mut tick = tokio::time::interval(PERIOD);
    tick.tick().await;
    let (mut gen0, mut prompt0) = (state.metrics.generated(), state.metrics.prompt());
    loop {
        tick.tick().await;
        let (gen, prompt) = (state.metrics.generated(), state.metrics.prompt());
        let (running, waiting) = state
            .engine
            .get()
            .map_or((0, 0), |e| (e.running(), e.waiting()));
        if gen > gen0 || running > 0 || waiting > 0 {
            tracing::info!(
                target: "treespec::server",
                "throughput: {:.1} generated tok/s, {} prompt tok done, {} running, {} waiting",
                (gen - gen0) as f64 / PERIOD.as_secs_f64(),
                prompt - prompt0,
                running,
                waiting,
            );
        }
        (gen0, prompt0) = (gen, prompt);
    }
}
