//! The adapter layers as [candle](https://github.com/huggingface/candle) modules (feature `candle`).
//!
//! [`QLoraLinear`] (LoRA over a dense or bitsandbytes 4-bit base), [`DoraLinear`], [`WaveFtLinear`] and
//! [`VbLoraLinear`] implement [`candle_core::Module`]. The frozen base weight (dense or NF4/FP4, with or
//! without double quantization) lives inside the layer, never as a candle tensor; the adapter parameters
//! are candle [`Var`]s registered in a [`VarMap`] under their PEFT keys, so candle-nn's optimizers
//! (`candle_nn::AdamW`) train them. Each layer call is **one** candle custom op whose forward pass runs
//! our fused kernels (the CPU kernels, or with feature `candle-cuda` the CUDA ones on candle's device)
//! and whose backward pass returns the input gradient and every adapter parameter's gradient from our
//! own backward. candle's custom ops take at most three tensors, so the op's second input is the
//! layer's parameters flattened and concatenated by candle (`cat`, whose backward hands each `Var` its
//! slice of the packed gradient); a shared VB-LoRA bank is one `Var` in several layers' packs.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
//! use peft_kernels::adapters::lora::{LoraConfig, LoraInit, LoraLinear};
//! use peft_kernels::autograd::ParamStore;
//! use peft_kernels::candle::QLoraLinear;
//! use peft_kernels::qmatmul::BaseWeight;
//! use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
//!
//! let w = peft_kernels::Tensor::randn(&[32, 64], 0.1, 0, peft_kernels::DType::F32, peft_kernels::Device::Cpu)?;
//! let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default())?; // NF4, double quant
//! let mut store = ParamStore::new();
//! let cfg = LoraConfig { r: 4, alpha: 8.0, init: LoraInit::Random, ..Default::default() };
//! let lora = LoraLinear::new("proj", BaseWeight::Quantized(q), None, &cfg, &mut store, 1)?;
//! let vars = VarMap::new();
//! let layer = QLoraLinear::new(lora, &store, &vars, &Device::Cpu)?;
//! let mut opt = AdamW::new(vars.all_vars(), ParamsAdamW { lr: 1e-3, ..Default::default() })?;
//! let x = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu)?;
//! let loss = layer.forward(&x)?.sqr()?.mean_all()?;
//! opt.backward_step(&loss)?;                       // only the LoRA Vars change
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`CandleAdapter`] wraps a whole PEFT adapter: loaded from an adapter directory on a base checkpoint
//! (dense or bitsandbytes 4-bit) or created fresh from a config, with every layer as a [`CandleLinear`],
//! and saved back as a PEFT adapter directory.
//!
//! **Copies at the boundary.** On contiguous host tensors nothing is copied. [`QLoraLinear`] (f32): its
//! op (`CustomOp3` of the input, A and B) runs our kernels on candle's buffers in place and hands candle
//! the output and gradient `Vec`s our kernels wrote; the backward pass reads the input again from candle
//! instead of keeping a copy. [`DoraLinear`], [`WaveFtLinear`], [`VbLoraLinear`] (f32, f16, bf16): a
//! ticket op over the `Var`s and the layer op (`host.rs`) run our layer's forward and backward on our
//! tensors that borrow candle's memory (read-only, under candle's storage read locks; see `host.rs` for
//! the soundness argument and what a user must not do), with no packing of the parameters. Strided
//! inputs (one copy to make them contiguous), bf16/f16 LoRA and CUDA go through the general op, which
//! copies the operands into our tensors (our results still move to candle without a copy).
//! [`boundary_copies`] counts every copy the boundary makes on the calling thread, including any copy
//! our layers make of a borrowed candle buffer, which is how the tests check the zero-copy paths;
//! `benches/candle.rs` measures the boundary's cost.
//!
//! **Dropout.** [`candle_core::Module::forward`] runs without dropout; training with the adapter's dropout
//! uses `forward_t(x, Some(step_seed))` (the mask is a pure function of the step seed and the layer
//! name, as in our tape).
//!
//! **CUDA.** The `candle-cuda` feature turns on candle's `cuda` feature, which turns on cudarc's
//! `dynamic-linking`: the CUDA libraries (libcuda, libcublas, libnvrtc, ...) are then needed at link time,
//! unlike our own `cuda` feature, which loads them at run time.

mod convert;
#[cfg(feature = "candle-cuda")]
mod cuda;
mod host;
mod lora;
mod model;
mod op;

pub use convert::{BoundaryCopies, boundary_copies};
pub use model::{CandleAdapter, CandleLinear};

use crate::adapters::AdapterLinear;
use crate::adapters::linear::TapeLinear;
use crate::autograd::ParamStore;
use crate::error::{Error, Result};
use candle_core as cc;
use candle_core::Var;
use candle_nn::VarMap;
use convert::{contiguous, dtype_to_candle, from_candle_err, note_copy, to_candle, to_ours};
use op::AdapterOp;
use std::sync::Arc;

/// What every candle layer shares: our layer, its parameters as `Var`s (pack order), their shapes and
/// PEFT keys.
#[derive(Clone)]
struct Core<L: TapeLinear> {
    layer: Arc<L>,
    vars: Vec<Var>,
    names: Vec<String>,
    shapes: Arc<Vec<Vec<usize>>>,
}

impl<L: TapeLinear + std::fmt::Debug> std::fmt::Debug for Core<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("layer", &self.layer)
            .field("params", &self.names)
            .finish()
    }
}

/// How a layer type's call becomes a candle op: on the host the in-place op (`host.rs`), elsewhere the
/// general op over the packed parameters (copies at the boundary); LoRA has its own op, which reads
/// candle's buffers in place.
trait CandleOp: TapeLinear + AdapterLinear {
    /// `x` (contiguous) through the layer; `record`: whether candle records the op for backprop.
    fn apply(core: &Core<Self>, x: &cc::Tensor, seed: Option<u64>, record: bool) -> cc::Result<cc::Tensor> {
        if let Some(y) = host::apply(&core.layer, &core.vars, x, seed, record) {
            return y;
        }
        let op = AdapterOp::new(core.layer.clone(), core.shapes.clone(), seed);
        if record {
            x.apply_op2(&core.packed()?, op)
        } else {
            x.apply_op2_no_bwd(&core.packed()?.detach(), &op)
        }
    }
}

impl CandleOp for crate::adapters::dora::DoraLinear {}
impl CandleOp for crate::adapters::waveft::WaveFtLinear {}
impl CandleOp for crate::adapters::vblora::VbLoraLinear {}

impl CandleOp for crate::adapters::lora::LoraLinear {
    fn apply(core: &Core<Self>, x: &cc::Tensor, seed: Option<u64>, record: bool) -> cc::Result<cc::Tensor> {
        let op = lora::LoraOp::new(core.layer.clone(), core.shapes.clone(), seed);
        let [a, b] = core.vars.as_slice() else {
            return Err(convert::to_candle_err(Error::invalid(
                "LoraLinear: expected parameters [A, B]",
            )));
        };
        if record {
            x.apply_op3(a.as_tensor(), b.as_tensor(), op)
        } else {
            x.apply_op3_no_bwd(a.as_tensor(), b.as_tensor(), &op)
        }
    }
}

impl<L: CandleOp> Core<L> {
    /// Registers the layer's parameters (values from `store`) in `vars` under their PEFT keys on `dev`;
    /// a key already in `vars` (a shared VB-LoRA bank) is reused when its shape and dtype match.
    fn new(layer: L, store: &ParamStore, vars: &VarMap, dev: &cc::Device) -> Result<Self> {
        let ours = model::our_device(dev)?;
        if layer.base().device() != ours {
            return Err(Error::device(
                "candle",
                format!(
                    "{}: the base weight is on {} but the candle device is {ours}",
                    layer.name(),
                    layer.base().device()
                ),
            ));
        }
        let mut map = vars
            .data()
            .lock()
            .map_err(|_| Error::invalid("candle: the VarMap lock is poisoned"))?;
        let (mut out, mut names, mut shapes) = (Vec::new(), Vec::new(), Vec::new());
        for id in layer.tape_params() {
            let (name, value) = (store.name(id)?, store.get(id)?);
            let want = dtype_to_candle(value.dtype())?;
            let var = match map.get(name) {
                Some(v) => {
                    if v.dims() != value.shape() || v.dtype() != want {
                        return Err(Error::shape(
                            "candle",
                            format!(
                                "{name}: the VarMap holds {:?} {:?}, the layer needs {:?} {want:?}",
                                v.dims(),
                                v.dtype(),
                                value.shape()
                            ),
                        ));
                    }
                    v.clone()
                }
                None => {
                    let v = Var::from_tensor(&to_candle(value.clone(), dev)?).map_err(from_candle_err)?;
                    map.insert(name.to_string(), v.clone());
                    v
                }
            };
            out.push(var);
            names.push(name.to_string());
            shapes.push(value.shape().to_vec());
        }
        if out.iter().any(|v| v.dtype() != out[0].dtype()) {
            return Err(Error::invalid(format!(
                "{}: the adapter parameters of one layer must share a dtype",
                L::OP
            )));
        }
        Ok(Core {
            layer: Arc::new(layer),
            vars: out,
            names,
            shapes: Arc::new(shapes),
        })
    }

    /// The parameters flattened and laid end to end (candle ops, so gradients reach each `Var`; a booked
    /// copy when there is more than one).
    fn packed(&self) -> cc::Result<cc::Tensor> {
        let flat = self
            .vars
            .iter()
            .map(|v| v.as_tensor().flatten_all())
            .collect::<cc::Result<Vec<_>>>()?;
        match flat.as_slice() {
            [one] => Ok(one.clone()),
            _ => {
                let t = cc::Tensor::cat(&flat, 0)?;
                note_copy(t.elem_count() * t.dtype().size_in_bytes());
                Ok(t)
            }
        }
    }

    fn forward_t(&self, x: &cc::Tensor, dropout_seed: Option<u64>) -> cc::Result<cc::Tensor> {
        L::apply(self, &contiguous(x)?, dropout_seed, true)
    }

    fn forward_eval(&self, x: &cc::Tensor) -> cc::Result<cc::Tensor> {
        L::apply(self, &contiguous(x)?, None, false)
    }

    /// The current parameter values under their PEFT keys, as our CPU tensors.
    fn peft_tensors(&self) -> Result<Vec<(String, crate::Tensor)>> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| Ok((n.clone(), to_ours(v.as_tensor())?.to_device(crate::Device::Cpu)?)))
            .collect()
    }
}

/// Declares public candle layer types, each `$name` over our layer `$inner`.
macro_rules! candle_layer {
    ($($(#[$doc:meta])* $name:ident => $inner:ty;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name {
            core: Core<$inner>,
        }

        impl $name {
            /// Wraps our layer: its parameters (values from `store`) become `Var`s in `vars` under their
            /// PEFT keys on `device` (a key already there, such as a shared VB-LoRA bank, is reused).
            pub fn new(
                layer: $inner,
                store: &ParamStore,
                vars: &VarMap,
                device: &cc::Device,
            ) -> Result<Self> {
                Ok($name {
                    core: Core::new(layer, store, vars, device)?,
                })
            }

            /// Our layer (frozen base, configuration; its parameter values are the `Var`s', not these).
            pub fn layer(&self) -> &$inner {
                &self.core.layer
            }

            /// The trainable parameters, in the order the op packs them.
            pub fn vars(&self) -> &[Var] {
                &self.core.vars
            }

            /// The PEFT keys of [`Self::vars`].
            pub fn var_names(&self) -> &[String] {
                &self.core.names
            }

            /// The forward pass, recorded for candle's backward pass. `dropout_seed`: `Some(step seed)`
            /// to apply the adapter's dropout (training), `None` for none.
            pub fn forward_t(&self, x: &cc::Tensor, dropout_seed: Option<u64>) -> cc::Result<cc::Tensor> {
                self.core.forward_t(x, dropout_seed)
            }

            /// The forward pass without a backward record (evaluation: no dropout, nothing kept).
            pub fn forward_eval(&self, x: &cc::Tensor) -> cc::Result<cc::Tensor> {
                self.core.forward_eval(x)
            }

            /// The current parameter values under their PEFT keys (on the CPU).
            pub fn peft_tensors(&self) -> Result<Vec<(String, crate::Tensor)>> {
                self.core.peft_tensors()
            }
        }

        impl cc::Module for $name {
            /// [`Self::forward_t`] without dropout.
            fn forward(&self, x: &cc::Tensor) -> cc::Result<cc::Tensor> {
                self.core.forward_t(x, None)
            }
        }
    )*};
}

candle_layer! {
    /// LoRA over a dense or bitsandbytes 4-bit (NF4/FP4, double-quantized or not) base: QLoRA when the
    /// base is 4-bit. `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ` in our fused kernels.
    QLoraLinear => crate::adapters::lora::LoraLinear;
    /// DoRA (QDoRA over a 4-bit base): magnitude times the direction of `W + s·B·A`.
    DoraLinear => crate::adapters::dora::DoraLinear;
    /// WaveFT: trainable wavelet coefficients at fixed positions, inverse-transformed into `ΔW`.
    WaveFtLinear => crate::adapters::waveft::WaveFtLinear;
    /// VB-LoRA: A and B composed from a shared vector bank by top-k logits. The bank is one `Var` shared
    /// by every layer built with the same `VarMap`.
    VbLoraLinear => crate::adapters::vblora::VbLoraLinear;
}

impl QLoraLinear {
    /// A fresh LoRA layer on the base of `module` in a checkpoint (dense, or bitsandbytes 4-bit as
    /// transformers saves it: `<module>.weight` plus its quant state), with its bias if the checkpoint has
    /// one: A and B under PEFT's keys in `vars`, initialized as PEFT does from `seed`.
    pub fn from_checkpoint(
        file: &crate::io::SafetensorsFile,
        module: &str,
        cfg: &crate::adapters::lora::LoraConfig,
        seed: u64,
        vars: &VarMap,
        device: &cc::Device,
    ) -> Result<Self> {
        let opts = crate::peft_model::load::LoadOptions {
            device: model::our_device(device)?,
            ..Default::default()
        };
        let (base, bias) = crate::peft_model::load::load_base_layer(file, module, false, &opts)?;
        let mut store = ParamStore::new();
        let layer = crate::adapters::lora::LoraLinear::new(module, base, bias, cfg, &mut store, seed)?;
        QLoraLinear::new(layer, &store, vars, device)
    }
}
