//! `peftk merge` and `peftk inspect-adapter`.

use crate::inspect::escape;
use clap::Args;
use peft_kernels::adapters::waveft::{WaveFtConfig, WaveFtLayer};
use peft_kernels::io::SafetensorsFile;
use peft_kernels::io::peft::{MethodConfig, PeftAdapter, VBLORA_BANK_KEY};
use peft_kernels::peft_model::inspect::inspect_adapter;
use peft_kernels::peft_model::load::linear_modules;
use peft_kernels::peft_model::merge::{MergeOptions, MergeRegistry, merge_into_file};
use peft_kernels::{DType, Device, Error, Result};
use std::collections::BTreeMap;
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
    /// Output checkpoint: written to a temp file, then renamed over OUT (nothing is written on error; a
    /// symlink is written through to its target; an existing file keeps its mode). Must be a regular file
    /// and neither the base nor a file of the adapter.
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the merged weights: f32, f16 or bf16 (default: the base weight's dtype). Other tensors
    /// are copied unchanged.
    #[arg(long, value_parser = crate::dequantize::parse_float_dtype)]
    pub dtype: Option<DType>,
    /// Re-quantize merged weights of a 4-bit base with the same quant-state settings.
    #[arg(long)]
    pub requantize: bool,
    /// Device for the merge math: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Allow OUT to be a file of the adapter (it is replaced only once the merge is complete). The base
    /// itself is never overwritten.
    #[arg(long)]
    pub force: bool,
}

/// Warns (PEFT accepts it, so it is not an error) about a LoRA scaling that flips or zeroes the update.
fn warn_alpha(adapter: &PeftAdapter) {
    if let MethodConfig::Lora(c) = &adapter.config.method
        && c.lora_alpha <= 0.0
    {
        eprintln!(
            "peftk: warning: lora_alpha = {} is not positive: the LoRA update is {} (PEFT accepts this)",
            c.lora_alpha,
            if c.lora_alpha == 0.0 { "zero" } else { "negated" }
        );
    }
}

pub fn run(args: &MergeArgs) -> Result<()> {
    let (device, dtype) = (args.device, args.dtype);
    device.check()?;
    if !args.adapter.is_dir() {
        peft_kernels::io::output::check_input(&args.adapter)?;
        return Err(Error::InvalidArgument(format!(
            "--adapter {}: is a file; give the adapter directory (holding adapter_config.json and \
             adapter_model.safetensors)",
            args.adapter.display()
        )));
    }
    peft_kernels::io::output::check_output(&args.out, &[&args.base, &args.adapter], args.force)?;
    let adapter = PeftAdapter::load(&args.adapter, device)?;
    warn_alpha(&adapter);
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
    /// Base checkpoint (.safetensors, dense or bitsandbytes 4-bit): adds per-layer shapes and, for WaveFT,
    /// the density and the nonzeros of ΔW.
    #[arg(long)]
    pub base: Option<PathBuf>,
}

pub fn run_inspect_adapter(args: &InspectAdapterArgs) -> Result<()> {
    // Names come from the files: control characters are escaped before they reach the terminal.
    print!("{}", escape(&inspect_adapter(&args.dir)?, true));
    let adapter = PeftAdapter::load(&args.dir, Device::Cpu)?;
    warn_alpha(&adapter);
    let base = args.base.as_ref().map(SafetensorsFile::open).transpose()?;
    print!("{}", escape(&sparse_details(&adapter, base.as_ref())?, true));
    Ok(())
}

/// WaveFT / VB-LoRA specifics: per-layer coefficient counts and (with the base) shapes, density and ΔW
/// support for WaveFT; bank, top-k and storage against a LoRA of the same rank for VB-LoRA.
fn sparse_details(adapter: &PeftAdapter, base: Option<&SafetensorsFile>) -> Result<String> {
    use std::fmt::Write as _;
    let mut s = String::new();
    let shapes: BTreeMap<String, (usize, usize)> = match base {
        Some(f) => linear_modules(f)?
            .into_iter()
            .map(|(m, a, b)| (m, (a, b)))
            .collect(),
        None => BTreeMap::new(),
    };
    let cfg = &adapter.config;
    // (out, in) of a module from the base (stored [in, out] with fan_in_fan_out).
    let dims = |m: &str| {
        shapes
            .get(m)
            .map(|&(a, b)| if cfg.fan_in_fan_out { (b, a) } else { (a, b) })
    };
    let modules = adapter.modules()?;
    // Writing to a String cannot fail; the results are ignored below.
    match &cfg.method {
        MethodConfig::WaveFt(c) => {
            let _ = writeln!(
                s,
                "WaveFT: wavelet {} ({}), scaling {}, random_loc_seed {}{}",
                c.wavelet_family,
                if c.use_idwt {
                    "inverse DWT"
                } else {
                    "no IDWT: plain scatter"
                },
                c.scaling,
                c.random_loc_seed,
                if c.proportional_parameters {
                    format!(", proportional_parameters (budget {} per layer)", c.n_frequency)
                } else {
                    String::new()
                }
            );
            let _ = writeln!(
                s,
                "  {:<48} {:>12} {:>13} {:>9} {:>10} {:>12}",
                "module", "n_frequency", "out x in", "density", "nnz(ΔW)", "LoRA-eq. r"
            );
            for m in &modules {
                let n = m.n_frequency.unwrap_or(0);
                let (shape, density, nnz, req) = match dims(&m.name) {
                    Some((o, i)) => {
                        let wc = WaveFtConfig {
                            n_frequency: n,
                            ..c.into()
                        };
                        let nnz = WaveFtLayer::new(o, i, &wc, Device::Cpu)
                            .map(|l| l.positions().nnz().to_string())
                            .unwrap_or_else(|e| format!("({e})"));
                        (
                            format!("{o} x {i}"),
                            format!("{:.4}%", 100.0 * n as f64 / (o * i) as f64),
                            nnz,
                            format!("{:.2}", n as f64 / (o + i) as f64),
                        )
                    }
                    None => ("-".into(), "-".into(), "-".into(), "-".into()),
                };
                let _ = writeln!(
                    s,
                    "  {:<48} {:>12} {:>13} {:>9} {:>10} {:>12}",
                    m.name, n, shape, density, nnz, req
                );
            }
            if base.is_none() {
                let _ = writeln!(
                    s,
                    "  (pass --base to see layer shapes, density and the support of ΔW)"
                );
            }
        }
        MethodConfig::VbLora(c) => {
            let bank = c.num_vectors * c.vector_length;
            let _ = writeln!(
                s,
                "VB-LoRA: shared bank {} x {} ({bank} parameters, counted once), topk {}, r {}, dropout {}, {}",
                c.num_vectors,
                c.vector_length,
                c.topk,
                c.r,
                c.vblora_dropout,
                if c.save_only_topk_weights {
                    "stored as top-k indices + weights (inference only)"
                } else {
                    "full logits stored"
                }
            );
            let _ = writeln!(
                s,
                "  {:<48} {:>13} {:>12} {:>12} {:>20}",
                "module", "out x in", "logits", "file bytes", "LoRA-equivalent bytes"
            );
            let (mut ours, mut lora) = (0usize, 0usize);
            for m in &modules {
                let (i, o) = (m.in_features.unwrap_or(0), m.out_features.unwrap_or(0));
                // A LoRA of the same rank, f32: r·(in + out) values.
                let lb = 4 * c.r * (i + o);
                ours += m.stored_bytes;
                lora += lb;
                let _ = writeln!(
                    s,
                    "  {:<48} {:>13} {:>12} {:>12} {:>20}",
                    m.name,
                    format!("{o} x {i}"),
                    m.trainable_params,
                    m.stored_bytes,
                    lb
                );
            }
            let bank_bytes = adapter
                .tensors
                .get(VBLORA_BANK_KEY)
                .map_or(0, |t| t.size_in_bytes());
            let _ = writeln!(
                s,
                "  total: {} bytes with the bank vs {lora} bytes for LoRA r={} on the same modules ({:.1}x smaller)",
                ours + bank_bytes,
                c.r,
                lora as f64 / (ours + bank_bytes).max(1) as f64
            );
        }
        MethodConfig::Lora(_) => {}
    }
    Ok(s)
}
