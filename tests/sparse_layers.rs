//! WaveFT and VB-LoRA as whole layers over frozen (4-bit) bases, the PEFT loader/saver, and merging:
//! forward and backward against f64 math, finite differences through the tape (the shared VB-LoRA bank
//! across two layers included), training with AdamW, PEFT's own per-layer outputs and gradients on NF4 and
//! GPT-2 Conv1D bases (tests/fixtures/gen_sparse_layers.py), `peftk merge` against PEFT's merged weights,
//! save/load round trips, CUDA against the CPU, and bad input.
//!
//! With `PEFT_KERNELS_WRITE_SPARSE_ROUNDTRIP=DIR`, `trained_adapters_export` writes trained WaveFT and VB-LoRA
//! adapters for `tests/fixtures/check_sparse_roundtrip.py DIR` (PEFT loading them) and
//! `tests/fixtures/check_peft_roundtrip.py DIR`.

mod common;

use common::{Base, assert_close, check_param_gradients, f64s, make_base, mm, to32, tr};
use peft_kernels::adapters::AdapterLinear;
use peft_kernels::adapters::vblora::{VbLoraBank, VbLoraConfig, VbLoraLinear, VbLoraOptions};
use peft_kernels::adapters::waveft::{WaveFtConfig, WaveFtLinear};
use peft_kernels::autograd::gradcheck::GradCheckConfig;
use peft_kernels::autograd::{Backward, Gradients, ParamId, ParamStore, Tape, Var};
use peft_kernels::io::peft::{
    AdapterConfig, MethodConfig, ModuleNames, PeftAdapter, TargetModules, VBLORA_BANK_KEY,
};
use peft_kernels::io::{SafetensorsFile, TensorBytes, write_safetensors};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::peft_model::load::{
    LoadOptions, adapter_from_store, init_adapter, linear_modules, load_adapter,
};
use peft_kernels::peft_model::merge::{MergeOptions, MergeRegistry, merge_into_file};
use peft_kernels::qmatmul::BaseWeight;
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Error, Result, Tensor};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn err(what: &str) -> impl FnOnce() -> Error + '_ {
    move || Error::InvalidArgument(format!("missing {what}"))
}

// ---------------------------------------------------------------- f64 helpers

fn scale_of(v: &[f64]) -> f32 {
    v.iter().fold(1e-6f64, |m, x| m.max(x.abs())) as f32
}

/// `|a - e| <= rel·|e| + rel·max|e|`: relative error with an absolute floor at the magnitude of the data.
#[track_caller]
fn close_rel(actual: &[f32], expect: &[f64], rel: f32, what: &str) {
    let s = scale_of(expect);
    assert_close(actual, &to32(expect), rel, rel * s, what);
}

/// `|a - e| <= 1e-5·|e| + 1e-6·max|e|` (the PEFT-parity tolerance); returns the worst error / max|e|.
#[track_caller]
fn close_peft(actual: &[f32], expect: &[f32], what: &str) -> f32 {
    assert_eq!(actual.len(), expect.len(), "{what}: length");
    let scale = expect
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    let mut worst = 0f32;
    for (i, (&a, &e)) in actual.iter().zip(expect).enumerate() {
        let err = (a - e).abs();
        assert!(
            err <= 1e-5 * e.abs() + 1e-6 * scale && a.is_finite(),
            "{what}[{i}]: got {a}, expected {e} (err {err}, scale {scale})"
        );
        worst = worst.max(err / scale);
    }
    worst
}

// ---------------------------------------------------------------- WaveFT layer vs f64

struct WfCase {
    t: usize,
    inp: usize,
    out: usize,
    n: usize,
    family: &'static str,
    idwt: bool,
    base: Base,
    dtype: DType,
    bias: bool,
}

fn waveft_case(c: &WfCase, dev: Device, seed: u64) -> Result<()> {
    let base = make_base(c.base, c.out, c.inp, seed, dev)?;
    let bias = if c.bias {
        Some(Tensor::randn(&[c.out], 0.3, seed + 1, c.dtype, dev)?)
    } else {
        None
    };
    let cfg = WaveFtConfig {
        n_frequency: c.n,
        scaling: 7.0,
        wavelet_family: c.family.into(),
        use_idwt: c.idwt,
        random_loc_seed: seed + 2,
    };
    let mut store = ParamStore::new();
    let layer = WaveFtLinear::new("blk.proj", base, bias, &cfg, false, &mut store, seed + 3)?;
    // A visible adapter: N(0, 0.3²) instead of PEFT's 0.01.
    let s = Tensor::randn(&[c.n], 0.3, seed + 4, DType::F32, dev)?;
    store.set(layer.spectrum_id(), s)?;
    assert_eq!(
        store.name(layer.spectrum_id())?,
        "base_model.model.blk.proj.waveft_spectrum"
    );

    let x = Tensor::randn(&[c.t, c.inp], 1.0, seed + 5, DType::F32, dev)?.to_dtype(c.dtype)?;
    let dy = Tensor::randn(&[c.t, c.out], 1.0, seed + 6, DType::F32, dev)?.to_dtype(c.dtype)?;
    let (y, ctx) = layer.forward(&store, &x, Some(1))?;
    let g = layer.backward(&store, &ctx, &dy, true)?;
    assert_eq!((y.dtype(), y.shape()), (c.dtype, &[c.t, c.out][..]));

    // Reference: dense W (dequantized) + dense ΔW (f64 synthesis, checked against PEFT in tests/waveft.rs).
    let (t, inp, out) = (c.t, c.inp, c.out);
    let w = f64s(&layer.base().dequantize(DType::F32)?)?;
    let d = f64s(&layer.delta_weight(&store)?)?;
    let wd: Vec<f64> = w.iter().zip(&d).map(|(a, b)| a + b).collect();
    let (xv, dyv) = (f64s(&x)?, f64s(&dy)?);
    let mut y_ref = mm(&xv, &tr(&wd, out, inp), t, inp, out);
    if let Some(b) = layer.bias() {
        let b = f64s(b)?;
        for (i, v) in y_ref.iter_mut().enumerate() {
            *v += b[i % out];
        }
    }
    let dx_ref = mm(&dyv, &wd, t, out, inp);
    // dspectrum_j = <dyᵀ·x, ∂ΔW/∂s_j>, with ∂ΔW/∂s_j the dense ΔW of the unit spectrum e_j: an
    // independent check of the sparse analysis (adjoint) path against the dense synthesis.
    let gm = mm(&tr(&dyv, t, out), &xv, out, t, inp);
    let mut ds_ref = vec![0f64; c.n];
    for (j, dj) in ds_ref.iter_mut().enumerate() {
        let mut e = vec![0f32; c.n];
        e[j] = 1.0;
        let basis = f64s(&layer.layer().delta_weight(&Tensor::from_vec(e, &[c.n], dev)?)?)?;
        *dj = basis.iter().zip(&gm).map(|(a, b)| a * b).sum();
    }
    let rt = match c.dtype {
        DType::F32 => 2e-5,
        DType::F16 => 4e-3,
        _ => 2e-2,
    };
    let what = format!(
        "{:?} {} {} {c:?}",
        c.base,
        c.dtype,
        c.family,
        c = (t, inp, out, c.n, c.idwt)
    );
    close_rel(&y.to_vec_f32()?, &y_ref, rt, &format!("y {what}"));
    let dx = g.dx.ok_or_else(err("dx"))?;
    assert_eq!(dx.shape(), x.shape());
    close_rel(&dx.to_vec_f32()?, &dx_ref, rt, &format!("dx {what}"));
    // dspectrum sums over tokens with x and dy in the compute dtype: relative to its magnitude.
    close_rel(
        &g.dspectrum.to_vec_f32()?,
        &ds_ref,
        rt.max(5e-5),
        &format!("dspectrum {what}"),
    );
    assert_eq!(g.dspectrum.dtype(), DType::F32);
    // Without dx: the same dspectrum, bit for bit.
    let g2 = layer.backward(&store, &ctx, &dy, false)?;
    assert!(g2.dx.is_none());
    assert_eq!(g2.dspectrum.to_vec_f32()?, g.dspectrum.to_vec_f32()?);
    // merged_weight = W + ΔW.
    close_rel(
        &layer.merged_weight(&store, DType::F32)?.to_vec_f32()?,
        &wd,
        1e-6,
        &format!("merged {what}"),
    );
    Ok(())
}

fn waveft_layer_vs_f64(dev: Device) -> Result<()> {
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
    for (bi, &base) in bases.iter().enumerate() {
        for &(t, inp, out, n) in &[
            (1usize, 64usize, 33usize, 40usize),
            (5, 96, 17, 100),
            (37, 65, 24, 64),
        ] {
            for &(family, idwt) in &[("db1", true), ("sym2", true), ("db1", false)] {
                seed += 10;
                let c = WfCase {
                    t,
                    inp,
                    out,
                    n,
                    family,
                    idwt,
                    base,
                    dtype: DType::F32,
                    bias: (seed / 10 + bi as u64) & 1 == 0,
                };
                waveft_case(&c, dev, seed)?;
            }
        }
    }
    for &dt in &[DType::BF16, DType::F16] {
        for base in [
            Base::Dense(dt),
            Base::Nf4 {
                double: true,
                blocksize: 64,
            },
        ] {
            seed += 10;
            let c = WfCase {
                t: 9,
                inp: 128,
                out: 40,
                n: 80,
                family: "db1",
                idwt: true,
                base,
                dtype: dt,
                bias: true,
            };
            waveft_case(&c, dev, seed)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- VB-LoRA layer vs f64

struct VbCase {
    t: usize,
    inp: usize,
    out: usize,
    base: Base,
    dtype: DType,
    dropout: f32,
    bias: bool,
}

fn vblora_case(c: &VbCase, dev: Device, seed: u64) -> Result<()> {
    let vc = VbLoraConfig {
        r: 3,
        num_vectors: 8,
        vector_length: 4,
        topk: 2,
    };
    let mut store = ParamStore::new();
    let bank = VbLoraBank::new(&vc, 0.5, &mut store, seed, dev)?;
    let base = make_base(c.base, c.out, c.inp, seed + 1, dev)?;
    let bias = if c.bias {
        Some(Tensor::randn(&[c.out], 0.3, seed + 2, c.dtype, dev)?)
    } else {
        None
    };
    let opts = VbLoraOptions {
        dropout: c.dropout,
        init_logits_std: 1.0,
    };
    let layer = VbLoraLinear::new("m.fc", base, bias, &bank, &opts, &mut store, seed + 3)?;
    let x = Tensor::randn(&[c.t, c.inp], 1.0, seed + 4, DType::F32, dev)?.to_dtype(c.dtype)?;
    let dy = Tensor::randn(&[c.t, c.out], 1.0, seed + 5, DType::F32, dev)?.to_dtype(c.dtype)?;
    let step = Some(seed + 6);
    let (y, ctx) = layer.forward(&store, &x, step)?;
    let g = layer.backward(&store, &ctx, &dy, true)?;

    // Reference from the composed A and B (the composition is checked against PEFT in tests/vblora.rs).
    let (t, inp, out, r) = (c.t, c.inp, c.out, vc.r);
    let (a, b) = layer.compose_ab(&store)?;
    assert_eq!(a.to_vec_f32()?, ctx.a().to_vec_f32()?);
    assert_eq!(b.to_vec_f32()?, ctx.b().to_vec_f32()?);
    let (av, bv) = (f64s(&a)?, f64s(&b)?);
    let w = f64s(&layer.base().dequantize(DType::F32)?)?;
    let (xv, dyv) = (f64s(&x)?, f64s(&dy)?);
    let mask = |v: &[f64], cols: usize| -> Result<Vec<f64>> {
        match layer.mask_seed(step) {
            Some(s) => f64s(&Tensor::from_vec(to32(v), &[t, cols], Device::Cpu)?.dropout(c.dropout, s)?),
            None => Ok(v.to_vec()),
        }
    };
    let xd = match layer.mask_seed(step) {
        Some(s) => f64s(&x.to_device(Device::Cpu)?.dropout(c.dropout, s)?)?,
        None => xv.clone(),
    };
    let xa = mm(&xd, &tr(&av, r, inp), t, inp, r);
    let mut y_ref = mm(&xv, &tr(&w, out, inp), t, inp, out);
    let lr = mm(&xa, &tr(&bv, out, r), t, r, out);
    let bias = match layer.bias() {
        Some(b) => f64s(b)?,
        None => vec![0.0; out],
    };
    for i in 0..t {
        for j in 0..out {
            y_ref[i * out + j] += bias[j] + lr[i * out + j];
        }
    }
    let dyb = mm(&dyv, &bv, t, out, r);
    let mut dx_ref = mm(&dyv, &w, t, out, inp);
    for (d, a) in dx_ref.iter_mut().zip(mask(&mm(&dyb, &av, t, r, inp), inp)?) {
        *d += a;
    }
    let db_ref = mm(&tr(&dyv, t, out), &xa, out, t, r);
    let da_ref = mm(&tr(&dyb, t, r), &xd, r, t, inp);
    let rt = match c.dtype {
        DType::F32 => 2e-5,
        DType::F16 => 4e-3,
        _ => 2e-2,
    };
    let what = format!(
        "{:?} {} t={t} in={inp} out={out} p={}",
        c.base, c.dtype, c.dropout
    );
    close_rel(&y.to_vec_f32()?, &y_ref, rt, &format!("y {what}"));
    let dx = g.dx.ok_or_else(err("dx"))?;
    close_rel(&dx.to_vec_f32()?, &dx_ref, rt, &format!("dx {what}"));
    // Expected logits / bank gradients: the composition's chain rule applied to the f64 dA and dB.
    let f = |v: &[f64], s: &[usize]| Tensor::from_vec(to32(v), s, dev);
    let f32s = |id: ParamId| store.get(id).cloned();
    let (dla, dlb, dbank) = layer.layer().compose_backward(
        &f32s(bank.id())?,
        &f32s(layer.logits_a_id())?,
        &f32s(layer.logits_b_id())?,
        &f(&da_ref, &[r, inp])?,
        &f(&db_ref, &[out, r])?,
    )?;
    let rg = rt.max(5e-5);
    close_rel(
        &g.dlogits_a.to_vec_f32()?,
        &f64s(&dla)?,
        rg,
        &format!("dlogits_A {what}"),
    );
    close_rel(
        &g.dlogits_b.to_vec_f32()?,
        &f64s(&dlb)?,
        rg,
        &format!("dlogits_B {what}"),
    );
    close_rel(
        &g.dbank.to_vec_f32()?,
        &f64s(&dbank)?,
        rg,
        &format!("dbank {what}"),
    );
    // ΔW = B·A and the merged weight.
    let ba = mm(&bv, &av, out, r, inp);
    close_rel(
        &layer.delta_weight(&store)?.to_vec_f32()?,
        &ba,
        1e-6,
        &format!("delta {what}"),
    );
    let wd: Vec<f64> = w.iter().zip(&ba).map(|(a, b)| a + b).collect();
    close_rel(
        &layer.merged_weight(&store, DType::F32)?.to_vec_f32()?,
        &wd,
        1e-6,
        &format!("merged {what}"),
    );
    Ok(())
}

fn vblora_layer_vs_f64(dev: Device) -> Result<()> {
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
    let mut seed = 500;
    for &base in &bases {
        for &(t, inp, out) in &[(1usize, 64usize, 32usize), (5, 96, 20), (37, 132, 64)] {
            for &(dropout, bias) in &[(0.0f32, true), (0.25, false)] {
                seed += 10;
                vblora_case(
                    &VbCase {
                        t,
                        inp,
                        out,
                        base,
                        dtype: DType::F32,
                        dropout,
                        bias,
                    },
                    dev,
                    seed,
                )?;
            }
        }
    }
    for &dt in &[DType::BF16, DType::F16] {
        for base in [
            Base::Dense(dt),
            Base::Nf4 {
                double: true,
                blocksize: 64,
            },
        ] {
            seed += 10;
            vblora_case(
                &VbCase {
                    t: 9,
                    inp: 128,
                    out: 40,
                    base,
                    dtype: dt,
                    dropout: 0.1,
                    bias: true,
                },
                dev,
                seed,
            )?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- finite differences on the tape

/// Logits whose rows are well separated (a shuffled ramp with spacing 0.5), so that a finite-difference step
/// never changes the top-k selection.
fn separated_logits(shape: &[usize], seed: u64, dev: Device) -> Result<Tensor> {
    let v = *shape.last().ok_or_else(err("shape"))?;
    let rows: usize = shape[..shape.len() - 1].iter().product();
    let mut rng = peft_kernels::rng::Rng::new(seed);
    let mut data = Vec::with_capacity(rows * v);
    for _ in 0..rows {
        let mut ramp: Vec<f32> = (0..v).map(|i| i as f32 * 0.5 - v as f32 * 0.25).collect();
        for i in (1..v).rev() {
            let j = (rng.uniform_vec(1, 0.0, (i + 1) as f32)[0] as usize).min(i);
            ramp.swap(i, j);
        }
        data.extend(ramp);
    }
    Tensor::from_vec(data, shape, dev)
}

/// VB-LoRA → GELU → VB-LoRA → MSE, one shared bank: finite differences of the bank and of both layers'
/// logits; the bank's single gradient entry equals the sum of the two layers' own contributions.
fn gradcheck_shared_bank(dev: Device) -> Result<()> {
    let vc = VbLoraConfig {
        r: 2,
        num_vectors: 6,
        vector_length: 4,
        topk: 3,
    };
    let mut store = ParamStore::new();
    let bank = VbLoraBank::new(&vc, 1.0, &mut store, 1, dev)?;
    let o = VbLoraOptions::default();
    let l1 = VbLoraLinear::new(
        "l1",
        make_base(
            Base::Nf4 {
                double: true,
                blocksize: 64,
            },
            24,
            32,
            2,
            dev,
        )?,
        None,
        &bank,
        &o,
        &mut store,
        3,
    )?;
    let b2 = Tensor::randn(&[8], 0.1, 4, DType::F32, dev)?;
    let l2 = VbLoraLinear::new(
        "l2",
        make_base(Base::Dense(DType::F32), 8, 24, 5, dev)?,
        Some(b2),
        &bank,
        &o,
        &mut store,
        6,
    )?;
    for l in [&l1, &l2] {
        for id in [l.logits_a_id(), l.logits_b_id()] {
            let shape = store.get(id)?.shape().to_vec();
            store.set(id, separated_logits(&shape, id.index() as u64, dev)?)?;
        }
    }
    let x = Tensor::randn(&[6, 32], 1.0, 7, DType::F32, dev)?;
    let target = Tensor::randn(&[6, 8], 1.0, 8, DType::F32, dev)?;
    let run = |store: &ParamStore| -> Result<(f32, Gradients)> {
        let mut tape = Tape::new();
        let xv = tape.leaf(x.clone());
        let h = l1.forward_t(&mut tape, store, xv, None)?;
        let h = tape.gelu(h)?;
        let y = l2.forward_t(&mut tape, store, h, None)?;
        let loss = tape.mse_loss(y, &target)?;
        let g = tape.backward(loss)?;
        Ok((tape.value(loss)?.to_scalar()?, g))
    };
    let (_, grads) = run(&store)?;
    assert_eq!(grads.len(), 5, "one bank entry + two logits per layer");

    // The bank's entry is the sum of both layers' contributions (manual backward through the stack; the
    // GELU's backward from a tape of its own).
    let (y1, c1) = l1.forward(&store, &x, None)?;
    let mut gt = Tape::new();
    let y1v = {
        let mut s = ParamStore::new();
        let id = s.insert("y1", y1.clone())?;
        (gt.param(&s, id)?, id)
    };
    let hv = gt.gelu(y1v.0)?;
    let h = gt.value(hv)?.clone();
    let (y2, c2) = l2.forward(&store, &h, None)?;
    let n = y2.numel() as f32;
    let dy2 = y2.sub(&target)?.scale(2.0 / n)?;
    let g2 = l2.backward(&store, &c2, &dy2, true)?;
    let dh = g2.dx.ok_or_else(err("dx"))?;
    let dy1 = gt
        .backward_with(hv, dh)?
        .remove(y1v.1)
        .ok_or_else(err("gelu backward"))?;
    let g1 = l1.backward(&store, &c1, &dy1, false)?;
    let sum = g1.dbank.add(&g2.dbank)?;
    let tape_bank = grads.get(bank.id()).ok_or_else(err("bank gradient"))?;
    assert_close(
        &tape_bank.to_vec_f32()?,
        &sum.to_vec_f32()?,
        1e-5,
        1e-7,
        "bank gradient = sum over layers",
    );
    assert!(
        g1.dbank.to_vec_f32()?.iter().any(|v| *v != 0.0) && g2.dbank.to_vec_f32()?.iter().any(|v| *v != 0.0)
    );

    let cfg = GradCheckConfig {
        eps: 1e-2,
        rtol: 2e-2,
        atol: 2e-4,
        max_points: 24,
        seed: 1,
    };
    let ids = [
        bank.id(),
        l1.logits_a_id(),
        l1.logits_b_id(),
        l2.logits_a_id(),
        l2.logits_b_id(),
    ];
    check_param_gradients(store, &ids, &grads, |s| Ok(run(s)?.0), &cfg)
}

/// WaveFT (NF4 base) → GELU → WaveFT (dense base, sym2) → MSE: finite differences of both spectra.
fn gradcheck_waveft_stack(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let c1 = WaveFtConfig {
        n_frequency: 30,
        scaling: 5.0,
        ..Default::default()
    };
    let c2 = WaveFtConfig {
        n_frequency: 25,
        scaling: 3.0,
        wavelet_family: "sym2".into(),
        ..Default::default()
    };
    let l1 = WaveFtLinear::new(
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
        &c1,
        false,
        &mut store,
        2,
    )?;
    let bias = Tensor::randn(&[5], 0.1, 9, DType::F32, dev)?;
    let l2 = WaveFtLinear::new(
        "l2",
        make_base(Base::Dense(DType::F32), 5, 24, 3, dev)?,
        Some(bias),
        &c2,
        false,
        &mut store,
        4,
    )?;
    for (l, s) in [(&l1, 11), (&l2, 12)] {
        store.set(
            l.spectrum_id(),
            Tensor::randn(&[l.config().n_frequency], 0.2, s, DType::F32, dev)?,
        )?;
    }
    let x = Tensor::randn(&[6, 64], 1.0, 5, DType::F32, dev)?;
    let target = Tensor::randn(&[6, 5], 1.0, 6, DType::F32, dev)?;
    let run = |store: &ParamStore| -> Result<(f32, Gradients)> {
        let mut tape = Tape::new();
        let xv = tape.leaf(x.clone());
        let h = l1.forward_t(&mut tape, store, xv, None)?;
        let h = tape.gelu(h)?;
        let y = l2.forward_t(&mut tape, store, h, None)?;
        let loss = tape.mse_loss(y, &target)?;
        let g = tape.backward(loss)?;
        Ok((tape.value(loss)?.to_scalar()?, g))
    };
    let (_, grads) = run(&store)?;
    let cfg = GradCheckConfig {
        eps: 1e-2,
        rtol: 2e-2,
        atol: 2e-4,
        max_points: 30,
        seed: 2,
    };
    check_param_gradients(
        store,
        &[l1.spectrum_id(), l2.spectrum_id()],
        &grads,
        |s| Ok(run(s)?.0),
        &cfg,
    )
}

// ---------------------------------------------------------------- training

/// A two-layer NF4 student (WaveFT on fc1, VB-LoRA on fc2) learns planted updates of the same kinds.
fn tape_trains(dev: Device) -> Result<()> {
    let (din, dh, dout, tokens) = (48usize, 64usize, 16usize, 64usize);
    let w1 = Tensor::randn(&[dh, din], (2.0 / din as f32).sqrt(), 1, DType::F32, dev)?;
    let w2 = Tensor::randn(&[dout, dh], (2.0 / dh as f32).sqrt(), 2, DType::F32, dev)?;
    let q = |w: &Tensor| -> Result<BaseWeight> {
        Ok(BaseWeight::Quantized(QuantizedTensor::quantize(
            w,
            &QuantizeOptions::default(),
        )?))
    };
    let wcfg = WaveFtConfig {
        n_frequency: 200,
        scaling: 1.0,
        ..Default::default()
    };
    let vc = VbLoraConfig {
        r: 4,
        num_vectors: 32,
        vector_length: 8,
        topk: 2,
    };
    // The teacher: the same kinds of update, from other parameters.
    let mut teacher = ParamStore::new();
    let t1 = WaveFtLinear::new(
        "fc1",
        BaseWeight::Dense(w1.clone()),
        None,
        &wcfg,
        false,
        &mut teacher,
        21,
    )?;
    teacher.set(t1.spectrum_id(), Tensor::randn(&[200], 0.1, 22, DType::F32, dev)?)?;
    let tbank = VbLoraBank::new(&vc, 0.3, &mut teacher, 23, dev)?;
    let t2 = VbLoraLinear::new(
        "fc2",
        BaseWeight::Dense(w2.clone()),
        None,
        &tbank,
        &VbLoraOptions {
            dropout: 0.0,
            init_logits_std: 1.0,
        },
        &mut teacher,
        24,
    )?;
    let w1t = t1.merged_weight(&teacher, DType::F32)?;
    let w2t = t2.merged_weight(&teacher, DType::F32)?;

    let mut store = ParamStore::new();
    let l1 = WaveFtLinear::new("fc1", q(&w1)?, None, &wcfg, true, &mut store, 10)?;
    let bank = VbLoraBank::new(&vc, 0.3, &mut store, 11, dev)?;
    let l2 = VbLoraLinear::new(
        "fc2",
        q(&w2)?,
        None,
        &bank,
        &VbLoraOptions {
            dropout: 0.05,
            init_logits_std: 0.1,
        },
        &mut store,
        12,
    )?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })?;
    let mut losses = Vec::new();
    for step in 0..120u64 {
        let x = Tensor::randn(&[tokens, din], 1.0, 1000 + step, DType::F32, dev)?;
        let h = x.matmul_t(&w1t, false, true)?;
        let h = Tensor::from_vec(
            h.to_vec_f32()?.iter().map(|v| v.max(0.0)).collect(),
            h.shape(),
            dev,
        )?;
        let y = h.matmul_t(&w2t, false, true)?;
        let mut tape = Tape::new();
        let xv = tape.leaf(x);
        let h = l1.forward_t(&mut tape, &store, xv, Some(step))?;
        let h = tape.relu(h)?;
        let out = l2.forward_t(&mut tape, &store, h, Some(step))?;
        let loss = tape.mse_loss(out, &y)?;
        let grads = tape.backward(loss)?;
        losses.push(tape.value(loss)?.to_scalar()?);
        drop(tape);
        opt.step(&mut store, &grads)?;
    }
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    eprintln!("sparse tape_trains: loss {first} -> {last}");
    assert!(last < 0.25 * first, "loss {first} -> {last}: did not fall enough");
    Ok(())
}

// ---------------------------------------------------------------- CUDA vs CPU

fn cuda_matches_cpu(dev: Device) -> Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    let e = |r: &Result<Vec<f32>>| {
        r.as_ref()
            .cloned()
            .map_err(|e| Error::InvalidArgument(e.to_string()))
    };
    for &dt in &[DType::F32, DType::BF16] {
        let w = Tensor::randn(&[96, 256], 0.5, 1, DType::F32, Device::Cpu)?;
        let qw = QuantizedTensor::quantize(&w, &QuantizeOptions::default())?;
        let x = Tensor::randn(&[33, 256], 1.0, 2, DType::F32, Device::Cpu)?.to_dtype(dt)?;
        let dy = Tensor::randn(&[33, 96], 1.0, 3, DType::F32, Device::Cpu)?.to_dtype(dt)?;
        let mut outs = Vec::new();
        for d in [Device::Cpu, dev] {
            let mut store = ParamStore::new();
            let wc = WaveFtConfig {
                n_frequency: 500,
                ..Default::default()
            };
            let lw = WaveFtLinear::new(
                "p",
                BaseWeight::Quantized(qw.to_device(d)?),
                None,
                &wc,
                false,
                &mut store,
                7,
            )?;
            let (y, ctx) = lw.forward(&store, &x.to_device(d)?, Some(1))?;
            let g = lw.backward(&store, &ctx, &dy.to_device(d)?, true)?;
            let vc = VbLoraConfig {
                r: 4,
                num_vectors: 16,
                vector_length: 32,
                topk: 2,
            };
            let bank = VbLoraBank::new(&vc, 0.3, &mut store, 8, d)?;
            let lv = VbLoraLinear::new(
                "q",
                BaseWeight::Quantized(qw.to_device(d)?),
                None,
                &bank,
                &VbLoraOptions {
                    dropout: 0.1,
                    init_logits_std: 1.0,
                },
                &mut store,
                9,
            )?;
            let (y2, c2) = lv.forward(&store, &x.to_device(d)?, Some(11))?;
            let g2 = lv.backward(&store, &c2, &dy.to_device(d)?, true)?;
            let dx = g.dx.ok_or_else(err("dx"))?;
            let dx2 = g2.dx.ok_or_else(err("dx"))?;
            outs.push(
                [y, dx, g.dspectrum, y2, dx2, g2.dlogits_a, g2.dlogits_b, g2.dbank].map(|t| t.to_vec_f32()),
            );
        }
        let tol = if dt == DType::F32 { 1e-4 } else { 2e-2 };
        let names = [
            "waveft y",
            "waveft dx",
            "dspectrum",
            "vblora y",
            "vblora dx",
            "dlogits_A",
            "dlogits_B",
            "dbank",
        ];
        for (k, what) in names.iter().enumerate() {
            common::assert_close_scaled(
                &e(&outs[1][k])?,
                &e(&outs[0][k])?,
                tol,
                &format!("cuda vs cpu {what} {dt}"),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- bad input

fn bad_input(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let base = make_base(Base::Dense(DType::F32), 8, 16, 1, dev)?;
    // WaveFT: n_frequency beyond out·in, unknown wavelet, duplicate module.
    let too_many = WaveFtConfig {
        n_frequency: 8 * 16 + 1,
        ..Default::default()
    };
    assert!(
        matches!(WaveFtLinear::new("a", base.clone(), None, &too_many, true, &mut store, 0), Err(Error::InvalidArgument(m)) if m.contains("a:"))
    );
    let bad_family = WaveFtConfig {
        n_frequency: 4,
        wavelet_family: "haar".into(),
        ..Default::default()
    };
    assert!(WaveFtLinear::new("a", base.clone(), None, &bad_family, true, &mut store, 0).is_err());
    let ok = WaveFtConfig {
        n_frequency: 4,
        ..Default::default()
    };
    let lw = WaveFtLinear::new("a", base.clone(), None, &ok, true, &mut store, 0)?;
    assert!(WaveFtLinear::new("a", base.clone(), None, &ok, true, &mut store, 0).is_err());
    let bad_bias = Tensor::zeros(&[9], DType::F32, dev)?;
    assert!(matches!(
        WaveFtLinear::new(
            "b",
            base.clone(),
            Some(bad_bias.clone()),
            &ok,
            true,
            &mut store,
            0
        ),
        Err(Error::Shape { .. })
    ));
    // Zero init is an identity adapter.
    let x = Tensor::randn(&[3, 16], 1.0, 1, DType::F32, dev)?;
    let (y, ctx) = lw.forward(&store, &x, None)?;
    let BaseWeight::Dense(w) = &base else {
        unreachable!()
    };
    assert_close(
        &y.to_vec_f32()?,
        &x.matmul_t(w, false, true)?.to_vec_f32()?,
        1e-6,
        1e-6,
        "zero spectrum",
    );
    assert!(matches!(
        lw.forward(&store, &Tensor::zeros(&[3, 15], DType::F32, dev)?, None),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        lw.backward(&store, &ctx, &Tensor::zeros(&[3, 9], DType::F32, dev)?, true),
        Err(Error::Shape { .. })
    ));
    // A spectrum of the wrong length.
    let sid = store.insert("wrong", Tensor::zeros(&[5], DType::F32, dev)?)?;
    assert!(matches!(
        WaveFtLinear::from_params("c", base.clone(), None, &ok, sid, &store),
        Err(Error::Shape { .. })
    ));

    // VB-LoRA: in/out not multiples of L, dropout out of range, bank twice, logits shapes.
    let vc = VbLoraConfig {
        r: 2,
        num_vectors: 4,
        vector_length: 4,
        topk: 2,
    };
    let bank = VbLoraBank::new(&vc, 0.1, &mut store, 0, dev)?;
    assert!(
        VbLoraBank::new(&vc, 0.1, &mut store, 0, dev).is_err(),
        "one bank per store"
    );
    let odd = make_base(Base::Dense(DType::F32), 6, 16, 1, dev)?;
    let e = VbLoraLinear::new("v", odd, None, &bank, &VbLoraOptions::default(), &mut store, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("v:") && e.contains("divisible by `vector_length`"),
        "{e}"
    );
    let bad = VbLoraOptions {
        dropout: 1.0,
        ..Default::default()
    };
    assert!(VbLoraLinear::new("v", base.clone(), None, &bank, &bad, &mut store, 0).is_err());
    let lv = VbLoraLinear::new(
        "v2",
        base.clone(),
        None,
        &bank,
        &VbLoraOptions::default(),
        &mut store,
        0,
    )?;
    assert!(matches!(
        VbLoraLinear::from_params(
            "v3",
            base.clone(),
            None,
            &bank,
            lv.logits_b_id(),
            lv.logits_a_id(),
            0.0,
            &store
        ),
        Err(Error::Shape { .. })
    ));
    // Training from -inf logits (a top-k checkpoint) is refused with PEFT's reason; inference works.
    let la = store.get(lv.logits_a_id())?.to_vec_f32()?;
    let la: Vec<f32> = la
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 4 == 3 { f32::NEG_INFINITY } else { *v })
        .collect();
    let shape = store.get(lv.logits_a_id())?.shape().to_vec();
    store.set(lv.logits_a_id(), Tensor::from_vec(la, &shape, dev)?)?;
    let (y, ctx) = lv.forward(&store, &x, None)?;
    assert!(y.to_vec_f32()?.iter().all(|v| v.is_finite()));
    let e = lv
        .backward(
            &store,
            &ctx,
            &Tensor::full(y.shape(), 1.0, y.dtype(), y.device())?,
            true,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("save_only_topk_weights") && e.contains("v2"), "{e}");
    // ... but with the adapter frozen, gradients still reach the input through the tape.
    for id in [bank.id(), lv.logits_a_id(), lv.logits_b_id()] {
        store.set_trainable(id, false)?;
    }
    let xid = store.insert("x", x.clone())?;
    let mut tape = Tape::new();
    let xv = tape.param(&store, xid)?;
    let yv = lv.forward_t(&mut tape, &store, xv, None)?;
    let g = tape.backward_with(yv, Tensor::full(&[3, 8], 1.0, DType::F32, dev)?)?;
    assert_eq!(g.len(), 1);
    assert!(g.get(xid).is_some());
    Ok(())
}

device_test!(
    waveft_layer_vs_f64,
    vblora_layer_vs_f64,
    gradcheck_shared_bank,
    gradcheck_waveft_stack,
    tape_trains,
    cuda_matches_cpu,
    bad_input
);

// ---------------------------------------------------------------- PEFT fixtures through the loader

/// `Σ y·r` for a constant `r`: a scalar whose gradient w.r.t. `y` is `r` (lets one tape backward deliver
/// PEFT's per-module output gradients to every layer at once).
struct DotConst(Tensor);

impl Backward for DotConst {
    fn backward(
        &self,
        _g: &Tensor,
        _i: &[&Tensor],
        _o: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        // The loss is a sum of these scalars, each seeded with 1.
        Ok(vec![
            needs.first().copied().unwrap_or(false).then(|| self.0.clone()),
        ])
    }
    fn name(&self) -> &'static str {
        "dot_const"
    }
}

fn dot_const(tape: &mut Tape, y: Var, r: &Tensor) -> Result<Var> {
    let yv = tape.value(y)?.to_vec_f32()?;
    let s: f32 = yv.iter().zip(r.to_vec_f32()?).map(|(a, b)| a * b).sum();
    let out = Tensor::from_vec(vec![s], &[1], tape.value(y)?.device())?;
    tape.record(&[y], out, Box::new(DotConst(r.clone())))
}

fn sparse_case(name: &str) -> (SafetensorsFile, PeftAdapter, SafetensorsFile) {
    let dir = fixtures().join("sparse_layers").join(name);
    (
        SafetensorsFile::open(dir.join("base.safetensors")).unwrap(),
        PeftAdapter::load(dir.join("adapter"), Device::Cpu).unwrap(),
        SafetensorsFile::open(dir.join("io.safetensors")).unwrap(),
    )
}

/// Every adapted layer of a PEFT fixture, loaded with `load_adapter` onto the fixture's base: outputs from
/// PEFT's per-module inputs, and (one tape for all layers) input and parameter gradients from PEFT's
/// per-module output gradients, all against PEFT within 1e-5 (relative, floor 1e-6 of the largest value).
/// VB-LoRA: the bank's gradient, summed over all layers on the tape, equals PEFT's `bank.grad`.
fn peft_fixture(name: &str, dev: Device) -> Result<()> {
    let (base, adapter, io) = sparse_case(name);
    let mut store = ParamStore::new();
    let opts = LoadOptions {
        device: dev,
        ..Default::default()
    };
    let model = load_adapter(&base, &adapter, &mut store, &opts)?;
    let modules = adapter.modules()?;
    assert_eq!(model.layers().len(), modules.len());
    assert_eq!(
        model.num_trainable_params(&store)?,
        adapter.num_trainable_params()?
    );
    let topk = name.contains("topk");
    if topk {
        // Top-k checkpoints are for inference: freeze the adapter, keep gradients to the inputs.
        let ids: Vec<ParamId> = store.iter().map(|(id, _, _)| id).collect();
        for id in ids {
            store.set_trainable(id, false)?;
        }
    }
    let load = |k: &str| io.load(k, dev);
    let mut tape = Tape::new();
    let mut inputs = Vec::new();
    let mut loss: Option<Var> = None;
    let mut worst = 0f32;
    for layer in model.layers() {
        let m = layer.name();
        let x = load(&format!("{m}.input"))?;
        let xid = store.insert(format!("input.{m}"), x)?;
        let xv = tape.param(&store, xid)?;
        let y = layer.forward_t(&mut tape, &store, xv, None)?;
        worst = worst.max(close_peft(
            &tape.value(y)?.to_vec_f32()?,
            &io.load(&format!("{m}.output"), Device::Cpu)?.to_vec_f32()?,
            &format!("{name} {m} output"),
        ));
        // The eval path gives the same output.
        assert_eq!(
            layer.forward_eval(&store, tape.value(xv)?)?.to_vec_f32()?,
            tape.value(y)?.to_vec_f32()?
        );
        let d = dot_const(&mut tape, y, &load(&format!("{m}.dy"))?)?;
        loss = Some(match loss {
            None => d,
            Some(l) => tape.add(l, d)?,
        });
        inputs.push((m.to_string(), xid));
    }
    let loss = loss.ok_or_else(err("layers"))?;
    let grads = tape.backward(loss)?;
    for (m, xid) in &inputs {
        let dx = grads.get(*xid).ok_or_else(err("dx"))?;
        worst = worst.max(close_peft(
            &dx.to_vec_f32()?,
            &io.load(&format!("{m}.dx"), Device::Cpu)?.to_vec_f32()?,
            &format!("{name} {m} dx"),
        ));
    }
    if !topk {
        for layer in model.layers() {
            let m = layer.name();
            let any = layer.as_any();
            let pairs: Vec<(ParamId, String)> = if let Some(l) = any.downcast_ref::<WaveFtLinear>() {
                vec![(l.spectrum_id(), format!("{m}.dspectrum"))]
            } else if let Some(l) = any.downcast_ref::<VbLoraLinear>() {
                vec![
                    (l.logits_a_id(), format!("{m}.dlogits_A")),
                    (l.logits_b_id(), format!("{m}.dlogits_B")),
                ]
            } else {
                vec![]
            };
            for (id, key) in pairs {
                let g = grads.get(id).ok_or_else(err("gradient"))?;
                worst = worst.max(close_peft(
                    &g.to_vec_f32()?,
                    &io.load(&key, Device::Cpu)?.to_vec_f32()?,
                    &format!("{name} {key}"),
                ));
            }
        }
        if let Some(bank) = model.bank() {
            let g = grads.get(bank.id()).ok_or_else(err("bank gradient"))?;
            worst = worst.max(close_peft(
                &g.to_vec_f32()?,
                &io.load("dbank", Device::Cpu)?.to_vec_f32()?,
                &format!("{name} dbank (sum over layers)"),
            ));
        }
    }
    // Merged weights in the base's stored layout ([in, out] for Conv1D): W (dequantized) + ΔW.
    let ff = adapter.config.fan_in_fan_out;
    for layer in model.layers() {
        let m = layer.name();
        let w = layer.merged_weight(&store, DType::F32)?;
        let w = if ff { w.t()? } else { w };
        worst = worst.max(close_peft(
            &w.to_vec_f32()?,
            &io.load(&format!("{m}.merged"), Device::Cpu)?.to_vec_f32()?,
            &format!("{name} {m} merged"),
        ));
    }
    println!(
        "{name}: {} layers match PEFT, worst error {worst:.2e} of max|value|",
        model.layers().len()
    );
    Ok(())
}

fn peft_waveft_nf4(dev: Device) -> Result<()> {
    peft_fixture("waveft_nf4", dev)
}
fn peft_waveft_gpt(dev: Device) -> Result<()> {
    peft_fixture("waveft_gpt", dev)
}
fn peft_vblora_nf4(dev: Device) -> Result<()> {
    peft_fixture("vblora_nf4", dev)
}
fn peft_vblora_gpt_topk(dev: Device) -> Result<()> {
    peft_fixture("vblora_gpt_topk", dev)
}
device_test!(
    peft_waveft_nf4,
    peft_waveft_gpt,
    peft_vblora_nf4,
    peft_vblora_gpt_topk
);

/// The MLP fixtures of tests/fixtures/peft_sparse (written for the math, with the whole model's output
/// `out`): lin0 → ReLU → lin1 → ReLU → lin2 through the loader's layers on one tape reproduces PEFT's
/// output, and its backward (seeded with PEFT's dL/d out) PEFT's spectrum / logits / bank gradients.
fn peft_mlp(name: &str, dev: Device) -> Result<()> {
    let dir = fixtures().join("peft_sparse");
    let st = SafetensorsFile::open(dir.join(format!("{name}.safetensors"))).unwrap();
    let adapter = PeftAdapter::load(dir.join(name), Device::Cpu)?;
    let mut store = ParamStore::new();
    // The reference file holds `lin*.weight`: it doubles as the base checkpoint.
    let model = load_adapter(
        &st,
        &adapter,
        &mut store,
        &LoadOptions {
            device: dev,
            ..Default::default()
        },
    )?;
    let names: Vec<String> = model.layers().iter().map(|l| l.name().to_string()).collect();
    let topk = name.contains("topk");
    let mut tape = Tape::new();
    let first = names.first().ok_or_else(err("layers"))?;
    let mut h = tape.leaf(st.load(&format!("{first}.x"), dev)?);
    for (i, layer) in model.layers().iter().enumerate() {
        h = layer.forward_t(&mut tape, &store, h, None)?;
        if i + 1 < names.len() {
            h = tape.relu(h)?;
        }
    }
    let out_key = if topk { "loaded_out" } else { "out" };
    let worst = close_peft(
        &tape.value(h)?.to_vec_f32()?,
        &st.load(out_key, Device::Cpu)?.to_vec_f32()?,
        &format!("{name} out"),
    );
    if !topk {
        let last = names.last().ok_or_else(err("layers"))?;
        let grads = tape.backward_with(h, st.load(&format!("{last}.dy"), dev)?)?;
        for layer in model.layers() {
            let m = layer.name();
            let any = layer.as_any();
            if let Some(l) = any.downcast_ref::<WaveFtLinear>() {
                close_peft(
                    &grads.get(l.spectrum_id()).ok_or_else(err("g"))?.to_vec_f32()?,
                    &st.load(&format!("{m}.dspectrum"), Device::Cpu)?.to_vec_f32()?,
                    &format!("{name} {m} dspectrum"),
                );
            } else {
                let l = any
                    .downcast_ref::<VbLoraLinear>()
                    .ok_or_else(err("a WaveFT or VB-LoRA layer"))?;
                for (id, k) in [(l.logits_a_id(), "dlogits_A"), (l.logits_b_id(), "dlogits_B")] {
                    close_peft(
                        &grads.get(id).ok_or_else(err("g"))?.to_vec_f32()?,
                        &st.load(&format!("{m}.{k}"), Device::Cpu)?.to_vec_f32()?,
                        &format!("{name} {m} {k}"),
                    );
                }
            }
        }
        if let Some(b) = model.bank() {
            close_peft(
                &grads.get(b.id()).ok_or_else(err("g"))?.to_vec_f32()?,
                &st.load("dbank", Device::Cpu)?.to_vec_f32()?,
                &format!("{name} dbank"),
            );
        }
    }
    println!("{name}: MLP output worst error {worst:.2e}");
    Ok(())
}

fn peft_mlp_all(dev: Device) -> Result<()> {
    for name in [
        "waveft_db1",
        "waveft_noidwt",
        "waveft_sym2",
        "waveft_db3",
        "waveft_coif1",
        "waveft_prop",
        "vblora_full",
        "vblora_topk",
    ] {
        peft_mlp(name, dev)?;
    }
    Ok(())
}
device_test!(peft_mlp_all);

/// LoRA and DoRA through the same loader: the `lora`, `lora_fan_in_fan_out` (Conv1D), `rslora_patterns`,
/// `dora` and `dora_nf4` (bitsandbytes NF4 base) fixtures of gen_peft.py reproduce PEFT's per-module
/// outputs; lora_bias and a mismatched base are refused clearly.
#[test]
fn loader_lora_and_refusals() -> Result<()> {
    let peft = fixtures().join("peft");
    for case in [
        "lora",
        "lora_fan_in_fan_out",
        "rslora_patterns",
        "dora",
        "dora_nf4",
    ] {
        let base = SafetensorsFile::open(peft.join(case).join("base.safetensors")).unwrap();
        let io = SafetensorsFile::open(peft.join(case).join("io.safetensors")).unwrap();
        let adapter = PeftAdapter::load(peft.join(case).join("adapter"), Device::Cpu)?;
        let mut store = ParamStore::new();
        let model = load_adapter(&base, &adapter, &mut store, &LoadOptions::default())?;
        for layer in model.layers() {
            let m = layer.name();
            let y = layer.forward_eval(&store, &io.load(&format!("{m}.input"), Device::Cpu)?)?;
            close_peft(
                &y.to_vec_f32()?,
                &io.load(&format!("{m}.output"), Device::Cpu)?.to_vec_f32()?,
                &format!("{case} {m}"),
            );
        }
        assert_eq!(
            model.num_trainable_params(&store)?,
            adapter.num_trainable_params()?
        );
    }
    let refuse = |case: &str, base_case: &str, needle: &str| {
        let base = SafetensorsFile::open(peft.join(base_case).join("base.safetensors")).unwrap();
        let adapter = PeftAdapter::load(peft.join(case).join("adapter"), Device::Cpu).unwrap();
        let e = load_adapter(&base, &adapter, &mut ParamStore::new(), &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{case}: {e}");
    };
    refuse("lora_bias_all", "lora_bias_all", "lora_bias");
    refuse(
        "lora",
        "lora_fan_in_fan_out",
        "base has no tensor \"in_proj.weight\"",
    );
    // A WaveFT adapter with proportional_parameters on a base of other shapes.
    let (base, _, _) = sparse_case("waveft_nf4");
    let prop = PeftAdapter::load(fixtures().join("sparse_layers/waveft_gpt/adapter"), Device::Cpu)?;
    let e = load_adapter(&base, &prop, &mut ParamStore::new(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("c_attn"), "{e}");
    Ok(())
}

/// `bias="all"`: a trained bias of an adapted layer replaces the layer's bias; the trained bias of another
/// module is handed back in `replaced()`; both are written back on save.
#[test]
fn loader_trained_biases() -> Result<()> {
    let peft = fixtures().join("peft/lora");
    let base = SafetensorsFile::open(peft.join("base.safetensors"))?;
    let io = SafetensorsFile::open(peft.join("io.safetensors"))?;
    let mut adapter = PeftAdapter::load(peft.join("adapter"), Device::Cpu)?;
    adapter.config.bias = "all".into();
    let old = base.load("in_proj.bias", Device::Cpu)?;
    let new_bias = old.add(&Tensor::randn(&[12], 0.5, 1, DType::F32, Device::Cpu)?)?;
    adapter
        .tensors
        .insert("base_model.model.in_proj.bias".into(), new_bias.clone());
    let head = Tensor::randn(&[7], 1.0, 2, DType::F32, Device::Cpu)?;
    adapter
        .tensors
        .insert("base_model.model.lm_head.bias".into(), head.clone());
    let mut store = ParamStore::new();
    let model = load_adapter(&base, &adapter, &mut store, &LoadOptions::default())?;
    let layer = model.layer("in_proj").ok_or_else(err("in_proj"))?;
    assert_eq!(
        layer.bias().ok_or_else(err("bias"))?.to_vec_f32()?,
        new_bias.to_vec_f32()?
    );
    // PEFT's output with the checkpoint's bias, shifted by the bias change.
    let y = layer.forward_eval(&store, &io.load("in_proj.input", Device::Cpu)?)?;
    let want = io.load("in_proj.output", Device::Cpu)?;
    let shift = new_bias.sub(&old)?.to_vec_f32()?;
    let want: Vec<f32> = want
        .to_vec_f32()?
        .iter()
        .enumerate()
        .map(|(i, v)| v + shift[i % 12])
        .collect();
    assert_close(
        &y.to_vec_f32()?,
        &want,
        1e-5,
        1e-6,
        "in_proj with its trained bias",
    );
    assert_eq!(model.replaced().keys().collect::<Vec<_>>(), vec!["lm_head.bias"]);
    assert_eq!(model.replaced()["lm_head.bias"].to_vec_f32()?, head.to_vec_f32()?);
    let back = model.to_peft(&store)?;
    assert_eq!(
        back.tensors.keys().collect::<Vec<_>>(),
        adapter.tensors.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        model.num_trainable_params(&store)?,
        adapter.num_trainable_params()?
    );
    Ok(())
}

/// bf16 activations over NF4 bases: dense base weights are cast by `LoadOptions::dtype`; outputs stay
/// within bf16 rounding of PEFT's f32 ones.
#[test]
fn loader_bf16_activations() -> Result<()> {
    for name in ["waveft_nf4", "vblora_nf4", "waveft_gpt"] {
        let (base, adapter, io) = sparse_case(name);
        let mut store = ParamStore::new();
        let opts = LoadOptions {
            dtype: Some(DType::BF16),
            ..Default::default()
        };
        let model = load_adapter(&base, &adapter, &mut store, &opts)?;
        for layer in model.layers() {
            let m = layer.name();
            let x = io
                .load(&format!("{m}.input"), Device::Cpu)?
                .to_dtype(DType::BF16)?;
            let y = layer.forward_eval(&store, &x)?;
            assert_eq!(y.dtype(), DType::BF16);
            let want = io.load(&format!("{m}.output"), Device::Cpu)?.to_vec_f32()?;
            common::assert_close_scaled(&y.to_vec_f32()?, &want, 3e-2, &format!("{name} {m} bf16"));
        }
    }
    Ok(())
}

/// Loaded adapters saved back (AdapterModel::save) are the same adapter: identical tensors (top-k files:
/// identical indices, weights within 1e-6), identical module layout.
#[test]
fn save_round_trip() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let mut cases: Vec<(SafetensorsFile, PeftAdapter, String)> =
        ["waveft_nf4", "waveft_gpt", "vblora_nf4", "vblora_gpt_topk"]
            .iter()
            .map(|n| {
                let (b, a, _) = sparse_case(n);
                (b, a, n.to_string())
            })
            .collect();
    for n in ["vblora_full", "vblora_topk", "waveft_prop"] {
        let p = fixtures().join("peft_sparse");
        cases.push((
            SafetensorsFile::open(p.join(format!("{n}.safetensors"))).unwrap(),
            PeftAdapter::load(p.join(n), Device::Cpu)?,
            n.to_string(),
        ));
    }
    for (base, adapter, name) in cases {
        let mut store = ParamStore::new();
        let model = load_adapter(&base, &adapter, &mut store, &LoadOptions::default())?;
        let out = dir.path().join(&name);
        model.save(&store, &out)?;
        let back = PeftAdapter::load(&out, Device::Cpu)?;
        assert_eq!(back.modules()?, adapter.modules()?, "{name}");
        assert_eq!(
            back.tensors.keys().collect::<Vec<_>>(),
            adapter.tensors.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, t) in &adapter.tensors {
            let b = &back.tensors[k];
            assert_eq!((b.dtype(), b.shape()), (t.dtype(), t.shape()), "{name} {k}");
            if let Some(stem) = k.strip_suffix("_topk_indices") {
                // Re-saved from the expanded logits: the same (index, weight) pairs, but tied weights may be
                // listed in another order (torch.topk of the expanded logits, as PEFT would re-save them), so
                // compare the logits both files stand for.
                let nv = adapter
                    .config
                    .vblora()
                    .ok_or_else(err("vblora config"))?
                    .num_vectors;
                let wk = format!("{stem}_topk_weights");
                let expand = |a: &PeftAdapter| {
                    peft_kernels::adapters::vblora::vblora_expand_topk(&a.tensors[k], &a.tensors[&wk], nv)?
                        .to_vec_f32()
                };
                let (eb, et) = (expand(&back)?, expand(&adapter)?);
                for (i, (x, y)) in eb.iter().zip(&et).enumerate() {
                    assert!(x == y || (x - y).abs() <= 1e-5, "{name} {stem}[{i}]: {x} vs {y}");
                }
            } else if !k.ends_with("_topk_weights") {
                assert_eq!(b.to_bytes()?, t.to_bytes()?, "{name} {k}");
            }
        }
        // The generic store → adapter path gives the same file content.
        let generic = adapter_from_store(&adapter.config, &store)?;
        assert_eq!(
            generic.tensors.keys().collect::<Vec<_>>(),
            model.to_peft(&store)?.tensors.keys().collect::<Vec<_>>()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- merging

fn run_peftk(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_peftk"))
        .args(args)
        .output()
        .unwrap()
}

/// `peftk merge` on every WaveFT / VB-LoRA fixture writes PEFT's merged weights (W + ΔW, dense; for NF4
/// bases the dequantized W), within 1e-5.
#[test]
fn peftk_merge_matches_peft() {
    let dir = tempfile::tempdir().unwrap();
    let mut jobs: Vec<(PathBuf, PathBuf, SafetensorsFile, String)> = Vec::new();
    for n in ["waveft_nf4", "waveft_gpt", "vblora_nf4", "vblora_gpt_topk"] {
        let d = fixtures().join("sparse_layers").join(n);
        jobs.push((
            d.join("base.safetensors"),
            d.join("adapter"),
            SafetensorsFile::open(d.join("io.safetensors")).unwrap(),
            ".merged".into(),
        ));
    }
    for n in [
        "waveft_db1",
        "waveft_noidwt",
        "waveft_sym2",
        "waveft_db3",
        "waveft_coif1",
        "waveft_prop",
        "vblora_full",
        "vblora_topk",
    ] {
        let p = fixtures().join("peft_sparse");
        let st = p.join(format!("{n}.safetensors"));
        jobs.push((
            st.clone(),
            p.join(n),
            SafetensorsFile::open(&st).unwrap(),
            ".merged".into(),
        ));
    }
    for (i, (base, adapter, io, suffix)) in jobs.iter().enumerate() {
        let out = dir.path().join(format!("m{i}.safetensors"));
        let o = run_peftk(&[
            "merge".as_ref(),
            "--base".as_ref(),
            base.as_os_str(),
            "--adapter".as_ref(),
            adapter.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--dtype".as_ref(),
            "f32".as_ref(),
        ]);
        assert!(
            o.status.success(),
            "{}: {}",
            adapter.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let f = SafetensorsFile::open(&out).unwrap();
        let a = PeftAdapter::load(adapter, Device::Cpu).unwrap();
        let mut worst = 0f32;
        for m in a.modules().unwrap() {
            let w = f
                .load(&format!("{}.weight", m.name), Device::Cpu)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            let want = io
                .load(&format!("{}{suffix}", m.name), Device::Cpu)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            worst = worst.max(close_peft(
                &w,
                &want,
                &format!("{} {}", adapter.display(), m.name),
            ));
        }
        println!("{}: merged max error {worst:.2e}", adapter.display());
    }
}

/// `--requantize` on the NF4 WaveFT and VB-LoRA fixtures: the merged weights come back in the bitsandbytes
/// layout (same tensor names, dtypes and shapes as the base), load through the quant module, and equal
/// PEFT's dense merge up to one NF4 rounding; the NF4 codes equal those of quantizing PEFT's merged weights
/// with the quant module directly.
#[test]
fn requantized_merge_on_nf4_fixtures() -> Result<()> {
    use peft_kernels::quant::io::{load_quantized, quantized_names};
    let dir = tempfile::tempdir().unwrap();
    for n in ["waveft_nf4", "vblora_nf4"] {
        let d = fixtures().join("sparse_layers").join(n);
        let (base, adapter, io) = sparse_case(n);
        let out = dir.path().join(format!("{n}.safetensors"));
        let report = merge_into_file(
            d.join("base.safetensors"),
            &adapter,
            &out,
            &MergeOptions {
                requantize: true,
                ..Default::default()
            },
            &MergeRegistry::new(),
        )?;
        assert_eq!(report.merged.len(), adapter.modules()?.len());
        let f = SafetensorsFile::open(&out)?;
        assert_eq!(f.names(), base.names(), "{n}: same tensor set as the base");
        assert_eq!(quantized_names(&f), quantized_names(&base));
        for name in f.names() {
            let (a, b) = (f.raw(name)?, base.raw(name)?);
            // The quant-state JSON's length depends on the digits of the new nested_offset.
            if !name.contains(".quant_state.") {
                assert_eq!((a.0, &a.1), (b.0, &b.1), "{n} {name}");
            }
        }
        let (mut same, mut total) = (0usize, 0usize);
        for m in adapter.modules()? {
            let wn = format!("{}.weight", m.name);
            let q = load_quantized(&f, &wn, Device::Cpu)?;
            let merged = io.load(&format!("{}.merged", m.name), Device::Cpu)?;
            let direct = QuantizedTensor::quantize(&merged, &QuantizeOptions::default())?;
            let (qa, qb) = (q.data().to_vec::<u8>()?, direct.data().to_vec::<u8>()?);
            same += qa.iter().zip(&qb).filter(|(a, b)| a == b).count();
            total += qa.len();
            let got = q.dequantize(DType::F32)?.to_vec_f32()?;
            let want = merged.to_vec_f32()?;
            let amax = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 0.145 * amax + 1e-6, "{n} {wn}[{i}]: {g} vs {w}");
            }
        }
        println!("{n}: requantized codes equal to quantizing PEFT's merge directly: {same}/{total} bytes");
        assert!(same as f64 >= 0.97 * total as f64);
    }
    Ok(())
}

// ---------------------------------------------------------------- fresh adapters, trained and exported

/// The WaveFT and VB-LoRA configs used on TinyLM (gen_peft.py's `lora` base): a pattern, an exclusion, and
/// (VB-LoRA) every linear but lm_head (7 outputs are not a multiple of L = 2).
fn tinylm_configs() -> Vec<(&'static str, AdapterConfig)> {
    let mut w = peft_kernels::io::peft::WaveFtConfig {
        n_frequency: 12,
        init_weights: true,
        ..Default::default()
    };
    w.n_frequency_pattern.insert("up_proj", 30).unwrap();
    let mut wc = AdapterConfig::new(MethodConfig::WaveFt(w));
    wc.target_modules = Some(TargetModules::Names(vec![
        "q_proj".into(),
        "v_proj".into(),
        "up_proj".into(),
        "in_proj".into(),
    ]));
    wc.exclude_modules = Some(ModuleNames::Names(vec!["layers.1.self_attn.v_proj".into()]));
    let mut wp = peft_kernels::io::peft::WaveFtConfig {
        n_frequency: 16,
        proportional_parameters: true,
        wavelet_family: "db2".into(),
        ..Default::default()
    };
    wp.random_loc_seed = 4242;
    let mut wpc = AdapterConfig::new(MethodConfig::WaveFt(wp));
    wpc.target_modules = Some(TargetModules::Names(vec!["o_proj".into(), "down_proj".into()]));
    let v = peft_kernels::io::peft::VbLoraConfig {
        r: 3,
        num_vectors: 20,
        vector_length: 2,
        topk: 2,
        vblora_dropout: 0.1,
        ..Default::default()
    };
    let mut vc = AdapterConfig::new(MethodConfig::VbLora(v.clone()));
    vc.target_modules = Some(TargetModules::Names(vec![
        "q_proj".into(),
        "k_proj".into(),
        "o_proj".into(),
        "up_proj".into(),
        "down_proj".into(),
        "in_proj".into(),
    ]));
    let mut vt = v;
    vt.save_only_topk_weights = true;
    vt.num_vectors = 300; // int16 indices in the file
    vt.vblora_dropout = 0.0;
    let mut vtc = AdapterConfig::new(MethodConfig::VbLora(vt));
    vtc.target_modules = Some(TargetModules::Names(vec!["v_proj".into(), "down_proj".into()]));
    vec![
        ("waveft", wc),
        ("waveft_prop", wpc),
        ("vblora", vc),
        ("vblora_topk", vtc),
    ]
}

/// AdamW steps on every adapted layer of TinyLM at once (one tape), each layer fitting its base output plus
/// a planted random linear map of a fixed input batch (which the adapter can partly represent); returns the
/// losses.
fn train_layers(
    model: &peft_kernels::peft_model::load::AdapterModel,
    store: &mut ParamStore,
    steps: u64,
    lr: f32,
) -> Result<Vec<f32>> {
    use peft_kernels::qmatmul::{Algo, linear_forward};
    let mut opt = AdamW::new(AdamWConfig {
        lr,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })?;
    let planted: Vec<Tensor> = model
        .layers()
        .iter()
        .enumerate()
        .map(|(i, l)| {
            Tensor::randn(
                &[l.out_features(), l.in_features()],
                0.3 / (l.in_features() as f32).sqrt(),
                50 + i as u64,
                DType::F32,
                Device::Cpu,
            )
        })
        .collect::<Result<_>>()?;
    let mut losses = Vec::new();
    for step in 0..steps {
        let mut tape = Tape::new();
        let mut total: Option<Var> = None;
        for (i, l) in model.layers().iter().enumerate() {
            // A fixed batch: the objective is deterministic, so its decrease is not hidden by batch noise.
            let x = Tensor::randn(
                &[16, l.in_features()],
                1.0,
                100 * i as u64,
                DType::F32,
                Device::Cpu,
            )?;
            let target = linear_forward(&x, l.base(), l.bias(), None, Algo::Auto)?.add(&x.matmul_t(
                &planted[i],
                false,
                true,
            )?)?;
            let xv = tape.leaf(x);
            let y = l.forward_t(&mut tape, store, xv, Some(step))?;
            let loss = tape.mse_loss(y, &target)?;
            total = Some(match total {
                None => loss,
                Some(t) => tape.add(t, loss)?,
            });
        }
        let total = total.ok_or_else(err("layers"))?;
        let grads = tape.backward(total)?;
        losses.push(tape.value(total)?.to_scalar()?);
        drop(tape);
        opt.step(store, &grads)?;
    }
    Ok(losses)
}

/// `init_adapter` follows PEFT's `get_peft_model`: targets, per-layer n_frequency (pattern and
/// proportional), parameter counts and keys equal to what PEFT would create; training reduces the loss; the
/// saved directory reloads as the same adapter. With `PEFT_KERNELS_WRITE_SPARSE_ROUNDTRIP=DIR` the trained
/// adapters are written for the Python checkers (see the module docs).
#[test]
fn trained_adapters_export() -> Result<()> {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::env::var_os("PEFT_KERNELS_WRITE_SPARSE_ROUNDTRIP")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let base_path = fixtures().join("peft/lora/base.safetensors");
    let base = SafetensorsFile::open(&base_path)?;
    let linear = linear_modules(&base)?;
    assert_eq!(
        linear.len(),
        1 + 2 * 6 + 1,
        "in_proj, 2×(q,k,v,o,up,down), lm_head"
    );
    for (name, cfg) in tinylm_configs() {
        let mut store = ParamStore::new();
        let model = init_adapter(&base, &cfg, &mut store, 5, &LoadOptions::default())?;
        let expect: Vec<String> = linear
            .iter()
            .map(|(m, _, _)| m.clone())
            .filter(|m| cfg.targets(m, true))
            .collect();
        assert_eq!(
            model
                .layers()
                .iter()
                .map(|l| l.name().to_string())
                .collect::<Vec<_>>(),
            expect,
            "{name}"
        );
        if name == "waveft" {
            for l in model.layers() {
                let w = l
                    .as_any()
                    .downcast_ref::<WaveFtLinear>()
                    .ok_or_else(err("a WaveFT layer"))?;
                let want = if l.name().ends_with("up_proj") { 30 } else { 12 };
                assert_eq!(w.config().n_frequency, want, "{}", l.name());
                // init_weights=true: a zero spectrum, an identity adapter.
                assert!(
                    store
                        .get(w.spectrum_id())?
                        .to_vec_f32()?
                        .iter()
                        .all(|v| *v == 0.0)
                );
            }
        }
        // WaveFT's ΔW moves by scaling (25) × lr per coefficient and step under Adam: a smaller lr.
        let lr = if name.starts_with("waveft") { 1e-3 } else { 5e-3 };
        let losses = train_layers(&model, &mut store, 30, lr)?;
        let first = losses[..3].iter().sum::<f32>() / 3.0;
        let last = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
        eprintln!("{name}: fresh adapter, loss {first} -> {last}");
        // A handful of steps on a target the adapter can only partly represent (WaveFT: ~10% of the
        // entries): the loss must go down, not to zero.
        assert!(
            last < 0.95 * first,
            "{name}: training did not reduce the loss ({first} -> {last})"
        );

        let dir = root.join(format!("sparse_{name}"));
        model.save(&store, &dir)?;
        let back = PeftAdapter::load(&dir, Device::Cpu)?;
        assert_eq!(back.num_trainable_params()?, model.num_trainable_params(&store)?);
        let mut store2 = ParamStore::new();
        let model2 = load_adapter(&base, &back, &mut store2, &LoadOptions::default())?;
        // What PEFT must reproduce: every adapted module's output on a fixed input, and the merged weights.
        let mut io: Vec<(String, TensorBytes)> = Vec::new();
        for (l, l2) in model.layers().iter().zip(model2.layers()) {
            let m = l.name();
            let x = Tensor::randn(&[4, l.in_features()], 1.0, 99, DType::F32, Device::Cpu)?;
            let y = l.forward_eval(&store, &x)?;
            let y2 = l2.forward_eval(&store2, &x)?;
            if name == "vblora_topk" {
                // Rebuilt from the top-k form: the same A and B up to the rounding of the stored weights.
                common::assert_close_scaled(
                    &y2.to_vec_f32()?,
                    &y.to_vec_f32()?,
                    1e-5,
                    &format!("{name} {m} reloaded"),
                );
            } else {
                assert_eq!(y2.to_vec_f32()?, y.to_vec_f32()?, "{name} {m} reloaded");
            }
            io.push((format!("{m}.input"), TensorBytes::from_tensor(&x)?));
            io.push((format!("{m}.output"), TensorBytes::from_tensor(&y2)?));
            io.push((
                format!("{m}.merged"),
                TensorBytes::from_tensor(&l2.merged_weight(&store2, DType::F32)?)?,
            ));
        }
        write_safetensors(dir.join("layer_io.safetensors"), &io, None)?;
        std::fs::write(dir.join("sparse.json"), r#"{"arch": "tinylm", "seed": 1}"#).unwrap();
        // For check_peft_roundtrip.py: the kind, and (VB-LoRA) the logits PEFT must rebuild.
        let kind = if name.starts_with("waveft") {
            "waveft"
        } else {
            "vblora"
        };
        std::fs::write(
            dir.join("roundtrip.json"),
            format!(r#"{{"kind": "{kind}", "fixture": "lora"}}"#),
        )
        .unwrap();
        if kind == "vblora" {
            let mut expect = vec![(
                VBLORA_BANK_KEY.to_string(),
                TensorBytes::from_tensor(store2.get(model2.bank().ok_or_else(err("bank"))?.id())?)?,
            )];
            for l in model2.layers() {
                let v = l
                    .as_any()
                    .downcast_ref::<VbLoraLinear>()
                    .ok_or_else(err("a VB-LoRA layer"))?;
                expect.push((
                    format!("{}.vblora_logits_A", l.name()),
                    TensorBytes::from_tensor(store2.get(v.logits_a_id())?)?,
                ));
                expect.push((
                    format!("{}.vblora_logits_B", l.name()),
                    TensorBytes::from_tensor(store2.get(v.logits_b_id())?)?,
                ));
            }
            write_safetensors(dir.join("expected.safetensors"), &expect, None)?;
        }
    }
    // Unsupported requests fail clearly.
    let mut bad = tinylm_configs().remove(0).1;
    bad.bias = "all".into();
    assert!(
        init_adapter(&base, &bad, &mut ParamStore::new(), 0, &LoadOptions::default())
            .unwrap_err()
            .to_string()
            .contains("bias")
    );
    let mut none = tinylm_configs().remove(0).1;
    none.target_modules = Some(TargetModules::Names(vec!["nothing".into()]));
    assert!(init_adapter(&base, &none, &mut ParamStore::new(), 0, &LoadOptions::default()).is_err());
    check_dir_clean(&root);
    Ok(())
}

fn check_dir_clean(root: &Path) {
    for e in std::fs::read_dir(root).unwrap().flatten() {
        if e.path().is_dir() {
            for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                assert!(
                    !f.file_name().to_string_lossy().starts_with(".tmp"),
                    "temp file left: {:?}",
                    f.path()
                );
            }
        }
    }
}

// ---------------------------------------------------------------- CLI

#[test]
fn inspect_adapter_shows_sparse_details() {
    let d = fixtures().join("sparse_layers");
    let o = run_peftk(&[
        "inspect-adapter".as_ref(),
        d.join("waveft_gpt/adapter").as_os_str(),
        "--base".as_ref(),
        d.join("waveft_gpt/base.safetensors").as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("wavelet sym2"), "{s}");
    assert!(s.contains("density") && s.contains("h.0.attn.c_attn"), "{s}");
    let o = run_peftk(&[
        "inspect-adapter".as_ref(),
        d.join("vblora_gpt_topk/adapter").as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("bank 12 x 6") && s.contains("topk 3"), "{s}");
    assert!(s.contains("LoRA-equivalent"), "{s}");
}
