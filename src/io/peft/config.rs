//! `adapter_config.json`: the config types, PEFT's per-module resolution rules, validation and the
//! byte-exact JSON round trip.

use super::*;

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
    /// `adapters::waveft::proportional_n_frequency`.
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
    /// (`adapters::waveft::proportional_n_frequency`).
    pub fn n_frequency_for(&self, module: &str) -> Option<usize> {
        match &self.method {
            MethodConfig::WaveFt(c) if !c.proportional_parameters => {
                Some(*c.n_frequency_pattern.get(module).unwrap_or(&c.n_frequency))
            }
            _ => None,
        }
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
                    rank_pattern: obj.usize_patterns("rank_pattern")?,
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
                    n_frequency_pattern: obj.usize_patterns("n_frequency_pattern")?,
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

    /// A `{pattern: non-negative integer}` map (`rank_pattern`, `n_frequency_pattern`).
    fn usize_patterns(&self, key: &str) -> Result<PatternMap<usize>> {
        self.patterns(key, |k, v| {
            json_usize(v)
                .ok_or_else(|| cfg_err(format!("{key}[{k:?}] must be a non-negative integer, got {v}")))
        })
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
