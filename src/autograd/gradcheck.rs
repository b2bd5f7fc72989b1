//! Numerical gradient checks for the tests of every differentiable op and layer.
//!
//! [`finite_difference`] perturbs one element of a tensor at a time (in the tensor's own dtype, on its
//! own device) and takes central differences of a scalar function in f64. [`check_gradient`] compares
//! an analytic gradient against those differences and fails with a report of the worst elements.
//! [`finite_difference_f64`] does the same for a pure f64 reference function on a slice.
//!
//! Typical use for a layer `y = layer(x)`: pick a fixed random `r` of `y`'s shape, let
//! `f(x) = Σ layer(x)·r`, get the analytic gradient from `Tape::backward_with(y, r)`, then
//! `check_gradient("layer dx", f, &x, &grad, &GradCheckConfig::default())`.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use half::{bf16, f16};

fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn check_indices(indices: &[usize], n: usize) -> Result<()> {
    if let Some(&i) = indices.iter().find(|&&i| i >= n) {
        return Err(Error::invalid(format!(
            "finite_difference: index {i} is out of range for {n} elements"
        )));
    }
    Ok(())
}

/// Central finite differences of a scalar function of a parameter (f64-accumulated), for tests of
/// every layer: for each flat index `i`, `(f(at + h·e_i) - f(at - h·e_i)) / (2h)`.
///
/// The perturbed values are rounded to `at`'s dtype and the quotient divides by the step that was
/// actually taken, so f16/bf16 tensors give honest (if coarse) derivatives. `f` receives a tensor of
/// `at`'s shape, dtype and device.
pub fn finite_difference(
    mut f: impl FnMut(&Tensor) -> Result<f32>,
    at: &Tensor,
    eps: f32,
    indices: &[usize],
) -> Result<Vec<f32>> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::invalid(format!(
            "finite_difference: eps must be finite and > 0, got {eps}"
        )));
    }
    let (dtype, dev) = (at.dtype(), at.device());
    dtype.expect_float("finite_difference")?;
    let mut v = at.to_vec_f32()?;
    check_indices(indices, v.len())?;
    let make = |v: &[f32]| -> Result<Tensor> {
        Tensor::from_slice(v, at.shape(), Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    };
    let mut out = Vec::with_capacity(indices.len());
    for &i in indices {
        let x0 = v[i];
        let (xp, xm) = (round_to(x0 + eps, dtype), round_to(x0 - eps, dtype));
        if xp <= xm {
            return Err(Error::invalid(format!(
                "finite_difference: eps {eps} vanishes at value {x0} in {dtype}"
            )));
        }
        v[i] = xp;
        let fp = f(&make(&v)?)? as f64;
        v[i] = xm;
        let fm = f(&make(&v)?)? as f64;
        v[i] = x0;
        out.push(((fp - fm) / (xp as f64 - xm as f64)) as f32);
    }
    Ok(out)
}

/// Central finite differences of a pure f64 reference function: `(f(x + h·e_i) - f(x - h·e_i)) / 2h`.
pub fn finite_difference_f64(
    mut f: impl FnMut(&[f64]) -> f64,
    at: &[f64],
    eps: f64,
    indices: &[usize],
) -> Result<Vec<f64>> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::invalid(format!(
            "finite_difference_f64: eps must be finite and > 0, got {eps}"
        )));
    }
    check_indices(indices, at.len())?;
    let mut x = at.to_vec();
    Ok(indices
        .iter()
        .map(|&i| {
            let x0 = x[i];
            x[i] = x0 + eps;
            let fp = f(&x);
            x[i] = x0 - eps;
            let fm = f(&x);
            x[i] = x0;
            (fp - fm) / (2.0 * eps)
        })
        .collect())
}

/// Settings of [`check_gradient`].
#[derive(Clone, Debug)]
pub struct GradCheckConfig {
    /// Finite-difference step.
    pub eps: f32,
    /// Relative tolerance against the numeric value.
    pub rtol: f32,
    /// Absolute tolerance (covers the f32 rounding noise of `f` divided by `2·eps`).
    pub atol: f32,
    /// At most this many elements are checked: all of them for small tensors, otherwise the first,
    /// the last and a seeded random sample.
    pub max_points: usize,
    /// Seed of the sample.
    pub seed: u64,
}

impl Default for GradCheckConfig {
    /// `eps = 1e-2`, `rtol = 1e-2`, `atol = 1e-3`, 64 points: right for smooth f32 functions with
    /// values of order 1.
    fn default() -> Self {
        GradCheckConfig {
            eps: 1e-2,
            rtol: 1e-2,
            atol: 1e-3,
            max_points: 64,
            seed: 0,
        }
    }
}

/// What [`check_gradient`] compared.
#[derive(Clone, Debug)]
pub struct GradCheckReport {
    /// Number of elements checked.
    pub checked: usize,
    /// Largest `|analytic - numeric|`.
    pub max_abs_err: f32,
    /// Largest `|analytic - numeric| / max(|numeric|, atol)`.
    pub max_rel_err: f32,
}

/// The flat indices [`check_gradient`] checks for `n` elements.
pub fn sample_indices(n: usize, max_points: usize, seed: u64) -> Vec<usize> {
    if n <= max_points {
        return (0..n).collect();
    }
    let mut rng = Rng::new(seed);
    let mut idx: Vec<usize> = vec![0, n - 1];
    idx.dedup();
    while idx.len() < max_points.max(2) {
        idx.push(rng.below(n as u64) as usize);
        idx.sort_unstable();
        idx.dedup();
    }
    idx
}

/// Compares `analytic` (the gradient of `f` at `at`, same number of elements) with central finite
/// differences. Passes when `|analytic - numeric| <= atol + rtol·|numeric|` at every checked element;
/// otherwise returns an error naming `what` and listing the worst elements.
pub fn check_gradient(
    what: &str,
    f: impl FnMut(&Tensor) -> Result<f32>,
    at: &Tensor,
    analytic: &Tensor,
    cfg: &GradCheckConfig,
) -> Result<GradCheckReport> {
    if analytic.numel() != at.numel() {
        return Err(Error::shape(
            "check_gradient",
            format!("{what}: gradient {analytic:?} does not match point {at:?}"),
        ));
    }
    let indices = sample_indices(at.numel(), cfg.max_points, cfg.seed);
    let numeric = finite_difference(f, at, cfg.eps, &indices)?;
    let analytic = analytic.to_vec_f32()?;
    let mut report = GradCheckReport {
        checked: indices.len(),
        max_abs_err: 0.0,
        max_rel_err: 0.0,
    };
    let mut bad: Vec<(usize, f32, f32, f32)> = Vec::new();
    for (&i, &num) in indices.iter().zip(&numeric) {
        let a = analytic[i];
        let err = (a - num).abs();
        report.max_abs_err = report.max_abs_err.max(err);
        report.max_rel_err = report.max_rel_err.max(err / num.abs().max(cfg.atol));
        // A NaN on either side makes `pass` false.
        let pass = err <= cfg.atol + cfg.rtol * num.abs();
        if !pass {
            bad.push((i, a, num, err));
        }
    }
    if bad.is_empty() {
        return Ok(report);
    }
    bad.sort_by(|x, y| y.3.total_cmp(&x.3));
    let mut msg = format!(
        "gradient check of {what} failed at {} of {} elements (tolerance {} + {}·|numeric|, eps {}):",
        bad.len(),
        indices.len(),
        cfg.atol,
        cfg.rtol,
        cfg.eps
    );
    for (i, a, num, err) in bad.iter().take(8) {
        msg.push_str(&format!(
            "\n  index {i}: analytic {a:.6e}, numeric {num:.6e}, |err| {err:.3e}"
        ));
    }
    Err(Error::invalid(msg))
}
