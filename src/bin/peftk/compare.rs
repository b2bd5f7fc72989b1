//! `peftk compare`: the same recipe with each method (and seed), every run a child `peftk finetune`
//! process (so peak RSS is per run, not cumulative), then `results.{md,json,csv,svg,png}`.

use crate::finetune::{Method, Quant, Recipe, RunSummary, SUMMARY_FILE, value_name};
use crate::plot;
use clap::{Args as ClapArgs, ValueEnum};
use peft_kernels::{Error, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A compared method: an adapter method on a dense or NF4-dq base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompareMethod {
    /// The classifier alone (linear probe): the baseline.
    Head,
    Lora,
    /// LoRA on the NF4 base with double quantization.
    Qlora,
    Dora,
    /// DoRA on the NF4-dq base.
    Qdora,
    Waveft,
    Vblora,
    /// LoRA with per-linear bits and ranks from a `peftk qr-adapt` search (`--qr-config`).
    #[value(name = "qr-adaptor")]
    #[serde(rename = "qr-adaptor")]
    QrAdaptor,
}

impl CompareMethod {
    /// The `peftk finetune` method and base quantization.
    fn finetune(self) -> (Method, Quant) {
        match self {
            CompareMethod::Head => (Method::Head, Quant::None),
            CompareMethod::Lora => (Method::Lora, Quant::None),
            CompareMethod::Qlora => (Method::Lora, Quant::Nf4),
            CompareMethod::Dora => (Method::Dora, Quant::None),
            CompareMethod::Qdora => (Method::Dora, Quant::Nf4),
            CompareMethod::Waveft => (Method::Waveft, Quant::None),
            CompareMethod::Vblora => (Method::Vblora, Quant::None),
            CompareMethod::QrAdaptor => (Method::QrAdaptor, Quant::Nf4),
        }
    }

    /// A one-line description of the configuration.
    fn describe(self, r: &Recipe) -> String {
        let t = r.target_modules.join("/");
        let base = match self.finetune().1 {
            Quant::None => "f32 base",
            _ if self == CompareMethod::QrAdaptor => "per-linear 2-16 bit base (qr_adaptor.json)",
            _ => "NF4-dq base",
        };
        let m = match self {
            CompareMethod::Head => return "classifier only, f32 base".into(),
            CompareMethod::Lora | CompareMethod::Qlora => {
                format!("LoRA r={} α={} on {t}", r.r, r.alpha)
            }
            CompareMethod::Dora | CompareMethod::Qdora => {
                format!("DoRA r={} α={} on {t}", r.r, r.alpha)
            }
            CompareMethod::Waveft => format!("WaveFT 1000 coeff./layer, scale 25, on {t}"),
            CompareMethod::Vblora => format!("VB-LoRA r=4, bank 256×128, top-2, on {t}"),
            CompareMethod::QrAdaptor => "LoRA with searched per-linear ranks".into(),
        };
        format!("{m}, {base}")
    }
}

/// `peftk compare`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Methods to run, comma separated (head = classifier only, q* = on the NF4-dq base).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "head,lora,qlora,dora,qdora,waveft,vblora"
    )]
    pub methods: Vec<CompareMethod>,
    /// Runs per method, with seeds --seed, --seed + 1, ...
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    /// Output directory: results.{md,json,csv,svg,png} and runs/METHOD-seedS/ (each run's output).
    #[arg(long, default_value = "peftk-compare")]
    pub out: PathBuf,
    /// Keep the runs that finished before (their OUT/runs/NAME/summary.json) instead of repeating them:
    /// continues an interrupted comparison, or only rewrites the results when every run is there.
    #[arg(long)]
    pub reuse: bool,
    /// The `qr_adaptor.json` of the `qr-adaptor` method (from `peftk qr-adapt`).
    #[arg(long)]
    pub qr_config: Option<PathBuf>,
    #[command(flatten)]
    pub recipe: Recipe,
}

/// One method's row: the runs' mean and (sample) standard deviation.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub method: CompareMethod,
    pub config: String,
    pub seeds: usize,
    pub trainable_params: usize,
    pub trainable_pct: f64,
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    pub f1_mean: f64,
    pub f1_std: f64,
    pub train_s_mean: f64,
    pub step_ms_median_mean: f64,
    pub peak_rss_mb_max: f64,
    pub optimizer_state_bytes: usize,
    /// Parameters in 8-bit optimizer state and the bytes of that state (`(0, 0)` without AdamW8bit or
    /// when every tensor is below `min_8bit_size`).
    pub optimizer_state_8bit: (usize, usize),
    pub adapter_bytes: u64,
    /// Optimizer steps of each run (fewer than the recipe's when a run was stopped early).
    pub optimizer_steps: Vec<u64>,
    /// The 1-minute load average around the runs (other processes on the machine share its cores).
    pub loadavg_mean: f64,
    pub runs: Vec<RunSummary>,
}

fn inv(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Runs `peftk finetune` for one method and seed in a child process; its summary is the last line
/// of its standard output.
fn run_child(m: CompareMethod, recipe: &Recipe, out: &Path, qr: Option<&Path>) -> Result<RunSummary> {
    let exe = std::env::current_exe().map_err(|e| Error::io(Path::new("current_exe"), e))?;
    let (method, quant) = m.finetune();
    let mut cmd = Command::new(&exe);
    cmd.arg("finetune")
        .args(["--method", &value_name(method), "--quantize", &value_name(quant)])
        .args(recipe.to_cli_args())
        .arg("--out")
        .arg(out)
        .arg("--quiet")
        .args(
            qr.iter()
                .flat_map(|q| [std::ffi::OsStr::new("--qr-config"), q.as_os_str()]),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let output = cmd.output().map_err(|e| Error::io(&exe, e))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(inv(format!(
            "peftk finetune --method {} --quantize {} failed ({}); its output is above",
            value_name(method),
            value_name(quant),
            output.status
        )));
    }
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(last).map_err(|e| inv(format!("peftk finetune printed no summary ({e}): {last:?}")))
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn row(m: CompareMethod, recipe: &Recipe, runs: Vec<RunSummary>) -> Row {
    let col = |f: fn(&RunSummary) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let (accuracy_mean, accuracy_std) = mean_std(&col(|r| r.accuracy));
    let (f1_mean, f1_std) = mean_std(&col(|r| r.f1));
    let first = &runs[0];
    Row {
        method: m,
        config: m.describe(recipe),
        seeds: runs.len(),
        trainable_params: first.trainable_params,
        trainable_pct: 100.0 * first.trainable_params as f64 / first.total_params.max(1) as f64,
        accuracy_mean,
        accuracy_std,
        f1_mean,
        f1_std,
        train_s_mean: mean_std(&col(|r| r.train_s)).0,
        step_ms_median_mean: mean_std(&col(|r| r.step_ms_median)).0,
        peak_rss_mb_max: col(|r| r.peak_rss_mb).into_iter().fold(0.0, f64::max),
        optimizer_state_bytes: first.optimizer_state_bytes,
        optimizer_state_8bit: first.optimizer_state_8bit,
        adapter_bytes: first.adapter_bytes,
        optimizer_steps: runs.iter().map(|r| r.optimizer_steps).collect(),
        loadavg_mean: mean_std(&col(|r| r.loadavg_1m)).0,
        runs,
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.methods.is_empty() || a.seeds == 0 {
        return Err(inv("give at least one method and --seeds >= 1"));
    }
    if a.methods.contains(&CompareMethod::QrAdaptor) && a.qr_config.is_none() {
        return Err(inv(
            "the qr-adaptor method needs --qr-config FILE (from peftk qr-adapt)",
        ));
    }
    std::fs::create_dir_all(a.out.join("runs")).map_err(|e| Error::io(&a.out, e))?;
    let total = a.methods.len() * a.seeds;
    let mut rows = Vec::new();
    let mut k = 0;
    for &m in &a.methods {
        let mut runs = Vec::new();
        for s in 0..a.seeds {
            k += 1;
            let mut recipe = a.recipe.clone();
            recipe.seed = a.recipe.seed.wrapping_add(s as u64);
            let name = format!("{}-seed{}", value_name(m), recipe.seed);
            let dir = a.out.join("runs").join(&name);
            let summary = dir.join(SUMMARY_FILE);
            let r = if a.reuse && summary.exists() {
                let bytes = std::fs::read(&summary).map_err(|e| Error::io(&summary, e))?;
                let r: RunSummary =
                    serde_json::from_slice(&bytes).map_err(|e| inv(format!("{}: {e}", summary.display())))?;
                eprintln!("[{k}/{total}] {name}: reusing {}", summary.display());
                r
            } else {
                eprintln!("[{k}/{total}] {name}: {}", m.describe(&recipe));
                run_child(m, &recipe, &dir, a.qr_config.as_deref())?
            };
            eprintln!(
                "[{k}/{total}] {name}: accuracy {:.4}, macro-F1 {:.4}, {:.1} s training, peak {:.0} MiB",
                r.accuracy, r.f1, r.train_s, r.peak_rss_mb
            );
            runs.push(r);
        }
        rows.push(row(m, &a.recipe, runs));
    }
    write_results(&a, &rows)?;
    println!("{}", markdown(&a, &rows));
    eprintln!("wrote {}/results.{{md,json,csv,svg,png}}", a.out.display());
    Ok(())
}

fn recipe_line(a: &Args) -> String {
    let r = &a.recipe;
    format!(
        "{} epochs, batch {}, lr {} ({} schedule, warmup {}), weight decay {}, {}{}{}, dropout {}, max {} tokens, seeds {}..{}",
        r.epochs,
        r.batch_size,
        r.lr,
        value_name(r.schedule),
        r.warmup,
        r.weight_decay,
        value_name(r.optim),
        if r.grad_accum > 1 {
            format!(", grad accum {}", r.grad_accum)
        } else {
            String::new()
        },
        r.grad_clip
            .map(|c| format!(", grad clip {c}"))
            .unwrap_or_default(),
        r.dropout,
        r.data_args.max_len,
        r.seed,
        r.seed + a.seeds as u64 - 1,
    )
}

fn pm(mean: f64, std: f64, seeds: usize) -> String {
    if seeds > 1 {
        format!("{mean:.3} ± {std:.3}")
    } else {
        format!("{mean:.3}")
    }
}

/// Bytes as KiB/MiB.
pub fn human_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The optimizer-state cell: the bytes, the bytes per trainable parameter, and the 8-bit format's own
/// bytes per parameter over the tensors in 8-bit state when there are any (AdamW8bit keeps f32 state,
/// 8 B/param, for tensors below `min_8bit_size`, which the overall figure mixes in).
fn state_cell(bytes: usize, params: usize, eight: (usize, usize)) -> String {
    let per = |b: usize, n: usize| b as f64 / n.max(1) as f64;
    let mut s = format!("{} ({:.2} B/param", human_bytes(bytes as f64), per(bytes, params));
    if eight.0 > 0 {
        let _ = write!(s, "; 8-bit tensors {:.2} B/param", per(eight.1, eight.0));
    }
    s.push(')');
    s
}

fn markdown(a: &Args, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Recipe: {}.\n", recipe_line(a));
    let _ = writeln!(
        s,
        "| method | config | trainable params | accuracy | macro-F1 | train time | median step | optimizer steps | peak memory | optimizer state | adapter on disk |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} ({:.3}%) | {} | {} | {:.1} s | {:.0} ms | {} | {:.0} MiB | {} | {} |",
            value_name(r.method),
            r.config,
            r.trainable_params,
            r.trainable_pct,
            pm(r.accuracy_mean, r.accuracy_std, r.seeds),
            pm(r.f1_mean, r.f1_std, r.seeds),
            r.train_s_mean,
            r.step_ms_median_mean,
            r.optimizer_steps
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            r.peak_rss_mb_max,
            state_cell(
                r.optimizer_state_bytes,
                r.trainable_params,
                r.optimizer_state_8bit
            ),
            if r.adapter_bytes == 0 {
                "-".to_string()
            } else {
                human_bytes(r.adapter_bytes as f64)
            },
        );
    }
    let loads: Vec<f64> = rows.iter().map(|r| r.loadavg_mean).collect();
    let _ = writeln!(
        s,
        "\nTrain time: the sum of the training steps (forward, backward, update; evaluation excluded), mean over seeds. \
         Peak memory: the run's peak RSS (each run is its own process). Load average (1 min) during the runs: {:.1} to {:.1}.",
        loads.iter().copied().fold(f64::INFINITY, f64::min),
        loads.iter().copied().fold(0.0, f64::max)
    );
    s
}

fn write_results(a: &Args, rows: &[Row]) -> Result<()> {
    let out = &a.out;
    let write = |name: &str, bytes: &[u8]| peft_kernels::io::atomic_write(out.join(name), bytes);
    write("results.md", markdown(a, rows).as_bytes())?;
    let json = serde_json::json!({
        "recipe": recipe_line(a),
        "seeds": a.seeds,
        "rows": rows,
    });
    let json = serde_json::to_vec_pretty(&json).map_err(|e| inv(e.to_string()))?;
    write("results.json", &json)?;
    let mut w = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| inv(format!("results.csv: {e}"));
    w.write_record([
        "method",
        "config",
        "seeds",
        "trainable_params",
        "trainable_pct",
        "accuracy_mean",
        "accuracy_std",
        "f1_mean",
        "f1_std",
        "train_s_mean",
        "step_ms_median_mean",
        "peak_rss_mb_max",
        "optimizer_state_bytes",
        "adapter_bytes",
        "optimizer_steps",
        "loadavg_mean",
        "optimizer_state_8bit_params",
        "optimizer_state_8bit_bytes",
    ])
    .map_err(csv_err)?;
    for r in rows {
        w.write_record([
            value_name(r.method),
            r.config.clone(),
            r.seeds.to_string(),
            r.trainable_params.to_string(),
            format!("{:.4}", r.trainable_pct),
            format!("{:.4}", r.accuracy_mean),
            format!("{:.4}", r.accuracy_std),
            format!("{:.4}", r.f1_mean),
            format!("{:.4}", r.f1_std),
            format!("{:.2}", r.train_s_mean),
            format!("{:.2}", r.step_ms_median_mean),
            format!("{:.1}", r.peak_rss_mb_max),
            r.optimizer_state_bytes.to_string(),
            r.adapter_bytes.to_string(),
            r.optimizer_steps
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            format!("{:.2}", r.loadavg_mean),
            r.optimizer_state_8bit.0.to_string(),
            r.optimizer_state_8bit.1.to_string(),
        ])
        .map_err(csv_err)?;
    }
    let csv = w.into_inner().map_err(|e| inv(format!("results.csv: {e}")))?;
    write("results.csv", &csv)?;
    let bars: Vec<plot::Bar> = rows
        .iter()
        .map(|r| plot::Bar {
            label: value_name(r.method),
            accuracy: (r.accuracy_mean, r.accuracy_std),
            train_s: r.train_s_mean,
            peak_mb: r.peak_rss_mb_max,
            trainable: r.trainable_params as f64,
        })
        .collect();
    let title = format!("peftk compare: {}", a.recipe_title());
    write("results.svg", plot::svg(&bars, &title)?.as_bytes())?;
    write("results.png", &plot::png(&bars, &title)?)?;
    Ok(())
}

impl Args {
    fn recipe_title(&self) -> String {
        let r = &self.recipe;
        let data = if r.data.is_empty() {
            "MiniLM-L6, train imdb+yelp, test amazon".to_string()
        } else {
            r.data
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join("+")
        };
        format!(
            "{data}; {} epochs, lr {}, {}, {} seed{}",
            r.epochs,
            r.lr,
            value_name(r.optim),
            self.seeds,
            if self.seeds > 1 { "s" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::state_cell;

    #[test]
    fn state_cell_shows_bytes_per_param() {
        assert_eq!(state_cell(8 * 1024, 1024, (0, 0)), "8.0 KiB (8.00 B/param)");
        // 1 Mi params in 8-bit state (2 B of codes + 8 B of block maxima per 256) and 1 Ki in f32.
        let n8 = 1 << 20;
        let b8 = 2 * n8 + 8 * n8 / 256;
        assert_eq!(
            state_cell(b8 + 8 * 1024, n8 + 1024, (n8, b8)),
            "2.04 MiB (2.04 B/param; 8-bit tensors 2.03 B/param)"
        );
    }
}
