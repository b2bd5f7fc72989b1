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
//!
//! Measured (2 shared vCPUs, AVX-512): quantize 7-9 ms, dequantize ~8 ms of CPU time, of which ~3.7 ms is
//! the kernel zeroing the fresh output pages; the AVX2 path is ~4x slower at quantize. README.md has the
//! comparison with bitsandbytes.

use super::{
    Absmax, FP4_THRESHOLDS, NESTED_BLOCKSIZE, NF4_THRESHOLDS, QuantState, QuantType, QuantizeOptions,
    QuantizedTensor, dynamic_map,
};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// `dequantize_into` outputs at least this large are written with non-temporal stores where supported:
/// they do not stay in cache, and skipping the read-for-ownership of each line cuts memory traffic by a
/// third. Measured on the 2-core dev VM: 11008 x 4096 bf16 (90 MB) 3.5-4.1 ms streamed against 4.4-9.0 ms
/// cached; 4096 x 4096 (32 MiB) is no faster streamed there (its large shared L3 still catches it), so
/// the bar sits above it.
const STREAM_MIN_BYTES: usize = 64 << 20;

/// Code `i` of a packed 4-bit tensor: element 2j sits in the high nibble of byte j.
#[inline(always)]
fn nibble(packed: &[u8], i: usize) -> usize {
    let b = packed[i / 2];
    (if i.is_multiple_of(2) { b >> 4 } else { b & 0xF }) as usize
}

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
    /// Hand-written AVX2 (+ FMA, F16C) intrinsics.
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
        .map(|i| T::from_f32(lut[nibble(packed, i)] * absmax[i / blocksize]))
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

/// The decision thresholds equivalent to `dQuantize<0>` over the dynamic map: the code of `x` is the
/// number of entries strictly below `x`.
///
/// Why this is exact: the search always ends on an even pivot `p` whose in-order neighbours `p - 1`
/// and `p + 1` are the last pivots passed on each side, so `x` lies in `(code[p-1], code[p+1]]` and the
/// midpoint test sends a tie to `p`, the even code. Boundary `k | k+1` is therefore the f32 midpoint
/// `(code[k] + code[k+1]) * 0.5`, crossed by `x > m` for even `k` (ties stay down) and by `x >= m`
/// (that is, `x > prev_float(m)`) for odd `k` (ties go up). NaN compares false everywhere: code 0,
/// as in the search. `tests/nf4.rs` checks the equivalence at every boundary and on random inputs.
fn dynamic_thresholds() -> &'static [f32; 256] {
    static T: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    T.get_or_init(|| thresholds_8bit(dynamic_map()))
}

/// The thresholds of [`dynamic_thresholds`] for any strictly increasing 256-entry code (the same proof
/// holds; the 8-bit optimizer states use it for the unsigned dynamic map too).
pub(crate) fn thresholds_8bit(c: &[f32; 256]) -> [f32; 256] {
    let mut t = [f32::INFINITY; 256];
    for k in 0..255 {
        let m = (c[k] + c[k + 1]) * 0.5;
        t[k] = if k % 2 == 0 {
            m
        } else if m > 0.0 {
            f32::from_bits(m.to_bits() - 1)
        } else {
            f32::from_bits(m.to_bits() + 1)
        };
    }
    t
}

/// `dQuantize<0>` over the dynamic map by a branch-free binary search on [`dynamic_thresholds`].
#[inline(always)]
pub(crate) fn quantize_8bit_fast(t: &[f32; 256], x: f32) -> u8 {
    let mut i = 0usize;
    for step in [128, 64, 32, 16, 8, 4, 2, 1] {
        i += step * (x > t[i + step - 1]) as usize;
    }
    i as u8
}

/// Double quantization (parallel over the 256-blocks; same bytes as [`double_quant_reference`]).
pub fn double_quant(absmax: &[f32]) -> (Vec<u8>, Vec<f32>, f32) {
    let offset = absmax_mean(absmax);
    let t = dynamic_thresholds();
    let mut codes = vec![0u8; absmax.len()];
    let nested: Vec<f32> = codes
        .par_chunks_mut(NESTED_BLOCKSIZE * 16)
        .zip(absmax.par_chunks(NESTED_BLOCKSIZE * 16))
        .flat_map_iter(|(q, a)| {
            q.chunks_mut(NESTED_BLOCKSIZE)
                .zip(a.chunks(NESTED_BLOCKSIZE))
                .map(|(q, blk)| {
                    let amax2 = blk.iter().fold(0f32, |m, &a| m.max((a - offset).abs()));
                    let s = 1.0f32 / amax2;
                    for (q, &a) in q.iter_mut().zip(blk) {
                        *q = quantize_8bit_fast(t, (a - offset) * s);
                    }
                    amax2
                })
                .collect::<Vec<f32>>()
        })
        .collect();
    (codes, nested, offset)
}

/// [`quantize_8bit_ref`]'s fast equivalent, exposed for tests.
pub fn quantize_8bit(x: f32) -> u8 {
    quantize_8bit_fast(dynamic_thresholds(), x)
}

/// `(nested_code[codes[i]] * nested_absmax[i / nested_blocksize]) + offset`, two f32 roundings.
/// Sizes must be consistent (checked by [`super::double_quant_decode_blocks`]).
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

/// Software prefetch of the block 4 KiB ahead of `x[start..]`, `len` elements: the absmax pass is the
/// first touch of the input and otherwise stalls on DRAM (measured: ~30% less CPU time per quantize).
#[inline(always)]
fn prefetch_ahead<T>(x: &[T], start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let size = std::mem::size_of::<T>();
        let pf = start + (4096 / size).max(len);
        if pf < x.len() {
            let p = x[pf..].as_ptr() as *const i8;
            let end = (x.len() - pf).min(len) * size;
            let mut off = 0;
            while off < end {
                // SAFETY: the address lies inside `x` (off < end <= remaining bytes); a prefetch never
                // faults and SSE is part of x86_64.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
                off += 64;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, start, len);
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

// ------------------------------------------------------------------------------------------------
// Fast path: AVX-512
// ------------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! 16 lanes per vector. Codes come from a branch-free binary search: the thresholds live in one
    //! zmm register and `vpermps` fetches the one each lane must compare against at each level.
    use super::{Bad, block_ref, code_fast, first_non_finite, nibble};
    use crate::quant::{FP4_THRESHOLDS, NF4_THRESHOLDS, QuantType};
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// Max of the magnitude bits (`x & 0x7FFF`) of 16-bit floats (see [`super::AbsBits`]): 32 lanes per
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
    pub(super) trait Lanes: Copy + super::AbsBits {
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
            super::prefetch_ahead(x, b * bs, bs);
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
                        31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11,
                        10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
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
}

// ------------------------------------------------------------------------------------------------
// Fast path: AVX2 (+ FMA, F16C)
// ------------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! 8 lanes per vector. NF4/FP4 codes by counting the thresholds below each value (15 / 7 compares,
    //! each a mask subtracted from the count); the table lookup of dequantization is two 8-entry
    //! `vpermps` blended on bit 3 of the code.
    use super::{AbsBits, Bad, block_ref, code_fast, first_non_finite, nibble};
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
            super::prefetch_ahead(x, b * bs, bs);
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
trait FastFloat: Element + AbsBits + avx512::Lanes + avx2::Lanes8 {}
#[cfg(target_arch = "x86_64")]
impl<T: Element + AbsBits + avx512::Lanes + avx2::Lanes8> FastFloat for T {}
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
    let mut packed: Vec<u8> = zeroed_vec(n.div_ceil(2));
    let mut absmax: Vec<f32> = zeroed_vec(n.div_ceil(bs));
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
                Isa::Avx2 => unsafe { avx2::quant_task(xs, p, a, qt, bs, allow) },
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
            let v = dequantize_typed::<$t>(packed, Scales::F32(absmax), qt.code(), blocksize, n, isa);
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

/// A zeroed `Vec<T>` straight from the allocator (calloc: no element-by-element fill, and fresh pages
/// are not touched), with its pages advised as transparent huge pages before the first write.
fn zeroed_vec<T: Element>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = match T::DTYPE.size_in_bytes() {
        1 => bytemuck::allocation::cast_vec(vec![0u8; n]),
        2 => bytemuck::allocation::cast_vec(vec![0u16; n]),
        4 => bytemuck::allocation::cast_vec(vec![0u32; n]),
        _ => vec![T::default(); n],
    };
    advise_huge_pages(&mut v);
    v
}

/// Large outputs are written once, right after allocation; with 4 KiB pages the first-touch page faults
/// cost as much as the kernel itself (8192 faults for a 32 MiB bf16 4096 x 4096 tensor). On Linux with
/// transparent huge pages in `madvise` mode, asking for 2 MiB pages cuts that 512-fold.
fn advise_huge_pages<T>(v: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(v);
        if bytes < 2 * HUGE {
            return;
        }
        let start = v.as_mut_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the allocation `v` owns; MADV_HUGEPAGE is only a hint about
            // how to back those pages and never changes their contents. The result is ignored: without
            // THP support the call fails harmlessly.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// First-level scales of a 4-bit tensor on the host: plain f32, or the double-quantized 8-bit codes,
/// decoded on the fly (by dequantization per task into a stack buffer, by the fused GEMV per block), so
/// no tensor-sized f32 absmax is ever built.
#[derive(Clone, Copy)]
pub(crate) enum Scales<'a> {
    F32(&'a [f32]),
    Double {
        codes: &'a [u8],
        nested: &'a [f32],
        offset: f32,
        code: &'a [f32],
        /// `log2(nested_blocksize)` (validation requires a power of two): a 64-bit division per
        /// block would cost more than the decode itself.
        nested_shift: u32,
    },
}

impl<'a> Scales<'a> {
    /// The scales of a validated quant state (see [`QuantState::validate`]), whose tensors are on the host.
    pub(crate) fn of(state: &'a QuantState, op: &'static str) -> Result<Scales<'a>> {
        Ok(match &state.absmax {
            Absmax::F32(t) => Scales::F32(t.cpu_data::<f32>(op)?),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
                nested_code,
                nested_blocksize,
            } => Scales::Double {
                codes: codes.cpu_data::<u8>(op)?,
                nested: nested_absmax.cpu_data::<f32>(op)?,
                offset: *offset,
                code: nested_code,
                nested_shift: nested_blocksize.trailing_zeros(),
            },
        })
    }

    /// Number of blocks.
    pub(crate) fn len(&self) -> usize {
        match self {
            Scales::F32(a) => a.len(),
            Scales::Double { codes, .. } => codes.len(),
        }
    }

    /// The f32 absmax of block `b`, exactly as bitsandbytes reconstructs it: for double quantization
    /// `code[c] * nested_absmax[b / 256]` rounded, then `+ offset` rounded (two roundings, no FMA).
    #[inline(always)]
    pub(crate) fn get(&self, b: usize) -> f32 {
        match *self {
            Scales::F32(a) => a[b],
            Scales::Double {
                codes,
                nested,
                offset,
                code,
                nested_shift,
            } => {
                let m = code[codes[b] as usize] * nested[b >> nested_shift];
                m + offset
            }
        }
    }

    /// The absmax of blocks `range`: borrowed, or decoded into `buf`.
    #[inline]
    fn slice<'b>(&self, range: std::ops::Range<usize>, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            Scales::F32(a) => &a[range],
            Scales::Double { .. } => {
                let out = &mut buf[..range.len()];
                for (o, b) in out.iter_mut().zip(range) {
                    *o = self.get(b);
                }
                out
            }
        }
    }
}

fn dequantize_typed<T: FastFloat>(
    packed: &[u8],
    absmax: Scales<'_>,
    lut: &[f32; 16],
    bs: usize,
    n: usize,
    isa: Isa,
) -> Vec<T> {
    let mut out: Vec<T> = zeroed_vec(n);
    // Fresh pages were just zeroed by the kernel and sit in cache: regular stores beat streaming here.
    dequantize_typed_into(packed, absmax, lut, bs, isa, false, &mut out);
    out
}

/// The fast path into an existing buffer of exactly `n` elements: no allocation and no fresh pages to
/// fault in (what a training step that re-dequantizes a weight each step wants).
fn dequantize_typed_into<T: FastFloat>(
    packed: &[u8],
    absmax: Scales<'_>,
    lut: &[f32; 16],
    bs: usize,
    isa: Isa,
    allow_stream: bool,
    out: &mut [T],
) {
    let stream = allow_stream && std::mem::size_of_val(out) >= STREAM_MIN_BYTES;
    let per_task = TASK / bs;
    out.par_chunks_mut(TASK)
        .zip(packed.par_chunks(TASK / 2))
        .enumerate()
        .for_each(|(t, (o, p))| {
            let mut buf = [0f32; TASK / 32];
            let first = t * per_task;
            let a = absmax.slice(first..first + o.len().div_ceil(bs), &mut buf);
            dequant_task_dispatch(p, a, lut, bs, isa, stream, o)
        });
}

/// One task of [`dequantize_typed_into`] on the best path this CPU has.
#[inline]
fn dequant_task_dispatch<T: FastFloat>(
    p: &[u8],
    a: &[f32],
    lut: &[f32; 16],
    bs: usize,
    isa: Isa,
    stream: bool,
    o: &mut [T],
) {
    match isa {
        // SAFETY: `isa.check()` confirmed the features on this CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => match bytemuck::try_cast_slice_mut::<T, bf16>(o) {
            // SAFETY: as above, plus the bf16 feature checked by `has_bf16`; blocksizes are
            // multiples of 32.
            Ok(ob) if T::DTYPE == DType::BF16 && avx512::has_bf16() => unsafe {
                if !(stream && avx512::dequant_task_bf16_stream(p, a, lut, bs, ob)) {
                    avx512::dequant_task_bf16(p, a, lut, bs, ob)
                }
            },
            // SAFETY: as above.
            _ => unsafe { avx512::dequant_task(p, a, lut, bs, o) },
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::dequant_task(p, a, lut, bs, o) },
        _ => dequant_task_portable(p, a, lut, bs, o),
    }
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
        } => super::double_quant_decode_blocks(
            codes.cpu_data::<u8>("absmax codes")?,
            nested_absmax.cpu_data::<f32>("nested_absmax")?,
            *offset,
            nested_code,
            *nested_blocksize,
        ),
    }
}

/// [`QuantizedTensor::dequantize_into`] on the CPU: `out` holds exactly the tensor's elements.
pub(super) fn dequantize_tensor_into(q: &QuantizedTensor, out: &mut Tensor) -> Result<()> {
    let st = &q.state;
    let absmax = Scales::of(st, "dequantize")?;
    let packed = q.data.cpu_data::<u8>("packed 4-bit data")?;
    let (n, qt, bs, isa) = (st.numel(), st.quant_type, st.blocksize, Isa::best());
    check_args::<f32>(bs)?;
    check_sizes(packed.len(), absmax.len(), bs, n)?;
    isa.check()?;
    macro_rules! go {
        ($t:ty) => {{
            let o = out.cpu_data_mut::<$t>("dequantize_into")?;
            dequantize_typed_into::<$t>(packed, absmax, qt.code(), bs, isa, true, o);
            Ok(())
        }};
    }
    match out.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => Err(Error::dtype("dequantize_into", "f32, f16 or bf16", other)),
    }
}

pub(super) fn dequantize_tensor(q: &QuantizedTensor, dtype: DType) -> Result<Tensor> {
    let st = &q.state;
    let absmax = Scales::of(st, "dequantize")?;
    let packed = q.data.cpu_data::<u8>("packed 4-bit data")?;
    let (n, qt, bs, isa) = (st.numel(), st.quant_type, st.blocksize, Isa::best());
    check_args::<f32>(bs)?;
    check_sizes(packed.len(), absmax.len(), bs, n)?;
    isa.check()?;
    macro_rules! go {
        ($t:ty) => {
            Tensor::from_vec(
                dequantize_typed::<$t>(packed, absmax, qt.code(), bs, n, isa),
                &st.shape,
                Device::Cpu,
            )
        };
    }
    match dtype {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => Err(Error::dtype("dequantize", "f32, f16 or bf16", other)),
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::avx512;
    use crate::quant::NF4_CODE;
    use crate::rng::Rng;
    use half::bf16;

    /// The streaming bf16 path writes exactly what the cached path writes, for every misalignment of
    /// the output (0..=31 values before a 64-byte boundary), every blocksize, lengths that are not a
    /// multiple of 32 (ragged head and tail, tasks shorter than one line), zero blocks, and it refuses
    /// (writing nothing) a task with a subnormal absmax.
    #[test]
    fn streaming_bf16_dequant_equals_the_cached_path() {
        if !(avx512::has_bf16() && super::Isa::Avx512.is_available()) {
            eprintln!("SKIPPED (no AVX-512 BF16 on this CPU)");
            return;
        }
        let mut rng = Rng::new(7);
        let poison = bf16::from_bits(0x7FC1);
        for bs in crate::quant::BLOCKSIZES {
            for n in [1, 31, 32, 33, 95, bs - 1, bs, 3 * bs + 17, 4 * bs] {
                let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.below(256) as u8).collect();
                let mut absmax: Vec<f32> = (0..n.div_ceil(bs))
                    .map(|_| rng.uniform_range(0.01, 40.0))
                    .collect();
                absmax[0] = 0.0;
                let mut want = vec![poison; n];
                // SAFETY: features checked above; one consistent task; bs is a multiple of 32.
                unsafe { avx512::dequant_task_bf16(&packed, &absmax, &NF4_CODE, bs, &mut want) };
                let mut buf = vec![poison; n + 64];
                for shift in 0..32 {
                    buf.fill(poison);
                    // Offset the slice so `shift` values precede its first 64-byte boundary.
                    let base = buf.as_ptr() as usize;
                    let at = (0..64).find(|&o| (base + 2 * o).is_multiple_of(64)).unwrap();
                    let start = (at + 32 - shift) % 32;
                    let out = &mut buf[start..start + n];
                    // SAFETY: as above.
                    assert!(unsafe {
                        avx512::dequant_task_bf16_stream(&packed, &absmax, &NF4_CODE, bs, out)
                    });
                    let got: Vec<u16> = out.iter().map(|v| v.to_bits()).collect();
                    let exp: Vec<u16> = want.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, exp, "bs {bs}, n {n}, shift {shift}");
                    assert!(
                        buf[..start]
                            .iter()
                            .chain(&buf[start + n..])
                            .all(|v| v.to_bits() == 0x7FC1)
                    );
                }
                let mut sub = absmax.clone();
                *sub.last_mut().unwrap() = 1e-39;
                let mut out = vec![poison; n];
                // SAFETY: as above.
                assert!(!unsafe { avx512::dequant_task_bf16_stream(&packed, &sub, &NF4_CODE, bs, &mut out) });
                assert!(out.iter().all(|v| v.to_bits() == 0x7FC1), "a refused task wrote");
            }
        }
    }
}
