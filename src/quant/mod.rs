//! 4-bit NF4/FP4 quantization, byte-for-byte compatible with bitsandbytes >= 0.50.
//!
//! Layout (bitsandbytes `functional.py` `quantize_4bit`, `csrc/kernels.cu` `kQuantizeBlockwise`): the
//! tensor is flattened row-major and cut into blocks of `blocksize` consecutive elements; each block
//! has an f32 absmax; element `2j` goes in the high nibble of byte `j`. With double quantization the
//! absmax vector is itself quantized to 8-bit codes of the signed dynamic map over blocks of 256,
//! after subtracting its mean (`offset`).
//!
//! # Semantics (the CUDA kernels of bitsandbytes, reproduced exactly on every device)
//!
//! * `absmax[b] = max |x|` over the block in f32 (NaN ignored, like CUDA's `fmaxf`; a block of zeros
//!   has absmax 0); a last partial block has its own absmax over its real elements.
//! * Each element is scaled as `x * (1.0f / absmax)` (a reciprocal, then a multiply, in f32) and coded
//!   by strict `>` comparisons against CUDA's f32 thresholds (round to nearest; a value exactly on a
//!   threshold takes the lower code). NF4 thresholds are the f32 midpoints of the code book, 4 of them
//!   one ulp off ([`NF4_THRESHOLDS`]); FP4 codes sign and magnitude separately (`x < 0` sets bit 3)
//!   against CUDA's decimal thresholds ([`FP4_THRESHOLDS`]). NaN takes code 0. A block of zeros scales `0 * inf = NaN`, hence code 0
//!   (bitsandbytes CUDA stores `0x00`; its CPU backend clamps the absmax and stores `0x77`).
//! * Odd lengths are padded with one element of value 0, quantized like the others (the code of 0).
//! * Dequantization is `(T)(LUT[code] * absmax)`: an f32 product rounded once to the output dtype.
//! * Double quantization: `offset = mean(absmax)` (f64 sum in a fixed order, so every device gets
//!   the same bits), then blocks of 256 of `absmax - offset` quantized with bitsandbytes' 8-bit
//!   `dQuantize` (binary search plus midpoint test) against [`dynamic_map`], with an f32 nested absmax.
//!   Decoding is `(code[q] * nested_absmax) + offset`, two f32 roundings (never fused into an FMA).
//!
//! CPU (`cpu.rs`: a scalar reference and a rayon + SIMD fast path) and CUDA (`kernels/nf4.cu`) produce
//! identical bytes; `tests/nf4.rs` checks both against bitsandbytes' own output.

use crate::device::{Device, on_device};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

pub mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub(crate) mod cuda;
pub mod io;

/// The 4-bit code book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: 16 quantiles of N(0, 1), normalized to [-1, 1].
    Nf4,
    /// bitsandbytes FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2; not OCP E2M1).
    Fp4,
}

impl QuantType {
    /// `"nf4"` or `"fp4"`, as in bitsandbytes' quant-state JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16-entry code book indexed by the 4-bit code (FP4 in bit-pattern order), as the CUDA
    /// dequantization kernels use it (FP4 code `0b1000` decodes to `-0.0`).
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        }
    }

    /// The table bitsandbytes stores as `quant_map` (`get_4bit_type`): equal to [`QuantType::code`]
    /// except that FP4 entry 8 is `+0.0` (Python's `-0` is the integer 0).
    pub fn quant_map(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_QUANT_MAP,
        }
    }

    /// The code of 0.0, used to pad odd lengths.
    pub fn zero_code(self) -> u8 {
        match self {
            QuantType::Nf4 => 7,
            QuantType::Fp4 => 0,
        }
    }

    /// The largest gap between neighbouring code values (sorted), for error bounds: a value inside
    /// `[-absmax, absmax]` dequantizes within `max_gap / 2 * absmax` of itself.
    pub fn max_gap(self) -> f32 {
        let mut v: Vec<f32> = self.code().to_vec();
        v.sort_by(f32::total_cmp);
        v.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max)
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QuantType {
    type Err = Error;
    fn from_str(s: &str) -> Result<QuantType> {
        match s.to_ascii_lowercase().as_str() {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            _ => Err(Error::invalid(format!(
                "unknown quant type {s:?} (expected nf4 or fp4)"
            ))),
        }
    }
}

/// NF4 code book (bitsandbytes `get_4bit_type("nf4")`), ascending. The literals are bitsandbytes'
/// own text; each rounds to exactly the f32 that bitsandbytes stores.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// FP4 code book in bit-pattern order (bit 3 = sign): `[0, 0.0625, 8, 12, 4, 6, 2, 3] / 12`, then negated.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// [`FP4_CODE`] as bitsandbytes stores it in `quant_map`: entry 8 is `+0.0`.
pub const FP4_QUANT_MAP: [f32; 16] = {
    let mut c = FP4_CODE;
    c[8] = 0.0;
    c
};

/// NF4 decision thresholds of bitsandbytes' CUDA `dQuantizeNF4`: the code of `x` is the number of
/// thresholds strictly below `x`.
///
/// bitsandbytes' source writes the f64 midpoints of the code book with 16-17 digits and an `f` suffix;
/// nvcc (like rustc for these literals) rounds each decimal directly to f32. For 11 boundaries that is
/// the f32 midpoint `(c[k] + c[k+1]) / 2`; for 4 of them (0|1, 8|9, 12|13, 14|15) it is one ulp away,
/// because the f64 midpoint is an exact f32 tie that the f32 sum rounds to even while the shortest
/// decimal lies on the other side (checked against the immediates in nvcc's PTX). So a scaled value
/// exactly equal to one of those 4 f32 midpoints gets a different code on bitsandbytes' CUDA kernels
/// (and here) than in its CPU backend, which bucketizes on the f32 midpoints.
#[allow(clippy::excessive_precision)]
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// FP4 magnitude thresholds of bitsandbytes' CUDA `dQuantizeFP4`, as written there (decimal
/// approximations of the midpoints 1/384, 11/128, 5/24, 7/24, 5/12, 7/12, 5/6; several differ from
/// the exact f32 midpoints by 1 to 6 ulp, which is where bitsandbytes' CPU backend disagrees with its
/// CUDA kernels). The magnitude rank of `|x|` is the number of thresholds strictly below it.
#[allow(clippy::excessive_precision)]
pub const FP4_THRESHOLDS: [f32; 7] = [
    0.002_604_17,
    0.085_937_5,
    0.208_333_33,
    0.291_666_67,
    0.416_666_7,
    0.583_333,
    0.833_333_3,
];

/// FP4 3-bit patterns by magnitude rank (0, 0.0052, 1/6, 1/4, 1/3, 1/2, 2/3, 1): `rank ^ ((rank & 2) << 1)`.
pub const FP4_MAGNITUDE_BITS: [u8; 8] = [0, 1, 6, 7, 4, 5, 2, 3];

/// Blocksizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Block size of the second (double) quantization level.
pub const NESTED_BLOCKSIZE: usize = 256;

/// bitsandbytes' `create_dynamic_map(signed=True)` in f32, the code of the nested 8-bit absmax.
///
/// bitsandbytes builds it with `torch.linspace`, whose vectorized CPU kernel rounds differently from
/// the textbook `start + i * step` in the last bit of 12 entries, so the table is stored rather than
/// recomputed. `tests/nf4.rs` checks it bit for bit against the `nested_quant_map` of real checkpoints.
#[allow(clippy::excessive_precision)]
#[rustfmt::skip]
static DYNAMIC_MAP: [f32; 256] = [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375, -0.107031256,
    -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125, -0.059218753, -0.05640625,
    -0.05359375, -0.05078125, -0.04796875, -0.04515625, -0.042343747, -0.03953125, -0.036718752, -0.03390625,
    -0.03109375, -0.028281251, -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125,
    -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06, -5.5000004e-07, 0.0,
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125,
    0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,
    0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625,
    0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125,
    0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125,
    0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,
    0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125,
    0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1.0,
];

/// The signed 8-bit dynamic map of the nested absmax (`create_dynamic_map(signed=True)`, f32).
pub fn dynamic_map() -> &'static [f32; 256] {
    &DYNAMIC_MAP
}

/// Decodes a double-quantized absmax on the CPU (nested blocks of 256, as bitsandbytes always writes):
/// `absmax[i] = (nested_code[codes[i]] * nested_absmax[i / 256]) + offset`, rounding after the product
/// and after the sum (as bitsandbytes: `dequantize_blockwise(...)`, then `+= offset`).
pub fn double_quant_decode(
    codes: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    nested_code: &[f32],
) -> Result<Vec<f32>> {
    double_quant_decode_blocks(codes, nested_absmax, offset, nested_code, NESTED_BLOCKSIZE)
}

/// [`double_quant_decode`] with another nested blocksize.
pub fn double_quant_decode_blocks(
    codes: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    nested_code: &[f32],
    nested_blocksize: usize,
) -> Result<Vec<f32>> {
    if nested_code.len() != 256 {
        return Err(Error::shape(
            "double_quant_decode",
            format!("nested code must have 256 entries, got {}", nested_code.len()),
        ));
    }
    if nested_blocksize == 0 || nested_absmax.len() != codes.len().div_ceil(nested_blocksize) {
        return Err(Error::shape(
            "double_quant_decode",
            format!(
                "{} codes in blocks of {nested_blocksize} need {} nested absmax values, got {}",
                codes.len(),
                codes.len().div_ceil(nested_blocksize.max(1)),
                nested_absmax.len()
            ),
        ));
    }
    Ok(cpu::double_quant_decode(
        codes,
        nested_absmax,
        offset,
        nested_code,
        nested_blocksize,
    ))
}

/// The per-block scales: plain f32, or double-quantized.
#[derive(Clone, Debug)]
pub enum Absmax {
    /// `f32 [nblocks]`.
    F32(Tensor),
    /// Double quantization: `absmax[i] = nested_code[codes[i]] * nested_absmax[i / 256] + offset`.
    Double {
        /// `u8 [nblocks]`, indices into `nested_code`.
        codes: Tensor,
        /// `f32 [ceil(nblocks / 256)]`.
        nested_absmax: Tensor,
        /// The mean of the original absmax vector.
        offset: f32,
        /// The signed 8-bit dynamic map (`f32 [256]`), as stored in the checkpoint.
        nested_code: Vec<f32>,
        /// Always 256 for bitsandbytes checkpoints.
        nested_blocksize: usize,
    },
}

/// [`Absmax`] borrowed, the double-quantization fields in one struct: what the decoders, the kernel
/// arguments and the validation read.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AbsmaxRef<'a> {
    F32(&'a Tensor),
    Double(NestedRef<'a>),
}

/// The fields of [`Absmax::Double`], borrowed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NestedRef<'a> {
    pub(crate) codes: &'a Tensor,
    pub(crate) nested_absmax: &'a Tensor,
    pub(crate) offset: f32,
    pub(crate) nested_code: &'a [f32],
    pub(crate) nested_blocksize: usize,
}

impl Absmax {
    /// Device of the stored tensors.
    pub fn device(&self) -> Device {
        match self {
            Absmax::F32(t) => t.device(),
            Absmax::Double { codes, .. } => codes.device(),
        }
    }

    /// The scales borrowed (see [`AbsmaxRef`]).
    pub(crate) fn view(&self) -> AbsmaxRef<'_> {
        match self {
            Absmax::F32(t) => AbsmaxRef::F32(t),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
                nested_code,
                nested_blocksize,
            } => AbsmaxRef::Double(NestedRef {
                codes,
                nested_absmax,
                offset: *offset,
                nested_code,
                nested_blocksize: *nested_blocksize,
            }),
        }
    }

    /// Double-quantized scales from the host outputs of [`cpu::double_quant`] (`codes`, nested absmax,
    /// offset), with the crate's nested code book and blocksize, stored on `device`.
    pub(crate) fn double_from_host(
        codes: Vec<u8>,
        nested: Vec<f32>,
        offset: f32,
        device: Device,
    ) -> Result<Absmax> {
        let (nc, nn) = (codes.len(), nested.len());
        Ok(Absmax::Double {
            codes: Tensor::from_vec(codes, &[nc], Device::Cpu)?.to_device(device)?,
            nested_absmax: Tensor::from_vec(nested, &[nn], Device::Cpu)?.to_device(device)?,
            offset,
            nested_code: dynamic_map().to_vec(),
            nested_blocksize: NESTED_BLOCKSIZE,
        })
    }

    /// The f32 absmax on the host (double quantization decoded), read from any device.
    pub(crate) fn to_host_f32(&self) -> Result<Vec<f32>> {
        match self.view() {
            AbsmaxRef::F32(t) => t.to_vec::<f32>(),
            AbsmaxRef::Double(d) => double_quant_decode_blocks(
                &d.codes.to_vec::<u8>()?,
                &d.nested_absmax.to_vec::<f32>()?,
                d.offset,
                d.nested_code,
                d.nested_blocksize,
            ),
        }
    }

    /// The same scales with each stored tensor replaced by `f(tensor)`.
    pub(crate) fn try_map(&self, f: &mut impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Absmax> {
        Ok(match self.view() {
            AbsmaxRef::F32(t) => Absmax::F32(f(t)?),
            AbsmaxRef::Double(d) => Absmax::Double {
                codes: f(d.codes)?,
                nested_absmax: f(d.nested_absmax)?,
                offset: d.offset,
                nested_code: d.nested_code.to_vec(),
                nested_blocksize: d.nested_blocksize,
            },
        })
    }

    /// Bytes of the stored scales (codes, nested absmax and the f32 offset; the shared code books
    /// are not counted).
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Absmax::F32(t) => t.size_in_bytes(),
            Absmax::Double {
                codes, nested_absmax, ..
            } => codes.size_in_bytes() + nested_absmax.size_in_bytes() + 4,
        }
    }
}

/// How a tensor was quantized, everything needed to dequantize it.
#[derive(Clone, Debug)]
pub struct QuantState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// The code book as stored in the checkpoint (`quant_map`); numerically equal to
    /// `quant_type.code()` (validated by [`QuantizedTensor::from_parts`]).
    pub code: [f32; 16],
    /// Dtype of the original tensor (and the default dequantization dtype).
    pub dtype: DType,
    /// Shape of the original tensor.
    pub shape: Vec<usize>,
    pub absmax: Absmax,
}

impl QuantState {
    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of quantization blocks.
    pub fn nblocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// True with double quantization.
    pub fn is_double(&self) -> bool {
        matches!(self.absmax, Absmax::Double { .. })
    }

    /// Checks every invariant: blocksize, dtype, code book, absmax sizes, dtypes and devices.
    pub fn validate(&self) -> Result<()> {
        let op = "QuantState";
        if !BLOCKSIZES.contains(&self.blocksize) {
            return Err(Error::invalid(format!(
                "blocksize {} is not one of {BLOCKSIZES:?}",
                self.blocksize
            )));
        }
        if !self.dtype.is_float() {
            return Err(Error::dtype(op, "a float dtype (f32, f16, bf16)", self.dtype));
        }
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::shape(op, format!("shape {:?} overflows", self.shape)))?;
        if n == 0 {
            return Err(Error::shape(
                op,
                format!("shape {:?} has no elements", self.shape),
            ));
        }
        // Keeps every byte and element index inside i64 for the CUDA kernels.
        if n > (i64::MAX as usize) / 8 {
            return Err(Error::shape(op, format!("shape {:?} is too large", self.shape)));
        }
        let canon = self.quant_type.code();
        if let Some(i) = (0..16).find(|&i| self.code[i] != canon[i]) {
            return Err(Error::invalid(format!(
                "quant_map entry {i} is {} but the {} code book has {}",
                self.code[i], self.quant_type, canon[i]
            )));
        }
        let nb = self.nblocks();
        // One absmax value (or nested code) per block.
        let per_block = |t: &Tensor, what: &str| {
            if t.numel() == nb {
                return Ok(());
            }
            Err(Error::shape(
                "absmax",
                format!(
                    "{n} elements in blocks of {} need {nb} {what}, got shape {:?}",
                    self.blocksize,
                    t.shape()
                ),
            ))
        };
        match &self.absmax {
            Absmax::F32(t) => {
                t.expect_dtype(DType::F32, "absmax")?;
                per_block(t, "absmax values")?;
            }
            Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                nested_blocksize,
                ..
            } => {
                codes.expect_dtype(DType::U8, "absmax (nested codes)")?;
                nested_absmax.expect_dtype(DType::F32, "nested_absmax")?;
                per_block(codes, "nested absmax codes")?;
                let nbs = *nested_blocksize;
                if !nbs.is_power_of_two() || !(64..=4096).contains(&nbs) {
                    return Err(Error::invalid(format!(
                        "nested blocksize {nbs} is not a power of two in 64..=4096"
                    )));
                }
                if nested_absmax.numel() != nb.div_ceil(nbs) {
                    return Err(Error::shape(
                        "nested_absmax",
                        format!(
                            "{nb} codes in blocks of {nbs} need {} nested absmax values, got shape {:?}",
                            nb.div_ceil(nbs),
                            nested_absmax.shape()
                        ),
                    ));
                }
                if nested_code.len() != 256 {
                    return Err(Error::shape(
                        "nested_quant_map",
                        format!("expected 256 entries, got {}", nested_code.len()),
                    ));
                }
                if codes.device() != nested_absmax.device() {
                    return Err(Error::device(
                        op,
                        format!(
                            "codes on {} but nested absmax on {}",
                            codes.device(),
                            nested_absmax.device()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A 4-bit quantized tensor: packed nibbles (`u8 [(n + 1) / 2]`) plus its [`QuantState`].
///
/// ```
/// use peft_kernels::{DType, Device, Tensor};
/// use peft_kernels::quant::{QuantizedTensor, QuantizeOptions};
/// let w = Tensor::randn(&[64, 128], 0.02, 0, DType::BF16, Device::Cpu)?;
/// let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default())?; // NF4, blocksize 64, double quant
/// assert!(q.bits_per_weight() < 4.14); // 4 bits + 8-bit absmax per 64 + nested scales
/// let back = q.dequantize(DType::BF16)?;
/// assert_eq!(back.shape(), &[64, 128]);
/// # Ok::<(), peft_kernels::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct QuantizedTensor {
    /// Packed codes, `u8 [(n + 1) / 2]`, high nibble first.
    pub data: Tensor,
    pub state: QuantState,
}

impl QuantizedTensor {
    /// Quantizes `t` (f32, f16 or bf16, any shape with at least one element) on its device.
    ///
    /// Non-finite values are an [`Error::NonFinite`] naming `opts.name` and the first bad flat index,
    /// unless `opts.allow_non_finite`.
    pub fn quantize(t: &Tensor, opts: &QuantizeOptions) -> Result<QuantizedTensor> {
        opts.validate()?;
        t.dtype().expect_float("quantize")?;
        let n = t.numel();
        if n == 0 {
            return Err(Error::shape(
                "quantize",
                format!("tensor '{}' has no elements (shape {:?})", opts.name, t.shape()),
            ));
        }
        if n > (i64::MAX as usize) / 8 {
            return Err(Error::shape(
                "quantize",
                format!("tensor '{}' is too large", opts.name),
            ));
        }
        let (data, absmax) = on_device!(t.device(), quantize_tensor(t, opts))?;
        let state = QuantState {
            quant_type: opts.quant_type,
            blocksize: opts.blocksize,
            code: *opts.quant_type.quant_map(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            absmax,
        };
        Ok(QuantizedTensor { data, state })
    }

    /// Builds a quantized tensor from its parts, checking that they are consistent: `data` holds
    /// `(n + 1) / 2` bytes (`u8`, any shape, e.g. bitsandbytes' `[(n + 1) / 2, 1]`; it is flattened),
    /// every tensor is on one device, and [`QuantState::validate`] passes.
    pub fn from_parts(data: Tensor, state: QuantState) -> Result<QuantizedTensor> {
        state.validate()?;
        data.expect_dtype(DType::U8, "packed 4-bit data")?;
        let want = state.numel().div_ceil(2);
        if data.numel() != want {
            return Err(Error::shape(
                "packed 4-bit data",
                format!(
                    "shape {:?} with {} elements needs {want} bytes, got shape {:?}",
                    state.shape,
                    state.numel(),
                    data.shape()
                ),
            ));
        }
        if data.device() != state.absmax.device() {
            return Err(Error::device(
                "QuantizedTensor::from_parts",
                format!(
                    "data on {} but absmax on {}",
                    data.device(),
                    state.absmax.device()
                ),
            ));
        }
        let data = data.reshape(&[want])?;
        Ok(QuantizedTensor { data, state })
    }

    /// Dequantizes to `dtype` (f32, f16 or bf16) with the original shape, on this tensor's device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        dtype.expect_float("dequantize")?;
        on_device!(self.device(), dequantize_tensor(self, dtype))
    }

    /// Dequantizes into an existing tensor (its dtype, f32/f16/bf16, is the output dtype; its shape must
    /// have the original number of elements; same device). No allocation: for loops that re-dequantize
    /// the same weight every step into one scratch buffer. Bit-identical to [`QuantizedTensor::dequantize`].
    pub fn dequantize_into(&self, out: &mut Tensor) -> Result<()> {
        out.dtype().expect_float("dequantize_into")?;
        if out.numel() != self.numel() {
            return Err(Error::shape(
                "dequantize_into",
                format!(
                    "output {:?} does not hold the {} elements of {:?}",
                    out.shape(),
                    self.numel(),
                    self.shape()
                ),
            ));
        }
        if out.device() != self.device() {
            return Err(Error::device(
                "dequantize_into",
                format!(
                    "quantized tensor on {}, output on {}",
                    self.device(),
                    out.device()
                ),
            ));
        }
        on_device!(self.device(), dequantize_tensor_into(self, out))
    }

    /// The per-block absmax as `f32 [nblocks]` on this tensor's device (double quantization decoded).
    pub fn absmax_f32(&self) -> Result<Tensor> {
        match &self.state.absmax {
            Absmax::F32(t) => Ok(t.clone()),
            Absmax::Double { .. } => match self.device() {
                Device::Cpu => {
                    let v = cpu::absmax_f32(&self.state)?;
                    Tensor::from_vec(v, &[self.state.nblocks()], Device::Cpu)
                }
                Device::Cuda(_) => cuda::absmax_f32(&self.state),
            },
        }
    }

    /// Where the packed data lives.
    pub fn device(&self) -> Device {
        self.data.device()
    }

    /// The original shape.
    pub fn shape(&self) -> &[usize] {
        &self.state.shape
    }

    /// The original number of elements.
    pub fn numel(&self) -> usize {
        self.state.numel()
    }

    /// The original dtype (the default dequantization dtype).
    pub fn dtype(&self) -> DType {
        self.state.dtype
    }

    /// The code book.
    pub fn quant_type(&self) -> QuantType {
        self.state.quant_type
    }

    /// Elements per absmax block.
    pub fn blocksize(&self) -> usize {
        self.state.blocksize
    }

    /// The quant state.
    pub fn state(&self) -> &QuantState {
        &self.state
    }

    /// The packed nibbles, `u8 [(n + 1) / 2]`.
    pub fn data(&self) -> &Tensor {
        &self.data
    }

    /// Copies to `device`.
    pub fn to_device(&self, device: Device) -> Result<QuantizedTensor> {
        self.try_map_tensors(|t| t.to_device(device))
    }

    /// The same quantized tensor with each stored tensor (the packed data, then the absmax or its
    /// codes and nested absmax) replaced by `f(tensor)`: device copies, deep copies.
    pub fn try_map_tensors(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<QuantizedTensor> {
        Ok(QuantizedTensor {
            data: f(&self.data)?,
            state: QuantState {
                absmax: self.state.absmax.try_map(&mut f)?,
                ..self.state.clone()
            },
        })
    }

    /// Bytes of packed data plus scales (absmax, or codes + nested absmax + offset).
    pub fn size_in_bytes(&self) -> usize {
        self.data.size_in_bytes() + self.state.absmax.size_in_bytes()
    }

    /// `size_in_bytes * 8 / numel`: 4.5 for blocksize 64, 4.127 with double quantization.
    pub fn bits_per_weight(&self) -> f64 {
        self.size_in_bytes() as f64 * 8.0 / self.numel().max(1) as f64
    }
}

/// Options for [`QuantizedTensor::quantize`].
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub quant_type: QuantType,
    /// One of [`BLOCKSIZES`]; default 64.
    pub blocksize: usize,
    /// Double-quantize the absmax vector (bitsandbytes `compress_statistics`); default true.
    pub double_quant: bool,
    /// Allow NaN/inf inputs (quantized as the CUDA kernels of bitsandbytes do: NaN gets code 0 and is
    /// ignored by the absmax; an infinity makes its block's absmax infinite); by default they are an error.
    pub allow_non_finite: bool,
    /// Name used in error messages.
    pub name: String,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
            allow_non_finite: false,
            name: "tensor".into(),
        }
    }
}

impl QuantizeOptions {
    /// Checks the blocksize.
    pub fn validate(&self) -> Result<()> {
        if !BLOCKSIZES.contains(&self.blocksize) {
            return Err(Error::invalid(format!(
                "blocksize {} is not one of {BLOCKSIZES:?}",
                self.blocksize
            )));
        }
        Ok(())
    }
}
