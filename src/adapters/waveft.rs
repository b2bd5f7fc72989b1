//! WaveFT (wavelet fine-tuning, arXiv 2505.12532; HF PEFT `tuners/waveft`), trained sparsely.
//!
//! The trainable parameter of a layer is `spectrum [n_frequency]`: wavelet coefficients at fixed random
//! positions of the `[out, in]` coefficient grid. PEFT regenerates the positions from `random_loc_seed`
//! (`torch.randperm(out·in)` on a seeded CPU generator, first `n_frequency` entries); [`randperm_torch`]
//! reproduces that permutation bit for bit. ΔW is `scaling · IDWT2(scatter(spectrum))`, a single-level
//! 2-D inverse DWT over the quadrant layout `[cA cH; cV cD]`, cropped to `[out, in]` (or the plain
//! scatter with `use_idwt = false`).
//!
//! PEFT materializes ΔW densely on every forward (an out×in scatter, a conv_transpose2d, and a second
//! dense matmul). Here ΔW is never dense in training: the synthesis is a fixed sparse linear map
//! (≤ 4 entries per coefficient for the default db1 (Haar), ≤ F² for an F-tap wavelet, see
//! [`structure`]), precomputed per layer as [`WaveFtPositions`]. Then
//! - forward: `y += x·ΔWᵀ` is an SpMM over the ≤ 4n nonzeros (O(tokens·n) FLOPs);
//! - backward: `G = (dyᵀ·x)` sampled at the nonzeros (SDDMM), `dspectrum = scaling · Sᵀ G` (the Haar
//!   adjoint, same ±½ signs), and `dx = dy·ΔW` (SpMM with the column view).
//!
//! The CPU kernels are in `waveft/cpu.rs`, the CUDA ones in `kernels/waveft.cu` (`waveft/cuda.rs`);
//! [`WaveFtLayer::delta_weight`] builds the dense ΔW for merging only.
//!
//! API: a [`WaveFtLayer`] holds the layer geometry and the precomputed structure but not the spectrum
//! (the autograd tape / parameter store owns it); the free functions [`waveft_forward`],
//! [`waveft_backward`] and [`waveft_delta_weight`] work on a bare [`WaveFtPositions`]. [`WaveFtLinear`]
//! is the whole layer: a frozen dense or 4-bit base through [`crate::qmatmul`] plus this adapter, with the
//! spectrum in a [`crate::autograd::ParamStore`] under PEFT's key, and a tape op.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "waveft/cuda_stub.rs"]
mod cuda;
mod linear;
mod randperm;
pub mod structure;
mod wavelets;

pub use linear::{WaveFtContext, WaveFtGrads, WaveFtLinear, spectrum_key};
pub use randperm::{Mt19937, randperm_prefix, randperm_torch};
pub use structure::WaveFtEntry;
pub use wavelets::{AxisGeometry, WaveletFilters, supported_wavelets, wavelet_filters};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use std::collections::BTreeMap;
use structure::HostStructure;

/// The saved-key suffix of the spectrum in `adapter_model.safetensors`
/// (`base_model.model.<module>.waveft_spectrum`).
pub const SPECTRUM_KEY: &str = "waveft_spectrum";

/// Per-layer WaveFT settings (PEFT's `WaveFTConfig` fields that shape one layer).
#[derive(Clone, Debug, PartialEq)]
pub struct WaveFtConfig {
    /// Number of trainable coefficients of this layer (after `n_frequency_pattern` /
    /// `proportional_parameters`, see [`waveft_n_frequencies`]).
    pub n_frequency: usize,
    /// Fixed factor on ΔW (PEFT default 25.0; not divided by anything).
    pub scaling: f32,
    /// `db1` (Haar, default) .. `db10`, `sym2` .. `sym10`, `coif1` .. `coif4`.
    pub wavelet_family: String,
    /// false: ΔW is the plain scatter of the spectrum (one entry per coefficient).
    pub use_idwt: bool,
    /// Seed of the CPU generator that picks the coefficient positions (PEFT default 777). torch uses its
    /// low 32 bits.
    pub random_loc_seed: u64,
}

/// The per-layer settings of a PEFT adapter file's WaveFT config, with the config-level `n_frequency`
/// (override it with the layer's: `WaveFtConfig { n_frequency, ..(&file_config).into() }`).
impl From<&crate::io::peft::WaveFtConfig> for WaveFtConfig {
    fn from(c: &crate::io::peft::WaveFtConfig) -> Self {
        WaveFtConfig {
            n_frequency: c.n_frequency,
            scaling: c.scaling as f32,
            wavelet_family: c.wavelet_family.clone(),
            use_idwt: c.use_idwt,
            // torch's manual_seed takes the seed modulo 2^64 (two's complement for negative values).
            random_loc_seed: c.random_loc_seed as u64,
        }
    }
}

impl Default for WaveFtConfig {
    /// PEFT's defaults: `n_frequency=2592, scaling=25.0, wavelet_family="db1", use_idwt=True,
    /// random_loc_seed=777`.
    /// (those of the file config, [`crate::io::peft::WaveFtConfig`]).
    fn default() -> Self {
        (&crate::io::peft::WaveFtConfig::default()).into()
    }
}

/// True for the family names PEFT's config validator accepts (`WAVELET_REDUCTIONS`): db1-db38,
/// sym2-sym20, coif1-coif17. Only a subset has filters (see [`supported_wavelets`]), which matters only
/// with `use_idwt = true`.
pub fn peft_accepts_wavelet(name: &str) -> bool {
    let num = |prefix: &str| name.strip_prefix(prefix).and_then(|s| s.parse::<u32>().ok());
    let canonical = |prefix: &str, n: u32| format!("{prefix}{n}") == name;
    match (num("db"), num("sym"), num("coif")) {
        (Some(n), _, _) => (1..=38).contains(&n) && canonical("db", n),
        (_, Some(n), _) => (2..=20).contains(&n) && canonical("sym", n),
        (_, _, Some(n)) => (1..=17).contains(&n) && canonical("coif", n),
        _ => false,
    }
}

impl WaveFtConfig {
    /// Checks the settings against a layer of `out`×`inp` (PEFT's `update_layer` checks plus our
    /// kernel limits).
    pub fn validate(&self, out: usize, inp: usize) -> Result<()> {
        if out == 0 || inp == 0 {
            return Err(Error::invalid(format!(
                "WaveFT layer shape [{out}, {inp}] has a zero dimension"
            )));
        }
        if out > i32::MAX as usize || inp > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "WaveFT layer shape [{out}, {inp}] exceeds the kernels' i32 index range"
            )));
        }
        let cells = out
            .checked_mul(inp)
            .ok_or_else(|| Error::invalid(format!("WaveFT layer [{out}, {inp}] overflows usize")))?;
        if self.n_frequency == 0 {
            return Err(Error::invalid(
                "WaveFT n_frequency must be a positive integer, got 0 (as PEFT)",
            ));
        }
        if self.n_frequency > cells {
            return Err(Error::invalid(format!(
                "WaveFT n_frequency {} exceeds out*in = {cells} for a [{out}, {inp}] layer (as PEFT)",
                self.n_frequency
            )));
        }
        if !self.scaling.is_finite() {
            return Err(Error::invalid(format!(
                "WaveFT scaling {} is not finite",
                self.scaling
            )));
        }
        if !peft_accepts_wavelet(&self.wavelet_family) {
            return Err(Error::invalid(format!(
                "WaveFT wavelet_family {:?} is not one PEFT accepts (db1-db38, sym2-sym20, coif1-coif17)",
                self.wavelet_family
            )));
        }
        if self.use_idwt {
            wavelet_filters(&self.wavelet_family)?;
        }
        Ok(())
    }
}

/// WaveFT `proportional_parameters` (PEFT's `_calculate_proportional_parameters`): the budget
/// `n_frequency · L` split over the `L` targeted layers (`(out, in)` each) in proportion to `out·in`,
/// `max(1, round_half_even(out·in / Σ out·in · budget))`. Pass every layer PEFT would target, in any
/// order; the result is in the same order.
pub fn proportional_n_frequency(n_frequency: usize, layers: &[(usize, usize)]) -> Result<Vec<usize>> {
    if layers.is_empty() {
        return Err(Error::invalid(
            "no target modules found for proportional parameter allocation (as PEFT)",
        ));
    }
    let total: u128 = layers.iter().map(|&(o, i)| o as u128 * i as u128).sum();
    if total == 0 {
        return Err(Error::invalid("all targeted layers are empty"));
    }
    let budget = (n_frequency as u128 * layers.len() as u128) as f64;
    Ok(layers
        .iter()
        .map(|&(o, i)| {
            // Python: max(1, round((i*o) / total_sum * total_budget)), round half to even.
            let ratio = (o as u128 * i as u128) as f64 / total as f64;
            (ratio * budget).round_ties_even().max(1.0) as usize
        })
        .collect())
}

/// Per-layer `n_frequency` as PEFT's `WaveFTModel._create_and_replace` assigns it, for target layers
/// `(module name, out, in)` (module names as in the model, e.g. `model.layers.0.self_attn.q_proj`):
/// - `proportional_parameters`: the budget `n_frequency · num_layers` split by `out·in`,
///   `max(1, round_half_even(out·in / Σ out·in · budget))` (this takes precedence over the pattern);
/// - otherwise the first `n_frequency_pattern` key that matches the module name
///   (`^(.*\.)?(key)$`, PEFT's `get_pattern_key`), else `n_frequency`.
pub fn waveft_n_frequencies(
    modules: &[(&str, usize, usize)],
    n_frequency: usize,
    n_frequency_pattern: &BTreeMap<String, usize>,
    proportional_parameters: bool,
) -> Result<Vec<usize>> {
    if proportional_parameters {
        let cells: Vec<(usize, usize)> = modules.iter().map(|&(_, o, i)| (o, i)).collect();
        return proportional_n_frequency(n_frequency, &cells);
    }
    // PEFT iterates the pattern dict in insertion order; a BTreeMap iterates sorted. With one match per
    // module (the normal case) the order does not matter.
    let mut compiled = Vec::with_capacity(n_frequency_pattern.len());
    for (key, &v) in n_frequency_pattern {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .map_err(|e| Error::invalid(format!("n_frequency_pattern key {key:?} is not a regex: {e}")))?;
        compiled.push((re, v));
    }
    Ok(modules
        .iter()
        .map(|&(name, _, _)| {
            compiled
                .iter()
                .find(|(re, _)| re.is_match(name))
                .map_or(n_frequency, |&(_, v)| v)
        })
        .collect())
}

/// The fixed sparse structure of one layer's ΔW: PEFT's coefficient positions and the synthesis map
/// from the spectrum to the nonzeros of ΔW (see [`structure`]). Built once per layer; lives on the
/// layer's device (host arrays are always kept, CUDA copies are added on a GPU).
#[derive(Clone)]
pub struct WaveFtPositions {
    out: usize,
    inp: usize,
    coef_row: Vec<i64>,
    coef_col: Vec<i64>,
    family: Option<String>,
    pub(crate) host: HostStructure,
    device: Device,
    pub(crate) dev: Option<cuda::DeviceStructure>,
}

impl std::fmt::Debug for WaveFtPositions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WaveFtPositions([{}, {}], n={}, nnz={}, entries={}, {:?}, {})",
            self.out,
            self.inp,
            self.coef_row.len(),
            self.host.nnz(),
            self.host.entries(),
            self.family.as_deref().unwrap_or("no idwt"),
            self.device
        )
    }
}

impl WaveFtPositions {
    /// PEFT's positions for an `out`×`inp` layer and the synthesis structure, on `device`.
    pub fn new(out: usize, inp: usize, cfg: &WaveFtConfig, device: Device) -> Result<WaveFtPositions> {
        cfg.validate(out, inp)?;
        device.check()?;
        let idx = randperm_prefix(out * inp, cfg.n_frequency, cfg.random_loc_seed);
        let coef_row: Vec<i64> = idx.iter().map(|&i| i / inp as i64).collect();
        let coef_col: Vec<i64> = idx.iter().map(|&i| i % inp as i64).collect();
        Self::from_indices(out, inp, coef_row, coef_col, cfg, device)
    }

    /// The structure for explicit coefficient positions (e.g. PEFT's saved `waveft_indices`, or a test).
    /// Positions must be distinct and inside the layer.
    pub fn from_indices(
        out: usize,
        inp: usize,
        coef_row: Vec<i64>,
        coef_col: Vec<i64>,
        cfg: &WaveFtConfig,
        device: Device,
    ) -> Result<WaveFtPositions> {
        let cfg = WaveFtConfig {
            n_frequency: coef_row.len(),
            ..cfg.clone()
        };
        cfg.validate(out, inp)?;
        if coef_col.len() != coef_row.len() {
            return Err(Error::invalid(format!(
                "WaveFT indices: {} rows but {} columns",
                coef_row.len(),
                coef_col.len()
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(coef_row.len());
        for (&r, &c) in coef_row.iter().zip(&coef_col) {
            if r < 0 || c < 0 || r as usize >= out || c as usize >= inp {
                return Err(Error::invalid(format!(
                    "WaveFT index ({r}, {c}) lies outside the [{out}, {inp}] layer"
                )));
            }
            if !seen.insert((r, c)) {
                return Err(Error::invalid(format!("WaveFT index ({r}, {c}) appears twice")));
            }
        }
        let family = cfg.use_idwt.then(|| cfg.wavelet_family.clone());
        let entries = structure::synthesis_entries(out, inp, &coef_row, &coef_col, family.as_deref())?;
        let host = structure::assemble(out, inp, coef_row.len(), entries)?;
        let mut p = WaveFtPositions {
            out,
            inp,
            coef_row,
            coef_col,
            family,
            host,
            device: Device::Cpu,
            dev: None,
        };
        p = p.to_device(device)?;
        Ok(p)
    }

    /// The same structure on `device`.
    pub fn to_device(&self, device: Device) -> Result<WaveFtPositions> {
        device.check()?;
        let mut p = self.clone();
        p.device = device;
        p.dev = match device {
            Device::Cpu => None,
            Device::Cuda(_) => Some(cuda::DeviceStructure::upload(&self.host, device)?),
        };
        Ok(p)
    }

    /// Output features (rows of ΔW).
    pub fn out_features(&self) -> usize {
        self.out
    }
    /// Input features (columns of ΔW).
    pub fn in_features(&self) -> usize {
        self.inp
    }
    /// Number of coefficients.
    pub fn n_frequency(&self) -> usize {
        self.coef_row.len()
    }
    /// Distinct nonzero positions of ΔW (≤ 4n for db1, n without IDWT).
    pub fn nnz(&self) -> usize {
        self.host.nnz()
    }
    /// Where the structure lives.
    pub fn device(&self) -> Device {
        self.device
    }
    /// PEFT's `waveft_indices`: (rows, cols) of every coefficient in the `[out, in]` grid.
    pub fn coefficient_indices(&self) -> (&[i64], &[i64]) {
        (&self.coef_row, &self.coef_col)
    }
    /// The wavelet family, or `None` without IDWT.
    pub fn wavelet_family(&self) -> Option<&str> {
        self.family.as_deref()
    }
    /// Every nonzero of the synthesis map, sorted by (row, col, coef).
    pub fn entries(&self) -> Vec<WaveFtEntry> {
        let h = &self.host;
        let mut v = Vec::with_capacity(h.entries());
        for p in 0..h.nnz() {
            for e in h.syn_ptr[p] as usize..h.syn_ptr[p + 1] as usize {
                v.push(WaveFtEntry {
                    row: h.pos_row[p] as usize,
                    col: h.pos_col[p] as usize,
                    coef: h.syn_coef[e] as usize,
                    weight: h.syn_w[e],
                });
            }
        }
        v
    }

    fn check_spectrum(&self, spectrum: &Tensor, op: &'static str) -> Result<()> {
        if spectrum.dtype() != DType::F32 {
            return Err(Error::dtype(op, "f32 spectrum", spectrum.dtype()));
        }
        if spectrum.shape() != [self.n_frequency()] {
            return Err(Error::shape(
                op,
                format!(
                    "spectrum must be [{}], got {:?}",
                    self.n_frequency(),
                    spectrum.shape()
                ),
            ));
        }
        self.check_device(spectrum, "spectrum", op)
    }

    /// `t` (named `what` in the error) is on the structure's device.
    fn check_device(&self, t: &Tensor, what: &str, op: &'static str) -> Result<()> {
        if t.device() != self.device {
            return Err(Error::device(
                op,
                format!(
                    "{what} on {} but the WaveFT structure on {}",
                    t.device(),
                    self.device
                ),
            ));
        }
        Ok(())
    }

    /// (tokens, output shape) for an activation `[.., dim]`.
    fn check_act(&self, x: &Tensor, dim: usize, what: &str, op: &'static str) -> Result<usize> {
        x.dtype().expect_float(op)?;
        self.check_device(x, what, op)?;
        x.rows_with_cols(dim, what, op)
    }
}

fn out_shape(x: &Tensor, last: usize) -> Vec<usize> {
    let mut s = x.shape()[..x.rank() - 1].to_vec();
    s.push(last);
    s
}

/// `x·ΔWᵀ` for `x [.., in]` (f32/f16/bf16): `[.., out]` in x's dtype (f32 accumulation, one rounding).
pub fn waveft_forward(pos: &WaveFtPositions, x: &Tensor, spectrum: &Tensor, scaling: f32) -> Result<Tensor> {
    let op = "waveft_forward";
    pos.check_spectrum(spectrum, op)?;
    let tokens = pos.check_act(x, pos.inp, "x", op)?;
    let shape = out_shape(x, pos.out);
    // x and the spectrum are both on the structure's device (checked above).
    match pos.device {
        Device::Cpu => {
            let mut y = Tensor::zeros(&shape, x.dtype(), Device::Cpu)?;
            cpu_forward(pos, x, spectrum, scaling, &mut y, false)?;
            Ok(y)
        }
        Device::Cuda(_) => cuda::forward(pos, x, spectrum, scaling, tokens, &shape),
    }
}

/// In place `y += x·ΔWᵀ` (`y [.., out]` with x's dtype): fuses the adapter into the base output without
/// a separate delta tensor.
pub fn waveft_forward_add(
    pos: &WaveFtPositions,
    x: &Tensor,
    spectrum: &Tensor,
    scaling: f32,
    y: &mut Tensor,
) -> Result<()> {
    let op = "waveft_forward_add";
    pos.check_spectrum(spectrum, op)?;
    let tokens = pos.check_act(x, pos.inp, "x", op)?;
    let ty = pos.check_act(y, pos.out, "y", op)?;
    if ty != tokens || y.dtype() != x.dtype() {
        return Err(super::mismatch_with_x(op, "y", y, x));
    }
    match pos.device {
        Device::Cpu => cpu_forward(pos, x, spectrum, scaling, y, true),
        Device::Cuda(_) => cuda::forward_add(pos, x, spectrum, scaling, y, tokens),
    }
}

fn cpu_forward(
    pos: &WaveFtPositions,
    x: &Tensor,
    spectrum: &Tensor,
    scaling: f32,
    y: &mut Tensor,
    accumulate: bool,
) -> Result<()> {
    let op = "waveft_forward";
    let s = spectrum.cpu_data::<f32>(op)?;
    let (v_row, _) = cpu::synthesize(&pos.host, s, scaling);
    let h = &pos.host;
    macro_rules! go {
        ($t:ty) => {{
            let xs = x.cpu_data::<$t>(op)?;
            let ys = y.cpu_data_mut::<$t>(op)?;
            cpu::spmm(
                xs, pos.inp, &h.row_ptr, &h.pos_col, &v_row, ys, pos.out, accumulate,
            );
        }};
    }
    match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        DType::BF16 => go!(half::bf16),
        other => return Err(Error::dtype(op, "a float dtype", other)),
    }
    Ok(())
}

/// Backward of `y = x·ΔWᵀ`: returns `(dx, dspectrum)`; dx (`[.., in]`, x's dtype) only when
/// `need_dx`; dspectrum is f32 `[n]`. `dy` is `[.., out]` with x's dtype.
pub fn waveft_backward(
    pos: &WaveFtPositions,
    x: &Tensor,
    dy: &Tensor,
    spectrum: &Tensor,
    scaling: f32,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let mut dx = if need_dx {
        Some(Tensor::zeros(x.shape(), x.dtype(), x.device())?)
    } else {
        None
    };
    let ds = backward_impl(pos, x, dy, spectrum, scaling, dx.as_mut(), false)?;
    Ok((dx, ds))
}

/// Like [`waveft_backward`], but adds the adapter's dx term into `dx` (e.g. the base layer's `dy·W`)
/// in place; returns dspectrum.
pub fn waveft_backward_add_dx(
    pos: &WaveFtPositions,
    x: &Tensor,
    dy: &Tensor,
    spectrum: &Tensor,
    scaling: f32,
    dx: &mut Tensor,
) -> Result<Tensor> {
    if dx.shape() != x.shape() || dx.dtype() != x.dtype() || dx.device() != x.device() {
        return Err(Error::shape(
            "waveft_backward_add_dx",
            format!(
                "dx {:?} {} must match x {:?} {}",
                dx.shape(),
                dx.dtype(),
                x.shape(),
                x.dtype()
            ),
        ));
    }
    backward_impl(pos, x, dy, spectrum, scaling, Some(dx), true)
}

fn backward_impl(
    pos: &WaveFtPositions,
    x: &Tensor,
    dy: &Tensor,
    spectrum: &Tensor,
    scaling: f32,
    dx: Option<&mut Tensor>,
    accumulate: bool,
) -> Result<Tensor> {
    let op = "waveft_backward";
    pos.check_spectrum(spectrum, op)?;
    let tokens = pos.check_act(x, pos.inp, "x", op)?;
    let td = pos.check_act(dy, pos.out, "dy", op)?;
    if td != tokens || dy.dtype() != x.dtype() || dy.shape()[..dy.rank() - 1] != x.shape()[..x.rank() - 1] {
        return Err(super::mismatch_with_x(op, "dy", dy, x));
    }
    match pos.device {
        Device::Cpu => {
            let s = spectrum.cpu_data::<f32>(op)?;
            let h = &pos.host;
            let (_, v_col) = cpu::synthesize(h, s, scaling);
            macro_rules! go {
                ($t:ty) => {{
                    let xs = x.cpu_data::<$t>(op)?;
                    let dys = dy.cpu_data::<$t>(op)?;
                    match dx {
                        Some(d) => {
                            let d = d.cpu_data_mut::<$t>(op)?;
                            cpu::backward(
                                xs,
                                dys,
                                tokens,
                                pos.inp,
                                pos.out,
                                h,
                                &v_col,
                                Some((d, accumulate)),
                            )
                        }
                        None => cpu::backward(xs, dys, tokens, pos.inp, pos.out, h, &v_col, None),
                    }
                }};
            }
            let g = match x.dtype() {
                DType::F32 => go!(f32),
                DType::F16 => go!(half::f16),
                DType::BF16 => go!(half::bf16),
                other => return Err(Error::dtype(op, "a float dtype", other)),
            };
            let ds = cpu::analyze(h, &g, scaling, pos.n_frequency());
            Tensor::from_vec(ds, &[pos.n_frequency()], Device::Cpu)
        }
        Device::Cuda(_) => cuda::backward(pos, x, dy, spectrum, scaling, dx, accumulate, tokens),
    }
}

/// Dense ΔW `[out, in]` (f32, on the structure's device), computed in f64 straight from the wavelet
/// filters and rounded once: for merging (`W += ΔW`), never used in training.
pub fn waveft_delta_weight(pos: &WaveFtPositions, spectrum: &Tensor, scaling: f32) -> Result<Tensor> {
    pos.check_spectrum(spectrum, "waveft_delta_weight")?;
    let s = spectrum.to_vec::<f32>()?;
    let d = structure::dense_delta_f64(
        pos.out,
        pos.inp,
        &pos.coef_row,
        &pos.coef_col,
        &s,
        scaling,
        pos.family.as_deref(),
    )?;
    let d: Vec<f32> = d.into_iter().map(|v| v as f32).collect();
    Tensor::from_vec(d, &[pos.out, pos.inp], pos.device)
}

/// One WaveFT-adapted linear layer (`y = x·Wᵀ + x·ΔWᵀ`, W frozen elsewhere). Holds the geometry, the
/// config and the precomputed [`WaveFtPositions`]; the spectrum is passed in so that the tape or the
/// parameter store owns it.
#[derive(Clone, Debug)]
pub struct WaveFtLayer {
    out: usize,
    inp: usize,
    config: WaveFtConfig,
    positions: WaveFtPositions,
}

impl WaveFtLayer {
    /// A layer with PEFT's positions for `cfg` on `device`.
    pub fn new(out: usize, inp: usize, cfg: &WaveFtConfig, device: Device) -> Result<WaveFtLayer> {
        let positions = WaveFtPositions::new(out, inp, cfg, device)?;
        Ok(WaveFtLayer {
            out,
            inp,
            config: cfg.clone(),
            positions,
        })
    }

    /// All target layers of a PEFT WaveFT config at once: resolves `n_frequency_pattern` and
    /// `proportional_parameters` over `modules = [(name, out, in)]` (see [`waveft_n_frequencies`]).
    pub fn for_modules(
        modules: &[(&str, usize, usize)],
        base: &WaveFtConfig,
        n_frequency_pattern: &BTreeMap<String, usize>,
        proportional_parameters: bool,
        device: Device,
    ) -> Result<Vec<WaveFtLayer>> {
        let ns = waveft_n_frequencies(
            modules,
            base.n_frequency,
            n_frequency_pattern,
            proportional_parameters,
        )?;
        modules
            .iter()
            .zip(ns)
            .map(|(&(name, out, inp), n)| {
                let cfg = WaveFtConfig {
                    n_frequency: n,
                    ..base.clone()
                };
                WaveFtLayer::new(out, inp, &cfg, device)
                    .map_err(|e| Error::invalid(format!("WaveFT module {name:?}: {e}")))
            })
            .collect()
    }

    /// Checks a loaded `waveft_spectrum` against this layer and returns it as f32 on the layer's device
    /// (PEFT saves `[n_frequency]` f32; f16/bf16 files are widened).
    pub fn from_spectrum(&self, spectrum: &Tensor) -> Result<Tensor> {
        if spectrum.shape() != [self.config.n_frequency] {
            return Err(Error::shape(
                "waveft_spectrum",
                format!(
                    "expected [{}] for a [{}, {}] layer with n_frequency {}, got {:?}",
                    self.config.n_frequency,
                    self.out,
                    self.inp,
                    self.config.n_frequency,
                    spectrum.shape()
                ),
            ));
        }
        spectrum.dtype().expect_float("waveft_spectrum")?;
        spectrum.to_dtype(DType::F32)?.to_device(self.positions.device())
    }

    /// A fresh spectrum: zeros (PEFT `init_weights=True`, an identity adapter) or `N(0, 0.01²)` from
    /// `seed` (PEFT `init_weights=False`; our generator, not torch's).
    pub fn init_spectrum(&self, init_weights: bool, seed: u64) -> Result<Tensor> {
        let n = [self.config.n_frequency];
        let dev = self.positions.device();
        if init_weights {
            Tensor::zeros(&n, DType::F32, dev)
        } else {
            Tensor::randn(&n, 0.01, seed, DType::F32, dev)
        }
    }

    /// `x·ΔWᵀ`: `x [.., in]` → `[.., out]` in x's dtype.
    pub fn forward_delta(&self, x: &Tensor, spectrum: &Tensor) -> Result<Tensor> {
        waveft_forward(&self.positions, x, spectrum, self.config.scaling)
    }

    /// `y += x·ΔWᵀ` in place.
    pub fn forward_delta_add(&self, x: &Tensor, spectrum: &Tensor, y: &mut Tensor) -> Result<()> {
        waveft_forward_add(&self.positions, x, spectrum, self.config.scaling, y)
    }

    /// `(dx, dspectrum)` of the adapter term; dx only when `need_dx`.
    pub fn backward_delta(
        &self,
        x: &Tensor,
        dy: &Tensor,
        spectrum: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        waveft_backward(&self.positions, x, dy, spectrum, self.config.scaling, need_dx)
    }

    /// dspectrum, with the adapter's dx term added into `dx` in place.
    pub fn backward_delta_add_dx(
        &self,
        x: &Tensor,
        dy: &Tensor,
        spectrum: &Tensor,
        dx: &mut Tensor,
    ) -> Result<Tensor> {
        waveft_backward_add_dx(&self.positions, x, dy, spectrum, self.config.scaling, dx)
    }

    /// Dense ΔW `[out, in]` f32 for merging.
    pub fn delta_weight(&self, spectrum: &Tensor) -> Result<Tensor> {
        waveft_delta_weight(&self.positions, spectrum, self.config.scaling)
    }

    /// The same layer on another device.
    pub fn to_device(&self, device: Device) -> Result<WaveFtLayer> {
        Ok(WaveFtLayer {
            positions: self.positions.to_device(device)?,
            ..self.clone()
        })
    }

    pub fn out_features(&self) -> usize {
        self.out
    }
    pub fn in_features(&self) -> usize {
        self.inp
    }
    pub fn config(&self) -> &WaveFtConfig {
        &self.config
    }
    pub fn positions(&self) -> &WaveFtPositions {
        &self.positions
    }
}
