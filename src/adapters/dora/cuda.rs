//! CUDA launches of `kernels/dora.cu` (napkin math beside each kernel there). Same functions and
//! contracts as `cpu.rs`, which is their oracle.

use super::NORM_EPS;
use crate::device::cuda::{CudaBackend, grid_1d};
use crate::error::{Error, Result};
use crate::qmatmul::{Algo, BaseWeight, linear_forward};
use crate::quant::{Absmax, QuantizedTensor};
use crate::tensor::cuda::{CudaStorage, alloc, wrap};
use crate::tensor::{DType, Storage, Tensor};
use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};
use std::sync::Arc;

// The kernels define the same constant; they must agree.
const _: () = assert!(NORM_EPS == 1e-12);

/// A null device pointer for absent optional operands (the kernels test for it).
static NULL: u64 = 0;

fn cuda_of<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::device(op, "expected a CUDA tensor, got a CPU tensor")),
    }
}

fn f32_cuda<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaStorage> {
    if t.dtype() != DType::F32 {
        return Err(Error::dtype(op, "f32", t.dtype()));
    }
    cuda_of(t, op)
}

fn push_opt<'b>(l: &mut LaunchArgs<'b>, t: Option<&'b CudaStorage>) {
    match t {
        Some(s) => l.arg(&s.data),
        None => l.arg(&NULL),
    };
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

/// The device parts of a 4-bit weight, pushed as `(data, absmax, codes, nested, offset, nested_bs,
/// lut, ncode, bs_log2)` (the `Q4_PARAMS` of dora.cu).
struct Q4Args<'a> {
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
}

impl<'a> Q4Args<'a> {
    fn new(q: &'a QuantizedTensor) -> Result<Q4Args<'a>> {
        let op = "dora";
        let st = &q.state;
        let mut a = Q4Args {
            data: cuda_of(&q.data, op)?,
            absmax: None,
            codes: None,
            nested: None,
            offset: 0.0,
            nested_bs: 1,
            lut: st.code,
            ncode: [0.0; 256],
            // BaseWeight::validate restricts blocksizes to powers of two in 32..=4096.
            bs_log2: st.blocksize.trailing_zeros() as i32,
            dq: false,
        };
        match &st.absmax {
            Absmax::F32(t) => a.absmax = Some(cuda_of(t, op)?),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
                nested_code,
                nested_blocksize,
            } => {
                a.dq = true;
                a.codes = Some(cuda_of(codes, op)?);
                a.nested = Some(cuda_of(nested_absmax, op)?);
                a.offset = *offset;
                a.nested_bs = i32_of(*nested_blocksize, "nested blocksize")?;
                a.ncode.copy_from_slice(nested_code);
            }
        }
        Ok(a)
    }

    fn push<'b>(&'b self, l: &mut LaunchArgs<'b>) {
        l.arg(&self.data.data);
        push_opt(l, self.absmax);
        push_opt(l, self.codes);
        push_opt(l, self.nested);
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

fn backend_of(t: &Tensor, op: &'static str) -> Result<Arc<CudaBackend>> {
    Ok(cuda_of(t, op)?.backend.clone())
}

/// `‖W_i‖²` (f32 `[out]`): `Tensor::row_sq_norms` for a dense W, `dora_q4_row_sq_norms` for 4-bit.
pub(super) fn row_sq_norms(base: &BaseWeight) -> Result<Tensor> {
    let q = match base {
        BaseWeight::Dense(w) => return w.row_sq_norms(),
        BaseWeight::Quantized(q) => q,
    };
    let op = "dora row_sq_norms";
    let (rows, cols) = (base.out_features(), base.in_features());
    let qa = Q4Args::new(q)?;
    let b = qa.data.backend.clone();
    let mut out = alloc(&b, DType::F32, rows)?;
    if rows == 0 {
        return Ok(wrap(out, &[rows], DType::F32));
    }
    let f = b.func("dora", kname(format!("dora_q4_row_sq_norms_dq{}", qa.dq())))?;
    // One warp per row, 8 rows per 256-thread block.
    let gx = u32::try_from(rows.div_ceil(8)).map_err(|_| Error::invalid(format!("{op}: {rows} rows")))?;
    let cfg = LaunchConfig {
        grid_dim: (gx, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (r64, c64) = (i64_of(rows), i64_of(cols));
    let mut l = b.stream.launch_builder(&f);
    qa.push(&mut l);
    l.arg(&mut out.data).arg(&r64).arg(&c64);
    // SAFETY: dora_q4_row_sq_norms_dq<D>(Q4_PARAMS, float* out [rows], int64 rows, int64 cols). The base
    // weight was validated (packed bytes = ceil(rows*cols/2), absmax/codes/nested counts match the
    // blocksize), out holds rows f32; the grid covers rows with one warp each (the tail warps return).
    unsafe { l.launch(cfg) }?;
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
        BaseWeight::Quantized(_) => dtype,
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
        let f = b.func("dora", kname(format!("dora_norm_prep_{}", dtype.as_str())))?;
        let (r32, in64) = (i32_of(r, "rank")?, i64_of(inp));
        let mut l = b.stream.launch_builder(&f);
        l.arg(&asr.data).arg(&mut gram.data);
        match a_t.as_mut() {
            Some(t) => l.arg(&mut t.data),
            None => l.arg(&NULL),
        };
        l.arg(&r32).arg(&in64);
        let cfg = LaunchConfig {
            grid_dim: (pairs, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: dora_norm_prep_<T>(const float* a [r*in], float* gram [r*r], T* a_t [r*in] | null, int r,
        // int64 in). a is f32 [r, in] (checked); gram holds r*r f32; a_t, when present, r*in elements of
        // T = dtype (null for f32, where the kernel writes nothing there); one block per pair k <= l,
        // r(r+1)/2 blocks, so every G[k, l] and G[l, k] is written; static shared memory 128 B.
        unsafe { l.launch(cfg) }?;
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
        BaseWeight::Dense(_) => true,
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
        let src = cuda_of(&part, "dora weight_proj")?;
        let mut dst = pt.data.slice_mut(k0 * out * es..(k0 + kc) * out * es);
        b.stream
            .memcpy_dtod(&src.data.slice(0..kc * out * es), &mut dst)?;
    }
    Ok(wrap(pt, &[r, out], dtype))
}

/// Rows `[k0, k0 + kc)` of a 2-D CUDA tensor with `cols` columns, as a new tensor.
fn slice_rows(t: &Tensor, k0: usize, kc: usize, cols: usize) -> Result<Tensor> {
    let s = cuda_of(t, "dora slice_rows")?;
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
        BaseWeight::Quantized(q) => q,
    };
    let (r, out) = ct.dims2(op)?;
    let inp = base.in_features();
    let cs = f32_cuda(ct, op)?;
    let qa = Q4Args::new(q)?;
    let b = qa.data.backend.clone();
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
    let f = b.func("dora", kname(format!("dora_q4_tgemv_dq{}", qa.dq())))?;
    let red = b.func("dora", "dora_tgemv_reduce")?;
    let (out64, in64, rpg64, g64) = (i64_of(out), i64_of(inp), i64_of(rows_per_group), i64_of(groups));
    for k0 in (0..r).step_by(16) {
        let kc = 16.min(r - k0);
        let kc32 = i32_of(kc, "rank chunk")?;
        let ct_chunk = cs.data.slice(k0 * out * 4..(k0 + kc) * out * 4);
        {
            let mut l = b.stream.launch_builder(&f);
            qa.push(&mut l);
            l.arg(&ct_chunk)
                .arg(&mut ws.data)
                .arg(&out64)
                .arg(&in64)
                .arg(&kc32)
                .arg(&rpg64);
            let cfg = LaunchConfig {
                grid_dim: (gx as u32, groups as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: dora_q4_tgemv_dq<D>(Q4_PARAMS, const float* ct [kc*out], float* ws [groups*kc*in],
            // int64 out, int64 in, int r = kc <= 16, int64 rows_per_group). The weight was validated;
            // ct_chunk holds rows k0..k0+kc of the f32 [r, out] Cᵀ; ws holds groups*min(16, r)*in >=
            // groups*kc*in f32; grid (ceil(in/256), groups) with groups*rows_per_group >= out covers
            // every (column, row group); each (group, k, j) is written exactly once.
            unsafe { l.launch(cfg) }?;
        }
        let (kc64, k064) = (i64_of(kc), i64_of(k0));
        let mut l = b.stream.launch_builder(&red);
        l.arg(&ws.data)
            .arg(&mut y.data)
            .arg(&g64)
            .arg(&kc64)
            .arg(&in64)
            .arg(&k064);
        // SAFETY: dora_tgemv_reduce(const float* ws [groups*kc*in], float* y [r*in], int64 groups,
        // int64 kc, int64 in, int64 k0): writes y[(k0 + k)*in + j] for k < kc, j < in, within y's r*in
        // elements since k0 + kc <= r; ws was fully written by the launch above (same stream).
        unsafe { l.launch(grid_1d((kc * inp).min(1 << 24), 256)?) }?;
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
        cuda_of(pt, op)?,
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
        let f = b.func(
            "dora",
            kname(format!("dora_norm_assemble_{}", pt.dtype().as_str())),
        )?;
        let (out64, r32) = (i64_of(out), i32_of(r, "rank")?);
        let mut l = b.stream.launch_builder(&f);
        l.arg(&ws.data).arg(&ps.data).arg(&bs.data).arg(&gs.data);
        push_opt(&mut l, ms);
        l.arg(&mut n.data);
        match scale.as_mut() {
            Some(sc) => l.arg(&mut sc.data),
            None => l.arg(&NULL),
        };
        l.arg(&s).arg(&out64).arg(&r32);
        // SAFETY: dora_norm_assemble_<P>(const float* wsq [out], const P* pt [r*out], const float* b
        // [out*r], const float* gram [r*r], const float* m [out] | null, float* n [out], float* scale [out]
        // | null, float s, int64 out, int r). P is pt's dtype (the kernel name), everything else f32
        // (checked), sizes as the caller's shapes; scale is non-null exactly when m is; the grid-stride
        // loop covers out.
        unsafe { l.launch(grid_1d(out.min(1 << 22), 128)?) }?;
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
    let zs = cuda_of(z, op)?;
    let cs = f32_cuda(c, op)?;
    let bs = bias.map(|b| f32_cuda(b, op)).transpose()?;
    let adds = add.map(|a| cuda_of(a, op)).transpose()?;
    let b = zs.backend.clone();
    let mut y = alloc(&b, dt, rows * cols)?;
    if rows * cols > 0 {
        let f = b.func("dora", kname(format!("dora_scale_cols_{}", dt.as_str())))?;
        let (r64, c64) = (i64_of(rows), i64_of(cols));
        let mut l = b.stream.launch_builder(&f);
        l.arg(&zs.data).arg(&cs.data);
        push_opt(&mut l, bs);
        push_opt(&mut l, adds);
        l.arg(&mut y.data).arg(&r64).arg(&c64);
        // SAFETY: dora_scale_cols_<T>(const T* z [>= rows*cols], const float* c [cols], const float* bias
        // [cols] | null, const T* add [rows*cols] | null, T* y [rows*cols], int64 rows, int64 cols). T is
        // z's dtype; the caller checked c, bias (f32) and add (z's dtype and shape); the grid covers
        // every column and strides over all rows.
        unsafe { l.launch(grid_cols_rows(rows, cols)?) }?;
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
        cuda_of(dy, op)?,
        cuda_of(z, op)?,
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
        let f = b.func(
            "dora",
            kname(format!("dora_colsum_{}_{}", dt.as_str(), dzd.as_str())),
        )?;
        let (r64, c64) = (i64_of(rows), i64_of(cols));
        let gx =
            u32::try_from(cols.div_ceil(32)).map_err(|_| Error::invalid(format!("{op}: {cols} columns")))?;
        let mut l = b.stream.launch_builder(&f);
        l.arg(&dys.data)
            .arg(&zs.data)
            .arg(&gs.data)
            .arg(&ns.data)
            .arg(&mut dm.data);
        match dz.as_mut() {
            Some(d) => l.arg(&mut d.data),
            None => l.arg(&NULL),
        };
        l.arg(&r64).arg(&c64);
        let cfg = LaunchConfig {
            grid_dim: (gx, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: dora_colsum_<T>_<D>(const T* dy [rows*cols], const T* z [>= rows*cols], const float* g
        // [cols], const float* n [cols], float* dm [cols], D* dz [rows*cols] | null, int64 rows, int64
        // cols). dy and z share dtype T and shape (checked by the caller); D is f32 or T (checked above);
        // block (32, 8) with ceil(cols/32) blocks covers every column; static shared memory 1 KB.
        unsafe { l.launch(cfg) }?;
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
        let f = b.func("dora", "dora_full_norm_grad")?;
        let (out64, r32) = (i64_of(out), i32_of(r, "rank")?);
        let mut l = b.stream.launch_builder(&f);
        l.arg(&dms.data)
            .arg(&gs.data)
            .arg(&ns.data)
            .arg(&bs.data)
            .arg(&ps.data)
            .arg(&grs.data);
        l.arg(&mut dbx.data)
            .arg(&mut ct.data)
            .arg(&s)
            .arg(&out64)
            .arg(&r32);
        // SAFETY: dora_full_norm_grad(const float* dm, g, n [out], const float* b [out*r], const float*
        // pt [r*out], const float* gram [r*r], float* dbx [out*r], float* ct [r*out], float s, int64 out,
        // int r); all f32 (checked) with those sizes (the caller's shapes); the grid-stride loop covers out.
        unsafe { l.launch(grid_1d(out.min(1 << 22), 128)?) }?;
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
        let func = b.func("dora", "dora_merge_rows")?;
        let (r64, c64, mode) = (i64_of(rows), i64_of(cols), unmerge as i32);
        let mut l = b.stream.launch_builder(&func);
        l.arg(&ws.data)
            .arg(&ds.data)
            .arg(&fs.data)
            .arg(&mut y.data)
            .arg(&r64)
            .arg(&c64)
            .arg(&mode);
        // SAFETY: dora_merge_rows(const float* w [rows*cols], const float* d [rows*cols], const float* f
        // [rows], float* y [rows*cols], int64 rows, int64 cols, int mode); all f32 (checked) with the
        // caller's shapes; the grid covers every column and strides over all rows.
        unsafe { l.launch(grid_cols_rows(rows, cols)?) }?;
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
        let f = b.func("dora", "dora_scale_of")?;
        let out64 = i64_of(out);
        let mut l = b.stream.launch_builder(&f);
        l.arg(&ms.data).arg(&ns.data).arg(&mut g.data).arg(&out64);
        // SAFETY: dora_scale_of(const float* m [out], const float* n [out], float* g [out], int64 out);
        // all f32 (checked), the caller checked m and n have out elements; grid-stride over out.
        unsafe { l.launch(grid_1d(out.min(1 << 22), 256)?) }?;
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
        let func = b.func("dora", "dora_scale_rows")?;
        let (r64, c64) = (i64_of(rows), i64_of(cols));
        let mut l = b.stream.launch_builder(&func);
        l.arg(&xs.data).arg(&fs.data).arg(&mut y.data).arg(&r64).arg(&c64);
        // SAFETY: dora_scale_rows(const float* x [rows*cols], const float* f [rows], float* y [rows*cols],
        // int64 rows, int64 cols); f32 (checked), f has rows elements (the caller's g); grid-stride over
        // rows*cols.
        unsafe { l.launch(grid_1d((rows * cols).min(1 << 22), 256)?) }?;
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
    }
}
