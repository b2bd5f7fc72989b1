//! Optimizers. [`AdamW`] with exactly the semantics of `torch.optim.AdamW` (decoupled weight decay,
//! bias-corrected moments, per-parameter step counts), with f32 moments on each parameter's device,
//! a fused CUDA kernel per parameter tensor (`kernels/optim.cu`) and a vectorized multithreaded CPU
//! loop (`cpu.rs`).
//!
//! ```
//! use peft_kernels::autograd::{ParamStore, Tape};
//! use peft_kernels::optim::{AdamW, AdamWConfig};
//! use peft_kernels::{DType, Device, Tensor};
//! let mut store = ParamStore::new();
//! let w = store.insert("w", Tensor::randn(&[8], 1.0, 0, DType::F32, Device::Cpu)?)?;
//! let target = Tensor::zeros(&[8], DType::F32, Device::Cpu)?;
//! let mut opt = AdamW::new(AdamWConfig { lr: 0.1, ..Default::default() })?;
//! for _ in 0..100 {
//!     let mut tape = Tape::new();
//!     let x = tape.param(&store, w)?;
//!     let loss = tape.mse_loss(x, &target)?;
//!     let grads = tape.backward(loss)?;
//!     drop(tape); // the parameter is no longer shared: the step updates it in place
//!     opt.step(&mut store, &grads)?;
//! }
//! assert!(store.get(w)?.to_vec::<f32>()?.iter().all(|x| x.abs() < 0.1));
//! # Ok::<(), peft_kernels::Error>(())
//! ```

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod eightbit;
// Only the CUDA launchers build descriptors; the placement rule and the tests are used everywhere.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod multi;
#[cfg(feature = "cuda")]
mod offload;
pub mod schedule;
mod state;
mod train;

pub use schedule::{Schedule, ScheduleKind};
pub use train::{META_FILE, OptimConfig, OptimKind, Optimizer, Resume, STATE_FILE, StateTensors, StepReport};

use crate::autograd::{Gradients, ParamId, ParamStore};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use half::{bf16, f16};
use std::collections::BTreeMap;

/// Hyperparameters of [`AdamW`]. `Default` is `torch.optim.AdamW`'s: lr 1e-3, betas (0.9, 0.999),
/// eps 1e-8, weight decay 0.01.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (>= 0).
    pub lr: f32,
    /// First-moment decay, in [0, 1).
    pub beta1: f32,
    /// Second-moment decay, in [0, 1).
    pub beta2: f32,
    /// Added to the denominator (>= 0).
    pub eps: f32,
    /// Decoupled weight decay (>= 0): each step multiplies the parameter by `1 - lr·weight_decay`.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges torch checks (all values must also be finite).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f32, range: &str| {
            Err(Error::invalid(format!("AdamW: {what} must be {range}, got {v}")))
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr, "finite and >= 0");
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", self.beta1, "in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", self.beta2, "in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", self.eps, "finite and >= 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "finite and >= 0");
        }
        Ok(())
    }
}

/// The per-step scalars, computed in f64 on the host (as torch does in Python) and passed as f32.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWScalars {
    /// `1 - lr·wd`
    pub decay: f32,
    /// `1 - β1` (torch's lerp weight)
    pub w1: f32,
    pub beta2: f32,
    /// `1 - β2`
    pub w2: f32,
    /// `-lr / (1 - β1^t)`
    pub neg_step: f32,
    /// `sqrt(1 - β2^t)`
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamWScalars {
    pub(crate) fn new(cfg: &AdamWConfig, step: u64) -> Self {
        let (lr, b1, b2) = (cfg.lr as f64, cfg.beta1 as f64, cfg.beta2 as f64);
        // β^t with an integer exponent; t beyond i32 saturates (β^t is 0 long before).
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        AdamWScalars {
            decay: (1.0 - lr * cfg.weight_decay as f64) as f32,
            w1: (1.0 - b1) as f32,
            beta2: cfg.beta2,
            w2: (1.0 - b2) as f32,
            neg_step: (-(lr / bc1)) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: cfg.eps,
        }
    }
}

/// The per-step scalars of bitsandbytes' Adam kernels (csrc/kernels.cu, `kOptimizer32bit2State` and
/// `kOptimizerStatic8bit2StateBlockwise`), in f32 as the kernels compute them; only the powers `β^t` are
/// taken in f64 and rounded once (the kernels' `powf`/`__powf`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BnbScalars {
    pub beta1: f32,
    /// `1 - β1`
    pub w1: f32,
    pub beta2: f32,
    /// `1 - β2`
    pub w2: f32,
    /// `-lr·c2 / c1` with `c1 = 1 - β1^t`, `c2 = sqrt(1 - β2^t)`
    pub step_size: f32,
    /// `c2·eps`
    pub eps_c2: f32,
    /// `1 - lr·wd`
    pub decay: f32,
    /// `wd > 0` (the kernels skip the multiply otherwise)
    pub weight_decay: bool,
}

impl BnbScalars {
    pub(crate) fn new(cfg: &AdamWConfig, step: u64) -> Self {
        let t = step.min(i32::MAX as u64) as f64;
        let (b1, b2, lr) = (cfg.beta1, cfg.beta2, cfg.lr);
        let c1 = 1.0f32 - (b1 as f64).powf(t) as f32;
        let c2 = (1.0f32 - (b2 as f64).powf(t) as f32).sqrt();
        BnbScalars {
            beta1: b1,
            w1: 1.0 - b1,
            beta2: b2,
            w2: 1.0 - b2,
            step_size: (-lr * c2) / c1,
            eps_c2: c2 * cfg.eps,
            decay: 1.0 - lr * cfg.weight_decay,
            weight_decay: cfg.weight_decay > 0.0,
        }
    }
}

/// The optimizer state of one parameter.
struct State {
    m: Tensor,
    v: Tensor,
    step: u64,
}

/// AdamW (`torch.optim.AdamW`, amsgrad off). State: f32 first and second moments per trainable
/// parameter that has received a gradient, on that parameter's device, plus a per-parameter step
/// count (a parameter without a gradient in some step is skipped, like torch). f16/bf16 parameters
/// are updated in f32 and rounded once per step.
pub struct AdamW {
    cfg: AdamWConfig,
    state: BTreeMap<ParamId, State>,
    steps: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("cfg", &self.cfg)
            .field("params", &self.state.len())
            .field("steps", &self.steps)
            .finish()
    }
}

impl AdamW {
    /// A fresh optimizer; errors on out-of-range hyperparameters.
    pub fn new(cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(AdamW {
            cfg,
            state: BTreeMap::new(),
            steps: 0,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Sets the learning rate for the next steps (for schedules). A negative or non-finite value
    /// makes the next [`AdamW::step`] fail without touching anything.
    pub fn set_lr(&mut self, lr: f32) {
        self.cfg.lr = lr;
    }

    /// The current learning rate.
    pub fn lr(&self) -> f32 {
        self.cfg.lr
    }

    /// Number of [`AdamW::step`] calls that succeeded.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Bytes of optimizer state (8 per element of every parameter that has state).
    pub fn state_bytes(&self) -> usize {
        self.state
            .values()
            .map(|s| s.m.size_in_bytes() + s.v.size_in_bytes())
            .sum()
    }

    /// The moments `(m, v)` and step count of `id`, once it has been updated.
    pub fn state(&self, id: ParamId) -> Option<(&Tensor, &Tensor, u64)> {
        self.state.get(&id).map(|s| (&s.m, &s.v, s.step))
    }

    /// One AdamW step over every parameter in `grads`. Everything is validated before anything is
    /// updated: an error (unknown or frozen parameter, shape/device mismatch, bad learning rate)
    /// leaves the parameters and the state untouched.
    pub fn step(&mut self, store: &mut ParamStore, grads: &Gradients) -> Result<()> {
        self.cfg.validate()?;
        for (id, g) in grads.iter() {
            train::check_grad(store, id, g)?;
        }
        // Moments for new parameters, and moments moved after `ParamStore::to_device`, are prepared
        // before the first update so that an allocation failure also leaves everything untouched.
        let mut fresh: Vec<(ParamId, State)> = Vec::new();
        for (id, _) in grads.iter() {
            let p = store.get(id)?;
            match self.state.get(&id) {
                Some(s) if s.m.device() == p.device() && s.m.shape() == p.shape() => {}
                Some(s) if s.m.shape() == p.shape() => fresh.push((
                    id,
                    State {
                        m: s.m.to_device(p.device())?,
                        v: s.v.to_device(p.device())?,
                        step: s.step,
                    },
                )),
                _ => fresh.push((
                    id,
                    State {
                        m: Tensor::zeros(p.shape(), DType::F32, p.device())?,
                        v: Tensor::zeros(p.shape(), DType::F32, p.device())?,
                        step: 0,
                    },
                )),
            }
        }
        self.state.extend(fresh);
        for (id, g) in grads.iter() {
            let st = self
                .state
                .get_mut(&id)
                .ok_or_else(|| Error::invalid("AdamW: missing state"))?;
            st.step += 1;
            let s = AdamWScalars::new(&self.cfg, st.step);
            update(store.get_mut(id)?, g, &mut st.m, &mut st.v, &s)?;
        }
        self.steps += 1;
        Ok(())
    }
}

/// One fused update of a parameter tensor on its device.
pub(crate) fn update(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    s: &AdamWScalars,
) -> Result<()> {
    match p.device() {
        Device::Cpu => {
            let g = g.cpu_data::<f32>("AdamW")?;
            let m = m.cpu_data_mut::<f32>("AdamW")?;
            let v = v.cpu_data_mut::<f32>("AdamW")?;
            match p.dtype() {
                DType::F32 => cpu::adamw(p.cpu_data_mut::<f32>("AdamW")?, g, m, v, s),
                DType::F16 => cpu::adamw(p.cpu_data_mut::<f16>("AdamW")?, g, m, v, s),
                DType::BF16 => cpu::adamw(p.cpu_data_mut::<bf16>("AdamW")?, g, m, v, s),
                other => return Err(Error::dtype("AdamW", "a float parameter", other)),
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::adamw(p, g, m, v, s),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::CudaUnavailable("built without the `cuda` feature".into())),
    }
}
