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

fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        q.fill(0);
        // A non-finite activation poisons the output like a float matmul
        // would, instead of silently quantizing to garbage.
        return if amax.is_finite() { 0.0 } else { f32::NAN };
    }
    let id = 127.0 / amax;
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = round_i32(xi * id).clamp(-127, 127) as i8;
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
        for i in 0..n {
            for b in 0..nb {
                let at = self.idx(i, b);
                let xb = &x[i * k + b * bs..][..bs];
                self.d[at] = quantize_block(xb, &mut self.qs[at * bs..][..bs]);
            }
        }
        let sum = |q: &[i8]| q.iter().map(|&v| v as i32).sum::<i32>();
        match fmt {
            Fmt::Q4_0 | Fmt::Q5_0 | Fmt::Q8_0 => {
                let o = fmt.offset();
                self.bias.clear();
                self.bias
                    .extend(self.qs.chunks_exact(32).map(|q| -o * sum(q)));
            }
            Fmt::Q4_1 => {
                self.fsum.clear();
                self.fsum.extend(
                    self.qs
                        .chunks_exact(32)
                        .zip(&self.d)
                        .map(|(q, &d)| d * sum(q) as f32),
                );
            }
            Fmt::Q4K => {
                self.bsum32.clear();
                self.bsum32
                    .extend(self.qs.chunks_exact(32).map(|q| sum(q) as i16));
            }
            Fmt::Q6K => {
                self.bias.clear();
                self.bias
                    .extend(self.qs.chunks_exact(16).map(|q| -32 * sum(q)));
            }
        }
    }

    /// Runs `f` with this thread's reusable activation buffers: the kernels
    /// run ~200 times per token, and a fresh allocation of up to a few
    /// hundred KB each time would cost more than small matmuls.
    pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut QAct) -> R) -> R {
        thread_local! {
            static SCRATCH: RefCell<QAct> = RefCell::new(QAct::default());
        }
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => f(&mut s),
            // Re-entrant use (never expected): fall back to a fresh buffer.
            Err(_) => f(&mut QAct::default()),
        })
    }
}
