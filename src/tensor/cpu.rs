//! CPU kernels for the tensor API: rayon over large chunks, f32 arithmetic, one rounding per output.
//! These are also the oracles for the CUDA kernels in `kernels/tensor.cu`.

use super::{BinaryOp, CpuStorage, CpuView, Element, MatmulDims, RowReduce, with_cpu, with_cpu_vec};
use crate::error::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;

pub(crate) use super::dropout::dropout_slice;

/// Elements per rayon task: big enough to amortize scheduling, small enough to balance 2-64 cores.
pub(crate) const CHUNK: usize = 1 << 15;

fn map1<T: Element, U: Element>(a: &[T], f: impl Fn(f32) -> f32 + Sync) -> Vec<U> {
    let mut out = vec![U::default(); a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .for_each(|(o, a)| {
            for (o, &a) in o.iter_mut().zip(a) {
                *o = U::from_f32(f(a.to_f32()));
            }
        });
    out
}

fn map2<T: Element>(a: &[T], b: &[T], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<T> {
    let mut out = vec![T::default(); a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = T::from_f32(f(a.to_f32(), b.to_f32()));
            }
        });
    out
}

/// Float-to-float cast. Half conversions use `half`'s SIMD slice routines.
pub(crate) fn cast(s: &CpuStorage, to: super::DType) -> CpuStorage {
    use super::DType as D;
    fn go<T: Element>(v: &[T], to: D) -> CpuStorage {
        match to {
            D::F32 => CpuStorage::F32(to_f32_vec(v)),
            D::F16 => CpuStorage::F16(map1::<T, f16>(v, |x| x)),
            D::BF16 => CpuStorage::BF16(map1::<T, bf16>(v, |x| x)),
            D::U8 => CpuStorage::U8(map1::<T, u8>(v, |x| x)),
            D::I32 => CpuStorage::I32(map1::<T, i32>(v, |x| x)),
            D::I64 => CpuStorage::I64(map1::<T, i64>(v, |x| x)),
        }
    }
    with_cpu!(s, |v| go(v, to))
}

/// Any element slice to f32 (parallel, SIMD for f16 through `half`).
pub(crate) fn to_f32_vec<T: Element>(v: &[T]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![0f32; v.len()];
    if let Some(h) = bytemuck::try_cast_slice::<T, f16>(v)
        .ok()
        .filter(|_| T::DTYPE == super::DType::F16)
    {
        out.par_chunks_mut(CHUNK)
            .zip(h.par_chunks(CHUNK))
            .for_each(|(o, h)| h.convert_to_f32_slice(o));
    } else if let Some(h) = bytemuck::try_cast_slice::<T, bf16>(v)
        .ok()
        .filter(|_| T::DTYPE == super::DType::BF16)
    {
        out.par_chunks_mut(CHUNK)
            .zip(h.par_chunks(CHUNK))
            .for_each(|(o, h)| h.convert_to_f32_slice(o));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(v.par_chunks(CHUNK))
            .for_each(|(o, v)| o.iter_mut().zip(v).for_each(|(o, &x)| *o = x.to_f32()));
    }
    out
}

/// f32 to any float element type, rounding to nearest even.
pub(crate) fn from_f32_vec<T: Element>(v: &[f32]) -> Vec<T> {
    map1::<f32, T>(v, |x| x)
}

pub(crate) fn binary(a: &CpuStorage, b: &CpuStorage, op: BinaryOp) -> CpuStorage {
    fn go<T: Element>(a: &[T], b: &CpuStorage, op: BinaryOp) -> CpuStorage {
        let b = b.typed::<T>().unwrap_or(&[]);
        CpuStorage::wrap(match op {
            BinaryOp::Add => map2(a, b, |x, y| x + y),
            BinaryOp::Sub => map2(a, b, |x, y| x - y),
            BinaryOp::Mul => map2(a, b, |x, y| x * y),
        })
    }
    with_cpu!(a, |v| go(v, b, op))
}

pub(crate) fn affine(s: &CpuStorage, alpha: f32, beta: f32) -> CpuStorage {
    fn go<T: Element>(v: &[T], alpha: f32, beta: f32) -> CpuStorage {
        CpuStorage::wrap(map1::<T, T>(v, |x| x * alpha + beta))
    }
    with_cpu!(s, |v| go(v, alpha, beta))
}

/// `a += alpha * b` in place.
pub(crate) fn axpy(a: &mut CpuStorage, b: &CpuStorage, alpha: f32) {
    fn go<T: Element>(a: &mut [T], b: &CpuStorage, alpha: f32) {
        let b = b.typed::<T>().unwrap_or(&[]);
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .for_each(|(a, b)| {
                for (a, &b) in a.iter_mut().zip(b) {
                    *a = T::from_f32(a.to_f32() + alpha * b.to_f32());
                }
            });
    }
    if let CpuStorage::External(_) = a {
        *a = a.to_owned_storage();
    }
    // External storage was made owned above, so the last arm has nothing to do.
    with_cpu_vec!(a, |v| go(v.as_mut_slice(), b, alpha), |_| ())
}

/// Inverted dropout; see [`super::Tensor::dropout`].
pub(crate) fn dropout(s: &CpuStorage, threshold: u64, scale: f32, seed: u64) -> CpuStorage {
    with_cpu!(s, |v| CpuStorage::wrap(dropout_slice(v, threshold, scale, seed)))
}

/// Per-row reduction of a `[rows, cols]` view, accumulated in f64 for an accurate oracle.
pub(crate) fn row_reduce(s: &CpuStorage, rows: usize, cols: usize, op: RowReduce) -> Vec<f32> {
    fn go<T: Element>(v: &[T], rows: usize, cols: usize, op: RowReduce) -> Vec<f32> {
        let mut out = vec![0f32; rows];
        if cols == 0 {
            return out;
        }
        out.par_iter_mut()
            .zip(v.par_chunks(cols))
            .with_min_len((CHUNK / cols).max(1))
            .for_each(|(o, row)| {
                let acc: f64 = match op {
                    RowReduce::Sum => row.iter().map(|x| x.to_f32() as f64).sum(),
                    RowReduce::SumSquares | RowReduce::Norm => {
                        row.iter().map(|x| (x.to_f32() as f64).powi(2)).sum()
                    }
                };
                *o = if op == RowReduce::Norm {
                    acc.sqrt() as f32
                } else {
                    acc as f32
                };
            });
        out
    }
    with_cpu!(s, |v| go(v, rows, cols, op))
}

/// Materialized transpose of a row-major `[m, n]`, in cache-friendly 32x32 tiles.
pub(crate) fn transpose(s: &CpuStorage, m: usize, n: usize) -> CpuStorage {
    fn go<T: Element>(v: &[T], m: usize, n: usize) -> CpuStorage {
        const TILE: usize = 32;
        let mut out = vec![T::default(); m * n];
        if m == 0 || n == 0 {
            return CpuStorage::wrap(out);
        }
        // Parallel over tiles of output rows (= input columns).
        out.par_chunks_mut(TILE * m).enumerate().for_each(|(tj, block)| {
            let j0 = tj * TILE;
            let jn = block.len() / m;
            for i0 in (0..m).step_by(TILE) {
                for j in j0..j0 + jn {
                    for i in i0..(i0 + TILE).min(m) {
                        block[(j - j0) * m + i] = v[i * n + j];
                    }
                }
            }
        });
        CpuStorage::wrap(out)
    }
    with_cpu!(s, |v| go(v, m, n))
}

/// Parallelism for the `gemm` crate: all rayon threads for big products, one thread for tiny ones
/// (where fork/join costs more than the math).
pub(crate) fn gemm_parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if (m as u128) * (n as u128) * (k as u128) < 64 * 64 * 64 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// `C[m, n] = op(A) · op(B)` over row-major slices, f32, through the `gemm` crate. Transposes are
/// expressed as strides, so no operand is copied. With `accumulate`, `C += ...` instead.
pub(crate) fn sgemm(a: &[f32], b: &[f32], c: &mut [f32], d: MatmulDims, accumulate: bool) {
    let MatmulDims {
        m,
        n,
        k,
        trans_a,
        trans_b,
    } = d;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // Row-major A[m,k]: row stride k, col stride 1. Transposed storage [k,m]: element (i,p) at p*m+i.
    let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the slices hold at least m*k, k*n and m*n elements (checked by every caller through the
    // tensor shapes, and asserted above in debug builds); the strides address only those elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm_parallelism(m, n, k),
        )
    }
}

pub(crate) fn matmul(a: &CpuStorage, b: &CpuStorage, d: MatmulDims) -> Result<CpuStorage> {
    let need_a = d.m * d.k;
    let need_b = d.k * d.n;
    if a.len() < need_a || b.len() < need_b {
        return Err(Error::shape("matmul", "operand storage smaller than its shape"));
    }
    Ok(match (a.view(), b.view()) {
        (CpuView::F32(a), CpuView::F32(b)) => {
            let mut c = vec![0f32; d.m * d.n];
            sgemm(a, b, &mut c, d, false);
            CpuStorage::F32(c)
        }
        (CpuView::F16(a), CpuView::F16(b)) => {
            // The gemm crate's f16 kernels accumulate in f16 for some shapes (seen: n = 1), which loses
            // ~3 significant bits over k = 100. Widen to f32 (exact), multiply, round once, like bf16.
            let (a, b) = (to_f32_vec(a), to_f32_vec(b));
            let mut c = vec![0f32; d.m * d.n];
            sgemm(&a, &b, &mut c, d, false);
            CpuStorage::F16(from_f32_vec(&c))
        }
        (CpuView::BF16(a), CpuView::BF16(b)) => {
            // No bf16 kernel in `gemm`: widen to f32 (exact), multiply, round once.
            let (a, b) = (to_f32_vec(a), to_f32_vec(b));
            let mut c = vec![0f32; d.m * d.n];
            sgemm(&a, &b, &mut c, d, false);
            CpuStorage::BF16(from_f32_vec(&c))
        }
        _ => return Err(Error::dtype("matmul", "matching float dtypes", b.dtype())),
    })
}

/// A raw pointer that tasks writing provably disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used by tasks that write disjoint element sets (documented at each use).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// A method (not a field access) so closures capture the whole `Send + Sync` wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with arbitrary strides (f32, the `gemm` crate).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: the caller guarantees dst addresses an m×n view with row stride dst_rs.
                unsafe { std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n) }.fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the caller guarantees every pointer addresses a matrix of the stated size and strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}
