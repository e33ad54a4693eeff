//! The element-wise steps of the decoder on plain row-major f32 buffers.
//! Written out rather than taken from candle: at one to a few dozen rows each
//! op is a few microseconds of work, and candle's per-op tensor allocation
//! and its own thread pool (which contends with the matmul pool on 2 cores)
//! cost more than the op (measured: 25 ms → see the kernel issue's note).

/// `out[r] = x[r] / rms(x[r]) * w` for each row of width `w.len()`.
/// The sum of squares runs in 16 independent partial sums (a single running
/// sum is one dependent add per element: 0.8 ms of a 16-token forward).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut part = [0f32; 16];
        let (chunks, rest) = xr.as_chunks::<16>();
        for c in chunks {
            for (p, v) in part.iter_mut().zip(c) {
                *p += v * v;
            }
        }
        let ss = (part.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>()) / d as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// Rotary embedding tables: `cos[p][i]`, `sin[p][i]` for i < head_dim / 2.
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Pairs are (2i, 2i+1) (GGUF llama) instead of (i, i + half).
    interleaved: bool,
}

impl Rope {
    /// Pair i at position p rotates by `p · freq_scale · theta^(-2i/d) /
    /// factors[i]` (linear scaling and Llama 3's per-pair factors; 1 and
    /// `None` for plain RoPE).
    pub fn new(
        head_dim: usize,
        theta: f32,
        max_pos: usize,
        interleaved: bool,
        freq_scale: f32,
        factors: Option<&[f32]>,
    ) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| {
                let f = freq_scale as f64 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
                f / factors.and_then(|v| v.get(i)).map_or(1.0, |&x| x as f64)
            })
            .collect();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &inv in &inv {
                let a = p as f64 * inv;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope {
            half,
            cos,
            sin,
            interleaved,
        }
    }

    /// Rotates every head of each row: `x` is `[rows][heads][head_dim]`,
    /// row r at position `positions[r]`.
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[usize]) {
        let (half, d) = (self.half, 2 * self.half);
        for (row, &p) in x.chunks_exact_mut(heads * d).zip(positions) {
            let c = &self.cos[p * half..(p + 1) * half];
            let s = &self.sin[p * half..(p + 1) * half];
            for h in row.chunks_exact_mut(d) {
                if self.interleaved {
                    for i in 0..half {
                        let (a, b) = (h[2 * i], h[2 * i + 1]);
                        h[2 * i] = a * c[i] - b * s[i];
                        h[2 * i + 1] = a * s[i] + b * c[i];
                    }
                } else {
                    let (lo, hi) = h.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * c[i] - b * s[i];
                        hi[i] = a * s[i] + b * c[i];
                    }
                }
            }
        }
    }
}

/// `gate = silu(gate) * up`, in place (vectorised: see `lanes`).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    super::lanes::silu_mul(gate, up)
}

/// `gate = gelu(gate) * up`, in place, GELU in its tanh form (Gemma's
/// `gelu_pytorch_tanh`, llama.cpp's `ggml_gelu`).
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let t = (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh();
        *g = 0.5 * x * (1.0 + t) * u;
    }
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_by_position() {
        // head_dim 4, theta 1: frequencies 1 and 1/sqrt(1)=1 → angle = p.
        let r = Rope::new(2, 10_000.0, 4, false, 1.0, None);
        let mut x = vec![1.0, 0.0];
        r.apply(&mut x, 1, &[1]);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        let ri = Rope::new(2, 10_000.0, 4, true, 1.0, None);
        let mut y = vec![1.0, 0.0];
        ri.apply(&mut y, 1, &[1]);
        assert_eq!(x, y, "with one pair both layouts agree");
        let mut z = vec![1.0, 0.0];
        r.apply(&mut z, 1, &[0]);
        assert_eq!(z, vec![1.0, 0.0], "position 0 is the identity");
        // Linear scale 1/2 and a factor of 2 each halve the angle.
        for (scale, factors) in [(0.5, None), (1.0, Some(&[2.0f32][..]))] {
            let h = Rope::new(2, 10_000.0, 4, false, scale, factors);
            let mut w = vec![1.0, 0.0];
            h.apply(&mut w, 1, &[2]);
            assert!((w[0] - 1f32.cos()).abs() < 1e-6 && (w[1] - 1f32.sin()).abs() < 1e-6);
        }
    }

    #[test]
    fn rms_norm_normalises() {
        let mut out = vec![0.0; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] - 8.0 / rms).abs() < 1e-6);
    }
}
