//! `peftk inspect FILE`: the tensors of a safetensors file, with bitsandbytes 4-bit weights grouped
//! with their companions and their quant state decoded.
//!
//! Built as data first ([`Report`]), text second ([`Report::render`]), so that other inputs (an adapter
//! directory) can add their own sections to the same report.

use peft_kernels::io::SafetensorsFile;
use peft_kernels::quant::{QuantizedTensor, io as qio};
use peft_kernels::{Device, Error, Result};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A safetensors file, or a PEFT adapter directory.
    pub path: PathBuf,
}

/// One stored tensor: name, dtype, shape, bytes.
#[derive(Clone, Debug)]
pub struct TensorRow {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// A bitsandbytes 4-bit weight and the tensors that store it.
#[derive(Debug)]
pub struct QuantRow {
    pub name: String,
    /// The loaded weight, or why it does not load.
    pub weight: std::result::Result<QuantizedTensor, Error>,
    pub parts: Vec<TensorRow>,
}

/// A titled list of plain tensors and 4-bit weights.
#[derive(Debug, Default)]
pub struct Section {
    pub title: String,
    pub notes: Vec<String>,
    pub quantized: Vec<QuantRow>,
    pub plain: Vec<TensorRow>,
}

/// Everything `inspect` prints.
#[derive(Debug, Default)]
pub struct Report {
    pub sections: Vec<Section>,
}

pub fn run(a: Args) -> Result<()> {
    if a.path.is_dir() {
        // A PEFT adapter directory: method, ranks, scalings, trainable parameters.
        print!("{}", peft_kernels::peft_model::inspect::inspect_adapter(&a.path)?);
        return Ok(());
    }
    print!("{}", inspect_path(&a.path)?.render());
    Ok(())
}

/// Dispatches on what `path` is.
pub fn inspect_path(path: &Path) -> Result<Report> {
    if path.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{}: inspecting a directory is not supported yet (give a .safetensors file)",
            path.display()
        )));
    }
    Ok(Report {
        sections: vec![inspect_safetensors(path)?],
    })
}

/// The section for one safetensors file.
pub fn inspect_safetensors(path: &Path) -> Result<Section> {
    let file = SafetensorsFile::open(path)?;
    let row = |name: &str| -> Result<TensorRow> {
        let (dt, shape, data) = file.raw(name)?;
        Ok(TensorRow {
            name: name.to_string(),
            dtype: format!("{dt:?}").to_lowercase(),
            shape,
            bytes: data.len(),
        })
    };
    let mut sec = Section {
        title: path.display().to_string(),
        ..Default::default()
    };
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    sec.notes.push(format!(
        "{} tensors, {}",
        file.names().len(),
        human(file_bytes as usize)
    ));
    if let Some(meta) = file.metadata() {
        let mut kv: Vec<_> = meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
        kv.sort();
        sec.notes.push(format!("metadata: {}", kv.join(", ")));
    }
    let mut grouped = HashSet::new();
    for name in qio::quantized_names(&file) {
        let parts = qio::companion_names(&file, &name);
        grouped.extend(parts.iter().cloned());
        sec.quantized.push(QuantRow {
            weight: qio::load_quantized(&file, &name, Device::Cpu),
            parts: parts.iter().map(|p| row(p)).collect::<Result<_>>()?,
            name,
        });
    }
    for name in file.names() {
        if !grouped.contains(name) {
            sec.plain.push(row(name)?);
        }
    }
    Ok(sec)
}

fn human(b: usize) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn shape(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
    )
}

impl Report {
    pub fn render(&self) -> String {
        let mut o = String::new();
        for sec in &self.sections {
            let _ = writeln!(o, "{}", sec.title);
            for n in &sec.notes {
                let _ = writeln!(o, "  {n}");
            }
            if !sec.quantized.is_empty() {
                let _ = writeln!(o, "\n  bitsandbytes 4-bit weights ({}):", sec.quantized.len());
                let _ = writeln!(
                    o,
                    "  {:<44} {:<5} {:>5} {:<3} {:<9} {:<16} {:>11} {:>7} {:>7}",
                    "name", "type", "block", "dq", "dtype", "shape", "bytes", "bits/w", "bytes/w"
                );
                let (mut qb, mut qw) = (0usize, 0usize);
                for q in &sec.quantized {
                    match &q.weight {
                        Ok(w) => {
                            let st = w.state();
                            qb += w.size_in_bytes();
                            qw += w.numel();
                            let _ = writeln!(
                                o,
                                "  {:<44} {:<5} {:>5} {:<3} {:<9} {:<16} {:>11} {:>7.3} {:>7.4}",
                                q.name,
                                st.quant_type.as_str(),
                                st.blocksize,
                                if st.is_double() { "yes" } else { "no" },
                                st.dtype.torch_name(),
                                shape(&st.shape),
                                human(w.size_in_bytes()),
                                w.bits_per_weight(),
                                w.bits_per_weight() / 8.0
                            );
                        }
                        Err(e) => {
                            let _ = writeln!(o, "  {:<44} INVALID: {e}", q.name);
                        }
                    }
                    for p in &q.parts {
                        let _ = writeln!(
                            o,
                            "      {:<52} {:<5} {:<16} {:>11}",
                            p.name,
                            p.dtype,
                            shape(&p.shape),
                            human(p.bytes)
                        );
                    }
                }
                if qw > 0 {
                    let _ = writeln!(
                        o,
                        "  total: {} weights in {} ({:.3} bits/weight, {:.4} bytes/weight)",
                        qw,
                        human(qb),
                        qb as f64 * 8.0 / qw as f64,
                        qb as f64 / qw as f64
                    );
                }
            }
            if !sec.plain.is_empty() {
                let _ = writeln!(o, "\n  other tensors ({}):", sec.plain.len());
                let _ = writeln!(
                    o,
                    "  {:<44} {:<5} {:<16} {:>11}",
                    "name", "dtype", "shape", "bytes"
                );
                for p in &sec.plain {
                    let _ = writeln!(
                        o,
                        "  {:<44} {:<5} {:<16} {:>11}",
                        p.name,
                        p.dtype,
                        shape(&p.shape),
                        human(p.bytes)
                    );
                }
            }
        }
        o
    }
}
