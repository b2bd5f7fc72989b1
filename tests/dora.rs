//! The DoRA / QDoRA layer: forward and backward (detached and full norm gradient) against f64 math built
//! from the materialized `V = W + s·B·A` on odd shapes, dense and 4-bit bases, dropout; finite
//! differences; the factored norm against the exact norm including cancelling and zero rows; PEFT's
//! init, eval cache, merge/unmerge; CUDA against the CPU; PEFT fixtures (when present); bad input.

mod common;

use common::{Base, assert_close, check_param_gradients, f64s, make_base, mm, to32, tr};
use peft_kernels::adapters::AdapterLinear;
use peft_kernels::adapters::dora::{DoraLinear, DoraOptions, MergeFormat, NORM_EPS, magnitude_key};
use peft_kernels::adapters::lora::{LoraConfig, LoraInit, LoraLinear};
use peft_kernels::autograd::gradcheck::{GradCheckConfig, check_gradient};
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::qmatmul::BaseWeight;
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;
use std::cell::RefCell;

fn max_abs(v: &[f64]) -> f32 {
    v.iter().fold(1e-6f64, |m, x| m.max(x.abs())) as f32
}

/// f64 reference of one layer call, written from `V = W + s·B·A` (not from the factored form the layer
/// uses): `z = x_c·Vᵀ`, `dV = dzᵀ·x_c`, `dB = s·dV·Aᵀ`, `dA = s·Bᵀ·dV`, and for the full gradient
/// `dV += (dn/n) ⊙ V` with `dn = -m·S/n²`.
struct Reference {
    y: Vec<f64>,
    dx: Vec<f64>,
    da: Vec<f64>,
    db: Vec<f64>,
    dm: Vec<f64>,
    n: Vec<f64>,
}

fn exact_norms(layer: &DoraLinear, store: &ParamStore) -> Result<(Vec<f64>, Vec<f64>)> {
    let (inp, out, r) = (layer.in_features(), layer.out_features(), layer.rank());
    let s = layer.scaling() as f64;
    let w = f64s(&layer.base().dequantize(DType::F32)?)?;
    let a = f64s(store.get(layer.a_id())?)?;
    let b = f64s(store.get(layer.b_id())?)?;
    let ba = mm(&b, &a, out, r, inp);
    let v: Vec<f64> = w.iter().zip(&ba).map(|(w, d)| w + s * d).collect();
    let n = (0..out)
        .map(|i| {
            v[i * inp..(i + 1) * inp]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    Ok((v, n))
}

fn reference(
    layer: &DoraLinear,
    store: &ParamStore,
    x: &Tensor,
    dy: &Tensor,
    step: Option<u64>,
    full: bool,
) -> Result<Reference> {
    let (inp, out, r) = (layer.in_features(), layer.out_features(), layer.rank());
    let t = x.numel() / inp;
    let s = layer.scaling() as f64;
    let w = f64s(&layer.base().dequantize(DType::F32)?)?;
    let a = f64s(store.get(layer.a_id())?)?;
    let b = f64s(store.get(layer.b_id())?)?;
    let m = f64s(store.get(layer.m_id())?)?;
    let (v, n) = exact_norms(layer, store)?;
    let ne: Vec<f64> = n.iter().map(|&n| n.max(NORM_EPS as f64)).collect();
    let g: Vec<f64> = m.iter().zip(&ne).map(|(m, n)| m / n).collect();
    let xv = f64s(x)?;
    let mask = layer.mask_seed(step);
    let drop = |v: &[f64], shape: &[usize]| -> Result<Vec<f64>> {
        match mask {
            Some(seed) => {
                let tv = Tensor::from_vec(to32(v), shape, Device::Cpu)?;
                f64s(&tv.dropout(layer.dropout(), seed)?)
            }
            None => Ok(v.to_vec()),
        }
    };
    let xc = match mask {
        Some(seed) => f64s(&x.to_device(Device::Cpu)?.dropout(layer.dropout(), seed)?)?,
        None => xv.clone(),
    };
    let dyv = f64s(dy)?;
    let bias = match layer.bias() {
        Some(b) => f64s(b)?,
        None => vec![0.0; out],
    };
    let zc = mm(&xc, &tr(&v, out, inp), t, inp, out);
    let mut y = vec![0f64; t * out];
    let (xw, xcw) = (
        mm(&xv, &tr(&w, out, inp), t, inp, out),
        mm(&xc, &tr(&w, out, inp), t, inp, out),
    );
    for ti in 0..t {
        for i in 0..out {
            let k = ti * out + i;
            y[k] = match mask {
                None => g[i] * zc[k] + bias[i],
                // x·Wᵀ + b + (g - 1)·(x_d·Wᵀ) + g·s·(x_d·Aᵀ)·Bᵀ = x·Wᵀ + b + g·z_d - x_d·Wᵀ
                Some(_) => xw[k] + bias[i] + g[i] * zc[k] - xcw[k],
            };
        }
    }
    let mut sdot = vec![0f64; out];
    for ti in 0..t {
        for i in 0..out {
            sdot[i] += dyv[ti * out + i] * zc[ti * out + i];
        }
    }
    let dm: Vec<f64> = sdot.iter().zip(&ne).map(|(s, n)| s / n).collect();
    let dz: Vec<f64> = (0..t * out).map(|k| dyv[k] * g[k % out]).collect();
    let mut dv = mm(&tr(&dz, t, out), &xc, out, t, inp); // [out, in]
    // dx: no dropout dz·V; dropout dy·W + mask(dz·V - dy·W).
    let dzv = mm(&dz, &v, t, out, inp);
    let dx = match mask {
        None => dzv,
        Some(_) => {
            let dyw = mm(&dyv, &w, t, out, inp);
            let inner: Vec<f64> = dzv.iter().zip(&dyw).map(|(a, b)| a - b).collect();
            let masked = drop(&inner, &[t, inp])?;
            dyw.iter().zip(&masked).map(|(a, b)| a + b).collect()
        }
    };
    if full {
        for i in 0..out {
            let dn = -m[i] * sdot[i] / (ne[i] * ne[i]);
            for j in 0..inp {
                dv[i * inp + j] += dn / ne[i] * v[i * inp + j];
            }
        }
    }
    let db: Vec<f64> = mm(&dv, &tr(&a, r, inp), out, inp, r)
        .into_iter()
        .map(|v| v * s)
        .collect();
    let da: Vec<f64> = mm(&tr(&b, out, r), &dv, r, out, inp)
        .into_iter()
        .map(|v| v * s)
        .collect();
    Ok(Reference { y, dx, da, db, dm, n })
}

struct Case {
    t: usize,
    inp: usize,
    out: usize,
    r: usize,
    base: Base,
    dtype: DType,
    dropout: f32,
    bias: bool,
    full: bool,
}

/// A layer with random A, B (PEFT's `init_lora_weights=False`) and m perturbed away from n.
fn make_layer(c: &Case, dev: Device, seed: u64, store: &mut ParamStore) -> Result<DoraLinear> {
    let base = make_base(c.base, c.out, c.inp, seed, dev)?;
    let bias = if c.bias {
        Some(Tensor::randn(&[c.out], 0.3, seed + 1, DType::F32, dev)?)
    } else {
        None
    };
    let cfg = LoraConfig {
        r: c.r,
        alpha: 3.0,
        use_rslora: seed.is_multiple_of(3),
        dropout: c.dropout,
        init: LoraInit::Random,
        dtype: DType::F32,
    };
    let layer = DoraLinear::new(
        "blk.proj",
        base,
        bias,
        &cfg,
        store,
        seed + 2,
        DoraOptions {
            full_norm_gradient: c.full,
        },
    )?;
    let m = store.get(layer.m_id())?.to_vec_f32()?;
    let noise = Tensor::rand(&[c.out], 0.8, 1.2, seed + 9, DType::F32, Device::Cpu)?.to_vec_f32()?;
    let m2: Vec<f32> = m.iter().zip(&noise).map(|(m, k)| m * k).collect();
    store.set(layer.m_id(), Tensor::from_vec(m2, &[c.out], dev)?)?;
    Ok(layer)
}

fn check_case(c: &Case, dev: Device, seed: u64) -> Result<()> {
    let mut store = ParamStore::new();
    let layer = make_layer(c, dev, seed, &mut store)?;
    let x = Tensor::randn(&[c.t, c.inp], 1.0, seed + 3, DType::F32, dev)?.to_dtype(c.dtype)?;
    let dy = Tensor::randn(&[c.t, c.out], 1.0, seed + 4, DType::F32, dev)?.to_dtype(c.dtype)?;
    let step = Some(seed + 5);
    let (y, ctx) = layer.forward(&store, &x, step)?;
    let g = layer.backward(&store, &ctx, &dy, true)?;
    assert_eq!(y.dtype(), c.dtype);
    assert_eq!(y.shape(), &[c.t, c.out]);
    let refr = reference(&layer, &store, &x, &dy, step, c.full)?;
    let rt = match c.dtype {
        DType::F32 => 5e-5,
        DType::F16 => 5e-3,
        _ => 3e-2,
    };
    let what = format!(
        "{:?} {:?} t={} in={} out={} r={} p={} full={}",
        c.base, c.dtype, c.t, c.inp, c.out, c.r, c.dropout, c.full
    );
    // With the full gradient, the n-path can cancel the detached part (e.g. in = out = 1, where
    // y = m·sign(V)·x does not depend on B): tolerances scale with the larger of the two.
    let det = if c.full {
        Some(reference(&layer, &store, &x, &dy, step, false)?)
    } else {
        None
    };
    let chk = |got: &Tensor, want: &[f64], name: &str| -> Result<()> {
        let mut scale = max_abs(want);
        if let Some(d) = &det {
            scale = scale.max(max_abs(match name {
                "dA" => &d.da,
                "dB" => &d.db,
                _ => want,
            }));
        }
        assert_close(
            &got.to_vec_f32()?,
            &to32(want),
            rt,
            rt * scale,
            &format!("{name} {what}"),
        );
        Ok(())
    };
    chk(ctx.norm(), &refr.n, "n")?;
    chk(&y, &refr.y, "y")?;
    chk(&g.dm, &refr.dm, "dm")?;
    chk(&g.db, &refr.db, "dB")?;
    chk(&g.da, &refr.da, "dA")?;
    let dx = g.dx.ok_or_else(|| Error::InvalidArgument("dx missing".into()))?;
    assert_eq!(dx.shape(), x.shape());
    chk(&dx, &refr.dx, "dx")?;
    assert_eq!(
        (g.da.dtype(), g.db.dtype(), g.dm.dtype()),
        (DType::F32, DType::F32, DType::F32)
    );
    // need_dx = false gives the same adapter gradients and no dx.
    let g2 = layer.backward(&store, &ctx, &dy, false)?;
    assert!(g2.dx.is_none());
    assert_eq!(g2.da.to_vec_f32()?, g.da.to_vec_f32()?, "dA without dx {what}");
    assert_eq!(g2.dm.to_vec_f32()?, g.dm.to_vec_f32()?, "dm without dx {what}");
    Ok(())
}

fn forward_backward_vs_f64(dev: Device) -> Result<()> {
    let bases = [
        Base::Dense(DType::F32),
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        Base::Nf4 {
            double: false,
            blocksize: 32,
        },
        Base::Fp4,
    ];
    let mut seed = 1;
    for &base in &bases {
        for &(t, inp, out, r) in &[
            (1usize, 64usize, 33usize, 4usize),
            (5, 96, 17, 3),
            (37, 128, 65, 8),
        ] {
            for &(dropout, bias, full) in &[
                (0.0f32, true, false),
                (0.25, false, false),
                (0.0, false, true),
                (0.2, true, true),
            ] {
                seed += 10;
                let c = Case {
                    t,
                    inp,
                    out,
                    r,
                    base,
                    dtype: DType::F32,
                    dropout,
                    bias,
                    full,
                };
                check_case(&c, dev, seed)?;
            }
        }
    }
    // Half activations over a matching dense base and over NF4; r > 16 (several GEMV passes).
    for &dt in &[DType::BF16, DType::F16] {
        for base in [
            Base::Dense(dt),
            Base::Nf4 {
                double: true,
                blocksize: 64,
            },
        ] {
            seed += 10;
            let c = Case {
                t: 9,
                inp: 128,
                out: 40,
                r: 4,
                base,
                dtype: dt,
                dropout: 0.1,
                bias: true,
                full: false,
            };
            check_case(&c, dev, seed)?;
        }
    }
    let c = Case {
        t: 20,
        inp: 96,
        out: 24,
        r: 37,
        base: Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        dtype: DType::F32,
        dropout: 0.0,
        bias: true,
        full: true,
    };
    check_case(&c, dev, 777)?;
    Ok(())
}

fn odd_shapes(dev: Device) -> Result<()> {
    // Odd `in` (rows start on a low nibble, blocks straddle rows), tiny and single-row shapes.
    for (i, &(t, inp, out, r)) in [
        (3usize, 65usize, 7usize, 5usize),
        (20, 37, 19, 2),
        (70, 99, 3, 1),
        (2, 1, 1, 1),
        (4, 33, 1, 17),
    ]
    .iter()
    .enumerate()
    {
        let c = Case {
            t,
            inp,
            out,
            r,
            base: Base::Nf4 {
                double: i % 2 == 0,
                blocksize: 64,
            },
            dtype: DType::F32,
            dropout: if i % 2 == 0 { 0.1 } else { 0.0 },
            bias: true,
            full: i % 2 == 1,
        };
        check_case(&c, dev, 100 + i as u64)?;
    }
    Ok(())
}

/// Finite differences of `f = Σ y·R` for one layer in the full-gradient mode (every gradient is the
/// true one), with dropout active (the mask is a pure function of the seed) and without.
fn gradcheck_full(dev: Device) -> Result<()> {
    for (i, (base, p)) in [
        (
            Base::Nf4 {
                double: true,
                blocksize: 64,
            },
            0.0f32,
        ),
        (Base::Dense(DType::F32), 0.3),
    ]
    .into_iter()
    .enumerate()
    {
        let c = Case {
            t: 6,
            inp: 40,
            out: 12,
            r: 3,
            base,
            dtype: DType::F32,
            dropout: p,
            bias: true,
            full: true,
        };
        let mut store = ParamStore::new();
        let layer = make_layer(&c, dev, 50 + i as u64, &mut store)?;
        let x = Tensor::randn(&[c.t, c.inp], 1.0, 7, DType::F32, dev)?;
        let rr = Tensor::randn(&[c.t, c.out], 1.0, 8, DType::F32, dev)?;
        let step = Some(3);
        let (_, ctx) = layer.forward(&store, &x, step)?;
        let grads = layer.backward(&store, &ctx, &rr, true)?;
        let cfg = GradCheckConfig {
            eps: 1e-2,
            rtol: 2e-2,
            atol: 3e-3,
            max_points: 40,
            seed: 1,
        };
        let f_of = |store: &ParamStore, x: &Tensor| -> Result<f32> {
            let (y, _) = layer.forward(store, x, step)?;
            let prod = y.mul(&rr)?;
            Ok(prod.to_vec_f32()?.iter().map(|&v| v as f64).sum::<f64>() as f32)
        };
        check_gradient(
            "dora dx",
            |xp| f_of(&store, xp),
            &x,
            grads
                .dx
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("dx".into()))?,
            &cfg,
        )?;
        let store = RefCell::new(store);
        for (id, g, name) in [
            (layer.a_id(), &grads.da, "dA"),
            (layer.b_id(), &grads.db, "dB"),
            (layer.m_id(), &grads.dm, "dm"),
        ] {
            let at = store.borrow().get(id)?.clone();
            check_gradient(
                &format!("dora full {name} {base:?}"),
                |pv| {
                    store.borrow_mut().set(id, pv.clone())?;
                    f_of(&store.borrow(), &x)
                },
                &at,
                g,
                &cfg,
            )?;
            store.borrow_mut().set(id, at)?;
        }
    }
    Ok(())
}

/// Detached mode: dm and dx are exact derivatives (n depends on neither), so finite differences must
/// match them; dA and dB are not (they omit the n-path) and are checked against the f64 reference in
/// `forward_backward_vs_f64`. Here we also check that the detached dA really differs from the full
/// one, so the option does something.
fn gradcheck_detached(dev: Device) -> Result<()> {
    let c = Case {
        t: 5,
        inp: 48,
        out: 10,
        r: 4,
        base: Base::Nf4 {
            double: false,
            blocksize: 64,
        },
        dtype: DType::F32,
        dropout: 0.0,
        bias: false,
        full: false,
    };
    let mut store = ParamStore::new();
    let mut layer = make_layer(&c, dev, 61, &mut store)?;
    let x = Tensor::randn(&[c.t, c.inp], 1.0, 2, DType::F32, dev)?;
    let rr = Tensor::randn(&[c.t, c.out], 1.0, 3, DType::F32, dev)?;
    let (_, ctx) = layer.forward(&store, &x, Some(1))?;
    let det = layer.backward(&store, &ctx, &rr, true)?;
    let cfg = GradCheckConfig {
        eps: 1e-2,
        rtol: 2e-2,
        atol: 3e-3,
        max_points: 40,
        seed: 2,
    };
    let f_of = |layer: &DoraLinear, store: &ParamStore, x: &Tensor| -> Result<f32> {
        let (y, _) = layer.forward(store, x, Some(1))?;
        Ok(y.mul(&rr)?.to_vec_f32()?.iter().map(|&v| v as f64).sum::<f64>() as f32)
    };
    check_gradient(
        "detached dx",
        |xp| f_of(&layer, &store, xp),
        &x,
        det.dx
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("dx".into()))?,
        &cfg,
    )?;
    let m0 = store.get(layer.m_id())?.clone();
    let store_c = RefCell::new(store);
    check_gradient(
        "detached dm",
        |pv| {
            store_c.borrow_mut().set(layer.m_id(), pv.clone())?;
            f_of(&layer, &store_c.borrow(), &x)
        },
        &m0,
        &det.dm,
        &cfg,
    )?;
    let mut store = store_c.into_inner();
    store.set(layer.m_id(), m0)?;
    layer.set_full_norm_gradient(true);
    let (_, ctx) = layer.forward(&store, &x, Some(1))?;
    let full = layer.backward(&store, &ctx, &rr, true)?;
    let (a, b) = (det.da.to_vec_f32()?, full.da.to_vec_f32()?);
    let diff = a.iter().zip(&b).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff > 1e-3 * b.iter().fold(0f32, |m, v| m.max(v.abs())),
        "full and detached dA coincide"
    );
    assert_eq!(
        det.dm.to_vec_f32()?,
        full.dm.to_vec_f32()?,
        "dm does not depend on the mode"
    );
    Ok(())
}

/// DoRA → GELU → DoRA → MSE on the tape, full gradient: finite differences of every parameter.
fn gradcheck_tape_stack(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let cfg = LoraConfig {
        r: 3,
        alpha: 6.0,
        init: LoraInit::Random,
        ..LoraConfig::default()
    };
    let full = DoraOptions {
        full_norm_gradient: true,
    };
    let l1 = DoraLinear::new(
        "l1",
        make_base(
            Base::Nf4 {
                double: true,
                blocksize: 64,
            },
            24,
            64,
            1,
            dev,
        )?,
        None,
        &cfg,
        &mut store,
        2,
        full,
    )?;
    let bias = Tensor::randn(&[5], 0.1, 9, DType::F32, dev)?;
    let l2 = DoraLinear::new(
        "l2",
        make_base(Base::Dense(DType::F32), 5, 24, 3, dev)?,
        Some(bias),
        &cfg,
        &mut store,
        4,
        full,
    )?;
    let x = Tensor::randn(&[6, 64], 1.0, 5, DType::F32, dev)?;
    let target = Tensor::randn(&[6, 5], 1.0, 6, DType::F32, dev)?;
    let loss_of = |store: &ParamStore| -> Result<(f32, peft_kernels::autograd::Gradients)> {
        let mut tape = Tape::new();
        let xv = tape.leaf(x.clone());
        let h = l1.forward_t(&mut tape, store, xv, None)?;
        let h = tape.gelu(h)?;
        let y = l2.forward_t(&mut tape, store, h, None)?;
        let loss = tape.mse_loss(y, &target)?;
        let grads = tape.backward(loss)?;
        Ok((tape.value(loss)?.to_scalar()?, grads))
    };
    let (_, grads) = loss_of(&store)?;
    let gcfg = GradCheckConfig {
        eps: 1e-2,
        rtol: 2e-2,
        atol: 2e-4,
        max_points: 24,
        seed: 1,
    };
    check_param_gradients(
        store,
        &[l1.a_id(), l1.b_id(), l1.m_id(), l2.a_id(), l2.b_id(), l2.m_id()],
        &grads,
        |s| Ok(loss_of(s)?.0),
        &gcfg,
    )
}

/// The factored norm against the exact norm of the materialized `W + s·B·A` (f64), on random rows,
/// on rows where `s·B_i·A ≈ -W_i` (the expansion cancels), and on an exactly zero row.
fn norm_vs_exact(dev: Device) -> Result<()> {
    let (out, inp, r) = (12usize, 67usize, 4usize);
    let s = 2.0f32;
    let a = Tensor::randn(&[r, inp], 0.3, 1, DType::F32, Device::Cpu)?.to_vec_f32()?;
    let mut bm = Tensor::randn(&[out, r], 0.5, 2, DType::F32, Device::Cpu)?.to_vec_f32()?;
    let noise = Tensor::randn(&[out, inp], 1.0, 3, DType::F32, Device::Cpu)?.to_vec_f32()?;
    // Dense W: rows 0..3 cancel up to δ = 1e-3, 1e-5, 0; row 3 is exactly zero with B_3 = 0.
    let mut w = Tensor::randn(&[out, inp], 0.5, 4, DType::F32, Device::Cpu)?.to_vec_f32()?;
    for (i, delta) in [(0usize, 1e-3f32), (1, 1e-5), (2, 0.0)] {
        for j in 0..inp {
            let ba: f32 = (0..r).map(|k| bm[i * r + k] * a[k * inp + j]).sum();
            w[i * inp + j] = -s * ba + delta * noise[i * inp + j];
        }
    }
    w[3 * inp..4 * inp].fill(0.0);
    bm[3 * r..4 * r].fill(0.0);
    let dense = BaseWeight::Dense(Tensor::from_vec(w, &[out, inp], dev)?);
    // 4-bit W: rows 0 and 1 of A are the directions of rows 5 and 6 of the dequantized W, and B cancels them.
    let q = make_base(
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        out,
        inp,
        5,
        dev,
    )?;
    let wq = q.dequantize(DType::F32)?.to_vec_f32()?;
    let mut aq = a.clone();
    let mut bq = bm.clone();
    for (k, row) in [(0usize, 5usize), (1, 6)] {
        let wr = &wq[row * inp..(row + 1) * inp];
        let norm = wr.iter().map(|v| v * v).sum::<f32>().sqrt();
        for j in 0..inp {
            aq[k * inp + j] = wr[j] / norm;
        }
        bq[row * r..(row + 1) * r].fill(0.0);
        bq[row * r + k] = -norm / s;
    }
    for (base, av, bv, rows) in [
        (dense, &a, &bm, vec![0usize, 1, 2, 3]),
        (q, &aq, &bq, vec![5usize, 6]),
    ] {
        let mut store = ParamStore::new();
        let cfg = LoraConfig {
            r,
            alpha: s * r as f32,
            init: LoraInit::Random,
            ..LoraConfig::default()
        };
        let layer = DoraLinear::new("n", base, None, &cfg, &mut store, 7, DoraOptions::default())?;
        assert_eq!(layer.scaling(), s);
        store.set(layer.a_id(), Tensor::from_vec(av.clone(), &[r, inp], dev)?)?;
        store.set(layer.b_id(), Tensor::from_vec(bv.clone(), &[out, r], dev)?)?;
        let n = layer.weight_norm(&store)?.to_vec_f32()?;
        let (_, exact) = exact_norms(&layer, &store)?;
        let w = f64s(&layer.base().dequantize(DType::F32)?)?;
        let bf = f64s(store.get(layer.b_id())?)?;
        let af = f64s(store.get(layer.a_id())?)?;
        let sba = mm(&bf, &af, out, r, inp);
        let eps = f32::EPSILON as f64;
        for i in 0..out {
            let wn = w[i * inp..(i + 1) * inp]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt();
            let dn = sba[i * inp..(i + 1) * inp]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
                * s as f64;
            // |n² - n_exact²| ≤ 64·ε·(‖W_i‖ + ‖s·B_i·A‖)²: the expansion's rounding error, which is all
            // that is left when the row cancels.
            let bound = 64.0 * eps * (wn + dn) * (wn + dn);
            let got = n[i] as f64;
            assert!(got.is_finite() && got >= 0.0, "row {i}: n = {got}");
            assert!(
                (got * got - exact[i] * exact[i]).abs() <= bound,
                "row {i}: n {got} vs exact {} (bound on n² {bound:e})",
                exact[i]
            );
            if !rows.contains(&i) {
                // Away from cancellation the relative error is ~ε.
                assert!(
                    (got - exact[i]).abs() <= 1e-5 * exact[i],
                    "row {i}: n {got} vs exact {}",
                    exact[i]
                );
            }
        }
        if matches!(layer.base(), BaseWeight::Dense(_)) {
            assert_eq!(n[3], 0.0, "an exactly zero row has n = 0");
            // A zero row: m = n = 0 at creation, g = 0, the row outputs its bias (the base layer's value).
            let mut store2 = ParamStore::new();
            let bias = Tensor::randn(&[out], 1.0, 11, DType::F32, dev)?;
            let l2 = DoraLinear::new(
                "z",
                layer.base().clone(),
                Some(bias.clone()),
                &cfg,
                &mut store2,
                7,
                DoraOptions::default(),
            )?;
            let mut b2 = store2.get(l2.b_id())?.to_vec_f32()?;
            b2[3 * r..4 * r].fill(0.0);
            store2.set(l2.b_id(), Tensor::from_vec(b2, &[out, r], dev)?)?;
            let mut m2 = l2.weight_norm(&store2)?.to_vec_f32()?;
            assert_eq!(m2[3], 0.0);
            store2.set(l2.m_id(), Tensor::from_vec(m2.clone(), &[out], dev)?)?;
            let x = Tensor::randn(&[3, inp], 1.0, 12, DType::F32, dev)?;
            let (y, ctx) = l2.forward(&store2, &x, Some(1))?;
            let yv = y.to_vec_f32()?;
            let bv = bias.to_vec_f32()?;
            for ti in 0..3 {
                assert_eq!(yv[ti * out + 3], bv[3], "zero row outputs the bias");
            }
            assert_eq!(ctx.scale().to_vec_f32()?[3], 0.0);
            // With a nonzero magnitude on the zero row everything stays finite (PEFT gives inf/NaN).
            m2[3] = 1.0;
            store2.set(l2.m_id(), Tensor::from_vec(m2, &[out], dev)?)?;
            let (y, ctx) = l2.forward(&store2, &x, Some(1))?;
            let dy = Tensor::randn(&[3, out], 1.0, 13, DType::F32, dev)?;
            let gr = l2.backward(&store2, &ctx, &dy, true)?;
            for (t, what) in [(&y, "y"), (&gr.da, "dA"), (&gr.db, "dB"), (&gr.dm, "dm")] {
                assert!(
                    t.to_vec_f32()?.iter().all(|v| v.is_finite()),
                    "{what} not finite on a zero-norm row"
                );
            }
            assert_eq!(ctx.scale().to_vec_f32()?[3], 1.0 / NORM_EPS);
        }
    }
    Ok(())
}

/// `m` starts at n: DoRA equals LoRA with the same A and B, and with PEFT's default init (B = 0) the
/// base layer.
fn init_is_noop(dev: Device) -> Result<()> {
    let x = Tensor::randn(&[7, 96], 1.0, 1, DType::F32, dev)?;
    for base in [
        Base::Dense(DType::F32),
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
    ] {
        let w = make_base(base, 33, 96, 2, dev)?;
        let bias = Tensor::randn(&[33], 0.2, 3, DType::F32, dev)?;
        let cfg = LoraConfig {
            r: 8,
            alpha: 16.0,
            init: LoraInit::Random,
            ..LoraConfig::default()
        };
        let (mut s1, mut s2) = (ParamStore::new(), ParamStore::new());
        let dora = DoraLinear::new(
            "p",
            w.clone(),
            Some(bias.clone()),
            &cfg,
            &mut s1,
            5,
            DoraOptions::default(),
        )?;
        let lora = LoraLinear::new("p", w.clone(), Some(bias.clone()), &cfg, &mut s2, 5)?;
        assert_eq!(
            s1.get(dora.a_id())?.to_vec_f32()?,
            s2.get(lora.a_id())?.to_vec_f32()?
        );
        assert_eq!(
            s1.get(dora.m_id())?.to_vec_f32()?,
            dora.weight_norm(&s1)?.to_vec_f32()?,
            "m = n at creation"
        );
        let (yd, ctx) = dora.forward(&s1, &x, None)?;
        let (yl, _) = lora.forward(&s2, &x, None)?;
        assert!(
            ctx.scale().to_vec_f32()?.iter().all(|&g| g == 1.0),
            "g = m / n = 1 at creation on {dev}"
        );
        assert_close(
            &yd.to_vec_f32()?,
            &yl.to_vec_f32()?,
            1e-6,
            1e-6,
            &format!("DoRA = LoRA at init {base:?}"),
        );
        // PEFT's default init: B = 0 → the base layer.
        let cfg0 = LoraConfig {
            r: 8,
            alpha: 16.0,
            ..LoraConfig::default()
        };
        let mut s3 = ParamStore::new();
        let d0 = DoraLinear::new(
            "p",
            w.clone(),
            Some(bias.clone()),
            &cfg0,
            &mut s3,
            5,
            DoraOptions::default(),
        )?;
        let (y0, _) = d0.forward(&s3, &x, Some(9))?;
        let plain = peft_kernels::qmatmul::linear_forward(&x, &w, Some(&bias), None, Default::default())?;
        assert_close(
            &y0.to_vec_f32()?,
            &plain.to_vec_f32()?,
            1e-6,
            1e-6,
            "B = 0 makes DoRA the base layer",
        );
        assert_eq!(s3.name(d0.m_id())?, "base_model.model.p.lora_magnitude_vector");
        assert_eq!(magnitude_key("p"), "base_model.model.p.lora_magnitude_vector");
        assert_eq!(s3.name(d0.a_id())?, "base_model.model.p.lora_A.weight");
        assert_eq!(d0.num_trainable_params(), 8 * (96 + 33) + 33);
    }
    Ok(())
}

/// The eval cache replaces the norm in `forward(.., None)`, is stale after a parameter change until
/// refreshed, and is ignored in training.
fn eval_cache(dev: Device) -> Result<()> {
    let c = Case {
        t: 4,
        inp: 64,
        out: 20,
        r: 4,
        base: Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        dtype: DType::F32,
        dropout: 0.1,
        bias: true,
        full: false,
    };
    let mut store = ParamStore::new();
    let mut layer = make_layer(&c, dev, 71, &mut store)?;
    let x = Tensor::randn(&[c.t, c.inp], 1.0, 1, DType::F32, dev)?;
    let (y_ref, _) = layer.forward(&store, &x, None)?;
    layer.cache_eval_scale(&store)?;
    assert!(layer.eval_scale().is_some());
    let (y_c, ctx) = layer.forward(&store, &x, None)?;
    assert_eq!(
        y_c.to_vec_f32()?,
        y_ref.to_vec_f32()?,
        "cached eval equals the uncached one"
    );
    // Gradients through the cached scale are the detached ones.
    let dy = Tensor::randn(&[c.t, c.out], 1.0, 2, DType::F32, dev)?;
    let g = layer.backward(&store, &ctx, &dy, true)?;
    let refr = reference(&layer, &store, &x, &dy, None, false)?;
    assert_close(
        &g.dm.to_vec_f32()?,
        &to32(&refr.dm),
        5e-5,
        5e-5 * max_abs(&refr.dm),
        "dm through the cache",
    );
    // Change B: the cache is stale (documented), training recomputes, refreshing fixes eval.
    let b = store.get(layer.b_id())?.scale(1.5)?;
    store.set(layer.b_id(), b)?;
    let (y_stale, _) = layer.forward(&store, &x, None)?;
    let (y_train, _) = layer.forward(&store, &x, Some(3))?; // dropout active, norm recomputed
    layer.cache_eval_scale(&store)?;
    let (y_fresh, _) = layer.forward(&store, &x, None)?;
    layer.clear_eval_cache();
    let (y_nocache, _) = layer.forward(&store, &x, None)?;
    assert_eq!(y_fresh.to_vec_f32()?, y_nocache.to_vec_f32()?);
    let stale_diff = y_stale
        .to_vec_f32()?
        .iter()
        .zip(y_fresh.to_vec_f32()?)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(stale_diff > 1e-3, "the stale cache should differ after B changed");
    let refr = reference(&layer, &store, &x, &dy, Some(3), false)?;
    assert_close(
        &y_train.to_vec_f32()?,
        &to32(&refr.y),
        5e-5,
        5e-5 * max_abs(&refr.y),
        "training ignores the cache",
    );
    assert!(layer.eval_scale().is_none());
    Ok(())
}

/// Merge: `x·W'ᵀ + b` equals the layer; unmerge recovers W. Dense and re-quantized 4-bit merges.
fn merge_unmerge(dev: Device) -> Result<()> {
    for base in [
        Base::Dense(DType::F32),
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
    ] {
        let c = Case {
            t: 5,
            inp: 96,
            out: 17,
            r: 4,
            base,
            dtype: DType::F32,
            dropout: 0.0,
            bias: true,
            full: false,
        };
        let mut store = ParamStore::new();
        let mut layer = make_layer(&c, dev, 81, &mut store)?;
        assert!(
            matches!(
                layer.unmerge(&store, layer.base()),
                Err(Error::InvalidArgument(_))
            ),
            "unmerge before merge"
        );
        let x = Tensor::randn(&[c.t, c.inp], 1.0, 1, DType::F32, dev)?;
        let (y, _) = layer.forward(&store, &x, None)?;
        let merged = layer.merge(&store, MergeFormat::Dense(DType::F32))?;
        let BaseWeight::Dense(wm) = &merged else {
            panic!("dense merge expected")
        };
        // f64 merge from the materialized V.
        let (v, n) = exact_norms(&layer, &store)?;
        let m = f64s(store.get(layer.m_id())?)?;
        let want: Vec<f64> = (0..c.out * c.inp)
            .map(|k| m[k / c.inp] / n[k / c.inp] * v[k])
            .collect();
        assert_close(
            &wm.to_vec_f32()?,
            &to32(&want),
            2e-5,
            2e-5 * max_abs(&want),
            "merged W'",
        );
        let ym = peft_kernels::qmatmul::linear_forward(&x, &merged, layer.bias(), None, Default::default())?;
        common::assert_close_scaled(&ym.to_vec_f32()?, &y.to_vec_f32()?, 2e-5, "merged layer output");
        let back = layer.unmerge(&store, &merged)?;
        let w = layer.base().dequantize(DType::F32)?.to_vec_f32()?;
        common::assert_close_scaled(&back.to_vec_f32()?, &w, 2e-5, "unmerge recovers W");
        assert!(layer.merge_norm().is_some());
        match layer.base().clone() {
            BaseWeight::Quantized(q) => {
                let rq = layer.merge(&store, MergeFormat::Requantize)?;
                let BaseWeight::Quantized(q2) = &rq else {
                    panic!("re-quantized merge expected")
                };
                assert_eq!(
                    (q2.state.quant_type, q2.state.blocksize, q2.state.is_double()),
                    (q.state.quant_type, q.state.blocksize, q.state.is_double())
                );
                // Re-quantization error only: NF4 steps are ≤ ~0.16·absmax.
                let back = layer.unmerge(&store, &rq)?.to_vec_f32()?;
                let err = back.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                let wmax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    err < 0.25 * wmax,
                    "re-quantized round trip error {err} vs max |W| {wmax}"
                );
            }
            BaseWeight::Dense(_) => {
                assert!(
                    layer.merge(&store, MergeFormat::Requantize).is_err(),
                    "dense bases cannot re-quantize"
                );
                let bf = layer.merge(&store, MergeFormat::Dense(DType::BF16))?;
                let BaseWeight::Dense(bt) = bf else { panic!() };
                assert_eq!(bt.dtype(), DType::BF16);
            }
            BaseWeight::KBit(k) => {
                let rq = layer.merge(&store, MergeFormat::Requantize)?;
                let BaseWeight::KBit(k2) = &rq else {
                    panic!("re-quantized merge expected")
                };
                assert_eq!((k2.bits, k2.blocksize), (k.bits, k.blocksize));
            }
        }
    }
    Ok(())
}

fn cuda_matches_cpu(dev: Device) -> Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    for &(dt, full, p) in &[
        (DType::F32, false, 0.1f32),
        (DType::F32, true, 0.0),
        (DType::BF16, false, 0.0),
        (DType::BF16, true, 0.1),
    ] {
        // 96 x 256: aligned (tensor-core paths for bf16); r = 16 and 20 (one and two GEMV passes).
        for &(out, inp, r) in &[(96usize, 256usize, 16usize), (40, 99, 20)] {
            let w = Tensor::randn(&[out, inp], 0.5, 1, DType::F32, Device::Cpu)?;
            let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default())?;
            let x = Tensor::randn(&[33, inp], 1.0, 2, DType::F32, Device::Cpu)?.to_dtype(dt)?;
            let dy = Tensor::randn(&[33, out], 1.0, 3, DType::F32, Device::Cpu)?.to_dtype(dt)?;
            let mut outs = Vec::new();
            for d in [Device::Cpu, dev] {
                let mut store = ParamStore::new();
                let cfg = LoraConfig {
                    r,
                    alpha: 32.0,
                    init: LoraInit::Random,
                    dropout: p,
                    ..LoraConfig::default()
                };
                let mut layer = DoraLinear::new(
                    "p",
                    BaseWeight::Quantized(q.to_device(d)?),
                    None,
                    &cfg,
                    &mut store,
                    7,
                    DoraOptions {
                        full_norm_gradient: full,
                    },
                )?;
                let (y, ctx) = layer.forward(&store, &x.to_device(d)?, Some(11))?;
                let g = layer.backward(&store, &ctx, &dy.to_device(d)?, true)?;
                let merged = layer
                    .merge(&store, MergeFormat::Dense(DType::F32))?
                    .dequantize(DType::F32)?;
                let wsq = layer.base_row_sq_norms().clone();
                let dx = g.dx.ok_or_else(|| Error::InvalidArgument("dx".into()))?;
                outs.push([y, dx, g.da, g.db, g.dm, ctx.norm().clone(), merged, wsq].map(|t| t.to_vec_f32()));
            }
            let tol = if dt == DType::F32 { 1e-4 } else { 3e-2 };
            for (k, what) in ["y", "dx", "dA", "dB", "dm", "n", "merged", "|W|²"]
                .iter()
                .enumerate()
            {
                let a = outs[1][k]
                    .as_ref()
                    .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                let b = outs[0][k]
                    .as_ref()
                    .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                common::assert_close_scaled(
                    a,
                    b,
                    tol,
                    &format!("cuda vs cpu {what} {dt} full={full} {out}x{inp} r={r}"),
                );
            }
        }
    }
    Ok(())
}

/// The magnitude alone can learn a per-row rescaling of the base layer: the loss falls.
fn tape_trains(dev: Device) -> Result<()> {
    let (din, dout, tokens) = (48usize, 16usize, 64usize);
    let w = Tensor::randn(&[dout, din], (2.0 / din as f32).sqrt(), 1, DType::F32, dev)?;
    let k = Tensor::rand(&[dout], 0.6, 1.4, 2, DType::F32, Device::Cpu)?.to_vec_f32()?;
    let q = BaseWeight::Quantized(QuantizedTensor::quantize(&w, &QuantizeOptions::default())?);
    // The target rescales the rows of the 4-bit weight the layer sees, so the loss can go to ~0.
    let wt = {
        let wv = q.dequantize(DType::F32)?.to_vec_f32()?;
        Tensor::from_vec(
            wv.iter()
                .enumerate()
                .map(|(i, v)| v * k[i / din])
                .collect::<Vec<_>>(),
            &[dout, din],
            dev,
        )?
    };
    let mut store = ParamStore::new();
    let layer = DoraLinear::new(
        "fc",
        q,
        None,
        &LoraConfig {
            r: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        },
        &mut store,
        3,
        DoraOptions::default(),
    )?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: 2e-2,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })?;
    let mut losses = Vec::new();
    for step in 0..120u64 {
        let x = Tensor::randn(&[tokens, din], 1.0, 100 + step, DType::F32, dev)?;
        let target = x.matmul_t(&wt, false, true)?;
        let mut tape = Tape::new();
        let xv = tape.leaf(x);
        let y = layer.forward_t(&mut tape, &store, xv, Some(step))?;
        let loss = tape.mse_loss(y, &target)?;
        let grads = tape.backward(loss)?;
        assert!(grads.get(layer.m_id()).is_some(), "m gets a gradient on the tape");
        opt.step(&mut store, &grads)?;
        losses.push(tape.value(loss)?.to_scalar()?);
    }
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    eprintln!("dora tape_trains: loss {first} -> {last}");
    assert!(last < 0.02 * first, "loss {first} -> {last}: did not fall enough");
    Ok(())
}

fn bad_input(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let base = make_base(Base::Dense(DType::F32), 8, 16, 1, dev)?;
    let opts = DoraOptions::default();
    assert!(
        DoraLinear::new(
            "x",
            base.clone(),
            None,
            &LoraConfig {
                r: 0,
                ..Default::default()
            },
            &mut store,
            0,
            opts
        )
        .is_err()
    );
    assert!(matches!(
        DoraLinear::new(
            "y",
            base.clone(),
            Some(Tensor::zeros(&[9], DType::F32, dev)?),
            &LoraConfig::default(),
            &mut store,
            0,
            opts
        ),
        Err(Error::Shape { .. })
    ));
    let layer = DoraLinear::new(
        "z",
        base.clone(),
        None,
        &LoraConfig::default(),
        &mut store,
        0,
        opts,
    )?;
    // A second layer under the same name is refused before anything is registered.
    let before = store.len();
    assert!(
        DoraLinear::new(
            "z",
            base.clone(),
            None,
            &LoraConfig::default(),
            &mut store,
            0,
            opts
        )
        .is_err()
    );
    assert_eq!(store.len(), before);
    let x = Tensor::zeros(&[3, 15], DType::F32, dev)?;
    assert!(matches!(
        layer.forward(&store, &x, None),
        Err(Error::Shape { .. })
    ));
    let x = Tensor::zeros(&[3, 16], DType::F32, dev)?;
    let (_, ctx) = layer.forward(&store, &x, None)?;
    assert!(matches!(
        layer.backward(&store, &ctx, &Tensor::zeros(&[3, 9], DType::F32, dev)?, true),
        Err(Error::Shape { .. })
    ));
    // Magnitude of the wrong shape in from_params.
    let bad_m = store.insert("bad_m", Tensor::zeros(&[7], DType::F32, dev)?)?;
    assert!(matches!(
        DoraLinear::from_params(
            "z",
            base.clone(),
            None,
            layer.a_id(),
            layer.b_id(),
            bad_m,
            1.0,
            0.0,
            &store,
            opts
        ),
        Err(Error::Shape { .. })
    ));
    let ok = DoraLinear::from_params(
        "z",
        base.clone(),
        None,
        layer.a_id(),
        layer.b_id(),
        layer.m_id(),
        1.0,
        0.0,
        &store,
        opts,
    )?;
    assert_eq!(ok.out_features(), 8);
    // A merged weight of the wrong shape.
    let mut l2 = ok.clone();
    l2.merge(&store, MergeFormat::Dense(DType::F32))?;
    let wrong = make_base(Base::Dense(DType::F32), 8, 15, 1, dev)?;
    assert!(matches!(l2.unmerge(&store, &wrong), Err(Error::Shape { .. })));
    if dev.is_cuda() {
        // Input on another device.
        let xc = Tensor::zeros(&[3, 16], DType::F32, Device::Cpu)?;
        assert!(layer.forward(&store, &xc, None).is_err());
    }
    Ok(())
}

device_test!(
    forward_backward_vs_f64,
    odd_shapes,
    gradcheck_full,
    gradcheck_detached,
    gradcheck_tape_stack,
    norm_vs_exact,
    init_is_noop,
    eval_cache,
    merge_unmerge,
    cuda_matches_cpu,
    tape_trains,
    bad_input
);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]
    #[test]
    fn random_odd_shapes(t in 1usize..20, inp in 1usize..140, out in 1usize..40, r in 1usize..9, dq: bool, p in 0usize..3, full: bool) {
        let c = Case {
            t, inp, out, r,
            base: Base::Nf4 { double: dq, blocksize: 64 },
            dtype: DType::F32,
            dropout: [0.0, 0.2, 0.5][p],
            bias: r % 2 == 0,
            full,
        };
        check_case(&c, Device::Cpu, (t * 1000 + inp * 10 + out) as u64).unwrap();
    }
}

// ------------------------------------------------------------------------------------------------
// PEFT parity against the fixtures of tests/fixtures/peft/{dora, dora_nf4} (generated by
// tests/fixtures/gen_peft.py with peft 0.21.2).

mod peft_parity {
    use super::*;
    use peft_kernels::io::SafetensorsFile;
    use std::path::{Path, PathBuf};

    fn dir(case: &str) -> Option<PathBuf> {
        // PEFT_KERNELS_PEFT_FIXTURES points at another checkout's tests/fixtures/peft (before the merge).
        let root = std::env::var_os("PEFT_KERNELS_PEFT_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft"));
        let d = root.join(case);
        if [
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
            "base.safetensors",
            "io.safetensors",
        ]
        .iter()
        .all(|f| d.join(f).exists())
        {
            Some(d)
        } else {
            // The fixtures are committed (tests/fixtures/gen_peft.py); a missing file is a failure.
            panic!(
                "PEFT fixtures {} are missing (regenerate with tests/fixtures/gen_peft.py)",
                d.display()
            )
        }
    }

    fn config(d: &Path) -> Result<f32> {
        let text = std::fs::read_to_string(d.join("adapter/adapter_config.json"))
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let (r, alpha) = (
            v["r"].as_f64().unwrap_or(8.0),
            v["lora_alpha"].as_f64().unwrap_or(8.0),
        );
        assert_eq!(v["use_dora"].as_bool(), Some(true));
        assert_eq!(v["use_rslora"].as_bool(), Some(false));
        Ok((alpha / r) as f32)
    }

    /// Every adapted module: the layer output on PEFT's captured input (eval, no dropout) within 1e-5
    /// relative; `m / n` within PEFT's perturbation range [1, 1.25] (so our n matches PEFT's norm); the
    /// dense merge against PEFT's merged weight (`merged.safetensors`, or `merged_dense.safetensors`
    /// before PEFT re-quantizes a 4-bit merge); the eval cache gives the same output.
    fn check(case: &str, nf4: bool) -> Result<()> {
        let Some(d) = dir(case) else { return Ok(()) };
        let s = config(&d)?;
        let base_f = SafetensorsFile::open(d.join("base.safetensors"))?;
        let ad = SafetensorsFile::open(d.join("adapter/adapter_model.safetensors"))?;
        let io = SafetensorsFile::open(d.join("io.safetensors"))?;
        let merged_f = SafetensorsFile::open(d.join(if nf4 {
            "merged_dense.safetensors"
        } else {
            "merged.safetensors"
        }))?;
        let dev = Device::Cpu;
        let modules: Vec<String> = ad
            .names()
            .iter()
            .filter_map(|k| k.strip_suffix(".lora_magnitude_vector"))
            .map(|k| k.trim_start_matches("base_model.model.").to_string())
            .collect();
        assert!(!modules.is_empty());
        for module in &modules {
            let wname = format!("{module}.weight");
            let base = if nf4 {
                BaseWeight::Quantized(peft_kernels::quant::io::load_quantized(&base_f, &wname, dev)?)
            } else {
                BaseWeight::Dense(base_f.load(&wname, dev)?)
            };
            let bias = base_f
                .contains(&format!("{module}.bias"))
                .then(|| base_f.load(&format!("{module}.bias"), dev))
                .transpose()?;
            let mut store = ParamStore::new();
            let key = |suffix: &str| format!("base_model.model.{module}.{suffix}");
            let a = store.insert(key("lora_A.weight"), ad.load(&key("lora_A.weight"), dev)?)?;
            let b = store.insert(key("lora_B.weight"), ad.load(&key("lora_B.weight"), dev)?)?;
            let m = store.insert(
                key("lora_magnitude_vector"),
                ad.load(&key("lora_magnitude_vector"), dev)?,
            )?;
            let mut layer = DoraLinear::from_params(
                module,
                base,
                bias,
                a,
                b,
                m,
                s,
                0.0,
                &store,
                DoraOptions::default(),
            )?;
            let x = io.load(&format!("{module}.input"), dev)?;
            let want = io.load(&format!("{module}.output"), dev)?.to_vec_f32()?;
            let (y, _) = layer.forward(&store, &x, None)?;
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(
                &y.to_vec_f32()?,
                &want,
                1e-5,
                1e-5 * scale,
                &format!("{case} {module} output vs PEFT"),
            );
            let ratio: Vec<f32> = store
                .get(m)?
                .to_vec_f32()?
                .iter()
                .zip(layer.weight_norm(&store)?.to_vec_f32()?)
                .map(|(m, n)| m / n)
                .collect();
            assert!(
                ratio.iter().all(|&q| (1.0 - 1e-5..=1.25 + 1e-5).contains(&q)),
                "{case} {module}: m / n = {ratio:?} outside PEFT's perturbation"
            );
            layer.cache_eval_scale(&store)?;
            let (yc, _) = layer.forward(&store, &x, None)?;
            assert_close(
                &yc.to_vec_f32()?,
                &want,
                1e-5,
                1e-5 * scale,
                &format!("{case} {module} cached output vs PEFT"),
            );
            let BaseWeight::Dense(wm) = layer.merge(&store, MergeFormat::Dense(DType::F32))? else {
                panic!()
            };
            let pm = merged_f.load(&wname, dev)?.to_vec_f32()?;
            let ms = pm.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(
                &wm.to_vec_f32()?,
                &pm,
                1e-5,
                1e-5 * ms,
                &format!("{case} {module} merge vs PEFT"),
            );
        }
        println!("{case}: {} modules match PEFT", modules.len());
        Ok(())
    }

    #[test]
    fn dense_base() -> Result<()> {
        check("dora", false)
    }

    #[test]
    fn nf4_base() -> Result<()> {
        check("dora_nf4", true)
    }
}
