//! `cuda.rs` of a build without the `cuda` feature: tensors cannot be created on a CUDA device. (The
//! `Storage::Cuda` variant itself exists only with the feature, so no other entry point is reachable.)

use super::{DType, Tensor};
use crate::device::cuda_unavailable;
use crate::error::Result;

pub(crate) fn zeros(_ordinal: usize, _shape: &[usize], _dtype: DType) -> Result<Tensor> {
    Err(cuda_unavailable())
}
