//! `peftk finetune`, `peftk eval`, `peftk predict`: sequence classification with BERT checkpoints and
//! PEFT adapters, defaulting to the demo model (all-MiniLM-L6-v2) and task (Sentiment Labelled
//! Sentences: train imdb + yelp, test amazon) with QLoRA (NF4 with double quantization, r = 8 on every
//! linear, the classifier in `modules_to_save`).

use clap::{Args as ClapArgs, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use peft_kernels::autograd::ParamStore;
use peft_kernels::data::{self, Columns, Dataset, LabelMap};
use peft_kernels::io::peft::{
    AdapterConfig, LoraConfig, MethodConfig, TargetModules, VbLoraConfig, WaveFtConfig,
};
use peft_kernels::models::{
    self, BertBatch, BertForSequenceClassification, BertTokenizer, ModelLoadOptions, QuantizeOnLoad,
};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::quant::{QuantType, QuantizeOptions};
use peft_kernels::{Error, Result};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Adapter method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Classifier only (linear probe).
    Head,
    Lora,
    Dora,
    Waveft,
    Vblora,
}

/// Base-weight quantization on load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Quant {
    Nf4,
    Fp4,
    None,
}

/// Where the data comes from (shared by finetune / eval / predict).
#[derive(ClapArgs, Debug, Clone)]
pub struct DataArgs {
    /// Text column / JSON key.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Label column / JSON key (integers or names).
    #[arg(long, default_value = "class")]
    pub label_column: String,
    /// Maximum tokens per sequence (longer ones are truncated).
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
}

impl DataArgs {
    fn columns(&self) -> Columns {
        Columns {
            text: self.text_column.clone(),
            label: self.label_column.clone(),
        }
    }
}

/// `peftk finetune`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json); default: the demo MiniLM.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training files (.json/.jsonl/.csv/.tsv); default: the demo imdb + yelp.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Test file; default: the demo amazon set (or a `--split` of the training data).
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Hold out this fraction of the training data as the test set (seeded by --seed).
    #[arg(long)]
    pub split: Option<f64>,
    #[arg(long, value_enum, default_value = "lora")]
    pub method: Method,
    #[arg(long, value_enum, default_value = "nf4")]
    pub quantize: Quant,
    /// Double-quantize the 4-bit absmax (QLoRA).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
    /// Adapted linears (names or `.`-suffixes, comma separated).
    #[arg(long, value_delimiter = ',', default_value = "query,key,value,dense")]
    pub target_modules: Vec<String>,
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Linear warmup steps (then linear decay to 0, as transformers' default schedule).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use only the first N training examples (after shuffling by --seed).
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// Output directory: adapter (PEFT format), label_map.json, metrics.jsonl.
    #[arg(long, default_value = "peftk-out")]
    pub out: PathBuf,
    /// cpu (cuda needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// seq-cls (a BERT classifier) or causal-lm (a Llama/Mistral/Qwen2 decoder on a file of texts).
    #[arg(long, default_value = "seq-cls")]
    pub task: String,
}

fn inv(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// The demo directory: `$PEFT_KERNELS_DEMO_DIR` or `~/.cache/peft-kernels/demo`.
pub fn demo_dir() -> Result<PathBuf> {
    std::env::var_os("PEFT_KERNELS_DEMO_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/peft-kernels/demo")))
        .ok_or_else(|| inv("no demo directory: set PEFT_KERNELS_DEMO_DIR or HOME"))
}

fn model_dir(m: &Option<PathBuf>) -> Result<PathBuf> {
    match m {
        Some(p) => Ok(p.clone()),
        None => Ok(demo_dir()?.join("minilm")),
    }
}

pub fn check_device(d: &str) -> Result<()> {
    if d == "cpu" {
        Ok(())
    } else {
        Err(inv(format!(
            "--device {d}: only cpu is wired into finetune/eval/predict so far"
        )))
    }
}

/// The adapter config of a method (PEFT's SEQ_CLS task: the classifier in `modules_to_save`).
pub fn adapter_config(a: &Args) -> Option<AdapterConfig> {
    let method = match a.method {
        Method::Head => return None,
        Method::Lora | Method::Dora => MethodConfig::Lora(LoraConfig {
            r: a.r,
            lora_alpha: a.alpha,
            lora_dropout: a.dropout,
            use_dora: a.method == Method::Dora,
            ..Default::default()
        }),
        Method::Waveft => MethodConfig::WaveFt(WaveFtConfig {
            n_frequency: 1000,
            ..Default::default()
        }),
        Method::Vblora => MethodConfig::VbLora(VbLoraConfig {
            vector_length: 128,
            vblora_dropout: a.dropout,
            ..Default::default()
        }),
    };
    let mut c = AdapterConfig::new(method);
    c.task_type = Some("SEQ_CLS".into());
    c.target_modules = Some(TargetModules::Names(a.target_modules.clone()));
    c.modules_to_save = Some(vec!["classifier".into(), "score".into()]);
    Some(c)
}

pub fn load_opts(quant: Quant, double_quant: bool) -> ModelLoadOptions {
    let quantize = match quant {
        Quant::None => None,
        q => {
            let mut o = QuantizeOnLoad::nf4_dq_all_linear();
            o.options = QuantizeOptions {
                quant_type: if q == Quant::Fp4 {
                    QuantType::Fp4
                } else {
                    QuantType::Nf4
                },
                double_quant,
                ..o.options
            };
            Some(o)
        }
    };
    ModelLoadOptions {
        quantize,
        ..Default::default()
    }
}

/// Tokenized examples.
struct Encoded {
    ids: Vec<Vec<u32>>,
}

fn encode(tok: &BertTokenizer, ds: &Dataset, max_len: usize) -> Result<Encoded> {
    let mut ids = Vec::with_capacity(ds.len());
    for t in &ds.texts {
        ids.push(tok.encode(t, max_len)?.0);
    }
    Ok(Encoded { ids })
}

fn batch_of(enc: &Encoded, idx: &[usize], pad: u32) -> Result<BertBatch> {
    let seq = idx.iter().map(|&i| enc.ids[i].len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(idx.len());
    let mut mask = Vec::with_capacity(idx.len());
    for &i in idx {
        let r = &enc.ids[i];
        let mut row = r.clone();
        row.resize(seq, pad);
        let mut m = vec![1u8; r.len()];
        m.resize(seq, 0);
        ids.push(row);
        mask.push(m);
    }
    BertBatch::from_rows(&ids, &mask, None)
}

/// Class probabilities of every example (evaluation mode), in dataset order.
fn predict_probs(
    model: &BertForSequenceClassification,
    store: &ParamStore,
    enc: &Encoded,
    pad: u32,
    n_classes: usize,
) -> Result<Vec<Vec<f32>>> {
    let lengths: Vec<usize> = enc.ids.iter().map(Vec::len).collect();
    let mut out = vec![Vec::new(); lengths.len()];
    for idx in data::sorted_batches(&lengths, 64)? {
        let logits = model.logits(store, &batch_of(enc, &idx, pad)?)?.to_vec_f32()?;
        for (k, &i) in idx.iter().enumerate() {
            let row = &logits[k * n_classes..(k + 1) * n_classes];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = row.iter().map(|x| (x - m).exp()).collect();
            let s: f32 = e.iter().sum();
            out[i] = e.iter().map(|x| x / s).collect();
        }
    }
    Ok(out)
}

fn argmax(p: &[f32]) -> u32 {
    p.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0 as u32
}

/// (mean loss, accuracy, macro-F1).
fn evaluate(
    model: &BertForSequenceClassification,
    store: &ParamStore,
    enc: &Encoded,
    ds: &Dataset,
    pad: u32,
) -> Result<(f64, f64, f64)> {
    let n = ds.label_map.len();
    let probs = predict_probs(model, store, enc, pad, n)?;
    let pred: Vec<u32> = probs.iter().map(|p| argmax(p)).collect();
    let loss = probs
        .iter()
        .zip(&ds.labels)
        .map(|(p, &g)| -(p[g as usize].max(1e-12) as f64).ln())
        .sum::<f64>()
        / ds.len() as f64;
    let (acc, f1) = data::accuracy_f1(&pred, &ds.labels, n)?;
    Ok((loss, acc, f1))
}

/// Peak resident set (VmHWM) in MiB, 0 where /proc is missing.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn load_data(a: &Args) -> Result<(Dataset, Dataset)> {
    let cols = a.data_args.columns();
    let (train, test) = if a.data.is_empty() {
        let (tr, te) = data::demo_sentiment(demo_dir()?)?;
        if a.test.is_some() || a.split.is_some() {
            return Err(inv("--test/--split need --data"));
        }
        (tr, Some(te))
    } else {
        let tr = data::load_train_files(&a.data, &cols)?;
        let te = match &a.test {
            Some(t) => Some(data::load_with_map(t, &cols, &tr.label_map)?),
            None => None,
        };
        (tr, te)
    };
    let (train, test) = match (test, a.split) {
        (Some(_), Some(_)) => return Err(inv("give --test or --split, not both")),
        (Some(te), None) => (train, te),
        (None, Some(f)) => train.split(f, a.seed)?,
        (None, None) => {
            return Err(inv("no test data: give --test FILE or --split FRACTION"));
        }
    };
    let train = match a.limit {
        Some(n) if n < train.len() => {
            let mut idx: Vec<usize> = (0..train.len()).collect();
            data::shuffle(&mut idx, &mut peft_kernels::rng::Rng::new(a.seed ^ 0x5eed));
            train.subset(&idx[..n])
        }
        _ => train,
    };
    Ok((train, test))
}

/// Summary of a finished run (one line of `peftk compare`'s table).
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunSummary {
    pub accuracy: f64,
    pub f1: f64,
    pub train_s: f64,
    pub step_ms_median: f64,
    pub peak_rss_mb: f64,
    pub trainable_params: usize,
    pub adapter_bytes: u64,
}

pub fn run(a: Args) -> Result<()> {
    if a.task == "causal-lm" {
        return crate::causal_lm::run_finetune(&a);
    }
    let s = train(&a, None)?;
    println!("{}", serde_json::to_string(&s).unwrap_or_default());
    Ok(())
}

/// Trains, evaluating after every epoch; writes `out/metrics.jsonl`, the adapter and the label map.
pub fn train(a: &Args, stop: Option<Arc<AtomicBool>>) -> Result<RunSummary> {
    check_device(&a.device)?;
    let mdir = model_dir(&a.model)?;
    let (train, test) = load_data(a)?;
    let tok = BertTokenizer::from_file(mdir.join("tokenizer.json"))?;
    let pad = tok.pad_id();
    let (etr, ete) = (
        encode(&tok, &train, a.data_args.max_len)?,
        encode(&tok, &test, a.data_args.max_len)?,
    );
    let opts = load_opts(a.quantize, a.double_quant);
    let mut store = ParamStore::new();
    let n_labels = train.label_map.len();
    let mut model = load_classifier(&mdir, &opts, &mut store, a.seed, n_labels)?;
    let config = adapter_config(a);
    if let Some(c) = &config {
        model.init_adapter(c, &mut store, a.seed.wrapping_add(1))?;
    }
    let ids = model.param_ids();
    let trainable: usize = ids
        .iter()
        .map(|&id| store.get(id).map(|t| t.shape().iter().product::<usize>()))
        .sum::<Result<usize>>()?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: a.lr,
        weight_decay: a.weight_decay,
        ..Default::default()
    })?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::Io {
        path: PathBuf::from(&a.out),
        source: e,
    })?;
    let mpath = a.out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&mpath).map_err(|e| Error::Io {
        path: PathBuf::from(&mpath),
        source: e,
    })?;
    let stop = stop.unwrap_or_else(|| {
        let s = Arc::new(AtomicBool::new(false));
        let s2 = s.clone();
        // SIGINT / SIGTERM set the flag; the loop stops after the current step and saves.
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            if let Err(e) = signal_hook::flag::register(sig, s2.clone()) {
                eprintln!("peftk: warning: cannot install a signal handler ({e}); Ctrl-C will not save");
            }
        }
        s
    });
    let lengths: Vec<usize> = etr.ids.iter().map(Vec::len).collect();
    let steps_per_epoch = train.len().div_ceil(a.batch_size);
    let total = (steps_per_epoch * a.epochs).max(1);
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (mut step, mut train_s, mut step_ms) = (0usize, 0.0f64, Vec::new());
    let mut last = (0.0, 0.0, 0.0);
    'epochs: for epoch in 1..=a.epochs {
        let batches = data::bucketed_batches(&lengths, a.batch_size, 50, a.seed ^ (epoch as u64) << 32)?;
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        for idx in batches {
            let lr = schedule(a.lr, step, a.warmup, total);
            opt.set_lr(lr);
            let b = batch_of(&etr, &idx, pad)?;
            let labels: Vec<u32> = idx.iter().map(|&i| train.labels[i]).collect();
            let t = Instant::now();
            let loss = model.train_step(
                &mut store,
                &mut opt,
                &b,
                &labels,
                a.seed.wrapping_mul(1_000_003) + step as u64,
            )?;
            let dt = t.elapsed().as_secs_f64();
            train_s += dt;
            step_ms.push(dt * 1e3);
            step += 1;
            loss_sum += loss as f64 * idx.len() as f64;
            seen += idx.len();
            bar.inc(1);
            bar.set_message(format!(
                "epoch {epoch} loss {:.4} {:.1} samples/s",
                loss_sum / seen as f64,
                idx.len() as f64 / dt
            ));
            if stop.load(Ordering::SeqCst) {
                bar.println("interrupted: saving after the current step");
                let (l, acc, f1) = evaluate(&model, &store, &ete, &test, pad)?;
                last = (l, acc, f1);
                write_metrics(
                    &mut metrics,
                    epoch,
                    step,
                    loss_sum / seen as f64,
                    acc,
                    f1,
                    train_s,
                    &step_ms,
                    trainable,
                    &opt,
                    seen,
                )?;
                break 'epochs;
            }
        }
        let (_, acc, f1) = evaluate(&model, &store, &ete, &test, pad)?;
        last = (loss_sum / seen.max(1) as f64, acc, f1);
        bar.println(format!(
            "epoch {epoch}: train loss {:.4}, test accuracy {acc:.4}, macro-F1 {f1:.4}, {train_s:.1} s training",
            last.0
        ));
        write_metrics(
            &mut metrics,
            epoch,
            step,
            last.0,
            acc,
            f1,
            train_s,
            &step_ms,
            trainable,
            &opt,
            train.len(),
        )?;
    }
    bar.finish_and_clear();
    train.label_map.save(&a.out)?;
    let adapter_dir = a.out.join("adapter");
    let adapter_bytes = if let Some(c) = &config {
        model.save_adapter(c, &store, &adapter_dir)?;
        train.label_map.save(&adapter_dir)?;
        dir_bytes(&adapter_dir)
    } else {
        0
    };
    Ok(RunSummary {
        accuracy: last.1,
        f1: last.2,
        train_s,
        step_ms_median: median(&step_ms),
        peak_rss_mb: peak_rss_mb(),
        trainable_params: trainable,
        adapter_bytes,
    })
}

fn load_classifier(
    mdir: &Path,
    opts: &ModelLoadOptions,
    store: &mut ParamStore,
    seed: u64,
    n_labels: usize,
) -> Result<BertForSequenceClassification> {
    let m = models::from_pretrained_seq_cls(mdir, opts, store, seed)?;
    let have = m.bert().config().num_labels;
    if have != n_labels {
        return Err(inv(format!(
            "the data has {n_labels} labels but {} configures num_labels = {have}",
            mdir.join("config.json").display()
        )));
    }
    Ok(m)
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .map(|r| {
            r.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Linear warmup over `warmup` steps, then linear decay to 0 at `total` (transformers' "linear").
pub fn schedule(lr: f32, step: usize, warmup: usize, total: usize) -> f32 {
    if step < warmup {
        lr * (step + 1) as f32 / warmup as f32
    } else {
        lr * (total.saturating_sub(step)) as f32 / (total - warmup).max(1) as f32
    }
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

#[allow(clippy::too_many_arguments)]
fn write_metrics(
    f: &mut std::fs::File,
    epoch: usize,
    step: usize,
    loss: f64,
    acc: f64,
    f1: f64,
    train_s: f64,
    step_ms: &[f64],
    trainable: usize,
    opt: &AdamW,
    samples: usize,
) -> Result<()> {
    let line = json!({
        "epoch": epoch, "step": step, "loss": loss, "accuracy": acc, "f1": f1, "train_s": train_s,
        "step_ms_median": median(step_ms), "samples_per_s": samples as f64 * epoch as f64 / train_s.max(1e-9),
        "peak_rss_mb": peak_rss_mb(), "trainable_params": trainable, "optimizer_state_bytes": opt.state_bytes(),
    });
    writeln!(f, "{line}").map_err(|e| Error::Io {
        path: PathBuf::from("metrics.jsonl"),
        source: e,
    })
}

/// `peftk eval`.
#[derive(ClapArgs, Debug, Clone)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Adapter directory (with label_map.json); a classifier needs the adapter that carries its head.
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "seq-cls")]
    pub task: String,
    #[arg(long, value_enum, default_value = "nf4")]
    pub quantize: Quant,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// One JSON line `{"n", "loss", "accuracy", "f1"}`.
    #[arg(long)]
    pub json: bool,
}

fn load_trained(
    model: &Option<PathBuf>,
    adapter: &Path,
    quant: Quant,
) -> Result<(BertForSequenceClassification, ParamStore, BertTokenizer, LabelMap)> {
    let mdir = model_dir(model)?;
    let label_map = LabelMap::load(adapter)?;
    let mut store = ParamStore::new();
    let mut m = load_classifier(&mdir, &load_opts(quant, true), &mut store, 0, label_map.len())?;
    m.load_adapter(adapter, &mut store)?;
    Ok((
        m,
        store,
        BertTokenizer::from_file(mdir.join("tokenizer.json"))?,
        label_map,
    ))
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    if a.task == "causal-lm" {
        return crate::causal_lm::run_eval(&a);
    }
    if a.task != "seq-cls" {
        return Err(inv(format!("--task {}: only seq-cls is implemented", a.task)));
    }
    let (m, store, tok, map) = load_trained(&a.model, &a.adapter, a.quantize)?;
    let ds = data::load_with_map(&a.data, &a.data_args.columns(), &map)?;
    let enc = encode(&tok, &ds, a.data_args.max_len)?;
    let (loss, acc, f1) = evaluate(&m, &store, &enc, &ds, tok.pad_id())?;
    if a.json {
        println!(
            "{}",
            json!({"n": ds.len(), "loss": loss, "accuracy": acc, "f1": f1})
        );
    } else {
        println!(
            "n {}  loss {loss:.4}  accuracy {acc:.4}  macro-F1 {f1:.4}",
            ds.len()
        );
    }
    Ok(())
}

/// `peftk predict`.
#[derive(ClapArgs, Debug, Clone)]
pub struct PredictArgs {
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub adapter: PathBuf,
    /// Texts to classify.
    pub text: Vec<String>,
    /// A data file instead (its text column; labels are ignored).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "nf4")]
    pub quantize: Quant,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// One JSON line per input: `{"text", "label", "prob"}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run_predict(a: PredictArgs) -> Result<()> {
    let (m, store, tok, map) = load_trained(&a.model, &a.adapter, a.quantize)?;
    let texts: Vec<String> = match &a.data {
        Some(p) => data::read_records(p, &a.data_args.columns())?
            .into_iter()
            .map(|r| r.text)
            .collect(),
        None => a.text.clone(),
    };
    if texts.is_empty() {
        return Err(inv("nothing to predict: give TEXT... or --data FILE"));
    }
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(inv(format!("input {} is empty", i + 1)));
    }
    let ds = Dataset {
        labels: vec![0; texts.len()],
        texts,
        label_map: map.clone(),
    };
    let enc = encode(&tok, &ds, a.data_args.max_len)?;
    let probs = predict_probs(&m, &store, &enc, tok.pad_id(), map.len())?;
    for (t, p) in ds.texts.iter().zip(&probs) {
        let k = argmax(p);
        let label = map.name(k).unwrap_or("?");
        if a.json {
            println!("{}", json!({"text": t, "label": label, "prob": p[k as usize]}));
        } else {
            println!("{label}\t{:.4}\t{t}", p[k as usize]);
        }
    }
    Ok(())
}
