//! Scaled dot-product attention: forward (output and log-sum-exp) and backward against plain f64 math
//! written per (batch, head, query) from the definition, on odd sequence lengths, key masks (including
//! fully masked query rows), causal masks with seq_q != seq_k, GQA 4:1 and dropout; finite differences
//! of the f64 forward through the tape; f16/bf16 tolerances; extreme scores; every device present (the
//! CUDA instance compares the fused kernels with the same f64 math); bad input.

mod common;

use common::{assert_close, assert_close_scaled, f64s, to32};
use peft_kernels::attention::{AttentionConfig, attention_backward, attention_forward};
use peft_kernels::autograd::gradcheck::{finite_difference_f64, sample_indices};
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::tensor::dropout_hash;
use peft_kernels::{DType, Device, Result, Tensor};
use proptest::prelude::*;

/// The f64 reference: output, log-sum-exp and (for an output gradient `dout`) dq, dk, dv.
struct Reference {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn keep(cfg: &AttentionConfig, b: usize, h: usize, i: usize, j: usize) -> f64 {
    match cfg.dropout {
        Some((p, seed)) if p > 0.0 => {
            let idx = (((b * cfg.num_heads + h) * cfg.seq_q + i) * cfg.seq_k + j) as u64;
            let threshold = ((p as f64) * 4_294_967_296.0).round() as u64;
            if dropout_hash(seed, idx) as u64 >= threshold {
                1.0 / (1.0 - p as f64)
            } else {
                0.0
            }
        }
        _ => 1.0,
    }
}

fn visible(cfg: &AttentionConfig, mask: Option<&[u8]>, b: usize, i: usize, j: usize) -> bool {
    let padded = mask.is_some_and(|m| m[b * cfg.seq_k + j] == 0);
    // Bottom-right aligned causal mask: query i sees keys up to i + (seq_k - seq_q).
    let causal_ok = !cfg.causal || (j as i64) <= i as i64 + cfg.seq_k as i64 - cfg.seq_q as i64;
    !padded && causal_ok
}

fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    mask: Option<&[u8]>,
    cfg: &AttentionConfig,
) -> Reference {
    let (sq, sk, d, nh, nkv) = (
        cfg.seq_q,
        cfg.seq_k,
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
    );
    let scale = cfg.scale as f64;
    let mut r = Reference {
        out: vec![0.0; q.len()],
        lse: vec![f64::INFINITY; cfg.batch * nh * sq],
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    for b in 0..cfg.batch {
        for h in 0..nh {
            let g = h / (nh / nkv);
            let qi = |i: usize, p: usize| (b * sq + i) * nh * d + h * d + p;
            let kj = |j: usize, p: usize| (b * sk + j) * nkv * d + g * d + p;
            for i in 0..sq {
                let vis: Vec<usize> = (0..sk).filter(|&j| visible(cfg, mask, b, i, j)).collect();
                if vis.is_empty() {
                    continue; // output 0, lse +inf, no gradient
                }
                let s: Vec<f64> = vis
                    .iter()
                    .map(|&j| scale * (0..d).map(|p| q[qi(i, p)] * k[kj(j, p)]).sum::<f64>())
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                r.lse[(b * nh + h) * sq + i] = mx + z.ln();
                let pr: Vec<f64> = s.iter().map(|x| (x - mx).exp() / z).collect();
                let m: Vec<f64> = vis.iter().map(|&j| keep(cfg, b, h, i, j)).collect();
                for (n, &j) in vis.iter().enumerate() {
                    for p in 0..d {
                        r.out[qi(i, p)] += pr[n] * m[n] * v[kj(j, p)];
                        r.dv[kj(j, p)] += pr[n] * m[n] * dout[qi(i, p)];
                    }
                }
                // dP (through the dropout mask), then the softmax Jacobian directly: dS = P∘(dP - Σ P·dP).
                let dp: Vec<f64> = vis
                    .iter()
                    .enumerate()
                    .map(|(n, &j)| m[n] * (0..d).map(|p| dout[qi(i, p)] * v[kj(j, p)]).sum::<f64>())
                    .collect();
                let dot: f64 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (n, &j) in vis.iter().enumerate() {
                    let ds = pr[n] * (dp[n] - dot) * scale;
                    for p in 0..d {
                        r.dq[qi(i, p)] += ds * k[kj(j, p)];
                        r.dk[kj(j, p)] += ds * q[qi(i, p)];
                    }
                }
            }
        }
    }
    r
}

/// Random inputs rounded to `dtype`: (q, k, v, dout) as tensors on `dev` and as f64.
struct Inputs {
    t: [Tensor; 4],
    f: [Vec<f64>; 4],
}

fn inputs(cfg: &AttentionConfig, dtype: DType, std: f32, seed: u64, dev: Device) -> Result<Inputs> {
    let qs = [cfg.batch * cfg.seq_q, cfg.num_heads * cfg.head_dim];
    let ks = [cfg.batch * cfg.seq_k, cfg.num_kv_heads * cfg.head_dim];
    let shapes = [qs, ks, ks, qs];
    let mut t = Vec::new();
    let mut f = Vec::new();
    for (n, s) in shapes.iter().enumerate() {
        let x = Tensor::randn(
            s,
            if n == 3 { 1.0 } else { std },
            seed + n as u64,
            DType::F32,
            Device::Cpu,
        )?
        .to_dtype(dtype)?;
        f.push(f64s(&x)?);
        t.push(x.to_device(dev)?);
    }
    Ok(Inputs {
        t: t.try_into().unwrap(),
        f: f.try_into().unwrap(),
    })
}

/// Forward and backward on `dev` against the f64 reference, with relative tolerances for the output
/// and for the gradients (scaled by each tensor's largest magnitude).
fn check_case(
    dev: Device,
    dtype: DType,
    cfg: &AttentionConfig,
    mask: Option<&[u8]>,
    std: f32,
    tol: (f32, f32),
) -> Result<()> {
    let x = inputs(cfg, dtype, std, 11, dev)?;
    let [q, k, v, dout] = &x.t;
    let r = reference(&x.f[0], &x.f[1], &x.f[2], &x.f[3], mask, cfg);
    let (out, lse) = attention_forward(q, k, v, mask, cfg)?;
    assert_eq!(out.shape(), q.shape());
    assert_eq!(out.dtype(), dtype);
    assert_eq!(out.device(), dev);
    let what = format!("{dtype} {cfg:?}");
    assert_close_scaled(
        &out.to_device(Device::Cpu)?.to_vec_f32()?,
        &to32(&r.out),
        tol.0,
        &format!("out {what}"),
    );
    let lse = lse.to_device(Device::Cpu)?.to_vec_f32()?;
    assert_eq!(lse.len(), r.lse.len());
    for (n, (&a, &e)) in lse.iter().zip(&r.lse).enumerate() {
        if e.is_infinite() {
            assert_eq!(a, f32::INFINITY, "lse[{n}] of a fully masked row, {what}");
        } else {
            assert!(
                (a as f64 - e).abs() <= 1e-3 * (1.0 + e.abs()),
                "lse[{n}]: {a} vs {e}, {what}"
            );
        }
    }
    let (dq, dk, dv) = attention_backward(q, k, v, &out, &lse_tensor(&lse, dev)?, dout, mask, cfg)?;
    for (name, got, want) in [("dq", &dq, &r.dq), ("dk", &dk, &r.dk), ("dv", &dv, &r.dv)] {
        assert_eq!(got.dtype(), dtype);
        // Scaled by the largest magnitude, floored: with one visible key the exact gradient of q and k
        // is 0 and the computed one is the rounding of dP - D.
        let scale = want.iter().fold(0.1f64, |m, x| m.max(x.abs())) as f32;
        let got = got.to_device(Device::Cpu)?.to_vec_f32()?;
        assert_close(&got, &to32(want), 0.0, tol.1 * scale, &format!("{name} {what}"));
    }
    Ok(())
}

fn lse_tensor(lse: &[f32], dev: Device) -> Result<Tensor> {
    Tensor::from_slice(lse, &[lse.len()], dev)
}

fn cfg(batch: usize, seq_q: usize, seq_k: usize, heads: usize, kv: usize, d: usize) -> AttentionConfig {
    AttentionConfig {
        seq_q,
        seq_k,
        num_kv_heads: kv,
        ..AttentionConfig::new(batch, seq_q, heads, d)
    }
}

/// A padding mask: sequence b keeps its first `len(b)` keys.
fn right_padding(batch: usize, seq_k: usize, lens: &[usize]) -> Vec<u8> {
    (0..batch * seq_k)
        .map(|t| u8::from(t % seq_k < lens[t / seq_k]))
        .collect()
}

const F32_TOL: (f32, f32) = (2e-5, 5e-5);

fn padding_mask_and_fully_masked_rows(dev: Device) -> Result<()> {
    // Sequence 2 is all padding: every query row of it is fully masked (output 0, lse +inf, no gradient).
    let c = cfg(3, 7, 7, 3, 3, 5);
    let mask = right_padding(3, 7, &[7, 4, 0]);
    check_case(dev, DType::F32, &c, Some(&mask), 1.0, F32_TOL)
}

fn causal_with_left_padding(dev: Device) -> Result<()> {
    // Left padding: key 0 of sequence 1 is masked, so its query 0 (which sees only key 0) has no key.
    let c = AttentionConfig {
        causal: true,
        ..cfg(2, 9, 9, 2, 2, 8)
    };
    let mask: Vec<u8> = (0..18).map(|t| u8::from(t != 9 && t != 10)).collect();
    check_case(dev, DType::F32, &c, Some(&mask), 1.0, F32_TOL)
}

fn causal_rectangular(dev: Device) -> Result<()> {
    // seq_q < seq_k (a continuation over a longer prefix) and seq_q > seq_k (leading rows see nothing).
    for (sq, sk) in [(5, 13), (11, 4)] {
        let c = AttentionConfig {
            causal: true,
            ..cfg(2, sq, sk, 2, 1, 16)
        };
        check_case(dev, DType::F32, &c, None, 1.0, F32_TOL)?;
    }
    Ok(())
}

fn causal_long_rectangular(dev: Device) -> Result<()> {
    // Long enough for the CPU's causal row blocks (about seq_q / 8 rows each, skipping the keys above a
    // block) to split every product several ways, with ragged last blocks, GQA, padding and dropout.
    for (sq, sk) in [(150, 150), (131, 170), (170, 131)] {
        let c = AttentionConfig {
            causal: true,
            dropout: Some((0.1, 77)),
            ..cfg(2, sq, sk, 4, 2, 24)
        };
        let mask = right_padding(2, sk, &[sk, sk - 9]);
        check_case(dev, DType::F32, &c, Some(&mask), 1.0, (5e-5, 1e-4))?;
    }
    Ok(())
}

fn gqa_4_to_1(dev: Device) -> Result<()> {
    let c = AttentionConfig {
        causal: true,
        ..cfg(2, 17, 17, 8, 2, 32)
    };
    let mask = right_padding(2, 17, &[17, 12]);
    check_case(dev, DType::F32, &c, Some(&mask), 1.0, F32_TOL)
}

fn attention_dropout(dev: Device) -> Result<()> {
    let c = AttentionConfig {
        dropout: Some((0.3, 1234)),
        ..cfg(2, 10, 10, 4, 2, 8)
    };
    let mask = right_padding(2, 10, &[10, 6]);
    check_case(dev, DType::F32, &c, Some(&mask), 1.0, F32_TOL)?;
    // p = 0 is no dropout at all.
    let none = attention_forward_f32(&c, dev, Some(&mask), Some((0.0, 99)))?;
    let plain = attention_forward_f32(&c, dev, Some(&mask), None)?;
    assert_eq!(none, plain);
    // Another seed drops other probabilities.
    let a = attention_forward_f32(&c, dev, Some(&mask), Some((0.3, 1)))?;
    let b = attention_forward_f32(&c, dev, Some(&mask), Some((0.3, 2)))?;
    assert_ne!(a, b);
    Ok(())
}

fn attention_forward_f32(
    c: &AttentionConfig,
    dev: Device,
    mask: Option<&[u8]>,
    dropout: Option<(f32, u64)>,
) -> Result<Vec<f32>> {
    let c = AttentionConfig { dropout, ..c.clone() };
    let x = inputs(&c, DType::F32, 1.0, 5, dev)?;
    let (out, _) = attention_forward(&x.t[0], &x.t[1], &x.t[2], mask, &c)?;
    out.to_device(Device::Cpu)?.to_vec_f32()
}

fn head_dims_and_long_sequences(dev: Device) -> Result<()> {
    // The CUDA kernels' tile sizes: head_dim 32/64/128, and sequences that are not multiples of a tile.
    for (d, s) in [(32, 70), (64, 129), (128, 33), (24, 19)] {
        let c = cfg(1, s, s, 2, 2, d);
        let mask = right_padding(1, s, &[s - 3]);
        check_case(dev, DType::F32, &c, Some(&mask), 1.0, (5e-5, 1e-4))?;
    }
    Ok(())
}

fn half_precision(dev: Device) -> Result<()> {
    // Inputs rounded to the dtype on both sides; the error is the f32-accumulated math plus rounding the
    // output and the gradients once (and on CUDA P rounded for the tensor-core P·V).
    for (dtype, tol) in [(DType::BF16, (1.5e-2, 3e-2)), (DType::F16, (2e-3, 5e-3))] {
        // head_dim 32/64/128 are the CUDA tensor-core forward's; 48 takes the SIMT path. Sequences span
        // several 64-row / 64-key tiles with ragged tails.
        for d in [32, 48, 64, 128] {
            let s = 37 + d / 2;
            let c = AttentionConfig {
                causal: d >= 64,
                ..cfg(2, s, s, 4, 2, d)
            };
            let mask = right_padding(2, s, &[s, 20]);
            check_case(dev, dtype, &c, Some(&mask), 1.0, tol)?;
        }
    }
    Ok(())
}

fn extreme_scores(dev: Device) -> Result<()> {
    // Scores up to ~±400: the softmax is one-hot-like and must not overflow to inf/NaN.
    let c = AttentionConfig {
        scale: 4.0,
        ..cfg(2, 12, 12, 2, 2, 8)
    };
    let mask = right_padding(2, 12, &[12, 5]);
    check_case(dev, DType::F32, &c, Some(&mask), 3.0, (1e-4, 1e-3))
}

device_test!(
    padding_mask_and_fully_masked_rows,
    causal_with_left_padding,
    causal_rectangular,
    causal_long_rectangular,
    gqa_4_to_1,
    attention_dropout,
    head_dims_and_long_sequences,
    half_precision,
    extreme_scores,
);

/// Through the tape, against central differences of the f64 forward (independent of the analytic
/// reference above), with every option on.
fn tape_gradients_match_finite_differences(dev: Device) -> Result<()> {
    let c = AttentionConfig {
        causal: true,
        dropout: Some((0.2, 77)),
        ..cfg(2, 6, 8, 4, 2, 4)
    };
    let mask = right_padding(2, 8, &[8, 5]);
    let x = inputs(&c, DType::F32, 1.0, 3, dev)?;
    let mut store = ParamStore::new();
    let ids = [
        store.insert("q", x.t[0].clone())?,
        store.insert("k", x.t[1].clone())?,
        store.insert("v", x.t[2].clone())?,
    ];
    let mut tape = Tape::new();
    let q = tape.param(&store, ids[0])?;
    let k = tape.param(&store, ids[1])?;
    let v = tape.param(&store, ids[2])?;
    let y = tape.attention(q, k, v, Some(&mask), &c)?;
    let grads = tape.backward_with(y, x.t[3].clone())?;
    let r = &x.f[3];
    for (n, id) in ids.iter().enumerate() {
        let loss = |z: &[f64]| {
            let mut args = [x.f[0].clone(), x.f[1].clone(), x.f[2].clone()];
            args[n] = z.to_vec();
            let out = reference(&args[0], &args[1], &args[2], r, Some(&mask), &c).out;
            out.iter().zip(r).map(|(a, b)| a * b).sum::<f64>()
        };
        let idx = sample_indices(x.f[n].len(), 40, n as u64);
        let fd = finite_difference_f64(loss, &x.f[n], 1e-5, &idx)?;
        let got = grads
            .get(*id)
            .expect("gradient")
            .to_device(Device::Cpu)?
            .to_vec_f32()?;
        let got: Vec<f32> = idx.iter().map(|&i| got[i]).collect();
        assert_close(
            &got,
            &to32(&fd),
            1e-3,
            1e-4,
            &format!("tape d{}", ["q", "k", "v"][n]),
        );
    }
    Ok(())
}

/// A tape without trainable inputs records nothing; one trainable input gets exactly its gradient.
fn tape_partial_gradients(dev: Device) -> Result<()> {
    let c = cfg(1, 5, 5, 2, 2, 4);
    let x = inputs(&c, DType::F32, 1.0, 9, dev)?;
    let mut store = ParamStore::new();
    let kid = store.insert("k", x.t[1].clone())?;
    let mut tape = Tape::new();
    let q = tape.leaf(x.t[0].clone());
    let k = tape.param(&store, kid)?;
    let v = tape.leaf(x.t[2].clone());
    let y = tape.attention(q, k, v, None, &c)?;
    let grads = tape.backward_with(y, x.t[3].clone())?;
    let r = reference(&x.f[0], &x.f[1], &x.f[2], &x.f[3], None, &c);
    let dk = grads.get(kid).expect("dk").to_device(Device::Cpu)?.to_vec_f32()?;
    assert_close_scaled(&dk, &to32(&r.dk), 5e-5, "dk");
    let mut tape = Tape::new();
    let (q, k, v) = (
        tape.leaf(x.t[0].clone()),
        tape.leaf(x.t[1].clone()),
        tape.leaf(x.t[2].clone()),
    );
    let y = tape.attention(q, k, v, None, &c)?;
    assert!(!tape.requires_grad(y));
    Ok(())
}

device_test!(tape_gradients_match_finite_differences, tape_partial_gradients);

#[test]
fn bad_input_is_an_error() -> Result<()> {
    let dev = Device::Cpu;
    let c = cfg(2, 3, 3, 4, 2, 8);
    let x = inputs(&c, DType::F32, 1.0, 1, dev)?;
    let [q, k, v, _] = &x.t;
    let bad = |c: AttentionConfig| attention_forward(q, k, v, None, &c).is_err();
    assert!(
        bad(AttentionConfig {
            num_kv_heads: 3,
            ..c.clone()
        }),
        "heads not a multiple"
    );
    assert!(
        bad(AttentionConfig {
            num_kv_heads: 0,
            ..c.clone()
        }),
        "zero kv heads"
    );
    assert!(
        bad(AttentionConfig {
            head_dim: 4,
            ..c.clone()
        }),
        "shape mismatch"
    );
    assert!(
        bad(AttentionConfig {
            seq_k: 4,
            ..c.clone()
        }),
        "k rows"
    );
    assert!(
        bad(AttentionConfig {
            dropout: Some((1.0, 0)),
            ..c.clone()
        }),
        "p = 1"
    );
    assert!(
        bad(AttentionConfig {
            scale: f32::NAN,
            ..c.clone()
        }),
        "NaN scale"
    );
    assert!(
        bad(AttentionConfig {
            batch: usize::MAX,
            ..c.clone()
        }),
        "overflow"
    );
    assert!(
        attention_forward(q, k, v, Some(&[1, 1, 1]), &c).is_err(),
        "mask length"
    );
    assert!(
        attention_forward(q, q, v, None, &c).is_err(),
        "k with query heads"
    );
    let k16 = k.to_dtype(DType::F16)?;
    assert!(attention_forward(q, &k16, v, None, &c).is_err(), "mixed dtypes");
    let (out, lse) = attention_forward(q, k, v, None, &c)?;
    assert!(attention_backward(q, k, v, &out, &lse, &out, None, &c).is_ok());
    let short = Tensor::zeros(&[5], DType::F32, dev)?;
    assert!(
        attention_backward(q, k, v, &out, &short, &out, None, &c).is_err(),
        "lse length"
    );
    assert!(
        attention_backward(q, k, v, &out, &lse, &k.clone(), None, &c).is_err(),
        "grad shape"
    );
    Ok(())
}

#[test]
fn empty_batch_and_no_keys() -> Result<()> {
    // batch 0: empty outputs; seq_k 0: every row fully masked.
    for c in [cfg(0, 4, 4, 2, 2, 8), cfg(2, 3, 0, 2, 2, 8)] {
        let x = inputs(&c, DType::F32, 1.0, 1, Device::Cpu)?;
        let (out, lse) = attention_forward(&x.t[0], &x.t[1], &x.t[2], None, &c)?;
        assert!(out.to_vec_f32()?.iter().all(|&x| x == 0.0));
        assert!(lse.to_vec_f32()?.iter().all(|&x| x == f32::INFINITY));
        let (dq, dk, dv) = attention_backward(&x.t[0], &x.t[1], &x.t[2], &out, &lse, &x.t[3], None, &c)?;
        assert!(dq.to_vec_f32()?.iter().all(|&x| x == 0.0));
        assert_eq!((dk.numel(), dv.numel()), (0, 0));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random odd shapes, GQA groups, masks, causal and dropout against f64, on every device present.
    #[test]
    fn random_shapes(batch in 1usize..3, sq in 1usize..20, sk in 1usize..20, kv in 1usize..3, group in 1usize..4,
                     d in 1usize..20, causal: bool, p in prop_oneof![Just(0.0f32), 0.05f32..0.6], seed: u64,
                     lens in proptest::collection::vec(0usize..20, 2)) {
        let c = AttentionConfig {
            causal,
            dropout: Some((p, seed)),
            ..cfg(batch, sq, sk, kv * group, kv, d)
        };
        let lens: Vec<usize> = lens.iter().map(|&l| l.min(sk)).collect();
        let mask = right_padding(batch, sk, &lens);
        check_case(Device::Cpu, DType::F32, &c, Some(&mask), 1.0, F32_TOL).unwrap();
        if peft_kernels::cuda_device_count() > 0 {
            check_case(Device::Cuda(0), DType::F32, &c, Some(&mask), 1.0, F32_TOL).unwrap();
        }
    }
}
