//! `--offload-optimizer` on CUDA (in the spirit of DeepSpeed's ZeRO-Offload CPU Adam): the moments and
//! an f32 master copy of each CUDA parameter live on the host and the multithreaded CPU kernels update
//! them. Per step:
//!
//! 1. [`Offload::download`]: a side stream waits for the work queued so far (the backward pass), then
//!    copies every gradient into its own pinned host buffer, all queued at once; each buffer's event
//!    marks its copy.
//! 2. Per tensor, [`Offload::gradient`] waits for that one copy only, the CPU updates the master, and
//!    [`Offload::upload`] rounds it to the parameter's dtype into a pinned buffer and queues its copy
//!    to the device on the side stream, so the copies of later gradients and earlier parameters overlap
//!    the CPU work.
//! 3. [`Offload::finish`]: the device's main stream waits for the side stream, so the next forward
//!    pass reads the new parameters.
//!
//! Pinned buffers are kept per parameter and reused; a buffer is rewritten only after its previous copy
//! is done (cudarc's `PinnedHostSlice` waits on its event).

use crate::autograd::ParamId;
use crate::device::Device;
use crate::device::cuda::backend;
use crate::error::{Error, Result};
use crate::tensor::cuda::storage;
use crate::tensor::{DType, Storage, Tensor};
use cudarc::driver::{CudaStream, PinnedHostSlice};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Side streams and pinned buffers of the host-offloaded optimizer.
#[derive(Default)]
pub(crate) struct Offload {
    streams: BTreeMap<usize, Arc<CudaStream>>,
    grads: BTreeMap<ParamId, PinnedHostSlice<f32>>,
    params: BTreeMap<ParamId, PinnedHostSlice<u8>>,
    /// Devices with side-stream work queued in this step.
    busy: Vec<usize>,
}

impl Offload {
    fn stream(&mut self, ordinal: usize) -> Result<Arc<CudaStream>> {
        if let Some(s) = self.streams.get(&ordinal) {
            return Ok(s.clone());
        }
        let s = backend(ordinal)?.ctx.new_stream()?;
        self.streams.insert(ordinal, s.clone());
        Ok(s)
    }

    /// Queues the device-to-host copy of every `(id, gradient)` (CUDA gradients) on its device's side
    /// stream, after everything already queued on the main stream.
    pub(crate) fn download(&mut self, grads: &[(ParamId, &Tensor)]) -> Result<()> {
        for &(id, g) in grads {
            let Device::Cuda(ordinal) = g.device() else {
                continue;
            };
            let side = self.stream(ordinal)?;
            if !self.busy.contains(&ordinal) {
                side.join(&backend(ordinal)?.stream)?;
                self.busy.push(ordinal);
            }
            let n = g.numel();
            if self.grads.get(&id).is_none_or(|b| b.len() != n) {
                // SAFETY: the buffer is written by the copy below before it is read.
                let buf = unsafe { backend(ordinal)?.ctx.alloc_pinned_with_flags::<f32>(n.max(1), 0) }?;
                self.grads.insert(id, buf);
            }
            let buf = self
                .grads
                .get_mut(&id)
                .ok_or_else(|| Error::invalid("offload: missing gradient buffer"))?;
            let gv = storage(g, "offloaded gradient")?.view::<f32>()?;
            side.memcpy_dtoh(&gv, buf)?;
        }
        Ok(())
    }

    /// The host copy of `id`'s `n`-element gradient, once its copy has landed.
    pub(crate) fn gradient(&self, id: ParamId, n: usize) -> Result<&[f32]> {
        let buf = self
            .grads
            .get(&id)
            .ok_or_else(|| Error::invalid("offload: gradient was not downloaded"))?;
        buf.as_slice()?
            .get(..n)
            .ok_or_else(|| Error::invalid("offload: gradient buffer of another size"))
    }

    /// Rounds the updated master `master` to `p`'s dtype and queues its copy into `p` on the side
    /// stream.
    pub(crate) fn upload(&mut self, id: ParamId, master: &[f32], p: &mut Tensor) -> Result<()> {
        let Device::Cuda(ordinal) = p.device() else {
            return Err(Error::device("offload", "the parameter is not on a CUDA device"));
        };
        let (n, dt) = (p.numel(), p.dtype());
        if master.len() != n {
            return Err(Error::invalid(
                "offload: master copy and parameter differ in size",
            ));
        }
        let side = self.stream(ordinal)?;
        let bytes = n * dt.size_in_bytes();
        if self.params.get(&id).is_none_or(|b| b.len() != bytes.max(1)) {
            // SAFETY: every byte is written below before the copy reads it. Write-combined: the host
            // only writes this buffer, sequentially.
            let buf = unsafe {
                backend(ordinal)?.ctx.alloc_pinned_with_flags::<u8>(
                    bytes.max(1),
                    cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED,
                )
            }?;
            self.params.insert(id, buf);
        }
        let buf = self
            .params
            .get_mut(&id)
            .ok_or_else(|| Error::invalid("offload: missing parameter buffer"))?;
        let dst = &mut buf.as_mut_slice()?[..bytes];
        match dt {
            DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(master)),
            DType::F16 => dst
                .chunks_exact_mut(2)
                .zip(master)
                .for_each(|(d, &x)| d.copy_from_slice(&f16::from_f32(x).to_le_bytes())),
            DType::BF16 => dst
                .chunks_exact_mut(2)
                .zip(master)
                .for_each(|(d, &x)| d.copy_from_slice(&bf16::from_f32(x).to_le_bytes())),
            other => return Err(Error::dtype("offload", "a float parameter", other)),
        }
        let Storage::Cuda(ps) = p.storage_mut()? else {
            return Err(Error::device("offload", "the parameter is not on a CUDA device"));
        };
        if bytes > 0 {
            let mut dv = ps
                .data
                .try_slice_mut(..bytes)
                .ok_or_else(|| Error::invalid("offload: parameter storage too small"))?;
            // The buffer holds exactly `bytes` bytes (allocated for this size above).
            side.memcpy_htod(&*buf, &mut dv)?;
        }
        Ok(())
    }

    /// Makes each device's main stream wait for its side-stream copies.
    pub(crate) fn finish(&mut self) -> Result<()> {
        for o in std::mem::take(&mut self.busy) {
            let side = self.stream(o)?;
            backend(o)?.stream.join(&side)?;
        }
        Ok(())
    }
}
