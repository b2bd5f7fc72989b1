//! CPU backend of the fused linear family, and the decode oracle for the CUDA kernels.
//!
//! # Decode path (≤ 16 tokens): the weight is streamed once and never materialized
//!
//! Napkin math for a 4096×4096 NF4 GEMV (bs 64, f32 absmax): 8 MiB of codes + 1 MiB of absmax = 9.4 MB
//! read, 33.5 MFLOP. At ~10–20 GB/s of per-socket DRAM bandwidth on a small VM that is ~0.5–1 ms, and
//! 16.8 M weights per call leave a 2-core AVX-512 machine ~10 cycles per 16 weights: the kernel must
//! decode in a handful of vector ops per 16 weights or it becomes compute bound.
//!
//! Per 32 weights (16 packed bytes) the AVX-512 kernel does: one `vpmovzxbd` (16 bytes → 16 dwords),
//! one shift, two `vpermps` on a 16-entry LUT that is pre-multiplied by the block's absmax (so the
//! scaling costs one multiply per block, not per weight, and the decoded value `code[n]·absmax` is
//! bit-identical to bitsandbytes' dequantization), then two FMAs per token. `vpermps` only reads the
//! low 4 index bits, so the low nibble needs no mask. The high nibbles hold the even elements and the
//! low nibbles the odd ones; instead of interleaving the decoded weights, `x` is permuted once per call
//! (even elements of each 32-chunk first, then odd ones) — a 16 KB shuffle per token against 9.4 MB
//! of weight. Several rows (×4 at one token) are processed together for independent FMA chains, all
//! tokens share each decoded weight vector, and rayon splits the output rows. For 4–16 tokens the
//! columns are blocked so the x slice stays in L1 (16 tokens × 4096 f32 would otherwise stream from
//! L2 for every row), and a software prefetch runs 512 B ahead along the rows (2 KiB rows cross
//! pages every other row, which the hardware prefetchers handle poorly).
//!
//! Measured on the 2-core AVX-512 dev VM (shared with other builds, so noisy): the 1-token kernel
//! decodes ~40 G weights/s on one core when W is cache-resident (≈13 weights/cycle; the `vpermps`
//! port bound is ~11), so with W streamed from DRAM it is bandwidth-bound, not decode-bound.
//!
//! `dx = dy·W` (decode) splits the `in` columns into segments: each task streams every row's segment,
//! accumulating `dy[t, o]·W[o, seg]` into a small per-token accumulator that stays in L1, again in the
//! permuted (even/odd) order, un-permuted once at the end. No two tasks write the same output; when
//! there are fewer segments than 4× the threads, rows are also split and the partial sums added.
//!
//! # Batch path (> 16 tokens): dequantized panels + the `gemm` crate
//!
//! Forward: panels of ~128 W rows (≤ 2 MiB of f32, L2-sized) are dequantized and multiplied with the
//! `gemm` crate (one thread per panel, rayon over panels); the low-rank term is one more accumulating
//! gemm per panel (k = r). Backward: column panels of W (all rows, ~128 columns) so every task owns a
//! disjoint column slice of dx. The 4-bit decode costs ~1 ns per weight once per call, against
//! 2·tokens FLOPs per weight in the gemm: < 2% at 512 tokens.
//!
//! Everything that is not 32-aligned (`in % 32 != 0`, so rows start mid-byte or mid-chunk) goes
//! through the general path: decode a row (segment) with the block-run decoder into a scratch buffer,
//! then dot products. Same numerics, a few times slower.
//!
//! Files: `gemv.rs` (decode path), `panels.rs` (batch path), `avx512.rs` and `avx2.rs` (the SIMD inner
//! loops of the decode path), and here the weight views, the ISA choice and the entry points.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod bf16_gemm;
mod gemv;
mod panels;
mod transpose;

pub(crate) use gemv::{gemv_bwd, gemv_fwd};
use panels::{dense_gemm_bwd, dense_gemm_fwd};
#[cfg(target_arch = "x86_64")]
pub(crate) use transpose::tile8_avx;

use super::{Algo, BaseWeight, Problem};
use crate::error::{Error, Result};
use crate::quant::QuantizedTensor;
use crate::quant::cpu::Scales;
use crate::tensor::cpu::{SendPtr, gemm_f32};
use crate::tensor::{DType, Tensor, cpu as tcpu};
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;

/// Tokens up to which the decode (GEMV) kernels are used; above it the panel + gemm path.
pub(crate) const DECODE_MAX_TOKENS: usize = 16;

// ------------------------------------------------------------------------------------------------
// Weight views

/// A 4-bit weight `[rows, cols]` on the host.
#[derive(Clone, Copy)]
pub(crate) struct Q4<'a> {
    pub data: &'a [u8],
    pub lut: [f32; 16],
    pub bs: usize,
    pub scales: Scales<'a>,
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Q4<'a> {
    pub(crate) fn new(q: &'a QuantizedTensor) -> Result<Q4<'a>> {
        let op = "qmatmul";
        let scales = Scales::of(&q.state, op)?;
        Ok(Q4 {
            data: q.data.cpu_data::<u8>(op)?,
            lut: q.state.code,
            bs: q.state.blocksize,
            scales,
            rows: q.state.shape[0],
            cols: q.state.shape[1],
        })
    }

    /// The code book multiplied by the absmax of block `b`.
    #[inline(always)]
    fn scaled_lut(&self, b: usize) -> [f32; 16] {
        let s = self.scales.get(b);
        self.lut.map(|c| c * s)
    }

    /// True when the SIMD decode kernels apply: every row starts on a 16-byte chunk (`cols % 32 == 0`),
    /// so each 32-element chunk lies in one quantization block (blocksizes are multiples of 32).
    fn aligned(&self) -> bool {
        self.cols.is_multiple_of(32) && self.bs.is_multiple_of(32)
    }
}

/// Decodes the flat elements `[f0, f0 + out.len())` of a 4-bit tensor into `out` (f32), block run by
/// block run with a scaled LUT. The general-purpose decoder: any start parity, any length.
pub(crate) fn decode_flat(q: &Q4<'_>, f0: usize, out: &mut [f32]) {
    let end = f0 + out.len();
    let mut f = f0;
    let isa = Isa::get();
    while f < end {
        let b = f / q.bs;
        let run_end = ((b + 1) * q.bs).min(end);
        let ls = q.scaled_lut(b);
        let mut i = f - f0;
        let mut g = f;
        if g % 2 == 1 {
            out[i] = ls[(q.data[g / 2] & 15) as usize];
            g += 1;
            i += 1;
        }
        // g is even: whole bytes from g/2.
        let nbytes = (run_end - g) / 2;
        let bytes = &q.data[g / 2..g / 2 + nbytes];
        let dst = &mut out[i..i + 2 * nbytes];
        decode_bytes(isa, &ls, bytes, dst);
        g += 2 * nbytes;
        i += 2 * nbytes;
        if g < run_end {
            out[i] = ls[(q.data[g / 2] >> 4) as usize];
            g += 1;
        }
        f = g;
    }
}

/// `dst[2j] = ls[hi(bytes[j])]`, `dst[2j+1] = ls[lo(bytes[j])]`.
fn decode_bytes(isa: Isa, ls: &[f32; 16], bytes: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(dst.len(), 2 * bytes.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && bytes.len() >= 16 {
        // SAFETY: Isa::Avx512 is only selected after runtime detection of avx512f; the slices are
        // sized as the function requires (dst = 2 * bytes), checked above.
        done = unsafe { avx512::decode_bytes_avx512(ls, bytes, dst) };
    }
    let _ = isa;
    for (j, &byte) in bytes.iter().enumerate().skip(done) {
        dst[2 * j] = ls[(byte >> 4) as usize];
        dst[2 * j + 1] = ls[(byte & 15) as usize];
    }
}

/// Host view of a base weight.
pub(crate) enum WeightRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    Q4(Q4<'a>),
    KBit(crate::kbit::cpu::KView<'a>),
}

impl<'a> WeightRef<'a> {
    pub(crate) fn new(w: &'a BaseWeight) -> Result<WeightRef<'a>> {
        let op = "qmatmul";
        Ok(match w {
            BaseWeight::Dense(t) => match t.dtype() {
                DType::F32 => WeightRef::F32(t.cpu_data(op)?),
                DType::F16 => WeightRef::F16(t.cpu_data(op)?),
                DType::BF16 => WeightRef::BF16(t.cpu_data(op)?),
                d => return Err(Error::dtype(op, "a float dense weight", d)),
            },
            BaseWeight::Quantized(q) => WeightRef::Q4(Q4::new(q)?),
            BaseWeight::KBit(k) => WeightRef::KBit(crate::kbit::cpu::KView::new(k)?),
        })
    }

    /// Decodes `W[row, k0..k0 + out.len()]` to f32.
    pub(crate) fn decode_row_seg(&self, row: usize, cols: usize, k0: usize, out: &mut [f32]) {
        let f0 = row * cols + k0;
        match self {
            WeightRef::F32(w) => out.copy_from_slice(&w[f0..f0 + out.len()]),
            WeightRef::F16(w) => {
                use half::slice::HalfFloatSliceExt;
                w[f0..f0 + out.len()].convert_to_f32_slice(out)
            }
            WeightRef::BF16(w) => {
                use half::slice::HalfFloatSliceExt;
                w[f0..f0 + out.len()].convert_to_f32_slice(out)
            }
            WeightRef::Q4(q) => decode_flat(q, f0, out),
            WeightRef::KBit(k) => k.decode_flat(f0, out),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// ISA selection

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// The best instruction set of this CPU (detected once).
    pub(crate) fn get() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Small helpers

fn f32_of<'a>(t: &'a Tensor, op: &'static str) -> Result<Cow<'a, [f32]>> {
    Ok(match t.dtype() {
        DType::F32 => Cow::Borrowed(t.cpu_data::<f32>(op)?),
        DType::F16 => Cow::Owned(tcpu::to_f32_vec(t.cpu_data::<f16>(op)?)),
        DType::BF16 => Cow::Owned(tcpu::to_f32_vec(t.cpu_data::<bf16>(op)?)),
        d => return Err(Error::dtype(op, "a float dtype", d)),
    })
}

fn tensor_from_f32(v: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let dev = crate::Device::Cpu;
    match dtype {
        DType::F32 => Tensor::from_vec(v, shape, dev),
        DType::F16 => Tensor::from_vec(tcpu::from_f32_vec::<f16>(&v), shape, dev),
        DType::BF16 => Tensor::from_vec(tcpu::from_f32_vec::<bf16>(&v), shape, dev),
        d => Err(Error::dtype("qmatmul", "a float dtype", d)),
    }
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Tokens padded to a kernel instantiation.
fn padded_tokens(t: usize) -> usize {
    match t {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        5..=8 => 8,
        _ => 16,
    }
}

/// Columns per block of the forward GEMVs: the x slice of `n` tokens stays in L1 (32 KiB of
/// f32) while every row of the task streams past it; without it 16 tokens × 4096 f32 = 256 KiB
/// of x come from L2 for every row, and the kernel is L2-bound instead of DRAM-bound.
fn col_block(n: usize) -> usize {
    (8192 / n.max(1)).max(32)
}

// ------------------------------------------------------------------------------------------------
// Public entry points

/// All of W as f32 (parallel over 64 Ki-element chunks).
pub(crate) fn dequantize_f32(q: &Q4<'_>) -> Vec<f32> {
    let n = q.rows * q.cols;
    let mut v = vec![0f32; n];
    const CH: usize = 1 << 16;
    v.par_chunks_mut(CH)
        .enumerate()
        .for_each(|(i, c)| decode_flat(q, i * CH, c));
    v
}

/// `act` times W one way or the other, plus the low-rank term, in f32: forward `y = x·Wᵀ (+ u·bᵀ)`
/// `[tokens, out]`, backward `dx = dy·W (+ v·a)` `[tokens, in]`. The dequantize-then-gemm baseline when
/// `algo` asks for it, else the GEMVs up to [`DECODE_MAX_TOKENS`] tokens and the panels above.
fn product(
    act: &[f32],
    t: usize,
    w: &BaseWeight,
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
    algo: Algo,
    backward: bool,
) -> Result<Vec<f32>> {
    let (out, inp) = (w.out_features(), w.in_features());
    let w = WeightRef::new(w)?;
    let mut r = vec![0f32; t * if backward { inp } else { out }];
    if r.is_empty() {
        return Ok(r);
    }
    // The baseline: all of W dequantized to f32, then one gemm.
    let dequantized = match (&w, algo) {
        (WeightRef::Q4(q), Algo::DequantGemm) => Some(dequantize_f32(q)),
        _ => None,
    };
    let decode = dequantized.is_none() && t <= DECODE_MAX_TOKENS;
    let w = match &dequantized {
        Some(wf) => WeightRef::F32(wf),
        None => w,
    };
    if algo == Algo::Bf16 && !decode {
        bf16_product(act, t, &w, (out, inp), lr, rank, backward, &mut r);
        return Ok(r);
    }
    match (backward, decode) {
        (false, true) => gemv_fwd(&w, act, t, out, inp, &mut r, lr, rank),
        (false, false) => dense_gemm_fwd(act, &w, t, out, inp, &mut r, lr, rank),
        (true, true) => gemv_bwd(&w, act, t, out, inp, &mut r, lr, rank),
        (true, false) => dense_gemm_bwd(act, &w, t, out, inp, &mut r, lr, rank),
    }
    Ok(r)
}

/// [`product`] in bf16 compute ([`Algo::Bf16`]): the frozen product with the bf16 kernels, then the
/// low-rank term in f32 (`r += u·bᵀ` forward, `r += v·a` backward).
#[allow(clippy::too_many_arguments)]
fn bf16_product(
    act: &[f32],
    t: usize,
    w: &WeightRef<'_>,
    (out, inp): (usize, usize),
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
    backward: bool,
    r: &mut [f32],
) {
    let kern = bf16_gemm::Kern::best();
    if backward {
        bf16_gemm::bwd(kern, act, w, t, out, inp, r);
    } else {
        bf16_gemm::fwd(kern, act, w, t, out, inp, r);
    }
    let Some((lhs, rhs)) = lr else { return };
    let n = if backward { inp } else { out };
    // Forward: rhs = b [out, rank] read as bᵀ [rank, out] (row stride 1, column stride rank);
    // backward: rhs = a [rank, inp] row-major.
    let (rs, cs) = if backward { (inp, 1) } else { (1, rank) };
    let par = tcpu::gemm_parallelism(t, n, rank);
    // SAFETY: lhs [t, rank], rhs as described above, r [t, n]; all in bounds by the caller's checks.
    unsafe {
        gemm_f32(
            t,
            n,
            rank,
            r.as_mut_ptr(),
            n,
            true,
            lhs.as_ptr(),
            rank,
            1,
            rhs.as_ptr(),
            rs,
            cs,
            par,
        );
    }
}

/// The problem's f32 activations and low-rank pair.
type F32Operands<'a> = (Cow<'a, [f32]>, Option<(Cow<'a, [f32]>, Cow<'a, [f32]>)>);

fn f32_operands<'a>(p: &Problem<'a>, op: &'static str) -> Result<F32Operands<'a>> {
    let lr = match p.low_rank {
        Some((u, b)) if p.rank > 0 => Some((f32_of(u, op)?, f32_of(b, op)?)),
        _ => None,
    };
    Ok((f32_of(p.act, op)?, lr))
}

pub(crate) fn forward(p: &Problem<'_>) -> Result<Tensor> {
    let op = "linear_forward";
    let (x, lr) = f32_operands(p, op)?;
    let lr = lr.as_ref().map(|(u, b)| (&u[..], &b[..]));
    let bias = p.bias.map(|b| f32_of(b, op)).transpose()?;
    let y = forward_f32(&x, p.tokens, p.w, bias.as_deref(), lr, p.rank, p.algo)?;
    tensor_from_f32(y, &[p.tokens, p.out], p.act.dtype())
}

/// [`forward`] on f32 slices the caller has checked (`x [t, in]`, `bias [out]`, `lr = (u [t, r],
/// b [out, r])`): `y [t, out]` as a fresh Vec. Host frameworks call it on their own buffers.
pub(crate) fn forward_f32(
    x: &[f32],
    t: usize,
    w: &BaseWeight,
    bias: Option<&[f32]>,
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
    algo: Algo,
) -> Result<Vec<f32>> {
    let out = w.out_features();
    let mut y = product(x, t, w, lr, rank, algo, false)?;
    if let Some(b) = bias
        && !y.is_empty()
    {
        y.par_chunks_mut(out).for_each(|row| {
            row.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
        });
    }
    Ok(y)
}

pub(crate) fn backward_input(p: &Problem<'_>) -> Result<Tensor> {
    let (dy, lr) = f32_operands(p, "linear_backward_input")?;
    let lr = lr.as_ref().map(|(v, a)| (&v[..], &a[..]));
    let dx = backward_input_f32(&dy, p.tokens, p.w, lr, p.rank, p.algo)?;
    tensor_from_f32(dx, &[p.tokens, p.inp], p.act.dtype())
}

/// [`backward_input`] on f32 slices the caller has checked (`dy [t, out]`, `lr = (v [t, r],
/// a [r, in])`): `dx [t, in]` as a fresh Vec.
pub(crate) fn backward_input_f32(
    dy: &[f32],
    t: usize,
    w: &BaseWeight,
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
    algo: Algo,
) -> Result<Vec<f32>> {
    product(dy, t, w, lr, rank, algo, true)
}
