//! CPU backend of the DoRA layer, and the oracle of `kernels/dora.cu`: the same functions with the same
//! summation orders. Every elementwise step is a separately rounded f32 multiply or add (Rust does not
//! contract `a * b + c` into an FMA; the kernels use `__fmul_rn`/`__fadd_rn`), so `norm_assemble`,
//! `scale_cols`, `scale_rows`, `colsum`, `full_norm_grad` and `merge_rows` are bit-identical to their
//! CUDA twins (the assembly for f32 `Pᵀ`).
//!
//! The products with the frozen weight (`Pᵀ = A·Wᵀ` for the norm, `Cᵀ·W` for the full norm gradient)
//! go through the kernels of [`crate::qmatmul::cpu`] with the r rows as "tokens": never a dense copy of
//! a 4-bit W. In a training step `Pᵀ` is r extra rows of the forward product (`forward_with_rows`);
//! otherwise (eval cache, merges, few tokens over a 4-bit W) a separate decode GEMV per 16 rows.
//!
//! Napkin (4096², r = 16, 2-core AVX-512, f32), measured medians in parentheses (`benches/dora.rs`):
//! - 512 tokens: the forward GEMM is 17.2 GFLOP (≈ 65 ms); the 16 extra rows add 3% (≈ 2 ms); the
//!   elementwise passes move ≈ 6 × 8 MB (x copy, z read, y write, dy and z read in the backward):
//!   ≈ 3-5 ms. DoRA / LoRA ≈ 1.05-1.1 (measured 1.01-1.13).
//! - 16 tokens: the 16 rows of A double the work of the 16-token forward (0.54 GFLOP each): ≥ 2x for
//!   a compute-bound 4-bit GEMV, less for a dense W, whose 64 MB read the fused product shares
//!   (measured 1.4x dense f32, 2.0x NF4).
//! - 1 token: LoRA is one memory-bound GEMV (9.4 MB of NF4, ≈ 0.7 ms); the norm's 16 rows are 16x its
//!   FLOPs (≈ 8 ms): any exact per-step norm costs r/tokens of a forward pass.

use super::{Fused, FwdParts, NORM_EPS};
use crate::Device;
use crate::error::{Error, Result};
use crate::qmatmul::cpu::{WeightRef, gemv_bwd, gemv_fwd};
use crate::qmatmul::{Algo, BaseWeight, LowRankFwd, linear_forward};
use crate::tensor::{DType, Element, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Rows of A (or Cᵀ) per GEMV pass: the decode kernels take at most 16 tokens.
const GEMV_ROWS: usize = 16;

fn f32s<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a [f32]> {
    t.cpu_data::<f32>(op)
}

fn vec_tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, Device::Cpu)
}

/// A raw pointer shared by tasks that write provably disjoint elements.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: only used by tasks writing disjoint element sets (documented at each use).
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// `‖W_i‖²` for every row of any base weight (f32 `[out]`), decoding one row at a time into an L1/L2
/// sized scratch (no dense copy of W) and accumulating the squares in f64.
pub(super) fn row_sq_norms(base: &BaseWeight) -> Result<Tensor> {
    let (out, inp) = (base.out_features(), base.in_features());
    let w = WeightRef::new(base)?;
    let mut res = vec![0f32; out];
    res.par_iter_mut().enumerate().for_each_init(
        || vec![0f32; inp],
        |row, (i, o)| {
            w.decode_row_seg(i, inp, 0, row);
            *o = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() as f32;
        },
    );
    vec_tensor(res, &[out])
}

/// The training forward product with the norm fused in, where this backend fuses it (f32 activations
/// on the CPU and [`fuse_norm_rows`]); `None` elsewhere (the caller runs the product and the norm
/// separately). The r rows of A ride along as extra rows of the forward product, which already decodes
/// (or reads) all of W, so `Pᵀ = A·Wᵀ` costs r/tokens of its FLOPs instead of a separate pass over W
/// (≈ 3% against ≈ 15% of a 512-token step at 4096²). On CUDA (tile granularity, tensor-core GEMV) the
/// separate GEMV is kept.
pub(super) fn fused_forward(p: &FwdParts<'_>) -> Result<Option<Fused>> {
    let (tokens, r) = (
        p.xd.dims2("dora fused_forward")?.0,
        p.a32.dims2("dora fused_forward")?.0,
    );
    if !p.xd.device().is_cpu() || p.xd.dtype() != DType::F32 || !fuse_norm_rows(p.base, tokens, r) {
        return Ok(None);
    }
    let (zc, pt) = forward_with_rows(p.xd, p.base, p.u, p.b32, p.a32, p.algo)?;
    let gram = p.a32.matmul_t(p.a32, false, true)?;
    let (n, g) = norm_assemble(p.w_sq, &pt, p.b32, &gram, Some(p.m32), p.scaling)?;
    let g = g.ok_or_else(|| Error::invalid("internal: norm without scale"))?;
    Ok(Some(Fused { zc, n, g, pt, gram }))
}

/// Whether the norm's `Pᵀ = A·Wᵀ` should ride along as r extra rows of the forward product. A dense W
/// goes to one GEMM (or one GEMV) either way, so one read of W beats two. A 4-bit W runs the decode
/// GEMV up to 16 rows and dequantized panels + GEMM above: fused when the forward already is on the
/// panel path (tokens > 16) or when both fit one GEMV (tokens + r ≤ 16); not when the extra rows would
/// move a GEMV-sized forward onto the panel path, whose dequantization costs more than a second GEMV.
fn fuse_norm_rows(base: &BaseWeight, tokens: usize, r: usize) -> bool {
    use crate::qmatmul::cpu::DECODE_MAX_TOKENS;
    match base {
        // A k-bit W decodes row by row on every path, so one read for both products.
        BaseWeight::Dense(_) | BaseWeight::KBit(_) => true,
        BaseWeight::Quantized(_) => tokens > DECODE_MAX_TOKENS || tokens + r <= DECODE_MAX_TOKENS,
    }
}

/// `[x | u]·[W | B]ᵀ` stacked over `A·Wᵀ` (`[t + r, out]`), and a copy of the `A·Wᵀ` rows (`Pᵀ`),
/// in one product: A's rows are appended to x's (with zero low-rank coefficients), so W is decoded or
/// read once for both. f32 `x [t, in]`, `u [t, rank]`, `A [r, in]`. Costs a copy of x (memory bound,
/// t·in·8 bytes moved) against a separate pass over W; the caller uses the first t output rows in place.
fn forward_with_rows(
    x: &Tensor,
    base: &BaseWeight,
    u: &Tensor,
    b32: &Tensor,
    a32: &Tensor,
    algo: Algo,
) -> Result<(Tensor, Tensor)> {
    let op = "dora forward_with_rows";
    let ((t, inp), (r, _), (_, rank)) = (x.dims2(op)?, a32.dims2(op)?, u.dims2(op)?);
    let out = base.out_features();
    let mut xa = Vec::with_capacity((t + r) * inp);
    xa.extend_from_slice(f32s(x, op)?);
    xa.extend_from_slice(f32s(a32, op)?);
    let mut ua = Vec::with_capacity((t + r) * rank);
    ua.extend_from_slice(f32s(u, op)?);
    ua.resize((t + r) * rank, 0.0);
    let xa = vec_tensor(xa, &[t + r, inp])?;
    let ua = vec_tensor(ua, &[t + r, rank])?;
    let y = linear_forward(&xa, base, None, Some(LowRankFwd { u: &ua, b: b32 }), algo)?;
    let pt = vec_tensor(f32s(&y, op)?[t * out..].to_vec(), &[r, out])?;
    Ok((y, pt))
}

/// `(n, m / n, Pᵀ, G)` of the current A and B (twin of the CUDA `norm`): `Pᵀ = A·Wᵀ`, `G = A·Aᵀ` and
/// the assembly, all in f32 (`_dtype` is the CUDA compute precision).
#[allow(clippy::type_complexity)]
pub(super) fn norm(
    base: &BaseWeight,
    w_sq: &Tensor,
    a32: &Tensor,
    b32: &Tensor,
    m32: Option<&Tensor>,
    s: f32,
    _dtype: DType,
) -> Result<(Tensor, Option<Tensor>, Tensor, Tensor)> {
    let pt = weight_proj(base, a32)?;
    let gram = a32.matmul_t(a32, false, true)?;
    let (n, g) = norm_assemble(w_sq, &pt, b32, &gram, m32, s)?;
    Ok((n, g, pt, gram))
}

/// `Pᵀ = A·Wᵀ` (f32 `[r, out]`) from f32 `A [r, in]`: W read once per 16 rows of A.
fn weight_proj(base: &BaseWeight, a32: &Tensor) -> Result<Tensor> {
    weight_rows(base, a32, true, "dora weight_proj")
}

/// `Cᵀ·W` (f32 `[r, in]`) from f32 `Cᵀ [r, out]`: W read once per 16 rows of Cᵀ.
pub(super) fn weight_tproj(base: &BaseWeight, ct: &Tensor) -> Result<Tensor> {
    weight_rows(base, ct, false, "dora weight_tproj")
}

/// Each row of the f32 `[r, k]` matrix `t` times `Wᵀ` (`forward`: k = in, rows of out) or times `W`
/// (k = out, rows of in), by the GEMV kernels over blocks of 16 rows.
fn weight_rows(base: &BaseWeight, t: &Tensor, forward: bool, op: &'static str) -> Result<Tensor> {
    let (out, inp) = (base.out_features(), base.in_features());
    let (src, dst) = if forward { (inp, out) } else { (out, inp) };
    let (r, _) = t.dims2(op)?;
    let x = f32s(t, op)?;
    let mut res = vec![0f32; r * dst];
    if out > 0 && inp > 0 {
        let w = WeightRef::new(base)?;
        for k0 in (0..r).step_by(GEMV_ROWS) {
            let kc = GEMV_ROWS.min(r - k0);
            let (xs, ys) = (&x[k0 * src..(k0 + kc) * src], &mut res[k0 * dst..(k0 + kc) * dst]);
            if forward {
                gemv_fwd(&w, xs, kc, out, inp, ys, None, 0);
            } else {
                gemv_bwd(&w, xs, kc, out, inp, ys, None, 0);
            }
        }
    }
    vec_tensor(res, &[r, dst])
}

/// Twin of `dora_norm_assemble`: `n` (and `m / max(n, eps)` when `m` is given).
pub(super) fn norm_assemble(
    wsq: &Tensor,
    pt: &Tensor,
    b32: &Tensor,
    gram: &Tensor,
    m32: Option<&Tensor>,
    s: f32,
) -> Result<(Tensor, Option<Tensor>)> {
    let op = "dora norm_assemble";
    let (out, r) = b32.dims2(op)?;
    let (wsq, pt, b, gram) = (f32s(wsq, op)?, f32s(pt, op)?, f32s(b32, op)?, f32s(gram, op)?);
    let m = m32.map(|m| f32s(m, op)).transpose()?;
    let mut n = vec![0f32; out];
    let (two_s, s2) = (2.0 * s, s * s);
    n.par_iter_mut()
        .enumerate()
        .with_min_len(256)
        .for_each(|(i, ni)| {
            let bi = &b[i * r..(i + 1) * r];
            let (mut bp, mut bgb) = (0f32, 0f32);
            for k in 0..r {
                let bk = bi[k];
                bp += bk * pt[k * out + i];
                let mut t = 0f32;
                for l in 0..r {
                    t += gram[k * r + l] * bi[l];
                }
                bgb += bk * t;
            }
            let mut n2 = wsq[i] + two_s * bp + s2 * bgb;
            if n2 < 0.0 {
                n2 = 0.0;
            }
            *ni = n2.sqrt();
        });
    let scale = m.map(|m| n.iter().zip(m).map(|(&n, &m)| m / floor(n)).collect::<Vec<f32>>());
    Ok((
        vec_tensor(n, &[out])?,
        scale.map(|v| vec_tensor(v, &[out])).transpose()?,
    ))
}

/// `max(n, eps)` that keeps NaN (like the kernels' comparison).
#[inline]
pub(super) fn floor(n: f32) -> f32 {
    if n < NORM_EPS { NORM_EPS } else { n }
}

macro_rules! by_dtype {
    ($dt:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dt {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            d => Err(Error::dtype($op, "f32, f16 or bf16", d)),
        }
    };
}

/// Twin of `dora_scale_cols_*`: `y = z·c (+ bias) (+ add)` in z's dtype, over the first `rows` rows
/// of z (z may be taller: the fused forward keeps `Pᵀ` below the activations).
pub(super) fn scale_cols(
    z: &Tensor,
    rows: usize,
    c: &Tensor,
    bias: Option<&Tensor>,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    let op = "dora scale_cols";
    let (zrows, cols) = z.dims2(op)?;
    if rows > zrows {
        return Err(Error::shape(
            op,
            format!("{rows} rows requested from {:?}", z.shape()),
        ));
    }
    let c = f32s(c, op)?;
    let bias = bias.map(|b| f32s(b, op)).transpose()?;
    by_dtype!(z.dtype(), op, |T| {
        let zv = z.cpu_data::<T>(op)?;
        let addv = add.map(|a| a.cpu_data::<T>(op)).transpose()?;
        let mut y = vec![T::from_f32(0.0); rows * cols];
        if cols > 0 {
            y.par_chunks_mut(cols)
                .enumerate()
                .with_min_len(8)
                .for_each(|(t, yr)| {
                    let zr = &zv[t * cols..(t + 1) * cols];
                    // The four variants are separate loops so that each one vectorizes.
                    match (bias, addv) {
                        (None, None) => {
                            for ((o, z), c) in yr.iter_mut().zip(zr).zip(c) {
                                *o = T::from_f32(z.to_f32() * c);
                            }
                        }
                        (Some(b), None) => {
                            for (((o, z), c), b) in yr.iter_mut().zip(zr).zip(c).zip(b) {
                                *o = T::from_f32(z.to_f32() * c + b);
                            }
                        }
                        (None, Some(a)) => {
                            let ar = &a[t * cols..(t + 1) * cols];
                            for (((o, z), c), a) in yr.iter_mut().zip(zr).zip(c).zip(ar) {
                                *o = T::from_f32(z.to_f32() * c + a.to_f32());
                            }
                        }
                        (Some(b), Some(a)) => {
                            let ar = &a[t * cols..(t + 1) * cols];
                            for ((((o, z), c), b), a) in yr.iter_mut().zip(zr).zip(c).zip(b).zip(ar) {
                                *o = T::from_f32(z.to_f32() * c + b + a.to_f32());
                            }
                        }
                    }
                });
        }
        Tensor::from_vec(y, &[rows, cols], Device::Cpu)
    })
}

/// Twin of `dora_scale_rows`: `y[i, j] = x[i, j]·f[i]` (f32; `[out, r]`-sized operands).
pub(super) fn scale_rows(x: &Tensor, f: &Tensor) -> Result<Tensor> {
    let op = "dora scale_rows";
    let (rows, cols) = x.dims2(op)?;
    let (xv, fv) = (f32s(x, op)?, f32s(f, op)?);
    let y: Vec<f32> = xv
        .iter()
        .enumerate()
        .map(|(k, &v)| v * fv[k / cols.max(1)])
        .collect();
    vec_tensor(y, &[rows, cols])
}

/// Twin of `dora_colsum_*`: `dm = (Σ_t dy·z) / max(n, eps)` (f32 `[cols]`; z may be taller than dy,
/// its first rows are used) and, when `dz_dtype` is given, `dz = dy·g` in that dtype. Per column, rows
/// `t ≡ k (mod 8)` are summed in order into 8 partials that are then added in order: the kernel's order,
/// so the result is bit-identical and independent of the thread count. Tasks own disjoint column ranges.
pub(super) fn colsum(
    dy: &Tensor,
    z: &Tensor,
    g: &Tensor,
    n: &Tensor,
    dz_dtype: Option<DType>,
) -> Result<(Tensor, Option<Tensor>)> {
    let op = "dora colsum";
    let (rows, cols) = dy.dims2(op)?;
    let (zrows, zcols) = z.dims2(op)?;
    if zcols != cols || zrows < rows {
        return Err(Error::shape(
            op,
            format!("z {:?} does not cover dy {:?}", z.shape(), dy.shape()),
        ));
    }
    let (g, n) = (f32s(g, op)?, f32s(n, op)?);
    by_dtype!(dy.dtype(), op, |T| {
        let (dyv, zv) = (dy.cpu_data::<T>(op)?, z.cpu_data::<T>(op)?);
        match dz_dtype {
            None => colsum_go::<T, f32>(dyv, zv, g, n, rows, cols, false),
            Some(DType::F32) => colsum_go::<T, f32>(dyv, zv, g, n, rows, cols, true),
            Some(d) if d == dy.dtype() => colsum_go::<T, T>(dyv, zv, g, n, rows, cols, true),
            Some(d) => Err(Error::dtype(op, "dz in f32 or dy's dtype", d)),
        }
    })
}

fn colsum_go<T: Element, D: Element>(
    dy: &[T],
    z: &[T],
    g: &[f32],
    n: &[f32],
    rows: usize,
    cols: usize,
    want_dz: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut dm = vec![0f32; cols];
    let mut dz = if want_dz {
        vec![D::from_f32(0.0); rows * cols]
    } else {
        Vec::new()
    };
    // Column chunks: ≥ 4 per thread, ≥ 64 columns (a cache line of every row per step).
    let chunk = cols
        .div_ceil(4 * rayon::current_num_threads().max(1))
        .clamp(64, 1024)
        .min(cols.max(1));
    let dzp = SendPtr(dz.as_mut_ptr());
    dm.par_chunks_mut(chunk).enumerate().for_each(|(ci, dmc)| {
        let j0 = ci * chunk;
        let w = dmc.len();
        let mut part = vec![0f32; 8 * w];
        for t in 0..rows {
            let p = &mut part[(t % 8) * w..(t % 8 + 1) * w];
            let (dr, zr) = (
                &dy[t * cols + j0..t * cols + j0 + w],
                &z[t * cols + j0..t * cols + j0 + w],
            );
            for ((p, d), zz) in p.iter_mut().zip(dr).zip(zr) {
                *p += d.to_f32() * zz.to_f32();
            }
            if want_dz {
                // SAFETY: this task writes only dz[t, j0..j0 + w]; column chunks are disjoint and in
                // bounds (j0 + w <= cols, t < rows, dz holds rows * cols elements).
                let dst = unsafe { std::slice::from_raw_parts_mut(dzp.get().add(t * cols + j0), w) };
                for ((o, d), &gj) in dst.iter_mut().zip(dr).zip(&g[j0..j0 + w]) {
                    *o = D::from_f32(d.to_f32() * gj);
                }
            }
        }
        for (jj, o) in dmc.iter_mut().enumerate() {
            let mut s = 0f32;
            for k in 0..8 {
                s += part[k * w + jj];
            }
            *o = s / floor(n[j0 + jj]);
        }
    });
    let dz = if want_dz {
        Some(Tensor::from_vec(dz, &[rows, cols], Device::Cpu)?)
    } else {
        None
    };
    Ok((vec_tensor(dm, &[cols])?, dz))
}

/// Twin of `dora_full_norm_grad`: `(dB extra [out, r], Cᵀ [r, out])`.
pub(super) fn full_norm_grad(
    dm: &Tensor,
    g: &Tensor,
    n: &Tensor,
    b32: &Tensor,
    pt: &Tensor,
    gram: &Tensor,
    s: f32,
) -> Result<(Tensor, Tensor)> {
    let op = "dora full_norm_grad";
    let (out, r) = b32.dims2(op)?;
    let (dm, g, n, b, pt, gram) = (
        f32s(dm, op)?,
        f32s(g, op)?,
        f32s(n, op)?,
        f32s(b32, op)?,
        f32s(pt, op)?,
        f32s(gram, op)?,
    );
    let mut dbx = vec![0f32; out * r];
    let mut ct = vec![0f32; r * out];
    for i in 0..out {
        let c = -((g[i] * dm[i]) / floor(n[i]));
        let bi = &b[i * r..(i + 1) * r];
        let sc = s * c;
        for k in 0..r {
            let mut t = 0f32;
            for l in 0..r {
                t += bi[l] * gram[l * r + k];
            }
            dbx[i * r + k] = sc * (pt[k * out + i] + s * t);
            ct[k * out + i] = c * bi[k];
        }
    }
    Ok((vec_tensor(dbx, &[out, r])?, vec_tensor(ct, &[r, out])?))
}

/// Twin of `dora_merge_rows`: mode 0 `f_i·(w + d)`, mode 1 `w / f_i - d` (f32 `[rows, cols]`).
pub(super) fn merge_rows(w: &Tensor, d: &Tensor, f: &Tensor, unmerge: bool) -> Result<Tensor> {
    let op = "dora merge";
    let (rows, cols) = w.dims2(op)?;
    let (wv, dv, fv) = (f32s(w, op)?, f32s(d, op)?, f32s(f, op)?);
    let mut y = vec![0f32; rows * cols];
    if cols > 0 {
        y.par_chunks_mut(cols).enumerate().for_each(|(i, yr)| {
            let (wr, dr, fi) = (
                &wv[i * cols..(i + 1) * cols],
                &dv[i * cols..(i + 1) * cols],
                fv[i],
            );
            for ((o, &w), &d) in yr.iter_mut().zip(wr).zip(dr) {
                *o = if unmerge { w / fi - d } else { fi * (w + d) };
            }
        });
    }
    vec_tensor(y, &[rows, cols])
}

/// Twin of `dora_scale_of`: `m / max(n, eps)`.
pub(super) fn scale_of(m: &Tensor, n: &Tensor) -> Result<Tensor> {
    let op = "dora scale_of";
    let (m, n) = (f32s(m, op)?, f32s(n, op)?);
    vec_tensor(m.iter().zip(n).map(|(&m, &n)| m / floor(n)).collect(), &[n.len()])
}
