//! Launches of `kernels/nn.cu`. Shapes, dtypes, devices and index ranges are validated by the callers
//! in `mod.rs`; this file checks what the launches need (grid limits) and uploads the host-side
//! indices and masks.

use super::{InverseIndex, Norm};
use crate::device::cuda::kernels as k;
use crate::error::{Error, Result};
use crate::tensor::cuda::{alloc, wrap};
use crate::tensor::cuda::{storage, typed};
use crate::tensor::{DType, Tensor};
use cudarc::driver::LaunchConfig;

/// One block per row (`rows` blocks, `rows >= 1`), threads striding the `h` columns: a warp-multiple
/// close to `h` for narrow rows, 128 threads up to 1024 columns (MiniLM's 384: 3 per thread), 256 above.
fn row_blocks(rows: usize, h: usize, op: &'static str) -> Result<LaunchConfig> {
    if rows == 0 || rows > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "{op}: {rows} rows do not fit one CUDA grid"
        )));
    }
    let threads = match h {
        0..=128 => h.div_ceil(32).max(1) as u32 * 32,
        129..=1024 => 128,
        _ => 256,
    };
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

pub(crate) fn gather_rows(x: &Tensor, idx: &[u32], h: usize) -> Result<Tensor> {
    let op = "gather_rows";
    let xs = storage(x, op)?;
    let b = &xs.backend;
    let (m, dtype) = (idx.len(), x.dtype());
    let mut out = alloc(b, dtype, m * h)?;
    if m > 0 && h > 0 {
        let cfg = row_blocks(m, h, op)?;
        let idx_d = b.stream.clone_htod(idx)?;
        let h64 = h as i64;
        typed!(dtype, "nn (cuda)", |T| {
            let xv = xs.view::<T>()?;
            let mut ov = out.view_mut::<T>()?;
            // SAFETY: gather_rows_<T>(const T* src, const u32* idx [m], T* out [m*h], int64 h), one
            // block per output row j < m; every idx[j] < the source's row count (checked by the
            // caller), so src[idx[j]*h .. +h) lies inside the source tensor.
            unsafe { k::nn::gather_rows::<T>(b, cfg, &xv, &idx_d.as_view(), &mut ov, h64) }
        })?;
    }
    Ok(wrap(out, &[m, h], dtype))
}

pub(crate) fn scatter_add_rows(dy: &Tensor, inv: &InverseIndex, n: usize, h: usize) -> Result<Tensor> {
    let op = "gather_rows_backward";
    let ds = storage(dy, op)?;
    let b = &ds.backend;
    let dtype = dy.dtype();
    let mut out = alloc(b, dtype, n * h)?;
    if n > 0 && h > 0 {
        let cfg = row_blocks(n, h, op)?;
        let offsets = b.stream.clone_htod(&inv.offsets)?;
        // A zero-length upload is not allowed; the kernel never reads `order` when it is empty.
        let order = b.stream.clone_htod(if inv.order.is_empty() {
            &[0u32][..]
        } else {
            &inv.order
        })?;
        let h64 = h as i64;
        typed!(dtype, "nn (cuda)", |T| {
            let dv = ds.view::<T>()?;
            let mut ov = out.view_mut::<T>()?;
            let (offv, ordv) = (offsets.as_view(), order.as_view());
            // SAFETY: scatter_add_rows_<T>(const T* dy [m*h], const u32* offsets [n+1], const u32* order
            // [m], T* out [n*h], int64 h), one block per output row r < n. offsets is the prefix sum of
            // the counts of each row (offsets[n] = m) and order holds positions < m (InverseIndex), so
            // every dy read is inside its m rows.
            unsafe { k::nn::scatter_add_rows::<T>(b, cfg, &dv, &offv, &ordv, &mut ov, h64) }
        })?;
    }
    Ok(wrap(out, &[n, h], dtype))
}

/// Forward (`[batch·seq, h] -> [batch, h]`) or backward (`[batch, h] -> [batch·seq, h]`) mean pooling.
pub(crate) fn mean_pool(
    t: &Tensor,
    mask: &[u8],
    counts: &[f32],
    seq: usize,
    h: usize,
    backward: bool,
) -> Result<Tensor> {
    let op = if backward {
        "mean_pool_backward"
    } else {
        "mean_pool"
    };
    let ts = storage(t, op)?;
    let b = &ts.backend;
    let dtype = t.dtype();
    let batch = counts.len();
    let out_rows = if backward { batch * seq } else { batch };
    let mut out = alloc(b, dtype, out_rows * h)?;
    if out_rows == 0 || h == 0 {
        return Ok(wrap(out, &[out_rows, h], dtype));
    }
    let cfg = if backward {
        row_blocks(out_rows, h, op)?
    } else {
        let col_blocks = h.div_ceil(256);
        if batch > i32::MAX as usize || col_blocks > 65535 {
            return Err(Error::invalid(format!(
                "{op}: batch {batch} x {h} features do not fit one CUDA grid"
            )));
        }
        LaunchConfig {
            grid_dim: (batch as u32, col_blocks as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    };
    let mask_d = b.stream.clone_htod(mask)?;
    let counts_d = b.stream.clone_htod(counts)?;
    let (seq64, h64) = (seq as i64, h as i64);
    typed!(dtype, "nn (cuda)", |T| {
        let tv = ts.view::<T>()?;
        let mut ov = out.view_mut::<T>()?;
        let (mv, cv) = (mask_d.as_view(), counts_d.as_view());
        // SAFETY: mean_pool_{fwd,bwd}_<T>(const T* in, const u8* mask [batch*seq], const float* counts
        // [batch], T* out, int64 seq, int64 h). Forward: in is [batch*seq, h], out [batch, h], grid
        // (batch, ceil(h/256)) with a column bound check. Backward: in is [batch, h], out [batch*seq,
        // h], one block per out row. Sizes are checked by the caller (mask length, rows = batch*seq).
        unsafe {
            if backward {
                k::nn::mean_pool_bwd::<T>(b, cfg, &tv, &mv, &cv, &mut ov, seq64, h64)
            } else {
                k::nn::mean_pool_fwd::<T>(b, cfg, &tv, &mv, &cv, &mut ov, seq64, h64)
            }
        }
    })?;
    Ok(wrap(out, &[out_rows, h], dtype))
}

pub(crate) fn add_row(x: &Tensor, row: &Tensor) -> Result<Tensor> {
    let op = "add_row";
    let (xs, rs) = (storage(x, op)?, storage(row, op)?);
    let b = &xs.backend;
    let dtype = x.dtype();
    let (rows, h) = x.dims2(op)?;
    let mut out = alloc(b, dtype, rows * h)?;
    if rows > 0 && h > 0 {
        let cfg = row_blocks(rows, h, op)?;
        let h64 = h as i64;
        typed!(dtype, "nn (cuda)", |T| {
            let xv = xs.view::<T>()?;
            let rv = rs.view::<f32>()?;
            let mut ov = out.view_mut::<T>()?;
            // SAFETY: add_row_<T>(const T* x [rows*h], const float* row [h], T* y [rows*h], int64 h), one
            // block per row; row is an f32 [h] tensor (converted and checked by the caller).
            unsafe { k::nn::add_row::<T>(b, cfg, &xv, &rv, &mut ov, h64) }
        })?;
    }
    Ok(wrap(out, x.shape(), dtype))
}

/// LayerNorm (with the f32 `[h]` bias) or RMSNorm (without) forward; `w` is f32 `[h]`. Returns `y`
/// and the f32 statistics (`[rows, 2]` of mean and rstd, or `[rows]` of rstd).
pub(crate) fn norm_forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    eps: f32,
    norm: Norm,
) -> Result<(Tensor, Tensor)> {
    let op = if norm == Norm::Layer {
        "layer_norm"
    } else {
        "rms_norm"
    };
    let (xs, ws) = (storage(x, op)?, storage(w, op)?);
    let bs = bias.map(|b| storage(b, op)).transpose()?;
    if (norm == Norm::Layer) != bs.is_some() {
        return Err(Error::invalid(format!("{op}: a bias goes with LayerNorm only")));
    }
    let b = &xs.backend;
    let dtype = x.dtype();
    let (rows, h) = x.dims2(op)?;
    let per_row = if norm == Norm::Layer { 2 } else { 1 };
    let mut y = alloc(b, dtype, rows * h)?;
    let mut stats = alloc(b, DType::F32, per_row * rows)?;
    if rows > 0 {
        let cfg = row_blocks(rows, h, op)?;
        let h64 = h as i64;
        typed!(dtype, "nn (cuda)", |T| {
            let (xv, wv) = (xs.view::<T>()?, ws.view::<f32>()?);
            let bv = bs.map(|s| s.view::<f32>()).transpose()?;
            let mut yv = y.view_mut::<T>()?;
            let mut sv = stats.view_mut::<f32>()?;
            // SAFETY: layer_norm_fwd_<T>(const T* x [rows*h], const float* w [h], const float* b [h],
            // T* y [rows*h], float* stats [2*rows], int64 h, float eps) and rms_norm_fwd_<T>(the same
            // without b, stats [rows]); one block per row, h >= 1 (checked by the caller, which also
            // converted w and b to f32 [h]); the bias is present exactly for LayerNorm (checked above).
            unsafe {
                match &bv {
                    Some(bv) => k::nn::layer_norm_fwd::<T>(b, cfg, &xv, &wv, bv, &mut yv, &mut sv, h64, eps),
                    None => k::nn::rms_norm_fwd::<T>(b, cfg, &xv, &wv, &mut yv, &mut sv, h64, eps),
                }
            }
        })?;
    }
    let stats_shape: &[usize] = if per_row == 2 { &[rows, 2] } else { &[rows] };
    Ok((wrap(y, x.shape(), dtype), wrap(stats, stats_shape, DType::F32)))
}

/// LayerNorm or RMSNorm input gradient from the saved f32 weight and statistics.
pub(crate) fn norm_backward(
    x: &Tensor,
    dy: &Tensor,
    w: &Tensor,
    stats: &Tensor,
    norm: Norm,
) -> Result<Tensor> {
    let op = if norm == Norm::Layer {
        "layer_norm_backward"
    } else {
        "rms_norm_backward"
    };
    let (xs, ds, ws, ss) = (
        storage(x, op)?,
        storage(dy, op)?,
        storage(w, op)?,
        storage(stats, op)?,
    );
    let b = &xs.backend;
    let dtype = x.dtype();
    let (rows, h) = x.dims2(op)?;
    let mut dx = alloc(b, dtype, rows * h)?;
    if rows > 0 && h > 0 {
        let cfg = row_blocks(rows, h, op)?;
        let h64 = h as i64;
        typed!(dtype, "nn (cuda)", |T| {
            let (xv, dv) = (xs.view::<T>()?, ds.view::<T>()?);
            let (wv, sv) = (ws.view::<f32>()?, ss.view::<f32>()?);
            let mut ov = dx.view_mut::<T>()?;
            // SAFETY: {layer,rms}_norm_bwd_<T>(const T* x [rows*h], const T* dy [rows*h], const float* w
            // [h], const float* stats [2*rows for LayerNorm, rows for RMSNorm], T* dx [rows*h], int64 h),
            // one block per row; shapes and dtypes checked by the caller (stats shape per norm kind).
            unsafe {
                match norm {
                    Norm::Layer => k::nn::layer_norm_bwd::<T>(b, cfg, &xv, &dv, &wv, &sv, &mut ov, h64),
                    Norm::Rms => k::nn::rms_norm_bwd::<T>(b, cfg, &xv, &dv, &wv, &sv, &mut ov, h64),
                }
            }
        })?;
    }
    Ok(wrap(dx, x.shape(), dtype))
}

/// Rotary embedding (or, with `backward`, its inverse) of `x [tokens, width]`; `inv_freq` has
/// `head_dim/2 <= 512` entries and `width` is a multiple of `head_dim` (checked by the caller).
pub(crate) fn rope(x: &Tensor, positions: &[u32], inv_freq: &[f32], backward: bool) -> Result<Tensor> {
    let op = if backward { "rope_backward" } else { "rope" };
    let xs = storage(x, op)?;
    let b = &xs.backend;
    let dtype = x.dtype();
    let (tokens, width) = x.dims2(op)?;
    let half = inv_freq.len();
    let mut y = alloc(b, dtype, tokens * width)?;
    if tokens > 0 && width > 0 {
        if half == 0 || half > 512 || !width.is_multiple_of(2 * half) || positions.len() != tokens {
            return Err(Error::invalid(format!(
                "{op}: {half} frequencies for width {width} and {} positions of {tokens} tokens",
                positions.len()
            )));
        }
        let cfg = row_blocks(tokens, width / 2, op)?;
        let pos_d = b.stream.clone_htod(positions)?;
        let freq_d = b.stream.clone_htod(inv_freq)?;
        let (w64, half64, negate) = (width as i64, half as i64, backward as i32);
        typed!(dtype, "nn (cuda)", |T| {
            let xv = xs.view::<T>()?;
            let mut yv = y.view_mut::<T>()?;
            let (pv, fv) = (pos_d.as_view(), freq_d.as_view());
            // SAFETY: rope_<T>(const T* x [tokens*width], const u32* positions [tokens], const float*
            // inv_freq [half], T* y [tokens*width], int64 width, int64 half, int negate), one block per
            // token; half <= 512 (the kernel's shared table, ROPE_MAX_HALF) and width a multiple of
            // 2*half, checked above.
            unsafe { k::nn::rope::<T>(b, cfg, &xv, &pv, &fv, &mut yv, w64, half64, negate) }
        })?;
    }
    Ok(wrap(y, x.shape(), dtype))
}
