//! The transformer tape ops (`peft_kernels::nn`): every forward against plain f64 math, every backward
//! against finite differences of the f64 reference (and against the tape on the device for whole
//! chains), odd shapes, extreme values, half dtypes, bad input. CUDA runs the same bodies.

mod common;

use common::{assert_close, f64s, rounded, to32};
use peft_kernels::autograd::gradcheck::{GradCheckConfig, check_gradient, finite_difference_f64};
use peft_kernels::autograd::{ParamId, ParamStore, Tape};
use peft_kernels::nn;
use peft_kernels::rng::Rng;
use peft_kernels::{DType, Device, Result, Tensor};
use proptest::prelude::*;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn normal(n: usize, std: f32, mean: f32, seed: u64) -> Vec<f32> {
    Rng::new(seed)
        .normal_vec(n)
        .iter()
        .map(|x| x * std + mean)
        .collect()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A trainable parameter holding `v` (so the tape gives its gradient).
fn param(dev: Device, v: &[f32], shape: &[usize], dtype: DType) -> Result<(ParamStore, ParamId)> {
    let mut store = ParamStore::new();
    let id = store.insert("x", Tensor::from_slice(v, shape, dev)?.to_dtype(dtype)?)?;
    Ok((store, id))
}

/// The gradient of `Σ op(x)·r` with respect to `x` through the tape, as f32 on the host.
fn tape_grad(
    dev: Device,
    xv: &[f32],
    shape: &[usize],
    rv: &[f32],
    op: impl Fn(&mut Tape, peft_kernels::autograd::Var) -> Result<peft_kernels::autograd::Var>,
) -> Result<Vec<f32>> {
    let (store, id) = param(dev, xv, shape, DType::F32)?;
    let mut tape = Tape::new();
    let x = tape.param(&store, id)?;
    let y = op(&mut tape, x)?;
    let r = Tensor::from_slice(rv, tape.value(y)?.shape(), dev)?;
    let g = tape.backward_with(y, r)?;
    g.get(id).expect("gradient of x").to_vec::<f32>()
}

/// `Σ_i f(x)_i · r_i` differentiated numerically in f64 at every element.
fn numeric_grad(f: impl Fn(&[f64]) -> Vec<f64>, xv: &[f32], rv: &[f32]) -> Result<Vec<f32>> {
    let r = to64(rv);
    let idx: Vec<usize> = (0..xv.len()).collect();
    let g = finite_difference_f64(
        |x| f(x).iter().zip(&r).map(|(a, b)| a * b).sum(),
        &to64(xv),
        1e-4,
        &idx,
    )?;
    Ok(to32(&g))
}

// ------------------------------------------------------------------------------ f64 references

fn ln64(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let h = w.len();
    x.chunks(h)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / h as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / h as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            row.iter()
                .zip(w)
                .zip(b)
                .map(move |((v, w), b)| (v - mean) * rstd * w + b)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn gather64(x: &[f64], idx: &[u32], h: usize) -> Vec<f64> {
    idx.iter()
        .flat_map(|&i| x[i as usize * h..(i as usize + 1) * h].to_vec())
        .collect()
}

fn mean_pool64(x: &[f64], mask: &[u8], batch: usize, seq: usize, h: usize) -> Vec<f64> {
    let mut y = vec![0f64; batch * h];
    for b in 0..batch {
        let count: f64 = mask[b * seq..(b + 1) * seq].iter().map(|&m| m as f64).sum();
        for t in 0..seq {
            let m = mask[b * seq + t] as f64;
            for j in 0..h {
                y[b * h + j] += m * x[(b * seq + t) * h + j] / count.max(1e-9);
            }
        }
    }
    y
}

// ------------------------------------------------------------------------------ gathers

fn embedding_gathers_rows(dev: Device) -> Result<()> {
    let (vocab, h) = (11usize, 37usize);
    let tv = normal(vocab * h, 1.0, 0.0, 1);
    let ids = [3u32, 0, 10, 3, 3, 7, 1];
    for dtype in DTYPES {
        let table = Tensor::from_slice(&tv, &[vocab, h], dev)?.to_dtype(dtype)?;
        let y = nn::embedding(&table, &ids)?;
        assert_eq!((y.shape(), y.dtype()), (&[ids.len(), h][..], dtype));
        let want = rounded(&to32(&gather64(&to64(&tv), &ids, h)), dtype);
        assert_eq!(y.to_vec_f32()?, want, "embedding {dtype}");
        // On the tape: a constant (the table is frozen).
        let mut tape = Tape::new();
        let e = tape.embedding(&table, &ids)?;
        assert!(!tape.requires_grad(e));
        assert_eq!(tape.value(e)?.to_vec_f32()?, want);
    }
    let table = Tensor::from_slice(&tv, &[vocab, h], dev)?;
    let err = nn::embedding(&table, &[0, 11]).unwrap_err().to_string();
    assert!(err.contains("token id 11 at position 1"), "{err}");
    assert_eq!(nn::embedding(&table, &[])?.shape(), &[0, h]);
    assert!(nn::embedding(&Tensor::zeros(&[4], DType::F32, dev)?, &[0]).is_err());
    assert!(nn::embedding(&Tensor::zeros(&[4, 2], DType::I32, dev)?, &[0]).is_err());
    Ok(())
}

fn gather_rows_and_gradient(dev: Device) -> Result<()> {
    // Repeated indices (gradients add up) and rows that nobody gathers (zero gradient).
    for (n, h, idx) in [
        (5usize, 3usize, vec![4u32, 0, 4, 4, 2]),
        (1, 1, vec![0]),
        (9, 130, vec![8, 1, 1, 0, 8, 5, 5, 5, 5]),
    ] {
        let xv = normal(n * h, 1.0, 0.0, n as u64);
        let rv = normal(idx.len() * h, 1.0, 0.0, 99);
        let got = tape_grad(dev, &xv, &[n, h], &rv, |t, x| t.gather_rows(x, &idx))?;
        let num = numeric_grad(|x| gather64(x, &idx, h), &xv, &rv)?;
        assert_close(&got, &num, 1e-5, 1e-6, &format!("gather_rows grad n={n} h={h}"));
        // The forward on the tape matches too.
        let mut tape = Tape::new();
        let x = tape.leaf(Tensor::from_slice(&xv, &[n, h], dev)?);
        let y = tape.gather_rows(x, &idx)?;
        assert_eq!(
            tape.value(y)?.to_vec::<f32>()?,
            to32(&gather64(&to64(&xv), &idx, h))
        );
    }
    // Half gradients: many repeats sum in f32 and round once.
    let h = 65;
    let idx = vec![2u32; 300];
    let dyv = rounded(&normal(300 * h, 1.0, 0.0, 4), DType::BF16);
    for dtype in [DType::F16, DType::BF16] {
        let dy = Tensor::from_slice(&dyv, &[300, h], dev)?.to_dtype(dtype)?;
        let dx = nn::gather_rows_backward(&dy, &idx, 4)?.to_vec_f32()?;
        let mut want = vec![0f32; 4 * h];
        for j in 0..h {
            want[2 * h + j] = (0..300).map(|r| dyv[r * h + j] as f64).sum::<f64>() as f32;
        }
        let tol = if dtype == DType::F16 { 1e-3 } else { 8e-3 };
        assert_close(&dx, &want, tol, 1e-6, &format!("scatter-add {dtype}"));
        assert!(dx[..2 * h].iter().chain(&dx[3 * h..]).all(|&v| v == 0.0));
    }
    let x = Tensor::zeros(&[3, 2], DType::F32, dev)?;
    assert!(nn::gather_rows(&x, &[3]).is_err());
    assert!(
        nn::gather_rows_backward(&x, &[0, 1], 5).is_err(),
        "3 rows for 2 indices"
    );
    assert!(
        nn::gather_rows_backward(&x, &[0, 1, 5], 5).is_err(),
        "index 5 of 5 rows"
    );
    Ok(())
}

fn cls_pool_picks_first_tokens(dev: Device) -> Result<()> {
    let (batch, seq, h) = (3usize, 5usize, 7usize);
    let xv = normal(batch * seq * h, 1.0, 0.0, 3);
    let rv = normal(batch * h, 1.0, 0.0, 4);
    let idx = [0u32, 5, 10];
    let y = nn::cls_pool(&Tensor::from_slice(&xv, &[batch * seq, h], dev)?, batch, seq)?;
    assert_eq!(y.to_vec::<f32>()?, to32(&gather64(&to64(&xv), &idx, h)));
    let got = tape_grad(dev, &xv, &[batch * seq, h], &rv, |t, x| t.cls_pool(x, batch, seq))?;
    let num = numeric_grad(|x| gather64(x, &idx, h), &xv, &rv)?;
    assert_close(&got, &num, 1e-5, 1e-6, "cls_pool grad");
    let x = Tensor::zeros(&[15, 2], DType::F32, dev)?;
    assert!(nn::cls_pool(&x, 4, 4).is_err());
    assert!(nn::cls_pool(&x, 15, 0).is_err());
    Ok(())
}

fn mean_pool_masked(dev: Device) -> Result<()> {
    let (batch, seq, h) = (4usize, 6usize, 33usize);
    // Sequence 2 is all padding: a zero row, zero gradient.
    let mask: Vec<u8> = [
        [1u8, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 1, 1],
    ]
    .concat();
    let xv = normal(batch * seq * h, 2.0, 0.5, 5);
    let rv = normal(batch * h, 1.0, 0.0, 6);
    for dtype in DTYPES {
        let xr = rounded(&xv, dtype);
        let x = Tensor::from_slice(&xr, &[batch * seq, h], dev)?.to_dtype(dtype)?;
        let y = nn::mean_pool(&x, &mask, batch, seq)?;
        assert_eq!((y.shape(), y.dtype()), (&[batch, h][..], dtype));
        let want = rounded(&to32(&mean_pool64(&to64(&xr), &mask, batch, seq, h)), dtype);
        let rtol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        assert_close(&y.to_vec_f32()?, &want, rtol, 1e-6, &format!("mean_pool {dtype}"));
        assert!(y.to_vec_f32()?[2 * h..3 * h].iter().all(|&v| v == 0.0));
    }
    let got = tape_grad(dev, &xv, &[batch * seq, h], &rv, |t, x| {
        t.mean_pool(x, &mask, batch, seq)
    })?;
    let num = numeric_grad(|x| mean_pool64(x, &mask, batch, seq, h), &xv, &rv)?;
    assert_close(&got, &num, 1e-5, 1e-6, "mean_pool grad");
    let x = Tensor::zeros(&[6, 2], DType::F32, dev)?;
    assert!(nn::mean_pool(&x, &[1; 5], 2, 3).is_err(), "mask length");
    assert!(
        nn::mean_pool(&x, &[1, 1, 2, 1, 1, 1], 2, 3).is_err(),
        "mask value 2"
    );
    assert!(nn::mean_pool(&x, &[1; 6], 3, 3).is_err(), "batch x seq");
    assert!(
        nn::mean_pool_backward(&x, &[1; 6], 2, 3).is_err(),
        "gradient rows"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ add_row, tanh, dropout

fn add_row_broadcasts(dev: Device) -> Result<()> {
    let (n, h) = (7usize, 19usize);
    let xv = normal(n * h, 1.0, 0.0, 7);
    let bv = normal(h, 1.0, 0.0, 8);
    for dtype in DTYPES {
        let x = Tensor::from_slice(&xv, &[n, h], dev)?.to_dtype(dtype)?;
        // The row may be in another float dtype (here always f32, and bf16 once).
        for row_dtype in [DType::F32, DType::BF16] {
            let row = Tensor::from_slice(&bv, &[h], dev)?.to_dtype(row_dtype)?;
            let y = nn::add_row(&x, &row)?;
            let xr = rounded(&xv, dtype);
            let br = rounded(&bv, row_dtype);
            let want: Vec<f32> = (0..n * h).map(|i| xr[i] + br[i % h]).collect();
            assert_eq!(
                y.to_vec_f32()?,
                rounded(&want, dtype),
                "add_row {dtype} + {row_dtype}"
            );
        }
    }
    let rv = normal(n * h, 1.0, 0.0, 9);
    let row = Tensor::from_slice(&bv, &[h], dev)?;
    let got = tape_grad(dev, &xv, &[n, h], &rv, |t, x| t.add_row(x, &row))?;
    assert_eq!(got, rv, "add_row passes the gradient through");
    assert!(nn::add_row(&Tensor::zeros(&[2, 3], DType::F32, dev)?, &row).is_err());
    Ok(())
}

fn tanh_on_the_tape(dev: Device) -> Result<()> {
    let n = 300;
    let mut xv = normal(n, 3.0, 0.0, 10);
    xv[..4].copy_from_slice(&[0.0, 20.0, -20.0, 1e-3]);
    let rv = normal(n, 1.0, 0.0, 11);
    let mut tape = Tape::new();
    let x = tape.leaf(Tensor::from_slice(&xv, &[n], dev)?);
    let y = tape.tanh(x)?;
    let want: Vec<f32> = xv.iter().map(|&x| (x as f64).tanh() as f32).collect();
    assert_close(&tape.value(y)?.to_vec::<f32>()?, &want, 2e-6, 1e-7, "tanh");
    let got = tape_grad(dev, &xv, &[n], &rv, |t, x| t.tanh(x))?;
    let num = numeric_grad(|x| x.iter().map(|v| v.tanh()).collect(), &xv, &rv)?;
    assert_close(&got, &num, 1e-4, 1e-6, "tanh grad");
    Ok(())
}

fn dropout_regenerates_mask(dev: Device) -> Result<()> {
    let (n, h) = (33usize, 65usize);
    let xv = normal(n * h, 1.0, 0.0, 12);
    let rv = normal(n * h, 1.0, 0.0, 13);
    for p in [0.0f32, 0.1, 0.5, 0.9] {
        let seed = 1234 + (p * 10.0) as u64;
        let x = Tensor::from_slice(&xv, &[n, h], dev)?;
        let mut tape = Tape::new();
        let xl = tape.leaf(x.clone());
        let y = tape.dropout(xl, p, seed)?;
        let yv = tape.value(y)?.to_vec::<f32>()?;
        assert_eq!(yv, x.dropout(p, seed)?.to_vec::<f32>()?);
        // Elements kept by the hash are scaled, the others zero; the fraction kept is about 1 - p.
        let scale = 1.0 / (1.0 - p);
        let mut kept = 0usize;
        for (i, (&y, &x)) in yv.iter().zip(&xv).enumerate() {
            let keep = peft_kernels::tensor::dropout_hash(seed, i as u64) as f64 >= p as f64 * 4294967296.0;
            kept += keep as usize;
            assert_eq!(y, if keep { x * scale } else { 0.0 }, "p={p} element {i}");
        }
        let frac = kept as f64 / (n * h) as f64;
        assert!((frac - (1.0 - p as f64)).abs() < 0.03, "p={p} kept {frac}");
        // The backward applies the same mask: dx = dy·mask·scale.
        let got = tape_grad(dev, &xv, &[n, h], &rv, |t, x| t.dropout(x, p, seed))?;
        let want: Vec<f32> = yv
            .iter()
            .zip(&rv)
            .map(|(&y, &r)| if y == 0.0 && p > 0.0 { 0.0 } else { r * scale })
            .collect();
        assert_eq!(got, want, "dropout grad p={p}");
    }
    let mut tape = Tape::new();
    let x = tape.leaf(Tensor::zeros(&[2, 2], DType::F32, dev)?);
    assert!(tape.dropout(x, 1.0, 0).is_err());
    assert!(tape.dropout(x, -0.1, 0).is_err());
    Ok(())
}

// ------------------------------------------------------------------------------ LayerNorm

fn layer_norm_forward_matches_f64(dev: Device) -> Result<()> {
    // torch.nn.functional.layer_norm([1, 2, 3], (3,), eps=1e-5) = [-1.2247357, 0, 1.2247357].
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[1, 3], dev)?;
    let (one, zero) = (
        Tensor::full(&[3], 1.0, DType::F32, dev)?,
        Tensor::zeros(&[3], DType::F32, dev)?,
    );
    let (y, saved) = nn::layer_norm_forward(&x, &one, &zero, 1e-5)?;
    assert_close(
        &y.to_vec::<f32>()?,
        &[-1.224_735_7, 0.0, 1.224_735_7],
        1e-6,
        1e-7,
        "ln known",
    );
    assert_close(
        &saved.stats().to_vec::<f32>()?,
        &[2.0, (1.0 / (2.0f64 / 3.0 + 1e-5).sqrt()) as f32],
        1e-6,
        0.0,
        "ln stats",
    );
    // Odd widths, a large common offset (the two-pass variance must not cancel), tiny and huge rows.
    for (k, (rows, h, std, mean)) in [
        (1usize, 1usize, 1.0f32, 0.0f32),
        (3, 7, 1.0, 0.0),
        (5, 384, 0.5, 1000.0),
        (2, 1001, 1e-3, -3.0),
        (4, 9, 1e4, 0.0),
    ]
    .into_iter()
    .enumerate()
    {
        let xv = normal(rows * h, std, mean, 20 + k as u64);
        let wv = normal(h, 0.5, 1.0, 30 + k as u64);
        let bv = normal(h, 0.5, 0.0, 40 + k as u64);
        let eps = if k == 3 { 1e-5f32 } else { 1e-12 };
        let x = Tensor::from_slice(&xv, &[rows, h], dev)?;
        let w = Tensor::from_slice(&wv, &[h], dev)?;
        let b = Tensor::from_slice(&bv, &[h], dev)?;
        let y = nn::layer_norm(&x, &w, &b, eps)?.to_vec::<f32>()?;
        let want = to32(&ln64(&to64(&xv), &to64(&wv), &to64(&bv), eps as f64));
        // A constant row (h = 1) normalizes to 0 -> y = bias. With a large offset, the f32 rounding
        // of the mean (ulp(mean)/2) is amplified by rstd: the tolerance grows with |mean|/std.
        let atol = 2e-5 + 2e-7 * mean.abs() / std;
        assert_close(
            &y,
            &want,
            1e-4,
            atol,
            &format!("ln [{rows}, {h}] std {std} mean {mean}"),
        );
    }
    Ok(())
}

/// Half storage: widen, compute in f32, round once, so the result equals the f32 result on the same
/// (half-representable) values, rounded.
fn layer_norm_half_rounds_once(dev: Device) -> Result<()> {
    let (rows, h) = (6usize, 129usize);
    for dtype in [DType::F16, DType::BF16] {
        let xv = rounded(&normal(rows * h, 2.0, 1.0, 50), dtype);
        let dyv = rounded(&normal(rows * h, 1.0, 0.0, 51), dtype);
        let w = Tensor::from_slice(&normal(h, 0.3, 1.0, 52), &[h], dev)?;
        let b = Tensor::from_slice(&normal(h, 0.3, 0.0, 53), &[h], dev)?;
        let x32 = Tensor::from_slice(&xv, &[rows, h], dev)?;
        let dy32 = Tensor::from_slice(&dyv, &[rows, h], dev)?;
        let (x, dy) = (x32.to_dtype(dtype)?, dy32.to_dtype(dtype)?);
        let (y, saved) = nn::layer_norm_forward(&x, &w.to_dtype(dtype)?, &b, 1e-5)?;
        let (y32, saved32) = nn::layer_norm_forward(&x32, &rounded_t(&w, dtype)?, &b, 1e-5)?;
        assert_eq!(y.dtype(), dtype);
        assert_eq!(
            y.to_vec_f32()?,
            rounded(&y32.to_vec::<f32>()?, dtype),
            "ln fwd {dtype}"
        );
        let dx = nn::layer_norm_backward(&x, &dy, &saved)?;
        let dx32 = nn::layer_norm_backward(&x32, &dy32, &saved32)?;
        assert_eq!(dx.dtype(), dtype);
        assert_eq!(
            dx.to_vec_f32()?,
            rounded(&dx32.to_vec::<f32>()?, dtype),
            "ln bwd {dtype}"
        );
    }
    Ok(())
}

fn rounded_t(t: &Tensor, dtype: DType) -> Result<Tensor> {
    t.to_dtype(dtype)?.to_dtype(DType::F32)
}

fn layer_norm_gradient(dev: Device) -> Result<()> {
    for (k, (rows, h)) in [(1usize, 2usize), (3, 7), (2, 67)].into_iter().enumerate() {
        let xv = normal(rows * h, 1.5, 0.3, 60 + k as u64);
        let wv = normal(h, 0.5, 1.0, 70 + k as u64);
        let bv = normal(h, 0.5, 0.0, 80 + k as u64);
        let rv = normal(rows * h, 1.0, 0.0, 90 + k as u64);
        let (w, b) = (
            Tensor::from_slice(&wv, &[h], dev)?,
            Tensor::from_slice(&bv, &[h], dev)?,
        );
        let got = tape_grad(dev, &xv, &[rows, h], &rv, |t, x| t.layer_norm(x, &w, &b, 1e-5))?;
        let (w64, b64) = (to64(&wv), to64(&bv));
        let num = numeric_grad(|x| ln64(x, &w64, &b64, 1e-5), &xv, &rv)?;
        assert_close(&got, &num, 1e-3, 1e-5, &format!("ln grad [{rows}, {h}]"));
    }
    Ok(())
}

fn layer_norm_bad_input(dev: Device) -> Result<()> {
    let x = Tensor::zeros(&[2, 4], DType::F32, dev)?;
    let w = Tensor::zeros(&[4], DType::F32, dev)?;
    assert!(nn::layer_norm(&x, &Tensor::zeros(&[3], DType::F32, dev)?, &w, 1e-5).is_err());
    assert!(nn::layer_norm(&x, &w, &Tensor::zeros(&[4, 1], DType::F32, dev)?, 1e-5).is_err());
    assert!(nn::layer_norm(&x, &w, &w, -1.0).is_err());
    assert!(nn::layer_norm(&x, &w, &w, f32::NAN).is_err());
    assert!(nn::layer_norm(&Tensor::zeros(&[2, 0], DType::F32, dev)?, &w, &w, 1e-5).is_err());
    assert!(nn::layer_norm(&Tensor::zeros(&[2, 4], DType::I32, dev)?, &w, &w, 1e-5).is_err());
    // A zero-variance row with eps = 0 gives non-finite values, not a panic.
    let (y, saved) = nn::layer_norm_forward(&x, &w, &w, 0.0)?;
    assert!(y.to_vec::<f32>()?.iter().all(|v| v.is_nan()));
    let dy = Tensor::zeros(&[2, 5], DType::F32, dev)?;
    assert!(nn::layer_norm_backward(&x, &dy, &saved).is_err());
    Ok(())
}

// ------------------------------------------------------------------------------ composition

/// A BERT-shaped chain on the tape (bias, LayerNorm, tanh, dropout, pooling, row selection), its
/// gradient checked against finite differences of the same forward on the same device.
fn bert_like_chain_gradient(dev: Device) -> Result<()> {
    let (batch, seq, h) = (2usize, 5usize, 12usize);
    let mask = [1u8, 1, 1, 0, 0, 1, 1, 1, 1, 1];
    let table = Tensor::randn(&[9, h], 1.0, 1, DType::F32, dev)?;
    let bias = Tensor::randn(&[h], 0.5, 2, DType::F32, dev)?;
    let w = Tensor::randn(&[h], 0.2, 3, DType::F32, dev)?.affine(1.0, 1.0)?;
    let b = Tensor::randn(&[h], 0.2, 4, DType::F32, dev)?;
    let r_mean = Tensor::randn(&[batch, h], 1.0, 5, DType::F32, dev)?;
    let r_cls = Tensor::randn(&[batch, h], 1.0, 6, DType::F32, dev)?;
    let ids = [1u32, 4, 8, 0, 0, 2, 2, 7, 3, 5];
    let mut store = ParamStore::new();
    let xid = store.insert("x", Tensor::randn(&[batch * seq, h], 1.0, 7, DType::F32, dev)?)?;
    let forward = |store: &ParamStore| -> Result<(Tape, peft_kernels::autograd::Var)> {
        let mut tape = Tape::new();
        let e = tape.embedding(&table, &ids)?;
        let x = tape.param(store, xid)?;
        let hsum = tape.add(e, x)?;
        let hb = tape.add_row(hsum, &bias)?;
        let hn = tape.layer_norm(hb, &w, &b, 1e-12)?;
        let hd = tape.dropout(hn, 0.25, 42)?;
        let ht = tape.tanh(hd)?;
        let pooled = tape.mean_pool(ht, &mask, batch, seq)?;
        let cls = tape.cls_pool(ht, batch, seq)?;
        let last = tape.gather_rows(ht, &[2, 9])?;
        let both = tape.add(cls, last)?;
        let l1 = tape.mse_loss(pooled, &r_mean)?;
        let l2 = tape.mse_loss(both, &r_cls)?;
        let loss = tape.add(l1, l2)?;
        Ok((tape, loss))
    };
    let (tape, loss) = forward(&store)?;
    let grads = tape.backward(loss)?;
    let g = grads.get(xid).expect("gradient of x").clone();
    let at = store.get(xid)?.clone();
    let cell = std::cell::RefCell::new(store);
    check_gradient(
        "bert-like chain dx",
        |p| {
            cell.borrow_mut().set(xid, p.clone())?;
            let (tape, loss) = forward(&cell.borrow())?;
            tape.value(loss)?.to_scalar()
        },
        &at,
        &g,
        &GradCheckConfig {
            eps: 1e-2,
            rtol: 2e-2,
            atol: 2e-4,
            max_points: 120,
            seed: 1,
        },
    )?;
    assert!(f64s(&g)?.iter().any(|&v| v != 0.0));
    Ok(())
}

device_test!(
    embedding_gathers_rows,
    gather_rows_and_gradient,
    cls_pool_picks_first_tokens,
    mean_pool_masked,
    add_row_broadcasts,
    tanh_on_the_tape,
    dropout_regenerates_mask,
    layer_norm_forward_matches_f64,
    layer_norm_half_rounds_once,
    layer_norm_gradient,
    layer_norm_bad_input,
    bert_like_chain_gradient,
);

// ------------------------------------------------------------------------------ properties (CPU)

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// LayerNorm forward and backward over odd shapes and magnitudes against the f64 formulas.
    #[test]
    fn layer_norm_matches_f64_formulas(
        rows in 1usize..5,
        h in 1usize..70,
        log_std in -3.0f32..4.0,
        mean in -100.0f32..100.0,
        seed in 0u64..1000,
    ) {
        let std = 10f32.powf(log_std);
        let xv = normal(rows * h, std, mean, seed);
        let wv = normal(h, 1.0, 0.0, seed + 1);
        let bv = normal(h, 1.0, 0.0, seed + 2);
        let dyv = normal(rows * h, 1.0, 0.0, seed + 3);
        let eps = 1e-5f64;
        let x = Tensor::from_slice(&xv, &[rows, h], Device::Cpu).unwrap();
        let w = Tensor::from_slice(&wv, &[h], Device::Cpu).unwrap();
        let b = Tensor::from_slice(&bv, &[h], Device::Cpu).unwrap();
        let (y, saved) = nn::layer_norm_forward(&x, &w, &b, eps as f32).unwrap();
        let dy = Tensor::from_slice(&dyv, &[rows, h], Device::Cpu).unwrap();
        let dx = nn::layer_norm_backward(&x, &dy, &saved).unwrap().to_vec::<f32>().unwrap();
        let (x64, w64) = (to64(&xv), to64(&wv));
        let want = ln64(&x64, &w64, &to64(&bv), eps);
        let y = y.to_vec::<f32>().unwrap();
        // The analytic f64 gradient: rstd·(g - mean(g) - x̂·mean(g·x̂)), g = dy·w.
        let mut dx_want = vec![0f64; rows * h];
        // f32 noise is relative to rstd·|dy·w| (the terms that cancel), not to dx itself.
        let mut scale = 1e-30f64;
        for r in 0..rows {
            let row = &x64[r * h..(r + 1) * h];
            let m = row.iter().sum::<f64>() / h as f64;
            let var = row.iter().map(|v| (v - m).powi(2)).sum::<f64>() / h as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let g: Vec<f64> = (0..h).map(|j| dyv[r * h + j] as f64 * w64[j]).collect();
            scale = scale.max(rstd * g.iter().fold(0f64, |m, v| m.max(v.abs())));
            let xh: Vec<f64> = row.iter().map(|v| (v - m) * rstd).collect();
            let a = g.iter().sum::<f64>() / h as f64;
            let c = g.iter().zip(&xh).map(|(g, x)| g * x).sum::<f64>() / h as f64;
            for j in 0..h {
                dx_want[r * h + j] = rstd * (g[j] - a - xh[j] * c);
            }
        }
        // Relative to the row's rstd-scaled magnitudes: f32 rounding of x relative to its spread.
        let cond = (mean.abs() / std).max(1.0) as f64;
        for (i, (&a, &e)) in y.iter().zip(&want).enumerate() {
            prop_assert!((a as f64 - e).abs() <= 1e-4 * cond * (1.0 + e.abs()), "y[{i}] {a} vs {e}");
        }
        for (i, (&a, &e)) in dx.iter().zip(&dx_want).enumerate() {
            prop_assert!((a as f64 - e).abs() <= 1e-3 * cond * scale, "dx[{i}] {a} vs {e}");
        }
    }

    /// Gather and its scatter-add transpose are adjoint: <gather(x), r> = <x, scatter(r)>.
    #[test]
    fn gather_scatter_adjoint(
        n in 1usize..12,
        h in 1usize..40,
        idx in proptest::collection::vec(0u32..12, 0..30),
        seed in 0u64..1000,
    ) {
        let idx: Vec<u32> = idx.into_iter().map(|i| i % n as u32).collect();
        let xv = normal(n * h, 1.0, 0.0, seed);
        let rv = normal(idx.len() * h, 1.0, 0.0, seed + 1);
        let x = Tensor::from_slice(&xv, &[n, h], Device::Cpu).unwrap();
        let r = Tensor::from_slice(&rv, &[idx.len(), h], Device::Cpu).unwrap();
        let gx = nn::gather_rows(&x, &idx).unwrap().to_vec::<f32>().unwrap();
        let sr = nn::gather_rows_backward(&r, &idx, n).unwrap().to_vec::<f32>().unwrap();
        let lhs: f64 = gx.iter().zip(&rv).map(|(&a, &b)| a as f64 * b as f64).sum();
        let rhs: f64 = xv.iter().zip(&sr).map(|(&a, &b)| a as f64 * b as f64).sum();
        prop_assert!((lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()), "{lhs} vs {rhs}");
    }
}
