//! The linear slots of a model: a frozen base (dense or 4-bit, gradient to the input only), an adapter
//! layer of any method around that base, or a fully trained linear (`modules_to_save`, e.g. the
//! classification head).

use crate::adapters::AdapterLinear;
use crate::autograd::{Backward, Grads, ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::qmatmul::{Algo, BaseWeight, linear_backward_input, linear_forward};
use crate::tensor::{DType, Tensor};

/// One linear module of a model under its transformers name.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // one per module, built once
pub enum LinearSlot {
    /// The frozen base and its bias.
    Frozen {
        name: String,
        base: BaseWeight,
        bias: Option<Tensor>,
        algo: Algo,
    },
    /// An adapter (LoRA, DoRA, WaveFT, VB-LoRA) around the frozen base.
    Adapter(Box<dyn AdapterLinear>),
}

impl LinearSlot {
    /// A frozen slot.
    pub fn frozen(name: impl Into<String>, base: BaseWeight, bias: Option<Tensor>, algo: Algo) -> LinearSlot {
        LinearSlot::Frozen {
            name: name.into(),
            base,
            bias,
            algo,
        }
    }

    /// The module name (`bert.encoder.layer.0.attention.self.query`).
    pub fn name(&self) -> &str {
        match self {
            LinearSlot::Frozen { name, .. } => name,
            LinearSlot::Adapter(l) => l.name(),
        }
    }

    /// The frozen base weight `[out, in]`.
    pub fn base(&self) -> &BaseWeight {
        match self {
            LinearSlot::Frozen { base, .. } => base,
            LinearSlot::Adapter(l) => l.base(),
        }
    }

    /// The frozen bias.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            LinearSlot::Frozen { bias, .. } => bias.as_ref(),
            LinearSlot::Adapter(l) => l.bias(),
        }
    }

    /// The adapter, if one is attached.
    pub fn adapter(&self) -> Option<&dyn AdapterLinear> {
        match self {
            LinearSlot::Frozen { .. } => None,
            LinearSlot::Adapter(l) => Some(l.as_ref()),
        }
    }

    /// The adapter's own trainable parameters (none for a frozen slot).
    pub fn param_ids(&self) -> Vec<ParamId> {
        self.adapter().map(|a| a.param_ids()).unwrap_or_default()
    }

    /// Chooses the base matmul implementation.
    pub fn set_algo(&mut self, a: Algo) {
        match self {
            LinearSlot::Frozen { algo, .. } => *algo = a,
            LinearSlot::Adapter(l) => l.set_algo(a),
        }
    }

    /// Records `x·Wᵀ + b` (+ the adapter's update) on `tape`. `dropout_seed`: the step seed in training
    /// (adapter dropout on), `None` in evaluation.
    pub fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        dropout_seed: Option<u64>,
    ) -> Result<Var> {
        match self {
            LinearSlot::Adapter(l) => l.forward_t(tape, store, x, dropout_seed),
            LinearSlot::Frozen { base, bias, algo, .. } => {
                let y = linear_forward(tape.value(x)?, base, bias.as_ref(), None, *algo)?;
                tape.record(
                    &[x],
                    y,
                    Box::new(FrozenLinearOp {
                        base: base.clone(),
                        algo: *algo,
                    }),
                )
            }
        }
    }
}

/// Backward of a frozen linear: `dx = dy·W`.
struct FrozenLinearOp {
    base: BaseWeight,
    algo: Algo,
}

impl Backward for FrozenLinearOp {
    fn backward(&self, g: &Tensor, _inputs: &[&Tensor], _out: &Tensor, needs: &[bool]) -> Grads {
        Ok(vec![if needs.first().copied().unwrap_or(false) {
            Some(linear_backward_input(g, &self.base, None, self.algo)?)
        } else {
            None
        }])
    }

    fn name(&self) -> &'static str {
        "frozen_linear"
    }
}

/// A linear whose weight `[out, in]` and bias `[out]` are parameters (trained fully, PEFT's
/// `modules_to_save`). Both live in the store under `<key_prefix>.weight` / `.bias`.
#[derive(Clone, Debug)]
pub struct TrainedLinear {
    name: String,
    weight: ParamId,
    bias: ParamId,
}

impl TrainedLinear {
    /// Inserts `weight [out, in]` and `bias [out]` into `store` as `<key_prefix>.weight` / `.bias`.
    pub fn new(
        name: impl Into<String>,
        key_prefix: &str,
        weight: Tensor,
        bias: Tensor,
        store: &mut ParamStore,
    ) -> Result<TrainedLinear> {
        let name = name.into();
        let [out, _] = weight.shape() else {
            return Err(Error::shape(
                "TrainedLinear",
                format!("{name}: weight {:?} is not 2-D", weight.shape()),
            ));
        };
        if bias.shape() != [*out] {
            return Err(Error::shape(
                "TrainedLinear",
                format!(
                    "{name}: bias {:?} does not match weight {:?}",
                    bias.shape(),
                    weight.shape()
                ),
            ));
        }
        let weight = store.insert(format!("{key_prefix}.weight"), weight)?;
        let bias = store.insert(format!("{key_prefix}.bias"), bias)?;
        Ok(TrainedLinear { name, weight, bias })
    }

    /// The module name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Weight and bias ids.
    pub fn param_ids(&self) -> [ParamId; 2] {
        [self.weight, self.bias]
    }

    /// Records `x·Wᵀ + b` with gradients to x, W and b. W and b are used in x's dtype.
    pub fn forward_t(&self, tape: &mut Tape, store: &ParamStore, x: Var) -> Result<Var> {
        let w = tape.param(store, self.weight)?;
        let b = tape.param(store, self.bias)?;
        let dt = tape.value(x)?.dtype();
        let wt = tape.value(w)?.to_dtype(dt)?;
        let bt = tape.value(b)?.to_dtype(dt)?;
        let y = linear_forward(
            tape.value(x)?,
            &BaseWeight::Dense(wt),
            Some(&bt),
            None,
            Algo::Auto,
        )?;
        tape.record(&[x, w, b], y, Box::new(TrainedLinearOp))
    }
}

struct TrainedLinearOp;

impl Backward for TrainedLinearOp {
    fn backward(&self, g: &Tensor, inputs: &[&Tensor], _out: &Tensor, needs: &[bool]) -> Grads {
        let [x, w, _] = inputs else {
            return Err(Error::invalid("trained_linear: expected inputs [x, W, b]"));
        };
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        let g32 = g.to_dtype(DType::F32)?;
        let dx = if need(0) {
            Some(linear_backward_input(
                g,
                &BaseWeight::Dense(w.to_dtype(g.dtype())?),
                None,
                Algo::Auto,
            )?)
        } else {
            None
        };
        // dW = dyᵀ·x [out, in]; db = column sums of dy.
        let dw = need(1)
            .then(|| g32.matmul_t(&x.to_dtype(DType::F32)?, true, false))
            .transpose()?;
        let db = need(2).then(|| g32.t()?.row_sums()).transpose()?;
        Ok(vec![dx, dw, db])
    }

    fn name(&self) -> &'static str {
        "trained_linear"
    }
}
