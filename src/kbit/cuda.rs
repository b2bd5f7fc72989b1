//! CUDA launches of `kernels/kbit.cu`: quantize (absmax pass, then encode) and dequantize. The bytes
//! equal the CPU path's (`cpu.rs`, their oracle; `tests/kbit.rs` compares them).

use super::{KBitTensor, code, thresholds};
use crate::device::cuda::grid_1d;
use crate::device::cuda::kernels as k;
use crate::error::{Error, Result};
use crate::quant::{Absmax, QuantizeOptions};
use crate::tensor::cuda::{alloc, storage, typed, wrap};
use crate::tensor::{DType, Tensor};
use cudarc::driver::LaunchConfig;

fn log2(v: usize) -> i32 {
    v.trailing_zeros() as i32
}

/// A table padded to the kernels' 256-entry `Lut256` (unused entries `pad`).
fn lut256(v: &[f32], pad: f32) -> [f32; 256] {
    let mut t = [pad; 256];
    t[..v.len()].copy_from_slice(v);
    t
}

/// `(u8 [ceil(n·bits/8)], f32 [nblocks])` of a CUDA tensor; `bits` is 2, 3 or 8, `opts` validated.
pub(crate) fn quantize(t: &Tensor, bits: u8, opts: &QuantizeOptions) -> Result<(Tensor, Tensor)> {
    let op = "KBitTensor::quantize";
    let c = storage(t, op)?;
    let b = &c.backend;
    let (n, bs) = (t.numel(), opts.blocksize);
    let (nb, nbytes) = (n.div_ceil(bs), (n * bits as usize).div_ceil(8));
    let mut data = alloc(b, DType::U8, nbytes)?;
    let mut absmax = alloc(b, DType::F32, nb)?;
    let mut first_bad = b.stream.clone_htod(&[u64::MAX])?;
    let per_block = LaunchConfig {
        grid_dim: (
            u32::try_from(nb).map_err(|_| Error::invalid(format!("{op}: {nb} blocks")))?,
            1,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let per_8 = grid_1d(n.div_ceil(8), 256)?;
    let (n64, lbs, bits32) = (n as i64, log2(bs), bits as i32);
    let th = lut256(if bits == 8 { &[] } else { thresholds(bits) }, f32::INFINITY);
    typed!(t.dtype(), op, |T| {
        let x = c.view::<T>()?;
        let mut fb = first_bad.as_view_mut();
        // SAFETY: kbit_absmax_<T>(const T* x [n], float* absmax [nb], int64 n, int log2_bs, u64* first_bad
        // [1]): block b (256 threads, 8 warps) reads x[b·bs, min(n, (b+1)·bs)) and thread 0 writes
        // absmax[b]; the grid has nb = ceil(n / bs) blocks, bs a power of two (options validated).
        unsafe {
            k::kbit::kbit_absmax::<T>(
                b,
                per_block,
                &x,
                &mut absmax.view_mut::<f32>()?,
                n64,
                lbs,
                &mut fb,
            )
        }?;
        let mut d = data.view_mut::<u8>()?;
        // SAFETY: kbit_encode_<T>(const T* x [n], const float* absmax [nb], uint8* data [nbytes], int64 n,
        // int log2_bs, int bits, Lut256 th): thread t reads x[8t, 8t + 8) ∩ [0, n) and absmax[8t >> log2_bs]
        // (< nb), writes data[bits·t, bits·t + bits) ∩ [0, ceil(n·bits/8)); the grid covers ceil(n / 8)
        // threads; th holds 2^bits - 1 thresholds (the rest +inf, unread).
        unsafe {
            k::kbit::kbit_encode::<T>(
                b,
                per_8,
                &x,
                &absmax.view::<f32>()?,
                &mut d,
                n64,
                lbs,
                bits32,
                &th,
            )
        }
    })?;
    if !opts.allow_non_finite {
        let bad = b.stream.clone_dtoh(&first_bad)?[0];
        if bad != u64::MAX {
            let index = bad as usize;
            let value = t.to_vec_f32()?[index];
            return Err(Error::NonFinite {
                tensor: opts.name.clone(),
                index,
                value,
            });
        }
    }
    Ok((wrap(data, &[nbytes], DType::U8), wrap(absmax, &[nb], DType::F32)))
}

/// All of a CUDA k-bit tensor (2, 3 or 8 bits, validated) as a flat tensor of `dtype`.
pub(crate) fn dequantize(q: &KBitTensor, dtype: DType) -> Result<Tensor> {
    let op = "KBitTensor::dequantize";
    let n = q.numel();
    let ds = storage(&q.data, op)?;
    let b = ds.backend.clone();
    let mut out = alloc(&b, dtype, n)?;
    let lut = lut256(code(q.bits)?, 0.0);
    let (mut absmax, mut codes, mut nested) = (None, None, None);
    let (mut offset, mut nested_log2, mut ncode) = (0f32, 0i32, [0f32; 256]);
    match &q.absmax {
        Some(Absmax::F32(t)) => absmax = Some(storage(t, op)?.view::<f32>()?),
        Some(Absmax::Double {
            codes: c,
            nested_absmax,
            offset: o,
            nested_code,
            nested_blocksize,
        }) => {
            if !nested_blocksize.is_power_of_two() {
                return Err(Error::invalid(format!(
                    "{op}: nested blocksize {nested_blocksize}"
                )));
            }
            codes = Some(storage(c, op)?.view::<u8>()?);
            nested = Some(storage(nested_absmax, op)?.view::<f32>()?);
            offset = *o;
            nested_log2 = log2(*nested_blocksize);
            ncode = lut256(nested_code, 0.0);
        }
        None => {
            return Err(Error::invalid(format!(
                "{op}: {}-bit tensor without scales",
                q.bits
            )));
        }
    }
    let cfg = grid_1d(n.div_ceil(8), 256)?;
    let (n64, lbs, bits) = (n as i64, log2(q.blocksize), q.bits as i32);
    let data = ds.view::<u8>()?;
    typed!(dtype, op, |T| {
        // SAFETY: kbit_dequantize_<T>(const uint8* data [ceil(n·bits/8)], absmax [nb] | null, codes [nb] |
        // null, nested [ceil(nb / 2^nested_log2)] | null, float offset, int nested_log2, Lut256 lut, Lut256
        // ncode, int log2_bs, int bits, T* out [n], int64 n): thread t writes out[8t, 8t + 8) ∩ [0, n) and
        // reads the code bytes of those elements and the scales of their one block. The tensor was
        // validated (byte, block and nested counts match n, bits and the blocksizes); exactly one of
        // absmax and codes + nested is non-null; out holds n elements of dtype.
        unsafe {
            k::kbit::kbit_dequantize::<T>(
                &b,
                cfg,
                &data,
                absmax.as_ref(),
                codes.as_ref(),
                nested.as_ref(),
                offset,
                nested_log2,
                &lut,
                &ncode,
                lbs,
                bits,
                &mut out.view_mut()?,
                n64,
            )
        }
    })?;
    Ok(wrap(out, &[n], dtype))
}
