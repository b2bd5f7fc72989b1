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

mod pyjson;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::{SafetensorsFile, TensorBytes, atomic_write, from_st_dtype, write_safetensors};
use crate::tensor::{DType, Tensor};
use pyjson::Json;
use regex::Regex;
use safetensors::Dtype as StDtype;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

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

// =============================================================================================== config

/// The PEFT methods this crate reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeftType {
    /// LoRA, including DoRA (`use_dora`) and rsLoRA (`use_rslora`).
    Lora,
    WaveFt,
    VbLora,
}

impl PeftType {
    /// PEFT's spelling: `"LORA"`, `"WAVEFT"`, `"VBLORA"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PeftType::Lora => "LORA",
            PeftType::WaveFt => "WAVEFT",
            PeftType::VbLora => "VBLORA",
        }
    }

    /// The `bias="<x>_only"` spelling of this method.
    pub fn bias_only(self) -> &'static str {
        match self {
            PeftType::Lora => "lora_only",
            PeftType::WaveFt => "waveft_only",
            PeftType::VbLora => "vblora_only",
        }
    }
}

impl std::fmt::Display for PeftType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PeftType {
    type Err = Error;
    fn from_str(s: &str) -> Result<PeftType> {
        match s {
            "LORA" => Ok(PeftType::Lora),
            "WAVEFT" => Ok(PeftType::WaveFt),
            "VBLORA" => Ok(PeftType::VbLora),
            _ => Err(cfg_err(format!(
                "unsupported peft_type {s:?}: peft-kernels reads LORA (incl. DoRA/rsLoRA), WAVEFT and VBLORA adapters"
            ))),
        }
    }
}

/// A value PEFT accepts either alone or as a list (`layers_to_transform`, `layers_pattern`). The form is kept
/// so that a config is written back the way it was given.
#[derive(Clone, Debug, PartialEq)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The values as a slice (one element for `One`).
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(v) => std::slice::from_ref(v),
            OneOrMany::Many(v) => v,
        }
    }
}

/// A regex that must match a whole module name (`re.fullmatch`).
#[derive(Clone, Debug)]
pub struct ModuleRegex {
    source: String,
    re: Regex,
}

impl ModuleRegex {
    /// Compiles `pattern` for full matches.
    pub fn new(pattern: impl Into<String>) -> Result<ModuleRegex> {
        let source = pattern.into();
        let re = compile(&format!("^(?:{source})$"), &source)?;
        Ok(ModuleRegex { source, re })
    }

    /// The pattern as written in the config.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// `re.fullmatch(pattern, name)`.
    pub fn is_full_match(&self, name: &str) -> bool {
        self.re.is_match(name)
    }
}

impl PartialEq for ModuleRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

fn compile(full: &str, source: &str) -> Result<Regex> {
    Regex::new(full).map_err(|e| {
        cfg_err(format!(
            "pattern {source:?} is not a regex the Rust regex crate accepts (Python-only syntax such as \
             look-around or back-references is not supported): {e}"
        ))
    })
}

/// `target_modules`: which modules get an adapter.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Entries match the full module name or a `.`-suffix of it.
    Names(Vec<String>),
    /// A regex that must match the full module name.
    Regex(ModuleRegex),
    /// `"all-linear"`: every linear / Conv1D layer (see [`AdapterConfig::targets`]).
    AllLinear,
}

/// `exclude_modules`: a list (full name or `.`-suffix) or a full-match regex.
#[derive(Clone, Debug, PartialEq)]
pub enum ModuleNames {
    Names(Vec<String>),
    Regex(ModuleRegex),
}

impl ModuleNames {
    fn matches(&self, module: &str) -> bool {
        match self {
            ModuleNames::Regex(r) => r.is_full_match(module),
            ModuleNames::Names(names) => names.iter().any(|n| module == n || ends_with_dot(module, n)),
        }
    }
}

fn ends_with_dot(module: &str, suffix: &str) -> bool {
    module.len() > suffix.len()
        && module.ends_with(suffix)
        && module.as_bytes()[module.len() - suffix.len() - 1] == b'.'
}

/// An ordered `{pattern: value}` dict resolved like PEFT's `get_pattern_key`.
#[derive(Clone, Debug)]
pub struct PatternMap<T> {
    entries: Vec<(String, T, Regex)>,
}

impl<T> Default for PatternMap<T> {
    fn default() -> Self {
        PatternMap { entries: Vec::new() }
    }
}

impl<T: PartialEq> PartialEq for PatternMap<T> {
    fn eq(&self, other: &Self) -> bool {
        self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(&other.entries)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
    }
}

impl<T> PatternMap<T> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces, keeping its position) the value of `key`. Fails if `key` is not a valid regex.
    pub fn insert(&mut self, key: impl Into<String>, value: T) -> Result<()> {
        let key = key.into();
        // get_pattern_key: re.match(rf"(.*\.)?({key})$", module): anchored at the start only.
        let re = compile(&format!("^(?:(.*\\.)?({key})$)"), &key)?;
        match self.entries.iter_mut().find(|e| e.0 == key) {
            Some(e) => e.1 = value,
            None => self.entries.push((key, value, re)),
        }
        Ok(())
    }

    /// The value for `module`: the first key (in insertion order) whose pattern matches, else an exact key.
    pub fn get(&self, module: &str) -> Option<&T> {
        self.entries
            .iter()
            .find(|e| e.2.is_match(module))
            .or_else(|| self.entries.iter().find(|e| e.0 == module))
            .map(|e| &e.1)
    }

    /// `(key, value)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.entries.iter().map(|e| (e.0.as_str(), &e.1))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `init_lora_weights`: `true`/`false` or a named scheme (`"gaussian"`, `"pissa"`, `"loftq"`, ...). Only
/// recorded: initialization does not change how a saved adapter is applied, except that `pissa`, `olora`,
/// `corda` and `loftq` adapters were trained against a *modified* base model.
#[derive(Clone, Debug, PartialEq)]
pub enum InitLoraWeights {
    Bool(bool),
    Named(String),
}

/// LoRA settings (`LoraConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub rank_pattern: PatternMap<usize>,
    pub alpha_pattern: PatternMap<f64>,
    pub lora_dropout: f64,
    pub init_lora_weights: InitLoraWeights,
    /// A trainable bias on `lora_B` (`lora_B.bias`).
    pub lora_bias: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            use_rslora: false,
            use_dora: false,
            rank_pattern: PatternMap::new(),
            alpha_pattern: PatternMap::new(),
            lora_dropout: 0.0,
            init_lora_weights: InitLoraWeights::Bool(true),
            lora_bias: false,
        }
    }
}

/// WaveFT settings (`WaveFTConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct WaveFtConfig {
    pub n_frequency: usize,
    pub scaling: f64,
    pub wavelet_family: String,
    pub use_idwt: bool,
    pub random_loc_seed: i64,
    pub n_frequency_pattern: PatternMap<usize>,
    /// When true, per-layer `n_frequency` depends on every targeted layer's shape: see
    /// [`AdapterConfig::proportional_n_frequency`].
    pub proportional_parameters: bool,
    pub init_weights: bool,
}

impl Default for WaveFtConfig {
    fn default() -> Self {
        WaveFtConfig {
            n_frequency: 2592,
            scaling: 25.0,
            wavelet_family: "db1".into(),
            use_idwt: true,
            random_loc_seed: 777,
            n_frequency_pattern: PatternMap::new(),
            proportional_parameters: false,
            init_weights: true,
        }
    }
}

/// Wavelet families PEFT's `WaveFTConfig` accepts (`WAVELET_REDUCTIONS`).
pub fn waveft_wavelet_families() -> Vec<String> {
    let mut v: Vec<String> = (1..=38).map(|i| format!("db{i}")).collect();
    v.extend((2..=20).map(|i| format!("sym{i}")));
    v.extend((1..=17).map(|i| format!("coif{i}")));
    v
}

/// VB-LoRA settings (`VBLoRAConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct VbLoraConfig {
    pub r: usize,
    pub num_vectors: usize,
    pub vector_length: usize,
    pub topk: usize,
    pub save_only_topk_weights: bool,
    pub vblora_dropout: f64,
    pub init_vector_bank_bound: f64,
    pub init_logits_std: f64,
}

impl Default for VbLoraConfig {
    fn default() -> Self {
        VbLoraConfig {
            r: 4,
            num_vectors: 256,
            vector_length: 256,
            topk: 2,
            save_only_topk_weights: false,
            vblora_dropout: 0.0,
            init_vector_bank_bound: 0.02,
            init_logits_std: 0.1,
        }
    }
}

/// The method-specific part of a config.
#[derive(Clone, Debug, PartialEq)]
pub enum MethodConfig {
    Lora(LoraConfig),
    WaveFt(WaveFtConfig),
    VbLora(VbLoraConfig),
}

/// An `adapter_config.json`: the fields shared by the supported methods plus [`MethodConfig`].
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub inference_mode: bool,
    /// The PEFT version that wrote the file (`None`: written as [`PEFT_FORMAT_VERSION`]).
    pub peft_version: Option<String>,
    pub target_modules: Option<TargetModules>,
    pub exclude_modules: Option<ModuleNames>,
    pub modules_to_save: Option<Vec<String>>,
    pub layers_to_transform: Option<OneOrMany<i64>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    /// Base weights stored `[in, out]` (GPT-2 `Conv1D`).
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"<method>_only"` (which base biases were trained and saved).
    pub bias: String,
    pub method: MethodConfig,
    /// Every key of the file as read, so that keys we do not model survive a round trip and values keep
    /// their spelling (`8` vs `8.0`) when unchanged.
    raw: Vec<(String, Json)>,
}

/// `TaskType` values PEFT accepts.
const TASK_TYPES: [&str; 6] = [
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
];

impl AdapterConfig {
    /// A config with PEFT's defaults for everything but `method` (no target modules).
    pub fn new(method: MethodConfig) -> AdapterConfig {
        AdapterConfig {
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            peft_version: None,
            target_modules: None,
            exclude_modules: None,
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            fan_in_fan_out: false,
            bias: "none".into(),
            method,
            raw: Vec::new(),
        }
    }

    /// The method.
    pub fn peft_type(&self) -> PeftType {
        match self.method {
            MethodConfig::Lora(_) => PeftType::Lora,
            MethodConfig::WaveFt(_) => PeftType::WaveFt,
            MethodConfig::VbLora(_) => PeftType::VbLora,
        }
    }

    /// The LoRA settings, if this is a LoRA config.
    pub fn lora(&self) -> Option<&LoraConfig> {
        match &self.method {
            MethodConfig::Lora(c) => Some(c),
            _ => None,
        }
    }

    /// The WaveFT settings, if this is a WaveFT config.
    pub fn waveft(&self) -> Option<&WaveFtConfig> {
        match &self.method {
            MethodConfig::WaveFt(c) => Some(c),
            _ => None,
        }
    }

    /// The VB-LoRA settings, if this is a VB-LoRA config.
    pub fn vblora(&self) -> Option<&VbLoraConfig> {
        match &self.method {
            MethodConfig::VbLora(c) => Some(c),
            _ => None,
        }
    }

    /// Names of the keys read from the file that this crate does not model (kept on save).
    pub fn unknown_keys(&self) -> Vec<&str> {
        let known = known_keys(self.peft_type());
        self.raw
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !known.contains(k) && !untyped_defaults(self.peft_type()).iter().any(|(d, _)| d == k))
            .collect()
    }

    // ------------------------------------------------------------------------------------ resolution

    /// Whether PEFT would put an adapter on `module` (see the module docs). `is_linear`: the module is an
    /// `nn.Linear` / `Conv1D` (or a quantized linear) and not the model's output embedding.
    pub fn targets(&self, module: &str, is_linear: bool) -> bool {
        if let Some(ex) = &self.exclude_modules
            && ex.matches(module)
        {
            return false;
        }
        if self.in_modules_to_save(module) {
            return false;
        }
        let names = match &self.target_modules {
            None => return false,
            Some(TargetModules::AllLinear) => return is_linear,
            Some(TargetModules::Regex(r)) => return r.is_full_match(module),
            Some(TargetModules::Names(names)) => names,
        };
        if names.iter().any(|n| n == module) {
            return true;
        }
        if !names.iter().any(|n| ends_with_dot(module, n)) {
            return false;
        }
        let indexes = match &self.layers_to_transform {
            None => return true,
            Some(OneOrMany::Many(v)) if v.is_empty() => return true,
            Some(ix) => ix,
        };
        match self.layer_index(module) {
            None => false,
            Some(i) => match indexes {
                OneOrMany::One(j) => i == *j,
                OneOrMany::Many(v) => v.contains(&i),
            },
        }
    }

    /// The layer index PEFT reads from a module name (the first numbered segment after `layers_pattern`).
    fn layer_index(&self, module: &str) -> Option<i64> {
        // An empty layers_pattern (None, [] or "") means any layer pattern; `[""]` is a pattern.
        let patterns: &[String] = match &self.layers_pattern {
            None => &[],
            Some(OneOrMany::One(p)) if p.is_empty() => &[],
            Some(p) => p.as_slice(),
        };
        let caps = if patterns.is_empty() {
            Regex::new(r"^(?:.*?\.[^.]*\.(?P<idx>\d+)\.)")
                .ok()?
                .captures(module)
        } else {
            patterns.iter().find_map(|p| {
                Regex::new(&format!(r"^(?:(?:^|.*?\.){p}\.(?P<idx>\d+)\.)"))
                    .ok()?
                    .captures(module)
            })
        }?;
        caps.name("idx")?.as_str().parse().ok()
    }

    /// True if `module` is (inside) a `modules_to_save` module, PEFT's exclusion rule
    /// `re.match(rf"(^|.*\.){m}($|\..*)", module)`.
    fn in_modules_to_save(&self, module: &str) -> bool {
        self.modules_to_save.iter().flatten().any(|m| {
            Regex::new(&format!(r"^(?:(?:^|.*\.){m}(?:$|\..*))"))
                .map(|re| re.is_match(module))
                .unwrap_or(false)
        })
    }

    /// The rank of `module`: LoRA `rank_pattern` or `r`; VB-LoRA `r`; `None` for WaveFT.
    pub fn rank_for(&self, module: &str) -> Option<usize> {
        match &self.method {
            MethodConfig::Lora(c) => Some(*c.rank_pattern.get(module).unwrap_or(&c.r)),
            MethodConfig::VbLora(c) => Some(c.r),
            MethodConfig::WaveFt(_) => None,
        }
    }

    /// LoRA's alpha for `module` (`alpha_pattern` or `lora_alpha`); `None` for other methods.
    pub fn alpha_for(&self, module: &str) -> Option<f64> {
        match &self.method {
            MethodConfig::Lora(c) => Some(*c.alpha_pattern.get(module).unwrap_or(&c.lora_alpha)),
            _ => None,
        }
    }

    /// The factor applied to the adapter's output: LoRA `alpha / r` (rsLoRA `alpha / sqrt(r)`), WaveFT
    /// `scaling`, VB-LoRA 1.
    pub fn scaling_for(&self, module: &str) -> f64 {
        match &self.method {
            MethodConfig::Lora(c) => {
                let r = *c.rank_pattern.get(module).unwrap_or(&c.r) as f64;
                let alpha = *c.alpha_pattern.get(module).unwrap_or(&c.lora_alpha);
                if c.use_rslora { alpha / r.sqrt() } else { alpha / r }
            }
            MethodConfig::WaveFt(c) => c.scaling,
            MethodConfig::VbLora(_) => 1.0,
        }
    }

    /// WaveFT's `n_frequency` for `module` (`n_frequency_pattern` or `n_frequency`). `None` for other
    /// methods and with `proportional_parameters`, where it depends on all targeted layers
    /// ([`AdapterConfig::proportional_n_frequency`]).
    pub fn n_frequency_for(&self, module: &str) -> Option<usize> {
        match &self.method {
            MethodConfig::WaveFt(c) if !c.proportional_parameters => {
                Some(*c.n_frequency_pattern.get(module).unwrap_or(&c.n_frequency))
            }
            _ => None,
        }
    }

    /// WaveFT `proportional_parameters`: the budget `n_frequency · L` split over the `L` targeted layers
    /// `(name, in_features, out_features)` in proportion to `in·out`, rounded half to even, at least 1 each
    /// (PEFT's `_calculate_proportional_parameters`). Pass every layer PEFT would target, in any order.
    pub fn proportional_n_frequency(
        &self,
        layers: &[(String, usize, usize)],
    ) -> Result<Vec<(String, usize)>> {
        let c = self
            .waveft()
            .ok_or_else(|| Error::invalid("proportional_n_frequency needs a WaveFT config"))?;
        if layers.is_empty() {
            return Err(Error::invalid(
                "no target modules found for proportional parameter allocation",
            ));
        }
        let total: u128 = layers.iter().map(|(_, i, o)| *i as u128 * *o as u128).sum();
        if total == 0 {
            return Err(Error::invalid("all targeted layers are empty"));
        }
        let budget = (c.n_frequency as u128 * layers.len() as u128) as f64;
        Ok(layers
            .iter()
            .map(|(name, i, o)| {
                let ratio = (*i as u128 * *o as u128) as f64 / total as f64;
                let n = (ratio * budget).round_ties_even().max(1.0) as usize;
                (name.clone(), n)
            })
            .collect())
    }

    // ------------------------------------------------------------------------------------ validation

    /// The checks PEFT's config classes make on construction, plus range checks PEFT makes when it builds
    /// the layers.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.task_type
            && !TASK_TYPES.contains(&t.as_str())
        {
            return Err(cfg_err(format!(
                "invalid task_type {t:?}; must be one of {TASK_TYPES:?}"
            )));
        }
        let pt = self.peft_type();
        if !["none", "all", pt.bias_only()].contains(&self.bias.as_str()) {
            return Err(cfg_err(format!(
                "bias must be \"none\", \"all\" or \"{}\", got {:?}",
                pt.bias_only(),
                self.bias
            )));
        }
        if matches!(
            self.target_modules,
            Some(TargetModules::Regex(_)) | Some(TargetModules::AllLinear)
        ) {
            if self.layers_to_transform.is_some() {
                return Err(cfg_err(
                    "`layers_to_transform` cannot be used when `target_modules` is a str",
                ));
            }
            if self.layers_pattern.is_some() {
                return Err(cfg_err(
                    "`layers_pattern` cannot be used when `target_modules` is a str",
                ));
            }
        }
        let pattern_truthy = match &self.layers_pattern {
            None => false,
            Some(OneOrMany::One(s)) => !s.is_empty(),
            Some(OneOrMany::Many(v)) => !v.is_empty(),
        };
        if pattern_truthy && self.layers_to_transform.is_none() {
            return Err(cfg_err(
                "when `layers_pattern` is specified, `layers_to_transform` must also be specified",
            ));
        }
        for m in self.modules_to_save.iter().flatten() {
            compile(&format!(r"^(?:(?:^|.*\.){m}(?:$|\..*))"), m)?;
        }
        for p in self.layers_pattern.iter().flat_map(|p| p.as_slice()) {
            compile(&format!(r"^(?:(?:^|.*?\.){p}\.(?P<idx>\d+)\.)"), p)?;
        }
        match &self.method {
            MethodConfig::Lora(c) => {
                if c.r == 0 {
                    return Err(cfg_err("`r` should be a positive integer, got 0"));
                }
                if let Some((k, _)) = c.rank_pattern.iter().find(|(_, r)| **r == 0) {
                    return Err(cfg_err(format!(
                        "rank_pattern[{k:?}] should be a positive integer, got 0"
                    )));
                }
                if !(0.0..=1.0).contains(&c.lora_dropout) {
                    return Err(cfg_err(format!(
                        "lora_dropout must be in [0, 1], got {}",
                        c.lora_dropout
                    )));
                }
                if c.lora_bias {
                    if !matches!(c.init_lora_weights, InitLoraWeights::Bool(_)) {
                        return Err(cfg_err(
                            "lora_bias=True is only supported with init_lora_weights=True or False",
                        ));
                    }
                    if c.use_dora {
                        return Err(cfg_err("lora_bias=True is not supported for DoRA"));
                    }
                }
            }
            MethodConfig::WaveFt(c) => {
                if c.n_frequency == 0 {
                    return Err(cfg_err("n_frequency must be positive"));
                }
                if let Some((k, _)) = c.n_frequency_pattern.iter().find(|(_, n)| **n == 0) {
                    return Err(cfg_err(format!("n_frequency_pattern[{k:?}] must be positive")));
                }
                if !waveft_wavelet_families().contains(&c.wavelet_family) {
                    return Err(cfg_err(format!(
                        "wavelet family {:?} not supported (PEFT accepts db1-db38, sym2-sym20, coif1-coif17)",
                        c.wavelet_family
                    )));
                }
            }
            MethodConfig::VbLora(c) => {
                for (name, v) in [
                    ("r", c.r),
                    ("topk", c.topk),
                    ("num_vectors", c.num_vectors),
                    ("vector_length", c.vector_length),
                ] {
                    if v == 0 {
                        return Err(cfg_err(format!("`{name}` should be a positive integer, got 0")));
                    }
                }
                if c.topk > c.num_vectors {
                    return Err(cfg_err(format!(
                        "topk ({}) cannot exceed num_vectors ({})",
                        c.topk, c.num_vectors
                    )));
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------ JSON

    /// Parses an `adapter_config.json`.
    pub fn from_json_str(text: &str) -> Result<AdapterConfig> {
        let json = pyjson::parse(text).map_err(|e| cfg_err(format!("invalid JSON: {e}")))?;
        let Json::Dict(raw) = json else {
            return Err(cfg_err(format!("expected a JSON object, got {}", json.kind())));
        };
        let obj = Obj(&raw);
        let peft_type: PeftType = match obj.get("peft_type") {
            None | Some(Json::Null) => {
                return Err(cfg_err("missing `peft_type` (PEFT requires at least this key)"));
            }
            Some(Json::Str(s)) => s.parse()?,
            Some(v) => return Err(cfg_err(format!("peft_type must be a string, got {}", v.kind()))),
        };
        let method = match peft_type {
            PeftType::Lora => {
                let d = LoraConfig::default();
                MethodConfig::Lora(LoraConfig {
                    r: obj.usize_or("r", d.r)?,
                    lora_alpha: obj.f64_or("lora_alpha", d.lora_alpha)?,
                    use_rslora: obj.bool_or("use_rslora", d.use_rslora)?,
                    use_dora: obj.bool_or("use_dora", d.use_dora)?,
                    rank_pattern: obj.patterns("rank_pattern", |k, v| {
                        json_usize(v).ok_or_else(|| {
                            cfg_err(format!(
                                "rank_pattern[{k:?}] must be a non-negative integer, got {v}"
                            ))
                        })
                    })?,
                    alpha_pattern: obj.patterns("alpha_pattern", |k, v| {
                        v.as_f64()
                            .ok_or_else(|| cfg_err(format!("alpha_pattern[{k:?}] must be a number, got {v}")))
                    })?,
                    lora_dropout: obj.f64_or("lora_dropout", d.lora_dropout)?,
                    init_lora_weights: match obj.get("init_lora_weights") {
                        None => d.init_lora_weights,
                        Some(Json::Bool(b)) => InitLoraWeights::Bool(*b),
                        Some(Json::Str(s)) => InitLoraWeights::Named(s.clone()),
                        Some(v) => {
                            return Err(cfg_err(format!(
                                "init_lora_weights must be a boolean or a string, got {}",
                                v.kind()
                            )));
                        }
                    },
                    lora_bias: obj.bool_or("lora_bias", d.lora_bias)?,
                })
            }
            PeftType::WaveFt => {
                let d = WaveFtConfig::default();
                MethodConfig::WaveFt(WaveFtConfig {
                    n_frequency: obj.usize_or("n_frequency", d.n_frequency)?,
                    scaling: obj.f64_or("scaling", d.scaling)?,
                    wavelet_family: obj.string_or("wavelet_family", &d.wavelet_family)?,
                    use_idwt: obj.bool_or("use_idwt", d.use_idwt)?,
                    random_loc_seed: obj.i64_or("random_loc_seed", d.random_loc_seed)?,
                    n_frequency_pattern: obj.patterns("n_frequency_pattern", |k, v| {
                        json_usize(v).ok_or_else(|| {
                            cfg_err(format!(
                                "n_frequency_pattern[{k:?}] must be a non-negative integer, got {v}"
                            ))
                        })
                    })?,
                    proportional_parameters: obj
                        .bool_or("proportional_parameters", d.proportional_parameters)?,
                    init_weights: obj.bool_or("init_weights", d.init_weights)?,
                })
            }
            PeftType::VbLora => {
                let d = VbLoraConfig::default();
                MethodConfig::VbLora(VbLoraConfig {
                    r: obj.usize_or("r", d.r)?,
                    num_vectors: obj.usize_or("num_vectors", d.num_vectors)?,
                    vector_length: obj.usize_or("vector_length", d.vector_length)?,
                    topk: obj.usize_or("topk", d.topk)?,
                    save_only_topk_weights: obj
                        .bool_or("save_only_topk_weights", d.save_only_topk_weights)?,
                    vblora_dropout: obj.f64_or("vblora_dropout", d.vblora_dropout)?,
                    init_vector_bank_bound: obj.f64_or("init_vector_bank_bound", d.init_vector_bank_bound)?,
                    init_logits_std: obj.f64_or("init_logits_std", d.init_logits_std)?,
                })
            }
        };
        let target_modules = match obj.get("target_modules") {
            None | Some(Json::Null) => None,
            Some(Json::Str(s)) if s.eq_ignore_ascii_case("all-linear") => Some(TargetModules::AllLinear),
            Some(Json::Str(s)) => Some(TargetModules::Regex(ModuleRegex::new(s.clone())?)),
            Some(v) => Some(TargetModules::Names(json_str_list(v, "target_modules")?)),
        };
        let exclude_modules = match obj.get("exclude_modules") {
            None | Some(Json::Null) => None,
            Some(Json::Str(s)) => Some(ModuleNames::Regex(ModuleRegex::new(s.clone())?)),
            Some(v) => Some(ModuleNames::Names(json_str_list(v, "exclude_modules")?)),
        };
        let modules_to_save = match obj.get("modules_to_save") {
            None | Some(Json::Null) => None,
            Some(v) => Some(json_str_list(v, "modules_to_save")?),
        };
        let layers_to_transform = match obj.get("layers_to_transform") {
            None | Some(Json::Null) => None,
            Some(Json::List(items)) => Some(OneOrMany::Many(
                items
                    .iter()
                    .map(|v| {
                        v.as_i64().ok_or_else(|| {
                            cfg_err(format!("layers_to_transform entries must be integers, got {v}"))
                        })
                    })
                    .collect::<Result<_>>()?,
            )),
            Some(v) => Some(OneOrMany::One(v.as_i64().ok_or_else(|| {
                cfg_err(format!(
                    "layers_to_transform must be an integer or a list, got {}",
                    v.kind()
                ))
            })?)),
        };
        let layers_pattern = match obj.get("layers_pattern") {
            None | Some(Json::Null) => None,
            Some(Json::Str(s)) => Some(OneOrMany::One(s.clone())),
            Some(v) => Some(OneOrMany::Many(json_str_list(v, "layers_pattern")?)),
        };
        let cfg = AdapterConfig {
            task_type: obj.opt_string("task_type")?,
            base_model_name_or_path: obj.opt_string("base_model_name_or_path")?,
            revision: obj.opt_string("revision")?,
            inference_mode: obj.bool_or("inference_mode", false)?,
            peft_version: obj.opt_string("peft_version")?,
            target_modules,
            exclude_modules,
            modules_to_save,
            layers_to_transform,
            layers_pattern,
            fan_in_fan_out: obj.bool_or("fan_in_fan_out", false)?,
            bias: obj.string_or("bias", "none")?,
            method,
            raw,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `path` (an `adapter_config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<AdapterConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        AdapterConfig::from_json_str(&text).map_err(|e| match e {
            Error::Format { msg, .. } => Error::format(path.display().to_string(), msg),
            e => e,
        })
    }

    /// The config as PEFT writes it: `json.dumps(..., indent=2, sort_keys=True)`, every key of PEFT's
    /// config class present, unknown keys kept, unchanged values spelled as they were read.
    pub fn to_json_string(&self) -> Result<String> {
        self.validate()?;
        let mut out: Vec<(String, Json)> = untyped_defaults(self.peft_type())
            .into_iter()
            .filter(|(k, _)| !self.raw.iter().any(|(r, _)| r == k))
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        out.extend(self.raw.iter().cloned());
        for (key, typed) in self.typed_fields() {
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) if slot.1.py_eq(&typed) => {}
                Some(slot) => slot.1 = typed,
                None => out.push((key.to_string(), typed)),
            }
        }
        Ok(pyjson::dumps_sorted(&Json::Dict(out)))
    }

    fn typed_fields(&self) -> Vec<(&'static str, Json)> {
        let opt_str = |s: &Option<String>| s.as_ref().map_or(Json::Null, |s| Json::str(s.clone()));
        let str_list = |v: &[String]| Json::List(v.iter().map(|s| Json::str(s.clone())).collect());
        let mut f = vec![
            ("peft_type", Json::str(self.peft_type().as_str())),
            ("task_type", opt_str(&self.task_type)),
            ("base_model_name_or_path", opt_str(&self.base_model_name_or_path)),
            ("revision", opt_str(&self.revision)),
            ("inference_mode", Json::Bool(self.inference_mode)),
            (
                "peft_version",
                Json::str(
                    self.peft_version
                        .clone()
                        .unwrap_or_else(|| PEFT_FORMAT_VERSION.into()),
                ),
            ),
            (
                "target_modules",
                match &self.target_modules {
                    None => Json::Null,
                    Some(TargetModules::AllLinear) => Json::str("all-linear"),
                    Some(TargetModules::Regex(r)) => Json::str(r.as_str()),
                    Some(TargetModules::Names(n)) => str_list(n),
                },
            ),
            (
                "exclude_modules",
                match &self.exclude_modules {
                    None => Json::Null,
                    Some(ModuleNames::Regex(r)) => Json::str(r.as_str()),
                    Some(ModuleNames::Names(n)) => str_list(n),
                },
            ),
            (
                "modules_to_save",
                self.modules_to_save.as_deref().map_or(Json::Null, str_list),
            ),
            (
                "layers_to_transform",
                match &self.layers_to_transform {
                    None => Json::Null,
                    Some(OneOrMany::One(i)) => Json::int(*i),
                    Some(OneOrMany::Many(v)) => Json::List(v.iter().map(|i| Json::int(*i)).collect()),
                },
            ),
            (
                "layers_pattern",
                match &self.layers_pattern {
                    None => Json::Null,
                    Some(OneOrMany::One(s)) => Json::str(s.clone()),
                    Some(OneOrMany::Many(v)) => str_list(v),
                },
            ),
            ("fan_in_fan_out", Json::Bool(self.fan_in_fan_out)),
            ("bias", Json::str(self.bias.clone())),
        ];
        let usize_json = |v: usize| Json::Int(v.to_string());
        match &self.method {
            MethodConfig::Lora(c) => f.extend([
                ("r", usize_json(c.r)),
                ("lora_alpha", int_if_integral(c.lora_alpha)),
                ("use_rslora", Json::Bool(c.use_rslora)),
                ("use_dora", Json::Bool(c.use_dora)),
                (
                    "rank_pattern",
                    Json::Dict(
                        c.rank_pattern
                            .iter()
                            .map(|(k, v)| (k.to_string(), usize_json(*v)))
                            .collect(),
                    ),
                ),
                (
                    "alpha_pattern",
                    Json::Dict(
                        c.alpha_pattern
                            .iter()
                            .map(|(k, v)| (k.to_string(), int_if_integral(*v)))
                            .collect(),
                    ),
                ),
                ("lora_dropout", Json::Float(c.lora_dropout)),
                (
                    "init_lora_weights",
                    match &c.init_lora_weights {
                        InitLoraWeights::Bool(b) => Json::Bool(*b),
                        InitLoraWeights::Named(s) => Json::str(s.clone()),
                    },
                ),
                ("lora_bias", Json::Bool(c.lora_bias)),
            ]),
            MethodConfig::WaveFt(c) => f.extend([
                ("n_frequency", usize_json(c.n_frequency)),
                ("scaling", Json::Float(c.scaling)),
                ("wavelet_family", Json::str(c.wavelet_family.clone())),
                ("use_idwt", Json::Bool(c.use_idwt)),
                ("random_loc_seed", Json::int(c.random_loc_seed)),
                (
                    "n_frequency_pattern",
                    Json::Dict(
                        c.n_frequency_pattern
                            .iter()
                            .map(|(k, v)| (k.to_string(), usize_json(*v)))
                            .collect(),
                    ),
                ),
                ("proportional_parameters", Json::Bool(c.proportional_parameters)),
                ("init_weights", Json::Bool(c.init_weights)),
            ]),
            MethodConfig::VbLora(c) => f.extend([
                ("r", usize_json(c.r)),
                ("num_vectors", usize_json(c.num_vectors)),
                ("vector_length", usize_json(c.vector_length)),
                ("topk", usize_json(c.topk)),
                ("save_only_topk_weights", Json::Bool(c.save_only_topk_weights)),
                ("vblora_dropout", Json::Float(c.vblora_dropout)),
                ("init_vector_bank_bound", Json::Float(c.init_vector_bank_bound)),
                ("init_logits_std", Json::Float(c.init_logits_std)),
            ]),
        }
        f
    }
}

/// Keys with a typed field in [`AdapterConfig`] for `pt`.
fn known_keys(pt: PeftType) -> Vec<&'static str> {
    AdapterConfig::new(match pt {
        PeftType::Lora => MethodConfig::Lora(LoraConfig::default()),
        PeftType::WaveFt => MethodConfig::WaveFt(WaveFtConfig::default()),
        PeftType::VbLora => MethodConfig::VbLora(VbLoraConfig::default()),
    })
    .typed_fields()
    .into_iter()
    .map(|(k, _)| k)
    .collect()
}

/// The keys PEFT 0.21.2's config classes write that have no typed field here, with their defaults; a
/// config that lacks them (hand-written, or from an older PEFT) gets them on save, as PEFT would.
fn untyped_defaults(pt: PeftType) -> Vec<(&'static str, Json)> {
    let mut v = vec![("auto_mapping", Json::Null)];
    if pt == PeftType::Lora {
        v.extend([
            ("alora_invocation_tokens", Json::Null),
            ("arrow_config", Json::Null),
            ("corda_config", Json::Null),
            ("ensure_weight_tying", Json::Bool(false)),
            ("eva_config", Json::Null),
            ("kasa_config", Json::Null),
            ("layer_replication", Json::Null),
            ("loftq_config", Json::Dict(Vec::new())),
            ("lora_ga_config", Json::Null),
            ("megatron_config", Json::Null),
            ("megatron_core", Json::str("megatron.core")),
            ("monteclora_config", Json::Null),
            ("qalora_group_size", Json::int(16)),
            ("target_parameters", Json::Null),
            ("trainable_token_indices", Json::Null),
            ("use_bdlora", Json::Null),
            ("use_qalora", Json::Bool(false)),
            ("velora_config", Json::Null),
        ]);
    }
    v
}

fn int_if_integral(v: f64) -> Json {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.007_199_254_740_992e15 {
        Json::int(v as i64)
    } else {
        Json::Float(v)
    }
}

fn json_usize(v: &Json) -> Option<usize> {
    match v {
        Json::Int(s) => s.parse().ok(),
        _ => None,
    }
}

fn json_str_list(v: &Json, key: &str) -> Result<Vec<String>> {
    match v {
        Json::List(items) => items
            .iter()
            .map(|i| match i {
                Json::Str(s) => Ok(s.clone()),
                other => Err(cfg_err(format!(
                    "{key} entries must be strings, got {}",
                    other.kind()
                ))),
            })
            .collect(),
        other => Err(cfg_err(format!(
            "{key} must be a string or a list of strings, got {}",
            other.kind()
        ))),
    }
}

/// Typed access to a JSON object, with PEFT's defaults for missing keys.
struct Obj<'a>(&'a [(String, Json)]);

impl Obj<'_> {
    fn get(&self, key: &str) -> Option<&Json> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Json::Bool(b)) => Ok(*b),
            Some(v) => Err(cfg_err(format!("{key} must be true or false, got {}", v.kind()))),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                json_usize(v).ok_or_else(|| cfg_err(format!("{key} must be a non-negative integer, got {v}")))
            }
        }
    }

    fn i64_or(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| cfg_err(format!("{key} must be an integer, got {v}"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| cfg_err(format!("{key} must be a number, got {}", v.kind()))),
        }
    }

    fn string_or(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Json::Str(s)) => Ok(s.clone()),
            Some(v) => Err(cfg_err(format!("{key} must be a string, got {}", v.kind()))),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Str(s)) => Ok(Some(s.clone())),
            Some(v) => Err(cfg_err(format!(
                "{key} must be a string or null, got {}",
                v.kind()
            ))),
        }
    }

    fn patterns<T>(&self, key: &str, value: impl Fn(&str, &Json) -> Result<T>) -> Result<PatternMap<T>> {
        let mut map = PatternMap::new();
        match self.get(key) {
            None | Some(Json::Null) => {}
            Some(Json::Dict(entries)) => {
                for (k, v) in entries {
                    map.insert(k.clone(), value(k, v)?)?;
                }
            }
            Some(v) => return Err(cfg_err(format!("{key} must be an object, got {}", v.kind()))),
        }
        Ok(map)
    }
}

// =============================================================================================== keys

/// One kind of per-module adapter tensor, named by its key suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    LoraA,
    LoraB,
    LoraBBias,
    Magnitude,
    EmbeddingA,
    EmbeddingB,
    WaveFtSpectrum,
    VbLogitsA,
    VbLogitsB,
    VbTopkIndicesA,
    VbTopkWeightsA,
    VbTopkIndicesB,
    VbTopkWeightsB,
}

impl Part {
    pub const ALL: [Part; 13] = [
        Part::LoraA,
        Part::LoraB,
        Part::LoraBBias,
        Part::Magnitude,
        Part::EmbeddingA,
        Part::EmbeddingB,
        Part::WaveFtSpectrum,
        Part::VbLogitsA,
        Part::VbLogitsB,
        Part::VbTopkIndicesA,
        Part::VbTopkWeightsA,
        Part::VbTopkIndicesB,
        Part::VbTopkWeightsB,
    ];

    /// The key suffix after `base_model.model.<module>.`.
    pub fn suffix(self) -> &'static str {
        match self {
            Part::LoraA => "lora_A.weight",
            Part::LoraB => "lora_B.weight",
            Part::LoraBBias => "lora_B.bias",
            Part::Magnitude => "lora_magnitude_vector",
            Part::EmbeddingA => "lora_embedding_A",
            Part::EmbeddingB => "lora_embedding_B",
            Part::WaveFtSpectrum => "waveft_spectrum",
            Part::VbLogitsA => "vblora_logits_A",
            Part::VbLogitsB => "vblora_logits_B",
            Part::VbTopkIndicesA => "vblora_logits_A_topk_indices",
            Part::VbTopkWeightsA => "vblora_logits_A_topk_weights",
            Part::VbTopkIndicesB => "vblora_logits_B_topk_indices",
            Part::VbTopkWeightsB => "vblora_logits_B_topk_weights",
        }
    }

    /// The method this tensor belongs to.
    pub fn peft_type(self) -> PeftType {
        match self {
            Part::LoraA
            | Part::LoraB
            | Part::LoraBBias
            | Part::Magnitude
            | Part::EmbeddingA
            | Part::EmbeddingB => PeftType::Lora,
            Part::WaveFtSpectrum => PeftType::WaveFt,
            _ => PeftType::VbLora,
        }
    }

    fn is_index(self) -> bool {
        matches!(self, Part::VbTopkIndicesA | Part::VbTopkIndicesB)
    }
}

/// A tensor of the file that is not a per-module adapter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtraTensor {
    /// The key in the adapter file.
    pub key: String,
    pub kind: ExtraKind,
    /// The tensor of the base checkpoint it stands for (`base_model.model.`, `.base_layer`,
    /// `.modules_to_save` / `.original_module` removed).
    pub base_name: String,
}

/// What an [`ExtraTensor`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraKind {
    /// The shared VB-LoRA vector bank.
    VbLoraBank,
    /// A trained base bias (`bias="all"` or `"<method>_only"`): replaces the base tensor on merge.
    Bias,
    /// A trained copy of a `modules_to_save` parameter: replaces the base tensor on merge.
    ModulesToSave,
    /// The frozen original inside a `ModulesToSaveWrapper` (saved by PEFT with `bias="all"`); unused.
    OriginalModule,
}

enum KeyRole {
    Module { module: String, part: Part },
    Extra(ExtraKind, String),
}

fn classify(key: &str, cfg: &AdapterConfig) -> Result<KeyRole> {
    let ferr = |msg: String| Error::format(WEIGHTS_NAME, msg);
    if key == VBLORA_BANK_KEY {
        if cfg.peft_type() != PeftType::VbLora {
            return Err(ferr(format!(
                "{key:?} is a VB-LoRA tensor but the config's peft_type is {}",
                cfg.peft_type()
            )));
        }
        return Ok(KeyRole::Extra(ExtraKind::VbLoraBank, String::new()));
    }
    let Some(rest) = key.strip_prefix(MODEL_PREFIX) else {
        return Err(ferr(format!(
            "unexpected key {key:?}: PEFT adapter keys start with \"{MODEL_PREFIX}\" (or are \"{VBLORA_BANK_KEY}\")"
        )));
    };
    for part in Part::ALL {
        if let Some(module) = rest.strip_suffix(part.suffix()).and_then(|m| m.strip_suffix('.'))
            && !module.is_empty()
        {
            if part.peft_type() != cfg.peft_type() {
                return Err(ferr(format!(
                    "{key:?} is a {} tensor but the config's peft_type is {}",
                    part.peft_type(),
                    cfg.peft_type()
                )));
            }
            return Ok(KeyRole::Module {
                module: module.to_string(),
                part,
            });
        }
    }
    // modules_to_save: PEFT wraps every module whose name ends with an entry (plain string suffix).
    if let Some(mts) = &cfg.modules_to_save {
        let segs: Vec<&str> = rest.split('.').collect();
        for i in 1..segs.len() {
            let x = segs[..i].join(".");
            if mts.iter().any(|m| x.ends_with(m.as_str())) {
                let (kind, tail) = match segs[i] {
                    "modules_to_save" if i + 1 < segs.len() => (ExtraKind::ModulesToSave, &segs[i + 1..]),
                    "original_module" if i + 1 < segs.len() => (ExtraKind::OriginalModule, &segs[i + 1..]),
                    _ => (ExtraKind::ModulesToSave, &segs[i..]),
                };
                return Ok(KeyRole::Extra(kind, format!("{x}.{}", tail.join("."))));
            }
        }
    }
    if cfg.bias != "none" && (rest == "bias" || rest.ends_with(".bias")) {
        let base = rest
            .split('.')
            .filter(|s| *s != "base_layer")
            .collect::<Vec<_>>()
            .join(".");
        return Ok(KeyRole::Extra(ExtraKind::Bias, base));
    }
    let suffixes: Vec<&str> = Part::ALL
        .iter()
        .filter(|p| p.peft_type() == cfg.peft_type())
        .map(|p| p.suffix())
        .collect();
    Err(ferr(format!(
        "unexpected key {key:?}: not a {} tensor (suffixes {suffixes:?}), not a trained bias (bias={:?}) and not \
         in modules_to_save ({:?})",
        cfg.peft_type(),
        cfg.bias,
        cfg.modules_to_save
    )))
}

// =============================================================================================== adapter

/// The method applied to one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdapterMethod {
    Lora,
    /// LoRA with a magnitude vector (`use_dora`).
    Dora,
    WaveFt,
    VbLora,
}

impl AdapterMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterMethod::Lora => "LoRA",
            AdapterMethod::Dora => "DoRA",
            AdapterMethod::WaveFt => "WaveFT",
            AdapterMethod::VbLora => "VB-LoRA",
        }
    }
}

impl std::fmt::Display for AdapterMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of base layer an adapter sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// `nn.Linear` (weight `[out, in]`), or GPT-2 `Conv1D` (weight `[in, out]`) with `fan_in_fan_out`.
    Linear,
    /// `nn.Embedding` (weight `[vocab, dim]`; LoRA only).
    Embedding,
}

/// Everything about one adapted module.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterModule {
    /// The module path in the base model (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    pub method: AdapterMethod,
    pub layer: LayerKind,
    /// LoRA / DoRA / VB-LoRA rank.
    pub rank: Option<usize>,
    /// LoRA / DoRA alpha.
    pub alpha: Option<f64>,
    /// See [`AdapterConfig::scaling_for`].
    pub scaling: f64,
    /// Base layer input features (`vocab` for embeddings), where the adapter file tells (not WaveFT).
    pub in_features: Option<usize>,
    /// Base layer output features (`dim` for embeddings), where the adapter file tells (not WaveFT).
    pub out_features: Option<usize>,
    /// WaveFT spectrum length.
    pub n_frequency: Option<usize>,
    /// LoRA with a `lora_B.bias`.
    pub lora_bias: bool,
    /// Whether the base weight is stored `[in, out]`.
    pub fan_in_fan_out: bool,
    /// This module's tensors, by part.
    pub parts: BTreeMap<Part, String>,
    /// Trainable parameters (VB-LoRA: the full logits even when only the top-k are stored; the shared bank
    /// is not included).
    pub trainable_params: usize,
    /// Bytes this module's tensors take in the file.
    pub stored_bytes: usize,
}

impl AdapterModule {
    /// The full key of one of this module's tensors.
    pub fn key(&self, part: Part) -> Option<&str> {
        self.parts.get(&part).map(String::as_str)
    }

    /// Expected shape of the base weight as stored (`[out, in]`, `[in, out]` with `fan_in_fan_out`,
    /// `[vocab, dim]` for embeddings), if the adapter file determines it.
    pub fn base_weight_shape(&self) -> Option<[usize; 2]> {
        let (i, o) = (self.in_features?, self.out_features?);
        Some(match self.layer {
            LayerKind::Embedding => [i, o],
            LayerKind::Linear if self.fan_in_fan_out => [i, o],
            LayerKind::Linear => [o, i],
        })
    }
}

/// The structure of an adapter: its modules and other tensors, validated.
#[derive(Clone, Debug)]
pub struct AdapterLayout {
    pub modules: Vec<AdapterModule>,
    pub extras: Vec<ExtraTensor>,
}

/// A PEFT adapter: config plus tensors under their full file keys.
///
/// VB-LoRA `_topk_indices` are held as integers of the crate's dtypes: `int16` files (PEFT's choice for
/// 256 <= num_vectors < 32768) are widened to I32 on load and written back as `int16` on save (the file dtype
/// always follows PEFT's rule, [`vblora_index_dtype`]).
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    pub config: AdapterConfig,
    pub tensors: BTreeMap<String, Tensor>,
}

impl PeftAdapter {
    /// Loads and validates an adapter directory: every key belongs to the config's method and to a module
    /// the config targets, every targeted module's tensors are complete and their shapes agree with the
    /// config (rank patterns included), dtypes are float (integer for VB-LoRA top-k indices, which must be
    /// in range).
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            if dir.exists() {
                return Err(Error::invalid(format!(
                    "{}: not a directory; give the adapter directory (holding {CONFIG_NAME} and {WEIGHTS_NAME})",
                    dir.display()
                )));
            }
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter directory not found"),
            ));
        }
        let cfg_path = dir.join(CONFIG_NAME);
        if !cfg_path.is_file() {
            return Err(Error::format(
                dir.display().to_string(),
                format!("no {CONFIG_NAME} in the adapter directory"),
            ));
        }
        let config = AdapterConfig::from_file(&cfg_path)?;
        let weights = dir.join(WEIGHTS_NAME);
        if !weights.is_file() {
            let msg = if dir.join(LEGACY_WEIGHTS_NAME).is_file() {
                format!(
                    "only the legacy {LEGACY_WEIGHTS_NAME} (a PyTorch pickle) is present, and pickles are not \
                     supported; convert it with: python -c \"import torch, safetensors.torch as st; \
                     st.save_file(torch.load('{LEGACY_WEIGHTS_NAME}', weights_only=True), '{WEIGHTS_NAME}', \
                     metadata={{'format': 'pt'}})\""
                )
            } else {
                format!("no {WEIGHTS_NAME} in the adapter directory")
            };
            return Err(Error::format(dir.display().to_string(), msg));
        }
        let file = SafetensorsFile::open(&weights)?;
        let mut tensors = BTreeMap::new();
        for name in file.names() {
            let role = classify(name, &config).map_err(|e| relabel(e, &weights))?;
            let is_index = matches!(role, KeyRole::Module { part, .. } if part.is_index());
            let (dtype, shape, data) = file.raw(name)?;
            let t = if dtype == StDtype::I16 && is_index {
                let v: Vec<i32> = data
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]) as i32)
                    .collect();
                Tensor::from_vec(v, &shape, Device::Cpu)?
            } else {
                let dt = from_st_dtype(dtype).ok_or_else(|| {
                    file.err(format!(
                        "tensor {name:?} has dtype {dtype:?}, which peft-kernels does not support"
                    ))
                })?;
                Tensor::from_bytes(data, dt, &shape, Device::Cpu)?
            };
            tensors.insert(name.clone(), t);
        }
        let adapter = PeftAdapter { config, tensors };
        // Validate on the host (index ranges need the values), then move.
        adapter.layout().map_err(|e| relabel(e, &weights))?;
        if device != Device::Cpu {
            let tensors = adapter
                .tensors
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_device(device)?)))
                .collect::<Result<_>>()?;
            return Ok(PeftAdapter {
                config: adapter.config,
                tensors,
            });
        }
        Ok(adapter)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (each atomically) into `dir`, creating
    /// it. Validates everything first, so a bad adapter writes nothing. With VB-LoRA
    /// `save_only_topk_weights`, full logits are converted to the top-k form as PEFT does on save.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let adapter = self.to_saved_form()?;
        adapter.layout()?;
        let config_json = adapter.config.to_json_string()?;
        let num_vectors = adapter.config.vblora().map(|c| c.num_vectors);
        let mut out = Vec::with_capacity(adapter.tensors.len());
        for (key, t) in &adapter.tensors {
            let is_index = key.ends_with("_topk_indices") && key.starts_with(MODEL_PREFIX);
            let bytes = match (is_index, num_vectors) {
                (true, Some(nv)) => index_bytes(key, t, nv)?,
                _ => TensorBytes::from_tensor(t)?,
            };
            out.push((key.clone(), bytes));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(dir.join(WEIGHTS_NAME), &out, Some(meta))?;
        atomic_write(dir.join(CONFIG_NAME), config_json.as_bytes())
    }

    /// With `save_only_topk_weights`, full VB-LoRA logits become `_topk_indices` + `_topk_weights`.
    fn to_saved_form(&self) -> Result<Cow<'_, PeftAdapter>> {
        let Some(c) = self.config.vblora().filter(|c| c.save_only_topk_weights) else {
            return Ok(Cow::Borrowed(self));
        };
        let full: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| {
                k.starts_with(MODEL_PREFIX)
                    && (k.ends_with(".vblora_logits_A") || k.ends_with(".vblora_logits_B"))
            })
            .collect();
        if full.is_empty() {
            return Ok(Cow::Borrowed(self));
        }
        let mut a = self.clone();
        for k in full {
            let (idx, w) = vblora_compress_topk(&self.tensors[k], c.topk)?;
            a.tensors.remove(k);
            a.tensors.insert(format!("{k}_topk_indices"), idx);
            a.tensors.insert(format!("{k}_topk_weights"), w);
        }
        Ok(Cow::Owned(a))
    }

    /// The validated structure: per-module info and the other tensors.
    pub fn layout(&self) -> Result<AdapterLayout> {
        analyze(&self.config, &self.tensors)
    }

    /// Per-module information (method, rank, alpha, scaling, shapes, parameter counts), sorted by name.
    pub fn modules(&self) -> Result<Vec<AdapterModule>> {
        Ok(self.layout()?.modules)
    }

    /// All trainable parameters PEFT would count: every module's adapter parameters (VB-LoRA logits in
    /// full), the VB-LoRA bank once, trained biases and `modules_to_save` copies (each base tensor once).
    pub fn num_trainable_params(&self) -> Result<usize> {
        let layout = self.layout()?;
        let mut n: usize = layout.modules.iter().map(|m| m.trainable_params).sum();
        let mut seen = std::collections::BTreeSet::new();
        for e in &layout.extras {
            let counted = match e.kind {
                ExtraKind::VbLoraBank => true,
                ExtraKind::Bias | ExtraKind::ModulesToSave => seen.insert(e.base_name.clone()),
                ExtraKind::OriginalModule => false,
            };
            if counted {
                n += self.tensors[&e.key].numel();
            }
        }
        Ok(n)
    }

    /// The tensor of `part` for `module`.
    pub fn module_tensor(&self, module: &str, part: Part) -> Result<&Tensor> {
        let key = module_key(module, part.suffix());
        self.tensors
            .get(&key)
            .ok_or_else(|| Error::invalid(format!("adapter has no tensor {key:?}")))
    }
}

fn relabel(e: Error, path: &Path) -> Error {
    match e {
        Error::Format { context, msg } if context == WEIGHTS_NAME => {
            Error::format(path.display().to_string(), msg)
        }
        e => e,
    }
}

/// The integer values of an index tensor.
fn int_values(t: &Tensor) -> Result<Vec<i64>> {
    Ok(match t.dtype() {
        DType::U8 => t.to_vec::<u8>()?.into_iter().map(i64::from).collect(),
        DType::I32 => t.to_vec::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => t.to_vec::<i64>()?,
        d => return Err(Error::dtype("vblora topk indices", "u8, i32 or i64", d)),
    })
}

/// The index dtype PEFT writes for `num_vectors`: uint8 below 2^8, int16 below 2^15, int32 below 2^31,
/// else int64.
pub fn vblora_index_dtype(num_vectors: usize) -> StDtype {
    if num_vectors < 1 << 8 {
        StDtype::U8
    } else if num_vectors < 1 << 15 {
        StDtype::I16
    } else if num_vectors < 1 << 31 {
        StDtype::I32
    } else {
        StDtype::I64
    }
}

fn index_bytes(key: &str, t: &Tensor, num_vectors: usize) -> Result<TensorBytes<'static>> {
    let vals = int_values(t)?;
    if let Some(v) = vals.iter().find(|v| **v < 0 || **v as u64 >= num_vectors as u64) {
        return Err(Error::invalid(format!(
            "{key}: index {v} outside [0, {num_vectors})"
        )));
    }
    let dtype = vblora_index_dtype(num_vectors);
    let data: Vec<u8> = match dtype {
        StDtype::U8 => vals.iter().map(|v| *v as u8).collect(),
        StDtype::I16 => vals.iter().flat_map(|v| (*v as i16).to_le_bytes()).collect(),
        StDtype::I32 => vals.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect(),
        _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    Ok(TensorBytes {
        dtype,
        shape: t.shape().to_vec(),
        data: Cow::Owned(data),
    })
}

/// Bytes a tensor takes in the file (indices at PEFT's index dtype).
fn stored_bytes(part: Option<Part>, t: &Tensor, cfg: &AdapterConfig) -> usize {
    match (part, cfg.vblora()) {
        (Some(p), Some(c)) if p.is_index() => t.numel() * vblora_index_dtype(c.num_vectors).bitsize() / 8,
        _ => t.size_in_bytes(),
    }
}

fn analyze(cfg: &AdapterConfig, tensors: &BTreeMap<String, Tensor>) -> Result<AdapterLayout> {
    let ferr = |msg: String| Error::format(WEIGHTS_NAME, msg);
    let mut by_module: BTreeMap<String, BTreeMap<Part, String>> = BTreeMap::new();
    let mut extras = Vec::new();
    for key in tensors.keys() {
        match classify(key, cfg)? {
            KeyRole::Module { module, part } => {
                by_module.entry(module).or_default().insert(part, key.clone());
            }
            KeyRole::Extra(kind, base_name) => extras.push(ExtraTensor {
                key: key.clone(),
                kind,
                base_name,
            }),
        }
    }
    let shape_of = |key: &str| tensors[key].shape().to_vec();
    let float = |key: &str| -> Result<()> {
        let d = tensors[key].dtype();
        if d.is_float() {
            Ok(())
        } else {
            Err(ferr(format!("{key:?} has dtype {d}, expected a float dtype")))
        }
    };
    for e in &extras {
        if e.kind == ExtraKind::VbLoraBank {
            let c = cfg
                .vblora()
                .ok_or_else(|| ferr("VB-LoRA bank in a non-VB-LoRA adapter".into()))?;
            float(&e.key)?;
            let s = shape_of(&e.key);
            if s != [c.num_vectors, c.vector_length] {
                return Err(ferr(format!(
                    "{:?} has shape {s:?}, expected [num_vectors, vector_length] = [{}, {}]",
                    e.key, c.num_vectors, c.vector_length
                )));
            }
        }
    }
    let mut modules = Vec::with_capacity(by_module.len());
    for (name, parts) in by_module {
        let is_embedding = parts.contains_key(&Part::EmbeddingA) || parts.contains_key(&Part::EmbeddingB);
        if cfg.target_modules.is_some() && !cfg.targets(&name, !is_embedding) {
            return Err(ferr(format!(
                "adapter tensors for module {name:?}, which the config does not target (target_modules={}, \
                 exclude_modules={}, modules_to_save={}, layers_to_transform={})",
                cfg.target_modules
                    .as_ref()
                    .map_or("none".into(), describe_targets),
                cfg.exclude_modules.as_ref().map_or("none".into(), describe_names),
                cfg.modules_to_save
                    .as_ref()
                    .map_or("none".into(), |v| format!("{v:?}")),
                cfg.layers_to_transform
                    .as_ref()
                    .map_or("none".into(), |v| format!("{:?}", v.as_slice()))
            )));
        }
        for (part, key) in &parts {
            if !part.is_index() {
                float(key)?;
            }
        }
        let m = match &cfg.method {
            MethodConfig::Lora(c) => lora_module(cfg, c, &name, &parts, is_embedding, &shape_of)?,
            MethodConfig::WaveFt(_) => {
                let key = parts
                    .get(&Part::WaveFtSpectrum)
                    .ok_or_else(|| ferr(format!("module {name:?}: missing waveft_spectrum")))?;
                let s = shape_of(key);
                let [n] = s[..] else {
                    return Err(ferr(format!("{key:?} has shape {s:?}, expected [n_frequency]")));
                };
                if let Some(want) = cfg.n_frequency_for(&name)
                    && n != want
                {
                    return Err(ferr(format!(
                        "{key:?} has {n} coefficients, but the config gives module {name:?} n_frequency = {want}"
                    )));
                }
                if n == 0 {
                    return Err(ferr(format!("{key:?} is empty")));
                }
                new_module(
                    cfg,
                    &name,
                    AdapterMethod::WaveFt,
                    LayerKind::Linear,
                    None,
                    None,
                    Some(n),
                    n,
                )
            }
            MethodConfig::VbLora(c) => vblora_module(cfg, c, &name, &parts, tensors, &shape_of)?,
        };
        let mut m = m;
        m.stored_bytes = parts
            .iter()
            .map(|(p, k)| stored_bytes(Some(*p), &tensors[k], cfg))
            .sum();
        m.parts = parts;
        modules.push(m);
    }
    if cfg.peft_type() == PeftType::VbLora
        && !modules.is_empty()
        && !extras.iter().any(|e| e.kind == ExtraKind::VbLoraBank)
    {
        return Err(ferr(format!(
            "VB-LoRA adapter without its vector bank {VBLORA_BANK_KEY:?}"
        )));
    }
    if modules.is_empty() {
        return Err(ferr("the adapter contains no adapter tensors".into()));
    }
    Ok(AdapterLayout { modules, extras })
}

fn describe_targets(t: &TargetModules) -> String {
    match t {
        TargetModules::AllLinear => "all-linear".into(),
        TargetModules::Regex(r) => format!("regex {:?}", r.as_str()),
        TargetModules::Names(n) => format!("{n:?}"),
    }
}

fn describe_names(t: &ModuleNames) -> String {
    match t {
        ModuleNames::Regex(r) => format!("regex {:?}", r.as_str()),
        ModuleNames::Names(n) => format!("{n:?}"),
    }
}

#[allow(clippy::too_many_arguments)]
fn new_module(
    cfg: &AdapterConfig,
    name: &str,
    method: AdapterMethod,
    layer: LayerKind,
    in_features: Option<usize>,
    out_features: Option<usize>,
    n_frequency: Option<usize>,
    trainable_params: usize,
) -> AdapterModule {
    AdapterModule {
        name: name.to_string(),
        method,
        layer,
        rank: cfg.rank_for(name),
        alpha: cfg.alpha_for(name),
        scaling: cfg.scaling_for(name),
        in_features,
        out_features,
        n_frequency,
        lora_bias: false,
        fan_in_fan_out: cfg.fan_in_fan_out && layer == LayerKind::Linear,
        parts: BTreeMap::new(),
        trainable_params,
        stored_bytes: 0,
    }
}

fn lora_module(
    cfg: &AdapterConfig,
    c: &LoraConfig,
    name: &str,
    parts: &BTreeMap<Part, String>,
    is_embedding: bool,
    shape_of: &dyn Fn(&str) -> Vec<usize>,
) -> Result<AdapterModule> {
    let ferr = |msg: String| Error::format(WEIGHTS_NAME, msg);
    let (pa, pb) = if is_embedding {
        (Part::EmbeddingA, Part::EmbeddingB)
    } else {
        (Part::LoraA, Part::LoraB)
    };
    if is_embedding && (parts.contains_key(&Part::LoraA) || parts.contains_key(&Part::LoraB)) {
        return Err(ferr(format!(
            "module {name:?} mixes linear and embedding LoRA tensors"
        )));
    }
    let get = |p: Part| {
        parts.get(&p).ok_or_else(|| {
            ferr(format!(
                "module {name:?}: missing {}",
                module_key(name, p.suffix())
            ))
        })
    };
    let (ka, kb) = (get(pa)?, get(pb)?);
    let (sa, sb) = (shape_of(ka), shape_of(kb));
    if sa.len() != 2 || sb.len() != 2 {
        return Err(ferr(format!(
            "module {name:?}: lora_A {sa:?} / lora_B {sb:?} are not 2-D (LoRA on Conv layers is not supported)"
        )));
    }
    let r = cfg.rank_for(name).unwrap_or(c.r);
    let (in_f, out_f) = (sa[1], sb[0]);
    if sa[0] != r || sb[1] != r {
        return Err(ferr(format!(
            "module {name:?}: lora_A is {sa:?} and lora_B is {sb:?}, expected [r, in] and [out, r] with r = {r} \
             (from {})",
            if c.rank_pattern.get(name).is_some() {
                "rank_pattern"
            } else {
                "r"
            }
        )));
    }
    let mut params = r * (in_f + out_f);
    let has_mag = parts.contains_key(&Part::Magnitude);
    if has_mag != c.use_dora {
        return Err(ferr(format!(
            "module {name:?}: {} lora_magnitude_vector but use_dora is {}",
            if has_mag { "has a" } else { "has no" },
            c.use_dora
        )));
    }
    if let Some(k) = parts.get(&Part::Magnitude) {
        let s = shape_of(k);
        if s != [out_f] {
            return Err(ferr(format!("{k:?} has shape {s:?}, expected [{out_f}]")));
        }
        params += out_f;
    }
    let has_bias = parts.contains_key(&Part::LoraBBias);
    if has_bias && is_embedding {
        return Err(ferr(format!("module {name:?}: lora_B.bias on an embedding")));
    }
    if has_bias != (c.lora_bias && !is_embedding) {
        return Err(ferr(format!(
            "module {name:?}: {} lora_B.bias but lora_bias is {}",
            if has_bias { "has a" } else { "has no" },
            c.lora_bias
        )));
    }
    if let Some(k) = parts.get(&Part::LoraBBias) {
        let s = shape_of(k);
        if s != [out_f] {
            return Err(ferr(format!("{k:?} has shape {s:?}, expected [{out_f}]")));
        }
        params += out_f;
    }
    let method = if c.use_dora {
        AdapterMethod::Dora
    } else {
        AdapterMethod::Lora
    };
    let layer = if is_embedding {
        LayerKind::Embedding
    } else {
        LayerKind::Linear
    };
    let mut m = new_module(cfg, name, method, layer, Some(in_f), Some(out_f), None, params);
    m.lora_bias = has_bias;
    Ok(m)
}

fn vblora_module(
    cfg: &AdapterConfig,
    c: &VbLoraConfig,
    name: &str,
    parts: &BTreeMap<Part, String>,
    tensors: &BTreeMap<String, Tensor>,
    shape_of: &dyn Fn(&str) -> Vec<usize>,
) -> Result<AdapterModule> {
    let ferr = |msg: String| Error::format(WEIGHTS_NAME, msg);
    let (nv, l, k, r) = (c.num_vectors, c.vector_length, c.topk, c.r);
    let topk_form = parts.contains_key(&Part::VbTopkIndicesA) || parts.contains_key(&Part::VbTopkIndicesB);
    if topk_form != c.save_only_topk_weights {
        return Err(ferr(format!(
            "module {name:?}: VB-LoRA logits stored {} but save_only_topk_weights is {}",
            if topk_form {
                "as top-k indices/weights"
            } else {
                "in full"
            },
            c.save_only_topk_weights
        )));
    }
    let get = |p: Part| {
        parts.get(&p).ok_or_else(|| {
            ferr(format!(
                "module {name:?}: missing {}",
                module_key(name, p.suffix())
            ))
        })
    };
    // Leading dims: A [r, in/L, ...], B [out/L, r, ...].
    let mut lead = Vec::new();
    for (pl, pi, pw) in [
        (Part::VbLogitsA, Part::VbTopkIndicesA, Part::VbTopkWeightsA),
        (Part::VbLogitsB, Part::VbTopkIndicesB, Part::VbTopkWeightsB),
    ] {
        let dims = if topk_form {
            if parts.contains_key(&pl) {
                return Err(ferr(format!("module {name:?}: both full and top-k logits")));
            }
            let (ki, kw) = (get(pi)?, get(pw)?);
            let (si, sw) = (shape_of(ki), shape_of(kw));
            if si.len() != 3 || si[2] != k || sw.len() != 3 || sw[2] + 1 != k || si[..2] != sw[..2] {
                return Err(ferr(format!(
                    "module {name:?}: {ki:?} is {si:?} and {kw:?} is {sw:?}, expected [.., .., topk] and \
                     [.., .., topk - 1] with topk = {k}"
                )));
            }
            let t = &tensors[ki.as_str()];
            if !matches!(t.dtype(), DType::U8 | DType::I32 | DType::I64) {
                return Err(ferr(format!(
                    "{ki:?} has dtype {}, expected an integer dtype",
                    t.dtype()
                )));
            }
            if let Some(v) = int_values(t)?
                .into_iter()
                .find(|v| *v < 0 || *v as u64 >= nv as u64)
            {
                return Err(ferr(format!(
                    "{ki:?} holds index {v}, outside [0, num_vectors = {nv})"
                )));
            }
            [si[0], si[1]]
        } else {
            let kl = get(pl)?;
            let s = shape_of(kl);
            if s.len() != 3 || s[2] != nv {
                return Err(ferr(format!(
                    "{kl:?} has shape {s:?}, expected 3-D with num_vectors = {nv} in the last dim"
                )));
            }
            [s[0], s[1]]
        };
        lead.push(dims);
    }
    let ([ra, in_l], [out_l, rb]) = (lead[0], lead[1]);
    if ra != r || rb != r {
        return Err(ferr(format!(
            "module {name:?}: VB-LoRA logits A {:?} / B {:?} do not have rank r = {r}",
            lead[0], lead[1]
        )));
    }
    let params = (r * in_l + out_l * r) * nv;
    Ok(new_module(
        cfg,
        name,
        AdapterMethod::VbLora,
        LayerKind::Linear,
        Some(in_l * l),
        Some(out_l * l),
        None,
        params,
    ))
}

// =============================================================================================== VB-LoRA

/// Rebuilds VB-LoRA logits from the `save_only_topk_weights` form, as PEFT does on load: the stored
/// weights are the softmax of the top-k logits without its last column; the last weight is `1 - sum`, the
/// logits are `ln(w)` at the indices and `-inf` elsewhere. `indices`: integer `[.., k]`; `weights`: float
/// `[.., k-1]`. Returns f32 `[.., num_vectors]` on the indices' device. Computed in f32 like PEFT.
pub fn vblora_expand_topk(indices: &Tensor, weights: &Tensor, num_vectors: usize) -> Result<Tensor> {
    let op = "vblora_expand_topk";
    let (si, sw) = (indices.shape(), weights.shape());
    let k = *si
        .last()
        .ok_or_else(|| Error::shape(op, "indices must have at least 1 dim"))?;
    if k == 0 || sw.len() != si.len() || sw[..sw.len() - 1] != si[..si.len() - 1] || sw[sw.len() - 1] + 1 != k
    {
        return Err(Error::shape(
            op,
            format!("indices {si:?} and weights {sw:?} do not form a top-k pair"),
        ));
    }
    weights.dtype().expect_float(op)?;
    let idx = int_values(indices)?;
    let w = weights.to_vec_f32()?;
    let rows = idx.len() / k;
    let mut out = vec![f32::NEG_INFINITY; rows * num_vectors];
    for row in 0..rows {
        let ws = &w[row * (k - 1)..(row + 1) * (k - 1)];
        let last = 1.0f32 - ws.iter().sum::<f32>();
        for j in 0..k {
            let v = idx[row * k + j];
            if v < 0 || v as u64 >= num_vectors as u64 {
                return Err(Error::invalid(format!(
                    "{op}: index {v} outside [0, {num_vectors})"
                )));
            }
            let wj = if j + 1 < k { ws[j] } else { last };
            out[row * num_vectors + v as usize] = wj.ln();
        }
    }
    let mut shape = si[..si.len() - 1].to_vec();
    shape.push(num_vectors);
    Tensor::from_vec(out, &shape, indices.device())
}

/// The `save_only_topk_weights` form of VB-LoRA logits `[.., num_vectors]`, as PEFT writes it: the indices
/// of the `topk` largest logits (descending; ties to the lower index) as I64, and the softmax over those
/// logits without its last column, f32 `[.., topk - 1]`.
pub fn vblora_compress_topk(logits: &Tensor, topk: usize) -> Result<(Tensor, Tensor)> {
    let op = "vblora_compress_topk";
    let n = *logits
        .shape()
        .last()
        .ok_or_else(|| Error::shape(op, "logits must have at least 1 dim"))?;
    if topk == 0 || topk > n {
        return Err(Error::invalid(format!("{op}: topk {topk} must be in [1, {n}]")));
    }
    // torch.topk's exact selection and tie order (the VB-LoRA module reproduces its CPU algorithms), so a
    // file written here equals the one PEFT would write from the same logits.
    let (idx, w) = crate::adapters::vblora::vblora_topk_for_save(&logits.to_dtype(DType::F32)?, topk)?;
    Ok((idx.to_device(logits.device())?, w.to_device(logits.device())?))
}

// =============================================================================================== inspect

/// A human-readable summary of an adapter directory: method, per-module rank / alpha / scaling / shapes /
/// parameters, totals and file sizes.
pub fn inspect_adapter(dir: impl AsRef<Path>) -> Result<String> {
    let dir = dir.as_ref();
    let adapter = PeftAdapter::load(dir, Device::Cpu)?;
    let layout = adapter.layout()?;
    let cfg = &adapter.config;
    let file_size = |p: PathBuf| std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    let mut s = String::new();
    // Writing to a String cannot fail; the results are ignored below.
    let _ = writeln!(s, "adapter: {}", dir.display());
    let mut methods: Vec<AdapterMethod> = layout.modules.iter().map(|m| m.method).collect();
    methods.sort();
    methods.dedup();
    let _ = writeln!(
        s,
        "peft_type: {} ({}), peft_version {}",
        cfg.peft_type(),
        methods.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "),
        cfg.peft_version.as_deref().unwrap_or("unknown")
    );
    if let Some(b) = &cfg.base_model_name_or_path {
        let _ = writeln!(s, "base model: {b}");
    }
    if let Some(t) = &cfg.task_type {
        let _ = writeln!(s, "task type: {t}");
    }
    match &cfg.method {
        MethodConfig::Lora(c) => {
            let _ = writeln!(
                s,
                "r = {}, lora_alpha = {}, {}{}{}, dropout {}, bias {:?}{}",
                c.r,
                c.lora_alpha,
                if c.use_rslora {
                    "rsLoRA (alpha/sqrt(r))"
                } else {
                    "alpha/r"
                },
                if c.rank_pattern.is_empty() {
                    ""
                } else {
                    ", rank_pattern"
                },
                if c.alpha_pattern.is_empty() {
                    ""
                } else {
                    ", alpha_pattern"
                },
                c.lora_dropout,
                cfg.bias,
                if cfg.fan_in_fan_out {
                    ", fan_in_fan_out"
                } else {
                    ""
                }
            );
        }
        MethodConfig::WaveFt(c) => {
            let _ = writeln!(
                s,
                "n_frequency = {}{}, scaling = {}, wavelet {}, idwt {}, seed {}",
                c.n_frequency,
                if c.proportional_parameters {
                    " (proportional)"
                } else {
                    ""
                },
                c.scaling,
                c.wavelet_family,
                c.use_idwt,
                c.random_loc_seed
            );
        }
        MethodConfig::VbLora(c) => {
            let _ = writeln!(
                s,
                "r = {}, bank {} x {}, topk {}{}",
                c.r,
                c.num_vectors,
                c.vector_length,
                c.topk,
                if c.save_only_topk_weights {
                    ", stored as top-k weights"
                } else {
                    ""
                }
            );
        }
    }
    let _ = writeln!(s, "modules: {}", layout.modules.len());
    let _ = writeln!(
        s,
        "  {:<48} {:>7} {:>5} {:>8} {:>10} {:>13} {:>10} {:>10}",
        "module", "method", "rank", "alpha", "scaling", "in -> out", "params", "bytes"
    );
    for m in &layout.modules {
        let dims = match (m.in_features, m.out_features, m.n_frequency) {
            (Some(i), Some(o), _) => format!("{i} -> {o}"),
            (_, _, Some(n)) => format!("n = {n}"),
            _ => "?".into(),
        };
        let _ = writeln!(
            s,
            "  {:<48} {:>7} {:>5} {:>8} {:>10.6} {:>13} {:>10} {:>10}",
            m.name,
            m.method.as_str(),
            m.rank.map_or("-".into(), |r| r.to_string()),
            m.alpha.map_or("-".into(), |a| a.to_string()),
            m.scaling,
            dims,
            m.trainable_params,
            m.stored_bytes
        );
    }
    for e in &layout.extras {
        let t = &adapter.tensors[&e.key];
        let _ = writeln!(
            s,
            "  extra {:?}: {} {:?} {} ({} bytes)",
            e.kind,
            e.key,
            t.shape(),
            t.dtype(),
            t.size_in_bytes()
        );
    }
    let _ = writeln!(s, "trainable parameters: {}", adapter.num_trainable_params()?);
    let _ = writeln!(
        s,
        "files: {CONFIG_NAME} {} bytes, {WEIGHTS_NAME} {} bytes",
        file_size(dir.join(CONFIG_NAME)),
        file_size(dir.join(WEIGHTS_NAME))
    );
    let unknown = cfg.unknown_keys();
    if !unknown.is_empty() {
        let _ = writeln!(s, "config keys kept but not interpreted: {}", unknown.join(", "));
    }
    Ok(s)
}
