//! `cuda.rs` of a build without the `cuda` feature: the same functions, each saying CUDA is
//! unavailable, so `ops.rs` dispatches without `cfg` arms.

use super::ops::Activation;
use crate::device::cuda_unavailable;
use crate::error::Result;
use crate::tensor::Tensor;

pub(crate) fn activation(_x: &Tensor, _act: Activation) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn activation_backward(_x: &Tensor, _dy: &Tensor, _act: Activation) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn mse_loss(_p: &Tensor, _t: &Tensor) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn mse_loss_backward(_p: &Tensor, _t: &Tensor, _g: &Tensor) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn cross_entropy(
    _logits: &Tensor,
    _targets: &Tensor,
    _n: usize,
    _c: usize,
    _inv_count: f32,
) -> Result<(Tensor, Tensor)> {
    Err(cuda_unavailable())
}

pub(crate) fn cross_entropy_backward(
    _logits: &Tensor,
    _targets: &Tensor,
    _stats: &Tensor,
    _g: &Tensor,
    _nc: (usize, usize),
    _inv_count: f32,
) -> Result<Tensor> {
    Err(cuda_unavailable())
}

/// Σ g² over no tensors is 0 in every build; any tensor needs CUDA.
pub(crate) fn sum_squares(gs: &[&Tensor]) -> Result<f64> {
    if gs.is_empty() {
        Ok(0.0)
    } else {
        Err(cuda_unavailable())
    }
}
