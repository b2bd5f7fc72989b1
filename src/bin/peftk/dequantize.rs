//! `peftk dequantize IN OUT`: every bitsandbytes 4-bit weight back to a float tensor.

use indicatif::ProgressBar;
use peft_kernels::io::{SafetensorsFile, TensorBytes, write_safetensors};
use peft_kernels::quant::io as qio;
use peft_kernels::{DType, Device, Result};
use std::collections::HashSet;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input safetensors file with bitsandbytes 4-bit weights.
    pub input: PathBuf,
    /// Output safetensors file (written atomically).
    pub output: PathBuf,
    /// Output dtype: f32, f16 or bf16 (default: the dtype recorded in each quant state).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Where to dequantize: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(d) = a.dtype
        && !d.is_float()
    {
        return Err(peft_kernels::Error::InvalidArgument(format!(
            "--dtype {d}: expected f32, f16 or bf16"
        )));
    }
    a.device.check()?;
    let file = SafetensorsFile::open(&a.input)?;
    let names = qio::quantized_names(&file);
    let mut companions: HashSet<String> = HashSet::new();
    for q in &names {
        companions.extend(qio::companion_names(&file, q));
    }
    let bar = ProgressBar::new(names.len() as u64);
    let mut out: Vec<(String, TensorBytes<'_>)> = Vec::new();
    for name in file.names() {
        if names.contains(name) {
            let q = qio::load_quantized(&file, name, a.device)?;
            let t = q.dequantize(a.dtype.unwrap_or(q.dtype()))?;
            out.push((name.clone(), TensorBytes::from_tensor(&t)?));
            bar.inc(1);
        } else if !companions.contains(name) {
            let (dt, shape, data) = file.raw(name)?;
            out.push((name.clone(), TensorBytes::borrowed(dt, shape, data)));
        }
    }
    bar.finish_and_clear();
    write_safetensors(&a.output, &out, file.metadata().cloned())?;
    println!(
        "dequantized {} tensors, passed {} through; wrote {}",
        names.len(),
        out.len() - names.len(),
        a.output.display()
    );
    Ok(())
}
