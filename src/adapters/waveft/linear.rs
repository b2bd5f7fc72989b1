//! The WaveFT linear layer with a frozen base: `y = x·Wᵀ + b + x·ΔWᵀ`, `ΔW = scaling·IDWT2(scatter(s))`.
//!
//! W (`[out, in]`) is frozen, dense or 4-bit ([`BaseWeight`]); the base term runs through the fused
//! [`crate::qmatmul`] kernels. The trainable spectrum `s [n_frequency]` lives in a [`ParamStore`] under
//! PEFT's key `base_model.model.<module>.waveft_spectrum`. The adapter term never materializes ΔW: the
//! forward adds `x·ΔWᵀ` into the base output in place (an SpMM over the ≤ 4n nonzeros of the Haar
//! synthesis), and the backward adds `dy·ΔW` into the base input gradient in place while it samples
//! `dyᵀ·x` at the nonzeros for `dspectrum` (see [`super`] for the kernels and their napkin math).
//!
//! Per step and layer, with T tokens: base GEMM `2·T·out·in` FLOPs (×2 in the backward), adapter
//! `2·T·nnz` FLOPs forward and `4·T·nnz` backward, nnz ≤ 4·n_frequency (Haar). At PEFT's defaults
//! (n = 2592, 4096² layer) the adapter is ~0.06% of the base FLOPs, so the layer costs what the frozen
//! base costs; the extra traffic is one read-modify-write of `y` and of `dx` (the in-place adds).
//!
//! PEFT's WaveFT has no dropout (its layer applies none), so neither does this one.

use super::{SPECTRUM_KEY, WaveFtConfig, WaveFtLayer};
use crate::adapters::AdapterLinear;
use crate::adapters::linear::{
    Fwd, LinearBase, Shapes, TapeLinear, adapter_linear_common, check_devices, with_name,
};
use crate::autograd::{Grads, ParamId, ParamStore};
use crate::error::{Error, Result};
use crate::io::peft::AdapterMethod;
use crate::qmatmul::BaseWeight;
use crate::tensor::{DType, Tensor};

/// PEFT's key of `module`'s spectrum: `base_model.model.<module>.waveft_spectrum`.
pub fn spectrum_key(module: &str) -> String {
    format!("base_model.model.{module}.{SPECTRUM_KEY}")
}

/// A linear layer with a frozen (possibly 4-bit) base weight and a trainable WaveFT spectrum.
#[derive(Clone, Debug)]
pub struct WaveFtLinear {
    lb: LinearBase,
    layer: WaveFtLayer,
    spectrum: ParamId,
}

/// What the forward pass keeps: the flattened input (the spectrum is read again from the store / tape).
#[derive(Clone, Debug)]
pub struct WaveFtContext {
    x: Tensor,
    shapes: Shapes,
}

/// Gradients of one backward pass.
#[derive(Clone, Debug)]
pub struct WaveFtGrads {
    /// `dL/dx` in x's dtype and shape (base and adapter terms); `None` when not requested.
    pub dx: Option<Tensor>,
    /// `dL/dspectrum`, f32 `[n_frequency]`.
    pub dspectrum: Tensor,
}

impl WaveFtLinear {
    /// Creates the layer and registers its spectrum in `store` under PEFT's key for `name` (the module
    /// path). `init_weights` is PEFT's flag: `true` (PEFT's default) starts from zeros, an identity
    /// adapter; `false` draws `N(0, 0.01²)` from `seed` (our generator, not torch's). The coefficient
    /// positions are PEFT's (`randperm` from `cfg.random_loc_seed`), so the result is PEFT-loadable.
    pub fn new(
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        cfg: &WaveFtConfig,
        init_weights: bool,
        store: &mut ParamStore,
        seed: u64,
    ) -> Result<Self> {
        base.validate("WaveFtLinear")?;
        let layer = WaveFtLayer::new(base.out_features(), base.in_features(), cfg, base.device())
            .map_err(|e| with_name(name, e))?;
        let spectrum = layer.init_spectrum(init_weights, seed)?;
        let id = store.insert(spectrum_key(name), spectrum)?;
        Self::from_layer(name, base, bias, layer, id, store)
    }

    /// Wraps a spectrum that already lives in `store` (e.g. loaded from a PEFT adapter file); the
    /// positions are rebuilt from `cfg` (whose `n_frequency` must be the spectrum's length).
    pub fn from_params(
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        cfg: &WaveFtConfig,
        spectrum: ParamId,
        store: &ParamStore,
    ) -> Result<Self> {
        base.validate("WaveFtLinear")?;
        let layer = WaveFtLayer::new(base.out_features(), base.in_features(), cfg, base.device())
            .map_err(|e| with_name(name, e))?;
        Self::from_layer(name, base, bias, layer, spectrum, store)
    }

    /// Wraps a prebuilt [`WaveFtLayer`] (e.g. one of [`WaveFtLayer::for_modules`], which resolves
    /// `n_frequency_pattern` / `proportional_parameters`) and a spectrum in `store`.
    pub fn from_layer(
        name: &str,
        base: BaseWeight,
        bias: Option<Tensor>,
        layer: WaveFtLayer,
        spectrum: ParamId,
        store: &ParamStore,
    ) -> Result<Self> {
        let op = "WaveFtLinear";
        base.validate(op)?;
        let (out, inp) = (base.out_features(), base.in_features());
        if (layer.out_features(), layer.in_features()) != (out, inp) {
            return Err(Error::shape(
                op,
                format!(
                    "{name}: WaveFT layer [{}, {}] does not fit a [{out}, {inp}] base weight",
                    layer.out_features(),
                    layer.in_features()
                ),
            ));
        }
        let s = store.get(spectrum)?;
        if s.shape() != [layer.config().n_frequency] {
            return Err(Error::shape(
                op,
                format!(
                    "{name}: spectrum {:?} does not match n_frequency {}",
                    s.shape(),
                    layer.config().n_frequency
                ),
            ));
        }
        s.dtype().expect_float(op)?;
        check_devices(op, name, &base, [("spectrum", Some(s))])?;
        let lb = LinearBase::new(op, name, base, bias, 0.0, "dropout")?;
        let dev = lb.base().device();
        let layer = if layer.positions().device() == dev {
            layer
        } else {
            layer.to_device(dev)?
        };
        Ok(WaveFtLinear { lb, layer, spectrum })
    }

    /// The adapter geometry and structure.
    pub fn layer(&self) -> &WaveFtLayer {
        &self.layer
    }
    /// The WaveFT settings of this layer.
    pub fn config(&self) -> &WaveFtConfig {
        self.layer.config()
    }
    /// The parameter id of the spectrum (`[n_frequency]`).
    pub fn spectrum_id(&self) -> ParamId {
        self.spectrum
    }
    /// Forward pass. `dropout_seed` is accepted for a uniform layer API and ignored: PEFT's WaveFT has
    /// no dropout. Returns the output (x's dtype and leading shape) and the backward context.
    pub fn forward(
        &self,
        store: &ParamStore,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, WaveFtContext)> {
        let _ = dropout_seed;
        self.forward_with(store.get(self.spectrum)?, x)
    }

    fn forward_with(&self, spectrum: &Tensor, x: &Tensor) -> Result<(Tensor, WaveFtContext)> {
        let (x2, shapes) = self.lb.flatten_input(x, "WaveFtLinear::forward")?;
        let s32 = spectrum.to_dtype(DType::F32)?;
        let mut y = self.lb.base_forward(&x2)?;
        self.layer.forward_delta_add(&x2, &s32, &mut y)?;
        let y = y.reshape(&shapes.output)?;
        Ok((y, WaveFtContext { x: x2, shapes }))
    }

    /// Backward pass: `dspectrum` (f32) and, when `need_dx`, the input gradient (base + adapter).
    /// `dy` may have any float dtype; it is brought to the input's dtype.
    pub fn backward(
        &self,
        store: &ParamStore,
        ctx: &WaveFtContext,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<WaveFtGrads> {
        self.backward_with(store.get(self.spectrum)?, ctx, dy, need_dx)
    }

    fn backward_with(
        &self,
        spectrum: &Tensor,
        ctx: &WaveFtContext,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<WaveFtGrads> {
        let what = "WaveFtLinear::backward";
        let dy2 = self.lb.flatten_dy(dy, &ctx.shapes, what)?;
        dy.dtype().expect_float(what)?;
        let dy2 = dy2.to_dtype(ctx.x.dtype())?;
        let s32 = spectrum.to_dtype(DType::F32)?;
        if need_dx {
            // dx = dy·W (fused 4-bit kernel), then += dy·ΔW in place while dspectrum is reduced.
            let mut dx = self.lb.base_backward_input(&dy2)?;
            let ds = self.layer.backward_delta_add_dx(&ctx.x, &dy2, &s32, &mut dx)?;
            Ok(WaveFtGrads {
                dx: Some(dx.reshape(&ctx.shapes.input)?),
                dspectrum: ds,
            })
        } else {
            let (_, ds) = self.layer.backward_delta(&ctx.x, &dy2, &s32, false)?;
            Ok(WaveFtGrads {
                dx: None,
                dspectrum: ds,
            })
        }
    }

    /// Dense ΔW `[out, in]` f32 (for merging).
    pub fn delta_weight(&self, store: &ParamStore) -> Result<Tensor> {
        self.layer
            .delta_weight(&store.get(self.spectrum)?.to_dtype(DType::F32)?)
    }
}

impl TapeLinear for WaveFtLinear {
    type Ctx = WaveFtContext;
    const OP: &'static str = "waveft_linear";

    fn tape_params(&self) -> Vec<ParamId> {
        vec![self.spectrum]
    }
    /// `dropout_seed` is ignored: PEFT's WaveFT has no dropout.
    fn forward_values(&self, params: &[&Tensor], x: &Tensor, _seed: Option<u64>) -> Fwd<WaveFtContext> {
        let [spectrum] = params else {
            return Err(Error::invalid("WaveFtLinear: expected parameters [spectrum]"));
        };
        self.forward_with(spectrum, x)
    }
    fn backward_values(&self, params: &[&Tensor], ctx: &WaveFtContext, dy: &Tensor, needs: &[bool]) -> Grads {
        let [spectrum] = params else {
            return Err(Error::invalid("WaveFtLinear: expected parameters [spectrum]"));
        };
        let need_dx = needs.first().copied().unwrap_or(false);
        let g = self.backward_with(spectrum, ctx, dy, need_dx)?;
        Ok(vec![g.dx, Some(g.dspectrum)])
    }
}

impl AdapterLinear for WaveFtLinear {
    adapter_linear_common!(lb);

    fn method(&self) -> Option<AdapterMethod> {
        Some(AdapterMethod::WaveFt)
    }
    fn param_ids(&self) -> Vec<ParamId> {
        vec![self.spectrum]
    }
    /// The spectrum length.
    fn num_trainable_params(&self) -> usize {
        self.layer.config().n_frequency
    }
    fn delta_weight(&self, store: &ParamStore) -> Result<Tensor> {
        WaveFtLinear::delta_weight(self, store)
    }
}
