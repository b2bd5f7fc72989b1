//! The scalar reference: bitsandbytes' CUDA device functions (`csrc/kernels.cu`: `dQuantizeNF4`,
//! `dQuantizeFP4`, `dQuantize<0>`) transcribed line by line. The test oracle of every fast path.

use super::{MEAN_CHUNK, check_args, check_sizes, nibble};
use crate::error::Result;
use crate::quant::{FP4_THRESHOLDS, NESTED_BLOCKSIZE, NF4_THRESHOLDS, QuantType, dynamic_map};
use crate::tensor::Element;
use rayon::prelude::*;

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
pub(super) fn block_ref<T: Element>(x: &[T], out: &mut [u8], qt: QuantType) -> f32 {
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
