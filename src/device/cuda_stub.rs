//! The CUDA backend of a build without the `cuda` feature: no devices, and every entry point says so.

use crate::error::Result;

/// No CUDA devices without the feature.
pub(crate) fn device_count() -> usize {
    0
}

pub(crate) fn synchronize(_ordinal: usize) -> Result<()> {
    Err(super::cuda_unavailable())
}
