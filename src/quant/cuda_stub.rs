//! `cuda.rs` of a build without the `cuda` feature: the same functions, each saying CUDA is
//! unavailable (see `crate::device::on_device!`).

use super::{Absmax, QuantState, QuantizeOptions, QuantizedTensor};
use crate::device::cuda_unavailable;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

pub(super) fn quantize_tensor(_t: &Tensor, _opts: &QuantizeOptions) -> Result<(Tensor, Absmax)> {
    Err(cuda_unavailable())
}

pub(super) fn absmax_f32(_state: &QuantState) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(super) fn dequantize_tensor(_q: &QuantizedTensor, _dtype: DType) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(super) fn dequantize_tensor_into(_q: &QuantizedTensor, _out: &mut Tensor) -> Result<()> {
    Err(cuda_unavailable())
}
