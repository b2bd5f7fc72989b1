//! `cuda.rs` of a build without the `cuda` feature: the same functions, each saying CUDA is
//! unavailable (a CUDA tensor cannot exist in such a build, so only a device mix-up reaches them).

use super::{InverseIndex, Norm};
use crate::device::cuda_unavailable;
use crate::error::Result;
use crate::tensor::Tensor;

pub(crate) fn gather_rows(_x: &Tensor, _idx: &[u32], _h: usize) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn scatter_add_rows(_dy: &Tensor, _inv: &InverseIndex, _n: usize, _h: usize) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn mean_pool(
    _t: &Tensor,
    _mask: &[u8],
    _counts: &[f32],
    _seq: usize,
    _h: usize,
    _backward: bool,
) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn add_row(_x: &Tensor, _row: &Tensor) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn norm_forward(
    _x: &Tensor,
    _w: &Tensor,
    _bias: Option<&Tensor>,
    _eps: f32,
    _norm: Norm,
) -> Result<(Tensor, Tensor)> {
    Err(cuda_unavailable())
}

pub(crate) fn norm_backward(
    _x: &Tensor,
    _dy: &Tensor,
    _w: &Tensor,
    _stats: &Tensor,
    _norm: Norm,
) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn rope(_x: &Tensor, _positions: &[u32], _inv_freq: &[f32], _backward: bool) -> Result<Tensor> {
    Err(cuda_unavailable())
}
