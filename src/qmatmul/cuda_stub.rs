//! `cuda.rs` of a build without the `cuda` feature: the same functions, each saying CUDA is
//! unavailable (see `crate::device::on_device!`).

use super::Problem;
use crate::device::cuda_unavailable;
use crate::error::Result;
use crate::quant::QuantizedTensor;
use crate::tensor::{DType, Tensor};

pub(crate) fn dequantize(_q: &QuantizedTensor, _dtype: DType) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn forward(_p: &Problem<'_>) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn backward_input(_p: &Problem<'_>) -> Result<Tensor> {
    Err(cuda_unavailable())
}
