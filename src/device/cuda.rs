//! The CUDA backend: one context, stream, cuBLAS handle and module cache per device ordinal.
//!
//! Layering follows cudarc: its `sys` (raw FFI) and `result` (checked calls) layers stay inside cudarc;
//! this module owns the safe per-device state, and the `cuda.rs` file of each op family launches its
//! kernels through [`CudaBackend::func`].

use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Per-device state. Shared by every tensor on that device through an `Arc`.
pub(crate) struct CudaBackend {
    pub(crate) ordinal: usize,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(cuda:{})", self.ordinal)
    }
}

/// Number of CUDA devices, 0 when libcuda is absent or the driver fails to initialize.
pub(crate) fn device_count() -> usize {
    // SAFETY: is_culib_present only tries to dlopen libcuda; it has no preconditions.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
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
    pub(crate) fn func(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
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

    fn module(&self, module: &'static str) -> Result<Arc<CudaModule>> {
        let mut mods = self
            .modules
            .lock()
            .map_err(|_| Error::device("cuda", "module cache poisoned"))?;
        if let Some(m) = mods.get(module) {
            return Ok(m.clone());
        }
        let image = generated::MODULES
            .iter()
            .find(|(n, _)| *n == module)
            .map(|(_, bytes)| *bytes)
            .ok_or_else(|| Error::device("cuda", format!("no kernel module named {module}")))?;
        // The driver parses the fatbin in place; an owned copy keeps it alive and 8-byte aligned.
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))?;
        mods.insert(module, m.clone());
        Ok(m)
    }

    /// The cuBLAS handle bound to this device's stream.
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only dlopens libcublas to see whether it exists.
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
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
