//! How much attention one query gives each stretch of the past: what
//! SpecExtend's cross-model retrieval reads off the target's last layer to
//! choose the chunks of context the draft model keeps attending to.
//!
//! One row, every head, the committed positions only, computed apart from
//! the forward (every few steps, one layer): written plainly, since it
//! costs about one layer of one row's attention.

use super::{AttentionShape, ScoreRule};
use crate::model::kv_cache::{LayerKv, KEY_TILE};

/// The softmax mass query `q` (`[n_heads][head_dim]`, rotated) puts on each
/// run of `chunk` positions among the first `len` of `kv`, averaged over
/// heads: `out[c]` for positions `c * chunk .. (c + 1) * chunk`; the masses
/// sum to 1 (0 when `len` is 0).
pub fn mass_by_chunk(
    shape: &AttentionShape,
    rule: ScoreRule,
    q: &[f32],
    kv: &LayerKv,
    len: usize,
    chunk: usize,
) -> Vec<f32> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = *shape;
    let len = len.min(kv.len());
    let chunk = chunk.max(1);
    let mut out = vec![0f32; len.div_ceil(chunk)];
    if len == 0 || q.len() < n_heads * d {
        return out;
    }
    let group = n_heads / n_kv_heads;
    let mut key = vec![0f32; d];
    let mut scores = vec![0f32; len * group];
    for g in 0..n_kv_heads {
        let tiles = kv.keys(g);
        for p in 0..len {
            let base = (p / KEY_TILE) * d * KEY_TILE + p % KEY_TILE;
            for (c, k) in key.iter_mut().enumerate() {
                *k = half::f16::from_bits(tiles[base + c * KEY_TILE]).to_f32();
            }
            for k in 0..group {
                let qh = &q[(g * group + k) * d..][..d];
                let s = qh.iter().zip(&key).map(|(a, b)| a * b).sum::<f32>() * rule.scale;
                scores[k * len + p] = match rule.softcap {
                    Some(cap) => cap * (s / cap).tanh(),
                    None => s,
                };
            }
        }
        for row in scores.chunks_exact_mut(len) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let w = 1.0 / (sum * n_heads as f32);
            for (p, &s) in row.iter().enumerate() {
                out[p / chunk] += s * w;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KvCache;

    /// Against the softmax written out per head: masses per chunk, their
    /// sum 1, and a query that matches one position's key putting most of
    /// its mass on that position's chunk.
    #[test]
    fn masses_are_the_heads_mean_softmax_per_chunk() {
        let (heads, kv_heads, d, len, chunk) = (4, 2, 16, 70, 32);
        let mut cache = KvCache::new(1, kv_heads, d, 128);
        cache.fill_pseudo_random(len, 5).unwrap();
        let shape = AttentionShape {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: d,
        };
        let rule = ScoreRule::standard(d);
        // Every head looks for position 40's key (scaled up: a sharp peak).
        let mut q = Vec::new();
        for h in 0..heads {
            let (k, _) = cache.entry(0, h / (heads / kv_heads), 40);
            q.extend(k.iter().map(|x| x * 8.0));
        }
        let got = mass_by_chunk(&shape, rule, &q, &cache.layer(0), len, chunk);
        let mut want = vec![0f32; 3];
        for h in 0..heads {
            let qh = &q[h * d..(h + 1) * d];
            let s: Vec<f32> = (0..len)
                .map(|p| {
                    let (k, _) = cache.entry(0, h / 2, p);
                    qh.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>() * rule.scale
                })
                .collect();
            let m = s.iter().copied().fold(f32::MIN, f32::max);
            let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
            for (p, x) in s.iter().enumerate() {
                want[p / chunk] += (x - m).exp() / z / heads as f32;
            }
        }
        assert_eq!(got.len(), 3);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        assert!((got.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(got[1] > got[0] && got[1] > got[2], "{got:?}");
        assert!(mass_by_chunk(&shape, rule, &q, &cache.layer(0), 0, chunk).is_empty());
    }
}
