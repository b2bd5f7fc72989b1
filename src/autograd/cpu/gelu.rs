//! Exact (erf) GELU on the CPU, vectorized: `gelu(x) = x·Φ(x)` and `gelu'(x) = Φ(x) + x·φ(x)`, with
//! Φ the standard normal CDF and φ its density (torch's `gelu(x)`, approximate="none", and its
//! backward). AVX-512 (16 lanes) and AVX2 + FMA (8 lanes) intrinsics, and a portable scalar loop, all
//! doing the same IEEE f32 operations in the same order (every fused multiply-add is an explicit FMA
//! on every path), so the three give the same bits; the tests compare them bit for bit.
//!
//! Φ comes from erfc rather than erf: `Φ(x) = ½·erfc(|x|/√2)` for x < 0 and `1 - ½·erfc(|x|/√2)`
//! otherwise, with `erfc(a) = t·exp(P(t) - a²)`, `t = 1/(1 + a/2)` and P a degree-10 polynomial —
//! the functional form of the Chebyshev fit in Numerical Recipes' `erfcc` (Press et al., 2nd ed.,
//! §6.2), with our own coefficients: a Lawson-weighted least-squares fit of `ln(erfc(a)/t) + a²` over
//! a ∈ [0, 10] against 40-digit mpmath values, max error 5.7e-9 in the exponent (so 5.7e-9 relative in
//! erfc before f32 rounding). Unlike `1 + erf(x/√2)`, this keeps Φ's relative accuracy for negative x.
//! Beyond a = 10 (|x| > 14.1) erfc is below f32's normal range and a is clamped there.
//!
//! exp is `crate::tensor::exp::exp_nonpos` (shared with softmax and cross-entropy; every argument
//! here is ≤ 0, results below f32's smallest normal are flushed to 0).
//!
//! Measured in f32 against 30-digit mpmath over x ∈ [-14, 14] (and a normal sample): max error of
//! gelu 0.11 of the tests' tolerance (3e-6 relative + 1e-7 absolute). Cost per element: one divide,
//! one exp (forward) or two (backward), 20 FMAs; libm's scalar `erff` took ~14% of a MiniLM training
//! step.

use crate::quant::cpu::Isa;
use crate::tensor::exp::exp_nonpos;

/// P's coefficients, constant term first.
const P: [f32; 11] = [
    -1.265_573_1,
    1.001_693_1,
    0.354_539,
    0.224_840_02,
    -0.705_500_2,
    1.644_304,
    -3.503_571,
    4.176_139_4,
    -2.740_454_7,
    0.951_796_4,
    -0.138_213_22,
];
/// Where erfc(a) leaves f32's range.
const A_MAX: f32 = 10.0;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = super::INV_SQRT_2PI;

// ------------------------------------------------------------------------------------------------
// Portable (the definition every vector path reproduces)
// ------------------------------------------------------------------------------------------------

/// (Φ(x), a = min(|x|/√2, A_MAX)).
#[inline(always)]
fn cdf(x: f32) -> (f32, f32) {
    // f32::min returns the non-NaN operand: a NaN x gives a = A_MAX, and NaN again in `x·Φ`.
    let a = (x.abs() * FRAC_1_SQRT_2).min(A_MAX);
    let t = 1.0 / 0.5f32.mul_add(a, 1.0);
    let mut p = P[10];
    for &c in P[..10].iter().rev() {
        p = p.mul_add(t, c);
    }
    let half_erfc = (0.5 * t) * exp_nonpos((-a).mul_add(a, p));
    (if x < 0.0 { half_erfc } else { 1.0 - half_erfc }, a)
}

/// gelu(x) = x·Φ(x).
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    x * cdf(x).0
}

/// gelu'(x) = Φ(x) + x·φ(x).
#[inline(always)]
pub(crate) fn gelu_derivative(x: f32) -> f32 {
    let (phi, a) = cdf(x);
    let pdf = INV_SQRT_2PI * exp_nonpos(-(a * a));
    x.mul_add(pdf, phi)
}

fn forward_portable(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = gelu(x);
    }
}

/// `dx = dy·gelu'(x)`, and 0 where the derivative is 0 (even for an infinite dy, as torch's select).
#[inline(always)]
fn grad(d: f32, dy: f32) -> f32 {
    if d == 0.0 { 0.0 } else { dy * d }
}

fn backward_portable(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        *dx = grad(gelu_derivative(x), dy);
    }
}

// ------------------------------------------------------------------------------------------------
// Drivers
// ------------------------------------------------------------------------------------------------

/// `y[i] = gelu(x[i])` with `isa` (which must be available; see [`Isa::is_available`]).
pub(crate) fn forward_with(isa: Isa, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller chose an ISA this CPU has (`Isa::is_available`); AVX-512F is part of it.
        Isa::Avx512 if isa.is_available() => unsafe { avx512::forward(x, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; the AVX2 ISA includes FMA.
        Isa::Avx2 if isa.is_available() => unsafe { avx2::forward(x, y) },
        _ => forward_portable(x, y),
    }
}

/// `dx[i] = dy[i]·gelu'(x[i])` with `isa` (falls back to the portable loop if it is not available).
pub(crate) fn backward_with(isa: Isa, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let n = x.len().min(dy.len()).min(dx.len());
    let (x, dy, dx) = (&x[..n], &dy[..n], &mut dx[..n]);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `is_available` checked AVX-512F.
        Isa::Avx512 if isa.is_available() => unsafe { avx512::backward(x, dy, dx) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `is_available` checked AVX2 and FMA.
        Isa::Avx2 if isa.is_available() => unsafe { avx2::backward(x, dy, dx) },
        _ => backward_portable(x, dy, dx),
    }
}

/// [`forward_with`] the fastest available ISA.
pub(crate) fn forward(x: &[f32], y: &mut [f32]) {
    forward_with(Isa::best(), x, y)
}

/// [`backward_with`] the fastest available ISA.
pub(crate) fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    backward_with(Isa::best(), x, dy, dx)
}

// ------------------------------------------------------------------------------------------------
// AVX-512 and AVX2 + FMA: one body, instantiated per lane width
// ------------------------------------------------------------------------------------------------

/// The vector kernels of one ISA: `$V` lanes of `$w` floats, the ISA's intrinsics by role, and the
/// module's own `abs`, `select_neg` (per lane: `if x < 0 { a } else { b }`) and `zero_where_zero`
/// (per lane: `if d == 0 { 0 } else { v }`). Tails go through a zero-padded stack buffer.
#[cfg(target_arch = "x86_64")]
macro_rules! lanes {
    (
        $feat:literal, $V:ty, $w:literal,
        set1: $set1:ident, mul: $mul:ident, sub: $sub:ident, fmadd: $fmadd:ident, div: $div:ident,
        min: $min:ident, max: $max:ident, round: $round:ident, cvt: $cvt:ident, addi: $addi:ident,
        set1i: $set1i:ident, slli: $slli:ident, cast: $cast:ident, zero: $zero:ident,
        load: $load:ident, store: $store:ident
    ) => {
        /// (Φ(x), a) per lane.
        #[target_feature(enable = $feat)]
        #[inline]
        fn cdf(x: $V) -> ($V, $V) {
            // vminps returns its second operand when either is NaN, as f32::min(NaN, A_MAX) does.
            let a = $min($mul(abs(x), $set1(FRAC_1_SQRT_2)), $set1(A_MAX));
            let one = $set1(1.0);
            let t = $div(one, $fmadd($set1(0.5), a, one));
            let mut p = $set1(P[10]);
            for &c in P[..10].iter().rev() {
                p = $fmadd(p, t, $set1(c));
            }
            let e = exp_nonpos($fmadd($sub($zero(), a), a, p));
            let half_erfc = $mul($mul($set1(0.5), t), e);
            (select_neg(x, half_erfc, $sub(one, half_erfc)), a)
        }

        #[target_feature(enable = $feat)]
        #[inline]
        fn gelu_v(x: $V) -> $V {
            $mul(x, cdf(x).0)
        }

        #[target_feature(enable = $feat)]
        #[inline]
        fn grad_v(x: $V, g: $V) -> $V {
            let (phi, a) = cdf(x);
            let pdf = $mul($set1(INV_SQRT_2PI), exp_nonpos($sub($zero(), $mul(a, a))));
            let d = $fmadd(x, pdf, phi);
            zero_where_zero(d, $mul(g, d))
        }

        /// # Safety
        /// The CPU must support the module's ISA; `x` and `y` have the same length.
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn forward(x: &[f32], y: &mut [f32]) {
            let n = x.len();
            let body = n - n % $w;
            for i in (0..body).step_by($w) {
                // SAFETY: i + lanes <= body <= n, the length of both slices.
                unsafe { $store(y.as_mut_ptr().add(i), gelu_v($load(x.as_ptr().add(i)))) };
            }
            if body < n {
                let (mut xb, mut yb) = ([0f32; $w], [0f32; $w]);
                xb[..n - body].copy_from_slice(&x[body..]);
                // SAFETY: both buffers hold one vector.
                unsafe { $store(yb.as_mut_ptr(), gelu_v($load(xb.as_ptr()))) };
                y[body..].copy_from_slice(&yb[..n - body]);
            }
        }

        /// # Safety
        /// The CPU must support the module's ISA; the three slices have the same length.
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
            let n = x.len();
            let body = n - n % $w;
            for i in (0..body).step_by($w) {
                // SAFETY: i + lanes <= body <= n, the length of all three slices.
                unsafe {
                    let v = grad_v($load(x.as_ptr().add(i)), $load(dy.as_ptr().add(i)));
                    $store(dx.as_mut_ptr().add(i), v);
                }
            }
            if body < n {
                let (mut xb, mut gb, mut ob) = ([0f32; $w], [0f32; $w], [0f32; $w]);
                xb[..n - body].copy_from_slice(&x[body..]);
                gb[..n - body].copy_from_slice(&dy[body..]);
                // SAFETY: the three buffers hold one vector each.
                unsafe {
                    $store(
                        ob.as_mut_ptr(),
                        grad_v($load(xb.as_ptr()), $load(gb.as_ptr())),
                    )
                };
                dx[body..].copy_from_slice(&ob[..n - body]);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use crate::tensor::exp::avx512::exp_nonpos;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn abs(x: __m512) -> __m512 {
        _mm512_abs_ps(x)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn select_neg(x: __m512, a: __m512, b: __m512) -> __m512 {
        _mm512_mask_mov_ps(b, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps()), a)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn zero_where_zero(d: __m512, v: __m512) -> __m512 {
        let z = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(d, _mm512_setzero_ps());
        _mm512_mask_mov_ps(v, z, _mm512_setzero_ps())
    }

    lanes!(
        "avx512f", __m512, 16,
        set1: _mm512_set1_ps, mul: _mm512_mul_ps, sub: _mm512_sub_ps, fmadd: _mm512_fmadd_ps,
        div: _mm512_div_ps, min: _mm512_min_ps, max: _mm512_max_ps, round: _mm512_roundscale_ps,
        cvt: _mm512_cvtps_epi32, addi: _mm512_add_epi32, set1i: _mm512_set1_epi32,
        slli: _mm512_slli_epi32, cast: _mm512_castsi512_ps, zero: _mm512_setzero_ps,
        load: _mm512_loadu_ps, store: _mm512_storeu_ps
    );
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::tensor::exp::avx2::exp_nonpos;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn abs(x: __m256) -> __m256 {
        _mm256_andnot_ps(_mm256_set1_ps(-0.0), x)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn select_neg(x: __m256, a: __m256, b: __m256) -> __m256 {
        _mm256_blendv_ps(b, a, _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps()))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn zero_where_zero(d: __m256, v: __m256) -> __m256 {
        _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(d, _mm256_setzero_ps()), v)
    }

    lanes!(
        "avx2,fma", __m256, 8,
        set1: _mm256_set1_ps, mul: _mm256_mul_ps, sub: _mm256_sub_ps, fmadd: _mm256_fmadd_ps,
        div: _mm256_div_ps, min: _mm256_min_ps, max: _mm256_max_ps, round: _mm256_round_ps,
        cvt: _mm256_cvtps_epi32, addi: _mm256_add_epi32, set1i: _mm256_set1_epi32,
        slli: _mm256_slli_epi32, cast: _mm256_castsi256_ps, zero: _mm256_setzero_ps,
        load: _mm256_loadu_ps, store: _mm256_storeu_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::tensor::exp::EXP_MIN;

    /// Equal bits, or both NaN.
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Values of every magnitude, the specials, and the boundaries of the code's ranges.
    fn inputs(n: usize) -> Vec<f32> {
        let mut rng = Rng::new(7);
        let mut v: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            1e-45,
            -1e-45,
            1e-38,
            -13.2,
            -14.142_136,
            -14.2,
            14.2,
            -12.0,
            -9.0,
        ];
        while v.len() < n {
            let e = rng.below(24) as i32 - 12;
            v.push(rng.normal() * 2f32.powi(e));
        }
        v
    }

    /// The AVX-512 and AVX2 kernels give the portable loop's bits, forward and backward, at every
    /// length up to 40 (every tail) and on a long mixed input.
    #[test]
    fn vector_paths_match_portable_bit_for_bit() {
        let x = inputs(4099);
        let dy: Vec<f32> = {
            let mut r = Rng::new(3);
            let mut d: Vec<f32> = (0..x.len()).map(|_| r.normal()).collect();
            d[5] = f32::INFINITY; // times a zero derivative must give 0
            d
        };
        let lens: Vec<usize> = (0..=40).chain([x.len()]).collect();
        for isa in Isa::available() {
            for &n in &lens {
                let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
                forward_with(Isa::Portable, &x[..n], &mut want);
                forward_with(isa, &x[..n], &mut got);
                for i in 0..n {
                    assert!(
                        same(got[i], want[i]),
                        "{isa:?} forward n={n} x={}: {} vs {}",
                        x[i],
                        got[i],
                        want[i]
                    );
                }
                backward_with(Isa::Portable, &x[..n], &dy[..n], &mut want);
                backward_with(isa, &x[..n], &dy[..n], &mut got);
                for i in 0..n {
                    assert!(
                        same(got[i], want[i]),
                        "{isa:?} backward n={n} x={}: {} vs {}",
                        x[i],
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }

    /// exp against f64 over its whole domain (≤ 2 ulp of the true value, or 0 below the normal range).
    #[test]
    fn exp_matches_f64() {
        let mut y = -90.0f32;
        while y <= 0.0 {
            let got = exp_nonpos(y);
            let want = (y as f64).exp();
            if y < EXP_MIN {
                assert_eq!(got, 0.0, "y={y}");
            } else {
                let ulp = f32::EPSILON as f64 * want;
                assert!((got as f64 - want).abs() <= 2.0 * ulp, "y={y}: {got} vs {want}");
            }
            y += 0.001_37;
        }
        assert_eq!(exp_nonpos(0.0), 1.0);
    }
}
