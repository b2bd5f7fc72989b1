//! The CUDA backend: one context, stream, cuBLAS handle and module cache per device ordinal, and the
//! typed kernel launchers.
//!
//! Layering follows cudarc: its `sys` (raw FFI) and `result` (checked calls) layers stay inside cudarc;
//! this module owns the safe per-device state. The `cuda.rs` file of each op family launches its
//! kernels only through [`kernels`]: launchers that build.rs generates from the `extern "C" __global__`
//! signatures in `kernels/*.cu` (see build/kernel_sigs.rs), one per kernel family, so an argument in
//! the wrong order or of the wrong type is a compile error instead of undefined behaviour on the GPU.

use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The generated typed launchers: `kernels::<file>::<family>(backend, cfg, [variant flags,] args…)`,
/// the kernel-module id [`kernels::Module`] and the parameter-group structs (`kernels::Q4Params`).
pub(crate) mod kernels {
    use super::{CudaBackend, KernelElem, NULL_PTR, no_kernel};
    use crate::error::Result;
    use cudarc::driver::{CudaView, CudaViewMut, LaunchArgs, LaunchConfig, PushKernelArg};

    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

use kernels::Module;

/// An element type a kernel family is instantiated for; `NAME` is its token in kernel names
/// (`ce_fwd_bf16`).
pub(crate) trait KernelElem: DeviceRepr {
    const NAME: &'static str;
}

impl KernelElem for f32 {
    const NAME: &'static str = "f32";
}
impl KernelElem for half::f16 {
    const NAME: &'static str = "f16";
}
impl KernelElem for half::bf16 {
    const NAME: &'static str = "bf16";
}

/// The null device pointer pushed for an absent `NULLABLE` operand (the kernels test for it).
static NULL_PTR: u64 = 0;

/// The error of a generated launcher asked for an instantiation its .cu file does not have.
fn no_kernel(family: &str, types: &[&str], flags: &[u32]) -> Error {
    Error::device(
        "cuda",
        format!("no kernel {family} for element types {types:?} and variant flags {flags:?}"),
    )
}

/// Per-device state. Shared by every tensor on that device through an `Arc`.
pub(crate) struct CudaBackend {
    pub(crate) ordinal: usize,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(Module, &'static str), CudaFunction>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(cuda:{})", self.ordinal)
    }
}

/// Number of CUDA devices, 0 when libcuda is absent or the driver fails to initialize.
pub(crate) fn device_count() -> usize {
    #[cfg(not(feature = "candle-cuda"))]
    // SAFETY: is_culib_present only tries to dlopen libcuda; it has no preconditions.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    // candle's `cuda` feature links libcuda at build time (cudarc `dynamic-linking`).
    #[cfg(feature = "candle-cuda")]
    let present = true;
    if !present {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

static BACKENDS: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();

/// The backend for `ordinal`, created on first use.
pub(crate) fn backend(ordinal: usize) -> Result<Arc<CudaBackend>> {
    let map = BACKENDS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map
        .lock()
        .map_err(|_| Error::device("cuda", "backend registry poisoned"))?;
    if let Some(b) = map.get(&ordinal) {
        return Ok(b.clone());
    }
    let count = device_count();
    if ordinal >= count {
        return Err(Error::CudaUnavailable(format!(
            "CUDA device {ordinal} requested but {count} device(s) found"
        )));
    }
    let ctx = CudaContext::new(ordinal)?;
    let stream = ctx.default_stream();
    let b = Arc::new(CudaBackend {
        ordinal,
        ctx,
        stream,
        blas: OnceLock::new(),
        modules: Mutex::new(HashMap::new()),
        functions: Mutex::new(HashMap::new()),
    });
    map.insert(ordinal, b.clone());
    Ok(b)
}

impl CudaBackend {
    /// The kernel `name` from the fatbin built from `kernels/<module>.cu`, loaded once and cached.
    /// Only the generated launchers call it, with names taken from the kernel signatures.
    pub(crate) fn func(&self, module: Module, name: &'static str) -> Result<CudaFunction> {
        let mut fns = self
            .functions
            .lock()
            .map_err(|_| Error::device("cuda", "function cache poisoned"))?;
        if let Some(f) = fns.get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m.load_function(name)?;
        fns.insert((module, name), f.clone());
        Ok(f)
    }

    fn module(&self, module: Module) -> Result<Arc<CudaModule>> {
        let mut mods = self
            .modules
            .lock()
            .map_err(|_| Error::device("cuda", "module cache poisoned"))?;
        if let Some(m) = mods.get(&module) {
            return Ok(m.clone());
        }
        // The driver parses the fatbin in place; an owned copy keeps it alive and 8-byte aligned.
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(module.image().to_vec()))
            .map_err(|e| Error::device("cuda", format!("loading kernels/{}.cu: {e}", module.name())))?;
        mods.insert(module, m.clone());
        Ok(m)
    }

    /// The cuBLAS handle bound to this device's stream.
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                #[cfg(not(feature = "candle-cuda"))]
                // SAFETY: only dlopens libcublas to see whether it exists.
                let present = unsafe { cudarc::cublas::sys::is_culib_present() };
                // With candle's `cuda` feature libcublas is linked at build time.
                #[cfg(feature = "candle-cuda")]
                let present = true;
                if !present {
                    return Err("libcublas was not found (install the CUDA runtime libraries)".into());
                }
                CudaBlas::new(self.stream.clone()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::CudaUnavailable(e.clone()))
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// Multiprocessor count, for sizing persistent or split-K grids.
    #[allow(dead_code)] // for split-K / persistent grids
    pub(crate) fn sm_count(&self) -> Result<u32> {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
        Ok(self.ctx.attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32)
    }
}

/// Managed ("unified") memory on one device, for paged optimizer state: allocated with
/// `cuMemAllocManaged` (cudarc's `alloc_unified`, attached globally), zero-filled, and advised to prefer
/// host memory, so that the driver evicts it to the host under device-memory pressure instead of
/// failing an allocation; [`Unified::prefetch_to_device`] moves it back before a kernel uses it (as
/// bitsandbytes' paged optimizers do, `bitsandbytes/functional.py` `prefetch_tensor`).
pub(crate) struct Unified {
    data: cudarc::driver::UnifiedSlice<u8>,
    backend: Arc<CudaBackend>,
}

impl std::fmt::Debug for Unified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Unified({} bytes, cuda:{})",
            self.data.len(),
            self.backend.ordinal
        )
    }
}

/// A `CUmemLocation` of `kind` and `id`. The struct is `{ CUmemLocationType type; int id; }` in every
/// CUDA version, though cudarc's bindings spell the id as a field or (CUDA 13.2+) a one-member union
/// depending on the toolkit found at build time; writing it through its offset works for both.
fn mem_location(kind: cudarc::driver::sys::CUmemLocationType, id: i32) -> cudarc::driver::sys::CUmemLocation {
    use cudarc::driver::sys::CUmemLocation;
    const _: () = assert!(std::mem::size_of::<CUmemLocation>() == 8);
    // SAFETY: CUmemLocation is a plain C struct of an enum and an int (or a union holding an int), for
    // which all-zero bytes are valid (type 0 = CU_MEM_LOCATION_TYPE_INVALID, id 0).
    let mut loc: CUmemLocation = unsafe { std::mem::zeroed() };
    loc.type_ = kind;
    // SAFETY: the struct is 8 bytes (asserted above) and 4-byte aligned; the id is the int at byte
    // offset 4, in bounds and aligned.
    unsafe { (&mut loc as *mut CUmemLocation).cast::<i32>().add(1).write(id) };
    loc
}

impl Unified {
    /// Whether device `b` can page managed memory concurrently with kernels
    /// (`CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS`, 0 on Windows and pre-Pascal GPUs); without it
    /// paged state falls back to a plain device allocation.
    pub(crate) fn supported(b: &CudaBackend) -> Result<bool> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        Ok(b.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY)? != 0
            && b.ctx
                .attribute(A::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)?
                != 0)
    }

    /// `bytes` zero bytes of managed memory on `b`'s device, preferring the host.
    pub(crate) fn zeros(b: &Arc<CudaBackend>, bytes: usize) -> Result<Unified> {
        use cudarc::driver::sys::{CUmem_advise, CUmemLocationType};
        // SAFETY: u8 is valid for any bit pattern; the bytes are zero-filled below before any use.
        let mut data = unsafe { b.ctx.alloc_unified::<u8>(bytes.max(1), true) }?;
        data.as_mut_slice()?.fill(0);
        let loc = mem_location(CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, 0);
        // SAFETY: the range is exactly the managed allocation just made (its pointer and byte length).
        unsafe {
            cudarc::driver::result::mem_advise(
                Self::raw(&data),
                data.len(),
                CUmem_advise::CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                loc,
            )
        }?;
        Ok(Unified {
            data,
            backend: b.clone(),
        })
    }

    fn raw(data: &cudarc::driver::UnifiedSlice<u8>) -> cudarc::driver::sys::CUdeviceptr {
        use cudarc::driver::{DevicePtr, DeviceSlice};
        let stream = data.stream().clone();
        let (ptr, _sync) = data.device_ptr(&stream);
        ptr
    }

    /// The device address, for a kernel launched on the backend's stream.
    pub(crate) fn device_address(&mut self) -> u64 {
        Self::raw(&self.data)
    }

    /// Queues a migration of the whole range to the device on the backend's stream
    /// (`cuMemPrefetchAsync` with a device `CUmemLocation`), so the next kernel does not page-fault.
    pub(crate) fn prefetch_to_device(&self) -> Result<()> {
        let loc = mem_location(
            cudarc::driver::sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            self.backend.ordinal as i32,
        );
        // SAFETY: the range is exactly the managed allocation; the stream is the backend's, the one
        // every kernel using this memory runs on.
        unsafe {
            cudarc::driver::result::mem_prefetch_async(
                Self::raw(&self.data),
                self.data.len(),
                loc,
                self.backend.stream.cu_stream(),
            )
        }?;
        Ok(())
    }

    /// The bytes, read on the host after the backend's stream has finished with them.
    pub(crate) fn to_vec(&self) -> Result<Vec<u8>> {
        self.backend.synchronize()?;
        Ok(self.data.as_slice()?.to_vec())
    }

    /// Overwrites the bytes from the host after the backend's stream has finished with them.
    pub(crate) fn copy_from(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.len() > self.data.len() {
            return Err(Error::invalid(
                "Unified::copy_from: source larger than the allocation",
            ));
        }
        self.backend.synchronize()?;
        self.data.as_mut_slice()?[..bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

/// Waits for the work queued on device `ordinal`.
pub(crate) fn synchronize(ordinal: usize) -> Result<()> {
    backend(ordinal)?.synchronize()
}

/// A 1-D launch over `n` items with `threads` per block.
pub(crate) fn grid_1d(n: usize, threads: u32) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(threads as usize).max(1);
    if blocks > i32::MAX as usize {
        return Err(Error::invalid(format!("{n} elements exceed one CUDA grid")));
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::kernels::{KERNELS, Module};

    /// The kernel names in a fatbin: its SASS ELF images have a `.text.<name>` section per kernel
    /// (C++-mangled `_Z…` names are device functions nvcc did not inline).
    fn compiled_kernels(image: &[u8]) -> Vec<String> {
        let pat = b".text.";
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(p) = image[i..].windows(pat.len()).position(|w| w == pat) {
            let start = i + p + pat.len();
            let end = image[start..]
                .iter()
                .position(|&c| c == 0)
                .map_or(image.len(), |e| start + e);
            let name = String::from_utf8_lossy(&image[start..end]).into_owned();
            if !name.starts_with("_Z") && !name.is_empty() && !out.contains(&name) {
                out.push(name);
            }
            i = start;
        }
        out
    }

    /// build.rs's preprocessor reproduces exactly the kernel names nvcc compiled, so every generated
    /// launcher asks for a kernel that exists, and every compiled kernel has a launcher. Runs without
    /// a GPU: it reads the embedded fatbins.
    #[test]
    fn generated_kernel_names_match_the_fatbins() {
        for m in Module::ALL {
            let mut compiled = compiled_kernels(m.image());
            compiled.sort();
            let mut read: Vec<String> = KERNELS
                .iter()
                .filter(|(km, _)| *km == m)
                .map(|(_, n)| n.to_string())
                .collect();
            read.sort();
            assert!(!read.is_empty(), "{}: no kernels read", m.name());
            assert_eq!(read, compiled, "kernels/{}.cu", m.name());
        }
    }
}
