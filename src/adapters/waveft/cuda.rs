//! CUDA launches of `kernels/waveft.cu` (the CPU twins are in `cpu.rs`).

use super::WaveFtPositions;
use super::structure::HostStructure;
use crate::device::Device;
use crate::device::cuda::{CudaBackend, grid_1d, kernels as k};
use crate::error::{Error, Result};
use crate::tensor::cuda::{CudaStorage, alloc, storage, typed, wrap};
use crate::tensor::{DType, Storage, Tensor};
use cudarc::driver::LaunchConfig;
use std::sync::Arc;

/// Tokens per block step of `waveft_spmm_*` (`SPMM_TOK` in the kernel).
const SPMM_TOK: usize = 8;

/// The structure's arrays on one GPU (i32 indices, f32 weights).
#[derive(Clone)]
pub(crate) struct DeviceStructure {
    row_ptr: Tensor,
    pos_row: Tensor,
    pos_col: Tensor,
    syn_ptr: Tensor,
    syn_coef: Tensor,
    syn_w: Tensor,
    ana_ptr: Tensor,
    ana_pos: Tensor,
    ana_w: Tensor,
    col_ptr: Tensor,
    col_row: Tensor,
    col_perm: Tensor,
}

impl DeviceStructure {
    pub(crate) fn upload(h: &HostStructure, device: Device) -> Result<DeviceStructure> {
        let i = |v: &Vec<i32>| Tensor::from_slice(v, &[v.len()], device);
        let f = |v: &Vec<f32>| Tensor::from_slice(v, &[v.len()], device);
        Ok(DeviceStructure {
            row_ptr: i(&h.row_ptr)?,
            pos_row: i(&h.pos_row)?,
            pos_col: i(&h.pos_col)?,
            syn_ptr: i(&h.syn_ptr)?,
            syn_coef: i(&h.syn_coef)?,
            syn_w: f(&h.syn_w)?,
            ana_ptr: i(&h.ana_ptr)?,
            ana_pos: i(&h.ana_pos)?,
            ana_w: f(&h.ana_w)?,
            col_ptr: i(&h.col_ptr)?,
            col_row: i(&h.col_row)?,
            col_perm: i(&h.col_perm)?,
        })
    }
}

fn cs(t: &Tensor) -> Result<&CudaStorage> {
    storage(t, "waveft")
}

fn structure(pos: &WaveFtPositions) -> Result<&DeviceStructure> {
    pos.dev
        .as_ref()
        .ok_or_else(|| Error::device("waveft", "the WaveFT structure has no CUDA copy"))
}

fn i64_of(n: usize, what: &str) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::invalid(format!("waveft: {what} = {n} exceeds i64")))
}

/// (v_row, v_col): the scaled values of every nonzero of ΔW in row and in column order.
fn synth(
    b: &Arc<CudaBackend>,
    d: &DeviceStructure,
    spectrum: &Tensor,
    scaling: f32,
    nnz: usize,
) -> Result<(CudaStorage, CudaStorage)> {
    let mut v_row = alloc(b, DType::F32, nnz)?;
    let mut v_col = alloc(b, DType::F32, nnz)?;
    if nnz == 0 {
        return Ok((v_row, v_col));
    }
    let nnz64 = i64_of(nnz, "nnz")?;
    let (s, sp, sc, sw, cp) = (
        cs(spectrum)?.view::<f32>()?,
        cs(&d.syn_ptr)?.view::<i32>()?,
        cs(&d.syn_coef)?.view::<i32>()?,
        cs(&d.syn_w)?.view::<f32>()?,
        cs(&d.col_perm)?.view::<i32>()?,
    );
    {
        let (mut vr, mut vc) = (v_row.view_mut::<f32>()?, v_col.view_mut::<f32>()?);
        // SAFETY: waveft_synth(const float* spectrum [n], const int* syn_ptr [nnz+1], const int*
        // syn_coef [E], const float* syn_w [E], const int* col_perm [nnz], float, float* v_row [nnz],
        // float* v_col [nnz], int64 nnz). The structure arrays were built together on the host (syn_ptr
        // ends at E, coefficients < n = spectrum length checked by the caller, col_perm entries < nnz);
        // the outputs hold nnz floats; grid-stride over nnz.
        unsafe {
            k::waveft::waveft_synth(
                b,
                grid_1d(nnz, 256)?,
                &s,
                &sp,
                &sc,
                &sw,
                &cp,
                scaling,
                &mut vr,
                &mut vc,
                nnz64,
            )
        }?;
    }
    Ok((v_row, v_col))
}

/// y (+)= x·Mᵀ with M in CSR (`ptr`, `idx`, `vals`) over y's columns.
#[allow(clippy::too_many_arguments)]
fn spmm(
    b: &Arc<CudaBackend>,
    dtype: DType,
    x: &CudaStorage,
    tokens: usize,
    k_dim: usize,
    ptr: &Tensor,
    idx: &Tensor,
    vals: &CudaStorage,
    y: &mut CudaStorage,
    n_dim: usize,
    accumulate: bool,
) -> Result<()> {
    if tokens == 0 || n_dim == 0 {
        return Ok(());
    }
    let gx = n_dim.div_ceil(128);
    if gx > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "waveft: {n_dim} columns exceed one CUDA grid"
        )));
    }
    let cfg = LaunchConfig {
        grid_dim: (gx as u32, tokens.div_ceil(SPMM_TOK).min(65535) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (t64, k64, n64) = (
        i64_of(tokens, "tokens")?,
        i64_of(k_dim, "k")?,
        i64_of(n_dim, "n")?,
    );
    let acc: i32 = accumulate.into();
    let (pv, iv, vv) = (
        cs(ptr)?.view::<i32>()?,
        cs(idx)?.view::<i32>()?,
        vals.view::<f32>()?,
    );
    typed!(dtype, "waveft", |T| {
        let xv = x.view::<T>()?;
        let mut yv = y.view_mut::<T>()?;
        // SAFETY: waveft_spmm_<T>(const T* x [tokens*k_dim], int64 tokens, int64 k_dim, const int* ptr
        // [n_dim+1], const int* idx [nnz], const float* vals [nnz], T* y [tokens*n_dim], int64 n_dim, int
        // accumulate). The tensors' shapes were checked by the caller; ptr is a CSR over n_dim rows
        // whose idx entries are < k_dim (built on the host); threads with r >= n_dim return; token
        // groups stride by gridDim.y·8 < tokens bound.
        unsafe { k::waveft::waveft_spmm::<T>(b, cfg, &xv, t64, k64, &pv, &iv, &vv, &mut yv, n64, acc) }
    })
}

/// Allocates `[.., out]` and writes `x·ΔWᵀ` into it.
pub(crate) fn forward(
    pos: &WaveFtPositions,
    x: &Tensor,
    spectrum: &Tensor,
    scaling: f32,
    tokens: usize,
    shape: &[usize],
) -> Result<Tensor> {
    let xs = cs(x)?;
    let b = xs.backend.clone();
    let mut y = alloc(&b, x.dtype(), tokens * pos.out)?;
    forward_into_storage(pos, x, spectrum, scaling, &mut y, false, tokens)?;
    Ok(wrap(y, shape, x.dtype()))
}

/// `y += x·ΔWᵀ` in place.
pub(crate) fn forward_add(
    pos: &WaveFtPositions,
    x: &Tensor,
    spectrum: &Tensor,
    scaling: f32,
    y: &mut Tensor,
    tokens: usize,
) -> Result<()> {
    match y.storage_mut()? {
        Storage::Cuda(ys) => forward_into_storage(pos, x, spectrum, scaling, ys, true, tokens),
        Storage::Cpu(_) => Err(Error::device("waveft_forward_add", "y on the CPU, x on CUDA")),
    }
}

fn forward_into_storage(
    pos: &WaveFtPositions,
    x: &Tensor,
    spectrum: &Tensor,
    scaling: f32,
    y: &mut CudaStorage,
    accumulate: bool,
    tokens: usize,
) -> Result<()> {
    let d = structure(pos)?;
    let xs = cs(x)?;
    let b = xs.backend.clone();
    let (v_row, _) = synth(&b, d, spectrum, scaling, pos.nnz())?;
    spmm(
        &b,
        x.dtype(),
        xs,
        tokens,
        pos.inp,
        &d.row_ptr,
        &d.pos_col,
        &v_row,
        y,
        pos.out,
        accumulate,
    )
}

/// dspectrum, and dx (+)= dy·ΔW when `dx` is given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    pos: &WaveFtPositions,
    x: &Tensor,
    dy: &Tensor,
    spectrum: &Tensor,
    scaling: f32,
    dx: Option<&mut Tensor>,
    accumulate: bool,
    tokens: usize,
) -> Result<Tensor> {
    let d = structure(pos)?;
    let b = cs(x)?.backend.clone();
    let (nnz, n) = (pos.nnz(), pos.n_frequency());
    let (_, v_col) = synth(&b, d, spectrum, scaling, nnz)?;
    // G = dyᵀ·x at the nonzeros, over transposed operands so each dot product reads contiguous rows.
    let mut g = alloc(&b, DType::F32, nnz)?;
    if nnz > 0 {
        let xt = x.reshape(&[tokens, pos.inp])?.t()?;
        let dyt = dy.reshape(&[tokens, pos.out])?.t()?;
        // 8 warps per block, one warp per position, grid-stride beyond 2^20 blocks.
        let blocks = nnz.div_ceil(8).min(1 << 20);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (t64, nnz64) = (i64_of(tokens, "tokens")?, i64_of(nnz, "nnz")?);
        let (pr, pc) = (cs(&d.pos_row)?.view::<i32>()?, cs(&d.pos_col)?.view::<i32>()?);
        typed!(x.dtype(), "waveft", |T| {
            let (a, bb) = (cs(&dyt)?.view::<T>()?, cs(&xt)?.view::<T>()?);
            let mut gv = g.view_mut::<f32>()?;
            // SAFETY: waveft_sddmm_<T>(const T* dyT [out*tokens], const T* xT [in*tokens], int64 tokens,
            // const int* pos_row [nnz], const int* pos_col [nnz], int64 nnz, float* g [nnz]); rows < out
            // and cols < in by construction of the structure; warps stride over nnz.
            unsafe { k::waveft::waveft_sddmm::<T>(&b, cfg, &a, &bb, t64, &pr, &pc, nnz64, &mut gv) }
        })?;
    }
    let mut ds = alloc(&b, DType::F32, n)?;
    {
        let n64 = i64_of(n, "n")?;
        let (gv, ap, apos, aw) = (
            g.view::<f32>()?,
            cs(&d.ana_ptr)?.view::<i32>()?,
            cs(&d.ana_pos)?.view::<i32>()?,
            cs(&d.ana_w)?.view::<f32>()?,
        );
        let mut dv = ds.view_mut::<f32>()?;
        // SAFETY: waveft_analysis(const float* g [nnz], const int* ana_ptr [n+1], const int* ana_pos [E],
        // const float* ana_w [E], float, float* dspectrum [n], int64 n); ana_pos entries < nnz by
        // construction; grid-stride over n.
        unsafe {
            k::waveft::waveft_analysis(&b, grid_1d(n, 256)?, &gv, &ap, &apos, &aw, scaling, &mut dv, n64)
        }?;
    }
    if let Some(dx) = dx {
        let dys = cs(dy)?;
        match dx.storage_mut()? {
            Storage::Cuda(dxs) => spmm(
                &b,
                x.dtype(),
                dys,
                tokens,
                pos.out,
                &d.col_ptr,
                &d.col_row,
                &v_col,
                dxs,
                pos.inp,
                accumulate,
            )?,
            Storage::Cpu(_) => return Err(Error::device("waveft_backward", "dx on the CPU, x on CUDA")),
        }
    }
    Ok(wrap(ds, &[n], DType::F32))
}
