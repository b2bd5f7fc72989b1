//! The LoRA / QLoRA linear layer: forward and backward against f64 math on random odd shapes, finite
//! differences through a 2-layer stack on the tape, CUDA against the CPU, training, and bad input.

mod common;

use common::{Base, assert_close, check_param_gradients, f64s, make_base, mm, tr};
use peft_kernels::adapters::AdapterLinear;
use peft_kernels::adapters::lora::{LoraConfig, LoraInit, LoraLinear, lora_scaling};
use peft_kernels::autograd::gradcheck::GradCheckConfig;
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::qmatmul::BaseWeight;
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;

struct Case {
    t: usize,
    inp: usize,
    out: usize,
    r: usize,
    base: Base,
    dtype: DType,
    dropout: f32,
    bias: bool,
    rslora: bool,
}

/// f64 reference of forward and backward from the layer's own (dequantized) weights.
struct Reference {
    y: Vec<f64>,
    dx: Vec<f64>,
    da: Vec<f64>,
    db: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn reference(
    layer: &LoraLinear,
    store: &ParamStore,
    x: &Tensor,
    dy: &Tensor,
    step_seed: Option<u64>,
) -> Result<Reference> {
    let (t, inp, out, r) = (
        x.numel() / layer.in_features(),
        layer.in_features(),
        layer.out_features(),
        layer.rank(),
    );
    let s = layer.scaling() as f64;
    let w = f64s(&layer.base().dequantize(DType::F32)?)?; // [out, in]
    let a = f64s(store.get(layer.a_id())?)?;
    let b = f64s(store.get(layer.b_id())?)?;
    let xv = f64s(x)?;
    let xd = match layer.mask_seed(step_seed) {
        Some(seed) => f64s(&x.to_device(Device::Cpu)?.dropout(layer.dropout(), seed)?)?,
        None => xv.clone(),
    };
    let dyv = f64s(dy)?;
    let mut y = mm(&xv, &tr(&w, out, inp), t, inp, out);
    let xa = mm(&xd, &tr(&a, r, inp), t, inp, r);
    let lr = mm(&xa, &tr(&b, out, r), t, r, out);
    let bias = match layer.bias() {
        Some(b) => f64s(b)?,
        None => vec![0.0; out],
    };
    for i in 0..t {
        for j in 0..out {
            y[i * out + j] += bias[j] + s * lr[i * out + j];
        }
    }
    // dB = s·dyᵀ·(xd·Aᵀ), dA = s·(dy·B)ᵀ·xd, dx = dy·W + mask(s·dy·B·A).
    let db: Vec<f64> = mm(&tr(&dyv, t, out), &xa, out, t, r)
        .into_iter()
        .map(|v| v * s)
        .collect();
    let dyb = mm(&dyv, &b, t, out, r);
    let da: Vec<f64> = mm(&tr(&dyb, t, r), &xd, r, t, inp)
        .into_iter()
        .map(|v| v * s)
        .collect();
    let mut dx = mm(&dyv, &w, t, out, inp);
    let adapter = mm(&dyb, &a, t, r, inp);
    let adapter: Vec<f64> = match layer.mask_seed(step_seed) {
        Some(seed) => {
            let tv = Tensor::from_vec(
                adapter.iter().map(|&v| v as f32).collect(),
                &[t, inp],
                Device::Cpu,
            )?;
            f64s(&tv.dropout(layer.dropout(), seed)?)?
        }
        None => adapter,
    };
    for (d, a) in dx.iter_mut().zip(&adapter) {
        *d += s * a;
    }
    Ok(Reference { y, dx, da, db })
}

fn check_case(c: &Case, dev: Device, seed: u64) -> Result<()> {
    let base = make_base(c.base, c.out, c.inp, seed, dev)?;
    let bias = if c.bias {
        Some(Tensor::randn(&[c.out], 0.3, seed + 1, c.dtype, dev)?)
    } else {
        None
    };
    let mut store = ParamStore::new();
    let cfg = LoraConfig {
        r: c.r,
        alpha: 3.0,
        use_rslora: c.rslora,
        dropout: c.dropout,
        init: LoraInit::Random,
        dtype: DType::F32,
    };
    let layer = LoraLinear::new("blk.proj", base, bias, &cfg, &mut store, seed + 2)?;
    assert_eq!(layer.scaling(), lora_scaling(c.r, 3.0, c.rslora));
    let x = Tensor::randn(&[c.t, c.inp], 1.0, seed + 3, DType::F32, dev)?.to_dtype(c.dtype)?;
    let dy = Tensor::randn(&[c.t, c.out], 1.0, seed + 4, DType::F32, dev)?.to_dtype(c.dtype)?;
    let step = Some(seed + 5);
    let (y, ctx) = layer.forward(&store, &x, step)?;
    let g = layer.backward(&store, &ctx, &dy, true)?;
    assert_eq!(y.dtype(), c.dtype);
    assert_eq!(y.shape(), &[c.t, c.out]);
    let refr = reference(&layer, &store, &x, &dy, step)?;
    let to32 = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<_>>();
    // Tolerance relative to the magnitude of the sums: ~sqrt(K) * unit roundoff of the compute dtype.
    let (rt, k) = match c.dtype {
        DType::F32 => (2e-5, 1.0),
        DType::F16 => (4e-3, 1.0),
        _ => (2e-2, 1.0),
    };
    let scale = |v: &[f64]| v.iter().fold(1e-6f64, |m, x| m.max(x.abs())) as f32;
    let what = format!(
        "{:?} {:?} t={} in={} out={} r={} p={}",
        c.base, c.dtype, c.t, c.inp, c.out, c.r, c.dropout
    );
    assert_close(
        &y.to_vec_f32()?,
        &to32(&refr.y),
        rt,
        rt * k * scale(&refr.y),
        &format!("y {what}"),
    );
    assert_close(
        &g.db.to_vec_f32()?,
        &to32(&refr.db),
        rt,
        rt * scale(&refr.db),
        &format!("dB {what}"),
    );
    assert_close(
        &g.da.to_vec_f32()?,
        &to32(&refr.da),
        rt,
        rt * scale(&refr.da),
        &format!("dA {what}"),
    );
    let dx = g.dx.ok_or_else(|| Error::InvalidArgument("dx missing".into()))?;
    assert_eq!(dx.shape(), x.shape());
    assert_close(
        &dx.to_vec_f32()?,
        &to32(&refr.dx),
        rt,
        rt * scale(&refr.dx),
        &format!("dx {what}"),
    );
    assert_eq!(g.da.dtype(), DType::F32);
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
            for &(dropout, bias) in &[(0.0f32, true), (0.25, false)] {
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
                    rslora: seed % 20 == 1,
                };
                check_case(&c, dev, seed)?;
            }
        }
    }
    // Half compute dtypes over a matching dense base and over NF4.
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
                dropout: 0.0,
                bias: true,
                rslora: false,
            };
            check_case(&c, dev, seed)?;
        }
    }
    Ok(())
}

fn odd_shapes(dev: Device) -> Result<()> {
    // in not a multiple of the blocksize (blocks cross rows), odd in (rows start on a low nibble).
    for (i, &(t, inp, out)) in [(3usize, 65usize, 7usize), (20, 37, 19), (70, 99, 3)]
        .iter()
        .enumerate()
    {
        let c = Case {
            t,
            inp,
            out,
            r: 5,
            base: Base::Nf4 {
                double: i % 2 == 0,
                blocksize: 64,
            },
            dtype: DType::F32,
            dropout: 0.1,
            bias: true,
            rslora: true,
        };
        check_case(&c, dev, 100 + i as u64)?;
    }
    Ok(())
}

/// Finite differences through LoRA → GELU → LoRA → MSE on the tape: dA, dB of both layers.
fn gradcheck_two_layer_stack(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let cfg = LoraConfig {
        r: 3,
        alpha: 6.0,
        init: LoraInit::Random,
        ..LoraConfig::default()
    };
    let l1 = LoraLinear::new(
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
    )?;
    let bias = Tensor::randn(&[5], 0.1, 9, DType::F32, dev)?;
    let l2 = LoraLinear::new(
        "l2",
        make_base(Base::Dense(DType::F32), 5, 24, 3, dev)?,
        Some(bias),
        &cfg,
        &mut store,
        4,
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
        &[l1.a_id(), l1.b_id(), l2.a_id(), l2.b_id()],
        &grads,
        |s| Ok(loss_of(s)?.0),
        &gcfg,
    )
}

fn cuda_matches_cpu(dev: Device) -> Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    for &dt in &[DType::F32, DType::BF16] {
        let w = Tensor::randn(&[96, 256], 0.5, 1, DType::F32, Device::Cpu)?;
        let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default())?;
        let x = Tensor::randn(&[33, 256], 1.0, 2, DType::F32, Device::Cpu)?.to_dtype(dt)?;
        let dy = Tensor::randn(&[33, 96], 1.0, 3, DType::F32, Device::Cpu)?.to_dtype(dt)?;
        let mut outs = Vec::new();
        for d in [Device::Cpu, dev] {
            let mut store = ParamStore::new();
            let cfg = LoraConfig {
                r: 16,
                alpha: 32.0,
                init: LoraInit::Random,
                dropout: 0.1,
                ..LoraConfig::default()
            };
            let layer = LoraLinear::new(
                "p",
                BaseWeight::Quantized(q.to_device(d)?),
                None,
                &cfg,
                &mut store,
                7,
            )?;
            let (y, ctx) = layer.forward(&store, &x.to_device(d)?, Some(11))?;
            let g = layer.backward(&store, &ctx, &dy.to_device(d)?, true)?;
            outs.push([y, g.dx.unwrap_or(g.da.clone()), g.da, g.db].map(|t| t.to_vec_f32()));
        }
        let tol = if dt == DType::F32 { 1e-4 } else { 2e-2 };
        for (k, what) in ["y", "dx", "dA", "dB"].iter().enumerate() {
            let (a, b) = (
                outs[1][k]
                    .as_ref()
                    .map_err(|e| Error::InvalidArgument(e.to_string()))?,
                outs[0][k]
                    .as_ref()
                    .map_err(|e| Error::InvalidArgument(e.to_string()))?,
            );
            common::assert_close_scaled(a, b, tol, &format!("cuda vs cpu {what} {dt}"));
        }
    }
    Ok(())
}

/// A 2-layer QLoRA student recovers a planted low-rank update: the loss falls below a threshold.
fn tape_trains(dev: Device) -> Result<()> {
    let (din, dh, dout, tokens) = (48usize, 64usize, 16usize, 64usize);
    let w1 = Tensor::randn(&[dh, din], (2.0 / din as f32).sqrt(), 1, DType::F32, dev)?;
    let w2 = Tensor::randn(&[dout, dh], (2.0 / dh as f32).sqrt(), 2, DType::F32, dev)?;
    let planted = Tensor::randn(&[dout, 2], 0.5, 3, DType::F32, dev)?.matmul(&Tensor::randn(
        &[2, dh],
        0.3,
        4,
        DType::F32,
        dev,
    )?)?;
    let w2t = w2.add(&planted)?;
    let mut store = ParamStore::new();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    let q = |w: &Tensor| -> Result<BaseWeight> {
        Ok(BaseWeight::Quantized(QuantizedTensor::quantize(
            w,
            &QuantizeOptions::default(),
        )?))
    };
    let l1 = LoraLinear::new("fc1", q(&w1)?, None, &cfg, &mut store, 10)?;
    let l2 = LoraLinear::new("fc2", q(&w2)?, None, &cfg, &mut store, 11)?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })?;
    let mut losses = Vec::new();
    for step in 0..150u64 {
        let x = Tensor::randn(&[tokens, din], 1.0, 1000 + step, DType::F32, dev)?;
        let h = x.matmul_t(&w1, false, true)?;
        let mut t0 = Tape::new();
        let hv = t0.leaf(h);
        let hv = t0.relu(hv)?;
        let y = t0.value(hv)?.matmul_t(&w2t, false, true)?;
        let mut tape = Tape::new();
        let xv = tape.leaf(x);
        let h = l1.forward_t(&mut tape, &store, xv, Some(step))?;
        let h = tape.relu(h)?;
        let out = l2.forward_t(&mut tape, &store, h, Some(step))?;
        let loss = tape.mse_loss(out, &y)?;
        let grads = tape.backward(loss)?;
        opt.step(&mut store, &grads)?;
        losses.push(tape.value(loss)?.to_scalar()?);
    }
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    eprintln!("tape_trains: loss {first} -> {last}");
    assert!(last < 0.04 * first, "loss {first} -> {last}: did not fall enough");
    // The floor (~0.027 after 300 steps) is the NF4 rounding of W1 and W2, which rank 4 cannot undo.
    assert!(last < 0.04, "final loss {last} above threshold");
    Ok(())
}

fn bad_input(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let base = make_base(Base::Dense(DType::F32), 8, 16, 1, dev)?;
    assert!(matches!(
        LoraLinear::new(
            "x",
            base.clone(),
            None,
            &LoraConfig {
                r: 0,
                ..Default::default()
            },
            &mut store,
            0
        ),
        Err(Error::InvalidArgument(_))
    ));
    assert!(
        LoraLinear::new(
            "x",
            base.clone(),
            None,
            &LoraConfig {
                dropout: 1.0,
                ..Default::default()
            },
            &mut store,
            0
        )
        .is_err()
    );
    let bad_bias = Tensor::zeros(&[9], DType::F32, dev)?;
    assert!(matches!(
        LoraLinear::new(
            "y",
            base.clone(),
            Some(bad_bias),
            &LoraConfig::default(),
            &mut store,
            0
        ),
        Err(Error::Shape { .. })
    ));
    let layer = LoraLinear::new("z", base, None, &LoraConfig::default(), &mut store, 0)?;
    let x = Tensor::zeros(&[3, 15], DType::F32, dev)?;
    assert!(matches!(
        layer.forward(&store, &x, None),
        Err(Error::Shape { .. })
    ));
    let x = Tensor::zeros(&[3, 16], DType::F32, dev)?;
    let (_, ctx) = layer.forward(&store, &x, None)?;
    let dy = Tensor::zeros(&[3, 9], DType::F32, dev)?;
    assert!(matches!(
        layer.backward(&store, &ctx, &dy, true),
        Err(Error::Shape { .. })
    ));
    // Duplicate registration of the same module is refused by the store.
    assert!(
        LoraLinear::new(
            "z",
            make_base(Base::Dense(DType::F32), 8, 16, 1, dev)?,
            None,
            &LoraConfig::default(),
            &mut store,
            0
        )
        .is_err()
    );
    Ok(())
}

device_test!(
    forward_backward_vs_f64,
    odd_shapes,
    gradcheck_two_layer_stack,
    cuda_matches_cpu,
    tape_trains,
    bad_input
);

#[test]
fn default_init_is_a_no_op_and_peft_bounds() -> Result<()> {
    let mut store = ParamStore::new();
    let base = make_base(
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        32,
        128,
        1,
        Device::Cpu,
    )?;
    let layer = LoraLinear::new(
        "m",
        base.clone(),
        None,
        &LoraConfig {
            r: 8,
            ..Default::default()
        },
        &mut store,
        3,
    )?;
    let x = Tensor::randn(&[4, 128], 1.0, 2, DType::F32, Device::Cpu)?;
    let (y, _) = layer.forward(&store, &x, None)?;
    let plain = peft_kernels::qmatmul::linear_forward(&x, &base, None, None, Default::default())?;
    assert_close(
        &y.to_vec_f32()?,
        &plain.to_vec_f32()?,
        1e-6,
        1e-6,
        "B = 0 makes LoRA a no-op",
    );
    let a = store.get(layer.a_id())?.to_vec_f32()?;
    let bound = 1.0 / (128f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > 0.5 * bound));
    assert!(store.get(layer.b_id())?.to_vec_f32()?.iter().all(|&v| v == 0.0));
    assert_eq!(store.name(layer.a_id())?, "base_model.model.m.lora_A.weight");
    assert_eq!(store.name(layer.b_id())?, "base_model.model.m.lora_B.weight");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn random_odd_shapes(t in 1usize..24, inp in 1usize..140, out in 1usize..40, r in 1usize..9, dq: bool, p in 0usize..3) {
        let c = Case {
            t, inp, out, r,
            base: Base::Nf4 { double: dq, blocksize: 64 },
            dtype: DType::F32,
            dropout: [0.0, 0.2, 0.5][p],
            bias: r % 2 == 0,
            rslora: dq,
        };
        check_case(&c, Device::Cpu, (t * 1000 + inp * 10 + out) as u64).unwrap();
    }
}
