//! Sixteen f32 lanes, implemented once per instruction set (one 512-bit
//! register, two 256-bit registers, or a plain array), so the attention's
//! loops are written once and compile to real vector code on every level.
//!
//! Every operation is lane-wise IEEE single precision (`fma` fused with one
//! rounding everywhere, the scalar one through `f32::mul_add`), so all three
//! implementations give the same bits: the attention's results do not depend on the CPU it runs on,
//! and a lane's value never depends on its neighbours.
//!
//! Loads and stores go through `kernels::unaligned` (no per-access UB
//! checks in debug-assertion builds). Why not rely on auto-vectorisation: with the dev profile's overflow
//! checks the compiler scalarised the accumulators of these loops (measured:
//! the attention took a fifth of a 16-token forward at 256 tokens of
//! context).

#![allow(clippy::missing_safety_doc)]

use crate::kernels::unaligned::{load_at, store_at};

pub const LANES: usize = 16;

/// # Safety
/// Implementations for SIMD levels may only be used when the CPU has them
/// (callers dispatch on `is_x86_feature_detected!`); pointers must be valid
/// for 16 floats.
pub trait F32x16: Copy {
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// 16 f16 values (as bits) widened to f32 (exact on every level).
    unsafe fn load_f16(p: *const u16) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    /// IEEE division (correctly rounded on every level).
    unsafe fn div(self, o: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    /// `self + a * b` with one rounding (fused multiply-add).
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    /// e^x as [`exp_lane`] computes it, lane by lane (-inf gives 0).
    unsafe fn exp(self) -> Self;
}

const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const EXP_POLY: [f32; 7] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
];

/// e^x (softmax after subtracting the max, SiLU; -inf gives 0, x is
/// clamped to [-87, 88] so 2^n stays a normal float):
/// x = n ln2 + r with r in [-ln2/2, ln2/2] (Cody–Waite split of ln 2 so r stays
/// exact), e^r by its Taylor polynomial to degree 7 (Horner, fused
/// multiply-adds: 7 instructions where separate ones took 14, and the
/// softmax over a long context is a sixth of the attention), 2^n through the
/// exponent bits. Relative error < 5e-7 against libm's ~1 ulp; libm's `expf` is a
/// call per element, which made the softmax a visible share of decode time.
#[inline(always)]
pub fn exp_lane(x: f32) -> f32 {
    if x == f32::NEG_INFINITY {
        return 0.0;
    }
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p.mul_add(r, c);
    }
    p = p.mul_add(r, 1.0);
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

/// Σ e^(x − max) over `xs` (all x <= max: a softmax denominator), 16 lanes
/// at a time on the best instruction set. Drafters that learn from every
/// tree node's distribution need one per node per step: with libm's `expf`
/// that pass cost ~1 ms a step on SmolLM2's 49k vocabulary.
pub fn sum_exp(xs: &[f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn run(xs: &[f32], max: f32) -> f32 {
                sum_exp_with::<Avx512>(xs, max)
            }
            // SAFETY: AVX-512F is present.
            return unsafe { run(xs, max) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            unsafe fn run(xs: &[f32], max: f32) -> f32 {
                sum_exp_with::<Avx2>(xs, max)
            }
            // SAFETY: AVX2 is present.
            return unsafe { run(xs, max) };
        }
    }
    // SAFETY: the scalar lanes need no CPU feature.
    unsafe { sum_exp_with::<Scalar>(xs, max) }
}

#[inline(always)]
unsafe fn sum_exp_with<V: F32x16>(xs: &[f32], max: f32) -> f32 {
    let shift = V::splat(-max);
    let mut acc = V::zero();
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        acc = acc.add(V::load(c.as_ptr()).add(shift).exp());
    }
    let mut lanes = [0f32; LANES];
    acc.store(lanes.as_mut_ptr());
    lanes.iter().sum::<f32>() + rest.iter().map(|&x| exp_lane(x - max)).sum::<f32>()
}

/// `gate = silu(gate) · up = gate / (1 + e^-gate) · up`, in place, 16
/// lanes at a time on the best instruction set (every level gives the same
/// bits). A per-element libm `expf` made this a tenth of a 16-token forward.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate and up differ in length"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn run(g: &mut [f32], u: &[f32]) {
                silu_mul_with::<Avx512>(g, u)
            }
            // SAFETY: AVX-512F is present.
            return unsafe { run(gate, up) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run(g: &mut [f32], u: &[f32]) {
                silu_mul_with::<Avx2>(g, u)
            }
            // SAFETY: AVX2 and FMA are present.
            return unsafe { run(gate, up) };
        }
    }
    // SAFETY: the scalar lanes need no CPU feature.
    unsafe { silu_mul_with::<Scalar>(gate, up) }
}

#[inline(always)]
unsafe fn silu_mul_with<V: F32x16>(gate: &mut [f32], up: &[f32]) {
    let one = V::splat(1.0);
    let zero = V::zero();
    let n = gate.len() / LANES * LANES;
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let mut i = 0;
    while i < n {
        let x = V::load(g.wrapping_add(i));
        let e = zero.fma(x, V::splat(-1.0)).exp();
        x.div(one.add(e))
            .mul(V::load(u.wrapping_add(i)))
            .store(g.wrapping_add(i));
        i += LANES;
    }
    for (x, &v) in gate[n..].iter_mut().zip(&up[n..]) {
        *x = *x / (1.0 + exp_lane(-*x)) * v;
    }
}

/// The portable reference.
#[derive(Clone, Copy)]
pub struct Scalar([f32; LANES]);

impl F32x16 for Scalar {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Scalar([0.0; LANES])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Scalar([x; LANES])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Scalar(load_at::<[f32; LANES]>(p as *const u8, 0))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        let b = load_at::<[u16; LANES]>(p as *const u8, 0);
        Scalar(b.map(|x| half::f16::from_bits(x).to_f32()))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        store_at::<[f32; LANES]>(p as *mut u8, 0, self.0)
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Scalar(std::array::from_fn(|l| self.0[l] + o.0[l]))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Scalar(std::array::from_fn(|l| self.0[l] * o.0[l]))
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        Scalar(std::array::from_fn(|l| self.0[l] / o.0[l]))
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        Scalar(std::array::from_fn(|l| self.0[l].max(o.0[l])))
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        Scalar(std::array::from_fn(|l| a.0[l].mul_add(b.0[l], self.0[l])))
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        Scalar(self.0.map(exp_lane))
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Two 256-bit registers (AVX2 + FMA machines).
    #[derive(Clone, Copy)]
    pub struct Avx2(__m256, __m256);

    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let neg_inf = _mm256_cmp_ps::<_CMP_EQ_OQ>(x, _mm256_set1_ps(f32::NEG_INFINITY));
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(LN2_LO),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x),
        );
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(_mm256_castsi256_ps(e), p);
        _mm256_andnot_ps(neg_inf, y)
    }

    impl F32x16 for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx2(_mm256_set1_ps(x), _mm256_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx2(
                load_at::<__m256>(p as *const u8, 0),
                load_at::<__m256>(p as *const u8, 1),
            )
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            Avx2(
                _mm256_cvtph_ps(load_at::<__m128i>(p as *const u8, 0)),
                _mm256_cvtph_ps(load_at::<__m128i>(p as *const u8, 1)),
            )
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            store_at::<__m256>(p as *mut u8, 0, self.0);
            store_at::<__m256>(p as *mut u8, 1, self.1);
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Avx2(_mm256_add_ps(self.0, o.0), _mm256_add_ps(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            Avx2(_mm256_mul_ps(self.0, o.0), _mm256_mul_ps(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            Avx2(_mm256_div_ps(self.0, o.0), _mm256_div_ps(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            Avx2(_mm256_max_ps(self.0, o.0), _mm256_max_ps(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            Avx2(
                _mm256_fmadd_ps(a.0, b.0, self.0),
                _mm256_fmadd_ps(a.1, b.1, self.1),
            )
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            Avx2(exp8(self.0), exp8(self.1))
        }
    }

    /// One 512-bit register.
    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl F32x16 for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx512(_mm512_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(load_at::<__m512>(p as *const u8, 0))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            Avx512(_mm512_cvtph_ps(load_at::<__m256i>(p as *const u8, 0)))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            store_at::<__m512>(p as *mut u8, 0, self.0)
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Avx512(_mm512_add_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            Avx512(_mm512_mul_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            Avx512(_mm512_div_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            Avx512(_mm512_max_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            Avx512(_mm512_fmadd_ps(a.0, b.0, self.0))
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            let x = self.0;
            let neg_inf = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, _mm512_set1_ps(f32::NEG_INFINITY));
            let x = _mm512_min_ps(
                _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
                _mm512_set1_ps(88.0),
            );
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm512_fnmadd_ps(
                n,
                _mm512_set1_ps(LN2_LO),
                _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x),
            );
            let mut p = _mm512_set1_ps(EXP_POLY[0]);
            for c in &EXP_POLY[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
            let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            ));
            let y = _mm512_mul_ps(_mm512_castsi512_ps(e), p);
            Avx512(_mm512_maskz_mov_ps(!neg_inf, y))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_exp_matches_libm() {
        let xs: Vec<f32> = (0..49_999)
            .map(|i| ((i * 7919 % 1000) as f32) / 50.0 - 12.0)
            .collect();
        let max = xs.iter().copied().fold(f32::MIN, f32::max);
        let want: f64 = xs.iter().map(|&x| ((x - max) as f64).exp()).sum();
        let got = sum_exp(&xs, max) as f64;
        assert!(((got - want) / want).abs() < 1e-4, "{got} vs {want}");
        assert_eq!(sum_exp(&[], 0.0), 0.0);
    }

    #[test]
    fn exp_lane_is_accurate() {
        let mut worst = 0f32;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (a, b) = (exp_lane(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_lane(0.0), 1.0);
        assert_eq!(exp_lane(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn silu_mul_matches_reference_on_every_level() {
        // Both signs, large magnitudes (e^-x overflows past 88), a tail
        // that is not a multiple of 16.
        let gate: Vec<f32> = (0..16 * 40 + 7)
            .map(|i| ((i * 7919 % 20_011) as f32 - 10_005.0) / 50.0)
            .collect();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| 1.0 + (i % 13) as f32 / 7.0)
            .collect();
        let mut got = gate.clone();
        silu_mul(&mut got, &up);
        let mut scalar = gate.clone();
        // SAFETY: the scalar level needs no CPU feature; equal lengths.
        unsafe { silu_mul_with::<Scalar>(&mut scalar, &up) };
        for i in 0..gate.len() {
            let (g, u) = (gate[i] as f64, up[i] as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            // Past -88 e^-x is clamped at e^88: silu is ~1e-36 instead of ~0.
            let tol = 2e-6 * want.abs() + 1e-30;
            assert!(
                (got[i] as f64 - want).abs() <= tol,
                "silu({g}) * {u}: {} vs {want}",
                got[i]
            );
            assert_eq!(
                got[i].to_bits(),
                scalar[i].to_bits(),
                "level differs at {i}"
            );
        }
    }

    /// Every level gives the scalar reference's bits.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn levels_agree_bit_for_bit() {
        let xs: Vec<f32> = (0..16 * 64)
            .map(|i| match i % 97 {
                0 => f32::NEG_INFINITY,
                k => -((i * 7919 % 100_003) as f32) / 997.0 * (k as f32 / 50.0),
            })
            .collect();
        unsafe fn run<V: F32x16>(xs: &[f32]) -> Vec<u32> {
            let mut out = vec![0f32; xs.len()];
            let mut acc = V::zero();
            for (c, o) in xs.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                let x = V::load(c.as_ptr());
                let y = x
                    .exp()
                    .add(x.mul(V::splat(-1.0)).exp().div(V::splat(3.0)))
                    .mul(V::splat(1.5))
                    .add(acc.max(x))
                    .fma(x, V::splat(0.3));
                acc = acc.add(y);
                y.store(o.as_mut_ptr());
            }
            acc.store(out.as_mut_ptr());
            out.iter().map(|f| f.to_bits()).collect()
        }
        // SAFETY (the three calls): `run` touches only `xs` and its own
        // buffer in whole 16-float chunks; each level runs where detected.
        let want = unsafe { run::<Scalar>(&xs) };
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            unsafe fn avx2(xs: &[f32]) -> Vec<u32> {
                run::<Avx2>(xs)
            }
            assert!(unsafe { avx2(&xs) } == want, "avx2 differs");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(xs: &[f32]) -> Vec<u32> {
                run::<Avx512>(xs)
            }
            assert!(unsafe { avx512(&xs) } == want, "avx512 differs");
        }
    }
}
