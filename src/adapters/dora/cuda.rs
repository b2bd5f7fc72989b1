//! CUDA launches of `kernels/dora.cu` (napkin math beside each kernel there). Same functions and
//! contracts as `cpu.rs`, which is their oracle.

use super::NORM_EPS;
use crate::device::cuda::kernels as k;
use crate::device::cuda::{CudaBackend, KernelElem, grid_1d};
use crate::error::{Error, Result};
use crate::qmatmul::{Algo, BaseWeight, linear_forward};
use crate::quant::cuda::q4_params;
use crate::tensor::cuda::{CudaStorage, alloc, storage, typed, wrap};
use crate::tensor::{DType, Tensor};
use cudarc::driver::{CudaView, LaunchConfig};
use std::sync::Arc;

// The kernels define the same constant; they must agree.
const _: () = assert!(NORM_EPS == 1e-12);

fn f32_cuda<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaStorage> {
    if t.dtype() != DType::F32 {
        return Err(Error::dtype(op, "f32", t.dtype()));
    }
    storage(t, op)
}

/// An f32 view of an optional operand.
fn view_opt<T: KernelElem>(t: Option<&CudaStorage>) -> Result<Option<CudaView<'_, T>>> {
    t.map(|s| s.view::<T>()).transpose()
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} exceeds the kernel's i32 range")))
}

fn i64_of(v: usize) -> i64 {
    // Sizes come from allocations, far below i64::MAX.
    v as i64
}

/// A grid of (column blocks of 256 threads, row strides) for the row-strided elementwise kernels.
fn grid_cols_rows(rows: usize, cols: usize) -> Result<LaunchConfig> {
    let gx = cols.div_ceil(256).max(1);
    if gx > i32::MAX as usize {
        return Err(Error::invalid(format!("{cols} columns exceed one CUDA grid")));
    }
    // Enough blocks to fill the GPU (~8 per SM over 132 SMs), at most one per row.
    let gy = rows.clamp(1, (2048 / gx).clamp(1, 65535));
    Ok(LaunchConfig {
        grid_dim: (gx as u32, gy as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn backend_of(t: &Tensor, op: &'static str) -> Result<Arc<CudaBackend>> {
    Ok(storage(t, op)?.backend.clone())
}

/// `‖W_i‖²` (f32 `[out]`): `Tensor::row_sq_norms` for a dense W, `dora_q4_row_sq_norms` for 4-bit.
pub(super) fn row_sq_norms(base: &BaseWeight) -> Result<Tensor> {
    let q = match base {
        BaseWeight::Dense(w) => return w.row_sq_norms(),
        BaseWeight::KBit(k) => return k.dequantize(DType::F32)?.row_sq_norms(),
        BaseWeight::Quantized(q) => q,
    };
    let op = "dora row_sq_norms";
    let (rows, cols) = (base.out_features(), base.in_features());
    let (q4, dq) = q4_params(q)?;
    let b = backend_of(&q.data, op)?;
    let mut out = alloc(&b, DType::F32, rows)?;
    if rows == 0 {
        return Ok(wrap(out, &[rows], DType::F32));
    }
    // One warp per row, 8 rows per 256-thread block.
    let gx = u32::try_from(rows.div_ceil(8)).map_err(|_| Error::invalid(format!("{op}: {rows} rows")))?;
    let cfg = LaunchConfig {
        grid_dim: (gx, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (r64, c64) = (i64_of(rows), i64_of(cols));
    // SAFETY: dora_q4_row_sq_norms_dq<D>(Q4_PARAMS, float* out [rows], int64 rows, int64 cols). The base
    // weight was validated (packed bytes = ceil(rows*cols/2), absmax/codes/nested counts match the
    // blocksize), out holds rows f32; the grid covers rows with one warp each (the tail warps return).
    unsafe { k::dora::dora_q4_row_sq_norms(&b, cfg, dq, &q4, &mut out.view_mut()?, r64, c64) }?;
    Ok(wrap(out, &[rows], DType::F32))
}

/// `(n, m / n, Pᵀ, G)` of the current A and B: `dora_norm_prep` (G = A·Aᵀ, and A in the compute
/// dtype), the product `Pᵀ = A·Wᵀ` ([`weight_proj`], Pᵀ in the compute dtype), `dora_norm_assemble`.
/// `dtype` is the activation dtype; a dense W forces its own dtype.
#[allow(clippy::type_complexity)]
pub(super) fn norm(
    base: &BaseWeight,
    w_sq: &Tensor,
    a32: &Tensor,
    b32: &Tensor,
    m32: Option<&Tensor>,
    s: f32,
    dtype: DType,
) -> Result<(Tensor, Option<Tensor>, Tensor, Tensor)> {
    let op = "dora norm";
    let dtype = match base {
        BaseWeight::Dense(w) => w.dtype(),
        BaseWeight::Quantized(_) | BaseWeight::KBit(_) => dtype,
    };
    let (r, inp) = a32.dims2(op)?;
    let asr = f32_cuda(a32, op)?;
    let b = asr.backend.clone();
    let mut gram = alloc(&b, DType::F32, r * r)?;
    let mut a_t = if dtype != DType::F32 {
        Some(alloc(&b, dtype, r * inp)?)
    } else {
        None
    };
    if r > 0 {
        let pairs = u32::try_from(r * (r + 1) / 2)
            .map_err(|_| Error::invalid(format!("{op}: rank {r} too large")))?;
        let (r32, in64) = (i32_of(r, "rank")?, i64_of(inp));
        let cfg = LaunchConfig {
            grid_dim: (pairs, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        typed!(dtype, op, |T| {
            let mut a_tv = a_t.as_mut().map(|t| t.view_mut::<T>()).transpose()?;
            // SAFETY: dora_norm_prep_<T>(const float* a [r*in], float* gram [r*r], T* a_t [r*in] | null,
            // int r, int64 in). a is f32 [r, in] (checked); gram holds r*r f32; a_t, when present, r*in
            // elements of T = dtype (null for f32, where the kernel writes nothing there); one block per
            // pair k <= l, r(r+1)/2 blocks, so every G[k, l] and G[l, k] is written; static shared
            // memory 128 B.
            unsafe {
                k::dora::dora_norm_prep::<T>(
                    &b,
                    cfg,
                    &asr.view()?,
                    &mut gram.view_mut()?,
                    a_tv.as_mut(),
                    r32,
                    in64,
                )
            }
        })?;
    }
    let a_c = match a_t {
        Some(t) => wrap(t, &[r, inp], dtype),
        None => a32.clone(),
    };
    let pt = weight_proj(base, &a_c)?;
    let gram = wrap(gram, &[r, r], DType::F32);
    let (n, g) = norm_assemble(w_sq, &pt, b32, &gram, m32, s)?;
    Ok((n, g, pt, gram))
}

/// `Pᵀ = A·Wᵀ` (`[r, out]`, in A's dtype) through the fused 4-bit GEMV of `qmatmul` with the rows of A
/// as tokens. Never a dequantized W: for a 4-bit W, `r ≤ 16` is one GEMV (tensor cores for f16/bf16
/// when `in % 32 == 0`, f32 FMAs otherwise); larger r runs the tiled tensor-core GEMM when it applies
/// (f16/bf16, `in % 32 == 0`) and otherwise 16-row GEMV passes, because qmatmul's remaining fallback
/// would dequantize W. A dense W (A in its dtype) is one cuBLAS GEMM.
fn weight_proj(base: &BaseWeight, a: &Tensor) -> Result<Tensor> {
    let (r, inp) = a.dims2("dora weight_proj")?;
    let dtype = a.dtype();
    let one = |a: &Tensor| linear_forward(a, base, None, None, Algo::Fused);
    let single = match base {
        BaseWeight::Dense(_) | BaseWeight::KBit(_) => true,
        BaseWeight::Quantized(_) => r <= 16 || (dtype != DType::F32 && inp % 32 == 0),
    };
    if single {
        return one(a);
    }
    // 16-row chunks of A, each a GEMV over W, copied into one [r, out] buffer (device to device).
    let out = base.out_features();
    let es = dtype.size_in_bytes();
    let b = backend_of(a, "dora weight_proj")?;
    let mut pt = alloc(&b, dtype, r * out)?;
    for k0 in (0..r).step_by(16) {
        let kc = 16.min(r - k0);
        let rows = slice_rows(a, k0, kc, inp)?;
        let part = one(&rows)?;
        let src = storage(&part, "dora weight_proj")?;
        let mut dst = pt.data.slice_mut(k0 * out * es..(k0 + kc) * out * es);
        b.stream
            .memcpy_dtod(&src.data.slice(0..kc * out * es), &mut dst)?;
    }
    Ok(wrap(pt, &[r, out], dtype))
}

/// Rows `[k0, k0 + kc)` of a 2-D CUDA tensor with `cols` columns, as a new tensor.
fn slice_rows(t: &Tensor, k0: usize, kc: usize, cols: usize) -> Result<Tensor> {
    let s = storage(t, "dora slice_rows")?;
    let es = t.dtype().size_in_bytes();
    let b = s.backend.clone();
    let mut dst = alloc(&b, t.dtype(), kc * cols)?;
    b.stream.memcpy_dtod(
        &s.data.slice(k0 * cols * es..(k0 + kc) * cols * es),
        &mut dst.data,
    )?;
    Ok(wrap(dst, &[kc, cols], t.dtype()))
}

/// `Cᵀ·W` (f32 `[r, in]`) from f32 `Cᵀ [r, out]`. Dense W: one GEMM in W's dtype. 4-bit W:
/// `dora_q4_tgemv` (f32, any shape, deterministic) per 16 rows of Cᵀ, then `dora_tgemv_reduce`.
pub(super) fn weight_tproj(base: &BaseWeight, ct: &Tensor) -> Result<Tensor> {
    let op = "dora weight_tproj";
    let q = match base {
        BaseWeight::Dense(w) => return ct.to_dtype(w.dtype())?.matmul(w)?.to_dtype(DType::F32),
        BaseWeight::KBit(k) => return ct.matmul(&k.dequantize(DType::F32)?),
        BaseWeight::Quantized(q) => q,
    };
    let (r, out) = ct.dims2(op)?;
    let inp = base.in_features();
    let cs = f32_cuda(ct, op)?;
    let (q4, dq) = q4_params(q)?;
    let b = backend_of(&q.data, op)?;
    let mut y = alloc(&b, DType::F32, r * inp)?;
    if r == 0 || inp == 0 {
        return Ok(wrap(y, &[r, inp], DType::F32));
    }
    if out == 0 {
        b.stream.memset_zeros(&mut y.data)?;
        return Ok(wrap(y, &[r, inp], DType::F32));
    }
    let gx = inp.div_ceil(256);
    if gx > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "{op}: {inp} columns exceed one CUDA grid"
        )));
    }
    // Row groups: about two blocks per SM in total, ≥ 32 rows each, ≤ 16 groups (the workspace is
    // groups × 16 × in f32).
    let sms = b.sm_count()? as usize;
    let groups = (2 * sms).div_ceil(gx).clamp(1, 16).min(out.div_ceil(32)).max(1);
    let rows_per_group = out.div_ceil(groups);
    let groups = out.div_ceil(rows_per_group);
    let mut ws = alloc(&b, DType::F32, groups * 16.min(r) * inp)?;
    let (out64, in64, rpg64, g64) = (i64_of(out), i64_of(inp), i64_of(rows_per_group), i64_of(groups));
    let cs = cs.view::<f32>()?;
    let cfg = LaunchConfig {
        grid_dim: (gx as u32, groups as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    for k0 in (0..r).step_by(16) {
        let kc = 16.min(r - k0);
        let kc32 = i32_of(kc, "rank chunk")?;
        let ct_chunk = cs.slice(k0 * out..(k0 + kc) * out);
        // SAFETY: dora_q4_tgemv_dq<D>(Q4_PARAMS, const float* ct [kc*out], float* ws [groups*kc*in],
        // int64 out, int64 in, int r = kc <= 16, int64 rows_per_group). The weight was validated;
        // ct_chunk holds rows k0..k0+kc of the f32 [r, out] Cᵀ; ws holds groups*min(16, r)*in >=
        // groups*kc*in f32; grid (ceil(in/256), groups) with groups*rows_per_group >= out covers
        // every (column, row group); each (group, k, j) is written exactly once.
        unsafe {
            k::dora::dora_q4_tgemv(
                &b,
                cfg,
                dq,
                &q4,
                &ct_chunk,
                &mut ws.view_mut()?,
                out64,
                in64,
                kc32,
                rpg64,
            )
        }?;
        let (kc64, k064) = (i64_of(kc), i64_of(k0));
        // SAFETY: dora_tgemv_reduce(const float* ws [groups*kc*in], float* y [r*in], int64 groups,
        // int64 kc, int64 in, int64 k0): writes y[(k0 + k)*in + j] for k < kc, j < in, within y's r*in
        // elements since k0 + kc <= r; ws was fully written by the launch above (same stream).
        unsafe {
            k::dora::dora_tgemv_reduce(
                &b,
                grid_1d((kc * inp).min(1 << 24), 256)?,
                &ws.view()?,
                &mut y.view_mut()?,
                g64,
                kc64,
                in64,
                k064,
            )
        }?;
    }
    Ok(wrap(y, &[r, inp], DType::F32))
}

/// The dtypes of Pᵀ that `dora_norm_assemble_*` is instantiated for: every activation dtype.
fn check_pt_dtype(d: DType, op: &'static str) -> Result<()> {
    match d {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::dtype(op, "Pᵀ in f32, f16 or bf16", other)),
    }
}

/// `n` and, with `m`, `m / max(n, eps)` (both f32 `[out]`); Pᵀ in f32, f16 or bf16.
fn norm_assemble(
    wsq: &Tensor,
    pt: &Tensor,
    b32: &Tensor,
    gram: &Tensor,
    m32: Option<&Tensor>,
    s: f32,
) -> Result<(Tensor, Option<Tensor>)> {
    let op = "dora norm_assemble";
    let (out, r) = b32.dims2(op)?;
    // Pᵀ comes in the GEMV's (activation) dtype: dora_norm_assemble_{f32,f16,bf16} read it as is.
    check_pt_dtype(pt.dtype(), op)?;
    let (ws, ps, bs, gs) = (
        f32_cuda(wsq, op)?,
        storage(pt, op)?,
        f32_cuda(b32, op)?,
        f32_cuda(gram, op)?,
    );
    let ms = m32.map(|m| f32_cuda(m, op)).transpose()?;
    let b = ws.backend.clone();
    let mut n = alloc(&b, DType::F32, out)?;
    let mut scale = if ms.is_some() {
        Some(alloc(&b, DType::F32, out)?)
    } else {
        None
    };
    if out > 0 {
        let (out64, r32) = (i64_of(out), i32_of(r, "rank")?);
        let m = view_opt::<f32>(ms)?;
        let mut scale_v = scale.as_mut().map(|s| s.view_mut::<f32>()).transpose()?;
        let cfg = grid_1d(out.min(1 << 22), 128)?;
        typed!(pt.dtype(), op, |P| {
            // SAFETY: dora_norm_assemble_<P>(const float* wsq [out], const P* pt [r*out], const float* b
            // [out*r], const float* gram [r*r], const float* m [out] | null, float* n [out], float* scale
            // [out] | null, float s, int64 out, int r). P is pt's dtype, everything else f32 (checked),
            // sizes as the caller's shapes; scale is non-null exactly when m is; the grid-stride loop
            // covers out.
            unsafe {
                k::dora::dora_norm_assemble::<P>(
                    &b,
                    cfg,
                    &ws.view()?,
                    &ps.view()?,
                    &bs.view()?,
                    &gs.view()?,
                    m.as_ref(),
                    &mut n.view_mut()?,
                    scale_v.as_mut(),
                    s,
                    out64,
                    r32,
                )
            }
        })?;
    }
    Ok((
        wrap(n, &[out], DType::F32),
        scale.map(|s| wrap(s, &[out], DType::F32)),
    ))
}

/// `y = z·c (+ bias) (+ add)` in z's dtype over the first `rows` rows of z; `c`, `bias` f32 `[cols]`,
/// `add` like y.
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
    let dt = z.dtype();
    let zs = storage(z, op)?;
    let cs = f32_cuda(c, op)?;
    let bs = bias.map(|b| f32_cuda(b, op)).transpose()?;
    let adds = add.map(|a| storage(a, op)).transpose()?;
    let b = zs.backend.clone();
    let mut y = alloc(&b, dt, rows * cols)?;
    if rows * cols > 0 {
        let (r64, c64) = (i64_of(rows), i64_of(cols));
        let bias_v = view_opt::<f32>(bs)?;
        let cfg = grid_cols_rows(rows, cols)?;
        typed!(dt, op, |T| {
            let add_v = view_opt::<T>(adds)?;
            // SAFETY: dora_scale_cols_<T>(const T* z [>= rows*cols], const float* c [cols], const float*
            // bias [cols] | null, const T* add [rows*cols] | null, T* y [rows*cols], int64 rows, int64
            // cols). T is z's dtype; the caller checked c, bias (f32) and add (z's dtype and shape); the
            // grid covers every column and strides over all rows.
            unsafe {
                k::dora::dora_scale_cols::<T>(
                    &b,
                    cfg,
                    &zs.view()?,
                    &cs.view()?,
                    bias_v.as_ref(),
                    add_v.as_ref(),
                    &mut y.view_mut()?,
                    r64,
                    c64,
                )
            }
        })?;
    }
    Ok(wrap(y, &[rows, cols], dt))
}

/// `dm = (Σ_t dy·z) / max(n, eps)` and optionally `dz = dy·g` in `dz_dtype` (f32 or dy's dtype).
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
    if zcols != cols || zrows < rows || z.dtype() != dy.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "z {:?} {} does not cover dy {:?} {}",
                z.shape(),
                z.dtype(),
                dy.shape(),
                dy.dtype()
            ),
        ));
    }
    let dt = dy.dtype();
    if let Some(d) = dz_dtype
        && d != DType::F32
        && d != dt
    {
        return Err(Error::dtype(op, "dz in f32 or dy's dtype", d));
    }
    let (dys, zs, gs, ns) = (
        storage(dy, op)?,
        storage(z, op)?,
        f32_cuda(g, op)?,
        f32_cuda(n, op)?,
    );
    let b = dys.backend.clone();
    let mut dm = alloc(&b, DType::F32, cols)?;
    let dzd = dz_dtype.unwrap_or(dt);
    let mut dz = match dz_dtype {
        Some(d) => Some(alloc(&b, d, rows * cols)?),
        None => None,
    };
    if cols > 0 {
        let (r64, c64) = (i64_of(rows), i64_of(cols));
        let gx =
            u32::try_from(cols.div_ceil(32)).map_err(|_| Error::invalid(format!("{op}: {cols} columns")))?;
        let cfg = LaunchConfig {
            grid_dim: (gx, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        typed!(dt, op, |T| typed!(dzd, op, |D| {
            let mut dz_v = dz.as_mut().map(|d| d.view_mut::<D>()).transpose()?;
            // SAFETY: dora_colsum_<T>_<D>(const T* dy [rows*cols], const T* z [>= rows*cols], const float*
            // g [cols], const float* n [cols], float* dm [cols], D* dz [rows*cols] | null, int64 rows,
            // int64 cols). dy and z share dtype T and shape (checked by the caller); D is f32 or T
            // (checked above); block (32, 8) with ceil(cols/32) blocks covers every column; static
            // shared memory 1 KB.
            unsafe {
                k::dora::dora_colsum::<T, D>(
                    &b,
                    cfg,
                    &dys.view()?,
                    &zs.view()?,
                    &gs.view()?,
                    &ns.view()?,
                    &mut dm.view_mut()?,
                    dz_v.as_mut(),
                    r64,
                    c64,
                )
            }
        }))?;
    } else if let Some(d) = dz.as_mut() {
        b.stream.memset_zeros(&mut d.data)?;
    }
    Ok((
        wrap(dm, &[cols], DType::F32),
        dz.map(|d| wrap(d, &[rows, cols], dzd)),
    ))
}

/// `(dB extra [out, r], Cᵀ [r, out])` of the full norm gradient.
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
    let (dms, gs, ns, bs, ps, grs) = (
        f32_cuda(dm, op)?,
        f32_cuda(g, op)?,
        f32_cuda(n, op)?,
        f32_cuda(b32, op)?,
        f32_cuda(pt, op)?,
        f32_cuda(gram, op)?,
    );
    let b = dms.backend.clone();
    let mut dbx = alloc(&b, DType::F32, out * r)?;
    let mut ct = alloc(&b, DType::F32, r * out)?;
    if out * r > 0 {
        let (out64, r32) = (i64_of(out), i32_of(r, "rank")?);
        // SAFETY: dora_full_norm_grad(const float* dm, g, n [out], const float* b [out*r], const float*
        // pt [r*out], const float* gram [r*r], float* dbx [out*r], float* ct [r*out], float s, int64 out,
        // int r); all f32 (checked) with those sizes (the caller's shapes); the grid-stride loop covers out.
        unsafe {
            k::dora::dora_full_norm_grad(
                &b,
                grid_1d(out.min(1 << 22), 128)?,
                &dms.view()?,
                &gs.view()?,
                &ns.view()?,
                &bs.view()?,
                &ps.view()?,
                &grs.view()?,
                &mut dbx.view_mut()?,
                &mut ct.view_mut()?,
                s,
                out64,
                r32,
            )
        }?;
    }
    Ok((wrap(dbx, &[out, r], DType::F32), wrap(ct, &[r, out], DType::F32)))
}

/// Merge (`f·(w + d)`) or unmerge (`w / f - d`) by rows, f32.
pub(super) fn merge_rows(w: &Tensor, d: &Tensor, f: &Tensor, unmerge: bool) -> Result<Tensor> {
    let op = "dora merge";
    let (rows, cols) = w.dims2(op)?;
    let (ws, ds, fs) = (f32_cuda(w, op)?, f32_cuda(d, op)?, f32_cuda(f, op)?);
    let b = ws.backend.clone();
    let mut y = alloc(&b, DType::F32, rows * cols)?;
    if rows * cols > 0 {
        let (r64, c64, mode) = (i64_of(rows), i64_of(cols), unmerge as i32);
        // SAFETY: dora_merge_rows(const float* w [rows*cols], const float* d [rows*cols], const float* f
        // [rows], float* y [rows*cols], int64 rows, int64 cols, int mode); all f32 (checked) with the
        // caller's shapes; the grid covers every column and strides over all rows.
        unsafe {
            k::dora::dora_merge_rows(
                &b,
                grid_cols_rows(rows, cols)?,
                &ws.view()?,
                &ds.view()?,
                &fs.view()?,
                &mut y.view_mut()?,
                r64,
                c64,
                mode,
            )
        }?;
    }
    Ok(wrap(y, &[rows, cols], DType::F32))
}

/// `m / max(n, eps)` (f32 `[out]`).
pub(super) fn scale_of(m: &Tensor, n: &Tensor) -> Result<Tensor> {
    let op = "dora scale_of";
    let (ms, ns) = (f32_cuda(m, op)?, f32_cuda(n, op)?);
    let out = n.numel();
    let b = ms.backend.clone();
    let mut g = alloc(&b, DType::F32, out)?;
    if out > 0 {
        let out64 = i64_of(out);
        let cfg = grid_1d(out.min(1 << 22), 256)?;
        // SAFETY: dora_scale_of(const float* m [out], const float* n [out], float* g [out], int64 out);
        // all f32 (checked), the caller checked m and n have out elements; grid-stride over out.
        unsafe { k::dora::dora_scale_of(&b, cfg, &ms.view()?, &ns.view()?, &mut g.view_mut()?, out64) }?;
    }
    Ok(wrap(g, &[out], DType::F32))
}

/// `y[i, j] = x[i, j]·f[i]` (f32).
pub(super) fn scale_rows(x: &Tensor, f: &Tensor) -> Result<Tensor> {
    let op = "dora scale_rows";
    let (rows, cols) = x.dims2(op)?;
    let (xs, fs) = (f32_cuda(x, op)?, f32_cuda(f, op)?);
    let b = xs.backend.clone();
    let mut y = alloc(&b, DType::F32, rows * cols)?;
    if rows * cols > 0 {
        let (r64, c64) = (i64_of(rows), i64_of(cols));
        let cfg = grid_1d((rows * cols).min(1 << 22), 256)?;
        // SAFETY: dora_scale_rows(const float* x [rows*cols], const float* f [rows], float* y [rows*cols],
        // int64 rows, int64 cols); f32 (checked), f has rows elements (the caller's g); grid-stride over
        // rows*cols.
        unsafe { k::dora::dora_scale_rows(&b, cfg, &xs.view()?, &fs.view()?, &mut y.view_mut()?, r64, c64) }?;
    }
    Ok(wrap(y, &[rows, cols], DType::F32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `norm()` hands `norm_assemble` Pᵀ in the activation dtype: every float dtype passes the
    /// launcher's dtype check (it used to demand f32, failing every half-precision DoRA forward).
    #[test]
    fn norm_assemble_takes_pt_in_every_activation_dtype() {
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert!(check_pt_dtype(d, "test").is_ok(), "{d}");
        }
        assert!(check_pt_dtype(DType::U8, "test").is_err());
        // And the kernel the launcher then picks by Pᵀ's dtype exists for each of them.
        for d in ["f32", "f16", "bf16"] {
            let name = format!("dora_norm_assemble_{d}");
            assert!(k::KERNELS.iter().any(|(_, n)| *n == name), "{name}");
        }
    }
}
