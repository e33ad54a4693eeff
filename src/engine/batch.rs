//! Continuous batching: every live [`Sequence`] contributes its rows (a
//! prefill chunk, or its pending token and draft tree) to ONE forward per
//! step, under one row budget shared by batching and speculation.
//!
//! Why rows are the currency: a forward over N rows costs far less than N
//! forwards of one row on this engine (the weights are streamed once per
//! forward), so another user's next token is the cheapest row there is: it
//! is accepted with certainty. Draft nodes are accepted only with some
//! probability, so they get what the roots and prompt chunks leave.
//!
//! The plan of a step, in order:
//! 1. every decoding sequence gets its root (one row, always: a sequence
//!    never stalls because others are busy);
//! 2. prefilling sequences, oldest first, get prompt chunks from what is
//!    left, the oldest at least [`MIN_PREFILL_ROWS`] so a long prompt always
//!    moves (chunked prefill mixed with decode rows, as vLLM and llama.cpp's
//!    server do); alone, a prompt gets a whole [`PREFILL_CHUNK`];
//! 3. the remaining rows are split evenly among decoding sequences as a cap
//!    on their draft trees; each sequence's own budget chooses within it:
//!    a fixed one, or the `--tree auto` controller, which weighs the tree
//!    against the forward as planned so far (the c(N) curve makes a node
//!    nearly free beside one root and a row's full share beside many). A
//!    nearly full batch thus drafts little or nothing, a lone request gets
//!    its best tree.
//!
//! The sequences' outputs cannot depend on the batch: each is stepped by
//! the same code as alone and the decoder computes every row independently
//! of the others (see [`crate::model::Decoder::forward_batch`]).

use super::budget::Batch;
use super::{Sequence, StepShare, PREFILL_CHUNK};
use crate::error::{Error, Result};
use crate::model::Model;

/// Rows the oldest prefilling sequence gets even when decode rows fill the
/// budget. 16 rows cost little more than one on the measured c(N) curve
/// (~1.1-1.9x one row at 8) while moving a prompt 16 tokens per step.
pub const MIN_PREFILL_ROWS: usize = 16;

/// Default rows per batched forward. At 64 rows a forward of the 1.5B on
/// this CPU class costs about 3-4x a one-row forward (the curve
/// `treespec bench` measures for the budget controller), so a step stays
/// a few decode-steps long: latency for the others stays bounded while a
/// prompt is chunked in beside them.
pub const DEFAULT_MAX_ROWS: usize = 64;

/// What one [`step`] ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepRows {
    /// Sequences in the forward.
    pub sequences: usize,
    /// Rows in the forward (roots, draft nodes and prompt tokens).
    pub rows: usize,
    /// Of which prompt tokens.
    pub prefill_rows: usize,
}

/// Plans every unfinished sequence against `max_rows` shared rows, runs one
/// forward over all their segments and lets each absorb its logits.
/// Sequences that finish while planning simply take no rows; the caller
/// removes finished ones ([`Sequence::is_finished`]) and adds new ones
/// between steps. A failure is the failing sequence's alone when it is
/// its own (verification, detokenisation); a failed forward fails every
/// sequence in it (their sessions keep only committed tokens).
pub fn step(model: &Model, seqs: &mut [&mut Sequence<'_>], max_rows: usize) -> StepRows {
    let max_rows = max_rows.max(1);
    let decoding: Vec<usize> = (0..seqs.len())
        .filter(|&i| !seqs[i].is_finished() && !seqs[i].is_prefilling())
        .collect();
    let mut prefill_rows = 0;

    // Prompt chunks first: their rows are certain work, drafts are not.
    let mut free = if decoding.is_empty() {
        PREFILL_CHUNK.max(max_rows)
    } else {
        max_rows.saturating_sub(decoding.len())
    };
    let mut first = true;
    for s in seqs.iter_mut() {
        if s.is_finished() || !s.is_prefilling() {
            continue;
        }
        let give = if first {
            free.max(MIN_PREFILL_ROWS)
        } else {
            free
        };
        if give == 0 {
            break;
        }
        first = false;
        // A sequence whose prompt is all in plans a decode step instead:
        // its root, no draft this step (its tree was not budgeted).
        let share = StepShare {
            prefill_rows: give,
            max_draft: 0,
            others: Batch::default(),
        };
        s.plan(&share);
        let r = s.rows();
        if s.is_prefilling() {
            prefill_rows += r;
        }
        free = free.saturating_sub(r);
    }

    // Then decode rows: a root each, the rest shared as draft caps. Each
    // sequence chooses its tree seeing the forward as planned so far: the
    // prompt rows, the trees chosen before it, a root for each one after.
    let spare = max_rows.saturating_sub(decoding.len() + prefill_rows);
    let cap = spare.checked_div(decoding.len()).unwrap_or(0);
    let mut others = Batch {
        rows: prefill_rows as f64,
        tokens: 0.0,
    };
    for (k, &i) in decoding.iter().enumerate() {
        let later = (decoding.len() - k - 1) as f64;
        let share = StepShare {
            prefill_rows: 0,
            max_draft: cap,
            others: Batch {
                rows: others.rows + later,
                tokens: others.tokens + later,
            },
        };
        seqs[i].plan(&share);
        let e = seqs[i].expected();
        others.rows += e.rows;
        others.tokens += e.tokens;
    }

    // A sequence planned nothing this step (finished, or a prompt left
    // without rows) has no segment.
    let mut segments = Vec::new();
    let mut owners = Vec::new();
    for (i, s) in seqs.iter_mut().enumerate() {
        if let Some(seg) = s.segment() {
            segments.push(seg);
            owners.push(i);
        }
    }
    let rows = segments.iter().map(|s| s.tokens.len()).sum();
    let result = model.decoder.forward_batch(&mut segments);
    drop(segments);
    match result {
        Ok(logits) => {
            for (&i, l) in owners.iter().zip(logits) {
                if let Err(e) = seqs[i].absorb(l) {
                    seqs[i].fail(e);
                }
            }
        }
        Err(e) => {
            tracing::warn!("batched forward over {rows} rows failed: {e}");
            for &i in &owners {
                seqs[i].fail(Error::Batch(e.to_string()));
            }
        }
    }
    StepRows {
        sequences: owners.len(),
        rows,
        prefill_rows,
    }
}

/// Runs `seqs` to completion, batched, `max_rows` rows per forward; returns
/// each one's generation and session, in order.
pub fn run_to_end<'a>(
    model: &'a Model,
    seqs: Vec<Sequence<'a>>,
    max_rows: usize,
) -> Vec<(Result<super::Generation>, super::Session)> {
    let mut seqs = seqs;
    loop {
        let mut live: Vec<&mut Sequence<'a>> =
            seqs.iter_mut().filter(|s| !s.is_finished()).collect();
        if live.is_empty() {
            break;
        }
        step(model, &mut live, max_rows);
    }
    seqs.into_iter().map(Sequence::finish).collect()
}
