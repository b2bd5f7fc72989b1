//! The general candle custom op of a layer call. [`AdapterOp`] runs our layer's fused forward pass in
//! `cpu_fwd` / `cuda_fwd` and its backward pass in `bwd` on copies of candle's tensors (every layer type,
//! dtype and device); on contiguous host tensors DoRA, WaveFT and VB-LoRA take the in-place op instead
//! (`host.rs`), and the LoRA layer has its own op (`lora.rs`), both of which fall back to this one.
//!
//! candle's `CustomOp1/2/3` take one to three tensors, a layer reads up to three parameters (DoRA: A, B
//! and the magnitude; VB-LoRA: the bank and two logit matrices) besides the input. So the general op is
//! a `CustomOp2` of the input and the layer's parameters packed end to end in one flat tensor (candle's
//! `cat` of the flattened `Var`s, a differentiable candle op): `bwd` returns the input gradient and the
//! packed parameter gradient, and candle's own backward of `cat` hands each `Var` its slice. A shared
//! VB-LoRA bank is one `Var` in several layers' packs, so its gradient sums over them.

use super::convert::{
    contiguous_range, cpu_out, cpu_region, from_candle_err, note_copy, packed_ranges, to_candle,
    to_candle_err, to_ours, to_ours_parts,
};
use crate::adapters::linear::TapeLinear;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use candle_core as cc;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// One call of a layer: the layer (shared), its parameter shapes in pack order, the dropout step
/// seed, and the context the forward pass leaves for the backward pass.
pub(crate) struct AdapterOp<L: TapeLinear> {
    pub(crate) layer: Arc<L>,
    pub(crate) shapes: Arc<Vec<Vec<usize>>>,
    pub(crate) seed: Option<u64>,
    pub(crate) ctx: Mutex<Option<L::Ctx>>,
}

impl<L: TapeLinear> AdapterOp<L> {
    pub(crate) fn new(layer: Arc<L>, shapes: Arc<Vec<Vec<usize>>>, seed: Option<u64>) -> Self {
        AdapterOp {
            layer,
            shapes,
            seed,
            ctx: Mutex::new(None),
        }
    }

    /// `cpu_fwd` / `cuda_fwd` on our tensors: the input and the parameters (`params`: storage and
    /// element range, in pack order) as our tensors over candle's storage (`region`), our forward pass
    /// (its context kept for `bwd`), the output as candle storage (`out`).
    pub(crate) fn fwd_parts<S, O>(
        &self,
        (s1, l1): (&S, &cc::Layout),
        params: Vec<(&S, Range<usize>)>,
        region: impl Fn(&S, Range<usize>, &[usize]) -> Result<Tensor>,
        out: impl FnOnce(Tensor) -> Result<O>,
    ) -> cc::Result<(O, cc::Shape)> {
        let run = || -> Result<_> {
            let x = region(s1, contiguous_range(l1)?, l1.dims())?;
            let params = params
                .into_iter()
                .zip(self.shapes.iter())
                .map(|((s, r), shape)| region(s, r, shape))
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = params.iter().collect();
            let (y, ctx) = self.layer.forward_values(&refs, &x, self.seed)?;
            *self.ctx.lock().map_err(|_| poisoned())? = Some(ctx);
            let shape = cc::Shape::from_dims(y.shape());
            Ok((out(y)?, shape))
        };
        run().map_err(to_candle_err)
    }

    /// [`Self::fwd_parts`] of the packed parameters `(s2, l2)`.
    fn fwd_packed<S, O>(
        &self,
        x: (&S, &cc::Layout),
        (s2, l2): (&S, &cc::Layout),
        region: impl Fn(&S, Range<usize>, &[usize]) -> Result<Tensor>,
        out: impl FnOnce(Tensor) -> Result<O>,
    ) -> cc::Result<(O, cc::Shape)> {
        let ranges = packed_ranges(l2, &self.shapes).map_err(to_candle_err)?;
        self.fwd_parts(x, ranges.into_iter().map(|r| (s2, r)).collect(), region, out)
    }

    /// Our backward pass on our parameter tensors: the input gradient as a candle tensor (when the
    /// input is tracked) and every parameter's gradient as our tensor, in pack order.
    pub(crate) fn backward_ours(
        &self,
        x: &cc::Tensor,
        params: &[Tensor],
        grad: &cc::Tensor,
    ) -> Result<(Option<cc::Tensor>, Vec<Tensor>)> {
        let guard = self.ctx.lock().map_err(|_| poisoned())?;
        let ctx = guard
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{}: backward before forward", L::OP)))?;
        let refs: Vec<&Tensor> = params.iter().collect();
        layer_backward(&*self.layer, ctx, &refs, &to_ours(grad)?, x)
    }

    /// The general backward pass: the input gradient and the packed parameter gradient in the pack's
    /// dtype and shape.
    fn backward(
        &self,
        x: &cc::Tensor,
        packed: &cc::Tensor,
        grad: &cc::Tensor,
    ) -> Result<(Option<cc::Tensor>, Option<cc::Tensor>)> {
        let params = to_ours_parts(packed, &self.shapes)?;
        let (dx, grads) = self.backward_ours(x, &params, grad)?;
        let c = from_candle_err;
        let mut flat = grads
            .into_iter()
            .map(|g| {
                let n = g.numel();
                to_candle(g.reshape(&[n])?, x.device())
            })
            .collect::<Result<Vec<_>>>()?;
        let dpacked = if flat.len() == 1 {
            flat.pop().ok_or_else(|| Error::invalid("no gradient"))?
        } else {
            let t = cc::Tensor::cat(&flat, 0).map_err(c)?;
            note_copy(t.elem_count() * t.dtype().size_in_bytes());
            t
        };
        Ok((dx, Some(cast_like(dpacked, packed)?)))
    }
}

/// `g` in the dtype and shape of `like` (a booked copy when the dtype differs).
pub(crate) fn cast_like(g: cc::Tensor, like: &cc::Tensor) -> Result<cc::Tensor> {
    let g = if g.dtype() == like.dtype() {
        g
    } else {
        note_copy(g.elem_count() * like.dtype().size_in_bytes());
        g.to_dtype(like.dtype()).map_err(from_candle_err)?
    };
    g.reshape(like.shape()).map_err(from_candle_err)
}

/// `layer`'s backward pass from its forward context on our tensors: the input gradient as a candle
/// tensor on `x`'s device (only when `x` is tracked) and every parameter's gradient as our tensor.
pub(crate) fn layer_backward<L: TapeLinear>(
    layer: &L,
    ctx: &L::Ctx,
    params: &[&Tensor],
    dy: &Tensor,
    x: &cc::Tensor,
) -> Result<(Option<cc::Tensor>, Vec<Tensor>)> {
    let need_dx = x.track_op();
    let mut needs = vec![true; params.len() + 1];
    needs[0] = need_dx;
    let mut grads = layer.backward_values(params, ctx, dy, &needs)?.into_iter();
    let dx = match grads.next().flatten().filter(|_| need_dx) {
        Some(g) => Some(to_candle(g, x.device())?),
        None => None,
    };
    let grads = grads
        .map(|g| g.ok_or_else(|| Error::invalid(format!("{}: a parameter gradient is missing", L::OP))))
        .collect::<Result<Vec<_>>>()?;
    Ok((dx, grads))
}

pub(crate) fn poisoned() -> Error {
    Error::invalid("candle op: a thread panicked while holding the layer context")
}

impl<L: TapeLinear> cc::CustomOp2 for AdapterOp<L> {
    fn name(&self) -> &'static str {
        L::OP
    }

    fn cpu_fwd(
        &self,
        s1: &cc::CpuStorage,
        l1: &cc::Layout,
        s2: &cc::CpuStorage,
        l2: &cc::Layout,
    ) -> cc::Result<(cc::CpuStorage, cc::Shape)> {
        self.fwd_packed((s1, l1), (s2, l2), cpu_region, cpu_out)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &cc::CudaStorage,
        l1: &cc::Layout,
        s2: &cc::CudaStorage,
        l2: &cc::Layout,
    ) -> cc::Result<(cc::CudaStorage, cc::Shape)> {
        use super::cuda::{cuda_out, cuda_region};
        self.fwd_packed((s1, l1), (s2, l2), cuda_region, |y| cuda_out(&y, &s1.device))
    }

    fn bwd(
        &self,
        arg1: &cc::Tensor,
        arg2: &cc::Tensor,
        _res: &cc::Tensor,
        grad_res: &cc::Tensor,
    ) -> cc::Result<(Option<cc::Tensor>, Option<cc::Tensor>)> {
        self.backward(arg1, arg2, grad_res).map_err(to_candle_err)
    }
}
