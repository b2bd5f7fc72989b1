//! The training-loop optimizer: [`OptimConfig`] (one field per `peftk finetune` flag) and [`Optimizer`],
//! which adds to the AdamW update gradient accumulation, global-norm clipping, a learning-rate schedule,
//! f32 master weights for f16/bf16 parameters, host-offloaded state, bitsandbytes' 8-bit state
//! (`AdamW8bit`), and exact checkpoints.
//!
//! ```
//! use peft_kernels::autograd::{ParamStore, Tape};
//! use peft_kernels::optim::{OptimConfig, OptimKind, Optimizer, Schedule, ScheduleKind};
//! use peft_kernels::{DType, Device, Tensor};
//! let mut store = ParamStore::new();
//! let w = store.insert("w", Tensor::randn(&[8192], 1.0, 0, DType::BF16, Device::Cpu)?)?;
//! let target = Tensor::zeros(&[8192], DType::BF16, Device::Cpu)?;
//! let mut cfg = OptimConfig { optim: OptimKind::AdamW8bit, grad_accum: 2, grad_clip: Some(1.0), ..Default::default() };
//! cfg.hyper.lr = 0.05;
//! cfg.schedule = Schedule { kind: ScheduleKind::Cosine, warmup_steps: 2, total_steps: 50 };
//! let mut opt = Optimizer::new(cfg)?;
//! for _ in 0..100 {
//!     let mut tape = Tape::new();
//!     let x = tape.param(&store, w)?;
//!     let loss = tape.mse_loss(x, &target)?;
//!     let grads = tape.backward(loss)?;
//!     drop(tape);
//!     opt.accumulate(&mut store, grads)?; // a step every second call
//! }
//! assert_eq!(opt.steps(), 50);
//! assert!(opt.state_bytes() < 3 * 8192); // 2 bytes per element + one f32 per 256 per moment
//! # Ok::<(), peft_kernels::Error>(())
//! ```

use super::AdamWConfig;
use super::schedule::Schedule;
use super::state::{DEFAULT_MIN_8BIT_SIZE, FORMATS, Moments, ParamState};
use crate::autograd::{Gradients, ParamId, ParamStore};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::{SafetensorsFile, TensorBytes, atomic_write, write_safetensors};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Which optimizer (`--optim adamw|adamw8bit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    /// `torch.optim.AdamW`, f32 moments (8 bytes per parameter).
    #[default]
    AdamW,
    /// `bitsandbytes.optim.AdamW8bit`: blockwise 8-bit moments (~2 bytes per parameter) for tensors of
    /// at least `min_8bit_size` elements, bitsandbytes' 32-bit Adam below.
    AdamW8bit,
}

impl OptimKind {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OptimKind::AdamW => "adamw",
            OptimKind::AdamW8bit => "adamw8bit",
        }
    }
}

impl std::str::FromStr for OptimKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adamw" => Ok(OptimKind::AdamW),
            "adamw8bit" => Ok(OptimKind::AdamW8bit),
            _ => Err(Error::invalid(format!(
                "unknown optimizer {s:?} (expected adamw or adamw8bit)"
            ))),
        }
    }
}

impl std::fmt::Display for OptimKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything [`Optimizer`] needs; each field is one `peftk finetune` flag.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    /// `--optim adamw|adamw8bit`
    pub optim: OptimKind,
    /// `--lr` (the schedule's base rate), betas, eps, `--weight-decay`.
    pub hyper: AdamWConfig,
    /// `--schedule constant|linear|cosine`, `--warmup N`, and the run's total optimizer steps.
    pub schedule: Schedule,
    /// `--grad-accum N` (>= 1): micro-batches per optimizer step; their gradients are averaged.
    pub grad_accum: usize,
    /// `--grad-clip X`: clip the global L2 norm of the (averaged) gradients to X before each step.
    pub grad_clip: Option<f32>,
    /// `--paged`: the moments of CUDA parameters of at least 100,000 elements in CUDA managed (unified)
    /// memory, prefetched to the device before each step and preferring the host otherwise, so the
    /// driver can evict them under memory pressure (bitsandbytes' paged optimizers). Smaller tensors,
    /// and devices without `CONCURRENT_MANAGED_ACCESS`, get a plain device allocation.
    pub paged: bool,
    /// `--offload-optimizer`: moments and an f32 master copy of every CUDA parameter on the host; the
    /// gradients are copied to pinned host buffers on a side stream (all queued at once, one event
    /// each), each tensor is updated by the CPU kernels as soon as its copy lands, and its new value is
    /// copied back on the side stream while the CPU updates the next.
    pub offload: bool,
    /// One kernel launch per group of CUDA tensors (same state format and parameter dtype) instead of
    /// one per tensor (default on; the results are identical).
    pub multi_tensor: bool,
    /// f32 master copies of f16/bf16 parameters (default on): the update runs on the master and the
    /// parameter is its rounding, so small updates are not lost to bf16 rounding.
    pub master_weights: bool,
    /// Tensors below this many elements keep f32 state under `AdamW8bit` (bitsandbytes: 4096).
    pub min_8bit_size: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            optim: OptimKind::AdamW,
            hyper: AdamWConfig::default(),
            schedule: Schedule::constant(),
            grad_accum: 1,
            grad_clip: None,
            paged: false,
            offload: false,
            multi_tensor: true,
            master_weights: true,
            min_8bit_size: DEFAULT_MIN_8BIT_SIZE,
        }
    }
}

impl OptimConfig {
    /// Range checks of every field.
    pub fn validate(&self) -> Result<()> {
        self.hyper.validate()?;
        self.schedule.validate()?;
        if self.grad_accum == 0 {
            return Err(Error::invalid("grad_accum must be >= 1"));
        }
        if let Some(c) = self.grad_clip
            && !(c.is_finite() && c > 0.0)
        {
            return Err(Error::invalid(format!(
                "grad_clip must be finite and > 0, got {c}"
            )));
        }
        if self.min_8bit_size == 0 {
            return Err(Error::invalid("min_8bit_size must be >= 1"));
        }
        Ok(())
    }
}

/// The state tensors of one parameter by name, and its f32 master copy.
pub type StateTensors<'a> = (Vec<(&'static str, &'a Tensor)>, Option<&'a Tensor>);

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Optimizer steps taken, this one included.
    pub step: u64,
    /// The learning rate this step used.
    pub lr: f32,
    /// The global gradient norm before clipping (when clipping is on).
    pub grad_norm: Option<f32>,
}

/// AdamW or AdamW8bit with accumulation, clipping, schedule, master weights, offload and checkpoints.
pub struct Optimizer {
    cfg: OptimConfig,
    states: BTreeMap<ParamId, ParamState>,
    accum: Option<Gradients>,
    micro: usize,
    steps: u64,
    /// Side streams and pinned buffers of `--offload-optimizer`, made on first use.
    #[cfg(feature = "cuda")]
    offload: super::offload::Offload,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("cfg", &self.cfg)
            .field("params", &self.states.len())
            .field("steps", &self.steps)
            .field("micro", &self.micro)
            .finish()
    }
}

/// Checkpoint file names inside the `--resume` directory.
pub const STATE_FILE: &str = "optimizer.safetensors";
/// The JSON half of a checkpoint, written last (its presence marks a complete checkpoint).
pub const META_FILE: &str = "optimizer.json";
const FORMAT: &str = "peft-kernels-optimizer";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize, PartialEq, Debug)]
#[serde(deny_unknown_fields)]
struct HyperJson {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
#[serde(deny_unknown_fields)]
struct ScheduleJson {
    kind: String,
    warmup_steps: u64,
    total_steps: u64,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ParamJson {
    name: String,
    shape: Vec<usize>,
    format: String,
    step: u64,
    master: bool,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct MetaJson {
    format: String,
    version: u32,
    optim: OptimKind,
    hyper: HyperJson,
    schedule: ScheduleJson,
    grad_accum: usize,
    grad_clip: Option<f32>,
    master_weights: bool,
    min_8bit_size: usize,
    steps: u64,
    rng: Option<[u64; 4]>,
    params: Vec<ParamJson>,
    extra: serde_json::Value,
}

impl MetaJson {
    /// The run-defining fields of `cfg` (everything but the placement flags `paged` / `offload`).
    fn config_fields(
        cfg: &OptimConfig,
    ) -> (
        OptimKind,
        HyperJson,
        ScheduleJson,
        usize,
        Option<f32>,
        bool,
        usize,
    ) {
        let h = &cfg.hyper;
        (
            cfg.optim,
            HyperJson {
                lr: h.lr,
                beta1: h.beta1,
                beta2: h.beta2,
                eps: h.eps,
                weight_decay: h.weight_decay,
            },
            ScheduleJson {
                kind: cfg.schedule.kind.as_str().to_string(),
                warmup_steps: cfg.schedule.warmup_steps,
                total_steps: cfg.schedule.total_steps,
            },
            cfg.grad_accum,
            cfg.grad_clip,
            cfg.master_weights,
            cfg.min_8bit_size,
        )
    }
}

/// What a checkpoint carries besides the optimizer: the caller's RNG and free-form JSON (data-loader
/// position, seeds, ...).
#[derive(Debug)]
pub struct Resume {
    pub rng: Option<Rng>,
    pub extra: serde_json::Value,
}

impl Optimizer {
    /// A fresh optimizer; errors on an invalid config.
    pub fn new(cfg: OptimConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Optimizer {
            cfg,
            states: BTreeMap::new(),
            accum: None,
            micro: 0,
            steps: 0,
            #[cfg(feature = "cuda")]
            offload: Default::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Optimizer steps taken (the schedule position).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Micro-batches accumulated towards the next step.
    pub fn pending_micro_steps(&self) -> usize {
        self.micro
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f32 {
        self.cfg.schedule.lr(self.cfg.hyper.lr, self.steps)
    }

    /// Bytes of optimizer moments (the `optimizer_state_bytes` metric): 8 per element for AdamW, 2 per
    /// element plus 8 per 256 elements for AdamW8bit's 8-bit tensors.
    pub fn state_bytes(&self) -> usize {
        self.states.values().map(ParamState::moment_bytes).sum()
    }

    /// The parameters whose moments are in 8-bit state (AdamW8bit tensors of at least `min_8bit_size`
    /// elements) and the bytes of those moments: `(elements, bytes)`, `(0, 0)` when there are none. Their
    /// ratio is the 8-bit format's bytes per parameter (2 + 8/256 = 2.03), which
    /// [`Optimizer::state_bytes`] over all tensors hides when small tensors keep f32 state.
    pub fn state_bytes_8bit(&self) -> (usize, usize) {
        self.states
            .values()
            .filter(|s| s.moments.format() == "bnb8")
            .fold((0, 0), |(n, b), s| (n + s.moments.numel(), b + s.moment_bytes()))
    }

    /// [`Optimizer::state_bytes`] plus the f32 master copies.
    pub fn total_state_bytes(&self) -> usize {
        self.states.values().map(ParamState::size_in_bytes).sum()
    }

    /// Steps taken by parameter `id` (it skips steps without a gradient), once it has state.
    pub fn param_steps(&self, id: ParamId) -> Option<u64> {
        self.states.get(&id).map(|s| s.step)
    }

    /// The state format of `id`: `"torch"` (AdamW), `"bnb32"` or `"bnb8"` (AdamW8bit).
    pub fn state_format(&self, id: ParamId) -> Option<&'static str> {
        self.states.get(&id).map(|s| s.moments.format())
    }

    /// The state tensors of `id` by name (`m`, `v`, and for 8-bit state `absmax_m`, `absmax_v`; the
    /// 8-bit `m`/`v` are u8 codes) and its f32 master copy, once it has state. Paged state (managed
    /// memory, not tensors) lists no tensors here; [`Optimizer::is_paged`] tells, and a checkpoint
    /// ([`Optimizer::save`]) holds its values.
    pub fn state_tensors(&self, id: ParamId) -> Option<StateTensors<'_>> {
        self.states
            .get(&id)
            .map(|s| (s.moments.tensors(), s.master.as_ref()))
    }

    /// Whether the moments of `id` are in CUDA managed memory (`--paged`).
    pub fn is_paged(&self, id: ParamId) -> Option<bool> {
        self.states.get(&id).map(|s| s.moments.is_paged())
    }

    /// Adds one micro-batch's gradients; every `grad_accum`-th call averages them, steps, and returns
    /// the step's report. An error drops the pending micro-batches.
    pub fn accumulate(&mut self, store: &mut ParamStore, mut grads: Gradients) -> Result<Option<StepReport>> {
        let mut acc = match self.accum.take() {
            None => grads,
            Some(mut acc) => {
                let ids: Vec<ParamId> = grads.iter().map(|(id, _)| id).collect();
                for id in ids {
                    if let Some(g) = grads.remove(id)
                        && let Err(e) = acc.insert_or_add(id, g)
                    {
                        self.micro = 0;
                        return Err(e);
                    }
                }
                acc
            }
        };
        self.micro += 1;
        if self.micro < self.cfg.grad_accum {
            self.accum = Some(acc);
            return Ok(None);
        }
        self.micro = 0;
        if self.cfg.grad_accum > 1 {
            acc.scale(1.0 / self.cfg.grad_accum as f32)?;
        }
        self.step(store, acc).map(Some)
    }

    /// One optimizer step with already-accumulated gradients: clip (if configured), the scheduled
    /// learning rate, the update. Everything is validated first: an error leaves parameters and state
    /// untouched.
    pub fn step(&mut self, store: &mut ParamStore, mut grads: Gradients) -> Result<StepReport> {
        self.cfg.validate()?;
        for (id, g) in grads.iter() {
            check_grad(store, id, g)?;
        }
        let mut fresh = Vec::new();
        for (id, _) in grads.iter() {
            if let Some(s) = self.prepare(store, id)? {
                fresh.push((id, s));
            }
        }
        let grad_norm = match self.cfg.grad_clip {
            Some(c) => Some(grads.clip_global_norm(c)?),
            None => None,
        };
        self.states.extend(fresh);
        let lr = self.lr();
        let hyper = AdamWConfig {
            lr,
            ..self.cfg.hyper.clone()
        };
        // CUDA state: queued into multi-tensor launches. Offloaded state: gradients copied to the host
        // on a side stream, all queued before the first CPU update.
        #[cfg(feature = "cuda")]
        let mut batch = super::cuda::MultiBatch::new(&hyper);
        #[cfg(feature = "cuda")]
        let mut cast_back = Vec::new();
        #[cfg(feature = "cuda")]
        {
            let offloaded: Vec<(ParamId, &Tensor)> = grads
                .iter()
                .filter(|(id, g)| {
                    g.device().is_cuda() && self.states.get(id).is_some_and(|s| s.moments.device().is_cpu())
                })
                .collect();
            self.offload.download(&offloaded)?;
        }
        for (id, g) in grads.iter() {
            let st = self
                .states
                .get_mut(&id)
                .ok_or_else(|| Error::invalid("Optimizer: missing state"))?;
            let dev = st.moments.device();
            #[cfg(feature = "cuda")]
            if dev.is_cuda() {
                st.step += 1;
                let p = match &mut st.master {
                    Some(m) => {
                        cast_back.push(id);
                        m
                    }
                    None => store.get_mut(id)?,
                };
                batch.push(p, g, &mut st.moments, st.step)?;
                if !self.cfg.multi_tensor {
                    batch.flush()?;
                }
                continue;
            }
            #[cfg(feature = "cuda")]
            if g.device().is_cuda()
                && let Some(master) = &mut st.master
            {
                st.step += 1;
                let hg = self.offload.gradient(id, g.numel())?;
                st.moments
                    .update_host(master.cpu_data_mut::<f32>("optimizer")?, hg, &hyper, st.step)?;
                self.offload
                    .upload(id, master.cpu_data::<f32>("optimizer")?, store.get_mut(id)?)?;
                continue;
            }
            let moved;
            let g = if g.device() == dev {
                g
            } else {
                moved = g.to_device(dev)?;
                &moved
            };
            st.step += 1;
            match &mut st.master {
                Some(master) => {
                    st.moments.update(master, g, &hyper, st.step)?;
                    let p = store.get(id)?;
                    let new = master.to_dtype(p.dtype())?.to_device(p.device())?;
                    store.set(id, new)?;
                }
                None => st.moments.update(store.get_mut(id)?, g, &hyper, st.step)?,
            }
        }
        #[cfg(feature = "cuda")]
        {
            batch.flush()?;
            for id in cast_back {
                if let Some(master) = self.states.get(&id).and_then(|s| s.master.as_ref()) {
                    let dt = store.get(id)?.dtype();
                    store.set(id, master.to_dtype(dt)?)?;
                }
            }
            self.offload.finish()?;
        }
        self.steps += 1;
        Ok(StepReport {
            step: self.steps,
            lr,
            grad_norm,
        })
    }

    /// Where the state of a parameter on `dev` lives.
    fn state_device(&self, dev: Device) -> Device {
        if self.cfg.offload { Device::Cpu } else { dev }
    }

    /// Whether parameter `p` gets an f32 master copy.
    fn needs_master(&self, p: &Tensor) -> bool {
        (self.cfg.master_weights && p.dtype() != DType::F32)
            || (self.cfg.offload && p.device() != Device::Cpu)
    }

    /// Whether the moments of an `n`-element parameter with state on `dev` go to managed memory.
    fn wants_paged(&self, dev: Device, n: usize) -> Result<bool> {
        if !(self.cfg.paged && dev.is_cuda() && n >= super::multi::PAGED_MIN_SIZE) {
            return Ok(false);
        }
        #[cfg(feature = "cuda")]
        let can = super::cuda::Paged::device_can_page(dev)?;
        #[cfg(not(feature = "cuda"))]
        let can = false;
        Ok(super::multi::use_paged(self.cfg.paged, dev.is_cuda(), n, can))
    }

    /// New state for `id` when it has none, or has state of another size or on another device.
    fn prepare(&self, store: &ParamStore, id: ParamId) -> Result<Option<ParamState>> {
        let p = store.get(id)?;
        let dev = self.state_device(p.device());
        let eight = self.cfg.optim == OptimKind::AdamW8bit;
        let paged = self.wants_paged(dev, p.numel())?;
        let master = |p: &Tensor| -> Result<Option<Tensor>> {
            Ok(if self.needs_master(p) {
                Some(p.to_dtype(DType::F32)?.to_device(dev)?)
            } else {
                None
            })
        };
        Ok(match self.states.get(&id) {
            Some(s) if s.moments.numel() == p.numel() => {
                if s.moments.device() == dev
                    && s.master.is_some() == self.needs_master(p)
                    && s.moments.is_paged() == paged
                {
                    None
                } else {
                    Some(ParamState {
                        moments: s.moments.place(dev, paged)?,
                        step: s.step,
                        master: match &s.master {
                            Some(m) if self.needs_master(p) => Some(m.to_device(dev)?),
                            _ => master(p)?,
                        },
                    })
                }
            }
            _ => Some(ParamState {
                moments: match Moments::zeros(eight, self.cfg.min_8bit_size, p.numel(), dev)? {
                    m if paged => m.place(dev, true)?,
                    m => m,
                },
                step: 0,
                master: master(p)?,
            }),
        })
    }

    /// Writes a checkpoint to `dir` (created if missing): every state tensor to `optimizer.safetensors`,
    /// then the step counts, configuration, `rng` and `extra` to `optimizer.json`, each atomically
    /// (temp file + rename), the JSON last. Errors between accumulation micro-steps (their gradients
    /// are not saved).
    pub fn save(
        &self,
        dir: impl AsRef<Path>,
        store: &ParamStore,
        rng: Option<&Rng>,
        extra: serde_json::Value,
    ) -> Result<()> {
        let dir = dir.as_ref();
        if self.micro != 0 {
            return Err(Error::invalid(format!(
                "Optimizer::save: {} accumulated micro-batches pending; save after a step",
                self.micro
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = Vec::new();
        let mut params = Vec::new();
        for (&id, st) in &self.states {
            let name = store.name(id)?;
            for (suffix, t) in st.moments.snapshot()? {
                tensors.push((format!("{name}::{suffix}"), TensorBytes::from_tensor(&t)?));
            }
            if let Some(m) = &st.master {
                tensors.push((format!("{name}::master"), TensorBytes::from_tensor(m)?));
            }
            params.push(ParamJson {
                name: name.to_string(),
                shape: store.get(id)?.shape().to_vec(),
                format: st.moments.format().to_string(),
                step: st.step,
                master: st.master.is_some(),
            });
        }
        write_safetensors(dir.join(STATE_FILE), &tensors, None)?;
        let (optim, hyper, schedule, grad_accum, grad_clip, master_weights, min_8bit_size) =
            MetaJson::config_fields(&self.cfg);
        let meta = MetaJson {
            format: FORMAT.to_string(),
            version: VERSION,
            optim,
            hyper,
            schedule,
            grad_accum,
            grad_clip,
            master_weights,
            min_8bit_size,
            steps: self.steps,
            rng: rng.map(Rng::state),
            params,
            extra,
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::invalid(e.to_string()))?;
        atomic_write(dir.join(META_FILE), &json)
    }

    /// Loads a checkpoint written by [`Optimizer::save`] for the parameters of `store`, validating every
    /// field: format and version, the configuration (all of `cfg` but the placement flags `paged` and
    /// `offload` must equal the saved one), each parameter's name, shape, state format, tensors (dtype
    /// and length) and master copy, and that the state file holds nothing else.
    pub fn load(dir: impl AsRef<Path>, cfg: OptimConfig, store: &ParamStore) -> Result<(Optimizer, Resume)> {
        let dir = dir.as_ref();
        let meta_path = dir.join(META_FILE);
        let bytes = std::fs::read(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let bad = |msg: String| Error::format(meta_path.display().to_string(), msg);
        let meta: MetaJson = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if meta.format != FORMAT || meta.version != VERSION {
            return Err(bad(format!(
                "format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                meta.format, meta.version
            )));
        }
        let mut opt = Optimizer::new(cfg)?;
        let (optim, hyper, schedule, grad_accum, grad_clip, master_weights, min_8bit_size) =
            MetaJson::config_fields(&opt.cfg);
        let checks: [(&str, bool, String); 7] = [
            (
                "optim",
                optim == meta.optim,
                format!("{} vs {}", meta.optim, optim),
            ),
            (
                "hyperparameters",
                hyper == meta.hyper,
                format!("{:?} vs {hyper:?}", meta.hyper),
            ),
            (
                "schedule",
                schedule == meta.schedule,
                format!("{:?} vs {schedule:?}", meta.schedule),
            ),
            (
                "grad_accum",
                grad_accum == meta.grad_accum,
                format!("{} vs {grad_accum}", meta.grad_accum),
            ),
            (
                "grad_clip",
                grad_clip == meta.grad_clip,
                format!("{:?} vs {grad_clip:?}", meta.grad_clip),
            ),
            (
                "master_weights",
                master_weights == meta.master_weights,
                format!("{} vs {master_weights}", meta.master_weights),
            ),
            (
                "min_8bit_size",
                min_8bit_size == meta.min_8bit_size,
                format!("{} vs {min_8bit_size}", meta.min_8bit_size),
            ),
        ];
        for (what, ok, detail) in checks {
            if !ok {
                return Err(bad(format!(
                    "{what} differs from the run's configuration (saved vs now: {detail})"
                )));
            }
        }
        let rng = meta.rng.map(Rng::from_state).transpose()?;
        let st = SafetensorsFile::open(dir.join(STATE_FILE))?;
        let mut used = 0usize;
        for pj in &meta.params {
            let id = store
                .find(&pj.name)
                .ok_or_else(|| bad(format!("parameter {:?} is not in the model", pj.name)))?;
            let p = store.get(id)?;
            if p.shape() != pj.shape.as_slice() {
                return Err(bad(format!(
                    "parameter {:?}: saved shape {:?}, model has {:?}",
                    pj.name,
                    pj.shape,
                    p.shape()
                )));
            }
            let want = match (opt.cfg.optim, p.numel() < opt.cfg.min_8bit_size) {
                (OptimKind::AdamW, _) => FORMATS[0],
                (OptimKind::AdamW8bit, true) => FORMATS[1],
                (OptimKind::AdamW8bit, false) => FORMATS[2],
            };
            if pj.format != want {
                return Err(bad(format!(
                    "parameter {:?}: state format {:?}, expected {want:?}",
                    pj.name, pj.format
                )));
            }
            if pj.master != opt.needs_master(p) {
                return Err(bad(format!(
                    "parameter {:?}: master copy {} in the checkpoint but {} now (resume with the same \
                     --offload-optimizer and master-weight settings)",
                    pj.name,
                    if pj.master { "present" } else { "absent" },
                    if pj.master { "not needed" } else { "needed" }
                )));
            }
            if pj.step == 0 || pj.step > meta.steps {
                return Err(bad(format!(
                    "parameter {:?}: step {} outside 1..={}",
                    pj.name, pj.step, meta.steps
                )));
            }
            let dev = opt.state_device(p.device());
            let n = p.numel();
            let moments = Moments::from_tensors(&pj.format, n, |suffix| {
                used += 1;
                st.load(&format!("{}::{suffix}", pj.name), dev)
            })?;
            let master = if pj.master {
                used += 1;
                let m = st.load(&format!("{}::master", pj.name), dev)?;
                if m.dtype() != DType::F32 || m.shape() != p.shape() {
                    return Err(bad(format!(
                        "parameter {:?}: master is {:?} {:?}, expected f32 {:?}",
                        pj.name,
                        m.dtype(),
                        m.shape(),
                        p.shape()
                    )));
                }
                Some(m)
            } else {
                None
            };
            if opt
                .states
                .insert(
                    id,
                    ParamState {
                        moments,
                        step: pj.step,
                        master,
                    },
                )
                .is_some()
            {
                return Err(bad(format!("parameter {:?} listed twice", pj.name)));
            }
        }
        if used != st.names().len() {
            return Err(bad(format!(
                "{STATE_FILE} holds {} tensors, the JSON describes {used}",
                st.names().len()
            )));
        }
        opt.steps = meta.steps;
        Ok((
            opt,
            Resume {
                rng,
                extra: meta.extra,
            },
        ))
    }
}

/// The checks of every gradient before any update (also used by `AdamW::step`).
pub(crate) fn check_grad(store: &ParamStore, id: ParamId, g: &Tensor) -> Result<()> {
    let p = store.get(id)?;
    let name = store.name(id)?;
    if !store.is_trainable(id) {
        return Err(Error::invalid(format!(
            "optimizer: gradient for frozen parameter {name:?}"
        )));
    }
    if g.dtype() != DType::F32 {
        return Err(Error::dtype("optimizer gradient", "f32", g.dtype()));
    }
    p.dtype().expect_float("optimizer")?;
    if g.shape() != p.shape() {
        return Err(Error::shape(
            "optimizer",
            format!(
                "gradient {:?} for parameter {name:?} of shape {:?}",
                g.shape(),
                p.shape()
            ),
        ));
    }
    if g.device() != p.device() {
        return Err(Error::device(
            "optimizer",
            format!(
                "gradient on {} for parameter {name:?} on {}",
                g.device(),
                p.device()
            ),
        ));
    }
    Ok(())
}
