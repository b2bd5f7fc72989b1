//! The built-in differentiable ops as plain tensor functions (forward and backward side by side) and
//! the [`Backward`] records the tape keeps for them. Every function validates its inputs and runs on
//! the tensors' device: `cpu.rs` on the CPU, `kernels/autograd.cu` (through `cuda.rs`) on CUDA.
//!
//! Layers that fuse an activation into their own kernel can call [`activation`] and
//! [`activation_backward`] directly.

use super::cpu;
use super::cuda;
use super::{Backward, Grads};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Tensor};
use half::{bf16, f16};

/// Elementwise activations. Forward and backward compute in f32 and round once to the tensor dtype
/// (f32, f16 or bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(x, 0)`; the gradient is 0 at `x <= 0` (torch `relu`).
    Relu = 0,
    /// GELU, **tanh approximation**: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` — torch
    /// `gelu(x, approximate="tanh")` (GPT-2 / "gelu_new" / "gelu_pytorch_tanh").
    Gelu = 1,
    /// GELU, **exact**: `0.5·x·(1 + erf(x/√2))` — torch `gelu(x)` (the default, approximate="none").
    GeluErf = 2,
    /// `x·sigmoid(x)` (torch `silu`, a.k.a. swish).
    Silu = 3,
    /// `tanh(x)` (BERT's pooler activation).
    Tanh = 4,
}

impl Activation {
    /// The lowercase name (`relu`, `gelu`, `gelu_erf`, `silu`, `tanh`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::GeluErf => "gelu_erf",
            Activation::Silu => "silu",
            Activation::Tanh => "tanh",
        }
    }
}

/// Runs `$body` with `$v` bound to the typed CPU slice of a float tensor.
macro_rules! cpu_float {
    ($t:expr, $op:expr, |$v:ident: $ty:ident| $body:expr) => {
        match $t.dtype() {
            DType::F32 => {
                type $ty = f32;
                let $v = $t.cpu_data::<f32>($op)?;
                $body
            }
            DType::F16 => {
                type $ty = f16;
                let $v = $t.cpu_data::<f16>($op)?;
                $body
            }
            DType::BF16 => {
                type $ty = bf16;
                let $v = $t.cpu_data::<bf16>($op)?;
                $body
            }
            other => return Err(Error::dtype($op, "a float dtype", other)),
        }
    };
}
pub(crate) use cpu_float;

fn check_pair(a: &Tensor, b: &Tensor, op: &'static str) -> Result<Device> {
    a.dtype().expect_float(op)?;
    let dev = a.check_same_device(b, op)?;
    a.check_same_dtype(b, op)?;
    a.check_same_shape(b, op)?;
    Ok(dev)
}

fn vec_tensor<T: Element>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, Device::Cpu)
}

/// A scalar upstream gradient: one f32 element on `dev`.
fn check_scalar_grad(g: &Tensor, dev: Device, op: &'static str) -> Result<()> {
    if g.numel() != 1 || g.dtype() != DType::F32 || g.device() != dev {
        return Err(Error::shape(
            op,
            format!("the upstream gradient of a loss must be one f32 element on {dev}, got {g:?}"),
        ));
    }
    Ok(())
}

/// `act(x)`, same shape, dtype and device as `x`.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    let op = act.name();
    x.dtype().expect_float(op)?;
    match x.device() {
        Device::Cpu => cpu_float!(x, op, |v: T| vec_tensor(cpu::activation::<T>(v, act), x.shape())),
        Device::Cuda(_) => cuda::activation(x, act),
    }
}

/// `dx = dy · act'(x)`; `x` and `grad_y` must have the same shape, dtype and device.
pub fn activation_backward(x: &Tensor, grad_y: &Tensor, act: Activation) -> Result<Tensor> {
    let op = "activation_backward";
    let dev = check_pair(x, grad_y, op)?;
    match dev {
        Device::Cpu => cpu_float!(x, op, |v: T| {
            let dy = grad_y.cpu_data::<T>(op)?;
            vec_tensor(cpu::activation_backward::<T>(v, dy, act), x.shape())
        }),
        Device::Cuda(_) => cuda::activation_backward(x, grad_y, act),
    }
}

/// `mean((pred - target)²)` over all elements as an f32 `[1]` tensor. Same shape, dtype and device;
/// at least one element.
pub fn mse_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let op = "mse_loss";
    let dev = check_pair(pred, target, op)?;
    let n = pred.numel();
    if n == 0 {
        return Err(Error::shape(op, "the mean of an empty tensor is undefined"));
    }
    match dev {
        Device::Cpu => {
            let sum = cpu_float!(pred, op, |p: T| cpu::mse_sum::<T>(p, target.cpu_data::<T>(op)?));
            Tensor::from_vec(vec![(sum / n as f64) as f32], &[1], Device::Cpu)
        }
        Device::Cuda(_) => cuda::mse_loss(pred, target),
    }
}

/// Gradient of [`mse_loss`] with respect to `pred`: `2·g·(pred - target)/n`, where `grad_loss` is the
/// f32 `[1]` upstream gradient (read on the device; no host sync).
pub fn mse_loss_backward(pred: &Tensor, target: &Tensor, grad_loss: &Tensor) -> Result<Tensor> {
    let op = "mse_loss_backward";
    let dev = check_pair(pred, target, op)?;
    check_scalar_grad(grad_loss, dev, op)?;
    let n = pred.numel();
    if n == 0 {
        return Err(Error::shape(op, "empty prediction"));
    }
    match dev {
        Device::Cpu => {
            let g = grad_loss.cpu_data::<f32>(op)?[0];
            let scale = (2.0 * g as f64 / n as f64) as f32;
            cpu_float!(pred, op, |p: T| {
                let t = target.cpu_data::<T>(op)?;
                vec_tensor(cpu::mse_backward::<T>(p, t, scale), pred.shape())
            })
        }
        Device::Cuda(_) => cuda::mse_loss_backward(pred, target, grad_loss),
    }
}

/// Checks logits `[N, C]` against `targets` and returns `(N, C)` and the targets as i32 with ignored
/// rows as -1 (the form both backends read).
fn check_ce(
    logits: &Tensor,
    targets: &[u32],
    ignore_index: Option<u32>,
    op: &'static str,
) -> Result<(usize, usize, Vec<i32>)> {
    logits.dtype().expect_float(op)?;
    let (n, c) = match logits.shape() {
        [n, c] => (*n, *c),
        s => return Err(Error::shape(op, format!("logits must be [N, C], got {s:?}"))),
    };
    if n == 0 || c == 0 {
        return Err(Error::shape(
            op,
            format!("logits must have at least one row and one class, got [{n}, {c}]"),
        ));
    }
    if targets.len() != n {
        return Err(Error::shape(
            op,
            format!("{} targets for {n} rows of logits", targets.len()),
        ));
    }
    if c > i32::MAX as usize {
        return Err(Error::invalid(format!("{op}: {c} classes exceed i32")));
    }
    targets
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if Some(t) == ignore_index {
                Ok(-1)
            } else if (t as usize) < c {
                Ok(t as i32)
            } else {
                Err(Error::invalid(format!(
                    "{op}: target {t} of row {i} is out of range for {c} classes"
                )))
            }
        })
        .collect::<Result<Vec<i32>>>()
        .map(|t| (n, c, t))
}

/// What the cross-entropy backward needs besides the logits: the targets (on the logits' device) and
/// per-row statistics of the forward pass (f32 `[N, 2]`: the row max and log Σ exp(x - max)), so the
/// backward reads each row once.
#[derive(Clone, Debug)]
pub struct CrossEntropySaved {
    /// Host targets, -1 for ignored rows.
    targets: Vec<i32>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    targets_dev: Tensor,
    stats: Tensor,
    /// 1 / (rows not ignored), 0 when every row is ignored.
    inv_count: f32,
}

impl CrossEntropySaved {
    /// Number of rows that count towards the mean (not ignored).
    pub fn num_counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

/// Mean cross-entropy of `logits [N, C]` (any float dtype, f32 math) against class indices:
/// `mean_i(logsumexp(x_i) - x_i[t_i])`, with the row max subtracted. Rows whose target equals
/// `ignore_index` (torch's `ignore_index`, e.g. padding or prompt tokens) contribute nothing and the
/// mean is over the other rows; if every row is ignored the loss and its gradient are 0 (torch
/// returns NaN there). Returns the f32 `[1]` loss and what [`cross_entropy_backward`] needs.
pub fn cross_entropy_forward(
    logits: &Tensor,
    targets: &[u32],
    ignore_index: Option<u32>,
) -> Result<(Tensor, CrossEntropySaved)> {
    let op = "cross_entropy";
    let (n, c, t32) = check_ce(logits, targets, ignore_index, op)?;
    let counted = t32.iter().filter(|&&t| t >= 0).count();
    let inv_count = if counted == 0 {
        0.0
    } else {
        (1.0f64 / counted as f64) as f32
    };
    let dev = logits.device();
    let targets_dev = if dev.is_cpu() {
        // The CPU path reads the host targets; an empty placeholder avoids a copy.
        Tensor::zeros(&[0], DType::I32, Device::Cpu)?
    } else {
        Tensor::from_slice(&t32, &[n], dev)?
    };
    let (loss, stats) = match dev {
        Device::Cpu => {
            let (sum, stats) = cpu_float!(logits, op, |x: T| cpu::cross_entropy::<T>(x, &t32, c)?);
            let mean = if counted == 0 { 0.0 } else { sum / counted as f64 };
            (
                Tensor::from_vec(vec![mean as f32], &[1], Device::Cpu)?,
                Tensor::from_vec(stats, &[n, 2], Device::Cpu)?,
            )
        }
        Device::Cuda(_) => cuda::cross_entropy(logits, &targets_dev, n, c, inv_count)?,
    };
    Ok((
        loss,
        CrossEntropySaved {
            targets: t32,
            targets_dev,
            stats,
            inv_count,
        },
    ))
}

/// Mean cross-entropy as an f32 `[1]` tensor (forward only; see [`cross_entropy_forward`]).
pub fn cross_entropy(logits: &Tensor, targets: &[u32], ignore_index: Option<u32>) -> Result<Tensor> {
    Ok(cross_entropy_forward(logits, targets, ignore_index)?.0)
}

/// Gradient of the mean cross-entropy: `(g/count)·(softmax(logits) - onehot(targets))` (zero rows
/// where ignored), in the logits' dtype. `grad_loss` is the f32 `[1]` upstream gradient.
pub fn cross_entropy_backward(
    logits: &Tensor,
    saved: &CrossEntropySaved,
    grad_loss: &Tensor,
) -> Result<Tensor> {
    let op = "cross_entropy_backward";
    let dev = logits.device();
    check_scalar_grad(grad_loss, dev, op)?;
    logits.dtype().expect_float(op)?;
    let (n, c) = match logits.shape() {
        [n, c] => (*n, *c),
        s => return Err(Error::shape(op, format!("logits must be [N, C], got {s:?}"))),
    };
    if saved.targets.len() != n || saved.stats.shape() != [n, 2] || saved.stats.device() != dev {
        return Err(Error::shape(
            op,
            format!("saved state {:?} does not match logits {logits:?}", saved.stats),
        ));
    }
    match dev {
        Device::Cpu => {
            let g = grad_loss.cpu_data::<f32>(op)?[0];
            let scale = g * saved.inv_count;
            let stats = saved.stats.cpu_data::<f32>(op)?;
            cpu_float!(logits, op, |x: T| {
                vec_tensor(
                    cpu::cross_entropy_backward::<T>(x, &saved.targets, stats, c, scale),
                    logits.shape(),
                )
            })
        }
        Device::Cuda(_) => cuda::cross_entropy_backward(
            logits,
            &saved.targets_dev,
            &saved.stats,
            grad_loss,
            (n, c),
            saved.inv_count,
        ),
    }
}

pub(crate) fn sum_squares_cuda(gs: &[&Tensor]) -> Result<f64> {
    cuda::sum_squares(gs)
}

// ---------------------------------------------------------------------------------- tape records

/// A tape record given as a closure `f(grad_output, inputs, output, needs)` with the contract of
/// [`Backward::backward`]; the ops of this crate record their backward this way.
struct FnRecord<F>(&'static str, F);

impl<F> Backward for FnRecord<F>
where
    F: Fn(&Tensor, &[&Tensor], &Tensor, &[bool]) -> Grads + Send + Sync,
{
    fn backward(&self, grad_output: &Tensor, inputs: &[&Tensor], output: &Tensor, needs: &[bool]) -> Grads {
        (self.1)(grad_output, inputs, output, needs)
    }

    fn name(&self) -> &'static str {
        self.0
    }
}

/// A tape record named `name` whose backward is `f(grad_output, inputs, output, needs)`.
pub(crate) fn record_fn(
    name: &'static str,
    f: impl Fn(&Tensor, &[&Tensor], &Tensor, &[bool]) -> Grads + Send + Sync + 'static,
) -> Box<dyn Backward> {
    Box::new(FnRecord(name, f))
}

/// The tape record of a one-input op whose input gradient is `f(dy, x)` (activations, losses, the
/// nn layers).
pub(crate) fn unary(
    name: &'static str,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Box<dyn Backward> {
    record_fn(name, move |g, inputs, _, needs| {
        if !needs[0] {
            return Ok(vec![None]);
        }
        Ok(vec![Some(f(g, inputs[0])?)])
    })
}

/// The tape record of a two-input op whose input gradients are `da(dy, a, b)` and `db(dy, a, b)`, each
/// computed only when needed.
pub(crate) fn binary(
    name: &'static str,
    da: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
    db: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Box<dyn Backward> {
    record_fn(name, move |g, inputs, _, needs| {
        let [a, b] = inputs else {
            return Err(Error::invalid(format!(
                "{name}: expected 2 inputs, got {}",
                inputs.len()
            )));
        };
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        Ok(vec![
            need(0).then(|| da(g, a, b)).transpose()?,
            need(1).then(|| db(g, a, b)).transpose()?,
        ])
    })
}

/// The tape record of `a + b`: both inputs get the output gradient.
pub(crate) fn add_record() -> Box<dyn Backward> {
    // Tensor clones share storage: passing the same gradient to both inputs costs nothing.
    record_fn("add", |g, _, _, needs| {
        Ok(needs.iter().map(|&n| n.then(|| g.clone())).collect())
    })
}
