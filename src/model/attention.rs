//! Attention of N new tokens over the committed KV cache plus the new tokens
//! that are their ancestors (tree attention). Hand-written rather than built
//! from candle ops because (a) the mask is a tree over the new tokens only,
//! while every new token sees the whole committed prefix, and (b) the cache
//! grows in place: materialising `[heads, N, ctx]` masks or copying the cache
//! into a contiguous tensor every step would cost more than the attention.
//!
//! Work is split over (kv head, block of query rows); all query heads that
//! share a kv head are processed together so every key/value row loaded from
//! the cache is used by the whole group (GQA).

use super::kv_cache::{LayerKv, KEY_TILE};
#[cfg(target_arch = "x86_64")]
use super::lanes::{Avx2, Avx512};
use super::lanes::{F32x16, Scalar, LANES};
use crate::kernels::unaligned::load_at;
use crate::kernels::{parallel_for, OutPtr};

/// Which of the N new tokens each new token may see: bit `j` of row `i` is set
/// when `j` is `i` or one of its ancestors. Rows are `words` u64 long.
pub struct TreeMask {
    n: usize,
    words: usize,
    bits: Vec<u64>,
    /// Depth of each new token below the cache end (root = 0): its position
    /// in the sequence relative to the first new slot.
    depth: Vec<usize>,
}

impl TreeMask {
    /// From parent links (`None` = attends only to the cache). Parents must
    /// come before their children.
    pub fn from_parents(parents: &[Option<usize>]) -> Self {
        let n = parents.len();
        let words = n.div_ceil(64).max(1);
        let mut bits = vec![0u64; n * words];
        let mut depth = vec![0usize; n];
        for i in 0..n {
            if let Some(p) = parents[i] {
                debug_assert!(p < i);
                let (lo, hi) = bits.split_at_mut(i * words);
                hi[..words].copy_from_slice(&lo[p * words..(p + 1) * words]);
                depth[i] = depth[p] + 1;
            }
            bits[i * words + i / 64] |= 1 << (i % 64);
        }
        TreeMask {
            n,
            words,
            bits,
            depth,
        }
    }

    #[inline]
    pub fn sees(&self, i: usize, j: usize) -> bool {
        self.bits[i * self.words + j / 64] >> (j % 64) & 1 == 1
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Softmax of one row: the first `ctx` entries are the committed prefix, entry
/// `ctx + j` is new token j, which sits at sequence position `ctx + depth[j]`.
/// The row's length is rounded up to whole tiles: lanes past `len` are
/// ignored.
///
/// Determinism matters more than speed here: a token's result must not
/// depend on which other draft nodes share the forward, nor on whether its
/// ancestors are cached or new in the same forward (tree forward ==
/// sequential forward bit for bit, see tests/tree_forward.rs), because int8
/// activation rounding downstream turns a 1-ulp difference into visible logit
/// changes. So masked entries are exactly 0, and the sum runs in 16 lanes
/// chosen by *sequence position* (position % 16), each lane adding its
/// entries in position order: a cached ancestor and the same token as a new
/// tree node land in the same lane at the same point.
#[inline(always)]
unsafe fn softmax_in_place<V: F32x16>(s: &mut [f32], len: usize, ctx: usize, depth: &[usize]) {
    let full = len / LANES;
    let mut max = f32::NEG_INFINITY;
    for &x in &s[full * LANES..len] {
        max = max.max(x);
    }
    let mut m = V::splat(max);
    for t in 0..full {
        m = m.max(V::load(s.as_ptr().add(t * LANES)));
    }
    let mut lanes = [0f32; LANES];
    m.store(lanes.as_mut_ptr());
    let max = lanes.iter().copied().fold(max, f32::max);
    let neg_max = V::splat(-max);
    for t in 0..s.len() / LANES {
        let p = s.as_mut_ptr().add(t * LANES);
        V::load(p).add(neg_max).exp().store(p);
    }
    // Lanes by position: whole tiles of the prefix, then its tail, then the
    // new tokens at their depths.
    let prefix_tiles = ctx / LANES;
    let mut sum = V::zero();
    for t in 0..prefix_tiles {
        sum = sum.add(V::load(s.as_ptr().add(t * LANES)));
    }
    sum.store(lanes.as_mut_ptr());
    for p in prefix_tiles * LANES..ctx {
        lanes[p % LANES] += s[p];
    }
    for (j, &x) in s[ctx..len].iter().enumerate() {
        if x != 0.0 {
            lanes[(ctx + depth[j]) % LANES] += x;
        }
    }
    let total: f32 = lanes.iter().sum();
    let inv = V::splat(1.0 / total);
    for t in 0..s.len() / LANES {
        let p = s.as_mut_ptr().add(t * LANES);
        V::load(p).mul(inv).store(p);
    }
}

pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Query rows scored against one key tile at once (registers held: this many
/// 16-lane accumulators).
const QK_ROWS: usize = 8;
/// Query rows accumulated over one stretch of values at once (64 output
/// dimensions each: 16 accumulators).
const PV_ROWS: usize = 4;
/// Key tiles per block of positions (64 positions: 16 KB of keys or values
/// at head_dim 64, well inside L1) that every row of a task uses before the
/// next block is read.
const BLOCK_TILES: usize = 4;

/// `q`: `[N][n_heads][head_dim]` (rotated). `kv`: the layer's cache, whose
/// last N positions are the new tokens. Returns `[N][n_heads][head_dim]`.
pub fn tree_attention(
    shape: &AttentionShape,
    q: &[f32],
    kv: &LayerKv,
    mask: &TreeMask,
) -> Vec<f32> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = *shape;
    let n = mask.len();
    let ctx = kv.len() - n;
    let group = n_heads / n_kv_heads;

    // A task = one kv head and a run of query rows, a row being one (new
    // token, query head of the group) pair: every key/value loaded from the
    // cache serves all rows of the task (GQA and the tree's tokens alike).
    // Runs are cut so that both pool threads get work even for one token.
    let rows_per_head = n * group;
    let want_tasks = 2 * crate::kernels::threads();
    let mut run = QK_ROWS.max(PV_ROWS) * 8;
    while run > 1 && n_kv_heads * rows_per_head.div_ceil(run) < want_tasks {
        run /= 2;
    }
    let run = run.max(1);
    let tasks: Vec<(usize, usize)> = (0..n_kv_heads)
        .flat_map(|g| (0..rows_per_head).step_by(run).map(move |r0| (g, r0)))
        .collect();

    let mut out = vec![0f32; n * n_heads * d];
    let b = Block {
        q,
        kv,
        mask,
        n_heads,
        d,
        ctx,
        group,
        run,
        rows_per_head,
        scale: 1.0 / (d as f32).sqrt(),
        out: OutPtr(out.as_mut_ptr()),
    };
    let level = simd_level();
    let work = |range: std::ops::Range<usize>| {
        for &(g, r0) in &tasks[range] {
            // SAFETY: the wrappers only enable features `simd_level` found.
            unsafe {
                match level {
                    #[cfg(target_arch = "x86_64")]
                    2 => attend_avx512(&b, g, r0),
                    #[cfg(target_arch = "x86_64")]
                    1 => attend_avx2(&b, g, r0),
                    _ => attend::<Scalar>(&b, g, r0),
                }
            }
        }
    };
    parallel_for(tasks.len(), 1, &work);
    out
}

/// What every task reads (and the output rows it writes, disjoint per task).
struct Block<'a> {
    q: &'a [f32],
    kv: &'a LayerKv<'a>,
    mask: &'a TreeMask,
    n_heads: usize,
    d: usize,
    ctx: usize,
    group: usize,
    run: usize,
    rows_per_head: usize,
    scale: f32,
    out: OutPtr,
}

/// 2 = AVX-512F, 1 = AVX2 + FMA + F16C, 0 = baseline. The crate is built for plain
/// x86-64, so the task body is compiled once per level and picked at run
/// time, as the matmul kernels are. All levels run the same arithmetic
/// (multiply-adds fused everywhere), so they agree bit for bit.
fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return 2;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return 1;
            }
        }
        0
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn attend_avx512(b: &Block, g: usize, r0: usize) {
    attend::<Avx512>(b, g, r0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(b: &Block, g: usize, r0: usize) {
    attend::<Avx2>(b, g, r0)
}

/// Rows `r0..r0 + run` of kv head `g` (row r = token `r / group`, query head
/// `g * group + r % group`).
#[inline(always)]
unsafe fn attend<V: F32x16>(b: &Block, g: usize, r0: usize) {
    let (d, ctx, group) = (b.d, b.ctx, b.group);
    let r1 = (r0 + b.run).min(b.rows_per_head);
    let rows = r1 - r0;
    let last_token = (r1 - 1) / group;
    // Positions past ctx + last_token are never visible to these rows.
    let span = ctx + last_token + 1;
    let stride = span.div_ceil(KEY_TILE) * KEY_TILE;
    let head_of = |r: usize| (r / group, g * group + r % group);

    // Queries by groups of QK_ROWS rows, each group laid out `[c][row]`:
    // the score kernel then broadcasts a group's values for dimension c from
    // one pointer at constant offsets (per-row offsets ran out of registers
    // and were reloaded from the stack beside every multiply-add).
    let mut qs = vec![0f32; rows * d];
    for r in 0..rows {
        let (i, h) = head_of(r0 + r);
        let g0 = r - r % QK_ROWS;
        let take = QK_ROWS.min(rows - g0);
        let q = &b.q[(i * b.n_heads + h) * d..][..d];
        for (c, &x) in q.iter().enumerate() {
            qs[g0 * d + c * take + (r - g0)] = x;
        }
    }

    // Scores for every tile of keys up to `span` (lanes past it are ignored).
    let keys = &b.kv.keys(g)[..stride * d];
    let mut scores = vec![0f32; rows * stride];
    // Blocks of positions outer, rows inner: a block of keys is read from
    // memory once and then serves every row of the task from L1.
    let tiles = stride / KEY_TILE;
    for t0 in (0..tiles).step_by(BLOCK_TILES) {
        let t1 = (t0 + BLOCK_TILES).min(tiles);
        let kb = &keys[t0 * KEY_TILE * d..t1 * KEY_TILE * d];
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(QK_ROWS);
            let q = &qs[r * d..(r + take) * d];
            let s =
                &mut scores[r * stride + t0 * KEY_TILE..(r + take - 1) * stride + t1 * KEY_TILE];
            match take {
                8 => qk::<V, 8>(q, kb, d, stride, b.scale, s),
                7 => qk::<V, 7>(q, kb, d, stride, b.scale, s),
                6 => qk::<V, 6>(q, kb, d, stride, b.scale, s),
                5 => qk::<V, 5>(q, kb, d, stride, b.scale, s),
                4 => qk::<V, 4>(q, kb, d, stride, b.scale, s),
                3 => qk::<V, 3>(q, kb, d, stride, b.scale, s),
                2 => qk::<V, 2>(q, kb, d, stride, b.scale, s),
                _ => qk::<V, 1>(q, kb, d, stride, b.scale, s),
            }
            r += take;
        }
    }
    // Mask: the committed prefix is visible to all; among the new tokens
    // only a row's ancestors and itself.
    for r in 0..rows {
        let (i, _) = head_of(r0 + r);
        let row = &mut scores[r * stride..(r + 1) * stride];
        for j in 0..=last_token {
            if !b.mask.sees(i, j) {
                row[ctx + j] = f32::NEG_INFINITY;
            }
        }
        softmax_in_place::<V>(row, span, ctx, &b.mask.depth);
    }

    // out = P V. The committed prefix in one pass with no masking; the new
    // tokens after it, adding only what the row sees. Either way each output
    // lane adds p * v in position order, exactly as when the same ancestors
    // were committed (tree forward == sequential forward).
    let values = b.kv.values(g);
    let mut acc = vec![0f32; rows * d];
    let block = BLOCK_TILES * KEY_TILE;
    for j0 in (0..ctx).step_by(block) {
        let j1 = (j0 + block).min(ctx);
        let vb = &values[j0 * d..j1 * d];
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(PV_ROWS);
            let s = &scores[r * stride + j0..(r + take - 1) * stride + j1];
            let a = &mut acc[r * d..(r + take) * d];
            match take {
                4 => pv::<V, 4>(s, stride, vb, d, a),
                3 => pv::<V, 3>(s, stride, vb, d, a),
                2 => pv::<V, 2>(s, stride, vb, d, a),
                _ => pv::<V, 1>(s, stride, vb, d, a),
            }
            r += take;
        }
    }
    for r in 0..rows {
        let (i, h) = head_of(r0 + r);
        let a = &mut acc[r * d..(r + 1) * d];
        // 16 output dimensions at a time held in a register over all the
        // visible new tokens (a prefill chunk has hundreds), same per-lane
        // order as the scalar tail below.
        let srow = &scores[r * stride + ctx..];
        let mut c0 = 0;
        while c0 + LANES <= d {
            let ap = a.as_mut_ptr().wrapping_add(c0);
            let mut acc = V::load(ap);
            let mut vp = values.as_ptr().wrapping_add(ctx * d + c0);
            for (j, &p) in srow[..=last_token].iter().enumerate() {
                if b.mask.sees(i, j) {
                    acc = acc.fma(V::splat(p), V::load_f16(vp));
                }
                vp = vp.wrapping_add(d);
            }
            acc.store(ap);
            c0 += LANES;
        }
        for j in 0..=last_token {
            if c0 < d && b.mask.sees(i, j) {
                let p = srow[j];
                for c in c0..d {
                    let x = half::f16::from_bits(values[(ctx + j) * d + c]).to_f32();
                    a[c] = p.mul_add(x, a[c]);
                }
            }
        }
        let dst = (i * b.n_heads + h) * d;
        // SAFETY: each (token, head) row belongs to exactly one task, so
        // tasks write disjoint ranges of `out`, which outlives them.
        unsafe {
            std::ptr::copy_nonoverlapping(a.as_ptr(), b.out.at(dst), d);
        }
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
unsafe fn qk<V: F32x16, const R: usize>(
    q: &[f32],
    keys: &[u16],
    d: usize,
    stride: usize,
    scale: f32,
    s: &mut [f32],
) {
    let tiles = keys.len() / (d * KEY_TILE);
    debug_assert!(q.len() >= R * d && s.len() >= (R - 1) * stride + tiles * KEY_TILE);
    let scale = V::splat(scale);
    let mut kp = keys.as_ptr();
    let mut sp = s.as_mut_ptr();
    for _ in 0..tiles {
        let mut acc = [V::zero(); R];
        // `q` is `[c][R]`: dimension c of every row at constant offsets.
        let mut qp = q.as_ptr() as *const u8;
        for _ in 0..d {
            // The cache streams from memory (the weights evicted it): ask
            // for the next tile's line while this one is used.
            prefetch(kp.wrapping_add(KEY_PREFETCH_TILES * d * KEY_TILE));
            let k = V::load_f16(kp);
            for (r, a) in acc.iter_mut().enumerate() {
                *a = a.fma(V::splat(load_at::<f32>(qp, r)), k);
            }
            kp = kp.wrapping_add(KEY_TILE);
            qp = qp.wrapping_add(R * 4);
        }
        let mut dst = sp;
        for a in &acc {
            a.mul(scale).store(dst);
            dst = dst.wrapping_add(stride);
        }
        sp = sp.wrapping_add(KEY_TILE);
    }
}

/// `acc[r] += Σ_j p[r][j] · values[j]` over every value row given, in
/// position order: 64 output dimensions at a time (R × 4 accumulators, each
/// value row loaded once for all R rows), then 16 at a time, then the rest.
/// Each output lane is one multiply-add chain in position order whatever
/// the grouping.
#[inline(always)]
unsafe fn pv<V: F32x16, const R: usize>(
    p: &[f32],
    stride: usize,
    values: &[u16],
    d: usize,
    acc: &mut [f32],
) {
    let rows = values.len() / d;
    debug_assert!(p.len() >= (R - 1) * stride + rows && acc.len() >= R * d);
    let pbase = p.as_ptr() as *const u8;
    let poff: [usize; R] = std::array::from_fn(|r| r * stride);
    let mut c0 = 0;
    while c0 + 4 * LANES <= d {
        pv_slices::<V, R, 4>(pbase, &poff, values, rows, d, acc, c0);
        c0 += 4 * LANES;
    }
    while c0 + LANES <= d {
        pv_slices::<V, R, 1>(pbase, &poff, values, rows, d, acc, c0);
        c0 += LANES;
    }
    // head_dim not a multiple of 16: the rest, same arithmetic.
    if c0 < d {
        for j in 0..rows {
            for r in 0..R {
                let x = p[r * stride + j];
                for c in c0..d {
                    let v = half::f16::from_bits(values[j * d + c]).to_f32();
                    acc[r * d + c] = x.mul_add(v, acc[r * d + c]);
                }
            }
        }
    }
}

/// [`pv`] for the `W` 16-wide output slices from dimension `c0`: R × W
/// accumulators, each value row's slices loaded once for all R rows.
#[inline(always)]
unsafe fn pv_slices<V: F32x16, const R: usize, const W: usize>(
    pbase: *const u8,
    poff: &[usize; R],
    values: &[u16],
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
        // One prefetch per 64-byte line (32 f16 values).
        for l in (0..W).step_by(2) {
            prefetch(vp.wrapping_add(VALUE_PREFETCH_ROWS * d + l * LANES));
        }
        let v: [V; W] = std::array::from_fn(|l| V::load_f16(vp.wrapping_add(l * LANES)));
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
const KEY_PREFETCH_TILES: usize = 4;
const VALUE_PREFETCH_ROWS: usize = 48;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_follows_ancestors() {
        // 0 -> 1 -> 3, 0 -> 2
        let m = TreeMask::from_parents(&[None, Some(0), Some(0), Some(1)]);
        assert!(m.sees(3, 0) && m.sees(3, 1) && m.sees(3, 3));
        assert!(!m.sees(3, 2));
        assert!(!m.sees(2, 1));
        assert!(!m.sees(0, 1));
        let chain: Vec<_> = (0..130)
            .map(|i| if i == 0 { None } else { Some(i - 1) })
            .collect();
        let m = TreeMask::from_parents(&chain);
        assert!(m.sees(129, 0) && m.sees(129, 70) && !m.sees(70, 129));
    }

    #[test]
    fn attention_matches_naive() {
        // head_dim 24: one 16-wide pass plus the odd rest; 88: a 64-wide
        // pass, a 16-wide one and the rest. ctx 37 crosses key tiles; GQA
        // group of 3 (15 query rows per kv head: row groups of 8 and 7).
        check_against_naive(6, 2, 24);
        check_against_naive(6, 2, 88);
    }

    fn check_against_naive(heads: usize, kv_heads: usize, d: usize) {
        let shape = AttentionShape {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: d,
        };
        let (ctx, n) = (37, 5);
        let parents = [None, Some(0), Some(0), Some(1), Some(2)];
        let f = |i: usize| ((i * 7919 % 101) as f32 / 50.0) - 1.0;
        let q: Vec<f32> = (0..n * heads * d).map(f).collect();
        let row = kv_heads * d;
        let kv_of =
            |p: usize, o: usize| -> Vec<f32> { (0..row).map(|c| f(p * row + c + o)).collect() };
        let mut cache = crate::model::KvCache::new(1, kv_heads, d, 64);
        cache.begin(ctx).unwrap();
        let (pk, pv): (Vec<f32>, Vec<f32>) = (
            (0..ctx).flat_map(|p| kv_of(p, 3)).collect(),
            (0..ctx).flat_map(|p| kv_of(p, 11)).collect(),
        );
        cache.write(0, &pk, &pv);
        cache.keep_all();
        cache.begin(n).unwrap();
        let (nk, nv): (Vec<f32>, Vec<f32>) = (
            (ctx..ctx + n).flat_map(|p| kv_of(p, 3)).collect(),
            (ctx..ctx + n).flat_map(|p| kv_of(p, 11)).collect(),
        );
        cache.write(0, &nk, &nv);
        let mask = TreeMask::from_parents(&parents);
        let out = tree_attention(&shape, &q, &cache.layer(0), &mask);
        for i in 0..n {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let vis: Vec<usize> = (0..ctx + n)
                    .filter(|&j| j < ctx || mask.sees(i, j - ctx))
                    .collect();
                let qrow = &q[(i * heads + h) * d..(i * heads + h + 1) * d];
                let s: Vec<f32> = vis
                    .iter()
                    .map(|&j| {
                        let key = cache.entry(0, g, j).0;
                        qrow.iter().zip(&key).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::MIN, f32::max);
                let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..d {
                    let want: f32 = vis
                        .iter()
                        .zip(&s)
                        .map(|(&j, x)| (x - m).exp() / z * cache.entry(0, g, j).1[c])
                        .sum();
                    let got = out[(i * heads + h) * d + c];
                    assert!((want - got).abs() < 1e-5, "{want} vs {got}");
                }
            }
        }
    }
}
