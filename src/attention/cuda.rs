//! CUDA attention (interim): runs the CPU path on host copies. The fused kernels replace this.

use super::AttentionConfig;
use crate::device::Device;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

fn host(t: &Tensor) -> Result<Tensor> {
    t.to_device(Device::Cpu)
}

pub(crate) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
    dtype: DType,
    ordinal: usize,
) -> Result<(Tensor, Tensor)> {
    let (o, l) = super::cpu::forward(&host(q)?, &host(k)?, &host(v)?, key_mask, cfg, dtype)?;
    Ok((
        o.to_device(Device::Cuda(ordinal))?,
        l.to_device(Device::Cuda(ordinal))?,
    ))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    output: &Tensor,
    lse: &Tensor,
    grad_out: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
    dtype: DType,
    ordinal: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dq, dk, dv) = super::cpu::backward(
        &host(q)?,
        &host(k)?,
        &host(v)?,
        &host(output)?,
        &host(lse)?,
        &host(grad_out)?,
        key_mask,
        cfg,
        dtype,
    )?;
    let d = Device::Cuda(ordinal);
    Ok((dq.to_device(d)?, dk.to_device(d)?, dv.to_device(d)?))
}
