//! The VB-LoRA linear layer with a frozen base: `y = x·Wᵀ + b + drop(x)·Aᵀ·Bᵀ`, with A and B mixed from
//! one vector bank shared by every layer.
//!
//! Parameters, in a [`ParamStore`] under PEFT's keys: the shared bank `base_model.vblora_vector_bank`
//! (`[num_vectors, L]`, registered once by [`VbLoraBank::new`]) and per layer
//! `base_model.model.<module>.vblora_logits_A` / `_B`. Every layer records the bank as its own tape
//! input, so the bank's gradient is the sum of every layer's contribution (the tape adds gradients of
//! all Vars of one parameter into one entry).
//!
//! One step of one layer: compose A `[r, in]` and B `[out, r]` once (`(r·in + out·r)·k` multiply-adds
//! plus a top-k over V per sub-vector: microseconds), then the layer is exactly a LoRA layer with
//! scaling 1: the forward is the fused K-concatenated product `[x | u]·[W | B]ᵀ` with
//! `u = drop(x)·Aᵀ`, the backward `dB = dyᵀ·u`, `v = dy·B`, `dA = vᵀ·drop(x)`, `dx = [dy | v]·[W ; A]`,
//! and finally the composition's chain rule to the logits and the bank. A and B are kept in the context
//! (`(in + out)·r` floats), so the backward does not compose again.
//!
//! Dropout (PEFT's `vblora_dropout`) acts on the adapter branch only, with a mask that is a pure
//! function of a seed, regenerated in the backward pass (as in [`crate::adapters::lora`]).

use super::{BANK_KEY, VbLoraConfig, VbLoraLayer};
use crate::adapters::AdapterLinear;
use crate::adapters::linear::{
    Fwd, LinearBase, Shapes, TapeLinear, adapter_linear_common, check_devices, with_name,
};
use crate::adapters::lora::{low_rank_backward_input, low_rank_forward};
use crate::autograd::{Grads, ParamId, ParamStore};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::peft::AdapterMethod;
use crate::qmatmul::BaseWeight;
use crate::tensor::{DType, Tensor};

/// PEFT's key of `module`'s logits: `base_model.model.<module>.vblora_logits_<ab>` (`ab` is `"A"` or
/// `"B"`).
pub fn logits_key(module: &str, ab: &str) -> String {
    format!("base_model.model.{module}.vblora_logits_{ab}")
}

/// The shared vector bank: its parameter id and the settings every layer that uses it must share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VbLoraBank {
    id: ParamId,
    cfg: VbLoraConfig,
}

impl VbLoraBank {
    /// Registers a fresh bank `U(-init_bound, init_bound)` (PEFT's `init_vector_bank_bound`, default
    /// 0.02; our generator) in `store` under [`BANK_KEY`]. Once per model: the key is unique.
    pub fn new(
        cfg: &VbLoraConfig,
        init_bound: f32,
        store: &mut ParamStore,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        if !(init_bound.is_finite() && init_bound >= 0.0) {
            return Err(Error::invalid(format!(
                "VB-LoRA init_vector_bank_bound {init_bound} must be finite and >= 0"
            )));
        }
        let bank = cfg.init_bank(init_bound, seed, device)?;
        let id = store.insert(BANK_KEY, bank)?;
        Ok(VbLoraBank { id, cfg: *cfg })
    }

    /// A bank that already lives in `store` (e.g. loaded from a PEFT adapter file).
    pub fn from_param(cfg: &VbLoraConfig, id: ParamId, store: &ParamStore) -> Result<Self> {
        cfg.validate()?;
        let t = store.get(id)?;
        if t.shape() != [cfg.num_vectors, cfg.vector_length] {
            return Err(Error::shape(
                "VbLoraBank",
                format!(
                    "bank {:?} is not [num_vectors, vector_length] = [{}, {}]",
                    t.shape(),
                    cfg.num_vectors,
                    cfg.vector_length
                ),
            ));
        }
        t.dtype().expect_float("VbLoraBank")?;
        Ok(VbLoraBank { id, cfg: *cfg })
    }

    /// The bank's parameter id.
    pub fn id(&self) -> ParamId {
        self.id
    }

    /// r, num_vectors, vector_length and topk, shared by every layer of the bank.
    pub fn config(&self) -> &VbLoraConfig {
        &self.cfg
    }
}

/// Per-layer settings that are not part of the bank.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VbLoraOptions {
    /// `vblora_dropout` on the adapter branch, in `[0, 1)` (PEFT default 0).
    pub dropout: f32,
    /// Std of the fresh logits (PEFT `init_logits_std`, default 0.1).
    pub init_logits_std: f32,
}

impl Default for VbLoraOptions {
    fn default() -> Self {
        VbLoraOptions {
            dropout: 0.0,
            init_logits_std: 0.1,
        }
    }
}

/// A linear layer with a frozen (possibly 4-bit) base weight and a VB-LoRA update.
#[derive(Clone, Debug)]
pub struct VbLoraLinear {
    lb: LinearBase,
    layer: VbLoraLayer,
    bank: ParamId,
    logits_a: ParamId,
    logits_b: ParamId,
}

/// What the forward pass keeps: the input, `u = drop(x)·Aᵀ` (`[tokens, r]` f32) and the composed A, B.
#[derive(Clone, Debug)]
pub struct VbLoraContext {
    x: Tensor,
    u: Tensor,
    a: Tensor,
    b: Tensor,
    shapes: Shapes,
    mask_seed: Option<u64>,
}

impl VbLoraContext {
    /// The composed `A [r, in]` (f32) this forward pass used.
    pub fn a(&self) -> &Tensor {
        &self.a
    }
    /// The composed `B [out, r]` (f32) this forward pass used.
    pub fn b(&self) -> &Tensor {
        &self.b
    }
}

/// Gradients of one backward pass, f32.
#[derive(Clone, Debug)]
pub struct VbLoraLinearGrads {
    /// `dL/dx` in x's dtype and shape (base and adapter terms); `None` when not requested.
    pub dx: Option<Tensor>,
    /// `[r, in/L, V]`.
    pub dlogits_a: Tensor,
    /// `[out/L, r, V]`.
    pub dlogits_b: Tensor,
    /// This layer's contribution to the shared bank's gradient, `[V, L]` (sum it over layers).
    pub dbank: Tensor,
}

impl VbLoraLinear {
    /// Creates the layer on `bank` and registers its logits `N(0, init_logits_std²)` (from `seed`) in
    /// `store` under PEFT's keys for `name`. `in` and `out` must be multiples of the bank's
    /// `vector_length` (as PEFT).
    pub fn new(
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        bank: &VbLoraBank,
        opts: &VbLoraOptions,
        store: &mut ParamStore,
        seed: u64,
    ) -> Result<Self> {
        base.validate("VbLoraLinear")?;
        if !(opts.init_logits_std.is_finite() && opts.init_logits_std >= 0.0) {
            return Err(Error::invalid(format!(
                "{name}: VB-LoRA init_logits_std {} must be finite and >= 0",
                opts.init_logits_std
            )));
        }
        let layer = VbLoraLayer::new(base.out_features(), base.in_features(), bank.config())
            .map_err(|e| with_name(name, e))?;
        let (la, lb) = layer.init_logits(opts.init_logits_std, seed, base.device())?;
        let la = store.insert(logits_key(name, "A"), la)?;
        let lb = store.insert(logits_key(name, "B"), lb)?;
        Self::from_params(name, base, bias, bank, la, lb, opts.dropout, store)
    }

    /// Wraps logits that already live in `store` (e.g. loaded from a PEFT adapter file; top-k
    /// checkpoints expanded with [`super::vblora_logits_from_topk`] work for inference).
    #[allow(clippy::too_many_arguments)]
    pub fn from_params(
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        bank: &VbLoraBank,
        logits_a: ParamId,
        logits_b: ParamId,
        dropout: f32,
        store: &ParamStore,
    ) -> Result<Self> {
        let op = "VbLoraLinear";
        base.validate(op)?;
        let (out, inp) = (base.out_features(), base.in_features());
        let layer = VbLoraLayer::new(out, inp, bank.config()).map_err(|e| with_name(name, e))?;
        let (bt, la, lb) = (store.get(bank.id())?, store.get(logits_a)?, store.get(logits_b)?);
        if bt.shape() != [bank.config().num_vectors, bank.config().vector_length] {
            return Err(Error::shape(
                op,
                format!("{name}: bank {:?} does not match its config", bt.shape()),
            ));
        }
        if la.shape() != layer.logits_a_shape() || lb.shape() != layer.logits_b_shape() {
            return Err(Error::shape(
                op,
                format!(
                    "{name}: logits A {:?} / B {:?} do not fit a [{out}, {inp}] base weight (expected {:?} / {:?})",
                    la.shape(),
                    lb.shape(),
                    layer.logits_a_shape(),
                    layer.logits_b_shape()
                ),
            ));
        }
        for t in [bt, la, lb] {
            t.dtype().expect_float(op)?;
        }
        check_devices(
            op,
            name,
            &base,
            [("bank", Some(bt)), ("logits_A", Some(la)), ("logits_B", Some(lb))],
        )?;
        Ok(VbLoraLinear {
            lb: LinearBase::new(op, name, base, bias, dropout, "vblora_dropout")?,
            layer,
            bank: bank.id(),
            logits_a,
            logits_b,
        })
    }

    /// Shapes and settings.
    pub fn layer(&self) -> &VbLoraLayer {
        &self.layer
    }
    /// The shared bank's parameter id.
    pub fn bank_id(&self) -> ParamId {
        self.bank
    }
    /// The parameter id of the A logits (`[r, in/L, V]`).
    pub fn logits_a_id(&self) -> ParamId {
        self.logits_a
    }
    /// The parameter id of the B logits (`[out/L, r, V]`).
    pub fn logits_b_id(&self) -> ParamId {
        self.logits_b
    }
    /// The dropout probability of the adapter branch.
    pub fn dropout(&self) -> f32 {
        self.lb.dropout()
    }

    /// The seed of this layer's dropout mask for a step seed (see [`LinearBase::mask_seed`]).
    pub fn mask_seed(&self, step_seed: Option<u64>) -> Option<u64> {
        self.lb.mask_seed(step_seed)
    }

    /// `(A [r, in], B [out, r])`, f32, composed from the current bank and logits.
    pub fn compose_ab(&self, store: &ParamStore) -> Result<(Tensor, Tensor)> {
        let f = |id| store.get(id).and_then(|t| t.to_dtype(DType::F32));
        self.layer
            .compose_ab(&f(self.bank)?, &f(self.logits_a)?, &f(self.logits_b)?)
    }

    /// Forward pass. `dropout_seed` is `Some(step seed)` in training (dropout active) and `None` in
    /// evaluation. Returns the output (x's dtype and leading shape) and the backward context.
    pub fn forward(
        &self,
        store: &ParamStore,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, VbLoraContext)> {
        let (a, b) = self.compose_ab(store)?;
        self.forward_with(a, b, x, dropout_seed)
    }

    fn forward_with(
        &self,
        a: Tensor,
        b: Tensor,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, VbLoraContext)> {
        let (x2, shapes) = self.lb.flatten_input(x, "VbLoraLinear::forward")?;
        let mask_seed = self.mask_seed(dropout_seed);
        let xd = self.lb.dropped(&x2, mask_seed)?;
        // u = drop(x)·Aᵀ in f32 (PEFT casts x to the bank's dtype): [tokens, r].
        let u = xd.to_dtype(DType::F32)?.matmul_t(&a, false, true)?;
        let y = low_rank_forward(&self.lb, &x2, &u, &b)?.reshape(&shapes.output)?;
        Ok((
            y,
            VbLoraContext {
                x: x2,
                u,
                a,
                b,
                shapes,
                mask_seed,
            },
        ))
    }

    /// Backward pass: gradients of both logits and of the bank (this layer's share), f32, and, when
    /// `need_dx`, of the input.
    pub fn backward(
        &self,
        store: &ParamStore,
        ctx: &VbLoraContext,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<VbLoraLinearGrads> {
        let (dx, grads) = self.backward_with(
            store.get(self.bank)?,
            store.get(self.logits_a)?,
            store.get(self.logits_b)?,
            ctx,
            dy,
            need_dx,
            true,
        )?;
        let (dlogits_a, dlogits_b, dbank) =
            grads.ok_or_else(|| Error::invalid("VbLoraLinear::backward: parameter gradients missing"))?;
        Ok(VbLoraLinearGrads {
            dx,
            dlogits_a,
            dlogits_b,
            dbank,
        })
    }

    /// `(dx, Some((dlogits_a, dlogits_b, dbank)))`; the parameter gradients only when `need_params`
    /// (so a frozen top-k checkpoint, whose logits hold -inf, can still pass gradients to x).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn backward_with(
        &self,
        bank: &Tensor,
        la: &Tensor,
        lb: &Tensor,
        ctx: &VbLoraContext,
        dy: &Tensor,
        need_dx: bool,
        need_params: bool,
    ) -> Result<(Option<Tensor>, Option<(Tensor, Tensor, Tensor)>)> {
        let what = "VbLoraLinear::backward";
        let dy2 = self.lb.flatten_dy(dy, &ctx.shapes, what)?;
        dy.dtype().expect_float(what)?;
        let dy2 = dy2.to_dtype(ctx.x.dtype())?;
        let dy32 = dy2.to_dtype(DType::F32)?;
        // v = dy·B: [tokens, r] (needed by dx and dA).
        let v = dy32.matmul(&ctx.b)?;
        let dx = if need_dx {
            Some(
                low_rank_backward_input(&self.lb, &dy2, &v, &ctx.a, ctx.mask_seed)?
                    .reshape(&ctx.shapes.input)?,
            )
        } else {
            None
        };
        if !need_params {
            return Ok((dx, None));
        }
        // dB = dyᵀ·u: [out, tokens]·[tokens, r];  dA = vᵀ·drop(x): [r, tokens]·[tokens, in].
        let db = dy32.matmul_t(&ctx.u, true, false)?;
        let xd = self.lb.dropped(&ctx.x, ctx.mask_seed)?.to_dtype(DType::F32)?;
        let da = v.matmul_t(&xd, true, false)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let grads = self
            .layer
            .compose_backward(&f(bank)?, &f(la)?, &f(lb)?, &da, &db)
            .map_err(|e| self.lb.named(e))?;
        Ok((dx, Some(grads)))
    }

    /// Dense `ΔW = B·A` `[out, in]` f32 (for merging).
    pub fn delta_weight(&self, store: &ParamStore) -> Result<Tensor> {
        let (a, b) = self.compose_ab(store)?;
        b.matmul(&a)
    }
}

impl TapeLinear for VbLoraLinear {
    type Ctx = VbLoraContext;
    const OP: &'static str = "vblora_linear";

    /// The shared bank and both logits. Every layer takes its own tape Var of the bank; the tape sums
    /// their gradients into the bank's one entry.
    fn tape_params(&self) -> Vec<ParamId> {
        vec![self.bank, self.logits_a, self.logits_b]
    }
    fn forward_values(&self, params: &[&Tensor], x: &Tensor, seed: Option<u64>) -> Fwd<VbLoraContext> {
        let [bank, la, lb] = params else {
            return Err(Error::invalid(
                "VbLoraLinear: expected parameters [bank, logits_A, logits_B]",
            ));
        };
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (a, b) = self.layer.compose_ab(&f(bank)?, &f(la)?, &f(lb)?)?;
        self.forward_with(a, b, x, seed)
    }
    /// The parameter gradients only when one of them is needed (so a frozen top-k checkpoint, whose
    /// logits hold -inf, can still pass gradients to x).
    fn backward_values(&self, params: &[&Tensor], ctx: &VbLoraContext, dy: &Tensor, needs: &[bool]) -> Grads {
        let [bank, la, lb] = params else {
            return Err(Error::invalid(
                "VbLoraLinear: expected parameters [bank, logits_A, logits_B]",
            ));
        };
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        let need_params = need(1) || need(2) || need(3);
        let (dx, grads) = self.backward_with(bank, la, lb, ctx, dy, need(0), need_params)?;
        Ok(match grads {
            Some((dla, dlb, dbank)) => vec![dx, Some(dbank), Some(dla), Some(dlb)],
            None => vec![dx, None, None, None],
        })
    }
}

impl AdapterLinear for VbLoraLinear {
    adapter_linear_common!(lb);

    fn method(&self) -> Option<AdapterMethod> {
        Some(AdapterMethod::VbLora)
    }
    /// The logits (not the shared bank).
    fn param_ids(&self) -> Vec<ParamId> {
        vec![self.logits_a, self.logits_b]
    }
    /// The logits (the shared bank is counted once, elsewhere).
    fn num_trainable_params(&self) -> usize {
        let [a0, a1, a2] = self.layer.logits_a_shape();
        let [b0, b1, b2] = self.layer.logits_b_shape();
        a0 * a1 * a2 + b0 * b1 * b2
    }
    fn delta_weight(&self, store: &ParamStore) -> Result<Tensor> {
        VbLoraLinear::delta_weight(self, store)
    }
}
