//! Adapter layers: LoRA/QLoRA, DoRA, WaveFT and VB-LoRA, each with forward and backward on every device,
//! behind one trait, [`AdapterLinear`] (see [`linear`] for how a model uses it).

pub mod dora;
pub mod linear;
pub mod lora;
pub mod vblora;
pub mod waveft;

pub use linear::{AdapterLinear, FrozenContext, FrozenLinear, LinearBase, LinearContext, LinearGrads};
