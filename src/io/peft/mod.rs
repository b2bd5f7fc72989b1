//! HF PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`), read and written the
//! way PEFT >= 0.21 does, for LoRA (with DoRA and rsLoRA), WaveFT and VB-LoRA.
//!
//! # Files
//! * `adapter_config.json`: written like `PeftConfig.save_pretrained`, i.e. `json.dumps(config, indent=2,
//!   sort_keys=True)` byte for byte (see `pyjson`). Keys we do not model are kept and written back; missing
//!   keys take PEFT's defaults; a config without `peft_version` is written with [`PEFT_FORMAT_VERSION`]
//!   (PEFT itself only uses that field as information).
//! * `adapter_model.safetensors`, metadata `{"format": "pt"}`. Keys (`<m>` = module path in the base model):
//!
//!   | key | shape |
//!   |---|---|
//!   | `base_model.model.<m>.lora_A.weight` | `[r, in]` |
//!   | `base_model.model.<m>.lora_B.weight` | `[out, r]` |
//!   | `base_model.model.<m>.lora_B.bias` (`lora_bias`) | `[out]` |
//!   | `base_model.model.<m>.lora_magnitude_vector` (DoRA, no `.weight`) | `[out]` |
//!   | `base_model.model.<m>.lora_embedding_A` / `_B` (embeddings) | `[r, vocab]` / `[dim, r]` |
//!   | `base_model.model.<m>.waveft_spectrum` | `[n_frequency]` |
//!   | `base_model.vblora_vector_bank` (shared, no `.model.`) | `[num_vectors, vector_length]` |
//!   | `base_model.model.<m>.vblora_logits_A` / `_B` | `[r, in/L, num_vectors]` / `[out/L, r, num_vectors]` |
//!   | `..._topk_indices` / `..._topk_weights` (`save_only_topk_weights`) | `[.., k]` int / `[.., k-1]` float |
//!
//!   plus, depending on the config, trained biases (`bias="all"` or `"<method>_only"`: any `<path>.bias`,
//!   `<m>.base_layer.bias` for wrapped layers) and `modules_to_save` copies (`<x>.<param>`, and with
//!   `bias="all"` also `<x>.modules_to_save.bias` / `<x>.original_module.bias`).
//! * The legacy `adapter_model.bin` (a pickle) is not supported: loading it would mean unpickling untrusted
//!   code. The error says how to convert it.
//!
//! # Per-layer resolution (PEFT's exact rules)
//! * [`AdapterConfig::targets`] is `check_target_module_exists`: `exclude_modules` first (a list entry
//!   matches the full name or a `.`-suffix, a string is a full regex match), then modules matched by
//!   `modules_to_save` are never targets, then `target_modules`: a list entry matches the full name (this
//!   bypasses `layers_to_transform`) or a `.`-suffix (then filtered by the layer index found with
//!   `layers_pattern`); a string is a full regex match; `"all-linear"` (any case) is every linear / Conv1D
//!   layer. What a safetensors base cannot tell us is the module's class, so the caller says whether it is
//!   linear. For a transformers `PreTrainedModel` PEFT also drops the output embedding (`lm_head`) and, for
//!   `SEQ_CLS`, the classifier head from `"all-linear"`: pass `is_linear = false` for those. PEFT writes the
//!   expanded module list (not `"all-linear"`) into the configs it saves. `target_modules: null` means "the
//!   architecture's defaults", which a config alone cannot know: nothing is targeted then.
//! * `rank_pattern` / `alpha_pattern` / `n_frequency_pattern` follow `get_pattern_key`: the first key, in
//!   file order, such that `re.match(rf"(.*\.)?({key})$", module)` matches. PEFT saves these dicts with
//!   sorted keys, so for PEFT-written files file order is sorted order; we write them sorted too.
//! * Scaling: LoRA `alpha / r` (rsLoRA `alpha / sqrt(r)`), in f64 like Python; WaveFT `scaling`; VB-LoRA 1.
//!
//! Regexes are compiled with the `regex` crate, whose syntax is Python's minus look-around and
//! back-references; such patterns are rejected when the config is loaded.

mod adapter;
mod config;
mod keys;
mod pyjson;

pub use adapter::*;
pub use config::*;
pub use keys::*;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::{SafetensorsFile, TensorBytes, atomic_write, from_st_dtype, write_safetensors};
use crate::tensor::{DType, Tensor};
use pyjson::Json;
use regex::Regex;
use safetensors::Dtype as StDtype;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// File name of the adapter config.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The legacy pickle weights file (not supported).
pub const LEGACY_WEIGHTS_NAME: &str = "adapter_model.bin";
/// The PEFT release whose file format this module writes; used as `peft_version` when a config has none.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";
/// Key of the VB-LoRA vector bank (it lives on the tuner, hence no `.model.`).
pub const VBLORA_BANK_KEY: &str = "base_model.vblora_vector_bank";

const MODEL_PREFIX: &str = "base_model.model.";

/// The adapter file key of `suffix` on `module`: `"base_model.model.<module>.<suffix>"`.
pub fn module_key(module: &str, suffix: &str) -> String {
    format!("{MODEL_PREFIX}{module}.{suffix}")
}

/// The base checkpoint's weight of `module`: `"<module>.weight"`.
pub fn base_weight_name(module: &str) -> String {
    format!("{module}.weight")
}

fn cfg_err(msg: impl Into<String>) -> Error {
    Error::format(CONFIG_NAME, msg)
}
