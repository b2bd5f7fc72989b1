//! CUDA launches of `kernels/attention.cu` (the CPU twin is `cpu.rs`): the fused forward, the
//! `D = rowsum(dO∘O)` precomputation and the fused backward (dQ accumulated in f32 with atomics, then
//! cast to the dtype).

use super::AttentionConfig;
use crate::device::cuda::{CudaBackend, backend};
use crate::error::{Error, Result};
use crate::tensor::cuda::{CudaStorage, alloc, wrap};
use crate::tensor::{DType, Storage, Tensor, dropout_threshold};
use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Largest head_dim of the kernels (`ATT_DMAX`).
const DMAX: usize = 128;
/// Query rows per forward block (`FWD_ROWS`) and keys per backward block (`ATT_BK`).
const FWD_ROWS: usize = 16;
const BWD_KEYS: usize = 32;
/// Query rows per tensor-core forward block (`MMA_BQ`).
const MMA_ROWS: usize = 64;

/// The tensor-core forward kernel for f16/bf16 at head_dim 32, 64 or 128 (None: the SIMT kernel).
fn mma_forward(dtype: DType, head_dim: usize) -> Option<&'static str> {
    Some(match (dtype, head_dim) {
        (DType::F16, 32) => "attn_fwd_mma_f16_d32",
        (DType::F16, 64) => "attn_fwd_mma_f16_d64",
        (DType::F16, 128) => "attn_fwd_mma_f16_d128",
        (DType::BF16, 32) => "attn_fwd_mma_bf16_d32",
        (DType::BF16, 64) => "attn_fwd_mma_bf16_d64",
        (DType::BF16, 128) => "attn_fwd_mma_bf16_d128",
        _ => return None,
    })
}

fn cs(t: &Tensor) -> Result<&CudaStorage> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::device(
            "attention",
            "expected a CUDA tensor, got a CPU tensor",
        )),
    }
}

fn kernel(b: &CudaBackend, stem: &str, dtype: DType) -> Result<cudarc::driver::CudaFunction> {
    let name = match (stem, dtype) {
        ("fwd", DType::F32) => "attn_fwd_f32",
        ("fwd", DType::F16) => "attn_fwd_f16",
        ("fwd", DType::BF16) => "attn_fwd_bf16",
        ("dot", DType::F32) => "attn_bwd_dot_f32",
        ("dot", DType::F16) => "attn_bwd_dot_f16",
        ("dot", DType::BF16) => "attn_bwd_dot_bf16",
        ("bwd", DType::F32) => "attn_bwd_f32",
        ("bwd", DType::F16) => "attn_bwd_f16",
        ("bwd", DType::BF16) => "attn_bwd_bf16",
        _ => return Err(Error::dtype("attention", "f32, f16 or bf16", dtype)),
    };
    b.func("attention", name)
}

/// The scalar launch arguments shared by forward and backward.
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

impl Dims {
    /// Appends `int Sq, Sk, H, KVH, D, float scale, int causal, uint64 threshold, float drop_scale,
    /// uint64 seed` (the common tail of both kernels' parameter lists).
    fn push<'a>(&'a self, l: &mut LaunchArgs<'a>) {
        l.arg(&self.sq)
            .arg(&self.sk)
            .arg(&self.h)
            .arg(&self.kvh)
            .arg(&self.d)
            .arg(&self.scale)
            .arg(&self.causal)
            .arg(&self.threshold)
            .arg(&self.drop_scale)
            .arg(&self.seed);
    }
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
        let (f, launch) = match mma_forward(dtype, cfg.head_dim) {
            Some(name) => (
                b.func("attention", name)?,
                grid(cfg.batch * cfg.num_heads, cfg.seq_q.div_ceil(MMA_ROWS))?,
            ),
            None => (
                kernel(&b, "fwd", dtype)?,
                grid(cfg.batch * cfg.num_heads, cfg.seq_q.div_ceil(FWD_ROWS))?,
            ),
        };
        let mut l = b.stream.launch_builder(&f);
        l.arg(&cs(q)?.data)
            .arg(&cs(k)?.data)
            .arg(&cs(v)?.data)
            .arg(&mask)
            .arg(&has_mask)
            .arg(&mut out.data)
            .arg(&mut lse.data);
        p.push(&mut l);
        // SAFETY: attn_fwd_<T> and attn_fwd_mma_<T>_d<D> (same parameter list; the mma kernels only for
        // f16/bf16 and their template D) take (const T* q [B*Sq, H*D], const T* k, v [B*Sk, KVH*D], const
        // uint8* mask [B*Sk] (read only when has_mask), int has_mask, T* out [B*Sq, H*D], float* lse
        // [B*H*Sq], int Sq, Sk, H, KVH, D, float scale, int causal, uint64 threshold, float drop_scale,
        // uint64 seed). The shapes were checked against cfg by check_inputs (and the mask length), D <=
        // 128 and every size fits an int (dims); T matches dtype (the kernel name). Block (b*H + h, tile)
        // writes exactly the out rows of its tile (16 or 64 rows, < Sq) of head h and their lse entries;
        // blockDim 128 = 4 warps as both kernels expect; shared memory is static (<= 41 KB < 48 KB). The
        // mma kernel's 16-byte K/V loads are aligned: fresh allocations, row offsets multiples of D.
        unsafe { l.launch(launch) }?;
    }
    Ok((
        wrap(out, q.shape(), dtype),
        wrap(lse, &[cfg.lse_len()], DType::F32),
    ))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    output: &Tensor,
    lse: &Tensor,
    grad_out: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
    dtype: DType,
    ordinal: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let b = backend(ordinal)?;
    let p = dims(cfg)?;
    let mut dq_acc = CudaStorage {
        data: b.stream.alloc_zeros::<u8>((q.numel() * 4).max(1))?,
        backend: b.clone(),
    };
    let mut dk = alloc(&b, dtype, k.numel())?;
    let mut dv = alloc(&b, dtype, v.numel())?;
    let rows = cfg.lse_len();
    if rows > 0 && cfg.seq_k > 0 {
        let mut dvec = alloc(&b, DType::F32, rows)?;
        let tokens = (cfg.batch * cfg.seq_q) as i64;
        let f = kernel(&b, "dot", dtype)?;
        let mut l = b.stream.launch_builder(&f);
        l.arg(&cs(output)?.data)
            .arg(&cs(grad_out)?.data)
            .arg(&mut dvec.data)
            .arg(&tokens)
            .arg(&p.sq)
            .arg(&p.h)
            .arg(&p.d);
        let blocks = rows.div_ceil(8).min(1 << 20);
        // SAFETY: attn_bwd_dot_<T>(const T* o, const T* dout [B*Sq, H*D] (same shape as q, checked by
        // attention_backward; dout converted to dtype), float* dvec [B*H*Sq], int64 tokens = B*Sq, int Sq,
        // H, D); one warp per (token, head), grid-stride, each writes its own dvec entry; 8 warps per block.
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        let (mask, has_mask) = mask_on(&b, key_mask)?;
        let f = kernel(&b, "bwd", dtype)?;
        let launch = grid(cfg.batch * cfg.num_kv_heads, cfg.seq_k.div_ceil(BWD_KEYS))?;
        let mut l = b.stream.launch_builder(&f);
        l.arg(&cs(q)?.data)
            .arg(&cs(k)?.data)
            .arg(&cs(v)?.data)
            .arg(&cs(grad_out)?.data)
            .arg(&cs(lse)?.data)
            .arg(&dvec.data)
            .arg(&mask)
            .arg(&has_mask)
            .arg(&mut dq_acc.data)
            .arg(&mut dk.data)
            .arg(&mut dv.data);
        p.push(&mut l);
        // SAFETY: attn_bwd_<T>(const T* q, k, v, dout, const float* lse [B*H*Sq] (length checked by
        // attention_backward), const float* dvec [B*H*Sq], const uint8* mask [B*Sk] or placeholder, int
        // has_mask, float* dq_acc [B*Sq*H*D] zeroed, T* dk, dv [B*Sk, KVH*D], int Sq, Sk, H, KVH, D, float
        // scale, int causal, uint64 threshold, float drop_scale, uint64 seed). Block (b*KVH + g, tile)
        // owns keys tile*32..+32 (< Sk) of kv head g and writes exactly their dk/dv rows; dq_acc is only
        // updated with atomicAdd; 128 threads = 4 warps x 8 keys as the kernel expects; static shared
        // memory ~33 KB.
        unsafe { l.launch(launch) }?;
    } else if k.numel() > 0 {
        // No query row (or no key): zero gradients for k and v.
        dk = CudaStorage {
            data: b.stream.alloc_zeros::<u8>(k.numel() * dtype.size_in_bytes())?,
            backend: b.clone(),
        };
        dv = CudaStorage {
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
    Ok((dq, wrap(dk, k.shape(), dtype), wrap(dv, v.shape(), dtype)))
}
