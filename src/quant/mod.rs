//! 4-bit NF4/FP4 quantization, byte-for-byte compatible with bitsandbytes >= 0.50.
//!
//! Layout (see `../shared/reference/nf4-bitsandbytes.md`): the tensor is flattened row-major and cut
//! into blocks of `blocksize` consecutive elements; each block has an f32 absmax; element `2j` goes in
//! the high nibble of byte `j`. With double quantization the absmax vector is itself quantized to
//! 8-bit codes of the signed dynamic map over blocks of 256, after subtracting its mean (`offset`).

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

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

    /// The 16-entry code book indexed by the 4-bit code (FP4 in bit-pattern order).
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        }
    }

    /// The code of 0.0, used to pad odd lengths.
    pub fn zero_code(self) -> u8 {
        match self {
            QuantType::Nf4 => 7,
            QuantType::Fp4 => 0,
        }
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

/// Blocksizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Block size of the second (double) quantization level.
pub const NESTED_BLOCKSIZE: usize = 256;

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

/// How a tensor was quantized, everything needed to dequantize it.
#[derive(Clone, Debug)]
pub struct QuantState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// The code book as stored in the checkpoint (`quant_map`); equals `quant_type.code()` for files
    /// written by bitsandbytes.
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
}

/// A 4-bit quantized tensor: packed nibbles (`u8 [(n + 1) / 2]`) plus its [`QuantState`].
#[derive(Clone, Debug)]
pub struct QuantizedTensor {
    /// Packed codes, `u8 [(n + 1) / 2]`, high nibble first.
    pub data: Tensor,
    pub state: QuantState,
}

/// Options for [`QuantizedTensor::quantize`].
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub quant_type: QuantType,
    /// One of [`BLOCKSIZES`]; default 64.
    pub blocksize: usize,
    /// Double-quantize the absmax vector (bitsandbytes `compress_statistics`); default true.
    pub double_quant: bool,
    /// Allow NaN/inf inputs (quantized as bitsandbytes does); by default they are an error.
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
