//! AVX2 kernels over the tiled layout, for x86-64 CPUs without AVX-512.
//!
//! Same structure as the AVX-512 path, one 8-row half-tile at a time (a
//! 64-byte chunk holds rows 0..8 in its first 32 bytes): weights unpacked
//! once per block and reused by every activation row of a group. Products
//! use `vpmaddubsw` (u8 × i8 → saturating i16 pairs) and `vpmaddwd` with
//! ones; a few products are summed in i16 first where the code range makes
//! that overflow-free. Q8_0's codes span 0..255 and would saturate, so it
//! goes through the sign trick on the signed values instead.

//! # Safety (every helper here)
//! Two obligations, both met by [`run`]'s callers: the CPU has AVX2, FMA
//! and F16C (`kernels::isa()` chose this path from `is_x86_feature_detected!`),
//! and every offset a helper reads at lies inside the tile's records or the
//! activation buffers: `run` walks exactly `m.blocks` records of a tile
//! that [`Tiles::tile_ptr`] places inside the matrix, and `QAct` holds
//! `act.n` rows of `m.blocks` blocks each. Stores are masked to the tile's
//! valid rows (`lanes`). Loads go through `kernels::unaligned`.

// Indexed loops over register arrays read closer to the instruction stream.
#![allow(clippy::needless_range_loop)]

use super::act::QAct;
use super::layout::{off, Fmt, TILE};
use super::unaligned::load_at;
use super::{prefetch_rec, Tiles};
use std::arch::x86_64::*;
use std::ops::Range;

/// Most activation rows per group (16 registers only).
const MAXG: usize = 4;

struct Ctx<'a> {
    act: &'a QAct,
    nb: usize,
    y: *mut f32,
    /// Floats from one output row to the next.
    ldy: usize,
    col0: usize,
    /// Valid rows in this half-tile (1..=8).
    lanes: usize,
    /// 0 or 1: which 8 rows of the tile.
    half: usize,
    /// Prefetch distance in bytes, 0 for none.
    pf: usize,
}

macro_rules! for_g {
    ($G:expr, |$g:ident| $body:block) => {
        for_g!(@ $G, $g, $body, 0 1 2 3)
    };
    (@ $G:expr, $g:ident, $body:block, $($i:literal)*) => {
        $( if $i < $G { let $g: usize = $i; $body } )*
    };
}

// Pointer arithmetic is `wrapping_*` and accesses are `base[index]` as in
// the AVX-512 path (debug builds check overflow and raw dereferences).

/// Element `i` of type `T` from `base` (any pointer type).
#[inline(always)]
unsafe fn at<T: Copy, P>(base: *const P, i: usize) -> T {
    load_at::<T>(base as *const u8, i)
}

/// i32 element `i` of `base`, broadcast.
#[inline(always)]
unsafe fn bcast_i32<P>(base: *const P, i: usize) -> __m256i {
    _mm256_set1_epi32(at::<i32, P>(base, i))
}

#[inline(always)]
unsafe fn bcast_f32(base: *const f32, i: usize) -> __m256 {
    _mm256_set1_ps(at::<f32, f32>(base, i))
}

/// 8 f16 scales at 16-byte slot `i` of `rec`.
#[inline(always)]
unsafe fn f16x8(rec: *const u8, i: usize) -> __m256 {
    _mm256_cvtph_ps(at::<__m128i, u8>(rec, i))
}

/// Unpacks this half of 4 nibble chunks (64-byte chunks `c0..c0 + 4` of
/// `rec`) into 8 code chunks.
#[inline(always)]
unsafe fn nibbles(rec: *const u8, c0: usize, half: usize, w: &mut [__m256i; 8]) {
    let lo = _mm256_set1_epi8(15);
    for p in 0..4 {
        let v = at::<__m256i, u8>(rec, 2 * (c0 + p) + half);
        w[p] = _mm256_and_si256(v, lo);
        w[p + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), lo);
    }
}

/// Σ codes × activations over 8 chunks (4 K-values × 8 rows each) against
/// the 32 activation values at i32 elements `8 r..8 r + 8` of `a`; `GRP`
/// chunk products are summed in i16 first, then pairs of them to i32 by
/// `vpmaddwd` with `mul` (ones, or a per-row i16 factor in both halves of
/// each row's lane: a sub-block scale applied for free, where `vpmulld` on
/// the sums would cost a slow multiply per sub-block and row group).
#[inline(always)]
unsafe fn dot8<const GRP: usize>(
    w: &[__m256i; 8],
    a: *const i8,
    r: usize,
    mul: __m256i,
) -> __m256i {
    let mut s = _mm256_setzero_si256();
    let mut c0 = 0;
    while c0 < 8 {
        let mut p = _mm256_maddubs_epi16(w[c0], bcast_i32(a, 8 * r + c0));
        for c in c0 + 1..c0 + GRP {
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w[c], bcast_i32(a, 8 * r + c)));
        }
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, mul));
        c0 += GRP;
    }
    s
}

/// Like [`dot8`] for signed weights (Q8_0): |w| × (a with w's sign).
#[inline(always)]
unsafe fn dot8_signed(w: &[__m256i; 8], a: *const i8, r: usize) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let mut s = _mm256_setzero_si256();
    for (c, &wc) in w.iter().enumerate() {
        let p = _mm256_maddubs_epi16(
            _mm256_abs_epi8(wc),
            _mm256_sign_epi8(bcast_i32(a, 8 * r + c), wc),
        );
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
    }
    s
}

/// 4 chunks of 6-bit codes against i32 elements `e..e + 4` of `a`
/// (products ≤ 2·63·127 per i16, so pairs are safe).
#[inline(always)]
unsafe fn dot4(w: &[__m256i], a: *const i8, e: usize) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let p0 = _mm256_add_epi16(
        _mm256_maddubs_epi16(w[0], bcast_i32(a, e)),
        _mm256_maddubs_epi16(w[1], bcast_i32(a, e + 1)),
    );
    let p1 = _mm256_add_epi16(
        _mm256_maddubs_epi16(w[2], bcast_i32(a, e + 2)),
        _mm256_maddubs_epi16(w[3], bcast_i32(a, e + 3)),
    );
    _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones))
}

/// Four chunks' worth of a 32-bit mask, one bit per byte, as `value` bytes.
#[inline(always)]
unsafe fn bit_bytes(bits: u32, value: __m256i) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
    _mm256_and_si256(set, value)
}

#[inline(always)]
unsafe fn store<const G: usize>(cx: &Ctx, n0: usize, acc: &[__m256; G]) {
    let lanes = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(cx.lanes as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    for (g, &a) in acc.iter().enumerate() {
        let at = (n0 + g)
            .wrapping_mul(cx.ldy)
            .wrapping_add(cx.col0 + 8 * cx.half);
        _mm256_maskstore_ps(cx.y.wrapping_add(at), lanes, a);
    }
}

/// Activation pointers for rows `n0..` at block 0 (see the AVX-512 path).
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

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k32<const G: usize>(fmt: Fmt, cx: &Ctx, w: *const u8, n0: usize) {
    let rec_bytes = fmt.rec_bytes();
    let h = cx.half;
    let p = ActPtrs::new(cx.act, n0);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut rec = w;
    let (mut qs, mut d, mut bias, mut fsum) = (p.qs, p.d, p.bias, p.fsum);
    let ones = _mm256_set1_epi16(1);
    let d_off = match fmt {
        Fmt::Q4_0 | Fmt::Q4_1 => off::Q4_D,
        Fmt::Q5_0 => off::Q5_D,
        _ => off::Q8_D,
    };
    for _ in 0..cx.nb {
        prefetch_rec(rec, rec_bytes, cx.pf, false);
        let mut wv = [_mm256_setzero_si256(); 8];
        if fmt == Fmt::Q8_0 {
            let flip = _mm256_set1_epi8(-128);
            for (c, wc) in wv.iter_mut().enumerate() {
                *wc = _mm256_xor_si256(at::<__m256i, u8>(rec, 2 * c + h), flip);
            }
        } else {
            nibbles(rec, 0, h, &mut wv);
        }
        if fmt == Fmt::Q5_0 {
            let sixteen = _mm256_set1_epi8(16);
            for (c, wc) in wv.iter_mut().enumerate() {
                let bits = at::<u32, u8>(rec, off::Q5_H / 4 + 2 * c + h);
                *wc = _mm256_or_si256(*wc, bit_bytes(bits, sixteen));
            }
        }
        let dw = f16x8(rec, d_off / 16 + h);
        let mw = if fmt == Fmt::Q4_1 {
            f16x8(rec, off::Q4_1_M / 16 + h)
        } else {
            _mm256_setzero_ps()
        };
        for_g!(G, |g| {
            let s = match fmt {
                Fmt::Q8_0 => dot8_signed(&wv, qs, g),
                Fmt::Q4_1 => dot8::<4>(&wv, qs, g, ones),
                _ => _mm256_add_epi32(dot8::<4>(&wv, qs, g, ones), bcast_i32(bias, g)),
            };
            let scale = _mm256_mul_ps(dw, bcast_f32(d, g));
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[g]);
            if fmt == Fmt::Q4_1 {
                acc[g] = _mm256_fmadd_ps(mw, bcast_f32(fsum, g), acc[g]);
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

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kq4k<const G: usize>(cx: &Ctx, w: *const u8, n0: usize) {
    let rec_bytes = Fmt::Q4K.rec_bytes();
    let h = cx.half;
    let p = ActPtrs::new(cx.act, n0);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut rec = w;
    let (mut qs, mut d, mut bsum) = (p.qs, p.d, p.bsum);
    for _ in 0..cx.nb {
        prefetch_rec(rec, rec_bytes, cx.pf, false);
        let mut isum = [_mm256_setzero_si256(); G];
        for j in 0..8 {
            let mut wv = [_mm256_setzero_si256(); 8];
            nibbles(rec, 4 * j, h, &mut wv);
            let sc = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(at::<i64, u8>(
                rec,
                off::Q4K_SC / 8 + 2 * j + h,
            )));
            // Each row's 6-bit scale in both i16 halves of its lane. Bounds:
            // an i16 sum of 4 chunk products is ≤ 4·2·15·128 = 15360, times
            // a scale ≤ 63, twice: < 2^21 per lane, < 2^25 over 8 sub-blocks.
            let sc16 = _mm256_or_si256(sc, _mm256_slli_epi32::<16>(sc));
            for_g!(G, |g| {
                let s = dot8::<4>(&wv, qs, 8 * g + j, sc16);
                isum[g] = _mm256_add_epi32(isum[g], s);
            });
        }
        let dw = f16x8(rec, off::Q4K_D / 16 + h);
        let dmin = f16x8(rec, off::Q4K_DMIN / 16 + h);
        for_g!(G, |g| {
            let mut ms = _mm256_setzero_si256();
            for q in 0..4 {
                let m = _mm256_cvtepu8_epi16(at::<__m128i, u8>(rec, off::Q4K_MIN / 16 + 2 * q + h));
                ms = _mm256_add_epi32(ms, _mm256_madd_epi16(m, bcast_i32(bsum, 4 * g + q)));
            }
            let da = bcast_f32(d, g);
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[g]), _mm256_mul_ps(dw, da), acc[g]);
            acc[g] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_mul_ps(dmin, da), acc[g]);
        });
        rec = rec.wrapping_add(rec_bytes);
        qs = qs.wrapping_add(256 * p.stride);
        d = d.wrapping_add(p.stride);
        bsum = bsum.wrapping_add(8 * p.stride);
    }
    store::<G>(cx, n0, &acc);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kq6k<const G: usize>(cx: &Ctx, w: *const u8, n0: usize) {
    let rec_bytes = Fmt::Q6K.rec_bytes();
    let h = cx.half;
    let p = ActPtrs::new(cx.act, n0);
    let hi = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut rec = w;
    let (mut qs, mut d, mut bias) = (p.qs, p.d, p.bias);
    for _ in 0..cx.nb {
        prefetch_rec(rec, rec_bytes, cx.pf, false);
        let mut isum = [_mm256_setzero_si256(); G];
        for gr in 0..8 {
            let mut wv = [_mm256_setzero_si256(); 8];
            nibbles(rec, 4 * gr, h, &mut wv);
            for hh in 0..2 {
                let v = at::<__m256i, u8>(rec, off::Q6K_QH / 32 + 4 * gr + 2 * hh + h);
                let sh = [
                    _mm256_slli_epi16::<4>(v),
                    _mm256_slli_epi16::<2>(v),
                    v,
                    _mm256_srli_epi16::<2>(v),
                ];
                for q in 0..4 {
                    let c = 4 * hh + q;
                    wv[c] = _mm256_or_si256(wv[c], _mm256_and_si256(sh[q], hi));
                }
            }
            let sc_at = |j: usize| {
                _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(at::<i64, u8>(
                    rec,
                    off::Q6K_SC / 8 + 2 * j + h,
                )))
            };
            let (sc0, sc1) = (sc_at(2 * gr), sc_at(2 * gr + 1));
            for_g!(G, |g| {
                let e = 64 * g + 8 * gr;
                let s0 = _mm256_add_epi32(dot4(&wv[..4], qs, e), bcast_i32(bias, 16 * g + 2 * gr));
                let s1 = _mm256_add_epi32(
                    dot4(&wv[4..], qs, e + 4),
                    bcast_i32(bias, 16 * g + 2 * gr + 1),
                );
                let t = _mm256_add_epi32(_mm256_mullo_epi32(s0, sc0), _mm256_mullo_epi32(s1, sc1));
                isum[g] = _mm256_add_epi32(isum[g], t);
            });
        }
        let dw = f16x8(rec, off::Q6K_D / 16 + h);
        for_g!(G, |g| {
            let da = bcast_f32(d, g);
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[g]), _mm256_mul_ps(dw, da), acc[g]);
        });
        rec = rec.wrapping_add(rec_bytes);
        qs = qs.wrapping_add(256 * p.stride);
        d = d.wrapping_add(p.stride);
        bias = bias.wrapping_add(16 * p.stride);
    }
    store::<G>(cx, n0, &acc);
}

/// Computes the output columns of `tiles` for all activation rows (column j
/// of row i at `y[i × ldy + j]`).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `y` must hold `act.n` rows
/// `ldy ≥ m.out` apart, of which this call writes only the columns of
/// `tiles`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn run(m: &Tiles, act: &QAct, tiles: Range<usize>, y: *mut f32, ldy: usize) {
    let n = act.n;
    let groups = n.div_ceil(MAXG);
    let per = n.div_ceil(groups.max(1));
    let pf = super::prefetch_distance(n);
    for t in tiles {
        let rows = TILE.min(m.out - t * TILE);
        let w = m.tile_ptr(t);
        for half in 0..rows.div_ceil(8) {
            let mut cx = Ctx {
                act,
                nb: m.blocks,
                y,
                ldy,
                col0: t * TILE,
                lanes: (rows - 8 * half).min(8),
                half,
                // Only the first pass over the tile streams it from memory.
                pf: if half == 0 { pf } else { 0 },
            };
            let mut n0 = 0;
            while n0 < n {
                let gs = per.min(n - n0);
                let c = &cx;
                match (m.fmt, gs) {
                    (Fmt::Q4K, 1) => kq4k::<1>(c, w, n0),
                    (Fmt::Q4K, 2) => kq4k::<2>(c, w, n0),
                    (Fmt::Q4K, 3) => kq4k::<3>(c, w, n0),
                    (Fmt::Q4K, _) => kq4k::<4>(c, w, n0),
                    (Fmt::Q6K, 1) => kq6k::<1>(c, w, n0),
                    (Fmt::Q6K, 2) => kq6k::<2>(c, w, n0),
                    (Fmt::Q6K, 3) => kq6k::<3>(c, w, n0),
                    (Fmt::Q6K, _) => kq6k::<4>(c, w, n0),
                    (f, 1) => k32::<1>(f, c, w, n0),
                    (f, 2) => k32::<2>(f, c, w, n0),
                    (f, 3) => k32::<3>(f, c, w, n0),
                    (f, _) => k32::<4>(f, c, w, n0),
                }
                n0 += gs;
                cx.pf = 0;
            }
        }
    }
}
