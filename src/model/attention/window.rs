//! Sliding-window attention for the rows whose window leaves out part of
//! the past: a row at position p sees keys at p-W+1..=p only (HF's and
//! llama.cpp's mask for Mistral, Phi-3 and the local layers of Gemma 2/3).
//!
//! A row below W sees its whole causal past, which the chunked kernel of
//! the parent module computes; only rows at p ≥ W come here. The choice is
//! made per row by its own position, and this path reads a row's keys in
//! position order whether they are committed or pending tree nodes, so a
//! token's result still does not depend on which other nodes share the
//! forward (tree forward == sequential forward, as for the chunked kernel).
//!
//! Written plainly (one (token, kv head) pair per task, keys widened once
//! for the group's heads, dot products in 16 partial sums, plain multiply
//! and add, which the baseline x86-64 build vectorises; `mul_add` there is
//! a libm call per element): a window is at
//! most a few thousand keys, so this costs about what the chunked kernel
//! costs over the same span, without its chunk bookkeeping.

use std::sync::Mutex;

use super::{AttentionShape, NewRows, ScoreRule, TreeMask};
use crate::model::kv_cache::{LayerKv, KEY_TILE};

/// Writes into `out` (`[N][n_heads][head_dim]`) the attention of the new
/// tokens `rows` (indices among the N), each over its window of `window`
/// positions. `q`, `kv`, `mask` as for [`super::tree_attention_with`].
// The arguments are the attention call's own, plus the window and rows.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_rows(
    shape: &AttentionShape,
    rule: ScoreRule,
    window: usize,
    q: &[f32],
    kv: &LayerKv,
    mask: &TreeMask,
    rows: &[usize],
    out: &mut [f32],
) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = *shape;
    let NewRows { first, ctx, .. } = NewRows::of(shape, q, kv, mask);
    let group = n_heads / n_kv_heads;
    let done = Mutex::new(Vec::with_capacity(rows.len() * n_kv_heads));
    let work = |range: std::ops::Range<usize>| {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        let mut scores = Vec::new();
        for t in range {
            let (i, g) = (rows[t / n_kv_heads], t % n_kv_heads);
            // Cache slots of the keys row i sees, in position order: the
            // committed ones from the window's start, then its ancestors
            // (depth t at position ctx + t, in pending slot `anc[t]`).
            let anc = mask.ancestors(first + i);
            let pos = ctx + anc.len() - 1;
            let lo = (pos + 1).saturating_sub(window);
            let slots: Vec<usize> = (lo.min(ctx)..ctx)
                .chain(
                    anc.iter()
                        .enumerate()
                        .filter(|&(t, _)| ctx + t >= lo)
                        .map(|(_, &j)| ctx + j),
                )
                .collect();
            widen(kv, g, d, &slots, &mut keys, &mut values);
            let mut result = vec![0f32; group * d];
            for (k, res) in result.chunks_exact_mut(d).enumerate() {
                let h = g * group + k;
                let qh = &q[(i * n_heads + h) * d..][..d];
                scores.clear();
                scores.extend(keys.chunks_exact(d).map(|key| {
                    let s = dot(qh, key) * rule.scale;
                    match rule.softcap {
                        Some(cap) => cap * (s / cap).tanh(),
                        None => s,
                    }
                }));
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for (&p, v) in scores.iter().zip(values.chunks_exact(d)) {
                    for (r, &x) in res.iter_mut().zip(v) {
                        *r += p * x;
                    }
                }
                let inv = 1.0 / sum;
                res.iter_mut().for_each(|r| *r *= inv);
            }
            done.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((i, g, result));
        }
    };
    crate::kernels::parallel_for(rows.len() * n_kv_heads, 1, &work);
    for (i, g, result) in done.into_inner().unwrap_or_else(|e| e.into_inner()) {
        for (k, res) in result.chunks_exact(d).enumerate() {
            let h = g * group + k;
            out[(i * n_heads + h) * d..][..d].copy_from_slice(res);
        }
    }
}

/// Keys and values of kv head `g` at cache `slots`, as f32 rows.
fn widen(
    kv: &LayerKv,
    g: usize,
    d: usize,
    slots: &[usize],
    keys: &mut Vec<f32>,
    values: &mut Vec<f32>,
) {
    let (tiles, vals) = (kv.keys(g), kv.values(g));
    keys.clear();
    values.clear();
    for &p in slots {
        // Key tiles are `[head_dim][KEY_TILE]` per KEY_TILE positions.
        let base = (p / KEY_TILE) * d * KEY_TILE + p % KEY_TILE;
        keys.extend((0..d).map(|c| half::f16::from_bits(tiles[base + c * KEY_TILE]).to_f32()));
        values.extend(
            vals[p * d..(p + 1) * d]
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32()),
        );
    }
}

/// q·k in 16 partial sums (a single running sum is one dependent add per
/// element).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut part = [0f32; 16];
    let (ca, ra) = a.as_chunks::<16>();
    let (cb, rb) = b.as_chunks::<16>();
    for (x, y) in ca.iter().zip(cb) {
        for ((p, &x), &y) in part.iter_mut().zip(x).zip(y) {
            *p += x * y;
        }
    }
    part.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}
