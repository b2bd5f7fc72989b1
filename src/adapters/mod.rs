//! Adapter layers: LoRA/QLoRA, DoRA, WaveFT and VB-LoRA, each with forward and backward on every device,
//! behind one trait, [`AdapterLinear`] (see [`linear`] for how a model uses it).

pub mod dora;
pub mod linear;
pub mod lora;
pub mod vblora;
pub mod waveft;

use crate::error::Error;
use crate::tensor::Tensor;
pub use linear::{AdapterLinear, FrozenContext, FrozenLinear, LinearBase, LinearContext, LinearGrads};

/// The error for an output-side tensor (`y`, `dy`) whose rows or dtype do not match the input `x`.
pub(crate) fn mismatch_with_x(op: &'static str, what: &str, t: &Tensor, x: &Tensor) -> Error {
    Error::shape(
        op,
        format!(
            "{what} {:?} {} does not match x {:?} {}",
            t.shape(),
            t.dtype(),
            x.shape(),
            x.dtype()
        ),
    )
}
