//! `cuda.rs` of a build without the `cuda` feature: the same functions, each saying CUDA is
//! unavailable (see `crate::device::on_device!`).

use super::KBitTensor;
use crate::device::cuda_unavailable;
use crate::error::Result;
use crate::quant::QuantizeOptions;
use crate::tensor::{DType, Tensor};

pub(crate) fn quantize(_t: &Tensor, _bits: u8, _opts: &QuantizeOptions) -> Result<(Tensor, Tensor)> {
    Err(cuda_unavailable())
}

pub(crate) fn dequantize(_k: &KBitTensor, _dtype: DType) -> Result<Tensor> {
    Err(cuda_unavailable())
}
