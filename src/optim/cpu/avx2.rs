//! bitsandbytes' blockwise 8-bit Adam on one quantization block with AVX2 intrinsics, for CPUs without
//! AVX-512: the twin of `avx512.rs` on 8 lanes, the same IEEE f32 operations in the same order as the
//! portable `block8` in `mod.rs` (no FMA contraction; the block normalizations use the exact FMA
//! quotient of [`BlockDiv`]), so the results are bit-identical (tested in `mod.rs`).
//!
//! Dequantization is one 8-lane gather per map (`vgatherdps` from the 1 KB map, L1-resident), the
//! nearest-code search one gather of a packed bucket word of [`Lut`], as in the AVX-512 kernel. AVX2 has
//! no byte-masked loads and stores: the codes of a tail group go through an 8-byte buffer, the floats
//! through `vmaskmovps`, and a lane mask keeps the tail out of the block maxima.
//!
//! [`Lut`]: crate::optim::eightbit::Lut

use crate::optim::BnbScalars;
use crate::optim::eightbit::{BLOCK, E_HI, E_LO, Lut, MANT_BITS, PACKED_HAS_THR, PER_SIGN, Tables};
use std::arch::x86_64::*;

// The bucket shifts below are written for 7 mantissa bits.
const _: () = assert!(MANT_BITS == 7);

/// [`Lut::encode`] of 8 lanes through the packed words (see `avx512::encode`); lanes in 0..=255.
#[target_feature(enable = "avx2")]
#[inline]
fn encode(x: __m256, lut: &Lut) -> __m256i {
    let packed = lut.packed();
    let bits = _mm256_castps_si256(x);
    let e = _mm256_and_si256(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(0xff));
    let e = _mm256_min_epu32(
        _mm256_max_epu32(e, _mm256_set1_epi32(E_LO as i32)),
        _mm256_set1_epi32((E_HI + 1) as i32),
    );
    let row = _mm256_or_si256(
        _mm256_slli_epi32::<7>(_mm256_sub_epi32(e, _mm256_set1_epi32(E_LO as i32))),
        _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(127)),
    );
    // srai by 31: all ones for a set sign bit.
    let neg = _mm256_srai_epi32::<31>(bits);
    let idx = _mm256_add_epi32(_mm256_and_si256(neg, _mm256_set1_epi32(PER_SIGN as i32)), row);
    // SAFETY: every lane of `idx` is below 2 · PER_SIGN <= LEN (the exponent is clamped to the table's
    // rows, the mantissa part is 7 bits, the sign adds PER_SIGN), and the table holds LEN words.
    let w = unsafe { _mm256_i32gather_epi32::<4>(packed.as_ptr() as *const i32, idx) };
    let low = _mm256_set1_epi32(0xffff);
    // Both below 2^16: the signed compares order them as unsigned.
    let (lx, lt) = (_mm256_and_si256(bits, low), _mm256_and_si256(w, low));
    let above = _mm256_blendv_epi8(_mm256_cmpgt_epi32(lx, lt), _mm256_cmpgt_epi32(lt, lx), neg);
    let flag = _mm256_set1_epi32(PACKED_HAS_THR as i32);
    let has = _mm256_cmpeq_epi32(_mm256_and_si256(w, flag), flag);
    let c = _mm256_and_si256(_mm256_srli_epi32::<16>(w), _mm256_set1_epi32(0xff));
    // The masks are -1 where set: subtracting adds one.
    let c = _mm256_sub_epi32(c, _mm256_and_si256(above, has));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
    _mm256_andnot_si256(nan, c)
}

/// The 8 codes at `c[i..]` (bytes past the end of the slice read as code 0), widened to dwords.
#[target_feature(enable = "avx2")]
#[inline]
fn load_codes(c: &[u8], i: usize) -> __m256i {
    let mut b = [0u8; 8];
    let src = &c[i.min(c.len())..c.len().min(i + 8)];
    b[..src.len()].copy_from_slice(src);
    _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(b)))
}

/// Stores the low bytes of the 8 dword lanes of `x` (wrapping, like the kernel's `unsigned char`) at
/// `c[i..]`, as many as fit.
#[target_feature(enable = "avx2")]
#[inline]
fn store_codes(c: &mut [u8], i: usize, x: __m256i) {
    let pick = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1,
    );
    let y = _mm256_shuffle_epi8(x, pick);
    let lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(y)) as u32 as u64;
    let hi = _mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(y)) as u32 as u64;
    let b = (lo | (hi << 32)).to_le_bytes();
    let end = c.len().min(i + 8);
    let dst = &mut c[i.min(end)..end];
    let len = dst.len();
    dst.copy_from_slice(&b[..len]);
}

/// `x / d` for the block-constant divisor `d` of a normalization, on 8 lanes: with
/// [`super::reciprocal_ok`] the reciprocal and Markstein's FMA correction (the same IEEE quotient,
/// see there), otherwise a division.
#[derive(Clone, Copy)]
struct BlockDiv {
    d: __m256,
    r: __m256,
    fast: bool,
}

impl BlockDiv {
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn new(d: f32) -> Self {
        BlockDiv {
            d: _mm256_set1_ps(d),
            r: _mm256_set1_ps(1.0 / d),
            fast: super::reciprocal_ok(d),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn div(self, x: __m256) -> __m256 {
        if self.fast {
            let q = _mm256_mul_ps(x, self.r);
            let e = _mm256_fnmadd_ps(q, self.d, x); // x - q·d, exact
            _mm256_fmadd_ps(e, self.r, q)
        } else {
            _mm256_div_ps(x, self.d)
        }
    }
}

/// The step's scalars, broadcast.
struct Lanes {
    beta1: __m256,
    w1: __m256,
    beta2: __m256,
    w2: __m256,
    step_size: __m256,
    eps_c2: __m256,
    decay: __m256,
}

/// One quantization block of at most [`BLOCK`] elements: `avx512::block8` on 8 lanes.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
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
    let (p, g, cm, cv) = (&mut p[..n], &g[..n], &mut cm[..n], &mut cv[..n]);
    let l = Lanes {
        beta1: _mm256_set1_ps(s.beta1),
        w1: _mm256_set1_ps(s.w1),
        beta2: _mm256_set1_ps(s.beta2),
        w2: _mm256_set1_ps(s.w2),
        step_size: _mm256_set1_ps(s.step_size),
        eps_c2: _mm256_set1_ps(s.eps_c2),
        decay: _mm256_set1_ps(s.decay),
    };
    let (am, av) = (_mm256_set1_ps(*absmax.0), _mm256_set1_ps(*absmax.1));
    let inf = _mm256_set1_ps(f32::INFINITY);
    let abs = |x: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // All ones in the lanes of the group at i that lie below n.
    let valid = |i: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32((n - i).min(8) as i32), lane);
    let mut mb = [0f32; BLOCK];
    let mut vb = [0f32; BLOCK];
    let mut fin = [_mm256_setzero_ps(); BLOCK / 8];
    let mut mx_m = _mm256_set1_ps(-f32::MAX);
    let mut mx_v = _mm256_set1_ps(-f32::MAX);
    for i in (0..n).step_by(8) {
        let k = valid(i);
        // SAFETY: the masked load reads lanes i..i+8 of `g` only where `k` is set (below n); the
        // gathers index the 256-entry maps with codes in 0..256.
        let (gi, mq, vq) = unsafe {
            (
                _mm256_maskload_ps(g.as_ptr().add(i), k),
                _mm256_i32gather_ps::<4>(t.code_m.as_ptr(), load_codes(cm, i)),
                _mm256_i32gather_ps::<4>(t.code_v.as_ptr(), load_codes(cv, i)),
            )
        };
        // |g| < inf is false for inf and NaN (ordered compare); tail lanes are left out.
        let f = _mm256_and_ps(_mm256_castsi256_ps(k), _mm256_cmp_ps::<_CMP_LT_OQ>(abs(gi), inf));
        let gz = _mm256_and_ps(f, gi);
        let vi = _mm256_mul_ps(vq, av);
        let vi = _mm256_add_ps(
            _mm256_mul_ps(vi, l.beta2),
            _mm256_mul_ps(_mm256_mul_ps(l.w2, gz), gz),
        );
        let mi = _mm256_mul_ps(mq, am);
        let mi = _mm256_add_ps(_mm256_mul_ps(mi, l.beta1), _mm256_mul_ps(l.w1, gz));
        let (mi, vi) = (_mm256_and_ps(f, mi), _mm256_and_ps(f, vi));
        // max(|x|, acc) returns acc when |x| is NaN, like f32::max; tail lanes keep acc.
        let kf = _mm256_castsi256_ps(k);
        mx_m = _mm256_blendv_ps(mx_m, _mm256_max_ps(abs(mi), mx_m), kf);
        mx_v = _mm256_blendv_ps(mx_v, _mm256_max_ps(abs(vi), mx_v), kf);
        // SAFETY: i + 8 <= BLOCK (i is a multiple of 8 below n <= BLOCK).
        unsafe {
            _mm256_storeu_ps(mb.as_mut_ptr().add(i), mi);
            _mm256_storeu_ps(vb.as_mut_ptr().add(i), vi);
        }
        fin[i / 8] = f;
    }
    // Exact in any order: no lane holds a NaN.
    let hmax = |x: __m256| {
        let mut a = [0f32; 8];
        // SAFETY: `a` holds 8 floats.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), x) };
        a.iter().fold(-f32::MAX, |a, &b| a.max(b))
    };
    let (mx_m, mx_v) = (hmax(mx_m), hmax(mx_v));
    let (dm, dv) = (BlockDiv::new(mx_m), BlockDiv::new(mx_v));
    let zero = _mm256_setzero_si256();
    let neg_m = _mm256_set1_epi32(t.neg_m as i32);
    for i in (0..n).step_by(8) {
        let f = fin[i / 8];
        let fi = _mm256_castps_si256(f);
        // SAFETY: `mb`/`vb` hold BLOCK >= i + 8 floats; `p` is read and written only in lanes of `f`
        // (a subset of the lanes below n <= p.len()).
        let (mi, vi) = unsafe {
            let (mi, vi) = (
                _mm256_loadu_ps(mb.as_ptr().add(i)),
                _mm256_loadu_ps(vb.as_ptr().add(i)),
            );
            let pv = _mm256_maskload_ps(p.as_ptr().add(i), fi);
            let upd = _mm256_div_ps(mi, _mm256_add_ps(_mm256_sqrt_ps(vi), l.eps_c2));
            let mut pv = _mm256_add_ps(pv, _mm256_mul_ps(l.step_size, upd));
            if s.weight_decay {
                pv = _mm256_mul_ps(pv, l.decay);
            }
            _mm256_maskstore_ps(p.as_mut_ptr().add(i), fi, pv);
            (mi, vi)
        };
        let (c_m, c_v) = (encode(dm.div(mi), &t.lut_m), encode(dv.div(vi), &t.lut_v));
        // m's sign repair: where the code's sign bit (c < neg_m) differs from m's, one code towards m
        // (+1 when m > 0, else -1; the byte store wraps).
        let code_neg = _mm256_cmpgt_epi32(neg_m, c_m);
        let m_neg = _mm256_cmpgt_epi32(zero, _mm256_castps_si256(mi));
        let flip = _mm256_xor_si256(code_neg, m_neg);
        let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(mi, _mm256_setzero_ps()));
        // Masks are -1 where set: subtract to add one, add to subtract one.
        let c_m = _mm256_sub_epi32(c_m, _mm256_and_si256(flip, up));
        let c_m = _mm256_add_epi32(c_m, _mm256_andnot_si256(up, flip));
        store_codes(cm, i, c_m);
        store_codes(cv, i, c_v);
    }
    *absmax.0 = mx_m;
    *absmax.1 = mx_v;
}
