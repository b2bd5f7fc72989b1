//! Devices: the CPU backend (always present, multithreaded with rayon) and CUDA GPUs (feature `cuda`).
//!
//! Probing for CUDA never panics: without the feature, or without a driver (`libcuda`), or with no GPU,
//! [`Device::cuda_if_available`] returns [`Device::Cpu`].

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
// Without the feature, `cuda` is a stub with the same functions, each saying CUDA is unavailable
// (candle's dummy_cuda_backend.rs pattern): dispatch code has no `cfg(not(feature = "cuda"))` arms.
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub(crate) mod cuda;

use crate::error::{Error, Result};

/// Where a tensor lives and where its operations run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory; kernels are the crate's Rust CPU implementations.
    Cpu,
    /// A CUDA GPU by ordinal; kernels are the crate's CUDA C kernels and cuBLAS.
    Cuda(usize),
}

impl Device {
    /// `Cuda(0)` when this build has the `cuda` feature, a driver is installed and a GPU is present;
    /// otherwise `Cpu`. Never panics.
    pub fn cuda_if_available() -> Device {
        if cuda_device_count() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// True for `Cuda(_)`.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// True for `Cpu`.
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// Checks that the device exists (for `Cuda(n)`: feature built in, driver present, ordinal in range).
    pub fn check(&self) -> Result<()> {
        match *self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => {
                let count = cuda_device_count();
                if ordinal < count {
                    Ok(())
                } else if cfg!(feature = "cuda") {
                    Err(Error::CudaUnavailable(format!(
                        "CUDA device {ordinal} requested but {count} device(s) found"
                    )))
                } else {
                    Err(Error::CudaUnavailable(
                        "this build of peft-kernels has no `cuda` feature".into(),
                    ))
                }
            }
        }
    }

    /// Waits for all work queued on the device (a no-op on the CPU). Use it before reading a wall clock.
    pub fn synchronize(&self) -> Result<()> {
        match *self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => cuda::synchronize(ordinal),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;
    /// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::invalid(format!("unknown device {s:?} (expected cpu, cuda or cuda:N)"))
                }),
        }
    }
}

/// Number of usable CUDA devices: 0 without the `cuda` feature, without libcuda, or without a GPU.
pub fn cuda_device_count() -> usize {
    cuda::device_count()
}

/// The error of every CUDA entry point in a build without the `cuda` feature (the `cuda_stub.rs`
/// modules return it).
#[cfg_attr(feature = "cuda", allow(dead_code))]
pub(crate) fn cuda_unavailable() -> Error {
    Error::CudaUnavailable("this build of peft-kernels has no `cuda` feature".into())
}

/// `$dev`-dispatch of an op family: `on_device!(dev, f(args))` calls the caller's `cpu::f(args)` or
/// `cuda::f(args)`. Every family's `cuda` module exists in every build (its `cuda_stub.rs` without
/// the `cuda` feature), so the dispatch needs no `cfg`.
macro_rules! on_device {
    ($dev:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dev {
            $crate::device::Device::Cpu => cpu::$f($($arg),*),
            $crate::device::Device::Cuda(_) => cuda::$f($($arg),*),
        }
    };
}
pub(crate) use on_device;
