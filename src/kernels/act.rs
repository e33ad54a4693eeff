//! Activation quantization: each row is cut into blocks and stored as int8
//! with one f32 scale per block, like ggml's Q8_0 (32-blocks) and Q8_K
//! (256-blocks), plus the block sums the weight formats need to remove their
//! code offsets and mins. Every kernel path uses this same function, so the
//! paths differ only by float summation order.

use super::layout::Fmt;
use std::cell::RefCell;

/// Quantized activations, stored block-major (`[block][row]`): for one
/// weight block the kernels read every row's data at fixed offsets from a
/// single pointer.
#[derive(Default)]
pub(crate) struct QAct {
    /// Rows.
    pub n: usize,
    /// Values per row.
    pub k: usize,
    /// Blocks per row.
    pub nb: usize,
    /// Values per block.
    pub bs: usize,
    /// int8 values: block `b` of row `i` at `idx(i, b) × bs`.
    pub qs: Vec<i8>,
    /// Block scales at `idx(i, b)`.
    pub d: Vec<f32>,
    /// 32-block formats with an offset `o`: `-o × Σq` at `idx(i, b)`;
    /// Q6_K: `-32 × Σq` of the 16-value sub-block `j` at `idx(i, b) × 16 + j`.
    pub bias: Vec<i32>,
    /// Q4_1: `d × Σq` at `idx(i, b)`.
    pub fsum: Vec<f32>,
    /// Q4_K: `Σq` of the 32-value sub-block `j` at `idx(i, b) × 8 + j` (i16
    /// pairs for `vpdpwssd`).
    pub bsum32: Vec<i16>,
}

/// Rounds to nearest (ties to even) for |v| < 2^22 with plain float ops that
/// vectorise everywhere, unlike `f32::round` which may become a libm call.
#[inline(always)]
fn round_i32(v: f32) -> i32 {
    let t = v + 12_582_912.0; // 1.5 × 2^23
    (t.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Quantizes one block to int8 with scale `amax / 127`, writing the sum of
/// every 16 values to `sums`; returns the scale.
fn quantize_block(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512_quantizer() {
        // SAFETY: the features were detected.
        return unsafe { quantize_block_avx512(x, q, sums) };
    }
    quantize_block_scalar(x, q, sums)
}

/// The reference quantizer (the AVX-512 one gives the same bits).
pub(crate) fn quantize_block_scalar(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        q.fill(0);
        sums.fill(0);
        // A non-finite activation poisons the output like a float matmul
        // would, instead of silently quantizing to garbage.
        return if amax.is_finite() { 0.0 } else { f32::NAN };
    }
    let id = 127.0 / amax;
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = round_i32(xi * id).clamp(-127, 127) as i8;
    }
    for (s, q16) in sums.iter_mut().zip(q.chunks_exact(16)) {
        *s = q16.iter().map(|&v| v as i32).sum();
    }
    amax / 127.0
}

#[cfg(target_arch = "x86_64")]
fn avx512_quantizer() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
}

/// [`quantize_block_scalar`] with AVX-512: the same float operations
/// (`x × (127 / amax)`, round half to even), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> f32 {
    use super::unaligned::{load_at, store_at};
    use std::arch::x86_64::*;
    let n = x.len() / 16;
    assert!(x.len() == 16 * n && q.len() >= 16 * n && sums.len() >= n);
    let xp = x.as_ptr();
    let mut m = _mm512_setzero_ps();
    for i in 0..n {
        m = _mm512_max_ps(m, _mm512_abs_ps(load_at::<__m512>(xp as *const u8, i)));
    }
    let amax = _mm512_reduce_max_ps(m);
    if amax == 0.0 || !amax.is_finite() {
        q.fill(0);
        sums.fill(0);
        return if amax.is_finite() { 0.0 } else { f32::NAN };
    }
    let id = _mm512_set1_ps(127.0 / amax);
    let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
    for (i, sum) in sums.iter_mut().enumerate().take(n) {
        let v = _mm512_mul_ps(load_at::<__m512>(xp as *const u8, i), id);
        // Default MXCSR rounding: to nearest, ties to even.
        let r = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), lo), hi);
        store_at(q.as_mut_ptr() as *mut u8, i, _mm512_cvtepi32_epi8(r));
        *sum = _mm512_reduce_add_epi32(r);
    }
    amax / 127.0
}

impl QAct {
    /// Index of block `b` of row `i` in the per-block arrays.
    #[inline(always)]
    pub(crate) fn idx(&self, i: usize, b: usize) -> usize {
        b * self.n + i
    }

    /// The int8 values of block `b` of row `i`.
    pub(crate) fn block(&self, i: usize, b: usize) -> &[i8] {
        &self.qs[self.idx(i, b) * self.bs..][..self.bs]
    }

    /// Quantizes `x` (`n × k`, row-major) for weights of format `fmt`.
    pub(crate) fn quantize(&mut self, fmt: Fmt, x: &[f32], n: usize, k: usize) {
        let bs = fmt.block();
        let nb = k / bs;
        self.n = n;
        self.k = k;
        self.nb = nb;
        self.bs = bs;
        self.qs.resize(n * k, 0);
        self.d.resize(n * nb, 0.0);
        match fmt {
            Fmt::Q4_0 | Fmt::Q5_0 | Fmt::Q8_0 => self.bias.resize(n * nb, 0),
            Fmt::Q4_1 => self.fsum.resize(n * nb, 0.0),
            Fmt::Q4K => self.bsum32.resize(n * nb * 8, 0),
            Fmt::Q6K => self.bias.resize(n * nb * 16, 0),
        }
        let o = fmt.offset();
        let mut sums = [0i32; 16];
        for i in 0..n {
            for b in 0..nb {
                let at = self.idx(i, b);
                let xb = &x[i * k + b * bs..][..bs];
                let sums = &mut sums[..bs / 16];
                let d = quantize_block(xb, &mut self.qs[at * bs..][..bs], sums);
                self.d[at] = d;
                match fmt {
                    Fmt::Q4_0 | Fmt::Q5_0 | Fmt::Q8_0 => self.bias[at] = -o * (sums[0] + sums[1]),
                    Fmt::Q4_1 => self.fsum[at] = d * (sums[0] + sums[1]) as f32,
                    Fmt::Q4K => {
                        for j in 0..8 {
                            self.bsum32[8 * at + j] = (sums[2 * j] + sums[2 * j + 1]) as i16;
                        }
                    }
                    Fmt::Q6K => {
                        for (b, &s) in self.bias[16 * at..16 * at + 16].iter_mut().zip(sums.iter())
                        {
                            *b = -o * s;
                        }
                    }
                }
            }
        }
    }

    /// Runs `f` with `k` of this thread's reusable activation buffers: the
    /// kernels run ~200 times per token, and a fresh allocation of up to a
    /// few hundred KB each time would cost more than small matmuls.
    pub(crate) fn with_scratch<R>(k: usize, f: impl FnOnce(&mut [QAct]) -> R) -> R {
        thread_local! {
            static SCRATCH: RefCell<Vec<QAct>> = const { RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => {
                if s.len() < k {
                    s.resize_with(k, QAct::default);
                }
                f(&mut s[..k])
            }
            // Re-entrant use (never expected): fall back to fresh buffers.
            Err(_) => f(&mut (0..k).map(|_| QAct::default()).collect::<Vec<_>>()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_trick_matches_round_half_even() {
        for v in [
            -2.5f32, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, -126.49, 3.7, -3.7, 0.0,
        ] {
            assert_eq!(round_i32(v), v.round_ties_even() as i32, "{v}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_quantizer_gives_the_same_bits() {
        if !avx512_quantizer() {
            return;
        }
        let mut state = 12345u32;
        for bs in [32usize, 256] {
            for case in 0..200 {
                let x: Vec<f32> = (0..bs)
                    .map(|i| {
                        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        let v = (state >> 8) as f32 / (1 << 24) as f32 - 0.5;
                        // Exact ties and zeros too.
                        match case % 4 {
                            0 => v,
                            1 => (i as f32 - 100.0) * 0.5,
                            2 => 0.0,
                            _ => v * 1e4,
                        }
                    })
                    .collect();
                let (mut q1, mut q2) = (vec![0i8; bs], vec![0i8; bs]);
                let (mut s1, mut s2) = (vec![0i32; bs / 16], vec![0i32; bs / 16]);
                let d1 = quantize_block_scalar(&x, &mut q1, &mut s1);
                // SAFETY: the test runs this only where AVX-512 was detected.
                let d2 = unsafe { quantize_block_avx512(&x, &mut q2, &mut s2) };
                assert_eq!(d1.to_bits(), d2.to_bits());
                assert_eq!(q1, q2);
                assert_eq!(s1, s2);
            }
        }
    }
}
