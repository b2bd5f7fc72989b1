//! CUDA launches of `kernels/vblora.cu` (the CPU twins are in `cpu.rs`).

use super::Layout;
use crate::device::cuda::{CudaBackend, grid_1d, kernels as k};
use crate::error::{Error, Result};
use crate::tensor::cuda::{CudaStorage, alloc, storage, wrap};
use crate::tensor::{DType, Tensor};
use cudarc::driver::{CudaSlice, LaunchConfig};
use std::sync::Arc;

fn cs(t: &Tensor) -> Result<&CudaStorage> {
    storage(t, "vblora")
}

fn layout_r(layout: Layout) -> i64 {
    match layout {
        Layout::Plain => 0,
        Layout::BTransposed { r } => r as i64,
    }
}

struct Selected {
    idx: CudaStorage,
    w: CudaStorage,
    flag: CudaSlice<i32>,
}

/// Top-k (torch's CPU order) and softmax weights of every row of `logits [rows, V]`.
fn select(b: &Arc<CudaBackend>, logits: &Tensor, rows: usize, v: usize, k: usize) -> Result<Selected> {
    if v > i32::MAX as usize || k > v {
        return Err(Error::invalid(format!(
            "vblora: num_vectors {v} / topk {k} out of range"
        )));
    }
    let mut idx = alloc(b, DType::I32, rows * k)?;
    let mut w = alloc(b, DType::F32, rows * k)?;
    let mut flag = b.stream.alloc_zeros::<i32>(1)?;
    if rows > 0 {
        let mut sv = alloc(b, DType::F32, rows * v)?;
        let mut si = alloc(b, DType::I32, rows * v)?;
        let (rows64, v32, k32) = (rows as i64, v as i32, k as i32);
        let lv = cs(logits)?.view::<f32>()?;
        let (mut svv, mut siv) = (sv.view_mut::<f32>()?, si.view_mut::<i32>()?);
        let (mut iv, mut wv) = (idx.view_mut::<i32>()?, w.view_mut::<f32>()?);
        // SAFETY: vblora_select(const float* logits [rows*V], int64 rows, int V, int k, float* sv
        // [rows*V], int* si [rows*V], int* idx [rows*k], float* w [rows*k], int* flag [1]); all buffers
        // have those sizes (logits checked by the caller, the rest allocated above); 1 <= k <= V; a
        // thread owns one row (grid-stride) and only touches that row's slices.
        unsafe {
            k::vblora::vblora_select(
                b,
                grid_1d(rows, 128)?,
                &lv,
                rows64,
                v32,
                k32,
                &mut svv,
                &mut siv,
                &mut iv,
                &mut wv,
                &mut flag.as_view_mut(),
            )
        }?;
    }
    Ok(Selected { idx, w, flag })
}

/// The composed rows `[rows, L]` written through `layout` into a tensor of `shape`.
pub(crate) fn compose(
    bank: &Tensor,
    logits: &Tensor,
    k: usize,
    layout: Layout,
    shape: &[usize],
) -> Result<Tensor> {
    let bs = cs(bank)?;
    let b = bs.backend.clone();
    let (v, len) = (bank.shape()[0], bank.shape()[1]);
    let rows = logits.numel() / v;
    let sel = select(&b, logits, rows, v, k)?;
    let mut out = alloc(&b, DType::F32, rows * len)?;
    if rows * len > 0 {
        let (len64, rows64, k32, lr) = (len as i64, rows as i64, k as i32, layout_r(layout));
        let (bv, iv, wv) = (bs.view::<f32>()?, sel.idx.view::<i32>()?, sel.w.view::<f32>()?);
        let mut ov = out.view_mut::<f32>()?;
        // SAFETY: vblora_compose(const float* bank [V*L], int64 L, const int* idx [rows*k], const float* w
        // [rows*k], int k, int64 rows, int64 layout_r, float* out [rows*L]); idx entries < V (top-k of a
        // V-wide row); out_index is a bijection of [rows, L] onto itself for both layouts (for B,
        // rows = (out/L)·r); grid-stride over rows*L.
        unsafe {
            k::vblora::vblora_compose(
                &b,
                grid_1d(rows * len, 256)?,
                &bv,
                len64,
                &iv,
                &wv,
                k32,
                rows64,
                lr,
                &mut ov,
            )
        }?;
    }
    Ok(wrap(out, shape, DType::F32))
}

/// (dlogits, dbank, any non-finite logit).
pub(crate) fn compose_backward(
    bank: &Tensor,
    logits: &Tensor,
    k: usize,
    grad: &Tensor,
    layout: Layout,
) -> Result<(Tensor, Tensor, bool)> {
    let bs = cs(bank)?;
    let b = bs.backend.clone();
    let (v, len) = (bank.shape()[0], bank.shape()[1]);
    let rows = logits.numel() / v;
    let sel = select(&b, logits, rows, v, k)?;
    let nonfinite = b.stream.clone_dtoh(&sel.flag)?.first().copied().unwrap_or(0) != 0;
    let mut dlogits = b.stream.alloc_zeros::<u8>((rows * v * 4).max(1))?;
    let mut dbank = alloc(&b, DType::F32, v * len)?;
    let (len64, rows64, k32, v32, lr) = (len as i64, rows as i64, k as i32, v as i32, layout_r(layout));
    let (bv, gv, iv, wv) = (
        bs.view::<f32>()?,
        cs(grad)?.view::<f32>()?,
        sel.idx.view::<i32>()?,
        sel.w.view::<f32>()?,
    );
    if rows > 0 {
        let mut dl = CudaStorage {
            data: dlogits,
            backend: b.clone(),
        };
        {
            let mut dv = dl.view_mut::<f32>()?;
            let blocks = rows.div_ceil(8).min(1 << 20) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: vblora_dlogits(const float* bank [V*L], int64 L, const float* grad [rows*L], const
            // int* idx [rows*k], const float* w [rows*k], int k, int64 rows, int V, int64 layout_r,
            // float* dlogits [rows*V], zeroed); one warp per row (8 per block, grid-stride), each row
            // writes only its own V-wide slice at the k distinct selected indices.
            unsafe {
                k::vblora::vblora_dlogits(&b, cfg, &bv, len64, &gv, &iv, &wv, k32, rows64, v32, lr, &mut dv)
            }?;
        }
        dlogits = dl.data;
    }
    if v * len > 0 {
        let mut dbv = dbank.view_mut::<f32>()?;
        let threads = len.clamp(32, 256).div_ceil(32) * 32;
        let cfg = LaunchConfig {
            grid_dim: (v.min(65535) as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: vblora_dbank(const float* grad [rows*L], const int* idx [rows*k], const float* w
        // [rows*k], int k, int64 rows, int64 L, int V, int64 layout_r, float* dbank [V*L]); one block per
        // bank row (grid-stride over V), threads over L; every dbank element is written exactly once;
        // the 1024-entry shared tile matches DBANK_TILE.
        unsafe { k::vblora::vblora_dbank(&b, cfg, &gv, &iv, &wv, k32, rows64, len64, v32, lr, &mut dbv) }?;
    }
    let dl_tensor = wrap(
        CudaStorage {
            data: dlogits,
            backend: b.clone(),
        },
        logits.shape(),
        DType::F32,
    );
    Ok((dl_tensor, wrap(dbank, &[v, len], DType::F32), nonfinite))
}
