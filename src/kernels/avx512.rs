//! AVX-512 VNNI kernels over the tiled layout.
//!
//! For each 16-row tile and block, the weight codes are loaded and unpacked
//! once into eight 512-bit registers (4 K-values × 16 rows each) and then
//! used by `vpdpbusd` for every activation row of a group; the scale work
//! per block is vectorised over the 16 rows. Activation rows are processed
//! in groups small enough that all accumulators stay in registers (the group
//! loop is unrolled at compile time through the `G` parameter).

use super::act::QAct;
use super::layout::{off, Fmt, TILE};
use super::Tiles;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

/// Most activation rows per group: 32-block formats / K-quants (these keep
/// a second set of integer accumulators).
const MAXG_32: usize = 16;
const MAXG_K: usize = 8;

struct Prefetch {
    /// Bytes ahead of the current record.
    dist: usize,
    /// Only from this many activation rows: with few rows the loop is
    /// memory bound and the hardware prefetcher does better alone.
    min_rows: usize,
}

fn prefetch_cfg() -> &'static Prefetch {
    static CFG: OnceLock<Prefetch> = OnceLock::new();
    CFG.get_or_init(|| {
        let env = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Prefetch {
            dist: env("TREESPEC_PF_DIST", 8192),
            min_rows: env("TREESPEC_PF_MIN_ROWS", 4),
        }
    })
}

/// Per-call data the kernels share.
struct Ctx<'a> {
    act: &'a QAct,
    nb: usize,
    y: *mut f32,
    out: usize,
    col0: usize,
    mask: __mmask16,
    /// Prefetch distance in bytes, 0 for none.
    pf: usize,
}

#[inline(always)]
unsafe fn prefetch_rec(rec: *const u8, len: usize, pf: usize) {
    if pf != 0 {
        let mut l = 0;
        while l < len {
            _mm_prefetch::<_MM_HINT_T1>(rec.wrapping_add(pf + l) as *const i8);
            l += 64;
        }
    }
}

#[inline(always)]
unsafe fn nibbles(q: *const u8, w: &mut [__m512i], lo: __m512i) {
    for p in 0..4 {
        let v = _mm512_loadu_si512(q.add(64 * p) as *const _);
        w[p] = _mm512_and_si512(v, lo);
        w[p + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), lo);
    }
}

#[inline(always)]
unsafe fn f16x16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

#[inline(always)]
unsafe fn bcast_i32(p: *const i8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

/// Σ over 8 chunks of `vpdpbusd` for one activation row starting at `a`,
/// on top of `init`. Two chains when the group is small, so the dependency
/// latency of a single chain does not bound the loop.
#[inline(always)]
unsafe fn dot8<const G: usize>(init: __m512i, w: &[__m512i; 8], a: *const i8) -> __m512i {
    if G < 4 {
        let mut s0 = init;
        let mut s1 = _mm512_setzero_si512();
        for c in 0..4 {
            s0 = _mm512_dpbusd_epi32(s0, w[c], bcast_i32(a.add(4 * c)));
            s1 = _mm512_dpbusd_epi32(s1, w[c + 4], bcast_i32(a.add(4 * c + 16)));
        }
        _mm512_add_epi32(s0, s1)
    } else {
        let mut s = init;
        for c in 0..8 {
            s = _mm512_dpbusd_epi32(s, w[c], bcast_i32(a.add(4 * c)));
        }
        s
    }
}

#[inline(always)]
unsafe fn store<const G: usize>(cx: &Ctx, n0: usize, acc: &[__m512; G]) {
    for (g, &a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(cx.y.add((n0 + g) * cx.out + cx.col0), cx.mask, a);
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
        nibbles(rec, w, _mm512_set1_epi8(15));
    }
}

impl Blk32 for Q41 {
    const FMT: Fmt = Fmt::Q4_1;
    const D: usize = off::Q4_D;
    #[inline(always)]
    unsafe fn weights(rec: *const u8, w: &mut [__m512i; 8]) {
        nibbles(rec, w, _mm512_set1_epi8(15));
    }
}

impl Blk32 for Q50 {
    const FMT: Fmt = Fmt::Q5_0;
    const D: usize = off::Q5_D;
    #[inline(always)]
    unsafe fn weights(rec: *const u8, w: &mut [__m512i; 8]) {
        nibbles(rec, w, _mm512_set1_epi8(15));
        let sixteen = _mm512_set1_epi8(16);
        for (c, wc) in w.iter_mut().enumerate() {
            let k: __mmask64 = (rec.add(off::Q5_H + 8 * c) as *const u64).read_unaligned();
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
            *wc = _mm512_loadu_si512(rec.add(64 * c) as *const _);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn k32<B: Blk32, const G: usize>(cx: &Ctx, w: *const u8, n0: usize) {
    let rec_bytes = B::FMT.rec_bytes();
    let has_min = B::FMT == Fmt::Q4_1;
    let (act, nb) = (cx.act, cx.nb);
    let (qs, dp, bias, fsum) = (
        act.qs.as_ptr(),
        act.d.as_ptr(),
        act.bias.as_ptr(),
        act.fsum.as_ptr(),
    );
    let mut acc = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let rec = w.add(b * rec_bytes);
        prefetch_rec(rec, rec_bytes, cx.pf);
        let mut wv = [_mm512_setzero_si512(); 8];
        B::weights(rec, &mut wv);
        let dw = f16x16(rec.add(B::D));
        let mw = if has_min {
            f16x16(rec.add(off::Q4_1_M))
        } else {
            _mm512_setzero_ps()
        };
        for (g, acc) in acc.iter_mut().enumerate() {
            let row = n0 + g;
            let ab = row * nb + b;
            let init = if has_min {
                _mm512_setzero_si512()
            } else {
                _mm512_set1_epi32(*bias.add(ab))
            };
            let s = dot8::<G>(init, &wv, qs.add(row * act.k + b * 32));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*dp.add(ab)));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *acc);
            if has_min {
                *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(*fsum.add(ab)), *acc);
            }
        }
    }
    store::<G>(cx, n0, &acc);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn kq4k<const G: usize>(cx: &Ctx, w: *const u8, n0: usize) {
    let rec_bytes = Fmt::Q4K.rec_bytes();
    let (act, nb) = (cx.act, cx.nb);
    let (qs, dp, bsum) = (act.qs.as_ptr(), act.d.as_ptr(), act.bsum32.as_ptr());
    let lo = _mm512_set1_epi8(15);
    let mut acc = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let rec = w.add(b * rec_bytes);
        prefetch_rec(rec, rec_bytes, cx.pf);
        let mut isum = [_mm512_setzero_si512(); G];
        for j in 0..8 {
            let mut wv = [_mm512_setzero_si512(); 8];
            nibbles(rec.add(256 * j), &mut wv, lo);
            let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                rec.add(off::Q4K_SC + 16 * j) as *const __m128i
            ));
            for (g, isum) in isum.iter_mut().enumerate() {
                let a = qs.add((n0 + g) * act.k + b * 256 + 32 * j);
                let s = dot8::<G>(_mm512_setzero_si512(), &wv, a);
                *isum = _mm512_add_epi32(*isum, _mm512_mullo_epi32(s, sc));
            }
        }
        let mut mins = [_mm512_setzero_si512(); 4];
        for (p, m) in mins.iter_mut().enumerate() {
            *m = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                rec.add(off::Q4K_MIN + 32 * p) as *const __m256i
            ));
        }
        let d = f16x16(rec.add(off::Q4K_D));
        let dmin = f16x16(rec.add(off::Q4K_DMIN));
        for (g, acc) in acc.iter_mut().enumerate() {
            let ab = (n0 + g) * nb + b;
            let bs = bsum.add(ab * 8) as *const i8;
            let mut ms = _mm512_setzero_si512();
            for (p, &m) in mins.iter().enumerate() {
                ms = _mm512_dpwssd_epi32(ms, m, bcast_i32(bs.add(4 * p)));
            }
            let da = _mm512_set1_ps(*dp.add(ab));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g]), _mm512_mul_ps(d, da), *acc);
            *acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), _mm512_mul_ps(dmin, da), *acc);
        }
    }
    store::<G>(cx, n0, &acc);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn kq6k<const G: usize>(cx: &Ctx, w: *const u8, n0: usize) {
    let rec_bytes = Fmt::Q6K.rec_bytes();
    let (act, nb) = (cx.act, cx.nb);
    let (qs, dp, bias) = (act.qs.as_ptr(), act.d.as_ptr(), act.bias.as_ptr());
    let lo = _mm512_set1_epi8(15);
    let hi = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let rec = w.add(b * rec_bytes);
        prefetch_rec(rec, rec_bytes, cx.pf);
        let mut isum = [_mm512_setzero_si512(); G];
        for gr in 0..8 {
            let mut wv = [_mm512_setzero_si512(); 8];
            nibbles(rec.add(256 * gr), &mut wv, lo);
            let qh = rec.add(off::Q6K_QH + 128 * gr);
            for h in 0..2 {
                let v = _mm512_loadu_si512(qh.add(64 * h) as *const _);
                // Bring bits 2p..2p+2 to bits 4..6 (16-bit shifts: the
                // bits crossing into the neighbour byte are masked off).
                let sh = [
                    _mm512_slli_epi16::<4>(v),
                    _mm512_slli_epi16::<2>(v),
                    v,
                    _mm512_srli_epi16::<2>(v),
                ];
                for p in 0..4 {
                    // w | (sh & 0x30)
                    wv[4 * h + p] = _mm512_ternarylogic_epi32::<0xF8>(wv[4 * h + p], sh[p], hi);
                }
            }
            let sc0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                rec.add(off::Q6K_SC + 32 * gr) as *const __m128i
            ));
            let sc1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                rec.add(off::Q6K_SC + 32 * gr + 16) as *const __m128i,
            ));
            for (g, isum) in isum.iter_mut().enumerate() {
                let row = n0 + g;
                let a = qs.add(row * act.k + b * 256 + 32 * gr);
                let bi = bias.add((row * nb + b) * 16 + 2 * gr);
                let mut s0 = _mm512_set1_epi32(*bi);
                let mut s1 = _mm512_set1_epi32(*bi.add(1));
                for c in 0..4 {
                    s0 = _mm512_dpbusd_epi32(s0, wv[c], bcast_i32(a.add(4 * c)));
                    s1 = _mm512_dpbusd_epi32(s1, wv[c + 4], bcast_i32(a.add(4 * c + 16)));
                }
                let t = _mm512_add_epi32(_mm512_mullo_epi32(s0, sc0), _mm512_mullo_epi32(s1, sc1));
                *isum = _mm512_add_epi32(*isum, t);
            }
        }
        let d = f16x16(rec.add(off::Q6K_D));
        for (g, acc) in acc.iter_mut().enumerate() {
            let da = _mm512_set1_ps(*dp.add((n0 + g) * nb + b));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g]), _mm512_mul_ps(d, da), *acc);
        }
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

/// Computes the output columns of `tiles` for all activation rows.
///
/// # Safety
/// The CPU must support the features of [`super::Isa::Avx512`]; `y` must
/// hold `act.n × m.out` values, of which this call writes only the columns
/// of `tiles`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(crate) unsafe fn run(m: &Tiles, act: &QAct, tiles: Range<usize>, y: *mut f32) {
    let n = act.n;
    let maxg = match m.fmt {
        Fmt::Q4K | Fmt::Q6K => MAXG_K,
        _ => MAXG_32,
    };
    let groups = n.div_ceil(maxg);
    let per = n.div_ceil(groups.max(1));
    let cfg = prefetch_cfg();
    let pf = if n >= cfg.min_rows { cfg.dist } else { 0 };
    for t in tiles {
        let lanes = TILE.min(m.out - t * TILE);
        let mut cx = Ctx {
            act,
            nb: m.blocks,
            y,
            out: m.out,
            col0: t * TILE,
            mask: ((1u32 << lanes) - 1) as __mmask16,
            pf,
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
                Fmt::Q4K => by_group_k!(gs, kq4k, cx_ref, w, n0),
                Fmt::Q6K => by_group_k!(gs, kq6k, cx_ref, w, n0),
            }
            n0 += gs;
            // Later groups re-read the tile from cache.
            cx.pf = 0;
        }
    }
}
