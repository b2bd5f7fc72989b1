//! Launches of `kernels/autograd.cu`. Shapes, dtypes and devices are validated by the callers in
//! `ops.rs`; this file only checks what the launches themselves need (grid limits, sizes).

use super::ops::Activation;
use crate::device::cuda::{CudaBackend, grid_1d};
use crate::error::{Error, Result};
use crate::tensor::cuda::{CudaStorage, alloc, wrap};
use crate::tensor::{DType, Storage, Tensor};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use std::sync::Arc;

/// Threads per block of every kernel here.
const THREADS: u32 = 256;
/// Maximum blocks of the stage-1 reductions: enough to fill any current GPU (132 SMs x 8 blocks),
/// few enough that the stage-2 block sums them in a few µs.
const MAX_PARTIALS: usize = 1024;

macro_rules! typed {
    ($dtype:expr, |$t:ident| $body:expr) => {
        match $dtype {
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
            other => Err(Error::dtype("autograd (cuda)", "a float dtype", other)),
        }
    };
}
pub(crate) use typed;

pub(crate) fn storage<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::device(op, "expected a CUDA tensor, got a CPU tensor")),
    }
}

fn dtype_index(d: DType) -> Result<usize> {
    match d {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        other => Err(Error::dtype("autograd (cuda)", "a float dtype", other)),
    }
}

fn act_kernel(fwd: bool, act: Activation, dtype: DType) -> Result<&'static str> {
    const FWD: [[&str; 3]; 5] = [
        ["act_fwd_relu_f32", "act_fwd_relu_f16", "act_fwd_relu_bf16"],
        ["act_fwd_gelu_f32", "act_fwd_gelu_f16", "act_fwd_gelu_bf16"],
        [
            "act_fwd_gelu_erf_f32",
            "act_fwd_gelu_erf_f16",
            "act_fwd_gelu_erf_bf16",
        ],
        ["act_fwd_silu_f32", "act_fwd_silu_f16", "act_fwd_silu_bf16"],
        ["act_fwd_tanh_f32", "act_fwd_tanh_f16", "act_fwd_tanh_bf16"],
    ];
    const BWD: [[&str; 3]; 5] = [
        ["act_bwd_relu_f32", "act_bwd_relu_f16", "act_bwd_relu_bf16"],
        ["act_bwd_gelu_f32", "act_bwd_gelu_f16", "act_bwd_gelu_bf16"],
        [
            "act_bwd_gelu_erf_f32",
            "act_bwd_gelu_erf_f16",
            "act_bwd_gelu_erf_bf16",
        ],
        ["act_bwd_silu_f32", "act_bwd_silu_f16", "act_bwd_silu_bf16"],
        ["act_bwd_tanh_f32", "act_bwd_tanh_f16", "act_bwd_tanh_bf16"],
    ];
    let a = act as usize;
    let d = dtype_index(dtype)?;
    Ok(if fwd { FWD[a][d] } else { BWD[a][d] })
}

pub(crate) fn by_dtype(names: [&'static str; 3], dtype: DType) -> Result<&'static str> {
    Ok(names[dtype_index(dtype)?])
}

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
        let f = b.func("autograd", act_kernel(true, act, dtype)?)?;
        let n64 = n as i64;
        typed!(dtype, |T| {
            let xv = xs.view::<T>()?;
            let mut yv = out.view_mut::<T>()?;
            let mut l = b.stream.launch_builder(&f);
            l.arg(&xv).arg(&mut yv).arg(&n64);
            // SAFETY: act_fwd_<act>_<T>(const T* x, T* y, int64 n) reads x[0..n) and writes y[0..n);
            // both buffers hold n elements of T (x is a tensor of n elements, y was allocated for n).
            unsafe { l.launch(elementwise_grid(n)?) }?;
            Ok(())
        })?;
    }
    Ok(wrap(out, x.shape(), dtype))
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
        let f = b.func("autograd", act_kernel(false, act, dtype)?)?;
        let n64 = n as i64;
        typed!(dtype, |T| {
            let xv = xs.view::<T>()?;
            let dyv = dys.view::<T>()?;
            let mut dxv = out.view_mut::<T>()?;
            let mut l = b.stream.launch_builder(&f);
            l.arg(&xv).arg(&dyv).arg(&mut dxv).arg(&n64);
            // SAFETY: act_bwd_<act>_<T>(const T* x, const T* dy, T* dx, int64 n); x and dy have the
            // same shape and dtype (checked by the caller), so all three buffers hold n elements.
            unsafe { l.launch(elementwise_grid(n)?) }?;
            Ok(())
        })?;
    }
    Ok(wrap(out, x.shape(), dtype))
}

/// Stage 2 of a reduction: `out[0] = scale * Σ partials` as a fresh f32 `[1]` tensor.
fn finalize(b: &Arc<CudaBackend>, partials: &CudaSlice<f32>, count: usize, scale: f32) -> Result<Tensor> {
    let mut out = alloc(b, DType::F32, 1)?;
    let f = b.func("autograd", "finalize_sum")?;
    let count64 = count as i64;
    {
        let mut ov = out.view_mut::<f32>()?;
        let mut l = b.stream.launch_builder(&f);
        l.arg(partials).arg(&count64).arg(&scale).arg(&mut ov);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: finalize_sum(const float* partials, int64 count, float scale, float* out) reads
        // partials[0..count) (the slice holds at least `count`, checked by callers) and writes out[0].
        unsafe { l.launch(cfg) }?;
    }
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
    let f = b.func(
        "autograd",
        by_dtype(["mse_partial_f32", "mse_partial_f16", "mse_partial_bf16"], dtype)?,
    )?;
    let n64 = n as i64;
    typed!(dtype, |T| {
        let (pv, tv) = (ps.view::<T>()?, ts.view::<T>()?);
        let mut l = b.stream.launch_builder(&f);
        l.arg(&pv).arg(&tv).arg(&mut partials).arg(&n64);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: mse_partial_<T>(const T* p, const T* t, float* partials, int64 n) reads p[0..n),
        // t[0..n) (same shape, checked by the caller) and writes partials[blockIdx.x] for each of
        // the `blocks` blocks; the partials buffer holds `blocks` floats.
        unsafe { l.launch(cfg) }?;
        Ok(())
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
        let f = b.func(
            "autograd",
            by_dtype(["mse_bwd_f32", "mse_bwd_f16", "mse_bwd_bf16"], dtype)?,
        )?;
        let n64 = n as i64;
        let two_over_n = (2.0f64 / n as f64) as f32;
        typed!(dtype, |T| {
            let (pv, tv, gv) = (ps.view::<T>()?, ts.view::<T>()?, gs.view::<f32>()?);
            let mut dv = out.view_mut::<T>()?;
            let mut l = b.stream.launch_builder(&f);
            l.arg(&pv)
                .arg(&tv)
                .arg(&gv)
                .arg(&two_over_n)
                .arg(&mut dv)
                .arg(&n64);
            // SAFETY: mse_bwd_<T>(const T* p, const T* t, const float* g, float, T* dp, int64 n):
            // p, t and dp hold n elements; g is the 1-element f32 upstream gradient (checked by the
            // caller) and only g[0] is read.
            unsafe { l.launch(elementwise_grid(n)?) }?;
            Ok(())
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
    let f = b.func(
        "autograd",
        by_dtype(["ce_fwd_f32", "ce_fwd_f16", "ce_fwd_bf16"], dtype)?,
    )?;
    let c64 = c as i64;
    typed!(dtype, |T| {
        let lv = ls.view::<T>()?;
        let tv = ts.view::<i32>()?;
        let mut sv = stats.view_mut::<f32>()?;
        let mut l = b.stream.launch_builder(&f);
        l.arg(&lv).arg(&tv).arg(&mut row_loss).arg(&mut sv).arg(&c64);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: ce_fwd_<T>(const T* logits [n*c], const int* targets [n], float* row_loss [n],
        // float* stats [2n], int64 c), one block per row (n blocks, n <= i32::MAX checked above,
        // n > 0 checked by the caller). Targets are in [0, c) or negative for ignored rows, which
        // return before reading the row (checked by the caller), so x[t] stays inside the row.
        unsafe { l.launch(cfg) }?;
        Ok(())
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
        let f = b.func(
            "autograd",
            by_dtype(["ce_bwd_f32", "ce_bwd_f16", "ce_bwd_bf16"], dtype)?,
        )?;
        let c64 = c as i64;
        typed!(dtype, |T| {
            let lv = ls.view::<T>()?;
            let tv = ts.view::<i32>()?;
            let sv = ss.view::<f32>()?;
            let gv = gs.view::<f32>()?;
            let mut dv = out.view_mut::<T>()?;
            let mut l = b.stream.launch_builder(&f);
            l.arg(&lv)
                .arg(&tv)
                .arg(&sv)
                .arg(&gv)
                .arg(&inv_count)
                .arg(&mut dv)
                .arg(&c64);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: ce_bwd_<T>(const T* logits [n*c], const int* targets [n], const float* stats [2n],
            // const float* g [1], float inv_count, T* dx [n*c], int64 c), one block per row; every
            // buffer has the size in brackets (checked by the caller: shapes of logits, targets and
            // stats, and the 1-element gradient).
            unsafe { l.launch(cfg) }?;
            Ok(())
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
    let f = b.func("autograd", "sumsq_partial_f32")?;
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
        let mut l = b.stream.launch_builder(&f);
        l.arg(&gv).arg(&mut pv).arg(&n64);
        let cfg = LaunchConfig {
            grid_dim: (nb as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: sumsq_partial_f32(const float* x, float* partials, int64 n) reads x[0..n) (an f32
        // tensor of n elements, dtype checked by the caller) and writes partials[0..nb), the slice
        // reserved for this tensor.
        unsafe { l.launch(cfg) }?;
        off += nb;
    }
    let out = finalize(&b, &partials, total, 1.0)?;
    Ok(out.to_scalar()? as f64)
}
