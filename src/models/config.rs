//! `config.json` of a Hugging Face checkpoint: the `model_type` dispatch and BERT's fields
//! (transformers' `BertConfig`, `models/bert/configuration_bert.py`).

use crate::autograd::Activation;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The architectures [`super::from_pretrained`] knows.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["bert", "llama", "mistral", "qwen2"];

/// transformers' `BertConfig` (the fields the model uses), read from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// `hidden_act`: `"gelu"` (erf), `"gelu_new"` / `"gelu_pytorch_tanh"` (tanh), `"relu"`, `"silu"`.
    pub hidden_act: Activation,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub initializer_range: f32,
    pub pad_token_id: u32,
    /// Labels of the sequence-classification head: `num_labels`, else the size of `id2label`, else 2
    /// (transformers' default).
    pub num_labels: usize,
    /// `classifier_dropout` (`None`: `hidden_dropout_prob`, as transformers does).
    pub classifier_dropout: Option<f32>,
    /// The `quantization_config` object, if the checkpoint was saved quantized.
    pub quantization_config: Option<Value>,
}

/// Reads `dir/config.json` as JSON and returns it with its `model_type`.
pub fn read_config(dir: &Path) -> Result<(String, Value)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(path.display().to_string(), format!("not valid JSON: {e}")))?;
    let ty = v
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::format(path.display().to_string(), "no string \"model_type\""))?
        .to_string();
    Ok((ty, v))
}

fn ctx() -> &'static str {
    "config.json"
}

pub(crate) fn get_usize(v: &Value, key: &str, default: Option<usize>) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => {
            default.ok_or_else(|| Error::format(ctx(), format!("missing required field {key:?}")))
        }
        Some(x) => x
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Error::format(ctx(), format!("{key:?} must be a non-negative integer, got {x}"))),
    }
}

pub(crate) fn get_f32(v: &Value, key: &str, default: f32) -> Result<f32> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| Error::format(ctx(), format!("{key:?} must be a number, got {x}"))),
    }
}

pub(crate) fn probability(v: &Value, key: &str, default: f32) -> Result<f32> {
    let p = get_f32(v, key, default)?;
    if (0.0..1.0).contains(&p) {
        Ok(p)
    } else {
        Err(Error::format(ctx(), format!("{key:?} = {p} is not in [0, 1)")))
    }
}

/// `num_labels`, else the size of `id2label`, else 2 (transformers' `PretrainedConfig`).
pub(crate) fn num_labels_of(v: &Value) -> Result<usize> {
    match v.get("num_labels") {
        Some(x) if !x.is_null() => get_usize(v, "num_labels", None),
        _ => Ok(v
            .get("id2label")
            .and_then(Value::as_object)
            .map_or(2, |m| m.len())),
    }
}

/// Every named size positive and at most 2²⁴ (a cap against absurd sizes from corrupt files: tables
/// are allocated from these), `num_labels` at most 2¹⁶ (the head is initialized from the config alone).
pub(crate) fn check_sizes(sizes: &[(&str, usize)]) -> Result<()> {
    for &(name, n) in sizes {
        if n == 0 {
            return Err(Error::format(ctx(), format!("{name} must be positive")));
        }
        let cap = if name == "num_labels" { 1 << 16 } else { 1 << 24 };
        if n > cap {
            return Err(Error::format(ctx(), format!("{name} = {n} is implausibly large")));
        }
    }
    Ok(())
}

/// transformers' `ACT2FN` names for the activations the tape has.
pub fn activation_from_name(name: &str) -> Result<Activation> {
    Ok(match name {
        "gelu" => Activation::GeluErf,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::Gelu,
        "relu" => Activation::Relu,
        "silu" | "swish" => Activation::Silu,
        other => {
            return Err(Error::format(
                ctx(),
                format!(
                    "hidden_act {other:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu)"
                ),
            ));
        }
    })
}

impl BertConfig {
    /// Parses a BERT `config.json` object (defaults as transformers' `BertConfig`). Validates sizes:
    /// positive dimensions, `hidden_size % num_attention_heads == 0`, probabilities in `[0, 1)`, absolute
    /// position embeddings.
    pub fn from_json(v: &Value) -> Result<BertConfig> {
        if let Some(t) = v.get("model_type").and_then(Value::as_str)
            && t != "bert"
        {
            return Err(Error::format(ctx(), format!("model_type {t:?} is not \"bert\"")));
        }
        if let Some(p) = v.get("position_embedding_type").and_then(Value::as_str)
            && p != "absolute"
        {
            return Err(Error::format(
                ctx(),
                format!("position_embedding_type {p:?} is not supported (only \"absolute\")"),
            ));
        }
        if v.get("is_decoder").and_then(Value::as_bool) == Some(true) {
            return Err(Error::format(ctx(), "is_decoder BERT is not supported"));
        }
        let act = match v.get("hidden_act") {
            None => Activation::GeluErf,
            Some(Value::String(s)) => activation_from_name(s)?,
            Some(x) => {
                return Err(Error::format(
                    ctx(),
                    format!("hidden_act must be a string, got {x}"),
                ));
            }
        };
        let num_labels = num_labels_of(v)?;
        let classifier_dropout = match v.get("classifier_dropout") {
            None | Some(Value::Null) => None,
            Some(_) => Some(probability(v, "classifier_dropout", 0.0)?),
        };
        let c = BertConfig {
            vocab_size: get_usize(v, "vocab_size", Some(30522))?,
            hidden_size: get_usize(v, "hidden_size", Some(768))?,
            num_hidden_layers: get_usize(v, "num_hidden_layers", Some(12))?,
            num_attention_heads: get_usize(v, "num_attention_heads", Some(12))?,
            intermediate_size: get_usize(v, "intermediate_size", Some(3072))?,
            hidden_act: act,
            hidden_dropout_prob: probability(v, "hidden_dropout_prob", 0.1)?,
            attention_probs_dropout_prob: probability(v, "attention_probs_dropout_prob", 0.1)?,
            max_position_embeddings: get_usize(v, "max_position_embeddings", Some(512))?,
            type_vocab_size: get_usize(v, "type_vocab_size", Some(2))?,
            layer_norm_eps: get_f32(v, "layer_norm_eps", 1e-12)?,
            initializer_range: get_f32(v, "initializer_range", 0.02)?,
            pad_token_id: u32::try_from(get_usize(v, "pad_token_id", Some(0))?)
                .map_err(|_| Error::format(ctx(), "pad_token_id does not fit in u32"))?,
            num_labels,
            classifier_dropout,
            quantization_config: v.get("quantization_config").filter(|q| !q.is_null()).cloned(),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the sizes (see [`BertConfig::from_json`]).
    pub fn validate(&self) -> Result<()> {
        check_sizes(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
            ("num_labels", self.num_labels),
        ])?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::format(
                ctx(),
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(Error::format(ctx(), "layer_norm_eps must be finite and >= 0"));
        }
        Ok(())
    }

    /// `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The dropout before the classifier (`classifier_dropout`, else `hidden_dropout_prob`).
    pub fn classifier_dropout_prob(&self) -> f32 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}
