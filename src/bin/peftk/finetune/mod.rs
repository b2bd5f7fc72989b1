//! `peftk finetune`, `peftk eval`, `peftk predict`: sequence classification with BERT checkpoints and
//! PEFT adapters, defaulting to the demo model (all-MiniLM-L6-v2) and task (Sentiment Labelled
//! Sentences: train imdb + yelp, test amazon) with QLoRA (NF4 with double quantization, r = 8 on every
//! linear, the classifier in `modules_to_save`).

use clap::{Args as ClapArgs, ValueEnum};
use peft_kernels::autograd::ParamStore;
use peft_kernels::data::{self, Columns, Dataset, LabelMap};
use peft_kernels::io::peft::{
    AdapterConfig, LoraConfig, MethodConfig, TargetModules, VbLoraConfig, WaveFtConfig,
};
use peft_kernels::models::{
    self, BertBatch, BertForSequenceClassification, BertTokenizer, ModelLoadOptions, QuantizeOnLoad,
};
use peft_kernels::quant::{QuantType, QuantizeOptions};
use peft_kernels::{Error, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

pub(crate) mod train;
pub use train::{RunSummary, SUMMARY_FILE, median, run, train};

/// Adapter method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Classifier only (linear probe).
    Head,
    Lora,
    Dora,
    Waveft,
    Vblora,
    /// LoRA with per-layer base bit-widths and ranks from a `peftk qr-adapt` search (`--qr-config`).
    #[value(name = "qr-adaptor")]
    QrAdaptor,
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

/// Optimizer (`--optim`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimArg {
    /// torch.optim.AdamW (f32 moments, 8 bytes per trainable parameter).
    Adamw,
    /// bitsandbytes AdamW8bit (blockwise 8-bit moments, ~2 bytes per parameter of large tensors).
    #[value(name = "adamw8bit")]
    Adamw8bit,
}

/// Learning-rate schedule (`--schedule`), after `--warmup` steps of linear warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

/// The training recipe: everything `peftk finetune` and `peftk compare` share.
#[derive(ClapArgs, Debug, Clone)]
pub struct Recipe {
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
    /// Examples per micro-batch (one forward/backward).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Linear warmup over this many optimizer steps (transformers' schedules: step k of the warmup runs
    /// at lr·k/warmup).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// After the warmup: constant, linear decay to 0 at the last step (transformers' default), or a
    /// half cosine to 0.
    #[arg(long, value_enum, default_value = "linear")]
    pub schedule: ScheduleArg,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// adamw (f32 state) or adamw8bit (bitsandbytes' blockwise 8-bit state).
    #[arg(long, value_enum, default_value = "adamw")]
    pub optim: OptimArg,
    /// Micro-batches per optimizer step (their gradients are averaged; an epoch's last step may average
    /// fewer).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the global L2 norm of the gradients to this value before each optimizer step.
    #[arg(long)]
    pub grad_clip: Option<f32>,
    /// CUDA: optimizer state in unified (paged) memory. With --device cpu the state is host memory
    /// already: accepted, no effect.
    #[arg(long)]
    pub paged: bool,
    /// CUDA: optimizer state and f32 master weights on the host, the update on the CPU. With --device
    /// cpu: accepted, no effect.
    #[arg(long)]
    pub offload_optimizer: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use only the first N training examples (after shuffling by --seed).
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// cpu (cuda needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl Recipe {
    /// The recipe as `peftk finetune` flags (how `peftk compare` passes it to each run).
    pub fn to_cli_args(&self) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = Vec::new();
        let mut put = |k: &str, val: String| {
            v.push(k.into());
            v.push(val.into());
        };
        if let Some(m) = &self.model {
            put("--model", m.display().to_string());
        }
        if let Some(t) = &self.test {
            put("--test", t.display().to_string());
        }
        if let Some(f) = self.split {
            put("--split", f.to_string());
        }
        put("--target-modules", self.target_modules.join(","));
        put("--r", self.r.to_string());
        put("--alpha", self.alpha.to_string());
        put("--dropout", self.dropout.to_string());
        put("--epochs", self.epochs.to_string());
        put("--batch-size", self.batch_size.to_string());
        put("--lr", self.lr.to_string());
        put("--warmup", self.warmup.to_string());
        put("--schedule", value_name(self.schedule));
        put("--weight-decay", self.weight_decay.to_string());
        put("--optim", value_name(self.optim));
        put("--grad-accum", self.grad_accum.to_string());
        if let Some(c) = self.grad_clip {
            put("--grad-clip", c.to_string());
        }
        put("--seed", self.seed.to_string());
        if let Some(n) = self.limit {
            put("--limit", n.to_string());
        }
        put("--text-column", self.data_args.text_column.clone());
        put("--label-column", self.data_args.label_column.clone());
        put("--max-len", self.data_args.max_len.to_string());
        put("--device", self.device.clone());
        if self.paged {
            v.push("--paged".into());
        }
        if self.offload_optimizer {
            v.push("--offload-optimizer".into());
        }
        if !self.data.is_empty() {
            v.push("--data".into());
            v.extend(self.data.iter().map(|p| p.as_os_str().to_owned()));
        }
        v
    }
}

/// The CLI spelling of a value.
pub fn value_name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// `peftk finetune`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    #[arg(long, value_enum, default_value = "lora")]
    pub method: Method,
    #[arg(long, value_enum, default_value = "nf4")]
    pub quantize: Quant,
    /// Double-quantize the 4-bit absmax (QLoRA).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
    #[command(flatten)]
    pub recipe: Recipe,
    /// Output directory: adapter (PEFT format), label_map.json, metrics.jsonl, checkpoint/ (parameters
    /// and optimizer state after each epoch, for --resume).
    #[arg(long, default_value = "peftk-out")]
    pub out: PathBuf,
    /// Continue from a checkpoint directory (OUT/checkpoint of an earlier run with the same recipe):
    /// parameters, optimizer state, schedule position and data position are restored, so the result
    /// equals an uninterrupted run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop after this many optimizer steps in total (as Ctrl-C would: evaluate, save the adapter and
    /// a checkpoint).
    #[arg(long)]
    pub stop_after_steps: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// seq-cls (a BERT classifier) or causal-lm (a Llama/Mistral/Qwen2 decoder on a file of texts).
    #[arg(long, default_value = "seq-cls")]
    pub task: String,
    /// `--method qr-adaptor`: the `qr_adaptor.json` of a `peftk qr-adapt` search (per-linear bits and ranks).
    #[arg(long)]
    pub qr_config: Option<PathBuf>,
    /// Compute dtype of the products with frozen weights (base linears, LM head) on the CPU: `f32`, or
    /// `bf16` (operands rounded to bf16, f32 accumulation, AVX512_BF16 where available, no faster than
    /// f32 on AVX2-only CPUs; the numerics of
    /// `bnb_4bit_compute_dtype=torch.bfloat16`). Adapters, attention, norms and the loss stay f32.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub compute_dtype: String,
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

pub(crate) fn model_dir(m: &Option<PathBuf>) -> Result<PathBuf> {
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
pub fn adapter_config(method: Method, a: &Recipe) -> Option<AdapterConfig> {
    let config = match method {
        Method::Head | Method::QrAdaptor => return None,
        Method::Lora | Method::Dora => MethodConfig::Lora(LoraConfig {
            r: a.r,
            lora_alpha: a.alpha,
            lora_dropout: a.dropout,
            use_dora: method == Method::Dora,
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
    let mut c = AdapterConfig::new(config);
    c.task_type = Some("SEQ_CLS".into());
    c.target_modules = Some(TargetModules::Names(a.target_modules.clone()));
    c.modules_to_save = Some(vec!["classifier".into(), "score".into()]);
    Some(c)
}

/// The base matmul algorithm of `--compute-dtype`.
pub fn compute_algo(a: &Args) -> peft_kernels::qmatmul::Algo {
    if a.compute_dtype == "bf16" {
        peft_kernels::qmatmul::Algo::Bf16
    } else {
        peft_kernels::qmatmul::Algo::Auto
    }
}

/// The load options and adapter config of a run (`qr-adaptor`: from its `--qr-config`).
pub fn setup(a: &Args) -> Result<(ModelLoadOptions, Option<AdapterConfig>)> {
    let algo = compute_algo(a);
    if a.method == Method::QrAdaptor {
        let (opts, c) = crate::qr_adapt::finetune_setup(a)?;
        return Ok((ModelLoadOptions { algo, ..opts }, c));
    }
    Ok((
        ModelLoadOptions {
            algo,
            ..load_opts(a.quantize, a.double_quant)
        },
        adapter_config(a.method, &a.recipe),
    ))
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
pub(crate) struct Encoded {
    pub(crate) ids: Vec<Vec<u32>>,
}

pub(crate) fn encode(tok: &BertTokenizer, ds: &Dataset, max_len: usize) -> Result<Encoded> {
    let mut ids = Vec::with_capacity(ds.len());
    for t in &ds.texts {
        ids.push(tok.encode(t, max_len)?.0);
    }
    Ok(Encoded { ids })
}

/// A right-padded batch of the encoded texts `idx` (mask 1 on the tokens, 0 on the padding): the
/// classifier's and the causal LM's batches alike.
pub(crate) fn padded_batch(enc: &[Vec<u32>], idx: &[usize], pad: u32) -> Result<BertBatch> {
    let seq = idx.iter().map(|&i| enc[i].len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(idx.len());
    let mut mask = Vec::with_capacity(idx.len());
    for &i in idx {
        let r = &enc[i];
        let mut row = r.clone();
        row.resize(seq, pad);
        let mut m = vec![1u8; r.len()];
        m.resize(seq, 0);
        ids.push(row);
        mask.push(m);
    }
    BertBatch::from_rows(&ids, &mask, None)
}

pub(crate) fn batch_of(enc: &Encoded, idx: &[usize], pad: u32) -> Result<BertBatch> {
    padded_batch(&enc.ids, idx, pad)
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

pub(crate) fn load_data(a: &Recipe) -> Result<(Dataset, Dataset)> {
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

pub(crate) fn load_classifier(
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

/// How eval and predict load the trained model's base (flattened into both).
#[derive(ClapArgs, Debug, Clone)]
pub struct BaseArgs {
    #[arg(long, value_enum, default_value = "nf4")]
    pub quantize: Quant,
    /// A `qr_adaptor.json` (per-linear bit-widths, embedding storage) to load the base with; default:
    /// the one `--method qr-adaptor` saves in the adapter directory, if any.
    #[arg(long)]
    pub qr_config: Option<PathBuf>,
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
    #[command(flatten)]
    pub base: BaseArgs,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// One JSON line `{"n", "loss", "accuracy", "f1"}`.
    #[arg(long)]
    pub json: bool,
}

fn load_trained(
    model: &Option<PathBuf>,
    adapter: &Path,
    base: &BaseArgs,
) -> Result<(BertForSequenceClassification, ParamStore, BertTokenizer, LabelMap)> {
    let mdir = model_dir(model)?;
    let label_map = LabelMap::load(adapter)?;
    let mut store = ParamStore::new();
    let qr = crate::qr_adapt::adapter_config(adapter, base.qr_config.as_deref())?;
    let opts = match &qr {
        Some(qc) => crate::qr_adapt::load_opts(qc, base.quantize),
        None => load_opts(base.quantize, true),
    };
    let mut m = load_classifier(&mdir, &opts, &mut store, 0, label_map.len())?;
    if let Some(qc) = &qr {
        crate::qr_adapt::apply_to_model(qc, &mut m)?;
    }
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
    let (m, store, tok, map) = load_trained(&a.model, &a.adapter, &a.base)?;
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
    #[command(flatten)]
    pub base: BaseArgs,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// One JSON line per input: `{"text", "label", "prob"}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run_predict(a: PredictArgs) -> Result<()> {
    let (m, store, tok, map) = load_trained(&a.model, &a.adapter, &a.base)?;
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
