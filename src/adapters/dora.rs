//! The DoRA / QDoRA linear layer (weight-decomposed low-rank adaptation, arXiv 2402.09353), with
//! PEFT's semantics:
//!
//! `y = (m / n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`,  `n_i = ‖W_i + s·(B·A)_i‖` (one norm per output row)
//!
//! W (`[out, in]`, dense or 4-bit) is frozen; A (`[r, in]`), B (`[out, r]`) and the magnitude
//! `m [out]` are trainable and live in a [`ParamStore`] under PEFT's names
//! (`base_model.model.<module>.lora_A.weight`, `...lora_B.weight`, `...lora_magnitude_vector`).
//! `m` starts at `n`, so a fresh layer equals LoRA with the same A and B (and, with PEFT's default
//! init B = 0, the base layer).
//!
//! **Dropout** (as PEFT): in training with dropout the DoRA term sees `xd = drop(x)` while the base term
//! keeps the clean x: `y = W·x + b + (g - 1) ⊙ (W·xd) + g ⊙ (s·B·A·xd)` with `g = m / n`. We evaluate it
//! as `y = (W·x + b + lr) + (g - 1) ⊙ z_d` with `z_d = W·xd + lr` and `lr = s·(xd·Aᵀ)·Bᵀ`: two fused
//! products `[x | u]·[W | B]ᵀ` (u = s·xd·Aᵀ) and one elementwise pass. Without dropout it is one fused
//! product and one pass: `y = g ⊙ z + b`. (With dropout the base product runs twice, as in PEFT.)
//!
//! **The norm** never builds `W + s·B·A` (out×in) nor a dequantized W:
//! `n_i² = ‖W_i‖² + 2s·B_i·P_i + s²·B_i·G·B_iᵀ` with `P = W·Aᵀ [out, r]` and `G = A·Aᵀ [r, r]`.
//! `‖W_i‖²` is computed once at creation, decoding W row by row. Each step computes `Pᵀ = A·Wᵀ` through
//! the fused 4-bit GEMV of [`crate::qmatmul`] with the r rows of A as tokens (on CUDA one read of W
//! for r ≤ 16, see `cuda::weight_proj`; on the CPU one read per 16 rows of A, or, in a training step,
//! as r extra rows of the forward product itself, which reads W anyway: see `cpu::fuse_norm_rows`),
//! `G` with a tiny GEMM, and assembles n in one small kernel. The expansion cancels when `B·A ≈ -W/s`
//! on a row, so `n²` is clamped at 0 before the square root; its absolute error is
//! O(ε·(‖W_i‖ + ‖s·B_i·A‖)²) with ε the unit roundoff of the compute precision (tested against the
//! materialized f64 norm).
//!
//! **Zero norms.** PEFT divides by n unguarded (a zero row gives inf/NaN). Here every division uses
//! `max(n, 1e-12)` ([`NORM_EPS`], torch `F.normalize`'s eps): outputs stay finite, and a row that is zero
//! at creation (`W_i + s·B_i·A = 0`, so `m_i = 0`) keeps `g_i = 0` and outputs its bias, like the base.
//!
//! **Precision.** On the CPU every product and the norm are f32 whatever the activation dtype. On CUDA
//! the products follow the activation dtype like the rest of the layer (and like PEFT, which casts W and
//! B·A to x's dtype before the norm): with bf16 activations `Pᵀ = A·Wᵀ` runs on tensor cores with A and
//! the decoded W rounded to bf16 and f32 accumulation, and Pᵀ is rounded to bf16 — a relative error
//! ~2⁻⁸ in the cross term `2s·B_i·P_i`, which is small next to ‖W_i‖² unless the row nearly cancels.
//! A dense bf16/f16 W has to run in its own dtype on CUDA (cuBLAS takes one dtype). The eval cache
//! ([`DoraLinear::cache_eval_scale`]) and merges use the f32 path (a dense half W: its own dtype).
//!
//! **Gradients.** By default the norm is detached (PEFT, DoRA paper §4.3): `dm = Σ_t dy ⊙ z / n`,
//! `dz = dy ⊙ g`, then the LoRA chain on dz (`dB = dzᵀ·u`, `dA = (s·dz·B)ᵀ·xd`,
//! `dx = dz·W + s·(dz·B)·A` in one fused product). dz itself is only materialized for that dx product:
//! the rank-r gradients use `dzᵀ·u = g ⊙_rows (dyᵀ·u)` and `dz·B = dy·(g ⊙_rows B)`, so the only
//! extra pass over `[tokens, out]` data in the backward pass is the one that computes dm.
//! [`DoraOptions::full_norm_gradient`] adds the path through n: with `S = Σ_t dy ⊙ z`,
//! `c = dn / n = -m·S / n³` and `C = c ⊙ B` (rows scaled),
//! `∂L/∂B_i += s·c_i·(P_i + s·(B·G)_i)` and `∂L/∂A += s·(Cᵀ·W + s·(Cᵀ·B)·A)`; `Cᵀ·W` is one more
//! streaming read of W (`[r, in]`, no temporaries). With `need_dx = false` (adapter gradients only) no
//! product with W runs in the backward pass of the detached mode.
//!
//! **Memory.** The context keeps x, `u [tokens, r]` and the pre-scale output `z [tokens, out]` (needed by
//! `dm`), plus n and g; the full-gradient mode also keeps `Pᵀ [r, out]` and `G`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "dora/cuda_stub.rs"]
mod cuda;
mod sparse_drop;

use super::AdapterLinear;
use super::linear::{Fwd, LinearBase, Shapes, TapeLinear, adapter_linear_common, check_merged};
use crate::adapters::lora::{LoraConfig, LoraLinear, lora_key};
use crate::autograd::{Grads, ParamId, ParamStore};
use crate::device::on_device;
use crate::error::{Error, Result};
use crate::io::peft::AdapterMethod;
use crate::qmatmul::{BaseWeight, LowRankBwd, LowRankFwd, linear_backward_input, linear_forward};
use crate::quant::{QuantizeOptions, QuantizedTensor};
use crate::tensor::{DType, Tensor};

/// Norms below this are treated as this value in every division (torch `F.normalize`'s eps).
pub const NORM_EPS: f32 = 1e-12;

/// DoRA-specific settings (the rest is [`LoraConfig`]; `use_dora` is implied).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoraOptions {
    /// Also back-propagate through the norm (the DoRA paper's full gradient). Default false: the norm
    /// is a constant, as in PEFT and the paper's §4.3 (less memory and one W read fewer per step).
    pub full_norm_gradient: bool,
}

/// PEFT's key of the magnitude vector of `module` (no `.weight` suffix in adapter files).
pub fn magnitude_key(module: &str) -> String {
    lora_key(module, "lora_magnitude_vector")
}

/// Where a merged weight goes: dense in a dtype, or re-quantized with the 4-bit base's settings
/// (quant type, blocksize, double quantization), as PEFT does when it merges into a `Linear4bit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeFormat {
    Dense(DType),
    Requantize,
}

/// `m / n` and `n` for evaluation, valid for the parameter values they were computed from.
#[derive(Clone, Debug)]
struct EvalScale {
    n: Tensor,
    g: Tensor,
}

/// A linear layer with a frozen (possibly 4-bit) base weight, a trainable low-rank update and a
/// trainable per-output-row magnitude.
#[derive(Clone, Debug)]
pub struct DoraLinear {
    lora: LoraLinear,
    m: ParamId,
    /// `‖W_i‖²`, f32 `[out]`, computed once (W is frozen).
    w_sq: Tensor,
    opts: DoraOptions,
    eval: Option<EvalScale>,
    merge_norm: Option<Tensor>,
    /// `Wᵀ [in, out]` of a dense f32 W, built by the first training forward pass with dropout that
    /// takes [`sparse_drop`]'s path (W is frozen, so it stays valid; clones share it, as they share W).
    wt: std::sync::Arc<std::sync::OnceLock<Tensor>>,
}

/// What the forward pass keeps for the backward pass.
#[derive(Clone, Debug)]
pub struct DoraContext {
    x: Tensor,
    /// `s·drop(x)·Aᵀ`, f32 `[tokens, r]`.
    u: Tensor,
    /// The term g multiplies: `z = x·Wᵀ + u·Bᵀ` (no dropout) or `z_d = drop(x)·Wᵀ + u·Bᵀ`, x's dtype.
    zc: Tensor,
    n: Tensor,
    g: Tensor,
    /// `(Pᵀ, G)` for the full norm gradient (None when detached or when the eval cache was used); Pᵀ is
    /// in the compute dtype of the product (f32 on the CPU).
    parts: Option<(Tensor, Tensor)>,
    shapes: Shapes,
    mask_seed: Option<u64>,
    /// The dropped positions when the forward pass took [`sparse_drop`]'s path.
    dropped: Option<sparse_drop::Dropped>,
}

impl DoraContext {
    /// The row norms used by this forward pass (f32 `[out]`).
    pub fn norm(&self) -> &Tensor {
        &self.n
    }
    /// The scale `m / n` used by this forward pass (f32 `[out]`).
    pub fn scale(&self) -> &Tensor {
        &self.g
    }
}

/// Gradients of one backward pass; `da`, `db`, `dm` are f32.
#[derive(Clone, Debug)]
pub struct DoraGrads {
    /// `dL/dx` in the forward input's dtype and shape; `None` when not requested.
    pub dx: Option<Tensor>,
    pub da: Tensor,
    pub db: Tensor,
    pub dm: Tensor,
}

/// The inputs of the training forward product (f32 except `xd`, which is in the activation dtype).
struct FwdParts<'a> {
    xd: &'a Tensor,
    base: &'a BaseWeight,
    u: &'a Tensor,
    b32: &'a Tensor,
    a32: &'a Tensor,
    m32: &'a Tensor,
    w_sq: &'a Tensor,
    scaling: f32,
    algo: crate::qmatmul::Algo,
}

/// A forward product with the norm fused in: the product g multiplies, n, g = m / n, Pᵀ and G.
struct Fused {
    zc: Tensor,
    n: Tensor,
    g: Tensor,
    pt: Tensor,
    gram: Tensor,
}

/// Results of the norm computation.
struct NormParts {
    n: Tensor,
    g: Option<Tensor>,
    pt: Tensor,
    gram: Tensor,
}

impl DoraLinear {
    /// Creates the layer: A and B are initialized and registered exactly as [`LoraLinear::new`] does
    /// (same seed, same values), then `m = ‖W + s·B·A‖_row` (f32 path) is registered in the adapter
    /// dtype under [`magnitude_key`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        cfg: &LoraConfig,
        store: &mut ParamStore,
        seed: u64,
        opts: DoraOptions,
    ) -> Result<Self> {
        let key = magnitude_key(name);
        if store.find(&key).is_some() {
            return Err(Error::invalid(format!("duplicate parameter name {key:?}")));
        }
        base.validate("DoraLinear")?;
        // Checked here as well so that a bad bias registers nothing.
        if let Some(t) = &bias
            && (t.shape() != [base.out_features()] || t.device() != base.device())
        {
            return Err(Error::shape(
                "DoraLinear",
                format!(
                    "{name}: bias {:?} on {} is not [{}] on {}",
                    t.shape(),
                    t.device(),
                    base.out_features(),
                    base.device()
                ),
            ));
        }
        let lora = LoraLinear::new(name, base, bias, cfg, store, seed)?;
        let w_sq = on_device!(lora.base().device(), row_sq_norms(lora.base()))?;
        let (a, b) = (store.get(lora.a_id())?, store.get(lora.b_id())?);
        let n = norm_parts(&lora, &w_sq, a, b, None, DType::F32)?.n;
        let m = store.insert(key, n.to_dtype(cfg.dtype)?)?;
        Ok(Self::assemble(lora, m, w_sq, opts))
    }

    /// The layer over a LoRA layer, its magnitude parameter and the base rows' squared norms.
    fn assemble(lora: LoraLinear, m: ParamId, w_sq: Tensor, opts: DoraOptions) -> Self {
        DoraLinear {
            lora,
            m,
            w_sq,
            opts,
            eval: None,
            merge_norm: None,
            wt: Default::default(),
        }
    }

    /// Wraps parameters that already live in `store` (e.g. loaded from a PEFT adapter file).
    #[allow(clippy::too_many_arguments)]
    pub fn from_params(
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        a: ParamId,
        b: ParamId,
        m: ParamId,
        scaling: f32,
        dropout: f32,
        store: &ParamStore,
        opts: DoraOptions,
    ) -> Result<Self> {
        base.validate("DoraLinear")?;
        let lora = LoraLinear::from_params(name, base, bias, a, b, scaling, dropout, store)?;
        let mt = store.get(m)?;
        let out = lora.out_features();
        if mt.shape() != [out] {
            return Err(Error::shape(
                "DoraLinear",
                format!("{name}: lora_magnitude_vector {:?} is not [{out}]", mt.shape()),
            ));
        }
        mt.dtype().expect_float("DoraLinear")?;
        if mt.device() != lora.base().device() {
            return Err(Error::device(
                "DoraLinear",
                format!("{name}: magnitude and base weight on different devices"),
            ));
        }
        let w_sq = on_device!(lora.base().device(), row_sq_norms(lora.base()))?;
        Ok(Self::assemble(lora, m, w_sq, opts))
    }

    /// The LoRA part (base weight, A, B, scaling, dropout).
    pub fn lora(&self) -> &LoraLinear {
        &self.lora
    }
    /// The parameter id of A (`[r, in]`).
    pub fn a_id(&self) -> ParamId {
        self.lora.a_id()
    }
    /// The parameter id of B (`[out, r]`).
    pub fn b_id(&self) -> ParamId {
        self.lora.b_id()
    }
    /// The parameter id of the magnitude m (`[out]`).
    pub fn m_id(&self) -> ParamId {
        self.m
    }
    /// The rank r.
    pub fn rank(&self) -> usize {
        self.lora.rank()
    }
    /// The scaling s.
    pub fn scaling(&self) -> f32 {
        self.lora.scaling()
    }
    /// The dropout probability of the adapter branch.
    pub fn dropout(&self) -> f32 {
        self.lora.dropout()
    }
    /// The DoRA options.
    pub fn options(&self) -> DoraOptions {
        self.opts
    }
    /// Switches the full norm gradient on or off.
    pub fn set_full_norm_gradient(&mut self, on: bool) {
        self.opts.full_norm_gradient = on;
    }
    /// `‖W_i‖²` of the frozen base weight (f32 `[out]`).
    pub fn base_row_sq_norms(&self) -> &Tensor {
        &self.w_sq
    }
    /// The seed of this layer's dropout mask for a step seed (see [`LoraLinear::mask_seed`]).
    pub fn mask_seed(&self, step_seed: Option<u64>) -> Option<u64> {
        self.lora.mask_seed(step_seed)
    }

    /// `n = ‖W + s·B·A‖_row` (f32 `[out]`) for the current A and B, computed in f32.
    pub fn weight_norm(&self, store: &ParamStore) -> Result<Tensor> {
        self.weight_norm_in(store, DType::F32)
    }

    /// [`DoraLinear::weight_norm`] with the product `A·Wᵀ` in `compute` precision on CUDA, as a
    /// training step with activations of that dtype computes it (the CPU always uses f32).
    pub fn weight_norm_in(&self, store: &ParamStore, compute: DType) -> Result<Tensor> {
        compute.expect_float("DoraLinear::weight_norm_in")?;
        let (a, b) = (store.get(self.a_id())?, store.get(self.b_id())?);
        Ok(norm_parts(&self.lora, &self.w_sq, a, b, None, compute)?.n)
    }

    /// Computes `m / n` once (f32 path) and uses it in every forward pass with `dropout_seed = None`
    /// (evaluation), skipping the per-call norm, like PEFT's `DoraCaching`. The cache is not tied to
    /// the parameter values: call it again (or [`DoraLinear::clear_eval_cache`]) after A, B or m change.
    pub fn cache_eval_scale(&mut self, store: &ParamStore) -> Result<()> {
        self.eval = Some(self.eval_scale_f32(store)?);
        Ok(())
    }

    /// `n` and `g = m / n` of the current parameters, f32 path.
    fn eval_scale_f32(&self, store: &ParamStore) -> Result<EvalScale> {
        let (a, b, m) = (
            store.get(self.a_id())?,
            store.get(self.b_id())?,
            store.get(self.m)?,
        );
        let p = norm_parts(&self.lora, &self.w_sq, a, b, Some(m), DType::F32)?;
        let g =
            p.g.ok_or_else(|| Error::invalid("internal: norm without scale"))?;
        Ok(EvalScale { n: p.n, g })
    }

    /// Drops the evaluation cache (training always recomputes the norm).
    pub fn clear_eval_cache(&mut self) {
        self.eval = None;
    }

    /// The cached evaluation scale `m / n`, if any.
    pub fn eval_scale(&self) -> Option<&Tensor> {
        self.eval.as_ref().map(|e| &e.g)
    }

    fn lb(&self) -> &LinearBase {
        &self.lora.lb
    }

    /// `Wᵀ` of the dense base weight (built once; only called on [`sparse_drop`]'s path).
    fn base_t(&self) -> Result<&Tensor> {
        if let Some(t) = self.wt.get() {
            return Ok(t);
        }
        let BaseWeight::Dense(w) = self.base() else {
            return Err(Error::invalid("internal: transposed copy of a quantized weight"));
        };
        // A concurrent caller may have set it meanwhile: both computed the same bits.
        let _ = self.wt.set(w.t()?);
        self.wt
            .get()
            .ok_or_else(|| Error::invalid("internal: transposed weight not set"))
    }

    /// Forward pass. `dropout_seed` is `Some(step seed)` in training and `None` in evaluation (where the
    /// eval cache, if set, replaces the norm). Returns the output and the backward context.
    pub fn forward(
        &self,
        store: &ParamStore,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, DoraContext)> {
        let (a, b, m) = (
            store.get(self.a_id())?,
            store.get(self.b_id())?,
            store.get(self.m)?,
        );
        self.forward_with(a, b, m, x, dropout_seed)
    }

    fn forward_with(
        &self,
        a: &Tensor,
        b: &Tensor,
        m: &Tensor,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, DoraContext)> {
        let (x2, shapes) = self.lb().flatten_input(x, "DoraLinear::forward")?;
        if x2.device() != self.base().device() {
            return Err(Error::device(
                "DoraLinear::forward",
                format!(
                    "{}: input on {}, layer on {}",
                    self.name(),
                    x2.device(),
                    self.base().device()
                ),
            ));
        }
        let mask_seed = self.mask_seed(dropout_seed);
        let cached = match (&self.eval, dropout_seed) {
            (Some(c), None) => Some(c.clone()),
            _ => None,
        };
        let dev = x2.device();
        let (a32, b32) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        // With dropout on a dense f32 W (CPU), `sparse_drop` replaces the clean product by a sparse one.
        let (xd, dropped) = match mask_seed {
            Some(seed) if sparse_drop::applicable(self.base(), &x2, self.dropout()) => {
                let (xd, d) = sparse_drop::split(&x2, self.dropout(), seed)?;
                (xd, Some(d))
            }
            _ => (self.lb().dropped(&x2, mask_seed)?, None),
        };
        // u = s·drop(x)·Aᵀ in f32: [tokens, r].
        let u = xd
            .to_dtype(DType::F32)?
            .matmul_t(&a32, false, true)?
            .scale(self.scaling())?;
        let lr = Some(LowRankFwd { u: &u, b: &b32 });
        // The product g multiplies: [x_c | u]·[W | B]ᵀ (x_c = x, or drop(x) with dropout). Where the
        // backend fuses the norm into that product (`cpu::fused_forward`), it returns the norm as well.
        let fused = match cached {
            Some(_) => None,
            None => {
                let m32 = m.to_dtype(DType::F32)?;
                let parts = FwdParts {
                    xd: &xd,
                    base: self.base(),
                    u: &u,
                    b32: &b32,
                    a32: &a32,
                    m32: &m32,
                    w_sq: &self.w_sq,
                    scaling: self.scaling(),
                    algo: self.lb().algo(),
                };
                cpu::fused_forward(&parts)?
            }
        };
        let full = self.opts.full_norm_gradient;
        let (zc, n, g, parts) = match (cached, fused) {
            (_, Some(f)) => (f.zc, f.n, f.g, full.then_some((f.pt, f.gram))),
            (cached, None) => {
                let zc = linear_forward(&xd, self.base(), None, lr, self.lb().algo())?;
                match cached {
                    Some(c) => (zc, c.n, c.g, None),
                    None => {
                        let p = norm_parts(&self.lora, &self.w_sq, a, b, Some(m), x2.dtype())?;
                        let g =
                            p.g.ok_or_else(|| Error::invalid("internal: norm without scale"))?;
                        (zc, p.n, g, full.then_some((p.pt, p.gram)))
                    }
                }
            }
        };
        let tokens = x2.dims()[0];
        let y = match mask_seed {
            // y = g ⊙ z + b (z: the first `tokens` rows of zc).
            None => {
                let bias32 = self.bias().map(|t| t.to_dtype(DType::F32)).transpose()?;
                on_device!(dev, scale_cols(&zc, tokens, &g, bias32.as_ref(), None))?
            }
            // (g - p) ⊙ z_d + p·lr + b + x_D·Wᵀ (see `sparse_drop`).
            Some(_) if dropped.is_some() => {
                let d = dropped
                    .as_ref()
                    .ok_or_else(|| Error::invalid("internal: no dropout mask"))?;
                let bias32 = self.bias().map(|t| t.to_dtype(DType::F32)).transpose()?;
                let o = sparse_drop::Output {
                    zc: &zc,
                    x: &x2,
                    wt: self.base_t()?,
                    u: &u,
                    b: &b32,
                    g: &g,
                    bias: bias32.as_ref(),
                    p: self.dropout(),
                };
                sparse_drop::output(&o, d)?
            }
            // (W·x + b + lr) + (g - 1) ⊙ (W·xd + lr).
            Some(_) => {
                let clean = linear_forward(&x2, self.base(), self.bias(), lr, self.lb().algo())?;
                let gm1 = g.affine(1.0, -1.0)?;
                on_device!(dev, scale_cols(&zc, tokens, &gm1, None, Some(&clean)))?
            }
        };
        let y = y.reshape(&shapes.output)?;
        let ctx = DoraContext {
            x: x2,
            u,
            zc,
            n,
            g,
            parts,
            shapes,
            mask_seed,
            dropped,
        };
        Ok((y, ctx))
    }

    /// Backward pass: gradients of A, B and m (f32) and, when `need_dx`, of the input. `dy` is converted
    /// to the forward input's dtype if it differs.
    pub fn backward(
        &self,
        store: &ParamStore,
        ctx: &DoraContext,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<DoraGrads> {
        let (a, b) = (store.get(self.a_id())?, store.get(self.b_id())?);
        let (dx, da, db, dm) = self.backward_with(a, b, ctx, dy, need_dx)?;
        Ok(DoraGrads { dx, da, db, dm })
    }

    #[allow(clippy::type_complexity)]
    fn backward_with(
        &self,
        a: &Tensor,
        b: &Tensor,
        ctx: &DoraContext,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor, Tensor)> {
        let what = "DoraLinear::backward";
        let dy2 = self.lb().flatten_dy(dy, &ctx.shapes, what)?;
        if dy.device() != ctx.zc.device() {
            return Err(Error::device(
                "DoraLinear::backward",
                format!(
                    "{}: dy on {}, layer on {}",
                    self.name(),
                    dy.device(),
                    ctx.zc.device()
                ),
            ));
        }
        let dev = ctx.zc.device();
        let s = self.scaling();
        let dy2 = dy2.to_dtype(ctx.zc.dtype())?;
        let (a32, b32) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        // dm = Σ_t dy ⊙ z / n in one pass over dy and z. dz = dy ⊙ g is materialized (in the same pass)
        // only for the fused dx product; the rank-r gradients scale [out, r] matrices by g instead:
        // dB = g ⊙_rows (dyᵀ·u), v = s·dz·B = s·dy·(g ⊙_rows B).
        let fused_dx = need_dx && ctx.mask_seed.is_none();
        let dz_dtype = fused_dx.then_some(dy2.dtype());
        let (dm, dz) = on_device!(dev, colsum(&dy2, &ctx.zc, &ctx.g, &ctx.n, dz_dtype))?;
        let dy32 = dy2.to_dtype(DType::F32)?;
        // dB = g ⊙ (dyᵀ·u): [out, tokens]·[tokens, r]  (u already carries s).
        let mut db = on_device!(dev, scale_rows(&dy32.matmul_t(&ctx.u, true, false)?, &ctx.g))?;
        // v = s·dy·(g ⊙ B): [tokens, r];  dA = vᵀ·drop(x): [r, tokens]·[tokens, in].
        let gb = on_device!(dev, scale_rows(&b32, &ctx.g))?;
        let v = dy32.matmul(&gb)?.scale(s)?;
        let xd32 = match &ctx.dropped {
            Some(d) => sparse_drop::redrop(&ctx.x, self.dropout(), d)?,
            None => self.lb().dropped(&ctx.x, ctx.mask_seed)?.to_dtype(DType::F32)?,
        };
        let mut da = v.matmul_t(&xd32, true, false)?;
        let dx = if need_dx {
            let dx = match ctx.mask_seed {
                // dx = dz·W + v·A: one fused K-concatenated product.
                None => {
                    let dz = dz.ok_or_else(|| Error::invalid("internal: colsum without dz"))?;
                    linear_backward_input(
                        &dz,
                        self.base(),
                        Some(LowRankBwd { v: &v, a: &a32 }),
                        self.lb().algo(),
                    )?
                }
                // Kept positions: (dy ⊙ (1 + q·(g - 1)))·W + q·v·A in one fused product; dropped
                // ones: the clean dy·W (see `sparse_drop`).
                Some(_) if ctx.dropped.is_some() => {
                    let d = ctx
                        .dropped
                        .as_ref()
                        .ok_or_else(|| Error::invalid("internal: no dropout mask"))?;
                    let q = 1.0 / (1.0 - self.dropout());
                    let c = ctx.g.affine(q, 1.0 - q)?;
                    let dyc = on_device!(dev, scale_cols(&dy2, dy2.dims()[0], &c, None, None))?;
                    let vq = v.scale(q)?;
                    let mut dx = linear_backward_input(
                        &dyc,
                        self.base(),
                        Some(LowRankBwd { v: &vq, a: &a32 }),
                        self.lb().algo(),
                    )?;
                    sparse_drop::fix_dx(&mut dx, &dy2, self.base_t()?, d)?;
                    dx
                }
                // dx = dy·W + drop((dy ⊙ (g - 1))·W + v·A).
                Some(seed) => {
                    let clean = linear_backward_input(&dy2, self.base(), None, self.lb().algo())?;
                    let gm1 = ctx.g.affine(1.0, -1.0)?;
                    let dyg = on_device!(dev, scale_cols(&dy2, dy2.dims()[0], &gm1, None, None))?;
                    let adapter = linear_backward_input(
                        &dyg,
                        self.base(),
                        Some(LowRankBwd { v: &v, a: &a32 }),
                        self.lb().algo(),
                    )?
                    .dropout(self.dropout(), seed)?;
                    clean.add(&adapter)?
                }
            };
            Some(dx.reshape(&ctx.shapes.input)?)
        } else {
            None
        };
        if self.opts.full_norm_gradient {
            let computed;
            let (pt, gram) = match &ctx.parts {
                Some((pt, gram)) => (pt, gram),
                None => {
                    let p = norm_parts(&self.lora, &self.w_sq, a, b, None, DType::F32)?;
                    computed = (p.pt, p.gram);
                    (&computed.0, &computed.1)
                }
            };
            // Pᵀ is in the compute dtype of the forward pass (bf16 on CUDA with bf16 activations).
            let pt32 = pt.to_dtype(DType::F32)?;
            let (dbx, ct) = on_device!(dev, full_norm_grad(&dm, &ctx.g, &ctx.n, &b32, &pt32, gram, s))?;
            db.add_scaled_(&dbx, 1.0)?;
            // ∂L/∂A += s·(Cᵀ·W + s·(Cᵀ·B)·A).
            let mut extra = on_device!(dev, weight_tproj(self.base(), &ct))?;
            let ctb_a = ct.matmul(&b32)?.matmul(&a32)?;
            extra.add_scaled_(&ctb_a, s)?;
            da.add_scaled_(&extra, s)?;
        }
        Ok((dx, da, db, dm))
    }

    /// The merged weight `W' = (m / n) ⊙ (W + s·B·A)` (rows scaled), as PEFT's `merge_and_unload`
    /// computes it: dense in a dtype, or re-quantized with the 4-bit base's settings. The norm of this
    /// merge is cached for [`DoraLinear::unmerge`] (PEFT caches it the same way: unmerging needs the norm
    /// of the unmerged weight). The layer itself is unchanged.
    pub fn merge(&mut self, store: &ParamStore, format: MergeFormat) -> Result<BaseWeight> {
        let (merged, n) = self.merged_f32(store)?;
        let out = match (format, self.base()) {
            (MergeFormat::Dense(dt), _) => {
                dt.expect_float("DoraLinear::merge")?;
                BaseWeight::Dense(merged.to_dtype(dt)?)
            }
            (MergeFormat::Requantize, BaseWeight::Quantized(q)) => {
                let opts = QuantizeOptions {
                    quant_type: q.state.quant_type,
                    blocksize: q.state.blocksize,
                    double_quant: q.state.is_double(),
                    allow_non_finite: false,
                    name: self.name().to_string(),
                };
                let mut q2 = QuantizedTensor::quantize(&merged, &opts)?;
                q2.state.dtype = q.state.dtype;
                BaseWeight::Quantized(q2)
            }
            (MergeFormat::Requantize, BaseWeight::KBit(k)) => {
                let opts = QuantizeOptions {
                    blocksize: k.blocksize,
                    double_quant: matches!(k.absmax, Some(crate::quant::Absmax::Double { .. })),
                    name: self.name().to_string(),
                    ..Default::default()
                };
                let mut k2 = crate::kbit::KBitTensor::quantize(&merged, k.bits, &opts)?;
                k2.dtype = k.dtype;
                BaseWeight::KBit(k2)
            }
            (MergeFormat::Requantize, BaseWeight::Dense(_)) => {
                return Err(Error::invalid(format!(
                    "{}: cannot re-quantize the merge of a dense base weight",
                    self.name()
                )));
            }
        };
        self.merge_norm = Some(n);
        Ok(out)
    }

    /// `(m / n) ⊙ (W + s·B·A)` (f32 `[out, in]`) and the norm n it used.
    fn merged_f32(&self, store: &ParamStore) -> Result<(Tensor, Tensor)> {
        let EvalScale { n, g } = self.eval_scale_f32(store)?;
        let w = self.base().dequantize(DType::F32)?;
        let delta = self.lora.delta_weight(store)?;
        let merged = on_device!(w.device(), merge_rows(&w, &delta, &g, false))?;
        Ok((merged, n))
    }

    /// The norm cached by the last [`DoraLinear::merge`].
    pub fn merge_norm(&self) -> Option<&Tensor> {
        self.merge_norm.as_ref()
    }

    /// Undoes a merge: `W = W' / (m / n) - s·B·A` with the norm cached by [`DoraLinear::merge`] and the
    /// current m, A and B (dense f32 `[out, in]`). Exact up to rounding for a dense merge; a re-quantized
    /// merge carries its quantization error.
    pub fn unmerge(&self, store: &ParamStore, merged: &BaseWeight) -> Result<Tensor> {
        let n = self
            .merge_norm
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{}: unmerge without a previous merge", self.name())))?;
        self.unmerge_with(store, merged, n)
    }

    fn unmerge_with(&self, store: &ParamStore, merged: &BaseWeight, n: &Tensor) -> Result<Tensor> {
        check_merged(self.lb(), merged)?;
        let m32 = store.get(self.m)?.to_dtype(DType::F32)?;
        let dev = m32.device();
        let g = on_device!(dev, scale_of(&m32, n))?;
        let w = merged.dequantize(DType::F32)?;
        let delta = self.lora.delta_weight(store)?;
        on_device!(dev, merge_rows(&w, &delta, &g, true))
    }
}

/// `n` (and `g = m / n` with m) of `lora`'s current A and B. `dtype` is the compute precision of the
/// product with W on CUDA (the activation dtype); the CPU always uses f32.
fn norm_parts(
    lora: &LoraLinear,
    w_sq: &Tensor,
    a: &Tensor,
    b: &Tensor,
    m: Option<&Tensor>,
    dtype: DType,
) -> Result<NormParts> {
    let base = lora.base();
    let dev = base.device();
    let (a32, b32) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let m32 = m.map(|m| m.to_dtype(DType::F32)).transpose()?;
    let (n, g, pt, gram) = on_device!(
        dev,
        norm(base, w_sq, &a32, &b32, m32.as_ref(), lora.scaling(), dtype)
    )?;
    Ok(NormParts { n, g, pt, gram })
}

impl TapeLinear for DoraLinear {
    type Ctx = DoraContext;
    const OP: &'static str = "dora_linear";

    fn tape_params(&self) -> Vec<ParamId> {
        vec![self.a_id(), self.b_id(), self.m]
    }
    fn forward_values(&self, params: &[&Tensor], x: &Tensor, seed: Option<u64>) -> Fwd<DoraContext> {
        let [a, b, m] = params else {
            return Err(Error::invalid("DoraLinear: expected parameters [A, B, m]"));
        };
        self.forward_with(a, b, m, x, seed)
    }
    fn backward_values(&self, params: &[&Tensor], ctx: &DoraContext, dy: &Tensor, needs: &[bool]) -> Grads {
        let [a, b, _] = params else {
            return Err(Error::invalid("DoraLinear: expected parameters [A, B, m]"));
        };
        let need_dx = needs.first().copied().unwrap_or(false);
        let (dx, da, db, dm) = self.backward_with(a, b, ctx, dy, need_dx)?;
        Ok(vec![dx, Some(da), Some(db), Some(dm)])
    }
}

impl AdapterLinear for DoraLinear {
    adapter_linear_common!(lora.lb);

    fn method(&self) -> Option<AdapterMethod> {
        Some(AdapterMethod::Dora)
    }
    fn param_ids(&self) -> Vec<ParamId> {
        vec![self.a_id(), self.b_id(), self.m]
    }
    /// Elements of A, B and m.
    fn num_trainable_params(&self) -> usize {
        self.lora.num_trainable_params() + self.out_features()
    }
    /// DoRA's update is multiplicative: `ΔW = (m / n) ⊙ (W + s·B·A) - W`.
    fn delta_weight(&self, store: &ParamStore) -> Result<Tensor> {
        self.merged_f32(store)?
            .0
            .sub(&self.base().dequantize(DType::F32)?)
    }
    /// [`DoraLinear::merge`]'s dense f32 merge, cast once to `dtype`.
    fn merged_weight(&self, store: &ParamStore, dtype: DType) -> Result<Tensor> {
        dtype.expect_float("DoraLinear::merged_weight")?;
        self.merged_f32(store)?.0.to_dtype(dtype)
    }
    /// [`DoraLinear::unmerge`] with the norm of the last [`DoraLinear::merge`], or else the norm a merge
    /// of the current parameters uses.
    fn unmerged_weight(&self, store: &ParamStore, merged: &BaseWeight) -> Result<Tensor> {
        match &self.merge_norm {
            Some(n) => self.unmerge_with(store, merged, n),
            None => self.unmerge_with(store, merged, &self.merged_f32(store)?.1),
        }
    }
}
