//! PEFT adapters on a base checkpoint: the layer above both the file format ([`crate::io::peft`]) and
//! the adapter layers ([`crate::adapters`]).
//!
//! * [`load`]: build every adapted layer of a base checkpoint from a PEFT adapter directory or a fresh
//!   PEFT config (each a `Box<dyn` [`crate::adapters::AdapterLinear`]`>`), and save the trained result as
//!   a PEFT adapter directory.
//! * [`merge`]: merge an adapter into the base checkpoint's weights, file to file (`peftk merge`).
//! * [`inspect`]: a human-readable summary of an adapter directory (`peftk inspect-adapter`).

#[doc(hidden)]
pub mod fuzz;
pub mod inspect;
pub mod load;
pub mod merge;

use crate::adapters::vblora::vblora_expand_topk;
use crate::error::Result;
use crate::io::peft::{AdapterModule, Part, PeftAdapter};
use crate::tensor::Tensor;

/// VB-LoRA logits `A` or `B` (`ab`) of `module` as full logits: stored in full, or rebuilt from PEFT's
/// `save_only_topk_weights` form as PEFT does on load (`-inf` outside the top-k).
fn vblora_logits(
    adapter: &PeftAdapter,
    module: &AdapterModule,
    ab: &str,
    num_vectors: usize,
) -> Result<Tensor> {
    let (full, idx, w) = if ab == "A" {
        (Part::VbLogitsA, Part::VbTopkIndicesA, Part::VbTopkWeightsA)
    } else {
        (Part::VbLogitsB, Part::VbTopkIndicesB, Part::VbTopkWeightsB)
    };
    if module.key(full).is_some() {
        return Ok(adapter.module_tensor(&module.name, full)?.clone());
    }
    vblora_expand_topk(
        adapter.module_tensor(&module.name, idx)?,
        adapter.module_tensor(&module.name, w)?,
        num_vectors,
    )
}
