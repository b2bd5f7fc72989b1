//! # peft-kernels
//!
//! Hand-written CUDA C kernels and multithreaded CPU kernels for parameter-efficient fine-tuning of
//! quantized models: QLoRA (bitsandbytes-exact NF4/FP4 with double quantization), LoRA, DoRA, WaveFT
//! and VB-LoRA, with a minimal autograd tape, optimizers and PEFT-compatible adapter files.
//!
//! Every kernel has a Rust CPU implementation that is both the test oracle and a real backend.
//! The `cuda` feature adds the GPU kernels (`kernels/*.cu`, compiled by `build.rs` with nvcc).
//!
//! ```
//! use peft_kernels::{DType, Device, Tensor};
//! let dev = Device::cuda_if_available();
//! let a = Tensor::randn(&[4, 8], 1.0, 0, DType::F32, dev)?;
//! let b = Tensor::randn(&[8, 3], 1.0, 1, DType::F32, dev)?;
//! let c = a.matmul(&b)?;
//! assert_eq!(c.shape(), &[4, 3]);
//! # Ok::<(), peft_kernels::Error>(())
//! ```

pub mod adapters;
pub mod attention;
pub mod autograd;
#[cfg(feature = "candle")]
pub mod candle;
pub mod data;
pub mod device;
pub mod error;
pub mod io;
pub mod kbit;
pub mod models;
pub mod nn;
pub mod optim;
pub mod peft_model;
pub mod qmatmul;
pub mod qr_adaptor;
pub mod quant;
pub mod rng;
pub mod tensor;

pub use device::{Device, cuda_device_count};
pub use error::{Error, Result};
pub use tensor::{DType, Element, Tensor};
