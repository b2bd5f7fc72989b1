//! The zero-copy LoRA / QLoRA op: one candle `CustomOp3` of `(x, A, B)` per call that, when all three are
//! contiguous f32 host tensors (and the bias is f32), runs our fused kernels directly on candle's
//! buffers: the input, A and B are read in place under candle's storage locks, the output, the input
//! gradient and the gradients of A and B are `Vec`s our kernels write and candle adopts as its
//! `CpuStorage`. Nothing is copied, and the context kept for the backward pass holds only
//! `u = s·drop(x)·Aᵀ` (`[tokens, r]`): the backward pass reads x again from candle's input tensor. Any
//! other case (strided, f16/bf16, CUDA) runs the general op ([`super::op::AdapterOp`], which copies).
//!
//! The arithmetic is that of [`crate::adapters::lora::LoraLinear`], in the same order on the same
//! kernels (the `gemm` crate's sgemm for the rank-r products, [`crate::qmatmul`]'s CPU kernels for the
//! K-concatenated base products), so both paths give the same bits.

use super::convert::{contiguous, contiguous_range, cpu_out, cpu_region, to_candle_err, to_ours};
use super::host::lock_all;
use super::op::{AdapterOp, cast_like, poisoned};
use crate::adapters::AdapterLinear;
use crate::adapters::lora::LoraLinear;
use crate::error::{Error, Result};
use crate::qmatmul::BaseWeight;
use crate::qmatmul::cpu::{backward_input_f32, forward_f32};
use crate::tensor::cpu::{dropout_slice, sgemm};
use crate::tensor::{DType, MatmulDims, dropout_threshold};
use candle_core as cc;
use std::borrow::Cow;
use std::sync::{Arc, Mutex};

/// What the zero-copy forward pass keeps: `u = s·drop(x)·Aᵀ` (`[tokens, r]`), the dropout mask seed,
/// the input shape.
struct SliceCtx {
    u: Vec<f32>,
    mask_seed: Option<u64>,
    x_shape: Vec<usize>,
}

/// `dx` (when asked), `dA`, `dB` of the in-place backward pass.
type HostGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

/// One call of a LoRA layer (see the module docs).
pub(crate) struct LoraOp {
    general: AdapterOp<LoraLinear>,
    ctx: Mutex<Option<SliceCtx>>,
}

impl LoraOp {
    pub(crate) fn new(layer: Arc<LoraLinear>, shapes: Arc<Vec<Vec<usize>>>, seed: Option<u64>) -> Self {
        LoraOp {
            general: AdapterOp::new(layer, shapes, seed),
            ctx: Mutex::new(None),
        }
    }

    fn layer(&self) -> &LoraLinear {
        &self.general.layer
    }

    /// The frozen bias as an f32 slice, `Some(None)` without one, `None` when the in-place path cannot
    /// run (a bias in another dtype or off the host, a dense base that is not f32, a base off the host).
    fn host_f32_operands(&self) -> Option<Option<&[f32]>> {
        let lb = self.layer().linear_base();
        if lb.base().device() != crate::Device::Cpu {
            return None;
        }
        if let BaseWeight::Dense(w) = lb.base()
            && w.dtype() != DType::F32
        {
            return None;
        }
        match lb.bias() {
            None => Some(None),
            Some(b) => b.cpu_data::<f32>("lora bias").ok().map(Some),
        }
    }

    /// `x`'s dropped-out copy under `mask_seed` (x itself without one).
    fn dropped<'a>(&self, x: &'a [f32], mask_seed: Option<u64>) -> Cow<'a, [f32]> {
        let p = self.layer().dropout();
        match mask_seed {
            Some(seed) if p > 0.0 => {
                Cow::Owned(dropout_slice(x, dropout_threshold(p), 1.0 / (1.0 - p), seed))
            }
            _ => Cow::Borrowed(x),
        }
    }

    /// The in-place forward pass: `y [.., out]` as a Vec, `u` kept for the backward pass.
    fn forward_in_place(
        &self,
        x: &[f32],
        x_shape: &[usize],
        a: &[f32],
        b: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let layer = self.layer();
        let lb = layer.linear_base();
        let (out, inp, r, s) = (lb.out_features(), lb.in_features(), layer.rank(), layer.scaling());
        check_len("lora x", x.len(), x.len() / inp.max(1) * inp)?;
        if x_shape.last() != Some(&inp) {
            return Err(Error::shape(
                "LoraLinear::forward",
                format!("{}: expected [.., {inp}], got {x_shape:?}", lb.name()),
            ));
        }
        check_len("lora_A", a.len(), r * inp)?;
        check_len("lora_B", b.len(), out * r)?;
        lb.base().validate("LoraLinear::forward")?;
        let t = x.len() / inp.max(1);
        let mask_seed = layer.mask_seed(self.general.seed);
        let xd = self.dropped(x, mask_seed);
        // u = s·drop(x)·Aᵀ: [t, in]·[r, in]ᵀ, scaled as `Tensor::scale` does (x·s + 0).
        let mut u = vec![0f32; t * r];
        sgemm(&xd, a, &mut u, dims(t, r, inp, false, true), false);
        u.iter_mut().for_each(|v| *v = *v * s + 0.0);
        let y = forward_f32(x, t, lb.base(), bias, Some((&u, b)), r, lb.algo())?;
        *self.ctx.lock().map_err(|_| poisoned())? = Some(SliceCtx {
            u,
            mask_seed,
            x_shape: x_shape.to_vec(),
        });
        Ok(y)
    }

    /// The in-place backward pass: `dx` (when asked), `dA`, `dB` as Vecs.
    fn backward_in_place(
        &self,
        ctx: &SliceCtx,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        dy: &[f32],
        need_dx: bool,
    ) -> Result<HostGrads> {
        let layer = self.layer();
        let lb = layer.linear_base();
        let (out, inp, r, s) = (lb.out_features(), lb.in_features(), layer.rank(), layer.scaling());
        let t = ctx.u.len() / r.max(1);
        check_len("lora x", x.len(), t * inp)?;
        check_len("lora dy", dy.len(), t * out)?;
        check_len("lora_A", a.len(), r * inp)?;
        check_len("lora_B", b.len(), out * r)?;
        // dB = dyᵀ·u: [out, t]·[t, r].
        let mut db = vec![0f32; out * r];
        sgemm(dy, &ctx.u, &mut db, dims(out, r, t, true, false), false);
        // v = s·dy·B: [t, r];  dA = vᵀ·drop(x): [r, t]·[t, in].
        let mut v = vec![0f32; t * r];
        sgemm(dy, b, &mut v, dims(t, r, out, false, false), false);
        v.iter_mut().for_each(|e| *e = *e * s + 0.0);
        let xd = self.dropped(x, ctx.mask_seed);
        let mut da = vec![0f32; r * inp];
        sgemm(&v, &xd, &mut da, dims(r, inp, t, true, false), false);
        let dx = if !need_dx {
            None
        } else if let Some(seed) = ctx.mask_seed.filter(|_| layer.dropout() > 0.0) {
            // dy·W + drop(v·A): the adapter term goes back through the same mask.
            let mut dx = backward_input_f32(dy, t, lb.base(), None, 0, lb.algo())?;
            let mut va = vec![0f32; t * inp];
            sgemm(&v, a, &mut va, dims(t, inp, r, false, false), false);
            let p = layer.dropout();
            let va = dropout_slice(&va, dropout_threshold(p), 1.0 / (1.0 - p), seed);
            dx.iter_mut().zip(&va).for_each(|(d, &e)| *d += e);
            Some(dx)
        } else {
            Some(backward_input_f32(dy, t, lb.base(), Some((&v, a)), r, lb.algo())?)
        };
        Ok((dx, da, db))
    }

    fn backward(
        &self,
        x: &cc::Tensor,
        a: &cc::Tensor,
        b: &cc::Tensor,
        grad: &cc::Tensor,
    ) -> Result<(Option<cc::Tensor>, Option<cc::Tensor>, Option<cc::Tensor>)> {
        let guard = self.ctx.lock().map_err(|_| poisoned())?;
        let Some(ctx) = guard.as_ref() else {
            // The forward pass took the general path.
            drop(guard);
            let (dx, grads) = self.general.backward_ours(x, &[to_ours(a)?, to_ours(b)?], grad)?;
            let mut g = grads.into_iter();
            let mut next = |like: &cc::Tensor| -> Result<cc::Tensor> {
                let g = g
                    .next()
                    .ok_or_else(|| Error::invalid("lora: a gradient is missing"))?;
                cast_like(super::convert::to_candle(g, like.device())?, like)
            };
            return Ok((dx, Some(next(a)?), Some(next(b)?)));
        };
        let grad = contiguous(grad).map_err(super::convert::from_candle_err)?;
        let no_longer =
            || Error::invalid("lora: the backward operands are no longer contiguous f32 host tensors");
        // One read guard per distinct storage: two operands sharing one (x and the gradient, A and B as
        // views of one buffer) must not take the same lock twice, which can deadlock behind a writer.
        let ts = [x, a, b, &grad];
        let (guards, which) = lock_all(&ts).map_err(|_| no_longer())?;
        let operand = |i: usize| host_f32(&guards[which[i]], ts[i].layout()).ok_or_else(no_longer);
        let (xs, as_, bs, dys) = (operand(0)?, operand(1)?, operand(2)?, operand(3)?);
        let need_dx = x.track_op();
        let (dx, da, db) = self.backward_in_place(ctx, xs, as_, bs, dys, need_dx)?;
        let host = |v: Vec<f32>, shape: &[usize]| {
            cc::Tensor::from_storage(
                cc::Storage::Cpu(cc::CpuStorage::F32(v)),
                shape,
                cc::op::BackpropOp::none(),
                false,
            )
        };
        Ok((
            dx.map(|v| host(v, ctx.x_shape.as_slice())),
            Some(host(da, a.dims())),
            Some(host(db, b.dims())),
        ))
    }
}

/// The f32 elements of a contiguous host tensor, in place.
fn host_f32<'a>(s: &'a cc::Storage, l: &cc::Layout) -> Option<&'a [f32]> {
    match s {
        cc::Storage::Cpu(c) => cpu_f32(c, l),
        _ => None,
    }
}

fn cpu_f32<'a>(s: &'a cc::CpuStorage, l: &cc::Layout) -> Option<&'a [f32]> {
    match s {
        cc::CpuStorage::F32(v) => {
            let (a, b) = l.contiguous_offsets()?;
            v.get(a..b)
        }
        _ => None,
    }
}

fn dims(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> MatmulDims {
    MatmulDims {
        m,
        n,
        k,
        trans_a,
        trans_b,
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::shape(
            "LoraLinear (candle)",
            format!("{what} holds {got} elements, expected {want}"),
        ));
    }
    Ok(())
}

impl cc::CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    fn cpu_fwd(
        &self,
        s1: &cc::CpuStorage,
        l1: &cc::Layout,
        s2: &cc::CpuStorage,
        l2: &cc::Layout,
        s3: &cc::CpuStorage,
        l3: &cc::Layout,
    ) -> cc::Result<(cc::CpuStorage, cc::Shape)> {
        if let (Some(x), Some(a), Some(b), Some(bias)) = (
            cpu_f32(s1, l1),
            cpu_f32(s2, l2),
            cpu_f32(s3, l3),
            self.host_f32_operands(),
        ) {
            let y = self
                .forward_in_place(x, l1.dims(), a, b, bias)
                .map_err(to_candle_err)?;
            let lb = self.layer().linear_base();
            let mut shape = l1.dims()[..l1.dims().len() - 1].to_vec();
            shape.push(lb.out_features());
            return Ok((cc::CpuStorage::F32(y), cc::Shape::from_dims(&shape)));
        }
        let ranges = |l: &cc::Layout| contiguous_range(l).map_err(to_candle_err);
        self.general.fwd_parts(
            (s1, l1),
            vec![(s2, ranges(l2)?), (s3, ranges(l3)?)],
            cpu_region,
            cpu_out,
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &cc::CudaStorage,
        l1: &cc::Layout,
        s2: &cc::CudaStorage,
        l2: &cc::Layout,
        s3: &cc::CudaStorage,
        l3: &cc::Layout,
    ) -> cc::Result<(cc::CudaStorage, cc::Shape)> {
        use super::cuda::{cuda_out, cuda_region};
        let ranges = |l: &cc::Layout| contiguous_range(l).map_err(to_candle_err);
        self.general.fwd_parts(
            (s1, l1),
            vec![(s2, ranges(l2)?), (s3, ranges(l3)?)],
            cuda_region,
            |y| cuda_out(&y, &s1.device),
        )
    }

    fn bwd(
        &self,
        arg1: &cc::Tensor,
        arg2: &cc::Tensor,
        arg3: &cc::Tensor,
        _res: &cc::Tensor,
        grad_res: &cc::Tensor,
    ) -> cc::Result<(Option<cc::Tensor>, Option<cc::Tensor>, Option<cc::Tensor>)> {
        self.backward(arg1, arg2, arg3, grad_res).map_err(to_candle_err)
    }
}
