//! 16 lanes per vector. Codes come from a branch-free binary search: the thresholds live in one
//! zmm register and `vpermps` fetches the one each lane must compare against at each level.
use super::nibble;
use super::portable::{Bad, code_fast, first_non_finite};
use super::reference::block_ref;
use crate::quant::{FP4_THRESHOLDS, NF4_THRESHOLDS, QuantType};
use half::{bf16, f16};
use std::arch::x86_64::*;

/// Max of the magnitude bits (`x & 0x7FFF`) of 16-bit floats (see [`super::portable::AbsBits`]): 32 lanes per
/// step and a masked tail.
#[inline(always)]
unsafe fn absmax_u16(x: &[u16]) -> u16 {
    // SAFETY: loads stay inside `x` (full vectors, then one masked load of the remainder, which never
    // touches masked-out memory); the caller has AVX-512F/BW.
    unsafe {
        let mask = _mm512_set1_epi16(0x7FFF);
        let mut m = _mm512_setzero_si512();
        let full = x.len() / 32 * 32;
        let mut i = 0;
        while i < full {
            let v = _mm512_loadu_si512(x.as_ptr().add(i) as *const __m512i);
            m = _mm512_max_epu16(m, _mm512_and_si512(v, mask));
            i += 32;
        }
        if full < x.len() {
            let k: __mmask32 = (1u32 << (x.len() - full)) - 1;
            let v = _mm512_maskz_loadu_epi16(k, x.as_ptr().add(full) as *const i16);
            m = _mm512_max_epu16(m, _mm512_and_si512(v, mask));
        }
        let m256 = _mm256_max_epu16(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64::<1>(m));
        let m128 = _mm_max_epu16(_mm256_castsi256_si128(m256), _mm256_extracti128_si256::<1>(m256));
        // Horizontal max of 8 u16 as the complement of a horizontal min (phminposuw).
        let inv = _mm_xor_si128(m128, _mm_set1_epi16(-1));
        !(_mm_cvtsi128_si32(_mm_minpos_epu16(inv)) as u16)
    }
}

/// A float type that loads 16 values as f32 lanes and stores 16 f32 lanes rounded to itself.
pub(super) trait Lanes: Copy + super::portable::AbsBits {
    /// Max of `|x|` (as f32) and whether a non-finite value is present.
    ///
    /// # Safety
    /// The caller has AVX-512F/BW/VL.
    unsafe fn absmax_fast(x: &[Self]) -> (f32, bool);
    /// # Safety
    /// `p` points to 16 readable values; the caller has AVX-512F/BW/VL.
    unsafe fn load16(p: *const Self) -> __m512;
    /// # Safety
    /// `p` points to 16 writable values; the caller has AVX-512F/BW/VL.
    unsafe fn store16(p: *mut Self, v: __m512);
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn absmax_fast(x: &[f32]) -> (f32, bool) {
        // SAFETY: as in `absmax_u16`, with 16 u32 lanes.
        unsafe {
            let mask = _mm512_set1_epi32(0x7FFF_FFFF);
            let mut m = _mm512_setzero_si512();
            let full = x.len() / 16 * 16;
            let mut i = 0;
            while i < full {
                let v = _mm512_loadu_si512(x.as_ptr().add(i) as *const __m512i);
                m = _mm512_max_epu32(m, _mm512_and_si512(v, mask));
                i += 16;
            }
            if full < x.len() {
                let k: __mmask16 = ((1u32 << (x.len() - full)) - 1) as u16;
                let v = _mm512_maskz_loadu_epi32(k, x.as_ptr().add(full) as *const i32);
                m = _mm512_max_epu32(m, _mm512_and_si512(v, mask));
            }
            let b = _mm512_reduce_max_epu32(m);
            (f32::from_bits(b), b >= 0x7F80_0000)
        }
    }
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: caller guarantees 16 readable f32 and AVX-512F.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store16(p: *mut f32, v: __m512) {
        // SAFETY: caller guarantees 16 writable f32 and AVX-512F.
        unsafe { _mm512_storeu_ps(p, v) }
    }
}

impl Lanes for bf16 {
    #[inline(always)]
    unsafe fn absmax_fast(x: &[bf16]) -> (f32, bool) {
        // SAFETY: bf16 and u16 have the same layout; forwarded feature guarantee.
        let m = unsafe { absmax_u16(bytemuck::cast_slice(x)) };
        (f32::from_bits((m as u32) << 16), m >= 0x7F80)
    }
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> __m512 {
        // SAFETY: caller guarantees 16 readable bf16 (32 bytes) and AVX-512F.
        unsafe {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
    #[inline(always)]
    unsafe fn store16(p: *mut bf16, v: __m512) {
        // Round to nearest even exactly as half::bf16::from_f32 (NaN: keep the top payload bits and
        // set the quiet bit).
        // SAFETY: caller guarantees 16 writable bf16 (32 bytes) and AVX-512F/BW.
        unsafe {
            let b = _mm512_castps_si512(v);
            let hi = _mm512_srli_epi32::<16>(b);
            let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                b,
                _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)),
            ));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
            let r = _mm512_mask_mov_epi32(rounded, nan, quiet);
            _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(r));
        }
    }
}

impl Lanes for f16 {
    #[inline(always)]
    unsafe fn absmax_fast(x: &[f16]) -> (f32, bool) {
        // SAFETY: f16 and u16 have the same layout; forwarded feature guarantee.
        let m = unsafe { absmax_u16(bytemuck::cast_slice(x)) };
        (f16::from_bits(m).to_f32(), m >= 0x7C00)
    }
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: caller guarantees 16 readable f16 (32 bytes) and AVX-512F.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    #[inline(always)]
    unsafe fn store16(p: *mut f16, v: __m512) {
        // SAFETY: caller guarantees 16 writable f16 (32 bytes) and AVX-512F.
        unsafe {
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_storeu_si256(p as *mut __m256i, h);
        }
    }
}

/// 16 NF4 codes (as i32 lanes): 4 levels of the binary search over the 15 sorted thresholds.
#[inline(always)]
unsafe fn nf4_codes(y: __m512, thr: __m512) -> __m512i {
    // SAFETY: register-only AVX-512F ops; the caller has the feature.
    unsafe {
        let mut idx = _mm512_setzero_si512();
        for lvl in [8, 4, 2, 1] {
            let t = _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(lvl - 1)), thr);
            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(y, t);
            idx = _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(lvl));
        }
        idx
    }
}

/// 16 FP4 codes: the magnitude rank by a 3-level search, mapped to bits, plus the sign.
#[inline(always)]
unsafe fn fp4_codes(y: __m512, thr: __m512) -> __m512i {
    // SAFETY: register-only AVX-512F ops; the caller has the feature.
    unsafe {
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(y, _mm512_setzero_ps());
        let a = _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(y),
            _mm512_set1_epi32(0x7FFF_FFFF),
        ));
        let mut r = _mm512_setzero_si512();
        for lvl in [4, 2, 1] {
            let t = _mm512_permutexvar_ps(_mm512_add_epi32(r, _mm512_set1_epi32(lvl - 1)), thr);
            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, t);
            r = _mm512_mask_add_epi32(r, gt, r, _mm512_set1_epi32(lvl));
        }
        let bits = _mm512_xor_si512(
            r,
            _mm512_slli_epi32::<1>(_mm512_and_si512(r, _mm512_set1_epi32(2))),
        );
        _mm512_mask_or_epi32(bits, neg, bits, _mm512_set1_epi32(8))
    }
}

/// Packs 32 codes (two vectors of 16, element order) into 16 bytes, even element in the high nibble.
#[inline(always)]
unsafe fn pack32(c0: __m512i, c1: __m512i) -> __m128i {
    // SAFETY: register-only AVX-512F ops; the caller has the feature.
    unsafe {
        // Each 64-bit lane holds (even, odd) codes; its low byte becomes even << 4 | odd.
        let p0 = _mm512_or_si512(_mm512_slli_epi64::<4>(c0), _mm512_srli_epi64::<32>(c0));
        let p1 = _mm512_or_si512(_mm512_slli_epi64::<4>(c1), _mm512_srli_epi64::<32>(c1));
        _mm_unpacklo_epi64(_mm512_cvtepi64_epi8(p0), _mm512_cvtepi64_epi8(p1))
    }
}

fn thresholds(qt: QuantType) -> [f32; 16] {
    let mut t = [f32::INFINITY; 16];
    match qt {
        QuantType::Nf4 => t[..15].copy_from_slice(&NF4_THRESHOLDS),
        QuantType::Fp4 => t[..7].copy_from_slice(&FP4_THRESHOLDS),
    }
    t
}

#[inline(always)]
unsafe fn encode_block<T: Lanes, const FP4: bool>(x: &[T], s: f32, out: &mut [u8], thr: __m512) {
    let full = x.len() / 32 * 32;
    // SAFETY: i + 32 <= full <= x.len() and i / 2 + 16 <= out.len() (out holds ceil(len / 2) bytes).
    unsafe {
        let sv = _mm512_set1_ps(s);
        let mut i = 0;
        while i < full {
            let y0 = _mm512_mul_ps(T::load16(x.as_ptr().add(i)), sv);
            let y1 = _mm512_mul_ps(T::load16(x.as_ptr().add(i + 16)), sv);
            let (c0, c1) = if FP4 {
                (fp4_codes(y0, thr), fp4_codes(y1, thr))
            } else {
                (nf4_codes(y0, thr), nf4_codes(y1, thr))
            };
            _mm_storeu_si128(out.as_mut_ptr().add(i / 2) as *mut __m128i, pack32(c0, c1));
            i += 32;
        }
    }
    for j in full / 2..out.len() {
        let hi = x[2 * j].to_f32() * s;
        let lo = x.get(2 * j + 1).map_or(0.0, |v| v.to_f32()) * s;
        out[j] = (code_fast::<FP4>(hi) << 4) | code_fast::<FP4>(lo);
    }
}

#[inline(always)]
unsafe fn quant_task_impl<T: Lanes, const FP4: bool>(
    x: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    qt: QuantType,
    bs: usize,
    allow: bool,
) -> Bad {
    let thr_arr = thresholds(qt);
    // SAFETY: the caller has AVX-512F; the array holds 16 floats.
    let thr = unsafe { _mm512_loadu_ps(thr_arr.as_ptr()) };
    for (b, ((xb, pb), am)) in x
        .chunks(bs)
        .zip(packed.chunks_mut(bs / 2))
        .zip(absmax.iter_mut())
        .enumerate()
    {
        super::portable::prefetch_ahead(x, b * bs, bs);
        // SAFETY: the caller has AVX-512F/BW/VL.
        let (m, bad) = unsafe { T::absmax_fast(xb) };
        if bad {
            if !allow {
                return Some(b * bs + first_non_finite(xb));
            }
            *am = block_ref(xb, pb, qt);
            continue;
        }
        *am = m;
        // SAFETY: the caller has AVX-512; slices are consistent (pb holds ceil(len / 2) bytes).
        unsafe { encode_block::<T, FP4>(xb, 1.0f32 / m, pb, thr) };
    }
    None
}

/// # Safety
/// The CPU supports AVX-512F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quant_task<T: Lanes>(
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

/// 32 f32 values of one block from 16 packed bytes: the nibbles in element order, looked up in the
/// 16-entry table held in a register, times the block's absmax.
#[inline(always)]
unsafe fn decode32(p: *const u8, lutv: __m512, amv: __m512) -> (__m512, __m512) {
    // SAFETY: the caller guarantees 16 readable bytes at `p` and AVX-512F/BW.
    unsafe {
        let nib = _mm_set1_epi8(0x0F);
        let q = _mm_loadu_si128(p as *const __m128i);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
        let lo = _mm_and_si128(q, nib);
        let c0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
        let c1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
        (
            _mm512_mul_ps(_mm512_permutexvar_ps(c0, lutv), amv),
            _mm512_mul_ps(_mm512_permutexvar_ps(c1, lutv), amv),
        )
    }
}

/// True when `vcvtne2ps2bf16` rounds every product `code * am` of a block exactly as `half` does:
/// it flushes subnormal inputs, and the smallest nonzero code magnitude is 0.0052 > 2^-8, so an
/// absmax of 0 or a finite one of at least 2^-100 keeps every product zero or normal.
#[inline(always)]
fn hw_bf16_exact(am: f32) -> bool {
    am == 0.0 || (am.is_finite() && am >= 2f32.powi(-100))
}

/// True if this CPU converts f32 to bf16 in hardware (`vcvtne2ps2bf16`).
pub(super) fn has_bf16() -> bool {
    static B: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *B.get_or_init(|| is_x86_feature_detected!("avx512bf16"))
}

/// bf16 output with the hardware conversion, 32 values per instruction, for the blocks where it is
/// exact ([`hw_bf16_exact`]); other blocks take the exact path.
///
/// # Safety
/// The CPU supports AVX-512F, BW, VL and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn dequant_task_bf16(
    packed: &[u8],
    absmax: &[f32],
    lut: &[f32; 16],
    bs: usize,
    out: &mut [bf16],
) {
    // SAFETY: the array holds 16 floats.
    let lutv = unsafe { _mm512_loadu_ps(lut.as_ptr()) };
    for ((pb, ob), &am) in packed.chunks(bs / 2).zip(out.chunks_mut(bs)).zip(absmax) {
        if !hw_bf16_exact(am) {
            // SAFETY: same features; slices are one consistent block.
            unsafe { dequant_task(pb, std::slice::from_ref(&am), lut, bs, ob) };
            continue;
        }
        let amv = _mm512_set1_ps(am);
        let groups = ob.len() / 32;
        for g in 0..groups {
            // SAFETY: as in `dequant_task`: 16 bytes readable at 16g, 32 values writable at 32g.
            unsafe {
                let (v0, v1) = decode32(pb.as_ptr().add(16 * g), lutv, amv);
                let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0));
                _mm512_storeu_si512(ob.as_mut_ptr().add(32 * g) as *mut __m512i, h);
            }
        }
        for i in groups * 32..ob.len() {
            ob[i] = bf16::from_f32(lut[nibble(pb, i)] * am);
        }
    }
}

/// [`dequant_task_bf16`] for outputs too large to stay in cache: the same values, written with
/// non-temporal 64-byte stores, which skip the read-for-ownership of every output line (a third
/// less memory traffic: 2 bytes written per value instead of 2 read + 2 written, plus the 0.5-byte
/// code). Output lines are 64-byte aligned, so when `out` is not, each line is spliced from two
/// consecutive decoded groups with one `vpermt2w`; the ragged head and tail take the scalar path.
///
/// Returns `false`, writing nothing, when it cannot give the same result as `dequant_task_bf16`
/// (a block with a subnormal or non-finite absmax, or an odd address); the caller then falls back.
///
/// # Safety
/// The CPU supports AVX-512F, BW, VL and BF16; `packed`, `absmax` and `out` are one consistent
/// task (as for `dequant_task_bf16`) and `bs` is a multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn dequant_task_bf16_stream(
    packed: &[u8],
    absmax: &[f32],
    lut: &[f32; 16],
    bs: usize,
    out: &mut [bf16],
) -> bool {
    let addr = out.as_ptr() as usize;
    if !addr.is_multiple_of(2) || !absmax.iter().all(|&a| hw_bf16_exact(a)) {
        return false;
    }
    let n = out.len();
    let groups = n / 32;
    // Values before the first 64-byte boundary; every full line after it spans groups k and k+1.
    let head = (32 - (addr % 64) / 2) % 32;
    let lines = match (head, groups) {
        (_, 0) => 0,
        (0, g) => g,
        (_, g) => g - 1,
    };
    let scalar = |i: usize| bf16::from_f32(lut[nibble(packed, i)] * absmax[i / bs]);
    let (start, end) = (head.min(n), head.min(n) + 32 * lines);
    for i in (0..start).chain(end..n) {
        out[i] = scalar(i);
    }
    // SAFETY: the caller guarantees the features; group g reads packed bytes [16g, 16g + 16) with
    // g < groups = n / 32 <= 2 * packed.len() / 32, and absmax[32g / bs] exists because the task's
    // absmax covers all n values. Line k writes out[head + 32k .. head + 32k + 32), inside `out`
    // (head + 32 * lines <= n by construction) and 64-byte aligned, as `_mm512_stream_si512` needs.
    unsafe {
        let lutv = _mm512_loadu_ps(lut.as_ptr());
        let group = |g: usize| -> __m512i {
            let amv = _mm512_set1_ps(*absmax.get_unchecked(32 * g / bs));
            let (v0, v1) = decode32(packed.as_ptr().add(16 * g), lutv, amv);
            std::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0))
        };
        let dst = out.as_mut_ptr().add(head);
        if head == 0 {
            for k in 0..lines {
                _mm512_stream_si512(dst.add(32 * k) as *mut __m512i, group(k));
            }
        } else if lines > 0 {
            // Lane i of line k is value head + i of group k, or (head + i - 32) of group k + 1: a
            // `vpermt2w` index with bit 5 set selects the second source.
            let idx = _mm512_add_epi16(
                _mm512_set_epi16(
                    31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10,
                    9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
                ),
                _mm512_set1_epi16(head as i16),
            );
            let mut prev = group(0);
            for k in 0..lines {
                let next = group(k + 1);
                let line = _mm512_permutex2var_epi16(prev, idx, next);
                _mm512_stream_si512(dst.add(32 * k) as *mut __m512i, line);
                prev = next;
            }
        }
        // Non-temporal stores are weakly ordered: make them visible before the task reports done.
        _mm_sfence();
    }
    true
}

/// Dequantizes one task: per block, 16 packed bytes expand to 32 codes, `vpermps` looks them up in
/// the 16-entry table held in a register, one multiply by the block's absmax, one rounding.
///
/// # Safety
/// The CPU supports AVX-512F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn dequant_task<T: Lanes + crate::tensor::Element>(
    packed: &[u8],
    absmax: &[f32],
    lut: &[f32; 16],
    bs: usize,
    out: &mut [T],
) {
    // SAFETY: the array holds 16 floats; AVX-512F is enabled on this function.
    let lutv = unsafe { _mm512_loadu_ps(lut.as_ptr()) };
    for ((pb, ob), &am) in packed.chunks(bs / 2).zip(out.chunks_mut(bs)).zip(absmax) {
        let amv = _mm512_set1_ps(am);
        let groups = ob.len() / 32;
        for g in 0..groups {
            // SAFETY: g * 16 + 16 <= pb.len() because ob.len() >= 32 * groups and pb holds
            // ceil(ob.len() / 2) bytes; g * 32 + 32 <= ob.len().
            unsafe {
                let (v0, v1) = decode32(pb.as_ptr().add(16 * g), lutv, amv);
                T::store16(ob.as_mut_ptr().add(32 * g), v0);
                T::store16(ob.as_mut_ptr().add(32 * g + 16), v1);
            }
        }
        for i in groups * 32..ob.len() {
            ob[i] = T::from_f32(lut[nibble(pb, i)] * am);
        }
    }
}
