//! `peftk bench` model rows: one training step of all-MiniLM-L6-v2 as a sequence classifier on the demo
//! sentiment data (batch 16 of the first imdb + yelp sentences, max 64 tokens, padded per batch),
//! adapters r = 8 (alpha 16, dropout 0.1) on every `query`, `key`, `value` and `dense` linear, the
//! classifier trained, f32, AdamW: `train_step/minilm/{lora,qlora,dora}/b16` (QLoRA: NF4 with double
//! quantization, quantized on load). Each line also reports the step's memory breakdown
//! (`BertForSequenceClassification::memory_report`). The batches rotate through the data so that the
//! median covers a spread of sequence lengths. Without the demo (`scripts/fetch-demo.sh`) the rows print
//! one `skipped` line.

use super::harness::time_stats_us;
use peft_kernels::autograd::ParamStore;
use peft_kernels::io::peft::{AdapterConfig, LoraConfig, MethodConfig, TargetModules};
use peft_kernels::models::{self, BertBatch, BertTokenizer, ModelLoadOptions, QuantizeOnLoad};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::{Device, Error, Result};
use std::io::Write;

/// The methods, in row order.
const METHODS: [&str; 3] = ["lora", "qlora", "dora"];
const BATCH: usize = 16;
const MAX_LEN: usize = 64;

/// The row name of `method`.
fn name(method: &str) -> String {
    format!("train_step/minilm/{method}/b{BATCH}")
}

/// Whether `filter` selects any model row.
pub fn any_match(filter: &regex::Regex) -> bool {
    METHODS.iter().any(|m| filter.is_match(&name(m)))
}

fn adapter_config(dora: bool) -> AdapterConfig {
    let mut c = AdapterConfig::new(MethodConfig::Lora(LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.1,
        use_dora: dora,
        ..Default::default()
    }));
    c.task_type = Some("SEQ_CLS".into());
    c.target_modules = Some(TargetModules::Names(
        ["query", "key", "value", "dense"].map(String::from).to_vec(),
    ));
    c.modules_to_save = Some(vec!["classifier".into(), "score".into()]);
    c
}

/// Batches of `BATCH` training sentences with their labels.
fn batches(root: &std::path::Path, n: usize) -> Result<Vec<(BertBatch, Vec<u32>)>> {
    let tok = BertTokenizer::from_file(root.join("minilm/tokenizer.json"))?;
    let (train, _) = peft_kernels::data::demo_sentiment(root)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let lo = (i * BATCH) % train.len().saturating_sub(BATCH).max(1);
        let hi = (lo + BATCH).min(train.len());
        let texts = &train.texts[lo..hi];
        let labels = train.labels[lo..hi].to_vec();
        out.push((tok.encode_batch(texts, MAX_LEN)?, labels));
    }
    Ok(out)
}

fn write(out: &mut impl Write, line: serde_json::Value) -> Result<()> {
    writeln!(out, "{line}").map_err(|e| Error::Io {
        path: "stdout".into(),
        source: e,
    })
}

/// Runs the rows `filter` selects (all without a filter) on the CPU, one JSON line each.
pub fn run(device: Device, quick: bool, filter: Option<&regex::Regex>, out: &mut impl Write) -> Result<()> {
    let methods: Vec<&str> = METHODS
        .into_iter()
        .filter(|m| filter.is_none_or(|f| f.is_match(&name(m))))
        .collect();
    if methods.is_empty() {
        return Ok(());
    }
    let skip = |why: String| serde_json::json!({"op": "train_step", "model": "minilm", "skipped": why});
    if !device.is_cpu() {
        return write(out, skip("the model rows run on the CPU only".into()));
    }
    let root = crate::finetune::demo_dir()?;
    if !root.join("minilm/model.safetensors").exists() || !root.join("sentiment/imdb.json").exists() {
        return write(
            out,
            skip(format!(
                "no demo model/data under {} (run scripts/fetch-demo.sh)",
                root.display()
            )),
        );
    }
    let (warmup, iters) = if quick { (1, 5) } else { (2, 15) };
    let data = batches(&root, warmup + iters)?;
    for method in methods {
        let opts = ModelLoadOptions {
            quantize: (method == "qlora").then(QuantizeOnLoad::nf4_dq_all_linear),
            ..Default::default()
        };
        let mut store = ParamStore::new();
        let mut model = models::from_pretrained_seq_cls(root.join("minilm"), &opts, &mut store, 0)?;
        model.init_adapter(&adapter_config(method == "dora"), &mut store, 1)?;
        let mut opt = AdamW::new(AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        })?;
        let mem = model.memory_report(&store, &data[0].0)?;
        let mut step = 0usize;
        let (us, min_us) = time_stats_us(device, warmup, iters, || {
            let (b, labels) = &data[step % data.len()];
            step += 1;
            model
                .train_step(&mut store, &mut opt, b, labels, step as u64)
                .map(|_| ())
        })?;
        let tokens: usize = data.iter().map(|(b, _)| b.num_tokens()).sum::<usize>() / data.len();
        let mb = |b: usize| (b as f64 / 1e4).round() / 100.0;
        write(
            out,
            serde_json::json!({
                "op": "train_step", "device": device.to_string(), "model": "minilm", "method": method,
                "name": name(method), "batch": BATCH, "max_len": MAX_LEN, "mean_real_tokens": tokens,
                "median_ms": (us / 10.0).round() / 100.0, "min_ms": (min_us / 10.0).round() / 100.0,
                "weights_mb": mb(mem.weights), "trainable_mb": mb(mem.trainable),
                "gradients_mb": mb(mem.gradients), "optimizer_state_mb": mb(mem.optimizer_state),
                "activations_mb": mb(mem.activations),
            }),
        )?;
    }
    Ok(())
}
