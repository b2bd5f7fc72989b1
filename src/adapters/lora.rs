//! The LoRA / QLoRA linear layer:
//!
//! `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`
//!
//! W (`[out, in]`) is frozen: dense f32/f16/bf16 or 4-bit NF4/FP4 ([`BaseWeight`]). A (`[r, in]`) and
//! B (`[out, r]`) are trainable parameters held in a [`ParamStore`] under their PEFT names
//! (`base_model.model.<module>.lora_A.weight`, `...lora_B.weight`), f32 by default or bf16.
//! `s = alpha / r`, or `alpha / √r` with rsLoRA.
//!
//! The heavy products run in the fused kernels of [`crate::qmatmul`]: the forward pass is one
//! K-concatenated product `[x | u]·[W | B]ᵀ` with `u = s·drop(x)·Aᵀ` (`[tokens, r]`, a skinny GEMM),
//! and the input gradient is `[dy | v]·[W ; A]` with `v = s·dy·B`. The adapter gradients are rank-r
//! GEMMs ordered so that every intermediate stays `[tokens, r]` (as Unsloth does):
//! `dB = dyᵀ·u`, `dA = vᵀ·drop(x)`.
//!
//! Dropout acts only on the adapter branch, with a mask that is a pure function of a seed
//! ([`Tensor::dropout`]), so the backward pass regenerates it instead of storing it.
//!
//! Two ways to use the layer: [`LoraLinear::forward`] / [`LoraLinear::backward`] without a tape (what a
//! host framework such as candle or burn calls from its own autograd), or [`LoraLinear::forward_t`],
//! which records the op on a [`crate::autograd::Tape`].

use super::AdapterLinear;
use super::linear::{Fwd, LinearBase, Shapes, TapeLinear, adapter_linear_common, check_devices};
use crate::autograd::{Grads, ParamId, ParamStore};
use crate::error::{Error, Result};
use crate::io::peft::AdapterMethod;
use crate::qmatmul::{BaseWeight, LowRankBwd, LowRankFwd, linear_backward_input, linear_forward};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// How A and B start (PEFT's `init_lora_weights`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraInit {
    /// `true` (PEFT's default): A ~ kaiming-uniform(a=√5) = U(-1/√in, 1/√in), B = 0. A no-op at start.
    #[default]
    Default,
    /// `"gaussian"`: A ~ N(0, 1/r), B = 0.
    Gaussian,
    /// `false`: A and B both random like a fresh `nn.Linear` (U(-1/√fan_in, 1/√fan_in)); not a no-op.
    /// Meant for tests.
    Random,
}

/// Hyper-parameters of one LoRA layer. Defaults are PEFT's (`r = 8`, `lora_alpha = 8`).
#[derive(Clone, Debug)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub use_rslora: bool,
    /// Dropout probability on the adapter branch, in `[0, 1)`.
    pub dropout: f32,
    pub init: LoraInit,
    /// Dtype of A and B: F32 (PEFT's default after `autocast_adapter_dtype`) or BF16.
    pub dtype: DType,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            init: LoraInit::Default,
            dtype: DType::F32,
        }
    }
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f32 {
        lora_scaling(self.r, self.alpha, self.use_rslora)
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::invalid("LoRA rank r must be at least 1"));
        }
        if !self.alpha.is_finite() {
            return Err(Error::invalid(format!("lora_alpha {} is not finite", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(format!(
                "lora_dropout {} is not in [0, 1)",
                self.dropout
            )));
        }
        if !matches!(self.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::dtype(
                "LoraConfig",
                "f32, bf16 or f16 adapter weights",
                self.dtype,
            ));
        }
        Ok(())
    }
}

/// PEFT's scaling rule.
pub fn lora_scaling(r: usize, alpha: f32, use_rslora: bool) -> f32 {
    if use_rslora {
        alpha / (r as f32).sqrt()
    } else {
        alpha / r as f32
    }
}

/// PEFT's key for a LoRA tensor of `module` (`suffix` is `lora_A.weight` or `lora_B.weight`).
pub fn lora_key(module: &str, suffix: &str) -> String {
    format!("base_model.model.{module}.{suffix}")
}

/// A linear layer with a frozen (possibly 4-bit) base weight and a trainable low-rank update.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    pub(super) lb: LinearBase,
    a: ParamId,
    b: ParamId,
    r: usize,
    scaling: f32,
}

/// What the forward pass keeps for the backward pass: the input and `u = s·drop(x)·Aᵀ` (`[tokens, r]`,
/// f32). The dropped-out input is regenerated from the seed.
#[derive(Clone, Debug)]
pub struct LoraContext {
    x: Tensor,
    u: Tensor,
    shapes: Shapes,
    mask_seed: Option<u64>,
}

/// Gradients of one backward pass. `da`/`db` are f32 (accumulated in f32 whatever the adapter dtype).
#[derive(Clone, Debug)]
pub struct LoraGrads {
    /// `dL/dx` in the dtype of `dy`, shaped like the forward input; `None` when not requested.
    pub dx: Option<Tensor>,
    pub da: Tensor,
    pub db: Tensor,
}

impl LoraLinear {
    /// Creates the layer and registers A and B in `store` under PEFT's names for `name` (the module
    /// path, e.g. `model.layers.0.self_attn.q_proj`). `seed` drives the initialization.
    pub fn new(
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        cfg: &LoraConfig,
        store: &mut ParamStore,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        let (out, inp) = (base.out_features(), base.in_features());
        let dev = base.device();
        let mut rng = Rng::new(seed);
        let kaiming = |rng: &mut Rng, n: usize, fan_in: usize| {
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            rng.uniform_vec(n, -bound, bound)
        };
        let a_data = match cfg.init {
            LoraInit::Default | LoraInit::Random => kaiming(&mut rng, cfg.r * inp, inp),
            LoraInit::Gaussian => {
                let std = 1.0 / cfg.r as f32;
                rng.normal_vec(cfg.r * inp).into_iter().map(|v| v * std).collect()
            }
        };
        let b_data = match cfg.init {
            LoraInit::Random => kaiming(&mut rng, out * cfg.r, cfg.r),
            _ => vec![0.0; out * cfg.r],
        };
        let a = Tensor::from_vec(a_data, &[cfg.r, inp], dev)?.to_dtype(cfg.dtype)?;
        let b = Tensor::from_vec(b_data, &[out, cfg.r], dev)?.to_dtype(cfg.dtype)?;
        let a = store.insert(lora_key(name, "lora_A.weight"), a)?;
        let b = store.insert(lora_key(name, "lora_B.weight"), b)?;
        Self::from_params(name, base, bias, a, b, cfg.scaling(), cfg.dropout, store)
    }

    /// Wraps parameters that already live in `store` (e.g. loaded from a PEFT adapter file).
    #[allow(clippy::too_many_arguments)]
    pub fn from_params(
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        a: ParamId,
        b: ParamId,
        scaling: f32,
        dropout: f32,
        store: &ParamStore,
    ) -> Result<Self> {
        let op = "LoraLinear";
        let (out, inp) = (base.out_features(), base.in_features());
        let (at, bt) = (store.get(a)?, store.get(b)?);
        let r = match (at.shape(), bt.shape()) {
            ([r, i], [o, r2]) if *i == inp && *o == out && r == r2 && *r > 0 => *r,
            (sa, sb) => {
                return Err(Error::shape(
                    op,
                    format!(
                        "{name}: lora_A {sa:?} and lora_B {sb:?} do not fit a [{out}, {inp}] base weight"
                    ),
                ));
            }
        };
        check_devices(op, name, &base, [("lora_A", Some(at)), ("lora_B", Some(bt))])?;
        if !scaling.is_finite() {
            return Err(Error::invalid(format!("{name}: scaling {scaling} is not finite")));
        }
        Ok(LoraLinear {
            lb: LinearBase::new(op, name, base, bias, dropout, "dropout")?,
            a,
            b,
            r,
            scaling,
        })
    }

    /// The parameter id of A (`[r, in]`).
    pub fn a_id(&self) -> ParamId {
        self.a
    }
    /// The parameter id of B (`[out, r]`).
    pub fn b_id(&self) -> ParamId {
        self.b
    }
    /// The rank r.
    pub fn rank(&self) -> usize {
        self.r
    }
    /// The scaling s.
    pub fn scaling(&self) -> f32 {
        self.scaling
    }
    /// The dropout probability of the adapter branch.
    pub fn dropout(&self) -> f32 {
        self.lb.dropout()
    }

    /// The seed of this layer's dropout mask for a step seed (see [`LinearBase::mask_seed`]).
    pub fn mask_seed(&self, step_seed: Option<u64>) -> Option<u64> {
        self.lb.mask_seed(step_seed)
    }

    /// Forward pass. `dropout_seed` is `Some(step seed)` in training (dropout active) and `None` in
    /// evaluation. Returns the output and the context the backward pass needs.
    pub fn forward(
        &self,
        store: &ParamStore,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, LoraContext)> {
        self.forward_with(store.get(self.a)?, store.get(self.b)?, x, dropout_seed)
    }

    fn forward_with(
        &self,
        a: &Tensor,
        b: &Tensor,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, LoraContext)> {
        let (x2, shapes) = self.lb.flatten_input(x, "LoraLinear::forward")?;
        let mask_seed = self.mask_seed(dropout_seed);
        let xd = self.lb.dropped(&x2, mask_seed)?;
        // u = s·drop(x)·Aᵀ in f32: [tokens, r], the only adapter activation we keep.
        let u = xd
            .to_dtype(DType::F32)?
            .matmul_t(&a.to_dtype(DType::F32)?, false, true)?
            .scale(self.scaling)?;
        let b32 = b.to_dtype(DType::F32)?;
        let y = low_rank_forward(&self.lb, &x2, &u, &b32)?.reshape(&shapes.output)?;
        Ok((
            y,
            LoraContext {
                x: x2,
                u,
                shapes,
                mask_seed,
            },
        ))
    }

    /// Backward pass: gradients of A and B (f32) and, when `need_dx`, of the input.
    pub fn backward(
        &self,
        store: &ParamStore,
        ctx: &LoraContext,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<LoraGrads> {
        let (dx, da, db) = self.backward_with(store.get(self.a)?, store.get(self.b)?, ctx, dy, need_dx)?;
        Ok(LoraGrads { dx, da, db })
    }

    fn backward_with(
        &self,
        a: &Tensor,
        b: &Tensor,
        ctx: &LoraContext,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let dy2 = self.lb.flatten_dy(dy, &ctx.shapes, "LoraLinear::backward")?;
        let dy32 = dy2.to_dtype(DType::F32)?;
        let (a32, b32) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        // dB = dyᵀ·u: [out, tokens]·[tokens, r]  (u already carries s).
        let db = dy32.matmul_t(&ctx.u, true, false)?;
        // v = s·dy·B: [tokens, r];  dA = vᵀ·drop(x): [r, tokens]·[tokens, in].
        let v = dy32.matmul(&b32)?.scale(self.scaling)?;
        let xd = self.lb.dropped(&ctx.x, ctx.mask_seed)?.to_dtype(DType::F32)?;
        let da = v.matmul_t(&xd, true, false)?;
        let dx = if need_dx {
            Some(
                low_rank_backward_input(&self.lb, &dy2, &v, &a32, ctx.mask_seed)?
                    .reshape(&ctx.shapes.input)?,
            )
        } else {
            None
        };
        Ok((dx, da, db))
    }

    /// `s·B·A` as a dense f32 `[out, in]` tensor (for merging).
    pub fn delta_weight(&self, store: &ParamStore) -> Result<Tensor> {
        let a = store.get(self.a)?.to_dtype(DType::F32)?;
        let b = store.get(self.b)?.to_dtype(DType::F32)?;
        b.matmul(&a)?.scale(self.scaling)
    }
}

/// `x·Wᵀ + b + u·Bᵀ` as one K-concatenated product `[x | u]·[W | B]ᵀ` (LoRA and VB-LoRA).
pub(crate) fn low_rank_forward(lb: &LinearBase, x2: &Tensor, u: &Tensor, b32: &Tensor) -> Result<Tensor> {
    linear_forward(
        x2,
        lb.base(),
        lb.bias(),
        Some(LowRankFwd { u, b: b32 }),
        lb.algo(),
    )
}

/// The input gradient `dy·W + drop(v·A)` of a low-rank layer (LoRA and VB-LoRA): without dropout one
/// fused K-concatenated product `[dy | v]·[W ; A]`; with dropout the adapter term goes back through the
/// same mask.
pub(crate) fn low_rank_backward_input(
    lb: &LinearBase,
    dy2: &Tensor,
    v: &Tensor,
    a32: &Tensor,
    mask_seed: Option<u64>,
) -> Result<Tensor> {
    match mask_seed {
        None => linear_backward_input(dy2, lb.base(), Some(LowRankBwd { v, a: a32 }), lb.algo()),
        Some(seed) => {
            let base = lb.base_backward_input(dy2)?;
            let adapter = v
                .matmul(a32)?
                .dropout(lb.dropout(), seed)?
                .to_dtype(base.dtype())?;
            base.add(&adapter)
        }
    }
}

impl TapeLinear for LoraLinear {
    type Ctx = LoraContext;
    const OP: &'static str = "lora_linear";

    fn tape_params(&self) -> Vec<ParamId> {
        vec![self.a, self.b]
    }
    fn forward_values(&self, params: &[&Tensor], x: &Tensor, seed: Option<u64>) -> Fwd<LoraContext> {
        let [a, b] = params else {
            return Err(Error::invalid("LoraLinear: expected parameters [A, B]"));
        };
        self.forward_with(a, b, x, seed)
    }
    fn backward_values(&self, params: &[&Tensor], ctx: &LoraContext, dy: &Tensor, needs: &[bool]) -> Grads {
        let [a, b] = params else {
            return Err(Error::invalid("LoraLinear: expected parameters [A, B]"));
        };
        let need_dx = needs.first().copied().unwrap_or(false);
        let (dx, da, db) = self.backward_with(a, b, ctx, dy, need_dx)?;
        Ok(vec![dx, Some(da), Some(db)])
    }
}

impl AdapterLinear for LoraLinear {
    adapter_linear_common!(lb);

    fn method(&self) -> Option<AdapterMethod> {
        Some(AdapterMethod::Lora)
    }
    fn param_ids(&self) -> Vec<ParamId> {
        vec![self.a, self.b]
    }
    /// Elements of A and B.
    fn num_trainable_params(&self) -> usize {
        self.r * (self.in_features() + self.out_features())
    }
    fn delta_weight(&self, store: &ParamStore) -> Result<Tensor> {
        LoraLinear::delta_weight(self, store)
    }
}
