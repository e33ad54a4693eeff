//! The model side of the server: ONE scheduler thread steps every running
//! request through shared forwards (continuous batching,
//! [`crate::engine::batch`]). Requests join between steps, finished ones
//! leave, a client gone or a shutdown frees its rows at the next step. The
//! forwards are synchronous and CPU-bound, so they never run on the async
//! runtime; the handlers talk to the scheduler through channels.
//!
//! `max_concurrent` slots each own a [`Session`] (KV cache) that outlives
//! its request: a new request takes the free slot whose cache shares the
//! longest prefix with its prompt, so a conversation's next turn lands on
//! the cache that holds its history and prefills only the new message; and
//! the prefix cache ([`PrefixCache`]) restores whole blocks of prompts that
//! other slots computed (a shared system prompt, a history whose slot was
//! taken meanwhile).
//!
//! One drafter (the recycling matrix) is shared by all requests behind a
//! mutex, locked per propose/observe call, so every request's verified
//! tokens teach the matrix the others read (the hot start carries across
//! requests). Drafting never decides what is emitted (the verifier does),
//! so sharing cannot change any output; its cost is the per-sequence
//! state (prompt lookup's n-gram index, a draft model's KV cache), rebuilt
//! when another request's step comes in between.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::error::ApiError;
use super::metrics::{Metrics, Outcome};
use crate::draft::Drafter;
use crate::engine::batch;
use crate::engine::prefix_cache::PrefixCache;
use crate::engine::spec::{SpecConfig, SpecDrafter};
use crate::engine::{GenerateOptions, Generation, Sequence, Session, StopReason, TokenEvent};
use crate::error::{Error, Result};
use crate::model::Model;

/// What the scheduler tells the request's handler.
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
    /// Slots: requests generating at once, batched into shared forwards.
    pub max_concurrent: usize,
    /// Rows per batched forward (see [`batch::step`]).
    pub batch_rows: usize,
    pub queue_cap: usize,
    pub prefix_cache_bytes: usize,
    /// Recycle-matrix rows loaded from `--recycle-state` at start.
    pub rows_loaded: usize,
    drafter: Option<Arc<Mutex<SpecDrafter>>>,
    /// `--tree auto`: the per-step budget controller, shared by all requests.
    pub auto_budget: Option<crate::engine::budget::SharedBudget>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    scheduler: Mutex<Option<JoinHandle<()>>>,
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

/// Engine limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub ctx_size: usize,
    pub max_concurrent: usize,
    pub batch_rows: usize,
    pub queue_cap: usize,
    /// Byte budget of the prefix cache (0: off).
    pub prefix_cache_bytes: usize,
}

impl Engine {
    pub fn start(
        model: Model,
        spec: SpecConfig,
        limits: Limits,
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
        let counts = Arc::new(Counts::default());
        let cancel_all = Arc::new(AtomicBool::new(false));
        let max_concurrent = limits.max_concurrent.max(1);
        let batch_rows = limits.batch_rows.max(1);
        // Caches grow as they fill, so idle slots cost nothing.
        let slots: Vec<Option<Session>> = (0..max_concurrent)
            .map(|_| Some(Session::new(&model, limits.ctx_size)))
            .collect();
        let context = slots[0].as_ref().map_or(0, Session::context);
        let scheduler = Scheduler {
            model: model.clone(),
            slot_used: vec![0; slots.len()],
            tick: 0,
            slots,
            batch_rows,
            prefix: PrefixCache::new(limits.prefix_cache_bytes),
            drafter: drafter.clone(),
            counts: counts.clone(),
            metrics,
            cancel_all: cancel_all.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("treespec-batch".into())
            .spawn(move || scheduler.run(rx))?;
        Ok(Engine {
            auto_budget,
            model,
            spec,
            context,
            max_concurrent,
            batch_rows,
            queue_cap: limits.queue_cap,
            prefix_cache_bytes: limits.prefix_cache_bytes,
            rows_loaded,
            drafter,
            jobs: Mutex::new(Some(tx)),
            scheduler: Mutex::new(Some(handle)),
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

    /// Queues a job, or refuses it when every slot is busy and
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

    /// Refuses new jobs, lets the scheduler finish the queued ones (callers
    /// set `cancel_all` to cut them short), joins it and saves the
    /// recycling matrix.
    pub fn shutdown(&self, state: Option<&PathBuf>) -> Result<()> {
        lock(&self.jobs).take();
        if let Some(h) = lock(&self.scheduler).take() {
            if h.join().is_err() {
                tracing::error!("the batch scheduler thread panicked");
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

struct Scheduler {
    model: Arc<Model>,
    /// `None` while the slot's session is lent to a running request.
    slots: Vec<Option<Session>>,
    /// When each slot was last given a request (admission count).
    slot_used: Vec<u64>,
    tick: u64,
    batch_rows: usize,
    /// Prompt prefixes across slots and requests (owned here: only this
    /// thread touches caches).
    prefix: PrefixCache,
    drafter: Option<Arc<Mutex<SpecDrafter>>>,
    counts: Arc<Counts>,
    metrics: Arc<Metrics>,
    cancel_all: Arc<AtomicBool>,
}

/// A request in the batch.
struct Running<'a> {
    seq: Sequence<'a>,
    slot: usize,
    prompt_tokens: usize,
    speculate: bool,
    cancel: Arc<AtomicBool>,
    events: UnboundedSender<Event>,
    arrived: Instant,
}

impl Scheduler {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let model = self.model.clone();
        let drafter = self.drafter.clone();
        let mut running: Vec<Running<'_>> = Vec::new();
        let mut closed = false;
        loop {
            // Admit queued jobs into free slots; block only when idle.
            while !closed && running.len() < self.slots.len() {
                let job = if running.is_empty() {
                    match rx.recv() {
                        Ok(j) => j,
                        Err(_) => {
                            closed = true;
                            break;
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(j) => j,
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                };
                self.counts.waiting.fetch_sub(1, Ordering::SeqCst);
                if let Some(r) = self.admit(&model, drafter.as_deref(), job) {
                    self.counts.running.fetch_add(1, Ordering::SeqCst);
                    running.push(r);
                }
            }
            if running.is_empty() {
                if closed {
                    return;
                }
                continue;
            }
            // A client gone or a shutdown frees its rows now, not at its
            // next token (a long prefill emits none).
            let stop_all = self.cancel_all.load(Ordering::Relaxed);
            for r in running.iter_mut() {
                if stop_all || r.cancel.load(Ordering::Relaxed) {
                    r.seq.cancel();
                }
            }
            let mut live: Vec<&mut Sequence<'_>> = running
                .iter_mut()
                .filter(|r| !r.seq.is_finished())
                .map(|r| &mut r.seq)
                .collect();
            if !live.is_empty() {
                let stepped = catch_unwind(AssertUnwindSafe(|| {
                    batch::step(&model, &mut live, self.batch_rows)
                }));
                match stepped {
                    Ok(rows) => self.metrics.observe_batch(rows.sequences, rows.rows),
                    Err(_) => {
                        tracing::error!("a batched step panicked: failing its requests");
                        for s in live {
                            s.fail(Error::Batch("internal error: generation panicked".into()));
                        }
                    }
                }
            }
            // Finished requests leave the batch. Their clients hear it only
            // after the metrics account for them (a client's next look at
            // /metrics must see its own request's cache hits and memory).
            let mut answers = Vec::new();
            let mut i = 0;
            while i < running.len() {
                if running[i].seq.is_finished() {
                    let r = running.swap_remove(i);
                    answers.push(self.retire(r));
                } else {
                    i += 1;
                }
            }
            if !answers.is_empty() {
                self.publish_memory(&running);
            }
            for (events, result) in answers {
                let _ = events.send(Event::Done(result));
            }
        }
    }

    /// Starts a job in the free slot whose cache shares the longest prefix
    /// with its prompt; a job that cannot start is answered here.
    fn admit<'a>(
        &mut self,
        model: &'a Model,
        drafter: Option<&'a Mutex<SpecDrafter>>,
        job: Job,
    ) -> Option<Running<'a>> {
        let prompt_tokens = job.prompt.len();
        let answer = |counts: &Counts, r: std::result::Result<Generation, ApiError>| {
            counts.admitted.fetch_sub(1, Ordering::SeqCst);
            let _ = job.events.send(Event::Done(Box::new(r)));
        };
        if job.cancel.load(Ordering::Relaxed) || self.cancel_all.load(Ordering::Relaxed) {
            // Gone or shut down before its turn: nothing to run.
            self.metrics
                .finish_request(prompt_tokens, None, Outcome::Cancelled);
            answer(&self.counts, Err(ApiError::shutting_down()));
            return None;
        }
        // Ties (no slot shares anything) go to the least recently used
        // slot, so a new conversation does not overwrite a fresh history.
        let slot = (0..self.slots.len())
            .filter_map(|i| {
                let s = self.slots[i].as_ref()?;
                Some((
                    s.cached_prefix_len(&job.prompt),
                    std::cmp::Reverse(self.slot_used[i]),
                    i,
                ))
            })
            .max()
            .map(|(_, _, i)| i)
            .expect("admit is called with a free slot");
        self.tick += 1;
        self.slot_used[slot] = self.tick;
        let mut session = self.slots[slot].take().expect("free slot");
        session.restore_prefix(&mut self.prefix, &job.prompt);
        let metrics = self.metrics.clone();
        let (cancel, events, arrived) = (job.cancel.clone(), job.events.clone(), job.arrived);
        let mut last: Option<Instant> = None;
        let on_token = Box::new(move |ev: &TokenEvent| -> bool {
            if ev.token != u32::MAX {
                let now = Instant::now();
                match last {
                    None => metrics.observe_ttft((now - arrived).as_secs_f64()),
                    Some(t) => metrics.observe_itl((now - t).as_secs_f64()),
                }
                last = Some(now);
                metrics.add_generated(1);
            }
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            events.send(Event::Text(ev.text.to_string())).is_ok()
        });
        let shared = match (drafter, job.speculate) {
            (Some(d), true) => Some(Box::new(SharedDrafter::new(d)) as Box<dyn Drafter + 'a>),
            _ => None,
        };
        match Sequence::new(model, session, shared, &job.prompt, job.opts, on_token) {
            Ok(seq) => Some(Running {
                seq,
                slot,
                prompt_tokens,
                speculate: job.speculate,
                cancel: job.cancel,
                events: job.events,
                arrived: job.arrived,
            }),
            Err(refused) => {
                let (e, session) = *refused;
                self.slots[slot] = Some(session);
                tracing::warn!("request failed: {e}");
                self.metrics
                    .finish_request(prompt_tokens, None, Outcome::Failed);
                answer(&self.counts, Err(ApiError::from(e)));
                None
            }
        }
    }

    /// KV memory for `/metrics`: the slots' caches (`running` holds the
    /// lent ones) and the prefix cache.
    fn publish_memory(&self, running: &[Running<'_>]) {
        let slots: usize = self
            .slots
            .iter()
            .flatten()
            .map(|s| s.cache.memory_bytes())
            .chain(running.iter().map(|r| r.seq.cache_bytes()))
            .sum();
        self.metrics.set_memory(slots, self.prefix.stats());
    }

    /// Accounts for a finished request and gives its slot back; returns
    /// its answer, for the caller to send once the metrics are published.
    fn retire(
        &mut self,
        r: Running<'_>,
    ) -> (
        UnboundedSender<Event>,
        Box<std::result::Result<Generation, ApiError>>,
    ) {
        let (result, mut session) = r.seq.finish();
        let result = result.map_err(ApiError::from);
        match &result {
            Ok(g) => {
                let outcome = if g.stop == StopReason::Cancelled {
                    Outcome::Cancelled
                } else {
                    Outcome::Ok
                };
                let spec = r.speculate.then_some(&g.spec);
                self.metrics.finish_request(r.prompt_tokens, spec, outcome);
                self.metrics
                    .add_cached_prompt(g.stats.prompt_tokens - g.stats.prefilled_tokens);
                log_request(g, (Instant::now() - r.arrived).as_secs_f64());
                session.save_prefix(&mut self.prefix);
            }
            Err(e) => {
                // The session may be half-written: start the next request clean.
                session.reset();
                tracing::warn!("request failed: {}", e.message);
                self.metrics
                    .finish_request(r.prompt_tokens, None, Outcome::Failed);
            }
        }
        self.slots[r.slot] = Some(session);
        // Not running any more before the client hears it is done, so a
        // client's next look at the gauges is consistent.
        self.counts.running.fetch_sub(1, Ordering::SeqCst);
        self.counts.admitted.fetch_sub(1, Ordering::SeqCst);
        (r.events, Box::new(result))
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
}

impl<'a> SharedDrafter<'a> {
    fn new(inner: &'a Mutex<SpecDrafter>) -> Self {
        SharedDrafter { inner }
    }
}

impl Drafter for SharedDrafter<'_> {
    crate::draft::forward_drafter!(self, lock(self.inner), lock(self.inner));
}

/// A panic elsewhere must not take the server down with poisoned locks.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
