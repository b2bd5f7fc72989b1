//! CUDA launches of `kernels/nf4.cu`. Same bytes as the CPU path (`cpu.rs`), which is their oracle.

use super::{
    Absmax, AbsmaxRef, NESTED_BLOCKSIZE, QuantState, QuantType, QuantizeOptions, QuantizedTensor, dynamic_map,
};
use crate::device::cuda::kernels::{self as k, Q4Params};
use crate::device::cuda::{CudaBackend, grid_1d};
use crate::error::{Error, Result};
use crate::tensor::cuda::{CudaStorage, alloc, storage, typed, wrap};
use crate::tensor::{DType, Storage, Tensor};
use cudarc::driver::LaunchConfig;
use std::sync::Arc;

fn log2(v: usize) -> i32 {
    v.trailing_zeros() as i32
}

/// A 4-bit weight on the device as the kernels' `Q4_PARAMS` (kernels/q4.cuh): the one argument struct
/// of every fused 4-bit kernel (qmatmul, DoRA). Blocksizes are powers of two (checked when the state
/// was built; BaseWeight::validate checks the nested one again), so both go as log2. Also returns
/// whether the absmax is double-quantized (the kernels' `dq` variant flag).
pub(crate) fn q4_params(q: &QuantizedTensor) -> Result<(Q4Params<'_>, u32)> {
    let op = "4-bit weight";
    let st = &q.state;
    let mut p = Q4Params {
        data: storage(&q.data, op)?.view()?,
        absmax: None,
        codes: None,
        nested: None,
        offset: 0.0,
        nested_log2: 0,
        lut: st.code,
        ncode: [0.0; 256],
        bs_log2: log2(st.blocksize),
    };
    match st.absmax.view() {
        AbsmaxRef::F32(t) => {
            p.absmax = Some(storage(t, op)?.view()?);
            Ok((p, 0))
        }
        AbsmaxRef::Double(d) => {
            if !d.nested_blocksize.is_power_of_two() {
                return Err(Error::invalid(format!(
                    "{op}: nested blocksize {} is not a power of two",
                    d.nested_blocksize
                )));
            }
            p.codes = Some(storage(d.codes, op)?.view()?);
            p.nested = Some(storage(d.nested_absmax, op)?.view()?);
            p.offset = d.offset;
            p.nested_log2 = log2(d.nested_blocksize);
            p.ncode = dcode_lut(d.nested_code)?;
            Ok((p, 1))
        }
    }
}

pub(super) fn quantize_tensor(t: &Tensor, opts: &QuantizeOptions) -> Result<(Tensor, Absmax)> {
    let c = storage(t, "quantize")?;
    let b = &c.backend;
    let (n, bs) = (t.numel(), opts.blocksize);
    let (nb, nbytes) = (n.div_ceil(bs), n.div_ceil(2));
    let mut packed = alloc(b, DType::U8, nbytes)?;
    let mut absmax = alloc(b, DType::F32, nb)?;
    let mut first_bad = b.stream.clone_htod(&[u64::MAX])?;
    // One thread per 8 elements; blocks of max(256, bs/8) threads (a multiple of the bs/8 threads of a
    // quant block, at most 512).
    let threads = (bs / 8).max(256);
    let blocks = n.div_ceil(8).div_ceil(threads);
    if blocks > i32::MAX as usize {
        return Err(Error::invalid(format!("{n} elements exceed one CUDA grid")));
    }
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n64, lbs) = (n as i64, log2(bs));
    typed!(t.dtype(), "quantize", |T| {
        let x = c.view::<T>()?;
        let (mut p, mut a) = (packed.view_mut::<u8>()?, absmax.view_mut::<f32>()?);
        let mut fb = first_bad.as_view_mut();
        // SAFETY: quantize_4bit_<T>_<qt>(const T* x [n], uint8* packed [ceil(n/2)], float* absmax
        // [ceil(n/bs)], int64 n, int log2_bs, u64* first_bad [1]). Thread t reads x[8t, 8t+8) ∩ [0, n)
        // (vector loads only when 8t + 8 <= n), writes packed bytes [4t, 4t+4) ∩ [0, ceil(n/2)) and,
        // for the first thread of each quant block, absmax[8t / bs] with 8t < n. blocks * threads
        // >= n/8 covers every element; threads is a multiple of bs/8, the shuffle group size.
        unsafe {
            match opts.quant_type {
                QuantType::Nf4 => {
                    k::nf4::quantize_4bit_nf4::<T>(b, cfg, &x, &mut p, &mut a, n64, lbs, &mut fb)
                }
                QuantType::Fp4 => {
                    k::nf4::quantize_4bit_fp4::<T>(b, cfg, &x, &mut p, &mut a, n64, lbs, &mut fb)
                }
            }
        }
    })?;
    if !opts.allow_non_finite {
        let bad = b.stream.clone_dtoh(&first_bad)?[0];
        if bad != u64::MAX {
            let index = bad as usize;
            let value = element_f32(c, t.dtype(), index)?;
            return Err(Error::NonFinite {
                tensor: opts.name.clone(),
                index,
                value,
            });
        }
    }
    let data = wrap(packed, &[nbytes], DType::U8);
    let absmax = if opts.double_quant {
        double_quant(b, &absmax, nb)?
    } else {
        Absmax::F32(wrap(absmax, &[nb], DType::F32))
    };
    Ok((data, absmax))
}

/// One element of a device tensor as f32 (for error messages).
fn element_f32(c: &CudaStorage, dtype: DType, index: usize) -> Result<f32> {
    let size = dtype.size_in_bytes();
    let bytes = c
        .backend
        .stream
        .clone_dtoh(&c.data.slice(index * size..(index + 1) * size))?;
    Ok(match dtype {
        DType::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        DType::F16 => half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
        _ => half::bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
    })
}

fn dcode_lut(code: &[f32]) -> Result<[f32; 256]> {
    code.try_into().map_err(|_| {
        Error::shape(
            "nested_quant_map",
            format!("expected 256 entries, got {}", code.len()),
        )
    })
}

/// Double quantization on the device: the fixed-order f64 mean, then one block per 256 absmax values.
fn double_quant(b: &Arc<CudaBackend>, absmax: &CudaStorage, nb: usize) -> Result<Absmax> {
    let nchunks = nb.div_ceil(crate::quant::cpu::MEAN_CHUNK);
    let nn = nb.div_ceil(NESTED_BLOCKSIZE);
    if nn > i32::MAX as usize {
        return Err(Error::invalid(format!("{nb} absmax values exceed one CUDA grid")));
    }
    let mut partial = b.stream.alloc_zeros::<f64>(nchunks)?;
    let mut offset = b.stream.alloc_zeros::<f32>(1)?;
    let mut codes = alloc(b, DType::U8, nb)?;
    let mut nested = alloc(b, DType::F32, nn)?;
    let (nb64, nchunks64) = (nb as i64, nchunks as i64);
    let a = absmax.view::<f32>()?;

    let cfg = LaunchConfig {
        grid_dim: (nchunks.div_ceil(32) as u32, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: dq_partial_sums(const float* absmax [nb], double* partial [nchunks], int64 nb): block k (32
    // threads) reads absmax[8192k, 8192k + 8192) ∩ [0, nb) and writes partial[32k + t] for 32k + t <
    // nchunks = ceil(nb / 256); the grid has ceil(nchunks / 32) blocks.
    unsafe { k::nf4::dq_partial_sums(b, cfg, &a, &mut partial.as_view_mut(), nb64) }?;

    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: dq_offset(const double* partial [nchunks], int64 nchunks, int64 nb, float* offset [1]):
    // thread 0 of the single block reads the nchunks partial sums and writes one float.
    unsafe {
        k::nf4::dq_offset(
            b,
            one,
            &partial.as_view(),
            nchunks64,
            nb64,
            &mut offset.as_view_mut(),
        )
    }?;

    let lut = dcode_lut(dynamic_map())?;
    let cfg = LaunchConfig {
        grid_dim: (nn as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (mut q, mut a2) = (codes.view_mut::<u8>()?, nested.view_mut::<f32>()?);
    // SAFETY: dq_quantize(const float* absmax [nb], const float* offset [1], uint8* codes [nb], float*
    // absmax2 [nn], int64 nb, Lut256): block k (256 threads, required) handles absmax[256k + t] < nb and
    // writes absmax2[k]; the grid has nn = ceil(nb / 256) blocks.
    unsafe { k::nf4::dq_quantize(b, cfg, &a, &offset.as_view(), &mut q, &mut a2, nb64, &lut) }?;
    let offset = b.stream.clone_dtoh(&offset)?[0];
    Ok(Absmax::Double {
        codes: wrap(codes, &[nb], DType::U8),
        nested_absmax: wrap(nested, &[nn], DType::F32),
        offset,
        nested_code: dynamic_map().to_vec(),
        nested_blocksize: NESTED_BLOCKSIZE,
    })
}

/// The f32 absmax of a device quant state (decodes double quantization).
pub(super) fn absmax_f32(state: &QuantState) -> Result<Tensor> {
    match state.absmax.view() {
        AbsmaxRef::F32(t) => Ok(t.clone()),
        AbsmaxRef::Double(d) => {
            let cs = storage(d.codes, "absmax_f32")?;
            let ns = storage(d.nested_absmax, "absmax_f32")?;
            let b = &cs.backend;
            let nb = d.codes.numel();
            let mut out = alloc(b, DType::F32, nb)?;
            let lut = dcode_lut(d.nested_code)?;
            let (q, a2) = (cs.view::<u8>()?, ns.view::<f32>()?);
            let mut o = out.view_mut::<f32>()?;
            let (lnbs, nb64, offset) = (log2(d.nested_blocksize), nb as i64, d.offset);
            // SAFETY: dq_decode(const uint8* codes [nb], const float* absmax2 [ceil(nb / nbs)], Lut256,
            // float offset, int log2_nbs, float* out [nb], int64 nb): grid-stride over nb; the state
            // was validated, so absmax2 holds ceil(nb / nbs) values and nbs is a power of two.
            unsafe { k::nf4::dq_decode(b, grid_1d(nb, 256)?, &q, &a2, &lut, offset, lnbs, &mut o, nb64) }?;
            Ok(wrap(out, &[nb], DType::F32))
        }
    }
}

pub(super) fn dequantize_tensor(q: &QuantizedTensor, dtype: DType) -> Result<Tensor> {
    let st = &q.state;
    let b = storage(&q.data, "dequantize")?.backend.clone();
    let mut out = alloc(&b, dtype, st.numel())?;
    dequantize_to(q, &mut out, dtype)?;
    Ok(wrap(out, &st.shape, dtype))
}

/// Dequantizes into an existing CUDA tensor holding at least `numel` elements (of its dtype).
pub(super) fn dequantize_tensor_into(q: &QuantizedTensor, out: &mut Tensor) -> Result<()> {
    let dtype = out.dtype();
    match out.storage_mut()? {
        Storage::Cuda(c) => dequantize_to(q, c, dtype),
        Storage::Cpu(_) => Err(Error::device("dequantize_into", "output is not a CUDA tensor")),
    }
}

fn dequantize_to(q: &QuantizedTensor, out: &mut CudaStorage, dtype: DType) -> Result<()> {
    let n = q.state.numel();
    if out.data.len() < n * dtype.size_in_bytes() {
        return Err(Error::shape("dequantize_into", "output buffer too small"));
    }
    let (q4, dq) = q4_params(q)?;
    dequantize_q4(&storage(&q.data, "dequantize")?.backend, &q4, dq, dtype, out, n)
}

/// Dequantizes the 4-bit weight `q4` (`dq`: the double-quantization flag of [`q4_params`]) into the
/// first `n` elements of `out`, which holds at least `n` elements of `dtype`. The one dequantize
/// launch of the crate (QuantizedTensor::dequantize and qmatmul's dequantize + cuBLAS path).
pub(crate) fn dequantize_q4(
    b: &CudaBackend,
    q4: &Q4Params<'_>,
    dq: u32,
    dtype: DType,
    out: &mut CudaStorage,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    // One thread per 32 elements.
    let cfg = grid_1d(n.div_ceil(32), 256)?;
    let n64 = n as i64;
    typed!(dtype, "dequantize", |T| {
        // SAFETY: dequantize_4bit_<T>_dq<D>(Q4_PARAMS, T* out [n], int64 n): thread t handles elements
        // [32t, 32t + 32) ∩ [0, n), reading packed bytes [16t, 16t + 16) only when 32t + 32 <= n and the
        // absmax (or its code and nested value) of block 32t >> bs_log2. The weight was validated when
        // it was built (byte, block and nested counts match n and the blocksizes, both powers of two
        // >= 32 so 32 elements never straddle a block); out holds n elements of dtype (the callers
        // allocate or check it), and fresh allocations are 16-byte aligned for the vector stores.
        unsafe { k::nf4::dequantize_4bit::<T>(b, cfg, dq, q4, &mut out.view_mut()?, n64) }
    })
}
