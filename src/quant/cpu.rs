//! CPU 4-bit quantization: a scalar reference that mirrors bitsandbytes' CUDA code line by line (the
//! test oracle), and a fast path (rayon over 32 Ki-element tasks; AVX-512 intrinsics, or code that the
//! compiler vectorizes for AVX2 or plain x86-64), chosen at run time. Both produce identical bytes.
//!
//! Napkin math for 4096 x 4096 bf16 (n = 16.8 M):
//! * quantize reads 2n bytes and writes n/2 + 4n/64 bytes: 42 MB; per element one multiply and a
//!   4-step threshold search (4 permutes, 4 compares on 16 lanes), ~1.5 vector ops per element, so
//!   ~25 M vector ops: ~4 ms on one 3 GHz core, ~2-3 ms on two; DRAM at ~10 GB/s per core agrees.
//! * dequantize reads n/2 + n/16 bytes and writes 2n: 43 MB, ~1 vector op per output element; the
//!   floor is the write bandwidth (plus first-touch page faults of the fresh output), ~3-5 ms.
//! * double quantization touches n/64 absmax values: < 0.3 ms.

use super::{
    Absmax, FP4_THRESHOLDS, NESTED_BLOCKSIZE, NF4_THRESHOLDS, QuantState, QuantType, QuantizeOptions,
    QuantizedTensor, dynamic_map,
};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per rayon task: a multiple of every blocksize (<= 4096), 16 KiB of packed output.
const TASK: usize = 1 << 15;
/// Elements converted to f32 at a time on the portable path (a multiple of every blocksize).
const TILE: usize = 4096;
/// Absmax values per partial sum of the double-quantization mean (fixed, so the sum order, and the
/// offset's bits, are the same on every device and thread count).
pub const MEAN_CHUNK: usize = 256;

// ------------------------------------------------------------------------------------------------
// Instruction sets
// ------------------------------------------------------------------------------------------------

/// Which implementation of the fast CPU path to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust (whatever the compiler's baseline target vectorizes).
    Portable,
    /// The portable code compiled with AVX2, FMA and F16C enabled.
    Avx2,
    /// Hand-written AVX-512 (F, BW, VL) intrinsics.
    Avx512,
}

impl Isa {
    /// True if this CPU can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest available implementation (detected once).
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512, Isa::Avx2]
                .into_iter()
                .find(|i| i.is_available())
                .unwrap_or(Isa::Portable)
        })
    }

    /// Every implementation this CPU can run (for tests and benches).
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.is_available())
            .collect()
    }

    fn check(self) -> Result<()> {
        if self.is_available() {
            Ok(())
        } else {
            Err(Error::device(
                "quant::cpu",
                format!("{self:?} is not available on this CPU"),
            ))
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Reference: bitsandbytes' CUDA device functions, transcribed
// ------------------------------------------------------------------------------------------------

/// bitsandbytes' CUDA `dQuantizeNF4`: a tree of strict `>` comparisons (ties take the lower code,
/// NaN takes code 0).
pub fn nf4_code_ref(x: f32) -> u8 {
    let t = &NF4_THRESHOLDS;
    if x > t[7] {
        if x > t[11] {
            if x > t[13] {
                if x > t[14] { 0b1111 } else { 0b1110 }
            } else if x > t[12] {
                0b1101
            } else {
                0b1100
            }
        } else if x > t[9] {
            if x > t[10] { 0b1011 } else { 0b1010 }
        } else if x > t[8] {
            0b1001
        } else {
            0b1000
        }
    } else if x > t[3] {
        if x > t[5] {
            if x > t[6] { 0b0111 } else { 0b0110 }
        } else if x > t[4] {
            0b0101
        } else {
            0b0100
        }
    } else if x > t[1] {
        if x > t[2] { 0b0011 } else { 0b0010 }
    } else if x > t[0] {
        0b0001
    } else {
        0b0000
    }
}

/// bitsandbytes' CUDA `dQuantizeFP4`: the sign from `x < 0`, the magnitude by strict `>` against
/// [`FP4_THRESHOLDS`] (NaN takes code 0).
pub fn fp4_code_ref(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let a = x.abs();
    let t = &FP4_THRESHOLDS;
    let c = if a > t[3] {
        if a > t[5] {
            if a > t[6] { 0b011 } else { 0b010 }
        } else if a > t[4] {
            0b101
        } else {
            0b100
        }
    } else if a > t[1] {
        if a > t[2] { 0b111 } else { 0b110 }
    } else if a > t[0] {
        0b001
    } else {
        0b000
    };
    c + sign
}

/// The reference 4-bit code of a scaled value.
pub fn code_ref(qt: QuantType, x: f32) -> u8 {
    match qt {
        QuantType::Nf4 => nf4_code_ref(x),
        QuantType::Fp4 => fp4_code_ref(x),
    }
}

/// bitsandbytes' CUDA `dQuantize<0>` (8-bit, round to nearest): a 7-step binary search over the sorted
/// 256-entry `code`, then a midpoint test against the neighbour on the side of `x`.
pub fn quantize_8bit_ref(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let q = if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint { upper_pivot } else { pivot }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint { lower_pivot } else { pivot }
    };
    q as u8
}

/// One block, reference semantics: returns its absmax and writes `ceil(len / 2)` bytes.
fn block_ref<T: Element>(x: &[T], out: &mut [u8], qt: QuantType) -> f32 {
    // fmaxf semantics: NaN is ignored; the CUDA kernels start from -FLT_MAX, we from 0 (identical for
    // any block with a non-NaN element).
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
    let s = 1.0f32 / absmax;
    for (j, o) in out.iter_mut().enumerate() {
        let hi = x[2 * j].to_f32() * s;
        // The padding element of an odd length is 0.0, quantized like any other element.
        let lo = x.get(2 * j + 1).map_or(0.0, |v| v.to_f32()) * s;
        *o = (code_ref(qt, hi) << 4) | code_ref(qt, lo);
    }
    absmax
}

/// Reference quantization: scalar, single-threaded, NaN/inf quantized as the CUDA kernels do.
/// Returns (packed `u8 [ceil(n / 2)]`, absmax `f32 [ceil(n / blocksize)]`).
pub fn quantize_reference<T: Element>(
    x: &[T],
    qt: QuantType,
    blocksize: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_args::<T>(blocksize)?;
    let mut packed = vec![0u8; x.len().div_ceil(2)];
    let absmax = x
        .chunks(blocksize)
        .zip(packed.chunks_mut(blocksize / 2))
        .map(|(xb, pb)| block_ref(xb, pb, qt))
        .collect();
    Ok((packed, absmax))
}

/// Reference dequantization: `T::from_f32(code[c] * absmax)` per element.
pub fn dequantize_reference<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    qt: QuantType,
    blocksize: usize,
    n: usize,
) -> Result<Vec<T>> {
    check_args::<T>(blocksize)?;
    check_sizes(packed.len(), absmax.len(), blocksize, n)?;
    let lut = qt.code();
    Ok((0..n)
        .map(|i| {
            let b = packed[i / 2];
            let c = if i % 2 == 0 { b >> 4 } else { b & 0xF };
            T::from_f32(lut[c as usize] * absmax[i / blocksize])
        })
        .collect())
}

/// The double-quantization offset: the mean of `absmax`, summed in f64 in chunks of [`MEAN_CHUNK`]
/// (each chunk in index order, then the chunk sums in order), rounded once to f32.
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    let partial: Vec<f64> = absmax
        .par_chunks(MEAN_CHUNK)
        .map(|c| c.iter().fold(0f64, |s, &v| s + v as f64))
        .collect();
    let total = partial.iter().fold(0f64, |s, &v| s + v);
    (total / absmax.len() as f64) as f32
}

/// Reference double quantization of an absmax vector: (codes `u8 [nblocks]`, nested absmax
/// `f32 [ceil(nblocks / 256)]`, offset).
pub fn double_quant_reference(absmax: &[f32]) -> (Vec<u8>, Vec<f32>, f32) {
    let offset = absmax_mean(absmax);
    let code = dynamic_map();
    let mut codes = Vec::with_capacity(absmax.len());
    let mut nested = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCKSIZE));
    for blk in absmax.chunks(NESTED_BLOCKSIZE) {
        let d: Vec<f32> = blk.iter().map(|&a| a - offset).collect();
        let amax2 = d.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = 1.0f32 / amax2;
        codes.extend(d.iter().map(|&v| quantize_8bit_ref(code, v * s)));
        nested.push(amax2);
    }
    (codes, nested, offset)
}

/// Double quantization (parallel over the 256-blocks; same bytes as [`double_quant_reference`]).
pub fn double_quant(absmax: &[f32]) -> (Vec<u8>, Vec<f32>, f32) {
    let offset = absmax_mean(absmax);
    let code = dynamic_map();
    let mut codes = vec![0u8; absmax.len()];
    let nested: Vec<f32> = codes
        .par_chunks_mut(NESTED_BLOCKSIZE)
        .zip(absmax.par_chunks(NESTED_BLOCKSIZE))
        .map(|(q, blk)| {
            let amax2 = blk.iter().fold(0f32, |m, &a| m.max((a - offset).abs()));
            let s = 1.0f32 / amax2;
            for (q, &a) in q.iter_mut().zip(blk) {
                *q = quantize_8bit_ref(code, (a - offset) * s);
            }
            amax2
        })
        .collect();
    (codes, nested, offset)
}

/// `(nested_code[codes[i]] * nested_absmax[i / nested_blocksize]) + offset`, two f32 roundings.
/// Sizes must be consistent (checked by [`super::double_quant_decode`]).
pub(crate) fn double_quant_decode(
    codes: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    nested_code: &[f32],
    nested_blocksize: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; codes.len()];
    out.par_chunks_mut(nested_blocksize)
        .zip(codes.par_chunks(nested_blocksize))
        .zip(nested_absmax.par_iter())
        .for_each(|((o, q), &a2)| {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = nested_code[q as usize] * a2 + offset;
            }
        });
    out
}

fn check_args<T: Element>(blocksize: usize) -> Result<()> {
    T::DTYPE.expect_float("quant::cpu")?;
    if !super::BLOCKSIZES.contains(&blocksize) {
        return Err(Error::invalid(format!(
            "blocksize {blocksize} is not one of {:?}",
            super::BLOCKSIZES
        )));
    }
    Ok(())
}

fn check_sizes(packed: usize, absmax: usize, blocksize: usize, n: usize) -> Result<()> {
    if packed != n.div_ceil(2) || absmax != n.div_ceil(blocksize) {
        return Err(Error::shape(
            "dequantize",
            format!(
                "{n} elements in blocks of {blocksize} need {} packed bytes and {} absmax values, got {packed} and {absmax}",
                n.div_ceil(2),
                n.div_ceil(blocksize)
            ),
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Fast path: shared scalar helpers (also the tails of the vector loops)
// ------------------------------------------------------------------------------------------------

/// NF4 code as a count of thresholds below `y` (equal to the tree for every input, NaN included).
#[inline(always)]
fn nf4_count(y: f32) -> u8 {
    let mut c = 0u8;
    for t in NF4_THRESHOLDS {
        c += (y > t) as u8;
    }
    c
}

/// FP4 code: magnitude rank by counting, mapped to its bit pattern, plus the sign bit.
#[inline(always)]
fn fp4_count(y: f32) -> u8 {
    let a = y.abs();
    let mut r = 0u8;
    for t in FP4_THRESHOLDS {
        r += (a > t) as u8;
    }
    (r ^ ((r & 2) << 1)) | (((y < 0.0) as u8) << 3)
}

#[inline(always)]
fn code_fast<const FP4: bool>(y: f32) -> u8 {
    if FP4 { fp4_count(y) } else { nf4_count(y) }
}

/// Max of `|x|` and whether a non-finite value is present, from the bits: the order of non-negative
/// floats is the order of their bit patterns, so this is an integer max that vectorizes.
trait AbsBits: Element {
    fn absmax_bits(x: &[Self]) -> (f32, bool);
}

impl AbsBits for f32 {
    #[inline(always)]
    fn absmax_bits(x: &[f32]) -> (f32, bool) {
        let m = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF));
        (f32::from_bits(m), m >= 0x7F80_0000)
    }
}

impl AbsBits for bf16 {
    #[inline(always)]
    fn absmax_bits(x: &[bf16]) -> (f32, bool) {
        let m = x.iter().fold(0u16, |m, v| m.max(v.to_bits() & 0x7FFF));
        (f32::from_bits((m as u32) << 16), m >= 0x7F80)
    }
}

impl AbsBits for f16 {
    #[inline(always)]
    fn absmax_bits(x: &[f16]) -> (f32, bool) {
        let m = x.iter().fold(0u16, |m, v| m.max(v.to_bits() & 0x7FFF));
        (f16::from_bits(m).to_f32(), m >= 0x7C00)
    }
}

fn first_non_finite<T: Element>(x: &[T]) -> usize {
    x.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0)
}

/// What a task reports: the first non-finite element (relative to the task) when they are rejected.
type Bad = Option<usize>;

// ------------------------------------------------------------------------------------------------
// Fast path: portable (and AVX2-compiled) quantization
// ------------------------------------------------------------------------------------------------

#[inline(always)]
fn encode_portable<const FP4: bool>(x: &[f32], s: f32, out: &mut [u8]) {
    let pairs = x.len() / 2;
    let (xe, xt) = x.split_at(pairs * 2);
    let (oe, ot) = out.split_at_mut(pairs);
    for (o, p) in oe.iter_mut().zip(xe.chunks_exact(2)) {
        *o = (code_fast::<FP4>(p[0] * s) << 4) | code_fast::<FP4>(p[1] * s);
    }
    if let (Some(&last), Some(o)) = (xt.first(), ot.first_mut()) {
        *o = (code_fast::<FP4>(last * s) << 4) | code_fast::<FP4>(0.0 * s);
    }
}

/// One task on the portable path: tiles of [`TILE`] converted to f32, then block by block.
#[inline(always)]
fn quant_task_portable<T: Element + AbsBits>(
    x: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    qt: QuantType,
    bs: usize,
    allow: bool,
) -> Bad {
    let mut buf = vec![0f32; TILE.min(x.len())];
    for (t, ((xt, pt), at)) in x
        .chunks(TILE)
        .zip(packed.chunks_mut(TILE / 2))
        .zip(absmax.chunks_mut(TILE / bs))
        .enumerate()
    {
        let xf: &[f32] = match bytemuck::try_cast_slice::<T, f32>(xt) {
            Ok(f) if T::DTYPE == DType::F32 => f,
            _ => {
                to_f32_slice(xt, &mut buf[..xt.len()]);
                &buf[..xt.len()]
            }
        };
        for (b, ((xb, pb), am)) in xf
            .chunks(bs)
            .zip(pt.chunks_mut(bs / 2))
            .zip(at.iter_mut())
            .enumerate()
        {
            let (m, bad) = f32::absmax_bits(xb);
            if bad {
                let start = t * TILE + b * bs;
                let orig = &x[start..start + xb.len()];
                if !allow {
                    return Some(start + first_non_finite(orig));
                }
                *am = block_ref(orig, pb, qt);
                continue;
            }
            *am = m;
            let s = 1.0f32 / m;
            match qt {
                QuantType::Nf4 => encode_portable::<false>(xb, s, pb),
                QuantType::Fp4 => encode_portable::<true>(xb, s, pb),
            }
        }
    }
    None
}

fn to_f32_slice<T: Element>(x: &[T], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    if let Ok(h) = bytemuck::try_cast_slice::<T, f16>(x)
        && T::DTYPE == DType::F16
    {
        h.convert_to_f32_slice(out);
    } else if let Ok(h) = bytemuck::try_cast_slice::<T, u16>(x)
        && T::DTYPE == DType::BF16
    {
        for (o, &b) in out.iter_mut().zip(h) {
            *o = f32::from_bits((b as u32) << 16);
        }
    } else {
        for (o, v) in out.iter_mut().zip(x) {
            *o = v.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn quant_task_avx2<T: Element + AbsBits>(
    x: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    qt: QuantType,
    bs: usize,
    allow: bool,
) -> Bad {
    quant_task_portable(x, packed, absmax, qt, bs, allow)
}

// ------------------------------------------------------------------------------------------------
// Fast path: AVX-512
// ------------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! 16 lanes per vector. Codes come from a branch-free binary search: the thresholds live in one
    //! zmm register and `vpermps` fetches the one each lane must compare against at each level.
    use super::{Bad, block_ref, code_fast, first_non_finite};
    use crate::quant::{FP4_THRESHOLDS, NF4_THRESHOLDS, QuantType};
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// A float type that loads 16 values as f32 lanes and stores 16 f32 lanes rounded to itself.
    pub(super) trait Lanes: Copy + super::AbsBits {
        /// # Safety
        /// `p` points to 16 readable values; the caller has AVX-512F/BW/VL.
        unsafe fn load16(p: *const Self) -> __m512;
        /// # Safety
        /// `p` points to 16 writable values; the caller has AVX-512F/BW/VL.
        unsafe fn store16(p: *mut Self, v: __m512);
    }

    impl Lanes for f32 {
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
            let (m, bad) = T::absmax_bits(xb);
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
        let nib = _mm_set1_epi8(0x0F);
        for ((pb, ob), &am) in packed.chunks(bs / 2).zip(out.chunks_mut(bs)).zip(absmax) {
            let amv = _mm512_set1_ps(am);
            let groups = ob.len() / 32;
            for g in 0..groups {
                // SAFETY: g * 16 + 16 <= pb.len() because ob.len() >= 32 * groups and pb holds
                // ceil(ob.len() / 2) bytes; g * 32 + 32 <= ob.len().
                unsafe {
                    let q = _mm_loadu_si128(pb.as_ptr().add(16 * g) as *const __m128i);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
                    let lo = _mm_and_si128(q, nib);
                    let c0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
                    let c1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
                    let v0 = _mm512_mul_ps(_mm512_permutexvar_ps(c0, lutv), amv);
                    let v1 = _mm512_mul_ps(_mm512_permutexvar_ps(c1, lutv), amv);
                    T::store16(ob.as_mut_ptr().add(32 * g), v0);
                    T::store16(ob.as_mut_ptr().add(32 * g + 16), v1);
                }
            }
            for i in groups * 32..ob.len() {
                let b = pb[i / 2];
                let c = if i % 2 == 0 { b >> 4 } else { b & 0xF };
                ob[i] = T::from_f32(lut[c as usize] * am);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Fast path: drivers
// ------------------------------------------------------------------------------------------------

/// Fast quantization of a slice (f32, f16 or bf16) with the given implementation. Non-finite values
/// are an [`Error::NonFinite`] naming `name` and the first bad flat index unless `allow_non_finite`.
pub fn quantize<T: Element>(
    x: &[T],
    qt: QuantType,
    blocksize: usize,
    isa: Isa,
    allow_non_finite: bool,
    name: &str,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_args::<T>(blocksize)?;
    isa.check()?;
    // Dispatch on the dtype to the concrete type (the casts are identities: same type, checked).
    macro_rules! go {
        ($t:ty) => {{
            let xs: &[$t] = bytemuck::try_cast_slice(x).map_err(|e| Error::invalid(e.to_string()))?;
            quantize_typed::<$t>(xs, qt, blocksize, isa, allow_non_finite, name)
        }};
    }
    match T::DTYPE {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => Err(Error::dtype("quantize", "f32, f16 or bf16", other)),
    }
}

#[cfg(target_arch = "x86_64")]
trait FastFloat: Element + AbsBits + avx512::Lanes {}
#[cfg(target_arch = "x86_64")]
impl<T: Element + AbsBits + avx512::Lanes> FastFloat for T {}
#[cfg(not(target_arch = "x86_64"))]
trait FastFloat: Element + AbsBits {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Element + AbsBits> FastFloat for T {}

fn quantize_typed<T: FastFloat>(
    x: &[T],
    qt: QuantType,
    bs: usize,
    isa: Isa,
    allow: bool,
    name: &str,
) -> Result<(Vec<u8>, Vec<f32>)> {
    let n = x.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(bs)];
    let bad = packed
        .par_chunks_mut(TASK / 2)
        .zip(absmax.par_chunks_mut(TASK / bs))
        .zip(x.par_chunks(TASK))
        .enumerate()
        .filter_map(|(c, ((p, a), xs))| {
            let r = match isa {
                Isa::Portable => quant_task_portable(xs, p, a, qt, bs, allow),
                // SAFETY: `isa.check()` confirmed the features on this CPU.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { quant_task_avx2(xs, p, a, qt, bs, allow) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { avx512::quant_task(xs, p, a, qt, bs, allow) },
                #[cfg(not(target_arch = "x86_64"))]
                _ => quant_task_portable(xs, p, a, qt, bs, allow),
            };
            r.map(|i| c * TASK + i)
        })
        .min();
    if let Some(index) = bad {
        return Err(Error::NonFinite {
            tensor: name.to_string(),
            index,
            value: x[index].to_f32(),
        });
    }
    Ok((packed, absmax))
}

/// Fast dequantization into a fresh `Vec<T>` (f32, f16 or bf16).
pub fn dequantize<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    qt: QuantType,
    blocksize: usize,
    n: usize,
    isa: Isa,
) -> Result<Vec<T>> {
    check_args::<T>(blocksize)?;
    check_sizes(packed.len(), absmax.len(), blocksize, n)?;
    isa.check()?;
    macro_rules! go {
        ($t:ty) => {{
            let v = dequantize_typed::<$t>(packed, absmax, qt.code(), blocksize, n, isa);
            bytemuck::allocation::try_cast_vec::<$t, T>(v).map_err(|(e, _)| Error::invalid(e.to_string()))
        }};
    }
    match T::DTYPE {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => Err(Error::dtype("dequantize", "f32, f16 or bf16", other)),
    }
}

/// A zeroed `Vec<T>` straight from the allocator (no element-by-element fill for the half types).
fn zeroed_vec<T: Element>(n: usize) -> Vec<T> {
    match T::DTYPE.size_in_bytes() {
        2 => bytemuck::allocation::cast_vec(vec![0u16; n]),
        4 => bytemuck::allocation::cast_vec(vec![0u32; n]),
        _ => vec![T::default(); n],
    }
}

fn dequantize_typed<T: FastFloat>(
    packed: &[u8],
    absmax: &[f32],
    lut: &[f32; 16],
    bs: usize,
    n: usize,
    isa: Isa,
) -> Vec<T> {
    let mut out: Vec<T> = zeroed_vec(n);
    out.par_chunks_mut(TASK)
        .zip(packed.par_chunks(TASK / 2))
        .zip(absmax.par_chunks(TASK / bs))
        .for_each(|((o, p), a)| match isa {
            // SAFETY: `isa.check()` confirmed the features on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::dequant_task(p, a, lut, bs, o) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { dequant_task_avx2(p, a, lut, bs, o) },
            _ => dequant_task_portable(p, a, lut, bs, o),
        });
    out
}

#[inline(always)]
fn dequant_task_portable<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    lut: &[f32; 16],
    bs: usize,
    out: &mut [T],
) {
    let mut buf = vec![0f32; TILE.min(out.len())];
    for ((pt, ot), at) in packed
        .chunks(TILE / 2)
        .zip(out.chunks_mut(TILE))
        .zip(absmax.chunks(TILE / bs))
    {
        let f = &mut buf[..ot.len()];
        for ((pb, fb), &am) in pt.chunks(bs / 2).zip(f.chunks_mut(bs)).zip(at) {
            let pairs = fb.len() / 2;
            for (o, &b) in fb[..pairs * 2].chunks_exact_mut(2).zip(pb) {
                o[0] = lut[(b >> 4) as usize] * am;
                o[1] = lut[(b & 0xF) as usize] * am;
            }
            if fb.len() % 2 == 1 {
                fb[pairs * 2] = lut[(pb[pairs] >> 4) as usize] * am;
            }
        }
        from_f32_slice(f, ot);
    }
}

fn from_f32_slice<T: Element>(f: &[f32], out: &mut [T]) {
    use half::slice::HalfFloatSliceExt;
    if T::DTYPE == DType::F32 {
        if let Ok(o) = bytemuck::try_cast_slice_mut::<T, f32>(out) {
            o.copy_from_slice(f);
            return;
        }
    } else if T::DTYPE == DType::F16 {
        if let Ok(o) = bytemuck::try_cast_slice_mut::<T, f16>(out) {
            o.convert_from_f32_slice(f);
            return;
        }
    } else if T::DTYPE == DType::BF16
        && let Ok(o) = bytemuck::try_cast_slice_mut::<T, u16>(out)
    {
        // half::bf16::from_f32 written branch-free so that it vectorizes.
        for (o, &v) in o.iter_mut().zip(f) {
            let b = v.to_bits();
            let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
            let quiet = ((b >> 16) | 0x40) as u16;
            *o = if (b & 0x7FFF_FFFF) > 0x7F80_0000 {
                quiet
            } else {
                rounded
            };
        }
        return;
    }
    for (o, &v) in out.iter_mut().zip(f) {
        *o = T::from_f32(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dequant_task_avx2<T: Element>(packed: &[u8], absmax: &[f32], lut: &[f32; 16], bs: usize, out: &mut [T]) {
    dequant_task_portable(packed, absmax, lut, bs, out)
}

// ------------------------------------------------------------------------------------------------
// Tensor-level entry points
// ------------------------------------------------------------------------------------------------

pub(super) fn quantize_tensor(t: &Tensor, opts: &QuantizeOptions) -> Result<(Tensor, Absmax)> {
    let isa = Isa::best();
    let (packed, absmax) = match t.dtype() {
        DType::F32 => quantize(
            t.cpu_data::<f32>("quantize")?,
            opts.quant_type,
            opts.blocksize,
            isa,
            opts.allow_non_finite,
            &opts.name,
        )?,
        DType::F16 => quantize(
            t.cpu_data::<f16>("quantize")?,
            opts.quant_type,
            opts.blocksize,
            isa,
            opts.allow_non_finite,
            &opts.name,
        )?,
        DType::BF16 => quantize(
            t.cpu_data::<bf16>("quantize")?,
            opts.quant_type,
            opts.blocksize,
            isa,
            opts.allow_non_finite,
            &opts.name,
        )?,
        other => return Err(Error::dtype("quantize", "f32, f16 or bf16", other)),
    };
    let nbytes = packed.len();
    let data = Tensor::from_vec(packed, &[nbytes], Device::Cpu)?;
    let nb = absmax.len();
    let absmax = if opts.double_quant {
        let (codes, nested, offset) = double_quant(&absmax);
        let nn = nested.len();
        Absmax::Double {
            codes: Tensor::from_vec(codes, &[nb], Device::Cpu)?,
            nested_absmax: Tensor::from_vec(nested, &[nn], Device::Cpu)?,
            offset,
            nested_code: dynamic_map().to_vec(),
            nested_blocksize: NESTED_BLOCKSIZE,
        }
    } else {
        Absmax::F32(Tensor::from_vec(absmax, &[nb], Device::Cpu)?)
    };
    Ok((data, absmax))
}

/// The f32 absmax of a CPU quant state (decoding double quantization).
pub(super) fn absmax_f32(state: &QuantState) -> Result<Vec<f32>> {
    match &state.absmax {
        Absmax::F32(t) => Ok(t.cpu_data::<f32>("absmax")?.to_vec()),
        Absmax::Double {
            codes,
            nested_absmax,
            offset,
            nested_code,
            nested_blocksize,
        } => super::double_quant_decode(
            codes.cpu_data::<u8>("absmax codes")?,
            nested_absmax.cpu_data::<f32>("nested_absmax")?,
            *offset,
            nested_code,
            *nested_blocksize,
        ),
    }
}

pub(super) fn dequantize_tensor(q: &QuantizedTensor, dtype: DType) -> Result<Tensor> {
    let st = &q.state;
    let owned;
    let absmax: &[f32] = match &st.absmax {
        Absmax::F32(t) => t.cpu_data::<f32>("absmax")?,
        Absmax::Double { .. } => {
            owned = absmax_f32(st)?;
            &owned
        }
    };
    let packed = q.data.cpu_data::<u8>("packed 4-bit data")?;
    let n = st.numel();
    let (qt, bs, isa) = (st.quant_type, st.blocksize, Isa::best());
    match dtype {
        DType::F32 => Tensor::from_vec(
            dequantize::<f32>(packed, absmax, qt, bs, n, isa)?,
            &st.shape,
            Device::Cpu,
        ),
        DType::F16 => Tensor::from_vec(
            dequantize::<f16>(packed, absmax, qt, bs, n, isa)?,
            &st.shape,
            Device::Cpu,
        ),
        DType::BF16 => Tensor::from_vec(
            dequantize::<bf16>(packed, absmax, qt, bs, n, isa)?,
            &st.shape,
            Device::Cpu,
        ),
        other => Err(Error::dtype("dequantize", "f32, f16 or bf16", other)),
    }
}
