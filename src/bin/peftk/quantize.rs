//! `peftk quantize IN OUT`: bitsandbytes NF4/FP4 quantization of a safetensors checkpoint.

use indicatif::{ProgressBar, ProgressStyle};
use peft_kernels::io::{SafetensorsFile, TensorBytes, from_st_dtype, write_safetensors};
use peft_kernels::quant::{QuantType, QuantizeOptions, QuantizedTensor, io as qio};
use peft_kernels::{Device, Error, Result};
use std::collections::HashSet;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input safetensors file.
    pub input: PathBuf,
    /// Output safetensors file (written atomically: a temp file, then a rename).
    pub output: PathBuf,
    /// Code book: nf4 or fp4.
    #[arg(long, default_value = "nf4")]
    pub quant_type: QuantType,
    /// Elements per absmax block: 32, 64, 128, ..., 4096.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Double-quantize the absmax (the default).
    #[arg(long, overrides_with = "no_double_quant")]
    pub double_quant: bool,
    /// Keep the absmax in f32.
    #[arg(long, overrides_with = "double_quant")]
    pub no_double_quant: bool,
    /// Quantize the 2-D float tensors whose name matches this regex, instead of those named
    /// `*.weight` / `weight`.
    #[arg(long, value_name = "REGEX")]
    pub only: Option<String>,
    /// Where to quantize: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Quantize NaN/inf like bitsandbytes' CUDA kernels instead of failing.
    #[arg(long)]
    pub allow_non_finite: bool,
}

/// True if `name` (2-D, float `dtype`) is one of the tensors to quantize.
pub fn selected(name: &str, shape: &[usize], is_float: bool, only: Option<&regex::Regex>) -> bool {
    let by_name = match only {
        Some(re) => re.is_match(name),
        None => name == "weight" || name.ends_with(".weight"),
    };
    by_name && is_float && shape.len() == 2
}

pub fn run(a: Args) -> Result<()> {
    let only = a
        .only
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .map_err(|e| Error::InvalidArgument(format!("--only: {e}")))?;
    let opts = QuantizeOptions {
        quant_type: a.quant_type,
        blocksize: a.blocksize,
        double_quant: !a.no_double_quant,
        allow_non_finite: a.allow_non_finite,
        name: String::new(),
    };
    opts.validate()?;
    a.device.check()?;
    let file = SafetensorsFile::open(&a.input)?;

    // Tensors that already belong to a 4-bit weight pass through untouched.
    let mut already: HashSet<String> = HashSet::new();
    for q in qio::quantized_names(&file) {
        already.extend(qio::companion_names(&file, &q));
    }
    let mut todo = Vec::new();
    for name in file.names() {
        let (dt, shape, data) = file.raw(name)?;
        let is_float = from_st_dtype(dt).is_some_and(|d| d.is_float());
        if !already.contains(name) && selected(name, &shape, is_float, only.as_ref()) {
            todo.push((name.clone(), data.len() as u64));
        }
    }
    let total: u64 = todo.iter().map(|t| t.1).sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{spinner} quantizing [{bar:30}] {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let todo_set: HashSet<&str> = todo.iter().map(|t| t.0.as_str()).collect();

    let mut out: Vec<(String, TensorBytes<'_>)> = Vec::new();
    let (mut in_bytes, mut out_bytes, mut weights) = (0u64, 0u64, 0u64);
    for name in file.names() {
        if todo_set.contains(name.as_str()) {
            bar.set_message(name.clone());
            let t = file.load(name, a.device)?;
            let q = QuantizedTensor::quantize(
                &t,
                &QuantizeOptions {
                    name: name.clone(),
                    ..opts.clone()
                },
            )?;
            in_bytes += t.size_in_bytes() as u64;
            out_bytes += q.size_in_bytes() as u64;
            weights += q.numel() as u64;
            bar.inc(t.size_in_bytes() as u64);
            out.extend(qio::to_safetensors_entries(&q, name)?);
        } else {
            let (dt, shape, data) = file.raw(name)?;
            out.push((name.clone(), TensorBytes::borrowed(dt, shape, data)));
        }
    }
    bar.finish_and_clear();
    let mut seen = HashSet::new();
    if let Some((dup, _)) = out.iter().find(|(k, _)| !seen.insert(k.as_str())) {
        return Err(Error::InvalidArgument(format!(
            "output tensor name {dup:?} would be written twice (an input tensor already uses a quant-state name)"
        )));
    }
    write_safetensors(&a.output, &out, file.metadata().cloned())?;
    println!(
        "quantized {} tensors to {} (blocksize {}, double quant {}): {:.1} MB -> {:.1} MB ({:.3} bits/weight); \
         passed {} tensors through; wrote {}",
        todo.len(),
        opts.quant_type,
        opts.blocksize,
        if opts.double_quant { "on" } else { "off" },
        in_bytes as f64 / 1e6,
        out_bytes as f64 / 1e6,
        if weights > 0 {
            out_bytes as f64 * 8.0 / weights as f64
        } else {
            0.0
        },
        file.names().len() - todo.len(),
        a.output.display()
    );
    Ok(())
}
