//! `eʸ` for softmax-like arguments (y ≤ 0), vectorized: one definition shared by the exact GELU
//! (`autograd::cpu::gelu`), the attention softmax (`attention::cpu`) and cross-entropy
//! (`autograd::cpu`).
//!
//! `eʸ = 2ⁿ·p(r)`, n = round(y·log2 e), r = y − n·ln 2 in two Cody–Waite steps, p a degree-6
//! minimax-style fit of eʳ on [−ln2/2, ln2/2] (1.9e-9 relative; about 1 ulp after f32 rounding). Results
//! below f32's smallest normal (y < −87.34) are flushed to 0. The formula is also exact to ~1 ulp for
//! 0 < y ≤ 88 (2ⁿ stays a normal f32), which covers arguments that are ≤ 0 up to rounding; larger
//! arguments are clamped to 88.
//!
//! The AVX-512 (16 lanes) and AVX2 + FMA (8 lanes) versions do the same IEEE f32 operations in the same
//! order as the portable one (every multiply-add an explicit FMA), so all three give the same bits
//! (tested). libm's scalar `expf` was ~3% of the CPU time of a Llama training step (softmax,
//! cross-entropy over a 32000-word vocabulary); the vector form costs ~10 FMAs per 16 values.

/// eʳ's polynomial coefficients, constant term first.
pub(crate) const E: [f32; 7] = [
    1.0,
    1.0,
    0.499_999_9,
    0.166_664_2,
    0.041_668_225,
    0.008_374_816,
    0.001_383_684_2,
];
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n·LN2_HI` is exact for |n| < 2^12.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// ln(2^-126): below it exp's result is not a normal f32 and is flushed to 0.
pub(crate) const EXP_MIN: f32 = -87.336_54;
/// Arguments are clamped to at most this (2ⁿ stays a normal f32; e^88 ≈ 1.65e38 is finite).
const EXP_MAX: f32 = 88.0;

/// `eʸ` for y ≤ 0 (0 below [`EXP_MIN`]; a NaN `y` gives `e^EXP_MIN`, callers that see NaN use
/// [`exp_sub2`]).
#[inline(always)]
pub(crate) fn exp_nonpos(y: f32) -> f32 {
    // Not `clamp`: a NaN y must become EXP_MIN here, as vmaxps makes it in the vector paths.
    #[allow(clippy::manual_clamp)]
    let yc = y.max(EXP_MIN).min(EXP_MAX);
    let n = (yc * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, yc);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = E[6];
    for &c in E[..6].iter().rev() {
        p = p.mul_add(r, c);
    }
    // n ∈ [-126, 127] after the clamps: 2ⁿ is a normal f32.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if y < EXP_MIN { 0.0 } else { p * scale }
}

/// One element of [`exp_sub2`].
#[inline(always)]
fn exp_sub2_one(x: f32, mul: f32, a: f32, b: f32) -> f32 {
    let y = x * mul - a - b;
    if y.is_nan() { y } else { exp_nonpos(y) }
}

/// `x ← e^((x·mul − a) − b)` in place (each operation rounded in f32, in that order), for arguments
/// that are ≤ 0 up to rounding (softmax: `x − max`, `x·scale − lse`); NaN stays NaN, −∞ gives 0.
pub(crate) fn exp_sub2(x: &mut [f32], mul: f32, a: f32, b: f32) {
    exp_sub2_with(best(), x, mul, a, b)
}

/// [`exp_sub2`] with the ISA `isa` (2: AVX-512F, 1: AVX2 + FMA, 0: portable), or the best available
/// below it.
fn exp_sub2_with(isa: u8, x: &mut [f32], mul: f32, a: f32, b: f32) {
    match isa.min(best()) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `best` returned 2 only after detecting AVX-512F.
        2 => unsafe { avx512::exp_sub2(x, mul, a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `best` returned 1 only after detecting AVX2 and FMA.
        1 => unsafe { avx2::exp_sub2(x, mul, a, b) },
        _ => x.iter_mut().for_each(|v| *v = exp_sub2_one(*v, mul, a, b)),
    }
}

/// 2: AVX-512F, 1: AVX2 + FMA, 0: portable (detected once).
fn best() -> u8 {
    static BEST: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return 2;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return 1;
            }
        }
        0
    })
}

/// The vector `exp_nonpos` and `exp_sub2` of one ISA, from its intrinsics by role and the module's
/// own `below_min` (per lane: `v`, or 0 where `y < EXP_MIN`) and `keep_nan` (per lane: `y` where it is
/// NaN, else `v`).
#[cfg(target_arch = "x86_64")]
macro_rules! exp_lanes {
    (
        $feat:literal, $V:ty, $w:literal,
        set1: $set1:ident, mul: $mul:ident, sub: $sub:ident, fmadd: $fmadd:ident, max: $max:ident,
        min: $min:ident,
        round: $round:ident, cvt: $cvt:ident, addi: $addi:ident, set1i: $set1i:ident,
        slli: $slli:ident, cast: $cast:ident, load: $load:ident, store: $store:ident
    ) => {
        /// [`super::exp_nonpos`] per lane.
        #[target_feature(enable = $feat)]
        #[inline]
        pub(crate) fn exp_nonpos(y: $V) -> $V {
            let yc = $min($max(y, $set1(EXP_MIN)), $set1(EXP_MAX));
            let n = $round::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>($mul(yc, $set1(LOG2E)));
            let r = $fmadd(n, $set1(-LN2_HI), yc);
            let r = $fmadd(n, $set1(-LN2_LO), r);
            let mut p = $set1(E[6]);
            for &c in E[..6].iter().rev() {
                p = $fmadd(p, r, $set1(c));
            }
            let scale = $cast($slli::<23>($addi($cvt(n), $set1i(127))));
            below_min(y, $mul(p, scale))
        }

        #[target_feature(enable = $feat)]
        #[inline]
        fn exp_sub2_v(x: $V, mul: $V, a: $V, b: $V) -> $V {
            let y = $sub($sub($mul(x, mul), a), b);
            keep_nan(y, exp_nonpos(y))
        }

        /// # Safety
        /// The CPU must support the module's ISA.
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn exp_sub2(x: &mut [f32], mul: f32, a: f32, b: f32) {
            let (mul, a, b) = ($set1(mul), $set1(a), $set1(b));
            let n = x.len();
            let body = n - n % $w;
            for i in (0..body).step_by($w) {
                // SAFETY: i + lanes <= body <= n.
                unsafe {
                    let p = x.as_mut_ptr().add(i);
                    $store(p, exp_sub2_v($load(p), mul, a, b));
                }
            }
            if body < n {
                let mut buf = [0f32; $w];
                buf[..n - body].copy_from_slice(&x[body..]);
                // SAFETY: the buffer holds one vector.
                unsafe { $store(buf.as_mut_ptr(), exp_sub2_v($load(buf.as_ptr()), mul, a, b)) };
                x[body..].copy_from_slice(&buf[..n - body]);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{E, EXP_MAX, EXP_MIN, LN2_HI, LN2_LO, LOG2E};
    use std::arch::x86_64::*;

    /// `v`, or 0 where `y` < EXP_MIN.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn below_min(y: __m512, v: __m512) -> __m512 {
        let small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(y, _mm512_set1_ps(EXP_MIN));
        _mm512_mask_mov_ps(v, small, _mm512_setzero_ps())
    }

    /// `y` where it is NaN, else `v`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn keep_nan(y: __m512, v: __m512) -> __m512 {
        _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y, y), y)
    }

    exp_lanes!(
        "avx512f", __m512, 16,
        set1: _mm512_set1_ps, mul: _mm512_mul_ps, sub: _mm512_sub_ps, fmadd: _mm512_fmadd_ps,
        max: _mm512_max_ps, min: _mm512_min_ps, round: _mm512_roundscale_ps, cvt: _mm512_cvtps_epi32,
        addi: _mm512_add_epi32, set1i: _mm512_set1_epi32, slli: _mm512_slli_epi32,
        cast: _mm512_castsi512_ps, load: _mm512_loadu_ps, store: _mm512_storeu_ps
    );
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{E, EXP_MAX, EXP_MIN, LN2_HI, LN2_LO, LOG2E};
    use std::arch::x86_64::*;

    /// `v`, or 0 where `y` < EXP_MIN.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn below_min(y: __m256, v: __m256) -> __m256 {
        _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(y, _mm256_set1_ps(EXP_MIN)), v)
    }

    /// `y` where it is NaN, else `v`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn keep_nan(y: __m256, v: __m256) -> __m256 {
        _mm256_blendv_ps(v, y, _mm256_cmp_ps::<_CMP_UNORD_Q>(y, y))
    }

    exp_lanes!(
        "avx2,fma", __m256, 8,
        set1: _mm256_set1_ps, mul: _mm256_mul_ps, sub: _mm256_sub_ps, fmadd: _mm256_fmadd_ps,
        max: _mm256_max_ps, min: _mm256_min_ps, round: _mm256_round_ps, cvt: _mm256_cvtps_epi32,
        addi: _mm256_add_epi32, set1i: _mm256_set1_epi32, slli: _mm256_slli_epi32,
        cast: _mm256_castsi256_ps, load: _mm256_loadu_ps, store: _mm256_storeu_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Softmax-like arguments of every scale, the specials and the range edges.
    fn inputs(n: usize) -> Vec<f32> {
        let mut rng = Rng::new(11);
        let mut v = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
            EXP_MIN,
            EXP_MIN - 1e-3,
            -87.0,
            -1e-30,
            1e-7,
            0.3,
            -0.346_573_6,
            -0.346_573_62,
        ];
        while v.len() < n {
            let e = rng.below(10) as i32 - 4;
            v.push(-(rng.normal().abs()) * 2f32.powi(e));
        }
        v
    }

    /// The portable definition against f64's exp: within 2 ulp (relative 2.4e-7) where the result
    /// is a normal f32, exactly 0 below the flush point, NaN kept, and correct for the small
    /// positive arguments rounding can produce.
    #[test]
    fn matches_f64() {
        let xs = inputs(20_000);
        for &x in &xs {
            let mut got = [x];
            exp_sub2(&mut got, 1.0, 0.0, 0.0);
            let want = (x as f64).exp();
            if x.is_nan() || x == f32::INFINITY {
                // +inf is not a softmax argument; only NaN is promised.
                assert!(!x.is_nan() || got[0].is_nan());
                continue;
            }
            if x < EXP_MIN {
                assert_eq!(got[0], 0.0, "x = {x}");
                continue;
            }
            let rel = ((got[0] as f64 - want) / want).abs();
            assert!(rel < 2.4e-7, "x = {x}: {} vs {want} (rel {rel})", got[0]);
        }
    }

    /// Every vector path gives the portable bits, at every tail length and with the affine terms.
    #[test]
    fn vector_paths_match_portable_bit_for_bit() {
        let xs = inputs(1031);
        for (mul, a, b) in [(1.0, 0.0, 0.0), (0.125, 0.75, 0.0), (0.35355339, 1.5, 2.25)] {
            for n in (0..=40).chain([xs.len()]) {
                let want: Vec<f32> = xs[..n].iter().map(|&x| exp_sub2_one(x, mul, a, b)).collect();
                for isa in 0..=best() {
                    let mut got = xs[..n].to_vec();
                    exp_sub2_with(isa, &mut got, mul, a, b);
                    for i in 0..n {
                        let (g, w) = (got[i], want[i]);
                        assert!(same(g, w), "isa {isa} n={n} x={}: {g} vs {w}", xs[i]);
                    }
                }
            }
        }
    }
}
