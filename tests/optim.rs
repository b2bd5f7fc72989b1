//! AdamW against torch.optim.AdamW (fixture from tests/fixtures/gen_adamw.py), against an f64
//! reference on random tensors, CUDA against the CPU (bit for bit), half parameters, and validation.

mod common;

use common::assert_close;
use half::{bf16, f16};
use peft_kernels::autograd::{Gradients, ParamId, ParamStore};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::rng::Rng;
use peft_kernels::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/adamw_torch.json");

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn torch_fixture(dev: Device) -> Result<()> {
    let fx: Value = serde_json::from_str(FIXTURE).expect("fixture parses");
    let cases = fx["cases"].as_object().expect("cases");
    assert_eq!(cases.len(), 2);
    for (case, c) in cases {
        let cfg = AdamWConfig {
            lr: c["lr"].as_f64().unwrap() as f32,
            beta1: c["beta1"].as_f64().unwrap() as f32,
            beta2: c["beta2"].as_f64().unwrap() as f32,
            eps: c["eps"].as_f64().unwrap() as f32,
            weight_decay: c["weight_decay"].as_f64().unwrap() as f32,
        };
        if case == "default" {
            let d = AdamWConfig::default();
            assert_eq!(
                (cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay),
                (d.lr, d.beta1, d.beta2, d.eps, d.weight_decay),
                "Default matches torch.optim.AdamW's defaults"
            );
        }
        let mut store = ParamStore::new();
        let mut ids: Vec<(String, ParamId)> = Vec::new();
        for (name, shape) in c["shapes"].as_object().unwrap() {
            let shape: Vec<usize> = shape
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let init = floats(&c["init"][name]);
            let id = store.insert(name.clone(), Tensor::from_slice(&init, &shape, dev)?)?;
            ids.push((name.clone(), id));
        }
        let mut opt = AdamW::new(cfg)?;
        for (k, step) in c["steps"].as_array().unwrap().iter().enumerate() {
            let mut grads = Gradients::new();
            for (name, id) in &ids {
                if let Some(g) = step["grads"].get(name) {
                    let shape = store.get(*id)?.shape().to_vec();
                    grads.insert_or_add(*id, Tensor::from_slice(&floats(g), &shape, dev)?)?;
                }
            }
            opt.step(&mut store, &grads)?;
            for (name, id) in &ids {
                let got = store.get(*id)?.to_vec::<f32>()?;
                let want = floats(&step["params"][name]);
                // The hyperparameters are f32 here and f64 in Python (e.g. 1 - 0.999 differs in the
                // 5th digit), which moves the parameters by ~1e-9: 1e-6 relative is ample and still
                // ~1000x tighter than one missing bias correction or a coupled weight decay.
                assert_close(&got, &want, 1e-6, 1e-8, &format!("{case} step {} {name}", k + 1));
            }
        }
        // "c" got no gradient in step 3: it has taken 4 steps, the others 5 (torch's per-parameter
        // step count).
        let steps: Vec<u64> = ids.iter().map(|(_, id)| opt.state(*id).unwrap().2).collect();
        assert_eq!(steps, vec![5, 5, 4], "{case}");
        assert_eq!(opt.steps(), 5);
    }
    Ok(())
}

/// AdamW in f64: `p ← p(1 - lr·wd)`, `m ← β1 m + (1-β1) g`, `v ← β2 v + (1-β2) g²`,
/// `p ← p - lr · m̂ / (√v̂ + eps)` with `m̂ = m/(1-β1^t)`, `v̂ = v/(1-β2^t)`.
struct Reference {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Reference {
    fn new(p: &[f32]) -> Self {
        Reference {
            p: p.iter().map(|&x| x as f64).collect(),
            m: vec![0.0; p.len()],
            v: vec![0.0; p.len()],
            t: 0,
        }
    }

    fn step(&mut self, g: &[f32], c: &AdamWConfig, round: Option<DType>) {
        self.t += 1;
        let (lr, b1, b2, eps, wd) = (
            c.lr as f64,
            c.beta1 as f64,
            c.beta2 as f64,
            c.eps as f64,
            c.weight_decay as f64,
        );
        let (bc1, bc2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for i in 0..self.p.len() {
            let g = g[i] as f64;
            let mut p = self.p[i] * (1.0 - lr * wd);
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            p -= lr * (self.m[i] / bc1) / ((self.v[i] / bc2).sqrt() + eps);
            self.p[i] = match round {
                Some(DType::BF16) => bf16::from_f64(p).to_f64(),
                Some(DType::F16) => f16::from_f64(p).to_f64(),
                _ => p,
            };
        }
    }
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Runs `steps` AdamW steps on one parameter of `n` elements and the f64 reference side by side.
fn run_against_reference(
    n: usize,
    cfg: &AdamWConfig,
    steps: usize,
    gscale: f32,
    seed: u64,
    dtype: DType,
    dev: Device,
) -> Result<()> {
    let init = Tensor::randn(&[n], 1.0, seed, dtype, Device::Cpu)?;
    let mut reference = Reference::new(&init.to_vec_f32()?);
    let mut store = ParamStore::new();
    let id = store.insert("p", init.to_device(dev)?)?;
    let mut opt = AdamW::new(cfg.clone())?;
    let mut rng = Rng::new(seed ^ 0xABCD);
    for s in 0..steps {
        let mut g: Vec<f32> = rng.normal_vec(n).iter().map(|x| x * gscale).collect();
        g[0] = 0.0; // an exact zero (m and v stay 0 in step 1: no 0/0)
        let mut grads = Gradients::new();
        grads.insert_or_add(id, Tensor::from_slice(&g, &[n], dev)?)?;
        opt.step(&mut store, &grads)?;
        reference.step(&g, cfg, Some(dtype));
        let what = format!("n={n} step {} {dtype}", s + 1);
        let (m, v, t) = opt.state(id).expect("state");
        assert_eq!(t, s as u64 + 1);
        assert_eq!((m.dtype(), v.dtype(), m.device()), (DType::F32, DType::F32, dev));
        // m = β1·m + (1-β1)·g cancels where g changes sign: the error of such an element is relative
        // to the terms, not to the result, hence an absolute floor scaled by the largest |m|.
        let (mr, vr) = (f32s(&reference.m), f32s(&reference.v));
        let mmax = mr.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert_close(&m.to_vec::<f32>()?, &mr, 1e-5, 1e-6 * mmax, &format!("{what} m"));
        assert_close(&v.to_vec::<f32>()?, &vr, 1e-5, 1e-30, &format!("{what} v"));
        let p = store.get(id)?;
        assert_eq!(p.dtype(), dtype);
        match dtype {
            // f32 parameters: a few ulps of p plus a few ulps of the update.
            DType::F32 => assert_close(&p.to_vec::<f32>()?, &f32s(&reference.p), 2e-6, 1e-7, &what),
            // Half parameters round once per step; the f32 and f64 updates may land on different
            // sides of a rounding boundary, so allow one ulp of the half type.
            DType::BF16 => assert_close(&p.to_vec_f32()?, &f32s(&reference.p), 1.0 / 128.0, 1e-6, &what),
            _ => assert_close(&p.to_vec_f32()?, &f32s(&reference.p), 1.0 / 1024.0, 1e-7, &what),
        }
    }
    assert_eq!(opt.state_bytes(), 8 * n);
    Ok(())
}

fn matches_f64_reference(dev: Device) -> Result<()> {
    let cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    // 100_003 elements > one CPU chunk (rayon path) and > one CUDA sweep's worth of vector tails.
    for n in [1usize, 3, 5, 1027, 100_003] {
        run_against_reference(n, &cfg, 3, 1.0, n as u64, DType::F32, dev)?;
    }
    run_against_reference(333, &AdamWConfig::default(), 4, 1e-3, 9, DType::F32, dev)?;
    Ok(())
}

fn half_params(dev: Device) -> Result<()> {
    let cfg = AdamWConfig {
        lr: 3e-2,
        ..Default::default()
    };
    for dtype in [DType::BF16, DType::F16] {
        for n in [7usize, 4099] {
            run_against_reference(n, &cfg, 3, 1.0, 21, dtype, dev)?;
        }
    }
    // Round once per step, no master weights: an update below half a bf16 ulp is lost, exactly as
    // with torch on bf16 parameters. (2.0 has a bf16 ulp of 1/64; lr 1e-3 moves it by ~1e-3.)
    let mut store = ParamStore::new();
    let id = store.insert("w", Tensor::full(&[16], 2.0, DType::BF16, dev)?)?;
    let mut opt = AdamW::new(AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    })?;
    for _ in 0..3 {
        let mut g = Gradients::new();
        g.insert_or_add(id, Tensor::full(&[16], 1.0, DType::F32, dev)?)?;
        opt.step(&mut store, &g)?;
    }
    assert_eq!(store.get(id)?.to_vec_f32()?, vec![2.0; 16]);
    assert!(opt.state(id).unwrap().0.to_vec::<f32>()?[0] > 0.2, "the moments still advance");
    Ok(())
}

/// CUDA against the CPU backend: the same IEEE operation sequence on both sides, so bit-identical
/// parameters and moments (f32, f16, bf16 parameters; odd sizes hit the vector tail; a moved store
/// carries its optimizer state along).
fn cuda_matches_cpu_bitwise(dev: Device) -> Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    let cfg = AdamWConfig {
        lr: 2e-2,
        beta1: 0.85,
        beta2: 0.98,
        eps: 1e-7,
        weight_decay: 0.05,
    };
    let sizes = [1usize, 3, 4, 1027, 70_001];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut cpu_store = ParamStore::new();
        let mut ids = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let p = Tensor::randn(&[n], 1.0, i as u64, dtype, Device::Cpu)?;
            ids.push(cpu_store.insert(format!("p{i}"), p)?);
        }
        let mut cuda_store = ParamStore::new();
        for (id, name, t) in cpu_store.iter() {
            assert_eq!(cuda_store.insert(name, t.to_device(dev)?)?, id);
        }
        let (mut oc, mut od) = (AdamW::new(cfg.clone())?, AdamW::new(cfg.clone())?);
        for step in 0..3u64 {
            let (mut gc, mut gd) = (Gradients::new(), Gradients::new());
            for (i, (&id, &n)) in ids.iter().zip(&sizes).enumerate() {
                let g = Tensor::randn(&[n], 0.5, 100 * step + i as u64, DType::F32, Device::Cpu)?;
                gd.insert_or_add(id, g.to_device(dev)?)?;
                gc.insert_or_add(id, g)?;
            }
            oc.step(&mut cpu_store, &gc)?;
            od.step(&mut cuda_store, &gd)?;
            for &id in &ids {
                let what = format!("{dtype} {} step {step}", cpu_store.name(id)?);
                let (pc, pd) = (cpu_store.get(id)?, cuda_store.get(id)?);
                assert_eq!(pd.device(), dev);
                assert_eq!(pd.to_bytes()?, pc.to_bytes()?, "{what}: parameter bits");
                let (sc, sd) = (oc.state(id).unwrap(), od.state(id).unwrap());
                assert_eq!(sd.0.device(), dev);
                assert_eq!(sd.0.to_bytes()?, sc.0.to_bytes()?, "{what}: m bits");
                assert_eq!(sd.1.to_bytes()?, sc.1.to_bytes()?, "{what}: v bits");
            }
        }
    }
    // Moving the store after a few CPU steps: the moments follow the parameters to the device.
    let mut store = ParamStore::new();
    let id = store.insert("w", Tensor::randn(&[513], 1.0, 3, DType::F32, Device::Cpu)?)?;
    let mut twin = ParamStore::new();
    twin.insert("w", store.get(id)?.clone())?;
    let (mut o1, mut o2) = (AdamW::new(cfg.clone())?, AdamW::new(cfg.clone())?);
    for step in 0..4u64 {
        if step == 2 {
            store.to_device(dev)?;
        }
        let g = Tensor::randn(&[513], 1.0, 50 + step, DType::F32, Device::Cpu)?;
        let mut gs = Gradients::new();
        gs.insert_or_add(id, g.to_device(store.get(id)?.device())?)?;
        o1.step(&mut store, &gs)?;
        let mut gt = Gradients::new();
        gt.insert_or_add(id, g)?;
        o2.step(&mut twin, &gt)?;
    }
    assert_eq!(o1.state(id).unwrap().0.device(), dev);
    assert_eq!(store.get(id)?.to_bytes()?, twin.get(id)?.to_bytes()?);
    Ok(())
}

fn validation_leaves_everything_untouched(dev: Device) -> Result<()> {
    let mut store = ParamStore::new();
    let a = store.insert("a", Tensor::randn(&[6], 1.0, 1, DType::F32, dev)?)?;
    let b = store.insert("b", Tensor::randn(&[4], 1.0, 2, DType::F32, dev)?)?;
    let before: Vec<Vec<u8>> = [a, b]
        .iter()
        .map(|&id| store.get(id)?.to_bytes())
        .collect::<Result<_>>()?;
    let unchanged = |store: &ParamStore| -> Result<()> {
        for (&id, bytes) in [a, b].iter().zip(&before) {
            assert_eq!(&store.get(id)?.to_bytes()?, bytes);
        }
        Ok(())
    };
    let mut opt = AdamW::new(AdamWConfig::default())?;

    // A frozen parameter with a gradient (after a valid one): nothing moves.
    store.set_trainable(b, false)?;
    let mut g = Gradients::new();
    g.insert_or_add(a, Tensor::full(&[6], 1.0, DType::F32, dev)?)?;
    g.insert_or_add(b, Tensor::full(&[4], 1.0, DType::F32, dev)?)?;
    assert!(matches!(opt.step(&mut store, &g), Err(Error::InvalidArgument(_))));
    unchanged(&store)?;
    assert_eq!((opt.steps(), opt.state_bytes()), (0, 0));
    store.set_trainable(b, true)?;

    // A gradient of the wrong shape.
    let mut g = Gradients::new();
    g.insert_or_add(a, Tensor::full(&[6], 1.0, DType::F32, dev)?)?;
    g.insert_or_add(b, Tensor::full(&[2, 2], 1.0, DType::F32, dev)?)?;
    assert!(matches!(opt.step(&mut store, &g), Err(Error::Shape { .. })));
    unchanged(&store)?;

    // A gradient for a parameter of another store.
    let mut g = Gradients::new();
    let mut other = ParamStore::new();
    for i in 0..5 {
        other.insert(format!("o{i}"), Tensor::zeros(&[1], DType::F32, dev)?)?;
    }
    g.insert_or_add(other.find("o4").unwrap(), Tensor::zeros(&[1], DType::F32, dev)?)?;
    assert!(opt.step(&mut store, &g).is_err());

    // A bad learning rate set through set_lr: the step fails, nothing moves, then it recovers.
    opt.set_lr(-1.0);
    let mut g = Gradients::new();
    g.insert_or_add(a, Tensor::full(&[6], 1.0, DType::F32, dev)?)?;
    assert!(opt.step(&mut store, &g).is_err());
    unchanged(&store)?;
    assert_eq!(opt.steps(), 0);
    opt.set_lr(1e-2);
    assert_eq!(opt.lr(), 1e-2);
    opt.step(&mut store, &g)?;
    assert_eq!(opt.steps(), 1);
    assert_ne!(store.get(a)?.to_bytes()?, before[0]);
    assert_eq!(store.get(b)?.to_bytes()?, before[1], "no gradient, no update");
    assert_eq!(opt.state_bytes(), 6 * 8);
    assert!(opt.state(b).is_none());

    // Empty gradients: a no-op step.
    opt.step(&mut store, &Gradients::new())?;
    assert_eq!(opt.steps(), 2);

    // lr = 0 leaves parameters bit-identical (even with weight decay) while the moments advance.
    let snapshot = store.get(a)?.to_bytes()?;
    opt.set_lr(0.0);
    opt.step(&mut store, &g)?;
    assert_eq!(store.get(a)?.to_bytes()?, snapshot);
    assert_eq!(opt.state(a).unwrap().2, 2);
    Ok(())
}

device_test!(
    torch_fixture,
    matches_f64_reference,
    half_params,
    cuda_matches_cpu_bitwise,
    validation_leaves_everything_untouched,
);

#[test]
fn bad_config_errors() {
    let ok = AdamWConfig::default();
    assert!(AdamW::new(ok.clone()).is_ok());
    let bad = [
        AdamWConfig { lr: -1e-3, ..ok.clone() },
        AdamWConfig { lr: f32::NAN, ..ok.clone() },
        AdamWConfig { lr: f32::INFINITY, ..ok.clone() },
        AdamWConfig { beta1: 1.0, ..ok.clone() },
        AdamWConfig { beta1: -0.1, ..ok.clone() },
        AdamWConfig { beta2: 1.0, ..ok.clone() },
        AdamWConfig { beta2: f32::NAN, ..ok.clone() },
        AdamWConfig { eps: -1e-8, ..ok.clone() },
        AdamWConfig { eps: f32::NAN, ..ok.clone() },
        AdamWConfig { weight_decay: -0.01, ..ok.clone() },
        AdamWConfig { weight_decay: f32::INFINITY, ..ok.clone() },
    ];
    for cfg in bad {
        let err = AdamW::new(cfg.clone()).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{cfg:?}: {err}");
    }
    // Edges torch accepts.
    for cfg in [
        AdamWConfig { lr: 0.0, ..ok.clone() },
        AdamWConfig { beta1: 0.0, beta2: 0.0, ..ok.clone() },
        AdamWConfig { eps: 0.0, weight_decay: 0.0, ..ok.clone() },
    ] {
        assert!(AdamW::new(cfg).is_ok());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Fresh random sizes, hyperparameters and gradient scales against the f64 reference.
    #[test]
    fn random_configs_match_reference(
        n in 1usize..600,
        lr in 0.0f32..0.1,
        beta1 in 0.0f32..0.99,
        beta2 in 0.5f32..0.9999,
        eps in 1e-10f32..1e-3,
        wd in 0.0f32..0.5,
        gexp in -4i32..3,
        seed in any::<u64>(),
    ) {
        let cfg = AdamWConfig { lr, beta1, beta2, eps, weight_decay: wd };
        run_against_reference(n, &cfg, 3, 10f32.powi(gexp), seed, DType::F32, Device::Cpu).unwrap();
    }
}
