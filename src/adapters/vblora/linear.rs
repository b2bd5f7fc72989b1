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
use crate::autograd::{Backward, ParamId, ParamStore, Tape, Var};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::qmatmul::{Algo, BaseWeight, LowRankBwd, LowRankFwd, linear_backward_input, linear_forward};
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
    name: String,
    base: BaseWeight,
    bias: Option<Tensor>,
    layer: VbLoraLayer,
    bank: ParamId,
    logits_a: ParamId,
    logits_b: ParamId,
    dropout: f32,
    algo: Algo,
}

/// What the forward pass keeps: the input, `u = drop(x)·Aᵀ` (`[tokens, r]` f32) and the composed A, B.
#[derive(Clone, Debug)]
pub struct VbLoraContext {
    x: Tensor,
    u: Tensor,
    a: Tensor,
    b: Tensor,
    in_shape: Vec<usize>,
    out_shape: Vec<usize>,
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
        if let Some(b) = &bias
            && b.shape() != [out]
        {
            return Err(Error::shape(
                op,
                format!("{name}: bias {:?} is not [{out}]", b.shape()),
            ));
        }
        for (t, what) in [
            (Some(bt), "bank"),
            (Some(la), "logits_A"),
            (Some(lb), "logits_B"),
            (bias.as_ref(), "bias"),
        ] {
            if let Some(t) = t {
                t.dtype().expect_float(op)?;
                if t.device() != base.device() {
                    return Err(Error::device(
                        op,
                        format!(
                            "{name}: {what} on {} but the base weight on {}",
                            t.device(),
                            base.device()
                        ),
                    ));
                }
            }
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::invalid(format!(
                "{name}: vblora_dropout {dropout} is not in [0, 1)"
            )));
        }
        Ok(VbLoraLinear {
            name: name.to_string(),
            base,
            bias,
            layer,
            bank: bank.id(),
            logits_a,
            logits_b,
            dropout,
            algo: Algo::Auto,
        })
    }

    /// The module path.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The frozen base weight.
    pub fn base(&self) -> &BaseWeight {
        &self.base
    }
    /// The frozen bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
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
        self.dropout
    }
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.base.in_features()
    }
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.base.out_features()
    }
    /// Chooses the base matmul implementation (default [`Algo::Auto`]).
    pub fn set_algo(&mut self, algo: Algo) {
        self.algo = algo;
    }
    /// Trainable parameters of this layer (the logits; the shared bank is counted once, elsewhere).
    pub fn num_trainable_params(&self) -> usize {
        let [a0, a1, a2] = self.layer.logits_a_shape();
        let [b0, b1, b2] = self.layer.logits_b_shape();
        a0 * a1 * a2 + b0 * b1 * b2
    }

    /// The seed of this layer's dropout mask for a step seed (the step seed mixed with the layer name,
    /// as [`crate::adapters::lora::LoraLinear::mask_seed`]); `None` when dropout is off or in evaluation.
    pub fn mask_seed(&self, step_seed: Option<u64>) -> Option<u64> {
        let s = step_seed.filter(|_| self.dropout > 0.0)?;
        let h = self.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        Some(s ^ h)
    }

    fn flatten(&self, x: &Tensor, features: usize, what: &'static str) -> Result<Tensor> {
        match x.shape() {
            [.., f] if *f == features => x.reshape(&[x.numel() / features.max(1), features]),
            s => Err(Error::shape(
                what,
                format!("{}: expected [.., {features}], got {s:?}", self.name),
            )),
        }
    }

    fn dropped(&self, x2: &Tensor, mask_seed: Option<u64>) -> Result<Tensor> {
        match mask_seed {
            Some(seed) => x2.dropout(self.dropout, seed),
            None => Ok(x2.clone()),
        }
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
        let x2 = self.flatten(x, self.in_features(), "VbLoraLinear::forward")?;
        let mask_seed = self.mask_seed(dropout_seed);
        let xd = self.dropped(&x2, mask_seed)?;
        // u = drop(x)·Aᵀ in f32 (PEFT casts x to the bank's dtype): [tokens, r].
        let u = xd.to_dtype(DType::F32)?.matmul_t(&a, false, true)?;
        let y = linear_forward(
            &x2,
            &self.base,
            self.bias.as_ref(),
            Some(LowRankFwd { u: &u, b: &b }),
            self.algo,
        )?;
        let mut out_shape = x.shape()[..x.rank() - 1].to_vec();
        out_shape.push(self.out_features());
        let y = y.reshape(&out_shape)?;
        Ok((
            y,
            VbLoraContext {
                x: x2,
                u,
                a,
                b,
                in_shape: x.shape().to_vec(),
                out_shape,
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
        if dy.shape() != ctx.out_shape.as_slice() {
            return Err(Error::shape(
                "VbLoraLinear::backward",
                format!(
                    "{}: dy {:?} does not match the output {:?}",
                    self.name,
                    dy.shape(),
                    ctx.out_shape
                ),
            ));
        }
        dy.dtype().expect_float("VbLoraLinear::backward")?;
        let dy2 = self
            .flatten(dy, self.out_features(), "VbLoraLinear::backward")?
            .to_dtype(ctx.x.dtype())?;
        let dy32 = dy2.to_dtype(DType::F32)?;
        // v = dy·B: [tokens, r] (needed by dx and dA).
        let v = dy32.matmul(&ctx.b)?;
        let dx = if need_dx {
            let dx = match ctx.mask_seed {
                // No dropout: one fused K-concatenated product [dy | v]·[W ; A].
                None => {
                    linear_backward_input(&dy2, &self.base, Some(LowRankBwd { v: &v, a: &ctx.a }), self.algo)?
                }
                // Dropout: the adapter term goes back through the same mask.
                Some(seed) => {
                    let base = linear_backward_input(&dy2, &self.base, None, self.algo)?;
                    let adapter = v
                        .matmul(&ctx.a)?
                        .dropout(self.dropout, seed)?
                        .to_dtype(base.dtype())?;
                    base.add(&adapter)?
                }
            };
            Some(dx.reshape(&ctx.in_shape)?)
        } else {
            None
        };
        if !need_params {
            return Ok((dx, None));
        }
        // dB = dyᵀ·u: [out, tokens]·[tokens, r];  dA = vᵀ·drop(x): [r, tokens]·[tokens, in].
        let db = dy32.matmul_t(&ctx.u, true, false)?;
        let xd = self.dropped(&ctx.x, ctx.mask_seed)?.to_dtype(DType::F32)?;
        let da = v.matmul_t(&xd, true, false)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let grads = self
            .layer
            .compose_backward(&f(bank)?, &f(la)?, &f(lb)?, &da, &db)
            .map_err(|e| with_name(&self.name, e))?;
        Ok((dx, Some(grads)))
    }

    /// Records the layer on `tape`: inputs `x`, the bank and both logits (parameter Vars). Every layer
    /// takes its own Var of the shared bank; the tape sums their gradients into the bank's one entry.
    pub fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        dropout_seed: Option<u64>,
    ) -> Result<Var> {
        let bv = tape.param(store, self.bank)?;
        let av = tape.param(store, self.logits_a)?;
        let cv = tape.param(store, self.logits_b)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (a, b) =
            self.layer
                .compose_ab(&f(tape.value(bv)?)?, &f(tape.value(av)?)?, &f(tape.value(cv)?)?)?;
        let (y, ctx) = self.forward_with(a, b, tape.value(x)?, dropout_seed)?;
        let op = VbLoraOp {
            layer: self.clone(),
            ctx,
        };
        tape.record(&[x, bv, av, cv], y, Box::new(op))
    }

    /// Dense `ΔW = B·A` `[out, in]` f32 (for merging).
    pub fn delta_weight(&self, store: &ParamStore) -> Result<Tensor> {
        let (a, b) = self.compose_ab(store)?;
        b.matmul(&a)
    }

    /// `W + B·A` in `dtype` (the base is dequantized first if it is 4-bit).
    pub fn merged_weight(&self, store: &ParamStore, dtype: DType) -> Result<Tensor> {
        let w = self.base.dequantize(DType::F32)?;
        w.add(&self.delta_weight(store)?)?.to_dtype(dtype)
    }
}

fn with_name(name: &str, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{name}: {m}")),
        e => e,
    }
}

/// The tape record of one [`VbLoraLinear`] call.
struct VbLoraOp {
    layer: VbLoraLinear,
    ctx: VbLoraContext,
}

impl Backward for VbLoraOp {
    fn backward(
        &self,
        grad_output: &Tensor,
        inputs: &[&Tensor],
        _output: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let [_, bank, la, lb] = inputs else {
            return Err(Error::invalid(
                "VbLoraOp: expected inputs [x, bank, logits_A, logits_B]",
            ));
        };
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        let need_params = need(1) || need(2) || need(3);
        let (dx, grads) =
            self.layer
                .backward_with(bank, la, lb, &self.ctx, grad_output, need(0), need_params)?;
        let (dla, dlb, dbank) = match grads {
            Some((a, b, k)) => (Some(a), Some(b), Some(k)),
            None => (None, None, None),
        };
        Ok(vec![
            dx,
            dbank.filter(|_| need(1)),
            dla.filter(|_| need(2)),
            dlb.filter(|_| need(3)),
        ])
    }

    fn name(&self) -> &'static str {
        "vblora_linear"
    }
}
