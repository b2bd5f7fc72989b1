//! CUDA launches of `kernels/nf4.cu`. Same bytes as the CPU path (`cpu.rs`), which is their oracle.

use super::{Absmax, NESTED_BLOCKSIZE, QuantState, QuantType, QuantizeOptions, QuantizedTensor, dynamic_map};
use crate::device::cuda::{CudaBackend, grid_1d};
use crate::error::{Error, Result};
use crate::tensor::cuda::{CudaStorage, alloc, wrap};
use crate::tensor::{DType, Storage, Tensor};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// The 16-entry 4-bit code book, passed by value (64 bytes of kernel parameters).
#[repr(C)]
#[derive(Clone, Copy)]
struct Lut16 {
    v: [f32; 16],
}
// SAFETY: plain old data with the layout of the kernels' `struct Lut16 { float v[16]; }`.
unsafe impl DeviceRepr for Lut16 {}

/// The 256-entry nested code, passed by value (1 KiB of kernel parameters, well under the 4 KiB limit).
#[repr(C)]
#[derive(Clone, Copy)]
struct Lut256 {
    v: [f32; 256],
}
// SAFETY: plain old data with the layout of the kernels' `struct Lut256 { float v[256]; }`.
unsafe impl DeviceRepr for Lut256 {}

fn storage<'a>(t: &'a Tensor, what: &'static str) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::device(what, "expected a CUDA tensor, got a CPU tensor")),
    }
}

fn log2(v: usize) -> i32 {
    v.trailing_zeros() as i32
}

fn quantize_kernel(dtype: DType, qt: QuantType) -> Result<&'static str> {
    Ok(match (dtype, qt) {
        (DType::F32, QuantType::Nf4) => "quantize_4bit_f32_nf4",
        (DType::F16, QuantType::Nf4) => "quantize_4bit_f16_nf4",
        (DType::BF16, QuantType::Nf4) => "quantize_4bit_bf16_nf4",
        (DType::F32, QuantType::Fp4) => "quantize_4bit_f32_fp4",
        (DType::F16, QuantType::Fp4) => "quantize_4bit_f16_fp4",
        (DType::BF16, QuantType::Fp4) => "quantize_4bit_bf16_fp4",
        (d, _) => return Err(Error::dtype("quantize", "f32, f16 or bf16", d)),
    })
}

pub(super) fn quantize_tensor(t: &Tensor, opts: &QuantizeOptions) -> Result<(Tensor, Absmax)> {
    let c = storage(t, "quantize")?;
    let b = &c.backend;
    let (n, bs) = (t.numel(), opts.blocksize);
    let (nb, nbytes) = (n.div_ceil(bs), n.div_ceil(2));
    let mut packed = alloc(b, DType::U8, nbytes)?;
    let mut absmax = alloc(b, DType::F32, nb)?;
    let mut first_bad = b.stream.clone_htod(&[u64::MAX])?;
    let f = b.func("nf4", quantize_kernel(t.dtype(), opts.quant_type)?)?;
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
    macro_rules! launch {
        ($t:ty) => {{
            let x = c.view::<$t>()?;
            let mut p = packed.view_mut::<u8>()?;
            let mut a = absmax.view_mut::<f32>()?;
            let mut l = b.stream.launch_builder(&f);
            l.arg(&x)
                .arg(&mut p)
                .arg(&mut a)
                .arg(&n64)
                .arg(&lbs)
                .arg(&mut first_bad);
            // SAFETY: quantize_4bit_<T>_<qt>(const T* x [n], uint8* packed [ceil(n/2)], float* absmax
            // [ceil(n/bs)], int64 n, int log2_bs, u64* first_bad [1]). Thread t reads x[8t, 8t+8) ∩ [0, n)
            // (vector loads only when 8t + 8 <= n), writes packed bytes [4t, 4t+4) ∩ [0, ceil(n/2)) and,
            // for the first thread of each quant block, absmax[8t / bs] with 8t < n. blocks * threads
            // >= n/8 covers every element; threads is a multiple of bs/8, the shuffle group size.
            unsafe { l.launch(cfg) }?;
        }};
    }
    match t.dtype() {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(half::f16),
        DType::BF16 => launch!(half::bf16),
        d => return Err(Error::dtype("quantize", "f32, f16 or bf16", d)),
    }
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

fn dcode_lut(code: &[f32]) -> Result<Lut256> {
    let v: [f32; 256] = code.try_into().map_err(|_| {
        Error::shape(
            "nested_quant_map",
            format!("expected 256 entries, got {}", code.len()),
        )
    })?;
    Ok(Lut256 { v })
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

    let f = b.func("nf4", "dq_partial_sums")?;
    let mut l = b.stream.launch_builder(&f);
    l.arg(&a).arg(&mut partial).arg(&nb64);
    let cfg = LaunchConfig {
        grid_dim: (nchunks.div_ceil(32) as u32, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: dq_partial_sums(const float* absmax [nb], double* partial [nchunks], int64 nb): block k (32
    // threads) reads absmax[8192k, 8192k + 8192) ∩ [0, nb) and writes partial[32k + t] for 32k + t <
    // nchunks = ceil(nb / 256); the grid has ceil(nchunks / 32) blocks.
    unsafe { l.launch(cfg) }?;

    let f = b.func("nf4", "dq_offset")?;
    let mut l = b.stream.launch_builder(&f);
    l.arg(&partial).arg(&nchunks64).arg(&nb64).arg(&mut offset);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: dq_offset(const double* partial [nchunks], int64 nchunks, int64 nb, float* offset [1]):
    // thread 0 of the single block reads the nchunks partial sums and writes one float.
    unsafe { l.launch(one) }?;

    let f = b.func("nf4", "dq_quantize")?;
    let lut = dcode_lut(dynamic_map())?;
    {
        let mut q = codes.view_mut::<u8>()?;
        let mut a2 = nested.view_mut::<f32>()?;
        let mut l = b.stream.launch_builder(&f);
        l.arg(&a)
            .arg(&offset)
            .arg(&mut q)
            .arg(&mut a2)
            .arg(&nb64)
            .arg(&lut);
        let cfg = LaunchConfig {
            grid_dim: (nn as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: dq_quantize(const float* absmax [nb], const float* offset [1], uint8* codes [nb], float*
        // absmax2 [nn], int64 nb, Lut256): block k (256 threads, required) handles absmax[256k + t] < nb and
        // writes absmax2[k]; the grid has nn = ceil(nb / 256) blocks.
        unsafe { l.launch(cfg) }?;
    }
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
    match &state.absmax {
        Absmax::F32(t) => Ok(t.clone()),
        Absmax::Double {
            codes,
            nested_absmax,
            offset,
            nested_code,
            nested_blocksize,
        } => {
            let cs = storage(codes, "absmax_f32")?;
            let ns = storage(nested_absmax, "absmax_f32")?;
            let b = &cs.backend;
            let nb = codes.numel();
            let mut out = alloc(b, DType::F32, nb)?;
            let lut = dcode_lut(nested_code)?;
            let f = b.func("nf4", "dq_decode")?;
            {
                let (q, a2) = (cs.view::<u8>()?, ns.view::<f32>()?);
                let mut o = out.view_mut::<f32>()?;
                let (lnbs, nb64) = (log2(*nested_blocksize), nb as i64);
                let mut l = b.stream.launch_builder(&f);
                l.arg(&q)
                    .arg(&a2)
                    .arg(&lut)
                    .arg(offset)
                    .arg(&lnbs)
                    .arg(&mut o)
                    .arg(&nb64);
                // SAFETY: dq_decode(const uint8* codes [nb], const float* absmax2 [ceil(nb / nbs)], Lut256,
                // float offset, int log2_nbs, float* out [nb], int64 nb): grid-stride over nb; the state
                // was validated, so absmax2 holds ceil(nb / nbs) values and nbs is a power of two.
                unsafe { l.launch(grid_1d(nb, 256)?) }?;
            }
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

/// Dequantizes into existing device memory holding at least `numel` elements of `dtype`.
pub(super) fn dequantize_into(q: &QuantizedTensor, out: &mut CudaStorage, dtype: DType) -> Result<()> {
    dequantize_to(q, out, dtype)
}

fn dequantize_to(q: &QuantizedTensor, out: &mut CudaStorage, dtype: DType) -> Result<()> {
    let st = &q.state;
    let ps = storage(&q.data, "dequantize")?;
    let b = &ps.backend;
    let n = st.numel();
    if out.data.len() < n * dtype.size_in_bytes() {
        return Err(Error::shape("dequantize_into", "output buffer too small"));
    }
    let lut = Lut16 {
        v: *st.quant_type.code(),
    };
    let (n64, lbs) = (n as i64, log2(st.blocksize));
    // One thread per 32 elements.
    let cfg = grid_1d(n.div_ceil(32), 256)?;
    let dt = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => return Err(Error::dtype("dequantize", "f32, f16 or bf16", d)),
    };
    let p = ps.view::<u8>()?;
    macro_rules! go {
        ($t:ty) => {{
            let mut o = out.view_mut::<$t>()?;
            match &st.absmax {
                Absmax::F32(a) => {
                    let f = b.func("nf4", kernel_name("dequantize_4bit", dt))?;
                    let av = storage(a, "dequantize")?.view::<f32>()?;
                    let mut l = b.stream.launch_builder(&f);
                    l.arg(&p).arg(&av).arg(&mut o).arg(&n64).arg(&lbs).arg(&lut);
                    // SAFETY: dequantize_4bit_<T>(const uint8* packed [ceil(n/2)], const float* absmax
                    // [ceil(n/bs)], T* out [n], int64 n, int log2_bs, Lut16): thread t handles elements
                    // [32t, 32t + 32) ∩ [0, n), reading packed bytes [16t, 16t + 16) only when 32t + 32 <= n
                    // and absmax[32t / bs]; sizes were validated by QuantizedTensor::from_parts.
                    unsafe { l.launch(cfg) }?;
                }
                Absmax::Double {
                    codes,
                    nested_absmax,
                    offset,
                    nested_code,
                    nested_blocksize,
                } => {
                    let f = b.func("nf4", kernel_name("dequantize_4bit_dq", dt))?;
                    let qv = storage(codes, "dequantize")?.view::<u8>()?;
                    let a2 = storage(nested_absmax, "dequantize")?.view::<f32>()?;
                    let dl = dcode_lut(nested_code)?;
                    let lnbs = log2(*nested_blocksize);
                    let mut l = b.stream.launch_builder(&f);
                    l.arg(&p).arg(&qv).arg(&a2).arg(&dl).arg(offset).arg(&lnbs);
                    l.arg(&mut o).arg(&n64).arg(&lbs).arg(&lut);
                    // SAFETY: dequantize_4bit_dq_<T>(packed [ceil(n/2)], const uint8* qabsmax [nb], const
                    // float* absmax2 [ceil(nb/nbs)], Lut256, float offset, int log2_nbs, T* out [n], int64 n,
                    // int log2_bs, Lut16): as above, with absmax[b] decoded from qabsmax[b] and
                    // absmax2[b >> log2_nbs]; all sizes validated by from_parts.
                    unsafe { l.launch(cfg) }?;
                }
            }
        }};
    }
    match dtype {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
    Ok(())
}

fn kernel_name(base: &str, dt: &str) -> &'static str {
    match (base, dt) {
        ("dequantize_4bit", "f32") => "dequantize_4bit_f32",
        ("dequantize_4bit", "f16") => "dequantize_4bit_f16",
        ("dequantize_4bit", _) => "dequantize_4bit_bf16",
        (_, "f32") => "dequantize_4bit_dq_f32",
        (_, "f16") => "dequantize_4bit_dq_f16",
        _ => "dequantize_4bit_dq_bf16",
    }
}
