//! The autograd tape: every op's forward against f64 math, every backward against finite differences
//! of f64 reference functions, the tape's bookkeeping (accumulation, frozen parameters, custom ops,
//! errors), gradient utilities, and a tiny MLP that trains with AdamW. CUDA runs the same bodies.

mod common;

use common::{assert_close, assert_close_scaled};
use half::{bf16, f16};
use peft_kernels::autograd::gradcheck::{
    GradCheckConfig, check_gradient, finite_difference, finite_difference_f64,
};
use peft_kernels::autograd::{Activation, Backward, Gradients, ParamStore, Tape, Var, ops};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::rng::Rng;
use peft_kernels::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;

const ACTS: [Activation; 5] = [
    Activation::Relu,
    Activation::Gelu,
    Activation::GeluErf,
    Activation::Silu,
    Activation::Tanh,
];

// ------------------------------------------------------------------------------ f64 reference math

/// erf in f64 via its Maclaurin series (|x| < 3) or the continued fraction of erfc (|x| >= 3);
/// accurate to ~1e-15 on the ranges used here, independent of the crate's implementation.
fn erf64(x: f64) -> f64 {
    if x.abs() < 3.0 {
        let (mut term, mut sum, x2) = (x, x, x * x);
        for n in 1..200 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) = exp(-x²)/√π · 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        let a = x.abs();
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / f;
        (1.0 - erfc).copysign(x)
    }
}

fn act64(act: Activation, x: f64) -> f64 {
    match act {
        Activation::Relu => x.max(0.0),
        Activation::Gelu => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::GeluErf => 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2)),
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Tanh => x.tanh(),
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Mean cross-entropy in f64, max-subtracted.
fn ce64(logits: &[f64], targets: &[u32], c: usize) -> f64 {
    let n = targets.len();
    let mut total = 0.0;
    for (row, &t) in logits.chunks(c).zip(targets) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
        total += lse - row[t as usize];
    }
    total / n as f64
}

fn randn(shape: &[usize], std: f32, seed: u64, dev: Device) -> Result<Tensor> {
    Tensor::randn(shape, std, seed, DType::F32, dev)
}

/// Values at least `gap` away from 0 (keeps finite differences off relu's kink).
fn away_from_zero(v: &[f32], gap: f32) -> Vec<f32> {
    v.iter()
        .map(|&x| if x.abs() < gap { x.signum() * gap + x } else { x })
        .collect()
}

fn one_param(dev: Device, value: Tensor) -> Result<(ParamStore, peft_kernels::autograd::ParamId)> {
    let mut store = ParamStore::new();
    let id = store.insert("x", value.to_device(dev)?)?;
    Ok((store, id))
}

// ------------------------------------------------------------------------------ activations

fn activation_forward_matches_f64(dev: Device) -> Result<()> {
    // Known values first: they pin down which GELU is which.
    let x = Tensor::from_slice(&[1.0f32, -0.5, 3.0], &[3], dev)?;
    let tanh = ops::activation(&x, Activation::Gelu)?.to_vec::<f32>()?;
    let erf = ops::activation(&x, Activation::GeluErf)?.to_vec::<f32>()?;
    // torch.nn.functional.gelu(x, approximate="tanh") and gelu(x) at 1.0, -0.5, 3.0.
    assert_close(
        &tanh,
        &[0.841_192, -0.154_286, 2.996_362_6],
        2e-6,
        1e-7,
        "gelu tanh",
    );
    assert_close(
        &erf,
        &[0.841_344_7, -0.154_268_77, 2.995_950_3],
        2e-6,
        1e-7,
        "gelu erf",
    );

    // Odd sizes, a wide range including large magnitudes (exp overflow in silu, tanh saturation).
    for (n, std) in [(1usize, 1.0f32), (37, 3.0), (4099, 8.0)] {
        let mut v = Rng::new(n as u64).normal_vec(n);
        v.iter_mut().for_each(|x| *x *= std);
        if n > 10 {
            v[..6].copy_from_slice(&[0.0, -0.0, 100.0, -100.0, 1e4, -1e4]);
        }
        let x = Tensor::from_slice(&v, &[n], dev)?;
        for act in ACTS {
            let got = ops::activation(&x, act)?.to_vec::<f32>()?;
            let want: Vec<f32> = v.iter().map(|&x| act64(act, x as f64) as f32).collect();
            assert_close(&got, &want, 3e-6, 1e-7, &format!("{act:?} forward n={n}"));
        }
    }
    Ok(())
}

fn activation_backward_vs_finite_differences(dev: Device) -> Result<()> {
    for (k, shape) in [[7usize, 13], [1, 1], [3, 33]].iter().enumerate() {
        let n: usize = shape.iter().product();
        let xv = away_from_zero(&Rng::new(10 + k as u64).normal_vec(n), 0.05)
            .iter()
            .map(|x| x * 2.5)
            .collect::<Vec<f32>>();
        let rv = Rng::new(20 + k as u64).normal_vec(n);
        for act in ACTS {
            let (store, id) = one_param(dev, Tensor::from_slice(&xv, shape, Device::Cpu)?)?;
            let mut tape = Tape::new();
            let x = tape.param(&store, id)?;
            let y = tape.activation(x, act)?;
            let r = Tensor::from_slice(&rv, shape, dev)?;
            let grads = tape.backward_with(y, r)?;
            let got = grads.get(id).expect("gradient of x").to_vec::<f32>()?;
            let idx: Vec<usize> = (0..n).collect();
            let r64 = to64(&rv);
            let num = finite_difference_f64(
                |x| x.iter().zip(&r64).map(|(&x, &r)| act64(act, x) * r).sum(),
                &to64(&xv),
                1e-4,
                &idx,
            )?;
            let num: Vec<f32> = num.iter().map(|&x| x as f32).collect();
            assert_close(&got, &num, 1e-4, 1e-6, &format!("{act:?} backward {shape:?}"));
        }
    }
    Ok(())
}

fn rounded(v: &[f32], dtype: DType) -> Vec<f32> {
    v.iter()
        .map(|&x| match dtype {
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
            _ => x,
        })
        .collect()
}

/// f16/bf16 storage: the kernel widens, computes in f32 and rounds once, so a half result equals the
/// f32 result on the same (half-representable) inputs, rounded. On CUDA the f32 results themselves
/// come from CUDA's tanhf/erff/expf, so the comparison is within the same device.
fn activation_half_storage_rounds_once(dev: Device) -> Result<()> {
    let n = 1001;
    let xv = Rng::new(5)
        .normal_vec(n)
        .iter()
        .map(|x| x * 4.0)
        .collect::<Vec<_>>();
    let dyv = Rng::new(6).normal_vec(n);
    for dtype in [DType::F16, DType::BF16] {
        let (xh, dyh) = (rounded(&xv, dtype), rounded(&dyv, dtype));
        let x32 = Tensor::from_slice(&xh, &[n], dev)?;
        let dy32 = Tensor::from_slice(&dyh, &[n], dev)?;
        let (x, dy) = (x32.to_dtype(dtype)?, dy32.to_dtype(dtype)?);
        for act in ACTS {
            let y = ops::activation(&x, act)?;
            assert_eq!(y.dtype(), dtype);
            let want = rounded(&ops::activation(&x32, act)?.to_vec::<f32>()?, dtype);
            assert_eq!(y.to_vec_f32()?, want, "{act:?} forward in {dtype}");
            let dx = ops::activation_backward(&x, &dy, act)?;
            let want = rounded(
                &ops::activation_backward(&x32, &dy32, act)?.to_vec::<f32>()?,
                dtype,
            );
            assert_eq!(dx.to_vec_f32()?, want, "{act:?} backward in {dtype}");
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------ losses

fn mse_value_and_gradient(dev: Device) -> Result<()> {
    for shape in [vec![1usize], vec![5, 7], vec![3, 1, 257]] {
        let n: usize = shape.iter().product();
        let pv = Rng::new(n as u64).normal_vec(n);
        let tv = Rng::new(n as u64 + 1).normal_vec(n);
        let (store, id) = one_param(dev, Tensor::from_slice(&pv, &shape, Device::Cpu)?)?;
        let target = Tensor::from_slice(&tv, &shape, dev)?;
        let mut tape = Tape::new();
        let p = tape.param(&store, id)?;
        let loss = tape.mse_loss(p, &target)?;
        let lv = tape.value(loss)?;
        assert_eq!((lv.shape(), lv.dtype()), (&[1usize][..], DType::F32));
        let want: f64 = pv
            .iter()
            .zip(&tv)
            .map(|(&p, &t)| (p as f64 - t as f64).powi(2))
            .sum::<f64>()
            / n as f64;
        assert_close(&[lv.to_scalar()?], &[want as f32], 1e-6, 0.0, "mse value");
        let g = tape.backward(loss)?.get(id).unwrap().to_vec::<f32>()?;
        let t64 = to64(&tv);
        let idx: Vec<usize> = (0..n).collect();
        let num = finite_difference_f64(
            |p| p.iter().zip(&t64).map(|(p, t)| (p - t).powi(2)).sum::<f64>() / n as f64,
            &to64(&pv),
            1e-3,
            &idx,
        )?;
        let num: Vec<f32> = num.iter().map(|&x| x as f32).collect();
        assert_close(&g, &num, 1e-5, 1e-7, &format!("mse grad {shape:?}"));
    }
    // Half predictions: the loss is f32, the gradient comes back in the prediction dtype on the
    // tape and lands as f32 in Gradients.
    let pv = rounded(&Rng::new(9).normal_vec(300), DType::BF16);
    let mut store = ParamStore::new();
    let id = store.insert("p", Tensor::from_slice(&pv, &[300], dev)?.to_dtype(DType::BF16)?)?;
    let target = Tensor::zeros(&[300], DType::BF16, dev)?;
    let mut tape = Tape::new();
    let p = tape.param(&store, id)?;
    let loss = tape.mse_loss(p, &target)?;
    let want = pv.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / 300.0;
    assert_close(
        &[tape.value(loss)?.to_scalar()?],
        &[want as f32],
        1e-6,
        0.0,
        "bf16 mse",
    );
    let g = tape.backward(loss)?;
    let g = g.get(id).unwrap();
    assert_eq!(g.dtype(), DType::F32, "gradients of bf16 params are f32");
    let want: Vec<f32> = rounded(
        &pv.iter().map(|&x| 2.0 * x / 300.0).collect::<Vec<_>>(),
        DType::BF16,
    );
    assert_close(&g.to_vec::<f32>()?, &want, 1e-6, 0.0, "bf16 mse grad");
    Ok(())
}

fn cross_entropy_hand_computed(dev: Device) -> Result<()> {
    // Rows [1, 2, 3] -> class 2 and [1, 1, 1] -> class 0:
    // (log(e + e² + e³) - 3 + log 3) / 2 = (0.40760596444438 + 1.09861228866811) / 2.
    let logits = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 1.0, 1.0, 1.0], &[2, 3], dev)?;
    let hand = (0.407_605_964_444_38_f64 + 1.098_612_288_668_11) / 2.0;
    assert!((ce64(&[1.0, 2.0, 3.0, 1.0, 1.0, 1.0], &[2, 0], 3) - hand).abs() < 1e-13);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let loss = ops::cross_entropy(&logits.to_dtype(dtype)?, &[2, 0], None)?;
        assert_eq!((loss.shape(), loss.dtype()), (&[1usize][..], DType::F32));
        assert_close(&[loss.to_scalar()?], &[hand as f32], 1e-6, 0.0, "ce hand value");
    }
    // Max subtraction: logits near 1e4 would overflow exp in f32 without it.
    let big = Tensor::from_slice(&[1.0e4f32, 1.0e4 + 2.0, 1.0e4 - 1.0, -1.0e4], &[1, 4], dev)?;
    let want = ce64(&[1.0e4, 1.0e4 + 2.0, 1.0e4 - 1.0, -1.0e4], &[0], 4);
    assert_close(
        &[ops::cross_entropy(&big, &[0], None)?.to_scalar()?],
        &[want as f32],
        1e-5,
        0.0,
        "ce big",
    );
    Ok(())
}

/// NaN and infinite logits as `torch.nn.functional.cross_entropy` treats them (checked with torch
/// 2.x: a NaN or a +inf anywhere in a row gives a NaN loss and an all-NaN gradient row, because
/// log_softmax computes `x - max` and `inf - inf` is NaN; -inf logits are plain zero probabilities; an
/// all -inf row is NaN). The wide rows put the special value on a CUDA thread whose first element it
/// is and which later sees finite values, and split two +inf over threads.
fn cross_entropy_nan_and_inf(dev: Device) -> Result<()> {
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let mut rows: Vec<(Vec<f32>, bool)> = vec![
        (vec![0.0, nan, 1.0], true),
        (vec![inf, inf, 0.0], true),
        (vec![inf, 0.0, 0.0], true),
        (vec![inf, -inf, 0.0], true),
        (vec![nan, -inf, 0.0], true),
        (vec![-inf, -inf, -inf], true),
        (vec![-inf, -inf, 0.0], false),
        (vec![-inf, 2.0, 0.5], false),
    ];
    let wide: Vec<f32> = Rng::new(9).normal_vec(700);
    for (pos, v) in [
        (&[5usize][..], nan),
        (&[3, 259][..], inf),
        (&[3, 4][..], inf),
        (&[600][..], inf),
    ] {
        let mut r = wide.clone();
        for &p in pos {
            r[p] = v;
        }
        r[1] = -inf;
        rows.push((r, true));
    }
    for (row, bad) in &rows {
        let c = row.len();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let x = Tensor::from_slice(row, &[1, c], dev)?.to_dtype(dtype)?;
            let g = Tensor::from_slice(&[1.0f32], &[1], dev)?;
            for t in [0u32, 1, (c - 1) as u32] {
                let what = format!("{:?}.. target {t} {dtype}", &row[..3]);
                let (loss, saved) = ops::cross_entropy_forward(&x, &[t], None)?;
                let loss = loss.to_scalar()?;
                let grad = ops::cross_entropy_backward(&x, &saved, &g)?.to_vec_f32()?;
                if *bad {
                    assert!(loss.is_nan(), "{what}: loss {loss}, want NaN");
                    assert!(grad.iter().all(|d| d.is_nan()), "{what}: grad {:?}", &grad[..3]);
                    continue;
                }
                // Finite maximum: the f64 oracle (exp(-inf) = 0), a -inf target gives +inf.
                let r64: Vec<f64> = x.to_vec_f32()?.iter().map(|&v| v as f64).collect();
                let want = ce64(&r64, &[t], c);
                if want.is_infinite() {
                    assert_eq!(loss, f32::INFINITY, "{what}");
                } else {
                    assert_close(&[loss], &[want as f32], 1e-6, 1e-7, &what);
                }
                let m = r64.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = r64.iter().map(|&v| (v - m).exp()).sum();
                let want_g: Vec<f32> = r64
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| ((v - m).exp() / z - if j == t as usize { 1.0 } else { 0.0 }) as f32)
                    .collect();
                // The gradient is stored in the logits' dtype: one rounding to it.
                let tol = match dtype {
                    DType::F32 => 1e-5,
                    DType::F16 => 1e-3,
                    _ => 8e-3,
                };
                assert_close(&grad, &want_g, tol, 1e-7, &format!("{what} grad"));
            }
        }
    }
    Ok(())
}

fn cross_entropy_gradient(dev: Device) -> Result<()> {
    for (n, c) in [(1usize, 1usize), (3, 5), (17, 301), (2, 1000)] {
        let lv: Vec<f32> = Rng::new((n * c) as u64)
            .normal_vec(n * c)
            .iter()
            .map(|x| x * 3.0)
            .collect();
        let mut rng = Rng::new(7);
        let targets: Vec<u32> = (0..n).map(|_| rng.below(c as u64) as u32).collect();
        let (store, id) = one_param(dev, Tensor::from_slice(&lv, &[n, c], Device::Cpu)?)?;
        let mut tape = Tape::new();
        let x = tape.param(&store, id)?;
        let loss = tape.cross_entropy(x, &targets)?;
        let want = ce64(&to64(&lv), &targets, c);
        assert_close(
            &[tape.value(loss)?.to_scalar()?],
            &[want as f32],
            2e-6,
            1e-7,
            "ce value",
        );
        // Scale the upstream gradient to check that it is honoured (read on the device).
        let g = tape
            .backward_with(loss, Tensor::from_slice(&[0.5f32], &[1], dev)?)?
            .get(id)
            .unwrap()
            .to_vec::<f32>()?;
        let idx: Vec<usize> = (0..n * c).step_by(((n * c) / 97).max(1)).collect();
        let num = finite_difference_f64(|x| 0.5 * ce64(x, &targets, c), &to64(&lv), 1e-4, &idx)?;
        let got: Vec<f32> = idx.iter().map(|&i| g[i]).collect();
        let num: Vec<f32> = num.iter().map(|&x| x as f32).collect();
        assert_close(&got, &num, 1e-4, 1e-7, &format!("ce grad [{n}, {c}]"));
        // Every row of the gradient sums to zero (softmax minus one-hot).
        for row in g.chunks(c) {
            let s: f64 = row.iter().map(|&x| x as f64).sum();
            assert!(s.abs() < 1e-6, "row sum {s}");
        }
    }
    // Half logits: the gradient is in the logits dtype on the tape, f32 in Gradients, and matches
    // the f32 computation on the same values rounded once.
    let lv = rounded(&Rng::new(3).normal_vec(4 * 9), DType::BF16);
    let f32_grad = {
        let (store, id) = one_param(dev, Tensor::from_slice(&lv, &[4, 9], Device::Cpu)?)?;
        let mut tape = Tape::new();
        let x = tape.param(&store, id)?;
        let loss = tape.cross_entropy(x, &[0, 8, 3, 3])?;
        tape.backward(loss)?.get(id).unwrap().to_vec::<f32>()?
    };
    let mut store = ParamStore::new();
    let id = store.insert("l", Tensor::from_slice(&lv, &[4, 9], dev)?.to_dtype(DType::BF16)?)?;
    let mut tape = Tape::new();
    let x = tape.param(&store, id)?;
    let loss = tape.cross_entropy(x, &[0, 8, 3, 3])?;
    let g = tape.backward(loss)?.get(id).unwrap().to_vec::<f32>()?;
    assert_close(&g, &rounded(&f32_grad, DType::BF16), 0.0, 1e-7, "bf16 ce grad");
    Ok(())
}

/// torch's ignore_index: ignored rows contribute nothing, the mean is over the others, and their
/// gradient rows are exactly zero.
fn cross_entropy_ignore_index(dev: Device) -> Result<()> {
    const IGNORE: u32 = u32::MAX; // any value, e.g. a remapped -100
    let (n, c) = (6usize, 11usize);
    let lv: Vec<f32> = Rng::new(77).normal_vec(n * c).iter().map(|x| x * 2.0).collect();
    let targets = [3u32, IGNORE, 10, IGNORE, 0, 5];
    let kept: Vec<usize> = vec![0, 2, 4, 5];
    let (store, id) = one_param(dev, Tensor::from_slice(&lv, &[n, c], Device::Cpu)?)?;
    let mut tape = Tape::new();
    let x = tape.param(&store, id)?;
    let loss = tape.cross_entropy_ignore(x, &targets, IGNORE)?;
    let sub_logits: Vec<f64> = kept
        .iter()
        .flat_map(|&r| lv[r * c..(r + 1) * c].iter().map(|&v| v as f64))
        .collect();
    let sub_targets: Vec<u32> = kept.iter().map(|&r| targets[r]).collect();
    let want = ce64(&sub_logits, &sub_targets, c);
    assert_close(
        &[tape.value(loss)?.to_scalar()?],
        &[want as f32],
        2e-6,
        0.0,
        "ignored ce",
    );
    let g = tape.backward(loss)?.get(id).unwrap().to_vec::<f32>()?;
    for r in [1usize, 3] {
        assert!(
            g[r * c..(r + 1) * c].iter().all(|&v| v == 0.0),
            "row {r} not zero"
        );
    }
    let idx: Vec<usize> = (0..sub_logits.len()).collect();
    let num = finite_difference_f64(|x| ce64(x, &sub_targets, c), &sub_logits, 1e-4, &idx)?;
    let got: Vec<f32> = kept
        .iter()
        .flat_map(|&r| g[r * c..(r + 1) * c].to_vec())
        .collect();
    let num: Vec<f32> = num.iter().map(|&x| x as f32).collect();
    assert_close(&got, &num, 1e-4, 1e-7, "ignored ce grad");
    // The ignore value is only special when asked for: without it, u32::MAX is out of range.
    assert!(tape.cross_entropy(x, &targets).is_err());
    // Every row ignored: loss 0 and an all-zero gradient (not NaN).
    let mut tape = Tape::new();
    let x = tape.param(&store, id)?;
    let loss = tape.cross_entropy_ignore(x, &[IGNORE; 6], IGNORE)?;
    assert_eq!(tape.value(loss)?.to_scalar()?, 0.0);
    let g = tape.backward(loss)?.get(id).unwrap().to_vec::<f32>()?;
    assert!(g.iter().all(|&v| v == 0.0));
    Ok(())
}

fn loss_input_errors(dev: Device) -> Result<()> {
    let logits = randn(&[3, 4], 1.0, 1, dev)?;
    let mut tape = Tape::new();
    let x = tape.leaf(logits.clone());
    assert!(matches!(tape.cross_entropy(x, &[0, 1]), Err(Error::Shape { .. })));
    assert!(matches!(
        tape.cross_entropy(x, &[0, 1, 4]),
        Err(Error::InvalidArgument(_))
    ));
    let flat = tape.leaf(randn(&[12], 1.0, 1, dev)?);
    assert!(tape.cross_entropy(flat, &[0]).is_err());
    let empty = tape.leaf(Tensor::zeros(&[0, 4], DType::F32, dev)?);
    assert!(tape.cross_entropy(empty, &[]).is_err());
    assert!(tape.mse_loss(x, &randn(&[4, 3], 1.0, 2, dev)?).is_err());
    assert!(tape.mse_loss(x, &logits.to_dtype(DType::BF16)?).is_err());
    let e = tape.leaf(Tensor::zeros(&[0], DType::F32, dev)?);
    assert!(tape.mse_loss(e, &Tensor::zeros(&[0], DType::F32, dev)?).is_err());
    let ints = tape.leaf(Tensor::zeros(&[3], DType::I32, dev)?);
    assert!(tape.relu(ints).is_err());
    // Nothing was recorded by the failed calls: only the five leaves.
    assert_eq!(tape.len(), 5);
    Ok(())
}

// ------------------------------------------------------------------------------ the tape

/// x → relu → add(·, h) → mse, with h = silu(x): gradient against finite differences of the f64
/// reference of the whole chain.
fn chain_relu_add_mse(dev: Device) -> Result<()> {
    let shape = [5usize, 9];
    let n = 45;
    let xv = away_from_zero(&Rng::new(1).normal_vec(n), 0.05);
    let tv = Rng::new(2).normal_vec(n);
    let (store, id) = one_param(dev, Tensor::from_slice(&xv, &shape, Device::Cpu)?)?;
    let target = Tensor::from_slice(&tv, &shape, dev)?;
    let mut tape = Tape::new();
    let x = tape.param(&store, id)?;
    let a = tape.relu(x)?;
    let h = tape.silu(x)?;
    let s = tape.add(a, h)?;
    let loss = tape.mse_loss(s, &target)?;
    assert_eq!(tape.len(), 5);
    let g = tape.backward(loss)?;
    assert_eq!(g.len(), 1);
    let got = g.get(id).unwrap().to_vec::<f32>()?;
    let t64 = to64(&tv);
    let f = |x: &[f64]| {
        x.iter()
            .zip(&t64)
            .map(|(&x, &t)| (act64(Activation::Relu, x) + act64(Activation::Silu, x) - t).powi(2))
            .sum::<f64>()
            / n as f64
    };
    let num = finite_difference_f64(f, &to64(&xv), 1e-4, &(0..n).collect::<Vec<_>>())?;
    let num: Vec<f32> = num.iter().map(|&x| x as f32).collect();
    assert_close(&got, &num, 1e-4, 1e-6, "chain gradient");

    // The crate's own gradient checker agrees (tensor-level finite differences of the f32 tape).
    let grad = g.get(id).unwrap().clone();
    let report = check_gradient(
        "relu+silu+mse",
        |xt| {
            let mut st = ParamStore::new();
            let i = st.insert("x", xt.clone())?;
            let mut tp = Tape::new();
            let x = tp.param(&st, i)?;
            let a = tp.relu(x)?;
            let h = tp.silu(x)?;
            let s = tp.add(a, h)?;
            let l = tp.mse_loss(s, &target)?;
            tp.value(l)?.to_scalar()
        },
        store.get(id)?,
        &grad,
        &GradCheckConfig {
            eps: 1e-2,
            rtol: 2e-2,
            atol: 2e-4,
            ..Default::default()
        },
    )?;
    assert_eq!(report.checked, n);
    Ok(())
}

fn var_used_twice_accumulates(dev: Device) -> Result<()> {
    let xv = Rng::new(3).normal_vec(10);
    let rv = Rng::new(4).normal_vec(10);
    let (store, id) = one_param(dev, Tensor::from_slice(&xv, &[10], Device::Cpu)?)?;
    let mut tape = Tape::new();
    let x = tape.param(&store, id)?;
    let y = tape.add(x, x)?;
    let g = tape.backward_with(y, Tensor::from_slice(&rv, &[10], dev)?)?;
    let want: Vec<f32> = rv.iter().map(|r| 2.0 * r).collect();
    assert_eq!(g.get(id).unwrap().to_vec::<f32>()?, want);

    // The same parameter entered twice as two Vars also accumulates (in Gradients).
    let mut tape = Tape::new();
    let x1 = tape.param(&store, id)?;
    let x2 = tape.param(&store, id)?;
    let a = tape.relu(x1)?;
    let y = tape.add(a, x2)?;
    let g = tape.backward_with(y, Tensor::from_slice(&rv, &[10], dev)?)?;
    let want: Vec<f32> = xv
        .iter()
        .zip(&rv)
        .map(|(&x, &r)| if x > 0.0 { 2.0 * r } else { r })
        .collect();
    assert_eq!(g.get(id).unwrap().to_vec::<f32>()?, want);
    Ok(())
}

fn frozen_params_get_no_gradient(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let a = store.insert("a", randn(&[4], 1.0, 1, dev)?)?;
    let b = store.insert("b", randn(&[4], 1.0, 2, dev)?)?;
    store.set_trainable(b, false)?;
    assert!(store.is_trainable(a) && !store.is_trainable(b));
    assert_eq!(store.num_trainable_elements(), 4);
    let target = Tensor::zeros(&[4], DType::F32, dev)?;
    let mut tape = Tape::new();
    let (va, vb) = (tape.param(&store, a)?, tape.param(&store, b)?);
    assert!(tape.requires_grad(va) && !tape.requires_grad(vb));
    let s = tape.add(va, vb)?;
    let loss = tape.mse_loss(s, &target)?;
    let g = tape.backward(loss)?;
    assert!(g.get(a).is_some());
    assert!(g.get(b).is_none(), "frozen parameter got a gradient");
    assert_eq!(g.len(), 1);

    // Only frozen inputs: the loss needs no gradient, nothing is recorded for backward.
    let mut tape = Tape::new();
    let vb = tape.param(&store, b)?;
    let h = tape.gelu(vb)?;
    let loss = tape.mse_loss(h, &target)?;
    assert!(!tape.requires_grad(loss));
    assert!(tape.backward(loss)?.is_empty());
    // Constants never require a gradient.
    let c = tape.leaf(randn(&[4], 1.0, 3, dev)?);
    assert!(!tape.requires_grad(c));
    Ok(())
}

/// y = a · b as a custom op (the way layers plug into the tape).
struct MatMul;

impl Backward for MatMul {
    fn backward(
        &self,
        dy: &Tensor,
        inputs: &[&Tensor],
        _out: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (inputs[0], inputs[1]);
        Ok(vec![
            if needs[0] {
                Some(dy.matmul_t(b, false, true)?)
            } else {
                None
            },
            if needs[1] {
                Some(a.matmul_t(dy, true, false)?)
            } else {
                None
            },
        ])
    }

    fn name(&self) -> &'static str {
        "matmul"
    }
}

fn matmul(tape: &mut Tape, a: Var, b: Var) -> Result<Var> {
    let y = tape.value(a)?.matmul(tape.value(b)?)?;
    tape.record(&[a, b], y, Box::new(MatMul))
}

/// Three Gaussian blobs in 2-D, a bias column of ones, integer labels.
fn blobs(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let centers = [[2.0f32, 0.0], [-1.0, 1.7], [-1.0, -1.7]];
    let mut rng = Rng::new(seed);
    let mut x = Vec::with_capacity(n * 3);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % 3;
        x.push(centers[c][0] + 0.4 * rng.normal());
        x.push(centers[c][1] + 0.4 * rng.normal());
        x.push(1.0);
        y.push(c as u32);
    }
    (x, y)
}

fn tiny_mlp_trains_with_adamw(dev: Device) -> Result<()> {
    let (xv, labels) = blobs(96, 11);
    let x = Tensor::from_slice(&xv, &[96, 3], dev)?;
    let mut store = ParamStore::new();
    let w1 = store.insert("w1", randn(&[3, 16], 0.5, 1, dev)?)?;
    let w2 = store.insert("w2", randn(&[16, 3], 0.5, 2, dev)?)?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: 2e-2,
        ..Default::default()
    })?;
    let mut first = None;
    let mut last = f32::NAN;
    for step in 0..150 {
        let mut tape = Tape::new();
        let xi = tape.leaf(x.clone());
        let (p1, p2) = (tape.param(&store, w1)?, tape.param(&store, w2)?);
        let h = matmul(&mut tape, xi, p1)?;
        let h = tape.gelu_erf(h)?;
        let logits = matmul(&mut tape, h, p2)?;
        let loss = tape.cross_entropy(logits, &labels)?;
        last = tape.value(loss)?.to_scalar()?;
        first.get_or_insert(last);
        let mut grads = tape.backward(loss)?;
        drop(tape);
        assert_eq!(grads.len(), 2, "step {step}");
        grads.clip_global_norm(5.0)?;
        opt.step(&mut store, &grads)?;
    }
    let first = first.unwrap();
    assert!(first > 0.5, "initial loss {first}");
    assert!(last < 0.05, "loss after 150 steps: {last} (from {first})");
    assert_eq!(opt.steps(), 150);
    assert_eq!(opt.state_bytes(), (3 * 16 + 16 * 3) * 8);
    Ok(())
}

// ------------------------------------------------------------------------------ custom-op contract

struct Broken(usize);

impl Backward for Broken {
    fn backward(&self, dy: &Tensor, _: &[&Tensor], _: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        match self.0 {
            0 => Ok(vec![]),                                                          // wrong count
            1 => Ok(vec![Some(dy.reshape(&[dy.numel()])?)]),                          // wrong shape
            _ => Ok(vec![Some(Tensor::zeros(dy.shape(), DType::I32, dy.device())?)]), // not float
        }
    }
    fn name(&self) -> &'static str {
        "broken"
    }
}

fn backward_contract_errors(dev: Device) -> Result<()> {
    let (store, id) = one_param(dev, randn(&[2, 3], 1.0, 1, dev)?)?;
    for mode in 0..3 {
        let mut tape = Tape::new();
        let x = tape.param(&store, id)?;
        let v = tape.value(x)?.clone();
        let y = tape.record(&[x], v, Box::new(Broken(mode)))?;
        let loss = tape.mse_loss(y, &Tensor::zeros(&[2, 3], DType::F32, dev)?)?;
        let err = tape.backward(loss).unwrap_err().to_string();
        assert!(err.contains("broken"), "mode {mode}: {err}");
    }
    let mut tape = Tape::new();
    let x = tape.param(&store, id)?;
    // Not a scalar loss.
    assert!(matches!(tape.backward(x), Err(Error::Shape { .. })));
    // A Var of another tape.
    let mut other = Tape::new();
    for _ in 0..3 {
        other.leaf(Tensor::zeros(&[1], DType::F32, dev)?);
    }
    let foreign = other.leaf(Tensor::zeros(&[1], DType::F32, dev)?);
    assert!(tape.value(foreign).is_err());
    assert!(tape.relu(foreign).is_err());
    assert!(tape.backward(foreign).is_err());
    // An upstream gradient of the wrong shape.
    assert!(
        tape.backward_with(x, Tensor::zeros(&[3, 2], DType::F32, dev)?)
            .is_err()
    );
    Ok(())
}

// ------------------------------------------------------------------------------ gradients utilities

fn gradient_utilities(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let shapes: [&[usize]; 3] = [&[3, 5], &[100_003], &[1]];
    let ids: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| store.insert(format!("p{i}"), Tensor::zeros(s, DType::BF16, dev)?))
        .collect::<Result<_>>()?;
    let mut grads = Gradients::new();
    let mut all = Vec::new();
    for (i, (&id, s)) in ids.iter().zip(shapes).enumerate() {
        let g = Tensor::randn(s, 1.0 + i as f32, 40 + i as u64, DType::F32, dev)?;
        all.extend(g.to_vec::<f32>()?);
        grads.insert_or_add(id, g)?;
    }
    let norm64 = all.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    assert_close(
        &[grads.global_norm()?],
        &[norm64 as f32],
        1e-6,
        0.0,
        "global norm",
    );

    // insert_or_add: a half contribution is widened and summed in f32.
    let extra = Tensor::full(&[1], 0.25, DType::F16, dev)?;
    let before = grads.get(ids[2]).unwrap().to_vec::<f32>()?[0];
    grads.insert_or_add(ids[2], extra)?;
    let after = grads.get(ids[2]).unwrap();
    assert_eq!(after.dtype(), DType::F32);
    assert_eq!(after.to_vec::<f32>()?[0], before + 0.25);
    assert!(matches!(
        grads.insert_or_add(ids[2], Tensor::zeros(&[2], DType::F32, dev)?),
        Err(Error::Shape { .. })
    ));
    assert!(
        grads
            .insert_or_add(ids[2], Tensor::zeros(&[1], DType::I32, dev)?)
            .is_err()
    );

    // Clipping: the norm before is returned and the norm after is max_norm (up to the 1e-6 guard).
    let norm = grads.global_norm()?;
    let before_clip = grads.clone();
    assert_eq!(
        grads.clip_global_norm(norm * 2.0)?,
        norm,
        "no clip below the limit"
    );
    assert_eq!(
        grads.get(ids[0]).unwrap().to_vec::<f32>()?,
        before_clip.get(ids[0]).unwrap().to_vec::<f32>()?
    );
    let reported = grads.clip_global_norm(1.0)?;
    assert_close(&[reported], &[norm], 1e-6, 0.0, "clip returns the norm before");
    assert_close(&[grads.global_norm()?], &[1.0], 1e-5, 0.0, "norm after clipping");
    let scaled_ref: Vec<f32> = before_clip.get(ids[1]).unwrap().to_vec::<f32>()?;
    let coef = (1.0f64 / (norm as f64 + 1e-6)) as f32;
    let want: Vec<f32> = scaled_ref.iter().map(|x| x * coef).collect();
    assert_close(
        &grads.get(ids[1]).unwrap().to_vec::<f32>()?,
        &want,
        1e-6,
        0.0,
        "clip factor",
    );
    assert!(grads.clip_global_norm(0.0).is_err());
    assert!(grads.clip_global_norm(f32::NAN).is_err());

    grads.scale(0.5)?;
    assert_close(&[grads.global_norm()?], &[0.5], 1e-5, 0.0, "scale");
    assert!(grads.scale(f32::INFINITY).is_err());

    // A non-finite gradient: the norm says so and clipping leaves the gradients alone.
    let mut bad = Gradients::new();
    bad.insert_or_add(ids[2], Tensor::full(&[1], f32::INFINITY, DType::F32, dev)?)?;
    assert!(bad.clip_global_norm(1.0)?.is_infinite());
    assert!(bad.get(ids[2]).unwrap().to_vec::<f32>()?[0].is_infinite());
    assert_eq!(Gradients::new().global_norm()?, 0.0);
    Ok(())
}

#[test]
fn param_store_bookkeeping() -> Result<()> {
    let mut s = ParamStore::new();
    assert!(s.is_empty());
    let a = s.insert("a", Tensor::zeros(&[2, 3], DType::F32, Device::Cpu)?)?;
    let b = s.insert("b", Tensor::zeros(&[4], DType::BF16, Device::Cpu)?)?;
    assert_eq!(s.len(), 2);
    assert_eq!(s.find("b"), Some(b));
    assert_eq!(s.find("nope"), None);
    assert_eq!(s.name(a)?, "a");
    assert_eq!(s.size_in_bytes(), 6 * 4 + 4 * 2);
    assert_eq!(s.num_trainable_elements(), 10);
    assert!(matches!(
        s.insert("a", Tensor::zeros(&[1], DType::F32, Device::Cpu)?),
        Err(Error::InvalidArgument(_))
    ));
    assert!(
        s.insert("", Tensor::zeros(&[1], DType::F32, Device::Cpu)?)
            .is_err()
    );
    assert!(
        s.insert("i", Tensor::zeros(&[1], DType::I64, Device::Cpu)?)
            .is_err()
    );
    assert!(matches!(
        s.set(a, Tensor::zeros(&[3, 2], DType::F32, Device::Cpu)?),
        Err(Error::Shape { .. })
    ));
    assert!(
        s.set(a, Tensor::zeros(&[2, 3], DType::F16, Device::Cpu)?)
            .is_err()
    );
    s.set(a, Tensor::full(&[2, 3], 1.5, DType::F32, Device::Cpu)?)?;
    assert_eq!(s.get(a)?.to_vec::<f32>()?, vec![1.5; 6]);
    s.get_mut(b)?
        .add_scaled_(&Tensor::full(&[4], 1.0, DType::BF16, Device::Cpu)?, 2.0)?;
    assert_eq!(s.get(b)?.to_vec_f32()?, vec![2.0; 4]);
    s.set_trainable(a, false)?;
    assert_eq!(s.num_trainable_elements(), 4);
    assert_eq!(s.trainable_ids().collect::<Vec<_>>(), vec![b]);
    let names: Vec<&str> = s.iter().map(|(_, n, _)| n).collect();
    assert_eq!(names, ["a", "b"]);
    // Foreign ids are errors, not panics.
    let mut other = ParamStore::new();
    for i in 0..3 {
        other.insert(format!("o{i}"), Tensor::zeros(&[1], DType::F32, Device::Cpu)?)?;
    }
    let foreign = other.find("o2").unwrap();
    assert!(s.get(foreign).is_err() && s.name(foreign).is_err());
    assert!(s.set_trainable(foreign, true).is_err());
    assert!(!s.is_trainable(foreign));
    let mut tape = Tape::new();
    assert!(tape.param(&s, foreign).is_err());
    // Moving to a missing device fails and leaves the store as it was.
    if peft_kernels::cuda_device_count() == 0 {
        assert!(s.to_device(Device::Cuda(0)).is_err());
        assert_eq!(s.get(a)?.device(), Device::Cpu);
    }
    s.to_device(Device::Cpu)?;
    Ok(())
}

#[test]
fn gradcheck_reports_wrong_gradients() -> Result<()> {
    let x = Tensor::from_slice(&[0.3f32, -1.2, 2.0], &[3], Device::Cpu)?;
    let f = |t: &Tensor| -> Result<f32> { Ok(t.to_vec::<f32>()?.iter().map(|v| v * v).sum()) };
    let good = Tensor::from_slice(&[0.6f32, -2.4, 4.0], &[3], Device::Cpu)?;
    let r = check_gradient("x²", f, &x, &good, &GradCheckConfig::default())?;
    assert_eq!(r.checked, 3);
    let wrong = Tensor::from_slice(&[0.6f32, -2.4, 4.1], &[3], Device::Cpu)?;
    let err = check_gradient("x²", f, &x, &wrong, &GradCheckConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("x²") && err.contains("index 2"), "{err}");
    // bf16 points: the step that was really taken is used.
    let xb = x.to_dtype(DType::BF16)?;
    let sum = |t: &Tensor| -> Result<f32> { Ok(t.to_vec_f32()?.iter().sum()) };
    let d = finite_difference(sum, &xb, 1e-2, &[0, 1, 2])?;
    assert_close(&d, &[1.0, 1.0, 1.0], 1e-6, 0.0, "bf16 finite differences");
    // A step below half a bf16 ulp (1/128 at 1.2) is refused instead of dividing by zero.
    assert!(finite_difference(sum, &xb, 1e-3, &[1]).is_err());
    assert!(finite_difference(f, &x, 0.0, &[0]).is_err());
    assert!(finite_difference(f, &x, 1e-3, &[3]).is_err());
    Ok(())
}

// ------------------------------------------------------------------------------ CUDA vs CPU

/// Every op on the device against the CPU backend on the same inputs (a no-op on the CPU instance).
fn device_matches_cpu(dev: Device) -> Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let tol = if dtype == DType::F32 { 2e-6 } else { 1.0 / 128.0 };
        let x = Tensor::randn(&[3, 1027], 3.0, 1, dtype, Device::Cpu)?;
        let dy = Tensor::randn(&[3, 1027], 1.0, 2, dtype, Device::Cpu)?;
        let (xd, dyd) = (x.to_device(dev)?, dy.to_device(dev)?);
        for act in ACTS {
            let (c, d) = (ops::activation(&x, act)?, ops::activation(&xd, act)?);
            assert_close(
                &d.to_vec_f32()?,
                &c.to_vec_f32()?,
                tol,
                1e-6,
                &format!("{act:?} {dtype}"),
            );
            let (c, d) = (
                ops::activation_backward(&x, &dy, act)?,
                ops::activation_backward(&xd, &dyd, act)?,
            );
            assert_close(
                &d.to_vec_f32()?,
                &c.to_vec_f32()?,
                tol,
                1e-6,
                &format!("{act:?} bwd {dtype}"),
            );
        }
        let g = Tensor::from_slice(&[1.7f32], &[1], Device::Cpu)?;
        let gd = g.to_device(dev)?;
        let (c, d) = (ops::mse_loss(&x, &dy)?, ops::mse_loss(&xd, &dyd)?);
        assert_close(&[d.to_scalar()?], &[c.to_scalar()?], 1e-5, 0.0, "mse");
        let (c, d) = (
            ops::mse_loss_backward(&x, &dy, &g)?,
            ops::mse_loss_backward(&xd, &dyd, &gd)?,
        );
        assert_close(&d.to_vec_f32()?, &c.to_vec_f32()?, tol, 1e-9, "mse bwd");
        let mut rng = Rng::new(4);
        let mut targets: Vec<u32> = (0..3).map(|_| rng.below(1027) as u32).collect();
        targets[1] = 7; // ignored below: the device must skip the row like the CPU
        let (cl, cs) = ops::cross_entropy_forward(&x, &targets, Some(7))?;
        let (dl, ds) = ops::cross_entropy_forward(&xd, &targets, Some(7))?;
        assert_close(&[dl.to_scalar()?], &[cl.to_scalar()?], 1e-5, 0.0, "ce");
        let (c, d) = (
            ops::cross_entropy_backward(&x, &cs, &g)?,
            ops::cross_entropy_backward(&xd, &ds, &gd)?,
        );
        assert_close_scaled(&d.to_vec_f32()?, &c.to_vec_f32()?, tol, "ce bwd");
    }
    // The gradient norm over several CUDA tensors (one partials buffer, one download).
    let mut grads = Gradients::new();
    let mut store = ParamStore::new();
    let mut host = Gradients::new();
    for (i, n) in [1usize, 255, 257, 300_001].into_iter().enumerate() {
        let id = store.insert(format!("p{i}"), Tensor::zeros(&[n], DType::F32, dev)?)?;
        let g = Tensor::randn(&[n], 1.0, i as u64, DType::F32, Device::Cpu)?;
        host.insert_or_add(id, g.clone())?;
        grads.insert_or_add(id, g.to_device(dev)?)?;
    }
    assert_close(
        &[grads.global_norm()?],
        &[host.global_norm()?],
        1e-6,
        0.0,
        "cuda norm",
    );
    Ok(())
}

device_test!(
    activation_forward_matches_f64,
    activation_backward_vs_finite_differences,
    activation_half_storage_rounds_once,
    mse_value_and_gradient,
    cross_entropy_hand_computed,
    cross_entropy_nan_and_inf,
    cross_entropy_gradient,
    cross_entropy_ignore_index,
    loss_input_errors,
    chain_relu_add_mse,
    var_used_twice_accumulates,
    frozen_params_get_no_gradient,
    tiny_mlp_trains_with_adamw,
    backward_contract_errors,
    gradient_utilities,
    device_matches_cpu,
);

// ------------------------------------------------------------------------------ properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Activations (forward and derivative) on fresh random inputs of odd sizes vs f64 math.
    #[test]
    fn activations_random(n in 1usize..700, scale in 0.01f32..20.0, seed in any::<u64>()) {
        let v: Vec<f32> = Rng::new(seed).normal_vec(n).iter().map(|x| x * scale).collect();
        let x = Tensor::from_slice(&v, &[n], Device::Cpu).unwrap();
        let ones = Tensor::full(&[n], 1.0, DType::F32, Device::Cpu).unwrap();
        for act in ACTS {
            let y = ops::activation(&x, act).unwrap().to_vec::<f32>().unwrap();
            let want: Vec<f32> = v.iter().map(|&x| act64(act, x as f64) as f32).collect();
            assert_close(&y, &want, 3e-6, 1e-7, &format!("{act:?}"));
            let d = ops::activation_backward(&x, &ones, act).unwrap().to_vec::<f32>().unwrap();
            let h = 1e-6f64;
            let want: Vec<f32> = v.iter().map(|&x| {
                let x = x as f64;
                if act == Activation::Relu { return if x > 0.0 { 1.0 } else { 0.0 }; }
                ((act64(act, x + h) - act64(act, x - h)) / (2.0 * h)) as f32
            }).collect();
            assert_close(&d, &want, 1e-5, 2e-6, &format!("{act:?}'"));
        }
    }

    /// Cross-entropy value on random shapes and scales vs the f64 reference.
    #[test]
    fn cross_entropy_random(n in 1usize..9, c in 1usize..300, scale in 0.1f32..50.0, seed in any::<u64>()) {
        let v: Vec<f32> = Rng::new(seed).normal_vec(n * c).iter().map(|x| x * scale).collect();
        let mut rng = Rng::new(seed ^ 1);
        let t: Vec<u32> = (0..n).map(|_| rng.below(c as u64) as u32).collect();
        let x = Tensor::from_slice(&v, &[n, c], Device::Cpu).unwrap();
        let got = ops::cross_entropy(&x, &t, None).unwrap().to_scalar().unwrap();
        let want = ce64(&to64(&v), &t, c);
        assert_close(&[got], &[want as f32], 1e-5, 1e-6, "ce");
    }
}

#[test]
fn erf_reference_is_accurate() {
    // Spot values of erf (Abramowitz & Stegun table 7.1) guard the f64 oracle itself.
    for (x, want) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (3.5, 0.999_999_256_901_627_7),
    ] {
        assert!((erf64(x) - want).abs() < 1e-14, "erf({x}) = {}", erf64(x));
        assert!((erf64(-x) + want).abs() < 1e-14);
    }
    // and the GELU constants: gelu_erf(1) = Φ(1) and the two GELUs differ.
    assert!((act64(Activation::GeluErf, 1.0) - 0.841_344_746_068_542_9).abs() < 1e-14);
    assert!((act64(Activation::Gelu, 1.0) - 0.841_191_990_608_276_8).abs() < 1e-12);
}

// ------------------------------------------------------------------------------ exact GELU, vectorized

/// erfc(a) for a >= 0 in f64, relatively accurate: `1 - erf` below 3 (erfc(3) = 2.2e-5, so the
/// cancellation costs at most ~5e-12 relative), the continued fraction above.
fn erfc64_pos(a: f64) -> f64 {
    if a < 3.0 {
        1.0 - erf64(a)
    } else {
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    }
}

/// Φ(x), the standard normal CDF, relatively accurate for negative x too.
fn cdf64(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    if z < 0.0 {
        0.5 * erfc64_pos(-z)
    } else {
        1.0 - 0.5 * erfc64_pos(z)
    }
}

/// gelu(x) = x·Φ(x) and gelu'(x) = Φ(x) + x·φ(x) in f64.
fn gelu64(x: f64) -> (f64, f64) {
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (x * cdf64(x), cdf64(x) + x * pdf)
}

/// An f32 of any magnitude: random sign, exponent and mantissa (subnormals to 3e38), or a special.
fn any_f32(rng: &mut Rng) -> f32 {
    match rng.below(40) {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => 0.0,
        4 => -0.0,
        5..=12 => f32::from_bits(rng.next_u64() as u32),
        _ => rng.normal() * 2f32.powi(rng.below(12) as i32 - 4),
    }
}

/// One value of the vectorized exact GELU against f64: forward within the activation tests'
/// tolerance (3e-6 relative + 1e-7), the derivative against the analytic f64 one (1e-5 + 1e-7), and
/// the special values as torch gives them.
fn check_gelu_value(x: f32, y: f32, d: f32) {
    if x.is_nan() {
        assert!(y.is_nan() && d.is_nan(), "gelu(NaN) = {y}, gelu'(NaN) = {d}");
        return;
    }
    if x.is_infinite() {
        // As torch: gelu(-inf) = -inf·Φ(-inf) = -inf·0 = NaN, gelu(inf) = inf, and the derivative
        // Φ(±inf) + (±inf)·φ(±inf) = Φ + (±inf)·0 = NaN.
        let y_ok = if x > 0.0 { y == f32::INFINITY } else { y.is_nan() };
        assert!(y_ok && d.is_nan(), "gelu({x}) = {y}, gelu'({x}) = {d}");
        return;
    }
    let (want, dwant) = gelu64(x as f64);
    let tol = 1e-7 + 3e-6 * want.abs();
    assert!(
        (y as f64 - want).abs() <= tol,
        "gelu({x:e}) = {y:e}, f64 {want:e}"
    );
    let dtol = 1e-7 + 1e-5 * dwant.abs();
    assert!(
        (d as f64 - dwant).abs() <= dtol,
        "gelu'({x:e}) = {d:e}, f64 {dwant:e}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The exact GELU (forward and derivative) over the whole f32 range: random bit patterns, huge and
    /// subnormal magnitudes, NaN and infinities, at odd lengths (every vector tail), in f32 storage.
    #[test]
    fn gelu_erf_whole_range_vs_f64(n in 1usize..300, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let v: Vec<f32> = (0..n).map(|_| any_f32(&mut rng)).collect();
        let x = Tensor::from_slice(&v, &[n], Device::Cpu).unwrap();
        let ones = Tensor::full(&[n], 1.0, DType::F32, Device::Cpu).unwrap();
        let y = ops::activation(&x, Activation::GeluErf).unwrap().to_vec::<f32>().unwrap();
        let d = ops::activation_backward(&x, &ones, Activation::GeluErf).unwrap().to_vec::<f32>().unwrap();
        for i in 0..n {
            check_gelu_value(v[i], y[i], d[i]);
        }
    }
}

/// Φ from erfc keeps the relative accuracy of gelu for negative inputs, where `1 + erf(x/√2)` cancels
/// (torch's formula gives 0 below x ≈ -5.9): within 3e-5 of f64 down to the smallest normal results.
#[test]
fn gelu_erf_negative_tail_is_relatively_accurate() -> Result<()> {
    let v: Vec<f32> = (0..=13_000).map(|i| -(i as f32) * 1e-3).collect();
    let x = Tensor::from_slice(&v, &[v.len()], Device::Cpu)?;
    let y = ops::activation(&x, Activation::GeluErf)?.to_vec::<f32>()?;
    for (&x, &y) in v.iter().zip(&y) {
        let want = gelu64(x as f64).0;
        if want.abs() < f32::MIN_POSITIVE as f64 * 16.0 {
            continue;
        }
        assert!(
            ((y as f64 - want) / want).abs() < 3e-5,
            "gelu({x}) = {y:e}, f64 {want:e}"
        );
    }
    // gelu(-8) = -8·Φ(-8) = -4.9e-15: representable, and not 0.
    assert!(y[8000] < 0.0 && (y[8000] as f64 / gelu64(-8.0).0 - 1.0).abs() < 3e-5);
    Ok(())
}

/// The oracle of the tests above against published values of Φ (Abramowitz & Stegun table 26.1 and
/// its tail): Φ(-1), Φ(-3), Φ(-5), Φ(-10).
#[test]
fn normal_cdf_reference_is_accurate() {
    for (x, want) in [
        (-1.0, 0.158_655_253_931_457_05),
        (-3.0, 1.349_898_031_630_094_6e-3),
        (-5.0, 2.866_515_718_791_939e-7),
        (-10.0, 7.619_853_024_160_527e-24),
    ] {
        assert!(((cdf64(x) - want) / want).abs() < 1e-9, "Φ({x}) = {:e}", cdf64(x));
        assert!((cdf64(-x) - (1.0 - want)).abs() < 1e-15);
    }
}
