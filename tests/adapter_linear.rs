//! The `AdapterLinear` trait: one slot type for every method and for frozen layers. The trait's tape-free
//! forward / backward against the tape's values and gradients, `FrozenLinear` against f64 math, merged and
//! unmerged weights against the base, the save form against the store, and contexts of the wrong layer.

mod common;

use common::{Base, LayerSet, assert_close, f64s, make_base, mm, one_layer_each, to32, tr};
use peft_kernels::adapters::dora::DoraLinear;
use peft_kernels::adapters::{AdapterLinear, FrozenLinear};
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::io::peft::AdapterMethod;
use peft_kernels::qmatmul::BaseWeight;
use peft_kernels::{DType, Device, Error, Result, Tensor};

const OUT: usize = 12;
const IN: usize = 8;

fn bias(seed: u64, dev: Device) -> Result<Option<Tensor>> {
    Tensor::randn(&[OUT], 0.3, seed, DType::F32, dev).map(Some)
}

/// One layer of every kind on `[OUT, IN]` bases (dense and NF4), random adapter weights, dropout where
/// the method has it, and a frozen layer.
fn every_layer(dev: Device, store: &mut ParamStore) -> Result<Vec<Box<dyn AdapterLinear>>> {
    let nf4 = Base::Nf4 {
        double: true,
        blocksize: 64,
    };
    let dense = Base::Dense(DType::F32);
    let set = LayerSet {
        prefix: "l",
        bases: [nf4, dense, nf4, dense],
        biased: [true, true, false, true],
        n_frequency: 10,
    };
    let mut layers = one_layer_each(&set, OUT, IN, store, dev)?;
    layers.push(Box::new(FrozenLinear::new(
        "l.frozen",
        make_base(nf4, OUT, IN, 14, dev)?,
        bias(15, dev)?,
    )?));
    Ok(layers)
}

/// The trait's tape-free forward and backward give exactly the values and gradients the tape records,
/// for every kind, with dropout active.
fn trait_passes_match_the_tape(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let layers = every_layer(dev, &mut store)?;
    let x = Tensor::randn(&[2, 3, IN], 1.0, 20, DType::F32, dev)?;
    let dy = Tensor::randn(&[2, 3, OUT], 1.0, 21, DType::F32, dev)?;
    let xid = store.insert("x", x.clone())?;
    let methods: Vec<Option<AdapterMethod>> = layers.iter().map(|l| l.method()).collect();
    assert_eq!(
        methods,
        [
            Some(AdapterMethod::Lora),
            Some(AdapterMethod::Dora),
            Some(AdapterMethod::WaveFt),
            Some(AdapterMethod::VbLora),
            None
        ]
    );
    for layer in &layers {
        let name = layer.name();
        assert_eq!((layer.in_features(), layer.out_features()), (IN, OUT), "{name}");
        let (y, ctx) = layer.forward(&store, &x, Some(3))?;
        let g = layer.backward(&store, &ctx, &dy, true)?;
        let mut tape = Tape::new();
        let xv = tape.param(&store, xid)?;
        let yv = layer.forward_t(&mut tape, &store, xv, Some(3))?;
        assert_eq!(y.to_vec_f32()?, tape.value(yv)?.to_vec_f32()?, "{name}: y");
        let grads = tape.backward_with(yv, dy.clone())?;
        let dx = g.dx.ok_or_else(|| Error::InvalidArgument("no dx".into()))?;
        assert_eq!(dx.shape(), x.shape(), "{name}");
        let tape_dx = grads
            .get(xid)
            .ok_or_else(|| Error::InvalidArgument("no tape dx".into()))?;
        assert_eq!(dx.to_vec_f32()?, tape_dx.to_vec_f32()?, "{name}: dx");
        // Every parameter the layer trains has a gradient (VB-LoRA: plus the shared bank).
        let ids: Vec<_> = g.params.iter().map(|(id, _)| *id).collect();
        for id in layer.param_ids() {
            assert!(ids.contains(&id), "{name}: no gradient for {}", store.name(id)?);
        }
        for (id, gp) in &g.params {
            assert_eq!(gp.shape(), store.get(*id)?.shape(), "{name}");
            let want = grads
                .get(*id)
                .ok_or_else(|| Error::InvalidArgument("no tape gradient".into()))?;
            assert_eq!(
                gp.to_vec_f32()?,
                want.to_vec_f32()?,
                "{name}: {}",
                store.name(*id)?
            );
        }
        // Evaluation: no dropout, the same output as a forward without a step seed.
        let ye = layer.forward_eval(&store, &x)?;
        assert_eq!(
            ye.to_vec_f32()?,
            layer.forward(&store, &x, None)?.0.to_vec_f32()?,
            "{name}"
        );
        // Without dx the parameter gradients do not change.
        let g2 = layer.backward(&store, &ctx, &dy, false)?;
        assert!(g2.dx.is_none(), "{name}");
        for ((_, a), (_, b)) in g.params.iter().zip(&g2.params) {
            assert_eq!(a.to_vec_f32()?, b.to_vec_f32()?, "{name}");
        }
    }
    Ok(())
}

/// `FrozenLinear`: `y = x·Wᵀ + b` and `dx = dy·W` against f64 math from the dequantized W.
fn frozen_linear_against_f64(dev: Device) -> Result<()> {
    for (base, with_bias) in [
        (Base::Dense(DType::F32), true),
        (
            Base::Nf4 {
                double: false,
                blocksize: 64,
            },
            false,
        ),
        (Base::Fp4, true),
    ] {
        let (t, out, inp) = (7, 5, 66);
        let w = make_base(base, out, inp, 30, dev)?;
        let b = if with_bias {
            Some(Tensor::randn(&[out], 0.5, 31, DType::F32, dev)?)
        } else {
            None
        };
        let layer = FrozenLinear::new("frozen", w, b.clone())?;
        assert_eq!(layer.num_trainable_params(), 0);
        assert!(layer.param_ids().is_empty());
        let store = ParamStore::new();
        let x = Tensor::randn(&[t, 1, inp], 1.0, 32, DType::F32, dev)?;
        let dy = Tensor::randn(&[t, 1, out], 1.0, 33, DType::F32, dev)?;
        let (y, ctx) = layer.forward(&store, &x, Some(1))?;
        let g = layer.backward(&store, &ctx, &dy, true)?;
        let wf = f64s(&layer.base().dequantize(DType::F32)?)?;
        let mut want = mm(&f64s(&x)?, &tr(&wf, out, inp), t, inp, out);
        if let Some(b) = &b {
            let b = f64s(b)?;
            for (i, v) in want.iter_mut().enumerate() {
                *v += b[i % out];
            }
        }
        assert_eq!(y.shape(), &[t, 1, out]);
        assert_close(&y.to_vec_f32()?, &to32(&want), 1e-5, 1e-5, "frozen y");
        let dx = g.dx.ok_or_else(|| Error::InvalidArgument("no dx".into()))?;
        assert_eq!(dx.shape(), x.shape());
        let want_dx = mm(&f64s(&dy)?, &wf, t, out, inp);
        assert_close(&dx.to_vec_f32()?, &to32(&want_dx), 1e-5, 1e-5, "frozen dx");
        assert!(g.params.is_empty());
        // On the tape only x gets a gradient.
        let mut ps = ParamStore::new();
        let xid = ps.insert("x", x.clone())?;
        let mut tape = Tape::new();
        let xv = tape.param(&ps, xid)?;
        let yv = layer.forward_t(&mut tape, &ps, xv, None)?;
        let grads = tape.backward_with(yv, dy.clone())?;
        let tdx = grads
            .get(xid)
            .ok_or_else(|| Error::InvalidArgument("no tape dx".into()))?;
        assert_eq!(tdx.to_vec_f32()?, dx.to_vec_f32()?);
        // No adapter: ΔW = 0 and the merged weight is the base.
        assert!(
            layer
                .delta_weight(&store)?
                .to_vec_f32()?
                .iter()
                .all(|&v| v == 0.0)
        );
        let merged = layer.merged_weight(&store, DType::F32)?.to_vec_f32()?;
        assert_close(&merged, &to32(&wf), 0.0, 0.0, "frozen merge");
        // Bad shapes are errors.
        assert!(
            layer
                .forward(&store, &Tensor::zeros(&[2, inp + 1], DType::F32, dev)?, None)
                .is_err()
        );
        assert!(
            layer
                .backward(&store, &ctx, &Tensor::zeros(&[t, out], DType::F32, dev)?, true)
                .is_err()
        );
    }
    let w = make_base(Base::Dense(DType::F32), 4, 3, 0, dev)?;
    let bad_bias = Tensor::zeros(&[3], DType::F32, dev)?;
    assert!(matches!(
        FrozenLinear::new("f", w, Some(bad_bias)),
        Err(Error::Shape { .. })
    ));
    Ok(())
}

/// `merged_weight = W + ΔW` and `unmerged_weight` undoes it, for every kind (DoRA's ΔW is
/// multiplicative: it is checked against its own row-norm formula).
fn merge_and_unmerge(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let layers = every_layer(dev, &mut store)?;
    for layer in &layers {
        let name = layer.name();
        let w = f64s(&layer.base().dequantize(DType::F32)?)?;
        let delta = f64s(&layer.delta_weight(&store)?)?;
        let merged = layer.merged_weight(&store, DType::F32)?;
        assert_eq!(merged.shape(), &[OUT, IN], "{name}");
        let want: Vec<f64> = w.iter().zip(&delta).map(|(a, b)| a + b).collect();
        assert_close(&merged.to_vec_f32()?, &to32(&want), 1e-5, 1e-5, name);
        let back = layer.unmerged_weight(&store, &BaseWeight::Dense(merged))?;
        assert_close(&back.to_vec_f32()?, &to32(&w), 1e-4, 1e-4, name);
        if layer.method().is_some() {
            assert!(
                delta.iter().any(|&v| v.abs() > 1e-3),
                "{name}: a random adapter has a nonzero ΔW"
            );
        }
        let wrong = BaseWeight::Dense(Tensor::zeros(&[OUT + 1, IN], DType::F32, dev)?);
        assert!(layer.unmerged_weight(&store, &wrong).is_err(), "{name}");
    }
    // DoRA: W' = (m / ‖W + sBA‖_row) ⊙ (W + sBA), from the layer's own parameters in f64.
    let dora = layers[1]
        .as_any()
        .downcast_ref::<DoraLinear>()
        .ok_or_else(|| Error::InvalidArgument("layer 1 is DoRA".into()))?;
    let w = f64s(&dora.base().dequantize(DType::F32)?)?;
    let a = f64s(store.get(dora.a_id())?)?;
    let b = f64s(store.get(dora.b_id())?)?;
    let m = f64s(store.get(dora.m_id())?)?;
    let ba = mm(&b, &a, OUT, dora.rank(), IN);
    let s = f64::from(dora.scaling());
    let mut want = vec![0f64; OUT * IN];
    for o in 0..OUT {
        let row: Vec<f64> = (0..IN).map(|i| w[o * IN + i] + s * ba[o * IN + i]).collect();
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        for i in 0..IN {
            want[o * IN + i] = m[o] / n * row[i];
        }
    }
    assert_close(
        &dora.merged_weight(&store, DType::F32)?.to_vec_f32()?,
        &to32(&want),
        1e-5,
        1e-5,
        "dora merge",
    );
    Ok(())
}

/// The save form is every trained parameter under its adapter-file key, on the CPU, and the trainable
/// count is their size.
fn save_form_is_the_parameters(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let layers = every_layer(dev, &mut store)?;
    let want_keys = [
        vec![
            "base_model.model.l.lora.lora_A.weight",
            "base_model.model.l.lora.lora_B.weight",
        ],
        vec![
            "base_model.model.l.dora.lora_A.weight",
            "base_model.model.l.dora.lora_B.weight",
            "base_model.model.l.dora.lora_magnitude_vector",
        ],
        vec!["base_model.model.l.waveft.waveft_spectrum"],
        vec![
            "base_model.model.l.vblora.vblora_logits_A",
            "base_model.model.l.vblora.vblora_logits_B",
        ],
        vec![],
    ];
    for (layer, want) in layers.iter().zip(want_keys) {
        let saved = layer.save_tensors(&store)?;
        let keys: Vec<&str> = saved.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, want, "{}", layer.name());
        let mut n = 0;
        for ((_, t), id) in saved.iter().zip(layer.param_ids()) {
            assert_eq!(t.device(), Device::Cpu);
            assert_eq!(t.to_vec_f32()?, store.get(id)?.to_vec_f32()?);
            n += t.numel();
        }
        assert_eq!(layer.num_trainable_params(), n, "{}", layer.name());
    }
    Ok(())
}

/// A context from one layer type passed to another is an error, not a panic; a boxed layer clones.
fn wrong_context_is_an_error(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let mut layers = every_layer(dev, &mut store)?;
    let x = Tensor::randn(&[4, IN], 1.0, 40, DType::F32, dev)?;
    let dy = Tensor::randn(&[4, OUT], 1.0, 41, DType::F32, dev)?;
    for (i, from) in layers.iter().enumerate() {
        let (_, ctx) = from.forward(&store, &x, None)?;
        for (j, to) in layers.iter().enumerate() {
            let r = to.backward(&store, &ctx, &dy, true);
            if i == j {
                assert!(r.is_ok(), "{}", to.name());
            } else {
                assert!(
                    matches!(r, Err(Error::InvalidArgument(_))),
                    "{} <- {}",
                    to.name(),
                    from.name()
                );
            }
        }
    }
    let copy = layers.clone();
    for l in &mut layers {
        l.set_algo(peft_kernels::qmatmul::Algo::DequantGemm);
    }
    for (a, b) in copy.iter().zip(&layers) {
        assert_eq!(a.name(), b.name());
        let ya = a.forward_eval(&store, &x)?.to_vec_f32()?;
        let yb = b.forward_eval(&store, &x)?.to_vec_f32()?;
        assert_close(&ya, &yb, 1e-4, 1e-4, a.name());
    }
    Ok(())
}

device_test!(
    trait_passes_match_the_tape,
    frozen_linear_against_f64,
    merge_and_unmerge,
    save_form_is_the_parameters,
    wrong_context_is_an_error,
);
