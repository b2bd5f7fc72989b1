//! CUDA launches of `kernels/attention.cu` (the CPU twin is `cpu.rs`): the fused forward, the
//! `D = rowsum(dO∘O)` precomputation and the fused backward (dQ accumulated in f32 with atomics, then
//! cast to the dtype).

use super::{AttentionConfig, Saved};
use crate::device::cuda::{CudaBackend, backend, kernels as k};
use crate::error::{Error, Result};
use crate::tensor::cuda::{CudaStorage, alloc, storage, typed, wrap};
use crate::tensor::{DType, Tensor, dropout_threshold};
use cudarc::driver::{CudaSlice, LaunchConfig};
use std::sync::Arc;

/// Largest head_dim of the kernels (`ATT_DMAX`).
const DMAX: usize = 128;
/// Query rows per forward block (`FWD_ROWS`) and keys per backward block (`ATT_BK`).
const FWD_ROWS: usize = 16;
const BWD_KEYS: usize = 32;
/// Query rows per tensor-core forward block (`MMA_BQ`).
const MMA_ROWS: usize = 64;

/// Whether the tensor-core forward kernel `attn_fwd_mma_<T>_d<head_dim>` exists: f16/bf16 at head_dim
/// 32, 64 or 128 (otherwise the SIMT kernel `attn_fwd_<T>` runs).
fn mma_forward(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::F16 | DType::BF16) && matches!(head_dim, 32 | 64 | 128)
}

fn cs(t: &Tensor) -> Result<&CudaStorage> {
    storage(t, "attention")
}

/// The scalar launch arguments shared by forward and backward: `int Sq, Sk, H, KVH, D, float scale, int
/// causal, uint64 threshold, float drop_scale, uint64 seed` (the common tail of both kernels' parameter
/// lists).
struct Dims {
    sq: i32,
    sk: i32,
    h: i32,
    kvh: i32,
    d: i32,
    scale: f32,
    causal: i32,
    threshold: u64,
    drop_scale: f32,
    seed: u64,
}

fn dims(cfg: &AttentionConfig) -> Result<Dims> {
    if cfg.head_dim > DMAX {
        return Err(Error::invalid(format!(
            "attention on CUDA: head_dim {} is above the kernels' {DMAX}",
            cfg.head_dim
        )));
    }
    let i = |x: usize, what: &str| {
        i32::try_from(x).map_err(|_| Error::invalid(format!("attention on CUDA: {what} {x} is too large")))
    };
    let (threshold, drop_scale, seed) = match cfg.active_dropout() {
        Some((p, seed)) => (dropout_threshold(p), 1.0 / (1.0 - p), seed),
        None => (0, 1.0, 0),
    };
    Ok(Dims {
        sq: i(cfg.seq_q, "seq_q")?,
        sk: i(cfg.seq_k, "seq_k")?,
        h: i(cfg.num_heads, "num_heads")?,
        kvh: i(cfg.num_kv_heads, "num_kv_heads")?,
        d: i(cfg.head_dim, "head_dim")?,
        scale: cfg.scale,
        causal: i32::from(cfg.causal),
        threshold,
        drop_scale,
        seed,
    })
}

/// Grid of `x` blocks by `tiles` blocks of 128 threads.
fn grid(x: usize, tiles: usize) -> Result<LaunchConfig> {
    if x > i32::MAX as usize || tiles > 65535 {
        return Err(Error::invalid(format!(
            "attention on CUDA: grid {x} x {tiles} is too large"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (x as u32, tiles as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The key mask on the device (a 1-byte placeholder when there is none) and the has-mask flag.
fn mask_on(b: &Arc<CudaBackend>, key_mask: Option<&[u8]>) -> Result<(CudaSlice<u8>, i32)> {
    Ok(match key_mask {
        Some(m) if !m.is_empty() => (b.stream.clone_htod(m)?, 1),
        _ => (b.stream.alloc_zeros::<u8>(1)?, 0),
    })
}

pub(crate) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
    dtype: DType,
    ordinal: usize,
) -> Result<(Tensor, Tensor)> {
    let b = backend(ordinal)?;
    let p = dims(cfg)?;
    let mut out = alloc(&b, dtype, q.numel())?;
    let mut lse = alloc(&b, DType::F32, cfg.lse_len())?;
    if cfg.lse_len() > 0 {
        let (mask, has_mask) = mask_on(&b, key_mask)?;
        let mma = mma_forward(dtype, cfg.head_dim);
        let rows = if mma { MMA_ROWS } else { FWD_ROWS };
        let launch = grid(cfg.batch * cfg.num_heads, cfg.seq_q.div_ceil(rows))?;
        let (qs, ks, vs) = (cs(q)?, cs(k)?, cs(v)?);
        let mv = mask.as_view();
        typed!(dtype, "attention", |T| {
            let (qv, kv, vv) = (qs.view::<T>()?, ks.view::<T>()?, vs.view::<T>()?);
            let (mut ov, mut lv) = (out.view_mut::<T>()?, lse.view_mut::<f32>()?);
            // SAFETY: attn_fwd_<T> and attn_fwd_mma_<T>_d<D> (same parameter list; the mma kernels only
            // for f16/bf16 and their template D = head_dim) take (const T* q [B*Sq, H*D], const T* k, v
            // [B*Sk, KVH*D], const uint8* mask [B*Sk] (read only when has_mask), int has_mask, T* out
            // [B*Sq, H*D], float* lse [B*H*Sq], int Sq, Sk, H, KVH, D, float scale, int causal, uint64
            // threshold, float drop_scale, uint64 seed). The shapes were checked against cfg by
            // check_inputs (and the mask length), D <= 128 and every size fits an int (dims); T matches
            // dtype. Block (b*H + h, tile) writes exactly the out rows of its tile (16 or 64 rows, < Sq)
            // of head h and their lse entries; blockDim 128 = 4 warps as both kernels expect; shared
            // memory is static (<= 41 KB < 48 KB). The mma kernel's 16-byte K/V loads are aligned: fresh
            // allocations, row offsets multiples of D.
            unsafe {
                // The two kernels share their parameter list after the mma kernel's head_dim flag.
                macro_rules! fwd {
                    ($f:path $(, $flag:expr)?) => {
                        $f(
                            &b, launch, $($flag,)? &qv, &kv, &vv, &mv, has_mask, &mut ov, &mut lv, p.sq, p.sk,
                            p.h, p.kvh, p.d, p.scale, p.causal, p.threshold, p.drop_scale, p.seed,
                        )
                    };
                }
                if mma {
                    fwd!(k::attention::attn_fwd_mma::<T>, cfg.head_dim as u32)
                } else {
                    fwd!(k::attention::attn_fwd::<T>)
                }
            }
        })?;
    }
    Ok((
        wrap(out, q.shape(), dtype),
        wrap(lse, &[cfg.lse_len()], DType::F32),
    ))
}

pub(crate) fn backward(
    saved: Saved<'_>,
    grad_out: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
    dtype: DType,
    ordinal: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Saved { q, k, v, output, lse } = saved;
    let b = backend(ordinal)?;
    let p = dims(cfg)?;
    let mut dq_acc = CudaStorage {
        data: b.stream.alloc_zeros::<u8>((q.numel() * 4).max(1))?,
        backend: b.clone(),
    };
    let mut dk = alloc(&b, dtype, k.numel())?;
    let mut dv_out = alloc(&b, dtype, v.numel())?;
    let rows = cfg.lse_len();
    if rows > 0 && cfg.seq_k > 0 {
        let mut dvec = alloc(&b, DType::F32, rows)?;
        let tokens = (cfg.batch * cfg.seq_q) as i64;
        let blocks = rows.div_ceil(8).min(1 << 20);
        let dot_launch = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (mask, has_mask) = mask_on(&b, key_mask)?;
        let launch = grid(cfg.batch * cfg.num_kv_heads, cfg.seq_k.div_ceil(BWD_KEYS))?;
        let (qs, ks, vs, os, gs, ls) = (cs(q)?, cs(k)?, cs(v)?, cs(output)?, cs(grad_out)?, cs(lse)?);
        let mv = mask.as_view();
        typed!(dtype, "attention", |T| {
            let (ov, gv) = (os.view::<T>()?, gs.view::<T>()?);
            {
                let mut dv = dvec.view_mut::<f32>()?;
                // SAFETY: attn_bwd_dot_<T>(const T* o, const T* dout [B*Sq, H*D] (same shape as q,
                // checked by attention_backward; dout converted to dtype), float* dvec [B*H*Sq], int64
                // tokens = B*Sq, int Sq, H, D); one warp per (token, head), grid-stride, each writes its
                // own dvec entry; 8 warps per block.
                unsafe {
                    k::attention::attn_bwd_dot::<T>(&b, dot_launch, &ov, &gv, &mut dv, tokens, p.sq, p.h, p.d)
                }?;
            }
            let (qv, kv, vv) = (qs.view::<T>()?, ks.view::<T>()?, vs.view::<T>()?);
            let (lv, dv) = (ls.view::<f32>()?, dvec.view::<f32>()?);
            let mut dqv = dq_acc.view_mut::<f32>()?;
            let (mut dkv, mut dvv) = (dk.view_mut::<T>()?, dv_out.view_mut::<T>()?);
            // SAFETY: attn_bwd_<T>(const T* q, k, v, dout, const float* lse [B*H*Sq] (length checked by
            // attention_backward), const float* dvec [B*H*Sq], const uint8* mask [B*Sk] or placeholder,
            // int has_mask, float* dq_acc [B*Sq*H*D] zeroed, T* dk, dv [B*Sk, KVH*D], int Sq, Sk, H, KVH,
            // D, float scale, int causal, uint64 threshold, float drop_scale, uint64 seed). Block (b*KVH
            // + g, tile) owns keys tile*32..+32 (< Sk) of kv head g and writes exactly their dk/dv rows;
            // dq_acc is only updated with atomicAdd; 128 threads = 4 warps x 8 keys as the kernel
            // expects; static shared memory ~33 KB.
            unsafe {
                k::attention::attn_bwd::<T>(
                    &b,
                    launch,
                    &qv,
                    &kv,
                    &vv,
                    &gv,
                    &lv,
                    &dv,
                    &mv,
                    has_mask,
                    &mut dqv,
                    &mut dkv,
                    &mut dvv,
                    p.sq,
                    p.sk,
                    p.h,
                    p.kvh,
                    p.d,
                    p.scale,
                    p.causal,
                    p.threshold,
                    p.drop_scale,
                    p.seed,
                )
            }
        })?;
    } else if k.numel() > 0 {
        // No query row (or no key): zero gradients for k and v.
        dk = CudaStorage {
            data: b.stream.alloc_zeros::<u8>(k.numel() * dtype.size_in_bytes())?,
            backend: b.clone(),
        };
        dv_out = CudaStorage {
            data: b.stream.alloc_zeros::<u8>(v.numel() * dtype.size_in_bytes())?,
            backend: b.clone(),
        };
    }
    let dq = wrap(dq_acc, q.shape(), DType::F32);
    let dq = if dtype == DType::F32 {
        dq
    } else {
        dq.to_dtype(dtype)?
    };
    Ok((dq, wrap(dk, k.shape(), dtype), wrap(dv_out, v.shape(), dtype)))
}
