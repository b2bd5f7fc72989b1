//! Launches of `kernels/autograd.cu`. Shapes, dtypes and devices are validated by the callers in
//! `ops.rs`; this file only checks what the launches themselves need (grid limits, sizes).

use super::ops::Activation;
use crate::device::cuda::{CudaBackend, KernelElem, grid_1d, kernels as k};
use crate::error::{Error, Result};
use crate::tensor::cuda::{alloc, storage, typed, wrap};
use crate::tensor::{DType, Tensor};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};
use std::sync::Arc;

/// Threads per block of every kernel here.
const THREADS: u32 = 256;
/// Maximum blocks of the stage-1 reductions: enough to fill any current GPU (132 SMs x 8 blocks),
/// few enough that the stage-2 block sums them in a few µs.
const MAX_PARTIALS: usize = 1024;

/// Grid of a grid-stride elementwise kernel: one thread per element up to a cap, so huge tensors loop
/// instead of launching millions of blocks.
fn elementwise_grid(n: usize) -> Result<LaunchConfig> {
    let mut cfg = grid_1d(n, THREADS)?;
    cfg.grid_dim.0 = cfg.grid_dim.0.min(1 << 16);
    Ok(cfg)
}

fn partial_blocks(n: usize) -> usize {
    n.div_ceil(THREADS as usize).clamp(1, MAX_PARTIALS)
}

pub(crate) fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    let xs = storage(x, "activation")?;
    let b = &xs.backend;
    let (n, dtype) = (x.numel(), x.dtype());
    let mut out = alloc(b, dtype, n)?;
    if n > 0 {
        let n64 = n as i64;
        typed!(dtype, "activation", |T| {
            let (xv, mut yv) = (xs.view::<T>()?, out.view_mut::<T>()?);
            // SAFETY: act_fwd_<act>_<T>(const T* x, T* y, int64 n) reads x[0..n) and writes y[0..n);
            // both buffers hold n elements of T (x is a tensor of n elements, y was allocated for n).
            unsafe { act_fwd::<T>(b, act, elementwise_grid(n)?, &xv, &mut yv, n64) }
        })?;
    }
    Ok(wrap(out, x.shape(), dtype))
}

/// `act_fwd_<act>_<T>`: one generated launcher per activation.
///
/// # Safety
/// As the generated launchers: x and y hold n elements.
unsafe fn act_fwd<T: KernelElem>(
    b: &CudaBackend,
    act: Activation,
    cfg: LaunchConfig,
    x: &CudaView<'_, T>,
    y: &mut CudaViewMut<'_, T>,
    n: i64,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe {
        match act {
            Activation::Relu => k::autograd::act_fwd_relu::<T>(b, cfg, x, y, n),
            Activation::Gelu => k::autograd::act_fwd_gelu::<T>(b, cfg, x, y, n),
            Activation::GeluErf => k::autograd::act_fwd_gelu_erf::<T>(b, cfg, x, y, n),
            Activation::Silu => k::autograd::act_fwd_silu::<T>(b, cfg, x, y, n),
            Activation::Tanh => k::autograd::act_fwd_tanh::<T>(b, cfg, x, y, n),
        }
    }
}

/// `act_bwd_<act>_<T>`: one generated launcher per activation.
///
/// # Safety
/// As the generated launchers: x, dy and dx hold n elements.
unsafe fn act_bwd<T: KernelElem>(
    b: &CudaBackend,
    act: Activation,
    cfg: LaunchConfig,
    (x, dy): (&CudaView<'_, T>, &CudaView<'_, T>),
    dx: &mut CudaViewMut<'_, T>,
    n: i64,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe {
        match act {
            Activation::Relu => k::autograd::act_bwd_relu::<T>(b, cfg, x, dy, dx, n),
            Activation::Gelu => k::autograd::act_bwd_gelu::<T>(b, cfg, x, dy, dx, n),
            Activation::GeluErf => k::autograd::act_bwd_gelu_erf::<T>(b, cfg, x, dy, dx, n),
            Activation::Silu => k::autograd::act_bwd_silu::<T>(b, cfg, x, dy, dx, n),
            Activation::Tanh => k::autograd::act_bwd_tanh::<T>(b, cfg, x, dy, dx, n),
        }
    }
}

pub(crate) fn activation_backward(x: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
    let (xs, dys) = (
        storage(x, "activation_backward")?,
        storage(dy, "activation_backward")?,
    );
    let b = &xs.backend;
    let (n, dtype) = (x.numel(), x.dtype());
    let mut out = alloc(b, dtype, n)?;
    if n > 0 {
        let n64 = n as i64;
        typed!(dtype, "activation_backward", |T| {
            let (xv, dyv) = (xs.view::<T>()?, dys.view::<T>()?);
            let mut dxv = out.view_mut::<T>()?;
            // SAFETY: act_bwd_<act>_<T>(const T* x, const T* dy, T* dx, int64 n); x and dy have the
            // same shape and dtype (checked by the caller), so all three buffers hold n elements.
            unsafe { act_bwd::<T>(b, act, elementwise_grid(n)?, (&xv, &dyv), &mut dxv, n64) }
        })?;
    }
    Ok(wrap(out, x.shape(), dtype))
}

/// Stage 2 of a reduction: `out[0] = scale * Σ partials` as a fresh f32 `[1]` tensor.
fn finalize(b: &Arc<CudaBackend>, partials: &CudaSlice<f32>, count: usize, scale: f32) -> Result<Tensor> {
    let mut out = alloc(b, DType::F32, 1)?;
    let count64 = count as i64;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: finalize_sum(const float* partials, int64 count, float scale, float* out) reads
    // partials[0..count) (the slice holds at least `count`, checked by callers) and writes out[0].
    unsafe { k::autograd::finalize_sum(b, cfg, &partials.as_view(), count64, scale, &mut out.view_mut()?) }?;
    Ok(wrap(out, &[1], DType::F32))
}

/// `mean((p - t)²)` as an f32 `[1]` tensor.
pub(crate) fn mse_loss(p: &Tensor, t: &Tensor) -> Result<Tensor> {
    let (ps, ts) = (storage(p, "mse_loss")?, storage(t, "mse_loss")?);
    let b = &ps.backend;
    let (n, dtype) = (p.numel(), p.dtype());
    let blocks = partial_blocks(n);
    // SAFETY: the partials are fully written by the stage-1 kernel below (one per block).
    let mut partials = unsafe { b.stream.alloc::<f32>(blocks) }?;
    let n64 = n as i64;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    typed!(dtype, "mse_loss", |T| {
        let (pv, tv) = (ps.view::<T>()?, ts.view::<T>()?);
        // SAFETY: mse_partial_<T>(const T* p, const T* t, float* partials, int64 n) reads p[0..n),
        // t[0..n) (same shape, checked by the caller) and writes partials[blockIdx.x] for each of
        // the `blocks` blocks; the partials buffer holds `blocks` floats.
        unsafe { k::autograd::mse_partial::<T>(b, cfg, &pv, &tv, &mut partials.as_view_mut(), n64) }
    })?;
    finalize(b, &partials, blocks, (1.0f64 / n as f64) as f32)
}

/// `dp = 2·g·(p - t)/n` where `g` is the f32 `[1]` upstream gradient on the device.
pub(crate) fn mse_loss_backward(p: &Tensor, t: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (ps, ts, gs) = (
        storage(p, "mse_loss_backward")?,
        storage(t, "mse_loss_backward")?,
        storage(g, "mse_loss_backward")?,
    );
    let b = &ps.backend;
    let (n, dtype) = (p.numel(), p.dtype());
    let mut out = alloc(b, dtype, n)?;
    if n > 0 {
        let n64 = n as i64;
        let two_over_n = (2.0f64 / n as f64) as f32;
        typed!(dtype, "mse_loss_backward", |T| {
            let (pv, tv, gv) = (ps.view::<T>()?, ts.view::<T>()?, gs.view::<f32>()?);
            let mut dv = out.view_mut::<T>()?;
            let cfg = elementwise_grid(n)?;
            // SAFETY: mse_bwd_<T>(const T* p, const T* t, const float* g, float, T* dp, int64 n):
            // p, t and dp hold n elements; g is the 1-element f32 upstream gradient (checked by the
            // caller) and only g[0] is read.
            unsafe { k::autograd::mse_bwd::<T>(b, cfg, &pv, &tv, &gv, two_over_n, &mut dv, n64) }
        })?;
    }
    Ok(wrap(out, p.shape(), dtype))
}

/// Cross-entropy forward over logits `[n, c]` with i32 targets on the device (validated `< c` by the
/// caller; negative = ignored row). `inv_count` is 1 / (rows not ignored), or 0 when all are.
/// Returns the f32 `[1]` mean loss and the f32 `[n, 2]` per-row (max, log-sum) statistics.
pub(crate) fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    n: usize,
    c: usize,
    inv_count: f32,
) -> Result<(Tensor, Tensor)> {
    let (ls, ts) = (
        storage(logits, "cross_entropy")?,
        storage(targets, "cross_entropy")?,
    );
    let b = &ls.backend;
    let dtype = logits.dtype();
    if n > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "cross_entropy: {n} rows exceed one CUDA grid"
        )));
    }
    // SAFETY: both buffers are fully written by ce_fwd (one element per row).
    let mut row_loss = unsafe { b.stream.alloc::<f32>(n.max(1)) }?;
    let mut stats = alloc(b, DType::F32, 2 * n)?;
    let c64 = c as i64;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    typed!(dtype, "cross_entropy", |T| {
        let (lv, tv) = (ls.view::<T>()?, ts.view::<i32>()?);
        let mut sv = stats.view_mut::<f32>()?;
        // SAFETY: ce_fwd_<T>(const T* logits [n*c], const int* targets [n], float* row_loss [n],
        // float* stats [2n], int64 c), one block per row (n blocks, n <= i32::MAX checked above,
        // n > 0 checked by the caller). Targets are in [0, c) or negative for ignored rows, which
        // return before reading the row (checked by the caller), so x[t] stays inside the row.
        unsafe { k::autograd::ce_fwd::<T>(b, cfg, &lv, &tv, &mut row_loss.as_view_mut(), &mut sv, c64) }
    })?;
    let loss = finalize(b, &row_loss, n, inv_count)?;
    Ok((loss, wrap(stats, &[n, 2], DType::F32)))
}

/// `dlogits = g·inv_count·(softmax(logits) - onehot(targets))` (zeros for ignored rows), one block
/// per row.
pub(crate) fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    stats: &Tensor,
    g: &Tensor,
    (n, c): (usize, usize),
    inv_count: f32,
) -> Result<Tensor> {
    let op = "cross_entropy_backward";
    let (ls, ts, ss, gs) = (
        storage(logits, op)?,
        storage(targets, op)?,
        storage(stats, op)?,
        storage(g, op)?,
    );
    let b = &ls.backend;
    let dtype = logits.dtype();
    let mut out = alloc(b, dtype, n * c)?;
    if n > 0 && c > 0 {
        if n > i32::MAX as usize {
            return Err(Error::invalid(format!("{op}: {n} rows exceed one CUDA grid")));
        }
        let c64 = c as i64;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        typed!(dtype, op, |T| {
            let (lv, tv) = (ls.view::<T>()?, ts.view::<i32>()?);
            let (sv, gv) = (ss.view::<f32>()?, gs.view::<f32>()?);
            let mut dv = out.view_mut::<T>()?;
            // SAFETY: ce_bwd_<T>(const T* logits [n*c], const int* targets [n], const float* stats [2n],
            // const float* g [1], float inv_count, T* dx [n*c], int64 c), one block per row; every
            // buffer has the size in brackets (checked by the caller: shapes of logits, targets and
            // stats, and the 1-element gradient).
            unsafe { k::autograd::ce_bwd::<T>(b, cfg, &lv, &tv, &sv, &gv, inv_count, &mut dv, c64) }
        })?;
    }
    Ok(wrap(out, logits.shape(), dtype))
}

/// `Σ g²` over f32 CUDA tensors on one device: one stage-1 launch per tensor into its own slice of a
/// shared partials buffer, one stage-2 launch, one 4-byte download.
pub(crate) fn sum_squares(gs: &[&Tensor]) -> Result<f64> {
    let Some(first) = gs.first() else {
        return Ok(0.0);
    };
    let b = storage(first, "global_norm")?.backend.clone();
    let blocks: Vec<usize> = gs.iter().map(|g| partial_blocks(g.numel())).collect();
    let total: usize = blocks.iter().sum();
    let mut partials = b.stream.alloc_zeros::<f32>(total)?;
    let mut off = 0;
    for (g, &nb) in gs.iter().zip(&blocks) {
        let s = storage(g, "global_norm")?;
        if s.backend.ordinal != b.ordinal {
            return Err(Error::device(
                "global_norm",
                "gradients on different CUDA devices",
            ));
        }
        let n = g.numel();
        let gv = s.view::<f32>()?;
        let mut pv = partials
            .try_slice_mut(off..off + nb)
            .ok_or_else(|| Error::device("global_norm", "partials slice out of range"))?;
        let n64 = n as i64;
        let cfg = LaunchConfig {
            grid_dim: (nb as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: sumsq_partial_f32(const float* x, float* partials, int64 n) reads x[0..n) (an f32
        // tensor of n elements, dtype checked by the caller) and writes partials[0..nb), the slice
        // reserved for this tensor.
        unsafe { k::autograd::sumsq_partial_f32(&b, cfg, &gv, &mut pv, n64) }?;
        off += nb;
    }
    let out = finalize(&b, &partials, total, 1.0)?;
    Ok(out.to_scalar()? as f64)
}
