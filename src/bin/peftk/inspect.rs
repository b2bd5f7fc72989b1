//! `peftk inspect FILE`: the tensors of a safetensors file, with bitsandbytes 4-bit weights grouped
//! with their companions and their quant state decoded.
//!
//! Built as data first ([`Report`]), text second ([`Report::render`]), so that other inputs (an adapter
//! directory) can add their own sections to the same report.

use peft_kernels::io::SafetensorsFile;
use peft_kernels::kbit::{self, Tier};
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor, io as qio};
use peft_kernels::{Device, Error, Result};
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A safetensors file, or a PEFT adapter directory.
    pub path: PathBuf,
    /// With an adapter directory: its base checkpoint (.safetensors, dense or bitsandbytes 4-bit), for
    /// per-layer shapes and, for WaveFT, the density and the nonzeros of ΔW.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Storage-tier report instead: for every linear weight of PATH (a model directory with
    /// model.safetensors, or a .safetensors file), the bytes per weight and the relative quantization
    /// error ‖W − Q(W)‖ / ‖W‖ of each tier, e.g. `--tiers 2,3,4,8,16` (4 = NF4).
    #[arg(long, value_delimiter = ',')]
    pub tiers: Option<Vec<Tier>>,
    /// With --tiers: the absmax blocksize of the quantized tiers.
    #[arg(long, default_value_t = 64, requires = "tiers")]
    pub blocksize: usize,
    /// With --tiers: plain f32 absmax instead of double quantization.
    #[arg(long, requires = "tiers")]
    pub no_double_quant: bool,
}

/// `s` with every control character (C0, DEL, C1) and bidirectional-override character escaped, so that
/// names and metadata from a crafted file cannot drive the terminal. Newlines are kept only if
/// `keep_newlines`.
pub fn escape(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    let bad = |c: char| {
        (c.is_control() && !(keep_newlines && c == '\n'))
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            o.extend(c.escape_default());
        } else {
            o.push(c);
        }
    }
    Cow::Owned(o)
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
    if let Some(tiers) = &a.tiers {
        let opts = QuantizeOptions {
            blocksize: a.blocksize,
            double_quant: !a.no_double_quant,
            ..Default::default()
        };
        print!("{}", tier_report(&a.path, tiers, &opts)?);
        return Ok(());
    }
    if a.path.is_dir() {
        // A PEFT adapter directory: method, ranks, scalings, trainable parameters, method details.
        return crate::merge::run_inspect_adapter(&crate::merge::InspectAdapterArgs {
            dir: a.path,
            base: a.base,
        });
    }
    if a.base.is_some() {
        return Err(Error::InvalidArgument(
            "--base only applies when inspecting a PEFT adapter directory".into(),
        ));
    }
    let report = inspect_path(&a.path)?;
    print!("{}", report.render());
    let invalid: usize = report
        .sections
        .iter()
        .map(|s| s.quantized.iter().filter(|q| q.weight.is_err()).count())
        .sum();
    if invalid > 0 {
        return Err(Error::InvalidArgument(format!(
            "{}: {invalid} bitsandbytes 4-bit weight(s) are INVALID (see above)",
            a.path.display()
        )));
    }
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

/// Rows of cells printed with each column as wide as its widest cell (`>` in `align` right-aligns).
fn table(o: &mut String, indent: &str, align: &[bool], rows: &[Vec<String>]) {
    let cols = align.len();
    let mut w = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for r in rows {
        let mut line = String::from(indent);
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            let pad = w.get(i).copied().unwrap_or(0).saturating_sub(c.chars().count());
            if i == r.len() - 1 && !align.get(i).copied().unwrap_or(false) {
                line.push_str(c);
            } else if align.get(i).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(pad));
            }
        }
        let _ = writeln!(o, "{}", line.trim_end());
    }
}

impl Report {
    pub fn render(&self) -> String {
        let e = |s: &str| escape(s, false).into_owned();
        let mut o = String::new();
        for sec in &self.sections {
            let _ = writeln!(o, "{}", e(&sec.title));
            for n in &sec.notes {
                let _ = writeln!(o, "  {}", e(n));
            }
            if !sec.quantized.is_empty() {
                let _ = writeln!(o, "\n  bitsandbytes 4-bit weights ({}):", sec.quantized.len());
                let mut rows = vec![
                    [
                        "name", "type", "block", "dq", "dtype", "shape", "bytes", "bits/w", "bytes/w",
                    ]
                    .map(String::from)
                    .to_vec(),
                ];
                let (mut qb, mut qw) = (0usize, 0usize);
                for q in &sec.quantized {
                    match &q.weight {
                        Ok(w) => {
                            let st = w.state();
                            qb += w.size_in_bytes();
                            qw += w.numel();
                            rows.push(vec![
                                e(&q.name),
                                st.quant_type.as_str().into(),
                                st.blocksize.to_string(),
                                if st.is_double() { "yes" } else { "no" }.into(),
                                st.dtype.torch_name().into(),
                                shape(&st.shape),
                                human(w.size_in_bytes()),
                                format!("{:.3}", w.bits_per_weight()),
                                format!("{:.4}", w.bits_per_weight() / 8.0),
                            ]);
                        }
                        Err(err) => rows.push(vec![e(&q.name), format!("INVALID: {}", e(&err.to_string()))]),
                    }
                    for p in &q.parts {
                        rows.push(vec![
                            format!("    {}", e(&p.name)),
                            p.dtype.clone(),
                            String::new(),
                            String::new(),
                            String::new(),
                            shape(&p.shape),
                            human(p.bytes),
                        ]);
                    }
                }
                let align = [false, false, true, false, false, false, true, true, true];
                table(&mut o, "  ", &align, &rows);
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
                let mut rows = vec![["name", "dtype", "shape", "bytes"].map(String::from).to_vec()];
                for p in &sec.plain {
                    rows.push(vec![e(&p.name), p.dtype.clone(), shape(&p.shape), human(p.bytes)]);
                }
                table(&mut o, "  ", &[false, false, false, true], &rows);
            }
        }
        o
    }
}

/// `peftk inspect PATH --tiers ...`: per 2-D float `*.weight` of the file (a model directory's
/// model.safetensors; embeddings and already-4-bit weights skipped), the bytes per weight and the
/// relative error ‖W − Q(W)‖ / ‖W‖ of each tier, then the totals over all of them.
pub fn tier_report(path: &Path, tiers: &[Tier], opts: &QuantizeOptions) -> Result<String> {
    opts.validate()?;
    let file_path = if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    };
    let file = SafetensorsFile::open(&file_path)?;
    let quantized: HashSet<String> = qio::quantized_names(&file)
        .iter()
        .flat_map(|n| qio::companion_names(&file, n))
        .collect();
    let mut header = vec!["weight".to_string(), "shape".to_string()];
    header.extend(tiers.iter().map(|t| format!("{t}-bit B/w  rel.err")));
    let mut rows = vec![header];
    let mut totals = vec![(0usize, 0f64); tiers.len()];
    let (mut numel_all, mut sq_all) = (0usize, 0f64);
    for name in file.names() {
        let (dt, shape, _) = file.raw(name)?;
        let float = matches!(format!("{dt:?}").to_lowercase().as_str(), "f32" | "f16" | "bf16");
        if !name.ends_with(".weight")
            || shape.len() != 2
            || !float
            || name.contains("embeddings")
            || quantized.contains(name)
        {
            continue;
        }
        let w = file.load(name, Device::Cpu)?;
        let numel = w.numel();
        let sq: f64 = w.to_vec_f32()?.iter().map(|&v| (v as f64).powi(2)).sum();
        let mut row = vec![escape(name, false).into_owned(), self::shape(&shape)];
        for (i, &t) in tiers.iter().enumerate() {
            let (err, bytes) = kbit::relative_error(&w, t, opts)?;
            row.push(format!("{:>6.3} {:>9.3e}", bytes as f64 / numel as f64, err));
            totals[i].0 += bytes;
            totals[i].1 += err * err * sq;
        }
        numel_all += numel;
        sq_all += sq;
        rows.push(row);
    }
    if numel_all == 0 {
        return Err(Error::InvalidArgument(format!(
            "{}: no 2-D float linear weights to report",
            file_path.display()
        )));
    }
    let mut total = vec![
        format!("all {} weights", rows.len() - 1),
        format!("{numel_all} params"),
    ];
    for (bytes, se) in &totals {
        total.push(format!(
            "{:>6.3} {:>9.3e}",
            *bytes as f64 / numel_all as f64,
            (se / sq_all.max(f64::MIN_POSITIVE)).sqrt()
        ));
    }
    rows.push(total);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "storage tiers of {} (blocksize {}, double quant {}); B/w = bytes per weight incl. scales, rel.err = ||W - Q(W)|| / ||W||",
        escape(&file_path.display().to_string(), false),
        opts.blocksize,
        if opts.double_quant { "on" } else { "off" }
    );
    let mut align = vec![false, false];
    align.extend(tiers.iter().map(|_| true));
    table(&mut o, "  ", &align, &rows);
    Ok(o)
}
