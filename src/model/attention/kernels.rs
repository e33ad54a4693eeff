//! The attention's inner loops: scores of query rows against key tiles,
//! probability-weighted sums of value rows, each lane one fused multiply-add
//! chain in position order whatever the grouping (what keeps a token's
//! result independent of the rows it is computed with).
//!
//! # Safety (every function here)
//! They run [`F32x16`] operations, so the caller must have picked `V` for
//! a CPU that has its instructions (`attention::forward` dispatches on the
//! detected ISA), and they read and write through raw pointers into the
//! query, KV-cache and output buffers of one [`super::Call`]: the offsets
//! they are given (rows `r0..r1`, key tiles, head `g`) must lie inside those
//! buffers, which `attention::forward` checks once per call (shapes and
//! lengths) before it splits the work into tasks. Whole 16-float chunks
//! only; the buffers' lengths are multiples of 16 (`LANES`).

use super::{PV_ROWS, QK_ROWS};
use crate::kernels::unaligned::load_at;
use crate::model::kv_cache::KEY_TILE;
use crate::model::lanes::{F32x16, LANES};

/// [`qk`] for rows `r0..r1` by groups of up to QK_ROWS.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn score_groups<V: F32x16, K: Widen>(
    q: &[f32],
    r0: usize,
    r1: usize,
    kb: &[K],
    d: usize,
    stride: usize,
    scale: f32,
    s: &mut [f32],
) {
    let len = kb.len() / d;
    let mut r = r0;
    while r < r1 {
        let take = (r1 - r).min(QK_ROWS);
        let qg = &q[r * d..(r + take) * d];
        let o = (r - r0) * stride;
        let s = &mut s[o..o + (take - 1) * stride + len];
        match take {
            8 => qk::<V, 8, K>(qg, kb, d, stride, scale, s),
            7 => qk::<V, 7, K>(qg, kb, d, stride, scale, s),
            6 => qk::<V, 6, K>(qg, kb, d, stride, scale, s),
            5 => qk::<V, 5, K>(qg, kb, d, stride, scale, s),
            4 => qk::<V, 4, K>(qg, kb, d, stride, scale, s),
            3 => qk::<V, 3, K>(qg, kb, d, stride, scale, s),
            2 => qk::<V, 2, K>(qg, kb, d, stride, scale, s),
            _ => qk::<V, 1, K>(qg, kb, d, stride, scale, s),
        }
        r += take;
    }
}

/// [`pv`] for `rows` rows by groups of up to PV_ROWS.
#[inline(always)]
pub(super) unsafe fn weigh_groups<V: F32x16, K: Widen>(
    p: &[f32],
    stride: usize,
    rows: usize,
    vb: &[K],
    d: usize,
    acc: &mut [f32],
) {
    let len = vb.len() / d;
    let mut r = 0;
    while r < rows {
        let take = (rows - r).min(PV_ROWS);
        let s = &p[r * stride..(r + take - 1) * stride + len];
        let a = &mut acc[r * d..(r + take) * d];
        match take {
            4 => pv::<V, 4, K>(s, stride, vb, d, a),
            3 => pv::<V, 3, K>(s, stride, vb, d, a),
            2 => pv::<V, 2, K>(s, stride, vb, d, a),
            _ => pv::<V, 1, K>(s, stride, vb, d, a),
        }
        r += take;
    }
}

/// `a += Σ_t e[t] · values[slots[t]]` (value rows `d` apart, f16), each
/// lane one fused multiply-add chain in the order given: 64 dimensions at a
/// time held in registers over all the entries (a prefill chunk's rows have
/// hundreds of ancestors), then 16, then the rest.
#[inline(always)]
pub(super) unsafe fn add_values<V: F32x16>(
    a: &mut [f32],
    e: &[f32],
    slots: &[usize],
    values: &[u16],
    d: usize,
) {
    debug_assert!(e.len() == slots.len() && a.len() == d);
    let mut c0 = 0;
    while c0 + 4 * LANES <= d {
        add_values_slices::<V, 4>(a, e, slots, values, d, c0);
        c0 += 4 * LANES;
    }
    while c0 + LANES <= d {
        add_values_slices::<V, 1>(a, e, slots, values, d, c0);
        c0 += LANES;
    }
    for (&x, &j) in e.iter().zip(slots) {
        for c in c0..d {
            a[c] = x.mul_add(values[j * d + c].widen(), a[c]);
        }
    }
}

/// [`add_values`] for the `W` 16-wide slices from dimension `c0`.
#[inline(always)]
unsafe fn add_values_slices<V: F32x16, const W: usize>(
    a: &mut [f32],
    e: &[f32],
    slots: &[usize],
    values: &[u16],
    d: usize,
    c0: usize,
) {
    let ap = a.as_mut_ptr().add(c0);
    let mut acc: [V; W] = std::array::from_fn(|l| V::load(ap.add(l * LANES)));
    for (&x, &j) in e.iter().zip(slots) {
        let x = V::splat(x);
        let vp = values.as_ptr().add(j * d + c0);
        for (l, acc) in acc.iter_mut().enumerate() {
            *acc = acc.fma(x, V::load_f16(vp.add(l * LANES)));
        }
    }
    for (l, acc) in acc.iter().enumerate() {
        acc.store(ap.add(l * LANES));
    }
}

/// `a += x · v` lane by lane (fused).
#[inline(always)]
pub(super) unsafe fn add_scaled<V: F32x16>(a: &mut [f32], x: f32, v: &[f32]) {
    let d = a.len();
    let xs = V::splat(x);
    let mut c0 = 0;
    while c0 + LANES <= d {
        let ap = a.as_mut_ptr().add(c0);
        V::load(ap).fma(xs, V::load(v.as_ptr().add(c0))).store(ap);
        c0 += LANES;
    }
    for c in c0..d {
        a[c] = x.mul_add(v[c], a[c]);
    }
}

/// A key or value element: f16 bits as stored in the cache, or f32 once a
/// block has been widened for many rows (each 16-lane conversion then
/// serves all of them instead of costing two instructions per group).
pub(super) trait Widen: Copy {
    /// Read from the cache (worth prefetching ahead).
    const IN_CACHE: bool;
    fn widen(self) -> f32;
    /// 16 elements from `p`, widened.
    unsafe fn load16<V: F32x16>(p: *const Self) -> V;
}

impl Widen for f32 {
    const IN_CACHE: bool = false;
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn load16<V: F32x16>(p: *const f32) -> V {
        V::load(p)
    }
}

impl Widen for u16 {
    const IN_CACHE: bool = true;
    fn widen(self) -> f32 {
        half::f16::from_bits(self).to_f32()
    }
    #[inline(always)]
    unsafe fn load16<V: F32x16>(p: *const u16) -> V {
        V::load_f16(p)
    }
}

/// `dst = src` widened to f32, prefetching the cache ahead as the kernels do.
#[inline(always)]
pub(super) unsafe fn widen_block<V: F32x16>(src: &[u16], dst: &mut [f32], ahead: usize) {
    let mut i = 0;
    while i + LANES <= src.len() {
        if i % 32 == 0 {
            prefetch(src.as_ptr().wrapping_add(i + ahead));
        }
        V::load_f16(src.as_ptr().add(i)).store(dst.as_mut_ptr().add(i));
        i += LANES;
    }
    for j in i..src.len() {
        dst[j] = src[j].widen();
    }
}

// The two kernels below walk raw pointers with `wrapping_add` (every access
// stays inside the slices by the debug_asserts' bounds): the tests build
// with overflow and UB checks, which would otherwise sit in the inner loops.

/// `s[r][t*16 + l] = scale * Σ_c q[r][c] · key(t*16 + l)[c]`, one tile of 16
/// positions at a time for R rows: each lane is a plain fused multiply-add
/// chain over c, so a key's score does not depend on its lane or on what
/// else is in the tile.
#[inline(always)]
unsafe fn qk<V: F32x16, const R: usize, K: Widen>(
    q: &[f32],
    keys: &[K],
    d: usize,
    stride: usize,
    scale: f32,
    s: &mut [f32],
) {
    let tiles = keys.len() / (d * KEY_TILE);
    debug_assert!(q.len() >= R * d && s.len() >= (R - 1) * stride + tiles * KEY_TILE);
    let mut t = 0;
    // Two tiles at a time (each query value loaded once for both: the loop
    // was bound by loads, 9 per 8 multiply-adds; 2R + 2 registers at
    // R ≤ QK_ROWS), then the odd one.
    while t + 2 <= tiles {
        qk_tiles::<V, R, 2, K>(q, keys, d, stride, scale, s, t);
        t += 2;
    }
    while t < tiles {
        qk_tiles::<V, R, 1, K>(q, keys, d, stride, scale, s, t);
        t += 1;
    }
}

/// [`qk`] for the T tiles from tile `t`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn qk_tiles<V: F32x16, const R: usize, const T: usize, K: Widen>(
    q: &[f32],
    keys: &[K],
    d: usize,
    stride: usize,
    scale: f32,
    s: &mut [f32],
    t: usize,
) {
    let tile = d * KEY_TILE;
    let mut kp = keys.as_ptr().wrapping_add(t * tile);
    let mut acc = [[V::zero(); T]; R];
    // `q` is `[c][R]`: dimension c of every row at constant offsets.
    let mut qp = q.as_ptr() as *const u8;
    for _ in 0..d {
        if K::IN_CACHE {
            // The cache streams from memory (the weights evicted it): ask
            // for a later tile's line while this one is used.
            prefetch(kp.wrapping_add(KEY_PREFETCH_TILES * tile));
        }
        let k: [V; T] = std::array::from_fn(|u| K::load16::<V>(kp.wrapping_add(u * tile)));
        for (r, a) in acc.iter_mut().enumerate() {
            let x = V::splat(load_at::<f32>(qp, r));
            for (a, &k) in a.iter_mut().zip(&k) {
                *a = a.fma(x, k);
            }
        }
        kp = kp.wrapping_add(KEY_TILE);
        qp = qp.wrapping_add(R * 4);
    }
    let scale = V::splat(scale);
    let sp = s.as_mut_ptr().wrapping_add(t * KEY_TILE);
    for (r, a) in acc.iter().enumerate() {
        for (u, a) in a.iter().enumerate() {
            a.mul(scale)
                .store(sp.wrapping_add(r * stride + u * KEY_TILE));
        }
    }
}

/// `acc[r] += Σ_j p[r][j] · values[j]` over every value row given, in
/// position order: 64 output dimensions at a time (R × 4 accumulators, each
/// value row loaded once for all R rows), then 16 at a time, then the rest.
/// Each output lane is one multiply-add chain in position order whatever
/// the grouping.
#[inline(always)]
unsafe fn pv<V: F32x16, const R: usize, K: Widen>(
    p: &[f32],
    stride: usize,
    values: &[K],
    d: usize,
    acc: &mut [f32],
) {
    let rows = values.len() / d;
    debug_assert!(p.len() >= (R - 1) * stride + rows && acc.len() >= R * d);
    let pbase = p.as_ptr() as *const u8;
    let poff: [usize; R] = std::array::from_fn(|r| r * stride);
    let mut c0 = 0;
    while c0 + 4 * LANES <= d {
        pv_slices::<V, R, 4, K>(pbase, &poff, values, rows, d, acc, c0);
        c0 += 4 * LANES;
    }
    while c0 + LANES <= d {
        pv_slices::<V, R, 1, K>(pbase, &poff, values, rows, d, acc, c0);
        c0 += LANES;
    }
    // head_dim not a multiple of 16: the rest, same arithmetic.
    if c0 < d {
        for j in 0..rows {
            for r in 0..R {
                let x = p[r * stride + j];
                for c in c0..d {
                    acc[r * d + c] = x.mul_add(values[j * d + c].widen(), acc[r * d + c]);
                }
            }
        }
    }
}

/// [`pv`] for the `W` 16-wide output slices from dimension `c0`: R × W
/// accumulators, each value row's slices loaded once for all R rows.
#[inline(always)]
unsafe fn pv_slices<V: F32x16, const R: usize, const W: usize, K: Widen>(
    pbase: *const u8,
    poff: &[usize; R],
    values: &[K],
    rows: usize,
    d: usize,
    acc: &mut [f32],
    c0: usize,
) {
    debug_assert!(c0 + W * LANES <= d && acc.len() >= R * d);
    let ap = acc.as_mut_ptr();
    let mut a = [[V::zero(); W]; R];
    for (r, ar) in a.iter_mut().enumerate() {
        for (l, x) in ar.iter_mut().enumerate() {
            *x = V::load(ap.wrapping_add(r * d + c0 + l * LANES));
        }
    }
    let mut vp = values.as_ptr().wrapping_add(c0);
    for j in 0..rows {
        if K::IN_CACHE {
            // One prefetch per 64-byte line (32 f16 values).
            for l in (0..W).step_by(2) {
                prefetch(vp.wrapping_add(VALUE_PREFETCH_ROWS * d + l * LANES));
            }
        }
        let v: [V; W] = std::array::from_fn(|l| K::load16::<V>(vp.wrapping_add(l * LANES)));
        for (ar, &o) in a.iter_mut().zip(poff) {
            let x = V::splat(load_at::<f32>(pbase, o.wrapping_add(j)));
            for (acc, &v) in ar.iter_mut().zip(&v) {
                *acc = acc.fma(x, v);
            }
        }
        vp = vp.wrapping_add(d);
    }
    for (r, ar) in a.iter().enumerate() {
        for (l, x) in ar.iter().enumerate() {
            x.store(ap.wrapping_add(r * d + c0 + l * LANES));
        }
    }
}

/// How far ahead the cache is prefetched. It streams from DRAM (the weights
/// evicted it), and a line must be asked for ~100 ns (a few hundred cycles of
/// multiply-adds) before it is used; one tile or a few rows ahead left the
/// loops waiting on memory.
pub(super) const KEY_PREFETCH_TILES: usize = 4;
pub(super) const VALUE_PREFETCH_ROWS: usize = 48;

/// A hint to fetch the line at `p` (never faults, so `p` may run past the end).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch instructions do not access memory architecturally.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
