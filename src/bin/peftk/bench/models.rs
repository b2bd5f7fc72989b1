//! `peftk bench` model rows: one training step of all-MiniLM-L6-v2 as a sequence classifier on the demo
//! sentiment data, exactly as the default `peftk finetune` run trains it: adapters r = 8 (alpha 16,
//! dropout 0.1) on every `query`, `key`, `value` and `dense` linear, the classifier trained, f32, AdamW
//! (weight decay 0.01), sentences truncated to 64 tokens, batches of 16 drawn the way training draws
//! them (length-bucketed, padded per batch, the padding packed out of every per-token op):
//! `train_step/minilm/{lora,qlora,dora}/b16` (QLoRA: NF4 with double quantization, quantized on load).
//!
//! The batches are fixed: the training loop's first epoch (seed 0) sorted by real-token count and
//! sampled at evenly spaced quantiles, so a row's median step is the step time of the epoch's median
//! batch and repeats from run to run; `tokens_median` is that batch's real-token count. The methods run
//! interleaved (one step of each per round, the same batch in a round), so load that other processes
//! put on the cores hits all of them alike, and the `train_step_ratio` line (QLoRA / LoRA, DoRA / LoRA
//! of the medians) compares them within one run. Each row reports wall-clock and CPU time (user + sys of
//! the whole process, all threads) and minor page faults per step: under load the CPU time is the
//! stable one. Each line also reports the step's memory breakdown
//! (`BertForSequenceClassification::memory_report`). Without the demo (`scripts/fetch-demo.sh`) the rows
//! print one `skipped` line.

use peft_kernels::autograd::ParamStore;
use peft_kernels::data;
use peft_kernels::io::peft::{AdapterConfig, LoraConfig, MethodConfig, TargetModules};
use peft_kernels::models::{
    self, BertBatch, BertForSequenceClassification, BertTokenizer, ModelLoadOptions, QuantizeOnLoad,
};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::{Device, Error, Result};
use std::io::Write;
use std::time::Instant;

/// The methods, in row order.
const METHODS: [&str; 3] = ["lora", "qlora", "dora"];
const BATCH: usize = 16;
/// `peftk finetune --max-len`'s default.
const MAX_LEN: usize = 64;
/// `peftk finetune --seed`'s default.
const SEED: u64 = 0;

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

/// `n` batches of the training loop's first epoch (`peftk finetune`'s batching and seed), at evenly
/// spaced quantiles of their real-token count (in that order), with their labels.
fn batches(root: &std::path::Path, n: usize) -> Result<Vec<(BertBatch, Vec<u32>)>> {
    let tok = BertTokenizer::from_file(root.join("minilm/tokenizer.json"))?;
    let (train, _) = data::demo_sentiment(root)?;
    let enc = crate::finetune::encode(&tok, &train, MAX_LEN)?;
    let lengths: Vec<usize> = enc.ids.iter().map(Vec::len).collect();
    let mut epoch = data::bucketed_batches(&lengths, BATCH, 50, SEED ^ (1u64 << 32))?;
    let real = |idx: &[usize]| idx.iter().map(|&i| lengths[i]).sum::<usize>();
    epoch.sort_by_key(|idx| real(idx));
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let idx = &epoch[((2 * k + 1) * epoch.len() / (2 * n)).min(epoch.len() - 1)];
        let labels = idx.iter().map(|&i| train.labels[i]).collect();
        out.push((crate::finetune::batch_of(&enc, idx, tok.pad_id())?, labels));
    }
    Ok(out)
}

fn write(out: &mut impl Write, line: serde_json::Value) -> Result<()> {
    writeln!(out, "{line}").map_err(|e| Error::Io {
        path: "stdout".into(),
        source: e,
    })
}

/// (CPU time in ms (user + sys, every thread), minor page faults) this process has used so far; zeros
/// where they cannot be read.
fn usage() -> (f64, f64) {
    #[cfg(target_os = "linux")]
    {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `ru` is a valid, writable `rusage`; getrusage only writes it.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0 {
            // SAFETY: getrusage returned 0, so it filled the struct (it was zeroed before anyway).
            let ru = unsafe { ru.assume_init() };
            let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
            return (ms(ru.ru_utime) + ms(ru.ru_stime), ru.ru_minflt as f64);
        }
    }
    (0.0, 0.0)
}

/// The median (upper middle) of `v`, 0 for none.
fn median(v: &[f64]) -> f64 {
    crate::finetune::median(v)
}

/// Two decimals.
fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One method's model and state, and its measurements.
struct Run {
    method: &'static str,
    model: BertForSequenceClassification,
    store: ParamStore,
    opt: AdamW,
    wall_ms: Vec<f64>,
    cpu_ms: Vec<f64>,
    faults: Vec<f64>,
}

impl Run {
    fn new(root: &std::path::Path, method: &'static str) -> Result<Run> {
        let opts = ModelLoadOptions {
            quantize: (method == "qlora").then(QuantizeOnLoad::nf4_dq_all_linear),
            ..Default::default()
        };
        let mut store = ParamStore::new();
        let mut model = models::from_pretrained_seq_cls(root.join("minilm"), &opts, &mut store, SEED)?;
        model.init_adapter(&adapter_config(method == "dora"), &mut store, SEED + 1)?;
        let opt = AdamW::new(AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        })?;
        Ok(Run {
            method,
            model,
            store,
            opt,
            wall_ms: Vec::new(),
            cpu_ms: Vec::new(),
            faults: Vec::new(),
        })
    }

    /// One training step on `(b, labels)`; records its times when `record`.
    fn step(&mut self, (b, labels): &(BertBatch, Vec<u32>), seed: u64, record: bool) -> Result<()> {
        let (u0, t0) = (usage(), Instant::now());
        self.model
            .train_step(&mut self.store, &mut self.opt, b, labels, seed)?;
        if record {
            let u1 = usage();
            self.wall_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            self.cpu_ms.push(u1.0 - u0.0);
            self.faults.push(u1.1 - u0.1);
        }
        Ok(())
    }
}

/// Runs the rows `filter` selects (all without a filter) on the CPU, one JSON line each, then the
/// ratio line when LoRA and another method ran.
pub fn run(device: Device, quick: bool, filter: Option<&regex::Regex>, out: &mut impl Write) -> Result<()> {
    let methods: Vec<&'static str> = METHODS
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
    let data = batches(&root, iters)?;
    // The warm-up rounds run the median batch (they touch every buffer size a median step needs).
    let mid = &data[iters / 2];
    let mut runs = methods
        .iter()
        .map(|m| Run::new(&root, m))
        .collect::<Result<Vec<_>>>()?;
    for round in 0..warmup + iters {
        let (batch, record) = match round.checked_sub(warmup) {
            Some(i) => (&data[i], true),
            None => (mid, false),
        };
        for r in &mut runs {
            r.step(batch, round as u64 + 1, record)?;
        }
    }
    let tokens: Vec<f64> = data.iter().map(|(b, _)| b.num_tokens() as f64).collect();
    let padded: Vec<f64> = data.iter().map(|(b, _)| (b.batch * b.seq) as f64).collect();
    let mb = |b: usize| r2(b as f64 / 1e6);
    for r in &runs {
        let mem = r.model.memory_report(&r.store, &mid.0)?;
        let min = r.wall_ms.iter().copied().fold(f64::INFINITY, f64::min);
        write(
            out,
            serde_json::json!({
                "op": "train_step", "device": device.to_string(), "model": "minilm", "method": r.method,
                "name": name(r.method), "batch": BATCH, "max_len": MAX_LEN, "steps": iters,
                "tokens_median": median(&tokens), "padded_tokens_median": median(&padded),
                "tokens_min": tokens.first(), "tokens_max": tokens.last(),
                "median_ms": r2(median(&r.wall_ms)), "min_ms": r2(min),
                "cpu_ms_median": r2(median(&r.cpu_ms)), "page_faults_median": median(&r.faults),
                "weights_mb": mb(mem.weights), "trainable_mb": mb(mem.trainable),
                "gradients_mb": mb(mem.gradients), "optimizer_state_mb": mb(mem.optimizer_state),
                "activations_mb": mb(mem.activations),
            }),
        )?;
    }
    if let Some(base) = runs.iter().find(|r| r.method == "lora") {
        let mut line = serde_json::json!({"op": "train_step_ratio", "model": "minilm", "of": "median_ms"});
        let (bw, bc) = (median(&base.wall_ms), median(&base.cpu_ms));
        for r in runs.iter().filter(|r| r.method != "lora") {
            line[format!("{}/lora", r.method)] = r2(median(&r.wall_ms) / bw).into();
            line[format!("{}/lora_cpu", r.method)] = r2(median(&r.cpu_ms) / bc).into();
        }
        if runs.len() > 1 {
            write(out, line)?;
        }
    }
    Ok(())
}
