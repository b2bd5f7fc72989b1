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
use crate::device::cuda::{CudaBackend, grid_1d};
use crate::error::{Error, Result};
use crate::quant::{Absmax, QuantizedTensor};
use crate::tensor::cuda::{CudaStorage, alloc, gemm_rowmajor, wrap};
use crate::tensor::{DType, MatmulDims, Storage, Tensor};
use cudarc::driver::{CudaView, LaunchArgs, LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use std::sync::Arc;

/// A null device pointer for absent optional operands (the kernels test for it).
static NULL: u64 = 0;

fn cuda_of<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::device(op, "expected a CUDA tensor, got a CPU tensor")),
    }
}

/// Kernel names are `&'static str` for the backend's function cache; this interns the combinations.
fn kname(name: String) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let set = NAMES.get_or_init(|| Mutex::new(HashSet::new()));
    let mut set = match set.lock() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    };
    if let Some(s) = set.get(name.as_str()) {
        return s;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    set.insert(leaked);
    leaked
}

/// The device parts of a 4-bit weight, pushed as the common kernel arguments
/// `(data, absmax, codes, nested, offset, nested_bs, lut, ncode, bs_log2)`.
struct Q4Dev<'a> {
    data: &'a CudaStorage,
    absmax: Option<&'a CudaStorage>,
    codes: Option<&'a CudaStorage>,
    nested: Option<&'a CudaStorage>,
    offset: f32,
    nested_bs: i32,
    lut: [f32; 16],
    ncode: [f32; 256],
    bs_log2: i32,
    dq: bool,
    rows: usize,
    cols: usize,
}

impl<'a> Q4Dev<'a> {
    fn new(q: &'a QuantizedTensor) -> Result<Q4Dev<'a>> {
        let op = "qmatmul";
        let st = &q.state;
        let mut d = Q4Dev {
            data: cuda_of(&q.data, op)?,
            absmax: None,
            codes: None,
            nested: None,
            offset: 0.0,
            nested_bs: 1,
            lut: st.code,
            ncode: [0.0; 256],
            // Validation restricts blocksizes to powers of two in 32..=4096.
            bs_log2: st.blocksize.trailing_zeros() as i32,
            dq: false,
            rows: st.shape[0],
            cols: st.shape[1],
        };
        match &st.absmax {
            Absmax::F32(t) => d.absmax = Some(cuda_of(t, op)?),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
                nested_code,
                nested_blocksize,
            } => {
                d.dq = true;
                d.codes = Some(cuda_of(codes, op)?);
                d.nested = Some(cuda_of(nested_absmax, op)?);
                d.offset = *offset;
                d.nested_bs = i32::try_from(*nested_blocksize)
                    .map_err(|_| Error::invalid("nested blocksize exceeds i32"))?;
                d.ncode.copy_from_slice(nested_code);
            }
        }
        Ok(d)
    }

    fn push<'b>(&'b self, l: &mut LaunchArgs<'b>) {
        l.arg(&self.data.data);
        match self.absmax {
            Some(a) => l.arg(&a.data),
            None => l.arg(&NULL),
        };
        match self.codes {
            Some(c) => l.arg(&c.data),
            None => l.arg(&NULL),
        };
        match self.nested {
            Some(n) => l.arg(&n.data),
            None => l.arg(&NULL),
        };
        l.arg(&self.offset)
            .arg(&self.nested_bs)
            .arg(&self.lut)
            .arg(&self.ncode)
            .arg(&self.bs_log2);
    }

    fn dq(&self) -> u8 {
        self.dq as u8
    }
}

fn push_opt<'b>(l: &mut LaunchArgs<'b>, t: Option<&'b CudaStorage>) {
    match t {
        Some(s) => l.arg(&s.data),
        None => l.arg(&NULL),
    };
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
    let qd = Q4Dev::new(q)?;
    let b = qd.data.backend.clone();
    let n = qd.rows * qd.cols;
    let mut out = alloc(&b, dtype, n)?;
    launch_dequant(&b, &qd, dtype, &mut out, n)?;
    Ok(wrap(out, &[qd.rows, qd.cols], dtype))
}

fn launch_dequant(b: &Arc<CudaBackend>, qd: &Q4Dev<'_>, dtype: DType, out: &mut CudaStorage, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let f = b.func("qmatmul", kname(format!("q4_dequant_{}_dq{}", dtype.as_str(), qd.dq())))?;
    let n64 = i64_of(n);
    // One thread per 8 weights; the grid-stride loop covers the rest beyond 2^20 blocks.
    let cfg = grid_1d(n.div_ceil(8).min(256 << 20), 256)?;
    let mut l = b.stream.launch_builder(&f);
    qd.push(&mut l);
    l.arg(&mut out.data).arg(&n64);
    // SAFETY: q4_dequant_<T>_dq<D>(data u8[(n+1)/2], absmax f32[nblocks] | null, codes u8[nblocks] | null,
    // nested f32[..] | null, float, int, Lut16, Lut256, int bs_log2, T* out[n], int64 n). The weight was
    // validated (byte, block and nested counts match n and the blocksize); out holds n elements of dtype.
    unsafe { l.launch(cfg) }?;
    Ok(())
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
    let xs = cuda_of(x, op)?;
    let b = xs.backend.clone();
    let (t, out, inp) = (p.tokens, p.out, p.inp);
    let (u, bl) = match p.low_rank {
        Some((u, bl)) if p.rank > 0 => (Some(u), Some(bl)),
        _ => (None, None),
    };
    let mut y = alloc(&b, dt, t * out)?;
    if t == 0 || out == 0 {
        return Ok(wrap(y, &[t, out], dt));
    }
    let half = dt != DType::F32;
    let path = match p.w {
        BaseWeight::Dense(_) => Path::Baseline,
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
        let scratch;
        let w_dense: &CudaStorage = match p.w {
            BaseWeight::Dense(w) => cuda_of(w, op)?,
            BaseWeight::Quantized(q) => {
                let qd = Q4Dev::new(q)?;
                let mut s = alloc(&b, dt, out * inp)?;
                launch_dequant(&b, &qd, dt, &mut s, out * inp)?;
                scratch = s;
                &scratch
            }
        };
        let d = MatmulDims {
            m: t,
            n: out,
            k: inp,
            trans_a: false,
            trans_b: true,
        };
        gemm_any(&b, dt, xs, w_dense, &mut y, d, 0.0)?;
        if let (Some(u), Some(bl)) = (u, bl) {
            let (u, bl) = (u.to_dtype(dt)?, bl.to_dtype(dt)?);
            let d = MatmulDims {
                m: t,
                n: out,
                k: p.rank,
                trans_a: false,
                trans_b: true,
            };
            gemm_any(&b, dt, cuda_of(&u, op)?, cuda_of(&bl, op)?, &mut y, d, 1.0)?;
        }
        if let Some(bias) = p.bias {
            add_bias(&b, dt, &mut y, bias, t, out)?;
        }
        return Ok(wrap(y, &[t, out], dt));
    }
    let BaseWeight::Quantized(q) = p.w else {
        return Err(Error::device(op, "internal: fused path without a 4-bit weight"));
    };
    let qd = Q4Dev::new(q)?;
    let aux = aux_dtype(dt, &[p.bias, u, bl]);
    let (bias_c, u_c, b_c) = (cast_opt(p.bias, aux)?, cast_opt(u, aux)?, cast_opt(bl, aux)?);
    let bias_s = bias_c.as_ref().map(|t| cuda_of(t, op)).transpose()?;
    let u_s = u_c.as_ref().map(|t| cuda_of(t, op)).transpose()?;
    let b_s = b_c.as_ref().map(|t| cuda_of(t, op)).transpose()?;
    let r = i32_of(if u_s.is_some() { p.rank } else { 0 }, "rank")?;
    let (nt, out64, in64) = (i32_of(t, "tokens")?, i64_of(out), i64_of(inp));
    let (ds, da) = (dt.as_str(), aux.as_str());
    match path {
        Path::GemvSimt | Path::GemvMma => {
            let (name, cfg) = if path == Path::GemvMma {
                let ntiles = if t <= 8 { 1 } else { 2 };
                (
                    format!("q4_gemv_mma_{ds}_{da}_dq{}_nt{ntiles}", qd.dq()),
                    LaunchConfig {
                        grid_dim: (u32::try_from(out.div_ceil(16)).map_err(|_| Error::invalid("out too large"))?, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    },
                )
            } else {
                (
                    format!("q4_gemv_simt_{ds}_{da}_dq{}_al{}", qd.dq(), (inp % 32 == 0) as u8),
                    LaunchConfig {
                        grid_dim: (u32::try_from(out.div_ceil(4)).map_err(|_| Error::invalid("out too large"))?, 1, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    },
                )
            };
            let f = b.func("qmatmul", kname(name))?;
            let mut l = b.stream.launch_builder(&f);
            l.arg(&xs.data);
            qd.push(&mut l);
            push_opt(&mut l, bias_s);
            push_opt(&mut l, u_s);
            push_opt(&mut l, b_s);
            l.arg(&r).arg(&mut y.data).arg(&nt).arg(&out64).arg(&in64);
            // SAFETY: q4_gemv_{mma,simt}_<T>_<A>_dq<D>_*(const T* x [nt*in], <q4 args>, const A* bias [out] | null,
            // const A* u [nt*r] | null, const A* b [out*r] | null, int r, T* y [nt*out], int nt, int64 out,
            // int64 in). Shapes were validated in linear_forward; bias/u/b were cast to A = aux; nt <= 16
            // (<= 8 * n-tiles for mma); the mma variant needs in % 32 == 0 (checked for Path::GemvMma).
            // Grid: one warp per row (simt, 4 rows per block) or 16 rows per block (mma), covering `out`.
            unsafe { l.launch(cfg) }?;
        }
        Path::Tiled => {
            launch_tiled(
                &b, false, dt, aux, xs, &qd, bias_s, u_s, b_s, r, &mut y, t, out, inp, inp,
            )?;
        }
        Path::Baseline => unreachable!("handled above"),
    }
    Ok(wrap(y, &[t, out], dt))
}

pub(crate) fn backward_input(p: &Problem<'_>) -> Result<Tensor> {
    let op = "linear_backward_input";
    let dy = p.act;
    let dt = dy.dtype();
    let ds_ = cuda_of(dy, op)?;
    let b = ds_.backend.clone();
    let (t, out, inp) = (p.tokens, p.out, p.inp);
    let (v, a) = match p.low_rank {
        Some((v, a)) if p.rank > 0 => (Some(v), Some(a)),
        _ => (None, None),
    };
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
        let scratch;
        let w_dense: &CudaStorage = match p.w {
            BaseWeight::Dense(w) => cuda_of(w, op)?,
            BaseWeight::Quantized(q) => {
                let qd = Q4Dev::new(q)?;
                let mut s = alloc(&b, dt, out * inp)?;
                launch_dequant(&b, &qd, dt, &mut s, out * inp)?;
                scratch = s;
                &scratch
            }
        };
        let d = MatmulDims {
            m: t,
            n: inp,
            k: out,
            trans_a: false,
            trans_b: false,
        };
        gemm_any(&b, dt, ds_, w_dense, &mut dx, d, 0.0)?;
        if let (Some(v), Some(a)) = (v, a) {
            let (v, a) = (v.to_dtype(dt)?, a.to_dtype(dt)?);
            let d = MatmulDims {
                m: t,
                n: inp,
                k: p.rank,
                trans_a: false,
                trans_b: false,
            };
            gemm_any(&b, dt, cuda_of(&v, op)?, cuda_of(&a, op)?, &mut dx, d, 1.0)?;
        }
        return Ok(wrap(dx, &[t, inp], dt));
    }
    let BaseWeight::Quantized(q) = p.w else {
        return Err(Error::device(op, "internal: fused path without a 4-bit weight"));
    };
    let qd = Q4Dev::new(q)?;
    let aux = aux_dtype(dt, &[v, a]);
    let (v_c, a_c) = (cast_opt(v, aux)?, cast_opt(a, aux)?);
    let v_s = v_c.as_ref().map(|t| cuda_of(t, op)).transpose()?;
    let a_s = a_c.as_ref().map(|t| cuda_of(t, op)).transpose()?;
    let r = i32_of(if v_s.is_some() { p.rank } else { 0 }, "rank")?;
    launch_tiled(&b, true, dt, aux, ds_, &qd, None, v_s, a_s, r, &mut dx, t, inp, out, inp)?;
    Ok(wrap(dx, &[t, inp], dt))
}

/// `C[M, N] = Act[M, K]·B + Act2·B2 (+ bias)` through `q4_gemm_mma_{fwd,bwd}`, with split-K when the
/// output has fewer 128x128 tiles than 2x the SMs (few tokens).
#[allow(clippy::too_many_arguments)]
fn launch_tiled(
    b: &Arc<CudaBackend>,
    bwd: bool,
    dt: DType,
    aux: DType,
    act: &CudaStorage,
    qd: &Q4Dev<'_>,
    bias: Option<&CudaStorage>,
    act2: Option<&CudaStorage>,
    b2: Option<&CudaStorage>,
    r: i32,
    y: &mut CudaStorage,
    m: usize,
    n: usize,
    k: usize,
    inp: usize,
) -> Result<()> {
    const BM: usize = 128;
    const BN: usize = 128;
    const BK: usize = 32;
    let gx = n.div_ceil(BN);
    let gy = m.div_ceil(BM);
    if gy > 65535 || gx > i32::MAX as usize {
        return Err(Error::invalid(format!("{m} tokens x {n} outputs exceed the CUDA grid")));
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
    let dir = if bwd { "bwd" } else { "fwd" };
    let f = b.func(
        "qmatmul",
        kname(format!("q4_gemm_mma_{dir}_{}_{}_dq{}", dt.as_str(), aux.as_str(), qd.dq())),
    )?;
    let (m64, n64, k64, in64) = (i64_of(m), i64_of(n), i64_of(k), i64_of(inp));
    let kt_per32 = i32_of(kt_per, "k-tiles per split")?;
    let cfg = LaunchConfig {
        grid_dim: (gx as u32, gy as u32, splits as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    {
        let mut l = b.stream.launch_builder(&f);
        l.arg(&act.data);
        qd.push(&mut l);
        push_opt(&mut l, if ws.is_some() { None } else { bias });
        push_opt(&mut l, act2);
        push_opt(&mut l, b2);
        l.arg(&r);
        l.arg(&mut y.data);
        match ws.as_mut() {
            Some(w) => l.arg(&mut w.data),
            None => l.arg(&NULL),
        };
        l.arg(&m64).arg(&n64).arg(&k64).arg(&in64).arg(&kt_per32);
        // SAFETY: q4_gemm_mma_<dir>_<T>_<A>_dq<D>(const T* act [M*K], <q4 args>, const A* bias [N] | null,
        // const A* act2 [M*r] | null, const A* b2 (fwd [N*r], bwd [r*N]) | null, int r, T* y [M*N],
        // float* ws [splits*M*N] | null, int64 M, N, K, in, int kt_per_split). The callers guarantee
        // in % 32 == 0 and K % 8 == 0 (fwd: K = in; bwd: K = out, checked), dtypes T in {f16, bf16} and
        // A = aux; grid (ceil(N/128), ceil(M/128), splits) with splits * kt_per_split >= ceil(K/32), so
        // every output tile and k-tile is covered; static shared memory 40 KB < 48 KB.
        unsafe { l.launch(cfg) }?;
    }
    if let Some(w) = ws {
        let f = b.func(
            "qmatmul",
            kname(format!("splitk_reduce_{}_{}", dt.as_str(), aux.as_str())),
        )?;
        let s32 = i32_of(splits, "splits")?;
        let mut l = b.stream.launch_builder(&f);
        l.arg(&w.data);
        push_opt(&mut l, bias);
        l.arg(&mut y.data).arg(&m64).arg(&n64).arg(&s32);
        // SAFETY: splitk_reduce_<T>_<A>(const float* ws [splits*M*N], const A* bias [N] | null, T* y [M*N],
        // int64 M, int64 N, int splits); ws was fully written by the split kernels above (every split
        // writes every valid (m, n) of its tiles).
        unsafe { l.launch(grid_1d((m * n).min(1 << 24), 256)?) }?;
    }
    Ok(())
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

fn add_bias(b: &Arc<CudaBackend>, dt: DType, y: &mut CudaStorage, bias: &Tensor, m: usize, n: usize) -> Result<()> {
    let aux = if bias.dtype() == dt { dt } else { DType::F32 };
    let bias = bias.to_dtype(aux)?;
    let bs = cuda_of(&bias, "linear_forward")?;
    let f = b.func("qmatmul", kname(format!("add_bias_{}_{}", dt.as_str(), aux.as_str())))?;
    let (m64, n64) = (i64_of(m), i64_of(n));
    let mut l = b.stream.launch_builder(&f);
    l.arg(&mut y.data).arg(&bs.data).arg(&m64).arg(&n64);
    // SAFETY: add_bias_<T>_<A>(T* y [M*N], const A* bias [N], int64 M, int64 N); bias has N elements
    // (validated) of dtype A; y holds M*N of dtype T.
    unsafe { l.launch(grid_1d((m * n).min(1 << 24), 256)?) }?;
    Ok(())
}
