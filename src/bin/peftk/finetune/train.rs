//! The training loop of `peftk finetune` for sequence classification, and the task-independent pieces
//! a causal-LM loop can share: the optimizer configuration from the recipe, gradient accumulation
//! across micro-batches, and checkpoints for `--resume`.
//!
//! A checkpoint (`OUT/checkpoint/`, written after every epoch and when a run is stopped) holds every
//! trainable parameter (`params.safetensors`), the optimizer state and schedule position
//! (`optimizer.safetensors` + `optimizer.json`, [`Optimizer::save`]) and, in the JSON's `extra`, the
//! data position (epoch, batch) and the recipe it belongs to. It is written into `checkpoint.tmp/` and
//! then renamed into place, so a crash leaves either the old or the new checkpoint whole. Dropout
//! masks and batch order are functions of the seed, the epoch and the micro-batch index, so a resumed
//! run repeats the uninterrupted one bit for bit on the CPU.

use super::{
    Args, OptimArg, Recipe, ScheduleArg, batch_of, check_device, encode, evaluate, inv, load_classifier,
    load_data, model_dir, peak_rss_mb, value_name,
};
use indicatif::{ProgressBar, ProgressStyle};
use peft_kernels::autograd::{Gradients, ParamId, ParamStore, Tape};
use peft_kernels::data;
use peft_kernels::io::{SafetensorsFile, TensorBytes, write_safetensors};
use peft_kernels::models::{BertBatch, BertForSequenceClassification, BertTokenizer};
use peft_kernels::optim::{
    AdamWConfig, META_FILE, OptimConfig, OptimKind, Optimizer, Schedule, ScheduleKind,
};
use peft_kernels::{Device, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Summary of a finished run: the last JSON line `peftk finetune` prints (one row of `peftk compare`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    pub accuracy: f64,
    pub f1: f64,
    pub train_s: f64,
    pub step_ms_median: f64,
    pub peak_rss_mb: f64,
    pub trainable_params: usize,
    /// Every parameter of the model, frozen and trainable (4-bit weights count as their element count).
    pub total_params: usize,
    pub optimizer_state_bytes: usize,
    /// Parameters in 8-bit optimizer state (AdamW8bit, tensors of at least `min_8bit_size`) and the
    /// bytes of their state (included in `optimizer_state_bytes`).
    #[serde(default)]
    pub optimizer_state_8bit: (usize, usize),
    pub adapter_bytes: u64,
    pub optimizer_steps: u64,
    /// The 1-minute load average, mean of the run's start and end (other processes share the cores).
    #[serde(default)]
    pub loadavg_1m: f64,
}

/// The summary file a run leaves in its output directory (`peftk compare --reuse` reads it).
pub const SUMMARY_FILE: &str = "summary.json";

/// The 1-minute load average (0 where /proc is missing).
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `peftk finetune`: trains, then prints the [`RunSummary`] as one JSON line (also written to
/// `OUT/summary.json`).
pub fn run(a: Args) -> Result<()> {
    if a.task == "causal-lm" {
        return crate::causal_lm::run_finetune(&a);
    }
    let s = train(&a, None)?;
    let line = serde_json::to_string(&s).map_err(|e| inv(e.to_string()))?;
    peft_kernels::io::atomic_write(a.out.join(SUMMARY_FILE), line.as_bytes())?;
    println!("{line}");
    Ok(())
}

/// The checkpoint directory of an output directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
const PARAMS_FILE: &str = "params.safetensors";

/// Where the run stands: the next micro-batch to train and the running totals of the metrics.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Progress {
    /// The epoch in progress (1-based).
    pub(crate) epoch: usize,
    /// Micro-batches of that epoch already trained.
    pub(crate) batch: usize,
    /// Micro-batches trained in all (the dropout seed of the next one).
    pub(crate) micro: u64,
    pub(crate) loss_sum: f64,
    pub(crate) seen: usize,
    /// Examples trained in all.
    pub(crate) samples: usize,
    pub(crate) train_s: f64,
    pub(crate) step_ms: Vec<f64>,
}

impl Progress {
    pub(crate) fn start() -> Self {
        Progress {
            epoch: 1,
            batch: 0,
            micro: 0,
            loss_sum: 0.0,
            seen: 0,
            samples: 0,
            train_s: 0.0,
            step_ms: Vec::new(),
        }
    }

    /// Books one trained micro-batch: `dt` seconds, its mean `loss` over `n` examples, `next_batch` the
    /// epoch's next batch index.
    pub(crate) fn record_micro(&mut self, next_batch: usize, dt: f64, loss: f32, n: usize) {
        self.train_s += dt;
        self.step_ms.push(dt * 1e3);
        self.micro += 1;
        self.batch = next_batch;
        self.loss_sum += loss as f64 * n as f64;
        self.seen += n;
        self.samples += n;
    }

    /// Moves to the start of the next epoch (the per-epoch loss sums start again).
    pub(crate) fn next_epoch(&mut self) {
        self.epoch += 1;
        self.batch = 0;
        self.loss_sum = 0.0;
        self.seen = 0;
    }
}

/// The optimizer configuration of a recipe, for a run of `total_steps` optimizer steps.
pub fn optim_config(r: &Recipe, total_steps: u64) -> Result<OptimConfig> {
    if r.grad_accum == 0 {
        return Err(inv("--grad-accum must be >= 1"));
    }
    let cfg = OptimConfig {
        optim: match r.optim {
            OptimArg::Adamw => OptimKind::AdamW,
            OptimArg::Adamw8bit => OptimKind::AdamW8bit,
        },
        hyper: AdamWConfig {
            lr: r.lr,
            weight_decay: r.weight_decay,
            ..Default::default()
        },
        schedule: Schedule {
            kind: match r.schedule {
                ScheduleArg::Constant => ScheduleKind::Constant,
                ScheduleArg::Linear => ScheduleKind::Linear,
                ScheduleArg::Cosine => ScheduleKind::Cosine,
            },
            warmup_steps: r.warmup as u64,
            total_steps,
        },
        grad_accum: r.grad_accum,
        grad_clip: r.grad_clip,
        paged: r.paged,
        offload: r.offload_optimizer,
        ..Default::default()
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Sums micro-batch gradients until [`Accumulator::take_mean`].
#[derive(Default)]
pub struct Accumulator {
    sum: Option<Gradients>,
    n: usize,
}

impl Accumulator {
    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: Gradients) -> Result<()> {
        match &mut self.sum {
            None => self.sum = Some(grads),
            Some(acc) => {
                let mut grads = grads;
                let ids: Vec<ParamId> = grads.iter().map(|(id, _)| id).collect();
                for id in ids {
                    if let Some(g) = grads.remove(id) {
                        acc.insert_or_add(id, g)?;
                    }
                }
            }
        }
        self.n += 1;
        Ok(())
    }

    /// The mean of the added gradients (equal weight per micro-batch, as transformers' loss / accum),
    /// resetting the accumulator; `None` when nothing was added.
    pub fn take_mean(&mut self) -> Result<Option<Gradients>> {
        let n = std::mem::take(&mut self.n);
        match self.sum.take() {
            Some(mut g) => {
                if n > 1 {
                    g.scale(1.0 / n as f32)?;
                }
                Ok(Some(g))
            }
            None => Ok(None),
        }
    }

    /// Adds the gradients of micro-batch `bi` of an epoch of `n_batches`; at the end of its group (every
    /// `grad_accum` micro-batches, and the epoch's last) steps `opt` on their mean. True at a group's end.
    pub(crate) fn add_and_step(
        &mut self,
        grads: Gradients,
        (bi, n_batches, grad_accum): (usize, usize, usize),
        opt: &mut Optimizer,
        store: &mut ParamStore,
    ) -> Result<bool> {
        self.add(grads)?;
        let group_end = (bi + 1) % grad_accum == 0 || bi + 1 == n_batches;
        if group_end && let Some(g) = self.take_mean()? {
            opt.step(store, g)?;
        }
        Ok(group_end)
    }
}

/// Why a run stops after the optimizer step just taken, if it does: `--stop-after-steps` reached, or
/// the stop flag set (a signal, or the caller).
pub(crate) fn stop_reason(a: &Args, stop: &AtomicBool, opt: &Optimizer) -> Option<&'static str> {
    if a.stop_after_steps.is_some_and(|s| opt.steps() >= s) {
        Some("--stop-after-steps reached: saving")
    } else if stop.load(Ordering::SeqCst) {
        Some("interrupted: saving after the current step")
    } else {
        None
    }
}

/// What a checkpoint must match to be resumed: everything that shapes the run except `--epochs`
/// (a decaying schedule's length is checked with the optimizer's configuration).
fn fingerprint(a: &Args) -> serde_json::Value {
    let r = &a.recipe;
    let mut fp = json!({
        "method": value_name(a.method), "quantize": value_name(a.quantize), "double_quant": a.double_quant,
        "model": r.model, "data": r.data, "test": r.test, "split": r.split, "limit": r.limit,
        "target_modules": r.target_modules, "r": r.r, "alpha": r.alpha, "dropout": r.dropout,
        "batch_size": r.batch_size, "seed": r.seed, "max_len": r.data_args.max_len,
        "text_column": r.data_args.text_column, "label_column": r.data_args.label_column,
    });
    if let Some(q) = &a.qr_config {
        fp["qr_config"] = json!(q);
    }
    fp
}

/// Writes `out/checkpoint` whole: into `checkpoint.tmp`, then renamed into place.
pub(crate) fn save_checkpoint(
    out: &Path,
    opt: &Optimizer,
    store: &ParamStore,
    ids: &[ParamId],
    progress: &Progress,
    fp: &serde_json::Value,
) -> Result<()> {
    let tmp = out.join(format!("{CHECKPOINT_DIR}.tmp"));
    let dst = out.join(CHECKPOINT_DIR);
    let prev = out.join(format!("{CHECKPOINT_DIR}.prev"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut tensors = Vec::with_capacity(ids.len());
    for &id in ids {
        let t = store.get(id)?.to_device(Device::Cpu)?;
        tensors.push((store.name(id)?.to_string(), TensorBytes::from_tensor(&t)?));
    }
    write_safetensors(tmp.join(PARAMS_FILE), &tensors, None)?;
    let extra = json!({"progress": progress, "recipe": fp});
    opt.save(&tmp, store, None, extra)?;
    if prev.exists() {
        std::fs::remove_dir_all(&prev).map_err(|e| Error::io(&prev, e))?;
    }
    if dst.exists() {
        std::fs::rename(&dst, &prev).map_err(|e| Error::io(&dst, e))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&tmp, e))?;
    if prev.exists() {
        std::fs::remove_dir_all(&prev).map_err(|e| Error::io(&prev, e))?;
    }
    Ok(())
}

/// Restores a checkpoint written by [`save_checkpoint`]: parameters into `store`, the optimizer, and
/// the progress. Errors name what differs when the checkpoint belongs to another recipe.
fn load_checkpoint(
    dir: &Path,
    cfg: OptimConfig,
    store: &mut ParamStore,
    ids: &[ParamId],
    fp: &serde_json::Value,
) -> Result<(Optimizer, Progress)> {
    let mut dir = dir.to_path_buf();
    if !dir.join(META_FILE).exists() {
        // A crash between the two renames of `save_checkpoint` leaves the previous one whole here.
        let prev = dir.with_file_name(format!(
            "{}.prev",
            dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        if prev.join(META_FILE).exists() {
            eprintln!(
                "peftk: resuming from {} (the last complete checkpoint)",
                prev.display()
            );
            dir = prev;
        } else {
            return Err(inv(format!(
                "--resume {}: no checkpoint there ({META_FILE} is missing)",
                dir.display()
            )));
        }
    }
    // The recipe first: a checkpoint of another run should say so, not which tensor shape differs.
    let meta_path = dir.join(META_FILE);
    let meta: serde_json::Value = std::fs::read(&meta_path)
        .map_err(|e| Error::io(&meta_path, e))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| inv(format!("{}: {e}", meta_path.display()))))?;
    let saved_fp = &meta["extra"]["recipe"];
    if saved_fp != fp {
        let keys = fp
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        let diff: Vec<String> = keys
            .iter()
            .filter(|k| saved_fp.get(k.as_str()) != fp.get(k.as_str()))
            .map(|k| {
                format!(
                    "{k}: checkpoint {} vs now {}",
                    saved_fp[k.as_str()],
                    fp[k.as_str()]
                )
            })
            .collect();
        return Err(inv(format!(
            "--resume {}: the checkpoint belongs to another recipe ({})",
            dir.display(),
            diff.join("; ")
        )));
    }
    let (opt, resume) = Optimizer::load(&dir, cfg, store)?;
    let progress: Progress = serde_json::from_value(resume.extra["progress"].clone())
        .map_err(|e| inv(format!("--resume {}: bad progress record: {e}", dir.display())))?;
    let ppath = dir.join(PARAMS_FILE);
    let st = SafetensorsFile::open(&ppath)?;
    if st.names().len() != ids.len() {
        return Err(inv(format!(
            "{}: {} tensors, the model has {} trainable parameters",
            ppath.display(),
            st.names().len(),
            ids.len()
        )));
    }
    for &id in ids {
        let name = store.name(id)?.to_string();
        let cur = store.get(id)?;
        let t = st.load(&name, cur.device())?;
        if t.shape() != cur.shape() || t.dtype() != cur.dtype() {
            return Err(inv(format!(
                "{}: {name:?} is {:?} {:?}, the model has {:?} {:?}",
                ppath.display(),
                t.dtype(),
                t.shape(),
                cur.dtype(),
                cur.shape()
            )));
        }
        store.set(id, t)?;
    }
    Ok((opt, progress))
}

/// Forward with dropout (masks from `seed`), mean cross-entropy, backward: (loss, gradients).
fn micro_step(
    model: &BertForSequenceClassification,
    store: &ParamStore,
    b: &BertBatch,
    labels: &[u32],
    seed: u64,
) -> Result<(f32, Gradients)> {
    let mut tape = Tape::new();
    let logits = model.forward_t(&mut tape, store, b, Some(seed))?;
    let loss = tape.cross_entropy(logits, labels)?;
    Ok((tape.value(loss)?.to_scalar()?, tape.backward(loss)?))
    // The tape is dropped here, before the update (no shared parameter tensors).
}

/// The stop flag: the caller's, or one that SIGINT / SIGTERM set (the loop then stops after the current
/// optimizer step and saves).
fn stop_flag(stop: Option<Arc<AtomicBool>>) -> Arc<AtomicBool> {
    stop.unwrap_or_else(|| {
        let s = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            if let Err(e) = signal_hook::flag::register(sig, s.clone()) {
                eprintln!("peftk: warning: cannot install a signal handler ({e}); Ctrl-C will not save");
            }
        }
        s
    })
}

fn progress_bar(quiet: bool, len: u64, pos: u64) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(pos);
    bar
}

/// What a training loop holds from its first step on.
pub(crate) struct Run {
    /// The optimizer and the data position: fresh, or restored from `--resume` (the parameters too).
    pub(crate) opt: Optimizer,
    pub(crate) prog: Progress,
    /// The recipe fingerprint every checkpoint of the run carries.
    pub(crate) fp: serde_json::Value,
    /// `out/metrics.jsonl`, appended to when resuming.
    pub(crate) metrics: std::fs::File,
    pub(crate) metrics_path: PathBuf,
    /// Set by the caller or by SIGINT / SIGTERM: stop after the current optimizer step and save.
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) bar: ProgressBar,
}

/// The set-up the classifier and causal-LM loops share, for `n_batches` micro-batches an epoch over the
/// trainable parameters `ids` of `store`: the optimizer for the whole run's steps, the checkpoint when
/// resuming, the output directory and metrics file, the stop flag and the progress bar.
pub(crate) fn start_run(
    a: &Args,
    n_batches: usize,
    store: &mut ParamStore,
    ids: &[ParamId],
    stop: Option<Arc<AtomicBool>>,
) -> Result<Run> {
    let r = &a.recipe;
    let steps_per_epoch = n_batches.div_ceil(r.grad_accum.max(1));
    let cfg = optim_config(r, (steps_per_epoch * r.epochs).max(1) as u64)?;
    let fp = fingerprint(a);
    let (opt, prog) = match &a.resume {
        Some(dir) => load_checkpoint(dir, cfg, store, ids, &fp)?,
        None => (Optimizer::new(cfg)?, Progress::start()),
    };
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let metrics_path = a.out.join("metrics.jsonl");
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(a.resume.is_some())
        .truncate(a.resume.is_none())
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let done = ((prog.epoch - 1) * n_batches + prog.batch) as u64;
    let bar = progress_bar(a.quiet, (n_batches * r.epochs) as u64, done);
    Ok(Run {
        opt,
        prog,
        fp,
        metrics,
        metrics_path,
        stop: stop_flag(stop),
        bar,
    })
}

/// Trains, evaluating after every epoch; writes `out/metrics.jsonl` (appended to when resuming), a
/// checkpoint after each epoch, the adapter and the label map.
pub fn train(a: &Args, stop: Option<Arc<AtomicBool>>) -> Result<RunSummary> {
    let r = &a.recipe;
    let load0 = loadavg();
    check_device(&r.device)?;
    if r.batch_size == 0 || r.epochs == 0 {
        return Err(inv("--batch-size and --epochs must be >= 1"));
    }
    if (r.paged || r.offload_optimizer) && !a.quiet {
        eprintln!(
            "peftk: note: --paged / --offload-optimizer place CUDA optimizer state; on the CPU the state is host memory already (no effect)"
        );
    }
    let mdir = model_dir(&r.model)?;
    let (train, test) = load_data(r)?;
    let tok = BertTokenizer::from_file(mdir.join("tokenizer.json"))?;
    let pad = tok.pad_id();
    let (etr, ete) = (
        encode(&tok, &train, r.data_args.max_len)?,
        encode(&tok, &test, r.data_args.max_len)?,
    );
    let mut store = ParamStore::new();
    let (opts, config) = super::setup(a)?;
    let mut model = load_classifier(&mdir, &opts, &mut store, r.seed, train.label_map.len())?;
    let qr = crate::qr_adapt::run_config(a)?;
    if let Some(qc) = &qr {
        crate::qr_adapt::apply_to_model(qc, &mut model)?;
    }
    if let Some(c) = &config {
        model.init_adapter(c, &mut store, r.seed.wrapping_add(1))?;
    }
    let ids = model.param_ids();
    let trainable: usize = ids
        .iter()
        .map(|&id| store.get(id).map(|t| t.numel()))
        .sum::<Result<usize>>()?;
    let total_params = trainable + base_params(&mdir)?;
    let lengths: Vec<usize> = etr.ids.iter().map(Vec::len).collect();
    let epoch_batches =
        |epoch: usize| data::bucketed_batches(&lengths, r.batch_size, 50, r.seed ^ (epoch as u64) << 32);
    let first = epoch_batches(1)?;
    let n_batches = first.len();
    if !a.quiet && a.resume.is_none() {
        // Where a step's memory goes, for the epoch's largest batch (the activation peak).
        let cost = |idx: &Vec<usize>| idx.len() * idx.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        if let Some(idx) = first.iter().max_by_key(|idx| cost(idx)) {
            let mem = model.memory_report(&store, &batch_of(&etr, idx, pad)?)?;
            eprintln!(
                "peftk: step memory (largest batch, {} x {} tokens): {mem}; process peak RSS so far {:.0} MiB",
                idx.len(),
                idx.iter().map(|&i| lengths[i]).max().unwrap_or(0),
                peak_rss_mb()
            );
        }
    }
    let Run {
        mut opt,
        mut prog,
        fp,
        mut metrics,
        metrics_path: _,
        stop,
        bar,
    } = start_run(a, n_batches, &mut store, &ids, stop)?;
    let mut last = (0.0, 0.0, 0.0);
    let mut acc = Accumulator::default();
    let line = MetricsLine { trainable };
    'epochs: while prog.epoch <= r.epochs {
        let epoch = prog.epoch;
        let batches = epoch_batches(epoch)?;
        for bi in prog.batch..batches.len() {
            let idx = &batches[bi];
            let b = batch_of(&etr, idx, pad)?;
            let labels: Vec<u32> = idx.iter().map(|&i| train.labels[i]).collect();
            let t = Instant::now();
            let seed = r.seed.wrapping_mul(1_000_003).wrapping_add(prog.micro);
            let (loss, grads) = micro_step(&model, &store, &b, &labels, seed)?;
            let group_end =
                acc.add_and_step(grads, (bi, batches.len(), r.grad_accum), &mut opt, &mut store)?;
            let dt = t.elapsed().as_secs_f64();
            prog.record_micro(bi + 1, dt, loss, idx.len());
            bar.inc(1);
            bar.set_message(format!(
                "epoch {epoch} loss {:.4} {:.1} samples/s",
                prog.loss_sum / prog.seen as f64,
                idx.len() as f64 / dt
            ));
            if group_end
                && bi + 1 < batches.len()
                && let Some(why) = stop_reason(a, &stop, &opt)
            {
                bar.println(why);
                let (_, accu, f1) = evaluate(&model, &store, &ete, &test, pad)?;
                last = (prog.loss_sum / prog.seen as f64, accu, f1);
                line.write(&mut metrics, &prog, last, &opt, epoch)?;
                save_checkpoint(&a.out, &opt, &store, &ids, &prog, &fp)?;
                break 'epochs;
            }
        }
        let (_, accu, f1) = evaluate(&model, &store, &ete, &test, pad)?;
        last = (prog.loss_sum / prog.seen.max(1) as f64, accu, f1);
        bar.println(format!(
            "epoch {epoch}: train loss {:.4}, test accuracy {accu:.4}, macro-F1 {f1:.4}, {:.1} s training",
            last.0, prog.train_s
        ));
        line.write(&mut metrics, &prog, last, &opt, epoch)?;
        prog.next_epoch();
        save_checkpoint(&a.out, &opt, &store, &ids, &prog, &fp)?;
        if stop_reason(a, &stop, &opt).is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    train.label_map.save(&a.out)?;
    let adapter_dir = a.out.join("adapter");
    let adapter_bytes = if let Some(c) = &config {
        model.save_adapter(c, &store, &adapter_dir)?;
        train.label_map.save(&adapter_dir)?;
        if let Some(qc) = &qr {
            qc.save(&adapter_dir)?; // `peftk eval` / `predict` load the base in the same tiers
        }
        dir_bytes(&adapter_dir)
    } else {
        0
    };
    Ok(RunSummary {
        accuracy: last.1,
        f1: last.2,
        train_s: prog.train_s,
        step_ms_median: median(&prog.step_ms),
        peak_rss_mb: peak_rss_mb(),
        trainable_params: trainable,
        total_params,
        optimizer_state_bytes: opt.state_bytes(),
        optimizer_state_8bit: opt.state_bytes_8bit(),
        adapter_bytes,
        optimizer_steps: opt.steps(),
        loadavg_1m: (load0 + loadavg()) / 2.0,
    })
}

/// One line of `metrics.jsonl`.
struct MetricsLine {
    trainable: usize,
}

impl MetricsLine {
    fn write(
        &self,
        f: &mut std::fs::File,
        p: &Progress,
        (loss, acc, f1): (f64, f64, f64),
        opt: &Optimizer,
        epoch: usize,
    ) -> Result<()> {
        let samples_per_s = p.samples as f64 / p.train_s.max(1e-9);
        let line = json!({
            "epoch": epoch, "step": opt.steps(), "micro_step": p.micro, "loss": loss, "accuracy": acc,
            "f1": f1, "train_s": p.train_s, "step_ms_median": median(&p.step_ms),
            "samples_per_s": samples_per_s, "peak_rss_mb": peak_rss_mb(),
            "trainable_params": self.trainable, "optimizer_state_bytes": opt.state_bytes(),
        });
        writeln!(f, "{line}").map_err(|e| Error::io(Path::new("metrics.jsonl"), e))
    }
}

/// Bytes of the files directly inside `d` (0 when unreadable).
pub fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .map(|r| {
            r.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The median (upper middle for an even count), 0 for none.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Floating-point elements of the checkpoint's tensors outside the classifier (the frozen base: the
/// denominator of "trainable %" with the trainable ones), 0 when there is no `model.safetensors`.
fn base_params(mdir: &Path) -> Result<usize> {
    let path = mdir.join("model.safetensors");
    if !path.exists() {
        return Ok(0);
    }
    let st = SafetensorsFile::open(&path)?;
    let mut n = 0;
    for name in st.names() {
        let (dt, shape, _) = st.raw(name)?;
        let float = matches!(
            dt,
            safetensors::Dtype::F32
                | safetensors::Dtype::F16
                | safetensors::Dtype::BF16
                | safetensors::Dtype::F64
        );
        if float && !name.starts_with("classifier.") {
            n += shape.iter().product::<usize>();
        }
    }
    Ok(n)
}
