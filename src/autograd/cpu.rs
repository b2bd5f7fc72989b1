//! CPU twins of `kernels/autograd.cu`: activations and their derivatives, MSE, cross-entropy and the
//! sum of squares behind the gradient norm. Math is f32 with one rounding per output element (exactly
//! what the CUDA kernels do); the reductions accumulate in f64, which makes them the accurate side of
//! every CUDA-vs-CPU comparison.
//!
//! Napkin math (all memory bound, per element): activation forward reads x and writes y
//! (2·sizeof(T) B); backward reads x and dy and writes dx (3·sizeof(T) B). Even GELU-erf costs ~20
//! FLOPs per element, far below the ~100 FLOP/B a CPU core can do, once vectorized (`cpu/gelu.rs`;
//! libm's scalar `erff` was ~14% of a MiniLM training step).

use super::ops::Activation;
use crate::error::{Error, Result};
use crate::tensor::cpu::CHUNK;
use crate::tensor::exp::exp_sub2;
use crate::tensor::{DType, Element};
use rayon::prelude::*;

mod gelu;

/// sqrt(2/π), the tanh-GELU scale (torch's `kBeta = M_SQRT2 * M_2_SQRTPI * 0.5` for approximate="tanh").
pub(crate) const GELU_TANH_BETA: f32 =
    (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
/// The cubic coefficient of the tanh-GELU (torch's `kKappa`).
pub(crate) const GELU_TANH_KAPPA: f32 = 0.044_715;
/// 1/sqrt(2π), the standard normal density at 0.
pub(crate) const INV_SQRT_2PI: f32 =
    (std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2 * 0.5) as f32;

/// `act(x)` in f32. NaN propagates (relu(NaN) = NaN, like torch).
#[inline(always)]
pub(crate) fn act_forward(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Relu => {
            if x < 0.0 {
                0.0
            } else {
                x
            }
        }
        Activation::Gelu => {
            let inner = GELU_TANH_BETA * (x + GELU_TANH_KAPPA * x * x * x);
            0.5 * x * (1.0 + inner.tanh())
        }
        Activation::GeluErf => gelu::gelu(x),
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Tanh => x.tanh(),
    }
}

/// `d act(x) / dx` in f32 (relu: 0 at x <= 0, like torch's threshold_backward).
#[inline(always)]
pub(crate) fn act_derivative(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Relu => {
            if x <= 0.0 {
                0.0
            } else {
                1.0
            }
        }
        Activation::Gelu => {
            let x2 = x * x;
            let t = (GELU_TANH_BETA * (x + GELU_TANH_KAPPA * x2 * x)).tanh();
            let d_inner = GELU_TANH_BETA * (1.0 + 3.0 * GELU_TANH_KAPPA * x2);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner
        }
        Activation::GeluErf => gelu::gelu_derivative(x),
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        }
        Activation::Tanh => {
            let t = x.tanh();
            1.0 - t * t
        }
    }
}

/// Elements an f16/bf16 GELU converts to f32 at a time.
const GELU_TILE: usize = 256;
/// Logits cross-entropy exponentiates at a time (a stack buffer).
const EXP_TILE: usize = 512;

/// `y = gelu_erf(x)` on one chunk: the vectorized kernel, directly on f32 or through f32 tiles.
fn gelu_chunk<T: Element>(x: &[T], y: &mut [T]) {
    if T::DTYPE == DType::F32 {
        gelu::forward(bytemuck::cast_slice(x), bytemuck::cast_slice_mut(y));
        return;
    }
    let (mut xf, mut yf) = ([0f32; GELU_TILE], [0f32; GELU_TILE]);
    for (x, y) in x.chunks(GELU_TILE).zip(y.chunks_mut(GELU_TILE)) {
        let n = x.len();
        xf[..n].iter_mut().zip(x).for_each(|(f, v)| *f = v.to_f32());
        gelu::forward(&xf[..n], &mut yf[..n]);
        y.iter_mut().zip(&yf[..n]).for_each(|(v, &f)| *v = T::from_f32(f));
    }
}

/// `dx = dy · gelu_erf'(x)` on one chunk (see [`gelu_chunk`]).
fn gelu_backward_chunk<T: Element>(x: &[T], dy: &[T], dx: &mut [T]) {
    if T::DTYPE == DType::F32 {
        gelu::backward(
            bytemuck::cast_slice(x),
            bytemuck::cast_slice(dy),
            bytemuck::cast_slice_mut(dx),
        );
        return;
    }
    let (mut xf, mut gf, mut of) = ([0f32; GELU_TILE], [0f32; GELU_TILE], [0f32; GELU_TILE]);
    for ((x, dy), dx) in x
        .chunks(GELU_TILE)
        .zip(dy.chunks(GELU_TILE))
        .zip(dx.chunks_mut(GELU_TILE))
    {
        let n = x.len();
        xf[..n].iter_mut().zip(x).for_each(|(f, v)| *f = v.to_f32());
        gf[..n].iter_mut().zip(dy).for_each(|(f, v)| *f = v.to_f32());
        gelu::backward(&xf[..n], &gf[..n], &mut of[..n]);
        dx.iter_mut()
            .zip(&of[..n])
            .for_each(|(v, &f)| *v = T::from_f32(f));
    }
}

/// The logistic sigmoid of each `x` into `s`, from `e = exp(-|x|)` (the vectorized `exp_sub2`):
/// `1/(1+e)` for x ≥ 0, `e/(1+e)` below, so neither side overflows; NaN stays NaN.
fn sigmoid_tile(x: &[f32], s: &mut [f32]) {
    s.iter_mut().zip(x).for_each(|(s, &x)| *s = -x.abs());
    exp_sub2(s, 1.0, 0.0, 0.0);
    s.iter_mut().zip(x).for_each(|(s, &x)| {
        let e = *s;
        *s = if x >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    });
}

/// SiLU `x·σ(x)` of `x` into `out`, or with `dy` its backward `dy·σ(x)·(1 + x·(1 − σ(x)))` (0 where
/// the derivative is 0, as [`activation_backward`]), through f32 tiles.
fn silu_chunk<T: Element>(x: &[T], dy: Option<&[T]>, out: &mut [T]) {
    let (mut xf, mut sf) = ([0f32; GELU_TILE], [0f32; GELU_TILE]);
    for (c, (x, out)) in x.chunks(GELU_TILE).zip(out.chunks_mut(GELU_TILE)).enumerate() {
        let n = x.len();
        let (xf, sf) = (&mut xf[..n], &mut sf[..n]);
        xf.iter_mut().zip(x).for_each(|(f, v)| *f = v.to_f32());
        sigmoid_tile(xf, sf);
        match dy {
            None => {
                for ((o, &x), &s) in out.iter_mut().zip(xf.iter()).zip(sf.iter()) {
                    *o = T::from_f32(x * s);
                }
            }
            Some(dy) => {
                let dy = &dy[c * GELU_TILE..c * GELU_TILE + n];
                for (((o, &x), &s), &g) in out.iter_mut().zip(xf.iter()).zip(sf.iter()).zip(dy) {
                    let d = s * (1.0 + x * (1.0 - s));
                    *o = T::from_f32(if d == 0.0 { 0.0 } else { g.to_f32() * d });
                }
            }
        }
    }
}

/// `y = act(x)` elementwise (GELU-erf and SiLU through their vectorized tile kernels).
pub(crate) fn activation<T: Element>(x: &[T], act: Activation) -> Vec<T> {
    let mut y = vec![T::default(); x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| match act {
            Activation::GeluErf => gelu_chunk(x, y),
            Activation::Silu => silu_chunk(x, None, y),
            _ => {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = T::from_f32(act_forward(act, x.to_f32()));
                }
            }
        });
    y
}

/// `dx = dy · act'(x)` elementwise.
pub(crate) fn activation_backward<T: Element>(x: &[T], dy: &[T], act: Activation) -> Vec<T> {
    let mut dx = vec![T::default(); x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| match act {
            Activation::GeluErf => gelu_backward_chunk(x, dy, dx),
            Activation::Silu => silu_chunk(x, Some(dy), dx),
            _ => {
                for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                    let d = act_derivative(act, x.to_f32());
                    // A zero derivative gives a zero gradient even for an infinite dy (torch's relu
                    // backward is a select, not a product); the CUDA kernel does the same.
                    *dx = T::from_f32(if d == 0.0 { 0.0 } else { dy.to_f32() * d });
                }
            }
        });
    dx
}

/// `sum((p - t)²)` with per-element f32 differences and f64 accumulation.
pub(crate) fn mse_sum<T: Element>(p: &[T], t: &[T]) -> f64 {
    p.par_chunks(CHUNK)
        .zip(t.par_chunks(CHUNK))
        .map(|(p, t)| {
            p.iter()
                .zip(t)
                .map(|(&p, &t)| {
                    let d = p.to_f32() - t.to_f32();
                    (d * d) as f64
                })
                .sum::<f64>()
        })
        .sum()
}

/// `dp = scale · (p - t)` where the caller passes `scale = 2·g/n`.
pub(crate) fn mse_backward<T: Element>(p: &[T], t: &[T], scale: f32) -> Vec<T> {
    let mut dp = vec![T::default(); p.len()];
    dp.par_chunks_mut(CHUNK)
        .zip(p.par_chunks(CHUNK).zip(t.par_chunks(CHUNK)))
        .for_each(|(dp, (p, t))| {
            for ((dp, &p), &t) in dp.iter_mut().zip(p).zip(t) {
                *dp = T::from_f32(scale * (p.to_f32() - t.to_f32()));
            }
        });
    dp
}

/// Cross-entropy rows of `logits [n, c]`: per row the max `m` and `ls = log Σ exp(x - m)`
/// (exponentials in f32, their sum in f64), and `loss_row = (m - x[target]) + ls`. Subtracting
/// logits before adding the small log-sum keeps the loss accurate for large logits (forming
/// `lse = m + ls` in f32 first would lose `ulp(m)`). A negative target marks an ignored row (loss 0,
/// stats 0). Returns `(Σ loss_row, [m, ls] per row)`.
pub(crate) fn cross_entropy<T: Element>(logits: &[T], targets: &[i32], c: usize) -> Result<(f64, Vec<f32>)> {
    if c == 0 || logits.len() != targets.len() * c {
        return Err(Error::shape(
            "cross_entropy",
            format!(
                "{} logits do not form {} rows of {c} classes",
                logits.len(),
                targets.len()
            ),
        ));
    }
    if let Some((i, &t)) = targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t >= 0 && t as usize >= c)
    {
        return Err(Error::invalid(format!(
            "cross_entropy: target {t} of row {i} is out of range for {c} classes"
        )));
    }
    let rows_per_task = (CHUNK / c).max(1);
    let mut stats = vec![0f32; 2 * targets.len()];
    let total = stats
        .par_chunks_mut(2)
        .zip(logits.par_chunks(c).zip(targets.par_iter()))
        .with_min_len(rows_per_task)
        .map(|(st, (row, &t))| {
            if t < 0 {
                return 0.0;
            }
            // torch's log_softmax computes x - max: a NaN or +inf logit (inf - inf = NaN) makes the
            // whole row NaN, so such a row gets NaN statistics (NaN loss and gradients), as on CUDA.
            let (max, bad) = row.iter().fold((f32::NEG_INFINITY, false), |(m, bad), &x| {
                let x = x.to_f32();
                (m.max(x), bad || x.is_nan() || x == f32::INFINITY)
            });
            let (shift, ls) = if bad {
                (f32::NAN, f32::NAN)
            } else {
                // A row of -inf logits has no finite maximum; its sum below is 0 and its log -inf.
                let shift = if max == f32::NEG_INFINITY { 0.0 } else { max };
                let mut sum = 0f64;
                let mut buf = [0f32; EXP_TILE];
                for part in row.chunks(EXP_TILE) {
                    let e = &mut buf[..part.len()];
                    e.iter_mut().zip(part).for_each(|(e, x)| *e = x.to_f32());
                    exp_sub2(e, 1.0, shift, 0.0);
                    sum += e.iter().map(|&v| v as f64).sum::<f64>();
                }
                (shift, sum.ln() as f32)
            };
            st[0] = shift;
            st[1] = ls;
            (shift - row[t as usize].to_f32()) as f64 + ls as f64
        })
        .sum();
    Ok((total, stats))
}

/// `dlogits[i, j] = scale · (exp((x[i, j] - m[i]) - ls[i]) - [j == target[i]])` with
/// `scale = g / (rows not ignored)` and `stats = [m, ls]` per row from [`cross_entropy`]; ignored
/// rows (negative target) get zeros.
pub(crate) fn cross_entropy_backward<T: Element>(
    logits: &[T],
    targets: &[i32],
    stats: &[f32],
    c: usize,
    scale: f32,
) -> Vec<T> {
    let mut dx = vec![T::default(); logits.len()];
    if c == 0 {
        return dx;
    }
    let rows_per_task = (CHUNK / c).max(1);
    dx.par_chunks_mut(c)
        .zip(logits.par_chunks(c))
        .zip(targets.par_iter().zip(stats.par_chunks(2)))
        .with_min_len(rows_per_task)
        .for_each(|((dx, row), (&t, st))| {
            if t < 0 {
                return; // already zeros
            }
            let (m, ls) = (st[0], st[1]);
            let mut buf = [0f32; EXP_TILE];
            for (c, (dx, part)) in dx.chunks_mut(EXP_TILE).zip(row.chunks(EXP_TILE)).enumerate() {
                let e = &mut buf[..part.len()];
                e.iter_mut().zip(part).for_each(|(e, x)| *e = x.to_f32());
                exp_sub2(e, 1.0, m, ls);
                for (j, (d, &p)) in dx.iter_mut().zip(e.iter()).enumerate() {
                    let onehot = if c * EXP_TILE + j == t as usize { 1.0 } else { 0.0 };
                    *d = T::from_f32(scale * (p - onehot));
                }
            }
        });
    dx
}

/// `Σ x²` in f64 (the gradient-norm oracle and CPU path).
pub(crate) fn sum_squares_f32(x: &[f32]) -> f64 {
    x.par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum()
}
