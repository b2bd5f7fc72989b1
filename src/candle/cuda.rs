//! The CUDA side of the candle boundary (feature `candle-cuda`): a region of candle's device buffer to
//! our CUDA tensor and back, each one device-to-device copy (booked in
//! [`boundary_copies`](super::boundary_copies)). Our CUDA storage is an untyped `CudaSlice<u8>` on our
//! own stream and candle's a typed `CudaSlice<T>` on its stream, so neither can adopt the other's
//! buffer: the CUDA path is not copy-free.
//!
//! candle and this crate each hold their own cudarc context object and stream on the same device
//! (both retain the device's primary context, so device pointers are valid in both). The order between
//! the two streams is made explicit: candle's stream is synchronized before our stream reads its
//! buffer, and our stream is synchronized before a buffer we wrote is handed to candle.

use super::convert::{dtype_from_candle, from_candle_err, note_copy};
use crate::device::cuda::backend;
use crate::error::{Error, Result};
use crate::tensor::cuda::{CudaStorage, alloc};
use crate::tensor::{DType, Storage, Tensor};
use crate::{Device, Element};
use candle_core as cc;
use candle_core::backend::{BackendDevice, BackendStorage};
use cudarc::driver::DeviceRepr;
use half::{bf16, f16};
use std::ops::Range;

/// The ordinal of a candle CUDA device.
fn ordinal(d: &cc::CudaDevice) -> Result<usize> {
    match d.location() {
        cc::DeviceLocation::Cuda { gpu_id } => Ok(gpu_id),
        _ => Err(Error::device("candle", "not a CUDA device")),
    }
}

/// Elements `r` of candle's device storage `s` as our CUDA tensor of `shape` (one device copy).
pub(crate) fn cuda_region(s: &cc::CudaStorage, r: Range<usize>, shape: &[usize]) -> Result<Tensor> {
    let b = backend(ordinal(&s.device)?)?;
    let dtype = dtype_from_candle(s.dtype())?;
    // candle's pending writes to the source are complete before our stream reads it.
    s.device.cuda_stream().synchronize()?;
    let mut out = alloc(&b, dtype, r.len())?;
    note_copy(r.len() * dtype.size_in_bytes());
    fn copy<T: DeviceRepr + cc::cuda::CudaDType>(
        s: &cc::CudaStorage,
        r: Range<usize>,
        out: &mut CudaStorage,
    ) -> Result<()> {
        let src = s.as_cuda_slice::<T>().map_err(from_candle_err)?;
        if r.end > src.len() {
            return Err(Error::invalid("candle: storage region out of bounds"));
        }
        if r.is_empty() {
            return Ok(());
        }
        let stream = out.backend.stream.clone();
        let mut dst = out.view_mut::<T>()?;
        stream.memcpy_dtod(&src.slice(r), &mut dst)?;
        Ok(())
    }
    match dtype {
        DType::F32 => copy::<f32>(s, r, &mut out)?,
        DType::F16 => copy::<f16>(s, r, &mut out)?,
        DType::BF16 => copy::<bf16>(s, r, &mut out)?,
        d => return Err(Error::dtype("candle", "f32, f16 or bf16", d)),
    }
    Ok(Tensor::from_storage(Storage::Cuda(out), shape.to_vec(), dtype))
}

/// Our tensor as candle device storage on `dev` (one device copy; moved to `dev`'s ordinal first if it
/// lives elsewhere).
pub(crate) fn cuda_out(t: &Tensor, dev: &cc::CudaDevice) -> Result<cc::CudaStorage> {
    let t = t.to_device(Device::Cuda(ordinal(dev)?))?;
    let Storage::Cuda(cs) = t.storage() else {
        return Err(Error::device("candle", "expected a CUDA tensor"));
    };
    fn copy<T: DeviceRepr + Element + cc::cuda::CudaDType>(
        cs: &CudaStorage,
        n: usize,
        dev: &cc::CudaDevice,
    ) -> Result<cc::CudaStorage> {
        let cstream = dev.cuda_stream();
        // SAFETY: the n elements are overwritten by the copy below before candle can read them.
        let mut dst = unsafe { cstream.alloc::<T>(n.max(1)) }?;
        // The stream-ordered allocation is usable from our stream once candle's stream reached it.
        cstream.synchronize()?;
        if n > 0 {
            let src = cs.view::<T>()?;
            let mut dst_view = dst.slice_mut(0..n);
            cs.backend.stream.memcpy_dtod(&src.slice(0..n), &mut dst_view)?;
        }
        // Our kernels and the copy are complete before candle's stream uses the buffer.
        cs.backend.stream.synchronize()?;
        Ok(cc::CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
    let n = t.numel();
    note_copy(n * t.dtype().size_in_bytes());
    match t.dtype() {
        DType::F32 => copy::<f32>(cs, n, dev),
        DType::F16 => copy::<f16>(cs, n, dev),
        DType::BF16 => copy::<bf16>(cs, n, dev),
        d => Err(Error::dtype("candle", "f32, f16 or bf16", d)),
    }
}
