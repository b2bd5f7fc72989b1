//! Gradient checkpointing of a decoder layer (as `torch.utils.checkpoint` does for transformers'
//! `gradient_checkpointing_enable()`): the layer's forward runs on a private tape whose activations are
//! dropped; the outer tape keeps only the layer's input and output, and the backward runs the layer
//! again (same dropout masks, from the same step seed) and backpropagates through the recomputation.
//!
//! Generic over the layer (a closure); the Llama decoder layers use it. BERT has its own copy in
//! `bert.rs` (`CheckpointOp`) that can move onto this one.

use crate::autograd::{Backward, ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

/// A layer's forward from its input: `f(tape, store, x) -> y`, deterministic for a given store and
/// input (dropout seeded by the step).
pub(crate) type LayerFn = dyn Fn(&mut Tape, &ParamStore, Var) -> Result<Var> + Send + Sync;

/// Records `f(x)` on `tape` as one op whose backward recomputes `f`. `params` are every parameter `f`
/// reads from `store` (their gradients come out of the op).
pub(crate) fn checkpointed(
    tape: &mut Tape,
    store: &ParamStore,
    params: Vec<ParamId>,
    x: Var,
    f: Arc<LayerFn>,
) -> Result<Var> {
    let out = {
        let mut inner = Tape::new();
        let xi = inner.leaf(tape.value(x)?.clone());
        let y = f(&mut inner, store, xi)?;
        inner.value(y)?.clone()
    };
    let mut inputs = Vec::with_capacity(params.len() + 1);
    inputs.push(x);
    for &id in &params {
        inputs.push(tape.param(store, id)?);
    }
    tape.record(
        &inputs,
        out,
        Box::new(CheckpointOp {
            f,
            store: snapshot(store)?,
            params,
        }),
    )
}

/// A copy of `store` with the same ids, names, values (shared) and trainable flags.
fn snapshot(store: &ParamStore) -> Result<ParamStore> {
    let mut s = ParamStore::new();
    for (id, name, value) in store.iter() {
        let nid = s.insert(name, value.clone())?;
        if nid != id {
            return Err(Error::invalid("checkpoint: parameter ids are not dense"));
        }
        s.set_trainable(nid, store.is_trainable(id))?;
    }
    Ok(s)
}

struct CheckpointOp {
    f: Arc<LayerFn>,
    store: ParamStore,
    params: Vec<ParamId>,
}

/// The name the layer's input gets in the recomputation store (not a valid module key).
const INPUT: &str = "\u{0}checkpoint.input";

impl Backward for CheckpointOp {
    fn backward(
        &self,
        g: &Tensor,
        inputs: &[&Tensor],
        _out: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let x = inputs
            .first()
            .ok_or_else(|| Error::invalid("checkpoint: no input"))?;
        let mut store = snapshot(&self.store)?;
        let xid = store.insert(INPUT, (*x).clone())?;
        let mut tape = Tape::new();
        let xv = tape.param(&store, xid)?;
        let y = (self.f)(&mut tape, &store, xv)?;
        let mut grads = tape.backward_with(y, g.clone())?;
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        let mut out = Vec::with_capacity(inputs.len());
        out.push(grads.remove(xid).filter(|_| need(0)));
        for (i, id) in self.params.iter().enumerate() {
            out.push(grads.remove(*id).filter(|_| need(i + 1)));
        }
        Ok(out)
    }

    fn name(&self) -> &'static str {
        "checkpointed_decoder_layer"
    }
}
