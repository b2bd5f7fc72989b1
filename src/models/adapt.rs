//! Adapters on a model's linear slots: fresh ones from a PEFT config, or the layers of a loaded PEFT
//! adapter, installed into the slots with the same module names; the task heads PEFT saves as
//! `modules_to_save`; and the adapter methods every backbone and task model shares (one implementation,
//! stamped onto each model type by [`backbone_adapter_methods`] / [`task_adapter_methods`]).

use crate::adapters::AdapterLinear;
use crate::adapters::vblora::VbLoraBank;
use crate::autograd::{ParamId, ParamStore};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::peft::{AdapterConfig, ExtraKind, PeftAdapter};
use crate::models::{LinearSlot, ModelLoadOptions};
use crate::peft_model::load::{LoadOptions, adapter_from_store, build_layers, check_base_shape, init_layers};
use crate::tensor::{DType, Tensor};
use std::collections::HashMap;

impl ModelLoadOptions {
    /// How adapter layers are placed on a model loaded with these options.
    pub(crate) fn adapter_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            dtype: Some(self.dtype),
            algo: self.algo,
        }
    }
}

/// Fresh adapters (as `get_peft_model` initializes them from `seed`) on every slot `config` targets.
/// Returns the adapted module names and the VB-LoRA bank, if any.
pub(crate) fn init_into(
    slots: Vec<&mut LinearSlot>,
    config: &AdapterConfig,
    store: &mut ParamStore,
    seed: u64,
    lo: &LoadOptions,
) -> Result<(Vec<String>, Option<VbLoraBank>)> {
    if slots.iter().any(|s| s.adapter().is_some()) {
        return Err(Error::invalid("the model already has adapters"));
    }
    let bases: Vec<_> = slots
        .iter()
        .filter(|s| config.targets(s.name(), true))
        .map(|s| (s.name().to_string(), s.base().clone(), s.bias().cloned()))
        .collect();
    if bases.is_empty() {
        return Err(Error::invalid(
            "no linear of the model matches the config's target_modules",
        ));
    }
    let (layers, bank) = init_layers(config, bases, store, seed, lo)?;
    Ok((install(slots, layers)?, bank))
}

/// The layers of a loaded PEFT adapter on the slots of the same names (shapes checked).
pub(crate) fn attach_into(
    slots: Vec<&mut LinearSlot>,
    adapter: &PeftAdapter,
    store: &mut ParamStore,
    lo: &LoadOptions,
) -> Result<(Vec<String>, Option<VbLoraBank>)> {
    if slots.iter().any(|s| s.adapter().is_some()) {
        return Err(Error::invalid("the model already has adapters"));
    }
    if adapter.config.bias != "none" {
        return Err(Error::invalid(format!(
            "adapter bias {:?}: trained base biases are not supported (only \"none\")",
            adapter.config.bias
        )));
    }
    let layout = adapter.layout()?;
    let mut bases = Vec::with_capacity(layout.modules.len());
    for m in &layout.modules {
        let slot = slots.iter().find(|s| s.name() == m.name).ok_or_else(|| {
            Error::invalid(format!(
                "the adapter has module {:?}, which is not a linear of this model (names like {:?})",
                m.name,
                slots.first().map(|s| s.name().to_string()).unwrap_or_default()
            ))
        })?;
        check_base_shape(m, slot.base(), "attach_adapter")?;
        bases.push((slot.base().clone(), slot.bias().cloned()));
    }
    let (layers, bank) = build_layers(adapter, &layout.modules, bases, store, lo)?;
    Ok((install(slots, layers)?, bank))
}

fn install(slots: Vec<&mut LinearSlot>, layers: Vec<Box<dyn AdapterLinear>>) -> Result<Vec<String>> {
    let mut names = Vec::with_capacity(layers.len());
    let mut by_name: HashMap<String, Box<dyn AdapterLinear>> =
        layers.into_iter().map(|l| (l.name().to_string(), l)).collect();
    for slot in slots {
        if let Some(l) = by_name.remove(slot.name()) {
            names.push(l.name().to_string());
            *slot = LinearSlot::Adapter(l);
        }
    }
    if let Some(n) = by_name.keys().next() {
        return Err(Error::invalid(format!(
            "adapter layer {n:?} has no slot in the model"
        )));
    }
    Ok(names)
}

/// The adapter methods of a backbone (`BertModel`, `LlamaModel`): `param_ids`, `init_adapter`,
/// `attach_adapter`, `adapter_layers`, over its `linears()` / `linears_mut()` and its `bank` and `opts`
/// fields.
macro_rules! backbone_adapter_methods {
    ($model:ty) => {
        impl $model {
            /// Every trainable parameter the linears use (adapter parameters and the VB-LoRA bank).
            pub fn param_ids(&self) -> Vec<$crate::autograd::ParamId> {
                let mut v: Vec<_> = self.linears().iter().flat_map(|s| s.param_ids()).collect();
                v.extend(self.bank.map(|b| b.id()));
                v
            }

            /// Attaches fresh adapters from a PEFT config to every linear it targets (`target_modules`,
            /// `exclude_modules`, `layers_to_transform`, `rank_pattern`, `alpha_pattern` as PEFT resolves
            /// them over transformers' module names), initialized as `get_peft_model` does from `seed`.
            /// Returns the adapted module names.
            pub fn init_adapter(
                &mut self,
                config: &$crate::io::peft::AdapterConfig,
                store: &mut $crate::autograd::ParamStore,
                seed: u64,
            ) -> $crate::error::Result<Vec<String>> {
                let lo = self.opts.adapter_options();
                let (names, bank) =
                    $crate::models::adapt::init_into(self.linears_mut(), config, store, seed, &lo)?;
                self.bank = bank;
                Ok(names)
            }

            /// Attaches the layers of a loaded PEFT adapter (every adapted module must be one of the
            /// model's linears with the adapter's shapes). The adapter's extra tensors (`modules_to_save`)
            /// are not handled here: the task models' `load_adapter` reads them.
            pub fn attach_adapter(
                &mut self,
                adapter: &$crate::io::peft::PeftAdapter,
                store: &mut $crate::autograd::ParamStore,
            ) -> $crate::error::Result<Vec<String>> {
                let lo = self.opts.adapter_options();
                let (names, bank) =
                    $crate::models::adapt::attach_into(self.linears_mut(), adapter, store, &lo)?;
                self.bank = bank;
                Ok(names)
            }

            /// The adapter layers, in module order.
            pub fn adapter_layers(&self) -> Vec<&dyn $crate::adapters::AdapterLinear> {
                self.linears()
                    .into_iter()
                    .filter_map($crate::models::LinearSlot::adapter)
                    .collect()
            }
        }
    };
}
pub(crate) use backbone_adapter_methods;

/// The fully trained modules of a task model (PEFT's `modules_to_save`): what its adapter config must
/// list, and the parameters PEFT saves for them.
pub(crate) struct SavedModules {
    /// The model's transformers class name, for error messages.
    pub model: &'static str,
    /// The module a config must list in `modules_to_save` (PEFT's SEQ_CLS `task_type` adds
    /// `["classifier", "score"]`); `None`: the model has none, and a config must list none.
    pub module: Option<&'static str>,
    /// The parameters by their name after `base_model.model.` (`"score.weight"`); their store names are
    /// the keys PEFT saves them under.
    pub params: Vec<(&'static str, ParamId)>,
}

impl SavedModules {
    /// Checks a config's `modules_to_save` against the model.
    pub fn check(&self, config: &AdapterConfig) -> Result<()> {
        let listed = config.modules_to_save.as_deref().unwrap_or_default();
        match self.module {
            Some(m) if listed.iter().any(|n| n == m) => Ok(()),
            Some(m) => Err(Error::invalid(format!(
                "a {} adapter must list \"{m}\" in modules_to_save (PEFT's SEQ_CLS task_type adds it)",
                self.model
            ))),
            None if listed.is_empty() => Ok(()),
            None => Err(Error::invalid(format!(
                "modules_to_save {listed:?}: fully trained modules are not supported on {}",
                self.model
            ))),
        }
    }

    /// The values `adapter` stores for the parameters (f32 on `device`, shapes checked against `store`),
    /// after checking its config.
    pub fn read(
        &self,
        adapter: &PeftAdapter,
        store: &ParamStore,
        device: Device,
    ) -> Result<Vec<(ParamId, Tensor)>> {
        self.check(&adapter.config)?;
        let layout = adapter.layout()?;
        let mut values = Vec::with_capacity(self.params.len());
        if self.params.is_empty() {
            return Ok(values);
        }
        for e in layout
            .extras
            .iter()
            .filter(|e| e.kind == ExtraKind::ModulesToSave)
        {
            let Some(&(_, id)) = self.params.iter().find(|(n, _)| *n == e.base_name) else {
                return Err(Error::invalid(format!(
                    "modules_to_save tensor {:?} is not part of {}",
                    e.base_name, self.model
                )));
            };
            let t = adapter.tensors[&e.key].to_device(device)?.to_dtype(DType::F32)?;
            let want = store.get(id)?.shape();
            if t.shape() != want {
                return Err(Error::shape(
                    "load_adapter",
                    format!("{:?} is {:?}, {} needs {want:?}", e.key, t.shape(), self.model),
                ));
            }
            values.push((id, t));
        }
        if values.len() != self.params.len() {
            let names: Vec<_> = self.params.iter().map(|(n, _)| *n).collect();
            return Err(Error::invalid(format!(
                "the adapter lists {} in modules_to_save but does not store {names:?}",
                self.module.unwrap_or_default()
            )));
        }
        Ok(values)
    }

    /// The adapter in `store` in PEFT's file form: every adapter parameter under its key plus the
    /// parameters of the saved modules under their store names.
    pub fn to_peft(&self, config: &AdapterConfig, store: &ParamStore) -> Result<PeftAdapter> {
        self.check(config)?;
        let mut a = adapter_from_store(config, store)?;
        for &(_, id) in &self.params {
            a.tensors.insert(
                store.name(id)?.to_string(),
                store.get(id)?.to_device(Device::Cpu)?,
            );
        }
        a.layout()?;
        Ok(a)
    }
}

/// The adapter methods of a task model over its backbone field and its `saved_modules()`:
/// `init_adapter`, `load_adapter`, `to_peft`, `save_adapter`.
macro_rules! task_adapter_methods {
    ($model:ty, $backbone:ident) => {
        impl $model {
            /// Attaches fresh adapters (see the backbone's `init_adapter`); the config's `modules_to_save`
            /// must name the task head if the model has one (PEFT's SEQ_CLS default `["classifier",
            /// "score"]`), which is always trained, and must be empty otherwise.
            pub fn init_adapter(
                &mut self,
                config: &$crate::io::peft::AdapterConfig,
                store: &mut $crate::autograd::ParamStore,
                seed: u64,
            ) -> $crate::error::Result<Vec<String>> {
                self.saved_modules().check(config)?;
                self.$backbone.init_adapter(config, store, seed)
            }

            /// Loads a PEFT adapter directory saved for this model class (by PEFT or by `save_adapter`):
            /// its layers, and the trained head copy (`modules_to_save`, e.g.
            /// `base_model.model.classifier.weight`), which replaces the current head values.
            pub fn load_adapter(
                &mut self,
                dir: impl AsRef<std::path::Path>,
                store: &mut $crate::autograd::ParamStore,
            ) -> $crate::error::Result<$crate::io::peft::PeftAdapter> {
                let device = self.$backbone.opts.device;
                let adapter = $crate::io::peft::PeftAdapter::load(dir, device)?;
                let head = self.saved_modules().read(&adapter, store, device)?;
                self.$backbone.attach_adapter(&adapter, store)?;
                for (id, t) in head {
                    store.set(id, t)?;
                }
                Ok(adapter)
            }

            /// The adapter in PEFT's file form: every adapter parameter under its key plus the trained
            /// head as PEFT saves `modules_to_save` (`base_model.model.classifier.weight`, ...).
            pub fn to_peft(
                &self,
                config: &$crate::io::peft::AdapterConfig,
                store: &$crate::autograd::ParamStore,
            ) -> $crate::error::Result<$crate::io::peft::PeftAdapter> {
                self.saved_modules().to_peft(config, store)
            }

            /// Writes the adapter directory (`adapter_config.json` + `adapter_model.safetensors`) that
            /// `PeftModel.from_pretrained` loads onto this model class.
            pub fn save_adapter(
                &self,
                config: &$crate::io::peft::AdapterConfig,
                store: &$crate::autograd::ParamStore,
                dir: impl AsRef<std::path::Path>,
            ) -> $crate::error::Result<()> {
                self.to_peft(config, store)?.save(dir)
            }
        }
    };
}
pub(crate) use task_adapter_methods;
