//! The adapter-layer trait [`AdapterLinear`], the frozen part every adapted linear layer shares
//! ([`LinearBase`]), and a plain frozen layer ([`FrozenLinear`]) that fits the same slot.
//!
//! A model holds one `Box<dyn AdapterLinear>` per linear slot, whatever the method (or none):
//!
//! ```
//! use peft_kernels::adapters::{AdapterLinear, FrozenLinear, lora::{LoraConfig, LoraLinear}};
//! use peft_kernels::autograd::{ParamStore, Tape};
//! use peft_kernels::qmatmul::BaseWeight;
//! use peft_kernels::{DType, Device, Tensor};
//!
//! let dev = Device::Cpu;
//! let w = |seed| Tensor::randn(&[16, 32], 0.1, seed, DType::F32, dev).map(BaseWeight::Dense);
//! let mut store = ParamStore::new();
//! let slots: Vec<Box<dyn AdapterLinear>> = vec![
//!     Box::new(LoraLinear::new("q", w(0)?, None, &LoraConfig::default(), &mut store, 7)?),
//!     Box::new(FrozenLinear::new("k", w(1)?, None)?),
//! ];
//! let mut tape = Tape::new();
//! let x = tape.leaf(Tensor::randn(&[2, 5, 32], 1.0, 2, DType::F32, dev)?);
//! for slot in &slots {
//!     // `Some(step seed)` in training (dropout on), `None` in evaluation.
//!     let y = slot.forward_t(&mut tape, &store, x, Some(1))?;
//!     assert_eq!(tape.value(y)?.shape(), &[2, 5, 16]);
//! }
//! let trainable: usize = slots.iter().map(|s| s.num_trainable_params()).sum();
//! assert_eq!(trainable, 8 * (16 + 32));
//! # Ok::<(), peft_kernels::Error>(())
//! ```
//!
//! Every call is one virtual dispatch to a layer whose work is a matrix product, so the trait object
//! costs nothing measurable. The concrete types keep their typed APIs (typed contexts and gradients);
//! the trait's tape-free [`AdapterLinear::forward`] / [`AdapterLinear::backward`] carry them in a boxed
//! [`LinearContext`] and return the parameter gradients by [`ParamId`] ([`LinearGrads`]).

use crate::autograd::{Backward, Grads, ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::io::peft::AdapterMethod;
use crate::qmatmul::{Algo, BaseWeight, linear_backward_input, linear_forward};
use crate::tensor::{DType, Tensor};
use std::any::Any;
use std::fmt::Debug;

/// What a forward pass without the tape keeps for its backward pass (the layer's own context type,
/// boxed). Pass it back to the [`AdapterLinear::backward`] of the layer that made it.
pub struct LinearContext(Box<dyn Any + Send + Sync>);

impl LinearContext {
    /// Boxes a layer's context.
    pub fn new<C: Any + Send + Sync>(ctx: C) -> LinearContext {
        LinearContext(Box::new(ctx))
    }

    /// The layer's context, if it is a `C`.
    pub fn downcast_ref<C: Any>(&self) -> Option<&C> {
        self.0.downcast_ref()
    }
}

impl Debug for LinearContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinearContext(..)")
    }
}

/// Gradients of one tape-free backward pass: the input gradient (when requested) and the gradient (f32)
/// of every parameter the layer reads, by id (a VB-LoRA layer's include its share of the shared bank's).
#[derive(Clone, Debug)]
pub struct LinearGrads {
    pub dx: Option<Tensor>,
    pub params: Vec<(ParamId, Tensor)>,
}

/// A linear layer with a frozen (dense or 4-bit) base weight and, for the adapter methods, trainable
/// parameters in a [`ParamStore`]. Object safe: a model holds `Box<dyn AdapterLinear>` per slot. See the
/// [module docs](self) for an example.
///
/// `dropout_seed` everywhere: `Some(step seed)` in training (the adapter branch's dropout is active; each
/// layer mixes the step seed with its name, see [`LinearBase::mask_seed`]), `None` in evaluation.
pub trait AdapterLinear: Debug + Send + Sync {
    /// The frozen part: module path, base weight, bias, matmul choice and dropout.
    fn linear_base(&self) -> &LinearBase;

    /// Mutable access to the frozen part, for [`AdapterLinear::set_algo`].
    fn linear_base_mut(&mut self) -> &mut LinearBase;

    /// The adapter method, `None` for a frozen layer.
    fn method(&self) -> Option<AdapterMethod>;

    /// The module path (e.g. `model.layers.0.self_attn.q_proj`).
    fn name(&self) -> &str {
        self.linear_base().name()
    }
    /// The frozen base weight `[out, in]`.
    fn base(&self) -> &BaseWeight {
        self.linear_base().base()
    }
    /// The frozen bias, if any.
    fn bias(&self) -> Option<&Tensor> {
        self.linear_base().bias()
    }
    /// Input features.
    fn in_features(&self) -> usize {
        self.base().in_features()
    }
    /// Output features.
    fn out_features(&self) -> usize {
        self.base().out_features()
    }
    /// Chooses the base matmul implementation (default [`Algo::Auto`]).
    fn set_algo(&mut self, algo: Algo) {
        self.linear_base_mut().set_algo(algo);
    }

    /// The layer's own trainable parameters (a VB-LoRA layer's logits; not the shared bank).
    fn param_ids(&self) -> Vec<ParamId>;

    /// Trainable elements of this layer (the shared VB-LoRA bank not included).
    fn num_trainable_params(&self) -> usize;

    /// Forward pass without the tape: the output (x's dtype and leading shape) and the backward context.
    fn forward(
        &self,
        store: &ParamStore,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, LinearContext)>;

    /// Backward pass without the tape, for a context of this layer's [`AdapterLinear::forward`].
    fn backward(
        &self,
        store: &ParamStore,
        ctx: &LinearContext,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<LinearGrads>;

    /// Records the layer on `tape`: input `x` and the parameters as parameter Vars, so their gradients
    /// land in the tape's [`crate::autograd::Gradients`].
    fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        dropout_seed: Option<u64>,
    ) -> Result<Var>;

    /// The output in evaluation (no dropout, no backward context kept).
    fn forward_eval(&self, store: &ParamStore, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward(store, x, None)?.0)
    }

    /// The dense update `ΔW` `[out, in]`, f32 (DoRA's is multiplicative: `(m/n)·(W + s·B·A) - W`).
    fn delta_weight(&self, store: &ParamStore) -> Result<Tensor>;

    /// `W + ΔW` `[out, in]` in `dtype` (a 4-bit base is dequantized first).
    fn merged_weight(&self, store: &ParamStore, dtype: DType) -> Result<Tensor> {
        let w = self.base().dequantize(DType::F32)?;
        w.add(&self.delta_weight(store)?)?.to_dtype(dtype)
    }

    /// Undoes [`AdapterLinear::merged_weight`] with the current parameters: the base weight (f32
    /// `[out, in]`) that `merged` was merged from. Exact up to rounding.
    fn unmerged_weight(&self, store: &ParamStore, merged: &BaseWeight) -> Result<Tensor> {
        check_merged(self.linear_base(), merged)?;
        merged.dequantize(DType::F32)?.sub(&self.delta_weight(store)?)
    }

    /// What goes into the PEFT adapter file for this layer: every parameter of
    /// [`AdapterLinear::param_ids`] under its file key, on the CPU (full VB-LoRA logits; the top-k form
    /// is the file's business).
    fn save_tensors(&self, store: &ParamStore) -> Result<Vec<(String, Tensor)>> {
        self.param_ids()
            .into_iter()
            .map(|id| {
                Ok((
                    store.name(id)?.to_string(),
                    store.get(id)?.to_device(crate::Device::Cpu)?,
                ))
            })
            .collect()
    }

    /// The concrete layer, for downcasting (`layer.as_any().downcast_ref::<LoraLinear>()`).
    fn as_any(&self) -> &dyn Any;

    /// A boxed clone.
    fn clone_box(&self) -> Box<dyn AdapterLinear>;
}

impl Clone for Box<dyn AdapterLinear> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// `merged` has this layer's shape and device.
pub(crate) fn check_merged(base: &LinearBase, merged: &BaseWeight) -> Result<()> {
    let (out, inp) = (base.out_features(), base.in_features());
    if merged.out_features() != out || merged.in_features() != inp {
        return Err(Error::shape(
            "unmerge",
            format!(
                "{}: merged weight [{}, {}] is not [{out}, {inp}]",
                base.name(),
                merged.out_features(),
                merged.in_features()
            ),
        ));
    }
    if merged.device() != base.base().device() {
        return Err(Error::device(
            "unmerge",
            format!("{}: merged weight on another device", base.name()),
        ));
    }
    Ok(())
}

/// What all adapted linear layers share: the module path, the frozen base weight and bias, the base
/// matmul choice and the adapter branch's dropout probability.
#[derive(Clone, Debug)]
pub struct LinearBase {
    name: String,
    base: BaseWeight,
    bias: Option<Tensor>,
    algo: Algo,
    dropout: f32,
}

impl LinearBase {
    /// Checks that `bias` is a float `[out]` on the base weight's device and `dropout` is in `[0, 1)`
    /// (`what_dropout` names it in the error, e.g. `"lora_dropout"`).
    pub fn new(
        op: &'static str,
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        dropout: f32,
        what_dropout: &str,
    ) -> Result<LinearBase> {
        let out = base.out_features();
        if let Some(b) = &bias {
            if b.shape() != [out] {
                return Err(Error::shape(
                    op,
                    format!("{name}: bias {:?} is not [{out}]", b.shape()),
                ));
            }
            b.dtype().expect_float(op)?;
        }
        check_devices(op, name, &base, [("bias", bias.as_ref())])?;
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::invalid(format!(
                "{name}: {what_dropout} {dropout} is not in [0, 1)"
            )));
        }
        Ok(LinearBase {
            name: name.to_string(),
            base,
            bias,
            algo: Algo::Auto,
            dropout,
        })
    }

    /// The module path.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The frozen base weight.
    pub fn base(&self) -> &BaseWeight {
        &self.base
    }
    /// The frozen bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The base matmul implementation.
    pub fn algo(&self) -> Algo {
        self.algo
    }
    /// Chooses the base matmul implementation.
    pub fn set_algo(&mut self, algo: Algo) {
        self.algo = algo;
    }
    /// The dropout probability of the adapter branch.
    pub fn dropout(&self) -> f32 {
        self.dropout
    }
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.base.in_features()
    }
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.base.out_features()
    }

    /// The seed of this layer's dropout mask for a step seed: the step seed mixed with the layer name
    /// (FNV-1a), so layers draw independent masks. `None` when dropout is off or in evaluation. The mask
    /// itself is `Tensor::dropout(p, seed)` of the flattened `[tokens, in]` input.
    pub fn mask_seed(&self, step_seed: Option<u64>) -> Option<u64> {
        let s = step_seed.filter(|_| self.dropout > 0.0)?;
        let h = self.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        Some(s ^ h)
    }

    /// `x [.., features]` as `[rows, features]`.
    pub(crate) fn flatten(&self, x: &Tensor, features: usize, what: &'static str) -> Result<Tensor> {
        match x.shape() {
            [.., f] if *f == features => x.reshape(&[x.numel() / features.max(1), features]),
            s => Err(Error::shape(
                what,
                format!("{}: expected [.., {features}], got {s:?}", self.name),
            )),
        }
    }

    /// The flattened input `[tokens, in]` and the output shape `[.., out]`.
    pub(crate) fn flatten_input(&self, x: &Tensor, what: &'static str) -> Result<(Tensor, Shapes)> {
        let x2 = self.flatten(x, self.in_features(), what)?;
        let mut out_shape = x.shape()[..x.rank() - 1].to_vec();
        out_shape.push(self.out_features());
        Ok((
            x2,
            Shapes {
                input: x.shape().to_vec(),
                output: out_shape,
            },
        ))
    }

    /// `drop(x)` with the mask of `mask_seed` (x itself without one).
    pub(crate) fn dropped(&self, x2: &Tensor, mask_seed: Option<u64>) -> Result<Tensor> {
        match mask_seed {
            Some(seed) => x2.dropout(self.dropout, seed),
            None => Ok(x2.clone()),
        }
    }

    /// Checks that `dy` has the forward output's shape and returns it as `[tokens, out]`.
    pub(crate) fn flatten_dy(&self, dy: &Tensor, shapes: &Shapes, what: &'static str) -> Result<Tensor> {
        if dy.shape() != shapes.output.as_slice() {
            return Err(Error::shape(
                what,
                format!(
                    "{}: dy {:?} does not match the output {:?}",
                    self.name,
                    dy.shape(),
                    shapes.output
                ),
            ));
        }
        self.flatten(dy, self.out_features(), what)
    }

    /// `x·Wᵀ + b` of the flattened input.
    pub(crate) fn base_forward(&self, x2: &Tensor) -> Result<Tensor> {
        linear_forward(x2, &self.base, self.bias.as_ref(), None, self.algo)
    }

    /// `dy·W` of the flattened output gradient.
    pub(crate) fn base_backward_input(&self, dy2: &Tensor) -> Result<Tensor> {
        linear_backward_input(dy2, &self.base, None, self.algo)
    }

    /// Prefixes an invalid-argument error with the module path.
    pub(crate) fn named(&self, e: Error) -> Error {
        with_name(&self.name, e)
    }
}

/// Prefixes an invalid-argument error with the module path `name`.
pub(crate) fn with_name(name: &str, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{name}: {m}")),
        e => e,
    }
}

/// Every `Some` tensor of `tensors` lives on the base weight's device.
pub(crate) fn check_devices<const N: usize>(
    op: &'static str,
    name: &str,
    base: &BaseWeight,
    tensors: [(&str, Option<&Tensor>); N],
) -> Result<()> {
    for (what, t) in tensors {
        if let Some(t) = t
            && t.device() != base.device()
        {
            return Err(Error::device(
                op,
                format!(
                    "{name}: {what} on {} but the base weight on {}",
                    t.device(),
                    base.device()
                ),
            ));
        }
    }
    Ok(())
}

/// The input and output shapes of one forward pass (the backward pass restores them).
#[derive(Clone, Debug)]
pub(crate) struct Shapes {
    pub input: Vec<usize>,
    pub output: Vec<usize>,
}

/// What [`TapeLinear::forward_values`] returns: the output and the context its backward pass reads.
pub(crate) type Fwd<C> = Result<(Tensor, C)>;

/// The typed core of an adapted layer, from which [`adapter_linear_common!`] derives the tape-free
/// [`AdapterLinear::forward`] / [`AdapterLinear::backward`] and [`AdapterLinear::forward_t`] (one
/// [`LinearOp`] record): a forward and a backward pass on given parameter values.
///
/// The tensors these passes are given (`params`, `x`, `dy`) may borrow another framework's memory
/// (the candle boundary, `src/candle/host.rs`), readable only during these calls and, for the context,
/// during the matching backward pass. So an implementation keeps them (or tensors sharing their
/// storage) nowhere but in the returned context and its results: never in the layer's own caches.
pub(crate) trait TapeLinear: Clone + Send + Sync + 'static {
    type Ctx: Send + Sync + 'static;
    /// The op name in error messages.
    const OP: &'static str;
    /// The parameters the forward pass reads, in tape-input order (after x).
    fn tape_params(&self) -> Vec<ParamId>;
    /// The forward pass on the values of [`TapeLinear::tape_params`].
    fn forward_values(&self, params: &[&Tensor], x: &Tensor, dropout_seed: Option<u64>) -> Fwd<Self::Ctx>;
    /// Gradients of `[x, params..]`; entries whose `needs` is false may be `None` or anything (they are
    /// dropped).
    fn backward_values(&self, params: &[&Tensor], ctx: &Self::Ctx, dy: &Tensor, needs: &[bool]) -> Grads;
}

/// The values of `ids` in `store`.
fn values<'a>(store: &'a ParamStore, ids: &[ParamId]) -> Result<Vec<&'a Tensor>> {
    ids.iter().map(|&id| store.get(id)).collect()
}

/// [`AdapterLinear::forward`] of a [`TapeLinear`] layer.
pub(crate) fn forward_boxed<L: TapeLinear>(
    layer: &L,
    store: &ParamStore,
    x: &Tensor,
    dropout_seed: Option<u64>,
) -> Result<(Tensor, LinearContext)> {
    let (y, ctx) = layer.forward_values(&values(store, &layer.tape_params())?, x, dropout_seed)?;
    Ok((y, LinearContext::new(ctx)))
}

/// [`AdapterLinear::backward`] of a [`TapeLinear`] layer: every parameter's gradient.
pub(crate) fn backward_boxed<L: TapeLinear>(
    layer: &L,
    store: &ParamStore,
    ctx: &LinearContext,
    dy: &Tensor,
    need_dx: bool,
) -> Result<LinearGrads> {
    let ids = layer.tape_params();
    let ctx = ctx.downcast_ref::<L::Ctx>().ok_or_else(|| {
        Error::invalid(format!(
            "{}: the backward context comes from another layer type",
            L::OP
        ))
    })?;
    let mut needs = vec![true; ids.len() + 1];
    needs[0] = need_dx;
    let mut grads = layer
        .backward_values(&values(store, &ids)?, ctx, dy, &needs)?
        .into_iter();
    let dx = grads.next().flatten().filter(|_| need_dx);
    let params = ids
        .into_iter()
        .zip(grads)
        .map(|(id, g)| {
            g.map(|g| (id, g))
                .ok_or_else(|| Error::invalid(format!("{}: a parameter gradient is missing", L::OP)))
        })
        .collect::<Result<_>>()?;
    Ok(LinearGrads { dx, params })
}

/// [`AdapterLinear::forward_t`] of a [`TapeLinear`] layer: inputs `[x, params..]` (parameter Vars).
pub(crate) fn forward_tape<L: TapeLinear>(
    layer: &L,
    tape: &mut Tape,
    store: &ParamStore,
    x: Var,
    dropout_seed: Option<u64>,
) -> Result<Var> {
    let mut inputs = vec![x];
    for id in layer.tape_params() {
        inputs.push(tape.param(store, id)?);
    }
    let params = inputs[1..]
        .iter()
        .map(|&v| tape.value(v))
        .collect::<Result<Vec<_>>>()?;
    let (y, ctx) = layer.forward_values(&params, tape.value(x)?, dropout_seed)?;
    let op = LinearOp {
        layer: layer.clone(),
        ctx,
    };
    tape.record(&inputs, y, Box::new(op))
}

/// The tape record of one call of a [`TapeLinear`] layer.
struct LinearOp<L: TapeLinear> {
    layer: L,
    ctx: L::Ctx,
}

impl<L: TapeLinear> Backward for LinearOp<L> {
    fn backward(&self, grad_output: &Tensor, inputs: &[&Tensor], _output: &Tensor, needs: &[bool]) -> Grads {
        let want = self.layer.tape_params().len() + 1;
        if inputs.len() != want {
            return Err(Error::invalid(format!(
                "{}: expected {want} tape inputs (x and the parameters), got {}",
                L::OP,
                inputs.len()
            )));
        }
        let grads = self
            .layer
            .backward_values(&inputs[1..], &self.ctx, grad_output, needs)?;
        Ok(grads
            .into_iter()
            .enumerate()
            .map(|(i, g)| g.filter(|_| needs.get(i).copied().unwrap_or(false)))
            .collect())
    }

    fn name(&self) -> &'static str {
        L::OP
    }
}

/// Implements the [`AdapterLinear`] plumbing that is the same for every [`TapeLinear`] layer type.
/// `adapter_linear_common!(lb)` or `adapter_linear_common!(lora.lb)`: the field path of the
/// [`LinearBase`].
macro_rules! adapter_linear_common {
    ($($field:ident).+) => {
        fn linear_base(&self) -> &$crate::adapters::LinearBase {
            &self.$($field).+
        }
        fn linear_base_mut(&mut self) -> &mut $crate::adapters::LinearBase {
            &mut self.$($field).+
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn clone_box(&self) -> Box<dyn $crate::adapters::AdapterLinear> {
            Box::new(self.clone())
        }
        fn forward(
            &self,
            store: &$crate::autograd::ParamStore,
            x: &$crate::Tensor,
            dropout_seed: Option<u64>,
        ) -> $crate::Result<($crate::Tensor, $crate::adapters::LinearContext)> {
            $crate::adapters::linear::forward_boxed(self, store, x, dropout_seed)
        }
        fn backward(
            &self,
            store: &$crate::autograd::ParamStore,
            ctx: &$crate::adapters::LinearContext,
            dy: &$crate::Tensor,
            need_dx: bool,
        ) -> $crate::Result<$crate::adapters::LinearGrads> {
            $crate::adapters::linear::backward_boxed(self, store, ctx, dy, need_dx)
        }
        fn forward_t(
            &self,
            tape: &mut $crate::autograd::Tape,
            store: &$crate::autograd::ParamStore,
            x: $crate::autograd::Var,
            dropout_seed: Option<u64>,
        ) -> $crate::Result<$crate::autograd::Var> {
            $crate::adapters::linear::forward_tape(self, tape, store, x, dropout_seed)
        }
    };
}
pub(crate) use adapter_linear_common;

/// A frozen linear layer `y = x·Wᵀ + b` (no adapter) that fits the same slot as the adapted layers:
/// [`AdapterLinear::forward_t`] records it so that only the input gradient flows.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    lb: LinearBase,
}

/// The shapes a [`FrozenLinear`] forward pass keeps (no activation: the input gradient is `dy·W`).
#[derive(Clone, Debug)]
pub struct FrozenContext {
    shapes: Shapes,
}

impl FrozenLinear {
    /// A frozen layer of `base` (`[out, in]`, dense or 4-bit) and an optional bias `[out]`.
    pub fn new(name: &str, base: BaseWeight, bias: Option<Tensor>) -> Result<FrozenLinear> {
        base.validate("FrozenLinear")?;
        Ok(FrozenLinear {
            lb: LinearBase::new("FrozenLinear", name, base, bias, 0.0, "dropout")?,
        })
    }
}

impl TapeLinear for FrozenLinear {
    type Ctx = FrozenContext;
    const OP: &'static str = "frozen_linear";

    fn tape_params(&self) -> Vec<ParamId> {
        Vec::new()
    }

    fn forward_values(&self, _params: &[&Tensor], x: &Tensor, _seed: Option<u64>) -> Fwd<FrozenContext> {
        let (x2, shapes) = self.lb.flatten_input(x, "FrozenLinear::forward")?;
        let y = self.lb.base_forward(&x2)?.reshape(&shapes.output)?;
        Ok((y, FrozenContext { shapes }))
    }

    fn backward_values(
        &self,
        _params: &[&Tensor],
        ctx: &FrozenContext,
        dy: &Tensor,
        needs: &[bool],
    ) -> Grads {
        let dy2 = self.lb.flatten_dy(dy, &ctx.shapes, "FrozenLinear::backward")?;
        let dx = if needs.first().copied().unwrap_or(false) {
            Some(self.lb.base_backward_input(&dy2)?.reshape(&ctx.shapes.input)?)
        } else {
            None
        };
        Ok(vec![dx])
    }
}

impl AdapterLinear for FrozenLinear {
    adapter_linear_common!(lb);

    fn method(&self) -> Option<AdapterMethod> {
        None
    }
    fn param_ids(&self) -> Vec<ParamId> {
        Vec::new()
    }
    fn num_trainable_params(&self) -> usize {
        0
    }
    fn delta_weight(&self, _store: &ParamStore) -> Result<Tensor> {
        Tensor::zeros(
            &[self.out_features(), self.in_features()],
            DType::F32,
            self.base().device(),
        )
    }
}
