//! The safe tensor API: a contiguous, row-major, immutable-by-default n-d array on a [`Device`].
//!
//! `Tensor` clones are cheap (the storage is reference counted); mutation through the crate's
//! in-place kernels copies the storage first if it is shared (copy on write).
//!
//! Every operation checks shapes, dtypes and devices and returns an [`Error`] instead of panicking.
//! Each has a CPU implementation (`cpu.rs`, rayon-parallel) and, under the `cuda` feature, a CUDA one
//! (`cuda.rs`: hand-written kernels in `kernels/tensor.cu`, matmul through cuBLAS).

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub(crate) mod cuda;
mod dropout;
mod dtype;
pub(crate) mod exp;

pub use dtype::{DType, Element};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::rng::Rng;
use half::{bf16, f16};
use std::sync::Arc;

/// Host storage, one variant per dtype, plus read-only host memory owned by someone else.
#[derive(Clone, Debug)]
pub(crate) enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    U8(Vec<u8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    /// Elements another framework owns, read in place (see [`Tensor::from_external`]). Reads work
    /// like the owned variants'; whatever needs the buffer mutable or owned copies it first
    /// ([`CpuStorage::to_owned_storage`], counted by [`external_copies`]).
    External(ExternalHost),
}

/// The typed elements of a [`CpuStorage`], borrowed.
pub(crate) enum CpuView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    U8(&'a [u8]),
    I32(&'a [i32]),
    I64(&'a [i64]),
}

/// Host elements this crate does not own: a pointer, an element count and dtype, and the owner that
/// keeps the allocation alive (a clone of the foreign framework's tensor). Built only by the unsafe
/// [`Tensor::from_external`], whose caller guarantees when the memory may be read.
#[derive(Clone)]
pub(crate) struct ExternalHost {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    dtype: DType,
    _owner: Arc<dyn std::any::Any + Send + Sync>,
}

// SAFETY: an `ExternalHost` is a read-only view: this crate never writes through `ptr`. Reading it
// from any thread is what `Tensor::from_external`'s caller vouched for (the memory is allocated and
// not written while it is read, wherever the read happens); the owner is itself `Send + Sync`.
unsafe impl Send for ExternalHost {}
// SAFETY: as for `Send`: shared access only ever reads the elements.
unsafe impl Sync for ExternalHost {}

impl std::fmt::Debug for ExternalHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExternalHost[{} x {}]", self.len, self.dtype)
    }
}

impl ExternalHost {
    /// The elements as `T` (the caller matched `T` to `self.dtype`).
    fn slice<T: Element>(&self) -> &[T] {
        debug_assert_eq!(T::DTYPE, self.dtype);
        // SAFETY: `ptr` and `len` come from a `&[T]` of this dtype (`Tensor::from_external`), so the
        // pointer is non-null, aligned for `T` and spans `len` initialized elements; the caller of
        // `from_external` guarantees that the memory is allocated and not written for as long as any
        // read of it lasts, and the returned slice borrows `self`, whose reads that guarantee covers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<T>(), self.len) }
    }

    fn view(&self) -> CpuView<'_> {
        match self.dtype {
            DType::F32 => CpuView::F32(self.slice()),
            DType::F16 => CpuView::F16(self.slice()),
            DType::BF16 => CpuView::BF16(self.slice()),
            DType::U8 => CpuView::U8(self.slice()),
            DType::I32 => CpuView::I32(self.slice()),
            DType::I64 => CpuView::I64(self.slice()),
        }
    }
}

thread_local! {
    static EXTERNAL_COPIES: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Copies made on the calling thread of external (borrowed) host storage into owned storage, because
/// something needed it mutable or owned: `(copies, bytes)`, a running total. The candle boundary adds
/// these to its own count, so a layer that silently materializes a borrowed input shows up there.
#[cfg_attr(not(feature = "candle"), allow(dead_code))]
pub(crate) fn external_copies() -> (u64, u64) {
    EXTERNAL_COPIES.with(std::cell::Cell::get)
}

/// Where the bytes live.
#[derive(Debug)]
pub(crate) enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaStorage),
}

/// A contiguous row-major tensor.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor[{:?}, {}, {}]", self.shape, self.dtype, self.device())
    }
}

/// Applies `$body` with `$v` bound to the typed elements (`&[T]`) of a `&CpuStorage` (owned or
/// external).
macro_rules! with_cpu {
    ($s:expr, |$v:ident| $body:expr) => {
        match $crate::tensor::CpuStorage::view($s) {
            $crate::tensor::CpuView::F32($v) => $body,
            $crate::tensor::CpuView::F16($v) => $body,
            $crate::tensor::CpuView::BF16($v) => $body,
            $crate::tensor::CpuView::U8($v) => $body,
            $crate::tensor::CpuView::I32($v) => $body,
            $crate::tensor::CpuView::I64($v) => $body,
        }
    };
}
pub(crate) use with_cpu;

/// Applies `$body` with `$v` bound to the typed Vec of an owned [`CpuStorage`] (by value or
/// reference, as `$s` is), `$ext` for an external one.
macro_rules! with_cpu_vec {
    ($s:expr, |$v:ident| $body:expr, |$e:pat_param| $ext:expr) => {
        match $s {
            CpuStorage::F32($v) => $body,
            CpuStorage::F16($v) => $body,
            CpuStorage::BF16($v) => $body,
            CpuStorage::U8($v) => $body,
            CpuStorage::I32($v) => $body,
            CpuStorage::I64($v) => $body,
            CpuStorage::External($e) => $ext,
        }
    };
}
pub(crate) use with_cpu_vec;

impl CpuStorage {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::U8(_) => DType::U8,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::External(e) => e.dtype,
        }
    }

    /// The typed elements, borrowed (owned or external storage alike).
    pub(crate) fn view(&self) -> CpuView<'_> {
        match self {
            CpuStorage::F32(v) => CpuView::F32(v),
            CpuStorage::F16(v) => CpuView::F16(v),
            CpuStorage::BF16(v) => CpuView::BF16(v),
            CpuStorage::U8(v) => CpuView::U8(v),
            CpuStorage::I32(v) => CpuView::I32(v),
            CpuStorage::I64(v) => CpuView::I64(v),
            CpuStorage::External(e) => e.view(),
        }
    }

    /// Owned storage with the same elements: a clone, or for external storage a copy into a Vec
    /// (counted by [`external_copies`]).
    pub(crate) fn to_owned_storage(&self) -> CpuStorage {
        match self {
            CpuStorage::External(e) => {
                EXTERNAL_COPIES.with(|c| {
                    let (n, b) = c.get();
                    c.set((n + 1, b + (e.len * e.dtype.size_in_bytes()) as u64));
                });
                with_cpu!(self, |v| CpuStorage::wrap(v.to_vec()))
            }
            s => s.clone(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        with_cpu!(self, |v| v.len())
    }

    /// Wraps a typed Vec. The casts below are identity casts (same type), which bytemuck checks.
    pub(crate) fn wrap<T: Element>(v: Vec<T>) -> CpuStorage {
        fn id<T: Element, U: Element>(v: Vec<T>) -> Vec<U> {
            // T and U are the same type here (DType matched), so this never reallocates or fails.
            bytemuck::allocation::try_cast_vec(v)
                .unwrap_or_else(|(_, v)| v.into_iter().map(|x| U::from_f32(x.to_f32())).collect())
        }
        match T::DTYPE {
            DType::F32 => CpuStorage::F32(id(v)),
            DType::F16 => CpuStorage::F16(id(v)),
            DType::BF16 => CpuStorage::BF16(id(v)),
            DType::U8 => CpuStorage::U8(id(v)),
            DType::I32 => CpuStorage::I32(id(v)),
            DType::I64 => CpuStorage::I64(id(v)),
        }
    }

    /// The typed slice if `T` matches the stored dtype.
    pub(crate) fn typed<T: Element>(&self) -> Option<&[T]> {
        if self.dtype() != T::DTYPE {
            return None;
        }
        with_cpu!(self, |v| bytemuck::try_cast_slice(v).ok())
    }

    pub(crate) fn typed_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        if self.dtype() != T::DTYPE {
            return None;
        }
        with_cpu_vec!(
            self,
            |v| bytemuck::try_cast_slice_mut(v.as_mut_slice()).ok(),
            |_| None
        )
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        with_cpu!(self, |v| bytemuck::cast_slice(v))
    }

    pub(crate) fn zeros(dtype: DType, n: usize) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; n]),
            DType::U8 => CpuStorage::U8(vec![0; n]),
            DType::I32 => CpuStorage::I32(vec![0; n]),
            DType::I64 => CpuStorage::I64(vec![0; n]),
        }
    }

    /// Decodes little-endian bytes (any alignment) into storage of `dtype`.
    pub(crate) fn from_bytes(dtype: DType, bytes: &[u8]) -> Result<CpuStorage> {
        let size = dtype.size_in_bytes();
        if !bytes.len().is_multiple_of(size) {
            return Err(Error::format(
                "tensor bytes",
                format!("{} bytes is not a multiple of {size} ({dtype})", bytes.len()),
            ));
        }
        fn read<T: Element>(bytes: &[u8]) -> Vec<T> {
            let mut v = vec![T::default(); bytes.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
            v
        }
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(read(bytes)),
            DType::F16 => CpuStorage::F16(read(bytes)),
            DType::BF16 => CpuStorage::BF16(read(bytes)),
            DType::U8 => CpuStorage::U8(bytes.to_vec()),
            DType::I32 => CpuStorage::I32(read(bytes)),
            DType::I64 => CpuStorage::I64(read(bytes)),
        })
    }
}

fn numel_of(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::shape("tensor", format!("shape {shape:?} overflows usize")))
}

impl Tensor {
    // ---------------------------------------------------------------- construction

    pub(crate) fn from_storage(storage: Storage, shape: Vec<usize>, dtype: DType) -> Tensor {
        Tensor {
            storage: Arc::new(storage),
            shape,
            dtype,
        }
    }

    pub(crate) fn from_cpu_storage(s: CpuStorage, shape: &[usize]) -> Result<Tensor> {
        let n = numel_of(shape)?;
        if s.len() != n {
            return Err(Error::shape(
                "from_vec",
                format!("{} elements do not fill shape {shape:?} ({n})", s.len()),
            ));
        }
        let dtype = s.dtype();
        Ok(Tensor::from_storage(Storage::Cpu(s), shape.to_vec(), dtype))
    }

    /// A host tensor of `shape` that reads `data` in place, without copying it; `owner` is kept alive
    /// as long as the storage (a clone of the foreign tensor that owns `data`). The tensor is read-only:
    /// anything that would mutate its elements or take its buffer copies them first (booked in
    /// [`external_copies`]), and [`Tensor::into_cpu_vec`] refuses it.
    ///
    /// # Safety
    ///
    /// Every read of the elements through the returned tensor or any tensor sharing its storage
    /// (clones, reshapes) must happen while the memory of `data` is still allocated and nothing writes
    /// it (no write may race with or fall inside a read; a slice borrowed from such a tensor counts as
    /// a read for as long as it lives). This function cannot check that, so the caller must keep every
    /// such tensor under its control: never hand one to code that could read it at any other time.
    /// Creating, cloning and dropping these tensors does not read the memory.
    #[cfg_attr(not(feature = "candle"), allow(dead_code))]
    pub(crate) unsafe fn from_external<T: Element>(
        data: &[T],
        shape: &[usize],
        owner: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<Tensor> {
        let n = numel_of(shape)?;
        if data.len() != n {
            return Err(Error::shape(
                "from_external",
                format!("{} elements do not fill shape {shape:?} ({n})", data.len()),
            ));
        }
        let ext = ExternalHost {
            ptr: std::ptr::NonNull::from(data).cast::<u8>(),
            len: data.len(),
            dtype: T::DTYPE,
            _owner: owner,
        };
        Ok(Tensor::from_storage(
            Storage::Cpu(CpuStorage::External(ext)),
            shape.to_vec(),
            T::DTYPE,
        ))
    }

    /// A tensor holding `data` with `shape` on `device`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    /// Like [`Tensor::from_slice`], taking ownership (no copy on the CPU).
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::from_cpu_storage(CpuStorage::wrap(data), shape)?.to_device(device)
    }

    /// A tensor of `dtype` decoded from little-endian `bytes` (as in safetensors).
    pub fn from_bytes(bytes: &[u8], dtype: DType, shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::from_cpu_storage(CpuStorage::from_bytes(dtype, bytes)?, shape)?.to_device(device)
    }

    /// All zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        device.check()?;
        let n = numel_of(shape)?;
        match device {
            Device::Cpu => Tensor::from_cpu_storage(CpuStorage::zeros(dtype, n), shape),
            Device::Cuda(o) => cuda::zeros(o, shape, dtype),
        }
    }

    /// Every element equal to `value` (a float dtype).
    pub fn full(shape: &[usize], value: f32, dtype: DType, device: Device) -> Result<Tensor> {
        dtype.expect_float("full")?;
        let n = numel_of(shape)?;
        Tensor::from_vec(vec![value; n], shape, Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// Standard normal entries times `std`, from a seeded generator (reproducible across devices).
    pub fn randn(shape: &[usize], std: f32, seed: u64, dtype: DType, device: Device) -> Result<Tensor> {
        dtype.expect_float("randn")?;
        let n = numel_of(shape)?;
        let v: Vec<f32> = Rng::new(seed)
            .normal_vec(n)
            .into_iter()
            .map(|x| x * std)
            .collect();
        Tensor::from_vec(v, shape, Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// Uniform entries in `[lo, hi)` from a seeded generator.
    pub fn rand(
        shape: &[usize],
        lo: f32,
        hi: f32,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        dtype.expect_float("rand")?;
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(Error::invalid(format!("rand: bad range [{lo}, {hi})")));
        }
        let n = numel_of(shape)?;
        let v = Rng::new(seed).uniform_vec(n, lo, hi);
        Tensor::from_vec(v, shape, Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    // ---------------------------------------------------------------- metadata

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Alias of [`Tensor::shape`].
    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes held by the elements.
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the tensor lives.
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => Device::Cuda(c.backend.ordinal),
        }
    }

    /// `(rows, cols)` of a tensor viewed as 2-D with the last dimension as columns.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape.as_slice() {
            [] => Err(Error::shape(op, "expected at least 1 dimension, got a scalar")),
            [lead @ .., c] => Ok((lead.iter().product(), *c)),
        }
    }

    /// The rows of a tensor viewed as 2-D whose last dimension must be `cols`; the error names the
    /// tensor as `what`.
    pub(crate) fn rows_with_cols(&self, cols: usize, what: &str, op: &'static str) -> Result<usize> {
        let (rows, c) = self.dims2(op)?;
        if c != cols {
            return Err(Error::shape(
                op,
                format!("{what} must be [.., {cols}], got {:?}", self.shape),
            ));
        }
        Ok(rows)
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n = numel_of(shape)?;
        if n != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "cannot reshape {:?} ({} elements) to {shape:?} ({n})",
                    self.shape,
                    self.numel()
                ),
            ));
        }
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }

    // ---------------------------------------------------------------- crate-internal access

    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The CPU elements as `T`.
    pub(crate) fn cpu_data<T: Element>(&self, op: &'static str) -> Result<&[T]> {
        match &*self.storage {
            Storage::Cpu(s) => s
                .typed::<T>()
                .ok_or_else(|| Error::dtype(op, T::DTYPE.as_str(), self.dtype)),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(Error::device(op, "expected a CPU tensor, got a CUDA tensor")),
        }
    }

    /// The host elements moved out as a `Vec<T>` (no copy) when this tensor is the only owner of its
    /// CPU storage and holds `T`; otherwise the tensor back unchanged (used to hand buffers to a host
    /// framework without copying them).
    #[cfg_attr(not(feature = "candle"), allow(dead_code))]
    pub(crate) fn into_cpu_vec<T: Element>(self) -> std::result::Result<Vec<T>, Tensor> {
        if self.dtype != T::DTYPE {
            return Err(self);
        }
        let Tensor {
            storage,
            shape,
            dtype,
        } = self;
        let back = |storage| Tensor {
            storage,
            shape,
            dtype,
        };
        match Arc::try_unwrap(storage) {
            Ok(Storage::Cpu(s)) => with_cpu_vec!(
                s,
                |v| bytemuck::allocation::try_cast_vec::<_, T>(v)
                    .map_err(|(_, v)| back(Arc::new(Storage::Cpu(CpuStorage::wrap(v))))),
                |e| Err(back(Arc::new(Storage::Cpu(CpuStorage::External(e)))))
            ),
            #[cfg(feature = "cuda")]
            Ok(s @ Storage::Cuda(_)) => Err(back(Arc::new(s))),
            Err(shared) => Err(back(shared)),
        }
    }

    /// Whether the elements are external host memory ([`Tensor::from_external`]).
    pub(crate) fn is_external(&self) -> bool {
        matches!(&*self.storage, Storage::Cpu(CpuStorage::External(_)))
    }

    /// Mutable CPU elements; copies the storage first if another tensor shares it or it is external.
    pub(crate) fn cpu_data_mut<T: Element>(&mut self, op: &'static str) -> Result<&mut [T]> {
        let dtype = self.dtype;
        if self.is_external() || Arc::get_mut(&mut self.storage).is_none() {
            let copy = match &*self.storage {
                Storage::Cpu(s) => Storage::Cpu(s.to_owned_storage()),
                #[cfg(feature = "cuda")]
                Storage::Cuda(_) => {
                    return Err(Error::device(op, "expected a CPU tensor, got a CUDA tensor"));
                }
            };
            self.storage = Arc::new(copy);
        }
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu(s)) => s
                .typed_mut::<T>()
                .ok_or_else(|| Error::dtype(op, T::DTYPE.as_str(), dtype)),
            #[cfg(feature = "cuda")]
            Some(Storage::Cuda(_)) => Err(Error::device(op, "expected a CPU tensor, got a CUDA tensor")),
            None => Err(Error::device(op, "tensor storage is shared")),
        }
    }

    /// Mutable storage of any device; copies it first if shared or external.
    pub(crate) fn storage_mut(&mut self) -> Result<&mut Storage> {
        if self.is_external() || Arc::get_mut(&mut self.storage).is_none() {
            let copy = match &*self.storage {
                Storage::Cpu(s) => Storage::Cpu(s.to_owned_storage()),
                #[cfg(feature = "cuda")]
                Storage::Cuda(c) => Storage::Cuda(c.try_clone()?),
            };
            self.storage = Arc::new(copy);
        }
        Arc::get_mut(&mut self.storage)
            .ok_or_else(|| Error::device("storage_mut", "tensor storage is shared"))
    }

    pub(crate) fn check_same_device(&self, other: &Tensor, op: &'static str) -> Result<Device> {
        let (a, b) = (self.device(), other.device());
        if a != b {
            return Err(Error::device(op, format!("operands on {a} and {b}")));
        }
        Ok(a)
    }

    pub(crate) fn check_same_dtype(&self, other: &Tensor, op: &'static str) -> Result<DType> {
        if self.dtype != other.dtype {
            return Err(Error::dtype(op, self.dtype.as_str(), other.dtype));
        }
        Ok(self.dtype)
    }

    pub(crate) fn check_same_shape(&self, other: &Tensor, op: &'static str) -> Result<()> {
        if self.shape != other.shape {
            return Err(Error::shape(op, format!("{:?} vs {:?}", self.shape, other.shape)));
        }
        Ok(())
    }

    pub(crate) fn expect_dtype(&self, dtype: DType, op: &'static str) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::dtype(op, dtype.as_str(), self.dtype));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- transfers

    /// Copies the tensor to `device` (a cheap clone when already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        device.check()?;
        if self.device() == device {
            return Ok(self.clone());
        }
        match (&*self.storage, device) {
            #[cfg(feature = "cuda")]
            (Storage::Cpu(s), Device::Cuda(o)) => cuda::upload(o, s, &self.shape),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(c), Device::Cpu) => {
                let s = c.download(self.dtype)?;
                Tensor::from_cpu_storage(s, &self.shape)
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(c), Device::Cuda(o)) => {
                let s = c.download(self.dtype)?;
                cuda::upload(o, &s, &self.shape)
            }
            _ => Err(Error::device(
                "to_device",
                format!("cannot move {} to {device}", self.device()),
            )),
        }
    }

    /// The elements as a `Vec<T>`; `T` must match the dtype exactly.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if self.dtype != T::DTYPE {
            return Err(Error::dtype("to_vec", T::DTYPE.as_str(), self.dtype));
        }
        let host = self.to_device(Device::Cpu)?;
        Ok(host.cpu_data::<T>("to_vec")?.to_vec())
    }

    /// The elements of a float tensor converted to f32.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.dtype.expect_float("to_vec_f32")?;
        self.to_dtype(DType::F32)?.to_vec::<f32>()
    }

    /// The elements as little-endian bytes (the safetensors layout).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let host = self.to_device(Device::Cpu)?;
        match &*host.storage {
            Storage::Cpu(s) => Ok(s.as_bytes().to_vec()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(Error::device("to_bytes", "download failed")),
        }
    }

    /// The single element of a 1-element float tensor, as f32.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("expected 1 element, got shape {:?}", self.shape),
            ));
        }
        Ok(self.to_vec_f32()?[0])
    }

    // ---------------------------------------------------------------- ops

    /// Converts between float dtypes (f32 <-> f16 <-> bf16, round to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        self.dtype.expect_float("to_dtype")?;
        dtype.expect_float("to_dtype")?;
        match &*self.storage {
            Storage::Cpu(s) => Tensor::from_cpu_storage(cpu::cast(s, dtype), &self.shape),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => cuda::cast(c, self.dtype, dtype, &self.shape),
        }
    }

    fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let name = op.name();
        self.check_same_device(rhs, name)?;
        self.check_same_dtype(rhs, name)?;
        self.check_same_shape(rhs, name)?;
        self.dtype.expect_float(name)?;
        match (&*self.storage, &*rhs.storage) {
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                Tensor::from_cpu_storage(cpu::binary(a, b, op), &self.shape)
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => cuda::binary(a, b, op, self.dtype, &self.shape),
            #[cfg(feature = "cuda")]
            _ => Err(Error::device(name, "mixed devices")),
        }
    }

    /// Elementwise `self + rhs` (same shape, dtype and device).
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }

    /// Elementwise `self - rhs`.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }

    /// Elementwise `self * rhs`.
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }

    /// `self * alpha`, computed in f32 and rounded once to the dtype.
    pub fn scale(&self, alpha: f32) -> Result<Tensor> {
        self.affine(alpha, 0.0)
    }

    /// `self * alpha + beta`, computed in f32 and rounded once to the dtype.
    pub fn affine(&self, alpha: f32, beta: f32) -> Result<Tensor> {
        self.dtype.expect_float("affine")?;
        match &*self.storage {
            Storage::Cpu(s) => Tensor::from_cpu_storage(cpu::affine(s, alpha, beta), &self.shape),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => cuda::affine(c, alpha, beta, self.dtype, &self.shape),
        }
    }

    /// In place: `self += alpha * rhs` (the BLAS axpy). Accumulates in f32.
    pub fn add_scaled_(&mut self, rhs: &Tensor, alpha: f32) -> Result<()> {
        self.check_same_device(rhs, "add_scaled_")?;
        self.check_same_dtype(rhs, "add_scaled_")?;
        self.check_same_shape(rhs, "add_scaled_")?;
        self.dtype.expect_float("add_scaled_")?;
        #[cfg(feature = "cuda")]
        let dtype = self.dtype;
        let rhs_storage = rhs.storage.clone();
        match (self.storage_mut()?, &*rhs_storage) {
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                cpu::axpy(a, b, alpha);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => cuda::axpy(a, b, alpha, dtype, rhs.numel()),
            #[cfg(feature = "cuda")]
            _ => Err(Error::device("add_scaled_", "mixed devices")),
        }
    }

    /// Sums over the last dimension: shape `[.., n]` gives f32 `[..]` (f64 accumulation on the CPU).
    pub fn row_sums(&self) -> Result<Tensor> {
        self.row_reduce(RowReduce::Sum)
    }

    /// Sums of squares over the last dimension, f32 `[..]`.
    pub fn row_sq_norms(&self) -> Result<Tensor> {
        self.row_reduce(RowReduce::SumSquares)
    }

    /// Euclidean norms over the last dimension, f32 `[..]`.
    pub fn row_norms(&self) -> Result<Tensor> {
        self.row_reduce(RowReduce::Norm)
    }

    fn row_reduce(&self, op: RowReduce) -> Result<Tensor> {
        self.dtype.expect_float("row_reduce")?;
        let (rows, cols) = self.dims2("row_reduce")?;
        let out_shape = self.shape[..self.shape.len() - 1].to_vec();
        match &*self.storage {
            Storage::Cpu(s) => {
                Tensor::from_cpu_storage(CpuStorage::F32(cpu::row_reduce(s, rows, cols, op)), &out_shape)
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => cuda::row_reduce(c, self.dtype, rows, cols, op, &out_shape),
        }
    }

    /// Inverted dropout with a reproducible mask: element `i` is kept when
    /// `dropout_hash(seed, i) >= p * 2^32` and then scaled by `1 / (1 - p)`. The mask is a pure
    /// function of `(seed, i)`, identical on every device, so a backward pass regenerates it from the
    /// seed instead of storing it. `p` must be in `[0, 1)`; `p = 0` returns the input unchanged.
    pub fn dropout(&self, p: f32, seed: u64) -> Result<Tensor> {
        self.dtype.expect_float("dropout")?;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(format!(
                "dropout probability {p} is not in [0, 1)"
            )));
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        let threshold = dropout_threshold(p);
        let scale = 1.0 / (1.0 - p);
        match &*self.storage {
            Storage::Cpu(s) => Tensor::from_cpu_storage(cpu::dropout(s, threshold, scale, seed), &self.shape),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => cuda::dropout(c, self.dtype, threshold, scale, seed, &self.shape),
        }
    }

    /// 2-D transpose (`[m, n]` to `[n, m]`), materialized.
    pub fn t(&self) -> Result<Tensor> {
        let (m, n) = match self.shape.as_slice() {
            [m, n] => (*m, *n),
            s => return Err(Error::shape("t", format!("expected a 2-D tensor, got {s:?}"))),
        };
        match &*self.storage {
            Storage::Cpu(s) => Tensor::from_cpu_storage(cpu::transpose(s, m, n), &[n, m]),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => cuda::transpose(c, self.dtype, m, n),
        }
    }

    /// Matrix product `self · rhs`. `self` is `[.., k]` (leading dims are flattened into rows), `rhs` is
    /// `[k, n]`; the result is `[.., n]`. Same float dtype on both sides; accumulation is in f32.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.matmul_t(rhs, false, false)
    }

    /// Matrix product with transpose flags: `op(self) · op(rhs)`, where `op` transposes a 2-D operand
    /// when its flag is set (the data is never copied). With `trans_a`, `self` must be 2-D.
    pub fn matmul_t(&self, rhs: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        let op = "matmul";
        self.check_same_device(rhs, op)?;
        self.check_same_dtype(rhs, op)?;
        self.dtype.expect_float(op)?;
        if rhs.rank() != 2 {
            return Err(Error::shape(op, format!("rhs must be 2-D, got {:?}", rhs.shape)));
        }
        if self.rank() == 0 || (trans_a && self.rank() != 2) {
            return Err(Error::shape(
                op,
                format!(
                    "lhs must be 2-D (or [.., k] without trans_a), got {:?}",
                    self.shape
                ),
            ));
        }
        let (r, c) = self.dims2(op)?;
        let (m, k) = if trans_a { (c, r) } else { (r, c) };
        let (k2, n) = if trans_b {
            (rhs.shape[1], rhs.shape[0])
        } else {
            (rhs.shape[0], rhs.shape[1])
        };
        if k != k2 {
            return Err(Error::shape(
                op,
                format!(
                    "inner dimensions differ: op(lhs) is [{m}, {k}] and op(rhs) is [{k2}, {n}] (lhs {:?}, rhs {:?}, trans {trans_a}/{trans_b})",
                    self.shape, rhs.shape
                ),
            ));
        }
        let mut out_shape = if trans_a {
            vec![m]
        } else {
            self.shape[..self.rank() - 1].to_vec()
        };
        out_shape.push(n);
        let dims = MatmulDims {
            m,
            n,
            k,
            trans_a,
            trans_b,
        };
        match (&*self.storage, &*rhs.storage) {
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                Tensor::from_cpu_storage(cpu::matmul(a, b, dims)?, &out_shape)
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => cuda::matmul(a, b, self.dtype, dims, &out_shape),
            #[cfg(feature = "cuda")]
            _ => Err(Error::device(op, "mixed devices")),
        }
    }
}

/// Sizes of `C[m, n] = op(A)[m, k] · op(B)[k, n]` over row-major storage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatmulDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinaryOp {
    Add,
    Sub,
    Mul,
}

impl BinaryOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
        }
    }
}

/// `p * 2^32` rounded, as a u64 so that p close to 1 cannot wrap.
pub(crate) fn dropout_threshold(p: f32) -> u64 {
    ((p as f64) * 4_294_967_296.0).round() as u64
}

/// The dropout mask hash: a SplitMix64 finalizer of `seed + (i + 1) * golden`, top 32 bits.
/// `kernels/tensor.cu` implements the same function bit for bit.
#[inline]
pub fn dropout_hash(seed: u64, i: u64) -> u32 {
    let mut z = seed.wrapping_add((i.wrapping_add(1)).wrapping_mul(HASH_GOLDEN));
    z = (z ^ (z >> 30)).wrapping_mul(HASH_M1);
    z = (z ^ (z >> 27)).wrapping_mul(HASH_M2);
    ((z ^ (z >> 31)) >> 32) as u32
}

/// [`dropout_hash`]'s counter step (the golden ratio in 64 bits) and its two finalizer multipliers
/// (SplitMix64's), shared with the SIMD loops of `dropout.rs`.
pub(crate) const HASH_GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
pub(crate) const HASH_M1: u64 = 0xBF58_476D_1CE4_E5B9;
pub(crate) const HASH_M2: u64 = 0x94D0_49BB_1331_11EB;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowReduce {
    Sum,
    SumSquares,
    Norm,
}

#[cfg(test)]
mod external_tests {
    use super::*;

    /// External storage: reads and kernels work in place, nothing takes or mutates the borrowed buffer
    /// (`into_cpu_vec` refuses it, `cpu_data_mut` copies it first and books the copy), the owner lives
    /// as long as the storage.
    #[test]
    fn external_storage_is_read_in_place_and_copied_before_mutation() -> Result<()> {
        let owner = Arc::new(vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let data: &[f32] = owner.as_slice();
        // SAFETY: `owner` (an immutable Vec behind an Arc, kept alive by the tensor too) is never
        // written, and the tensors stay in this test.
        let t = unsafe { Tensor::from_external(data, &[2, 3], owner.clone())? };
        assert!(t.is_external());
        assert_eq!(Arc::strong_count(&owner), 2);
        assert_eq!(
            t.cpu_data::<f32>("test")?.as_ptr(),
            data.as_ptr(),
            "read in place"
        );
        assert_eq!(t.to_vec::<f32>()?, *owner);
        let m = t.matmul(&t.reshape(&[3, 2])?)?;
        assert_eq!(m.to_vec::<f32>()?, vec![22.0, 28.0, 49.0, 64.0]);
        assert_eq!(t.add(&t)?.to_vec::<f32>()?[5], 12.0);
        let t = t
            .into_cpu_vec::<f32>()
            .expect_err("an external buffer is not ours to take");
        let before = external_copies();
        let mut u = t.clone();
        u.cpu_data_mut::<f32>("test")?[0] = 10.0;
        let after = external_copies();
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, 24),
            "one booked copy"
        );
        assert!(!u.is_external());
        assert_eq!(t.to_vec::<f32>()?[0], 1.0, "the borrowed buffer is untouched");
        assert_eq!(u.to_vec::<f32>()?[0], 10.0);
        drop((t, u));
        assert_eq!(
            Arc::strong_count(&owner),
            1,
            "the owner goes with the last tensor"
        );
        Ok(())
    }
}
