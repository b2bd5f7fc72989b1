//! Adapter layers: LoRA/QLoRA, DoRA, WaveFT and VB-LoRA, each with forward and backward on every device.

pub mod dora;
pub mod load;
pub mod lora;
pub mod vblora;
pub mod waveft;
