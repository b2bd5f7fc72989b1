//! The bf16 kernels against f64 math on the bf16-rounded operands.

use super::*;
use crate::quant::{QuantizeOptions, QuantizedTensor};
use crate::tensor::Tensor;
use proptest::prelude::*;

/// The portable kernel and every SIMD kernel this CPU runs.
fn kernels() -> Vec<Kern> {
    let mut k = vec![Kern::Portable];
    if has_avx2() {
        k.push(Kern::Avx2);
    }
    if Kern::best() == Kern::Avx512Bf16 {
        k.push(Kern::Avx512Bf16);
    }
    k
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `fwd` and `bwd` of the AVX2 kernel equal the portable kernel's bit for bit (same operations in the
/// same order), including NaN, inf, huge and tiny operands and partial tiles.
fn avx2_matches_portable(t: usize, out: usize, inp: usize, seed: u64, specials: bool) {
    if !has_avx2() {
        eprintln!("SKIPPED (no AVX2)");
        return;
    }
    let mut x = values(t * inp, seed);
    let mut w = values(out * inp, seed + 1);
    if specials {
        let sp = [
            f32::NAN,
            f32::INFINITY,
            -f32::MAX,
            1e-40,
            -3e38,
            1e-30,
            2e-20,
            -0.0,
            f32::MIN_POSITIVE,
        ];
        for (i, v) in x.iter_mut().enumerate().filter(|(i, _)| i % 13 == 5) {
            *v = sp[i % sp.len()];
        }
        for (i, v) in w.iter_mut().enumerate().filter(|(i, _)| i % 17 == 3) {
            *v = sp[(i / 17) % sp.len()];
        }
    }
    let wr = WeightRef::F32(&w);
    let same = |a: &[f32], b: &[f32], what: &str| {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!(
                p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                "{what} {i}: {p:e} vs {q:e}"
            );
        }
    };
    let c0 = values(t * out, seed + 2);
    let (mut a, mut b) = (c0.clone(), c0);
    fwd(Kern::Portable, &x, &wr, t, out, inp, &mut a);
    fwd(Kern::Avx2, &x, &wr, t, out, inp, &mut b);
    same(&a, &b, &format!("fwd t{t} out{out} in{inp}"));
    let dy = values(t * out, seed + 3);
    let c0 = values(t * inp, seed + 4);
    let (mut a, mut b) = (c0.clone(), c0);
    bwd(Kern::Portable, &dy, &wr, t, out, inp, &mut a);
    bwd(Kern::Avx2, &dy, &wr, t, out, inp, &mut b);
    same(&a, &b, &format!("bwd t{t} out{out} in{inp}"));
}

#[test]
fn avx2_is_bit_identical_to_portable() {
    // Partial row blocks and strips, odd k, k past one cache block of pairs (KC_PAIRS = 128).
    for (t, out, inp) in [(1, 1, 1), (9, 35, 66), (8, 32, 256), (17, 70, 301), (3, 100, 513)] {
        avx2_matches_portable(t, out, inp, 40 + t as u64, false);
        avx2_matches_portable(t, out, inp, 90 + t as u64, true);
    }
}

/// Deterministic values in about [-2, 2) with varied exponents.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (u - 0.5) * 4.0 * if s & 7 == 0 { 1e-3 } else { 1.0 }
        })
        .collect()
}

/// Checks `got [t, n]` = `c0 + a·bᵀ`-or-`a·b` against f64 on the bf16-rounded operands: `wt(j, kk)`
/// is `B[kk, j]`. Tolerance: f32 accumulation of `k` exact products, `(k + 2)·2^-24·Σ|terms|`, plus
/// `k·2^-126` for results the hardware flushes to zero.
#[allow(clippy::too_many_arguments)]
fn check(
    got: &[f32],
    c0: &[f32],
    a: &[f32],
    t: usize,
    k: usize,
    n: usize,
    wt: impl Fn(usize, usize) -> f32,
    what: &str,
) {
    for i in 0..t {
        for j in 0..n {
            let (mut s, mut mag) = (c0[i * n + j] as f64, c0[i * n + j].abs() as f64);
            for kk in 0..k {
                let p = bf16_round(a[i * k + kk]) as f64 * bf16_round(wt(j, kk)) as f64;
                s += p;
                mag += p.abs();
            }
            let tol = (k as f64 + 2.0) * 2f64.powi(-24) * mag + k as f64 * 2f64.powi(-126);
            let g = got[i * n + j] as f64;
            assert!(
                (g - s).abs() <= tol,
                "{what}: ({i}, {j}) got {g} want {s} (tol {tol:e})"
            );
        }
    }
}

/// `fwd` (`y [t, out] = a · Wᵀ`, `wt(j, kk)` is `W[j, kk]`) or, with `backward`, `bwd` (`dx [t, inp] =
/// a · W`, `wt(j, kk)` is `W[kk, j]`) from a zero accumulator, checked.
fn check_from_zero(
    kern: Kern,
    backward: bool,
    a: &[f32],
    w: &WeightRef<'_>,
    wt: impl Fn(usize, usize) -> f32,
    (t, out, inp): (usize, usize, usize),
    what: &str,
) {
    type Pass = fn(Kern, &[f32], &WeightRef<'_>, usize, usize, usize, &mut [f32]);
    let (k, n, pass): (usize, usize, Pass) = if backward {
        (out, inp, bwd)
    } else {
        (inp, out, fwd)
    };
    let mut got = vec![0.0; t * n];
    pass(kern, a, w, t, out, inp, &mut got);
    check(&got, &vec![0.0; t * n], a, t, k, n, wt, what);
}

/// fwd and bwd for one shape and kernel, accumulating onto poisoned-free random `c0`, with NaN
/// sentinels after the output to catch writes past it.
fn run_shape(kern: Kern, t: usize, out: usize, inp: usize, seed: u64) {
    let x = values(t * inp, seed);
    let w = values(out * inp, seed + 1);
    let wr = WeightRef::F32(&w);
    // Forward: y [t, out] += x · Wᵀ.
    let c0 = values(t * out, seed + 2);
    let mut y = c0.clone();
    y.extend([f32::NAN; 7]);
    fwd(kern, &x, &wr, t, out, inp, &mut y[..t * out]);
    assert!(
        y[t * out..].iter().all(|v| v.is_nan()),
        "fwd wrote past the output"
    );
    let what = format!("fwd {kern:?} t{t} out{out} in{inp}");
    check(&y, &c0, &x, t, inp, out, |j, kk| w[j * inp + kk], &what);
    // Backward: dx [t, inp] += dy · W.
    let dy = values(t * out, seed + 3);
    let c0 = values(t * inp, seed + 4);
    let mut dx = c0.clone();
    dx.extend([f32::NAN; 7]);
    bwd(kern, &dy, &wr, t, out, inp, &mut dx[..t * inp]);
    assert!(
        dx[t * inp..].iter().all(|v| v.is_nan()),
        "bwd wrote past the output"
    );
    let what = format!("bwd {kern:?} t{t} out{out} in{inp}");
    check(&dx, &c0, &dy, t, out, inp, |j, kk| w[kk * inp + j], &what);
}

#[test]
fn odd_shapes_match_f64_on_rounded_inputs() {
    for kern in kernels() {
        for (i, &(t, out, inp)) in [
            (1, 1, 1),
            (1, 7, 31),
            (7, 31, 33),
            (31, 33, 7),
            (8, 32, 2),
            (9, 65, 257),
            (33, 1001, 64),
            (17, 40, 1031),
        ]
        .iter()
        .enumerate()
        {
            run_shape(kern, t, out, inp, 10 + i as u64);
        }
    }
}

#[test]
fn conversion_is_rne_with_subnormals_flushed() {
    // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties to even (1); 1 + 3·2^-8 rounds up.
    assert_eq!(bf16_round(1.0 + 2f32.powi(-8)), 1.0);
    assert_eq!(bf16_round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
    assert_eq!(bf16_bits(1e-40), 0);
    assert_eq!(bf16_bits(-1e-40), 0x8000);
    assert_eq!(bf16_round(f32::MIN_POSITIVE), f32::MIN_POSITIVE);
    assert!(bf16_round(f32::NAN).is_nan());
    assert_eq!(bf16_round(f32::INFINITY), f32::INFINITY);
    assert_eq!(bf16_round(f32::MAX), f32::INFINITY); // rounds up past the largest bf16
}

#[test]
fn simd_conversion_matches_scalar_bit_for_bit() {
    let mut src = values(1000, 3);
    let special = [
        0.0,
        -0.0,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        3.0e38,
        -7.5e-39,
    ];
    src[..special.len()].copy_from_slice(&special);
    src.push(f32::NAN);
    for kern in kernels() {
        let mut d = vec![0u32; src.len().div_ceil(2)];
        convert_pairs(kern, &src, &mut d);
        for (p, &w) in d.iter().enumerate() {
            for (h, v) in [(0, src[2 * p]), (16, src.get(2 * p + 1).copied().unwrap_or(0.0))] {
                let got = (w >> h) as u16;
                if v.is_nan() {
                    assert!(half::bf16::from_bits(got).is_nan(), "{kern:?} NaN at {p}");
                } else {
                    assert_eq!(got, bf16_bits(v), "{kern:?} {v:e} at {p}");
                }
            }
        }
        // The interleaving packer (backward strips), full and partial.
        for nc in [32, 17, 16, 5, 1] {
            let (r0, r1) = (&src[..nc], &src[40..40 + nc]);
            let mut d = vec![7u32; NR];
            pack_b_strips(kern, &[r0, r1].concat(), nc, 2, nc, &mut d);
            for j in 0..NR {
                let want = if j < nc { pair(r0[j], r1[j]) } else { 0 };
                assert_eq!(d[j], want, "{kern:?} interleave nc {nc} col {j}");
            }
            // Odd k: the second row of the pair is zero.
            pack_b_strips(kern, r0, nc, 1, nc, &mut d);
            for j in 0..nc {
                assert_eq!(d[j], pair(r0[j], 0.0), "{kern:?} odd k nc {nc} col {j}");
            }
        }
    }
}

#[test]
fn zeros_and_extreme_values() {
    for kern in kernels() {
        let (t, out, inp) = (9, 35, 66);
        // All-zero operands leave the accumulator as it was.
        let c0 = values(t * out, 5);
        let mut y = c0.clone();
        fwd(
            kern,
            &vec![0.0; t * inp],
            &WeightRef::F32(&vec![0.0; out * inp]),
            t,
            out,
            inp,
            &mut y,
        );
        assert_eq!(y, c0, "{kern:?} zeros");
        // Huge × tiny and huge × huge products that stay inside the f32 range; subnormals (flushed).
        let scale = [1e18f32, -1e18, 1e-18, 3e-39, -2e-39, 1.0, 0.0, 1e-30];
        let x: Vec<f32> = (0..t * inp).map(|i| scale[i % scale.len()] * 1.25).collect();
        let w: Vec<f32> = (0..out * inp)
            .map(|i| scale[(i * 7 + 3) % scale.len()] * -0.75)
            .collect();
        let wr = WeightRef::F32(&w);
        check_from_zero(
            kern,
            false,
            &x,
            &wr,
            |j, kk| w[j * inp + kk],
            (t, out, inp),
            "extreme",
        );
        // Non-finite inputs propagate: an infinity in x makes its row infinite or NaN.
        let mut x2 = x.clone();
        x2[inp + 3] = f32::INFINITY;
        let mut y = vec![0.0; t * out];
        fwd(kern, &x2, &WeightRef::F32(&w), t, out, inp, &mut y);
        assert!(y[out..2 * out].iter().any(|v| !v.is_finite()), "{kern:?} inf");
        assert!(
            y[..out].iter().all(|v| v.is_finite()),
            "{kern:?} other rows stay finite"
        );
    }
}

#[test]
fn nf4_weight_decodes_then_rounds() {
    let (t, out, inp) = (19, 70, 128);
    let w = values(out * inp, 8);
    let wt = Tensor::from_vec(w, &[out, inp], crate::Device::Cpu).unwrap();
    let q = QuantizedTensor::quantize(&wt, &QuantizeOptions::default()).unwrap();
    let wd = q.dequantize(crate::tensor::DType::F32).unwrap();
    let wd = wd.cpu_data::<f32>("test").unwrap();
    let qv = super::super::Q4::new(&q).unwrap();
    let x = values(t * inp, 9);
    let dy = values(t * out, 10);
    for kern in kernels() {
        let w = WeightRef::Q4(qv);
        check_from_zero(
            kern,
            false,
            &x,
            &w,
            |j, kk| wd[j * inp + kk],
            (t, out, inp),
            "nf4 fwd",
        );
        check_from_zero(
            kern,
            true,
            &dy,
            &w,
            |j, kk| wd[kk * inp + j],
            (t, out, inp),
            "nf4 bwd",
        );
    }
}

/// The two kernels agree closely (not bit for bit: the hardware may round the pair sum once).
#[test]
fn kernels_agree() {
    if Kern::best() != Kern::Avx512Bf16 {
        eprintln!("SKIPPED (no AVX512_BF16)");
        return;
    }
    let (t, out, inp) = (37, 100, 300);
    let x = values(t * inp, 11);
    let w = values(out * inp, 12);
    let mut a = vec![0.0; t * out];
    let mut b = vec![0.0; t * out];
    fwd(Kern::Portable, &x, &WeightRef::F32(&w), t, out, inp, &mut a);
    fwd(Kern::Avx512Bf16, &x, &WeightRef::F32(&w), t, out, inp, &mut b);
    for (i, (p, q)) in a.iter().zip(&b).enumerate() {
        assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "{i}: {p} vs {q}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_shapes(t in 1usize..40, out in 1usize..80, inp in 1usize..300, seed in 0u64..1000) {
        for kern in kernels() {
            run_shape(kern, t, out, inp, seed);
        }
        avx2_matches_portable(t, out, inp, seed, seed % 2 == 0);
    }
}
