//! [`PeftAdapter`]: an adapter directory loaded, validated against its config ([`AdapterLayout`]) and
//! saved.

use super::keys::{KeyRole, classify};
use super::*;

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
    /// it. Validates everything first, so a bad adapter writes nothing. The tensors are written as they
    /// are: with VB-LoRA `save_only_topk_weights` they must already be in the top-k form (see
    /// `peft_model::load::to_file_form`, which converts full logits as PEFT does on save).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let adapter = self;
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
pub(crate) fn int_values(t: &Tensor) -> Result<Vec<i64>> {
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
    // An optional `[out]` vector (the DoRA magnitude, lora_B's bias): present exactly when `want`
    // (the config's `flag` is `value`), then its parameters count.
    let optional_vector = |part: Part, what: &str, want: bool, flag: &str, value: bool| -> Result<usize> {
        let present = parts.contains_key(&part);
        if present != want {
            return Err(ferr(format!(
                "module {name:?}: {} {what} but {flag} is {value}",
                if present { "has a" } else { "has no" },
            )));
        }
        match parts.get(&part) {
            Some(k) => {
                let s = shape_of(k);
                if s != [out_f] {
                    return Err(ferr(format!("{k:?} has shape {s:?}, expected [{out_f}]")));
                }
                Ok(out_f)
            }
            None => Ok(0),
        }
    };
    let mut params = r * (in_f + out_f);
    params += optional_vector(
        Part::Magnitude,
        "lora_magnitude_vector",
        c.use_dora,
        "use_dora",
        c.use_dora,
    )?;
    if parts.contains_key(&Part::LoraBBias) && is_embedding {
        return Err(ferr(format!("module {name:?}: lora_B.bias on an embedding")));
    }
    let want_bias = c.lora_bias && !is_embedding;
    params += optional_vector(
        Part::LoraBBias,
        "lora_B.bias",
        want_bias,
        "lora_bias",
        c.lora_bias,
    )?;
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
    m.lora_bias = want_bias; // lora_B.bias is present exactly then (checked above)
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
