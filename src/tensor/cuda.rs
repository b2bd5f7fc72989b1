//! CUDA side of the tensor API: device storage, transfers, and launches of `kernels/tensor.cu`;
//! matmul goes through cuBLAS (f32 accumulation for f16/bf16).

use super::{BinaryOp, CpuStorage, DType, MatmulDims, RowReduce, Storage, Tensor};
use crate::device::cuda::{CudaBackend, backend, grid_1d, kernels as k};
use crate::error::{Error, Result};
use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig};
use std::sync::Arc;

/// Device bytes of one tensor plus the backend that owns them. Typed views are made on demand from
/// the dtype recorded in the [`Tensor`].
pub(crate) struct CudaStorage {
    pub(crate) data: CudaSlice<u8>,
    pub(crate) backend: Arc<CudaBackend>,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage({} bytes on cuda:{})",
            self.data.len(),
            self.backend.ordinal
        )
    }
}

impl CudaStorage {
    pub(crate) fn try_clone(&self) -> Result<CudaStorage> {
        Ok(CudaStorage {
            data: self.backend.stream.clone_dtod(&self.data)?,
            backend: self.backend.clone(),
        })
    }

    pub(crate) fn download(&self, dtype: DType) -> Result<CpuStorage> {
        let bytes = self.backend.stream.clone_dtoh(&self.data)?;
        CpuStorage::from_bytes(dtype, &bytes)
    }

    /// A typed view of the bytes.
    pub(crate) fn view<T: DeviceRepr>(&self) -> Result<CudaView<'_, T>> {
        let n = self.data.len() / std::mem::size_of::<T>();
        // SAFETY: cudaMalloc memory is 256-byte aligned and the caller picks T from the tensor's dtype,
        // so the bytes are n valid T values.
        unsafe { self.data.transmute::<T>(n) }
            .ok_or_else(|| Error::device("cuda", "typed view out of bounds"))
    }

    /// A typed mutable view of the bytes.
    pub(crate) fn view_mut<T: DeviceRepr>(&mut self) -> Result<CudaViewMut<'_, T>> {
        let n = self.data.len() / std::mem::size_of::<T>();
        // SAFETY: as in `view`.
        unsafe { self.data.transmute_mut::<T>(n) }
            .ok_or_else(|| Error::device("cuda", "typed view out of bounds"))
    }
}

/// Uninitialized device memory for a tensor that a kernel will overwrite completely.
pub(crate) fn alloc(b: &Arc<CudaBackend>, dtype: DType, n: usize) -> Result<CudaStorage> {
    let bytes = n
        .checked_mul(dtype.size_in_bytes())
        .ok_or_else(|| Error::invalid("allocation size overflows"))?;
    // SAFETY: the memory is uninitialized; every caller launches a kernel that writes all n elements
    // before the tensor is observable.
    let mut data = unsafe { b.stream.alloc::<u8>(bytes.max(1)) }?;
    if poison_enabled() {
        use cudarc::driver::DevicePtrMut;
        let (ptr, _sync) = data.device_ptr_mut(&b.stream);
        // SAFETY: ptr addresses the `bytes.max(1)` bytes just allocated on this stream.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes.max(1), b.stream.cu_stream()) }?;
    }
    Ok(CudaStorage {
        data,
        backend: b.clone(),
    })
}

/// With `PEFT_KERNELS_POISON=1` (the test harness sets it), fresh kernel outputs are filled with 0xFF
/// bytes (NaN for every float type), so an element a kernel forgets to write fails the comparison.
pub(crate) fn poison_enabled() -> bool {
    static POISON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POISON.get_or_init(|| std::env::var("PEFT_KERNELS_POISON").is_ok_and(|v| v == "1"))
}

pub(crate) fn wrap(s: CudaStorage, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape.to_vec(), dtype)
}

pub(crate) fn zeros(ordinal: usize, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let b = backend(ordinal)?;
    let n: usize = shape.iter().product();
    let data = b.stream.alloc_zeros::<u8>((n * dtype.size_in_bytes()).max(1))?;
    Ok(wrap(CudaStorage { data, backend: b }, shape, dtype))
}

pub(crate) fn upload(ordinal: usize, s: &CpuStorage, shape: &[usize]) -> Result<Tensor> {
    let b = backend(ordinal)?;
    let bytes = s.as_bytes();
    let data = if bytes.is_empty() {
        b.stream.alloc_zeros::<u8>(1)?
    } else {
        b.stream.clone_htod(bytes)?
    };
    Ok(wrap(CudaStorage { data, backend: b }, shape, s.dtype()))
}

/// The CUDA storage of `t`, or the error every CUDA launcher gives for a tensor on another device.
pub(crate) fn storage<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::device(op, "expected a CUDA tensor, got a CPU tensor")),
    }
}

/// Runs `$body` with the type alias `$t` bound to the element type of a float dtype (`f32`, `f16` or
/// `bf16`), the way every CUDA launcher picks a generic kernel family's instantiation; other dtypes
/// are an error naming `$op`.
macro_rules! typed {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::tensor::DType::F16 => {
                type $t = half::f16;
                $body
            }
            $crate::tensor::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => Err($crate::error::Error::dtype($op, "a float dtype", other)),
        }
    };
}
pub(crate) use typed;

/// What an elementwise kernel over `shape` needs: the output (`dtype`, to be fully written by the
/// kernel), the element count as the kernels take it, and the 1-D launch grid.
fn elementwise(
    b: &Arc<CudaBackend>,
    dtype: DType,
    shape: &[usize],
) -> Result<(CudaStorage, i64, LaunchConfig)> {
    let n: usize = shape.iter().product();
    Ok((alloc(b, dtype, n)?, n as i64, grid_1d(n, 256)?))
}

pub(crate) fn cast(c: &CudaStorage, from: DType, to: DType, shape: &[usize]) -> Result<Tensor> {
    let b = &c.backend;
    let (mut out, n64, cfg) = elementwise(b, to, shape)?;
    typed!(from, "cast", |S| typed!(to, "cast", |D| {
        // SAFETY: cast_<S>_<D>(const S* x, D* y, int64 n) reads and writes n elements; both views hold n.
        unsafe { k::tensor::cast::<S, D>(b, cfg, &c.view()?, &mut out.view_mut()?, n64) }
    }))?;
    Ok(wrap(out, shape, to))
}

pub(crate) fn binary(
    a: &CudaStorage,
    bs: &CudaStorage,
    op: BinaryOp,
    dtype: DType,
    shape: &[usize],
) -> Result<Tensor> {
    let b = &a.backend;
    let (mut out, n64, cfg) = elementwise(b, dtype, shape)?;
    typed!(dtype, op.name(), |T| {
        let (x, y) = (a.view::<T>()?, bs.view::<T>()?);
        let mut o = out.view_mut::<T>()?;
        // SAFETY: binary_<op>_<T>(const T*, const T*, T*, int64 n); all three views hold n elements.
        unsafe {
            match op {
                BinaryOp::Add => k::tensor::binary_add::<T>(b, cfg, &x, &y, &mut o, n64),
                BinaryOp::Sub => k::tensor::binary_sub::<T>(b, cfg, &x, &y, &mut o, n64),
                BinaryOp::Mul => k::tensor::binary_mul::<T>(b, cfg, &x, &y, &mut o, n64),
            }
        }
    })?;
    Ok(wrap(out, shape, dtype))
}

pub(crate) fn affine(
    c: &CudaStorage,
    alpha: f32,
    beta: f32,
    dtype: DType,
    shape: &[usize],
) -> Result<Tensor> {
    let b = &c.backend;
    let (mut out, n64, cfg) = elementwise(b, dtype, shape)?;
    typed!(dtype, "affine", |T| {
        // SAFETY: affine_<T>(const T*, T*, float, float, int64 n); both views hold n elements.
        unsafe { k::tensor::affine::<T>(b, cfg, &c.view()?, &mut out.view_mut()?, alpha, beta, n64) }
    })?;
    Ok(wrap(out, shape, dtype))
}

pub(crate) fn axpy(a: &mut CudaStorage, x: &CudaStorage, alpha: f32, dtype: DType, n: usize) -> Result<()> {
    let b = a.backend.clone();
    let n64 = n as i64;
    typed!(dtype, "axpy", |T| {
        let cfg = grid_1d(n, 256)?;
        // SAFETY: axpy_<T>(T* y, const T* x, float alpha, int64 n); both views hold n elements.
        unsafe { k::tensor::axpy::<T>(&b, cfg, &mut a.view_mut()?, &x.view()?, alpha, n64) }
    })
}

pub(crate) fn dropout(
    c: &CudaStorage,
    dtype: DType,
    threshold: u64,
    scale: f32,
    seed: u64,
    shape: &[usize],
) -> Result<Tensor> {
    let b = &c.backend;
    let (mut out, n64, cfg) = elementwise(b, dtype, shape)?;
    typed!(dtype, "dropout", |T| {
        let (x, mut o) = (c.view::<T>()?, out.view_mut::<T>()?);
        // SAFETY: dropout_<T>(const T*, T*, uint64 threshold, float scale, uint64 seed, int64 n); both
        // views hold n elements.
        unsafe { k::tensor::dropout::<T>(b, cfg, &x, &mut o, threshold, scale, seed, n64) }
    })?;
    Ok(wrap(out, shape, dtype))
}

pub(crate) fn row_reduce(
    c: &CudaStorage,
    dtype: DType,
    rows: usize,
    cols: usize,
    op: RowReduce,
    out_shape: &[usize],
) -> Result<Tensor> {
    let b = &c.backend;
    let mut out = alloc(b, DType::F32, rows)?;
    if rows == 0 {
        return Ok(wrap(out, out_shape, DType::F32));
    }
    let (rows64, cols64) = (rows as i64, cols as i64);
    let mode: i32 = match op {
        RowReduce::Sum => 0,
        RowReduce::SumSquares => 1,
        RowReduce::Norm => 2,
    };
    // One warp per row; 8 rows per 256-thread block.
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    typed!(dtype, "row_reduce", |T| {
        let (x, mut o) = (c.view::<T>()?, out.view_mut::<f32>()?);
        // SAFETY: row_reduce_<T>(const T* x [rows*cols], float* out [rows], int64, int64, int mode).
        unsafe { k::tensor::row_reduce::<T>(b, cfg, &x, &mut o, rows64, cols64, mode) }
    })?;
    Ok(wrap(out, out_shape, DType::F32))
}

pub(crate) fn transpose(c: &CudaStorage, dtype: DType, m: usize, n: usize) -> Result<Tensor> {
    let b = &c.backend;
    let mut out = alloc(b, dtype, m * n)?;
    if m * n == 0 {
        return Ok(wrap(out, &[n, m], dtype));
    }
    let (m64, n64) = (m as i64, n as i64);
    // 32x32 tiles through shared memory, 32x8 threads.
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(32) as u32, m.div_ceil(32) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    if m.div_ceil(32) > 65535 {
        return Err(Error::invalid(format!(
            "transpose: {m} rows exceed the CUDA grid"
        )));
    }
    // SAFETY: transpose_b<size>(const E* src [m*n], E* dst [n*m], int64 m, int64 n) moves elements of
    // `size` bytes (E = the unsigned integer of that size); both buffers hold m*n*size bytes, so the
    // views of E hold m*n elements.
    unsafe {
        match dtype.size_in_bytes() {
            1 => k::tensor::transpose_b1(b, cfg, &c.view()?, &mut out.view_mut()?, m64, n64),
            2 => k::tensor::transpose_b2(b, cfg, &c.view()?, &mut out.view_mut()?, m64, n64),
            4 => k::tensor::transpose_b4(b, cfg, &c.view()?, &mut out.view_mut()?, m64, n64),
            _ => k::tensor::transpose_b8(b, cfg, &c.view()?, &mut out.view_mut()?, m64, n64),
        }
    }?;
    Ok(wrap(out, &[n, m], dtype))
}

/// Row-major `C = op(A)·op(B)` as column-major cuBLAS: `Cᵀ = op(B)ᵀ·op(A)ᵀ`.
pub(crate) fn matmul(
    a: &CudaStorage,
    bs: &CudaStorage,
    dtype: DType,
    d: MatmulDims,
    out_shape: &[usize],
) -> Result<Tensor> {
    let b = &a.backend;
    let mut out = alloc(b, dtype, d.m * d.n)?;
    typed!(dtype, "matmul", |T| {
        let x = a.view::<T>()?;
        let y = bs.view::<T>()?;
        let mut o = out.view_mut::<T>()?;
        gemm_rowmajor::<T>(b, &x, &y, &mut o, d, 0.0)
    })?;
    Ok(wrap(out, out_shape, dtype))
}

/// `C = op(A)·op(B) + beta·C` for row-major device views (cuBLAS, f32 accumulation).
pub(crate) fn gemm_rowmajor<T>(
    b: &CudaBackend,
    a: &CudaView<'_, T>,
    bm: &CudaView<'_, T>,
    c: &mut CudaViewMut<'_, T>,
    d: MatmulDims,
    beta: f32,
) -> Result<()>
where
    T: crate::tensor::Element + DeviceRepr + cudarc::driver::ValidAsZeroBits,
    cudarc::cublas::CudaBlas: Gemm<T>,
{
    let MatmulDims {
        m,
        n,
        k,
        trans_a,
        trans_b,
    } = d;
    if m == 0 || n == 0 {
        return Ok(());
    }
    for (what, v) in [("m", m), ("n", n), ("k", k)] {
        if v > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "matmul {what}={v} exceeds cuBLAS int range"
            )));
        }
    }
    if k == 0 {
        // cuBLAS leaves C untouched when k = 0; define the product as zero like the CPU path.
        b.stream.memset_zeros(c)?;
        return Ok(());
    }
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let cfg = GemmConfig {
        transa: op(trans_b),
        transb: op(trans_a),
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: T::from_f32(1.0),
        lda: if trans_b { k as i32 } else { n as i32 },
        ldb: if trans_a { m as i32 } else { k as i32 },
        beta: T::from_f32(beta),
        ldc: n as i32,
    };
    // SAFETY: the views hold m*k, k*n and m*n elements (checked through tensor shapes by callers), and
    // the leading dimensions above describe exactly those row-major buffers in column-major terms.
    unsafe { b.blas()?.gemm(cfg, bm, a, c) }?;
    Ok(())
}
