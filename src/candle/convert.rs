//! Tensors across the candle boundary: candle storage (a contiguous region of it) to our [`Tensor`] and
//! back, on the CPU and (feature `candle-cuda`) on CUDA, plus the dtype and error mappings.
//!
//! Our results go to candle without a copy where possible: a host tensor that is the only owner of its
//! buffer hands the `Vec` itself to candle's `CpuStorage` ([`cpu_out`]). Everything else here copies
//! (candle's storage to our tensor, a shared or device result to candle) and books the copy in a
//! per-thread counter, [`boundary_copies`], so tests can check that a path copies nothing. The
//! zero-copy LoRA path (`lora.rs`) reads candle's buffers in place and never comes here.

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use candle_core as cc;
use candle_core::backend::BackendStorage;
use std::cell::Cell;

/// Copies made at the candle boundary on one thread (see [`boundary_copies`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoundaryCopies {
    /// Buffers copied (candle to ours, ours to candle, strided inputs made contiguous, parameters
    /// packed or gradients concatenated by the boundary, dtype conversions).
    pub copies: u64,
    /// Bytes copied.
    pub bytes: u64,
}

thread_local! {
    static COPIES: Cell<BoundaryCopies> = const { Cell::new(BoundaryCopies { copies: 0, bytes: 0 }) };
}

/// The copies the candle boundary has made on the calling thread so far (a running total; compare two
/// readings). candle runs a custom op's forward and backward on the thread that calls `forward` /
/// `backward`, so the difference of two readings around a step counts exactly that step's copies. The
/// contiguous f32 LoRA/QLoRA path makes none; see `docs/candle.md`.
pub fn boundary_copies() -> BoundaryCopies {
    let ours = COPIES.with(Cell::get);
    // Borrowed candle buffers our layers had to copy (to mutate or own them) count too.
    let (copies, bytes) = crate::tensor::external_copies();
    BoundaryCopies {
        copies: ours.copies + copies,
        bytes: ours.bytes + bytes,
    }
}

/// Books one copy of `bytes` bytes.
pub(crate) fn note_copy(bytes: usize) {
    COPIES.with(|c| {
        let v = c.get();
        c.set(BoundaryCopies {
            copies: v.copies + 1,
            bytes: v.bytes + bytes as u64,
        });
    });
}

/// Our error as candle's (the message is kept).
pub(crate) fn to_candle_err(e: Error) -> cc::Error {
    cc::Error::wrap(e)
}

/// candle's error as ours.
pub(crate) fn from_candle_err(e: cc::Error) -> Error {
    Error::invalid(format!("candle: {e}"))
}

/// Our float dtype as candle's.
pub(crate) fn dtype_to_candle(d: DType) -> Result<cc::DType> {
    match d {
        DType::F32 => Ok(cc::DType::F32),
        DType::F16 => Ok(cc::DType::F16),
        DType::BF16 => Ok(cc::DType::BF16),
        d => Err(Error::dtype("candle", "f32, f16 or bf16", d)),
    }
}

/// candle's float dtype as ours.
#[cfg(feature = "candle-cuda")]
pub(crate) fn dtype_from_candle(d: cc::DType) -> Result<DType> {
    match d {
        cc::DType::F32 => Ok(DType::F32),
        cc::DType::F16 => Ok(DType::F16),
        cc::DType::BF16 => Ok(DType::BF16),
        d => Err(Error::invalid(format!(
            "candle: dtype {d:?} is not supported (f32, f16 or bf16)"
        ))),
    }
}

/// The element range of a contiguous layout (`Err` for a strided one).
pub(crate) fn contiguous_range(l: &cc::Layout) -> Result<std::ops::Range<usize>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        Error::invalid("candle: the op needs a contiguous tensor (call .contiguous() first)")
    })?;
    Ok(a..b)
}

/// Elements `r` of host storage `s` as our CPU tensor of `shape` (one copy, booked).
pub(crate) fn cpu_region(s: &cc::CpuStorage, r: std::ops::Range<usize>, shape: &[usize]) -> Result<Tensor> {
    let dev = crate::Device::Cpu;
    let bad = || Error::invalid("candle: storage region out of bounds");
    note_copy(r.len() * s.dtype().size_in_bytes());
    match s {
        cc::CpuStorage::F32(v) => Tensor::from_slice(v.get(r).ok_or_else(bad)?, shape, dev),
        cc::CpuStorage::F16(v) => Tensor::from_slice(v.get(r).ok_or_else(bad)?, shape, dev),
        cc::CpuStorage::BF16(v) => Tensor::from_slice(v.get(r).ok_or_else(bad)?, shape, dev),
        s => Err(Error::invalid(format!(
            "candle: dtype {:?} is not supported (f32, f16 or bf16)",
            s.dtype()
        ))),
    }
}

/// The element ranges of `shapes` laid end to end from `start`.
pub(crate) fn part_ranges(start: usize, shapes: &[Vec<usize>]) -> Vec<std::ops::Range<usize>> {
    let mut at = start;
    shapes
        .iter()
        .map(|s| {
            let n: usize = s.iter().product();
            at += n;
            at - n..at
        })
        .collect()
}

/// The total element count of `shapes`.
pub(crate) fn total_elements(shapes: &[Vec<usize>]) -> usize {
    shapes.iter().map(|s| s.iter().product::<usize>()).sum()
}

/// Checks that the contiguous layout `l` holds exactly the parameters of `shapes` packed end to end and
/// returns their element ranges.
pub(crate) fn packed_ranges(l: &cc::Layout, shapes: &[Vec<usize>]) -> Result<Vec<std::ops::Range<usize>>> {
    let r = contiguous_range(l)?;
    let total = total_elements(shapes);
    if r.len() != total {
        return Err(Error::shape(
            "candle",
            format!("packed parameters hold {} elements, the layer's {total}", r.len()),
        ));
    }
    Ok(part_ranges(r.start, shapes))
}

/// Our tensor (any device) as candle host storage: the buffer itself when `t` is its only owner on the
/// host, else one (booked) copy.
pub(crate) fn cpu_out(t: Tensor) -> Result<cc::CpuStorage> {
    fn take<T: crate::Element>(t: Tensor) -> Result<Vec<T>> {
        t.into_cpu_vec::<T>().or_else(|t| {
            note_copy(t.numel() * std::mem::size_of::<T>());
            t.to_device(crate::Device::Cpu)?.to_vec()
        })
    }
    Ok(match t.dtype() {
        DType::F32 => cc::CpuStorage::F32(take(t)?),
        DType::F16 => cc::CpuStorage::F16(take(t)?),
        DType::BF16 => cc::CpuStorage::BF16(take(t)?),
        d => return Err(Error::dtype("candle", "f32, f16 or bf16", d)),
    })
}

/// candle's `t` made contiguous (a booked copy when it is strided).
pub(crate) fn contiguous(t: &cc::Tensor) -> cc::Result<cc::Tensor> {
    if !t.is_contiguous() {
        note_copy(t.elem_count() * t.dtype().size_in_bytes());
    }
    t.contiguous()
}

/// A candle tensor (any layout) as our tensor on the matching device.
pub(crate) fn to_ours(t: &cc::Tensor) -> Result<Tensor> {
    let t = contiguous(t).map_err(from_candle_err)?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        cc::Storage::Cpu(c) => cpu_region(c, contiguous_range(l)?, l.dims()),
        #[cfg(feature = "candle-cuda")]
        cc::Storage::Cuda(c) => super::cuda::cuda_region(c, contiguous_range(l)?, l.dims()),
        _ => Err(Error::device(
            "candle",
            "only CPU tensors (and CUDA ones with the `candle-cuda` feature) cross the boundary",
        )),
    }
}

/// Our tensor as a candle tensor (no backprop record) on `dev` (see [`cpu_out`] for when it is copied).
pub(crate) fn to_candle(t: Tensor, dev: &cc::Device) -> Result<cc::Tensor> {
    let shape = cc::Shape::from_dims(t.shape());
    let storage = match dev {
        cc::Device::Cpu => cc::Storage::Cpu(cpu_out(t)?),
        #[cfg(feature = "candle-cuda")]
        cc::Device::Cuda(d) => cc::Storage::Cuda(super::cuda::cuda_out(&t, d)?),
        _ => {
            return Err(Error::device(
                "candle",
                "only the CPU (and CUDA with the `candle-cuda` feature) is supported",
            ));
        }
    };
    Ok(cc::Tensor::from_storage(
        storage,
        shape,
        cc::op::BackpropOp::none(),
        false,
    ))
}

/// A flat candle tensor holding parameters of `shapes` end to end, as our tensors (one copy each).
pub(crate) fn to_ours_parts(t: &cc::Tensor, shapes: &[Vec<usize>]) -> Result<Vec<Tensor>> {
    let c = from_candle_err;
    let t = t.flatten_all().map_err(c)?;
    if t.elem_count() != total_elements(shapes) {
        return Err(Error::shape(
            "candle",
            "packed parameters do not match the layer's",
        ));
    }
    part_ranges(0, shapes)
        .into_iter()
        .zip(shapes)
        .map(|(r, s)| {
            to_ours(
                &t.narrow(0, r.start, r.len())
                    .map_err(c)?
                    .reshape(s.as_slice())
                    .map_err(c)?,
            )
        })
        .collect()
}
