//! bitsandbytes' blockwise 8-bit Adam on one quantization block, with AVX-512 intrinsics: the same IEEE
//! f32 operations in the same order as the portable `block8` in `mod.rs` (no FMA contraction: each
//! product and sum is its own `vmulps` / `vaddps`; the one FMA sequence, [`BlockDiv`], computes the
//! correctly rounded quotient), so the results are bit-identical; the tests compare the two on every
//! kind of lane, tails included.
//!
//! Why explicit: the portable loop leaves the code-table lookups to the auto-vectorizer, which does not
//! gather bytes, so the nearest-code search ran scalar. Here each nearest-code search is one dword
//! gather of a packed bucket word of [`Lut`] (64 KB per map, of which a step touches the few rows its
//! block maxima select): a 16-lane gather is the slowest instruction on Zen 4, so the kernel has 2 per
//! 16 elements and none in the dequantization. With AVX-512 VBMI ([`block8_vbmi`]) a dequantization
//! looks up each of the 4 bytes of the 64 codes' f32 values in a 256-byte plane (two `vpermi2b` and a
//! byte blend per plane, [`decode64_vbmi`]) and interleaves the planes back into floats: ~6 operations
//! per 16 elements, against ~34 for the dword permutes of [`lookup256`] that [`block8`] uses on
//! AVX-512 CPUs without VBMI (Skylake-SP, Cascade Lake). Also per 16 elements: 1 divide and 1 square
//! root (the parameter update) and the two normalizations by the block maxima as a multiply by the
//! block's reciprocal plus Markstein's FMA correction (the IEEE quotient, [`BlockDiv`]; a divide in the
//! rare blocks where that is not exact), against 16 B of DRAM traffic per element (read p, g and two
//! codes, write p and two codes; the f32 step moves 28 B).
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

/// The f32 values of 64 codes on a 256-entry map (the bytes of `codes`, element `i` in byte `i`), as 4
/// registers of 16 lanes in element order: [`lookup256`] on each quarter.
#[target_feature(enable = "avx512f")]
#[inline]
fn decode64_perm(codes: __m512i, table: &[f32; 256], _planes: &[[u8; 256]; 4]) -> [__m512; 4] {
    [
        lookup256(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<0>(codes)), table),
        lookup256(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<1>(codes)), table),
        lookup256(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<2>(codes)), table),
        lookup256(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<3>(codes)), table),
    ]
}

/// [`decode64_perm`] with byte permutes: `planes[j][c]` is byte `j` (little-endian) of `table[c]`. The
/// codes are first reordered (dword `4L + k` of the register takes dword `4k + L`) so that after the
/// lookups the two rounds of in-lane unpacks (bytes to words, words to dwords) leave element `16k + i`
/// in lane `i` of register `k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
fn decode64_vbmi(codes: __m512i, _table: &[f32; 256], planes: &[[u8; 256]; 4]) -> [__m512; 4] {
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let idx = _mm512_permutexvar_epi32(order, codes);
    let high = _mm512_movepi8_mask(idx); // bit 7 of each code: the upper 128 entries
    let plane = |j: usize| {
        // SAFETY: each plane holds 256 = 4 · 64 bytes.
        let t = |k: usize| unsafe { _mm512_loadu_si512(planes[j].as_ptr().add(64 * k) as *const _) };
        let lo = _mm512_permutex2var_epi8(t(0), idx, t(1));
        let hi = _mm512_permutex2var_epi8(t(2), idx, t(3));
        _mm512_mask_blend_epi8(high, lo, hi)
    };
    let (b0, b1, b2, b3) = (plane(0), plane(1), plane(2), plane(3));
    let (lo01, hi01) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
    let (lo23, hi23) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
    [
        _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)),
        _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)),
        _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)),
        _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23)),
    ]
}

/// `x / d` for the block-constant divisor `d` of a normalization, on 16 lanes: with
/// [`super::reciprocal_ok`] the reciprocal and Markstein's FMA correction (3 pipelined operations,
/// the same IEEE quotient), otherwise a division.
#[derive(Clone, Copy)]
struct BlockDiv {
    d: __m512,
    r: __m512,
    fast: bool,
}

impl BlockDiv {
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn new(d: f32) -> Self {
        BlockDiv {
            d: _mm512_set1_ps(d),
            r: _mm512_set1_ps(1.0 / d),
            fast: super::reciprocal_ok(d),
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn div(self, x: __m512) -> __m512 {
        if self.fast {
            let q = _mm512_mul_ps(x, self.r);
            let e = _mm512_fnmadd_ps(q, self.d, x); // x - q·d, exact
            _mm512_fmadd_ps(e, self.r, q)
        } else {
            _mm512_div_ps(x, self.d)
        }
    }
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

/// Lanes `i..` of a block of `n` as a 64-lane byte mask: all 64, or the tail.
#[inline(always)]
fn lane_mask64(n: usize, i: usize) -> __mmask64 {
    let left = n - i;
    if left >= 64 { !0 } else { (1u64 << left) - 1 }
}

/// One quantization block of at most [`BLOCK`] elements (shorter slices: the tensor's last block):
/// dequantize, update the moments (a non-finite gradient zeroes both and leaves the parameter), the new
/// block maxima, the parameter, requantize to the nearest codes with the first moment's sign repair.
/// `$decode` dequantizes 64 codes at a time.
macro_rules! block8_fn {
    ($(#[$doc:meta])* $name:ident, $features:literal, $decode:ident) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)] // the `BlockFn` signature
        pub(super) unsafe fn $name(
            p: &mut [f32],
            g: &[f32],
            cm: &mut [u8],
            cv: &mut [u8],
            absmax: (&mut f32, &mut f32),
            s: &BnbScalars,
            t: &Tables,
            _scratch: &mut super::Scratch,
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
            // The first loop writes all 16 lanes of every group of 16 below n, which are all the second
            // loop reads, so the buffers need no zeroing.
            let mut mb = std::mem::MaybeUninit::<[f32; BLOCK]>::uninit();
            let mut vb = std::mem::MaybeUninit::<[f32; BLOCK]>::uninit();
            let (mb, vb) = (mb.as_mut_ptr() as *mut f32, vb.as_mut_ptr() as *mut f32);
            let mut fin = [0 as __mmask16; BLOCK / 16];
            let mut mx_m = _mm512_set1_ps(-f32::MAX);
            let mut mx_v = _mm512_set1_ps(-f32::MAX);
            for i0 in (0..n).step_by(64) {
                let k64 = lane_mask64(n, i0);
                // SAFETY: masked byte loads of lanes i0..i0+64 only where `k64` is set, i.e. below
                // n <= cm.len(), cv.len().
                let (c_m, c_v) = unsafe {
                    (
                        _mm512_maskz_loadu_epi8(k64, cm.as_ptr().add(i0) as *const i8),
                        _mm512_maskz_loadu_epi8(k64, cv.as_ptr().add(i0) as *const i8),
                    )
                };
                let dq_m = $decode(c_m, &t.code_m, &t.planes_m);
                let dq_v = $decode(c_v, &t.code_v, &t.planes_v);
                for q in 0..4 {
                    let i = i0 + 16 * q;
                    if i >= n {
                        break;
                    }
                    let k = lane_mask(n, i);
                    // SAFETY: the masked load reads lanes i..i+16 of `g` only where `k` is set, i.e.
                    // below n <= g.len().
                    let gi = unsafe { _mm512_maskz_loadu_ps(k, g.as_ptr().add(i)) };
                    let (mq, vq) = (dq_m[q], dq_v[q]);
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
                        _mm512_storeu_ps(mb.add(i), mi);
                        _mm512_storeu_ps(vb.add(i), vi);
                    }
                    fin[i / 16] = f;
                }
            }
            // Exact in any order: no lane holds a NaN.
            let (mx_m, mx_v) = (_mm512_reduce_max_ps(mx_m), _mm512_reduce_max_ps(mx_v));
            let (dm, dv) = (BlockDiv::new(mx_m), BlockDiv::new(mx_v));
            let (one, neg_m) = (_mm512_set1_epi32(1), _mm512_set1_epi32(t.neg_m as i32));
            for i in (0..n).step_by(16) {
                let k = lane_mask(n, i);
                let f = fin[i / 16];
                // SAFETY: lanes i..i+16 of `mb`/`vb` were written by the first loop (i < n, a multiple
                // of 16, and i + 16 <= BLOCK); `p` is read and written only in lanes of `f` (a subset of
                // `k`, so below n <= p.len()).
                let (mi, vi) = unsafe {
                    let (mi, vi) = (_mm512_loadu_ps(mb.add(i)), _mm512_loadu_ps(vb.add(i)));
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
                    encode(dm.div(mi), &t.lut_m),
                    encode(dv.div(vi), &t.lut_v),
                );
                // m's sign repair: where the code's sign bit (c < neg_m) differs from m's, one code
                // towards m (+1 when m > 0, else -1; the byte store wraps like the kernel's unsigned
                // char).
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
    };
}

block8_fn!(
    /// The block kernel for AVX-512 without VBMI (dequantization by dword permutes).
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW and AVX-512VL.
    block8,
    "avx512f,avx512bw,avx512vl",
    decode64_perm
);

block8_fn!(
    /// The block kernel with AVX-512 VBMI (dequantization by byte permutes).
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW, AVX-512VL and AVX-512VBMI.
    block8_vbmi,
    "avx512f,avx512bw,avx512vl,avx512vbmi",
    decode64_vbmi
);
