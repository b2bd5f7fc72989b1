//! The k-bit storage tiers (`peft_kernels::kbit`): code books, packing, quantization against an f64
//! reference, the fused linear over every tier, byte counts, and the tiny BERT loaded in every tier.

mod common;

use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::io::SafetensorsFile;
use peft_kernels::io::peft::TargetModules;
use peft_kernels::kbit::{self, KBitTensor, Tier};
use peft_kernels::models::{self, BertBatch, ModelLoadOptions, QuantizeOnLoad};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::qmatmul::{
    Algo, BaseWeight, LowRankBwd, LowRankFwd, linear_backward_input, linear_forward,
};
use peft_kernels::quant::{NF4_CODE, QuantizeOptions, QuantizedTensor, dynamic_map};
use peft_kernels::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ------------------------------------------------------------------------------------------------
// Code books

#[test]
fn normal_float_books_have_the_nf_properties() {
    for bits in [2u8, 3] {
        let c = kbit::code(bits).unwrap();
        assert_eq!(c.len(), 1 << bits);
        assert!(c.windows(2).all(|w| w[0] < w[1]), "{bits}-bit book sorted: {c:?}");
        assert_eq!((c[0], c[c.len() - 1]), (-1.0, 1.0), "{bits}-bit book ends at ±1");
        let zero = c.iter().position(|&v| v == 0.0).expect("an exact zero");
        assert_eq!(zero, kbit::zero_code(bits) as usize);
        // Asymmetric halves: one more positive code than negative ones.
        let (neg, pos) = (
            c.iter().filter(|&&v| v < 0.0).count(),
            c.iter().filter(|&&v| v > 0.0).count(),
        );
        assert_eq!(pos, neg + 1, "{bits}-bit book {c:?}");
        // And not mirrored: the inner positive codes are not the negated negative ones.
        assert!(c[1] != -c[c.len() - 2], "{c:?}");
    }
    // Hand values for NF2: Φ⁻¹ of linspace(0.8541667, 0.5, 3)[:2] = (1.0552, 0.4599), normalized.
    let c2 = kbit::code(2).unwrap();
    assert!((c2[2] - 0.4359).abs() < 1e-3, "{c2:?}");
}

#[test]
fn the_builder_reproduces_nf4_at_four_bits() {
    assert!((kbit::normal_float_offset(4) - 0.9677083).abs() < 1e-7);
    // bitsandbytes' constant 0.9677083 (the formula's value cut to 7 digits) gives its table to f32
    // rounding; the exact formula's offset is one f32 ulp higher and moves the entries by < 1e-6.
    for (offset, tol) in [
        (0.9677083f32, 2.0 * f32::EPSILON),
        (kbit::normal_float_offset(4) as f32, 1e-6),
    ] {
        let c = kbit::create_normal_map(4, offset).unwrap();
        for (i, (&a, &b)) in c.iter().zip(NF4_CODE.iter()).enumerate() {
            assert!(
                (a - b).abs() <= tol,
                "NF4 entry {i} (offset {offset}): built {a}, bitsandbytes {b}"
            );
        }
    }
    assert!(kbit::create_normal_map(1, 0.9).is_err());
    assert!(kbit::create_normal_map(3, 0.4).is_err());
    assert!(kbit::code(4).is_err());
}

/// Nearest-entry quantization error of Gaussian blocks (blocksize 64) under a 256-entry book.
fn book_error(book: &[f32], x: &[f32], decode: impl Fn(usize) -> f64) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for blk in x.chunks(64) {
        let m = blk.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        for &v in blk {
            let s = v as f64 / m;
            let best = (0..book.len())
                .min_by(|&a, &b| (decode(a) - s).abs().total_cmp(&(decode(b) - s).abs()))
                .unwrap();
            num += (decode(best) * m - v as f64).powi(2);
            den += (v as f64).powi(2);
        }
    }
    (num / den).sqrt()
}

#[test]
fn int8_beats_the_dynamic_map_on_gaussian_weights() {
    // The module docs' reason for absmax int8 at 8 bits, measured.
    let x = Tensor::randn(&[64 * 256], 1.0, 7, DType::F32, Device::Cpu)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let int8 = kbit::code(8).unwrap();
    let e_int8 = book_error(int8, &x, |c| int8[c] as f64);
    let dm = dynamic_map();
    let e_dyn = book_error(dm, &x, |c| dm[c] as f64);
    println!("8-bit relative error on N(0,1) blocks of 64: int8 {e_int8:.2e}, dynamic map {e_dyn:.2e}");
    assert!(e_int8 < 0.8 * e_dyn, "int8 {e_int8} vs dynamic {e_dyn}");
}

// ------------------------------------------------------------------------------------------------
// Packing and quantization against an f64 reference

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pack_unpack_round_trips(bits in prop::sample::select(vec![2u8, 3, 8]), seed in any::<u64>(), n in 0usize..70) {
        let mask = if bits == 8 { 255u16 } else { (1u16 << bits) - 1 };
        let codes: Vec<u8> = (0..n).map(|i| ((seed.rotate_left(i as u32 * 7) ^ i as u64) as u16 & mask) as u8).collect();
        let packed = kbit::pack_codes(bits, &codes).unwrap();
        prop_assert_eq!(packed.len(), (n * bits as usize).div_ceil(8));
        prop_assert_eq!(kbit::unpack_codes(bits, &packed, n).unwrap(), codes);
    }

    #[test]
    fn quantize_matches_the_f64_reference(
        bits in prop::sample::select(vec![2u8, 3, 8]),
        bs in prop::sample::select(vec![32usize, 64, 128]),
        n in 1usize..400,
        scale_exp in -30i32..30,
        seed in any::<u64>(),
        zero_block in any::<bool>(),
        dq in any::<bool>(),
    ) {
        let mut x = Tensor::randn(&[n], 1.0, seed, DType::F32, Device::Cpu).unwrap().to_vec_f32().unwrap();
        let scale = 10f32.powi(scale_exp);
        x.iter_mut().for_each(|v| *v *= scale);
        if zero_block {
            x[..bs.min(n)].iter_mut().for_each(|v| *v = 0.0);
        }
        if n > 3 {
            x[n / 2] = f32::MAX / 2.0 * (seed % 2) as f32; // an extreme value in some cases
        }
        check_against_reference(&x, bits, bs, dq);
    }
}

/// Every code is a nearest code of `x / absmax` (f64), absmax is the exact block max, and the
/// dequantized values are `code[c] * absmax` in f32 with the (possibly double-quantized) absmax.
fn check_against_reference(x: &[f32], bits: u8, bs: usize, dq: bool) {
    let n = x.len();
    let opts = QuantizeOptions {
        blocksize: bs,
        double_quant: dq,
        ..Default::default()
    };
    let t = Tensor::from_vec(x.to_vec(), &[n], Device::Cpu).unwrap();
    let q = KBitTensor::quantize(&t, bits, &opts).unwrap();
    q.validate("test").unwrap();
    let codes = kbit::unpack_codes(bits, &q.data.to_vec::<u8>().unwrap(), n).unwrap();
    let book = kbit::code(bits).unwrap();
    let plain = KBitTensor::quantize(
        &t,
        bits,
        &QuantizeOptions {
            double_quant: false,
            ..opts.clone()
        },
    )
    .unwrap();
    let absmax_exact = plain.absmax_f32().unwrap();
    let absmax_used = q.absmax_f32().unwrap();
    let deq = q.dequantize(DType::F32).unwrap().to_vec_f32().unwrap();
    for (b, blk) in x.chunks(bs).enumerate() {
        let m = blk.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        assert_eq!(absmax_exact[b] as f64, m, "block {b} absmax");
        for (j, &v) in blk.iter().enumerate() {
            let i = b * bs + j;
            let c = codes[i] as usize;
            if m == 0.0 {
                assert_eq!(c, kbit::zero_code(bits) as usize, "zero block code");
                assert_eq!(deq[i], 0.0);
                continue;
            }
            let s = v as f64 / m;
            let valid: Vec<usize> = if bits == 8 {
                (0..256).filter(|&k| k != 128).collect()
            } else {
                (0..book.len()).collect()
            };
            let best = valid
                .iter()
                .map(|&k| (book[k] as f64 - s).abs())
                .fold(f64::INFINITY, f64::min);
            assert!(
                (book[c] as f64 - s).abs() <= best + 1e-6,
                "{bits}-bit element {i}: x {v}, absmax {m}, code {c} ({}) is not a nearest code",
                book[c]
            );
            assert_eq!(
                deq[i],
                book[c] * absmax_used[b],
                "element {i} decodes as code * absmax"
            );
        }
    }
}

#[test]
fn quantization_edge_cases() {
    // Odd sizes, all zeros, one huge value, a partial last block.
    for bits in [2u8, 3, 8] {
        check_against_reference(&[0.0; 37], bits, 32, false);
        check_against_reference(&[1.0, -1.0, 0.5, -0.25, 3e38, -3e38, 1e-30], bits, 32, true);
        let v: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect();
        check_against_reference(&v, bits, 64, true);
    }
    let bad = Tensor::from_vec(vec![1.0, f32::NAN, 2.0], &[3], Device::Cpu).unwrap();
    for bits in [2u8, 3, 8, 16] {
        assert!(matches!(
            KBitTensor::quantize(&bad, bits, &QuantizeOptions::default()),
            Err(Error::NonFinite { index: 1, .. })
        ));
    }
    let ok = Tensor::from_vec(vec![1.0f32; 8], &[8], Device::Cpu).unwrap();
    assert!(KBitTensor::quantize(&ok, 4, &QuantizeOptions::default()).is_err());
    assert!(
        KBitTensor::quantize(
            &ok,
            2,
            &QuantizeOptions {
                blocksize: 48,
                ..Default::default()
            }
        )
        .is_err()
    );
    // 16 bits: bf16 storage, exactly the bf16 rounding.
    let w = Tensor::randn(&[5, 7], 1.0, 3, DType::F32, Device::Cpu).unwrap();
    let q = KBitTensor::quantize(&w, 16, &QuantizeOptions::default()).unwrap();
    assert_eq!(q.size_in_bytes(), 2 * 35);
    assert_eq!(
        q.dequantize(DType::F32).unwrap().to_vec_f32().unwrap(),
        w.to_dtype(DType::BF16).unwrap().to_vec_f32().unwrap()
    );
}

// ------------------------------------------------------------------------------------------------
// Byte counts

fn tier_weight(w: &Tensor, tier: Tier, opts: &QuantizeOptions) -> Result<BaseWeight> {
    Ok(match tier {
        Tier::Bits4 => BaseWeight::Quantized(QuantizedTensor::quantize(w, opts)?),
        t => BaseWeight::KBit(KBitTensor::quantize(w, t.bits(), opts)?),
    })
}

#[test]
fn storage_bytes_equal_size_in_bytes() {
    for (out, inp) in [(1, 1), (7, 13), (64, 64), (384, 1536), (33, 300)] {
        let w = Tensor::randn(&[out, inp], 0.1, 1, DType::F32, Device::Cpu).unwrap();
        for dq in [false, true] {
            for bs in [32, 64, 256] {
                let opts = QuantizeOptions {
                    blocksize: bs,
                    double_quant: dq,
                    ..Default::default()
                };
                for tier in Tier::ALL {
                    let bw = tier_weight(&w, tier, &opts).unwrap();
                    assert_eq!(
                        tier.storage_bytes(out * inp, &opts),
                        bw.size_in_bytes(),
                        "{tier}-bit {out}x{inp} bs {bs} dq {dq} ({})",
                        bw.format_name()
                    );
                    let (_, bytes) = kbit::round_trip(&w, tier, &opts).unwrap();
                    assert_eq!(bytes, bw.size_in_bytes());
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The fused linear over every tier

fn f64v(t: &Tensor) -> Vec<f64> {
    common::f64s(t).unwrap()
}

fn linear_every_tier(dev: Device) -> Result<()> {
    let (out, inp, r) = (37, 70, 3);
    for tokens in [1usize, 5, 17, 40] {
        for tier in [Tier::Bits2, Tier::Bits3, Tier::Bits8, Tier::Bits16] {
            for dq in [false, true] {
                let opts = QuantizeOptions {
                    blocksize: 32,
                    double_quant: dq,
                    ..Default::default()
                };
                let w = Tensor::randn(&[out, inp], 0.5, 11, DType::F32, dev)?;
                let bw = BaseWeight::KBit(KBitTensor::quantize(&w, tier.bits(), &opts)?);
                let wd = f64v(&bw.dequantize(DType::F32)?);
                let x = Tensor::randn(&[tokens, inp], 1.0, 12, DType::F32, dev)?;
                let u = Tensor::randn(&[tokens, r], 1.0, 13, DType::F32, dev)?;
                let b = Tensor::randn(&[out, r], 1.0, 14, DType::F32, dev)?;
                let bias = Tensor::randn(&[out], 1.0, 15, DType::F32, dev)?;
                let y = linear_forward(
                    &x,
                    &bw,
                    Some(&bias),
                    Some(LowRankFwd { u: &u, b: &b }),
                    Algo::Auto,
                )?;
                let (xs, us, bs, bias_s) = (f64v(&x), f64v(&u), f64v(&b), f64v(&bias));
                let mut want = vec![0f64; tokens * out];
                for t in 0..tokens {
                    for o in 0..out {
                        let mut acc = bias_s[o];
                        acc += (0..inp).map(|k| xs[t * inp + k] * wd[o * inp + k]).sum::<f64>();
                        acc += (0..r).map(|j| us[t * r + j] * bs[o * r + j]).sum::<f64>();
                        want[t * out + o] = acc;
                    }
                }
                let what = format!("{tier}-bit dq {dq} forward at {tokens} tokens on {dev}");
                common::assert_close(
                    &f64v(&y).iter().map(|&v| v as f32).collect::<Vec<_>>(),
                    &common::to32(&want),
                    1e-4,
                    1e-4,
                    &what,
                );
                // dx = dy·W + v·a
                let dy = Tensor::randn(&[tokens, out], 1.0, 16, DType::F32, dev)?;
                let v = Tensor::randn(&[tokens, r], 1.0, 17, DType::F32, dev)?;
                let a = Tensor::randn(&[r, inp], 1.0, 18, DType::F32, dev)?;
                let dx = linear_backward_input(&dy, &bw, Some(LowRankBwd { v: &v, a: &a }), Algo::Auto)?;
                let (dys, vs, as_) = (f64v(&dy), f64v(&v), f64v(&a));
                let mut want = vec![0f64; tokens * inp];
                for t in 0..tokens {
                    for k in 0..inp {
                        let mut acc = (0..out).map(|o| dys[t * out + o] * wd[o * inp + k]).sum::<f64>();
                        acc += (0..r).map(|j| vs[t * r + j] * as_[j * inp + k]).sum::<f64>();
                        want[t * inp + k] = acc;
                    }
                }
                let what = format!("{tier}-bit dq {dq} dx at {tokens} tokens on {dev}");
                common::assert_close(
                    &f64v(&dx).iter().map(|&v| v as f32).collect::<Vec<_>>(),
                    &common::to32(&want),
                    1e-4,
                    1e-4,
                    &what,
                );
                // The stored weight differs from W by the tier's rounding, and by no more.
                let wf = f64v(&w);
                let err = wf
                    .iter()
                    .zip(&wd)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    / wf.iter().map(|a| a * a).sum::<f64>().sqrt();
                let bound = match tier {
                    Tier::Bits2 => 0.5,
                    Tier::Bits3 => 0.25,
                    Tier::Bits8 => 0.01,
                    _ => 0.005,
                };
                assert!(err > 0.0 && err < bound, "{tier}-bit relative error {err}");
            }
        }
    }
    Ok(())
}

fn dequantize_matches_cpu(dev: Device) -> Result<()> {
    // The device's quantize + dequantize against the CPU's, bit for bit, several dtypes.
    let w = Tensor::randn(&[61, 47], 0.3, 5, DType::F32, Device::Cpu)?;
    for bits in [2u8, 3, 8, 16] {
        for dq in [false, true] {
            let opts = QuantizeOptions {
                blocksize: 64,
                double_quant: dq,
                ..Default::default()
            };
            let cpu = KBitTensor::quantize(&w, bits, &opts)?;
            let dev_q = KBitTensor::quantize(&w.to_device(dev)?, bits, &opts)?;
            assert_eq!(
                dev_q.data.to_bytes()?,
                cpu.data.to_bytes()?,
                "{bits}-bit codes on {dev}"
            );
            assert_eq!(
                dev_q.absmax_f32()?,
                cpu.absmax_f32()?,
                "{bits}-bit absmax on {dev}"
            );
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let a = dev_q.dequantize(dt)?.to_bytes()?;
                let b = cpu.dequantize(dt)?.to_bytes()?;
                assert_eq!(a, b, "{bits}-bit dq {dq} dequantize to {dt:?} on {dev}");
            }
        }
    }
    Ok(())
}

device_test!(linear_every_tier, dequantize_matches_cpu);

// ------------------------------------------------------------------------------------------------
// The tiny BERT in every tier

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(case)
}

fn ints(f: &SafetensorsFile, name: &str) -> Vec<u32> {
    let (_, _, bytes) = f.raw(name).unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

fn fixture_batch(io: &SafetensorsFile) -> BertBatch {
    let (_, shape, _) = io.raw("input_ids").unwrap();
    BertBatch {
        input_ids: ints(io, "input_ids"),
        token_type_ids: ints(io, "token_type_ids"),
        attention_mask: ints(io, "attention_mask").into_iter().map(|m| m as u8).collect(),
        batch: shape[0],
        seq: shape[1],
    }
}

/// Every backbone linear of the tiny BERT in `tier_of(index)`.
fn tiered(tier_of: impl Fn(usize) -> Tier) -> ModelLoadOptions {
    let dense =
        models::from_pretrained_seq_cls(fixture("tiny"), &Default::default(), &mut ParamStore::new(), 0)
            .unwrap();
    let tiers: BTreeMap<String, Tier> = dense
        .bert()
        .linears()
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name().to_string(), tier_of(i)))
        .collect();
    ModelLoadOptions {
        quantize: Some(QuantizeOnLoad {
            targets: TargetModules::Names(vec![]),
            options: QuantizeOptions {
                blocksize: 32,
                ..Default::default()
            },
            tiers,
        }),
        ..Default::default()
    }
}

#[test]
fn tiny_bert_loads_in_every_tier() {
    let io = SafetensorsFile::open(fixture("tiny").join("io.safetensors")).unwrap();
    let b = fixture_batch(&io);
    let mut store = ParamStore::new();
    let dense = models::from_pretrained_seq_cls(fixture("tiny"), &Default::default(), &mut store, 0).unwrap();
    let want = dense.logits(&store, &b).unwrap().to_vec_f32().unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    // Mixed: the tiers cycle over the linears. Then each tier alone, with a bound that shrinks with bits.
    let mut cases: Vec<(String, ModelLoadOptions, f32)> =
        vec![("mixed".into(), tiered(|i| Tier::ALL[i % 5]), 1.0)];
    for (tier, bound) in [
        (Tier::Bits2, 1.0),
        (Tier::Bits3, 0.5),
        (Tier::Bits4, 0.3),
        (Tier::Bits8, 0.02),
        (Tier::Bits16, 0.01),
    ] {
        cases.push((format!("{tier}-bit"), tiered(|_| tier), bound));
    }
    let mut errs = Vec::new();
    for (tag, opts, bound) in cases {
        let mut store = ParamStore::new();
        let m = models::from_pretrained_seq_cls(fixture("tiny"), &opts, &mut store, 0).unwrap();
        let spec = opts.quantize.as_ref().unwrap();
        for s in m.bert().linears() {
            let tier = spec.tier_for(s.name()).unwrap();
            let numel = s.base().out_features() * s.base().in_features();
            assert_eq!(
                tier.storage_bytes(numel, &spec.options),
                s.base().size_in_bytes(),
                "{tag} {}",
                s.name()
            );
            let expect_kbit = matches!(tier, Tier::Bits2 | Tier::Bits3 | Tier::Bits8 | Tier::Bits16);
            assert_eq!(
                matches!(s.base(), BaseWeight::KBit(_)),
                expect_kbit,
                "{tag} {}",
                s.name()
            );
        }
        let got = m.logits(&store, &b).unwrap().to_vec_f32().unwrap();
        let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        println!("tiny BERT {tag}: max |logits - dense| / max |dense| = {err:.3e}");
        assert!(err < bound, "{tag}: {err}");
        errs.push(err);
    }
    // More bits, closer to dense (2 → 3 → 8 → 16 are far apart on this model).
    assert!(
        errs[1] > errs[4] && errs[2] > errs[4] && errs[4] > errs[5],
        "{errs:?}"
    );
}

#[test]
fn lora_trains_through_a_two_bit_base() {
    let io = SafetensorsFile::open(fixture("tiny").join("io.safetensors")).unwrap();
    let b = fixture_batch(&io);
    let labels = ints(&io, "labels");
    let mut store = ParamStore::new();
    let mut m =
        models::from_pretrained_seq_cls(fixture("tiny"), &tiered(|_| Tier::Bits2), &mut store, 0).unwrap();
    m.load_adapter(fixture("tiny").join("lora"), &mut store).unwrap();
    assert!(
        m.bert()
            .linears()
            .iter()
            .all(|s| matches!(s.base(), BaseWeight::KBit(k) if k.bits == 2))
    );
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    })
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..15 {
        let mut tape = Tape::new();
        let logits = m.forward_t(&mut tape, &store, &b, None).unwrap();
        let loss = tape.cross_entropy(logits, &labels).unwrap();
        losses.push(tape.value(loss).unwrap().to_scalar().unwrap());
        let grads = tape.backward(loss).unwrap();
        drop(tape);
        opt.step(&mut store, &grads).unwrap();
    }
    println!("LoRA on a 2-bit tiny BERT: loss {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(
        losses[14] < 0.7 * losses[0],
        "loss {} -> {}",
        losses[0],
        losses[14]
    );
}

/// `peftk inspect DIR --tiers ...` on the tiny fixture: a row per linear weight, the totals, and the
/// byte and error columns ordered by bits.
#[cfg(feature = "cli")]
#[test]
fn inspect_reports_every_tier() {
    let out = assert_cmd::Command::cargo_bin("peftk")
        .unwrap()
        .args([
            "inspect",
            fixture("tiny").to_str().unwrap(),
            "--tiers",
            "2,3,4,8,16",
            "--blocksize",
            "32",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    println!("{text}");
    assert!(text.contains("blocksize 32, double quant on"));
    let total = text
        .lines()
        .find(|l| l.trim_start().starts_with("all "))
        .expect("a totals row");
    let nums: Vec<f64> = total.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    // [weights, params, (B/w, err) x 5]
    let cols = &nums[nums.len() - 10..];
    let (bpw, err): (Vec<f64>, Vec<f64>) = cols.chunks(2).map(|c| (c[0], c[1])).unzip();
    // (On 20x20 weights the 1 KiB nested code book of double quantization outweighs the codes, so
    // 2/3/4/8-bit cost more than bf16's 2 bytes here; among themselves they still grow with bits.)
    assert!(
        bpw[..4].windows(2).all(|w| w[0] < w[1]),
        "bytes per weight grow with bits: {bpw:?}"
    );
    assert!(
        err.windows(2).all(|w| w[0] > w[1]),
        "error falls with bits: {err:?}"
    );
    assert_eq!(bpw[4], 2.0);
    let bad = assert_cmd::Command::cargo_bin("peftk")
        .unwrap()
        .args(["inspect", fixture("tiny").to_str().unwrap(), "--tiers", "5"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
