//! 8 lanes per vector. NF4/FP4 codes by counting the thresholds below each value (15 / 7 compares,
//! each a mask subtracted from the count); the table lookup of dequantization is two 8-entry
//! `vpermps` blended on bit 3 of the code.
use super::nibble;
use super::portable::{AbsBits, Bad, code_fast, first_non_finite};
use super::reference::block_ref;
use crate::quant::{FP4_THRESHOLDS, NF4_THRESHOLDS, QuantType};
use crate::tensor::Element;
use half::{bf16, f16};
use std::arch::x86_64::*;

/// A float type that loads 8 values as f32 lanes and stores 8 f32 lanes rounded to itself.
pub(super) trait Lanes8: Element + AbsBits {
    /// # Safety
    /// `p` points to 8 readable values; the caller has AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
    /// # Safety
    /// `p` points to 8 writable values; the caller has AVX2 and F16C.
    unsafe fn store8(p: *mut Self, v: __m256);
}

impl Lanes8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: caller guarantees 8 readable f32 and AVX.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store8(p: *mut f32, v: __m256) {
        // SAFETY: caller guarantees 8 writable f32 and AVX.
        unsafe { _mm256_storeu_ps(p, v) }
    }
}

impl Lanes8 for bf16 {
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: caller guarantees 8 readable bf16 (16 bytes) and AVX2.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
    #[inline(always)]
    unsafe fn store8(p: *mut bf16, v: __m256) {
        // half::bf16::from_f32, branch-free (see the AVX-512 version).
        // SAFETY: caller guarantees 8 writable bf16 (16 bytes) and AVX2.
        unsafe {
            let b = _mm256_castps_si256(v);
            let hi = _mm256_srli_epi32::<16>(b);
            let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                b,
                _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)),
            ));
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
            let r = _mm256_blendv_epi8(rounded, quiet, nan);
            // 8 x u32 (< 65536) -> 8 x u16: pack within 128-bit lanes, then gather the two halves.
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r));
            _mm_storeu_si128(p as *mut __m128i, _mm256_castsi256_si128(packed));
        }
    }
}

impl Lanes8 for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: caller guarantees 8 readable f16 (16 bytes) and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[inline(always)]
    unsafe fn store8(p: *mut f16, v: __m256) {
        // SAFETY: caller guarantees 8 writable f16 (16 bytes) and F16C.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(p as *mut __m128i, h);
        }
    }
}

/// 8 codes (i32 lanes) by counting thresholds below `y`.
#[inline(always)]
unsafe fn codes8<const FP4: bool>(y: __m256) -> __m256i {
    // SAFETY: register-only AVX/AVX2 ops; the caller has the features.
    unsafe {
        let mut c = _mm256_setzero_si256();
        if FP4 {
            let a = _mm256_and_ps(y, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF)));
            for t in FP4_THRESHOLDS {
                let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(a, _mm256_set1_ps(t));
                c = _mm256_sub_epi32(c, _mm256_castps_si256(gt));
            }
            let bits = _mm256_xor_si256(
                c,
                _mm256_slli_epi32::<1>(_mm256_and_si256(c, _mm256_set1_epi32(2))),
            );
            let neg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(y, _mm256_setzero_ps()));
            _mm256_or_si256(bits, _mm256_and_si256(neg, _mm256_set1_epi32(8)))
        } else {
            for t in NF4_THRESHOLDS {
                let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(y, _mm256_set1_ps(t));
                c = _mm256_sub_epi32(c, _mm256_castps_si256(gt));
            }
            c
        }
    }
}

/// 16 codes (elements 0-7 in `a`, 8-15 in `b`) -> 8 bytes, even element in the high nibble.
#[inline(always)]
unsafe fn pack16(a: __m256i, b: __m256i) -> __m128i {
    // SAFETY: register-only AVX2 ops; the caller has the features.
    unsafe {
        // The low i32 of each 64-bit lane becomes even << 4 | odd.
        let pa = _mm256_or_si256(_mm256_slli_epi64::<4>(a), _mm256_srli_epi64::<32>(a));
        let pb = _mm256_or_si256(_mm256_slli_epi64::<4>(b), _mm256_srli_epi64::<32>(b));
        let sel = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        let la = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(pa, sel));
        let lb = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(pb, sel));
        let w = _mm_packus_epi32(la, lb); // 8 x u16
        _mm_packus_epi16(w, w) // low 8 bytes
    }
}

#[inline(always)]
unsafe fn encode_block<T: Lanes8, const FP4: bool>(x: &[T], s: f32, out: &mut [u8]) {
    let full = x.len() / 16 * 16;
    // SAFETY: i + 16 <= full <= x.len(); i / 2 + 8 <= out.len() (ceil(len / 2) bytes).
    unsafe {
        let sv = _mm256_set1_ps(s);
        let mut i = 0;
        while i < full {
            let y0 = _mm256_mul_ps(T::load8(x.as_ptr().add(i)), sv);
            let y1 = _mm256_mul_ps(T::load8(x.as_ptr().add(i + 8)), sv);
            let b = pack16(codes8::<FP4>(y0), codes8::<FP4>(y1));
            _mm_storel_epi64(out.as_mut_ptr().add(i / 2) as *mut __m128i, b);
            i += 16;
        }
    }
    for j in full / 2..out.len() {
        let hi = x[2 * j].to_f32() * s;
        let lo = x.get(2 * j + 1).map_or(0.0, |v| v.to_f32()) * s;
        out[j] = (code_fast::<FP4>(hi) << 4) | code_fast::<FP4>(lo);
    }
}

#[inline(always)]
unsafe fn quant_task_impl<T: Lanes8, const FP4: bool>(
    x: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    qt: QuantType,
    bs: usize,
    allow: bool,
) -> Bad {
    for (b, ((xb, pb), am)) in x
        .chunks(bs)
        .zip(packed.chunks_mut(bs / 2))
        .zip(absmax.iter_mut())
        .enumerate()
    {
        super::portable::prefetch_ahead(x, b * bs, bs);
        // Integer max of the magnitude bits: vectorized by the compiler for this target.
        let (m, bad) = T::absmax_bits(xb);
        if bad {
            if !allow {
                return Some(b * bs + first_non_finite(xb));
            }
            *am = block_ref(xb, pb, qt);
            continue;
        }
        *am = m;
        // SAFETY: the caller has AVX2/F16C; pb holds ceil(len / 2) bytes.
        unsafe { encode_block::<T, FP4>(xb, 1.0f32 / m, pb) };
    }
    None
}

/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quant_task<T: Lanes8>(
    x: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    qt: QuantType,
    bs: usize,
    allow: bool,
) -> Bad {
    // SAFETY: forwarded; the features are enabled on this function.
    unsafe {
        match qt {
            QuantType::Nf4 => quant_task_impl::<T, false>(x, packed, absmax, qt, bs, allow),
            QuantType::Fp4 => quant_task_impl::<T, true>(x, packed, absmax, qt, bs, allow),
        }
    }
}

/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequant_task<T: Lanes8>(
    packed: &[u8],
    absmax: &[f32],
    lut: &[f32; 16],
    bs: usize,
    out: &mut [T],
) {
    // SAFETY: the array holds 16 floats.
    let (lo_t, hi_t) = unsafe {
        (
            _mm256_loadu_ps(lut.as_ptr()),
            _mm256_loadu_ps(lut.as_ptr().add(8)),
        )
    };
    let nib = _mm_set1_epi8(0x0F);
    for ((pb, ob), &am) in packed.chunks(bs / 2).zip(out.chunks_mut(bs)).zip(absmax) {
        let amv = _mm256_set1_ps(am);
        let groups = ob.len() / 16;
        for g in 0..groups {
            // SAFETY: 8 bytes readable at 8g (ob.len() >= 16 (g + 1) and pb holds ceil(ob.len() / 2)),
            // 16 values writable at 16g.
            unsafe {
                let q = _mm_loadl_epi64(pb.as_ptr().add(8 * g) as *const __m128i);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
                let lo = _mm_and_si128(q, nib);
                let il = _mm_unpacklo_epi8(hi, lo); // 16 codes in element order
                for (k, c8) in [il, _mm_srli_si128::<8>(il)].into_iter().enumerate() {
                    let c = _mm256_cvtepu8_epi32(c8);
                    let v = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(lo_t, c),
                        _mm256_permutevar8x32_ps(hi_t, c),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<28>(c)),
                    );
                    T::store8(ob.as_mut_ptr().add(16 * g + 8 * k), _mm256_mul_ps(v, amv));
                }
            }
        }
        for i in groups * 16..ob.len() {
            ob[i] = T::from_f32(lut[nibble(pb, i)] * am);
        }
    }
}
