//! DoRA with dropout on the CPU in one dense product with W per pass instead of two.
//!
//! PEFT's DoRA with dropout (`peft/tuners/lora/layer.py`, `Linear.forward`, and `dora.py`,
//! `DoraLinearLayer.forward`) evaluates the base layer twice, on the clean x and on `xd = drop(x)`:
//! `y = W·x + b + (g - 1) ⊙ (W·xd) + g ⊙ lr` with `g = m / n` and `lr = s·B·A·xd`. Both products are
//! dense `[tokens, in]·Wᵀ`, so a training step of DoRA costs two forward and two input-gradient
//! products per adapted linear where LoRA costs one each. But the two inputs differ only where the
//! mask drops an element (a fraction p of them, 0.1 in the usual recipes): with `q = 1 / (1 - p)` and
//! `x_D` = x at the dropped positions (zero elsewhere), `W·x = (1 - p)·W·xd + W·x_D`, hence
//!
//! `y = (g - p) ⊙ z_d + p·(u·Bᵀ) + b + x_D·Wᵀ`,  `z_d = [xd | u]·[W | B]ᵀ`,  `u = s·xd·Aᵀ`,
//!
//! with the one dense product `z_d` that the layer computes anyway (with the norm's rows fused in) and
//! a sparse product `x_D·Wᵀ` (p·tokens·in rows of Wᵀ, each an axpy over `out`). The backward pass,
//! `dx = dy·W + drop((dy ⊙ (g - 1))·W + s·(dy ⊙ g)·B·A)`, is one dense fused product at the kept
//! positions, `dx = (dy ⊙ (1 + q·(g - 1)))·W + q·v·A` with `v = s·(dy ⊙ g)·B`, and at the dropped
//! positions the clean gradient alone, `dx[t, j] = dy[t]·W[:, j]` (a dot with row j of Wᵀ), written
//! over the dense result.
//!
//! Napkin (MiniLM, hidden 384, FFN 1536, r = 8, p = 0.1, a batch of 249 tokens, every linear adapted):
//! the dense products of the six layers are 2.64 GMAC per pass; the second pair that PEFT's formula
//! needs is another 2 × 2.64 GMAC (≈ 100 ms of a step on two cores); the sparse products that replace
//! it are 2 × 0.26 GMAC of streaming axpys and dots over rows of Wᵀ that sit in L2 (≈ 10 ms), plus a
//! transposed copy of each dense W (the bytes of W again, built on the first training step).
//!
//! Used for a dense f32 W and f32 activations with `0 < p ≤` [`MAX_P`] (above it the sparse product
//! stops paying for itself); a 4-bit W would need its columns decoded and keeps the two products.

use crate::Device;
use crate::error::{Error, Result};
use crate::qmatmul::BaseWeight;
use crate::tensor::{DType, Tensor, dropout_hash, dropout_threshold};
use rayon::prelude::*;

/// The largest dropout probability the sparse path takes: at p the sparse products cost ≈ 3p of a
/// dense one (axpys and dots run at about a third of the GEMM's rate), so it wins up to p ≈ 0.3.
pub(super) const MAX_P: f32 = 0.25;

/// Rows of x per rayon task.
const MIN_ROWS: usize = 4;

/// The columns of each row that the dropout mask of `(p, seed)` drops (the positions where
/// [`Tensor::dropout`] writes 0), in ascending order.
#[derive(Clone, Debug)]
pub(crate) struct Dropped {
    rows: Vec<Vec<u32>>,
}

/// Whether the sparse path applies: CPU, f32 activations, a dense f32 W, `0 < p ≤ MAX_P`, and column
/// indices that fit in u32.
pub(super) fn applicable(base: &BaseWeight, x: &Tensor, p: f32) -> bool {
    let dense_f32 = matches!(base, BaseWeight::Dense(w) if w.dtype() == DType::F32 && w.device().is_cpu());
    dense_f32
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && p > 0.0
        && p <= MAX_P
        && u32::try_from(base.in_features()).is_ok()
}

/// `xd = x.dropout(p, seed)` (the same bits) and the dropped positions, in one pass over f32
/// `x [rows, cols]`.
pub(super) fn split(x: &Tensor, p: f32, seed: u64) -> Result<(Tensor, Dropped)> {
    let op = "dora dropout split";
    let (rows, cols) = x.dims2(op)?;
    let xv = x.cpu_data::<f32>(op)?;
    let (threshold, scale) = (dropout_threshold(p), 1.0 / (1.0 - p));
    let mut xd = vec![0f32; rows * cols];
    let mut lists = vec![Vec::new(); rows];
    if cols > 0 {
        let isa = Isa::get();
        xd.par_chunks_mut(cols)
            .zip(lists.par_iter_mut())
            .enumerate()
            .with_min_len(MIN_ROWS)
            .for_each_init(
                || vec![0u8; cols],
                |keep, (t, (dr, list))| {
                    let base = (t * cols) as u64;
                    mask_row(isa, keep, base, threshold, seed);
                    for (((o, &x), &k), j) in dr.iter_mut().zip(&xv[t * cols..]).zip(keep.iter()).zip(0u32..)
                    {
                        if k == 0 {
                            list.push(j);
                        } else {
                            *o = x * scale;
                        }
                    }
                },
            );
    }
    Ok((
        Tensor::from_vec(xd, &[rows, cols], Device::Cpu)?,
        Dropped { rows: lists },
    ))
}

/// `xd` rebuilt from x and the dropped positions (the bits of `x.dropout(p, seed)`) without hashing.
pub(super) fn redrop(x: &Tensor, p: f32, d: &Dropped) -> Result<Tensor> {
    let op = "dora dropout redrop";
    let (rows, cols) = x.dims2(op)?;
    check_rows(d, rows, op)?;
    let xv = x.cpu_data::<f32>(op)?;
    let scale = 1.0 / (1.0 - p);
    let mut xd = vec![0f32; rows * cols];
    if cols > 0 {
        xd.par_chunks_mut(cols)
            .zip(d.rows.par_iter())
            .enumerate()
            .with_min_len(MIN_ROWS)
            .for_each(|(t, (dr, list))| {
                for (o, &x) in dr.iter_mut().zip(&xv[t * cols..]) {
                    *o = x * scale;
                }
                for &j in list {
                    dr[j as usize] = 0.0;
                }
            });
    }
    Tensor::from_vec(xd, &[rows, cols], Device::Cpu)
}

fn check_rows(d: &Dropped, rows: usize, op: &'static str) -> Result<()> {
    if d.rows.len() != rows {
        return Err(Error::shape(
            op,
            format!("{} mask rows for {rows} input rows", d.rows.len()),
        ));
    }
    Ok(())
}

/// The operands of [`output`] (all f32 on the CPU).
pub(super) struct Output<'a> {
    /// `z_d = [xd | u]·[W | B]ᵀ`; its first `rows(x)` rows are used.
    pub zc: &'a Tensor,
    /// The clean input `[tokens, in]`.
    pub x: &'a Tensor,
    /// `Wᵀ [in, out]`.
    pub wt: &'a Tensor,
    /// `u = s·xd·Aᵀ [tokens, r]`.
    pub u: &'a Tensor,
    /// `B [out, r]`.
    pub b: &'a Tensor,
    /// `g = m / n [out]`.
    pub g: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub p: f32,
}

/// `y = (g - p) ⊙ z_d + p·(u·Bᵀ) + b + x_D·Wᵀ` (f32 `[tokens, out]`): the DoRA output with dropout.
pub(super) fn output(o: &Output<'_>, d: &Dropped) -> Result<Tensor> {
    let op = "dora sparse dropout output";
    let ((tokens, inp), (zrows, out), r) = (o.x.dims2(op)?, o.zc.dims2(op)?, o.u.dims2(op)?.1);
    check_rows(d, tokens, op)?;
    if zrows < tokens || o.wt.shape() != [inp, out] || o.b.shape() != [out, r] || o.g.shape() != [out] {
        return Err(Error::shape(
            op,
            format!(
                "z {:?}, Wᵀ {:?}, B {:?}, g {:?} for x {:?}",
                o.zc.shape(),
                o.wt.shape(),
                o.b.shape(),
                o.g.shape(),
                o.x.shape()
            ),
        ));
    }
    fn f(t: &Tensor) -> Result<&[f32]> {
        t.cpu_data::<f32>("dora sparse dropout output")
    }
    let (zv, xv, wt, uv, bv, gv) = (f(o.zc)?, f(o.x)?, f(o.wt)?, f(o.u)?, f(o.b)?, f(o.g)?);
    let bias = o.bias.map(f).transpose()?;
    let p = o.p;
    // Bᵀ [r, out], so that p·u·Bᵀ is r axpys per row; g - p once.
    let mut bt = vec![0f32; r * out];
    for i in 0..out {
        for k in 0..r {
            bt[k * out + i] = bv[i * r + k];
        }
    }
    let gp: Vec<f32> = gv.iter().map(|&g| g - p).collect();
    let mut y = vec![0f32; tokens * out];
    if out > 0 {
        let isa = Isa::get();
        y.par_chunks_mut(out)
            .zip(d.rows.par_iter())
            .enumerate()
            .with_min_len(MIN_ROWS)
            .for_each(|(t, (yr, list))| {
                let zr = &zv[t * out..(t + 1) * out];
                match bias {
                    Some(b) => {
                        for (((y, &z), &c), &b) in yr.iter_mut().zip(zr).zip(&gp).zip(b) {
                            *y = c * z + b;
                        }
                    }
                    None => {
                        for ((y, &z), &c) in yr.iter_mut().zip(zr).zip(&gp) {
                            *y = c * z;
                        }
                    }
                }
                let ur = &uv[t * r..(t + 1) * r];
                let xr = &xv[t * inp..(t + 1) * inp];
                let low = ur
                    .iter()
                    .enumerate()
                    .map(|(k, &u)| (p * u, &bt[k * out..(k + 1) * out]));
                let drop = list
                    .iter()
                    .map(|&j| (xr[j as usize], &wt[j as usize * out..(j as usize + 1) * out]));
                axpy_rows(isa, yr, low.chain(drop));
            });
    }
    Tensor::from_vec(y, &[tokens, out], Device::Cpu)
}

/// Overwrites the dropped positions of `dx [tokens, in]` with the clean gradient `dy[t]·Wᵀ[j]`
/// (`dy [tokens, out]`, `Wᵀ [in, out]`, all f32).
pub(super) fn fix_dx(dx: &mut Tensor, dy: &Tensor, wt: &Tensor, d: &Dropped) -> Result<()> {
    let op = "dora sparse dropout dx";
    let ((tokens, inp), (dyrows, out)) = (dx.dims2(op)?, dy.dims2(op)?);
    check_rows(d, tokens, op)?;
    if dyrows != tokens || wt.shape() != [inp, out] {
        return Err(Error::shape(
            op,
            format!("dy {:?}, Wᵀ {:?} for dx {:?}", dy.shape(), wt.shape(), dx.shape()),
        ));
    }
    let (dyv, wv) = (dy.cpu_data::<f32>(op)?, wt.cpu_data::<f32>(op)?);
    let dxv = dx.cpu_data_mut::<f32>(op)?;
    if inp > 0 {
        let isa = Isa::get();
        dxv.par_chunks_mut(inp)
            .zip(d.rows.par_iter())
            .enumerate()
            .with_min_len(MIN_ROWS)
            .for_each(|(t, (dr, list))| {
                dot_rows(isa, dr, &dyv[t * out..(t + 1) * out], wv, out, list);
            });
    }
    Ok(())
}

/// `y += Σ a·w` over the terms `(a, w)` (each `w` as long as `y`).
#[inline(always)]
fn axpy_body<'a>(y: &mut [f32], terms: impl Iterator<Item = (f32, &'a [f32])>) {
    for (a, w) in terms {
        for (y, &w) in y.iter_mut().zip(w) {
            *y += a * w;
        }
    }
}

/// `dst[j] = dy·wt[j]` for every j in `list` (rows of `wt` as long as `dy`); 16 partial sums.
#[inline(always)]
fn dot_body(dst: &mut [f32], dy: &[f32], wt: &[f32], out: usize, list: &[u32]) {
    for &j in list {
        let w = &wt[j as usize * out..(j as usize + 1) * out];
        let mut acc = [0f32; 16];
        let (cd, cw) = (dy.chunks_exact(16), w.chunks_exact(16));
        let (rd, rw) = (cd.remainder(), cw.remainder());
        for (a, b) in cd.zip(cw) {
            for l in 0..16 {
                acc[l] += a[l] * b[l];
            }
        }
        let mut s = 0f32;
        for (a, b) in rd.iter().zip(rw) {
            s += a * b;
        }
        dst[j as usize] = acc.iter().sum::<f32>() + s;
    }
}

/// `keep[j] = (dropout_hash(seed, base + j) >= threshold)`: [`Tensor::dropout`]'s predicate.
#[inline(always)]
fn mask_body(keep: &mut [u8], base: u64, threshold: u64, seed: u64) {
    for (j, k) in keep.iter_mut().enumerate() {
        *k = u8::from(dropout_hash(seed, base + j as u64) as u64 >= threshold);
    }
}

/// The three kernels compiled for an ISA (the bodies vectorize to its width; the hash's 64-bit
/// multiplies need AVX-512DQ's `vpmullq`).
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{axpy_body, dot_body, mask_body};

    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    pub(super) fn axpy512<'a>(y: &mut [f32], terms: impl Iterator<Item = (f32, &'a [f32])>) {
        axpy_body(y, terms)
    }
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    pub(super) fn dot512(dst: &mut [f32], dy: &[f32], wt: &[f32], out: usize, list: &[u32]) {
        dot_body(dst, dy, wt, out, list)
    }
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    pub(super) fn mask512(keep: &mut [u8], base: u64, threshold: u64, seed: u64) {
        mask_body(keep, base, threshold, seed)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn axpy256<'a>(y: &mut [f32], terms: impl Iterator<Item = (f32, &'a [f32])>) {
        axpy_body(y, terms)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot256(dst: &mut [f32], dy: &[f32], wt: &[f32], out: usize, list: &[u32]) {
        dot_body(dst, dy, wt, out, list)
    }
}

/// The instruction set of the kernels, detected once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// AVX-512 F, DQ and VL.
    Avx512,
    /// AVX2 and FMA.
    Avx2,
    Portable,
}

impl Isa {
    fn get() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") && has!("avx512dq") && has!("avx512vl") {
                    return Isa::Avx512;
                }
                if has!("avx2") && has!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }
}

fn axpy_rows<'a>(isa: Isa, y: &mut [f32], terms: impl Iterator<Item = (f32, &'a [f32])>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::get` detected AVX-512 F, DQ and VL on this CPU.
        Isa::Avx512 => unsafe { simd::axpy512(y, terms) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::get` detected AVX2 and FMA.
        Isa::Avx2 => unsafe { simd::axpy256(y, terms) },
        _ => axpy_body(y, terms),
    }
}

fn dot_rows(isa: Isa, dst: &mut [f32], dy: &[f32], wt: &[f32], out: usize, list: &[u32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::get` detected AVX-512 F, DQ and VL.
        Isa::Avx512 => unsafe { simd::dot512(dst, dy, wt, out, list) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::get` detected AVX2 and FMA.
        Isa::Avx2 => unsafe { simd::dot256(dst, dy, wt, out, list) },
        _ => dot_body(dst, dy, wt, out, list),
    }
}

fn mask_row(isa: Isa, keep: &mut [u8], base: u64, threshold: u64, seed: u64) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::get` detected AVX-512 F, DQ and VL.
        Isa::Avx512 => unsafe { simd::mask512(keep, base, threshold, seed) },
        _ => mask_body(keep, base, threshold, seed),
    }
}
