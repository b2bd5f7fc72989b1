//! The candle backend (`--features candle`): every layer type on every base format gives candle's
//! backward pass the same input and adapter gradients as our tape (within 1e-5), candle-nn's AdamW trains
//! the adapter `Var`s and nothing else, strided inputs work, a shared VB-LoRA bank collects the gradient
//! of every layer that reads it, a PEFT adapter survives load -> train -> save -> load, and the
//! contiguous f32 path copies nothing at the boundary for every layer type (`boundary_copies`), also
//! across AdamW steps that update the `Var`s in place.

mod common;

use candle_core::{Module, Tensor as CTensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use common::{Base, LayerSet, make_base, one_layer_each};
use peft_kernels::adapters::AdapterLinear;
use peft_kernels::adapters::lora::{LoraConfig, LoraInit, LoraLinear};
use peft_kernels::adapters::vblora::{VbLoraBank, VbLoraConfig, VbLoraLinear, VbLoraOptions};
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::candle::{CandleAdapter, CandleLinear, QLoraLinear, boundary_copies};
use peft_kernels::{DType, Device, Tensor};

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const OUT: usize = 24;
const IN: usize = 40;

const BASES: [Base; 4] = [
    Base::Dense(DType::F32),
    Base::Nf4 {
        double: false,
        blocksize: 64,
    },
    Base::Nf4 {
        double: true,
        blocksize: 64,
    },
    Base::Fp4,
];

/// One layer of each adapter type on `base`, random (non-zero) adapter weights, a bias (VB-LoRA: none),
/// dropout where the method has it.
fn layers(base: Base, store: &mut ParamStore) -> R<Vec<Box<dyn AdapterLinear>>> {
    let set = LayerSet {
        prefix: "m",
        bases: [base; 4],
        biased: [true, true, true, false],
        n_frequency: 30,
    };
    Ok(one_layer_each(&set, OUT, IN, store, Device::Cpu)?)
}

fn candle_of(t: &Tensor) -> R<CTensor> {
    Ok(CTensor::from_vec(
        t.to_vec_f32()?,
        t.shape(),
        &candle_core::Device::Cpu,
    )?)
}

fn flat(t: &CTensor) -> R<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?)
}

/// `|a - b| <= tol · max(1, max|b|)` elementwise.
fn assert_near(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: candle {x} vs tape {y} (scale {scale})"
        );
    }
}

/// Gradient parity: for every base format and layer type, candle's backward of `sum(y ⊙ dy)` gives the
/// input and every adapter parameter the gradient our tape gives for output gradient `dy` (dropout on,
/// same step seed), within 1e-5; the outputs agree too.
#[test]
fn gradients_match_the_tape_for_every_layer_and_base() -> R<()> {
    for base in BASES {
        let mut store = ParamStore::new();
        let layers = layers(base, &mut store)?;
        let x = Tensor::randn(&[2, 3, IN], 1.0, 20, DType::F32, Device::Cpu)?;
        let dy = Tensor::randn(&[2, 3, OUT], 1.0, 21, DType::F32, Device::Cpu)?;
        let xid = store.insert("x", x.clone())?;
        for layer in &layers {
            let what = format!("{base:?} {}", layer.name());
            // Our tape.
            let mut tape = Tape::new();
            let xv = tape.param(&store, xid)?;
            let yv = layer.forward_t(&mut tape, &store, xv, Some(9))?;
            let grads = tape.backward_with(yv, dy.clone())?;
            // candle.
            let vars = VarMap::new();
            let cl = CandleLinear::from_layer(&**layer, &store, &vars, &candle_core::Device::Cpu)?;
            let cx = Var::from_tensor(&candle_of(&x)?)?;
            let cy = cl.forward_t(cx.as_tensor(), Some(9))?;
            assert_eq!(cy.dims(), &[2, 3, OUT], "{what}");
            assert_near(&flat(&cy)?, &tape.value(yv)?.to_vec_f32()?, 1e-6, &what);
            let loss = (&cy * candle_of(&dy)?)?.sum_all()?;
            let cg = loss.backward()?;
            let cdx = cg.get(cx.as_tensor()).ok_or("no candle dx")?;
            let tdx = grads.get(xid).ok_or("no tape dx")?;
            assert_near(&flat(cdx)?, &tdx.to_vec_f32()?, 1e-5, &format!("{what} dx"));
            // Every Var (VB-LoRA: the bank too) against the tape's gradient of the same parameter.
            let map = vars.data().lock().map_err(|_| "poisoned")?;
            assert_eq!(map.len(), cl.vars().len(), "{what}");
            for (name, var) in map.iter() {
                let id = store.find(name).ok_or("unknown var")?;
                let want = grads.get(id).ok_or("no tape gradient")?;
                let got = cg.get(var.as_tensor()).ok_or("no candle gradient")?;
                assert_eq!(got.dims(), want.shape(), "{what} {name}");
                assert_near(&flat(got)?, &want.to_vec_f32()?, 1e-5, &format!("{what} {name}"));
            }
        }
    }
    Ok(())
}

/// A strided (transposed) input gives the same output as its contiguous copy; `Module::forward` is the
/// dropout-free pass and equals `forward_eval`; the plain forward is our layer's own output bit for bit.
#[test]
fn strided_input_eval_and_plain_forward() -> R<()> {
    let mut store = ParamStore::new();
    let layers = layers(
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        &mut store,
    )?;
    let xt = Tensor::randn(&[IN, 5], 1.0, 30, DType::F32, Device::Cpu)?;
    let cxt = candle_of(&xt)?;
    let strided = cxt.t()?; // [5, IN], not contiguous
    assert!(!strided.is_contiguous());
    let x = strided.contiguous()?;
    let ours_x = Tensor::from_vec(flat(&x)?, &[5, IN], Device::Cpu)?;
    for layer in &layers {
        let vars = VarMap::new();
        let cl = CandleLinear::from_layer(&**layer, &store, &vars, &candle_core::Device::Cpu)?;
        let a = flat(&cl.forward(&strided)?)?;
        assert_eq!(a, flat(&cl.forward(&x)?)?, "{}", layer.name());
        assert_eq!(a, flat(&cl.forward_eval(&x)?)?, "{}", layer.name());
        assert_eq!(
            a,
            layer.forward_eval(&store, &ours_x)?.to_vec_f32()?,
            "{}",
            layer.name()
        );
    }
    Ok(())
}

/// Two VB-LoRA layers on one `VarMap` share the bank `Var`; its gradient is the sum of both layers'.
#[test]
fn shared_bank_gradient_sums_over_layers() -> R<()> {
    let mut store = ParamStore::new();
    let vc = VbLoraConfig {
        r: 2,
        num_vectors: 6,
        vector_length: 4,
        topk: 2,
    };
    let bank = VbLoraBank::new(&vc, 0.5, &mut store, 1, Device::Cpu)?;
    let vo = VbLoraOptions {
        dropout: 0.0,
        init_logits_std: 0.5,
    };
    let mk = |name: &str, base: Base, seed: u64, store: &mut ParamStore| -> R<VbLoraLinear> {
        let w = make_base(base, OUT, IN, seed, Device::Cpu)?;
        Ok(VbLoraLinear::new(name, w, None, &bank, &vo, store, seed + 1)?)
    };
    let first = mk("m.vblora", Base::Dense(DType::F32), 40, &mut store)?;
    let second = mk("m.vblora2", Base::Fp4, 42, &mut store)?;
    let dev = candle_core::Device::Cpu;
    let vars = VarMap::new();
    let l1 = CandleLinear::from_layer(&first, &store, &vars, &dev)?;
    let l2 = CandleLinear::from_layer(&second, &store, &vars, &dev)?;
    assert_eq!(vars.all_vars().len(), 5, "one bank, two logit pairs");
    let x = candle_of(&Tensor::randn(&[4, IN], 1.0, 42, DType::F32, Device::Cpu)?)?;
    let bank_var = l1.vars()[0].clone();
    let g = |l: &CandleLinear| -> R<Vec<f32>> {
        let gs = l.forward(&x)?.sqr()?.sum_all()?.backward()?;
        flat(gs.get(bank_var.as_tensor()).ok_or("no bank grad")?)
    };
    let (g1, g2) = (g(&l1)?, g(&l2)?);
    let both = (l1.forward(&x)?.sqr()?.sum_all()? + l2.forward(&x)?.sqr()?.sum_all()?)?;
    let gb = both.backward()?;
    let sum: Vec<f32> = g1.iter().zip(&g2).map(|(a, b)| a + b).collect();
    assert_near(
        &flat(gb.get(bank_var.as_tensor()).ok_or("no bank grad")?)?,
        &sum,
        1e-5,
        "bank",
    );
    Ok(())
}

/// candle-nn's AdamW on the layer's `Var`s lowers a regression loss; the frozen base stays frozen (the
/// output of the updated layer equals our layer run on the updated parameter values).
#[test]
fn adamw_trains_the_adapter_vars() -> R<()> {
    let mut store = ParamStore::new();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    let base = make_base(
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        OUT,
        IN,
        50,
        Device::Cpu,
    )?;
    let lora = LoraLinear::new("m.q", base, None, &cfg, &mut store, 51)?;
    let vars = VarMap::new();
    let dev = candle_core::Device::Cpu;
    let layer = peft_kernels::candle::QLoraLinear::new(lora.clone(), &store, &vars, &dev)?;
    let x = candle_of(&Tensor::randn(&[64, IN], 1.0, 52, DType::F32, Device::Cpu)?)?;
    let noise = candle_of(&Tensor::randn(&[64, OUT], 0.5, 53, DType::F32, Device::Cpu)?)?;
    let target = (layer.forward_eval(&x)? + noise)?;
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let loss = |l: &peft_kernels::candle::QLoraLinear| -> candle_core::Result<CTensor> {
        (l.forward_t(&x, None)? - &target)?.sqr()?.mean_all()
    };
    let first = loss(&layer)?.to_scalar::<f32>()?;
    for _ in 0..40 {
        opt.backward_step(&loss(&layer)?)?;
    }
    let last = loss(&layer)?.to_scalar::<f32>()?;
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    // Our layer with the trained values gives the candle layer's output.
    let mut trained = store;
    for (name, t) in layer.peft_tensors()? {
        let id = trained.find(&name).ok_or("unknown")?;
        trained.set(id, t)?;
    }
    let ours_x = Tensor::from_vec(flat(&x)?, &[64, IN], Device::Cpu)?;
    assert_eq!(
        flat(&layer.forward(&x)?)?,
        lora.forward_eval(&trained, &ours_x)?.to_vec_f32()?
    );
    Ok(())
}

/// A PEFT adapter on a bitsandbytes 4-bit checkpoint: init -> a training step -> save -> load gives
/// the trained layer's output back; `QLoraLinear::from_checkpoint` reads the same base.
#[test]
fn peft_adapter_round_trip_on_a_4bit_checkpoint() -> R<()> {
    use peft_kernels::io::peft::{AdapterConfig, MethodConfig, TargetModules};
    use peft_kernels::io::{SafetensorsFile, write_safetensors};
    use peft_kernels::quant::{QuantizeOptions, QuantizedTensor, io as qio};
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("model.safetensors");
    let mut entries = Vec::new();
    for (i, name) in ["enc.q", "enc.v"].iter().enumerate() {
        let w = Tensor::randn(&[OUT, IN * 2], 0.5, 60 + i as u64, DType::F32, Device::Cpu)?;
        let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default())?;
        entries.extend(qio::to_safetensors_entries(&q, &format!("{name}.weight"))?);
    }
    write_safetensors(&ckpt, &entries, None)?;
    let file = SafetensorsFile::open(&ckpt)?;
    let mut config = AdapterConfig::new(MethodConfig::Lora(Default::default()));
    config.target_modules = Some(TargetModules::Names(vec!["enc.q".into(), "enc.v".into()]));
    let dev = candle_core::Device::Cpu;
    let mut adapter = CandleAdapter::init(&file, &config, 7, &dev)?;
    assert_eq!(adapter.layers().len(), 2);
    let x = candle_of(&Tensor::randn(&[3, IN * 2], 1.0, 62, DType::F32, Device::Cpu)?)?;
    let q = adapter.layer("enc.q").ok_or("enc.q")?;
    let mut opt = AdamW::new(adapter.var_map().all_vars(), ParamsAdamW::default())?;
    opt.backward_step(&q.forward(&x)?.sqr()?.mean_all()?)?;
    let trained = flat(&q.forward(&x)?)?;
    let out = dir.path().join("adapter");
    adapter.save(&out)?;
    let back = CandleAdapter::load(&file, &out, &dev)?;
    assert_eq!(flat(&back.layer("enc.q").ok_or("enc.q")?.forward(&x)?)?, trained);
    // A fresh layer on the same 4-bit base: B = 0, so its output is the frozen base's.
    let fresh = peft_kernels::candle::QLoraLinear::from_checkpoint(
        &file,
        "enc.q",
        &LoraConfig::default(),
        1,
        &VarMap::new(),
        &dev,
    )?;
    let base_only = back
        .layer("enc.q")
        .ok_or("enc.q")?
        .layer()
        .base()
        .dequantize(DType::F32)?;
    let want = candle_of(&base_only)?;
    assert_near(
        &flat(&fresh.forward(&x)?)?,
        &flat(&x.matmul(&want.t()?)?)?,
        1e-4,
        "fresh layer",
    );
    Ok(())
}

/// Zero copy: a LoRA/QLoRA step (forward with dropout, candle's backward of the input and of A and B)
/// and an evaluation forward on contiguous f32 tensors book no copy at the boundary, on every base
/// format and at a decode-sized and a batch-sized token count. The counter sees the copies that do
/// happen: a strided input (one copy to make it contiguous) and bf16 adapter weights (the general
/// path, which copies the operands in). Both still give the tape's gradients.
#[test]
fn lora_contiguous_path_copies_nothing() -> R<()> {
    let dev = candle_core::Device::Cpu;
    for base in BASES {
        for tokens in [3, 37] {
            let mut store = ParamStore::new();
            let lora = layers(base, &mut store)?.remove(0);
            assert!(lora.name().ends_with("lora"), "{}", lora.name());
            let vars = VarMap::new();
            let cl = CandleLinear::from_layer(&*lora, &store, &vars, &dev)?;
            let x = Tensor::randn(&[tokens, IN], 1.0, 70, DType::F32, Device::Cpu)?;
            let dy = candle_of(&Tensor::randn(&[tokens, OUT], 1.0, 71, DType::F32, Device::Cpu)?)?;
            let cx = Var::from_tensor(&candle_of(&x)?)?;
            let what = format!("{base:?} tokens {tokens}");
            let before = boundary_copies();
            let y = cl.forward_t(cx.as_tensor(), Some(3))?;
            let _ = cl.forward_eval(cx.as_tensor())?;
            let after_fwd = boundary_copies();
            let loss = (&y * &dy)?.sum_all()?;
            let grads = loss.backward()?;
            let after = boundary_copies();
            assert_eq!(after_fwd, before, "{what}: forward copied");
            assert_eq!(after, before, "{what}: backward copied");
            assert!(grads.get(cx.as_tensor()).is_some(), "{what}: no dx");
            for v in cl.vars() {
                assert!(grads.get(v.as_tensor()).is_some(), "{what}: no adapter gradient");
            }
        }
    }
    // A strided input: one copy (candle's `contiguous`), booked.
    let mut store = ParamStore::new();
    let lora = layers(Base::Fp4, &mut store)?.remove(0);
    let cl = CandleLinear::from_layer(&*lora, &store, &VarMap::new(), &dev)?;
    let xt = candle_of(&Tensor::randn(&[IN, 5], 1.0, 72, DType::F32, Device::Cpu)?)?;
    let before = boundary_copies();
    let _ = cl.forward(&xt.t()?)?;
    let after = boundary_copies();
    assert_eq!(after.copies - before.copies, 1, "strided input");
    assert_eq!(
        after.bytes - before.bytes,
        (5 * IN * 4) as u64,
        "strided input bytes"
    );
    Ok(())
}

/// Zero copy for the other layer types: a DoRA, WaveFT and VB-LoRA step (forward with dropout,
/// candle's backward of the input and of every adapter `Var`) and an evaluation forward on contiguous
/// f32 tensors book no copy at the boundary, on a dense and on every 4-bit base, at a decode-sized and a
/// batch-sized token count: the input, the output gradient and the parameters are read in place (the
/// parameters are no longer packed by `cat`), and the counter includes any copy our layers make of a
/// borrowed candle buffer. A strided input still books exactly its one copy. (Gradient parity on this
/// path is `gradients_match_the_tape_for_every_layer_and_base`.)
#[test]
fn dora_waveft_vblora_contiguous_path_copies_nothing() -> R<()> {
    let dev = candle_core::Device::Cpu;
    for base in BASES {
        for tokens in [3, 37] {
            let mut store = ParamStore::new();
            let all = layers(base, &mut store)?;
            for layer in &all[1..] {
                let what = format!("{base:?} {} tokens {tokens}", layer.name());
                let vars = VarMap::new();
                let cl = CandleLinear::from_layer(&**layer, &store, &vars, &dev)?;
                let x = Tensor::randn(&[tokens, IN], 1.0, 90, DType::F32, Device::Cpu)?;
                let dy = candle_of(&Tensor::randn(&[tokens, OUT], 1.0, 91, DType::F32, Device::Cpu)?)?;
                let cx = Var::from_tensor(&candle_of(&x)?)?;
                let before = boundary_copies();
                let y = cl.forward_t(cx.as_tensor(), Some(3))?;
                let _ = cl.forward_eval(cx.as_tensor())?;
                let after_fwd = boundary_copies();
                let loss = (&y * &dy)?.sum_all()?;
                let grads = loss.backward()?;
                let after = boundary_copies();
                assert_eq!(after_fwd, before, "{what}: forward copied");
                assert_eq!(after, before, "{what}: backward copied");
                assert!(grads.get(cx.as_tensor()).is_some(), "{what}: no dx");
                assert!(!cl.vars().is_empty(), "{what}");
                for v in cl.vars() {
                    assert!(grads.get(v.as_tensor()).is_some(), "{what}: no adapter gradient");
                }
            }
        }
    }
    // Strided inputs: one copy each (candle's `contiguous`), booked.
    let mut store = ParamStore::new();
    let all = layers(Base::Dense(DType::F32), &mut store)?;
    let xt = candle_of(&Tensor::randn(&[IN, 5], 1.0, 92, DType::F32, Device::Cpu)?)?;
    for layer in &all[1..] {
        let cl = CandleLinear::from_layer(&**layer, &store, &VarMap::new(), &dev)?;
        let before = boundary_copies();
        let _ = cl.forward(&xt.t()?)?;
        let after = boundary_copies();
        assert_eq!(after.copies - before.copies, 1, "{} strided input", layer.name());
        assert_eq!(
            after.bytes - before.bytes,
            (5 * IN * 4) as u64,
            "{} strided input bytes",
            layer.name()
        );
    }
    Ok(())
}

/// bf16 activations on the in-place path: a bf16 input with f32 adapter `Var`s over an NF4 base crosses
/// without a copy
/// (the input and `dy` are read in place as bf16, dx comes back in bf16, the parameter gradients in the
/// `Var`s' f32), and the gradients equal the tape's on the same bf16 input.
#[test]
fn bf16_activations_cross_without_copies() -> R<()> {
    let dev = candle_core::Device::Cpu;
    let mut store = ParamStore::new();
    // A 4-bit base (a dense base must be in the activation dtype).
    let all = layers(
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        &mut store,
    )?;
    let x = Tensor::randn(&[2, 3, IN], 1.0, 95, DType::F32, Device::Cpu)?.to_dtype(DType::BF16)?;
    let dy = Tensor::randn(&[2, 3, OUT], 1.0, 96, DType::F32, Device::Cpu)?.to_dtype(DType::BF16)?;
    let xid = store.insert("x", x.clone())?;
    let bf = |t: &Tensor| -> R<CTensor> { Ok(candle_of(t)?.to_dtype(candle_core::DType::BF16)?) };
    for layer in &all[1..] {
        let what = layer.name().to_string();
        let mut tape = Tape::new();
        let xv = tape.param(&store, xid)?;
        let yv = layer.forward_t(&mut tape, &store, xv, Some(5))?;
        let tg = tape.backward_with(yv, dy.clone())?;
        let vars = VarMap::new();
        let cl = CandleLinear::from_layer(&**layer, &store, &vars, &dev)?;
        let cx = Var::from_tensor(&bf(&x)?)?;
        let cdy = bf(&dy)?;
        let before = boundary_copies();
        let cy = cl.forward_t(cx.as_tensor(), Some(5))?;
        let cg = (&cy * &cdy)?.sum_all()?.backward()?;
        assert_eq!(boundary_copies(), before, "{what}: copied");
        assert_eq!(cy.dtype(), candle_core::DType::BF16, "{what}");
        assert_near(&flat(&cy)?, &tape.value(yv)?.to_vec_f32()?, 1e-6, &what);
        let cdx = cg.get(cx.as_tensor()).ok_or("no dx")?;
        assert_eq!(cdx.dtype(), candle_core::DType::BF16, "{what} dx");
        let tdx = tg.get(xid).ok_or("no tape dx")?;
        assert_near(&flat(cdx)?, &tdx.to_vec_f32()?, 1e-5, &format!("{what} dx"));
        let map = vars.data().lock().map_err(|_| "poisoned")?;
        for (name, var) in map.iter() {
            let got = cg.get(var.as_tensor()).ok_or("no grad")?;
            let want = tg.get(store.find(name).ok_or("unknown")?).ok_or("no tape grad")?;
            assert_near(&flat(got)?, &want.to_vec_f32()?, 1e-5, &format!("{what} {name}"));
        }
    }
    Ok(())
}

/// Training on the in-place path: candle-nn's AdamW updates the DoRA / WaveFT / VB-LoRA `Var`s in place
/// (`Var::set`) between calls while the previous steps' graphs (which borrowed those buffers) are still
/// alive; every step books no copy, the loss falls, and the trained layer's output is our layer's on the
/// trained values (so each step read the values of that step).
#[test]
fn adamw_steps_on_the_in_place_path_copy_nothing() -> R<()> {
    let dev = candle_core::Device::Cpu;
    let mut store = ParamStore::new();
    let all = layers(
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        &mut store,
    )?;
    let xs = Tensor::randn(&[32, IN], 1.0, 93, DType::F32, Device::Cpu)?;
    let x = candle_of(&xs)?;
    for layer in &all[1..] {
        let vars = VarMap::new();
        let cl = CandleLinear::from_layer(&**layer, &store, &vars, &dev)?;
        let noise = candle_of(&Tensor::randn(&[32, OUT], 0.5, 94, DType::F32, Device::Cpu)?)?;
        let target = (cl.forward_eval(&x)? + noise)?;
        let mut opt = AdamW::new(
            vars.all_vars(),
            ParamsAdamW {
                lr: 1e-2,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let loss = |l: &CandleLinear| -> candle_core::Result<CTensor> {
            (l.forward_t(&x, Some(1))? - &target)?.sqr()?.mean_all()
        };
        let first = loss(&cl)?.to_scalar::<f32>()?;
        let before = boundary_copies();
        let mut kept = Vec::new();
        for _ in 0..30 {
            let l = loss(&cl)?;
            opt.backward_step(&l)?;
            kept.push(l); // the graph (and its borrowed views) outlives the in-place update
        }
        assert_eq!(boundary_copies(), before, "{}: a step copied", layer.name());
        drop(kept);
        let last = loss(&cl)?.to_scalar::<f32>()?;
        // The target is the initial output plus noise, so the loss starts near the noise floor; WaveFT
        // (30 coefficients) can fit little of it. Falling is what matters here.
        assert!(last < first, "{}: loss {first} -> {last}", layer.name());
        // Each layer has its own parameters, so writing the trained values into the shared store
        // leaves the other layers as they were.
        for (name, t) in cl.peft_tensors()? {
            let id = store.find(&name).ok_or("unknown")?;
            store.set(id, t)?;
        }
        assert_near(
            &flat(&cl.forward(&x)?)?,
            &layer.forward_eval(&store, &xs)?.to_vec_f32()?,
            1e-6,
            layer.name(),
        );
    }
    Ok(())
}

/// bf16 adapter weights take the general (copying) path; its gradients still equal the tape's.
#[test]
fn bf16_lora_takes_the_general_path() -> R<()> {
    let dev = candle_core::Device::Cpu;
    let mut store = ParamStore::new();
    let cfg = LoraConfig {
        r: 3,
        alpha: 5.0,
        dropout: 0.25,
        init: LoraInit::Random,
        dtype: DType::BF16,
        ..LoraConfig::default()
    };
    let base = make_base(
        Base::Nf4 {
            double: true,
            blocksize: 64,
        },
        OUT,
        IN,
        80,
        Device::Cpu,
    )?;
    let lora = LoraLinear::new("m.lora16", base, None, &cfg, &mut store, 81)?;
    let x = Tensor::randn(&[5, IN], 1.0, 82, DType::F32, Device::Cpu)?;
    let dy = Tensor::randn(&[5, OUT], 1.0, 83, DType::F32, Device::Cpu)?;
    let xid = store.insert("x", x.clone())?;
    let mut tape = Tape::new();
    let xv = tape.param(&store, xid)?;
    let yv = lora.forward_t(&mut tape, &store, xv, Some(4))?;
    let tg = tape.backward_with(yv, dy.clone())?;
    let vars = VarMap::new();
    let cl = QLoraLinear::new(lora.clone(), &store, &vars, &dev)?;
    let cx = Var::from_tensor(&candle_of(&x)?)?;
    let before = boundary_copies();
    let cy = cl.forward_t(cx.as_tensor(), Some(4))?;
    let cg = (&cy * candle_of(&dy)?)?.sum_all()?.backward()?;
    assert!(
        boundary_copies().copies > before.copies,
        "the general path copies"
    );
    assert_near(&flat(&cy)?, &tape.value(yv)?.to_vec_f32()?, 1e-6, "bf16 y");
    assert_near(
        &flat(cg.get(cx.as_tensor()).ok_or("dx")?)?,
        &tg.get(xid).ok_or("tape dx")?.to_vec_f32()?,
        1e-5,
        "bf16 dx",
    );
    for (v, name) in cl.vars().iter().zip(cl.var_names()) {
        let got = cg.get(v.as_tensor()).ok_or("no grad")?;
        assert_eq!(got.dtype(), candle_core::DType::BF16, "{name}");
        let want = tg.get(store.find(name).ok_or("unknown")?).ok_or("no tape grad")?;
        // The tape's gradient is f32; candle's is rounded to the Var's bf16.
        let want = want.to_dtype(DType::BF16)?.to_vec_f32()?;
        assert_near(&flat(got)?, &want, 1e-5, name);
    }
    Ok(())
}
