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

use crate::kernels::parallel_for;

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

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // 16 independent lanes so the compiler vectorises without reassociating.
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 16..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Softmax of one row: the first `ctx` entries are the committed prefix, entry
/// `ctx + j` is new token j, which sits at sequence position `ctx + depth[j]`.
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
fn softmax_in_place(s: &mut [f32], ctx: usize, depth: &[usize]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in s.iter_mut() {
        *x = if *x == f32::NEG_INFINITY {
            0.0
        } else {
            fast_exp(*x - max)
        };
    }
    let mut lanes = [0f32; 16];
    let mut chunks = s[..ctx].chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            lanes[l] += c[l];
        }
    }
    for (p, &x) in (ctx - ctx % 16..ctx).zip(chunks.remainder()) {
        lanes[p % 16] += x;
    }
    for (j, &x) in s[ctx..].iter().enumerate() {
        if x != 0.0 {
            lanes[(ctx + depth[j]) % 16] += x;
        }
    }
    let sum: f32 = lanes.iter().sum();
    let inv = 1.0 / sum;
    for x in s.iter_mut() {
        *x *= inv;
    }
}

/// e^x for x <= 0 (softmax after subtracting the max), vectorisable: x = n ln2 + r
/// with r in [-ln2/2, ln2/2] (Cody–Waite split of ln 2 so r stays exact),
/// e^r by its Taylor polynomial to degree 7, 2^n through the exponent bits.
/// Relative error < 5e-7 against libm's ~1 ulp; libm's `expf` is a call per
/// element, which made the softmax a visible share of decode time.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// `q`: `[N][n_heads][head_dim]` (rotated). `k`, `v`: the layer's cache,
/// `[ctx + N][n_kv_heads][head_dim]`, the last N rows being the new tokens.
/// Returns `[N][n_heads][head_dim]`.
pub fn tree_attention(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &TreeMask,
) -> Vec<f32> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = *shape;
    let n = mask.len();
    let kv_row = n_kv_heads * d;
    let total = k.len() / kv_row;
    let ctx = total - n;
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();

    // A task = one kv head and a block of query tokens (all heads of the group).
    let block = if n >= 8 { 4 } else { n.max(1) };
    let tasks: Vec<(usize, usize)> = (0..n_kv_heads)
        .flat_map(|g| (0..n).step_by(block).map(move |i0| (g, i0)))
        .collect();

    let mut out = vec![0f32; n * n_heads * d];
    let b = Block {
        q,
        k,
        v,
        mask,
        n,
        n_heads,
        d,
        kv_row,
        ctx,
        group,
        block,
        scale,
        out: OutPtr(out.as_mut_ptr()),
    };
    let level = simd_level();
    let run = |range: std::ops::Range<usize>| {
        for &(g, i0) in &tasks[range] {
            // SAFETY: the wrappers only enable features `simd_level` found.
            unsafe {
                match level {
                    #[cfg(target_arch = "x86_64")]
                    2 => attend_avx512(&b, g, i0),
                    #[cfg(target_arch = "x86_64")]
                    1 => attend_avx2(&b, g, i0),
                    _ => attend(&b, g, i0),
                }
            }
        }
    };
    parallel_for(tasks.len(), 1, &run);
    out
}

/// What every task reads (and the output rows it writes, disjoint per task).
struct Block<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    mask: &'a TreeMask,
    n: usize,
    n_heads: usize,
    d: usize,
    kv_row: usize,
    ctx: usize,
    group: usize,
    block: usize,
    scale: f32,
    out: OutPtr,
}

/// 2 = AVX-512F, 1 = AVX2 + FMA, 0 = baseline. The crate is built for plain
/// x86-64, so the task body is compiled once per level and picked at run
/// time, as the matmul kernels are.
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
            {
                return 1;
            }
        }
        0
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512(b: &Block, g: usize, i0: usize) {
    attend(b, g, i0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(b: &Block, g: usize, i0: usize) {
    attend(b, g, i0)
}

/// Queries `i0..i0 + block`, every head of kv group `g`.
#[inline(always)]
fn attend(b: &Block, g: usize, i0: usize) {
    let (q, k, v, mask) = (b.q, b.k, b.v, b.mask);
    let (n_heads, d, kv_row, ctx, group, scale) =
        (b.n_heads, b.d, b.kv_row, b.ctx, b.group, b.scale);
    let i1 = (i0 + b.block).min(b.n);
    let rows = (i1 - i0) * group;
    let span = ctx + i1; // tokens past ctx + i1 are never visible to these queries
    let mut scores = vec![0f32; rows * span];
    let qrow = |r: usize| {
        let (i, h) = (i0 + r / group, g * group + r % group);
        &q[(i * n_heads + h) * d..(i * n_heads + h + 1) * d]
    };
    // Scores: every key row is loaded once for all `rows` queries; the
    // committed prefix is visible to all, only new tokens need the mask.
    for j in 0..ctx {
        let key = &k[j * kv_row + g * d..j * kv_row + (g + 1) * d];
        for r in 0..rows {
            scores[r * span + j] = dot(qrow(r), key) * scale;
        }
    }
    for j in ctx..span {
        let key = &k[j * kv_row + g * d..j * kv_row + (g + 1) * d];
        for r in 0..rows {
            scores[r * span + j] = if mask.sees(i0 + r / group, j - ctx) {
                dot(qrow(r), key) * scale
            } else {
                f32::NEG_INFINITY
            };
        }
    }
    for r in 0..rows {
        softmax_in_place(&mut scores[r * span..(r + 1) * span], ctx, &mask.depth);
    }
    let mut acc = vec![0f32; rows * d];
    for j in 0..span {
        let val = &v[j * kv_row + g * d..j * kv_row + (g + 1) * d];
        for r in 0..rows {
            let p = scores[r * span + j];
            if p != 0.0 {
                axpy(&mut acc[r * d..(r + 1) * d], p, val);
            }
        }
    }
    for r in 0..rows {
        let (i, h) = (i0 + r / group, g * group + r % group);
        let dst = (i * n_heads + h) * d;
        // SAFETY: each (query, head) row belongs to exactly one task, so
        // tasks write disjoint ranges of `out`, which outlives them.
        unsafe {
            std::ptr::copy_nonoverlapping(acc.as_ptr().add(r * d), b.out.0.add(dst), d);
        }
    }
}

struct OutPtr(*mut f32);
// SAFETY: used only to write disjoint ranges from pool workers (see above).
unsafe impl Sync for OutPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f32;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (a, b) = (fast_exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
    }

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
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let (ctx, n) = (5, 3);
        let parents = [None, Some(0), Some(0)];
        let f = |i: usize| ((i * 7919 % 101) as f32 / 50.0) - 1.0;
        let q: Vec<f32> = (0..n * 4 * 8).map(f).collect();
        let k: Vec<f32> = (0..(ctx + n) * 2 * 8).map(|i| f(i + 3)).collect();
        let v: Vec<f32> = (0..(ctx + n) * 2 * 8).map(|i| f(i + 11)).collect();
        let mask = TreeMask::from_parents(&parents);
        let out = tree_attention(&shape, &q, &k, &v, &mask);
        for i in 0..n {
            for h in 0..4 {
                let g = h / 2;
                let vis: Vec<usize> = (0..ctx + n)
                    .filter(|&j| j < ctx || mask.sees(i, j - ctx))
                    .collect();
                let qrow = &q[(i * 4 + h) * 8..(i * 4 + h + 1) * 8];
                let s: Vec<f32> = vis
                    .iter()
                    .map(|&j| {
                        qrow.iter()
                            .zip(&k[(j * 2 + g) * 8..(j * 2 + g + 1) * 8])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (8f32).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::MIN, f32::max);
                let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..8 {
                    let want: f32 = vis
                        .iter()
                        .zip(&s)
                        .map(|(&j, x)| (x - m).exp() / z * v[(j * 2 + g) * 8 + c])
                        .sum();
                    let got = out[(i * 4 + h) * 8 + c];
                    assert!((want - got).abs() < 1e-5, "{want} vs {got}");
                }
            }
        }
    }
}
