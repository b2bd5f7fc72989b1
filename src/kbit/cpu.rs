//! CPU backend of the k-bit tiers: blockwise quantization (rayon over blocks), packing, and the
//! decoder the qmatmul panels and GEMVs call ([`KView::decode_flat`]).

use super::{KBitTensor, code, thresholds};
use crate::error::{Error, Result};
use crate::quant::QuantizeOptions;
use crate::tensor::{DType, Tensor};
use half::bf16;
use rayon::prelude::*;
use std::borrow::Cow;

/// The code of element `i` of packed `bits`-bit data (bytes past the end read as 0).
#[inline(always)]
pub(crate) fn code_at(bits: u8, data: &[u8], i: usize) -> u8 {
    match bits {
        2 => (data[i >> 2] >> (6 - 2 * (i & 3))) & 3,
        3 => {
            let g = 3 * (i >> 3);
            let byte = |j: usize| data.get(g + j).copied().unwrap_or(0) as u32;
            let word = (byte(0) << 16) | (byte(1) << 8) | byte(2);
            ((word >> (21 - 3 * (i & 7))) & 7) as u8
        }
        _ => data[i],
    }
}

/// Packs `codes` into `out` (`ceil(len·bits/8)` bytes, zeroed or not; every byte is rewritten).
pub(crate) fn pack(bits: u8, codes: &[u8], out: &mut [u8]) {
    match bits {
        2 => {
            for (o, c) in out.iter_mut().zip(codes.chunks(4)) {
                *o = c
                    .iter()
                    .enumerate()
                    .fold(0u8, |acc, (j, &v)| acc | (v << (6 - 2 * j)));
            }
        }
        3 => {
            for (o, c) in out.chunks_mut(3).zip(codes.chunks(8)) {
                let word = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (j, &v)| acc | ((v as u32) << (21 - 3 * j)));
                let bytes = [(word >> 16) as u8, (word >> 8) as u8, word as u8];
                o.copy_from_slice(&bytes[..o.len()]);
            }
        }
        _ => out.copy_from_slice(codes),
    }
}

/// The code of a scaled value `s = x / absmax` (nearest code; see the module docs of `kbit`).
#[inline(always)]
pub(crate) fn encode(bits: u8, th: &[f32], s: f32) -> u8 {
    if bits == 8 {
        // NaN: `as` saturates NaN to 0.
        (s * 127.0).round().clamp(-127.0, 127.0) as i8 as u8
    } else {
        th.iter().filter(|&&t| s > t).count() as u8
    }
}

/// An [`Error::NonFinite`] for the first non-finite element of `t`, if any.
pub(crate) fn check_finite(t: &Tensor, name: &str) -> Result<()> {
    let v = t.to_vec_f32()?;
    if let Some(index) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            tensor: name.to_string(),
            index,
            value: v[index],
        });
    }
    Ok(())
}

/// Quantizes the f32 values `x` in `bits` (2, 3 or 8) with blocks of `bs`: packed codes and the f32
/// absmax per block. NaN is ignored by the absmax; a block of zeros has absmax 0 and codes of 0.
pub(crate) fn quantize_f32(x: &[f32], bits: u8, bs: usize) -> (Vec<u8>, Vec<f32>) {
    let n = x.len();
    let bpb = bs * bits as usize / 8; // bytes per full block (bs is a multiple of 8)
    let mut data = vec![0u8; (n * bits as usize).div_ceil(8)];
    let mut absmax = vec![0f32; n.div_ceil(bs)];
    let th = if bits == 8 { &[][..] } else { thresholds(bits) };
    data.par_chunks_mut(bpb)
        .zip(absmax.par_iter_mut())
        .zip(x.par_chunks(bs))
        .for_each_init(Vec::new, |codes: &mut Vec<u8>, ((out, amax), blk)| {
            let m = blk.iter().fold(0f32, |m, &v| m.max(v.abs()));
            *amax = m;
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            codes.clear();
            codes.extend(blk.iter().map(|&v| encode(bits, th, v * inv)));
            pack(bits, codes, out);
        });
    (data, absmax)
}

/// [`quantize_f32`] of a CPU tensor: `(u8 [ceil(n·bits/8)], f32 [nblocks])`.
pub(crate) fn quantize(t: &Tensor, bits: u8, opts: &QuantizeOptions) -> Result<(Tensor, Tensor)> {
    if !opts.allow_non_finite {
        check_finite(t, &opts.name)?;
    }
    let x = t.to_vec_f32()?;
    let (data, absmax) = quantize_f32(&x, bits, opts.blocksize);
    let (nd, na) = (data.len(), absmax.len());
    let dev = crate::Device::Cpu;
    Ok((
        Tensor::from_vec(data, &[nd], dev)?,
        Tensor::from_vec(absmax, &[na], dev)?,
    ))
}

/// Host view of a k-bit tensor for decoding: codes, code book, decoded absmax (or bf16 values).
pub(crate) enum KView<'a> {
    Codes {
        bits: u8,
        data: &'a [u8],
        lut: &'static [f32],
        absmax: Cow<'a, [f32]>,
        bs: usize,
    },
    Bf16(&'a [bf16]),
}

impl<'a> KView<'a> {
    /// The view of a CPU tensor (decodes a double-quantized absmax once).
    pub(crate) fn new(k: &'a KBitTensor) -> Result<KView<'a>> {
        let op = "k-bit weight";
        if k.bits == 16 {
            return Ok(KView::Bf16(k.data.cpu_data::<bf16>(op)?));
        }
        let absmax = match &k.absmax {
            Some(crate::quant::Absmax::F32(t)) => Cow::Borrowed(t.cpu_data::<f32>(op)?),
            _ => Cow::Owned(k.absmax_f32()?),
        };
        Ok(KView::Codes {
            bits: k.bits,
            data: k.data.cpu_data::<u8>(op)?,
            lut: code(k.bits)?,
            absmax,
            bs: k.blocksize,
        })
    }

    /// Decodes the flat elements `[f0, f0 + out.len())` to f32: `lut[code] * absmax[block]`.
    pub(crate) fn decode_flat(&self, f0: usize, out: &mut [f32]) {
        match self {
            KView::Bf16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[f0..f0 + out.len()].convert_to_f32_slice(out)
            }
            KView::Codes {
                bits,
                data,
                lut,
                absmax,
                bs,
            } => {
                let end = f0 + out.len();
                let mut f = f0;
                while f < end {
                    let b = f / bs;
                    let run_end = ((b + 1) * bs).min(end);
                    let s = absmax[b];
                    let dst = &mut out[f - f0..run_end - f0];
                    match bits {
                        8 => {
                            for (o, &c) in dst.iter_mut().zip(&data[f..run_end]) {
                                *o = lut[c as usize] * s;
                            }
                        }
                        _ => {
                            for (j, o) in dst.iter_mut().enumerate() {
                                *o = lut[code_at(*bits, data, f + j) as usize] * s;
                            }
                        }
                    }
                    f = run_end;
                }
            }
        }
    }
}

/// All of a CPU k-bit tensor (2, 3 or 8 bits) as a flat tensor of `dtype`.
pub(crate) fn dequantize(k: &KBitTensor, dtype: DType) -> Result<Tensor> {
    let v = KView::new(k)?;
    let n = k.numel();
    let mut out = vec![0f32; n];
    const CH: usize = 1 << 16;
    out.par_chunks_mut(CH)
        .enumerate()
        .for_each(|(i, c)| v.decode_flat(i * CH, c));
    Tensor::from_vec(out, &[n], crate::Device::Cpu)?.to_dtype(dtype)
}
