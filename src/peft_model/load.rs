//! PEFT adapters as trainable layers: build every adapted layer of a base checkpoint from a PEFT adapter
//! directory ([`load_adapter`]) or from a fresh PEFT config ([`init_adapter`]), train them, and write the
//! result back as a PEFT adapter directory ([`AdapterModel::save`], [`adapter_from_store`]).
//!
//! The base checkpoint is a safetensors file with the model's state dict: dense `<module>.weight`
//! (`[out, in]`, or `[in, out]` for GPT-2 `Conv1D` with `fan_in_fan_out`, transposed on load) or the
//! bitsandbytes 4-bit layout (`<module>.weight` + `.absmax`, `.quant_map`, ... ,
//! `.quant_state.bitsandbytes__nf4|fp4`, see [`crate::quant::io`]), and an optional `<module>.bias`.
//!
//! Trainable parameters go into a [`ParamStore`] under the adapter file's keys
//! (`base_model.model.<module>.lora_A.weight`, `...waveft_spectrum`, `...vblora_logits_A`, the shared
//! `base_model.vblora_vector_bank` once), so what the optimizer updates is what [`AdapterModel::save`]
//! writes. VB-LoRA `save_only_topk_weights` files are expanded to full logits on load (`-inf` outside the
//! top-k, as PEFT does; usable for inference, refused for training, as in PEFT) and compressed again on
//! save.
//!
//! Per method (each a `Box<dyn` [`AdapterLinear`]`>`): LoRA → [`LoraLinear`], WaveFT → [`WaveFtLinear`] (per-layer
//! `n_frequency` from the file, checked against `n_frequency_pattern` / `proportional_parameters`),
//! VB-LoRA → [`VbLoraLinear`] on one [`VbLoraBank`], DoRA → [`DoraLinear`]. Not built (clear errors):
//! LoRA on embeddings, `lora_bias`, 4-bit bases with `fan_in_fan_out`; merge those with [`crate::peft_model::merge`]
//! instead.

use crate::adapters::AdapterLinear;
use crate::adapters::dora::{DoraLinear, DoraOptions};
use crate::adapters::lora::{LoraConfig as LoraLayerConfig, LoraInit, LoraLinear};
use crate::adapters::vblora::{
    BANK_KEY, VbLoraBank, VbLoraConfig, VbLoraLinear, VbLoraOptions, logits_key, vblora_compress_topk,
};
use crate::adapters::waveft::{WaveFtConfig, WaveFtLinear, proportional_n_frequency, spectrum_key};
use crate::autograd::{ParamId, ParamStore};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use crate::io::peft::{
    AdapterConfig, AdapterMethod, AdapterModule, ExtraKind, InitLoraWeights, LayerKind, MethodConfig, Part,
    PeftAdapter, PeftType, TargetModules, base_weight_name, module_key,
};
use crate::qmatmul::{Algo, BaseWeight};
use crate::quant::io::{QUANT_STATE_SUFFIX, load_quantized, parse_quant_state_json};
use crate::tensor::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// How [`load_adapter`] / [`init_adapter`] place the model.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Where base weights and parameters live.
    pub device: Device,
    /// The activation dtype: dense base weights and biases are cast to it (dense layers need the
    /// activation dtype). `None`: as stored (4-bit layers then keep f32 biases, usable with any
    /// activation dtype).
    pub dtype: Option<DType>,
    /// The base matmul implementation of every layer.
    pub algo: Algo,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: None,
            algo: Algo::Auto,
        }
    }
}

/// The adapted layers of one model, with the config they came from.
#[derive(Clone, Debug)]
pub struct AdapterModel {
    config: AdapterConfig,
    layers: Vec<Box<dyn AdapterLinear>>,
    bank: Option<VbLoraBank>,
    /// Adapter-file tensors that are not layer parameters (trained biases, `modules_to_save` copies),
    /// by adapter key, kept to be written back unchanged.
    extras: BTreeMap<String, Tensor>,
    /// Base tensors the adapter replaces, by base name (see [`AdapterModel::replaced`]).
    replaced: BTreeMap<String, Tensor>,
}

impl AdapterModel {
    /// The adapter config.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Every adapted layer, sorted by module name.
    pub fn layers(&self) -> &[Box<dyn AdapterLinear>] {
        &self.layers
    }

    /// Mutable access to the layers (e.g. [`AdapterLinear::set_algo`]).
    pub fn layers_mut(&mut self) -> &mut [Box<dyn AdapterLinear>] {
        &mut self.layers
    }

    /// The layer of module `name`.
    pub fn layer(&self, name: &str) -> Option<&dyn AdapterLinear> {
        self.layers
            .binary_search_by(|l| l.name().cmp(name))
            .ok()
            .map(|i| &*self.layers[i])
    }

    /// The shared VB-LoRA bank, for a VB-LoRA adapter.
    pub fn bank(&self) -> Option<&VbLoraBank> {
        self.bank.as_ref()
    }

    /// Base tensors the adapter replaces that are not an adapted layer's bias (trained biases of other
    /// modules with `bias="all"` / `"<method>_only"`, `modules_to_save` copies), by base tensor name, on the
    /// load device. The host model uses these instead of the checkpoint's. Adapted layers already carry
    /// their trained bias.
    pub fn replaced(&self) -> &BTreeMap<String, Tensor> {
        &self.replaced
    }

    /// Trainable elements PEFT would count (`get_nb_trainable_parameters`): every layer's parameters, the
    /// bank once, and the adapter's trained biases / `modules_to_save` copies.
    pub fn num_trainable_params(&self, store: &ParamStore) -> Result<usize> {
        self.to_peft(store)?.num_trainable_params()
    }

    /// The adapter as PEFT would save it: the config and every parameter's current value from `store`
    /// (on the CPU; VB-LoRA logits in the top-k form when the config says `save_only_topk_weights`), plus
    /// the extra tensors the loaded file had. With no `target_modules` in the config, the adapted module
    /// names are written (PEFT needs them to load the file).
    pub fn to_peft(&self, store: &ParamStore) -> Result<PeftAdapter> {
        let mut ids: Vec<ParamId> = self.layers.iter().flat_map(|l| l.param_ids()).collect();
        ids.extend(self.bank.map(|b| b.id()));
        let mut tensors = BTreeMap::new();
        for id in ids {
            tensors.insert(
                store.name(id)?.to_string(),
                store.get(id)?.to_device(Device::Cpu)?,
            );
        }
        for (k, t) in &self.extras {
            tensors.insert(k.clone(), t.to_device(Device::Cpu)?);
        }
        let mut config = self.config.clone();
        if config.target_modules.is_none() {
            config.target_modules = Some(TargetModules::Names(
                self.layers.iter().map(|l| l.name().to_string()).collect(),
            ));
        }
        to_file_form(PeftAdapter { config, tensors })
    }

    /// Writes the adapter directory (`adapter_config.json` + `adapter_model.safetensors`, each atomically)
    /// for `PeftModel.from_pretrained`. See [`AdapterModel::to_peft`].
    pub fn save(&self, store: &ParamStore, dir: impl AsRef<Path>) -> Result<()> {
        self.to_peft(store)?.save(dir)
    }
}

/// The frozen base of `module` from `file`: its weight as `[out, in]` (dense, cast to `opts.dtype`; or the
/// bitsandbytes 4-bit layout) and its `<module>.bias`, if the checkpoint has one. `fan_in_fan_out`: a dense
/// weight stored `[in, out]` is transposed.
pub fn load_base_layer(
    file: &SafetensorsFile,
    module: &str,
    fan_in_fan_out: bool,
    opts: &LoadOptions,
) -> Result<(BaseWeight, Option<Tensor>)> {
    let name = base_weight_name(module);
    let ctx = || file.path().display().to_string();
    let is_4bit = ["nf4", "fp4"]
        .iter()
        .any(|qt| file.contains(&format!("{name}{QUANT_STATE_SUFFIX}{qt}")));
    let base = if is_4bit {
        if fan_in_fan_out {
            return Err(Error::invalid(format!(
                "module {module:?}: a 4-bit base weight with fan_in_fan_out (Conv1D) is not supported"
            )));
        }
        BaseWeight::Quantized(load_quantized(file, &name, opts.device)?)
    } else {
        if !file.contains(&name) {
            return Err(Error::format(
                ctx(),
                format!("the adapter has module {module:?} but the base has no tensor {name:?}"),
            ));
        }
        let w = file.load(&name, opts.device)?;
        if w.rank() != 2 || !w.dtype().is_float() {
            return Err(Error::format(
                ctx(),
                format!(
                    "base weight {name:?} is {:?} {}; a linear layer needs a 2-D float weight",
                    w.shape(),
                    w.dtype()
                ),
            ));
        }
        let w = if fan_in_fan_out { w.t()? } else { w };
        BaseWeight::Dense(match opts.dtype {
            Some(d) => w.to_dtype(d)?,
            None => w,
        })
    };
    let bias_name = format!("{module}.bias");
    let bias = if file.contains(&bias_name) {
        Some(cast_bias(file.load(&bias_name, opts.device)?, &base, opts)?)
    } else {
        None
    };
    Ok((base, bias))
}

/// A bias in the dtype the layer's forward accepts: `opts.dtype`, else f32 if it is f32, else the dense
/// weight's dtype (f32 for a 4-bit base).
fn cast_bias(bias: Tensor, base: &BaseWeight, opts: &LoadOptions) -> Result<Tensor> {
    bias.dtype().expect_float("bias")?;
    let want = match (opts.dtype, base) {
        (Some(d), _) => d,
        (None, _) if bias.dtype() == DType::F32 => DType::F32,
        (None, BaseWeight::Dense(w)) => w.dtype(),
        (None, BaseWeight::Quantized(_) | BaseWeight::KBit(_)) => DType::F32,
    };
    bias.to_dtype(want)
}

/// Checks that the base weight `w` (`[out, in]`) has the shape the adapter's module `m` was trained on
/// (its file stores `[in, out]` with `fan_in_fan_out`).
pub(crate) fn check_base_shape(m: &AdapterModule, w: &BaseWeight, op: &'static str) -> Result<()> {
    let Some(want) = m.base_weight_shape() else {
        return Ok(());
    };
    let got = [w.out_features(), w.in_features()];
    let want = if m.fan_in_fan_out {
        [want[1], want[0]]
    } else {
        want
    };
    if got != want {
        return Err(Error::shape(
            op,
            format!(
                "module {:?}: base weight is [out, in] = {got:?}, the adapter needs {want:?}",
                m.name
            ),
        ));
    }
    Ok(())
}

/// Builds every adapted layer of `adapter` on the base checkpoint `base`, inserting the adapter's
/// parameters into `store` under their file keys (on `opts.device`). Fails before touching `store`'s
/// contents only for config-level problems; a failure mid-way may leave some parameters inserted (use a
/// fresh store).
pub fn load_adapter(
    base: &SafetensorsFile,
    adapter: &PeftAdapter,
    store: &mut ParamStore,
    opts: &LoadOptions,
) -> Result<AdapterModel> {
    let layout = adapter.layout()?;
    let config = adapter.config.clone();
    // Every module's base first: all shape and format errors before any parameter is inserted.
    let mut bases = Vec::with_capacity(layout.modules.len());
    for m in &layout.modules {
        check_supported(m)?;
        let (w, mut bias) = load_base_layer(base, &m.name, m.fan_in_fan_out, opts)?;
        check_base_shape(m, &w, "load_adapter")?;
        // A trained bias (bias="all" / "<method>_only") replaces the checkpoint's.
        if let Some(e) = layout
            .extras
            .iter()
            .find(|e| e.kind == ExtraKind::Bias && e.base_name == format!("{}.bias", m.name))
        {
            let t = adapter.tensors[&e.key].to_device(opts.device)?;
            if t.shape() != [w.out_features()] {
                return Err(Error::shape(
                    "load_adapter",
                    format!("{:?} is {:?}, expected [{}]", e.key, t.shape(), w.out_features()),
                ));
            }
            bias = Some(cast_bias(t, &w, opts)?);
        }
        bases.push((w, bias));
    }
    let (mut layers, bank) = build_layers(adapter, &layout.modules, bases, store, opts)?;
    layers.sort_by(|a, b| a.name().cmp(b.name()));

    let mut extras = BTreeMap::new();
    let mut replaced = BTreeMap::new();
    for e in &layout.extras {
        match e.kind {
            ExtraKind::VbLoraBank => {}
            ExtraKind::Bias | ExtraKind::ModulesToSave | ExtraKind::OriginalModule => {
                let t = &adapter.tensors[&e.key];
                extras.insert(e.key.clone(), t.clone());
                let is_layer_bias = layers.iter().any(|l| e.base_name == format!("{}.bias", l.name()));
                if e.kind != ExtraKind::OriginalModule && !is_layer_bias {
                    replaced
                        .entry(e.base_name.clone())
                        .or_insert(t.to_device(opts.device)?);
                }
            }
        }
    }
    Ok(AdapterModel {
        config,
        layers,
        bank,
        extras,
        replaced,
    })
}

/// Adapter layers built for a model's linears, in the order asked for, and the VB-LoRA bank if the
/// method has one.
pub type BuiltLayers = (Vec<Box<dyn AdapterLinear>>, Option<VbLoraBank>);

/// The layers of `adapter` for `modules` (its layout's modules) on already-loaded `bases` (one `(weight,
/// bias)` per module, same order; e.g. a model's own linears): checks WaveFT's `proportional_parameters`,
/// inserts the VB-LoRA bank and every layer's parameters into `store` (file keys) and sets `opts.algo`.
/// Layers come back in `modules` order.
pub fn build_layers(
    adapter: &PeftAdapter,
    modules: &[AdapterModule],
    bases: Vec<(BaseWeight, Option<Tensor>)>,
    store: &mut ParamStore,
    opts: &LoadOptions,
) -> Result<BuiltLayers> {
    if modules.len() != bases.len() {
        return Err(Error::invalid(format!(
            "build_layers: {} modules but {} bases",
            modules.len(),
            bases.len()
        )));
    }
    let config = &adapter.config;
    if let MethodConfig::WaveFt(c) = &config.method
        && c.proportional_parameters
    {
        check_proportional(config, modules, &bases)?;
    }
    let bank = match &config.method {
        MethodConfig::VbLora(c) => {
            let t = adapter
                .tensors
                .get(BANK_KEY)
                .ok_or_else(|| Error::invalid(format!("VB-LoRA adapter without {BANK_KEY:?}")))?;
            let id = store.insert(BANK_KEY, t.to_device(opts.device)?)?;
            Some(VbLoraBank::from_param(&VbLoraConfig::from(c), id, store)?)
        }
        _ => None,
    };
    let mut layers = Vec::with_capacity(modules.len());
    for (m, (w, bias)) in modules.iter().zip(bases) {
        let mut layer = build_layer(adapter, m, w, bias, bank.as_ref(), store, opts)?;
        layer.set_algo(opts.algo);
        layers.push(layer);
    }
    Ok((layers, bank))
}

fn check_supported(m: &AdapterModule) -> Result<()> {
    if m.layer == LayerKind::Embedding {
        return Err(Error::invalid(format!(
            "module {:?}: LoRA on embeddings has no layer here; merge it with `peftk merge`",
            m.name
        )));
    }
    if m.lora_bias {
        return Err(Error::invalid(format!(
            "module {:?}: lora_bias (a trained lora_B.bias) is not supported by LoraLinear; merge it with \
             `peftk merge`",
            m.name
        )));
    }
    Ok(())
}

/// `proportional_parameters`: the spectrum lengths in the file must be PEFT's allocation over exactly the
/// adapted layers (a file from another base would place its coefficients elsewhere).
fn check_proportional(
    config: &AdapterConfig,
    modules: &[AdapterModule],
    bases: &[(BaseWeight, Option<Tensor>)],
) -> Result<()> {
    let c = config
        .waveft()
        .ok_or_else(|| Error::invalid("proportional_parameters needs a WaveFT config"))?;
    let cells: Vec<(usize, usize)> = bases
        .iter()
        .map(|(w, _)| (w.out_features(), w.in_features()))
        .collect();
    for (want, m) in proportional_n_frequency(c.n_frequency, &cells)?
        .into_iter()
        .zip(modules)
    {
        if m.n_frequency != Some(want) {
            return Err(Error::invalid(format!(
                "module {:?}: the spectrum has {:?} coefficients, but proportional_parameters over these \
                 base layers gives {want} (adapter trained on another base model?)",
                m.name, m.n_frequency
            )));
        }
    }
    Ok(())
}

fn dropout_of(p: f64, what: &str, module: &str) -> Result<f32> {
    if (0.0..1.0).contains(&p) {
        Ok(p as f32)
    } else {
        Err(Error::invalid(format!(
            "module {module:?}: {what} {p} is not in [0, 1)"
        )))
    }
}

/// One layer of a loaded adapter: inserts the module's tensors into `store` under their file keys and
/// wraps them with the layer type of the module's method (DoRA: A and B as LoRA plus the magnitude).
pub fn build_layer(
    adapter: &PeftAdapter,
    m: &AdapterModule,
    base: BaseWeight,
    bias: Option<Tensor>,
    bank: Option<&VbLoraBank>,
    store: &mut ParamStore,
    opts: &LoadOptions,
) -> Result<Box<dyn AdapterLinear>> {
    check_supported(m)?;
    let insert = |store: &mut ParamStore, part: Part, key: String| -> Result<ParamId> {
        let t = adapter.module_tensor(&m.name, part)?.to_device(opts.device)?;
        store.insert(key, t)
    };
    Ok(match &adapter.config.method {
        MethodConfig::Lora(c) => {
            let a = insert(store, Part::LoraA, module_key(&m.name, Part::LoraA.suffix()))?;
            let b = insert(store, Part::LoraB, module_key(&m.name, Part::LoraB.suffix()))?;
            let dropout = dropout_of(c.lora_dropout, "lora_dropout", &m.name)?;
            if m.method == AdapterMethod::Dora {
                let mag = insert(
                    store,
                    Part::Magnitude,
                    module_key(&m.name, Part::Magnitude.suffix()),
                )?;
                return Ok(Box::new(DoraLinear::from_params(
                    &m.name,
                    base,
                    bias,
                    a,
                    b,
                    mag,
                    m.scaling as f32,
                    dropout,
                    store,
                    DoraOptions::default(),
                )?));
            }
            Box::new(LoraLinear::from_params(
                &m.name,
                base,
                bias,
                a,
                b,
                m.scaling as f32,
                dropout,
                store,
            )?)
        }
        MethodConfig::WaveFt(c) => {
            let n = m
                .n_frequency
                .ok_or_else(|| Error::invalid(format!("module {:?}: no waveft_spectrum", m.name)))?;
            let s = insert(store, Part::WaveFtSpectrum, spectrum_key(&m.name))?;
            Box::new(WaveFtLinear::from_params(
                &m.name,
                base,
                bias,
                &WaveFtConfig {
                    n_frequency: n,
                    ..c.into()
                },
                s,
                store,
            )?)
        }
        MethodConfig::VbLora(c) => {
            let bank = bank.ok_or_else(|| Error::invalid("VB-LoRA layer without a vector bank"))?;
            let mut logits = |ab: &str| -> Result<ParamId> {
                let t = super::vblora_logits(adapter, m, ab, c.num_vectors)?;
                store.insert(logits_key(&m.name, ab), t.to_device(opts.device)?)
            };
            let la = logits("A")?;
            let lb = logits("B")?;
            let dropout = dropout_of(c.vblora_dropout, "vblora_dropout", &m.name)?;
            Box::new(VbLoraLinear::from_params(
                &m.name, base, bias, bank, la, lb, dropout, store,
            )?)
        }
    })
}

/// The linear modules of a base checkpoint: every `<m>.weight` that is a 2-D float tensor or a
/// bitsandbytes 4-bit weight, with its `(out, in)` as stored. What a safetensors file cannot say is the
/// module's class: 2-D embedding tables look linear too (exclude them with the config's
/// `exclude_modules` or a `target_modules` list).
pub fn linear_modules(file: &SafetensorsFile) -> Result<Vec<(String, usize, usize)>> {
    let quantized = crate::quant::io::quantized_names(file);
    let mut v = Vec::new();
    for n in file.names() {
        let Some(module) = n.strip_suffix(".weight") else {
            continue;
        };
        if module.is_empty() {
            continue;
        }
        if quantized.binary_search(n).is_ok() {
            // The shape from the quant-state JSON alone (no need to read the packed weight).
            for qt in ["nf4", "fp4"] {
                let key = format!("{n}{QUANT_STATE_SUFFIX}{qt}");
                if file.contains(&key) {
                    let st = parse_quant_state_json(file.raw(&key)?.2, n)?;
                    if let [o, i] = st.shape[..] {
                        v.push((module.to_string(), o, i));
                    }
                    break;
                }
            }
            continue;
        }
        let (dt, shape, _) = file.raw(n)?;
        if let ([o, i], Some(d)) = (shape.as_slice(), crate::io::from_st_dtype(dt))
            && d.is_float()
        {
            v.push((module.to_string(), *o, *i));
        }
    }
    v.sort();
    Ok(v)
}

/// A fresh adapter for `config` on the base checkpoint `base`, the way `get_peft_model` builds one:
/// targets from [`AdapterConfig::targets`] over [`linear_modules`], per-module rank / alpha /
/// `n_frequency` (patterns and `proportional_parameters` resolved as PEFT does), PEFT's WaveFT coefficient
/// positions, and PEFT's initialization schemes drawn from our generator (`seed`). Parameters go into
/// `store` under their adapter-file keys.
///
/// Not supported (errors): DoRA, `lora_bias`, `bias != "none"`, `modules_to_save`, LoRA init schemes
/// other than `true` / `false` / `"gaussian"`.
pub fn init_adapter(
    base: &SafetensorsFile,
    config: &AdapterConfig,
    store: &mut ParamStore,
    seed: u64,
    opts: &LoadOptions,
) -> Result<AdapterModel> {
    config.validate()?;
    if config.bias != "none" || config.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(Error::invalid(
            "init_adapter trains adapter parameters only: bias must be \"none\" and modules_to_save empty",
        ));
    }
    let targets: Vec<(String, usize, usize)> = linear_modules(base)?
        .into_iter()
        .filter(|(m, _, _)| config.targets(m, true))
        .collect();
    if targets.is_empty() {
        return Err(Error::invalid(format!(
            "no linear module of {} matches the config's target_modules",
            base.path().display()
        )));
    }
    let mut bases = Vec::with_capacity(targets.len());
    for (m, _, _) in &targets {
        // A fan_in_fan_out weight is transposed to the layer's [out, in] here.
        let (w, bias) = load_base_layer(base, m, config.fan_in_fan_out, opts)?;
        bases.push((m.clone(), w, bias));
    }
    let (mut layers, bank) = init_layers(config, bases, store, seed, opts)?;
    layers.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(AdapterModel {
        config: config.clone(),
        layers,
        bank,
        extras: BTreeMap::new(),
        replaced: BTreeMap::new(),
    })
}

/// Fresh layers for `config` (as [`init_adapter`] builds them: per-module rank / alpha / `n_frequency`,
/// PEFT's initializations drawn from `seed`) on already-loaded bases `(module name, [out, in] weight,
/// bias)`, e.g. a model's own linears; the caller chose the targets. Parameters go into `store` under their
/// adapter-file keys; layers come back in `bases` order with `opts.algo` set.
pub fn init_layers(
    config: &AdapterConfig,
    bases: Vec<(String, BaseWeight, Option<Tensor>)>,
    store: &mut ParamStore,
    seed: u64,
    opts: &LoadOptions,
) -> Result<BuiltLayers> {
    config.validate()?;
    let dims: Vec<(String, usize, usize)> = bases
        .iter()
        .map(|(m, w, _)| (m.clone(), w.out_features(), w.in_features()))
        .collect();
    let bases: Vec<(BaseWeight, Option<Tensor>)> = bases.into_iter().map(|(_, w, b)| (w, b)).collect();
    // Per-layer seeds: independent streams, stable under adding or removing other targets.
    let layer_seed = |name: &str| {
        name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let mut layers = Vec::with_capacity(dims.len());
    let mut bank = None;
    match &config.method {
        MethodConfig::Lora(c) => {
            if c.lora_bias {
                return Err(Error::invalid(
                    "init_adapter: lora_bias layers are not available yet",
                ));
            }
            let init = match &c.init_lora_weights {
                InitLoraWeights::Bool(true) => LoraInit::Default,
                InitLoraWeights::Bool(false) => LoraInit::Random,
                InitLoraWeights::Named(s) if s == "gaussian" => LoraInit::Gaussian,
                InitLoraWeights::Named(s) => {
                    return Err(Error::invalid(format!(
                        "init_adapter: init_lora_weights {s:?} is not supported (true, false or \"gaussian\")"
                    )));
                }
            };
            for ((m, _, _), (w, bias)) in dims.iter().zip(bases) {
                let r = config.rank_for(m).unwrap_or(c.r);
                let alpha = config.alpha_for(m).unwrap_or(c.lora_alpha);
                let lc = LoraLayerConfig {
                    r,
                    alpha: alpha as f32,
                    use_rslora: c.use_rslora,
                    dropout: dropout_of(c.lora_dropout, "lora_dropout", m)?,
                    init,
                    dtype: DType::F32,
                };
                layers.push(if c.use_dora {
                    Box::new(DoraLinear::new(
                        m,
                        w,
                        bias,
                        &lc,
                        store,
                        layer_seed(m),
                        DoraOptions::default(),
                    )?)
                } else {
                    Box::new(LoraLinear::new(m, w, bias, &lc, store, layer_seed(m))?)
                        as Box<dyn AdapterLinear>
                });
            }
        }
        MethodConfig::WaveFt(c) => {
            let ns: Vec<usize> = if c.proportional_parameters {
                let cells: Vec<(usize, usize)> = dims.iter().map(|(_, o, i)| (*o, *i)).collect();
                proportional_n_frequency(c.n_frequency, &cells)?
            } else {
                dims.iter()
                    .map(|(m, _, _)| config.n_frequency_for(m).unwrap_or(c.n_frequency))
                    .collect()
            };
            for (((m, _, _), (w, bias)), n) in dims.iter().zip(bases).zip(ns) {
                let cfg = WaveFtConfig {
                    n_frequency: n,
                    ..c.into()
                };
                layers.push(Box::new(WaveFtLinear::new(
                    m,
                    w,
                    bias,
                    &cfg,
                    c.init_weights,
                    store,
                    layer_seed(m),
                )?));
            }
        }
        MethodConfig::VbLora(c) => {
            let bound = c.init_vector_bank_bound as f32;
            let b = VbLoraBank::new(&VbLoraConfig::from(c), bound, store, seed, opts.device)?;
            let lo = VbLoraOptions {
                dropout: c.vblora_dropout as f32,
                init_logits_std: c.init_logits_std as f32,
            };
            for ((m, _, _), (w, bias)) in dims.iter().zip(bases) {
                layers.push(Box::new(VbLoraLinear::new(
                    m,
                    w,
                    bias,
                    &b,
                    &lo,
                    store,
                    layer_seed(m),
                )?));
            }
            bank = Some(b);
        }
    }
    for l in &mut layers {
        l.set_algo(opts.algo);
    }
    Ok((layers, bank))
}

/// A PEFT adapter from every parameter of `store` whose name is one of `config`'s adapter-file keys
/// (`base_model.model.<module>.<part>` of the config's method, and the VB-LoRA bank), for layers built by
/// hand (`LoraLinear::new`, `WaveFtLinear::new`, ...). Other parameters are ignored. With no
/// `target_modules` in the config, the modules found are written as the target list.
pub fn adapter_from_store(config: &AdapterConfig, store: &ParamStore) -> Result<PeftAdapter> {
    let method = config.peft_type();
    let mut tensors = BTreeMap::new();
    let mut modules = Vec::new();
    for (_, name, value) in store.iter() {
        let keep = if name == BANK_KEY {
            method == PeftType::VbLora
        } else if let Some(rest) = name.strip_prefix("base_model.model.") {
            match Part::ALL
                .iter()
                .filter(|p| p.peft_type() == method)
                .find_map(|p| rest.strip_suffix(p.suffix()).and_then(|m| m.strip_suffix('.')))
            {
                Some(module) => {
                    modules.push(module.to_string());
                    true
                }
                None => false,
            }
        } else {
            false
        };
        if keep {
            tensors.insert(name.to_string(), value.to_device(Device::Cpu)?);
        }
    }
    let mut config = config.clone();
    if config.target_modules.is_none() {
        modules.sort();
        modules.dedup();
        config.target_modules = Some(TargetModules::Names(modules));
    }
    to_file_form(PeftAdapter { config, tensors })
}

/// The adapter in the form its config says it is stored (VB-LoRA `save_only_topk_weights`: full logits
/// become `_topk_indices` + `_topk_weights`, as PEFT saves them), validated: what
/// [`PeftAdapter::save`] writes as is.
pub fn to_file_form(mut adapter: PeftAdapter) -> Result<PeftAdapter> {
    if let Some(c) = adapter.config.vblora().filter(|c| c.save_only_topk_weights) {
        let topk = c.topk;
        let full: Vec<String> = adapter
            .tensors
            .keys()
            .filter(|k| {
                k.starts_with("base_model.model.")
                    && (k.ends_with(".vblora_logits_A") || k.ends_with(".vblora_logits_B"))
            })
            .cloned()
            .collect();
        for k in full {
            let logits = adapter
                .tensors
                .remove(&k)
                .ok_or_else(|| Error::invalid("logits vanished"))?;
            // torch.topk's order, ties included (what PEFT's own save writes).
            let (idx, w) = vblora_compress_topk(&logits, topk)?;
            adapter.tensors.insert(format!("{k}_topk_indices"), idx);
            adapter.tensors.insert(format!("{k}_topk_weights"), w);
        }
    }
    adapter.layout()?;
    Ok(adapter)
}
