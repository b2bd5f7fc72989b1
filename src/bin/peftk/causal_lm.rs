//! `peftk finetune --task causal-lm` and `peftk eval --task causal-lm`: next-token fine-tuning of a
//! Llama-family checkpoint (Llama 2/3, Mistral, Qwen2) on a file of texts, with the same options,
//! outputs (metrics.jsonl, the PEFT adapter, the progress bar) and QLoRA default as the classifier
//! path. The loss is the mean next-token NLL over real tokens (padding never counts); the test split
//! reports it with its perplexity.

use crate::finetune::train::{self, Accumulator, Progress, Run};
use crate::finetune::{self, Args, EvalArgs, padded_batch};
use peft_kernels::autograd::ParamStore;
use peft_kernels::data;
use peft_kernels::io::peft::{AdapterConfig, TargetModules};
use peft_kernels::models::{self, CausalLmTokenizer, LlamaForCausalLM};
use peft_kernels::optim::Optimizer;
use peft_kernels::{Error, Result};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The classifier path's default `--target-modules` (BERT's names); for a decoder it means every
/// projection, as QLoRA adapts them.
const BERT_DEFAULT: [&str; 4] = ["query", "key", "value", "dense"];
const DECODER_LINEARS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn inv(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// The texts of a `.jsonl` file (one object per line with `column`, or one JSON string per line), a
/// `.json` array of the same, or a `.txt` file (one text per non-empty line).
pub fn read_texts(path: &Path, column: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ctx = |msg: String| Error::Format {
        context: path.display().to_string(),
        msg,
    };
    let pick = |v: &Value, at: &str| -> Result<String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) => o
                .get(column)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| ctx(format!("{at} has no string {column:?}"))),
            _ => Err(ctx(format!("{at} is neither an object nor a string"))),
        }
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let texts: Vec<String> = match ext {
        "jsonl" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: Value = serde_json::from_str(l).map_err(|e| ctx(format!("line {}: {e}", i + 1)))?;
                pick(&v, &format!("line {}", i + 1))
            })
            .collect::<Result<_>>()?,
        "json" => {
            let v: Value = serde_json::from_str(&text).map_err(|e| ctx(e.to_string()))?;
            let arr = v.as_array().ok_or_else(|| ctx("expected a JSON array".into()))?;
            arr.iter()
                .enumerate()
                .map(|(i, r)| pick(r, &format!("record {}", i + 1)))
                .collect::<Result<_>>()?
        }
        "txt" => text.lines().map(str::to_string).collect(),
        other => {
            return Err(ctx(format!(
                "extension {other:?}: causal-lm data is .jsonl, .json or .txt"
            )));
        }
    };
    let texts: Vec<String> = texts.into_iter().filter(|t| !t.trim().is_empty()).collect();
    if texts.is_empty() {
        return Err(ctx("no texts".into()));
    }
    Ok(texts)
}

/// Token-weighted mean next-token NLL over `enc` and the number of predicted tokens.
fn evaluate(
    m: &LlamaForCausalLM,
    store: &ParamStore,
    enc: &[Vec<u32>],
    pad: u32,
    bs: usize,
) -> Result<(f64, usize)> {
    let lengths: Vec<usize> = enc.iter().map(Vec::len).collect();
    let (mut sum, mut n) = (0f64, 0usize);
    for idx in peft_kernels::data::sorted_batches(&lengths, bs.max(1))? {
        let b = padded_batch(enc, &idx, pad)?;
        let (loss, k) = m.loss(store, &b, None)?;
        sum += loss as f64 * k as f64;
        n += k;
    }
    Ok((if n == 0 { 0.0 } else { sum / n as f64 }, n))
}

fn load(mdir: &Path, opts: &models::ModelLoadOptions) -> Result<(LlamaForCausalLM, CausalLmTokenizer)> {
    let m = models::from_pretrained_causal_lm(mdir, opts)?;
    let tok = CausalLmTokenizer::from_file(mdir.join("tokenizer.json"), m.config().pad_token_id)?;
    Ok((m, tok))
}

fn encode(tok: &CausalLmTokenizer, texts: &[String], max_len: usize) -> Result<Vec<Vec<u32>>> {
    texts.iter().map(|t| tok.encode(t, max_len)).collect()
}

/// The adapter config: the classifier path's method options with PEFT's CAUSAL_LM task.
fn adapter_config(a: &Args) -> Result<AdapterConfig> {
    let mut c = finetune::adapter_config(a.method, &a.recipe)
        .ok_or_else(|| inv("--method head has no meaning for --task causal-lm (the lm_head stays frozen)"))?;
    c.task_type = Some("CAUSAL_LM".into());
    c.modules_to_save = None;
    if a.recipe.target_modules == BERT_DEFAULT {
        c.target_modules = Some(TargetModules::Names(
            DECODER_LINEARS.iter().map(|s| s.to_string()).collect(),
        ));
    }
    Ok(c)
}

/// `peftk finetune --task causal-lm`.
pub fn run_finetune(a: &Args) -> Result<()> {
    let r = &a.recipe;
    finetune::check_device(&r.device)?;
    if r.batch_size == 0 {
        return Err(inv("--batch-size must be >= 1"));
    }
    let mdir =
        a.recipe.model.clone().ok_or_else(|| {
            inv("--task causal-lm needs --model DIR (a Llama, Mistral or Qwen2 checkpoint)")
        })?;
    if a.recipe.data.is_empty() {
        return Err(inv("--task causal-lm needs --data FILE..."));
    }
    let mut train = Vec::new();
    for p in &a.recipe.data {
        train.extend(read_texts(p, &a.recipe.data_args.text_column)?);
    }
    let mut rng = peft_kernels::rng::Rng::new(a.recipe.seed ^ 0x5eed);
    peft_kernels::data::shuffle(&mut train, &mut rng);
    let test = match (&a.recipe.test, a.recipe.split) {
        (Some(_), Some(_)) => return Err(inv("give --test or --split, not both")),
        (Some(t), None) => read_texts(t, &a.recipe.data_args.text_column)?,
        (None, Some(f)) if f > 0.0 && f < 1.0 => {
            let n =
                ((train.len() as f64 * f).round() as usize).clamp(1, train.len().saturating_sub(1).max(1));
            train.drain(..n).collect()
        }
        (None, Some(f)) => return Err(inv(format!("--split {f} is not in (0, 1)"))),
        (None, None) => return Err(inv("no test data: give --test FILE or --split FRACTION")),
    };
    if let Some(n) = a.recipe.limit {
        train.truncate(n);
    }
    if train.is_empty() {
        return Err(inv("no training texts left after the split"));
    }
    let opts = models::ModelLoadOptions {
        algo: finetune::compute_algo(a),
        ..finetune::load_opts(a.quantize, a.double_quant)
    };
    let (mut model, tok) = load(&mdir, &opts)?;
    let pad = tok.pad_id();
    let (etr, ete) = (
        encode(&tok, &train, a.recipe.data_args.max_len)?,
        encode(&tok, &test, a.recipe.data_args.max_len)?,
    );
    let config = adapter_config(a)?;
    let mut store = ParamStore::new();
    model.init_adapter(&config, &mut store, r.seed.wrapping_add(1))?;
    let ids = model.param_ids();
    let trainable: usize = ids
        .iter()
        .map(|&id| store.get(id).map(|t| t.numel()))
        .sum::<Result<usize>>()?;
    let lengths: Vec<usize> = etr.iter().map(Vec::len).collect();
    let epoch_batches =
        |epoch: usize| data::bucketed_batches(&lengths, r.batch_size, 50, r.seed ^ (epoch as u64) << 32);
    let n_batches = epoch_batches(1)?.len();
    let Run {
        mut opt,
        mut prog,
        fp,
        mut metrics,
        metrics_path: mpath,
        stop,
        bar,
    } = train::start_run(a, n_batches, &mut store, &ids, None)?;
    let (train_s0, mut tokens) = (prog.train_s, 0usize);
    let mut acc = Accumulator::default();
    let mut last = json!({});
    // One metrics line (after an epoch, or when stopped early).
    let mut report = |store: &ParamStore, prog: &Progress, opt: &Optimizer, epoch: usize, tokens: usize| {
        let (test_loss, test_tokens) = evaluate(&model, store, &ete, pad, r.batch_size)?;
        let line = json!({
            "epoch": epoch, "step": opt.steps(), "micro_step": prog.micro,
            "loss": prog.loss_sum / prog.seen.max(1) as f64, "test_loss": test_loss,
            "test_perplexity": test_loss.exp(), "test_tokens": test_tokens, "train_s": prog.train_s,
            "step_ms_median": finetune::median(&prog.step_ms),
            "tokens_per_s": tokens as f64 / (prog.train_s - train_s0).max(1e-9),
            "peak_rss_mb": finetune::peak_rss_mb(), "trainable_params": trainable,
            "optimizer_state_bytes": opt.state_bytes(),
        });
        writeln!(metrics, "{line}").map_err(|e| Error::io(&mpath, e))?;
        Result::Ok(line)
    };
    'epochs: while prog.epoch <= r.epochs {
        let epoch = prog.epoch;
        let batches = epoch_batches(epoch)?;
        for bi in prog.batch..batches.len() {
            let idx = &batches[bi];
            let b = padded_batch(&etr, idx, pad)?;
            let t = Instant::now();
            let seed = r.seed.wrapping_mul(1_000_003).wrapping_add(prog.micro);
            let (loss, grads) = model.loss_and_grads(&store, &b, None, seed)?;
            let group_end =
                acc.add_and_step(grads, (bi, batches.len(), r.grad_accum), &mut opt, &mut store)?;
            let dt = t.elapsed().as_secs_f64();
            prog.record_micro(bi + 1, dt, loss, idx.len());
            let k = b.num_tokens();
            tokens += k;
            bar.inc(1);
            bar.set_message(format!(
                "epoch {epoch} loss {:.4} {:.0} tokens/s",
                prog.loss_sum / prog.seen as f64,
                k as f64 / dt
            ));
            if group_end
                && bi + 1 < batches.len()
                && let Some(why) = train::stop_reason(a, &stop, &opt)
            {
                bar.println(why);
                last = report(&store, &prog, &opt, epoch, tokens)?;
                train::save_checkpoint(&a.out, &opt, &store, &ids, &prog, &fp)?;
                break 'epochs;
            }
        }
        last = report(&store, &prog, &opt, epoch, tokens)?;
        bar.println(format!(
            "epoch {epoch}: train loss {:.4}, test loss {:.4}, perplexity {:.2}, {:.1} s training",
            last["loss"].as_f64().unwrap_or(f64::NAN),
            last["test_loss"].as_f64().unwrap_or(f64::NAN),
            last["test_perplexity"].as_f64().unwrap_or(f64::NAN),
            prog.train_s
        ));
        prog.next_epoch();
        train::save_checkpoint(&a.out, &opt, &store, &ids, &prog, &fp)?;
        if train::stop_reason(a, &stop, &opt).is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    let adapter_dir = a.out.join("adapter");
    model.save_adapter(&config, &store, &adapter_dir)?;
    println!("{last}");
    Ok(())
}

/// `peftk eval --task causal-lm`: one line `{"n", "tokens", "loss", "perplexity"}` with `--json`.
pub fn run_eval(a: &EvalArgs) -> Result<()> {
    let mdir: PathBuf = a
        .model
        .clone()
        .ok_or_else(|| inv("--task causal-lm needs --model DIR"))?;
    let (mut m, tok) = load(&mdir, &finetune::load_opts(a.base.quantize, true))?;
    let mut store = ParamStore::new();
    m.load_adapter(&a.adapter, &mut store)?;
    let texts = read_texts(&a.data, &a.data_args.text_column)?;
    let enc = encode(&tok, &texts, a.data_args.max_len)?;
    let (loss, n) = evaluate(&m, &store, &enc, tok.pad_id(), 16)?;
    if a.json {
        println!(
            "{}",
            json!({"n": texts.len(), "tokens": n, "loss": loss, "perplexity": loss.exp()})
        );
    } else {
        println!(
            "n {}  tokens {n}  loss {loss:.4}  perplexity {:.3}",
            texts.len(),
            loss.exp()
        );
    }
    Ok(())
}
