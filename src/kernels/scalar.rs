//! Portable reference kernel over the tiled layout. It performs the same
//! integer dot products and the same float combination per block as the
//! AVX-512 path, so they agree up to float rounding (fused or not) and
//! summation order; the AVX2 path scales K-quant sub-blocks in integers.

use super::act::QAct;
use super::layout::{codes, row_scales, Fmt, TILE};
use super::Tiles;

fn dot(c: &[u8], a: &[i8]) -> i32 {
    c.iter().zip(a).map(|(&c, &a)| c as i32 * a as i32).sum()
}

/// Column j of row i goes to `y[i × ldy + j]`.
pub(crate) fn run(m: &Tiles, act: &QAct, tiles: std::ops::Range<usize>, y: *mut f32, ldy: usize) {
    let (fmt, nb, bs) = (m.fmt, m.blocks, m.fmt.block());
    let rec_bytes = fmt.rec_bytes();
    let mut c = [0u8; 256];
    let mut acc = vec![0f32; act.n];
    for t in tiles {
        for r in 0..TILE {
            let row = t * TILE + r;
            if row >= m.out {
                break;
            }
            acc.fill(0.0);
            for b in 0..nb {
                let rec = m.record(t, b);
                debug_assert_eq!(rec.len(), rec_bytes);
                let c = &mut c[..bs];
                codes(fmt, rec, r, c);
                let s = row_scales(fmt, rec, r);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ab = act.idx(i, b);
                    let a = act.block(i, b);
                    let da = act.d[ab];
                    match fmt {
                        Fmt::Q4_0 | Fmt::Q5_0 | Fmt::Q8_0 => {
                            let isum = dot(c, a) + act.bias[ab];
                            *acc += isum as f32 * (s.d * da);
                        }
                        Fmt::Q4_1 => {
                            *acc += dot(c, a) as f32 * (s.d * da);
                            *acc += s.m * act.fsum[ab];
                        }
                        // Sub-block sums scaled in float, as the AVX-512
                        // kernels do.
                        Fmt::Q4K => {
                            let mut fsum = 0f32;
                            let mut msum = 0i32;
                            for j in 0..8 {
                                let d = dot(&c[32 * j..32 * j + 32], &a[32 * j..]);
                                fsum += d as f32 * s.sc[j] as f32;
                                msum += s.mins[j] * act.bsum32[ab * 8 + j] as i32;
                            }
                            *acc += fsum * (s.d * da);
                            *acc -= msum as f32 * (s.m * da);
                        }
                        Fmt::Q6K => {
                            let mut fsum = 0f32;
                            for j in 0..16 {
                                let d = dot(&c[16 * j..16 * j + 16], &a[16 * j..]);
                                fsum += (d + act.bias[ab * 16 + j]) as f32 * s.sc[j] as f32;
                            }
                            *acc += fsum * (s.d * da);
                        }
                    }
                }
            }
            for (i, &v) in acc.iter().enumerate() {
                // SAFETY: the caller gives each thread disjoint tiles, and
                // `y` holds `n` rows `ldy` apart.
                unsafe { *y.add(i * ldy + row) = v };
            }
        }
    }
}
