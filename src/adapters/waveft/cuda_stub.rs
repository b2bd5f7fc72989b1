//! `cuda.rs` of a build without the `cuda` feature: the same functions, each saying CUDA is
//! unavailable (a CUDA tensor cannot exist in such a build, so only a device mix-up reaches them).

use super::WaveFtPositions;
use super::structure::HostStructure;
use crate::device::{Device, cuda_unavailable};
use crate::error::Result;
use crate::tensor::Tensor;

/// No structure is ever on a GPU without the feature.
#[derive(Clone)]
pub(crate) enum DeviceStructure {}

impl DeviceStructure {
    pub(crate) fn upload(_h: &HostStructure, _device: Device) -> Result<DeviceStructure> {
        Err(cuda_unavailable())
    }
}

pub(crate) fn forward(
    _pos: &WaveFtPositions,
    _x: &Tensor,
    _spectrum: &Tensor,
    _scaling: f32,
    _tokens: usize,
    _shape: &[usize],
) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(crate) fn forward_add(
    _pos: &WaveFtPositions,
    _x: &Tensor,
    _spectrum: &Tensor,
    _scaling: f32,
    _y: &mut Tensor,
    _tokens: usize,
) -> Result<()> {
    Err(cuda_unavailable())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    _pos: &WaveFtPositions,
    _x: &Tensor,
    _dy: &Tensor,
    _spectrum: &Tensor,
    _scaling: f32,
    _dx: Option<&mut Tensor>,
    _accumulate: bool,
    _tokens: usize,
) -> Result<Tensor> {
    Err(cuda_unavailable())
}
