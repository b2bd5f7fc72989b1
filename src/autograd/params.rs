//! Parameter storage ([`ParamStore`]) and the gradients a backward pass produces ([`Gradients`]).
//!
//! **Gradient dtype.** Gradients are always f32, whatever the parameter dtype: an f32 parameter gets an
//! f32 gradient, and a bf16/f16 parameter gets an f32 gradient too, accumulated in f32 (several uses of
//! a parameter add up in f32, not in bf16). AdamW reads f32 gradients and keeps f32 moments, so a half
//! parameter is rounded exactly once per step. This costs 4 B per trainable element, which for adapter
//! parameters (a few million elements) is negligible next to the frozen base model.

use super::{cpu, ops};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};

/// Handle of a parameter in one [`ParamStore`] (its insertion index). Only meaningful for the store
/// that returned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(usize);

impl ParamId {
    /// The insertion index.
    pub fn index(self) -> usize {
        self.0
    }
}

impl std::fmt::Display for ParamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "param#{}", self.0)
    }
}

struct Entry {
    name: String,
    value: Tensor,
    trainable: bool,
}

/// Named float tensors in insertion order, each trainable (the default) or frozen.
#[derive(Default)]
pub struct ParamStore {
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for e in &self.entries {
            l.entry(&format_args!(
                "{} {:?}{}",
                e.name,
                e.value,
                if e.trainable { "" } else { " (frozen)" }
            ));
        }
        l.finish()
    }
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&self, id: ParamId) -> Result<&Entry> {
        self.entries.get(id.0).ok_or_else(|| {
            Error::invalid(format!(
                "{id} does not exist (the store holds {} parameters)",
                self.entries.len()
            ))
        })
    }

    fn entry_mut(&mut self, id: ParamId) -> Result<&mut Entry> {
        let n = self.entries.len();
        self.entries
            .get_mut(id.0)
            .ok_or_else(|| Error::invalid(format!("{id} does not exist (the store holds {n} parameters)")))
    }

    /// Adds a trainable parameter. Errors on a duplicate or empty name and on a non-float dtype.
    pub fn insert(&mut self, name: impl Into<String>, value: Tensor) -> Result<ParamId> {
        let name = name.into();
        if name.is_empty() {
            return Err(Error::invalid("parameter names must not be empty"));
        }
        if self.by_name.contains_key(&name) {
            return Err(Error::invalid(format!("duplicate parameter name {name:?}")));
        }
        value.dtype().expect_float("ParamStore::insert")?;
        let id = ParamId(self.entries.len());
        self.by_name.insert(name.clone(), id.0);
        self.entries.push(Entry {
            name,
            value,
            trainable: true,
        });
        Ok(id)
    }

    /// The value of `id`.
    pub fn get(&self, id: ParamId) -> Result<&Tensor> {
        Ok(&self.entry(id)?.value)
    }

    /// Mutable access to the value of `id` (the optimizer updates it in place).
    pub fn get_mut(&mut self, id: ParamId) -> Result<&mut Tensor> {
        Ok(&mut self.entry_mut(id)?.value)
    }

    /// Replaces the value of `id`. The new value must have the same shape, dtype and device (use
    /// `to_dtype` / [`ParamStore::to_device`] to change those), so optimizer state stays valid.
    pub fn set(&mut self, id: ParamId, value: Tensor) -> Result<()> {
        let e = self.entry_mut(id)?;
        if value.shape() != e.value.shape() {
            return Err(Error::shape(
                "ParamStore::set",
                format!(
                    "parameter {:?} is {:?}, new value is {:?}",
                    e.name,
                    e.value.shape(),
                    value.shape()
                ),
            ));
        }
        if value.dtype() != e.value.dtype() {
            return Err(Error::dtype(
                "ParamStore::set",
                e.value.dtype().as_str(),
                value.dtype(),
            ));
        }
        if value.device() != e.value.device() {
            return Err(Error::device(
                "ParamStore::set",
                format!(
                    "parameter {:?} lives on {}, new value on {}",
                    e.name,
                    e.value.device(),
                    value.device()
                ),
            ));
        }
        e.value = value;
        Ok(())
    }

    /// The name of `id`.
    pub fn name(&self, id: ParamId) -> Result<&str> {
        Ok(&self.entry(id)?.name)
    }

    /// The id of the parameter called `name`.
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).map(|&i| ParamId(i))
    }

    /// Freezes (`false`) or unfreezes (`true`) a parameter. Frozen parameters get no gradient.
    pub fn set_trainable(&mut self, id: ParamId, trainable: bool) -> Result<()> {
        self.entry_mut(id)?.trainable = trainable;
        Ok(())
    }

    /// Whether `id` is trainable (false for an unknown id).
    pub fn is_trainable(&self, id: ParamId) -> bool {
        self.entries.get(id.0).is_some_and(|e| e.trainable)
    }

    /// `(id, name, value)` in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &str, &Tensor)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (ParamId(i), e.name.as_str(), &e.value))
    }

    /// Ids of the trainable parameters, in insertion order.
    pub fn trainable_ids(&self) -> impl Iterator<Item = ParamId> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.trainable)
            .map(|(i, _)| ParamId(i))
    }

    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the store holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Elements of the trainable parameters.
    pub fn num_trainable_elements(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.trainable)
            .map(|e| e.value.numel())
            .sum()
    }

    /// Bytes held by all parameter values (trainable and frozen).
    pub fn size_in_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.value.size_in_bytes()).sum()
    }

    /// Moves every parameter to `device`. All or nothing: on error the store is unchanged.
    pub fn to_device(&mut self, d: Device) -> Result<()> {
        let moved = self
            .entries
            .iter()
            .map(|e| e.value.to_device(d))
            .collect::<Result<Vec<_>>>()?;
        for (e, v) in self.entries.iter_mut().zip(moved) {
            e.value = v;
        }
        Ok(())
    }
}

/// Gradients of trainable parameters: `ParamId -> f32 tensor` of the parameter's shape and device
/// (see the module docs for why always f32). Iteration is in `ParamId` order.
#[derive(Default, Clone)]
pub struct Gradients {
    grads: BTreeMap<ParamId, Tensor>,
}

impl std::fmt::Debug for Gradients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.grads.iter()).finish()
    }
}

impl Gradients {
    /// No gradients.
    pub fn new() -> Self {
        Self::default()
    }

    /// The gradient of `id`, if it has one.
    pub fn get(&self, id: ParamId) -> Option<&Tensor> {
        self.grads.get(&id)
    }

    /// Removes and returns the gradient of `id`.
    pub fn remove(&mut self, id: ParamId) -> Option<Tensor> {
        self.grads.remove(&id)
    }

    /// Adds `g` to the gradient of `id` (or stores it). `g` may be any float dtype; it is converted to
    /// f32 and summed in f32. Errors if an existing gradient has another shape or device.
    pub fn insert_or_add(&mut self, id: ParamId, g: Tensor) -> Result<()> {
        g.dtype().expect_float("Gradients::insert_or_add")?;
        let g = g.to_dtype(DType::F32)?;
        match self.grads.get_mut(&id) {
            None => {
                self.grads.insert(id, g);
            }
            Some(acc) => {
                if acc.shape() != g.shape() {
                    return Err(Error::shape(
                        "Gradients::insert_or_add",
                        format!(
                            "gradient of {id} is {:?}, new contribution is {:?}",
                            acc.shape(),
                            g.shape()
                        ),
                    ));
                }
                acc.add_scaled_(&g, 1.0)?;
            }
        }
        Ok(())
    }

    /// `(id, gradient)` in `ParamId` order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Tensor)> {
        self.grads.iter().map(|(&id, g)| (id, g))
    }

    /// Number of gradients.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// True when there is no gradient.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// `sqrt(sum over all gradients of sum(g²))`, the L2 norm of all gradients viewed as one vector
    /// (torch's `clip_grad_norm_` with `norm_type=2`). One device round trip per device involved.
    pub fn global_norm(&self) -> Result<f32> {
        Ok(self.sum_squares()?.sqrt() as f32)
    }

    fn sum_squares(&self) -> Result<f64> {
        let mut total = 0f64;
        let mut by_device: BTreeMap<usize, Vec<&Tensor>> = BTreeMap::new();
        for g in self.grads.values() {
            match g.device() {
                Device::Cpu => total += cpu::sum_squares_f32(g.cpu_data::<f32>("global_norm")?),
                Device::Cuda(o) => by_device.entry(o).or_default().push(g),
            }
        }
        for (_, gs) in by_device {
            total += ops::sum_squares_cuda(&gs)?;
        }
        Ok(total)
    }

    /// Scales all gradients so that their global norm is at most `max_norm`, like
    /// `torch.nn.utils.clip_grad_norm_`: the factor is `max_norm / (norm + 1e-6)` when below 1.
    /// Returns the norm before clipping. A non-finite norm leaves the gradients untouched (check the
    /// returned value and skip the step).
    pub fn clip_global_norm(&mut self, max_norm: f32) -> Result<f32> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(Error::invalid(format!(
                "clip_global_norm: max_norm must be finite and > 0, got {max_norm}"
            )));
        }
        let norm = self.sum_squares()?.sqrt();
        if !norm.is_finite() {
            return Ok(norm as f32);
        }
        let coef = max_norm as f64 / (norm + 1e-6);
        if coef < 1.0 {
            self.scale(coef as f32)?;
        }
        Ok(norm as f32)
    }

    /// Multiplies every gradient by `s` (e.g. `1 / accumulation_steps`).
    pub fn scale(&mut self, s: f32) -> Result<()> {
        if !s.is_finite() {
            return Err(Error::invalid(format!(
                "Gradients::scale: factor must be finite, got {s}"
            )));
        }
        for g in self.grads.values_mut() {
            *g = g.scale(s)?;
        }
        Ok(())
    }
}
