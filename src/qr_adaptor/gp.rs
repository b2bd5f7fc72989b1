//! Phase III of QR-Adaptor: a Gaussian process over configurations (Rasmussen & Williams, "Gaussian
//! Processes for Machine Learning", 2006, Algorithm 2.1: Cholesky of `K + σ_n² I`) with the Matérn 5/2
//! kernel (ibid. eq. 4.17) and expected improvement (Jones, Schonlau, Welch, "Efficient Global
//! Optimization of Expensive Black-Box Functions", 1998). The Cholesky factorization and solves are
//! nalgebra's.
//!
//! Inputs are feature vectors (the search maps a candidate to its per-unit bit and rank positions in
//! [0, 1]); the prior mean is the mean of the observed targets, the signal variance their variance
//! (or 1 when they are all equal).

use crate::error::{Error, Result};
use nalgebra::{DMatrix, DVector};

/// Matérn 5/2: `σ² (1 + √5 d/ℓ + 5 d²/(3ℓ²)) exp(−√5 d/ℓ)` for Euclidean distance `d`.
pub fn matern52(a: &[f64], b: &[f64], lengthscale: f64, variance: f64) -> f64 {
    let d2: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let s = 5f64.sqrt() * d2.sqrt() / lengthscale;
    variance * (1.0 + s + s * s / 3.0) * (-s).exp()
}

/// A GP posterior conditioned on observations.
pub struct Gp {
    x: Vec<Vec<f64>>,
    mean: f64,
    lengthscale: f64,
    variance: f64,
    chol: nalgebra::Cholesky<f64, nalgebra::Dyn>,
    alpha: DVector<f64>,
}

impl Gp {
    /// Conditions on `(x[i], y[i])` with noise variance `noise` (added to the diagonal).
    pub fn fit(x: &[Vec<f64>], y: &[f64], lengthscale: f64, noise: f64) -> Result<Self> {
        if x.is_empty() || x.len() != y.len() {
            return Err(Error::invalid(format!(
                "GP: {} inputs and {} targets (need as many, at least one)",
                x.len(),
                y.len()
            )));
        }
        if lengthscale.is_nan()
            || lengthscale <= 0.0
            || noise.is_nan()
            || noise < 0.0
            || y.iter().any(|v| !v.is_finite())
        {
            return Err(Error::invalid(
                "GP: lengthscale must be > 0, noise >= 0, targets finite",
            ));
        }
        let n = x.len();
        let mean = y.iter().sum::<f64>() / n as f64;
        let var = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        let variance = if var > 1e-12 { var } else { 1.0 };
        let k = DMatrix::from_fn(n, n, |i, j| {
            matern52(&x[i], &x[j], lengthscale, variance)
                + if i == j { noise + 1e-10 * variance } else { 0.0 }
        });
        let chol = k
            .cholesky()
            .ok_or_else(|| Error::invalid("GP: the kernel matrix is not positive definite"))?;
        let alpha = chol.solve(&DVector::from_iterator(n, y.iter().map(|v| v - mean)));
        Ok(Gp {
            x: x.to_vec(),
            mean,
            lengthscale,
            variance,
            chol,
            alpha,
        })
    }

    /// Posterior mean and variance (of the latent function, without noise) at `z`.
    pub fn predict(&self, z: &[f64]) -> (f64, f64) {
        let ks = DVector::from_iterator(
            self.x.len(),
            self.x
                .iter()
                .map(|xi| matern52(xi, z, self.lengthscale, self.variance)),
        );
        let mu = self.mean + ks.dot(&self.alpha);
        let v = self
            .chol
            .l()
            .solve_lower_triangular(&ks)
            .unwrap_or_else(|| ks.clone());
        let var = (self.variance - v.dot(&v)).max(0.0);
        (mu, var)
    }
}

/// Standard normal density.
pub fn normal_pdf(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Standard normal distribution function.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// Expected improvement of maximizing over `best` (with exploration margin `xi`) for a Gaussian
/// posterior `(mu, var)`: `(μ − best − ξ) Φ(u) + σ φ(u)`, `u = (μ − best − ξ)/σ`; `max(μ − best − ξ, 0)`
/// when σ = 0.
pub fn expected_improvement(mu: f64, var: f64, best: f64, xi: f64) -> f64 {
    let d = mu - best - xi;
    let s = var.max(0.0).sqrt();
    if s <= 1e-15 {
        return d.max(0.0);
    }
    let u = d / s;
    d * normal_cdf(u) + s * normal_pdf(u)
}
