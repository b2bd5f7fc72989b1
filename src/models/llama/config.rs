//! `config.json` of a Llama-family checkpoint: transformers' `LlamaConfig`, `MistralConfig` and
//! `Qwen2Config` (`models/{llama,mistral,qwen2}/configuration_*.py`), with the rotary settings as
//! transformers 5 writes them (`rope_parameters`) or as transformers 4 did (`rope_theta` +
//! `rope_scaling`).

use crate::autograd::Activation;
use crate::error::{Error, Result};
use crate::models::config::{
    activation_from_name, check_sizes, get_f32, get_usize, num_labels_of, probability,
};
use crate::nn::{RopeConfig, RopeScaling};
use serde_json::Value;

/// Which decoder of the family (they differ only in biases, sliding windows and defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlamaArch {
    /// `model_type: "llama"` (Llama 2, Llama 3.x): `attention_bias` (q/k/v/o) and `mlp_bias` optional.
    Llama,
    /// `model_type: "mistral"`: no biases, `sliding_window` (sequences up to the window are supported).
    Mistral,
    /// `model_type: "qwen2"`: q/k/v biases, o_proj and the MLP without.
    Qwen2,
}

impl LlamaArch {
    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaArch::Llama => "llama",
            LlamaArch::Mistral => "mistral",
            LlamaArch::Qwen2 => "qwen2",
        }
    }

    /// The architecture of `model_type`, if it is one of the family.
    pub fn from_model_type(t: &str) -> Option<LlamaArch> {
        match t {
            "llama" => Some(LlamaArch::Llama),
            "mistral" => Some(LlamaArch::Mistral),
            "qwen2" => Some(LlamaArch::Qwen2),
            _ => None,
        }
    }
}

/// The fields of a Llama / Mistral / Qwen2 `config.json` the model uses.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub arch: LlamaArch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (grouped-query attention; `num_attention_heads` when absent).
    pub num_key_value_heads: usize,
    /// `head_dim` (`hidden_size / num_attention_heads` when absent).
    pub head_dim: usize,
    /// `hidden_act` of the gated MLP (SiLU in every released checkpoint).
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    /// `rope_theta` and `rope_type` (`default`, `linear`, `llama3`).
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Biases on q/k/v (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// The lm_head shares the token embedding table.
    pub tie_word_embeddings: bool,
    /// The attention window, if the config turns one on (Mistral's `sliding_window`, Qwen2's with
    /// `use_sliding_window`); longer sequences are refused (not implemented).
    pub sliding_window: Option<usize>,
    pub attention_dropout: f32,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub initializer_range: f32,
    /// Labels of `LlamaForSequenceClassification` (`num_labels`, else the size of `id2label`, else 2).
    pub num_labels: usize,
    /// The `quantization_config` object, if the checkpoint was saved quantized.
    pub quantization_config: Option<Value>,
}

fn ctx() -> &'static str {
    "config.json"
}

fn opt_token(v: &Value, key: &str) -> Result<Option<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        // Llama 3 lists several eos ids: the first is the one we use.
        Some(Value::Array(a)) => match a.first() {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| Error::format(ctx(), format!("{key:?} must hold token ids, got {x}"))),
        },
        Some(_) => Ok(Some(u32::try_from(get_usize(v, key, None)?).map_err(|_| {
            Error::format(ctx(), format!("{key:?} does not fit in u32"))
        })?)),
    }
}

fn get_bool(v: &Value, key: &str, default: bool) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(x) => Err(Error::format(
            ctx(),
            format!("{key:?} must be a boolean, got {x}"),
        )),
    }
}

/// The rotary settings: transformers 5's `rope_parameters` object, else transformers 4's `rope_theta`
/// and `rope_scaling` (`type` or `rope_type`).
fn rope_of(v: &Value) -> Result<(f32, RopeScaling)> {
    let params = v.get("rope_parameters").filter(|p| !p.is_null());
    let scaling = v.get("rope_scaling").filter(|p| !p.is_null());
    let theta = match params {
        Some(p) if p.get("rope_theta").is_some() => get_f32(p, "rope_theta", 10000.0)?,
        _ => get_f32(v, "rope_theta", 10000.0)?,
    };
    let Some(s) = params.or(scaling) else {
        return Ok((theta, RopeScaling::None));
    };
    if !s.is_object() {
        return Err(Error::format(
            ctx(),
            format!("rope parameters must be an object, got {s}"),
        ));
    }
    if let Some(f) = s.get("partial_rotary_factor").and_then(Value::as_f64)
        && f != 1.0
    {
        return Err(Error::format(
            ctx(),
            format!("partial_rotary_factor {f} is not supported"),
        ));
    }
    let ty = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || get_f32(s, "factor", 1.0);
    let scaling = match ty {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: get_f32(s, "low_freq_factor", 1.0)?,
            high_freq_factor: get_f32(s, "high_freq_factor", 4.0)?,
            original_max_position_embeddings: get_usize(s, "original_max_position_embeddings", None)?,
        },
        other => {
            return Err(Error::format(
                ctx(),
                format!("rope_type {other:?} is not supported (default, linear, llama3)"),
            ));
        }
    };
    Ok((theta, scaling))
}

impl LlamaConfig {
    /// Parses a Llama / Mistral / Qwen2 `config.json` object (defaults as transformers' config classes).
    /// Validates sizes: positive dimensions, `num_attention_heads % num_key_value_heads == 0`, an even
    /// `head_dim`, a supported rotary type.
    pub fn from_json(v: &Value) -> Result<LlamaConfig> {
        let ty = v.get("model_type").and_then(Value::as_str).unwrap_or("llama");
        let arch = LlamaArch::from_model_type(ty).ok_or_else(|| {
            Error::format(ctx(), format!("model_type {ty:?} is not llama, mistral or qwen2"))
        })?;
        // (vocab, intermediate, max positions) defaults of each config class.
        let (dv, di, dp) = match arch {
            LlamaArch::Llama => (32000, 11008, 2048),
            LlamaArch::Mistral => (32000, 14336, 4096 * 32),
            LlamaArch::Qwen2 => (151936, 22016, 32768),
        };
        let heads = get_usize(v, "num_attention_heads", Some(32))?;
        let hidden = get_usize(v, "hidden_size", Some(4096))?;
        let act = match v.get("hidden_act") {
            None | Some(Value::Null) => Activation::Silu,
            Some(Value::String(s)) => activation_from_name(s)?,
            Some(x) => {
                return Err(Error::format(
                    ctx(),
                    format!("hidden_act must be a string, got {x}"),
                ));
            }
        };
        let (rope_theta, rope_scaling) = rope_of(v)?;
        let attention_bias = get_bool(v, "attention_bias", false)?;
        let sliding_window = match arch {
            LlamaArch::Llama => None,
            LlamaArch::Mistral => match v.get("sliding_window") {
                None => Some(4096),
                Some(Value::Null) => None,
                Some(_) => Some(get_usize(v, "sliding_window", None)?),
            },
            LlamaArch::Qwen2 if get_bool(v, "use_sliding_window", false)? => {
                Some(get_usize(v, "sliding_window", Some(4096))?)
            }
            LlamaArch::Qwen2 => None,
        };
        let num_labels = num_labels_of(v)?;
        let heads_nz = heads.max(1);
        let c = LlamaConfig {
            arch,
            vocab_size: get_usize(v, "vocab_size", Some(dv))?,
            hidden_size: hidden,
            intermediate_size: get_usize(v, "intermediate_size", Some(di))?,
            num_hidden_layers: get_usize(v, "num_hidden_layers", Some(32))?,
            num_attention_heads: heads,
            num_key_value_heads: get_usize(
                v,
                "num_key_value_heads",
                Some(if arch == LlamaArch::Mistral { 8 } else { heads }),
            )?,
            head_dim: get_usize(v, "head_dim", Some(hidden / heads_nz))?,
            hidden_act: act,
            max_position_embeddings: get_usize(v, "max_position_embeddings", Some(dp))?,
            rms_norm_eps: get_f32(v, "rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            qkv_bias: arch == LlamaArch::Qwen2 || (arch == LlamaArch::Llama && attention_bias),
            o_bias: arch == LlamaArch::Llama && attention_bias,
            mlp_bias: arch == LlamaArch::Llama && get_bool(v, "mlp_bias", false)?,
            tie_word_embeddings: get_bool(v, "tie_word_embeddings", false)?,
            sliding_window,
            attention_dropout: probability(v, "attention_dropout", 0.0)?,
            pad_token_id: opt_token(v, "pad_token_id")?,
            bos_token_id: opt_token(v, "bos_token_id")?,
            eos_token_id: opt_token(v, "eos_token_id")?,
            initializer_range: get_f32(v, "initializer_range", 0.02)?,
            num_labels,
            quantization_config: v.get("quantization_config").filter(|q| !q.is_null()).cloned(),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the sizes (see [`LlamaConfig::from_json`]).
    pub fn validate(&self) -> Result<()> {
        check_sizes(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_labels", self.num_labels),
        ])?;
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(Error::format(
                ctx(),
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.num_attention_heads.saturating_mul(self.head_dim) > 1 << 24 {
            return Err(Error::format(
                ctx(),
                "num_attention_heads * head_dim is implausibly large",
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(Error::format(ctx(), "rms_norm_eps must be finite and >= 0"));
        }
        // The rotary settings (even head_dim, theta > 1, scaling parameters) are checked by computing them.
        self.rope()
            .inv_freq()
            .map_err(|e| Error::format(ctx(), e.to_string()))?;
        Ok(())
    }

    /// The rotary settings of every attention layer.
    pub fn rope(&self) -> RopeConfig {
        RopeConfig {
            head_dim: self.head_dim,
            theta: self.rope_theta,
            scaling: self.rope_scaling,
        }
    }

    /// Width of the query projection (`num_attention_heads * head_dim`).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projections (`num_key_value_heads * head_dim`).
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}
