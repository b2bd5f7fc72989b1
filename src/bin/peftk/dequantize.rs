//! `peftk dequantize IN OUT`: every bitsandbytes 4-bit weight back to a float tensor.
//!
//! Streams: the output header is computed from the quant states, then each weight is dequantized and
//! written in turn, so that memory stays near the largest tensor (plus the pages of the input map).

use indicatif::ProgressBar;
use peft_kernels::io::output::{Payload, check_output};
use peft_kernels::io::{SafetensorsFile, TensorSpec, to_st_dtype, write_safetensors_streaming};
use peft_kernels::quant::io as qio;
use peft_kernels::{DType, Device, Error, Result};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input safetensors file with bitsandbytes 4-bit weights.
    pub input: PathBuf,
    /// Output safetensors file: written to a temp file, then renamed over OUTPUT (a symlink is written
    /// through to its target; an existing file keeps its mode). Must be a regular file and not the input.
    pub output: PathBuf,
    /// Output dtype: f32, f16 or bf16 (default: the dtype recorded in each quant state).
    #[arg(long, value_parser = parse_float_dtype)]
    pub dtype: Option<DType>,
    /// Where to dequantize: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Dequantize weights whose absmax holds NaN/inf (as `quantize --allow-non-finite` writes them)
    /// instead of failing; their blocks come out NaN/inf.
    #[arg(long)]
    pub allow_non_finite: bool,
    /// Allow OUTPUT to be the input file itself (it is replaced only once the new file is complete).
    #[arg(long)]
    pub force: bool,
}

/// A float dtype (f32, f16 or bf16), checked while parsing the command line.
pub fn parse_float_dtype(s: &str) -> std::result::Result<DType, String> {
    let d: DType = s.parse().map_err(|e: Error| e.to_string())?;
    if d.is_float() {
        Ok(d)
    } else {
        Err(format!(
            "--dtype must be f32, f16 or bf16 (a float dtype), not {d}"
        ))
    }
}

pub fn run(a: Args) -> Result<()> {
    a.device.check()?;
    check_output(&a.output, &[&a.input], a.force)?;
    let file = SafetensorsFile::open(&a.input)?;
    let names = qio::quantized_names(&file);
    if names.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no bitsandbytes 4-bit weight (no `*.quant_state.bitsandbytes__nf4|fp4` tensor); nothing to \
             dequantize, no output written",
            a.input.display()
        )));
    }
    // Every weight is loaded (all fields validated) before anything is written: a broken one is an
    // error, never a silently dropped tensor.
    let mut companions: HashSet<String> = HashSet::new();
    let mut out_dtype: HashMap<&str, (DType, Vec<usize>)> = HashMap::new();
    for q in &names {
        companions.extend(qio::companion_names(&file, q));
        let w = qio::load_quantized(&file, q, Device::Cpu)?;
        if !a.allow_non_finite {
            let absmax = w.absmax_f32()?.to_vec::<f32>()?;
            if let Some(i) = absmax.iter().position(|v| !v.is_finite()) {
                return Err(Error::Format {
                    context: a.input.display().to_string(),
                    msg: format!(
                        "quantized weight {q:?}: absmax of block {i} is {} (from a corrupt nested_absmax, or a \
                         weight quantized with --allow-non-finite); it would dequantize to non-finite values. \
                         Pass --allow-non-finite to write them anyway",
                        absmax[i]
                    ),
                });
            }
        }
        out_dtype.insert(q, (a.dtype.unwrap_or(w.dtype()), w.shape().to_vec()));
        for c in qio::companion_names(&file, q) {
            file.release(&c);
        }
    }
    let mut specs = file.specs_where(|n| !companions.contains(n))?;
    let passed = specs.len();
    for (q, (dt, shape)) in &out_dtype {
        specs.push(TensorSpec {
            name: q.to_string(),
            dtype: to_st_dtype(*dt),
            shape: shape.clone(),
        });
    }
    let bar = ProgressBar::new(names.len() as u64);
    // The input pages of each tensor are released once used: of the map, only about one tensor stays
    // resident (a passed-through tensor is released when the next one is produced, after its write).
    let mut written: Option<String> = None;
    write_safetensors_streaming(&a.output, specs, file.metadata().cloned(), |s| {
        if let Some(prev) = written.replace(s.name.clone()) {
            file.release(&prev);
        }
        Ok(match out_dtype.get(s.name.as_str()) {
            Some((dt, _)) => {
                let q = qio::load_quantized(&file, &s.name, a.device)?;
                for c in qio::companion_names(&file, &s.name) {
                    file.release(&c);
                }
                let t = q.dequantize(*dt)?;
                drop(q);
                bar.inc(1);
                Payload::Tensor(t)
            }
            None => Payload::Bytes(Cow::Borrowed(file.raw(&s.name)?.2)),
        })
    })?;
    bar.finish_and_clear();
    println!(
        "dequantized {} tensors, passed {passed} through; wrote {}",
        names.len(),
        a.output.display()
    );
    Ok(())
}
