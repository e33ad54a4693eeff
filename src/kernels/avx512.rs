//! AVX-512 VNNI kernels over the tiled layout.
//!
//! For each 16-row tile and block, the weight codes are loaded and unpacked
//! once into eight 512-bit registers (4 K-values × 16 rows each) and then
//! used by `vpdpbusd` for every activation row of a group; the scale work
//! per block is vectorised over the 16 rows. Activation rows are processed
//! in groups small enough that all accumulators stay in registers (the group
//! loop is unrolled at compile time through the `G` parameter).
//!
//! # Safety (every helper here)
//! As in the AVX2 path: the CPU has AVX-512 F/BW/VL/VNNI (`kernels::isa()`
//! chose this path from `is_x86_feature_detected!`), every record offset is
//! inside one of the `m.blocks` records of a tile [`Tiles::tile_ptr`] placed
//! inside the matrix, every activation offset inside `QAct`'s `act.n` rows,
//! and stores are masked to the tile's valid rows.

// Indexed loops over register arrays read closer to the instruction stream.
#![allow(clippy::needless_range_loop)]

use super::act::QAct;
use super::layout::{off, Fmt, TILE};
use super::unaligned::load_at;
use super::{prefetch_rec, Tiles};
use std::arch::x86_64::*;
use std::ops::Range;

/// Most activation rows per group. The K-quants keep a second set of
/// (integer) accumulators; Q4_K still fits 16 rows without harmful spills
/// (matmul bench, one process, 0.5B's down projection: N = 12..32 took
/// 0.84–0.89× the time of 8-row groups), Q6_K's unpacking needs more
/// registers and 16-row groups measured no better (0.88–1.14×).
const MAXG_32: usize = 16;
const MAXG_Q4K: usize = 16;
const MAXG_Q6K: usize = 8;

/// Per-call data the kernels share.
struct Ctx<'a> {
    act: &'a QAct,
    nb: usize,
    y: *mut f32,
    /// Floats from one output row to the next.
    ldy: usize,
    col0: usize,
    mask: __mmask16,
    /// Prefetch distance in bytes, 0 for none.
    pf: usize,
    /// Prefetch into L1 rather than L2.
    pf_l1: bool,
}

/// Runs `$body` with `$g` = 0, 1, .. `$G - 1` as constants: unrolled so the
/// per-row accumulators are registers (a loop would keep them in memory).
macro_rules! for_g {
    ($G:expr, |$g:ident| $body:block) => {
        for_g!(@ $G, $g, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    };
    (@ $G:expr, $g:ident, $body:block, $($i:literal)*) => {
        $( if $i < $G { let $g: usize = $i; $body } )*
    };
}

// Pointer arithmetic is `wrapping_*` and every access goes through
// `at` (`base[index]`, see `unaligned`): the tests and benchmarks build with
// overflow and UB checks, which would otherwise sit in the inner loops.
// Every access stays inside the buffers by construction.

/// Element `i` of type `T` from `base` (any pointer type).
#[inline(always)]
unsafe fn at<T: Copy, P>(base: *const P, i: usize) -> T {
    load_at::<T>(base as *const u8, i)
}

/// Unpacks 4 nibble chunks, chunks `c0..c0 + 4` of `rec`, into 8 code chunks.
#[inline(always)]
unsafe fn nibbles(rec: *const u8, c0: usize, w: &mut [__m512i; 8], lo: __m512i) {
    for p in 0..4 {
        let v = at::<__m512i, _>(rec, c0 + p);
        w[p] = _mm512_and_si512(v, lo);
        w[p + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), lo);
    }
}

/// 16 f16 scales at 32-byte slot `i` of `rec`.
#[inline(always)]
unsafe fn f16x16(rec: *const u8, i: usize) -> __m512 {
    _mm512_cvtph_ps(at::<__m256i, _>(rec, i))
}

/// Groups of up to this many rows split each row's 8 `vpdpbusd` into two
/// chains. Measured on the matmul benchmark within one process (cost of N = 8
/// over N = 7, 32-value formats): one chain 1.01–1.45, two chains 0.96–1.14;
/// from 9 rows on, the rows' own chains keep the unit busy and one chain per
/// row is faster (Q8_0 LM head at N = 16: 1.13–1.20 × N = 8, against
/// 1.59–1.76 split).
const DOT_SPLIT_ROWS_32: usize = 8;
/// The K-quants' sub-block loop has more independent work: there one chain
/// at 8 rows measured the same as two, and the split stays below 8.
const DOT_SPLIT_ROWS_K: usize = 7;
/// Q6_K with fewer rows than this runs four chains of two per 32 values.
const Q6K_FOUR_CHAINS_BELOW: usize = 4;

/// Σ over 8 chunks of `vpdpbusd` for one activation row whose 32 values are
/// i32 elements `8 r..8 r + 8` of `a`, on top of `init`. Two chains when
/// `split` (few rows), so the latency of one chain does not bound the loop.
#[inline(always)]
unsafe fn dot8(init: __m512i, w: &[__m512i; 8], a: *const i8, r: usize, split: bool) -> __m512i {
    let x = |c: usize| _mm512_set1_epi32(at::<i32, _>(a, 8 * r + c));
    if split {
        let mut s0 = init;
        let mut s1 = _mm512_setzero_si512();
        for c in 0..4 {
            s0 = _mm512_dpbusd_epi32(s0, w[c], x(c));
            s1 = _mm512_dpbusd_epi32(s1, w[c + 4], x(c + 4));
        }
        _mm512_add_epi32(s0, s1)
    } else {
        let mut s = init;
        for c in 0..8 {
            s = _mm512_dpbusd_epi32(s, w[c], x(c));
        }
        s
    }
}

#[inline(always)]
unsafe fn store<const G: usize>(cx: &Ctx, n0: usize, acc: &[__m512; G]) {
    for (g, &a) in acc.iter().enumerate() {
        let at = (n0 + g).wrapping_mul(cx.ldy).wrapping_add(cx.col0);
        _mm512_mask_storeu_ps(cx.y.wrapping_add(at), cx.mask, a);
    }
}

/// A 32-value block format.
trait Blk32 {
    const FMT: Fmt;
    const D: usize;
    unsafe fn weights(rec: *const u8, w: &mut [__m512i; 8]);
}

struct Q40;
struct Q41;
struct Q50;
struct Q80;

impl Blk32 for Q40 {
    const FMT: Fmt = Fmt::Q4_0;
    const D: usize = off::Q4_D;
    #[inline(always)]
    unsafe fn weights(rec: *const u8, w: &mut [__m512i; 8]) {
        nibbles(rec, 0, w, _mm512_set1_epi8(15));
    }
}

impl Blk32 for Q41 {
    const FMT: Fmt = Fmt::Q4_1;
    const D: usize = off::Q4_D;
    #[inline(always)]
    unsafe fn weights(rec: *const u8, w: &mut [__m512i; 8]) {
        nibbles(rec, 0, w, _mm512_set1_epi8(15));
    }
}

impl Blk32 for Q50 {
    const FMT: Fmt = Fmt::Q5_0;
    const D: usize = off::Q5_D;
    #[inline(always)]
    unsafe fn weights(rec: *const u8, w: &mut [__m512i; 8]) {
        nibbles(rec, 0, w, _mm512_set1_epi8(15));
        let sixteen = _mm512_set1_epi8(16);
        for (c, wc) in w.iter_mut().enumerate() {
            let k: __mmask64 = at::<u64, _>(rec, off::Q5_H / 8 + c);
            *wc = _mm512_mask_add_epi8(*wc, k, *wc, sixteen);
        }
    }
}

impl Blk32 for Q80 {
    const FMT: Fmt = Fmt::Q8_0;
    const D: usize = off::Q8_D;
    #[inline(always)]
    unsafe fn weights(rec: *const u8, w: &mut [__m512i; 8]) {
        for (c, wc) in w.iter_mut().enumerate() {
            *wc = at::<__m512i, _>(rec, c);
        }
    }
}

/// Pointers to the activation data of block 0 for rows `n0..`, and the
/// stride from one block to the next (in elements of each array).
struct ActPtrs {
    qs: *const i8,
    d: *const f32,
    bias: *const i32,
    fsum: *const f32,
    bsum: *const i16,
    stride: usize,
}

impl ActPtrs {
    #[inline(always)]
    fn new(act: &QAct, n0: usize) -> ActPtrs {
        ActPtrs {
            qs: act.qs.as_ptr().wrapping_add(n0 * act.bs),
            d: act.d.as_ptr().wrapping_add(n0),
            // Q6_K keeps 16 biases per block, the 32-block formats one.
            bias: act
                .bias
                .as_ptr()
                .wrapping_add(n0 * if act.bs == 256 { 16 } else { 1 }),
            fsum: act.fsum.as_ptr().wrapping_add(n0),
            bsum: act.bsum32.as_ptr().wrapping_add(n0 * 8),
            stride: act.n,
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn k32<B: Blk32, const G: usize>(cx: &Ctx, w: *const u8, n0: usize) {
    let rec_bytes = B::FMT.rec_bytes();
    let has_min = B::FMT == Fmt::Q4_1;
    let p = ActPtrs::new(cx.act, n0);
    let mut acc = [_mm512_setzero_ps(); G];
    let mut rec = w;
    let (mut qs, mut d, mut bias, mut fsum) = (p.qs, p.d, p.bias, p.fsum);
    for _ in 0..cx.nb {
        prefetch_rec(rec, rec_bytes, cx.pf, cx.pf_l1);
        let mut wv = [_mm512_setzero_si512(); 8];
        B::weights(rec, &mut wv);
        let dw = f16x16(rec, B::D / 32);
        let mw = if has_min {
            f16x16(rec, off::Q4_1_M / 32)
        } else {
            _mm512_setzero_ps()
        };
        for_g!(G, |g| {
            let init = if has_min {
                _mm512_setzero_si512()
            } else {
                _mm512_set1_epi32(at::<i32, _>(bias, g))
            };
            let s = dot8(init, &wv, qs, g, G <= DOT_SPLIT_ROWS_32);
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(at::<f32, _>(d, g)));
            acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[g]);
            if has_min {
                acc[g] = _mm512_fmadd_ps(mw, _mm512_set1_ps(at::<f32, _>(fsum, g)), acc[g]);
            }
        });
        rec = rec.wrapping_add(rec_bytes);
        qs = qs.wrapping_add(32 * p.stride);
        d = d.wrapping_add(p.stride);
        bias = bias.wrapping_add(p.stride);
        fsum = fsum.wrapping_add(p.stride);
    }
    store::<G>(cx, n0, &acc);
}

/// The K-quants scale each sub-block's integer sum in float (convert, then
/// a fused multiply-add with the sub-block scale) rather than with an integer
/// multiply: `vpmulld` is two uops on the port `vpdpbusd` needs. Measured in
/// one process, the two versions alternated call by call with the weights
/// from memory: Q4_K (the 1.5B's gate|up) 4–8% faster at N = 4..16, Q6_K
/// 2–5%, equal at N = 1. The scalar reference sums the same way.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn kq4k<const G: usize>(cx: &Ctx, w: *const u8, n0: usize) {
    let rec_bytes = Fmt::Q4K.rec_bytes();
    let p = ActPtrs::new(cx.act, n0);
    let lo = _mm512_set1_epi8(15);
    let mut acc = [_mm512_setzero_ps(); G];
    let mut rec = w;
    let (mut qs, mut d, mut bsum) = (p.qs, p.d, p.bsum);
    for _ in 0..cx.nb {
        prefetch_rec(rec, rec_bytes, cx.pf, cx.pf_l1);
        let mut fsum = [_mm512_setzero_ps(); G];
        for j in 0..8 {
            let mut wv = [_mm512_setzero_si512(); 8];
            nibbles(rec, 4 * j, &mut wv, lo);
            let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(at::<__m128i, _>(
                rec,
                off::Q4K_SC / 16 + j,
            )));
            for_g!(G, |g| {
                // Row g's sub-block j: i32 elements 64 g + 8 j ..
                let s = dot8(
                    _mm512_setzero_si512(),
                    &wv,
                    qs,
                    8 * g + j,
                    G <= DOT_SPLIT_ROWS_K,
                );
                fsum[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, fsum[g]);
            });
        }
        let mut mins = [_mm512_setzero_si512(); 4];
        for (q, m) in mins.iter_mut().enumerate() {
            *m = _mm512_cvtepu8_epi16(at::<__m256i, _>(rec, off::Q4K_MIN / 32 + q));
        }
        let dw = f16x16(rec, off::Q4K_D / 32);
        let dmin = f16x16(rec, off::Q4K_DMIN / 32);
        for_g!(G, |g| {
            let mut ms = _mm512_setzero_si512();
            for (q, &m) in mins.iter().enumerate() {
                let pair = _mm512_set1_epi32(at::<i32, _>(bsum, 4 * g + q));
                ms = _mm512_dpwssd_epi32(ms, m, pair);
            }
            let da = _mm512_set1_ps(at::<f32, _>(d, g));
            acc[g] = _mm512_fmadd_ps(fsum[g], _mm512_mul_ps(dw, da), acc[g]);
            acc[g] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), _mm512_mul_ps(dmin, da), acc[g]);
        });
        rec = rec.wrapping_add(rec_bytes);
        qs = qs.wrapping_add(256 * p.stride);
        d = d.wrapping_add(p.stride);
        bsum = bsum.wrapping_add(8 * p.stride);
    }
    store::<G>(cx, n0, &acc);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn kq6k<const G: usize>(cx: &Ctx, w: *const u8, n0: usize) {
    let rec_bytes = Fmt::Q6K.rec_bytes();
    let p = ActPtrs::new(cx.act, n0);
    let lo = _mm512_set1_epi8(15);
    let hi = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); G];
    let mut rec = w;
    let (mut qs, mut d, mut bias) = (p.qs, p.d, p.bias);
    for _ in 0..cx.nb {
        prefetch_rec(rec, rec_bytes, cx.pf, cx.pf_l1);
        let mut fsum = [_mm512_setzero_ps(); G];
        for gr in 0..8 {
            let mut wv = [_mm512_setzero_si512(); 8];
            nibbles(rec, 4 * gr, &mut wv, lo);
            for h in 0..2 {
                let v = at::<__m512i, _>(rec, off::Q6K_QH / 64 + 2 * gr + h);
                // Bring bits 2p..2p+2 to bits 4..6 (16-bit shifts: the
                // bits crossing into the neighbour byte are masked off).
                let sh = [
                    _mm512_slli_epi16::<4>(v),
                    _mm512_slli_epi16::<2>(v),
                    v,
                    _mm512_srli_epi16::<2>(v),
                ];
                for q in 0..4 {
                    // w | (sh & 0x30)
                    wv[4 * h + q] = _mm512_ternarylogic_epi32::<0xF8>(wv[4 * h + q], sh[q], hi);
                }
            }
            let sc0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(at::<__m128i, _>(
                rec,
                off::Q6K_SC / 16 + 2 * gr,
            )));
            let sc1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(at::<__m128i, _>(
                rec,
                off::Q6K_SC / 16 + 2 * gr + 1,
            )));
            for_g!(G, |g| {
                // Row g's 32-value group gr: i32 elements 64 g + 8 gr ..
                let a = |c: usize| _mm512_set1_epi32(at::<i32, _>(qs, 64 * g + 8 * gr + c));
                let mut s0 = _mm512_set1_epi32(at::<i32, _>(bias, 16 * g + 2 * gr));
                let mut s1 = _mm512_set1_epi32(at::<i32, _>(bias, 16 * g + 2 * gr + 1));
                if G < Q6K_FOUR_CHAINS_BELOW {
                    // Few rows: four short chains instead of two long ones
                    // (the loop is bound by `vpdpbusd` latency, not issue).
                    let mut t0 = _mm512_setzero_si512();
                    let mut t1 = _mm512_setzero_si512();
                    for c in [0, 2] {
                        s0 = _mm512_dpbusd_epi32(s0, wv[c], a(c));
                        t0 = _mm512_dpbusd_epi32(t0, wv[c + 1], a(c + 1));
                        s1 = _mm512_dpbusd_epi32(s1, wv[c + 4], a(c + 4));
                        t1 = _mm512_dpbusd_epi32(t1, wv[c + 5], a(c + 5));
                    }
                    s0 = _mm512_add_epi32(s0, t0);
                    s1 = _mm512_add_epi32(s1, t1);
                } else {
                    for c in 0..4 {
                        s0 = _mm512_dpbusd_epi32(s0, wv[c], a(c));
                        s1 = _mm512_dpbusd_epi32(s1, wv[c + 4], a(c + 4));
                    }
                }
                fsum[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), sc0, fsum[g]);
                fsum[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), sc1, fsum[g]);
            });
        }
        let dw = f16x16(rec, off::Q6K_D / 32);
        for_g!(G, |g| {
            let da = _mm512_set1_ps(at::<f32, _>(d, g));
            acc[g] = _mm512_fmadd_ps(fsum[g], _mm512_mul_ps(dw, da), acc[g]);
        });
        rec = rec.wrapping_add(rec_bytes);
        qs = qs.wrapping_add(256 * p.stride);
        d = d.wrapping_add(p.stride);
        bias = bias.wrapping_add(16 * p.stride);
    }
    store::<G>(cx, n0, &acc);
}

macro_rules! by_group {
    ($gs:expr, $f:ident $(::<$t:ty>)?, $($arg:expr),*) => {
        match $gs {
            1 => $f::<$($t,)? 1>($($arg),*),
            2 => $f::<$($t,)? 2>($($arg),*),
            3 => $f::<$($t,)? 3>($($arg),*),
            4 => $f::<$($t,)? 4>($($arg),*),
            5 => $f::<$($t,)? 5>($($arg),*),
            6 => $f::<$($t,)? 6>($($arg),*),
            7 => $f::<$($t,)? 7>($($arg),*),
            8 => $f::<$($t,)? 8>($($arg),*),
            9 => $f::<$($t,)? 9>($($arg),*),
            10 => $f::<$($t,)? 10>($($arg),*),
            11 => $f::<$($t,)? 11>($($arg),*),
            12 => $f::<$($t,)? 12>($($arg),*),
            13 => $f::<$($t,)? 13>($($arg),*),
            14 => $f::<$($t,)? 14>($($arg),*),
            15 => $f::<$($t,)? 15>($($arg),*),
            _ => $f::<$($t,)? 16>($($arg),*),
        }
    };
}

/// `by_group!` up to 8 rows (`MAXG_Q6K`).
macro_rules! by_group_k {
    ($gs:expr, $f:ident, $($arg:expr),*) => {
        match $gs {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            _ => $f::<8>($($arg),*),
        }
    };
}

/// Computes the output columns of `tiles` for all activation rows: column j
/// of row i goes to `y[i × ldy + j]`.
///
/// # Safety
/// The CPU must support the features of [`super::Isa::Avx512`]; `y` must
/// hold `act.n` rows `ldy ≥ m.out` apart, of which this call writes only
/// the columns of `tiles`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(crate) unsafe fn run(m: &Tiles, act: &QAct, tiles: Range<usize>, y: *mut f32, ldy: usize) {
    let n = act.n;
    let maxg = match m.fmt {
        Fmt::Q4K => MAXG_Q4K,
        Fmt::Q6K => MAXG_Q6K,
        _ => MAXG_32,
    };
    let groups = n.div_ceil(maxg);
    let per = n.div_ceil(groups.max(1));
    let pf = super::prefetch_distance(n);
    // With a few rows or more, the 32-value kernels keep more of the stream
    // in flight when they prefetch into L1 (matmul of the 0.5B's shapes
    // from memory, hints alternated call by call in one process: gate|up
    // Q5_0 N = 3..8 5–7% faster, the Q8_0 LM head N = 4..16 3–8%; at one
    // row 2–4% slower). The K-quants' records (36–52 lines per 16 rows)
    // measured 3–4% slower with it at every N.
    let pf_l1 = !matches!(m.fmt, Fmt::Q4K | Fmt::Q6K) && super::prefetch_to_l1(n);
    for t in tiles {
        let lanes = TILE.min(m.out - t * TILE);
        let mut cx = Ctx {
            act,
            nb: m.blocks,
            y,
            ldy,
            col0: t * TILE,
            mask: ((1u32 << lanes) - 1) as __mmask16,
            pf,
            pf_l1,
        };
        let w = m.tile_ptr(t);
        let mut n0 = 0;
        while n0 < n {
            let gs = per.min(n - n0);
            let cx_ref = &cx;
            match m.fmt {
                Fmt::Q4_0 => by_group!(gs, k32::<Q40>, cx_ref, w, n0),
                Fmt::Q4_1 => by_group!(gs, k32::<Q41>, cx_ref, w, n0),
                Fmt::Q5_0 => by_group!(gs, k32::<Q50>, cx_ref, w, n0),
                Fmt::Q8_0 => by_group!(gs, k32::<Q80>, cx_ref, w, n0),
                Fmt::Q4K => by_group!(gs, kq4k, cx_ref, w, n0),
                Fmt::Q6K => by_group_k!(gs, kq6k, cx_ref, w, n0),
            }
            n0 += gs;
            // Later groups re-read the tile from cache.
            cx.pf = 0;
        }
    }
}
