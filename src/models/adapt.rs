//! Adapters on a model's linear slots: fresh ones from a PEFT config, or the layers of a loaded PEFT
//! adapter, installed into the slots with the same module names.

use crate::adapters::AdapterLinear;
use crate::adapters::vblora::VbLoraBank;
use crate::autograd::ParamStore;
use crate::error::{Error, Result};
use crate::io::peft::{AdapterConfig, PeftAdapter};
use crate::models::{LinearSlot, ModelLoadOptions};
use crate::peft_model::load::{LoadOptions, build_layers, init_layers};
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
        if let Some(want) = m.base_weight_shape() {
            let got = [slot.base().out_features(), slot.base().in_features()];
            if got != want {
                return Err(Error::shape(
                    "attach_adapter",
                    format!(
                        "module {:?}: base weight is {got:?}, the adapter needs {want:?}",
                        m.name
                    ),
                ));
            }
        }
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
