//! The tensor API in a few lines, on the CPU and, when one is present, on a CUDA GPU.
//!
//!     cargo run --release --example quickstart            # CPU (and CUDA if built with --features cuda)

use peft_kernels::{DType, Device, Result, Tensor};

fn demo(dev: Device) -> Result<()> {
    // A bf16 activation batch and an f32 weight, seeded so every run (and device) sees the same numbers.
    let x = Tensor::randn(&[4, 64], 1.0, 1, DType::BF16, dev)?;
    let w = Tensor::randn(&[32, 64], 0.1, 2, DType::F32, dev)?;
    // y = x · Wᵀ in bf16 with f32 accumulation (the transpose is a flag, not a copy).
    let y = x.matmul_t(&w.to_dtype(DType::BF16)?, false, true)?;
    let norms = y.row_norms()?.to_vec::<f32>()?;
    let z = y.scale(0.5)?.add(&y)?; // 1.5 * y
    println!(
        "[{dev}] y {:?} {}  row norms {:?}  (1.5y)[0,0] = {:.4}",
        y.shape(),
        y.dtype(),
        norms
            .iter()
            .map(|v| (v * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        z.to_vec_f32()?[0]
    );
    Ok(())
}

fn main() -> Result<()> {
    demo(Device::Cpu)?;
    match Device::cuda_if_available() {
        Device::Cpu => println!("[cuda] no CUDA device (or built without --features cuda): skipped"),
        dev => demo(dev)?,
    }
    Ok(())
}
