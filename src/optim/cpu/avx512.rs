//! bitsandbytes' blockwise 8-bit Adam on one quantization block, with AVX-512 intrinsics: the same IEEE
//! f32 operations in the same order as the portable `block8` in `mod.rs` (no FMA contraction: each
//! product and sum is its own `vmulps` / `vaddps`), so the results are bit-identical; the tests compare
//! the two on every kind of lane, tails included.
//!
//! Why explicit: the portable loop leaves the code-table lookups to the auto-vectorizer, which does not
//! gather bytes, so the nearest-code search ran scalar. Here the dequantizations are register permutes
//! of the 256-entry maps ([`lookup256`]) and each nearest-code search is one dword gather of a packed
//! bucket word of [`Lut`] (64 KB per map, of which a step touches the few rows its block maxima select):
//! a 16-lane gather is the slowest instruction on Zen 4, so the kernel has 2 per 16 elements. Also per
//! 16 elements: 3 divides and 1 square root (the parameter update and the two normalizations by the
//! block maxima, which must stay true divisions for exactness), against 16 B of DRAM traffic per
//! element (read p, g and two codes, write p and two codes; the f32 step moves 28 B).
//!
//! [`Lut`]: crate::optim::eightbit::Lut

use crate::optim::BnbScalars;
use crate::optim::eightbit::{BLOCK, E_HI, E_LO, Lut, MANT_BITS, PACKED_HAS_THR, PER_SIGN, Tables};
use std::arch::x86_64::*;

// The bucket shifts below are written for 7 mantissa bits.
const _: () = assert!(MANT_BITS == 7);

/// The bucket index of 16 lanes (`eightbit::bucket`): sign · PER_SIGN + (clamped exponent row, top 7
/// mantissa bits).
#[target_feature(enable = "avx512f")]
#[inline]
fn bucket(x: __m512) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let e = _mm512_and_si512(_mm512_srli_epi32::<23>(bits), _mm512_set1_epi32(0xff));
    let e = _mm512_min_epu32(
        _mm512_max_epu32(e, _mm512_set1_epi32(E_LO as i32)),
        _mm512_set1_epi32((E_HI + 1) as i32),
    );
    let row = _mm512_or_si512(
        _mm512_slli_epi32::<7>(_mm512_sub_epi32(e, _mm512_set1_epi32(E_LO as i32))),
        _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(127)),
    );
    // srai by 31: all ones for a set sign bit.
    let sign = _mm512_and_si512(_mm512_srai_epi32::<31>(bits), _mm512_set1_epi32(PER_SIGN as i32));
    _mm512_add_epi32(sign, row)
}

/// [`Lut::encode`] of 16 lanes through the packed words (one gather): the bucket's code, plus one when
/// the bucket holds a threshold and `x` lies above it (compared on the low 16 bits, which order
/// magnitudes within the bucket: greater for positive `x`, smaller for negative); NaN gives code 0. The
/// result lanes are in 0..=255.
#[target_feature(enable = "avx512f")]
#[inline]
fn encode(x: __m512, lut: &Lut) -> __m512i {
    let packed = lut.packed();
    let bits = _mm512_castps_si512(x);
    let idx = bucket(x);
    // SAFETY: every lane of `idx` is below 2 · PER_SIGN <= LEN (the exponent is clamped to the table's
    // rows, the mantissa part is 7 bits, the sign adds PER_SIGN), and the table holds LEN words.
    let w = unsafe { _mm512_i32gather_epi32::<4>(idx, packed.as_ptr() as _) };
    let low = _mm512_set1_epi32(0xffff);
    let (lx, lt) = (_mm512_and_si512(bits, low), _mm512_and_si512(w, low));
    let neg = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
    let above = (_mm512_cmpgt_epu32_mask(lx, lt) & !neg) | (_mm512_cmplt_epu32_mask(lx, lt) & neg);
    let has = _mm512_test_epi32_mask(w, _mm512_set1_epi32(PACKED_HAS_THR as i32));
    let c = _mm512_and_si512(_mm512_srli_epi32::<16>(w), _mm512_set1_epi32(0xff));
    let c = _mm512_mask_add_epi32(c, above & has, c, _mm512_set1_epi32(1));
    _mm512_mask_mov_epi32(
        c,
        _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x),
        _mm512_setzero_si512(),
    )
}

/// `table[idx]` for 16 lanes of indices in 0..256 without a gather (Zen 4 retires a 16-lane gather far
/// slower than the 15 register operations here): `vpermt2ps` picks by the low 5 bits from each of the
/// 8 register pairs, then bits 5, 6 and 7 choose among the 8 candidates.
#[target_feature(enable = "avx512f")]
#[inline]
fn lookup256(idx: __m512i, table: &[f32; 256]) -> __m512 {
    // SAFETY: 16 · k + 16 <= 256 for every k < 16.
    let t = |k: usize| unsafe { _mm512_loadu_ps(table.as_ptr().add(16 * k)) };
    let r = |j: usize| _mm512_permutex2var_ps(t(2 * j), idx, t(2 * j + 1));
    let bit = |b: i32| _mm512_test_epi32_mask(idx, _mm512_set1_epi32(b));
    let (b5, b6, b7) = (bit(32), bit(64), bit(128));
    let s0 = _mm512_mask_blend_ps(b5, r(0), r(1));
    let s1 = _mm512_mask_blend_ps(b5, r(2), r(3));
    let s2 = _mm512_mask_blend_ps(b5, r(4), r(5));
    let s3 = _mm512_mask_blend_ps(b5, r(6), r(7));
    let u0 = _mm512_mask_blend_ps(b6, s0, s1);
    let u1 = _mm512_mask_blend_ps(b6, s2, s3);
    _mm512_mask_blend_ps(b7, u0, u1)
}

/// The step's scalars, broadcast.
struct Lanes {
    beta1: __m512,
    w1: __m512,
    beta2: __m512,
    w2: __m512,
    step_size: __m512,
    eps_c2: __m512,
    decay: __m512,
}

/// Lanes `i..` of a block of `n`: all 16, or the tail.
#[inline(always)]
fn lane_mask(n: usize, i: usize) -> __mmask16 {
    let left = n - i;
    if left >= 16 {
        0xffff
    } else {
        ((1u32 << left) - 1) as __mmask16
    }
}

/// One quantization block of at most [`BLOCK`] elements (shorter slices: the tensor's last block):
/// dequantize, update the moments (a non-finite gradient zeroes both and leaves the parameter), the new
/// block maxima, the parameter, requantize to the nearest codes with the first moment's sign repair.
///
/// # Safety
/// The CPU has AVX-512F, AVX-512BW and AVX-512VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn block8(
    p: &mut [f32],
    g: &[f32],
    cm: &mut [u8],
    cv: &mut [u8],
    absmax: (&mut f32, &mut f32),
    s: &BnbScalars,
    t: &Tables,
) {
    let n = p.len().min(g.len()).min(cm.len()).min(cv.len()).min(BLOCK);
    let l = Lanes {
        beta1: _mm512_set1_ps(s.beta1),
        w1: _mm512_set1_ps(s.w1),
        beta2: _mm512_set1_ps(s.beta2),
        w2: _mm512_set1_ps(s.w2),
        step_size: _mm512_set1_ps(s.step_size),
        eps_c2: _mm512_set1_ps(s.eps_c2),
        decay: _mm512_set1_ps(s.decay),
    };
    let (am, av) = (_mm512_set1_ps(*absmax.0), _mm512_set1_ps(*absmax.1));
    let inf = _mm512_set1_ps(f32::INFINITY);
    let mut mb = [0f32; BLOCK];
    let mut vb = [0f32; BLOCK];
    let mut fin = [0 as __mmask16; BLOCK / 16];
    let mut mx_m = _mm512_set1_ps(-f32::MAX);
    let mut mx_v = _mm512_set1_ps(-f32::MAX);
    for i in (0..n).step_by(16) {
        let k = lane_mask(n, i);
        // SAFETY: the masked loads read lanes i..i+16 of `g`, `cm`, `cv` only where `k` is set, i.e.
        // below n <= each length (masked-off lanes are never accessed).
        let (gi, ci_m, ci_v) = unsafe {
            (
                _mm512_maskz_loadu_ps(k, g.as_ptr().add(i)),
                _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, cm.as_ptr().add(i) as *const i8)),
                _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, cv.as_ptr().add(i) as *const i8)),
            )
        };
        let (mq, vq) = (lookup256(ci_m, &t.code_m), lookup256(ci_v, &t.code_v));
        // |g| < inf is false for inf and NaN (ordered compare).
        let f = _mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(k, _mm512_abs_ps(gi), inf);
        let gz = _mm512_maskz_mov_ps(f, gi);
        let vi = _mm512_mul_ps(vq, av);
        let vi = _mm512_add_ps(
            _mm512_mul_ps(vi, l.beta2),
            _mm512_mul_ps(_mm512_mul_ps(l.w2, gz), gz),
        );
        let mi = _mm512_mul_ps(mq, am);
        let mi = _mm512_add_ps(_mm512_mul_ps(mi, l.beta1), _mm512_mul_ps(l.w1, gz));
        let (mi, vi) = (_mm512_maskz_mov_ps(f, mi), _mm512_maskz_mov_ps(f, vi));
        // max(|x|, acc) keeps acc when |x| is NaN, like f32::max; tail lanes are left out.
        mx_m = _mm512_mask_max_ps(mx_m, k, _mm512_abs_ps(mi), mx_m);
        mx_v = _mm512_mask_max_ps(mx_v, k, _mm512_abs_ps(vi), mx_v);
        // SAFETY: i + 16 <= BLOCK (i is a multiple of 16 below n <= BLOCK).
        unsafe {
            _mm512_storeu_ps(mb.as_mut_ptr().add(i), mi);
            _mm512_storeu_ps(vb.as_mut_ptr().add(i), vi);
        }
        fin[i / 16] = f;
    }
    // Exact in any order: no lane holds a NaN.
    let (mx_m, mx_v) = (_mm512_reduce_max_ps(mx_m), _mm512_reduce_max_ps(mx_v));
    let (dm, dv) = (_mm512_set1_ps(mx_m), _mm512_set1_ps(mx_v));
    let (one, neg_m) = (_mm512_set1_epi32(1), _mm512_set1_epi32(t.neg_m as i32));
    for i in (0..n).step_by(16) {
        let k = lane_mask(n, i);
        let f = fin[i / 16];
        // SAFETY: `mb`/`vb` hold BLOCK >= i + 16 floats; `p` is read and written only in lanes of `f`
        // (a subset of `k`, so below n <= p.len()).
        let (mi, vi) = unsafe {
            let (mi, vi) = (
                _mm512_loadu_ps(mb.as_ptr().add(i)),
                _mm512_loadu_ps(vb.as_ptr().add(i)),
            );
            let pv = _mm512_maskz_loadu_ps(f, p.as_ptr().add(i));
            let upd = _mm512_div_ps(mi, _mm512_add_ps(_mm512_sqrt_ps(vi), l.eps_c2));
            let mut pv = _mm512_add_ps(pv, _mm512_mul_ps(l.step_size, upd));
            if s.weight_decay {
                pv = _mm512_mul_ps(pv, l.decay);
            }
            _mm512_mask_storeu_ps(p.as_mut_ptr().add(i), f, pv);
            (mi, vi)
        };
        let (c_m, c_v) = (
            encode(_mm512_div_ps(mi, dm), &t.lut_m),
            encode(_mm512_div_ps(vi, dv), &t.lut_v),
        );
        // m's sign repair: where the code's sign bit (c < neg_m) differs from m's, one code towards m
        // (+1 when m > 0, else -1; the byte store wraps like the kernel's unsigned char).
        let code_neg = _mm512_cmplt_epu32_mask(c_m, neg_m);
        let m_neg = _mm512_cmplt_epi32_mask(_mm512_castps_si512(mi), _mm512_setzero_si512());
        let flip = code_neg ^ m_neg;
        let up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(mi, _mm512_setzero_ps());
        let c_m = _mm512_mask_add_epi32(c_m, flip & up, c_m, one);
        let c_m = _mm512_mask_sub_epi32(c_m, flip & !up, c_m, one);
        // SAFETY: byte stores of the lanes of `k` only, below n <= cm.len(), cv.len().
        unsafe {
            _mm512_mask_cvtepi32_storeu_epi8(cm.as_mut_ptr().add(i) as _, k, c_m);
            _mm512_mask_cvtepi32_storeu_epi8(cv.as_mut_ptr().add(i) as _, k, c_v);
        }
    }
    *absmax.0 = mx_m;
    *absmax.1 = mx_v;
}
