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
}

impl TreeMask {
    /// From parent links (`None` = attends only to the cache). Parents must
    /// come before their children.
    pub fn from_parents(parents: &[Option<usize>]) -> Self {
        let n = parents.len();
        let words = n.div_ceil(64).max(1);
        let mut bits = vec![0u64; n * words];
        for i in 0..n {
            if let Some(p) = parents[i] {
                debug_assert!(p < i);
                let (lo, hi) = bits.split_at_mut(i * words);
                hi[..words].copy_from_slice(&lo[p * words..(p + 1) * words]);
            }
            bits[i * words + i / 64] |= 1 << (i % 64);
        }
        TreeMask { n, words, bits }
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

#[inline]
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

#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
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
    let out_ptr = OutPtr(out.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        let out_ptr = &out_ptr;
        for &(g, i0) in &tasks[range] {
            let i1 = (i0 + block).min(n);
            let rows = (i1 - i0) * group;
            let span = ctx + i1; // tokens past ctx + i1 are never visible to these queries
            let mut scores = vec![0f32; rows * span];
            // Scores: every key row is loaded once for all `rows` queries.
            for j in 0..span {
                let key = &k[j * kv_row + g * d..j * kv_row + (g + 1) * d];
                for i in i0..i1 {
                    let visible = j < ctx || mask.sees(i, j - ctx);
                    for h in 0..group {
                        let r = (i - i0) * group + h;
                        scores[r * span + j] = if visible {
                            let head = g * group + h;
                            let qrow = &q[(i * n_heads + head) * d..(i * n_heads + head + 1) * d];
                            dot(qrow, key) * scale
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                }
            }
            for r in 0..rows {
                let s = &mut scores[r * span..(r + 1) * span];
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for x in s.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                for x in s.iter_mut() {
                    *x *= inv;
                }
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
                // SAFETY: each (query, head) row belongs to exactly one task,
                // so tasks write disjoint ranges of `out`, which outlives them.
                unsafe {
                    std::ptr::copy_nonoverlapping(acc.as_ptr().add(r * d), out_ptr.0.add(dst), d);
                }
            }
        }
    };
    parallel_for(tasks.len(), 1, &run);
    out
}

struct OutPtr(*mut f32);
// SAFETY: used only to write disjoint ranges from pool workers (see above).
unsafe impl Sync for OutPtr {}

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
        let chain: Vec<_> = (0..130).map(|i| if i == 0 { None } else { Some(i - 1) }).collect();
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
