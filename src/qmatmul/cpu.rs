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
        done = unsafe { x86::decode_bytes_avx512(ls, bytes, dst) };
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

// ------------------------------------------------------------------------------------------------
// Public entry points

pub(crate) fn dequantize(q: &QuantizedTensor, dtype: DType) -> Result<Tensor> {
    let q4 = Q4::new(q)?;
    let shape = [q4.rows, q4.cols];
    // Half outputs are decoded through an L1-sized f32 scratch per chunk, never a full f32 copy.
    fn go<T: crate::tensor::Element>(q: &Q4<'_>, conv: impl Fn(&[f32], &mut [T]) + Sync) -> Vec<T> {
        const CH: usize = 1 << 13;
        let mut out = vec![T::default(); q.rows * q.cols];
        out.par_chunks_mut(CH).enumerate().for_each_init(
            || vec![0f32; CH],
            |buf, (i, c)| {
                let b = &mut buf[..c.len()];
                decode_flat(q, i * CH, b);
                conv(b, c);
            },
        );
        out
    }
    use half::slice::HalfFloatSliceExt;
    let dev = crate::Device::Cpu;
    match dtype {
        DType::F32 => Tensor::from_vec(dequantize_f32(&q4), &shape, dev),
        DType::F16 => Tensor::from_vec(go::<f16>(&q4, |s, d| d.convert_from_f32_slice(s)), &shape, dev),
        DType::BF16 => Tensor::from_vec(go::<bf16>(&q4, |s, d| d.convert_from_f32_slice(s)), &shape, dev),
        d => Err(Error::dtype("dequantize", "a float dtype", d)),
    }
}

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

pub(crate) fn forward(p: &Problem<'_>) -> Result<Tensor> {
    let op = "linear_forward";
    let x = f32_of(p.act, op)?;
    let w = WeightRef::new(p.w)?;
    let (t, out, inp) = (p.tokens, p.out, p.inp);
    let mut y = vec![0f32; t * out];
    let lr = match p.low_rank {
        Some((u, b)) if p.rank > 0 => Some((f32_of(u, op)?, f32_of(b, op)?)),
        _ => None,
    };
    let lr = lr.as_ref().map(|(u, b)| (&u[..], &b[..]));
    let bias = p.bias.map(|b| f32_of(b, op)).transpose()?;
    let bias = bias.as_deref();
    if t > 0 && out > 0 {
        // The baseline: all of W dequantized to f32, then one gemm.
        let dequantized = match (&w, p.algo) {
            (WeightRef::Q4(q), Algo::DequantGemm) => Some(dequantize_f32(q)),
            _ => None,
        };
        if let Some(wf) = &dequantized {
            dense_gemm_fwd(&x, &WeightRef::F32(wf), t, out, inp, &mut y, lr, p.rank);
        } else if t <= DECODE_MAX_TOKENS {
            gemv_fwd(&w, &x, t, out, inp, &mut y, lr, p.rank);
        } else {
            dense_gemm_fwd(&x, &w, t, out, inp, &mut y, lr, p.rank);
        }
        if let Some(b) = bias {
            y.par_chunks_mut(out).for_each(|row| {
                row.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
            });
        }
    }
    tensor_from_f32(y, &[t, out], p.act.dtype())
}

pub(crate) fn backward_input(p: &Problem<'_>) -> Result<Tensor> {
    let op = "linear_backward_input";
    let dy = f32_of(p.act, op)?;
    let w = WeightRef::new(p.w)?;
    let (t, out, inp) = (p.tokens, p.out, p.inp);
    let mut dx = vec![0f32; t * inp];
    let lr = match p.low_rank {
        Some((v, a)) if p.rank > 0 => Some((f32_of(v, op)?, f32_of(a, op)?)),
        _ => None,
    };
    let lr = lr.as_ref().map(|(v, a)| (&v[..], &a[..]));
    if t > 0 && inp > 0 {
        let dequantized = match (&w, p.algo) {
            (WeightRef::Q4(q), Algo::DequantGemm) => Some(dequantize_f32(q)),
            _ => None,
        };
        if let Some(wf) = &dequantized {
            dense_gemm_bwd(&dy, &WeightRef::F32(wf), t, out, inp, &mut dx, lr, p.rank);
        } else if t <= DECODE_MAX_TOKENS {
            gemv_bwd(&w, &dy, t, out, inp, &mut dx, lr, p.rank);
        } else {
            dense_gemm_bwd(&dy, &w, t, out, inp, &mut dx, lr, p.rank);
        }
    }
    tensor_from_f32(dx, &[t, inp], p.act.dtype())
}

// ------------------------------------------------------------------------------------------------
// Decode path, forward: y[t, o] = Σ_k W[o, k] x[t, k] (+ u[t]·b[o])

/// Below about a million multiply-adds a GEMV runs on the calling thread: handing it to the rayon pool
/// wakes the workers and parks the caller, tens of µs on the 2-core dev VM (measured with `perf`: ~40%
/// of a 512 x 2048 one-token call), more than the second core saves.
fn inline_is_faster(macs: usize) -> bool {
    macs < 1 << 20 || threads() == 1
}

/// Rows per rayon task: ≥ 8 tasks per thread for balance, ≥ 16 rows to amortize setup.
fn rows_per_task(rows: usize) -> usize {
    (rows / (8 * threads())).clamp(16, 256).next_multiple_of(4)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_fwd(
    w: &WeightRef<'_>,
    x: &[f32],
    t: usize,
    out: usize,
    inp: usize,
    y: &mut [f32],
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
) {
    let n = padded_tokens(t);
    let isa = Isa::get();
    // The SIMD 4-bit kernel wants x permuted (even elements of each 32-chunk, then odd ones).
    let q4_simd = matches!(w, WeightRef::Q4(q) if q.aligned()) && isa != Isa::Scalar;
    let mut xs = vec![0f32; n * inp];
    for ti in 0..t {
        let src = &x[ti * inp..(ti + 1) * inp];
        let dst = &mut xs[ti * inp..(ti + 1) * inp];
        if q4_simd {
            permute_even_odd(src, dst);
        } else {
            dst.copy_from_slice(src);
        }
    }
    // yt[o * n + t]: rows are the parallel dimension, so tasks own contiguous output slices.
    let mut yt = vec![0f32; out * n];
    let rpt = rows_per_task(out);
    let task = |(ci, yc): (usize, &mut [f32])| {
        let r0 = ci * rpt;
        let nr = yc.len() / n;
        gemv_fwd_rows(w, isa, q4_simd, &xs, n, inp, r0, nr, yc);
        if let Some((u, b)) = lr {
            for (i, yrow) in yc.chunks_mut(n).enumerate() {
                let brow = &b[(r0 + i) * rank..(r0 + i + 1) * rank];
                for (ti, yv) in yrow.iter_mut().enumerate().take(t) {
                    let urow = &u[ti * rank..(ti + 1) * rank];
                    *yv += dot(urow, brow);
                }
            }
        }
    };
    if inline_is_faster(out * inp * n) {
        yt.chunks_mut(rpt * n).enumerate().for_each(task);
    } else {
        yt.par_chunks_mut(rpt * n).enumerate().for_each(task);
    }
    for ti in 0..t {
        for o in 0..out {
            y[ti * out + o] = yt[o * n + ti];
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums: vectorizes and keeps the error ~ sqrt(len) ulps.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Within each 32-element chunk: even elements first, then odd ones (the order in which the
/// SIMD kernels decode high and low nibbles). `len % 32 == 0`.
fn permute_even_odd(src: &[f32], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
        for j in 0..16 {
            d[j] = s[2 * j];
            d[16 + j] = s[2 * j + 1];
        }
    }
}

fn unpermute_even_odd(src: &[f32], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
        for j in 0..16 {
            d[2 * j] = s[j];
            d[2 * j + 1] = s[16 + j];
        }
    }
}

/// Rows `[r0, r0 + nr)` of the GEMV into `yt[(o - r0) * n + t]`.
#[allow(clippy::too_many_arguments)]
fn gemv_fwd_rows(
    w: &WeightRef<'_>,
    isa: Isa,
    q4_simd: bool,
    xs: &[f32],
    n: usize,
    inp: usize,
    r0: usize,
    nr: usize,
    yt: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (all calls below): the ISA was detected at runtime; xs holds n*inp, yt holds nr*n
        // values and rows r0..r0+nr exist in the weight (checked by the chunking in the caller).
        match (w, isa) {
            (WeightRef::Q4(q), Isa::Avx512) if q4_simd => {
                return unsafe { x86::q4_fwd_avx512_dispatch(q, xs, n, r0, nr, yt) };
            }
            (WeightRef::Q4(q), Isa::Avx2) if q4_simd => {
                return unsafe { x86::q4_fwd_avx2_dispatch(q, xs, n, r0, nr, yt) };
            }
            (WeightRef::BF16(d), Isa::Avx512) => {
                return unsafe { x86::dense_fwd_avx512_dispatch(d, inp, xs, n, r0, nr, yt) };
            }
            (WeightRef::F16(d), Isa::Avx512) => {
                return unsafe { x86::dense_fwd_avx512_dispatch(d, inp, xs, n, r0, nr, yt) };
            }
            (WeightRef::F32(d), Isa::Avx512) => {
                return unsafe { x86::dense_fwd_avx512_dispatch(d, inp, xs, n, r0, nr, yt) };
            }
            _ => {}
        }
    }
    let _ = (isa, q4_simd);
    // General path: decode one row into L1-resident scratch, then one dot product per token.
    let mut row = vec![0f32; inp];
    for i in 0..nr {
        w.decode_row_seg(r0 + i, inp, 0, &mut row);
        for ti in 0..n {
            yt[i * n + ti] = dot(&row, &xs[ti * inp..(ti + 1) * inp]);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Decode path, backward: dx[t, k] = Σ_o dy[t, o] W[o, k] (+ v[t]·a[:, k])

#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_bwd(
    w: &WeightRef<'_>,
    dy: &[f32],
    t: usize,
    out: usize,
    inp: usize,
    dx: &mut [f32],
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
) {
    let n = padded_tokens(t);
    let isa = Isa::get();
    let q4_simd = matches!(w, WeightRef::Q4(q) if q.aligned()) && isa != Isa::Scalar;
    // dyT[o * n + t]: per row, the n token weights are adjacent (broadcast-friendly).
    let mut dyt = vec![0f32; out * n];
    for ti in 0..t {
        for o in 0..out {
            dyt[o * n + ti] = dy[ti * out + o];
        }
    }
    // Column segments of `seg` (a multiple of 32, ≤ 1024 so n×seg f32 fits L1/L2); row groups when
    // there are too few segments for the threads.
    let want_tasks = 4 * threads();
    let seg = (inp.div_ceil(want_tasks)).next_multiple_of(32).clamp(128, 1024);
    let nseg = inp.div_ceil(seg);
    let groups = want_tasks.div_ceil(nseg).clamp(1, out.div_ceil(64).max(1));
    let rows_per_group = out.div_ceil(groups);
    let inline = inline_is_faster(out * inp * n);
    let partial = |task: usize| {
        let (s, g) = (task % nseg, task / nseg);
        let k0 = s * seg;
        let len = seg.min(inp - k0);
        let o0 = (g * rows_per_group).min(out);
        let o1 = ((g + 1) * rows_per_group).min(out);
        let mut acc = vec![0f32; n * len];
        gemv_bwd_seg(w, isa, q4_simd, &dyt, n, inp, o0, o1, k0, len, &mut acc);
        acc
    };
    let partials: Vec<Vec<f32>> = if inline {
        (0..nseg * groups).map(partial).collect()
    } else {
        (0..nseg * groups).into_par_iter().map(partial).collect()
    };
    // Reduce the row groups, un-permute, add the low-rank term; disjoint column slices per task.
    let dxp = SendPtr(dx.as_mut_ptr());
    let reduce = |s: usize| {
        let k0 = s * seg;
        let len = seg.min(inp - k0);
        let mut sum = partials[s].clone();
        for g in 1..groups {
            for (a, b) in sum.iter_mut().zip(&partials[g * nseg + s]) {
                *a += *b;
            }
        }
        let mut tmp = vec![0f32; len];
        for ti in 0..t {
            let src = &sum[ti * len..(ti + 1) * len];
            if q4_simd {
                unpermute_even_odd(src, &mut tmp);
            } else {
                tmp.copy_from_slice(src);
            }
            if let Some((v, a)) = lr {
                for j in 0..rank {
                    let vj = v[ti * rank + j];
                    let arow = &a[j * inp + k0..j * inp + k0 + len];
                    for (d, &av) in tmp.iter_mut().zip(arow) {
                        *d += vj * av;
                    }
                }
            }
            // SAFETY: task s writes only dx[ti, k0..k0+len]; segments are disjoint and in bounds
            // (k0 + len <= inp, ti < t, dx holds t * inp).
            let dst = unsafe { std::slice::from_raw_parts_mut(dxp.get().add(ti * inp + k0), len) };
            dst.copy_from_slice(&tmp);
        }
    };
    if inline {
        (0..nseg).for_each(reduce);
    } else {
        (0..nseg).into_par_iter().for_each(reduce);
    }
}

/// Rows `[o0, o1)`, columns `[k0, k0 + len)`: `acc[t * len + j] += Σ_o dy[t, o] W[o, k0 + j]`
/// (in the permuted order for the SIMD 4-bit kernels).
#[allow(clippy::too_many_arguments)]
fn gemv_bwd_seg(
    w: &WeightRef<'_>,
    isa: Isa,
    q4_simd: bool,
    dyt: &[f32],
    n: usize,
    inp: usize,
    o0: usize,
    o1: usize,
    k0: usize,
    len: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (all calls below): ISA detected at runtime; acc holds n*len, dyt holds out*n values,
        // rows o0..o1 and columns k0..k0+len exist; for 4-bit k0 and len are multiples of 32.
        match (w, isa) {
            (WeightRef::Q4(q), Isa::Avx512) if q4_simd => {
                return unsafe { x86::q4_bwd_avx512_dispatch(q, dyt, n, o0, o1, k0, len, acc) };
            }
            (WeightRef::Q4(q), Isa::Avx2) if q4_simd => {
                return unsafe { x86::q4_bwd_avx2_dispatch(q, dyt, n, o0, o1, k0, len, acc) };
            }
            (WeightRef::BF16(d), Isa::Avx512) => {
                return unsafe { x86::dense_bwd_avx512_dispatch(d, inp, dyt, n, o0, o1, k0, len, acc) };
            }
            (WeightRef::F16(d), Isa::Avx512) => {
                return unsafe { x86::dense_bwd_avx512_dispatch(d, inp, dyt, n, o0, o1, k0, len, acc) };
            }
            (WeightRef::F32(d), Isa::Avx512) => {
                return unsafe { x86::dense_bwd_avx512_dispatch(d, inp, dyt, n, o0, o1, k0, len, acc) };
            }
            _ => {}
        }
    }
    let _ = (isa, q4_simd);
    let mut row = vec![0f32; len];
    for o in o0..o1 {
        w.decode_row_seg(o, inp, k0, &mut row);
        for ti in 0..n {
            let d = dyt[o * n + ti];
            if d == 0.0 {
                continue;
            }
            for (a, &wv) in acc[ti * len..(ti + 1) * len].iter_mut().zip(&row) {
                *a += d * wv;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Batch path: panels + gemm

/// y[t, o] = x·Wᵀ (+ u·bᵀ). f32 dense W goes straight to gemm; other formats in decoded row panels.
#[allow(clippy::too_many_arguments)]
fn dense_gemm_fwd(
    x: &[f32],
    w: &WeightRef<'_>,
    t: usize,
    out: usize,
    inp: usize,
    y: &mut [f32],
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
) {
    if let WeightRef::F32(wf) = w {
        let par = tcpu::gemm_parallelism(t, out, inp);
        // SAFETY: x is [t, inp], wf is [out, inp] read transposed (rs 1, cs inp), y is [t, out].
        unsafe {
            gemm_f32(
                t,
                out,
                inp,
                y.as_mut_ptr(),
                out,
                false,
                x.as_ptr(),
                inp,
                1,
                wf.as_ptr(),
                1,
                inp,
                par,
            );
            if let Some((u, b)) = lr {
                gemm_f32(
                    t,
                    out,
                    rank,
                    y.as_mut_ptr(),
                    out,
                    true,
                    u.as_ptr(),
                    rank,
                    1,
                    b.as_ptr(),
                    1,
                    rank,
                    par,
                );
            }
        }
        return;
    }
    // Panel of P rows: P × inp f32 ≤ ~2 MiB (one L2), at least 32 rows for an efficient gemm.
    let p = ((1usize << 19) / inp.max(1)).clamp(32, 256).next_multiple_of(16);
    let np = out.div_ceil(p);
    let yp = SendPtr(y.as_mut_ptr());
    (0..np)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, pi| {
            let o0 = pi * p;
            let rows = p.min(out - o0);
            buf.resize(rows * inp, 0.0);
            decode_rows(w, o0, inp, buf);
            // SAFETY: this task writes only the columns o0..o0+rows of y ([t, out], row stride out);
            // panels are disjoint. buf is [rows, inp] read transposed; u [t, rank]; b rows o0.. of [out, rank].
            unsafe {
                let dst = yp.get().add(o0);
                gemm_f32(
                    t,
                    rows,
                    inp,
                    dst,
                    out,
                    false,
                    x.as_ptr(),
                    inp,
                    1,
                    buf.as_ptr(),
                    1,
                    inp,
                    gemm::Parallelism::None,
                );
                if let Some((u, b)) = lr {
                    let bp = b.as_ptr().add(o0 * rank);
                    gemm_f32(
                        t,
                        rows,
                        rank,
                        dst,
                        out,
                        true,
                        u.as_ptr(),
                        rank,
                        1,
                        bp,
                        1,
                        rank,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
}

/// Rows `[o0, o0 + rows)` of W into `buf` ([rows, inp], f32).
fn decode_rows(w: &WeightRef<'_>, o0: usize, inp: usize, buf: &mut [f32]) {
    match w {
        // Contiguous flat range: one call decodes the whole panel.
        WeightRef::Q4(q) => decode_flat(q, o0 * inp, buf),
        _ => {
            for (i, r) in buf.chunks_mut(inp).enumerate() {
                w.decode_row_seg(o0 + i, inp, 0, r);
            }
        }
    }
}

/// dx[t, k] = dy·W (+ v·a). Column panels of W so that tasks own disjoint column slices of dx.
#[allow(clippy::too_many_arguments)]
fn dense_gemm_bwd(
    dy: &[f32],
    w: &WeightRef<'_>,
    t: usize,
    out: usize,
    inp: usize,
    dx: &mut [f32],
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
) {
    if let WeightRef::F32(wf) = w {
        let par = tcpu::gemm_parallelism(t, inp, out);
        // SAFETY: dy [t, out], wf [out, inp], dx [t, inp]; v [t, rank], a [rank, inp].
        unsafe {
            gemm_f32(
                t,
                inp,
                out,
                dx.as_mut_ptr(),
                inp,
                false,
                dy.as_ptr(),
                out,
                1,
                wf.as_ptr(),
                inp,
                1,
                par,
            );
            if let Some((v, a)) = lr {
                gemm_f32(
                    t,
                    inp,
                    rank,
                    dx.as_mut_ptr(),
                    inp,
                    true,
                    v.as_ptr(),
                    rank,
                    1,
                    a.as_ptr(),
                    inp,
                    1,
                    par,
                );
            }
        }
        return;
    }
    // Column panel: out × kc f32 ≤ ~2 MiB.
    let kc = ((1usize << 19) / out.max(1)).clamp(32, 512).next_multiple_of(32);
    let np = inp.div_ceil(kc);
    let dxp = SendPtr(dx.as_mut_ptr());
    (0..np)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, pi| {
            let k0 = pi * kc;
            let cols = kc.min(inp - k0);
            buf.resize(out * cols, 0.0);
            for (o, r) in buf.chunks_mut(cols).enumerate() {
                w.decode_row_seg(o, inp, k0, r);
            }
            // SAFETY: this task writes only the columns k0..k0+cols of dx ([t, inp]); panels are disjoint.
            // buf is [out, cols]; a is [rank, inp] (columns k0.. with row stride inp).
            unsafe {
                let dst = dxp.get().add(k0);
                gemm_f32(
                    t,
                    cols,
                    out,
                    dst,
                    inp,
                    false,
                    dy.as_ptr(),
                    out,
                    1,
                    buf.as_ptr(),
                    cols,
                    1,
                    gemm::Parallelism::None,
                );
                if let Some((v, a)) = lr {
                    gemm_f32(
                        t,
                        cols,
                        rank,
                        dst,
                        inp,
                        true,
                        v.as_ptr(),
                        rank,
                        1,
                        a.as_ptr().add(k0),
                        inp,
                        1,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
}

// ------------------------------------------------------------------------------------------------
// x86 SIMD kernels

/// Register-blocked kernels index their accumulator arrays by (row, token): index loops are clearer.
#[cfg(target_arch = "x86_64")]
// The AVX-512 intrinsics are stable since Rust 1.89, newer than the crate's declared rust-version
// (1.85): building this module needs 1.89+ (reported to the lead; bumping rust-version turns on
// MSRV-gated lints crate-wide).
#[allow(clippy::needless_range_loop, clippy::incompatible_msrv)]
mod x86 {
    use super::Q4;
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// Number of bytes decoded (a multiple of 16); the caller finishes the tail.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn decode_bytes_avx512(ls: &[f32; 16], bytes: &[u8], dst: &mut [f32]) -> usize {
        let lut = unsafe { _mm512_loadu_ps(ls.as_ptr()) };
        // Interleave (hi[j], lo[j]): permutex2var picks table b for index bit 4.
        let i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let i1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let nb = bytes.len() / 16 * 16;
        let mut j = 0;
        while j < nb {
            // SAFETY: j + 16 <= bytes.len() and 2 * (j + 16) <= dst.len().
            unsafe {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.as_ptr().add(j) as *const __m128i));
                let lo = _mm512_permutexvar_ps(v, lut);
                let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut);
                _mm512_storeu_ps(dst.as_mut_ptr().add(2 * j), _mm512_permutex2var_ps(hi, i0, lo));
                _mm512_storeu_ps(
                    dst.as_mut_ptr().add(2 * j + 16),
                    _mm512_permutex2var_ps(hi, i1, lo),
                );
            }
            j += 16;
        }
        nb
    }

    /// The scaled LUT for block `b` as a vector.
    #[inline(always)]
    fn lut512(q: &Q4<'_>, b: usize) -> __m512 {
        // One vector multiply (the same f32 products as `scaled_lut`), not a table built in a stack
        // array and reloaded as a vector.
        // SAFETY: q.lut is 16 f32; avx512f is enabled in every caller (this is inlined into them).
        unsafe { _mm512_mul_ps(_mm512_loadu_ps(q.lut.as_ptr()), _mm512_set1_ps(q.scales.get(b))) }
    }

    /// Software prefetch distance in 16-byte chunks (512 B ahead, one prefetch per 64-byte line). The
    /// kernels stream 2-4 rows at once whose 2 KiB rows cross 4 KiB pages every other row; measured on
    /// the 2-core dev VM (4096² NF4, 1 token, 1 GiB rotation) it cut the median from ~2.9 ms to
    /// ~1.6 ms; 1 KiB and 2 KiB ahead were worse.
    const PF: usize = 32;
    /// A second, farther prefetch into L2 only (4 KiB ahead) for the forward GEMV. The near one alone
    /// is capped by the ~16 L1 fill buffers a core has, while the decode's ~12 cycles of work per
    /// 64-byte line leave DRAM latency exposed; `prefetcht1` requests queue at L2 instead, and the L1
    /// prefetch then hits L2. Same VM, same case, alternating runs: 0.84-1.18 ms against 1.38-1.77 ms
    /// without it (2 KiB, 6 KiB and 8 KiB ahead were no better).
    const PF_L2: usize = 256;
    /// Bytes ahead for the dense kernels' prefetch.
    const PF_BYTES: usize = 512;
    /// Forward 4-bit GEMV over R rows at a time and N tokens. `xs` is permuted even/odd per chunk.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q4_fwd_avx512<const R: usize, const N: usize>(
        q: &Q4<'_>,
        xs: &[f32],
        r0: usize,
        nr: usize,
        c0: usize,
        c1: usize,
        yt: &mut [f32],
    ) {
        let inp = q.cols;
        let cpr = inp / 32; // 16-byte chunks per row
        let shift = (q.bs / 32).trailing_zeros(); // chunk -> block
        debug_assert!(nr.is_multiple_of(R) && xs.len() >= N * inp && yt.len() >= nr * N);
        let data = q.data.as_ptr();
        let xp = xs.as_ptr();
        let mut i = 0;
        while i < nr {
            let mut acc = [[_mm512_setzero_ps(); N]; R];
            let mut cur = [usize::MAX; R];
            let mut lut = [_mm512_setzero_ps(); R];
            let base: [usize; R] = std::array::from_fn(|r| (r0 + i + r) * cpr);
            for c in c0..c1 {
                for r in 0..R {
                    let g = base[r] + c;
                    let b = g >> shift;
                    if b != cur[r] {
                        cur[r] = b;
                        lut[r] = lut512(q, b);
                    }
                    // SAFETY: chunk g < rows*cols/32, so bytes 16g..16g+16 are in the packed data;
                    // x offsets t*inp + 32c + 32 <= N*inp. A prefetch never faults.
                    unsafe {
                        if c % 4 == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(data.wrapping_add((g + PF) * 16) as *const i8);
                            _mm_prefetch::<_MM_HINT_T1>(data.wrapping_add((g + PF_L2) * 16) as *const i8);
                        }
                        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(data.add(g * 16) as *const __m128i));
                        let wl = _mm512_permutexvar_ps(v, lut[r]);
                        let wh = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut[r]);
                        for t in 0..N {
                            let xe = _mm512_loadu_ps(xp.add(t * inp + 32 * c));
                            let xo = _mm512_loadu_ps(xp.add(t * inp + 32 * c + 16));
                            acc[r][t] = _mm512_fmadd_ps(wh, xe, acc[r][t]);
                            acc[r][t] = _mm512_fmadd_ps(wl, xo, acc[r][t]);
                        }
                    }
                }
            }
            for r in 0..R {
                for t in 0..N {
                    yt[(i + r) * N + t] += _mm512_reduce_add_ps(acc[r][t]);
                }
            }
            i += R;
        }
    }

    /// The one-token forward GEMV (decode), rows `r0..r0 + nr`, column chunks `c0..c1`: one row at a
    /// time as a single sequential stream, 64-byte lines (128 weights) unrolled with their software
    /// prefetches, `L` scaled tables per line (4 / chunks-per-block, at least 1) and 4 independent
    /// accumulators. Per 32 weights: 1 load+`vpmovzxbd`, 2 `vpermps`, 1 shift, 2 FMAs; the three
    /// port-5 µops bound it at ~3 cycles. Measured on the dev VM, one core, L2-resident: 3.1 cycles per
    /// 32 weights (~27 G weights/s at 2.6 GHz) against 5.5-6.5 with a single FMA chain. In the 4096²
    /// decode, weights from DRAM, latency dominates and the gain over the generic R x N kernel is
    /// 10-15% (min 642-652 µs against 716-1034 µs, alternating runs).
    #[target_feature(enable = "avx512f")]
    unsafe fn q4_gemv1_avx512<const L: usize>(
        q: &Q4<'_>,
        xs: &[f32],
        r0: usize,
        nr: usize,
        c0: usize,
        c1: usize,
        yt: &mut [f32],
    ) {
        let cpr = q.cols / 32;
        let shift = (q.bs / 32).trailing_zeros(); // chunk -> block
        debug_assert!(xs.len() >= q.cols && yt.len() >= nr && c1 <= cpr);
        let data = q.data.as_ptr();
        let xp = xs.as_ptr();
        // SAFETY (whole body): rows r0..r0+nr exist and c0 <= c < c1 <= cpr, so chunk g = row + c
        // has its 16 bytes inside the packed data and x offsets 32c + 32 <= cols; block g >> shift
        // exists. A prefetch never faults.
        unsafe {
            // The table of chunk g's block.
            macro_rules! lut {
                ($g:expr) => {
                    lut512(q, ($g) >> shift)
                };
            }
            for (i, y) in yt.iter_mut().enumerate().take(nr) {
                let row = (r0 + i) * cpr;
                let mut a = [_mm512_setzero_ps(); 4];
                macro_rules! chunk {
                    ($c:expr, $lut:expr, $p:literal) => {{
                        let c = $c;
                        let v =
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(data.add((row + c) * 16) as *const __m128i));
                        let wl = _mm512_permutexvar_ps(v, $lut);
                        let wh = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), $lut);
                        a[2 * $p] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xp.add(32 * c)), a[2 * $p]);
                        a[2 * $p + 1] =
                            _mm512_fmadd_ps(wl, _mm512_loadu_ps(xp.add(32 * c + 16)), a[2 * $p + 1]);
                    }};
                }
                let mut c = c0;
                // Up to the first 64-byte line, where lines and blocks align.
                while c < c1 && !(row + c).is_multiple_of(4) {
                    chunk!(c, lut!(row + c), 0);
                    c += 1;
                }
                while c + 4 <= c1 {
                    let g = row + c;
                    _mm_prefetch::<_MM_HINT_T0>(data.wrapping_add((g + PF) * 16) as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(data.wrapping_add((g + PF_L2) * 16) as *const i8);
                    let l0 = lut!(g);
                    let l1 = if L == 4 { lut!(g + 1) } else { l0 };
                    let l2 = if L >= 2 { lut!(g + 2) } else { l0 };
                    let l3 = if L == 4 { lut!(g + 3) } else { l2 };
                    chunk!(c, l0, 0);
                    chunk!(c + 1, l1, 1);
                    chunk!(c + 2, l2, 0);
                    chunk!(c + 3, l3, 1);
                    c += 4;
                }
                while c < c1 {
                    chunk!(c, lut!(row + c), 0);
                    c += 1;
                }
                let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                *y += _mm512_reduce_add_ps(s);
            }
        }
    }

    /// # Safety
    /// avx512f available; `xs` holds `n * q.cols` permuted values; `yt` holds `nr * n`; rows exist.
    pub(super) unsafe fn q4_fwd_avx512_dispatch(
        q: &Q4<'_>,
        xs: &[f32],
        n: usize,
        r0: usize,
        nr: usize,
        yt: &mut [f32],
    ) {
        let cpr = q.cols / 32;
        let cb = col_block(n) / 32;
        macro_rules! go {
            ($r:literal, $n:literal) => {{
                let bulk = nr / $r * $r;
                for c0 in (0..cpr).step_by(cb) {
                    let c1 = (c0 + cb).min(cpr);
                    // SAFETY: forwarded from the caller's contract; bulk and tail cover nr rows,
                    // the column blocks cover every chunk of the row.
                    unsafe {
                        q4_fwd_avx512::<$r, $n>(q, xs, r0, bulk, c0, c1, &mut yt[..bulk * $n]);
                        q4_fwd_avx512::<1, $n>(q, xs, r0 + bulk, nr - bulk, c0, c1, &mut yt[bulk * $n..]);
                    }
                }
            }};
        }
        if n == 1 {
            for c0 in (0..cpr).step_by(cb) {
                let c1 = (c0 + cb).min(cpr);
                // SAFETY: forwarded from the caller's contract; the column blocks cover every chunk.
                unsafe {
                    match q.bs / 32 {
                        1 => q4_gemv1_avx512::<4>(q, xs, r0, nr, c0, c1, yt),
                        2 => q4_gemv1_avx512::<2>(q, xs, r0, nr, c0, c1, yt),
                        _ => q4_gemv1_avx512::<1>(q, xs, r0, nr, c0, c1, yt),
                    }
                }
            }
            return;
        }
        // Accumulators R x N stay <= 8 zmm (R > 1 also keeps shared x vectors in registers).
        match n {
            2 => go!(4, 2),
            4 => go!(2, 4),
            8 => go!(1, 8),
            _ => go!(1, 16),
        }
    }

    /// Columns per block of the forward GEMVs: the x slice of `n` tokens stays in L1 (32 KiB of
    /// f32) while every row of the task streams past it; without it 16 tokens × 4096 f32 = 256 KiB
    /// of x come from L2 for every row, and the kernel is L2-bound instead of DRAM-bound.
    fn col_block(n: usize) -> usize {
        (8192 / n.max(1)).max(32)
    }

    /// AVX2: two 8-entry permutes + a blend on bit 3 of the nibble.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q4_fwd_avx2<const R: usize, const N: usize>(
        q: &Q4<'_>,
        xs: &[f32],
        r0: usize,
        nr: usize,
        c0: usize,
        c1: usize,
        yt: &mut [f32],
    ) {
        let inp = q.cols;
        let cpr = inp / 32;
        let shift = (q.bs / 32).trailing_zeros();
        let data = q.data.as_ptr();
        let xp = xs.as_ptr();
        let mut i = 0;
        while i < nr {
            let mut acc = [[_mm256_setzero_ps(); N]; R];
            let mut cur = [usize::MAX; R];
            let mut lut = [(_mm256_setzero_ps(), _mm256_setzero_ps()); R];
            let base: [usize; R] = std::array::from_fn(|r| (r0 + i + r) * cpr);
            for c in c0..c1 {
                for r in 0..R {
                    let g = base[r] + c;
                    let b = g >> shift;
                    if b != cur[r] {
                        cur[r] = b;
                        let ls = q.scaled_lut(b);
                        // SAFETY: ls holds 16 f32.
                        lut[r] =
                            unsafe { (_mm256_loadu_ps(ls.as_ptr()), _mm256_loadu_ps(ls.as_ptr().add(8))) };
                    }
                    let (l0, l1) = lut[r];
                    for h in 0..2 {
                        // SAFETY: bytes 16g + 8h .. +8 are inside the packed data; x offsets in bounds.
                        unsafe {
                            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                data.add(g * 16 + 8 * h) as *const __m128i
                            ));
                            let vh = _mm256_srli_epi32::<4>(v);
                            let wl = _mm256_blendv_ps(
                                _mm256_permutevar8x32_ps(l0, v),
                                _mm256_permutevar8x32_ps(l1, v),
                                _mm256_castsi256_ps(_mm256_slli_epi32::<28>(v)),
                            );
                            let wh = _mm256_blendv_ps(
                                _mm256_permutevar8x32_ps(l0, vh),
                                _mm256_permutevar8x32_ps(l1, vh),
                                _mm256_castsi256_ps(_mm256_slli_epi32::<24>(v)),
                            );
                            for t in 0..N {
                                let xe = _mm256_loadu_ps(xp.add(t * inp + 32 * c + 8 * h));
                                let xo = _mm256_loadu_ps(xp.add(t * inp + 32 * c + 16 + 8 * h));
                                acc[r][t] = _mm256_fmadd_ps(wh, xe, acc[r][t]);
                                acc[r][t] = _mm256_fmadd_ps(wl, xo, acc[r][t]);
                            }
                        }
                    }
                }
            }
            for r in 0..R {
                for t in 0..N {
                    yt[(i + r) * N + t] += hsum256(acc[r][t]);
                }
            }
            i += R;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let mut a = [0f32; 8];
        // SAFETY: a holds 8 f32.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    /// # Safety
    /// avx2 and fma available; sizes as for [`q4_fwd_avx512_dispatch`].
    pub(super) unsafe fn q4_fwd_avx2_dispatch(
        q: &Q4<'_>,
        xs: &[f32],
        n: usize,
        r0: usize,
        nr: usize,
        yt: &mut [f32],
    ) {
        let cpr = q.cols / 32;
        let cb = col_block(n) / 32;
        macro_rules! go {
            ($r:literal, $n:literal) => {{
                let bulk = nr / $r * $r;
                for c0 in (0..cpr).step_by(cb) {
                    let c1 = (c0 + cb).min(cpr);
                    // SAFETY: forwarded from the caller's contract.
                    unsafe {
                        q4_fwd_avx2::<$r, $n>(q, xs, r0, bulk, c0, c1, &mut yt[..bulk * $n]);
                        q4_fwd_avx2::<1, $n>(q, xs, r0 + bulk, nr - bulk, c0, c1, &mut yt[bulk * $n..]);
                    }
                }
            }};
        }
        match n {
            1 => go!(2, 1),
            2 => go!(2, 2),
            4 => go!(1, 4),
            8 => go!(1, 8),
            _ => go!(1, 16),
        }
    }

    /// Backward 4-bit: `acc[t*len + j] += Σ_o dy[o, t] W[o, k0 + j]` in permuted order.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q4_bwd_avx512<const R: usize, const N: usize>(
        q: &Q4<'_>,
        dyt: &[f32],
        o0: usize,
        o1: usize,
        k0: usize,
        len: usize,
        acc: &mut [f32],
    ) {
        let inp = q.cols;
        let cpr = inp / 32;
        let shift = (q.bs / 32).trailing_zeros();
        let nch = len / 32;
        let c0 = k0 / 32;
        let data = q.data.as_ptr();
        let ap = acc.as_mut_ptr();
        let mut o = o0;
        while o + R <= o1 {
            // dy is broadcast from memory inside the FMAs (embedded broadcast): R x N registers of
            // splatted dy would not fit next to the decoded weights for N = 16.
            // SAFETY: rows o..o+R < o1 <= rows, so (o + R) * N <= dyt.len().
            let dy_row = unsafe { dyt.as_ptr().add(o * N) };
            let mut cur = [usize::MAX; R];
            let mut lut = [_mm512_setzero_ps(); R];
            for c in 0..nch {
                let mut wh = [_mm512_setzero_ps(); R];
                let mut wl = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    let g = (o + r) * cpr + c0 + c;
                    let b = g >> shift;
                    if b != cur[r] {
                        cur[r] = b;
                        lut[r] = lut512(q, b);
                    }
                    // SAFETY: chunk g is inside the packed data (row o + r < rows, column chunk < cpr).
                    // A prefetch never faults.
                    unsafe {
                        // A task reads only a short segment of each row: prefetch the same
                        // segment two row groups ahead instead of further along this row.
                        if c % 4 == 0 {
                            let ahead = g + 2 * R * cpr;
                            _mm_prefetch::<_MM_HINT_T0>(data.wrapping_add(ahead * 16) as *const i8);
                        }
                        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(data.add(g * 16) as *const __m128i));
                        wl[r] = _mm512_permutexvar_ps(v, lut[r]);
                        wh[r] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut[r]);
                    }
                }
                for t in 0..N {
                    // SAFETY: t * len + 32c + 32 <= N * len = acc.len().
                    unsafe {
                        let pe = ap.add(t * len + 32 * c);
                        let po = pe.add(16);
                        let mut ae = _mm512_loadu_ps(pe);
                        let mut ao = _mm512_loadu_ps(po);
                        for r in 0..R {
                            let d = _mm512_set1_ps(*dy_row.add(r * N + t));
                            ae = _mm512_fmadd_ps(wh[r], d, ae);
                            ao = _mm512_fmadd_ps(wl[r], d, ao);
                        }
                        _mm512_storeu_ps(pe, ae);
                        _mm512_storeu_ps(po, ao);
                    }
                }
            }
            o += R;
        }
        if o < o1 {
            // SAFETY: same contract, fewer rows.
            unsafe { q4_bwd_avx512::<1, N>(q, dyt, o, o1, k0, len, acc) };
        }
    }

    /// # Safety
    /// avx512f available; `dyt` holds `rows * n`; `acc` holds `n * len`; `k0`, `len` multiples of 32
    /// inside the row; rows `o0..o1` exist.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn q4_bwd_avx512_dispatch(
        q: &Q4<'_>,
        dyt: &[f32],
        n: usize,
        o0: usize,
        o1: usize,
        k0: usize,
        len: usize,
        acc: &mut [f32],
    ) {
        // SAFETY: forwarded.
        unsafe {
            match n {
                // Four rows per accumulator pass: one load/store of dx per 8 FMAs.
                1 => q4_bwd_avx512::<4, 1>(q, dyt, o0, o1, k0, len, acc),
                2 => q4_bwd_avx512::<4, 2>(q, dyt, o0, o1, k0, len, acc),
                4 => q4_bwd_avx512::<4, 4>(q, dyt, o0, o1, k0, len, acc),
                8 => q4_bwd_avx512::<4, 8>(q, dyt, o0, o1, k0, len, acc),
                _ => q4_bwd_avx512::<4, 16>(q, dyt, o0, o1, k0, len, acc),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q4_bwd_avx2<const N: usize>(
        q: &Q4<'_>,
        dyt: &[f32],
        o0: usize,
        o1: usize,
        k0: usize,
        len: usize,
        acc: &mut [f32],
    ) {
        let inp = q.cols;
        let cpr = inp / 32;
        let shift = (q.bs / 32).trailing_zeros();
        let nch = len / 32;
        let c0 = k0 / 32;
        let data = q.data.as_ptr();
        let ap = acc.as_mut_ptr();
        for o in o0..o1 {
            let d: [__m256; N] = std::array::from_fn(|t| _mm256_set1_ps(dyt[o * N + t]));
            let mut cur = usize::MAX;
            let (mut l0, mut l1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in 0..nch {
                let g = o * cpr + c0 + c;
                let b = g >> shift;
                if b != cur {
                    cur = b;
                    let ls = q.scaled_lut(b);
                    // SAFETY: ls holds 16 f32.
                    unsafe {
                        l0 = _mm256_loadu_ps(ls.as_ptr());
                        l1 = _mm256_loadu_ps(ls.as_ptr().add(8));
                    }
                }
                for h in 0..2 {
                    // SAFETY: packed bytes and accumulator offsets are in bounds (see the avx512 twin).
                    unsafe {
                        let v =
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(data.add(g * 16 + 8 * h) as *const __m128i));
                        let vh = _mm256_srli_epi32::<4>(v);
                        let wl = _mm256_blendv_ps(
                            _mm256_permutevar8x32_ps(l0, v),
                            _mm256_permutevar8x32_ps(l1, v),
                            _mm256_castsi256_ps(_mm256_slli_epi32::<28>(v)),
                        );
                        let wh = _mm256_blendv_ps(
                            _mm256_permutevar8x32_ps(l0, vh),
                            _mm256_permutevar8x32_ps(l1, vh),
                            _mm256_castsi256_ps(_mm256_slli_epi32::<24>(v)),
                        );
                        for (t, dt) in d.iter().enumerate() {
                            let pe = ap.add(t * len + 32 * c + 8 * h);
                            let po = ap.add(t * len + 32 * c + 16 + 8 * h);
                            _mm256_storeu_ps(pe, _mm256_fmadd_ps(wh, *dt, _mm256_loadu_ps(pe)));
                            _mm256_storeu_ps(po, _mm256_fmadd_ps(wl, *dt, _mm256_loadu_ps(po)));
                        }
                    }
                }
            }
        }
    }

    /// # Safety
    /// avx2 and fma available; sizes as for [`q4_bwd_avx512_dispatch`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn q4_bwd_avx2_dispatch(
        q: &Q4<'_>,
        dyt: &[f32],
        n: usize,
        o0: usize,
        o1: usize,
        k0: usize,
        len: usize,
        acc: &mut [f32],
    ) {
        // SAFETY: forwarded.
        unsafe {
            match n {
                1 => q4_bwd_avx2::<1>(q, dyt, o0, o1, k0, len, acc),
                2 => q4_bwd_avx2::<2>(q, dyt, o0, o1, k0, len, acc),
                4 => q4_bwd_avx2::<4>(q, dyt, o0, o1, k0, len, acc),
                8 => q4_bwd_avx2::<8>(q, dyt, o0, o1, k0, len, acc),
                _ => q4_bwd_avx2::<16>(q, dyt, o0, o1, k0, len, acc),
            }
        }
    }

    /// 16 dense weights as f32.
    pub(super) trait Load16: Copy {
        /// # Safety
        /// avx512f available and 16 elements readable at `p`.
        unsafe fn load16(p: *const Self) -> __m512;
        fn to_f32(self) -> f32;
    }
    impl Load16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: caller contract.
            unsafe { _mm512_loadu_ps(p) }
        }
        fn to_f32(self) -> f32 {
            self
        }
    }
    impl Load16 for bf16 {
        #[inline(always)]
        unsafe fn load16(p: *const bf16) -> __m512 {
            // bf16 -> f32 is a 16-bit left shift of the bit pattern (exact).
            // SAFETY: caller contract (32 readable bytes).
            unsafe {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }
    impl Load16 for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            // SAFETY: caller contract (32 readable bytes).
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }

    /// Dense GEMV rows: `yt[(o - r0) * N + t] = Σ_k W[o, k] x[t, k]`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dense_fwd_avx512<E: Load16, const R: usize, const N: usize>(
        w: &[E],
        inp: usize,
        xs: &[f32],
        r0: usize,
        nr: usize,
        k0: usize,
        k1: usize,
        yt: &mut [f32],
    ) {
        let nv = k0 + (k1 - k0) / 16 * 16;
        let wp = w.as_ptr();
        let xp = xs.as_ptr();
        let mut i = 0;
        while i < nr {
            let mut acc = [[_mm512_setzero_ps(); N]; R];
            let mut k = k0;
            while k < nv {
                for r in 0..R {
                    // SAFETY: row r0+i+r exists; k + 16 <= inp; x offsets t*inp + k + 16 <= N*inp.
                    // A prefetch never faults.
                    unsafe {
                        let p = wp.add((r0 + i + r) * inp + k);
                        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PF_BYTES));
                        let wv = E::load16(p);
                        for t in 0..N {
                            acc[r][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(t * inp + k)), acc[r][t]);
                        }
                    }
                }
                k += 16;
            }
            for r in 0..R {
                let row = &w[(r0 + i + r) * inp..(r0 + i + r + 1) * inp];
                for t in 0..N {
                    let mut s = _mm512_reduce_add_ps(acc[r][t]);
                    for kk in nv..k1 {
                        s += row[kk].to_f32() * xs[t * inp + kk];
                    }
                    yt[(i + r) * N + t] += s;
                }
            }
            i += R;
        }
    }

    /// Dense backward rows `[o0, o1)`, columns `[k0, k0 + len)`: `acc[t*len + j] += Σ_o dy[o, t] W[o, k0 + j]`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dense_bwd_avx512<E: Load16, const R: usize, const N: usize>(
        w: &[E],
        inp: usize,
        dyt: &[f32],
        o0: usize,
        o1: usize,
        k0: usize,
        len: usize,
        acc: &mut [f32],
    ) {
        let nv = len / 16 * 16;
        let wp = w.as_ptr();
        let ap = acc.as_mut_ptr();
        let mut o = o0;
        while o + R <= o1 {
            let d: [[__m512; N]; R] =
                std::array::from_fn(|r| std::array::from_fn(|t| _mm512_set1_ps(dyt[(o + r) * N + t])));
            let mut j = 0;
            while j < nv {
                // SAFETY: rows o..o+R exist, k0 + j + 16 <= inp; t * len + j + 16 <= acc.len().
                // A prefetch never faults.
                unsafe {
                    let wv: [__m512; R] = std::array::from_fn(|r| {
                        let p = wp.add((o + r) * inp + k0 + j);
                        // Same segment two row groups ahead (see the 4-bit twin).
                        let ahead = (p as *const i8).wrapping_add(2 * R * inp * std::mem::size_of::<E>());
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                        E::load16(p)
                    });
                    for t in 0..N {
                        let p = ap.add(t * len + j);
                        let mut a = _mm512_loadu_ps(p);
                        for r in 0..R {
                            a = _mm512_fmadd_ps(wv[r], d[r][t], a);
                        }
                        _mm512_storeu_ps(p, a);
                    }
                }
                j += 16;
            }
            for j in nv..len {
                for t in 0..N {
                    let mut s = acc[t * len + j];
                    for r in 0..R {
                        s += dyt[(o + r) * N + t] * w[(o + r) * inp + k0 + j].to_f32();
                    }
                    acc[t * len + j] = s;
                }
            }
            o += R;
        }
        if o < o1 {
            // SAFETY: same contract, fewer rows.
            unsafe { dense_bwd_avx512::<E, 1, N>(w, inp, dyt, o, o1, k0, len, acc) };
        }
    }

    /// # Safety
    /// avx512f available; `w` is `[rows, inp]`, `dyt` holds `rows * n`, `acc` holds `n * len`, columns
    /// `k0..k0 + len` and rows `o0..o1` exist.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dense_bwd_avx512_dispatch<E: Load16>(
        w: &[E],
        inp: usize,
        dyt: &[f32],
        n: usize,
        o0: usize,
        o1: usize,
        k0: usize,
        len: usize,
        acc: &mut [f32],
    ) {
        // SAFETY: forwarded.
        unsafe {
            match n {
                1 => dense_bwd_avx512::<E, 4, 1>(w, inp, dyt, o0, o1, k0, len, acc),
                2 => dense_bwd_avx512::<E, 4, 2>(w, inp, dyt, o0, o1, k0, len, acc),
                4 => dense_bwd_avx512::<E, 2, 4>(w, inp, dyt, o0, o1, k0, len, acc),
                8 => dense_bwd_avx512::<E, 2, 8>(w, inp, dyt, o0, o1, k0, len, acc),
                _ => dense_bwd_avx512::<E, 1, 16>(w, inp, dyt, o0, o1, k0, len, acc),
            }
        }
    }

    /// # Safety
    /// avx512f available; `w` is `[rows, inp]`, `xs` holds `n * inp`, `yt` holds `nr * n`.
    pub(super) unsafe fn dense_fwd_avx512_dispatch<E: Load16>(
        w: &[E],
        inp: usize,
        xs: &[f32],
        n: usize,
        r0: usize,
        nr: usize,
        yt: &mut [f32],
    ) {
        let cb = col_block(n);
        macro_rules! go {
            ($r:literal, $n:literal) => {{
                let bulk = nr / $r * $r;
                for k0 in (0..inp).step_by(cb) {
                    let k1 = (k0 + cb).min(inp);
                    // SAFETY: forwarded from the caller's contract; blocks cover 0..inp.
                    unsafe {
                        dense_fwd_avx512::<E, $r, $n>(w, inp, xs, r0, bulk, k0, k1, &mut yt[..bulk * $n]);
                        dense_fwd_avx512::<E, 1, $n>(
                            w,
                            inp,
                            xs,
                            r0 + bulk,
                            nr - bulk,
                            k0,
                            k1,
                            &mut yt[bulk * $n..],
                        );
                    }
                }
            }};
        }
        match n {
            1 => go!(4, 1),
            2 => go!(4, 2),
            4 => go!(2, 4),
            8 => go!(1, 8),
            _ => go!(1, 16),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_q4(rows: usize, cols: usize, bs: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut r = crate::rng::Rng::new(seed);
        let n = rows * cols;
        let data = (0..n.div_ceil(2)).map(|_| r.next_u64() as u8).collect();
        let absmax = (0..n.div_ceil(bs)).map(|_| r.uniform_range(0.1, 2.0)).collect();
        (data, absmax)
    }

    fn decode_ref(q: &Q4<'_>, f: usize) -> f32 {
        let byte = q.data[f / 2];
        let nib = if f & 1 == 0 { byte >> 4 } else { byte & 15 };
        q.lut[nib as usize] * q.scales.get(f / q.bs)
    }

    /// Every ISA's forward and backward 4-bit kernel agrees with the scalar general path.
    #[test]
    fn simd_kernels_match_general_path() {
        // 1088 columns: several column blocks of the forward kernels for 8 and 16 tokens.
        // Rows of 3, 34, 5 and 8 chunks: rows that start mid-line (the one-token kernel's head and
        // tail), blocks of 1, 2, 4 and 128 chunks (its 4, 2 and 1 tables per line, blocks spanning
        // rows), and a double-quantized absmax.
        simd_case(37, 96, 32, false);
        simd_case(9, 1088, 64, false);
        simd_case(13, 160, 128, true);
        simd_case(6, 256, 4096, true);
    }

    fn simd_case(rows: usize, cols: usize, bs: usize, dq: bool) {
        let (data, absmax) = rand_q4(rows, cols, bs, 3);
        let mut r = crate::rng::Rng::new(9);
        let codes: Vec<u8> = (0..absmax.len()).map(|_| r.next_u64() as u8).collect();
        let nested: Vec<f32> = (0..absmax.len().div_ceil(2))
            .map(|_| r.uniform_range(0.5, 2.0))
            .collect();
        let scales = if dq {
            Scales::Double {
                codes: &codes,
                nested: &nested,
                offset: 0.3,
                code: crate::quant::dynamic_map(),
                nested_shift: 1,
            }
        } else {
            Scales::F32(&absmax)
        };
        let q = Q4 {
            data: &data,
            lut: *crate::quant::QuantType::Nf4.code(),
            bs,
            scales,
            rows,
            cols,
        };
        let w = WeightRef::Q4(q);
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        let mut r = crate::rng::Rng::new(5);
        for &n in &[1usize, 2, 4, 8, 16] {
            let x: Vec<f32> = r.normal_vec(n * cols);
            let mut xs = vec![0f32; n * cols];
            for t in 0..n {
                permute_even_odd(&x[t * cols..(t + 1) * cols], &mut xs[t * cols..(t + 1) * cols]);
            }
            let mut want = vec![0f64; rows * n];
            for o in 0..rows {
                for t in 0..n {
                    want[o * n + t] = (0..cols)
                        .map(|k| decode_ref(&q, o * cols + k) as f64 * x[t * cols + k] as f64)
                        .sum();
                }
            }
            for &isa in &isas {
                let simd = isa != Isa::Scalar;
                let mut yt = vec![0f32; rows * n];
                let xin = if simd { &xs } else { &x };
                gemv_fwd_rows(&w, isa, simd, xin, n, cols, 0, rows, &mut yt);
                for (i, (&g, &e)) in yt.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "{isa:?} n={n} i={i}: {g} vs {e}"
                    );
                }
                // Backward on a middle column segment.
                let dyt: Vec<f32> = r.normal_vec(rows * n);
                let (k0, len) = (32, 64);
                let mut acc = vec![0f32; n * len];
                gemv_bwd_seg(&w, isa, simd, &dyt, n, cols, 0, rows, k0, len, &mut acc);
                for t in 0..n {
                    let mut got = acc[t * len..(t + 1) * len].to_vec();
                    if simd {
                        unpermute_even_odd(&acc[t * len..(t + 1) * len], &mut got);
                    }
                    for (j, &g) in got.iter().enumerate() {
                        let e: f64 = (0..rows)
                            .map(|o| dyt[o * n + t] as f64 * decode_ref(&q, o * cols + k0 + j) as f64)
                            .sum();
                        assert!(
                            (g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                            "bwd {isa:?} n={n} j={j}"
                        );
                    }
                }
            }
        }
        // decode_flat at odd offsets and odd lengths equals the element-wise decode.
        for (f0, len) in [(0usize, 33usize), (1, 70), (31, 64), (63, 1), (100, 200)] {
            let mut out = vec![0f32; len];
            decode_flat(&q, f0, &mut out);
            for (i, &v) in out.iter().enumerate() {
                assert_eq!(v, decode_ref(&q, f0 + i), "decode_flat f0={f0} i={i}");
            }
        }
    }
}
