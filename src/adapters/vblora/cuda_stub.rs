//! `cuda.rs` of a build without the `cuda` feature: the same functions, each saying CUDA is
//! unavailable (a CUDA tensor cannot exist in such a build, so only a device mix-up reaches them).

use super::Layout;
use crate::device::cuda_unavailable;
use crate::error::Result;
use crate::tensor::Tensor;

pub(crate) fn compose(
    _bank: &Tensor,
    _logits: &Tensor,
    _k: usize,
    _layout: Layout,
    _shape: &[usize],
) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn compose_backward(
    _bank: &Tensor,
    _logits: &Tensor,
    _k: usize,
    _grad: &Tensor,
    _layout: Layout,
) -> Result<(Tensor, Tensor, bool)> {
    Err(cuda_unavailable())
}
