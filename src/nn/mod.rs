//! Tape ops for transformer models: embedding gathers, LayerNorm, the broadcast bias add, tanh,
//! dropout, CLS / masked-mean pooling and row selection (BERT), RMSNorm and rotary embeddings (Llama) — each as a plain tensor function (forward and
//! backward side by side, for callers without the tape) and as a [`Tape`] method.
//!
//! Activations are token-major 2-D tensors `[batch·seq, features]` (what a linear produces) in
//! f32/f16/bf16; half dtypes compute in f32 and round once per output element. Frozen tensors
//! (embedding tables, LayerNorm affine, bias rows) are plain `&Tensor`s: no gradient flows into them.
//! Token ids and masks are host slices, uploaded by the op when the tensors live on a GPU.
//!
//! Backends: `cpu.rs` (rayon, 8-lane f32 reductions) and `kernels/nn.cu` through `cuda.rs`.
//!
//! ```
//! use peft_kernels::autograd::{ParamStore, Tape};
//! use peft_kernels::{DType, Device, Tensor};
//! let dev = Device::Cpu;
//! let table = Tensor::randn(&[10, 8], 1.0, 0, DType::F32, dev)?;  // [vocab, hidden]
//! let (w, b) = (Tensor::full(&[8], 1.0, DType::F32, dev)?, Tensor::zeros(&[8], DType::F32, dev)?);
//! let mut tape = Tape::new();
//! let h = tape.embedding(&table, &[1, 4, 9, 0, 0, 2])?;       // batch 2, seq 3 -> [6, 8]
//! let h = tape.layer_norm(h, &w, &b, 1e-12)?;
//! let pooled = tape.mean_pool(h, &[1, 1, 1, 1, 0, 0], 2, 3)?; // [2, 8]
//! assert_eq!(tape.value(pooled)?.shape(), &[2, 8]);
//! # Ok::<(), peft_kernels::Error>(())
//! ```

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub(crate) mod cuda;

use crate::autograd::ops::{cpu_float, unary};
use crate::autograd::{Activation, Tape, Var};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use half::{bf16, f16};

/// `(rows, cols)` of a 2-D float tensor.
fn rows_cols(x: &Tensor, op: &'static str) -> Result<(usize, usize)> {
    x.dtype().expect_float(op)?;
    match x.shape() {
        [r, c] => Ok((*r, *c)),
        s => Err(Error::shape(
            op,
            format!("expected a 2-D [rows, features] tensor, got {s:?}"),
        )),
    }
}

/// A frozen vector `[h]` (any float dtype, `x`'s device) as f32, for the affine parameters and bias
/// rows (cheap: `h` elements).
fn frozen_row(v: &Tensor, h: usize, dev: Device, what: &str, op: &'static str) -> Result<Tensor> {
    v.dtype().expect_float(op)?;
    if v.shape() != [h] {
        return Err(Error::shape(
            op,
            format!("{what} must be [{h}] (the feature size), got {:?}", v.shape()),
        ));
    }
    if v.device() != dev {
        return Err(Error::device(
            op,
            format!("{what} is on {} but the input is on {dev}", v.device()),
        ));
    }
    if v.dtype() == DType::F32 {
        Ok(v.clone())
    } else {
        v.to_dtype(DType::F32)
    }
}

/// Every index `< n`, else a named error.
fn check_indices(idx: &[u32], n: usize, what: &str, op: &'static str) -> Result<()> {
    if let Some((j, &i)) = idx.iter().enumerate().find(|&(_, &i)| i as usize >= n) {
        return Err(Error::invalid(format!(
            "{op}: {what} {i} at position {j} is out of range for {n} rows"
        )));
    }
    Ok(())
}

/// The inverse of a row index `idx` into `n` rows, in CSR form: the positions `j` with `idx[j] = r`
/// are `order[offsets[r]..offsets[r + 1]]`, increasing. Lets the scatter-add backward of a gather sum
/// each output row in a fixed order with no atomics (deterministic on every device).
pub(crate) struct InverseIndex {
    pub(crate) offsets: Vec<u32>,
    pub(crate) order: Vec<u32>,
}

impl InverseIndex {
    fn new(idx: &[u32], n: usize, op: &'static str) -> Result<Self> {
        if idx.len() > u32::MAX as usize {
            return Err(Error::invalid(format!("{op}: {} indices exceed u32", idx.len())));
        }
        let mut offsets = vec![0u32; n + 1];
        for &i in idx {
            offsets[i as usize + 1] += 1;
        }
        for r in 0..n {
            offsets[r + 1] += offsets[r];
        }
        let mut next = offsets.clone();
        let mut order = vec![0u32; idx.len()];
        for (j, &i) in idx.iter().enumerate() {
            let slot = &mut next[i as usize];
            order[*slot as usize] = j as u32;
            *slot += 1;
        }
        Ok(InverseIndex { offsets, order })
    }
}

// ------------------------------------------------------------------------------ gathers

/// Rows of `x [n, h]` selected by `idx`: `[idx.len(), h]`, `y[j] = x[idx[j]]`. An index `>= n` is an
/// error. Any dtype (the copy is bitwise).
pub fn gather_rows(x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    gather_impl(x, idx, "gather_rows", "index")
}

fn gather_impl(x: &Tensor, idx: &[u32], op: &'static str, what: &str) -> Result<Tensor> {
    let (n, h) = rows_cols(x, op)?;
    check_indices(idx, n, what, op)?;
    let shape = [idx.len(), h];
    match x.device() {
        Device::Cpu => cpu_float!(x, op, |v: T| Tensor::from_vec(
            cpu::gather_rows::<T>(v, idx, h),
            &shape,
            Device::Cpu
        )),
        Device::Cuda(_) => cuda::gather_rows(x, idx, h),
    }
}

/// Gradient of [`gather_rows`] into `n` rows: `dx[r] = Σ_{j: idx[j] = r} dy[j]` (f32 accumulation in
/// increasing `j`, one rounding; deterministic), zero rows where nothing was gathered.
pub fn gather_rows_backward(dy: &Tensor, idx: &[u32], n: usize) -> Result<Tensor> {
    let op = "gather_rows_backward";
    let (m, h) = rows_cols(dy, op)?;
    if m != idx.len() {
        return Err(Error::shape(
            op,
            format!("{m} gradient rows for {} indices", idx.len()),
        ));
    }
    check_indices(idx, n, "index", op)?;
    let inv = InverseIndex::new(idx, n, op)?;
    match dy.device() {
        Device::Cpu => cpu_float!(dy, op, |v: T| Tensor::from_vec(
            cpu::scatter_add_rows::<T>(v, &inv.offsets, &inv.order, n, h),
            &[n, h],
            Device::Cpu
        )),
        Device::Cuda(_) => cuda::scatter_add_rows(dy, &inv, n, h),
    }
}

/// Rows of a frozen table `[vocab, hidden]` gathered by token ids: `[ids.len(), hidden]`. An id `>=
/// vocab` is an error.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    gather_impl(table, ids, "embedding", "token id")
}

/// Row `t·seq` of each sequence: `[batch·seq, h] -> [batch, h]` (BERT's CLS token).
fn cls_indices(x: &Tensor, batch: usize, seq: usize, op: &'static str) -> Result<Vec<u32>> {
    let (n, _) = rows_cols(x, op)?;
    check_batch(n, batch, seq, op)?;
    if n > u32::MAX as usize {
        return Err(Error::invalid(format!("{op}: {n} rows exceed u32")));
    }
    Ok((0..batch).map(|b| (b * seq) as u32).collect())
}

fn check_batch(rows: usize, batch: usize, seq: usize, op: &'static str) -> Result<()> {
    if batch.checked_mul(seq) != Some(rows) || seq == 0 {
        return Err(Error::shape(
            op,
            format!("{rows} rows are not batch {batch} x seq {seq} (seq must be > 0)"),
        ));
    }
    Ok(())
}

/// The first token of each sequence: `[batch·seq, h] -> [batch, h]` (BERT's `[CLS]` pooling).
pub fn cls_pool(x: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
    gather_rows(x, &cls_indices(x, batch, seq, "cls_pool")?)
}

// ------------------------------------------------------------------------------ mean pooling

/// Tokens per sequence as f32 (the divisor), after checking that the mask is 0/1 and fits.
fn mask_counts(mask: &[u8], batch: usize, seq: usize, op: &'static str) -> Result<Vec<f32>> {
    if mask.len() != batch * seq {
        return Err(Error::shape(
            op,
            format!("mask has {} entries for batch {batch} x seq {seq}", mask.len()),
        ));
    }
    if let Some((i, &m)) = mask.iter().enumerate().find(|&(_, &m)| m > 1) {
        return Err(Error::invalid(format!(
            "{op}: mask value {m} at {i} is not 0 or 1"
        )));
    }
    Ok(mask
        .chunks(seq.max(1))
        .map(|c| c.iter().map(|&m| m as u32).sum::<u32>() as f32)
        .collect())
}

/// Masked mean over each sequence: `[batch·seq, h] -> [batch, h]`, `y[b] = Σ_t mask·x[b·seq + t] /
/// Σ_t mask` (sentence-transformers' mean pooling). `mask` is `[batch·seq]` of 0/1; a sequence with no
/// unmasked token gives a zero row (where torch's `clamp(min=1e-9)` gives 0 as well).
pub fn mean_pool(x: &Tensor, mask: &[u8], batch: usize, seq: usize) -> Result<Tensor> {
    let op = "mean_pool";
    let (n, h) = rows_cols(x, op)?;
    check_batch(n, batch, seq, op)?;
    let counts = mask_counts(mask, batch, seq, op)?;
    match x.device() {
        Device::Cpu => cpu_float!(x, op, |v: T| Tensor::from_vec(
            cpu::mean_pool::<T>(v, mask, &counts, seq, h),
            &[batch, h],
            Device::Cpu
        )),
        Device::Cuda(_) => cuda::mean_pool(x, mask, &counts, seq, h, false),
    }
}

/// Gradient of [`mean_pool`]: `dx[b·seq + t] = mask·dy[b] / Σ_t mask`, `[batch, h] -> [batch·seq, h]`.
pub fn mean_pool_backward(dy: &Tensor, mask: &[u8], batch: usize, seq: usize) -> Result<Tensor> {
    let op = "mean_pool_backward";
    let (b, h) = rows_cols(dy, op)?;
    if b != batch || seq == 0 {
        return Err(Error::shape(
            op,
            format!("gradient has {b} rows for batch {batch} (seq {seq} must be > 0)"),
        ));
    }
    let counts = mask_counts(mask, batch, seq, op)?;
    match dy.device() {
        Device::Cpu => cpu_float!(dy, op, |v: T| Tensor::from_vec(
            cpu::mean_pool_backward::<T>(v, mask, &counts, seq, h),
            &[batch * seq, h],
            Device::Cpu
        )),
        Device::Cuda(_) => cuda::mean_pool(dy, mask, &counts, seq, h, true),
    }
}

// ------------------------------------------------------------------------------ add_row

/// `y[i, :] = x[i, :] + row` for a frozen `row [h]` (any float dtype, x's device); f32 math, one
/// rounding to x's dtype. The gradient to `x` is the upstream gradient unchanged.
pub fn add_row(x: &Tensor, row: &Tensor) -> Result<Tensor> {
    let op = "add_row";
    let (_, h) = rows_cols(x, op)?;
    let row = frozen_row(row, h, x.device(), "the row", op)?;
    match x.device() {
        Device::Cpu => {
            let r = row.cpu_data::<f32>(op)?;
            cpu_float!(x, op, |v: T| Tensor::from_vec(
                cpu::add_row::<T>(v, r),
                x.shape(),
                Device::Cpu
            ))
        }
        Device::Cuda(_) => cuda::add_row(x, &row),
    }
}

// ------------------------------------------------------------------------------ LayerNorm, RMSNorm

/// The two row normalizations; they share validation, dispatch and the saved-state layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Norm {
    /// torch `layer_norm`: stats `[rows, 2]` of `[mean, rstd]`.
    Layer,
    /// transformers `LlamaRMSNorm`: stats `[rows]` of `rstd`.
    Rms,
}

impl Norm {
    fn name(self, backward: bool) -> &'static str {
        match (self, backward) {
            (Norm::Layer, false) => "layer_norm",
            (Norm::Layer, true) => "layer_norm_backward",
            (Norm::Rms, false) => "rms_norm",
            (Norm::Rms, true) => "rms_norm_backward",
        }
    }

    fn stats_shape(self, rows: usize) -> Vec<usize> {
        match self {
            Norm::Layer => vec![rows, 2],
            Norm::Rms => vec![rows],
        }
    }
}

/// The f32 weight and per-row f32 statistics of a normalization's forward pass, so that the backward
/// never recomputes them.
#[derive(Clone, Debug)]
struct NormSaved {
    weight: Tensor,
    stats: Tensor,
}

/// What [`layer_norm_backward`] needs besides `x` and `dy`: the f32 weight and the per-row f32
/// `[rows, 2]` statistics `[mean, rstd]` of the forward pass.
#[derive(Clone, Debug)]
pub struct LayerNormSaved(NormSaved);

impl LayerNormSaved {
    /// The per-row `[mean, 1/sqrt(var + eps)]` statistics, f32 `[rows, 2]`.
    pub fn stats(&self) -> &Tensor {
        &self.0.stats
    }
}

/// What [`rms_norm_backward`] needs: the f32 weight and the per-row f32 `[rows]` of
/// `1/sqrt(mean(x²) + eps)`.
#[derive(Clone, Debug)]
pub struct RmsNormSaved(NormSaved);

impl RmsNormSaved {
    /// The per-row `1/sqrt(mean(x²) + eps)`, f32 `[rows]`.
    pub fn rstd(&self) -> &Tensor {
        &self.0.stats
    }
}

fn norm_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f32,
    norm: Norm,
) -> Result<(Tensor, NormSaved)> {
    let op = norm.name(false);
    let (rows, h) = rows_cols(x, op)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(format!(
            "{op}: eps must be finite and >= 0, got {eps}"
        )));
    }
    if h == 0 {
        return Err(Error::shape(op, "the feature dimension is empty"));
    }
    let dev = x.device();
    let w = frozen_row(weight, h, dev, "weight", op)?;
    let b = bias.map(|b| frozen_row(b, h, dev, "bias", op)).transpose()?;
    let (y, stats) = match dev {
        Device::Cpu => {
            let wv = w.cpu_data::<f32>(op)?;
            let bv = b.as_ref().map(|b| b.cpu_data::<f32>(op)).transpose()?;
            let (y, stats) = cpu_float!(x, op, |v: T| {
                let (y, s) = match bv {
                    Some(bv) => cpu::layer_norm::<T>(v, wv, bv, eps),
                    None => cpu::rms_norm::<T>(v, wv, eps),
                };
                (Tensor::from_vec(y, x.shape(), Device::Cpu)?, s)
            });
            (y, Tensor::from_vec(stats, &norm.stats_shape(rows), Device::Cpu)?)
        }
        Device::Cuda(_) => cuda::norm_forward(x, &w, b.as_ref(), eps, norm)?,
    };
    Ok((y, NormSaved { weight: w, stats }))
}

fn norm_backward(x: &Tensor, dy: &Tensor, saved: &NormSaved, norm: Norm) -> Result<Tensor> {
    let op = norm.name(true);
    let (rows, h) = rows_cols(x, op)?;
    x.check_same_device(dy, op)?;
    x.check_same_dtype(dy, op)?;
    x.check_same_shape(dy, op)?;
    if saved.weight.shape() != [h]
        || saved.stats.shape() != norm.stats_shape(rows)
        || saved.stats.device() != x.device()
    {
        return Err(Error::shape(
            op,
            format!("saved state {:?} does not match input {x:?}", saved.stats),
        ));
    }
    match x.device() {
        Device::Cpu => {
            let (w, st) = (
                saved.weight.cpu_data::<f32>(op)?,
                saved.stats.cpu_data::<f32>(op)?,
            );
            cpu_float!(x, op, |v: T| {
                let dy = dy.cpu_data::<T>(op)?;
                let dx = match norm {
                    Norm::Layer => cpu::layer_norm_backward::<T>(v, dy, w, st),
                    Norm::Rms => cpu::rms_norm_backward::<T>(v, dy, w, st),
                };
                Tensor::from_vec(dx, x.shape(), Device::Cpu)
            })
        }
        Device::Cuda(_) => cuda::norm_backward(x, dy, &saved.weight, &saved.stats, norm),
    }
}

/// LayerNorm over the last dimension of `x [rows, h]` with torch's semantics (biased variance, `eps`
/// inside the square root): `y = (x - mean)/sqrt(var + eps)·weight + bias`. `weight` and `bias` are
/// frozen `[h]` vectors of any float dtype on x's device; statistics and math are f32 for every dtype
/// (torch's CPU/CUDA kernels also compute in f32 for half inputs). Returns `y` (x's dtype) and what the
/// backward needs.
pub fn layer_norm_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<(Tensor, LayerNormSaved)> {
    let (y, saved) = norm_forward(x, weight, Some(bias), eps, Norm::Layer)?;
    Ok((y, LayerNormSaved(saved)))
}

/// [`layer_norm_forward`] without the saved state.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(layer_norm_forward(x, weight, bias, eps)?.0)
}

/// LayerNorm input gradient: with `x̂ = (x - mean)·rstd` and `g = dy·weight`,
/// `dx = rstd·(g - mean(g) - x̂·mean(g·x̂))`, in x's dtype (f32 math).
pub fn layer_norm_backward(x: &Tensor, dy: &Tensor, saved: &LayerNormSaved) -> Result<Tensor> {
    norm_backward(x, dy, &saved.0, Norm::Layer)
}

/// RMSNorm over the last dimension of `x [rows, h]` exactly as transformers' `LlamaRMSNorm`: in f32,
/// `x̂ = x / sqrt(mean(x²) + eps)`, cast back to x's dtype, times the frozen `weight [h]` (any float
/// dtype on x's device), rounded to x's dtype. Returns `y` and what the backward needs.
pub fn rms_norm_forward(x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, RmsNormSaved)> {
    let (y, saved) = norm_forward(x, weight, None, eps, Norm::Rms)?;
    Ok((y, RmsNormSaved(saved)))
}

/// [`rms_norm_forward`] without the saved state.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(rms_norm_forward(x, weight, eps)?.0)
}

/// RMSNorm input gradient: with `r = 1/sqrt(mean(x²) + eps)`, `x̂ = x·r`, `g = dy·weight`,
/// `dx = r·(g - x̂·mean(g·x̂))`, in x's dtype (f32 math).
pub fn rms_norm_backward(x: &Tensor, dy: &Tensor, saved: &RmsNormSaved) -> Result<Tensor> {
    norm_backward(x, dy, &saved.0, Norm::Rms)
}

// ------------------------------------------------------------------------------ RoPE

/// `rope_scaling` of a Llama-family `config.json` (transformers' `ROPE_INIT_FUNCTIONS`). `dynamic`
/// (NTK scaling that depends on the sequence length) is not supported.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "default"` (or no `rope_scaling`).
    None,
    /// `rope_type: "linear"`: every inverse frequency divided by `factor` (positions interpolated).
    Linear {
        /// The interpolation factor.
        factor: f32,
    },
    /// `rope_type: "llama3"` (Llama 3.1+): low frequencies divided by `factor`, high ones kept, a
    /// smooth blend in between (transformers' `_compute_llama3_parameters`).
    Llama3 {
        /// `factor` (8 for Llama 3.1).
        factor: f32,
        /// `low_freq_factor` (1).
        low_freq_factor: f32,
        /// `high_freq_factor` (4).
        high_freq_factor: f32,
        /// `original_max_position_embeddings` (8192).
        original_max_position_embeddings: usize,
    },
}

/// Rotary embedding settings of one attention projection: `head_dim` (even, at most 1024), the base
/// `theta` (`rope_theta`, 10000 for Llama 2, 500000 for Llama 3) and the scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// Features per head (the rotated pairs are `i` and `i + head_dim/2`, transformers' `rotate_half`).
    pub head_dim: usize,
    /// `rope_theta`.
    pub theta: f32,
    /// `rope_scaling`.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The `head_dim/2` inverse frequencies in f32, computed as transformers does in f32:
    /// `1 / theta^(2i/head_dim)`, then the scaling.
    pub fn inv_freq(&self) -> Result<Vec<f32>> {
        let d = self.head_dim;
        if d == 0 || !d.is_multiple_of(2) || d > 1024 {
            return Err(Error::invalid(format!(
                "rope: head_dim must be even and in 2..=1024, got {d}"
            )));
        }
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(Error::invalid(format!(
                "rope: theta must be > 1, got {}",
                self.theta
            )));
        }
        // pow in f64 of the f32 operands, rounded once: within torch's f32 pow by an ulp.
        let base: Vec<f32> = (0..d / 2)
            .map(|i| {
                let e = (2 * i) as f32 / d as f32;
                1.0 / ((self.theta as f64).powf(e as f64) as f32)
            })
            .collect();
        match self.scaling {
            RopeScaling::None => Ok(base),
            RopeScaling::Linear { factor } => {
                check_factor(factor)?;
                Ok(base.into_iter().map(|f| f / factor).collect())
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                check_factor(factor)?;
                if !(low_freq_factor.is_finite()
                    && high_freq_factor.is_finite()
                    && high_freq_factor > low_freq_factor
                    && low_freq_factor > 0.0
                    && original_max_position_embeddings > 0)
                {
                    return Err(Error::invalid(format!(
                        "rope llama3: need 0 < low_freq_factor < high_freq_factor and a positive original context, got {low_freq_factor}, {high_freq_factor}, {original_max_position_embeddings}"
                    )));
                }
                let old = original_max_position_embeddings as f32;
                let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
                Ok(base
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wl { f / factor } else { f };
                        if wavelen < high_wl || wavelen > low_wl {
                            scaled
                        } else {
                            let smooth =
                                (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect())
            }
        }
    }
}

fn check_factor(factor: f32) -> Result<()> {
    if factor.is_finite() && factor > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "rope: scaling factor must be > 0, got {factor}"
        )))
    }
}

fn rope_impl(x: &Tensor, positions: &[u32], cfg: &RopeConfig, backward: bool) -> Result<Tensor> {
    let op = if backward { "rope_backward" } else { "rope" };
    let (tokens, width) = rows_cols(x, op)?;
    let inv_freq = cfg.inv_freq()?;
    if !width.is_multiple_of(cfg.head_dim) {
        return Err(Error::shape(
            op,
            format!("{width} features are not whole heads of {}", cfg.head_dim),
        ));
    }
    if positions.len() != tokens {
        return Err(Error::shape(
            op,
            format!("{} positions for {tokens} tokens", positions.len()),
        ));
    }
    match x.device() {
        Device::Cpu => cpu_float!(x, op, |v: T| Tensor::from_vec(
            cpu::rope::<T>(v, positions, &inv_freq, width, backward),
            x.shape(),
            Device::Cpu
        )),
        Device::Cuda(_) => cuda::rope(x, positions, &inv_freq, backward),
    }
}

/// Rotary position embedding of `x [tokens, heads·head_dim]` (token-major, as a q or k projection
/// produces it) exactly as transformers' Llama: `x·cos + rotate_half(x)·sin` per head, with cos/sin of
/// `positions[t]·inv_freq` computed in f32 and cast to x's dtype, and the products and sum rounded to
/// x's dtype as torch does (no-ops in f32).
pub fn rope(x: &Tensor, positions: &[u32], cfg: &RopeConfig) -> Result<Tensor> {
    rope_impl(x, positions, cfg, false)
}

/// Gradient of [`rope`]: the inverse rotation, `dy·cos - rotate_half(dy)·sin`.
pub fn rope_backward(dy: &Tensor, positions: &[u32], cfg: &RopeConfig) -> Result<Tensor> {
    rope_impl(dy, positions, cfg, true)
}

// ------------------------------------------------------------------------------ tape records

impl Tape {
    /// Rows of a frozen table `[vocab, hidden]` gathered by `ids`: `[ids.len(), hidden]` (word,
    /// token-type and position embeddings). An id `>= vocab` is an error. No gradient flows (the table
    /// is frozen), so the result is a constant on the tape.
    pub fn embedding(&mut self, table: &Tensor, ids: &[u32]) -> Result<Var> {
        Ok(self.leaf(embedding(table, ids)?))
    }

    /// LayerNorm over the last dimension (torch semantics, biased variance) with a frozen affine
    /// `weight`, `bias` `[hidden]`; the gradient flows to `x` only. See [`layer_norm_forward`].
    pub fn layer_norm(&mut self, x: Var, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Var> {
        let (y, saved) = layer_norm_forward(self.value(x)?, weight, bias, eps)?;
        let back = move |g: &Tensor, x: &Tensor| layer_norm_backward(x, g, &saved);
        self.record(&[x], y, unary("layer_norm", back))
    }

    /// `x + row` broadcast over the rows of `x [n, hidden]`, for a frozen `row [hidden]` (a bias).
    pub fn add_row(&mut self, x: Var, row: &Tensor) -> Result<Var> {
        let y = add_row(self.value(x)?, row)?;
        self.record(&[x], y, unary("add_row", |g, _| Ok(g.clone())))
    }

    /// `tanh(x)` (BERT's pooler activation); the same as `activation(x, Activation::Tanh)`.
    pub fn tanh(&mut self, x: Var) -> Result<Var> {
        self.activation(x, Activation::Tanh)
    }

    /// Inverted dropout with the crate's hash mask ([`Tensor::dropout`]): elements are zeroed with
    /// probability `p` and the rest scaled by `1/(1-p)`; the backward regenerates the mask from `seed`.
    /// `p = 0` is the identity. Use a fresh seed per step and per call site.
    pub fn dropout(&mut self, x: Var, p: f32, seed: u64) -> Result<Var> {
        let y = self.value(x)?.dropout(p, seed)?;
        // Inverted dropout is linear in x with the same mask: `dx = dropout(dy)` with the same seed
        // regenerates it (the hash depends only on the seed and the flat index).
        self.record(&[x], y, unary("dropout", move |g, _| g.dropout(p, seed)))
    }

    /// `[batch·seq, h] -> [batch, h]`: row 0 of each sequence (BERT's CLS pooling).
    pub fn cls_pool(&mut self, x: Var, batch: usize, seq: usize) -> Result<Var> {
        let idx = cls_indices(self.value(x)?, batch, seq, "cls_pool")?;
        self.gather_rows(x, &idx)
    }

    /// Masked mean over each sequence (`mask [batch·seq]` of 0/1): `[batch·seq, h] -> [batch, h]`. See
    /// [`mean_pool`].
    pub fn mean_pool(&mut self, x: Var, mask: &[u8], batch: usize, seq: usize) -> Result<Var> {
        let y = mean_pool(self.value(x)?, mask, batch, seq)?;
        let mask = mask.to_vec();
        let back = move |g: &Tensor, _: &Tensor| mean_pool_backward(g, &mask, batch, seq);
        self.record(&[x], y, unary("mean_pool", back))
    }

    /// RMSNorm (transformers' `LlamaRMSNorm`) with a frozen `weight [hidden]`; gradient to `x` only.
    /// See [`rms_norm_forward`].
    pub fn rms_norm(&mut self, x: Var, weight: &Tensor, eps: f32) -> Result<Var> {
        let (y, saved) = rms_norm_forward(self.value(x)?, weight, eps)?;
        let back = move |g: &Tensor, x: &Tensor| rms_norm_backward(x, g, &saved);
        self.record(&[x], y, unary("rms_norm", back))
    }

    /// Rotary position embedding of `x [tokens, heads·head_dim]` at `positions [tokens]`, exactly as
    /// transformers' Llama. See [`rope`].
    pub fn rope(&mut self, x: Var, positions: &[u32], cfg: &RopeConfig) -> Result<Var> {
        let y = rope(self.value(x)?, positions, cfg)?;
        let (positions, cfg) = (positions.to_vec(), *cfg);
        let back = move |g: &Tensor, _: &Tensor| rope_backward(g, &positions, &cfg);
        self.record(&[x], y, unary("rope", back))
    }

    /// Selected rows (e.g. the last non-pad token of each sequence): `[n, h] -> [idx.len(), h]`. An
    /// index may repeat (the gradients add up); an index `>= n` is an error.
    pub fn gather_rows(&mut self, x: Var, idx: &[u32]) -> Result<Var> {
        let xv = self.value(x)?;
        let rows = xv.shape().first().copied().unwrap_or(0);
        let y = gather_rows(xv, idx)?;
        let idx = idx.to_vec();
        let back = move |g: &Tensor, _: &Tensor| gather_rows_backward(g, &idx, rows);
        self.record(&[x], y, unary("gather_rows", back))
    }
}
