//! The model side of the server: `max_concurrent` OS threads, each owning
//! one [`Session`] (KV cache), take jobs from one queue. `generate` is
//! synchronous and CPU-bound, so it never runs on the async runtime; the
//! handlers talk to the workers through channels.
//!
//! One drafter (the recycling matrix) is shared by all workers behind a
//! mutex, locked per propose/observe call rather than per request, so
//! concurrent requests interleave and every request's verified tokens teach
//! the matrix the others read (the hot start carries across requests).
//! Drafting never decides what is emitted (the verifier does), so sharing
//! cannot change any output; its one cost is prompt lookup's n-gram index,
//! which belongs to one sequence and is rebuilt when another request's
//! step comes in between (only with `max_concurrent` > 1).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::error::ApiError;
use super::metrics::{Metrics, Outcome};
use crate::draft::{DraftTree, Drafter, NodeTopK};
use crate::engine::spec::{SpecConfig, SpecDrafter};
use crate::engine::{generate, GenerateOptions, Generation, Session, StopReason, TokenEvent};
use crate::error::Result;
use crate::model::Model;

/// What a worker tells the request's handler.
pub enum Event {
    /// Text that became final (possibly empty: a stop string's prefix is
    /// held back until it is known not to be one).
    Text(String),
    /// Boxed: a Generation is large next to the per-token events.
    Done(Box<std::result::Result<Generation, ApiError>>),
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub speculate: bool,
    /// Set when the client is gone (the handler's guard was dropped).
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

pub enum Rejected {
    QueueFull(usize),
    ShuttingDown,
}

pub struct Engine {
    pub model: Arc<Model>,
    pub spec: SpecConfig,
    /// Tokens a session holds (the context of every request).
    pub context: usize,
    pub max_concurrent: usize,
    pub queue_cap: usize,
    /// Recycle-matrix rows loaded from `--recycle-state` at start.
    pub rows_loaded: usize,
    drafter: Option<Arc<Mutex<SpecDrafter>>>,
    /// `--tree auto`: the per-step budget controller, shared by all requests.
    pub auto_budget: Option<crate::engine::budget::SharedBudget>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    counts: Arc<Counts>,
    /// Set at the end of the shutdown grace period: every generation stops.
    pub cancel_all: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Counts {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    /// Accepted and not yet answered: what the queue bound applies to.
    pub admitted: AtomicUsize,
}

impl Engine {
    pub fn start(
        model: Model,
        spec: SpecConfig,
        ctx_size: usize,
        max_concurrent: usize,
        queue_cap: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Engine> {
        let model = Arc::new(model);
        let mut drafter = SpecDrafter::build(&spec, model.config().vocab_size)?;
        let mut rows_loaded = 0;
        if let (Some(d), Some(p)) = (drafter.as_mut(), &spec.recycle_state) {
            d.load_state(p, &model.identity);
            rows_loaded = d.recycler_mut().map_or(0, |r| r.rows_written());
        }
        let drafter = drafter.map(|d| Arc::new(Mutex::new(d)));
        let auto_budget = crate::engine::budget::controller_for(
            &model,
            &spec,
            &crate::registry::treespec_home(),
        )?;
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let counts = Arc::new(Counts::default());
        let cancel_all = Arc::new(AtomicBool::new(false));
        let max_concurrent = max_concurrent.max(1);
        let mut workers = Vec::new();
        let mut context = 0;
        for i in 0..max_concurrent {
            let session = Session::new(&model, ctx_size);
            context = session.context();
            let w = Worker {
                model: model.clone(),
                session,
                drafter: drafter.clone(),
                counts: counts.clone(),
                metrics: metrics.clone(),
                cancel_all: cancel_all.clone(),
            };
            let rx = rx.clone();
            let h = std::thread::Builder::new()
                .name(format!("treespec-worker-{i}"))
                .spawn(move || w.run(&rx))?;
            workers.push(h);
        }
        Ok(Engine {
            auto_budget,
            model,
            spec,
            context,
            max_concurrent,
            queue_cap,
            rows_loaded,
            drafter,
            jobs: Mutex::new(Some(tx)),
            workers: Mutex::new(workers),
            counts,
            cancel_all,
        })
    }

    pub fn has_drafter(&self) -> bool {
        self.drafter.is_some()
    }

    pub fn running(&self) -> usize {
        self.counts.running.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.counts.waiting.load(Ordering::Relaxed)
    }

    /// Rows of the shared recycling matrix written so far.
    pub fn recycle_rows(&self) -> usize {
        self.drafter.as_ref().map_or(0, |d| {
            lock(d).recycler_mut().map_or(0, |r| r.rows_written())
        })
    }

    /// Queues a job, or refuses it when every worker is busy and
    /// `queue_cap` requests already wait.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Rejected> {
        let jobs = lock(&self.jobs);
        let Some(tx) = jobs.as_ref() else {
            return Err(Rejected::ShuttingDown);
        };
        let c = &self.counts;
        let admitted = c.admitted.fetch_add(1, Ordering::SeqCst);
        if admitted >= self.max_concurrent + self.queue_cap {
            c.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejected::QueueFull(self.waiting()));
        }
        c.waiting.fetch_add(1, Ordering::SeqCst);
        if tx.send(job).is_err() {
            c.waiting.fetch_sub(1, Ordering::SeqCst);
            c.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejected::ShuttingDown);
        }
        Ok(())
    }

    /// Refuses new jobs, lets the workers finish the queued ones (callers set
    /// `cancel_all` to cut them short), joins them and saves the recycling
    /// matrix.
    pub fn shutdown(&self, state: Option<&PathBuf>) -> Result<()> {
        lock(&self.jobs).take();
        for h in lock(&self.workers).drain(..) {
            if h.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
        if let (Some(d), Some(p)) = (&self.drafter, state) {
            lock(d).save_state(p, &self.model.identity)?;
            tracing::info!(
                "recycle state saved to {} ({} rows)",
                p.display(),
                self.recycle_rows()
            );
        }
        Ok(())
    }
}

struct Worker {
    model: Arc<Model>,
    session: Session,
    drafter: Option<Arc<Mutex<SpecDrafter>>>,
    counts: Arc<Counts>,
    metrics: Arc<Metrics>,
    cancel_all: Arc<AtomicBool>,
}

impl Worker {
    fn run(mut self, rx: &Mutex<mpsc::Receiver<Job>>) {
        loop {
            // Idle workers queue on the mutex; the one holding it waits for a job.
            let job = match lock(rx).recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            self.counts.running.fetch_add(1, Ordering::SeqCst);
            self.counts.waiting.fetch_sub(1, Ordering::SeqCst);
            let done = self.serve(&job);
            // Not running any more before the client hears it is done, so a
            // client's next look at the gauges is consistent.
            self.counts.running.fetch_sub(1, Ordering::SeqCst);
            self.counts.admitted.fetch_sub(1, Ordering::SeqCst);
            let _ = job.events.send(Event::Done(Box::new(done)));
        }
    }

    fn serve(&mut self, job: &Job) -> std::result::Result<Generation, ApiError> {
        let prompt_tokens = job.prompt.len();
        if job.cancel.load(Ordering::Relaxed) || self.cancel_all.load(Ordering::Relaxed) {
            // Gone or shut down before its turn: nothing to run.
            self.metrics
                .finish_request(prompt_tokens, None, Outcome::Cancelled);
            return Err(ApiError::shutting_down());
        }
        let metrics = self.metrics.clone();
        let cancel_all = self.cancel_all.clone();
        let mut last: Option<Instant> = None;
        let mut on_token = |ev: &TokenEvent| -> bool {
            let real = ev.token != u32::MAX;
            if real {
                let now = Instant::now();
                match last {
                    None => metrics.observe_ttft((now - job.arrived).as_secs_f64()),
                    Some(t) => metrics.observe_itl((now - t).as_secs_f64()),
                }
                last = Some(now);
                metrics.add_generated(1);
            }
            if job.cancel.load(Ordering::Relaxed) || cancel_all.load(Ordering::Relaxed) {
                return false;
            }
            job.events.send(Event::Text(ev.text.to_string())).is_ok()
        };
        let mut shared = match (&self.drafter, job.speculate) {
            (Some(d), true) => Some(SharedDrafter::new(d)),
            _ => None,
        };
        let model = &*self.model;
        let session = &mut self.session;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let dref = shared.as_mut().map(|d| d as &mut dyn Drafter);
            generate(model, session, dref, &job.prompt, &job.opts, &mut on_token)
        }));
        let result = match result {
            Ok(r) => r.map_err(ApiError::from),
            Err(_) => Err(ApiError::internal("internal error: generation panicked")),
        };
        if result.is_err() {
            // The session may be half-written: start the next request clean.
            self.session.reset();
        }
        match &result {
            Ok(g) => {
                let outcome = if g.stop == StopReason::Cancelled {
                    Outcome::Cancelled
                } else {
                    Outcome::Ok
                };
                let spec = job.speculate.then_some(&g.spec);
                self.metrics.finish_request(prompt_tokens, spec, outcome);
                log_request(g, (Instant::now() - job.arrived).as_secs_f64());
            }
            Err(e) => {
                tracing::warn!("request failed: {}", e.message);
                self.metrics
                    .finish_request(prompt_tokens, None, Outcome::Failed);
            }
        }
        result
    }
}

fn log_request(g: &Generation, total_s: f64) {
    let s = &g.stats;
    tracing::info!(
        "request: prompt {} tok ({} prefilled) {:.1} ms | generated {} tok {:.1} ms {:.1} tok/s | MAT {:.2} ({}) | stop {:?} | total {:.2} s",
        s.prompt_tokens,
        s.prefilled_tokens,
        s.prefill_ms,
        s.generated_tokens,
        s.decode_ms,
        s.decode_tok_s,
        g.spec.mean_accepted_tokens,
        g.spec.method,
        g.stop,
        total_s,
    );
}

/// A request's view of the shared drafter: locks it for each call.
struct SharedDrafter<'a> {
    inner: &'a Mutex<SpecDrafter>,
    name: &'static str,
    topk: usize,
}

impl<'a> SharedDrafter<'a> {
    fn new(inner: &'a Mutex<SpecDrafter>) -> Self {
        let d = lock(inner);
        SharedDrafter {
            name: d.name(),
            topk: d.wants_topk(),
            inner,
        }
    }
}

impl Drafter for SharedDrafter<'_> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn start(&mut self, prompt: &[u32]) {
        lock(self.inner).start(prompt)
    }
    fn propose(&mut self, context: &[u32], max_draft: usize) -> DraftTree {
        lock(self.inner).propose(context, max_draft)
    }
    fn observe(&mut self, tree: &DraftTree, topk: &[NodeTopK], accepted: &[usize]) {
        lock(self.inner).observe(tree, topk, accepted)
    }
    fn wants_topk(&self) -> usize {
        self.topk
    }
    fn outlook(&mut self, context: &[u32]) -> usize {
        lock(self.inner).outlook(context)
    }
    fn finish(&mut self, generated: &[u32]) {
        lock(self.inner).finish(generated)
    }
}

/// A panic elsewhere must not take the server down with poisoned locks.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
