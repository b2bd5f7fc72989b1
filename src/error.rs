//! The crate-wide error type. Every public function returns [`Result`]; bad input never panics.

use crate::tensor::DType;
use std::path::PathBuf;

/// Everything that can go wrong in peft-kernels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that do not fit the operation.
    #[error("shape error in {op}: {msg}")]
    Shape { op: &'static str, msg: String },

    /// A tensor of the wrong element type.
    #[error("dtype error in {op}: expected {expected}, got {got:?}")]
    DType {
        op: &'static str,
        expected: String,
        got: DType,
    },

    /// Tensors on different devices, or an operation that the device cannot run.
    #[error("device error in {op}: {msg}")]
    Device { op: &'static str, msg: String },

    /// CUDA was asked for but this build or machine has none.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),

    /// An error from the CUDA driver (launch failure, out of memory, ...).
    #[cfg(feature = "cuda")]
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),

    /// An error from cuBLAS.
    #[cfg(feature = "cuda")]
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),

    /// A non-finite input where finite values are required (quantization by default).
    #[error("non-finite value {value} in tensor '{tensor}' at flat index {index}")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f32,
    },

    /// A malformed or inconsistent file (safetensors, adapter config, quant state).
    #[error("format error in {context}: {msg}")]
    Format { context: String, msg: String },

    /// An I/O error, with the path involved.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An argument outside its valid range (blocksize, rank, learning rate, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }

    pub(crate) fn dtype(op: &'static str, expected: impl Into<String>, got: DType) -> Self {
        Error::DType {
            op,
            expected: expected.into(),
            got,
        }
    }

    pub(crate) fn device(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Device { op, msg: msg.into() }
    }

    pub(crate) fn format(context: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Format {
            context: context.into(),
            msg: msg.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An invalid argument (bad input that is not a shape, dtype, device or file-format error).
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
