//! Launches of `kernels/nn.cu`. Not written yet: every entry point returns
//! [`Error::CudaUnavailable`] so that CPU work can land first.

use super::InverseIndex;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn todo<T>(op: &str) -> Result<T> {
    Err(Error::CudaUnavailable(format!(
        "{op}: the CUDA kernel is not written yet"
    )))
}

pub(crate) fn gather_rows(_x: &Tensor, _idx: &[u32], _h: usize) -> Result<Tensor> {
    todo("gather_rows")
}

pub(crate) fn scatter_add_rows(_dy: &Tensor, _inv: &InverseIndex, _n: usize, _h: usize) -> Result<Tensor> {
    todo("gather_rows_backward")
}

pub(crate) fn mean_pool(
    _x: &Tensor,
    _mask: &[u8],
    _counts: &[f32],
    _seq: usize,
    _h: usize,
    _backward: bool,
) -> Result<Tensor> {
    todo("mean_pool")
}

pub(crate) fn add_row(_x: &Tensor, _row: &Tensor) -> Result<Tensor> {
    todo("add_row")
}

pub(crate) fn layer_norm(_x: &Tensor, _w: &Tensor, _b: &Tensor, _eps: f32) -> Result<(Tensor, Tensor)> {
    todo("layer_norm")
}

pub(crate) fn layer_norm_backward(_x: &Tensor, _dy: &Tensor, _w: &Tensor, _stats: &Tensor) -> Result<Tensor> {
    todo("layer_norm_backward")
}
