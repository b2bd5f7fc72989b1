//! A whole PEFT adapter on the candle side: [`CandleLinear`] (any adapter layer as one candle module) and
//! [`CandleAdapter`] (every layer of an adapter, loaded from a PEFT directory on a base checkpoint or
//! created fresh, trained through its `Var`s, saved back as a PEFT directory).

use super::convert::to_ours;
use super::{DoraLinear, QLoraLinear, VbLoraLinear, WaveFtLinear};
use crate::adapters::AdapterLinear;
use crate::autograd::ParamStore;
use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use crate::io::peft::{AdapterConfig, PeftAdapter};
use crate::peft_model::load::{AdapterModel, LoadOptions, init_adapter, load_adapter};
use candle_core as cc;
use candle_core::Var;
use candle_nn::VarMap;
use std::path::Path;

/// Our device for a candle device (CPU, or CUDA with the `candle-cuda` feature).
pub(crate) fn our_device(dev: &cc::Device) -> Result<crate::Device> {
    match dev.location() {
        cc::DeviceLocation::Cpu => Ok(crate::Device::Cpu),
        #[cfg(feature = "candle-cuda")]
        cc::DeviceLocation::Cuda { gpu_id } => Ok(crate::Device::Cuda(gpu_id)),
        l => Err(Error::device(
            "candle",
            format!("{l:?}: only the CPU (and CUDA with the `candle-cuda` feature) is supported"),
        )),
    }
}

/// Any adapter layer as a candle module.
#[derive(Clone, Debug)]
pub enum CandleLinear {
    Lora(QLoraLinear),
    Dora(DoraLinear),
    WaveFt(WaveFtLinear),
    VbLora(VbLoraLinear),
}

/// `$body` with `$l` bound to the concrete candle layer inside a [`CandleLinear`].
macro_rules! each {
    ($s:expr, |$l:ident| $body:expr) => {
        match $s {
            CandleLinear::Lora($l) => $body,
            CandleLinear::Dora($l) => $body,
            CandleLinear::WaveFt($l) => $body,
            CandleLinear::VbLora($l) => $body,
        }
    };
}

impl CandleLinear {
    /// Wraps one of our adapter layers (LoRA/QLoRA, DoRA, WaveFT or VB-LoRA; a frozen layer is an error):
    /// see [`QLoraLinear::new`].
    pub fn from_layer(
        layer: &dyn AdapterLinear,
        store: &ParamStore,
        vars: &VarMap,
        device: &cc::Device,
    ) -> Result<CandleLinear> {
        let any = layer.as_any();
        if let Some(l) = any.downcast_ref::<crate::adapters::lora::LoraLinear>() {
            return QLoraLinear::new(l.clone(), store, vars, device).map(CandleLinear::Lora);
        }
        if let Some(l) = any.downcast_ref::<crate::adapters::dora::DoraLinear>() {
            return DoraLinear::new(l.clone(), store, vars, device).map(CandleLinear::Dora);
        }
        if let Some(l) = any.downcast_ref::<crate::adapters::waveft::WaveFtLinear>() {
            return WaveFtLinear::new(l.clone(), store, vars, device).map(CandleLinear::WaveFt);
        }
        if let Some(l) = any.downcast_ref::<crate::adapters::vblora::VbLoraLinear>() {
            return VbLoraLinear::new(l.clone(), store, vars, device).map(CandleLinear::VbLora);
        }
        Err(Error::invalid(format!(
            "{}: not an adapter layer (LoRA, DoRA, WaveFT or VB-LoRA)",
            layer.name()
        )))
    }

    /// Our layer behind the trait.
    pub fn layer(&self) -> &dyn AdapterLinear {
        each!(self, |l| l.layer())
    }

    /// The module path.
    pub fn name(&self) -> &str {
        self.layer().name()
    }

    /// The trainable parameters.
    pub fn vars(&self) -> &[Var] {
        each!(self, |l| l.vars())
    }

    /// See [`QLoraLinear::forward_t`].
    pub fn forward_t(&self, x: &cc::Tensor, dropout_seed: Option<u64>) -> cc::Result<cc::Tensor> {
        each!(self, |l| l.forward_t(x, dropout_seed))
    }

    /// See [`QLoraLinear::forward_eval`].
    pub fn forward_eval(&self, x: &cc::Tensor) -> cc::Result<cc::Tensor> {
        each!(self, |l| l.forward_eval(x))
    }

    /// The current parameter values under their PEFT keys (on the CPU).
    pub fn peft_tensors(&self) -> Result<Vec<(String, crate::Tensor)>> {
        each!(self, |l| l.peft_tensors())
    }
}

impl cc::Module for CandleLinear {
    fn forward(&self, x: &cc::Tensor) -> cc::Result<cc::Tensor> {
        self.forward_t(x, None)
    }
}

/// Every adapted layer of one PEFT adapter as candle modules, with the adapter's parameters as `Var`s in
/// one [`VarMap`] (under their PEFT keys).
pub struct CandleAdapter {
    model: AdapterModel,
    store: ParamStore,
    layers: Vec<CandleLinear>,
    vars: VarMap,
}

impl std::fmt::Debug for CandleAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleAdapter")
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}

impl CandleAdapter {
    /// Wraps an adapter built by our loaders (`peft_model::load`), its parameters from `store`.
    pub fn new(model: AdapterModel, store: ParamStore, device: &cc::Device) -> Result<CandleAdapter> {
        let vars = VarMap::new();
        let layers = model
            .layers()
            .iter()
            .map(|l| CandleLinear::from_layer(&**l, &store, &vars, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(CandleAdapter {
            model,
            store,
            layers,
            vars,
        })
    }

    /// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`; LoRA, DoRA,
    /// WaveFT or VB-LoRA) onto the base checkpoint `base` (dense, or bitsandbytes 4-bit as transformers
    /// saves it), on `device`.
    pub fn load(
        base: &SafetensorsFile,
        adapter_dir: impl AsRef<Path>,
        device: &cc::Device,
    ) -> Result<CandleAdapter> {
        let dev = our_device(device)?;
        let adapter = PeftAdapter::load(adapter_dir, dev)?;
        let mut store = ParamStore::new();
        let opts = LoadOptions {
            device: dev,
            ..LoadOptions::default()
        };
        let model = load_adapter(base, &adapter, &mut store, &opts)?;
        CandleAdapter::new(model, store, device)
    }

    /// A fresh adapter for `config` on `base`, initialized as PEFT's `get_peft_model` does (from `seed`);
    /// see `peft_model::load::init_adapter` for what is supported.
    pub fn init(
        base: &SafetensorsFile,
        config: &AdapterConfig,
        seed: u64,
        device: &cc::Device,
    ) -> Result<CandleAdapter> {
        let opts = LoadOptions {
            device: our_device(device)?,
            ..LoadOptions::default()
        };
        let mut store = ParamStore::new();
        let model = init_adapter(base, config, &mut store, seed, &opts)?;
        CandleAdapter::new(model, store, device)
    }

    /// Every layer, sorted by module path.
    pub fn layers(&self) -> &[CandleLinear] {
        &self.layers
    }

    /// The layer of module `name`.
    pub fn layer(&self, name: &str) -> Option<&CandleLinear> {
        self.layers.iter().find(|l| l.name() == name)
    }

    /// The `Var`s by PEFT key (hand `all_vars()` to a candle-nn optimizer).
    pub fn var_map(&self) -> &VarMap {
        &self.vars
    }

    /// Our adapter model (config, frozen layers).
    pub fn model(&self) -> &AdapterModel {
        &self.model
    }

    /// Copies the `Var`s' current values into our parameter store and returns it (for our own tools:
    /// merge, evaluation, [`AdapterModel::save`]).
    pub fn sync_store(&mut self) -> Result<&ParamStore> {
        let store = &mut self.store;
        let map = self
            .vars
            .data()
            .lock()
            .map_err(|_| Error::invalid("candle: the VarMap lock is poisoned"))?;
        for (name, var) in map.iter() {
            let id = store
                .find(name)
                .ok_or_else(|| Error::invalid(format!("candle: {name} is not an adapter parameter")))?;
            let dev = store.get(id)?.device();
            store.set(id, to_ours(var.as_tensor())?.to_device(dev)?)?;
        }
        Ok(&self.store)
    }

    /// Writes the adapter with the `Var`s' current values as a PEFT adapter directory
    /// (`PeftModel.from_pretrained` loads it).
    pub fn save(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        self.sync_store()?;
        self.model.save(&self.store, dir)
    }
}
