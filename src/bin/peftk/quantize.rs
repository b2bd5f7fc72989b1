//! `peftk quantize IN OUT`: bitsandbytes NF4/FP4 quantization of a safetensors checkpoint.

use indicatif::{ProgressBar, ProgressStyle};
use peft_kernels::io::output::check_output;
use peft_kernels::io::{
    SafetensorsFile, TensorBytes, TensorSpec, from_st_dtype, write_safetensors_streaming,
};
use peft_kernels::quant::{QuantType, QuantizeOptions, QuantizedTensor, io as qio};
use peft_kernels::{Device, Error, Result};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input safetensors file.
    pub input: PathBuf,
    /// Output safetensors file: written to a temp file, then renamed over OUTPUT (a symlink is written
    /// through to its target; an existing file keeps its mode). Must be a regular file and not the input.
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
    /// Quantize exactly the 2-D float tensors whose name matches this regex, instead of the default
    /// selection (the weights of linear layers, as transformers + bitsandbytes quantize them: every 2-D
    /// float `*.weight` except embeddings, `lm_head` and norms).
    #[arg(long, value_name = "REGEX", conflicts_with = "include")]
    pub only: Option<String>,
    /// Also quantize the 2-D float tensors whose name matches this regex, on top of the default selection
    /// (e.g. `--include 'lm_head|embed_tokens'`).
    #[arg(long, value_name = "REGEX")]
    pub include: Option<String>,
    /// Where to quantize: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Quantize NaN/inf like bitsandbytes' CUDA kernels instead of failing (the blocks holding them
    /// dequantize to NaN).
    #[arg(long)]
    pub allow_non_finite: bool,
    /// Allow OUTPUT to be the input file itself (it is replaced only once the new file is complete).
    #[arg(long)]
    pub force: bool,
}

/// Module names that transformers does not turn into `Linear4bit`: embeddings (not `nn.Linear`),
/// the output head (`get_keys_to_not_convert` keeps the output embeddings in full precision), norms.
pub fn default_target(name: &str) -> bool {
    let Some(module) = name.strip_suffix(".weight").or((name == "weight").then_some("")) else {
        return false;
    };
    let last = module.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    let skip = last.contains("embed")
        || last.contains("norm")
        || last.starts_with("ln")
        || matches!(
            last.as_str(),
            "lm_head" | "wte" | "wpe" | "shared" | "output_layer"
        );
    !skip
}

/// Why a tensor is quantized or not.
pub enum Selection<'a> {
    Default { include: Option<&'a regex::Regex> },
    Only(&'a regex::Regex),
}

/// True if `name` (2-D, float `dtype`) is one of the tensors to quantize.
pub fn selected(name: &str, shape: &[usize], is_float: bool, sel: &Selection<'_>) -> bool {
    let by_name = match sel {
        Selection::Only(re) => re.is_match(name),
        Selection::Default { include } => default_target(name) || include.is_some_and(|re| re.is_match(name)),
    };
    by_name && is_float && shape.len() == 2
}

fn regex(flag: &str, s: Option<&str>) -> Result<Option<regex::Regex>> {
    s.map(regex::Regex::new)
        .transpose()
        .map_err(|e| Error::InvalidArgument(format!("{flag}: {e}")))
}

pub fn run(a: Args) -> Result<()> {
    let only = regex("--only", a.only.as_deref())?;
    let include = regex("--include", a.include.as_deref())?;
    let sel = match &only {
        Some(re) => Selection::Only(re),
        None => Selection::Default {
            include: include.as_ref(),
        },
    };
    let opts = QuantizeOptions {
        quant_type: a.quant_type,
        blocksize: a.blocksize,
        double_quant: !a.no_double_quant,
        allow_non_finite: a.allow_non_finite,
        name: String::new(),
    };
    opts.validate()?;
    a.device.check()?;
    check_output(&a.output, &[&a.input], a.force)?;
    let file = SafetensorsFile::open(&a.input)?;

    // Tensors that already belong to a 4-bit weight pass through untouched.
    let qnames: HashSet<String> = qio::quantized_names(&file).into_iter().collect();
    let mut already: HashSet<String> = HashSet::new();
    for q in &qnames {
        already.extend(qio::companion_names(&file, q));
    }
    let mut todo = Vec::new();
    let mut matched_quantized = 0;
    for name in file.names() {
        let (dt, shape, data) = file.raw(name)?;
        let is_float = from_st_dtype(dt).is_some_and(|d| d.is_float());
        let by_name = match &sel {
            Selection::Only(re) => re.is_match(name),
            Selection::Default { .. } => true,
        };
        if already.contains(name) {
            matched_quantized += usize::from(by_name && qnames.contains(name));
        } else if selected(name, &shape, is_float, &sel) {
            todo.push((name.clone(), data.len() as u64));
        }
    }
    if todo.is_empty() {
        let why = match (&only, matched_quantized) {
            (_, n) if n > 0 => format!("the {n} matching weight(s) are already bitsandbytes 4-bit"),
            (Some(re), _) => format!("--only {:?} matches no 2-D float tensor", re.as_str()),
            (None, _) => "no 2-D float linear weight (`*.weight`) found; embeddings, lm_head and norms are \
                          skipped by default (use --include or --only to select tensors)"
                .to_string(),
        };
        return Err(Error::InvalidArgument(format!(
            "{}: nothing to quantize: {why}; no output written",
            a.input.display()
        )));
    }
    let total: u64 = todo.iter().map(|t| t.1).sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{spinner} quantizing [{bar:30}] {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    // The quantized tensors are kept until written (at most 1/4 of their bf16 input); the others are
    // streamed from the input map.
    let mut quantized: HashMap<String, TensorBytes<'static>> = HashMap::new();
    let (mut in_bytes, mut out_bytes, mut weights) = (0u64, 0u64, 0u64);
    for (name, _) in &todo {
        bar.set_message(name.clone());
        let t = file.load(name, a.device)?;
        file.release(name);
        let q = QuantizedTensor::quantize(
            &t,
            &QuantizeOptions {
                name: name.clone(),
                ..opts.clone()
            },
        )
        .map_err(|e| match e {
            Error::NonFinite { .. } => Error::InvalidArgument(format!(
                "{e}; pass --allow-non-finite to quantize it anyway (as bitsandbytes' CUDA kernels do)"
            )),
            e => e,
        })?;
        in_bytes += t.size_in_bytes() as u64;
        out_bytes += q.size_in_bytes() as u64;
        weights += q.numel() as u64;
        bar.inc(t.size_in_bytes() as u64);
        for (k, v) in qio::to_safetensors_entries(&q, name)? {
            if file.contains(&k) && &k != name {
                return Err(Error::InvalidArgument(format!(
                    "output tensor name {k:?} would be written twice (an input tensor already uses a \
                     quant-state name)"
                )));
            }
            quantized.insert(k, v);
        }
    }
    bar.finish_and_clear();
    let mut specs = file.specs_where(|n| !quantized.contains_key(n))?;
    let passed = specs.len();
    specs.extend(quantized.iter().map(|(k, v)| TensorSpec {
        name: k.clone(),
        dtype: v.dtype,
        shape: v.shape.clone(),
    }));
    // A passed-through tensor's input pages are released after it was written (when the next one is
    // produced), so the input map does not accumulate in memory.
    let mut written: Option<String> = None;
    write_safetensors_streaming(&a.output, specs, file.metadata().cloned(), |s| {
        if let Some(prev) = written.replace(s.name.clone()) {
            file.release(&prev);
        }
        Ok(match quantized.remove(&s.name) {
            Some(t) => t.data,
            None => Cow::Borrowed(file.raw(&s.name)?.2),
        })
    })?;
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
        passed,
        a.output.display()
    );
    Ok(())
}
