//! VB-LoRA: torch.topk tie order, PEFT parity (A/B, forward, merge, logits and bank gradients, the
//! save_only_topk_weights form), gradient checks, CUDA against CPU, and input validation.

mod common;

use common::assert_close;
use peft_kernels::adapters::vblora::{
    BANK_KEY, TopkIndexDtype, VbLoraConfig, VbLoraLayer, decode_topk_indices, encode_topk_indices,
    vblora_compose, vblora_compose_backward, vblora_logits_from_topk, vblora_topk, vblora_topk_for_save,
};
use peft_kernels::io::SafetensorsFile;
use peft_kernels::{DType, Device, Result, Tensor};
use proptest::prelude::*;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_sparse")
}

#[track_caller]
fn close(actual: &[f32], expected: &[f32], rel: f32, what: &str) {
    let scale = expected
        .iter()
        .fold(0f32, |m, x| if x.is_finite() { m.max(x.abs()) } else { m });
    assert_close(actual, expected, rel, rel * scale, what);
}

fn rand_vec(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut r = peft_kernels::rng::Rng::new(seed);
    (0..n).map(|_| r.normal() * std).collect()
}

// ---------------------------------------------------------------- torch.topk ties

#[test]
fn topk_ties_match_torch() -> Result<()> {
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("topk.json")).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert!(rows.len() > 300);
    let (mut partial, mut nth) = (0, 0);
    for (i, r) in rows.iter().enumerate() {
        let k = r["k"].as_u64().unwrap() as usize;
        let x: Vec<f32> = r["x"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().map_or(f32::NAN, |v| v as f32))
            .collect();
        let want: Vec<i64> = r["idx"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        if k * 64 <= x.len() {
            partial += 1;
        } else {
            nth += 1;
        }
        let n = x.len();
        let t = Tensor::from_vec(x, &[1, n], Device::Cpu)?;
        let (got, _) = vblora_topk(&t, k)?;
        assert_eq!(got, want, "row {i}: n={n} k={k}");
    }
    assert!(
        partial > 20 && nth > 100,
        "both torch code paths are covered ({partial}, {nth})"
    );
    Ok(())
}

/// A documented example: torch returns these for a constant row (libstdc++ heap/introselect order,
/// not the lowest indices).
#[test]
fn topk_constant_row_examples() -> Result<()> {
    let t = |n: usize| Tensor::from_vec(vec![0f32; n], &[1, n], Device::Cpu).unwrap();
    assert_eq!(vblora_topk(&t(5), 2)?.0, vec![2, 4]);
    assert_eq!(vblora_topk(&t(8), 3)?.0, vec![6, 5, 4]);
    assert_eq!(vblora_topk(&t(256), 2)?.0, vec![0, 1]);
    assert_eq!(vblora_topk(&t(256), 4)?.0, vec![1, 3, 0, 2]);
    let x = Tensor::from_vec(vec![1f32, 3., 3., 3., 0., 3.], &[1, 6], Device::Cpu)?;
    assert_eq!(vblora_topk(&x, 2)?.0, vec![3, 5]);
    assert_eq!(vblora_topk(&x, 3)?.0, vec![3, 5, 2]);
    Ok(())
}

// ---------------------------------------------------------------- PEFT fixtures

const LAYERS: [(&str, usize, usize); 2] = [("lin0", 24, 16), ("lin1", 8, 24)];

struct Case {
    st: SafetensorsFile,
    adapter: SafetensorsFile,
    cfg: VbLoraConfig,
    topk_only: bool,
}

fn case(name: &str) -> Case {
    let dir = fixtures();
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("vblora_{name}/adapter_config.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(j["peft_type"], "VBLORA");
    let u = |k: &str| j[k].as_u64().unwrap() as usize;
    Case {
        st: SafetensorsFile::open(dir.join(format!("vblora_{name}.safetensors"))).unwrap(),
        adapter: SafetensorsFile::open(dir.join(format!("vblora_{name}/adapter_model.safetensors"))).unwrap(),
        cfg: VbLoraConfig {
            r: u("r"),
            num_vectors: u("num_vectors"),
            vector_length: u("vector_length"),
            topk: u("topk"),
        },
        topk_only: j["save_only_topk_weights"].as_bool().unwrap(),
    }
}

fn vec_of(st: &SafetensorsFile, name: &str) -> Vec<f32> {
    st.load(name, Device::Cpu).unwrap().to_vec::<f32>().unwrap()
}

/// Training parity: A/B, forward, logits and bank gradients, dx and the merged weights against PEFT.
fn training_parity(name: &str, dev: Device) -> Result<()> {
    let c = case(name);
    let bank = c.st.load("bank", dev)?;
    let mut dbank = Tensor::zeros(&[c.cfg.num_vectors, c.cfg.vector_length], DType::F32, dev)?;
    for (lname, out, inp) in LAYERS {
        let what = |s: &str| format!("{name}/{lname}: {s}");
        let layer = VbLoraLayer::new(out, inp, &c.cfg)?;
        let la = c.st.load(&format!("{lname}.logits_A"), dev)?;
        let lb = c.st.load(&format!("{lname}.logits_B"), dev)?;
        let (a, b) = layer.compose_ab(&bank, &la, &lb)?;
        close(
            &a.to_vec::<f32>()?,
            &vec_of(&c.st, &format!("{lname}.A")),
            1e-5,
            &what("A"),
        );
        close(
            &b.to_vec::<f32>()?,
            &vec_of(&c.st, &format!("{lname}.B")),
            1e-5,
            &what("B"),
        );
        let w = c.st.load(&format!("{lname}.weight"), dev)?;
        let x = c.st.load(&format!("{lname}.x"), dev)?;
        let y = x
            .matmul_t(&w, false, true)?
            .add(&layer.forward_delta(&x, &a, &b)?)?;
        close(
            &y.to_vec::<f32>()?,
            &vec_of(&c.st, &format!("{lname}.y")),
            1e-5,
            &what("forward"),
        );
        let dy = c.st.load(&format!("{lname}.dy"), dev)?;
        let g = layer.backward(&x, &dy, &bank, &la, &lb, true)?;
        close(
            &g.dlogits_a.to_vec::<f32>()?,
            &vec_of(&c.st, &format!("{lname}.dlogits_A")),
            1e-5,
            &what("dlogits_A"),
        );
        close(
            &g.dlogits_b.to_vec::<f32>()?,
            &vec_of(&c.st, &format!("{lname}.dlogits_B")),
            1e-5,
            &what("dlogits_B"),
        );
        let dx = dy.matmul(&w)?.add(&g.dx.unwrap())?;
        close(
            &dx.to_vec::<f32>()?,
            &vec_of(&c.st, &format!("{lname}.dx")),
            1e-5,
            &what("dx"),
        );
        dbank.add_scaled_(&g.dbank, 1.0)?;
        if !c.topk_only {
            let merged = w.add(&layer.delta_weight(&bank, &la, &lb)?)?;
            close(
                &merged.to_vec::<f32>()?,
                &vec_of(&c.st, &format!("{lname}.merged")),
                1e-5,
                &what("merged"),
            );
            // The adapter file holds the same logits and bank.
            let fa = c
                .adapter
                .load(&format!("base_model.model.{lname}.vblora_logits_A"), Device::Cpu)?;
            assert_eq!(fa.to_vec::<f32>()?, la.to_vec::<f32>()?);
        }
    }
    close(
        &dbank.to_vec::<f32>()?,
        &vec_of(&c.st, "dbank"),
        1e-5,
        &format!("{name}: dbank (both layers)"),
    );
    if !c.topk_only {
        assert_eq!(
            c.adapter.load(BANK_KEY, Device::Cpu)?.to_vec::<f32>()?,
            bank.to_vec::<f32>()?
        );
    }
    Ok(())
}

fn peft_full(dev: Device) -> Result<()> {
    training_parity("full", dev)
}
fn peft_topk_training(dev: Device) -> Result<()> {
    training_parity("topk", dev)
}
device_test!(peft_full, peft_topk_training);

/// The save_only_topk_weights checkpoint: our save form equals PEFT's file, and loading it gives PEFT's
/// A/B, outputs and merged weights; training from it is refused.
fn peft_topk_checkpoint(dev: Device) -> Result<()> {
    let c = case("topk");
    assert!(c.topk_only);
    let (v, k) = (c.cfg.num_vectors, c.cfg.topk);
    assert_eq!(TopkIndexDtype::for_num_vectors(v), TopkIndexDtype::I16);
    let bank = c.adapter.load(BANK_KEY, dev)?;
    assert_eq!(bank.to_vec::<f32>()?, vec_of(&c.st, "bank"));
    let x = c.st.load("lin0.x", dev)?;
    let mut h = x.clone();
    for (i, (lname, out, inp)) in LAYERS.into_iter().enumerate() {
        let layer = VbLoraLayer::new(out, inp, &c.cfg)?;
        let mut logits = Vec::new();
        for ab in ["A", "B"] {
            let key = format!("base_model.model.{lname}.vblora_logits_{ab}");
            let (dt, ishape, bytes) = c.adapter.raw(&format!("{key}_topk_indices"))?;
            assert_eq!(dt, safetensors::Dtype::I16);
            let idx = decode_topk_indices(dt, bytes, v)?;
            let weights = c.adapter.load(&format!("{key}_topk_weights"), Device::Cpu)?;
            // Our save form of the original logits is PEFT's file.
            let orig = c.st.load(&format!("{lname}.logits_{ab}"), Device::Cpu)?;
            let (si, sw) = vblora_topk_for_save(&orig, k)?;
            assert_eq!(si.shape(), &ishape[..]);
            assert_eq!(
                si.to_vec::<i64>()?,
                idx,
                "{lname} {ab}: top-k indices (ties included)"
            );
            close(
                &sw.to_vec::<f32>()?,
                &weights.to_vec::<f32>()?,
                1e-6,
                "top-k weights",
            );
            let (et, eb) = encode_topk_indices(&idx, v)?;
            assert_eq!(
                (et, eb.as_slice()),
                (dt, bytes),
                "re-encoded indices are byte-identical"
            );
            let idx_t = Tensor::from_vec(idx, &ishape, Device::Cpu)?;
            logits.push(vblora_logits_from_topk(&idx_t, &weights, v, dev)?);
        }
        let (a, b) = layer.compose_ab(&bank, &logits[0], &logits[1])?;
        close(
            &a.to_vec::<f32>()?,
            &vec_of(&c.st, &format!("{lname}.loaded_A")),
            1e-5,
            "loaded A",
        );
        close(
            &b.to_vec::<f32>()?,
            &vec_of(&c.st, &format!("{lname}.loaded_B")),
            1e-5,
            "loaded B",
        );
        let w = c.st.load(&format!("{lname}.weight"), dev)?;
        let merged = w.add(&layer.delta_weight(&bank, &logits[0], &logits[1])?)?;
        close(
            &merged.to_vec::<f32>()?,
            &vec_of(&c.st, &format!("{lname}.merged")),
            1e-5,
            "merged from top-k",
        );
        h = h
            .matmul_t(&w, false, true)?
            .add(&layer.forward_delta(&h, &a, &b)?)?;
        if i + 1 < LAYERS.len() {
            let v: Vec<f32> = h.to_vec::<f32>()?.into_iter().map(|x| x.max(0.0)).collect();
            h = Tensor::from_vec(v, h.shape(), dev)?;
        }
        // Training from -inf logits is an error (PEFT raises too).
        let dy = Tensor::zeros(&[6, out], DType::F32, dev)?;
        let xx = Tensor::zeros(&[6, inp], DType::F32, dev)?;
        let err = layer
            .backward(&xx, &dy, &bank, &logits[0], &logits[1], false)
            .unwrap_err();
        assert!(err.to_string().contains("save_only_topk_weights"), "{err}");
    }
    close(
        &h.to_vec::<f32>()?,
        &vec_of(&c.st, "loaded_out"),
        1e-5,
        "outputs of the reloaded top-k model",
    );
    Ok(())
}
device_test!(peft_topk_checkpoint);

// ---------------------------------------------------------------- oracles and gradient checks

/// f64 composition with a sort-based top-k (valid for distinct logits).
fn compose_f64(bank: &[f32], len: usize, logits: &[f32], v: usize, k: usize) -> Vec<f64> {
    let rows = logits.len() / v;
    let mut out = vec![0f64; rows * len];
    for r in 0..rows {
        let z = &logits[r * v..(r + 1) * v];
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap());
        let m = z[order[0]] as f64;
        let e: Vec<f64> = order[..k].iter().map(|&i| (z[i] as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for (j, &i) in order[..k].iter().enumerate() {
            for l in 0..len {
                out[r * len + l] += e[j] / s * bank[i * len + l] as f64;
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn compose_matches_f64(rows in 1usize..20, v in 1usize..300, len in 1usize..9, k0 in 1usize..6, seed in 0u64..1000) {
        let k = k0.min(v);
        let bank = rand_vec(v * len, seed, 1.0);
        let logits = rand_vec(rows * v, seed + 1, 2.0);
        let bt = Tensor::from_vec(bank.clone(), &[v, len], Device::Cpu).unwrap();
        let lt = Tensor::from_vec(logits.clone(), &[rows, v], Device::Cpu).unwrap();
        let got = vblora_compose(&bt, &lt, k).unwrap().to_vec::<f32>().unwrap();
        let want: Vec<f32> = compose_f64(&bank, len, &logits, v, k).into_iter().map(|x| x as f32).collect();
        let scale = want.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for i in 0..want.len() {
            prop_assert!((got[i] - want[i]).abs() <= 2e-6 * scale, "{i}: {} vs {}", got[i], want[i]);
        }
    }
}

/// Central differences of L = Σ R ⊙ compose(bank, logits): exact for the bank (linear), O(h²) for the
/// logits (the selection is kept fixed by well-separated logits).
fn compose_gradient_check(dev: Device) -> Result<()> {
    let (rows, v, len, k) = (7, 11, 5, 3);
    let bank = rand_vec(v * len, 1, 1.0);
    // Distinct logits with gaps >= 0.5, shuffled per row.
    let mut logits = Vec::new();
    for r in 0..rows {
        let mut row: Vec<f32> = (0..v).map(|i| i as f32 * 0.5 - 2.0).collect();
        row.rotate_left((r * 4) % v);
        row.swap(1, (r + 5) % v);
        logits.extend(row);
    }
    let rr = rand_vec(rows * len, 3, 1.0);
    let loss = |bank: &[f32], logits: &[f32]| -> Result<f64> {
        let y = vblora_compose(
            &Tensor::from_vec(bank.to_vec(), &[v, len], dev)?,
            &Tensor::from_vec(logits.to_vec(), &[rows, v], dev)?,
            k,
        )?
        .to_vec::<f32>()?;
        Ok(y.iter().zip(&rr).map(|(&a, &b)| a as f64 * b as f64).sum())
    };
    let (dl, db) = vblora_compose_backward(
        &Tensor::from_vec(bank.clone(), &[v, len], dev)?,
        &Tensor::from_vec(logits.clone(), &[rows, v], dev)?,
        k,
        &Tensor::from_vec(rr.clone(), &[rows, len], dev)?,
    )?;
    let (dl, db) = (dl.to_vec::<f32>()?, db.to_vec::<f32>()?);
    for i in 0..v * len {
        let mut p = bank.clone();
        p[i] += 1.0;
        let lp = loss(&p, &logits)?;
        p[i] -= 2.0;
        let lm = loss(&p, &logits)?;
        let fd = (lp - lm) / 2.0;
        assert!(
            (fd - db[i] as f64).abs() < 1e-4 * (1.0 + fd.abs()),
            "dbank[{i}]: {fd} vs {}",
            db[i]
        );
    }
    let h = 1e-2f32;
    let mut nonzero = 0;
    for i in 0..rows * v {
        let mut p = logits.clone();
        p[i] += h;
        let lp = loss(&bank, &p)?;
        p[i] -= 2.0 * h;
        let lm = loss(&bank, &p)?;
        let fd = (lp - lm) / (2.0 * h as f64);
        assert!(
            (fd - dl[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
            "dlogits[{i}]: {fd} vs {}",
            dl[i]
        );
        nonzero += (dl[i] != 0.0) as usize;
    }
    assert_eq!(nonzero, rows * k, "only the selected logits get a gradient");
    Ok(())
}
device_test!(compose_gradient_check);

/// The layer's dx against finite differences (linear in x) and dlogits/dbank against the composition
/// backward applied to the dense dA/dB.
fn layer_gradient_check(dev: Device) -> Result<()> {
    let cfg = VbLoraConfig {
        r: 3,
        num_vectors: 10,
        vector_length: 4,
        topk: 2,
    };
    let layer = VbLoraLayer::new(12, 8, &cfg)?;
    let bank = cfg.init_bank(1.0, 1, dev)?;
    let (la, lb) = layer.init_logits(1.0, 2, dev)?;
    let t = 5;
    let x = Tensor::randn(&[t, 8], 1.0, 3, DType::F32, dev)?;
    let r = Tensor::randn(&[t, 12], 1.0, 4, DType::F32, dev)?;
    let (a, b) = layer.compose_ab(&bank, &la, &lb)?;
    let g = layer.backward(&x, &r, &bank, &la, &lb, true)?;
    let rv = r.to_vec::<f32>()?;
    let loss = |x: &Tensor| -> Result<f64> {
        let y = layer.forward_delta(x, &a, &b)?.to_vec::<f32>()?;
        Ok(y.iter().zip(&rv).map(|(&p, &q)| p as f64 * q as f64).sum())
    };
    let xv = x.to_vec::<f32>()?;
    let dx = g.dx.unwrap().to_vec::<f32>()?;
    for i in 0..xv.len() {
        let mut p = xv.clone();
        p[i] += 1.0;
        let lp = loss(&Tensor::from_vec(p.clone(), &[t, 8], dev)?)?;
        p[i] -= 2.0;
        let lm = loss(&Tensor::from_vec(p, &[t, 8], dev)?)?;
        assert!(((lp - lm) / 2.0 - dx[i] as f64).abs() < 1e-4, "dx[{i}]");
    }
    // dA = (dy·B)ᵀ·x, dB = dyᵀ·(x·Aᵀ); the B gradient goes through PEFT's transpose/reshape.
    let da = r.matmul(&b)?.matmul_t(&x, true, false)?;
    let (dla, dba) = vblora_compose_backward(&bank, &la, 2, &da)?;
    close(
        &g.dlogits_a.to_vec::<f32>()?,
        &dla.to_vec::<f32>()?,
        1e-5,
        "dlogits_a",
    );
    let db = r
        .matmul_t(&x.matmul_t(&a, false, true)?, true, false)?
        .to_vec::<f32>()?; // [12, 3]
    // Undo B's layout: mix[ob, j, l] = B[ob·4 + l, j].
    let mut dmix = vec![0f32; 12 * 3];
    for ob in 0..3 {
        for j in 0..3 {
            for l in 0..4 {
                dmix[(ob * 3 + j) * 4 + l] = db[(ob * 4 + l) * 3 + j];
            }
        }
    }
    let (dlb, dbb) = vblora_compose_backward(&bank, &lb, 2, &Tensor::from_vec(dmix, &[3, 3, 4], dev)?)?;
    close(
        &g.dlogits_b.to_vec::<f32>()?,
        &dlb.to_vec::<f32>()?,
        1e-5,
        "dlogits_b",
    );
    close(
        &g.dbank.to_vec::<f32>()?,
        &dba.add(&dbb)?.to_vec::<f32>()?,
        1e-5,
        "dbank",
    );
    // bf16 activations: same math, outputs in bf16.
    let xb = x.to_dtype(DType::BF16)?;
    let yb = layer.forward_delta(&xb, &a, &b)?;
    assert_eq!(yb.dtype(), DType::BF16);
    let y32 = layer
        .forward_delta(&xb.to_dtype(DType::F32)?, &a, &b)?
        .to_dtype(DType::BF16)?;
    assert_eq!(yb.to_vec_f32()?, y32.to_vec_f32()?);
    Ok(())
}
device_test!(layer_gradient_check);

fn cuda_matches_cpu(dev: Device) -> Result<()> {
    // Includes tie-heavy rows (integers) so the device top-k must follow torch's CPU order too.
    for (rows, v, len, k) in [
        (37, 8, 4, 2),
        (64, 256, 16, 2),
        (9, 300, 7, 3),
        (5, 40, 3, 40),
        (130, 64, 1, 1),
    ] {
        let bank = rand_vec(v * len, 1, 1.0);
        let mut logits = rand_vec(rows * v, 2, 1.0);
        for (i, z) in logits.iter_mut().enumerate() {
            if (i / v) % 3 == 0 {
                *z = (*z * 2.0).round();
            }
        }
        let g = rand_vec(rows * len, 3, 1.0);
        let cpu = |d: Device| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let b = Tensor::from_vec(bank.clone(), &[v, len], d)?;
            let l = Tensor::from_vec(logits.clone(), &[rows, v], d)?;
            let gt = Tensor::from_vec(g.clone(), &[rows, len], d)?;
            let y = vblora_compose(&b, &l, k)?.to_vec::<f32>()?;
            let (dl, db) = vblora_compose_backward(&b, &l, k, &gt)?;
            Ok((y, dl.to_vec::<f32>()?, db.to_vec::<f32>()?))
        };
        let (y0, dl0, db0) = cpu(Device::Cpu)?;
        let (y1, dl1, db1) = cpu(dev)?;
        close(&y1, &y0, 1e-6, "device compose");
        close(&dl1, &dl0, 1e-5, "device dlogits");
        close(&db1, &db0, 1e-5, "device dbank");
    }
    // The layer end to end (B's transposed layout included).
    let cfg = VbLoraConfig {
        r: 4,
        num_vectors: 32,
        vector_length: 8,
        topk: 2,
    };
    let layer = VbLoraLayer::new(24, 16, &cfg)?;
    let bank = cfg.init_bank(1.0, 7, Device::Cpu)?;
    let (la, lb) = layer.init_logits(1.0, 8, Device::Cpu)?;
    let x = Tensor::randn(&[9, 16], 1.0, 9, DType::F32, Device::Cpu)?;
    let dy = Tensor::randn(&[9, 24], 1.0, 10, DType::F32, Device::Cpu)?;
    let g0 = layer.backward(&x, &dy, &bank, &la, &lb, true)?;
    let on = |t: &Tensor| t.to_device(dev).unwrap();
    let g1 = layer.backward(&on(&x), &on(&dy), &on(&bank), &on(&la), &on(&lb), true)?;
    close(
        &g1.dlogits_b.to_vec::<f32>()?,
        &g0.dlogits_b.to_vec::<f32>()?,
        1e-5,
        "layer dlogits_b",
    );
    close(
        &g1.dbank.to_vec::<f32>()?,
        &g0.dbank.to_vec::<f32>()?,
        1e-5,
        "layer dbank",
    );
    close(
        &g1.dx.unwrap().to_vec::<f32>()?,
        &g0.dx.unwrap().to_vec::<f32>()?,
        1e-5,
        "layer dx",
    );
    let (a0, b0) = layer.compose_ab(&bank, &la, &lb)?;
    let (a1, b1) = layer.compose_ab(&on(&bank), &on(&la), &on(&lb))?;
    close(&a1.to_vec::<f32>()?, &a0.to_vec::<f32>()?, 1e-6, "A");
    close(&b1.to_vec::<f32>()?, &b0.to_vec::<f32>()?, 1e-6, "B");
    Ok(())
}
device_test!(cuda_matches_cpu);

// ---------------------------------------------------------------- formats and errors

#[test]
fn index_dtypes_roundtrip() -> Result<()> {
    use safetensors::Dtype as D;
    for (v, want) in [
        (255, D::U8),
        (256, D::I16),
        (32767, D::I16),
        (32768, D::I32),
        (1 << 31, D::I64),
    ] {
        assert_eq!(
            TopkIndexDtype::for_num_vectors(v).safetensors(),
            want,
            "num_vectors {v}"
        );
        let idx = vec![0i64, (v - 1) as i64, 7.min(v as i64 - 1)];
        let (d, bytes) = encode_topk_indices(&idx, v)?;
        assert_eq!(d, want);
        assert_eq!(decode_topk_indices(d, &bytes, v)?, idx);
    }
    assert!(encode_topk_indices(&[300], 256).is_err());
    assert!(
        decode_topk_indices(D::I16, &[1, 2, 3], 256).is_err(),
        "ragged bytes"
    );
    assert!(
        decode_topk_indices(D::I16, &(-1i16).to_le_bytes(), 256).is_err(),
        "negative index"
    );
    assert!(decode_topk_indices(D::F32, &[0; 4], 256).is_err());
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = VbLoraConfig {
        r: 2,
        num_vectors: 6,
        vector_length: 4,
        topk: 2,
    };
    assert!(VbLoraLayer::new(8, 6, &cfg).is_err(), "in not divisible by L");
    assert!(VbLoraLayer::new(6, 8, &cfg).is_err(), "out not divisible by L");
    assert!(VbLoraLayer::new(0, 8, &cfg).is_err());
    assert!(
        VbLoraLayer::new(8, 8, &VbLoraConfig { topk: 7, ..cfg }).is_err(),
        "topk > num_vectors"
    );
    assert!(VbLoraLayer::new(8, 8, &VbLoraConfig { topk: 0, ..cfg }).is_err());
    assert!(VbLoraLayer::new(8, 8, &VbLoraConfig { r: 0, ..cfg }).is_err());
    assert!(
        VbLoraLayer::new(
            8,
            8,
            &VbLoraConfig {
                vector_length: 0,
                ..cfg
            }
        )
        .is_err()
    );
    let layer = VbLoraLayer::new(8, 12, &cfg)?;
    assert_eq!(layer.logits_a_shape(), [2, 3, 6]);
    assert_eq!(layer.logits_b_shape(), [2, 2, 6]);
    let bank = cfg.init_bank(0.02, 0, dev)?;
    let (la, lb) = layer.init_logits(0.1, 0, dev)?;
    assert!(layer.compose_ab(&bank, &lb, &la).is_err(), "swapped logits");
    assert!(
        layer
            .compose_ab(&Tensor::zeros(&[6, 5], DType::F32, dev)?, &la, &lb)
            .is_err(),
        "bank width"
    );
    assert!(
        layer.compose_ab(&bank.to_dtype(DType::F16)?, &la, &lb).is_err(),
        "f16 bank"
    );
    let (a, b) = layer.compose_ab(&bank, &la, &lb)?;
    assert!(
        layer
            .forward_delta(&Tensor::zeros(&[3, 11], DType::F32, dev)?, &a, &b)
            .is_err(),
        "x width"
    );
    assert!(
        layer
            .forward_delta(&Tensor::zeros(&[3, 12], DType::F32, dev)?, &b, &a)
            .is_err(),
        "swapped A/B"
    );
    let x = Tensor::zeros(&[3, 12], DType::F32, dev)?;
    assert!(
        layer
            .backward(
                &x,
                &Tensor::zeros(&[2, 8], DType::F32, dev)?,
                &bank,
                &la,
                &lb,
                true
            )
            .is_err(),
        "dy rows"
    );
    assert!(vblora_compose(&bank, &la, 7).is_err(), "topk > V");
    assert!(vblora_compose(&bank, &la, 0).is_err());
    assert!(
        vblora_compose(&bank, &Tensor::zeros(&[3, 5], DType::F32, dev)?, 2).is_err(),
        "logits width"
    );
    assert!(
        vblora_compose_backward(&bank, &la, 2, &Tensor::zeros(&[5], DType::F32, dev)?).is_err(),
        "grad size"
    );
    let idx = Tensor::from_vec(vec![0i64, 9], &[1, 2], dev)?;
    let w = Tensor::from_vec(vec![0.5f32], &[1, 1], dev)?;
    assert!(
        vblora_logits_from_topk(&idx, &w, 6, dev).is_err(),
        "index out of range"
    );
    let idx = Tensor::from_vec(vec![0i64, 1], &[1, 2], dev)?;
    assert!(
        vblora_logits_from_topk(&idx, &Tensor::zeros(&[1, 2], DType::F32, dev)?, 6, dev).is_err(),
        "k-1 columns"
    );
    let lg = vblora_logits_from_topk(&idx, &w, 6, dev)?.to_vec::<f32>()?;
    assert_eq!(lg[0], 0.5f32.ln());
    assert_eq!(lg[1], 0.5f32.ln());
    assert!(lg[2..].iter().all(|v| *v == f32::NEG_INFINITY));
    // A zero bank makes the adapter an identity (PEFT's own identity test).
    let zero = Tensor::zeros(&[6, 4], DType::F32, dev)?;
    let (a0, b0) = layer.compose_ab(&zero, &la, &lb)?;
    assert!(
        layer
            .forward_delta(&x.affine(0.0, 1.0)?, &a0, &b0)?
            .to_vec::<f32>()?
            .iter()
            .all(|v| *v == 0.0)
    );
    Ok(())
}
