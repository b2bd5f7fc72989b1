//! AVX2 (+ FMA) inner loops of the decode path: forward and backward 4-bit GEMVs.

// Register-blocked kernels index their accumulator arrays by (row, token): index loops are clearer.
#![allow(clippy::needless_range_loop)]

use super::{Q4, col_block};
use std::arch::x86_64::*;

/// AVX2: two 8-entry permutes + a blend on bit 3 of the nibble.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_fwd_avx2<const R: usize, const N: usize>(
    q: &Q4<'_>,
    xs: &[f32],
    r0: usize,
    nr: usize,
    c0: usize,
    c1: usize,
    yt: &mut [f32],
) {
    let inp = q.cols;
    let cpr = inp / 32;
    let shift = (q.bs / 32).trailing_zeros();
    let data = q.data.as_ptr();
    let xp = xs.as_ptr();
    let mut i = 0;
    while i < nr {
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut cur = [usize::MAX; R];
        let mut lut = [(_mm256_setzero_ps(), _mm256_setzero_ps()); R];
        let base: [usize; R] = std::array::from_fn(|r| (r0 + i + r) * cpr);
        for c in c0..c1 {
            for r in 0..R {
                let g = base[r] + c;
                let b = g >> shift;
                if b != cur[r] {
                    cur[r] = b;
                    let ls = q.scaled_lut(b);
                    // SAFETY: ls holds 16 f32.
                    lut[r] = unsafe { (_mm256_loadu_ps(ls.as_ptr()), _mm256_loadu_ps(ls.as_ptr().add(8))) };
                }
                let (l0, l1) = lut[r];
                for h in 0..2 {
                    // SAFETY: bytes 16g + 8h .. +8 are inside the packed data; x offsets in bounds.
                    unsafe {
                        let v =
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(data.add(g * 16 + 8 * h) as *const __m128i));
                        let vh = _mm256_srli_epi32::<4>(v);
                        let wl = _mm256_blendv_ps(
                            _mm256_permutevar8x32_ps(l0, v),
                            _mm256_permutevar8x32_ps(l1, v),
                            _mm256_castsi256_ps(_mm256_slli_epi32::<28>(v)),
                        );
                        let wh = _mm256_blendv_ps(
                            _mm256_permutevar8x32_ps(l0, vh),
                            _mm256_permutevar8x32_ps(l1, vh),
                            _mm256_castsi256_ps(_mm256_slli_epi32::<24>(v)),
                        );
                        for t in 0..N {
                            let xe = _mm256_loadu_ps(xp.add(t * inp + 32 * c + 8 * h));
                            let xo = _mm256_loadu_ps(xp.add(t * inp + 32 * c + 16 + 8 * h));
                            acc[r][t] = _mm256_fmadd_ps(wh, xe, acc[r][t]);
                            acc[r][t] = _mm256_fmadd_ps(wl, xo, acc[r][t]);
                        }
                    }
                }
            }
        }
        for r in 0..R {
            for t in 0..N {
                yt[(i + r) * N + t] += hsum256(acc[r][t]);
            }
        }
        i += R;
    }
}

#[target_feature(enable = "avx2,fma")]
fn hsum256(v: __m256) -> f32 {
    let mut a = [0f32; 8];
    // SAFETY: a holds 8 f32.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// # Safety
/// avx2 and fma available; sizes as for [`q4_fwd_avx512_dispatch`](super::avx512::q4_fwd_avx512_dispatch).
pub(super) unsafe fn q4_fwd_avx2_dispatch(
    q: &Q4<'_>,
    xs: &[f32],
    n: usize,
    r0: usize,
    nr: usize,
    yt: &mut [f32],
) {
    let cpr = q.cols / 32;
    let cb = col_block(n) / 32;
    macro_rules! go {
        ($r:literal, $n:literal) => {{
            let bulk = nr / $r * $r;
            for c0 in (0..cpr).step_by(cb) {
                let c1 = (c0 + cb).min(cpr);
                // SAFETY: forwarded from the caller's contract.
                unsafe {
                    q4_fwd_avx2::<$r, $n>(q, xs, r0, bulk, c0, c1, &mut yt[..bulk * $n]);
                    q4_fwd_avx2::<1, $n>(q, xs, r0 + bulk, nr - bulk, c0, c1, &mut yt[bulk * $n..]);
                }
            }
        }};
    }
    match n {
        1 => go!(2, 1),
        2 => go!(2, 2),
        4 => go!(1, 4),
        8 => go!(1, 8),
        _ => go!(1, 16),
    }
}

#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_bwd_avx2<const N: usize>(
    q: &Q4<'_>,
    dyt: &[f32],
    o0: usize,
    o1: usize,
    k0: usize,
    len: usize,
    acc: &mut [f32],
) {
    let inp = q.cols;
    let cpr = inp / 32;
    let shift = (q.bs / 32).trailing_zeros();
    let nch = len / 32;
    let c0 = k0 / 32;
    let data = q.data.as_ptr();
    let ap = acc.as_mut_ptr();
    for o in o0..o1 {
        let d: [__m256; N] = std::array::from_fn(|t| _mm256_set1_ps(dyt[o * N + t]));
        let mut cur = usize::MAX;
        let (mut l0, mut l1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in 0..nch {
            let g = o * cpr + c0 + c;
            let b = g >> shift;
            if b != cur {
                cur = b;
                let ls = q.scaled_lut(b);
                // SAFETY: ls holds 16 f32.
                unsafe {
                    l0 = _mm256_loadu_ps(ls.as_ptr());
                    l1 = _mm256_loadu_ps(ls.as_ptr().add(8));
                }
            }
            for h in 0..2 {
                // SAFETY: packed bytes and accumulator offsets are in bounds (see the avx512 twin).
                unsafe {
                    let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(data.add(g * 16 + 8 * h) as *const __m128i));
                    let vh = _mm256_srli_epi32::<4>(v);
                    let wl = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(l0, v),
                        _mm256_permutevar8x32_ps(l1, v),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<28>(v)),
                    );
                    let wh = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(l0, vh),
                        _mm256_permutevar8x32_ps(l1, vh),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<24>(v)),
                    );
                    for (t, dt) in d.iter().enumerate() {
                        let pe = ap.add(t * len + 32 * c + 8 * h);
                        let po = ap.add(t * len + 32 * c + 16 + 8 * h);
                        _mm256_storeu_ps(pe, _mm256_fmadd_ps(wh, *dt, _mm256_loadu_ps(pe)));
                        _mm256_storeu_ps(po, _mm256_fmadd_ps(wl, *dt, _mm256_loadu_ps(po)));
                    }
                }
            }
        }
    }
}

/// # Safety
/// avx2 and fma available; sizes as for [`q4_bwd_avx512_dispatch`](super::avx512::q4_bwd_avx512_dispatch).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn q4_bwd_avx2_dispatch(
    q: &Q4<'_>,
    dyt: &[f32],
    n: usize,
    o0: usize,
    o1: usize,
    k0: usize,
    len: usize,
    acc: &mut [f32],
) {
    // SAFETY: forwarded.
    unsafe {
        match n {
            1 => q4_bwd_avx2::<1>(q, dyt, o0, o1, k0, len, acc),
            2 => q4_bwd_avx2::<2>(q, dyt, o0, o1, k0, len, acc),
            4 => q4_bwd_avx2::<4>(q, dyt, o0, o1, k0, len, acc),
            8 => q4_bwd_avx2::<8>(q, dyt, o0, o1, k0, len, acc),
            _ => q4_bwd_avx2::<16>(q, dyt, o0, o1, k0, len, acc),
        }
    }
}
