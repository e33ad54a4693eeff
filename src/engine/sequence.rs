//! One request's generation as a state machine that a driver steps: plan
//! what to run next (a prefill chunk, or a draft tree), hand the decoder
//! that [`Segment`], absorb the logits. [`super::generate`] runs one
//! sequence per forward; [`super::batch`] runs many in one forward
//! (continuous batching). Both step this very code, which is why a request
//! in a batch emits exactly what it emits alone.

use std::time::Instant;

use super::budget::{Batch, CatchUp};
use super::{GenStats, SpecStats, PREFILL_CHUNK};
use super::{GenerateOptions, Generation, Session, StopReason, StopScanner, TokenEvent};
use crate::draft::{DraftTree, Drafter, NodeTopK};
use crate::error::{Error, Result};
use crate::model::{common_prefix_len, LogitRows, Logits, Model, Segment};
use crate::sampling::{top2_margin, top_k_probs, Sampler};
use crate::tokenizer::StreamDecoder;

/// The share of a step's forward a sequence may plan for.
#[derive(Debug, Clone, Copy)]
pub struct StepShare {
    pub prefill_rows: usize,
    pub max_draft: usize,
    /// The rest of the forward, as planned so far.
    pub others: Batch,
}

impl StepShare {
    /// A forward of its own: a whole prefill chunk, any tree.
    pub fn alone() -> Self {
        StepShare {
            prefill_rows: PREFILL_CHUNK,
            max_draft: usize::MAX,
            others: Batch::default(),
        }
    }
}

/// Sees every emitted token; returning `false` cancels the request.
pub type OnToken<'a> = Box<dyn FnMut(&TokenEvent) -> bool + 'a>;

pub struct Sequence<'a> {
    model: &'a Model,
    session: Session,
    drafter: Option<Box<dyn Drafter + 'a>>,
    opts: GenerateOptions,
    on_token: OnToken<'a>,
    prompt_len: usize,
    stop_tokens: Vec<u32>,
    sampler: Sampler,
    stats: GenStats,
    spec: SpecStats,
    /// Prompt + generated so far; its last token is the next tree's root.
    context: Vec<u32>,
    tokens: Vec<u32>,
    margins: Vec<f32>,
    margins_ms: f64,
    detok: StreamDecoder<'a>,
    scanner: StopScanner,
    started: Instant,
    /// Set when the prompt is in the cache and decoding begins.
    decode_started: Option<Instant>,
    /// The prompt before its last token is prefilled up to here.
    prefilled: usize,
    stop: Option<StopReason>,
    /// Set by [`Sequence::fail`]: what [`Sequence::finish`] reports.
    error: Option<Error>,
    work: Work,
}

/// What the sequence asked the decoder to run.
enum Work {
    None,
    Prefill {
        end: usize,
        positions: Vec<usize>,
        parents: Vec<Option<usize>>,
    },
    Tree(TreeWork),
}

/// A draft tree planned for the next forward.
struct TreeWork {
    tree: DraftTree,
    positions: Vec<usize>,
    /// The budget controller's class and choice for this step.
    class: usize,
    chosen: usize,
    /// The draft-model gate's arm, for a drafter with a costly source
    /// ([`super::budget::BudgetController::gate_mut`]); `chosen` is then
    /// an arm of the gate when this is above 0.
    gate: Option<usize>,
    draft_ms: f64,
    /// Of `draft_ms`, what the drafter spent catching up (paid once per
    /// switch to drafting, not per step: kept out of the arm's per-step
    /// cost, which the controller weighs it against separately).
    catch_up_ms: f64,
    scored: Option<Instant>,
    /// When the drafter asked where the target looks
    /// ([`Drafter::attention_chunk`]): the chunk length, and the
    /// forward's last-layer queries.
    probe: Option<(usize, Vec<f32>)>,
}

impl<'a> Sequence<'a> {
    /// Checks the request and reuses the longest prefix `session` already
    /// holds; nothing runs yet. A refused request hands `session` back.
    pub fn new(
        model: &'a Model,
        mut session: Session,
        drafter: Option<Box<dyn Drafter + 'a>>,
        prompt: &[u32],
        opts: GenerateOptions,
        on_token: OnToken<'a>,
    ) -> std::result::Result<Self, Box<(Error, Session)>> {
        if let Err(e) = check_request(model, &session, prompt, &opts) {
            return Err(Box::new((e, session)));
        }
        // Prefill everything but the last prompt token, which becomes the
        // first tree root; reuse the longest cached prefix.
        let body = &prompt[..prompt.len() - 1];
        let reuse = common_prefix_len(&session.cached, body).min(session.cache.len());
        session.cache.truncate(reuse);
        session.cached.truncate(reuse);
        let stats = GenStats {
            prompt_tokens: prompt.len(),
            prefilled_tokens: body.len() - reuse + 1,
            ..Default::default()
        };
        let spec = SpecStats {
            method: drafter
                .as_ref()
                .map(|d| d.name().to_string())
                .unwrap_or_else(|| "none".into()),
            ..Default::default()
        };
        Ok(Sequence {
            model,
            session,
            drafter,
            sampler: Sampler::new(opts.sampling.clone()),
            scanner: StopScanner {
                stops: opts.stop_strings.clone(),
                text: String::new(),
                emitted: 0,
            },
            opts,
            on_token,
            prompt_len: prompt.len(),
            stop_tokens: model.tokenizer.stop_tokens().to_vec(),
            stats,
            spec,
            context: prompt.to_vec(),
            tokens: Vec::new(),
            margins: Vec::new(),
            margins_ms: 0.0,
            detok: StreamDecoder::new(&model.tokenizer),
            started: Instant::now(),
            decode_started: None,
            prefilled: reuse,
            stop: None,
            error: None,
            work: Work::None,
        })
    }

    pub fn is_finished(&self) -> bool {
        self.stop.is_some()
    }

    /// Still prefilling its prompt.
    pub fn is_prefilling(&self) -> bool {
        self.decode_started.is_none()
    }

    /// Bytes its KV cache holds.
    pub fn cache_bytes(&self) -> usize {
        self.session.cache.memory_bytes()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len()
    }

    /// Decides the next piece of work: a prefill chunk of at most
    /// `share.prefill_rows` prompt tokens, or a draft tree of at most
    /// `share.max_draft` nodes besides the root (the drafter's own budget,
    /// or the `--tree auto` controller weighing `share.others`, caps it
    /// further). Returns false when the sequence has finished.
    pub fn plan(&mut self, share: &StepShare) -> bool {
        let (prefill_rows, max_draft) = (share.prefill_rows, share.max_draft);
        self.work = Work::None;
        if self.stop.is_some() {
            return false;
        }
        let body = self.prompt_len - 1;
        if self.prefilled < body {
            let base = self.session.cache.len();
            let n = (body - self.prefilled).min(prefill_rows.clamp(1, PREFILL_CHUNK));
            self.work = Work::Prefill {
                end: self.prefilled + n,
                positions: (base..base + n).collect(),
                parents: (0..n).map(|i| i.checked_sub(1)).collect(),
            };
            return true;
        }
        if self.decode_started.is_none() {
            if let Some(d) = self.drafter.as_deref_mut() {
                d.set_sampling(&self.opts.sampling);
                d.start(&self.context);
            }
            self.stats.prefill_ms = self.started.elapsed().as_secs_f64() * 1e3;
            self.decode_started = Some(Instant::now());
        }
        if self.tokens.len() >= self.opts.max_new_tokens {
            self.stop = Some(StopReason::MaxTokens);
            return false;
        }
        let capacity = self.session.cache.capacity();
        let room = capacity - self.session.cache.len();
        if room == 0 {
            self.stop = Some(StopReason::ContextFull);
            return false;
        }
        let root = *self.context.last().expect("context is never empty");
        // The largest tree this step allows: the batch's share, the
        // context's end, the tokens still wanted.
        let cap = max_draft
            .min(room - 1)
            .min(self.opts.max_new_tokens - self.tokens.len() - 1);
        // Drafting time from here: an estimating drafter gathers its
        // sources' trees before the budget is chosen.
        let td = Instant::now();
        let ran_before = self.drafter.as_deref().map(|d| d.counters());
        // `chosen` is the arm the step is recorded under, `budget` the nodes
        // asked for (fewer than the arm when an estimate says so); `gate`
        // the draft-model gate's arm, for a drafter with a costly source
        // beside free ones (0: the free sources alone).
        let (class, chosen, gate, budget) =
            match (&self.opts.auto_budget, self.drafter.as_deref_mut()) {
                (Some(c), Some(d)) => {
                    let class = d.outlook(&self.context);
                    let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                    // Only as many nodes as this class may verify: gathering a
                    // 64-node tree from every source when at most 16 can be
                    // taken cost the hybrid ~4 ms a step (1.5B, copy-heavy).
                    let max = c.max_in(class, cap);
                    let ctx = self.session.cache.len();
                    let catch_up = CatchUp {
                        ms: d.catch_up_ms(&self.context),
                        remaining: self.opts.max_new_tokens - self.tokens.len(),
                    };
                    // First whether the costly source runs at all, against
                    // what the free ones alone have yielded.
                    let gate = d.costly_source().then(|| {
                        let g = c
                            .gate_mut()
                            .choose_in(ctx, class, share.others, cap, catch_up);
                        d.use_costly_source(g > 0);
                        g
                    });
                    let drafting = gate.filter(|&g| g > 0);
                    let estimate = match drafting {
                        Some(_) => None,
                        None => d.estimate(&self.context, max),
                    };
                    let (arm, nodes) = match (drafting, estimate) {
                        (Some(g), _) => (g, g),
                        (None, Some(accept)) => {
                            let (arm, n) =
                                c.choose_estimated(ctx, class, share.others, cap, &accept);
                            tracing::trace!(
                                nodes = n,
                                expected = accept.iter().take(n).sum::<f32>(),
                                "estimated tree"
                            );
                            (arm, n)
                        }
                        (None, None) => {
                            let b = c.choose_in(ctx, class, share.others, cap, catch_up);
                            (b, b)
                        }
                    };
                    (class, arm, gate, nodes.min(cap))
                }
                _ => (0, self.opts.max_draft, None, self.opts.max_draft.min(cap)),
            };
        tracing::trace!(
            class,
            chosen,
            ?gate,
            budget,
            others_rows = share.others.rows,
            others_tokens = share.others.tokens,
            "draft budget"
        );
        let tree = match self.drafter.as_deref_mut() {
            Some(d) if budget > 0 => d.propose(&self.context, budget),
            _ => DraftTree::root(root),
        };
        let probe = self
            .drafter
            .as_deref_mut()
            .and_then(|d| d.attention_chunk())
            .map(|chunk| (chunk, Vec::new()));
        let draft_ms = td.elapsed().as_secs_f64() * 1e3;
        let mut catch_up_ms = 0.0;
        if let (Some(d), Some(before)) = (self.drafter.as_deref(), ran_before) {
            let ran = d.counters().since(before);
            catch_up_ms = ran.catch_up_us as f64 / 1e3;
            self.spec.draft_model.add(ran);
        }
        debug_assert!(tree.validate().is_ok() && tree.tokens[0] == root);
        let base = self.session.cache.len();
        self.work = Work::Tree(TreeWork {
            positions: tree.depths.iter().map(|d| base + d).collect(),
            tree,
            class,
            chosen,
            gate,
            draft_ms,
            catch_up_ms,
            scored: None,
            probe,
        });
        true
    }

    /// What the planned work adds to a forward: (rows, tokens it is
    /// expected to emit), for the sequences planned after it.
    pub fn expected(&self) -> Batch {
        match &self.work {
            Work::None => Batch::default(),
            Work::Prefill { positions, .. } => Batch {
                rows: positions.len() as f64,
                tokens: 0.0,
            },
            Work::Tree(TreeWork {
                tree,
                class,
                chosen,
                gate,
                ..
            }) => {
                let learnt = self.opts.auto_budget.as_ref().and_then(|c| {
                    let c = c.lock().unwrap_or_else(|e| e.into_inner());
                    match gate {
                        Some(g) if *g > 0 => c.gate()?.expected(*class, *chosen),
                        _ => c.expected(*class, *chosen),
                    }
                });
                // Without a controller: the request's own running mean.
                let mat = learnt.map_or_else(
                    || self.tokens.len().max(1) as f64 / self.spec.steps.max(1) as f64,
                    |e| e.1,
                );
                Batch {
                    rows: tree.len() as f64,
                    tokens: mat.min(tree.len() as f64),
                }
            }
        }
    }

    /// Rows the planned work adds to a forward.
    pub fn rows(&self) -> usize {
        match &self.work {
            Work::None => 0,
            Work::Prefill { positions, .. } => positions.len(),
            Work::Tree(w) => w.tree.len(),
        }
    }

    /// The planned work as the decoder's input (`None` when nothing is
    /// planned).
    pub fn segment(&mut self) -> Option<Segment<'_>> {
        let cache = &mut self.session.cache;
        match &mut self.work {
            Work::None => None,
            Work::Prefill {
                end,
                positions,
                parents,
            } => Some(Segment {
                cache,
                tokens: &self.context[self.prefilled..*end],
                positions,
                parents,
                want: LogitRows::None,
                extend: false,
                probe: None,
            }),
            Work::Tree(TreeWork {
                tree,
                positions,
                scored,
                probe,
                ..
            }) => {
                *scored = Some(Instant::now());
                Some(Segment {
                    cache,
                    tokens: &tree.tokens,
                    positions,
                    parents: &tree.parents,
                    want: LogitRows::All,
                    extend: false,
                    probe: probe.as_mut().map(|p| &mut p.1),
                })
            }
        }
    }

    /// Takes the logits of the planned work: commits a prefill chunk, or
    /// verifies the tree, keeps the accepted path and emits its tokens
    /// (which may finish the sequence).
    pub fn absorb(&mut self, logits: Logits) -> Result<()> {
        match std::mem::replace(&mut self.work, Work::None) {
            Work::None => Ok(()),
            Work::Prefill { end, .. } => {
                self.session.cache.keep_all();
                let chunk = &self.context[self.prefilled..end];
                self.session.cached.extend_from_slice(chunk);
                self.prefilled = end;
                Ok(())
            }
            Work::Tree(w) => self.verify_step(w, logits),
        }
    }

    fn verify_step(&mut self, work: TreeWork, logits: Logits) -> Result<()> {
        let TreeWork {
            tree,
            class,
            chosen,
            gate,
            draft_ms: mut step_draft_ms,
            catch_up_ms,
            scored,
            probe,
            ..
        } = work;
        let verdict = (self.opts.verifier)(&tree, &logits, &mut self.sampler, &mut self.context);
        self.session.cache.keep(&verdict.path)?;
        self.session
            .cached
            .extend(verdict.path.iter().map(|&i| tree.tokens[i]));
        if let Some(t) = scored {
            self.spec.verify_ms += t.elapsed().as_secs_f64() * 1e3;
        }
        self.spec
            .record_step(tree.num_drafted(), verdict.accepted_drafts());
        tracing::trace!(
            drafted = tree.num_drafted(),
            accepted = verdict.accepted_drafts(),
            "verified"
        );

        if let Some(d) = self.drafter.as_deref_mut() {
            let before = d.counters();
            let k = d.wants_topk();
            // Root-only steps too: the update rule covers the root, and a
            // recycler whose matrix is still empty (no prompt seeding)
            // proposes only the root until it has learnt something.
            if k > 0 {
                let td = Instant::now();
                let topk = node_top_k(&logits, tree.len(), k);
                d.observe(&tree, &topk, &verdict.path);
                step_draft_ms += td.elapsed().as_secs_f64() * 1e3;
            }
            // Where the last accepted token looked (its query is the row
            // of its tree node), over what is now committed.
            if let (Some((chunk, queries)), Some(&last)) = (&probe, verdict.path.last()) {
                let td = Instant::now();
                let width = self.model.config().n_heads * self.model.config().head_dim;
                if let Some(q) = queries.get(last * width..(last + 1) * width) {
                    let mass = self
                        .model
                        .decoder
                        .attention_mass(&self.session.cache, q, *chunk);
                    d.observe_attention(&self.context, &mass);
                }
                step_draft_ms += td.elapsed().as_secs_f64() * 1e3;
            }
            self.spec.draft_model.add(d.counters().since(before));
        }
        self.spec.draft_ms += step_draft_ms;
        if let (Some(c), Some(_)) = (&self.opts.auto_budget, &self.drafter) {
            let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
            let (emitted, nodes) = (verdict.emitted.len(), tree.len());
            let draft_ms = (step_draft_ms - catch_up_ms).max(0.0);
            match gate {
                Some(g) if g > 0 => c.gate_mut().record(class, g, emitted, nodes, draft_ms),
                Some(_) => {
                    c.gate_mut().record(class, 0, emitted, nodes, draft_ms);
                    c.record(class, chosen, emitted, nodes, draft_ms);
                }
                None => c.record(class, chosen, emitted, nodes, draft_ms),
            }
        }

        for (i, &tok) in verdict.emitted.iter().enumerate() {
            if !self.opts.ignore_eos && self.stop_tokens.contains(&tok) {
                self.stop = Some(StopReason::Eos);
                return Ok(());
            }
            self.tokens.push(tok);
            self.context.push(tok);
            if self.opts.record_margins {
                let tm = Instant::now();
                self.margins.push(top2_margin(logits.row(verdict.path[i])));
                self.margins_ms += tm.elapsed().as_secs_f64() * 1e3;
            }
            let piece = self.detok.push(tok)?;
            let (safe, hit) = self.scanner.push(&piece);
            if !(self.on_token)(&TokenEvent {
                token: tok,
                text: &safe,
            }) {
                self.stop = Some(StopReason::Cancelled);
                return Ok(());
            }
            if hit {
                self.stop = Some(StopReason::StopString);
                return Ok(());
            }
            if self.tokens.len() >= self.opts.max_new_tokens {
                self.stop = Some(StopReason::MaxTokens);
                return Ok(());
            }
        }
        Ok(())
    }

    /// Stops the request before its next step (its client is gone): it
    /// finishes as cancelled with what it has emitted.
    pub fn cancel(&mut self) {
        if self.stop.is_none() {
            self.work = Work::None;
            self.stop = Some(StopReason::Cancelled);
        }
    }

    /// Ends the request with `e` (its forward or its verification failed):
    /// it plans nothing more, and [`Sequence::finish`] reports `e`.
    pub fn fail(&mut self, e: Error) {
        self.work = Work::None;
        self.stop = Some(StopReason::Cancelled);
        self.error = Some(e);
    }

    /// Ends the request: streams the held-back text, lets the drafter learn
    /// from the output, and hands back the session (its cache holding
    /// exactly prompt + output, for the next turn).
    pub fn finish(mut self) -> (Result<Generation>, Session) {
        if let Some(e) = self.error.take() {
            return (Err(e), self.into_session());
        }
        let stop = self.stop.unwrap_or(StopReason::MaxTokens);
        let mut result = Ok(());
        if !matches!(stop, StopReason::StopString | StopReason::Cancelled) {
            match self.detok.finish() {
                Ok(tail) => {
                    let (mut safe, _) = self.scanner.push(&tail);
                    safe.push_str(&self.scanner.flush());
                    if !safe.is_empty() {
                        (self.on_token)(&TokenEvent {
                            token: u32::MAX,
                            text: &safe,
                        });
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        if let Some(d) = self.drafter.as_deref_mut() {
            d.finish(&self.tokens);
        }
        let mut session = self.session;
        // The cache may hold accepted tokens past a stop: drop them so the
        // session's cached tokens describe the cache exactly.
        let keep = self.prompt_len - 1 + self.tokens.len();
        if session.cached.len() > keep {
            session.cache.truncate(keep);
            session.cached.truncate(keep);
        }
        if let Err(e) = result {
            return (Err(e), session);
        }
        let mut stats = self.stats;
        if let Some(t) = self.decode_started {
            stats.decode_ms = t.elapsed().as_secs_f64() * 1e3 - self.margins_ms;
        }
        stats.generated_tokens = self.tokens.len();
        stats.steps = self.spec.steps;
        stats.finish();
        let mut spec = self.spec;
        spec.finish();
        let generation = Generation {
            tokens: self.tokens,
            text: self.scanner.text,
            stop,
            stats,
            spec,
            margins: self.margins,
            margins_ms: self.margins_ms,
        };
        (Ok(generation), session)
    }

    /// Gives up on the request (its forward failed): the session comes
    /// back with its cache holding what it committed, nothing pending.
    pub fn into_session(self) -> Session {
        let mut session = self.session;
        let n = session.cached.len();
        session.cache.truncate(n);
        session
    }
}

/// The request is well-formed for this model and session.
fn check_request(
    model: &Model,
    session: &Session,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<()> {
    opts.sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let capacity = session.cache.capacity();
    if prompt.len() >= capacity {
        return Err(Error::ContextLength {
            prompt: prompt.len(),
            context: capacity,
            reserve: 1,
        });
    }
    let vocab = model.decoder.config.vocab_size;
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Invalid(format!(
            "prompt token {t} is outside the vocabulary ({vocab})"
        )));
    }
    Ok(())
}

/// The model's top-k successors of every scored node, for drafters that
/// learn (two passes over the vocabulary per node, spread over the pool).
fn node_top_k(logits: &Logits, nodes: usize, k: usize) -> Vec<NodeTopK> {
    let topk: Vec<std::sync::Mutex<NodeTopK>> = (0..nodes).map(|_| Default::default()).collect();
    crate::kernels::parallel_for(nodes, 1, &|range| {
        for i in range {
            let (ids, probs) = top_k_probs(logits.row(i), k);
            *topk[i].lock().unwrap_or_else(|e| e.into_inner()) = NodeTopK { ids, probs };
        }
    });
    topk.into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}
