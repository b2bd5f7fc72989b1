//! A minimal reverse-mode autograd tape for training adapter parameters.
//!
//! The model is "define by run": each op computes its output eagerly and [`Tape::record`]s it with a
//! [`Backward`] that maps the output gradient to input gradients. [`Tape::backward`] walks the records
//! in reverse recording order (a valid reverse topological order, since an op's inputs always exist
//! before it) and delivers gradients of trainable parameters into a [`Gradients`] map.
//!
//! ```
//! use peft_kernels::autograd::{ParamStore, Tape};
//! use peft_kernels::{DType, Device, Tensor};
//! let dev = Device::Cpu;
//! let mut store = ParamStore::new();
//! let w = store.insert("w", Tensor::randn(&[4, 3], 1.0, 0, DType::F32, dev)?)?;
//! let mut tape = Tape::new();
//! let x = tape.param(&store, w)?;
//! let h = tape.gelu(x)?;
//! let loss = tape.mse_loss(h, &Tensor::zeros(&[4, 3], DType::F32, dev)?)?;
//! let grads = tape.backward(loss)?;
//! assert_eq!(grads.get(w).unwrap().shape(), &[4, 3]);
//! # Ok::<(), peft_kernels::Error>(())
//! ```
//!
//! **Rules a custom [`Backward`] can rely on**: `grad_output` has the shape, dtype and device of
//! `output`; `inputs` are the values of the recorded input [`Var`]s in order. **Rules it must follow**:
//! return exactly one entry per input; an entry must be `None` where `needs` is false (anything else is
//! ignored) and, where `needs` is true, a float tensor of that input's shape on its device (`None`
//! means a zero gradient). The gradient may be in any float dtype: the tape converts it to the input's
//! dtype for intermediate values and to f32 for parameters (see [`params`] on gradient precision).
//!
//! **Memory**: the tape keeps every recorded value (cheap `Arc` clones of the tensors the ops
//! produced) until it is dropped; gradients of intermediate values are freed as soon as the op that
//! produced the value has propagated them. Drop the tape before the optimizer step so that parameter
//! tensors are not shared (an update of a shared tensor copies it first).

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub(crate) mod cuda;
pub mod decoder;
pub mod gradcheck;
pub mod ops;
pub mod params;

pub use ops::{Activation, CrossEntropySaved};
pub use params::{Gradients, ParamId, ParamStore};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A value recorded on one [`Tape`] (its index). Only meaningful for the tape that returned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(usize);

impl Var {
    /// The recording index.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Backward of one recorded op. `inputs` are the values of the op's input Vars (same order), `output`
/// its value, `needs` says which inputs need a gradient. Return one entry per input (None where not
/// needed). See the module docs for the full contract.
/// Input gradients as a [`Backward`] op returns them: one entry per input, `None` where the input
/// needs no gradient.
pub type Grads = Result<Vec<Option<Tensor>>>;

pub trait Backward: Send + Sync {
    /// Input gradients from the output gradient.
    fn backward(&self, grad_output: &Tensor, inputs: &[&Tensor], output: &Tensor, needs: &[bool]) -> Grads;

    /// A short op name for error messages.
    fn name(&self) -> &'static str;
}

struct Node {
    requires_grad: bool,
    op: Option<(Box<dyn Backward>, Vec<Var>)>,
    param: Option<ParamId>,
}

/// The recording of one forward pass. Build a fresh tape for each step.
#[derive(Default)]
pub struct Tape {
    values: Vec<Tensor>,
    nodes: Vec<Node>,
}

impl std::fmt::Debug for Tape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for (v, n) in self.values.iter().zip(&self.nodes) {
            let what = match (&n.op, n.param) {
                (_, Some(id)) => format!("param {id}"),
                (Some((op, inputs)), None) => format!(
                    "{}({})",
                    op.name(),
                    inputs
                        .iter()
                        .map(|v| format!("%{}", v.0))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (None, None) => "leaf".to_string(),
            };
            l.entry(&format_args!(
                "{what} {v:?}{}",
                if n.requires_grad { " (grad)" } else { "" }
            ));
        }
        l.finish()
    }
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, value: Tensor, node: Node) -> Var {
        self.values.push(value);
        self.nodes.push(node);
        Var(self.values.len() - 1)
    }

    fn check(&self, v: Var) -> Result<()> {
        if v.0 < self.values.len() {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "Var %{} does not belong to this tape ({} values)",
                v.0,
                self.values.len()
            )))
        }
    }

    /// A constant (no gradient flows into it).
    pub fn leaf(&mut self, value: Tensor) -> Var {
        self.push(
            value,
            Node {
                requires_grad: false,
                op: None,
                param: None,
            },
        )
    }

    /// The current value of parameter `id`. It requires a gradient iff the parameter is trainable;
    /// its gradient ends up in [`Gradients`] under `id` (uses of several Vars of one parameter add up).
    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Result<Var> {
        let value = store.get(id)?.clone();
        Ok(self.push(
            value,
            Node {
                requires_grad: store.is_trainable(id),
                op: None,
                param: Some(id),
            },
        ))
    }

    /// The value of `v`.
    pub fn value(&self, v: Var) -> Result<&Tensor> {
        self.check(v)?;
        Ok(&self.values[v.0])
    }

    /// Whether a gradient flows into `v` (false for a foreign Var).
    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes.get(v.0).is_some_and(|n| n.requires_grad)
    }

    /// Records an op computed by the caller: `output = f(inputs)`. `output` requires a gradient iff
    /// any input does; otherwise `backward` is dropped right away (inference costs no graph).
    pub fn record(&mut self, inputs: &[Var], output: Tensor, backward: Box<dyn Backward>) -> Result<Var> {
        for &v in inputs {
            self.check(v)?;
        }
        let requires_grad = inputs.iter().any(|&v| self.nodes[v.0].requires_grad);
        let op = requires_grad.then(|| (backward, inputs.to_vec()));
        Ok(self.push(
            output,
            Node {
                requires_grad,
                op,
                param: None,
            },
        ))
    }

    /// `act(x)` for any [`Activation`].
    pub fn activation(&mut self, x: Var, act: Activation) -> Result<Var> {
        let y = ops::activation(self.value(x)?, act)?;
        self.record(
            &[x],
            y,
            ops::unary(act.name(), move |g, x| ops::activation_backward(x, g, act)),
        )
    }

    /// `max(x, 0)`.
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        self.activation(x, Activation::Relu)
    }

    /// GELU with the **tanh approximation** (torch `gelu(x, approximate="tanh")`).
    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        self.activation(x, Activation::Gelu)
    }

    /// **Exact** GELU with erf (torch's default `gelu(x)`).
    pub fn gelu_erf(&mut self, x: Var) -> Result<Var> {
        self.activation(x, Activation::GeluErf)
    }

    /// `x·sigmoid(x)`.
    pub fn silu(&mut self, x: Var) -> Result<Var> {
        self.activation(x, Activation::Silu)
    }

    /// `a + b` (same shape, dtype and device).
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = self.value(a)?.add(self.value(b)?)?;
        self.record(&[a, b], y, ops::add_record())
    }

    /// `mean((pred - target)²)` over all elements: an f32 `[1]` loss. `target` is a constant of the
    /// same shape, dtype and device as `pred`.
    pub fn mse_loss(&mut self, pred: Var, target: &Tensor) -> Result<Var> {
        let loss = ops::mse_loss(self.value(pred)?, target)?;
        let target = target.clone();
        let back = move |g: &Tensor, x: &Tensor| ops::mse_loss_backward(x, &target, g);
        self.record(&[pred], loss, ops::unary("mse_loss", back))
    }

    /// Mean cross-entropy of logits `[N, C]` against class indices (`targets.len() == N`, each `< C`):
    /// an f32 `[1]` loss, log-sum-exp with the row max subtracted, f32 math for every logits dtype.
    pub fn cross_entropy(&mut self, logits: Var, targets: &[u32]) -> Result<Var> {
        let (loss, saved) = ops::cross_entropy_forward(self.value(logits)?, targets, None)?;
        self.record(&[logits], loss, cross_entropy_record(saved))
    }

    /// [`Tape::cross_entropy`] where rows whose target equals `ignore_index` (padding, prompt
    /// tokens; torch's `ignore_index`) are left out and the mean is over the remaining rows. If every
    /// row is ignored the loss and its gradient are 0 (torch gives NaN).
    pub fn cross_entropy_ignore(&mut self, logits: Var, targets: &[u32], ignore_index: u32) -> Result<Var> {
        let (loss, saved) = ops::cross_entropy_forward(self.value(logits)?, targets, Some(ignore_index))?;
        self.record(&[logits], loss, cross_entropy_record(saved))
    }

    /// Gradients of the trainable parameters with respect to `loss`, a 1-element float value
    /// (seeded with 1). Frozen parameters and constants get none. A loss that depends on no
    /// trainable parameter gives empty [`Gradients`].
    pub fn backward(&self, loss: Var) -> Result<Gradients> {
        let v = self.value(loss)?;
        if v.numel() != 1 {
            return Err(Error::shape(
                "backward",
                format!(
                    "the loss must have exactly one element, got shape {:?}",
                    v.shape()
                ),
            ));
        }
        v.dtype().expect_float("backward")?;
        let seed = Tensor::full(v.shape(), 1.0, v.dtype(), v.device())?;
        self.backward_with(loss, seed)
    }

    /// Like [`Tape::backward`] from any value `out` with an explicit upstream gradient of its shape
    /// (any float dtype, same device): computes the vector-Jacobian product `grad_outputᵀ · ∂out/∂θ`.
    pub fn backward_with(&self, out: Var, grad_output: Tensor) -> Result<Gradients> {
        self.check(out)?;
        let mut result = Gradients::new();
        if !self.nodes[out.0].requires_grad {
            return Ok(result);
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; out.0 + 1];
        self.deliver(&mut grads, &mut result, out, grad_output, "backward_with")?;
        for i in (0..=out.0).rev() {
            let Some(g) = grads[i].take() else { continue };
            let Some((op, inputs)) = &self.nodes[i].op else {
                continue; // a parameter (already delivered) or a constant
            };
            let in_values: Vec<&Tensor> = inputs.iter().map(|v| &self.values[v.0]).collect();
            let needs: Vec<bool> = inputs.iter().map(|v| self.nodes[v.0].requires_grad).collect();
            let in_grads = op.backward(&g, &in_values, &self.values[i], &needs)?;
            drop(g);
            if in_grads.len() != inputs.len() {
                return Err(Error::invalid(format!(
                    "backward of {} returned {} gradients for {} inputs",
                    op.name(),
                    in_grads.len(),
                    inputs.len()
                )));
            }
            for ((&v, need), ig) in inputs.iter().zip(needs).zip(in_grads) {
                if let (true, Some(ig)) = (need, ig) {
                    self.deliver(&mut grads, &mut result, v, ig, op.name())?;
                }
            }
        }
        Ok(result)
    }

    /// Adds gradient `g` to `v`: into `result` (f32) for a parameter, else into `grads` in `v`'s dtype.
    fn deliver(
        &self,
        grads: &mut [Option<Tensor>],
        result: &mut Gradients,
        v: Var,
        g: Tensor,
        op: &'static str,
    ) -> Result<()> {
        let value = &self.values[v.0];
        if g.shape() != value.shape() || g.device() != value.device() || !g.dtype().is_float() {
            return Err(Error::shape(
                "backward",
                format!(
                    "{op} produced gradient {g:?} for a value {value:?} (shape and device must match, dtype must be float)"
                ),
            ));
        }
        if let Some(id) = self.nodes[v.0].param {
            return result.insert_or_add(id, g);
        }
        let g = if g.dtype() == value.dtype() {
            g
        } else {
            g.to_dtype(value.dtype())?
        };
        grads[v.0] = Some(match grads[v.0].take() {
            None => g,
            Some(acc) => acc.add(&g)?,
        });
        Ok(())
    }

    /// Bytes of every value the tape holds except parameters (which the [`ParamStore`] owns): the
    /// activations it keeps alive until dropped.
    pub fn value_bytes(&self) -> usize {
        self.values
            .iter()
            .zip(&self.nodes)
            .filter(|(_, n)| n.param.is_none())
            .map(|(v, _)| v.size_in_bytes())
            .sum()
    }

    /// Number of recorded values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// The tape record of a cross-entropy loss.
fn cross_entropy_record(saved: CrossEntropySaved) -> Box<dyn Backward> {
    ops::unary("cross_entropy", move |g, x| {
        ops::cross_entropy_backward(x, &saved, g)
    })
}
