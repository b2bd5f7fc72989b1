//! AdamW8bit (bitsandbytes' blockwise 8-bit state) against the re-implementation of bitsandbytes'
//! kernels in tests/fixtures/gen_adamw8bit.py (bit for bit on the CPU), CUDA against the CPU, and the
//! memory per parameter.

mod common;

use peft_kernels::autograd::{Gradients, ParamId, ParamStore};
use peft_kernels::optim::{OptimConfig, OptimKind, Optimizer};
use peft_kernels::{Device, Result, Tensor};
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/adamw8bit.json");

/// The fixture's input hash (`hval` in gen_adamw8bit.py): a value in [-1, 1) times 2^-(0..3), exactly 0
/// for 1 index in 64.
fn hval(seed: u64, i: u64) -> f32 {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(0x632B_E59B_D9B4_E019);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    if x & 63 == 0 {
        return 0.0;
    }
    let u = (x >> 40) as f64 / (1u64 << 24) as f64;
    ((2.0 * u - 1.0) * 2f64.powi(-(((x >> 6) & 3) as i32))) as f32
}

fn inputs(tensor_index: u64, step: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| hval(tensor_index * 1000 + step, i))
        .collect()
}

fn unhex_f32(v: &Value) -> Vec<f32> {
    unhex(v)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn unhex(v: &Value) -> Vec<u8> {
    let s = v.as_str().expect("hex string");
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs the fixture's schedule of gradients on `dev`; returns the store, the ids and the optimizer.
fn run_fixture_case(
    c: &Value,
    fx: &Value,
    dev: Device,
    steps: u64,
) -> Result<(ParamStore, Vec<ParamId>, Optimizer)> {
    let shapes: Vec<(String, Vec<usize>)> = fx["shapes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let shape = s
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), shape)
        })
        .collect();
    // serde_json keeps object keys sorted: "big" (tensor 0) before "small" (tensor 1), as in Python.
    assert_eq!(shapes[0].0, "big");
    let nan_step = fx["nan_step"].as_u64().unwrap();
    let mut cfg = OptimConfig {
        optim: OptimKind::AdamW8bit,
        ..Default::default()
    };
    cfg.hyper.lr = c["lr"].as_f64().unwrap() as f32;
    cfg.hyper.beta1 = c["beta1"].as_f64().unwrap() as f32;
    cfg.hyper.beta2 = c["beta2"].as_f64().unwrap() as f32;
    cfg.hyper.eps = c["eps"].as_f64().unwrap() as f32;
    cfg.hyper.weight_decay = c["weight_decay"].as_f64().unwrap() as f32;
    assert_eq!(cfg.min_8bit_size as u64, fx["min_8bit_size"].as_u64().unwrap());
    let mut store = ParamStore::new();
    let mut ids = Vec::new();
    for (ti, (name, shape)) in shapes.iter().enumerate() {
        let n = shape.iter().product();
        ids.push(store.insert(
            name.clone(),
            Tensor::from_slice(&inputs(ti as u64, 0, n), shape, dev)?,
        )?);
    }
    let mut opt = Optimizer::new(cfg)?;
    for t in 1..=steps {
        let mut grads = Gradients::new();
        for (ti, (name, shape)) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product();
            let mut g = inputs(ti as u64, t, n);
            if name == "big" && t == nan_step {
                g.iter_mut().skip(5).step_by(97).for_each(|x| *x = f32::NAN);
                g.iter_mut()
                    .skip(11)
                    .step_by(389)
                    .for_each(|x| *x = f32::INFINITY);
                g.iter_mut()
                    .skip(13)
                    .step_by(401)
                    .for_each(|x| *x = f32::NEG_INFINITY);
            }
            grads.insert_or_add(ids[ti], Tensor::from_slice(&g, shape, dev)?)?;
        }
        opt.step(&mut store, grads)?;
    }
    Ok((store, ids, opt))
}

fn fixture(dev: Device) -> Result<()> {
    let fx: Value = serde_json::from_str(FIXTURE).expect("fixture parses");
    let steps = fx["steps"].as_u64().unwrap();
    let cases = fx["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 2);
    for (case, c) in cases {
        let (store, ids, _) = run_fixture_case(c, &fx, dev, 1)?;
        for (k, name) in ["big", "small"].iter().enumerate() {
            let got = store.get(ids[k])?.to_vec::<f32>()?;
            assert_eq!(
                bits(&got),
                bits(&unhex_f32(&c["params_step1"][name])),
                "{case} step 1 {name}"
            );
        }
        let (store, ids, opt) = run_fixture_case(c, &fx, dev, steps)?;
        for (k, name) in ["big", "small"].iter().enumerate() {
            let got = store.get(ids[k])?.to_vec::<f32>()?;
            let want = unhex_f32(&c["params_final"][name]);
            assert_eq!(bits(&got), bits(&want), "{case} final {name}");
        }
        assert_eq!(opt.state_format(ids[0]), Some("bnb8"));
        assert_eq!(opt.state_format(ids[1]), Some("bnb32"));
        let st = &c["state_final"];
        let (big, master) = opt.state_tensors(ids[0]).unwrap();
        assert!(master.is_none());
        let get = |v: &[(&str, &Tensor)], n: &str| v.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert_eq!(
            get(&big, "m").to_vec::<u8>()?,
            unhex(&st["big_m_codes"]),
            "{case} m codes"
        );
        assert_eq!(
            get(&big, "v").to_vec::<u8>()?,
            unhex(&st["big_v_codes"]),
            "{case} v codes"
        );
        let am = get(&big, "absmax_m").to_vec::<f32>()?;
        assert_eq!(
            bits(&am),
            bits(&unhex_f32(&st["big_m_absmax"])),
            "{case} absmax m"
        );
        let av = get(&big, "absmax_v").to_vec::<f32>()?;
        assert_eq!(
            bits(&av),
            bits(&unhex_f32(&st["big_v_absmax"])),
            "{case} absmax v"
        );
        let (small, _) = opt.state_tensors(ids[1]).unwrap();
        assert_eq!(
            bits(&get(&small, "m").to_vec::<f32>()?),
            bits(&unhex_f32(&st["small_m"]))
        );
        assert_eq!(
            bits(&get(&small, "v").to_vec::<f32>()?),
            bits(&unhex_f32(&st["small_v"]))
        );
    }
    Ok(())
}

device_test!(fixture);
