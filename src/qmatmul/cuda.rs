//! CUDA launches for `kernels/qmatmul.cu` (see the napkin math there), and the dequantize + cuBLAS
//! baseline.
//!
//! Routing for a 4-bit weight (`Algo::Auto` and `Algo::Fused`; `DequantGemm` always takes the baseline):
//!
//! | tokens | activations      | shape                         | kernel                               |
//! |--------|------------------|-------------------------------|--------------------------------------|
//! | ≤ 16   | f16/bf16         | in % 32 == 0                  | `q4_gemv_mma` (tensor cores)          |
//! | ≤ 16   | any              | any                           | `q4_gemv_simt` (f32 FMAs)             |
//! | > 16   | f16/bf16         | in % 32 == 0                  | `q4_gemm_mma_fwd` (tiled, split-K)    |
//! | any    | f16/bf16 (bwd)   | in % 32 == 0, out % 8 == 0    | `q4_gemm_mma_bwd` (split-K for few tokens) |
//! | other  | f32 or unaligned |                               | dequantize to the activation dtype + cuBLAS |
//!
//! f32 activations never go through bf16 tensor cores: a correct f32 path is dequantize-to-f32 + sgemm.
//! Dense weights: cuBLAS for the product and for the low-rank term (beta = 1), a small bias kernel.

use super::{Algo, BaseWeight, Problem};
use crate::device::cuda::kernels::{self as k, Q4Params};
use crate::device::cuda::{CudaBackend, KernelElem, grid_1d};
use crate::error::{Error, Result};
use crate::quant::QuantizedTensor;
use crate::quant::cuda::{dequantize_q4, q4_params};
use crate::tensor::cuda::{CudaStorage, alloc, gemm_rowmajor, storage, typed, wrap};
use crate::tensor::{DType, MatmulDims, Tensor};
use cudarc::driver::{CudaView, LaunchConfig};
use half::{bf16, f16};
use std::sync::Arc;

/// A typed view of an optional operand.
fn view_opt<T: KernelElem>(t: Option<&CudaStorage>) -> Result<Option<CudaView<'_, T>>> {
    t.map(|s| s.view::<T>()).transpose()
}

/// The dtype of the auxiliary operands (bias, low-rank factors) inside the kernels: the activation
/// dtype when every one of them has it, else f32 (the others are cast, a few KB).
fn aux_dtype(act: DType, parts: &[Option<&Tensor>]) -> DType {
    if parts.iter().flatten().all(|t| t.dtype() == act) {
        act
    } else {
        DType::F32
    }
}

fn cast_opt(t: Option<&Tensor>, d: DType) -> Result<Option<Tensor>> {
    t.map(|t| t.to_dtype(d)).transpose()
}

fn i64_of(v: usize) -> i64 {
    // Tensor sizes come from allocations, which are far below i64::MAX.
    v as i64
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} exceeds the kernel's i32 range")))
}

// ------------------------------------------------------------------------------------------------
// Entry points

pub(crate) fn dequantize(q: &QuantizedTensor, dtype: DType) -> Result<Tensor> {
    let (q4, dq) = q4_params(q)?;
    let b = storage(&q.data, "dequantize")?.backend.clone();
    let (rows, cols) = (q.state.shape[0], q.state.shape[1]);
    let n = rows * cols;
    let mut out = alloc(&b, dtype, n)?;
    dequantize_q4(&b, &q4, dq, dtype, &mut out, n)?;
    Ok(wrap(out, &[rows, cols], dtype))
}

/// The dequantize + cuBLAS path: `c = act·W` (W dense, or dequantized to the activation dtype into a
/// scratch buffer; `d` says how W is read), then `c += lr.0·lr.1` with the low-rank pair cast to the
/// dtype (`d` with `k` = rank, the same transposes).
fn baseline(
    b: &Arc<CudaBackend>,
    p: &Problem<'_>,
    act: &CudaStorage,
    c: &mut CudaStorage,
    d: MatmulDims,
    lr: (Option<&Tensor>, Option<&Tensor>),
    op: &'static str,
) -> Result<()> {
    let dt = p.act.dtype();
    let scratch;
    let kbit_scratch;
    let w_dense: &CudaStorage = match p.w {
        BaseWeight::Dense(w) => storage(w, op)?,
        // k-bit tiers: kernels/kbit.cu dequantizes to the activation dtype, then the same GEMMs.
        BaseWeight::KBit(k) => {
            kbit_scratch = k.dequantize(dt)?;
            storage(&kbit_scratch, op)?
        }
        BaseWeight::Quantized(q) => {
            let (q4, dq) = q4_params(q)?;
            let n = p.out * p.inp;
            let mut s = alloc(b, dt, n)?;
            dequantize_q4(b, &q4, dq, dt, &mut s, n)?;
            scratch = s;
            &scratch
        }
    };
    gemm_any(b, dt, act, w_dense, c, d, 0.0)?;
    if let (Some(l), Some(r)) = lr {
        let (l, r) = (l.to_dtype(dt)?, r.to_dtype(dt)?);
        let d = MatmulDims { k: p.rank, ..d };
        gemm_any(b, dt, storage(&l, op)?, storage(&r, op)?, c, d, 1.0)?;
    }
    Ok(())
}

/// The low-rank pair of `p` when its rank is positive, else none.
fn low_rank_pair<'a>(p: &Problem<'a>) -> (Option<&'a Tensor>, Option<&'a Tensor>) {
    match p.low_rank {
        Some((l, r)) if p.rank > 0 => (Some(l), Some(r)),
        _ => (None, None),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    GemvMma,
    GemvSimt,
    Tiled,
    Baseline,
}

pub(crate) fn forward(p: &Problem<'_>) -> Result<Tensor> {
    let op = "linear_forward";
    let x = p.act;
    let dt = x.dtype();
    let xs = storage(x, op)?;
    let b = xs.backend.clone();
    let (t, out, inp) = (p.tokens, p.out, p.inp);
    let (u, bl) = low_rank_pair(p);
    let mut y = alloc(&b, dt, t * out)?;
    if t == 0 || out == 0 {
        return Ok(wrap(y, &[t, out], dt));
    }
    let half = dt != DType::F32;
    let path = match p.w {
        BaseWeight::Dense(_) | BaseWeight::KBit(_) => Path::Baseline,
        BaseWeight::Quantized(_) if p.algo == Algo::DequantGemm || inp == 0 => Path::Baseline,
        BaseWeight::Quantized(_) if t <= 16 => {
            if half && inp % 32 == 0 {
                Path::GemvMma
            } else {
                Path::GemvSimt
            }
        }
        BaseWeight::Quantized(_) if half && inp % 32 == 0 => Path::Tiled,
        BaseWeight::Quantized(_) => Path::Baseline,
    };
    if path == Path::Baseline {
        // Dense product into y, then y += u·bᵀ (cuBLAS, beta = 1), then the bias.
        let d = MatmulDims {
            m: t,
            n: out,
            k: inp,
            trans_a: false,
            trans_b: true,
        };
        baseline(&b, p, xs, &mut y, d, (u, bl), op)?;
        if let Some(bias) = p.bias {
            add_bias(&b, dt, &mut y, bias, t, out)?;
        }
        return Ok(wrap(y, &[t, out], dt));
    }
    let BaseWeight::Quantized(q) = p.w else {
        return Err(Error::device(op, "internal: fused path without a 4-bit weight"));
    };
    let (q4, dq) = q4_params(q)?;
    let aux = aux_dtype(dt, &[p.bias, u, bl]);
    let (bias_c, u_c, b_c) = (cast_opt(p.bias, aux)?, cast_opt(u, aux)?, cast_opt(bl, aux)?);
    let bias_s = bias_c.as_ref().map(|t| storage(t, op)).transpose()?;
    let u_s = u_c.as_ref().map(|t| storage(t, op)).transpose()?;
    let b_s = b_c.as_ref().map(|t| storage(t, op)).transpose()?;
    let r = i32_of(if u_s.is_some() { p.rank } else { 0 }, "rank")?;
    let (nt, out64, in64) = (i32_of(t, "tokens")?, i64_of(out), i64_of(inp));
    match path {
        Path::GemvSimt | Path::GemvMma => {
            let rows_per_block = if path == Path::GemvMma { 16 } else { 4 };
            let cfg = LaunchConfig {
                grid_dim: (
                    u32::try_from(out.div_ceil(rows_per_block))
                        .map_err(|_| Error::invalid("out too large"))?,
                    1,
                    1,
                ),
                block_dim: (if path == Path::GemvMma { 256 } else { 128 }, 1, 1),
                shared_mem_bytes: 0,
            };
            let ntiles = if t <= 8 { 1 } else { 2 };
            let aligned = (inp % 32 == 0) as u32;
            typed!(dt, op, |T| typed!(aux, op, |A| {
                let x = xs.view::<T>()?;
                let (bias_v, u_v, b_v) = (view_opt::<A>(bias_s)?, view_opt::<A>(u_s)?, view_opt::<A>(b_s)?);
                let mut yv = y.view_mut::<T>()?;
                let low = (bias_v.as_ref(), u_v.as_ref(), b_v.as_ref());
                // SAFETY: q4_gemv_{mma,simt}_<T>_<A>_dq<D>_*(const T* x [nt*in], Q4_PARAMS, const A* bias
                // [out] | null, const A* u [nt*r] | null, const A* b [out*r] | null, int r, T* y [nt*out],
                // int nt, int64 out, int64 in). Shapes were validated in linear_forward; bias/u/b were cast
                // to A = aux; nt <= 16 (<= 8 * n-tiles for mma); the mma variant needs in % 32 == 0
                // (checked for Path::GemvMma). Grid: one warp per row (simt, 4 rows per block) or 16 rows
                // per block (mma), covering `out`.
                unsafe {
                    if path == Path::GemvMma {
                        k::qmatmul::q4_gemv_mma::<T, A>(
                            &b, cfg, dq, ntiles, &x, &q4, low.0, low.1, low.2, r, &mut yv, nt, out64, in64,
                        )
                    } else {
                        k::qmatmul::q4_gemv_simt::<T, A>(
                            &b, cfg, dq, aligned, &x, &q4, low.0, low.1, low.2, r, &mut yv, nt, out64, in64,
                        )
                    }
                }
            }))?;
        }
        Path::Tiled => {
            let tiled = Tiled {
                bwd: false,
                dt,
                aux,
                act: xs,
                q4: &q4,
                dq,
                bias: bias_s,
                act2: u_s,
                b2: b_s,
                r,
            };
            launch_tiled(&b, &tiled, &mut y, t, out, inp, inp)?;
        }
        Path::Baseline => {
            return Err(Error::device(
                op,
                "internal: baseline path reached the fused launcher",
            ));
        }
    }
    Ok(wrap(y, &[t, out], dt))
}

pub(crate) fn backward_input(p: &Problem<'_>) -> Result<Tensor> {
    let op = "linear_backward_input";
    let dy = p.act;
    let dt = dy.dtype();
    let ds_ = storage(dy, op)?;
    let b = ds_.backend.clone();
    let (t, out, inp) = (p.tokens, p.out, p.inp);
    let (v, a) = low_rank_pair(p);
    let mut dx = alloc(&b, dt, t * inp)?;
    if t == 0 || inp == 0 {
        return Ok(wrap(dx, &[t, inp], dt));
    }
    let fused = matches!(p.w, BaseWeight::Quantized(_))
        && p.algo != Algo::DequantGemm
        && dt != DType::F32
        && inp % 32 == 0
        && out % 8 == 0
        && out > 0;
    if !fused {
        let d = MatmulDims {
            m: t,
            n: inp,
            k: out,
            trans_a: false,
            trans_b: false,
        };
        baseline(&b, p, ds_, &mut dx, d, (v, a), op)?;
        return Ok(wrap(dx, &[t, inp], dt));
    }
    let BaseWeight::Quantized(q) = p.w else {
        return Err(Error::device(op, "internal: fused path without a 4-bit weight"));
    };
    let (q4, dq) = q4_params(q)?;
    let aux = aux_dtype(dt, &[v, a]);
    let (v_c, a_c) = (cast_opt(v, aux)?, cast_opt(a, aux)?);
    let v_s = v_c.as_ref().map(|t| storage(t, op)).transpose()?;
    let a_s = a_c.as_ref().map(|t| storage(t, op)).transpose()?;
    let r = i32_of(if v_s.is_some() { p.rank } else { 0 }, "rank")?;
    let tiled = Tiled {
        bwd: true,
        dt,
        aux,
        act: ds_,
        q4: &q4,
        dq,
        bias: None,
        act2: v_s,
        b2: a_s,
        r,
    };
    launch_tiled(&b, &tiled, &mut dx, t, inp, out, inp)?;
    Ok(wrap(dx, &[t, inp], dt))
}

/// The operands of one `q4_gemm_mma_{fwd,bwd}` launch.
struct Tiled<'a> {
    bwd: bool,
    /// Activation (T) and auxiliary (A) dtypes.
    dt: DType,
    aux: DType,
    act: &'a CudaStorage,
    q4: &'a Q4Params<'a>,
    dq: u32,
    bias: Option<&'a CudaStorage>,
    act2: Option<&'a CudaStorage>,
    b2: Option<&'a CudaStorage>,
    r: i32,
}

/// `C[M, N] = Act[M, K]·B + Act2·B2 (+ bias)` through `q4_gemm_mma_{fwd,bwd}`, with split-K when the
/// output has fewer 128x128 tiles than 2x the SMs (few tokens).
fn launch_tiled(
    b: &Arc<CudaBackend>,
    p: &Tiled<'_>,
    y: &mut CudaStorage,
    m: usize,
    n: usize,
    k: usize,
    inp: usize,
) -> Result<()> {
    const BM: usize = 128;
    const BN: usize = 128;
    const BK: usize = 32;
    let op = "q4_gemm_mma";
    let gx = n.div_ceil(BN);
    let gy = m.div_ceil(BM);
    if gy > 65535 || gx > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "{m} tokens x {n} outputs exceed the CUDA grid"
        )));
    }
    let nkt = k.div_ceil(BK);
    let sms = b.sm_count()? as usize;
    let tiles = gx * gy;
    let mut splits = if tiles >= sms {
        1
    } else {
        (2 * sms).div_ceil(tiles).min(nkt / 4).clamp(1, 16)
    };
    let kt_per = nkt.div_ceil(splits).max(1);
    splits = nkt.div_ceil(kt_per).max(1);
    let mut ws = if splits > 1 {
        Some(alloc(b, DType::F32, splits * m * n)?)
    } else {
        None
    };
    let (m64, n64, k64, in64) = (i64_of(m), i64_of(n), i64_of(k), i64_of(inp));
    let kt_per32 = i32_of(kt_per, "k-tiles per split")?;
    let s32 = i32_of(splits, "splits")?;
    let cfg = LaunchConfig {
        grid_dim: (gx as u32, gy as u32, splits as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    typed!(p.dt, op, |T| typed!(p.aux, op, |A| {
        let act = p.act.view::<T>()?;
        let (bias, act2, b2) = (
            view_opt::<A>(p.bias)?,
            view_opt::<A>(p.act2)?,
            view_opt::<A>(p.b2)?,
        );
        // With split-K the bias is added by splitk_reduce, not by the split kernels.
        let kernel_bias = if ws.is_some() { None } else { bias.as_ref() };
        {
            let mut yv = y.view_mut::<T>()?;
            let mut wsv = ws.as_mut().map(|w| w.view_mut::<f32>()).transpose()?;
            let args = (&act, p.q4, kernel_bias, act2.as_ref(), b2.as_ref(), p.r);
            // SAFETY: q4_gemm_mma_<dir>_<T>_<A>_dq<D>(const T* act [M*K], Q4_PARAMS, const A* bias [N] |
            // null, const A* act2 [M*r] | null, const A* b2 (fwd [N*r], bwd [r*N]) | null, int r, T* y
            // [M*N], float* ws [splits*M*N] | null, int64 M, N, K, in, int kt_per_split). The callers
            // guarantee in % 32 == 0 and K % 8 == 0 (fwd: K = in; bwd: K = out, checked), dtypes T in
            // {f16, bf16} and A = aux; grid (ceil(N/128), ceil(M/128), splits) with splits *
            // kt_per_split >= ceil(K/32), so every output tile and k-tile is covered; static shared
            // memory 40 KB < 48 KB.
            let launch = if p.bwd {
                k::qmatmul::q4_gemm_mma_bwd::<T, A>
            } else {
                k::qmatmul::q4_gemm_mma_fwd::<T, A>
            };
            // SAFETY: the argument list, grid and shared memory are as stated above for both directions.
            unsafe {
                launch(
                    b,
                    cfg,
                    p.dq,
                    args.0,
                    args.1,
                    args.2,
                    args.3,
                    args.4,
                    args.5,
                    &mut yv,
                    wsv.as_mut(),
                    m64,
                    n64,
                    k64,
                    in64,
                    kt_per32,
                )
            }?;
        }
        if let Some(w) = ws.as_ref() {
            let cfg = grid_1d((m * n).min(1 << 24), 256)?;
            // SAFETY: splitk_reduce_<T>_<A>(const float* ws [splits*M*N], const A* bias [N] | null, T* y
            // [M*N], int64 M, int64 N, int splits); ws was fully written by the split kernels above
            // (every split writes every valid (m, n) of its tiles).
            unsafe {
                k::qmatmul::splitk_reduce::<T, A>(
                    b,
                    cfg,
                    &w.view()?,
                    bias.as_ref(),
                    &mut y.view_mut()?,
                    m64,
                    n64,
                    s32,
                )
            }?;
        }
        Ok(())
    }))
}

/// `c = op(a)·op(b) + beta·c` on row-major device buffers of dtype `dt` (cuBLAS).
fn gemm_any(
    b: &CudaBackend,
    dt: DType,
    a: &CudaStorage,
    bm: &CudaStorage,
    c: &mut CudaStorage,
    d: MatmulDims,
    beta: f32,
) -> Result<()> {
    macro_rules! go {
        ($t:ty) => {{
            let (av, bv): (CudaView<'_, $t>, CudaView<'_, $t>) = (a.view::<$t>()?, bm.view::<$t>()?);
            let mut cv = c.view_mut::<$t>()?;
            gemm_rowmajor::<$t>(b, &av, &bv, &mut cv, d, beta)
        }};
    }
    match dt {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => Err(Error::dtype("qmatmul", "a float dtype", other)),
    }
}

fn add_bias(
    b: &Arc<CudaBackend>,
    dt: DType,
    y: &mut CudaStorage,
    bias: &Tensor,
    m: usize,
    n: usize,
) -> Result<()> {
    let aux = if bias.dtype() == dt { dt } else { DType::F32 };
    let bias = bias.to_dtype(aux)?;
    let bs = storage(&bias, "linear_forward")?;
    let (m64, n64) = (i64_of(m), i64_of(n));
    let cfg = grid_1d((m * n).min(1 << 24), 256)?;
    typed!(dt, "linear_forward", |T| typed!(aux, "linear_forward", |A| {
        // SAFETY: add_bias_<T>_<A>(T* y [M*N], const A* bias [N], int64 M, int64 N); bias has N
        // elements (validated) of dtype A; y holds M*N of dtype T.
        unsafe { k::qmatmul::add_bias::<T, A>(b, cfg, &mut y.view_mut()?, &bs.view()?, m64, n64) }
    }))
}
