//! `peftk merge` and `peftk inspect-adapter`.

use clap::Args;
use peft_kernels::io::peft::{PeftAdapter, inspect_adapter};
use peft_kernels::merge::{MergeOptions, MergeRegistry, merge_into_file};
use peft_kernels::{DType, Device, Error, Result};
use std::path::PathBuf;

/// Merge a PEFT adapter into a base safetensors checkpoint.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base checkpoint (.safetensors; dense or bitsandbytes 4-bit layout).
    #[arg(long)]
    pub base: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output checkpoint (written atomically; nothing is written on error).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the merged weights: f32, f16 or bf16 (default: the base weight's dtype). Other tensors
    /// are copied unchanged.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Re-quantize merged weights of a 4-bit base with the same quant-state settings.
    #[arg(long)]
    pub requantize: bool,
    /// Device for the merge math: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: &MergeArgs) -> Result<()> {
    let device: Device = args.device.parse()?;
    let dtype = match args.dtype.as_deref() {
        None => None,
        Some(s) => {
            let d: DType = s.parse()?;
            if !d.is_float() {
                return Err(Error::InvalidArgument(format!(
                    "--dtype must be f32, f16 or bf16, got {s:?}"
                )));
            }
            Some(d)
        }
    };
    let adapter = PeftAdapter::load(&args.adapter, device)?;
    let opts = MergeOptions {
        dtype,
        requantize: args.requantize,
        device,
    };
    let report = merge_into_file(&args.base, &adapter, &args.out, &opts, &MergeRegistry::new())?;
    println!(
        "merged {} module(s), replaced {} tensor(s), copied {}, dropped {}; wrote {} ({} bytes)",
        report.merged.len(),
        report.replaced.len(),
        report.copied,
        report.dropped.len(),
        args.out.display(),
        report.bytes_written
    );
    Ok(())
}

/// Summarize a PEFT adapter directory.
#[derive(Args, Debug)]
pub struct InspectAdapterArgs {
    /// PEFT adapter directory.
    pub dir: PathBuf,
}

pub fn run_inspect_adapter(args: &InspectAdapterArgs) -> Result<()> {
    print!("{}", inspect_adapter(&args.dir)?);
    Ok(())
}
