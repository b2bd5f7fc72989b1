//! Pretrained transformers from Hugging Face checkpoint directories, on the autograd tape, with adapters
//! on any linear.
//!
//! [`from_pretrained`] reads `config.json`, dispatches on its `model_type` (an unknown type is a named
//! error) and loads the weights ([`loader`]: single or sharded safetensors, f32/bf16/f16, with or without
//! the architecture prefix, every shape validated; optional quantization to NF4/FP4 on load; checkpoints
//! saved by transformers with `load_in_4bit` stay 4-bit). Models: [`bert`] (`BertModel`,
//! `BertForSequenceClassification`). [`tokenizer`] wraps the checkpoint's `tokenizer.json`.
//!
//! ```no_run
//! use peft_kernels::autograd::{ParamStore, Tape};
//! use peft_kernels::models::{self, ModelLoadOptions, QuantizeOnLoad};
//! let dir = std::path::Path::new("minilm");
//! let opts = ModelLoadOptions { quantize: Some(QuantizeOnLoad::nf4_dq_all_linear()), ..Default::default() };
//! let mut store = ParamStore::new();
//! let model = models::from_pretrained_seq_cls(dir, &opts, &mut store, 0)?;
//! let tok = models::BertTokenizer::from_file(dir.join("tokenizer.json"))?;
//! let batch = tok.encode_batch(&["a fine film", "dull"], 64)?;
//! let logits = model.logits(&store, &batch)?;
//! # Ok::<(), peft_kernels::Error>(())
//! ```

pub(crate) mod adapt;
pub mod bert;
pub(crate) mod checkpoint;
pub mod config;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod tokenizer;

pub use bert::{BertForSequenceClassification, BertModel, MemoryReport};
pub use config::BertConfig;
pub use linear::{LinearSlot, TrainedLinear};
pub use llama::{
    CausalLmTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, TokenBatch,
};
pub use loader::{Checkpoint, MappedTable, ModelLoadOptions, QuantizeOnLoad};
pub use tokenizer::{BertBatch, BertTokenizer};

use crate::autograd::{ParamStore, Tape, Var};
use crate::error::{Error, Result};
use std::path::Path;

/// A loaded backbone, by architecture.
#[derive(Clone, Debug)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)] // one per loaded model
pub enum Model {
    Bert(BertModel),
    Llama(LlamaModel),
}

fn unknown(ty: &str) -> Error {
    Error::format(
        "config.json",
        format!(
            "model_type {ty:?} is not supported (supported: {:?})",
            config::SUPPORTED_MODEL_TYPES
        ),
    )
}

/// The backbone of the checkpoint in `dir` (`BertModel` with its pooler for `model_type` `"bert"`;
/// module names without prefix, as transformers names a bare `BertModel`'s modules).
pub fn from_pretrained(dir: impl AsRef<Path>, opts: &ModelLoadOptions) -> Result<Model> {
    let dir = dir.as_ref();
    match config::read_config(dir)?.0.as_str() {
        "bert" => {
            let (c, ckpt) = bert_checkpoint(dir)?;
            Ok(Model::Bert(BertModel::load(&ckpt, &c, "", true, opts)?))
        }
        "llama" | "mistral" | "qwen2" => {
            let (c, ckpt) = llama_checkpoint(dir, "a decoder")?;
            Ok(Model::Llama(LlamaModel::load(&ckpt, &c, "", opts)?))
        }
        other => Err(unknown(other)),
    }
}

/// The config and checkpoint of a BERT directory.
fn bert_checkpoint(dir: &Path) -> Result<(BertConfig, Checkpoint)> {
    let (ty, json) = config::read_config(dir)?;
    match ty.as_str() {
        "bert" => Ok((BertConfig::from_json(&json)?, Checkpoint::open(dir, "bert")?)),
        other => Err(unknown(other)),
    }
}

/// A sequence classifier from the checkpoint in `dir` (`BertForSequenceClassification`; its classifier
/// from the checkpoint or freshly initialized from `seed`, in `store`).
pub fn from_pretrained_seq_cls(
    dir: impl AsRef<Path>,
    opts: &ModelLoadOptions,
    store: &mut ParamStore,
    seed: u64,
) -> Result<BertForSequenceClassification> {
    let (c, ckpt) = bert_checkpoint(dir.as_ref())?;
    BertForSequenceClassification::load(&ckpt, &c, opts, store, seed)
}

/// One optimizer step on the loss that `loss` records on a fresh tape (dropped before the update, so no
/// parameter tensor is shared). Returns the loss before the update.
pub(crate) fn train_step(
    store: &mut ParamStore,
    opt: &mut crate::optim::AdamW,
    loss: impl FnOnce(&mut Tape, &ParamStore) -> Result<Var>,
) -> Result<f32> {
    let (value, grads) = {
        let mut tape = Tape::new();
        let l = loss(&mut tape, store)?;
        (tape.value(l)?.to_scalar()?, tape.backward(l)?)
    };
    opt.step(store, &grads)?;
    Ok(value)
}

/// Fuzzing entry point for the model loader: `bytes` is a little-endian `u32` length `n`, `n` bytes of
/// `config.json`, then a `model.safetensors` file. Both are written to a temporary directory and loaded
/// as a sequence classifier (BERT) or else as a causal LM (Llama, Mistral, Qwen2). Returns whether it
/// loaded. Never panics, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_load(bytes: &[u8]) -> bool {
    let Some((len, rest)) = bytes.split_first_chunk::<4>() else {
        return false;
    };
    let n = (u32::from_le_bytes(*len) as usize).min(rest.len());
    let (config, weights) = rest.split_at(n);
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    if std::fs::write(dir.path().join("config.json"), config).is_err()
        || std::fs::write(dir.path().join("model.safetensors"), weights).is_err()
    {
        return false;
    }
    let mut store = ParamStore::new();
    let opts = ModelLoadOptions::default();
    from_pretrained_seq_cls(dir.path(), &opts, &mut store, 0).is_ok()
        || from_pretrained_causal_lm(dir.path(), &opts).is_ok()
}

/// The config and checkpoint of a Llama-family directory (`what` names the model for the error).
fn llama_checkpoint(dir: &Path, what: &str) -> Result<(LlamaConfig, Checkpoint)> {
    let (ty, json) = config::read_config(dir)?;
    match ty.as_str() {
        "llama" | "mistral" | "qwen2" => {
            Ok((LlamaConfig::from_json(&json)?, Checkpoint::open(dir, "model")?))
        }
        other => Err(Error::format(
            "config.json",
            format!("model_type {other:?} is not {what} (supported: llama, mistral, qwen2)"),
        )),
    }
}

/// A causal language model from the checkpoint in `dir` (`model_type` `"llama"`, `"mistral"` or
/// `"qwen2"`: `LlamaForCausalLM` and its siblings).
pub fn from_pretrained_causal_lm(dir: impl AsRef<Path>, opts: &ModelLoadOptions) -> Result<LlamaForCausalLM> {
    let (c, ckpt) = llama_checkpoint(dir.as_ref(), "a causal LM")?;
    LlamaForCausalLM::load(&ckpt, &c, opts)
}

/// A decoder sequence classifier from the checkpoint in `dir` (`LlamaForSequenceClassification` for
/// `model_type` `"llama"`, `"mistral"` or `"qwen2"`; the score head from the checkpoint or freshly
/// initialized from `seed`, in `store`).
pub fn from_pretrained_llama_seq_cls(
    dir: impl AsRef<Path>,
    opts: &ModelLoadOptions,
    store: &mut ParamStore,
    seed: u64,
) -> Result<LlamaForSequenceClassification> {
    let (c, ckpt) = llama_checkpoint(dir.as_ref(), "a decoder")?;
    LlamaForSequenceClassification::load(&ckpt, &c, opts, store, seed)
}
